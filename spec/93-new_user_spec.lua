-- spec/93-new_user_spec.lua: what a new user following README, docs/ and examples/ runs
-- into by mistake, and the exact message that names the way out.
local H = require "helpers"
local core = require "flash.core"

local function run(args, timeout, env)
  local rc, out, err = H.run_flashlua(args, timeout, env)
  -- The start line and stop summary are logged; the error is the rest.
  local rest = {}
  for line in err:gmatch("[^\n]+") do
    if not line:find(" INFO ", 1, true) then rest[#rest + 1] = line end
  end
  return rc, out, table.concat(rest, "\n")
end

describe("a new user's mistakes", function()
  local pid = core.getpid()
  local base = "nu_" .. pid
  local drops = {}
  after_each(function()
    for i = #drops, 1, -1 do H.sql(drops[i]) end
    drops = {}
  end)

  it("wal_level = replica: the driver the user got (pg_extension, or wal_logical by --backfill) is named, and the trigger drivers as a way out", function()
    local sb = assert(require("flash.sandbox").start { quiet = true, settings = { wal_level = "replica" } })
    finally(function() sb:stop() end)
    local c = assert(require("flash").connect(sb.dsn))
    assert(c:query("CREATE TABLE t (id int PRIMARY KEY)"))
    c:stop()
    local hint = " driver needs wal_level = logical (set wal_level = logical in postgresql.conf or with " ..
      "ALTER SYSTEM SET wal_level = logical, then restart the server; or use a trigger driver, which needs no " ..
      "server setting: driver = \"trigger\", or flashlua --driver trigger)"
    for _, case in ipairs({ { { "--table", "t", "--backfill" }, "wal_logical" },
                            { { "--table", "t", "--driver", "pg_extension" }, "pg_extension" } }) do
      local rc, out, err = run(case[1], 20, { FLASH_DSN = sb.dsn })
      assert.are.equal(1, rc, err)
      assert.are.equal("", out)
      assert.are.equal("flashlua: wal_level is 'replica', but the " .. case[2] .. hint, err)
    end
  end)

  it("--ops and --fields given twice add up, as --where does (the last one alone was used)", function()
    local t = base .. "_ops"
    H.sql("CREATE TABLE " .. t .. " (id int PRIMARY KEY, a text, b text)")
    drops[#drops + 1] = "DROP TABLE IF EXISTS " .. t
    local h = H.spawn({ "--table", t, "--ops", "insert", "--ops", "delete", "--fields", "id", "--fields", "a" })
    assert.is_true(h.await("listening on public." .. t, 20, "err"), h.err())
    H.sql("INSERT INTO " .. t .. " VALUES (1, 'x', 'y'); UPDATE " .. t .. " SET a = 'z'; DELETE FROM " .. t)
    assert.is_true(h.await('"op":"delete"', 20), h.out() .. h.err())
    h.kill("INT")
    assert.are.equal(0, h.wait(20), h.err())
    local ops = {}
    for line in h.out():gmatch("[^\n]+") do
      local ev = require("cjson").decode(line)
      local row = ev.new or ev.old
      ops[#ops + 1] = ev.op .. " " .. row.id .. " " .. row.a .. " " .. tostring(row.b)
    end
    assert.same({ "insert 1 x nil", "delete 1 z nil" }, ops)
  end)

  it("a Redis sink whose Redis is not there says so when it is made, not only at the first event", function()
    local path = H.script([[
local flash = require "flash"
local sink = flash.sink.redis { url = "redis://127.0.0.1:1", partitions = 4 }
print(type(sink))
]])
    local rc, out, err = H.run_flashlua({ path })
    os.remove(path)
    assert.are.equal(0, rc, err)
    assert.are.equal("table\n", out)
    assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ WARN  redis sink: cannot connect to Redis at 127%.0%.0%.1:1: " ..
      "Connection refused %(events wait unacknowledged and are sent once Redis answers%)\n$", err)
  end)

  it("flash.log.level = a level that does not exist names the script's line (it named [string \"flash.log\"]:0)", function()
    local path = H.script('local flash = require "flash"\nflash.log.level = "verbose"\n')
    local rc, out, err = H.run_flashlua({ path })
    os.remove(path)
    assert.are.equal(1, rc, err)
    assert.are.equal("", out)
    assert.are.equal("flashlua: " .. path .. ":2: unknown log level 'verbose' (expected error, warn, info, debug or trace)\n", err)
  end)

  it("a misused call names the script's line and the right form (it named [string \"flash.client\"]:0, or no line)", function()
    local cases = {
      { 'flash.client("host=/tmp")', "bad argument #1 to 'client' (table of options expected, got string: a DSN goes " ..
        "in flash.client{ dsn = \"...\" } (flash.connect(dsn) takes one alone))" },
      { 'c:listen("posts")', "bad argument #1 to 'listen' (table of options expected, got string: " ..
        "client:listen{ table = \"posts\" })" },
      { 'c.listen{ table = "posts" }', "bad argument #1 to 'listen' (client expected, got table: call it with a " ..
        "colon, client:listen{ table = ... })" },
      { 'flash.every("1", print)', "bad argument #1 to 'every' (non-negative number of seconds expected, got string)" },
      { 'flash.after(1, 2)', "bad argument #2 to 'after' (function expected, got number)" },
    }
    for _, case in ipairs(cases) do
      local path = H.script('local flash = require "flash"\nlocal c = assert(flash.client { driver = "trigger" })\n' ..
        case[1] .. "\n")
      local rc, out, err = run({ path })
      os.remove(path)
      assert.are.equal(1, rc, err)
      assert.are.equal("", out)
      assert.are.equal("flashlua: " .. path .. ":3: " .. case[2], err)
    end
  end)

  describe("an error in the script's code", function()
    -- The script's frames only: none of flashlua's loop and drivers under its callback,
    -- and the frame that raised a runtime error (indexing nil) is kept.
    it("a callback, a timer and a stop hook show the script's frames, none of flashlua's", function()
      local t = base .. "_cb"
      H.sql("CREATE TABLE " .. t .. " (id int PRIMARY KEY)")
      drops[#drops + 1] = "DROP TABLE IF EXISTS " .. t
      local path = H.script(string.format([[
local flash = require "flash"
local c = assert(flash.client { driver = "trigger", on_error = "log" })
local function helper(row) return row.nosuch.y end
assert(c:listen { table = %q }):on("insert", function(ev) helper(ev.new) end)
flash.on_stop(function() error("flush failed") end)
assert(c:start())
assert(flash.connect(os.getenv("FLASH_DSN")):query("INSERT INTO %s VALUES (1)"))
flash.after(0.2, flash.stop)
]], t, t))
      local rc, out, err = run({ path })
      err = err:gsub("%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ ERROR %[[^%]]*%] ", ""):gsub("%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ ERROR ", "")
      assert.are.equal(1, rc, err)
      assert.are.equal("", out)
      local P = path
      assert.are.equal(
        "callback for insert on public." .. t .. " failed: " .. P .. ":3: attempt to index field 'nosuch' (a nil value)\n" ..
        "stack traceback:\n" ..
        "\t" .. P .. ":3: in function 'helper'\n" ..
        "\t" .. P .. ":4: in function <" .. P .. ":4>\n" ..
        "flash.on_stop hook failed: " .. P .. ":5: flush failed\n" ..
        "stack traceback:\n" ..
        "\t[C]: in function 'error'\n" ..
        "\t" .. P .. ":5: in function <" .. P .. ":5>; nothing more is confirmed\n" ..
        "flashlua: flash.on_stop hook failed: " .. P .. ":5: flush failed\n" ..
        "stack traceback:\n" ..
        "\t[C]: in function 'error'\n" ..
        "\t" .. P .. ":5: in function <" .. P .. ":5>", err)

      local timer = H.script("local flash = require 'flash'\nflash.after(0.1, function() local x = nil; return x.y end)\n")
      rc, out, err = run({ timer })
      os.remove(path) os.remove(timer)
      assert.are.equal(1, rc, err)
      assert.are.equal("", out)
      assert.are.equal("flashlua: timer callback failed: " .. timer .. ":2: attempt to index local 'x' (a nil value)\n" ..
        "stack traceback:\n\t" .. timer .. ":2: in function <" .. timer .. ":2>", err)
    end)
  end)

  it("a table created with capitals (\"OrderLines\") typed without quotes is suggested quoted; a name with spaces is told to quote", function()
    local t = "OrderLines" .. pid
    H.sql('CREATE TABLE "' .. t .. '" (id int PRIMARY KEY)')
    drops[#drops + 1] = 'DROP TABLE IF EXISTS "' .. t .. '"'
    for _, name in ipairs({ t, "public." .. t }) do
      local rc, out, err = run({ "--table", name })
      assert.are.equal(1, rc, err)
      assert.are.equal("", out)
      assert.are.equal("flashlua: table public." .. t:lower() .. ' does not exist (did you mean public."' .. t .. '"?)', err)
    end
    local c = assert(require("flash").client { driver = "trigger" })
    local l, lerr = c:listen { table = '"' .. t .. '"' }
    c:stop()
    assert.truthy(l, lerr)
    local rc, out, err = run({ "--table", "My Schema.Odd Table" })
    assert.are.equal(1, rc, err)
    assert.are.equal("", out)
    assert.are.equal("flashlua: invalid table name 'My Schema.Odd Table': string is not a valid identifier: " ..
      "\"My Schema.Odd Table\" (a name with spaces, capitals or other characters is written in double quotes, " ..
      "as in SQL: '\"My Schema\".\"Odd Table\"')", err)
  end)

  it("a column name in another case is suggested as written; an unknown one lists the table's columns", function()
    local t = base .. "_cols"
    H.sql("CREATE TABLE " .. t .. ' (id int PRIMARY KEY, title text, "createdAt" timestamptz)')
    drops[#drops + 1] = "DROP TABLE IF EXISTS " .. t
    for _, case in ipairs({
      { { "--fields", "id,Title" }, 'column "Title" in fields does not exist in table public.' .. t .. ' (did you mean "title"?)' },
      { { "--where", "createdat is null" },
        'column "createdat" in where does not exist in table public.' .. t .. ' (did you mean "createdAt"?)' },
      { { "--fields", "body" }, 'column "body" in fields does not exist in table public.' .. t ..
        " (its columns: id, title, createdAt)" },
    }) do
      local args = { "--table", t }
      for _, a in ipairs(case[1]) do args[#args + 1] = a end
      local rc, out, err = run(args)
      assert.are.equal(1, rc, err)
      assert.are.equal("", out)
      assert.are.equal("flashlua: " .. case[2], err)
    end
  end)

  it("a --where value the column's type cannot take is named without flashlua's own test query", function()
    local t = base .. "_where"
    H.sql("CREATE TABLE " .. t .. " (id int PRIMARY KEY, active boolean)")
    drops[#drops + 1] = "DROP TABLE IF EXISTS " .. t
    for _, case in ipairs({ { "id = abc", 'integer: "abc"' }, { "id in (1, x)", 'integer: "x"' },
                            { "active = maybe", 'boolean: "maybe"' } }) do
      local rc, out, err = run({ "--table", t, "--where", case[1] })
      assert.are.equal(1, rc, err)
      assert.are.equal("", out)
      assert.are.equal("flashlua: invalid 'where' for public." .. t .. ": invalid input syntax for type " .. case[2], err)
    end
  end)

  it("backfill on_done is called in a run that finds the backfill finished by an earlier one (it never was: a script waiting for it waited forever)", function()
    local t = base .. "_bf"
    local slot = "nu_bf_" .. pid
    H.sql("CREATE TABLE " .. t .. " (id int PRIMARY KEY, v text); INSERT INTO " .. t .. " VALUES (1, 'a'), (2, 'b')")
    drops[#drops + 1] = "DROP TABLE IF EXISTS " .. t
    drops[#drops + 1] = "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '" .. slot .. "'"
    local path = H.script(string.format([[
local flash = require "flash"
local c = assert(flash.client { driver = "wal_logical", persistent = true, slot = %q })
local l = assert(c:listen { table = %q })
local n = 0
l:on("read", function() n = n + 1 end)
l:backfill { on_done = function() print("done after " .. n .. " reads") flash.stop() end }
]], slot, t))
    for _, want in ipairs({ "done after 2 reads\n", "done after 0 reads\n" }) do
      local rc, out, err = H.run_flashlua({ path }, 30)
      assert.are.equal(0, rc, err)
      assert.are.equal(want, out)
    end
    os.remove(path)
  end)

  it("workers: handlers = \"handlers.lua\" beside the script is found from any directory, and a missing one says where it looked", function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir " .. H.sh_quote(dir)))
    finally(function() os.execute("rm -rf " .. H.sh_quote(dir)) end)
    local f = assert(io.open(dir .. "/handlers.lua", "w"))
    f:write("local config, state = ...\nreturn { show = function(ev) end }\n")
    f:close()
    local function main(handlers)
      local m = assert(io.open(dir .. "/main.lua", "w"))
      m:write(string.format([[
local flash = require "flash"
local c = assert(flash.client { driver = "trigger", workers = 2, handlers = %q })
print("made")
c:stop()
]], handlers))
      m:close()
      return dir .. "/main.lua"
    end
    -- flashlua runs from the project's root (H.spawn), not from dir.
    local rc, out, err = run({ main("handlers.lua") })
    assert.are.equal(0, rc, err)
    assert.are.equal("made\n", out)
    rc, out, err = run({ main("handler.lua") })
    assert.are.equal(1, rc, err)
    assert.are.equal("", out)
    assert.are.equal("flashlua: " .. dir .. "/main.lua:2: option 'handlers': cannot open handler.lua (not in the " ..
      "current directory nor next to the script, in " .. dir .. "/)", err)
  end)

  it("a persistent slot named as the docs' examples do (slot = \"outbox\") is said at creation to be unseen by " ..
     "--list-slots; --drop-slot of it gives the SQL", function()
    local t = base .. "_slot"
    local slot = "outbox_" .. pid
    H.sql("CREATE TABLE " .. t .. " (id int PRIMARY KEY)")
    drops[#drops + 1] = "DROP TABLE IF EXISTS " .. t
    drops[#drops + 1] = "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '" .. slot .. "'"
    local path = H.script(string.format([[
local flash = require "flash"
local c = assert(flash.client { driver = "wal_logical", persistent = true, slot = %q, publication = %q })
assert(c:listen { table = %q }):on("insert", function() end)
assert(c:start())
c:stop()
]], slot, slot, t))
    local rc, out, err = H.run_flashlua({ path })
    os.remove(path)
    assert.are.equal(0, rc, err)
    assert.are.equal("", out)
    assert.matches("WARN  %[client 1 wal_logical db=[^%]]+%] replication slot " .. slot .. " does not start with flash, " ..
      "so flashlua %-%-list%-slots, %-%-drop%-slot and the warning about inactive slots holding WAL do not see it " ..
      "%(a `slot` named flash_%.%.%. is seen%); when this client is retired, drop it with " ..
      "SELECT pg_drop_replication_slot%('" .. slot .. "'%)\n", err)
    rc, out, err = run({ "--drop-slot", slot })
    assert.are.equal(1, rc, err)
    assert.are.equal("", out)
    assert.are.equal("flashlua: replication slot " .. slot .. " is not one of flashlua's (their names start with " ..
      "flash), so it is left alone; if no one uses it, drop it with SELECT pg_drop_replication_slot('" .. slot .. "')", err)
  end)

  it("--list-slots keeps its columns aligned under a slot name longer than 32 bytes", function()
    local slot = ("flash_copy_public_orders_public_orders_copy_" .. pid):sub(1, 63)
    H.sql("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", slot)
    drops[#drops + 1] = "SELECT pg_drop_replication_slot('" .. slot .. "')"
    local rc, out, err = run({ "--list-slots" })
    assert.are.equal(0, rc, err)
    local header = out:match("^[^\n]*")
    local col = header:find("plugin", 1, true)
    local line = out:match("\n(" .. slot:gsub("%p", "%%%0") .. " [^\n]*)")
    assert.truthy(line, out)
    assert.are.equal(col, line:find("pgoutput", 1, true), out)
  end)

  describe("listening to what is not a plain table", function()
    -- What each kind is and what to listen to instead, under every capturing driver.
    local kinds = {
      { "view", "CREATE VIEW %s AS SELECT * FROM %s_src", "DROP VIEW %s",
        "is a view, not a table: a view holds no rows of its own, so it has no changes to capture (listen to the tables it reads from)" },
      { "materialized view", "CREATE MATERIALIZED VIEW %s AS SELECT * FROM %s_src", "DROP MATERIALIZED VIEW %s",
        "is a materialized view, not a table: REFRESH MATERIALIZED VIEW rewrites it whole, " ..
        "with no row changes to capture (listen to the tables it is computed from)" },
      { "sequence", "CREATE SEQUENCE %s", "DROP SEQUENCE %s",
        "is a sequence, not a table (listen to the table whose rows use it)" },
    }
    for _, k in ipairs(kinds) do
      it("a " .. k[1] .. " is refused with what to listen to instead, exit 1", function()
        local name = base .. "_" .. k[1]:gsub(" ", "_")
        H.sql(string.format("CREATE TABLE %s_src (id int PRIMARY KEY)", name))
        drops[#drops + 1] = "DROP TABLE IF EXISTS " .. name .. "_src CASCADE"
        H.sql(k[2]:format(name, name))
        drops[#drops + 1] = k[3]:format(name)
        for _, driver in ipairs({ "trigger", "wal_logical" }) do
          local rc, out, err = run({ "--driver", driver, "--table", name })
          assert.are.equal(1, rc, err)
          assert.are.equal("", out)
          assert.are.equal("flashlua: public." .. name .. " " .. k[4], err)
        end
      end)
    end

    it("a system catalog is refused under every driver (wal_logical asked for REPLICA IDENTITY FULL on it, " ..
       "the trigger drivers to run as its owner)", function()
      for _, driver in ipairs({ "trigger", "wal_logical" }) do
        local rc, out, err = run({ "--driver", driver, "--table", "pg_catalog.pg_class" })
        assert.are.equal(1, rc, err)
        assert.are.equal("", out)
        assert.are.equal("flashlua: pg_catalog.pg_class is a system catalog: PostgreSQL lets no trigger and no " ..
          "publication see its changes (listen to the tables of your own schemas)", err)
      end
    end)

    it("an UNLOGGED table under wal_logical is refused at listen naming SET LOGGED and the trigger drivers; a trigger driver captures it", function()
      local name = base .. "_unlogged"
      H.sql("CREATE UNLOGGED TABLE " .. name .. " (id int PRIMARY KEY, v text)")
      drops[#drops + 1] = "DROP TABLE IF EXISTS " .. name
      -- Before: the replica identity was asked for, then the publication failed with a
      -- hint about CREATE privileges; no driver based on the WAL can ever see these rows.
      for _, args in ipairs({ { "--table", name, "--driver", "wal_logical" },
                              { "--table", name, "--driver", "wal_logical", "--ops", "insert" } }) do
        local rc, out, err = run(args)
        assert.are.equal(1, rc, err)
        assert.are.equal("", out)
        assert.are.equal("flashlua: cannot listen to public." .. name .. " under the wal_logical driver: it is " ..
          "an unlogged table, whose changes are not written to the WAL (run `ALTER TABLE \"public\".\"" .. name ..
          "\" SET LOGGED`, or use a trigger driver: driver = \"trigger\", or flashlua --driver trigger)", err)
      end
      local path = H.script(string.format([[
        local flash = require "flash"
        local c = assert(flash.client { driver = "trigger" })
        assert(c:listen { table = %q }):on("insert", function(ev) print(ev.op, ev.new.v) flash.stop() end)
        assert(c:start())
        assert(flash.connect(os.getenv("FLASH_DSN")):query("INSERT INTO %s VALUES (1, 'x')"))
      ]], name, name))
      local rc, out, err = run({ path })
      os.remove(path)
      assert.are.equal(0, rc, err)
      assert.are.equal("insert\tx\n", out)
    end)

    it("a temporary table is refused under every driver, also when the bare name finds only a session's temporary table", function()
      for _, driver in ipairs({ "trigger", "wal_logical" }) do
        local path = H.script(string.format([[
          local flash = require "flash"
          local c = assert(flash.client { driver = %q })
          assert(c:query("CREATE TEMP TABLE %s_tmp (id int PRIMARY KEY)"))
          local schema = c:query("SELECT pg_my_temp_schema()::regnamespace::text AS s")[1].s
          for _, name in ipairs({ "%s_tmp", schema .. ".%s_tmp" }) do
            local l, err = c:listen { table = name }
            print(l, (err:gsub(schema, "pg_temp_N")))
          end
          c:stop()
        ]], driver, base, base, base))
        local rc, out, err = run({ path })
        os.remove(path)
        assert.are.equal(0, rc, err)
        assert.are.equal(
          "nil\ttable public." .. base .. "_tmp does not exist (pg_temp_N." .. base .. "_tmp is a temporary table, " ..
          "which flashlua cannot listen to: only the session that created it sees its rows; create it without TEMPORARY)\n" ..
          "nil\tpg_temp_N." .. base .. "_tmp is a temporary table, which flashlua cannot listen to: only the session " ..
          "that created it sees its rows (create it without TEMPORARY)\n", out)
      end
    end)
  end)
end)
