-- flash.trigger_base: what the three trigger drivers share: the instance's own schema
-- (advisory lock, leftovers of crashed instances, sequence, overflow table), condition SQL,
-- LISTEN with reconnects, stored-aside payloads, and a clean stop. Each driver adds how it
-- creates triggers (sync) and how it decodes a payload (dispatch).
local core = require "flash.core"
local log = require "flash.log"
local filter = require "flash.filter"

local M = {}

local LOCK_CLASS = "flashlua"            -- advisory lock namespace: hashtext('flashlua')
local SCHEMA_MARK = "flashlua instance"  -- COMMENT ON SCHEMA marks our schemas
local NOTIFY_LIMIT = 7999                -- NOTIFY payloads must be shorter than 8000 bytes
local OVERFLOW_BATCH = 64                -- stored-aside payloads fetched per query
local NAME_MAX = 63                      -- NAMEDATALEN - 1 bytes

M.NOTIFY_LIMIT = NOTIFY_LIMIT
M.OP_NAME = { I = "insert", U = "update", D = "delete", T = "truncate" }
M.OP_KEYWORD = { insert = "INSERT", update = "UPDATE", delete = "DELETE", truncate = "TRUNCATE" }
M.OPS = { "insert", "update", "delete", "truncate" }

-- Function-level settings make the text forms canonical whatever the writer's session says.
M.FUNC_SETTINGS = [[
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET "DateStyle" = 'ISO, MDY'
SET "TimeZone" = 'UTC'
SET "IntervalStyle" = 'postgres'
SET extra_float_digits = 3
SET bytea_output = 'hex'
]]

local Driver = {}
Driver.__index = Driver
M.Driver = Driver

-- A driver class that inherits from `parent`.
function M.class(parent)
  local c = setmetatable({}, { __index = parent })
  c.__index = c
  return c
end

-- A driver of `class` for `client`, with `fields` merged in.
function M.new(class, client, fields)
  local self = setmetatable({
    client = client,
    listening = false,
    retry_at = nil,
    backoff = 0.1,
    lost_at = nil,
    notifications = 0,
    overflow_fetches = 0,
  }, class)
  for k, v in pairs(fields or {}) do self[k] = v end
  -- Unique per running instance with default options: two instances never share objects.
  self.schema = client.opts.schema or string.format("flash_%d", client.conn:backend_pid())
  return self
end

