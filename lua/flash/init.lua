-- flash: the public Lua API (API.md): clients, listeners, callbacks, the loop and timers.
-- The C core (flash.core) owns connections and value decoding; drivers own capture.
local core = require "flash.core"
local log = require "flash.log"
local json = require "flash.json"
local ack = require "flash.ack"

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

local flash = {
  null = core.null,
  unchanged = core.unchanged,
  version = "0.1.0",
  log = log,
  json = json,
  -- Markers on decoded values (see flash.json): arrays, JSON objects, exact JSON numbers.
  array_mt = core.array_mt,
  object_mt = core.object_mt,
  number_mt = core.number_mt,
}

-- "read": a row delivered by listener:backfill (flash.backfill), not a change.
local OPS = { insert = true, update = true, delete = true, truncate = true, read = true }
local OP_ORDER = { "insert", "update", "delete", "truncate" }
local drivers = require "flash.driver"
local LISTEN_OPTS = { table = "string", fields = "table", where = true, primary_key = "table" }
local WHERE_OPS = {
  ["="] = "=", ["=="] = "=", ["<>"] = "<>", ["!="] = "<>", ["~="] = "<>",
  ["<"] = "<", ["<="] = "<=", [">"] = ">", [">="] = ">=",
  ["is null"] = "is null", ["is not null"] = "is not null", ["in"] = "in",
}

-- flash.sink.<name>{...}: a sink (lua/flash/sink/), e.g. flash.sink.redis{ url = ... }.
flash.sink = setmetatable({}, { __index = function(_, name)
  return require("flash.sink." .. name).new
end })

-- Defaults the host sets from its command line (-d, --driver, --sandbox).
flash.defaults = {}

local clients = {}        -- open clients, in creation order
local client_seq = 0      -- numbers clients in log lines
local timers = {}         -- { due=, every=, fn=, cancelled= }
local stop_hooks = {}     -- flash.on_stop: { fn=, cancelled= }
local state = { stop = false, running = false }

local function argerror(n, fname, msg, level)
  error(string.format("bad argument #%d to '%s' (%s)", n, fname, msg), (level or 2) + 1)
end

local function checktype(v, want, n, fname, what)
  if type(v) ~= want then
    argerror(n, fname, string.format("%s%s expected, got %s", what and (what .. ": ") or "", want, type(v)), 2)
  end
end

local function env(name)
  local v = os.getenv(name)
  if v ~= "" then return v end
end

local function default_dsn()
  return flash.defaults.dsn or env("FLASH_DSN") or env("DATABASE_URL") or ""
end

-- A failure returned as nil, err, kept so that the host can name it when the script goes
-- on with the nil (flash._last_failure: "flash.client: cannot connect ...").
local function failed(what, err)
  flash._last_failure = what .. ": " .. tostring(err)
  return nil, err
end

---------------------------------------------------------------------------------------
-- Listener

local Listener = {}
Listener.__index = Listener

