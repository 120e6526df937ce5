-- spec/66-redis_sink_spec.lua: the Redis Streams sink (issue 13, item 2) against a real
-- redis-server (Debian's, started here with its append-only file): every event reaches
-- Redis once or more, never less, each row's events in one partition stream and in commit
-- order, and nothing is acknowledged to the slot before Redis holds it -- across a Redis
-- restart in the middle of the stream.
local core = require "flash.core"
local H = require "spec.helpers"
local json = require "flash.json"
local sinkmod = require "flash.sink.redis"

local PARTS = 3

-- Every entry of the partition streams: { [p] = { {id=, table=, op=, event=}, ... } }.
local function entries(port, parts, stream)
  parts = parts or PARTS
  local conn = assert(core.redis_connect("127.0.0.1", port, 2))
  local cmds = {}
  for p = 0, parts - 1 do cmds[#cmds + 1] = { "XRANGE", (stream or "flash") .. ":" .. p, "-", "+" } end
  local replies = assert(conn:pipeline(cmds))
  conn:close()
  local out = {}
  for p = 0, parts - 1 do
    out[p] = {}
    for _, e in ipairs(replies[p + 1]) do
      -- An entry's fields are `id` and `event`, in that order (docs/scale-out.md); table
      -- and op are the event's own, kept here for the assertions below.
      assert.equal(4, #e[2], e[1])
      assert.same({ "id", "event" }, { e[2][1], e[2][3] })
      local f = { id = e[2][2], event = e[2][4] }
      local ev = json.decode(f.event)
      f.table, f.op = ev.table, ev.op
      out[p][#out[p] + 1] = f
    end
  end
  return out
end

describe("flash.sink.redis", function()
  local s = H.session()
  local slot = "flash_spec_redis"
  local f = H.redis_fixture(s, slot, 0)
  before_each(f.setup)
  after_each(f.teardown)

  it("refuses options it does not know and a client that acknowledges automatically", function()
    assert.has_error(function() sinkmod.new { partitons = 2 } end, "bad argument #1 to 'redis' (unknown option 'partitons' (did you mean 'partitions'?))")
    assert.has_error(function() sinkmod.new { url = "http://x" } end,
      "bad argument #1 to 'redis' (option 'url': redis://HOST[:PORT] or unix:///PATH expected, got http://x)")
    -- Wrong types and values are refused here, naming the option, not later by the C outbox
    -- ("bad argument #5 to 'redis_outbox'") or by Redis (a MAXLEN of -5 refused at every
    -- XADD, retried forever).
    local function refused(opts, msg)
      local ok, err = pcall(sinkmod.new, opts)
      assert.is_false(ok)
      assert.equal("bad argument #1 to 'redis' (" .. msg .. ")", (tostring(err):gsub("^.-:%d+: ", "")))
    end
    refused({ maxlen = "1000" }, "option 'maxlen': a whole number >= 1 expected, got string")
    refused({ maxlen = -5 }, "option 'maxlen': a whole number >= 1 expected, got -5")
    refused({ batch = 0 }, "option 'batch': a whole number >= 1 expected, got 0")
    refused({ batch = 2.5 }, "option 'batch': a whole number >= 1 expected, got 2.5")
    refused({ timeout = "5" }, "option 'timeout': seconds (a number > 0) expected, got string")
    refused({ timeout = 0 }, "option 'timeout': seconds (a number > 0) expected, got 0")
    refused({ stream = {} }, "option 'stream': a non-empty string expected, got table")
    refused({ stream = "" }, "option 'stream': a non-empty string expected, got an empty string")
    refused({ key = {} }, "option 'key': a list of column names expected, got an empty table")
    refused({ key = { "id", 2 } }, "option 'key': column names expected, got a number at [2]")
    assert.is_table(sinkmod.new { maxlen = 1000, batch = 10, timeout = 0.5, stream = "s", key = { "a", "b" } })
    -- A database number was dropped without a word (the streams went to database 0).
    refused({ url = "redis://127.0.0.1:6379/2" }, "option 'url': redis://HOST[:PORT] or unix:///PATH expected, got " ..
      "redis://127.0.0.1:6379/2 (a database number is not supported: the streams are in database 0)")
    refused({ url = "redis://127.0.0.1:70000" }, "option 'url': redis://HOST[:PORT] or unix:///PATH expected, got " ..
      "redis://127.0.0.1:70000 (the port is 1 to 65535)")
    assert.is_table(sinkmod.new { url = "redis://127.0.0.1:6379/0" })
    local cok, cerr = pcall(require("flash").client, { driver = "redis_streams", url = "redis://127.0.0.1:6379/1" })
    assert.is_false(cok)
    assert.equal("bad argument #1 to 'client' (option 'url': redis://HOST[:PORT] or unix:///PATH expected, got redis://127.0.0.1:6379/1 " ..
      "(a database number is not supported: the streams are in database 0))", (tostring(cerr):gsub("^.-:%d+: ", "")))
    local rc2, _, err2 = H.run_flashlua({ "--table", "t", "--to", "redis://127.0.0.1:6379/3" }, 20)
    assert.equal(2, rc2)
    assert.equal("flashlua: --to takes redis://HOST[:PORT] or unix:///PATH, got 'redis://127.0.0.1:6379/3' (a database number is " ..
      "not supported: the streams are in database 0)\nTry 'flashlua --help' for more information.\n", err2)
    -- The error names the script's line, as flash.client's do.
    local rc, _, err = H.run_flashlua({ "-e", "require('flash').sink.redis { maxlen = -5 }" }, 20)
    assert.equal(1, rc)
    assert.equal("flashlua: (command line):1: bad argument #1 to 'redis' (option 'maxlen': a whole number >= 1 " ..
      "expected, got -5)\n", err)
    assert.equal(sinkmod.new, require("flash").sink.redis)   -- flash.sink.redis{...} is the same
    local sink = sinkmod.new {}
    assert.has_error(function() sink({ op = "insert", table = "t", new = {} }) end,
      "flash.sink.redis needs flash.client{ ack = \"manual\", persistent = true }: an event is acknowledged " ..
      "only once Redis holds it")
  end)

  it("puts an event in the partition of the documented hash of its table and key, whatever the key values", function()
    -- The partition is computed in C; it must stay the Lua definition's (a key's partition
    -- never changes between versions): hash(table .. "\0" .. the key columns' tostring()
    -- joined by "\0", "" for nil), from the old row when there is one.
    local sink = sinkmod.new { partitions = 7, stream = "s", key = { "id", "k" } }
    local values = { 1, -1, 0, -0.0, 1.5, -2.25, 1 / 3, 99999999999999, -99999999999999, 1e14, 1e15, 2 ^ 53, -2 ^ 63,
                     1e300, "x", "", "ü€ 😀", "a\0b", "12", true, false, json.null, json.number("12345678901234567890") }
    local function part(row)
      local texts = {}
      for i, col in ipairs({ "id", "k" }) do
        local v = type(row) == "table" and row[col]
        texts[i] = v == nil and "" or tostring(v)
      end
      return "s:" .. sinkmod.hash("public.t\0" .. table.concat(texts, "\0")) % 7
    end
    local n = 0
    for i = 1, #values + 1 do
      for j = #values + 1, 1, -1 do
        local row = { id = values[i], k = values[j] }   -- index #values + 1: nil
        assert.equal(part(row), sink:stream_of({ table = "public.t", op = "insert", new = row }))
        assert.equal(part(row), sink:stream_of({ table = "public.t", op = "update", old = row, new = { id = 0 } }))
        n = n + 1
      end
    end
    assert.equal((#values + 1) ^ 2, n)
    -- No row at all (a truncate): the key columns are false.
    assert.equal(part(nil), sink:stream_of({ table = "public.t", op = "truncate" }))
    assert.equal("s:" .. sinkmod.hash("public.t\0false\0false") % 7, sink:stream_of({ table = "public.t", op = "truncate" }))
    -- key = function(ev): its tostring().
    local byfn = sinkmod.new { partitions = 5, key = function(ev) return ev.new.a * 2 end }
    for _, a in ipairs({ 1, 2.5, -7 }) do
      assert.equal("flash:" .. sinkmod.hash("public.t\0" .. tostring(a * 2)) % 5,
        byfn:stream_of({ table = "public.t", op = "insert", new = { a = a } }))
    end
  end)

  it("writes every event, each row's in one partition in commit order, across a Redis restart", function()
    local t = H.table("id int PRIMARY KEY, v int")
    H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
    local conn = H.redis_start(f.dir, f.port)
    local path = s.script(string.format([[
local flash = require "flash"
local sink = require("flash.sink.redis").new { url = "redis://127.0.0.1:%d", partitions = %d, batch = 50 }
local c = assert(flash.client { driver = "wal_logical", persistent = true, slot = %q, publication = %q,
  ack = "manual", max_unacked = 500 })
assert(c:listen { table = %q }):on("all", sink)
assert(c:start())
io.stderr:write("ready\n")
flash.every(0.05, function()
  local st = c:stats()
  io.stdout:write(string.format("unacked %%d sent %%d errors %%d\n", st.unacked, sink.stats.sent, sink.stats.errors))
  io.stdout:flush()
end)
assert(flash.run())
]], f.port, PARTS, slot, slot, t))
    local h = s.spawn({ path })
    assert.is_true(h.await("ready", 15, "err"), h.err())
    H.sql("INSERT INTO " .. t .. " SELECT g, 0 FROM generate_series(1, 200) g")
    H.sql("UPDATE " .. t .. " SET v = 1 WHERE id <= 50")
    assert.is_true(H.wait_for(function() return h.out():find("unacked 0 sent 250 ", 1, true) ~= nil end, 20),
      h.out() .. h.err())
    -- Redis goes away; writes go on; nothing is acknowledged meanwhile.
    H.redis_stop(conn)
    H.sql("DELETE FROM " .. t .. " WHERE id > 150")
    H.sql("UPDATE " .. t .. " SET v = 2 WHERE id <= 10")
    assert.is_true(H.wait_for(function() return h.out():find("unacked 60 sent 250 errors [1-9]") ~= nil end, 20),
      h.out() .. h.err())
    -- Back with its append-only file: the waiting events are written, then acknowledged.
    H.redis_start(f.dir, f.port)
    assert.is_true(H.wait_for(function() return h.out():find("unacked 0 sent 310 ", 1, true) ~= nil end, 20),
      h.out() .. h.err())
    h.kill("TERM")
    assert.equal(0, h.wait(20), h.err())

    local want = {}
    for i = 1, 200 do want[#want + 1] = "insert " .. i .. " 0" end
    for i = 1, 50 do want[#want + 1] = "update " .. i .. " 1" end
    for i = 151, 200 do want[#want + 1] = "delete " .. i .. " 0" end
    for i = 1, 10 do want[#want + 1] = "update " .. i .. " 2" end
    local seen, where, count = {}, {}, 0
    for p, list in pairs(entries(f.port)) do
      local last = {}
      for _, e in ipairs(list) do
        local ev = json.decode(e.event)
        local row = ev.op == "delete" and ev.old or ev.new
        local k = string.format("%s %d %d", ev.op, row.id, row.v)
        -- A row's events all go to one partition, and come in the order they were made.
        where[row.id] = where[row.id] or p
        assert.equal(where[row.id], p, "row " .. row.id .. " in two partitions")
        assert.equal(e.id, ev.id)
        assert.equal("public." .. t, e.table)
        if not seen[k] then
          -- (An entry Redis wrote but whose reply was lost comes twice, with the same id.)
          assert.is_true((last[row.id] or "") < e.id, "row " .. row.id .. " out of order")
          last[row.id] = e.id
          count = count + 1
        end
        seen[k] = true
      end
    end
    local missing = {}
    for _, k in ipairs(want) do if not seen[k] then missing[#missing + 1] = k end end
    assert.same({}, missing)
    assert.equal(#want, count)
    -- The partitions are the documented hash of table and key.
    for id, p in pairs(where) do
      assert.equal(sinkmod.hash("public." .. t .. "\0" .. id) % PARTS, p)
    end
  end)

  -- A script whose sink writes table t into `parts` partitions and prints the client's
  -- unacknowledged events and the sink's sent count every 50 ms.
  local function counting_sink(t, parts)
    return s.script(string.format([[
local flash = require "flash"
local sink = require("flash.sink.redis").new { url = "redis://127.0.0.1:%d", partitions = %d }
local c = assert(flash.client { driver = "wal_logical", persistent = true, slot = %q, publication = %q,
  ack = "manual" })
assert(c:listen { table = %q }):on("all", sink)
assert(c:start())
io.stderr:write("ready\n")
flash.every(0.05, function()
  io.stdout:write(string.format("unacked %%d sent %%d\n", c:stats().unacked, sink.stats.sent))
  io.stdout:flush()
end)
assert(flash.run())
]], f.port, parts, slot, slot, t))
  end

  it("keeps what comes while Redis is not there from the start, warns, and writes it once Redis is up", function()
    local t = H.table("id int PRIMARY KEY, v int")
    H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
    local path = counting_sink(t, PARTS)
    local h = s.spawn({ path })
    assert.is_true(h.await("ready", 15, "err"), h.err())
    H.sql("INSERT INTO " .. t .. " SELECT g, g FROM generate_series(1, 30) g")
    -- No Redis yet: the events wait unacknowledged, and the warning counts them.
    assert.is_true(H.wait_for(function() return h.out():find("unacked 30 sent 0\n", 1, true) ~= nil end, 20),
      h.out() .. h.err())
    assert.is_truthy(h.err():find("redis sink: cannot connect to Redis at 127.0.0.1:" .. f.port, 1, true), h.err())
    assert.is_truthy(h.err():find("%d+ events wait and are sent again"), h.err())
    assert.is_falsy(h.err():find(" 0 events wait", 1, true), h.err())
    H.redis_start(f.dir, f.port)
    assert.is_true(H.wait_for(function() return h.out():find("unacked 0 sent 30\n", 1, true) ~= nil end, 20),
      h.out() .. h.err())
    h.kill("TERM")
    assert.equal(0, h.wait(20), h.err())
    local ids = {}
    for _, list in pairs(entries(f.port)) do
      for _, e in ipairs(list) do ids[#ids + 1] = json.decode(e.event).new.id end
    end
    table.sort(ids)
    local want = {}
    for i = 1, 30 do want[i] = i end
    assert.same(want, ids)
  end)

  it("backs off and warns once while Redis refuses its XADDs, and writes everything once it takes them", function()
    local t = H.table("id int PRIMARY KEY, v int")
    H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
    local conn = H.redis_start(f.dir, f.port)
    -- The partition's key holds a string: Redis answers every XADD with WRONGTYPE.
    assert(conn:pipeline({ { "SET", "flash:0", "not a stream" } }))
    local path = counting_sink(t, 1)
    local h = s.spawn({ path })
    assert.is_true(h.await("ready", 15, "err"), h.err())
    H.sql("INSERT INTO " .. t .. " SELECT g, g FROM generate_series(1, 5) g")
    assert.is_true(H.wait_for(function() return h.err():find("XADD refused", 1, true) ~= nil end, 20), h.err())
    core.sleep(3)
    -- Retried with a growing wait (0.1, 0.2, 0.4, ... s): a handful of tries in 3 s, one
    -- warning; it used to reconnect, warn twice and retry every 0.1 s.
    local function count(pat)
      local n = 0
      for _ in h.err():gmatch(pat) do n = n + 1 end
      return n
    end
    assert.equal(1, count("XADD refused: WRONGTYPE"), h.err())
    assert.equal(0, count("reconnected"), h.err())
    assert.is_truthy(h.out():find("unacked 5 sent 0\n", 1, true), h.out())
    assert(conn:pipeline({ { "DEL", "flash:0" } }))
    assert.is_true(H.wait_for(function() return h.out():find("unacked 0 sent 5\n", 1, true) ~= nil end, 20),
      h.out() .. h.err())
    h.kill("TERM")
    assert.equal(0, h.wait(20), h.err())
    assert.equal(5, #entries(f.port, 1)[0])
  end)

  it("partitions by the table's own key when it has no id column: a composite or a differently named one", function()
    -- README "Scaling out": partition = hash(table, key), the key being the listener's
    -- primary_key, else the replica identity / primary key (as workers = N hashes). It was
    -- always the column "id": a table without one went whole into one partition.
    local comp = H.table("region text, n int, v int, PRIMARY KEY (region, n)")
    local named = H.table("order_no int PRIMARY KEY, v int")
    local pk = H.table("id int PRIMARY KEY, code text NOT NULL, v int")
    for _, t in ipairs({ comp, named, pk }) do H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL") end
    H.redis_start(f.dir, f.port)
    local path = s.script(string.format([[
local flash = require "flash"
local sink = require("flash.sink.redis").new { url = "redis://127.0.0.1:%d", partitions = 4 }
local c = assert(flash.client { driver = "wal_logical", persistent = true, slot = %q, publication = %q,
  ack = "manual" })
assert(c:listen { table = %q }):on("all", sink)
assert(c:listen { table = %q }):on("all", sink)
assert(c:listen { table = %q, primary_key = { "code" } }):on("all", sink)
assert(c:start())
io.stderr:write("ready\n")
flash.every(0.05, function()
  io.stdout:write(string.format("unacked %%d sent %%d\n", c:stats().unacked, sink.stats.sent))
  io.stdout:flush()
end)
assert(flash.run())
]], f.port, slot, slot, comp, named, pk))
    local h = s.spawn({ path })
    assert.is_true(h.await("ready", 15, "err"), h.err())
    H.sql("INSERT INTO " .. comp .. " SELECT CASE WHEN g % 2 = 0 THEN 'nörd' ELSE 'süd' END, g, 0 " ..
      "FROM generate_series(1, 20) g")
    H.sql("INSERT INTO " .. named .. " SELECT g, 0 FROM generate_series(1, 20) g")
    H.sql("INSERT INTO " .. pk .. " SELECT g, 'c' || g, 0 FROM generate_series(1, 20) g")
    H.sql("UPDATE " .. comp .. " SET v = 1 WHERE n <= 5")
    H.sql("UPDATE " .. named .. " SET v = 1 WHERE order_no <= 5")
    H.sql("TRUNCATE " .. comp)
    assert.is_true(H.wait_for(function() return h.out():find("unacked 0 sent 71\n", 1, true) ~= nil end, 20),
      h.out() .. h.err())
    h.kill("TERM")
    assert.equal(0, h.wait(20), h.err())
    local used = {}
    for p, list in pairs(entries(f.port, 4)) do
      for _, e in ipairs(list) do
        local ev = json.decode(e.event)
        local row, key = ev.old or ev.new
        if e.table == "public." .. comp then
          key = row and (row.region .. "\0" .. row.n) or "false\0false"
        elseif e.table == "public." .. named then
          key = tostring(row.order_no)
        else
          key = row.code   -- the listener's primary_key
        end
        assert.equal(sinkmod.hash(e.table .. "\0" .. key) % 4, p, e.table .. " " .. e.event)
        used[e.table] = used[e.table] or {}
        used[e.table][p] = true
      end
    end
    for _, t in ipairs({ comp, named, pk }) do
      local n = 0
      for _ in pairs(used["public." .. t]) do n = n + 1 end
      assert.is_true(n > 1, t .. " went to one partition")
    end
  end)

  it("writes the same entries when the events go straight from the decoded rows (no Lua event) as through Lua",
    function()
    -- A listener whose only callback is the sink has its rows encoded by lrepl itself into
    -- the sink's outbox (the wal_logical driver's direct path); one that calls the sink
    -- from a function of its own goes through Lua events. Two clients, one stream each,
    -- the same changes: the same entries (id, partition, table, op, event), value by value.
    local t = H.table("id bigint, k text, n numeric, f float8, r real, arr int[], j jsonb, b bytea, " ..
      "ts timestamptz, big text, ok boolean, nothing text, PRIMARY KEY (id, k)")
    local full = H.table("id int PRIMARY KEY, big text, v int")
    local parted = H.table("id int PRIMARY KEY, v text) PARTITION BY RANGE (id")
    -- t: the default replica identity once listening (old rows of its key only, or none);
    -- full: values stored out of line, so an update that leaves them sends them unchanged.
    H.sql("ALTER TABLE " .. full .. " ALTER COLUMN big SET STORAGE EXTERNAL")
    H.sql("CREATE TABLE " .. parted .. "_lo PARTITION OF " .. parted .. " FOR VALUES FROM (0) TO (100); " ..
      "CREATE TABLE " .. parted .. "_hi PARTITION OF " .. parted .. " FOR VALUES FROM (100) TO (1000)")
    H.drop_slot(slot .. "_b")
    H.redis_start(f.dir, f.port)
    local path = s.script(string.format([[
local flash = require "flash"
local sinkmod = require "flash.sink.redis"
local direct = sinkmod.new { url = "redis://127.0.0.1:%d", partitions = 4, stream = "da", batch = 7 }
local viaLua = sinkmod.new { url = "redis://127.0.0.1:%d", partitions = 4, stream = "lu", batch = 7 }
local a = assert(flash.client { driver = "wal_logical", persistent = true, slot = %q, publication = %q,
  ack = "manual", replica_identity = "full" })
local b = assert(flash.client { driver = "wal_logical", persistent = true, slot = %q, publication = %q,
  ack = "manual", replica_identity = "full" })
for _, t in ipairs({ %q, %q, %q }) do
  assert(a:listen { table = t }):on("all", direct)
  local l
  l = assert(b:listen { table = t })
  l:on("all", function(ev) return viaLua(ev, l) end)
end
assert(a:start())
assert(b:start())
io.stderr:write("ready\n")
flash.every(0.05, function()
  io.stdout:write(string.format("sent %%d %%d direct %%d %%d unacked %%d %%d\n", direct.stats.sent,
    viaLua.stats.sent, direct.stats.direct, viaLua.stats.direct, a:stats().unacked, b:stats().unacked))
  io.stdout:flush()
end)
assert(flash.run())
]], f.port, f.port, slot, slot, slot .. "_b", slot .. "_b", t, full, parted))
    local h = s.spawn({ path })
    assert.is_true(h.await("ready", 15, "err"), h.err())
    H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY DEFAULT")
    H.sql("INSERT INTO " .. t .. [[ SELECT g, CASE WHEN g % 3 = 0 THEN 'quote " \ back' WHEN g % 3 = 1 THEN
        E'tab\tnew\nline \u00e9\u4e2d' ELSE '' END, g / 7.0, CASE g % 5 WHEN 0 THEN 'NaN'::float8 WHEN 1 THEN
        'Infinity' WHEN 2 THEN '-0' WHEN 3 THEN 1e300 ELSE g * 0.1 END, g / 3.0, ARRAY[g, NULL, -g],
        jsonb_build_object('g', g, 'a', jsonb_build_array(1.5, 'x', NULL, true), 'big', 12345678901234567890),
        decode('00ff' || lpad(to_hex(g), 4, '0'), 'hex'), '2026-01-01'::timestamptz + g * interval '1 s',
        repeat('t', 3000 + g), g % 2 = 0, NULL FROM generate_series(1, 40) g]])
    -- Keys past 1e14 (a bigint's text is not how Lua prints it: these go the Lua way) and
    -- a numeric NaN, between others.
    H.sql("INSERT INTO " .. t .. " VALUES (100000000000000, 'x', 'NaN', 1, 1, '{}', 'null', '', now(), '', NULL, " ..
      "NULL), (-5, 'neg', -0.5, -1, -1, '{{1,2},{3,4}}', '[]', NULL, NULL, NULL, true, NULL)")
    H.sql("UPDATE " .. t .. " SET n = n + 1 WHERE id % 4 = 0")            -- no old row
    H.sql("UPDATE " .. t .. " SET k = k || '+' WHERE id % 5 = 0")         -- a key change: the old key
    H.sql("DELETE FROM " .. t .. " WHERE id % 6 = 0 OR id = 100000000000000")
    H.sql("INSERT INTO " .. full .. " SELECT g, repeat('big', 3000 + g), 0 FROM generate_series(1, 10) g")
    H.sql("UPDATE " .. full .. " SET v = 1")                              -- unchanged TOAST: the old row's
    H.sql("DELETE FROM " .. full .. " WHERE id > 5")
    H.sql("INSERT INTO " .. parted .. " SELECT g * 37, 'p' || g FROM generate_series(1, 20) g")
    H.sql("UPDATE " .. parted .. " SET id = id + 500 WHERE id < 100")     -- moved between partitions
    -- Both done: the same count sent, nothing unacknowledged, twice in a row.
    local total, direct
    local seen_line
    assert.is_true(H.wait_for(function()
      local line = h.out():match("([^\n]*)\n$") or ""
      local x, y, d, dl, ua, ub = line:match("^sent (%d+) (%d+) direct (%d+) (%d+) unacked (%d+) (%d+)$")
      local stable = x and x == y and ua == "0" and ub == "0" and tonumber(x) >= 100 and line == seen_line
      seen_line = line
      if stable then total, direct = tonumber(x), tonumber(d) assert.equal("0", dl) end
      return stable
    end, 30), h.out() .. h.err())
    h.kill("TERM")
    assert.equal(0, h.wait(20), h.err())
    assert.equal(119, total)
    -- Most went the direct way: each table's first event goes through Lua (its route is
    -- set then), and so do the events keyed past 1e14.
    assert.is_true(direct >= total - 10 and direct < total, "direct " .. tostring(direct))
    local function load(stream)
      local m, n = {}, 0
      for p, list in pairs(entries(f.port, 4, stream)) do
        for _, e in ipairs(list) do
          m[e.id] = { p = p, table = e.table, op = e.op, ev = json.decode(e.event) }
          n = n + 1
        end
      end
      return m, n
    end
    local a, na = load("da")
    local b, nb = load("lu")
    assert.equal(total, na)
    assert.equal(total, nb)
    -- The two slots decode the same WAL: the same ids (commit LSN, position) for the same changes.
    for id, y in pairs(b) do
      local x = a[id]
      assert.is_table(x, "no direct entry " .. id)
      assert.same({ y.p, y.table, y.op }, { x.p, x.table, x.op })
      assert.same(y.ev, x.ev)
    end
    H.drop_slot(slot .. "_b")
  end)

  it("hands events to a callback added while the sink takes them directly, and to the sink still", function()
    local t = H.table("id int PRIMARY KEY, v int")
    H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
    H.redis_start(f.dir, f.port)
    local flag = os.tmpname()
    os.remove(flag)
    local path = s.script(string.format([[
local flash = require "flash"
local sink = require("flash.sink.redis").new { url = "redis://127.0.0.1:%d", partitions = 2 }
local c = assert(flash.client { driver = "wal_logical", persistent = true, slot = %q, publication = %q,
  ack = "manual" })
local l = assert(c:listen { table = %q })
l:on("all", sink)
assert(c:start())
io.stderr:write("ready\n")
local seen, added = 0, false
flash.every(0.05, function()
  if not added and io.open(%q) then
    added = true
    l:on("insert", function(ev) seen = seen + 1 end)
    io.stderr:write("added\n")
  end
  io.stdout:write(string.format("sent %%d direct %%d seen %%d unacked %%d\n", sink.stats.sent, sink.stats.direct,
    seen, c:stats().unacked))
  io.stdout:flush()
end)
assert(flash.run())
]], f.port, slot, slot, t, flag))
    local h = s.spawn({ path })
    assert.is_true(h.await("ready", 15, "err"), h.err())
    H.sql("INSERT INTO " .. t .. " SELECT g, 0 FROM generate_series(1, 30) g")
    -- The first goes through Lua (the table's route is made then), the others directly.
    assert.is_true(H.wait_for(function() return h.out():find("sent 30 direct 29 seen 0 unacked 0\n", 1, true) end, 20),
      h.out() .. h.err())
    assert(io.open(flag, "w")):close()
    assert.is_true(h.await("added", 15, "err"), h.err())
    H.sql("INSERT INTO " .. t .. " SELECT g, 0 FROM generate_series(31, 50) g")
    H.sql("UPDATE " .. t .. " SET v = 1 WHERE id <= 10")
    -- The new callback gets the inserts; the sink gets everything, through Lua now; nothing
    -- is acknowledged before Redis has it.
    assert.is_true(H.wait_for(function() return h.out():find("sent 60 direct 29 seen 20 unacked 0\n", 1, true) end, 20),
      h.out() .. h.err())
    h.kill("TERM")
    assert.equal(0, h.wait(20), h.err())
    os.remove(flag)
    local n = 0
    for _, list in pairs(entries(f.port, 2)) do n = n + #list end
    assert.equal(60, n)
  end)

  it("refuses --fields that leave out the key, which would put every event in one partition", function()
    local t = H.table("id int PRIMARY KEY, v int")
    H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
    H.drop_slot("flash_replication", "flash_publication")
    local rc, out, err = H.run_flashlua({ "--table", t, "--fields", "v", "--to", "redis://127.0.0.1:" .. f.port,
      "--partitions", "2" }, 20)
    H.drop_slot("flash_replication", "flash_publication")
    assert.equal(1, rc, err)
    assert.equal("", out)
    assert.truthy(err:find("flashlua: the listener of public." .. t .. " carries fields without its key column id, so " ..
      "every event would go to one partition: add id to fields (flashlua --fields)", 1, true), err)
  end)

  it("is what flashlua --table T --to redis://... --partitions N runs", function()
    local t = H.table("id int PRIMARY KEY, v int")
    H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
    H.redis_start(f.dir, f.port)
    H.drop_slot("flash_replication", "flash_publication")
    local h = s.spawn({ "--table", t, "--to", "redis://127.0.0.1:" .. f.port, "--partitions", "2" })
    assert.is_true(H.wait_for(function()
      return tonumber(H.scalar("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'flash_replication' " ..
        "AND active")) == 1
    end, 15), h.err())
    H.sql("INSERT INTO " .. t .. " SELECT g, g FROM generate_series(1, 20) g")
    local function total()
      local n = 0
      for p = 0, 1 do
        local list = entries(f.port, 2)[p]
        n = n + #list
      end
      return n
    end
    assert.is_true(H.wait_for(function() return total() == 20 end, 15), h.err())
    h.kill("TERM")
    assert.equal(0, h.wait(20), h.err())
    local ids = {}
    for p = 0, 1 do
      for _, e in ipairs(entries(f.port, 2)[p]) do
        local ev = json.decode(e.event)
        assert.equal(sinkmod.hash("public." .. t .. "\0" .. ev.new.id) % 2, p)
        ids[#ids + 1] = ev.new.id
      end
    end
    table.sort(ids)
    assert.same({ 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20 }, ids)
    H.drop_slot("flash_replication", "flash_publication")
  end)

  -- Two capturers of one database from the command line: the second one's default slot
  -- and publication were the first one's ("publication flash_publication is in use").
  it("a second flashlua --table --to runs beside the first with --slot NAME", function()
    local a = H.table("id int PRIMARY KEY, v int")
    local b = H.table("id int PRIMARY KEY, v int")
    H.sql("ALTER TABLE " .. a .. " REPLICA IDENTITY FULL; ALTER TABLE " .. b .. " REPLICA IDENTITY FULL")
    H.redis_start(f.dir, f.port)
    H.drop_slot("flash_replication", "flash_publication")
    H.drop_slot("flash_second", "flash_second")
    local url = "redis://127.0.0.1:" .. f.port
    local h1 = s.spawn({ "--table", a, "--to", url })
    local h2 = s.spawn({ "--table", b, "--to", url, "--slot", "flash_second" })
    assert.is_true(H.wait_for(function()
      return tonumber(H.scalar("SELECT count(*) FROM pg_replication_slots WHERE slot_name IN " ..
        "('flash_replication', 'flash_second') AND active")) == 2
    end, 15), h1.err() .. h2.err())
    assert.equal("public." .. b, H.scalar("SELECT schemaname || '.' || tablename FROM pg_publication_tables " ..
      "WHERE pubname = 'flash_second'"))
    H.sql("INSERT INTO " .. a .. " VALUES (1, 1); INSERT INTO " .. b .. " VALUES (2, 2)")
    local function tables()
      local seen = {}
      for _, e in ipairs(entries(f.port, 1)[0]) do
        if e.table == "public." .. a or e.table == "public." .. b then seen[#seen + 1] = e.table end
      end
      table.sort(seen)
      return table.concat(seen, " ")
    end
    local want = { "public." .. a, "public." .. b }
    table.sort(want)
    want = table.concat(want, " ")
    assert.is_true(H.wait_for(function() return tables() == want end, 15), tables() .. h1.err() .. h2.err())
    h1.kill("TERM")
    h2.kill("TERM")
    assert.equal(0, h1.wait(20), h1.err())
    assert.equal(0, h2.wait(20), h2.err())
    H.drop_slot("flash_replication", "flash_publication")
    H.drop_slot("flash_second", "flash_second")
  end)

  -- Redis on the same machine, reached through its Unix socket (redis-server's
  -- `unixsocket`): no TCP on either side.
  it("reaches Redis through its Unix socket: --to unix:///PATH, and a worker's url", function()
    local t = H.table("id int PRIMARY KEY, v text")
    H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
    H.drop_slot("flash_replication", "flash_publication")
    local url = "unix://" .. f.dir .. "/redis.sock"
    local cap = s.spawn({ "--table", t, "--to", url })
    -- Started before Redis: the warning names the socket, and the events wait. (The
    -- warning comes as the sink is made, before the slot exists: the rows are written
    -- once the capturer listens.)
    assert.is_true(H.wait_for(function()
      return cap.err():find("redis sink: cannot connect to Redis at " .. url, 1, true) ~= nil and
        cap.err():find("listening on", 1, true) ~= nil
    end, 20), cap.err())
    H.sql("INSERT INTO " .. t .. " VALUES (1, 'a'), (2, 'b')")
    H.redis_start(f.dir, f.port)
    H.sql("UPDATE " .. t .. " SET v = 'c' WHERE id = 2")
    local worker = s.spawn({ s.script(string.format([[
local flash = require "flash"
local c = assert(flash.client { driver = "redis_streams", url = %q, group = "unix" })
assert(c:listen { table = %q }):on("all", function(ev)
  print(ev.op, ev.new.id, ev.new.v, ev.old and ev.old.v)
  io.stdout:flush()
end)
assert(flash.run())
]], url, t)) })
    assert.is_true(H.wait_for(function() return select(2, worker.out():gsub("\n", "")) >= 3 end, 20),
      worker.out() .. worker.err() .. cap.err())
    assert.equal("insert\t1\ta\tnil\ninsert\t2\tb\tnil\nupdate\t2\tc\tb\n", worker.out())
    worker.kill("TERM")
    cap.kill("TERM")
    assert.equal(0, worker.wait(20), worker.err())
    assert.equal(0, cap.wait(20), cap.err())
    -- A worker whose socket is not there says where it looked.
    local gone = s.spawn({ s.script(string.format([[
local flash = require "flash"
local c = assert(flash.client { driver = "redis_streams", url = %q })
assert(c:listen { table = %q }):on("all", print)
assert(flash.run())
]], "unix://" .. f.dir .. "/nothing.sock", t)) })
    assert.equal(1, gone.wait(20), gone.err())
    assert.is_truthy(gone.err():find(": cannot reach Redis at unix://" .. f.dir .. "/nothing.sock: " ..
      "cannot connect to Redis at unix://" .. f.dir .. "/nothing.sock: No such file or directory", 1, true), gone.err())
    H.drop_slot("flash_replication", "flash_publication")
  end)
end)
