-- bench/util.lua: what the benchmarks share (loaded with dofile): running a shell command,
-- and running one under GNU time.
local U = {}

function U.sh(cmd)
  local p = io.popen(cmd .. " 2>&1")
  local out = p:read("*a")
  local ok, _, code = p:close()
  return out, (ok == true or ok == 0) and 0 or code
end

-- Runs a command under GNU time: wall s, user+sys s, max RSS kB, its output.
function U.measure(cmd)
  local tf = os.tmpname()
  local out, code = U.sh(string.format("/usr/bin/time -f '%%e %%U %%S %%M' -o %s %s", tf, cmd))
  local f = io.open(tf)
  local line = f and f:read("*l") or ""
  if f then f:close() end
  os.remove(tf)
  local wall, user, sys, rss = line:match("([%d.]+) ([%d.]+) ([%d.]+) (%d+)")
  if not wall then error("command failed (" .. tostring(code) .. "): " .. cmd .. "\n" .. out) end
  return { wall = tonumber(wall), cpu = tonumber(user) + tonumber(sys), rss_kb = tonumber(rss), out = out }
end

return U