local function normalize_ops(ops, fname)
  local list = {}
  if type(ops) == "string" then
    ops = { ops }
  elseif type(ops) ~= "table" then
    argerror(1, fname, "operation name or list of names expected, got " .. type(ops), 3)
  end
  for _, op in ipairs(ops) do
    if op == "all" then
      for _, o in ipairs(OP_ORDER) do list[#list + 1] = o end
      list[#list + 1] = "read"
    elseif OPS[op] then
      list[#list + 1] = op
    else
      argerror(1, fname, string.format("unknown operation '%s' (expected insert, update, delete, truncate, read or all)", tostring(op)), 3)
    end
  end
  if #list == 0 then argerror(1, fname, "no operation given", 3) end
  return list
end

-- listener:on(ops, fn) -> off()
function Listener:on(ops, fn)
  local list = normalize_ops(ops, "on")
  -- A handler's name in the worker states' file (flash.client{ workers = N, handlers = }).
  if type(fn) == "string" and self.client.pool then fn = self.client.pool:callback(fn, self) end
  -- A callable object (a sink: flash.sink.redis) is a callback too.
  local mt = type(fn) == "table" and getmetatable(fn)
  if mt and type(mt.__call) == "function" then
    local obj = fn
    fn = function(ev) return obj(ev) end
  end
  if type(fn) ~= "function" then
    argerror(2, "on", "function expected, got " .. type(fn), 2)
  end
  local entries = {}
  for _, op in ipairs(list) do
    local e = { fn = fn }
    local cbs = self.callbacks[op]
    cbs[#cbs + 1] = e
    entries[#entries + 1] = { op = op, e = e }
  end
  self.client:_changed(self)
  local done = false
  return function()
    if done then return end
    done = true
    for _, it in ipairs(entries) do
      local cbs = self.callbacks[it.op]
      for i = #cbs, 1, -1 do
        if cbs[i] == it.e then table.remove(cbs, i) end
      end
    end
    self.client:_changed(self)
  end
end

-- listener:backfill([opts]): every existing row as an op = "read" event (flash.backfill).
function Listener:backfill(opts)
  return require("flash.backfill").start(self, opts)
end

-- The changes at least one callback wants ("read" is not a change: no driver captures it).
function Listener:wanted()
  local w = {}
  for _, op in ipairs(OP_ORDER) do
    if #self.callbacks[op] > 0 then w[op] = true end
  end
  return w
end

---------------------------------------------------------------------------------------
-- Client

local Client = {}
Client.__index = Client

function flash.client(opts)
  if opts == nil then opts = {} end
  checktype(opts, "table", 1, "client")
  -- Every option any driver declares (flash.driver): one script can switch drivers by
  -- changing one word; each value is checked by the spec its driver gives.
  local known = drivers.options()
  for k, v in pairs(opts) do
    local o = known[k]
    if not o then
      argerror(1, "client", string.format("unknown option '%s'", tostring(k)))
    end
    local want = type(o.spec) == "table" and o.spec.type or o.spec
    if want ~= true and type(v) ~= want then
      argerror(1, "client", string.format("option '%s': %s expected, got %s", k, want, type(v)))
    end
  end
  for k, v in pairs(opts) do
    local spec = known[k].spec
    local bad = type(spec) == "table" and spec.check and spec.check(v, opts)
    if bad then argerror(1, "client", string.format("option '%s': %s", k, bad)) end
  end
  local on_error = opts.on_error or "stop"
  if on_error ~= "stop" and on_error ~= "log" and type(on_error) ~= "function" then
    argerror(1, "client", "option 'on_error': \"stop\", \"log\" or a function expected, got " .. tostring(on_error))
  end
  local driver_name = opts.driver or flash.defaults.driver or drivers.DEFAULT
  if not drivers.exists(driver_name) then
    argerror(1, "client", string.format("unknown driver '%s' (expected %s)", driver_name, drivers.list()))
  end
  local mu = opts.max_unacked
  local driver_mod, derr = drivers.load(driver_name)
  if not driver_mod then error(derr, 0) end
  -- Acknowledging later only means something where an unacknowledged event is delivered
  -- again: a persistent slot, a trigger driver's persistent schema (its rows are deleted
  -- once acknowledged), a Redis consumer group (KEEPS_UNACKED). Otherwise a stop drops
  -- what was not handled (docs/delivery.md, "Acknowledgements").
  if opts.ack == "manual" and opts.persistent ~= true and not driver_mod.KEEPS_UNACKED then
    argerror(1, "client", "option 'ack': \"manual\" needs persistent = true (only a persistent slot or " ..
      "capture schema delivers an unacknowledged event again; got driver = \"" .. driver_name .. "\", persistent = " ..
      tostring(opts.persistent == true) .. ")")
  end
  local dsn = opts.dsn or default_dsn()
  local conn, err = core.connect(dsn)
  if not conn then
    if dsn == "" then
      err = tostring(err):gsub("%s+$", "") .. "\n(no DSN was given: use flashlua -d DSN, set FLASH_DSN or DATABASE_URL, " ..
        "or pass flash.client{ dsn = ... }; libpq's defaults and PG* variables were tried)"
    end
    return failed("flash.client", err)
  end
  client_seq = client_seq + 1
  local who = conn:exec("SELECT current_database()::text AS db, current_user::text AS role", 0)
  local db = who and who[1].db or "?"
  local self = setmetatable({
    opts = opts,
    conn = conn,
    database = db,
    role = who and who[1].role or "?",
    label = (opts.name or string.format("client %d %s", client_seq, driver_name)) .. " db=" .. db,
    driver_name = driver_name,
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
      conn:close()
      return failed("flash.client", perr)
    end
    self.pool = pool
  end
  clients[#clients + 1] = self
  return self
end

-- Server notices go through flash.log: warnings as warnings, the rest at debug.
-- The DSN this client connects with (its option, else the defaults of default_dsn):
-- drivers open their further connections with it.
function Client:dsn()
  return self.opts.dsn or default_dsn()
end

function Client:_log_notices()
  for _, msg in ipairs(self.conn:notices()) do
    if msg:find("^WARNING") then log.warn("postgres: " .. msg) else log.debug("postgres: " .. msg) end
  end
end

-- client:query(sql, ...) -> rows | nil, err, sqlstate
function Client:query(sql, ...)
  if type(sql) ~= "string" then argerror(1, "query", "string expected, got " .. type(sql)) end
  if self.closed then return nil, "client is stopped" end
  local rows, n, sqlstate = self.conn:exec(sql, self.flags, ...)
  self:_log_notices()
  return rows, n, sqlstate
end

-- The type a domain (over a domain ...) is based on; any other type itself.
local BASE_TYPE_SQL = [[(
      WITH RECURSIVE d(oid, typtype, base) AS (
        SELECT t.oid, t.typtype, t.typbasetype FROM pg_catalog.pg_type t WHERE t.oid = %s
        UNION ALL
        SELECT t.oid, t.typtype, t.typbasetype FROM pg_catalog.pg_type t JOIN d ON t.oid = d.base
        WHERE d.typtype = 'd')
      SELECT oid FROM d WHERE typtype <> 'd')]]

-- SQL for the live columns of the relations that `cond` (on pg_attribute a) selects, in
-- attnum order: rel, name, oid (the base type), typ (the declared type), elem (the base type
-- of array elements, or 0) and delim. Values are decoded by the base type of a column's
-- type and of its array elements: through domains over domains, domains over arrays and
-- arrays of domains alike. The trigger drivers' DDL function runs the same query.
function flash._columns_sql(cond)
  return string.format([[
    SELECT a.attrelid::bigint AS rel, a.attname::text AS name, bt.oid::bigint AS oid, a.atttypid::bigint AS typ,
           coalesce(et.oid, 0)::bigint AS elem, coalesce(et.typdelim::text, ',') AS delim
    FROM pg_catalog.pg_attribute a
    JOIN pg_catalog.pg_type bt ON bt.oid = %s
    LEFT JOIN pg_catalog.pg_type et ON bt.typcategory = 'A' AND et.oid = %s
    WHERE %s AND a.attnum > 0 AND NOT a.attisdropped
    ORDER BY a.attrelid, a.attnum]], BASE_TYPE_SQL:format("a.atttypid"), BASE_TYPE_SQL:format("bt.typelem"), cond)
end

-- Resolves "schema.table" (quoting as in SQL; a bare name means public).
function Client:_resolve_table(name)
  local rows, err = self.conn:exec("SELECT parse_ident($1) AS parts", 0, name)
  if not rows then return nil, string.format("invalid table name '%s': %s", name, err) end
  local parts = rows[1].parts
  if #parts == 1 then parts = { "public", parts[1] } end
  if #parts ~= 2 then
    return nil, string.format("invalid table name '%s': expected schema.table", name)
  end
  rows, err = self.conn:exec([[
    SELECT c.oid::bigint AS oid, c.relkind::text AS relkind
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = $1 AND c.relname = $2]], 0, parts[1], parts[2])
  if not rows then return nil, err end
  if #rows == 0 then
    local msg = string.format("table %s.%s does not exist", parts[1], parts[2])
    local near = self.conn:exec([[
      SELECT n.nspname::text AS schema FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      WHERE c.relname = $1 AND c.relkind IN ('r', 'p') ORDER BY 1]], 0, parts[2])
    if near and #near > 0 then
      local names = {}
      for i, r in ipairs(near) do names[i] = r.schema .. "." .. parts[2] end
      msg = msg .. " (did you mean " .. table.concat(names, " or ") .. "?)"
    end
    return nil, msg
  end
  local kind = rows[1].relkind
  if kind ~= "r" and kind ~= "p" then
    return nil, string.format("%s.%s is not a table (relkind %s)", parts[1], parts[2], kind)
  end
  -- Values are decoded by the base type of a column's type and of its array elements:
  -- through domains over domains, domains over arrays and arrays of domains alike.
  local cols
  cols, err = self.conn:exec(flash._columns_sql("a.attrelid = $1"), 0, rows[1].oid)
  if not cols then return nil, err end
  return { schema = parts[1], name = parts[2], oid = rows[1].oid, columns = cols,
           display = parts[1] .. "." .. parts[2] }
end

local function check_column(tbl, col, what)
  for _, c in ipairs(tbl.columns) do
    if c.name == col then return c end
  end
  return nil, string.format("column \"%s\" in %s does not exist in table %s", tostring(col), what, tbl.display)
end

-- Normalizes `where` into a list of { column, op, value } (see API.md), or a predicate.
local function normalize_where(where)
  if where == nil then return {}, nil end
  if type(where) == "function" then return {}, where end
  if type(where) ~= "table" then
    argerror(1, "listen", "option 'where': table or function expected, got " .. type(where), 3)
  end
  local conds = {}
  for k, v in pairs(where) do
    if type(k) == "string" then
      local vt = type(v)
      if v == core.null then
        conds[#conds + 1] = { column = k, op = "is null" }
      elseif vt == "string" or vt == "number" or vt == "boolean" then
        conds[#conds + 1] = { column = k, op = "=", value = v }
      else
        argerror(1, "listen", string.format("option 'where': value of '%s' must be a string, number, boolean or flash.null, got %s", k, vt), 3)
      end
    elseif type(k) ~= "number" then
      argerror(1, "listen", "option 'where': keys must be column names or list positions", 3)
    end
  end
  table.sort(conds, function(a, b) return a.column < b.column end)
  for i, c in ipairs(where) do
    if type(c) ~= "table" or type(c[1]) ~= "string" or type(c[2]) ~= "string" then
      argerror(1, "listen", string.format("option 'where': condition #%d must be { column, operator [, value] }", i), 3)
    end
    local op = WHERE_OPS[c[2]:lower():gsub("%s+", " ")]
    if not op then
      argerror(1, "listen", string.format("option 'where': unknown operator '%s' in condition #%d " ..
        "(expected =, <>, <, <=, >, >=, is null, is not null, in)", c[2], i), 3)
    end
    local v = c[3]
    if op == "in" then
      if type(v) ~= "table" then
        argerror(1, "listen", string.format("option 'where': condition #%d: 'in' needs a list of values", i), 3)
      end
    elseif op ~= "is null" and op ~= "is not null" then
      local vt = type(v)
      if v == core.null then
        op = (op == "=" and "is null") or (op == "<>" and "is not null") or argerror(1, "listen",
          string.format("option 'where': condition #%d compares with flash.null; use 'is null'", i), 3)
      elseif vt ~= "string" and vt ~= "number" and vt ~= "boolean" then
        argerror(1, "listen", string.format("option 'where': condition #%d: value must be a string, number, boolean or flash.null, got %s", i, vt), 3)
      end
    end
    conds[#conds + 1] = { column = c[1], op = op, value = v }
  end
  return conds, nil
end

local function check_names(list, opt)
  if list == nil then return end
  if type(list) ~= "table" then
    argerror(1, "listen", string.format("option '%s': list of column names expected, got %s", opt, type(list)), 3)
  end
  for i, f in ipairs(list) do
    if type(f) ~= "string" then
      argerror(1, "listen", string.format("option '%s': entry #%d must be a column name, got %s", opt, i, type(f)), 3)
    end
  end
end

-- client:listen(opts) -> listener | nil, err
function Client:listen(opts)
  checktype(opts, "table", 1, "listen")
  for k, v in pairs(opts) do
    local want = LISTEN_OPTS[k]
    if not want then argerror(1, "listen", string.format("unknown option '%s'", tostring(k))) end
    if want ~= true and type(v) ~= want then
      argerror(1, "listen", string.format("option '%s': %s expected, got %s", k, want, type(v)))
    end
  end
  if type(opts.table) ~= "string" then
    argerror(1, "listen", "option 'table' is required (a \"schema.table\" name)")
  end
  check_names(opts.fields, "fields")
  check_names(opts.primary_key, "primary_key")
  local conds, predicate = normalize_where(opts.where)
  if self.closed then return nil, "client is stopped" end

  local tbl, err = self:_resolve_table(opts.table)
  if not tbl then return failed("client:listen", err) end
  local columns = tbl.columns
  if opts.fields then
    if #opts.fields == 0 then return failed("client:listen", "option 'fields' is empty: list at least one column, or leave it out for every column") end
    columns = {}
    for _, f in ipairs(opts.fields) do
      local c, cerr = check_column(tbl, f, "fields")
      if not c then return failed("client:listen", cerr) end
      columns[#columns + 1] = c
    end
  end
  for _, c in ipairs(conds) do
    local ok, cerr = check_column(tbl, c.column, "where")
    if not ok then return failed("client:listen", cerr) end
  end
  for _, k in ipairs(opts.primary_key or {}) do
    local ok, cerr = check_column(tbl, k, "primary_key")
    if not ok then return failed("client:listen", cerr) end
  end

  local l = setmetatable({
    client = self,
    id = self.next_id,
    table = tbl,
    table_name = tbl.display,
    fields = opts.fields,
    columns = columns,
    conds = conds,
    predicate = predicate and self:_protect_where(predicate, tbl.display),
    primary_key = opts.primary_key,
    layout = core.layout(columns, self.flags),
    callbacks = { insert = {}, update = {}, delete = {}, truncate = {}, read = {} },
  }, Listener)
  local ok, verr = self.driver:check(l)
  if not ok then return failed("client:listen", verr) end
  self.next_id = self.next_id + 1
  self.listeners[#self.listeners + 1] = l
  self.by_id[l.id] = l
  if self.started and not self.capturing then
    -- The first listener of a client that ran only queries so far: capture starts now.
    local sok, serr = self:_capture()
    if not sok then
      table.remove(self.listeners)
      self.by_id[l.id] = nil
      return failed("client:listen", serr)
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
  for _, w in ipairs(require("flash.slots").idle_warnings(self.conn)) do log.warn(w) end
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

-- Runs one callback protected, applying the client's on_error policy. Returns false
-- when the client must stop.
local function traceback(err) return debug.traceback(tostring(err), 2) end

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

-- The hot path: no closure in it (an upvalue to close would keep LuaJIT from compiling it).
function Client:_call(fn, ev)
  local t0 = clock()
  local ok, err = xpcall(fn, traceback, ev)
  local counters = self.counters
  counters.handler_seconds = counters.handler_seconds + (clock() - t0)
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
-- `where` and their soft-delete transitions were applied by flash.filter). Returns false
-- to stop.
function Client:_deliver(l, ev)
  if self.failure then return false end   -- on_error = "stop": nothing after the failure
  local cbs = l.callbacks[ev.op]
  if #cbs == 0 then
    self.counters.dropped = self.counters.dropped + 1
    return true
  end
  self.counters.events = self.counters.events + 1
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

-- Stop hooks: flash.on_stop(fn) runs fn() once per graceful stop of a loop (flash.run,
-- client:run, flash.stop()); client:on_stop(fn) runs fn(client) on that client's graceful
-- stop. Both run after the stop delivered what it still delivers and before the final
-- confirmation; an error in one is logged, fails the stop and confirms nothing more.
local function add_hook(list, fn, fname)
  if type(fn) ~= "function" then argerror(1, fname, "function expected, got " .. type(fn), 3) end
  local h = { fn = fn }
  list[#list + 1] = h
  return function()
    for i, x in ipairs(list) do
      if x == h then table.remove(list, i) break end
    end
  end
end

function flash.on_stop(fn) return add_hook(stop_hooks, fn, "on_stop") end
function Client:on_stop(fn) return add_hook(self.stop_hooks, fn, "on_stop") end

local function run_hooks(list, what, ...)
  for _, h in ipairs({ unpack(list) }) do
    local ok, err = xpcall(h.fn, traceback, ...)
    if not ok then
      local msg = what .. " failed: " .. tostring(err)
      log.error(msg .. "; nothing more is confirmed")
      return nil, msg
    end
  end
  return true
end

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
    local hok, herr = run_hooks(self.stop_hooks, "on_stop hook", self)
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
  for i, c in ipairs(clients) do
    if c == self then table.remove(clients, i) break end
  end
  if self.stop_failure then
    if not ok then log.warn("stopping client: " .. tostring(err)) end
    state.stop_failure = state.stop_failure or self.stop_failure
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
  return flash._loop({ self }, opts)
end

---------------------------------------------------------------------------------------
-- Timers and the loop

local function add_timer(seconds, fn, every, fname)
  if type(seconds) ~= "number" or seconds < 0 then
    argerror(1, fname, "non-negative number of seconds expected, got " .. tostring(seconds), 3)
  end
  if type(fn) ~= "function" then argerror(2, fname, "function expected, got " .. type(fn), 3) end
  local t = { due = core.now() + seconds, every = every and seconds or nil, fn = fn }
  timers[#timers + 1] = t
  return function() t.cancelled = true end
end

function flash.every(seconds, fn) return add_timer(seconds, fn, true, "every") end
function flash.after(seconds, fn) return add_timer(seconds, fn, false, "after") end

local function run_timers(now)
  local i = 1
  while i <= #timers do
    local t = timers[i]
    if t.cancelled then
      table.remove(timers, i)
    elseif t.due <= now then
      if t.every then t.due = now + t.every else t.cancelled = true end
      local ok, err = xpcall(t.fn, traceback)
      if not ok then return nil, "timer callback failed: " .. tostring(err) end
      i = i + 1
    else
      i = i + 1
    end
  end
  return true
end

local function next_timer()
  local due
  for _, t in ipairs(timers) do
    if not t.cancelled and (not due or t.due < due) then due = t.due end
  end
  return due
end

-- The loop over some clients (flash.run: all of them). Returns true after a clean
-- stop, or nil, err after a failure; every client of the loop is stopped either way.
function flash._loop(list, opts)
  opts = opts or {}
  if state.running then error("flash.run / client:run is already running", 3) end
  for _, c in ipairs(list) do
    local ok, err = c:start()
    if not ok then return nil, err end
    if opts.until_lsn and c.capturing then
      if not c.driver.set_until then
        return nil, string.format("until_lsn needs the wal_logical driver (client uses %s)", c.driver_name)
      end
      ok, err = c.driver:set_until(opts.until_lsn)
      if not ok then return nil, err end
    end
  end
  state.running, state.stop, flash.ran = true, false, true
  core.signals(true)
  local failure
  while not state.stop do
    -- Clients without listeners (queries only) keep the loop running but have no driver
    -- to step.
    local open, live = 0, {}
    for _, c in ipairs(list) do
      if not c.closed then
        open = open + 1
        if c.capturing then live[#live + 1] = c end
      end
    end
    if open == 0 and not next_timer() then break end
    local fds, due = {}, next_timer()
    for _, c in ipairs(live) do
      for _, fd in ipairs(c.driver:fds()) do fds[#fds + 1] = fd end
      local d = c.driver:next_deadline()
      if d and (not due or d < due) then due = d end
    end
    local wait = due and math.max(0, due - core.now()) or (#live < open and 1 or -1)
    core.poll(fds, wait)
    local sig = core.signal_pending()
    if sig then
      log.info(string.format("received %s, stopping (send it again to exit at once)", sig))
      break
    end
    for _, c in ipairs(live) do
      if not c.closed then
        log.within(c.label)
        local ok, err = c.driver:step()
        log.within(nil)
        c:_note()
        if not ok or c.failure then
          failure = c.failure or err
          state.stop = true
          break
        end
      end
    end
    if not failure then
      local ok, err = run_timers(core.now())
      if not ok then failure = err break end
    end
    if opts.until_lsn and not failure then
      local all = true
      for _, c in ipairs(list) do
        if not c.closed and c.capturing and not c.driver:is_reached() then all = false break end
      end
      if all then break end
    end
  end
  if not failure then
    local ok, err = flash._stop_hooks(list)
    if not ok then failure = err end
  end
  for _, c in ipairs(list) do
    local ok, err = c:stop()
    -- A stop that could not remove its objects, or whose last callbacks failed, is a
    -- failure the caller must see.
    if not ok and c.stop_failure then
      failure = failure or err
    elseif not ok then
      failure = failure or ("stopping client: " .. tostring(err))
    end
  end
  core.signals(false)
  state.running, state.stop = false, false
  if failure then return nil, failure end
  return true
end

function flash.run(opts)
  local list = {}
  for _, c in ipairs(clients) do list[#list + 1] = c end
  return flash._loop(list, opts)
end

-- A graceful stop of some clients: each delivers what its stop still delivers, then the
-- flash.on_stop hooks run; after an error in one, no client confirms anything more.
function flash._stop_hooks(list)
  for _, c in ipairs(list) do c:_quiesce() end
  if #stop_hooks == 0 then return true end
  local ok, err = run_hooks(stop_hooks, "flash.on_stop hook")
  if not ok then
    for _, c in ipairs(list) do c.no_confirm = true end
    state.stop_failure = state.stop_failure or err
  end
  return ok, err
end

-- Outside the loop, stops every client at once: nil, err when a callback failed while
-- they stopped.
function flash.stop()
  if state.running then
    state.stop = true
    return true
  end
  local failure = nil
  local live = {}
  for _, c in ipairs(clients) do if c.started and not c.failure then live[#live + 1] = c end end
  if #live > 0 then
    local ok, err = flash._stop_hooks(live)
    if not ok then failure = err end
  end
  for i = #clients, 1, -1 do
    local c = clients[i]
    local ok, err = c:stop()
    if not ok and c.stop_failure then failure = failure or err end
  end
  if failure then return nil, failure end
  return true
end

-- The host asks, once, whether a callback failed during some client's stop (a script may
-- have ignored what its own client:run() or client:stop() returned).
function flash._take_stop_failure()
  local f = state.stop_failure
  state.stop_failure = nil
  return f
end

function flash._clients() return clients end

-- The host asks whether the script left anything to run.
function flash._pending()
  return (#clients > 0 or next_timer() ~= nil) and not flash.ran
end

return flash
