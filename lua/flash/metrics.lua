-- flash.metrics: Prometheus text at GET /metrics and a health check at GET /healthz, served
-- from flash's own loop (flashlua --metrics ADDR:PORT, or flash.metrics{ listen = ... }).
-- HTTP is libmicrohttpd's (src/lua/lhttp.c); this file only renders what the clients'
-- stats say. Nothing is served while no loop runs (the script's setup, after the stop).
local core = require "flash.core"
local log = require "flash.log"

local M = {}

-- Upper bounds (seconds) of the callback-time histogram's buckets.
M.BUCKETS = { 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10 }
local BUCKETS, NB = M.BUCKETS, #M.BUCKETS

-- The histogram a client's callback times go to (client.handler_hist, observed by
-- Client:_call): counts per bucket (not cumulative; the last one is +Inf), sum, count.
local Hist = {}
Hist.__index = Hist
function M.histogram()
  local h = setmetatable({ sum = 0, count = 0 }, Hist)
  for i = 1, NB + 1 do h[i] = 0 end
  return h
end
function Hist:observe(v)
  local i = 1
  while i <= NB and v > BUCKETS[i] do i = i + 1 end
  self[i] = self[i] + 1
  self.sum = self.sum + v
  self.count = self.count + 1
end

-- "ADDR:PORT" (ADDR an IPv4 address or a name, [IPv6] in brackets, empty for every
-- address) -> host, port | nil, why.
function M.parse_address(s)
  if type(s) ~= "string" then return nil, "ADDR:PORT expected" end
  local host, port = s:match("^%[([^%]]*)%]:(%d+)$")
  if not host then host, port = s:match("^([^:]*):(%d+)$") end
  if not host then return nil, "ADDR:PORT expected (e.g. 127.0.0.1:9187, [::1]:9187 or :9187 for every address)" end
  port = tonumber(port)
  if port > 65535 then return nil, "port " .. port .. " is out of range (0-65535)" end
  return host, port
end

local function esc(v)
  return (tostring(v):gsub("\\", "\\\\"):gsub("\n", "\\n"):gsub('"', '\\"'))
end

