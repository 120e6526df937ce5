-- bench/util.lua: what the benchmarks share (loaded with dofile): running a shell command,
-- and running one under GNU time.
local U = {}

function U.sh(cmd)
  local p = io.popen(cmd .. " 2>&1")
  local out = p:read("*a")
  local ok, _, code = p:close()
  return out, (ok == true or ok == 0) and 0 or code
end

-- Runs a command under GNU time: wall s, user+sys s, max RSS kB, its output.
function U.measure(cmd)
  local tf = os.tmpname()
  local out, code = U.sh(string.format("/usr/bin/time -f '%%e %%U %%S %%M' -o %s %s", tf, cmd))
  local f = io.open(tf)
  local line = f and f:read("*l") or ""
  if f then f:close() end
  os.remove(tf)
  local wall, user, sys, rss = line:match("([%d.]+) ([%d.]+) ([%d.]+) (%d+)")
  if not wall then error("command failed (" .. tostring(code) .. "): " .. cmd .. "\n" .. out) end
  return { wall = tonumber(wall), cpu = tonumber(user) + tonumber(sys), rss_kb = tonumber(rss), out = out }
end

-- A file's whole content, or nil.
function U.read_file(path)
  local f = io.open(path)
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

-- The WAL benchmarks' table (6 columns, REPLICA IDENTITY FULL) and fill(txs, per), which
-- writes txs transactions of per rows.
U.BENCH_TABLE = [[
  CREATE TABLE bench (id bigint PRIMARY KEY, a int, b text, c timestamptz, d numeric, e boolean);
  ALTER TABLE bench REPLICA IDENTITY FULL;
  CREATE PROCEDURE fill(txs int, per int) LANGUAGE plpgsql AS $$
  BEGIN
    FOR t IN 0 .. txs - 1 LOOP
      INSERT INTO bench SELECT g, g % 1000, 'row ' || g, '2026-01-01'::timestamptz + g * interval '1 s',
             g / 7.0, g % 2 = 0
      FROM generate_series(t::bigint * per + 1, (t + 1)::bigint * per) g;
      COMMIT;
    END LOOP;
  END $$;]]

return U
