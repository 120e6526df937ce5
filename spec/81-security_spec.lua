-- spec/81-security_spec.lua: attacks by a second, unprivileged role against a flashlua
-- that runs as a superuser (issue 9): no code that role controls runs with flashlua's
-- privileges, and it can neither read, forge nor suppress events.
local flash = require "flash"
local core = require "flash.core"
local H = require "spec.helpers"

local ROLE = "flash_lowpriv"
local low_dsn = (H.dsn:gsub("user=%S+", "")) .. " user=" .. ROLE

local function setup_role()
  H.sql(string.format([[DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '%s') THEN CREATE ROLE %s LOGIN NOSUPERUSER; END IF;
  END $$; ALTER ROLE %s NOSUPERUSER; GRANT CREATE ON DATABASE postgres TO %s]], ROLE, ROLE, ROLE, ROLE))
end

local function low()
  return assert(core.connect(low_dsn))
end

local function is_super()
  return H.scalar("SELECT rolsuper FROM pg_roles WHERE rolname = $1", ROLE)
end

-- Each statement of `list`, run on connection `c`, fails for want of a privilege.
local function denied(c, list)
  for _, sql in ipairs(list) do
    local ok, err = c:exec(sql, 0)
    assert.is_nil(ok, sql)
    assert.matches("permission denied", err, 1, true)
  end
end

-- Polls until `n` events arrived, then a little more to show nothing else comes.
local function collect(client, events, n)
  H.wait(client, events, n, 10)
  H.settle(client, 0.3)
  return events
end

