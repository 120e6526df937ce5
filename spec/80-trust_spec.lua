-- spec/80-trust_spec.lua: what outsiders' workloads broke (issue 8), over every driver it
-- concerns: a user's write never fails because flashlua listens (two-phase commit, DDL on a
-- listened table), every committed row arrives with the table's current shape (DDL,
-- partitions, INHERITS children, replica-role writes, generated columns), and events arrive
-- while a script is busy with its own queries.
local core = require "flash.core"
local H = require "spec.helpers"

-- "op:id" of each event.
local function ids(events, col)
  local out = {}
  for i, ev in ipairs(events) do
    local row = ev.new or ev.old or {}
    out[i] = ev.op .. ":" .. tostring(row[col or "id"])
  end
  return out
end

-- Polls until an event whose row has id `mark` arrived (events come in commit order, so
-- everything before it is in by then), then returns the events before it.
local function until_mark(client, events, mark)
  local deadline = core.now() + 10
  while core.now() < deadline do
    for i, ev in ipairs(events) do
      local row = ev.new or ev.old
      if row and row.id == mark then
        local before = {}
        for j = 1, i - 1 do before[j] = events[j] end
        return before
      end
    end
    assert(client:poll(0.02))
  end
  error("marker " .. tostring(mark) .. " never arrived; got: " .. table.concat(ids(events), ", "))
end

