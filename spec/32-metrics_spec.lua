-- spec/32-metrics_spec.lua: `flashlua --metrics ADDR:PORT` and flash.metrics{}: Prometheus
-- text at /metrics and /healthz, scraped with curl from a running flashlua; /healthz while
-- PostgreSQL is down and after the reconnect (on a server of its own); address errors.
local H = require "helpers"
local core = require "flash.core"

-- curl's answer: status code and body.
local function curl(url)
  local p = io.popen("curl -s -m 5 -w '\\n%{http_code}' " .. H.sh_quote(url) .. " 2>&1")
  local out = p:read("*a")
  p:close()
  local body, code = out:match("^(.*)\n(%d+)$")
  return tonumber(code), body or out
end

-- The port the running flashlua says it serves on (its start line).
local function served_port(h)
  assert(h.await("metrics on http://", 20, "err"), h.err())
  return tonumber(h.err():match("metrics on http://[^:]+:(%d+)/metrics"))
end

-- The value of one sample of a /metrics text: `name{labels}` exactly as written.
local function sample(text, series)
  for line in text:gmatch("[^\n]+") do
    local k, v = line:match("^(.-) (%S+)$")
    if k == series then return tonumber(v) end
  end
end

describe("metrics and health (--metrics)", function()
  local s = H.session()
  after_each(function() s.cleanup() end)

  it("serves per-table, per-operation counts, errors and callback times after N events", function()
    local t = H.table("id int PRIMARY KEY, v text")
    local script = s.script(string.format([[
      local flash = require "flash"
      local c = assert(flash.client { name = "orders", on_error = "log" })
      local l = assert(c:listen { table = %q })
      l:on("all", function(ev)
        if ev.new and ev.new.v == "bad" then error("bad row") end
      end)
    ]], t))
    local h = s.spawn({ "--metrics", "127.0.0.1:0", script })
    local port = served_port(h)
    assert.truthy(port and port > 0, h.err())
    assert(h.await("listening on public." .. t, 20, "err"), h.err())
    H.sql("INSERT INTO " .. t .. " SELECT g, 'x' FROM generate_series(1, 5) g")
    H.sql("UPDATE " .. t .. " SET v = 'y' WHERE id <= 2")
    H.sql("DELETE FROM " .. t .. " WHERE id = 5")
    H.sql("INSERT INTO " .. t .. " VALUES (6, 'bad')")
    local lb = string.format('client="orders",db="%s",driver="trigger"', H.scalar("SELECT current_database()::text AS d"))
    local code, body
    -- Handled rows leave the capture table with the next poll: the backlog reaches 0 a
    -- poll after the 9th callback.
    assert.truthy(H.wait_for(function()
      code, body = curl(string.format("http://127.0.0.1:%d/metrics", port))
      return sample(body, "flashlua_handler_seconds_count{" .. lb .. "}") == 9 and
        sample(body, "flashlua_backlog_rows{" .. lb .. "}") == 0
    end, 10), body)
    assert.are.equal(200, code)
    local ev = 'flashlua_events_total{' .. lb .. ',table="public.' .. t .. '",op="%s"}'
    assert.are.equal(6, sample(body, ev:format("insert")))
    assert.are.equal(2, sample(body, ev:format("update")))
    assert.are.equal(1, sample(body, ev:format("delete")))
    assert.are.equal(0, sample(body, ev:format("truncate")))
    assert.are.equal(1, sample(body, "flashlua_errors_total{" .. lb .. "}"))
    assert.are.equal(1, sample(body, "flashlua_up{" .. lb .. "}"))
    assert.are.equal(0, sample(body, "flashlua_reconnects_total{" .. lb .. "}"))
    assert.are.equal(0, sample(body, "flashlua_backlog_rows{" .. lb .. "}"))
    assert.are.equal(9, sample(body, "flashlua_handler_seconds_bucket{" .. lb .. ',le="+Inf"}'))
    assert.truthy(body:find("# TYPE flashlua_handler_seconds histogram\n", 1, true))
    assert.truthy(body:find("# TYPE flashlua_events_total counter\n", 1, true))

    code, body = curl(string.format("http://127.0.0.1:%d/healthz", port))
    assert.are.equal(200, code)
    assert.are.equal("ok: 1 client streaming\n", body)
    code = curl(string.format("http://127.0.0.1:%d/nothing", port))
    assert.are.equal(404, code)
    h.kill("TERM")
    assert.are.equal(0, h.wait(20), h.err())
  end)

  it("shows lag and the confirmed position of a wal_logical client", function()
    local t = H.table("id int PRIMARY KEY, v text")
    local script = s.script(string.format([[
      local flash = require "flash"
      local c = assert(flash.client { name = "wal", driver = "wal_logical", replica_identity = "full",
        slot = "flash_metrics_%d", publication = "flash_metrics_%d" })
      assert(c:listen { table = %q }):on("insert", function() end)
    ]], core.getpid(), core.getpid(), t))
    local h = s.spawn({ "--metrics", "127.0.0.1:0", script })
    local port = served_port(h)
    assert(h.await("listening on public." .. t, 20, "err"), h.err())
    H.sql("INSERT INTO " .. t .. " SELECT g, 'x' FROM generate_series(1, 3) g")
    local lb = string.format('client="wal",db="%s",driver="wal_logical"', H.scalar("SELECT current_database()::text AS d"))
    local body
    assert.truthy(H.wait_for(function()
      local _
      _, body = curl(string.format("http://127.0.0.1:%d/metrics", port))
      return sample(body, 'flashlua_events_total{' .. lb .. ',table="public.' .. t .. '",op="insert"}') == 3
    end, 10), body)
    assert.truthy(sample(body, "flashlua_lag_bytes{" .. lb .. "}"))
    assert.truthy(sample(body, "flashlua_slot_wal_held_bytes{" .. lb .. "}") >= 0)
    assert.truthy(sample(body, "flashlua_confirmed_lsn{" .. lb .. "}") > 0)
    local lag = sample(body, "flashlua_lag_seconds{" .. lb .. "}")
    assert.truthy(lag and lag >= 0 and lag < 60, body)
    h.kill("TERM")
    assert.are.equal(0, h.wait(20), h.err())
  end)

  it("refuses to start with exit 2 when the address is in use or cannot be read, creating nothing", function()
    local before = H.leftovers()
    local t = H.table("id int")
    local script = s.script(string.format([[
      local flash = require "flash"
      assert(flash.client {}):listen { table = %q }
    ]], t))
    local first = s.spawn({ "--metrics", "127.0.0.1:0", script })
    local port = served_port(first)
    local rc, out, err = H.run_flashlua({ "--metrics", "127.0.0.1:" .. port, script })
    assert.are.equal(2, rc, err)
    assert.are.equal("", out)
    assert.are.equal(string.format("flashlua: --metrics: cannot listen on 127.0.0.1:%d: Address already in use\n", port), err)
    first.kill("TERM")
    assert.are.equal(0, first.wait(20), first.err())
    assert.are.equal(before, H.await_leftovers(before))

    local _
    rc, _, err = H.run_flashlua({ "--metrics", "localhost", script })
    assert.are.equal(2, rc)
    assert.are.equal("flashlua: cannot read --metrics 'localhost': ADDR:PORT expected (e.g. 127.0.0.1:9187, " ..
      "[::1]:9187 or :9187 for every address)\nTry 'flashlua --help' for more information.\n", err)
    rc, _, err = H.run_flashlua({ "--metrics", "no.such.host.invalid:9187", script })
    assert.are.equal(2, rc)
    assert.matches("^flashlua: %-%-metrics: cannot listen on no%.such%.host%.invalid:9187: ", err)
  end)

  it("flash.metrics{ listen = ... } serves from a script's own loop", function()
    local t = H.table("id int")
    local script = s.script(string.format([[
      local flash = require "flash"
      local m = assert(flash.metrics { listen = "127.0.0.1:0" })
      io.stdout:write("port ", m.port, "\n")
      io.stdout:flush()
      local c = assert(flash.client { name = "api" })
      assert(c:listen { table = %q }):on("insert", function() end)
      flash.run()
    ]], t))
    local h = s.spawn({ script })
    assert(h.await("port ", 20), h.err())
    local port = tonumber(h.out():match("port (%d+)"))
    assert(h.await("listening on public." .. t, 20, "err"), h.err())
    H.sql("INSERT INTO " .. t .. " VALUES (1), (2)")
    local body
    assert.truthy(H.wait_for(function()
      local _
      _, body = curl(string.format("http://127.0.0.1:%d/metrics", port))
      return body:find('client="api"', 1, true) and body:find('op="insert"} 2\n', 1, true)
    end, 10), body)
    h.kill("TERM")
    assert.are.equal(0, h.wait(20), h.err())
  end)
end)

