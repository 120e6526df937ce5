-- spec/74-scale_out_kill_spec.lua: the whole scale-out topology under kill -9 (issue 13):
-- PostgreSQL -> `flashlua --table T --to redis://... --partitions 8` -> Redis (append-only
-- file) -> 3 worker flashluas (driver = "redis_streams", each with 2 handler states:
-- workers = 2), a steady writer, and 10 rounds that
-- each kill -9 one random process (the capturer, a worker, or redis-server) and start it
-- again. Every committed change is handled at least once, each key's first deliveries are
-- in commit order; the duplicates of each round are printed.
local core = require "flash.core"
local H = require "spec.helpers"

local PARTS, WORKERS, KEYS, ROUNDS = 8, 3, 60, 10

describe("scale-out under kill -9", function()
  local s = H.session()
  local slot = "flash_replication"   -- the slot of flashlua --to
  local f = H.redis_fixture(s, slot, 11)
  before_each(f.setup)
  after_each(function()
    f.teardown()
    H.sql("DROP PUBLICATION IF EXISTS flash_publication")
  end)

  it("handles every committed change at least once, each key's first deliveries in commit order", function()
    local t = H.table("id int PRIMARY KEY, v int")
    H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
    H.sql("INSERT INTO " .. t .. " SELECT g, 0 FROM generate_series(1, " .. KEYS .. ") g")
    local redis = H.redis_start(f.dir, f.port)
    local url = "redis://127.0.0.1:" .. f.port
    -- Each worker runs its handler in 2 parallel states (workers = 2), which print
    -- "<time> <id> <v> ." per event (a line cut by kill -9 has no dot).
    local handlers = s.script([[
local core = require "flash.core"
return {
  record = function(ev)
    core.sleep(0.002)   -- a handler that takes a while: a killed worker has entries in hand
    io.stdout:write(string.format("%.6f %d %d .\n", core.time(), ev.new.id, ev.new.v)) io.stdout:flush()
  end,
}
]])
    local worker = s.script(string.format([[
local flash = require "flash"
local c = assert(flash.client { driver = "redis_streams", url = %q, group = "spec", partitions = %d,
  claim_after = 1, workers = 2, handlers = %q })
assert(c:listen { table = %q }):on({ "insert", "update" }, "record")
assert(c:start())
io.stderr:write("ready\n")
assert(flash.run())
]], url, PARTS, handlers, t))
    local procs = {}   -- every process ever started, for their output
    local function start_capturer()
      local h = s.spawn({ "--table", t, "--to", url, "--partitions", tostring(PARTS) })
      procs[#procs + 1] = h
      assert.is_true(h.await("listening on", 20, "err"), h.err())
      return h
    end
    local function start_worker()
      local h = s.spawn({ worker })
      procs[#procs + 1] = h
      assert.is_true(h.await("ready", 20, "err"), h.err())
      return h
    end
    local capturer = start_capturer()
    local workers = {}
    for i = 1, WORKERS do workers[i] = start_worker() end

    math.randomseed(69)
    local writes = 0
    local function write(n)
      for _ = 1, n do
        if math.random() < 0.7 then
          H.sql("UPDATE " .. t .. " SET v = v + 1 WHERE id = $1", math.random(1, KEYS))
        else
          -- Several rows in one transaction.
          H.sql("UPDATE " .. t .. " SET v = v + 1 WHERE id % 7 = $1", math.random(0, 6))
        end
        writes = writes + 1
        core.sleep(0.005)
      end
    end

    -- Each kind of process dies in some round: the victims in a random order.
    local kinds = { 1, 1, 1, 2, 2, 2, 3, 3, 3, 3 }
    for i = #kinds, 2, -1 do
      local j = math.random(1, i)
      kinds[i], kinds[j] = kinds[j], kinds[i]
    end
    local bounds, victims = {}, {}
    for round = 1, ROUNDS do
      bounds[round] = core.time()
      write(20)
      local pick = kinds[round]
      if pick == 1 then
        victims[round] = "capturer"
        capturer.kill("KILL")
        assert.equal(137, capturer.wait(10), capturer.err())
        write(15)
        capturer = start_capturer()
      elseif pick == 2 then
        victims[round] = "redis-server"
        local pid = tonumber(H.lines(f.dir .. "/redis.pid")[1])
        os.execute("kill -9 " .. pid)
        redis:close()
        write(15)
        os.remove(f.dir .. "/redis.pid")
        redis = H.redis_start(f.dir, f.port)
      else
        local i = math.random(1, WORKERS)
        victims[round] = "worker " .. i
        workers[i].kill("KILL")
        assert.equal(137, workers[i].wait(10))
        write(15)
        workers[i] = start_worker()
      end
      write(10)
    end
    bounds[ROUNDS + 1] = math.huge

    -- Every committed value of every key: v = 0 .. its final value.
    local final = {}
    for _, r in ipairs(H.sql("SELECT id, v FROM " .. t)) do final[r.id] = r.v end
    local function deliveries()
      local list = {}
      for _, h in ipairs(procs) do
        for l in h.out():gmatch("[^\n]+") do
          local ts, id, v = l:match("^([%d.]+) (%d+) (%d+) %.$")
          if ts then list[#list + 1] = { tonumber(ts), tonumber(id), tonumber(v) } end
        end
      end
      table.sort(list, function(a, b) return a[1] < b[1] end)
      return list
    end
    local function missing()
      local have, n = {}, 0
      for _, d in ipairs(deliveries()) do have[d[2] .. ":" .. d[3]] = true end
      for id = 1, KEYS do
        for v = 1, final[id] do
          if not have[id .. ":" .. v] then n = n + 1 end
        end
      end
      return n
    end
    H.wait_for(function() return missing() == 0 end, 60)
    assert.equal(0, missing())

    -- First deliveries in commit order per key; duplicates counted in the round they came.
    local firsts, seen, dups = {}, {}, {}
    for r = 1, ROUNDS do dups[r] = 0 end
    for _, d in ipairs(deliveries()) do
      local id, v = d[2], d[3]
      local k = id .. ":" .. v
      if seen[k] then
        local r = 1
        while d[1] >= bounds[r + 1] do r = r + 1 end
        dups[r] = dups[r] + 1
      elseif v > 0 then
        seen[k] = true
        firsts[id] = firsts[id] or {}
        table.insert(firsts[id], v)
      end
    end
    for id = 1, KEYS do
      local want = {}
      for v = 1, final[id] do want[v] = v end
      assert.same(want, firsts[id] or {}, "key " .. id)
    end
    local report = {}
    for r = 1, ROUNDS do report[r] = string.format("%d %s: %d", r, victims[r], dups[r]) end
    print(string.format("\n  scale-out kill -9: %d writes, %d changes; duplicates per round: %s", writes,
      #deliveries() - (function() local n = 0 for _, v in pairs(dups) do n = n + v end return n end)(),
      table.concat(report, ", ")))
  end)
end)
