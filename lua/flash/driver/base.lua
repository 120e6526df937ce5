-- flash.driver.base: what every driver shares (docs/architecture.md, "The driver contract").
--
-- A driver is a class made with base.class(base.Driver): it inherits the connection
-- helpers (ident, literal, exec on the client's query connection), the listen-time check
-- of conditions (test-planned in SQL for PostgreSQL's own error, then prepared for
-- evaluation on arrival by flash.where: one home for conditions), the advisory-lock
-- naming that marks what a running instance holds, the sweep of what gone instances left,
-- and the retry schedule of reconnects (base.backoff).
local core = require "flash.core"
local log = require "flash.log"
local where = require "flash.where"

local M = {}

local LOCK_CLASS = "flashlua"            -- advisory lock namespace: hashtext('flashlua')
local NAME_MAX = 63                      -- NAMEDATALEN - 1 bytes
M.RETRY_FIRST, M.RETRY_MAX = 0.1, 5      -- seconds: a reconnect's first and longest wait

local Driver = {}
Driver.__index = Driver
M.Driver = Driver

-- A driver class that inherits from `parent`.
function M.class(parent)
  local c = setmetatable({}, { __index = parent })
  c.__index = c
  return c
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
-- column's type, so 10, "10" and 10.0 compare as the column's own values.
function Driver:value_literal(v)
  return self:literal(where.literal_text(v))
end

-- SQL for the listener's conditions on row `rec` (flash.where.sql); nil without any.
function Driver:cond_sql(l, rec)
  return where.sql(l.conds, rec, self)
end

function Driver:qualified_table(l)
  return self:ident(l.table.schema) .. "." .. self:ident(l.table.name)
end

-- Conditions are prepared for evaluation on arrival (each value cast to its column's base
-- type: the server's error for a bad one), exactly as under wal_logical, then test-planned.
-- In that order: preparing refuses the types it cannot compare first (an array of a domain,
-- a composite), whose literals the test plan would read by the domain's input, running its
-- CHECK (the domain owner's expression) with our rights.
function Driver:check(l)
  local ok, err = where.prepare(l, self)
  if not ok then return nil, err end
  local cond = self:cond_sql(l, "t")
  -- Nor is a table whose planning would run code of another role's as us: the immutable
  -- calls with constant arguments of its index expressions, partition key, ... (flash.catalog
  -- foreign_code; a table owner's `CREATE INDEX ON t ((id + f()))` ran f() as flashlua at
  -- each listen with a `where`). The values were read by prepare all the same.
  if cond then
    local found, ferr = require("flash.catalog").foreign_code(self:conn(), { l.table.oid },
      { "key", "index", "statistics", "check" })
    if found == nil then return nil, ferr end
    if found then
      log.debug(string.format("the conditions of %s are not test-planned: %s", l.table_name, found))
      cond = nil
    end
  end
  if cond then
    -- Planned, not run: under row_security = off, so that no policy expression of the
    -- table's owner is planned (an immutable one is run by the planner) with our rights.
    -- A table whose policies apply to us is not test-planned (prepare read the values).
    ok, err = self:exec("SELECT pg_catalog.set_config('row_security', 'off', true); SELECT 1 FROM " ..
      self:qualified_table(l) .. " AS t WHERE " .. cond .. " LIMIT 0")
    if not ok and not tostring(err):find("row-level security", 1, true) then
      -- The server's message without the LINE/caret lines: they quote flashlua's own test
      -- query, not anything the user wrote.
      return fail("invalid 'where' for " .. l.table_name .. ": " .. (tostring(err):gsub("\nLINE %d+:.*$", "")))
    end
  end
  l.matcher = where.matcher(l)
  l.passthrough = where.passthrough(l)
  return true
end

-- Listener `l`'s table is now called schema.name (a rename while listening): ev.table
-- follows. Returns true when the name changed.
function M.rename(l, schema, name)
  if l.table.schema == schema and l.table.name == name then return false end
  l.table.schema, l.table.name = schema, name
  l.table.display = schema .. "." .. name
  l.table_name = l.table.display
  return true
end

-- Which operations a listener needs captured (flash.where.needed_ops).
M.needed_ops = where.needed_ops

-- The session advisory lock that marks `key` (a schema, a publication) as held by a running
-- instance: two int4 keys, our class and the name, so no other application's locks collide.
-- A driver names its locks' keys (lock_key: the name as it is here).
function Driver.lock_key(_, key) return key end

function Driver:lock_sql(key)
  return "pg_catalog.hashtext(" .. self:literal(LOCK_CLASS) .. "), pg_catalog.hashtext(" ..
    self:literal(self:lock_key(key)) .. ")"
end

-- Who holds the session advisory lock of `key` (self:lock_sql), as a parenthesis for an
-- "in use" error: any role may take such a lock, so the holder is named with what ends it
-- if it is not a flashlua; "" when none is seen (released meanwhile).
function Driver:lock_holder(key)
  local rows = self:exec([[SELECT a.pid, a.usename::text AS role, a.application_name::text AS app
    FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid OPERATOR(pg_catalog.=) l.pid
    WHERE l.locktype OPERATOR(pg_catalog.=) 'advisory' AND l.granted
      AND l.classid OPERATOR(pg_catalog.=) pg_catalog.hashtext($1)::pg_catalog.oid
      AND l.objid OPERATOR(pg_catalog.=) pg_catalog.hashtext($2)::pg_catalog.oid
      AND l.objsubid OPERATOR(pg_catalog.=) 2::pg_catalog.int2
      AND l.pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid()
    ORDER BY a.pid LIMIT 1]], LOCK_CLASS, self:lock_key(key))
  local r = rows and rows[1]
  if not r then return "" end
  return string.format(" (its lock is held by backend %d, role %s, application '%s'; if that is not a flashlua, " ..
    "SELECT pg_catalog.pg_terminate_backend(%d) ends it)", r.pid, r.role, r.app, r.pid)
end

-- Drops the objects named in rows[i].name (but `keep`) whose owner's session advisory
-- lock (self:lock_sql) is free, and the lock named `also(name)` too when given: the
-- flashlua instance that made them is gone. `drop(name)` removes one: true | nil, err.
function Driver:sweep_orphans(rows, keep, what, drop, also)
  for _, r in ipairs(rows) do
    if r.name ~= keep then
      local locks = { r.name, also and also(r.name) or nil }
      local held = {}
      for _, lock in ipairs(locks) do
        local got = self:exec("SELECT pg_catalog.pg_try_advisory_lock(" .. self:lock_sql(lock) .. ") AS ok")
        if got and got[1].ok then held[#held + 1] = lock end
      end
      if #held == #locks then
        log.info(string.format("removing %s %s left by a flashlua instance that is gone", what, r.name))
        local ok, derr = drop(r.name)
        if not ok then log.warn("could not remove " .. r.name .. ": " .. tostring(derr)) end
      end
      for _, lock in ipairs(held) do self:exec("SELECT pg_catalog.pg_advisory_unlock(" .. self:lock_sql(lock) .. ")") end
    end
  end
end

-- Manual acks: max_unacked events are outstanding, so nothing more is read until the
-- script acknowledges some (the server keeps the rest: the slot, the capture table).
function Driver:paused()
  local acks = self.client.acks
  return acks ~= nil and acks:full()
end

-- Why the driver is not streaming now (a connection lost and not yet back), or nil: what
-- /healthz reports (flash.metrics). Every driver keeps retry_at (and wal_logical
-- conn_retry_at for its query connection) set while it reconnects.
function Driver:health()
  if self.retry_at or self.conn_retry_at then
    return "reconnecting" .. (self.lost_at and os.date("! since %Y-%m-%dT%H:%M:%SZ", math.floor(self.lost_at)) or "")
  end
  return nil
end

-- The retry schedule of one connection: 0.1 s, doubling, at most 5 s.
-- b = base.backoff(); b:schedule(err, what) -> the core.now() time of the next try (and a
-- line saying why and when); b:reset() after a success. The third failure of a series
-- (about 0.7 s of failing: one failed try is common and says nothing), and then one every
-- RETRY_WARN_EVERY seconds, is a warning: a reconnect that keeps failing
-- (max_connections or max_wal_senders reached, a role that may no longer log in, the
-- server down) was said only at debug level, so after "reconnecting" nothing told why
-- nothing arrived.
M.RETRY_WARN_EVERY = 30
local Backoff = {}
Backoff.__index = Backoff
function M.backoff()
  return setmetatable({ wait = M.RETRY_FIRST, failures = 0 }, Backoff)
end
function Backoff:next()
  local w = self.wait
  self.wait = math.min(w * 2, M.RETRY_MAX)
  return w
end
function Backoff:reset()
  self.wait = M.RETRY_FIRST
  self.failures, self.warn_at = 0, nil
end
function Backoff:schedule(err, what)
  local w = self:next()
  self.failures = (self.failures or 0) + 1
  local now = core.now()
  local line = string.format("%s failed (%s); next try in %.1fs", what, (tostring(err):gsub("%s+$", "")), w)
  if self.failures >= 3 and (not self.warn_at or now >= self.warn_at) then
    self.warn_at = now + M.RETRY_WARN_EVERY
    log.warn(string.format("%s (%d failed tries so far)", line, self.failures))
  else
    log.debug(line)
  end
  return now + w
end

return M
