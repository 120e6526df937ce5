-- flash.driver.pg_extension: the `pg_extension` driver. Each listener is a flash.listen() row of
-- the flashlua extension (pgext/); its output plugin filters in the walsender and tags
-- every change with the listeners it is for, so events arrive decided: operation
-- (soft-delete transitions, key split), conditions and columns. The stream, slot, acks and
-- reconnects are the wal_logical driver's (flash.driver.wal_logical), whose methods this one
-- inherits.
local core = require "flash.core"
local log = require "flash.log"
local where = require "flash.where"
local base = require "flash.driver.base"
local wal = require "flash.driver.wal_logical"

local VERSION = "0.1"           -- the extension version this client speaks
local OP_ORDER = { "insert", "update", "delete", "truncate" }

local M = {}
local Driver = base.class(wal.Driver)
-- wal_logical's options (slot, persistent, streaming, stream_memory, ...); `publication` and
-- `binary` are ignored (the plugin sends the types the client reads in binary anyway).
M.OPTIONS = wal.OPTIONS

local fail = base.fail

function M.new(client)
  local self = setmetatable(wal.new(client), Driver)
  local opts = client.opts
  -- The slot's name is also the consumer name the plugin selects listeners by.
  self.slot = opts.slot or (self.persistent and "flash_extension" or ("flash_extension_" .. client.conn:backend_pid()))
  self.consumer = self.slot
  self.publication = self.slot   -- none is created; wal_logical's stop drops only its own name
  self.by_reg = {}              -- [registry id] = listener
  self.defs = {}                -- [registry id] = what it was registered with (column lists, for warnings)
  self.nomatch = 0              -- condition tests the server could not make (counted as no match)
  return self
end

function Driver:lock_key()
  return "ext:" .. self.consumer
end

-- The server: wal_level, and the extension created in this database at this version.
function Driver:check_server()
  local ok, err = wal.Driver.check_server(self)
  if not ok then return nil, err end
  local rows
  rows, err = self:exec([[SELECT (SELECT extversion::text FROM pg_catalog.pg_extension WHERE extname = 'flashlua') AS created,
    (SELECT default_version::text FROM pg_catalog.pg_available_extensions WHERE name = 'flashlua') AS available]])
  if not rows then return nil, err end
  local r = rows[1]
  if r.created == core.null then
    if r.available == core.null then
      return fail("the pg_extension driver needs the flashlua extension, which is not installed on the server",
        "on the database server, from flashlua's source tree: `make install-pgext` (as root; it needs " ..
        "postgresql-server-dev-15), then `CREATE EXTENSION flashlua` in database " .. self.database .. " as a superuser")
    end
    return fail("the flashlua extension is installed on the server but not created in database " .. self.database,
      "run `CREATE EXTENSION flashlua` there as a superuser")
  end
  -- The extension's schema must be its owner's: a schema `flash` another role made before
  -- CREATE EXTENSION is used as it is, and that role may then add functions there (an
  -- overload of flash.listen that our call would pick) that would run as us.
  local owners = self:exec([[SELECT pg_catalog.pg_get_userbyid(n.nspowner)::text AS schema_owner,
      pg_catalog.pg_get_userbyid(e.extowner)::text AS ext_owner, n.nspowner OPERATOR(pg_catalog.=) e.extowner AS ok
    FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace
    WHERE e.extname OPERATOR(pg_catalog.=) 'flashlua']])
  local o = owners and owners[1]
  if o and not o.ok then
    return fail(string.format("schema flash, where the flashlua extension lives, belongs to role %s, not to the " ..
      "extension's owner %s: that role can put functions there that flashlua would call", o.schema_owner, o.ext_owner),
      "as a superuser: DROP EXTENSION flashlua; DROP SCHEMA flash; CREATE EXTENSION flashlua")
  end
  local lib = self:exec("SELECT flash.version() AS v")
  lib = lib and lib[1].v or "unknown"
  if r.created ~= VERSION or lib ~= VERSION then
    return fail(string.format("this client needs flashlua extension %s; database %s has the SQL of %s and the library of %s",
      VERSION, self.database, r.created, lib),
      "install flashlua " .. VERSION .. " on the server (`make install-pgext`) and run `ALTER EXTENSION flashlua UPDATE`")
  end
  return true
end

