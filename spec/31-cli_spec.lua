-- spec/31-cli_spec.lua: the `flashlua` command line: options, exit statuses, error
-- messages, the script's `arg`, --table's JSON lines and flash.stop() from a timer.
local H = require "helpers"
local core = require "flash.core"
local cjson = require "cjson"

local leftovers = H.await_leftovers

describe("flashlua command line", function()
  local scripts, tables, procs = {}, {}, {}

  local function script(code)
    local path = H.script(code)
    scripts[#scripts + 1] = path
    return path
  end

  local function spawn(args, env)
    local h = H.spawn(args, env)
    procs[#procs + 1] = h
    return h
  end

  local function run_env(args, env, timeout)
    local h = spawn(args, env)
    local rc = h.wait(timeout or 20)
    if not rc then h.kill("KILL") end
    return rc, h.out(), h.err()
  end

  local function run(args, timeout)
    local h = spawn(args)
    local rc = h.wait(timeout or 20)
    if not rc then h.kill("KILL") end
    return rc, h.out(), h.err()
  end

  after_each(function()
    for _, h in ipairs(procs) do
      if h.wait(0.1) == nil then h.kill("KILL") h.wait(2) end
      os.remove(h.base .. ".out") os.remove(h.base .. ".err") os.remove(h.base .. ".rc")
    end
    procs = {}
    for _, p in ipairs(scripts) do os.remove(p) end
    scripts = {}
    for _, t in ipairs(tables) do H.sql("DROP TABLE IF EXISTS " .. t) end
    tables = {}
  end)

  describe("options", function()
    it("--help exits 0 and prints the usage", function()
      for _, opt in ipairs({ "--help", "-h" }) do
        local rc, out, err = run({ opt })
        assert.are.equal(0, rc, err)
        assert.matches("^usage: flashlua %[options%] script%.lua %[args%.%.%.%]", out)
        assert.truthy(out:find("--table", 1, true))
        assert.are.equal("", err)
      end
    end)

    it("--version prints the version", function()
      for _, opt in ipairs({ "--version", "-v" }) do
        local rc, out = run({ opt })
        assert.are.equal(0, rc)
        assert.are.equal("flashlua " .. require("flash").version .. "\n", out)
        assert.matches("^flashlua %d+%.%d+%.%d+\n$", out)
      end
    end)

    it("an unknown option exits 2 with a message naming it", function()
      local rc, out, err = run({ "--frobnicate", script("print('never')") })
      assert.are.equal(2, rc)
      assert.are.equal("", out)
      assert.truthy(err:find("unknown option '--frobnicate'", 1, true), err)
    end)

    it("an unknown --driver exits 2 naming the drivers the registry has", function()
      local rc, out, err = run({ "--driver", "wal", script("print('never')") })
      assert.are.equal(2, rc)
      assert.are.equal("", out)
      assert.truthy(err:find("flashlua: unknown driver 'wal' for --driver (expected trigger, trigger_global, " ..
        "trigger_statement, wal_logical, pg_extension or redis_streams)", 1, true), err)
    end)

    it("--help shows the grammar of --where", function()
      local rc, out = run({ "--help" })
      assert.are.equal(0, rc)
      assert.truthy(out:find([[
      --where COND       with --table: a condition (may be repeated; all must hold):
                           COL = VALUE   (also <>, !=, <, <=, >, >=)
                           COL is null,  COL is not null
                           COL in (VALUE, VALUE, ...)
]], 1, true), out)
    end)

    it("usage errors exit 2 with a message naming the option", function()
      local path = script("print('never')")
      local cases = {
        { { "--table", "t", "--ops", "insert,insrt" },
          "flashlua: unknown operation 'insrt' for --ops (expected insert, update, delete, truncate or all)\n" },
        { { "--ops", "insert", path },
          "flashlua: --ops goes with --table; a script chooses this itself (client:listen, listener:on)\n" },
        { { "--where", "id = 1", path },
          "flashlua: --where goes with --table; a script chooses this itself (client:listen, listener:on)\n" },
        { { "--fields", "id", path },
          "flashlua: --fields goes with --table; a script chooses this itself (client:listen, listener:on)\n" },
        { { "--backfill", path },
          "flashlua: --backfill goes with --table; a script chooses this itself (client:listen, listener:on)\n" },
        { { "--replica-identity", "full", path },
          "flashlua: --replica-identity goes with --table; a script chooses this itself (client:listen, listener:on)\n" },
        { { "--table", "t", "--replica-identity", "default" },
          "flashlua: --replica-identity takes 'full' (the only identity that carries whole old rows), got 'default'\n" },
        -- A flag that would do nothing under the driver in use (it was silently ignored).
        { { "--table", "t", "--replica-identity", "full" },
          "flashlua: --replica-identity has no effect under the trigger driver (the default): it captures whole old " ..
          "rows itself (leave --replica-identity out, or add --driver wal_logical)\n" },
        { { "--table", "t", "--driver", "trigger_statement", "--replica-identity", "full" },
          "flashlua: --replica-identity has no effect under the trigger_statement driver: it captures whole old " ..
          "rows itself (leave --replica-identity out, or add --driver wal_logical)\n" },
        { { "--table", "t", "--where", "customer_id in (1, 2" },
          "flashlua: cannot read --where 'customer_id in (1, 2': expected ',' or ')' in the 'in' list (expected " ..
          "col = value, col <> value, col >= value, col is null, col is not null, col in (a, b); see --help)\n" },
        { { "--table", "t", "--where", "customer_id" },
          "flashlua: cannot read --where 'customer_id': no operator (expected col = value, col <> value, " ..
          "col >= value, col is null, col is not null, col in (a, b); see --help)\n" },
        -- A forgotten value: the next option is not taken as it (it said "--fields goes with --table").
        { { "--fields", "--table", "t" },
          "flashlua: option --fields needs a value, but the option --table follows it\n" },
        { { "-d", "--table", "t" },
          "flashlua: option -d needs a value, but the option --table follows it\n" },
        { { "--table", "--backfill" },
          "flashlua: option --table needs a value, but the option --backfill follows it\n" },
        -- The worker driver under --table (with or without --to) tried Redis at its default
        -- address, whatever --to said.
        { { "--table", "t", "--driver", "redis_streams" },
          "flashlua: --driver redis_streams is a worker of the streams --to writes, not a capture: run it from a " ..
          "script (flash.client{ driver = \"redis_streams\", url = ..., partitions = ... }: examples/scale_worker.lua)\n" },
        { { "--table", "t", "--to", "redis://127.0.0.1:1", "--driver", "redis_streams" },
          "flashlua: --driver redis_streams is a worker of the streams --to writes, not a capture: run it from a " ..
          "script (flash.client{ driver = \"redis_streams\", url = ..., partitions = ... }: examples/scale_worker.lua)\n" },
        -- A second capturer of one database needs a slot and publication of its own.
        { { "--table", "t", "--slot", "flash_b" },
          "flashlua: --slot goes with --to (a script names its slot: flash.client{ slot = ..., publication = ... })\n" },
        { { "--table", "t", "--to", "redis://127.0.0.1:1", "--slot", "Flash-B" },
          "flashlua: --slot takes a replication slot name: lower-case letters, digits and _, at most 63 " ..
          "(e.g. flash_orders), got 'Flash-B'\n" },
        -- A misspelt option names the one it was probably meant to be.
        { { "--feilds", "id", "--table", "t" }, "flashlua: unknown option '--feilds' (did you mean --fields?)\n" },
        { { "--dns", "x", "--table", "t" }, "flashlua: unknown option '--dns' (did you mean --dsn?)\n" },
        { { "-table", "t" }, "flashlua: unknown option '-table' (did you mean --table?)\n" },
        { { "--stat", "--table", "t" }, "flashlua: unknown option '--stat' (did you mean --stats?)\n" },
        -- One table per run: the first one was dropped silently.
        { { "--table", "a", "--table", "b" },
          "flashlua: --table given twice ('a', 'b'): one table per run (a script listens to several: " ..
          "client:listen for each)\n" },
      }
      for _, c in ipairs(cases) do
        local rc, out, err = run(c[1])
        assert.are.equal(2, rc, err)
        assert.are.equal("", out)
        assert.are.equal(c[2] .. "Try 'flashlua --help' for more information.\n", err)
      end
    end)

    it("no script exits 2", function()
      local rc, out, err = run({})
      assert.are.equal(2, rc)
      assert.are.equal("", out)
      assert.truthy(err:find("no script given", 1, true), err)
      assert.truthy(err:find("--help", 1, true), err)
    end)
  end)

  describe("scripts", function()
    it("a syntax error exits 1 and names file:line", function()
      local path = script("local a = 1\nlocal b = = 2\n")
      local rc, _, err = run({ path })
      assert.are.equal(1, rc)
      assert.truthy(err:find(path .. ":2:", 1, true), err)
    end)

    it("a runtime error exits 1 and names file:line", function()
      local path = script("local a = 1\n\nerror('kaput ' .. a)\n")
      local rc, _, err = run({ path })
      assert.are.equal(1, rc)
      assert.truthy(err:find(path .. ":3: kaput 1", 1, true), err)
    end)

    it("sees its own arguments in arg and ...", function()
      local path = script([[
print(arg[0], arg[1], arg[2], #arg, select("#", ...), (...))
]])
      local rc, out, err = run({ path, "one", "two words" })
      assert.are.equal(0, rc, err)
      assert.are.equal(path .. "\tone\ttwo words\t2\t2\tone\n", out)
    end)

    it("runs -e CODE before the script; a script that opens no client exits 0", function()
      local path = script("print(GREETING .. ' from the script')\n")
      local rc, out, err = run({ "-e", "GREETING = 'hello'", "-e", "GREETING = GREETING .. '!'", path }, 10)
      assert.are.equal(0, rc, err)
      assert.are.equal("hello! from the script\n", out)
    end)

    it("an unreachable DSN exits 1 saying it cannot connect", function()
      local path = script('local flash = require "flash"\nassert(flash.client {})\n')
      local t0 = core.now()
      local rc, out, err = run({ "-d", "host=127.0.0.1 port=1 connect_timeout=2", path })
      assert.are.equal(1, rc)
      assert.are.equal("", out)
      assert.truthy(err:find("cannot connect to PostgreSQL", 1, true), err)
      assert.truthy(err:find(path .. ":2:", 1, true), err)
      assert.is_true(core.now() - t0 < 10)
    end)

    -- libpq's words for a socket directory without a server.
    local NO_SERVER = "cannot connect to PostgreSQL: connection to server on socket " ..
      "\"/nonexistent/.s.PGSQL.5432\" failed: No such file or directory\n" ..
      "\tIs the server running locally and accepting connections on that socket?\n"

    it("without any DSN, the connection error says how to give one", function()
      local path = script('local flash = require "flash"\nassert(flash.client {})\n')
      local rc, out, err = run_env({ path }, { FLASH_DSN = "", DATABASE_URL = "", PGHOST = "/nonexistent" })
      assert.are.equal(1, rc)
      assert.are.equal("", out)
      assert.are.equal("flashlua: " .. path .. ":2: " .. NO_SERVER ..
        "(no DSN was given: use flashlua -d DSN, set FLASH_DSN or DATABASE_URL, or pass flash.client{ dsn = ... }; " ..
        "libpq's defaults and PG* variables were tried)\n", err)
    end)

    it("a client used without assert(): the error names the failure it ignored", function()
      local path = script([[
local flash = require "flash"
local client = flash.client { dsn = "host=/nonexistent" }
client:listen { table = "t" }
]])
      local rc, out, err = run({ path })
      assert.are.equal(1, rc)
      assert.are.equal("", out)
      assert.are.equal("flashlua: " .. path .. ":3: attempt to index local 'client' (a nil value)\n" ..
        "flashlua: that nil may come from flash.client: " .. NO_SERVER ..
        "(write assert(flash.client{...}) and assert(client:listen{...}) to stop at the cause)\n", err)
    end)

    it("flash.stop() from a timer ends the loop: exit 0 and nothing left", function()
      local t = H.table("id int PRIMARY KEY")
      tables[#tables + 1] = t
      local path = script(string.format([[
local flash = require "flash"
local client = assert(flash.client {})
assert(client:listen { table = %q }):on("insert", function() end)
flash.after(0.2, function()
  io.write("stopping\n")
  flash.stop()
end)
]], t))
      local t0 = core.now()
      local rc, out, err = run({ path }, 10)
      assert.are.equal(0, rc, err)
      assert.are.equal("stopping\n", out)
      assert.is_true(core.now() - t0 < 5)
      assert.are.equal(0, leftovers(0))
    end)
  end)

  describe("logs", function()
    -- Timestamps and durations vary; the rest is exact.
    local function shape(text)
      return (text:gsub("%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ", "TS"):gsub("%d+%.%d+ s", "N s"))
    end

    it("one line per client at start and a summary at stop, naming the client and the database", function()
      local t = H.table("id int PRIMARY KEY")
      tables[#tables + 1] = t
      local db = H.scalar("SELECT current_database()::text AS db")
      local role = H.scalar("SELECT current_user::text AS r")
      local path = script(string.format([[
local flash = require "flash"
local c = assert(flash.client { name = "orders-feed" })
assert(c:listen { table = %q }):on("insert", function() flash.stop() end)
flash.after(0, function() assert(c:query("INSERT INTO %s VALUES (1)")) end)
]], t, t))
      local rc, out, err = run({ path })
      assert.are.equal(0, rc, err)
      assert.are.equal("", out)
      assert.are.equal(string.format(
        "TS INFO  [orders-feed db=%s] connected to %s as %s, driver trigger, listening on public.%s\n" ..
        "TS INFO  [orders-feed db=%s] stopped after N s: 1 events, 0 errors, N s in callbacks\n",
        db, db, role, t, db), shape(err))
    end)

    it("--stats lines carry the time, errors and the time spent in callbacks", function()
      local path = script([[
local flash = require "flash"
assert(flash.client { name = "idle" })
flash.after(1.5, flash.stop)
]])
      local rc, _, err = run({ "--stats", path })
      assert.are.equal(0, rc, err)
      local stats = {}
      for line in shape(err):gmatch("[^\n]+") do
        if line:find("flashlua:", 1, true) then stats[#stats + 1] = line end
      end
      assert.is_true(#stats >= 1, err)
      assert.are.equal("TS flashlua: 0 events/s, 0 events, 0 errors, N s in callbacks", stats[1])
    end)
  end)

  describe("replication slots", function()
    it("warns at start about an inactive flashlua slot holding WAL; --list-slots shows it, --drop-slot drops it", function()
      local slot = "flash_idle_" .. core.getpid()
      H.sql("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", slot)
      finally(function()
        H.sql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", slot)
      end)
      local t = H.table("v text")
      tables[#tables + 1] = t
      H.sql("INSERT INTO " .. t .. " SELECT repeat(md5(g::text), 30) FROM generate_series(1, 6000) g")   -- > 1 MB of WAL
      local path = script('local flash = require "flash"\nassert(flash.client {})\nflash.after(0, flash.stop)\n')
      local rc, _, err = run_env({ path }, { FLASH_SLOT_WARN_MB = "1" })
      assert.are.equal(0, rc, err)
      local warning = err:match("WARN  (%[[^\n]*" .. slot .. "[^\n]*)")
      assert.truthy(warning, err)
      assert.are.equal(string.format("[client 1 trigger db=%s] replication slot %s is inactive and holds N MB of WAL; " ..
        "if no flashlua run will resume it, drop it: flashlua --drop-slot %s", H.scalar("SELECT current_database()::text AS d"),
        slot, slot), (warning:gsub("%d+%.%d MB", "N MB")))

      local out
      rc, out, err = run({ "--list-slots" })
      assert.are.equal(0, rc, err)
      assert.are.equal("", err)
      assert.matches("^slot +plugin +active +WAL held +confirmed\n", out)
      assert.matches("\n" .. slot .. " +pgoutput +no +%d+%.%d MB  %x+/%x+\n", out)

      rc, out, err = run({ "--drop-slot", slot })
      assert.are.equal(0, rc, err)
      assert.are.equal("dropped replication slot " .. slot .. "\n", out)
      assert.are.equal("0", tostring(H.scalar("SELECT count(*) AS n FROM pg_replication_slots WHERE slot_name = $1", slot)))

      rc, out, err = run({ "--drop-slot", slot })
      assert.are.equal(1, rc)
      assert.are.equal("", out)
      assert.are.equal("flashlua: no flashlua replication slot named " .. slot ..
        " in this database (flashlua --list-slots shows them)\n", err)

      rc, _, err = run({ "--drop-slot", slot, path })
      assert.are.equal(2, rc)
      assert.are.equal("flashlua: --list-slots and --drop-slot take no script or --table\n" ..
        "Try 'flashlua --help' for more information.\n", err)
    end)

    it("`slots list` and `slots drop NAME` are --list-slots and --drop-slot NAME", function()
      local slot = "flash_sub_" .. core.getpid()
      H.sql("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", slot)
      finally(function()
        H.sql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", slot)
      end)
      local rc, out, err = run({ "slots", "list" })
      assert.are.equal(0, rc, err)
      assert.matches("^slot +plugin +active +WAL held +confirmed\n", out)
      assert.matches("\n" .. slot .. " +pgoutput +no +%d+%.%d MB  %x+/%x+\n", out)
      local rc2, out2 = run({ "slots" })
      assert.are.equal(0, rc2)
      assert.are.equal(out, out2)
      rc, out, err = run({ "slots", "drop", slot })
      assert.are.equal(0, rc, err)
      assert.are.equal("dropped replication slot " .. slot .. "\n", out)
      rc, out, err = run({ "slots", "remove", slot })
      assert.are.equal(2, rc)
      assert.are.equal("", out)
      assert.are.equal("flashlua: unknown slots command 'remove' (expected list or drop NAME)\n" ..
        "Try 'flashlua --help' for more information.\n", err)
      rc, out, err = run({ "schemas", "drop" })
      assert.are.equal(2, rc)
      assert.are.equal("", out)
      assert.are.equal("flashlua: schemas drop takes one schema name\n" ..
        "Try 'flashlua --help' for more information.\n", err)
    end)
  end)

  describe("--table", function()
    it("an unknown table exits 1 with the message alone, suggesting the schema that has it", function()
      local schema, orders = H.table_elsewhere()
      finally(function() H.sql("DROP SCHEMA " .. schema .. " CASCADE") end)
      local rc, out, err = run({ "--table", orders })
      assert.are.equal(1, rc)
      assert.are.equal("", out)
      assert.are.equal("flashlua: table public." .. orders .. " does not exist (did you mean " .. schema .. "." .. orders .. "?)\n", err)
      rc, out, err = run({ "--table", "public.no_such_table" })
      assert.are.equal(1, rc)
      assert.are.equal("", out)
      assert.are.equal("flashlua: table public.no_such_table does not exist\n", err)
    end)

    it("--where 'col in (a, b)' and a quoted value select the rows", function()
      local t = H.table("id int PRIMARY KEY, customer_id int, note text")
      tables[#tables + 1] = t
      local h = spawn({ "--table", t, "--where", "customer_id in (1, 2)", "--where", "note <> 'it''s'" })
      assert.is_true(H.wait_for(function() return H.capture(t) > 0 end, 10), h.err())
      H.sql("INSERT INTO " .. t .. " VALUES (1, 1, 'a'), (2, 3, 'b'), (3, 2, 'c'), (4, 2, 'it''s'), (5, 2, 'last')")
      assert.is_true(h.await('"id":5', 5), "no last line; stderr: " .. h.err())
      h.kill("TERM")
      assert.are.equal(0, h.wait(10), h.err())
      local ids = {}
      for line in h.out():gmatch("[^\n]+") do ids[#ids + 1] = cjson.decode(line).new.id end
      assert.are.same({ 1, 3, 5 }, ids)
    end)

    it("--fields takes \"double quoted\" names as --where does: a comma, spaces or a quote in a name", function()
      local t = H.table([[id int PRIMARY KEY, "Col, Comma" text, "qu""ote" text, "Mixed Case" int, other text]])
      tables[#tables + 1] = t
      H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
      H.sql("INSERT INTO " .. t .. [[ VALUES (1, 'c', 'q', 7, 'o')]])
      local rc, out, err = run({ "--driver", "wal_logical", "-e", "require('flash').after(3, require('flash').stop)",
        "--table", t, "--backfill", "--fields", [["Col, Comma", "qu""ote" , Mixed Case,id]] }, 20)
      assert.are.equal(0, rc, err)
      assert.are.same({ id = 1, ["Col, Comma"] = "c", ['qu"ote'] = "q", ["Mixed Case"] = 7 },
        cjson.decode(out:match("[^\n]+")).new)
      local out2
      rc, out2, err = run({ "--table", t, "--fields", [["id]] })
      assert.are.equal(2, rc, err)
      assert.are.equal("", out2)
      assert.truthy(err:find([[cannot read --fields '"id': unterminated quoted column name]], 1, true), err)
    end)

    it("writes bytea values as to_json does (\\x and hex), so that every line is UTF-8 JSON", function()
      local t = H.table("id int PRIMARY KEY, b bytea, bs bytea[], s text")
      tables[#tables + 1] = t
      H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
      H.sql("INSERT INTO " .. t .. [[ VALUES (1, '\x00ff5c', '{"\\x01",NULL}', 'é')]])
      local h = spawn({ "--table", t, "--backfill" })
      assert.is_true(h.await('"op":"read"', 20), h.err())
      H.sql("UPDATE " .. t .. [[ SET b = '\xfe' WHERE id = 1]])
      assert.is_true(h.await('"op":"update"', 20), h.err())
      h.kill("TERM")
      assert.are.equal(0, h.wait(10), h.err())
      local out = h.out()
      -- Valid UTF-8: no byte of 0x80 and over but those of the é (C3 A9).
      assert.truthy(out:find("é", 1, true), out)
      assert.is_nil((out:gsub("é", "")):find("[\128-\255]"), out)
      local events = {}
      for line in out:gmatch("[^\n]+") do events[#events + 1] = cjson.decode(line) end
      assert.are.equal(2, #events, out)
      assert.are.same({ id = 1, b = "\\x00ff5c", bs = { "\\x01", cjson.null }, s = "é" }, events[1].new)
      assert.are.equal("\\xfe", events[2].new.b)
      assert.are.equal("\\x00ff5c", events[2].old.b)
    end)

    it("--replica-identity full sets REPLICA IDENTITY FULL where wal_logical needs it, so updates carry the old row", function()
      local t = H.table("id int PRIMARY KEY, v text")
      tables[#tables + 1] = t
      H.sql("INSERT INTO " .. t .. " VALUES (1, 'a')")
      -- Without it: the error names both ways out.
      local rc, out, err = run({ "--table", t, "--backfill" })
      assert.are.equal(1, rc, err)
      assert.are.equal("", out)
      assert.truthy(err:find("(flashlua --table: --replica-identity full)", 1, true), err)
      local h = spawn({ "--table", t, "--backfill", "--replica-identity", "full" })
      assert.is_true(h.await('"op":"read"', 20), h.err())
      H.sql("UPDATE " .. t .. " SET v = 'b' WHERE id = 1")
      assert.is_true(h.await('"op":"update"', 20), h.err())
      h.kill("TERM")
      assert.are.equal(0, h.wait(10), h.err())
      assert.are.equal("f", H.scalar("SELECT relreplident::text FROM pg_class WHERE oid = $1::regclass", t))
      local events = {}
      for line in h.out():gmatch("[^\n]+") do events[#events + 1] = cjson.decode(line) end
      assert.are.equal(2, #events, h.out())
      assert.are.same({ id = 1, v = "a" }, events[2].old)
      assert.are.same({ id = 1, v = "b" }, events[2].new)
      assert.truthy(h.err():find("set REPLICA IDENTITY FULL on public." .. t, 1, true), h.err())
    end)

    it("prints one JSON line per event of the chosen operations until SIGTERM", function()
      local t = H.table("id int PRIMARY KEY, title text, note text")
      tables[#tables + 1] = t
      local h = spawn({ "--table", "public." .. t, "--ops", "insert" })
      -- Ready once its trigger exists: LISTEN comes before the triggers.
      local deadline = core.now() + 10
      while core.now() < deadline and tonumber(H.scalar(
          "SELECT count(*) AS n FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal", t)) == 0 do
        core.sleep(0.05)
      end
      H.sql("INSERT INTO " .. t .. " VALUES (1, 'first', NULL)")
      H.sql("UPDATE " .. t .. " SET title = 'changed' WHERE id = 1")
      H.sql("INSERT INTO " .. t .. " VALUES (2, 'second', 'n')")
      assert.is_true(h.await('"id":2', 5), "no second line; stderr: " .. h.err())
      h.kill("TERM")
      assert.are.equal(0, h.wait(10), h.err())

      local events = {}
      for line in h.out():gmatch("[^\n]+") do events[#events + 1] = cjson.decode(line) end
      assert.are.equal(2, #events, h.out())
      assert.are.equal("insert", events[1].op)
      assert.are.equal("public." .. t, events[1].table)
      assert.are.same({ id = 1, title = "first", note = cjson.null }, events[1].new)
      assert.are.equal("insert", events[2].op)
      assert.are.same({ id = 2, title = "second", note = "n" }, events[2].new)
      assert.are.equal(0, leftovers(0))
    end)
  end)
end)
