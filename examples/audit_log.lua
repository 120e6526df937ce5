-- audit_log: every change to public.accounts is written back as a row of public.audit_log,
-- through the client's own connection (client:query with $n parameters).
--   flashlua -d postgres://localhost/app examples/audit_log.lua
local flash = require "flash"

local client = assert(flash.client {})
assert(client:query [[
  CREATE TABLE IF NOT EXISTS public.audit_log (
    id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(),
    tbl text NOT NULL, op text NOT NULL, xid bigint, old jsonb, new jsonb)]])

-- flash.json keeps empty arrays as [] and every digit; flash.null is JSON null.
local function json(row)
  if row == nil then return nil end
  return flash.json.encode(row)
end

local accounts = assert(client:listen { table = arg[1] or "public.accounts" })
accounts:on("all", function(ev)
  assert(client:query("INSERT INTO public.audit_log (tbl, op, xid, old, new) VALUES ($1, $2, $3, $4, $5)",
    ev.table, ev.op, ev.xid, json(ev.old), json(ev.new)))
end)
flash.log.info("auditing " .. (arg[1] or "public.accounts") .. " into public.audit_log")
