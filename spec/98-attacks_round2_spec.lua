-- spec/98-attacks_round2_spec.lua: a second round of attacks by other roles, beyond spec/81
-- and spec/92: a table's owner (no other privilege than CREATE on the database) whose
-- table a flashlua running as superuser listens to and backfills, and a role that makes
-- flashlua's objects before it does. Whatever they make must never run with flashlua's
-- privileges, nor make events go missing without a word.
local flash = require "flash"
local core = require "flash.core"
local H = require "spec.helpers"

local ROLE = "flash_owner98"
local owner_dsn = (H.dsn:gsub("user=%S+", "")) .. " user=" .. ROLE
local ME = H.scalar("SELECT current_user::text AS u")
local S = "own98_" .. core.getpid()     -- the owner's schema
local LOG = S .. ".log"

local function owner() return assert(core.connect(owner_dsn)) end

local function is_super()
  return H.scalar("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = $1", ROLE)
end

-- What of the owner's code ran as another role than the owner.
local function ran_as_other()
  local rows = H.sql("SELECT what FROM " .. LOG .. " WHERE who <> $1 ORDER BY what", ROLE)
  local t = {}
  for i, r in ipairs(rows) do t[i] = r.what end
  return t
end

local function setup_owner()
  H.sql(string.format([[DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '%s') THEN CREATE ROLE %s LOGIN NOSUPERUSER; END IF;
  END $$; ALTER ROLE %s NOSUPERUSER; GRANT CREATE ON DATABASE postgres TO %s]], ROLE, ROLE, ROLE, ROLE))
  local c = owner()
  -- pwn(what): logs who runs it and tries to make the owner superuser. f(): an immutable
  -- function of no arguments calling it, which PostgreSQL folds (runs) where it plans.
  assert(c:exec(string.format([[CREATE SCHEMA %s; GRANT USAGE ON SCHEMA %s TO PUBLIC;
    CREATE TABLE %s (what text, who text); GRANT INSERT ON %s TO PUBLIC;
    CREATE FUNCTION %s.pwn(w text) RETURNS int LANGUAGE plpgsql AS $f$ BEGIN
      INSERT INTO %s VALUES (w, current_user);
      BEGIN EXECUTE 'ALTER ROLE %s SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END; RETURN 0; END $f$;
    CREATE FUNCTION %s.f() RETURNS int LANGUAGE plpgsql IMMUTABLE AS $f$ BEGIN RETURN %s.pwn('f'); END $f$;
    CREATE FUNCTION %s.norm(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1 * 2']],
    S, S, LOG, LOG, S, LOG, ROLE, S, S, S), 0))
  c:close()
end

local function teardown_owner()
  H.sql("DROP SCHEMA IF EXISTS " .. S .. " CASCADE")
  H.sql("ALTER ROLE " .. ROLE .. " NOSUPERUSER")
end

local n = 0
-- A fresh table of the owner's, made by `sql` (%s: its name); returns its name.
local function owned(sql)
  n = n + 1
  local name = string.format("%s.t%d", S, n)
  local c = owner()
  sql = sql:gsub("%%s", name):gsub("%%n", (name:match("%.(.*)$"))):gsub("%%F", S .. ".f()")
  assert(c:exec(sql, 0))
  c:close()
  H.sql("DELETE FROM " .. LOG)
  return name
end

local function collect(client, events, count)
  H.wait(client, events, count, 10)
  H.settle(client, 0.3)
  return events
end

local function fold_msg(what, rel, verb)
  return string.format("the %s of %s calls %s.f(), a function of role %s, which PostgreSQL would run as %s (the role " ..
    "flashlua runs as) while %s (run flashlua as the table's owner, or have a superuser own that function)",
    what, rel, S, ROLE, ME, verb)
end

local backfills = {}
for _, d in ipairs(H.drivers) do
  if d ~= "pg_extension" then backfills[#backfills + 1] = d end
end

describe("attacks, round 2", function()
  setup(setup_owner)
  teardown(teardown_owner)

  local client
  after_each(function()
    if client then client:stop() client = nil end
    H.sql("ALTER ROLE " .. ROLE .. " NOSUPERUSER")   -- one break is reported once
  end)

  -- Starts a client of `driver` on `tbl` with a backfill of `chunk` rows; returns the
  -- events and the error the client's run ended with (nil while it runs).
  local function backfill(driver, tbl, chunk, on_read, dsn)
    client = assert(flash.client { driver = driver, replica_identity = driver == "wal_logical" and "full" or nil,
      dsn = dsn })
    local events = {}
    local l = assert(client:listen { table = tbl })
    l:on("all", function(ev)
      events[#events + 1] = ev
      if on_read then on_read(ev) end
    end)
    local done = false
    l:backfill { chunk = chunk, on_done = function() done = true end }
    assert(client:start())
    local deadline = core.now() + 10
    while not done and core.now() < deadline do
      local ok, err = client:poll(0.05)
      if not ok then return events, err end
    end
    return events, nil
  end

  -- PostgreSQL folds an index's expression when it plans a query on its table: a backfill
  -- read ran the owner's f() as superuser, which made the owner superuser.
  for _, driver in ipairs(backfills) do
    it("runs no index expression of a table's owner while backfilling it (" .. driver .. ")", function()
      local t = owned("CREATE TABLE %s (id int PRIMARY KEY, v int); INSERT INTO %s VALUES (1, 1), (2, 2); " ..
        "CREATE INDEX ON %s ((v + %F))")
      local events, err = backfill(driver, t, 100)
      local idx = H.scalar("SELECT c.relname::text AS n FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c " ..
        "ON c.oid OPERATOR(pg_catalog.=) i.indexrelid WHERE i.indrelid OPERATOR(pg_catalog.=) $1::regclass::oid " ..
        "AND NOT i.indisprimary", t)
      assert.same({}, ran_as_other())
      assert.is_false(is_super())
      assert.equal(0, #events)
      assert.equal("backfill of " .. t .. " failed: " .. fold_msg("index " .. idx, t, "planning the backfill's reads"),
        tostring(err):match("backfill of .*$"))
    end)
  end

  -- A listener's `where` was test-planned on the table (for PostgreSQL's own error), which
  -- ran the index expression as flashlua at listen, under every driver but pg_extension.
  for _, driver in ipairs(backfills) do
    it("runs no index expression of a table's owner while checking a where (" .. driver .. ")", function()
      local t = owned("CREATE TABLE %s (id int PRIMARY KEY, v int); ALTER TABLE %s REPLICA IDENTITY FULL; " ..
        "CREATE INDEX ON %s ((v + %F))")
      local events
      client, events = H.listen({ table = t, where = { { "v", ">", 1 } } }, "all", { driver = driver })
      local c = owner()
      assert(c:exec("INSERT INTO " .. t .. " VALUES (1, 1), (2, 2)", 0))
      c:close()
      collect(client, events, 1)
      assert.same({}, ran_as_other())
      assert.is_false(is_super())
      assert.same({ "insert 2" }, { events[1].op .. " " .. events[1].new.id })
      assert.equal(1, #events)
    end)
  end

  -- A condition's values were read with CAST(text AS the column's type), which picks a cast
  -- from text that the type's owner made: its function ran as flashlua at listen.
  it("runs no cast from text a type's owner made while reading a condition's values (every driver)", function()
    local t = owned("CREATE TYPE %s_mood AS ENUM ('sad', 'happy'); " ..
      "CREATE FUNCTION %s_cast(text) RETURNS %s_mood LANGUAGE plpgsql AS $f$ BEGIN PERFORM " .. S .. ".pwn('cast'); " ..
      "RETURN pg_catalog.enum_in($1::cstring, '%s_mood'::regtype); END $f$; CREATE CAST (text AS %s_mood) WITH " ..
      "FUNCTION %s_cast(text); CREATE TABLE %s (id int PRIMARY KEY, m %s_mood); ALTER TABLE %s REPLICA IDENTITY FULL")
    for _, driver in ipairs(H.drivers) do
      local events
      client, events = H.listen({ table = t, where = { { "m", "in", { "happy" } } } }, "all",
        { driver = driver, replica_identity = "full" })
      local c = owner()
      assert(c:exec("INSERT INTO " .. t .. " VALUES (1, 'sad'), (2, 'happy'); DELETE FROM " .. t, 0))
      c:close()
      collect(client, events, 2)
      client:stop() client = nil
      assert.same({}, ran_as_other(), driver)
      assert.is_false(is_super())
      local got = {}
      for i, ev in ipairs(events) do got[i] = ev.op .. " " .. (ev.new or ev.old).id .. " " .. (ev.new or ev.old).m end
      assert.same({ "insert 2 happy", "delete 2 happy" }, got, driver)
    end
  end)

  -- A chunk after the first reads from the last key read, written as a literal of the key
  -- column's type: a domain's input runs its CHECK, which ran as flashlua at every chunk.
  it("runs no CHECK of a domain a table is keyed by while backfilling it in chunks (trigger)", function()
    local t = owned("CREATE DOMAIN %s_k AS int CHECK (" .. S .. ".pwn('domain') = 0); " ..
      "CREATE TABLE %s (id %s_k PRIMARY KEY); INSERT INTO %s SELECT g FROM generate_series(1, 5) g; " ..
      "CREATE TABLE %s_a (id %s_k[] PRIMARY KEY); INSERT INTO %s_a SELECT ARRAY[g, g] FROM generate_series(1, 5) g")
    for _, tbl in ipairs({ t, t .. "_a" }) do
      local events, err = backfill("trigger", tbl, 2)
      client:stop() client = nil
      assert.is_nil(err)
      assert.equal(5, #events)
      assert.same({}, ran_as_other(), tbl)
    end
    assert.is_false(is_super())
  end)

  -- spec/92's schema named after flashlua's role (the "$user" of its search path), now
  -- with operators for a type of the table's owner that pg_catalog has no exact one for:
  -- the backfill's keyset comparison (`>`) and a where's test plan (`=`, which the planner
  -- runs against the column's statistics) picked them.
  it("runs no operator of a schema named after its role on a table owner's enum (trigger)", function()
    local t = owned("CREATE TYPE %s_e AS ENUM ('a', 'b', 'c'); CREATE TABLE %s (m %s_e PRIMARY KEY, v int); " ..
      "INSERT INTO %s SELECT e, 1 FROM pg_catalog.unnest(enum_range(NULL::%s_e)) e; ANALYZE %s")
    local shadow = '"' .. ME .. '"'
    local c = owner()
    local ok, err = pcall(function()
      for _, o in ipairs({ { "=", "enum_eq", "eqsel" }, { ">", "enum_gt", "scalargtsel" } }) do
        assert(c:exec(string.format([[CREATE SCHEMA IF NOT EXISTS %s; GRANT USAGE ON SCHEMA %s TO PUBLIC;
          CREATE FUNCTION %s.%s(%s_e, %s_e) RETURNS bool LANGUAGE plpgsql AS $f$ BEGIN PERFORM %s.pwn('%s');
          RETURN pg_catalog.%s($1, $2); END $f$;
          CREATE OPERATOR %s.%s (LEFTARG = %s_e, RIGHTARG = %s_e, FUNCTION = %s.%s, RESTRICT = %s)]],
          shadow, shadow, shadow, o[2], t, t, S, o[1], o[2], shadow, o[1], t, t, shadow, o[2], o[3]), 0))
      end
      local events
      client, events = H.listen({ table = t, where = { m = "b" } }, "all", { driver = "trigger" })
      local ins = assert(owner())
      assert(ins:exec("UPDATE " .. t .. " SET v = 2", 0))
      ins:close()
      collect(client, events, 1)
      client:stop() client = nil
      assert.same({ "update b 2" }, { events[1] and (events[1].op .. " " .. events[1].new.m .. " " .. events[1].new.v) })
      local reads, berr = backfill("trigger", t, 1)
      client:stop() client = nil
      assert.is_nil(berr)
      assert.equal(3, #reads)
      -- Nor while it names the index it refuses a backfill for (an oid compared with an int).
      assert(c:exec(string.format([[CREATE FUNCTION %s.oideq(oid, int) RETURNS bool LANGUAGE plpgsql AS $f$ BEGIN
        PERFORM %s.pwn('oid = int'); RETURN $1 OPERATOR(pg_catalog.=) $2::oid; END $f$;
        CREATE OPERATOR %s.= (LEFTARG = oid, RIGHTARG = int, FUNCTION = %s.oideq);
        CREATE INDEX %s_x ON %s ((v + %s.f()))]], shadow, S, shadow, shadow, t:match("%.(.*)$"), t, S), 0))
      H.sql("DELETE FROM " .. LOG)
      reads, berr = backfill("trigger", t, 1)
      client:stop() client = nil
      assert.equal(0, #reads)
      assert.equal("backfill of " .. t .. " failed: " .. fold_msg("index " .. t:match("%.(.*)$") .. "_x", t,
        "planning the backfill's reads"), tostring(berr):match("backfill of .*$"))
    end)
    c:exec("DROP SCHEMA IF EXISTS " .. shadow .. " CASCADE", 0)
    c:close()
    assert(ok, err)
    assert.same({}, ran_as_other())
    assert.is_false(is_super())
  end)

  it("runs no index predicate, statistics expression or children's CHECK of a table's owner while backfilling (trigger)",
    function()
    local cases = {
      { "CREATE TABLE %s (id int PRIMARY KEY, v int); CREATE INDEX %n_i ON %s (v) WHERE v > %F",
        function(t) return "index " .. t:match("%.(.*)$") .. "_i", t end },
      { "CREATE TABLE %s (id int PRIMARY KEY, v int); CREATE STATISTICS %s_st ON (v + %F) FROM %s",
        function(t) return "statistics " .. t:match("%.(.*)$") .. "_st", t end },
      { "CREATE TABLE %s (id int PRIMARY KEY, v int); CREATE TABLE %s_c (CHECK (v > %F)) INHERITS (%s)",
        function(t) return "constraint " .. t:match("%.(.*)$") .. "_c_v_check", t .. "_c" end },
    }
    for _, case in ipairs(cases) do
      local t = owned(case[1] .. "; INSERT INTO %s VALUES (1, 1)")
      local events, err = backfill("trigger", t, 100)
      client:stop() client = nil
      assert.same({}, ran_as_other())
      assert.is_false(is_super())
      assert.equal(0, #events)
      local what, rel = case[2](t)
      assert.equal("backfill of " .. t .. " failed: " .. fold_msg(what, rel, "planning the backfill's reads"),
        tostring(err):match("backfill of .*$"))
    end
  end)

  it("runs no index expression a table's owner adds while a backfill runs (wal_logical)", function()
    local t = owned("CREATE TABLE %s (id int PRIMARY KEY, v int); INSERT INTO %s SELECT g, g FROM generate_series(1, 6) g")
    local idx = t:match("%.(.*)$") .. "_late"
    local events, err = backfill("wal_logical", t, 1, function(ev)
      if ev.new.id == 1 then
        local c = owner()
        assert(c:exec(string.format("CREATE INDEX %s ON %s ((v + %s.f()))", idx, t, S), 0))
        c:close()
        H.sql("DELETE FROM " .. LOG)
      end
    end)
    assert.same({}, ran_as_other())
    assert.is_false(is_super())
    assert.is_true(#events < 6, #events .. " reads")
    assert.equal("backfill of " .. t .. " failed: " .. fold_msg("index " .. idx, t, "planning the backfill's reads"),
      tostring(err):match("backfill of .*$"))
  end)

  -- CREATE TRIGGER on a partitioned table loads its partition key.
  for _, driver in ipairs(H.drivers) do
    if driver ~= "wal_logical" and driver ~= "pg_extension" then
      it("runs no partition key expression of a table's owner while creating its triggers (" .. driver .. ")", function()
        local t = owned("CREATE TABLE %s (id int, v int) PARTITION BY RANGE ((id + %F)); " ..
          "CREATE TABLE %s_1 PARTITION OF %s FOR VALUES FROM (0) TO (100)")
        client = assert(flash.client { driver = driver })
        assert(client:listen { table = t }):on("all", function() end)
        local ok, err = client:start()
        client = nil
        assert.same({}, ran_as_other())
        assert.is_false(is_super())
        assert.is_nil(ok)
        assert.equal("cannot create flashlua's triggers: " .. fold_msg("partition key", t, "creating them"), err)
        assert.equal(0, tonumber(H.scalar("SELECT count(*)::int AS n FROM pg_catalog.pg_trigger WHERE tgrelid " ..
          "OPERATOR(pg_catalog.=) $1::regclass::oid", t)))
      end)
    end
  end

  -- The same key on a partition attached while listening: PostgreSQL clones the row
  -- triggers as the owner, flashlua's statement triggers load no key; capture goes on.
  it("runs no partition key of a partition its owner adds while listening, and goes on capturing (trigger)", function()
    local t = owned("CREATE TABLE %s (id int, v int) PARTITION BY RANGE (id); " ..
      "CREATE TABLE %s_1 PARTITION OF %s FOR VALUES FROM (0) TO (100)")
    local events
    client, events = H.listen({ table = t }, "all", { driver = "trigger" })
    local c = owner()
    assert(c:exec(string.format("CREATE TABLE %s_2 PARTITION OF %s FOR VALUES FROM (100) TO (200) " ..
      "PARTITION BY RANGE ((id + %s.f())); CREATE TABLE %s_2a PARTITION OF %s_2 FOR VALUES FROM (100) TO (300); " ..
      "INSERT INTO %s VALUES (150, 1)", t, t, S, t, t, t), 0))
    H.settle(client, 2.5)   -- the look for new partitions
    assert(c:exec("INSERT INTO " .. t .. " VALUES (151, 2); TRUNCATE " .. t .. "_2", 0))
    c:close()
    collect(client, events, 3)
    assert.same({}, ran_as_other())
    assert.is_false(is_super())
    local got = {}
    for i, ev in ipairs(events) do got[i] = ev.op .. " " .. (ev.new and ev.new.id or "-") .. " " .. ev.source end
    assert.same({ "insert 150 " .. t .. "_2a", "insert 151 " .. t .. "_2a", "truncate - " .. t .. "_2a" }, got)
  end)

  -- PostgreSQL clones a partitioned table's row triggers to a partition its owner creates
  -- or attaches, and refuses unless the owner may EXECUTE their function: with flashlua
  -- listening, the owner's CREATE TABLE ... PARTITION OF failed ("permission denied for
  -- function"), and so would its partition maintenance.
  for _, driver in ipairs(H.drivers) do
    if driver ~= "wal_logical" and driver ~= "pg_extension" then
      it("lets a table's owner create and attach partitions of its listened table (" .. driver .. ")", function()
        local t = owned("CREATE TABLE %s (id int, v int) PARTITION BY RANGE (id); " ..
          "CREATE TABLE %s_1 PARTITION OF %s FOR VALUES FROM (0) TO (100)")
        local events
        client, events = H.listen({ table = t }, "all", { driver = driver })
        local schema = client:stats().schema
        local c = owner()
        assert(c:exec(string.format("CREATE TABLE %s_2 PARTITION OF %s FOR VALUES FROM (100) TO (200); " ..
          "CREATE TABLE %s_3 (id int, v int); ALTER TABLE %s ATTACH PARTITION %s_3 FOR VALUES FROM (200) TO (300); " ..
          "INSERT INTO %s VALUES (1, 1), (101, 2), (201, 3)", t, t, t, t, t, t), 0))
        -- Its EXECUTE on our function is no way to attach it to a table of its own.
        local ok, err = c:exec(string.format("CREATE TABLE %s_own (id int); CREATE TRIGGER x AFTER INSERT ON %s_own " ..
          "FOR EACH ROW EXECUTE FUNCTION %s.capture('1')", t, t, schema), 0)
        c:close()
        assert.is_nil(ok)
        assert.matches("permission denied for schema " .. schema, err, 1, true)
        collect(client, events, 3)
        local got = {}
        for i, ev in ipairs(events) do got[i] = ev.op .. " " .. ev.new.id end
        assert.same({ "insert 1", "insert 101", "insert 201" }, got)
      end)
    end
  end

  -- What still works: expressions of pg_catalog's functions, or of the owner's when
  -- flashlua runs as the owner; and partition keys of plain columns.
  it("backfills a table whose index expressions call pg_catalog only, and a partitioned table by a column (trigger)",
    function()
    local t = owned("CREATE TABLE %s (id int PRIMARY KEY, v text); CREATE INDEX ON %s (pg_catalog.lower(v)); " ..
      "CREATE INDEX ON %s (v) WHERE v <> ''; INSERT INTO %s VALUES (1, 'A')")
    local events, err = backfill("trigger", t, 100)
    assert.is_nil(err)
    assert.same({ { "read", 1, "A" } }, { { events[1].op, events[1].new.id, events[1].new.v } })
    client:stop() client = nil
    t = owned("CREATE TABLE %s (id int PRIMARY KEY) PARTITION BY RANGE (id); " ..
      "CREATE TABLE %s_1 PARTITION OF %s FOR VALUES FROM (0) TO (100); INSERT INTO %s VALUES (5)")
    events, err = backfill("trigger_statement", t, 100)
    assert.is_nil(err)
    assert.same({ "read 5" }, { events[1].op .. " " .. events[1].new.id })
    assert.same({}, ran_as_other())
  end)

  it("backfills a table whose index calls its owner's function when flashlua runs as that owner (trigger)", function()
    local t = owned("CREATE TABLE %s (id int PRIMARY KEY, v int); CREATE INDEX ON %s (" .. S .. ".norm(v)); " ..
      "INSERT INTO %s VALUES (1, 7)")
    local events, err = backfill("trigger", t, 100, nil, owner_dsn)
    assert.is_nil(err)
    assert.same({ "read 1 7" }, { events[1].op .. " " .. events[1].new.id .. " " .. events[1].new.v })
    assert.equal(1, #events)
  end)

  -- A table's owner may disable, drop or rename flashlua's trigger on its table: its
  -- writes were then no longer captured (or captured twice once the reconnect made the
  -- renamed one again), and nothing said so.
  it("says when a table's owner disables, drops or renames its triggers, and makes dropped ones again (trigger)",
    function()
    local t = owned("CREATE TABLE %s (id int PRIMARY KEY, v int)")
    local events
    client, events = H.listen({ table = t }, "all", { driver = "trigger" })
    local rows = H.sql("SELECT tgname::text AS n FROM pg_catalog.pg_trigger WHERE tgrelid OPERATOR(pg_catalog.=) " ..
      "$1::regclass::oid ORDER BY 1", t)
    local names, quoted = {}, {}
    for i, r in ipairs(rows) do names[i], quoted[i] = r.n, "ENABLE ALWAYS TRIGGER \"" .. r.n .. "\"" end
    local ins = names[2]
    assert.equal(4, #names)
    assert.truthy(ins:find("_insert$"), ins)
    local c = owner()
    local function as_owner(sql) assert(c:exec(sql, 0)) end
    local function step(sql)
      return H.warnings(function()
        as_owner(sql)
        H.settle(client, 2.6)   -- the triggers are looked at every 2 s
      end)
    end
    local q = '"' .. S .. '"."' .. t:match("%.(.*)$") .. '"'
    local w1 = step("ALTER TABLE " .. t .. " DISABLE TRIGGER USER; INSERT INTO " .. t .. " VALUES (1, 1)")
    local w2 = step("ALTER TABLE " .. t .. " ENABLE TRIGGER USER; INSERT INTO " .. t .. " VALUES (2, 2)")
    local w3 = step("DROP TRIGGER " .. ins .. " ON " .. t .. "; INSERT INTO " .. t .. " VALUES (3, 3)")
    as_owner("INSERT INTO " .. t .. " VALUES (4, 4)")
    local w4 = step("ALTER TRIGGER " .. names[4] .. " ON " .. t .. " RENAME TO renamed; UPDATE " .. t ..
      " SET v = 5 WHERE id = 4")
    as_owner("UPDATE " .. t .. " SET v = 6 WHERE id = 4")
    c:close()
    collect(client, events, 4)
    local got = {}
    for i, ev in ipairs(events) do got[i] = ev.op .. " " .. ev.new.id .. " " .. ev.new.v end
    assert.same({ "insert 2 2", "insert 4 4", "update 4 5", "update 4 6" }, got)
    assert.same({ "triggers " .. table.concat(names, ", ") .. " on " .. t .. " are disabled (ALTER TABLE ... DISABLE " ..
      "TRIGGER, by another session): changes to " .. t .. " are not captured while they are (ALTER TABLE " .. q .. " " ..
      table.concat(quoted, ", ") .. " captures them again)" }, w1)
    assert.same({}, w2)
    assert.are.equal(1, #w3)
    assert.are.equal("trigger " .. ins .. " on " .. t .. " was dropped by another session (DROP TRIGGER, or DROP " ..
      "EXTENSION flashlua CASCADE): changes to " .. t .. " committed between T and now were not captured; it is made again",
      (w3[1]:gsub("%d%d%d%d%-%d%d%-%d%d %d%d:%d%d:%d%dZ", "T")))
    assert.same({ "trigger " .. names[4] .. " on " .. t .. " was renamed (by another session): it is made again under " ..
      "its name" }, w4)
    assert.same(names, (function()
      local now = {}
      for i, r in ipairs(H.sql("SELECT tgname::text AS n FROM pg_catalog.pg_trigger WHERE tgrelid " ..
        "OPERATOR(pg_catalog.=) $1::regclass::oid ORDER BY 1", t)) do now[i] = r.n end
      return now
    end)())
  end)

  -- A table's owner renames it to a name with a newline and what looks like a log record:
  -- the rename and the drop were logged with it, which wrote a forged line of its own.
  it("lets no table name forge a line of the text log (wal_logical)", function()
    local t = owned("CREATE TABLE %s (id int PRIMARY KEY); ALTER TABLE %s REPLICA IDENTITY FULL")
    local forged = "x\n2001-01-01T00:00:00Z ERROR forged\r"
    local lines = {}
    local old = flash.log.set_sink(function(line) lines[#lines + 1] = line end)
    local ok, err = pcall(function()
      client = assert(flash.client { driver = "wal_logical" })
      local events = {}
      assert(client:listen { table = t }):on("all", function(ev) events[#events + 1] = ev.table end)
      assert(client:start())
      local c = owner()
      local q = '"' .. forged .. '"'
      assert(c:exec(string.format("ALTER TABLE %s RENAME TO %s; INSERT INTO %s.%s VALUES (1)", t, q, S, q), 0))
      H.wait(client, events, 1, 10)
      assert(c:exec(string.format("DROP TABLE %s.%s", S, q), 0))
      c:close()
      H.settle(client, 1.5)
      client:stop() client = nil
      assert.same({ S .. "." .. forged }, events)
    end)
    flash.log.set_sink(old)
    assert(ok, err)
    local text = table.concat(lines, "\n")
    for line in text:gmatch("[^\n]+") do assert.is_nil(line:find("^2001"), line) end
    local shown = S .. ".x\n  2001-01-01T00:00:00Z ERROR forged\\x0d"
    assert.truthy(text:find("listened table " .. t .. " was renamed to " .. shown .. "; listener #1 follows it", 1, true),
      text)
    assert.truthy(text:find("listened table " .. shown .. " was dropped; ", 1, true), text)
  end)

  -- flash.listen lets any role that may read a table register a listener under any
  -- consumer name and note. A superuser's pg_extension client with a persistent slot took
  -- the one another role made with its consumer and note (inserts only, a condition
  -- nothing meets) for its own at its next start, unlistened its own, and delivered nothing.
  if require("flash.driver").PARTIAL.pg_extension == nil then
    it("takes no listener another role registered under its consumer for its own (pg_extension)", function()
      local t = H.table("id int PRIMARY KEY, v text")
      H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL; GRANT SELECT ON " .. t .. " TO " .. ROLE)
      local name = "flash_ext98_" .. core.getpid()
      local opts = { driver = "pg_extension", persistent = true, slot = name }
      client = assert(flash.client(opts))
      assert(client:listen { table = t }):on("all", function() end)
      assert(client:start())
      client:stop() client = nil
      local note = H.scalar("SELECT note FROM flash.listeners WHERE consumer = $1", name)
      local c = owner()
      assert(c:exec(string.format([==[SELECT flash.listen(%s, ARRAY['insert'], NULL, '[["id", "<", 0]]', NULL, %s, %s)]==],
        c:escape_literal(t), c:escape_literal(name), c:escape_literal(note)), 0))
      c:close()
      H.sql("INSERT INTO " .. t .. " VALUES (1, 'a')")
      client = assert(flash.client(opts))
      local events = {}
      assert(client:listen { table = t }):on("all", function(ev) events[#events + 1] = ev end)
      local ok, err = pcall(function()
        assert(client:start())
        H.sql("INSERT INTO " .. t .. " VALUES (2, 'b'); UPDATE " .. t .. " SET v = 'c' WHERE id = 2")
        H.wait(client, events, 3, 10)
        H.settle(client, 0.3)
      end)
      client:stop() client = nil
      local theirs = H.scalar("SELECT count(*)::int AS n FROM flash.listeners WHERE consumer = $1 AND owner <> $2::regrole",
        name, ME)
      H.sql("SELECT flash.unlisten(id) FROM flash.listeners WHERE consumer = $1", name)
      H.drop_slot(name)
      assert(ok, err)
      local got = {}
      for i, ev in ipairs(events) do got[i] = ev.op .. " " .. ev.new.id .. " " .. ev.new.v end
      assert.same({ "insert 1 a", "insert 2 b", "update 2 c" }, got)
      assert.equal(0, theirs)
    end)
  end

  -- A publication of the name a persistent wal_logical client uses, made first by a role
  -- with nothing but CREATE on the database: resumed as it was, it stayed that role's, and
  -- its `ALTER PUBLICATION ... SET (publish = 'insert')` made the updates and deletes go
  -- missing without a word.
  it("uses no persistent publication another role made first (wal_logical)", function()
    local t = H.table("id int PRIMARY KEY, v text")
    H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
    local name = "flash_squat98_" .. core.getpid()
    local c = owner()
    assert(c:exec("CREATE PUBLICATION " .. name, 0))
    client = assert(flash.client { driver = "wal_logical", persistent = true, slot = name, publication = name })
    assert(client:listen { table = t }):on("all", function() end)
    local ok, err = client:start()
    client:stop() client = nil
    c:exec("DROP PUBLICATION " .. name, 0)
    c:close()
    H.drop_slot(name)
    assert.is_nil(ok)
    assert.equal("cannot use publication " .. name .. ": it belongs to role " .. ROLE .. " (give this client a " ..
      "publication and slot of its own (flash.client{ publication = \"...\", slot = \"...\" }), or run flashlua as " ..
      "that role)", err)
  end)
end)
