-- spec/35-max_lag_spec.lua: the max_lag client option (wal_logical): a warning once the WAL
-- the slot holds unconfirmed passes it, and a line once the client caught up.
local H = require "helpers"
local flash = require "flash"
local core = require "flash.core"

describe("max_lag", function()
  it("warns once when the unconfirmed WAL passes max_lag, and says when it caught up", function()
    local t = H.table("id int PRIMARY KEY, v text")
    local slot = "flash_lag_" .. core.getpid()
    local lines = {}
    local old = flash.log.set_sink(function(line) lines[#lines + 1] = line end)
    local ok, err = pcall(function()
      local c = assert(flash.client { driver = "wal_logical", persistent = true, ack = "manual", slot = slot,
        publication = slot, max_lag = 64 * 1024, name = "lagging" })
      local events = {}
      assert(c:listen { table = t }):on("insert", function(ev) events[#events + 1] = ev end)
      assert(c:start())
      H.sql("INSERT INTO " .. t .. " SELECT g, repeat('x', 500) FROM generate_series(1, 1000) g")
      H.wait(c, events, 1000, 20)
      assert.are.equal(1000, #events)
      local function logged(pattern)
        for _, l in ipairs(lines) do if l:find(pattern) then return l end end
      end
      local warn_pat = "WARN  %[lagging db=[^%]]+%] replication slot " .. slot .. " holds [%d.]+ MB of WAL"
      local deadline = core.now() + 10
      while not logged(warn_pat) and core.now() < deadline do assert(c:poll(0.1)) end
      local w = logged(warn_pat)
      assert.truthy(w, table.concat(lines, "\n"))
      assert.matches("holds [%d.]+ MB of WAL %(max_lag = 0%.1 MB%): the callbacks are slower than the " ..
        "writers, or events wait for acknowledgements; the server keeps that WAL until they are confirmed$", w)
      c:ack_through(events[#events])
      -- The slot's restart position moves once the server logs running transactions after the
      -- confirmation (a checkpoint does; the background writer every 15 s).
      local back = "INFO  %[lagging db=[^%]]+%] replication slot " .. slot .. " caught up: it holds [%d.]+ MB of WAL " ..
        "%(max_lag = 0%.1 MB%)$"
      deadline = core.now() + 30
      local next_cp = core.now() + 1.5
      while not logged(back) and core.now() < deadline do
        assert(c:poll(0.1))
        if core.now() >= next_cp then H.sql("CHECKPOINT") next_cp = core.now() + 1.5 end
      end
      assert.truthy(logged(back), table.concat(lines, "\n"))
      local n = 0
      for _, l in ipairs(lines) do if l:find(warn_pat) then n = n + 1 end end
      assert.are.equal(1, n)
      c:stop()
    end)
    flash.log.set_sink(old)
    H.drop_slot(slot)
    assert(ok, err)
  end)

  it("refuses a max_lag that is not a positive number of bytes", function()
    assert.has_error(function() flash.client { driver = "wal_logical", max_lag = 0 } end,
      "bad argument #1 to 'client' (option 'max_lag': a number of bytes > 0 expected, got 0)")
  end)
end)
