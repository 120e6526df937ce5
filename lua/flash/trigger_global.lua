-- flash.trigger_global: the `trigger_global` driver. One AFTER INSERT OR UPDATE OR DELETE
-- row trigger per table (and a BEFORE TRUNCATE statement trigger) serves every listener of
-- the client on that table; its function decides in SQL which listener gets which event
-- and sends the row once. The shared machinery is flash.trigger_base.
local base = require "flash.trigger_base"

local M = {}
local Driver = base.class(base.TableDriver)

local ROW = { new = "NEW", old = "OLD" }

-- One branch of the row function: the actions of every listener on this row, then the
-- row sent as a one-item batch (inline, not through emit_batch: this runs for every row).
local function branch(self, g, op)
  local a = self:actions_sql(g, op, ROW)
  if not a then return "NULL;" end
  return "a := " .. a .. ";\n" ..
    "  IF a = '' THEN RETURN NULL; END IF;\n" ..
    "  p := '[\"B\",' || " .. self:seq_sql() .. " || ',' || " .. base.XID_SQL .. " || ',' || " ..
    self:item_sql(g, "a", ROW, op) .. " || ']';"
end

Driver.UNITS = {
  {
    name = "other", what = "insert/update/delete",
    ddl = "AFTER INSERT OR UPDATE OR DELETE", level = "FOR EACH ROW",
    body = function(self, g)
      local i, u, d = branch(self, g, "insert"), branch(self, g, "update"), branch(self, g, "delete")
      if i == "NULL;" and u == "NULL;" and d == "NULL;" then return nil end
      return "DECLARE a text; p text; rid bigint;\nBEGIN\n" ..
        "IF TG_OP = 'INSERT' THEN\n  " .. i .. "\n" ..
        "ELSIF TG_OP = 'UPDATE' THEN\n  " .. u .. "\n" ..
        "ELSE\n  " .. d .. "\nEND IF;\n" ..
        "IF p IS NULL THEN RETURN NULL; END IF;\n" ..
        self:send_sql("p") .. "\nRETURN NULL;\nEND"
    end,
  },
  base.TRUNCATE_UNIT,
}

function M.new(client)
  return base.new_table_driver(Driver, client)
end

return M
