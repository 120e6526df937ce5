-- spec/99-new_user_jobs_spec.lua: a new user's everyday jobs, done as README.md, docs/ and
-- examples/ show them: the documented scripts run side by side, with the output the docs show.
local H = require "helpers"
local flash = require "flash"
local core = require "flash.core"

describe("a new user's everyday jobs", function()
  local pid = core.getpid()
  local base = "nj_" .. pid
  local drops = {}
  local spawned = {}   -- children a failed case left running (they would hold busted's output open)
  after_each(function()
    for _, h in ipairs(spawned) do if not h.wait(0) then h.kill("KILL") end end
    spawned = {}
    for i = #drops, 1, -1 do H.sql(drops[i]) end
    drops = {}
  end)

  -- docs/delivery.md's outbox (slot = "flash_outbox") and mailer (slot = "flash_mailer"), and
  -- docs/backfill.md's "flash_search_index", name only their slots. All shared the publication
  -- "flash_publication": the second one started while the first ran was refused ("publication
  -- flash_publication is in use by another running flashlua instance"), and run one after the
  -- other, the mailer's run set the publication to its table, so the outbox's slot skipped
  -- for good the outbox row inserted meanwhile (0 events, its position confirmed past it).
  it("two persistent clients with their own slot = ... (as docs/delivery.md's outbox and mailer) run side by side and lose nothing in turn", function()
    local t1, t2 = base .. "_outbox", base .. "_emails"
    local s1, s2 = "nj_outbox_" .. pid, "nj_mailer_" .. pid
    H.sql("CREATE TABLE " .. t1 .. " (id int PRIMARY KEY, v text); CREATE TABLE " .. t2 .. " (id int PRIMARY KEY, v text)")
    drops[#drops + 1] = "DROP TABLE IF EXISTS " .. t1 .. ", " .. t2
    drops[#drops + 1] = "DROP PUBLICATION IF EXISTS flash_publication"
    drops[#drops + 1] = "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name IN ('" ..
      s1 .. "', '" .. s2 .. "') AND NOT active"
    drops[#drops + 1] = "DROP PUBLICATION IF EXISTS " .. s1 .. ", " .. s2
    local function open(slot, t)
      local c = assert(flash.client { dsn = H.dsn, driver = "wal_logical", persistent = true, slot = slot })
      local got = {}
      assert(c:listen { table = t }):on("insert", function(ev) got[#got + 1] = ev.new.v end)
      local ok, err = c:start()
      return ok and c, err, got
    end
    local a, aerr, got_a = open(s1, t1)
    assert.is_truthy(a, aerr)
    local b, berr, got_b = open(s2, t2)
    assert.is_truthy(b, berr)      -- was: publication flash_publication is in use by another running flashlua instance
    H.sql("INSERT INTO " .. t1 .. " VALUES (1, 'o1'); INSERT INTO " .. t2 .. " VALUES (1, 'm1')")
    H.wait(a, got_a, 1, 10)
    H.wait(b, got_b, 1, 10)
    assert.are.same({ "o1" }, got_a)
    assert.are.same({ "m1" }, got_b)
    assert(a:stop())
    -- The mailer alone runs on; the outbox gets a row meanwhile.
    H.sql("INSERT INTO " .. t1 .. " VALUES (2, 'o2')")
    H.settle(b, 0.3)
    assert(b:stop())
    a, aerr, got_a = open(s1, t1)
    assert.is_truthy(a, aerr)
    H.wait(a, got_a, 1, 10)
    H.settle(a, 0.3)
    assert.are.same({ "o2" }, got_a)        -- was: {} (skipped, and confirmed past)
    assert(a:stop())
    assert.are.same({ s2, s1 }, (function()   -- mailer, outbox: each slot its own publication
      local names = {}
      for _, r in ipairs(H.sql("SELECT pubname::text AS n FROM pg_publication WHERE pubname IN ($1, $2) ORDER BY 1", s1, s2)) do
        names[#names + 1] = r.n
      end
      return names
    end)())
  end)

  it("a slot an earlier version made with flash_publication goes on with it (its backlog decodes), and says so", function()
    local t = base .. "_legacy"
    local s = "nj_legacy_" .. pid
    H.sql("CREATE TABLE " .. t .. " (id int PRIMARY KEY, v text)")
    drops[#drops + 1] = "DROP TABLE IF EXISTS " .. t
    drops[#drops + 1] = "DROP PUBLICATION IF EXISTS flash_publication"
    drops[#drops + 1] = "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '" .. s ..
      "' AND NOT active"
    drops[#drops + 1] = "DROP PUBLICATION IF EXISTS " .. s
    -- As an earlier version left it: the slot, with "flash_publication" naming it.
    local c = assert(flash.client { dsn = H.dsn, driver = "wal_logical", persistent = true, slot = s,
      publication = "flash_publication" })
    local got = {}
    assert(c:listen { table = t }):on("insert", function(ev) got[#got + 1] = ev.new.v end)
    assert(c:start())
    assert(c:stop())
    H.sql("INSERT INTO " .. t .. " VALUES (1, 'backlog')")
    local lines = {}
    local old = flash.log.set_sink(function(line) lines[#lines + 1] = line end)
    local ok, err = pcall(function()
      c = assert(flash.client { dsn = H.dsn, driver = "wal_logical", persistent = true, slot = s })
      got = {}
      assert(c:listen { table = t }):on("insert", function(ev) got[#got + 1] = ev.new.v end)
      assert(c:start())
      H.wait(c, got, 1, 10)
      assert(c:stop())
    end)
    flash.log.set_sink(old)
    assert(ok, err)
    assert.are.same({ "backlog" }, got)
    assert.equal("flash_publication", c:stats().publication)
    assert.equal(0, tonumber(H.scalar("SELECT count(*) FROM pg_publication WHERE pubname = $1", s)))
    local said
    for _, l in ipairs(lines) do
      if l:find("slot " .. s .. " goes on with publication flash_publication, which an earlier version made for it " ..
          "(a named persistent slot now gets a publication of its own name; a new slot name starts one)", 1, true) then
        said = true
      end
    end
    assert.is_true(said, table.concat(lines, "\n"))
  end)

  -- README calls examples/exactly_once.lua "an exactly-once table copier". It sent each value
  -- as a text parameter: a bytea value with a NUL byte ('\x00ff') arrived in the copy as ''
  -- (cut at the NUL, silently), and a text[] or jsonb column (a Lua table) stopped it, exit 1:
  -- "bad argument #4 to 'exec' (query parameter of type table cannot be sent ...)".
  it("examples/exactly_once.lua copies arrays, json, jsonb, bytea (NUL bytes, bytea[]) and numerics exactly", function()
    local src = H.table("id int PRIMARY KEY, raw bytea, tags text[], data jsonb, j json, n numeric, ts timestamptz, " ..
      "bb bytea[], m int[]")
    H.sql("ALTER TABLE " .. src .. " REPLICA IDENTITY FULL")
    local dst = H.table("id int, raw bytea, tags text[], data jsonb, j json, n numeric, ts timestamptz, bb bytea[], m int[]")
    local args = { H.root .. "examples/exactly_once.lua", "public." .. src, "public." .. dst, "id", "", "until-current" }
    local slot = ("flash_copy_public_" .. src .. "_public_" .. dst):sub(1, 63)
    drops[#drops + 1] = "DELETE FROM flash_copy_position WHERE name = '" .. slot .. "'"
    drops[#drops + 1] = "SELECT pg_drop_replication_slot('" .. slot .. "')"
    drops[#drops + 1] = "DROP PUBLICATION IF EXISTS " .. slot
    local rc, _, err = H.run_flashlua(args, 30)   -- the first run makes the slot
    assert.equal(0, rc, err)
    H.sql("INSERT INTO " .. src .. [[ VALUES
      (1, '\x41', NULL, NULL, NULL, 1.5, '2026-01-02 03:04:05.123456+00', NULL, NULL),
      (2, '\x00ff5c', '{"a b",NULL,"c\"d"}', '{"k":[1,2.50,null],"s":"é"}', '[1,{"a":null}]',   -- json keeps its text: written as flash.json writes it
       123456789012345678901234567890.123456789, 'infinity', '{"\\x00",NULL}', '{{1,2},{3,4}}'),
      (3, '', '{}', '[]', '{}', 'NaN', NULL, '{}', '{}')]])
    H.sql("UPDATE " .. src .. [[ SET raw = '\x5c313031', tags = '{z}' WHERE id = 1]])
    H.sql("UPDATE " .. src .. " SET id = 10 WHERE id = 3")
    H.sql("DELETE FROM " .. src .. " WHERE id = 10")
    H.sql("INSERT INTO " .. src .. " SELECT 4, raw, tags, data, j, n, ts, bb, m FROM " .. src .. " WHERE id = 2")
    rc, _, err = H.run_flashlua(args, 30)
    assert.equal(0, rc, err)
    local function rows(t)
      local out = {}
      for _, r in ipairs(H.sql("SELECT x::text AS r FROM " .. t .. " x ORDER BY id")) do out[#out + 1] = r.r end
      return out
    end
    local rest = [["\\x00ff5c","{""a b"",NULL,""c\\""d""}","{""k"": [1, 2.50, null], ""s"": ""é""}","[1,{""a"":null}]",]] ..
      [[123456789012345678901234567890.123456789,infinity,"{""\\\\x00"",NULL}","{{1,2},{3,4}}")]]
    assert.are.same({
      [[(1,"\\x5c313031",{z},,,1.5,"2026-01-02 03:04:05.123456+00",,)]],
      "(2," .. rest,
      "(4," .. rest,
    }, rows(src))
    -- Equal as values: jsonb compares numerically (2.50 = 2.5: flash.json gives back a
    -- number that fits a double as the double), json compared as jsonb (its text is the
    -- server's rendering of the copied value).
    local cols = "id, raw, tags, data, j::jsonb, n, ts, bb, m"
    for _, pair in ipairs({ { src, dst }, { dst, src } }) do
      assert.equal(0, tonumber(H.scalar("SELECT count(*) FROM (SELECT " .. cols .. " FROM " .. pair[1] ..
        " EXCEPT ALL SELECT " .. cols .. " FROM " .. pair[2] .. ") x")))
    end
    assert.equal(3, #rows(dst))
  end)

  it("client:query refuses a table or a string with a NUL byte as a parameter, naming $n and the way (a NUL cut the value)", function()
    local c = assert(flash.connect(H.dsn))
    local ok, err = pcall(function() local r = c:query("SELECT $1::bytea AS b", "\0\255") return r end)
    assert.is_false(ok)
    assert.matches("_spec.lua:%d+: bad argument #2 to 'query' %(%$1 holds a NUL byte, which a text parameter cannot carry " ..
      "%(PostgreSQL would get it cut there%): for a bytea value, send it as hex, \"\\x\" followed by two hex digits a byte " ..
      "%(v:gsub%(\"%.\", function%(c%) return %(\"%%02x\"%):format%(c:byte%(%)%) end%)%)%)$", err)
    ok, err = pcall(function() local r = c:query("SELECT $1, $2::jsonb", "x", { 1, 2 }) return r end)
    assert.is_false(ok)
    assert.matches("bad argument #3 to 'query' ($2 is a table, which a query parameter cannot be: for a json, jsonb or " ..
      "array value read from an event, send flash.json.encode(v) as $2::jsonb (a whole row: " ..
      "jsonb_populate_record(NULL::tbl, $2::jsonb), which makes arrays of JSON arrays))", err, 1, true)
    local rows = assert(c:query("SELECT $1::bytea AS b, $2::jsonb AS j", "\\x00ff", flash.json.encode({ 1, 2 })))
    assert.equal("\0\255", rows[1].b)
    assert.are.same({ 1, 2 }, rows[1].j)
    c:stop()
  end)

  it("examples/demo.lua prints what README shows under `make demo`, line for line", function()
    local f = assert(io.open(H.root .. "README.md"))
    local readme = f:read("*a")
    f:close()
    local shown = assert(readme:match("`make demo` prints[^\n]*\n\n```\n(.-)```\n"), "README's demo block")
    drops[#drops + 1] = "DROP TABLE IF EXISTS public.posts"
    local rc, out, err = H.run_flashlua({ H.root .. "examples/demo.lua" }, 30)
    assert.equal(0, rc, err)
    assert.equal(shown, out)
  end)

  -- README's backfill cache and `--table ... --backfill` line, and docs/backfill.md's, ran on
  -- an ordinary table (a primary key, no REPLICA IDENTITY FULL) exited 1 at once: "table
  -- public.users does not have REPLICA IDENTITY FULL ...". They now say replica_identity.
  it("README's backfill cache, run as shown on a table with a primary key, warms the cache and follows changes", function()
    local f = assert(io.open(H.root .. "README.md"))
    local readme = f:read("*a")
    f:close()
    local block = assert(readme:match("## Backfill: the existing rows, then the changes.-```lua\n(.-)```\n"))
    H.sql("CREATE TABLE public.users (id int PRIMARY KEY, email text); INSERT INTO public.users VALUES (1, 'a@x'), (2, 'b@x')")
    drops[#drops + 1] = "DROP TABLE IF EXISTS public.users"
    local path = H.script(block .. [[
flash.every(0.3, function()
  if cache[1] == "a@x" then assert(c:query("UPDATE public.users SET email = 'A@x' WHERE id = 1; DELETE FROM public.users WHERE id = 2")) end
  if cache[1] == "A@x" and not cache[2] then print("cache", cache[1], cache[2]) flash.stop() end
end)
]])
    local rc, out, err = H.run_flashlua({ path }, 30)
    os.remove(path)
    assert.equal(0, rc, err)
    assert.equal("cache warm\ncache\tA@x\tnil\n", out)
    local cmd = readme:match("\n(flashlua %-d postgres://localhost/app %-%-table public%.users %-%-backfill[^#\n]*)#")
    assert.is_truthy(cmd)
    local args = {}
    for w in cmd:gmatch("%S+") do args[#args + 1] = w end
    assert.are.same({ "flashlua", "-d", "postgres://localhost/app", "--table", "public.users", "--backfill" }, { unpack(args, 1, 6) })
    local h = H.spawn({ unpack(args, 4) })
    spawned[#spawned + 1] = h
    assert.is_true(h.await('"op":"read"', 20), h.err())
    h.kill("INT")
    assert.equal(0, h.wait(10), h.err())
  end)

  -- docs/delivery.md: "a batching script flushes in a hook and loses nothing", and the stop
  -- hooks "acknowledge what they flush before the final confirmation". Under a trigger
  -- driver's persistent schema the rows acknowledged in the hook stayed in the capture table
  -- ("N captured changes wait for the next run") and the next run delivered them again.
  for _, driver in ipairs({ "trigger", "wal_logical" }) do
    it(driver .. ", ack = \"manual\": a batch acknowledged in the stop hook is not delivered again by the next run", function()
      local t = base .. "_jobs_" .. driver
      local name = "flash_nj_" .. driver .. "_" .. pid
      H.sql("CREATE TABLE " .. t .. " (id int PRIMARY KEY, v text)")
      drops[#drops + 1] = "DROP TABLE IF EXISTS " .. t
      if driver == "trigger" then
        drops[#drops + 1] = "DROP SCHEMA IF EXISTS " .. name .. " CASCADE"
      else
        drops[#drops + 1] = "SELECT pg_drop_replication_slot('" .. name .. "')"
        drops[#drops + 1] = "DROP PUBLICATION IF EXISTS " .. name
      end
      local function run(write)
        local c = assert(flash.client { dsn = H.dsn, driver = driver, persistent = true, schema = name, slot = name,
          ack = "manual" })
        local buf, sent = {}, {}
        assert(c:listen { table = t }):on("insert", function(ev) buf[#buf + 1] = ev end)
        c:on_stop(function()
          for _, ev in ipairs(buf) do sent[#sent + 1] = ev.new.id end
          if #buf > 0 then c:ack_through(buf[#buf]) end
        end)
        assert(c:start())
        if write then H.sql("INSERT INTO " .. t .. " SELECT g, 'x' FROM generate_series(1, 3) g") end
        H.wait(c, buf, 3, 10)
        H.settle(c, 0.3)
        assert(c:stop())
        return sent
      end
      assert.are.same({ 1, 2, 3 }, run(true))
      assert.are.same({}, run(false))      -- was (trigger): { 1, 2, 3 } again
    end)
  end

  -- `--where "note = null"` compared with the text 'null': it passed the row whose note is
  -- the text "null" and none whose note is NULL, silently.
  it("--where: a bare null is NULL (= null, <> null), 'null' quoted the text; a table in a mixed-case schema", function()
    H.sql([[CREATE SCHEMA "Nj]] .. pid .. [["; CREATE TABLE "Nj]] .. pid .. [["."OrderLines" ("Id" int PRIMARY KEY, note text)]])
    drops[#drops + 1] = 'DROP SCHEMA IF EXISTS "Nj' .. pid .. '" CASCADE'
    local t = '"Nj' .. pid .. '"."OrderLines"'
    local hs = {}
    for i, w in ipairs({ "note = null", "note = 'null'", "note <> NULL", "note != null" }) do
      hs[i] = H.spawn({ "--table", t, "--where", w })
      spawned[#spawned + 1] = hs[i]
      assert.is_true(hs[i].await("listening on Nj" .. pid .. ".OrderLines", 20, "err"), hs[i].err())
    end
    H.sql("INSERT INTO " .. t .. " VALUES (1, NULL), (2, 'null'), (3, 'x')")
    local want = { "1", "2", "2 3", "2 3" }
    for i, h in ipairs(hs) do
      local n = #want[i]:gsub(" ", "")
      local deadline = core.now() + 20
      while select(2, h.out():gsub("\n", "")) < n and core.now() < deadline do core.sleep(0.05) end
      h.kill("INT")
      assert.equal(0, h.wait(20), h.err())
      local ids = {}
      for line in h.out():gmatch("[^\n]+") do ids[#ids + 1] = tostring(require("cjson").decode(line).new.Id) end
      assert.equal(want[i], table.concat(ids, " "))
    end
    for _, c in ipairs({
      { "note < null", "nothing is < null: use 'is null' or 'is not null' ('null' in quotes is the text)" },
      { "note in (a, null)", "a bare null in an 'in' list matches nothing: 'null' in quotes is the text, and " ..
        "'note is null' a condition of its own" },
    }) do
      local rc, out, err = H.run_flashlua({ "--table", t, "--where", c[1] }, 20)
      assert.equal(2, rc)
      assert.equal("", out)
      assert.equal("flashlua: cannot read --where '" .. c[1] .. "': " .. c[2] .. " (expected col = value, col <> value, " ..
        "col >= value, col is null, col is not null, col in (a, b); see --help)\nTry 'flashlua --help' for more information.\n", err)
    end
  end)

  -- examples/json_lines.lua says it is "like flashlua --table, for several tables", but wrote
  -- a bytea value as its raw bytes ("\u0000\udcffA", which jq shows as "\u0000�A") where
  -- --table writes "\\x00ff41".
  it("examples/json_lines.lua writes bytea (and bytea[]) as --table does, \"\\\\x\" and hex", function()
    local t = H.table("id int PRIMARY KEY, raw bytea, rr bytea[]")
    local lines = {}
    for i, args in ipairs({ { H.root .. "examples/json_lines.lua", "public." .. t }, { "--table", "public." .. t } }) do
      local h = H.spawn(args)
      spawned[#spawned + 1] = h
      assert.is_true(h.await("listening on public." .. t, 20, "err"), h.err())
      if i == 2 then H.sql("INSERT INTO " .. t .. [[ VALUES (1, '\x00ff41', '{"\\x00",NULL}')]]) end
      lines[i] = h
    end
    for i, h in ipairs(lines) do
      assert.is_true(h.await("\n", 20), h.err())
      h.kill("INT")
      assert.equal(0, h.wait(20), h.err())
      local ev = require("cjson").decode(h.out())
      lines[i] = { ev.new.raw, ev.new.rr[1], ev.new.rr[2] }
    end
    assert.are.same({ "\\x00ff41", "\\x00", require("cjson").null }, lines[1])
    assert.are.same(lines[2], lines[1])
  end)
end)
