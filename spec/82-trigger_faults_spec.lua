-- spec/82-trigger_faults_spec.lua: the trigger drivers under faults (issue 9): rows too big
-- to capture, a graceful stop with a backlog (everything handed over, or exactly how much
-- was not), and stops while other sessions write.
local flash = require "flash"
local core = require "flash.core"
local H = require "spec.helpers"

local TRIGGER_DRIVERS = { "trigger", "trigger_global", "trigger_statement" }

-- A flashlua process whose callback of inserts on `t` takes `sleep` seconds; it prints
-- "ready", "busy" at the first event, and "delivered N" once flash.run returns. Started,
-- made busy with `rows` inserted rows, then sent SIGTERM; returns the handle.
local function busy_process(driver, t, shutdown_timeout, sleep, rows)
  local path = H.script(string.format([[
local flash = require "flash"
local core = require "flash.core"
local client = assert(flash.client { driver = %q, shutdown_timeout = %s })
local n = 0
assert(client:listen { table = %q }):on("insert", function()
  n = n + 1
  core.sleep(%s)
  if n == 1 then io.write("busy\n") io.stdout:flush() end
end)
assert(client:start())
io.write("ready\n") io.stdout:flush()
local ok, err = flash.run()
io.write("delivered ", n, "\n")
io.stdout:flush()
assert(ok, err)
]], driver, tostring(shutdown_timeout), t, tostring(sleep)))
  local h = H.spawn({ path })
  assert.is_true(h.await("ready", 15), h.err())
  H.sql("INSERT INTO " .. t .. " SELECT g FROM generate_series(1, " .. rows .. ") g")
  assert.is_true(h.await("busy", 15), h.err())
  h.kill("TERM")
  h.path = path
  return h
end

