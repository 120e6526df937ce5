-- flash.where: a listener's conditions (the `where` option) from the API to the event: the
-- forms a script may write them in, normalised once; their values as SQL text; the test of
-- a decoded row on arrival; and how conditions, partial fields and a primary key turn a
-- change into the events a listener sees (the soft-delete transitions, "no listened field
-- changed", a key change as a delete then an insert) -- for every driver.
local core = require "flash.core"
local compare = require "flash.compare"
local argerror = require("flash.args").argerror

local null = core.null
local cmp, TESTS = compare.compare, compare.TESTS
local M = {}

local WHERE_OPS = {
  ["="] = "=", ["=="] = "=", ["<>"] = "<>", ["!="] = "<>", ["~="] = "<>",
  ["<"] = "<", ["<="] = "<=", [">"] = ">", [">="] = ">=",
  ["is null"] = "is null", ["is not null"] = "is not null", ["in"] = "in",
}

-- Normalizes `where` into a list of { column, op, value } (see API.md), or a predicate.
function M.normalize(where)
  if where == nil then return {}, nil end
  if type(where) == "function" then return {}, where end
  if type(where) ~= "table" then
    argerror(1, "listen", "option 'where': table or function expected, got " .. type(where), 3)
  end
  local conds = {}
  for k, v in pairs(where) do
    if type(k) == "string" then
      local vt = type(v)
      if v == core.null then
        conds[#conds + 1] = { column = k, op = "is null" }
      elseif vt == "string" or vt == "number" or vt == "boolean" then
        conds[#conds + 1] = { column = k, op = "=", value = v }
      else
        argerror(1, "listen", string.format("option 'where': value of '%s' must be a string, number, boolean or flash.null, got %s", k, vt), 3)
      end
    elseif type(k) ~= "number" then
      argerror(1, "listen", "option 'where': keys must be column names or list positions", 3)
    end
  end
  table.sort(conds, function(a, b) return a.column < b.column end)
  for i, c in ipairs(where) do
    if type(c) ~= "table" or type(c[1]) ~= "string" or type(c[2]) ~= "string" then
      argerror(1, "listen", string.format("option 'where': condition #%d must be { column, operator [, value] }", i), 3)
    end
    local op = WHERE_OPS[c[2]:lower():gsub("%s+", " ")]
    if not op then
      argerror(1, "listen", string.format("option 'where': unknown operator '%s' in condition #%d " ..
        "(expected =, <>, <, <=, >, >=, is null, is not null, in)", c[2], i), 3)
    end
    local v = c[3]
    if op == "in" then
      if type(v) ~= "table" then
        argerror(1, "listen", string.format("option 'where': condition #%d: 'in' needs a list of values", i), 3)
      end
    elseif op ~= "is null" and op ~= "is not null" then
      local vt = type(v)
      if v == core.null then
        op = (op == "=" and "is null") or (op == "<>" and "is not null") or argerror(1, "listen",
          string.format("option 'where': condition #%d compares with flash.null; use 'is null'", i), 3)
      elseif vt ~= "string" and vt ~= "number" and vt ~= "boolean" then
        argerror(1, "listen", string.format("option 'where': condition #%d: value must be a string, number, boolean or flash.null, got %s", i, vt), 3)
      end
    end
    conds[#conds + 1] = { column = c[1], op = op, value = v }
  end
  return conds, nil
end

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

-- The SQL of conditions `conds` on row `rec` ("t", "NEW"), or nil without any; `d` quotes
-- (d:ident, d:value_literal: flash.driver.base). Drivers test-plan it at listen, so that a
-- bad value fails there with PostgreSQL's words; conditions are evaluated on arrival.
--
-- Operators are pg_catalog's (OPERATOR(pg_catalog.=), an `in` as ORs of it): for a type it
-- has no exact operator for (an enum, a domain), one in a schema named after our role (the
-- "$user" of the search path, anyone's with CREATE on the database) was picked, and the
-- planner ran its function as flashlua, comparing the value with the column's statistics.
function M.sql(conds, rec, d)
  if #conds == 0 then return nil end
  local parts = {}
  for _, c in ipairs(conds) do
    local col = rec .. "." .. d:ident(c.column)
    local op = c.op
    if op == "is null" then
      parts[#parts + 1] = col .. " IS NULL"
    elseif op == "is not null" then
      parts[#parts + 1] = col .. " IS NOT NULL"
    elseif op == "in" then
      if #c.value == 0 then
        parts[#parts + 1] = "false"
      else
        local vals = {}
        for i, v in ipairs(c.value) do vals[i] = col .. " OPERATOR(pg_catalog.=) " .. d:value_literal(v) end
        parts[#parts + 1] = "(" .. table.concat(vals, " OR ") .. ")"
      end
    else
      parts[#parts + 1] = col .. " OPERATOR(pg_catalog." .. op .. ") " .. d:value_literal(c.value)
    end
  end
  return "(" .. table.concat(parts, " AND ") .. ")"
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
          (SELECT typdelim::text FROM pg_catalog.pg_type WHERE oid = $2::oid) AS delim,
          CASE WHEN a.attcollation OPERATOR(pg_catalog.=) 0::pg_catalog.oid THEN ''
               WHEN co.collname = 'default' THEN
                 (SELECT coalesce(pg_catalog.to_jsonb(db)->>'datlocprovider', 'c') || ':' || db.datcollate::text
                  FROM pg_catalog.pg_database db WHERE db.datname = pg_catalog.current_database())
               ELSE co.collprovider::text || ':' || coalesce(co.collcollate::text, co.collname::text) END AS coll,
          coalesce((pg_catalog.to_jsonb(co)->>'collisdeterministic')::boolean, true) AS det
        FROM pg_catalog.pg_attribute a LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation
        WHERE a.attrelid = $1 AND a.attname = $3]], l.table.oid, col.oid, c.column)
      if not rows then return nil, err end
      local info = rows[1]
      local kind, why = compare.kind(col, c.op, info)
      if not kind then
        return nil, string.format("condition '%s %s' on %s cannot run under the %s driver: conditions are evaluated " ..
          "in Lua on arrival, and %s (use a where function that decides in Lua)",
          c.column, c.op, l.table_name, d.client.driver_name, why)
      end
      p.kind = kind
      local values = c.op == "in" and c.value or { c.value }
      -- One array parameter, one row per value: an `in` list of any length (a column per
      -- value would stop at PostgreSQL's 1,664 target-list entries). The parameter is of
      -- the column's type's array, so each value is read by the type's input function: a
      -- CAST from text would call a cast the type's owner made (CREATE CAST (text AS
      -- its_enum) WITH FUNCTION ...), which ran with flashlua's privileges.
      local elems = {}
      for j, v in ipairs(values) do
        elems[j] = '"' .. literal_text(v):gsub('[\\"]', "\\%0") .. '"'
      end
      local list = {}
      if #elems > 0 then
        rows, err = d:exec("SELECT pg_catalog.format('%s', u.x) AS v FROM pg_catalog.unnest($1::" .. info.tname ..
          "[]) WITH ORDINALITY AS u(x, i) ORDER BY u.i", "{" .. table.concat(elems, info.delim or ",") .. "}")
        if not rows then
          -- (Without the CONTEXT line naming the parameter: it quotes nothing the user wrote.)
          return nil, string.format("invalid 'where' for %s: %s", l.table_name,
            (tostring(err):gsub("\nCONTEXT:  unnamed portal parameter.*$", ""):gsub("%s+$", "")))
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

-- The listened fields of a row (the row itself without `fields`).
local function project(row, fields)
  if not row or not fields then return row end
  local out = {}
  for _, f in ipairs(fields) do out[f] = row[f] end
  return out
end
M.project = project

-- A predicate over a full row for the listener's conditions and its Lua `where`, or nil
-- when it has neither. M.prepare must have run for conditions other than null tests;
-- `conds` = {} leaves the conditions out (a driver whose server tests them: pg_extension).
function M.matcher(l, conds)
  local pred, fields = l.predicate, l.fields
  conds = conds or l.prepared or l.conds
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
          if cmp(v, x, c.kind, c.oid) == 0 then hit = true break end
        end
        if not hit then return false end
      else
        local r = cmp(v, c.values[1], c.kind, c.oid)
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

-- Whether conditions, a Lua `where` or a primary key can turn an update into an insert or
-- a delete (the transitions of M.apply).
function M.transforms(l)
  return #l.conds > 0 or l.predicate ~= nil or l.primary_key ~= nil
end

-- Which operations a listener needs captured: an update can turn into an insert or a
-- delete (M.apply), so it is captured when either is wanted.
function M.needed_ops(l)
  local w = l:wanted()
  local n = {}
  if w.insert then n.insert = true end
  if w.delete then n.delete = true end
  if w.truncate then n.truncate = true end
  if w.update or (M.transforms(l) and (w.insert or w.delete)) then n.update = true end
  return n, w
end

-- Whether a listener can take events as they come, with no copy or filtering.
function M.passthrough(l)
  return not l.fields and not l.matcher and not l.primary_key
end

return M
