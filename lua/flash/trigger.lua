-- flash.trigger: the `trigger` driver. Per listener and operation, a row trigger whose
-- function sends the row (canonical text forms) with pg_notify; rows too large for
-- NOTIFY are stored aside and fetched. Everything lives in the instance's own schema.
local core = require "flash.core"
local log = require "flash.log"

local M = {}
local Driver = {}
Driver.__index = Driver

local LOCK_CLASS = "flashlua"            -- advisory lock namespace: hashtext('flashlua')
local SCHEMA_MARK = "flashlua instance"  -- COMMENT ON SCHEMA marks our schemas
local NOTIFY_LIMIT = 7999                -- NOTIFY payloads must be shorter than 8000 bytes
local OP_LETTER = { insert = "INSERT", update = "UPDATE", delete = "DELETE", truncate = "TRUNCATE" }
local OP_NAME = { I = "insert", U = "update", D = "delete", T = "truncate" }
-- Function-level settings make the text forms canonical whatever the writer's session says.
local FUNC_SETTINGS = [[
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET "DateStyle" = 'ISO, MDY'
SET "TimeZone" = 'UTC'
SET "IntervalStyle" = 'postgres'
SET extra_float_digits = 3
SET bytea_output = 'hex'
]]

function M.new(client)
  local self = setmetatable({
    client = client,
    installed = {},     -- [listener id] = { [op] = true } triggers present in the database
    listening = false,
    retry_at = nil,
    backoff = 0.1,
    lost_at = nil,
    notifications = 0,
    overflow_fetches = 0,
  }, Driver)
  local name = client.opts.schema
  if not name then
    -- Unique per running instance with default options: two instances never share objects.
    name = string.format("flash_%d", client.conn:backend_pid())
  end
  self.schema = name
  return self
end

function Driver:conn() return self.client.conn end

function Driver:ident(s) return assert(self:conn():escape_identifier(s)) end
function Driver:literal(s) return assert(self:conn():escape_literal(s)) end

local function fail(err, hint)
  if hint then return nil, err .. " (" .. hint .. ")" end
  return nil, err
end

function Driver:exec(sql, ...)
  local rows, n, state = self:conn():exec(sql, 0, ...)
  self.client:_log_notices()
  return rows, n, state
end

-- A Lua condition value as an untyped SQL literal: PostgreSQL resolves it to the
-- column's type, so 10, "10" and 10.0 compare as the column's own values.
function Driver:value_literal(v)
  local t = type(v)
  if t == "boolean" then return v and "'true'" or "'false'" end
  if t == "number" then
    if v == math.floor(v) and math.abs(v) < 2^63 then return self:literal(string.format("%d", v)) end
    return self:literal(string.format("%.17g", v))
  end
  return self:literal(tostring(v))
end

-- SQL for the listener's conditions on row variable `rec` (NEW, OLD or an alias).
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

function Driver:qualified_table(l)
  return self:ident(l.table.schema) .. "." .. self:ident(l.table.name)
end

-- Conditions are checked when listening: a condition that cannot be evaluated must fail
-- here, never later inside a user's write.
function Driver:check(l)
  local cond = self:cond_sql(l, "t")
  if not cond then return true end
  local ok, err = self:exec("SELECT 1 FROM " .. self:qualified_table(l) .. " AS t WHERE " .. cond .. " LIMIT 0")
  if not ok then return fail("invalid 'where' for " .. l.table_name .. ": " .. err) end
  return true
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
  for _, r in ipairs(rows) do
    if r.name ~= self.schema then
      local got = self:exec("SELECT pg_try_advisory_lock(" .. self:lock_sql(r.name) .. ") AS ok")
      if got and got[1].ok then
        log.info(string.format("removing schema %s left by a flashlua instance that is gone", r.name))
        local ok, derr = self:exec("DROP SCHEMA IF EXISTS " .. self:ident(r.name) .. " CASCADE")
        if not ok then log.warn("could not remove " .. r.name .. ": " .. derr) end
        self:exec("SELECT pg_advisory_unlock(" .. self:lock_sql(r.name) .. ")")
      end
    end
  end
  return true
