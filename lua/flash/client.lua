-- flash.client: a client (flash.client): its query connection, its listeners and driver,
-- the delivery of events to callbacks under the on_error policy, manual acknowledgements,
-- its stats, and its part of a graceful stop.
local core = require "flash.core"
local log = require "flash.log"
local ack = require "flash.ack"
local args = require "flash.args"
local drivers = require "flash.driver"
local listener = require "flash.listener"
local loop = require "flash.loop"

local argerror = args.argerror
local traceback = loop.traceback
local M = {}

-- A monotonic clock cheap enough to time every callback: through the FFI when LuaJIT has
-- it (no Lua/C boundary), else the C core's.
local clock = core.now
do
  local ok, ffi = pcall(require, "ffi")
  if ok then
    local defined = pcall(ffi.cdef, [[
      typedef struct { long tv_sec; long tv_nsec; } flash_timespec;
      int clock_gettime(int clk, flash_timespec *ts);
    ]])
    if defined then
      local ts = ffi.new("flash_timespec")
      local C = ffi.C
      clock = function()
        C.clock_gettime(1, ts)   -- CLOCK_MONOTONIC
        return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
      end
    end
  end
end

local function env(name)
  local v = os.getenv(name)
  if v ~= "" then return v end
end

local function default_dsn(lp)
  return lp.defaults.dsn or env("FLASH_DSN") or env("DATABASE_URL") or ""
end

local Client = {}
Client.__index = Client

