-- spec/child_mem.lua: loaded by the child scripts the memory specs run (big_row_child.lua,
-- handover_child.lua): returns mem() -> peak MB, resident MB of this process.
return function()
  local f = assert(io.open("/proc/self/status"))
  local s = f:read("*a")
  f:close()
  return tonumber(s:match("VmHWM:%s*(%d+)")) / 1024, tonumber(s:match("VmRSS:%s*(%d+)")) / 1024
end
