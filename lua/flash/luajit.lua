-- flash.luajit: what flashlua needs of the LuaJIT it runs on, settled in every Lua state it
-- uses (required first by flash, flash.cli and flash.workers).
--
-- LuaJIT before commit c42c62e7 (2023-12-23, LuaJIT issue #994) -- 2.0.5, 2.1.0-beta3 and
-- the distributions' snapshots of those years, Debian 12's 2.1.0~beta3+git20220320 among
-- them -- miscompiles a loop that builds a table from a constant constructor and reads it
-- again: in the trace's copy of the loop body a load from the new table is forwarded from
-- the constructor with the type the first pass recorded, not with the constructor's value.
-- `for _, op in ipairs({ "insert", "update", "delete" })` inside another loop then stops
-- after "insert". Whether a given loop is compiled that way depends on which traces the
-- JIT happens to form (hot counters are shared by bytecode addresses), so it struck after
-- a process had run for a while, and not in every process: the trigger drivers' list of
-- wanted triggers lost the update and delete triggers of some partitions, the next look
-- for new partitions dropped them, and trigger_statement silently missed the deletes of a
-- sub-partition named by a writable CTE (spec/70 [partition-move], spec/80). Any loop of a
-- script can compute wrong results the same way.
--
-- On such a LuaJIT, loop optimization is turned off for the Lua state -- jit.opt "-loop":
-- the JIT then compiles a loop's body once, with no copy of it, so no load in a copy is
-- forwarded from the constructor of the pass before; every other optimization stays --
-- and traces compiled before are thrown away. Until December 2026 load forwarding itself
-- was turned off ("-fwd"), which also avoids the fault, but allocation sinking works only
-- with it (lj_opt_sink): every temporary table and FFI box of a compiled loop was then
-- allocated and collected, and a backfill's client spent 60-70% more CPU per row than with
-- the optimization on (300,000 rows: 0.81-0.98 s against 0.48-0.54 s); with "-loop" it
-- spends 0.54-0.59 s. Which LuaJIT has the fix is told by its version: a release after
-- 2.1.0-beta3 is named 2.x.<commit time>; a later one keeps its settings.
local M = {}

local FIXED_AT = 1703355272   -- commit time of LuaJIT's c42c62e7

-- Whether LuaJIT version string `v` ("LuaJIT 2.1.1703358377") has the fix.
function M.fixed(v)
  local major, minor, rel = (v or ""):match("^LuaJIT (%d+)%.(%d+)%.(%d+)$")
  major, minor, rel = tonumber(major), tonumber(minor), tonumber(rel)
  if not major then return false end
  if major ~= 2 then return major > 2 end
  return minor > 1 or rel >= FIXED_AT
end

local ok, jit = pcall(require, "jit")
if ok and type(jit) == "table" and jit.status and not M.fixed(jit.version) then
  jit.opt.start("-loop")
  jit.flush()
end

-- The other one: pairs() loops compiled wrong (flash.jitfix), applied from here too, so
-- that one require at the top of flash, flash.cli and flash.workers takes both.
require "flash.jitfix"

return M