end

function Driver:install_schema(fresh)
  local got, err = self:exec("SELECT pg_try_advisory_lock(" .. self:lock_sql(self.schema) .. ") AS ok")
  if not got then return nil, err end
  if not got[1].ok then
    return fail(string.format("schema %s is in use by another running flashlua instance", self.schema),
      "give each instance its own `schema` option, or leave it out for a unique default")
  end
  local S = self:ident(self.schema)
  local seqname = S .. ".seq"
  local emit_body = [[
DECLARE p text; rid bigint;
BEGIN
  p := '[' || to_json(op)::text || ',' || nextval(]] .. self:literal(seqname) .. [[::regclass) || ',' || lid
       || ',' || (txid_current() % 4294967296) || ',' || coalesce(to_json(nv)::text, 'null')
       || ',' || coalesce(to_json(ov)::text, 'null') || ']';
  IF octet_length(p) > ]] .. NOTIFY_LIMIT .. [[ THEN
    INSERT INTO ]] .. S .. [[.overflow (payload) VALUES (p) RETURNING id INTO rid;
    p := '["R",' || rid || ']';
  END IF;
  PERFORM pg_notify(]] .. self:literal(self.schema) .. [[, p);
END]]
  local sql = {}
  if fresh then sql[#sql + 1] = "DROP SCHEMA IF EXISTS " .. S .. " CASCADE" end
  sql[#sql + 1] = "CREATE SCHEMA IF NOT EXISTS " .. S
  sql[#sql + 1] = "COMMENT ON SCHEMA " .. S .. " IS " ..
    self:literal(string.format("%s (pid %d); removed when it stops", SCHEMA_MARK, core.getpid()))
  sql[#sql + 1] = "CREATE SEQUENCE IF NOT EXISTS " .. seqname
  sql[#sql + 1] = "CREATE UNLOGGED TABLE IF NOT EXISTS " .. S ..
    ".overflow (id bigserial PRIMARY KEY, payload text NOT NULL)"
  sql[#sql + 1] = "CREATE OR REPLACE FUNCTION " .. S .. ".emit(op text, lid int, nv text[], ov text[])" ..
    " RETURNS void LANGUAGE plpgsql " .. FUNC_SETTINGS .. " AS " .. self:literal(emit_body)
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

-- Which row/statement triggers a listener needs: an update can turn into an insert or
-- a delete (conditions, primary key), so it is captured when either is wanted.
local function needed_ops(l)
  local w = l:wanted()
  local n = {}
  if w.insert then n.insert = true end
  if w.delete then n.delete = true end
  if w.truncate then n.truncate = true end
  local transforms = #l.conds > 0 or l.predicate ~= nil or l.primary_key ~= nil
  if w.update or (transforms and (w.insert or w.delete)) then n.update = true end
  return n
end

function Driver:names(l, op)
  local suffix = string.format("_%d_%s", l.id, op)
  local base = self.schema
  if #base + #suffix > 63 then base = base:sub(1, 63 - #suffix) end
  return base .. suffix, string.format("l%d_%s", l.id, op)
end

function Driver:array_sql(l, rec)
  local vals = {}
  for i, c in ipairs(l.columns) do vals[i] = rec .. "." .. self:ident(c.name) .. "::text" end
  return "ARRAY[" .. table.concat(vals, ", ") .. "]::text[]"
end

function Driver:function_body(l, op)
  local S = self:ident(self.schema)
  local function emit(letter, nv, ov)
    return string.format("PERFORM %s.emit('%s', %d, %s, %s);", S, letter, l.id, nv or "NULL", ov or "NULL")
  end
  if op == "truncate" then
    return "BEGIN " .. emit("T") .. " RETURN NULL; END"
  elseif op == "insert" or op == "delete" then
    local rec = op == "insert" and "NEW" or "OLD"
    local body = op == "insert" and emit("I", "nv") or emit("D", nil, "nv")
    local cond = self:cond_sql(l, rec)
    local lines = { "DECLARE nv text[];", "BEGIN" }
    if cond then lines[#lines + 1] = "IF NOT coalesce(" .. cond .. ", false) THEN RETURN NULL; END IF;" end
    lines[#lines + 1] = "nv := " .. self:array_sql(l, rec) .. ";"
    lines[#lines + 1] = body
    lines[#lines + 1] = "RETURN NULL; END"
    return table.concat(lines, "\n")
  end
  -- update: the soft-delete transitions, partial fields and the primary key change.
  local co, cn = self:cond_sql(l, "OLD"), self:cond_sql(l, "NEW")
  local lines = { "DECLARE o boolean; n boolean; nv text[]; ov text[];", "BEGIN" }
  lines[#lines + 1] = "o := " .. (co and ("coalesce(" .. co .. ", false)") or "true") .. ";"
  lines[#lines + 1] = "n := " .. (cn and ("coalesce(" .. cn .. ", false)") or "true") .. ";"
  lines[#lines + 1] = "IF NOT (o OR n) THEN RETURN NULL; END IF;"
  lines[#lines + 1] = "nv := " .. self:array_sql(l, "NEW") .. ";"
  lines[#lines + 1] = "ov := " .. self:array_sql(l, "OLD") .. ";"
  lines[#lines + 1] = "IF o AND n THEN"
  local updated = emit("U", "nv", "ov")
  if l.fields then
    -- Partial fields: an update that changes none of them is not an event.
    updated = "IF nv IS DISTINCT FROM ov THEN " .. updated .. " END IF;"
  end
  if l.primary_key and #l.primary_key > 0 then
    local ko, kn = {}, {}
    for i, k in ipairs(l.primary_key) do
      ko[i] = "OLD." .. self:ident(k) .. "::text"
      kn[i] = "NEW." .. self:ident(k) .. "::text"
    end
    lines[#lines + 1] = string.format("  IF ROW(%s) IS DISTINCT FROM ROW(%s) THEN %s %s ELSE %s END IF;",
      table.concat(ko, ", "), table.concat(kn, ", "), emit("D", nil, "ov"), emit("I", "nv"), updated)
  else
    lines[#lines + 1] = "  " .. updated
  end
  lines[#lines + 1] = "ELSIF o THEN " .. emit("D", nil, "ov")
  lines[#lines + 1] = "ELSE " .. emit("I", "nv")
  lines[#lines + 1] = "END IF;"
  lines[#lines + 1] = "RETURN NULL; END"
  return table.concat(lines, "\n")
end

function Driver:create_trigger(l, op)
  local S = self:ident(self.schema)
  local trig, fn = self:names(l, op)
  local qfn = S .. "." .. self:ident(fn)
  local tbl = self:qualified_table(l)
  local level = op == "truncate" and "FOR EACH STATEMENT" or "FOR EACH ROW"
  local sql = table.concat({
    "CREATE OR REPLACE FUNCTION " .. qfn .. "() RETURNS trigger LANGUAGE plpgsql " .. FUNC_SETTINGS ..
      " AS " .. self:literal(self:function_body(l, op)),
    "DROP TRIGGER IF EXISTS " .. self:ident(trig) .. " ON " .. tbl,
    "CREATE TRIGGER " .. self:ident(trig) .. " AFTER " .. OP_LETTER[op] .. " ON " .. tbl ..
      " " .. level .. " EXECUTE FUNCTION " .. qfn .. "()",
  }, ";\n")
  local ok, err = self:exec(sql)
  if not ok then
    return fail(string.format("cannot create the %s trigger on %s: %s", op, l.table_name, err),
      "the role needs to own the table or hold the TRIGGER privilege on it")
  end
  log.debug(string.format("trigger %s created on %s", trig, l.table_name))
  return true
end

function Driver:drop_trigger(l, op)
  local trig, fn = self:names(l, op)
  local sql = "DROP TRIGGER IF EXISTS " .. self:ident(trig) .. " ON " .. self:qualified_table(l) ..
    ";\nDROP FUNCTION IF EXISTS " .. self:ident(self.schema) .. "." .. self:ident(fn) .. "()"
  local ok, err = self:exec(sql)
  if not ok then return fail(string.format("cannot drop the %s trigger on %s: %s", op, l.table_name, err)) end
  log.debug(string.format("trigger %s dropped from %s", trig, l.table_name))
  return true
end

-- Makes the database's triggers match what the listener's callbacks want.
function Driver:sync(l)
  if not self.listening then return true end   -- reconnecting: installed on reconnect
  local have = self.installed[l.id] or {}
  self.installed[l.id] = have
  local want = needed_ops(l)
  for _, op in ipairs({ "insert", "update", "delete", "truncate" }) do
    if want[op] and not have[op] then
      local ok, err = self:create_trigger(l, op)
      if not ok then return nil, err end
      have[op] = true
    elseif have[op] and not want[op] then
      local ok, err = self:drop_trigger(l, op)
      if not ok then return nil, err end
      have[op] = nil
    end
  end
  return true
end

function Driver:install(fresh)
  local ok, err = self:remove_leftovers()
  if not ok then return nil, err end
  ok, err = self:install_schema(fresh)
  if not ok then return nil, err end
  self.installed = {}
  for _, l in ipairs(self.client.listeners) do
    ok, err = self:sync(l)
    if not ok then return nil, err end
  end
  return true
end

function Driver:start()
  local ok, err = self:install(true)
  if not ok then
    self:exec("DROP SCHEMA IF EXISTS " .. self:ident(self.schema) .. " CASCADE")
    return nil, err
  end
  log.debug(string.format("trigger driver listening on channel %s", self.schema))
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

-- Decodes and delivers one payload; returns false when the client must stop.
function Driver:handle(payload)
  local client = self.client
  client.counters.bytes = client.counters.bytes + #payload
  local op, seq, lid, xid, new, old = core.decode_payload(payload, self.layouts)
  if op == "R" then
    local rows, err = self:exec("DELETE FROM " .. self:ident(self.schema) .. ".overflow WHERE id = $1 RETURNING payload", seq)
    if not rows then return nil, "cannot fetch a stored-aside row: " .. err end
    if #rows == 0 then
      log.warn(string.format("row stored aside (#%d) is gone; one event lost", seq))
      return true
    end
    self.overflow_fetches = self.overflow_fetches + 1
    return self:handle(rows[1].payload)
  end
  if not op then
    log.warn("ignoring a malformed notification: " .. tostring(seq))
    return true
  end
  local l = client.by_id[lid]
  if not l then return true end   -- a listener removed while its rows were in flight
  return client:_deliver(l, { op = OP_NAME[op], table = l.table_name, new = new, old = old, xid = xid })
end

function Driver:step()
  if not self.listening then
    if self.retry_at and core.now() >= self.retry_at then self:reconnect() end
    return true
  end
  local conn = self:conn()
  local ok, err = conn:consume()
  self.client:_log_notices()
  if not ok then
    lost(self, err)
    return true
  end
  -- Layouts by listener id, rebuilt only when listeners change.
  if not self.layouts or self.layout_count ~= #self.client.listeners then
    self.layouts = {}
    for _, l in ipairs(self.client.listeners) do self.layouts[l.id] = l.layout end
    self.layout_count = #self.client.listeners
  end
  while true do
    local _, payload = conn:notify()
    if not payload then break end
    self.notifications = self.notifications + 1
    local cont, herr = self:handle(payload)
    if cont == nil then return nil, herr end
    if not cont then return false end
  end
  if not conn:ok() then lost(self, "connection closed") end
  return true
end

function Driver:stop()
  local ok, err = true, nil
  if self.listening then
    -- Deliver what has already arrived before the triggers go (not after a failure:
    -- on_error = "stop" means no further callbacks).
    local sok = self.client.failure and true or self:step()
    if sok == nil then log.warn("events received during stop could not be delivered") end
    local S = self:ident(self.schema)
    local r, e = self:exec("UNLISTEN *; DROP SCHEMA IF EXISTS " .. S .. " CASCADE; SELECT pg_advisory_unlock(" ..
      self:lock_sql(self.schema) .. ")")
    if not r then ok, err = nil, "cannot remove schema " .. self.schema .. ": " .. e end
  end
  self.listening = false
  return ok, err
end

return M
