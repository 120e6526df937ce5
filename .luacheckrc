-- luacheck (Debian package lua-check), run by `make lint` and `make test` over the Lua of
-- the project. LuaJIT's globals; busted's in the specs.
std = "luajit"
max_line_length = 160
files["spec/"] = { std = "+busted" }
files["bench/"] = { globals = { "arg" } }
files["examples/"] = { globals = { "arg" } }
