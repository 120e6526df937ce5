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

local function redis_server(dir, port)
  local cmd = string.format("redis-server --port %d --bind 127.0.0.1 --dir %s --appendonly yes " ..
    "--appendfsync always --save '' --daemonize yes --pidfile %s/redis.pid --logfile %s/redis.log", port, dir, dir, dir)
  assert(os.execute(cmd) == 0, cmd)
  local conn
  H.wait_for(function()
    conn = core.redis_connect("127.0.0.1", port, 1)
    return conn ~= nil
  end, 10)
  assert(conn, "redis-server did not start on port " .. port)
  return conn
end

local function redis_stop(conn)
  -- SHUTDOWN closes the connection without a reply: the pipeline reports that.
  conn:pipeline({ { "SHUTDOWN" } })
  conn:close()
end

-- Every entry of the partition streams: { [p] = { {id=, table=, op=, event=}, ... } }.
local function entries(port)
  local conn = assert(core.redis_connect("127.0.0.1", port, 2))
  local cmds = {}
  for p = 0, PARTS - 1 do cmds[#cmds + 1] = { "XRANGE", "flash:" .. p, "-", "+" } end
  local replies = assert(conn:pipeline(cmds))
  conn:close()
  local out = {}
  for p = 0, PARTS - 1 do
    out[p] = {}
    for _, e in ipairs(replies[p + 1]) do
      local f = {}
      for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
      out[p][#out[p] + 1] = f
    end
  end
  return out
end

describe("flash.sink.redis", function()
  local s = H.session()
  local dir, port, slot
  before_each(function()
    dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. dir) == 0)
    port = 21000 + core.getpid() % 20000
    slot = "flash_spec_redis"
    H.drop_slot(slot)
  end)
  after_each(function()
    s.cleanup()
    local c = core.redis_connect("127.0.0.1", port, 1)
    if c then redis_stop(c) end
    H.drop_slot(slot)
    os.execute("rm -rf " .. dir)
  end)

  it("refuses options it does not know and a client that acknowledges automatically", function()
    assert.has_error(function() sinkmod.new { partitons = 2 } end, "bad argument #1 to 'redis' (unknown option 'partitons')")
    assert.has_error(function() sinkmod.new { url = "http://x" } end,
      "bad argument #1 to 'redis' (option 'url': redis://HOST[:PORT] expected, got http://x)")
    local sink = sinkmod.new {}
    assert.has_error(function() sink({ op = "insert", table = "t", new = {} }) end,
      "flash.sink.redis needs flash.client{ ack = \"manual\", persistent = true }: an event is acknowledged " ..
      "only once Redis holds it")
  end)

  it("writes every event, each row's in one partition in commit order, across a Redis restart", function()
    local t = H.table("id int PRIMARY KEY, v int")
    H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL")
    local conn = redis_server(dir, port)
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
]], port, PARTS, slot, slot, t))
    local h = s.spawn({ path })
    assert.is_true(h.await("ready", 15, "err"), h.err())
    H.sql("INSERT INTO " .. t .. " SELECT g, 0 FROM generate_series(1, 200) g")
    H.sql("UPDATE " .. t .. " SET v = 1 WHERE id <= 50")
    assert.is_true(H.wait_for(function() return h.out():find("unacked 0 sent 250 ", 1, true) ~= nil end, 20),
      h.out() .. h.err())
    -- Redis goes away; writes go on; nothing is acknowledged meanwhile.
    redis_stop(conn)
    H.sql("DELETE FROM " .. t .. " WHERE id > 150")
    H.sql("UPDATE " .. t .. " SET v = 2 WHERE id <= 10")
    assert.is_true(H.wait_for(function() return h.out():find("unacked 60 sent 250 errors [1-9]") ~= nil end, 20),
      h.out() .. h.err())
    -- Back with its append-only file: the waiting events are written, then acknowledged.
    redis_server(dir, port)
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
    for p, list in pairs(entries(port)) do
      local last = {}
      for _, f in ipairs(list) do
        local ev = json.decode(f.event)
        local row = ev.op == "delete" and ev.old or ev.new
        local k = string.format("%s %d %d", ev.op, row.id, row.v)
        -- A row's events all go to one partition, and come in the order they were made.
        where[row.id] = where[row.id] or p
        assert.equal(where[row.id], p, "row " .. row.id .. " in two partitions")
        assert.equal(f.id, ev.id)
        assert.equal("public." .. t, f.table)
        if not seen[k] then
          -- (An entry Redis wrote but whose reply was lost comes twice, with the same id.)
          assert.is_true((last[row.id] or "") < f.id, "row " .. row.id .. " out of order")
          last[row.id] = f.id
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
end)
