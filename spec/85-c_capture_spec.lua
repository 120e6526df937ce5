-- spec/85-c_capture_spec.lua: the trigger drivers' C capture function (pgext/capture.c,
-- docs/drivers.md "The C capture function"): used when the flashlua extension is created
-- in the database; the same events as the PL/pgSQL capture, whatever the writer's session
-- settings; nothing another role can point at a table that is not flashlua's; no user
-- write fails when a flashlua schema is dropped by hand under its triggers.
local flash = require "flash"
local core = require "flash.core"
local H = require "spec.helpers"

local ROLE = "flash_cap_low"
local low_dsn = (H.dsn:gsub("user=%S+", "")) .. " user=" .. ROLE

local function has_c_capture()
  return H.scalar([[SELECT count(*) FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
    JOIN pg_proc p ON p.oid = d.objid WHERE e.extname = 'flashlua' AND d.deptype = 'e'
      AND p.proname = 'capture']]) == 1
end

-- The functions the triggers of `tbl` call, as "schema.function" strings.
local function trigger_functions(tbl)
  local out = {}
  for _, r in ipairs(H.sql([[SELECT p.pronamespace::regnamespace::text || '.' || p.proname AS f
    FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
    WHERE t.tgrelid = $1::regclass AND NOT t.tgisinternal ORDER BY 1]], tbl)) do
    out[#out + 1] = r.f
  end
  return out
end

describe("the C capture function", function()
  setup(function()
    assert(has_c_capture(), "flash.capture() is missing: install the extension (`make install-pgext`)")
  end)

  for _, driver in ipairs({ "trigger", "trigger_global" }) do
    it("is what " .. driver .. "'s row triggers call by default, and plpgsql selects the instance's own", function()
      local t = H.table("id int PRIMARY KEY, v text")
      local c = assert(flash.client { driver = driver })
      assert(c:listen { table = t }):on("insert", function() end)
      assert(c:start())
      assert.same({ "flash.capture" }, trigger_functions(t))
      -- The WHEN clause that ties the trigger to the instance's events table; the tag is
      -- minus the trigger's route (docs/drivers.md "Detached partitions and children").
      assert.matches("FOR EACH ROW WHEN %(%(true OR %(NULL::flash_%d+%.events IS NULL%)%)%) EXECUTE FUNCTION flash%.capture%('%-%d+', '%d+', '268435456'%)",
        H.scalar("SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = $1::regclass", t))
      c:stop()
      local p = assert(flash.client { driver = driver, capture = "plpgsql" })
      assert(p:listen { table = t }):on("insert", function() end)
      assert(p:start())
      local fns = trigger_functions(t)
      assert.equal(1, #fns)
      assert.matches("^flash_%d+%.capture$", fns[1])
      p:stop()
    end)
  end

  for _, driver in ipairs({ "trigger", "trigger_global" }) do
    it("delivers exactly what the PL/pgSQL capture delivers, under any session settings (" .. driver .. ")", function()
      local t = H.table([[id int PRIMARY KEY, ts timestamptz, d date, iv interval, b bytea, f float8,
        n numeric, s text, a int[], j jsonb, tm time, r numrange, flag boolean]])
      local got = { c = {}, plpgsql = {} }
      local clients = {}
      for mode, list in pairs(got) do
        local c = assert(flash.client { driver = driver, capture = mode })
        assert(c:listen { table = t }):on("all", function(ev)
          list[#list + 1] = { op = ev.op, new = ev.new, old = ev.old }
        end)
        assert(c:start())
        clients[#clients + 1] = c
      end
      local w = assert(core.connect(H.dsn))
      assert(w:exec([[SET TimeZone = 'America/New_York'; SET DateStyle = 'SQL, DMY';
        SET IntervalStyle = 'sql_standard'; SET bytea_output = 'escape'; SET extra_float_digits = 0]]))
      assert(w:exec(string.format([[
        INSERT INTO %s VALUES (1, '2024-02-29 23:59:59.123456+00', '2024-03-01', '1 year 2 mons 3 days 04:05:06.7',
          '\x00ff27', 0.1, 12345678901234567890.123456789, 'quote " back\ slash, comma (paren)', '{1,NULL,3}',
          '{"k": [1, "two", null]}', '12:34:56', '[1.5,2.5)', true);
        INSERT INTO %s (id) VALUES (2);
        UPDATE %s SET f = 1.0/3, s = NULL, a = '{}' WHERE id = 1;
        DELETE FROM %s WHERE id = 2]], t, t, t, t)))
      w:close()
      local deadline = core.now() + 10
      while (#got.c < 4 or #got.plpgsql < 4) and core.now() < deadline do
        for _, c in ipairs(clients) do c:poll(0.02) end
      end
      for _, c in ipairs(clients) do c:stop() end
      assert.equal(4, #got.plpgsql)
      assert.same(got.plpgsql, got.c)
      assert.equal("2024-02-29 23:59:59.123456+00", got.c[1].new.ts)
      assert.equal("2024-03-01", got.c[1].new.d)
      assert.equal(0.3333333333333333, got.c[3].new.f)
    end)
  end

  it("captures nothing into a table that is not a flashlua events table, and needs EXECUTE to be attached", function()
    H.sql(string.format([[DO $$ BEGIN
      IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '%s') THEN CREATE ROLE %s LOGIN NOSUPERUSER; END IF;
    END $$; GRANT CREATE ON DATABASE postgres TO %s; REVOKE EXECUTE ON FUNCTION flash.capture() FROM %s]],
      ROLE, ROLE, ROLE, ROLE))
    local s = "cap_low_" .. core.getpid()
    -- A table shaped like an events table, but not in a flashlua schema: the victim.
    H.sql(string.format([[DROP SCHEMA IF EXISTS %s_v CASCADE; CREATE SCHEMA %s_v;
      CREATE TABLE %s_v.events (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, xid bigint NOT NULL,
        op "char" NOT NULL, rel oid NOT NULL, tag integer NOT NULL, new text, old text, big bigint)]], s, s, s))
    local victim = H.scalar(string.format("SELECT '%s_v.events'::regclass::oid::bigint", s))
    local c = assert(core.connect(low_dsn))
    assert(c:exec(string.format("DROP SCHEMA IF EXISTS %s CASCADE; CREATE SCHEMA %s; CREATE TABLE %s.mine (id int)",
      s, s, s)))
    local attach = string.format("CREATE TRIGGER x AFTER INSERT ON %s.mine FOR EACH ROW EXECUTE FUNCTION " ..
      "flash.capture('0', '%d', '1000000')", s, victim)
    local ok, err = c:exec(attach)
    assert.is_nil(ok)
    assert.matches("permission denied for function flash.capture", err, 1, true)
    -- Even a role trusted with EXECUTE: its trigger writes nothing there, and fails nothing.
    H.sql("GRANT EXECUTE ON FUNCTION flash.capture() TO " .. ROLE)
    assert(c:exec(attach))
    assert(c:exec(string.format("INSERT INTO %s.mine VALUES (1), (2)", s)))
    assert.equal(2, H.scalar(string.format("SELECT count(*) FROM %s.mine", s)))
    assert.equal(0, H.scalar(string.format("SELECT count(*) FROM %s_v.events", s)))
    H.sql("REVOKE EXECUTE ON FUNCTION flash.capture() FROM " .. ROLE)
    assert(c:exec(string.format("DROP SCHEMA %s CASCADE", s)))
    c:close()
    H.sql(string.format("DROP SCHEMA %s_v CASCADE", s))
  end)

  it("goes with its schema when the schema is dropped by hand, and writes go on", function()
    local t = H.table("id int PRIMARY KEY")
    local c = assert(flash.client { driver = "trigger", capture = "c", schema = "flash_cap_gone" })
    assert(c:listen { table = t }):on("insert", function() end)
    assert(c:start())
    assert.same({ "flash.capture" }, trigger_functions(t))
    -- The trigger calls flash.capture, not a function of the schema; its WHEN clause names
    -- the schema's events table, so CASCADE takes it too.
    H.sql("DROP SCHEMA flash_cap_gone CASCADE")
    assert.same({}, trigger_functions(t))
    H.sql("INSERT INTO " .. t .. " VALUES (1), (2)")
    assert.equal(2, H.scalar("SELECT count(*) FROM " .. t))
    c:stop()
  end)

  it("refuses capture = \"c\" where the extension is not created, naming the fix", function()
    if #H.sql("SELECT 1 AS x FROM pg_database WHERE datname = 'flash_spec_nocap'") == 0 then
      H.sql("CREATE DATABASE flash_spec_nocap")
    end
    local dsn = (H.dsn:gsub("dbname=%S+", "")) .. " dbname=flash_spec_nocap"
    local c = assert(flash.client { dsn = dsn, driver = "trigger", capture = "c" })
    local probe = assert(core.connect(dsn))
    assert(probe:exec("DROP TABLE IF EXISTS nocap; CREATE TABLE nocap (id int)"))
    probe:close()
    assert(c:listen { table = "nocap" }):on("insert", function() end)
    local ok0, err = c:start()
    assert.is_nil(ok0)
    assert.matches("the flashlua extension (with flash.capture()) is not created in this database", err, 1, true)
    assert.matches("CREATE EXTENSION flashlua", err, 1, true)
    c:stop()
    local ok, oerr = pcall(flash.client, { driver = "trigger", capture = "fast" })
    assert.is_false(ok)
    assert.matches('option \'capture\': "auto", "c" or "plpgsql" expected, got "fast"', oerr, 1, true)
  end)
end)
