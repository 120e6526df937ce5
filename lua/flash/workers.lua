-- flash.workers: parallel handler states (flash.client{ workers = N, handlers = "file.lua" }).
-- N LuaJIT states on N threads (src/lua/lworkers.c) each load the handlers file; the main
-- state hands each event, as JSON, to the state its table + key picks, so a row's events are
-- handled in commit order by one state; an event stays unacknowledged (flash.ack) until its
-- state has handled it (docs/scale-out.md, "Parallel handlers in one process").
require "flash.jitfix"   -- first: pairs() loops kept off a LuaJIT bug (jitfix.lua)
local core = require "flash.core"
local json = require "flash.json"

local M = {}

-- flash.unchanged cannot be JSON: it crosses as this string and is put back in the worker.
local UNCHANGED = "\0flash.unchanged\0"
local COLLECT_EVERY = 0.002   -- seconds between looks for completions while events are out

local function traceback(err) return require("flash.log").script_traceback(debug.traceback(tostring(err), 1)) end

---------------------------------------------------------------------------------------
-- The worker side: runs in each worker state (lworkers.c calls it on the thread).

local function unmark(row)
  if type(row) == "table" then
    for k, v in pairs(row) do
      if v == UNCHANGED then row[k] = core.unchanged end
    end
  end
end

