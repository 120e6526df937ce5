-- spec/73-workers_spec.lua: parallel handler states in one process (flash.client{ workers =
-- N, handlers = FILE }, issue 13 item 1): each key's events reach one state in commit order,
-- every event is handled once, the same script runs with one state, and a kill -9 in the
-- middle of a run loses nothing with a persistent slot.
local flash = require "flash"
local H = require "spec.helpers"

local KEYS, ROUNDS = 100, 100

-- The handlers file: each state appends "state key v op ." to its own file per run (a
-- line cut by kill -9 lacks the final dot and is ignored).
local HANDLERS = [[
local config, idx = ...
local core = require "flash.core"
local out = assert(io.open(config.dir .. "/" .. config.run .. "." .. idx, "a"))
return {
  record = function(ev)
    local row = ev.new or ev.old
    if config.pause then core.sleep(config.pause) end
    out:write(idx, " ", row.k, " ", row.v, " ", ev.op, " .\n")
    out:flush()
  end,
  fail = function(ev)
    if ev.new.v == 2 then error("no v = 2 here") end
    out:write(idx, " ", ev.new.k, " ", ev.new.v, " ", ev.op, " .\n")
    out:flush()
  end,
}
]]

-- flashlua SCRIPT TABLE SLOT HANDLERS DIR RUN WORKERS [until] [pause]: workers handle the
-- table's events; "until": stop at the current position.
local SCRIPT = [[
local flash = require "flash"
local t, slot, handlers, dir, run, workers, mode, pause = ...
local c = assert(flash.client { driver = "wal_logical", persistent = true, slot = slot, publication = slot,
  workers = tonumber(workers), handlers = handlers, config = { dir = dir, run = run, pause = tonumber(pause) } })
assert(c:listen { table = t }):on("all", "record")
assert(c:start())
io.stderr:write("ready\n")
if mode == "until" then assert(c:run { until_lsn = "current" }) else assert(flash.run()) end
]]

