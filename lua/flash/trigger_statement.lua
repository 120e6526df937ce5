-- flash.trigger_statement: the `trigger_statement` driver. Per table and operation, an
-- AFTER ... FOR EACH STATEMENT trigger with a transition table: one statement's rows go
-- out as a few notifications of many rows each (in statement order), whatever the number
-- of listeners. The shared machinery is flash.trigger_base.
local base = require "flash.trigger_base"

local M = {}
local Driver = base.class(base.TableDriver)

-- Rows per notification: items are grouped so that a batch stays under NOTIFY's limit
-- (a group whose first item is large goes the stored-aside way, like any large payload).
local CHUNK_BYTES = base.NOTIFY_LIMIT - 100

-- Where each operation's rows come from, and how the row functions name them.
local function source(self, g, op)
  if op == "insert" then return { from = "new_rows n", r = { new = "n" } } end
  if op == "delete" then return { from = "old_rows o", r = { old = "o" } } end
  -- Update pairs: PostgreSQL appends each updated row's old and new versions to the two
  -- transition tables together, so the n-th old row is the n-th new row's previous
  -- version. Pairing by position is right even when the update changes the primary key,
  -- and needs none; a FULL JOIN keeps an unpaired row (which PostgreSQL does not
  -- produce) as a delete or an insert rather than losing it. Each side selects the
  -- columns the listeners use by name, next to a row number whose name is none of them.
  local used, cols = {}, {}
  local function use(name)
    if not used[name] then used[name] = true cols[#cols + 1] = name end
  end
  for _, l in ipairs(g.listeners) do
    for _, c in ipairs(l.columns) do use(c.name) end
    for _, c in ipairs(l.conds) do use(c.column) end
    for _, k in ipairs(l.primary_key or {}) do use(k) end
  end
  local rn = "rn"
  while used[rn] do rn = rn .. "_" end
  local function side(alias, tbl)
    local list = { "row_number() OVER () AS " .. rn }
    for _, c in ipairs(cols) do list[#list + 1] = alias .. "." .. self:ident(c) end
    return "(SELECT " .. table.concat(list, ", ") .. " FROM " .. tbl .. " " .. alias .. ")"
  end
  return {
    from = side("o", "old_rows") .. " oo FULL JOIN " .. side("n", "new_rows") .. " nn ON nn." .. rn .. " = oo." .. rn,
    order = "coalesce(oo." .. rn .. ", nn." .. rn .. ")",
    r = { old = "oo", new = "nn", has_old = "oo." .. rn .. " IS NOT NULL", has_new = "nn." .. rn .. " IS NOT NULL" },
  }
end

-- The statement function. A statement of fewer than SMALL rows whose batch fits one
-- notification is sent by one plain aggregate (most statements: half the cost of the
-- general query). Otherwise the rows' items, in statement order, are grouped by a running
-- sum of their sizes into batches that fit a notification, each sent by emit_batch; row
-- numbers and sums come from one window pass, so they agree on the order.
local SMALL = 64

local function statement_body(self, g, op)
  local src = source(self, g, op)
  local a = self:actions_sql(g, op, src.r)
  if not a then return nil end
  local emit = "PERFORM " .. self:ident(self.schema) .. ".emit_batch(p);"
  local items = "SELECT " .. self:item_sql(g, "t.a", src.r, op) .. " AS item" ..
    (src.order and (", " .. src.order .. " AS k") or "") .. "\n" ..
    "      FROM " .. src.from .. "\n" ..
    "      CROSS JOIN LATERAL (SELECT " .. a .. " AS a) t WHERE t.a <> ''"
  return "DECLARE p text; nitems int;\nBEGIN\n" ..
    "SELECT string_agg(item, ','" .. (src.order and " ORDER BY k" or "") .. "), count(*) INTO p, nitems\n" ..
    "  FROM (" .. items .. "\n      LIMIT " .. SMALL .. ") i;\n" ..
    "IF nitems = 0 THEN RETURN NULL; END IF;\n" ..
    "IF nitems < " .. SMALL .. " AND octet_length(p) <= " .. CHUNK_BYTES .. " THEN\n" ..
    "  " .. emit .. "\n" ..
    "  RETURN NULL;\n" ..
    "END IF;\n" ..
    "FOR p IN\n" ..
    "  SELECT string_agg(item, ',' ORDER BY rn) FROM (\n" ..
    "    SELECT row_number() OVER w AS rn, item, sum(octet_length(item) + 1) OVER w / " .. CHUNK_BYTES .. " AS c\n" ..
    "    FROM (" .. items .. ") i\n" ..
    "    WINDOW w AS (" .. (src.order and "ORDER BY k " or "") .. "ROWS UNBOUNDED PRECEDING)) q\n" ..
    "  GROUP BY c ORDER BY c\n" ..
    "LOOP\n" ..
    "  " .. emit .. "\n" ..
    "END LOOP;\n" ..
    "RETURN NULL;\nEND"
end

local function unit(op, referencing)
  return {
    name = op, what = op,
    ddl = "AFTER " .. base.OP_KEYWORD[op], level = "REFERENCING " .. referencing .. " FOR EACH STATEMENT",
    -- Transition tables have no statistics: the planner's guesses would switch JIT on,
    -- which costs more than the whole query.
    settings = "SET jit = off",
    body = function(self, g) return statement_body(self, g, op) end,
  }
end

Driver.UNITS = {
  unit("insert", "NEW TABLE AS new_rows"),
  unit("update", "OLD TABLE AS old_rows NEW TABLE AS new_rows"),
  unit("delete", "OLD TABLE AS old_rows"),
  base.TRUNCATE_UNIT,
}

function M.new(client)
  return base.new_table_driver(Driver, client)
end

return M
