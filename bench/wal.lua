-- bench/wal.lua: wal_logical throughput against pg_recvlogical on the same workload, in one
-- run on a throwaway cluster (`make bench`). Prints the figures of the README's performance
-- section: throughput ratio, consumer CPU µs per event, peak RSS; and the peak RSS of a
-- 1M-row single transaction with streaming.
--   luajit bench/wal.lua [--rows-per-tx 100] [--txs 10000] [--single 1000000]
local sandbox = require "flash.sandbox"
local flash = require "flash"

local opts = { rows = 100, txs = 10000, single = 1000000 }
for i = 1, #arg, 2 do
  local k, v = arg[i]:gsub("^%-%-", ""), tonumber(arg[i + 1])
  if k == "rows-per-tx" then opts.rows = v elseif k == "txs" then opts.txs = v elseif k == "single" then opts.single = v end
end
local root = debug.getinfo(1, "S").source:match("^@(.*)bench/wal%.lua$") or "./"
local flashlua = root .. "build/flashlua"

local util = dofile(root .. "bench/util.lua")
local measure = util.measure

io.stderr:write("starting a throwaway PostgreSQL...\n")
local sb = assert(sandbox.start { quiet = true, settings = { max_wal_size = "4GB", checkpoint_timeout = "30min" } })
local ok, err = pcall(function()
  local db = assert(flash.client { dsn = sb.dsn })
  local function q(sql, ...) return assert(db:query(sql, ...)) end
  q(util.BENCH_TABLE)
  q("CREATE PUBLICATION bench_pub FOR TABLE bench")
  q("SELECT pg_create_logical_replication_slot('bench_flash', 'pgoutput')")
  q("SELECT pg_create_logical_replication_slot('bench_recv', 'pgoutput')")
  local total = opts.rows * opts.txs
  io.stderr:write(string.format("writing %d rows in %d transactions...\n", total, opts.txs))
  q(string.format("CALL fill(%d, %d)", opts.txs, opts.rows))
  local endpos = q("SELECT pg_current_wal_lsn()::text AS l")[1].l

  local bindir = sb.bindir
  io.stderr:write("pg_recvlogical...\n")
  local recv = measure(string.format(
    "%s/pg_recvlogical -d '%s' --slot bench_recv --start -o proto_version=1 -o publication_names=bench_pub --endpos=%s -f /dev/null",
    bindir, sb.dsn, endpos))

  local script = os.tmpname() .. ".lua"
  local f = assert(io.open(script, "w"))
  f:write([[
    local flash = require "flash"
    local c = assert(flash.client { driver = "wal_logical", persistent = true, slot = "bench_flash", publication = "bench_pub" })
    local n, sum = 0, 0
    assert(c:listen { table = "public.bench" }):on("insert", function(ev)
      local r = ev.new
      -- read every column
      local _ = r.id, r.a, r.b, r.c, r.d, r.e
      sum = sum + r.a
      n = n + 1
    end)
    assert(c:run { until_lsn = arg[1] })
    io.stdout:write(n, "\n")
  ]])
  f:close()
  io.stderr:write("flashlua...\n")
  local fl = measure(string.format("env FLASH_DSN='%s' %s -l warn %s %s", sb.dsn, flashlua, script, endpos))
  local delivered = tonumber(fl.out:match("(%d+)%s*$"))
  assert(delivered == total, "flashlua delivered " .. tostring(delivered) .. " of " .. total .. ": " .. fl.out)

  -- One transaction of opts.single rows with streaming: memory must stay flat.
  q("TRUNCATE bench")
  q("ALTER SYSTEM SET logical_decoding_work_mem = '64MB'")
  q("SELECT pg_reload_conf()")
  q("SELECT pg_drop_replication_slot('bench_flash')")
  q("SELECT pg_create_logical_replication_slot('bench_flash', 'pgoutput')")
  io.stderr:write(string.format("one transaction of %d rows, streaming...\n", opts.single))
  q(string.format("CALL fill(1, %d)", opts.single))
  local endpos2 = q("SELECT pg_current_wal_lsn()::text AS l")[1].l
  f = assert(io.open(script, "w"))
  f:write([[
    local flash = require "flash"
    local c = assert(flash.client { driver = "wal_logical", persistent = true, slot = "bench_flash",
                                    publication = "bench_pub", streaming = true })
    local n = 0
    assert(c:listen { table = "public.bench" }):on("insert", function(ev) local _ = ev.new.b n = n + 1 end)
    local stats
    flash.every(0.5, function() stats = c:stats() end)
    assert(c:run { until_lsn = arg[1] })
    io.stdout:write(n, " ", stats and stats.stream_spilled or 0, "\n")
  ]])
  f:close()
  local big = measure(string.format("env FLASH_DSN='%s' %s -l warn %s %s", sb.dsn, flashlua, script, endpos2))
  local n2 = tonumber(big.out:match("(%d+) %d+%s*$"))
  os.remove(script)
  assert(n2 == opts.single, "streamed run delivered " .. tostring(n2) .. ": " .. big.out)
  db:stop()

  print(string.format("wal_logical benchmark: %d rows (%d transactions x %d rows, 6 columns), callback reads every column",
    total, opts.txs, opts.rows))
  print(string.format("  pg_recvlogical -o proto_version=1: %6.2f s  %9.0f rows/s  cpu %5.2f s  peak RSS %5.1f MB",
    recv.wall, total / recv.wall, recv.cpu, recv.rss_kb / 1024))
  print(string.format("  flashlua wal_logical:              %6.2f s  %9.0f rows/s  cpu %5.2f s  peak RSS %5.1f MB",
    fl.wall, total / fl.wall, fl.cpu, fl.rss_kb / 1024))
  print(string.format("  throughput ratio flashlua / pg_recvlogical: %.2f   (target >= 0.95)", recv.wall / fl.wall))
  print(string.format("  consumer CPU per event: %.2f us            (target <= 3)", fl.cpu / total * 1e6))
  print(string.format("  one %d-row transaction, streaming = true: %.2f s, peak RSS %.1f MB (target < 50)",
    opts.single, big.wall, big.rss_kb / 1024))
end)
sb:stop()
if not ok then io.stderr:write("bench failed: ", tostring(err), "\n") os.exit(1) end
