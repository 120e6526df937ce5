-- pg_extension with streaming = true: the flashlua plugin streams transactions larger than
-- logical_decoding_work_mem while they run (pgoutput protocol 2's Stream Start/Stop/Commit/
-- Abort frames); the client keeps them until the commit and delivers each once, complete,
-- in order, and nothing of an aborted one or of a rolled-back subtransaction.
local flash = require "flash"
local core = require "flash.core"
local H = require "helpers"

local installed = H.scalar("SELECT count(*) > 0 AS b FROM pg_extension WHERE extname = 'flashlua'")

describe("pg_extension streaming of large transactions", function()
  local client
  setup(function() H.decoding_work_mem("1MB") end)
  teardown(function() H.decoding_work_mem(nil) end)
  after_each(function()
    if client then client:stop() client = nil end
  end)

  local function listen(t, opts)
    local c = assert(flash.client(opts))
    client = c
    local got = { all = {}, b = {} }
    local function collect(into) return function(ev) into[#into + 1] = ev.new.id end end
    assert(c:listen { table = t }):on("insert", collect(got.all))
    assert(c:listen { table = t, fields = { "id" }, where = { kind = "b" } }):on("insert", collect(got.b))
    assert(c:start())
    return c, got
  end

  local function range(from, to)
    local out = {}
    for i = from, to do out[#out + 1] = i end
    return out
  end

  it("delivers a transaction larger than logical_decoding_work_mem once, complete and in order; " ..
     "nothing of an aborted one or of a rolled-back subtransaction", function()
    if not installed then pending("the flashlua extension is not installed") return end
    local t = H.table("id int PRIMARY KEY, kind text, pad text")
    local c, got = listen(t, { driver = "pg_extension", streaming = true })
    -- Larger than 1 MB each, so both are streamed while they run.
    H.sql("BEGIN; INSERT INTO " .. t .. " SELECT g, 'b', repeat('x', 60) FROM generate_series(1000001, 1030000) g; ROLLBACK")
    H.sql(string.format([[BEGIN;
      INSERT INTO %s SELECT g, CASE WHEN g %% 2 = 0 THEN 'b' ELSE 'a' END, repeat('y', 60) FROM generate_series(1, 20000) g;
      SAVEPOINT s;
      -- (kind 'a': the first row after the rollback, 30001, is for the same listeners as
      -- these, so its tag is the one sent before them, which must survive their abort)
      INSERT INTO %s SELECT g, 'a', repeat('z', 60) FROM generate_series(20001, 30000) g;
      ROLLBACK TO SAVEPOINT s;
      INSERT INTO %s SELECT g, CASE WHEN g %% 2 = 0 THEN 'b' ELSE 'a' END, repeat('w', 60) FROM generate_series(30001, 40000) g;
      COMMIT]], t, t, t))
    H.sql("INSERT INTO " .. t .. " VALUES (-1, 'b', 'marker')")
    local deadline = core.now() + 60
    while got.all[#got.all] ~= -1 and core.now() < deadline do assert(c:poll(0.1)) end
    local s = c:stats()
    assert.is_true(s.stream_buffered_peak + s.stream_spilled > 0, "nothing was streamed")
    local want_all, want_b = {}, {}
    for i = 1, 20000 do want_all[#want_all + 1] = i end
    for i = 30001, 40000 do want_all[#want_all + 1] = i end
    want_all[#want_all + 1] = -1
    for _, i in ipairs(want_all) do if i % 2 == 0 or i == -1 then want_b[#want_b + 1] = i end end
    assert.equal(#want_all, #got.all)
    assert.same(want_all, got.all)
    assert.same(want_b, got.b)
    -- and nothing more arrives
    H.settle(c, 0.5)
    assert.equal(#want_all, #got.all)
  end)

  it("without streaming, the same transactions arrive the same (decoded at commit)", function()
    if not installed then pending("the flashlua extension is not installed") return end
    local t = H.table("id int PRIMARY KEY, kind text, pad text")
    local c, got = listen(t, { driver = "pg_extension" })
    H.sql("INSERT INTO " .. t .. " SELECT g, 'b', repeat('y', 60) FROM generate_series(1, 30000) g")
    assert(c:run { until_lsn = "current" })
    client = nil
    local s = c:stats()
    assert.equal(0, s.stream_buffered_peak + s.stream_spilled)
    assert.same(range(1, 30000), got.all)
    assert.same(range(1, 30000), got.b)
  end)
end)