-- Conditions are checked by the server's flash.listen() at listen time: one that would
-- fail is called in a transaction that is rolled back. A Lua `where` runs here.
function Driver:check(l)
  local logged, lerr = self:check_logged(l)
  if not logged then return nil, lerr end
  l.matcher = where.matcher(l, {})
  local ok = self:exec("SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'flashlua'")
  if not ok or #ok == 0 then return true end          -- start() says what is missing
  local began = self:exec("BEGIN")
  if not began then return true end
  local id, err = self:listen_sql(l, self:definition(l, true))
  self:exec("ROLLBACK")
  if not id then return nil, "cannot listen to " .. l.table_name .. ": " .. err end
  return true
end

local function jstr(s)
  return '"' .. tostring(s):gsub('[%c"\\]', function(c)
    if c == '"' or c == "\\" then return "\\" .. c end
    return string.format("\\u%04x", c:byte())
  end) .. '"'
end

local function pgarray(list)
  if not list then return core.null end
  local out = {}
  for i, v in ipairs(list) do out[i] = '"' .. tostring(v):gsub('[\\"]', "\\%0") .. '"' end
  return "{" .. table.concat(out, ",") .. "}"
end

-- What the server is asked for a listener: the operations it wants (a Lua `where` decides
-- here, so it gets the raw operations it needs), its columns, conditions and key.
function Driver.definition(_, l, any_ops)
  local w = l.predicate and base.needed_ops(l) or l:wanted()
  local ops = {}
  for _, op in ipairs(OP_ORDER) do if w[op] or any_ops then ops[#ops + 1] = op end end
  if #ops == 0 then return nil end
  local conds = {}
  for i, c in ipairs(l.conds) do
    local v = c.value
    if c.op == "is null" or c.op == "is not null" then
      conds[i] = "[" .. jstr(c.column) .. "," .. jstr(c.op) .. "]"
    elseif c.op == "in" then
      local vs = {}
      for j, x in ipairs(v) do vs[j] = jstr(where.literal_text(x)) end
      conds[i] = "[" .. jstr(c.column) .. ",\"in\",[" .. table.concat(vs, ",") .. "]]"
    else
      conds[i] = "[" .. jstr(c.column) .. "," .. jstr(c.op) .. "," .. jstr(where.literal_text(v)) .. "]"
    end
  end
  local cols, pk = l.fields, l.primary_key
  if l.predicate then
    -- The Lua side applies the key split and transitions: it needs the key columns too.
    if cols and pk then
      cols = { unpack(cols) }
      for _, k in ipairs(pk) do cols[#cols + 1] = k end
    end
    pk = nil
  end
  local cond_cols = {}
  for i, c in ipairs(l.conds) do cond_cols[i] = c.column end
  local d = { ops = pgarray(ops), cols = pgarray(cols), pk = pgarray(pk),
              lists = { f = cols or {}, k = pk or {}, c = cond_cols, t = cond_cols },
              conds = #conds > 0 and ("[" .. table.concat(conds, ",") .. "]") or core.null }
  -- The note names the listener by its rank among its table's listeners (l.rank), which a
  -- script that adds or removes listeners of other tables keeps: by its id (creation order
  -- over every table, as until December 2026, still recognised as `legacy`), a restart
  -- without a listener of one table replaced the registrations of the later ones, and what
  -- was committed for them while no instance ran went to registrations nobody read.
  local rest = table.concat({ string.format("%d", l.table.oid), d.ops, tostring(d.cols), tostring(d.conds),
    tostring(d.pk) }, " ")
  d.note = "flashlua table#" .. l.rank .. " " .. rest
  d.legacy = "flashlua #" .. l.id .. " " .. rest
  return d
end

function Driver:listen_sql(l, d)
  local rows, err = self:exec("SELECT flash.listen($1::pg_catalog.oid::pg_catalog.regclass, $2::pg_catalog.text[], " ..
    "$3::pg_catalog.text[], $4::pg_catalog.jsonb, $5::pg_catalog.text[], $6::pg_catalog.text, $7::pg_catalog.text) AS id",
    string.format("%d", l.table.oid), d.ops, d.cols, d.conds, d.pk, self.consumer, d.note)
  if not rows then return nil, (tostring(err):gsub("%s+$", ""):gsub("\nCONTEXT:.*", "")) end
  return rows[1].id
end

-- Makes the registry hold exactly the listeners that want something, in one transaction:
-- an unchanged listener keeps its row (a restart with a persistent slot resumes with the
-- same ids, so nothing committed while it was down is missed), the others are replaced.
--
-- Only a listener of flashlua's own role is kept: flash.listen lets any role that may read
-- a table register a listener under any consumer name, with any note. A superuser sees
-- every role's in flash.my_listeners, and took one another role made under its consumer
-- with its note (only inserts, a condition nothing meets) for its own, unlistened its own,
-- and delivered nothing more for that table, without a word. Others' listeners of this
-- consumer are removed (their changes were sent to this slot for nobody).
function Driver:register_all()
  local rows, err = self:exec("SELECT id, note, owner::pg_catalog.oid OPERATOR(pg_catalog.=) (SELECT r.oid FROM " ..
    "pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) CURRENT_USER) AS mine FROM flash.my_listeners " ..
    "WHERE consumer = $1", self.consumer)
  if not rows then return nil, err end
  local have = {}
  for _, r in ipairs(rows) do
    if r.mine then have[r.note == core.null and "" or r.note] = r.id end
  end
  local ok
  ok, err = self:exec("BEGIN")
  if not ok then return nil, err end
  local by_reg, keep, defs = {}, {}, {}
  for _, l in ipairs(self.client.listeners) do
    local d = not l.dropped and self:definition(l)
    if d then
      -- Or a registration an older flashlua made for it (its note names the id): kept, its
      -- changes are this listener's.
      local id = have[d.note] or have[d.legacy]
      if id and keep[id] then id = nil end
      if not id then
        id, err = self:listen_sql(l, d)
        if not id then
          self:exec("ROLLBACK")
          return fail("cannot listen to " .. l.table_name .. ": " .. err)
        end
      end
      keep[id] = true
      by_reg[id] = l
      defs[id] = d.lists
    end
  end
  -- A replaced registration of the same listener (its table and rank: a definition that
  -- changed since the last run, or an operation added while running) still names the
  -- changes written before this transaction: they stay this listener's (they were lost).
  local retired = self.retired or {}
  local notices = {}
  for _, r in ipairs(rows) do
    if not keep[r.id] then
      ok, err = self:exec("SELECT flash.unlisten($1::pg_catalog.int8)", r.id)
      if not ok then self:exec("ROLLBACK") return nil, err end
      local note = r.mine and r.note ~= core.null and r.note or ""
      local rank, oid = note:match("^flashlua table#(%d+) (%d+) ")
      local lid, loid = note:match("^flashlua #(%d+) (%d+) ")
      for _, l in ipairs(self.client.listeners) do
        if not l.dropped and ((rank and tonumber(rank) == l.rank and tonumber(oid) == l.table.oid) or
            (lid and tonumber(lid) == l.id and tonumber(loid) == l.table.oid)) then
          retired[r.id] = l
          if not self.registered then
            notices[#notices + 1] = { l = l, note = note }
            -- Until its first change under the new registration, the Relation messages
            -- list the old one's columns: no warning that a field is gone (on_relation).
            l.retired_pending = true
          end
          break
        end
      end
    end
  end
  ok, err = self:exec("COMMIT")
  if not ok then return nil, err end
  for id, l in pairs(retired) do by_reg[id] = by_reg[id] or l end
  self.by_reg, self.defs, self.retired, self.registered = by_reg, defs, retired, true
  for _, n in ipairs(notices) do
    log.warn(string.format("listener #%d on %s: its operations, fields or condition are not those of consumer %s's " ..
      "last run (%s): the changes committed before this start were filtered by that definition, and arrive as it " ..
      "captured them (without the columns, rows or operations it did not want)", n.l.id, n.l.table_name,
      self.consumer, n.note))
  end
  return true
end

-- Listeners of non-persistent consumers whose instance is gone (no slot of that name).
function Driver:remove_leftovers()
  return self:exec([[SELECT flash.unlisten(id) FROM flash.my_listeners
    WHERE consumer::pg_catalog.text OPERATOR(pg_catalog.~~) 'flash\_extension\_%' AND consumer::pg_catalog.text OPERATOR(pg_catalog.<>) $1
      AND consumer NOT IN (SELECT slot_name::text FROM pg_catalog.pg_replication_slots)]], self.consumer)
end

function Driver:slot_error(err, state)
  if tostring(err):find("may not be used as an output plugin", 1, true) then
    return fail("the server does not allow the flashlua output plugin: " .. tostring(err):gsub("%s+$", ""),
      "add flashlua to output_plugin_libraries in postgresql.conf (e.g. output_plugin_libraries = " ..
      "'pgoutput, test_decoding, flashlua') and reload the server")
  end
  local opt = tostring(err):match('flashlua output plugin: unknown option "(%w+)"')
  if opt then
    -- binary (always) and streaming (streaming = true) came after the first 0.1 library
    return fail("the server's flashlua library is older than this client: it does not take the option " .. opt,
      "install this flashlua's extension on the server (`make install-pgext`, as root), then start the client again")
  end
  return wal.Driver.slot_error(self, err, state)
end

-- The slot first (a temporary one marks this instance as alive for remove_leftovers), then
-- the listeners, then the stream from the slot's position.
function Driver:open_slot()
  local repl, err = core.replication(self.client:dsn())
  if not repl then return self:slot_error(err) end
  local made, merr = self:make_slot(repl, "flashlua")
  if not made then return nil, merr end
  local ok
  ok, err = self:register_all()
  if not ok then repl:close() return nil, err end
  local cmd = "START_REPLICATION SLOT " .. self:ident(self.slot) .. " LOGICAL 0/0 (consumer " .. self:literal(self.consumer) ..
    ", version " .. self:literal(VERSION) .. ", sticky_tags 'on', binary 'on'" ..
    (self.streaming and ", streaming 'on')" or ")")
  local serr, state
  ok, serr, state = repl:start(cmd, self.proto)
  if not ok then repl:close() return self:slot_error(serr, state) end
  return self:attach(repl)
end

-- A listener added, or whose operations changed, at run time (wal_logical's sync): the
-- registry follows, in WAL order (its events start at that commit).
Driver.sync_publication = Driver.register_all

-- No publication to make again after a reconnect: the registry is the extension's.
function Driver.restore_publication() return true end

-- wal_logical's start() (server check, replica identity, leftovers, then this, then
-- open_slot) with no publication: the instance's lock on its consumer name only.
function Driver:setup_publication()
  local got = self:exec("SELECT pg_catalog.pg_try_advisory_lock(" .. self:lock_sql() .. ") AS ok")
  if not got or not got[1].ok then
    return fail("consumer " .. self.consumer .. " is in use by another running flashlua instance" ..
      (got and self:lock_holder() or ""),
      "give each instance its own `slot`")
  end
  return true
end

-- A started stream: wal_logical's, with the plugin's own messages (prefix "flashlua",
-- other than the listener tags lrepl keeps) going to on_plugin_message.
function Driver:attach(repl)
  local ok, err = wal.Driver.attach(self, repl)
  if not ok then return nil, err end
  repl:on_message("flashlua", function(lsn, content) return self:on_plugin_message(content, lsn) end)
  return true
end

-- Backfill places its chunks with logical messages the plugin does not forward (yet):
-- flash.backfill refuses a driver without this method.
Driver.backfill = false
-- The slot's name is the consumer's: no move to a second temporary slot after a large row.
Driver.hand_over = false

local WARN = {
  f = "column %s is no longer in the table (dropped or renamed); its events no longer carry it",
  k = "primary_key column %s is no longer in the table (dropped); a change of it no longer splits an update",
  c = "column %s of its conditions is no longer in the table (dropped); it matches nothing until it listens again",
  t = "column %s of its conditions changed type; it matches nothing until it listens again",
}

local function int_be(s, at, n)
  local v = 0
  for k = at, at + n - 1 do v = v * 256 + s:byte(k) end
  return v
end

function Driver:warn_column(l, kind, column)
  local key = l.id .. ":" .. kind .. ":" .. column
  if self.warned[key] then return end
  self.warned[key] = true
  log.warn(string.format("listener #%d on %s: " .. WARN[kind], l.id, l.table_name, column))
end

-- The plugin's messages (pgext/README.md): 'A' a listen of this consumer took effect here,
-- 'N' tests of a transaction that could not be made (no match), 'W' columns gone.
function Driver:on_plugin_message(m, lsn)
  local kind = m:sub(1, 1)
  if kind == "A" and #m >= 9 then
    local l = self.by_reg[int_be(m, 2, 8)]
    if l then
      -- Where in the WAL the listener started: it gets every change after this position.
      l.active_lsn = core.lsn(lsn)
      log.debug(string.format("listener #%d on %s active from %s", l.id, l.table_name, l.active_lsn))
    end
    return true
  end
  if kind == "N" and #m >= 9 then
    self.nomatch = self.nomatch + int_be(m, 2, 8)
    return true
  end
  if kind ~= "W" or #m < 11 then return true end
  local id, n = int_be(m, 2, 8), int_be(m, 10, 2)
  local l, lists = self.by_reg[id], self.defs[id]
  if not l or not lists then return true end
  for i = 0, n - 1 do
    local at = 12 + i * 3
    if at + 2 > #m then break end
    local list = m:sub(at, at)
    local col = lists[list] and lists[list][int_be(m, at + 1, 2) + 1]
    if col and WARN[list] then self:warn_column(l, list, col) end
  end
  return true
end

-- A Relation message lists the columns the listeners want, not the table's: a rename is
-- news, and a listened field missing from it (renamed: the registry names columns by
-- number, so the plugin keeps sending it under its new name, which the listener does not
-- ask for).
function Driver:on_relation(relid, schema, name, columns)
  local list = self.by_oid[relid]
  if not list then return end
  self:renamed(relid, schema, name)
  local have = {}
  for _, c in ipairs(columns or {}) do have[c] = true end
  for _, l in ipairs(list) do
    if not l.retired_pending then
      for _, f in ipairs(l.fields or {}) do
        if not have[f] then self:warn_column(l, "f", f) end
      end
    end
  end
end

function Driver:make_dispatch()
  local client = self.client
  local function emit(l, ev) return client:_deliver(l, ev) end
  local last_tag, last_ids = nil, nil     -- a tag holds for many changes: parsed once
  return function(ev, _, tag)
    if not tag or tag:byte(1) ~= 76 then return true end      -- 'L': listener ids follow
    local ids = last_ids
    if tag ~= last_tag then
      ids = {}
      for i = 0, (#tag - 1) / 8 - 1 do
        local id, at = 0, 2 + i * 8
        for k = at, at + 7 do id = id * 256 + tag:byte(k) end
        ids[#ids + 1] = id
      end
      last_tag, last_ids = tag, ids
    end
    local n = #ids
    local source = ev.table
    for i = 1, n do
      local l = self.by_reg[ids[i]]
      if l and l.retired_pending and not self.retired[ids[i]] then l.retired_pending = nil end
      if l and not l.dropped then
        local e = n == 1 and ev or { op = ev.op, id = ev.id, new = ev.new, old = ev.old, lsn = ev.lsn, xid = ev.xid,
                                     commit_time = ev.commit_time }
        e.table, e.source = l.table_name, source
        local r
        if l.predicate then
          r = where.apply(l, e, emit)
        else
          if l.fields then e.new, e.old = where.project(e.new, l.fields), where.project(e.old, l.fields) end
          r = client:_deliver(l, e)
        end
        if r == false or client.failure then return false end
      end
    end
    return true
  end
end

function Driver:stats(s)
  wal.Driver.stats(self, s)
  s.publication = nil
  s.consumer = self.consumer
  s.nomatch = self.nomatch
end

-- The extension dropped while listening (DROP EXTENSION flashlua, e.g. to reinstall it):
-- its registry went with it, and the walsender's plugin finds no listener any more, so
-- nothing was delivered, without a word. Found at the driver's next look (about 1 s): the
-- client stops with the reason (registering again would not bring back what was missed).
function Driver:housekeep()
  wal.Driver.housekeep(self)
  if self.extension_gone then return end
  local rows = self:exec("SELECT pg_catalog.to_regclass('flash.my_listeners') IS NULL AS gone")
  if rows and rows[1] and rows[1].gone == true then
    self.extension_gone = string.format("the flashlua extension was dropped while listening (DROP EXTENSION " ..
      "flashlua; found at %s): its listeners went with it, and changes committed since the drop were not " ..
      "captured (run CREATE EXTENSION flashlua as a superuser, then start flashlua again)",
      os.date("!%Y-%m-%d %H:%M:%SZ", math.floor(core.time())))
  end
end

function Driver:step()
  if self.extension_gone then return nil, self.extension_gone end
  return wal.Driver.step(self)
end

function Driver:stop(confirm)
  local ok, err = wal.Driver.stop(self, confirm)
  if not self.persistent and not self.extension_gone then
    local r, e = self:exec("SELECT flash.unlisten(id) FROM flash.my_listeners WHERE consumer = $1", self.consumer)
    if not r and ok then
      ok, err = nil, "cannot remove the listeners of consumer " .. self.consumer .. ": " .. tostring(e):gsub("%s+$", "") ..
        " (the next flashlua start removes them)"
    end
  end
  return ok, err
end

return M
