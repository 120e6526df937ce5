-- spec/100-crash_restart_spec.lua: crashes and restarts under the persistent drivers
-- (trigger, trigger_global, trigger_statement with persistent = true; wal_logical and
-- pg_extension with persistent slots), each checked as a user would: every committed change
-- arrives (at least once, in commit order per row), none is invented, and what the docs
-- say is lost is said.
--
-- - A restart with a listener removed, or with its fields changed: the backlog committed
--   while no instance ran still reaches the listeners that remain (it went nowhere, without
--   a word, under `trigger` and `pg_extension`: listener ids shift; now by table and rank).
-- - kill -9 while a transaction larger than logical_decoding_work_mem streams in, and
--   while it is delivered (wal_logical, pg_extension with streaming = true).
-- - pg_ctl restart -m immediate while a persistent client drains a backlog, and while it
--   reads commits made with synchronous_commit = off (the trigger drivers delivered rows
--   the crash then undid: now a poll that read rows makes sure the WAL is flushed first).
-- - kill -9 of a client writing into a real redis-server through flash.sink.redis.
-- - A 200 MB backlog replayed in bounded memory (the trigger drivers fetched 1,000 rows
--   whatever their size: 414 MB peak; now batches stop at 4 MB of text).
-- - kill -9 while a 50 MB row is delivered.
local flash = require "flash"
local H = require "spec.helpers"

-- A consumer of the tables named in FLASH_SPEC_TABLES (comma-separated, in that order),
-- printing "table op id" per event.
local function consumer(s, driver, schema)
  return s.script(string.format([[
local flash = require "flash"
local client = assert(flash.client { driver = %q, persistent = true, schema = %q, slot = %q, replica_identity = "full" })
for t in os.getenv("FLASH_SPEC_TABLES"):gmatch("[^,]+") do
  assert(client:listen { table = t }):on("all", function(ev)
    local row = ev.new or ev.old
    io.write(t, " ", ev.op, " ", row.id, "\n") io.stdout:flush()
  end)
end
assert(client:start())
io.stderr:write("ready\n") io.stderr:flush()
assert(flash.run())
]], driver, schema, schema))
end

