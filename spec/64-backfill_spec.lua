-- spec/64-backfill_spec.lua: listener:backfill (issue 11, item 4): every existing row as an
-- op = "read" event, chunked, interleaved with live changes and consistent with them;
-- resumable after kill -9 under a persistent slot; fields/where; keyless and partitioned
-- tables; the CLI's --backfill (item 5). Every case runs under wal_logical and each trigger
-- driver (a chunk placed by a logical message, or between two polls of the capture table).
local flash = require "flash"
local core = require "flash.core"
local H = require "helpers"

-- Rows of the concurrent-writer spec (FLASH_BACKFILL_ROWS; bench/backfill.lua runs 1,000,000).
local ROWS = tonumber(os.getenv("FLASH_BACKFILL_ROWS") or "") or 200000

-- The drivers that backfill.
local DRIVERS = { "wal_logical", "trigger", "trigger_global", "trigger_statement" }

-- A writer at full speed in a server-side procedure (one transaction per write), until
-- the control row says stop: updates, deletes and re-inserts of random keys, each write
-- stamping the row with the next version of one sequence, so versions only grow per key.
local function start_writer(tbl, nkeys)
  local ctl = tbl .. "_ctl"
  H.sql(string.format([[
    CREATE SEQUENCE %s_ver;
    CREATE TABLE %s (stop boolean, writes bigint DEFAULT 0); INSERT INTO %s VALUES (false);
    CREATE PROCEDURE %s_write() LANGUAGE plpgsql AS $$
    DECLARE k int; r float8; n bigint := 0;
    BEGIN
      LOOP
        r := random(); k := 1 + floor(random() * %d)::int;
        IF r < 0.7 THEN
          UPDATE %s SET ver = nextval('%s_ver'), note = md5(random()::text) WHERE id = k;
        ELSIF r < 0.85 THEN
          DELETE FROM %s WHERE id = k;
        ELSE
          INSERT INTO %s VALUES (k, nextval('%s_ver'), 'again') ON CONFLICT (id) DO UPDATE SET ver = excluded.ver;
        END IF;
        n := n + 1;
        IF n %% 200 = 0 THEN
          UPDATE %s SET writes = n;
          EXIT WHEN (SELECT stop FROM %s);
        END IF;
        COMMIT;
      END LOOP;
      COMMIT;
    END $$]], tbl, ctl, ctl, tbl, nkeys, tbl, tbl, tbl, tbl, tbl, ctl, ctl))
  local f = io.popen("setsid sh -c " .. H.sh_quote(string.format("psql -qX %s -c %s >/dev/null 2>&1 & echo $!",
    H.sh_quote(H.dsn), H.sh_quote("CALL " .. tbl .. "_write()"))))
  local pid = tonumber(f:read("*l"))
  f:close()
  return {
    writes = function() return tonumber(H.scalar("SELECT writes FROM " .. ctl)) end,
    stop = function()
      H.sql("UPDATE " .. ctl .. " SET stop = true")
      assert(H.wait_for(function()
        local r = os.execute("kill -0 " .. pid .. " 2>/dev/null")
        return r ~= 0 and r ~= true
      end, 20))
    end,
  }
end

