-- bench/listen_cost.lua: what listening costs, per driver. Run by the flashlua host:
--
--   build/flashlua --sandbox bench/listen_cost.lua [options]      (a throwaway PostgreSQL)
--   build/flashlua -d "$DSN" bench/listen_cost.lua [options]       (a server of yours; it
--                                                                   creates and drops flash_bench)
-- options:
--   --drivers none,trigger,...   what to measure ("none": nobody listens; "trigger:plpgsql": a
--                                trigger driver with capture = "plpgsql"); default: none,
--                                every driver this build has (flash.driver.NAMES), and
--                                trigger:plpgsql, trigger_global:plpgsql
--   --seconds N                  length of each pgbench run (default 10)
--   --clients N                  pgbench clients (default 1)
--   --events N                   events for the delivery measurement (default 100000)
--   --repeat N                   runs of each measurement, the median is shown (default 3);
--                                the drivers take turns, so a load that comes and goes on the
--                                machine spreads over all of them
--
-- For each driver: pgbench TPS of a 1-row INSERT transaction and of a 1,000-row
-- INSERT ... SELECT while a client listens and consumes the events in the same loop (every
-- event is counted against the rows written: "lost" must stay 0); the same two writes
-- timed inside the server (a procedure committing each transaction: the writer backend's
-- own cost, without pgbench's round trips); then events/s delivered to a Lua callback,
-- timed from a backlog of --events rows written while the client was not reading (its
-- decoding and dispatch rate, not the writers'). Prints Markdown tables.
local flash = require "flash"
local core = require "flash.core"

local TABLE = "flash_bench"

local function usage(msg)
  io.stderr:write("bench/listen_cost.lua: ", msg, "\n")
  os.exit(2)
end

local opts = { seconds = 10, clients = 1, events = 100000, ["repeat"] = 3 }
do
  local i = 1
  while arg and arg[i] do
    local a, v = arg[i], arg[i + 1]
    if a == "--drivers" and v then opts.drivers = v
    elseif a == "--seconds" and tonumber(v) then opts.seconds = tonumber(v)
    elseif a == "--clients" and tonumber(v) then opts.clients = tonumber(v)
    elseif a == "--events" and tonumber(v) then opts.events = tonumber(v)
    elseif a == "--repeat" and tonumber(v) then opts["repeat"] = tonumber(v)
    else usage("unknown option " .. tostring(a)) end
    i = i + 2
  end
end

local drivers = {}
if opts.drivers then
  for d in opts.drivers:gmatch("[^,%s]+") do drivers[#drivers + 1] = d end
else
  drivers = { "none" }
  local registry = require "flash.driver"
  for _, n in ipairs(registry.NAMES) do
    if not registry.PARTIAL[n] then drivers[#drivers + 1] = n end
    -- The row triggers without the extension's C capture function, for comparison.
    if n == "trigger" or n == "trigger_global" then drivers[#drivers + 1] = n .. ":plpgsql" end
  end
end

local dsn = flash.defaults.dsn or os.getenv("FLASH_DSN") or os.getenv("DATABASE_URL")
if not dsn then usage("no database: pass --sandbox, -d DSN or set FLASH_DSN") end

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local writer = assert(flash.client { dsn = dsn })
local function sql(s, ...)
  local rows, err = writer:query(s, ...)
  if not rows then error(err, 2) end
  return rows
end

-- The flashlua extension in this database, when the server has it installed (make
-- install-pgext): pg_extension needs it, and the trigger drivers call its C capture
-- function when it is there ("auto"; a driver written DRIVER:plpgsql runs with
-- capture = "plpgsql"). Without it pg_extension is left out, saying why.
do
  local ok, err = writer:query("CREATE EXTENSION IF NOT EXISTS flashlua")
  if not ok then
    io.stderr:write("bench/listen_cost.lua: no flashlua extension (", tostring(err),
      "): the trigger drivers capture with PL/pgSQL\n")
    for i = #drivers, 1, -1 do
      if drivers[i] == "pg_extension" then
        io.stderr:write("bench/listen_cost.lua: pg_extension left out\n")
        table.remove(drivers, i)
      end
    end
  end
end

local function write_file(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

local root = debug.getinfo(1, "S").source:match("^@(.*)bench/listen_cost%.lua$") or "./"
local read_file = dofile(root .. "bench/util.lua").read_file

local tmp = os.tmpname()
local scripts = {
  { name = "1-row INSERT", rows = 1, file = tmp .. ".one.sql",
    text = "\\set r random(1, 1000000)\nINSERT INTO " .. TABLE .. " (a, b) VALUES (:r, 'row ' || :r);\n" },
  { name = "1,000-row INSERT ... SELECT", rows = 1000, file = tmp .. ".thousand.sql",
    text = "INSERT INTO " .. TABLE .. " (a, b) SELECT g, 'row ' || g FROM generate_series(1, 1000) g;\n" },
}
for _, s in ipairs(scripts) do write_file(s.file, s.text) end

local function fresh_table()
  sql("DROP TABLE IF EXISTS " .. TABLE .. "; CREATE TABLE " .. TABLE ..
    " (id bigserial PRIMARY KEY, a int, b text, at timestamptz NOT NULL DEFAULT now())")
end

-- The server-side loops: `n` transactions of the 1-row or the 1,000-row INSERT.
local SERVER_ONE, SERVER_THOUSAND = 2000, 20
sql(string.format([[
CREATE OR REPLACE PROCEDURE %s_one(n int) LANGUAGE plpgsql AS $$
BEGIN FOR i IN 1..n LOOP INSERT INTO %s (a, b) VALUES (i, 'row ' || i); COMMIT; END LOOP; END $$;
CREATE OR REPLACE PROCEDURE %s_thousand(n int) LANGUAGE plpgsql AS $$
BEGIN FOR i IN 1..n LOOP INSERT INTO %s (a, b) SELECT g, 'row ' || g FROM generate_series(1, 1000) g;
COMMIT; END LOOP; END $$]], TABLE, TABLE, TABLE, TABLE))

-- A client of `driver` listening to every insert on the table; nil for "none".
local function listener(driver)
  if driver == "none" then return nil, { n = 0 } end
  local name, capture = driver:match("^([%w_]+):?(%a*)$")
  local c = assert(flash.client { dsn = dsn, driver = name, capture = capture ~= "" and capture or nil })
  local count = { n = 0 }
  assert(c:listen { table = TABLE }):on("insert", function() count.n = count.n + 1 end)
  assert(c:start())
  return c, count
end

-- pgbench in the background; the client's loop runs meanwhile. Returns TPS.
local function pgbench(script, client)
  local out = tmp .. ".pgbench"
  os.remove(out .. ".rc")
  local cmd = string.format("(pgbench -n -f %s -T %d -c %d -j %d %s >%s 2>&1; echo $? >%s.rc) &",
    q(script.file), opts.seconds, opts.clients, opts.clients, q(dsn), q(out), q(out))
  assert(os.execute(cmd) == 0, "cannot start pgbench")
  while not read_file(out .. ".rc") do
    if client then assert(client:poll(0.05)) else core.sleep(0.05) end
  end
  local text = read_file(out) or ""
  local tps = tonumber(text:match("tps = ([%d%.]+)"))
  if not tps then error("pgbench failed:\n" .. text) end
  return tps
end

-- Polls until `count.n` reaches `want` (or nothing arrives for 10 s); returns seconds taken.
local function drain(client, count, want)
  local t0, last, seen = core.now(), core.now(), count.n
  while count.n < want and core.now() - last < 10 do
    assert(client:poll(0.05))
    if count.n ~= seen then seen, last = count.n, core.now() end
  end
  return core.now() - t0
end

local function median(list)
  local s = { unpack(list) }
  table.sort(s)
  local n = #s
  if n == 0 then return nil end
  if n % 2 == 1 then return s[(n + 1) / 2] end
  return (s[n / 2] + s[n / 2 + 1]) / 2
end

-- One round: every measurement of one driver.
local function measure(driver, r)
  for i, script in ipairs(scripts) do
    fresh_table()
    local client, count = listener(driver)
    local tps = pgbench(script, client)
    r[i][#r[i] + 1] = tps
    if client then
      local rows = tonumber(sql("SELECT count(*) AS n FROM " .. TABLE)[1].n)
      drain(client, count, rows)
      r.lost = r.lost + (rows - count.n)
      client:stop()
    end
    io.stderr:write(string.format("%-18s %-28s %10.1f tps\n", driver, script.name, tps))
  end
  do
    fresh_table()
    local client, count = listener(driver)
    local t0 = core.now()
    sql("CALL " .. TABLE .. "_one(" .. SERVER_ONE .. ")")
    local t1 = core.now()
    sql("CALL " .. TABLE .. "_thousand(" .. SERVER_THOUSAND .. ")")
    local t2 = core.now()
    r.one[#r.one + 1] = (t1 - t0) / SERVER_ONE * 1e6
    r.thousand[#r.thousand + 1] = (t2 - t1) / SERVER_THOUSAND * 1e3
    if client then
      local rows = SERVER_ONE + SERVER_THOUSAND * 1000
      drain(client, count, rows)
      r.lost = r.lost + (rows - count.n)
      client:stop()
    end
    io.stderr:write(string.format("%-18s %-28s %7.1f us, %7.2f ms\n", driver, "in the server",
      r.one[#r.one], r.thousand[#r.thousand]))
  end
  if driver ~= "none" then
    fresh_table()
    local client, count = listener(driver)
    -- The backlog: written while the client is not reading.
    local left = opts.events
    while left > 0 do
      local n = math.min(left, 10000)
      sql("INSERT INTO " .. TABLE .. " (a, b) SELECT g, 'row ' || g FROM generate_series(1, $1) g", n)
      left = left - n
    end
    local secs = drain(client, count, opts.events)
    r.rate[#r.rate + 1] = count.n / secs
    r.lost = r.lost + (opts.events - count.n)
    client:stop()
    io.stderr:write(string.format("%-18s %-28s %10.0f events/s\n", driver, "delivery", count.n / secs))
  end
end

local results = {}
for _, driver in ipairs(drivers) do
  results[#results + 1] = { driver = driver, {}, {}, one = {}, thousand = {}, rate = {}, lost = 0 }
end
for _ = 1, opts["repeat"] do
  for _, r in ipairs(results) do measure(r.driver, r) end
end
local machine = (function()
  local p = io.popen("nproc 2>/dev/null")
  local n = p and tonumber(p:read("*l"))
  if p then p:close() end
  return n and (n .. " CPU cores") or "?"
end)()
local pg_version = sql("SELECT current_setting('server_version') AS v")[1].v
sql("DROP TABLE IF EXISTS " .. TABLE .. "; DROP PROCEDURE " .. TABLE .. "_one; DROP PROCEDURE " .. TABLE .. "_thousand")
writer:stop()
for _, s in ipairs(scripts) do os.remove(s.file) end
os.remove(tmp .. ".pgbench")
os.remove(tmp .. ".pgbench.rc")
os.remove(tmp)

local base = results[1].driver == "none" and results[1] or nil
local function pct(r, key)
  if not base or base == r then return "" end
  return string.format(" (%.0f%%)", 100 * median(r[key]) / median(base[key]))
end
local function name(r) return r.driver == "none" and "no listener" or ("`" .. r.driver .. "`") end
print(string.format("PostgreSQL %s, %s; median of %d runs", pg_version, machine, opts["repeat"]))
print()
print(string.format("pgbench, %d s, %d client(s), a client consuming the events meanwhile:", opts.seconds, opts.clients))
print()
print("| driver | 1-row INSERT, TPS | 1,000-row INSERT ... SELECT, TPS | events/s to a Lua callback | events lost |")
print("|---|---|---|---|---|")
for _, r in ipairs(results) do
  local rate = median(r.rate)
  print(string.format("| %s | %.0f%s | %.1f%s | %s | %s |", name(r), median(r[1]), pct(r, 1), median(r[2]), pct(r, 2),
    rate and string.format("%.0f", rate) or "-", r.driver == "none" and "-" or tostring(r.lost)))
end
print()
print(string.format("In the writer's backend (a procedure committing %d 1-row and %d 1,000-row transactions):",
  SERVER_ONE, SERVER_THOUSAND))
print()
print("| driver | 1-row INSERT transaction | 1,000-row INSERT ... SELECT | added per row of it |")
print("|---|---|---|---|")
local function added(r, key, unit, fmt)
  if not base or base == r then return "" end
  return string.format(" (" .. fmt .. " %s)", median(r[key]) - median(base[key]), unit)
end
for _, r in ipairs(results) do
  local one, th = median(r.one), median(r.thousand)
  print(string.format("| %s | %.1f µs%s | %.2f ms%s | %s |", name(r), one, added(r, "one", "µs", "%+.1f"), th,
    added(r, "thousand", "ms", "%+.2f"), base and base ~= r and string.format("%+.2f µs", th - median(base.thousand)) or "-"))
end
