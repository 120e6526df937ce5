-- flash.sandbox: a throwaway local PostgreSQL cluster (wal_level=logical) for the test run,
-- `scripts/sandbox` and `flashlua --sandbox`. Pure Lua over os/io: no C module needed.
local M = {}

local DEFAULT_PG = "postgresql-15"
local INFO_FILE = "flash-sandbox.info"

-- Everything goes through one shell; every piece that comes from outside is quoted here.
local function q(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- Runs a shell command; returns ok, combined output, exit code. The marker line carries the
-- status because io.popen's close() reports none under Lua 5.1.
local function sh(cmd)
  local p = io.popen("( " .. cmd .. " ) </dev/null 2>&1; echo \"__flash_rc=$?\"", "r")
  if not p then return false, "cannot run a shell", -1 end
  local out = p:read("*a") or ""
  p:close()
  local code = tonumber(out:match("__flash_rc=(%d+)%s*$")) or -1
  out = out:gsub("__flash_rc=%d+%s*$", "")
  return code == 0, out, code
end

local function trim(s) return (tostring(s or ""):gsub("^%s+", ""):gsub("%s+$", "")) end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

local function write_file(path, content)
  local f, err = io.open(path, "wb")
  if not f then return nil, err end
  f:write(content)
  f:close()
  return true
end

local function is_file(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

local function is_dir(path)
  return (sh("test -d " .. q(path)))
end

-- Compares directories as the kernel sees them: /tmp may be a symlink, a caller may pass a
-- relative path.
local function realpath(path)
  local ok, out = sh("cd " .. q(path) .. " && pwd -P")
  return ok and trim(out) or nil
end

local function last_lines(text, n)
  local lines = {}
  for line in tostring(text or ""):gmatch("[^\n]+") do lines[#lines + 1] = line end
  local from = math.max(1, #lines - n + 1)
  return table.concat(lines, "\n", from)
end

local function has_server(dir)
  return dir and dir ~= "" and is_file(dir .. "/initdb") and is_file(dir .. "/pg_ctl")
     and is_file(dir .. "/postgres")
end

-- Orders "9.6" < "15" < "16": version parts compared as numbers.
local function version_less(a, b)
  local pa, pb = {}, {}
  for n in a:gmatch("%d+") do pa[#pa + 1] = tonumber(n) end
  for n in b:gmatch("%d+") do pb[#pb + 1] = tonumber(n) end
  for i = 1, math.max(#pa, #pb) do
    local x, y = pa[i] or -1, pb[i] or -1
    if x ~= y then return x < y end
  end
  return false
end

local NOT_FOUND = "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; install "
  .. DEFAULT_PG .. " (apt-get install " .. DEFAULT_PG .. ") or set FLASH_PG_BINDIR"

-- Where initdb/pg_ctl/postgres live. Debian keeps them off PATH under
-- /usr/lib/postgresql/N/bin, and a PATH entry named pg_ctl may be an unrelated wrapper, so
-- the versioned directories come first and a PATH directory counts only with all three.
function M.find_bindir(explicit)
  explicit = explicit or os.getenv("FLASH_PG_BINDIR")
  if explicit and explicit ~= "" then
    if has_server(explicit) then return explicit end
    return nil, "no PostgreSQL server binaries (initdb, pg_ctl, postgres) in " .. explicit
      .. "; install " .. DEFAULT_PG .. " (apt-get install " .. DEFAULT_PG .. ")"
  end
  local _, listing = sh("ls -d /usr/lib/postgresql/*/bin 2>/dev/null")
  local best, best_ver
  for dir in listing:gmatch("[^\n]+") do
    local ver = dir:match("^/usr/lib/postgresql/([^/]+)/bin$")
    if ver and has_server(dir) and (not best_ver or version_less(best_ver, ver)) then
      best, best_ver = dir, ver
    end
  end
  if best then return best end
  local ok, out = sh("pg_config --bindir 2>/dev/null")
  if ok and has_server(trim(out)) then return trim(out) end
  for dir in (os.getenv("PATH") or ""):gmatch("[^:]+") do
    if has_server(dir) then return dir end
  end
  return nil, NOT_FOUND
end

-- From /dev/urandom rather than math.random: two sandboxes started in the same second by
-- different processes must not try the same ports, and the host's own random state is the
-- script's, not ours to reseed.
local function random_int(lo, hi)
  local f = io.open("/dev/urandom", "rb")
  local b = f and f:read(4)
  if f then f:close() end
  if not b or #b < 4 then return math.random(lo, hi) end
  local n = ((b:byte(1) * 256 + b:byte(2)) * 256 + b:byte(3)) * 256 + b:byte(4)
  return lo + n % (hi - lo + 1)
end

-- A port nobody has bound on any address (IPv4 or IPv6), per the kernel's socket tables.
local function port_in_use(port)
  for _, file in ipairs { "/proc/net/tcp", "/proc/net/tcp6" } do
    local text = read_file(file)
    if text then
      for hex in text:gmatch("\n%s*%d+:%s+%x+:(%x+)%s") do
        if tonumber(hex, 16) == port then return true end
      end
    end
  end
  return false
end

local function pick_port()
  for _ = 1, 200 do
    local port = random_int(20000, 60000)
    if not port_in_use(port) then return port end
  end
  return random_int(20000, 60000)
end

-- A zombie counts as gone: its parent (init, in a container maybe none that reaps) has
-- nothing left to stop.
local function alive(pid)
  local stat = read_file("/proc/" .. pid .. "/stat")
  return stat ~= nil and stat:match("^%d+ %b() (%a)") ~= "Z"
end

local function wait_gone(pid, seconds)
  for _ = 1, seconds * 20 do
    if not alive(pid) then return true end
    sh("sleep 0.05")
  end
  return not alive(pid)
end

local Sandbox = {}
Sandbox.__index = Sandbox

local have_runuser -- util-linux's; `su` where it is missing

-- PostgreSQL refuses to run as root, so as root every server command runs as the OS user
-- that owns the cluster (postgres); `cd` first because root's cwd may be unreadable to it.
function Sandbox:_cmd(cmdline)
  cmdline = "cd " .. q(self.dir) .. " && " .. cmdline
  if not self.run_as then return cmdline end
  if have_runuser == nil then have_runuser = sh("command -v runuser >/dev/null") end
  if have_runuser then
    return "runuser -u " .. q(self.run_as) .. " -- /bin/sh -c " .. q(cmdline)
  end
  return "su " .. q(self.run_as) .. " -s /bin/sh -c " .. q(cmdline)
end

function Sandbox:_bin(name) return q(self.bindir .. "/" .. name) end

function Sandbox:_log(msg)
  if self._logfn then self._logfn(msg) end
end

function Sandbox:_postmaster_pid()
  local text = read_file(self.datadir .. "/postmaster.pid")
  return text and tonumber(text:match("^(%d+)"))
end

-- True while the server of this sandbox is up (pg_ctl status reads the pid file and
-- checks the process).
function Sandbox:running()
  if self.stopped or not is_dir(self.datadir) then return false end
  return (sh(self:_cmd(self:_bin("pg_ctl") .. " status -D " .. q(self.datadir) .. " >/dev/null")))
end

-- Stops the server and removes the directory. Idempotent. A throwaway cluster needs no
-- clean shutdown, and "immediate" cannot hang on a walsender whose client went away.
function Sandbox:stop()
  if self.stopped then return true end
  self.detached = true -- the gc guard must not run a second stop
  if is_dir(self.datadir) then
    local pid = self:_postmaster_pid()
    local ok = sh(self:_cmd(self:_bin("pg_ctl") .. " stop -D " .. q(self.datadir)
      .. " -m immediate -w -t 30 >/dev/null"))
    if not ok and pid and self:_postmaster_pid() == pid then
      -- pg_ctl gave up (e.g. a wedged postmaster): nothing may outlive the sandbox.
      sh("kill -KILL " .. pid .. " 2>/dev/null")
    end
    -- pg_ctl returns once the pid file is gone, a moment before the process is: callers
    -- (and specs) rely on "stopped" meaning the server no longer exists.
    if pid then wait_gone(pid, 5) end
  end
  local ok, out = sh("rm -rf " .. q(self.dir))
  if not ok then
    return nil, "cannot remove sandbox directory " .. self.dir .. ": " .. trim(out)
  end
  self.stopped = true
  self:_log("sandbox stopped, " .. self.dir .. " removed")
  return true
end

-- Keeps the cluster running after this object is collected or the process exits
-- (`scripts/sandbox start`); stop it later with sandbox.open(dir):stop().
function Sandbox:detach()
  self.detached = true
  return self
end

-- Without a reference nobody can stop the cluster any more, so the collector (or lua_close
-- at process exit) stops it instead of leaving a server behind.
local function guard(sb)
  local proxy = newproxy and newproxy(true)
  if not proxy then return end
  getmetatable(proxy).__gc = function()
    if not sb.detached and not sb.stopped then pcall(sb.stop, sb) end
  end
  sb._guard = proxy
end

local function current_user()
  local ok, out = sh("id -u")
  local uid = ok and tonumber(trim(out))
  local _, name = sh("id -un")
  return uid, trim(name)
end

local function info_text(sb)
  return table.concat({
    "dir=" .. sb.dir, "datadir=" .. sb.datadir, "bindir=" .. sb.bindir,
    "port=" .. sb.port, "user=" .. sb.user, "run_as=" .. (sb.run_as or ""),
    "dsn=" .. sb.dsn, "" }, "\n")
end

local function make_object(t, logfn)
  local sb = setmetatable({
    dir = t.dir, datadir = t.datadir, bindir = t.bindir, port = tonumber(t.port),
    user = t.user, run_as = (t.run_as ~= "" and t.run_as) or nil,
    socket_dir = t.dir, logfile = t.dir .. "/server.log", _logfn = logfn,
  }, Sandbox)
  sb.dsn = string.format("host=%s port=%d user=%s dbname=postgres", sb.socket_dir, sb.port, sb.user)
  return sb
end

local function config_text(sb, settings)
  local lines = { "# flashlua sandbox: throwaway, so durability is traded for speed" }
  local function set(k, v) lines[#lines + 1] = string.format("%s = '%s'", k, (tostring(v):gsub("'", "''"))) end
  local base = {
    { "wal_level", "logical" }, { "max_replication_slots", 20 }, { "max_wal_senders", 20 },
    { "fsync", "off" }, { "full_page_writes", "off" }, { "synchronous_commit", "off" },
    { "unix_socket_directories", sb.socket_dir }, { "listen_addresses", "127.0.0.1" },
    { "port", sb.port }, { "max_connections", 100 }, { "shared_buffers", "128MB" },
    { "max_prepared_transactions", 20 }, { "track_commit_timestamp", "on" },
  }
  -- Servers that gate output plugins (a postgresql.conf that names the setting) also let
  -- the pg_extension driver's plugin in.
  if sb.plugins_gated then base[#base + 1] = { "output_plugin_libraries", "pgoutput, test_decoding, flashlua" } end
  -- FLASH_PGEXT_DIR (scripts/run-tests: the source tree's pgext/): flashlua.so is loaded
  -- from there, not from the server's lib directory (which another tree may install to).
  local ext = os.getenv("FLASH_PGEXT_DIR")
  if ext and ext ~= "" then base[#base + 1] = { "dynamic_library_path", ext .. ":$libdir" } end
  for _, kv in ipairs(base) do
    if settings[kv[1]] == nil then set(kv[1], kv[2]) end
  end
  local extra = {}
  for k in pairs(settings) do extra[#extra + 1] = k end
  table.sort(extra)
  for _, k in ipairs(extra) do set(k, settings[k]) end
  return table.concat(lines, "\n") .. "\n"
end

-- Trust for everything local, replication included: initdb -A trust writes the same, but
-- the specs of the wal_logical driver depend on it, so it is not left to initdb's template.
local HBA = [[
# flashlua sandbox: local only, no passwords
local   all             all                     trust
host    all             all     127.0.0.1/32    trust
host    all             all     ::1/128         trust
local   replication     all                     trust
host    replication     all     127.0.0.1/32    trust
host    replication     all     ::1/128         trust
]]

local function port_conflict(log)
  return log:find("Address already in use", 1, true) or log:find("could not create any TCP/IP sockets", 1, true)
end

-- Starts a cluster. opts: quiet, log(msg), bindir, port (fixed; default a free random one),
-- settings (extra postgresql.conf entries), tmpdir (default FLASH_SANDBOX_TMPDIR or /tmp),
-- timeout (seconds for start, default 60), os_user (who runs the server when root).
-- Returns the sandbox or nil, err.
function M.start(opts)
  opts = opts or {}
  local logfn = opts.log
  if not logfn and not opts.quiet then
    logfn = function(msg) io.stderr:write("flash.sandbox: ", msg, "\n") end
  end
  for _, k in ipairs { "port", "unix_socket_directories", "listen_addresses" } do
    if opts.settings and opts.settings[k] ~= nil then
      -- The DSN is built from these; a setting behind its back would make it point nowhere.
      return nil, "settings." .. k .. " cannot be set: the sandbox chooses it (use the port option for a fixed port)"
    end
  end
  local bindir, err = M.find_bindir(opts.bindir)
  if not bindir then return nil, err end

  local uid, uname = current_user()
  if not uid then return nil, "cannot determine the current user (id -u failed)" end
  local run_as
  if uid == 0 then
    run_as = opts.os_user or "postgres"
    if not sh("id -u " .. q(run_as) .. " >/dev/null 2>&1") then
      return nil, "running as root, but PostgreSQL refuses to run as root and there is no '"
        .. run_as .. "' user to run it as: install " .. DEFAULT_PG .. " (it creates the user) or useradd --system "
        .. run_as
    end
  end
  local user = run_as or uname

  -- Short: the socket path (dir/.s.PGSQL.NNNNN) must fit in sun_path (~107 bytes).
  local tmpdir = opts.tmpdir or os.getenv("FLASH_SANDBOX_TMPDIR") or "/tmp"
  local ok, out = sh("mktemp -d " .. q(tmpdir .. "/flashlua-XXXXXX"))
  if not ok then return nil, "cannot create a temporary directory in " .. tmpdir .. ": " .. trim(out) end
  local dir = trim(out)
  if #dir > 80 then
    sh("rm -rf " .. q(dir))
    return nil, "sandbox directory path too long for a unix socket: " .. dir .. " (set FLASH_SANDBOX_TMPDIR to a short path)"
  end

  local sb = make_object({ dir = dir, datadir = dir .. "/data", bindir = bindir, port = 0,
    user = user, run_as = run_as or "" }, logfn)
  guard(sb)

  local function fail(msg)
    sb:stop()
    return nil, msg
  end

  if run_as then
    ok, out = sh("chown " .. q(run_as) .. " " .. q(dir))
    if not ok then return fail("cannot chown " .. dir .. " to " .. run_as .. ": " .. trim(out)) end
  end

  sb:_log("initdb in " .. sb.datadir .. " (" .. bindir .. ")")
  ok, out = sh(sb:_cmd(sb:_bin("initdb") .. " -D " .. q(sb.datadir) .. " -A trust -U " .. q(user)
    .. " -E UTF8 --locale=C --no-sync"))
  if not ok then return fail("initdb failed:\n" .. last_lines(out, 20)) end

  ok, err = write_file(sb.datadir .. "/pg_hba.conf", HBA)
  if not ok then return fail("cannot write pg_hba.conf: " .. tostring(err)) end
  local conf = read_file(sb.datadir .. "/postgresql.conf") or ""
  sb.plugins_gated = conf:find("output_plugin_libraries", 1, true) ~= nil
  ok, err = write_file(sb.datadir .. "/postgresql.conf", conf .. "\ninclude 'flash-sandbox.conf'\n")
  if not ok then return fail("cannot write postgresql.conf: " .. tostring(err)) end

  local attempts = opts.port and 1 or 5
  local timeout = tonumber(opts.timeout) or 60
  for attempt = 1, attempts do
    sb.port = tonumber(opts.port) or pick_port()
    sb.dsn = string.format("host=%s port=%d user=%s dbname=postgres", sb.socket_dir, sb.port, sb.user)
    ok, err = write_file(sb.datadir .. "/flash-sandbox.conf", config_text(sb, opts.settings or {}))
    if not ok then return fail("cannot write the configuration: " .. tostring(err)) end
    ok, err = write_file(dir .. "/" .. INFO_FILE, info_text(sb))
    if not ok then return fail("cannot write " .. INFO_FILE .. ": " .. tostring(err)) end
    if run_as then sh("chown -R " .. q(run_as) .. " " .. q(dir)) end

    local before = #(read_file(sb.logfile) or "")
    sb:_log("starting PostgreSQL on port " .. sb.port)
    ok, out = sh(sb:_cmd(sb:_bin("pg_ctl") .. " start -D " .. q(sb.datadir) .. " -l " .. q(sb.logfile)
      .. " -w -t " .. timeout))
    -- pg_ctl -w already waited for "ready" in the pid file; pg_isready, where the bindir has
    -- one, also proves the socket takes connections.
    if ok and is_file(bindir .. "/pg_isready") then
      ok, out = sh(sb:_cmd(sb:_bin("pg_isready") .. " -q -h " .. q(sb.socket_dir) .. " -p " .. sb.port
        .. " -t " .. timeout))
      if not ok then out = "pg_isready: the server does not accept connections" end
    end
    if ok then
      sb:_log("ready: " .. sb.dsn)
      return sb
    end
    local log = (read_file(sb.logfile) or ""):sub(before + 1)
    -- A half-started server (pg_ctl timed out) must not survive into the next attempt.
    sh(sb:_cmd(sb:_bin("pg_ctl") .. " stop -D " .. q(sb.datadir) .. " -m immediate -w -t 10 >/dev/null 2>&1"))
    if not (port_conflict(log) and attempt < attempts) then
      return fail(string.format("PostgreSQL did not start (port %d): %s\nlast lines of %s:\n%s",
        sb.port, last_lines(out, 5), sb.logfile, last_lines(log, 15)))
    end
    sb:_log("port " .. sb.port .. " is taken, trying another")
  end
end

-- The sandbox that `start` left in dir (e.g. from another process), to stop it.
-- Refuses directories that are not sandboxes, so `stop DIR` never removes anything else.
function M.open(dir, opts)
  opts = opts or {}
  dir = tostring(dir or ""):gsub("/+$", "")
  local text = dir ~= "" and read_file(dir .. "/" .. INFO_FILE)
  if not text then return nil, dir .. " is not a flashlua sandbox directory (no " .. INFO_FILE .. ")" end
  local t = {}
  for k, v in text:gmatch("([%w_]+)=([^\n]*)") do t[k] = v end
  if not t.dir or not t.bindir or not t.port or realpath(t.dir) ~= realpath(dir) then
    return nil, dir .. ": " .. INFO_FILE .. " does not describe this directory"
  end
  local logfn = opts.log
  if not logfn and not opts.quiet then
    logfn = function(msg) io.stderr:write("flash.sandbox: ", msg, "\n") end
  end
  t.dir = realpath(dir)
  local sb = make_object(t, logfn)
  sb.detached = true -- opening must not stop a cluster that someone else still uses
  return sb
end

return M
