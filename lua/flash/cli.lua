-- flash.cli: the `flashlua` command line (API.md "Command line"). main(argv) returns the
-- exit status: 0 after a clean stop, 1 on a runtime error, 2 on a usage error.
require "flash.luajit"   -- first: the workarounds for the linked LuaJIT's bugs (flash.luajit)
local M = {}

local USAGE = [[
usage: flashlua [options] script.lua [args...]
       flashlua [options] --table SCHEMA.TABLE [--ops insert,update] [--fields a,b] [--where COND] [--backfill]

Runs a Lua script that listens to row changes in PostgreSQL (see `require "flash"`);
when the script returns, runs every client it opened until SIGINT/SIGTERM or flash.stop().
Without a script, --table prints each event of one table as a JSON line.

options:
  -d, --dsn DSN          default connection string for clients that give none
                         (else FLASH_DSN, DATABASE_URL, then libpq's PG* variables)
      --driver NAME      default driver: trigger (default), trigger_global,
                         trigger_statement, wal_logical, pg_extension (lua/flash/driver/)
  -l, --log-level LEVEL  error, warn, info (default), debug, trace
      --log-format FMT   text (default) or json: one JSON object per line on stderr
                         (ts, level, msg, client, db; --stats values as fields)
      --sandbox          start a throwaway local PostgreSQL (wal_level=logical) for this
                         run, point the default DSN at it, remove it at exit
  -e CODE                run CODE before the script (may be repeated)
      --stats            a progress line on stderr every second: time, events/s,
                         events, errors, seconds in callbacks, lag
      --metrics ADDR:PORT
                         serve Prometheus metrics at http://ADDR:PORT/metrics and a
                         health check at /healthz (200 while every client streams,
                         503 and the reason otherwise); [::1]:PORT for IPv6, :PORT for
                         every address
      --table NAME       no script: print each event of table NAME as one JSON line
      --ops LIST         with --table: operations, of insert, update, delete,
                         truncate, all (default all; repeated, the lists add up)
      --fields LIST      with --table: columns to carry (default all), separated by
                         commas; a name as it is or "double quoted" (as in --where);
                         repeated, the lists add up
      --where COND       with --table: a condition (may be repeated; all must hold):
                           COL = VALUE   (also <>, !=, <, <=, >, >=)
                           COL is null,  COL is not null
                           COL in (VALUE, VALUE, ...)
                         COL as it is or "double quoted"; VALUE a bare word or
                         'single quoted' ('' for a quote); compared as the column's type;
                         a bare null is NULL: COL = null is COL is null
      --backfill         with --table: first every existing row (op "read"), then the
                         changes; wal_logical (the default with --backfill) or a
                         trigger driver (--driver trigger)
      --to redis://HOST[:PORT] | unix:///PATH
                         with --table: append each event to Redis Streams instead
                         (flash:0 .. flash:N-1, by table + key; docs/scale-out.md),
                         confirming to a persistent slot only what Redis holds
      --partitions N     with --to: the number of streams (default 1)
      --slot NAME        with --to: the persistent replication slot and publication
                         (default flash_replication and flash_publication: one
                         capturer per database; give each further one its own,
                         e.g. flash_orders)
      --replica-identity full
                         with --table under wal_logical: set REPLICA IDENTITY FULL on
                         the table (and its partitions) when it lacks it, so updates and
                         deletes carry the old row (replica_identity = "full")
  slots [list | drop NAME], schemas [list | drop NAME]
                         the same as the four options below
      --list-slots       list flashlua's replication slots in the database (-d): name,
                         plugin, active pid, WAL retained, confirmed position; exit
      --drop-slot NAME   drop flashlua's inactive replication slot NAME and exit
                         (exit 1 when it is in use or is not one of flashlua's)
      --list-schemas     list the trigger drivers' persistent schemas (persistent =
                         true) in the database (-d): name, tables with triggers,
                         captured changes waiting, whether a flashlua runs on it; exit
      --drop-schema NAME drop persistent schema NAME with its triggers and what it
                         captured, and exit (exit 1 when a flashlua runs on it or it is
                         not a persistent flashlua schema)
  -v, --version          print the version and exit
  -h, --help             print this help and exit

--ops, --fields, --where, --backfill and --to go with --table only (a usage error with a
script).

exit status: 0 after a clean stop, 1 on a runtime error (--table: also once the reader of
stdout has gone), 2 on a usage error; 130/143/129 when a second SIGINT/SIGTERM/SIGHUP ends
it at once (SIGHUP stops gracefully as they do, unless ignored: nohup).
examples:
  flashlua --sandbox examples/demo.lua
  flashlua -d postgres://localhost/app --table public.posts --ops insert,update
  flashlua --table shop.orders --where "customer_id in (1, 2)" --where "note is not null"
  flashlua --table public.orders --to redis://127.0.0.1:6379 --partitions 4 --replica-identity full
]]

-- A runtime failure on stderr, whatever the log level: "flashlua: MSG", or under
-- --log-format json an error object.
local function fatal(msg)
  require("flash.log").record("error", "flashlua: " .. tostring(msg), tostring(msg), nil, true)
end

local function usage_error(msg)
  io.stderr:write("flashlua: ", msg, "\n", "Try 'flashlua --help' for more information.\n")
  return 2
end

local function split_list(s)
  local t = {}
  for item in s:gmatch("[^,]+") do t[#t + 1] = item:match("^%s*(.-)%s*$") end
  return t
end

-- --fields: names separated by commas, each as it is (spaces around it dropped) or "double
-- quoted" ("" for a quote; a comma or spaces kept), as COLUMN in --where. A list, or nil
-- and what could not be read.
local function split_names(s)
  local t, p = {}, 1
  while true do
    p = s:find("%S", p) or #s + 1
    local name
    if s:sub(p, p) == '"' then
      local buf, j = {}, p + 1
      while true do
        local k = s:find('"', j, true)
        if not k then return nil, "unterminated quoted column name" end
        buf[#buf + 1] = s:sub(j, k - 1)
        if s:sub(k + 1, k + 1) ~= '"' then p = k + 1 break end
        buf[#buf + 1] = '"'
        j = k + 2
      end
      name = table.concat(buf)
      p = s:find("%S", p) or #s + 1
      if p <= #s and s:sub(p, p) ~= "," then return nil, "expected ',' after a quoted column name" end
    else
      local k = s:find(",", p, true) or #s + 1
      name = s:sub(p, k - 1):match("^(.-)%s*$")
      p = k
    end
    if name ~= "" then t[#t + 1] = name end
    if p > #s then return t end
    p = p + 1
  end
end

-- --where's grammar (also in USAGE):
--   COLUMN OP VALUE          OP: = <> != < <= > >=
--   COLUMN is [not] null
--   COLUMN in (VALUE, ...)
-- COLUMN is a name as it is, or "double quoted"; VALUE is 'single quoted' ('' for a quote)
-- or a bare word (everything up to the end, a comma or a parenthesis). Values stay strings:
-- the listener compares them as the column's own type.
-- Returns { column, op [, value] } or nil and what could not be read.
local function parse_where(s)
  local p = 1
  local function skip() p = s:find("%S", p) or #s + 1 end
  local function quoted(q, what)
    local buf, j = {}, p + 1
    while true do
      local k = s:find(q, j, true)
      if not k then return nil, "unterminated " .. what end
      buf[#buf + 1] = s:sub(j, k - 1)
      if s:sub(k + 1, k + 1) ~= q then p = k + 1 return table.concat(buf) end
      buf[#buf + 1] = q
      j = k + 2
    end
  end
  local function value(stop)
    skip()
    if s:sub(p, p) == "'" then return quoted("'", "quoted value") end
    local v = stop and s:match("^[^" .. stop .. "]*", p) or s:sub(p)
    p = p + #v
    v = v:match("^(.-)%s*$")
    if v == "" then return nil, "a value is missing" end
    return v
  end
  skip()
  local col, err
  if s:sub(p, p) == '"' then
    col, err = quoted('"', "quoted column name")
    if not col then return nil, err end
  else
    col = s:match("^[^%s=<>!]+", p)
    if not col then return nil, "a column name is missing" end
    p = p + #col
  end
  skip()
  local rest = s:sub(p):lower():gsub("%s+", " "):gsub(" $", "")
  if rest == "is null" or rest == "is not null" then return { col, rest } end
  if s:find("^[iI][nN]%f[^%w_]", p) then
    p = p + 2
    skip()
    local vals = {}
    if s:sub(p, p) ~= "(" then return nil, "'in' needs a list in parentheses: in (a, b)" end
    p = p + 1
    repeat
      local bare = s:sub(s:find("%S", p) or p, s:find("%S", p) or p) ~= "'"
      local v, verr = value(",)")
      if not v then return nil, verr end
      if bare and v:lower() == "null" then
        return nil, "a bare null in an 'in' list matches nothing: 'null' in quotes is the text, and " ..
          "'" .. col .. " is null' a condition of its own"
      end
      vals[#vals + 1] = v
      skip()
      local c = s:sub(p, p)
      p = p + 1
      if c ~= "," and c ~= ")" then return nil, "expected ',' or ')' in the 'in' list" end
    until c == ")"
    skip()
    if p <= #s then return nil, "unexpected text after the 'in' list" end
    return { col, "in", vals }
  end
  for _, op in ipairs({ "<>", "!=", "<=", ">=", "=", "<", ">" }) do
    if s:sub(p, p + #op - 1) == op then
      p = p + #op
      local bare = s:sub(s:find("%S", p) or p, s:find("%S", p) or p) ~= "'"
      local v, verr = value(nil)
      if not v then return nil, verr end
      skip()
      if p <= #s then return nil, "unexpected text after the value" end
      -- A bare null is SQL's NULL, as flash.null is in a script's where: "= null" is
      -- "is null" (it compared with the text 'null', which the rows whose column holds that
      -- text matched); 'null' in quotes is the text.
      if bare and v:lower() == "null" then
        if op == "=" then return { col, "is null" } end
        if op == "<>" or op == "!=" then return { col, "is not null" } end
        return nil, "nothing is " .. op .. " null: use 'is null' or 'is not null' ('null' in quotes is the text)"
      end
      return { col, op, v }
    end
  end
  return nil, "no operator"
end

-- Operations --ops takes (with --backfill "read" is added by itself).
local CLI_OPS = { insert = true, update = true, delete = true, truncate = true, all = true }
-- Options that shape --table's listener (a script sets up its own listeners): the first
-- one given, or nil.
local function table_only(o)
  if o.ops then return "--ops" end
  if o.fields then return "--fields" end
  if #o.where > 0 then return "--where" end
  if o.backfill then return "--backfill" end
  if o.to then return "--to" end
  if o.replica_identity then return "--replica-identity" end
end

-- The options that take a value; one of them where a value was due is a forgotten value
-- (`--fields --table t` would read "--table" as the fields and `t` as the script).
local VALUED = {}
for _, name in ipairs({ "-d", "--dsn", "--driver", "-l", "--log-level", "--log-format", "-e", "--metrics",
                        "--table", "--ops", "--fields", "--to", "--replica-identity", "--partitions", "--slot",
                        "--drop-slot", "--drop-schema", "--where" }) do
  VALUED[name] = true
end
local FLAGS = {}
for _, name in ipairs({ "-h", "--help", "-v", "--version", "--sandbox", "--stats", "--backfill", "--list-slots",
                        "--list-schemas" }) do
  FLAGS[name] = true
end

-- The option an unknown one was probably meant to be (--feilds, --tabel, -table), or nil.
function M.nearest_option(a)
  local long = {}
  for _, set in ipairs({ VALUED, FLAGS }) do
    for opt in pairs(set) do
      if opt:sub(1, 2) == "--" then long[opt:sub(3)] = true end
    end
  end
  local near = require("flash.args").nearest((a:gsub("^%-+", "")), long)
  return near and ("--" .. near)
end

local function parse_args(argv)
  local o = { exprs = {}, where = {} }
  local i = 1
  local function value(name)
    i = i + 1
    local v = argv[i]
    if v == nil then error({ usage = "option " .. name .. " needs a value" }) end
    local opt = v:match("^(%-%-?[%w%-]+)=") or v
    if VALUED[opt] or FLAGS[opt] then
      error({ usage = string.format("option %s needs a value, but the option %s follows it", name, opt) })
    end
    return v
  end
  while i <= #argv do
    local a = argv[i]
    local long, inline = a:match("^(%-%-[%w%-]+)=(.*)$")
    if long then a = long end
    local function val(name)
      if inline then local v = inline; inline = nil; return v end
      return value(name)
    end
    if a == "-h" or a == "--help" then o.help = true
    elseif a == "-v" or a == "--version" then o.version = true
    elseif a == "-d" or a == "--dsn" then o.dsn = val(a)
    elseif a == "--driver" then
      o.driver = val(a)
      local registry = require "flash.driver"
      if not registry.exists(o.driver) then
        error({ usage = string.format("unknown driver '%s' for --driver (expected %s)", o.driver, registry.list()) })
      end
    elseif a == "-l" or a == "--log-level" then o.log_level = val(a)
    elseif a == "--log-format" then o.log_format = val(a)
    elseif a == "--sandbox" then o.sandbox = true
    elseif a == "-e" then o.exprs[#o.exprs + 1] = val(a)
    elseif a == "--stats" then o.stats = true
    elseif a == "--metrics" then
      o.metrics = val(a)
      local ok, why = require("flash.metrics").parse_address(o.metrics)
      if not ok then error({ usage = string.format("cannot read --metrics '%s': %s", o.metrics, why) }) end
    elseif a == "--table" then
      local t = val(a)
      if o.table then
        error({ usage = string.format("--table given twice ('%s', '%s'): one table per run " ..
          "(a script listens to several: client:listen for each)", o.table, t) })
      end
      o.table = t
    elseif a == "--ops" then
      -- Repeated, the lists add up (as --where's conditions do).
      o.ops = o.ops or {}
      for _, op in ipairs(split_list(val(a))) do
        if not CLI_OPS[op] then
          error({ usage = string.format("unknown operation '%s' for --ops (expected insert, update, delete, truncate or all)", op) })
        end
        o.ops[#o.ops + 1] = op
      end
    elseif a == "--fields" then
      local list = val(a)
      local names, why = split_names(list)
      if not names then error({ usage = string.format("cannot read --fields '%s': %s", list, why) }) end
      o.fields = o.fields or {}
      for _, n in ipairs(names) do o.fields[#o.fields + 1] = n end
    elseif a == "--backfill" then o.backfill = true
    elseif a == "--to" then
      o.to = val(a)
      local ok, _, why = require("flash.sink.redis").parse_url(o.to)
      if not ok then
        error({ usage = string.format("--to takes %s, got '%s'%s", require("flash.sink.redis").URL_FORMS, o.to,
          why and " (" .. why .. ")" or "") })
      end
    elseif a == "--replica-identity" then
      local v = val(a)
      if v ~= "full" then
        error({ usage = string.format("--replica-identity takes 'full' (the only identity that carries whole old rows), got '%s'", v) })
      end
      o.replica_identity = v
    elseif a == "--slot" then
      o.slot = val(a)
      if not o.slot:match("^[a-z0-9_]+$") or #o.slot > 63 then
        error({ usage = string.format("--slot takes a replication slot name: lower-case letters, digits and _, " ..
          "at most 63 (e.g. flash_orders), got '%s'", o.slot) })
      end
    elseif a == "--partitions" then
      local v = val(a)
      o.partitions = tonumber(v)
      if not (o.partitions and o.partitions >= 1 and o.partitions <= 1024 and o.partitions == math.floor(o.partitions)) then
        error({ usage = string.format("--partitions takes a whole number from 1 to 1024, got '%s'", v) })
      end
    elseif a == "--list-slots" then o.list_slots = true
    elseif a == "--drop-slot" then o.drop_slot = val(a)
    elseif a == "--list-schemas" then o.list_schemas = true
    elseif a == "--drop-schema" then o.drop_schema = val(a)
    elseif a == "--where" then
      local w = val(a)
      local cond, why = parse_where(w)
      if not cond then
        error({ usage = string.format("cannot read --where '%s': %s (expected col = value, col <> value, " ..
          "col >= value, col is null, col is not null, col in (a, b); see --help)", w, why) })
      end
      o.where[#o.where + 1] = cond
    elseif a == "--" then
      i = i + 1
      break
    elseif a:sub(1, 1) == "-" and a ~= "-" then
      local near = M.nearest_option(a)
      error({ usage = "unknown option '" .. a .. "'" .. (near and (" (did you mean " .. near .. "?)") or "") })
    else
      break
    end
    i = i + 1
  end
  -- `flashlua [options] slots [list | drop NAME]` and `schemas [list | drop NAME]`: the
  -- same as --list-slots / --drop-slot NAME (--list-schemas / --drop-schema NAME), unless
  -- a file of that name is the script.
  local sub, verb = argv[i], argv[i + 1]
  if (sub == "slots" or sub == "schemas") and not io.open(sub, "r") then
    local what = sub == "slots" and "slot" or "schema"
    if verb == nil or verb == "list" then
      o["list_" .. sub] = true
      if argv[i + (verb and 2 or 1)] ~= nil then error({ usage = sub .. " list takes no argument" }) end
    elseif verb == "drop" then
      local name = argv[i + 2]
      if name == nil or argv[i + 3] ~= nil then error({ usage = sub .. " drop takes one " .. what .. " name" }) end
      o["drop_" .. what] = name
    else
      error({ usage = string.format("unknown %s command '%s' (expected list or drop NAME)", sub, verb) })
    end
    return o
  end
  o.script = argv[i]
  o.script_index = i
  return o
end

-- One JSON line per event, by flash.json: arrays stay arrays (empty ones too), numbers keep
-- every digit; flash.null is null, flash.unchanged the string "<unchanged>".
local ENCODE_OPTS = { unchanged = "<unchanged>" }

local function table_mode(flash, o)
  local core = require "flash.core"
  local encode = flash.json.encode
  -- A backfill needs wal_logical: it is the default driver then.
  -- Failures are the user's: their message alone, without a position in this file.
  local client, err
  if o.to then
    -- Redis confirms what the slot may forget: wal_logical (unless --driver says otherwise)
    -- with a persistent slot and manual acks, acknowledged by the sink.
    client, err = flash.client { driver = flash.defaults.driver or "wal_logical", persistent = true, ack = "manual",
                                 replica_identity = o.replica_identity, slot = o.slot, publication = o.slot }
  else
    client, err = flash.client { driver = o.backfill and not flash.defaults.driver and "wal_logical" or nil,
                                 replica_identity = o.replica_identity }
  end
  if not client then error(err, 0) end
  local listener
  listener, err = client:listen {
    table = o.table, fields = o.fields, where = #o.where > 0 and o.where or nil,
  }
  if not listener then error(err, 0) end
  if o.to then
    -- Said before anything starts: --fields without the key would send every event to one stream.
    local _, kerr = require("flash.sink.redis").key_columns(listener)
    if kerr then error(kerr, 0) end
  end
  local ops = o.ops
  if ops and o.backfill then
    ops = { unpack(ops) }
    ops[#ops + 1] = "read"
  end
  if o.backfill then listener:backfill() end
  if o.to then
    listener:on(ops or "all", flash.sink.redis { url = o.to, partitions = o.partitions })
    return
  end
  -- bytea values are raw bytes in Lua, which JSON (UTF-8 text) cannot carry: they are
  -- written as PostgreSQL's to_json writes them, "\\x" and hex (arrays of them alike).
  local BYTEA = 17
  local binary = {}
  for _, c in ipairs(listener.table.columns) do
    if c.oid == BYTEA or c.elem == BYTEA then binary[#binary + 1] = c.name end
  end
  local function hex(v)
    if type(v) == "string" then
      return "\\x" .. v:gsub(".", function(ch) return string.format("%02x", ch:byte()) end)
    elseif type(v) == "table" and v ~= flash.null and v ~= flash.unchanged then
      local t = {}
      for i, x in ipairs(v) do t[i] = hex(x) end
      return t
    end
    return v
  end
  listener:on(ops or "all", function(ev)
    for _, name in ipairs(binary) do
      for _, row in ipairs({ ev.new or false, ev.old or false }) do
        if row and row[name] ~= nil then row[name] = hex(row[name]) end
      end
    end
    -- A reader that has gone (`flashlua --table t | head -1`: EPIPE, SIGPIPE is ignored)
    -- fails the callback: the client stops gracefully, and the event it could not write
    -- is not acknowledged.
    local ok, werr = core.write_stdout(encode(ev, ENCODE_OPTS) .. "\n")
    if not ok then error("cannot write the event to stdout (" .. tostring(werr) .. "): stopping", 0) end
  end)
end

-- Every second on stderr: the time, events/s and totals summed over the open clients,
-- errors, time spent in callbacks, lag and backfill progress.
local function stats_timer(flash, core)
  local last_events, last_t = 0, core.now()
  flash.every(1, function()
    local now = core.now()
    local total, errors, handler, lag, bf = 0, 0, 0, nil, {}
    -- Clients are internal to flash; the public stats of each open one are summed.
    for _, c in ipairs(flash._clients()) do
      local s = c:stats()
      total, errors, handler = total + s.events, errors + s.errors, handler + s.handler_seconds
      if s.lag_bytes then lag = (lag or 0) + s.lag_bytes end
      if s.backfill then
        for _, b in ipairs(s.backfill.tables) do bf[#bf + 1] = "; " .. require("flash.backfill").describe(b) end
      end
    end
    local rate = (total - last_events) / math.max(now - last_t, 1e-6)
    last_events, last_t = total, now
    local fields = { { "events_per_second", math.floor(rate + 0.5) }, { "events", total }, { "errors", errors },
      { "handler_seconds", handler } }
    if lag then fields[#fields + 1] = { "lag_bytes", lag } end
    if #bf > 0 then fields[#fields + 1] = { "backfill", table.concat(bf):sub(3) } end
    flash.log.record("info", string.format("%s flashlua: %.0f events/s, %d events, %d errors, %.3f s in callbacks%s%s",
      os.date("!%Y-%m-%dT%H:%M:%SZ"), rate, total, errors, handler,
      lag and string.format(", lag %d bytes", lag) or "", table.concat(bf)), "stats", fields, true)
  end)
end

-- The first column's width: 32, or the longest name (up to 63 bytes), so the columns stay
-- aligned.
local function name_width(rows)
  local w = 32
  for _, r in ipairs(rows) do w = math.max(w, #r.name) end
  return w
end

-- --list-slots / --drop-slot NAME / --list-schemas / --drop-schema NAME: what flashlua
-- keeps in the database between runs.
local function slots_mode(flash, o)
  local slots = require "flash.slots"
  if o.script or o.table then
    return usage_error(((o.list_slots or o.drop_slot) and "--list-slots and --drop-slot" or "--list-schemas and --drop-schema")
      .. " take no script or --table")
  end
  if o.dsn then flash.defaults.dsn = o.dsn end
  local _, err = pcall(function()   -- err: an error raised, or the failure returned
    local c, cerr = flash.client {}
    if not c then return cerr end
    local fail
    local capture = require "flash.driver.capture"
    if o.drop_schema then
      local left, derr = capture.drop_persistent(c, o.drop_schema)
      if left then
        io.stdout:write(string.format("dropped schema %s and its triggers (%d captured changes discarded)\n",
          o.drop_schema, left))
      else
        fail = derr
      end
    elseif o.list_schemas then
      local rows, lerr = capture.persistent_schemas(c)
      if not rows then
        fail = lerr
      else
        local w = name_width(rows)
        io.stdout:write(string.format("%-" .. w .. "s %8s %10s  %s\n", "schema", "tables", "backlog", "in use"))
        for _, r in ipairs(rows) do
          io.stdout:write(string.format("%-" .. w .. "s %8d %10d  %s\n", r.name, r.tables, r.backlog,
            r.in_use and "yes" or "no"))
        end
      end
    elseif o.drop_slot then
      local dok, derr = slots.drop(c.conn, o.drop_slot)
      if dok then io.stdout:write("dropped replication slot ", o.drop_slot, "\n") else fail = derr end
    else
      local rows, lerr = slots.list(c.conn)
      if not rows then
        fail = lerr
      else
        local w = name_width(rows)
        io.stdout:write(string.format("%-" .. w .. "s %-10s %-8s %12s  %s\n", "slot", "plugin", "active", "WAL held",
          "confirmed"))
        for _, r in ipairs(rows) do
          io.stdout:write(string.format("%-" .. w .. "s %-10s %-8s %12s  %s\n", r.name, r.plugin or "-",
            r.active_pid and tostring(r.active_pid) or "no", r.lost and "lost" or slots.mb(r.retained),
            r.confirmed or "-"))
        end
      end
    end
    c:stop()
    return fail
  end)
  if err then fatal(tostring(err)) return 1 end
  return 0
end

local function run(argv)
  local ok, o = pcall(parse_args, argv)
  if not ok then
    if type(o) == "table" and o.usage then return usage_error(o.usage) end
    error(o, 0)
  end
  local flash = require "flash"
  local core = require "flash.core"
  if o.help then io.stdout:write(USAGE) return 0 end
  if o.version then io.stdout:write("flashlua ", flash.version, "\n") return 0 end
  if o.log_level then
    local lok, lerr = flash.log.set_level(o.log_level)
    if not lok then return usage_error(lerr) end
  end
  if o.log_format then
    local fok, ferr = flash.log.set_format(o.log_format)
    if not fok then return usage_error(ferr) end
  end
  if o.list_slots or o.drop_slot or o.list_schemas or o.drop_schema then return slots_mode(flash, o) end
  local only = not o.table and table_only(o)
  if only then
    return usage_error(only .. " goes with --table; a script chooses this itself (client:listen, listener:on)")
  end
  if o.partitions and not o.to then return usage_error("--partitions goes with --to") end
  if o.slot and not o.to then
    return usage_error("--slot goes with --to (a script names its slot: flash.client{ slot = ..., publication = ... })")
  end
  if not o.script and not o.table and #o.exprs == 0 then
    return usage_error("no script given")
  end
  if o.script and o.table then
    return usage_error("give a script or --table, not both")
  end
  if o.table and o.driver == "redis_streams" then
    -- The worker side reads what a capturer's --to wrote; its url, group and partitions
    -- are client options, which --table has no way to give.
    return usage_error("--driver redis_streams is a worker of the streams --to writes, not a capture: run it from " ..
      "a script (flash.client{ driver = \"redis_streams\", url = ..., partitions = ... }: examples/scale_worker.lua)")
  end
  if o.replica_identity then
    -- Another driver's options are accepted and ignored by flash.client (a script switches
    -- drivers by one word), but a flag given on the command line that does nothing is a
    -- mistake to say.
    local registry = require "flash.driver"
    local eff = o.driver or ((o.to or o.backfill) and "wal_logical") or flash.defaults.driver or registry.DEFAULT
    local mod = registry.load(eff)
    if not (mod and mod.OPTIONS and mod.OPTIONS.replica_identity) then
      return usage_error(string.format("--replica-identity has no effect under the %s driver%s: it captures whole " ..
        "old rows itself (leave --replica-identity out, or add --driver wal_logical)", eff,
        o.driver and "" or " (the default)"))
    end
  end
  if o.driver then flash.defaults.driver = o.driver end
  if o.dsn then flash.defaults.dsn = o.dsn end

  local sandbox, metrics
  local function finish(status)
    if metrics then metrics.close() end
    if sandbox then sandbox:stop() end
    return status
  end
  if o.metrics then
    -- Before anything is created in a database: an address that cannot be served is a
    -- usage error, like a bad option.
    local m, merr = flash.metrics { listen = o.metrics }
    if not m then
      io.stderr:write("flashlua: --metrics: ", tostring(merr), "\n")
      return 2
    end
    metrics = m
  end
  if o.sandbox then
    local sb, err = require("flash.sandbox").start { log = function(m) flash.log.debug(m) end }
    if not sb then io.stderr:write("flashlua: --sandbox: ", tostring(err), "\n") return 1 end
    sandbox = sb
    flash.defaults.dsn = sb.dsn
    flash.log.info("sandbox PostgreSQL running: " .. sb.dsn)
  end

  -- The script's own `arg`, as luajit gives it.
  local script_arg = { [-1] = argv[0] or "flashlua", [0] = o.script }
  if o.script then
    for j = o.script_index + 1, #argv do script_arg[#script_arg + 1] = argv[j] end
  end
  _G.arg = script_arg

  local function protected(fn, ...)
    local results = { xpcall(fn, function(e)
      if flash.log.enabled("debug") then return debug.traceback(tostring(e), 2) end
      return tostring(e)
    end, ...) }
    return unpack(results)
  end

  -- From here on SIGINT/SIGTERM only mark a stop: a signal that lands while the script
  -- is still setting up (triggers already created) is taken by the loop, which cleans up.
  core.signals(true)

  for _, code in ipairs(o.exprs) do
    local chunk, err = loadstring(code, "=(command line)")
    if not chunk then fatal(err) return finish(1) end
    local eok, eerr = protected(chunk)
    if not eok then fatal(eerr) return finish(1) end
  end

  if o.table then
    local tok, terr = protected(table_mode, flash, o)
    if not tok then fatal(terr) return finish(1) end
  elseif o.script then
    local chunk, err = loadfile(o.script)
    if not chunk then fatal(err) return finish(1) end
    local sok, serr = protected(chunk, unpack(script_arg, 1, #script_arg))
    if not sok then
      fatal(tostring(serr))
      -- `local c = flash.client{...}` without assert(): the script fails later on the nil;
      -- the failure it ignored is the cause.
      if flash._last_failure() and tostring(serr):find("a nil value", 1, true) then
        fatal("that nil may come from " .. flash._last_failure() ..
          "\n(write assert(flash.client{...}) and assert(client:listen{...}) to stop at the cause)")
      end
      flash.stop()
      return finish(1)
    end
  end

  if not flash._pending() and core.signal_pending() then
    flash.stop()   -- stopped before any loop ran: still remove what the script created
  end
  if flash._pending() then
    if o.stats then stats_timer(flash, core) end
    local rok, rerr = flash.run()
    if not rok then
      flash._take_stop_failure()
      fatal(tostring(rerr))
      return finish(1)
    end
  end
  -- A callback that failed while a client stopped (in a loop the script ran itself, or in
  -- the stop above) makes the run a failure even if the script ignored the result.
  local sfail = flash._take_stop_failure()
  if sfail then
    fatal(sfail)
    return finish(1)
  end
  return finish(0)
end

function M.main(argv)
  local ok, status = pcall(run, argv)
  if not ok then
    fatal(tostring(status))
    return 1
  end
  io.stdout:flush()
  return status
end

M.parse_where = parse_where
return M
