-- bench/scale.lua: scale-out figures (issue 13), one run on a throwaway cluster (`make bench`):
--  (a) a handler that spends 1 ms per event, in 1, 2, 4 and 8 worker states
--      (flash.client{ workers = N }): events/s, busy-wait and I/O-wait (a 1 ms sleep) variants;
--  (b) PostgreSQL -> Redis Streams (flash.sink.redis, 8 partitions) events/s against
--      pg_recvlogical (pgoutput) on the same workload;
--  (c) commit -> callback latency p50/p99 at a target of 1,000 transactions/s, for a worker
--      flashlua behind Redis (capturer -> Redis -> driver = "redis_streams") and for the
--      states of one process (workers = 4).
--   luajit bench/scale.lua [--events 2000] [--rows 300000] [--seconds 10] [--repeat 2] [--parts abc]
-- (b)'s rows: 300,000, so that each command's start (flashlua's catalog checks, some 50 ms
-- more than pg_recvlogical's) weighs little in its wall time.
-- (--parts b: only (b), the PostgreSQL -> Redis throughput.)
local sandbox = require "flash.sandbox"
local flash = require "flash"
local core = require "flash.core"

local opts = { events = 2000, rows = 300000, seconds = 10, ["repeat"] = 2, parts = "abc" }
for i = 1, #arg, 2 do
  local k = arg[i]:gsub("^%-%-", "")
  opts[k] = k == "parts" and arg[i + 1] or tonumber(arg[i + 1])
end
local part = {}
for c in opts.parts:gmatch("[abc]") do part[c] = true end
local root = debug.getinfo(1, "S").source:match("^@(.*)bench/scale%.lua$") or "./"
local flashlua = root .. "build/flashlua"
local util = dofile(root .. "bench/util.lua")
local STATES = { 1, 2, 4, 8 }

local function write_file(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
  return path
end

local tmp = os.tmpname()
os.remove(tmp)
assert(os.execute("mkdir -p " .. tmp) == 0)

-- Background processes: flashlua scripts and redis-server, stopped at the end.
local procs = {}
local function spawn(dsn, args, name)
  local base = tmp .. "/" .. name
  os.execute(string.format("env FLASH_DSN='%s' %s %s >%s.out 2>%s.err & echo $! >%s.pid", dsn, flashlua,
    args, base, base, base))
  local p = { base = base, pid = tonumber(util.read_file(base .. ".pid")) }
  procs[#procs + 1] = p
  return p
end
local function await(p, pattern, timeout)
  local deadline = core.now() + (timeout or 20)
  while core.now() < deadline do
    if (util.read_file(p.base .. ".err") or ""):find(pattern, 1, true) then return true end
    core.sleep(0.05)
  end
  error(p.base .. " did not say '" .. pattern .. "': " .. (util.read_file(p.base .. ".err") or ""))
end
local function stop(p)
  os.execute("kill " .. p.pid .. " 2>/dev/null")
  local deadline = core.now() + 15
  while core.now() < deadline and os.execute("kill -0 " .. p.pid .. " 2>/dev/null") == 0 do core.sleep(0.05) end
end

local function percentile(list, p)
  table.sort(list)
  return list[math.max(1, math.ceil(#list * p))]
end

-- CPU seconds (user + sys) of process pid from /proc: its own (all its threads), or with
-- children = true those of its children it has reaped (fields 14-17 of /proc/PID/stat).
local TICK = tonumber((util.sh("getconf CLK_TCK"))) or 100
local function proc_cpu(pid, children)
  local text = util.read_file("/proc/" .. pid .. "/stat") or ""
  local f = {}
  -- after the ") ": state (a letter, kept as 0) is field 3 of the stat line, so field k is
  -- f[k - 2]. (Until December 2026 the state was skipped and every figure read two fields
  -- off: stime + cutime for a process, cstime + priority for the postmaster's children.)
  for x in text:gsub("^.*%) ", ""):gmatch("%S+") do f[#f + 1] = tonumber(x) or 0 end
  if children then return ((f[14] or 0) + (f[15] or 0)) / TICK end
  return ((f[12] or 0) + (f[13] or 0)) / TICK
end

local function median(list)
  local c = { unpack(list) }
  table.sort(c)
  local m = #c / 2
  if m == math.floor(m) then return (c[m] + c[m + 1]) / 2 end
  return c[math.ceil(m)]
end

io.stderr:write("starting a throwaway PostgreSQL and redis-server...\n")
local sb = assert(sandbox.start { quiet = true, settings = { max_wal_size = "4GB", checkpoint_timeout = "30min",
  -- no autovacuum worker exits during (b): the postmaster's reaped-children CPU is then the
  -- walsenders' and backends' of the measured run.
  autovacuum = "off" } })
local redis_port = 22000 + core.getpid() % 20000
local ok, err = pcall(function()
  -- No automatic AOF rewrite: Redis compacts its append-only file in a forked child once
  -- the file doubles (64 MB at least), and (b) writes ~120 MB a run: the child's CPU would
  -- land in whichever run it happened to start in. (b) empties Redis between runs instead.
  assert(os.execute(string.format("redis-server --port %d --bind 127.0.0.1 --dir %s --appendonly yes " ..
    "--appendfsync everysec --auto-aof-rewrite-percentage 0 --save '' --daemonize yes --pidfile %s/redis.pid " ..
    "--logfile %s/redis.log", redis_port, tmp, tmp, tmp)) == 0)
  local db = assert(flash.client { dsn = sb.dsn })
  local function q(sql, ...) return assert(db:query(sql, ...)) end
  local function slot(name) q("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", name) end
  -- The end of what was written: a logical message's position (as until_lsn = "current"
  -- takes it); pg_current_wal_lsn() lags the last commit under synchronous_commit = off.
  local function lsn() return q("SELECT pg_logical_emit_message(false, 'bench', '')::text AS l")[1].l end
  local url = "redis://127.0.0.1:" .. redis_port
  local redis
  for _ = 1, 100 do
    redis = core.redis_connect("127.0.0.1", redis_port, 1)
    if redis then break end
    core.sleep(0.05)
  end
  assert(redis, "redis-server did not start")

  local R = opts["repeat"]
  local rates, txs, total, sent, rate, lat_redis, lat_states
  local recv, sink, recv_cpu, sink_cpu, wal_recv_cpu, wal_sink_cpu, redis_cpu = {}, {}, {}, {}, {}, {}, {}
  if part.a then
    -------------------------------------------------------------------------------------
    -- (a) 1 ms per event in N states
    q("CREATE TABLE scale (k int PRIMARY KEY, v int); ALTER TABLE scale REPLICA IDENTITY FULL")
    q("CREATE PUBLICATION scale_pub FOR TABLE scale")
    for _, kind in ipairs({ "busy", "sleep" }) do
      for _, n in ipairs(STATES) do
        for r = 1, R do slot(string.format("scale_%s_%d_%d", kind, n, r)) end
      end
    end
    io.stderr:write(string.format("(a) %d events, each handled in 1 ms...\n", opts.events))
    q(string.format([[DO $$ BEGIN FOR t IN 0 .. %d LOOP
      INSERT INTO scale SELECT g, 0 FROM generate_series(t * 100 + 1, least((t + 1) * 100, %d)) g; COMMIT;
    END LOOP; END $$]], math.ceil(opts.events / 100) - 1, opts.events))
    local end_a = lsn()
    local handlers = write_file(tmp .. "/handlers.lua", [[
local core = require "flash.core"
local now, sleep = core.now, core.sleep
return {
  busy = function() local until_t = now() + 0.001 while now() < until_t do end end,
  sleep = function() sleep(0.001) end,
}
]])
    local consumer = write_file(tmp .. "/consume.lua", [[
local flash = require "flash"
local core = require "flash.core"
local slot, n, kind, endpos, handlers = ...
local c = assert(flash.client { driver = "wal_logical", persistent = true, slot = slot, publication = "scale_pub",
  workers = tonumber(n), handlers = handlers, max_unacked = 100000 })
assert(c:listen { table = "scale" }):on("insert", kind)
assert(c:start())
local t0 = core.now()
assert(c:run { until_lsn = endpos })
local s = c:stats()
io.stdout:write(string.format("%d %.6f %d\n", s.worker_events, core.now() - t0, s.events))
]])
    rates = {}
    for _, kind in ipairs({ "busy", "sleep" }) do
      rates[kind] = {}
      for _, n in ipairs(STATES) do
        local runs = {}
        for r = 1, R do
          local res = util.measure(string.format("env FLASH_DSN='%s' %s -l warn %s scale_%s_%d_%d %d %s %s %s", sb.dsn,
            flashlua, consumer, kind, n, r, n, kind, end_a, handlers))
          local got, secs = res.out:match("(%d+) ([%d.]+) %d+%s*$")
          assert(tonumber(got) == opts.events, "handled " .. tostring(got) .. ": " .. res.out)
          runs[#runs + 1] = opts.events / tonumber(secs)
          q("SELECT pg_drop_replication_slot($1)", string.format("scale_%s_%d_%d", kind, n, r))
        end
        rates[kind][n] = runs
      end
    end
  end

  if part.b then
    -------------------------------------------------------------------------------------
    -- (b) PostgreSQL -> Redis against pg_recvlogical
    q(util.BENCH_TABLE)
    q("CREATE PUBLICATION bench_pub FOR TABLE bench")
    for r = 1, R do
      slot("bench_recv_" .. r)
      slot("bench_redis_" .. r)
    end
    txs = math.ceil(opts.rows / 100)
    total = txs * 100
    io.stderr:write(string.format("(b) %d rows in %d transactions...\n", total, txs))
    q(string.format("CALL fill(%d, 100)", txs))
    local end_b = lsn()
    local to_redis = write_file(tmp .. "/to_redis.lua", [[
local flash = require "flash"
local slot, endpos, url = ...
local c = assert(flash.client { driver = "wal_logical", persistent = true, slot = slot, publication = "bench_pub",
  ack = "manual", max_unacked = 100000 })
assert(c:listen { table = "bench" }):on("all", flash.sink.redis { url = url, partitions = 8, stream = slot })
assert(c:run { until_lsn = endpos })
]])
    -- The walsender (and the client's other backend) ends with its client and is reaped by
    -- the postmaster: its CPU is the postmaster's children CPU gained over the run.
    local postmaster = tonumber(util.read_file(sb.datadir .. "/postmaster.pid"):match("^%d+"))
    -- The CPU of the walsender of slot name, once it has ended and been reaped.
    local function walsender_gone(name)
      local deadline = core.now() + 10
      while core.now() < deadline do
        local r = q("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", name)[1]
        local pid = r and r.active_pid
        if not pid or pid == flash.null then break end
        core.sleep(0.02)
      end
      core.sleep(0.2)   -- the postmaster reaps it on SIGCHLD
      return proc_cpu(postmaster, true)
    end
    local redis_pid = tonumber(util.read_file(tmp .. "/redis.pid"))
    for r = 1, R do
      io.stderr:write("pg_recvlogical...\n")
      local pm0 = proc_cpu(postmaster, true)
      local m = util.measure(string.format(
        "%s/pg_recvlogical -d '%s' --slot bench_recv_%d --start -o proto_version=1 -o publication_names=bench_pub " ..
        "--endpos=%s -f /dev/null", sb.bindir, sb.dsn, r, end_b))
      recv[#recv + 1] = total / m.wall
      recv_cpu[#recv_cpu + 1] = m.cpu / total * 1e6
      wal_recv_cpu[#wal_recv_cpu + 1] = (walsender_gone("bench_recv_" .. r) - pm0) / total * 1e6
      io.stderr:write("flashlua -> redis...\n")
      pm0 = proc_cpu(postmaster, true)
      local rs0 = proc_cpu(redis_pid)
      m = util.measure(string.format("env FLASH_DSN='%s' %s -l warn %s bench_redis_%d %s %s", sb.dsn, flashlua, to_redis,
        r, end_b, url))
      local cmds = {}
      for p = 0, 7 do cmds[#cmds + 1] = { "XLEN", "bench_redis_" .. r .. ":" .. p } end
      local n = 0
      for _, x in ipairs(assert(redis:pipeline(cmds))) do n = n + x end
      assert(n >= total, string.format("Redis holds %d of %d events: %s", n, total, m.out))
      sink[#sink + 1] = total / m.wall
      sink_cpu[#sink_cpu + 1] = m.cpu / total * 1e6
      wal_sink_cpu[#wal_sink_cpu + 1] = (walsender_gone("bench_redis_" .. r) - pm0) / total * 1e6
      redis_cpu[#redis_cpu + 1] = (proc_cpu(redis_pid) - rs0) / total * 1e6
      q("SELECT pg_drop_replication_slot($1)", "bench_recv_" .. r)
      q("SELECT pg_drop_replication_slot($1)", "bench_redis_" .. r)
      -- The next run starts with an empty Redis and a compacted append-only file.
      assert(redis:pipeline({ { "FLUSHALL" }, { "BGREWRITEAOF" } }))
      local deadline = core.now() + 60
      repeat
        core.sleep(0.1)
        local info = assert(redis:pipeline({ { "INFO", "persistence" } }))[1]
      until not info:find("aof_rewrite_in_progress:1", 1, true) and not info:find("aof_rewrite_scheduled:1", 1, true)
        or core.now() > deadline
    end
  end

  if part.c then
    -------------------------------------------------------------------------------------
    -- (c) commit -> callback latency at 1,000 transactions/s
    q("CREATE TABLE lat (id bigserial PRIMARY KEY, v int); ALTER TABLE lat REPLICA IDENTITY FULL")
    local record = write_file(tmp .. "/record.lua", [[
local config = ...
local core = require "flash.core"
local out = assert(io.open(config.file, "a"))   -- every state appends to one file
return { record = function(ev) out:write(core.time() - ev.commit_time, "\n") out:flush() end }
]])
    local capturer = spawn(sb.dsn, string.format("--table lat --to %s --partitions 8", url), "capturer")
    await(capturer, "listening on")
    local worker = spawn(sb.dsn, write_file(tmp .. "/worker.lua", string.format([[
local flash = require "flash"
local core = require "flash.core"
local out = assert(io.open(%q, "w"))
local c = assert(flash.client { driver = "redis_streams", url = %q, group = "bench", partitions = 8 })
assert(c:listen { table = "lat" }):on("insert", function(ev) out:write(core.time() - ev.commit_time, "\n") out:flush() end)
assert(c:start())
io.stderr:write("ready\n")
assert(flash.run())
]], tmp .. "/lat_redis", url)), "worker")
    await(worker, "ready")
    local inproc = spawn(sb.dsn, write_file(tmp .. "/inproc.lua", string.format([[
local flash = require "flash"
local c = assert(flash.client { driver = "wal_logical", workers = 4, handlers = %q, config = { file = %q } })
assert(c:listen { table = "lat" }):on("insert", "record")
assert(c:start())
io.stderr:write("ready\n")
assert(flash.run())
]], record, tmp .. "/lat_states")), "inproc")
    await(inproc, "ready")
    io.stderr:write(string.format("(c) %d s of inserts at 1,000 transactions/s...\n", opts.seconds))
    -- The sandbox runs with synchronous_commit = off, where a commit reaches the walsender
    -- only at the WAL writer's next flush (up to 200 ms): the writer commits as usual.
    q("SET synchronous_commit = on")
    local t0
    t0, sent = core.now(), 0
    while core.now() - t0 < opts.seconds do
      local due = t0 + sent / 1000
      local now = core.now()
      if due > now then core.sleep(due - now) end
      q("INSERT INTO lat (v) VALUES ($1)", sent)
      sent = sent + 1
    end
    rate = sent / (core.now() - t0)
    local function lines(path)
      local t = {}
      for l in io.lines(path) do t[#t + 1] = tonumber(l) end
      return t
    end
    local deadline = core.now() + 30
    while core.now() < deadline and (#lines(tmp .. "/lat_redis") < sent or #lines(tmp .. "/lat_states") < sent) do
      core.sleep(0.2)
    end
    for _, p in ipairs({ inproc, worker, capturer }) do stop(p) end
    lat_redis, lat_states = lines(tmp .. "/lat_redis"), lines(tmp .. "/lat_states")
  end
  db:stop()

  print(string.format("scale-out benchmark (issue 13); %d repeats of each figure, the median first, then every run; " ..
    "a shared machine: figures vary between runs", R))
  if part.a then
    print(string.format("(a) %d events, a handler spending 1 ms per event, events/s (ratio to 1 state):", opts.events))
    for _, kind in ipairs({ "busy", "sleep" }) do
      local base = median(rates[kind][1])
      local cells = {}
      for _, n in ipairs(STATES) do
        local list = {}
        for i, x in ipairs(rates[kind][n]) do list[i] = string.format("%.0f", x) end
        cells[#cells + 1] = string.format("%d: %5.0f (%.2fx) [%s]", n, median(rates[kind][n]),
          median(rates[kind][n]) / base, table.concat(list, " "))
      end
      print(string.format("  %-10s %s", kind == "busy" and "busy-wait" or "I/O wait", table.concat(cells, "  ")))
    end
  end
  local function fmt(list)
    local t = {}
    for i, x in ipairs(list) do t[i] = string.format("%.0f", x) end
    return table.concat(t, " ")
  end
  if part.b then
    print(string.format("(b) %d rows (6 columns, %d transactions): pg_recvlogical %.0f rows/s [%s]; flashlua -> Redis " ..
      "(8 partitions, AOF everysec, no automatic AOF rewrite) %.0f events/s [%s]; ratio %.2f (target >= 0.8)", total, txs, median(recv), fmt(recv),
      median(sink), fmt(sink), median(sink) / median(recv)))
    local function fmt1(list)
      local t = {}
      for i, x in ipairs(list) do t[i] = string.format("%.1f", x) end
      return table.concat(t, " ")
    end
    print(string.format("    CPU per event (user + sys): consumer: pg_recvlogical %.1f us [%s], flashlua -> Redis %.1f us [%s]; " ..
      "walsender: for pg_recvlogical %.1f us, for flashlua %.1f us; redis-server %.1f us [%s]", median(recv_cpu),
      fmt1(recv_cpu), median(sink_cpu), fmt1(sink_cpu), median(wal_recv_cpu), median(wal_sink_cpu), median(redis_cpu),
      fmt1(redis_cpu)))
  end
  if part.c then
    print(string.format("(c) %d inserts at %.0f tx/s (target 1,000): commit -> callback latency", sent, rate))
    print(string.format("  PostgreSQL -> flashlua --to redis -> Redis -> worker flashlua (redis_streams): " ..
      "p50 %.1f ms, p99 %.1f ms (%d events; target p99 < 50 ms)", percentile(lat_redis, 0.5) * 1000,
      percentile(lat_redis, 0.99) * 1000, #lat_redis))
    print(string.format("  wal_logical -> workers = 4 (states of one process):                          " ..
      "p50 %.1f ms, p99 %.1f ms (%d events)", percentile(lat_states, 0.5) * 1000, percentile(lat_states, 0.99) * 1000,
      #lat_states))
  end
end)
for _, p in ipairs(procs) do stop(p) end
os.execute(string.format("kill $(cat %s/redis.pid 2>/dev/null) 2>/dev/null", tmp))
sb:stop()
os.execute("rm -rf " .. tmp)
if not ok then io.stderr:write("bench failed: ", tostring(err), "\n") os.exit(1) end
