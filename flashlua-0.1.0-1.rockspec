-- LuaRocks build of the `flash` module (the C core flash.core + the Lua half).
-- Debian keeps libpq's header in /usr/include/postgresql:
--   luarocks make --lua-version=5.1 LIBPQ_INCDIR=/usr/include/postgresql
package = "flashlua"
version = "0.1.0-1"
source = {
  url = "git+https://github.com/flashlua/flashlua.git",
  tag = "v0.1.0",
}
description = {
  summary = "PostgreSQL change events (triggers + LISTEN/NOTIFY, logical replication) for LuaJIT",
  detailed = [[
flash listens to row changes in PostgreSQL (insert, update, delete, truncate) and hands
each change to a Lua function. Connections, wire protocols and value decoding are in C;
filtering and reactions are in Lua.
]],
  license = "MIT",
}
dependencies = {
  "lua >= 5.1",
}
external_dependencies = {
  LIBPQ = { header = "libpq-fe.h", library = "pq" },
  HIREDIS = { header = "hiredis/hiredis.h", library = "hiredis" },
  MICROHTTPD = { header = "microhttpd.h", library = "microhttpd" },
}
build = {
  type = "builtin",
  modules = {
    ["flash.core"] = {
      sources = { "src/core/fl_json.c", "src/core/fl_value.c", "src/core/fl_pgoutput.c", "src/core/fl_record.c",
                  "src/core/fl_binary.c", "src/core/fl_spill.c", "src/core/fl_queue.c", "src/core/fl_ticker.c",
                  "src/pq/fl_stream.c", "src/pq/fl_pqconn.c",
                  "src/lua/lerr.c", "src/lua/lvalue.c", "src/lua/lconn.c",
                  "src/lua/lrepl.c", "src/lua/lredis.c", "src/lua/lhttp.c", "src/lua/lworkers.c", "src/lua/lcore.c" },
      libraries = { "pq", "hiredis", "microhttpd", "pthread" },
      incdirs = { "$(LIBPQ_INCDIR)", "src/core", "src/pq", "src/lua" },
      libdirs = { "$(LIBPQ_LIBDIR)" },
    },
    ["flash"] = "lua/flash/init.lua",
    ["flash.ack"] = "lua/flash/ack.lua",
    ["flash.args"] = "lua/flash/args.lua",
    ["flash.backfill"] = "lua/flash/backfill.lua",
    ["flash.catalog"] = "lua/flash/catalog.lua",
    ["flash.cli"] = "lua/flash/cli.lua",
    ["flash.client"] = "lua/flash/client.lua",
    ["flash.compare"] = "lua/flash/compare.lua",
    ["flash.jitfix"] = "lua/flash/jitfix.lua",
    ["flash.json"] = "lua/flash/json.lua",
    ["flash.listener"] = "lua/flash/listener.lua",
    ["flash.loop"] = "lua/flash/loop.lua",
    ["flash.luajit"] = "lua/flash/luajit.lua",
    ["flash.where"] = "lua/flash/where.lua",
    ["flash.sink.redis"] = "lua/flash/sink/redis.lua",
    ["flash.log"] = "lua/flash/log.lua",
    ["flash.metrics"] = "lua/flash/metrics.lua",
    ["flash.sandbox"] = "lua/flash/sandbox.lua",
    ["flash.slots"] = "lua/flash/slots.lua",
    ["flash.workers"] = "lua/flash/workers.lua",
    ["flash.driver"] = "lua/flash/driver/init.lua",
    ["flash.driver.base"] = "lua/flash/driver/base.lua",
    ["flash.driver.capture"] = "lua/flash/driver/capture.lua",
    ["flash.driver.trigger"] = "lua/flash/driver/trigger.lua",
    ["flash.driver.trigger_global"] = "lua/flash/driver/trigger_global.lua",
    ["flash.driver.trigger_statement"] = "lua/flash/driver/trigger_statement.lua",
    ["flash.driver.wal_logical"] = "lua/flash/driver/wal_logical.lua",
    ["flash.driver.handover"] = "lua/flash/driver/handover.lua",
    ["flash.driver.pg_extension"] = "lua/flash/driver/pg_extension.lua",
    ["flash.driver.redis_streams"] = "lua/flash/driver/redis_streams.lua",
  },
}
