-- Event content against a real PostgreSQL: operations, the type table, partial fields,
-- conditions and their transitions, ordering, big rows, writer settings, odd identifiers.
-- Runs over every driver in H.drivers with the same expectations.
local flash = require "flash"
local H = require "helpers"

local null = flash.null

for _, driver in ipairs(H.drivers) do
describe("events (" .. driver .. " driver)", function()
  -- replica_identity: the wal_logical driver may make the spec tables' old rows complete;
  -- the other drivers accept and ignore it.
  local function copts(extra)
    local o = { driver = driver, replica_identity = "full" }
    for k, v in pairs(extra or {}) do o[k] = v end
    return o
  end
  local client

  after_each(function()
    if client then client:stop() client = nil end
  end)

  local function listen(lopts, ops)
    local c, events, l, off = H.listen(lopts, ops, copts())
    client = c
    return events, l, off
  end

  it("delivers insert, update, delete and truncate with table, new and old values", function()
    local t = H.table("id int PRIMARY KEY, title text")
    local events = listen({ table = t })
    H.sql("INSERT INTO " .. t .. " VALUES (1, 'a')")
    H.sql("UPDATE " .. t .. " SET title = 'b' WHERE id = 1")
    H.sql("DELETE FROM " .. t .. " WHERE id = 1")
    H.sql("TRUNCATE " .. t)
    H.wait(client, events, 4)
    assert.equal(4, #events)
    local ins, upd, del, tru = events[1], events[2], events[3], events[4]
    assert.same({ "insert", "public." .. t, { id = 1, title = "a" } }, { ins.op, ins.table, ins.new })
    assert.is_nil(ins.old)
    assert.same({ "update", { id = 1, title = "b" }, { id = 1, title = "a" } }, { upd.op, upd.new, upd.old })
    assert.same({ "delete", { id = 1, title = "b" } }, { del.op, del.old })
    assert.is_nil(del.new)
    assert.same({ "truncate", "public." .. t }, { tru.op, tru.table })
    assert.is_nil(tru.new)
    assert.is_nil(tru.old)
    assert.is_number(ins.xid)
    assert.is_true(upd.xid > ins.xid)
  end)

  it("maps every type of the type table, NULL included", function()
    H.sql("DROP TYPE IF EXISTS mood CASCADE; CREATE TYPE mood AS ENUM ('sad', 'happy')")
    local t = H.table([[id int, b boolean, i2 smallint, i4 integer, f4 real, f8 double precision,
      o oid, i8 bigint, i8big bigint, i8neg bigint, num numeric, js json, jb jsonb, by bytea,
      ia int[], ta text[], ia2 int[][], ba boolean[], tx text, vc varchar(10), u uuid,
      d date, ts timestamp, tz timestamptz, iv interval, ip inet, ch char(4), m mood, f8nan double precision,
      f8inf double precision, f8ninf double precision, numnan numeric]])
    local events = listen({ table = t }, "insert")
    H.sql("INSERT INTO " .. t .. [[ VALUES (1, true, 7, -42, 1.5, 0.1, 123, 9007199254740992,
      9007199254740993, -9223372036854775808, 12.50, '{"a":[1,null,"x"],"b":{"c":true}}',
      '[1.5, "s", null]', '\x00ff41', '{1,2,NULL}', '{"a b",NULL,c,"q\"d"}', '{{1,2},{3,4}}',
      '{t,f}', 'plain ü', 'vc', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2026-01-02',
      '2026-01-02 03:04:05.5', '2026-01-02 03:04:05+00', '1 day 02:00:00', '10.0.0.1/32', 'ab', 'happy',
      'NaN', 'Infinity', '-Infinity', 'NaN')]])
    H.sql("INSERT INTO " .. t .. " (id) VALUES (2)")
    H.wait(client, events, 2)
    assert.equal(2, #events)
    local r = events[1].new
    assert.equal(true, r.b)
    assert.equal(7, r.i2)
    assert.equal(-42, r.i4)
    assert.equal(1.5, r.f4)
    assert.equal(0.1, r.f8)
    assert.equal(123, r.o)
    assert.equal(9007199254740992, r.i8)
    assert.equal("9007199254740993", r.i8big)
    assert.equal("-9223372036854775808", r.i8neg)
    assert.equal("12.50", r.num)
    assert.same({ a = { 1, null, "x" }, b = { c = true } }, r.js)
    assert.equal(null, r.js.a[2])
    assert.same({ 1.5, "s", null }, r.jb)
    assert.equal("\0\255A", r.by)
    assert.same({ 1, 2, null }, r.ia)
    assert.same({ "a b", null, "c", 'q"d' }, r.ta)
    assert.same({ { 1, 2 }, { 3, 4 } }, r.ia2)
    assert.same({ true, false }, r.ba)
    assert.equal("plain ü", r.tx)
    assert.equal("vc", r.vc)
    assert.equal("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", r.u)
    assert.equal("2026-01-02", r.d)
    assert.equal("2026-01-02 03:04:05.5", r.ts)
    assert.equal("2026-01-02 03:04:05+00", r.tz)
    assert.equal("1 day 02:00:00", r.iv)
    assert.equal("10.0.0.1", r.ip)       -- inet's output form, not inet::text
    assert.equal("ab  ", r.ch)            -- char(n) keeps its padding
    assert.equal("happy", r.m)
    assert.is_true(r.f8nan ~= r.f8nan)
    assert.equal(math.huge, r.f8inf)
    assert.equal(-math.huge, r.f8ninf)
    assert.equal("NaN", r.numnan)
    local n = events[2].new
    assert.equal(2, n.id)
    for _, col in ipairs({ "b", "i2", "i8", "num", "js", "jb", "by", "ia", "tx", "tz", "m" }) do
      assert.equal(null, n[col], col)
    end
  end)

  it("converts numeric to numbers with numeric = \"number\"", function()
    local t = H.table("id int, num numeric")
    local c, events = H.listen({ table = t }, "insert", copts { numeric = "number" })
    client = c
    H.sql("INSERT INTO " .. t .. " VALUES (1, 12.50)")
    H.wait(client, events, 1)
    assert.equal(12.5, events[1].new.num)
  end)

  it("carries only the listed fields and ignores updates of other columns", function()
    local t = H.table("id int, title text, views int")
    local events = listen({ table = t, fields = { "id", "title" } })
    H.sql("INSERT INTO " .. t .. " VALUES (1, 'a', 0)")
    H.sql("UPDATE " .. t .. " SET views = views + 1")
    H.sql("UPDATE " .. t .. " SET title = 'b'")
    H.wait(client, events, 2)
    H.settle(client)
    assert.equal(2, #events)
    assert.same({ id = 1, title = "a" }, events[1].new)
    assert.equal("update", events[2].op)
    assert.same({ id = 1, title = "b" }, events[2].new)
    assert.same({ id = 1, title = "a" }, events[2].old)
  end)

  describe("equality conditions on update", function()
    local t, events
    before_each(function()
      t = H.table("id int, active boolean, title text")
      H.sql("INSERT INTO " .. t .. " VALUES (1, true, 'a'), (2, false, 'b')")
      events = listen({ table = t, where = { active = true } })
    end)

    it("delivers an update when old and new rows match", function()
      H.sql("UPDATE " .. t .. " SET title = 'a2' WHERE id = 1")
      H.wait(client, events, 1)
      assert.equal(1, #events)
      assert.same({ "update", "a2", "a" }, { events[1].op, events[1].new.title, events[1].old.title })
    end)

    it("delivers a delete with the old row when an update leaves the where clause", function()
      H.sql("UPDATE " .. t .. " SET active = false WHERE id = 1")
      H.wait(client, events, 1)
      assert.equal(1, #events)
      assert.equal("delete", events[1].op)
      assert.same({ id = 1, active = true, title = "a" }, events[1].old)
      assert.is_nil(events[1].new)
    end)

    it("delivers an insert with the new row when an update enters the where clause", function()
      H.sql("UPDATE " .. t .. " SET active = true WHERE id = 2")
      H.wait(client, events, 1)
      assert.equal(1, #events)
      assert.equal("insert", events[1].op)
      assert.same({ id = 2, active = true, title = "b" }, events[1].new)
      assert.is_nil(events[1].old)
    end)

    it("delivers nothing when neither row matches", function()
      H.sql("UPDATE " .. t .. " SET title = 'b2' WHERE id = 2")
      H.sql("INSERT INTO " .. t .. " VALUES (3, false, 'c')")
      H.sql("DELETE FROM " .. t .. " WHERE id = 2")
      H.sql("INSERT INTO " .. t .. " VALUES (4, true, 'marker')")
      H.wait(client, events, 1)
      H.settle(client)
      assert.equal(1, #events)
      assert.equal("marker", events[1].new.title)
    end)
  end)

  it("treats column = flash.null as IS NULL", function()
    local t = H.table("id int, deleted_at timestamptz")
    local events = listen({ table = t, where = { deleted_at = null } }, "insert")
    H.sql("INSERT INTO " .. t .. " VALUES (1, now()), (2, NULL)")
    H.wait(client, events, 1)
    H.settle(client)
    assert.equal(1, #events)
    assert.equal(2, events[1].new.id)
  end)

  it("yields nothing for a rolled-back transaction and keeps commit order", function()
    local t = H.table("id int")
    local events = listen({ table = t })
    H.sql("BEGIN; INSERT INTO " .. t .. " VALUES (100); ROLLBACK")
    for i = 1, 20 do H.sql("INSERT INTO " .. t .. " VALUES ($1)", i) end
    H.sql("BEGIN; INSERT INTO " .. t .. " VALUES (21); INSERT INTO " .. t .. " VALUES (22); COMMIT")
    H.wait(client, events, 22)
    H.settle(client)
    assert.equal(22, #events)
    for i = 1, 22 do assert.equal(i, events[i].new.id) end
  end)

  it("delivers a 20 kB row whole and the user's INSERT succeeds", function()
    local t = H.table("id int, body text")
    local events = listen({ table = t })
    local body = string.rep("0123456789", 2000)
    H.sql("INSERT INTO " .. t .. " VALUES (1, $1)", body)
    H.sql("UPDATE " .. t .. " SET body = body || 'x'")
    H.wait(client, events, 2)
    assert.equal(2, #events)
    assert.equal(body, events[1].new.body)
    assert.equal(body .. "x", events[2].new.body)
    assert.equal(body, events[2].old.body)
  end)

  it("gives the same values whatever the writer's TimeZone and bytea_output", function()
    local t = H.table("id int, tz timestamptz, by bytea, d date")
    local events = listen({ table = t })
    H.sql("INSERT INTO " .. t .. " VALUES (1, '2026-01-02 03:04:05+00', '\\x00ff', '2026-01-02')")
    H.sql([[SET TimeZone = 'America/New_York'; SET bytea_output = 'escape'; SET DateStyle = 'SQL, DMY';
      INSERT INTO ]] .. t .. [[ VALUES (2, '2026-01-01 22:04:05-05', '\x00ff', '2026-01-02');
      RESET TimeZone; RESET bytea_output; RESET DateStyle]])
    H.wait(client, events, 2)
    assert.equal(2, #events)
    for _, ev in ipairs(events) do
      assert.equal("2026-01-02 03:04:05+00", ev.new.tz)
      assert.equal("\0\255", ev.new.by)
      assert.equal("2026-01-02", ev.new.d)
    end
  end)

  it("delivers five events for five rows (1),(1),(1),(2),(2) of one INSERT", function()
    local t = H.table("v int")
    local events = listen({ table = t })
    H.sql("INSERT INTO " .. t .. " VALUES (1),(1),(1),(2),(2)")
    H.wait(client, events, 5)
    H.settle(client)
    assert.equal(5, #events)
    local vals = {}
    for i, ev in ipairs(events) do vals[i] = ev.new.v end
    assert.same({ 1, 1, 1, 2, 2 }, vals)
  end)

  it("captures odd identifiers and cleans them up", function()
    H.sql([[DROP SCHEMA IF EXISTS "My Schema" CASCADE; CREATE SCHEMA "My Schema";
      CREATE TABLE "My Schema"."Odd ""Table"" x" ("the id" int, "Title" text)]])
    local events = listen({ table = [["My Schema"."Odd ""Table"" x"]], fields = { "the id", "Title" } })
    H.sql([[INSERT INTO "My Schema"."Odd ""Table"" x" VALUES (1, 'one')]])
    H.sql([[UPDATE "My Schema"."Odd ""Table"" x" SET "Title" = 'two']])
    H.wait(client, events, 2)
    assert.equal(2, #events)
    assert.equal('My Schema.Odd "Table" x', events[1].table)
    assert.same({ ["the id"] = 1, Title = "one" }, events[1].new)
    assert.same({ ["the id"] = 1, Title = "two" }, events[2].new)
    client:stop()
    client = nil
    assert.equal(0, H.leftovers())
    assert.equal(0, H.capture([["My Schema"."Odd ""Table"" x"]]))
    H.sql([[DROP SCHEMA "My Schema" CASCADE]])
  end)

  it("takes hostile values in conditions as plain values", function()
    local t = H.table("id int, title text")
    local events = listen({ table = t, where = { title = "'; DROP TABLE " .. t .. "; --" } }, "insert")
    H.sql("INSERT INTO " .. t .. " VALUES (1, 'x'), (2, $1)", "'; DROP TABLE " .. t .. "; --")
    H.wait(client, events, 1)
    H.settle(client)
    assert.equal(1, #events)
    assert.equal(2, events[1].new.id)
    assert.equal(2, tonumber(H.scalar("SELECT count(*) FROM " .. t)))
  end)

  it("serves two listeners on one table with different fields and conditions", function()
    local t = H.table("id int, kind text, title text")
    local c = assert(flash.client(copts()))
    client = c
    local a, b = {}, {}
    assert(c:listen { table = t, fields = { "id" }, where = { kind = "a" } }):on("all", function(ev) a[#a + 1] = ev end)
    assert(c:listen { table = t, fields = { "title" } }):on("insert", function(ev) b[#b + 1] = ev end)
    assert(c:start())
    H.sql("INSERT INTO " .. t .. " VALUES (1, 'a', 'x'), (2, 'b', 'y')")
    H.wait(c, b, 2)
    H.settle(c)
    assert.same({ { id = 1 } }, { a[1].new })
    assert.equal(1, #a)
    assert.same({ { title = "x" }, { title = "y" } }, { b[1].new, b[2].new })
  end)

  it("stops capturing when off() leaves no callback, and no more events arrive", function()
    local t = H.table("id int")
    local events, l, off = listen({ table = t }, "insert")
    local trig = function() return H.capture(t) end
    assert.equal(1, trig())
    H.sql("INSERT INTO " .. t .. " VALUES (1)")
    H.wait(client, events, 1)
    off()
    assert.equal(0, trig())
    H.sql("INSERT INTO " .. t .. " VALUES (2)")
    H.settle(client)
    assert.equal(1, #events)
    -- on() at run time creates it again.
    l:on("delete", function(ev) events[#events + 1] = ev end)
    assert.equal(1, trig())
    H.sql("DELETE FROM " .. t)
    H.wait(client, events, 3)
    assert.same({ "insert", "delete", "delete" }, { events[1].op, events[2].op, events[3].op })
    client:stop()
    client = nil
    assert.equal(0, trig())
    assert.equal(0, H.leftovers())
  end)

  describe("on_error", function()
    local function failing(policy)
      local t = H.table("id int")
      local c = assert(flash.client(copts { on_error = policy }))
      client = c
      local seen = {}
      assert(c:listen { table = t }):on("insert", function(ev)
        seen[#seen + 1] = ev.new.id
        if ev.new.id == 1 then error("boom on 1") end
      end)
      assert(c:start())
      H.sql("INSERT INTO " .. t .. " VALUES (1)")
      H.sql("INSERT INTO " .. t .. " VALUES (2)")
      return c, seen
    end

    it("\"stop\" stops the client with the error", function()
      local c, seen = failing("stop")
      local ok, err
      for _ = 1, 40 do
        ok, err = c:poll(0.05)
        if not ok then break end
      end
      assert.is_nil(ok)
      assert.matches("boom on 1", err)
      assert.same({ 1 }, seen)
    end)

    it("\"log\" logs with a traceback and goes on", function()
      local lines = {}
      local old = flash.log.set_sink(function(line) lines[#lines + 1] = line end)
      local c, seen = failing("log")
      H.wait(c, seen, 2)
      flash.log.set_sink(old)
      assert.same({ 1, 2 }, seen)
      local text = table.concat(lines, "\n")
      assert.matches("boom on 1", text)
      assert.matches("stack traceback", text)
    end)

    it("applies to a where function that raises: \"stop\" stops, \"log\" skips the row", function()
      for _, policy in ipairs({ "stop", "log" }) do
        local t = H.table("id int PRIMARY KEY")
        local old = flash.log.set_sink(function() end)
        local c = assert(flash.client(copts { on_error = policy }))
        client = c
        local seen = {}
        assert(c:listen { table = t, where = function(row)
          if row.id == 1 then error("bad row " .. row.id) end
          return true
        end }):on("insert", function(ev) seen[#seen + 1] = ev.new.id end)
        assert(c:start())
        H.sql("INSERT INTO " .. t .. " VALUES (1)")
        H.sql("INSERT INTO " .. t .. " VALUES (2)")
        local ok, err
        for _ = 1, 40 do
          ok, err = c:poll(0.05)
          if not ok or #seen == 1 then break end
        end
        flash.log.set_sink(old)
        if policy == "stop" then
          assert.is_nil(ok)
          assert.matches("bad row 1", err)
          assert.same({}, seen)
        else
          assert.is_true(ok)
          assert.same({ 2 }, seen)
        end
        c:stop()
        client = nil
      end
    end)

    it("a function receives the error and the event", function()
      local got = {}
      local c, seen = failing(function(err, ev) got[#got + 1] = { err = err, id = ev.new.id } end)
      H.wait(c, seen, 2)
      assert.same({ 1, 2 }, seen)
      assert.equal(1, #got)
      assert.equal(1, got[1].id)
      assert.matches("boom on 1", got[1].err)
    end)
  end)
end)
end