local n = 0
for _, driver in ipairs(H.drivers) do
  describe("security (" .. driver .. ")", function()
    local client
    setup(setup_role)
    after_each(function()
      if client then client:stop() client = nil end
    end)

    it("runs no cast, output function or conversion a table owner defines with flashlua's privileges", function()
      n = n + 1
      local s = string.format("lp_%d_%d", core.getpid(), n)
      local c = low()
      -- The owner's table, a type of theirs, and casts of it that would make them superuser
      -- if a superuser ran them.
      assert(c:exec(string.format([[
        CREATE SCHEMA %s;
        CREATE TABLE %s.t (id int PRIMARY KEY, v int);
        CREATE TYPE %s.ty AS (x int);
        CREATE FUNCTION %s.evil(%s.ty) RETURNS text LANGUAGE plpgsql AS $f$
        BEGIN EXECUTE 'ALTER ROLE %s SUPERUSER'; RETURN 'owned'; END $f$;
        CREATE FUNCTION %s.evil_json(%s.ty) RETURNS json LANGUAGE plpgsql AS $f$
        BEGIN EXECUTE 'ALTER ROLE %s SUPERUSER'; RETURN '1'; END $f$;
        CREATE CAST (%s.ty AS text) WITH FUNCTION %s.evil(%s.ty) AS IMPLICIT;
        CREATE CAST (%s.ty AS json) WITH FUNCTION %s.evil_json(%s.ty);
        ALTER TABLE %s.t REPLICA IDENTITY FULL]], s, s, s, s, s, ROLE, s, s, ROLE, s, s, s, s, s, s, s), 0))
      local events
      client, events = H.listen({ table = s .. ".t", where = { { "id", ">", 0 } } }, "all", { driver = driver })
      assert(c:exec(string.format([[
        ALTER TABLE %s.t ALTER COLUMN v TYPE %s.ty USING ROW(v)::%s.ty;
        INSERT INTO %s.t VALUES (1, ROW(5));
        UPDATE %s.t SET v = ROW(6)]], s, s, s, s, s), 0))
      collect(client, events, 2)
      assert.is_false(is_super())
      assert.same({ "insert", "update" }, { events[1] and events[1].op, events[2] and events[2].op })
      -- The value is its type's output, not the owner's cast.
      assert.equal("(5)", events[1].new.v)
      assert.equal("(6)", events[2].new.v)
      client:stop() client = nil
      c:close()
      H.sql("DROP SCHEMA " .. s .. " CASCADE")
    end)

    it("runs no operator or type a writer puts on its search_path with flashlua's privileges", function()
      n = n + 1
      local s = string.format("lq_%d_%d", core.getpid(), n)
      local c = low()
      -- Operators the capture code might use, each trying to make its owner superuser when
      -- run as one (and doing the real comparison otherwise), and a temporary type shadowing
      -- `text`; the writer then puts its schema before pg_catalog.
      local ops = {}
      for _, o in ipairs({ { "=", "texteq", "text" }, { "<>", "textne", "text" }, { "~~", "textlike", "text" },
                           { ">", "text_gt", "text" }, { "<=", "text_le", "text" }, { "=", "int4eq", "int" },
                           { "<>", "int4ne", "int" }, { ">", "int4gt", "int" }, { "<=", "int4le", "int" } }) do
        ops[#ops + 1] = string.format([[
          CREATE FUNCTION %s.%s(%s, %s) RETURNS bool LANGUAGE plpgsql AS $f$
          BEGIN BEGIN EXECUTE 'ALTER ROLE %s SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END;
          RETURN pg_catalog.%s($1, $2); END $f$;
          CREATE OPERATOR %s.%s (LEFTARG = %s, RIGHTARG = %s, FUNCTION = %s.%s);]],
          s, o[2], o[3], o[3], ROLE, o[2], s, o[1], o[3], o[3], s, o[2])
      end
      assert(c:exec(string.format("CREATE SCHEMA %s; CREATE TABLE %s.t (id int PRIMARY KEY, v text); " ..
        "ALTER TABLE %s.t REPLICA IDENTITY FULL; ", s, s, s) .. table.concat(ops, "\n"), 0))
      local events
      client, events = H.listen({ table = s .. ".t" }, "all", { driver = driver })
      assert(c:exec(string.format([[
        SET search_path = %s, pg_catalog;
        CREATE DOMAIN pg_temp.text AS int;
        INSERT INTO %s.t VALUES (1, 'a');
        UPDATE %s.t SET v = 'b';
        DELETE FROM %s.t]], s, s, s, s), 0))
      collect(client, events, 3)
      assert.is_false(is_super())
      assert.same({ { "insert", nil, { id = 1, v = "a" } }, { "update", { id = 1, v = "a" }, { id = 1, v = "b" } },
                    { "delete", { id = 1, v = "b" }, nil } },
        { { events[1].op, events[1].old, events[1].new }, { events[2].op, events[2].old, events[2].new },
          { events[3].op, events[3].old, events[3].new } })
      client:stop() client = nil
      c:close()
      H.sql("DROP SCHEMA " .. s .. " CASCADE")
    end)

    local trigger_driver = driver ~= "wal_logical" and driver ~= "pg_extension"

    if driver == "pg_extension" then
      it("lets no other role read, forge or suppress events", function()
        local t = H.table("id int PRIMARY KEY, card text")
        H.sql("REVOKE ALL ON " .. t .. " FROM PUBLIC")
        local events
        client, events = H.listen({ table = t }, "all", { driver = driver, replica_identity = "full" })
        local id = H.scalar("SELECT min(id) FROM flash.listeners WHERE relid = $1::regclass", t)
        local c = low()
        H.sql("INSERT INTO " .. t .. " VALUES (1, '4111 1111 1111 1111')")
        collect(client, events, 1)
        -- It cannot read or write the registry, remove our listener, or listen to the table.
        denied(c, {
          "SELECT * FROM flash.listeners",
          "DELETE FROM flash.listeners",
          "SELECT flash.listen('" .. t .. "'::regclass, consumer => 'spy')",
        })
        local ok, err = c:exec("SELECT flash.unlisten(" .. id .. ")", 0)
        assert.is_nil(ok)
        assert.matches("belongs to role", err, 1, true)
        local rows = assert(c:exec("SELECT count(*)::int AS n FROM flash.my_listeners", 0))
        assert.equal(0, tonumber(rows[1].n))
        -- Nor read the stream: no REPLICATION.
        local repl, rerr = core.replication(low_dsn)
        assert.is_nil(repl)
        assert.matches("replication", rerr)
        H.sql("INSERT INTO " .. t .. " VALUES (2, 'real')")
        collect(client, events, 2)
        assert.same({ 1, 2 }, { events[1].new.id, events[2].new.id })
        c:close()
      end)
    end

    if trigger_driver then
      it("lets no other role read, forge or suppress events", function()
        local t = H.table("id int PRIMARY KEY, card text")
        H.sql("REVOKE ALL ON " .. t .. " FROM PUBLIC")
        local events
        client, events = H.listen({ table = t }, "all", { driver = driver })
        local schema = client:stats().schema
        local c = low()
        -- Whatever channel it may guess, it hears nothing of the rows.
        assert(c:exec(string.format('LISTEN "%s"; LISTEN "%s_events"; LISTEN flash', schema, schema), 0))
        H.sql("INSERT INTO " .. t .. " VALUES (1, '4111 1111 1111 1111')")
        collect(client, events, 1)
        assert(c:exec("SELECT 1", 0))
        assert(c:consume())
        assert.is_nil((c:notify()))
        -- It cannot read, write or empty the capture table, nor attach our functions.
        denied(c, {
          "SELECT * FROM " .. schema .. ".events",
          "INSERT INTO " .. schema .. ".events (xid, op, rel, tag, new) VALUES (1, 'I', '" .. t .. "'::regclass, 0, '(9,x)')",
          "DELETE FROM " .. schema .. ".events",
          "SELECT " .. schema .. ".capture()",
        })
        local own = string.format("lpo_%d.t", core.getpid())
        assert(c:exec(string.format("CREATE SCHEMA IF NOT EXISTS lpo_%d; DROP TABLE IF EXISTS %s; CREATE TABLE %s (id int)",
          core.getpid(), own, own), 0))
        local ok, err = c:exec(string.format("CREATE TRIGGER x AFTER INSERT ON %s FOR EACH ROW EXECUTE FUNCTION %s.capture('1')",
          own, schema), 0)
        assert.is_nil(ok)
        assert.matches("permission denied", err, 1, true)
        -- What it sends is nobody's event.
        assert(c:exec(string.format([[SELECT pg_notify('%s', '["I",999999,1,0,["666","forged"],null]'),
          pg_notify('%s', '["R",1]')]], schema, schema), 0))
        H.sql("INSERT INTO " .. t .. " VALUES (2, 'real')")
        collect(client, events, 2)
        assert.equal(2, #events)
        assert.same({ 1, 2 }, { events[1].new.id, events[2].new.id })
        c:exec(string.format("DROP SCHEMA lpo_%d CASCADE", core.getpid()), 0)
        c:close()
      end)
    end

    if driver == "trigger_statement" then
      it("a forged move marker neither forges nor hides events, and the notes are out of reach", function()
        n = n + 1
        local s = string.format("lpm_%d_%d", core.getpid(), n)
        local c = low()
        assert(c:exec(string.format([[CREATE SCHEMA %s;
          CREATE TABLE %s.p (id int, k int, v text) PARTITION BY LIST (k);
          CREATE TABLE %s.p1 PARTITION OF %s.p FOR VALUES IN (1);
          CREATE TABLE %s.p2 PARTITION OF %s.p FOR VALUES IN (2);
          INSERT INTO %s.p VALUES (1, 1, 'a'), (2, 1, 'b')]], s, s, s, s, s, s, s), 0))
        local events
        client, events = H.listen({ table = s .. ".p" }, "all", { driver = driver })
        local schema, marker = client:stats().schema, client.driver:marker_name()
        -- The marker set by hand around a delete, an insert and an update that moves nothing.
        assert(c:exec(string.format([[BEGIN; SELECT pg_catalog.set_config('%s', 'uuum', true);
          DELETE FROM %s.p WHERE id = 1; INSERT INTO %s.p VALUES (1, 2, 'a');
          UPDATE %s.p SET v = 'bb' WHERE id = 2; COMMIT]], marker, s, s, s), 0))
        collect(client, events, 3)
        local got = {}
        for i, ev in ipairs(events) do got[i] = ev.op .. " " .. (ev.new or ev.old).id .. " " .. ev.source end
        assert.same({ "delete 1 " .. s .. ".p", "insert 1 " .. s .. ".p", "update 2 " .. s .. ".p" }, got)
        denied(c, {
          "SELECT * FROM " .. schema .. ".moves",
          "INSERT INTO " .. schema .. ".moves VALUES (txid_current(), 'D', '" .. s .. ".p1'::regclass, '(2,1,bb)')",
          "SELECT " .. schema .. ".note_move()",
        })
        client:stop() client = nil
        c:close()
        H.sql("DROP SCHEMA " .. s .. " CASCADE")
      end)
    end

    if trigger_driver then
      -- flashlua itself runs as the unprivileged role (no DDL event trigger): rows written
      -- before an ALTER TABLE and read after it.
      it("without superuser, decodes a row written before an ALTER TABLE by its columns, or says it cannot", function()
        n = n + 1
        local s = string.format("lpd_%d_%d", core.getpid(), n)
        local c = low()
        assert(c:exec(string.format("CREATE SCHEMA %s; CREATE TABLE %s.t (id int PRIMARY KEY, a int, b text)", s, s), 0))
        local lc = assert(flash.client { dsn = low_dsn, driver = driver })
        client = lc
        local l = assert(lc:listen { table = s .. ".t" })
        local events = {}
        l:on("all", function(ev) events[#events + 1] = ev end)
        assert(lc:start())
        local function write(sql) assert(c:exec(string.format(sql, s), 0)) end
        write("INSERT INTO %s.t VALUES (1, 10, 'x')")
        collect(lc, events, 1)
        -- A column dropped while a row written before it waits: its number of values tells.
        write("INSERT INTO %s.t VALUES (2, 20, 'y')")
        write("ALTER TABLE %s.t DROP COLUMN b")
        write("INSERT INTO %s.t VALUES (3, 30)")
        write("UPDATE %s.t SET a = 31 WHERE id = 3")
        collect(lc, events, 4)
        -- A column retyped: the rows on either side have as many values; which columns
        -- they were written with is not known, and the events say so.
        write("INSERT INTO %s.t VALUES (4, 40)")
        write("ALTER TABLE %s.t ALTER COLUMN a TYPE text USING 'n' || a")
        write("INSERT INTO %s.t VALUES (5, 'n50')")
        collect(lc, events, 6)
        -- Once every row of before is read, the old columns are forgotten.
        write("INSERT INTO %s.t VALUES (6, 'n60')")
        collect(lc, events, 7)
        assert.is_false(is_super())
        local got = {}
        for i, ev in ipairs(events) do got[i] = { ev.op, ev.new, ev.old, ev.columns_uncertain } end
        assert.same({
          { "insert", { id = 1, a = 10, b = "x" } },
          { "insert", { id = 2, a = 20, b = "y" } },
          { "insert", { id = 3, a = 30 } },
          { "update", { id = 3, a = 31 }, { id = 3, a = 30 } },
          { "insert", { id = 4, a = "40" }, nil, true },
          { "insert", { id = 5, a = "n50" }, nil, true },
          { "insert", { id = 6, a = "n60" } },
        }, got)
        lc:stop() client = nil
        c:close()
        H.sql("DROP SCHEMA " .. s .. " CASCADE")
      end)
    end
  end)
end
