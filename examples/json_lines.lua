-- json_lines: print every change of the tables named on the command line as one JSON
-- line on stdout (like `flashlua --table`, for several tables).
--   flashlua -d postgres://localhost/app examples/json_lines.lua public.posts public.users
local flash = require "flash"
local json = flash.json   -- keeps empty arrays as [] and every digit

if #arg == 0 then
  io.stderr:write("usage: flashlua examples/json_lines.lua SCHEMA.TABLE...\n")
  os.exit(2)
end
io.stdout:setvbuf("line")
local client = assert(flash.client {})
-- bytea values are raw bytes in Lua, which JSON (UTF-8 text) cannot carry: they are
-- written as `flashlua --table` and PostgreSQL's to_json write them, "\\x" and hex (arrays
-- of them alike). Which columns are bytea is asked once per table, at its first event.
local binary = {}
local function bytea_columns(tbl)
  if not binary[tbl] then
    local schema, name = tbl:match("^(.-)%.(.*)$")
    binary[tbl] = {}
    for _, r in ipairs(assert(client:query([[SELECT a.attname::text AS col FROM pg_catalog.pg_attribute a
        JOIN pg_catalog.pg_class c ON c.oid = a.attrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
          AND a.atttypid IN ('bytea'::regtype, '_bytea'::regtype)]], schema, name))) do
      binary[tbl][#binary[tbl] + 1] = r.col
    end
  end
  return binary[tbl]
end
local function hex(v)
  if type(v) == "string" then
    return "\\x" .. v:gsub(".", function(c) return ("%02x"):format(c:byte()) end)
  elseif type(v) == "table" then
    local t = {}
    for i = 1, #v do t[i] = hex(v[i]) end
    return json.array(t)
  end
  return v
end

for _, name in ipairs(arg) do
  assert(client:listen { table = name }):on("all", function(ev)
    for _, col in ipairs(bytea_columns(ev.table)) do
      for _, row in ipairs({ ev.new or false, ev.old or false }) do
        if row and row[col] ~= nil then row[col] = hex(row[col]) end
      end
    end
    print(json.encode { op = ev.op, table = ev.table, xid = ev.xid, new = ev.new, old = ev.old })
  end)
end
