-- examples/scale_capturer.lua: the capturing half of a scale-out (README "Scaling out"):
-- every change of the tables given into Redis Streams, partitioned by table + key, each
-- confirmed to the replication slot only once Redis holds it.
--   flashlua -d postgres://localhost/app examples/scale_capturer.lua redis://127.0.0.1:6379 8 public.orders [more tables]
local flash = require "flash"

local url, partitions = arg[1], tonumber(arg[2])
if not (url and partitions and arg[3]) then
  io.stderr:write("usage: flashlua examples/scale_capturer.lua redis://HOST:PORT PARTITIONS TABLE [TABLE...]\n")
  os.exit(2)
end

local sink = flash.sink.redis { url = url, partitions = partitions }
local c = assert(flash.client { driver = "wal_logical", persistent = true, slot = "flash_scale_capturer",
  publication = "flash_scale_capturer", ack = "manual",
  replica_identity = "full" })   -- updates and deletes carry the old row (set on the table if it lacks it)
for i = 3, #arg do
  assert(c:listen { table = arg[i] }):on("all", sink)
end
-- flashlua runs the client until SIGINT/SIGTERM; a graceful stop flushes the sink first.
