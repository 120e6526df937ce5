-- bench/backfill.lua: listener:backfill throughput against `COPY (SELECT ...) TO STDOUT` of
-- the same table in the same run, its effect on a concurrent writer's TPS (pgbench), peak
-- RSS, the floor LuaJIT itself puts under a row (bench/backfill_floor.lua), and the
-- 1,000,000-row consistency run of spec/64 (a writer updating, deleting and re-inserting
-- random keys at full speed). Part of `make bench`; not a timed test.
--   luajit bench/backfill.lua [--rows 1000000] [--seconds 5] [--runs 2] [--no-spec] [--driver NAME]
--                             [--baseline PATH/flashlua]
-- --driver: wal_logical (default) or a trigger driver. --baseline: another build of flashlua,
-- run alternately with this one on the same server (a before/after in one run; its writer
-- TPS is measured too).
local sandbox = require "flash.sandbox"
local flash = require "flash"

local opts = { rows = 1000000, seconds = 5, runs = 2, spec = true, driver = "wal_logical" }
local i = 1
while i <= #arg do
  local k = arg[i]:gsub("^%-%-", "")
  if k == "no-spec" then opts.spec = false i = i + 1
  elseif k == "driver" or k == "baseline" then opts[k] = arg[i + 1] i = i + 2
  else opts[k] = tonumber(arg[i + 1]) i = i + 2 end
end
local root = debug.getinfo(1, "S").source:match("^@(.*)bench/backfill%.lua$") or "./"
local flashlua = root .. "build/flashlua"

local util = dofile(root .. "bench/util.lua")
local sh, measure = util.sh, util.measure

