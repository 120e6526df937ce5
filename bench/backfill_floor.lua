-- bench/backfill_floor.lua: what LuaJIT alone spends making the events of a backfill, with
-- no flashlua in the loop: the floor under `listener:backfill`'s client CPU a row.
--   luajit bench/backfill_floor.lua FILE [chunk]
-- FILE holds `COPY (SELECT id, a, b, c, d, e FROM bench) TO STDOUT` (bench/backfill.lua
-- writes it). Each chunk of lines is split into fields and its numbers converted first,
-- untimed (the decoding flashlua does in C); then, timed, each row becomes what a read
-- event is -- the row table (two numbers, three strings made from the chunk's bytes, a
-- boolean), the event table with its id string -- and goes to the same callback the
-- benchmark's consumer has (it reads every column). Prints "floor X us/row".
-- Runs with the LuaJIT settings flashlua itself uses (flash.luajit).
require "flash.luajit"
local ffi = require "ffi"

ffi.cdef [[
  typedef struct FILE FILE;
  FILE *fopen(const char *path, const char *mode);
  size_t fread(void *ptr, size_t size, size_t n, FILE *f);
  int fclose(FILE *f);
  void *malloc(size_t n);
]]
local C = ffi.C

local path, chunk = arg[1], tonumber(arg[2]) or 10000

local n, sum = 0, 0
local function callback(ev)
  local r = ev.new
  n = n + 1
  sum = sum + r.a + #r.b + #r.c + #r.d + (r.e and 1 or 0) + r.id
end

-- The file in memory outside the Lua heap (a large Lua heap would make every collection
-- cycle rarer and slower than in flashlua's client, whose heap is a couple of MB).
local fh = C.fopen(path or "", "rb")
assert(fh ~= nil, "cannot open " .. tostring(path))
local size, cap = 0, 2 ^ 20
local text = ffi.cast("uint8_t *", C.malloc(cap))
while true do
  local got = tonumber(C.fread(text + size, 1, cap - size, fh))
  size = size + got
  if size < cap then break end
  local bigger = ffi.cast("uint8_t *", C.malloc(cap * 2))
  ffi.copy(bigger, text, size)
  text, cap = bigger, cap * 2
end
C.fclose(fh)

-- One chunk's fields: where b, c and d start and their lengths, and id, a, e as numbers.
local at = ffi.new("int64_t[?]", 3 * chunk)
local lens = ffi.new("int32_t[?]", 3 * chunk)
local nums = ffi.new("int64_t[?]", 3 * chunk)

-- Splits the line at p (untimed; allocates nothing in the Lua heap); returns the next line.
local TAB, NL, ZERO = 9, 10, 48
local function split(p, k)
  local col, v, start = 0, 0, p
  while true do
    local ch = text[p]
    if ch == TAB or ch == NL then
      if col == 0 then nums[3 * k] = v
      elseif col == 1 then nums[3 * k + 1] = v
      elseif col <= 4 then at[3 * k + col - 2], lens[3 * k + col - 2] = start, p - start
      else nums[3 * k + 2] = text[start] == 116 and 1 or 0 end   -- 't'
      col, v, start = col + 1, 0, p + 1
      if ch == NL then return p + 1 end
    elseif col <= 1 then v = v * 10 + ch - ZERO end
    p = p + 1
  end
end

local spent, rows, pos = 0, 0, 0
local clock, fstr, format = os.clock, ffi.string, string.format
local TWO32 = 2 ^ 32
while pos < size do
  local k = 0
  while k < chunk and pos < size do
    pos = split(pos, k)
    k = k + 1
  end
  -- timed: the events
  local lsn = 0x16B374D8 + rows
  local prefix = format("%08X%08X/", math.floor(lsn / TWO32), lsn % TWO32)
  local t0 = clock()
  for i = 0, k - 1 do
    local row = { id = tonumber(nums[3 * i]), a = tonumber(nums[3 * i + 1]),
                  b = fstr(text + at[3 * i], lens[3 * i]), c = fstr(text + at[3 * i + 1], lens[3 * i + 1]),
                  d = fstr(text + at[3 * i + 2], lens[3 * i + 2]), e = nums[3 * i + 2] ~= 0 }
    callback({ op = "read", table = "public.bench", source = "public.bench", new = row,
               id = format("%s%08X", prefix, i + 1), lsn = "0/16B374D8" })
  end
  spent = spent + clock() - t0
  rows = rows + k
end
assert(n == rows)
io.stdout:write(string.format("floor %.3f us/row rows %d sum %d\n", spent * 1e6 / rows, rows, sum))