-- client.new(lp, opts): a client of loop `lp` (flash.client calls it in a tail call, so
-- that a bad argument is reported at the script's line).
function M.new(lp, opts, query_only)
  local fname = query_only and "connect" or "client"
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then
    -- Level 2: flash.client tail-calls this, so the script's line is the caller's.
    argerror(1, fname, string.format("table of options expected, got %s%s", type(opts),
      type(opts) == "string" and not query_only and
        ": a DSN goes in flash.client{ dsn = \"...\" } (flash.connect(dsn) takes one alone)" or ""), 2)
  end
  -- Every option any driver declares (flash.driver): one script can switch drivers by
  -- changing one word; each value is checked by the spec its driver gives.
  local known = drivers.options()
  for k, v in pairs(opts) do
    local o = known[k]
    if not o then
      argerror(1, fname, args.unknown_option(k, known))
    end
    local want = type(o.spec) == "table" and o.spec.type or o.spec
    if want ~= true and type(v) ~= want then
      argerror(1, fname, string.format("option '%s': %s expected, got %s", k, want, type(v)))
    end
  end
  for k, v in pairs(opts) do
    local spec = known[k].spec
    local bad = type(spec) == "table" and spec.check and spec.check(v, opts)
    if bad then argerror(1, fname, string.format("option '%s': %s", k, bad)) end
  end
  local on_error = opts.on_error or "stop"
  if on_error ~= "stop" and on_error ~= "log" and type(on_error) ~= "function" then
    argerror(1, fname, "option 'on_error': \"stop\", \"log\" or a function expected, got " .. tostring(on_error))
  end
  -- flash.connect: no driver at all, so nothing can be created in the database.
  local driver_name = query_only and "none" or (opts.driver or lp.defaults.driver or drivers.DEFAULT)
  if not query_only and not drivers.exists(driver_name) then
    argerror(1, fname, string.format("unknown driver '%s' (expected %s)", driver_name, drivers.list()))
  end
  local mu = opts.max_unacked
  local driver_mod, derr
  if query_only then
    if opts.ack == "manual" or opts.workers then
      argerror(1, fname, string.format("option '%s' is for a client that listens (use flash.client)",
        opts.workers and "workers" or "ack"))
    end
    driver_mod = { new = function() return {} end }
  else
    driver_mod, derr = drivers.load(driver_name)
    if not driver_mod then error(derr, 0) end
  end
  -- Acknowledging later only means something where an unacknowledged event is delivered
  -- again: a persistent slot, a trigger driver's persistent schema (its rows are deleted
  -- once acknowledged), a Redis consumer group (KEEPS_UNACKED). Otherwise a stop drops
  -- what was not handled (docs/delivery.md, "Acknowledgements").
  if opts.ack == "manual" and opts.persistent ~= true and not driver_mod.KEEPS_UNACKED then
    argerror(1, fname, "option 'ack': \"manual\" needs persistent = true (only a persistent slot or " ..
      "capture schema delivers an unacknowledged event again; got driver = \"" .. driver_name .. "\", persistent = " ..
      tostring(opts.persistent == true) .. ")")
  end
  local dsn = opts.dsn or default_dsn(lp)
  local conn, err = core.connect(dsn)
  if not conn then
    if dsn == "" then
      err = tostring(err):gsub("%s+$", "") .. "\n(no DSN was given: use flashlua -d DSN, set FLASH_DSN or DATABASE_URL, " ..
        "or pass flash.client{ dsn = ... }; libpq's defaults and PG* variables were tried)"
    end
    return lp:failed("flash." .. fname, err)
  end
  local number = lp:number()
  local who = conn:exec("SELECT pg_catalog.current_database()::text AS db, current_user::text AS role", 0)
  local db = who and who[1].db or "?"
  local self = setmetatable({
    loop = lp,
    opts = opts,
    conn = conn,
    database = db,
    role = who and who[1].role or "?",
    label = (opts.name or string.format("client %d %s", number, driver_name)) .. " db=" .. db,
    driver_name = driver_name,
    query_only = query_only or nil,
    on_error = on_error,
    flags = opts.numeric == "number" and core.NUMERIC_AS_NUMBER or 0,
    listeners = {},
    by_id = {},
    next_id = 1,
    started = false,
    closed = false,
    failure = nil,
    counters = { events = 0, bytes = 0, handler_seconds = 0, dropped = 0, errors = 0, reconnects = 0 },
    stop_hooks = {},
  }, Client)
  -- Parallel handler states (flash.workers): an event is handled when its state is done,
  -- so every client with workers tracks acknowledgements.
  if opts.ack == "manual" or opts.workers then
    self.acks = ack.new(mu or 10000, function(pos, all) return self.driver:confirm(pos, all) end)
    self.acks.bare = opts.ack ~= "manual"
  end
  self.driver = driver_mod.new(self)
  if opts.workers then
    local pool, perr = require("flash.workers").new(self, opts)
    if not pool then
      self.conn:close()
      return lp:failed("flash.client", perr)
    end
    self.pool = pool
  end
  lp:add(self)
  return self
end

-- The DSN this client connects with (its option, else the defaults of default_dsn):
-- drivers open their further connections with it.
function Client:dsn()
  return self.opts.dsn or default_dsn(self.loop)
end

-- Server notices go through flash.log: warnings as warnings, the rest at debug.
function Client:_log_notices()
  for _, msg in ipairs(self.conn:notices()) do
    if msg:find("^WARNING") then log.warn("postgres: " .. msg) else log.debug("postgres: " .. msg) end
  end
end

-- client:query(sql, ...) -> rows | nil, err, sqlstate
-- A parameter travels as text: a table has no text form the server would take for every
-- type, and a string is cut at its first NUL byte (PostgreSQL's text parameters are C
-- strings), which turned a bytea value read from an event ("\0\255") into an empty one.
local function check_params(...)
  for i = 1, select("#", ...) do
    local v = select(i, ...)
    local t = type(v)
    if t == "table" then
      argerror(i + 1, "query", string.format("$%d is a table, which a query parameter cannot be: for a json, jsonb or " ..
        "array value read from an event, send flash.json.encode(v) as $%d::jsonb (a whole row: " ..
        "jsonb_populate_record(NULL::tbl, $%d::jsonb), which makes arrays of JSON arrays)", i, i, i), 3)
    elseif t == "string" and v:find("\0", 1, true) then
      argerror(i + 1, "query", string.format("$%d holds a NUL byte, which a text parameter cannot carry (PostgreSQL " ..
        "would get it cut there): for a bytea value, send it as hex, \"\\x\" followed by two hex digits a byte " ..
        "(v:gsub(\".\", function(c) return (\"%%02x\"):format(c:byte()) end))", i), 3)
    end
  end
