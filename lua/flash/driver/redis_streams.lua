-- flash.driver.redis_streams: the `redis_streams` driver, a worker that reads the events
-- flash.sink.redis wrote (docs/scale-out.md) and hands them to the same listen/on API.
--
-- Partitions (streams <stream>:0 .. <stream>:P-1) are shared out between the running
-- workers of a consumer group: a worker holds a partition by a Redis lock
-- (<stream>:<group>:lock:<p>, renewed while it lives, expiring `claim_after` seconds after it
-- dies), so each partition is read by one worker at a time and a row's events (one
-- partition) are handled in order. A worker that takes a partition over first claims the
-- entries its previous holder had read but not acknowledged (XAUTOCLAIM), then reads new
-- ones (XREADGROUP). An entry is acknowledged (XACK) once its callbacks returned, or with
-- ack = "manual" once the script acknowledged it and everything before it; so an entry is
-- handled at least once, and by one worker at a time.
local core = require "flash.core"
local log = require "flash.log"
local where = require "flash.where"
local json = require "flash.json"
local base = require "flash.driver.base"
local sink = require "flash.sink.redis"

local M = {}
local Driver = base.class(base.Driver)
M.Driver = Driver
-- Acknowledged entries stay acknowledged across a restart: manual acks need no slot.
M.KEEPS_UNACKED = true

M.OPTIONS = {
  url = { type = "string", check = function(v)
    local ok, why = sink.parse_url(v)
    if not ok then return why end
  end },
  group = { type = "string", check = function(v) if v == "" then return "a non-empty name expected" end end },
  stream = { type = "string", check = function(v) if v == "" then return "a non-empty name expected" end end },
  partitions = { type = "number", check = function(v)
    if not (v >= 1 and v <= 1024 and v == math.floor(v)) then
      return "a whole number from 1 to 1024 expected, got " .. tostring(v)
    end
  end },
  -- Each worker's own name: two workers of one name hold the same partitions' locks.
  consumer = { type = "string", check = function(v) if v == "" then return "a non-empty name expected" end end },
  claim_after = { type = "number", check = function(v)
    if not (v >= 0.2 and v <= 3600) then return "seconds from 0.2 to 3600 expected, got " .. tostring(v) end
  end },
  -- How long a worker whose loop is blocked (a callback waiting on a slow API) keeps its
  -- partitions, through a thread that renews their locks meanwhile.
  busy_limit = { type = "number", check = function(v)
    if not (v >= 0 and v <= 86400) then return "seconds from 0 to 86400 expected, got " .. tostring(v) end
  end },
}

local READ_COUNT = 200     -- entries per partition per read
local BLOCK_MS = 10        -- an idle read waits this long for entries (the loop's slice)

-- Releases a lock only if this worker holds it; renews likewise (server-side scripts).
local RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
local RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) " ..
  "else return 0 end"

function M.hostname()
  local f = io.open("/etc/hostname")
  local h = f and f:read("*l")
  if f then f:close() end
  return (h and h ~= "") and h or "host"
end

function M.new(client)
  local o = client.opts
  local host, port = sink.parse_url(o.url or sink.DEFAULT_URL)
  local self = setmetatable({
    client = client,
    host = host, port = port,
    group = o.group or "flash",
    stream = o.stream or "flash",
    partitions = o.partitions or 1,
    consumer = o.consumer or string.format("%s-%d", M.hostname(), core.getpid()),
    ttl = o.claim_after or 5,
    busy_limit = o.busy_limit or 300,
    held = {},          -- [partition] = true
    to_ack = {},        -- [stream key] = { entry ids } acknowledged, sent with the next round trip
    delivered = {},     -- manual acks: { stream =, id = } delivered, not yet acknowledged, in order
    retry = base.backoff(),
    events = 0,
  }, Driver)
  return self
end

function Driver:key(p) return self.stream .. ":" .. p end
function Driver:lock_key(p) return self.stream .. ":" .. self.group .. ":lock:" .. p end
function Driver:workers_key() return self.stream .. ":" .. self.group .. ":workers" end

-- One pipeline; nil and the error (the connection is dropped, and reopened later).
function Driver:redis(cmds)
  if not self.rconn then
    local conn, err = core.redis_connect(self.host, self.port, math.max(self.ttl / 2, 0.5))
    if not conn then return nil, err end
    self.rconn = conn
  end
  local replies, err = self.rconn:pipeline(cmds)
  if not replies then
    self.rconn:close()
    self.rconn = nil
    -- Partitions may be taken by others while we are away: hold none until we know.
    self.held = {}
    self:keep()
    return nil, err
  end
  return replies
