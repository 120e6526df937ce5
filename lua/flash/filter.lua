-- flash.filter: a listener's conditions, partial fields and primary key applied on arrival,
-- for drivers that receive whole rows (wal_logical). Gives the events the trigger driver's
-- SQL gives: the soft-delete transitions, "no listened field changed" and key changes.
local core = require "flash.core"

local null = core.null
local M = {}

local NUMERIC = { [20] = true, [21] = true, [23] = true, [26] = true, [700] = true, [701] = true, [1700] = true }

local function tobool(x)
  if type(x) == "boolean" then return x end
  local s = tostring(x):lower()
  return s == "t" or s == "true" or s == "1" or s == "yes" or s == "on" or s == "y"
end

-- Compares a decoded column value with a condition value as SQL would, by the column's
-- type: numbers (and numeric/bigint strings) numerically, booleans as booleans, the rest
-- as canonical text. Returns -1, 0, 1, or nil when either side is NULL.
local function compare(v, c, oid)
  if v == null or v == nil or c == null then return nil end
  if oid == 16 then
    local a, b = tobool(v), tobool(c)
    if a == b then return 0 end
    return a and 1 or -1
  end
  if NUMERIC[oid] then
    local nv, nc = tonumber(v), tonumber(c)
    if nv and nc then
      if nv == nc then return 0 end
      return nv < nc and -1 or 1
    end
  end
  local sv = type(v) == "string" and v or tostring(v)
  local sc = type(c) == "string" and c or tostring(c)
  if sv == sc then return 0 end
  return sv < sc and -1 or 1
end
M.compare = compare

local TESTS = {
  ["="] = function(r) return r == 0 end,
  ["<>"] = function(r) return r ~= 0 end,
  ["<"] = function(r) return r < 0 end,
  ["<="] = function(r) return r <= 0 end,
  [">"] = function(r) return r > 0 end,
  [">="] = function(r) return r >= 0 end,
}

-- A predicate over a full row for the listener's conditions, or nil when it has none.
function M.matcher(l)
  local conds, pred = l.conds, l.predicate
  if #conds == 0 and not pred then return nil end
  local oids = {}
  for _, col in ipairs(l.table.columns) do oids[col.name] = col.oid end
  return function(row)
    for _, c in ipairs(conds) do
      local v = row[c.column]
      local oid = oids[c.column]
      local op = c.op
      if op == "is null" then
        if v ~= null then return false end
      elseif op == "is not null" then
        if v == null then return false end
      elseif op == "in" then
        local hit = false
        for _, x in ipairs(c.value) do
          if compare(v, x, oid) == 0 then hit = true break end
        end
        if not hit then return false end
      else
        local r = compare(v, c.value, oid)
        if r == nil or not TESTS[op](r) then return false end
      end
    end
    if pred and not pred(row) then return false end
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

local function project(row, fields)
  if not row or not fields then return row end
  local out = {}
  for _, f in ipairs(fields) do out[f] = row[f] end
  return out
end

local function derive(ev, op, new, old)
  return { op = op, table = ev.table, new = new, old = old, lsn = ev.lsn, xid = ev.xid,
           commit_time = ev.commit_time }
end

-- Applies listener l to a whole-row event. Calls emit(l, ev) for zero, one or two events
-- (a key change is a delete then an insert); returns false when emit says stop.
function M.apply(l, ev, emit)
  local match = l.matcher
  local fields = l.fields
  local op = ev.op
  if op == "truncate" then return emit(l, ev) end
  if op == "insert" then
    if match and not match(ev.new) then return true end
    if fields then ev = derive(ev, "insert", project(ev.new, fields), nil) end
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
          return emit(l, derive(ev, "insert", project(ev.new, fields), nil))
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
