-- flash.loop: the loop that runs clients (flash.run, client:run): it waits on their
-- sockets and deadlines, steps their drivers, runs timers (flash.every, flash.after),
-- handles SIGINT/SIGTERM, and stops the clients gracefully with the stop hooks.
local core = require "flash.core"
local log = require "flash.log"
local argerror = require("flash.args").argerror

local M = {}

-- A loop holds what a script's clients share: its state is all here, in the object (the
-- flash module makes one per Lua state), never in this module.
local Loop = {}
Loop.__index = Loop

function M.new()
  return setmetatable({
    defaults = {},        -- what the host sets from its command line (-d, --driver, --sandbox)
    clients = {},         -- open clients, in creation order
    client_seq = 0,       -- numbers clients in log lines
    timers = {},          -- { due=, every=, fn=, cancelled= }
    sources = {},         -- other things the loop polls (flash.metrics): fds(), deadline(), step()
    stop_hooks = {},      -- flash.on_stop: { fn=, cancelled= }
    running = false,      -- inside run()
    stop_asked = false,   -- flash.stop() asked run() to return
    ran = false,          -- a run() has begun: the host does not run the clients again
    stop_failure = nil,   -- a failure during some client's stop, for the host (take_stop_failure)
    last_failure = nil,   -- the last nil, err of flash.client or client:listen (failed)
    warned_slots = {},    -- [slot name] = true: each idle slot warned about once (flash.slots)
  }, Loop)
end