-- `head .. suffix` cut to an identifier's 63 bytes on a character boundary of `head`; a
-- cut name gets `_tag` (e.g. the table's OID) before the suffix so that it stays unique.
function M.fit_name(head, suffix, tag)
  if #head + #suffix <= NAME_MAX then return head .. suffix end
  local tail = (tag and ("_" .. tag) or "") .. suffix
  local cut = head:sub(1, math.max(NAME_MAX - #tail, 0))
  -- Drop a partial UTF-8 sequence at the end of the cut.
  local lead = #cut
  while lead > 0 and cut:byte(lead) >= 0x80 and cut:byte(lead) < 0xC0 do lead = lead - 1 end
  if lead > 0 and cut:byte(lead) >= 0xC0 then
    local b = cut:byte(lead)
    local need = b >= 0xF0 and 4 or b >= 0xE0 and 3 or 2
    if #cut - lead + 1 < need then cut = cut:sub(1, lead - 1) end
  end
  return cut .. tail
end

function Driver:conn() return self.client.conn end

function Driver:ident(s) return assert(self:conn():escape_identifier(s)) end
function Driver:literal(s) return assert(self:conn():escape_literal(s)) end

local function fail(err, hint)
  if hint then return nil, err .. " (" .. hint .. ")" end
  return nil, err
end
M.fail = fail

function Driver:exec(sql, ...)
  local rows, n, state = self:conn():exec(sql, 0, ...)
  self.client:_log_notices()
  return rows, n, state
end

-- A Lua condition value as an untyped SQL literal: PostgreSQL resolves it to the
-- column's type, so 10, "10" and 10.0 compare as the column's own values. The text is
-- flash.filter's, which the wal_logical driver evaluates on arrival.
function Driver:value_literal(v)
  return self:literal(filter.literal_text(v))
end

-- SQL for the listener's conditions on row `rec` (NEW, OLD or an alias); nil without any.
function Driver:cond_sql(l, rec)
  if #l.conds == 0 then return nil end
  local parts = {}
  for _, c in ipairs(l.conds) do
    local col = rec .. "." .. self:ident(c.column)
    local op = c.op
    if op == "is null" then
      parts[#parts + 1] = col .. " IS NULL"
    elseif op == "is not null" then
      parts[#parts + 1] = col .. " IS NOT NULL"
    elseif op == "in" then
      if #c.value == 0 then
        parts[#parts + 1] = "false"
      else
        local vals = {}
        for i, v in ipairs(c.value) do vals[i] = self:value_literal(v) end
        parts[#parts + 1] = col .. " IN (" .. table.concat(vals, ", ") .. ")"
      end
    else
      parts[#parts + 1] = col .. " " .. op .. " " .. self:value_literal(c.value)
    end
  end
  return "(" .. table.concat(parts, " AND ") .. ")"
end

-- `expr` evaluated as the listener's condition is, NULL counting as false.
function M.truth(cond)
  return cond and ("coalesce(" .. cond .. ", false)") or nil
end

-- SQL that is true when row `new` has other primary_key values than row `old`.
function Driver:key_changed_sql(l, old, new)
  local ko, kn = {}, {}
  for i, k in ipairs(l.primary_key) do
    ko[i] = old .. "." .. self:ident(k) .. "::text"
    kn[i] = new .. "." .. self:ident(k) .. "::text"
  end
  return string.format("ROW(%s) IS DISTINCT FROM ROW(%s)", table.concat(ko, ", "), table.concat(kn, ", "))
end

function Driver:trigger_error(what, table_name, err)
  return fail(string.format("cannot create the %s trigger on %s: %s", what, table_name, err),
    "the role needs to own the table or hold the TRIGGER privilege on it")
end

function Driver:qualified_table(l)
  return self:ident(l.table.schema) .. "." .. self:ident(l.table.name)
end

-- Types whose cast to text is not their output function: inet/cidr (::text adds the
-- netmask), char(n) (::text drops the padding), boolean ('true' for 't'). format('%s')
-- calls the output function, so these read as the walsender (and pg_dump) print them.
local OWN_TEXT_CAST = { [16] = true, [650] = true, [869] = true, [1042] = true }

-- Text of columns `cols` of row `rec` as one SQL text[] expression.
function Driver:text_array(cols, rec)
  local vals = {}
  for i, c in ipairs(cols) do
    local col = rec .. "." .. self:ident(c.name)
    if OWN_TEXT_CAST[c.oid] then
      vals[i] = "CASE WHEN " .. col .. " IS NULL THEN NULL ELSE format('%s', " .. col .. ") END"
    else
      vals[i] = col .. "::text"
    end
  end
  return "ARRAY[" .. table.concat(vals, ", ") .. "]::text[]"
end

-- Conditions are checked when listening, under the trigger functions' own search_path:
-- a condition that cannot be evaluated must fail here, never later inside a user's write.
function Driver:check(l)
  local cond = self:cond_sql(l, "t")
  if not cond then return true end
  local ok, err = self:exec("SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);\n" ..
    "SELECT 1 FROM " .. self:qualified_table(l) .. " AS t WHERE " .. cond .. " LIMIT 0")
  if not ok then return fail("invalid 'where' for " .. l.table_name .. ": " .. err) end
  return true
end

-- Which operations a listener needs captured: an update can turn into an insert or a
-- delete (conditions, primary key), so it is captured when either is wanted.
function M.needed_ops(l)
  local w = l:wanted()
  local n = {}
  if w.insert then n.insert = true end
  if w.delete then n.delete = true end
  if w.truncate then n.truncate = true end
  local transforms = #l.conds > 0 or l.predicate ~= nil or l.primary_key ~= nil
  if w.update or (transforms and (w.insert or w.delete)) then n.update = true end
  return n, w
end

function Driver:lock_sql(schema_name)
  return "hashtext(" .. self:literal(LOCK_CLASS) .. "), hashtext(" .. self:literal(schema_name) .. ")"
end

-- Removes schemas of flashlua instances that are gone (their session-level advisory lock
-- is free), so nobody's writes keep paying for triggers no one listens to.
function Driver:remove_leftovers()
  local rows, err = self:exec([[
    SELECT nspname::text AS name FROM pg_catalog.pg_namespace
    WHERE pg_catalog.obj_description(oid, 'pg_namespace') LIKE $1 || '%']], SCHEMA_MARK)
  if not rows then return nil, err end
  self:sweep_orphans(rows, self.schema, "schema", function(name)
    return "DROP SCHEMA IF EXISTS " .. self:ident(name) .. " CASCADE"
  end)
  return true
end

-- Drops the objects named in rows[i].name (but `keep`) whose owner's session advisory
-- lock (self:lock_sql) is free: the flashlua instance that made them is gone.
function Driver:sweep_orphans(rows, keep, what, drop_sql)
  for _, r in ipairs(rows) do
    if r.name ~= keep then
      local got = self:exec("SELECT pg_try_advisory_lock(" .. self:lock_sql(r.name) .. ") AS ok")
      if got and got[1].ok then
        log.info(string.format("removing %s %s left by a flashlua instance that is gone", what, r.name))
        local ok, derr = self:exec(drop_sql(r.name))
        if not ok then log.warn("could not remove " .. r.name .. ": " .. derr) end
        self:exec("SELECT pg_advisory_unlock(" .. self:lock_sql(r.name) .. ")")
      end
    end
  end
end

-- PL/pgSQL that sends text variable `p`: as the notification itself when it fits, else
-- stored aside in the overflow table with the notification carrying its id.
function Driver:send_sql(p)
  local S = self:ident(self.schema)
  return "IF octet_length(" .. p .. ") > " .. NOTIFY_LIMIT .. " THEN\n" ..
    "  INSERT INTO " .. S .. ".overflow (payload) VALUES (" .. p .. ") RETURNING id INTO rid;\n" ..
    "  " .. p .. " := '[\"R\",' || rid || ']';\n" ..
    "END IF;\n" ..
    "PERFORM pg_notify(" .. self:literal(self.schema) .. ", " .. p .. ");"
end

-- The sequence that makes every payload unique (NOTIFY folds identical ones).
function Driver:seq_sql()
  return "nextval(" .. self:literal(self:ident(self.schema) .. ".seq") .. "::regclass)"
end

M.XID_SQL = "(txid_current() % 4294967296)"

-- The driver's own functions in the schema (SQL statements); none by default.
function Driver:schema_functions() return {} end

function Driver:install_schema(fresh)
  local got, err = self:exec("SELECT pg_try_advisory_lock(" .. self:lock_sql(self.schema) .. ") AS ok")
  if not got then return nil, err end
  if not got[1].ok then
    return fail(string.format("schema %s is in use by another running flashlua instance", self.schema),
      "give each instance its own `schema` option, or leave it out for a unique default")
  end
  local S = self:ident(self.schema)
  local sql = {}
  if fresh then sql[#sql + 1] = "DROP SCHEMA IF EXISTS " .. S .. " CASCADE" end
  sql[#sql + 1] = "CREATE SCHEMA IF NOT EXISTS " .. S
  sql[#sql + 1] = "COMMENT ON SCHEMA " .. S .. " IS " ..
    self:literal(string.format("%s (pid %d); removed when it stops", SCHEMA_MARK, core.getpid()))
  sql[#sql + 1] = "CREATE SEQUENCE IF NOT EXISTS " .. S .. ".seq"
  sql[#sql + 1] = "CREATE UNLOGGED TABLE IF NOT EXISTS " .. S ..
    ".overflow (id bigserial PRIMARY KEY, payload text NOT NULL)"
  for _, f in ipairs(self:schema_functions()) do sql[#sql + 1] = f end
  local ok
  ok, err = self:exec(table.concat(sql, ";\n"))
  if not ok then
    return fail("cannot create schema " .. self.schema .. ": " .. err,
      "the role needs CREATE on the database; or pass `schema` naming one it may create")
  end
  ok, err = self:exec("LISTEN " .. S)
  if not ok then return nil, err end
  self.listening = true
  return true
end

-- Forgets what the database holds: a fresh schema, or a reconnect (`fresh` false), after
-- which the database may still hold triggers that callbacks stopped wanting meanwhile.
function Driver:reset(fresh) end

function Driver:install(fresh)
  local ok, err = self:remove_leftovers()
  if not ok then return nil, err end
  ok, err = self:install_schema(fresh)
  if not ok then return nil, err end
  self:reset(fresh)
  for _, l in ipairs(self.client.listeners) do
    ok, err = self:sync(l)
    if not ok then return nil, err end
  end
  if not self.listening then return nil, "the connection was lost again" end
  return true
end

function Driver:start()
  local ok, err = self:install(true)
  if not ok then
    self:exec("DROP SCHEMA IF EXISTS " .. self:ident(self.schema) .. " CASCADE")
    return nil, err
  end
  log.debug(string.format("%s driver listening on channel %s", self.client.driver_name, self.schema))
  return true
end

function Driver:fds()
  if not self.listening then return {} end
  local fd = self:conn():fd()
  if fd < 0 then return {} end
  return { fd }
end

function Driver:next_deadline()
  return self.retry_at
end

function Driver:stats(s)
  s.schema = self.schema
  s.notifications = self.notifications
  s.overflow_fetches = self.overflow_fetches
end

local function lost(self, err)
  self.listening = false
  self.lost_at = self.lost_at or core.time()
  self.retry_at = core.now()
  self.backoff = 0.1
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
  local conn, err = core.connect(client.opts.dsn or require("flash").defaults.dsn or
    os.getenv("FLASH_DSN") or os.getenv("DATABASE_URL") or "")
  if conn then
    client:_log_notices()
    client.conn:close()
    client.conn = conn
    local ok, ierr = self:install(false)
    if ok then
      local now = core.time()
      client.counters.reconnects = client.counters.reconnects + 1
      log.warn(string.format("reconnected and listening again; changes committed between %s and %s " ..
        "were not captured (NOTIFY is not kept for absent listeners)",
        os.date("!%Y-%m-%d %H:%M:%SZ", math.floor(self.lost_at)), os.date("!%Y-%m-%d %H:%M:%SZ", math.floor(now))))
      self.lost_at, self.retry_at = nil, nil
      return true
    end
    err = ierr
    self.listening = false
  end
  self.retry_at = core.now() + self.backoff
  log.debug(string.format("reconnect failed (%s); next try in %.1fs", tostring(err), self.backoff))
  self.backoff = math.min(self.backoff * 2, 5)
  return true
end

-- The overflow id of a stored-aside notification, or nil.
local function overflow_id(payload)
  if payload:sub(1, 5) ~= '["R",' then return nil end
  return tonumber(payload:match('^%["R",(%d+)%]$'))
end

-- Fetches (and deletes) stored-aside payloads and dispatches them in the order of `ids`.
function Driver:fetch_aside(ids)
  local rows, err = self:exec("DELETE FROM " .. self:ident(self.schema) ..
    ".overflow WHERE id = ANY($1::bigint[]) RETURNING id, payload", "{" .. table.concat(ids, ",") .. "}")
  if not rows then return nil, "cannot fetch a stored-aside row: " .. err end
  local by_id = {}
  for _, r in ipairs(rows) do by_id[r.id] = r.payload end
  for _, id in ipairs(ids) do
    local payload = by_id[id]
    if payload then
      self.overflow_fetches = self.overflow_fetches + 1
      self.client.counters.bytes = self.client.counters.bytes + #payload
      local cont, derr = self:dispatch(payload)
      if not cont then return cont, derr end
      if not self.listening then return true end   -- a callback stopped the client
    else
      log.warn(string.format("row stored aside (#%d) is gone; its events are lost", id))
    end
  end
  return true
end

function Driver:step()
  if not self.listening then
    if self.retry_at and core.now() >= self.retry_at then self:reconnect() end
    return true
  end
  -- While notifications are dispatched, a callback may stop the client: stop() must not
  -- deliver from inside (out of order), and this loop must not read on.
  self.stepping = true
  local cont, err = self:receive()
  self.stepping = false
  return cont, err
end

-- Reads what the socket has and dispatches every notification, in order.
function Driver:receive()
  local conn = self:conn()
  local ok, err = conn:consume()
  self.client:_log_notices()
  if not ok then
    lost(self, err)
    return true
  end
  self:prepare()
  -- Consecutive stored-aside payloads are fetched with one query.
  local aside = {}
  local function flush()
    if #aside == 0 then return true end
    local ids = aside
    aside = {}
    return self:fetch_aside(ids)
  end
  while true do
    local _, payload = conn:notify()
    if not payload then break end
    self.notifications = self.notifications + 1
    self.client.counters.bytes = self.client.counters.bytes + #payload
    local rid = overflow_id(payload)
    local cont, herr = true, nil
    if rid then
      aside[#aside + 1] = rid
      if #aside >= OVERFLOW_BATCH then cont, herr = flush() end
    else
      cont, herr = flush()
      if cont and self.listening then cont, herr = self:dispatch(payload) end
    end
    if cont == nil then return nil, herr end
    if not cont then return false end
    if not self.listening then return true end   -- a callback stopped the client
  end
  local cont, herr = flush()
  if cont == nil then return nil, herr end
  if not cont then return false end
  if self.listening and not conn:ok() then lost(self, "connection closed") end
  return true
end

-- Called before the notifications of a step are dispatched.
function Driver:prepare() end

function Driver:stop()
  local ok, err = true, nil
  if self.listening then
    -- Deliver what has already arrived before the triggers go (not after a failure:
    -- on_error = "stop" means no further callbacks; not when a callback stops the client:
    -- that callback's event is the last one).
    local sok = (self.client.failure or self.stepping) and true or self:step()
    if sok == nil then log.warn("events received during stop could not be delivered") end
    local S = self:ident(self.schema)
    local r, e = self:exec("UNLISTEN *; DROP SCHEMA IF EXISTS " .. S .. " CASCADE; SELECT pg_advisory_unlock(" ..
      self:lock_sql(self.schema) .. ")")
    if not r then ok, err = nil, "cannot remove schema " .. self.schema .. ": " .. e end
  end
  self.listening = false
  return ok, err
end

---------------------------------------------------------------------------------------
-- Shared triggers (trigger_global, trigger_statement): the triggers of one table serve
-- every listener of the client on it. Their functions evaluate each listener's conditions,
-- partial-field check and primary-key change in SQL (the `trigger` driver's semantics, by
-- the same SQL) and send batches: ["B", seq, xid, [actions, new, old], ...], where actions
-- such as "3U,5DI," say which listener gets which events of that row, and the rows carry
-- the union of those listeners' columns. Functions are regenerated when the listeners'
-- wanted operations change; the triggers themselves are created once per table and unit.

local TableDriver = M.class(Driver)
M.TableDriver = TableDriver

-- A driver of `class` (which has UNITS, see below) for `client`.
function M.new_table_driver(class, client)
  return M.new(class, client, {
    groups = {},        -- [table oid] = group (see TableDriver:group)
    group_list = {},
    layouts = {},       -- [listener id] = layout into its group's rows
    fnames = {},        -- [function name] = table oid: names already taken in the schema
    decoder = core.batch_decoder(),
  })
end

-- Sends one batch of items (text of a comma-separated list of JSON items). No SECURITY
-- DEFINER and no SET clauses: only our trigger functions (which have both) call it, and
-- PUBLIC has no USAGE on the schema.
function TableDriver:schema_functions()
  local S = self:ident(self.schema)
  local body = "DECLARE p text; rid bigint;\nBEGIN\n" ..
    "p := '[\"B\",' || " .. self:seq_sql() .. " || ',' || " .. M.XID_SQL .. " || ',' || items || ']';\n" ..
    self:send_sql("p") .. "\nEND"
  return { "CREATE OR REPLACE FUNCTION " .. S .. ".emit_batch(items text) RETURNS void LANGUAGE plpgsql AS " ..
    self:literal(body) }
end

function TableDriver:reset()
  for _, g in ipairs(self.group_list) do
    g.bodies, g.installed, g.unknown = {}, {}, true
  end
end

-- The group of the listener's table; the listener joins it (its layout points into the
-- group's column list, which only grows, so rows sent before a join still decode).
function TableDriver:group(l)
  local oid = l.table.oid
  local g = self.groups[oid]
  if not g then
    g = { oid = oid, display = l.table_name, qualified = self:qualified_table(l),
          stem = self.schema .. "_" .. l.table.schema .. "_" .. l.table.name,
          listeners = {}, members = {}, cols = {}, colpos = {}, names = {},
          bodies = {}, installed = {}, unknown = false }
    self.groups[oid] = g
    self.group_list[#self.group_list + 1] = g
  end
  if not g.members[l.id] then
    local entries = {}
    for i, c in ipairs(l.columns) do
      local pos = g.colpos[c.name]
      if not pos then
        g.cols[#g.cols + 1] = c
        pos = #g.cols
        g.colpos[c.name] = pos
      end
      entries[i] = { name = c.name, oid = c.oid, elem = c.elem, delim = c.delim, pos = pos }
    end
    self.layouts[l.id] = core.layout(entries, self.client.flags)
    g.members[l.id] = true
    g.listeners[#g.listeners + 1] = l
  end
  return g
end

-- The trigger's (and its function's) name for a unit of a group: "<schema>_<table
-- schema>_<table>_<unit>", cut to 63 bytes; unique in our schema.
function TableDriver:unit_name(g, unit)
  local name = g.names[unit]
  if name then return name end
  name = M.fit_name(g.stem, "_" .. unit, g.oid)
  local n = 0
  while self.fnames[name] and self.fnames[name] ~= g.oid do
    n = n + 1
    name = M.fit_name(g.stem .. "_" .. g.oid .. (n > 1 and ("_" .. n) or ""), "_" .. unit)
  end
  self.fnames[name] = g.oid
  g.names[unit] = name
  return name
end

-- SQL (a text expression) for one listener's actions on a row of operation `op`, or nil
-- when the listener needs no event of that operation. `r` names the rows: r.new and
-- r.old (row references), r.has_new and r.has_old (SQL that is false where the row is
-- missing; nil where it is always there). Only letters some callback wants are sent;
-- an update stays an update for a Lua predicate, which decides on arrival.
function TableDriver:listener_actions(l, op, r)
  local need, want = M.needed_ops(l)
  if not need[op] then return nil end
  local keep = {
    I = want.insert, D = want.delete, T = want.truncate,
    U = want.update or (l.predicate ~= nil and (want.insert or want.delete)),
  }
  local function tok(letters)
    local s = letters:gsub("%u", function(c) return keep[c] and c or "" end)
    if s == "" then return "NULL" end
    return "'" .. l.id .. s .. ",'"
  end
  if op == "truncate" then return tok("T") end
  local function cond(rec, has)
    local c = M.truth(self:cond_sql(l, rec))
    if has and c then return "(" .. has .. " AND " .. c .. ")" end
    return c or has
  end
  if op == "insert" or op == "delete" then
    local c = cond(op == "insert" and r.new or r.old)
    local t = tok(op == "insert" and "I" or "D")
    if not c then return t end
    return "CASE WHEN " .. c .. " THEN " .. t .. " END"
  end
  local both = tok("U")
  if l.fields then
    -- Partial fields: an update that changes none of them is not an event.
    both = "CASE WHEN " .. self:text_array(l.columns, r.new) .. " IS DISTINCT FROM " ..
      self:text_array(l.columns, r.old) .. " THEN " .. both .. " END"
  end
  if l.primary_key and #l.primary_key > 0 then
    both = "CASE WHEN " .. self:key_changed_sql(l, r.old, r.new) .. " THEN " .. tok("DI") ..
      " ELSE " .. both .. " END"
  end
  local o, n = cond(r.old, r.has_old), cond(r.new, r.has_new)
  if not o and not n then return both end
  return "CASE WHEN " .. (o or "true") .. " THEN CASE WHEN " .. (n or "true") .. " THEN " .. both ..
    " ELSE " .. tok("D") .. " END WHEN " .. (n or "true") .. " THEN " .. tok("I") .. " END"
end

-- SQL for the actions of every listener of the group on one row, or nil when no listener
-- needs events of `op`.
function TableDriver:actions_sql(g, op, r)
  local parts = {}
  for _, l in ipairs(g.listeners) do
    parts[#parts + 1] = self:listener_actions(l, op, r)
  end
  if #parts == 0 then return nil end
  return "concat(" .. table.concat(parts, ", ") .. ")"
end

-- SQL: the JSON text of row `rec` over the group's columns; 'null' unless `has` holds.
function TableDriver:row_json(g, rec, has)
  local arr = #g.cols == 0 and "'[]'" or ("to_json(" .. self:text_array(g.cols, rec) .. ")::text")
  if not has then return arr end
  return "CASE WHEN " .. has .. " THEN " .. arr .. " ELSE 'null' END"
end

-- SQL: one batch item from actions `a` (text of digits, letters and commas) and rows.
function TableDriver:item_sql(g, a, r, op)
  local nv = (op == "insert" or op == "update") and self:row_json(g, r.new, r.has_new) or "'null'"
  local ov = (op == "delete" or op == "update") and self:row_json(g, r.old, r.has_old) or "'null'"
  return "'[\"' || " .. a .. " || '\",' || " .. nv .. " || ',' || " .. ov .. " || ']'"
end

-- The truncate unit: a BEFORE TRUNCATE statement trigger that tells each listener that
-- wants truncates.
local TRUNCATE_UNIT = {
  name = "truncate", what = "truncate",
  ddl = "BEFORE TRUNCATE", level = "FOR EACH STATEMENT",
  body = function(self, g)
    local a = self:actions_sql(g, "truncate", {})
    if not a then return nil end
    return "BEGIN\nPERFORM " .. self:ident(self.schema) .. ".emit_batch('[\"' || " .. a ..
      " || '\",null,null]');\nRETURN NULL;\nEND"
  end,
}
M.TRUNCATE_UNIT = TRUNCATE_UNIT

-- Makes the triggers and functions of one table match what its listeners want, in one
-- transaction. A unit (UNITS of the driver class: name, what, ddl, level, body, and
-- optional settings of its function) whose body is nil is not needed: its trigger goes.
function TableDriver:sync_group(g)
  local S = self:ident(self.schema)
  local sql, bodies, installed, whats = {}, {}, {}, {}
  for _, unit in ipairs(self.UNITS) do
    local body = unit.body(self, g)
    local name = self:unit_name(g, unit.name)
    local qfn = S .. "." .. self:ident(name)
    local trig = self:ident(name)
    if body then
      if body ~= g.bodies[unit.name] then
        sql[#sql + 1] = "CREATE OR REPLACE FUNCTION " .. qfn .. "() RETURNS trigger LANGUAGE plpgsql " ..
          M.FUNC_SETTINGS .. (unit.settings or "") .. " AS " .. self:literal(body)
      end
      if not g.installed[unit.name] then
        sql[#sql + 1] = "DROP TRIGGER IF EXISTS " .. trig .. " ON " .. g.qualified
        sql[#sql + 1] = "CREATE TRIGGER " .. trig .. " " .. unit.ddl .. " ON " .. g.qualified .. " " ..
          unit.level .. " EXECUTE FUNCTION " .. qfn .. "()"
        whats[#whats + 1] = unit.what
      end
      bodies[unit.name], installed[unit.name] = body, true
    elseif g.installed[unit.name] or g.unknown then
      sql[#sql + 1] = "DROP TRIGGER IF EXISTS " .. trig .. " ON " .. g.qualified
      sql[#sql + 1] = "DROP FUNCTION IF EXISTS " .. qfn .. "()"
    end
  end
  if #sql > 0 then
    local ok, err = self:exec(table.concat(sql, ";\n"))
    if not ok then
      if not self:conn():ok() then return self:sync_failed(err) end
      if #whats == 0 then return M.fail(string.format("cannot change the triggers of %s: %s", g.display, err)) end
      return self:trigger_error(table.concat(whats, " and "), g.display, err)
    end
    log.debug(string.format("triggers of %s synced: %s", g.display, table.concat(sql, "; "):sub(1, 200)))
  end
  g.bodies, g.installed, g.unknown = bodies, installed, false
  return true
end

function TableDriver:sync(l)
  if not self.listening then return true end   -- reconnecting: installed on reconnect
  return self:sync_group(self:group(l))
end

-- Decodes one batch and delivers its events in order; returns false when the client
-- must stop. A callback may get here again (client:stop() delivers what has arrived):
-- the driver's decoder is out while a batch is read, so an inner batch gets one of its
-- own and the outer one reads on undisturbed.
function TableDriver:dispatch(payload)
  local batch = self.decoder or core.batch_decoder()
  self.decoder = nil
  local kind, seq, xid = batch:open(payload)
  local cont = true
  if kind == "B" then
    cont = self:deliver_batch(batch, xid)
  else
    log.warn("ignoring a malformed notification: " .. tostring(seq))
  end
  self.decoder = batch
  return cont
end

function TableDriver:deliver_batch(batch, xid)
  local client = self.client
  local by_id, layouts, counters = client.by_id, self.layouts, client.counters
  while true do
    local lid, letter = batch:next()
    if not lid then
      if letter then log.warn("ignoring the rest of a notification: " .. letter) end
      return true
    end
    local l = by_id[lid]
    local op = M.OP_NAME[letter]
    if l and op then
      -- Do no work nobody asked for: rows are decoded only for a callback (or a predicate
      -- that may turn the event into one a callback wants).
      if #l.callbacks[op] > 0 or l.predicate then
        local new, old, err = batch:rows(layouts[lid])
        if err then
          log.warn("ignoring the rest of a notification: " .. err)
          return true
        end
        if not client:_deliver(l, { op = op, table = l.table_name, new = new, old = old, xid = xid }) then
          return false
        end
        if not self.listening then return true end   -- a callback stopped the client
      else
        counters.dropped = counters.dropped + 1
      end
    end
  end
end

return M
