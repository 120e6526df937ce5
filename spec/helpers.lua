-- spec/helpers.lua: what the database specs share: the test DSN, a writer client, fresh
-- tables, collecting events, and running the flashlua host as a child process.
local flash = require "flash"
local core = require "flash.core"

local H = {}

H.dsn = os.getenv("FLASH_TEST_DSN") or os.getenv("FLASH_DSN")
assert(H.dsn, "FLASH_TEST_DSN is not set: run the specs with `make test` (it starts a throwaway PostgreSQL)")
flash.defaults.dsn = H.dsn
-- The trigger drivers' capture function for this run (scripts/run-tests runs the event
-- specs again with FLASH_TEST_CAPTURE=plpgsql; unset: "auto", the C one when installed).
flash.defaults.capture = os.getenv("FLASH_TEST_CAPTURE")

-- Every driver the event-content specs run over (the same expectations for each).
-- Every driver of the registry that the conformance specs run over (flash.driver.PARTIAL).
H.drivers = {}
for _, name in ipairs(require("flash.driver").NAMES) do
  if not require("flash.driver").PARTIAL[name] then H.drivers[#H.drivers + 1] = name end
end

-- The pg_extension driver needs the flashlua extension in the test database (make test
-- installs it on the server first).
if not require("flash.driver").PARTIAL.pg_extension then
  local c = assert(flash.client { dsn = H.dsn })
  c:query([[DO $$ BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_available_extensions WHERE name = 'flashlua') THEN
      CREATE EXTENSION IF NOT EXISTS flashlua;
    END IF;
  EXCEPTION WHEN unique_violation OR duplicate_object THEN NULL;   -- another suite made it meanwhile
  END $$]])
  c:stop()
end

H.root = (debug.getinfo(1, "S").source:match("^@(.*)spec/helpers%.lua$") or "./")
H.flashlua = H.root .. "build/flashlua"

local writer
-- A separate connection that plays the application writing rows.
function H.writer()
  if not writer or writer.closed then writer = assert(flash.client { dsn = H.dsn }) end
  return writer
end

function H.sql(sql, ...)
  local rows, err = H.writer():query(sql, ...)
  assert(rows, err)
  return rows
end

-- Count of one query's first column.
function H.scalar(sql, ...)
  local rows = H.sql(sql, ...)
  local _, v = next(rows[1] or {})
  return v
end

