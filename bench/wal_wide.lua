-- bench/wal_wide.lua: wal_logical on a wide table (30 columns), a listener with two fields
-- against one with every column: the consumer's CPU per event shows what the column mask
-- (lrepl converts only the columns some listener wants) saves. One throwaway cluster; each
-- run replays the same inserts from its own slot, runs alternate, the best of --repeat kept.
-- --compare another/flashlua: the same runs with that binary too, alternating (before/after).
--   luajit bench/wal_wide.lua [--rows-per-tx 100] [--txs 2000] [--repeat 3] [--flashlua build/flashlua]
--                             [--compare path]
local sandbox = require "flash.sandbox"
local flash = require "flash"

local root = debug.getinfo(1, "S").source:match("^@(.*)bench/wal_wide%.lua$") or "./"
local opts = { rows = 100, txs = 2000, ["repeat"] = 3, flashlua = root .. "build/flashlua" }
for i = 1, #arg, 2 do
  local k, v = arg[i]:gsub("^%-%-", ""), arg[i + 1]
  if k == "rows-per-tx" then opts.rows = tonumber(v)
  elseif k == "flashlua" or k == "compare" then opts[k] = v
  else opts[k] = tonumber(v) end
end

local util = dofile(root .. "bench/util.lua")
local measure = util.measure

-- id, then 29 columns cycling over int, text, timestamptz, numeric, boolean.
local KINDS = {
  { "int", "g %% 1000 + %d" },
  { "text", "'value ' || g || ' of column %d'" },
  { "timestamptz", "'2026-01-01'::timestamptz + (g + %d) * interval '1 s'" },
  { "numeric", "(g + %d) / 7.0" },
  { "boolean", "(g + %d) %% 2 = 0" },
}
local defs, exprs = { "id bigint PRIMARY KEY" }, { "g" }
for i = 1, 29 do
  local k = KINDS[(i - 1) % #KINDS + 1]
  defs[#defs + 1] = string.format("c%d %s", i, k[1])
  exprs[#exprs + 1] = string.format(k[2], i)
end

local MODES = {
  { name = "fields = { id, c1 }", listen = [[{ table = "public.wide", fields = { "id", "c1" } }]] },
  { name = "every column       ", listen = [[{ table = "public.wide" }]] },
}

io.stderr:write("starting a throwaway PostgreSQL...\n")
local sb = assert(sandbox.start { quiet = true, settings = { max_wal_size = "4GB", checkpoint_timeout = "30min" } })
local ok, err = pcall(function()
  local db = assert(flash.client { dsn = sb.dsn })
  local function q(sql, ...) return assert(db:query(sql, ...)) end
  q("CREATE TABLE wide (" .. table.concat(defs, ", ") .. ")")
  q("ALTER TABLE wide REPLICA IDENTITY FULL")
  q("CREATE PUBLICATION wide_pub FOR TABLE wide WITH (publish = 'insert')")
  local bins = { opts.flashlua, opts.compare }
  local slots = {}
  for r = 1, opts["repeat"] do
    for b = 1, #bins do
      for m = 1, #MODES do
        local name = string.format("wide_%d_%d_%d", b, m, r)
        q("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", name)
        slots[#slots + 1] = { bin = b, mode = m, slot = name }
      end
    end
  end
  local total = opts.rows * opts.txs
  io.stderr:write(string.format("writing %d rows of 30 columns in %d transactions...\n", total, opts.txs))
  for t = 0, opts.txs - 1 do
    q(string.format("INSERT INTO wide SELECT %s FROM generate_series(%d::bigint, %d) g", table.concat(exprs, ", "),
      t * opts.rows + 1, (t + 1) * opts.rows))
  end
  local endpos = q("SELECT pg_current_wal_lsn()::text AS l")[1].l

  local script = os.tmpname() .. ".lua"
  local best = {}
  for _, s in ipairs(slots) do
    local f = assert(io.open(script, "w"))
    f:write(string.format([[
      local flash = require "flash"
      local c = assert(flash.client { driver = "wal_logical", persistent = true, slot = %q, publication = "wide_pub" })
      local n, sum = 0, 0
      assert(c:listen %s):on("insert", function(ev)
        sum = sum + ev.new.c1
        n = n + 1
      end)
      assert(c:run { until_lsn = arg[1] })
      io.stdout:write(n, "\n")
    ]], s.slot, MODES[s.mode].listen))
    f:close()
    io.stderr:write(string.format("%s %s (%s)...\n", bins[s.bin], MODES[s.mode].name, s.slot))
    local r = measure(string.format("env FLASH_DSN='%s' %s -l warn %s %s", sb.dsn, bins[s.bin], script, endpos))
    local delivered = tonumber(r.out:match("(%d+)%s*$"))
    assert(delivered == total, "flashlua delivered " .. tostring(delivered) .. " of " .. total .. ": " .. r.out)
    local k = s.bin .. ":" .. s.mode
    if not best[k] or r.cpu < best[k].cpu then best[k] = r end
  end
  os.remove(script)
  db:stop()

  print(string.format("wal_logical, wide table: %d rows (%d transactions x %d rows, 30 columns), best of %d",
    total, opts.txs, opts.rows, opts["repeat"]))
  for b, bin in ipairs(bins) do
    print("  " .. bin)
    for m, mode in ipairs(MODES) do
      local r = best[b .. ":" .. m]
      print(string.format("    %s  %6.2f s  %9.0f rows/s  cpu %5.2f s  %6.2f us/event  peak RSS %5.1f MB", mode.name,
        r.wall, total / r.wall, r.cpu, r.cpu / total * 1e6, r.rss_kb / 1024))
    end
  end
end)
sb:stop()
if not ok then io.stderr:write("bench failed: ", tostring(err), "\n") os.exit(1) end
