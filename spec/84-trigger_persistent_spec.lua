-- spec/84-trigger_persistent_spec.lua: the trigger drivers with persistent = true keep their
-- schema, triggers and captured rows across a graceful stop and a kill -9, so a restart
-- delivers everything committed meanwhile (issue 9 "with a durable mode, nothing is lost at
-- all"); a schema that a running instance holds is never touched by another's start.
local flash = require "flash"
local H = require "spec.helpers"

local TRIGGER_DRIVERS = { "trigger", "trigger_global", "trigger_statement" }

-- A consumer that prints "op id v" per event, sleeping FLASH_SPEC_SLEEP seconds in each.
local function consumer(s, driver, schema, t)
  return s.script(string.format([[
local flash = require "flash"
local core = require "flash.core"
local pause = tonumber(os.getenv("FLASH_SPEC_SLEEP") or "0")
local client = assert(flash.client { driver = %q, persistent = true, schema = %q })
local n = 0
assert(client:listen { table = %q }):on("all", function(ev)
  local row = ev.new ~= flash.null and ev.new or ev.old
  io.write(ev.op, " ", row.id, " ", row.v, "\n") io.stdout:flush()
  n = n + 1
  if n == 5 then io.stderr:write("busy\n") io.stderr:flush() end
  core.sleep(pause)
end)
assert(client:start())
io.stderr:write("ready\n") io.stderr:flush()
assert(flash.run())
]], driver, schema, t))
end

local function schema_exists(name)
  return H.scalar("SELECT to_regnamespace($1) IS NOT NULL", name)
end

for _, driver in ipairs(TRIGGER_DRIVERS) do
  describe("persistent = true (" .. driver .. ")", function()
    local s = H.session()
    local schema
    after_each(function()
      s.cleanup()
      if schema then H.sql("DROP SCHEMA IF EXISTS " .. schema .. " CASCADE") schema = nil end
    end)

    it("keeps schema, triggers and backlog across a stop and a kill -9: a restart delivers every change", function()
      local t = H.table("id int PRIMARY KEY, v int")
      schema = "flash_spec_keep_" .. driver
      local path = consumer(s, driver, schema, t)
      local delivered = {}
      local function collect(h)
        for line in h.out():gmatch("[^\n]+") do delivered[#delivered + 1] = line end
      end

      -- Run 1: a slow callback, stopped by SIGTERM with most rows still waiting.
      local h = s.spawn({ path }, { FLASH_SPEC_SLEEP = "0.01" })
      assert.is_true(h.await("ready", 15, "err"), h.err())
      H.sql("INSERT INTO " .. t .. " SELECT g, 0 FROM generate_series(1, 300) g")
      assert.is_true(h.await("busy", 15, "err"), h.err())
      h.kill("TERM")
      assert.equal(0, h.wait(30), h.err())
      assert.matches("captured changes wait for the next run", h.err(), 1, true)
      collect(h)
      assert.is_true(#delivered < 300)

      -- Nobody runs: the triggers still capture, and another instance's start leaves the
      -- schema alone.
      assert.is_true(schema_exists(schema))
      H.sql("UPDATE " .. t .. " SET v = 1 WHERE id <= 10")
      H.sql("DELETE FROM " .. t .. " WHERE id > 290")
      local other = H.table("id int")
      local c2 = assert(flash.client { driver = driver })
      assert(c2:listen { table = other }):on("all", function() end)
      assert(c2:start())
      c2:stop()
      assert.is_true(schema_exists(schema))

      -- Run 2: killed with -9 while delivering.
      h = s.spawn({ path }, { FLASH_SPEC_SLEEP = "0.01" })
      assert.is_true(h.await("busy", 15, "err"), h.err())
      h.kill("KILL")
      h.wait(10)
      collect(h)

      -- Run 3: delivers the rest.
      h = s.spawn({ path }, { FLASH_SPEC_SLEEP = "0" })
      assert.is_true(h.await("ready", 15, "err"), h.err())
      H.sql("INSERT INTO " .. t .. " VALUES (1000, 7)")
      assert.is_true(h.await("insert 1000 7", 15), h.out() .. h.err())
      h.kill("TERM")
      assert.equal(0, h.wait(30), h.err())
      collect(h)

      -- Every change arrived (a kill -9 may repeat what was delivered but not yet deleted).
      local want = {}
      for i = 1, 300 do want["insert " .. i .. " 0"] = true end
      for i = 1, 10 do want["update " .. i .. " 1"] = true end
      for i = 291, 300 do want["delete " .. i .. " 0"] = true end
      want["insert 1000 7"] = true
      local seen = {}
      for _, line in ipairs(delivered) do
        assert.is_true(want[line] or false, "unexpected event: " .. line)
        seen[line] = true
      end
      local missing = {}
      for k in pairs(want) do if not seen[k] then missing[#missing + 1] = k end end
      assert.same({}, missing)
      print(string.format("\n  persistent (%s): %d events for 321 changes over 3 runs", driver, #delivered))
      -- Per row, changes come in the order they were made.
      local pos = {}
      for i, line in ipairs(delivered) do pos[line] = pos[line] or i end
      assert.is_true(pos["insert 1 0"] < pos["update 1 1"])
      assert.is_true(pos["insert 300 0"] < pos["delete 300 0"])
      -- Until dropped, the schema keeps capturing; DROP SCHEMA ... CASCADE removes it all.
      assert.is_true(schema_exists(schema))
      H.sql("DROP SCHEMA " .. schema .. " CASCADE")
      schema = nil
      H.sql("INSERT INTO " .. t .. " VALUES (2000, 0)")
    end)

    it("with ack = \"manual\", deletes only acknowledged rows: a restart delivers exactly the others", function()
      local t = H.table("id int PRIMARY KEY")
      schema = "flash_spec_ack_" .. driver
      -- Acknowledges ids 1..10 in reverse order once 10 arrived; never acknowledges others.
      local path = s.script(string.format([[
local flash = require "flash"
local client = assert(flash.client { driver = %q, persistent = true, schema = %q, ack = "manual", max_unacked = 15 })
local held = {}
assert(client:listen { table = %q }):on("insert", function(ev)
  io.write(ev.new.id, "\n") io.stdout:flush()
  held[ev.new.id] = ev
  if ev.new.id == 10 then
    for i = 10, 1, -1 do assert(held[i]:ack()) end
  end
end)
flash.every(0.05, function()
  if client:stats().paused then io.stderr:write("paused\n") io.stderr:flush() end
end)
assert(client:start())
io.stderr:write("ready\n") io.stderr:flush()
assert(flash.run())
]], driver, schema, t))
      local function ids(h)
        local out = {}
        for id in h.out():gmatch("%d+") do out[#out + 1] = tonumber(id) end
        return out
      end
      local h = s.spawn({ path })
      assert.is_true(h.await("ready", 15, "err"), h.err())
      H.sql("INSERT INTO " .. t .. " SELECT g FROM generate_series(1, 20) g")
      assert.is_true(H.wait_for(function() return #ids(h) >= 20 end, 15), h.out())
      h.kill("TERM")
      assert.equal(0, h.wait(30), h.err())
      assert.same({ 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20 }, ids(h))
      assert.equal(10, tonumber(H.scalar("SELECT count(*) FROM " .. schema .. ".events")))
      -- Run 2: the 10 unacknowledged rows again, then new ones until 15 are outstanding.
      h = s.spawn({ path })
      assert.is_true(h.await("ready", 15, "err"), h.err())
      H.sql("INSERT INTO " .. t .. " VALUES (1000)")
      H.sql("INSERT INTO " .. t .. " SELECT g FROM generate_series(1001, 1010) g")
      assert.is_true(h.await("paused", 15, "err"), h.err())
      require("flash.core").sleep(0.3)
      h.kill("TERM")
      assert.equal(0, h.wait(30), h.err())
      assert.same({ 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 1000, 1001, 1002, 1003, 1004 }, ids(h))
    end)

    it("refuses a schema that a running instance holds, and leaves that instance's objects alone", function()
      local t = H.table("id int PRIMARY KEY")
      schema = "flash_spec_held_" .. driver
      local events
      local client
      client, events = H.listen({ table = t }, "insert", { driver = driver, schema = schema })
      local c2 = assert(flash.client { driver = driver, schema = schema })
      assert(c2:listen { table = t }):on("insert", function() end)
      local ok, err = c2:start()
      assert.is_nil(ok)
      assert.matches("schema " .. schema .. " is in use by another running flashlua instance", err, 1, true)
      c2:stop()
      assert.is_true(schema_exists(schema))
      H.sql("INSERT INTO " .. t .. " VALUES (1)")
      H.wait(client, events, 1)
      assert.equal(1, #events)
      assert.equal(1, events[1].new.id)
      client:stop()
      assert.is_false(schema_exists(schema))
      schema = nil
    end)
  end)
end
