-- spec/handover_child.lua: run by spec/68 as `flashlua handover_child.lua TABLE [wait]`:
-- listens (wal_logical, temporary slot) to inserts into TABLE (id int, v bytea) and prints
-- what a user would see: "ready", "row <id> <bytes of v>" per event, and, after the row
-- whose v is 'end', "rss <baseline MB> <peak MB> <MB now>" once the memory has come back
-- near the baseline (or after `wait` seconds, default 30), and "stats <slot> <last_lsn>
-- <commit LSN of the 'end' row>".
local flash = require "flash"
local tbl, wait = arg[1], tonumber(arg[2] or 30)

local mem = dofile((arg[0]:match("^(.*/)") or "") .. "child_mem.lua")

io.stdout:setvbuf("no")
local c = assert(flash.client { driver = "wal_logical" })
local ended, end_lsn
assert(c:listen { table = tbl }):on("insert", function(ev)
  local v = ev.new.v
  print(string.format("row %d %d", ev.new.id, #v))
  if v == "end" then ended, end_lsn = true, ev.lsn end
end)
assert(c:start())
collectgarbage()
local _, base = mem()
print("ready")
local waited = 0
flash.every(0.1, function()
  if not ended then return end
  waited = waited + 0.1
  local peak, rss = mem()
  if rss < base + 16 or waited >= wait then
    print(string.format("rss %.0f %.0f %.0f", base, peak, rss))
    local st = c:stats()
    print(string.format("stats %s %s %s", st.slot, st.last_lsn, end_lsn))
    flash.stop()
  end
end)
