-- flash.compare: decoded column values compared as PostgreSQL compares them, for the
-- conditions evaluated on arrival (flash.where): numbers and numeric/bigint texts exactly,
-- times and intervals by their canonical text, text bytewise where the collation allows.
local core = require "flash.core"

local null = core.null
local M = {}

-- How a column's values compare in Lua, by base type OID. Only types whose decoded values
-- order (and are equal) exactly as PostgreSQL orders them are listed; a condition on any
-- other type is refused at listen, since its result here could differ from SQL's.
local KIND = {
  [20] = "num", [21] = "num", [23] = "num", [26] = "num", [700] = "num", [701] = "num", [1700] = "num",
  [16] = "bool",
  [1082] = "time", [1114] = "time", [1184] = "time", [1186] = "interval",
  -- canonical text (or raw bytes) in byte order is value order
  [2950] = "bytes", [1083] = "bytes", [17] = "bytes", [18] = "bytes", [19] = "bytes",
  -- text: byte order only under a C-like collation; equality under any deterministic one
  [25] = "text", [1043] = "text", [1042] = "text",
  -- one canonical text per value, but no byte order
  [869] = "eq", [650] = "eq", [829] = "eq", [774] = "eq", [1266] = "eq",
}
local BYTE_ORDER_COLLATIONS = { C = true, POSIX = true, ["C.UTF-8"] = true, ["C.utf8"] = true, ucs_basic = true }

-- A number, "NaN", "Infinity" or a decimal string as (class, value): NaN sorts above
-- +Infinity and equals itself, as in PostgreSQL.
local function numclass(x)
  if type(x) == "number" then
    if x ~= x then return 3 end
    if x == math.huge then return 2 end
    if x == -math.huge then return 0 end
    return 1, x
  end
  if x == "NaN" then return 3 end
  if x == "Infinity" then return 2 end
  if x == "-Infinity" then return 0 end
  return 1, x
end

-- Sign, integer digits and fraction digits of a plain decimal, normalized; nil if not one.
local function decimal(s)
  if type(s) == "number" then
    if s ~= math.floor(s) or math.abs(s) >= 2^63 then return nil end
    s = string.format("%d", s)
  end
  local sign, int, frac = s:match("^([-+]?)(%d*)%.?(%d*)$")
  if not sign or (int == "" and frac == "") then return nil end
  int, frac = int:gsub("^0+", ""), frac:gsub("0+$", "")
  if int == "" and frac == "" then sign = "" end
  return sign == "-" and -1 or 1, int, frac
end

-- Exact comparison of two numbers or numeric/bigint texts: doubles first (rounding keeps
-- order, so different doubles decide), then digit by digit when the doubles are equal
-- (bigints past 2^53, long numerics).
local function numcmp(a, b)
  local ca, va = numclass(a)
  local cb, vb = numclass(b)
  if ca ~= cb then return ca < cb and -1 or 1 end
  if ca ~= 1 then return 0 end
  local da, db = tonumber(va), tonumber(vb)
  if da ~= db then return da < db and -1 or 1 end
  local sa, ia, fa = decimal(va)
  local sb, ib, fb = decimal(vb)
  if not sa or not sb then return 0 end
  if sa ~= sb then return sa < sb and -1 or 1 end
  local r
  if #ia ~= #ib then r = #ia < #ib and -1 or 1
  elseif ia ~= ib then r = ia < ib and -1 or 1
  elseif fa ~= fb then r = fa < fb and -1 or 1   -- trailing zeros are stripped: prefix sorts first
  else return 0 end
  return r * sa
end
M.numcmp = numcmp

-- A date/timestamp/timestamptz canonical text (ISO, UTC) as (class, astronomical year,
-- rest): years past 9999 and BC, and ±infinity, order as PostgreSQL orders them; the rest
-- ("-MM-DD HH:MM:SS[.ffffff]") is fixed-width up to the fraction, so text order is time
-- order once the constant "+00" offset is gone.
local function timekey(s)
  if s == "infinity" then return 2 end
  if s == "-infinity" then return 0 end
  local bc = s:sub(-3) == " BC"
  if bc then s = s:sub(1, -4) end
  local y, rest = s:match("^(%d+)(%-.*)$")
  if not y then return 1, 0, s end
  rest = rest:gsub("(:%d%d[%.%d]*)[+-][%d:]+$", "%1")
  y = tonumber(y)
  return 1, bc and (1 - y) or y, rest
