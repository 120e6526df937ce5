-- flash.sink.redis: events into Redis Streams, partitioned by table + key, acknowledged to
-- flashlua only once Redis has them (docs/scale-out.md).
--
--   local sink = require("flash.sink.redis").new{ url = "redis://127.0.0.1:6379", partitions = 4 }
--   local c = assert(flash.client{ driver = "wal_logical", persistent = true, ack = "manual" })
--   c:listen{ table = "orders" }:on("all", sink)
--
-- Each event is one entry (XADD <stream>:<p> * id .. table .. op .. event <json>) of the
-- partition p = hash(table, key) % partitions, so the events of one row stay in one stream,
-- in commit order. The entry is encoded in C (src/lua/lredis.c: the outbox) into the
-- connection's output as the event comes; the output is written without waiting every
-- `batch` events and at each turn of the loop, and the replies are read as they come (the
-- loop polls the connection), so decoding goes on while Redis works. Each event is
-- acknowledged (ev:ack()) only after Redis answered its XADD, in delivery order: the slot
-- (or capture table) never moves past an event Redis does not hold. A lost connection or a
-- Redis restart keeps every event not answered and writes them again to a new connection
-- (at-least-once: an entry may appear twice, with the same `id` field, when Redis wrote it
-- but its reply was lost); meanwhile unacknowledged events pile up to the client's
-- max_unacked and the source pauses without losing its place.
local flash = require "flash"
local core = require "flash.core"
local bit = require "bit"
local log = require "flash.log"
local base = require "flash.driver.base"

local M = {}

local Sink = {}
Sink.__index = Sink

-- An entry of the queue for events the wal_logical driver's direct path wrote into the
-- outbox with no Lua event (lrepl's repl:direct): { n = events not answered yet, tok = the
-- acknowledgement tracker's token }. Their commands are kept in the outbox (outbox:drop,
-- outbox:readd) so that a new connection gets them again.
local Group = {}

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