-- A client's labels: client (its name), db, driver.
local function labels(c)
  local name = c.opts.name or c.label:sub(1, #c.label - #(" db=" .. c.database))
  return string.format('client="%s",db="%s",driver="%s"', esc(name), esc(c.database), esc(c.driver_name))
end

local function lsn_number(text)
  local hi, lo = tostring(text):match("^(%x+)/(%x+)$")
  if not hi then return nil end
  return tonumber(hi, 16) * 4294967296 + tonumber(lo, 16)
end

local function num(v)
  if v ~= v then return "NaN" end
  if v == math.huge then return "+Inf" end
  if v == -math.huge then return "-Inf" end
  if v == math.floor(v) and math.abs(v) < 2^53 then return string.format("%d", v) end
  local s = string.format("%.15g", v)
  if tonumber(s) ~= v then s = string.format("%.17g", v) end
  return s
end

-- Why client c is not streaming, or nil when it is.
function M.unhealthy(c)
  if c.failure then return "failed: " .. tostring(c.failure):gsub("\n.*", "") end
  if c.closed then return "stopped" end
  if not c.started then return "not started" end
  if c.capturing and c.driver.health then return c.driver:health() end
  return nil
end

-- The Prometheus text of every open client (text exposition format 0.0.4).
function M.render(clients)
  local out, seen = {}, {}
  local function family(name, kind, help)
    if seen[name] then return end
    seen[name] = true
    out[#out + 1] = "# HELP " .. name .. " " .. help
    out[#out + 1] = "# TYPE " .. name .. " " .. kind
  end
  local function sample(name, lb, v)
    out[#out + 1] = string.format("%s{%s} %s", name, lb, num(v))
  end
  -- Grouped by family (the format wants a family's samples together).
  local rows = {}
  for _, c in ipairs(clients) do rows[#rows + 1] = { c = c, lb = labels(c), s = c:stats() } end

  family("flashlua_up", "gauge", "1 while the client streams (connected, not failing, not reconnecting), else 0")
  for _, r in ipairs(rows) do sample("flashlua_up", r.lb, M.unhealthy(r.c) and 0 or 1) end

  family("flashlua_events_total", "counter", "Events delivered to callbacks, by listened table and operation")
  for _, r in ipairs(rows) do
    local per = {}
    local tables = {}
    for _, l in ipairs(r.c.listeners) do
      local t = per[l.table_name]
      if not t then
        t = {}
        per[l.table_name] = t
        tables[#tables + 1] = l.table_name
      end
      for op, n in pairs(l.delivered or {}) do t[op] = (t[op] or 0) + n end
    end
    table.sort(tables)
    for _, name in ipairs(tables) do
      for _, op in ipairs({ "insert", "update", "delete", "truncate", "read" }) do
        sample("flashlua_events_total", string.format('%s,table="%s",op="%s"', r.lb, esc(name), op), per[name][op] or 0)
      end
    end
  end

  local simple = {
    { "flashlua_events_dropped_total", "counter", "Changes captured that no callback wanted", "dropped" },
    { "flashlua_errors_total", "counter", "Callbacks (and Lua where functions) that raised", "errors" },
    { "flashlua_reconnects_total", "counter", "Reconnections to PostgreSQL (or Redis) after a lost connection",
      "reconnects" },
    { "flashlua_bytes_total", "counter", "Bytes of row text read (trigger drivers)", "bytes", "captured" },
    { "flashlua_uptime_seconds", "gauge", "Seconds since the client started", "uptime" },
    { "flashlua_lag_bytes", "gauge", "WAL bytes the stream has received and not yet confirmed (wal_logical, pg_extension)",
      "lag_bytes" },
    { "flashlua_captured_rows_total", "counter", "Rows read from the capture table (trigger drivers)", "captured" },
    { "flashlua_stream_spilled_bytes_total", "counter", "Bytes of streamed transactions spilled to disk",
      "stream_spilled" },
    { "flashlua_heartbeats_total", "counter", "Heartbeat messages written (the heartbeat option)", "heartbeats" },
    { "flashlua_unacked_events", "gauge", "Events delivered and not yet acknowledged (ack = \"manual\")", "unacked" },
  }
  for _, m in ipairs(simple) do
    for _, r in ipairs(rows) do
      local v = r.s[m[4]]
      if type(v) == "number" and (not m[5] or r.s[m[5]] ~= nil) then   -- m[5]: only where the driver keeps it
        family(m[1], m[2], m[3])
        sample(m[1], r.lb, v)
      end
    end
  end

  for _, r in ipairs(rows) do
    local pos = r.s.last_lsn and lsn_number(r.s.last_lsn)
    if pos then
      family("flashlua_confirmed_lsn", "gauge", "The position confirmed to the server, as a byte offset (X/Y = X*2^32+Y)")
      sample("flashlua_confirmed_lsn", r.lb, pos)
    end
  end
  for _, r in ipairs(rows) do
    if r.s.last_event_time and r.s.events > 0 then
      family("flashlua_last_event_timestamp_seconds", "gauge", "Wall-clock time of the last delivered event")
      sample("flashlua_last_event_timestamp_seconds", r.lb, r.s.last_event_time)
    end
  end
  for _, r in ipairs(rows) do
    local ct = r.c.last_commit_time
    if ct and r.s.last_event_time then
      family("flashlua_lag_seconds", "gauge", "Seconds between the last delivered event's commit and its delivery")
      sample("flashlua_lag_seconds", r.lb, math.max(0, r.s.last_event_time - ct))
    end
  end
  -- wal_logical, pg_extension: the WAL the slot keeps on the server (a query per scrape).
  for _, r in ipairs(rows) do
    local d = r.c.driver
    if r.c.capturing and r.s.slot and d.conn and not M.unhealthy(r.c) then
      local held = require("flash.slots").held(d:conn(), r.s.slot)
      if held then
        family("flashlua_slot_wal_held_bytes", "gauge", "WAL the server keeps for the client's slot (from its restart position)")
        sample("flashlua_slot_wal_held_bytes", r.lb, held)
      end
    end
  end
  -- Trigger drivers: rows captured and waiting in the capture table (a count(*) per scrape).
  for _, r in ipairs(rows) do
    local d = r.c.driver
    if r.c.capturing and d.backlog and d.listening and r.s.schema then
      family("flashlua_backlog_rows", "gauge", "Captured rows waiting in the capture table (trigger drivers)")
      sample("flashlua_backlog_rows", r.lb, d:backlog(r.s.schema))
    end
  end
  for _, r in ipairs(rows) do
    for _, b in ipairs(r.s.backfill and r.s.backfill.tables or {}) do
      local lb = string.format('%s,table="%s"', r.lb, esc(b.table))
      family("flashlua_backfill_rows", "gauge", "Rows a backfill has read")
      sample("flashlua_backfill_rows", lb, b.rows)
      if b.estimated then
        family("flashlua_backfill_estimated_rows", "gauge", "Rows a backfill expects (the planner's estimate)")
        sample("flashlua_backfill_estimated_rows", lb, b.estimated)
      end
      family("flashlua_backfill_done", "gauge", "1 once a backfill has read every row")
      sample("flashlua_backfill_done", lb, b.done and 1 or 0)
    end
  end

  family("flashlua_handler_seconds", "histogram", "Seconds spent in each callback")
  for _, r in ipairs(rows) do
    local h = r.c.handler_hist or M.histogram()
    local cum = 0
    for i = 1, NB do
      cum = cum + h[i]
      sample("flashlua_handler_seconds_bucket", string.format('%s,le="%s"', r.lb, num(BUCKETS[i])), cum)
    end
    sample("flashlua_handler_seconds_bucket", r.lb .. ',le="+Inf"', h.count)
    sample("flashlua_handler_seconds_sum", r.lb, h.sum)
    sample("flashlua_handler_seconds_count", r.lb, h.count)
  end
  out[#out + 1] = ""
  return table.concat(out, "\n")
end

-- /healthz: 200 "ok" while every client streams, else 503 with one line per client that
-- does not.
function M.health(clients)
  local bad = {}
  for _, c in ipairs(clients) do
    local why = M.unhealthy(c)
    if why then bad[#bad + 1] = "[" .. c.label .. "] " .. why end
  end
  if #bad == 0 then return 200, string.format("ok: %d client%s streaming\n", #clients, #clients == 1 and "" or "s") end
  return 503, table.concat(bad, "\n") .. "\n"
end

local TEXT = "text/plain; charset=utf-8"
local PROM = "text/plain; version=0.0.4; charset=utf-8"

-- flash.metrics{ listen = "ADDR:PORT" } -> server | nil, err. The server is a source of
-- flash's loop (fd, deadline, step) until server:close().
function M.start(flash, opts)
  local host, port = M.parse_address(opts.listen)
  if not host then return nil, string.format("bad metrics address '%s': %s", tostring(opts.listen), port) end
  local function handler(_, path)
    path = path:gsub("%?.*", "")
    local clients = flash._clients()
    if path == "/metrics" then return 200, M.render(clients), PROM end
    if path == "/healthz" then
      local status, body = M.health(clients)
      return status, body, TEXT
    end
    return 404, "not found: try /metrics or /healthz\n", TEXT
  end
  local http, err = core.http_listen(host, port, handler)
  if not http then return nil, err end
  local self = { http = http, port = http:port(), host = host }
  self.url = string.format("http://%s:%d", host:find(":", 1, true) and ("[" .. host .. "]") or
    (host == "" and "0.0.0.0" or host), self.port)
  local fd = http:fd()
  -- The loop's source contract (flash._add_source): fds, deadline, step.
  -- Callback times of every client from now on (clients made after the server too):
  -- attached when the loop gathers its fds, before it steps any client in that turn, so
  -- a client's first events are timed too.
  local function attach()
    for _, c in ipairs(flash._clients()) do
      if not c.handler_hist then c.handler_hist = M.histogram() end
    end
  end
  function self.fds()
    attach()
    return { fd }
  end
  function self.deadline()
    local t = http:timeout()
    return t and (core.now() + t) or nil
  end
  function self.step()
    attach()
    http:run()
  end
  function self.close()
    if not self.closed then
      self.closed = true
      flash._remove_source(self)
      http:close()
    end
  end
  for _, c in ipairs(flash._clients()) do c.handler_hist = c.handler_hist or M.histogram() end
  flash._add_source(self)
  log.info(string.format("metrics on %s/metrics, health on %s/healthz", self.url, self.url))
  return self
end

return M
