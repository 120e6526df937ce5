-- The shared-trigger drivers: trigger_global (one row trigger per table for every listener)
-- and trigger_statement (statement triggers with transition tables). Their event content is
-- spec/10-events_spec.lua's (run over every driver); here: what is particular to them, and
-- the Drivers rules of API.md (isolation, crashes, reconnects, cleanup) for each.
local flash = require "flash"
local core = require "flash.core"
local H = require "helpers"

local function triggers(t)
  return tonumber(H.scalar("SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal", t))
end

-- The backend pid of a client's connection (its default schema is flash_<pid>).
local function backend_pid(client)
  return tonumber(client:stats().schema:match("^flash_(%d+)$"))
end

local function schema_exists(name)
  return tonumber(H.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = $1", name)) == 1
end

local function ids(events, side)
  local out = {}
  for i, ev in ipairs(events) do out[i] = ev.op .. ":" .. tostring((ev[side or (ev.new and "new" or "old")] or {}).id) end
  return out
end

describe("trigger_global", function()
  local client
  after_each(function()
    if client then client:stop() client = nil end
  end)

  it("keeps one row trigger per table whatever the number of listeners and operations", function()
    local t = H.table("id int PRIMARY KEY, kind text, v text")
    client = assert(flash.client { driver = "trigger_global" })
    local got = {}
    local function collect(name) return function(ev) got[#got + 1] = name .. ":" .. ev.op end end
    assert(client:listen { table = t }):on("insert", collect("a"))
    assert(client:listen { table = t, fields = { "id", "v" } }):on({ "update", "delete" }, collect("b"))
    local c = assert(client:listen { table = t, where = { kind = "x" } })
    c:on("all", collect("c"))
    assert(client:start())
    -- insert/update/delete share one row trigger; truncate (wanted by c) is a statement one.
    assert.equal(2, triggers(t))
    assert.equal(1, tonumber(H.scalar([[SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::regclass
      AND NOT tgisinternal AND tgtype & 1 = 1]], t)))   -- TRIGGER_TYPE_ROW
    -- More listeners and callbacks at run time create no trigger.
    assert(client:listen { table = t, fields = { "kind" } }):on("all", collect("d"))
    c:on("insert", function() end)
    assert.equal(2, triggers(t))
    H.sql("INSERT INTO " .. t .. " VALUES (1, 'x', 'one')")
    H.sql("UPDATE " .. t .. " SET v = 'two'")
    H.sql("DELETE FROM " .. t)
    H.wait(client, got, 8)
    H.settle(client)
    assert.same({ "a:insert", "c:insert", "d:insert", "b:update", "c:update", "b:delete", "c:delete", "d:delete" }, got)
    client:stop()
    client = nil
    assert.equal(0, triggers(t))
    assert.equal(0, H.leftovers())
  end)

  it("delivers no callback for an operation nobody listens to, and sends none", function()
    local t = H.table("id int, v text")
    local c, events, l = H.listen({ table = t }, "insert", { driver = "trigger_global" })
    client = c
    H.sql("INSERT INTO " .. t .. " VALUES (1, 'a')")
    H.sql("UPDATE " .. t .. " SET v = 'b'")
    H.sql("DELETE FROM " .. t)
    H.sql("TRUNCATE " .. t)
    H.sql("INSERT INTO " .. t .. " VALUES (2, 'c')")
    H.wait(client, events, 2)
    H.settle(client)
    assert.same({ "insert:1", "insert:2" }, ids(events))
    -- Operations nobody wants are not even captured: two rows for two inserts.
    assert.equal(2, client:stats().captured)
    assert.equal("INSERT", H.scalar([[SELECT array_to_string(ARRAY(SELECT e FROM unnest(ARRAY['INSERT', 'UPDATE',
      'DELETE']) e WHERE pg_get_triggerdef(t.oid) LIKE '%AFTER%' || e || '%'), ',') FROM pg_trigger t
      WHERE tgrelid = $1::regclass AND NOT tgisinternal]], t))
    -- Wanting updates at run time replaces the one trigger with one that captures them too.
    l:on("update", function(ev) events[#events + 1] = ev end)
    assert.equal(1, triggers(t))
    H.sql("UPDATE " .. t .. " SET v = 'd'")
    H.wait(client, events, 3)
    assert.same({ "insert:1", "insert:2", "update:2" }, ids(events))
  end)

  it("names its triggers per table and instance, within 63 bytes, for long and odd names", function()
    local long = string.rep("é", 28) .. "_x"        -- 58 bytes
    H.sql(string.format('DROP TABLE IF EXISTS "%s"; CREATE TABLE "%s" (id int)', long, long))
    local events
    client, events = H.listen({ table = '"' .. long .. '"' }, "all", { driver = "trigger_global" })
    local names = H.sql([[SELECT tgname::text AS name FROM pg_trigger WHERE tgrelid = $1::regclass
      AND NOT tgisinternal ORDER BY 1]], '"' .. long .. '"')
    assert.equal(2, #names)
    -- (A name cut inside a character would not be valid UTF-8: creating it would fail.)
    for _, r in ipairs(names) do
      assert.is_true(#r.name <= 63)
      assert.truthy(r.name == client:stats().schema .. "_row" or r.name == client:stats().schema .. "_truncate", r.name)
    end
    H.sql(string.format('INSERT INTO "%s" VALUES (1)', long))
    H.wait(client, events, 1)
    assert.equal("public." .. long, events[1].table)
    client:stop()
    client = nil
    H.sql(string.format('DROP TABLE "%s"', long))
    assert.equal(0, H.leftovers())
  end)
  -- A partitioned table and one of its partitions, both listened: the partition already has
  -- the partitioned table's row trigger (PostgreSQL clones it, name and arguments), so it
  -- cannot take one of the same name for itself; the partitioned table's is named apart.
  for _, order in ipairs({ "parent first", "partition first" }) do
    it("delivers to a partitioned table's listener and its partition's, each event once (" .. order .. ")", function()
      local gp = H.table("id int PRIMARY KEY, v text) PARTITION BY RANGE (id")
      H.sql(string.format("DROP TABLE IF EXISTS %s_a, %s_b CASCADE", gp, gp))
      H.sql("CREATE TABLE " .. gp .. "_a PARTITION OF " .. gp .. " FOR VALUES FROM (0) TO (100); " ..
        "CREATE TABLE " .. gp .. "_b PARTITION OF " .. gp .. " FOR VALUES FROM (100) TO (200)")
      local P, A, B = "public." .. gp, "public." .. gp .. "_a", "public." .. gp .. "_b"
      client = assert(flash.client { driver = "trigger_global" })
      local got = { [P] = {}, [A] = {} }
      local off = {}
      local function listen(t)
        local l = assert(client:listen { table = t })
        off[t] = l:on("all", function(ev)
          local row = (ev.new ~= nil and ev.new ~= flash.null) and ev.new or ev.old
          got[t][#got[t] + 1] = string.format("%s %s %s %s", ev.op, ev.table, ev.source, tostring(row and row.v))
        end)
      end
      local first, second = P, A
      if order == "partition first" then first, second = A, P end
      listen(first)
      assert(client:start())
      listen(second)   -- at run time: the failing case made its trigger here
      H.sql("INSERT INTO " .. gp .. " VALUES (1, 'a1')")
      H.sql("INSERT INTO " .. gp .. " VALUES (101, 'b1')")
      H.sql("INSERT INTO " .. gp .. "_a VALUES (2, 'a2')")
      H.sql("INSERT INTO " .. gp .. "_b VALUES (102, 'b2')")
      H.sql("UPDATE " .. gp .. " SET v = 'a1+' WHERE id = 1")
      H.sql("UPDATE " .. gp .. " SET v = 'b1+' WHERE id = 101")
      H.sql("UPDATE " .. gp .. "_a SET v = 'a2+' WHERE id = 2")
      H.sql("UPDATE " .. gp .. "_b SET v = 'b2+' WHERE id = 102")
      H.sql("DELETE FROM " .. gp .. " WHERE id = 1")
      H.sql("DELETE FROM " .. gp .. " WHERE id = 101")
      H.sql("DELETE FROM " .. gp .. "_a WHERE id = 2")
      H.sql("DELETE FROM " .. gp .. "_b WHERE id = 102")
      H.wait(client, got[P], 12)
      H.settle(client)
      assert.same({
        "insert " .. P .. " " .. A .. " a1", "insert " .. P .. " " .. B .. " b1",
        "insert " .. P .. " " .. A .. " a2", "insert " .. P .. " " .. B .. " b2",
        "update " .. P .. " " .. A .. " a1+", "update " .. P .. " " .. B .. " b1+",
        "update " .. P .. " " .. A .. " a2+", "update " .. P .. " " .. B .. " b2+",
        "delete " .. P .. " " .. A .. " a1+", "delete " .. P .. " " .. B .. " b1+",
        "delete " .. P .. " " .. A .. " a2+", "delete " .. P .. " " .. B .. " b2+",
      }, got[P])
      assert.same({
        "insert " .. A .. " " .. A .. " a1", "insert " .. A .. " " .. A .. " a2",
        "update " .. A .. " " .. A .. " a1+", "update " .. A .. " " .. A .. " a2+",
        "delete " .. A .. " " .. A .. " a1+", "delete " .. A .. " " .. A .. " a2+",
      }, got[A])
      -- The listener made second stops wanting events; the first goes on as before.
      off[second]()
      got[P], got[A] = {}, {}
      H.sql("INSERT INTO " .. gp .. " VALUES (3, 'a3')")
      H.sql("INSERT INTO " .. gp .. " VALUES (103, 'b3')")
      H.sql("INSERT INTO " .. gp .. "_a VALUES (4, 'a4')")
      H.wait(client, got[first], first == P and 3 or 2)
      H.settle(client)
      if first == P then
        assert.same({ "insert " .. P .. " " .. A .. " a3", "insert " .. P .. " " .. B .. " b3",
          "insert " .. P .. " " .. A .. " a4" }, got[P])
      else
        assert.same({ "insert " .. A .. " " .. A .. " a3", "insert " .. A .. " " .. A .. " a4" }, got[A])
      end
      assert.same({}, got[second])
      client:stop()
      client = nil
      H.sql("DROP TABLE " .. gp)
      assert.equal(0, H.leftovers())
    end)
  end
end)

describe("trigger_statement", function()
  local client
  after_each(function()
    if client then client:stop() client = nil end
  end)

  it("delivers exactly 100,000 events with their values for each of a 100,000-row INSERT, UPDATE and DELETE", function()
    local N = 100000
    local t = H.table("id int PRIMARY KEY, v text, n numeric, b bytea")
    local events
    client, events = H.listen({ table = t }, "all", { driver = "trigger_statement" })
    local function check(sql, verify)
      for i = #events, 1, -1 do events[i] = nil end
      local rows, n = H.writer():query(sql)
      assert.truthy(rows, n)
      assert.equal(N, n)
      H.wait(client, events, N, 30)
      H.settle(client, 0.1)
      assert.equal(N, #events)
      local seen, bad = {}, nil
      for i, ev in ipairs(events) do
        local why = verify(i, ev)
        local id = (ev.new or ev.old).id
        if seen[id] then why = why or "id twice" end
        seen[id] = true
        if why and not bad then bad = string.format("event %d (%s): %s", i, ev.op, why) end
      end
      assert.is_nil(bad)
    end
    check("INSERT INTO " .. t .. " SELECT g, 'v' || g, g * 1.5, '\\x00ff' FROM generate_series(1, " .. N .. ") g",
      function(i, ev)
        local r = ev.new
        if ev.op ~= "insert" or ev.old then return "not an insert" end
        -- INSERT ... SELECT writes in the SELECT's order: events come in statement order.
        if r.id ~= i or r.v ~= "v" .. i or tonumber(r.n) ~= i * 1.5 or r.b ~= "\0\255" then
          return "values " .. tostring(r.id)
        end
      end)
    check("UPDATE " .. t .. " SET v = v || '!', n = n + 1", function(_, ev)
      local o, n = ev.old, ev.new
      if ev.op ~= "update" then return "not an update" end
      if o.id ~= n.id or n.v ~= "v" .. n.id .. "!" or o.v ~= "v" .. o.id then return "pairing " .. o.id end
      if tonumber(n.n) ~= tonumber(o.n) + 1 then return "numeric" end
    end)
    check("DELETE FROM " .. t, function(_, ev)
      if ev.op ~= "delete" or ev.new then return "not a delete" end
      if ev.old.v ~= "v" .. ev.old.id .. "!" then return "values" end
    end)
    assert.equal(0, tonumber(H.scalar("SELECT count(*) FROM " .. t)))
  end)

  it("pairs old and new rows of an UPDATE that changes primary keys", function()
    -- Pairing by key would pair old id 1 with new id 1, which is old id 5's new version.
    local t = H.table("id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED, v text")
    H.sql("INSERT INTO " .. t .. " SELECT g, 'v' || g FROM generate_series(1, 5) g")
    local events
    client, events = H.listen({ table = t }, "update", { driver = "trigger_statement" })
    H.sql("UPDATE " .. t .. " SET id = 6 - id")
    H.wait(client, events, 5)
    assert.equal(5, #events)
    for _, ev in ipairs(events) do
      assert.equal(6 - ev.old.id, ev.new.id)
      assert.equal("v" .. ev.old.id, ev.new.v)
      assert.equal(ev.old.v, ev.new.v)
    end
  end)

  it("pairs rows of a table without a primary key, identical rows included", function()
    local t = H.table("k int, v text")
    H.sql("INSERT INTO " .. t .. " VALUES (1, 'a'), (1, 'a'), (2, 'b'), (3, NULL)")
    local events
    client, events = H.listen({ table = t }, "update", { driver = "trigger_statement" })
    H.sql("UPDATE " .. t .. " SET k = k * 10, v = upper(v)")
    H.wait(client, events, 4)
    H.settle(client)
    assert.equal(4, #events)
    local pairs_seen = {}
    for i, ev in ipairs(events) do
      pairs_seen[i] = string.format("%d/%s>%d/%s", ev.old.k, tostring(ev.old.v), ev.new.k, tostring(ev.new.v))
    end
    table.sort(pairs_seen)
    assert.same({ "1/a>10/A", "1/a>10/A", "2/b>20/B", "3/" .. tostring(flash.null) .. ">30/" .. tostring(flash.null) },
      pairs_seen)
  end)

  it("turns a primary_key change into a delete then an insert, row by row in statement order", function()
    local t = H.table("id int PRIMARY KEY, v text")
    H.sql("INSERT INTO " .. t .. " VALUES (1, 'a'), (2, 'b')")
    local events
    client, events = H.listen({ table = t, primary_key = { "id" } }, "all", { driver = "trigger_statement" })
    H.sql("UPDATE " .. t .. " SET id = id + 10 WHERE id = 1")
    H.sql("UPDATE " .. t .. " SET v = 'c' WHERE id = 2")
    H.wait(client, events, 3)
    H.settle(client)
    assert.same({ "delete:1", "insert:11", "update:2" }, ids(events))
  end)

  it("captures a statement's rows once, whatever the listeners", function()
    local t = H.table("id int, v text")
    client = assert(flash.client { driver = "trigger_statement" })
    local a, b = {}, {}
    assert(client:listen { table = t }):on("insert", function(ev) a[#a + 1] = ev end)
    assert(client:listen { table = t, fields = { "v" }, where = { { "id", ">", 1 } } }):on("insert", function(ev) b[#b + 1] = ev end)
    assert(client:start())
    -- insert, and update: an update that enters b's condition is an insert for b.
    assert.equal(2, triggers(t))
    H.sql("INSERT INTO " .. t .. " SELECT g, 'v' || g FROM generate_series(1, 3) g")
    H.wait(client, b, 2)
    H.settle(client)
    assert.equal(3, client:stats().captured)
    assert.same({ 1, 2, 3 }, { a[1].new.id, a[2].new.id, a[3].new.id })
    assert.same({ { v = "v2" }, { v = "v3" } }, { b[1].new, b[2].new })
  end)

  it("delivers a statement's large rows (past NOTIFY's 8000 bytes) whole", function()
    local t = H.table("id int, body text")
    local events
    client, events = H.listen({ table = t }, "insert", { driver = "trigger_statement" })
    H.sql("INSERT INTO " .. t .. " SELECT g, repeat(chr(64 + g), 3000 * g) FROM generate_series(1, 12) g")
    H.wait(client, events, 12)
    assert.equal(12, #events)
    for i, ev in ipairs(events) do
      assert.equal(i, ev.new.id)
      assert.equal(string.rep(string.char(64 + i), 3000 * i), ev.new.body)
    end
    -- Handled rows leave the events table with the next poll.
    H.settle(client, 0.1)
    assert.equal(0, tonumber(H.scalar("SELECT count(*) FROM " .. client:stats().schema .. ".events")))
  end)
end)

for _, driver in ipairs({ "trigger_global", "trigger_statement" }) do
describe("Drivers rules (" .. driver .. ")", function()
  local clients = {}
  local function new_client(opts)
    opts = opts or {}
    opts.driver = driver
    local c = assert(flash.client(opts))
    clients[#clients + 1] = c
    return c
  end
  after_each(function()
    for _, c in ipairs(clients) do c:stop() end
    clients = {}
  end)

  it("runs two instances on one table side by side; stopping one leaves the other intact", function()
    local t = H.table("id int, v text")
    local a, b = new_client(), new_client()
    local ea, eb = {}, {}
    assert(a:listen { table = t }):on("insert", function(ev) ea[#ea + 1] = ev.new.id end)
    assert(b:listen { table = t }):on("insert", function(ev) eb[#eb + 1] = ev.new.id end)
    assert(a:start())
    assert(b:start())
    assert.are_not.equal(a:stats().schema, b:stats().schema)
    assert.equal(2, triggers(t))
    H.sql("INSERT INTO " .. t .. " VALUES (1, 'both')")
    H.wait(a, ea, 1)
    H.wait(b, eb, 1)
    a:stop()
    assert.equal(1, triggers(t))
    H.sql("INSERT INTO " .. t .. " VALUES (2, 'only b')")
    H.wait(b, eb, 2)
    assert.same({ 1 }, ea)
    assert.same({ 1, 2 }, eb)
    b:stop()
    assert.equal(0, triggers(t))
    assert.equal(0, H.leftovers())
  end)

  it("keeps writers working after a crash, and the next start removes what the dead instance left", function()
    local t, other = H.table("id int, v text"), H.table("id int")
    local dead = new_client()
    assert(dead:listen { table = t }):on("all", function() end)
    assert(dead:start())
    local schema, bpid = dead:stats().schema, backend_pid(dead)
    local kpid = dead.driver.keeper:backend_pid()
    -- Both of its sessions end without any cleanup: what the server sees of a kill -9.
    assert.is_true(H.scalar("SELECT pg_terminate_backend($1) AND pg_terminate_backend($2) AS ok", bpid, kpid))
    local deadline = core.now() + 5
    while core.now() < deadline and
      tonumber(H.scalar("SELECT count(*) FROM pg_stat_activity WHERE pid IN ($1, $2)", bpid, kpid)) > 0 do
      core.sleep(0.05)
    end
    assert.is_true(schema_exists(schema))
    -- "all": one row and one truncate trigger, or a statement trigger per operation.
    assert.equal(driver == "trigger_global" and 2 or 4, triggers(t))
    -- Writers keep working through the orphan triggers, a row over NOTIFY's limit included.
    H.sql("INSERT INTO " .. t .. " VALUES (1, repeat('x', 12000))")
    H.sql("UPDATE " .. t .. " SET v = 'y'")
    H.sql("TRUNCATE " .. t)
    local lines = {}
    local old = flash.log.set_sink(function(line) lines[#lines + 1] = line end)
    local fresh = new_client()
    assert(fresh:listen { table = other }):on("insert", function() end)
    local ok, err = fresh:start()
    dead:stop()   -- finds its connection gone; nothing of it is left to remove
    flash.log.set_sink(old)
    assert(ok, err)
    assert.matches("removing schema " .. schema .. " left by a flashlua instance that is gone", table.concat(lines, "\n"))
    assert.is_false(schema_exists(schema))
    assert.equal(0, triggers(t))
    fresh:stop()
    assert.equal(0, H.leftovers())
  end)

  it("reconnects after pg_terminate_backend, loses nothing written meanwhile and keeps delivering", function()
    local t = H.table("id int, v text")
    local c = new_client()
    local events = {}
    assert(c:listen { table = t, fields = { "id" } }):on("insert", function(ev) events[#events + 1] = ev.new.id end)
    assert(c:start())
    local lines = {}
    local old = flash.log.set_sink(function(line) lines[#lines + 1] = line end)
    local ok, err = pcall(function()
      H.sql("INSERT INTO " .. t .. " VALUES (1, 'before')")
      H.wait(c, events, 1)
      assert.is_true(H.scalar("SELECT pg_terminate_backend($1) AS ok", backend_pid(c)))
      H.sql("INSERT INTO " .. t .. " VALUES (2, 'meanwhile')")
      local deadline = core.now() + 10
      while core.now() < deadline and c:stats().reconnects == 0 do assert(c:poll(0.05)) end
      H.sql("INSERT INTO " .. t .. " VALUES (3, 'after')")
      H.wait(c, events, 3)
    end)
    flash.log.set_sink(old)
    assert(ok, err)
    assert.same({ 1, 2, 3 }, events)
    local text = table.concat(lines, "\n")
    assert.matches("connection to PostgreSQL lost", text)
    assert.matches("reconnected; nothing was lost", text)
    -- One set of triggers, not two.
    assert.equal(1, triggers(t))
  end)

  it("creates triggers only while a callback wants them, and stop removes every object", function()
    local t = H.table("id int, v text")
    local c = new_client()
    local events = {}
    local l = assert(c:listen { table = t })
    assert(c:start())
    assert.equal(0, triggers(t))
    local off = l:on({ "insert", "truncate" }, function(ev) events[#events + 1] = ev.op end)
    assert.equal(2, triggers(t))
    H.sql("INSERT INTO " .. t .. " VALUES (1, 'a')")
    H.sql("TRUNCATE " .. t)
    H.wait(c, events, 2)
    off()
    assert.equal(0, triggers(t))
    H.sql("INSERT INTO " .. t .. " VALUES (2, 'b')")
    H.settle(c, 0.2)
    assert.same({ "insert", "truncate" }, events)
    c:stop()
    assert.equal(0, H.leftovers())
  end)

  it("evaluates conditions as SQL does on the column's type, not on text or doubles", function()
    local t = H.table("id int, big bigint, ts timestamptz, amount numeric, tag text")
    local c = new_client()
    local got, exact = {}, {}
    assert(c:listen { table = t, fields = { "id" }, where = {
      { "big", ">", 900 }, { "ts", ">=", "2026-01-02 00:00:00+00" },
      { "amount", "<", "10" }, { "tag", "in", { "a", "b" } } } }):on("insert", function(ev) got[#got + 1] = ev.new.id end)
    assert(c:listen { table = t, fields = { "id" }, where = { big = "9007199254740993" } })
      :on("insert", function(ev) exact[#exact + 1] = ev.new.id end)
    assert(c:start())
    -- As text, 1000 > 900 and 9.99 < 10 are false; as doubles, 2^53 + 1 = 2^53.
    H.sql("INSERT INTO " .. t .. [[ VALUES
      (1, 1000, '2026-01-02 00:00:00+00', 9.99, 'a'),
      (2, 900, '2026-01-02 00:00:00+00', 9.5, 'a'),
      (3, 1000, '2026-01-01 23:59:59+00', 9.5, 'a'),
      (4, 1000, '2026-01-01 20:00:00-05', 9.5, 'b'),
      (5, 1000, '2026-01-02 00:00:00+00', 10.0, 'a'),
      (6, 1000, '2026-01-02 00:00:00+00', 9.5, 'c'),
      (7, 9007199254740993, '2026-01-03 00:00:00+00', 2, 'a'),
      (8, 9007199254740992, '2026-01-03 00:00:00+00', 2, 'a')]])
    H.wait(c, got, 4)
    H.settle(c)
    assert.same({ 1, 4, 7, 8 }, got)
    assert.same({ 7 }, exact)
  end)
end)
end

describe("a callback that stops its client", function()
  for _, driver in ipairs({ "trigger", "trigger_global", "trigger_statement" }) do
    it("ends the delivery there, in order, and poll reports the stop (" .. driver .. ")", function()
      local t = H.table("id int")
      local c = assert(flash.client { driver = driver })
      local seen = {}
      assert(c:listen { table = t }):on("insert", function(ev)
        seen[#seen + 1] = ev.new.id
        if ev.new.id == 2 then assert(c:stop()) end
      end)
      assert(c:start())
      -- Rows 3..5 share row 2's notification under trigger_statement; row 6 comes after.
      H.sql("INSERT INTO " .. t .. " SELECT g FROM generate_series(1, 5) g")
      H.sql("INSERT INTO " .. t .. " VALUES (6)")
      local ok, err
      for _ = 1, 40 do
        ok, err = c:poll(0.05)
        if not ok then break end
      end
      assert.same({ 1, 2 }, seen)
      assert.is_nil(ok)
      assert.equal("client is stopped", err)
      assert.equal(0, H.leftovers())
    end)
  end
end)

describe("on() and off() while the connection is gone", function()
  for _, driver in ipairs({ "trigger", "trigger_global", "trigger_statement" }) do
    it("raise nothing and take effect with the reconnect (" .. driver .. ")", function()
      local t = H.table("id int")
      local c = assert(flash.client { driver = driver })
      local events = {}
      local l = assert(c:listen { table = t })
      local off = l:on("insert", function(ev) events[#events + 1] = ev.op end)
      assert(c:start())
      local bpid = backend_pid(c)
      local lines = {}
      local old = flash.log.set_sink(function(line) lines[#lines + 1] = line end)
      local ok, err = pcall(function()
        assert.is_true(H.scalar("SELECT pg_terminate_backend($1) AS ok", bpid))
        local deadline = core.now() + 5
        while core.now() < deadline and
          tonumber(H.scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", bpid)) > 0 do core.sleep(0.05) end
        -- The driver has not noticed yet: off() meets the dead connection.
        off()
        l:on("delete", function(ev) events[#events + 1] = ev.op end)
        deadline = core.now() + 10
        while core.now() < deadline and c:stats().reconnects == 0 do assert(c:poll(0.05)) end
      end)
      flash.log.set_sink(old)
      assert(ok, err)
      assert.equal(1, c:stats().reconnects)
      -- What the instance had for inserts is gone; one trigger serves the deletes.
      assert.equal(1, triggers(t))
      H.sql("INSERT INTO " .. t .. " VALUES (1)")
      H.sql("DELETE FROM " .. t)
      H.wait(c, events, 1)
      H.settle(c, 0.2)
      assert.same({ "delete" }, events)
      c:stop()
      assert.equal(0, H.leftovers())
    end)
  end
end)
