-- spec/36-heartbeat_spec.lua: the heartbeat client option (wal_logical): on an idle listened
-- table, transactional logical messages give the slot commits to confirm, reaching no
-- callback; and flash.connect, a client that only runs queries and creates nothing.
local H = require "helpers"
local flash = require "flash"
local core = require "flash.core"

describe("heartbeat", function()
  it("writes a heartbeat while the listened table is idle, confirms its commit, and delivers nothing", function()
    local t = H.table("id int PRIMARY KEY, v text")
    local slot = "flash_hb_" .. core.getpid()
    local ok, err = pcall(function()
      local c = assert(flash.client { driver = "wal_logical", persistent = true, slot = slot, publication = slot,
        heartbeat = 0.3 })
      local calls = 0
      assert(c:listen { table = t }):on("insert", function() calls = calls + 1 end)
      assert(c:start())
      local deadline = core.now() + 1.5
      while core.now() < deadline do assert(c:poll(0.1)) end
      local s = c:stats()
      assert.is_true(s.heartbeats >= 2, "heartbeats: " .. tostring(s.heartbeats))
      assert.is_string(s.heartbeat_lsn)
      -- The last heartbeat so far: its commit is confirmed within a second or so of its
      -- delivery (later heartbeats go on meanwhile).
      local last = s.heartbeat_lsn
      local reached = H.wait_for(function()
        assert(c:poll(0.1))
        return H.scalar([[SELECT confirmed_flush_lsn >= $2::pg_lsn AS ok FROM pg_replication_slots
          WHERE slot_name = $1]], slot, last) == true
      end, 5)
      local pos = H.scalar("SELECT confirmed_flush_lsn::text AS p FROM pg_replication_slots WHERE slot_name = $1", slot)
      assert.is_true(reached, "confirmed_flush_lsn " .. tostring(pos) .. " behind the last heartbeat " .. last)
      assert.are.equal(0, calls)
      assert.are.equal(0, c:stats().events)
      c:stop()
    end)
    H.drop_slot(slot)
    assert(ok, err)
  end)

  it("refuses a heartbeat that is not a positive number of seconds", function()
    assert.has_error(function() flash.client { driver = "wal_logical", heartbeat = 0 } end,
      "bad argument #1 to 'client' (option 'heartbeat': a number of seconds > 0 expected, got 0)")
    assert.has_error(function() flash.client { driver = "wal_logical", heartbeat = "5" } end,
      "bad argument #1 to 'client' (option 'heartbeat': number expected, got string)")
  end)
end)

describe("flash.connect", function()
  local function objects()
    return H.scalar([[SELECT (SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'flash%')
      + (SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'flash%')
      + (SELECT count(*) FROM pg_publication WHERE pubname LIKE 'flash%')
      + (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'flash%') AS n]])
  end

  it("runs queries, refuses listen, and creates nothing in the database", function()
    local before = objects()
    local c = assert(flash.connect(H.dsn))
    local rows = assert(c:query("SELECT $1::int + 1 AS n", 41))
    assert.are.equal(42, rows[1].n)
    assert.has_error(function() c:listen { table = "public.anything" } end,
      "client:listen: this client was made by flash.connect and only runs queries; " ..
      "use flash.client{...} to listen to a table")
    assert(c:start())
    assert(c:poll(0.05))
    assert.are.equal(before, objects())
    assert.are.equal("none", c:stats().driver)
    assert(c:stop())
    assert.are.equal(before, objects())
    local c2 = assert(flash.connect { dsn = H.dsn, name = "writer" })
    assert.are.equal(1, assert(c2:query("SELECT 1 AS one"))[1].one)
    c2:stop()
    assert.has_error(function() flash.connect(42) end, "bad argument #1 to 'connect' (DSN string or options table expected, got number)")
  end)
end)
