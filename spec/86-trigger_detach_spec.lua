-- spec/86-trigger_detach_spec.lua: under the trigger drivers, rows written to a partition (at
-- any depth) or an INHERITS child reach the listened table's listeners even when the
-- partition or child is detached (DETACH PARTITION, NO INHERIT) -- or detached and dropped --
-- before flashlua reads them: the trigger that captured a row says which listened table it
-- was captured for (docs/drivers.md "Detached partitions and children"). Before, the
-- listened table was looked up in the catalog as it was when the row was read, and such
-- rows were dropped without a word.
local flash = require "flash"
local core = require "flash.core"
local H = require "spec.helpers"

local TRIGGER_DRIVERS = { "trigger", "trigger_global", "trigger_statement" }

-- flashlua runs as a superuser (the DDL event trigger records every table's columns in the
-- stream) and as a role without it, owning the tables (the columns come from the catalog,
-- and a persistent schema keeps those of the relations it captured from).
local ROLE = "flash_spec_detach"
local AS = {
  { name = "superuser", dsn = H.dsn },
  { name = "without superuser", dsn = (H.dsn:gsub("user=%S+", "")) .. " user=" .. ROLE, role = ROLE },
}

-- "op table source v" of each event.
local function shown(events)
  local out = {}
  for i, ev in ipairs(events) do
    local row = (ev.new ~= nil and ev.new ~= flash.null) and ev.new or ev.old
    out[i] = string.format("%s %s %s %s", ev.op, ev.table, ev.source, tostring(row and row.v))
  end
  return out
end

-- A partitioned table t: t_a [0, 100), t_b [100, 200) itself partitioned (t_b1, its only
-- partition), t_c [200, 300), t_d [300, 400); and a table p with an INHERITS child p_c.
local function tables(role)
  local t = H.table("id int PRIMARY KEY, v text) PARTITION BY RANGE (id")
  local p = H.table("id int PRIMARY KEY, v text")
  -- Names another spec file may have left as tables of their own (busted loads the
  -- helpers afresh for each file, so their table names come round again; H.table drops
  -- the parent, not a partition detached from it).
  H.sql(string.format("DROP TABLE IF EXISTS %s_a, %s_b, %s_b1, %s_c, %s_d, %s_c CASCADE", t, t, t, t, t, p))
  H.sql("CREATE TABLE " .. t .. "_a PARTITION OF " .. t .. " FOR VALUES FROM (0) TO (100); " ..
    "CREATE TABLE " .. t .. "_b PARTITION OF " .. t .. " FOR VALUES FROM (100) TO (200) PARTITION BY RANGE (id); " ..
    "CREATE TABLE " .. t .. "_b1 PARTITION OF " .. t .. "_b FOR VALUES FROM (100) TO (200); " ..
    "CREATE TABLE " .. t .. "_c PARTITION OF " .. t .. " FOR VALUES FROM (200) TO (300); " ..
    "CREATE TABLE " .. t .. "_d PARTITION OF " .. t .. " FOR VALUES FROM (300) TO (400)")
  H.sql("CREATE TABLE " .. p .. "_c (PRIMARY KEY (id)) INHERITS (" .. p .. ")")
  if role then
    for _, name in ipairs({ t, t .. "_a", t .. "_b", t .. "_b1", t .. "_c", t .. "_d", p, p .. "_c" }) do
      H.sql("ALTER TABLE " .. name .. " OWNER TO " .. role)
    end
  end
  return t, p
end

-- Writes to every partition and the child by name (so every driver says the same source),
-- then detaches t_a, t_b (with t_b1 under it) and p_c, and detaches and drops t_d.
local function write_and_detach(t, p)
  H.sql("INSERT INTO " .. t .. "_a VALUES (1, 'a1'), (2, 'a2')")
  H.sql("UPDATE " .. t .. "_a SET v = 'a1 again' WHERE id = 1")
  H.sql("DELETE FROM " .. t .. "_a WHERE id = 2")
  H.sql("INSERT INTO " .. t .. "_b1 VALUES (150, 'b1')")
  H.sql("UPDATE " .. t .. "_b1 SET v = 'b1 again'")
  H.sql("DELETE FROM " .. t .. "_b1 WHERE id = 150")
  H.sql("INSERT INTO " .. t .. "_d VALUES (350, 'd1')")
  H.sql("INSERT INTO " .. p .. "_c VALUES (7, 'c1')")
  H.sql("UPDATE " .. p .. "_c SET v = 'c1 again'")
  H.sql("ALTER TABLE " .. t .. " DETACH PARTITION " .. t .. "_a")
  H.sql("ALTER TABLE " .. t .. " DETACH PARTITION " .. t .. "_b")
  H.sql("ALTER TABLE " .. t .. " DETACH PARTITION " .. t .. "_d; DROP TABLE " .. t .. "_d")
  H.sql("ALTER TABLE " .. p .. "_c NO INHERIT " .. p)
