-- flash.driver.capture: what the three trigger drivers share (on top of flash.driver.base).
--
-- How they capture (docs/drivers.md "How the trigger drivers capture"): every object lives
-- in the instance's own schema, locked by a session advisory lock. A trigger appends the
-- changed row to the schema's `events` table inside the writer's transaction, as the
-- text of pg_catalog.format('%s', NEW) (record_out: each column's type output function,
-- under the function's canonical settings); the client polls that table, decodes each
-- row by the table's current columns (fl_record.c), applies the listeners' conditions in
-- Lua (flash.where, as wal_logical does) and deletes what it handled.
--
-- Why so: no NOTIFY is sent by writers (PREPARE TRANSACTION works, commits are not
-- serialized on the notify queue, nothing travels where other roles can read or forge
-- it); the trigger functions name no column (no DDL on a listened table can make them
-- fail) and run no code another role controls (no casts, no operators, no conditions: the
-- only calls are pg_catalog's, under a pinned search_path); rows of any size that
-- PostgreSQL can print are a text value of a table; a lost connection loses nothing (the
-- rows wait in the table), and a graceful stop drops the triggers first, then hands over
-- everything they captured.
local core = require "flash.core"
local log = require "flash.log"
local json = require "flash.json"
local where = require "flash.where"
local base = require "flash.driver.base"
local backfill = require "flash.backfill"

local M = {}
-- The generic parts, for the trigger drivers that reach them through this module.
M.class, M.fit_name, M.needed_ops, M.rename, M.fail = base.class, base.fit_name, base.needed_ops, base.rename, base.fail
local fail = base.fail
local null = core.null

local SCHEMA_MARK = "flashlua instance"  -- COMMENT ON SCHEMA marks our schemas
-- SQL: the oid of the role flashlua runs as. A schema counts as flashlua's only when that
-- role owns it: any role with CREATE on the database can make a schema with our mark (or
-- with the name an instance will choose) holding an `events` view of its own functions,
-- which reading or counting it as ours would run with our privileges.
local MY_ROLE = "(SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) CURRENT_USER)"
local PERSISTENT_MARK = "persistent"     -- ... and, after it, those kept across runs
M.PERSISTENT_SCHEMA = "flash_persistent" -- the schema of persistent = true by default
local BATCH = 1000                       -- captured rows fetched per query
-- ... and at most this much of their text (the rows after the first that would pass it
-- wait for the next fetch): a backlog of rows of a few MB each came 1,000 at a time, the
-- whole batch held in libpq's result and again in Lua strings (a 200 MB backlog of 2 MB
-- rows peaked at 414 MB, now at about 60 MB over the baseline, as under wal_logical; 1,000
-- rows of 8 MB would have needed 16 GB). Rows of up to 4 KB still come 1,000 at a time. A
-- row past LARGE_ROW comes on its own connection (fetch_large) and counts as its length.
local BATCH_BYTES = 4 * 1024 * 1024
-- Polls of the events table: at once while batches come full, 5 ms after a partial one
-- (a poll costs a round trip; polling each 1 ms spent 33 us of CPU per event against 19
-- at 5 ms, measured under a steady 8,000 rows/s; docs/drivers.md "Reading"),
-- then twice as long after each empty poll, up to poll_interval (an idle client costs
-- ~20 small queries a second; a change made after a quiet spell arrives within it).
local POLL_INTERVAL = 0.05
local POLL_MIN = 0.005
-- After a partial batch of n rows the next poll waits POLL_MIN * (1 + n / POLL_ROWS), up
-- to POLL_BUSY: a poll costs its backend a statement whatever it reads (~200 us of CPU on
-- a loaded 2-core machine), so under a heavy steady flow a batch of ~100 rows paid 2 us per
-- row for it; the wait settles where batches are large enough (20 ms at 15,000 rows/s and
-- more), and stays near 5 ms for a light flow, where latency is what matters.
local POLL_ROWS, POLL_BUSY = 100, 0.02
local REFRESH_INTERVAL = 2               -- seconds between looks for new partitions/children
local LOCK_TIMEOUT = "50ms"              -- our DDL never queues writers for longer than this
-- A row larger than this (pg_column_size) is captured without its values: its text form
-- could pass PostgreSQL's 1 GB limit for one value and fail the user's write.
local ROW_LIMIT = 256 * 1024 * 1024   -- default of the max_row_bytes option
M.ROW_LIMIT = ROW_LIMIT

M.OP_NAME = { I = "insert", U = "update", D = "delete", T = "truncate" }
M.OP_KEYWORD = { insert = "INSERT", update = "UPDATE", delete = "DELETE", truncate = "TRUNCATE" }
M.OPS = { "insert", "update", "delete", "truncate" }

-- Function-level settings: the row's text is canonical whatever the writer's session
-- says, and nothing the function calls is looked up where another role could put it.
M.FUNC_SETTINGS = [[
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET "DateStyle" = 'ISO, MDY'
SET "TimeZone" = 'UTC'
SET "IntervalStyle" = 'postgres'
SET extra_float_digits = 3
SET bytea_output = 'hex'
]]

-- The flashlua extension's C capture function (pgext/capture.c), when the extension is
-- created in the database: its oid, or NULL. Identified by the extension's membership, so
-- no schema another role could make named `flash` can stand in for it.
M.C_CAPTURE_SQL = [[(SELECT p.oid FROM pg_catalog.pg_depend d
  JOIN pg_catalog.pg_extension e ON e.oid OPERATOR(pg_catalog.=) d.refobjid
  JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) d.objid
  WHERE e.extname OPERATOR(pg_catalog.=) 'flashlua' AND d.deptype OPERATOR(pg_catalog.=) 'e'
    AND d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass
    AND p.proname OPERATOR(pg_catalog.=) 'capture' AND p.pronargs OPERATOR(pg_catalog.=) 0)]]

-- SQL: trigger `t` (a pg_trigger alias) calls the C capture function into the events table
-- `events` (an SQL regclass/oid expression). Its arguments are (tag, events oid, max row).
function M.C_TRIGGER_SQL(t, events)
  return t .. ".tgfoid OPERATOR(pg_catalog.=) " .. M.C_CAPTURE_SQL .. " AND " .. t .. ".tgnargs OPERATOR(pg_catalog.=) 3" ..
    " AND pg_catalog.split_part(pg_catalog.encode(" .. t .. ".tgargs, 'escape'), '\\000', 2) OPERATOR(pg_catalog.=) " ..
    "(" .. events .. ")::pg_catalog.oid::pg_catalog.text"
end

local Driver = base.class(base.Driver)
M.Driver = Driver

-- SQL: trigger `g` (a pg_trigger alias) whose function is `p` (a pg_proc alias) is one of
-- this instance's: its function lives in the schema, or it is the C capture function
-- writing into the schema's events table.
function Driver:ours_sql(g, p)
  return "(" .. p .. ".pronamespace OPERATOR(pg_catalog.=) " .. self:literal(self:ident(self.schema)) ..
    "::pg_catalog.regnamespace OR (" ..
    M.C_TRIGGER_SQL(g, self:literal(self:ident(self.schema) .. ".events") .. "::pg_catalog.regclass") .. "))"
end

-- The end of a row trigger's definition for listener `tag` (0: shared triggers): what it
-- executes. The C function writes into this instance's events table; its WHEN clause is
-- always true (folded away before any row) but names the events table's row type, so the
-- trigger depends on that table: DROP SCHEMA ... CASCADE (or dropping the table) drops it,
-- as it drops triggers calling the schema's own functions.
--
-- PostgreSQL clones a partitioned table's row triggers to each partition that its owner
-- creates or attaches, and refuses to unless that owner may EXECUTE the trigger's
-- function: the owner's CREATE TABLE ... PARTITION OF failed with "permission denied for
-- function" while flashlua listened. So the owner of a partitioned table r that is not
-- flashlua's role (r.foreign_parent) gets EXECUTE on our row functions (Driver:grant_parents;
-- without USAGE on the schema it cannot name them in a trigger of its own), and the row
-- triggers of a listened table call our own function unless every such owner in its tree
-- may execute the C one (r.no_c).
function Driver:row_capture(tag, r)
  local c = self.c_capture
  if c and r and r.no_c then c = nil end
  if c then
    return string.format("WHEN (true OR NULL::%s.events IS NULL) EXECUTE FUNCTION %s('%s', '%s', '%s')",
      self:ident(self.schema), c.fn, tag, c.events, self.max_row)
  end
  return self:own_capture(tag)
end

-- The same with the instance's own PL/pgSQL function: the row triggers without the C
-- function, and every truncate trigger (a statement trigger takes no WHEN clause).
function Driver:own_capture(tag)
  return "EXECUTE FUNCTION " .. self:ident(self.schema) .. ".capture('" .. tag .. "')"
end

-- Picks the capture function (the `capture` option) once the events table exists.
function Driver:choose_capture()
  self.c_capture = nil
  if self.capture_mode == "plpgsql" then return true end
  local rows, err = self:exec([[
    SELECT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(p.proname) AS fn,
           pg_catalog.has_function_privilege(p.oid, 'EXECUTE') AS can,
           pg_catalog.to_regclass($1 || '.events')::pg_catalog.oid::pg_catalog.int8 AS events
    FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
    WHERE p.oid = ]] .. M.C_CAPTURE_SQL, self:ident(self.schema))
  if not rows then return nil, err end
  local r = rows[1]
  if r and r.can and r.events then
    self.c_capture = { fn = r.fn, events = string.format("%d", r.events) }
    log.debug("row triggers call " .. r.fn .. " (the flashlua extension's C capture function)")
    return true
  end
  if self.capture_mode == "c" then
    return fail(r and "the role may not execute " .. r.fn or
      "the flashlua extension (with flash.capture()) is not created in this database",
      r and "GRANT EXECUTE ON FUNCTION " .. r.fn .. "() TO the role flashlua runs as" or
      "install it (`make install-pgext`) and run `CREATE EXTENSION flashlua` as a superuser, or use capture = \"auto\"")
  end
  return true
end

