-- flash.filter: a listener's conditions, partial fields and primary key applied on arrival,
-- for drivers that receive whole rows (wal_logical). Gives the events the trigger driver's
-- SQL gives: the soft-delete transitions, "no listened field changed" and key changes.
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

-- The text a condition value is written as in SQL, here and in the trigger drivers'
-- literals (flash.driver.base), so both read the same value. A number is its shortest
-- text that reads back as the same double: 0.1 is "0.1", which a numeric column holding
-- 0.1 equals (0.10000000000000001 would not).
local function literal_text(v)
  local t = type(v)
  if t == "boolean" then return v and "true" or "false" end
  if t == "number" then
    if v ~= v then return "NaN" end
    if v == math.huge then return "Infinity" end
    if v == -math.huge then return "-Infinity" end
    if v == math.floor(v) and math.abs(v) < 2^63 then return string.format("%d", v) end
    for digits = 15, 16 do
      local s = string.format("%." .. digits .. "g", v)
      if tonumber(s) == v then return s end
    end
    return string.format("%.17g", v)
  end
  return tostring(v)
end
M.literal_text = literal_text

local function is_byte_order(coll)
  local provider, name = coll:match("^(%a*):(.*)$")
  return provider == "c" and BYTE_ORDER_COLLATIONS[name] or name == "ucs_basic"
end

