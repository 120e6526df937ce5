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

-- Code of other roles that PostgreSQL runs as whoever plans a query on a table or opens it
-- for DDL. Loading a relation's partition key, its indexes' expressions and predicates,
-- its extended statistics' expressions and (for constraint exclusion, in a table with
-- partitions or children) its CHECK constraints, the server folds their immutable calls with constant arguments, i.e. runs
-- them, as the current role: a table owner's `CREATE INDEX ON t ((id + f()))` ran f() as
-- flashlua at each backfill read, and a partition key `(id + f())` at each CREATE
-- TRIGGER on the table. A function counts as the table owner's code unless a superuser
-- owns it, or a role that may act as flashlua's anyway (flashlua's role, or a member of it).
--
-- SQL with $1 an oid[] of relations: the first such function of them or their descendants
-- (partitions at any depth, INHERITS children), with rel (qualified), what ("index i",
-- "partition key", "statistics s", "constraint c"), fn (regprocedure) and owner; `kinds`
-- lists which of "key", "index", "statistics", "check" to look at.
function M.foreign_code_sql(kinds)
  local eq = " OPERATOR(pg_catalog.=) "
  local want, parts = {}, {}
  for _, k in ipairs(kinds) do want[k] = true end
  -- Per relation of the tree, by the catalogs' indexes (it runs before each backfill chunk).
  if want.key then
    parts[#parts + 1] = "SELECT 1259::pg_catalog.oid, c.oid, 'partition key'::pg_catalog.text FROM pg_catalog.pg_class c " ..
      "WHERE c.oid" .. eq .. "d.oid AND c.relkind" .. eq .. "'p'"
  end
  if want.index then
    parts[#parts + 1] = "SELECT 1259::pg_catalog.oid, x.indexrelid, 'index' FROM pg_catalog.pg_index x WHERE x.indrelid" ..
      eq .. "d.oid"
  end
  if want.statistics then
    parts[#parts + 1] = "SELECT 3381::pg_catalog.oid, s.oid, 'statistics' FROM pg_catalog.pg_statistic_ext s WHERE s.stxrelid" ..
      eq .. "d.oid"
  end
  if want.check then
    parts[#parts + 1] = "SELECT 2606::pg_catalog.oid, k.oid, 'constraint' FROM pg_catalog.pg_constraint k WHERE k.conrelid" ..
      eq .. "d.oid AND k.contype" .. eq .. "'c' AND (SELECT pg_catalog.count(*) FROM d) OPERATOR(pg_catalog.>) 1"
  end
  -- (1259 pg_class, 3381 pg_statistic_ext, 2606 pg_constraint, 1255 pg_proc, 2617 pg_operator.)
  return [[
    WITH RECURSIVE d(oid) AS (SELECT pg_catalog.unnest($1::pg_catalog.oid[])
      UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN d ON i.inhparent]] .. eq .. [[d.oid),
    f AS MATERIALIZED (SELECT d.oid AS rel, o.what, o.classid, o.objid,
        CASE WHEN dp.refclassid]] .. eq .. [[1255::pg_catalog.oid THEN dp.refobjid
          ELSE (SELECT op.oprcode::pg_catalog.oid FROM pg_catalog.pg_operator op WHERE op.oid]] .. eq .. [[dp.refobjid) END AS fn
      FROM d, LATERAL (]] .. table.concat(parts, " UNION ALL ") .. [[) AS o(classid, objid, what),
      LATERAL (SELECT dp.refclassid, dp.refobjid FROM pg_catalog.pg_depend dp WHERE dp.classid]] .. eq .. [[o.classid
        AND dp.objid]] .. eq .. [[o.objid AND dp.objsubid]] .. eq .. [[0
        AND dp.refclassid]] .. eq .. [[ANY ('{1255,2617}'::pg_catalog.oid[])) AS dp)
    SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) AS rel,
      CASE f.what WHEN 'partition key' THEN f.what ELSE pg_catalog.concat(f.what, ' ', pg_catalog.quote_ident(
        CASE f.classid WHEN 1259::pg_catalog.oid THEN (SELECT x.relname::pg_catalog.text FROM pg_catalog.pg_class x WHERE x.oid]] .. eq .. [[f.objid)
          WHEN 3381::pg_catalog.oid THEN (SELECT x.stxname::pg_catalog.text FROM pg_catalog.pg_statistic_ext x WHERE x.oid]] .. eq .. [[f.objid)
          ELSE (SELECT x.conname::pg_catalog.text FROM pg_catalog.pg_constraint x WHERE x.oid]] .. eq .. [[f.objid) END)) END AS what,
      p.oid::pg_catalog.regprocedure::pg_catalog.text AS fn, r.rolname::pg_catalog.text AS owner
    FROM f JOIN pg_catalog.pg_proc p ON p.oid]] .. eq .. [[f.fn
    JOIN pg_catalog.pg_roles r ON r.oid]] .. eq .. [[p.proowner
    JOIN pg_catalog.pg_class c ON c.oid]] .. eq .. [[f.rel JOIN pg_catalog.pg_namespace n ON n.oid]] .. eq .. [[c.relnamespace
    WHERE NOT r.rolsuper AND NOT pg_catalog.pg_has_role(p.proowner, CURRENT_USER, 'MEMBER')
    ORDER BY c.oid, 2 LIMIT 1]]
end

-- The first function of another role that planning a query on (or DDL on) the relations
-- `oids` would run as flashlua (M.foreign_code_sql): false when there is none, else what
-- calls it, as "the index i of s.t calls f(), a function of role r"; or nil, err.
function M.foreign_code(conn, oids, kinds)
  local list = {}
  for i, oid in ipairs(oids) do list[i] = string.format("%d", oid) end
  local rows, err = conn:exec(M.foreign_code_sql(kinds), 0, "{" .. table.concat(list, ",") .. "}")
  if not rows then return nil, err end
  local r = rows[1]
  if not r then return false end
  return string.format("the %s of %s calls %s, a function of role %s", r.what, r.rel, r.fn, r.owner)
end

-- SQL with $1 as in M.foreign_code_sql that returns no row when there is no such function,
-- and fails when there is, with `invalid input syntax for type integer: "flashlua: ` and
-- what M.foreign_code says, `"` (so that it can end a transaction of several statements
-- before a query of the table is planned, at no round trip of its own).
M.FOREIGN_CODE_FAILS = 'invalid input syntax for type integer: "flashlua: '
function M.foreign_code_fails_sql(kinds)
  return "SELECT pg_catalog.concat('flashlua: ', pg_catalog.format('the %s of %s calls %s, a function of role %s', " ..
    "q.what, q.rel, q.fn, q.owner))::pg_catalog.int4 FROM (" .. M.foreign_code_sql(kinds) .. ") q"
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
