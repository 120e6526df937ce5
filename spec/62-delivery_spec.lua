-- spec/62-delivery_spec.lua: delivery under the script's control (issue 11): stop hooks
-- that run before the final confirmation, stable event ids, and manual acknowledgements
-- whose confirmed position never passes an unacknowledged event.
local flash = require "flash"
local core = require "flash.core"
local H = require "helpers"

local wait_for, drop_slot, lines = H.wait_for, H.drop_slot, H.lines

-- The slot's confirmed position, as a number.
local function confirmed(slot)
  local v = H.scalar("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", slot)
  return v and core.lsn(v) or 0
end

describe("delivery under the script's control", function()
  local session = H.session()
  local spawn, script, tmp = session.spawn, session.script, session.tmp
  after_each(session.cleanup)

  describe("stop hooks", function()
    -- A batching script: events are buffered, and written out only by the stop hooks.
    -- arg: out file, table, driver, how to stop ("signal", "flash.stop", "until", "error").
    local BATCHER = [[
      local flash = require "flash"
      local out = assert(io.open(arg[1], "a"))
      out:setvbuf("line")
      local c = assert(flash.client { driver = arg[3], persistent = arg[3] == "wal_logical" and nil })
      local buf = {}
      assert(c:listen { table = arg[2] }):on("insert", function(ev)
        buf[#buf + 1] = ev.new.id
        print("got " .. #buf)
        if arg[4] == "flash.stop" and #buf == 3 then flash.stop() end
      end)
      c:on_stop(function(client)
        assert(client == c)
        out:write("client hook: ", table.concat(buf, ","), "\n")
      end)
      flash.on_stop(function()
        out:write("flash hook: ", table.concat(buf, ","), "\n")
        if arg[4] == "error" then error("the sink is down") end
      end)
      assert(c:start())
      io.stdout:setvbuf("no")
      print("ready")
      if arg[4] == "until" then
        -- Once the rows are written: "current" is then past them.
        while not io.open(arg[5]) do require("flash.core").sleep(0.02) end
        local ok, err = c:run { until_lsn = "current" }
        out:write("run: ", tostring(ok), " ", tostring(err), "\n")
      end
    ]]

    local function batch_run(driver, how, sig)
      local t = H.table("id int PRIMARY KEY")
      local out = tmp()
      local s = script(BATCHER)
      local go = tmp()
      os.remove(go)
      local h = spawn({ s, out, t, driver, how, go })
      assert.is_true(h.await("ready", 20), h.err())
      for i = 1, 3 do H.sql("INSERT INTO " .. t .. " VALUES ($1)", i) end
      io.open(go, "w"):close()
      if sig then
        -- Once the events reached the callback (buffered, not yet written out).
        assert.is_true(h.await("got 3", 20), h.err())
        h.kill(sig)
      end
      local rc = h.wait(30)
      return rc, lines(out), h.err()
    end

    for _, sig in ipairs({ "TERM", "INT" }) do
      for _, driver in ipairs({ "wal_logical", "trigger" }) do
        it(string.format("run on SIG%s with every delivered event (%s)", sig, driver), function()
          local rc, out, err = batch_run(driver, "signal", sig)
          assert.equal(0, rc, err)
          assert.same({ "flash hook: 1,2,3", "client hook: 1,2,3" }, out)
        end)
      end
    end

    it("run on flash.stop()", function()
      local rc, out, err = batch_run("wal_logical", "flash.stop")
      assert.equal(0, rc, err)
      assert.same({ "flash hook: 1,2,3", "client hook: 1,2,3" }, out)
    end)

    it("run when until_lsn is reached, before run returns", function()
      local rc, out, err = batch_run("wal_logical", "until")
      assert.equal(0, rc, err)
      assert.same({ "flash hook: 1,2,3", "client hook: 1,2,3", "run: true nil" }, out)
    end)

    it("an error in one is logged and fails the stop: exit status 1, and the client's own hook still runs", function()
      local rc, out, err = batch_run("wal_logical", "error", "TERM")
      assert.equal(1, rc)
      assert.matches("flash.on_stop hook failed: [^\n]*the sink is down", err)
      assert.matches("nothing more is confirmed", err, 1, true)
      assert.same({ "flash hook: 1,2,3", "client hook: 1,2,3" }, out)
    end)

    it("client:stop() runs the client's hooks; an error makes it return nil, err", function()
      local t = H.table("id int")
      local c = assert(flash.client { driver = "wal_logical" })
      assert(c:listen { table = t }):on("insert", function() end)
      local calls = {}
      c:on_stop(function() calls[#calls + 1] = "a" end)
      local cancel = c:on_stop(function() calls[#calls + 1] = "cancelled" end)
      c:on_stop(function() calls[#calls + 1] = "b" error("boom") end)
      cancel()
      assert(c:start())
      local ok, err = c:stop()
      assert.same({ "a", "b" }, calls)
      assert.is_nil(ok)
      assert.matches("on_stop hook failed: [^\n]*boom", err)
      assert.matches("boom", flash._take_stop_failure(), 1, true)
    end)

    it("reports a hook's error with a traceback when it has a position, as it is when raised at level 0", function()
      local t = H.table("id int")
      local c = assert(flash.client { driver = "wal_logical" })
      assert(c:listen { table = t }):on("insert", function() end)
      c:on_stop(function() error("the sink is down") end)
      assert(c:start())
      local ok, err = c:stop()
      assert.is_nil(ok)
      assert.matches("on_stop hook failed: [^\n]*the sink is down\nstack traceback:", err)
      flash._take_stop_failure()
      c = assert(flash.client { driver = "wal_logical" })
      assert(c:listen { table = t }):on("insert", function() end)
      c:on_stop(function() error("sink: 3 events were not written (Redis at 127.0.0.1:6379: refused)", 0) end)
      assert(c:start())
      ok, err = c:stop()
      assert.is_nil(ok)
      assert.equal("on_stop hook failed: sink: 3 events were not written (Redis at 127.0.0.1:6379: refused)", err)
      flash._take_stop_failure()
    end)

    it("refuses a hook that is not a function", function()
      assert.has_error(function() flash.on_stop("x") end, "bad argument #1 to 'on_stop' (function expected, got string)")
    end)
  end)

  describe("event ids", function()
    it("are the commit LSN and the position in the transaction, fixed-width hex that sorts in delivery order", function()
      local t = H.table("id int PRIMARY KEY, v int")
      H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
      local c, events = H.listen({ table = t }, "all", { driver = "wal_logical" })
      H.sql("INSERT INTO " .. t .. " VALUES (1, 1), (2, 2); UPDATE " .. t .. " SET v = 3 WHERE id = 1")
      H.sql("DELETE FROM " .. t .. " WHERE id = 2; TRUNCATE " .. t)
      H.wait(c, events, 5)
      c:stop()
      local got = {}
      for i, ev in ipairs(events) do
        got[i] = { ev.op, ev.id }
      end
      local function id(lsn, pos) return string.format("%016X/%08X", core.lsn(lsn), pos) end
      -- Each statement is its own transaction here (simple query protocol, one per H.sql).
      assert.same({
        { "insert", id(events[1].lsn, 1) }, { "insert", id(events[1].lsn, 2) }, { "update", id(events[1].lsn, 3) },
        { "delete", id(events[4].lsn, 1) }, { "truncate", id(events[4].lsn, 2) },
      }, got)
      for i = 2, #events do assert.is_true(events[i].id > events[i - 1].id) end
    end)

    it("a key change split into a delete and an insert (primary_key) gives the insert the id with .1", function()
      local t = H.table("id int PRIMARY KEY, v int")
      H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
      H.sql("INSERT INTO " .. t .. " VALUES (1, 1)")
      local c, events = H.listen({ table = t, primary_key = { "id" } }, "all", { driver = "wal_logical" })
      H.sql("UPDATE " .. t .. " SET id = 2")
      H.wait(c, events, 2)
      c:stop()
      local base = string.format("%016X/%08X", core.lsn(events[1].lsn), 1)
      assert.same({ { "delete", base }, { "insert", base .. ".1" } },
        { { events[1].op, events[1].id }, { events[2].op, events[2].id } })
      assert.is_true(events[2].id > events[1].id)
    end)

    it("are the same when a transaction is delivered again", function()
      local t = H.table("id int")
      local slot = "flash_spec_ids"
      drop_slot(slot)
      local function run(fail_at)
        local c = assert(flash.client { driver = "wal_logical", persistent = true, slot = slot, publication = slot })
        local ids = {}
        assert(c:listen { table = t }):on("insert", function(ev)
          if ev.new.id == fail_at then error("not now") end
          ids[#ids + 1] = ev.new.id .. " " .. ev.id
        end)
        assert(c:start())
        return c, ids
      end
      local c1, first = run(3)
      H.sql("INSERT INTO " .. t .. " VALUES (1)")
      H.sql("INSERT INTO " .. t .. " VALUES (2); INSERT INTO " .. t .. " VALUES (3)")
      local deadline = core.now() + 10
      local ok
      repeat ok = c1:poll(0.05) until not ok or core.now() > deadline
      assert.is_nil(ok)     -- the callback failed on row 3: its transaction stays unconfirmed
      c1:stop()
      local c2, second = run(nil)
      H.wait(c2, second, 2)
      c2:stop()
      drop_slot(slot)
      -- Run one saw row 1 (its own transaction) and row 2; the transaction of rows 2 and 3
      -- comes again, row 2 under the id it had.
      assert.equal(2, #first)
      assert.equal(2, #second)
      assert.equal(first[2], second[1])
      assert.equal("3 " .. first[2]:match("^2 (%x+)/00000001$") .. "/00000002", second[2])
    end)

    it("are absent under the trigger drivers (no redelivery to make them stable for)", function()
      local t = H.table("id int")
      local c, events = H.listen({ table = t }, "insert", { driver = "trigger" })
      H.sql("INSERT INTO " .. t .. " VALUES (1)")
      H.wait(c, events, 1)
      c:stop()
      assert.equal(1, #events)
      assert.is_nil(events[1].id)
    end)
  end)

  describe("manual acknowledgements", function()
    local function manual(slot, extra)
      local o = { driver = "wal_logical", persistent = true, slot = slot, publication = slot, ack = "manual" }
      for k, v in pairs(extra or {}) do o[k] = v end
      return assert(flash.client(o))
    end

    -- The rows of a run that follows everything committed so far: what was not confirmed.
    local function redelivered(slot, t)
      local c = manual(slot)
      local ids = {}
      assert(c:listen { table = t }):on("insert", function(ev) ids[#ids + 1] = ev.new.id ev:ack() end)
      assert(c:run { until_lsn = "current" })
      return ids
    end

    -- A fresh slot and a started manual client whose events land in the list it returns.
    local function collecting(slot, extra)
      local t = H.table("id int")
      drop_slot(slot)
      local c = manual(slot, extra)
      local evs = {}
      assert(c:listen { table = t }):on("insert", function(ev) evs[#evs + 1] = ev end)
      assert(c:start())
      return c, evs, t
    end

    it("are refused where an unacknowledged event could not be delivered again, and checked", function()
      for _, case in ipairs({
        { { driver = "trigger", ack = "manual" },
          'option \'ack\': "manual" needs persistent = true (only a persistent slot or capture schema delivers ' ..
          'an unacknowledged event again; got driver = "trigger", persistent = false)' },
        { { driver = "wal_logical", ack = "manual" }, "persistent = false" },
        { { driver = "wal_logical", ack = "later" }, [[option 'ack': "auto" or "manual" expected, got "later"]] },
        { { driver = "wal_logical", persistent = true, ack = "manual", max_unacked = 0 }, "option 'max_unacked'" },
      }) do
        local ok, err = pcall(flash.client, case[1])
        assert.is_false(ok)
        assert.matches(case[2], err, 1, true)
      end
      local c = assert(flash.client { driver = "wal_logical" })
      assert.has_error(function() c:ack({}) end,
        "'ack' needs flash.client{ ack = \"manual\" } (this client acknowledges automatically)")
      c:stop()
    end)

    it("confirm only past events that are all acknowledged, in commit order, whatever order the acks come in", function()
      local slot = "flash_spec_ack_order"
      local c, evs, t = collecting(slot)
      for i = 1, 4 do H.sql("INSERT INTO " .. t .. " VALUES ($1)", i) end
      H.wait(c, evs, 4)
      assert.equal(4, c:stats().unacked)
      local before = confirmed(slot)
      -- 4 and 2 first: nothing may be confirmed while 1 is outstanding.
      assert.is_true(evs[4]:ack())
      assert.is_true(c:ack(evs[2]))
      assert.is_false(evs[2]:ack())       -- once only
      H.settle(c, 1.2)                      -- longer than the confirmation delay
      assert.equal(before, confirmed(slot))
      -- 1: transactions 1 and 2 are wholly acknowledged; 3 is not.
      assert.is_true(evs[1]:ack())
      assert.equal(1, c:stats().unacked)
      assert(c:stop())                     -- a graceful stop confirms what was acknowledged
      assert.same({ 3, 4 }, redelivered(slot, t))
      drop_slot(slot)
    end)

    it("client:ack_through(ev) acknowledges ev and every event delivered before it", function()
      local slot = "flash_spec_ack_through"
      local c, evs, t = collecting(slot)
      H.sql("INSERT INTO " .. t .. " VALUES (1), (2)")
      H.sql("INSERT INTO " .. t .. " VALUES (3)")
      H.sql("INSERT INTO " .. t .. " VALUES (4)")
      H.wait(c, evs, 4)
      assert.is_true(c:ack_through(evs[3]))
      assert.equal(1, c:stats().unacked)
      assert.is_false(evs[2]:ack())
      assert(c:stop())
      assert.same({ 4 }, redelivered(slot, t))
      drop_slot(slot)
    end)

    it("pause reading at max_unacked outstanding events and resume as they are acknowledged", function()
      local slot = "flash_spec_ack_pause"
      local c, evs, t = collecting(slot, { max_unacked = 5 })
      for i = 1, 12 do H.sql("INSERT INTO " .. t .. " VALUES ($1)", i) end
      H.wait(c, evs, 5)
      H.settle(c, 0.5)
      assert.equal(5, #evs)
      assert.is_true(c:stats().paused)
      c:ack_through(evs[5])
      H.wait(c, evs, 10)
      H.settle(c, 0.3)
      assert.equal(10, #evs)
      c:ack_through(evs[10])
      H.wait(c, evs, 12)
      assert.is_false(c:stats().paused)
      local ids = {}
      for i, ev in ipairs(evs) do ids[i] = ev.new.id end
      assert.same({ 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12 }, ids)
      assert(c:stop())
      assert.same({ 11, 12 }, redelivered(slot, t))
      drop_slot(slot)
    end)

    -- A script that acknowledges the events of the rows arg[4] lists, as they come.
    local ACKER = [[
      local flash = require "flash"
      local out = assert(io.open(arg[1], "a"))
      out:setvbuf("line")
      local want = {}
      for id in arg[4]:gmatch("%d+") do want[tonumber(id)] = true end
      local c = assert(flash.client { driver = "wal_logical", persistent = true, slot = arg[2], publication = arg[2],
                                      ack = "manual" })
      local held = {}
      assert(c:listen { table = arg[3] }):on("insert", function(ev)
        out:write(ev.new.id, "\n")
        held[#held + 1] = ev
        -- Out of order: the wanted ones among what arrived, latest first.
        for i = #held, 1, -1 do
          if want[held[i].new.id] then held[i]:ack() table.remove(held, i) end
        end
      end)
      assert(c:start())
      io.stdout:setvbuf("no")
      print("ready")
    ]]

    -- Runs it on a fresh slot and table; writes rows 1..5, one transaction each, and waits
    -- until all five reached the callback.
    local function acker_run(slot, acks)
      local t = H.table("id int")
      drop_slot(slot)
      local out = tmp()
      local h = spawn({ script(ACKER), out, slot, t, acks })
      assert.is_true(h.await("ready", 20), h.err())
      local before = confirmed(slot)
      for r = 1, 5 do H.sql("INSERT INTO " .. t .. " VALUES ($1)", r) end
      assert.is_true(wait_for(function() return #lines(out) >= 5 end, 20), h.err())
      return h, before, t
    end

    it("after kill -9 deliver again from the first unacknowledged event", function()
      local slot = "flash_spec_ack_kill"
      -- Five transactions: 1, 2, 4 and 5 acknowledged as they come, 3 never (so 4 and 5 after
      -- an older event still outstanding).
      local h, before, t = acker_run(slot, "1 2 4 5")
      -- Wait for the confirmation of 1 and 2 to reach the server, then kill without a stop.
      assert.is_true(wait_for(function() return confirmed(slot) > before end, 20))
      h.kill("KILL")
      assert.equal(137, h.wait(10))
      assert.same({ 3, 4, 5 }, redelivered(slot, t))
      drop_slot(slot)
    end)

    it("a SIGTERM confirms no unacknowledged event: they come again on restart", function()
      local slot = "flash_spec_ack_term"
      local h, _, t = acker_run(slot, "1 3 5")
      h.kill("TERM")
      assert.equal(0, h.wait(20), h.err())
      assert.same({ 2, 3, 4, 5 }, redelivered(slot, t))
      drop_slot(slot)
    end)

    it("an event whose callback failed under on_error = \"log\" is acknowledged, as in auto mode", function()
      local t = H.table("id int")
      local slot = "flash_spec_ack_log"
      drop_slot(slot)
      local c = manual(slot, { on_error = "log" })
      local n = 0
      assert(c:listen { table = t }):on("insert", function(ev)
        n = n + 1
        if ev.new.id == 1 then error("logged") end
        ev:ack()
      end)
      assert(c:start())
      H.sql("INSERT INTO " .. t .. " VALUES (1)")
      H.sql("INSERT INTO " .. t .. " VALUES (2)")
      local deadline = core.now() + 10
      while n < 2 and core.now() < deadline do assert(c:poll(0.05)) end
      assert.equal(2, n)
      assert.equal(0, c:stats().unacked)
      assert(c:stop())
      assert.same({}, redelivered(slot, t))
      drop_slot(slot)
    end)
  end)
end)
