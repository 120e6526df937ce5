-- exactly_once: copies a table into another PostgreSQL table, each change exactly once,
-- across crashes (kill -9 included). Each batch of events and the id of its last event are
-- written in one transaction of the target; on start the stored id says where the target
-- is, and events up to it (delivered again because they were not yet acknowledged to the
-- slot) are skipped. Only then are the events acknowledged (ack = "manual").
--
--   flashlua -d postgres://localhost/app examples/exactly_once.lua public.orders public.orders_copy id [target DSN]
--
-- A fifth argument "until-current" copies what is committed now, then stops.
--
-- The target table must exist with the source's columns (its key need not be unique: a
-- duplicate would show). A row goes over as one JSON object that jsonb_populate_record
-- turns into the target's types (arrays, json, jsonb, bytea, numeric with every digit).
-- The source needs REPLICA IDENTITY FULL (update and delete events carry the old row).
-- It copies the changes committed from its first start on (that start creates the slot);
-- rows the source holds before are not read: copy them first while nothing writes to the
-- source (INSERT INTO target SELECT * FROM source), or start with an empty source.
local flash = require "flash"

local source, target, key = arg[1] or "public.orders", arg[2] or "public.orders_copy", arg[3] or "id"
local name = "flash_copy_" .. (source .. "_" .. target):gsub("[^%w]", "_"):lower()
name = name:sub(1, 63)

local client = assert(flash.client {
  driver = "wal_logical", persistent = true, slot = name, publication = name,
  ack = "manual", max_unacked = 5000,
})
-- The target's connection (flash.connect: it only runs queries and creates nothing there).
local sink = assert(flash.connect { dsn = arg[4] ~= "" and arg[4] or nil })

local function q(sql, ...)
  local rows, err = sink:query(sql, ...)
  if not rows then error(err, 2) end
  return rows
end

local function ident(s)
  return (s:gsub("[^.]+", function(p) return '"' .. p:gsub('"', '""') .. '"' end))
end

-- Where the target is: the id of the last event written, "" before the first. Ids compare
-- as strings (COLLATE "C" in SQL, byte order in Lua).
q([[CREATE TABLE IF NOT EXISTS public.flash_copy_position (
      name text PRIMARY KEY, last_id text COLLATE "C" NOT NULL)]])
q([[INSERT INTO public.flash_copy_position VALUES ($1, '') ON CONFLICT (name) DO NOTHING]], name)
local last_id = q("SELECT last_id FROM public.flash_copy_position WHERE name = $1", name)[1].last_id
flash.log.info(string.format("copying %s into %s, resuming after event %q", source, target, last_id))

local T, K = ident(target), ident(key)
local batch = {}

-- A row travels as one JSON object, made into the target's row type by the server
-- (jsonb_populate_record): arrays, json and jsonb columns, which arrive as Lua tables, have
-- no text form a $n parameter could carry. bytea arrives as raw bytes, which JSON cannot
-- carry either: those columns (and bytea[]) go as "\x" and hex, bytea's text form.
local bytea = {}
for _, r in ipairs(q([[SELECT a.attname::text AS name FROM pg_catalog.pg_attribute a
    WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
      AND a.atttypid IN ('bytea'::regtype, '_bytea'::regtype)]], target)) do
  bytea[r.name] = true
end
local function hex(v)
  if type(v) == "string" then
    return "\\x" .. v:gsub(".", function(c) return ("%02x"):format(c:byte()) end)
  elseif type(v) == "table" then
    local t = {}
    for i = 1, #v do t[i] = hex(v[i]) end
    return flash.json.array(t)
  end
  return v
end
local function row(r)
  local cols, obj = {}, {}
  for col, v in pairs(r) do
    cols[#cols + 1] = ident(col)
    if bytea[col] then v = hex(v) end
    obj[col] = v
  end
  return cols, flash.json.encode(obj)
end
local REC = "jsonb_populate_record(NULL::" .. T .. ", %s::jsonb)"

local function apply(ev)
  if ev.op == "insert" then
    local cols, j = row(ev.new)
    local list = table.concat(cols, ", ")
    q("INSERT INTO " .. T .. " (" .. list .. ") SELECT " .. list .. " FROM " .. REC:format("$1"), j)
  elseif ev.op == "update" then
    local cols, j = row(ev.new)
    local sets = {}
    for i, col in ipairs(cols) do sets[i] = col .. " = r." .. col end
    local _, old = row({ [key] = ev.old[key] })
    q("UPDATE " .. T .. " AS t SET " .. table.concat(sets, ", ") .. " FROM " .. REC:format("$2") .. " AS r WHERE t." .. K ..
      " = (" .. REC:format("$1") .. ")." .. K, old, j)
  elseif ev.op == "delete" then
    local _, old = row({ [key] = ev.old[key] })
    q("DELETE FROM " .. T .. " AS t WHERE t." .. K .. " = (" .. REC:format("$1") .. ")." .. K, old)
  elseif ev.op == "truncate" then
    q("TRUNCATE " .. T)
  end
end

-- Writes the batch and its last id in one transaction, then acknowledges it: a crash
-- before the COMMIT loses nothing (the events come again), one after it duplicates
-- nothing (their ids are not past last_id).
local function flush()
  if #batch == 0 then return end
  local last = batch[#batch]
  q("BEGIN")
  local ok, err = pcall(function()
    for _, ev in ipairs(batch) do apply(ev) end
    q("UPDATE public.flash_copy_position SET last_id = $2 WHERE name = $1", name, last.id)
  end)
  if not ok then q("ROLLBACK") error(err, 0) end
  q("COMMIT")
  last_id = last.id
  client:ack_through(last)
  batch = {}
end

assert(client:listen { table = source }):on("all", function(ev)
  if ev.id <= last_id then
    ev:ack()                       -- written before a crash, delivered again: skip
    return
  end
  batch[#batch + 1] = ev
  if #batch >= 500 then flush() end
end)
flash.every(0.2, flush)
-- SIGINT/SIGTERM: what is buffered is written before the last confirmation.
flash.on_stop(flush)

assert(client:run(arg[5] == "until-current" and { until_lsn = "current" } or nil))
