-- examples/scale_handlers.lua: the handlers of examples/scale_worker.lua. Each worker state
-- runs this file once, with the client's `config` and its own number; it returns the
-- functions listener:on(ops, "name") names. Nothing here is shared between states.
local config, state = ...
local core = require "flash.core"
local json = require "flash.json"

return {
  show = function(ev)
    -- Stands for a slow call (an HTTP API, another database): other states go on meanwhile.
    if config.delay > 0 then core.sleep(config.delay) end
    io.stdout:write(string.format("state %d  %-6s %s %s\n", state, ev.op, ev.table, json.encode(ev.new or ev.old)))
    io.stdout:flush()
  end,
}
