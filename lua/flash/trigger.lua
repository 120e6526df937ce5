-- flash.trigger: the `trigger` driver. Per listener and operation, a row trigger whose
-- function sends the row (canonical text forms) with pg_notify; rows too large for
-- NOTIFY are stored aside and fetched. The instance machinery is flash.trigger_base.
local core = require "flash.core"
local log = require "flash.log"
local base = require "flash.trigger_base"

local M = {}
local Driver = base.class(base.Driver)

function M.new(client)
  return base.new(Driver, client, {
    installed = {},     -- [listener id] = { [op] = true } triggers present in the database
  })
end

function Driver:schema_functions()
  local S = self:ident(self.schema)
  local body = "DECLARE p text; rid bigint;\nBEGIN\n" ..
    "p := '[' || to_json(op)::text || ',' || " .. self:seq_sql() .. " || ',' || lid\n" ..
    "     || ',' || " .. base.XID_SQL .. " || ',' || coalesce(to_json(nv)::text, 'null')\n" ..
    "     || ',' || coalesce(to_json(ov)::text, 'null') || ']';\n" ..
    self:send_sql("p") .. "\nEND"
  -- No SECURITY DEFINER and no SET clauses (they cost a few microseconds per row): only
  -- our trigger functions, which have both, call it, and PUBLIC has no USAGE on the schema.
  return { "CREATE OR REPLACE FUNCTION " .. S .. ".emit(op text, lid int, nv text[], ov text[])" ..
    " RETURNS void LANGUAGE plpgsql AS " .. self:literal(body) }
end

function Driver:reset(fresh)
  self.installed = {}
  self.recheck = not fresh
end

function Driver:names(l, op)
  return base.fit_name(self.schema, string.format("_%d_%s", l.id, op)), string.format("l%d_%s", l.id, op)
end

