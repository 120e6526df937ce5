-- spec/90-outsider_spec.lua: workloads in the spirit of PostgreSQL's own logical-decoding
-- regression tests (contrib/test_decoding: ddl, toast, truncate, prepared, replorigin,
-- spill; src/test/subscription: types), written from scratch. Each runs under every driver
-- and is compared with an outside truth:
--   * the test_decoding plugin on the same server: a logical slot created before the
--     workload and read after it gives op, table and row values in commit order;
--   * what SQL says: the rows a SELECT returns afterwards, rebuilt from the events;
--   * literal values (what API.md's type mapping says a user sees).
local flash = require "flash"
local core = require "flash.core"
local json = require "flash.json"
local H = require "helpers"

local null = flash.null
local UNCHANGED = {} -- test_decoding's unchanged-toast-datum
local RAW = {}       -- a test_decoding value this parser does not decode (arrays): not compared

-- Values ----------------------------------------------------------------------------------

local function eqv(a, b)
  if a == b then return true end
  if type(a) == "number" and type(b) == "number" then return a ~= a and b ~= b end
  if type(a) ~= "table" or type(b) ~= "table" then return false end
  for k, v in pairs(a) do if not eqv(v, b[k]) then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end

local function show(v)
  if v == null then return "NULL" end
  if v == nil then return "nil" end
  if type(v) == "string" then
    if #v > 60 then
      return string.format("<%d bytes %q..%q>", #v, v:sub(1, 20), v:sub(-20))
    end
    return string.format("%q", v)
  end
  if type(v) == "table" then
    if getmetatable(v) == flash.array_mt or v[1] ~= nil then
      local t = {}
      for i, x in ipairs(v) do t[i] = show(x) end
      return "{" .. table.concat(t, ",") .. "}"
    end
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = tostring(k) end
    table.sort(keys)
    local t = {}
    for _, k in ipairs(keys) do t[#t + 1] = k .. "=" .. show(v[k]) end
    return "{" .. table.concat(t, " ") .. "}"
  end
  if v ~= v then return "NaN" end
  if v == core.unchanged or v == flash.unchanged then return "<unchanged>" end
  return tostring(v)
end

-- Differences between an expected row and a delivered one. subset: columns only in `got`
-- are fine (test_decoding's old key is a part of the row flashlua delivers).
local function row_diff(want, got, subset)
  if type(got) ~= "table" then return { "row missing (want " .. show(want) .. ")" } end
  local d = {}
  for k, v in pairs(want) do
    if v ~= RAW and v ~= UNCHANGED and not eqv(v, got[k]) then
      d[#d + 1] = string.format("%s: want %s got %s", k, show(v), show(got[k]))
    end
  end
  if not subset then
    for k, v in pairs(got) do
      if want[k] == nil then d[#d + 1] = string.format("%s: unexpected column (%s)", k, show(v)) end
    end
  end
  table.sort(d)
  return d
end

local function assert_row(want, got, what)
  local d = row_diff(want, got)
  if #d > 0 then error(what .. ": " .. table.concat(d, "; "), 2) end
end

-- test_decoding ---------------------------------------------------------------------------

local SLOT = "hc_td_" .. core.getpid()

local function td_value(typ, raw, quoted)
  if not quoted and raw == "null" then return null end
  if not quoted and raw == "unchanged-toast-datum" then return UNCHANGED end
  if typ:sub(-2) == "[]" or typ:match("^hc90_") then return RAW end -- arrays, this spec's types
  if typ == "bit varying" then return (raw:match("^B'(.*)'$")) end
  if typ == "integer" or typ == "smallint" or typ == "oid" or typ == "real" or typ == "double precision" then
    if raw == "NaN" then return 0 / 0 elseif raw == "Infinity" then return math.huge
    elseif raw == "-Infinity" then return -math.huge end
    return assert(tonumber(raw), raw)
  elseif typ == "bigint" then
    local n = assert(tonumber(raw))
    if math.abs(n) <= 2 ^ 53 then return n end
    return raw
  elseif typ == "boolean" then
    return raw == "true"
  elseif typ == "bytea" then
    assert(raw:sub(1, 2) == "\\x", raw)
    return (raw:sub(3):gsub("%x%x", function(h) return string.char(tonumber(h, 16)) end))
  elseif typ == "json" or typ == "jsonb" then
    return json.decode(raw)
  end
  return raw -- numeric and every text-mapped type: the literal as printed
end

local function td_tuple(s)
  local row, i, n = {}, 1, #s
  while i <= n do
    while s:sub(i, i) == " " do i = i + 1 end
    if i > n then break end
    local lb = assert(s:find("[", i, true), s)
    local name = s:sub(i, lb - 1)
    if name:sub(1, 1) == '"' then name = name:sub(2, -2):gsub('""', '"') end
    local close = assert(s:find("]:", lb, true), s)
    local typ = s:sub(lb + 1, close - 1)
    i = close + 2
    local raw, quoted
    if s:sub(i, i) == "'" then
      local buf = {}
      i = i + 1
      while true do
        local q = assert(s:find("'", i, true), "unterminated literal")
        buf[#buf + 1] = s:sub(i, q - 1)
        if s:sub(q + 1, q + 1) == "'" then
          buf[#buf + 1] = "'"
          i = q + 2
        else
          i = q + 1
          break
        end
      end
      raw, quoted = table.concat(buf), true
    else
      local sp = s:find(" ", i, true) or n + 1
      raw = s:sub(i, sp - 1)
      i = sp
    end
    row[name] = td_value(typ, raw, quoted)
  end
  return row
end

local function td_begin()
  H.sql(string.format("SET statement_timeout = '30s'; SET lock_timeout = '30s'"))
  H.sql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", SLOT)
  H.sql("SELECT 'init' AS x FROM pg_create_logical_replication_slot($1, 'test_decoding')", SLOT)
end

local function td_drop()
  H.sql("SELECT pg_catalog.set_config('statement_timeout', '0', false), pg_catalog.set_config('lock_timeout', '0', false)")
  H.sql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", SLOT)
end

-- The changes of `tables` (list of "public.x") since td_begin, in commit order.
local function td_changes(tables)
  -- The sandbox runs with synchronous_commit = off, and logical decoding reads flushed WAL
  -- only: one synchronous commit flushes everything committed before it.
  H.sql("BEGIN; SET LOCAL synchronous_commit = on; SELECT pg_catalog.pg_logical_emit_message(true, 'hc90', 'flush'); COMMIT")
  local want = {}
  for _, t in ipairs(tables) do want[t] = true end
  local rows = H.sql("SELECT data FROM pg_logical_slot_get_changes($1, NULL, NULL, " ..
    "'include-xids', '0', 'skip-empty-xacts', '1')", SLOT)
  td_drop()
  local out = {}
  for _, r in ipairs(rows) do
    local tbls, op, rest = r.data:match("^table (.-): (%u+):(.*)$")
    if tbls then
      rest = rest:gsub("^ ", "")
      if op == "TRUNCATE" then
        local group = {}
        for name in tbls:gmatch("[^, ]+") do if want[name] then group[#group + 1] = name end end
        table.sort(group)
        for _, name in ipairs(group) do out[#out + 1] = { op = "truncate", table = name, group = #group } end
      elseif want[tbls] then
        local ev = { op = op:lower(), table = tbls }
        if op == "INSERT" then
          ev.new = td_tuple(rest)
        elseif op == "UPDATE" then
          if rest:sub(1, 8) == "old-key:" then
            local a, b = assert(rest:find(" new-tuple: ", 1, true))
            ev.old = td_tuple(rest:sub(9, a - 1))
            ev.new = td_tuple(rest:sub(b + 1))
          else
            ev.new = td_tuple(rest)
          end
        elseif op == "DELETE" then
          if rest ~= "(no-tuple-data)" then ev.old = td_tuple(rest) end
        end
        out[#out + 1] = ev
      end
    end
  end
  return out
end

local function trace(list, col)
  col = col or "id"
  local t = {}
  for i, ev in ipairs(list) do
    local row = ev.new or ev.old
    t[i] = ev.op .. " " .. ev.table:gsub("^public%.t_%d+_", "t") .. (row and row[col] ~= nil and (" " .. show(row[col])) or "")
  end
  return table.concat(t, ", ")
end

-- flashlua's events against test_decoding's, one by one: op, table, every column of the new
-- row (exactly these columns), every column test_decoding has of the old row.
local function compare_td(events, td, col)
  if #events ~= #td then
    error(string.format("%d events, test_decoding has %d\n  flash: %s\n  td:    %s",
      #events, #td, trace(events, col), trace(td, col)), 2)
  end
  local i = 1
  while i <= #td do
    local w, g = td[i], events[i]
    if w.op == "truncate" then
      local a, b = {}, {}
      for j = i, i + w.group - 1 do
        a[#a + 1] = td[j].table
        b[#b + 1] = events[j].op .. " " .. events[j].table
      end
      table.sort(b)
      for j = 1, #a do a[j] = "truncate " .. a[j] end
      if table.concat(a, ",") ~= table.concat(b, ",") then
        error(string.format("event %d: truncate of %s, got %s", i, table.concat(a, ","), table.concat(b, ",")), 2)
      end
      i = i + w.group
    else
      if w.op ~= g.op or w.table ~= g.table then
        error(string.format("event %d: want %s %s, got %s %s\n  flash: %s\n  td:    %s", i, w.op, w.table, g.op,
          g.table, trace(events, col), trace(td, col)), 2)
      end
      if w.new then
        local d = row_diff(w.new, g.new)
        if #d > 0 then error(string.format("event %d (%s) new: %s", i, w.op, table.concat(d, "; ")), 2) end
      end
      if w.old then
        local d = row_diff(w.old, g.old, true)
        if #d > 0 then error(string.format("event %d (%s) old: %s", i, w.op, table.concat(d, "; ")), 2) end
      end
      i = i + 1
    end
  end
end

-- Replays events into the rows they describe (per table, by `key`): each old row must be
-- the row the earlier events built, and the result must be what SELECT says now.
local function replay_check(events, tables, key, seed)
  key = key or "id"
  local model = {}
  for _, t in ipairs(tables) do
    model["public." .. t] = {}
    for _, r in ipairs(seed and seed[t] or {}) do model["public." .. t][r[key]] = r end
  end
  for i, ev in ipairs(events) do
    local m = model[ev.table]
    if not m then   -- luacheck: ignore 542 (a table not checked here)
    elseif ev.op == "truncate" then
      model[ev.table] = {}
    else
      if ev.op ~= "insert" then
        local old = ev.old
        if old == nil then error(string.format("event %d (%s %s): no old row", i, ev.op, ev.table), 2) end
        local had = m[old[key]]
        if had == nil then error(string.format("event %d (%s): old key %s was never delivered", i, ev.op, show(old[key])), 2) end
        for k, v in pairs(had) do
          if old[k] ~= nil and not eqv(v, old[k]) then
            error(string.format("event %d (%s) old.%s: was %s, old row says %s", i, ev.op, k, show(v), show(old[k])), 2)
          end
        end
        m[old[key]] = nil
      end
      if ev.new then m[ev.new[key]] = ev.new end
    end
  end
  for _, t in ipairs(tables) do
    local rows = H.sql("SELECT * FROM " .. t)
    local m, n = model["public." .. t], 0
    for _ in pairs(m) do n = n + 1 end
    if n ~= #rows then error(string.format("%s: events rebuild %d rows, SELECT has %d", t, n, #rows), 2) end
    for _, r in ipairs(rows) do
      local d = row_diff(r, m[r[key]])
      if #d > 0 then error(string.format("%s row %s: %s", t, show(r[key]), table.concat(d, "; ")), 2) end
    end
  end
end

-- Workload data ---------------------------------------------------------------------------

local function concat_range(n, f)
  local t = {}
  for i = 1, n do t[i] = f(i) end
  return table.concat(t)
end
local V1 = concat_range(2000, tostring)                                    -- string_agg(g.i::text, '')
local V2 = concat_range(2000, function(i) return tostring(2 * i) end)
local V3 = string.rep(concat_range(500, function(i) return string.format("%04d", i) end), 50)

local ALL_BYTES = concat_range(256, function(i) return string.char(i - 1) end)
local CTRL_TEXT = "é ü 😀 \t\n\r\\ \1\2\27\31 'q' \"dq\" {a,b} (x) \\x00 NULL"

for _, driver in ipairs(H.drivers) do
describe("outsider workloads (" .. driver .. ")", function()
  local client
  local mark_table, mark = nil, 0

  after_each(function()
    if client then client:stop() client = nil end
    -- a failed workload must not leave a prepared transaction (slot creation would wait for it)
    H.sql("SELECT pg_catalog.set_config('statement_timeout', '0', false)")
    for _, r in ipairs(H.sql("SELECT gid FROM pg_prepared_xacts WHERE gid LIKE $1", "hc90_" .. core.getpid() .. "%")) do
      H.sql("ROLLBACK PREPARED '" .. r.gid .. "'")
    end
    td_drop()
  end)

  -- A started client listening to every op of `tables` (names in public) plus the marker
  -- table; every event lands in the returned list as { op, table, new, old }.
  local function session(tables, extra)
    if not mark_table then mark_table = H.table("id int") end
    local opts = { driver = driver, replica_identity = "full" }
    for k, v in pairs(extra or {}) do opts[k] = v end
    local c = assert(flash.client(opts))
    client = c
    local events = {}
    local function cb(ev) events[#events + 1] = { op = ev.op, table = ev.table, new = ev.new, old = ev.old } end
    for _, t in ipairs(tables) do assert(c:listen { table = t }):on("all", cb) end
    assert(c:listen { table = mark_table }):on("insert", cb)
    assert(c:start())
    return events
  end

  -- Inserts a marker row and polls until it arrives: everything committed before it is in.
  -- Returns the events without the markers.
  local function until_mark(events, timeout)
    mark = mark + 1
    H.sql("INSERT INTO " .. mark_table .. " VALUES ($1)", mark)
    local deadline = core.now() + (timeout or 10)
    local mt = "public." .. mark_table
    while true do
      for _, ev in ipairs(events) do
        if ev.table == mt and ev.new.id == mark then
          local out = {}
          for _, e in ipairs(events) do if e.table ~= mt then out[#out + 1] = e end end
          return out
        end
      end
      if core.now() > deadline then
        error("marker never arrived; got " .. #events .. " events: " .. trace(events):sub(1, 400))
      end
      assert(client:poll(0.02))
    end
  end

  local function pub(t) return "public." .. t end

  -- Fills @name placeholders of a SQL text.
  local function fill(sql, map)
    return (sql:gsub("@(%w+)", function(k) return assert(map[k], k) end))
  end

  -- ddl.sql: changes interleaved with ALTER TABLE ADD/DROP/RENAME/retype COLUMN, and columns
  -- added between inserts of one transaction.
  it("DDL between DML: row shapes follow ADD/DROP/RENAME COLUMN, also inside one transaction", function()
    local t = H.table("id serial PRIMARY KEY, somedata int, text varchar(120)")
    local events = session({ t })
    td_begin()
    H.sql(fill([[
      BEGIN;
      INSERT INTO @T (somedata, text) VALUES (1, 1);
      INSERT INTO @T (somedata, text) VALUES (1, 2);
      COMMIT;
      ALTER TABLE @T ADD COLUMN bar int;
      INSERT INTO @T (somedata, text, bar) VALUES (2, 1, 4);
      BEGIN;
      INSERT INTO @T (somedata, text, bar) VALUES (2, 2, 4);
      INSERT INTO @T (somedata, text, bar) VALUES (2, 3, 4);
      INSERT INTO @T (somedata, text, bar) VALUES (2, 4, NULL);
      COMMIT;
      ALTER TABLE @T DROP COLUMN bar;
      INSERT INTO @T (somedata, text) VALUES (3, 1);
      BEGIN;
      INSERT INTO @T (somedata, text) VALUES (3, 2);
      INSERT INTO @T (somedata, text) VALUES (3, 3);
      COMMIT;
      ALTER TABLE @T RENAME COLUMN text TO somenum;
      INSERT INTO @T (somedata, somenum) VALUES (4, 1);
      ALTER TABLE @T ALTER COLUMN somenum TYPE int4 USING (somenum::int4);
      INSERT INTO @T (somedata, somenum) VALUES (5, 1);
      BEGIN;
      INSERT INTO @T (somedata, somenum) VALUES (6, 1);
      ALTER TABLE @T ADD COLUMN zaphod1 int;
      INSERT INTO @T (somedata, somenum, zaphod1) VALUES (6, 2, 1);
      ALTER TABLE @T ADD COLUMN zaphod2 int;
      INSERT INTO @T (somedata, somenum, zaphod2) VALUES (6, 3, 1);
      INSERT INTO @T (somedata, somenum, zaphod1) VALUES (6, 4, 2);
      COMMIT;
      UPDATE @T SET somedata = -somedata WHERE id <= 2;
      DELETE FROM @T WHERE id = 3;
    ]], { T = t }))
    local got = until_mark(events)
    compare_td(got, td_changes({ pub(t) }))
    assert.equal(18, #got)
    assert_row({ id = 1, somedata = 1, text = "1" }, got[1].new, "first insert")
    assert_row({ id = 3, somedata = 2, text = "1", bar = 4 }, got[3].new, "after ADD COLUMN")
    assert_row({ id = 6, somedata = 2, text = "4", bar = null }, got[6].new, "NULL in the added column")
    assert_row({ id = 7, somedata = 3, text = "1" }, got[7].new, "after DROP COLUMN")
    assert_row({ id = 10, somedata = 4, somenum = "1" }, got[10].new, "after RENAME COLUMN")
    assert_row({ id = 11, somedata = 5, somenum = 1 }, got[11].new, "after ALTER TYPE int4")
    assert_row({ id = 12, somedata = 6, somenum = 1 }, got[12].new, "before ADD COLUMN in the transaction")
    assert_row({ id = 13, somedata = 6, somenum = 2, zaphod1 = 1 }, got[13].new, "after ADD zaphod1")
    assert_row({ id = 15, somedata = 6, somenum = 4, zaphod1 = 2, zaphod2 = null }, got[15].new, "after ADD zaphod2")
    assert_row({ id = 1, somedata = -1, somenum = 1, zaphod1 = null, zaphod2 = null }, got[16].new, "update after DDL")
    assert_row({ id = 3, somedata = 2, somenum = 1, zaphod1 = null, zaphod2 = null }, got[18].old, "delete after DDL")
  end)

  -- ddl.sql tr_sub: savepoints released, 80 nested, rolled back to, and a change in a
  -- subtransaction of a transaction with no xid yet.
  it("subtransactions: released savepoints count, ROLLBACK TO drops exactly its rows", function()
    local t = H.table("id serial PRIMARY KEY, path text")
    local events = session({ t })
    td_begin()
    local nest = string.rep("SAVEPOINT a; ", 80)
    H.sql(fill([[
      BEGIN;
      INSERT INTO @T (path) VALUES ('1-top-#1');
      SAVEPOINT a;
      INSERT INTO @T (path) VALUES ('1-top-1-#1');
      INSERT INTO @T (path) VALUES ('1-top-1-#2');
      RELEASE SAVEPOINT a;
      SAVEPOINT b; SAVEPOINT c;
      INSERT INTO @T (path) VALUES ('1-top-2-1-#1');
      INSERT INTO @T (path) VALUES ('1-top-2-1-#2');
      RELEASE SAVEPOINT c;
      INSERT INTO @T (path) VALUES ('1-top-2-#1');
      RELEASE SAVEPOINT b;
      COMMIT;
      BEGIN;
      SAVEPOINT subtop; @NEST
      INSERT INTO @T (path) VALUES ('2-top-1...--#1');
      INSERT INTO @T (path) VALUES ('2-top-1...--#2');
      RELEASE SAVEPOINT subtop;
      INSERT INTO @T (path) VALUES ('2-top-#1');
      COMMIT;
      BEGIN;
      INSERT INTO @T (path) VALUES ('3-top-2-#1');
      SAVEPOINT a;
      INSERT INTO @T (path) VALUES ('3-top-2-1-#1');
      SAVEPOINT b;
      INSERT INTO @T (path) VALUES ('3-top-2-2-#1');
      UPDATE @T SET path = path || '-upd' WHERE path = '1-top-#1';
      ROLLBACK TO SAVEPOINT b;
      INSERT INTO @T (path) VALUES ('3-top-2-#2');
      UPDATE @T SET path = path || '-kept' WHERE path = '1-top-1-#1';
      COMMIT;
      BEGIN;
      SAVEPOINT a;
      INSERT INTO @T (path) VALUES ('5-top-1-#1');
      COMMIT;
      BEGIN;
      SAVEPOINT a;
      INSERT INTO @T (path) VALUES ('6-rolled-back');
      ROLLBACK TO SAVEPOINT a;
      DELETE FROM @T WHERE path = '1-top-2-#1';
      COMMIT;
    ]], { T = t, NEST = nest }))
    local got = until_mark(events)
    compare_td(got, td_changes({ pub(t) }))
    local paths = {}
    for i, ev in ipairs(got) do paths[i] = ev.op .. " " .. (ev.new or ev.old).path end
    assert.same({ "insert 1-top-#1", "insert 1-top-1-#1", "insert 1-top-1-#2", "insert 1-top-2-1-#1",
      "insert 1-top-2-1-#2", "insert 1-top-2-#1", "insert 2-top-1...--#1", "insert 2-top-1...--#2",
      "insert 2-top-#1", "insert 3-top-2-#1", "insert 3-top-2-1-#1", "insert 3-top-2-#2",
      "update 1-top-1-#1-kept", "insert 5-top-1-#1", "delete 1-top-2-#1" }, paths)
    replay_check(got, { t })
  end)

  -- toast.sql: external (uncompressed and compressed) values, updates that leave a toasted
  -- column unchanged, an upsert of a toasted column, a toasted primary key changed and not.
  it("TOAST: unchanged toasted columns arrive with their full value in new and old", function()
    local t = H.table("id serial PRIMARY KEY, toasted_col1 text, rand1 float8, toasted_col2 text, rand2 float8")
    H.sql(fill("CREATE SEQUENCE @T_seq START 79 INCREMENT 1499; " ..
      "ALTER TABLE @T ALTER rand1 SET DEFAULT nextval('@T_seq'), ALTER rand2 SET DEFAULT nextval('@T_seq')", { T = t }))
    local k = H.table("id serial, toasted_key text PRIMARY KEY, toasted_col1 text, toasted_col2 text")
    H.sql(fill("ALTER TABLE @K ALTER COLUMN toasted_key SET STORAGE EXTERNAL; " ..
      "ALTER TABLE @K ALTER COLUMN toasted_col1 SET STORAGE EXTERNAL", { K = k }))
    local events = session({ t, k })
    td_begin()
    H.sql(fill([[
      INSERT INTO @T (toasted_col1, toasted_col2) SELECT string_agg(g.i::text, ''), string_agg((g.i*2)::text, '')
        FROM generate_series(1, 2000) g(i);
      INSERT INTO @T (toasted_col2) SELECT repeat(string_agg(to_char(g.i, 'FM0000'), ''), 50) FROM generate_series(1, 500) g(i);
      UPDATE @T SET toasted_col1 = (SELECT string_agg(g.i::text, '') FROM generate_series(1, 2000) g(i)) WHERE id = 1;
      UPDATE @T SET rand1 = 123.456 WHERE id = 1;
      INSERT INTO @T (id, toasted_col2) VALUES (2, 'toasted2-upsert')
        ON CONFLICT (id) DO UPDATE SET toasted_col2 = EXCLUDED.toasted_col2 || @T.toasted_col2;
      DELETE FROM @T WHERE id = 1;
      INSERT INTO @K (toasted_key, toasted_col1) VALUES (repeat('1234567890', 200), repeat('9876543210', 200));
      UPDATE @K SET toasted_col2 = toasted_col1;
      UPDATE @K SET toasted_key = toasted_key || '1';
      DELETE FROM @K;
    ]], { T = t, K = k }))
    local got = until_mark(events)
    compare_td(got, td_changes({ pub(t), pub(k) }))
    local r1 = { id = 1, toasted_col1 = V1, rand1 = 79, toasted_col2 = V2, rand2 = 1578 }
    local r2 = { id = 2, toasted_col1 = null, rand1 = 3077, toasted_col2 = V3, rand2 = 4576 }
    local r1b = { id = 1, toasted_col1 = V1, rand1 = 123.456, toasted_col2 = V2, rand2 = 1578 }
    local r2b = { id = 2, toasted_col1 = null, rand1 = 3077, toasted_col2 = "toasted2-upsert" .. V3, rand2 = 4576 }
    assert.equal(10, #got)
    assert_row(r1, got[1].new, "insert 1")
    assert_row(r2, got[2].new, "insert 2")
    assert_row(r1, got[3].new, "update toasted_col1 to the same value: new")
    assert_row(r1, got[3].old, "update toasted_col1 to the same value: old")
    assert_row(r1b, got[4].new, "update rand1 only: new")
    assert_row(r1, got[4].old, "update rand1 only: old")
    assert_row(r2b, got[5].new, "upsert: new")
    assert_row(r2, got[5].old, "upsert: old")
    assert_row(r1b, got[6].old, "delete: old")
    local K1, C1 = string.rep("1234567890", 200), string.rep("9876543210", 200)
    assert_row({ id = 1, toasted_key = K1, toasted_col1 = C1, toasted_col2 = null }, got[7].new, "toasted key insert")
    assert_row({ id = 1, toasted_key = K1, toasted_col1 = C1, toasted_col2 = C1 }, got[8].new, "key unchanged: new")
    assert_row({ id = 1, toasted_key = K1, toasted_col1 = C1, toasted_col2 = null }, got[8].old, "key unchanged: old")
    assert_row({ id = 1, toasted_key = K1 .. "1", toasted_col1 = C1, toasted_col2 = C1 }, got[9].new, "key changed: new")
    assert_row({ id = 1, toasted_key = K1, toasted_col1 = C1, toasted_col2 = C1 }, got[9].old, "key changed: old")
    assert_row({ id = 1, toasted_key = K1 .. "1", toasted_col1 = C1, toasted_col2 = C1 }, got[10].old, "delete: old")
  end)

  -- toast.sql toasted_several: an old row bigger than a heap tuple (a 100,000-byte key),
  -- updated twice without changing the key.
  it("TOAST: a 100 kB external key with REPLICA IDENTITY FULL, updated around it", function()
    local t = H.table("id serial primary key, toasted_key text not null, toasted_col1 text, toasted_col2 text")
    H.sql(fill("ALTER TABLE @T REPLICA IDENTITY FULL; ALTER TABLE @T ALTER COLUMN toasted_key SET STORAGE EXTERNAL; " ..
      "ALTER TABLE @T ALTER COLUMN toasted_col1 SET STORAGE EXTERNAL; ALTER TABLE @T ALTER COLUMN toasted_col2 SET STORAGE EXTERNAL", { T = t }))
    local events = session({ t })
    td_begin()
    H.sql(fill([[
      INSERT INTO @T (toasted_key) VALUES (repeat('9876543210', 10000));
      UPDATE @T SET toasted_col1 = toasted_key;
      UPDATE @T SET toasted_col2 = toasted_col1;
      BEGIN;
      INSERT INTO @T (toasted_key) SELECT g::text FROM generate_series(1, 2000) g;
      UPDATE @T SET toasted_col1 = 'x' || toasted_col2 WHERE id = 1;
      DELETE FROM @T WHERE id = 1;
      COMMIT;
    ]], { T = t }))
    local got = until_mark(events)
    compare_td(got, td_changes({ pub(t) }))
    local K = string.rep("9876543210", 10000)
    assert.equal(2005, #got)
    assert_row({ id = 1, toasted_key = K, toasted_col1 = K, toasted_col2 = null }, got[2].new, "update 1: new")
    assert_row({ id = 1, toasted_key = K, toasted_col1 = null, toasted_col2 = null }, got[2].old, "update 1: old")
    assert_row({ id = 1, toasted_key = K, toasted_col1 = K, toasted_col2 = K }, got[3].new, "update 2: new")
    assert_row({ id = 1, toasted_key = K, toasted_col1 = "x" .. K, toasted_col2 = K }, got[2004].new, "update 3: new")
    assert_row({ id = 1, toasted_key = K, toasted_col1 = "x" .. K, toasted_col2 = K }, got[2005].old, "delete: old")
    replay_check(got, { t })
  end)

  -- toast.sql toasted_copy: a multi-row load (INSERT ... SELECT here) mixing toasted and
  -- plain rows.
  it("bulk load mixing toasted and plain rows keeps every row and its order", function()
    local t = H.table("id int PRIMARY KEY, data text")
    H.sql("ALTER TABLE " .. t .. " ALTER COLUMN data SET STORAGE EXTERNAL")
    local events = session({ t })
    td_begin()
    H.sql("INSERT INTO " .. t .. [[ SELECT g, CASE WHEN g IN (2, 4, 201)
        THEN 'toasted' || g || '-' || repeat('1234567890', 300) ELSE 'untoasted' || g END
      FROM generate_series(1, 203) g]])
    local got = until_mark(events)
    compare_td(got, td_changes({ pub(t) }))
    assert.equal(203, #got)
    for i, ev in ipairs(got) do
      local want = (i == 2 or i == 4 or i == 201) and ("toasted" .. i .. "-" .. string.rep("1234567890", 300))
        or ("untoasted" .. i)
      assert_row({ id = i, data = want }, ev.new, "row " .. i)
    end
  end)

  -- subscription/t/002_types.pl and friends: values at the edges of their types.
  it("odd types: NaN/Infinity, infinite timestamps, nested arrays, composites, ranges, enums, domains, every byte", function()
    local p = "hc90_" .. core.getpid() .. "_"
    local names = { Pcomp = p .. "comp", Penum = p .. "enum", Pdom = p .. "dom", Pdtext = p .. "dtext",
      HEX = "'" .. ALL_BYTES:gsub(".", function(c) return string.format("%02x", c:byte()) end) .. "'" }
    H.sql(fill([[
      DROP TYPE IF EXISTS @Pcomp CASCADE; DROP TYPE IF EXISTS @Penum CASCADE;
      DROP DOMAIN IF EXISTS @Pdom CASCADE; DROP DOMAIN IF EXISTS @Pdtext CASCADE;
      CREATE TYPE @Pcomp AS (a float8, b text, c int);
      CREATE TYPE @Penum AS ENUM ('a', 'b', 'c', 'd');
      CREATE DOMAIN @Pdom AS int CHECK (VALUE > 0);
      CREATE DOMAIN @Pdtext AS text CHECK (VALUE <> '');
    ]], names))
    local t = H.table(fill([[id int PRIMARY KEY, n1 numeric, n2 numeric, n3 numeric, n4 numeric, n5 numeric(40,9),
      f1 float8, f2 float8, f3 real, f4 float8, b1 bigint, b2 bigint, ts1 timestamptz, ts2 timestamptz,
      ts3 timestamptz, ts4 timestamp, d1 date, iv interval, aa int[], ta text[], ta3 int[], ab bool[],
      comp @Pcomp, comps @Pcomp[], r1 int4range, r2 tstzrange, r3 int8range[], r4 int4range, e @Penum,
      ea @Penum[], dm @Pdom, dt @Pdtext, by bytea, tx text, u uuid, ip inet, js jsonb, ch char(5),
      o oid, tm time, ttz timetz, vb varbit, pt point]], names))
    names.T = t
    local events = session({ t })
    td_begin()
    -- a writer with other settings: events stay canonical
    H.sql("SET TimeZone = 'Europe/Paris'; SET DateStyle = 'SQL, DMY'; SET IntervalStyle = 'iso_8601'; SET bytea_output = 'escape'")
    H.sql(fill([=[
      INSERT INTO @T VALUES (1, 'NaN', 'Infinity', '-Infinity', '0.000000000000000000000000000001',
        '123456789012345678901234567890.123456789', 'NaN', '-Infinity', 'Infinity', '-0',
        9223372036854775807, -9007199254740992, 'infinity', '-infinity', '2014-08-04 00:00:00+02',
        '2000-01-01 00:00:00.123456', 'infinity', '1 year 2 mons -3 days 04:05:06.789',
        '{{1,2},{3,NULL}}', '{"a,b","c\"d","e\\f",NULL,"NULL",""}', '{{{1}},{{2}}}', '{t,f,NULL}',
        ROW(1.5, 'x y', NULL), ARRAY[NULL, ROW(5, NULL, 5)]::@Pcomp[], '[1,10]',
        tstzrange('2014-08-04 00:00:00+02', 'infinity'), '{"[1,2]","[10,20]",NULL}', 'empty', 'b',
        '{d,NULL}', 7, 'x', decode(@HEX, 'hex'), $1, 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11',
        '192.168.0.1/24', '{"a": [1, {"b": null}], "c": "\u00e9", "d": 1.50}', 'ab', 4294967295,
        '24:00:00', '12:00:00+05:30', B'101', '(1,2)')]=], names), CTRL_TEXT)
    H.sql(fill([[
      INSERT INTO @T (id) VALUES (2);
      UPDATE @T SET id = id WHERE id = 1;
      UPDATE @T SET comp = ROW(NULL, NULL, NULL), ta = '{}', dm = 8 WHERE id = 1;
      DELETE FROM @T WHERE id = 2;
    ]], names))
    H.sql("RESET TimeZone; RESET DateStyle; RESET IntervalStyle; RESET bytea_output")
    local got = until_mark(events)
    compare_td(got, td_changes({ pub(t) }))
    local want = {
      id = 1, n1 = "NaN", n2 = "Infinity", n3 = "-Infinity", n4 = "0.000000000000000000000000000001",
      n5 = "123456789012345678901234567890.123456789", f1 = 0 / 0, f2 = -math.huge, f3 = math.huge, f4 = -0.0,
      b1 = "9223372036854775807", b2 = -9007199254740992, ts1 = "infinity", ts2 = "-infinity",
      ts3 = "2014-08-03 22:00:00+00", ts4 = "2000-01-01 00:00:00.123456", d1 = "infinity",
      iv = "1 year 2 mons -3 days +04:05:06.789", aa = { { 1, 2 }, { 3, null } },
      ta = { "a,b", 'c"d', "e\\f", null, "NULL", "" }, ta3 = { { { 1 } }, { { 2 } } }, ab = { true, false, null },
      comp = '(1.5,"x y",)', comps = { null, "(5,,5)" }, r1 = "[1,11)",
      r2 = '["2014-08-03 22:00:00+00",infinity)', r3 = { "[1,3)", "[10,21)", null }, r4 = "empty", e = "b",
      ea = { "d", null }, dm = 7, dt = "x", by = ALL_BYTES, tx = CTRL_TEXT,
      u = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", ip = "192.168.0.1/24",
      js = { a = { 1, { b = null } }, c = "é", d = 1.5 }, ch = "ab   ", o = 4294967295, tm = "24:00:00",
      ttz = "12:00:00+05:30", vb = "101", pt = "(1,2)",
    }
    local nulls = {}
    for c in pairs(want) do nulls[c] = null end
    nulls.id = 2
    assert.equal(5, #got)
    assert_row(want, got[1].new, "insert: new")
    assert_row(nulls, got[2].new, "insert of NULLs: new")
    assert_row(want, got[3].new, "update id = id: new")
    assert_row(want, got[3].old, "update id = id: old")
    local want2 = {}
    for k, v in pairs(want) do want2[k] = v end
    want2.comp, want2.ta, want2.dm = "(,,)", {}, 8
    assert_row(want2, got[4].new, "update: new")
    assert.equal(flash.array_mt, getmetatable(got[4].new.ta))
    assert_row(want, got[4].old, "update: old")
    assert_row(nulls, got[5].old, "delete of NULLs: old")
    client:stop()
    client = nil
    H.sql(fill("DROP TABLE @T; DROP TYPE @Pcomp CASCADE; DROP TYPE @Penum CASCADE; DROP DOMAIN @Pdom; DROP DOMAIN @Pdtext", names))
  end)

  -- Many columns, NULL everywhere, then values everywhere, against test_decoding value by value.
  it("300 columns: a row of NULLs, a full row, an update of one column, a delete", function()
    local kinds = { "int", "text", "numeric", "boolean", "bytea", "double precision", "bigint",
      "varchar(20)", "timestamptz", "jsonb" }
    local vals = { "g", "'t' || g", "(g || '.5')::numeric", "g % 2 = 0", "decode(lpad(to_hex(g), 4, '0'), 'hex')",
      "g / 4.0", "g * 1000000000000", "'v' || g", "'2020-01-01 00:00:00+00'::timestamptz + g * interval '1 hour'",
      "jsonb_build_object('k', g, 'a', jsonb_build_array(g, NULL))" }
    local cols, sets = { "id int PRIMARY KEY" }, {}
    for i = 1, 299 do
      local kind = (i - 1) % #kinds + 1
      cols[#cols + 1] = string.format("c%d %s", i, kinds[kind])
      sets[#sets + 1] = (vals[kind]:gsub("%f[%w]g%f[%W]", tostring(i)))
    end
    local t = H.table(table.concat(cols, ", "))
    local events = session({ t })
    td_begin()
    H.sql(string.format([[
      INSERT INTO %s (id) VALUES (1);
      INSERT INTO %s VALUES (2, %s);
      UPDATE %s SET c142 = 'changed' WHERE id = 2;
      UPDATE %s SET c1 = -1 WHERE id = 1;
      DELETE FROM %s WHERE id = 1;
    ]], t, t, table.concat(sets, ", "), t, t, t))
    local got = until_mark(events)
    compare_td(got, td_changes({ pub(t) }))
    assert.equal(5, #got)
    local n = 0
    for c, v in pairs(got[1].new) do
      n = n + 1
      if c ~= "id" then assert.equal(null, v, c) end
    end
    assert.equal(300, n)
    local r = got[2].new
    assert.same({ 1, "t2", "3.5", true, "\0\5", 1.5, 7000000000000, "v8", "2020-01-01 09:00:00+00" },
      { r.c1, r.c2, r.c3, r.c4, r.c5, r.c6, r.c7, r.c8, r.c9 })
    assert.same({ k = 10, a = { 10, null } }, r.c10)
    assert.equal("changed", got[3].new.c142)
    assert.equal("t142", got[3].old.c142)
    replay_check(got, { t })
  end)

  -- truncate.sql plus a transaction mixing two tables' inserts, updates and deletes.
  it("one transaction over two tables, then TRUNCATE of one, of one twice, of both", function()
    local a = H.table("id serial unique, data int")
    local b = H.table("id int primary key, b int")
    local events = session({ a, b })
    td_begin()
    H.sql(fill([[
      BEGIN;
      INSERT INTO @A (data) VALUES (1), (2);
      INSERT INTO @B VALUES (1, 10), (2, 20);
      UPDATE @A SET data = data + 100 WHERE id = 1;
      DELETE FROM @B WHERE id = 1;
      INSERT INTO @B VALUES (3, 30);
      UPDATE @B SET b = -b;
      COMMIT;
      TRUNCATE @A;
      INSERT INTO @A (data) VALUES (3);
      TRUNCATE @A, @A RESTART IDENTITY CASCADE;
      INSERT INTO @A (data) VALUES (4);
      TRUNCATE @A, @B;
      INSERT INTO @B VALUES (5, 50);
    ]], { A = a, B = b }))
    local got = until_mark(events)
    local td = td_changes({ pub(a), pub(b) })
    if driver ~= "trigger_statement" then compare_td(got, td) end
    local tr = {}
    for i, ev in ipairs(got) do
      local row = ev.new or ev.old
      tr[i] = ev.op .. " " .. (ev.table == pub(a) and "a" or "b") .. (row and (" " .. row.id) or "")
    end
    local last3 = { tr[#tr - 2], tr[#tr - 1] }
    table.sort(last3)
    assert.same({ "insert a 1", "insert a 2", "insert b 1", "insert b 2", "update a 1", "delete b 1",
      "insert b 3", "update b 2", "update b 3", "truncate a", "insert a 3", "truncate a", "insert a 1" },
      { unpack(tr, 1, 13) })
    assert.same({ "truncate a", "truncate b" }, last3)
    assert.equal("insert b 5", tr[#tr])
    assert.equal(-30, got[9].new.b)
    replay_check(got, { a, b })
  end)

  -- ddl.sql: tables with and without a key, REPLICA IDENTITY changes, UPDATE of the key.
  it("UPDATE of the primary key and UPDATE/DELETE on a table without a key", function()
    local nk = H.table("id serial, data int")
    local pk = H.table("id serial primary key, data int")
    local events = session({ nk, pk })
    td_begin()
    H.sql(fill([[
      INSERT INTO @NK (data) VALUES (1), (2);
      DELETE FROM @NK WHERE data = 1;
      UPDATE @NK SET data = 3 WHERE data = 2;
      UPDATE @NK SET id = -id;
      UPDATE @NK SET id = -id;
      ALTER TABLE @NK ADD COLUMN new_column text;
      UPDATE @NK SET id = -id;
      UPDATE @NK SET id = -id, new_column = 'someval';
      DELETE FROM @NK WHERE data = 3;
      INSERT INTO @PK (data) VALUES (1), (2);
      DELETE FROM @PK WHERE data = 1;
      UPDATE @PK SET data = 3 WHERE data = 2;
      UPDATE @PK SET id = -id;
      UPDATE @PK SET id = -id;
      DELETE FROM @PK WHERE data = 3;
    ]], { NK = nk, PK = pk }))
    local got = until_mark(events)
    compare_td(got, td_changes({ pub(nk), pub(pk) }))
    assert.equal(16, #got)
    assert_row({ id = -2, data = 3 }, got[5].new, "key negated")
    assert_row({ id = 2, data = 3 }, got[5].old, "key negated: old")
    assert_row({ id = -2, data = 3, new_column = null }, got[7].new, "after ADD COLUMN")
    assert_row({ id = 2, data = 3, new_column = null }, got[7].old, "after ADD COLUMN: old")
    assert_row({ id = 2, data = 3, new_column = "someval" }, got[8].new, "key and new column changed")
    assert_row({ id = -2, data = 3, new_column = null }, got[8].old, "key and new column changed: old")
    assert_row({ id = 2, data = 3, new_column = "someval" }, got[9].old, "delete without key: old")
    assert_row({ id = -2, data = 3 }, got[14].new, "pk update: new")
    assert_row({ id = 2, data = 3 }, got[14].old, "pk update: old")
    assert_row({ id = 2, data = 3 }, got[16].old, "pk delete: old")
    replay_check(got, { pk })
  end)

  -- Commit order, not start or write order: two sessions interleaved, and prepared.sql's
  -- prepared transactions (one with DDL) committed after later transactions.
  it("commit order across interleaved sessions and prepared transactions with DDL", function()
    local p1 = H.table("id int")
    local p2 = H.table("id int")
    local events = session({ p1, p2 })
    td_begin()
    local w2 = assert(flash.client { dsn = H.dsn })
    local gid = "hc90_" .. core.getpid() .. "_"
    local function q(c, sql) assert(c:query(fill(sql, { P1 = p1, P2 = p2, GID = gid }))) end
    local w1 = H.writer()
    q(w1, "BEGIN; INSERT INTO @P1 VALUES (100)")
    q(w2, "BEGIN; INSERT INTO @P2 VALUES (101)")
    q(w1, "INSERT INTO @P1 VALUES (102)")
    q(w2, "INSERT INTO @P2 VALUES (103); COMMIT")
    q(w1, "COMMIT")
    -- each statement alone: COMMIT PREPARED cannot run in a multi-statement query's implicit transaction
    for _, stmt in ipairs {
      "BEGIN", "INSERT INTO @P1 VALUES (1)", "PREPARE TRANSACTION '@GID_1'", "COMMIT PREPARED '@GID_1'",
      "INSERT INTO @P1 VALUES (2)",
      "BEGIN", "INSERT INTO @P1 VALUES (3)", "PREPARE TRANSACTION '@GID_2'", "ROLLBACK PREPARED '@GID_2'",
      "INSERT INTO @P1 VALUES (4)",
      "BEGIN", "INSERT INTO @P1 VALUES (5)", "ALTER TABLE @P1 ADD COLUMN data text",
      "INSERT INTO @P1 VALUES (6, 'frakbar')", "PREPARE TRANSACTION '@GID_3'",
      "INSERT INTO @P2 VALUES (7)",
    } do q(w1, stmt) end
    q(w2, "COMMIT PREPARED '@GID_3'")
    q(w1, "INSERT INTO @P1 VALUES (8); INSERT INTO @P2 VALUES (9)")
    w2:stop()
    local got = until_mark(events)
    compare_td(got, td_changes({ pub(p1), pub(p2) }))
    local ids = {}
    for i, ev in ipairs(got) do ids[i] = ev.new.id end
    assert.same({ 101, 103, 100, 102, 1, 2, 4, 7, 5, 6, 8, 9 }, ids)
    assert_row({ id = 6, data = "frakbar" }, got[10].new, "insert after ADD COLUMN in the prepared transaction")
    assert_row({ id = 8, data = null }, got[11].new, "insert after COMMIT PREPARED")
  end)

  -- INSERT ... ON CONFLICT: updates, nothing, several rows in one statement.
  -- trigger_statement: the statement's update trigger fires before its insert trigger, so
  -- an upsert that inserts row 3 then updates row 1 arrives as update 1, insert 3: its
  -- documented order (docs/drivers.md), which keeps every row's own changes in order.
  it("INSERT ... ON CONFLICT DO UPDATE / DO NOTHING", function()
    local t = H.table("id int PRIMARY KEY, v text, n int DEFAULT 0")
    local events = session({ t })
    td_begin()
    H.sql(fill([[
      INSERT INTO @T VALUES (1, 'a'), (2, 'b');
      INSERT INTO @T VALUES (2, 'B') ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v || @T.v, n = @T.n + 1;
      INSERT INTO @T VALUES (3, 'c'), (1, 'A') ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v || @T.v, n = @T.n + 1;
      INSERT INTO @T VALUES (3, 'x'), (4, 'd') ON CONFLICT DO NOTHING;
      INSERT INTO @T VALUES (4, 'y') ON CONFLICT (id) DO UPDATE SET v = 'z' WHERE @T.v = 'nope';
    ]], { T = t }))
    local got = until_mark(events)
    local td = td_changes({ pub(t) })
    local ops = {}
    for i, ev in ipairs(got) do ops[i] = ev.op .. " " .. ev.new.id .. " " .. ev.new.v end
    local up = 5
    if driver == "trigger_statement" then
      assert.same({ "insert 1 a", "insert 2 b", "update 2 Bb", "update 1 Aa", "insert 3 c", "insert 4 d" }, ops)
      up = 4
    else
      assert.same({ "insert 1 a", "insert 2 b", "update 2 Bb", "insert 3 c", "update 1 Aa", "insert 4 d" }, ops)
      compare_td(got, td)
    end
    assert_row({ id = 1, v = "a", n = 0 }, got[up].old, "upsert: old")
    assert_row({ id = 1, v = "Aa", n = 1 }, got[up].new, "upsert: new")
    replay_check(got, { t })
  end)

  -- replorigin.sql: changes made under a replication origin, and as a replica (what
  -- logical replication's apply and pg_restore do).
  it("changes under a replication origin and with session_replication_role = replica", function()
    local t = H.table("id int PRIMARY KEY, v text")
    local origin = "hc90_origin_" .. core.getpid()
    H.sql("SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = $1", origin)
    H.sql("SELECT pg_replication_origin_create($1)", origin)
    local events = session({ t })
    td_begin()
    H.sql(fill([[
      INSERT INTO @T VALUES (1, 'local');
      SELECT pg_replication_origin_session_setup('@O');
      BEGIN;
      SELECT pg_replication_origin_xact_setup('0/aabbccdd', '2013-01-01 00:00');
      INSERT INTO @T VALUES (2, 'from origin');
      UPDATE @T SET v = 'origin update' WHERE id = 1;
      COMMIT;
      SELECT pg_replication_origin_session_reset();
      SET session_replication_role = replica;
      INSERT INTO @T VALUES (3, 'as replica');
      DELETE FROM @T WHERE id = 2;
      RESET session_replication_role;
    ]], { T = t, O = origin }))
    local got = until_mark(events)
    compare_td(got, td_changes({ pub(t) }))
    local ops = {}
    for i, ev in ipairs(got) do ops[i] = ev.op .. " " .. (ev.new or ev.old).id .. " " .. (ev.new or ev.old).v end
    assert.same({ "insert 1 local", "insert 2 from origin", "update 1 origin update", "insert 3 as replica",
      "delete 2 from origin" }, ops)
    replay_check(got, { t })
    H.sql("SELECT pg_replication_origin_drop($1)", origin)
  end)

  -- concurrent_ddl_dml (isolation specs): ALTER TABLE in one session's open transaction
  -- while another writes; a rolled-back ALTER leaves no trace in the row shapes.
  it("DDL in a concurrent open transaction, a rolled-back ADD COLUMN, a retype", function()
    local t1 = H.table("id int, data text")
    local t2 = H.table("id int, data text")
    local events = session({ t1, t2 })
    td_begin()
    local w1, w2 = H.writer(), assert(flash.client { dsn = H.dsn })
    local function q(c, sql) assert(c:query(fill(sql, { T1 = t1, T2 = t2 }))) end
    q(w1, "BEGIN; INSERT INTO @T1 VALUES (1, 'a')")
    q(w2, "BEGIN; ALTER TABLE @T2 ADD COLUMN c text; INSERT INTO @T2 VALUES (1, 'x', 'c1')")
    q(w1, "INSERT INTO @T1 VALUES (2, 'b'); COMMIT")
    q(w2, "ALTER TABLE @T2 DROP COLUMN data; INSERT INTO @T2 (id, c) VALUES (2, 'c2'); COMMIT")
    q(w1, "INSERT INTO @T2 (id, c) VALUES (3, 'c3')")
    q(w2, "BEGIN; ALTER TABLE @T1 ADD COLUMN z int; INSERT INTO @T1 VALUES (3, 'c', 33); ROLLBACK")
    q(w1, "INSERT INTO @T1 VALUES (4, 'd')")
    q(w2, "BEGIN; ALTER TABLE @T1 ALTER COLUMN data TYPE varchar(10); INSERT INTO @T1 VALUES (5, 'e'); COMMIT")
    q(w1, "UPDATE @T1 SET data = data || '!' WHERE id = 1")
    w2:stop()
    local got = until_mark(events)
    compare_td(got, td_changes({ pub(t1), pub(t2) }))
    assert.equal(8, #got)
    assert_row({ id = 1, data = "a" }, got[1].new, "t1 row 1")
    assert_row({ id = 1, data = "x", c = "c1" }, got[3].new, "t2 after ADD COLUMN")
    assert_row({ id = 2, c = "c2" }, got[4].new, "t2 after DROP COLUMN")
    assert_row({ id = 3, c = "c3" }, got[5].new, "t2 from the other session")
    assert_row({ id = 4, data = "d" }, got[6].new, "t1 after a rolled-back ADD COLUMN")
    assert_row({ id = 5, data = "e" }, got[7].new, "t1 after the retype")
    assert_row({ id = 1, data = "a!" }, got[8].new, "update after the retype")
    assert_row({ id = 1, data = "a" }, got[8].old, "update after the retype: old")
  end)

  -- Identifiers that need quoting: test_decoding prints them quoted.
  it("columns named with spaces, quotes, capitals, non-ASCII and keywords", function()
    local t = H.table([["Odd Col" int, "x""q" text, "UPPER" text, "ünï" text, "select" int, id int PRIMARY KEY]])
    local events = session({ t })
    td_begin()
    H.sql(fill([[
      INSERT INTO @T VALUES (1, 'a', 'B', 'ü', 2, 1);
      UPDATE @T SET "x""q" = 'a2', "select" = NULL WHERE id = 1;
      DELETE FROM @T;
    ]], { T = t }))
    local got = until_mark(events)
    compare_td(got, td_changes({ pub(t) }))
    assert_row({ ["Odd Col"] = 1, ['x"q'] = "a", UPPER = "B", ["ünï"] = "ü", select = 2, id = 1 }, got[1].new, "insert")
    assert_row({ ["Odd Col"] = 1, ['x"q'] = "a2", UPPER = "B", ["ünï"] = "ü", select = null, id = 1 }, got[3].old, "delete")
    replay_check(got, { t })
  end)

  -- primary_key (API.md): an update that changes a key column is a delete then an insert;
  -- derived here from test_decoding's updates (old key vs new).
  it("primary_key = { id }: key-changing updates become delete + insert, as derived from test_decoding", function()
    local t = H.table("id int PRIMARY KEY, data int")
    local c = assert(flash.client { driver = driver, replica_identity = "full" })
    client = c
    local events = {}
    assert(c:listen { table = t, primary_key = { "id" } }):on("all", function(ev)
      events[#events + 1] = { op = ev.op, table = ev.table, new = ev.new, old = ev.old }
    end)
    if not mark_table then mark_table = H.table("id int") end
    assert(c:listen { table = mark_table }):on("insert", function(ev)
      events[#events + 1] = { op = ev.op, table = ev.table, new = ev.new }
    end)
    assert(c:start())
    td_begin()
    H.sql(fill([[
      INSERT INTO @T VALUES (1, 10), (2, 20);
      UPDATE @T SET data = 11 WHERE id = 1;
      UPDATE @T SET id = -id;
      UPDATE @T SET id = 5, data = 50 WHERE id = -2;
      UPDATE @T SET id = id WHERE id = 5;
      DELETE FROM @T WHERE id = -1;
    ]], { T = t }))
    local got = until_mark(events)
    local want = {}
    for _, e in ipairs(td_changes({ pub(t) })) do
      if e.op == "update" and e.old and e.old.id ~= e.new.id then
        want[#want + 1] = { op = "delete", table = e.table, old = e.old }
        want[#want + 1] = { op = "insert", table = e.table, new = e.new }
      else
        want[#want + 1] = e
      end
    end
    compare_td(got, want)
    local tr = {}
    for i, ev in ipairs(got) do tr[i] = ev.op .. " " .. (ev.new or ev.old).id end
    -- (UPDATE SET id = -id meets row 2 first: row 1's newer version lies after it in the heap)
    assert.same({ "insert 1", "insert 2", "update 1", "delete 2", "insert -2", "delete 1", "insert -1",
      "delete -2", "insert 5", "update 5", "delete -1" }, tr)
    assert_row({ id = -2, data = 20 }, got[8].old, "delete half: old")
    assert_row({ id = 5, data = 50 }, got[9].new, "insert half: new")
  end)

  -- Writable CTEs: one statement that deletes from one table and inserts into another, row
  -- by row; and TRUNCATE inside transactions, one of them rolled back to a savepoint.
  -- trigger_statement: a statement's rows come per table (each table's statement trigger
  -- writes its transition table at once): its documented order.
  it("a writable CTE moving rows between tables, TRUNCATE in a transaction and under a savepoint", function()
    local a = H.table("id int PRIMARY KEY, v text")
    local b = H.table("id int PRIMARY KEY, v text")
    H.sql(fill("INSERT INTO @A SELECT g, 'v' || g FROM generate_series(1, 3) g", { A = a }))
    local seed = { [a] = H.sql("SELECT * FROM " .. a) }
    local events = session({ a, b })
    td_begin()
    H.sql(fill([[
      WITH moved AS (DELETE FROM @A WHERE id <= 2 RETURNING *) INSERT INTO @B SELECT id, v || '-moved' FROM moved;
      BEGIN;
      TRUNCATE @B;
      INSERT INTO @B VALUES (10, 'after truncate');
      SAVEPOINT s;
      TRUNCATE @A;
      INSERT INTO @A VALUES (20, 'rolled back');
      ROLLBACK TO SAVEPOINT s;
      UPDATE @A SET v = 'kept' WHERE id = 3;
      COMMIT;
    ]], { A = a, B = b }))
    local got = until_mark(events)
    local td = td_changes({ pub(a), pub(b) })
    if driver ~= "trigger_statement" then compare_td(got, td) end
    local tr = {}
    for i, ev in ipairs(got) do
      local row = ev.new or ev.old
      tr[i] = ev.op .. " " .. (ev.table == pub(a) and "a" or "b") .. (row and (" " .. row.id) or "")
    end
    if driver == "trigger_statement" then
      assert.same({ "delete a 1", "delete a 2", "insert b 1", "insert b 2", "truncate b", "insert b 10", "update a 3" }, tr)
    else
      assert.same({ "delete a 1", "insert b 1", "delete a 2", "insert b 2", "truncate b", "insert b 10", "update a 3" }, tr)
    end
    replay_check(got, { a, b }, "id", seed)
  end)

  -- One row updated 1,000 times in a transaction, and values of 8 MB (text and bytea).
  it("1,000 updates of one row in one transaction, then 8 MB text and bytea values", function()
    local t = H.table("id int PRIMARY KEY, n int, tx text, by bytea")
    local events = session({ t })
    H.sql(fill([[
      INSERT INTO @T VALUES (1, 0, NULL, NULL);
      DO $$ BEGIN FOR i IN 1..1000 LOOP UPDATE @T SET n = n + 1 WHERE id = 1; END LOOP; END $$;
      INSERT INTO @T SELECT 2, 0, repeat('abcdefgh', 1048576), decode(repeat('00ff10', 2796202), 'hex');
      UPDATE @T SET n = 1 WHERE id = 2;
    ]], { T = t }))
    local got = until_mark(events, 30)
    assert.equal(1003, #got)
    for i = 2, 1001 do
      if got[i].op ~= "update" or got[i].new.n ~= i - 1 or got[i].old.n ~= i - 2 then
        error(string.format("event %d: %s n=%s old n=%s", i, got[i].op, show(got[i].new.n), show(got[i].old and got[i].old.n)))
      end
    end
    local big_tx, big_by = string.rep("abcdefgh", 1048576), string.rep("\0\255\16", 2796202)
    assert_row({ id = 2, n = 0, tx = big_tx, by = big_by }, got[1002].new, "8 MB insert")
    assert_row({ id = 2, n = 1, tx = big_tx, by = big_by }, got[1003].new, "8 MB update: new")
    assert_row({ id = 2, n = 0, tx = big_tx, by = big_by }, got[1003].old, "8 MB update: old")
  end)

  -- fields + where (API.md's soft-delete rules) applied to test_decoding's changes gives
  -- what a filtered listener must deliver.
  it("fields + where on a mixed workload: what API.md's rules make of test_decoding's changes", function()
    local t = H.table("id int PRIMARY KEY, score int, deleted timestamptz, note text")
    local fields = { "id", "score", "deleted" }
    local c = assert(flash.client { driver = driver, replica_identity = "full" })
    client = c
    local events = {}
    assert(c:listen { table = t, fields = fields, where = { { "score", ">=", 10 }, { "deleted", "is null" } } })
      :on("all", function(ev) events[#events + 1] = { op = ev.op, table = ev.table, new = ev.new, old = ev.old } end)
    if not mark_table then mark_table = H.table("id int") end
    assert(c:listen { table = mark_table }):on("insert", function(ev)
      events[#events + 1] = { op = ev.op, table = ev.table, new = ev.new }
    end)
    assert(c:start())
    td_begin()
    H.sql(fill([[
      INSERT INTO @T VALUES (1, 5, NULL, 'a'), (2, 10, NULL, 'b'), (3, 20, '2020-01-01 00:00:00+00', 'c'), (4, NULL, NULL, 'd');
      UPDATE @T SET note = 'changed only a field nobody listens to' WHERE id = 2;
      UPDATE @T SET score = score + 10;
      BEGIN;
      UPDATE @T SET deleted = '2021-06-01 12:00:00+02' WHERE id = 1;
      SAVEPOINT s;
      UPDATE @T SET deleted = NULL WHERE id = 3;
      ROLLBACK TO s;
      UPDATE @T SET deleted = NULL, score = 9 WHERE id = 3;
      COMMIT;
      UPDATE @T SET id = 22 WHERE id = 2;
      UPDATE @T SET score = 10 WHERE id = 3;
      UPDATE @T SET deleted = NULL WHERE id = 1;
      DELETE FROM @T WHERE score < 25;
      INSERT INTO @T VALUES (5, 50, NULL, 'e');
      TRUNCATE @T;
    ]], { T = t }))
    local got = until_mark(events)
    -- the truth: test_decoding's rows (old rows from the rows it gave before), then the rules
    local rows, want = {}, {}
    local function pass(r) return r.score ~= null and r.score >= 10 and r.deleted == null end
    local function proj(r) return { id = r.id, score = r.score, deleted = r.deleted } end
    for _, e in ipairs(td_changes({ pub(t) })) do
      if e.op == "truncate" then
        rows = {}
        want[#want + 1] = e
      elseif e.op == "insert" then
        rows[e.new.id] = e.new
        if pass(e.new) then want[#want + 1] = { op = "insert", table = e.table, new = proj(e.new) } end
      else
        local old = rows[(e.old or e.new).id]
        rows[old.id] = nil
        if e.op == "delete" then
          if pass(old) then want[#want + 1] = { op = "delete", table = e.table, old = proj(old) } end
        else
          rows[e.new.id] = e.new
          local o, n = pass(old), pass(e.new)
          if o and n then
            if not eqv(proj(old), proj(e.new)) then
              want[#want + 1] = { op = "update", table = e.table, old = proj(old), new = proj(e.new) }
            end
          elseif o then want[#want + 1] = { op = "delete", table = e.table, old = proj(old) }
          elseif n then want[#want + 1] = { op = "insert", table = e.table, new = proj(e.new) } end
        end
      end
    end
    compare_td(got, want)
    for _, ev in ipairs(got) do
      if ev.old then assert_row(ev.old, proj(ev.old), "old carries only the listened fields") end
    end
    local tr = {}
    for i, ev in ipairs(got) do
      local r = ev.new or ev.old
      tr[i] = ev.op .. (r and " " .. r.id or "")
    end
    assert.same({ "insert 2", "insert 1", "update 2", "delete 1", "update 22", "insert 3", "insert 1", "delete 22",
      "delete 3", "delete 1", "insert 5", "truncate" }, tr)
  end)

  -- spill.sql / stream.sql: one transaction big enough to spill to disk in the server.
  it("a 50,000-row transaction with updates and deletes of its own rows", function()
    local t = H.table("id int PRIMARY KEY, data text, n bigint")
    local events = session({ t })
    H.sql(fill([[
      BEGIN;
      INSERT INTO @T SELECT g, 'row-' || g, g::bigint * 1000000007 FROM generate_series(1, 50000) g;
      UPDATE @T SET data = data || '-u' WHERE id % 10 = 0;
      DELETE FROM @T WHERE id % 100 = 1;
      COMMIT;
    ]], { T = t }))
    local got = until_mark(events, 40)
    assert.equal(50000 + 5000 + 500, #got)
    for i = 1, 50000 do
      local ev = got[i]
      if ev.op ~= "insert" or ev.new.id ~= i or ev.new.data ~= "row-" .. i or ev.new.n ~= i * 1000000007 then
        error(string.format("event %d: %s %s", i, ev.op, show(ev.new)))
      end
    end
    for j = 1, 5000 do
      local ev = got[50000 + j]
      if ev.op ~= "update" or ev.new.id ~= j * 10 or ev.new.data ~= "row-" .. j * 10 .. "-u"
        or ev.old.data ~= "row-" .. j * 10 then
        error(string.format("event %d: %s %s", 50000 + j, ev.op, show(ev.new)))
      end
    end
    for j = 1, 500 do
      local ev = got[55000 + j]
      if ev.op ~= "delete" or ev.old.id ~= (j - 1) * 100 + 1 then
        error(string.format("event %d: %s %s", 55000 + j, ev.op, show(ev.old)))
      end
    end
    replay_check(got, { t })
  end)
end)
end

-- API.md: client:query returns "rows with the same type mapping as events". Events decode
-- arrays of any element type (the element type comes from the catalog); a query result
-- decodes only the builtin array types it knows by OID (src/lua/lconn.c push_result_rows ->
-- fl_builtin_elem), so arrays of enums, composites and ranges come back as array literals.
describe("outsider: client:query and events", function()
  it("map arrays of enums, composites and ranges the same way", function()
    local p = "hc90q_" .. core.getpid() .. "_"
    H.sql(("DROP TYPE IF EXISTS %scomp CASCADE; DROP TYPE IF EXISTS %senum CASCADE; " ..
      "CREATE TYPE %scomp AS (a int, b text); CREATE TYPE %senum AS ENUM ('x', 'y')"):format(p, p, p, p))
    local t = H.table(("id int, ea %senum[], ca %scomp[], ra int8range[], na numrange[]"):format(p, p))
    local c, events = H.listen({ table = t }, "insert", { driver = "trigger" })
    local ok, err = pcall(function()
      H.sql("INSERT INTO " .. t .. [[ VALUES (1, '{x,NULL,y}', ARRAY[ROW(1, 'a b'), NULL]::]] .. p ..
        [[comp[], '{"[1,2]",NULL}', '{"(0,1.5]"}')]])
      H.wait(c, events, 1)
      assert.equal(1, #events)
      local want = { id = 1, ea = { "x", null, "y" }, ca = { '(1,"a b")', null }, ra = { "[1,3)", null },
        na = { "(0,1.5]" } }
      assert_row(want, events[1].new, "event")
      assert_row(want, H.sql("SELECT * FROM " .. t)[1], "client:query")
    end)
    c:stop()
    H.sql(("DROP TABLE %s; DROP TYPE %scomp; DROP TYPE %senum"):format(t, p, p))
    if not ok then error(err, 0) end
  end)
end)
