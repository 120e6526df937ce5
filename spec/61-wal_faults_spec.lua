-- spec/61-wal_faults_spec.lua: the wal_logical driver under the faults outside testers
-- found: what the publication publishes, partitions and inheritance, renames and drops,
-- how soon handled changes are confirmed, fairness to timers and signals, stops that must
-- end, a lost query connection, long `in` lists and dropped columns.
local flash = require "flash"
local core = require "flash.core"
local H = require "helpers"

local function lines_of(s)
  local t = {}
  for l in s:gmatch("[^\n]+") do if l ~= "ready" then t[#t + 1] = l end end
  return t
end

local function wait_for(pred, timeout)
  local deadline = core.now() + (timeout or 5)
  while core.now() < deadline do
    if pred() then return true end
    core.sleep(0.05)
  end
  return pred()
end

-- Drops a persistent slot once its walsender has let go of it, and its publication.
local function drop_slot(name, publication)
  wait_for(function()
    H.sql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active", name)
    return tonumber(H.scalar("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1", name)) == 0
  end, 10)
  H.sql("DROP PUBLICATION IF EXISTS " .. (publication or name))
end

describe("wal_logical faults", function()
  local client, procs, scripts = nil, {}, {}
  local function spawn(args, env)
    local h = H.spawn(args, env)
    procs[#procs + 1] = h
    return h
  end
  local function script(code)
    local p = H.script(code)
    scripts[#scripts + 1] = p
    return p
  end
  after_each(function()
    if client then client:stop() client = nil end
    for _, h in ipairs(procs) do
      if h.wait(0.1) == nil then h.kill("KILL") h.wait(2) end
      os.remove(h.base .. ".out") os.remove(h.base .. ".err") os.remove(h.base .. ".rc")
    end
    procs = {}
    for _, p in ipairs(scripts) do os.remove(p) end
    scripts = {}
  end)

  describe("publishes only the operations some callback wants", function()
    it("an insert-only listener on a keyless table leaves the user's UPDATE and DELETE working", function()
      local t = H.table("id serial, data int")
      local c, events = H.listen({ table = t }, "insert", { driver = "wal_logical" })
      client = c
      H.sql("INSERT INTO " .. t .. " (data) VALUES (1)")
      H.sql("UPDATE " .. t .. " SET data = 2")
      H.sql("DELETE FROM " .. t)
      H.sql("INSERT INTO " .. t .. " (data) VALUES (3)")
      H.wait(c, events, 2)
      H.settle(c, 0.2)
      assert.same({ { "insert", 1 }, { "insert", 3 } },
        { { events[1].op, events[1].new.data }, { events[2].op, events[2].new.data } })
      assert.equal(2, #events)
    end)

    it("follows the union of the operations wanted as callbacks come and go", function()
      local t = H.table("id serial, data int")
      local u = H.table("id int PRIMARY KEY, data int")
      H.sql("ALTER TABLE " .. u .. " REPLICA IDENTITY FULL")
      local c = assert(flash.client { driver = "wal_logical" })
      client = c
      local events = {}
      assert(c:listen { table = t }):on("insert", function(ev) events[#events + 1] = ev.op .. " " .. ev.table end)
      local lu = assert(c:listen { table = u })
      assert(c:start())
      local pub = c:stats().publication
      local function publishes()
        local r = H.sql([[SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication WHERE pubname = $1]], pub)[1]
        return { r.pubinsert, r.pubupdate, r.pubdelete, r.pubtruncate }
      end
      assert.same({ true, false, false, false }, publishes())
      local off = lu:on("delete", function(ev) events[#events + 1] = ev.op .. " " .. ev.table end)
      assert.same({ true, false, true, false }, publishes())
      H.sql("INSERT INTO " .. u .. " VALUES (1, 1); DELETE FROM " .. u)
      H.wait(c, events, 1)
      assert.same({ "delete public." .. u }, events)
      off()
      assert.same({ true, false, false, false }, publishes())
      -- A condition can turn an update into an insert: updates are published then.
      local c2 = assert(flash.client { driver = "wal_logical" })
      local l2 = assert(c2:listen { table = u, where = { data = 5 } })
      l2:on("insert", function() end)
      assert(c2:start())
      local r = H.sql("SELECT pubupdate FROM pg_publication WHERE pubname = $1", c2:stats().publication)[1]
      c2:stop()
      assert.is_true(r.pubupdate)
    end)
  end)

  describe("options", function()
    local cases = {
      { { shutdown_timeout = -1 }, "option 'shutdown_timeout'" },
      { { shutdown_timeout = "5" }, "option 'shutdown_timeout'" },
      { { stream_memory = 0 }, "option 'stream_memory'" },
      { { stream_memory = -5 }, "option 'stream_memory'" },
      { { persistent = "yes" }, "option 'persistent'" },
      { { streaming = 1 }, "option 'streaming'" },
      { { slot = 'bad"slot' }, "option 'slot'" },
      { { slot = "Upper" }, "option 'slot'" },
      { { publication = 'bad"pub' }, "option 'publication'" },
      { { publication = "" }, "option 'publication'" },
    }
    for _, case in ipairs(cases) do
      local opts, want = case[1], case[2]
      local k, v = next(opts)
      it(string.format("refuses %s = %q at flash.client", k, tostring(v)), function()
        opts.driver = "wal_logical"
        local ok, err = pcall(flash.client, opts)
        assert.is_false(ok)
        assert.matches(want, err, 1, true)
      end)
    end

    it("says what a valid slot name is", function()
      local ok, err = pcall(flash.client, { driver = "wal_logical", persistent = true, slot = 'a"b' })
      assert.is_false(ok)
      assert.matches([[option 'slot': "a\"b" is not a valid name (use lower-case letters, digits and underscores, at most 63 characters)]],
        err, 1, true)
      assert.equal(0, tonumber(H.scalar([[SELECT count(*) FROM pg_publication WHERE pubname = 'flash_publication']])))
    end)
  end)
end)
