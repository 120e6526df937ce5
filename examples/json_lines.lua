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
for _, name in ipairs(arg) do
  assert(client:listen { table = name }):on("all", function(ev)
    print(json.encode { op = ev.op, table = ev.table, xid = ev.xid, new = ev.new, old = ev.old })
  end)
end
