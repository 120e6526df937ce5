-- soft_delete: keep a cache of live users where "deleted" means deleted_at IS NOT NULL.
-- An UPDATE that sets deleted_at arrives as a delete; one that clears it, as an insert.
--   flashlua -d postgres://localhost/app examples/soft_delete.lua
local flash = require "flash"

local client = assert(flash.client {})
local users = assert(client:listen {
  table = "public.users",
  fields = { "id", "email" },
  where = { deleted_at = flash.null },
})

local live = {}
users:on("insert", function(ev) live[ev.new.id] = ev.new.email end)
users:on("update", function(ev) live[ev.new.id] = ev.new.email end)
users:on("delete", function(ev) live[ev.old.id] = nil end)
users:on("truncate", function() live = {} end)

flash.every(5, function()
  local n = 0
  for _ in pairs(live) do n = n + 1 end
  flash.log.info(string.format("%d live users", n))
end)
