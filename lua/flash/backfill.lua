-- flash.backfill: `listener:backfill{...}` delivers every existing row of a listened table
-- as an `op = "read"` event, chunk by chunk, interleaved with the live stream and
-- consistent with it (docs/backfill.md has the design and the argument). Two ways to place a
-- chunk between the changes: under wal_logical a logical message marks its position in the
-- stream ("mark"); under the trigger drivers it is delivered after the first poll of the
-- capture table that began after its snapshot and read everything that snapshot saw ("poll").
local core = require "flash.core"
local log = require "flash.log"
local json = require "flash.json"
local where = require "flash.where"
local catalog = require "flash.catalog"

local M = {}
local Backfill = {}
Backfill.__index = Backfill

local PREFIX = "flashlua.backfill"
M.PREFIX = PREFIX
local DEFAULT_CHUNK = 10000
local GC_PAUSE = 150   -- the collector's pause while a chunk's rows are delivered (Backfill:deliver)
local TWO32 = 4294967296
local TWO31 = 2147483648
-- A chunk whose snapshot still sees as running a transaction already delivered is read
-- again (see snapshot_safe); this many tries in a row are said once in a warning.
local RETRY_WARN = 50

local ffi
do
  local ok, m = pcall(require, "ffi")
  if ok then ffi = m end
end

local isatty
if ffi then
  pcall(ffi.cdef, "int isatty(int fd);")
  isatty = function(fd)
    local ok2, r = pcall(function() return ffi.C.isatty(fd) end)
    return ok2 and r == 1
  end
else
  isatty = function() return false end
end

---------------------------------------------------------------------------------------
-- Rows of a chunk's lines, read through the FFI (core.lines_api, src/lua/lconn.c): C
-- decodes a line's values into plain C (numbers, booleans, NULL, the text of strings, the
-- values fl_push_value would push), and a function compiled for the layout builds the row
-- table with the column names as constants. lines:row builds the same table through the
-- Lua C API, one call per name and value; this costs about a third less per row. Layouts
-- with a column this cannot decode (arrays, JSON, bytea) use lines:row.

local lines_api
if ffi and pcall(ffi.cdef, [[
  typedef struct { double num; const char *s; int32_t len; int32_t kind; } flash_copy_val;
  typedef struct { int (*decode)(void *lines, int i, const void *layout, flash_copy_val *out); } flash_lines_api;
]]) then
  lines_api = ffi.cast("const flash_lines_api *", core.lines_api())
end

local SLOW_OIDS = { [114] = true, [3802] = true, [17] = true }   -- json, jsonb, bytea
local READER_ERRORS = { [-1] = "malformed COPY line, or not the layout's columns (the table changed?)",
                        [-2] = "out of memory" }

