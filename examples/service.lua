-- examples/service.lua: a script to run as a service (examples/flashlua.service). A
-- persistent slot with a fixed name: a restart (a deploy, a crash, the database gone for
-- a while) resumes where the last run confirmed, and nothing committed meanwhile is lost;
-- `flashlua --list-slots` shows what the slot holds, `--drop-slot` removes it when the
-- service is retired.
--   flashlua -d postgres://localhost/app --metrics 127.0.0.1:9187 examples/service.lua public.orders
local flash = require "flash"

local tbl = arg[1] or "public.orders"

local client = assert(flash.client {
  name = "orders-feed",          -- log lines and metrics say [orders-feed db=app]
  driver = "wal_logical",
  persistent = true,
  slot = "flash_orders_feed",
  publication = "flash_orders_feed",
  replica_identity = "full",     -- updates and deletes carry the old row
})

local orders = assert(client:listen { table = tbl })
orders:on("all", function(ev)
  -- One JSON line per change on stdout (the journal); put the real sink here.
  io.stdout:write(flash.json.encode(ev, { unchanged = "<unchanged>" }), "\n")
end)