-- Starts client c, runs it until listener l's backfill is done; returns what "all" got.
local function backfill_all(c, l, chunk)
  local got, done = {}, false
  l:on("all", function(ev) got[#got + 1] = ev end)
  l:backfill { chunk = chunk, on_done = function() done = true end }
  assert(c:start())
  local deadline = core.now() + 30
  while not done and core.now() < deadline do assert(c:poll(0.05)) end
  assert.is_true(done)
  return got
end

-- The read events got (sorted here by id) hold the rows want (a query's, ordered by id),
-- column by column as the client's own decoding shows them (NaN is not equal to itself),
-- ncols columns each.
local function same_rows(want, got, ncols)
  assert.equal(#want, #got)
  table.sort(got, function(x, y) return x.new.id < y.new.id end)
  for i = 1, #want do
    local n = 0
    for k, v in pairs(want[i]) do
      n = n + 1
      assert.equal(flash.json.encode(v), flash.json.encode(got[i].new[k]), "row " .. i .. " column " .. k)
      assert.equal(type(v), type(got[i].new[k]), "row " .. i .. " column " .. k)
    end
    assert.equal(ncols, n)
  end
end

-- Runs client c until every change committed so far has been delivered: under wal_logical
-- to the current WAL position; under a trigger driver until an insert of `sentinel` into
-- table t, written now, arrives (its capture seq follows every earlier write's).
local function catch_up(c, driver, t, sentinel, seen)
  if driver == "wal_logical" then return assert(c:run { until_lsn = "current" }) end
  H.sql("INSERT INTO " .. t .. " (id, ver, note) VALUES ($1, 0, 'sentinel')", sentinel)
  local deadline = core.now() + 60
  while not seen() and core.now() < deadline do assert(c:poll(0.05)) end
  assert.is_true(seen(), "the sentinel did not arrive")
  H.sql("DELETE FROM " .. t .. " WHERE id = $1", sentinel)
end

for _, driver in ipairs(DRIVERS) do
describe("backfill under " .. driver, function()
  local session = H.session()
  local spawn, script, tmp = session.spawn, session.script, session.tmp
  after_each(session.cleanup)
  local wal = driver == "wal_logical"

  it("rebuilds the table exactly while a writer updates and deletes random keys, never going back a version", function()
    local t = H.table("id int PRIMARY KEY, ver bigint NOT NULL, note text")
    H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
    H.sql("INSERT INTO " .. t .. " SELECT g, 0, md5(g::text) FROM generate_series(1, $1) g", ROWS)
    H.sql("ANALYZE " .. t)
    local c = assert(flash.client { driver = driver })
    local l = assert(c:listen { table = t })
    -- state[id] = the row the events say; last[id] = the last version seen, and whether
    -- that was a delete (a read or update of that version after it would be a resurrection).
    local state, last, back, counts = {}, {}, {}, {}
    local function see(id, ver, deleted)
      local p = last[id]
      if p and (ver < p.ver or (ver == p.ver and p.deleted and not deleted)) then
        back[#back + 1] = string.format("key %d: version %d after %s%d", id, ver, p.deleted and "delete of " or "", p.ver)
      end
      last[id] = { ver = ver, deleted = deleted }
    end
    l:on("all", function(ev)
      counts[ev.op] = (counts[ev.op] or 0) + 1
      if ev.op == "delete" then
        see(ev.old.id, ev.old.ver, true)
        state[ev.old.id] = nil
      else
        see(ev.new.id, ev.new.ver, false)
        state[ev.new.id] = ev.new.ver
      end
    end)
    local done = false
    assert.is_true(l:backfill { chunk = 5000, on_done = function() done = true end })
    assert(c:start())
    local w = start_writer(t, ROWS)
    local deadline = core.now() + 120
    while not done and core.now() < deadline do assert(c:poll(0.05)) end
    assert.is_true(done, "backfill did not finish")
    local s = c:stats().backfill
    w.stop()
    catch_up(c, driver, t, -1, function() return state[-1] ~= nil end)
    state[-1] = nil
    local writes = H.scalar("SELECT writes FROM " .. t .. "_ctl")
    local want, n = {}, 0
    for _, r in ipairs(H.sql("SELECT id, ver FROM " .. t)) do want[r.id] = r.ver n = n + 1 end
    local wrong = {}
    for id, ver in pairs(want) do
      if state[id] ~= ver then wrong[#wrong + 1] = string.format("%d: table %d, events %s", id, ver, tostring(state[id])) end
    end
    for id, ver in pairs(state) do
      if want[id] == nil then wrong[#wrong + 1] = string.format("%d: not in table, events %d", id, ver) end
    end
    print(string.format("\n  %s: backfill of %d rows under a writer: %d writes meanwhile; events: %d read, %d update, " ..
      "%d delete, %d insert; %.0f rows/s", driver, ROWS, writes, counts.read or 0, counts.update or 0, counts.delete or 0,
      counts.insert or 0, s.rate))
    -- Stopped before the assertions: a trigger driver's schema would otherwise stay, and
    -- later specs of this process would count it as left over.
    c:stop()
    assert.same({}, { unpack(wrong, 1, 5) })
    assert.same({}, { unpack(back, 1, 5) })
    assert.is_true(writes > 0)
    assert.is_true(s.done and s.rows >= ROWS * 0.8 and s.estimated == ROWS, require("flash.json").encode(s))
    -- Rows read are at most the rows that existed (deleted ones are not read).
    assert.is_true(counts.read <= ROWS * 1.2)
  end)

  -- A script that backfills under a persistent slot, writing each read's id to a file.
  local KILLED = [[
    local flash = require "flash"
    local out = assert(io.open(arg[1], "a"))
    out:setvbuf("no")
    local c = assert(flash.client { driver = arg[5], persistent = true, slot = arg[3], publication = arg[3],
                                    schema = arg[5] ~= "wal_logical" and arg[3] or nil })
    local l = assert(c:listen { table = arg[2] })
    -- arg[4]: kill -9 itself at that many reads (in the middle of a chunk).
    local n, kill_at = 0, tonumber(arg[4])
    l:on("read", function(ev)
      out:write(ev.new.id, "\n")
      n = n + 1
      if n == kill_at then os.execute("kill -9 " .. require("flash.core").getpid()) end
    end)
    l:on({ "insert", "update", "delete" }, function() end)
    l:backfill { chunk = 1000, on_done = function() out:write("done\n") flash.stop() end }
  ]]

  it("continues after kill -9 from the last finished chunk, without reading finished chunks again", function()
    local t = H.table("id int PRIMARY KEY, v text")
    H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
    H.sql("INSERT INTO " .. t .. " SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
    local slot = "bf_kill_" .. core.getpid()
    local out = tmp()
    local s = script(KILLED)
    -- Killed at 42.5%, half way through the 9th chunk.
    local h = spawn({ "-l", "info", s, out, t, slot, "8500", driver })
    assert.equal(137, h.wait(30), h.err())
    local first = H.lines(out)
    assert.equal(8500, #first)
    os.remove(out)
    local h2 = spawn({ "-l", "info", s, out, t, slot, "", driver })
    assert.equal(0, h2.wait(60), h2.err())
    assert.truthy(h2.err():find("resuming after %d+ rows"), h2.err())
    local second = H.lines(out)
    assert.equal("done", table.remove(second))
    local seen, again = {}, 0
    for _, id in ipairs(first) do seen[tonumber(id)] = true end
    for _, id in ipairs(second) do
      id = tonumber(id)
      if seen[id] then again = again + 1 end
      seen[id] = true
    end
    local all = 0
    for i = 1, 20000 do if seen[i] then all = all + 1 end end
    print(string.format("\n  kill -9 after %d reads; the restart read %d rows, %d of them read before the kill",
      #first, #second, again))
    assert.equal(20000, all)
    -- Only the chunk in progress at the kill is read again: its 500 rows read before it.
    assert.equal(500, again)
    assert.equal(20000 - 8000, #second)
    -- A run after the end finds the backfill finished: nothing is read again, and
    -- on_done is called (a script waiting for it would otherwise wait forever).
    os.remove(out)
    local h3 = spawn({ "-l", "info", s, out, t, slot, "", driver })
    assert.equal(0, h3.wait(20), h3.err())
    assert.truthy(h3.err():find("finished in an earlier run", 1, true), h3.err())
    assert.same({ "done" }, H.lines(out))
    if wal then
      H.drop_slot(slot)
      H.sql("DELETE FROM flashlua.backfill WHERE slot = $1", slot)
    else
      H.sql("DROP SCHEMA " .. slot .. " CASCADE")
      H.sql("DELETE FROM flashlua.backfill WHERE slot = $1", "schema:" .. slot)
    end
  end)

  it("keeps the progress of two listeners of one table apart: each resumes where it was after kill -9", function()
    local t = H.table("id int PRIMARY KEY, v text")
    H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
    H.sql("INSERT INTO " .. t .. " SELECT g, 'v' || g FROM generate_series(1, 2000) g")
    local slot = "bf_two_" .. core.getpid()
    local out = tmp()
    -- Listener a reads in chunks of 100, b in one chunk; the first run is killed at a's
    -- first read after b finished (b's progress saved, a's at 100 or so rows).
    local s = script([[
      local flash = require "flash"
      local out = assert(io.open(arg[1], "a"))
      out:setvbuf("no")
      local c = assert(flash.client { driver = arg[4], persistent = true, slot = arg[3], publication = arg[3],
                                      schema = arg[4] ~= "wal_logical" and arg[3] or nil })
      local a = assert(c:listen { table = arg[2], fields = { "id" } })
      local b = assert(c:listen { table = arg[2] })
      local b_done = false
      a:on("read", function(ev)
        if b_done and arg[5] == "kill" then os.execute("kill -9 " .. require("flash.core").getpid()) end
        out:write("a ", ev.new.id, "\n")
      end)
      b:on("read", function(ev) out:write("b ", ev.new.id, "\n") end)
      a:backfill { chunk = 100, on_done = function() out:write("a done\n") flash.stop() end }
      b:backfill { chunk = 5000, on_done = function() b_done = true end }
    ]])
    local h = spawn({ "-l", "info", s, out, t, slot, driver, "kill" })
    assert.equal(137, h.wait(30), h.err())
    local first = { a = 0, b = 0 }
    for _, line in ipairs(H.lines(out)) do
      local who = line:match("^(%a) %d+$")
      first[who] = first[who] + 1
    end
    local h2 = spawn({ "-l", "info", s, out, t, slot, driver })
    assert.equal(0, h2.wait(30), h2.err())
    local seen, again = { a = {}, b = {} }, { a = 0, b = 0 }
    local lines = H.lines(out)
    assert.equal("a done", table.remove(lines))
    for i, line in ipairs(lines) do
      local who, id = line:match("^(%a) (%d+)$")
      seen[who][tonumber(id)] = true
      if i > first.a + first.b then again[who] = again[who] + 1 end
    end
    for _, who in ipairs({ "a", "b" }) do
      local n = 0
      for i = 1, 2000 do if seen[who][i] then n = n + 1 end end
      assert.equal(2000, n, who .. " saw " .. n .. " of 2000 rows")
    end
    -- b finished in the first run: it reads nothing again; a goes on from its own chunk.
    assert.equal(2000, first.b)
    assert.equal(0, again.b)
    assert.is_true(first.a < 2000)
    assert.equal(2000 - math.floor(first.a / 100) * 100, again.a)
    assert.truthy(h2.err():find("resuming after " .. math.floor(first.a / 100) * 100 .. " rows", 1, true), h2.err())
    if wal then
      H.drop_slot(slot)
      H.sql("DELETE FROM flashlua.backfill WHERE slot = $1", slot)
    else
      H.sql("DROP SCHEMA " .. slot .. " CASCADE")
      H.sql("DELETE FROM flashlua.backfill WHERE slot = $1", "schema:" .. slot)
    end
  end)

  it("with ack = manual saves the end only once every read is acknowledged, rows a multiple of chunk too", function()
    -- 300 rows in chunks of 100: the fourth chunk reads none, which ends the backfill.
    local t = H.table("id int PRIMARY KEY, v text")
    H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
    H.sql("INSERT INTO " .. t .. " SELECT g, 'v' || g FROM generate_series(1, 300) g")
    local name = "bf_end_" .. core.getpid()
    local key = wal and name or "schema:" .. name
    local c = assert(flash.client { driver = driver, persistent = true, slot = wal and name or nil,
                                    schema = not wal and name or nil, ack = "manual" })
    local l = assert(c:listen { table = t })
    local held, done = {}, false
    l:on("all", function(ev) held[#held + 1] = ev end)
    l:backfill { chunk = 100, on_done = function() done = true end }
    assert(c:start())
    local deadline = core.now() + 20
    while not done and core.now() < deadline do assert(c:poll(0.05)) end
    assert.is_true(done)
    assert.equal(300, #held)
    local function saved()
      for _ = 1, 10 do assert(c:poll(0.02)) end
      local r = H.sql("SELECT rows_done, done FROM flashlua.backfill WHERE slot = $1", key)[1]
      return { r.rows_done, r.done }
    end
    -- Nothing acknowledged: a crash now must read every row again, not find it finished.
    assert.same({ 0, false }, saved())
    for i = 1, 200 do held[i]:ack() end
    assert.same({ 200, false }, saved())
    for i = 201, 300 do held[i]:ack() end
    assert.same({ 300, true }, saved())
    c:stop()
    if wal then H.drop_slot(name) else H.sql("DROP SCHEMA " .. name .. " CASCADE") end
    H.sql("DELETE FROM flashlua.backfill WHERE slot = $1", key)
  end)

  it("with ack = manual reads unacknowledged chunks again after a reconnect, as new events to acknowledge", function()
    local t = H.table("id int PRIMARY KEY, v text")
    H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
    H.sql("INSERT INTO " .. t .. " SELECT g, 'v' || g FROM generate_series(1, 250) g")
    local name = "bf_recon_" .. core.getpid()
    local key = wal and name or "schema:" .. name
    local c = assert(flash.client { driver = driver, persistent = true, slot = wal and name or nil,
                                    schema = not wal and name or nil, ack = "manual" })
    local l = assert(c:listen { table = t })
    local held, done = {}, false
    l:on("all", function(ev) held[#held + 1] = ev end)
    l:backfill { chunk = 100, on_done = function() done = true end }
    assert(c:start())
    local deadline = core.now() + 20
    while not done and core.now() < deadline do assert(c:poll(0.05)) end
    assert.equal(250, #held)
    -- The first chunk acknowledged; the stream is then lost with two chunks outstanding.
    for i = 1, 100 do assert.is_true(held[i]:ack()) end
    for _ = 1, 5 do assert(c:poll(0.02)) end
    if wal then
      H.sql("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1", name)
    else
      -- Every connection of the client (query, keeper, chunk reader): all but this one.
      H.sql([[SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()
        AND backend_type = 'client backend' AND datname = current_database()]])
    end
    deadline = core.now() + 20
    while #held < 400 and core.now() < deadline do c:poll(0.05) end
    assert.equal(400, #held)
    for i = 101, 250 do assert.is_false(held[i]:ack()) end
    local again = {}
    for i = 251, 400 do
      assert.equal("read", held[i].op)
      again[#again + 1] = held[i].new.id
      assert.is_true(held[i]:ack())
    end
    for i = 1, #again do assert.equal(100 + i, again[i]) end
    for _ = 1, 10 do assert(c:poll(0.02)) end
    local r = H.sql("SELECT rows_done, done FROM flashlua.backfill WHERE slot = $1", key)[1]
    assert.same({ 250, true }, { r.rows_done, r.done })
    c:stop()
    if wal then H.drop_slot(name) else H.sql("DROP SCHEMA " .. name .. " CASCADE") end
    H.sql("DELETE FROM flashlua.backfill WHERE slot = $1", key)
  end)

  if not wal then
    it("with ack = manual saves a chunk's progress only once its reads are acknowledged", function()
      local t = H.table("id int PRIMARY KEY, v text")
      H.sql("INSERT INTO " .. t .. " SELECT g, 'v' || g FROM generate_series(1, 250) g")
      local schema = "bf_ack_" .. core.getpid()
      local key = "schema:" .. schema
      local c = assert(flash.client { driver = driver, persistent = true, schema = schema, ack = "manual" })
      local l = assert(c:listen { table = t })
      local held, done = {}, false
      l:on("all", function(ev) held[#held + 1] = ev end)
      l:backfill { chunk = 100, on_done = function() done = true end }
      assert(c:start())
      local deadline = core.now() + 20
      while not done and core.now() < deadline do assert(c:poll(0.05)) end
      assert.is_true(done)
      assert.equal(250, #held)
      local function saved()
        local r = H.sql("SELECT rows_done, done FROM flashlua.backfill WHERE slot = $1", key)[1]
        return r.rows_done, r.done
      end
      assert.same({ 0, false }, { saved() })
      -- The first chunk's reads acknowledged, out of order: its progress is kept, no more.
      for i = 100, 2, -1 do held[i]:ack() end
      assert(c:poll(0.01))
      assert.same({ 0, false }, { saved() })
      held[1]:ack()
      assert(c:poll(0.01))
      assert.same({ 100, false }, { saved() })
      for i = 101, 250 do held[i]:ack() end
      assert(c:poll(0.01))
      assert.same({ 250, true }, { saved() })
      c:stop()
      H.sql("DROP SCHEMA " .. schema .. " CASCADE")
      H.sql("DELETE FROM flashlua.backfill WHERE slot = $1", key)
    end)
  end

  it("delivers each value as a query returns it: escapes, NULLs, bytea, arrays, json", function()
    local t = H.table("id int PRIMARY KEY, s text, b bytea, a text[], j jsonb, n numeric, ts timestamptz, f float8")
    H.sql("INSERT INTO " .. t .. [[ VALUES
      (1, E'tab\there\nnew line \\ back\\slash', '\x00ff5c09', '{"a b","c,d",NULL}', '{"k": [1, "\\t"]}',
       12345678901234567890.5, '2026-01-02 03:04:05.123456+00', 1e300),
      (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
      (3, E'\\N', '\x', '{}', '[]', -0.5, 'infinity', 'NaN'),
      (4, '', E'\\x5c4e'::bytea, '{"\\\\N"}', '"\\N"', 0, '-infinity', '-Infinity')]])
    local c = assert(flash.client { driver = driver, replica_identity = "full" })
    local got = backfill_all(c, assert(c:listen { table = t }), 2)
    local want = H.sql("SELECT * FROM " .. t .. " ORDER BY id")
    same_rows(want, got, 8)
    assert.equal("tab\there\nnew line \\ back\\slash", got[1].new.s)
    assert.equal("\0\255\\\t", got[1].new.b)
    assert.equal("\\N", got[3].new.s)
    assert.equal(flash.null, got[2].new.s)
    c:stop()
  end)

  -- Columns of scalar types only: the rows are built by the FFI reader (flash.backfill's
  -- fast_reader), which must give what the C decoder gives a query, value for value.
  for _, numeric in ipairs { "string", "number" } do
    it("delivers scalar values as a query returns them (numeric = " .. numeric .. ")", function()
      local t = H.table("id int PRIMARY KEY, i2 int2, i8 int8, o oid, f4 float4, f8 float8, n numeric, b bool, " ..
        "s text, v varchar(20), ts timestamptz, d date, c \"char\"")
      H.sql("INSERT INTO " .. t .. [[ VALUES
        (1, -32768, 9007199254740993, 4294967295, 1.5, 1e300, 12345678901234567890.5, true,
         E'tab\there\nnew line \\ back\\slash', 'v', '2026-01-02 03:04:05.123456+00', '2026-01-02', 'x'),
        (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
        (3, 0, -9007199254740992, 0, 'NaN', 'Infinity', -0.5, false, E'\\N', '', 'infinity', 'infinity', ''),
        (4, 7, 42, 1, '-Infinity', '-0', 1e-30, true, 'N', E'\\', '-infinity', '-infinity', 'N'),
        (5, 1, 2, 3, 4, 5, (10::numeric ^ 600) + 0.5, false, repeat('z', 3000), 'é', '1999-12-31 23:59:59+00', '1999-12-31', 'é')]])
      local c = assert(flash.client { driver = driver, replica_identity = "full", numeric = numeric })
      local l = assert(c:listen { table = t })
      local got = backfill_all(c, l, 2)
      assert.is_function(l.bf.read_row)
      local want = c:query("SELECT * FROM " .. t .. " ORDER BY id")
      same_rows(want, got, 13)
      assert.equal("tab\there\nnew line \\ back\\slash", got[1].new.s)
      assert.equal("9007199254740993", got[1].new.i8)
      assert.equal(-9007199254740992, got[3].new.i8)
      assert.is_true(got[1].new.b)
      assert.is_false(got[3].new.b)
      assert.equal("\\N", got[3].new.s)
      assert.equal("N", got[4].new.s)
      assert.equal(flash.null, got[2].new.s)
      assert.equal(flash.null, got[2].new.b)
      assert.equal(3000, #got[5].new.s)
      if numeric == "number" then
        assert.equal(-0.5, got[3].new.n)
        assert.equal(want[5].n, got[5].new.n)   -- past 512 digits (lines:row decodes that row)
      else
        assert.equal("-0.5", got[3].new.n)
      end
      c:stop()
    end)
  end

  it("delivers only the listened fields of each row, with fields and no where", function()
    local t = H.table("id int PRIMARY KEY, a int, b text, c text, d numeric")
    H.sql("INSERT INTO " .. t .. " SELECT g, g % 7, 'b' || g, NULL, g / 3.0 FROM generate_series(1, 500) g")
    local c = assert(flash.client { driver = driver, replica_identity = "full" })
    local l = assert(c:listen { table = t, fields = { "id", "c", "d" } })
    local got = backfill_all(c, l, 100)
    assert.is_function(l.bf.read_fields)
    local want = c:query("SELECT id, c, d FROM " .. t .. " ORDER BY id")
    same_rows(want, got, 3)
    for _, ev in ipairs(got) do
      assert.equal("read", ev.op)
      assert.equal("public." .. t, ev.table)
      assert.equal("public." .. t, ev.source)
      assert.equal(flash.null, ev.new.c)
      assert.is_nil(ev.new.a)
      assert.is_nil(ev.old)
      if driver == "wal_logical" then assert.is_string(ev.id) assert.is_string(ev.lsn) end
    end
    c:stop()
    -- A condition on a column fields leave out: read too, tested, left out of the rows.
    c = assert(flash.client { driver = driver, replica_identity = "full" })
    l = assert(c:listen { table = t, fields = { "d", "id" }, where = { a = 3 } })
    got = backfill_all(c, l, 100)
    same_rows(c:query("SELECT id, d FROM " .. t .. " WHERE a = 3 ORDER BY id"), got, 2)
    c:stop()
  end)

  it("reads a table without a primary key by ctid, with where and fields", function()
    local t = H.table("a int, b text, c int")
    H.sql("INSERT INTO " .. t .. " SELECT g, 'b' || g, g % 10 FROM generate_series(1, 3000) g")
    local c = assert(flash.client { driver = driver, replica_identity = "full" })
    local l = assert(c:listen { table = t, fields = { "a", "b" }, where = { { "c", ">=", 7 } } })
    local got = backfill_all(c, l, 100)
    assert.equal(900, #got)
    local ids = {}
    for _, ev in ipairs(got) do
      assert.equal("read", ev.op)
      assert.equal("public." .. t, ev.table)
      assert.same({ a = ev.new.a, b = "b" .. ev.new.a }, ev.new)
      assert.is_true(ev.new.a % 10 >= 7)
      assert.is_nil(ids[ev.new.a])
      ids[ev.new.a] = true
    end
    assert.equal("ctid", c:stats().backfill.tables[1].mode)
    -- Ids sort as strings in delivery order (wal_logical; trigger events have none).
    if wal then
      for i = 2, #got do assert.is_true(got[i - 1].id < got[i].id) end
    else
      assert.is_nil(got[1].id)
    end
    c:stop()
  end)

  it("reads every partition of a partitioned table, keyed or not, with ev.source the partition", function()
    for _, keyed in ipairs({ true, false }) do
      local t = H.table("id int NOT NULL, region text NOT NULL, v int" .. (keyed and ", PRIMARY KEY (id, region)" or ""),
        nil)
      H.sql("DROP TABLE " .. t)
      H.sql(string.format("CREATE TABLE %s (id int NOT NULL, region text NOT NULL, v int%s) PARTITION BY LIST (region)",
        t, keyed and ", PRIMARY KEY (id, region)" or ""))
      for _, r in ipairs({ "eu", "us", "asia" }) do
        H.sql(string.format("CREATE TABLE %s_%s PARTITION OF %s FOR VALUES IN ('%s')", t, r, t, r))
      end
      H.sql("INSERT INTO " .. t .. " SELECT g, (ARRAY['eu','us','asia'])[1 + g % 3], g FROM generate_series(1, 1500) g")
      local c = assert(flash.client { driver = driver, replica_identity = "full" })
      local got = backfill_all(c, assert(c:listen { table = t }), 200)
      assert.equal(1500, #got)
      local by = {}
      for _, ev in ipairs(got) do
        assert.equal("read", ev.op)
        assert.equal("public." .. t, ev.table)
        assert.equal("public." .. t .. "_" .. ev.new.region, ev.source)
        by[ev.new.id] = true
      end
      for i = 1, 1500 do assert.is_true(by[i]) end
      assert.equal(keyed and "key" or "ctid", c:stats().backfill.tables[1].mode)
      c:stop()
    end
  end)

  it("reads every row of an INHERITS parent whose primary key the children repeat", function()
    -- The parent's primary key is not its children's: a child may hold a key the parent
    -- (or another child) holds too, so the key does not order the rows uniquely.
    local t = H.table("id int PRIMARY KEY, v text")
    H.sql(string.format("CREATE TABLE %s_c (extra text) INHERITS (%s); CREATE TABLE %s_d () INHERITS (%s); " ..
      "INSERT INTO %s SELECT g, 'p' || g FROM generate_series(1, 5) g; " ..
      "INSERT INTO %s_c VALUES (3, 'c3', 'x'), (6, 'c6', 'y'); INSERT INTO %s_d VALUES (3, 'd3'), (5, 'd5')",
      t, t, t, t, t, t, t))
    local c = assert(flash.client { driver = driver, replica_identity = "full" })
    local got = backfill_all(c, assert(c:listen { table = t }), 3)
    local seen = {}
    for _, ev in ipairs(got) do seen[#seen + 1] = ev.source .. ":" .. ev.new.v end
    table.sort(seen)
    local want = {}
    for _, r in ipairs(H.sql("SELECT tableoid::regclass::text AS src, v FROM " .. t)) do
      want[#want + 1] = "public." .. r.src .. ":" .. r.v
    end
    table.sort(want)
    assert.same(want, seen)
    assert.equal(9, #seen)
    c:stop()
    H.sql("DROP TABLE " .. t .. " CASCADE")
  end)

  it("refuses a table the role may not read with an error that names the GRANT, partitions read by ctid too", function()
    -- A role that owns its tables (so it may publish them and put triggers on them) but
    -- may not SELECT from them: the server's error says only "permission denied".
    local role = "flash_bf_noread"
    H.sql(string.format([[DO $$ BEGIN
      IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '%s') THEN CREATE ROLE %s LOGIN REPLICATION; END IF;
      END $$; GRANT CREATE ON DATABASE postgres TO %s]], role, role, role))
    local dsn = (H.dsn:gsub("user=%S+", "")) .. " user=" .. role
    local function run(t, rel, why)
      local args = { "-d", dsn, "--driver", driver, "--table", t, "--backfill" }
      local rc, _, err = H.run_flashlua(args, 30)
      assert.equal(1, rc, err)
      assert.truthy(err:find(string.format("flashlua: backfill of public.%s failed: cannot read %s%s: the role %s " ..
        "has no SELECT privilege on it (run `GRANT SELECT ON %s TO \"%s\"` as its owner)", t, rel, why, role, rel, role),
        1, true), err)
    end
    local t = H.table("id int PRIMARY KEY, v text")
    H.sql(string.format("ALTER TABLE %s REPLICA IDENTITY FULL; INSERT INTO %s VALUES (1, 'a'); " ..
      "ALTER TABLE %s OWNER TO %s; REVOKE SELECT ON %s FROM %s", t, t, t, role, t, role))
    run(t, string.format('"public"."%s"', t), "")
    -- A partitioned table without a key: the parent's privilege is not the partition's.
    local p = H.table("id int, region text")
    H.sql("DROP TABLE " .. p)
    H.sql(string.format("CREATE TABLE %s (id int, region text) PARTITION BY LIST (region); " ..
      "CREATE TABLE %s_eu PARTITION OF %s FOR VALUES IN ('eu'); INSERT INTO %s VALUES (1, 'eu'); " ..
      "ALTER TABLE %s REPLICA IDENTITY FULL; ALTER TABLE %s_eu REPLICA IDENTITY FULL; " ..
      "ALTER TABLE %s OWNER TO %s; ALTER TABLE %s_eu OWNER TO %s; REVOKE SELECT ON %s_eu FROM %s",
      p, p, p, p, p, p, p, role, p, role, p, role))
    run(p, string.format('"public"."%s_eu"', p),
      string.format(" (it holds rows of public.%s and, with no primary key, is read by itself)", p))
    H.sql(string.format("DROP TABLE %s, %s", t, p))
  end)

  it("as a role that cannot use another role's flashlua.backfill: an error that says so, not 'permission denied'", function()
    -- flashlua.backfill made by the superuser (a persistent backfill of its own).
    local name = "bf_other_" .. core.getpid()
    local mine = H.table("id int PRIMARY KEY")
    local c = assert(flash.client { driver = driver, persistent = true, slot = wal and name or nil,
                                    schema = not wal and name or nil, replica_identity = "full" })
    backfill_all(c, assert(c:listen { table = mine }), 10)
    c:stop()
    if wal then H.drop_slot(name) else H.sql("DROP SCHEMA " .. name .. " CASCADE") end
    -- A role that owns and may read its table, without USAGE on schema flashlua.
    local role = "flash_bf_other"
    H.sql(string.format([[DO $$ BEGIN
      IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '%s') THEN CREATE ROLE %s LOGIN REPLICATION; END IF;
      END $$; GRANT CREATE ON DATABASE postgres TO %s]], role, role, role))
    local t = H.table("id int PRIMARY KEY, v text")
    H.sql(string.format("ALTER TABLE %s REPLICA IDENTITY FULL; INSERT INTO %s VALUES (1, 'a'); ALTER TABLE %s OWNER TO %s",
      t, t, t, role))
    local s = script(string.format([[
      local flash = require "flash"
      local c = assert(flash.client { driver = %q, persistent = true, slot = %q, publication = %q, schema = %q })
      local l = assert(c:listen { table = %q })
      l:on("read", function() end)
      l:backfill { on_done = function() flash.stop() end }
    ]], driver, name .. "_r", name .. "_r", name .. "_r", t))
    local rc, _, err = H.run_flashlua({ "-d", (H.dsn:gsub("user=%S+", "")) .. " user=" .. role, s }, 30)
    if wal then pcall(H.drop_slot, name .. "_r", name .. "_r") else H.sql("DROP SCHEMA IF EXISTS " .. name .. "_r CASCADE") end
    assert.equal(1, rc, err)
    assert.truthy(err:find("backfill of public." .. t .. " failed: flashlua.backfill exists but is owned by another " ..
      "role (postgres): backfill progress cannot be kept there (drop it, or run flashlua as its owner)", 1, true), err)
    H.sql(string.format("DROP TABLE %s, %s", t, mine))
  end)

  -- A statement_timeout of the role or database shorter than a chunk's read: loud, and it
  -- said nothing of what to change. The table is locked by the script's own second
  -- connection, so the chunk's read waits out the timeout whatever the machine's speed.
  it("a chunk read past the role's statement_timeout fails naming the chunk option", function()
    local t = H.table("id int PRIMARY KEY, v text")
    H.sql(string.format("ALTER TABLE %s REPLICA IDENTITY FULL; INSERT INTO %s SELECT g, 'x' FROM generate_series(1, 50) g",
      t, t))
    local s = script(string.format([[
      local flash = require "flash"
      local c = assert(flash.client { driver = %q })
      local l = assert(c:listen { table = %q })
      l:on("read", function() end)
      assert(c:start())
      local other = assert(flash.connect(c:dsn()))
      assert(other:query("BEGIN"))
      assert(other:query("LOCK TABLE %s IN ACCESS EXCLUSIVE MODE"))
      l:backfill { chunk = 20 }
      local ok, err = flash.run()
      io.stderr:write("RESULT ", tostring(ok), " ", tostring(err), "\n")
    ]], driver, t, t))
    local rc, _, err = H.run_flashlua({ "-d", H.dsn .. " options='-c statement_timeout=1500'", s }, 40)
    assert.equal(0, rc, err)
    assert.truthy(err:find("RESULT nil backfill of public." .. t .. " failed: [^\n]*canceling statement due to " ..
      "statement timeout"), err)
    assert.truthy(err:find("(a chunk of 20 rows took longer than the statement_timeout set for role postgres or the " ..
      "database: give the backfill a smaller chunk, e.g. listener:backfill{ chunk = 2 }, or raise the timeout for " ..
      "this role)", 1, true), err)
  end)

  it("flashlua --table T --backfill writes the existing rows, then follows changes, as JSON lines", function()
    local t = H.table("id int PRIMARY KEY, v text")
    H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
    H.sql("INSERT INTO " .. t .. " VALUES (1, 'one'), (2, 'two')")
    local h = spawn(wal and { "--table", t, "--backfill" } or { "--driver", driver, "--table", t, "--backfill" })
    assert.is_true(h.await('"v":"two"', 20), h.err())
    H.sql("INSERT INTO " .. t .. " VALUES (3, 'three')")
    assert.is_true(h.await('"v":"three"', 20), h.err())
    h.kill("TERM")
    assert.equal(0, h.wait(10))
    local evs = {}
    for line in h.out():gmatch("[^\n]+") do evs[#evs + 1] = flash.json.decode(line) end
    assert.equal(3, #evs)
    assert.same({ "read", "read", "insert" }, { evs[1].op, evs[2].op, evs[3].op })
    assert.same({ 1, 2, 3 }, { evs[1].new.id, evs[2].new.id, evs[3].new.id })
  end)
end)
end

describe("backfill", function()
  it("is refused under pg_extension, with the reason", function()
    local t = H.table("id int PRIMARY KEY")
    local c = assert(flash.client { driver = "pg_extension" })
    local l = assert(c:listen { table = t })
    local ok, err = pcall(l.backfill, l, {})
    assert.is_false(ok)
    assert.truthy(tostring(err):find("backfill needs the wal_logical driver or a trigger driver (this client uses " ..
      "pg_extension", 1, true), err)
    c:stop()
  end)

  -- LuaJIT 2.1 from 2021-09 to 2022-09 (Debian 12's among them) could run a compiled
  -- pairs() loop (BC_ITERN) reached by a side trace without its first step: a read's row
  -- looked empty, or had a stale key, to a callback that iterated it. flash.jitfix turns
  -- such loops into generic ones (BC_ITERC) the first time they run.
  it("keeps a callback's pairs() loop off the JIT's compiled traversal on a LuaJIT that has the bug", function()
    local vmdef, jutil = require "jit.vmdef", require "jit.util"
    local function ops(fn)
      local list, pc = {}, 1
      while jutil.funcbc(fn, pc) do
        local op = jutil.funcbc(fn, pc) % 256
        list[#list + 1] = vmdef.bcnames:sub(op * 6 + 1, op * 6 + 6):gsub(" ", "")
        pc = pc + 1
      end
      return table.concat(list, " ")
    end
    local function columns(ev)
      local n = 0
      for _ in pairs(ev.new) do n = n + 1 end
      return n
    end
    assert.truthy(ops(columns):find("ITERN", 1, true))
    assert.equal(2, columns { new = { id = 1, a = "x" } })
    local affected = jit.version == "LuaJIT 2.1.0-beta3"
    assert.equal(affected, require("flash.jitfix").applied)
    assert.equal(affected, ops(columns):find("ITERC", 1, true) ~= nil, ops(columns))
    -- The same entries, the same errors.
    local t = { 10, 20, x = 1, y = false }
    local seen = {}
    for k, v in pairs(t) do seen[k] = v end
    assert.same(t, seen)
    assert.equal("x", next({ x = 1 }))
    assert.is_nil(next({}))
    local ok, err = pcall(function() for _ in pairs(nil) do end end)
    assert.is_false(ok)
    assert.matches("64%-backfill_spec%.lua:%d+: bad argument #1 to 'pairs' %(table expected, got nil%)", err)
    ok, err = pcall(function() local k = next(nil) return k end)
    assert.is_false(ok)
    assert.matches("64%-backfill_spec%.lua:%d+: bad argument #1 to 'next' %(table expected, got nil%)", err)
  end)

  -- The symptom itself: the rows of the FFI reader, three backfills of two-row chunks and a
  -- callback that checks the values and then iterates the row made it show every few tens
  -- of thousands of reads; with allocation sinking off and the traces flushed every 1000
  -- reads, a few times in this run (in a luajit of its own: the busted process's traces
  -- hide it). Passes trivially on a LuaJIT without the bug.
  it("delivers every column of every read to a callback that iterates the row with pairs()", function()
    local session = H.session()
    local n = 25000
    local tables = {}
    for i = 1, 3 do
      tables[i] = H.table("id bigint PRIMARY KEY, a int, b text, c timestamptz, d numeric, e boolean")
      H.sql("INSERT INTO " .. tables[i] .. [[ SELECT g, g % 1000, 'row ' || g, '2026-01-01'::timestamptz + g * interval '1 s',
        g / 4.0, g % 2 = 0 FROM generate_series(1, $1::int) g]], n)
    end
    local s = session.script(string.format([[
      local flash = require "flash"
      jit.opt.start("-sink")
      local c = assert(flash.client { driver = "wal_logical", numeric = "number" })
      local reads, bad, done, kept = 0, {}, 0, {}
      for _, t in ipairs { %q, %q, %q } do
        local l = assert(c:listen { table = t })
        l:on("read", function(ev)
          reads = reads + 1
          local r = ev.new
          local id = r.id
          local want = id and { id = id, a = id %% 1000, b = "row " .. id, d = id / 4, e = id %% 2 == 0 }
          local cols = 0
          for k, v in pairs(r) do
            cols = cols + 1
            if not want or (k == "c" and type(v) ~= "string") or (k ~= "c" and want[k] ~= v) then cols = -100 end
          end
          if cols ~= 6 and #bad < 5 then
            local parts = {}
            for k, v in pairs(r) do parts[#parts + 1] = tostring(k) .. "=" .. tostring(v) end
            bad[#bad + 1] = string.format("read %%d of %%s: %%d columns iterated, {%%s}", reads, t, cols,
              table.concat(parts, ", "))
          elseif cols ~= 6 then
            bad[#bad + 1] = "..."
          end
          kept[#kept %% 1000 + 1] = "kept " .. reads
          if reads %% 97 == 0 then collectgarbage("step") end
          if reads %% 1000 == 0 then jit.flush() end
        end)
        l:backfill { chunk = 2, progress = false, on_done = function()
          done = done + 1
          if done == 3 then flash.stop() end
        end }
      end
      flash.run()
      print(string.format("reads %%d bad %%d", reads, #bad))
      for _, b in ipairs(bad) do print(b) end
    ]], tables[1], tables[2], tables[3]))
    local p = io.popen(string.format("cd %s && env FLASH_DSN=%s LUA_PATH='lua/?.lua;lua/?/init.lua;;' " ..
      "LUA_CPATH='build/?.so;;' timeout 60 luajit %s 2>&1", H.sh_quote(H.root), H.sh_quote(H.dsn), H.sh_quote(s)))
    local out = p:read("*a")
    p:close()
    session.cleanup()
    assert.equal("reads " .. 3 * n .. " bad 0", out:match("reads %d+ bad %d+"), out)
  end)

  it("checks its options", function()
    local t = H.table("id int PRIMARY KEY")
    local c = assert(flash.client { driver = "trigger" })
    local l = assert(c:listen { table = t })
    assert.has_error(function() l:backfill { chunk = 0 } end)
    c:stop()
  end)
end)
