-- flash.catalog: what the server's catalog says about a listened table: its name resolved
-- to an OID, its live columns and the types their values are decoded by.
local M = {}

-- The type a domain (over a domain ...) is based on; any other type itself.
local BASE_TYPE_SQL = [[(
      WITH RECURSIVE d(oid, typtype, base) AS (
        SELECT t.oid, t.typtype, t.typbasetype FROM pg_catalog.pg_type t WHERE t.oid = %s
        UNION ALL
        SELECT t.oid, t.typtype, t.typbasetype FROM pg_catalog.pg_type t JOIN d ON t.oid = d.base
        WHERE d.typtype = 'd')
      SELECT oid FROM d WHERE typtype <> 'd')]]

-- SQL for the live columns of the relations that `cond` (on pg_attribute a) selects, in
-- attnum order: rel, name, oid (the base type), typ (the declared type), elem (the base type
-- of array elements, or 0) and delim. Values are decoded by the base type of a column's
-- type and of its array elements: through domains over domains, domains over arrays and
-- arrays of domains alike. The trigger drivers' DDL function runs the same query.
function M.columns_sql(cond)
  return string.format([[
    SELECT a.attrelid::bigint AS rel, a.attname::text AS name, bt.oid::bigint AS oid, a.atttypid::bigint AS typ,
           coalesce(et.oid, 0)::bigint AS elem, coalesce(et.typdelim::text, ',') AS delim
    FROM pg_catalog.pg_attribute a
    JOIN pg_catalog.pg_type bt ON bt.oid = %s
    LEFT JOIN pg_catalog.pg_type et ON bt.typcategory = 'A' AND et.oid = %s
    WHERE %s AND a.attnum > 0 AND NOT a.attisdropped
    ORDER BY a.attrelid, a.attnum]], BASE_TYPE_SQL:format("a.atttypid"), BASE_TYPE_SQL:format("bt.typelem"), cond)
end

-- What a relation of another kind than a table is, and what to listen to instead.
local NOT_A_TABLE = {
  v = "a view, not a table: a view holds no rows of its own, so it has no changes to " ..
    "capture (listen to the tables it reads from)",
  m = "a materialized view, not a table: REFRESH MATERIALIZED VIEW rewrites it whole, " ..
    "with no row changes to capture (listen to the tables it is computed from)",
  f = "a foreign table, not a table: its rows live and change on another server " ..
    "(run flashlua against the table on that server)",
  S = "a sequence, not a table (listen to the table whose rows use it)",
  c = "a composite type, not a table",
  i = "an index, not a table (listen to the table it indexes)",
  I = "an index, not a table (listen to the table it indexes)",
  t = "a TOAST table, not a table (listen to the table it stores values for)",
}
local TEMP_WHY = " is a temporary table, which flashlua cannot listen to: only the " ..
  "session that created it sees its rows"

-- Resolves "schema.table" (quoting as in SQL; a bare name means public) on query
-- connection `conn`: { schema, name, oid, columns, display } | nil, err.
function M.resolve_table(conn, name)
  local rows, err = conn:exec("SELECT pg_catalog.parse_ident($1) AS parts", 0, name)
  if not rows then
    return nil, string.format("invalid table name '%s': %s (a name with spaces, capitals or other characters " ..
      "is written in double quotes, as in SQL: '\"My Schema\".\"Odd Table\"')", name, (err:gsub("%s+$", "")))
  end
  local parts = rows[1].parts
  if #parts == 1 then parts = { "public", parts[1] } end
  if #parts ~= 2 then
    return nil, string.format("invalid table name '%s': expected schema.table", name)
  end
  rows, err = conn:exec([[
    SELECT c.oid::bigint AS oid, c.relkind::text AS relkind, c.relpersistence::text AS persistence
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = $1 AND c.relname = $2]], 0, parts[1], parts[2])
  if not rows then return nil, err end
  if #rows == 0 then
    local msg = string.format("table %s.%s does not exist", parts[1], parts[2])
    -- The same name in other schemas, or in another case: an unquoted name is folded to
    -- lower case, so a table created as "OrderLines" is found only by its quoted name.
    local near = conn:exec([[
      SELECT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname) AS name,
             c.relpersistence = 't' AS temp
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      WHERE pg_catalog.lower(c.relname) = pg_catalog.lower($1) AND c.relkind IN ('r', 'p')
        AND (c.relname <> $1 OR n.nspname <> $2)
      ORDER BY c.relname = $1 DESC, 1]], 0, parts[2], parts[1])
    local names, temps = {}, {}
    for _, r in ipairs(near or {}) do
      local list = r.temp and temps or names
      list[#list + 1] = r.name
    end
    if #names > 0 then
      msg = msg .. " (did you mean " .. table.concat(names, " or ") .. "?)"
    elseif #temps > 0 then
      -- A temporary table of a session (the script's own included) is no way out.
      msg = msg .. " (" .. temps[1] .. TEMP_WHY .. "; create it without TEMPORARY)"
    end
    return nil, msg
  end
  local kind, display = rows[1].relkind, parts[1] .. "." .. parts[2]
  if kind ~= "r" and kind ~= "p" then
    return nil, display .. " is " .. (NOT_A_TABLE[kind] or ("not a table (relkind " .. kind .. ")"))
  end
  if parts[1] == "pg_catalog" or parts[1] == "information_schema" or parts[1] == "pg_toast" then
    -- No trigger may be created on a system catalog, and logical decoding skips them.
    return nil, display .. " is a system catalog: PostgreSQL lets no trigger and no publication see its " ..
      "changes (listen to the tables of your own schemas)"
  end
  if rows[1].persistence == "t" then
    return nil, display .. TEMP_WHY .. " (create it without TEMPORARY)"
  end
  -- Values are decoded by the base type of a column's type and of its array elements:
  -- through domains over domains, domains over arrays and arrays of domains alike.
  local cols
  cols, err = conn:exec(M.columns_sql("a.attrelid = $1"), 0, rows[1].oid)
  if not cols then return nil, err end
  return { schema = parts[1], name = parts[2], oid = rows[1].oid, columns = cols,
           display = display }
end

-- Column `col` of resolved table `tbl`, or nil and an error naming the option (`what`).
function M.column(tbl, col, what)
  for _, c in ipairs(tbl.columns) do
    if c.name == col then return c end
  end
  local msg = string.format("column \"%s\" in %s does not exist in table %s", tostring(col), what, tbl.display)
  -- Names are matched as written (no folding to lower case as unquoted SQL does): a name
  -- in another case is suggested; otherwise the table's columns are listed.
  local want, names = tostring(col):lower(), {}
  for _, c in ipairs(tbl.columns) do
    if c.name:lower() == want then return nil, msg .. " (did you mean \"" .. c.name .. "\"?)" end
    if #names < 20 then names[#names + 1] = c.name end
  end
  if #names == 0 then return nil, msg .. " (it has no columns)" end
  return nil, msg .. " (its columns: " .. table.concat(names, ", ") .. (#tbl.columns > 20 and ", ..." or "") .. ")"
end

return M