local counter = 0
-- A fresh table name in public, created with `columns` (SQL column definitions). Busted
-- loads these helpers afresh for each spec file, so the names come round again: a table of
-- that name, and tables named after it (name_a, a partition an earlier file detached, ...),
-- are dropped first.
function H.table(columns, name)
  counter = counter + 1
  name = name or string.format("t_%d_%d", core.getpid(), counter)
  -- (Qualified operators: spec/92's other role plants its own on the search path.)
  local old = H.sql("SELECT pg_catalog.string_agg(pg_catalog.quote_ident(c.relname::pg_catalog.text), ', ') AS list " ..
    "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace " ..
    "WHERE n.nspname OPERATOR(pg_catalog.=) 'public' AND c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}'::\"char\"[]) " ..
    "AND (c.relname OPERATOR(pg_catalog.=) $1::pg_catalog.name " ..
    "OR pg_catalog.starts_with(c.relname::pg_catalog.text, $1::pg_catalog.text OPERATOR(pg_catalog.||) '_'))",
    name)[1].list
  if old ~= flash.null and old then H.sql("DROP TABLE IF EXISTS " .. old .. " CASCADE") end
  H.sql(string.format("CREATE TABLE %s (%s)", name, columns))
  return name
end

-- A table that exists only outside public: a fresh schema shop_<pid> holding orders_<pid>.
-- Returns both names (the caller drops the schema).
function H.table_elsewhere()
  local schema, name = "shop_" .. core.getpid(), "orders_" .. core.getpid()
  H.sql(string.format("CREATE SCHEMA %s; CREATE TABLE %s.%s (id int)", schema, schema, name))
  return schema, name
end

-- Polls the client until `n` events arrived in `list` (or timeout); returns the list.
function H.wait(client, list, n, timeout)
  local deadline = core.now() + (timeout or 5)
  while #list < n and core.now() < deadline do
    local ok, err = client:poll(0.05)
    if not ok then return list, err end
  end
  return list
end

-- Sets logical_decoding_work_mem on the server (nil: back to its default): transactions
-- larger than it are streamed while they run, to clients that stream.
function H.decoding_work_mem(v)
  H.sql(v and ("ALTER SYSTEM SET logical_decoding_work_mem = '" .. v .. "'") or "ALTER SYSTEM RESET logical_decoding_work_mem")
  H.sql("SELECT pg_reload_conf()")
end

-- Runs fn with flashlua's log captured; returns the messages of its warnings (without
-- time, level and client label), in order. An error in fn is raised after the log is back.
function H.warnings(fn)
  local lines = {}
  local old = flash.log.set_sink(function(line) lines[#lines + 1] = line end)
  local ok, err = pcall(fn)
  flash.log.set_sink(old)
  assert(ok, err)
  local warned = {}
  for _, l in ipairs(lines) do
    if l:find(" WARN ", 1, true) then warned[#warned + 1] = l:match("WARN%s+%[[^%]]*%] (.*)$") end
  end
  return warned
end

-- Polls for a short while to show nothing more arrives.
function H.settle(client, seconds)
  local deadline = core.now() + (seconds or 0.3)
  while core.now() < deadline do client:poll(0.05) end
end

-- A started client with one listener; every event lands in the returned list.
function H.listen(listen_opts, ops, client_opts)
  client_opts = client_opts or {}
  client_opts.dsn = client_opts.dsn or H.dsn
  local client = assert(flash.client(client_opts))
  local l = assert(client:listen(listen_opts))
  local events = {}
  local off = l:on(ops or "all", function(ev) events[#events + 1] = ev end)
  assert(client:start())
  return client, events, l, off
end

-- What captures changes of `tbl` in the database: triggers on it plus the publications
-- that hold it (a trigger driver's objects, or the wal_logical driver's) plus its rows in
-- the flashlua extension's registry (pg_extension).
local function registry()
  return H.scalar("SELECT to_regclass('flash.listeners') IS NOT NULL AS b")
end

function H.capture(tbl)
  return tonumber(H.scalar([[SELECT
    (SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal)
  + (SELECT count(*) FROM pg_publication_rel WHERE prrelid = $1::regclass) AS n]], tbl))
    + (registry() and tonumber(H.scalar("SELECT count(*) AS n FROM flash.listeners WHERE relid = $1::regclass", tbl)) or 0)
end

-- Objects flashlua left in the database: schemas and publications it marks, and triggers
-- whose functions live in its schemas or that call the extension's C capture function.
function H.leftovers()
  return tonumber(H.scalar([[SELECT
    (SELECT count(*) FROM pg_namespace WHERE obj_description(oid, 'pg_namespace') LIKE 'flashlua instance%')
  + (SELECT count(*) FROM pg_publication WHERE obj_description(oid, 'pg_publication') LIKE 'flashlua instance (temporary%')
  + (SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
      JOIN pg_namespace n ON n.oid = p.pronamespace
     WHERE obj_description(n.oid, 'pg_namespace') LIKE 'flashlua instance%'
        OR (p.proname = 'capture' AND p.probin LIKE '%flashlua%')) AS n]]))
    + (registry() and tonumber(H.scalar([[SELECT count(*) AS n FROM flash.listeners
         WHERE consumer LIKE 'flash\_extension\_%']])) or 0)
end

-- H.leftovers() sees the whole database; while another suite's instance is running there
-- it counts that one too. A graceful stop is over before the process exits, so waiting
-- briefly for the count cannot hide objects a spec's instances failed to remove.
function H.await_leftovers(expected)
  local deadline = core.now() + 3
  local n = H.leftovers()
  while n ~= expected and core.now() < deadline do
    core.sleep(0.1)
    n = H.leftovers()
  end
  return n
end

function H.sh_quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

-- Writes a Lua script to a temp file; returns its path.
function H.script(code)
  local path = os.tmpname() .. ".lua"
  local f = assert(io.open(path, "w"))
  f:write(code)
  f:close()
  return path
end

-- Starts `flashlua args...` in the background with output to files; returns a handle
-- with pid, out(), err(), wait(timeout) -> exit status, kill(sig).
function H.spawn(args, env)
  local base = os.tmpname()
  local envs = "FLASH_DSN=" .. H.sh_quote(H.dsn)
  for k, v in pairs(env or {}) do envs = envs .. " " .. k .. "=" .. H.sh_quote(v) end
  local quoted = {}
  for i, a in ipairs(args) do quoted[i] = H.sh_quote(a) end
  local cmd = string.format("cd %s && (env %s %s %s >%s.out 2>%s.err; echo $? >%s.rc) & echo $!",
    H.sh_quote(H.root), envs, H.sh_quote(H.flashlua), table.concat(quoted, " "), base, base, base)
  local p = io.popen("setsid sh -c " .. H.sh_quote(cmd))
  local pid = tonumber(p:read("*l"))
  p:close()
  local h = { pid = pid, base = base }
  local function slurp(ext)
    local f = io.open(base .. ext)
    if not f then return "" end
    local s = f:read("*a")
    f:close()
    return s
  end
  function h.out() return slurp(".out") end
  function h.err() return slurp(".err") end
  -- The flashlua process itself is the subshell's child.
  function h.child()
    local f = io.popen("pgrep -P " .. pid .. " -f flashlua")
    local c = f and tonumber(f:read("*l"))
    if f then f:close() end
    return c
  end
  function h.kill(sig) os.execute(string.format("kill -%s %d 2>/dev/null", sig or "TERM", h.child() or pid)) end
  function h.wait(timeout)
    local deadline = core.now() + (timeout or 10)
    while core.now() < deadline do
      local rc = slurp(".rc")
      if rc ~= "" then return tonumber(rc) end
      core.sleep(0.05)
    end
    return nil
  end
  -- Waits until stderr/stdout contains `pattern` (plain).
  function h.await(pattern, timeout, stream)
    local deadline = core.now() + (timeout or 10)
    while core.now() < deadline do
      if (stream == "err" and h.err() or h.out()):find(pattern, 1, true) then return true end
      core.sleep(0.05)
    end
    return false
  end
  return h
end

-- Waits until pred() is true (or timeout); returns its last answer.
function H.wait_for(pred, timeout)
  local deadline = core.now() + (timeout or 5)
  while core.now() < deadline do
    if pred() then return true end
    core.sleep(0.05)
  end
  return pred()
end

-- Drops a persistent slot once its walsender has let go of it, and its publication.
function H.drop_slot(name, publication)
  H.wait_for(function()
    H.sql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active", name)
    return tonumber(H.scalar("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1", name)) == 0
  end, 10)
  H.sql("DROP PUBLICATION IF EXISTS " .. (publication or name))
end

-- The lines of a file ({} when it does not exist).
function H.lines(path)
  local t = {}
  local f = io.open(path)
  if not f then return t end
  for l in f:lines() do t[#t + 1] = l end
  f:close()
  return t
end

-- Processes, scripts and temp files a spec makes, and one cleanup for all of them (for
-- after_each): s.spawn(args, env), s.script(code), s.tmp(), s.cleanup().
function H.session()
  local procs, files = {}, {}
  local s = {}
  function s.spawn(args, env)
    local h = H.spawn(args, env)
    procs[#procs + 1] = h
    return h
  end
  function s.script(code)
    local p = H.script(code)
    files[#files + 1] = p
    return p
  end
  function s.tmp()
    local p = os.tmpname()
    files[#files + 1] = p
    return p
  end
  function s.cleanup()
    for _, h in ipairs(procs) do
      if h.wait(0.1) == nil then h.kill("KILL") h.wait(2) end
      os.remove(h.base .. ".out") os.remove(h.base .. ".err") os.remove(h.base .. ".rc")
    end
    for _, p in ipairs(files) do os.remove(p) end
    procs, files = {}, {}
  end
  return s
end

-- Inserts a row whose bytea `v` is 100 MB into a new table while spec/big_row_child.lua
-- listens to it under `driver` (a persistent `slot` if given); returns the child's
-- "event <length> <intact>" line and its baseline, peak and final resident memory in MB.
function H.big_row(driver, slot)
  local t = H.table("id int, v bytea")
  local h = H.spawn({ H.root .. "spec/big_row_child.lua", driver, t, slot })
  assert(h.await("ready", 20), h.err())
  H.sql("INSERT INTO " .. t .. " SELECT 1, convert_to(repeat('flashlua', 13107200), 'SQL_ASCII')")
  local done = h.await("rss ", 120)
  local rc = h.wait(10)
  if not done or rc ~= 0 then h.kill("KILL") end
  local out, err = h.out(), h.err()
  for _, ext in ipairs({ ".out", ".err", ".rc" }) do os.remove(h.base .. ext) end
  assert(done and rc == 0, "big_row_child: " .. tostring(rc) .. " " .. err)
  local event, base, peak, after = out:match("\n(event [^\n]*)\nrss (%d+) (%d+) (%d+)")
  return event, tonumber(base), tonumber(peak), tonumber(after)
end

-- A throwaway redis-server (Debian's) on `port`, its append-only file in `dir`; returns a
-- connection to it (core.redis_connect) once it answers.
function H.redis_start(dir, port)
  -- (Its Unix socket, dir/redis.sock, too: spec/66 reaches it both ways.)
  local cmd = string.format("redis-server --port %d --bind 127.0.0.1 --unixsocket %s/redis.sock --unixsocketperm 700 " ..
    "--dir %s --appendonly yes --appendfsync always --save '' --daemonize yes --pidfile %s/redis.pid " ..
    "--logfile %s/redis.log", port, dir, dir, dir, dir)
  assert(os.execute(cmd) == 0, cmd)
  local conn
  H.wait_for(function()
    conn = core.redis_connect("127.0.0.1", port, 1)
    return conn ~= nil
  end, 10)
  assert(conn, "redis-server did not start on port " .. port)
  return conn
end

-- Shuts the redis-server of `conn` down (SHUTDOWN closes the connection without a reply).
function H.redis_stop(conn)
  conn:pipeline({ { "SHUTDOWN" } })
  conn:close()
end

-- Per-spec Redis set-up for before_each/after_each: f.setup() picks a directory, a port
-- (21000 + pid + `offset`) and drops replication slot `slot`; f.teardown() ends the
-- session's processes, the redis-server and the slot. Fields: f.dir, f.port.
function H.redis_fixture(s, slot, offset)
  local f = {}
  function f.setup()
    f.dir = os.tmpname()
    os.remove(f.dir)
    assert(os.execute("mkdir -p " .. f.dir) == 0)
    f.port = 21000 + (core.getpid() + offset) % 20000
    H.drop_slot(slot)
  end
  function f.teardown()
    s.cleanup()
    local c = core.redis_connect("127.0.0.1", f.port, 1)
    if c then H.redis_stop(c) end
    H.drop_slot(slot)
    os.execute("rm -rf " .. f.dir)
  end
  return f
end

-- Runs flashlua to completion; returns status, stdout, stderr.
function H.run_flashlua(args, timeout, env)
  local h = H.spawn(args, env)
  local rc = h.wait(timeout or 20)
  if not rc then h.kill("KILL") end
  return rc, h.out(), h.err()
end

return H