describe("/healthz across a PostgreSQL stop", function()
  local s = H.session()
  local sb
  after_each(function()
    s.cleanup()
    if sb then sb:stop() sb = nil end
  end)

  -- pg_ctl on the sandbox's cluster, as the user that owns it.
  local function pg_ctl(args)
    local cmd = string.format("%s/pg_ctl %s -D %s", sb.bindir, args, H.sh_quote(sb.datadir))
    if sb.run_as then cmd = "runuser -u " .. sb.run_as .. " -- " .. cmd end
    return os.execute("cd / && " .. cmd .. " >/dev/null 2>&1")
  end

  for _, driver in ipairs({ "trigger", "wal_logical" }) do
  it("turns 503 with the reason while the server is down and 200 after the reconnect (" .. driver .. ")", function()
    sb = assert(require("flash.sandbox").start {})
    local c = assert(require("flash").client { dsn = sb.dsn })
    assert(c:query("CREATE TABLE t (id int)"))
    c:stop()
    local script = s.script(string.format([[
      local flash = require "flash"
      local c = assert(flash.client { name = "down", driver = %q, replica_identity = "full" })
      assert(c:listen { table = "public.t" }):on("insert", function() end)
    ]], driver))
    local h = s.spawn({ "-d", sb.dsn, "--metrics", "127.0.0.1:0", script })
    local port = served_port(h)
    assert(h.await("listening on public.t", 20, "err"), h.err())
    local url = string.format("http://127.0.0.1:%d/healthz", port)
    local code, body = curl(url)
    assert.are.equal(200, code, body)

    assert.truthy(pg_ctl("stop -m fast -w -t 30"))
    assert.truthy(H.wait_for(function()
      code, body = curl(url)
      return code == 503
    end, 10), body)
    assert.matches("^%[down db=postgres%] reconnecting since %d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ\n$", body)
    local _, m = curl(string.format("http://127.0.0.1:%d/metrics", port))
    assert.truthy(m:find('flashlua_up{client="down",db="postgres",driver="' .. driver .. '"} 0\n', 1, true), m)

    assert.truthy(pg_ctl("start -w -t 30 -l " .. H.sh_quote(sb.dir .. "/restart.log")))
    assert.truthy(H.wait_for(function()
      code, body = curl(url)
      return code == 200
    end, 20), body .. h.err())
    assert.are.equal("ok: 1 client streaming\n", body)
    _, m = curl(string.format("http://127.0.0.1:%d/metrics", port))
    assert.truthy(m:find('flashlua_reconnects_total{client="down",db="postgres",driver="' .. driver .. '"} 1\n', 1,
      true), m)
    h.kill("TERM")
    assert.are.equal(0, h.wait(20), h.err())
  end)
  end
end)