end

-- The events write_and_detach's rows give.
local function expected(t, p)
  local T, P = "public." .. t, "public." .. p
  return {
    "insert " .. T .. " " .. T .. "_a a1", "insert " .. T .. " " .. T .. "_a a2",
    "update " .. T .. " " .. T .. "_a a1 again", "delete " .. T .. " " .. T .. "_a a2",
    "insert " .. T .. " " .. T .. "_b1 b1", "update " .. T .. " " .. T .. "_b1 b1 again",
    "delete " .. T .. " " .. T .. "_b1 b1 again",
    "insert " .. T .. " " .. T .. "_d d1",
    "insert " .. P .. " " .. P .. "_c c1", "update " .. P .. " " .. P .. "_c c1 again",
  }
end

for _, driver in ipairs(TRIGGER_DRIVERS) do for _, as in ipairs(AS) do
  describe("detached partitions and children (" .. driver .. ", " .. as.name .. ")", function()
    local client, schema
    setup(function()
      H.sql(string.format([[DO $$ BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '%s') THEN CREATE ROLE %s LOGIN NOSUPERUSER; END IF;
      END $$; GRANT CREATE ON DATABASE postgres TO %s]], ROLE, ROLE, ROLE))
    end)
    after_each(function()
      if client then client:stop() client = nil end
      if schema then H.sql("DROP SCHEMA IF EXISTS " .. schema .. " CASCADE") schema = nil end
    end)

    it("delivers the rows written before a detach (or a detach and a drop) that it reads after", function()
      local t, p = tables(as.role)
      local c = assert(flash.client { driver = driver, dsn = as.dsn })
      client = c
      local events = {}
      for _, name in ipairs({ t, p }) do
        assert(c:listen { table = name }):on("all", function(ev) events[#events + 1] = ev end)
      end
      assert(c:start())
      -- The client does not poll meanwhile; its next look at the catalog (every 2 s) comes
      -- before it reads the rows: t_a, t_b1, t_d and p_c are no longer under t or p then.
      write_and_detach(t, p)
      core.sleep(2.2)
      H.wait(c, events, 10, 15)
      H.settle(c, 0.3)
      assert.same(expected(t, p), shown(events))
      assert.is_nil(events[8].columns_uncertain)
      -- A partition made, written (through t), detached and dropped between two looks: a
      -- superuser's DDL event trigger recorded its name and columns; without it they are gone,
      -- and its rows are decoded by t's columns (which PARTITION OF gave it), saying so.
      -- Under trigger_statement the row is t's (the statement named t).
      H.sql("CREATE TABLE " .. t .. "_e PARTITION OF " .. t .. " FOR VALUES FROM (400) TO (500)")
      local e_oid = H.scalar("SELECT $1::regclass::oid::bigint", t .. "_e")
      H.sql("INSERT INTO " .. t .. " VALUES (450, 'e1')")
      H.sql("ALTER TABLE " .. t .. " DETACH PARTITION " .. t .. "_e; DROP TABLE " .. t .. "_e")
      local source = driver == "trigger_statement" and "public." .. t or
        (as.role and string.format("relation %d", e_oid) or "public." .. t .. "_e")
      H.wait(c, events, 11, 10)
      assert.same("insert public." .. t .. " " .. source .. " e1", shown(events)[11])
      assert.equal(as.role and driver ~= "trigger_statement" or nil, events[11].columns_uncertain)
      -- Written after the detach, once the client has looked: no longer the listened table's.
      assert.is_true(H.wait_for(function()
        c:poll(0.05)
        return H.capture(t .. "_a") == 0 and H.capture(p .. "_c") == 0
      end, 10))
      H.sql("INSERT INTO " .. t .. "_a VALUES (3, 'after')")
      H.sql("INSERT INTO " .. p .. "_c VALUES (8, 'after')")
      H.sql("INSERT INTO " .. t .. "_c VALUES (250, 'mark')")
      H.wait(c, events, 12, 10)
      H.settle(c, 0.3)
      assert.same("insert public." .. t .. " public." .. t .. "_c mark", shown(events)[12])
      assert.equal(12, #events)
    end)

    it("delivers, after a restart, the rows a persistent schema captured before a detach and a drop", function()
      local t, p = tables(as.role)
      schema = "flash_spec_detach_" .. driver .. (as.role and "_role" or "")
      local function run()
        local c = assert(flash.client { driver = driver, dsn = as.dsn, persistent = true, schema = schema })
        local events = {}
        for _, name in ipairs({ t, p }) do
          assert(c:listen { table = name }):on("all", function(ev) events[#events + 1] = ev end)
        end
        assert(c:start())
        return c, events
      end
      local c = run()
      client = c
      assert(c:stop())
      client = nil
      -- No client runs: the triggers capture, then the partitions and the child leave.
      write_and_detach(t, p)
      local events
      c, events = run()
      client = c
      H.wait(c, events, 10, 15)
      H.settle(c, 0.3)
      assert.same(expected(t, p), shown(events))
      assert.is_nil(events[8].columns_uncertain)
    end)
  end)
end end

-- wal_logical: an INHERITS child is added to the publication by name (partitions are covered
-- by their root's entry), so it stayed there after NO INHERIT and its rows went on arriving
-- as the listened table's for as long as flashlua ran. Now it leaves the publication at
-- flashlua's next look at the catalog, as the trigger drivers drop their triggers on it;
-- what was written to it before is still delivered.
describe("a child that leaves its listened parent (wal_logical)", function()
  local client
  after_each(function()
    if client then client:stop() client = nil end
  end)

  it("delivers its rows written before NO INHERIT, none written after flashlua looked", function()
    local p = H.table("id int PRIMARY KEY, v text")
    H.sql("DROP TABLE IF EXISTS " .. p .. "_c, " .. p .. "_d")
    H.sql("CREATE TABLE " .. p .. "_c (PRIMARY KEY (id)) INHERITS (" .. p .. "); " ..
      "CREATE TABLE " .. p .. "_d (PRIMARY KEY (id)) INHERITS (" .. p .. ")")
    for _, name in ipairs({ p, p .. "_c", p .. "_d" }) do H.sql("ALTER TABLE " .. name .. " REPLICA IDENTITY FULL") end
    local c = assert(flash.client { driver = "wal_logical" })
    client = c
    local events = {}
    assert(c:listen { table = p }):on("all", function(ev) events[#events + 1] = ev end)
    assert(c:start())
    local function in_publication(name)
      return H.scalar([[SELECT count(*)::int FROM pg_catalog.pg_publication_rel r
        JOIN pg_catalog.pg_publication b ON b.oid = r.prpubid WHERE b.pubname = $1 AND r.prrelid = $2::regclass]],
        c.driver.publication, name)
    end
    assert.equal(1, in_publication(p .. "_c"))
    H.sql("INSERT INTO " .. p .. "_c VALUES (1, 'before')")
    H.sql("ALTER TABLE " .. p .. "_c NO INHERIT " .. p)
    H.wait(c, events, 1, 10)
    assert.is_true(H.wait_for(function()
      c:poll(0.05)
      return in_publication(p .. "_c") == 0
    end, 10))
    assert.equal(1, in_publication(p .. "_d"))
    H.sql("INSERT INTO " .. p .. "_c VALUES (2, 'after')")
    H.sql("UPDATE " .. p .. "_c SET v = 'after again'")
    H.sql("INSERT INTO " .. p .. "_d VALUES (3, 'mark')")
    H.wait(c, events, 2, 10)
    H.settle(c, 0.3)
    local P = "public." .. p
    assert.same({ "insert " .. P .. " " .. P .. "_c before", "insert " .. P .. " " .. P .. "_d mark" }, shown(events))
  end)
end)
