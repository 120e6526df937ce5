-- examples/scale_worker.lua: the working half of a scale-out (README "Scaling out"): one of
-- any number of worker processes sharing the Redis partitions (driver = "redis_streams"),
-- each running its handlers in STATES parallel Lua states (workers = STATES), every row's
-- events in commit order. The handlers are in examples/scale_handlers.lua.
--   flashlua -d postgres://localhost/app examples/scale_worker.lua redis://127.0.0.1:6379 8 4 public.orders [more tables]
local flash = require "flash"

local url, partitions, states = arg[1], tonumber(arg[2]), tonumber(arg[3])
if not (url and partitions and states and arg[4]) then
  io.stderr:write("usage: flashlua examples/scale_worker.lua redis://HOST:PORT PARTITIONS STATES TABLE [TABLE...]\n")
  os.exit(2)
end
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"

local c = assert(flash.client {
  driver = "redis_streams", url = url, group = "example", partitions = partitions,
  workers = states,                                 -- parallel Lua states, one thread each
  handlers = here .. "scale_handlers.lua",          -- what each state loads
  config = { delay = tonumber(os.getenv("DELAY") or "0") },  -- plain data every state receives
})
for i = 4, #arg do
  assert(c:listen { table = arg[i] }):on({ "insert", "update", "delete" }, "show")
end
