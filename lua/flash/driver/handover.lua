-- flash.driver.handover: wal_logical with a temporary slot gives back the memory of a huge
-- row by moving to a second temporary slot, on a new replication connection, without a
-- gap or a repeat; the old connection, and libpq's input buffer with it, then goes.
--
-- A temporary slot cannot outlive its connection, and libpq never shrinks a connection's
-- input buffer (a row of 100 MB keeps 128 MB or more). So once a transaction with a
-- message over LARGE_MESSAGE is handled:
--   1. a new replication connection sends CREATE_REPLICATION_SLOT (TEMPORARY) without
--      waiting: the server answers only once every transaction running when it began has
--      ended, and the old stream is read and delivered meanwhile;
--   2. its answer is the new slot's consistent point X. The server decodes a transaction
--      in a slot only if its commit record starts at or after the slot's start point
--      (decode.c: SnapBuildXactNeedsSkip(builder, commit origptr), start_decoding_at =
--      X), and every such one fully (snapbuild.c reaches CONSISTENT only once every
--      transaction running before it has ended). The old stream may have delivered
--      transactions committed at or after X while the command ran, so the cut is T, the
--      larger of X and just past the commit LSN of the last transaction the old stream
--      delivered (or had begun to): the old stream delivers what commits before T and
--      skips the rest, the new one skips what commits before T;
--   3. once the old stream has read up to X (a keepalive or message at X or past it:
--      everything before it was sent first, in commit order) and is not inside a
--      transaction it delivers, the old connection is closed (its slot is dropped) and
--      the new slot is streamed from X.
-- Logical messages (backfill marks) are cut at T alike; one the new stream repeats is
-- ignored by flash.backfill (its chunk is no longer in flight).
local core = require "flash.core"
local log = require "flash.log"
local backfill = require "flash.backfill"

local M = {}

-- A message over this many bytes leaves libpq's input buffer at least as large.
M.LARGE_MESSAGE = 8 * 1024 * 1024
local RETRY = 60
-- While the old stream catches up with X it is asked this often how far it has read.
local ASK_INTERVAL = 0.05