-- Makes listener l's conditions ready for evaluation on arrival: each value is cast by the
-- server to its column's type and read back in canonical text, then decoded as column
-- values are (so '2026-01-02T03:04:05Z', 10, "10.0" and "A0EE..." mean what SQL takes
-- them to mean, and a value the type rejects fails here); conditions whose SQL result
-- Lua could not reproduce are refused. `d` is the driver (exec, literal, ident).
function M.prepare(l, d)
  l.prepared = {}
  for i, c in ipairs(l.conds) do
    local col
    for _, x in ipairs(l.table.columns) do if x.name == c.column then col = x break end end
    local p = { column = c.column, op = c.op, oid = col.oid }
    l.prepared[i] = p
    if c.op ~= "is null" and c.op ~= "is not null" then
      local rows, err = d:exec([[
        SELECT pg_catalog.format_type($2::oid, NULL) AS tname,
          (SELECT typtype::text FROM pg_catalog.pg_type WHERE oid = $2::oid) AS typtype,
          CASE WHEN a.attcollation = 0 THEN ''
               WHEN co.collname = 'default' THEN
                 (SELECT coalesce(to_jsonb(db)->>'datlocprovider', 'c') || ':' || db.datcollate::text
                  FROM pg_catalog.pg_database db WHERE db.datname = current_database())
               ELSE co.collprovider::text || ':' || coalesce(co.collcollate::text, co.collname::text) END AS coll,
          coalesce((to_jsonb(co)->>'collisdeterministic')::boolean, true) AS det
        FROM pg_catalog.pg_attribute a LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation
        WHERE a.attrelid = $1 AND a.attname = $3]], l.table.oid, col.oid, c.column)
      if not rows then return nil, err end
      local info = rows[1]
      local kind = KIND[col.oid] or (info.typtype == "e" and "eq") or nil
      local ordering = c.op ~= "=" and c.op ~= "<>" and c.op ~= "in"
      local why
      if not kind or col.elem ~= 0 then
        why = "values of type " .. info.tname .. " cannot be compared on arrival"
      elseif ordering and kind == "eq" then
        why = "values of type " .. info.tname .. " have no order that Lua can reproduce"
      elseif kind == "text" and ordering and not is_byte_order(info.coll) then
        why = "the column's collation (" .. info.coll .. ") does not order text bytewise"
      elseif kind == "text" and not info.det then
        why = "the column's collation is nondeterministic"
      end
      if why then
        return nil, string.format("condition '%s %s' on %s cannot run under the %s driver: conditions are evaluated " ..
          "in Lua on arrival, and %s (use a where function that decides in Lua)",
          c.column, c.op, l.table_name, d.client.driver_name, why)
      end
      p.kind = kind
      local values = c.op == "in" and c.value or { c.value }
      -- One text[] parameter, one row per value: an `in` list of any length (a column
      -- per value would stop at PostgreSQL's 1,664 target-list entries).
      local elems = {}
      for j, v in ipairs(values) do
        elems[j] = '"' .. literal_text(v):gsub('[\\"]', "\\%0") .. '"'
      end
      local list = {}
      if #elems > 0 then
        rows, err = d:exec("SELECT pg_catalog.format('%s', CAST(u.x AS " .. info.tname .. ")) AS v " ..
          "FROM unnest($1::text[]) WITH ORDINALITY AS u(x, i) ORDER BY u.i", "{" .. table.concat(elems, ",") .. "}")
        if not rows then
          return nil, string.format("invalid 'where' for %s: %s", l.table_name, (tostring(err):gsub("%s+$", "")))
        end
        for j = 1, #elems do
          local text = rows[j].v
          -- Numbers stay exact text; everything else is decoded as the column's values are.
          list[j] = kind == "num" and text or core.decode(col.oid, text, 0, 0)
        end
      end
      p.values = list
    end
  end
  return true
end

local function project(row, fields)
  if not row or not fields then return row end
  local out = {}
  for _, f in ipairs(fields) do out[f] = row[f] end
  return out
end

-- A predicate over a full row for the listener's conditions, or nil when it has none.
-- M.prepare must have run for conditions other than null tests.
function M.matcher(l)
  local conds, pred, fields = l.prepared or l.conds, l.predicate, l.fields
  if #conds == 0 and not pred then return nil end
  return function(row)
    for _, c in ipairs(conds) do
      local v = row[c.column]
      local op = c.op
      if op == "is null" then
        if v ~= null then return false end
      elseif op == "is not null" then
        if v == null then return false end
      elseif op == "in" then
        local hit = false
        for _, x in ipairs(c.values) do
          if compare(v, x, c.kind, c.oid) == 0 then hit = true break end
        end
        if not hit then return false end
      else
        local r = compare(v, c.values[1], c.kind, c.oid)
        if r == nil or not TESTS[op](r) then return false end
      end
    end
    -- A Lua `where` sees the listened fields only (README), the row it will be handed.
    if pred and not pred(fields and project(row, fields) or row) then return false end
    return true
  end
end

local function same(a, b)
  if a == b then return true end
  if a ~= a and b ~= b then return true end            -- NaN = NaN, as text forms compare
  if type(a) ~= "table" or type(b) ~= "table" then return false end
  for k, v in pairs(a) do if not same(v, b[k]) then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end
M.same = same

local function derive(ev, op, new, old)
  return { op = op, id = ev.id, table = ev.table, source = ev.source, new = new, old = old, lsn = ev.lsn,
           xid = ev.xid, commit_time = ev.commit_time, columns_uncertain = ev.columns_uncertain }
end

-- Applies listener l to a whole-row event. Calls emit(l, ev) for zero, one or two events
-- (a key change is a delete then an insert); returns false when emit says stop.
function M.apply(l, ev, emit)
  local match = l.matcher
  local fields = l.fields
  local op = ev.op
  if op == "truncate" then return emit(l, ev) end
  if op == "insert" or op == "read" then
    if match and not match(ev.new) then return true end
    if fields then ev = derive(ev, op, project(ev.new, fields), nil) end
    return emit(l, ev)
  elseif op == "delete" then
    if match and ev.old and not match(ev.old) then return true end
    if fields then ev = derive(ev, "delete", nil, project(ev.old, fields)) end
    return emit(l, ev)
  end
  -- update
  local o, n = true, true
  if match then
    o = ev.old ~= nil and match(ev.old)
    n = match(ev.new)
  end
  if o and n then
    local pk = l.primary_key
    if pk and ev.old then
      for _, k in ipairs(pk) do
        if not same(ev.old[k], ev.new[k]) then
          if emit(l, derive(ev, "delete", nil, project(ev.old, fields))) == false then return false end
          local ins = derive(ev, "insert", project(ev.new, fields), nil)
          -- Two events of one change: the insert's id sorts right after the delete's.
          if ins.id then ins.id = ins.id .. ".1" end
          return emit(l, ins)
        end
      end
    end
    if fields then
      local nv, ov = project(ev.new, fields), project(ev.old, fields)
      if ov and same(nv, ov) then return true end
      ev = derive(ev, "update", nv, ov)
    end
    return emit(l, ev)
  elseif o then
    return emit(l, derive(ev, "delete", nil, project(ev.old, fields)))
  elseif n then
    return emit(l, derive(ev, "insert", project(ev.new, fields), nil))
  end
  return true
end

-- Whether a listener can take events as they come, with no copy or filtering.
function M.passthrough(l)
  return not l.fields and not l.matcher and not l.primary_key
end

return M
