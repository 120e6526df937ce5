-- flash.driver.wal_logical: the `wal_logical` driver. One publication and one replication slot per
-- client; changes arrive over a replication connection as pgoutput, are decoded in C
-- (lrepl.c) and filtered here (flash.where). The server is told a transaction is handled
-- only after every callback of it has returned: with `persistent = true` a crash at any
-- point redelivers whatever was not yet handled.
local core = require "flash.core"
local log = require "flash.log"
local where = require "flash.where"
-- The trigger drivers' connection helpers (quoting, exec with notices) serve here too.
local base = require "flash.driver.base"
local backfill = require "flash.backfill"
local handover = require "flash.driver.handover"

local M = {}
local Driver = base.class(base.Driver)
M.Driver = Driver

-- Replication slot names allow only these; the publication is held to the same rule so
-- that both can be named alike and written unquoted in any replication command.
local function object_name(v)
  if #v > 63 or not v:find("^[a-z0-9_]+$") then
    return string.format("%s is not a valid name (use lower-case letters, digits and underscores, at most 63 " ..
      "characters)", (string.format("%q", v):gsub("\\\n", "\\n")))
  end
end

-- The options of wal_logical (flash.driver: besides those every client takes).
M.OPTIONS = {
  slot = { type = "string", check = object_name },
  publication = { type = "string", check = object_name },
  streaming = "boolean",
  binary = "boolean",
  stream_memory = { type = "number", check = function(v)
    if not (v > 0 and v < math.huge) then return "a number of bytes > 0 expected, got " .. tostring(v) end
  end },
  replica_identity = "string",
  -- Bytes of WAL the slot may hold unconfirmed before a warning (Driver:check_lag).
  max_lag = { type = "number", check = function(v)
    if not (v > 0 and v < math.huge) then return "a number of bytes > 0 expected, got " .. tostring(v) end
  end },
  -- Seconds without a delivered event after which a heartbeat is written (Driver:heartbeat).
  heartbeat = { type = "number", check = function(v)
    if not (v > 0 and v < math.huge) then return "a number of seconds > 0 expected, got " .. tostring(v) end
  end },
}

-- The prefix of heartbeat messages: no on_message hook takes it (backfill's is
-- "flashlua.backfill", the pg_extension plugin's "flashlua"), so lrepl skips the message
-- and only its transaction's Commit is handled, and confirmed, like any other.
local HEARTBEAT_PREFIX = "flashlua.heartbeat"

local MARK = "flashlua instance"
-- One step handles messages for at most this long, then gives the loop back: timers,
-- signals and other clients get a turn even when callbacks are slower than the writers.
local SLICE = 0.05
-- How often the listened tables are looked at (renamed, dropped, new INHERITS children)
-- and the query connection is checked.
local HOUSE_INTERVAL = 1
-- libpq keeps a connection's input buffer as large as the largest message it received
-- (fe-misc.c doubles it as needed and nothing shrinks it), so one row of 100 MB would keep
-- 128 MB or more for the client's lifetime. Once such a row's transaction is handled, a
-- persistent slot's connection is ended (the last status update confirms everything
-- handled, and the server has applied it when it ends the copy) and opened again at the
-- confirmed position: nothing is lost or delivered twice. A temporary slot is dropped with
-- its connection: the stream moves to a new temporary slot instead (flash.driver.handover).
local LARGE_MESSAGE = handover.LARGE_MESSAGE

local fail = base.fail

function M.new(client)
  local opts = client.opts
  local pid = client.conn:backend_pid()
  local self = setmetatable({
    client = client,
    persistent = opts.persistent == true,
    streaming = opts.streaming == true,
    binary = opts.binary == true,
    enums = {},         -- binary: [enum type oid] = true (its send form is its label)
    by_oid = {},        -- [listened table oid] = { listeners }
    routes = {},        -- [relid of a row's relation] = { listeners } | false: see route()
    masked = {},        -- [relid] = true: relations lrepl converts some columns of (route())
    direct = {},        -- [relid] = { l =, sink = }: relations whose rows lrepl writes to a sink (route_direct)
    direct_sinks = {},  -- [sink] = true: sinks given events by the direct path since its last on_direct()
    known = {},         -- [relid] = { listeners }: where its rows went when last seen in the catalog (remember)
    unrouted = {},      -- [relid] = true: said once that its rows reach no listener
    published = {},     -- [table oid] = listener: tables in the publication
    warned = {},        -- warnings given once: dropped tables, missing columns
    retry_at = nil,
    retry = base.backoff(),        -- the replication connection's reconnect schedule
    conn_retry = base.backoff(),   -- the query connection's
  }, Driver)
  -- Default names are unique per instance unless the slot must outlive it.
  self.slot = opts.slot or (self.persistent and "flash_replication" or ("flash_replication_" .. pid))
  -- A persistent slot named by the script gets a publication of the same name: two such
  -- clients in one database (slot = "flash_outbox", slot = "flash_mailer") sharing
  -- "flash_publication" were refused while the other ran, and worse, one run's
  -- ALTER PUBLICATION ... SET TABLE made the other slot skip, for good, the rows its table
  -- got meanwhile (pgoutput reads the publication as it was when each change was written).
  -- setup_publication keeps using "flash_publication" for a slot an earlier version made
  -- with it (legacy_publication).
  if opts.publication then
    self.publication = opts.publication
  elseif self.persistent and opts.slot and opts.slot ~= "flash_replication" then
    self.publication, self.legacy_publication = opts.slot, "flash_publication"
  elseif self.persistent then
    self.publication = "flash_publication"
  else
    self.publication = "flash_publication_" .. pid
  end
  self.proto = self.streaming and 2 or 1
  return self
end

Driver.qualified = base.Driver.qualified_table
-- Under a temporary slot, memory held after a large row is freed by moving to a new slot.
Driver.hand_over = true

-- A publication's lock: "pub:" keeps it apart from a schema of the same name.
function Driver.lock_key(_, name)
  return "pub:" .. name
end

-- Conditions are test-planned and checked as the trigger drivers' are (flash.driver.base:
-- the same SQL, so the same errors at listen), then evaluated on arrival by flash.where.

-- Whether a listener needs old rows: update/delete events carry ev.old, and conditions,
-- fields and keys are tested on it.
local function needs_old(l)
  local w = l:wanted()
  return w.update or w.delete or ((w.insert or w.delete) and (l.matcher or l.primary_key))
end

-- Descendants (partitions at any depth, INHERITS children) of the tables `oids` ("{..}").
local DESCENDANTS = [[WITH RECURSIVE d(oid) AS (
    SELECT i.inhrelid FROM pg_catalog.pg_inherits i WHERE i.inhparent = ANY($1::oid[])
    UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN d ON i.inhparent = d.oid)]]

-- SQL: whether pg_class row `c` has no replica identity at all (REPLICA IDENTITY NOTHING,
-- DEFAULT without a primary key, USING INDEX of an index gone), so that PostgreSQL refuses
-- UPDATE and DELETE on it while a publication that publishes them holds it.
local NO_IDENTITY = [[c.relreplident = 'n' OR (c.relreplident IN ('d', 'i') AND NOT EXISTS (
      SELECT 1 FROM pg_catalog.pg_index x WHERE x.indrelid = c.oid
         AND CASE c.relreplident WHEN 'd' THEN x.indisprimary ELSE x.indisreplident END))]]

-- The ALTER TABLE ... REPLICA IDENTITY FULL of each table of rows ({ schema, name }), and
-- the tables' names.
local function identity_alters(self, rows)
  local alters, names = {}, {}
  for i, r in ipairs(rows) do
    alters[i] = "ALTER TABLE " .. self:ident(r.schema) .. "." .. self:ident(r.name) .. " REPLICA IDENTITY FULL"
    names[i] = r.schema .. "." .. r.name
  end
  return alters, names
end

-- Runs them (replica_identity = "full"), each logged with why; nil, err at the first refused.
local function set_full(self, alters, names, why)
  for i, alter in ipairs(alters) do
    local ok, aerr = self:exec(alter)
    if not ok then return fail("cannot set REPLICA IDENTITY FULL on " .. names[i] .. ": " .. aerr) end
    log.info("set REPLICA IDENTITY FULL on " .. names[i] .. " (replica_identity = \"full\")" .. why)
  end
  return true
end

-- Rows of a listened table's descendants arrive as their own (leaf) relations: each one
-- needs REPLICA IDENTITY FULL as the table itself does.
function Driver:check_identity(l)
  if not needs_old(l) then return true end
  local rows, err = self:exec(DESCENDANTS .. [[
    SELECT n.nspname::text AS schema, c.relname::text AS name, c.oid = $2 AS self
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE (c.oid = $2 OR c.oid IN (SELECT oid FROM d)) AND c.relkind IN ('r', 'p') AND c.relreplident <> 'f'
    ORDER BY c.oid <> $2, 1, 2]], "{" .. string.format("%d", l.table.oid) .. "}", l.table.oid)
  if not rows then return nil, err end
  if #rows == 0 then return true end
  local alters, names = identity_alters(self, rows)
  if self.client.opts.replica_identity == "full" then return set_full(self, alters, names, "") end
  local what = rows[1].self and ("table " .. l.table_name) or
    ("partition or child table " .. names[1] .. " of " .. l.table_name)
  return fail(string.format("%s does not have REPLICA IDENTITY FULL, so update and delete events " ..
    "would lack the old row", what),
    "run `" .. table.concat(alters, "; ") .. "`, or pass replica_identity = \"full\" to flash.client (flashlua --table: --replica-identity full) " ..
    "to let flashlua do it")
end

