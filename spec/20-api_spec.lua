-- The Lua API's contract: argument checking, errors found in the database, query
-- parameters and the type mapping of query results, timers, stats and stop.
local flash = require "flash"
local core = require "flash.core"
local H = require "helpers"

describe("flash API", function()
  local client
  before_each(function() client = assert(flash.client {}) end)
  after_each(function() if client then client:stop() end end)

  describe("misuse raises an error naming the bad argument", function()
    it("rejects an unknown client option and a wrong option type", function()
      assert.has_error(function() flash.client { drivr = "trigger" } end,
        "bad argument #1 to 'client' (unknown option 'drivr' (did you mean 'driver'?))")
      assert.has_error(function() flash.client { persistent = "yes" } end,
        "bad argument #1 to 'client' (option 'persistent': boolean expected, got string)")
      assert.has_error(function() flash.client("dsn") end,
        "bad argument #1 to 'client' (table of options expected, got string: a DSN goes in " ..
        "flash.client{ dsn = \"...\" } (flash.connect(dsn) takes one alone))")
    end)

    it("rejects an unknown driver, naming it", function()
      assert.has_error(function() flash.client { driver = "nope" } end,
        "bad argument #1 to 'client' (unknown driver 'nope' (expected trigger, trigger_global, trigger_statement, wal_logical, pg_extension or redis_streams))")
    end)

    it("rejects an unknown operation name and a non-function callback", function()
      local l = assert(client:listen { table = H.table("id int") })
      assert.has_error(function() l:on("upsert", function() end) end,
        "bad argument #1 to 'on' (unknown operation 'upsert' (expected insert, update, delete, truncate, read or all))")
      assert.has_error(function() l:on("insert", "print") end,
        "bad argument #2 to 'on' (function expected, got string)")
    end)

    it("rejects wrong listen option types and unknown operators", function()
      assert.has_error(function() client:listen { table = 42 } end,
        "bad argument #1 to 'listen' (option 'table': string expected, got number)")
      assert.has_error(function() client:listen { table = "t", fields = { 1 } } end,
        "bad argument #1 to 'listen' (option 'fields': entry #1 must be a column name, got number)")
      assert.has_error(function() client:listen { table = "t", where = { { "a", "like", "x" } } } end,
        "bad argument #1 to 'listen' (option 'where': unknown operator 'like' in condition #1 (expected =, <>, <, <=, >, >=, is null, is not null, in))")
      assert.has_error(function() client:listen { table = "t", colour = "red" } end,
        "bad argument #1 to 'listen' (unknown option 'colour')")
      assert.has_error(function() client:listen { table = "t", feilds = { "id" } } end,
        "bad argument #1 to 'listen' (unknown option 'feilds' (did you mean 'fields'?))")
    end)
  end)

  describe("a client that only runs queries", function()
    local function objects()
      return H.leftovers() + tonumber(H.scalar("SELECT count(*) AS n FROM pg_replication_slots WHERE slot_name LIKE 'flash%'"))
        + tonumber(H.scalar("SELECT count(*) AS n FROM pg_publication WHERE pubname LIKE 'flash%'"))
    end

    for _, driver in ipairs(H.drivers) do
      it("creates nothing in the database until it listens (" .. driver .. ")", function()
        local before = objects()
        local c = assert(flash.client { driver = driver })
        assert(c:start())
        assert.same({ { n = 1 } }, assert(c:query("SELECT 1 AS n")))
        assert.equal(before, objects())
        -- Its first listener starts capture.
        local t = H.table("id int PRIMARY KEY")
        H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
        local events = {}
        assert(c:listen { table = t }):on("insert", function(ev) events[#events + 1] = ev.new.id end)
        H.sql("INSERT INTO " .. t .. " VALUES (7)")
        H.wait(c, events, 1)
        assert.same({ 7 }, events)
        assert(c:stop())
        assert.equal(before, objects())
      end)
    end
  end)

  describe("problems found in the database return nil, err", function()
    it("names an unknown table", function()
      local l, err = client:listen { table = "public.no_such_table" }
      assert.is_nil(l)
      assert.equal("table public.no_such_table does not exist", err)
    end)

    it("suggests the schema where a table of that name exists", function()
      local schema, orders = H.table_elsewhere()
      finally(function() H.sql("DROP SCHEMA " .. schema .. " CASCADE") end)
      local l, err = client:listen { table = orders }
      assert.is_nil(l)
      assert.equal("table public." .. orders .. " does not exist (did you mean " .. schema .. "." .. orders .. "?)", err)
    end)

    it("names an unknown column in fields", function()
      local t = H.table("id int")
      local l, err = client:listen { table = t, fields = { "id", "nope" } }
      assert.is_nil(l)
      assert.equal(string.format('column "nope" in fields does not exist in table public.%s (its columns: id)', t), err)
    end)

    it("names an unknown column in where", function()
      local t = H.table("id int")
      local l, err = client:listen { table = t, where = { ghost = 1 } }
      assert.is_nil(l)
      assert.equal(string.format('column "ghost" in where does not exist in table public.%s (its columns: id)', t), err)
    end)

    it("rejects a condition value the column cannot take, before any write", function()
      local t = H.table("id int")
      local l, err = client:listen { table = t, where = { id = "not a number" } }
      assert.is_nil(l)
      assert.matches("invalid 'where' for public." .. t .. ": invalid input syntax for type integer", err, 1, true)
    end)

    it("says it cannot connect to an unreachable DSN", function()
      local c, err = flash.client { dsn = "host=127.0.0.1 port=1 connect_timeout=2" }
      assert.is_nil(c)
      assert.matches("^cannot connect to PostgreSQL: ", err)
    end)
  end)

  describe("client:query", function()
    it("sends $n parameters and maps result types like events", function()
      local rows = assert(client:query(
        "SELECT $1::int AS i, $2::text AS s, $3::boolean AS b, $4::text AS n, 9007199254740993::bigint AS big, " ..
        "'{1,2}'::int[] AS arr, '{\"k\": [true]}'::jsonb AS j, 12.50::numeric AS num", 7, "x'y", true, nil))
      assert.same({ i = 7, s = "x'y", b = true, n = flash.null, big = "9007199254740993",
                    arr = { 1, 2 }, j = { k = { true } }, num = "12.50" }, rows[1])
    end)

    it("returns nil, err, sqlstate on an SQL error", function()
      local rows, err, state = client:query("SELECT * FROM no_such_relation")
      assert.is_nil(rows)
      assert.equal('relation "no_such_relation" does not exist\nLINE 1: SELECT * FROM no_such_relation\n                      ^', err)
      assert.equal("42P01", state)
    end)

    it("returns the affected row count for commands", function()
      local t = H.table("id int")
      local rows, n = client:query("INSERT INTO " .. t .. " SELECT generate_series(1, 3)")
      assert.same({}, rows)
      assert.equal(3, n)
    end)
  end)

  it("decodes text values by type OID with core.decode", function()
    assert.equal(true, core.decode(16, "t"))
    assert.equal(42, core.decode(20, "42"))
    assert.equal("9007199254740993", core.decode(20, "9007199254740993"))
    assert.equal(flash.null, core.decode(23, nil))
    assert.same({ 1, flash.null }, core.decode(1007, "{1,NULL}", 23))
  end)

  it("runs timers on the loop: after once, every until cancelled, then returns", function()
    local ticks, once = 0, 0
    local cancel
    cancel = flash.every(0.02, function()
      ticks = ticks + 1
      if ticks == 3 then cancel() end
    end)
    flash.after(0.01, function() once = once + 1 end)
    flash.after(0.2, flash.stop)
    client:stop()
    client = nil
    assert.is_true(flash.run())
    assert.equal(3, ticks)
    assert.equal(1, once)
  end)

  it("counts delivered events and handler time in stats()", function()
    local t = H.table("id int")
    local events = {}
    assert(client:listen { table = t }):on("insert", function(ev) events[#events + 1] = ev end)
    assert(client:start())
    H.sql("INSERT INTO " .. t .. " SELECT generate_series(1, 5)")
    H.wait(client, events, 5)
    local s = client:stats()
    assert.equal(5, s.events)
    assert.equal("trigger", s.driver)
    assert.is_true(s.bytes > 0)
    assert.is_true(s.handler_seconds >= 0)
  end)

  it("leaves nothing in the database after stop()", function()
    local t = H.table("id int")
    local l = assert(client:listen { table = t, where = { { "id", ">", 3 } } })
    l:on("all", function() end)
    assert(client:start())
    assert.is_true(H.leftovers() > 0)
    assert.is_true(client:stop())
    client = nil
    assert.equal(0, H.leftovers())
    assert.equal(0, tonumber(H.scalar("SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::regclass", t)))
  end)
end)
