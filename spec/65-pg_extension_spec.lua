-- The pg_extension driver and the flashlua extension's output plugin against a real
-- server: listens positioned in WAL order, operators and columns decided in the server,
-- errors that name their fix, and a persistent slot across kill -9.
local flash = require "flash"
local core = require "flash.core"
local H = require "spec.helpers"

local function ids_of(events, key)
  local out = {}
  for _, ev in ipairs(events) do out[#out + 1] = (ev.new or ev.old)[key or "id"] end
  return out
end

-- The extension's stream read directly (no driver): every change as { op, id, tag ids }.
local streams = 0
local function raw_stream(consumer)
  local repl = assert(core.replication(H.dsn))
  streams = streams + 1
  local slot = string.format("flash_spec_raw_%d_%d", core.getpid(), streams)
  assert(repl:exec("CREATE_REPLICATION_SLOT " .. slot .. " TEMPORARY LOGICAL flashlua NOEXPORT_SNAPSHOT"))
  assert(repl:start("START_REPLICATION SLOT " .. slot .. " LOGICAL 0/0 (consumer '" .. consumer .. "', version '0.1')", 1))
  local got = {}
  local function read_until(n)
    local deadline = core.now() + 5
    while #got < n and core.now() < deadline do
      core.poll({ repl:fd() }, 0.05)
      local more, err = repl:pump(function(ev, _, tag)
        local ids = {}
        for i = 2, #(tag or ""), 8 do
          local v = 0
          for k = i, i + 7 do v = v * 256 + tag:byte(k) end
          ids[#ids + 1] = v
        end
        got[#got + 1] = { op = ev.op, id = tonumber((ev.new or ev.old).id), to = ids }
        return true
      end)
      assert(more ~= nil, err)
    end
    return got
  end
  return read_until, function() repl:close() end
end

describe("pg_extension", function()
  local client
  setup(function() H.sql("CREATE EXTENSION IF NOT EXISTS flashlua") end)
  after_each(function()
    if client then client:stop() client = nil end
  end)

  describe("listens in WAL order", function()
    it("delivers a transaction's rows written after its listen() call, none before", function()
      local t = H.table("id int PRIMARY KEY, note text")
      local read, close = raw_stream("spec_txn")
      H.sql("BEGIN")
      H.sql("INSERT INTO " .. t .. " VALUES (1, 'before the listen')")
      local id = H.scalar("SELECT flash.listen($1::regclass, NULL, NULL, NULL, NULL, 'spec_txn')", t)
      H.sql("INSERT INTO " .. t .. " VALUES (2, 'after the listen')")
      H.sql("COMMIT")
      H.sql("INSERT INTO " .. t .. " VALUES (3, 'committed later')")
      local got = read(2)
      close()
      H.sql("SELECT flash.unlisten($1)", id)
      assert.same({ { op = "insert", id = 2, to = { id } }, { op = "insert", id = 3, to = { id } } }, got)
    end)

    it("delivers a transaction of more frames than the walsender holds back (64 kB) whole and in order", function()
      local t = H.table("id int PRIMARY KEY, pad text")
      local read, close = raw_stream("spec_big_txn")
      local id = H.scalar("SELECT flash.listen($1::regclass, NULL, NULL, NULL, NULL, 'spec_big_txn')", t)
      H.sql("INSERT INTO " .. t .. " SELECT g, repeat('p', 100) FROM generate_series(1, 3000) g")
      H.sql("INSERT INTO " .. t .. " VALUES (3001, 'the next transaction')")
      local got = read(3001)
      close()
      H.sql("SELECT flash.unlisten($1)", id)
      local wrong = {}
      for i = 1, 3001 do
        local ev = got[i]
        if not (ev and ev.op == "insert" and ev.id == i and #ev.to == 1 and ev.to[1] == id) then
          wrong[#wrong + 1] = string.format("#%d: %s %s", i, ev and ev.op, ev and ev.id)
        end
      end
      assert.same({}, wrong)
      assert.equal(3001, #got)
    end)

    it("delivers nothing for a rolled-back listen", function()
      local t = H.table("id int PRIMARY KEY")
      local read, close = raw_stream("spec_rollback")
      H.sql("BEGIN")
      H.sql("SELECT flash.listen($1::regclass, NULL, NULL, NULL, NULL, 'spec_rollback')", t)
      H.sql("INSERT INTO " .. t .. " VALUES (1)")
      H.sql("ROLLBACK")
      H.sql("INSERT INTO " .. t .. " VALUES (2)")
      local id = H.scalar("SELECT flash.listen($1::regclass, NULL, NULL, NULL, NULL, 'spec_rollback')", t)
      H.sql("INSERT INTO " .. t .. " VALUES (3)")
      local got = read(1)
      close()
      H.sql("SELECT flash.unlisten($1)", id)
      assert.same({ { op = "insert", id = 3, to = { id } } }, got)
    end)

    it("starts a listener added at run time at its commit, even for rows the client has not read yet", function()
      local a, b = H.table("id int PRIMARY KEY"), H.table("id int PRIMARY KEY")
      local events
      client, events = H.listen({ table = a }, "insert", { driver = "pg_extension" })
      H.sql("INSERT INTO " .. b .. " VALUES (1)")        -- committed before b is listened to
      local lb = assert(client:listen { table = b })
      lb:on("insert", function(ev) events[#events + 1] = ev end)
      H.sql("INSERT INTO " .. b .. " VALUES (2)")
      H.sql("INSERT INTO " .. a .. " VALUES (10)")
      assert(client:run { until_lsn = "current" })
      client = nil
      assert.same({ 2, 10 }, ids_of(events))
      assert.equal("public." .. b, events[1].table)
    end)
  end)

  describe("decides in the server", function()
    local cases = {
      { { "n", "=", 2 }, { 2 } },
      { { "n", "<>", 2 }, { 1, 3 } },
      { { "n", "<", 2 }, { 1 } },
      { { "n", "<=", 2 }, { 1, 2 } },
      { { "n", ">", 2 }, { 3 } },
      { { "n", ">=", 2 }, { 2, 3 } },
      { { "n", "in", { 1, 3 } }, { 1, 3 } },
      { { "n", "is null" }, { 4 } },
      { { "n", "is not null" }, { 1, 2, 3 } },
      { { "s", "<", "b" }, { 1 } },                       -- COLLATE "C"
      { { "x", "=", "2.0" }, { 2 } },                     -- numeric: 2.00 = 2.0
      { { "ts", ">=", "2026-01-02 00:00:00+00" }, { 2, 3 } },
    }
    for _, case in ipairs(cases) do
      local cond, want = case[1], case[2]
      local value = type(cond[3]) == "table" and ("{" .. table.concat(cond[3], ",") .. "}") or tostring(cond[3] or "")
      it(string.format("where %s %s %s", cond[1], cond[2], value), function()
        local t = H.table([[id int PRIMARY KEY, n int, s text COLLATE "C", x numeric, ts timestamptz]])
        local events
        client, events = H.listen({ table = t, where = { cond } }, "insert", { driver = "pg_extension" })
        H.sql("INSERT INTO " .. t .. [[ VALUES (1, 1, 'a', 1, '2026-01-01'), (2, 2, 'b', 2.00, '2026-01-02'),
          (3, 3, 'c', 3, '2026-01-03'), (4, NULL, NULL, NULL, NULL)]])
        assert(client:run { until_lsn = "current" })
        client = nil
        assert.same(want, ids_of(events))
      end)
    end

    it("turns updates entering and leaving the where clause into inserts and deletes", function()
      local t = H.table("id int PRIMARY KEY, active bool")
      H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
      local events
      client, events = H.listen({ table = t, where = { active = true } }, "all", { driver = "pg_extension" })
      H.sql("INSERT INTO " .. t .. " VALUES (1, true), (2, false)")
      H.sql("UPDATE " .. t .. " SET active = false WHERE id = 1")
      H.sql("UPDATE " .. t .. " SET active = true WHERE id = 2")
      H.sql("UPDATE " .. t .. " SET active = true WHERE id = 2")
      assert(client:run { until_lsn = "current" })
      client = nil
      local got = {}
      for _, ev in ipairs(events) do got[#got + 1] = ev.op .. " " .. (ev.new or ev.old).id end
      assert.same({ "insert 1", "delete 1", "insert 2", "update 2" }, got)
    end)

    it("sends only the listened columns, and no update that changes none of them", function()
      local t = H.table("id int PRIMARY KEY, a text, b int, secret text")
      H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
      local events
      client, events = H.listen({ table = t, fields = { "id", "a" } }, "all", { driver = "pg_extension" })
      H.sql("INSERT INTO " .. t .. " VALUES (1, 'x', 1, 'hidden')")
      H.sql("UPDATE " .. t .. " SET b = 2, secret = 'still hidden' WHERE id = 1")
      H.sql("UPDATE " .. t .. " SET a = 'y' WHERE id = 1")
      assert(client:run { until_lsn = "current" })
      local bytes = client:stats().bytes
      client = nil
      assert.equal(2, #events)
      assert.same({ id = 1, a = "x" }, events[1].new)
      assert.same({ "update", { id = 1, a = "y" }, { id = 1, a = "x" } }, { events[2].op, events[2].new, events[2].old })
      assert.is_number(bytes)
    end)

    it("gives each of two listeners of one table its own rows", function()
      local t = H.table("id int PRIMARY KEY, k int")
      client = assert(flash.client { driver = "pg_extension" })
      local got = { {}, {} }
      for i = 1, 2 do
        assert(client:listen { table = t, where = { k = i } }):on("insert", function(ev) table.insert(got[i], ev.new.id) end)
      end
      assert(client:start())
      H.sql("INSERT INTO " .. t .. " SELECT g, g % 3 FROM generate_series(1, 9) g")
      assert(client:run { until_lsn = "current" })
      client = nil
      assert.same({ { 1, 4, 7 }, { 2, 5, 8 } }, got)
    end)
  end)

  describe("the stream's own messages", function()
    it("marks where each listen took effect: its listener gets every change after it", function()
      local t = H.table("id int PRIMARY KEY")
      client = assert(flash.client { driver = "pg_extension" })
      local first, later = {}, {}
      local a = assert(client:listen { table = t })
      a:on("insert", function(ev) first[#first + 1] = ev end)
      assert(client:start())
      H.sql("INSERT INTO " .. t .. " VALUES (1)")
      H.wait(client, first, 1)
      assert.is_string(a.active_lsn)
      local b = assert(client:listen { table = t })
      b:on("insert", function(ev) later[#later + 1] = ev end)
      H.sql("INSERT INTO " .. t .. " VALUES (2)")
      H.wait(client, later, 1)
      H.wait(client, first, 2)
      assert.is_string(b.active_lsn)
      assert.is_true(core.lsn(a.active_lsn) < core.lsn(first[1].lsn))
      assert.is_true(core.lsn(first[1].lsn) < core.lsn(b.active_lsn))
      assert.is_true(core.lsn(b.active_lsn) < core.lsn(later[1].lsn))
      assert.same({ 1, 2, 2 }, { first[1].new.id, first[2].new.id, later[1].new.id })
    end)

    it("counts a condition it cannot test (an unchanged TOASTed value the WAL lacks) in client:stats().nomatch", function()
      local t = H.table("id int PRIMARY KEY, big text, n int")
      client = assert(flash.client { driver = "pg_extension", replica_identity = "full" })
      local got = {}
      assert(client:listen { table = t, fields = { "id", "n" }, where = { { "big", "<>", "a" } } }):on("all", function(ev)
        got[#got + 1] = ev.op .. " " .. ev.new.id .. " " .. tostring(ev.new.n)
      end)
      assert(client:start())
      local big = "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 1000) g)"
      H.sql("INSERT INTO " .. t .. " VALUES (1, " .. big .. ", 0), (2, " .. big .. ", 0)")
      -- REPLICA IDENTITY FULL: the old row has the value, so the unchanged one is tested.
      H.sql("UPDATE " .. t .. " SET n = 1 WHERE id = 1")
      H.wait(client, got, 3)
      assert.equal(0, client:stats().nomatch)
      -- Without it, the new row of an update that leaves the value alone lacks it.
      H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY DEFAULT")
      H.sql("UPDATE " .. t .. " SET n = 2 WHERE id = 1")
      H.sql("UPDATE " .. t .. " SET n = 3, big = 'b' WHERE id = 2")
      H.wait(client, got, 4)
      assert.same({ "insert 1 0", "insert 2 0", "update 1 1", "update 2 3" }, got)
      assert.equal(1, client:stats().nomatch)
    end)
  end)

  describe("many listeners", function()
    it("1,000 listeners with equality conditions on one table: each row reaches exactly its listeners", function()
      local t = H.table("id int PRIMARY KEY, k int, tag text")
      client = assert(flash.client { driver = "pg_extension", replica_identity = "full" })
      local got, want = {}, {}
      -- Listener i: k = i; every tenth k in {i, i + 1000}; i = 1, 11, 21, ... also tag = 'x';
      -- number 1001 (not indexed: no equality) k >= 1999.
      for i = 1, 1001 do
        local where
        if i == 1001 then where = { { "k", ">=", 1999 } }
        elseif i % 10 == 0 then where = { { "k", "in", { i, i + 1000 } } }
        elseif i % 10 == 1 then where = { k = i, tag = "x" }
        else where = { k = i } end
        got[i], want[i] = {}, {}
        assert(client:listen { table = t, fields = { "id" }, where = where }):on("all", function(ev)
          table.insert(got[i], ev.op .. " " .. (ev.new or ev.old).id)
        end)
      end
      assert(client:start())
      H.sql("INSERT INTO " .. t .. " SELECT g, g, CASE WHEN g % 4 = 1 THEN 'x' ELSE 'y' END FROM generate_series(1, 2000) g")
      H.sql("UPDATE " .. t .. " SET k = k + 1 WHERE id IN (5, 1010)")
      H.sql("DELETE FROM " .. t .. " WHERE id = 7")
      assert(client:run { until_lsn = "current" })
      client = nil
      for g = 1, 2000 do
        local tag = g % 4 == 1 and "x" or "y"
        for i = 1, 1001 do
          local hit
          if i == 1001 then hit = g >= 1999
          elseif i % 10 == 0 then hit = g == i or g == i + 1000
          elseif i % 10 == 1 then hit = g == i and tag == "x"
          else hit = g == i end
          if hit then table.insert(want[i], "insert " .. g) end
        end
      end
      table.insert(want[5], "delete 5")
      table.insert(want[6], "insert 5")
      table.insert(want[10], "delete 1010")
      table.insert(want[7], "delete 7")
      local wrong = {}
      for i = 1, 1001 do
        if table.concat(got[i], ",") ~= table.concat(want[i], ",") then
          wrong[#wrong + 1] = string.format("#%d got {%s} want {%s}", i, table.concat(got[i], ","), table.concat(want[i], ","))
        end
      end
      assert.same({}, wrong)
      assert.same({ "insert 1999", "insert 2000" }, got[1001])
    end)
  end)

  describe("DDL while listening", function()
    it("drops a dropped field from events, stops a listener whose condition column is gone or retyped, and warns once", function()
      local t = H.table("id int PRIMARY KEY, note text, score int, kind text, other int")
      client = assert(flash.client { driver = "pg_extension" })
      local got = { fields = {}, score = {}, kind = {}, all = {} }
      local function on(name, opts)
        opts.table = t
        assert(client:listen(opts)):on("insert", function(ev) table.insert(got[name], ev.new) end)
      end
      on("fields", { fields = { "id", "note" } })
      on("score", { fields = { "id" }, where = { { "score", ">=", 10 } } })
      on("kind", { fields = { "id" }, where = { kind = "a" } })
      on("all", {})
      assert(client:start())
      H.sql("INSERT INTO " .. t .. " VALUES (1, 'n', 10, 'a', 0)")
      H.wait(client, got.all, 1)
      local warned = H.warnings(function()
        H.sql("ALTER TABLE " .. t .. " DROP COLUMN note")
        H.sql("ALTER TABLE " .. t .. " ALTER COLUMN score TYPE bigint")
        H.sql("ALTER TABLE " .. t .. " DROP COLUMN kind")
        H.sql("ALTER TABLE " .. t .. " ADD COLUMN added text DEFAULT 'new'")
        H.sql("INSERT INTO " .. t .. " (id, score, other) VALUES (2, 20, 0), (3, 30, 0)")
        assert(client:run { until_lsn = "current" })
      end)
      client = nil
      table.sort(warned)
      assert.same({
        string.format("listener #1 on public.%s: column note is no longer in the table (dropped or renamed); " ..
          "its events no longer carry it", t),
        string.format("listener #2 on public.%s: column score of its conditions changed type; it matches nothing " ..
          "until it listens again", t),
        string.format("listener #3 on public.%s: column kind of its conditions is no longer in the table (dropped); " ..
          "it matches nothing until it listens again", t),
      }, warned)
      assert.same({ { id = 1, note = "n" }, { id = 2 }, { id = 3 } }, got.fields)
      assert.same({ { id = 1 } }, got.score)
      assert.same({ { id = 1 } }, got.kind)
      assert.same({ { id = 1, note = "n", score = 10, kind = "a", other = 0 },
        { id = 2, score = 20, other = 0, added = "new" }, { id = 3, score = 30, other = 0, added = "new" } }, got.all)
    end)

    it("follows INHERITS children, with their own columns, a child created while listening included", function()
      local t = H.table("id int PRIMARY KEY, v text")
      H.sql("CREATE TABLE " .. t .. "_kid (extra int) INHERITS (" .. t .. ")")
      client = assert(flash.client { driver = "pg_extension" })
      local got = {}
      assert(client:listen { table = t, fields = { "id", "v" }, where = { { "id", "<", 50 } } }):on("insert", function(ev)
        got[#got + 1] = { ev.new.id, ev.new.v, ev.source }
      end)
      assert(client:start())
      H.sql("INSERT INTO " .. t .. "_kid VALUES (1, 'kid', 7), (51, 'kid, filtered out', 7)")
      H.sql("CREATE TABLE " .. t .. "_late (z int, v text, id int NOT NULL); ALTER TABLE " .. t .. "_late INHERIT " .. t ..
        "; INSERT INTO " .. t .. "_late VALUES (0, 'late', 2)")
      assert(client:run { until_lsn = "current" })
      client = nil
      assert.same({ { 1, "kid", "public." .. t .. "_kid" }, { 2, "late", "public." .. t .. "_late" } }, got)
    end)
  end)

  describe("errors", function()
    it("refuses a condition the server cannot test, at listen", function()
      local t = H.table("id int PRIMARY KEY, doc json")
      client = assert(flash.client { driver = "pg_extension" })
      local l, err = client:listen { table = t, where = { { "doc", "=", "{}" } } }
      assert.is_nil(l)
      assert.matches('condition on column "doc": type json has no btree comparison', err, 1, true)
      l, err = client:listen { table = t, where = { { "id", ">", "ten" } } }
      assert.is_nil(l)
      assert.matches('invalid input syntax for type integer: "ten"', err, 1, true)
    end)

    it("names the fix when the extension is not created in the database", function()
      H.sql("DROP DATABASE IF EXISTS flash_spec_noext")
      H.sql("CREATE DATABASE flash_spec_noext")
      client = assert(flash.client { driver = "pg_extension", dsn = H.dsn .. " dbname=flash_spec_noext" })
      assert(client:query("CREATE TABLE t (id int)"))
      assert(client:listen { table = "t" }):on("insert", function() end)
      local ok, err = client:start()
      client:stop()
      client = nil
      H.sql("DROP DATABASE flash_spec_noext")
      assert.is_nil(ok)
      assert.matches("not created in database flash_spec_noext (run `CREATE EXTENSION flashlua` there as a superuser)",
        err, 1, true)
    end)

    it("names the fix when the role lacks REPLICATION", function()
      local t = H.table("id int PRIMARY KEY")
      H.sql("DROP ROLE IF EXISTS flash_spec_norepl")
      H.sql("CREATE ROLE flash_spec_norepl LOGIN")
      H.sql("GRANT SELECT ON " .. t .. " TO flash_spec_norepl")
      client = assert(flash.client { driver = "pg_extension", dsn = H.dsn .. " user=flash_spec_norepl" })
      assert(client:listen { table = t }):on("insert", function() end)
      local ok, err = client:start()
      client:stop()
      client = nil
      H.sql("DROP OWNED BY flash_spec_norepl; DROP ROLE flash_spec_norepl")
      assert.is_nil(ok)
      assert.matches('ALTER ROLE "flash_spec_norepl" REPLICATION', err, 1, true)
    end)

    it("leaves no listener behind after a graceful stop", function()
      local t = H.table("id int PRIMARY KEY")
      client = assert(flash.client { driver = "pg_extension" })
      assert(client:listen { table = t }):on("insert", function() end)
      assert(client:start())
      local consumer = client:stats().consumer
      assert.equal(1, tonumber(H.scalar("SELECT count(*) FROM flash.listeners WHERE consumer = $1", consumer)))
      client:stop()
      client = nil
      assert.equal(0, tonumber(H.scalar("SELECT count(*) FROM flash.listeners WHERE consumer = $1", consumer)))
    end)
  end)

  describe("a persistent slot", function()
    local s = H.session()
    after_each(s.cleanup)

    it("loses nothing across kill -9 and a restart, in order", function()
      local t = H.table("id int PRIMARY KEY")
      local slot = "flash_spec_ext_persist"
      H.drop_slot(slot, "flash_spec_none")
      local out = s.tmp()
      local code = s.script([[
        local flash = require "flash"
        local out = assert(io.open(arg[1], "a"))
        out:setvbuf("line")
        local c = assert(flash.client { driver = "pg_extension", persistent = true, slot = arg[2] })
        assert(c:listen { table = arg[3], where = { { "id", "<>", 0 } } }):on("insert", function(ev) out:write(ev.new.id, "\n") end)
        assert(c:start())
        io.stdout:setvbuf("no")
        print("ready")
        if arg[4] == "until" then assert(c:run { until_lsn = "current" }) end
      ]])
      local first = s.spawn({ code, out, slot, t })
      assert.is_true(first.await("ready", 20), first.err())
      for i = 1, 50 do H.sql("INSERT INTO " .. t .. " VALUES ($1)", i) end
      first.kill("KILL")
      assert.equal(137, first.wait(10))
      for i = 51, 80 do H.sql("INSERT INTO " .. t .. " VALUES ($1)", i) end
      local second = s.spawn({ code, out, slot, t, "until" })
      assert.equal(0, second.wait(30), second.err())
      local seen, order, ok_order = {}, {}, true
      for _, l in ipairs(H.lines(out)) do
        local id = tonumber(l)
        if not seen[id] then
          if #order > 0 and id < order[#order] then ok_order = false end
          seen[id] = true
          order[#order + 1] = id
        end
      end
      H.drop_slot(slot, "flash_spec_none")
      H.sql("SELECT flash.unlisten(id) FROM flash.listeners WHERE consumer = $1", slot)
      assert.equal(80, #order)
      assert.is_true(ok_order, "first deliveries out of order: " .. table.concat(order, ","))
    end)
  end)
end)
