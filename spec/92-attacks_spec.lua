-- spec/92-attacks_spec.lua: a second, unprivileged role (CREATE on the database, nothing
-- else) attacking a flashlua that runs as a superuser, beyond spec/81: objects it makes
-- where flashlua's own session looks for functions and operators, and objects it dresses
-- up as flashlua's own. Whatever it makes must never run with flashlua's privileges.
local flash = require "flash"
local core = require "flash.core"
local H = require "spec.helpers"

local ROLE = "flash_attacker"
local low_dsn = (H.dsn:gsub("user=%S+", "")) .. " user=" .. ROLE

local function quote(s) return '"' .. s:gsub('"', '""') .. '"' end

-- flashlua's role: the attacker names a schema after it, which is then the "$user" entry
-- of flashlua's default search_path.
local ME = H.scalar("SELECT current_user::text AS u")
local SHADOW = quote(ME)
local LOG = SHADOW .. ".log"

local function low() return assert(core.connect(low_dsn)) end

local function is_super()
  return H.scalar("SELECT rolsuper FROM pg_roles WHERE rolname = $1", ROLE)
end

-- Every call of the attacker's code that ran as someone else than the attacker: what ran.
local function ran_as_other()
  local rows = H.sql("SELECT what FROM " .. LOG .. " WHERE who <> $1 ORDER BY what", ROLE)
  local t = {}
  for i, r in ipairs(rows) do t[i] = r.what end
  return t
end

-- Each of the attacker's functions logs who ran it, tries to make the attacker superuser,
-- and then does the real work (or returns NULL).
local PWN = "INSERT INTO " .. LOG .. " VALUES (%s, current_user); " ..
  "BEGIN EXECUTE 'ALTER ROLE " .. ROLE .. " SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END;"

local function shadow_objects(c)
  local function fn(sig, ret, label, body)
    assert(c:exec(string.format("CREATE FUNCTION %s.%s RETURNS %s LANGUAGE plpgsql AS $f$ BEGIN " .. PWN .. " %s END $f$",
      SHADOW, sig, ret, "'" .. label .. "'", body), 0))
  end
  -- Functions that pg_catalog has only for polymorphic or other types: an exact match in
  -- "$user" wins over them where a call is not qualified.
  fn("unnest(int2vector)", "SETOF int2", "unnest(int2vector)", "RETURN QUERY SELECT pg_catalog.unnest($1::int2[]);")
  fn("unnest(oid[])", "SETOF oid", "unnest(oid[])", "RETURN QUERY SELECT pg_catalog.unnest($1);")
  fn("unnest(text[])", "SETOF text", "unnest(text[])", "RETURN QUERY SELECT pg_catalog.unnest($1);")
  fn("to_jsonb(pg_catalog.pg_database)", "jsonb", "to_jsonb(pg_database)", "RETURN pg_catalog.to_jsonb($1);")
  fn("to_jsonb(pg_catalog.pg_collation)", "jsonb", "to_jsonb(pg_collation)", "RETURN pg_catalog.to_jsonb($1);")
  fn("agg_step(text[], text)", "text[]", "array_agg(text)", "RETURN pg_catalog.array_append($1, $2);")
  assert(c:exec(string.format("CREATE AGGREGATE %s.array_agg(text) (SFUNC = %s.agg_step, STYPE = text[])",
    SHADOW, SHADOW), 0))
  -- Operators for every pair of these types that pg_catalog has no operator for exactly.
  assert(c:exec(string.format([[DO $d$
  DECLARE
    types text[] := ARRAY['int2', 'int4', 'int8', 'oid', 'name', 'text', 'float4', 'float8', 'numeric', '"char"',
      'bool', 'regclass', 'regnamespace', 'regproc', 'regtype', 'xid', 'xid8', 'pg_lsn', 'jsonb', 'bytea', 'text[]',
      'oid[]', 'int2[]', 'int2vector', 'oidvector', 'varchar', 'bpchar', 'timestamptz', 'tid'];
    ops text[] := ARRAY['=', '<>', '<', '>', '<=', '>=', '||', '~~'];
    l text; r text; o text; n int := 0;
  BEGIN
    FOREACH o IN ARRAY ops LOOP FOREACH l IN ARRAY types LOOP FOREACH r IN ARRAY types LOOP
      IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_operator WHERE oprname OPERATOR(pg_catalog.=) o
          AND oprleft OPERATOR(pg_catalog.=) l::pg_catalog.regtype::pg_catalog.oid
          AND oprright OPERATOR(pg_catalog.=) r::pg_catalog.regtype::pg_catalog.oid) THEN
        n := n + 1;
        EXECUTE pg_catalog.format('CREATE FUNCTION %s.op%%s(%%s, %%s) RETURNS %%s LANGUAGE plpgsql AS $f$ BEGIN '
          'INSERT INTO %s VALUES (%%L, current_user); RETURN NULL; END $f$', n, l, r,
          CASE WHEN o OPERATOR(pg_catalog.=) '||' THEN 'text' ELSE 'bool' END, pg_catalog.concat(l, ' ', o, ' ', r));
        EXECUTE pg_catalog.format('CREATE OPERATOR %s.%%s (LEFTARG = %%s, RIGHTARG = %%s, FUNCTION = %s.op%%s)',
          o, l, r, n);
      END IF;
    END LOOP; END LOOP; END LOOP;
  END $d$]], SHADOW, LOG, SHADOW, SHADOW), 0))
  assert(c:exec("GRANT USAGE ON SCHEMA " .. SHADOW .. " TO PUBLIC", 0))
