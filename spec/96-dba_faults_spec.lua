-- spec/96-dba_faults_spec.lua: faults a DBA or the environment causes, under every driver:
-- settings put on flashlua's role by ALTER ROLE ... SET, the persistent slot or the
-- publication dropped while flashlua runs, a persistent slot the server invalidated while
-- flashlua was stopped (max_slot_wal_keep_size), SIGHUP, a reader of `flashlua --table`
-- that goes away (`| head -1`), and a callback that fails on every event.
local flash = require "flash"
local core = require "flash.core"
local H = require "spec.helpers"

local WAL_DRIVERS = {}
for _, d in ipairs(H.drivers) do
  if d == "wal_logical" or d == "pg_extension" then WAL_DRIVERS[#WAL_DRIVERS + 1] = d end
end

-- Polls until pred() holds (or timeout); returns its last answer.
local function poll_until(c, pred, timeout)
  local deadline = core.now() + (timeout or 5)
  while not pred() and core.now() < deadline do
    local ok, err = c:poll(0.05)
    if not ok then return pred(), err end
  end
  return pred()
end

local function ids(events)
  local t = {}
  for i, ev in ipairs(events) do t[i] = ev.new.id end
  return table.concat(t, ",")
end

local function find(list, text)
  for _, l in ipairs(list) do
    if l:find(text, 1, true) then return l end
  end
  return nil
end

-- Settings a DBA put on the role flashlua (and the application) runs as. Events carry the
-- canonical text forms of API.md; default_transaction_read_only = on made every driver
-- fail to start (`cannot execute CREATE SCHEMA in a read-only transaction`, then a hint
-- about the CREATE privilege; pg_extension: `nextval()`).
local ROLE_SETTINGS = {
  "TimeZone = 'Asia/Kolkata'", "DateStyle = 'SQL, DMY'", "IntervalStyle = 'sql_standard'",
  "extra_float_digits = -3", "bytea_output = 'escape'", "search_path = ''",
  "default_transaction_read_only = on", "default_transaction_isolation = 'serializable'",
  "statement_timeout = '50ms'", "lock_timeout = '50ms'", "idle_in_transaction_session_timeout = '1s'",
  "idle_session_timeout = '1s'",
}

describe("settings of flashlua's role (ALTER ROLE ... SET)", function()
  for _, driver in ipairs(H.drivers) do
    it("change no value of an event and do not stop capture (" .. driver .. ")", function()
      local t = H.table("id int PRIMARY KEY, ts timestamptz, d date, iv interval, f8 float8, f4 real, " ..
        "b bytea, ba bytea[], n numeric, tm time")
      H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
      local role = H.scalar("SELECT current_user::text AS u")
      for _, s in ipairs(ROLE_SETTINGS) do H.sql("ALTER ROLE " .. role .. " SET " .. s) end
      local ok, err = pcall(function()
        local c, events = H.listen({ table = t }, { "insert", "update" }, { driver = driver })
        -- The application's own session has the role's settings too.
        local w = assert(core.connect(H.dsn))
        assert(w:exec("SET default_transaction_read_only = off", 0))
        assert(w:exec("INSERT INTO public." .. t .. " VALUES (1, '2026-01-02 03:04:05.5+00', '2026-01-31', " ..
          "'1 day 02:03:04.5', 0.1, 1.1, '\\x00ff27', '{\"\\\\x00ff\"}', 1.50, '12:34:56.5')", 0))
        assert(w:exec("UPDATE public." .. t .. " SET f8 = 2.2", 0))
        w:close()
        poll_until(c, function() return #events >= 2 end)
        assert(c:stop())
        assert.equal(2, #events)
        local r = events[1].new
        assert.same({ "2026-01-02 03:04:05.5+00", "2026-01-31", "1 day 02:03:04.5", 0.1, 1.1, "\0\255'", { "\0\255" },
          "1.50", "12:34:56.5" }, { r.ts, r.d, r.iv, r.f8, r.f4, r.b, r.ba, r.n, r.tm })
        assert.equal("update", events[2].op)
        assert.equal(2.2, events[2].new.f8)
        assert.equal(0.1, events[2].old.f8)
      end)
      H.sql("ALTER ROLE " .. role .. " RESET ALL")
      assert(ok, err)
    end)
  end
end)

-- A DBA drops the persistent slot while flashlua runs (pg_terminate_backend of its WAL
-- sender, then pg_drop_replication_slot). The reconnect created the slot again and said
-- "replication resumed from slot S; unconfirmed changes are delivered again": what was
-- committed while the slot was gone was lost without a word.
describe("a persistent slot dropped while the client runs", function()
  for _, driver in ipairs(WAL_DRIVERS) do
    it("is created again with a warning naming what was not captured (" .. driver .. ")", function()
      local t = H.table("id int PRIMARY KEY")
      local slot = "flash_spec96_" .. driver
      H.drop_slot(slot)
      local c, events
      local warnings = H.warnings(function()
        c, events = H.listen({ table = t }, "insert", { driver = driver, persistent = true, slot = slot,
          publication = slot, replica_identity = "full" })
        H.sql("INSERT INTO " .. t .. " VALUES (1)")
        poll_until(c, function() return #events >= 1 end)
        -- The client does not poll meanwhile: it cannot take the slot back before the drop.
        H.sql("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1", slot)
        assert.is_true(H.wait_for(function()
          return tonumber(H.scalar("SELECT count(*) AS n FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
            slot)) == 1
        end, 5))
        H.sql("SELECT pg_drop_replication_slot($1)", slot)
        H.sql("INSERT INTO " .. t .. " VALUES (2)")   -- committed while there is no slot: lost
        poll_until(c, function() return c:stats().reconnects > 0 end, 10)
        H.sql("INSERT INTO " .. t .. " VALUES (3)")
        poll_until(c, function() return #events >= 2 end)
        assert(c:stop())
      end)
      H.drop_slot(slot)
      assert.equal("1,3", ids(events))
      local w = find(warnings, "was dropped while this client ran")
      assert.truthy(w, table.concat(warnings, "\n"))
      assert.truthy(w:find("replication slot " .. slot .. " was dropped while this client ran (by another session: " ..
        "pg_drop_replication_slot); created it again: changes committed after ", 1, true), w)
      assert.truthy(w:find("were not captured$"), w)
      assert.is_nil(find(warnings, "unconfirmed changes are delivered again"))
    end)
  end
end)

-- The same while no flashlua runs: the next run created the slot anew ("created persistent
-- replication slot S", at info level) and began at the current position: what was
-- committed since the last run was lost without a warning. Its publication, with the
-- slot's name in its comment, tells that an earlier persistent run used the slot.
describe("a persistent slot dropped while no flashlua runs", function()
  it("is created again with a warning that the changes since the last run were not captured", function()
    local t = H.table("id int PRIMARY KEY")
    local slot = "flash_spec96_between"
    H.drop_slot(slot)
    local opts = { driver = "wal_logical", persistent = true, slot = slot, publication = slot }
    local warnings = H.warnings(function()
      local c = H.listen({ table = t }, "insert", opts)
      assert(c:stop())
    end)
    assert.is_nil(find(warnings, "did not exist"))
    H.sql("SELECT pg_drop_replication_slot($1)", slot)
    H.sql("INSERT INTO " .. t .. " VALUES (1)")
    local events
    warnings = H.warnings(function()
      local c
      c, events = H.listen({ table = t }, "insert", opts)
      H.sql("INSERT INTO " .. t .. " VALUES (2)")
      poll_until(c, function() return #events >= 1 end)
      H.settle(c, 0.2)
      assert(c:stop())
    end)
    H.drop_slot(slot)
    assert.equal("2", ids(events))
    assert.truthy(find(warnings, "replication slot " .. slot .. " did not exist, but publication " .. slot .. " of an " ..
      "earlier persistent run of it does: the slot was dropped after that run (pg_drop_replication_slot, or flashlua " ..
      "--drop-slot), and the changes committed since that run stopped were not captured; capturing from now on"),
      table.concat(warnings, "\n"))
  end)
end)

-- A DBA drops the wal_logical client's (temporary) publication while it runs. The stream
-- failed on the next change, and every reconnect made a new temporary slot that failed the
-- same way, about ten times a second, for as long as it ran: nothing was captured again.
describe("the publication dropped while a wal_logical client runs", function()
  it("is created again, with a warning, and capture goes on", function()
    local t = H.table("id int PRIMARY KEY")
    local c, events
    local warnings = H.warnings(function()
      c, events = H.listen({ table = t }, "insert", { driver = "wal_logical" })
      H.sql("INSERT INTO " .. t .. " VALUES (1)")
      poll_until(c, function() return #events >= 1 end)
      local pub = c:stats().publication
      H.sql("DROP PUBLICATION " .. pub)
      H.sql("INSERT INTO " .. t .. " VALUES (2)")
      poll_until(c, function() return c:stats().reconnects > 0 end, 10)
      H.sql("INSERT INTO " .. t .. " VALUES (3)")
      poll_until(c, function() return #events >= 2 and events[#events].new.id == 3 end)
      H.settle(c, 0.3)
      assert(c:stop())
    end)
    local pub = c:stats().publication
    assert.truthy(find(warnings, "publication " .. pub .. " was dropped while listening (by another session); " ..
      "creating it again"), table.concat(warnings, "\n"))
    assert.equal("1,3", ids(events))
    assert.equal(1, #(function()
      local n = {}
      for _, l in ipairs(warnings) do if l:find("replication resumed", 1, true) then n[#n + 1] = l end end
      return n
    end)())
  end)
end)

-- A persistent slot that the server invalidated while no flashlua read it (it held more
-- WAL than max_slot_wal_keep_size). The start failed with PostgreSQL's `cannot read from
-- logical replication slot` alone: not that changes were lost, nor what to do.
describe("a persistent slot invalidated while flashlua was stopped (wal_status lost)", function()
  it("fails the start, saying that changes were lost and how to go on", function()
    local t = H.table("id int PRIMARY KEY")
    local slot = "flash_spec96_lost"
    H.drop_slot(slot)
    local opts = { driver = "wal_logical", persistent = true, slot = slot, publication = slot }
    local c = H.listen({ table = t }, "insert", opts)
    assert(c:stop())
    H.sql("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
    H.sql("SELECT pg_reload_conf()")
    local ok, err = pcall(function()
      assert.is_true(H.wait_for(function()
        for i = 1, 3 do
          H.sql("INSERT INTO " .. t .. " SELECT g FROM generate_series(" .. i * 1000 .. ", " .. i * 1000 + 99 .. ") g")
          H.sql("SELECT pg_switch_wal()")
        end
        H.sql("CHECKPOINT")
        return H.scalar("SELECT wal_status::text AS s FROM pg_replication_slots WHERE slot_name = $1", slot) == "lost"
      end, 20))
      local c2 = assert(flash.client(opts))
      assert(c2:listen { table = t }):on("insert", function() end)
      local sok, serr = c2:start()
      c2:stop()
      assert.is_nil(sok)
      assert.truthy(serr:find("replication slot " .. slot .. " was invalidated by the server (wal_status lost: it held " ..
        "more WAL than max_slot_wal_keep_size allows, and the server removed WAL it had not read): the changes " ..
        "committed after ", 1, true), serr)
      assert.truthy(serr:find("are lost and cannot be delivered (to capture again from now, drop it: flashlua " ..
        "--drop-slot " .. slot, 1, true), serr)
      -- Any client's start says so too (the slot held no WAL any more: it was not in the
      -- warnings about inactive slots), and the list shows it.
      local warnings = H.warnings(function()
        local c3 = H.listen({ table = t }, "insert", { driver = "trigger" })
        assert(c3:stop())
      end)
      local w = find(warnings, "replication slot " .. slot .. " was invalidated")
      assert.truthy(w, table.concat(warnings, "\n"))
      local tail = "; drop it: flashlua --drop-slot " .. slot
      assert.equal(tail, w:sub(-#tail))
      local rc, out, lerr = H.run_flashlua({ "slots", "list" })
      assert.equal(0, rc, lerr)
      assert.truthy(out:find("\n" .. slot .. " +pgoutput +no +lost +%x+/%x+\n"), out)
    end)
    H.sql("ALTER SYSTEM RESET max_slot_wal_keep_size")
    H.sql("SELECT pg_reload_conf()")
    H.drop_slot(slot)
    assert(ok, err)
  end)
end)

-- The same while the client runs (its reads held up meanwhile, so the slot falls behind):
-- the server ends the WAL sender, and the reconnect stops the client with that message
-- rather than retrying forever (a failed reconnect was retried silently, at debug level).
describe("a persistent slot invalidated while the client runs", function()
  it("stops the client, saying that changes were lost", function()
    local t = H.table("id int PRIMARY KEY")
    local slot = "flash_spec96_lost_run"
    H.drop_slot(slot)
    local c = H.listen({ table = t }, "insert", { driver = "wal_logical", persistent = true, slot = slot,
      publication = slot })
    H.sql("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
    H.sql("SELECT pg_reload_conf()")
    local perr
    local ok, err = pcall(function()
      for i = 1, 4 do
        H.sql("INSERT INTO " .. t .. " SELECT g FROM generate_series(" .. i * 1000 .. ", " .. i * 1000 + 299 .. ") g")
        H.sql("SELECT pg_switch_wal()")
      end
      -- The checkpoint waits for the WAL sender, which waits for this client to read: from
      -- another process.
      os.execute("psql -q " .. H.sh_quote(H.dsn) .. " -c CHECKPOINT >/dev/null 2>&1 &")
      H.warnings(function()
        local deadline = core.now() + 15
        while core.now() < deadline do
          local pok, e = c:poll(0.05)
          if not pok then perr = e break end
        end
      end)
    end)
    c:stop()
    H.sql("ALTER SYSTEM RESET max_slot_wal_keep_size")
    H.sql("SELECT pg_reload_conf()")
    H.drop_slot(slot)
    assert(ok, err)
    assert.truthy(tostring(perr):find("replication slot " .. slot .. " was invalidated by the server (wal_status lost", 1,
      true), tostring(perr))
  end)
end)

describe("the flashlua process", function()
  local s = H.session()
  after_each(function() s.cleanup() end)

  -- SIGHUP (a closed terminal, a dropped ssh session) killed the process by its default
  -- action: exit 129, its triggers left on the user's table (publication, for wal_logical)
  -- until some later start swept them.
  for _, driver in ipairs({ "trigger", "wal_logical" }) do
    it("stops gracefully on SIGHUP and removes what it created (" .. driver .. ")", function()
      local t = H.table("id int PRIMARY KEY")
      local h = s.spawn({ "--driver", driver, "--table", t, "--ops", "insert" })
      assert.is_true(h.await("connected to", 15, "err"), h.err())
      assert.is_true(H.capture(t) > 0)
      h.kill("HUP")
      assert.equal(0, h.wait(15), h.err())
      assert.truthy(h.err():find("received SIGHUP, stopping", 1, true), h.err())
      assert.equal(0, H.capture(t))
    end)
  end

  -- `flashlua --table T | head -1`: once head had gone, every write failed (EPIPE; SIGPIPE
  -- is ignored) and stdio said nothing: flashlua ran on, "delivering" events into nowhere
  -- (and confirming them), its triggers on the table, until someone killed it.
  for _, driver in ipairs({ "trigger", "wal_logical" }) do
    it("stops, without acknowledging, once the reader of its stdout has gone (" .. driver .. ")", function()
      local t = H.table("id int PRIMARY KEY")
      local base = s.tmp()
      local cmd = string.format("cd %s && (env FLASH_DSN=%s %s --driver %s --table %s --ops insert 2>%s.err; " ..
        "echo $? >%s.rc) | head -1 >%s.out", H.sh_quote(H.root), H.sh_quote(H.dsn), H.sh_quote(H.flashlua), driver, t,
        base, base, base)
      os.execute("setsid sh -c " .. H.sh_quote(cmd) .. " >/dev/null 2>&1 &")
      local function slurp(ext)
        local f = io.open(base .. ext)
        if not f then return "" end
        local v = f:read("*a")
        f:close()
        return v
      end
      assert.is_true(H.wait_for(function() return slurp(".err"):find("connected to", 1, true) ~= nil end, 15), slurp(".err"))
      local rc
      for i = 1, 30 do
        H.sql("INSERT INTO " .. t .. " VALUES ($1)", i)
        if H.wait_for(function() return slurp(".rc") ~= "" end, 0.3) then rc = tonumber(slurp(".rc")) break end
      end
      local err = slurp(".err")
      os.remove(base .. ".err") os.remove(base .. ".rc") os.remove(base .. ".out")
      assert.equal(1, rc, err)
      assert.truthy(err:find("cannot write the event to stdout (Broken pipe): stopping", 1, true), err)
      assert.equal(0, H.capture(t))
    end)
  end
end)

-- A callback that fails on every event, with on_error = "stop" (the default): "the change
-- is not acknowledged". The trigger drivers deleted the failed row with the handled ones
-- all the same, so a persistent schema's next run began after it: row 1 was lost.
describe("a callback that fails on every event (on_error = stop)", function()
  local drivers = { "trigger", "trigger_statement" }
  for _, d in ipairs(WAL_DRIVERS) do drivers[#drivers + 1] = d end
  for _, driver in ipairs(drivers) do
    it("stops before its row, which a persistent client's next run delivers (" .. driver .. ")", function()
      local t = H.table("id int PRIMARY KEY")
      local name = "flash_spec96_" .. driver
      local opts = { driver = driver, persistent = true, slot = name, publication = name, schema = name,
        replica_identity = "full" }
      local c = assert(flash.client(opts))
      assert(c:listen { table = t }):on("insert", function(ev) error("boom " .. ev.new.id) end)
      local ok, err = pcall(function()
        assert(c:start())
        H.sql("INSERT INTO " .. t .. " VALUES (1); INSERT INTO " .. t .. " VALUES (2)")
        local perr
        H.warnings(function()
          local deadline = core.now() + 5
          while core.now() < deadline do
            local pok, e = c:poll(0.05)
            if not pok then perr = e break end
          end
        end)
        assert.truthy(tostring(perr):find("boom 1", 1, true), tostring(perr))
        c:stop()
        H.sql("INSERT INTO " .. t .. " VALUES (3)")
        local c2, events = H.listen({ table = t }, "insert", opts)
        poll_until(c2, function() return #events >= 3 end)
        H.settle(c2, 0.2)
        assert(c2:stop())
        assert.equal("1,2,3", ids(events))
      end)
      c:stop()
      if driver == "wal_logical" or driver == "pg_extension" then
        H.drop_slot(name, driver == "wal_logical" and name or nil)
      else
        H.sql("DROP SCHEMA IF EXISTS " .. name .. " CASCADE")
      end
      assert(ok, err)
    end)
  end
end)

-- A DBA drops the instance's schema (DROP SCHEMA flash_N CASCADE: the triggers go with it)
-- while the client's connection stays up. Every poll failed with `schema "flash_N" does not
-- exist` and the client stopped on that, capturing nothing more; a reconnect (the same
-- drop while the connection was down) made it again and said what was not captured.
describe("the instance's schema dropped while a trigger driver runs", function()
  for _, driver in ipairs({ "trigger", "trigger_global", "trigger_statement" }) do
    it("is made again, with a warning giving the span not captured (" .. driver .. ")", function()
      local t = H.table("id int PRIMARY KEY")
      local c, events
      local warnings = H.warnings(function()
        c, events = H.listen({ table = t }, "insert", { driver = driver })
        H.sql("INSERT INTO " .. t .. " VALUES (1)")
        poll_until(c, function() return #events >= 1 end)
        H.sql("DROP SCHEMA " .. c:stats().schema .. " CASCADE")
        H.sql("INSERT INTO " .. t .. " VALUES (2)")   -- no trigger: not captured
        poll_until(c, function() return c:stats().reconnects > 0 end)
        H.sql("INSERT INTO " .. t .. " VALUES (3)")
        poll_until(c, function() return #events >= 2 end)
        H.settle(c, 0.2)
        assert(c:stop())
      end)
      assert.equal("1,3", ids(events))
      local w = find(warnings, "was dropped while listening")
      assert.truthy(w, table.concat(warnings, "\n"))
      assert.truthy(w:find("^schema " .. c:stats().schema .. " was dropped while listening %(by another session: DROP " ..
        "SCHEMA %.%.%. CASCADE removes flashlua's triggers with it%); created it again: changes committed between " ..
        "%d%d%d%d%-%d%d%-%d%d %d%d:%d%d:%d%dZ and %d%d%d%d%-%d%d%-%d%d %d%d:%d%d:%d%dZ were not captured$"), w)
      assert.equal(0, H.capture(t))
    end)
  end
end)

-- Another session removes the instance's trigger from a listened table: DROP TRIGGER (the
-- table's owner), or DROP EXTENSION flashlua CASCADE (a DBA reinstalling the extension),
-- which takes every trigger calling flash.capture() along. Capture from the table stopped
-- without a word, for as long as flashlua ran.
describe("a trigger removed by another session while a trigger driver runs", function()
  local function case(driver, remove)
    local t = H.table("id int PRIMARY KEY")
    local c, events
    local warnings = H.warnings(function()
      c, events = H.listen({ table = t }, "insert", { driver = driver })
      H.sql("INSERT INTO " .. t .. " VALUES (1)")
      poll_until(c, function() return #events >= 1 end)
      remove(t)
      assert.equal(0, H.capture(t))
      H.sql("INSERT INTO " .. t .. " VALUES (2)")   -- no trigger: not captured
      poll_until(c, function() return H.capture(t) > 0 end, 5)
      H.sql("INSERT INTO " .. t .. " VALUES (3)")
      poll_until(c, function() return #events >= 2 end)
      H.settle(c, 0.2)
      assert(c:stop())
    end)
    assert.equal("1,3", ids(events))
    local w = find(warnings, "dropped by another session")
    assert.truthy(w, table.concat(warnings, "\n"))
    assert.truthy(w:find(" on public." .. t .. " w[a-z]+ dropped by another session %(DROP TRIGGER, or DROP EXTENSION " ..
      "flashlua CASCADE%): changes to public%." .. t .. " committed between "), w)
    assert.truthy(w:find("Z and now were not captured; [a-z ]+ made again$"), w)
  end
  for _, driver in ipairs({ "trigger", "trigger_global", "trigger_statement" }) do
    it("is made again, with a warning (DROP TRIGGER, " .. driver .. ")", function()
      case(driver, function(t)
        local names = H.sql("SELECT tgname::text AS n FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal", t)
        for _, r in ipairs(names) do H.sql(string.format('DROP TRIGGER "%s" ON %s', r.n, t)) end
      end)
    end)
  end
  local c_capture = H.scalar("SELECT count(*) AS n FROM pg_extension WHERE extname = 'flashlua'") == 1 and
    os.getenv("FLASH_TEST_CAPTURE") ~= "plpgsql"
  it("is made again, with a warning (DROP EXTENSION flashlua CASCADE, trigger)", function()
    if not c_capture then return pending("no C capture function here") end
    local ok, err = pcall(case, "trigger", function() H.sql("DROP EXTENSION flashlua CASCADE") end)
    H.sql("CREATE EXTENSION IF NOT EXISTS flashlua")
    assert(ok, err)
  end)
end)

-- DROP EXTENSION flashlua under the pg_extension driver: its registry goes, the plugin finds
-- no listener, and nothing more was delivered, without a word, until the stop failed on
-- the missing registry.
describe("the flashlua extension dropped while the pg_extension driver runs", function()
  it("stops the client with the reason", function()
    if WAL_DRIVERS[#WAL_DRIVERS] ~= "pg_extension" then return pending("no pg_extension driver here") end
    local t = H.table("id int PRIMARY KEY")
    local c, events = H.listen({ table = t }, "insert", { driver = "pg_extension", replica_identity = "full" })
    local perr
    local ok, err = pcall(function()
      H.sql("INSERT INTO " .. t .. " VALUES (1)")
      poll_until(c, function() return #events >= 1 end)
      H.sql("DROP EXTENSION flashlua CASCADE")
      H.sql("INSERT INTO " .. t .. " VALUES (2)")
      H.warnings(function()
        local deadline = core.now() + 5
        while core.now() < deadline do
          local pok, e = c:poll(0.05)
          if not pok then perr = e break end
        end
      end)
    end)
    local sok, serr = c:stop()
    H.sql("CREATE EXTENSION IF NOT EXISTS flashlua")
    assert(ok, err)
    assert.truthy(tostring(perr):find("^the flashlua extension was dropped while listening %(DROP EXTENSION flashlua; " ..
      "found at %d%d%d%d%-%d%d%-%d%d %d%d:%d%d:%d%dZ%): its listeners went with it, and changes committed since the drop " ..
      "were not captured %(run CREATE EXTENSION flashlua as a superuser, then start flashlua again%)$"), tostring(perr))
    assert.is_true(sok, serr)
    assert.equal("1", ids(events))
  end)
end)

-- A reconnect that keeps failing (here: the role may no longer log in; likewise
-- max_connections or max_wal_senders reached) was said only at debug level: after
-- "connection to PostgreSQL lost ...; reconnecting" nothing told why nothing arrived.
describe("a reconnect that keeps failing", function()
  for _, driver in ipairs({ "trigger", "wal_logical" }) do
    it("is said in a warning with the reason, and capture resumes once it succeeds (" .. driver .. ")", function()
      local role = "flash_spec96_nologin"
      H.sql(string.format("DROP ROLE IF EXISTS %s; CREATE ROLE %s LOGIN SUPERUSER REPLICATION", role, role))
      local t = H.table("id int PRIMARY KEY")
      local c, events
      local ok, err = pcall(function()
        local warnings = H.warnings(function()
          c, events = H.listen({ table = t }, "insert", { driver = driver, dsn = H.dsn .. " user=" .. role })
          H.sql("ALTER ROLE " .. role .. " NOLOGIN")
          H.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role)
          H.sql("INSERT INTO " .. t .. " VALUES (1)")
          local deadline = core.now() + 3
          while core.now() < deadline do c:poll(0.05) end
        end)
        local w = find(warnings, "failed tries so far")
        assert.truthy(w, table.concat(warnings, "\n"))
        assert.truthy(w:find('reconnect failed %(.*role "' .. role .. '" is not permitted to log in.*%); next try in ' ..
          '%d+%.%ds %(%d+ failed tries so far%)$'), w)
        H.sql("ALTER ROLE " .. role .. " LOGIN")
        if driver == "trigger" then
          -- Both rows waited in the capture table.
          H.sql("INSERT INTO " .. t .. " VALUES (2)")
          poll_until(c, function() return #events >= 2 end, 10)
          assert.equal("1,2", ids(events))
        else
          -- The temporary slot went with its connection: rows come again once the next
          -- try (at most 5 s away) has made a new one.
          for i = 2, 60 do
            H.sql("INSERT INTO " .. t .. " VALUES ($1)", i)
            if poll_until(c, function() return #events >= 1 end, 0.25) then break end
          end
          assert.is_true(#events >= 1)
          assert.is_true(events[1].new.id >= 2)
        end
        assert(c:stop())
      end)
      if c then c:stop() end
      H.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role)
      H.wait_for(function()
        return tonumber(H.scalar("SELECT count(*) AS n FROM pg_stat_activity WHERE usename = $1", role)) == 0
      end, 5)
      H.sql("DROP OWNED BY " .. role .. " CASCADE; DROP ROLE " .. role)
      assert(ok, err)
    end)
  end
end)