-- Sources the loop polls besides clients and timers: { fds = fn, deadline = fn, step = fn }.
function Loop:add_source(src) self.sources[#self.sources + 1] = src end
function Loop:remove_source(src)
  for i, x in ipairs(self.sources) do
    if x == src then table.remove(self.sources, i) break end
  end
end

-- The number of the next client, for log lines.
function Loop:number()
  self.client_seq = self.client_seq + 1
  return self.client_seq
end

-- A client joins the loop.
function Loop:add(c)
  self.clients[#self.clients + 1] = c
end

-- A client stopped: it leaves the loop.
function Loop:remove(c)
  for i, x in ipairs(self.clients) do
    if x == c then table.remove(self.clients, i) break end
  end
end

-- A failure returned as nil, err, kept so that the host can name it when the script goes
-- on with the nil ("flash.client: cannot connect ...").
function Loop:failed(what, err)
  self.last_failure = what .. ": " .. tostring(err)
  return nil, err
end

local function traceback(err) return log.script_traceback(debug.traceback(tostring(err), 1)) end
M.traceback = traceback

-- Stop hooks: flash.on_stop(fn) runs fn() once per graceful stop of a loop (flash.run,
-- client:run, flash.stop()); client:on_stop(fn) runs fn(client) on that client's graceful
-- stop. Both run after the stop delivered what it still delivers and before the final
-- confirmation; an error in one is logged, fails the stop and confirms nothing more.
function M.add_hook(list, fn, fname)
  if type(fn) ~= "function" then argerror(1, fname, "function expected, got " .. type(fn), 3) end
  local h = { fn = fn }
  list[#list + 1] = h
  return function()
    for i, x in ipairs(list) do
      if x == h then table.remove(list, i) break end
    end
  end
end

function Loop:on_stop(fn) return M.add_hook(self.stop_hooks, fn, "on_stop") end

-- A hook's error raised with a position ("file:line: ...") is the script's mistake and gets
-- its traceback; one without (error(msg, 0): a sink that reports why it could not flush)
-- is a message for the user, logged as it is.
local function hook_traceback(err)
  if type(err) == "string" and not (err:find("^[^%s:]+:%d+: ") or err:find('^%[string "[^"]*"%]:%d+: ')) then
    return err
  end
  return log.script_traceback(debug.traceback(tostring(err), 1))
end

function M.run_hooks(list, what, ...)
  for _, h in ipairs({ unpack(list) }) do
    local ok, err = xpcall(h.fn, hook_traceback, ...)
    if not ok then
      local msg = what .. " failed: " .. tostring(err)
      log.error(msg .. "; nothing more is confirmed")
      return nil, msg
    end
  end
  return true
end

---------------------------------------------------------------------------------------
-- Timers and the loop

local function add_timer(self, seconds, fn, every, fname)
  if type(seconds) ~= "number" or seconds < 0 then
    -- Level 2: flash.every and Loop:every tail-call this, so the script's line is the caller's.
    argerror(1, fname, "non-negative number of seconds expected, got " ..
      (type(seconds) == "number" and tostring(seconds) or type(seconds)), 2)
  end
  if type(fn) ~= "function" then argerror(2, fname, "function expected, got " .. type(fn), 2) end
  local t = { due = core.now() + seconds, every = every and seconds or nil, fn = fn }
  self.timers[#self.timers + 1] = t
  return function() t.cancelled = true end
end

function Loop:every(seconds, fn) return add_timer(self, seconds, fn, true, "every") end
function Loop:after(seconds, fn) return add_timer(self, seconds, fn, false, "after") end

function Loop:run_timers(now)
  local timers = self.timers
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

function Loop:next_timer()
  local due
  for _, t in ipairs(self.timers) do
    if not t.cancelled and (not due or t.due < due) then due = t.due end
  end
  return due
end

-- The loop over some clients (flash.run: all of them). Returns true after a clean
-- stop, or nil, err after a failure; every client of the loop is stopped either way.
function Loop:run(list, opts)
  opts = opts or {}
  if self.running then error("flash.run / client:run is already running", 3) end
  for _, c in ipairs(list) do
    local ok, err = c:start()
    if not ok and c.start_interrupted then
      -- A signal while the start waited (a slot waiting for old transactions): a stop
      -- before anything was delivered, not a failure.
      log.info(err)
      for _, x in ipairs(list) do x:stop() end
      return true
    end
    if not ok then return nil, err end
    if opts.until_lsn and c.capturing then
      if not c.driver.set_until then
        return nil, string.format("until_lsn needs the wal_logical driver (client uses %s)", c.driver_name)
      end
      ok, err = c.driver:set_until(opts.until_lsn)
      if not ok then return nil, err end
    end
  end
  self.running, self.stop_asked, self.ran = true, false, true
  core.signals(true)
  local failure
  while not self.stop_asked do
    -- Clients without listeners (queries only) keep the loop running but have no driver
    -- to step.
    local open, live = 0, {}
    for _, c in ipairs(list) do
      if not c.closed then
        open = open + 1
        if c.capturing then live[#live + 1] = c end
      end
    end
    if open == 0 and not self:next_timer() then break end
    local fds, due = {}, self:next_timer()
    for _, c in ipairs(live) do
      for _, fd in ipairs(c.driver:fds()) do fds[#fds + 1] = fd end
      local d = c.driver:next_deadline()
      if d and (not due or d < due) then due = d end
    end
    for _, src in ipairs(self.sources) do
      for _, fd in ipairs(src.fds()) do fds[#fds + 1] = fd end
      local d = src.deadline()
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
          self.stop_asked = true
          break
        end
      end
    end
    if not failure then
      local ok, err = self:run_timers(core.now())
      if not ok then failure = err break end
      -- A step may close its source.
      for i = #self.sources, 1, -1 do local src = self.sources[i] if src then src.step() end end
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
    local ok, err = self:run_stop_hooks(list)
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
  self.running, self.stop_asked = false, false
  if failure then return nil, failure end
  return true
end

-- A graceful stop of some clients: each delivers what its stop still delivers, then the
-- flash.on_stop hooks run; after an error in one, no client confirms anything more.
function Loop:run_stop_hooks(list)
  for _, c in ipairs(list) do c:_quiesce() end
  if #self.stop_hooks == 0 then return true end
  local ok, err = M.run_hooks(self.stop_hooks, "flash.on_stop hook")
  if not ok then
    for _, c in ipairs(list) do c.no_confirm = true end
    self.stop_failure = self.stop_failure or err
  end
  return ok, err
end

-- Outside the loop, stops every client at once: nil, err when a callback failed while
-- they stopped.
function Loop:stop()
  if self.running then
    self.stop_asked = true
    return true
  end
  local failure = nil
  local live = {}
  local clients = self.clients
  for _, c in ipairs(clients) do if c.started and not c.failure then live[#live + 1] = c end end
  if #live > 0 then
    local ok, err = self:run_stop_hooks(live)
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
function Loop:take_stop_failure()
  local f = self.stop_failure
  self.stop_failure = nil
  return f
end

-- The host asks whether the script left anything to run.
function Loop:pending()
  return (#self.clients > 0 or self:next_timer() ~= nil) and not self.ran
end

return M
