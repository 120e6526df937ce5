-- test/mem_script.lua: the host's C paths under valgrind (make check-mem): the trigger
-- drivers (captured row text, a row read on its own connection, a row over max_row_bytes)
-- and wal_logical (pgoutput, streaming, spill),
-- and flash.json (the encoder's growing buffer, errors half-way, exact numbers), and the
-- metrics HTTP server.
local flash = require "flash"
local admin = assert(flash.client {})
assert(admin:query [[DROP TABLE IF EXISTS mem_t;
  CREATE TABLE mem_t (id int PRIMARY KEY, t text, j jsonb, a int[], b bytea, n numeric);
  ALTER TABLE mem_t REPLICA IDENTITY FULL]])
assert(admin:query("ALTER SYSTEM SET logical_decoding_work_mem = '1MB'"))
assert(admin:query("SELECT pg_reload_conf()"))

local counts = {}
for _, driver in ipairs({ "trigger", "trigger_global", "trigger_statement", "wal_logical" }) do
  local c = assert(flash.client { driver = driver, streaming = true, stream_memory = 64 * 1024,
    max_row_bytes = 12 * 1024 * 1024 })
  local n = 0
  assert(c:listen { table = "mem_t", fields = { "id", "t", "j", "a", "b" }, where = { { "id", ">", 0 } } })
    :on("all", function() n = n + 1 end)
  assert(c:start())
  assert(admin:query([[INSERT INTO mem_t SELECT g, repeat('x', 40), '{"k":[1,null]}', '{1,2}', '\x00ff', g / 3.0
    FROM generate_series(1, 3000) g]]))
  assert(admin:query("INSERT INTO mem_t VALUES (-1, repeat('big', 5000))"))
  if driver ~= "wal_logical" then
    -- Past 8 MB of text (read on a connection of its own), and past max_row_bytes.
    assert(admin:query("INSERT INTO mem_t VALUES (-2, repeat('m', 9 * 1024 * 1024))"))
    assert(admin:query("INSERT INTO mem_t (id, b) VALUES (-3, decode(repeat('ab', 7 * 1024 * 1024), 'hex'))"))
  end
  assert(admin:query("BEGIN; INSERT INTO mem_t SELECT g FROM generate_series(100001, 110000) g; ROLLBACK"))
  assert(admin:query("UPDATE mem_t SET t = 'y' WHERE id <= 100; DELETE FROM mem_t WHERE id <= 10; TRUNCATE mem_t"))
  if driver == "wal_logical" then
    assert(c:run { until_lsn = "current" })
  else
    local deadline = require("flash.core").now() + 30
    while n < 3112 and require("flash.core").now() < deadline do assert(c:poll(0.1)) end
    c:stop()
  end
  counts[#counts + 1] = driver .. "=" .. n
end
assert(admin:query("ALTER SYSTEM RESET logical_decoding_work_mem"))
assert(admin:query("SELECT pg_reload_conf()"))
assert(admin:query("DROP TABLE mem_t"))

local json = flash.json
local doc = '{"a":[],"b":{},"n":12345678901234567890,"d":0.1,"s":"\\u00e9\\ud83d\\ude00\\n","l":"' ..
  string.rep("q\\\"", 3000) .. '","x":[[[{"y":[1e400,-0,5e-324]}]]]}'
for _ = 1, 50 do
  local v = assert(json.decode(doc))
  local text = json.encode(v)
  assert(#json.encode(assert(json.decode(text))) == #text)   -- key order may differ
  assert(not pcall(json.encode, { v, { f = print } }))   -- raised with the buffer grown
  assert(not json.decode(doc:sub(1, -2)))
end
counts[#counts + 1] = "json=ok"

-- The metrics server (libmicrohttpd driven by the loop): /metrics, /healthz, a 404, a POST
-- with a body (405), then the close.
local m = assert(flash.metrics { listen = "127.0.0.1:0" })
assert(admin:query("DROP TABLE IF EXISTS mem_m; CREATE TABLE mem_m (id int)"))
local mc = assert(flash.client {})
assert(mc:listen { table = "mem_m" }):on("insert", function() end)
local out = os.tmpname()
flash.after(0.2, function()
  os.execute(string.format("(for p in metrics healthz nope; do curl -s -m 10 http://127.0.0.1:%d/$p; done; " ..
    "curl -s -m 10 -d x=1 http://127.0.0.1:%d/metrics; echo END) >%s 2>&1 &", m.port, m.port, out))
end)
local deadline = require("flash.core").now() + 60
flash.every(0.1, function()
  local f = io.open(out)
  local text = f and f:read("*a") or ""
  if f then f:close() end
  if text:find("END") or require("flash.core").now() > deadline then
    counts[#counts + 1] = "http=" .. select(2, text:gsub("flashlua_up{", "")) .. "," ..
      select(2, text:gsub("ok: ", "")) .. "," .. select(2, text:gsub("not found", "")) .. "," ..
      select(2, text:gsub("only GET and HEAD", ""))
    flash.stop()
  end
end)
assert(flash.run())
m.close()
os.remove(out)
assert(assert(flash.client {}):query("DROP TABLE mem_m"))
print(table.concat(counts, " "))
