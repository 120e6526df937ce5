-- flash.jitfix: keeps `for k, v in pairs(t)` loops off a LuaJIT JIT bug that makes them
-- skip a table's entries or see a stale key. Loaded first by flash (init.lua), the host
-- (cli.lua) and the worker states (workers.lua); it changes nothing on a LuaJIT without
-- the bug.
--
-- The bug: LuaJIT 2.1 compiles pairs()/next() loops (BC_ITERN) since 2021-09-19 (commit
-- bb0f2410); until 2022-09-14 (commit dad04f17, "Fix trace join to BC_JLOOP originating
-- from BC_ITERN") a side trace that reached such a compiled loop was joined to it as to an
-- ordinary loop, skipping the ITERN. The loop then ran on whatever its hidden key slot
-- held: no iteration at all (a full table looks empty: next(t) == nil inside the loop), or
-- one with a stale key (a string the code had stored earlier). It takes a side trace that
-- runs into the loop -- a callback iterating ev.new right after a branch on a value, say:
-- the backfill's rows built by compiled Lua (flash.backfill's FFI reader) make one of every
-- few tens of thousands of reads look empty to such a callback (spec/64). Every LuaJIT 2.1
-- of that window says "LuaJIT 2.1.0-beta3" (as do the 2.1 snapshots before and after it,
-- until the rolling releases of August 2023, "LuaJIT 2.1.<time>"); Debian 12's
-- libluajit-5.1-2 (2.1.0~beta3+git20220320) is one.
--
-- The workaround, on such a LuaJIT: the global pairs() gives a Lua function in place of the
-- built-in next (and the global next is that function). A loop whose iterator is not the
-- built-in next is turned into a generic one (BC_ITERC) the first time it runs, before any
-- ITERN, so no loop of the process reaches the bug; the same entries come out in the same
-- order. It costs about 20 ns per loop over a row of 6 columns. A loop over a `next` saved
-- before this ran (local next = next in code loaded earlier) is not covered.
local M = { applied = false }

local function affected()
  return type(jit) == "table" and jit.version == "LuaJIT 2.1.0-beta3"
end

function M.apply()
  if M.applied or not affected() then return M.applied end
  local builtin_next = next
  -- Tail calls: an error (bad argument, invalid key) is the built-in's, at the caller's line.
  local function lua_next(t, k) return builtin_next(t, k) end
  local builtin_pairs = pairs
  local function lua_pairs(t)
    if type(t) ~= "table" then return builtin_pairs(t) end
    local f, s, c = builtin_pairs(t)
    if f == builtin_next then f = lua_next end
    return f, s, c
  end
  rawset(_G, "next", lua_next)
  rawset(_G, "pairs", lua_pairs)
  M.applied = true
  return true
end

M.apply()
return M
