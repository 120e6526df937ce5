-- spec/75-column_mask_spec.lua: wal_logical converts only the columns some listener of a
-- relation needs (issue 10: a column mask per relation, lrepl's repl:columns): events are
-- what they were, and the values left out are never converted (repl:state().values).
local flash = require "flash"
local core = require "flash.core"
local H = require "helpers"

-- Ten columns, REPLICA IDENTITY FULL; row i has a = i * 10, flag = 'yes' or 'no'.
local COLUMNS = "id int PRIMARY KEY, a int, flag text, b text, c int, d numeric, e boolean, f timestamptz, g text, h int"
local function wide()
  local t = H.table(COLUMNS)
  H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
  return t
end
local function insert(t, id, flag)
  H.sql(string.format("INSERT INTO %s VALUES (%d, %d, '%s', 'b%d', %d, %d.5, true, '2026-01-01', 'g', %d)",
    t, id, id * 10, flag or "yes", id, id, id, id))
end

-- Column values lrepl converted so far on client c's stream.
local function converted(c) return c.driver.repl:state().values end

describe("column mask (wal_logical)", function()
  local client
  after_each(function()
    if client then client:stop() client = nil end
  end)

  it("delivers exactly the listened fields, and conditions on other columns still decide", function()
    local t = wide()
    local c, events = H.listen({ table = t, fields = { "id", "a" }, where = { flag = "yes" } }, "all",
      { driver = "wal_logical" })
    client = c
    insert(t, 1)
    insert(t, 2, "no")
    H.sql("UPDATE " .. t .. " SET b = 'other' WHERE id = 1")   -- no listened field changed
    H.sql("UPDATE " .. t .. " SET a = 11 WHERE id = 1")
    H.sql("UPDATE " .. t .. " SET flag = 'no' WHERE id = 1")   -- leaves the condition: a delete
    H.sql("UPDATE " .. t .. " SET flag = 'yes' WHERE id = 2")  -- enters it: an insert
    H.wait(c, events, 4)
    H.settle(c)
    local got = {}
    for i, ev in ipairs(events) do got[i] = { op = ev.op, new = ev.new, old = ev.old } end
    assert.same({
      { op = "insert", new = { id = 1, a = 10 } },
      { op = "update", new = { id = 1, a = 11 }, old = { id = 1, a = 10 } },
      { op = "delete", old = { id = 1, a = 11 } },
      { op = "insert", new = { id = 2, a = 20 } },
    }, got)
  end)

  it("hands a function where the listened fields, as without a mask", function()
    local t = wide()
    local seen = {}
    local c, events = H.listen({ table = t, fields = { "id", "a" }, where = function(row)
      seen[#seen + 1] = row
      return row.a > 10
    end }, "insert", { driver = "wal_logical" })
    client = c
    for i = 1, 3 do insert(t, i) end
    H.wait(c, events, 2)
    H.settle(c)
    assert.same({ { id = 1, a = 10 }, { id = 2, a = 20 }, { id = 3, a = 30 } }, seen)
    assert.same({ { id = 2, a = 20 }, { id = 3, a = 30 } }, { events[1].new, events[2].new })
  end)

  it("converts fewer values with a mask: a listener of two fields of ten", function()
    local t = wide()
    local function run(listen)
      local c, events = H.listen(listen, "insert", { driver = "wal_logical" })
      client = c
      H.settle(c, 0.1)
      local before = converted(c)
      for i = 1, 20 do insert(t, i) end
      H.wait(c, events, 20)
      assert.equal(20, #events)
      local n = converted(c) - before
      c:stop()
      client = nil
      H.sql("TRUNCATE " .. t)
      return n, events
    end
    local all, full = run { table = t }
    local masked, two = run { table = t, fields = { "id", "a" } }
    assert.equal(20 * 10, all)
    -- The first row is converted before its route (and so the mask) is known.
    assert.equal(10 + 19 * 2, masked)
    assert.same({ id = 20, a = 200 }, two[20].new)
    assert.equal("b20", full[20].new.b)
  end)

  it("gives every column to a second listener without fields on the same table", function()
    local t = wide()
    local c = assert(flash.client { driver = "wal_logical" })
    client = c
    local some, every = {}, {}
    assert(c:listen { table = t, fields = { "id", "a" } }):on("insert", function(ev) some[#some + 1] = ev end)
    assert(c:start())
    insert(t, 1)
    insert(t, 2)
    H.wait(c, some, 2)
    -- Added while the mask of two columns is in force: its first event has them all.
    local l2 = assert(c:listen { table = t })
    local off = l2:on("insert", function(ev) every[#every + 1] = ev end)
    insert(t, 3)
    insert(t, 4)
    H.wait(c, every, 2)
    H.wait(c, some, 4)
    assert.same({ id = 4, a = 40 }, some[4].new)
    assert.equal(2, #every)
    for i, ev in ipairs(every) do
      local id, row = i + 2, ev.new
      assert.is_not_nil(row.f)
      row.f = nil
      assert.same({ id = id, a = id * 10, flag = "yes", b = "b" .. id, c = id, d = id .. ".5", e = true, g = "g", h = id },
        row)
    end
    -- Without it, the mask is back: two values a row (the first after the change: all ten).
    off()
    local before = converted(c)
    for i = 5, 7 do insert(t, i) end
    H.wait(c, some, 7)
    assert.equal(10 + 2 * 2, converted(c) - before)
  end)

  it("follows columns added and dropped while listening", function()
    local t = wide()
    local c, events, l = H.listen({ table = t, fields = { "id", "a", "h" } }, "insert", { driver = "wal_logical" })
    client = c
    local every = {}
    assert.is_not_nil(l)
    insert(t, 1)
    H.wait(c, events, 1)
    local warned = H.warnings(function()
      H.sql("ALTER TABLE " .. t .. " ADD COLUMN z text DEFAULT 'zz', DROP COLUMN h")
      local before = converted(c)
      insert(t, 2)
      insert(t, 3)
      H.wait(c, events, 3)
      -- id and a: z was never listened, h is gone (the row after the change: all ten).
      assert.equal(10 + 2, converted(c) - before)
    end)
    assert.same({ id = 1, a = 10, h = 1 }, events[1].new)
    assert.same({ id = 2, a = 20 }, events[2].new)
    assert.same({ id = 3, a = 30 }, events[3].new)
    assert.equal(1, #warned)
    assert.matches("column h is no longer in the table", warned[1], 1, true)
    -- A listener without fields added now sees the new column (the tenth value is z's now).
    local l2 = assert(c:listen { table = t })
    l2:on("insert", function(ev) every[#every + 1] = ev end)
    insert(t, 4)
    H.wait(c, every, 1)
    assert.equal("4", every[1].new.z)
    assert.is_nil(every[1].new.h)
  end)

  it("still turns a key change into a delete and an insert", function()
    local t = wide()
    local c, events = H.listen({ table = t, fields = { "a" }, primary_key = { "id" } }, "all",
      { driver = "wal_logical" })
    client = c
    insert(t, 1)
    H.sql("UPDATE " .. t .. " SET id = 5 WHERE id = 1")
    H.sql("UPDATE " .. t .. " SET a = 7 WHERE id = 5")
    H.wait(c, events, 4)
    H.settle(c)
    local got = {}
    for i, ev in ipairs(events) do got[i] = { op = ev.op, new = ev.new, old = ev.old } end
    assert.same({
      { op = "insert", new = { a = 10 } },
      { op = "delete", old = { a = 10 } },
      { op = "insert", new = { a = 10 } },
      { op = "update", new = { a = 7 }, old = { a = 10 } },
    }, got)
    assert.equal(events[2].id .. ".1", events[3].id)
  end)

  it("converts every column while a backfill of the table runs, and masks again once it is done", function()
    local t = wide()
    for i = 1, 50 do insert(t, i) end
    local c = assert(flash.client { driver = "wal_logical" })
    client = c
    local l = assert(c:listen { table = t, fields = { "id", "a" } })
    local got, done = {}, false
    l:on("all", function(ev) got[#got + 1] = ev end)
    l:backfill { chunk = 10, on_done = function() done = true end }
    assert(c:start())
    local deadline, next_id = core.now() + 30, 100
    while not done and core.now() < deadline do
      assert(c:poll(0.05))
      if not done then insert(t, next_id) next_id = next_id + 1 end
    end
    assert.is_true(done)
    -- Until then every row of the stream was converted whole.
    local live = 0
    for _, ev in ipairs(got) do if ev.op ~= "read" then live = live + 1 end end
    assert.is_true(live > 0)
    assert.equal(live * 10, converted(c))
    for _, ev in ipairs(got) do
      assert.same({ id = (ev.new or ev.old).id, a = (ev.new or ev.old).a }, ev.new or ev.old)
    end
    -- The first row after the backfill is converted whole (the mask is computed again on
    -- it); the loop above may have inserted it already, so one row goes first.
    H.settle(c, 0.2)
    local n = #got
    insert(t, 999)
    H.wait(c, got, n + 1)
    local before
    before, n = converted(c), #got
    for i = 1, 5 do insert(t, 1000 + i) end
    H.wait(c, got, n + 5)
    assert.equal(n + 5, #got)
    assert.equal(5 * 2, converted(c) - before)
  end)
end)