function Driver:function_body(l, op)
  local S = self:ident(self.schema)
  local function emit(letter, nv, ov)
    return string.format("PERFORM %s.emit('%s', %d, %s, %s);", S, letter, l.id, nv or "NULL", ov or "NULL")
  end
  if op == "truncate" then
    return "BEGIN " .. emit("T") .. " RETURN NULL; END"
  elseif op == "insert" or op == "delete" then
    local rec = op == "insert" and "NEW" or "OLD"
    local body = op == "insert" and emit("I", "nv") or emit("D", nil, "nv")
    local cond = self:cond_sql(l, rec)
    local lines = { "DECLARE nv text[];", "BEGIN" }
    if cond then lines[#lines + 1] = "IF NOT " .. base.truth(cond) .. " THEN RETURN NULL; END IF;" end
    lines[#lines + 1] = "nv := " .. self:text_array(l.columns, rec) .. ";"
    lines[#lines + 1] = body
    lines[#lines + 1] = "RETURN NULL; END"
    return table.concat(lines, "\n")
  end
  -- update: the soft-delete transitions, partial fields and the primary key change.
  local co, cn = base.truth(self:cond_sql(l, "OLD")), base.truth(self:cond_sql(l, "NEW"))
  local lines = { "DECLARE o boolean; n boolean; nv text[]; ov text[];", "BEGIN" }
  lines[#lines + 1] = "o := " .. (co or "true") .. ";"
  lines[#lines + 1] = "n := " .. (cn or "true") .. ";"
  lines[#lines + 1] = "IF NOT (o OR n) THEN RETURN NULL; END IF;"
  lines[#lines + 1] = "nv := " .. self:text_array(l.columns, "NEW") .. ";"
  lines[#lines + 1] = "ov := " .. self:text_array(l.columns, "OLD") .. ";"
  lines[#lines + 1] = "IF o AND n THEN"
  local updated = emit("U", "nv", "ov")
  if l.fields then
    -- Partial fields: an update that changes none of them is not an event.
    updated = "IF nv IS DISTINCT FROM ov THEN " .. updated .. " END IF;"
  end
  if l.primary_key and #l.primary_key > 0 then
    lines[#lines + 1] = string.format("  IF %s THEN %s %s ELSE %s END IF;",
      self:key_changed_sql(l, "OLD", "NEW"), emit("D", nil, "ov"), emit("I", "nv"), updated)
  else
    lines[#lines + 1] = "  " .. updated
  end
  lines[#lines + 1] = "ELSIF o THEN " .. emit("D", nil, "ov")
  lines[#lines + 1] = "ELSE " .. emit("I", "nv")
  lines[#lines + 1] = "END IF;"
  lines[#lines + 1] = "RETURN NULL; END"
  return table.concat(lines, "\n")
end

function Driver:create_trigger(l, op)
  local S = self:ident(self.schema)
  local trig, fn = self:names(l, op)
  local qfn = S .. "." .. self:ident(fn)
  local tbl = self:qualified_table(l)
  local level = op == "truncate" and "FOR EACH STATEMENT" or "FOR EACH ROW"
  local sql = table.concat({
    "CREATE OR REPLACE FUNCTION " .. qfn .. "() RETURNS trigger LANGUAGE plpgsql " .. base.FUNC_SETTINGS ..
      " AS " .. self:literal(self:function_body(l, op)),
    "DROP TRIGGER IF EXISTS " .. self:ident(trig) .. " ON " .. tbl,
    "CREATE TRIGGER " .. self:ident(trig) .. " AFTER " .. base.OP_KEYWORD[op] .. " ON " .. tbl ..
      " " .. level .. " EXECUTE FUNCTION " .. qfn .. "()",
  }, ";\n")
  local ok, err = self:exec(sql)
  if not ok then return self:trigger_error(op, l.table_name, err) end
  log.debug(string.format("trigger %s created on %s", trig, l.table_name))
  return true
end

function Driver:drop_trigger(l, op)
  local trig, fn = self:names(l, op)
  local sql = "DROP TRIGGER IF EXISTS " .. self:ident(trig) .. " ON " .. self:qualified_table(l) ..
    ";\nDROP FUNCTION IF EXISTS " .. self:ident(self.schema) .. "." .. self:ident(fn) .. "()"
  local ok, err = self:exec(sql)
  if not ok then return base.fail(string.format("cannot drop the %s trigger on %s: %s", op, l.table_name, err)) end
  log.debug(string.format("trigger %s dropped from %s", trig, l.table_name))
  return true
end

-- Makes the database's triggers match what the listener's callbacks want.
function Driver:sync(l)
  if not self.listening then return true end   -- reconnecting: installed on reconnect
  local have = self.installed[l.id]
  -- After a reconnect, an off() while disconnected may have left a trigger behind.
  local recheck = have == nil and self.recheck
  have = have or {}
  self.installed[l.id] = have
  local want = base.needed_ops(l)
  for _, op in ipairs(base.OPS) do
    if want[op] and not have[op] then
      local ok, err = self:create_trigger(l, op)
      if not ok then return self:sync_failed(err) end
      have[op] = true
    elseif (have[op] or recheck) and not want[op] then
      local ok, err = self:drop_trigger(l, op)
      if not ok then return self:sync_failed(err) end
      have[op] = nil
    end
  end
  return true
end

-- Layouts by listener id, rebuilt only when listeners change.
function Driver:prepare()
  if not self.layouts or self.layout_count ~= #self.client.listeners then
    self.layouts = {}
    for _, l in ipairs(self.client.listeners) do self.layouts[l.id] = l.layout end
    self.layout_count = #self.client.listeners
  end
end

-- Decodes and delivers one payload; returns false when the client must stop.
function Driver:dispatch(payload)
  local client = self.client
  local op, seq, lid, xid, new, old = core.decode_payload(payload, self.layouts)
  if not op then
    log.warn("ignoring a malformed notification: " .. tostring(seq))
    return true
  end
  local l = client.by_id[lid]
  if not l then return true end   -- a listener removed while its rows were in flight
  return client:_deliver(l, { op = base.OP_NAME[op], table = l.table_name, new = new, old = old, xid = xid })
end

return M