for _, driver in ipairs(H.drivers) do
  local wal = driver == "wal_logical" or driver == "pg_extension"   -- WAL drivers: old rows need REPLICA IDENTITY FULL
  local copts = function() return { driver = driver, replica_identity = wal and "full" or nil } end

  describe("trust (" .. driver .. ")", function()
    local client
    after_each(function()
      if client then client:stop() client = nil end
    end)

    -- Two-phase commit, DDL, partitions, INHERITS children, replica-role writes, generated
    -- columns and empty containers are cells of the conformance matrix
    -- (spec/70-matrix_spec.lua), so docs/matrix.md shows them per driver.
    it("keeps ev.source, and hands a where function the listened fields only, with fields and where", function()
      local t = H.table("id int, v text, hidden text) PARTITION BY RANGE (id")
      H.sql("CREATE TABLE " .. t .. "_a PARTITION OF " .. t .. " FOR VALUES FROM (0) TO (100)")
      local seen = {}
      local events
      client, events = H.listen({ table = t, fields = { "id", "v" },
        where = function(row) seen[#seen + 1] = row.hidden == nil and row.v ~= nil return row.id ~= 2 end },
        "all", copts())
      H.sql("INSERT INTO " .. t .. " VALUES (1, 'a', 'h'), (2, 'b', 'h')")
      H.sql("UPDATE " .. t .. " SET v = 'c' WHERE id = 1")
      H.sql("INSERT INTO " .. t .. " VALUES (99, 'mark', 'h')")
      local got = until_mark(client, events, 99)
      assert.same({ "insert:1", "update:1" }, ids(got))
      -- trigger_statement: the table the statement named (docs/drivers.md).
      local where = driver == "trigger_statement" and "public." .. t or "public." .. t .. "_a"
      for _, ev in ipairs(got) do assert.equal(where, ev.source) end
      assert.same({ id = 1, v = "c" }, got[2].new)
      for i, ok in ipairs(seen) do assert.is_true(ok, "call " .. i .. " saw other columns") end
    end)

    it("delivers each of 200 rows written by 4 concurrent sessions, once", function()
      local t = H.table("id int PRIMARY KEY, v text")
      local events
      client, events = H.listen({ table = t }, "insert", copts())
      local conns = {}
      for i = 1, 4 do conns[i] = assert(core.connect(H.dsn)) end
      -- Interleaved open transactions, committed in another order than they began.
      for i = 1, 4 do assert(conns[i]:exec("BEGIN", 0)) end
      for k = 0, 49 do
        for i = 1, 4 do assert(conns[i]:exec("INSERT INTO " .. t .. " VALUES (" .. (k * 4 + i) .. ", 'x')", 0)) end
      end
      for _, i in ipairs({ 3, 1, 4, 2 }) do assert(conns[i]:exec("COMMIT", 0)) end
      for i = 1, 4 do conns[i]:close() end
      H.sql("INSERT INTO " .. t .. " VALUES (999, 'mark')")
      local got = until_mark(client, events, 999)
      assert.equal(200, #got)
      local seen = {}
      for _, ev in ipairs(got) do seen[ev.new.id] = (seen[ev.new.id] or 0) + 1 end
      for id = 1, 200 do assert.equal(1, seen[id], "id " .. id) end
      -- Rows of one transaction together, transactions in commit order.
      local order = {}
      for _, ev in ipairs(got) do
        local session = (ev.new.id - 1) % 4 + 1
        if order[#order] ~= session then order[#order + 1] = session end
      end
      assert.same({ 3, 1, 4, 2 }, order)
    end)
  end)
end

-- The trigger drivers' capture table is read by polling; nothing waits for a wake-up that a
-- script busy with its own queries would swallow.
for _, driver in ipairs(H.drivers) do
  describe("trust, as a process (" .. driver .. ")", function()
    it("delivers a change while the script runs queries from a timer, without a later write", function()
      local t = H.table("id int PRIMARY KEY, v text")
      if driver == "wal_logical" or driver == "pg_extension" then H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL") end
      local path = H.script(string.format([[
local flash = require "flash"
local client = assert(flash.client { driver = %q })
assert(client:listen { table = %q }):on("update", function(ev)
  io.write("update ", ev.new.v, "\n") io.stdout:flush()
end)
assert(client:start())
local n = 0
flash.every(0.02, function() n = n + 1 assert(client:query("SELECT pg_sleep(0.005)")) end)
flash.after(0.2, function() io.write("ready\n") io.stdout:flush() end)
flash.run()
]], driver, t))
      H.sql("INSERT INTO " .. t .. " VALUES (1, 'a')")
      local h = H.spawn({ path })
      assert.is_true(h.await("ready", 15), h.err())
      H.sql("UPDATE " .. t .. " SET v = 'seen' WHERE id = 1")
      assert.is_true(h.await("update seen", 10), "the event waited: " .. h.out() .. h.err())
      h.kill("TERM")
      assert.equal(0, h.wait(15), h.err())
      os.remove(path)
    end)
  end)
end

describe("conditions evaluated on arrival", function()
  it("order intervals exactly as PostgreSQL does (interval_cmp_value), on 400 pairs", function()
    local compare = require "flash.compare"
    local samples = { "0", "1 day", "24 hours", "-1 day", "1 mon", "30 days", "1 year", "360 days", "12 mons",
      "-1 mon +31 days", "1 year -1 day", "25:00:00", "-00:00:01", "00:00:00.000001", "-23:59:59.999999",
      "2562047788 hours", "-2562047788 hours", "178000000 years", "-178000000 years", "1 day -24 hours",
      "3 days 04:05:06.789", "-3 days -04:05:06.789", "29 days 23:59:59.999999", "1 mon -00:00:00.000001" }
    local list = {}
    for i, s in ipairs(samples) do list[i] = "('" .. s .. "'::interval)" end
    local rows = H.sql("SELECT a.v::text AS a, b.v::text AS b, CASE WHEN a.v < b.v THEN -1 WHEN a.v > b.v THEN 1 ELSE 0 END AS r " ..
      "FROM (VALUES " .. table.concat(list, ",") .. ") a(v), (VALUES " .. table.concat(list, ",") .. ") b(v)")
    assert.is_true(#rows >= 400)
    local bad = {}
    for _, r in ipairs(rows) do
      local got = compare.intervalcmp(r.a, r.b)
      if got ~= r.r then bad[#bad + 1] = string.format("%s vs %s: SQL %d, Lua %s", r.a, r.b, r.r, tostring(got)) end
    end
    assert.same({}, bad)
  end)
end)
