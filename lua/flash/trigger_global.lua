-- flash.trigger_global: the `trigger_global` driver. One AFTER INSERT OR UPDATE OR
-- DELETE row trigger per table (for the operations some listener needs) and one truncate
-- trigger serve every listener of the client on that table: each change is captured once,
-- and each listener's conditions and fields are applied on arrival. The machinery is
-- flash.trigger_base.
local base = require "flash.trigger_base"

local M = {}
local Driver = base.class(base.Driver)

function M.new(client)
  return base.new(Driver, client)
end

function Driver:wanted_triggers()
  local fn = self:ident(self.schema) .. ".capture('0')"
  local rows, truncs, order = {}, {}, {}
  for _, l in ipairs(self.client.listeners) do
    local need = base.needed_ops(l)
    for _, r in ipairs(base.row_targets(l)) do
      local t = rows[r.oid]
      if not t then t = { r = r, ops = {} } rows[r.oid] = t order[#order + 1] = r.oid end
      for _, op in ipairs({ "insert", "update", "delete" }) do
        if need[op] then t.ops[op] = true end
      end
    end
    if need.truncate and not l.gone then truncs[l.table.oid] = l.table end
  end
  local out = {}
  local row_name = base.fit_name(self.schema, "_row")
  for _, oid in ipairs(order) do
    local t = rows[oid]
    local kws = {}
    for _, op in ipairs({ "insert", "update", "delete" }) do
      if t.ops[op] then kws[#kws + 1] = base.OP_KEYWORD[op] end
    end
    if #kws > 0 then
      local q = self:qualified_rel(t.r)
      out[#out + 1] = { key = oid .. "/" .. row_name, name = row_name, qualified = q,
        what = "insert/update/delete", display = t.r.schema .. "." .. t.r.name,
        ddl = "AFTER " .. table.concat(kws, " OR ") .. " ON " .. q .. " FOR EACH ROW EXECUTE FUNCTION " .. fn }
    end
  end
  local trunc_name = base.fit_name(self.schema, "_truncate")
  for oid, tbl in pairs(truncs) do
    local q = self:qualified_rel(tbl)
    out[#out + 1] = { key = oid .. "/" .. trunc_name, name = trunc_name, qualified = q, what = "truncate",
      display = tbl.schema .. "." .. tbl.name,
      ddl = "AFTER TRUNCATE ON " .. q .. " FOR EACH STATEMENT EXECUTE FUNCTION " .. fn }
  end
  return out
end

return M
