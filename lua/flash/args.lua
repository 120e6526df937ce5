-- flash.args: misuse of the API raises "bad argument #n to 'f' (...)", as luaL_argerror
-- does. `level` counts as error()'s does, from the function that calls argerror.
local M = {}

function M.argerror(n, fname, msg, level)
  error(string.format("bad argument #%d to '%s' (%s)", n, fname, msg), (level or 2) + 1)
end

function M.checktype(v, want, n, fname, what)
  if type(v) ~= want then
    M.argerror(n, fname, string.format("%s%s expected, got %s", what and (what .. ": ") or "", want, type(v)), 2)
  end
end

-- Edit distance of two short strings, a swap of two neighbours counting as one edit
-- (feilds, dns).
function M.distance(a, b)
  local d = {}
  for i = 0, #a do d[i] = { [0] = i } end
  for j = 0, #b do d[0][j] = j end
  for i = 1, #a do
    for j = 1, #b do
      local cost = a:byte(i) == b:byte(j) and 0 or 1
      d[i][j] = math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
      if i > 1 and j > 1 and a:byte(i) == b:byte(j - 1) and a:byte(i - 1) == b:byte(j) then
        d[i][j] = math.min(d[i][j], d[i - 2][j - 2] + 1)
      end
    end
  end
  return d[#a][#b]
end

-- The name of `known` (a set: name -> anything) that `name` was probably meant to be, or
-- nil: the nearest by M.distance within a third of its length (ties: byte order).
function M.nearest(name, known)
  name = tostring(name)
  local best, bestd
  for k in pairs(known) do
    if type(k) == "string" then
      local d = M.distance(name, k)
      if not bestd or d < bestd or (d == bestd and k < best) then best, bestd = k, d end
    end
  end
  if bestd and bestd <= math.max(1, math.floor(#name / 3)) then return best end
end

-- "unknown option 'x'", and the option it was probably meant to be.
function M.unknown_option(name, known)
  local near = M.nearest(name, known)
  return string.format("unknown option '%s'%s", tostring(name), near and (" (did you mean '" .. near .. "'?)") or "")
end

return M
