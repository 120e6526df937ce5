-- flash.ack: manual acknowledgements (flash.client{ ack = "manual" }). A tracker keeps the
-- delivered events a script has not acknowledged yet, grouped by transaction in commit
-- order, and tells its driver how far the position may be confirmed: past a transaction
-- only once it and every transaction before it are wholly acknowledged.
local M = {}

local Tracker = {}
Tracker.__index = Tracker

-- confirm(pos, all_acked): everything before pos (a driver position) is acknowledged;
-- all_acked: no delivered event is outstanding.
--
-- The transactions with outstanding events form a list in commit order; the last one may
-- still be open (being delivered). A closed transaction whose events are all acknowledged
-- is folded into the one before it (which then ends at its position), or confirmed when it
-- is the first: so the list never holds more than one entry per outstanding event, and
-- memory stays bounded by `limit` whatever order the acks come in.
--
-- self.pending holds the tracker's outstanding events: [event] = { b = batch, seq = n }.
-- Events are plain tables; the tracker gives each the metatable of its own ev:ack().
function M.new(limit, confirm)
  local self = setmetatable({ limit = limit, confirm = confirm, head = nil, tail = nil, open = nil,
                              outstanding = 0, seq = 0, pending = {}, gen = 0 }, Tracker)
  -- ev:ack() -> true, or false when the event is not outstanding (acknowledged already, or
  -- from before a reconnect that will deliver it again).
  self.event_mt = { __index = { ack = function(ev) return self:ack(ev) end } }
  return self
end

-- The transaction being delivered: its entry in the list, made at its first event.
local function open_batch(self)
  local b = self.open
  if not b then
    b = { n = 0, prev = self.tail }
    if self.tail then self.tail.next = b else self.head = b end
    self.tail, self.open = b, b
  end
  return b
end

-- An event is handed to callbacks: it is outstanding until acknowledged.
function Tracker:track(ev)
  local pending = self.pending
  if pending[ev] then return end
  local b = open_batch(self)
  self.seq = self.seq + 1
  pending[ev] = { b = b, seq = self.seq }
  b.n = b.n + 1
  self.outstanding = self.outstanding + 1
  -- ev:ack() is for scripts that acknowledge; a tracker of the worker states under
  -- automatic acks (flash.workers) keeps it off.
  if not self.bare and getmetatable(ev) == nil then setmetatable(ev, self.event_mt) end
end

local function unlink(self, b)
  if b.prev then b.prev.next = b.next else self.head = b.next end
  if b.next then b.next.prev = b.prev else self.tail = b.prev end
end

-- A closed transaction with nothing outstanding: folded into the one before, or confirmed.
function Tracker:settle(b)
  if b.n > 0 or not b.pos then return end
  unlink(self, b)
  if b.prev then
    b.prev.pos = b.pos
  else
    self.confirm(b.pos, self.head == nil)
  end
end

-- The transaction being delivered ended at pos.
function Tracker:commit(pos)
  local b = self.open
  self.open = nil
  if b then
    b.pos = pos
    self:settle(b)
  elseif self.tail then
    -- None of its events was delivered: confirmable with the transaction before it.
    self.tail.pos = pos
  else
    self.confirm(pos, true)
  end
end

function Tracker:ack(ev)
  local e = self.pending[ev]
  if not e then return false end
  self.pending[ev] = nil
  e.b.n = e.b.n - 1
  self.outstanding = self.outstanding - 1
  self:settle(e.b)
  return true
end

-- k events of the transaction being delivered that no script holds (the Redis sink's
-- direct path: lrepl wrote them into its outbox without Lua events): outstanding until
-- ack_n. Returns their token.
function Tracker:track_n(k)
  local b = open_batch(self)
  b.n = b.n + k
  self.outstanding = self.outstanding + k
  return { acks = self, b = b, gen = self.gen }
end

-- k of the events of token tok are acknowledged (false: they are from before a reset).
function Tracker:ack_n(tok, k)
  if tok.gen ~= self.gen then return false end
  local b = tok.b
  b.n = b.n - k
  self.outstanding = self.outstanding - k
  self:settle(b)
  return true
end

-- Acknowledges ev and every outstanding event delivered before it.
function Tracker:ack_through(ev)
  local e = self.pending[ev]
  if not e then return false end
  local list = {}
  for x, px in pairs(self.pending) do
    if px.seq <= e.seq then list[#list + 1] = { px.seq, x } end
  end
  table.sort(list, function(a, b) return a[1] < b[1] end)
  for _, it in ipairs(list) do self:ack(it[2]) end
  return true
end

-- Whether the driver must stop reading until the script acknowledges some events.
function Tracker:full()
  return self.outstanding >= self.limit
end

-- Forgets every outstanding event (a reconnect delivers them again, as new events).
function Tracker:reset()
  self.pending = {}
  self.gen = self.gen + 1
  self.head, self.tail, self.open, self.outstanding = nil, nil, nil, 0
end

return M
