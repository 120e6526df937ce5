-- flash.json: JSON that gives back what flashlua decoded. The codec is in C (lvalue.c,
-- fl_json.c); this file names it and gives exact numbers their behaviour.
--
-- Markers (metatables) say what a Lua table cannot: flash.array_mt on SQL arrays and JSON
-- arrays (an empty one stays []), flash.object_mt on JSON objects, flash.number_mt on a
-- JSON number that no double prints back as ({ text = "12345678901234567890" }).
local core = require "flash.core"

local M = {
  null = core.null,
  array_mt = core.array_mt,
  object_mt = core.object_mt,
  number_mt = core.number_mt,
}

-- json.encode(value [, { unchanged = "..." }]) -> text. Marked tables are what their marker
-- says; an unmarked table is an array when its keys are 1..n, else an object ({} is {}).
-- Doubles in their shortest round-trip form, exact numbers as their text, NaN/±Infinity as
-- the strings "NaN"/"Infinity"/"-Infinity" (as PostgreSQL's to_json), flash.null as null.
-- Raises on functions, userdata, cycles, and on flash.unchanged unless `unchanged` says
-- which string it becomes.
M.encode = core.json_encode

-- json.decode(text) -> value | nil, err  (lua-cjson's shape: the binding's third value,
-- its kind "parse", is not part of this API)
function M.decode(text)
  local v, err = core.json_decode(text)
  if v == nil then return nil, err end
  return v
end

function M.array(t)
  if t ~= nil and type(t) ~= "table" then
    error("bad argument #1 to 'array' (table expected, got " .. type(t) .. ")", 2)
  end
  return setmetatable(t or {}, M.array_mt)
end

function M.object(t)
  if t ~= nil and type(t) ~= "table" then
    error("bad argument #1 to 'object' (table expected, got " .. type(t) .. ")", 2)
  end
  return setmetatable(t or {}, M.object_mt)
end

-- json.number("12345678901234567890") -> an exact number (the JSON text is kept, even
-- where a double would hold it).
function M.number(text)
  local v = type(text) == "string" and text:find("^[-%d]") and core.json_decode(text)
  if type(v) ~= "number" and getmetatable(v) ~= M.number_mt then
    error("bad argument #1 to 'number' (JSON number text expected, got " .. tostring(text) .. ")", 2)
  end
  return setmetatable({ text = text }, M.number_mt)
end

-- Exact numbers --------------------------------------------------------------------------

local number_mt = M.number_mt

-- sign (-1, 0, 1), significant digits (no leading or trailing zeros), power of ten of
-- the leading digit.
local function decimal(text)
  local sign, int, frac, exp = text:match("^(%-?)(%d+)%.?(%d*)[eE]?([-+]?%d*)$")
  if not sign then return nil end
  local digits = int .. frac
  local lead = digits:find("[1-9]")
  if not lead then return 0, "", 0 end
  local last = #digits - #digits:match("0*$")
  local e = (tonumber(exp) or 0) + #int - lead
  return sign == "-" and -1 or 1, digits:sub(lead, last), e
end

-- A value as a decimal: exact numbers by their text, Lua numbers by their shortest form.
local function as_decimal(v)
  if getmetatable(v) == number_mt then return decimal(v.text) end
  if type(v) == "number" and v == v and v ~= math.huge and v ~= -math.huge then
    return decimal(core.json_encode(v))
  end
  return nil
end

-- -1, 0, 1 comparing the values exactly; nil when either is not a finite number.
local function compare(a, b)
  local sa, da, ea = as_decimal(a)
  local sb, db, eb = as_decimal(b)
  if not sa or not sb then return nil end
  if sa ~= sb then return sa < sb and -1 or 1 end
  if sa == 0 then return 0 end
  local c
  if ea ~= eb then
    c = ea < eb and -1 or 1
  else
    local n = math.max(#da, #db)
    local pa, pb = da .. string.rep("0", n - #da), db .. string.rep("0", n - #db)
    c = pa == pb and 0 or (pa < pb and -1 or 1)
  end
  return c * sa
end

local function tonum(v)
  if getmetatable(v) == number_mt then return tonumber(v.text) end
  return v
end

number_mt.__tostring = function(v) return v.text end
number_mt.__concat = function(a, b)
  return (getmetatable(a) == number_mt and a.text or a) .. (getmetatable(b) == number_mt and b.text or b)
end
-- Lua compares two tables only; with a Lua number, compare v:tonumber() (inexact) or
-- flash.json.number(...) values.
number_mt.__eq = function(a, b) return compare(a, b) == 0 end
number_mt.__lt = function(a, b)
  local c = compare(a, b)
  if c == nil then error("attempt to compare an exact number with " .. type(b), 2) end
  return c < 0
end
number_mt.__le = function(a, b)
  local c = compare(a, b)
  if c == nil then error("attempt to compare an exact number with " .. type(b), 2) end
  return c <= 0
end
-- Arithmetic is in doubles (the nearest double of each exact number).
number_mt.__add = function(a, b) return tonum(a) + tonum(b) end
number_mt.__sub = function(a, b) return tonum(a) - tonum(b) end
number_mt.__mul = function(a, b) return tonum(a) * tonum(b) end
number_mt.__div = function(a, b) return tonum(a) / tonum(b) end
number_mt.__mod = function(a, b) return tonum(a) % tonum(b) end
number_mt.__pow = function(a, b) return tonum(a) ^ tonum(b) end
number_mt.__unm = function(a) return -tonum(a) end
number_mt.__index = {
  -- v:tonumber() -> the nearest double (inexact by definition).
  tonumber = function(v) return tonumber(v.text) end,
}

return M