describe("flash.client{ workers = N }", function()
  local s = H.session()
  local slot = "flash_spec_workers"
  local dir
  before_each(function()
    dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. dir) == 0)
    H.drop_slot(slot)
  end)
  after_each(function()
    s.cleanup()
    H.drop_slot(slot)
    os.execute("rm -rf " .. dir)
  end)

  -- Every record line of run `run`: { state, k, v, op } in each state's order.
  local function records(run, workers)
    local by_state = {}
    for i = 1, workers do
      by_state[i] = {}
      for _, l in ipairs(H.lines(dir .. "/" .. run .. "." .. i)) do
        local st, k, v, op = l:match("^(%d+) (%d+) (%d+) (%a+) %.$")
        if st then by_state[i][#by_state[i] + 1] = { tonumber(st), tonumber(k), tonumber(v), op } end
      end
    end
    return by_state
  end

  local function table_with_keys()
    local t = H.table("k int PRIMARY KEY, v int")
    H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
    return t
  end

  local function write(t, from, to)
    for _ = from, to do H.sql("UPDATE " .. t .. " SET v = v + 1") end
  end

  local function check_exactly_once(t, workers, run)
    local handlers = s.script(HANDLERS)
    local script = s.script(SCRIPT)
    -- A first run makes the persistent slot; then 100 keys and 100 transactions updating
    -- each key once (10,000 updates), then a run to the current position.
    local rc, _, err = H.run_flashlua({ script, t, slot, handlers, dir, "first", tostring(workers), "until" }, 60)
    assert.equal(0, rc, err)
    H.sql("INSERT INTO " .. t .. " SELECT g, 0 FROM generate_series(1, " .. KEYS .. ") g")
    write(t, 1, ROUNDS)
    rc, _, err = H.run_flashlua({ script, t, slot, handlers, dir, run, tostring(workers), "until" }, 120)
    assert.equal(0, rc, err)
    local by_state = records(run, workers)
    -- Per key: the state that had it, and its values in the order that state handled them.
    local state_of, seen, total, busy = {}, {}, 0, 0
    for i = 1, workers do
      if #by_state[i] > 0 then busy = busy + 1 end
      for _, r in ipairs(by_state[i]) do
        local k = r[2]
        assert.equal(state_of[k] or i, i, "key " .. k .. " was handled by two states")
        state_of[k] = i
        seen[k] = seen[k] or {}
        seen[k][#seen[k] + 1] = r[3]
        total = total + 1
      end
    end
    local want = {}
    for v = 0, ROUNDS do want[#want + 1] = v end
    for k = 1, KEYS do assert.same(want, seen[k], "key " .. k) end
    assert.equal(KEYS * (ROUNDS + 1), total)
    return busy
  end

  it("hands each key's events to one of 4 states in commit order, each event once", function()
    local busy = check_exactly_once(table_with_keys(), 4, "four")
    assert.equal(4, busy)
  end)

  it("runs the same script with one state", function()
    assert.equal(1, check_exactly_once(table_with_keys(), 1, "one"))
  end)

  it("loses nothing across a kill -9 in the middle of a run (persistent slot)", function()
    local t = table_with_keys()
    local handlers = s.script(HANDLERS)
    local script = s.script(SCRIPT)
    local rc, _, err = H.run_flashlua({ script, t, slot, handlers, dir, "first", "4", "until" }, 60)
    assert.equal(0, rc, err)
    H.sql("INSERT INTO " .. t .. " SELECT g, 0 FROM generate_series(1, " .. KEYS .. ") g")
    local function confirmed()
      return H.scalar("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", slot)
    end
    local start
    -- Each event takes the handler 2 ms: events are in the states' queues when it dies,
    -- after the slot confirmed part of what they handled.
    local h = s.spawn({ script, t, slot, handlers, dir, "killed", "4", "run", "0.002" })
    assert.is_true(h.await("ready", 20, "err"), h.err())
    write(t, 1, 50)
    local function handled(run)
      local n = 0
      for _, list in ipairs(records(run, 4)) do n = n + #list end
      return n
    end
    assert.is_true(H.wait_for(function() return handled("killed") >= 1000 end, 30), h.err())
    start = confirmed()
    assert.is_true(H.wait_for(function() return confirmed() ~= start end, 30), h.err())
    h.kill("KILL")
    assert.equal(137, h.wait(10))
    write(t, 51, ROUNDS)
    rc, _, err = H.run_flashlua({ script, t, slot, handlers, dir, "after", "4", "until" }, 120)
    assert.equal(0, rc, err)
    local killed, after = handled("killed"), handled("after")
    -- Per key: the values of both runs, in order; the second run starts again from the
    -- first event the slot had not confirmed, so it may repeat some of the first run's.
    local seen = {}
    for _, run in ipairs({ "killed", "after" }) do
      for _, list in ipairs(records(run, 4)) do
        for _, r in ipairs(list) do
          seen[r[2]] = seen[r[2]] or {}
          table.insert(seen[r[2]], r[3])
        end
      end
    end
    local dups = 0
    for k = 1, KEYS do
      local firsts, have = {}, {}
      for _, v in ipairs(seen[k] or {}) do
        if have[v] then dups = dups + 1 else have[v] = true firsts[#firsts + 1] = v end
      end
      local want = {}
      for v = 0, ROUNDS do want[#want + 1] = v end
      assert.same(want, firsts, "key " .. k)
    end
    print(string.format("\n  workers kill -9: %d handled before the kill, %d after, %d handled twice", killed, after, dups))
    assert.is_true(killed < KEYS * (ROUNDS / 2 + 1), "the kill came after everything was handled")
    assert.is_true(after < KEYS * (ROUNDS + 1), "the slot had confirmed nothing before the kill")
  end)

  it("applies on_error to a handler's error: stop leaves the event unconfirmed", function()
    local t = table_with_keys()
    local handlers = s.script(HANDLERS)
    local script = s.script(SCRIPT:gsub('"record"', '(os.getenv("HANDLER") or "record")'))
    local rc, _, err = H.run_flashlua({ script, t, slot, handlers, dir, "first", "2", "until" }, 60)
    assert.equal(0, rc, err)
    H.sql("INSERT INTO " .. t .. " VALUES (1, 0)")
    write(t, 1, 3)
    rc, _, err = H.run_flashlua({ script, t, slot, handlers, dir, "fail", "2", "until" }, 60, { HANDLER = "fail" })
    assert.equal(1, rc, err)
    -- (the run may have reached its end position meanwhile: "failed while stopping")
    assert.matches("callback for update on public." .. t .. " failed", err, 1, true)
    assert.matches("no v = 2 here", err, 1, true)
    -- The next run (the fixed handler) gets the failed event again, and what came after it.
    rc, _, err = H.run_flashlua({ script, t, slot, handlers, dir, "fixed", "2", "until" }, 60)
    assert.equal(0, rc, err)
    local vals = {}
    for _, list in ipairs(records("fixed", 2)) do
      for _, r in ipairs(list) do vals[#vals + 1] = r[3] end
    end
    assert.same({ 2, 3 }, vals)
  end)

  it("returns nil, err from flash.client when the handlers file fails to load, and checks handler names", function()
    local broken = s.script("return 42\n")
    local c, err = flash.client { driver = "wal_logical", workers = 2, handlers = broken }
    assert.is_nil(c)
    assert.matches("must return a table of handler functions %(got number%)", err)
    local ok = s.script(HANDLERS)
    c = assert(flash.client { driver = "wal_logical", workers = 2, handlers = ok, config = { dir = dir, run = "x" } })
    local t = table_with_keys()
    local l = assert(c:listen { table = t })
    assert.has_error(function() l:on("all", "nope") end,
      "bad argument #2 to 'on' (" .. ok .. " has no handler 'nope'; it has: fail, record)")
    assert.has_error(function() flash.client { workers = 2 } end)
    -- handlers (config, worker_queue) without workers were ignored without a word; the
    -- script then failed at on(ops, "name") with "function expected, got string".
    for _, name in ipairs({ "handlers", "config", "worker_queue" }) do
      local opts = { driver = "wal_logical", handlers = ok, config = { dir = dir }, worker_queue = 10 }
      for k in pairs(opts) do if k ~= "driver" and k ~= name then opts[k] = nil end end
      assert.has_error(function() flash.client(opts) end,
        "bad argument #1 to 'client' (option '" .. name .. "': goes with option 'workers', the number of parallel " ..
        "handler states (workers = 1 runs the handlers in one state))")
    end
    -- Automatic acks stay automatic for the script: the states acknowledge what they handle.
    assert.has_error(function() c:ack({}) end,
      "'ack' needs flash.client{ ack = \"manual\" } (this client acknowledges automatically)")
    assert.equal("auto", c:stats().ack)
    assert.equal(2, c:stats().workers)
    c:stop()
  end)
end)