-- The module of a trigger driver whose class is `class` (flash.driver's contract).
function M.module(class)
  return { OPTIONS = M.OPTIONS, Driver = class, new = function(client) return M.new(class, client) end }
end

-- The options of every trigger driver (flash.driver: besides those every client takes).
M.OPTIONS = {
  schema = "string",
  durable = "boolean",
  poll_interval = { type = "number", check = function(v)
    if not (v > 0 and v <= 60) then
      return "seconds between polls of the capture table, 0 < s <= 60 expected, got " .. tostring(v)
    end
  end },
  -- Which function the row triggers call: "c" the flashlua extension's flash.capture()
  -- (docs/drivers.md "The C capture function"), "plpgsql" the instance's own capture(),
  -- "auto" (the default) the C one when the extension is there and the role may use it.
  capture = { type = "string", check = function(v)
    if v ~= "auto" and v ~= "c" and v ~= "plpgsql" then
      return "\"auto\", \"c\" or \"plpgsql\" expected, got " .. string.format("%q", v)
    end
  end },
  max_row_bytes = { type = "number", check = function(v)
    if not (v >= 1024 and v <= 512 * 1024 * 1024) then
      return "a row size in bytes from 1024 to 536870912 (512 MB) expected, got " .. tostring(v)
    end
  end },
}


-- A driver of `class` for `client`.
function M.new(class, client)
  local self = setmetatable({
    client = client,
    listening = false,
    retry_at = nil,
    retry = base.backoff(),   -- the reconnect schedule
    lost_at = nil,
    captured = 0,
    next_poll = nil,
    next_refresh = nil,
    installed = {},     -- [key] = { rel =, name =, qualified =, ddl = } triggers in the database
    rels = {},          -- [relation oid] = { display =, listeners = {...} }: what captures go to
    known = {},         -- [relation oid] = { display =, relkind = }: every relation captured from (describe)
    routes = {},        -- [route id] = { listener =, roots = { oids } }: see Driver:route_tag
    route_ids = {},     -- ["listener:oid,oid"] = route id
    route_lists = {},   -- [tag] = the listeners a row of that tag goes to, until the listeners change
    shapes = {},        -- [relation oid] = { fp =, n =, layout =, seen = }: columns to decode its rows by
    history = {},       -- [relation oid] = { older shapes..., shapes[oid] }: see Driver:pick_shape
    fetches = 0,        -- fetches so far; partial_at: the last one that came back less than full
    handled = {},       -- seqs of delivered rows, deleted with the next fetch
    delivered = {},     -- manual acks: seqs of delivered rows not yet acknowledged, in order
  }, class)
  -- Unique per running instance with default options: two instances never share objects.
  -- persistent = true: one fixed name, kept across runs and crashes (docs/delivery.md).
  self.persistent = client.opts.persistent == true
  self.durable = client.opts.durable == true or self.persistent
  self.schema = client.opts.schema or
    (self.persistent and M.PERSISTENT_SCHEMA or string.format("flash_%d", client.conn:backend_pid()))
  self.poll_interval = client.opts.poll_interval or POLL_INTERVAL
  self.max_row = string.format("%d", client.opts.max_row_bytes or ROW_LIMIT)
  self.capture_mode = client.opts.capture or client.loop.defaults.capture or "auto"
  -- flash.where's emit, made once (a closure per row would be garbage per event).
  self.emit = function(l, ev) return client:_deliver(l, ev) end
  return self
end













---------------------------------------------------------------------------------------
-- Removing a schema without deadlocking writers: its triggers go first, one table per
-- transaction, each waiting at most LOCK_TIMEOUT for the table (a writer holding it is
-- never made to wait on us, and new writers queue behind us only that long), retried
-- until `deadline`. Once every trigger is gone no transaction can be inside one of our
-- functions, and the schema itself drops with no lock on anybody's table.

-- SQLSTATEs of a statement that waited past LOCK_TIMEOUT (or lost a deadlock): the table
-- is busy, try again later.
local BUSY = { ["55P03"] = true, ["40P01"] = true }

-- Runs `sql` (our DDL on a user's table) waiting at most LOCK_TIMEOUT for locks, and
-- committed durably whatever the server's synchronous_commit: a crash of a server that
-- runs with it off loses the last commits of every session, and a capture trigger lost so
-- would miss the rows written after the restart while the reconnect says nothing was lost
-- (spec/87). Its WAL flush takes our schema's earlier commits (tables, functions, routes)
-- with it.
function Driver:exec_briefly(sql)
  return self:exec("SELECT pg_catalog.set_config('lock_timeout', '" .. LOCK_TIMEOUT .. "', true), " ..
    "pg_catalog.set_config('synchronous_commit', 'on', true);\n" .. sql)
end

-- The triggers on users' tables whose functions live in schema `name` (cloned partition
-- triggers go with their parent's): name, table schema, table, table oid.
function Driver:schema_triggers(name)
  return self:exec([[
    SELECT t.tgname::text AS name, n.nspname::text AS schema, c.relname::text AS rel, t.tgrelid::bigint AS oid
    FROM pg_catalog.pg_trigger t
    JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
    JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE t.tgparentid OPERATOR(pg_catalog.=) 0::pg_catalog.oid AND (p.pronamespace OPERATOR(pg_catalog.=) pg_catalog.to_regnamespace($1)::pg_catalog.oid
      OR (]] .. M.C_TRIGGER_SQL("t", "pg_catalog.to_regclass($1 OPERATOR(pg_catalog.||) '.events')") .. "))",
    self:ident(name))
end

-- Drops the triggers whose functions live in schema `name`; true, or nil and why. A table
-- that stays busy is tried again until `deadline`; a trigger that cannot be dropped for
-- another reason (a role that may create triggers on a table it does not own, by the
-- TRIGGER privilege, may not drop them) is not: trying again would change nothing.
function Driver:drop_schema_triggers(name, deadline)
  local failed, nfailed, first = {}, 0, nil
  while true do
    local rows, err = self:schema_triggers(name)
    if not rows then return nil, err end
    local busy
    for _, t in ipairs(rows) do
      local key = t.oid .. ":" .. t.name
      if not failed[key] then
        local ok, derr, state = self:exec_briefly("DROP TRIGGER IF EXISTS " .. self:ident(t.name) ..
          " ON " .. self:ident(t.schema) .. "." .. self:ident(t.rel))
        if not ok then
          if BUSY[state] then
            busy = derr
          else
            if not self:conn():ok() then return nil, derr end
            derr = tostring(derr):gsub("%s+$", "")
            self.warned_drop = self.warned_drop or {}
            if not self.warned_drop[key] then
              self.warned_drop[key] = true
              log.warn(string.format("cannot drop trigger %s on %s.%s: %s", t.name, t.schema, t.rel, derr))
            end
            failed[key], nfailed = true, nfailed + 1
            first = first or string.format("cannot drop trigger %s on %s.%s: %s", t.name, t.schema, t.rel, derr)
          end
        end
      end
    end
    if not busy then
      if nfailed == 0 then return true end
      return nil, string.format("%s (%d trigger%s left: run `DROP SCHEMA %s CASCADE` as the owner of the tables, " ..
        "which drops them and what they captured)", first, nfailed, nfailed == 1 and "" or "s", self:ident(name))
    end
    if core.now() >= deadline then return nil, "tables stayed busy: " .. tostring(busy) end
    core.sleep(0.02)
  end
end

-- Relation locks no plain read or write takes: a statement holding one may be DDL.
local DDL_LOCKS = "'ShareUpdateExclusiveLock', 'ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock', " ..
  "'AccessExclusiveLock'"

-- The DDL event trigger whose function lives in schema `name` goes before the function.
-- A DDL statement lists the event triggers to run before it calls them, and takes no lock
-- on them: one that listed ours, then saw its function dropped (DROP SCHEMA ... CASCADE
-- drops trigger and function at once), failed with "cache lookup failed for function N",
-- a user's ALTER TABLE or CREATE TABLE failing because we stopped. So the trigger is
-- dropped in a transaction of its own, and the function only once every statement that
-- may have listed it (a statement of this database that holds a lock only DDL takes and
-- began before the drop) has ended, or at `deadline`. A statement that lists the triggers
-- after the drop no longer sees ours; one that calls our function takes a lock on the
-- events table, which the schema's drop waits for.
function Driver:drop_ddl_trigger(name, deadline)
  local rows = self:exec([[SELECT e.evtname::text AS name FROM pg_catalog.pg_event_trigger e
    JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) e.evtfoid
    WHERE p.pronamespace OPERATOR(pg_catalog.=) pg_catalog.to_regnamespace($1)::pg_catalog.oid]], self:ident(name))
  if not rows or #rows == 0 then return end
  for _, r in ipairs(rows) do
    if not self:exec("DROP EVENT TRIGGER IF EXISTS " .. self:ident(r.name)) then return end
  end
  local since = self:exec("SELECT pg_catalog.clock_timestamp()::text AS t")
  since = since and since[1] and since[1].t
  if not since then return end
  while core.now() < deadline do
    local busy = self:exec([[SELECT pg_catalog.count(*)::int AS n FROM pg_catalog.pg_stat_activity a
      WHERE a.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()
        AND a.pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid() AND a.state OPERATOR(pg_catalog.=) 'active'
        AND a.backend_type OPERATOR(pg_catalog.=) 'client backend'
        AND a.query_start OPERATOR(pg_catalog.<) $1::pg_catalog.timestamptz
        AND EXISTS (SELECT 1 FROM pg_catalog.pg_locks l WHERE l.pid OPERATOR(pg_catalog.=) a.pid
          AND l.locktype OPERATOR(pg_catalog.=) 'relation' AND l.granted AND l.mode OPERATOR(pg_catalog.=) ANY (ARRAY[]]
          .. DDL_LOCKS .. "]))", since)
    if not busy or not busy[1] or busy[1].n == 0 then return end
    core.sleep(0.02)
  end
end

-- Removes schema `name` and everything in it; true, or nil and why.
function Driver:remove_schema(name, deadline)
  local ok, err = self:drop_schema_triggers(name, deadline)
  if not ok then return nil, err end
  self:drop_ddl_trigger(name, deadline)
  while true do
    local state
    ok, err, state = self:exec_briefly("DROP SCHEMA IF EXISTS " .. self:ident(name) .. " CASCADE")
    if ok then return true end
    if not BUSY[state] or core.now() >= deadline then return nil, err end
    core.sleep(0.02)
  end
end

-- Removes the schema `name` of an instance that is gone, saying how many captured changes
-- it never delivered; true, or nil and why.
function Driver:discard_schema(name)
  local left = self:backlog(name)
  if left > 0 then
    log.warn(string.format("schema %s held %d captured changes its instance never delivered; they are " ..
      "discarded with it", name, left))
  end
  return self:remove_schema(name, core.now() + (self.client.opts.shutdown_timeout or 10))
end

-- Captured changes still waiting in schema `name`'s events table (0 when it has none): its
-- rows of an operation (M.OP_NAME), not the shape markers of DDL (op 'S'), which counted as
-- changes in the number a stop or the next start gave ("held 331 captured changes" for 330).
function Driver:backlog(name)
  local rows = self:exec("SELECT CASE WHEN pg_catalog.to_regclass($1) IS NULL THEN 0 ELSE " ..
    "(SELECT pg_catalog.count(*) FROM " .. self:ident(name) .. ".events e WHERE e.op::pg_catalog.text " ..
    "OPERATOR(pg_catalog.=) ANY ('{I,U,D,T}'::pg_catalog.text[])) END AS n", self:ident(name) .. ".events")
  return rows and rows[1] and tonumber(rows[1].n) or 0
end

-- Removes schemas of flashlua instances that are gone (their session-level advisory locks
-- are free), so nobody's writes keep paying for triggers no one listens to. Gone only when
-- both of its locks are free: an instance whose query connection was terminated still
-- holds its keeper's while it reconnects.
function Driver:remove_leftovers()
  -- A persistent schema is never an orphan: it waits for its next run (or a DROP SCHEMA).
  local rows, err = self:exec([[
    SELECT nspname::text AS name FROM pg_catalog.pg_namespace
    WHERE pg_catalog.obj_description(oid, 'pg_namespace') OPERATOR(pg_catalog.~~) pg_catalog.concat($1::pg_catalog.text, '%')
      AND NOT pg_catalog.obj_description(oid, 'pg_namespace') OPERATOR(pg_catalog.~~)
        pg_catalog.concat($1::pg_catalog.text, ' ', $2::pg_catalog.text, '%')
      AND nspowner OPERATOR(pg_catalog.=) ]] .. MY_ROLE, SCHEMA_MARK,
    PERSISTENT_MARK)
  if not rows then return nil, err end
  self:sweep_orphans(rows, self.schema, "schema", function(name) return self:discard_schema(name) end,
    function(name) return name .. ":keeper" end)
  return true
end


-- The keeper: a second session that holds the instance's second lock, so that losing one
-- connection (pg_terminate_backend, a proxy's idle timeout) never makes the instance look
-- gone to another instance's start. Checked again at every refresh. true; false when
-- another session holds that lock (another instance of this schema is alive); nil when
-- it cannot tell (no connection).
function Driver:keep_alive()
  local k = self.keeper
  if k and k:ok() then return true end
  if k then k:close() end
  self.keeper = nil
  local conn = core.connect(self.client:dsn())
  if not conn then return nil end
  local got = conn:exec("SELECT pg_catalog.pg_try_advisory_lock(" .. self:lock_sql(self.schema .. ":keeper") .. ") AS ok", 0)
  if not (got and got[1] and got[1].ok) then
    conn:close()
    if got and got[1] then return false end
    return nil
  end
  self.keeper = conn
  return true
end

function Driver:drop_keeper()
  if self.keeper then
    self.keeper:close()
    self.keeper = nil
  end
end


---------------------------------------------------------------------------------------
-- The schema: events table and capture functions.

-- Rows stored in more than this many bytes are turned into text under an exception
-- handler (row_text): decompressed, their text could pass PostgreSQL's 1 GB limit for one
-- value, which must never fail the user's write. Below it no row can (a value compresses
-- at most ~250:1 and prints at most ~4 times its size).
local GUARDED = 262144
M.GUARDED = GUARDED

-- SQL (a text expression) for row expression `r` as captured: its text, or NULL when it is
-- too large (then big_sql says its size).
function Driver:row_text_sql(r)
  return "CASE WHEN pg_catalog.pg_column_size(" .. r .. ") OPERATOR(pg_catalog.<=) " .. GUARDED ..
    " THEN pg_catalog.format('%s', " .. r .. ") ELSE " .. self:ident(self.schema) .. ".row_text(" .. r .. ") END"
end

-- The writer's session already has the canonical output settings (FUNC_SETTINGS) when this
-- holds: any UTC zone name, DateStyle ISO (its MDY/DMY half changes input only), any
-- extra_float_digits above 0 (all print the shortest exact form). Then the row trigger
-- formats the row itself; otherwise row_text() does it under FUNC_SETTINGS. Only
-- pg_catalog is named, so the writer's search_path cannot reach into it.
M.CANONICAL_SQL = table.concat({
  "pg_catalog.current_setting('TimeZone') OPERATOR(pg_catalog.=) ANY " ..
    "('{UTC,Etc/UTC,GMT,Etc/GMT,UCT,Etc/UCT,Universal,Etc/Universal,Zulu,Etc/Zulu}'::pg_catalog.text[])",
  "pg_catalog.current_setting('DateStyle') OPERATOR(pg_catalog.~~) 'ISO,%'",
  "pg_catalog.current_setting('IntervalStyle') OPERATOR(pg_catalog.=) 'postgres'",
  "pg_catalog.current_setting('bytea_output') OPERATOR(pg_catalog.=) 'hex'",
  "pg_catalog.current_setting('extra_float_digits') OPERATOR(pg_catalog.=) ANY ('{1,2,3}'::pg_catalog.text[])",
}, "\n  AND ")

-- The row trigger function (every trigger driver's row triggers, and the truncate
-- triggers): one row per change, tagged with TG_ARGV[0] (the `trigger` driver's listener
-- id; 0 for shared triggers). It runs once per written row, so it is kept lean (docs/drivers.md
-- "What capturing costs a writer"): no SET clause (each costs the writer a GUC save and
-- restore per row), so every name in it is qualified; the common path is three statements.
function Driver:capture_function()
  local E = self:ident(self.schema) .. ".events"
  local L = self.max_row
  local rt = self:ident(self.schema) .. ".row_text("
  local function side(var, rec)
    return {
      "  " .. var .. " := CASE WHEN canon AND pg_catalog.pg_column_size(" .. rec .. ") OPERATOR(pg_catalog.<=) " ..
        GUARDED .. " THEN pg_catalog.format('%s', " .. rec .. ") ELSE " .. rt .. rec .. ") END;",
      "  IF " .. var .. " IS NULL OR pg_catalog.octet_length(" .. var .. ") OPERATOR(pg_catalog.>) " .. L .. " THEN",
      -- No text at all: PostgreSQL could not make it; its stored size, negative.
      "    big := CASE WHEN " .. var .. " IS NULL THEN LEAST(big, " ..
        "pg_catalog.int8um(pg_catalog.pg_column_size(" .. rec .. "))) " ..
        "ELSE GREATEST(big, pg_catalog.octet_length(" .. var .. ")) END;",
      "    " .. var .. " := NULL;",
      "  END IF;",
    }
  end
  local lines = {
    "DECLARE n pg_catalog.text; o pg_catalog.text; big pg_catalog.int8; canon pg_catalog.bool;",
    "BEGIN",
    "canon := " .. M.CANONICAL_SQL .. ";",
    "IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' OR TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN",
  }
  for _, l in ipairs(side("n", "NEW")) do lines[#lines + 1] = l end
  lines[#lines + 1] = "END IF;"
  lines[#lines + 1] = "IF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' OR TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN"
  for _, l in ipairs(side("o", "OLD")) do lines[#lines + 1] = l end
  lines[#lines + 1] = "END IF;"
  lines[#lines + 1] = "INSERT INTO " .. E .. " (xid, op, rel, tag, new, old, big) VALUES (pg_catalog.txid_current(),"
  lines[#lines + 1] = "  pg_catalog.substr(TG_OP, 1, 1)::pg_catalog.\"char\", TG_RELID, " ..
    "pg_catalog.int4in(pg_catalog.textout(TG_ARGV[0])), n, o, big);"
  lines[#lines + 1] = "RETURN NULL;"
  lines[#lines + 1] = "END"
  return table.concat(lines, "\n")
end

function Driver:schema_sql()
  local S = self:ident(self.schema)
  local sql = {
    -- Unlogged by default: capturing costs the writer no WAL; a crash of the server (not a
    -- clean restart) empties it, which the reconnect reports. durable = true logs it.
    "CREATE " .. (self.durable and "" or "UNLOGGED ") .. "TABLE IF NOT EXISTS " .. S .. ".events (" ..
      "seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, xid bigint NOT NULL, op \"char\" NOT NULL, " ..
      "rel oid NOT NULL, tag integer NOT NULL, new text, old text, big bigint) " ..
      "WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000)",
    -- Rows are read once, soon: compressing large ones would only cost the writer time.
    "ALTER TABLE " .. S .. ".events ALTER new SET STORAGE EXTERNAL, ALTER old SET STORAGE EXTERNAL",
    "CREATE OR REPLACE FUNCTION " .. S .. ".capture() RETURNS trigger LANGUAGE plpgsql " ..
      "SECURITY DEFINER AS " .. self:literal(self:capture_function()),
    -- Nobody else may attach our functions to a table (firing a trigger checks nothing).
    "REVOKE ALL ON FUNCTION " .. S .. ".capture() FROM PUBLIC",
    -- A large row's text, or NULL when PostgreSQL cannot make it (past 1 GB, out of memory).
    "CREATE OR REPLACE FUNCTION " .. S .. ".row_text(r anyelement) RETURNS text LANGUAGE plpgsql " ..
      M.FUNC_SETTINGS .. " AS " .. self:literal("BEGIN RETURN pg_catalog.format('%s', r); " ..
      "EXCEPTION WHEN OTHERS THEN RETURN NULL; END"),
    "REVOKE ALL ON FUNCTION " .. S .. ".row_text(anyelement) FROM PUBLIC",
    -- Routes (Driver:route_tag): which listened tables a trigger captures for. Each of our
    -- triggers carries the negated id of its route as its tag, so a captured row says at
    -- capture time which listened tables it belongs to, whatever happens to its relation
    -- later (DETACH PARTITION, NO INHERIT, DROP). Logged, whatever the events table is.
    "CREATE TABLE IF NOT EXISTS " .. S .. ".routes (id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY, " ..
      "listener integer NOT NULL, roots oid[] NOT NULL)",
    -- `rank`: the `trigger` driver's listener as its rank among the listeners of its table
    -- (Driver:route_tag); NULL in routes of an older flashlua, which name the listener id.
    "ALTER TABLE " .. S .. ".routes ADD COLUMN IF NOT EXISTS rank integer",
    -- The last columns (and name) the client knew of each relation it captured from, as a
    -- shape marker's JSON: rows of a relation dropped before they were read are decoded by it.
    "CREATE TABLE IF NOT EXISTS " .. S .. ".relations (rel oid PRIMARY KEY, shape text NOT NULL)",
  }
  if not self.durable then
    -- One row in an unlogged table: a crash of the server empties it with the events table
    -- (Driver:crash_emptied), whatever the events table held or was given since.
    sql[#sql + 1] = "CREATE UNLOGGED TABLE IF NOT EXISTS " .. S .. ".alive (since timestamptz NOT NULL)"
    sql[#sql + 1] = self:arm_alive_sql()
  end
  return sql
end

function Driver:arm_alive_sql()
  local S = self:ident(self.schema)
  return "INSERT INTO " .. S .. ".alive SELECT pg_catalog.now() WHERE NOT EXISTS (SELECT FROM " .. S .. ".alive)"
end

-- Exact shapes: an event trigger (superusers only may create one) appends a shape marker
-- to the events table at the end of every ALTER TABLE of a table we capture from (and its
-- descendants), inside the DDL's transaction. Without it, rows are decoded by the columns
-- the catalog has when they are read (a row written before a concurrent ALTER TABLE and
-- read after it is matched by position; README "Known limitations").
function Driver:ddl_function()
  local S = self:ident(self.schema)
  local cols = require("flash.catalog").columns_sql("a.attrelid = t.rel")
  local qname = "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) FROM pg_catalog.pg_class c " ..
    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = "
  return table.concat({
    "DECLARE kid record; trg record; pname text; cname text;",
    "BEGIN",
    -- Shape markers: every relation the command touched that we capture from.
    "BEGIN",
    "  INSERT INTO " .. S .. ".events (xid, op, rel, tag, new)",
    "  SELECT pg_catalog.txid_current(), 'S', t.rel, 0, pg_catalog.json_build_object(",
    "      'schema', n.nspname, 'relname', c.relname, 'name', n.nspname || '.' || c.relname,",
    -- (json_agg of no columns is NULL: a table of none has the empty array)
    "      'cols', COALESCE((SELECT pg_catalog.json_agg(pg_catalog.json_build_array(x.name, x.oid, x.elem, " ..
    "x.delim) ORDER BY x.ord) FROM (SELECT pg_catalog.row_number() OVER () AS ord, q.* FROM (" .. cols .. ") q) x), " ..
    "'[]'::pg_catalog.json))::text",
    "  FROM (SELECT DISTINCT d.rel FROM pg_catalog.pg_event_trigger_ddl_commands() e,",
    "        LATERAL (WITH RECURSIVE k(rel) AS (SELECT e.objid UNION",
    "                 SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN k ON i.inhparent = k.rel)",
    "                 SELECT rel FROM k) d",
    "        WHERE e.classid = 'pg_catalog.pg_class'::pg_catalog.regclass",
    "          AND EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g JOIN pg_catalog.pg_proc p ON p.oid = g.tgfoid",
    "                      WHERE g.tgrelid = d.rel AND " .. self:ours_sql("g", "p") .. ")) t",
    "  JOIN pg_catalog.pg_class c ON c.oid = t.rel JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace;",
    "EXCEPTION WHEN OTHERS THEN",
    "  -- Never the DDL's failure: the consumer falls back to the catalog's columns.",
    "  RAISE WARNING 'flashlua (%): cannot record the new columns: %', " .. self:literal(self.schema) .. ", SQLERRM;",
    "END;",
    -- A table created as a child (INHERITS, or a partition) of one we capture from gets our
    -- triggers its parent has and PostgreSQL does not clone (statement triggers; any
    -- trigger for INHERITS), in the same transaction: none of its rows escapes.
    "BEGIN",
    "  FOR kid IN SELECT e.objid AS child, i.inhparent AS parent",
    "           FROM pg_catalog.pg_event_trigger_ddl_commands() e",
    "           JOIN pg_catalog.pg_inherits i ON i.inhrelid = e.objid",
    "           WHERE e.command_tag = 'CREATE TABLE' AND e.classid = 'pg_catalog.pg_class'::pg_catalog.regclass",
    "  LOOP",
    "    " .. qname .. "kid.parent INTO pname;",
    "    " .. qname .. "kid.child INTO cname;",
    "    FOR trg IN SELECT g.oid, g.tgname::text AS name FROM pg_catalog.pg_trigger g",
    "             JOIN pg_catalog.pg_proc p ON p.oid = g.tgfoid",
    "             WHERE g.tgrelid = kid.parent AND g.tgparentid = 0 AND " .. self:ours_sql("g", "p"),
    "               AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger x WHERE x.tgrelid = kid.child",
    "                               AND x.tgname = g.tgname)",
    "    LOOP",
    "      EXECUTE pg_catalog.replace(pg_catalog.pg_get_triggerdef(trg.oid), ' ON ' || pname || ' ', ' ON ' || cname || ' ');",
    "      EXECUTE pg_catalog.format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', cname, trg.name);",
    "    END LOOP;",
    "  END LOOP;",
    "EXCEPTION WHEN OTHERS THEN",
    "  RAISE WARNING 'flashlua (%): cannot add triggers to a new child table: %', " ..
      self:literal(self.schema) .. ", SQLERRM;",
    "END;",
    "END",
  }, "\n")
end

function Driver:install_ddl_markers()
  local rows = self:exec("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user")
  self.markers = rows and rows[1] and rows[1].rolsuper or false
  if not self.markers then
    log.debug("not a superuser: no DDL event trigger; rows are decoded by the columns the catalog has when read")
    return true
  end
  local S = self:ident(self.schema)
  local name = self:ident(M.fit_name(self.schema, "_ddl"))
  local ok, err = self:exec(table.concat({
    "CREATE OR REPLACE FUNCTION " .. S .. ".on_ddl() RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER " ..
      "SET search_path = pg_catalog, pg_temp AS " .. self:literal(self:ddl_function()),
    "REVOKE ALL ON FUNCTION " .. S .. ".on_ddl() FROM PUBLIC",
    "DROP EVENT TRIGGER IF EXISTS " .. name,
    "CREATE EVENT TRIGGER " .. name .. " ON ddl_command_end WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE') EXECUTE FUNCTION " ..
      S .. ".on_ddl()",
  }, ";\n"))
  if not ok then return fail("cannot create the DDL event trigger: " .. tostring(err)) end
  return true
end

-- Whether the schema exists, and then whether it is a persistent schema of ours (true), a
-- schema of ours of one run (nil), or someone else's (false, and the role owning it when
-- that is not ours: what it holds is never read, counted or dropped).
function Driver:schema_exists()
  local rows = self:exec("SELECT pg_catalog.obj_description(n.oid, 'pg_namespace') AS mark, " ..
    "n.nspowner OPERATOR(pg_catalog.=) " .. MY_ROLE .. " AS mine, pg_catalog.pg_get_userbyid(n.nspowner)::text AS owner " ..
    "FROM pg_catalog.pg_namespace n WHERE n.nspname OPERATOR(pg_catalog.=) $1", self.schema)
  local r = rows and rows[1]
  if not r then return false end
  if not r.mine then return true, false, r.owner end
  local mark = r.mark ~= core.null and r.mark or ""
  if mark:sub(1, #SCHEMA_MARK) ~= SCHEMA_MARK then return true, false end
  return true, mark:sub(#SCHEMA_MARK + 1, #SCHEMA_MARK + 1 + #PERSISTENT_MARK) == " " .. PERSISTENT_MARK or nil
end

function Driver:install_schema(fresh)
  -- The default name (flash_<backend pid>) is easily guessed: one whose schema another role
  -- made first, or whose advisory lock another session holds (any role may take any
  -- advisory lock), is passed over for flash_<pid>_2, _3, ...
  local default = fresh and not self.persistent and not self.client.opts.schema
  local first, n = self.schema, 1
  while true do
    local existed, _, other = self:schema_exists()
    local why = default and existed and other and ("belongs to role " .. other)
    if not why then
      local got, err = self:exec("SELECT pg_catalog.pg_try_advisory_lock(" .. self:lock_sql(self.schema) .. ") AS ok")
      if not got then return nil, err end
      local busy = not got[1].ok and ""
      if not busy and fresh and self:keep_alive() == false then
        -- Its query connection is reconnecting, but its keeper still holds the schema.
        self:exec("SELECT pg_catalog.pg_advisory_unlock(" .. self:lock_sql(self.schema) .. ")")
        busy = " (reconnecting)"
      end
      if not busy then break end
      if not default then
        return fail(string.format("schema %s is in use by another running flashlua instance%s%s", self.schema, busy,
          busy == "" and self:lock_holder(self.schema) or ""),
          "give each instance its own `schema` option, or leave it out for a unique default")
      end
      why = "is locked by another session"
    end
    if n == 1 then log.warn(string.format("schema %s %s: this instance uses another name", first, why)) end
    n = n + 1
    if n > 100 then
      return fail(string.format("schemas %s to %s_%d are all taken by other roles or sessions", first, first, n - 1),
        "pass `schema` naming one of this instance's own")
    end
    self.schema = string.format("%s_%d", first, n)
  end
  self.owns_lock = true
  self:keep_alive()
  local S = self:ident(self.schema)
  local existed, kept, other = self:schema_exists()
  if other then
    self:exec("SELECT pg_catalog.pg_advisory_unlock(" .. self:lock_sql(self.schema) .. ")")
    self.owns_lock = nil
    self:drop_keeper()
    return fail(string.format("schema %s exists and belongs to role %s, not to %s, the role flashlua runs as",
      self.schema, other, self.client.role), "pass `schema` naming a schema of its own, or have that role drop it")
  end
  if fresh and existed and not (self.persistent and kept) then
    -- A schema of this name whose lock was free: left by an instance that is gone.
    local ok, rerr = self:discard_schema(self.schema)
    if not ok then return fail("cannot remove the old schema " .. self.schema .. ": " .. tostring(rerr)) end
    existed = false
  elseif fresh and existed then
    local left = self:backlog(self.schema)
    log.info(string.format("resuming persistent schema %s: %d captured changes wait to be delivered", self.schema, left))
  elseif fresh and kept == false and self.persistent then
    return fail(string.format("schema %s exists and is not flashlua's", self.schema),
      "pass `schema` naming a schema of its own, or drop that one")
  end
  local sql = {
    "CREATE SCHEMA IF NOT EXISTS " .. S,
    "COMMENT ON SCHEMA " .. S .. " IS " .. self:literal(self.persistent and
      string.format("%s %s: kept across runs; DROP SCHEMA %s CASCADE removes it and its triggers", SCHEMA_MARK,
        PERSISTENT_MARK, S) or
      string.format("%s (pid %d); removed when it stops", SCHEMA_MARK, core.getpid())),
    "REVOKE ALL ON SCHEMA " .. S .. " FROM PUBLIC",
  }
  for _, s in ipairs(self:schema_sql()) do sql[#sql + 1] = s end
  local ok, err
  ok, err = self:exec(table.concat(sql, ";\n"))
  if not ok then
    return fail("cannot create schema " .. self.schema .. ": " .. err,
      "the role needs CREATE on the database; or pass `schema` naming one it may create")
  end
  ok, err = self:choose_capture()
  if not ok then return nil, err end
  ok, err = self:install_ddl_markers()
  if not ok then return nil, err end
  self.listening = true
  return true, existed
end

---------------------------------------------------------------------------------------
-- Which tables capture for which listener: the listened table and its descendants
-- (partitions at any depth, INHERITS children), found again every REFRESH_INTERVAL.

function Driver:descendants(oid)
  local rows, err = self:exec([[
    WITH RECURSIVE d(oid) AS (
      SELECT $1::oid
      UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN d ON i.inhparent = d.oid)
    SELECT c.oid::bigint AS oid, n.nspname::text AS schema, c.relname::text AS name,
           c.relkind::text AS relkind, c.relispartition AS part,
           pg_catalog.pg_get_userbyid(c.relowner)::text AS owner,
           c.relkind OPERATOR(pg_catalog.=) 'p' AND NOT pg_catalog.pg_has_role(c.relowner, CURRENT_USER, 'USAGE')
             AS foreign_parent,
           coalesce(pg_catalog.has_function_privilege(c.relowner, ]] .. M.C_CAPTURE_SQL .. [[, 'EXECUTE'), false) AS owner_c
    FROM d JOIN pg_catalog.pg_class c ON c.oid = d.oid
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p')
    ORDER BY c.oid]], oid)
  return rows, err
end

-- Recomputes self.rels (and each listener's descendant list).
function Driver:map_relations()
  local rels = {}
  -- Keeps listener l's relations as they were (rows it captured before still arrive).
  local function keep(l)
    for oid, e in pairs(self.rels) do
      for _, x in ipairs(e.listeners) do
        if x == l then
          local ne = rels[oid]
          if not ne then ne = { display = e.display, relkind = e.relkind, listeners = {} } rels[oid] = ne end
          ne.listeners[#ne.listeners + 1] = l
        end
      end
    end
  end
  for _, l in ipairs(self.client.listeners) do
    local rows = self:descendants(l.table.oid)
    if rows and #rows == 0 then
      -- Dropped (DROP TABLE takes our triggers with it). Rows it captured before still
      -- arrive; a new table of the same name is another relation.
      if not l.gone then
        l.gone = true
        log.warn(string.format("table %s was dropped: listener %d captures nothing more from it (a table " ..
          "created again under that name is not followed: listen to it again)", l.table_name, l.id))
      end
      l.relations = {}
      keep(l)
    elseif rows and #rows > 0 then
      l.relations = rows
      for _, r in ipairs(rows) do
        local e = rels[r.oid]
        if not e then
          e = { display = r.schema .. "." .. r.name, relkind = r.relkind, listeners = {} }
          rels[r.oid] = e
        end
        e.listeners[#e.listeners + 1] = l
      end
      -- The listened table's current name (it may have been renamed).
      for _, r in ipairs(rows) do
        if r.oid == l.table.oid then M.rename(l, r.schema, r.name) end
      end
    else
      -- The catalog could not be read (the connection is failing): nothing changes, and
      -- what its tables captured is still delivered.
      l.relations = l.relations or {}
      keep(l)
    end
  end
  self.rels = rels
  for oid, e in pairs(rels) do self.known[oid] = e end
  self.route_lists = {}
end

---------------------------------------------------------------------------------------
-- Routes: which listened tables a captured row belongs to, decided when it is captured.
-- A row of a partition (at any depth) or an INHERITS child is captured by a trigger the
-- client made for listened tables -- on the listened table itself, which PostgreSQL clones
-- to every partition, or on the child. Each trigger's tag is minus the id of its route:
-- the listener it captures for (the `trigger` driver; 0: every listener of the tables) and
-- the oids of those listened tables, kept in the schema's `routes` table. So a partition
-- detached (or detached and dropped) after it captured a row, before the client read it,
-- still sends the row where it belonged when it was written; the catalog as it is when the
-- row is read says nothing about that. Tags 0 and above are those of triggers made before
-- routes existed (a persistent schema of an older flashlua, until its triggers are made
-- again at start): their rows go by the catalog when read, as they did.

local function route_key(listener, roots_text, rank)
  return (rank and "r" .. rank or tostring(listener)) .. ":" .. roots_text
end

local function add_route(self, id, listener, roots_text, rank)
  local roots = {}
  for oid in roots_text:gmatch("%d+") do roots[#roots + 1] = tonumber(oid) end
  self.routes[id] = { listener = listener, roots = roots, rank = rank }
  self.route_ids[route_key(listener, roots_text, rank)] = id
end

-- Reads the schema's routes (at every install: a schema made again has none).
function Driver:load_routes()
  self.routes, self.route_ids, self.route_lists = {}, {}, {}
  local rows, err = self:exec("SELECT id, listener, pg_catalog.array_to_string(roots, ',') AS roots, rank FROM " ..
    self:ident(self.schema) .. ".routes")
  if not rows then return nil, err end
  for _, r in ipairs(rows) do add_route(self, r.id, r.listener, r.roots, r.rank ~= core.null and r.rank or nil) end
  return true
end

-- The tag of a trigger that captures for listener `listener` (0: all of them) of the listened
-- tables whose oids are the keys of `roots`; the route is made on first use. Or nil, err.
-- A `rank` (the `trigger` driver: the listener's rank among its table's listeners) is what
-- routes its rows, here and in the next runs of a persistent schema: listener ids are
-- creation order over every table, so a script that adds or removes a listener of another
-- table gives them to other listeners (the rows of a removed one's successor went nowhere).
function Driver:route_tag(listener, roots, rank)
  local list = {}
  for oid in pairs(roots) do list[#list + 1] = string.format("%d", oid) end
  table.sort(list)
  local text = table.concat(list, ",")
  local id = self.route_ids[route_key(listener, text, rank)]
  if not id then
    local rows, err = self:exec("INSERT INTO " .. self:ident(self.schema) .. ".routes (listener, roots, rank) " ..
      "VALUES ($1::pg_catalog.int4, $2::pg_catalog.oid[], NULLIF($3::pg_catalog.int4, 0)) RETURNING id",
      string.format("%d", listener), "{" .. text .. "}", string.format("%d", rank or 0))
    if not rows then return nil, err end
    id = rows[1].id
    add_route(self, id, listener, text, rank)
  end
  return -id
end

-- The listeners a row captured with tag `tag` (< 0) goes to, in their creation order: those
-- of its route's tables (only its listener's, under the `trigger` driver) that still listen.
function Driver:route_listeners(tag)
  local list = self.route_lists[tag]
  if list then return list end
  list = {}
  local route = self.routes[-tag]
  if route then
    for _, l in ipairs(self.client.listeners) do
      if route.listener == 0 or (route.rank and route.rank == l.rank) or (not route.rank and route.listener == l.id) then
        for _, oid in ipairs(route.roots) do
          if l.table.oid == oid then list[#list + 1] = l break end
        end
      end
    end
  elseif not self.warned_route then
    self.warned_route = true
    log.warn(string.format("rows captured with tag %d name no route of %s.routes (was the table changed by " ..
      "hand?): they are not delivered", tag, self.schema))
  end
  self.route_lists[tag] = list
  return list
end

-- The tables of listener `l` that need row triggers: row triggers on a partitioned table
-- are cloned to every partition (also those created later); INHERITS children need their
-- own.
function M.row_targets(l)
  local out = {}
  for _, r in ipairs(l.relations or {}) do
    if r.oid == l.table.oid or not r.part then out[#out + 1] = r end
  end
  return out
end

-- For the shared drivers: per table, the union of the row operations its listeners need,
-- over the tables `targets(l)` gives, and the listened tables it captures for (its route);
-- and the tables that need a truncate trigger. Returns a list of { r = relation, ops = {
-- insert = true, ... }, roots = { [oid] = true } } in first-seen order, and a map oid -> {
-- r =, roots = } for truncates.
function M.table_ops(listeners, targets)
  local by, list, truncs = {}, {}, {}
  for _, l in ipairs(listeners) do
    local need = M.needed_ops(l)
    for _, r in ipairs(targets(l)) do
      local t = by[r.oid]
      if not t then
        t = { r = r, ops = {}, roots = {} }
        by[r.oid] = t
        list[#list + 1] = t
      end
      t.roots[l.table.oid] = true
      for _, op in ipairs({ "insert", "update", "delete" }) do
        if need[op] then t.ops[op] = true end
      end
    end
    if need.truncate then
      for _, r in ipairs(M.truncate_targets(l)) do
        truncs[r.oid] = truncs[r.oid] or { r = r, roots = {} }
        truncs[r.oid].roots[l.table.oid] = true
      end
    end
  end
  return list, truncs
end

-- The tables of listener `l` that need a truncate trigger: the listened table and every
-- descendant (partitions at any depth, INHERITS children). A TRUNCATE fires the statement
-- triggers of each table it empties, and PostgreSQL clones none to partitions, so a
-- partition or child truncated by name is seen only by its own trigger. Like pgoutput, a
-- TRUNCATE is delivered per table that held rows (Driver:deliver_row skips partitioned
-- ones, whose trigger is there for new partitions to copy: Driver:ddl_function).
function M.truncate_targets(l)
  if l.gone then return {} end
  if not l.relations or #l.relations == 0 then return { l.table } end
  return l.relations
end

-- The truncate triggers of `truncs` (M.table_ops): statement triggers (no WHEN clause, so
-- always the instance's own function, which DROP SCHEMA ... CASCADE removes).
function Driver:truncate_triggers(truncs, out)
  local name = M.fit_name(self.schema, "_truncate")
  for oid, t in pairs(truncs) do
    local tbl = t.r
    local tag, err = self:route_tag(0, t.roots)
    if not tag then return nil, err end
    local q = self:qualified_rel(tbl)
    out[#out + 1] = { key = oid .. "/" .. name, name = name, qualified = q, what = "truncate",
      display = tbl.schema .. "." .. tbl.name,
      ddl = "AFTER TRUNCATE ON " .. q .. " FOR EACH STATEMENT " .. self:own_capture(tag) }
  end
  return out
end

-- The desired triggers: a list of { key =, rel =, name =, qualified =, ddl = }; each
-- driver says (Driver:wanted_triggers).
function Driver:qualified_rel(r)
  return self:ident(r.schema) .. "." .. self:ident(r.name)
end

-- Our functions that row triggers call (each gets EXECUTE for the owners of the
-- partitioned tables they are on: Driver:row_capture).
function Driver:row_functions()
  return { self:ident(self.schema) .. ".capture()" }
end

-- Grants EXECUTE on our row functions to the owners of listened partitioned tables (and
-- partitioned descendants) that are not flashlua's role; true, or nil and why.
function Driver:grant_parents()
  self.granted = self.granted or {}
  for _, l in ipairs(self.client.listeners) do
    local no_c = false
    for _, r in ipairs(l.relations or {}) do
      if r.foreign_parent then
        -- Its partitions get the root's triggers: the C function only if every such owner may.
        if not r.owner_c then no_c = true end
        if not self.granted[r.owner] then
          local ok, err = self:exec("GRANT EXECUTE ON FUNCTION " .. table.concat(self:row_functions(), ", ") .. " TO " ..
            self:ident(r.owner))
          if not ok then return nil, err end
          self.granted[r.owner] = true
        end
      end
    end
    for _, r in ipairs(l.relations or {}) do
      if r.oid == l.table.oid then r.no_c = no_c end
    end
  end
  return true
end

-- Makes the database's triggers match what the listeners want. Each change is its own
-- transaction waiting at most LOCK_TIMEOUT for the table, retried on the next step.
function Driver:sync_all()
  if not self.listening then return true end   -- reconnecting: installed on reconnect
  local cok, cerr = self:check_triggers()
  if not cok then return self:sync_failed(cerr) end
  self:map_relations()
  local gok, gerr = self:grant_parents()
  if not gok then return self:sync_failed(gerr) end
  -- Shapes of relations new to us, read before their triggers exist: rows captured later
  -- are decoded by these until a marker says otherwise.
  local fresh = {}
  for oid in pairs(self.rels) do
    if not self.shapes[oid] then fresh[#fresh + 1] = oid end
  end
  local sok, serr = self:load_shapes(fresh)
  if not sok then return self:sync_failed(serr) end
  local wanted, werr = self:wanted_triggers()
  if not wanted then return self:sync_failed(werr) end
  local want = {}
  for _, t in ipairs(wanted) do want[t.key] = t end
  local pending, missing   -- missing: a wanted trigger not there yet (its table and why)
  for key, have in pairs(self.installed) do
    local w = want[key]
    if w and w.ddl ~= have.ddl then
      -- Re-created below by one statement that drops and creates it: no moment without it.
      self.installed[key] = nil
    end
  end
  -- CREATE TRIGGER ... FOR EACH ROW on a partitioned table loads its partition key and its
  -- partitioned descendants', which runs their immutable calls with constant arguments as
  -- us: a table owner's key `(id + f())` ran f() with flashlua's privileges. Such a table
  -- fails the start; met later (a partition attached since, and our trigger to make again),
  -- its row triggers are left out, with a warning, rather than stopping every listener.
  local refused, seen = {}, {}
  for key, w in pairs(want) do
    local oid = not self.installed[key] and w.ddl:find(" FOR EACH ROW", 1, true) and tonumber(key:match("^(%d+)/"))
    if oid and not seen[oid] then
      seen[oid] = true
      local found, ferr = require("flash.catalog").foreign_code(self:conn(), { oid }, { "key" })
      if found == nil then return self:sync_failed(ferr) end
      if found then
        local msg = string.format("cannot create flashlua's triggers: %s, which PostgreSQL would run as %s (the " ..
          "role flashlua runs as) while creating them", found, self.client.role)
        local hint = "run flashlua as the table's owner, or have a superuser own that function"
        if self.installing then return fail(msg, hint) end
        refused[oid] = true
        self.warned_key = self.warned_key or {}
        if not self.warned_key[oid] then
          self.warned_key[oid] = true
          log.warn(string.format("%s (%s); changes to %s are not captured", msg, hint, w.display or w.qualified))
        end
      end
    end
  end
  for key in pairs(want) do
    if refused[tonumber(key:match("^(%d+)/"))] then want[key] = nil end
  end
  -- The wanted triggers are made before the unwanted ones go: a trigger renamed (a
  -- persistent schema of an older flashlua; trigger_global's partitioned tables) or moved
  -- to another listener captures twice for a moment rather than not at all.
  for key, w in pairs(want) do
    if not self.installed[key] then
      local create = "DROP TRIGGER IF EXISTS " .. self:ident(w.name) .. " ON " .. w.qualified .. ";\n" ..
        "CREATE TRIGGER " .. self:ident(w.name) .. " " .. w.ddl
      -- ENABLE ALWAYS: writes made with session_replication_role = replica (logical
      -- replication apply, pg_restore, sync tools) are captured too, as wal_logical sees them.
      local ok, err, state = self:exec_briefly(create .. ";\nALTER TABLE " .. w.qualified .. " ENABLE ALWAYS TRIGGER " ..
        self:ident(w.name))
      if not ok and state == "42501" then
        ok, err, state = self:exec_briefly(create)
        if ok and not self.warned_always then
          self.warned_always = true
          log.warn(string.format("writes made with session_replication_role = replica on %s are not captured: " ..
            "only the table's owner can ENABLE ALWAYS a trigger (run flashlua as the owner to capture them)", w.display))
        end
      end
      if ok then
        self.installed[key] = w
        log.debug(string.format("trigger %s created on %s", w.name, w.qualified))
      elseif not self:conn():ok() then
        return self:sync_failed(err)
      elseif BUSY[state] then
        pending = pending or err
        missing = missing or string.format("%s (%s)", w.display, tostring(err):gsub("%s+$", ""))
      else
        return fail(string.format("cannot create the %s trigger on %s: %s", w.what, w.display, err),
          "run flashlua as the table's owner (or a member of the owning role): the TRIGGER privilege " ..
          "alone lets a role create the trigger but not drop it at stop")
      end
    end
  end
  for key, have in pairs(self.installed) do
    if not want[key] then
      local ok, err, state = self:exec_briefly("DROP TRIGGER IF EXISTS " .. self:ident(have.name) .. " ON " ..
        have.qualified)
      if ok or state == "42P01" then
        self.installed[key] = nil
        log.debug(string.format("trigger %s dropped from %s", have.name, have.qualified))
      elseif not self:conn():ok() then
        return self:sync_failed(err)
      else
        pending = pending or err
      end
    end
  end
  self:keep_shapes()
  -- A table that stayed busy past the lock timeout: tried again soon.
  self.resync = pending and true or nil
  self.missing = missing
  if pending then log.debug("trigger changes wait for a busy table: " .. tostring(pending)) end
  return true
end

-- Our triggers as the catalog has them, against what we installed. A table's owner may
-- drop, rename, disable or ENABLE REPLICA our trigger on its table (the TRIGGER privilege
-- suffices for none of that, ownership for all): its writes were then no longer captured,
-- and nothing said so. A trigger gone (or renamed: the renamed one is dropped) is said in
-- a warning and made again by this sync; a disabled one (or one that fires only under
-- session_replication_role = replica) is said in a warning, once, and left to its owner.
-- true, or nil and why.
function Driver:check_triggers()
  local since = self.triggers_seen_at
  self.triggers_seen_at = core.time()
  if self.quiesced or next(self.installed) == nil then return true end   -- a stop drops them itself
  local rows, err = self:exec([[
    SELECT t.tgname::text AS name, n.nspname::text AS schema, c.relname::text AS rel, t.tgrelid::bigint AS oid,
      t.tgparentid OPERATOR(pg_catalog.<>) 0::pg_catalog.oid AS clone, t.tgenabled::text AS enabled
    FROM pg_catalog.pg_trigger t
    JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) t.tgfoid
    JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.tgrelid
    JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
    WHERE ]] .. self:ours_sql("t", "p"))
  if not rows then return nil, err end
  local seen, extra, news = {}, {}, {}
  self.warned_off = self.warned_off or {}
  local off = {}
  for _, r in ipairs(rows) do
    local key = r.oid .. "/" .. r.name
    if not r.clone then
      seen[key] = true
      if not self.installed[key] then extra[key] = r end
    end
    if r.enabled == "D" or r.enabled == "R" then
      off[key] = true
      if not self.warned_off[key] then
        self.warned_off[key] = true
        local t = r.schema .. "." .. r.rel
        local w = news[t .. r.enabled]
        if not w then
          w = { r = r, names = {} }
          news[t .. r.enabled] = w
          news[#news + 1] = w
        end
        w.names[#w.names + 1] = r.name
      end
    end
  end
  for _, w in ipairs(news) do
    local r, list = w.r, w.names
    table.sort(list)
    local alters = {}
    for i, name in ipairs(list) do alters[i] = "ENABLE ALWAYS TRIGGER " .. self:ident(name) end
    log.warn(string.format("%s %s on %s.%s %s %s (ALTER TABLE ... %s TRIGGER, by another session): changes to " ..
      "%s.%s are not captured while %s (ALTER TABLE %s.%s %s captures them again)",
      #list == 1 and "trigger" or "triggers", table.concat(list, ", "), r.schema, r.rel, #list == 1 and "is" or "are",
      r.enabled == "D" and "disabled" or "enabled for replication only", r.enabled == "D" and "DISABLE" or
      "ENABLE REPLICA", r.schema, r.rel, #list == 1 and "it is" or "they are", self:ident(r.schema), self:ident(r.rel),
      table.concat(alters, ", ")))
  end
  for key in pairs(self.warned_off) do
    if not off[key] then self.warned_off[key] = nil end
  end
  -- A trigger renamed still captured: only one dropped left a gap.
  local renamed = {}
  for _, r in pairs(extra) do renamed[r.oid] = true end
  local missing = {}
  for key in pairs(self.installed) do
    if not seen[key] then missing[#missing + 1] = key:match("^(%d+)/") end
  end
  -- A table dropped takes its triggers with it (said elsewhere, as a listened table gone).
  local exists = {}
  if #missing > 0 then
    local live
    live, err = self:exec("SELECT c.oid::bigint AS oid FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) " ..
      "ANY ($1::pg_catalog.oid[])", "{" .. table.concat(missing, ",") .. "}")
    if not live then return nil, err end
    for _, r in ipairs(live) do exists[r.oid] = true end
  end
  local gone, tables = {}, {}
  for key, have in pairs(self.installed) do
    if not seen[key] then
      self.installed[key] = nil    -- made again by this sync
    end
    local t = have.display or have.qualified
    if not seen[key] and exists[tonumber(key:match("^(%d+)/"))] then
      if not gone[t] then
        gone[t] = { renamed = renamed[tonumber(key:match("^(%d+)/"))] }
        tables[#tables + 1] = t
      end
      gone[t][#gone[t] + 1] = have.name
    end
  end
  table.sort(tables)
  local dropped = false
  for _, t in ipairs(tables) do
    local list = gone[t]
    table.sort(list)
    local one = #list == 1
    if list.renamed then
      log.warn(string.format("%s %s on %s %s renamed (by another session): %s made again under %s name%s",
        one and "trigger" or "triggers", table.concat(list, ", "), t, one and "was" or "were", one and "it is" or "they are",
        one and "its" or "their", one and "" or "s"))
    else
      dropped = true
      log.warn(string.format("%s %s on %s %s dropped by another session (DROP TRIGGER, or DROP EXTENSION flashlua " ..
        "CASCADE): changes to %s committed between %s and now were not captured; %s made again",
        one and "trigger" or "triggers", table.concat(list, ", "), t, one and "was" or "were", t,
        os.date("!%Y-%m-%d %H:%M:%SZ", math.floor(since or self.triggers_seen_at)), one and "it is" or "they are"))
    end
  end
  -- DROP EXTENSION flashlua CASCADE took the C capture function along: the triggers are
  -- made again with the instance's own PL/pgSQL one.
  if dropped and self.c_capture then
    local ok, cerr = self:choose_capture()
    if not ok then return nil, cerr end
  end
  -- Ours but not known (renamed, or made by the DDL event trigger): made again if wanted
  -- (its definition is unknown), dropped if not.
  for key, r in pairs(extra) do
    self.installed[key] = { name = r.name, qualified = self:ident(r.schema) .. "." .. self:ident(r.rel), ddl = "?" }
  end
  return true
end

-- on()/off() of a listener: every trigger of the instance is made to match again.
function Driver:sync() return self:sync_complete() end

-- A table that was busy past LOCK_TIMEOUT leaves its triggers for later (self.missing):
-- writes to it meanwhile would not be captured. Where the caller is told "capturing now"
-- (start, a reconnect, on() at run time) the triggers are retried until every one exists,
-- for at most BUSY_WAIT seconds; then the error names the table and the fix.
local BUSY_WAIT = 10
function Driver:sync_complete()
  local ok, err = self:sync_all()
  local deadline = core.now() + BUSY_WAIT
  while ok and self.missing and self.listening do
    if core.now() >= deadline then
      return fail("cannot add a trigger to " .. self.missing .. ": the table stays locked",
        "find the session holding it in pg_locks / pg_stat_activity; flashlua waits at most " .. BUSY_WAIT ..
        " s for it")
    end
    core.sleep(0.02)
    ok, err = self:sync_all()
  end
  return ok, err
end

-- Forgets what the database holds: triggers are found again from the catalog.
function Driver:load_installed()
  self.installed = {}
  for _, r in ipairs(self:schema_triggers(self.schema) or {}) do
    -- Unknown DDL: dropped and created again by the next sync.
    self.installed[r.oid .. "/" .. r.name] = { name = r.name, qualified = self:ident(r.schema) .. "." .. self:ident(r.rel),
      ddl = "?" }
  end
end

function Driver:install(fresh)
  -- Our polls read and delete rows the writers' triggers insert: under a database's or
  -- role's default_transaction_isolation = serializable they failed with serialization
  -- errors (stopping the client) and made writers fail as pivots. They need no more than
  -- read committed, so the client's connection runs that by default (a script's own
  -- BEGIN ISOLATION LEVEL ... still chooses).
  local ok, err = self:exec("SET default_transaction_isolation = 'read committed'")
  if not ok then return nil, err end
  ok, err = self:remove_leftovers()
  if not ok then return nil, err end
  local existed
  ok, existed = self:install_schema(fresh)
  if not ok then return nil, existed end
  self.granted = {}   -- functions made again (a schema swept while disconnected) have no grants
  ok, err = self:load_routes()
  if not ok then return nil, err end
  if fresh then self.created_schema = not existed end
  -- A persistent schema's triggers stayed while no run was there: found again, kept, and
  -- only those no listener wants any more are dropped.
  if fresh and not (self.persistent and existed) then self.installed = {} else self:load_installed() end
  self.installing = fresh   -- at the start, what cannot be captured fails it (Driver:sync_all)
  ok, err = self:sync_complete()
  self.installing = nil
  if not ok then return nil, err end
  if not self.listening then return nil, "the connection was lost again" end
  self.next_poll = core.now()
  self.next_refresh = core.now() + REFRESH_INTERVAL
  self.triggers_seen_at = core.time()
  return true, existed
end

function Driver:start()
  local ok, err = self:install(true)
  if not ok then
    -- Only what this run made: never a schema another instance holds, nor a persistent one.
    if self.owns_lock and not self.persistent then self:remove_schema(self.schema, core.now() + 5) end
    if self.owns_lock then self:exec("SELECT pg_catalog.pg_advisory_unlock(" .. self:lock_sql(self.schema) .. ")") end
    self:drop_keeper()
    return nil, err
  end
  self.server_started, self.commit_ts = self:server_facts()
  log.debug(string.format("%s driver capturing into %s.events", self.client.driver_name, self.schema))
  return true
end

-- After a restart of the server, before the reconnect installs anything: whether a crash
-- emptied the unlogged tables of the schema: true when the row of its `alive` table is
-- gone, false when it is there, nil when it cannot tell (a schema made before it had one,
-- or gone). The events table alone cannot tell: rows committed since the crash take seqs
-- from 1 again, which may pass the highest one read before it (and those were then taken
-- for rows already handled, and deleted unread).
function Driver:crash_emptied()
  local rows = self:exec("SELECT CASE WHEN pg_catalog.to_regclass($1) IS NULL THEN NULL ELSE " ..
    "NOT EXISTS (SELECT FROM " .. self:ident(self.schema) .. ".alive) END AS gone", self:ident(self.schema) .. ".alive")
  local gone = rows and rows[1] and rows[1].gone
  if gone == nil or gone == null then return nil end
  return gone
end

-- The same question for a schema without an `alive` table: true when the events table's
-- identity sequence (unlogged with it) restarted below the highest seq read, false when it
-- did not, nil when nothing was read yet (it cannot tell).
function Driver:emptied_by_crash()
  local rows = self:exec("SELECT pg_catalog.pg_sequence_last_value(pg_catalog.pg_get_serial_sequence($1, 'seq'))::text AS v",
    self:ident(self.schema) .. ".events")
  local v = rows and rows[1] and rows[1].v
  if v == nil then return nil end
  if not self.max_seq then return nil end
  return v == null or tonumber(v) < self.max_seq
end

-- The table was emptied and its seqs start again at 1: the seqs of rows read before must
-- never be deleted (nor confirmed) now, as they may be those of new rows. Rows of the
-- batch in hand are still delivered (they are committed changes), without their seqs.
function Driver:forget_seqs()
  self.handled = {}
  self.delivered = {}
  self.max_seq = nil
  if self.pending then
    for i = self.pending_i or 1, #self.pending do self.pending[i].gone = true end
  end
end

-- When the server started (a change means it restarted) and whether it records commit
-- timestamps.
function Driver:server_facts()
  local rows = self:exec("SELECT pg_catalog.pg_postmaster_start_time()::text AS t, " ..
    "pg_catalog.current_setting('track_commit_timestamp') OPERATOR(pg_catalog.=) 'on' AS cts")
  local r = rows and rows[1]
  return r and r.t, r and r.cts or false
end

function Driver.fds() return {} end

function Driver:next_deadline()
  if not self.listening then return self.retry_at end
  if self.client.backfills and backfill.due(self) then return core.now() end
  local d = self.next_poll
  if self.next_refresh and (not d or self.next_refresh < d) then d = self.next_refresh end
  return d
end

function Driver:stats(s)
  s.schema = self.schema
  s.captured = self.captured
  s.paused = self:paused()
  if self.client.backfills then s.backfill = backfill.stats(self.client) end
end

local function lost(self, err)
  self.listening = false
  self.lost_at = self.lost_at or core.time()
  self.retry_at = core.now()
  self.retry:reset()
  log.warn(string.format("connection to PostgreSQL lost (%s); reconnecting", (tostring(err):gsub("%s+$", ""))))
end

-- A sync (on() or off() at run time) that failed because the connection is gone is not
-- the caller's error: the reconnect installs what the listeners want by then.
function Driver:sync_failed(err)
  if self:conn():ok() then return nil, err end
  lost(self, err)
  return true
end

function Driver:reconnect()
  local client = self.client
  local conn, err = core.connect(client:dsn())
  if conn then
    client:_log_notices()
    client.conn:close()
    client.conn = conn
    -- Before install() arms the alive row again: kept until a reconnect reports it.
    local started = self:server_facts()
    if started and self.server_started and started ~= self.server_started and not self.durable and
      self.crash_seen == nil then
      self.crash_seen = self:crash_emptied()
    end
    local ok, existed = self:install(false)
    if ok then
      client.counters.reconnects = client.counters.reconnects + 1
      local crashed = false
      if existed and started and self.server_started and started ~= self.server_started and
        not self.durable then
        crashed = self.crash_seen
        if crashed == nil then crashed = self:emptied_by_crash() end
        if crashed then
          log.error(string.format("PostgreSQL crashed while the connection was down: the changes captured into " ..
            "%s.events and not yet read were lost with it (the table is unlogged; durable = true keeps them); " ..
            "every change committed since it came back is delivered", self.schema))
        elseif crashed == nil then
          log.error(string.format("PostgreSQL restarted while the connection was down: if it crashed, the changes " ..
            "captured into %s.events but not yet read are lost (the table is unlogged; durable = true keeps them)",
            self.schema))
        end
        if crashed ~= false then self:forget_seqs() end
      end
      self.crash_seen = nil
      self.server_started = started or self.server_started
      if existed and crashed ~= false then
        log.warn("reconnected; the changes committed meanwhile wait in " .. self.schema .. ".events")
      elseif existed then
        log.warn("reconnected; nothing was lost: the changes committed meanwhile wait in " .. self.schema .. ".events")
      else
        -- A new events table: its seqs start again, so those handled or delivered in the
        -- old one must never be deleted from it.
        self:forget_seqs()
        local span = string.format("changes committed between %s and %s were not captured",
          os.date("!%Y-%m-%d %H:%M:%SZ", math.floor(self.lost_at)), os.date("!%Y-%m-%d %H:%M:%SZ", math.floor(core.time())))
        if self.schema_dropped then
          log.warn(string.format("schema %s was dropped while listening (by another session: DROP SCHEMA ... CASCADE " ..
            "removes flashlua's triggers with it); created it again: %s", self.schema, span))
        else
          log.warn(string.format("reconnected, but schema %s was removed while the connection was down: %s",
            self.schema, span))
        end
      end
      self.schema_dropped = nil
      self.lost_at, self.retry_at = nil, nil
      if client.acks then
        -- Rows delivered but not acknowledged are read again and delivered as new events.
        if client.acks.outstanding > 0 then
          log.warn(string.format("%d unacknowledged events are delivered again", client.acks.outstanding))
        end
        client.acks:reset()
        -- Backfill chunks whose reads were not all acknowledged are read again too: their
        -- markers leave the delivered list here, which would otherwise count as acknowledged.
        if client.backfills then backfill.reset(client) end
        self.delivered = {}
      end
      return true
    end
    err = existed
    self.listening = false
  end
  self.retry_at = self.retry:schedule(err, "reconnect")
  return true
end

---------------------------------------------------------------------------------------
-- Reading what was captured.

-- The shape (columns and types) of each relation in `oids`, as the catalog says now;
-- shapes whose fingerprint changed get a new layout.
function Driver:load_shapes(oids)
  if #oids == 0 then return true end
  local rows, err = self:exec(require("flash.catalog").columns_sql("a.attrelid = ANY($1::oid[])"),
    "{" .. table.concat(oids, ",") .. "}")
  if not rows then return nil, err end
  local by = {}
  for _, r in ipairs(rows) do
    local list = by[r.rel]
    if not list then list = {} by[r.rel] = list end
    list[#list + 1] = r
  end
  local missing = {}
  for _, oid in ipairs(oids) do
    if by[oid] then self:set_shape(oid, by[oid]) else missing[#missing + 1] = oid end
  end
  -- No columns: dropped, or a table of no columns (CREATE TABLE t (), or every column
  -- dropped), whose rows are "()": an empty shape, not the text of a gone relation.
  if #missing > 0 then
    rows, err = self:exec("SELECT c.oid::pg_catalog.int8 AS rel FROM pg_catalog.pg_class c " ..
      "WHERE c.oid OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.oid[])", "{" .. table.concat(missing, ",") .. "}")
    if not rows then return nil, err end
    for _, r in ipairs(rows) do self:set_shape(r.rel, {}) end
  end
  return true
end

-- The columns rows of relation `oid` are decoded by from now on. Without shape markers a
-- change found in the catalog keeps the shapes seen before it (self.history): rows
-- written before the ALTER TABLE may still be waiting to be read.
function Driver:set_shape(oid, cols, kept)
  local fp = {}
  for i, c in ipairs(cols) do fp[i] = c.name .. ":" .. c.oid .. ":" .. c.elem end
  fp = table.concat(fp, ",")
  local s = self.shapes[oid]
  if not s or s.fp ~= fp then
    local shape = { fp = fp, n = #cols, cols = cols, layout = core.layout(cols, self.client.flags), seen = self.fetches }
    self.shapes[oid] = shape
    -- A persistent schema keeps it (Driver:keep_shapes), unless it comes from there.
    if self.persistent and not kept then
      self.unkept = self.unkept or {}
      self.unkept[oid] = true
    end
    if s and not self.markers then
      local hist = self.history[oid] or { s }
      for i = #hist, 1, -1 do
        if hist[i].fp == fp then table.remove(hist, i) end
      end
      hist[#hist + 1] = shape
      self.history[oid] = hist
    end
  end
end

-- Which shape a captured row of relation r.rel was written with, and whether that is
-- uncertain. Without shape markers the client knows the shapes it saw in the catalog, not
-- when each ALTER TABLE committed; a row's text tells how many values it has. Once a
-- fetch that began after a shape was seen comes back less than full, every row written
-- with an older one has been read, and the older ones are forgotten (Driver:fetch). Until
-- then a row is decoded by the one shape with its number of values; when several have it
-- (a column retyped or renamed, or dropped and another added) or none does (more than one
-- ALTER TABLE between two looks), the newest such shape is used and the event says so.
function Driver:pick_shape(r, shape)
  local hist = self.history[r.rel]
  if not hist then return shape, false end
  local text = type(r.new) == "string" and r.new or r.old
  if type(text) ~= "string" then return shape, false end
  local _, n = shape.layout:record(text)
  local found, count = nil, 0
  for i = #hist, 1, -1 do
    if hist[i].n == n then
      count = count + 1
      found = found or hist[i]
    end
  end
  if count == 1 then return found, false end
  return found or shape, true
end

-- Forgets older shapes once every row written with them has been read: a fetch that began
-- after the newest shape was seen came back less than full.
function Driver:forget_shapes()
  local partial = self.partial_at
  if not partial then return end
  for oid, hist in pairs(self.history) do
    if hist[#hist].seen < partial then self.history[oid] = nil end
  end
end

-- A shape as a marker's JSON says it: { name =, cols = { { name, type oid, element type
-- oid, delimiter }... } } (the DDL event trigger's markers, the schema's relations table).
-- Returns the decoded object and its columns, or nil.
local function marker_shape(text)
  local m = type(text) == "string" and json.decode(text)
  -- (a table of no columns: markers of earlier versions have null, json_agg of none)
  if type(m) == "table" and m.cols == null then m.cols = {} end
  if type(m) ~= "table" or type(m.cols) ~= "table" then return nil end
  local cols = {}
  for i, c in ipairs(m.cols) do cols[i] = { name = c[1], oid = c[2], elem = c[3], delim = c[4] } end
  return m, cols
end

-- A shape marker (op 'S'), written by the DDL event trigger in the DDL's own transaction:
-- rows captured before it were written with the old columns, rows after it with these.
function Driver:apply_marker(r)
  local m, cols = marker_shape(r.new)
  if not m then
    log.warn("ignoring a malformed shape marker of relation " .. tostring(r.rel))
    return
  end
  local info = self.rels[r.rel] or self.known[r.rel]
  if not info and type(m.name) == "string" then
    -- A relation made and left (or dropped) before the client looked: its name is here.
    self.known[r.rel] = { display = m.name, relkind = "r" }
  elseif info and m.name and info.display ~= m.name then
    info.display = m.name
    for _, l in ipairs(info.listeners or {}) do
      if l.table.oid == r.rel then M.rename(l, m.schema, m.relname) end
    end
  end
  self:set_shape(r.rel, cols)
end

-- A persistent schema keeps the last shape (and name) the client knew of each relation in
-- its `relations` table: a relation dropped while its rows waited for the next run (a
-- partition detached and dropped meanwhile) is decoded by it (Driver:describe). Written
-- when a shape changes, before the poll that deletes the rows (markers) it came from.
function Driver:keep_shapes()
  if not self.unkept then return true end
  local items = {}
  for oid in pairs(self.unkept) do
    local shape, info = self.shapes[oid], self.known[oid]
    local cols = {}
    for i, c in ipairs(shape.cols) do cols[i] = { c.name, c.oid, c.elem, c.delim } end
    items[#items + 1] = { string.format("%d", oid), json.encode({ name = info and info.display,
      relkind = info and info.relkind, cols = json.array(cols) }) }
  end
  local ok, err = self:exec("INSERT INTO " .. self:ident(self.schema) .. ".relations (rel, shape) " ..
    "SELECT (e OPERATOR(pg_catalog.->>) 0)::pg_catalog.oid, e OPERATOR(pg_catalog.->>) 1 " ..
    "FROM pg_catalog.json_array_elements($1::pg_catalog.json) e ON CONFLICT (rel) DO UPDATE SET shape = EXCLUDED.shape",
    json.encode(json.array(items)))
  if not ok then
    log.debug("cannot keep the shapes of captured relations: " .. tostring(err))
    return nil, err
  end
  self.unkept = nil
  return true
end

-- Relations of captured rows that no listened table leads to now (detached or dropped
-- before the client read their rows; Driver:route_tag delivered them): their names from
-- the catalog; for those gone from it, the names and shapes the schema kept
-- (Driver:keep_shapes) when their shapes are not known. Failures leave them unknown.
function Driver:describe(names, shapes)
  local gone = {}   -- dropped, and never seen: named by its oid (unless a kept shape names it)
  if #names > 0 then
    local rows = self:exec("SELECT c.oid::bigint AS oid, pg_catalog.format('%s.%s', n.nspname, c.relname) AS display, " ..
      "c.relkind::text AS relkind FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace " ..
      "WHERE c.oid OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.oid[])", "{" .. table.concat(names, ",") .. "}")
    for _, r in ipairs(rows or {}) do self.known[r.oid] = { display = r.display, relkind = r.relkind } end
    for _, oid in ipairs(rows and names or {}) do
      if not self.known[tonumber(oid)] then gone[tonumber(oid)] = true end
    end
  end
  if #shapes > 0 and self.persistent then
    local rows = self:exec("SELECT rel::bigint AS rel, shape FROM " .. self:ident(self.schema) .. ".relations " ..
      "WHERE rel OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.oid[])", "{" .. table.concat(shapes, ",") .. "}")
    for _, r in ipairs(rows or {}) do
      local m, cols = marker_shape(r.shape)
      if m then
        self:set_shape(r.rel, cols, true)
        if gone[r.rel] and type(m.name) == "string" then
          self.known[r.rel] = { display = m.name, relkind = type(m.relkind) == "string" and m.relkind or "r" }
          gone[r.rel] = nil
        end
      end
    end
  end
  for oid in pairs(gone) do self.known[oid] = { display = string.format("relation %d", oid), relkind = "r" } end
end

-- A captured row of more than LARGE_ROW bytes of text is read alone, on a connection
-- opened for it and closed as soon as the row has arrived (exec_last), before the row is
-- copied into Lua: libpq keeps its input buffer as large as the largest message it
-- received, so the client's own connection would hold that much for good.
local LARGE_ROW = 8 * 1024 * 1024

function Driver:fetch_large(r)
  local conn, err = core.connect(self.client:dsn())
  if not conn then return nil, err end
  local rows, qerr = conn:exec_last("SELECT new, old FROM " .. self:ident(self.schema) .. ".events WHERE seq = $1", 0, r.seq)
  conn:close()
  if not rows then return nil, qerr end
  if rows[1] then r.new, r.old = rows[1].new, rows[1].old end
  return true
end

-- Manual acks (flash.ack): every row delivered up to the one of seq `pos` is acknowledged.
function Driver:confirm(pos)
  local d = self.delivered
  local n = 0
  for i = 1, #d do
    if d[i] == pos then n = i break end
  end
  local m = #d
  for i = 1, n do self.handled[#self.handled + 1] = d[i] end
  for i = n + 1, m do d[i - n] = d[i] end
  for i = m - n + 1, m do d[i] = nil end
  -- The next poll deletes them (soon: an acknowledgement is not a reason to wait).
  if n > 0 and self.next_poll then self.next_poll = math.min(self.next_poll, core.now() + POLL_MIN) end
  if self.client.backfills then backfill.confirmed(self.client, pos) end
end

-- Commit order holds among the rows of one fetch (README "Order"): a transaction that
-- committed before one an earlier fetch delivered rows of (that one committed late: a
-- prepared transaction, or one left open, while the client was more than a batch behind)
-- comes after it. That is said, at most once a minute, rather than passed over in silence.
-- Only after a full fetch (the client behind): a commit's timestamp is taken a moment
-- before it becomes visible, so two commits at once may become visible in either order,
-- and one that was not visible yet at the earlier fetch is no client's lag.
local ORDER_WARN_EVERY = 60
function Driver:note_order(rows)
  local top, late, seen = self.max_cts or 0, 0, {}
  local prev = self.fetch_was_full and top or -math.huge
  self.fetch_was_full = self.fetch_full
  for _, r in ipairs(rows) do
    local cts = r.cts
    if type(cts) == "number" and r.op ~= "S" then
      if cts < prev and not seen[r.xid] then
        seen[r.xid] = true
        late = late + 1
      end
      if cts > top then top = cts end
    end
  end
  self.max_cts = top
  if late == 0 then return end
  self.late_xacts = (self.late_xacts or 0) + late
  local now = core.now()
  if self.order_warned_at and now - self.order_warned_at < ORDER_WARN_EVERY then return end
  self.order_warned_at = now
  log.warn(string.format("%d transaction%s committed before another whose rows an earlier poll had delivered " ..
    "(it committed late, e.g. a prepared transaction, while flashlua was more than %d captured rows behind): " ..
    "they arrive after it; the trigger drivers keep commit order among the rows of one poll (README \"Order\")",
    self.late_xacts, self.late_xacts == 1 and "" or "s", BATCH))
  self.late_xacts = 0
end

-- SQL that deletes the rows whose seqs are the int8[] `seqs` (an SQL expression: a
-- parameter of the prepared delete, or the literal of delete_handled_sql).
function Driver:delete_sql(seqs)
  return "DELETE FROM " .. self:ident(self.schema) .. ".events WHERE seq OPERATOR(pg_catalog.=) ANY (" ..
    seqs .. "::pg_catalog.int8[])"
end

-- The same by runs of consecutive seqs, the int8[] expressions `firsts` and `lasts`: one
-- descent of the index per run, not one per row. A run holds only seqs that were handled
-- (consecutive integers, every one of them read), so a row that became visible since,
-- with a seq between two handled ones, is outside every run.
function Driver:delete_runs_sql(firsts, lasts)
  return "DELETE FROM " .. self:ident(self.schema) .. ".events e USING ROWS FROM (pg_catalog.unnest(" .. firsts ..
    "), pg_catalog.unnest(" .. lasts .. ")) AS r(lo, hi) WHERE e.seq OPERATOR(pg_catalog.>=) r.lo " ..
    "AND e.seq OPERATOR(pg_catalog.<=) r.hi"
end

-- The runs of consecutive integers in the list of seqs: two int8[] literals (firsts, lasts).
local function runs(seqs)
  local s = seqs
  for i = 2, #s do
    if s[i] <= s[i - 1] then   -- mostly ascending already: a sorted copy only when not
      s = {}
      for j = 1, #seqs do s[j] = seqs[j] end   -- (unpack stops at a few thousand values)
      table.sort(s)
      break
    end
  end
  local lo, hi = {}, {}
  for i = 1, #s do
    local v = s[i]
    if #hi > 0 and v == hi[#hi] + 1 then hi[#hi] = v
    elseif #hi == 0 or v ~= hi[#hi] then lo[#lo + 1], hi[#hi + 1] = v, v end
  end
  return "{" .. table.concat(lo, ",") .. "}", "{" .. table.concat(hi, ",") .. "}"
end

-- SQL that deletes the rows delivered so far (self.handled).
function Driver:delete_handled_sql()
  return self:delete_sql("'{" .. table.concat(self.handled, ",") .. "}'")
end

-- The poll as a function of the instance's schema, poll(firsts, lasts, skip): it deletes
-- the runs of seqs handled since the last poll (none when NULL), then returns the next
-- batch, leaving out the seqs of `skip` (manual acks: rows delivered and not yet
-- acknowledged stay, and are not read again) -- one statement, one round trip and one
-- transaction per poll. PL/pgSQL keeps its plans for the session, planned with
-- enable_seqscan off: the batch is read from the seq index whatever the table's size. As
-- a plain statement the planner picks a sequential scan and a sort for a table of few
-- live rows, and the events table keeps the pages of its largest backlog (its VACUUM does
-- not truncate): each poll then read every page to find a hundred rows, which cost the
-- consumer's backend more than the rows themselves. Rows past LARGE_ROW bytes of text
-- come without it, on a connection of their own (fetch_large).
function Driver:poll_function_sql()
  local S = self:ident(self.schema)
  local cut = function(c) return "CASE WHEN pg_catalog.octet_length(b." .. c .. ") OPERATOR(pg_catalog.>) " ..
    LARGE_ROW .. " THEN NULL ELSE b." .. c .. " END AS " .. c .. ", pg_catalog.octet_length(b." .. c .. ") AS " ..
    c .. "_len" end
  -- (octet_length of a TOASTed value reads its header, not the value.)
  local len = function(c) return "COALESCE(pg_catalog.octet_length(e." .. c .. "), 0)" end
  local body = table.concat({
    "#variable_conflict use_column",
    "BEGIN",
    "IF firsts IS NOT NULL THEN " .. self:delete_runs_sql("firsts", "lasts") .. "; END IF;",
    "RETURN QUERY SELECT b.seq, b.xid, b.op::text AS op, b.rel::bigint AS rel, b.tag, " .. cut("new") .. ", " ..
      cut("old") .. ", b.big" ..
      (self.commit_ts and ", (pg_catalog.date_part('epoch', pg_catalog.pg_xact_commit_timestamp(b.x_min)) " ..
        "OPERATOR(pg_catalog.*) 1000000)::bigint AS cts" or "") ..
      " FROM (SELECT a.*, pg_catalog.sum(a.blen) OVER (ORDER BY a.seq) AS brun FROM " ..
      "(SELECT e.seq, e.xid, e.op, e.rel, e.tag, e.new, e.old, e.big, e.xmin AS x_min, " ..
      len("new") .. " OPERATOR(pg_catalog.+) " .. len("old") .. " AS blen FROM " .. S .. ".events e " ..
      "WHERE skip IS NULL OR e.seq OPERATOR(pg_catalog.<>) ALL (skip) ORDER BY e.seq LIMIT " .. BATCH .. ") a) b " ..
      -- Every row whose predecessors' text is under BATCH_BYTES: the first one always.
      "WHERE b.brun OPERATOR(pg_catalog.-) b.blen OPERATOR(pg_catalog.<) " .. BATCH_BYTES .. " ORDER BY b.seq;",
    -- What was read is durable before the client gets it: a writer's commit under
    -- synchronous_commit = off is visible before its WAL is flushed, and a crash of the
    -- server then undoes it, after its rows were delivered (events of changes that never
    -- happened). Every commit this read saw has its record before the insert position
    -- now; when rows were read and the WAL is not flushed that far, this transaction takes
    -- an xid and commits synchronously, which flushes it (before the client gets the rows:
    -- the statement's result comes with its commit). An empty poll costs nothing more.
    "IF FOUND AND pg_catalog.pg_current_wal_flush_lsn() OPERATOR(pg_catalog.<) pg_catalog.pg_current_wal_insert_lsn() THEN",
    "  PERFORM pg_catalog.set_config('synchronous_commit', 'on', true);",
    "  PERFORM pg_catalog.txid_current();",
    "END IF;",
    "END" }, "\n")
  local args = "(pg_catalog.int8[], pg_catalog.int8[], pg_catalog.int8[])"
  return "CREATE OR REPLACE FUNCTION " .. S .. ".poll(firsts pg_catalog.int8[], lasts pg_catalog.int8[], " ..
    "skip pg_catalog.int8[]) RETURNS TABLE (seq bigint, xid bigint, op text, rel bigint, tag integer, new text, " ..
    "new_len integer, old text, old_len integer, big bigint" .. (self.commit_ts and ", cts bigint" or "") ..
    ") LANGUAGE plpgsql " ..
    "SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET plan_cache_mode = force_generic_plan AS " ..
    self:literal(body) .. ";\nREVOKE ALL ON FUNCTION " .. S .. ".poll" .. args .. " FROM PUBLIC"
end

-- Fetches the next batch (deleting the rows handled so far in the same round trip);
-- returns the rows in delivery order, or nil and the error.
function Driver:fetch()
  self:forget_shapes()
  self:keep_shapes()
  self.fetches = self.fetches + 1
  local conn = self:conn()
  -- Prepared once per connection (no parse and plan per poll).
  if self.prepared_on ~= conn then
    local ok, perr = conn:exec(self:poll_function_sql(), 0)
    if ok then
      ok, perr = conn:prepare("flash_poll", "SELECT * FROM " .. self:ident(self.schema) .. ".poll($1, $2, $3)")
    end
    if not ok then return nil, perr end
    self.prepared_on = conn
  end
  local firsts, lasts, skip
  if #self.handled > 0 then firsts, lasts = runs(self.handled) end
  if #self.delivered > 0 then skip = "{" .. table.concat(self.delivered, ",") .. "}" end
  local rows, err, state = conn:exec_prepared("flash_poll", 0, firsts, lasts, skip)
  if rows then self.deleted = (self.deleted or 0) + #self.handled end
  if not rows and state == "26000" then
    -- A script's DEALLOCATE or DISCARD ALL on the shared connection: prepare it again.
    self.prepared_on = nil
    return self:fetch()
  end
  self.client:_log_notices()
  if not rows then return nil, err end
  self.handled = {}
  -- Full: BATCH rows, or cut at BATCH_BYTES of text (the next fetch goes at once).
  local bytes = 0
  for _, r in ipairs(rows) do
    bytes = bytes + (type(r.new_len) == "number" and r.new_len or 0) + (type(r.old_len) == "number" and r.old_len or 0)
  end
  self.fetch_full = #rows >= BATCH or bytes >= BATCH_BYTES
  if not self.fetch_full then self.partial_at = self.fetches end
  if #rows == 0 then return rows end
  -- Transactions in commit order when the server records commit timestamps; else in the
  -- order of their last captured row (a transaction that waited for another's row lock
  -- captured after that one committed, so per-row order holds either way). Rows of one
  -- transaction together, in capture order.
  local last = {}
  local top = self.max_seq or 0
  for _, r in ipairs(rows) do
    local m = last[r.xid]
    if not m or r.seq > m then last[r.xid] = r.seq end
    if r.seq > top then top = r.seq end
  end
  self.max_seq = top   -- the highest seq read: a crash that emptied the table restarts below it
  if self.commit_ts then
    for _, r in ipairs(rows) do
      if type(r.cts) == "number" then last[r.xid] = r.cts end
    end
  end
  -- The transaction the previous batch ended with, when that batch was full, may go on in
  -- this one: its rows come first, so that no transaction comes between its rows (one that
  -- committed before it, whose rows were captured after the first batch's, would).
  local cont = self.continuing
  if cont and last[cont] then last[cont] = -math.huge end
  local function before(a, b)
    local la, lb = last[a.xid], last[b.xid]
    if la ~= lb then return la < lb end
    return a.seq < b.seq
  end
  -- Mostly in that order already (short transactions that do not overlap): sorted only
  -- when some row is out of it.
  for i = 2, #rows do
    if before(rows[i], rows[i - 1]) then table.sort(rows, before) break end
  end
  self.continuing = self.fetch_full and rows[#rows].xid or nil
  if self.commit_ts then self:note_order(rows) end
  -- Columns as the catalog says now: for every relation of the batch when there are no
  -- shape markers (no event trigger), else only for relations not seen yet.
  local seen, oids, unknown = {}, {}, {}
  for _, r in ipairs(rows) do
    local rel = r.rel
    if not seen[rel] then
      seen[rel] = true
      if not self.markers or not self.shapes[rel] then oids[#oids + 1] = rel end
      if not self.known[rel] then unknown[#unknown + 1] = rel end
    end
  end
  -- A partition or child new to us: followed from now on.
  if #unknown > 0 then self:sync_all() end
  local ok
  ok, err = self:load_shapes(oids)
  if not ok then return nil, err end
  -- Else one detached, or dropped, before the client knew it.
  local names, shapes = {}, {}
  for _, oid in ipairs(unknown) do
    if not self.known[oid] then names[#names + 1] = string.format("%d", oid) end
  end
  for _, oid in ipairs(oids) do
    if not self.shapes[oid] then shapes[#shapes + 1] = string.format("%d", oid) end
  end
  if #names > 0 or #shapes > 0 then self:describe(names, shapes) end
  return rows
end

-- A captured row's values by a shape (Driver:pick_shape).
function Driver.decode(_, shape, text, display)
  if type(text) ~= "string" then return nil end
  local row, n = shape.layout:record(text)
  if not row then
    log.warn(string.format("a row of %s could not be decoded (%s); delivered as its text in field \"row\"", display, n))
    return { row = text }
  end
  return row
end

-- Says once per shape that rows of `display` are decoded by columns they may not have been
-- written with (Driver:pick_shape); their events carry ev.columns_uncertain = true.
function Driver.warn_uncertain(_, shape, display, xid)
  if shape.warned then return end
  shape.warned = true
  log.warn(string.format("table %s changed shape (ALTER TABLE) while rows written before it were waiting to be " ..
    "read, and which columns a row of transaction %d was written with cannot be known without the DDL event " ..
    "trigger (a superuser's flashlua): it is decoded with the newest columns that fit its values, and its events " ..
    "carry ev.columns_uncertain = true", display, xid))
end

-- The shape to decode a row of a relation whose columns are unknown by: it was dropped
-- before the client knew it (no DDL event trigger's marker, nothing kept by a persistent
-- schema). A partition made with PARTITION OF has its table's columns in its table's order,
-- and an INHERITS child its parent's first: the first listened table of `list` whose
-- columns fit the row's values (as many; a child's own come after) is used, and the event
-- says the columns are uncertain. Nil when none fits: said, and the row is delivered as its
-- text (field "row").
function Driver:guess_shape(r, list, display)
  local text = type(r.new) == "string" and r.new or r.old
  local fit
  for _, l in ipairs(list) do
    local shape = self.shapes[l.table.oid]
    if shape and type(text) == "string" then
      local _, n = shape.layout:record(text)
      if type(n) ~= "number" then n = -1 end
      if n == shape.n or (n > shape.n and fit == nil) then fit = shape end
      if n == shape.n then break end
    end
  end
  self.warned_guess = self.warned_guess or {}
  if not self.warned_guess[r.rel] then
    self.warned_guess[r.rel] = true
    log.warn(string.format("%s was dropped before flashlua read the rows it captured for %s, and its columns are " ..
      "gone with it: %s", display, list[1].table_name, fit and "they are decoded by the columns of the listened " ..
      "table, which a partition made with PARTITION OF has (ev.columns_uncertain = true)" or "they are delivered " ..
      "as their text in field \"row\""))
  end
  return fit
end

-- Delivers one captured row; returns false when the client must stop.
function Driver:deliver_row(r)
  local client = self.client
  if r.op == "S" then self:apply_marker(r) return true end
  local op = M.OP_NAME[r.op]
  if not op then return true end
  local info, list
  if r.tag < 0 then
    -- Routed when captured (Driver:route_tag): the relation may have left since.
    list = self:route_listeners(r.tag)
    if #list == 0 then return true end   -- no listener of its tables any more
    info = self.rels[r.rel] or self.known[r.rel] or { display = string.format("relation %d", r.rel) }
  else
    info = self.rels[r.rel]
    if not info then return true end   -- a table no listener follows any more
    list = info.listeners
  end
  -- A partitioned table holds no rows: its partitions' own truncates say what was emptied.
  if r.op == "T" and info.relkind == "p" then return true end
  local shape = self.shapes[r.rel]
  local uncertain, guessed
  if not shape and r.op ~= "T" then
    if r.tag >= 0 then
      if not self.warned_gone then
        self.warned_gone = true
        log.warn(string.format("table %s was dropped; the changes it captured before cannot be decoded", info.display))
      end
      return true
    end
    shape, guessed = self:guess_shape(r, list, info.display), true
    uncertain = shape ~= nil
  elseif shape then
    shape, uncertain = self:pick_shape(r, shape)
  end
  local new, old
  if shape then
    new, old = self:decode(shape, r.new, info.display), self:decode(shape, r.old, info.display)
  else
    new, old = type(r.new) == "string" and { row = r.new } or nil, type(r.old) == "string" and { row = r.old } or nil
  end
  local xid = r.xid % 4294967296
  if uncertain and not guessed then self:warn_uncertain(shape, info.display, xid)
  elseif not uncertain then uncertain = nil end
  local big = r.big ~= core.null and r.big or nil
  if big and big < 0 then
    big = -big
    log.warn(string.format("a row of %s (transaction %d) was too large to capture: PostgreSQL could not make its " ..
      "text (over 1 GB; stored in %d bytes): its %s event carries no row values (ev.too_large = %d)",
      info.display, xid, big, op, big))
  elseif big then
    log.warn(string.format("a row of %s (transaction %d) was too large to capture (%d bytes of text; the limit is " ..
      "max_row_bytes = %d): its %s event carries no row values (ev.too_large = %d)", info.display, xid, big,
      self.max_row, op, big))
  end
  for i = 1, #list do
    local l = list[i]
    if (r.tag <= 0 or r.tag == l.id) and client.by_id[l.id] then
      local ev = { op = op, table = l.table_name, source = info.display, new = new, old = old, xid = xid,
                   too_large = big, columns_uncertain = uncertain }
      local cont
      if l.bf then cont = backfill.change(l, ev)
      elseif l.passthrough or big then cont = client:_deliver(l, ev) else cont = where.apply(l, ev, self.emit) end
      if cont == false or client.failure then return false end
      if not self.listening then return true end
    end
  end
  return true
end

-- Delivers fetched rows (fetching a batch when none wait) until they are all delivered
-- or `budget` (a core.now() time) passes: timers, signals and other clients get their
-- turn at least that often, whatever the backlog. Returns true, or nil, err; afterwards
-- self.pending holds what is left of the batch, and self.empty says the last fetch found
-- nothing.
local CHECK_EVERY = 32   -- rows between looks at the clock

function Driver:drain(budget)
  local acks = self.client.acks
  if not self.pending and acks and acks:full() then
    -- max_unacked events wait for the script's acknowledgements: read nothing more.
    self.empty = true
    return true
  end
  if not self.pending then
    local rows, err = self:fetch()
    if not rows then return nil, err end
    self.empty = #rows == 0
    self.full = #rows > 0 and self.fetch_full
    self.got = #rows
    if self.client.backfills then backfill.polled(self, rows) end
    if self.empty then return true end
    self.pending, self.pending_i = rows, 1
  end
  local rows, handled, client = self.pending, self.handled, self.client
  local counters = client.counters
  local i = self.pending_i
  while i <= #rows do
    local r = rows[i]
    i = i + 1
    self.pending_i = i
    if r.op ~= "S" then self.captured = self.captured + 1 end
    local nv, ov = r.new, r.old
    counters.bytes = counters.bytes + (type(nv) == "string" and #nv or 0) + (type(ov) == "string" and #ov or 0)
    if client.failure then return nil, client.failure end
    local large = (r.new_len ~= null and r.new_len > LARGE_ROW) or (r.old_len ~= null and r.old_len > LARGE_ROW)
    if large then
      local ok, err = self:fetch_large(r)
      if not ok then return nil, err end
    end
    local cont = self:deliver_row(r)
    if large then
      -- The row's text and whatever of its event no callback kept go now, not with the batch.
      r.new, r.old = nil, nil
      core.release_memory()
    end
    if cont == false and not acks then
      -- A callback failed (on_error = "stop"): the row is not acknowledged, so it is not
      -- deleted; a persistent schema delivers it again at the next run.
      return nil, client.failure
    elseif r.gone then
      -- Read before a crash emptied the table: its seq may be a new row's now.
      if acks then acks:commit(r.seq) end
    elseif acks then
      -- Deleted once every event made of it (and of each row delivered before) is acknowledged.
      self.delivered[#self.delivered + 1] = r.seq
      acks:commit(r.seq)
    else
      handled[#handled + 1] = r.seq
    end
    if cont == false then return nil, client.failure end
    if not self.listening then return true end   -- a callback stopped the client
    if acks and acks:full() then return true end  -- the rest waits for acknowledgements
    if budget and i % CHECK_EVERY == 0 and core.now() >= budget then return true end
  end
  self.pending = nil
  return true
end

local STEP_BUDGET = 0.05   -- seconds of delivery per step at most
local PAUSED_POLL = 0.01   -- while paused for acknowledgements, a look this often

-- The events table's dead rows, vacuumed by the client itself: every poll reads the
-- primary key from its start, through the entries of rows deleted since the last vacuum,
-- and autovacuum visits a table at most once a minute (autovacuum_naptime). At 10,000
-- rows/s that walk cost the consumer's backend more than the rows it read.
local VACUUM_ROWS, VACUUM_INTERVAL = 5000, 1
function Driver:vacuum(now)
  if (self.deleted or 0) < VACUUM_ROWS or now < (self.next_vacuum or 0) then return end
  self.deleted, self.next_vacuum = 0, now + VACUUM_INTERVAL
  -- TRUNCATE false: truncating the file waits (up to 5 s, in this loop) for a moment when no
  -- writer holds the table.
  -- SKIP_LOCKED: an autovacuum of it at work is enough; the WARNING it sends then says
  -- nothing a user must act on, so the notices of this statement are dropped.
  local conn = self:conn()
  local ok, err = conn:exec("VACUUM (SKIP_LOCKED, TRUNCATE false) " .. self:ident(self.schema) .. ".events", 0)
  conn:notices()
  if not ok then log.debug("cannot vacuum the events table: " .. tostring(err)) end
end

function Driver:step()
  if not self.listening then
    if self.retry_at and core.now() >= self.retry_at then self:reconnect() end
    return true
  end
  local now = core.now()
  if (self.next_refresh and now >= self.next_refresh) or self.resync then
    self.next_refresh = now + REFRESH_INTERVAL
    self:keep_alive()
    local ok, err = self:sync_all()   -- its check_triggers first
    if not ok then return nil, err end
    if not self.listening then return true end
  end
  if self.client.backfills and not self:paused() then
    local ok, err = backfill.poll_step(self)
    if not ok then return nil, err end
    if not self.listening then return true end
  end
  if not self.pending and self.next_poll and now < self.next_poll then return true end
  if self:paused() then
    -- max_unacked events wait for the script's acknowledgements.
    self.next_poll = now + PAUSED_POLL
    return true
  end
  -- While rows are delivered, a callback may stop the client: stop() must not deliver
  -- from inside (out of order), and this loop must not read on.
  self.stepping = true
  local ok, err = self:drain(now + STEP_BUDGET)
  self.stepping = false
  if not ok then
    if self.client.failure then return nil, self.client.failure end
    if not self:conn():ok() then lost(self, err) return true end
    if self:schema_exists() == false then
      -- Another session dropped the instance's schema (its triggers go with it) while the
      -- connection stayed: made again as a reconnect does, saying what was not captured
      -- (since the last poll that found it).
      self.listening = false
      self.lost_at = self.polled_at or core.time()
      self.schema_dropped = true
      return self:reconnect()
    end
    return nil, err
  end
  self.polled_at = core.time()
  self:vacuum(now)
  if self.pending or self.full then
    self.next_poll, self.wait = now, nil
  else
    -- Empty: wait twice as long as last time (up to poll_interval); rows: look again soon,
    -- the sooner the fewer there were.
    if self.empty then
      self.wait = math.min((self.wait or POLL_MIN) * 2, self.poll_interval)
    else
      self.wait = math.min(POLL_MIN * (1 + (self.got or 0) / POLL_ROWS), POLL_BUSY, self.poll_interval)
    end
    self.next_poll = core.now() + self.wait
  end
  return true
end

-- A graceful stop: the triggers go first (nothing more is captured), then everything
-- they captured is delivered (within shutdown_timeout) -- that much is quiesce(), after
-- which stop hooks run -- then the schema goes. Not after a failure (on_error = "stop": no
-- further callbacks), nor when a callback stops the client (that callback's event is the
-- last one).
function Driver:quiesce()
  if not self.listening or self.quiesced then return end
  local timeout = self.client.opts.shutdown_timeout or 10
  local deadline = core.now() + timeout
  self.quiesced = { deadline = deadline, problems = {} }
  local problems = self.quiesced.problems
  if self.persistent then
    -- Triggers and backlog stay for the next run: only what was handled is deleted (and
    -- the shapes of the markers among it kept first).
    self.pending = nil
    self:keep_shapes()
    if self:conn():ok() and #self.handled > 0 then
      local ok, err = self:exec(self:delete_handled_sql())
      if ok then self.handled = {} else problems[#problems + 1] = "cannot delete what it delivered: " .. tostring(err) end
    end
    return
  end
  local ok, err = self:drop_schema_triggers(self.schema, deadline)
  if not ok then problems[#problems + 1] = "cannot remove its triggers: " .. tostring(err) end
  if not (self.client.failure or self.stepping) then
    while core.now() < deadline do
      local dok, derr = self:drain(deadline)
      if not dok then
        if not self.client.failure then problems[#problems + 1] = "cannot read what was captured: " .. tostring(derr) end
        break
      end
      if (self.empty and not self.pending) or not self.listening then break end
    end
    self.pending = nil
    if self:conn():ok() and #self.handled > 0 then
      self:exec(self:delete_handled_sql())
      self.handled = {}
    end
    local left = self:backlog(self.schema)
    if left > 0 and not self.client.failure then
      problems[#problems + 1] = string.format("%d captured changes were not delivered within shutdown_timeout " ..
        "(%g s) and are discarded", left, timeout)
    end
  end
end

-- listener:backfill (flash.backfill): a chunk is placed between two polls of the events
-- table, after the first that began after its snapshot and read all it saw.
function Driver.backfill() return "poll" end

function Driver:stop(confirm)
  if self.client.backfills then backfill.close(self.client) end
  if not self.listening then
    self:drop_keeper()
    if self.lost_at then
      return nil, string.format("the connection is lost: schema %s and its triggers stay until the next flashlua " ..
        "start removes them", self.schema)
    end
    return true
  end
  self:quiesce()
  local deadline, problems = self.quiesced.deadline, self.quiesced.problems
  self.listening = false
  if self.persistent then
    -- The final confirmation: what the stop hooks acknowledged (a batch flushed at the stop,
    -- manual acks) is deleted now, as wal_logical's last status update confirms it; it was
    -- left in the table and delivered again by the next run. Not after a failed hook
    -- (confirm == false: nothing more is confirmed).
    if confirm ~= false and #self.handled > 0 and self:conn():ok() then
      local ok, err = self:exec(self:delete_handled_sql())
      if ok then self.handled = {} else problems[#problems + 1] = "cannot delete what it delivered: " .. tostring(err) end
    end
    local left = self:backlog(self.schema)
    log.info(string.format("schema %s and its triggers stay (persistent = true): %d captured changes wait for the " ..
      "next run", self.schema, left))
  else
    local rok, rerr = self:remove_schema(self.schema, math.max(deadline, core.now() + 1))
    if not rok then
      problems[#problems + 1] = string.format("cannot remove schema %s (%s); the next flashlua start removes it",
        self.schema, tostring(rerr))
    end
  end
  self:exec("SELECT pg_catalog.pg_advisory_unlock(" .. self:lock_sql(self.schema) .. ")")
  self:drop_keeper()
  if #problems > 0 then return nil, "stop: " .. table.concat(problems, "; ") end
  return true
end

---------------------------------------------------------------------------------------
-- Persistent schemas from the command line (flashlua --list-schemas / --drop-schema):
-- what persistent = true keeps between runs, found by its COMMENT mark.

-- Takes schema `name`'s two instance locks (its own and its keeper's) in our session:
-- true when both were free (no running flashlua holds the schema), with both now held.
function Driver:lock_schema(name)
  local held = {}
  for _, key in ipairs({ name, name .. ":keeper" }) do
    local got = self:exec("SELECT pg_catalog.pg_try_advisory_lock(" .. self:lock_sql(key) .. ") AS ok")
    if got and got[1].ok then held[#held + 1] = key end
  end
  local function release()
    for _, key in ipairs(held) do self:exec("SELECT pg_catalog.pg_advisory_unlock(" .. self:lock_sql(key) .. ")") end
  end
  return #held == 2, release
end

-- The persistent schemas of the client's database: { name, tables (with our triggers),
-- backlog (captured changes not yet delivered), in_use }, by name; or nil, err.
-- SQL: schema `n` (pg_namespace) is a persistent schema of our role, with $1 = SCHEMA_MARK
-- and $2 = PERSISTENT_MARK.
local MY_PERSISTENT = [[pg_catalog.obj_description(n.oid, 'pg_namespace') OPERATOR(pg_catalog.~~)
      pg_catalog.concat($1::pg_catalog.text, ' ', $2::pg_catalog.text, '%')
      AND n.nspowner OPERATOR(pg_catalog.=) ]] .. MY_ROLE

function M.persistent_schemas(client)
  local d = M.new(Driver, client)   -- for its queries only: it creates nothing
  local rows, err = d:exec("SELECT n.nspname::text AS name FROM pg_catalog.pg_namespace n WHERE " .. MY_PERSISTENT ..
    " ORDER BY 1", SCHEMA_MARK, PERSISTENT_MARK)
  if not rows then return nil, err end
  for _, r in ipairs(rows) do
    local trig = d:schema_triggers(r.name) or {}
    local rels = {}
    for _, t in ipairs(trig) do rels[t.oid] = true end
    r.tables = 0
    for _ in pairs(rels) do r.tables = r.tables + 1 end
    r.backlog = d:backlog(r.name)
    local free, release = d:lock_schema(r.name)
    release()
    r.in_use = not free
  end
  return rows
end

-- The warnings for persistent schemas no flashlua runs on whose captured changes take more
-- than the slots' threshold (flash.slots.threshold: FLASH_SLOT_WARN_MB, 64 MB), each schema
-- once (`warned`: the loop's). Their triggers go on capturing every write for a run that may
-- never come, as an inactive slot keeps WAL. Said at each client start, beside the slots'.
function M.idle_schema_warnings(client, warned)
  local d = M.new(Driver, client)
  local rows = d:exec([[
    SELECT n.nspname::text AS name, pg_catalog.pg_total_relation_size(c.oid)::float8 AS bytes
    FROM pg_catalog.pg_namespace n
    JOIN pg_catalog.pg_class c ON c.relnamespace OPERATOR(pg_catalog.=) n.oid AND c.relname OPERATOR(pg_catalog.=) 'events'
    WHERE ]] .. MY_PERSISTENT .. " ORDER BY 1", SCHEMA_MARK, PERSISTENT_MARK)
  local slots, out = require("flash.slots"), {}
  local own = client.driver and client.driver.schema
  for _, r in ipairs(rows or {}) do
    if r.bytes > slots.threshold() and r.name ~= own and not warned["schema:" .. r.name] then
      local free, release = d:lock_schema(r.name)
      release()
      if free then
        warned["schema:" .. r.name] = true
        out[#out + 1] = string.format("persistent schema %s is not in use and its captured changes take %s; its " ..
          "triggers go on capturing every write to its tables. If no flashlua run will resume it, drop it: " ..
          "flashlua --drop-schema %s", r.name, slots.mb(r.bytes), r.name)
      end
    end
  end
  return out
end

-- Drops persistent schema `name` and its triggers: the number of captured changes it
-- held, or nil, err (in use, not a persistent flashlua schema, the drop failed).
function M.drop_persistent(client, name)
  local list, err = M.persistent_schemas(client)
  if not list then return nil, err end
  local found
  for _, r in ipairs(list) do if r.name == name then found = r end end
  if not found then
    return nil, string.format("no persistent flashlua schema named %s in this database (flashlua --list-schemas " ..
      "shows them)", name)
  end
  local d = M.new(Driver, client)
  local free, release = d:lock_schema(name)
  if not free then
    release()
    return nil, string.format("schema %s is in use by a running flashlua instance; stop it first", name)
  end
  local left = d:backlog(name)
  local ok, derr = d:remove_schema(name, core.now() + (client.opts.shutdown_timeout or 10))
  release()
  if not ok then return nil, string.format("cannot drop schema %s: %s", name, tostring(derr)) end
  return left
end

return M
