-- flash.slots: the replication slots flashlua leaves in a database (persistent ones, or
-- any whose run ended badly) and the WAL they hold: listed, dropped, and warned about when
-- an inactive one holds more than a threshold (issue 14: forgotten slots fill disks).
local core = require "flash.core"

local M = {}

-- flashlua's slots: the names its drivers give (flash_replication[_pid], flash_extension[_pid])
-- and any other under the flash_ prefix a `slot` option chose.
local OURS = "slot_name::pg_catalog.text OPERATOR(pg_catalog.~~) 'flash%' AND slot_type OPERATOR(pg_catalog.=) 'logical'"

-- Whether a slot name is one these tools see (the OURS condition, in Lua).
function M.ours(name) return name:sub(1, 5) == "flash" end

-- Said when a persistent slot is created under a name these tools do not see.
function M.unseen_warning(name)
  return string.format("replication slot %s does not start with flash, so flashlua --list-slots, --drop-slot and " ..
    "the warning about inactive slots holding WAL do not see it (a `slot` named flash_... is seen); when this " ..
    "client is retired, drop it with SELECT pg_drop_replication_slot('%s')", name, name)
end

-- Inactive slots holding more than this many bytes of WAL get a warning at each client start;
-- FLASH_SLOT_WARN_MB overrides the 64 MB default.
function M.threshold()
  return (tonumber(os.getenv("FLASH_SLOT_WARN_MB")) or 64) * 1024 * 1024
end

-- Every flashlua slot of the connection's database: name, plugin, active_pid (or nil),
-- retained (bytes of WAL kept for it), confirmed (LSN text or nil), lost (true when the
-- server invalidated it: wal_status lost, max_slot_wal_keep_size).
function M.list(conn)
  local rows, err = conn:exec([[
    SELECT slot_name::text AS name, plugin::text AS plugin, active_pid,
           coalesce(pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), restart_lsn), 0)::bigint AS retained,
           confirmed_flush_lsn::text AS confirmed,
           (pg_catalog.to_jsonb(s) OPERATOR(pg_catalog.->>) 'wal_status') OPERATOR(pg_catalog.=) 'lost' AS lost
    FROM pg_catalog.pg_replication_slots s
    WHERE database = pg_catalog.current_database() AND ]] .. OURS .. " ORDER BY 1", 0)
  if not rows then return nil, err end
  for _, r in ipairs(rows) do
    for k, v in pairs(r) do if v == core.null then r[k] = nil end end
  end
  return rows
end

-- The WAL the server keeps for slot `name` (from its restart position to the current one),
-- in bytes; nil when there is no such slot or the query failed.
function M.held(conn, name)
  local rows = conn:exec([[SELECT coalesce(pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), restart_lsn),
    0)::float8 AS held FROM pg_catalog.pg_replication_slots WHERE slot_name = $1]], 0, name)
  return rows and rows[1] and rows[1].held or nil
end

function M.mb(bytes) return string.format("%.1f MB", bytes / (1024 * 1024)) end

-- The warnings for inactive slots over the threshold, each slot once: `warned` holds the
-- slots warned about already (the loop's: once per process for a script's clients).
function M.idle_warnings(conn, warned)
  local rows = M.list(conn)
  local out = {}
  for _, r in ipairs(rows or {}) do
    if r.lost and not warned[r.name] then
      warned[r.name] = true
      out[#out + 1] = string.format("replication slot %s was invalidated by the server (wal_status lost: it held more " ..
        "WAL than max_slot_wal_keep_size allows): the changes committed after %s are lost to it, and it can never be " ..
        "read again; drop it: flashlua --drop-slot %s", r.name, r.confirmed or "its confirmed position", r.name)
    elseif not r.active_pid and r.retained > M.threshold() and not warned[r.name] then
      warned[r.name] = true
      out[#out + 1] = string.format("replication slot %s is inactive and holds %s of WAL; if no flashlua run " ..
        "will resume it, drop it: flashlua --drop-slot %s", r.name, M.mb(r.retained), r.name)
    end
  end
  return out
end

-- Drops a flashlua slot that no one streams from: true | nil, err.
function M.drop(conn, name)
  local rows, err = M.list(conn)
  if not rows then return nil, err end
  for _, r in ipairs(rows) do
    if r.name == name then
      if r.active_pid then
        return nil, string.format("replication slot %s is in use by process %d; stop that flashlua first", name, r.active_pid)
      end
      local ok, derr = conn:exec("SELECT pg_catalog.pg_drop_replication_slot($1)", 0, name)
      if not ok then return nil, derr end
      return true
    end
  end
  local other = conn:exec([[SELECT active_pid FROM pg_catalog.pg_replication_slots
    WHERE slot_name = $1 AND database = pg_catalog.current_database()]], 0, name)
  if other and other[1] then
    return nil, string.format("replication slot %s is not one of flashlua's (their names start with flash), so it is " ..
      "left alone; if no one uses it, drop it with SELECT pg_drop_replication_slot('%s')", name, name)
  end
  return nil, string.format("no flashlua replication slot named %s in this database (flashlua --list-slots shows them)", name)
end

return M
