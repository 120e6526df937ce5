-- flash.sink.redis: events into Redis Streams, partitioned by table + key, acknowledged to
-- flashlua only once Redis has them (docs/scale-out.md).
--
--   local sink = require("flash.sink.redis").new{ url = "redis://127.0.0.1:6379", partitions = 4 }
--   local c = assert(flash.client{ driver = "wal_logical", persistent = true, ack = "manual" })
--   c:listen{ table = "orders" }:on("all", sink)
--
-- Each event is one entry (XADD <stream>:<p> * id .. table .. op .. event <json>) of the
-- partition p = hash(table, key) % partitions, so the events of one row stay in one stream,
-- in commit order. Entries are written in pipelined batches (one round trip per batch,
-- every `flush_interval` and whenever `batch` events wait) and each event is acknowledged
-- (ev:ack()) only after Redis answered its XADD: the slot (or capture table) never moves
-- past an event Redis does not hold. A lost connection or a Redis restart keeps the batch
-- and sends it again to a new connection (at-least-once: an entry may appear twice, with
-- the same `id` field, when Redis wrote it but its reply was lost); meanwhile unacknowledged
-- events pile up to the client's max_unacked and the source pauses without losing its place.
local flash = require "flash"
local core = require "flash.core"
local bit = require "bit"
local log = require "flash.log"
local base = require "flash.driver.base"

local M = {}

local Sink = {}
Sink.__index = Sink

-- FNV-1a, 32 bits, of string s (stable across processes and runs: a key's partition
-- never changes).
local function fnv1a(s)
  local h = 2166136261
  for i = 1, #s do
    h = bit.bxor(h, s:byte(i))
    -- h * 16777619 (= 2^24 + 403) mod 2^32, exactly: no product past 2^53.
    h = bit.tobit(bit.lshift(h, 24) + bit.tobit(h * 403))
  end
  return h % 4294967296
end
M.hash = fnv1a

-- redis://HOST[:PORT] -> host, port; nil when url is not that. The one reader of a Redis
-- URL: the sink, the redis_streams driver and the command line's --to.
local function parse_url(url)
  local host, port = url:match("^redis://([^:/]+):?(%d*)/?%d*$")
  if not host then return nil end
  return host, tonumber(port) or 6379
end
M.parse_url = parse_url
M.DEFAULT_URL = "redis://127.0.0.1:6379"

local function check(opts)
  local function bad(msg) error("bad argument #1 to 'redis' (" .. msg .. ")", 3) end
  if type(opts) ~= "table" then bad("a table of options expected") end
  local known = { url = true, stream = true, partitions = true, key = true, maxlen = true, batch = true,
                  flush_interval = true, timeout = true }
  for k in pairs(opts) do
    if not known[k] then bad(string.format("unknown option '%s'", tostring(k))) end
  end
  if opts.url ~= nil and not (type(opts.url) == "string" and parse_url(opts.url)) then
    bad("option 'url': redis://HOST[:PORT] expected, got " .. tostring(opts.url))
  end
  local p = opts.partitions
  if p ~= nil and not (type(p) == "number" and p >= 1 and p <= 1024 and p == math.floor(p)) then
    bad("option 'partitions': a whole number from 1 to 1024 expected, got " .. tostring(p))
  end
  local key = opts.key
  if key ~= nil and type(key) ~= "function" and type(key) ~= "table" then
    bad("option 'key': a list of column names or a function(ev) expected, got " .. type(key))
  end
end

-- A sink for `opts` (see the top of this file): a callable to pass to listener:on().
function M.new(opts)
  opts = opts or {}
  check(opts)
  local host, port = parse_url(opts.url or M.DEFAULT_URL)
  local self = setmetatable({
    host = host, port = port,
    stream = opts.stream or "flash",
    partitions = opts.partitions or 1,
    key = opts.key or { "id" },
    maxlen = opts.maxlen,
    batch = opts.batch or 500,
    flush_interval = opts.flush_interval or 0.02,
    timeout = opts.timeout or 5,
    pending = {},          -- { ev =, cmd = } waiting for Redis, in delivery order
    retry_at = nil,
    retry = base.backoff(),
    stats = { sent = 0, batches = 0, errors = 0, reconnects = 0 },
  }, Sink)
  return self
end