-- redis://HOST[:PORT] -> host, port, or unix:///PATH (Redis's `unixsocket`, for a server
-- on the same machine: no TCP on either side) -> path, 0; nil and why when url is neither.
-- The one reader of a Redis URL: the sink, the redis_streams driver and the command line's
-- --to. A database number other than 0 (redis://HOST:PORT/2) is refused: the connections
-- never SELECT one, so the streams would be in database 0 whatever the URL said.
local FORMS = "redis://HOST[:PORT] or unix:///PATH"
local function parse_url(url)
  local path = url:match("^unix://(/.+)$")
  if path then return path, 0 end
  local host, port, db = url:match("^redis://([^:/]+):?(%d*)/?(%d*)$")
  if not host then return nil, FORMS .. " expected, got " .. url end
  local why
  if db ~= "" and tonumber(db) ~= 0 then
    why = "a database number is not supported: the streams are in database 0"
  end
  port = tonumber(port) or 6379
  if port < 1 or port > 65535 then why = "the port is 1 to 65535" end
  if why then return nil, string.format("%s expected, got %s (%s)", FORMS, url, why), why end
  return host, port
end
M.URL_FORMS = FORMS
-- How messages name the server parse_url gave.
function M.where(host, port)
  return port == 0 and "unix://" .. host or string.format("%s:%d", host, port)
end
M.parse_url = parse_url
M.DEFAULT_URL = "redis://127.0.0.1:6379"

local function check(opts)
  -- Level 4: the script's line that called flash.sink.redis (bad < check < new < caller).
  local function bad(msg, depth) error("bad argument #1 to 'redis' (" .. msg .. ")", 4 + (depth or 0)) end
  if type(opts) ~= "table" then bad("a table of options expected") end
  local known = { url = true, stream = true, partitions = true, key = true, maxlen = true, batch = true,
                  flush_interval = true, timeout = true }
  for k in pairs(opts) do
    if not known[k] then bad(require("flash.args").unknown_option(k, known)) end
  end
  if opts.url ~= nil then
    if type(opts.url) ~= "string" then bad("option 'url': " .. FORMS .. " expected, got " .. type(opts.url)) end
    local ok, why = parse_url(opts.url)
    if not ok then bad("option 'url': " .. why) end
  end
  local p = opts.partitions
  if p ~= nil and not (type(p) == "number" and p >= 1 and p <= 1024 and p == math.floor(p)) then
    bad("option 'partitions': a whole number from 1 to 1024 expected, got " .. tostring(p))
  end
  local function whole(name, min)
    local v = opts[name]
    if v ~= nil and not (type(v) == "number" and v >= min and v == math.floor(v) and v < 2 ^ 53) then
      bad(string.format("option '%s': a whole number >= %d expected, got %s", name, min,
        type(v) == "number" and tostring(v) or type(v)), 1)
    end
  end
  whole("maxlen", 1)
  whole("batch", 1)
  if opts.stream ~= nil and not (type(opts.stream) == "string" and opts.stream ~= "") then
    bad("option 'stream': a non-empty string expected, got " ..
      (type(opts.stream) == "string" and "an empty string" or type(opts.stream)))
  end
  for _, name in ipairs({ "timeout", "flush_interval" }) do
    local v = opts[name]
    if v ~= nil and not (type(v) == "number" and v > 0) then
      bad(string.format("option '%s': seconds (a number > 0) expected, got %s", name,
        type(v) == "number" and tostring(v) or type(v)))
    end
  end
  local key = opts.key
  if key ~= nil and type(key) ~= "function" and type(key) ~= "table" then
    bad("option 'key': a list of column names or a function(ev) expected, got " .. type(key))
  end
  if type(key) == "table" then
    if #key == 0 then bad("option 'key': a list of column names expected, got an empty table") end
    for i, c in ipairs(key) do
      if type(c) ~= "string" then
        bad(string.format("option 'key': column names expected, got a %s at [%d]", type(c), i))
      end
    end
  end
end

-- A sink for `opts` (see the top of this file): a callable to pass to listener:on().
function M.new(opts)
  opts = opts or {}
  check(opts)
  local host, port = parse_url(opts.url or M.DEFAULT_URL)
  local key = opts.key or { "id" }
  local self = setmetatable({
    key_given = opts.key ~= nil,
    lkeys = setmetatable({}, { __mode = "k" }),   -- [listener] = its table's key columns, or false
    host = host, port = port,
    stream = opts.stream or "flash",
    partitions = opts.partitions or 1,
    key = key,
    keyfn = type(key) == "function" and key or nil,
    maxlen = opts.maxlen,
    batch = opts.batch or 500,
    timeout = opts.timeout or 5,
    -- The events not yet answered, in delivery order: q[head .. sent - 1] are in the
    -- connection's output or written, q[sent .. tail - 1] wait for a connection.
    q = {}, head = 1, sent = 1, tail = 1,
    qk = {},               -- qk[i]: the key string of q[i] when Lua made it (else nil: the outbox reads it)
    added = 0,             -- events added since the output was last written
    writing = false,       -- the socket did not take all the output
    connected = false,
    retry_at = nil,
    retry = base.backoff(),
    stats = { sent = 0, batches = 0, errors = 0, reconnects = 0, direct = 0 },
  }, Sink)
  self.out = core.redis_outbox { stream = self.stream, partitions = self.partitions, maxlen = self.maxlen,
                                 key = type(key) == "table" and key or nil }
  -- The sink connects at its first event; a Redis that is not there (a wrong URL, a server
  -- not started) is said now, not only once the database writes something.
  local ok, err = self.out:connect(host, port, self.timeout)
  if ok then
    self.out:close()
  else
    log.warn(string.format("redis sink: %s (events wait unacknowledged and are sent once Redis answers)",
      tostring(err)))
  end
  return self
end

-- The key string of ev, or nil (the outbox reads the `key` columns, { "id" } by default).
-- Under key = function(ev), its tostring(). Without a `key` option, an event of listener l
-- is keyed by l's primary_key, else its table's replica identity index or primary key
-- (what workers = N hashes), else "id": the texts of those columns joined by "\0", from the
-- old row when there is one, "false" each without a row (a truncate) -- the outbox's way.
-- The key columns of listener l's table (its primary_key, else the replica identity index
-- or primary key), or false; nil and why when l's fields leave one of them out: it would be
-- nil in every row, and every event would go to one partition.
function M.key_columns(l)
  local cols = require("flash.workers").key_columns(l.client, l)
  if cols and l.fields then
    local carried = {}
    for _, f in ipairs(l.fields) do carried[f] = true end
    for _, c in ipairs(cols) do
      if not carried[c] then
        return nil, string.format("the listener of %s carries fields without its key column %s, so every event " ..
          "would go to one partition: add %s to fields (flashlua --fields), or pass key = {...} to the sink",
          tostring(l.table_name), c, c)
      end
    end
  end
  return cols
