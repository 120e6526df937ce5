-- spec/33-log_format_spec.lua: `flashlua --log-format json`: every line on stderr one JSON
-- object (ts, level, msg, and client/db for a client's lines), --stats values as fields,
-- a fatal error as an error object.
local H = require "helpers"
local cjson = require "cjson"

-- Every line of `text` decoded; fails on a line that is not one JSON object.
local function objects(text)
  local list = {}
  for line in text:gmatch("[^\n]+") do
    local ok, obj = pcall(cjson.decode, line)
    assert(ok and type(obj) == "table", "not a JSON object: " .. line)
    list[#list + 1] = obj
  end
  return list
end

local function find(list, pred)
  for _, o in ipairs(list) do if pred(o) then return o end end
end

describe("--log-format json", function()
  local s = H.session()
  after_each(function() s.cleanup() end)

  it("writes one JSON object per line: start, callback error, stats and stop, each naming its client", function()
    local t = H.table("id int")
    local db = H.scalar("SELECT current_database()::text AS d")
    local script = s.script(string.format([[
      local flash = require "flash"
      local c = assert(flash.client { name = "shipper", on_error = "log" })
      assert(c:listen { table = %q }):on("insert", function(ev)
        if ev.new.id == 2 then error("no \"two\"") end
      end)
    ]], t))
    local h = s.spawn({ "--log-format", "json", "--stats", script })
    assert(h.await("listening on public." .. t, 20, "err"), h.err())
    H.sql("INSERT INTO " .. t .. " VALUES (1), (2), (3)")
    assert(h.await('"events":3', 10, "err"), h.err())
    h.kill("TERM")
    assert.are.equal(0, h.wait(20), h.err())
    local list = objects(h.err())
    for _, o in ipairs(list) do
      assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$", o.ts)
      assert.truthy(({ info = true, warn = true, error = true })[o.level], cjson.encode(o))
      assert.are.equal("string", type(o.msg))
    end
    local start = find(list, function(o) return o.msg:find("^connected to ") end)
    assert.are.same({ level = "info", client = "shipper", db = db,
      msg = string.format("connected to %s as %s, driver trigger, listening on public.%s", db,
        H.scalar("SELECT current_user::text AS u"), t) }, { level = start.level, client = start.client, db = start.db,
      msg = start.msg })
    local failed = find(list, function(o) return o.level == "error" end)
    assert.are.equal("shipper", failed.client)
    assert.matches('^callback for insert on public%.' .. t .. ' failed: .*no "two"', failed.msg)
    local stats = find(list, function(o) return o.msg == "stats" and o.events == 3 end)
    assert.are.equal(1, stats.errors)
    assert.are.equal("number", type(stats.handler_seconds))
    assert.are.equal("number", type(stats.events_per_second))
    local stop = find(list, function(o) return o.msg:find("^stopped after ") end)
    assert.are.equal("shipper", stop.client)
    assert.matches("3 events, 1 errors", stop.msg)
  end)

  it("reports a fatal error as an error object and exits 1", function()
    local rc, out, err = H.run_flashlua({ "--log-format", "json", "-e", "error('boom')" })
    assert.are.equal(1, rc)
    assert.are.equal("", out)
    local list = objects(err)
    assert.are.equal(1, #list)
    assert.are.equal("error", list[1].level)
    assert.are.equal("(command line):1: boom", list[1].msg)
  end)

  it("refuses an unknown format with exit 2", function()
    local rc, _, err = H.run_flashlua({ "--log-format", "xml", "-e", "" })
    assert.are.equal(2, rc)
    assert.are.equal("flashlua: unknown log format 'xml' (expected text or json)\n" ..
      "Try 'flashlua --help' for more information.\n", err)
  end)
end)
