-- flash: the public Lua API (API.md): flash.client, the loop (flash.run, flash.stop,
-- flash.on_stop), timers, and the values and modules a script uses. The C core (flash.core)
-- owns connections and value decoding; flash.client, flash.listener, flash.loop, flash.where
-- and flash.catalog the rest (docs/architecture.md).
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

-- Defaults the host sets from its command line (-d, --driver, --sandbox).
flash.defaults = loop.defaults

-- flash.client(opts) -> client | nil, err
flash.client = client.new

flash.on_stop = loop.on_stop
flash.every = loop.every
flash.after = loop.after

function flash.run(opts)
  local list = {}
  for _, c in ipairs(loop.clients) do list[#list + 1] = c end
  return loop.run(list, opts)
end

flash.stop = loop.stop

-- For the host (flash.cli).
flash._take_stop_failure = loop.take_stop_failure
flash._pending = loop.pending
function flash._clients() return loop.clients end

return flash
