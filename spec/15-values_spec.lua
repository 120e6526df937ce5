-- Values as scripts and the --table output see them: arrays stay arrays (flash.array_mt),
-- JSON objects are marked (flash.object_mt), JSON round trips keep every digit and
-- character (flash.json), arrays of domains decode as their base type. The database specs
-- run over every driver in H.drivers.
local flash = require "flash"
local core = require "flash.core"
local H = require "helpers"

local json = flash.json
local null = flash.null

local function is_array(v) return getmetatable(v) == flash.array_mt end
local function is_object(v) return getmetatable(v) == flash.object_mt end
local function is_exact(v, text) return getmetatable(v) == flash.number_mt and v.text == text end

-- The JSON that the jsonb specs write: empty and nested containers, numbers no double
-- holds, escapes, astral characters. A Lua long string: the backslashes are JSON's.
local DOC = [==[{"empty": [], "obj": {}, "nested": [[], [{}], {"e": [[]]}], "big": 12345678901234567890,
  "neg": -98765432109876543210987, "pi": 3.14159265358979323846264338327950288, "small": 0.1,
  "past53": 9007199254740993, "tiny": 1e-7, "max": 1.7976931348623157e308, "int": 42,
  "s": "ü€😀 \u00e9 \ud83d\ude00 tab\t nl\n q\" bs\\ ctrl\u0001 \u2028", "n": null, "t": true}]==]
local DOC_S = "ü€😀 é 😀 tab\t nl\n q\" bs\\ ctrl\1 \226\128\168"

