-- Values read from binary send forms (src/core/fl_binary.c): wal_logical with
-- binary = true, and the pg_extension driver (whose plugin sends built-in types in binary),
-- deliver exactly the Lua values the text path delivers, type by type, edge values, arrays,
-- NULLs, unchanged TOASTed values and old rows included.
local flash = require "flash"
local H = require "helpers"

-- Every column type the binary reader knows, an enum, a domain, and arrays of them.
local COLUMNS = [[id int PRIMARY KEY, i2 int2, i4 int4, i8 int8, o oid, f4 float4, f8 float8, n numeric,
  n2 numeric(12,4), b bool, d date, t time, ttz timetz, ts timestamp, tstz timestamptz, u uuid, ba bytea,
  tx text, vc varchar(20), bp char(5), nm name, ch "char", js json, jb jsonb, mood %s, dom %s,
  a_i4 int4[], a_i8 int8[], a_tx text[], a_n numeric[], a_ts timestamptz[], a_f4 float4[], a_b bool[],
  a_2d int4[], a_mood %s[], a_d date[], a_jb jsonb[], a_ba bytea[], a_u uuid[], iv interval, a_iv interval[], big text]]

-- Edge values, one row each; then generated rows of random values.
local ROWS = [==[
INSERT INTO %s (id, i2, i4, i8, o, f4, f8, n, n2, b, d, t, ttz, ts, tstz, u, ba, tx, vc, bp, nm, ch, js, jb, mood, dom,
                a_i4, a_i8, a_tx, a_n, a_ts, a_f4, a_b, a_2d, a_mood, a_d, a_jb, a_ba, a_u, iv, a_iv) VALUES
 (1, -32768, -2147483648, -9223372036854775808, 4294967295, 1.1, 0.1, '-12345678901234567890.000000000001', 7,
  true, '4714-11-24 BC', '24:00:00', '01:02:03-15:59:59', '0001-01-01 00:00:00 BC', '1999-12-31 23:59:59.999999-03',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\x00ff10', 'déjà vu', 'x y', 'ab', 'relname', 'a',
  '{"a": [1, 2.50, null]}', '{"big": 12345678901234567890, "s": "\u00e9", "e": [], "o": {}}', 'sad', 5,
  '{1,NULL,3}', '{9223372036854775807,9007199254740993,-1}', '{"a b","q\"x",NULL,""}', '{0.1,NaN,-Infinity,1e-20}',
  '{"2026-11-30 13:54:46.5+00","infinity"}', '{1.17549435e-38,NaN,-0,3.4028235e38,0.3}', '{t,f,NULL}',
  '{{1,2},{3,4}}', '{happy,sad}', '[0:1]={2000-01-01,infinity}', '{"{\"k\": [1.50]}",null}', '{"\\x00",NULL}',
  '{00000000-0000-0000-0000-000000000000}', '-1 year -2 mons +3 days -04:05:06.000001', '{"1 day",NULL,"-00:00:01"}'),
 (2, 32767, 2147483647, 9223372036854775807, 0, 'NaN', '-Infinity', 'NaN', 0.5, false, '5874897-12-31', '00:00:00',
  '24:00:00+15:59', '294276-12-31 23:59:59.999999', '-infinity', '00000000-0000-0000-0000-000000000000', '\x', '',
  '', '', '', '', '[]', '12345678901234567890', 'happy', -1, '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}',
  '{}', '{}', '{}', '{}', '00:00:00', '{}'),
 (3, 0, 0, 0, 1, '-0', '-0', '0.00', -0.0001, NULL, 'infinity', '12:34:56.78', '10:00:00+00:00:01', 'infinity',
  '0044-03-15 12:00:00 BC', NULL, 'abc', NULL, NULL, NULL, NULL, '\377', 'null', '"x"', NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, '-1 days +02:00:00', NULL),
 (4, NULL, NULL, NULL, NULL, 'Infinity', 5e-324, 'Infinity', NULL, NULL, '-infinity', NULL, NULL, '-infinity', 'infinity',
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, '{-Infinity}', NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, '178956970 years 7 mons 2147483647 days 2562047788:00:54.775807', NULL);
INSERT INTO %s (id, i2, i4, i8, f4, f8, n, n2, b, d, t, ttz, ts, tstz, u, ba, tx, jb, mood, a_i4, a_n, a_ts, a_f4, a_2d, iv)
SELECT g, (random() * 65535 - 32768)::int2, (random() * 4e9 - 2e9)::int4, (random() * 1.8e19 - 9e18)::int8,
  (random() * 1e6 - 5e5)::float4 / (1 + g %% 7), (random() - 0.5) * 10 ^ (g %% 40 - 20),
  round(((random() - 0.5) * 10 ^ (g %% 30))::numeric, g %% 25), round(random()::numeric * 1e8, 4) / 10000,
  g %% 2 = 0, date '2000-01-01' + (random() * 2e6 - 1e6)::int,
  make_time((random() * 23)::int, (random() * 59)::int, round((random() * 59.999999)::numeric, 6)::float8),
  (make_time((random() * 23)::int, (random() * 59)::int, (random() * 59)::int)::text ||
   to_char((random() * 28 - 14)::int, 'S00') || ':' || lpad(((g %% 4) * 15)::text, 2, '0'))::timetz,
  timestamp '2000-01-01' + (random() * 1e10 - 5e9) * interval '1 second' + (g %% 1000000) * interval '1 microsecond',
  timestamptz '1970-01-01 00:00:00+00' + (random() * 1e11 - 3e10) * interval '1 millisecond',
  md5(g::text)::uuid, decode(md5(g::text), 'hex'), repeat(chr(65 + g %% 26), g %% 50),
  jsonb_build_object('g', g, 'f', random(), 'n', (g %% 3)::numeric / 7), (ARRAY['sad','happy'])[1 + g %% 2]::%s,
  ARRAY[g, -g, NULL], ARRAY[round(random()::numeric, g %% 20), NULL, g],
  ARRAY[timestamptz '2026-01-01' + g * interval '1 hour 1.5 second'], ARRAY[random()::float4, (g / 3.0)::float4],
  ARRAY[[g, g + 1], [g + 2, NULL]],
  make_interval((random() * 20 - 10)::int, (random() * 30 - 15)::int, 0, (random() * 60 - 30)::int,
                (random() * 48 - 24)::int, 0, round((random() * 120 - 60)::numeric, g %% 7)::float8)
FROM generate_series(5, 604) g;
UPDATE %s SET i4 = i4 + 1 WHERE id %% 10 = 0;
UPDATE %s SET big = NULL WHERE id = 7;
DELETE FROM %s WHERE id %% 25 = 0;
]==]