end

function Client:query(sql, ...)
  if type(sql) ~= "string" then argerror(1, "query", "string expected, got " .. type(sql)) end
  check_params(...)
  if self.closed then return nil, "client is stopped" end
  local rows, n, sqlstate = self.conn:exec(sql, self.flags, ...)
  self:_log_notices()
  return rows, n, sqlstate
end

-- client:listen(opts) -> listener | nil, err (flash.listener; a tail call, so that a bad
-- argument is reported at the script's line).
function Client:listen(opts)
  if getmetatable(self) ~= Client then
    error("bad argument #1 to 'listen' (client expected, got " .. type(self) ..
      ": call it with a colon, client:listen{ table = ... })", 2)
  end
  if self.query_only then
    error("client:listen: this client was made by flash.connect and only runs queries; " ..
      "use flash.client{...} to listen to a table", 2)
  end
  return listener.new(self, opts)
end

-- A listener that passed the driver's check joins the client: l | nil, err. The first
-- listener of a client that ran only queries so far starts capture.
function Client:_add(l)
  self.next_id = self.next_id + 1
  self.listeners[#self.listeners + 1] = l
  self.by_id[l.id] = l
  if self.started and not self.capturing then
    local sok, serr = self:_capture()
    if not sok then
      table.remove(self.listeners)
      self.by_id[l.id] = nil
      return self.loop:failed("client:listen", serr)
    end
  end
  return l
end

-- Called when a listener's set of wanted operations may have changed.
function Client:_changed(l)
  if self.capturing and not self.closed then
    local ok, err = self.driver:sync(l)
    if not ok then error(err, 3) end
  end
end

function Client:start()
  if self.closed then return nil, "client is stopped" end
  if self.started then return true end
  -- A client without listeners only runs queries: it creates nothing in the database
  -- (no schema, slot or publication) until its first listen.
  local ok, err = true, nil
  if #self.listeners > 0 then ok, err = self:_capture() end
  if not ok then return nil, err end
  local outer = log.within(self.label)
  if #self.listeners == 0 then
    log.info(string.format("connected to %s as %s, driver %s, no listener: queries only, nothing created",
      self.database, self.role, self.driver_name))
  end
  for _, w in ipairs(require("flash.slots").idle_warnings(self.conn, self.loop.warned_slots)) do log.warn(w) end
  for _, w in ipairs(require("flash.driver.capture").idle_schema_warnings(self, self.loop.warned_slots)) do log.warn(w) end
  log.within(outer)
  self.started = true
  self.started_at = core.now()
  return true
end

-- Starts the driver's capture (triggers, slot, publication): at start, or at the first
-- listen of a client started without listeners.
function Client:_capture()
  local outer = log.within(self.label)
  local ok, err = self.driver:start()
  if ok then
    self.capturing = true
    local names = {}
    for i, l in ipairs(self.listeners) do names[i] = l.table_name end
    log.info(string.format("connected to %s as %s, driver %s, listening on %s", self.database, self.role,
      self.driver_name, table.concat(names, ", ")))
  end
  log.within(outer)
  return ok, err
end

-- The line a stop ends with: what the run did and where it stopped.
function Client:_summary()
  local s = self:stats()
  local pos = s.last_lsn and (", last position " .. s.last_lsn) or ""
  log.info(string.format("stopped after %.1f s: %d events, %d errors, %.3f s in callbacks%s", s.uptime,
    s.events, s.errors, s.handler_seconds, pos))
end

function Client:fd()
  if self.closed then return nil end
  if not self.capturing then return {} end
  return self.driver:fds()
end

-- A Lua `where` runs like a callback: protected, under the client's on_error policy. A
-- row whose test raised does not match; with on_error = "stop" the client stops.
function Client:_protect_where(fn, table_name)
  return function(row)
    local ok, res = xpcall(fn, traceback, row)
    if ok then return res end
    self:_failed(res, { op = "where", table = table_name, new = row })
    return false

  end
end
-- Runs one callback protected, applying the client's on_error policy. Returns false
-- when the client must stop.
-- The hot path: no closure in it (an upvalue to close would keep LuaJIT from compiling it).
function Client:_call(fn, ev)
  local t0 = clock()
  local ok, err = xpcall(fn, traceback, ev)
  local counters = self.counters
  local dt = clock() - t0
  counters.handler_seconds = counters.handler_seconds + dt
  local hist = self.handler_hist   -- set while flash.metrics serves
  if hist then hist:observe(dt) end
  if ok then return true end
  return self:_failed(err, ev)
end

-- A callback that fails while the client is stopping (the events a stop still delivers)
-- has no "go on" after it: whatever the policy, it is logged and the stop reports it
-- (client:stop() returns nil, err; the host exits 1).
function Client:_failed(err, ev)
  self.counters.errors = self.counters.errors + 1
  local policy = self.on_error
  local go_on = false
  if policy == "log" then
    log.error(string.format("callback for %s on %s failed%s: %s", ev.op, ev.table,
      self.stopping and " while stopping" or "", err))
    go_on = true
  elseif type(policy) == "function" then
    local ok2, err2 = xpcall(policy, traceback, err, ev)
    if ok2 then go_on = true else err = "on_error handler failed: " .. tostring(err2) end
  end
  if self.stopping then
    local what = string.format("callback for %s on %s failed while stopping", ev.op, ev.table)
    if policy ~= "log" or not go_on then log.error(what .. ": " .. tostring(err)) end
    self.stop_failure = self.stop_failure or (what .. " (logged above)")
  end
  if go_on then
    -- The policy said the event is dealt with: under manual acks too.
    if self.acks then self.acks:ack(ev) end
    return true
  end
  self.failure = string.format("callback for %s on %s failed: %s", ev.op, ev.table, err)
  return false
end

-- Delivers one event of listener l to the callbacks that want it (conditions, a Lua
-- `where` and their soft-delete transitions were applied by flash.where). Returns false
-- to stop.
function Client:_deliver(l, ev)
  if self.failure then return false end   -- on_error = "stop": nothing after the failure
  local cbs = l.callbacks[ev.op]
  if #cbs == 0 then
    self.counters.dropped = self.counters.dropped + 1
    return true
  end
  self.counters.events = self.counters.events + 1
  local per = l.delivered
  per[ev.op] = per[ev.op] + 1
  if ev.commit_time then self.last_commit_time = ev.commit_time end
  if self.acks then self.acks:track(ev) end
  local ok = true
  if #cbs == 1 then
    ok = self:_call(cbs[1].fn, ev)
  else
    -- Copy: a callback may call off() while we iterate.
    local snapshot = { unpack(cbs) }
    for _, e in ipairs(snapshot) do
      if not self:_call(e.fn, ev) then ok = false break end
    end
  end
  if ok and self.pool then self.pool:delivered(ev) end   -- auto acks of what no worker state holds
  return ok
end

-- client:poll([timeout_s]) -> true | nil, err : one loop step.
function Client:poll(timeout)
  if self.failure then return nil, self.failure end
  if self.closed then return nil, "client is stopped" end
  if not self.started then
    local ok, err = self:start()
    if not ok then return nil, err end
  end
  if not self.capturing then
    if timeout and timeout > 0 then core.sleep(timeout) end
    return true
  end
  local fds = self.driver:fds()
  local wait = timeout or 0
  local due = self.driver:next_deadline()
  if due then wait = math.max(0, math.min(wait, due - core.now())) end
  if #fds > 0 then core.poll(fds, wait) elseif wait > 0 then core.sleep(wait) end
  local outer = log.within(self.label)
  local ok, err = self.driver:step()
  log.within(outer)
  self:_note()
  if not ok then
    self.failure = self.failure or err
    return nil, self.failure
  end
  if self.failure then return nil, self.failure end
  return true
end

-- Manual acknowledgements (ack = "manual"): client:ack(ev) acknowledges one event,
-- client:ack_through(ev) that one and every event delivered before it. They return true,
-- or false for an event that is not outstanding (acknowledged already, or delivered before
-- a reconnect that delivers it again).
local function check_ack(self, ev, fname)
  if not self.acks or self.opts.ack ~= "manual" then
    error(string.format("'%s' needs flash.client{ ack = \"manual\" } (this client acknowledges automatically)", fname), 3)
  end
  if type(ev) ~= "table" then argerror(1, fname, "event expected, got " .. type(ev), 3) end
end

function Client:ack(ev)
  check_ack(self, ev, "ack")
  return self.acks:ack(ev)
end

function Client:ack_through(ev)
  check_ack(self, ev, "ack_through")
  return self.acks:ack_through(ev)
end

function Client:on_stop(fn) return loop.add_hook(self.stop_hooks, fn, "on_stop") end

-- The first half of a graceful stop: deliver what the stop still delivers (the rest of an
-- open transaction; what the triggers captured), so stop hooks see every event.
function Client:_quiesce()
  if self.quiesced or self.closed then return end
  self.quiesced = true
  self.stopping = true
  if self.capturing and self.driver.quiesce then
    local outer = log.within(self.label)
    self.driver:quiesce()
    log.within(outer)
  end
  if self.pool then self.pool:drain(self.opts.shutdown_timeout) end   -- the worker states finish theirs
end

function Client:stop()
  if self.closed then return true end
  local ok, err = true, nil
  self:_quiesce()
  local confirm = not self.no_confirm
  if self.started and not self.failure and #self.stop_hooks > 0 then
    local hok, herr = loop.run_hooks(self.stop_hooks, "on_stop hook", self)
    if not hok then
      confirm = false
      self.stop_failure = self.stop_failure or herr
    end
  end
  if self.pool then self.pool:close() end
  local outer = log.within(self.label)
  if self.capturing then ok, err = self.driver:stop(confirm) end
  if self.started then self:_summary() end
  log.within(outer)
  self.closed = true
  self.conn:close()
  self.loop:remove(self)
  if self.stop_failure then
    if not ok then log.warn("stopping client: " .. tostring(err)) end
    self.loop.stop_failure = self.loop.stop_failure or self.stop_failure
    return nil, self.stop_failure
  end
  if not ok then return nil, err end
  return true
end

function Client:stats()
  local c = self.counters
  local s = {
    driver = self.driver_name,
    events = c.events, bytes = c.bytes, dropped = c.dropped, errors = c.errors,
    handler_seconds = c.handler_seconds, reconnects = c.reconnects,
    listeners = #self.listeners,
    last_event_time = self:_last_event_time(),
    uptime = self.started_at and (core.now() - self.started_at) or 0,
    ack = self.opts.ack == "manual" and "manual" or "auto",
  }
  if self.pool then self.pool:stats(s) end
  if self.acks then s.unacked = self.acks.outstanding end
  if self.driver.stats then self.driver:stats(s) end
  return s
end

-- The wall-clock time of the last delivered event, noted once per loop step rather than
-- once per event (a clock call per event costs more than the event).
function Client:_last_event_time()
  self:_note()
  return self.last_event_time
end

function Client:_note()
  local n = self.counters.events
  if n ~= self.noted_events then
    self.noted_events = n
    self.last_event_time = core.time()
  end
end

function Client:run(opts)
  return self.loop:run({ self }, opts)
end

return M
