-- flash.driver: the registry of drivers (docs/architecture.md, "The driver contract").
--
-- A driver is one module, flash.driver.<name>, that returns
--   { OPTIONS = { name = spec, ... }, new = function(client) -> driver object }
-- where a spec is a Lua type name ("string", "number", "boolean"), true (any type), or
-- { type = ..., check = function(value, opts) -> nil | "what is expected" }. Adding a
-- driver: write that module, add its name to NAMES (and the module to the rockspec), add
-- it to the conformance matrix (spec/70) -- nothing else names drivers.
local M = {}

M.NAMES = { "trigger", "trigger_global", "trigger_statement", "wal_logical", "pg_extension", "redis_streams" }
M.DEFAULT = "trigger"
-- Drivers the conformance specs (spec/10, 15, 70, 81: H.drivers) do not run over yet, and why.
M.PARTIAL = {
  redis_streams = "a worker of events another flashlua captured: spec/66, spec/67 (issue 13)",
}

-- Options every client takes, whatever its driver.
M.COMMON_OPTIONS = {
  dsn = "string",
  driver = "string",
  name = "string",   -- how log lines name the client (default "client N DRIVER db=DATABASE")
  on_error = true,
  numeric = { type = "string", check = function(v)
    if v ~= "string" and v ~= "number" then return "\"string\" or \"number\" expected, got " .. tostring(v) end
  end },
  shutdown_timeout = { type = "number", check = function(v)
    if not (v >= 0 and v < math.huge) then return "a number of seconds >= 0 expected, got " .. tostring(v) end
  end },
  persistent = "boolean",
  ack = { type = "string", check = function(v)
    if v ~= "auto" and v ~= "manual" then return "\"auto\" or \"manual\" expected, got " .. string.format("%q", v) end
  end },
  -- Parallel handler states (flash.workers, docs/scale-out.md).
  workers = { type = "number", check = function(v)
    if not (v >= 1 and v <= 1024 and v == math.floor(v)) then
      return "a whole number of worker states from 1 to 1024 expected, got " .. tostring(v)
    end
  end },
  handlers = { type = "string", check = function(_, opts) return M.needs_workers(opts) end },
  config = { type = true, check = function(_, opts) return M.needs_workers(opts) end },
  worker_queue = { type = "number", check = function(v, opts)
    if not (v >= 1 and v < math.huge and v == math.floor(v)) then
      return "a whole number of events >= 1 expected, got " .. tostring(v)
    end
    return M.needs_workers(opts)
  end },
  max_unacked = { type = "number", check = function(v)
    if not (v >= 1 and v < math.huge and v == math.floor(v)) then
      return "a whole number of events >= 1 expected, got " .. tostring(v)
    end
  end },
}

-- handlers, config and worker_queue mean nothing without workers: silently ignored, the
-- script failed later at on(ops, "name") with "function expected, got string".
function M.needs_workers(opts)
  if opts.workers == nil then
    return "goes with option 'workers', the number of parallel handler states (workers = 1 runs the " ..
      "handlers in one state)"
  end
end

local known = {}
for _, n in ipairs(M.NAMES) do known[n] = true end

function M.exists(name) return known[name] == true end

-- "trigger, trigger_global, trigger_statement or wal_logical"
function M.list()
  return table.concat(M.NAMES, ", ", 1, #M.NAMES - 1) .. " or " .. M.NAMES[#M.NAMES]
end

-- The driver module `name`, or nil and why.
function M.load(name)
  if not known[name] then return nil, string.format("unknown driver '%s' (expected %s)", tostring(name), M.list()) end
  local ok, mod = pcall(require, "flash.driver." .. name)
  if not ok then return nil, mod end
  return mod
end

-- Every option any driver takes, with its spec and the drivers that declare it: one
-- script can switch drivers by changing one word (another driver's options are accepted
-- and ignored).
function M.options()
  if M._options then return M._options end
  local all = {}
  for k, spec in pairs(M.COMMON_OPTIONS) do all[k] = { spec = spec, drivers = "every driver" } end
  for _, n in ipairs(M.NAMES) do
    local mod = assert(M.load(n))
    for k, spec in pairs(mod.OPTIONS or {}) do
      local have = all[k]
      if have then
        if have.drivers ~= "every driver" then have.drivers = have.drivers .. ", " .. n end
      else
        all[k] = { spec = spec, drivers = n }
      end
    end
  end
  M._options = all
  return all
end

return M
