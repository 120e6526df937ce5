-- Specs of flash.sandbox, the throwaway PostgreSQL that the test run, scripts/sandbox and
-- `flashlua --sandbox` stand on. Each starts clusters of its own, apart from the run's.
local sandbox = require "flash.sandbox"

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function sh(cmd)
  local p = io.popen("( " .. cmd .. " ) </dev/null 2>&1; echo \"__rc=$?\"")
  local out = p:read("*a")
  p:close()
  local rc = tonumber(out:match("__rc=(%d+)%s*$"))
  return rc == 0, (out:gsub("__rc=%d+%s*$", "")), rc
end

local function exists(path) return (sh("test -e " .. q(path))) end

-- The server's own psql: Debian keeps it beside initdb, off PATH.
local function psql_bin(sb)
  local bindir = sb and sb.bindir or sandbox.find_bindir()
  local p = bindir and bindir .. "/psql"
  if p and exists(p) then return p end
  return "psql"
end

-- One value from the server, through psql as any user of the DSN would connect.
local function psql(sb, dsn, sql)
  local ok, out = sh(q(psql_bin(sb)) .. " -X -A -t -v ON_ERROR_STOP=1 -d " .. q(dsn) .. " -c " .. q(sql))
  return ok and (out:gsub("%s+$", "")) or nil, out
end