end

local function key_of(self, ev, l)
  if self.keyfn then return tostring(self.keyfn(ev)) end
  if self.key_given or not l then return nil end
  local cols = self.lkeys[l]
  if cols == nil then
    local err
    cols, err = M.key_columns(l)
    if err then error("flash.sink.redis: " .. err, 0) end
    if cols and #cols == 1 and cols[1] == "id" then cols = false end
    self.lkeys[l] = cols
  end
  if not cols then return nil end
  local row = type(ev.old) == "table" and ev.old or ev.new
  local parts = {}
  for i, c in ipairs(cols) do
    if type(row) ~= "table" then parts[i] = "false" else
      local v = row[c]
      parts[i] = v == nil and "" or tostring(v)
    end
  end
  return table.concat(parts, "\0")
end

-- The partition stream of event ev (of listener l): its table and key columns (from the
-- old row when the event has one, so an update or delete goes where the row's insert went).
function Sink:stream_of(ev, l)
  return self.stream .. ":" .. self.out:partition(ev, key_of(self, ev, l))
end

-- The loop's source contract (flash._add_source): the connection while replies are due,
-- a deadline while output waits for room or a reconnect is due.
local function source(self)
  return {
    fds = function()
      if self.connected and self.sent > self.head then return { self.out:fd() } end
      return {}
    end,
    deadline = function()
      if self.head == self.tail then return nil end
      if not self.connected then return self.retry_at or core.now() end
      if self.writing or self.sent < self.tail then return core.now() + 0.001 end
      return nil
    end,
    step = function() self:step() end,
  }
end

local function start(self)
  self.started = true
  self.src = source(self)
  flash._add_source(self.src)
  self.stop_hook = flash.on_stop(function()
    local ok, err = self:flush()
    if not ok and self.head < self.tail then
      error(string.format("redis sink: %d events were not written (%s); they are delivered again at the next " ..
        "start", self:waiting(), tostring(err)), 0)
    end
  end)
end

-- The direct path (flash.driver.wal_logical): the outbox and the key columns that the
-- driver's lrepl may write the events of listener l into itself, with no Lua event, as
-- this sink would; nil when the sink's key is a function (Lua must call it).
function Sink:direct_target(l)
  if self.keyfn then return nil end
  local keys = self.key
  if not self.key_given then
    local cols, err = M.key_columns(l)
    if err then return nil end
    keys = cols or { "id" }
  end
  if not self.started then start(self) end
  return self.out, keys
end

-- The direct path wrote k more events into the outbox (tok: their acknowledgement token).
function Sink:direct_added(k, tok)
  local t = self.tail
  self.q[t] = setmetatable({ n = k, tok = tok }, Group)
  self.stats.direct = self.stats.direct + k
  self.tail, self.sent = t + 1, t + 1
  self.added = self.added + k
end

-- ...and once every relation's are queued (a sink's partitions share its outbox): the
-- output is written each `batch` events.
function Sink:direct_pump()
  if self.added >= self.batch then self:pump() end
end

-- The events waiting (written or not) for Redis's answer.
function Sink:waiting()
  local n, q = 0, self.q
  for i = self.head, self.tail - 1 do
    n = n + (getmetatable(q[i]) == Group and q[i].n or 1)
  end
  return n
end

-- The callback (listener:on calls it with the event and the listener): the event waits in
-- the sink until Redis holds it.
function Sink:__call(ev, l)
  if not self.started then
    if type(ev.ack) ~= "function" then
      error("flash.sink.redis needs flash.client{ ack = \"manual\", persistent = true }: an event is " ..
        "acknowledged only once Redis holds it", 2)
    end
    start(self)
  end
  local k = key_of(self, ev, l)
  if not self.connected then
    -- Queued first, so a failed attempt's warning counts it; a connection made now adds
    -- every waiting event, this one with them.
    self.q[self.tail], self.qk[self.tail] = ev, k
    self.tail = self.tail + 1
    self:reconnect()
    return
  end
  -- Encoded first: an event that cannot be encoded raises here and is not queued.
  self.out:add(ev, k)
  local t = self.tail
  self.q[t], self.qk[t] = ev, k
  self.tail, self.sent = t + 1, t + 1
  local added = self.added + 1
  self.added = added
  if added >= self.batch then self:pump() end
