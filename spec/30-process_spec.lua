-- spec/30-process_spec.lua: the flashlua host as a process: signals, two instances side by
-- side, a crash (kill -9), a lost connection and a failing callback, seen from outside.
local H = require "helpers"

local leftovers = H.await_leftovers

-- A script that prints one line per event on `tbl` and "ready" once its triggers exist.
-- Unbuffered stdout: the spec reads the lines while the process is still running.
local scripts = {}
local function script(code)
  local path = H.script(code)
  scripts[#scripts + 1] = path
  return path
end

local function listener_script(tbl, extra)
  return script(string.format([[
io.stdout:setvbuf("no")
local flash = require "flash"
local client = assert(flash.client {%s})
local l = assert(client:listen { table = %q })
l:on("all", function(ev)
  local row = ev.new or ev.old or {}
  print(ev.op, row.id)
end)
assert(client:start())
print("ready")
]], extra or "", tbl))
end

-- Lines of a process's stdout, without the "ready" marker.
local function event_lines(h)
  local lines = {}
  for line in h.out():gmatch("[^\n]+") do
    if line ~= "ready" then lines[#lines + 1] = line end
  end
  return lines
end

-- The schema of the instance whose OS pid is `pid` (its COMMENT names that pid).
local function schema_of(pid)
  local rows = H.sql([[SELECT nspname::text AS name FROM pg_namespace
    WHERE obj_description(oid, 'pg_namespace') LIKE 'flashlua instance (pid ' || $1 || ')%']], pid)
  return rows[1] and rows[1].name
end

local function user_triggers(tbl)
  return tonumber(H.scalar("SELECT count(*) AS n FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal", tbl))
end

local function backend_alive(bpid)
  return tonumber(H.scalar("SELECT count(*) AS n FROM pg_stat_activity WHERE pid = $1", bpid)) > 0
end

local wait_for = H.wait_for

describe("flashlua process", function()
  local tables, procs = {}, {}

  local function new_table()
    local t = H.table("id int PRIMARY KEY, v text")
    tables[#tables + 1] = t
    return t
  end

  local function spawn(args, env)
    local h = H.spawn(args, env)
    -- Remember the flashlua pid: once it is gone, only its schema's comment still names it.
    local child = h.child
    function h.child()
      local c = child()
      h.pid_seen = c or h.pid_seen
      return c
    end
    procs[#procs + 1] = h
    return h
  end

  -- What a spec's instances could not remove (a failure, a crash) goes with the spec.
  local function drop_schemas_of(pid)
    if not pid then return end
    local name = schema_of(pid)
    if name then H.sql("DROP SCHEMA IF EXISTS " .. name .. " CASCADE") end
  end

  after_each(function()
    -- A failed spec must not leave a flashlua running or a table behind.
    for _, h in ipairs(procs) do
      h.child()
      if h.wait(0.1) == nil then h.kill("KILL") h.wait(2) end
      drop_schemas_of(h.pid_seen)
      os.remove(h.base .. ".out") os.remove(h.base .. ".err") os.remove(h.base .. ".rc")
    end
    procs = {}
    for _, t in ipairs(tables) do H.sql("DROP TABLE IF EXISTS " .. t) end
    tables = {}
    for _, p in ipairs(scripts) do os.remove(p) end
    scripts = {}
  end)

  for _, sig in ipairs({ "INT", "TERM" }) do
    it("stops cleanly on SIG" .. sig .. ": exit 0 and nothing left in the database", function()
      local t = new_table()
      local h = spawn({ listener_script(t) })
      assert.is_true(h.await("ready", 10), "not ready; stderr: " .. h.err())
      assert.is_true(H.leftovers() > 0)
      H.sql("INSERT INTO " .. t .. " VALUES (1, 'a')")
      assert.is_true(h.await("insert\t1", 5), "no event; stderr: " .. h.err())
      h.kill(sig)
      assert.are.equal(0, h.wait(10), "stderr: " .. h.err())
      assert.are.same({ "insert\t1" }, event_lines(h))
      assert.are.equal(0, leftovers(0))
      assert.are.equal(0, user_triggers(t))
    end)
  end

  it("runs two instances with default options side by side; stopping one leaves the other intact", function()
    local t = new_table()
    local a = spawn({ listener_script(t) })
    local b = spawn({ listener_script(t) })
    assert.is_true(a.await("ready", 10), "a not ready: " .. a.err())
    assert.is_true(b.await("ready", 10), "b not ready: " .. b.err())
    local pa, pb = a.child(), b.child()
    local sa, sb = schema_of(pa), schema_of(pb)
    assert.is_string(sa)
    assert.is_string(sb)
    assert.are_not.equal(sa, sb)
    -- "all" means insert, update, delete and truncate triggers for each instance.
    assert.are.equal(8, user_triggers(t))

    H.sql("INSERT INTO " .. t .. " VALUES (1, 'both')")
    assert.is_true(a.await("insert\t1", 5), "a: " .. a.err())
    assert.is_true(b.await("insert\t1", 5), "b: " .. b.err())

    a.kill("TERM")
    assert.are.equal(0, a.wait(10), "a: " .. a.err())
    assert.are.equal(4, user_triggers(t))
    assert.is_nil(schema_of(pa))

    H.sql("INSERT INTO " .. t .. " VALUES (2, 'only b')")
    assert.is_true(b.await("insert\t2", 5), "b lost its listening when a stopped: " .. b.err())
    assert.are.same({ "insert\t1" }, event_lines(a))
    assert.are.same({ "insert\t1", "insert\t2" }, event_lines(b))

    b.kill("TERM")
    assert.are.equal(0, b.wait(10), "b: " .. b.err())
    assert.are.equal(0, user_triggers(t))
    assert.are.equal(0, leftovers(0))
  end)

  it("survives kill -9 for writers, and the next start removes what the dead instance left", function()
    local t, other = new_table(), new_table()
    local h = spawn({ listener_script(t) })
    assert.is_true(h.await("ready", 10), "not ready: " .. h.err())
    local schema = schema_of(h.child())
    assert.is_string(schema)
    local bpid = tonumber(schema:match("^flash_(%d+)$"))
    assert.is_number(bpid)

    h.kill("KILL")
    assert.are.equal(128 + 9, h.wait(5))
    -- The server notices the dead client when its socket closes; only then is the
    -- instance's advisory lock free.
    assert.is_true(wait_for(function() return not backend_alive(bpid) end, 5))

    local function schema_exists()
      return tonumber(H.scalar("SELECT count(*) AS n FROM pg_namespace WHERE nspname = $1", schema)) == 1
    end
    -- A crash cannot clean up: the schema and its four triggers stay until the next start.
    assert.is_true(schema_exists())
    assert.are.equal(4, user_triggers(t))
    assert.is_true(H.leftovers() >= 5)
    -- Larger than NOTIFY's 8000 bytes: the orphan trigger must take its other path.
    H.sql("INSERT INTO " .. t .. " VALUES (1, repeat('x', 12000))")
    assert.are.equal(12000, tonumber(H.scalar("SELECT length(v) AS n FROM " .. t .. " WHERE id = 1")))
    assert.is_true(schema_exists())
    assert.are.equal(4, user_triggers(t))

    local path = script(string.format([[
io.stdout:setvbuf("no")
local flash = require "flash"
local client = assert(flash.client {})
assert(client:listen { table = %q }):on("insert", function() end)
assert(client:start())
print("ready")
]], other))
    local n = spawn({ path })
    assert.is_true(n.await("ready", 10), "new instance not ready: " .. n.err())
    -- Only the new instance's own objects: its schema and its one insert trigger.
    assert.are.equal(2, leftovers(2))
    assert.are.equal(0, user_triggers(t))
    assert.is_false(schema_exists())
    n.kill("TERM")
    assert.are.equal(0, n.wait(10), n.err())
    assert.are.equal(0, leftovers(0))
  end)

  it("survives pg_terminate_backend of its connection, loses nothing written meanwhile and keeps delivering", function()
    local t = new_table()
    local h = spawn({ listener_script(t) })
    assert.is_true(h.await("ready", 10), "not ready: " .. h.err())
    local bpid = tonumber(schema_of(h.child()):match("^flash_(%d+)$"))
    H.sql("INSERT INTO " .. t .. " VALUES (1, 'before')")
    assert.is_true(h.await("insert\t1", 5), h.err())

    -- Written while the connection is down: the trigger captured it into the events table.
    assert.is_true(H.scalar("SELECT pg_terminate_backend($1) AS ok", bpid))
    H.sql("INSERT INTO " .. t .. " VALUES (2, 'meanwhile')")
    assert.is_true(h.await("reconnected", 10, "err"), "no reconnect; stderr: " .. h.err())
    local err = h.err()
    assert.matches("WARN%s+%[client 1 trigger db=[^%]]+%] connection to PostgreSQL lost", err)
    assert.matches("WARN%s+%[client 1 trigger db=[^%]]+%] reconnected; nothing was lost: the changes committed meanwhile wait in flash_%d+%.events", err)
    assert.is_nil(h.wait(0.3), "the process exited after losing its connection")

    H.sql("INSERT INTO " .. t .. " VALUES (3, 'after')")
    assert.is_true(h.await("insert\t3", 5), "nothing delivered after the reconnect: " .. h.err())
    h.kill("TERM")
    assert.are.equal(0, h.wait(10), h.err())
    assert.are.same({ "insert\t1", "insert\t2", "insert\t3" }, event_lines(h))
    assert.are.equal(0, leftovers(0))
  end)

  it("exits 1 with the callback's file:line when a callback fails under on_error = \"stop\"", function()
    local t = new_table()
    local path = script(string.format([[
local flash = require "flash"
local client = assert(flash.client { on_error = "stop" })
local l = assert(client:listen { table = %q })
l:on("insert", function(ev)
  error("boom on row " .. ev.new.id)
end)
assert(client:start())
io.stdout:setvbuf("no")
print("ready")
]], t))
    local h = spawn({ path })
    assert.is_true(h.await("ready", 10), "not ready: " .. h.err())
    H.sql("INSERT INTO " .. t .. " VALUES (7, 'x')")
    assert.are.equal(1, h.wait(10), "stderr: " .. h.err())
    local err = h.err()
    assert.truthy(err:find(path .. ":5: boom on row 7", 1, true), "stderr: " .. err)
    assert.truthy(err:find("callback for insert on public." .. t .. " failed", 1, true), "stderr: " .. err)
    assert.are.equal(0, leftovers(0))
    assert.are.equal(0, user_triggers(t))
  end)

  it("cleans up on a SIGTERM that arrives while the script is still running after client:start()", function()
    -- A service manager may stop flashlua during its start-up; the triggers are already
    -- in place then, and a graceful stop must still remove them.
    local t = new_table()
    local path = script(string.format([[
io.stdout:setvbuf("no")
local flash = require "flash"
local core = require "flash.core"
local client = assert(flash.client {})
assert(client:listen { table = %q }):on("insert", function() end)
assert(client:start())
print("ready")
core.sleep(1)
]], t))
    local h = spawn({ path })
    assert.is_true(h.await("ready", 10), "not ready: " .. h.err())
    h.child()
    h.kill("TERM")
    assert.are.equal(0, h.wait(10), "stderr: " .. h.err())
    assert.are.equal(0, user_triggers(t))
    assert.are.equal(0, leftovers(0))
  end)
end)