function M._worker(ctx, idx, path, config_text)
  local config = json.decode(config_text)
  local chunk, err = loadfile(path)
  if not chunk then error("cannot load the handlers: " .. tostring(err), 0) end
  local handlers = chunk(config, idx)
  if type(handlers) ~= "table" then
    error(string.format("%s must return a table of handler functions (got %s)", path, type(handlers)), 0)
  end
  local names = {}
  for k, v in pairs(handlers) do
    if type(k) == "string" and type(v) == "function" then names[#names + 1] = k end
  end
  table.sort(names)
  ctx.ready(table.concat(names, "\n"))
  local take, done, decode, now = ctx.take, ctx.done, json.decode, core.now
  while true do
    local id, text = take()
    if not id then break end
    local ev = decode(text)
    local fn = handlers[ev.handler]
    ev.handler = nil
    unmark(ev.new)
    local t0 = now()
    local ok, ferr = xpcall(fn, traceback, ev)
    done(id, (not ok) and tostring(ferr) or nil, now() - t0)
  end
end

---------------------------------------------------------------------------------------
-- The main side: one pool per client.

local Pool = {}
Pool.__index = Pool

local function bad(msg) error("bad argument #1 to 'client' (" .. msg .. ")", 4) end

-- The script that called flash.client: the first Lua file on the stack that is not
-- flashlua's own ([string "flash.x"] in the host, lua/flash/*.lua as installed files).
local own_dir = (debug.getinfo(1, "S").source or ""):match("^(@.*/)workers%.lua$")

local function calling_script()
  for level = 3, 40 do
    local info = debug.getinfo(level, "S")
    if not info then return nil end
    local src = info.source or ""
    if src:sub(1, 1) == "@" and not (own_dir and src:sub(1, #own_dir) == own_dir) then return src:sub(2) end
  end
end

-- The handlers file: `path` as given (relative to the current directory), else, when it is
-- relative, next to the script that made the client (README's `handlers = "handlers.lua"`
-- beside the script, run from anywhere). Returns the path, or nil and where it looked.
function M.find_handlers(path)
  local f = io.open(path, "r")
  if f then f:close() return path end
  local looked = "in the current directory"
  if path:sub(1, 1) ~= "/" then
    local script = calling_script()
    local dir = script and script:match("^(.*/)")
    if dir then
      f = io.open(dir .. path, "r")
      if f then f:close() return dir .. path end
      looked = looked .. " nor next to the script, in " .. dir
    end
  end
  return nil, "option 'handlers': cannot open " .. path .. " (not " .. looked .. ")"
end

-- The pool of client c (its options workers, handlers, config, worker_queue), started:
-- every state has loaded the handlers. Returns pool, or nil, err (a state could not load
-- them: the file's error).
function M.new(client, opts)
  local n = opts.workers
  if type(opts.handlers) ~= "string" then
    bad("option 'workers' needs option 'handlers': the file each worker state loads (it returns a table of " ..
      "functions; listener:on(ops, \"name\") names one)")
  end
  local ok, config = pcall(json.encode, opts.config == nil and json.object() or opts.config)
  if not ok then
    bad("option 'config': plain data expected (tables, strings, numbers, booleans), " .. tostring(config))
  end
  local handlers, why = M.find_handlers(opts.handlers)
  if not handlers then return nil, why end
  local self = setmetatable({
    client = client, n = n, path = handlers,
    inflight = {},       -- [id] = event, for every event a state has not finished
    count = 0,           -- #inflight
    holds = {},          -- [event] = how many worker callbacks still have it
    next_id = 0,
    keys = {},           -- [listener] = its key columns (false: none, the table decides)
    auto = client.opts.ack ~= "manual",
    handled = 0,
  }, Pool)
  self.pool = core.workers_start { n = n, queue = opts.worker_queue or 1000, path = package.path,
                                   cpath = package.cpath, handlers = handlers, config = config }
  -- Every state says which handlers it has, or why it could not load them.
  local ready, names = 0, nil
  local deadline = core.now() + 30
  while ready < n do
    if core.now() > deadline then
      self.pool:close()
      return nil, "the worker states did not load " .. handlers .. " within 30 s"
    end
    local r = self.pool:collect(0.05)
    for i = 1, #r, 4 do
      if r[i] == 1 then
        ready = ready + 1
        names = r[i + 3] or ""
      elseif r[i] == 3 then
        self.pool:close()
        return nil, string.format("worker %d: %s", r[i + 1], tostring(r[i + 3] or "exited"))
      end
    end
  end
  self.names = {}
  for name in names:gmatch("[^\n]+") do self.names[name] = true end
  return self
end

-- The callback of listener l for listener:on(ops, "name"): hands each event to a state.
function Pool:callback(name, l)
  if not self.names[name] then
    local have = {}
    for k in pairs(self.names) do have[#have + 1] = k end
    table.sort(have)
    error(string.format("bad argument #2 to 'on' (%s has no handler '%s'; it has: %s)", self.path, name,
      #have > 0 and table.concat(have, ", ") or "none"), 3)
  end
  return function(ev) return self:hand(name, l, ev) end
end

-- The columns that identify a row of listener l's table: its primary_key option, else the
-- replica identity index, else the primary key; false when there is none (then the
-- table's events all go to one state). Also the Redis sink's default key (its partitions).
local KEY_SQL = [[
  SELECT pg_catalog.array_agg(a.attname::text ORDER BY k.n) AS cols
  FROM pg_catalog.pg_index i
  CROSS JOIN LATERAL pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
  JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
  WHERE i.indrelid = $1 AND (i.indisreplident OR i.indisprimary)
  GROUP BY i.indexrelid, i.indisreplident
  ORDER BY i.indisreplident DESC LIMIT 1]]

function M.key_columns(client, l)
  local k = l.primary_key or false
  if not k and l.table and l.table.oid then
    local rows = client:query(KEY_SQL, l.table.oid)
    if rows and rows[1] then k = rows[1].cols end
  end
  return k
end

function Pool:key_of(l)
  local k = self.keys[l]
  if k ~= nil then return k end
  k = M.key_columns(self.client, l)
  self.keys[l] = k
  return k
end

-- The state (1..n) for event ev of listener l: the hash of its table and key.
function Pool:state_of(l, ev)
  local hash = require("flash.sink.redis").hash
  local cols = self:key_of(l)
  local row = ev.op == "delete" and ev.old or ev.new or ev.old
  if not cols or type(row) ~= "table" then return hash(ev.table) % self.n + 1 end
  local parts = {}
  for i, c in ipairs(cols) do
    local v = row[c]
    parts[i] = v == nil and "" or tostring(v)
  end
  return hash(ev.table .. "\0" .. table.concat(parts, "\0")) % self.n + 1
end

local function body(name, ev)
  return json.encode({
    handler = name, id = ev.id, table = ev.table, op = ev.op, new = ev.new, old = ev.old, lsn = ev.lsn,
    commit_time = ev.commit_time, xid = ev.xid, source = ev.source, stream_id = ev.stream_id,
  }, { unchanged = UNCHANGED })
end

function Pool:hand(name, l, ev)
  local i
  if ev.op == "truncate" then
    -- A barrier: every event before it is handled first, and none after it starts before
    -- it is handled (by the state of the table's name).
    self:barrier()
    i = require("flash.sink.redis").hash(ev.table) % self.n + 1
  else
    i = self:state_of(l, ev)
  end
  local id = self.next_id + 1
  self.next_id = id
  local text = body(name, ev)
  self.inflight[id] = ev
  self.count = self.count + 1
  self.holds[ev] = (self.holds[ev] or 0) + 1
  while true do
    local ok, err = self.pool:push(i, id, text, 0.005)
    if ok then break end
    if ok == nil then
      -- That state is gone (its loop failed): the event stays unacknowledged (held) and
      -- the client stops, whatever on_error says.
      self.inflight[id], self.count = nil, self.count - 1
      self:collect(0)
      self.client.failure = self.client.failure or (err .. (self.exit_reason and (": " .. self.exit_reason) or ""))
      return
    end
    -- Its queue is full: the main state waits for room (backpressure), settling meanwhile.
    self:collect(0)
  end
  if ev.op == "truncate" then self:barrier() end
  self:collect(0)
  self:arm()
end

-- While events are out, look for completions every COLLECT_EVERY on the loop.
function Pool:arm()
  if self.timer or self.count == 0 or self.closed then return end
  self.timer = require("flash").after(COLLECT_EVERY, function()
    self.timer = nil
    self:collect(0)
    self:arm()
  end)
end

-- An event is handled: acknowledged once no worker callback holds it.
function Pool:release(ev)
  local h = (self.holds[ev] or 1) - 1
  if h > 0 then self.holds[ev] = h return end
  self.holds[ev] = nil
  local acks = self.client.acks
  if acks then acks:ack(ev) end
end

-- Settles what the states finished: acknowledges, or applies on_error to a failure.
function Pool:collect(timeout)
  if self.closed then return end
  local r = self.pool:collect(timeout)
  local client = self.client
  for i = 1, #r, 4 do
    local tag, id, secs, text = r[i], r[i + 1], r[i + 2], r[i + 3]
    if tag == 2 then
      local ev = self.inflight[id]
      self.inflight[id] = nil
      self.count = self.count - 1
      self.handled = self.handled + 1
      client.counters.handler_seconds = client.counters.handler_seconds + secs
      if text then
        if client:_failed(text, ev) then self:release(ev) end
      else
        self:release(ev)
      end
    elseif tag == 3 and text then
      self.exit_reason = text
      client.failure = client.failure or string.format("worker %d failed: %s", id, text)
    end
  end
end

-- Auto acks: an event whose callbacks returned is handled unless a worker still has it.
function Pool:delivered(ev)
  if self.auto and not self.holds[ev] then self.client.acks:ack(ev) end
end

-- Waits until every event handed out is handled.
function Pool:barrier()
  while self.count > 0 and not self.client.failure do self:collect(0.01) end
end

-- A graceful stop: waits (at most timeout seconds) for the states to handle what they
-- have; what they did not is not acknowledged, so it is delivered again.
function Pool:drain(timeout)
  if self.closed or self.client.failure then return end
  local deadline = core.now() + (timeout or 10)
  while self.count > 0 and not self.client.failure and core.now() < deadline do self:collect(0.01) end
  if self.count > 0 then
    require("flash.log").warn(string.format("%d events were still with the worker states after %.0f s; they are " ..
      "not acknowledged and come again at the next start", self.count, timeout or 10))
  end
end

-- Stops the threads: after the current event of each (what is left is not acknowledged).
function Pool:close()
  if self.closed then return end
  self:collect(0)
  self.closed = true
  self.pool:close()
end

function Pool:stats(s)
  s.workers = self.n
  s.worker_events = self.handled
  s.worker_inflight = self.count
  s.worker_queued = self.closed and 0 or self.pool:queued()
end

return M