-- The other of the client's two temporary slot names (a slot is dropped only once its
-- walsender has exited, so the new one cannot take the old one's name).
local function other_name(d)
  if not d.slot_names then
    local base = d.slot
    d.slot_names = { base, (#base <= 61 and base or base:sub(1, 61)) .. "_b" }
  end
  return d.slot == d.slot_names[1] and d.slot_names[2] or d.slot_names[1]
end

-- keep_cut: the old stream stops (a graceful stop) and keeps skipping from T on, so the
-- rest of a transaction it has begun to skip is not delivered without its start.
local function give_up(d, err, keep_cut)
  local h = d.handover
  d.handover = nil
  if h then
    if h.dispatch and not (keep_cut and h.t) then d.dispatch = h.dispatch end
    if h.repl then h.repl:close() end
  end
  if err then
    d.handover_after = core.now() + RETRY
    log.warn(string.format("cannot move to a new temporary slot to free the %d MB the replication connection holds " ..
      "since a large row: %s; the connection is kept, with that memory, and the move is tried again in %d s",
      math.floor((d.repl and d.repl:state().largest_message or 0) / 1048576), (tostring(err):gsub("%s+$", "")), RETRY))
  end
end

-- A server's error as what to do about it, in one line: its HINT and DETAIL lines go
-- (slot_error names the fix).
local function slot_error(d, err, state)
  return select(2, d:slot_error((tostring(err):gsub("\n%u+:  [^\n]*", "")), state))
end

-- Whether the stream holds a large row's buffer that a hand-over would free now: a
-- temporary slot's stream between transactions, no hand-over under way or due later.
function M.wanted(d, st)
  return not d.persistent and d.hand_over and not d.handover and st.largest_message > M.LARGE_MESSAGE and
    not st.in_txn and not st.streams_open and core.now() >= (d.handover_after or 0)
end

-- Events go through the cut: before T is known the old stream delivers everything and
-- notes the commit LSN of the last transaction it delivered (h.last); then it skips from
-- T on. The new stream's filter (after the switch) skips what commits before T, and
-- steps aside at the first transaction past it.
local function wrap(d, h)
  local deliver = d.dispatch
  h.dispatch = deliver
  d.dispatch = function(ev, ...)
    local t = h.t
    if not t then
      h.last = ev.lsn
    elseif core.lsn(ev.lsn) >= t then
      return true
    end
    return deliver(ev, ...)
  end
end

local function skip_before(d, deliver, t)
  d.dispatch = function(ev, ...)
    if core.lsn(ev.lsn) < t then return true end
    d.dispatch = deliver
    return deliver(ev, ...)
  end
end

-- Step 2: X is known; the cut T is set.
local function cut(d, h, x)
  h.x = x
  local last = h.last and core.lsn(h.last) or 0
  h.t = math.max(x, last + 1)
  log.debug(string.format("slot %s is consistent at %s; the old stream delivers what commits before %s", h.slot,
    core.lsn(x), core.lsn(h.t)))
  d.repl:on_message(backfill.PREFIX, function(lsn, content)
    if lsn > h.t then return true end
    return backfill.on_message(d.client, lsn, content)
  end)
end

-- Step 1: the new connection, and its slot asked for.
function M.begin(d)
  local name = other_name(d)
  local repl, err = core.replication(d.client:dsn())
  if not repl then return give_up(d, slot_error(d, err)) end
  local ok, serr, state = repl:send("CREATE_REPLICATION_SLOT " .. d:ident(name) .. " TEMPORARY LOGICAL pgoutput NOEXPORT_SNAPSHOT")
  d.handover = { repl = repl, slot = name, since = core.now() }
  if not ok then return give_up(d, slot_error(d, serr, state)) end
  wrap(d, d.handover)
  log.info(string.format("a message of %d bytes came on replication slot %s: moving to temporary slot %s to free " ..
    "its buffer (the slot is ready once the transactions running now have ended)", d.repl:state().largest_message,
    d.slot, name))
end

-- Step 3: the new slot becomes the client's.
local function switch(d, h)
  local st = d.repl:state()
  skip_before(d, h.dispatch, h.t)
  d.repl:close()
  d.repl = nil
  local was = d.slot
  d.slot = h.slot
  -- What the stats and until_lsn count from: everything before X was delivered.
  local carried = d.carried or { messages = 0 }
  d.carried = { messages = carried.messages + st.messages, flushed = math.min(st.flushed, h.t),
    delivered = math.min(st.delivered, h.t), received = h.x, server_end = math.max(st.server_end, h.x) }
  local ok, err = d:start_stream(h.repl, true)
  d.handover = nil
  if not ok then
    -- The new slot is gone with its connection (start_stream closed it): as a lost stream.
    return d:lost(err)
  end
  -- The publication names the slot that shows its instance is alive (remove_leftovers).
  local pub = d:ident(d.publication)
  local rows = d:exec("SELECT pg_catalog.obj_description(oid, 'pg_publication') AS c FROM pg_catalog.pg_publication " ..
    "WHERE pubname = $1", d.publication)
  local comment = rows and rows[1] and rows[1].c
  if type(comment) == "string" then
    d:exec("COMMENT ON PUBLICATION " .. pub .. " IS " .. d:literal((comment:gsub(", slot [%w_]+%)$", ", slot " .. d.slot .. ")"))))
  end
  core.release_memory()
  log.info(string.format("moved from temporary slot %s to %s at %s (after %.1f s): the replication connection's " ..
    "buffer of a large row is freed", was, d.slot, core.lsn(h.x), core.now() - h.since))
  return true
end

-- One loop step of a hand-over under way (before the old stream is read).
function M.step(d)
  local h = d.handover
  if not h then return true end
  if not h.x then
    local rows, err, state = h.repl:result()
    if rows == false then return true end
    if not rows then return give_up(d, slot_error(d, err, state)) or true end
    local x = rows[1] and rows[1].consistent_point and core.lsn(rows[1].consistent_point)
    if not x then return give_up(d, "CREATE_REPLICATION_SLOT gave no consistent point") or true end
    cut(d, h, x)
  end
  local st = d.repl:state()
  -- Inside a transaction the old stream delivers (commit before T, events of it seen
  -- last), the switch waits for its end.
  local delivering = st.in_txn and h.last and core.lsn(h.last) < h.t
  if st.received >= h.x and not delivering then return switch(d, h) end
  local now = core.now()
  if now - (h.asked or 0) >= ASK_INTERVAL then
    h.asked = now
    d.repl:status(true)   -- the keepalive it answers tells how far the old stream has read
  end
  return true
end

-- The old stream ends another way (lost, or stopping: then it ends at the cut): the new
-- slot goes too.
function M.abandon(d, stopping)
  if d.handover then give_up(d, nil, stopping) end
end

-- The descriptor to wait on while the new slot is being created.
function M.fd(d)
  local h = d.handover
  return h and not h.x and h.repl:fd() or -1
end

-- When the loop must look again: while the old stream catches up, soon.
function M.deadline(d, due)
  local h = d.handover
  if h and h.x then return math.min(due, (h.asked or 0) + ASK_INTERVAL) end
  return due
end

-- A stream position as the client has delivered it: the old stream's skipped transactions
-- (from T on) do not count, and a new stream counts from where the old one left.
function M.position(d, st, key)
  local v = st[key]
  if d.handover and d.handover.t and (key == "delivered" or key == "flushed") then v = math.min(v, d.handover.t) end
  if d.carried and d.carried[key] then v = math.max(v, d.carried[key]) end
  return v
end

-- Messages received over all of the client's streams.
function M.messages(d, st)
  return st.messages + (d.carried and d.carried.messages or 0)
end

return M