-- Equal as the user sees them: NaN is NaN, -0 is not 0, tables equal key by key with the
-- same marker metatable.
local function same(a, b, path, diffs)
  if type(a) == "number" and type(b) == "number" then
    if a ~= a and b ~= b then return end
    if a == b and (a ~= 0 or 1 / a == 1 / b) then return end
  elseif type(a) == "table" and type(b) == "table" then
    if getmetatable(a) ~= getmetatable(b) then diffs[#diffs + 1] = path .. ": marker differs" end
    for k, v in pairs(a) do same(v, b[k], path .. "." .. tostring(k), diffs) end
    for k, v in pairs(b) do if a[k] == nil then same(nil, v, path .. "." .. tostring(k), diffs) end end
    return
  elseif a == b then
    return
  end
  diffs[#diffs + 1] = string.format("%s: %s vs %s", path, tostring(a), tostring(b))
end

local function collect(opts, t)
  local c = assert(flash.client(opts))
  local events = {}
  assert(c:listen { table = t }):on("all", function(ev)
    events[#events + 1] = { op = ev.op, new = ev.new, old = ev.old }
  end)
  assert(c:start())
  return c, events
end

describe("binary values", function()
  local clients = {}
  after_each(function()
    for _, c in ipairs(clients) do c:stop() end
    clients = {}
    H.sql("DROP TYPE IF EXISTS bin_mood CASCADE; DROP DOMAIN IF EXISTS bin_dom CASCADE")
  end)

  local function setup()
    H.sql("DROP TYPE IF EXISTS bin_mood CASCADE; DROP DOMAIN IF EXISTS bin_dom CASCADE; " ..
          "CREATE TYPE bin_mood AS ENUM ('sad', 'happy'); CREATE DOMAIN bin_dom AS int CHECK (VALUE > -10)")
    local t = H.table(COLUMNS:format("bin_mood", "bin_dom", "bin_mood"))
    H.sql("ALTER TABLE " .. t .. " REPLICA IDENTITY FULL; ALTER TABLE " .. t .. " ALTER big SET STORAGE EXTERNAL")
    return t
  end

  local function write(t)
    H.sql(ROWS:format(t, t, "bin_mood", t, t, t))
    -- A TOASTed value an update leaves unchanged (FULL: the old row's value is the new one's).
    H.sql("UPDATE " .. t .. " SET big = (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 400) g) WHERE id = 8")
    H.sql("UPDATE " .. t .. " SET i2 = 1 WHERE id = 8")
  end

  local function compare(a, b)
    assert.equal(#a, #b)
    assert.is_true(#a > 600)
    local diffs = {}
    for i = 1, #a do same(a[i], b[i], "event " .. i, diffs) end
    assert.same({}, { unpack(diffs, 1, 20) })
  end

  it("wal_logical with binary = true delivers the values the text path delivers, for every type it reads", function()
    local t = setup()
    local text, te = collect({ driver = "wal_logical" }, t)
    local bin, be = collect({ driver = "wal_logical", binary = true }, t)
    clients = { text, bin }
    write(t)
    assert(text:run { until_lsn = "current" })
    assert(bin:run { until_lsn = "current" })
    compare(te, be)
    -- spot checks of what both say
    assert.equal("-12345678901234567890.000000000001", be[1].new.n)
    assert.equal("4714-11-24 BC", be[1].new.d)
    assert.equal("0001-01-01 00:00:00 BC", be[1].new.ts)
    assert.equal("2000-01-01 02:59:59.999999+00", be[1].new.tstz)
    assert.equal(1.1, be[1].new.f4)
    assert.equal("sad", be[1].new.mood)
    assert.same({ "happy", "sad" }, be[1].new.a_mood)
    assert.equal("-9223372036854775808", be[1].new.i8)
    assert.equal("\0\255\16", be[1].new.ba)
    assert.equal(12800, #be[#be - 1].new.big)
  end)

  it("pg_extension delivers the values wal_logical's text path delivers", function()
    if not H.scalar("SELECT count(*) > 0 AS b FROM pg_extension WHERE extname = 'flashlua'") then
      pending("the flashlua extension is not installed")
      return
    end
    local t = setup()
    local text, te = collect({ driver = "wal_logical" }, t)
    local ext, ee = collect({ driver = "pg_extension" }, t)
    clients = { text, ext }
    write(t)
    assert(text:run { until_lsn = "current" })
    assert(ext:run { until_lsn = "current" })
    compare(te, ee)
  end)

  it("refuses binary = true for a listener that delivers a type it cannot read exactly, naming it", function()
    local t = H.table("id int PRIMARY KEY, span interval, at inet")   -- interval is read, inet is not
    local c = assert(flash.client { driver = "wal_logical", binary = true })
    clients = { c }
    local l, err = c:listen { table = t }
    assert.is_nil(l)
    assert.equal("binary = true cannot read values of type inet (column at of public." .. t .. ") exactly " ..
      "(leave binary out (text values), or give the listener fields without that column)", err)
    -- A listener whose fields leave them out is fine.
    local events = {}
    assert(c:listen { table = t, fields = { "id", "span" } }):on("insert", function(ev) events[#events + 1] = ev.new end)
    assert(c:start())
    H.sql("INSERT INTO " .. t .. " VALUES (7, '1 day', '10.0.0.1')")
    assert(c:run { until_lsn = "current" })
    assert.same({ { id = 7, span = "1 day" } }, events)
  end)

  it("warns once when a column of a type it cannot read is added while listening", function()
    local t = H.table("id int PRIMARY KEY")
    local c = assert(flash.client { driver = "wal_logical", binary = true })
    clients = { c }
    local events = {}
    assert(c:listen { table = t }):on("insert", function(ev) events[#events + 1] = ev.new end)
    assert(c:start())
    local warned = H.warnings(function()
      H.sql("ALTER TABLE " .. t .. " ADD COLUMN at inet")
      H.sql("INSERT INTO " .. t .. " VALUES (1, '10.0.0.1'), (2, NULL)")
      assert(c:run { until_lsn = "current" })
    end)
    assert.same({ string.format("listener #1 on public.%s: column at is of type inet, which binary = true " ..
      "cannot read; its values arrive as the bytes of their binary send form", t) }, warned)
    -- inet_send: family (2: IPv4), bits, is_cidr, address length, address
    assert.same({ { id = 1, at = "\2\32\0\4\10\0\0\1" }, { id = 2, at = flash.null } }, events)
  end)
end)