end

local function setup_attacker()
  H.sql(string.format([[DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '%s') THEN CREATE ROLE %s LOGIN NOSUPERUSER; END IF;
  END $$; ALTER ROLE %s NOSUPERUSER; GRANT CREATE ON DATABASE postgres TO %s]], ROLE, ROLE, ROLE, ROLE))
  local c = low()
  assert(c:exec(string.format("CREATE SCHEMA %s; CREATE TABLE %s (what text, who text); GRANT INSERT ON %s TO PUBLIC",
    SHADOW, LOG, LOG), 0))
  shadow_objects(c)
  c:close()
end

local function teardown_attacker()
  H.sql("DROP SCHEMA IF EXISTS " .. SHADOW .. " CASCADE")
  H.sql("ALTER ROLE " .. ROLE .. " NOSUPERUSER")
end

local n_tables = 0
-- A fresh table in public (a bare name would go to the attacker's schema, first on the path).
local function fresh_table(columns)
  n_tables = n_tables + 1
  return H.table(columns, string.format("public.a92_%d_%d", core.getpid(), n_tables))
end

local function collect(client, events, n)
  H.wait(client, events, n, 15)
  H.settle(client, 0.3)
  return events
end

describe("attacks", function()
  setup(setup_attacker)
  teardown(teardown_attacker)

  local client
  after_each(function()
    if client then client:stop() client = nil end
    H.sql("ALTER ROLE " .. ROLE .. " NOSUPERUSER")   -- one break is reported once
  end)

  for _, driver in ipairs(H.drivers) do
    it("shadows no function or operator of flashlua's own queries from a schema named after its role (" ..
      driver .. ")", function()
      local t = fresh_table("id int PRIMARY KEY, name text COLLATE \"C\", v text")
      H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL; INSERT INTO " .. t ..
        " SELECT g, 'n' || g::text, 'x' FROM generate_series(1, 20) g")
      H.sql("DELETE FROM " .. LOG)
      client = assert(flash.client { driver = driver })
      local matched, all = {}, {}
      local l = assert(client:listen { table = t, where = { { "name", "in", { "a", "b" } }, { "id", ">", 0 } } })
      l:on("all", function(ev) matched[#matched + 1] = ev end)
      local l2 = assert(client:listen { table = t })
      l2:on("all", function(ev) all[#all + 1] = ev end)
      local n = 1
      if driver ~= "pg_extension" then
        l2:backfill { chunk = 5 }
        n = 21
      end
      assert(client:start())
      -- The workers' key of a table (workers = N) is read on the same connection.
      assert.same({ "id" }, require("flash.workers").key_columns(client, l2))
      collect(client, all, n - 1)   -- the backfill's rows, before the insert
      H.sql("INSERT INTO " .. t .. " VALUES (100, 'a', 'y')")
      collect(client, all, n)
      H.wait(client, matched, 1, 5)
      client:stop() client = nil
      assert.equal(n, #all)
      assert.same({ "insert", 100 }, { all[n].op, all[n].new.id })
      assert.same({ "insert" }, { matched[1] and matched[1].op })
      assert.same({}, ran_as_other())
      assert.is_false(is_super())
    end)

    it("runs nothing of a schema a DSN's search_path puts before pg_catalog (" .. driver .. ")", function()
      local t = fresh_table("id int PRIMARY KEY, v text")
      H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
      local s = string.format("attack_path_%d_%d", core.getpid(), n_tables)
      local c = low()
      -- The same signatures as pg_catalog's: only the order of the search_path decides.
      local ops = {}
      for i, o in ipairs({ { "=", "oid" }, { "=", "name" }, { "=", "text" }, { "=", "int4" }, { "=", "\"char\"" },
                           { "<>", "oid" }, { "<>", "text" }, { "||", "text" }, { "=", "int2" }, { "=", "bool" } }) do
        ops[i] = string.format([[CREATE FUNCTION %s.f%d(%s, %s) RETURNS %s LANGUAGE plpgsql AS $f$ BEGIN
          INSERT INTO %s VALUES ('%s', current_user); RETURN NULL; END $f$;
          CREATE OPERATOR %s.%s (LEFTARG = %s, RIGHTARG = %s, FUNCTION = %s.f%d);]], s, i, o[2], o[2],
          o[1] == "||" and "text" or "bool", LOG, o[2] .. " " .. o[1] .. " " .. o[2], s, o[1], o[2], o[2], s, i)
      end
      assert(c:exec("CREATE SCHEMA " .. s .. "; GRANT USAGE ON SCHEMA " .. s .. " TO PUBLIC; " .. table.concat(ops, "\n"), 0))
      c:close()
      H.sql("DELETE FROM " .. LOG)
      local events
      client, events = H.listen({ table = t }, "all",
        { driver = driver, dsn = H.dsn .. " options='-csearch_path=" .. s .. ",pg_catalog'" })
      H.sql("INSERT INTO " .. t .. " VALUES (1, 'a')")
      collect(client, events, 1)
      client:stop() client = nil
      assert.same({ "insert" }, { events[1] and events[1].op })
      assert.same({}, ran_as_other())
      assert.is_false(is_super())
      H.sql("DROP SCHEMA " .. s .. " CASCADE")
    end)

    it("runs no CHECK of a domain a table owner defines when it reads a condition's value (" .. driver .. ")", function()
      n_tables = n_tables + 1
      local s = string.format("attack_dom_%d_%d", core.getpid(), n_tables)
      local c = low()
      assert(c:exec(string.format([[CREATE SCHEMA %s;
        CREATE FUNCTION %s.chk(text) RETURNS bool LANGUAGE plpgsql AS $f$ BEGIN ]] .. PWN .. [[ RETURN true; END $f$;
        CREATE DOMAIN %s.d AS varchar(10) CHECK (%s.chk(VALUE));
        CREATE TABLE %s.t (id int PRIMARY KEY, v %s.d); ALTER TABLE %s.t REPLICA IDENTITY FULL]],
        s, s, "'domain check'", s, s, s, s, s), 0))
      H.sql("DELETE FROM " .. LOG)
      local events
      client, events = H.listen({ table = s .. ".t", where = { { "v", "in", { "x", "z" } } } }, "all", { driver = driver })
      assert(c:exec(string.format("INSERT INTO %s.t VALUES (1, 'y'), (2, 'x')", s), 0))
      collect(client, events, 1)
      client:stop() client = nil
      assert.same({ { "insert", 2 } }, { { events[1] and events[1].op, events[1] and events[1].new.id } })
      assert.equal(1, #events)
      -- The writer's inserts ran the check as the writer, never as flashlua.
      assert.same({}, ran_as_other())
      assert.is_false(is_super())
      -- Nor the CHECK of a domain that a column's type holds (an array of it, a composite
      -- with a member of it): such conditions are refused, without reading their values.
      assert(c:exec(string.format("CREATE TYPE %s.comp AS (a %s.d); CREATE DOMAIN %s.di AS bool CHECK (%s.chk(VALUE::text)); " ..
        "CREATE TABLE %s.u (id int PRIMARY KEY, w %s.d[], m %s.comp, z %s.di[]); ALTER TABLE %s.u REPLICA IDENTITY FULL",
        s, s, s, s, s, s, s, s, s), 0))
      for _, cond in ipairs({ { "w", "=", "{x}" }, { "m", "=", "(x)" }, { "z", "=", "{t}" } }) do
        local lc = assert(flash.client { driver = driver })
        local l = lc:listen { table = s .. ".u", where = { cond } }
        if l then
          l:on("all", function() end)
          local ok = lc:start()
          assert.is_nil(ok, cond[1])
        end
        lc:stop()
      end
      assert.same({}, ran_as_other())
      assert.is_false(is_super())
      c:close()
      H.sql("DROP SCHEMA " .. s .. " CASCADE")
    end)

    if driver == "pg_extension" then
      it("refuses an extension whose schema flash another role made first (pg_extension)", function()
        -- The attacker made schema flash before the DBA's CREATE EXTENSION (which uses it
        -- as it is), then an overload of flash.listen that an untyped call would pick.
        H.sql("DROP EXTENSION flashlua CASCADE; DROP SCHEMA IF EXISTS flash CASCADE")
        local c = low()
        local ok, err = pcall(function()
          assert(c:exec("CREATE SCHEMA flash; GRANT USAGE ON SCHEMA flash TO PUBLIC", 0))
          H.sql("CREATE EXTENSION flashlua")
          assert(c:exec(string.format([[CREATE FUNCTION flash.listen(regclass, text, text, text, text, text, text)
            RETURNS bigint LANGUAGE plpgsql AS $f$ BEGIN ]] .. PWN .. [[ RETURN flash.listen($1, $2::text[], $3::text[],
            $4::jsonb, $5::text[], $6, $7); END $f$]], "'listen overload'"), 0))
          H.sql("DELETE FROM " .. LOG)
          local t = fresh_table("id int PRIMARY KEY")
          local pc = assert(flash.client { driver = driver })
          assert(pc:listen { table = t })
          local started, serr = pc:start()
          pc:stop()
          assert.is_nil(started)
          assert.matches("schema flash, where the flashlua extension lives, belongs to role " .. ROLE .. ", not to " ..
            "the extension's owner " .. ME .. ": that role can put functions there that flashlua would call", serr, 1, true)
          assert.same({}, ran_as_other())
          assert.is_false(is_super())
        end)
        c:close()
        H.sql("DROP EXTENSION flashlua CASCADE; DROP SCHEMA IF EXISTS flash CASCADE; CREATE EXTENSION flashlua")
        assert(ok, err)
      end)
    end

    if driver ~= "pg_extension" then
      -- Any role may take the advisory lock that marks a name as a running instance's: the
      -- refusal said only "in use by another running flashlua instance", with nothing to
      -- find the session by.
      it("names the session of another role holding the lock of its schema or publication (" .. driver .. ")",
        function()
        local t = fresh_table("id int PRIMARY KEY")
        H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
        local name = "flash_squat_" .. core.getpid()
        local opts, what, key = { driver = driver, schema = name }, "schema " .. name, name
        if driver == "wal_logical" then
          opts, what, key = { driver = driver, slot = name, publication = name }, "publication " .. name, "pub:" .. name
        end
        local c = low()
        local pid = math.floor(assert(c:exec("SELECT pg_catalog.pg_backend_pid() AS p", 0))[1].p)
        assert(c:exec("SELECT pg_catalog.pg_advisory_lock(pg_catalog.hashtext('flashlua'), pg_catalog.hashtext('" ..
          key .. "'))", 0))
        client = assert(flash.client(opts))
        assert(client:listen { table = t }):on("insert", function() end)
        local ok, err = client:start()
        c:close()
        assert.is_nil(ok)
        assert.truthy(err:find(what .. " is in use by another running flashlua instance (its lock is held by backend " ..
          pid .. ", role " .. ROLE .. ", application '", 1, true), err)
        assert.truthy(err:find("'; if that is not a flashlua, SELECT pg_catalog.pg_terminate_backend(" .. pid ..
          ") ends it)", 1, true), err)
      end)
    end

    if driver ~= "wal_logical" and driver ~= "pg_extension" then
      -- A schema of the attacker's, marked as a flashlua instance's and holding an `events`
      -- view of its own function: counted, read or dropped as ours, it would run as us.
      local function fake_instance(c, name, mark)
        assert(c:exec(string.format([[DROP SCHEMA IF EXISTS %s CASCADE; CREATE SCHEMA %s;
          COMMENT ON SCHEMA %s IS '%s';
          CREATE FUNCTION %s.pwn() RETURNS int LANGUAGE plpgsql AS $f$ BEGIN ]] .. PWN .. [[ RETURN 1; END $f$;
          CREATE VIEW %s.events AS SELECT %s.pwn() AS seq]], name, name, name, mark, name, "'fake " .. name .. "'",
          name, name), 0))
      end
      local function schema_exists(name)
        return H.scalar("SELECT count(*)::int AS n FROM pg_namespace WHERE nspname = $1", name) == 1
      end

      it("takes no schema another role marked as flashlua's for its own (" .. driver .. ")", function()
        local c = low()
        local orphan, kept = "fake_orphan_" .. core.getpid(), "fake_kept_" .. core.getpid()
        fake_instance(c, orphan, "flashlua instance (pid 1); removed when it stops")
        fake_instance(c, kept, "flashlua instance persistent: kept across runs")
        H.sql("DELETE FROM " .. LOG)
        local t = fresh_table("id int PRIMARY KEY")
        -- A fresh instance sweeps the schemas of instances that are gone: not these.
        local events
        client, events = H.listen({ table = t }, "all", { driver = driver })
        H.sql("INSERT INTO " .. t .. " VALUES (1)")
        collect(client, events, 1)
        client:stop() client = nil
        assert.equal(1, #events)
        assert.same({}, ran_as_other())
        assert.is_false(is_super())
        assert.is_true(schema_exists(orphan))
        assert.is_true(schema_exists(kept))
        -- Nor does `flashlua --list-schemas` count what the fake persistent one holds.
        local lc = assert(flash.connect(H.dsn))
        local list = assert(require("flash.driver.capture").persistent_schemas(lc))
        lc:stop()
        for _, r in ipairs(list) do assert.not_equal(kept, r.name) end
        assert.same({}, ran_as_other())
        -- The name a persistent instance uses, made by the attacker first: refused, untouched.
        local name = "fake_persistent_" .. core.getpid()
        fake_instance(c, name, "flashlua instance persistent: kept across runs")
        local pc = assert(flash.client { driver = driver, persistent = true, schema = name })
        assert(pc:listen { table = t })
        local ok, err = pc:start()
        pc:stop()
        assert.is_nil(ok)
        assert.matches("schema " .. name .. " exists and belongs to role " .. ROLE .. ", not to " .. ME ..
          ", the role flashlua runs as", err, 1, true)
        assert.same({}, ran_as_other())
        assert.is_false(is_super())
        assert.is_true(schema_exists(name))
        assert.equal(0, tonumber(H.scalar("SELECT count(*)::int AS n FROM pg_trigger WHERE tgrelid OPERATOR(pg_catalog.=) $1::regclass::oid", t)))
        for _, x in ipairs({ orphan, kept, name }) do H.sql("DROP SCHEMA " .. x .. " CASCADE") end
        c:close()
      end)

      it("keeps no backfill progress in a schema flashlua another role made (" .. driver .. ")", function()
        -- Its own partitioned flashlua.backfill, whose trigger would run as whoever writes it.
        H.sql("DROP SCHEMA IF EXISTS flashlua CASCADE")
        local c = low()
        assert(c:exec(string.format([[CREATE SCHEMA flashlua; GRANT USAGE ON SCHEMA flashlua TO PUBLIC;
          CREATE TABLE flashlua.backfill (slot text NOT NULL, rel oid NOT NULL, tbl text NOT NULL,
            seg int NOT NULL DEFAULT 1, block bigint NOT NULL DEFAULT 0, after text[],
            rows_done bigint NOT NULL DEFAULT 0, done boolean NOT NULL DEFAULT false,
            started timestamptz NOT NULL DEFAULT now(), updated timestamptz NOT NULL DEFAULT now(),
            nth int NOT NULL DEFAULT 1) PARTITION BY LIST (nth);
          CREATE TABLE flashlua.backfill_all PARTITION OF flashlua.backfill DEFAULT;
          GRANT ALL ON flashlua.backfill TO PUBLIC;
          CREATE FUNCTION flashlua.trg() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN ]] .. PWN .. [[ RETURN NEW; END $f$;
          CREATE TRIGGER t BEFORE INSERT OR UPDATE OR DELETE ON flashlua.backfill_all
            FOR EACH ROW EXECUTE FUNCTION flashlua.trg()]], "'backfill state trigger'"), 0))
        H.sql("DELETE FROM " .. LOG)
        local t = fresh_table("id int PRIMARY KEY")
        H.sql("INSERT INTO " .. t .. " VALUES (1), (2)")
        local schema = "att_bf_" .. core.getpid()
        client = assert(flash.client { driver = driver, persistent = true, schema = schema })
        local events = {}
        local l = assert(client:listen { table = t })
        l:on("all", function(ev) events[#events + 1] = ev end)
        l:backfill {}
        assert(client:start())
        local _, err = H.wait(client, events, 2, 10)
        client:stop() client = nil
        assert.equal(0, #events)
        assert.equal("backfill of " .. t .. " failed: flashlua.backfill exists but is owned by another role (" .. ROLE ..
          "): backfill progress cannot be kept there (drop it, or run flashlua as its owner)",
          tostring(err):match("backfill of .*$"))
        -- Nor in its schema once that role has dropped its table: ours could be replaced.
        assert(c:exec("DROP TABLE flashlua.backfill", 0))
        client = assert(flash.client { driver = driver, persistent = true, schema = schema })
        l = assert(client:listen { table = t })
        l:on("all", function(ev) events[#events + 1] = ev end)
        l:backfill {}
        assert(client:start())
        _, err = H.wait(client, events, 2, 10)
        client:stop() client = nil
        assert.equal(0, #events)
        assert.equal("backfill of " .. t .. " failed: schema flashlua exists but is owned by another role (" .. ROLE ..
          "): backfill progress cannot be kept there (have that role drop it, or run flashlua as its owner)",
          tostring(err):match("backfill of .*$"))
        assert.equal(0, tonumber(H.scalar("SELECT count(*)::int AS n FROM pg_class WHERE relnamespace " ..
          "OPERATOR(pg_catalog.=) 'flashlua'::regnamespace::oid")))
        assert.same({}, ran_as_other())
        assert.is_false(is_super())
        H.sql("DROP SCHEMA flashlua CASCADE; DROP SCHEMA IF EXISTS " .. schema .. " CASCADE")
        c:close()
      end)

      it("runs no row-level security policy of a table's owner as a flashlua that is not superuser (" .. driver ..
        ")", function()
        -- flashlua runs as a role with SELECT and TRIGGER on the attacker's table, whose
        -- policy (one immutable part, which the planner runs, one per row) applies to it.
        local runner = "flash_runner"
        H.sql(string.format([[DO $$ BEGIN
          IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '%s') THEN CREATE ROLE %s LOGIN; END IF;
          END $$; GRANT CREATE ON DATABASE postgres TO %s]], runner, runner, runner))
        n_tables = n_tables + 1
        local s = string.format("attack_rls_%d_%d", core.getpid(), n_tables)
        local c = low()
        assert(c:exec(string.format([[CREATE SCHEMA %s; GRANT USAGE ON SCHEMA %s TO %s;
          CREATE FUNCTION %s.pol(int) RETURNS bool LANGUAGE plpgsql AS $f$ BEGIN ]] .. PWN .. [[ RETURN $1 < 3; END $f$;
          CREATE FUNCTION %s.pol0() RETURNS bool LANGUAGE plpgsql IMMUTABLE AS $f$ BEGIN RETURN %s.pol(0); END $f$;
          CREATE TABLE %s.t (id int PRIMARY KEY, v text);
          INSERT INTO %s.t SELECT g, 'x' FROM generate_series(1, 5) g;
          ALTER TABLE %s.t ENABLE ROW LEVEL SECURITY;
          CREATE POLICY p ON %s.t FOR SELECT TO %s USING (%s.pol(id) AND %s.pol0());
          GRANT SELECT, TRIGGER ON %s.t TO %s]], s, s, runner, s, "'policy'", s, s, s, s, s, s, runner, s, s, s,
          runner), 0))
        H.sql("DELETE FROM " .. LOG)
        client = assert(flash.client { driver = driver, dsn = (H.dsn:gsub("user=%S+", "")) .. " user=" .. runner })
        local events = {}
        local l = assert(client:listen { table = s .. ".t", where = { { "v", "=", "x" } } })
        l:on("all", function(ev) events[#events + 1] = ev end)
        l:backfill {}
        assert(client:start())
        local _, err = H.wait(client, events, 5, 10)
        local schema = client:stats().schema
        H.warnings(function() client:stop() end)   -- it may not drop its triggers: not the owner
        client = nil
        assert.equal(0, #events)
        assert.equal("backfill of " .. s .. ".t failed: query would be affected by row-level security policy for " ..
          "table \"t\" (its policies would hide rows from the backfill, and run their expressions as " .. runner ..
          ": run flashlua as the table's owner or a role with BYPASSRLS, or have the owner exempt " .. runner ..
          " from them)", tostring(err):match("backfill of .*$"))
        assert.same({}, ran_as_other())
        c:close()
        H.sql("DROP SCHEMA " .. s .. " CASCADE; DROP SCHEMA IF EXISTS " .. schema .. " CASCADE")
      end)

      it("passes over its default schema name when another role made it first (" .. driver .. ")", function()
        local t = fresh_table("id int PRIMARY KEY")
        client = assert(flash.client { driver = driver })
        local name = "flash_" .. client.conn:backend_pid()
        local c = low()
        fake_instance(c, name, "flashlua instance (pid 1); removed when it stops")
        H.sql("DELETE FROM " .. LOG)
        local events = {}
        assert(client:listen { table = t }):on("all", function(ev) events[#events + 1] = ev end)
        local warned = H.warnings(function() assert(client:start()) end)
        assert.same({ "schema " .. name .. " belongs to role " .. ROLE .. ": this instance uses another name" }, warned)
        assert.equal(name .. "_2", client:stats().schema)
        H.sql("INSERT INTO " .. t .. " VALUES (1)")
        collect(client, events, 1)
        client:stop() client = nil
        assert.equal(1, #events)
        assert.same({}, ran_as_other())
        assert.is_false(is_super())
        assert.is_true(schema_exists(name))
        assert.is_false(schema_exists(name .. "_2"))
        H.sql("DROP SCHEMA " .. name .. " CASCADE")
        c:close()
      end)

      it("passes over its default schema name when another session holds its advisory lock (" .. driver .. ")",
        function()
        local t = fresh_table("id int PRIMARY KEY")
        client = assert(flash.client { driver = driver })
        local name = "flash_" .. client.conn:backend_pid()
        -- Any role may take any advisory lock: the one an instance of that name would hold.
        local c = low()
        assert(c:exec("SELECT pg_advisory_lock(hashtext('flashlua'), hashtext('" .. name .. "'))", 0))
        local events = {}
        assert(client:listen { table = t }):on("all", function(ev) events[#events + 1] = ev end)
        local warned = H.warnings(function() assert(client:start()) end)
        assert.same({ "schema " .. name .. " is locked by another session: this instance uses another name" }, warned)
        assert.equal(name .. "_2", client:stats().schema)
        H.sql("INSERT INTO " .. t .. " VALUES (1)")
        collect(client, events, 1)
        client:stop() client = nil
        c:close()
        assert.equal(1, #events)
        assert.is_false(schema_exists(name .. "_2"))
      end)
    end
  end
end)
