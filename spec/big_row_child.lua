-- spec/big_row_child.lua: run by the big-row specs (61, 82) as `flashlua big_row_child.lua
-- DRIVER TABLE [persistent slot]`: listens to TABLE, checks the 100 MB bytea of the row
-- the spec inserts against the pattern it was made of, and prints what a user would see:
-- "ready", "event <length> <intact>", then "rss <baseline MB> <peak MB> <MB after>" once the
-- memory has come back near the baseline (or after 20 s).
local flash = require "flash"
local driver, tbl, slot = arg[1], arg[2], arg[3]

local mem = dofile((arg[0]:match("^(.*/)") or "") .. "child_mem.lua")

local c = assert(flash.client { driver = driver, persistent = slot and true or nil, slot = slot, publication = slot })
local got
assert(c:listen { table = tbl }):on("insert", function(ev)
  local v, chunk, intact = ev.new.v, string.rep("flashlua", 131072), true
  for i = 1, #v, #chunk do
    if v:sub(i, i + #chunk - 1) ~= chunk:sub(1, math.min(#chunk, #v - i + 1)) then intact = false break end
  end
  got = string.format("event %d %s", #v, tostring(intact))
end)
assert(c:start())
collectgarbage()
local _, base = mem()
io.stdout:setvbuf("no")
print("ready")
local waited = 0
flash.every(0.1, function()
  if not got then return end
  if waited == 0 then print(got) end
  waited = waited + 1
  local peak, rss = mem()
  if rss < base + 64 or waited >= 200 then
    print(string.format("rss %.0f %.0f %.0f", base, peak, rss))
    flash.stop()
  end
end)
