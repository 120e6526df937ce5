-- bench/pg_extension.lua: the pg_extension driver against pg_recvlogical with pgoutput on
-- the same workload, in one run on a throwaway cluster (`make bench`): consumer wall time
-- (throughput ratio) and walsender CPU per row, (a) every row and column listened, (b) a
-- `where` keeping 10% of the rows and 2 of the 6 columns; and wal_logical with binary = true
-- against text (walsender CPU per row). Prints the README's figures.
--   luajit bench/pg_extension.lua [--rows-per-tx 100] [--txs 10000]
-- The cluster loads flashlua.so from FLASH_PGEXT_DIR (the Makefile sets the tree's pgext/)
-- and needs the extension's control and SQL files installed (`make install-pgext`).
local sandbox = require "flash.sandbox"
local flash = require "flash"
local core = require "flash.core"

local opts = { rows = 100, txs = 10000 }
for i = 1, #arg, 2 do
  local k, v = arg[i]:gsub("^%-%-", ""), tonumber(arg[i + 1])
  if k == "rows-per-tx" then opts.rows = v elseif k == "txs" then opts.txs = v end
end
local root = debug.getinfo(1, "S").source:match("^@(.*)bench/pg_extension%.lua$") or "./"
local flashlua = root .. "build/flashlua"
local util = dofile(root .. "bench/util.lua")

local slurp = util.read_file

-- Runs cmd under GNU time in the background and samples the CPU time of the walsender that
-- serves `slot` until it ends: { wall, cpu (consumer), rss_kb, out, ws_cpu (walsender s) }.
local function measure_ws(db, cmd, slot)
  local tf, out, done = os.tmpname(), os.tmpname(), os.tmpname()
  os.remove(done)
  os.execute(string.format("(/usr/bin/time -f '%%e %%U %%S %%M' -o %s %s > %s 2>&1; touch %s) </dev/null >/dev/null 2>&1 &",
    tf, cmd, out, done))
  local ticks = {}
  while not io.open(done) do
    local rows = db:query("SELECT active_pid AS pid FROM pg_catalog.pg_replication_slots WHERE slot_name = $1", slot)
    local pid = rows and rows[1] and rows[1].pid
    if pid and pid ~= flash.null then
      local stat = slurp("/proc/" .. pid .. "/stat") or ""
      local u, s = stat:match("^%d+ %b() %S+" .. string.rep(" %S+", 10) .. " (%d+) (%d+)")
      if u then ticks[pid] = tonumber(u) + tonumber(s) end
    end
    core.sleep(0.02)
  end
  local ws = 0
  for _, t in pairs(ticks) do ws = ws + t end
  local line = slurp(tf) or ""
  local text = slurp(out) or ""
  os.remove(tf) os.remove(out) os.remove(done)
  local wall, user, sys, rss = line:match("([%d.]+) ([%d.]+) ([%d.]+) (%d+)")
  if not wall then error("command failed: " .. cmd .. "\n" .. text) end
  return { wall = tonumber(wall), cpu = tonumber(user) + tonumber(sys), rss_kb = tonumber(rss), out = text,
           ws_cpu = ws / 100 }
end

io.stderr:write("starting a throwaway PostgreSQL...\n")
local sb = assert(sandbox.start { quiet = true, settings = { max_wal_size = "4GB", checkpoint_timeout = "30min" } })
local ok, err = pcall(function()
  local db = assert(flash.client { dsn = sb.dsn })
  local function q(sql, ...) return assert(db:query(sql, ...)) end
  q("CREATE EXTENSION flashlua")
  q(util.BENCH_TABLE)
  q([[CREATE PUBLICATION bench_pub FOR TABLE bench;
      CREATE PUBLICATION bench_pub10 FOR TABLE bench (id, b) WHERE (a < 100) WITH (publish = 'insert')]])
  for _, s in ipairs({ "bench_recv", "bench_recv10", "bench_recv10f" }) do q("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", s) end

  -- The flashlua consumers: persistent slots whose listeners are registered before the
  -- rows are written (a listen is positioned in the WAL), then resumed by the timed runs.
  local script = os.tmpname() .. ".lua"
  local f = assert(io.open(script, "w"))
  f:write([[
    local flash = require "flash"
    local slot, which, endpos = arg[1], arg[2], arg[3]
    local filtered = which == "10"
    local c = assert(flash.client { driver = which:match("^wal") and "wal_logical" or "pg_extension", persistent = true,
      slot = slot, publication = slot, binary = which == "walbin" })
    local n, sum = 0, 0
    local l = assert(c:listen(filtered and { table = "public.bench", fields = { "id", "b" }, where = { { "a", "<", 100 } } }
      or { table = "public.bench" }))
    l:on("insert", function(ev)
      local r = ev.new
      local _ = r.id, r.a, r.b, r.c, r.d, r.e     -- read every column it has
      sum = sum + r.id
      n = n + 1
    end)
    if endpos == "register" then assert(c:start()) c:stop() return end
    assert(c:run { until_lsn = endpos })
    io.stdout:write(n, "\n")
  ]])
  f:close()
  local function flash_cmd(slot, which, endpos)
    return string.format("env FLASH_DSN='%s' %s -l warn %s %s %s %s", sb.dsn, flashlua, script, slot, which, endpos)
  end
  for _, c in ipairs({ { "bench_ext", "all" }, { "bench_ext10", "10" }, { "bench_wal", "wal" }, { "bench_walbin", "walbin" } }) do
    local out, code = util.sh(flash_cmd(c[1], c[2], "register"))
    assert(code == 0, out)
  end

  local total = opts.rows * opts.txs
  io.stderr:write(string.format("writing %d rows in %d transactions...\n", total, opts.txs))
  q(string.format("CALL fill(%d, %d)", opts.txs, opts.rows))
  local endpos = q("SELECT pg_current_wal_lsn()::text AS l")[1].l
  q("CHECKPOINT")

  local function recv(slot, pub)
    return measure_ws(db, string.format("%s/pg_recvlogical -d '%s' --slot %s --start -o proto_version=1 " ..
      "-o publication_names=%s --endpos=%s -f /dev/null", sb.bindir, sb.dsn, slot, pub, endpos), slot)
  end
  local function ext(slot, which, want)
    local r = measure_ws(db, flash_cmd(slot, which, endpos), slot)
    local n = tonumber(r.out:match("(%d+)%s*$"))
    assert(n == want, slot .. " delivered " .. tostring(n) .. " of " .. want .. ": " .. r.out)
    return r
  end
  io.stderr:write("(a) every row and column: pg_recvlogical...\n")
  local ra = recv("bench_recv", "bench_pub")
  io.stderr:write("(a) flashlua pg_extension...\n")
  local ea = ext("bench_ext", "all", total)
  io.stderr:write("(b) 10% of rows, 2 of 6 columns: pg_recvlogical (publication of every row)...\n")
  local rb = measure_ws(db, string.format("%s/pg_recvlogical -d '%s' --slot bench_recv10 --start -o proto_version=1 " ..
    "-o publication_names=bench_pub --endpos=%s -f /dev/null", sb.bindir, sb.dsn, endpos), "bench_recv10")
  io.stderr:write("(b) pg_recvlogical, publication with a row filter and a column list...\n")
  local rf = recv("bench_recv10f", "bench_pub10")
  io.stderr:write("(b) flashlua pg_extension...\n")
  local eb = ext("bench_ext10", "10", total / 10)
  io.stderr:write("(c) flashlua wal_logical, text values...\n")
  local wt = ext("bench_wal", "wal", total)
  io.stderr:write("(c) flashlua wal_logical, binary = true...\n")
  local wb = ext("bench_walbin", "walbin", total)
  db:stop()

  local function row(name, r, rows)
    print(string.format("  %-44s %6.2f s  %9.0f rows/s  consumer cpu %5.2f s  walsender cpu %5.2f s (%5.2f us/row)  RSS %5.1f MB",
      name, r.wall, rows / r.wall, r.cpu, r.ws_cpu, r.ws_cpu / rows * 1e6, r.rss_kb / 1024))
  end
  print(string.format("pg_extension benchmark: %d rows (%d transactions x %d rows, 6 columns) written, then consumed",
    total, opts.txs, opts.rows))
  print("(a) every row and column listened")
  row("pg_recvlogical (pgoutput, proto 1)", ra, total)
  row("flashlua pg_extension", ea, total)
  print(string.format("  throughput ratio flashlua / pg_recvlogical: %.2f (target >= 1.2); walsender CPU ratio %.2f",
    ra.wall / ea.wall, ea.ws_cpu / ra.ws_cpu))
  print("(b) where a < 100 (10% of rows), fields id, b (2 of 6 columns)")
  row("pg_recvlogical (pgoutput, every row)", rb, total)
  row("pg_recvlogical (publication WHERE (a < 100), (id, b))", rf, total)
  row("flashlua pg_extension", eb, total)
  print(string.format("  throughput ratio flashlua / pg_recvlogical: %.2f (target >= 3); walsender CPU ratio %.2f",
    rb.wall / eb.wall, eb.ws_cpu / rb.ws_cpu))
  print(string.format("  against the filtering publication: throughput ratio %.2f; walsender CPU ratio %.2f",
    rf.wall / eb.wall, eb.ws_cpu / rf.ws_cpu))
  print("(c) wal_logical, every row and column: text values against binary = true")
  row("flashlua wal_logical (text)", wt, total)
  row("flashlua wal_logical (binary = true)", wb, total)
  print(string.format("  binary / text: walsender CPU %.2f, consumer CPU %.2f, throughput %.2f",
    wb.ws_cpu / wt.ws_cpu, wb.cpu / wt.cpu, wt.wall / wb.wall))
end)
sb:stop()
if not ok then io.stderr:write("bench failed: ", tostring(err), "\n") os.exit(1) end