-- A listened table whose replica identity changed after the start (identify_descendants
-- found it): replica_identity = "full" sets FULL again; without it a warning says once
-- what its events lack now, and whether PostgreSQL refuses the user's UPDATE and DELETE.
function Driver:identify_listened(r, display, alter)
  if self.client.opts.replica_identity == "full" then
    local ok, err = self:exec("BEGIN; SET LOCAL lock_timeout = '100ms'; " .. alter .. "; COMMIT")
    if ok then
      self.warned["identity:" .. display] = nil
      log.info(string.format("set REPLICA IDENTITY FULL on %s again, which an ALTER TABLE had changed " ..
        "(replica_identity = \"full\")", display))
    else
      self:exec("ROLLBACK")
      if not self.warned["identity:" .. display] and not tostring(err):find("lock timeout", 1, true) then
        self.warned["identity:" .. display] = true
        log.warn(string.format("cannot set REPLICA IDENTITY FULL on %s again: %s", display,
          (tostring(err):gsub("%s+$", ""))))
      end
    end
  elseif not self.warned["identity:" .. display] then
    self.warned["identity:" .. display] = true
    if r.whole then
      log.warn(string.format("listened table %s no longer has REPLICA IDENTITY FULL (an ALTER TABLE changed it): " ..
        "its updates and deletes arrive without the old row%s (run `%s`, or pass replica_identity = \"full\" to " ..
        "flash.client (flashlua --table: --replica-identity full) to let flashlua keep it)", display,
        not self.consumer and ", and PostgreSQL refuses UPDATE and DELETE on it while it has no replica identity at all"
        or "", alter))
    else
      log.warn(string.format("listened table %s has no replica identity now (an ALTER TABLE changed it), and " ..
        "publication %s publishes %s for another listener of this client: PostgreSQL refuses UPDATE and DELETE on " ..
        "it (run `%s`, or pass replica_identity = \"full\" to flash.client (flashlua --table: --replica-identity " ..
        "full) to let flashlua keep it)", display, self.publication, self.published_ops, alter))
    end
  end
end

