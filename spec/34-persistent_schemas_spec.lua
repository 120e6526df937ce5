-- spec/34-persistent_schemas_spec.lua: `flashlua --list-schemas` and `--drop-schema NAME`:
-- the trigger drivers' persistent schemas (persistent = true) listed with their tables,
-- backlog and whether a flashlua runs on them; dropped with their triggers, refused while
-- in use or when the schema is not a persistent flashlua one.
local H = require "helpers"
local core = require "flash.core"

describe("persistent schemas from the command line", function()
  local s = H.session()
  local schema = "flash_keep_" .. core.getpid()
  after_each(function()
    s.cleanup()
    H.sql("DROP SCHEMA IF EXISTS " .. schema .. " CASCADE")
  end)

  -- The --list-schemas line of `name`, or nil.
  local function line_of(out, name)
    for l in out:gmatch("[^\n]+") do
      if l:match("^(%S+)") == name then return l end
    end
  end

  it("lists a kept schema with its tables and backlog, refuses to drop it while in use, then drops it", function()
    local t1, t2 = H.table("id int"), H.table("id int")
    local script = s.script(string.format([[
      local flash = require "flash"
      local c = assert(flash.client { persistent = true, schema = %q })
      assert(c:listen { table = %q }):on("insert", function() end)
      assert(c:listen { table = %q }):on("all", function() end)
      io.stdout:write("running\n")
      io.stdout:flush()
    ]], schema, t1, t2))
    local h = s.spawn({ script })
    assert(h.await("running", 20), h.err())
    assert(h.await("listening on", 20, "err"), h.err())

    local rc, out, err = H.run_flashlua({ "--list-schemas" })
    assert.are.equal(0, rc, err)
    assert.matches("^schema%s+tables%s+backlog%s+in use\n", out)
    assert.are.equal(string.format("%-32s %8d %10d  %s", schema, 2, 0, "yes"), line_of(out, schema))

    rc, out, err = H.run_flashlua({ "--drop-schema", schema })
    assert.are.equal(1, rc)
    assert.are.equal("", out)
    assert.are.equal(string.format("flashlua: schema %s is in use by a running flashlua instance; stop it first\n", schema), err)

    h.kill("TERM")
    assert.are.equal(0, h.wait(20), h.err())
    -- Kept: writes meanwhile wait in it.
    H.sql("INSERT INTO " .. t1 .. " VALUES (1), (2), (3)")
    rc, out = H.run_flashlua({ "--list-schemas" })
    assert.are.equal(0, rc)
    assert.are.equal(string.format("%-32s %8d %10d  %s", schema, 2, 3, "no"), line_of(out, schema))

    rc, out, err = H.run_flashlua({ "--drop-schema", schema })
    assert.are.equal(0, rc, err)
    assert.are.equal(string.format("dropped schema %s and its triggers (3 captured changes discarded)\n", schema), out)
    assert.are.equal(0, tonumber(H.scalar("SELECT count(*) AS n FROM pg_namespace WHERE nspname = $1", schema)))
    assert.are.equal(0, H.capture(t1) + H.capture(t2))
    rc, out = H.run_flashlua({ "--list-schemas" })
    assert.are.equal(0, rc)
    assert.is_nil(line_of(out, schema))
  end)

  it("a kept schema no flashlua runs on, whose backlog is over the threshold, is warned about at each start", function()
    local t = H.table("v text")
    local keep = s.script(string.format([[
      local flash = require "flash"
      local c = assert(flash.client { persistent = true, schema = %q })
      assert(c:listen { table = %q }):on("all", function() end)
      flash.after(0, flash.stop)
    ]], schema, t))
    local rc, _, err = H.run_flashlua({ keep }, 20, { FLASH_SLOT_WARN_MB = "1" })
    assert.are.equal(0, rc, err)
    assert.is_nil(err:find("is not in use", 1, true), err)
    -- Stopped: its trigger goes on capturing, more than 1 MB.
    H.sql("INSERT INTO " .. t .. " SELECT repeat(md5(g::text), 30) FROM generate_series(1, 2000) g")
    local other = s.script('local flash = require "flash"\nassert(flash.client {})\nflash.after(0, flash.stop)\n')
    rc, _, err = H.run_flashlua({ other }, 20, { FLASH_SLOT_WARN_MB = "1" })
    assert.are.equal(0, rc, err)
    local warning = err:match("WARN  (%[[^\n]*persistent schema[^\n]*)")
    assert.are.equal(string.format("[client 1 trigger db=%s] persistent schema %s is not in use and its captured " ..
      "changes take N MB; its triggers go on capturing every write to its tables. If no flashlua run will resume " ..
      "it, drop it: flashlua --drop-schema %s", H.scalar("SELECT current_database()::text AS d"), schema, schema),
      warning and (warning:gsub("%d+%.%d MB", "N MB")), err)
    -- Not said by the run that resumes it, nor below the threshold.
    rc, _, err = H.run_flashlua({ keep }, 20, { FLASH_SLOT_WARN_MB = "1" })
    assert.are.equal(0, rc, err)
    assert.is_nil(err:find("is not in use", 1, true), err)
    rc, _, err = H.run_flashlua({ other }, 20, { FLASH_SLOT_WARN_MB = "100" })
    assert.are.equal(0, rc, err)
    assert.is_nil(err:find("is not in use", 1, true), err)
  end)

  it("refuses a schema that is not a persistent flashlua schema, and a script with the option", function()
    H.sql("CREATE SCHEMA " .. schema)
    local rc, out, err = H.run_flashlua({ "--drop-schema", schema })
    assert.are.equal(1, rc)
    assert.are.equal("", out)
    assert.are.equal(string.format("flashlua: no persistent flashlua schema named %s in this database " ..
      "(flashlua --list-schemas shows them)\n", schema), err)
    assert.are.equal(1, tonumber(H.scalar("SELECT count(*) AS n FROM pg_namespace WHERE nspname = $1", schema)))

    local _
    rc, _, err = H.run_flashlua({ "--list-schemas", s.script("") })
    assert.are.equal(2, rc)
    assert.are.equal("flashlua: --list-schemas and --drop-schema take no script or --table\n" ..
      "Try 'flashlua --help' for more information.\n", err)
  end)
end)
