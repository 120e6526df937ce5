-- flash.trigger: the `trigger` driver. Per listener and operation, a row trigger (a
-- statement trigger for truncate, on every partition too) on the listened table and each
-- of its INHERITS children (partitions get the partitioned table's row triggers cloned). Each appends the
-- row to the instance's events table tagged with its listener's route (the listener and
-- its table: Driver:route_tag), so every listener receives only its own captures. The
-- machinery is flash.driver.capture.
local base = require "flash.driver.capture"

local Driver = base.class(base.Driver)
local M = base.module(Driver)

function Driver:wanted_triggers()
  local out = {}
  for _, l in ipairs(self.client.listeners) do
    local need = base.needed_ops(l)
    -- The listener (by its rank among its table's listeners: the same across runs of a
    -- script that adds or removes listeners of other tables) and its table, whatever its
    -- rows' relation becomes (Driver:route_tag).
    local tag, err = self:route_tag(l.id, { [l.table.oid] = true }, l.rank)
    if not tag then return nil, err end
    for _, op in ipairs(base.OPS) do
      if need[op] then
        local name = base.fit_name(self.schema, string.format("_%d_%s", l.id, op))
        local level = op == "truncate" and "FOR EACH STATEMENT" or "FOR EACH ROW"
        local targets = op == "truncate" and base.truncate_targets(l) or base.row_targets(l)
        for _, r in ipairs(targets) do
          local q = self:qualified_rel(r)
          out[#out + 1] = {
            key = r.oid .. "/" .. name, name = name, qualified = q, what = op, display = r.schema .. "." .. r.name,
            ddl = "AFTER " .. base.OP_KEYWORD[op] .. " ON " .. q .. " " .. level ..
              " " .. (op == "truncate" and self:own_capture(tag) or self:row_capture(tag, r)),
          }
        end
      end
    end
  end
  return out
end

return M
