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

-- Resolves "schema.table" (quoting as in SQL; a bare name means public) on query
-- connection `conn`: { schema, name, oid, columns, display } | nil, err.
function M.resolve_table(conn, name)
  local rows, err = conn:exec("SELECT pg_catalog.parse_ident($1) AS parts", 0, name)
  if not rows then return nil, string.format("invalid table name '%s': %s", name, err) end
  local parts = rows[1].parts
  if #parts == 1 then parts = { "public", parts[1] } end
  if #parts ~= 2 then
    return nil, string.format("invalid table name '%s': expected schema.table", name)
  end
  rows, err = conn:exec([[
    SELECT c.oid::bigint AS oid, c.relkind::text AS relkind
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = $1 AND c.relname = $2]], 0, parts[1], parts[2])
  if not rows then return nil, err end
  if #rows == 0 then
    local msg = string.format("table %s.%s does not exist", parts[1], parts[2])
    local near = conn:exec([[
      SELECT n.nspname::text AS schema FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      WHERE c.relname = $1 AND c.relkind IN ('r', 'p') ORDER BY 1]], 0, parts[2])
    if near and #near > 0 then
      local names = {}
      for i, r in ipairs(near) do names[i] = r.schema .. "." .. parts[2] end
      msg = msg .. " (did you mean " .. table.concat(names, " or ") .. "?)"
    end
    return nil, msg
  end
  local kind = rows[1].relkind
  if kind ~= "r" and kind ~= "p" then
    return nil, string.format("%s.%s is not a table (relkind %s)", parts[1], parts[2], kind)
  end
  -- Values are decoded by the base type of a column's type and of its array elements:
  -- through domains over domains, domains over arrays and arrays of domains alike.
  local cols
  cols, err = conn:exec(M.columns_sql("a.attrelid = $1"), 0, rows[1].oid)
  if not cols then return nil, err end
  return { schema = parts[1], name = parts[2], oid = rows[1].oid, columns = cols,
           display = parts[1] .. "." .. parts[2] }
end

-- Column `col` of resolved table `tbl`, or nil and an error naming the option (`what`).
function M.column(tbl, col, what)
  for _, c in ipairs(tbl.columns) do
    if c.name == col then return c end
  end
  return nil, string.format("column \"%s\" in %s does not exist in table %s", tostring(col), what, tbl.display)
end

return M
