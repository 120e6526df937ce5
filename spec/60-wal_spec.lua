-- The wal_logical driver's own promises: nothing lost across kill -9 with a persistent
-- slot, streamed transactions (bounded memory, rollbacks), ALTER TABLE while listening,
-- until_lsn, event positions, and errors that say how to fix them.
local flash = require "flash"
local core = require "flash.core"
local H = require "helpers"

local lines, drop_slot = H.lines, H.drop_slot

describe("wal_logical driver", function()
  local client
  after_each(function()
    if client then client:stop() client = nil end
  end)

  it("carries the commit LSN, xid and commit time, and stats report the position", function()
    local t = H.table("id int PRIMARY KEY")
    local c, events = H.listen({ table = t }, "insert", { driver = "wal_logical" })
    client = c
    local before = core.time()
    H.sql("INSERT INTO " .. t .. " VALUES (1)")
    H.sql("INSERT INTO " .. t .. " VALUES (2)")
    H.wait(c, events, 2)
    assert.equal(2, #events)
    assert.matches("^%x+/%x+$", events[1].lsn)
    assert.is_true(core.lsn(events[2].lsn) > core.lsn(events[1].lsn))
    assert.is_true(events[2].xid > events[1].xid)
    assert.is_true(math.abs(events[1].commit_time - before) < 30)
    local s = c:stats()
    assert.equal("wal_logical", s.driver)
    assert.matches("^%x+/%x+$", s.last_lsn)
    assert.is_number(s.lag_bytes)
  end)

  it("delivers the rows a partition got before it was detached, read after the detach", function()
    -- Which listened table a row belongs to was looked up in the catalog when the row was
    -- read: a partition detached meanwhile was no longer under it, and its rows were dropped
    -- without a word.
    local t = H.table("id int PRIMARY KEY, v text) PARTITION BY RANGE (id")
    H.sql("CREATE TABLE " .. t .. "_a PARTITION OF " .. t .. " FOR VALUES FROM (0) TO (100); " ..
      "CREATE TABLE " .. t .. "_b PARTITION OF " .. t .. " FOR VALUES FROM (100) TO (200)")
    local warned = {}
    local old = flash.log.set_sink(function(line)
      if line:find(" WARN ", 1, true) then warned[#warned + 1] = line:match("WARN%s+%[[^%]]*%] (.*)$") end
    end)
    local ok, err = pcall(function()
      local c, events = H.listen({ table = t }, "all", { driver = "wal_logical", replica_identity = "full" })
      client = c
      -- Written, then detached, before the client reads anything.
      H.sql("INSERT INTO " .. t .. " VALUES (1, 'in a'), (150, 'in b')")
      H.sql("UPDATE " .. t .. " SET v = 'still in a' WHERE id = 1")
      H.sql("ALTER TABLE " .. t .. " DETACH PARTITION " .. t .. "_a")
      -- Written after the detach: no longer the listened table's.
      H.sql("INSERT INTO " .. t .. "_a VALUES (2, 'after')")
      -- A partition attached, written and detached before the client looked: said.
      H.sql("CREATE TABLE " .. t .. "_c PARTITION OF " .. t .. " FOR VALUES FROM (200) TO (300); " ..
        "INSERT INTO " .. t .. " VALUES (250, 'in c'); ALTER TABLE " .. t .. " DETACH PARTITION " .. t .. "_c")
      H.sql("INSERT INTO " .. t .. " VALUES (199, 'mark')")
      H.wait(c, events, 4, 10)
      H.settle(c, 0.3)
      local got = {}
      for i, ev in ipairs(events) do
        got[i] = string.format("%s %s %s %s", ev.op, ev.table, ev.source, (ev.new or ev.old).v)
      end
      local T = "public." .. t
      assert.same({ "insert " .. T .. " " .. T .. "_a in a", "insert " .. T .. " " .. T .. "_b in b",
        "update " .. T .. " " .. T .. "_a still in a", "insert " .. T .. " " .. T .. "_b mark" }, got)
    end)
    flash.log.set_sink(old)
    assert(ok, err)
    local said
    for _, w in ipairs(warned) do
      if w:find("rows of public." .. t .. "_c (oid ", 1, true) then said = w end
    end
    assert.is_string(said, table.concat(warned, "\n"))
    assert.truthy(said:find("but it is not a partition or child of a listened table now and was not when " ..
      "flashlua last looked (attached and detached in between?): they are not delivered; detach partitions " ..
      "once flashlua has read their rows (client:run{ until_lsn = \"current\" })", 1, true), said)
  end)

  it("returns from run{ until_lsn = \"current\" } once every committed change is handled", function()
    local t = H.table("id int PRIMARY KEY")
    local c = assert(flash.client { driver = "wal_logical" })
    client = c
    local ids = {}
    assert(c:listen { table = t }):on("insert", function(ev) ids[#ids + 1] = ev.new.id end)
    assert(c:start())
    H.sql("INSERT INTO " .. t .. " SELECT generate_series(1, 500)")
    assert.is_true(c:run { until_lsn = "current" })
    assert.equal(500, #ids)
    assert.equal(500, ids[500])
    client = nil   -- run() stopped it
    -- After the run, stats() still says where it stopped: a batch job can log it.
    local s = c:stats()
    assert.matches("^%x+/%x+$", s.last_lsn)
    assert.equal(0, s.lag_bytes)
    assert.equal(500, s.events)
  end)

  it("delivers new columns after ALTER TABLE ADD COLUMN while listening", function()
    local t = H.table("id int PRIMARY KEY")
    local c, events = H.listen({ table = t }, "insert", { driver = "wal_logical" })
    client = c
    H.sql("INSERT INTO " .. t .. " VALUES (1)")
    H.wait(c, events, 1)
    H.sql("ALTER TABLE " .. t .. " ADD COLUMN note text, ADD COLUMN tags int[]")
    H.sql("INSERT INTO " .. t .. " VALUES (2, 'hello', '{1,2}')")
    H.wait(c, events, 2)
    assert.same({ id = 1 }, events[1].new)
    assert.same({ id = 2, note = "hello", tags = { 1, 2 } }, events[2].new)
  end)

  it("says which table lacks REPLICA IDENTITY FULL and the statement to run", function()
    local t = H.table("id int PRIMARY KEY, v text")
    local c = assert(flash.client { driver = "wal_logical" })
    client = c
    assert(c:listen { table = t }):on("update", function() end)
    local ok, err = c:start()
    assert.is_nil(ok)
    assert.equal(string.format("table public.%s does not have REPLICA IDENTITY FULL, so update and delete events " ..
      "would lack the old row (run `ALTER TABLE \"public\".\"%s\" REPLICA IDENTITY FULL`, or pass replica_identity = " ..
      "\"full\" to flash.client (flashlua --table: --replica-identity full) to let flashlua do it)", t, t), err)
  end)

  it("sets REPLICA IDENTITY FULL itself only with replica_identity = \"full\"", function()
    local t = H.table("id int PRIMARY KEY, v text")
    local c, events = H.listen({ table = t }, "update", { driver = "wal_logical", replica_identity = "full" })
    client = c
    assert.equal("f", H.scalar("SELECT relreplident::text FROM pg_class WHERE oid = $1::regclass", t))
    H.sql("INSERT INTO " .. t .. " VALUES (1, 'a'); UPDATE " .. t .. " SET v = 'b'")
    H.wait(c, events, 1)
    assert.same({ { id = 1, v = "b" }, { id = 1, v = "a" } }, { events[1].new, events[1].old })
  end)

  it("names the pid of the process that holds a slot", function()
    local t = H.table("id int PRIMARY KEY")
    local a = assert(flash.client { driver = "wal_logical", persistent = true, slot = "flash_spec_busy", publication = "flash_spec_busy_a" })
    client = a
    assert(a:listen { table = t }):on("insert", function() end)
    assert(a:start())
    local b = assert(flash.client { driver = "wal_logical", persistent = true, slot = "flash_spec_busy", publication = "flash_spec_busy_b" })
    assert(b:listen { table = t }):on("insert", function() end)
    local ok, err = b:start()
    b:stop()
    assert.is_nil(ok)
    local pid = H.scalar("SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'flash_spec_busy'")
    assert.equal(string.format("replication slot flash_spec_busy is active in another process (pid %d) " ..
      "(stop that process, or give this client another `slot`)", pid), err)
    a:stop()
    client = nil
    drop_slot("flash_spec_busy")
    H.sql("DROP PUBLICATION IF EXISTS flash_spec_busy_a; DROP PUBLICATION IF EXISTS flash_spec_busy_b")
  end)

  it("says a role without the REPLICATION attribute needs it", function()
    H.sql("DROP ROLE IF EXISTS flash_norepl; CREATE ROLE flash_norepl LOGIN")
    local t = H.table("id int PRIMARY KEY")
    H.sql("ALTER TABLE " .. t .. " OWNER TO flash_norepl; GRANT CREATE ON DATABASE postgres TO flash_norepl")
    local dsn = H.dsn:gsub("user=%S+", "user=flash_norepl")
    local c = assert(flash.client { driver = "wal_logical", dsn = dsn })
    assert(c:listen { table = t }):on("insert", function() end)
    local ok, err = c:start()
    c:stop()
    H.sql("DROP TABLE " .. t .. "; REVOKE CREATE ON DATABASE postgres FROM flash_norepl; DROP ROLE flash_norepl")
    assert.is_nil(ok)
    assert.matches("REPLICATION", err, 1, true)
    assert.matches("ALTER ROLE", err, 1, true)
  end)

  it("says REPLICATION is missing before the publication fails for want of CREATE (its hint said nothing of it)", function()
    H.sql("DROP ROLE IF EXISTS flash_norepl2; CREATE ROLE flash_norepl2 LOGIN")
    local t = H.table("id int PRIMARY KEY")
    H.sql("GRANT SELECT ON " .. t .. " TO flash_norepl2")
    local dsn = H.dsn:gsub("user=%S+", "user=flash_norepl2")
    local c = assert(flash.client { driver = "wal_logical", dsn = dsn })
    assert(c:listen { table = t }):on("insert", function() end)
    local ok, err = c:start()
    c:stop()
    H.sql("DROP TABLE " .. t .. "; DROP ROLE flash_norepl2")
    assert.is_nil(ok)
    assert.equal("the role flash_norepl2 may not use replication (it has neither REPLICATION nor superuser), which " ..
      "the wal_logical driver needs (run `ALTER ROLE \"flash_norepl2\" REPLICATION` as a superuser)", err)
  end)

  describe("with a cluster of its own", function()
    local sandbox = require "flash.sandbox"

    it("says wal_level must be logical and that it needs a restart", function()
      local sb = assert(sandbox.start { quiet = true, settings = { wal_level = "replica" } })
      local c = assert(flash.client { driver = "wal_logical", dsn = sb.dsn })
      -- A client without listeners creates (and checks) nothing: capture starts with a listener.
      assert(c:query("CREATE TABLE t (id int)"))
      assert(c:listen { table = "t" })
      local ok, err = c:start()
      c:stop()
      sb:stop()
      assert.is_nil(ok)
      assert.equal("wal_level is 'replica', but the wal_logical driver needs wal_level = logical " ..
        "(set wal_level = logical in postgresql.conf or with ALTER SYSTEM SET wal_level = logical, then restart the server; " ..
        "or use a trigger driver, which needs no server setting: driver = \"trigger\", or flashlua --driver trigger)", err)
    end)

    it("says there is no free replication slot and what to raise", function()
      local sb = assert(sandbox.start { quiet = true, settings = { max_replication_slots = 1 } })
      local admin = assert(flash.client { dsn = sb.dsn })
      assert(admin:query("SELECT pg_create_logical_replication_slot('taken', 'pgoutput')"))
      assert(admin:query("CREATE TABLE t (id int)"))
      local c = assert(flash.client { driver = "wal_logical", dsn = sb.dsn })
      assert(c:listen { table = "t" })
      local ok, err = c:start()
      c:stop()
      admin:stop()
      sb:stop()
      assert.is_nil(ok)
      assert.matches("^no free replication slot: ", err)
      assert.matches("raise max_replication_slots", err, 1, true)
    end)
  end)

  describe("streamed transactions (streaming = true)", function()
    setup(function() H.decoding_work_mem("1MB") end)
    teardown(function() H.decoding_work_mem(nil) end)

    it("delivers a large committed transaction and nothing of a rolled-back one", function()
      local t = H.table("id int PRIMARY KEY, pad text")
      local c = assert(flash.client { driver = "wal_logical", streaming = true })
      client = c
      local n, last, marker = 0, 0, nil
      assert(c:listen { table = t }):on("insert", function(ev)
        if ev.new.id < 0 then marker = ev.new.id return end
        n = n + 1
        assert(ev.new.id == last + 1, "out of order")
        last = ev.new.id
      end)
      assert(c:start())
      H.sql("BEGIN; INSERT INTO " .. t .. " SELECT g, repeat('x', 50) FROM generate_series(1000001, 1030000) g; ROLLBACK")
      H.sql("INSERT INTO " .. t .. " SELECT g, repeat('y', 50) FROM generate_series(1, 30000) g")
      H.sql("INSERT INTO " .. t .. " VALUES (-1, 'marker')")
      local deadline = core.now() + 30
      while marker == nil and core.now() < deadline do assert(c:poll(0.1)) end
      assert.equal(-1, marker)
      assert.equal(30000, n)
      local s = c:stats()
      assert.is_true(s.stream_buffered_peak > 0, "the transactions were not streamed")
    end)

    it("spills past the memory bound and replays in order", function()
      local t = H.table("id int PRIMARY KEY, pad text")
      local c = assert(flash.client { driver = "wal_logical", streaming = true, stream_memory = 256 * 1024 })
      client = c
      local n, last, stats = 0, 0, nil
      assert(c:listen { table = t }):on("insert", function(ev)
        n = n + 1
        assert(ev.new.id == last + 1, "out of order")
        last = ev.new.id
        if n == 40000 then stats = c:stats() end
      end)
      assert(c:start())
      H.sql("INSERT INTO " .. t .. " SELECT g, repeat('z', 100) FROM generate_series(1, 40000) g")
      assert.is_true(c:run { until_lsn = "current" })
      client = nil
      assert.equal(40000, n)
      assert.is_true(stats.stream_spilled > 0, "nothing was spilled")
      assert.is_true(stats.stream_buffered_peak <= 256 * 1024, "held more than the bound in memory")
    end)
  end)

  it("delivers a 1,000,000-row streamed transaction with peak RSS under 50 MB", function()
    local t = H.table("id int PRIMARY KEY, a int, b text")
    local script = H.script([[
      local flash = require "flash"
      local c = assert(flash.client { driver = "wal_logical", streaming = true })
      local n, last, ordered, streamed = 0, 0, true, 0
      assert(c:listen { table = arg[1] }):on("insert", function(ev)
        n = n + 1
        if ev.new.id ~= last + 1 then ordered = false end
        last = ev.new.id
        if n == 1000000 then local s = c:stats() streamed = s.stream_buffered_peak + s.stream_spilled end
      end)
      assert(c:start())
      io.stdout:setvbuf("no")
      print("ready")
      while io.open(arg[2]) == nil do assert(c:poll(0.05)) end   -- the writer is done
      assert(c:run { until_lsn = "current" })
      local hwm = io.open("/proc/self/status"):read("*a"):match("VmHWM:%s*(%d+)")
      print("done", n, ordered, hwm, streamed)
    ]])
    local flag = os.tmpname()
    os.remove(flag)
    local h = H.spawn({ script, t, flag })
    assert.is_true(h.await("ready", 20), h.err())
    H.sql("INSERT INTO " .. t .. " SELECT g, g % 1000, 'row ' || g FROM generate_series(1, 1000000) g")
    io.open(flag, "w"):close()
    local rc = h.wait(120)
    os.remove(flag) os.remove(script)
    assert.equal(0, rc, h.err())
    local n, ordered, hwm, streamed = h.out():match("done%s+(%d+)%s+(%a+)%s+(%d+)%s+(%d+)")
    assert.equal("1000000", n)
    assert.equal("true", ordered)
    assert.is_true(tonumber(streamed) > 0, "the transaction was not streamed")
    -- Reported in the output of the run: the figure the issue asks for.
    print(string.format("\n  1M-row streamed transaction: peak RSS %.1f MB", tonumber(hwm) / 1024))
    assert.is_true(tonumber(hwm) < 50 * 1024, "peak RSS " .. hwm .. " kB")
    H.sql("DROP TABLE " .. t)
  end)

  it("confirms on a graceful stop what was delivered: a restart redelivers nothing", function()
    local t = H.table("id int PRIMARY KEY")
    local slot = "flash_spec_graceful"
    drop_slot(slot)
    local rounds = {}
    for round = 1, 4 do
      local c = assert(flash.client { driver = "wal_logical", persistent = true, slot = slot, publication = slot })
      local seen = {}
      assert(c:listen { table = t }):on("insert", function(ev) seen[#seen + 1] = ev.new.id end)
      assert(c:start())
      H.sql("INSERT INTO " .. t .. " VALUES ($1)", round)
      -- Stop right after the change, possibly before its Commit message was read.
      local deadline = core.now() + 5
      while #seen < 1 and core.now() < deadline do assert(c:poll(0.05)) end
      assert(c:stop())
      rounds[round] = table.concat(seen, ",")
    end
    drop_slot(slot)
    assert.same({ "1", "2", "3", "4" }, rounds)
  end)

  it("redelivers every committed change after kill -9 with a persistent slot, in commit order", function()
    local t = H.table("id int PRIMARY KEY")
    local slot = "flash_spec_kill"
    drop_slot(slot)
    local out = os.tmpname()
    local script = H.script([[
      local flash = require "flash"
      local out = assert(io.open(arg[1], "a"))
      out:setvbuf("line")
      local c = assert(flash.client { driver = "wal_logical", persistent = true, slot = arg[2], publication = arg[2] })
      assert(c:listen { table = arg[3] }):on("insert", function(ev) out:write(ev.new.id, "\n") end)
      assert(c:start())
      io.stdout:setvbuf("no")
      print("ready")
      if arg[4] == "until" then assert(c:run { until_lsn = "current" }) end
    ]])
    local total = 3000
    local first = H.spawn({ script, out .. ".1", slot, t })
    assert.is_true(first.await("ready", 20), first.err())
    local killed = false
    for i = 1, total do
      H.sql("INSERT INTO " .. t .. " VALUES ($1)", i)
      if i == 1200 then
        -- Wait until it is mid-stream, then kill it without any chance to clean up.
        local deadline = core.now() + 10
        while #lines(out .. ".1") < 300 and core.now() < deadline do core.sleep(0.02) end
        first.kill("KILL")
        killed = true
      end
    end
    assert.is_true(killed)
    assert.equal(137, first.wait(10))
    local second = H.spawn({ script, out .. ".2", slot, t, "until" })
    local rc = second.wait(60)
    assert.equal(0, rc, second.err())
    local a, b = lines(out .. ".1"), lines(out .. ".2")
    os.remove(out .. ".1") os.remove(out .. ".2") os.remove(script)
    drop_slot(slot)
    local seen = {}
    local function check_order(list)
      for i = 2, #list do assert(tonumber(list[i]) > tonumber(list[i - 1]), "not in commit order at " .. i) end
    end
    check_order(a)
    check_order(b)
    for _, v in ipairs(a) do seen[tonumber(v)] = true end
    for _, v in ipairs(b) do seen[tonumber(v)] = true end
    for i = 1, total do assert(seen[i], "change " .. i .. " was never delivered") end
    assert.is_true(#a >= 300 and #a < total, "the first run was not killed mid-stream (" .. #a .. " events)")
    -- The restart resumes at the last confirmed transaction: no gap after what run one saw.
    assert.is_true(tonumber(b[1]) <= tonumber(a[#a]) + 1)
  end)
end)