describe("flash.json", function()
  it("decodes arrays and objects as tables marked with flash.array_mt and flash.object_mt", function()
    local v = assert(json.decode('{"a": [], "b": {}, "c": [[], {"d": []}], "e": null}'))
    assert.is_true(is_object(v))
    assert.is_true(is_array(v.a))
    assert.are.equal(0, #v.a)
    assert.is_true(is_object(v.b))
    assert.is_nil(next(v.b))
    assert.is_true(is_array(v.c) and is_array(v.c[1]) and is_object(v.c[2]) and is_array(v.c[2].d))
    assert.are.equal(null, v.e)
    -- The markers add to the type mapping: still plain Lua tables to index and iterate.
    assert.are.same({ a = {}, b = {}, c = { {}, { d = {} } }, e = null }, v)
  end)

  it("encodes empty arrays and objects nested anywhere as [] and {}", function()
    assert.are.equal('{"a":[]}', json.encode(json.decode('{"a": []}')))
    assert.are.equal('[[],[{}],{"e":[[]]}]', json.encode(json.decode('[[], [{}], {"e": [[]]}]')))
    assert.are.equal("[]", json.encode(json.array()))
    assert.are.equal("[]", json.encode(setmetatable({}, flash.array_mt)))
    assert.are.equal("{}", json.encode(json.object()))
    -- Unmarked tables: keys 1..n are an array, anything else (and {}) an object.
    assert.are.equal("[1,2,3]", json.encode({ 1, 2, 3 }))
    assert.are.equal('{"k":"v"}', json.encode({ k = "v" }))
    assert.are.equal("{}", json.encode({}))
    assert.are.equal('[1,null,"x"]', json.encode({ 1, null, "x" }))
  end)

  it("keeps numbers no double holds as flash.number_mt values and writes them back verbatim", function()
    local v = assert(json.decode(DOC))
    assert.is_true(is_exact(v.big, "12345678901234567890"))
    assert.is_true(is_exact(v.neg, "-98765432109876543210987"))
    assert.is_true(is_exact(v.pi, "3.14159265358979323846264338327950288"))
    assert.is_true(is_exact(v.past53, "9007199254740993"))
    assert.are.equal("12345678901234567890", tostring(v.big))
    assert.are.equal(1.2345678901234567e19, v.big:tonumber())
    assert.are.equal(12345678901234567890 + 1, v.big + 1)   -- arithmetic in doubles
    assert.are.equal(v.big, json.number("12345678901234567890.000"))
    assert.is_true(v.big < json.number("12345678901234567891"))
    -- Numbers a double prints back exactly stay Lua numbers.
    assert.are.equal(0.1, v.small)
    assert.are.equal(1e-7, v.tiny)
    assert.are.equal(1.7976931348623157e308, v.max)
    assert.are.equal(42, v.int)
    assert.are.equal('[12345678901234567890,-98765432109876543210987,3.14159265358979323846264338327950288,9007199254740993]',
      json.encode({ v.big, v.neg, v.pi, v.past53 }))
    assert.are.equal("[1e400,0.10000000000000001]", json.encode(json.decode("[1e400, 0.10000000000000001]")))
    assert.are.equal("[1.50]", json.encode({ json.number("1.50") }))
    assert.has_error(function() json.number("12,5") end,
      "bad argument #1 to 'number' (JSON number text expected, got 12,5)")
  end)

  it("writes doubles in their shortest round-trip form", function()
    assert.are.equal("[0.1,1.5,-0,42,0.30000000000000004,1.2345678901234567,1e+300,5e-324,9007199254740992]",
      json.encode({ 0.1, 1.5, -0.0, 42, 0.1 + 0.2, 1.2345678901234567, 1e300, 5e-324, 2 ^ 53 }))
    -- JSON has no NaN or infinity: the strings PostgreSQL's to_json writes.
    assert.are.equal('["NaN","Infinity","-Infinity"]', json.encode({ 0 / 0, math.huge, -math.huge }))
  end)

  it("decodes escapes and astral characters and encodes them back to the same string", function()
    local v = assert(json.decode(DOC))
    assert.are.equal(DOC_S, v.s)
    local text = json.encode(v.s)
    assert.are.equal('"ü€😀 é 😀 tab\\t nl\\n q\\" bs\\\\ ctrl\\u0001 \226\128\168"', text)
    assert.are.equal(DOC_S, json.decode(text))
  end)

  it("re-encodes a decoded document to an equal one", function()
    local v = assert(json.decode(DOC))
    assert.are.same(v, json.decode(json.encode(v)))
  end)

  it("round-trips arrays nested 1000 deep, the decoder's limit", function()
    local deep = string.rep("[", 1000) .. string.rep("]", 1000)
    assert.are.equal(deep, json.encode(assert(json.decode(deep))))
    assert.are.same({ nil, "invalid JSON at byte 1001: nesting too deep" },
      { json.decode(string.rep("[", 1001) .. string.rep("]", 1001)) })
  end)

  it("returns nil and the position for invalid JSON, and raises for values JSON cannot hold", function()
    assert.are.same({ nil, "invalid JSON at byte 8: expected string key" }, { json.decode('{"a":1,}') })
    assert.are.same({ nil, "invalid JSON at byte 4: trailing garbage after value" }, { json.decode("[] x") })
    assert.has_error(function() json.encode({ f = print }) end, "cannot encode a value of type function as JSON")
    local loop = {}
    loop[1] = loop
    assert.has_error(function() json.encode(loop) end,
      "cannot encode tables nested deeper than 1000 as JSON (a table that contains itself?)")
    assert.has_error(function() json.encode({ flash.unchanged }) end,
      "cannot encode flash.unchanged as JSON (an unchanged TOASTed column: leave it out, or give encode's option 'unchanged')")
    assert.are.equal('["<unchanged>"]', json.encode({ flash.unchanged }, { unchanged = "<unchanged>" }))
  end)
end)

-- Types the domain specs use, made once for the whole file.
local types_made = false
local function make_types()
  if types_made then return end
  H.sql([[
    DROP DOMAIN IF EXISTS fl15_smalls, fl15_ints, fl15_small, fl15_posint, fl15_doc CASCADE;
    DROP TYPE IF EXISTS fl15_mood, fl15_pair CASCADE;
    CREATE DOMAIN fl15_posint AS int CHECK (VALUE > 0);
    CREATE DOMAIN fl15_small AS fl15_posint CHECK (VALUE < 100);
    CREATE DOMAIN fl15_ints AS int[];
    CREATE DOMAIN fl15_smalls AS fl15_small[];
    CREATE DOMAIN fl15_doc AS jsonb;
    CREATE TYPE fl15_mood AS ENUM ('sad', 'happy');
    CREATE TYPE fl15_pair AS (a int, b text)]])
  types_made = true
end

for _, driver in ipairs(H.drivers) do
describe("values (" .. driver .. " driver)", function()
  local client, tables = nil, {}

  after_each(function()
    if client then client:stop() client = nil end
    for _, t in ipairs(tables) do H.sql("DROP TABLE IF EXISTS " .. t) end
    tables = {}
  end)

  local function new_table(cols)
    local t = H.table(cols)
    tables[#tables + 1] = t
    return t
  end

  local function listen(t, ops)
    local c, events = H.listen({ table = t }, ops or "all", { driver = driver, replica_identity = "full" })
    client = c
    return events
  end

  it("delivers empty SQL arrays and JSON arrays as arrays (flash.array_mt), JSON objects as flash.object_mt", function()
    local t = new_table("id int, ta text[], ia int[], ia2 int[], jb jsonb, js json")
    local events = listen(t, "insert")
    H.sql("INSERT INTO " .. t .. [=[ VALUES (1, '{}', '{}', '{{1,2},{3,4}}', '{"a": [], "b": {}, "c": [[], [{}]]}', '[]')]=])
    H.wait(client, events, 1)
    assert.are.equal(1, #events)
    local r = events[1].new
    assert.is_true(is_array(r.ta) and #r.ta == 0)
    assert.is_true(is_array(r.ia) and #r.ia == 0)
    assert.is_true(is_array(r.ia2) and is_array(r.ia2[1]) and is_array(r.ia2[2]))
    assert.are.same({ { 1, 2 }, { 3, 4 } }, r.ia2)
    assert.is_true(is_object(r.jb) and is_array(r.jb.a) and is_object(r.jb.b))
    assert.is_true(is_array(r.js) and #r.js == 0)
    assert.are.equal("[]", json.encode(r.ta))
    assert.are.equal("[[1,2],[3,4]]", json.encode(r.ia2))
    assert.are.equal('[[],{},[[],[{}]]]', json.encode({ r.jb.a, r.jb.b, r.jb.c }))
    assert.are.equal("[]", json.encode(r.js))
  end)

  it("re-encodes json and jsonb with every digit and character: PostgreSQL finds the same value", function()
    local t = new_table("id int, jb jsonb, js json, f8 double precision, f8b double precision")
    local events = listen(t, "insert")
    H.sql("INSERT INTO " .. t .. " VALUES (1, $1::text::jsonb, $1::text::json, 0.1, 1.2345678901234567)", DOC)
    H.wait(client, events, 1)
    assert.are.equal(1, #events)
    local r = events[1].new
    assert.is_true(is_exact(r.jb.big, "12345678901234567890"))
    assert.is_true(is_exact(r.jb.pi, "3.14159265358979323846264338327950288"))
    assert.is_true(is_exact(r.js.past53, "9007199254740993"))
    assert.are.equal(0.1, r.jb.small)
    assert.are.equal(DOC_S, r.jb.s)
    assert.are.equal(DOC_S, r.js.s)
    assert.are.equal("[0.1,1.2345678901234567]", json.encode({ r.f8, r.f8b }))
    local same = H.sql("SELECT jb = $1::jsonb AS jb, js::jsonb = $2::jsonb AS js FROM " .. t .. " WHERE id = 1",
      json.encode(r.jb), json.encode(r.js))[1]
    assert.are.same({ jb = true, js = true }, same)
  end)

  it("copies rows with empty arrays and nested JSON through flash.json.encode and jsonb_populate_record", function()
    local src = new_table("id int PRIMARY KEY, tags text[], nums int[], meta jsonb")
    local copy = new_table("id int PRIMARY KEY, tags text[], nums int[], meta jsonb")
    local events = listen(src, { "insert", "update" })
    H.sql("INSERT INTO " .. src .. [=[ VALUES (1, '{}', '{}', '{"a": [], "n": 12345678901234567890}'),
      (2, '{x,"y z",ü}', '{1,NULL}', '{"a": [[]], "b": {}, "s": "😀"}')]=])
    H.sql("UPDATE " .. src .. [=[ SET meta = '{"a": [], "b": [{}]}' WHERE id = 1]=])
    H.wait(client, events, 3)
    assert.are.equal(3, #events)
    for _, ev in ipairs(events) do
      H.sql("INSERT INTO " .. copy .. " SELECT * FROM jsonb_populate_record(NULL::" .. copy .. ", $1::jsonb) " ..
        "ON CONFLICT (id) DO UPDATE SET tags = EXCLUDED.tags, nums = EXCLUDED.nums, meta = EXCLUDED.meta",
        json.encode(ev.new))
    end
    assert.are.equal(0, tonumber(H.scalar(string.format(
      "SELECT count(*) AS n FROM ((TABLE %s EXCEPT TABLE %s) UNION ALL (TABLE %s EXCEPT TABLE %s)) d",
      src, copy, copy, src))))
    assert.are.same({ "x", "y z", "ü" }, H.sql("SELECT tags FROM " .. copy .. " WHERE id = 2")[1].tags)
  end)

  it("decodes arrays of domains, domains over arrays and domains over domains as the base type", function()
    make_types()
    local t = new_table([=[id int, p fl15_posint, pa fl15_posint[], sa fl15_small[], di fl15_ints,
      ds fl15_smalls, da fl15_doc[], empty fl15_posint[] ]=])
    local events = listen(t, "insert")
    H.sql("INSERT INTO " .. t .. [=[ VALUES (1, 5, '{1,2,NULL}', '{{7,8},{9,10}}', '{3,4}', '{99}',
      ARRAY['{"a": []}', '[12345678901234567890]']::fl15_doc[], '{}')]=])
    H.wait(client, events, 1)
    assert.are.equal(1, #events)
    local r = events[1].new
    assert.are.equal(5, r.p)
    assert.are.same({ 1, 2, null }, r.pa)
    assert.are.same({ { 7, 8 }, { 9, 10 } }, r.sa)
    assert.are.same({ 3, 4 }, r.di)
    assert.are.same({ 99 }, r.ds)
    assert.is_true(is_array(r.pa) and is_array(r.di) and is_array(r.ds) and is_array(r.empty))
    assert.is_true(is_object(r.da[1]) and is_array(r.da[1].a))
    assert.is_true(is_exact(r.da[2][1], "12345678901234567890"))
    local text = json.encode({ pa = r.pa, sa = r.sa, di = r.di, ds = r.ds, da = r.da, empty = r.empty })
    assert.are.same(json.decode('{"pa":[1,2,null],"sa":[[7,8],[9,10]],"di":[3,4],"ds":[99],' ..
      '"da":[{"a":[]},[12345678901234567890]],"empty":[]}'), json.decode(text))
    assert.truthy(text:find('"empty":[]', 1, true), text)
  end)

  it("keeps arrays of enums and of composite types as arrays of their text forms", function()
    make_types()
    local t = new_table("id int, moods fl15_mood[], pairs fl15_pair[]")
    local events = listen(t, "insert")
    H.sql("INSERT INTO " .. t .. [=[ VALUES (1, '{sad,happy}', ARRAY[(1,'x'), (2,'y z')]::fl15_pair[])]=])
    H.wait(client, events, 1)
    assert.are.equal(1, #events)
    local r = events[1].new
    assert.are.same({ "sad", "happy" }, r.moods)
    assert.are.same({ "(1,x)", '(2,"y z")' }, r.pairs)
    assert.is_true(is_array(r.moods) and is_array(r.pairs))
  end)

  it("prints --table lines that parse back to the same values: empty arrays, every digit, unicode", function()
    local t = new_table("id int, tags text[], meta jsonb, f8 double precision, i8 bigint, num numeric")
    local h = H.spawn({ "--driver", driver, "--table", "public." .. t, "--ops", "insert" })
    local ok, err = pcall(function()
      -- Ready once a probe row (id 0) comes out: the capture exists whatever the driver.
      local deadline = core.now() + 15
      repeat
        H.sql("INSERT INTO " .. t .. " (id) VALUES (0)")
      until h.await('"id":0', 0.3) or core.now() > deadline
      assert.is_true(h.out():find('"id":0', 1, true) ~= nil, "not ready; stderr: " .. h.err())
      H.sql("INSERT INTO " .. t .. " VALUES (1, '{}', $1, 0.1, 9007199254740993, 12.50)", DOC)
      assert.is_true(h.await('"id":1', 10), "no line; stderr: " .. h.err())
      h.kill("TERM")
      assert.are.equal(0, h.wait(10), h.err())
      local line
      for l in h.out():gmatch("[^\n]+") do
        if l:find('"id":1', 1, true) then line = l end
      end
      assert.is_string(line)
      assert.truthy(line:find('"tags":[]', 1, true), line)
      assert.truthy(line:find('"f8":0.1,', 1, true) or line:find('"f8":0.1}', 1, true), line)
      assert.truthy(line:find('"big":12345678901234567890', 1, true), line)
      local ev = assert(json.decode(line))
      assert.are.equal("insert", ev.op)
      assert.are.equal("public." .. t, ev.table)
      local r = ev.new
      assert.is_true(is_array(r.tags) and #r.tags == 0)
      assert.are.equal(0.1, r.f8)
      assert.are.equal("9007199254740993", r.i8)
      assert.are.equal("12.50", r.num)
      assert.are.equal(DOC_S, r.meta.s)
      assert.is_true(is_exact(r.meta.pi, "3.14159265358979323846264338327950288"))
      local same = H.sql("SELECT meta = ($1::jsonb -> 'new' -> 'meta') AS meta, " ..
        "tags = ARRAY(SELECT jsonb_array_elements_text($1::jsonb -> 'new' -> 'tags')) AS tags FROM " .. t ..
        " WHERE id = 1", line)[1]
      assert.are.same({ meta = true, tags = true }, same)
    end)
    if h.wait(0.1) == nil then h.kill("KILL") h.wait(2) end
    assert(ok, err)
  end)
end)
end

-- client:stop() delivers what already arrived (trigger drivers); a callback failing there
-- is logged and makes the stop return nil, err under every on_error policy.
describe("a callback failing during client:stop()", function()
  for _, policy in ipairs({ "stop", "log" }) do
    it("is logged and returned by stop (on_error = " .. policy .. ")", function()
      local t = H.table("id int")
      local client = assert(flash.client { on_error = policy })
      assert(client:listen { table = t }):on("insert", function(ev) error("boom on row " .. ev.new.id) end)
      assert(client:start())
      H.sql("INSERT INTO " .. t .. " VALUES (3)")
      core.sleep(0.2)   -- the notification is in the socket; no poll has read it
      local lines = {}
      local old = flash.log.set_sink(function(line) lines[#lines + 1] = line end)
      local ok, err = client:stop()
      flash.log.set_sink(old)
      H.sql("DROP TABLE " .. t)
      assert.are.same({ nil, "callback for insert on public." .. t .. " failed while stopping (logged above)" }, { ok, err })
      -- The failure, then the stop's summary, each naming the client.
      assert.are.equal(2, #lines, table.concat(lines, "\n"))
      assert.matches("ERROR %[client %d+ trigger db=[^%]]+%] callback for insert on public%." .. t ..
        " failed while stopping: .*boom on row 3", lines[1])
      assert.matches("INFO  %[client %d+ trigger db=[^%]]+%] stopped after %d+%.%d s: 1 events, 1 errors, " ..
        "%d+%.%d%d%d s in callbacks$", lines[2])
      assert.are.equal(1, client:stats().errors)
    end)
  end
end)

-- The host as a process: a callback failing during a stop, a script's output into a pipe.
describe("flashlua host (values spec)", function()
  local procs, files, tables = {}, {}, {}

  after_each(function()
    for _, h in ipairs(procs) do
      if h.wait(0.1) == nil then h.kill("KILL") h.wait(2) end
      os.remove(h.base .. ".out") os.remove(h.base .. ".err") os.remove(h.base .. ".rc")
    end
    procs = {}
    for _, p in ipairs(files) do os.remove(p) end
    files = {}
    for _, t in ipairs(tables) do H.sql("DROP TABLE IF EXISTS " .. t) end
    tables = {}
  end)

  local function script(code)
    local path = H.script(code)
    files[#files + 1] = path
    return path
  end

  -- A stop delivers what already arrived before it removes the capture: the trigger
  -- drivers' notifications. (wal_logical delivers at a stop only the rest of a transaction
  -- it is inside of, which a spec cannot time; the same Client:_failed serves it.)
  local POLICIES = {
    { "stop", "nil" },
    { "log", '"log"' },
    { "a function", 'function(err, ev) io.stderr:write("handler got row ", ev.new.id, "\\n") end' },
  }
  -- Every policy with the trigger driver; the default one with the other trigger drivers.
  for _, driver in ipairs({ "trigger", "trigger_global", "trigger_statement" }) do
    for i, policy in ipairs(POLICIES) do
      if driver ~= "trigger" and i > 1 then break end
      it(string.format("exits 1 and logs a callback that fails during the stop's last delivery (%s driver, on_error = %s)",
          driver, policy[1]), function()
        local t = H.table("id int, v text")
        tables[#tables + 1] = t
        local path = script(string.format([[
io.stdout:setvbuf("no")
local flash = require "flash"
local core = require "flash.core"
local client = assert(flash.client { driver = %q, on_error = %s })
assert(client:listen { table = %q }):on("insert", function(ev)
  error("boom on row " .. ev.new.id)
end)
assert(client:start())
print("ready")
-- The spec writes a row and sends SIGINT now: the loop sees the signal first, and the
-- row arrives in the stop's last delivery.
core.sleep(3)
]], driver, policy[2], t))
        local h = H.spawn({ path })
        procs[#procs + 1] = h
        assert.is_true(h.await("ready", 10), "not ready; stderr: " .. h.err())
        H.sql("INSERT INTO " .. t .. " VALUES (7, 'x')")
        h.kill("INT")
        assert.are.equal(1, h.wait(15), "stderr: " .. h.err())
        local err = h.err()
        assert.matches("ERROR %[client 1 [%w_]+ db=[^%]]+%] callback for insert on public%." .. t .. " failed while stopping: " ..
          path:gsub("%p", "%%%0") .. ":6: boom on row 7", err)
        assert.truthy(err:find("flashlua: callback for insert on public." .. t .. " failed while stopping (logged above)\n",
          1, true), err)
        if policy[1] == "a function" then assert.truthy(err:find("handler got row 7\n", 1, true), err) end
        assert.are.equal(0, H.await_leftovers(0))
      end)
    end
  end

  it("line-buffers stdout into a pipe: a script's print and io.write arrive before it exits", function()
    -- The script runs until the spec creates `go` (at most 20 s): a line that arrived before
    -- that was not held back until exit, whatever the machine's speed.
    local go = os.tmpname()
    os.remove(go)
    local path = script(string.format([[
local flash = require "flash"
print("pid " .. require("flash.core").getpid())
io.write("written\n")
local function finish() print("done") flash.stop() end
flash.every(0.02, function() if io.open(%q) then finish() end end)
flash.after(20, finish)
]], go))
    local t0 = core.now()
    local p = io.popen(string.format("%s %s 2>/dev/null | cat", H.sh_quote(H.flashlua), H.sh_quote(path)))
    local first = p:read("*l")
    local second = p:read("*l")
    local elapsed = core.now() - t0
    local pid = tonumber((first or ""):match("^pid (%d+)$"))
    local alive = pid and os.execute("kill -0 " .. pid .. " 2>/dev/null")
    assert(io.open(go, "w")):close()
    local rest = p:read("*a")
    p:close()
    os.remove(go)
    assert.is_number(pid, tostring(first))
    assert.are.equal("written", second)
    assert.is_true(elapsed < 15, string.format("the lines took %.1f s (the process runs until told, 20 s at most)", elapsed))
    assert.truthy(alive == 0 or alive == true, "the process had already exited")
    assert.are.equal("done\n", rest)
  end)
end)
