-- flash.listener: a listener (client:listen): its callbacks per operation, added by on()
-- and removed by the function on() returns, and the operations they want.
local args = require "flash.args"

local argerror = args.argerror
local M = {}

-- "read": a row delivered by listener:backfill (flash.backfill), not a change.
local OPS = { insert = true, update = true, delete = true, truncate = true, read = true }
local OP_ORDER = { "insert", "update", "delete", "truncate" }
M.OPTIONS = { table = "string", fields = "table", where = true, primary_key = "table" }

local Listener = {}
Listener.__index = Listener

-- A listener of `client`; `t` holds its table, columns and conditions.
function M.new(t)
  t.callbacks = { insert = {}, update = {}, delete = {}, truncate = {}, read = {} }
  return setmetatable(t, Listener)
end

local function normalize_ops(ops, fname)
  local list = {}
  if type(ops) == "string" then
    ops = { ops }
  elseif type(ops) ~= "table" then
    argerror(1, fname, "operation name or list of names expected, got " .. type(ops), 3)
  end
  for _, op in ipairs(ops) do
    if op == "all" then
      for _, o in ipairs(OP_ORDER) do list[#list + 1] = o end
      list[#list + 1] = "read"
    elseif OPS[op] then
      list[#list + 1] = op
    else
      argerror(1, fname, string.format("unknown operation '%s' (expected insert, update, delete, truncate, read or all)", tostring(op)), 3)
    end
  end
  if #list == 0 then argerror(1, fname, "no operation given", 3) end
  return list
end

-- listener:on(ops, fn) -> off()
function Listener:on(ops, fn)
  local list = normalize_ops(ops, "on")
  -- A callable object (a sink: flash.sink.redis) is a callback too.
  local mt = type(fn) == "table" and getmetatable(fn)
  if mt and type(mt.__call) == "function" then
    local obj = fn
    fn = function(ev) return obj(ev) end
  end
  if type(fn) ~= "function" then
    argerror(2, "on", "function expected, got " .. type(fn), 2)
  end
  local entries = {}
  for _, op in ipairs(list) do
    local e = { fn = fn }
    local cbs = self.callbacks[op]
    cbs[#cbs + 1] = e
    entries[#entries + 1] = { op = op, e = e }
  end
  self.client:_changed(self)
  local done = false
  return function()
    if done then return end
    done = true
    for _, it in ipairs(entries) do
      local cbs = self.callbacks[it.op]
      for i = #cbs, 1, -1 do
        if cbs[i] == it.e then table.remove(cbs, i) end
      end
    end
    self.client:_changed(self)
  end
end

-- listener:backfill([opts]): every existing row as an op = "read" event (flash.backfill).
function Listener:backfill(opts)
  return require("flash.backfill").start(self, opts)
end

-- The changes at least one callback wants ("read" is not a change: no driver captures it).
function Listener:wanted()
  local w = {}
  for _, op in ipairs(OP_ORDER) do
    if #self.callbacks[op] > 0 then w[op] = true end
  end
  return w
end

-- listen's options 'fields' and 'primary_key': lists of column names.
function M.check_names(list, opt)
  if list == nil then return end
  if type(list) ~= "table" then
    argerror(1, "listen", string.format("option '%s': list of column names expected, got %s", opt, type(list)), 3)
  end
  for i, f in ipairs(list) do
    if type(f) ~= "string" then
      argerror(1, "listen", string.format("option '%s': entry #%d must be a column name, got %s", opt, i, type(f)), 3)
    end
  end
end


return M
