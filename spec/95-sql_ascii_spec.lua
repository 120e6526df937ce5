-- spec/95-sql_ascii_spec.lua: a database created with ENCODING 'SQL_ASCII' stores whatever
-- bytes a writer sends. An unprivileged writer's E'a\xffb' stopped every driver (the
-- server refused to convert the bytes for flashlua's UTF8 connections: the trigger drivers
-- exited with `invalid byte sequence for encoding "UTF8": 0xff`, wal_logical lost the
-- walsender, and with it the rows). Now the connections to such a database ask for
-- SQL_ASCII: values arrive as the stored bytes, under every driver and in backfills, and
-- the CLI's JSON lines write a byte of no valid UTF-8 sequence as \udcXX (README, "Values
-- that are not UTF-8").
local flash = require "flash"
local core = require "flash.core"
local H = require "helpers"

local pid = core.getpid()
local DB = "flash_sa_" .. pid
local ROLE = "flash_sa_writer"
local function dsn_of(user)
  local d = H.dsn:gsub("dbname=%S+", ""):gsub("user=%S+", "")
  return d .. " dbname=" .. DB .. " user=" .. user
end
local ADMIN_DSN = dsn_of(H.dsn:match("user=(%S+)") or "postgres")
local WRITER_DSN = dsn_of(ROLE)

