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

return M
