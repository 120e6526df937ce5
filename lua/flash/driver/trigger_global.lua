-- flash.trigger_global: the `trigger_global` driver. One AFTER INSERT OR UPDATE OR
-- DELETE row trigger per table (for the operations some listener needs) and one truncate
-- trigger serve every listener of the client on that table: each change is captured once,
-- and each listener's conditions and fields are applied on arrival. The machinery is
-- flash.driver.capture.
local base = require "flash.driver.capture"

local Driver = base.class(base.Driver)
local M = base.module(Driver)

function Driver:wanted_triggers()
  local tables, truncs = base.table_ops(self.client.listeners, base.row_targets)
  local out = {}
  local row_name = base.fit_name(self.schema, "_row")
  for _, t in ipairs(tables) do
    local kws = {}
    for _, op in ipairs({ "insert", "update", "delete" }) do
      if t.ops[op] then kws[#kws + 1] = base.OP_KEYWORD[op] end
    end
    if #kws > 0 then
      -- Tagged with the listened tables it captures for (Driver:route_tag).
      local tag, err = self:route_tag(0, t.roots)
      if not tag then return nil, err end
      local q = self:qualified_rel(t.r)
      out[#out + 1] = { key = t.r.oid .. "/" .. row_name, name = row_name, qualified = q,
        what = "insert/update/delete", display = t.r.schema .. "." .. t.r.name,
        ddl = "AFTER " .. table.concat(kws, " OR ") .. " ON " .. q .. " FOR EACH ROW " .. self:row_capture(tag) }
    end
  end
  return self:truncate_triggers(truncs, out)
end

return M
