-- flash.trigger_statement: the `trigger_statement` driver. Per table and operation, an
-- AFTER ... FOR EACH STATEMENT trigger with a transition table: one INSERT ... SELECT per
-- statement appends all its rows to the events table, whatever the number of rows or
-- listeners. Partitions and INHERITS children get triggers of their own (a statement
-- fires the statement triggers of the table it names only). The machinery is
-- flash.trigger_base.
local base = require "flash.trigger_base"

local M = {}
local Driver = base.class(base.Driver)

function M.new(client)
  return base.new(Driver, client)
end

-- Update pairs: PostgreSQL appends each updated row's old and new versions to the two
-- transition tables together, so the n-th old row is the n-th new row's previous version.
-- Pairing by position is right even when the update changes the primary key, and needs
-- none; a FULL JOIN keeps an unpaired row (which PostgreSQL does not produce) as a
-- delete or an insert rather than losing it.
function Driver:statement_function()
  local E = self:ident(self.schema) .. ".events"
  local L = self.max_row
  local ins = "INSERT INTO " .. E .. " (xid, op, rel, tag, new, old, big)\n  "
  -- Each side's row and its text (NULL past the limits of flash.trigger_base).
  local function rows(alias, tbl)
    return "(SELECT pg_catalog.row_number() OVER () AS i, t.r, t.txt, pg_catalog.octet_length(t.txt) AS len FROM " ..
      "(SELECT ROW(s.*) AS r, " .. self:row_text_sql("ROW(s.*)") .. " AS txt FROM " .. tbl .. " s) t) " .. alias
  end
  local function text(a) return "CASE WHEN " .. a .. ".len OPERATOR(pg_catalog.>) " .. L .. " THEN NULL ELSE " ..
    a .. ".txt END" end
  local function big(a) return "CASE WHEN " .. a .. ".i IS NOT NULL AND " .. a .. ".txt IS NULL THEN " ..
    "-pg_catalog.pg_column_size(" .. a .. ".r) WHEN " .. a .. ".len OPERATOR(pg_catalog.>) " .. L .. " THEN " ..
    a .. ".len END" end
  return table.concat({
    "DECLARE capture_xid bigint := pg_catalog.txid_current();",
    "BEGIN",
    "IF TG_OP = 'INSERT' THEN",
    "  " .. ins .. "SELECT capture_xid, 'I', TG_RELID, 0, " .. text("n") .. ", NULL, " .. big("n") ..
      " FROM " .. rows("n", "new_rows") .. " ORDER BY n.i;",
    "ELSIF TG_OP = 'DELETE' THEN",
    "  " .. ins .. "SELECT capture_xid, 'D', TG_RELID, 0, NULL, " .. text("o") .. ", " .. big("o") ..
      " FROM " .. rows("o", "old_rows") .. " ORDER BY o.i;",
    "ELSIF TG_OP = 'UPDATE' THEN",
    "  " .. ins .. "SELECT capture_xid, CASE WHEN o.i IS NULL THEN 'I' WHEN n.i IS NULL THEN 'D' ELSE 'U' END::\"char\",",
    "         TG_RELID, 0, " .. text("n") .. ", " .. text("o") .. ", CASE WHEN least(" .. big("n") .. ", " .. big("o") ..
      ") < 0 THEN least(" .. big("n") .. ", " .. big("o") .. ") ELSE greatest(" .. big("n") .. ", " .. big("o") .. ") END",
    "  FROM " .. rows("o", "old_rows") .. " FULL JOIN " .. rows("n", "new_rows"),
    "  ON n.i OPERATOR(pg_catalog.=) o.i",
    "  ORDER BY coalesce(o.i, n.i);",
    "END IF;",
    "RETURN NULL;",
    "END",
  }, "\n")
end

function Driver:schema_sql()
  local list = base.Driver.schema_sql(self)
  local S = self:ident(self.schema)
  -- Transition tables have no statistics: the planner's guesses would switch JIT on,
  -- which costs more than the whole query.
  list[#list + 1] = "CREATE OR REPLACE FUNCTION " .. S .. ".capture_statement() RETURNS trigger LANGUAGE plpgsql " ..
    base.FUNC_SETTINGS .. "SET jit = off AS " .. self:literal(self:statement_function())
  list[#list + 1] = "REVOKE ALL ON FUNCTION " .. S .. ".capture_statement() FROM PUBLIC"
  return list
end

local REFERENCING = {
  insert = "REFERENCING NEW TABLE AS new_rows",
  update = "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
  delete = "REFERENCING OLD TABLE AS old_rows",
}

function Driver:wanted_triggers()
  local S = self:ident(self.schema)
  local tables, truncs = base.table_ops(self.client.listeners, function(l) return l.relations or {} end)
  local out = {}
  for _, t in ipairs(tables) do
    local q = self:qualified_rel(t.r)
    for _, op in ipairs({ "insert", "update", "delete" }) do
      if t.ops[op] then
        local name = base.fit_name(self.schema, "_" .. op)
        out[#out + 1] = { key = t.r.oid .. "/" .. name, name = name, qualified = q, what = op,
          display = t.r.schema .. "." .. t.r.name,
          ddl = "AFTER " .. base.OP_KEYWORD[op] .. " ON " .. q .. " " .. REFERENCING[op] ..
            " FOR EACH STATEMENT EXECUTE FUNCTION " .. S .. ".capture_statement()" }
      end
    end
  end
  return self:truncate_triggers(truncs, S .. ".capture('0')", out)
end

return M