-- Every byte 0x80..0xff, valid UTF-8 (é, €), a cut sequence, plain ASCII.
local HIGH = {}
for b = 0x80, 0xff do HIGH[#HIGH + 1] = string.char(b) end
HIGH = table.concat(HIGH)
local VALUES = {
  { id = 1, x = "a\255b", v = HIGH, a = { "\128", "ok", "\195\169", "\195" } },
  { id = 2, x = "\195\169\226\130\172", v = "plain", a = {} },
  { id = 3, x = "plain ascii", v = "\195(", a = { "x\254y" } },
}

-- A SQL literal of any bytes, in ASCII: E'...' with \xNN for each byte >= 0x80.
local function lit(s)
  return "E'" .. s:gsub("[%z\1-\31'\\\128-\255]", function(c) return string.format("\\x%02x", c:byte()) end) .. "'"
end
local function arr(list)
  local parts = {}
  for i, s in ipairs(list) do parts[i] = lit(s) end
  return "ARRAY[" .. table.concat(parts, ",") .. "]::text[]"
end
local function row_sql(r)
  return string.format("(%d, %s, %s, %s)", r.id, lit(r.x), lit(r.v), arr(r.a))
end

-- The writer: an unprivileged role, on its own connection, writing SQL in ASCII.
local writer
local function write(sql)
  writer = writer or assert(flash.connect(WRITER_DSN))
  assert(writer:query(sql))
end

local admin
local function asql(sql)
  admin = admin or assert(flash.connect(ADMIN_DSN))
  local rows, err = admin:query(sql)
  assert(rows, err)
  return rows
end

local function same_array(want, got, what)
  assert.are.equal("table", type(got), what)
  assert.are.equal(#want, #got, what)
  for i = 1, #want do assert.are.equal(want[i], got[i], what .. "[" .. i .. "]") end
end

local function check_row(want, got, what)
  assert.is_table(got, what)
  assert.are.equal(want.id, got.id, what)
  assert.are.equal(want.x, got.x, what .. ".x")
  assert.are.equal(want.v, got.v, what .. ".v")
  same_array(want.a, got.a, what .. ".a")
end

-- Runs client c until `n` events are in `list`; fails on an error of the client's poll.
local function wait(c, list, n, timeout)
  local deadline = core.now() + (timeout or 20)
  while #list < n and core.now() < deadline do assert(c:poll(0.05)) end
  return list
end

-- A JSON object's text with its members (and those of objects in it) sorted: two lines
-- that are equal by this wrote the same members with the same text.
local function members(text)
  if text:sub(1, 1) ~= "{" then return text end
  local parts, depth, start, in_str, i = {}, 0, 2, false, 2
  while i < #text do
    local c = text:sub(i, i)
    if in_str then
      if c == "\\" then i = i + 1 elseif c == '"' then in_str = false end
    elseif c == '"' then in_str = true
    elseif c == "{" or c == "[" then depth = depth + 1
    elseif c == "}" or c == "]" then depth = depth - 1
    elseif c == "," and depth == 0 then
      parts[#parts + 1] = text:sub(start, i - 1)
      start = i + 1
    end
    i = i + 1
  end
  parts[#parts + 1] = text:sub(start, #text - 1)
  for k, m in ipairs(parts) do
    local key, value = m:match('^("[^"]*"):(.*)$')
    parts[k] = key .. ":" .. members(value)
  end
  table.sort(parts)
  return "{" .. table.concat(parts, ",") .. "}"
end

local HAVE_EXT = false

describe("a SQL_ASCII database", function()
  setup(function()
    H.sql(string.format([[DO $$ BEGIN
      IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '%s') THEN CREATE ROLE %s LOGIN NOSUPERUSER; END IF;
    END $$]], ROLE, ROLE))
    H.sql("DROP DATABASE IF EXISTS " .. DB .. " WITH (FORCE)")
    H.sql("CREATE DATABASE " .. DB .. " ENCODING 'SQL_ASCII' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'")
    HAVE_EXT = #asql("SELECT 1 FROM pg_catalog.pg_available_extensions WHERE name = 'flashlua'") > 0
    if HAVE_EXT then asql("CREATE EXTENSION flashlua") end
    assert.are.equal("SQL_ASCII", asql("SHOW server_encoding")[1].server_encoding)
  end)

  teardown(function()
    if writer then writer:stop() end
    if admin then admin:stop() end
    H.wait_for(function()
      H.sql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1 AND NOT active", DB)
      return tonumber(H.scalar("SELECT count(*) AS n FROM pg_replication_slots WHERE database = $1", DB)) == 0
    end, 10)
    H.sql("DROP DATABASE IF EXISTS " .. DB .. " WITH (FORCE)")
    H.sql("DROP ROLE IF EXISTS " .. ROLE)
  end)

  local n = 0
  -- A fresh table t_N (id, text, varchar, text[]) the writer may write, REPLICA IDENTITY FULL.
  local function new_table(rows)
    n = n + 1
    local t = "t_" .. n
    asql(string.format("CREATE TABLE %s (id int PRIMARY KEY, x text, v varchar(200), a text[]);" ..
      " ALTER TABLE %s REPLICA IDENTITY FULL; GRANT SELECT, INSERT, UPDATE, DELETE ON %s TO %s", t, t, t, ROLE))
    if rows then
      local vals = {}
      for i, r in ipairs(rows) do vals[i] = row_sql(r) end
      write("INSERT INTO " .. t .. " VALUES " .. table.concat(vals, ", "))
    end
    return t
  end

  local cases = {}
  for _, d in ipairs(H.drivers) do cases[#cases + 1] = { driver = d } end
  cases[#cases + 1] = { driver = "wal_logical", persistent = true }

  for _, case in ipairs(cases) do
    local label = case.driver .. (case.persistent and " (persistent)" or "")
    it(label .. ": every event carries the stored bytes, and the client keeps running", function()
      if case.driver == "pg_extension" and not HAVE_EXT then pending("no flashlua extension on the server") return end
      local t = new_table()
      local opts = { dsn = ADMIN_DSN, driver = case.driver }
      if case.persistent then
        opts.persistent, opts.slot = true, "flash_sa_" .. pid
      end
      local c = assert(flash.client(opts))
      local l = assert(c:listen { table = "public." .. t })
      local got = {}
      l:on("all", function(ev) got[#got + 1] = ev end)
      assert(c:start())
      finally(function() c:stop() end)
      write("INSERT INTO " .. t .. " VALUES " .. row_sql(VALUES[1]) .. ", " .. row_sql(VALUES[2]))
      write("INSERT INTO " .. t .. " VALUES " .. row_sql(VALUES[3]))
      write("UPDATE " .. t .. " SET x = " .. lit("\255\254") .. " WHERE id = 1")
      write("DELETE FROM " .. t .. " WHERE id = 2")
      wait(c, got, 5)
      local ops = {}
      for i, ev in ipairs(got) do ops[i] = ev.op end
      assert.are.same({ "insert", "insert", "insert", "update", "delete" }, ops)
      check_row(VALUES[1], got[1].new, "insert 1")
      check_row(VALUES[2], got[2].new, "insert 2")
      check_row(VALUES[3], got[3].new, "insert 3")
      check_row(VALUES[1], got[4].old, "update old")
      local upd = { id = 1, x = "\255\254", v = HIGH, a = VALUES[1].a }
      check_row(upd, got[4].new, "update new")
      check_row(VALUES[2], got[5].old, "delete old")
      -- Still running: a later plain row arrives.
      write("INSERT INTO " .. t .. " VALUES (4, 'after', 'after', '{}')")
      wait(c, got, 6)
      assert.are.equal(6, #got)
      assert.are.equal("after", got[6].new.x)
      c:stop()
      if case.persistent then H.drop_slot(opts.slot) end
    end)
  end

  for _, driver in ipairs({ "wal_logical", "trigger", "trigger_global", "trigger_statement" }) do
    it(driver .. ": a backfill reads the stored bytes", function()
      local t = new_table(VALUES)
      local c = assert(flash.client { dsn = ADMIN_DSN, driver = driver })
      local l = assert(c:listen { table = "public." .. t })
      local got, done = {}, false
      l:on("all", function(ev) got[#got + 1] = ev end)
      l:backfill { on_done = function() done = true end }
      assert(c:start())
      finally(function() c:stop() end)
      local deadline = core.now() + 30
      while not done and core.now() < deadline do assert(c:poll(0.05)) end
      assert.is_true(done, "backfill did not finish")
      assert.are.equal(3, #got)
      table.sort(got, function(x, y) return x.new.id < y.new.id end)
      for i = 1, 3 do
        assert.are.equal("read", got[i].op)
        check_row(VALUES[i], got[i].new, "read " .. i)
      end
    end)
  end

  it("the Redis sink writes the bytes as \\udcXX and a redis_streams worker gets them back exactly", function()
    if os.execute("command -v redis-server >/dev/null 2>&1") ~= 0 then pending("no redis-server") return end
    local sess = H.session()
    local slot = "flash_sa_redis_" .. pid
    local f = H.redis_fixture(sess, slot, 95)
    f.setup()
    local c, w
    finally(function()
      if w then w:stop() end
      if c then c:stop() end
      f.teardown()
      H.wait_for(function()
        asql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '" .. slot .. "' AND NOT active")
        return #asql("SELECT 1 FROM pg_replication_slots WHERE slot_name = '" .. slot .. "'") == 0
      end, 10)
    end)
    H.redis_start(f.dir, f.port)
    local t = new_table()
    local sink = flash.sink.redis { url = "redis://127.0.0.1:" .. f.port, partitions = 2, stream = "sa" }
    c = assert(flash.client { dsn = ADMIN_DSN, driver = "wal_logical", persistent = true, slot = slot, ack = "manual" })
    assert(c:listen { table = "public." .. t }):on("all", sink)        -- the direct path: C writes the JSON
    assert(c:start())
    w = assert(flash.client { dsn = ADMIN_DSN, driver = "redis_streams", url = "redis://127.0.0.1:" .. f.port,
      stream = "sa", partitions = 2, group = "sa" })
    local got = {}
    assert(w:listen { table = "public." .. t }):on("all", function(ev) got[#got + 1] = ev end)
    assert(w:start())
    write("INSERT INTO " .. t .. " VALUES " .. row_sql(VALUES[1]) .. ", " .. row_sql(VALUES[3]))
    -- The loop (the sink is one of its sources) runs both until the worker has both rows.
    local deadline = core.now() + 20
    local cancel = flash.every(0.05, function()
      if #got >= 2 or core.now() > deadline then flash.stop() end
    end)
    local ok, err = c.loop:run({ c, w })
    cancel()
    c, w = nil, nil
    assert(ok, err)
    assert.are.equal(2, #got, "sent " .. sink.stats.sent .. ", direct " .. sink.stats.direct)
    table.sort(got, function(x, y) return x.new.id < y.new.id end)
    check_row(VALUES[1], got[1].new, "worker 1")
    check_row(VALUES[3], got[2].new, "worker 3")
    -- The entry's text: UTF-8, the byte as \udcff.
    local conn = assert(core.redis_connect("127.0.0.1", f.port, 2))
    local replies = assert(conn:pipeline({ { "XRANGE", "sa:0", "-", "+" }, { "XRANGE", "sa:1", "-", "+" } }))
    conn:close()
    local texts = {}
    for _, r in ipairs(replies) do
      for _, e in ipairs(r) do texts[#texts + 1] = e[2][4] end
    end
    assert.are.equal(2, #texts)
    for _, text in ipairs(texts) do assert.are.equal(text, core.text_escape(text)) end
    local joined = table.concat(texts, "\n")
    assert.truthy(joined:find('"x":"a\\udcffb"', 1, true), joined)
    assert.truthy(joined:find('"v":"\\udcc3("', 1, true), joined)
  end)

  it("flashlua --table prints each byte of no valid UTF-8 sequence as \\udcXX, and flash.json reads the bytes back", function()
    local t = new_table()
    local h = H.spawn({ "-d", ADMIN_DSN, "--table", t, "--driver", "trigger", "--fields", "x,a" })
    finally(function()
      if h.wait(0.1) == nil then h.kill("KILL") h.wait(5) end
      for _, ext in ipairs({ ".out", ".err", ".rc" }) do os.remove(h.base .. ext) end
    end)
    assert.is_true(h.await("listening on public." .. t, 20, "err"), h.err())
    write("INSERT INTO " .. t .. " VALUES " .. row_sql(VALUES[1]))
    write("INSERT INTO " .. t .. " VALUES (2, 'after', 'after', '{}')")
    assert.is_true(h.await('"after"', 20), h.out() .. h.err())
    h.kill("INT")
    assert.are.equal(0, h.wait(20), h.err())
    local lines = {}
    for line in h.out():gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert.are.equal(2, #lines, h.out())
    -- The line's text exactly, but for the order of an object's members (a Lua table's).
    local line = lines[1]:gsub('"xid":%d+', '"xid":N')
    assert.are.equal(members('{"table":"public.' .. t .. '","new":{"x":"a\\udcffb","a":["\\udc80","ok","\195\169","\\udcc3"]},' ..
      '"op":"insert","source":"public.' .. t .. '","xid":N}'), members(line))
    local ev = assert(flash.json.decode(lines[1]))
    assert.are.equal("a\255b", ev.new.x)
    same_array(VALUES[1].a, ev.new.a, "a")
  end)
end)

describe("text that is not UTF-8, as output", function()
  it("flash.json writes each byte of no valid UTF-8 sequence as \\udcXX and reads every byte string back", function()
    local json = flash.json
    assert.are.equal('"a\\udcffb"', json.encode("a\255b"))
    assert.are.equal('"\195\169\\udcc3"', json.encode("\195\169\195"))                -- é as is; a cut sequence
    assert.are.equal('"\\udced\\udca0\\udc80"', json.encode("\237\160\128"))         -- a surrogate's bytes
    assert.are.equal('"\\udcc0\\udcaf"', json.encode("\192\175"))                    -- overlong '/'
    assert.are.equal("a\255b", json.decode('"a\\udcffb"'))
    -- Not the bytes of an escape: a lone surrogate outside DC80..DCFF is still an error.
    assert.is_nil(json.decode('"\\udc7f"'))
    -- Long texts are escaped in 4 KB pieces: a character across a piece's end stays itself
    -- (it was written as two \udcXX).
    for at = 4093, 4097 do
      for _, ch in ipairs({ "\195\169", "\226\130\172", "\240\159\152\128" }) do
        local s = ("a"):rep(at) .. ch .. ("b"):rep(10)
        assert.are.equal('"' .. s .. '"', json.encode(s))
      end
    end
    -- Every byte, and random byte strings, come back exactly; the text is valid UTF-8.
    local all = {}
    for b = 0, 255 do all[#all + 1] = string.char(b) end
    local strings = { table.concat(all), HIGH }
    math.randomseed(95)
    for _ = 1, 2000 do
      local t = {}
      for i = 1, math.random(0, 12) do t[i] = string.char(math.random(0, 255)) end
      strings[#strings + 1] = table.concat(t)
    end
    for _, s in ipairs(strings) do
      local text = json.encode({ s = s, a = json.array({ s }) })
      assert.are.equal(text, core.text_escape(text), "not UTF-8: " .. text)
      local back = json.decode(text)
      assert.are.equal(s, back.s)
      assert.are.equal(s, back.a[1])
    end
  end)

  it("log lines quote such a byte as \\xNN (text) or \\udcXX (JSON), and stay UTF-8", function()
    local lines = {}
    local old = flash.log.set_sink(function(line) lines[#lines + 1] = line end)
    flash.log.warn("value 'a\255b' and \195\169")
    flash.log.set_format("json")
    flash.log.warn("value 'a\255b' and \195\169")
    flash.log.set_format("text")
    flash.log.set_sink(old)
    assert.matches(" WARN  value 'a\\xffb' and \195\169$", lines[1])
    assert.matches([["msg":"value 'a\udcffb' and ]] .. "\195\169\"", lines[2], 1, true)
    assert.are.equal("a\255b", flash.json.decode(lines[2]).msg:match("'(.*)'"))
  end)
end)

describe("a LATIN1 database", function()
  local db = "flash_l1_" .. pid
  local dsn = H.dsn:gsub("dbname=%S+", "") .. " dbname=" .. db
  setup(function()
    H.sql("DROP DATABASE IF EXISTS " .. db .. " WITH (FORCE)")
    H.sql("CREATE DATABASE " .. db .. " ENCODING 'LATIN1' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'")
  end)
  teardown(function()
    H.wait_for(function()
      H.sql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1 AND NOT active", db)
      return tonumber(H.scalar("SELECT count(*) AS n FROM pg_replication_slots WHERE database = $1", db)) == 0
    end, 10)
    H.sql("DROP DATABASE IF EXISTS " .. db .. " WITH (FORCE)")
  end)

  for _, driver in ipairs({ "trigger", "wal_logical" }) do
    it(driver .. ": text is still converted to UTF-8 by the server", function()
      local w = assert(flash.connect(dsn))
      finally(function() w:stop() end)
      local t = "l1_" .. driver
      assert(w:query("CREATE TABLE " .. t .. " (id int PRIMARY KEY, x text)"))
      local c = assert(flash.client { dsn = dsn, driver = driver })
      local got = {}
      assert(c:listen { table = t }):on("insert", function(ev) got[#got + 1] = ev end)
      assert(c:start())
      finally(function() c:stop() end)
      -- E'\xe9\xff': é and ÿ in LATIN1, written in ASCII.
      assert(w:query("INSERT INTO " .. t .. " VALUES (1, E'\\xe9\\xff')"))
      wait(c, got, 1)
      assert.are.equal("\195\169\195\191", got[1].new.x)
      assert.are.equal('"\195\169\195\191"', flash.json.encode(got[1].new.x))
    end)
  end
end)