end

-- A connection, with every waiting event added to it: true, or false (retried later).
function Sink:reconnect()
  if self.retry_at and core.now() < self.retry_at then return false end
  local ok, err = self.out:connect(self.host, self.port, self.timeout)
  if not ok then
    self:failed(err)
    return false
  end
  if self.had_conn then
    self.stats.reconnects = self.stats.reconnects + 1
    -- (After a refused XADD the connection was dropped by us, not lost: no news.)
    if not self.refused then log.warn("redis sink: reconnected to " .. M.where(self.host, self.port)) end
  end
  self.connected, self.had_conn = true, true
  -- The backoff and the last error are reset only once Redis answers an XADD (pump): a
  -- connection that Redis accepts but whose XADDs it refuses (a key of another type, out
  -- of memory) must back off too, and warn once, not ten times a second.
  self.retry_at = nil
  local q = self.q
  local qk = self.qk
  for i = self.head, self.tail - 1 do
    local e = q[i]
    if getmetatable(e) == Group then self.out:readd(e.n) else self.out:add(e, qk[i]) end
  end
  self.sent, self.added = self.tail, self.tail - self.head
  return true
end

-- Writes what the socket takes and acknowledges what Redis answered, without waiting:
-- true, or nil and why (the connection is dropped; its events wait for the next one).
function Sink:pump()
  local out = self.out
  self.added = 0
  local done, err = out:send()
  if done == nil then
    self.refused = nil
    return self:lost(err)
  end
  self.writing = not done
  local n, refused = out:receive()
  if n == nil then
    self.refused = nil
    return self:lost(refused)
  end
  if n > 0 then
    local q, qk, i = self.q, self.qk, self.head
    local left = n
    while left > 0 do
      local e = q[i]
      if getmetatable(e) == Group then
        -- Events of the direct path: their commands are no longer kept.
        local take = e.n < left and e.n or left
        out:drop(take)
        e.tok.acks:ack_n(e.tok, take)
        e.n, left = e.n - take, left - take
        if e.n == 0 then
          q[i] = nil
          i = i + 1
        end
      else
        e:ack()
        q[i], qk[i] = nil, nil
        i, left = i + 1, left - 1
      end
    end
    self.head = i
    if self.last_err then
      self.retry:reset()
      self.last_err, self.refused = nil, nil
    end
    self.stats.sent = self.stats.sent + n
    self.stats.batches = self.stats.batches + 1
    if self.head == self.tail then
      -- Empty: the indexes start over, so the queue stays a dense array.
      self.head, self.sent, self.tail = 1, 1, 1
    end
  end
  -- Redis refused an entry (a wrong type, out of memory): nothing from it on is
  -- acknowledged; it and what follows are written again later.
  if refused then
    self.refused = true
    return self:lost("XADD refused: " .. refused)
  end
  return true
end

-- The loop's turn: a reconnect when due, the output written, the replies read.
function Sink:step()
  if self.head == self.tail then return end
  if not self.connected and not self:reconnect() then return end
  self:pump()
end

-- Writes every waiting event and waits for Redis's answers (the stop hook): true, or nil
-- and why (the events stay, and are written again later or at the next start).
function Sink:flush()
  if self.head == self.tail then return true end
  self.retry_at = nil
  if not self.connected and not self:reconnect() then return nil, self.last_err end
  local deadline = core.now() + self.timeout
  while self.head < self.tail do
    local ok, err = self:pump()
    if not ok then return nil, err end
    if self.head == self.tail then break end
    local now = core.now()
    if now >= deadline then
      return self:lost(string.format("no reply from Redis in %gs", self.timeout))
    end
    self.out:wait(deadline - now)
  end
  return true
end

-- The connection failed: its events wait for the next one, after a backoff.
function Sink:lost(err)
  self.out:close()
  self.connected, self.writing = false, false
  self.sent = self.head
  return self:failed(err)
end

function Sink:failed(err)
  self.stats.errors = self.stats.errors + 1
  local wait = self.retry:next()
  if err ~= self.last_err then
    log.warn(string.format("redis sink: %s; %d events wait and are sent again (retrying in %.1fs)", tostring(err),
      self:waiting(), wait))
  end
  self.last_err = err
  self.retry_at = core.now() + wait
  return nil, err
end

return M
