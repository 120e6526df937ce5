-- flash: the public Lua API (API.md): flash.client, the loop (flash.run, flash.stop,
-- flash.on_stop), timers, and the values and modules a script uses. The C core (flash.core)
-- owns connections and value decoding; flash.client, flash.listener, flash.loop, flash.where
-- and flash.catalog the rest (docs/architecture.md).
require "flash.luajit"   -- first: the workarounds for the linked LuaJIT's bugs (flash.luajit)
local core = require "flash.core"
local log = require "flash.log"
local json = require "flash.json"
local client = require "flash.client"
local loop = require "flash.loop"

local flash = {
  null = core.null,
  unchanged = core.unchanged,
  version = "0.1.0",
  log = log,
  json = json,
  -- Markers on decoded values (see flash.json): arrays, JSON objects, exact JSON numbers.
  array_mt = core.array_mt,
  object_mt = core.object_mt,
  number_mt = core.number_mt,
}

-- flash.sink.<name>{...}: a sink (lua/flash/sink/), e.g. flash.sink.redis{ url = ... }.
flash.sink = setmetatable({}, { __index = function(_, name)
  return require("flash.sink." .. name).new
end })

-- The loop of this Lua state: every client flash.client makes, the timers, the stop hooks
-- and the host's defaults belong to it (flash.loop), not to this module.
-- Each call below is a tail call, so that a bad argument is reported at the script's line.
local default = loop.new()

-- Defaults the host sets from its command line (-d, --driver, --sandbox).
flash.defaults = default.defaults

-- flash.client(opts) -> client | nil, err
function flash.client(opts) return client.new(default, opts) end

-- flash.connect(dsn | opts) -> client | nil, err: a client that only runs queries. It has
-- no driver, creates nothing in the database, and its listen raises.
function flash.connect(opts)
  if type(opts) == "string" then
    opts = { dsn = opts }
  elseif opts ~= nil and type(opts) ~= "table" then
    error("bad argument #1 to 'connect' (DSN string or options table expected, got " .. type(opts) .. ")", 2)
  end
  return client.new(default, opts, true)
end

function flash.on_stop(fn) return default:on_stop(fn) end
function flash.every(seconds, fn) return default:every(seconds, fn) end
function flash.after(seconds, fn) return default:after(seconds, fn) end

-- flash.run([opts]): runs every open client (and the timers) until flash.stop() or a signal.
function flash.run(opts)
  local list = {}
  for _, c in ipairs(default.clients) do list[#list + 1] = c end
  return default:run(list, opts)
end

function flash.stop() return default:stop() end

-- flash.metrics{ listen = "ADDR:PORT" }: /metrics and /healthz served from the loop
-- (flash.metrics module); server | nil, err.
function flash.metrics(opts)
  if type(opts) ~= "table" or type(opts.listen) ~= "string" then
    error("bad argument #1 to 'metrics' ({ listen = \"ADDR:PORT\" } expected)", 2)
  end
  return require("flash.metrics").start(flash, opts)
end

-- For the host (flash.cli).
function flash._take_stop_failure() return default:take_stop_failure() end
function flash._pending() return default:pending() end
function flash._clients() return default.clients end
function flash._last_failure() return default.last_failure end
function flash._add_source(src) return default:add_source(src) end
function flash._remove_source(src) return default:remove_source(src) end

return flash