for _, driver in ipairs(TRIGGER_DRIVERS) do
  describe("faults (" .. driver .. ")", function()
    local client
    after_each(function()
      if client then client:stop() client = nil end
    end)

    it("returns from start() only once every trigger exists, even while a table is briefly locked", function()
      local t = H.table("id int PRIMARY KEY")
      -- SHARE UPDATE EXCLUSIVE (what autovacuum and ANALYZE take): inserts go on, but no
      -- trigger can be created until it is released.
      local locker = assert(core.connect(H.dsn))
      assert(locker:exec("BEGIN; LOCK TABLE " .. t .. " IN SHARE UPDATE EXCLUSIVE MODE", 0))
      local path = H.script(string.format([[
local flash = require "flash"
local client = assert(flash.client { driver = %q })
assert(client:listen { table = %q }):on("insert", function(ev) io.write("got ", ev.new.id, "\n") io.stdout:flush() end)
assert(client:start())
io.write("started\n") io.stdout:flush()
flash.after(20, flash.stop)
assert(flash.run())
]], driver, t))
      local h = H.spawn({ path })
      core.sleep(1)
      local early = h.out()
      assert(locker:exec("COMMIT", 0))
      locker:close()
      assert.equal("", early)
      assert.is_true(h.await("started", 15), h.err())
      H.sql("INSERT INTO " .. t .. " VALUES (1)")
      assert.is_true(h.await("got 1", 15), h.out() .. h.err())
      h.kill("TERM")
      assert.equal(0, h.wait(20), h.err())
      os.remove(path)
    end)

    it("captures a row over max_row_bytes without its values: the write succeeds and the event says so", function()
      local t = H.table("id int PRIMARY KEY, body text")
      local events
      client, events = H.listen({ table = t }, "all", { driver = driver, max_row_bytes = 4096 })
      local lines = {}
      local old = flash.log.set_sink(function(line) lines[#lines + 1] = line end)
      local ok, err = pcall(function()
        -- Random text does not compress: the row really is ~100 kB.
        H.sql("INSERT INTO " .. t .. " SELECT 1, string_agg(md5(g::text), '') FROM generate_series(1, 3000) g")
        H.sql("INSERT INTO " .. t .. " VALUES (2, 'small')")
        H.wait(client, events, 2)
      end)
      flash.log.set_sink(old)
      assert(ok, err)
      assert.equal(2, #events)
      assert.equal("insert", events[1].op)
      assert.is_nil(events[1].new)
      assert.is_true(events[1].too_large > 4096)
      assert.same({ id = 2, body = "small" }, events[2].new)
      assert.is_nil(events[2].too_large)
      assert.matches("was too large to capture %(%d+ bytes of text; the limit is max_row_bytes = 4096%)",
        table.concat(lines, "\n"))
    end)

    it("hands over everything captured before a graceful stop", function()
      local t = H.table("id int PRIMARY KEY")
      local h = busy_process(driver, t, 60, 0.0005, 3000)
      assert.equal(0, h.wait(60), h.err())
      assert.matches("delivered 3000\n", h.out())
      assert.equal(0, H.await_leftovers(0))
      os.remove(h.path)
    end)

    it("says exactly how many captured changes a stop past shutdown_timeout leaves, and exits non-zero", function()
      local t = H.table("id int PRIMARY KEY")
      local h = busy_process(driver, t, 0.5, 0.002, 5000)
      assert.equal(1, h.wait(30), h.err())
      local delivered = tonumber(h.out():match("delivered (%d+)"))
      local left = tonumber(h.err():match("(%d+) captured changes were not delivered within shutdown_timeout"))
      assert.truthy(delivered, h.out())
      assert.truthy(left, h.err())
      assert.is_true(left > 0)
      assert.equal(5000, delivered + left)
      assert.equal(0, H.await_leftovers(0))
      os.remove(h.path)
    end)

    it("is not swept by another instance's start while its connection is down, and loses nothing", function()
      local t = H.table("id int PRIMARY KEY")
      local events
      client, events = H.listen({ table = t }, "insert", { driver = driver })
      local schema = client:stats().schema
      H.sql("INSERT INTO " .. t .. " VALUES (1)")
      H.wait(client, events, 1)
      local bpid = client:query("SELECT pg_backend_pid() AS p")[1].p
      assert.is_true(H.scalar("SELECT pg_terminate_backend($1) AS ok", bpid))
      local deadline = core.now() + 5
      while core.now() < deadline and
        tonumber(H.scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", bpid)) > 0 do core.sleep(0.05) end
      H.sql("INSERT INTO " .. t .. " VALUES (2)")
      -- Another instance starts while the first one's query connection is gone.
      local other = assert(flash.client { driver = driver })
      assert(other:listen { table = H.table("id int") }):on("insert", function() end)
      assert(other:start())
      assert.is_true(tonumber(H.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = $1", schema)) == 1)
      other:stop()
      H.sql("INSERT INTO " .. t .. " VALUES (3)")
      H.wait(client, events, 3, 15)
      assert.same({ 1, 2, 3 }, { events[1].new.id, events[2] and events[2].new.id, events[3] and events[3].new.id })
      assert.equal(1, client:stats().reconnects)
    end)

    it("warns when a listened table is dropped, delivers what it captured before, and keeps running", function()
      local t = H.table("id int PRIMARY KEY")
      local keep = H.table("id int PRIMARY KEY")
      local c = assert(flash.client { driver = driver })
      client = c
      local events = {}
      assert(c:listen { table = t }):on("insert", function(ev) events[#events + 1] = "t" .. ev.new.id end)
      assert(c:listen { table = keep }):on("insert", function(ev) events[#events + 1] = "k" .. ev.new.id end)
      assert(c:start())
      local lines = {}
      local old = flash.log.set_sink(function(line) lines[#lines + 1] = line end)
      local ok, err = pcall(function()
        H.sql("INSERT INTO " .. t .. " VALUES (1); DROP TABLE " .. t)
        H.sql("CREATE TABLE " .. t .. " (id int PRIMARY KEY); INSERT INTO " .. t .. " VALUES (2)")
        local deadline = core.now() + 10
        while core.now() < deadline and not table.concat(lines, "\n"):find("was dropped", 1, true) do
          assert(c:poll(0.05))
        end
        H.sql("INSERT INTO " .. keep .. " VALUES (9)")
        H.wait(c, events, 2)
        H.settle(c, 0.2)
      end)
      flash.log.set_sink(old)
      assert(ok, err)
      assert.same({ "t1", "k9" }, events)
      assert.matches("table public%." .. t .. " was dropped: listener %d+ captures nothing more from it",
        table.concat(lines, "\n"))
    end)

    it("gives timers their turn while a slow callback works through a backlog", function()
      local t = H.table("id int PRIMARY KEY")
      local c = assert(flash.client { driver = driver })
      client = c
      local n, ticks, ticks_at_half = 0, 0, nil
      assert(c:listen { table = t }):on("insert", function()
        n = n + 1
        core.sleep(0.001)
        if n == 1000 then ticks_at_half = ticks end
        if n == 2000 then flash.stop() end
      end)
      assert(c:start())
      H.sql("INSERT INTO " .. t .. " SELECT g FROM generate_series(1, 2000) g")
      local cancel = flash.every(0.05, function() ticks = ticks + 1 end)
      assert(c:run())
      cancel()
      client = nil
      -- A thousand callbacks of 1 ms each take a second: the 50 ms timer ran meanwhile.
      assert.equal(2000, n)
      assert.is_true(ticks_at_half >= 5, "timer ticks while the first 1,000 events were delivered: " ..
        tostring(ticks_at_half))
    end)

    it("keeps captured rows in an unlogged table, or a logged one with durable = true", function()
      local t = H.table("id int")
      for _, durable in ipairs({ false, true }) do
        local c = assert(flash.client { driver = driver, durable = durable })
        assert(c:listen { table = t }):on("insert", function() end)
        assert(c:start())
        local kind = H.scalar("SELECT relpersistence::text AS p FROM pg_class WHERE oid = $1::regclass",
          c:stats().schema .. ".events")
        c:stop()
        assert.equal(durable and "p" or "u", kind)
      end
    end)

    it("a role that may create triggers but not drop them (TRIGGER privilege): stop at once, saying how to drop them", function()
      local role = "flash_trig_only"
      H.sql(string.format([[DO $$ BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '%s') THEN CREATE ROLE %s LOGIN; END IF;
        END $$; GRANT CREATE ON DATABASE postgres TO %s]], role, role, role))
      local t = H.table("id int PRIMARY KEY")
      H.sql(string.format("GRANT TRIGGER ON %s TO %s", t, role))
      local dsn = (H.dsn:gsub("user=%S+", "")) .. " user=" .. role
      local h = H.spawn({ "-d", dsn, "--driver", driver, "--table", t })
      assert.is_true(h.await("listening on", 20, "err"), h.err())
      local started = core.now()
      h.kill("TERM")
      local rc = h.wait(20)
      local took = core.now() - started
      local err = h.err()
      local schema = err:match("DROP SCHEMA \"(flash_%d+)\" CASCADE")
      if schema then H.sql("DROP SCHEMA " .. schema .. " CASCADE") end
      assert.equal(1, rc, err)
      -- Not retried until shutdown_timeout (10 s) with a warning every 20 ms.
      assert.is_true(took < 5, string.format("the stop took %.1f s", took))
      local _, warnings = err:gsub("WARN [^\n]*cannot drop trigger", "")
      assert.is_true(warnings <= 4, warnings .. " warnings:\n" .. err:sub(1, 2000))
      assert.truthy(err:find("must be owner of", 1, true), err)
      assert.truthy(schema, err)
      assert.truthy(err:find("left: run `DROP SCHEMA \"" .. schema .. "\" CASCADE` as the owner of the tables", 1, true),
        err)
      assert.equal(0, tonumber(H.scalar("SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::regclass", t)))
      h.wait(1)
      os.remove(h.base .. ".out") os.remove(h.base .. ".err") os.remove(h.base .. ".rc")
    end)

    it("a role that may not create the trigger is told to run as the table's owner, not to get TRIGGER", function()
      local role = "flash_trig_only"
      H.sql(string.format([[DO $$ BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '%s') THEN CREATE ROLE %s LOGIN; END IF;
        END $$; GRANT CREATE ON DATABASE postgres TO %s]], role, role, role))
      local t = H.table("id int PRIMARY KEY")
      local dsn = (H.dsn:gsub("user=%S+", "")) .. " user=" .. role
      local rc, out, err = H.run_flashlua({ "-d", dsn, "--driver", driver, "--table", t }, 20)
      for schema in err:gmatch("DROP SCHEMA \"(flash_%d+)\"") do H.sql("DROP SCHEMA IF EXISTS " .. schema .. " CASCADE") end
      assert.equal(1, rc, err)
      assert.equal("", out)
      assert.truthy(err:find("cannot create the [%w /]+ trigger on public%." .. t .. ": [^\n]*permission denied"), err)
      assert.truthy(err:find("(run flashlua as the table's owner (or a member of the owning role): the TRIGGER " ..
        "privilege alone lets a role create the trigger but not drop it at stop)", 1, true), err)
    end)

    it("stops cleanly, without deadlocks, while other sessions write to the table", function()
      local t = H.table("id bigserial PRIMARY KEY, v text")
      local sql = os.tmpname()
      local f = assert(io.open(sql, "w"))
      f:write("INSERT INTO " .. t .. " (v) VALUES ('w');\n")
      f:close()
      local out = os.tmpname()
      assert(os.execute(string.format("(pgbench -n -f %s -T 6 -c 4 -j 2 %s >%s 2>&1; echo $? >%s.rc) &",
        H.sh_quote(sql), H.sh_quote(H.dsn), H.sh_quote(out), H.sh_quote(out))) == 0)
      for round = 1, 5 do
        local c = assert(flash.client { driver = driver })
        local got = 0
        assert(c:listen { table = t }):on("insert", function() got = got + 1 end)
        assert(c:start())
        local deadline = core.now() + 0.4
        while core.now() < deadline do assert(c:poll(0.02)) end
        local ok, err = c:stop()
        assert(ok, "round " .. round .. ": " .. tostring(err))
        assert.is_true(got > 0, "round " .. round .. " saw no insert")
        assert.equal(0, H.capture(t))
      end
      local deadline = core.now() + 20
      local rc
      while core.now() < deadline do
        local r = io.open(out .. ".rc")
        rc = r and r:read("*n")
        if r then r:close() end
        if rc then break end
        core.sleep(0.1)
      end
      local r = io.open(out)
      local text = r and r:read("*a") or ""
      if r then r:close() end
      assert.equal(0, rc, text)
      assert.matches("number of failed transactions: 0", text, 1, true)
      assert.equal(0, H.leftovers())
      os.remove(sql) os.remove(out) os.remove(out .. ".rc")
    end)
  end)
end

describe("trigger driver options", function()
  it("refuses poll_interval and max_row_bytes values it cannot use, naming the option", function()
    for _, bad in ipairs({
      { { poll_interval = 0 }, "option 'poll_interval'" },
      { { poll_interval = -1 }, "option 'poll_interval'" },
      { { max_row_bytes = 10 }, "option 'max_row_bytes'" },
      { { max_row_bytes = 2 ^ 40 }, "option 'max_row_bytes'" },
      { { durable = "yes" }, "option 'durable'" },
    }) do
      local ok, err = pcall(flash.client, bad[1])
      assert.is_false(ok)
      assert.matches(bad[2], err, 1, true)
    end
  end)
end)

describe("a row of 100 MB (trigger)", function()
  it("arrives intact, and the client's memory comes back after it", function()
    local event, base, peak, after = H.big_row("trigger")
    assert.equal("event 104857600 true", event)
    -- The row's text is 200 MB (hex): under 3 times that at the peak, and less than 64 MB
    -- more than before afterwards.
    assert.is_true(peak - base < 600, "peak " .. peak .. " MB, baseline " .. base)
    assert.is_true(after - base < 64, "after " .. after .. " MB, baseline " .. base)
  end)
end)

-- A database whose transactions are serializable by default: the polls read and delete
-- what writers insert, and failed as such (serialization failures stopped the client).
describe("trigger drivers under default_transaction_isolation = serializable", function()
  for _, driver in ipairs(TRIGGER_DRIVERS) do
    it("deliver every row while writers conflict among themselves (" .. driver .. ")", function()
      local t = H.table("id bigserial PRIMARY KEY, v text")
      H.sql("ALTER DATABASE postgres SET default_transaction_isolation = 'serializable'")
      local ok, err = pcall(function()
        local c = assert(flash.client { driver = driver })
        local inserts = 0
        assert(c:listen { table = t }):on("insert", function() inserts = inserts + 1 end)
        assert(c:start())
        local sql = os.tmpname()
        local f = assert(io.open(sql, "w"))
        f:write("BEGIN; INSERT INTO " .. t .. " (v) VALUES ('a'); SELECT count(*) FROM " .. t .. " WHERE id < 5; " ..
          "UPDATE " .. t .. " SET v = 'b' WHERE id = (SELECT max(id) FROM " .. t .. "); COMMIT;\n")
        f:close()
        local out = os.tmpname()
        assert(os.execute(string.format("(pgbench -n -f %s -T 4 -c 4 -j 2 %s >%s 2>&1; echo $? >%s.rc) &",
          H.sh_quote(sql), H.sh_quote(H.dsn), H.sh_quote(out), H.sh_quote(out))) == 0)
        local deadline = core.now() + 30
        local done = false
        while core.now() < deadline and not done do
          assert(c:poll(0.05))
          local rc = io.open(out .. ".rc")
          if rc then done = rc:read("*a") ~= "" rc:close() end
        end
        local n = tonumber(H.scalar("SELECT count(*) FROM " .. t))
        deadline = core.now() + 30
        while core.now() < deadline and inserts < n do assert(c:poll(0.05)) end
        c:stop()
        assert.is_true(n > 0)
        assert.equal(n, inserts)
        os.remove(sql) os.remove(out) os.remove(out .. ".rc")
      end)
      H.sql("ALTER DATABASE postgres RESET default_transaction_isolation")
      assert(ok, err)
    end)
  end
end)

-- A crash of the server (pg_ctl restart -m immediate) while a batch is in hand: the
-- unlogged capture table comes back empty, its seqs start again at 1, and the rows
-- committed after the restart must not be taken for the batch's (deleted undelivered).
describe("trigger drivers across a crash of the server", function()
  local sandbox = require "flash.sandbox"
  local sb
  setup(function() sb = assert(sandbox.start { quiet = true }) end)
  teardown(function() if sb then sb:stop() end end)

  local function crash()
    local pgctl = sb:_bin("pg_ctl") .. " restart -D " .. H.sh_quote(sb.datadir) .. " -m immediate -w -t 60 -l " ..
      H.sh_quote(sb.dir .. "/restart.log") .. " >/dev/null 2>&1"
    assert(os.execute(sb:_cmd(pgctl)) == 0)
  end

  for _, driver in ipairs(TRIGGER_DRIVERS) do
    it("delivers every row committed after the crash, and says the rows not yet read were lost (" .. driver .. ")",
      function()
      local w = assert(core.connect(sb.dsn))
      assert(w:exec("DROP TABLE IF EXISTS cr; CREATE TABLE cr (id int PRIMARY KEY)", 0))
      local client = assert(flash.client { dsn = sb.dsn, driver = driver })
      local got = {}
      assert(client:listen { table = "public.cr" }):on("insert", function(ev)
        got[#got + 1] = ev.new.id
        core.sleep(0.002)
      end)
      local lines = {}
      local old = flash.log.set_sink(function(line) lines[#lines + 1] = line end)
      local ok, err = pcall(function()
        assert(client:start())
        -- Three batches captured; the first is read, and its delivery under way.
        assert(w:exec("INSERT INTO cr SELECT g FROM generate_series(1, 3000) g", 0))
        H.wait(client, got, 20, 20)
        w:close()
        crash()
        -- Rows committed once it is back, while the batch is still being delivered.
        w = assert(core.connect(sb.dsn))
        for i = 5001, 5010 do assert(w:exec("INSERT INTO cr VALUES (" .. i .. ")", 0)) end
        local deadline = core.now() + 60
        local seen = {}
        while core.now() < deadline do
          client:poll(0.05)
          seen = {}
          for _, id in ipairs(got) do seen[id] = true end
          local all = true
          for i = 5001, 5010 do all = all and seen[i] == true end
          if all then break end
        end
        local after = {}
        for i = 5001, 5010 do after[#after + 1] = seen[i] and i or nil end
        assert.same({ 5001, 5002, 5003, 5004, 5005, 5006, 5007, 5008, 5009, 5010 }, after)
      end)
      flash.log.set_sink(old)
      local schema = client:stats().schema
      client:stop()
      w:close()
      assert(ok, err)
      local said = {}
      for _, l in ipairs(lines) do
        if l:find("crash", 1, true) or l:find("nothing was lost", 1, true) then
          said[#said + 1] = l:match("%] (.*)$")
        end
      end
      assert.same({ "PostgreSQL crashed while the connection was down: the changes captured into " .. schema ..
        ".events and not yet read were lost with it (the table is unlogged; durable = true keeps them); every " ..
        "change committed since it came back is delivered" }, said)
    end)
  end
end)

-- A transaction of more rows than one poll reads (1,000), and a small one that committed
-- before it but was captured after its first rows: the small one's rows came between the
-- big one's, in the poll that read the big one's last rows (sorted by commit time there).
-- The transaction a full batch ends with now comes first in the next one.
for _, driver in ipairs(TRIGGER_DRIVERS) do
  describe("a transaction read over several polls (" .. driver .. ")", function()
    it("comes whole: no other transaction between its rows", function()
      local t = H.table("id int, who text")
      local c = assert(flash.client { driver = driver })
      local events = {}
      assert(c:listen { table = t }):on("insert", function(ev) events[#events + 1] = ev.new.who end)
      assert(c:start())
      local big = assert(flash.client {})
      finally(function() c:stop() big:stop() end)
      assert(big:query("BEGIN"))
      -- One statement per row, so that trigger_statement captures 2,500 rows too.
      assert(big:query(string.format([[DO $$ BEGIN
        FOR i IN 1..2500 LOOP INSERT INTO %s VALUES (i, 'big'); END LOOP; END $$]], t)))
      H.sql("INSERT INTO " .. t .. " VALUES (0, 'small')")
      assert(big:query("COMMIT"))
      H.wait(c, events, 2501, 30)
      H.settle(c, 0.3)
      local runs, prev = {}, nil
      for _, who in ipairs(events) do
        if who ~= prev then runs[#runs + 1] = who prev = who end
      end
      assert.are.equal(2501, #events)
      -- The small one committed first but was captured after the first batch's rows.
      assert.are.same({ "big", "small" }, runs)
    end)
  end)
end
