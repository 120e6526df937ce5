-- spec/67-redis_source_spec.lua: PostgreSQL -> flashlua (wal_logical + flash.sink.redis) ->
-- Redis Streams -> two worker flashluas (driver = "redis_streams"), against a real
-- redis-server: the workers share the partitions, each handles its rows' events in commit
-- order, and when one is killed (-9) the other takes its partitions over, with the entries
-- it had read but not acknowledged: every change is handled at least once (issue 13, item 3).
local H = require "spec.helpers"
local core = require "flash.core"

local PARTS = 4

describe("driver = \"redis_streams\"", function()
  local s = H.session()
  local slot = "flash_spec_rsrc"
  local f = H.redis_fixture(s, slot, 7)
  before_each(f.setup)
  after_each(f.teardown)

  -- A capturer of t into `parts` streams (wal_logical, persistent slot, manual acks).
  local function capturer_script(t, parts)
    return s.script(string.format([[
local flash = require "flash"
local sink = require("flash.sink.redis").new { url = "redis://127.0.0.1:%d", partitions = %d }
local c = assert(flash.client { driver = "wal_logical", persistent = true, slot = %q, publication = %q, ack = "manual" })
assert(c:listen { table = %q }):on("all", sink)
assert(c:start())
io.stderr:write("ready\n")
assert(flash.run())
]], f.port, parts, slot, slot, t))
  end

  it("shares partitions between workers, keeps each row's order, and takes over a killed worker's", function()
    local t = H.table("id int PRIMARY KEY, v int")
    H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
    H.redis_start(f.dir, f.port)
    local capturer = capturer_script(t, PARTS)
    local worker = s.script(string.format([[
local flash = require "flash"
local c = assert(flash.client { driver = "redis_streams", url = "redis://127.0.0.1:%d", group = "spec",
  partitions = %d, claim_after = 1 })
assert(c:listen { table = %q }):on("all", function(ev)
  local row = type(ev.new) == "table" and ev.new or ev.old
  io.stdout:write(ev.op, " ", row.id, " ", row.v, "\n") io.stdout:flush()
end)
assert(c:start())
io.stderr:write("ready\n")
flash.every(0.1, function()
  io.stderr:write("held ", c:stats().partitions_held, "\n") io.stderr:flush()
end)
assert(flash.run())
]], f.port, PARTS, t))
    local cap = s.spawn({ capturer })
    assert.is_true(cap.await("ready", 15, "err"), cap.err())
    local a = s.spawn({ worker })
    assert.is_true(a.await("ready", 15, "err"), a.err())
    local b = s.spawn({ worker })
    assert.is_true(b.await("ready", 15, "err"), b.err())
    -- Both hold two partitions once they know of each other.
    local function holds(h, n) return h.err():match("held (%d+)\n[^\n]*$") == tostring(n) end
    assert.is_true(H.wait_for(function() return holds(a, 2) and holds(b, 2) end, 15), a.err() .. b.err())

    H.sql("INSERT INTO " .. t .. " SELECT g, 0 FROM generate_series(1, 40) g")
    for _ = 1, 3 do H.sql("UPDATE " .. t .. " SET v = v + 1") end
    local function lines(h)
      local out = {}
      for l in h.out():gmatch("[^\n]+") do out[#out + 1] = l end
      return out
    end
    assert.is_true(H.wait_for(function() return #lines(a) + #lines(b) >= 160 end, 20),
      #lines(a) .. " + " .. #lines(b))
    assert.is_true(#lines(a) > 0 and #lines(b) > 0)

    -- Worker a dies; b takes its partitions over (after claim_after) and what comes next.
    a.kill("KILL")
    a.wait(5)
    H.sql("UPDATE " .. t .. " SET v = v + 1")
    H.sql("DELETE FROM " .. t .. " WHERE id > 30")
    assert.is_true(H.wait_for(function() return holds(b, 4) end, 15), b.err())
    local want = {}
    for i = 1, 40 do
      want[#want + 1] = "insert " .. i .. " 0"
      for v = 1, 4 do want[#want + 1] = "update " .. i .. " " .. v end
    end
    for i = 31, 40 do want[#want + 1] = "delete " .. i .. " 4" end
    local function seen_all()
      local seen = {}
      for _, h in ipairs({ a, b }) do
        for _, l in ipairs(lines(h)) do seen[l] = true end
      end
      for _, k in ipairs(want) do if not seen[k] then return false, k end end
      return true
    end
    assert.is_true(H.wait_for(seen_all, 20), select(2, seen_all()))
    b.kill("TERM")
    assert.equal(0, b.wait(20), b.err())
    cap.kill("TERM")
    assert.equal(0, cap.wait(20), cap.err())

    -- Each worker saw each row's changes in commit order (a taken-over entry may come
    -- twice: once at a, again at b).
    local rank = { insert = 0, update = 1, delete = 9 }
    for _, h in ipairs({ a, b }) do
      local last = {}
      for _, l in ipairs(lines(h)) do
        local op, id, v = l:match("^(%a+) (%d+) (%d+)$")
        local r = rank[op] * 10 + tonumber(v)
        assert.is_true(r >= (last[id] or -1), "row " .. id .. " out of order: " .. l)
        last[id] = r
      end
    end
  end)

  -- A callback that blocks longer than claim_after (an HTTP call, a slow database) let
  -- the partition's lock expire: another worker took the partition over and handled the
  -- same entry while the first was still in it, and what followed, out of order.
  it("a worker whose callback blocks longer than claim_after keeps its partition: no other worker handles its entries",
    function()
    local t = H.table("id int PRIMARY KEY, v text")
    H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
    H.redis_start(f.dir, f.port)
    local cap = s.spawn({ capturer_script(t, 1) })
    assert.is_true(cap.await("ready", 15, "err"), cap.err())
    local worker = s.script(string.format([[
local flash = require "flash"
local core = require "flash.core"
local c = assert(flash.client { driver = "redis_streams", url = "redis://127.0.0.1:%d", group = "busy",
  partitions = 1, claim_after = 1 })
assert(c:listen { table = %q }):on("insert", function(ev)
  io.stdout:write(ev.new.id, " ", ev.new.v, "\n") io.stdout:flush()
  if ev.new.v == "slow" then core.sleep(4) end
end)
assert(c:start())
io.stderr:write("ready\n")
flash.every(0.1, function()
  local st = c:stats()
  io.stderr:write("held ", st.partitions_held, " kept ", st.kept_busy, "\n") io.stderr:flush()
end)
assert(flash.run())
]], f.port, t))
    local function holds(h, n) return h.err():match("held (%d+) kept %d+\n[^\n]*$") == tostring(n) end
    local a = s.spawn({ worker })
    assert.is_true(H.wait_for(function() return holds(a, 1) end, 15), a.err())
    local b = s.spawn({ worker })
    assert.is_true(b.await("ready", 15, "err"), b.err())
    H.sql("INSERT INTO " .. t .. " VALUES (1, 'slow')")
    H.sql("INSERT INTO " .. t .. " VALUES (2, 'next')")
    assert.is_true(H.wait_for(function() return a.out():find("2 next\n", 1, true) ~= nil end, 20),
      a.out() .. a.err() .. b.out())
    H.sql("INSERT INTO " .. t .. " VALUES (3, 'after')")
    assert.is_true(H.wait_for(function() return a.out():find("3 after\n", 1, true) ~= nil end, 20),
      a.out() .. b.out())
    core.sleep(1.5)   -- (what b would take over, it would have handled by now)
    assert.equal("1 slow\n2 next\n3 after\n", a.out())
    assert.equal("", b.out())
    assert.is_nil(a.err():find("taken over", 1, true), a.err())
    assert.is_true(tonumber(a.err():match("kept (%d+)\n[^\n]*$")) >= 2, a.err())
    for _, h in ipairs({ a, b, cap }) do
      h.kill("TERM")
      assert.equal(0, h.wait(20), h.err())
    end
  end)

  it("goes on when Redis loses the streams and the group (a restart without its file, a FLUSHALL)", function()
    -- A NOGROUP reply stopped the worker: "flashlua: XREADGROUP: NOGROUP No such key ...",
    -- exit 1, so every worker died when a Redis without its append-only file restarted.
    local t = H.table("id int PRIMARY KEY, v int")
    local conn = H.redis_start(f.dir, f.port)
    local worker = s.script(string.format([[
local flash = require "flash"
local c = assert(flash.client { driver = "redis_streams", url = "redis://127.0.0.1:%d", group = "spec",
  partitions = 2, claim_after = 1 })
assert(c:listen { table = %q }):on("all", function(ev)
  io.stdout:write(ev.op, " ", ev.new.id, "\n") io.stdout:flush()
end)
assert(c:start())
flash.every(0.1, function()
  io.stderr:write("held ", c:stats().partitions_held, "\n") io.stderr:flush()
end)
assert(flash.run())
]], f.port, t))
    local function add(p, id)
      local ev = string.format('{"id":"%d","table":"public.%s","op":"insert","new":{"id":%d,"v":0}}', id, t, id)
      assert(conn:pipeline({ { "XADD", "flash:" .. p, "*", "id", tostring(id), "table", "public." .. t, "op", "insert",
        "event", ev } }))
    end
    local w = s.spawn({ worker })
    assert.is_true(H.wait_for(function() return w.err():find("held 2\n", 1, true) ~= nil end, 15), w.err())
    add(0, 1)
    add(1, 2)
    assert.is_true(H.wait_for(function() return w.out() == "insert 1\ninsert 2\n" or w.out() == "insert 2\ninsert 1\n" end,
      15), w.out() .. w.err())
    -- The streams and the group go; the capturer writes the next events to new streams.
    assert(conn:pipeline({ { "FLUSHALL" } }))
    core.sleep(0.3)
    add(0, 3)
    add(1, 4)
    assert.is_true(H.wait_for(function()
      return w.out():find("insert 3\n", 1, true) ~= nil and w.out():find("insert 4\n", 1, true) ~= nil
    end, 15), w.out() .. w.err())
    assert.is_truthy(w.err():find("Redis lost the streams or the group (restarted without its append-only file?): " ..
      "creating group spec again, from the start of each stream", 1, true), w.err())
    w.kill("TERM")
    assert.equal(0, w.wait(20), w.err())
  end)

  it("after Redis restarts, a worker handles the entries it had read but not acknowledged before new ones", function()
    local t = H.table("id int PRIMARY KEY, v int")
    local conn = H.redis_start(f.dir, f.port)
    local worker = s.script(string.format([[
local flash = require "flash"
local core = require "flash.core"
local c = assert(flash.client { driver = "redis_streams", url = "redis://127.0.0.1:%d", group = "spec",
  partitions = 1, claim_after = 1 })
assert(c:listen { table = %q }):on("all", function(ev)
  io.stdout:write(ev.op, " ", ev.new.id, "\n") io.stdout:flush()
  if ev.new.id == 1 then core.sleep(1.5) end   -- entries 2 and 3 wait, read, meanwhile
end)
assert(c:start())
flash.every(0.1, function()
  io.stderr:write("held ", c:stats().partitions_held, "\n") io.stderr:flush()
end)
assert(flash.run())
]], f.port, t))
    local function add(id)
      local ev = string.format('{"id":"%d","table":"public.%s","op":"insert","new":{"id":%d,"v":0}}', id, t, id)
      assert(conn:pipeline({ { "XADD", "flash:0", "*", "id", tostring(id), "event", ev } }))
    end
    local w = s.spawn({ worker })
    assert.is_true(H.wait_for(function() return w.err():find("held 1\n", 1, true) ~= nil end, 15), w.err())
    add(1) add(2) add(3)
    assert.is_true(H.wait_for(function() return w.out() == "insert 1\n" end, 15), w.out() .. w.err())
    -- While the callback of entry 1 runs: Redis is killed, and comes back (its file holds
    -- the three entries and the worker's pending list).
    local pid = tonumber(H.lines(f.dir .. "/redis.pid")[1])
    os.execute("kill -9 " .. pid)
    conn:close()
    os.remove(f.dir .. "/redis.pid")
    conn = H.redis_start(f.dir, f.port)
    assert.is_true(H.wait_for(function() return w.err():find("reconnect", 1, true) ~= nil end, 15), w.err())
    assert.is_true(H.wait_for(function() return select(2, w.out():gsub("\n", "")) >= 2 end, 15), w.out() .. w.err())
    add(4)
    assert.is_true(H.wait_for(function() return w.out():find("insert 4\n", 1, true) ~= nil end, 15), w.out() .. w.err())
    core.sleep(0.3)
    -- At least once, and the first time each comes in order (entry 1, whose callback had not
    -- returned when the connection went, and those read with it may come again).
    local firsts, seen = {}, {}
    for id in w.out():gmatch("insert (%d+)\n") do
      if not seen[id] then seen[id] = true firsts[#firsts + 1] = tonumber(id) end
    end
    assert.are.same({ 1, 2, 3, 4 }, firsts, w.out())
    w.kill("TERM")
    assert.equal(0, w.wait(20), w.err())
  end)

  it("refuses an empty group, stream or consumer name", function()
    -- They were accepted: consumer = "" for every worker made them all hold every lock.
    for _, name in ipairs({ "group", "stream", "consumer" }) do
      local ok, err = pcall(require("flash").client, { driver = "redis_streams", [name] = "" })
      assert.is_false(ok)
      assert.equal("bad argument #1 to 'client' (option '" .. name .. "': a non-empty name expected)",
        (tostring(err):gsub("^.-:%d+: ", "")))
    end
  end)

  it("warns when the capturer writes more partitions than the worker reads", function()
    -- partitions = 2 at the worker and 4 at the capturer: flash:2 and flash:3 were never
    -- read, without a word.
    local t = H.table("id int PRIMARY KEY, v int")
    local conn = H.redis_start(f.dir, f.port)
    assert(conn:pipeline({ { "XADD", "flash:3", "*", "id", "1", "table", "public." .. t, "op", "insert", "event", "{}" } }))
    local worker = s.script(string.format([[
local flash = require "flash"
local c = assert(flash.client { driver = "redis_streams", url = "redis://127.0.0.1:%d", group = "spec",
  partitions = 2 })
assert(c:listen { table = %q }):on("all", function() end)
assert(c:start())
io.stderr:write("ready\n")
assert(flash.run())
]], f.port, t))
    local w = s.spawn({ worker })
    assert.is_true(w.await("ready", 15, "err"), w.err())
    assert.is_truthy(w.err():find("stream flash:3 exists, but this worker reads flash:0 .. flash:1 (partitions = 2): " ..
      "its events are never handled; give the workers the capturer's partitions", 1, true), w.err())
    w.kill("TERM")
    assert.equal(0, w.wait(20), w.err())
  end)
end)