-- Partitions that became descendants of a listened table after its start (created or
-- attached; INHERITS children: housekeep) need REPLICA IDENTITY FULL as check_identity made
-- the others have it: without it their updates and deletes arrive without the old row, and
-- under wal_logical PostgreSQL refuses the user's own UPDATE and DELETE on a partition
-- with no replica identity at all (the publication of its root publishes them). With
-- replica_identity = "full" it is set here, each table in its own short transaction that
-- never waits long on a writer's lock (tried again at the next housekeeping); without it
-- a warning names the fix once per table. Partitions of tables whose listeners want only
-- inserts or truncates need some replica identity when the publication publishes updates
-- or deletes for other listeners (check_writable). Runs every HOUSE_INTERVAL (housekeep).
function Driver:identify_descendants()
  local oids, others = {}, {}
  local writable = not self.consumer and self.published_ops and (self.published_ops:find("update", 1, true) or
    self.published_ops:find("delete", 1, true))
  for _, l in ipairs(self.client.listeners) do
    if not l.dropped and next(l:wanted()) then
      if needs_old(l) then oids[#oids + 1] = string.format("%d", l.table.oid)
      elseif writable then others[#others + 1] = string.format("%d", l.table.oid) end
    end
  end
  if #oids + #others == 0 then return end
  -- (The listened tables themselves too: a user's ALTER TABLE ... REPLICA IDENTITY after
  -- the start takes the old row from their events, or, with no identity at all, makes
  -- PostgreSQL refuse the user's UPDATE and DELETE while the publication publishes them.)
  local rows = self:exec([[WITH RECURSIVE x(oid, whole) AS (
      SELECT o, true FROM pg_catalog.unnest($1::oid[]) o UNION ALL
      SELECT o, false FROM pg_catalog.unnest($2::oid[]) o),
    d(oid, whole, root) AS (
      SELECT x.oid, x.whole, true FROM x
      UNION SELECT i.inhrelid, x.whole, false FROM pg_catalog.pg_inherits i JOIN x ON i.inhparent = x.oid
      UNION SELECT i.inhrelid, d.whole, false FROM pg_catalog.pg_inherits i JOIN d ON i.inhparent = d.oid)
    SELECT n.nspname::text AS schema, c.relname::text AS name, pg_catalog.bool_or(d.whole) AS whole,
      pg_catalog.bool_or(d.root) AS root,
      (SELECT pn.nspname::text || '.' || p.relname::text FROM pg_catalog.pg_inherits i
         JOIN pg_catalog.pg_class p ON p.oid = i.inhparent JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace
        WHERE i.inhrelid = c.oid ORDER BY i.inhseqno LIMIT 1) AS parent
    FROM d JOIN pg_catalog.pg_class c ON c.oid = d.oid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p') AND (c.relispartition OR d.root) AND c.relreplident <> 'f'
      AND (d.whole OR (c.relkind = 'r' AND (]] .. NO_IDENTITY .. [[)))
    GROUP BY 1, 2, c.oid ORDER BY 1, 2]], "{" .. table.concat(oids, ",") .. "}", "{" .. table.concat(others, ",") .. "}")
  if not rows then return end
  for _, r in ipairs(rows) do
    local name = self:ident(r.schema) .. "." .. self:ident(r.name)
    local display = r.schema .. "." .. r.name
    local alter = "ALTER TABLE " .. name .. " REPLICA IDENTITY FULL"
    if r.root then
      self:identify_listened(r, display, alter)
    elseif self.client.opts.replica_identity == "full" then
      local ok, err = self:exec("BEGIN; SET LOCAL lock_timeout = '100ms'; " .. alter .. "; COMMIT")
      if ok then
        log.info(string.format("set REPLICA IDENTITY FULL on %s, new partition of %s (replica_identity = \"full\")",
          display, r.parent))
      else
        self:exec("ROLLBACK")
        if not self.warned["identity:" .. display] and not tostring(err):find("lock timeout", 1, true) then
          self.warned["identity:" .. display] = true
          log.warn(string.format("cannot set REPLICA IDENTITY FULL on %s, new partition of %s: %s",
            display, r.parent, (tostring(err):gsub("%s+$", ""))))
        end
      end
    elseif not self.warned["identity:" .. display] and not r.whole then
      self.warned["identity:" .. display] = true
      log.warn(string.format("partition %s of %s has no replica identity, and publication %s publishes %s for " ..
        "another listener of this client: PostgreSQL refuses UPDATE and DELETE on it (run `%s`, or pass " ..
        "replica_identity = \"full\" to flash.client (flashlua --table: --replica-identity full) to let flashlua " ..
        "do it)", display, r.parent, self.publication, self.published_ops, alter))
    elseif not self.warned["identity:" .. display] then
      self.warned["identity:" .. display] = true
      log.warn(string.format("partition %s of %s does not have REPLICA IDENTITY FULL: its updates and " ..
        "deletes arrive without the old row%s (run `%s`, or pass replica_identity = \"full\" to flash.client " ..
        "(flashlua --table: --replica-identity full) to let flashlua do it)", display, r.parent,
        not self.consumer and ", and PostgreSQL refuses UPDATE and DELETE on it while it has no replica identity at all"
        or "", alter))
    end
  end
end

-- The tables some listener wants something from, by OID: a listener follows its table
-- through renames. A table dropped while listening is left out.
function Driver:wanted_tables()
  local set, list = {}, {}
  for _, l in ipairs(self.client.listeners) do
    if next(l:wanted()) and not set[l.table.oid] and not l.dropped then
      set[l.table.oid] = l
      list[#list + 1] = l
    end
  end
  return set, list
end

-- The operations the publication must publish: the union over the listeners of what
-- their callbacks need (an update may turn into an insert or a delete under a condition
-- or primary_key). Publishing an update or delete a table cannot replicate (no replica
-- identity) would make the user's own UPDATE/DELETE fail, so nothing more is published.
function Driver:publish_ops()
  local need = {}
  for _, l in ipairs(self.client.listeners) do
    for op in pairs((base.needed_ops(l))) do need[op] = true end
  end
  local list = {}
  for _, op in ipairs({ "insert", "update", "delete", "truncate" }) do
    if need[op] then list[#list + 1] = op end
  end
  return table.concat(list, ", ")
end

-- The publication's list of operations is one for all its tables: when some listener
-- wants updates or deletes, every published table must be able to replicate them, or
-- PostgreSQL fails the user's own UPDATE and DELETE on it. A table (or a descendant) with
-- no replica identity whose listeners want only inserts or truncates is given REPLICA
-- IDENTITY FULL under replica_identity = "full"; otherwise the start (or the listen that
-- made the publication publish updates) fails, naming the ways out. pg_extension has no
-- publication.
function Driver:check_writable()
  if self.consumer then return true end
  local ops = self:publish_ops()
  if not (ops:find("update", 1, true) or ops:find("delete", 1, true)) then return true end
  local _, list = self:wanted_tables()
  local oids = {}
  for i, l in ipairs(list) do oids[i] = string.format("%d", l.table.oid) end
  if #oids == 0 then return true end
  local rows, err = self:exec(DESCENDANTS .. [[
    SELECT n.nspname::text AS schema, c.relname::text AS name FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE (c.oid = ANY($1::oid[]) OR c.oid IN (SELECT oid FROM d)) AND c.relkind = 'r' AND (]] .. NO_IDENTITY .. [[)
    ORDER BY 1, 2]], "{" .. table.concat(oids, ",") .. "}")
  if not rows then return nil, err end
  if #rows == 0 then return true end
  local alters, names = identity_alters(self, rows)
  if self.client.opts.replica_identity == "full" then
    return set_full(self, alters, names, ": publication " .. self.publication .. " publishes " .. ops ..
      " for another listener, which PostgreSQL refuses on a table without a replica identity")
  end
  return fail(string.format("table %s has no replica identity (no primary key, or REPLICA IDENTITY NOTHING), and " ..
    "publication %s publishes %s for another listener of this client: PostgreSQL would refuse every UPDATE and " ..
    "DELETE on it", names[1], self.publication, ops),
    "run `" .. table.concat(alters, "; ") .. "`, or pass replica_identity = \"full\" to flash.client (flashlua " ..
    "--table: --replica-identity full) to let flashlua do it, or listen to it with a client of its own")
end

-- The columns a listener names (fields, conditions, primary_key, or all it saw at listen).
local function listened_columns(l)
  local cols, seen = {}, {}
  local function add(c) if not seen[c] then seen[c] = true cols[#cols + 1] = c end end
  for _, c in ipairs(l.columns) do add(c.name) end
  for _, c in ipairs(l.conds) do add(c.column) end
  for _, c in ipairs(l.primary_key or {}) do add(c) end
  return cols
end

-- binary = true: pgoutput sends every column in its type's send form (PostgreSQL 14+).
-- The client reads those of the types fl_binary knows, enums (the label) and arrays of
-- them exactly as their text. Of `columns` (rows of flash.catalog.columns_sql), those whose values
-- it cannot read, with their type's name; enums are noted in self.enums.
function Driver:unreadable(columns)
  local oids, cols = {}, {}
  for _, c in ipairs(columns) do
    local t = c.elem ~= 0 and c.elem or c.oid
    if not core.binary_type(t) then
      oids[#oids + 1] = string.format("%d", t)
      cols[#cols + 1] = c
    end
  end
  if #oids == 0 then return {} end
  local rows, err = self:exec([[SELECT oid::bigint AS oid, typtype::text AS typtype, pg_catalog.format_type(oid, NULL) AS name
    FROM pg_catalog.pg_type WHERE oid = ANY($1::oid[])]], "{" .. table.concat(oids, ",") .. "}")
  if not rows then return nil, err end
  local info, out = {}, {}
  for _, r in ipairs(rows) do info[r.oid] = r end
  for _, c in ipairs(cols) do
    local t = info[c.elem ~= 0 and c.elem or c.oid]
    if t and t.typtype == "e" then
      self.enums[t.oid] = true
    else
      out[#out + 1] = { name = c.name, type = t and t.name or tostring(c.oid) }
    end
  end
  return out
end

-- A listener that delivers or tests a column the client cannot read is refused, naming it.
function Driver:check_binary(l)
  if self.server_version and self.server_version < 140000 then
    return fail("binary = true needs PostgreSQL 14 or later (pgoutput's binary option)", "leave binary out")
  end
  local want
  if l.fields and not l.predicate then
    want = {}
    for _, c in ipairs(listened_columns(l)) do want[c] = true end
  end
  local cols = {}
  for _, c in ipairs(l.table.columns) do
    if not want or want[c.name] then cols[#cols + 1] = c end
  end
  local bad, err = self:unreadable(cols)
  if not bad then return nil, err end
  if bad[1] then
    return fail(string.format("binary = true cannot read values of type %s (column %s of %s) exactly",
      bad[1].type, bad[1].name, l.table_name),
      "leave binary out (text values), or give the listener fields without that column")
  end
  return true
end

function Driver:check(l)
  -- Unlogged first: no replica identity or publication could make its rows arrive.
  local ok, err = self:check_logged(l)
  if ok then ok, err = base.Driver.check(self, l) end
  if ok and self.binary then ok, err = self:check_binary(l) end
  return ok, err
end

-- The unlogged tables among `oids` (a "{...}" array) and their descendants: their changes
-- are not written to the WAL, so no logical decoding sees them.
function Driver:unlogged(oids)
  return self:exec(DESCENDANTS .. [[
    SELECT c.oid::bigint AS oid, n.nspname::text AS schema, c.relname::text AS name,
      (SELECT pn.nspname::text || '.' || p.relname::text FROM pg_catalog.pg_inherits i
         JOIN pg_catalog.pg_class p ON p.oid = i.inhparent JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace
        WHERE i.inhrelid = c.oid ORDER BY i.inhseqno LIMIT 1) AS parent
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE (c.oid = ANY($1::oid[]) OR c.oid IN (SELECT oid FROM d)) AND c.relpersistence = 'u'
    ORDER BY 1]], oids)
end

local function set_logged(self, r)
  return "ALTER TABLE " .. self:ident(r.schema) .. "." .. self:ident(r.name) .. " SET LOGGED"
end

-- An unlogged table's changes are not in the WAL (and PostgreSQL refuses it in a
-- publication): the listened table or any of its partitions and children being one is said
-- at listen, with the ways out, rather than as the publication's failure or as rows that
-- never arrive.
function Driver:check_logged(l)
  local rows, err = self:unlogged("{" .. string.format("%d", l.table.oid) .. "}")
  if not rows then return nil, err end
  local r = rows[1]
  if not r then return true end
  local what = r.oid == l.table.oid and "it is an unlogged table" or
    string.format("its partition or child table %s.%s is an unlogged table", r.schema, r.name)
  return fail(string.format("cannot listen to %s under the %s driver: %s, whose changes are not written to the WAL",
    l.table_name, self.consumer and "pg_extension" or "wal_logical", what),
    "run `" .. set_logged(self, r) .. "`, or use a trigger driver: driver = \"trigger\", or " ..
    "flashlua --driver trigger")
end

-- Housekeeping: a partition or child that is unlogged (created or attached so while
-- listening, or a listened table made unlogged) loses its changes to every WAL driver:
-- said once per table, with the ways out.
function Driver:warn_unlogged()
  local oids = {}
  for _, l in ipairs(self.client.listeners) do
    if not l.dropped and next(l:wanted()) then oids[#oids + 1] = string.format("%d", l.table.oid) end
  end
  if #oids == 0 then return end
  local rows = self:unlogged("{" .. table.concat(oids, ",") .. "}")
  for _, r in ipairs(rows or {}) do
    local display = r.schema .. "." .. r.name
    if not self.warned["unlogged:" .. display] then
      self.warned["unlogged:" .. display] = true
      log.warn(string.format("%s is an unlogged table%s: its changes are not written to the WAL and are not " ..
        "delivered (run `%s`, or listen to it with a trigger driver)", display,
        r.parent ~= core.null and (", a partition or child of " .. r.parent) or "", set_logged(self, r)))
    end
  end
end

-- The routes and column masks are forgotten together: a row converted before its route is
-- computed again has every column (route() sets the mask for the rows after it).
function Driver:forget_routes(relid)
  if relid then
    if self.direct[relid] then
      if self.repl then self.repl:direct(relid) end
      self.direct[relid] = nil
    end
    self.routes[relid] = nil
    if self.masked[relid] then
      self.masked[relid] = nil
      if self.repl then self.repl:columns(relid, nil) end
    end
    return
  end
  self.routes = {}
  if next(self.direct) then
    if self.repl then self.repl:direct() end
    self.direct = {}
  end
  if next(self.masked) then
    self.masked = {}
    if self.repl then self.repl:columns(nil) end
  end
end

-- The columns of a row where.apply and delivery read for listener l, or nil for every
-- column: `fields`, the columns of table-form conditions, primary_key (a key change; "no
-- listened field changed" compares the fields); a function `where` is handed the listened
-- fields only (flash.where's matcher). Every column for a listener without `fields` (its
-- events carry them all) and while its backfill runs (flash.backfill notes the key
-- columns, or every column, of the rows delivered during a chunk). A listener without
-- callbacks only counts its events as dropped, after where.apply's decision.
local function needed_columns(l)
  if l.bf and not l.bf.done then return nil end
  if l.fields then return listened_columns(l) end
  if next(l:wanted()) or l.predicate then return nil end
  local cols = {}
  for _, c in ipairs(l.conds) do cols[#cols + 1] = c.column end
  for _, c in ipairs(l.primary_key or {}) do cols[#cols + 1] = c end
  return cols
end

-- The columns lrepl must convert for rows routed to `list`: the union over its listeners.
local function column_mask(list)
  local cols, seen = {}, {}
  for _, l in ipairs(list) do
    local need = needed_columns(l)
    if not need then return nil end
    for _, c in ipairs(need) do
      if not seen[c] then seen[c] = true cols[#cols + 1] = c end
    end
  end
  return cols
end

-- A backfill registered or done since the last step: the masks of its table change.
function Driver:check_backfills()
  local n, done = 0, 0
  for _, bf in ipairs(self.client.backfills) do
    n = n + 1
    if bf.done then done = done + 1 end
  end
  if n ~= self.backfills_seen or done ~= self.backfills_done then
    self.backfills_seen, self.backfills_done = n, done
    self:forget_routes()
  end
end

function Driver:rebuild_index()
  local by = {}
  for _, l in ipairs(self.client.listeners) do
    local list = by[l.table.oid]
    if not list then list = {} by[l.table.oid] = list end
    list[#list + 1] = l
  end
  self.by_oid = by
  self:forget_routes()
  self:remember()
  local types = {}
  for _, l in ipairs(self.client.listeners) do
    for _, c in ipairs(l.table.columns) do
      if c.typ ~= c.oid or c.elem ~= 0 then
        types[c.typ] = { oid = c.oid, elem = c.elem, delim = c.delim }
      end
      -- binary: an enum's send form is its label, read as text's
      if self.enums[c.oid] then types[c.typ] = { oid = 25, elem = 0, delim = c.delim } end
      if self.enums[c.elem] then types[c.typ] = { oid = c.oid, elem = 25, delim = c.delim } end
    end
  end
  if self.repl then self.repl:types(types) end
  self.types = types
end

function Driver:remove_leftovers()
  -- A publication whose slot is streaming belongs to a live instance, even when that
  -- instance's query connection (which holds the lock) is down for a moment.
  local rows, err = self:exec([[SELECT p.pubname::text AS name FROM pg_catalog.pg_publication p
    WHERE pg_catalog.obj_description(p.oid, 'pg_publication') OPERATOR(pg_catalog.~~) ($1::pg_catalog.text OPERATOR(pg_catalog.||) '%temporary%')
      AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots s WHERE s.active
        AND pg_catalog.obj_description(p.oid, 'pg_publication') OPERATOR(pg_catalog.~~)
          pg_catalog.concat('%, slot ', s.slot_name::pg_catalog.text, ')'))]], MARK)
  if not rows then return nil, err end
  self:sweep_orphans(rows, self.publication, "publication", function(name)
    return self:exec("DROP PUBLICATION IF EXISTS " .. self:ident(name))
  end)
  return true
end

-- A persistent slot named by the script used "flash_publication" before it got a
-- publication of its own name. Such a slot, found existing while a publication of its own
-- name does not, goes on with "flash_publication": its backlog was written while only that
-- one existed, and pgoutput, which reads the publication as of each change, fails on a
-- publication created after the change ("publication ... does not exist").
function Driver:resolve_publication()
  local legacy = self.legacy_publication
  if not legacy then return true end
  self.legacy_publication = nil
  local rows, err = self:exec("SELECT " ..
    "EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname OPERATOR(pg_catalog.=) $1) AS own, " ..
    "EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname OPERATOR(pg_catalog.=) $2) AS old, " ..
    "EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name OPERATOR(pg_catalog.=) $3 " ..
    "AND database OPERATOR(pg_catalog.=) pg_catalog.current_database()) AS slot", self.publication, legacy, self.slot)
  if not rows then return nil, err end
  if rows[1].slot and rows[1].old and not rows[1].own then
    log.info(string.format("slot %s goes on with publication %s, which an earlier version made for it " ..
      "(a named persistent slot now gets a publication of its own name; a new slot name starts one)",
      self.slot, legacy))
    self.publication = legacy
  end
  return true
end

function Driver:setup_publication()
  local rok, rerr = self:resolve_publication()
  if not rok then return nil, rerr end
  local got, err = self:exec("SELECT pg_catalog.pg_try_advisory_lock(" .. self:lock_sql(self.publication) .. ") AS ok")
  if not got then return nil, err end
  if not got[1].ok then
    return fail("publication " .. self.publication .. " is in use by another running flashlua instance" ..
      self:lock_holder(self.publication),
      "give each instance its own `publication` and `slot`")
  end
  local P = self:ident(self.publication)
  local exists = self:exec("SELECT pg_catalog.pg_get_userbyid(p.pubowner)::pg_catalog.text AS owner, " ..
    "p.pubowner OPERATOR(pg_catalog.=) r.oid AS mine, pg_catalog.obj_description(p.oid, 'pg_publication') AS note " ..
    "FROM pg_catalog.pg_publication p, pg_catalog.pg_roles r " ..
    "WHERE p.pubname OPERATOR(pg_catalog.=) $1 AND r.rolname OPERATOR(pg_catalog.=) CURRENT_USER", self.publication)
  if self.persistent and exists and exists[1] and not exists[1].mine then
    -- Resumed as it is, another role's publication (anyone with CREATE on the database can
    -- make one under the name first) stays that role's: it could make it publish less
    -- (ALTER PUBLICATION ... SET (publish = 'insert'), DROP TABLE), and the slot would
    -- silently skip the changes it no longer publishes.
    -- (A role that is not a superuser is refused it by PostgreSQL, with the same words.)
    return fail(string.format("cannot use publication %s: it belongs to role %s", self.publication, exists[1].owner),
      "give this client a publication and slot of its own (flash.client{ publication = \"...\", slot = \"...\" }), " ..
      "or run flashlua as that role")
  end
  self.created_publication = not (exists and #exists > 0)
  -- Left by an earlier persistent run of this slot: make_slot tells a slot dropped since.
  local note = exists and exists[1] and exists[1].note
  local tail = ", slot " .. self.slot .. ")"
  self.earlier_run = self.persistent and type(note) == "string" and note:sub(1, #MARK) == MARK and
    note:find("(persistent,", 1, true) ~= nil and note:sub(-#tail) == tail
  local _, list = self:wanted_tables()
  local names = {}
  for i, l in ipairs(list) do names[i] = self:qualified(l) end
  local ops = self:publish_ops()
  local sql = {}
  if exists and #exists > 0 then
    if not self.persistent then sql[#sql + 1] = "DROP PUBLICATION " .. P end
  end
  if not (exists and #exists > 0) or not self.persistent then
    sql[#sql + 1] = "CREATE PUBLICATION " .. P .. (#names > 0 and (" FOR TABLE " .. table.concat(names, ", ")) or "") ..
      " WITH (publish = " .. self:literal(ops) .. ")"
  else
    if #names > 0 then sql[#sql + 1] = "ALTER PUBLICATION " .. P .. " SET TABLE " .. table.concat(names, ", ") end
    sql[#sql + 1] = "ALTER PUBLICATION " .. P .. " SET (publish = " .. self:literal(ops) .. ")"
  end
  sql[#sql + 1] = "COMMENT ON PUBLICATION " .. P .. " IS " ..
    self:literal(string.format("%s (%s, pid %d, slot %s)", MARK, self.persistent and "persistent" or "temporary",
      core.getpid(), self.slot))
  local ok
  ok, err = self:exec(table.concat(sql, ";\n"))
  if not ok then
    if tostring(err):find("must be owner of publication", 1, true) then
      -- Another role's instance made it (the default name is shared by every role).
      local owner = self:exec("SELECT pg_catalog.pg_get_userbyid(pubowner)::text AS o FROM pg_publication WHERE pubname = $1",
        self.publication)
      return fail(string.format("cannot use publication %s: it belongs to role %s", self.publication,
        owner and owner[1] and owner[1].o or "?"),
        "give this client a publication and slot of its own (flash.client{ publication = \"...\", slot = \"...\" }), " ..
        "or run flashlua as that role")
    end
    return fail("cannot create publication " .. self.publication .. ": " .. err,
      "the role needs CREATE on the database and to own the listened tables")
  end
  self.published = {}
  for _, l in ipairs(list) do self.published[l.table.oid] = l end
  self.published_ops = ops
  return true
end

function Driver:check_server()
  local rows, err = self:exec("SELECT pg_catalog.current_setting('wal_level') AS wal_level, " ..
    "pg_catalog.current_database()::text AS db, " ..
    "pg_catalog.current_setting('server_version_num')::int AS version, current_user::text AS role, " ..
    "(SELECT r.rolreplication OR r.rolsuper FROM pg_catalog.pg_roles r " ..
    "WHERE r.rolname OPERATOR(pg_catalog.=) current_user) AS replication")
  if not rows then return nil, err end
  if rows[1].replication == false then
    -- Said first: the publication (CREATE on the database, owning the tables) would fail
    -- before the replication connection, with a hint that says nothing about it.
    return fail(string.format("the role %s may not use replication (it has neither REPLICATION nor superuser), " ..
      "which the %s driver needs", rows[1].role, self.client.driver_name),
      "run `ALTER ROLE " .. self:ident(rows[1].role) .. " REPLICATION` as a superuser")
  end
  if rows[1].wal_level ~= "logical" then
    return fail(string.format("wal_level is '%s', but the %s driver needs wal_level = logical", rows[1].wal_level,
      self.client.driver_name),
      "set wal_level = logical in postgresql.conf or with ALTER SYSTEM SET wal_level = logical, then restart the server; " ..
      "or use a trigger driver, which needs no server setting: driver = \"trigger\", or flashlua --driver trigger")
  end
  self.database = rows[1].db
  self.server_version = rows[1].version
  return true
end

-- Maps server errors of slot handling to what to do about them.
local function slot_error(self, err, state)
  if state == "53400" then
    return fail("no free replication slot: " .. err,
      "raise max_replication_slots in postgresql.conf (restart needed), or drop unused slots with pg_drop_replication_slot()")
  elseif state == "42501" or tostring(err):find("permission denied", 1, true) or tostring(err):find("must be superuser or replication role", 1, true) then
    local who = self:exec("SELECT current_user::text AS u")
    local role = who and self:ident(who[1].u) or "<role>"
    return fail("the role may not use replication: " .. err,
      "run `ALTER ROLE " .. role .. " REPLICATION` as a superuser")
  elseif tostring(err):find("pg_hba.conf", 1, true) then
    return fail(err, "allow replication connections for this role in pg_hba.conf")
  elseif state == "55006" then
    return fail("replication slot " .. self.slot .. " is active in another process: " .. err)
  end
  return nil, err
end

-- Creating a logical slot waits until every transaction running when it began has ended
-- (PostgreSQL's consistent point): a prepared transaction nobody commits, or a session idle
-- in a transaction, holds the start for as long as it lasts. After SLOT_WAIT_WARN seconds
-- (and every SLOT_WAIT_REPEAT more) a warning names what it waits for.
local SLOT_WAIT_WARN, SLOT_WAIT_REPEAT = 3, 60

-- What a slot being created waits for, as far as this role may see: prepared transactions
-- and sessions with a transaction id, oldest first.
function Driver:slot_waiters()
  local rows = self:exec([[SELECT w FROM (
      SELECT 'prepared transaction ' || pg_catalog.quote_literal(p.gid) || ' (prepared ' ||
        pg_catalog.to_char(p.prepared AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') || ' by ' || p.owner ||
        ' in database ' || p.database || ': COMMIT PREPARED or ROLLBACK PREPARED it)' AS w, p.prepared AS t
      FROM pg_catalog.pg_prepared_xacts p
      UNION ALL
      SELECT 'pid ' || a.pid || ' (' || COALESCE(a.usename::text, '?') || ' in database ' ||
        COALESCE(a.datname::text, '?') || ', ' || COALESCE(a.state, '?') || ', transaction since ' ||
        COALESCE(pg_catalog.to_char(a.xact_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), '?') || ')',
        a.xact_start
      FROM pg_catalog.pg_stat_activity a
      WHERE a.backend_xid IS NOT NULL AND a.pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid()) x
    ORDER BY t NULLS LAST LIMIT 10]])
  local list = {}
  for i, r in ipairs(rows or {}) do list[i] = r.w end
  return list
end

-- Runs CREATE_REPLICATION_SLOT on repl without blocking in libpq, saying what it waits for
-- when that takes long. Returns rows, or nil, err, state.
function Driver:create_slot(repl, command)
  local ok, err, state = repl:send(command)
  if not ok then return nil, err, state end
  local began, said = core.now(), nil
  while true do
    local rows, rerr, rstate = repl:result()
    if rows ~= false then return rows, rerr, rstate end
    -- SIGINT/SIGTERM (flashlua's handlers only mark them): the start gives up, as a stop.
    -- (A reconnect, or a first listen, inside the running loop leaves the signal to the
    -- loop, which takes it after.)
    local loop = self.client.loop
    local sig = not self.client.capturing and not (loop and loop.running) and core.signal_pending()
    if sig then
      self.client.start_interrupted = sig
      -- (else its walsender waits on with the slot after the connection is closed)
      repl:cancel()
      return nil, string.format("received %s while creating replication slot %s (it waited %.0f s for " ..
        "the transactions running when it began), stopping", sig, self.slot, core.now() - began)
    end
    local now = core.now()
    if now - began >= SLOT_WAIT_WARN and (not said or now - said >= SLOT_WAIT_REPEAT) then
      said = now
      local list = self:slot_waiters()
      log.warn(string.format("creating replication slot %s has waited %.0f s for the transactions that were " ..
        "running when it began to end (PostgreSQL needs them ended to start decoding): %s", self.slot, now - began,
        #list > 0 and table.concat(list, "; ") or "transactions this role cannot see (ask a superuser to look at " ..
        "pg_stat_activity and pg_prepared_xacts)"))
    end
    core.poll({ repl:fd() }, 0.25)
  end
end

-- The client's slot (output plugin `plugin`): a persistent one is resumed when it exists,
-- else created; a temporary one is created. Closes repl on failure.
function Driver:make_slot(repl, plugin)
  local S = self:ident(self.slot)
  if self.persistent then
    local rows, qerr = self:exec([[SELECT plugin::text AS plugin, database::text AS database, active_pid,
      confirmed_flush_lsn::text AS confirmed, ]] ..
      (self.server_version >= 130000 and "wal_status::text" or "NULL::text") .. [[ AS wal_status
      FROM pg_catalog.pg_replication_slots WHERE slot_name = $1]], self.slot)
    if not rows then repl:close() return nil, qerr end
    local s = rows[1]
    if s and s.wal_status == "lost" then
      -- The server removed WAL the slot had not read (max_slot_wal_keep_size): what was
      -- committed after its confirmed position is gone, and the slot can never be read
      -- again. Never go on as if nothing happened.
      repl:close()
      self.slot_invalid = true
      return fail(string.format("replication slot %s was invalidated by the server (wal_status lost: it held more WAL " ..
        "than max_slot_wal_keep_size allows, and the server removed WAL it had not read): the changes committed after " ..
        "%s (its confirmed position) until then are lost and cannot be delivered", self.slot,
        s.confirmed ~= core.null and s.confirmed or "its last confirmed position"),
        "to capture again from now, drop it: flashlua --drop-slot " .. self.slot ..
        " (or SELECT pg_drop_replication_slot(" .. self:literal(self.slot) .. ")); raise max_slot_wal_keep_size, " ..
        "or keep flashlua running, so that it does not happen again")
    end
    if s then
      if s.active_pid ~= core.null then
        repl:close()
        return fail(string.format("replication slot %s is active in another process (pid %d)", self.slot, s.active_pid),
          "stop that process, or give this client another `slot`")
      end
      if s.plugin ~= plugin or s.database ~= self.database then
        repl:close()
        return fail(string.format("replication slot %s exists but is not a %s slot of database %s", self.slot, plugin, self.database),
          "give this client another `slot`, or drop it with pg_drop_replication_slot()")
      end
      log.info(string.format("resuming from replication slot %s at %s", self.slot, s.confirmed))
    else
      local ok, cerr, state = self:create_slot(repl, "CREATE_REPLICATION_SLOT " .. S .. " LOGICAL " .. plugin .. " NOEXPORT_SNAPSHOT")
      if not ok then repl:close() return self:slot_error(cerr, state) end
      -- This client had the slot already: someone dropped it while it ran (reconnect says
      -- what that lost).
      if self.slot_known then
        self.slot_dropped = true
      elseif self.earlier_run then
        log.warn(string.format("replication slot %s did not exist, but publication %s of an earlier persistent run " ..
          "of it does: the slot was dropped after that run (pg_drop_replication_slot, or flashlua --drop-slot), and " ..
          "the changes committed since that run stopped were not captured; capturing from now on", self.slot,
          self.publication))
      end
      self.created_slot = true
      log.info("created persistent replication slot " .. self.slot)
      local slots = require "flash.slots"
      if not slots.ours(self.slot) then log.warn(slots.unseen_warning(self.slot)) end
    end
  else
    local ok, cerr, state = self:create_slot(repl, "CREATE_REPLICATION_SLOT " .. S .. " TEMPORARY LOGICAL " .. plugin .. " NOEXPORT_SNAPSHOT")
    if not ok then repl:close() return self:slot_error(cerr, state) end
  end
  self.slot_known = true
  return true
end

function Driver:open_slot()
  local repl, err = core.replication(self.client:dsn())
  if not repl then return slot_error(self, err) end
  local made, merr = self:make_slot(repl, "pgoutput")
  if not made then return nil, merr end
  return self:start_stream(repl)
end

-- Streams self.slot (made on repl) from its position; closes repl on failure. continued:
-- the stream goes on from another slot's (flash.driver.handover), not from a confirmed
-- position.
function Driver:start_stream(repl, continued)
  local S = self:ident(self.slot)
  local start_lsn = "0/0"
  local options = { "proto_version '" .. self.proto .. "'",
    "publication_names " .. self:literal(self:ident(self.publication)) }
  if self.streaming then options[#options + 1] = "streaming 'on'" end
  if self.binary then options[#options + 1] = "binary 'true'" end
  -- Logical messages mark where a backfill chunk's rows belong in the stream (PG 14+).
  if self.server_version >= 140000 then options[#options + 1] = "messages 'true'" end
  local cmd = "START_REPLICATION SLOT " .. S .. " LOGICAL " .. start_lsn .. " (" .. table.concat(options, ", ") .. ")"
  local ok, serr, state = repl:start(cmd, self.proto)
  if not ok then repl:close() return slot_error(self, serr, state) end
  return self:attach(repl, continued)
end

-- A started stream becomes the driver's (the pg_extension driver's too). continued: it
-- takes over from another stream without a gap or a repeat, so backfill chunks in flight
-- stay so (manual acks need a persistent slot: never continued).
function Driver:attach(repl, continued)
  if self.client.opts.stream_memory then repl:set_stream_limit(self.client.opts.stream_memory) end
  local acks = self.client.acks
  if acks then
    -- A new stream starts at the confirmed position: what was outstanding comes again.
    if acks.outstanding > 0 then
      log.warn(string.format("%d unacknowledged events are delivered again (new event tables: acknowledge those)",
        acks.outstanding))
    end
    acks:reset()
    repl:manual(function(end_lsn) acks:commit(end_lsn) end)
    repl:on_direct(function(...) return self:direct_added(...) end)
  end
  self.repl = repl
  self.masked = {}      -- a new stream converts every column until route() says otherwise
  self.direct = {}      -- ...and writes nothing to a sink directly
  repl:on_relation(function(...) return self:on_relation(...) end)
  if not continued then backfill.reset(self.client) end
  repl:on_message(backfill.PREFIX, function(lsn, content) return backfill.on_message(self.client, lsn, content) end)
  self:rebuild_index()
  return true
end

function Driver:start()
  local ok, err = self:check_server()
  if not ok then return nil, err end
  for _, l in ipairs(self.client.listeners) do
    ok, err = self:check_identity(l)
    if not ok then return nil, err end
  end
  ok, err = self:check_writable()
  if not ok then return nil, err end
  ok, err = self:remove_leftovers()
  if not ok then return nil, err end
  ok, err = self:setup_publication()
  if not ok then return nil, err end
  ok, err = self:open_slot()
  if not ok then
    -- A failed start leaves nothing it created, a persistent publication included.
    if not self.persistent or self.created_publication then
      self:exec("DROP PUBLICATION IF EXISTS " .. self:ident(self.publication))
    end
    return nil, err
  end
  self.dispatch = self:make_dispatch()
  return true
end

-- A listener added or whose operations changed at run time: the publication follows.
function Driver:sync(l)
  self:rebuild_index()
  if not self.repl then return true end
  local ok, err = self:check_identity(l)
  if ok then ok, err = self:check_writable() end
  if not ok then return nil, err end
  return self:sync_publication()
end

-- The publication publishes what the listeners now want (pg_extension: the registry).
function Driver:sync_publication()
  local ok, err
  local set = self:wanted_tables()
  local P = self:ident(self.publication)
  local ops = self:publish_ops()
  if ops ~= self.published_ops then
    ok, err = self:exec("ALTER PUBLICATION " .. P .. " SET (publish = " .. self:literal(ops) .. ")")
    if not ok then return fail("cannot change what publication " .. self.publication .. " publishes: " .. err) end
    self.published_ops = ops
  end
  for oid, wl in pairs(set) do
    if not self.published[oid] then
      ok, err = self:exec("ALTER PUBLICATION " .. P .. " ADD TABLE " .. self:qualified(wl))
      if not ok then return fail("cannot add " .. wl.table_name .. " to publication " .. self.publication .. ": " .. err) end
      self.published[oid] = wl
    end
  end
  for oid, pl in pairs(self.published) do
    if not set[oid] then
      if not pl.dropped then
        ok, err = self:exec("ALTER PUBLICATION " .. P .. " DROP TABLE " .. self:qualified(pl))
        if not ok then return fail("cannot drop " .. pl.table_name .. " from publication " .. self.publication .. ": " .. err) end
      end
      self.published[oid] = nil
    end
  end
  return true
end

-- The listeners a row of relation `relid` goes to: those of the relation itself and of
-- every ancestor (partitioned tables and sub-partitions, INHERITS parents), so a listener
-- on a parent sees the rows of all its descendants however a statement addressed them.
-- Cached per relid, with the relation's column mask (column_mask: what lrepl converts of
-- its next rows); both forgotten when the relation changes (its Relation message), the
-- listeners do, or a backfill starts or ends.
function Driver:route(relid)
  local rows = self:exec([[WITH RECURSIVE up(oid, depth) AS (
      SELECT $1::oid, 0
      UNION ALL SELECT i.inhparent, up.depth + 1 FROM pg_catalog.pg_inherits i JOIN up ON i.inhrelid = up.oid)
    SELECT oid::bigint AS oid FROM up ORDER BY depth]], relid)
  local list = {}
  if not rows then
    -- The query connection is gone: this relation's own listeners only, not cached.
    for _, l in ipairs(self.by_oid[relid] or {}) do list[#list + 1] = l end
    if #list == 0 then return self:remembered(relid) end
    return list
  end
  for _, r in ipairs(rows) do
    for _, l in ipairs(self.by_oid[r.oid] or {}) do list[#list + 1] = l end
  end
  if #list == 0 then list = self:remembered(relid) else self.known[relid] = list end
  self.routes[relid] = list
  -- No listener: nothing of its rows is read (a table still published while the
  -- publication catches up with the listeners).
  local mask = {}
  if list then mask = column_mask(list) end
  if mask and self.repl then
    self.masked[relid] = true
    self.repl:columns(relid, mask)
  end
  if not mask and list then self:route_direct(relid, list) end
  return list
end

-- A relation whose rows reach no listener by the catalog now. The walsender sent them, so
-- when they were written the relation was published: a listened table, or a partition or
-- child of one, since detached (DETACH PARTITION, NO INHERIT) or a listened table whose
-- listener has gone since. The listeners it had when last seen (remember) take the rows
-- of the first kind: they were that table's when committed. A relation never seen (attached,
-- written and detached between two looks at the catalog, or before a restart) is named in
-- a warning, once: its rows are not delivered.
function Driver:remembered(relid)
  local list = {}
  for _, l in ipairs(self.known[relid] or {}) do
    if self.client.by_id[l.id] == l then list[#list + 1] = l end
  end
  if #list > 0 then
    log.info(string.format("relation %d is no longer a partition or child of %s; the rows written to it before " ..
      "are delivered to its listeners", relid, list[1].table_name))
    return list
  end
  if not self.known[relid] and not self.unrouted[relid] then
    self.unrouted[relid] = true
    local r = self:exec([[SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) AS name FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1::oid]], relid)
    local name = r and r[1] and r[1].name or ("relation " .. relid)
    log.warn(string.format("rows of %s (oid %d) arrive, but it is not a partition or child of a listened table now " ..
      "and was not when flashlua last looked (attached and detached in between?): they are not delivered; detach " ..
      "partitions once flashlua has read their rows (client:run{ until_lsn = \"current\" })", name, relid))
  end
  return false
end

-- Where the rows of every partition and child of the listened tables go, noted now (at each
-- start and turn of housekeeping): a partition detached later still sends the rows it got
-- before (remembered).
function Driver:remember()
  local oids = {}
  for oid, list in pairs(self.by_oid) do
    self.known[oid] = list
    oids[#oids + 1] = string.format("%d", oid)
  end
  if #oids == 0 then return end
  local rows = self:exec([[WITH RECURSIVE d(oid, top, depth) AS (
      SELECT i.inhrelid, i.inhparent, 1 FROM pg_catalog.pg_inherits i WHERE i.inhparent = ANY($1::oid[])
      UNION ALL SELECT i.inhrelid, d.top, d.depth + 1 FROM pg_catalog.pg_inherits i JOIN d ON i.inhparent = d.oid)
    SELECT oid::bigint AS oid, top::bigint AS top FROM d ORDER BY oid, depth]], "{" .. table.concat(oids, ",") .. "}")
  if not rows then return end
  local lists = {}
  for _, r in ipairs(rows) do
    local list = lists[r.oid]
    if not list then
      list = {}
      for _, l in ipairs(self.by_oid[r.oid] or {}) do list[#list + 1] = l end
      lists[r.oid] = list
    end
    for _, l in ipairs(self.by_oid[r.top] or {}) do list[#list + 1] = l end
  end
  for oid, list in pairs(lists) do self.known[oid] = list end
end

-- The direct path: when a relation's rows go to one listener whose only callback, for
-- inserts, updates and deletes alike, is a Redis sink (flash.sink.redis) -- no `where`, no
-- `fields`, no backfill running, manual acknowledgements, no worker states, text values --
-- lrepl writes each change into the sink's outbox itself, as the sink would have written
-- its event, with no Lua event (repl:direct; the JSON, partition and acknowledgements are
-- the same: spec/66). Whatever changes about the listener forgets the route, and this with
-- it (forget_routes).
function Driver:route_direct(relid, list)
  local c = self.client
  if not self.repl or #list ~= 1 or getmetatable(self) ~= Driver or self.binary then return end
  if not c.acks or c.opts.ack ~= "manual" or c.pool then return end
  local l = list[1]
  if not l.passthrough or l.fields or l.bf then return end
  local sink
  for _, op in ipairs({ "insert", "update", "delete" }) do
    local cbs = l.callbacks[op]
    local obj = #cbs == 1 and cbs[1].obj
    if not obj or (sink and obj ~= sink) or type(obj.direct_target) ~= "function" then return end
    sink = obj
  end
  local out, keys = sink:direct_target(l)
  if not out then return end
  self.direct[relid] = { l = l, sink = sink }
  self.repl:direct(relid, relid, out, l.table_name, keys)
end

-- lrepl's direct path wrote changes of relation relid into its sink's outbox: they count
-- as delivered and are outstanding until Redis answers them (the sink acknowledges).
-- Then (relid nil) the sinks may write and read: every relation's events are queued.
function Driver:direct_added(relid, inserts, updates, deletes, commit_time)
  if relid == nil then
    for sink in pairs(self.direct_sinks) do
      self.direct_sinks[sink] = nil
      sink:direct_pump()
    end
    return
  end
  local t = self.direct[relid]
  local c = self.client
  local k = inserts + updates + deletes
  c.counters.events = c.counters.events + k
  local per = t.l.delivered
  per.insert, per.update, per.delete = per.insert + inserts, per.update + updates, per.delete + deletes
  c.last_commit_time = commit_time
  t.sink:direct_added(k, c.acks:track_n(k))
  self.direct_sinks[t.sink] = true
end

function Driver:make_dispatch()
  local client = self.client
  local source, raw
  -- ev.table is the listened table's name; ev.source the relation the row lives in. A
  -- listener with a backfill notes what reaches its callbacks (flash.backfill).
  local function emit(l, ev)
    ev.source = source
    local bf = l.bf
    if bf and #l.callbacks[ev.op] > 0 then bf:touch(raw) end
    return client:_deliver(l, ev)
  end
  local routes = self.routes
  local function deliver(ev, list)
    if #list == 1 then
      local l = list[1]
      ev.table = l.table_name
      if l.passthrough then
        ev.source = source
        if l.bf and #l.callbacks[ev.op] > 0 then l.bf:touch(ev) end
        return client:_deliver(l, ev) ~= false
      end
      -- A failed `where` (on_error = "stop") must keep the transaction unconfirmed.
      return where.apply(l, ev, emit) ~= false and not client.failure
    end
    for _, l in ipairs(list) do
      -- Each listener gets its own event: callbacks may keep or change it.
      local e = { op = ev.op, id = ev.id, table = l.table_name, new = ev.new, old = ev.old, lsn = ev.lsn,
                  xid = ev.xid, commit_time = ev.commit_time }
      if where.apply(l, e, emit) == false or client.failure then return false end
    end
    return true
  end
  return function(ev, relid)
    if routes ~= self.routes then routes = self.routes end
    local list = routes[relid]
    if list == nil then list = self:route(relid) end
    if not list then return true end
    source, raw = ev.table, ev
    local ok = deliver(ev, list)
    -- Not kept past its delivery: a row of hundreds of MB is freed at once.
    source, raw = nil, nil
    return ok
  end
end

-- A listened table now has this name (a rename while listening).
function Driver:renamed(oid, schema, name)
  for _, l in ipairs(self.by_oid[oid] or {}) do
    local was = l.table_name
    if base.rename(l, schema, name) then
      log.info(string.format("listened table %s was renamed to %s; listener #%d follows it", was, l.table_name, l.id))
    end
  end
end

-- A Relation message: the relation is new to this stream or was changed by DDL.
function Driver:on_relation(relid, schema, name, columns)
  self:forget_routes(relid)
  local list = self.by_oid[relid]
  if not list then return end
  self:renamed(relid, schema, name)
  local have = {}
  for _, c in ipairs(columns) do have[c] = true end
  if self.binary then self:warn_unreadable(relid, list) end
  for _, l in ipairs(list) do
    for _, c in ipairs(listened_columns(l)) do
      local key = l.id .. ":" .. c
      if not have[c] and not self.warned[key] then
        self.warned[key] = true
        log.warn(string.format("listener #%d on %s: column %s is no longer in the table (dropped or renamed); " ..
          "its events no longer carry it", l.id, l.table_name, c))
      end
    end
  end
end

-- binary = true and a column added while listening whose type the client cannot read: its
-- values arrive as the bytes of their send form. Said once per listener and column.
function Driver:warn_unreadable(relid, list)
  local cols = self:exec(require("flash.catalog").columns_sql("a.attrelid = $1"), string.format("%d", relid))
  local bad = cols and self:unreadable(cols) or {}
  for _, l in ipairs(list) do
    local want
    if l.fields and not l.predicate then
      want = {}
      for _, c in ipairs(listened_columns(l)) do want[c] = true end
    end
    for _, b in ipairs(bad) do
      local key = l.id .. ":binary:" .. b.name
      if (not want or want[b.name]) and not self.warned[key] then
        self.warned[key] = true
        log.warn(string.format("listener #%d on %s: column %s is of type %s, which binary = true cannot read; " ..
          "its values arrive as the bytes of their binary send form", l.id, l.table_name, b.name, b.type))
      end
    end
  end
end

-- Manual acks: everything before pos is acknowledged (flash.ack).
function Driver:confirm(pos, all_acked)
  if self.repl then self.repl:confirm(pos, all_acked) end
  if self.client.backfills then backfill.confirmed(self.client, pos) end
end

-- listener:backfill is supported (flash.backfill): logical messages place chunks in the stream.
function Driver:backfill()
  return self.server_version == nil or self.server_version >= 140000
end

function Driver:fds()
  if not self.repl then return {} end
  local fd = self.repl:fd()
  if fd < 0 then return {} end
  -- The query connection too: a terminated backend is noticed at once; and a new slot's
  -- connection while its slot is being made (flash.driver.handover).
  local qfd = not self.conn_retry_at and self:conn():fd() or -1
  local hfd = handover.fd(self)
  local list = {}
  if not self:paused() then list[1] = fd end
  if qfd >= 0 then list[#list + 1] = qfd end
  if hfd >= 0 then list[#list + 1] = hfd end
  return list
end

-- The query connection was lost (pg_terminate_backend, a restart): reconnect it and take
-- the instance's advisory lock again, so no other instance takes this one's publication
-- for a leftover. Returns true once it is back.
function Driver:reconnect_query(err)
  if not self.conn_retry_at then
    log.warn(string.format("query connection lost (%s); reconnecting", (tostring(err or "closed"):gsub("%s+$", ""))))
    self.conn_retry:reset()
  end
  local conn, cerr = core.connect(self.client:dsn())
  local ok = false
  if conn then
    local old = self.client.conn
    self.client.conn = conn
    local got
    got, cerr = self:exec("SELECT pg_catalog.pg_try_advisory_lock(" .. self:lock_sql(self.publication) .. ") AS ok")
    if got and got[1].ok then
      ok = true
      old:close()
    else
      cerr = cerr or "its advisory lock is held by another session"
      self.client.conn = old
      conn:close()
    end
  end
  if ok then
    self.conn_retry_at = nil
    self.client.counters.reconnects = self.client.counters.reconnects + 1
    log.warn("query connection re-established; the instance holds its lock again")
    return true
  end
  self.conn_retry_at = self.conn_retry:schedule(cerr, "query reconnect")
  return false
end

-- Whether the query connection is usable; reconnects it when it is not.
function Driver:check_query_conn()
  if self.conn_retry_at then
    if core.now() < self.conn_retry_at then return false end
    return self:reconnect_query()
  end
  local ok, err = self:conn():consume()
  if ok then return true end
  return self:reconnect_query(err)
end

-- max_lag: a warning once the WAL the slot holds (from its restart position to the
-- server's current one, what --list-slots shows) passes it, and a line once it is back
-- under half of it. Measured on the server: the stream's own positions move with
-- keepalives, and the walsender sends no faster than the callbacks read.
function Driver:check_lag()
  local max = self.client.opts.max_lag
  if not max or not self.repl then return end
  local slots = require "flash.slots"
  local held = slots.held(self:conn(), self.slot)
  if not held then return end
  local mb = slots.mb
  if not self.lagging and held > max then
    self.lagging = true
    log.warn(string.format("replication slot %s holds %s of WAL (max_lag = %s): the callbacks are slower than " ..
      "the writers, or events wait for acknowledgements; the server keeps that WAL until they are confirmed",
      self.slot, mb(held), mb(max)))
  elseif self.lagging and held <= max / 2 then
    self.lagging = false
    log.info(string.format("replication slot %s caught up: it holds %s of WAL (max_lag = %s)", self.slot, mb(held),
      mb(max)))
  end
end

-- Follows the listened tables by OID: a rename changes ev.table, a drop is said once, and
-- INHERITS children created while listening join the publication (partitions need not:
-- a partitioned table's publication covers its partitions as they come).
function Driver:housekeep()
  self.house_at = core.now() + HOUSE_INTERVAL
  self:check_lag()
  local oids = {}
  for oid in pairs(self.by_oid) do oids[#oids + 1] = string.format("%d", oid) end
  if #oids == 0 then return end
  local rows = self:exec([[SELECT x.oid::bigint AS oid, n.nspname::text AS schema, c.relname::text AS name
    FROM pg_catalog.unnest($1::oid[]) x(oid) LEFT JOIN pg_catalog.pg_class c ON c.oid = x.oid
    LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace]], "{" .. table.concat(oids, ",") .. "}")
  if not rows then return end
  for _, r in ipairs(rows) do
    if r.name == core.null then
      for _, l in ipairs(self.by_oid[r.oid] or {}) do
        if not l.dropped then
          l.dropped = true
          log.warn(string.format("listened table %s was dropped; listener #%d captures nothing more for it " ..
            "(a table created under the same name is another table: listen to it again)", l.table_name, l.id))
        end
      end
      self.published[r.oid] = nil
    else
      self:renamed(r.oid, r.schema, r.name)
    end
  end
  self:remember()
  self:identify_descendants()
  self:warn_unlogged()
  local pub = {}
  for oid in pairs(self.published) do pub[#pub + 1] = string.format("%d", oid) end
  if #pub == 0 then return end
  self:drop_former_children(pub)
  rows = self:exec(DESCENDANTS .. [[
    SELECT n.nspname::text AS schema, c.relname::text AS name, c.relreplident::text AS ident
    FROM d JOIN pg_catalog.pg_class c ON c.oid = d.oid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind = 'r' AND NOT c.relispartition AND NOT EXISTS (
      SELECT 1 FROM pg_catalog.pg_publication_rel pr JOIN pg_catalog.pg_publication p ON p.oid = pr.prpubid
      WHERE p.pubname = $2 AND pr.prrelid = d.oid)]], "{" .. table.concat(pub, ",") .. "}", self.publication)
  if not rows then return end
  local needs_identity = self.published_ops:find("update", 1, true) or self.published_ops:find("delete", 1, true)
  for _, r in ipairs(rows) do
    local name = self:ident(r.schema) .. "." .. self:ident(r.name)
    local display = r.schema .. "." .. r.name
    local ok, err = true, nil
    if needs_identity and r.ident ~= "f" then
      local alter = "ALTER TABLE " .. name .. " REPLICA IDENTITY FULL"
      if self.client.opts.replica_identity == "full" then
        ok, err = self:exec(alter)
      else
        ok, err = nil, "it does not have REPLICA IDENTITY FULL (run `" .. alter .. "`)"
      end
    end
    if ok then ok, err = self:exec("ALTER PUBLICATION " .. self:ident(self.publication) .. " ADD TABLE ONLY " .. name) end
    if ok then
      log.info(string.format("child table %s joined publication %s", display, self.publication))
    elseif not self.warned["child:" .. display] then
      self.warned["child:" .. display] = true
      log.warn(string.format("child table %s of a listened table is not captured: %s", display, tostring(err):gsub("%s+$", "")))
    end
  end
end

-- INHERITS children joined the publication one by one (above). One that left the listened
-- tables (ALTER TABLE ... NO INHERIT, or its parent's parent changed) leaves the publication
-- too, or its rows would go on arriving as the listened table's: as under the trigger
-- drivers, whose triggers on it go, its changes are delivered until this look (every
-- HOUSE_INTERVAL), none after. `pub`: the published listened tables' oids.
function Driver:drop_former_children(pub)
  local rows = self:exec(DESCENDANTS .. [[
    SELECT n.nspname::text AS schema, c.relname::text AS name
    FROM pg_catalog.pg_publication_rel pr JOIN pg_catalog.pg_publication p ON p.oid = pr.prpubid
    JOIN pg_catalog.pg_class c ON c.oid = pr.prrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE p.pubname = $2 AND NOT (pr.prrelid = ANY($1::oid[])) AND NOT EXISTS (SELECT 1 FROM d WHERE d.oid = pr.prrelid)
    ORDER BY 1, 2]], "{" .. table.concat(pub, ",") .. "}", self.publication)
  for _, r in ipairs(rows or {}) do
    local display = r.schema .. "." .. r.name
    local ok, err = self:exec("ALTER PUBLICATION " .. self:ident(self.publication) .. " DROP TABLE ONLY " ..
      self:ident(r.schema) .. "." .. self:ident(r.name))
    if ok then
      log.info(string.format("table %s is no longer a child of a listened table: it left publication %s",
        display, self.publication))
    elseif not self.warned["left:" .. display] then
      self.warned["left:" .. display] = true
      log.warn(string.format("table %s is no longer a child of a listened table, but stays in publication %s: %s",
        display, self.publication, tostring(err):gsub("%s+$", "")))
    end
  end
end

function Driver:next_deadline()
  if self.retry_at then return self.retry_at end
  -- Messages may be waiting in libpq's buffer, where poll() cannot see them.
  if self.more and not self:paused() then return core.now() end
  if self.client.backfills and not self:paused() and backfill.wants(self.client) then return core.now() end
  local due = self.repl and self.repl:due() or core.now() + 10
  if self.house_at and self.house_at < due then due = self.house_at end
  if self.conn_retry_at and self.conn_retry_at < due then due = self.conn_retry_at end
  local every = self.client.opts.heartbeat
  if every and (self.hb_since or 0) + every < due then due = (self.hb_since or core.now()) + every end
  if self.until_lsn and not self.reached then due = math.min(due, core.now() + 0.1) end
  return handover.deadline(self, due)
end

-- run{ until_lsn = "X/Y" | "current" }: return once everything committed up to it is handled.
function Driver:set_until(spec)
  if spec == "current" then
    -- A logical message marks a position the walsender has to read past; the insert
    -- position itself may sit just past a page header that no record ever ends at.
    local rows, err = self:exec("SELECT pg_catalog.pg_logical_emit_message(false, 'flashlua', '')::text AS lsn")
    if not rows then return nil, err end
    spec = rows[1].lsn
  end
  local n, err = core.lsn(spec)
  if not n then return nil, "bad until_lsn '" .. tostring(spec) .. "': " .. err end
  self.until_lsn, self.reached = n, false
  return true
end

-- heartbeat = seconds: once the client has delivered no event for that long, a
-- transactional logical message on the query connection gives the slot's stream a Commit
-- in this database, which is handled and confirmed like any other: the slot's confirmed
-- position moves on while the listened tables are idle (and the cluster's other databases
-- write). The message itself reaches no callback (HEARTBEAT_PREFIX).
function Driver:heartbeat()
  local every = self.client.opts.heartbeat
  if not every or not self.repl or self.conn_retry_at then return end
  local now, n = core.now(), self.client.counters.events
  if n ~= self.hb_events or not self.hb_since then
    self.hb_events, self.hb_since = n, now
    return
  end
  if now - self.hb_since < every then return end
  self.hb_since = now
  local rows, err = self:exec("SELECT pg_catalog.pg_logical_emit_message(true, " .. self:literal(HEARTBEAT_PREFIX) ..
    ", '')::text AS lsn")
  if rows then
    self.heartbeats = (self.heartbeats or 0) + 1
    self.heartbeat_lsn = rows[1].lsn
    self.hb_failing = false
  elseif not self.hb_failing then
    self.hb_failing = true
    log.warn("heartbeat failed: " .. (tostring(err):gsub("%s+$", "")))
  end
end

function Driver:is_reached()
  return self.until_lsn == nil or self.reached
end

function Driver:step()
  if not self.repl then
    if self.retry_at and core.now() >= self.retry_at then return self:reconnect() end
    return true
  end
  if self:check_query_conn() and core.now() >= (self.house_at or 0) then self:housekeep() end
  local budget, acks = 100000, self.client.acks
  if acks then
    if acks:full() then
      if not self.was_paused then
        self.was_paused = true
        log.warn(string.format("%d events are unacknowledged (max_unacked): reading pauses until the script " ..
          "acknowledges some", acks.outstanding))
      end
      if self.repl:due() <= core.now() then self.repl:status() end
      return true
    end
    self.was_paused = false
    -- Each message is at most one change: the limit holds to within one change's events.
    budget = math.max(1, acks.limit - acks.outstanding)
  end
  if self.client.backfills then
    self:check_backfills()
    local ok, berr = backfill.step(self.client)
    if not ok then return nil, berr end
  end
  local ok, herr = handover.step(self)
  if not ok then return nil, herr end
  if not self.repl then return true end
  self.pumping = true
  local more, err, kind = self.repl:pump(self.dispatch, self.client.flags, budget, SLICE)
  self.pumping = false
  self.more = more
  if more == nil then
    if self.client.failure or kind == "stopped" then return false end
    -- An error raised by flashlua's own dispatch is not a lost connection.
    if kind == "callback" then return nil, err end
    return self:lost(err)
  end
  if not self.repl then return true end
  -- Once per step, so a field at a time (repl:state(field)), not the whole state: under
  -- load a step often handles one or two messages.
  if self.persistent and more == false then
    if self.repl:state("largest_message") > LARGE_MESSAGE then
      local st = self.repl:state()
      if not st.in_txn and not st.streams_open then return self:renew() end
    end
  elseif more == false and not self.persistent and self.repl:state("largest_message") > handover.LARGE_MESSAGE
      and handover.wanted(self, self.repl:state()) then
    handover.begin(self)
  end
  self:heartbeat()
  if self.until_lsn and not self.reached then
    -- Delivered, acknowledged or not: under manual acks a stop hook may acknowledge last.
    -- ("passed": a streamed transaction still open commits after the target, if at all.)
    if handover.position(self, { delivered = self.repl:state("passed") }, "delivered") >= self.until_lsn then
      self.reached = true
    else
      local now = core.now()
      if not self.asked or now - self.asked >= 0.05 then
        self.asked = now
        self.repl:status(true)   -- the keepalive it answers tells how far the server has read
      end
    end
  end
  return true
end

function Driver:renew()
  local largest = self.repl:state().largest_message
  self.repl:finish(self.client.opts.shutdown_timeout or 10)
  self.repl = nil
  local ok, err = self:open_slot()
  if not ok then return self:lost(err) end
  log.info(string.format("replication connection to slot %s opened again after a message of %d bytes, to free " ..
    "its buffer", self.slot, largest))
  return true
end

-- The same server error at the same confirmed position this many times in a row: the
-- stream cannot get past something (e.g. a row whose text form passes PostgreSQL's 1 GB
-- limit for one value: the walsender fails on it every time). Stop with the reason
-- rather than redeliver the same transactions forever.
local STUCK_REPEATS = 5

function Driver:lost(err)
  handover.abandon(self)
  local msg = tostring(err):gsub("%s+$", "")
  local at = self.repl and self.repl:state().flushed or -1
  local key = msg:gsub("%d+", "#")
  if key == self.stuck_key and at == self.stuck_at then
    self.stuck_count = self.stuck_count + 1
  else
    self.stuck_key, self.stuck_at, self.stuck_count = key, at, 1
  end
  if self.stuck_count >= STUCK_REPEATS then
    if self.repl then self.repl:close() self.repl = nil end
    local cause = "see the server log"
    if msg:find("memory alloc request size", 1, true) then
      cause = "a change there is too large for PostgreSQL's text output (over 1 GB as text)"
    elseif msg:find("publication", 1, true) and msg:find("does not exist", 1, true) then
      cause = "the publication did not exist when that change was written (it was dropped while listening); " ..
        "the slot cannot decode past it, even once the publication exists again"
    end
    local fix
    if self.persistent then
      local change = msg:match("associated LSN (%x+/%x+)")
      fix = "nothing after it can be delivered until the slot is moved past the failing transaction" ..
        (change and (" (its change at " .. change .. ")") or "") .. ", skipping it, with SELECT " ..
        "pg_replication_slot_advance(" .. self:literal(self.slot) .. ", '<an LSN past its commit>')"
    else
      fix = "the temporary slot goes with this client; a new start begins at the current position"
    end
    return nil, string.format("replication fails at the same position %s every time (%d times): %s (%s; %s)",
      core.lsn(at >= 0 and at or 0), self.stuck_count, msg, cause, fix)
  end
  log.warn(string.format("replication connection lost (%s); reconnecting", msg))
  -- What the temporary slot had delivered when it went: what was committed after it and
  -- not yet delivered is lost with the slot, committed before the loss or not.
  local st = self.repl and self.repl:state()
  self.lost_lsn = st and handover.position(self, st, "delivered") or self.lost_lsn
  if self.repl then self.repl:close() self.repl = nil end
  self.lost_at = core.time()
  self.retry_at = core.now()
  self.retry:reset()
  return true
end

function Driver:reconnect()
  local ok, err
  if not self:conn():ok() then
    local conn, cerr = core.connect(self.client:dsn())
    if conn then
      self.client.conn:close()
      self.client.conn = conn
      ok, err = self:exec("SELECT pg_catalog.pg_advisory_lock(" .. self:lock_sql(self.publication) .. ")")
      -- This connection is the query connection now, holding the lock: a pending query
      -- reconnect would only find the lock taken (by it) and retry forever.
      if ok then self.conn_retry_at = nil end
    else
      err = cerr
    end
  else
    ok = true
  end
  if ok then ok, err = self:restore_publication() end
  if ok then ok, err = self:open_slot() end
  if ok then
    self.retry_at = nil
    self.client.counters.reconnects = self.client.counters.reconnects + 1
    if self.slot_dropped then
      self.slot_dropped = nil
      log.warn(string.format("replication slot %s was dropped while this client ran (by another session: " ..
        "pg_drop_replication_slot); created it again: changes committed after %s (the last position delivered) that " ..
        "were not delivered when the connection was lost at %s, and those committed until now, were not captured",
        self.slot, self.lost_lsn and core.lsn(self.lost_lsn) or "the start",
        os.date("!%Y-%m-%d %H:%M:%SZ", math.floor(self.lost_at))))
    elseif self.persistent then
      log.warn("replication resumed from slot " .. self.slot .. "; unconfirmed changes are delivered again")
    else
      log.warn(string.format("replication resumed with a new temporary slot; changes committed after %s " ..
        "(the last position delivered) that were not delivered when the connection was lost at %s, and those " ..
        "committed until now, were not captured (use persistent = true to keep them)",
        self.lost_lsn and core.lsn(self.lost_lsn) or "the start", os.date("!%Y-%m-%d %H:%M:%SZ", math.floor(self.lost_at))))
    end
    return true
  end
  -- A slot the server invalidated can never be read again: retrying would hide it.
  if self.slot_invalid then return nil, err end
  self.retry_at = self.retry:schedule(err, "reconnect")
  return true
end

-- The temporary publication, when another session dropped it while listening: made again
-- before the new slot, which then decodes with it (the old slot could not: a change
-- written while it was missing fails its decoding for good). A persistent one is left as
-- it is: its slot stays stuck there, and lost() says so and how to move it on.
function Driver:restore_publication()
  if self.persistent then return true end
  local rows, err = self:exec("SELECT 1 AS one FROM pg_catalog.pg_publication WHERE pubname = $1", self.publication)
  if not rows then return nil, err end
  if #rows > 0 then return true end
  log.warn(string.format("publication %s was dropped while listening (by another session); creating it again",
    self.publication))
  return self:setup_publication()
end

function Driver:stats(s)
  s.slot = self.slot
  s.publication = self.publication
  -- After a stop (a batch run's end), the stream's last state: where it stopped.
  local st = self.repl and self.repl:state() or self.final_state
  if st then
    -- Across a move to a new temporary slot (flash.driver.handover) they go on from the old one's.
    local flushed = handover.position(self, st, "flushed")
    s.last_lsn = core.lsn(flushed)
    s.paused = self:paused()
    s.received_lsn = core.lsn(handover.position(self, st, "received"))
    s.lag_bytes = math.max(0, handover.position(self, st, "server_end") - flushed)
    s.messages = handover.messages(self, st)
    s.stream_buffered_peak = st.stream_buffered_peak
    s.stream_spilled = st.stream_spilled
  end
  if self.client.backfills then s.backfill = backfill.stats(self.client) end
  if self.client.opts.heartbeat then
    s.heartbeats = self.heartbeats or 0
    s.heartbeat_lsn = self.heartbeat_lsn
  end
end

-- A graceful stop between a transaction's changes and its Commit delivers the rest of
-- it first (bounded by shutdown_timeout), so what was handled can be confirmed. Not from
-- inside a callback (the pump is running) nor after a failure.
function Driver:finish_open_transaction(timeout)
  if self.pumping or self.client.failure or not self.repl then return end
  local deadline = core.now() + timeout
  while self.repl:state().in_txn and core.now() < deadline do
    core.poll({ self.repl:fd() }, math.min(0.05, math.max(0, deadline - core.now())))
    local more = self.repl:pump(self.dispatch, self.client.flags, 100000,
      math.max(0.001, deadline - core.now()), true)
    if more == nil or self.client.failure then return end
  end
end

function Driver:quiesce()
  self:finish_open_transaction(self.client.opts.shutdown_timeout or 10)
end

-- confirm = false (a stop hook failed): the connection closes without a last status update.
function Driver:stop(confirm)
  handover.abandon(self, true)
  if self.client.backfills then backfill.close(self.client) end
  if self.repl then
    self:finish_open_transaction(self.client.opts.shutdown_timeout or 10)
    if confirm == false then
      self.repl:close()
    else
      -- A last status update confirms what the callbacks handled (manual: acknowledged).
      self.repl:finish(self.client.opts.shutdown_timeout or 10)
    end
    self.final_state = self.repl:state()
    self.repl = nil
  end
  local ok, err = true, nil
  -- A query connection that was lost is opened again to remove what it must.
  self.conn_retry_at = nil
  self:check_query_conn()
  if not self.persistent then
    local r, e = self:exec("DROP PUBLICATION IF EXISTS " .. self:ident(self.publication))
    if not r then
      ok, err = nil, string.format("cannot drop publication %s: %s; it is left in the database (the next " ..
        "flashlua start removes it, or run DROP PUBLICATION %s)", self.publication, (tostring(e):gsub("%s+$", "")),
        self:ident(self.publication))
    end
  end
  self:exec("SELECT pg_catalog.pg_advisory_unlock(" .. self:lock_sql(self.publication) .. ")")
  return ok, err
end

-- The pg_extension driver (flash.driver.pg_extension) shares the stream handling.
Driver.slot_error = slot_error

return M