local function lines(h)
  local out = {}
  for line in h.out():gmatch("[^\n]+") do out[#out + 1] = line end
  return out
end

describe("a restart with a listener removed", function()
  local s = H.session()
  local schema
  after_each(function()
    s.cleanup()
    if schema then
      H.sql("DROP SCHEMA IF EXISTS " .. schema .. " CASCADE")
      H.drop_slot(schema)
      schema = nil
    end
  end)

  for _, driver in ipairs { "trigger", "trigger_global", "trigger_statement", "wal_logical", "pg_extension" } do
    it(driver .. ": the backlog of the tables still listened to is delivered", function()
      local a, b = H.table("id int PRIMARY KEY"), H.table("id int PRIMARY KEY")
      schema = "flash_spec100_rm_" .. driver
      local path = consumer(s, driver, schema)
      local h = s.spawn({ path }, { FLASH_SPEC_TABLES = a .. "," .. b })
      assert.is_true(h.await("ready", 15, "err"), h.err())
      h.kill("KILL")
      h.wait(10)
      -- Committed while no instance runs: captured by the persistent triggers.
      H.sql("INSERT INTO " .. a .. " VALUES (1)")
      H.sql("INSERT INTO " .. b .. " VALUES (2)")
      H.sql("INSERT INTO " .. b .. " VALUES (3)")
      h = s.spawn({ path }, { FLASH_SPEC_TABLES = b })
      assert.is_true(h.await("ready", 15, "err"), h.err())
      H.sql("INSERT INTO " .. b .. " VALUES (4)")
      assert.is_true(h.await(b .. " insert 4", 10), h.out() .. h.err())
      h.kill("TERM")
      assert.equal(0, h.wait(20), h.err())
      assert.same({ b .. " insert 2", b .. " insert 3", b .. " insert 4" }, lines(h))
    end)
  end
end)


-- A consumer of `t` with the fields in FLASH_SPEC_FIELDS (comma-separated; unset: every
-- column) and the condition v >= FLASH_SPEC_MIN when set, printing "op id v" per event.
local function fields_consumer(s, driver, name, t)
  return s.script(string.format([[
local flash = require "flash"
local client = assert(flash.client { driver = %q, persistent = true, schema = %q, slot = %q, replica_identity = "full" })
local fields
if os.getenv("FLASH_SPEC_FIELDS") then
  fields = {}
  for f in os.getenv("FLASH_SPEC_FIELDS"):gmatch("[^,]+") do fields[#fields + 1] = f end
end
local min = tonumber(os.getenv("FLASH_SPEC_MIN") or "")
assert(client:listen { table = %q, fields = fields, where = min and { { "v", ">=", min } } or nil }):on("all", function(ev)
  local row = ev.new or ev.old
  io.write(ev.op, " ", row.id, " ", tostring(row.v), "\n") io.stdout:flush()
end)
assert(client:start())
io.stderr:write("ready\n") io.stderr:flush()
assert(flash.run())
]], driver, name, name, t))
end

describe("a restart with the listener's fields or condition changed", function()
  local s = H.session()
  local name
  after_each(function()
    s.cleanup()
    if name then
      H.sql("DROP SCHEMA IF EXISTS " .. name .. " CASCADE")
      H.drop_slot(name)
      name = nil
    end
  end)

  for _, driver in ipairs { "trigger", "trigger_global", "trigger_statement", "wal_logical", "pg_extension" } do
    it(driver .. ": what was committed meanwhile arrives with the new fields", function()
      local t = H.table("id int PRIMARY KEY, v int")
      name = "flash_spec100_fields_" .. driver
      local path = fields_consumer(s, driver, name, t)
      local h = s.spawn({ path }, { FLASH_SPEC_FIELDS = "id" })
      assert.is_true(h.await("ready", 15, "err"), h.err())
      H.sql("INSERT INTO " .. t .. " VALUES (1, 10)")
      assert.is_true(h.await("insert 1 nil", 10), h.out() .. h.err())
      h.kill("KILL")
      h.wait(10)
      H.sql("INSERT INTO " .. t .. " VALUES (2, 20)")
      H.sql("UPDATE " .. t .. " SET v = 21 WHERE id = 2")
      h = s.spawn({ path }, { FLASH_SPEC_FIELDS = "id,v" })
      assert.is_true(h.await("ready", 15, "err"), h.err())
      H.sql("INSERT INTO " .. t .. " VALUES (3, 30)")
      assert.is_true(h.await("insert 3 30", 10), h.out() .. h.err())
      h.kill("TERM")
      assert.equal(0, h.wait(20), h.err())
      local got = lines(h)
      -- (row 1 may come again: a kill -9 redelivers what was handled in the last second)
      if got[1] == "insert 1 nil" or got[1] == "insert 1 10" then table.remove(got, 1) end
      if driver == "pg_extension" then
        -- Its plugin filtered them in the server, by the registration of the time: they
        -- arrive as it sent them (the update changed no field it wanted: none), with a
        -- warning (they were dropped without a word).
        assert.same({ "insert 2 nil", "insert 3 30" }, got)
        assert.is_nil(h.err():find("no longer in the table", 1, true), h.err())
        assert.matches("listener #1 on public." .. t .. ": its operations, fields or condition are not those of consumer " ..
          name .. "'s last run (flashlua table#1 ", h.err(), 1, true)
      else
        assert.same({ "insert 2 20", "update 2 21", "insert 3 30" }, got)
        assert.is_nil(h.err():find("WARN", 1, true), h.err())
      end
    end)
  end
end)
-- A persistent consumer of `t` with streaming = true, printing "id" per insert, sleeping
-- FLASH_SPEC_SLEEP in each callback; "streamed" on stderr once a transaction came in chunks.
local function stream_consumer(s, driver, slot, t)
  return s.script(string.format([[
local flash = require "flash"
local core = require "flash.core"
local pause = tonumber(os.getenv("FLASH_SPEC_SLEEP") or "0")
local client = assert(flash.client { driver = %q, persistent = true, slot = %q, streaming = true,
  replica_identity = "full" })
local n = 0
assert(client:listen { table = %q }):on("insert", function(ev)
  io.write(ev.new.id, "\n") io.stdout:flush()
  n = n + 1
  if n == 300 then io.stderr:write("busy\n") io.stderr:flush() end
  if pause > 0 then core.sleep(pause) end
end)
assert(client:start())
local said
flash.every(0.05, function()
  local st = client:stats()
  if not said and ((st.stream_buffered_peak or 0) + (st.stream_spilled or 0)) > 0 then
    said = true
    io.stderr:write("streamed\n") io.stderr:flush()
  end
end)
io.stderr:write("ready\n") io.stderr:flush()
assert(flash.run())
]], driver, slot, t))
end

local function ids(h)
  local out = {}
  for line in h.out():gmatch("[^\n]+") do out[#out + 1] = tonumber(line) end
  return out
end

-- true when `list` is from, from + 1, ..., to.
local function run_of(list, from, to)
  if #list ~= to - from + 1 then return false end
  for i, v in ipairs(list) do if v ~= from + i - 1 then return false end end
  return true
end

describe("kill -9 around a transaction larger than logical_decoding_work_mem, streamed", function()
  local s = H.session()
  local slot
  setup(function() H.decoding_work_mem("64kB") end)
  teardown(function() H.decoding_work_mem(nil) end)
  after_each(function()
    s.cleanup()
    if slot then H.drop_slot(slot) slot = nil end
  end)

  for _, driver in ipairs { "wal_logical", "pg_extension" } do
    it(driver .. ": killed while it streams and while it delivers, the next run delivers it whole, in order", function()
      local t = H.table("id int PRIMARY KEY, pad text")
      slot = "flash_spec100_stream_" .. driver
      local path = stream_consumer(s, driver, slot, t)
      local h = s.spawn({ path })
      assert.is_true(h.await("ready", 15, "err"), h.err())
      H.sql("INSERT INTO " .. t .. " VALUES (1, 'a')")
      assert.is_true(h.await("1\n", 10), h.out() .. h.err())
      -- A transaction still open, streamed to the client while it runs: killed meanwhile.
      local w = assert(flash.client { dsn = H.dsn })
      assert(w:query("BEGIN"))
      assert(w:query("INSERT INTO " .. t .. " SELECT g, repeat('x', 100) FROM generate_series(2, 5001) g"))
      assert.is_true(h.await("streamed", 15, "err"), h.err())
      h.kill("KILL")
      assert.equal(137, h.wait(10))
      assert(w:query("COMMIT"))
      w:stop()
      H.sql("INSERT INTO " .. t .. " VALUES (5002, 'z')")
      -- Killed again in the middle of delivering it.
      h = s.spawn({ path }, { FLASH_SPEC_SLEEP = "0.002" })
      assert.is_true(h.await("busy", 20, "err"), h.err())
      h.kill("KILL")
      assert.equal(137, h.wait(10))
      local second = ids(h)
      -- The third run delivers from the first transaction not confirmed: the big one whole.
      h = s.spawn({ path })
      assert.is_true(h.await("5002\n", 30), h.out() .. h.err())
      h.kill("TERM")
      assert.equal(0, h.wait(20), h.err())
      local third = ids(h)
      -- (row 1 may come again: its confirmation goes out within a second of its handling)
      local from = second[1]
      assert.is_true(from == 1 or from == 2, "second run from " .. tostring(from))
      assert.is_true(#second >= 300 and run_of(second, from, from + #second - 1), "second run: " .. #second .. " events")
      from = third[1]
      assert.is_true(from == 1 or from == 2, "third run from " .. tostring(from))
      assert.is_true(run_of(third, from, 5002), "third run: " .. #third .. " events, from " .. tostring(from))
    end)
  end
end)

describe("PostgreSQL killed (pg_ctl restart -m immediate) while a persistent client drains a backlog", function()
  local core = require "flash.core"
  local sandbox = require "flash.sandbox"
  local sb
  setup(function()
    sb = assert(sandbox.start { quiet = true, settings = { max_replication_slots = 20, max_wal_senders = 20 } })
    local w = assert(core.connect(sb.dsn))
    w:exec("CREATE EXTENSION IF NOT EXISTS flashlua", 0)
    w:close()
  end)
  teardown(function() if sb then sb:stop() end end)

  local function restart()
    local pgctl = sb:_bin("pg_ctl") .. " restart -D " .. H.sh_quote(sb.datadir) .. " -m immediate" ..
      " -w -t 60 -l " .. H.sh_quote(sb.dir .. "/restart.log") .. " >/dev/null 2>&1"
    assert(os.execute(sb:_cmd(pgctl)) == 0)
  end
  local function exec(sql)
    local w = assert(core.connect(sb.dsn))
    assert(w:exec(sql, 0))
    w:close()
  end

  for _, driver in ipairs { "trigger", "trigger_global", "trigger_statement", "wal_logical", "pg_extension" } do
    it(driver .. ": every committed row arrives, none invented", function()
      local t = "crash_" .. driver
      exec("DROP TABLE IF EXISTS " .. t .. "; CREATE TABLE " .. t .. " (id int PRIMARY KEY)")
      local name = "flash_spec100_crash_" .. driver
      local client = assert(flash.client { dsn = sb.dsn, driver = driver, persistent = true, schema = name,
        slot = name, replica_identity = "full" })
      local got, seen, n_rows = {}, {}, 0
      assert(client:listen { table = t }):on("insert", function(ev)
        got[#got + 1] = ev.new.id
        seen[ev.new.id] = true
        core.sleep(0.0005)
      end)
      local log = {}
      local old = flash.log.set_sink(function(line) log[#log + 1] = line end)
      local ok, err = pcall(function()
        assert(client:start())
        for i = 0, 2 do exec(string.format("INSERT INTO %s SELECT g FROM generate_series(%d, %d) g", t, i * 1000 + 1, i * 1000 + 1000)) end
        local deadline = core.now() + 20
        while #got < 300 and core.now() < deadline do assert(client:poll(0.05)) end
        assert.is_true(#got >= 300 and #got < 3000, "delivered before the crash: " .. #got)
        restart()
        exec("INSERT INTO " .. t .. " VALUES (3001)")
        deadline = core.now() + 40
        while not seen[3001] and core.now() < deadline do
          local pok, perr = client:poll(0.05)
          assert(pok, tostring(perr))
        end
        -- The sandbox commits with synchronous_commit = off: the crash may take the last
        -- transactions with it. What the table holds now is what was committed.
        local w = assert(core.connect(sb.dsn))
        local rows = assert(w:exec("SELECT id FROM " .. t, 0))
        w:close()
        n_rows = #rows
        local missing, committed = {}, {}
        for _, r in ipairs(rows) do
          committed[r.id] = true
          if not seen[r.id] then missing[#missing + 1] = r.id end
        end
        table.sort(missing)
        assert.equal(0, #missing, "missing: " .. table.concat(missing, " ", 1, math.min(#missing, 10)))
        local invented = {}
        for _, id in ipairs(got) do if not committed[id] then invented[#invented + 1] = id end end
        assert.equal(0, #invented, "not in the table: " .. table.concat(invented, " ", 1, math.min(#invented, 10)))
        -- and id 3001 came last
        assert.equal(3001, got[#got])
      end)
      flash.log.set_sink(old)
      client:stop()
      exec("DROP SCHEMA IF EXISTS " .. name .. " CASCADE")
      local w = assert(core.connect(sb.dsn))
      for _ = 1, 50 do
        w:exec("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '" .. name .. "' AND NOT active", 0)
        local r = w:exec("SELECT count(*)::int AS n FROM pg_replication_slots WHERE slot_name = '" .. name .. "'", 0)
        if r and r[1].n == 0 then break end
        core.sleep(0.1)
      end
      w:exec("DROP PUBLICATION IF EXISTS " .. name, 0)
      w:close()
      assert(ok, tostring(err) .. "\n" .. table.concat(log, "\n"))
      print(string.format("\n  %s: %d events, %d rows in the table", driver, #got, n_rows))
    end)
  end

  -- The sandbox commits with synchronous_commit = off: a commit is visible before its WAL
  -- is flushed, and the crash undoes it. The trigger drivers delivered such rows, read
  -- from the capture table in that moment: events of changes that, after the crash, never
  -- happened (39 of 2,117 in a first run through a Redis sink).
  for _, driver in ipairs { "trigger", "trigger_global", "trigger_statement" } do
    it(driver .. ": no event of a transaction the crash undid", function()
      local t = "phantom_" .. driver
      exec("DROP TABLE IF EXISTS " .. t .. "; CREATE TABLE " .. t .. " (id int PRIMARY KEY)")
      local name = "flash_spec100_phantom_" .. driver
      local client = assert(flash.client { dsn = sb.dsn, driver = driver, persistent = true, schema = name,
        poll_interval = 0.005 })
      local got = {}
      assert(client:listen { table = t }):on("insert", function(ev) got[#got + 1] = ev.new.id end)
      local log = {}
      local old = flash.log.set_sink(function(line) log[#log + 1] = line end)
      local ok, err = pcall(function()
        assert(client:start())
        local w = assert(core.connect(sb.dsn))
        local n = 0
        for round = 1, 3 do
          -- One-row commits, each read at once (the client polls after each).
          local deadline = core.now() + 0.3 + 0.1 * round
          while core.now() < deadline do
            n = n + 1
            assert(w:exec("INSERT INTO " .. t .. " VALUES (" .. n .. ")", 0))
            assert(client:poll(0.002))
          end
          restart()
          w:close()
          w = assert(core.connect(sb.dsn))
          n = n + 1000
        end
        assert(w:exec("INSERT INTO " .. t .. " VALUES (-1)", 0))
        local deadline = core.now() + 20
        while got[#got] ~= -1 and core.now() < deadline do assert(client:poll(0.05)) end
        assert.equal(-1, got[#got])
        local rows = assert(w:exec("SELECT id FROM " .. t, 0))
        w:close()
        local committed = {}
        for _, r in ipairs(rows) do committed[r.id] = true end
        local invented = {}
        for _, id in ipairs(got) do if not committed[id] then invented[#invented + 1] = id end end
        assert.equal(0, #invented, "events of rows not in the table: " ..
          table.concat(invented, " ", 1, math.min(#invented, 10)))
      end)
      flash.log.set_sink(old)
      client:stop()
      exec("DROP SCHEMA IF EXISTS " .. name .. " CASCADE")
      assert(ok, tostring(err) .. "\n" .. table.concat(log, "\n"))
    end)
  end
end)

describe("kill -9 of a flashlua writing into Redis (flash.sink.redis)", function()
  local core = require "flash.core"
  local json = require "flash.json"
  local s = H.session()
  local name = "flash_spec100_redis"
  local f = H.redis_fixture(s, name, 7)
  before_each(f.setup)
  after_each(function()
    f.teardown()
    H.sql("DROP SCHEMA IF EXISTS " .. name .. " CASCADE")
  end)

  -- Every entry of the two partition streams, as decoded events with the entry's id field.
  local function all_entries()
    local conn = assert(core.redis_connect("127.0.0.1", f.port, 2))
    local replies = assert(conn:pipeline({ { "XRANGE", "flash:0", "-", "+" }, { "XRANGE", "flash:1", "-", "+" } }))
    conn:close()
    local out = {}
    for p = 1, 2 do
      for _, e in ipairs(replies[p]) do
        local ev = json.decode(e[2][4])
        ev.entry_id, ev.partition = e[2][2], p - 1
        out[#out + 1] = ev
      end
    end
    return out
  end

  for _, driver in ipairs { "trigger_global", "wal_logical", "pg_extension" } do
    it(driver .. ": the next run writes every committed change, each row's in order, none invented", function()
      local t = H.table("id int PRIMARY KEY, v int")
      H.redis_start(f.dir, f.port)
      local path = s.script(string.format([[
local flash = require "flash"
local sink = require("flash.sink.redis").new { url = "redis://127.0.0.1:%d", partitions = 2, batch = 50 }
local c = assert(flash.client { driver = %q, persistent = true, slot = %q, schema = %q, ack = "manual",
  replica_identity = "full" })
assert(c:listen { table = %q }):on("all", function(ev)
  require("flash.core").sleep(0.0003)
  return sink(ev)
end)
assert(c:start())
io.stderr:write("ready\n") io.stderr:flush()
assert(flash.run())
]], f.port, driver, name, name, t))
      local h = s.spawn({ path })
      assert.is_true(h.await("ready", 15, "err"), h.err())
      for i = 0, 9 do
        H.sql(string.format("INSERT INTO %s SELECT g, 0 FROM generate_series(%d, %d) g", t, i * 200 + 1, i * 200 + 200))
      end
      H.sql("UPDATE " .. t .. " SET v = 1 WHERE id % 7 = 0")
      assert.is_true(H.wait_for(function() return #all_entries() >= 300 end, 20), h.err())
      h.kill("KILL")
      assert.equal(137, h.wait(10))
      local before = #all_entries()
      H.sql("DELETE FROM " .. t .. " WHERE id % 5 = 0")
      h = s.spawn({ path })
      local want = 2000 + math.floor(2000 / 7) + 2000 / 5
      local uniq
      assert.is_true(H.wait_for(function()
        uniq = {}
        local n = 0
        for _, ev in ipairs(all_entries()) do
          local row = ev.op == "delete" and ev.old or ev.new
          local k = string.format("%s %d %d", ev.op, row.id, row.v)
          if not uniq[k] then uniq[k] = true n = n + 1 end
        end
        return n >= want
      end, 40), h.err())
      h.kill("TERM")
      assert.equal(0, h.wait(20), h.err())
      -- Every change once or more; none invented; a row's first entries in the order made.
      local expect = {}
      for i = 1, 2000 do
        expect["insert " .. i .. " 0"] = 1
        if i % 7 == 0 then expect["update " .. i .. " 1"] = 2 end
        if i % 5 == 0 then expect["delete " .. i .. " " .. (i % 7 == 0 and 1 or 0)] = 3 end
      end
      local last, firsts, total = {}, {}, 0
      for _, ev in ipairs(all_entries()) do
        total = total + 1
        local row = ev.op == "delete" and ev.old or ev.new
        local k = string.format("%s %d %d", ev.op, row.id, row.v)
        assert.is_not_nil(expect[k], "invented: " .. k)
        if not firsts[k] then
          firsts[k] = true
          assert.is_true((last[row.id] or 0) < expect[k], "row " .. row.id .. " out of order at " .. k)
          last[row.id] = expect[k]
        end
        if driver ~= "trigger_global" then assert.equal(ev.id, ev.entry_id) end
      end
      local missing = {}
      for k in pairs(expect) do if not firsts[k] then missing[#missing + 1] = k end end
      assert.same({}, missing)
      print(string.format("\n  %s: %d entries for %d changes (%d before the kill)", driver, total, want, before))
    end)
  end
end)

describe("replaying a 200 MB backlog after a kill -9", function()
  local s = H.session()
  local name = "flash_spec100_mem"
  after_each(function()
    s.cleanup()
    H.sql("DROP SCHEMA IF EXISTS " .. name .. " CASCADE")
    H.drop_slot(name)
  end)

  -- (pg_extension peaked at 28 MB over its 9 MB baseline too, and trigger_global as the
  -- other trigger drivers; left out for the spec's time.)
  for _, driver in ipairs { "trigger", "trigger_statement", "wal_logical" } do
    it(driver .. ": delivers it in bounded memory", function()
      local t = H.table("id int PRIMARY KEY, v text")
      local path = s.script(string.format([[
local flash = require "flash"
local mem = dofile(%q)
local c = assert(flash.client { driver = %q, persistent = true, slot = %q, schema = %q, replica_identity = "full" })
local n, bytes = 0, 0
assert(c:listen { table = %q }):on("insert", function(ev)
  n = n + 1
  bytes = bytes + #ev.new.v
  if n == 100 then
    local peak = mem()
    io.write(string.format("done %%d %%d peak %%.0f\n", n, bytes, peak)) io.stdout:flush()
  end
end)
assert(c:start())
collectgarbage()
local _, base = mem()
io.write(string.format("base %%.0f\n", base)) io.stdout:flush()
io.stderr:write("ready\n") io.stderr:flush()
assert(flash.run())
]], H.root .. "spec/child_mem.lua", driver, name, name, t))
      local h = s.spawn({ path })
      assert.is_true(h.await("ready", 15, "err"), h.err())
      h.kill("KILL")
      h.wait(10)
      -- 100 rows of 2 MB of text each (compressed in the table: TOAST).
      H.sql("INSERT INTO " .. t .. " SELECT g, repeat(chr(65 + g % 26), 2097152) FROM generate_series(1, 100) g")
      h = s.spawn({ path })
      assert.is_true(h.await("done ", 60), h.out() .. h.err())
      h.kill("TERM")
      h.wait(20)
      local base = tonumber(h.out():match("base (%d+)"))
      local n, bytes, peak = h.out():match("done (%d+) (%d+) peak (%d+)")
      print(string.format("\n  %s: base %d MB, peak %d MB for a backlog of %s bytes", driver, base, peak, bytes))
      assert.equal("100", n)
      assert.is_true(tonumber(peak) - base < 100, "peak " .. peak .. " MB over a baseline of " .. base)
    end)
  end
end)

describe("kill -9 while a 50 MB row is delivered", function()
  local s = H.session()
  local name = "flash_spec100_bigrow"
  after_each(function()
    s.cleanup()
    H.sql("DROP SCHEMA IF EXISTS " .. name .. " CASCADE")
    H.drop_slot(name)
  end)

  -- (Two drivers, for the spec's time: trigger_statement and pg_extension passed too.)
  for _, driver in ipairs { "trigger", "wal_logical" } do
    it(driver .. ": the next run delivers it again, whole, before what came after", function()
      local t = H.table("id int PRIMARY KEY, v text")
      local path = s.script(string.format([[
local flash = require "flash"
local core = require "flash.core"
local c = assert(flash.client { driver = %q, persistent = true, slot = %q, schema = %q, replica_identity = "full" })
assert(c:listen { table = %q }):on("insert", function(ev)
  local v = ev.new.v
  io.write("got ", ev.new.id, " ", #v, " ", tostring(v == string.rep("0123456789", #v / 10)), "\n") io.stdout:flush()
  if os.getenv("FLASH_SPEC_SLOW") then core.sleep(3) end
end)
assert(c:start())
io.stderr:write("ready\n") io.stderr:flush()
assert(flash.run())
]], driver, name, name, t))
      local h = s.spawn({ path }, { FLASH_SPEC_SLOW = "1" })
      assert.is_true(h.await("ready", 15, "err"), h.err())
      H.sql("INSERT INTO " .. t .. " VALUES (1, repeat('0123456789', 5242880))")
      H.sql("INSERT INTO " .. t .. " VALUES (2, '0123456789')")
      assert.is_true(h.await("got 1 52428800 true", 60), h.out() .. h.err())
      h.kill("KILL")
      assert.equal(137, h.wait(10))
      h = s.spawn({ path })
      assert.is_true(h.await("got 2 10 true", 60), h.out() .. h.err())
      h.kill("TERM")
      assert.equal(0, h.wait(20), h.err())
      assert.equal("got 1 52428800 true\ngot 2 10 true\n", h.out())
    end)
  end
end)

describe("kill -9 and SIGTERM in the middle of a backfill with ack = \"manual\" and a stop hook", function()
  local s = H.session()
  local name = "flash_spec100_bf"
  after_each(function()
    s.cleanup()
    H.sql("DROP SCHEMA IF EXISTS " .. name .. " CASCADE")
    H.drop_slot(name)
    H.sql("DELETE FROM flashlua.backfill WHERE slot IN ($1, $2)", name, "schema:" .. name)
  end)

  for _, driver in ipairs { "trigger_global", "wal_logical" } do
    it(driver .. ": every row is read, each chunk at most once more per interruption, and on_done comes", function()
      local t = H.table("id int PRIMARY KEY, v int")
      H.sql("INSERT INTO " .. t .. " SELECT g, 0 FROM generate_series(1, 3000) g")
      local path = s.script(string.format([[
local flash = require "flash"
local core = require "flash.core"
local c = assert(flash.client { driver = %q, persistent = true, slot = %q, schema = %q, ack = "manual",
  replica_identity = "full" })
local held = {}
local function flush()
  for _, ev in ipairs(held) do
    io.write(ev.op, " ", ev.new.id, "\n")
    ev:ack()
  end
  io.stdout:flush()
  held = {}
end
local l = assert(c:listen { table = %q })
l:on("all", function(ev) held[#held + 1] = ev core.sleep(0.0005) end)
l:backfill { chunk = 500, on_done = function() flush() io.write("done\n") io.stdout:flush() end }
flash.every(0.05, flush)
flash.on_stop(flush)
assert(c:start())
assert(flash.run())
]], driver, name, name, t))
      local reads, runs = {}, {}
      local function collect(h)
        local n = 0
        for op, id in h.out():gmatch("(%a+) (%d+)\n") do
          if op == "read" then
            id = tonumber(id)
            reads[id] = (reads[id] or 0) + 1
            n = n + 1
          end
        end
        runs[#runs + 1] = n
      end
      local h = s.spawn({ path })
      assert.is_true(H.wait_for(function() return select(2, h.out():gsub("\n", "")) >= 800 end, 20), h.err())
      h.kill("KILL")
      assert.equal(137, h.wait(10))
      collect(h)
      H.sql("UPDATE " .. t .. " SET v = 1 WHERE id = 2999")
      h = s.spawn({ path })
      assert.is_true(H.wait_for(function() return select(2, h.out():gsub("\n", "")) >= 800 end, 20), h.err())
      h.kill("TERM")
      assert.equal(0, h.wait(20), h.err())
      collect(h)
      h = s.spawn({ path })
      assert.is_true(h.await("done\n", 30), h.out() .. h.err())
      h.kill("TERM")
      assert.equal(0, h.wait(20), h.err())
      collect(h)
      local missing, again = {}, 0
      for i = 1, 3000 do
        if not reads[i] then missing[#missing + 1] = i end
        if (reads[i] or 0) > 1 then again = again + reads[i] - 1 end
      end
      assert.same({}, missing)
      print(string.format("\n  %s: reads per run %s; %d read again", driver, table.concat(runs, ", "), again))
      -- A kill -9 reads its chunk in progress again (at most 500 rows); a graceful stop
      -- with everything acknowledged by its stop hook, nothing.
      assert.is_true(again <= 500, again .. " rows read again")
    end)
  end
end)

describe("pg_extension: a callback added while changes wait to be read", function()
  it("delivers the changes written before it under the registration they were written with", function()
    local t = H.table("id int PRIMARY KEY, v int")
    local c = assert(flash.client { driver = "pg_extension", replica_identity = "full" })
    local got = {}
    local l = assert(c:listen { table = t })
    l:on("insert", function(ev) got[#got + 1] = "insert " .. ev.new.id end)
    assert(c:start())
    H.sql("INSERT INTO " .. t .. " VALUES (1, 0)")
    H.wait(c, got, 1)
    -- Written while the client reads nothing; then an operation is added, which replaces
    -- the listener's registration in the extension's registry.
    H.sql("INSERT INTO " .. t .. " VALUES (2, 0)")
    H.sql("INSERT INTO " .. t .. " VALUES (3, 0)")
    l:on("update", function(ev) got[#got + 1] = "update " .. ev.new.id end)
    H.sql("UPDATE " .. t .. " SET v = 1 WHERE id = 1")
    H.wait(c, got, 4, 10)
    c:stop()
    assert.same({ "insert 1", "insert 2", "insert 3", "update 1" }, got)
  end)
end)

describe("kill -9 of a non-persistent trigger client with a backlog", function()
  local s = H.session()
  after_each(function() s.cleanup() end)

  for _, driver in ipairs { "trigger", "trigger_global", "trigger_statement" } do
    it(driver .. ": the next start says exactly how many changes it discards", function()
      local t = H.table("id int PRIMARY KEY, v int")
      local path = s.script(string.format([[
local flash = require "flash"
local c = assert(flash.client { driver = %q })
assert(c:listen { table = %q }):on("all", function() end)
assert(c:start())
io.stderr:write("ready\n") io.stderr:flush()
assert(flash.run())
]], driver, t))
      local h = s.spawn({ path })
      assert.is_true(h.await("ready", 15, "err"), h.err())
      h.kill("STOP")
      H.sql("INSERT INTO " .. t .. " SELECT g, 0 FROM generate_series(1, 300) g")
      H.sql("UPDATE " .. t .. " SET v = 1 WHERE id <= 20")
      H.sql("ALTER TABLE " .. t .. " ADD COLUMN w int")
      H.sql("DELETE FROM " .. t .. " WHERE id > 290")
      h.kill("KILL")
      h.wait(10)
      local warnings = H.warnings(function()
        local c = assert(flash.client { driver = driver })
        assert(c:listen { table = t }):on("all", function() end)
        assert(c:start())
        c:stop()
      end)
      local n
      for _, w in ipairs(warnings) do n = n or w:match("held (%d+) captured changes its instance never delivered") end
      assert.equal("330", n, table.concat(warnings, "\n"))
    end)
  end
end)