end

local function timecmp(a, b)
  local ca, ya, ra = timekey(a)
  local cb, yb, rb = timekey(b)
  if ca ~= cb then return ca < cb and -1 or 1 end
  if ca ~= 1 then return 0 end
  if ya ~= yb then return ya < yb and -1 or 1 end
  if ra == rb then return 0 end
  return ra < rb and -1 or 1
end

-- An interval's canonical text (IntervalStyle postgres: "1 year 2 mons -3 days +04:05:06.7")
-- as PostgreSQL compares it: months count 30 days, days 24 hours (interval_cmp_value). The
-- key is (whole days, microseconds into the day), both exact in doubles.
local DAY_US = 86400000000
local function intervalkey(s)
  local d = 0
  for n, unit in s:gmatch("([+-]?%d+) (%a+)") do
    n = tonumber(n)
    if unit:find("^year") then d = d + 360 * n
    elseif unit:find("^mon") then d = d + 30 * n
    elseif unit:find("^day") then d = d + n end
  end
  local us = 0
  local sign, h, m, sec, frac = s:match("([+-]?)(%d+):(%d%d):(%d%d)%.?(%d*)$")
  if h then
    h = tonumber(h)
    local hd = math.floor(h / 24)
    us = ((h - 24 * hd) * 3600 + tonumber(m) * 60 + tonumber(sec)) * 1e6 +
      (frac ~= "" and tonumber((frac .. "000000"):sub(1, 6)) or 0)
    if sign == "-" then hd, us = -hd, -us end
    d = d + hd
  end
  if us < 0 then d, us = d - 1, us + DAY_US end
  return d, us
end

local function intervalcmp(a, b)
  local da, ua = intervalkey(a)
  local db, ub = intervalkey(b)
  if da ~= db then return da < db and -1 or 1 end
  if ua == ub then return 0 end
  return ua < ub and -1 or 1
end
M.intervalcmp = intervalcmp

local function bpchar(s) return (s:gsub(" +$", "")) end

-- Compares a decoded column value with a prepared condition value as SQL would: -1, 0,
-- 1, or nil when the column is NULL.
local function compare(v, c, kind, oid)
  if v == null or v == nil then return nil end
  if kind == "num" then return numcmp(v, c) end
  if kind == "bool" then
    if v == c then return 0 end
    return v and 1 or -1
  end
  if kind == "time" then return timecmp(v, c) end
  if kind == "interval" then return intervalcmp(v, c) end
  if oid == 1042 then v, c = bpchar(v), bpchar(c) end
  if v == c then return 0 end
  return v < c and -1 or 1
end

local TESTS = {
  ["="] = function(r) return r == 0 end,
  ["<>"] = function(r) return r ~= 0 end,
  ["<"] = function(r) return r < 0 end,
  ["<="] = function(r) return r <= 0 end,
  [">"] = function(r) return r > 0 end,
  [">="] = function(r) return r >= 0 end,
}
M.TESTS = TESTS
M.compare = compare

local function is_byte_order(coll)
  local provider, name = coll:match("^(%a*):(.*)$")
  return provider == "c" and BYTE_ORDER_COLLATIONS[name] or name == "ucs_basic"
end

-- How column `col`'s values compare here under operator `op`: a kind for compare(), or nil
-- and why Lua cannot give SQL's answer. info: the column's type name (tname), typtype, and
-- collation ("provider:name", "" for none; det: deterministic).
function M.kind(col, op, info)
  local kind = KIND[col.oid] or (info.typtype == "e" and "eq") or nil
  local ordering = op ~= "=" and op ~= "<>" and op ~= "in"
  if not kind or col.elem ~= 0 then
    return nil, "values of type " .. info.tname .. " cannot be compared on arrival"
  elseif ordering and kind == "eq" then
    return nil, "values of type " .. info.tname .. " have no order that Lua can reproduce"
  elseif kind == "text" and ordering and not is_byte_order(info.coll) then
    return nil, "the column's collation (" .. info.coll .. ") does not order text bytewise"
  elseif kind == "text" and not info.det then
    return nil, "the column's collation is nondeterministic"
  end
  return kind
end

return M