-- reader(lines, i) -> row, relation oid | nil, err for lines read with { src = true } by
-- a layout of columns cols; or nil (lines:row then). only (a list of column names): the row
-- holds just those (where.project's row), and the other values become no strings.
local function fast_reader(cols, layout, only)
  if not lines_api or #cols == 0 or #cols > 200 then return nil end
  local pos = {}
  for i, c in ipairs(cols) do
    if (c.elem or 0) ~= 0 or SLOW_OIDS[c.oid] then return nil end
    pos[c.name] = i
  end
  local names = {}
  for i, name in ipairs(only or {}) do
    if not pos[name] then return nil end
    names[i] = name
  end
  if not only then
    for i, c in ipairs(cols) do names[i] = c.name end
  end
  local src = { [[
local str, NULL, decode, lo, vals, cast, errors, layout, ncols, project, only = ...
-- FL_VAL_NUMBER 1, STRING 2, TRUE 3, FALSE 4 (src/lua/lvalue.h); NULL 0.
local function v(x)
  local k = x.kind
  if k == 2 then return str(x.s, x.len) elseif k == 1 then return x.num elseif k == 3 then return true
  elseif k == 4 then return false end
  return NULL
end
return function(lines, i)
  local n = decode(cast("void *", lines), i, lo, vals)
  if n < 0 then
    if n ~= -3 then return nil, errors[n] or "cannot decode" end
    local row, err = lines:row(i, layout)
    if not row then return nil, err end
    if project then row = project(row, only) end
    return row, vals[ncols].num
  end
  return {]] }
  for _, name in ipairs(names) do src[#src + 1] = string.format("    [%q] = v(vals[%d]),", name, pos[name] - 1) end
  src[#src + 1] = "  }, vals[ncols].num\nend"
  local f = assert(loadstring(table.concat(src, "\n"), "=backfill row reader"))
  -- The layout userdata stays referenced by the closure (its pointer is used).
  return f(ffi.string, core.null, lines_api.decode, ffi.cast("const void *", layout),
    ffi.new("flash_copy_val[?]", #cols + 1), ffi.cast, READER_ERRORS, layout, #cols, only and where.project, only)
end
M.fast_reader = fast_reader

---------------------------------------------------------------------------------------
-- Keys: the same Lua values (the same decoding) come from a chunk's rows and from the
-- stream's rows, so a key built from them matches on both sides.

local function part(v)
  local t = type(v)
  if t == "table" then return "j" .. json.encode(v) end
  if t == "number" then return "n" .. string.format("%.17g", v) end
  if t == "boolean" then return v and "t" or "f" end
  if v == core.null then return "0" end
  return "s" .. tostring(v)
end

local function keyof(row, cols)
  if #cols == 1 then
    local v = row[cols[1]]
    local t = type(v)
    if t == "string" or t == "number" then return v end
    return part(v)
  end
  local parts = {}
  for i, c in ipairs(cols) do parts[i] = part(row[c]) end
  return table.concat(parts, "\0")
end

---------------------------------------------------------------------------------------
-- Snapshots: pg_current_snapshot() as text, "xmin:xmax:xip,xip,...", 64-bit xids. Events
-- carry the 32-bit xid of their transaction; it is widened against the snapshot's xmax
-- (transactions in flight span far less than 2^31 xids).

local function parse_snapshot(text)
  local xmin, xmax, rest = text:match("^(%d+):(%d+):(.*)$")
  local s = { xmin = tonumber(xmin), xmax = tonumber(xmax), xip = {} }
  for x in rest:gmatch("%d+") do s.xip[tonumber(x)] = true end
  return s
end

local function widen(xid32, s)
  local d = (xid32 - s.xmax % TWO32) % TWO32
  if d >= TWO31 then d = d - TWO32 end
  return s.xmax + d
end

-- Whether the transaction with this 32-bit xid had committed for snapshot s.
local function visible(xid32, s)
  local x = widen(xid32, s)
  return x < s.xmax and not s.xip[x]
end

---------------------------------------------------------------------------------------

local function checkopts(opts)
  if opts == nil then return {} end
  if type(opts) ~= "table" then
    error("bad argument #1 to 'backfill' (table of options expected, got " .. type(opts) .. ")", 3)
  end
  local known = { chunk = "number", restart = "boolean", progress = "boolean", on_done = "function" }
  for k, v in pairs(opts) do
    if not known[k] then
      error(string.format("bad argument #1 to 'backfill' (%s)", require("flash.args").unknown_option(k, known)), 3)
    end
    if type(v) ~= known[k] then
      error(string.format("bad argument #1 to 'backfill' (option '%s': %s expected, got %s)", k, known[k], type(v)), 3)
    end
  end
  if opts.chunk and not (opts.chunk >= 1 and opts.chunk <= 1e6 and opts.chunk == math.floor(opts.chunk)) then
    error("bad argument #1 to 'backfill' (option 'chunk': a whole number of rows from 1 to 1000000 expected, got " ..
      tostring(opts.chunk) .. ")", 3)
  end
  return opts
end

-- listener:backfill(opts): registers the backfill; it runs in the client's loop.
function M.start(l, opts)
  opts = checkopts(opts)
  local client = l.client
  local how = client.driver.backfill and client.driver:backfill()
  if not how then
    error(string.format("backfill needs the wal_logical driver or a trigger driver (this client uses %s; " ..
      "docs/backfill.md says why)", client.driver_name), 3)
  end
  if l.bf then error("backfill: listener #" .. l.id .. " on " .. l.table_name .. " already has a backfill", 3) end
  local self = setmetatable({
    l = l, client = client, opts = opts, poll = how == "poll",
    chunk = opts.chunk or DEFAULT_CHUNK,
    rows_done = 0, run_rows = 0, delivered = 0, seq = 0, retries = 0,
    seen = {}, nseen = 0,
    done = false, ready = false,
    started_at = nil,
  }, Backfill)
  -- Progress is kept per slot, table and nth: this backfill's place among the client's
  -- backfills of the same table (1, 2, ... in the order the script asks for them), so two
  -- listeners of one table (a cache and an index, say) each resume where they were.
  self.nth = 1
  for _, other in ipairs(client.backfills or {}) do
    if other.l.table.oid == l.table.oid then self.nth = self.nth + 1 end
  end
  if self.poll then
    -- flash.filter's emit for this listener's changes (M.change), made once.
    self.emit = function(l2, ev)
      local raw = self.raw
      if raw and #l2.callbacks[ev.op] > 0 then self.raw = nil self:touch(raw) end
      return client:_deliver(l2, ev)
    end
  end
  l.bf = self
  client.backfills = client.backfills or {}
  client.backfills[#client.backfills + 1] = self
  -- The marks of this client's chunks in flight: [token] = backfill (on_message). Another
  -- client's stream sees them too, and must not take them for its own.
  client.backfill_tokens = client.backfill_tokens or {}
  return true
end

---------------------------------------------------------------------------------------
-- Setup, once the client has started: how to chunk, how many rows, where to resume.

-- Before a statement that reads a user's table on the client's connection: in its
-- transaction, row-level security that applies to our role fails the statement instead
-- of running the policies' expressions (the table owner's code) as us.
local NO_RLS = "SELECT pg_catalog.set_config('row_security', 'off', true); "

local DESCENDANTS = [[WITH RECURSIVE d(oid) AS (SELECT $1::oid
    UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN d ON i.inhparent = d.oid)]]

function Backfill:exec(sql, ...)
  local d = self.client.driver
  local rows, err, state = d:conn():exec(sql, 0, ...)
  self.client:_log_notices()
  return rows, err, state
end

function Backfill:key_columns()
  local tbl = self.l.table
  local rows, err = self:exec([[
    SELECT a.attname::text AS name, pg_catalog.format_type(a.atttypid, a.atttypmod) AS typ, a.atttypid::bigint AS typoid,
      a.atttypmod AS typmod, (SELECT t.typtypmod FROM pg_catalog.pg_type t WHERE t.oid = a.atttypid) AS dtypmod
    FROM pg_catalog.pg_index i
    JOIN LATERAL pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) ON true
    JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.n]], tbl.oid)
  if not rows then return nil, err end
  -- An INHERITS parent's primary key holds for the parent's own rows only: its children
  -- may repeat a key (each other's too), and chunks ordered by it would skip the rows of a
  -- repeated key at a chunk's edge (and a change to one would drop the others' reads).
  -- Such a table is read by ctid, unless the listener's primary_key says which columns are
  -- unique over all of them. (A partitioned table's key holds over its partitions.)
  if #rows > 0 then
    local kids
    kids, err = self:exec([[SELECT pg_catalog.count(*)::int AS n FROM pg_catalog.pg_inherits i
      JOIN pg_catalog.pg_class c ON c.oid = i.inhparent WHERE i.inhparent = $1 AND c.relkind = 'r']], tbl.oid)
    if not kids then return nil, err end
    if kids[1].n > 0 then
      log.info(string.format("backfill of %s: it has inheritance children (%d), whose rows its primary key does not " ..
        "cover (they may repeat its keys): read by ctid (a listener's primary_key naming columns unique over all of " ..
        "them would be used instead)", self.l.table_name, kids[1].n))
      rows = {}
    end
  end
  if #rows == 0 and self.l.primary_key then
    -- No primary key in the table: the listener's own (unique, the user says so).
    for _, name in ipairs(self.l.primary_key) do
      local r, e = self:exec([[SELECT a.attname::text AS name, pg_catalog.format_type(a.atttypid, a.atttypmod) AS typ,
        a.atttypid::bigint AS typoid, a.atttypmod AS typmod,
        (SELECT t.typtypmod FROM pg_catalog.pg_type t WHERE t.oid = a.atttypid) AS dtypmod
        FROM pg_catalog.pg_attribute a WHERE a.attrelid = $1 AND a.attname = $2]], tbl.oid, name)
      if not r then return nil, e end
      rows[#rows + 1] = r[1]
    end
  end
  -- The type a chunk's key literals are read as (Backfill:chunk_sql): the column's own,
  -- but through no domain: `'5'::a_domain` runs the domain's CHECK, its owner's expression,
  -- which ran as flashlua at every chunk of a table keyed by such a column. Its base type
  -- compares the same. An array of a domain has no operator with its base's array: such a
  -- table is read by ctid.
  for _, r in ipairs(rows) do
    local col
    for _, c in ipairs(tbl.columns) do if c.name == r.name then col = c end end
    if col and col.typ ~= col.oid or col and (col.elem or 0) ~= 0 then
      local t, terr = self:exec([[SELECT pg_catalog.format_type($1::pg_catalog.oid, $2::pg_catalog.int4) AS typ,
        (SELECT e.typtype::pg_catalog.text FROM pg_catalog.pg_type a JOIN pg_catalog.pg_type e
          ON e.oid OPERATOR(pg_catalog.=) a.typelem WHERE a.oid OPERATOR(pg_catalog.=) $1::pg_catalog.oid) AS elemtype]],
        col.oid, col.typ == col.oid and r.typmod or r.dtypmod)
      if not t then return nil, terr end
      if t[1].elemtype == "d" then
        log.info(string.format("backfill of %s: its key column %s is an array of a domain: read by ctid",
          self.l.table_name, r.name))
        return {}
      end
      r.typ = t[1].typ
    end
  end
  return rows
end

function Backfill:setup()
  local d = self.client.driver
  local tbl = self.l.table
  local keys, err = self:key_columns()
  if not keys then return nil, err end
  self.qualified = d:ident(tbl.schema) .. "." .. d:ident(tbl.name)
  if #keys > 0 then
    self.mode = "key"
    self.keycols, self.keytypes = {}, {}
    local cols = {}
    for i, k in ipairs(keys) do
      self.keycols[i], self.keytypes[i] = k.name, k.typ
      cols[i] = "t." .. d:ident(k.name)
    end
    self.keylist = table.concat(cols, ", ")
  else
    -- No key: each table that holds rows (the table, its partitions or children), by
    -- ranges of heap blocks (a TID range scan reads just those blocks).
    self.mode = "ctid"
    local rows
    rows, err = self:exec(DESCENDANTS .. [[
      SELECT c.oid::bigint AS oid, n.nspname::text AS schema, c.relname::text AS name,
        (pg_catalog.pg_relation_size(c.oid) / pg_catalog.current_setting('block_size')::int)::bigint AS blocks,
        greatest(c.reltuples, 0)::float8 AS tuples, greatest(c.relpages, 0)::bigint AS pages
      FROM d JOIN pg_catalog.pg_class c ON c.oid = d.oid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      WHERE c.relkind = 'r' ORDER BY c.oid = $1 DESC, c.oid]], tbl.oid)
    if not rows then return nil, err end
    self.segs = {}
    for i, r in ipairs(rows) do
      local per_block = (r.pages > 0 and r.tuples > 0) and (r.tuples / r.pages) or 60
      self.segs[i] = { oid = r.oid, qualified = d:ident(r.schema) .. "." .. d:ident(r.name), blocks = r.blocks,
                       step = math.max(1, math.floor(self.chunk / per_block)) }
    end
    -- A key for matching rows with changes: the whole row (see docs/backfill.md).
    self.keycols = {}
    for i, c in ipairs(tbl.columns) do self.keycols[i] = c.name end
  end
  -- The columns read: every one, or, chunked by key for a listener with `fields` and no
  -- Lua `where`, those fields, the conditions' columns and the key -- all that where.apply
  -- and the matching of reads with changes look at (the server formats no other).
  local l, cols = self.l, tbl.columns
  if self.mode == "key" and l.fields and not l.predicate then
    local need = {}
    for _, name in ipairs(l.fields) do need[name] = true end
    for _, c in ipairs(l.conds or {}) do need[c.column] = true end
    for _, name in ipairs(self.keycols) do need[name] = true end
    cols = {}
    for _, c in ipairs(tbl.columns) do
      if need[c.name] then cols[#cols + 1] = c end
    end
  end
  if self.mode == "key" then
    self.keypos = {}
    for i, name in ipairs(self.keycols) do
      for j, c in ipairs(cols) do
        if c.name == name then self.keypos[i] = j end
      end
      if not self.keypos[i] then return nil, "key column " .. name .. " is not among the table's columns" end
    end
  end
  -- Chunks are read with COPY (text) and decoded in C by their column layout; each line
  -- starts with the tableoid of the row (ev.source).
  local sel = { "t.tableoid" }
  for i, c in ipairs(cols) do sel[i + 1] = "t." .. d:ident(c.name) end
  self.select = table.concat(sel, ", ")
  self.layout = core.layout(cols, self.client.flags)
  self.read_row = fast_reader(cols, self.layout)
  -- A listener with fields and no conditions: where.apply would only project the row.
  self.read_fields = l.fields and fast_reader(cols, self.layout, l.fields)
  self.cursor = { seg = 1, block = 0, after = nil }
  -- The progress saved last (Backfill:save): where a restarted stream reads again from.
  self.saved = { cursor = self.cursor, rows = 0 }
  local ok
  ok, err = self:check_privileges(cols)
  if not ok then return nil, err end
  ok, err = self:check_code(d:conn())
  if not ok then return nil, err end
  ok, err = self:estimate()
  if not ok then return nil, err end
  if d.persistent then
    ok, err = self:load()
    if not ok then return nil, err end
  end
  self.ready = true
  self.started_at = core.now()
  if not self.done then
    log.info(string.format("backfill of %s: %s%s, chunks of %d rows by %s", self.l.table_name,
      self.estimated and string.format("about %d rows", self.estimated) or "row count unknown",
      self.rows_done > 0 and string.format(", resuming after %d rows", self.rows_done) or "",
      self.chunk, self.mode == "key" and ("primary key (" .. table.concat(self.keycols, ", ") .. ")") or "ctid"))
  end
  return true
end

-- The role must be able to SELECT what the chunks read (the columns cols and tableoid) from
-- every relation they name: the table, or, by ctid, each table that holds rows (read with
-- FROM ONLY, where the parent's privileges do not apply). Checked before the first chunk,
-- so that the error names the relation and the GRANT that fixes it (the server's says
-- only "permission denied for table X").
function Backfill:check_privileges(cols)
  local d = self.client.driver
  local rels = {}
  if self.mode == "key" then
    rels[1] = { oid = self.l.table.oid, qualified = self.qualified }
  else
    for i, seg in ipairs(self.segs) do rels[i] = seg end
  end
  local names = { "tableoid" }
  for i, c in ipairs(cols) do names[i + 1] = c.name end
  for _, r in ipairs(rels) do
    local rows, err = self:exec("SELECT pg_catalog.has_table_privilege($1::oid, 'SELECT') AS ok, current_user::text AS role",
      r.oid)
    if not rows then return nil, err end
    local ok, role = rows[1].ok, rows[1].role
    if not ok then
      -- Column privileges may cover what is read.
      ok = true
      for _, name in ipairs(names) do
        local cr
        cr, err = self:exec("SELECT pg_catalog.has_column_privilege($1::oid, $2, 'SELECT') AS ok", r.oid, name)
        if not cr then return nil, err end
        if not cr[1].ok then ok = false break end
      end
    end
    if not ok then
      local what = r.qualified == self.qualified and "" or
        string.format(" (it holds rows of %s and, with no primary key, is read by itself)", self.l.table_name)
      return nil, string.format("cannot read %s%s: the role %s has no SELECT privilege on it (run `GRANT SELECT " ..
        "ON %s TO %s` as its owner)", r.qualified, what, role, r.qualified, d:ident(role))
    end
  end
  return true
end

-- Planning a read of the table runs code of its owner's as us: the server folds the
-- immutable calls with constant arguments of its indexes' expressions and predicates, its
-- statistics' expressions, its partition key and its CHECK constraints (and those of its
-- partitions and children) when it loads them. A table owner's `CREATE INDEX ON t ((id +
-- f()))` ran f() as flashlua at every chunk. Checked before the first read (on `conn`:
-- true, or nil and why), and by each chunk's transaction before its read (an index can come
-- while a backfill runs): a statement prepared on the reading connection (Backfill:rconn)
-- that fails then (Backfill:chunk_sql, read_chunk).
local CODE_KINDS = { "key", "index", "statistics", "check" }
function Backfill:code_error(found)
  return string.format("%s, which PostgreSQL would run as %s (the role flashlua runs as) while planning " ..
    "the backfill's reads (run flashlua as the table's owner, or have a superuser own that function)", found,
    self.client.role)
end

function Backfill:check_code(conn)
  local found, err = catalog.foreign_code(conn, { self.l.table.oid }, CODE_KINDS)
  if found == nil then return nil, err end
  if not found then return true end
  return nil, self:code_error(found)
end

-- Rows to read: the planner's count (reltuples) over every table that holds rows; an exact
-- count of small tables never analyzed.
function Backfill:estimate()
  local rows, err = self:exec(DESCENDANTS .. [[
    SELECT coalesce(pg_catalog.sum(greatest(c.reltuples, 0)), 0)::float8 AS est,
      pg_catalog.bool_or(c.reltuples OPERATOR(pg_catalog.<) 0::pg_catalog.float4) AS unknown,
      coalesce(pg_catalog.sum(pg_catalog.pg_relation_size(c.oid)), 0)::float8 AS bytes
    FROM d JOIN pg_catalog.pg_class c ON c.oid = d.oid WHERE c.relkind = 'r']], self.l.table.oid)
  if not rows then return nil, err end
  local r = rows[1]
  if r.unknown and r.bytes < 256 * 1024 * 1024 then
    local n = self:exec(NO_RLS .. "SELECT pg_catalog.count(*)::float8 AS n FROM " .. self.qualified)
    if n then self.estimated = n[1].n end
  elseif r.est > 0 or not r.unknown then
    self.estimated = r.est
  end
  return true
end

---------------------------------------------------------------------------------------
-- Progress across runs (persistent slot): table flashlua.backfill, one row per slot and
-- listened table. A slot created by this start has no past: its rows are removed.

local STATE_DDL = [[
  CREATE SCHEMA IF NOT EXISTS flashlua;
  CREATE TABLE IF NOT EXISTS flashlua.backfill (
    slot text NOT NULL, rel oid NOT NULL, tbl text NOT NULL,
    seg int NOT NULL DEFAULT 1, block bigint NOT NULL DEFAULT 0, after text[],
    rows_done bigint NOT NULL DEFAULT 0, done boolean NOT NULL DEFAULT false,
    started timestamptz NOT NULL DEFAULT pg_catalog.now(), updated timestamptz NOT NULL DEFAULT pg_catalog.now(),
    nth int NOT NULL DEFAULT 1,
    PRIMARY KEY (slot, rel, nth));
  COMMENT ON TABLE flashlua.backfill IS 'flashlua: progress of backfills (listener:backfill) per replication slot']]

-- The key of this client's progress rows in flashlua.backfill: the slot's name, or under
-- a trigger driver its persistent schema's (whose triggers and backlog carry the changes
-- across runs as a slot does).
function Backfill:slot()
  local d = self.client.driver
  return d.slot or ("schema:" .. d.schema)
end

function Backfill:load()
  local d = self.client.driver
  local slot = self:slot()
  -- Found by name in the catalog: to_regclass raises for a role without USAGE on a schema
  -- flashlua another role made ("permission denied for schema flashlua", naming no fix).
  -- The schema must be ours too: its owner could drop our table and put there a view, or
  -- a table with triggers, of its own functions, which our reads and writes would run
  -- with our privileges (any role with CREATE on the database can make the schema first).
  local me = "(SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) CURRENT_USER)"
  local own, err = self:exec([[SELECT n.nspowner OPERATOR(pg_catalog.=) ]] .. me .. [[ AS schema_mine,
      pg_catalog.pg_get_userbyid(n.nspowner)::text AS schema_owner, c.oid IS NOT NULL AS exists,
      c.relkind OPERATOR(pg_catalog.=) 'r' AS is_table, c.relowner OPERATOR(pg_catalog.=) ]] .. me .. [[ AS mine,
      EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid
        AND a.attname OPERATOR(pg_catalog.=) 'nth') AS has_nth,
      pg_catalog.pg_get_userbyid(c.relowner)::text AS owner
    FROM pg_catalog.pg_namespace n LEFT JOIN pg_catalog.pg_class c ON c.relnamespace OPERATOR(pg_catalog.=) n.oid
      AND c.relname OPERATOR(pg_catalog.=) 'backfill'
    WHERE n.nspname OPERATOR(pg_catalog.=) 'flashlua']])
  if not own then return nil, err end
  if own[1] and own[1].exists and not (own[1].mine and own[1].is_table) then
    return nil, string.format("flashlua.backfill exists but is %s: backfill progress " ..
      "cannot be kept there (drop it, or run flashlua as its owner)",
      own[1].mine and "not a table" or "owned by another role (" .. own[1].owner .. ")")
  end
  if own[1] and not own[1].schema_mine then
    return nil, string.format("schema flashlua exists but is owned by another role (%s): backfill progress " ..
      "cannot be kept there (have that role drop it, or run flashlua as its owner)", own[1].schema_owner)
  end
  if own[1] and not own[1].exists then own = {} end
  if not own[1] then
    local ok, derr = self:exec(STATE_DDL)
    if not ok then
      return nil, "cannot create flashlua.backfill to keep backfill progress: " .. tostring(derr) ..
        " (the role needs CREATE on the database)"
    end
  elseif not own[1].has_nth then
    -- A table made by an older flashlua: one row per slot and table, which is the first
    -- backfilling listener's of that table (nth = 1).
    local ok, derr = self:exec([[ALTER TABLE flashlua.backfill ADD COLUMN IF NOT EXISTS nth int NOT NULL DEFAULT 1,
      DROP CONSTRAINT IF EXISTS backfill_pkey, ADD PRIMARY KEY (slot, rel, nth)]])
    if not ok then return nil, "cannot add column nth to flashlua.backfill: " .. tostring(derr) end
  end
  if (d.created_slot or d.created_schema) and not d.backfill_cleared then
    d.backfill_cleared = true
    self:exec("DELETE FROM flashlua.backfill WHERE slot = $1", slot)
  end
  if self.opts.restart then
    self:exec("DELETE FROM flashlua.backfill WHERE slot = $1 AND rel = $2 AND nth = $3", slot, self.l.table.oid, self.nth)
  end
  local rows
  rows, err = self:exec([[SELECT seg, block, after, rows_done, done FROM flashlua.backfill
    WHERE slot = $1 AND rel = $2 AND nth = $3]], slot, self.l.table.oid, self.nth)
  if not rows then return nil, err end
  local r = rows[1]
  if not r then
    local ok, ierr = self:exec("INSERT INTO flashlua.backfill (slot, rel, tbl, nth) VALUES ($1, $2, $3, $4)",
      slot, self.l.table.oid, self.l.table_name, self.nth)
    if not ok then return nil, ierr end
    return true
  end
  self.rows_done = r.rows_done
  self.cursor = { seg = r.seg, block = r.block, after = r.after ~= core.null and r.after or nil }
  self.saved = { cursor = self.cursor, rows = r.rows_done }
  if r.done then
    self.done = true
    log.info(string.format("backfill of %s finished in an earlier run (%d rows; slot %s): nothing to do " ..
      "(backfill{ restart = true } reads the table again)", self.l.table_name, r.rows_done, slot))
  end
  return true
end

function Backfill:save(cursor, rows_done, done)
  local d = self.client.driver
  if not d.persistent then return true end
  local after = "{}"
  if cursor.after then
    local q = {}
    for i, v in ipairs(cursor.after) do q[i] = '"' .. tostring(v):gsub('[\\"]', "\\%0") .. '"' end
    after = "{" .. table.concat(q, ",") .. "}"
  end
  -- Under a trigger driver the changes delivered before the chunk are deleted from the
  -- capture table in the same transaction: a restart never redelivers a change older than
  -- a read it does not read again.
  local handled = self.poll and not self.client.acks and #d.handled > 0
  if handled then
    local ok, err = self:exec("BEGIN; " .. d:delete_handled_sql())
    if not ok then
      self:exec("ROLLBACK")
      log.warn("backfill of " .. self.l.table_name .. ": cannot save progress: " .. tostring(err))
      return ok
    end
  end
  local ok, err = self:exec([[UPDATE flashlua.backfill SET seg = $3, block = $4, after = $5::text[],
    rows_done = $6, done = $7, updated = pg_catalog.now() WHERE slot = $1 AND rel = $2 AND nth = $8]],
    self:slot(), self.l.table.oid, cursor.seg, cursor.block, cursor.after and after or core.null, rows_done, done,
    self.nth)
  if handled then
    if ok then ok, err = self:exec("COMMIT") else self:exec("ROLLBACK") end
    if ok then d.handled = {} end
  end
  if not ok then log.warn("backfill of " .. self.l.table_name .. ": cannot save progress: " .. tostring(err)) end
  if ok then self.saved = { cursor = cursor, rows = rows_done } end
  return ok
end

---------------------------------------------------------------------------------------
-- One chunk: read under a snapshot, then a logical message marks the position in the
-- stream where its rows are delivered.

-- The relation names of tableoids (ev.source of a read event).
function Backfill:source_name(oid)
  self.names = self.names or {}
  local n = self.names[oid]
  if n then return n end
  local rows = self:exec([[SELECT n.nspname::text || '.' || c.relname::text AS name FROM pg_catalog.pg_class c
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1]], oid)
  n = rows and rows[1] and rows[1].name or self.l.table_name
  self.names[oid] = n
  return n
end

-- The snapshot is safe when no transaction it sees as running was already delivered: a
-- transaction is visible in the stream from its commit record, in snapshots once it has
-- left the server's list of running transactions, a moment later (longer with a
-- synchronous standby). Such a chunk could hold a row older than a delivered change.
function Backfill:snapshot_safe(s)
  for x in pairs(s.xip) do
    if self.seen[x % TWO32] then return false end
  end
  -- Delivered transactions older than xmin are visible in every later snapshot.
  local xmin32 = s.xmin % TWO32
  for x in pairs(self.seen) do
    local d = (x - xmin32) % TWO32
    if d >= TWO31 then self.seen[x] = nil self.nseen = self.nseen - 1 end
  end
  return true
end

-- The chunk's query at cursor cur: its snapshot, then its rows (COPY), then (under
-- wal_logical) its mark, and the commit: one round trip. token: the mark's content.
function Backfill:chunk_sql(cur, token)
  local d = self.client.driver
  local sql
  local last_seg = false
  if self.mode == "key" then
    local after = ""
    if cur.after then
      local lits = {}
      for i, typ in ipairs(self.keytypes) do
        local v = cur.after[i]
        lits[i] = (v == nil or v == core.null) and "NULL" or (d:literal(v) .. "::" .. typ)
      end
      -- pg_catalog's operator: for a key type it has no exact `>` for (an enum, an array, a
      -- domain against its base), one in a schema named after our role (the "$user" of the
      -- search path, anyone's with CREATE on the database) was picked, and ran as flashlua.
      after = " WHERE (" .. self.keylist .. ") OPERATOR(pg_catalog.>) (" .. table.concat(lits, ", ") .. ")"
    end
    sql = "SELECT " .. self.select .. " FROM " .. self.qualified .. " t" .. after ..
      " ORDER BY " .. self.keylist .. " LIMIT " .. self.chunk
  else
    local seg = self.segs[cur.seg]
    if not seg then return nil end
    local b2 = cur.block + seg.step
    sql = string.format("SELECT %s FROM ONLY %s t WHERE t.ctid >= '(%d,0)'::tid AND t.ctid < '(%d,0)'::tid",
      self.select, seg.qualified, cur.block, b2)
    last_seg = b2 >= seg.blocks
  end
  -- Under a trigger driver, the last capture seq the snapshot sees (Backfill:polled).
  local seq = self.poll and ("SELECT pg_catalog.max(seq)::text FROM " .. d:ident(d.schema) .. ".events; ") or ""
  -- The mark is written after the snapshot (the transaction's, taken by its first
  -- statement), so every transaction the snapshot sees committed before it. A message
  -- alone is not flushed (the walsender sends only flushed WAL): the commit of a
  -- transaction with an xid flushes it at once, rather than at the WAL writer's next round.
  local mark = token and ("; SELECT pg_catalog.pg_logical_emit_message(false, " .. d:literal(PREFIX) .. ", " ..
    d:literal(token) .. "); SELECT pg_catalog.pg_current_xact_id(); SET LOCAL synchronous_commit = local") or ""
  local check = "EXECUTE flashlua_foreign_code; "
  return "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT pg_catalog.pg_current_snapshot()::text; " .. seq .. check ..
    "COPY (" .. sql .. ") TO STDOUT" .. mark .. "; COMMIT", last_seg
end

-- Chunks are read on a connection of the backfill's own, so that the next chunk's query
-- can run in the server while the stream delivers the one before (the client's query
-- connection serves the stream's own queries meanwhile).
function Backfill:rconn()
  if self.reader and self.reader:ok() then return self.reader end
  self:drop_reader()
  local conn, err = core.connect(self.client:dsn())
  if not conn then return nil, err end
  -- Row-level security that applies to our role makes the read fail rather than miss the
  -- rows the policies hide (or run the policies' expressions, the table owner's code, as us).
  local ok
  ok, err = conn:exec("SET row_security = off", 0)
  if ok then
    -- Without a parameter: one plan, made once (with one, each run was planned again).
    ok, err = conn:exec("PREPARE flashlua_foreign_code AS " .. catalog.foreign_code_fails_sql(CODE_KINDS):gsub("%$1",
      "'{" .. string.format("%d", self.l.table.oid) .. "}'"), 0)
  end
  if not ok then conn:close() return nil, err end
  self.reader = conn
  return conn
end

function Backfill:drop_reader()
  if self.reader then self.reader:close() end
  -- A mark the abandoned query may have written is nobody's.
  if self.pending and self.pending.token then self.client.backfill_tokens[self.pending.token] = nil end
  self.reader, self.pending = nil, nil
end

-- What tells this client's marks from those an earlier run left in a persistent slot.
local function nonce(client)
  if not client.backfill_nonce then
    client.backfill_nonce = string.format("%d-%x", core.getpid(), math.floor(core.time() * 1000) % TWO32)
  end
  return client.backfill_nonce
end

-- Sends the query of the chunk at cursor cur; its rows are taken by read_chunk, in the
-- loop's next step or, if its mark comes first, when the stream reaches the mark
-- (M.on_message). Every change delivered from now until then is logged: the snapshot,
-- unknown until the result comes, decides which of them the chunk did not see.
function Backfill:send_chunk(cur)
  local token
  if not self.poll then
    self.seq = self.seq + 1
    token = string.format("%s:%s:%d:%d", self.client.driver.slot, nonce(self.client), self.l.id, self.seq)
  end
  local sql, last_seg = self:chunk_sql(cur, token)
  if not sql then self.pending = { cursor = cur, none = true } return true end
  local conn, err = self:rconn()
  if not conn then return nil, err end
  local ok
  ok, err = conn:send(sql)
  if not ok then return nil, err end
  self.pending = { cursor = cur, last_seg = last_seg, log = {}, token = token }
  if token then self.client.backfill_tokens[token] = self end
  return true
end

function Backfill:read_chunk()
  local d = self.client.driver
  if not self.pending then
    local ok, err = self:send_chunk(self.cursor)
    if not ok then return nil, err end
  end
  local p = self.pending
  local cur, last_seg = p.cursor, p.last_seg
  if p.none then self.pending = nil return "done" end
  local conn = self.reader
  -- rows, info | nil, err
  -- The lines are kept as they came; each becomes a row table only when delivered.
  local rows, info = conn:copy("", self.layout, { sent = true, src = true, keys = self.keypos, lines = true,
    src_list = not self.read_row })
  self.pending = nil
  local token = p.token
  -- Whatever comes of it, this chunk's mark (written, or not if the query failed) is
  -- taken from here on as the chunk's: known only while the chunk is in flight.
  if token then self.client.backfill_tokens[token] = nil end
  if not rows then
    conn:exec("ROLLBACK", 0)   -- the query's transaction, if an error left it open
    local found = tostring(info):sub(1, #catalog.FOREIGN_CODE_FAILS) == catalog.FOREIGN_CODE_FAILS and
      tostring(info):sub(#catalog.FOREIGN_CODE_FAILS + 1):match('^(.*)"%s*$')
    if found then return nil, self:code_error(found) end
    return nil, info
  end
  local s = parse_snapshot(info.values[1])
  -- Under a trigger driver a delivered transaction was visible to a poll, so to every
  -- snapshot taken after it: nothing to check.
  if not self.poll and not self:snapshot_safe(s) then
    self.retries = self.retries + 1
    if self.retries == RETRY_WARN then
      log.warn(string.format("backfill of %s: %d chunk reads in a row saw a delivered transaction as still " ..
        "running (a synchronous standby that does not answer?); retrying", self.l.table_name, self.retries))
    end
    return "retry"
  end
  self.retries = 0
  -- The next cursor.
  local nxt
  if self.mode == "key" then
    nxt = { seg = 1, block = 0, after = cur.after }
    if info.last then nxt.after = info.last end
  else
    nxt = { seg = cur.seg, block = cur.block + self.segs[cur.seg].step }
    if last_seg then nxt = { seg = cur.seg + 1, block = 0 } end
  end
  local last = (self.mode == "key" and info.n < self.chunk) or (self.mode == "ctid" and not self.segs[nxt.seg])
  if info.n == 0 then
    if last then return "done", nxt end
    self.cursor = nxt
    return "empty"
  end
  local c = { rows = rows, n = info.n, src = info.src, snap = s, drop = {}, ndrop = 0, all = false, next = nxt, last = last }
  if self.poll then
    -- Under a trigger driver there is nothing to mark: the chunk waits for a poll of the
    -- capture table that began after its snapshot and read every row the snapshot saw
    -- (M.polled), and is delivered once that poll's rows are.
    c.after_fetch, c.max_seq = d.fetches, tonumber(info.values[2]) or 0
    d.next_poll = core.now()
  else
    c.token = token
    self.client.backfill_tokens[token] = self
  end
  -- Changes delivered while the query ran, by transactions its snapshot did not see.
  for _, ev in ipairs(p.log) do
    if not (ev.xid and visible(ev.xid, s)) then self:drop_keys(c, ev) end
  end
  self.inflight = c
  -- The next chunk is read in the server while this one waits for its place.
  if not last then
    local ok, err = self:send_chunk(nxt)
    if not ok then log.debug("backfill of " .. self.l.table_name .. ": prefetch not sent: " .. tostring(err)) end
  end
  return "read"
end

-- A change delivered to this listener's callbacks (the raw event, whole rows).
function Backfill:touch(ev)
  local xid = ev.xid
  if xid and not self.poll then
    if not self.seen[xid] then self.seen[xid] = true self.nseen = self.nseen + 1 end
  end
  local p = self.pending
  if p and p.log then p.log[#p.log + 1] = ev end
  local c = self.inflight
  if not c or (xid and visible(xid, c.snap)) then return end
  self:drop_keys(c, ev)
end

-- A transaction the chunk's snapshot did not see changed these rows: the chunk's
-- versions of them are older than what was delivered.
function Backfill:drop_keys(c, ev)
  if ev.op == "truncate" then c.all = true return end
  local cols = self.keycols
  if self.mode == "key" then
    for _, row in ipairs({ ev.old or false, ev.new or false }) do
      if row then
        local k = keyof(row, cols)
        if not c.drop[k] then c.drop[k] = true c.ndrop = c.ndrop + 1 end
      end
    end
  elseif ev.old then
    local k = keyof(ev.old, cols)
    c.drop[k] = (c.drop[k] or 0) + 1
    c.ndrop = c.ndrop + 1
  end
end


local function emit_read(l, ev) return l.client:_deliver(l, ev) end

-- The chunk's mark arrived in the stream at `lsn`: every change committed before it has
-- been delivered, none after it. Its rows are delivered here. Returns false to stop.
-- Under a trigger driver (no lsn) a read has no id, as changes there have none.
function Backfill:deliver(c, lsn)
  self.inflight = nil
  local client, l = self.client, self.l
  if c.token then client.backfill_tokens[c.token] = nil end
  local lsn_text = lsn and core.lsn(lsn)
  -- ids: the mark's position, then the row's place in the chunk (as for changes).
  local prefix = lsn and string.format("%08X%08X/", math.floor(lsn / TWO32), lsn % TWO32)
  local n = 0
  if not c.all then
    local cols, drop, ndrop, keyed = self.keycols, c.drop, c.ndrop, self.mode == "key"
    -- No closure here and no variable changing type: this loop runs compiled.
    local srcs, name, last_src = c.src, l.table_name, -1
    local format = string.format
    local lines, layout, read_row = c.rows, self.layout, self.read_row
    -- Rows of just the listened fields, delivered as they are (what where.apply would
    -- make of them), when no condition needs the whole row and no key is to be dropped.
    local direct = ndrop == 0 and not l.matcher and not l.passthrough and self.read_fields or nil
    if direct then read_row = direct end
    local deliver_as_is = (direct and true) or l.passthrough or false
    -- The next chunk's rows, as the server sends them, go into libpq's buffer every few
    -- hundred rows: a chunk is more than the socket holds, and the server would wait.
    local prefetch = self.pending and self.reader
    -- The collector's pause, at its default (200: a cycle each time the heap doubles), is
    -- 150 while the rows are delivered. The heap of a running client is small (a couple
    -- of MB), and each row leaves three or four new strings: at 200 a cycle makes more
    -- strings than the few thousand live ones, so LuaJIT's string table shrinks after each
    -- cycle's sweep and grows again during the next (rehashing every string both times:
    -- some 14% of the client's CPU, measured). At 150 it keeps its size; shorter cycles
    -- also keep the heap warmer in the cache. A pause the script set is left alone.
    local pause = collectgarbage("setpause", GC_PAUSE)
    if pause ~= 200 then collectgarbage("setpause", pause) pause = nil end
    for i = 1, c.n do
      if prefetch and i % 256 == 0 then prefetch:consume() end
      local row, bad, src
      if read_row then
        row, src = read_row(lines, i)
        if not row then bad = src end
      else
        row, bad = lines:row(i, layout)
        src = srcs[i]
      end
      if src ~= last_src then name, last_src = self:source_name(src), src end
      local skip = false
      if not row then
        skip = true
        log.warn(string.format("backfill of %s: a row could not be decoded (%s); skipped", l.table_name, bad))
      elseif ndrop > 0 then
        local k = keyof(row, cols)
        local hit = drop[k]
        if hit then
          skip = true
          if not keyed then
            if hit == 1 then drop[k] = nil else drop[k] = hit - 1 end
          end
        end
      end
      if not skip then
        local ev = { op = "read", table = l.table_name, source = name, new = row,
                     id = prefix and format("%s%08X", prefix, i), lsn = lsn_text }
        n = n + 1
        local go
        if deliver_as_is then go = client:_deliver(l, ev) else go = where.apply(l, ev, emit_read) end
        if go == false or client.failure then
          if pause then collectgarbage("setpause", pause) end
          return false
        end
      end
    end
    if pause then collectgarbage("setpause", pause) end
  end
  self.delivered = self.delivered + n
  local read = c.n
  self.rows_done = self.rows_done + read
  self.run_rows = self.run_rows + read
  self.cursor = c.next
  if c.last then self:finish() end
  if client.acks then
    -- Manual acknowledgements: the chunk is a transaction of its own at lsn; its
    -- progress is saved once everything up to it is acknowledged (M.confirmed). Under a
    -- trigger driver its position is a marker of its own among the delivered capture
    -- seqs (negative: it deletes nothing), confirmed once it leaves that list.
    local pos = lsn
    if self.poll then
      client.backfill_markers = (client.backfill_markers or 0) + 1
      pos = -client.backfill_markers
      local d = client.driver
      d.delivered[#d.delivered + 1] = pos
    end
    self.waiting = self.waiting or {}
    self.waiting[#self.waiting + 1] = { lsn = pos, cursor = c.next, rows = self.rows_done, done = c.last }
    client.acks:commit(pos)
  else
    self:save(c.next, self.rows_done, c.last)
  end
  return true
end

function Backfill:finish()
  self:drop_reader()
  self.done = true
  self.finished_at = core.now()
  local secs = core.now() - (self.started_at or core.now())
  log.info(string.format("backfill of %s done: %d rows read this run (%d in all) in %.1f s", self.l.table_name,
    self.run_rows, self.rows_done, secs))
  self:progress_line(true)
  self:call_on_done()
end

-- on_done, once per run: even if a restarted stream made chunks be read again (M.reset),
-- and also in a run that found the backfill finished by an earlier one (every row was
-- delivered then): a script that waits for it (a cache that says it is warm, a service
-- that opens) must not wait forever after a restart.
function Backfill:call_on_done()
  if self.opts.on_done and not self.on_done_called then
    self.on_done_called = true
    local ok, err = xpcall(self.opts.on_done, function(e)
      return log.script_traceback(debug.traceback(tostring(e), 1))
    end, self.l)
    if not ok then log.error("backfill on_done failed: " .. tostring(err)) end
  end
end

---------------------------------------------------------------------------------------
-- Progress

function Backfill:stats()
  local secs = self.started_at and ((self.finished_at or core.now()) - self.started_at) or 0
  local rate = secs > 0 and self.run_rows / secs or 0
  local est = self.estimated and math.max(self.estimated, self.rows_done) or nil
  local s = { table = self.l.table_name, rows = self.rows_done, delivered = self.delivered, estimated = est,
              rate = rate, done = self.done, mode = self.mode, chunk = self.chunk }
  if est and est > 0 then s.percent = math.min(100, 100 * self.rows_done / est) end
  if self.done then s.eta = 0 elseif est and rate > 0 then s.eta = math.max(0, est - self.rows_done) / rate end
  return s
end

local function fmt_eta(eta)
  if not eta then return "?" end
  if eta >= 3600 then return string.format("%dh%02dm", eta / 3600, (eta % 3600) / 60) end
  if eta >= 60 then return string.format("%dm%02ds", eta / 60, eta % 60) end
  return string.format("%ds", math.ceil(eta))
end

function M.describe(s)
  return string.format("backfill %s %s%d%s rows, %.0f rows/s, ETA %s", s.table,
    s.percent and string.format("%.0f%% ", s.percent) or "", s.rows,
    s.estimated and string.format("/%d", s.estimated) or "", s.rate, s.done and "done" or fmt_eta(s.eta))
end

-- A line on stderr, rewritten in place, when stderr is a terminal.
function Backfill:progress_line(final)
  if self.opts.progress == false or not M.tty() then return end
  local now = core.now()
  if not final and self.shown_at and now - self.shown_at < 1 then return end
  self.shown_at = now
  io.stderr:write("\r\27[K", "flashlua: ", M.describe(self:stats()), final and "\n" or "")
  io.stderr:flush()
end

function M.tty() return isatty(2) end

---------------------------------------------------------------------------------------
-- The driver's side (flash.driver.wal_logical)

-- Whether some backfill of the client wants a chunk read now.
function M.wants(client)
  for _, bf in ipairs(client.backfills or {}) do
    if not bf.done and not bf.inflight and not bf.failed then return true end
  end
  return false
end

-- Reads the chunk of bf (that has none in flight): true, or nil and an error that stops.
local function take(bf)
  local ok, err = true, nil
  if not bf.ready then
    ok, err = bf:setup()
    if ok and bf.done then bf:call_on_done() end    -- finished in an earlier run
  end
  if ok and not bf.done then
    local what, nxt = bf:read_chunk()
    if what == "done" then
      bf.cursor = nxt or bf.cursor
      bf:finish()
      local w = bf.waiting and bf.waiting[#bf.waiting]
      if w then
        -- Manual acks with chunks whose reads are not all acknowledged yet: the end is
        -- saved with the last of them, once it is (M.confirmed), not before: a crash
        -- meanwhile must read them again, not find the backfill finished.
        w.cursor, w.done = bf.cursor, true
      else
        bf:save(bf.cursor, bf.rows_done, true)
      end
    elseif what == nil then
      ok, err = false, nxt
    end
  end
  bf:progress_line(false)
  if ok then return true end
  -- A lost connection is retried by the next step; anything else stops.
  local lost = bf.reader and not bf.reader:ok()
  bf:drop_reader()
  if lost or not bf.client.driver:conn():ok() then
    log.debug("backfill of " .. bf.l.table_name .. ": " .. tostring(err) .. "; retrying")
    return true
  end
  bf.failed = true
  if tostring(err):find("row-level security", 1, true) then
    err = tostring(err):gsub("%s+$", "") .. " (its policies would hide rows from the backfill, and run their " ..
      "expressions as " .. bf.client.role .. ": run flashlua as the table's owner or a role with BYPASSRLS, " ..
      "or have the owner exempt " .. bf.client.role .. " from them)"
  end
  if tostring(err):find("statement timeout", 1, true) then
    err = tostring(err):gsub("%s+$", "") .. string.format(" (a chunk of %d rows took longer than the " ..
      "statement_timeout set for role %s or the database: give the backfill a smaller chunk, e.g. " ..
      "listener:backfill{ chunk = %d }, or raise the timeout for this role)", bf.chunk,
      bf.client.role, math.max(1, math.floor(bf.chunk / 10)))
  end
  return nil, "backfill of " .. bf.l.table_name .. " failed: " .. tostring(err)
end

-- One loop step: a chunk read for each backfill that has none in flight.
function M.step(client)
  for _, bf in ipairs(client.backfills) do
    if bf.error then
      local err = bf.error
      bf.error = nil
      return nil, err
    end
    if bf.pending and bf.inflight and bf.reader then
      -- The prefetched chunk's rows move into libpq's buffer, so the server never waits.
      bf.reader:consume()
    end
    if not bf.done and not bf.failed and not bf.inflight then
      local ok, err = take(bf)
      if not ok then return nil, err end
    end
  end
  return true
end

-- The client stops: the reading connection goes (a chunk being read is abandoned).
function M.close(client)
  for _, bf in ipairs(client.backfills or {}) do bf:drop_reader() end
end

-- The stream's message hook: a chunk's mark.
-- The chunk's own query writes the mark, so the mark of a prefetched chunk can come
-- before the loop took its rows: they are taken here, at the mark's place (the stream
-- waits; the server had the rows out before it wrote the mark), and delivered at once.
function M.on_message(client, lsn, token)
  local bf = client.backfill_tokens and client.backfill_tokens[token]
  if not bf then return true end
  if not bf.inflight then
    local p = bf.pending
    if not p or p.token ~= token or bf.done or bf.failed then return true end
    local ok, err = take(bf)
    if not ok then bf.error = err return true end   -- the loop's step reports it
  end
  local c = bf.inflight
  if not c or c.token ~= token then return true end
  return bf:deliver(c, lsn)
end

-- A new replication stream (start, reconnect): chunks in flight are read again.
-- Under manual acks, chunks delivered and not yet acknowledged are read again from the
-- progress saved last, as the stream delivers its unacknowledged changes again: their old
-- reads can no longer be acknowledged (their place in the ack tracker went with the stream).
-- Also called by the trigger drivers when their connection is re-established.
function M.reset(client)
  for _, bf in ipairs(client.backfills or {}) do
    if bf.inflight then
      if bf.inflight.token then client.backfill_tokens[bf.inflight.token] = nil end
      bf.inflight = nil
    end
    if bf.pending then bf:drop_reader() end
    local w = bf.waiting
    if w and w[1] and bf.saved then
      log.info(string.format("backfill of %s: %d chunk%s not acknowledged when the connection was re-established " ..
        "%s read again, after %d rows", bf.l.table_name, #w, #w == 1 and "" or "s", #w == 1 and "is" or "are",
        bf.saved.rows))
      bf.cursor, bf.rows_done = bf.saved.cursor, bf.saved.rows
      bf.done, bf.finished_at = false, nil
    end
    bf.waiting = nil
  end
end

-- Manual acknowledgements: everything before pos is acknowledged; chunks up to it are done.
function M.confirmed(client, pos)
  for _, bf in ipairs(client.backfills or {}) do
    local w = bf.waiting
    if bf.poll then
      -- Chunks whose markers the driver no longer holds as delivered are acknowledged.
      if w and w[1] then
        local still = {}
        for _, s in ipairs(client.driver.delivered) do if s < 0 then still[s] = true end end
        local last
        while w[1] and not still[w[1].lsn] do last = table.remove(w, 1) end
        if last then bf:save(last.cursor, last.rows, last.done) end
      end
    elseif w and w[1] and w[1].lsn <= pos then
      local last
      while w[1] and w[1].lsn <= pos do last = table.remove(w, 1) end
      bf:save(last.cursor, last.rows, last.done)
    end
  end
end

---------------------------------------------------------------------------------------
-- The trigger drivers' side (flash.driver.capture)

-- A change of listener l (one with a backfill), delivered through flash.filter; returns
-- what the delivery returns.
function M.change(l, ev)
  local bf = l.bf
  if l.passthrough or ev.too_large then
    if #l.callbacks[ev.op] > 0 then bf:touch(ev) end
    return l.client:_deliver(l, ev)
  end
  bf.raw = ev
  local go = where.apply(l, ev, bf.emit)
  bf.raw = nil
  return go
end

-- A batch of the capture table was fetched (d.full: it came back full). A chunk whose
-- snapshot was taken before this fetch began has every row that snapshot saw in it or
-- delivered before it when the batch is not full, or reaches past the last seq the
-- snapshot saw (the batch is the lowest seqs left).
function M.polled(d, rows)
  for _, bf in ipairs(d.client.backfills) do
    local c = bf.inflight
    if c and not c.ready and d.fetches > c.after_fetch then
      if not d.full then
        c.ready = true
      else
        for i = 1, #rows do
          if rows[i].seq >= c.max_seq then c.ready = true break end
        end
      end
    end
  end
end

-- Whether the trigger driver d has backfill work now: a chunk to read, or one whose poll
-- is delivered (the driver's own next poll may be up to poll_interval away).
function M.due(d)
  for _, bf in ipairs(d.client.backfills) do
    local c = bf.inflight
    if c then
      if c.ready and not d.pending then return true end
    elseif not bf.done and not bf.failed then
      return true
    end
  end
  return false
end

-- One step of the trigger driver d: a ready chunk is delivered once its poll's rows are,
-- then chunks are read. true, or nil and an error.
function M.poll_step(d)
  local client = d.client
  for _, bf in ipairs(client.backfills) do
    local c = bf.inflight
    if c and c.ready and not d.pending then
      if bf:deliver(c) == false then
        if client.failure then return nil, client.failure end
        return true
      end
      if not d.listening then return true end
    end
  end
  if M.wants(client) then d.next_poll = core.now() end
  return M.step(client)
end

function M.stats(client)
  local list = {}
  local total = { rows = 0, delivered = 0, rate = 0, done = true, tables = list }
  local est, eta = 0, 0
  for i, bf in ipairs(client.backfills or {}) do
    local s = bf:stats()
    list[i] = s
    total.rows = total.rows + s.rows
    total.delivered = total.delivered + s.delivered
    total.rate = total.rate + s.rate
    total.done = total.done and s.done
    if est and s.estimated then est = est + s.estimated else est = nil end
    if eta and s.eta then eta = math.max(eta, s.eta) else eta = nil end
  end
  total.estimated = est
  total.eta = eta
  if est and est > 0 then total.percent = math.min(100, 100 * total.rows / est) end
  return total
end

return M
