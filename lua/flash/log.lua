-- flash.log: levelled logging to stderr, shared by the host and the module.
local log = {}

local LEVELS = { error = 1, warn = 2, info = 3, debug = 4, trace = 5 }
log.LEVELS = LEVELS

local current = LEVELS.info
local sink = function(line) io.stderr:write(line, "\n") end

local function stringify(...)
  local n = select("#", ...)
  local parts = {}
  for i = 1, n do parts[i] = tostring((select(i, ...))) end
  return table.concat(parts, " ")
end

-- The client a line concerns ("[client 1 trigger db=app] "), set by the loop around each
-- client's work (log.within).
local context = ""

local function emit(name, ...)
  if LEVELS[name] > current then return end
  sink(string.format("%s %-5s %s%s", os.date("!%Y-%m-%dT%H:%M:%SZ"), name:upper(), context, stringify(...)))
end

-- Lines logged until the next call are about `label` (nil: no client); returns the
-- previous label, to put back.
function log.within(label)
  local old = context
  context = label and ("[" .. label .. "] ") or ""
  return old ~= "" and old:sub(2, -3) or nil
end

for name in pairs(LEVELS) do
  log[name] = function(...) emit(name, ...) end
end

function log.enabled(name) return LEVELS[name] <= current end

-- Replaces where lines go (tests capture them); returns the previous sink.
function log.set_sink(fn)
  local old = sink
  sink = fn
  return old
end

function log.set_level(name)
  local n = LEVELS[tostring(name):lower()]
  if not n then
    return nil, string.format("unknown log level '%s' (expected error, warn, info, debug or trace)", tostring(name))
  end
  current = n
  return true
end

-- flash.log.level = "debug" works as well as set_level.
return setmetatable(log, {
  __index = function(_, k)
    if k == "level" then
      for name, n in pairs(LEVELS) do if n == current then return name end end
    end
  end,
  __newindex = function(t, k, v)
    if k == "level" then
      assert(log.set_level(v))
    else
      rawset(t, k, v)
    end
  end,
})