-- A zombie counts as gone: in a container whose init does not reap, the stopped
-- postmaster lingers as one.
local function alive(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return false end
  local stat = f:read("*a")
  f:close()
  return stat:match("^%d+ %b() (%a)") ~= "Z"
end

local function postmaster_pid(sb)
  local f = assert(io.open(sb.datadir .. "/postmaster.pid"))
  local pid = tonumber(f:read("*l"))
  f:close()
  return pid
end

describe("flash.sandbox", function()
  describe("a started cluster", function()
    local sb

    lazy_setup(function()
      local err
      sb, err = sandbox.start { quiet = true }
      assert(sb, err)
    end)

    lazy_teardown(function()
      if sb then sb:stop() end
    end)

    it("accepts connections on its DSN and runs with wal_level=logical", function()
      assert.matches("^host=/%S+ port=%d+ user=%S+ dbname=postgres$", sb.dsn)
      assert.equal("logical", psql(sb, sb.dsn, "SHOW wal_level"))
      assert.equal(sb.socket_dir, sb.dsn:match("host=(%S+)"))
      assert.equal(tostring(sb.port), sb.dsn:match("port=(%d+)"))
    end)

    it("has the settings that replication specs and fast throwaway runs need", function()
      assert.equal("20", psql(sb, sb.dsn, "SHOW max_replication_slots"))
      assert.equal("20", psql(sb, sb.dsn, "SHOW max_wal_senders"))
      assert.equal("off", psql(sb, sb.dsn, "SHOW fsync"))
      assert.equal("off", psql(sb, sb.dsn, "SHOW synchronous_commit"))
      assert.equal("UTF8", psql(sb, sb.dsn, "SHOW server_encoding"))
    end)

    it("accepts replication connections over the socket and over 127.0.0.1", function()
      local out = psql(sb, sb.dsn .. " replication=database", "IDENTIFY_SYSTEM")
      assert.truthy(out, "replication connection over the socket refused")
      assert.matches("^%d+|1|%x+/%x+|postgres$", out)
      local tcp = ("host=127.0.0.1 port=%d user=%s dbname=postgres replication=database"):format(sb.port, sb.user)
      assert.truthy(psql(sb, tcp, "IDENTIFY_SYSTEM"), "replication connection over TCP refused")
    end)

    it("can create a logical replication slot with pgoutput", function()
      assert.equal("flash_spec_slot", psql(sb, sb.dsn,
        "SELECT slot_name FROM pg_create_logical_replication_slot('flash_spec_slot', 'pgoutput')"))
      assert.truthy(psql(sb, sb.dsn, "SELECT pg_drop_replication_slot('flash_spec_slot')"))
      assert.equal("0", psql(sb, sb.dsn, "SELECT count(*) FROM pg_replication_slots"))
    end)

    it("is a cluster of its own, apart from the test run's", function()
      local run_dsn = os.getenv("FLASH_TEST_DSN")
      if not run_dsn then return pending("FLASH_TEST_DSN is not set") end
      assert.not_equal(run_dsn, sb.dsn)
      assert.equal("0", psql(sb, sb.dsn, "SELECT count(*) FROM pg_database WHERE datname = 'flash_spec_marker'"))
      assert.truthy(psql(sb, sb.dsn, "CREATE DATABASE flash_spec_marker"))
      assert.equal("0", psql(sb, run_dsn, "SELECT count(*) FROM pg_database WHERE datname = 'flash_spec_marker'"))
    end)

    it("reports itself running", function()
      assert.is_true(sb:running())
    end)
  end)

  describe("stop", function()
    it("shuts the server down and removes the directory", function()
      local sb = assert(sandbox.start { quiet = true })
      local pid = postmaster_pid(sb)
      assert.is_true(alive(pid))
      assert.is_true(sb:stop())
      assert.is_false(alive(pid))
      assert.is_false(exists(sb.dir))
      assert.is_nil(psql(sb, sb.dsn, "SELECT 1"))
      assert.is_false(sb:running())
    end)

    it("is idempotent", function()
      local sb = assert(sandbox.start { quiet = true })
      assert.is_true(sb:stop())
      assert.is_true(sb:stop())
    end)
  end)

  describe("start", function()
    it("gives each cluster its own port and directory", function()
      local a = assert(sandbox.start { quiet = true })
      local b, err = sandbox.start { quiet = true }
      finally(function() a:stop(); if b then b:stop() end end)
      assert(b, err)
      assert.not_equal(a.port, b.port)
      assert.not_equal(a.dir, b.dir)
      assert.equal("logical", psql(b, b.dsn, "SHOW wal_level"))
    end)

    it("passes extra settings to the server", function()
      local sb = assert(sandbox.start { quiet = true, settings = { cluster_name = "flash spec's" } })
      finally(function() sb:stop() end)
      assert.equal("flash spec's", psql(sb, sb.dsn, "SHOW cluster_name"))
    end)

    it("tells which package to install when there are no server binaries", function()
      local sb, err = sandbox.start { quiet = true, bindir = "/nonexistent/bin" }
      assert.is_nil(sb)
      assert.matches("/nonexistent/bin", err, 1, true)
      assert.matches("apt-get install postgresql", err, 1, true)
    end)

    it("reports the server log and leaves nothing behind when the server cannot start", function()
      local messages = {}
      local sb, err = sandbox.start { log = function(m) messages[#messages + 1] = m end,
        settings = { shared_buffers = "not a size" } }
      assert.is_nil(sb)
      assert.matches("PostgreSQL did not start", err, 1, true)
      assert.matches("server.log", err, 1, true)
      assert.matches("shared_buffers", err, 1, true)
      assert.truthy(#messages > 0, "log callback not called")
      local dir = err:match("last lines of (%S+)/server%.log")
      assert.truthy(dir)
      assert.is_false(exists(dir))
    end)

    it("refuses a busy fixed port with the reason", function()
      local a = assert(sandbox.start { quiet = true })
      finally(function() a:stop() end)
      local b, err = sandbox.start { quiet = true, port = a.port }
      if b then b:stop() end
      assert.is_nil(b)
      assert.matches("Address already in use", err, 1, true)
    end)
  end)

  describe("scripts/sandbox", function()
    local script = "scripts/sandbox"

    it("start prints shell lines for the DSN (the specs' and flashlua's) and the directory; stop DIR removes the cluster", function()
      local ok, out = sh(script .. " start -q")
      assert(ok, out)
      local dsn = out:match("FLASH_TEST_DSN='([^']*)'")
      local dir = out:match("FLASH_SANDBOX_DIR='([^']*)'")
      -- The shell must see exactly these assignments (eval "$(scripts/sandbox start)").
      local ok2, echoed = sh("eval " .. q(out) .. "; printf '%s|%s|%s' \"$FLASH_TEST_DSN\" \"$FLASH_DSN\" \"$FLASH_SANDBOX_DIR\"")
      local reopened = dir and sandbox.open(dir, { quiet = true })
      finally(function() if reopened then reopened:stop() end end)
      assert.truthy(dsn and dir, out)
      assert.is_true(ok2)
      assert.equal(dsn .. "|" .. dsn .. "|" .. dir, echoed)
      -- ... and the programs it starts (README: eval "$(scripts/sandbox start -q)"; build/flashlua script.lua).
      local ok3, child = sh("unset FLASH_DSN; eval " .. q(out) .. "; build/flashlua -e 'print(os.getenv(\"FLASH_DSN\"))' /dev/null")
      assert.is_true(ok3, child)
      assert.equal(dsn .. "\n", child)
      assert.equal("logical", psql(nil, dsn, "SHOW wal_level"))

      assert(sh(script .. " stop -q " .. q(dir)))
      assert.is_false(exists(dir))
      assert.is_nil(psql(nil, dsn, "SELECT 1"))
    end)

    it("stop refuses a directory that is not a sandbox and removes nothing", function()
      local ok, tmp = sh("mktemp -d")
      tmp = tmp:gsub("%s+$", "")
      finally(function() sh("rm -rf " .. q(tmp)) end)
      assert.is_true(ok)
      local ok2, out = sh(script .. " stop -q " .. q(tmp))
      assert.is_false(ok2)
      assert.matches("not a flashlua sandbox", out, 1, true)
      assert.is_true(exists(tmp))
    end)
  end)
end)
