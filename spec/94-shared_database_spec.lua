-- spec/94-shared_database_spec.lua: flashlua instances and other users' work in one
-- database, as an outsider found them: a stop while another session's DDL runs, two
-- instances side by side.
local core = require "flash.core"
local H = require "spec.helpers"

local TRIGGER_DRIVERS = { "trigger", "trigger_global", "trigger_statement" }

-- A writer process that runs `sql` once and prints "ok" or "error: ..." (warnings go to
-- its stderr, as flashlua logs a query's notices).
local function writer_script(s, sql)
  return s.script(string.format([[
local flash = require "flash"
local c = assert(flash.connect(os.getenv("FLASH_DSN")))
local ok, err = c:query(%q)
io.write(ok and "ok\n" or ("error: " .. tostring(err) .. "\n"))
io.stdout:flush()
c:stop()
]], sql))
end

describe("a stop while another session's DDL is under way", function()
  local s = H.session()
  local client
  after_each(function()
    if client then client:stop() client = nil end
    -- The slow event trigger stands for any other event trigger of the database (an audit
    -- log's, say): one that runs before ours widens the window a DDL always has.
    H.sql("DROP EVENT TRIGGER IF EXISTS a_slow_audit_94")
    s.cleanup()
  end)

  for _, driver in ipairs(TRIGGER_DRIVERS) do
    it("fails no ALTER TABLE or CREATE TABLE that began before the stop, and warns nobody (" .. driver .. ")",
      function()
        local t = H.table("id int PRIMARY KEY")
        local other = H.table("id int PRIMARY KEY")
        H.sql([[CREATE OR REPLACE FUNCTION a_slow_audit_94() RETURNS event_trigger LANGUAGE plpgsql AS
          'BEGIN PERFORM pg_sleep(1.5); END']])
        H.sql("DROP EVENT TRIGGER IF EXISTS a_slow_audit_94")
        H.sql("CREATE EVENT TRIGGER a_slow_audit_94 ON ddl_command_end WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE') " ..
          "EXECUTE FUNCTION a_slow_audit_94()")
        local events
        client, events = H.listen({ table = t }, "all", { driver = driver })
        -- The superuser's instance has its DDL event trigger, which runs after the slow one.
        assert.equal(1, tonumber(H.scalar([[SELECT count(*) AS n FROM pg_event_trigger e JOIN pg_proc p
          ON p.oid = e.evtfoid WHERE p.pronamespace = to_regnamespace($1)]], client.driver.schema)))
        local alter = s.spawn({ writer_script(s, "ALTER TABLE " .. other .. " ADD COLUMN x int") })
        local create = s.spawn({ writer_script(s, "CREATE TABLE " .. other .. "_b (id int)") })
        -- Both are inside the slow trigger now: they listed the event triggers to run.
        assert.is_true(H.wait_for(function()
          return tonumber(H.scalar([[SELECT count(*) AS n FROM pg_stat_activity
            WHERE query LIKE 'ALTER TABLE %' OR query LIKE 'CREATE TABLE %']])) >= 2
        end, 10))
        core.sleep(0.3)
        H.sql("INSERT INTO " .. t .. " VALUES (1)")
        local ok, err = client:stop()
        client = nil
        assert.is_true(ok, err)
        assert.equal(1, #events)
        assert.equal(0, alter.wait(10))
        assert.equal(0, create.wait(10))
        assert.equal("ok\n", alter.out())
        assert.equal("ok\n", create.out())
        assert.equal("", alter.err())
        assert.equal("", create.err())
        assert.equal(1, tonumber(H.scalar("SELECT count(*) AS n FROM pg_attribute WHERE attrelid = $1::regclass " ..
          "AND attname = 'x'", other)))
        -- And the stop removed everything it made.
        assert.equal(0, tonumber(H.scalar([[SELECT count(*) AS n FROM pg_event_trigger e JOIN pg_proc p
          ON p.oid = e.evtfoid WHERE p.proname = 'on_ddl' AND p.pronamespace::regnamespace::text LIKE 'flash\_%']])))
        H.sql("DROP TABLE IF EXISTS " .. other .. "_b")
      end)
  end
end)
