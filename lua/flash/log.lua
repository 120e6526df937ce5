-- flash.log: levelled logging to stderr, shared by the host and the module; as text lines
-- or, for log shippers, one JSON object per line (flashlua --log-format json).
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

-- The client a line concerns ("client 1 trigger db=app", shown as "[...] "), set by the
-- loop around each client's work (log.within).
local context = nil
local format = "text"

-- Lines are UTF-8 whatever bytes a message quotes (a SQL_ASCII database's values hold any):
-- in JSON a string as flash.json writes one (a byte of no valid UTF-8 sequence as
-- \udc80..\udcff), in text such a byte as \xNN.
local core
local function jstr(s)
  core = core or require "flash.core"
  return core.json_encode(tostring(s))
end
-- A record is one line, or more only by lines that cannot pass for records of their own:
-- names and values quoted in a message come from the database, and a table renamed to
-- "t\n2026-12-01T00:00:00Z ERROR ..." forged a line of its own in the log. So control
-- characters but tab and newline are written as \xNN, and a line after a record's first
-- that begins as a record can (a digit: the time; "flashlua:"; "{": a JSON record; "<": a
-- syslog priority, which journald reads) gets two spaces before it.
local function control(c) return string.format("\\x%02x", c:byte()) end
local function continued(line)
  if line:find("^[%d{<]") or line:find("^flashlua:") then return "\n  " .. line end
  return "\n" .. line
end
local function text_escape(s)
  core = core or require "flash.core"
  s = core.text_escape(s)
  if s:find("[%z\1-\31\127]") then
    s = s:gsub("[%z\1-\8\11-\31\127]", control):gsub("\n([^\n]*)", continued)
  end
  return s
end

local function jnum(v)
  if v ~= v or v == math.huge or v == -math.huge then return "null" end
  if v == math.floor(v) and math.abs(v) < 2^53 then return string.format("%d", v) end
  return string.format("%.17g", v)
end

-- One JSON object: ts (UTC, milliseconds), level, msg, then client and db when the line
-- is about a client, then `fields` ({ {key, value}, ... }: numbers, strings, booleans).
local function json_line(name, msg, fields)
  core = core or require "flash.core"
  local now = core.time()
  local parts = {
    '{"ts":' .. jstr(os.date("!%Y-%m-%dT%H:%M:%S", math.floor(now)) .. string.format(".%03dZ", math.floor(now % 1 * 1000))),
    '"level":' .. jstr(name), '"msg":' .. jstr(msg),
  }
  if context then
    local client, db = context:match("^(.*) db=(.*)$")
    parts[#parts + 1] = '"client":' .. jstr(client or context)
    if db then parts[#parts + 1] = '"db":' .. jstr(db) end
  end
  for _, f in ipairs(fields or {}) do
    local v = f[2]
    local enc = type(v) == "number" and jnum(v) or type(v) == "boolean" and tostring(v) or jstr(v)
    parts[#parts + 1] = jstr(f[1]) .. ":" .. enc
  end
  return table.concat(parts, ",") .. "}"
end

local function emit(name, ...)
  if LEVELS[name] > current then return end
  if format == "json" then
    sink(json_line(name, stringify(...)))
  else
    sink(text_escape(string.format("%s %-5s %s%s", os.date("!%Y-%m-%dT%H:%M:%SZ"), name:upper(),
      context and ("[" .. context .. "] ") or "", stringify(...))))
  end
end

-- A line with named values (the --stats line): in JSON an object with msg `msg` and each
-- value a field; in text, `text` as it is. Logged at level `name`; `force` logs it whatever
-- the level (a fatal error).
function log.record(name, text, msg, fields, force)
  if LEVELS[name] > current and not force then return end
  if format == "json" then return sink(json_line(name, msg, fields)) end
  sink(text_escape(text))
end

-- Lines logged until the next call are about `label` (nil: no client); returns the
-- previous label, to put back.
function log.within(label)
  local old = context
  context = label
  return old
end

-- "text" (default) or "json": one JSON object per line with ts, level, msg, client, db.
function log.set_format(name)
  if name ~= "text" and name ~= "json" then
    return nil, string.format("unknown log format '%s' (expected text or json)", tostring(name))
  end
  format = name
  return true
end
function log.format() return format end

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

-- Where flashlua's own Lua frames say they are: `[string "flash.x"]` for the modules
-- compiled into the host, the directory of lua/flash/ for the module installed as files.
local own_dir = (debug.getinfo(1, "S").short_src or ""):match("^(.*/)log%.lua$")

local function own_frame(line)
  if line:find('^\t%[string "flash[%w_%.]*"%]:') then return true end
  return own_dir ~= nil and line:sub(2, #own_dir + 1) == own_dir
end

-- The traceback of a failure in the script's own code (a callback, a timer, a hook, an
-- on_error function, a handler state's function): an xpcall handler passes it
-- debug.traceback(msg, 1) taken in itself (level 2 would leave out the frame that raised
-- a runtime error such as indexing nil). It is cut at the xpcall that called the script's
-- function, and flashlua's own frames above it (the handler itself, an API function that
-- raised) are left out: they say nothing to the script's author.
function log.script_traceback(tb)
  local cut = tb:find("\n\t%[C%]: in function 'xpcall'")
  if cut then tb = tb:sub(1, cut - 1) end
  local msg, frames = tb:match("^(.-)\nstack traceback:\n(.*)$")
  if not msg then return tb end
  local keep = {}
  for line in frames:gmatch("[^\n]+") do
    if not own_frame(line) then keep[#keep + 1] = line end
  end
  if #keep == 0 then return msg end
  return msg .. "\nstack traceback:\n" .. table.concat(keep, "\n")
end

-- flash.log.level = "debug" works as well as set_level.
-- A bad level is the script's error, at its line.
return setmetatable(log, {
  __index = function(_, k)
    if k == "level" then
      for name, n in pairs(LEVELS) do if n == current then return name end end
    end
  end,
  __newindex = function(t, k, v)
    if k == "level" then
      local ok, err = log.set_level(v)
      if not ok then error(err, 2) end
    else
      rawset(t, k, v)
    end
  end,
})