end

-- The listener's table is checked against PostgreSQL as under every driver (its name is
-- what the events carry); conditions are evaluated on arrival by flash.where.
function Driver:check(l)
  return base.Driver.check(self, l)
end

local function lost(self, err)
  if not self.retry_at then
    log.warn(string.format("redis_streams: connection to Redis lost (%s); reconnecting", tostring(err)))
  end
  self.retry_at = self.retry:schedule(err, "redis reconnect")
  self.delivered, self.popped = {}, 0
  if self.client.acks then self.client.acks:reset() end
  return true
end

-- The consumer group on every partition (from the streams' start; one that exists stays
-- as it is): true, or nil, err, and whether Redis was reached.
function Driver:create_groups()
  local cmds = {}
  for p = 0, self.partitions - 1 do
    cmds[#cmds + 1] = { "XGROUP", "CREATE", self:key(p), self.group, "0", "MKSTREAM" }
  end
  local replies, err = self:redis(cmds)
  if not replies then return nil, err, false end
  for _, r in ipairs(replies) do
    if type(r) == "table" and r.err and not r.err:find("^BUSYGROUP") then
      return nil, "cannot create consumer group " .. self.group .. ": " .. r.err, true
    end
  end
  return true
end

-- A NOGROUP reply: the stream or its group is gone (a Redis restarted without its
-- append-only file, a FLUSHALL, a DEL of the stream). The group is created again, from
-- the start of what the streams hold now, and reading goes on: true; or nil, err.
function Driver:regroup(what, reply_err)
  log.warn(string.format("%s: %s; Redis lost the streams or the group (restarted without its append-only file?): " ..
    "creating group %s again, from the start of each stream", what, reply_err, self.group))
  -- What was delivered under the old group is not acknowledged to the new one (as after a
  -- lost connection): the new group delivers what the streams hold again.
  self.claiming, self.to_ack = nil, {}
  self.delivered, self.popped = {}, 0
  if self.client.acks then self.client.acks:reset() end
  local ok, err, reached = self:create_groups()
  if not ok and not reached then return lost(self, err) end
  if not ok then return nil, err end
  return true
end

function Driver:start()
  local ok, err, reached = self:create_groups()
  if not ok and not reached then
    return nil, string.format("cannot reach Redis at %s: %s (start redis-server, or pass url = \"redis://HOST:PORT\")",
      sink.where(self.host, self.port), tostring(err))
  end
  if not ok then return nil, err end
  -- A capturer with more partitions than this worker wrote entries nobody here reads:
  -- their events would wait unhandled, without a word.
  if self.partitions < 1024 then
    local cmds = {}
    -- (XLEN: 0 for a missing stream, and for an empty one a worker's MKSTREAM made.)
    for p = self.partitions, 1023 do cmds[#cmds + 1] = { "XLEN", self:key(p) } end
    local r = self:redis(cmds)
    for i, n in ipairs(r or {}) do
      if type(n) == "number" and n > 0 then
        log.warn(string.format("stream %s exists, but this worker reads %s:0 .. %s:%d (partitions = %d): its " ..
          "events are never handled; give the workers the capturer's partitions", self:key(self.partitions + i - 1),
          self.stream, self.stream, self.partitions - 1, self.partitions))
        break
      end
    end
  end
  self.started = true
  self.next_house = 0
  if self.busy_limit > 0 then
    local keeper, kerr = core.redis_keeper(self.host, self.port, self.ttl / 3, self.busy_limit)
    if not keeper then
      log.warn("redis_streams: no thread to keep the partitions while a callback blocks (" .. tostring(kerr) ..
        "): a callback slower than claim_after loses them")
    end
    self.keeper = keeper
  end
  log.info(string.format("redis_streams worker %s in group %s over %d partitions of %s", self.consumer, self.group,
    self.partitions, self.stream))
  return true
end

-- The keeper thread's plan: the heartbeat and the locks of the partitions held now, which
-- it renews whenever the loop has not come by for claim_after/3 (up to busy_limit).
function Driver:keep()
  if not self.keeper then return end
  local keys = {}
  for p in pairs(self.held) do keys[#keys + 1] = self:lock_key(p) end
  self.keeper:plan(math.floor(self.ttl * 1000), self:workers_key(), self.consumer, RENEW, keys)
end

-- Heartbeat, lock renewal, and claiming partitions up to this worker's share.
function Driver:housekeep()
  local now_ms = math.floor(core.time() * 1000)
  local ttl_ms = math.floor(self.ttl * 1000)
  local cmds = {
    { "ZADD", self:workers_key(), tostring(now_ms), self.consumer },
    { "ZREMRANGEBYSCORE", self:workers_key(), "-inf", tostring(now_ms - ttl_ms) },
    { "ZCARD", self:workers_key() },
  }
  local held = {}
  for p in pairs(self.held) do
    held[#held + 1] = p
    cmds[#cmds + 1] = { "EVAL", RENEW, "1", self:lock_key(p), self.consumer, tostring(ttl_ms) }
  end
  local replies, err = self:redis(cmds)
  if not replies then return nil, err end
  for i, p in ipairs(held) do
    if replies[3 + i] ~= 1 then
      self.held[p] = nil
      log.warn(string.format("partition %d of %s was taken over by another worker", p, self.stream))
    end
  end
  local live = math.max(tonumber(replies[3]) or 1, 1)
  local share = math.ceil(self.partitions / live)
  local n = 0
  for _ in pairs(self.held) do n = n + 1 end
  -- Claim free partitions up to the share, starting at a place of our own so workers
  -- do not all race for partition 0.
  local start = core.getpid() % self.partitions
  for i = 0, self.partitions - 1 do
    if n >= share then break end
    local p = (start + i) % self.partitions
    if not self.held[p] then
      local r = self:redis({ { "SET", self:lock_key(p), self.consumer, "NX", "PX", tostring(ttl_ms) } })
      if not r then return nil, "lost" end
      if r[1] == "OK" then
        self.held[p] = true
        self.claiming = self.claiming or {}
        self.claiming[p] = "0-0"
        n = n + 1
        log.info(string.format("worker %s holds partition %d of %s", self.consumer, p, self.stream))
      end
    end
  end
  -- Over the share (another worker came): hand back the last ones once nothing is pending.
  if n > share and #self.delivered == 0 then
    for p in pairs(self.held) do
      if n <= share then break end
      if not (self.claiming and self.claiming[p]) then
        self:redis({ { "EVAL", RELEASE, "1", self:lock_key(p), self.consumer } })
        self.held[p] = nil
        n = n - 1
        log.info(string.format("worker %s hands partition %d back (%d workers)", self.consumer, p, live))
      end
    end
  end
  self:keep()
  return true
end

local function fields_of(list)
  local f = {}
  for i = 1, #list, 2 do f[list[i]] = list[i + 1] end
  return f
end

-- Delivers one entry (stream key, entry id, field list); true, or false to stop.
function Driver:deliver(skey, eid, list)
  local f = fields_of(list)
  local ok, ev = pcall(json.decode, f.event or "")
  local client = self.client
  if not ok or type(ev) ~= "table" or type(ev.op) ~= "string" or type(ev.table) ~= "string" then
    log.warn(string.format("entry %s of %s is not a flashlua event; acknowledged and skipped", eid, skey))
  else
    ev.stream_id = eid
    for _, l in ipairs(client.listeners) do
      if l.table_name == ev.table and client.by_id[l.id] then
        local e = { op = ev.op, id = ev.id, table = ev.table, source = ev.source, new = ev.new, old = ev.old,
                    lsn = ev.lsn, commit_time = ev.commit_time, xid = ev.xid, stream_id = eid }
        local cont
        if l.passthrough then cont = client:_deliver(l, e) else
          cont = where.apply(l, e, function(x, y) return client:_deliver(x, y) end)
        end
        if cont == false or client.failure then return false end
      end
    end
    self.events = self.events + 1
  end
  local acks = client.acks
  if acks then
    self.delivered[#self.delivered + 1] = { skey, eid }
    acks:commit(#self.delivered + (self.popped or 0))
  else
    local t = self.to_ack[skey] or {}
    t[#t + 1] = eid
    self.to_ack[skey] = t
  end
  return true
end

-- Manual acks: everything delivered up to position pos (a count) is acknowledged.
function Driver:confirm(pos)
  local d = self.delivered
  local n = pos - (self.popped or 0)
  if n <= 0 then return end
  for i = 1, n do
    local t = self.to_ack[d[i][1]] or {}
    t[#t + 1] = d[i][2]
    self.to_ack[d[i][1]] = t
  end
  local m = #d
  for i = n + 1, m do d[i - n] = d[i] end
  for i = m - n + 1, m do d[i] = nil end
  self.popped = (self.popped or 0) + n
end

function Driver:flush_acks()
  local cmds = {}
  for skey, ids in pairs(self.to_ack) do
    local c = { "XACK", skey, self.group }
    for _, id in ipairs(ids) do c[#c + 1] = id end
    cmds[#cmds + 1] = c
  end
  if #cmds == 0 then return true end
  local r, err = self:redis(cmds)
  if not r then return nil, err end
  self.to_ack = {}
  return true
end


function Driver:step()
  if not self.started then return true end
  if self.keeper then self.keeper:beat() end
  local now = core.now()
  if self.retry_at then
    if now < self.retry_at then return true end
    self.retry_at = nil
  end
  if now >= self.next_house then
    local ok, err = self:housekeep()
    if not ok then return lost(self, err) end
    self.next_house = now + self.ttl / 3
    self.retry:reset()
  end
  if self:paused() then return true end
  -- Taken-over partitions first: the entries their last holder read but never acknowledged
  -- (one batch of one partition per step).
  local p, cursor = next(self.claiming or {})
  if p then
    local r, err = self:redis({ { "XAUTOCLAIM", self:key(p), self.group, self.consumer, "0", cursor, "COUNT",
      tostring(READ_COUNT) } })
    if not r then return lost(self, err) end
    local reply = r[1]
    if type(reply) == "table" and reply.err then
      if reply.err:find("^NOGROUP") then return self:regroup("XAUTOCLAIM", reply.err) end
      return nil, "XAUTOCLAIM: " .. reply.err
    end
    for _, e in ipairs(reply[2] or {}) do
      if type(e) == "table" and type(e[2]) == "table" then
        if self:deliver(self:key(p), e[1], e[2]) == false then return nil, self.client.failure end
      end
    end
    if reply[1] == "0-0" then self.claiming[p] = nil else self.claiming[p] = reply[1] end
    local ok, aerr = self:flush_acks()
    if not ok then return lost(self, aerr) end
    return true
  end
  local keys = {}
  for q in pairs(self.held) do keys[#keys + 1] = self:key(q) end
  if #keys == 0 then return true end
  table.sort(keys)
  local cmd = { "XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", tostring(READ_COUNT), "BLOCK",
    tostring(BLOCK_MS), "STREAMS" }
  for _, k in ipairs(keys) do cmd[#cmd + 1] = k end
  for _ = 1, #keys do cmd[#cmd + 1] = ">" end
  local r, err = self:redis({ cmd })
  if not r then return lost(self, err) end
  local reply = r[1]
  if type(reply) == "table" and reply.err then
    -- (UNBLOCKED: the stream was deleted while this read waited on it.)
    if reply.err:find("^NOGROUP") or reply.err:find("^UNBLOCKED") then
      return self:regroup("XREADGROUP", reply.err)
    end
    return nil, "XREADGROUP: " .. reply.err
  end
  for _, s in ipairs(type(reply) == "table" and reply or {}) do
    for _, e in ipairs(s[2] or {}) do
      if self:deliver(s[1], e[1], e[2]) == false then return nil, self.client.failure end
    end
  end
  local ok, aerr = self:flush_acks()
  if not ok then return lost(self, aerr) end
  return true
end

function Driver.fds() return {} end
function Driver:next_deadline()
  if self.retry_at then return self.retry_at end
  return core.now()
end
function Driver.sync() return true end

function Driver:stats(s)
  s.partitions_held = 0
  for _ in pairs(self.held) do s.partitions_held = s.partitions_held + 1 end
  s.consumer = self.consumer
  s.paused = self:paused()
  -- Rounds of lock renewals the keeper thread sent while the loop was blocked.
  s.kept_busy = self.keeper and self.keeper:renewals() or 0
end

function Driver.quiesce() end

-- Acknowledges what was handled, hands the partitions back, leaves the group's workers.
function Driver:stop(confirm)
  if not self.started then return true end
  self.started = false
  if confirm ~= false then self:flush_acks() end
  local cmds = { { "ZREM", self:workers_key(), self.consumer } }
  for p in pairs(self.held) do cmds[#cmds + 1] = { "EVAL", RELEASE, "1", self:lock_key(p), self.consumer } end
  -- (The keeper first: it must not renew what is released here.)
  if self.keeper then self.keeper:close() self.keeper = nil end
  self:redis(cmds)
  self.held = {}
  if self.rconn then self.rconn:close() self.rconn = nil end
  return true
end

return M