local function q_sh(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

-- CPU seconds (user + system) of the whole server so far: the postmaster with the children
-- it reaped (its cutime/cstime: a backend's CPU lands there when it exits) and those alive.
-- The difference across a run is the server's work for it: the COPY's backend, or the
-- backfill's reader, query connection and walsender (and the background processes').
local function server_cpu(pm)
  local total = 0
  local p = io.popen("cat /proc/[0-9]*/stat 2>/dev/null")
  for line in p:lines() do
    local pid, rest = line:match("^(%d+) %b() (.*)$")
    if pid then
      local f = {}
      for x in rest:gmatch("%S+") do f[#f + 1] = x end
      -- f[2] ppid, f[12] utime, f[13] stime, f[14] cutime, f[15] cstime (proc(5), from state on)
      if tonumber(pid) == pm then total = total + f[12] + f[13] + f[14] + f[15]
      elseif tonumber(f[2]) == pm then total = total + f[12] + f[13] end
    end
  end
  p:close()
  return total / 100   -- USER_HZ
end

local function median(list, key)
  local v = {}
  for k, x in ipairs(list) do v[k] = x[key] end
  table.sort(v)
  return v[math.ceil(#v / 2)]
end

-- The consumer: a backfill of `bench` whose callback reads every column; prints the rows it
-- got and the backfill's own rate (from its first chunk to its last), then stops.
local CONSUMER = [[
local flash = require "flash"
local c = assert(flash.client { driver = os.getenv("BENCH_DRIVER") or "wal_logical" })
local l = assert(c:listen { table = "bench" })
local n, sum = 0, 0
l:on("read", function(ev)
  local r = ev.new
  n = n + 1
  sum = sum + r.a + #r.b + #r.c + #r.d + (r.e and 1 or 0) + r.id
end)
l:on({ "insert", "update", "delete" }, function() end)
l:backfill { chunk = tonumber(arg[1]) or 10000, progress = false, on_done = function()
  local s = c:stats().backfill
  io.stdout:write(string.format("rows %d rate %.0f sum %d\n", n, s.rate, sum))
  flash.stop()
end }
]]

io.stderr:write("starting a throwaway PostgreSQL...\n")
local sb = assert(sandbox.start { quiet = true, settings = { max_wal_size = "4GB", checkpoint_timeout = "30min" } })
local ok, err = pcall(function()
  local db = assert(flash.client { dsn = sb.dsn })
  local function q(sql, ...) return assert(db:query(sql, ...)) end
  q([[CREATE TABLE bench (id bigint PRIMARY KEY, a int, b text, c timestamptz, d numeric, e boolean);
      ALTER TABLE bench REPLICA IDENTITY FULL]])
  io.stderr:write(string.format("writing %d rows...\n", opts.rows))
  q([[INSERT INTO bench SELECT g, g % 1000, 'row ' || g, '2026-01-01'::timestamptz + g * interval '1 s', g / 7.0, g % 2 = 0
      FROM generate_series(1, $1::bigint) g]], opts.rows)
  q("VACUUM ANALYZE bench")
  local script = os.tmpname() .. ".lua"
  local f = assert(io.open(script, "w"))
  f:write(CONSUMER)
  f:close()
  local env = "FLASH_DSN=" .. q_sh(sb.dsn) .. " BENCH_DRIVER=" .. q_sh(opts.driver)
  local psql = "psql -qX " .. q_sh(sb.dsn)

  -- 1. COPY against the backfill (and the baseline build), alternating, opts.runs times
  -- each; the best run of each counts, and every run is printed (the machine is noisy).
  local pm = tonumber(io.open(sb.datadir .. "/postmaster.pid"):read("*l"))
  local function measured(cmd)
    local s0 = server_cpu(pm)
    local m = measure(cmd)
    os.execute("sleep 0.2")   -- the backends' exits reaped
    m.server = server_cpu(pm) - s0
    return m
  end
  local bins = { { name = "flashlua", path = flashlua, runs = {} } }
  if opts.baseline then bins[2] = { name = "baseline", path = opts.baseline, runs = {} } end
  local copy, copies = nil, {}
  for _ = 1, opts.runs do
    local c = measured(psql .. " -c " .. q_sh("COPY (SELECT * FROM bench) TO STDOUT") .. " >/dev/null")
    c.rate = opts.rows / c.wall
    copies[#copies + 1] = c
    if not copy or c.wall < copy.wall then copy = c end
    for _, b in ipairs(bins) do
      local m = measured(string.format("env %s %s -l warn %s", env, b.path, script))
      m.rate = tonumber(m.out:match("rate (%d+)"))
      assert(tonumber(m.out:match("rows (%d+)")) == opts.rows, m.out)
      b.runs[#b.runs + 1] = m
      if not b.best or m.rate > b.best.rate then b.best = m end
    end
  end
  local copy_rate = opts.rows / copy.wall

  -- 1b. The floor: LuaJIT alone making the same events from the table's text, no flashlua
  -- (bench/backfill_floor.lua), against what 0.8 of the best COPY leaves a row.
  local dump = os.tmpname()
  sh(psql .. " -c " .. q_sh("COPY (SELECT id, a, b, c, d, e FROM bench) TO STDOUT") .. " >" .. dump)
  local floors = {}
  for _ = 1, opts.runs do
    local out = sh(string.format("%s %sbench/backfill_floor.lua %s", arg[-1] or "luajit", root, dump))
    floors[#floors + 1] = tonumber(out:match("floor ([%d.]+) us/row")) or error(out)
  end
  os.remove(dump)
  table.sort(floors)

  -- 2. A writer (pgbench, 1 client, 1-row UPDATEs of random keys) alone, then while a
  -- backfill runs; the backfill is started again as soon as it ends, for the whole run.
  local pgb = os.tmpname()
  f = assert(io.open(pgb, "w"))
  f:write(string.format("\\set k random(1, %d)\nUPDATE bench SET a = a + 1 WHERE id = :k;\n", opts.rows))
  f:close()
  local function pgbench()
    local out = sh(string.format("pgbench -n -c 1 -T %d -f %s %s", opts.seconds, pgb, q_sh(sb.dsn)))
    return tonumber(out:match("tps = ([%d.]+)")) or error(out)
  end
  local alone = pgbench()
  for _, b in ipairs(bins) do
    local loop = string.format("while [ ! -e %s.stop ]; do env %s %s -l warn %s >>%s.out; done", pgb, env, b.path,
      script, pgb)
    local bg = io.popen("setsid sh -c " .. q_sh(loop .. " & echo $!"))
    local pid = bg:read("*l")
    bg:close()
    os.execute("sleep 0.5")
    b.during = pgbench()
    os.execute("touch " .. pgb .. ".stop")
    -- The loop ends after the backfill it is running (removing the stop file before that
    -- would leave it running).
    os.execute(string.format("for i in $(seq 600); do kill -0 %s 2>/dev/null || break; sleep 0.1; done", pid))
    b.loop_rates = {}
    for r in io.open(pgb .. ".out"):read("*a"):gmatch("rate (%d+)") do b.loop_rates[#b.loop_rates + 1] = tonumber(r) end
    os.remove(pgb .. ".stop") os.remove(pgb .. ".out")
  end
  os.remove(pgb) os.remove(script)

  print(string.format("backfill of %d rows (6 columns, bigint primary key), driver %s, PostgreSQL %s, chunks of 10,000 rows:",
    opts.rows, opts.driver, q("SHOW server_version")[1].server_version))
  print(string.format("  COPY (SELECT * FROM bench) TO STDOUT (psql, to /dev/null): %6.2f s  %9.0f rows/s  peak RSS %5.1f MB",
    copy.wall, copy_rate, copy.rss_kb / 1024))
  print(string.format("  COPY CPU, median of %d runs: psql %.2f s, server %.2f s (%.2f us/row)", opts.runs,
    median(copies, "cpu"), median(copies, "server"), median(copies, "server") * 1e6 / opts.rows))
  print(string.format("  LuaJIT alone making the same events (bench/backfill_floor.lua), %d runs: %s us/row; 0.8 of the " ..
    "best COPY leaves %.2f us/row of wall time for everything", #floors, table.concat(floors, " / "),
    1e6 / (0.8 * copy_rate)))
  for _, b in ipairs(bins) do
    local bf = b.best
    print(string.format("  %-8s backfill, callback reading every column:         %6.2f s  %9.0f rows/s  peak RSS %5.1f MB" ..
      "  client CPU %.2f s (%.2f us/row)  (process wall, start to stop: %.0f rows/s)", b.name, opts.rows / bf.rate,
      bf.rate, bf.rss_kb / 1024, bf.cpu, bf.cpu * 1e6 / opts.rows, opts.rows / bf.wall))
    print(string.format("  %-8s ratio backfill / COPY: %.2f", b.name, bf.rate / copy_rate))
    local cpu, server = median(b.runs, "cpu"), median(b.runs, "server")
    print(string.format("  %-8s CPU, median of %d runs: client %.2f s (%.2f us/row), server %.2f s (%.2f us/row)",
      b.name, opts.runs, cpu, cpu * 1e6 / opts.rows, server, server * 1e6 / opts.rows))
  end
  local runs = {}
  for k = 1, opts.runs do
    local parts = { string.format("COPY %.0f", copies[k].rate) }
    for _, b in ipairs(bins) do
      parts[#parts + 1] = string.format("%s %d rows/s, %.2f s CPU", b.name, b.runs[k].rate, b.runs[k].cpu)
    end
    runs[k] = table.concat(parts, ", ")
  end
  print("  every run: " .. table.concat(runs, "; "))
  for _, b in ipairs(bins) do
    print(string.format("  %-8s writer (pgbench, 1-row UPDATEs of random keys): %.0f TPS alone, %.0f TPS during " ..
      "backfills (%.0f%%)", b.name, alone, b.during, 100 * b.during / alone))
    table.sort(b.loop_rates)
    if #b.loop_rates > 0 then
      print(string.format("  %-8s backfill under that writer: %d runs, median %.0f rows/s", b.name, #b.loop_rates,
        b.loop_rates[math.ceil(#b.loop_rates / 2)]))
    end
  end

  -- 3. spec/64's consistency run at this size: backfill while a writer updates, deletes and
  -- re-inserts random keys at full speed; the rebuilt state must equal the table.
  if opts.spec then
    local out = measure(string.format("env FLASH_TEST_DSN=%s FLASH_BACKFILL_ROWS=%d %sscripts/run-tests " ..
      "spec/64-backfill_spec.lua --filter %s", q_sh(sb.dsn), opts.rows, root, q_sh("under " .. opts.driver .. " rebuilds")))
    local line = out.out:match("backfill of %d+ rows under a writer:[^\n]*") or out.out
    print("  consistency (spec/64 at " .. opts.rows .. " rows): " .. line)
    print("  " .. (out.out:match("%d+ success[es]* / %d+ failures?") or "?") ..
      string.format("; peak RSS of the spec process (events checked against a Lua map of every key): %.1f MB",
        out.rss_kb / 1024))
  end
end)
sb:stop()
if not ok then io.stderr:write(tostring(err), "\n") os.exit(1) end
