-- flash.listener: a listener (client:listen): listen's options checked and resolved
-- against the catalog, its callbacks per operation (on() and the off() it returns), and
-- the operations they want.
local core = require "flash.core"
local args = require "flash.args"
local catalog = require "flash.catalog"
local where = require "flash.where"

local argerror = args.argerror
local M = {}

-- "read": a row delivered by listener:backfill (flash.backfill), not a change.
local OPS = { insert = true, update = true, delete = true, truncate = true, read = true }
local OP_ORDER = { "insert", "update", "delete", "truncate" }
local OPTIONS = { table = "string", fields = "table", where = true, primary_key = "table" }

local Listener = {}
Listener.__index = Listener

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
  -- A handler's name in the worker states' file (flash.client{ workers = N, handlers = }).
  if type(fn) == "string" and self.client.pool then fn = self.client.pool:callback(fn, self) end
  -- A callable object (a sink: flash.sink.redis) is a callback too; it is called with the
  -- event and this listener (the sink's default key is the listener's table's key).
  local mt = type(fn) == "table" and getmetatable(fn)
  local obj
  if mt and type(mt.__call) == "function" then
    local l = self
    obj = fn
    fn = function(ev) return obj(ev, l) end
  end
  if type(fn) ~= "function" then
    argerror(2, "on", "function expected, got " .. type(fn), 2)
  end
  local entries = {}
  for _, op in ipairs(list) do
    local e = { fn = fn, obj = obj }   -- obj: the callable object (a sink), for the drivers
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
local function check_names(list, opt)
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


-- listener.new(client, opts) -> listener | nil, err: client:listen. Misuse raises at the
-- script's line; what the server says is wrong (no such table or column, a condition the
-- driver refuses) is nil, err.
function M.new(client, opts)
  if type(opts) ~= "table" then
    -- Level 2: client:listen tail-calls this, so the script's line is the caller's.
    argerror(1, "listen", string.format("table of options expected, got %s%s", type(opts),
      type(opts) == "string" and string.format(": client:listen{ table = %q }", opts) or ""), 2)
  end
  for k, v in pairs(opts) do
    local want = OPTIONS[k]
    if not want then argerror(1, "listen", args.unknown_option(k, OPTIONS)) end
    if want ~= true and type(v) ~= want then
      argerror(1, "listen", string.format("option '%s': %s expected, got %s", k, want, type(v)))
    end
  end
  if type(opts.table) ~= "string" then
    argerror(1, "listen", "option 'table' is required (a \"schema.table\" name)")
  end
  check_names(opts.fields, "fields")
  check_names(opts.primary_key, "primary_key")
  local conds, predicate = where.normalize(opts.where)
  if client.closed then return nil, "client is stopped" end

  local lp = client.loop
  local tbl, err = catalog.resolve_table(client.conn, opts.table)
  if not tbl then return lp:failed("client:listen", err) end
  local columns = tbl.columns
  if opts.fields then
    if #opts.fields == 0 then
      return lp:failed("client:listen", "option 'fields' is empty: list at least one column, or leave it out for every column")
    end
    columns = {}
    for _, f in ipairs(opts.fields) do
      local c, cerr = catalog.column(tbl, f, "fields")
      if not c then return lp:failed("client:listen", cerr) end
      columns[#columns + 1] = c
    end
  end
  for _, c in ipairs(conds) do
    local ok, cerr = catalog.column(tbl, c.column, "where")
    if not ok then return lp:failed("client:listen", cerr) end
  end
  for _, k in ipairs(opts.primary_key or {}) do
    local ok, cerr = catalog.column(tbl, k, "primary_key")
    if not ok then return lp:failed("client:listen", cerr) end
  end

  -- Its rank among the client's listeners of its table, in creation order: what names it
  -- across runs of a persistent slot or schema (the `trigger` driver's routes, the
  -- pg_extension registrations), whatever listeners of other tables a changed script adds
  -- or removes (its id, creation order over every table, changes then).
  local rank = 1
  for _, o in ipairs(client.listeners) do
    if o.table.oid == tbl.oid then rank = rank + 1 end
  end
  local l = setmetatable({
    client = client,
    id = client.next_id,
    rank = rank,
    table = tbl,
    table_name = tbl.display,
    fields = opts.fields,
    columns = columns,
    conds = conds,
    predicate = predicate and client:_protect_where(predicate, tbl.display),
    primary_key = opts.primary_key,
    layout = core.layout(columns, client.flags),
    callbacks = { insert = {}, update = {}, delete = {}, truncate = {}, read = {} },
    delivered = { insert = 0, update = 0, delete = 0, truncate = 0, read = 0 },   -- events per operation
  }, Listener)
  local ok, verr = client.driver:check(l)
  if not ok then return lp:failed("client:listen", verr) end
  return client:_add(l)
end

return M
