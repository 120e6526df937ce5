-- Packaging: the rockspec builds the module with Debian's luarocks into a local tree, and
-- `make install PREFIX=...` gives a host and module that run outside the source tree.
local H = require "helpers"

local function sh(cmd)
  local p = io.popen(cmd .. " 2>&1; echo \"rc=$?\"")
  local out = p:read("*a")
  p:close()
  local rc = tonumber(out:match("rc=(%d+)%s*$"))
  return rc, out
end

describe("packaging", function()
  local tmp
  before_each(function()
    local p = io.popen("mktemp -d /tmp/flashlua-pkg-XXXXXX")
    tmp = p:read("*l")
    p:close()
  end)
  after_each(function() os.execute("rm -rf " .. H.sh_quote(tmp)) end)

  it("builds with luarocks make into a local tree, and require 'flash' works there", function()
    local rc, out = sh(string.format(
      "cd %s && cp -r src lua flashlua-0.1.0-1.rockspec %s/ && cd %s && " ..
      "luarocks make --lua-version=5.1 --tree=%s/tree LIBPQ_INCDIR=/usr/include/postgresql " ..
      "LUA_INCDIR=/usr/include/luajit-2.1 flashlua-0.1.0-1.rockspec",
      H.sh_quote(H.root), H.sh_quote(tmp), H.sh_quote(tmp), H.sh_quote(tmp)))
    assert.equal(0, rc, out)
    rc, out = sh(string.format(
      "cd / && eval \"$(luarocks --lua-version=5.1 --tree=%s/tree path)\" && LUA_PATH=\"$LUA_PATH\" " ..
      "luajit -e 'local f = require \"flash\"; local c = require \"flash.core\"; " ..
      "print(f.version, f.null == c.null, c.decode(20, \"9007199254740993\"), package.loaded[\"flash.core\"] ~= nil)'",
      H.sh_quote(tmp)))
    assert.equal(0, rc, out)
    assert.matches("0%.1%.0\ttrue\t9007199254740993\ttrue", out)
  end)

  it("the rockspec lists every Lua module and C source of the tree", function()
    local f = assert(io.open(H.root .. "flashlua-0.1.0-1.rockspec"))
    local spec = f:read("*a")
    f:close()
    local missing = {}
    local _, files = sh("cd " .. H.sh_quote(H.root) .. " && ls lua/flash/*.lua lua/flash/*/*.lua src/core/*.c src/pq/*.c " ..
      "src/lua/*.c 2>/dev/null")
    for path in files:gmatch("[^\n]+") do
      if path:find("%.lua$") or path:find("%.c$") then
        if not spec:find('"' .. path .. '"', 1, true) then missing[#missing + 1] = path end
      end
    end
    assert.are.same({}, missing)
  end)

  it("installs with make install PREFIX and the installed host runs a script", function()
    local rc, out = sh(string.format("cd %s && make -s install PREFIX=%s/usr", H.sh_quote(H.root), H.sh_quote(tmp)))
    assert.equal(0, rc, out)
    local script = H.script([[print("version", require("flash").version, #arg, arg[1])]])
    -- The host carries its Lua modules: it runs from anywhere with no LUA_PATH.
    rc, out = sh(string.format("cd / && env -u LUA_PATH -u LUA_CPATH %s/usr/bin/flashlua %s one",
      H.sh_quote(tmp), H.sh_quote(script)))
    os.remove(script)
    assert.equal(0, rc, out)
    assert.matches("version\t0%.1%.0\t1\tone", out)
    rc, out = sh(string.format("ls %s/usr/lib/lua/5.1/flash/core.so %s/usr/share/lua/5.1/flash/init.lua",
      H.sh_quote(tmp), H.sh_quote(tmp)))
    assert.equal(0, rc, out)
  end)

  it("installs the man page (man flashlua), which names every option of --help", function()
    local rc, out = sh(string.format("cd %s && make -s install PREFIX=%s/usr", H.sh_quote(H.root), H.sh_quote(tmp)))
    assert.equal(0, rc, out)
    local page = string.format("%s/usr/share/man/man1/flashlua.1", tmp)
    rc, out = sh("MANWIDTH=200 man -l " .. H.sh_quote(page))
    assert.equal(0, rc, out)
    assert.matches("flashlua %- run Lua scripts on PostgreSQL row changes", out)
    local _, help = sh(H.sh_quote(H.flashlua) .. " --help")
    local missing = {}
    for opt in help:gmatch("%s(%-%-[%w%-]+)") do
      if not out:find(opt, 1, true) then missing[#missing + 1] = opt end
    end
    assert.are.same({}, missing)
  end)
end)