-- The partition stream of event ev: its table and key columns (from the old row when the
-- event has one, so an update or delete goes where the row's insert went).
function Sink:stream_of(ev)
  local k
  if type(self.key) == "function" then
    k = tostring(self.key(ev))
  else
    local row = (type(ev.old) == "table" and ev.old) or ev.new
    local parts = {}
    for i, col in ipairs(self.key) do
      local v = type(row) == "table" and row[col]
      parts[i] = v == nil and "" or tostring(v)
    end
    k = table.concat(parts, "\0")
  end
  return self.stream .. ":" .. (fnv1a(ev.table .. "\0" .. k) % self.partitions)
end

local function entry(self, ev)
  local cmd = { "XADD", self:stream_of(ev) }
  if self.maxlen then
    cmd[#cmd + 1] = "MAXLEN"
    cmd[#cmd + 1] = "~"
    cmd[#cmd + 1] = tostring(self.maxlen)
  end
  local body = flash.json.encode({
    id = ev.id, table = ev.table, op = ev.op, new = ev.new, old = ev.old, lsn = ev.lsn,
    commit_time = ev.commit_time, xid = ev.xid, source = ev.source,
  })
  for _, v in ipairs({ "*", "id", tostring(ev.id or ""), "table", ev.table, "op", ev.op, "event", body }) do
    cmd[#cmd + 1] = v
  end
  return cmd
end

-- The callback: the event waits in the sink until Redis holds it.
function Sink:__call(ev)
  if type(ev.ack) ~= "function" then
    error("flash.sink.redis needs flash.client{ ack = \"manual\", persistent = true }: an event is " ..
      "acknowledged only once Redis holds it", 2)
  end
  if not self.timer then
    self.timer = flash.every(self.flush_interval, function() self:flush() end)
    self.stop_hook = flash.on_stop(function()
      local ok, err = self:flush()
      if not ok and #self.pending > 0 then
        error(string.format("redis sink: %d events were not written (%s); they are delivered again at the next " ..
          "start", #self.pending, tostring(err)), 0)
      end
    end)
  end
  self.pending[#self.pending + 1] = { ev = ev, cmd = entry(self, ev) }
  if #self.pending >= self.batch then self:flush() end
end

function Sink:connect()
  local conn, err = core.redis_connect(self.host, self.port, self.timeout)
  if not conn then return nil, err end
  if self.had_conn then
    self.stats.reconnects = self.stats.reconnects + 1
    log.warn(string.format("redis sink: reconnected to %s:%d", self.host, self.port))
  end
  self.conn, self.had_conn = conn, true
  self.retry:reset()
  return conn
end

-- Writes what waits, in batches; acknowledges what Redis answered. true, or nil and why
-- (the events stay, and are sent again at the next flush).
function Sink:flush()
  if #self.pending == 0 then return true end
  if self.retry_at and core.now() < self.retry_at then return nil, self.last_err end
  local conn = self.conn
  if not (conn and conn:ok()) then
    local err
    conn, err = self:connect()
    if not conn then return self:failed(err) end
  end
  while #self.pending > 0 do
    local n = math.min(#self.pending, self.batch)
    local cmds = {}
    for i = 1, n do cmds[i] = self.pending[i].cmd end
    local replies, err = conn:pipeline(cmds)
    if not replies then
      conn:close()
      self.conn = nil
      return self:failed(err)
    end
    for i = 1, n do
      local r = replies[i]
      if type(r) == "table" and r.err then
        -- Redis refused it (a wrong type, out of memory): nothing after it is acknowledged.
        for j = 1, i - 1 do self.pending[j].ev:ack() end
        self:drop(i - 1)
        return self:failed("XADD refused: " .. r.err)
      end
    end
    for i = 1, n do self.pending[i].ev:ack() end
    self:drop(n)
    self.stats.sent = self.stats.sent + n
    self.stats.batches = self.stats.batches + 1
  end
  self.retry_at, self.last_err = nil, nil
  return true
end

function Sink:drop(n)
  local p, m = self.pending, #self.pending
  for i = n + 1, m do p[i - n] = p[i] end
  for i = m - n + 1, m do p[i] = nil end
end

function Sink:failed(err)
  self.stats.errors = self.stats.errors + 1
  local wait = self.retry:next()
  if err ~= self.last_err then
    log.warn(string.format("redis sink: %s; %d events wait and are sent again (retrying in %.1fs)", tostring(err),
      #self.pending, wait))
  end
  self.last_err = err
  self.retry_at = core.now() + wait
  return nil, err
end

return M
