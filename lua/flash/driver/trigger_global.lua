-- flash.trigger_global: the `trigger_global` driver. One AFTER INSERT OR UPDATE OR
-- DELETE row trigger per table (for the operations some listener needs) and one truncate
-- trigger serve every listener of the client on that table: each change is captured once
-- (once per listened table above it, for a partition listened to with its partitioned
-- table: Driver:wanted_triggers), and each listener's conditions and fields are applied on
-- arrival. The machinery is flash.driver.capture.
local base = require "flash.driver.capture"

local Driver = base.class(base.Driver)
local M = base.module(Driver)

function Driver:wanted_triggers()
  local tables, truncs = base.table_ops(self.client.listeners, base.row_targets)
  local out = {}
  for _, t in ipairs(tables) do
    -- PostgreSQL clones a partitioned table's row trigger, name and arguments (so its
    -- route), to every partition at any depth, and a table can hold one trigger of a name.
    -- A partition listened to as well (or a partitioned one below it) keeps its own
    -- trigger, tagged with its own route: a partitioned table's is named after its oid, so
    -- no two of a partition's triggers share a name. Each row is captured once per
    -- listened table above it (the partition included), each capture going to that table's
    -- listeners. The name depends only on relkind, which never changes: DETACH or ATTACH
    -- renames nothing.
    local row_name = base.fit_name(self.schema, t.r.relkind == "p" and string.format("_row_%d", t.r.oid) or "_row")
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
        ddl = "AFTER " .. table.concat(kws, " OR ") .. " ON " .. q .. " FOR EACH ROW " .. self:row_capture(tag, t.r) }
    end
  end
  return self:truncate_triggers(truncs, out)
end

return M
