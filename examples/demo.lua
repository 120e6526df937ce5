-- demo: `make demo` runs this against a throwaway PostgreSQL (flashlua --sandbox).
-- It creates a table, listens to it, writes a few rows on a timer and prints each event.
local flash = require "flash"

local client = assert(flash.client {})   -- the DSN comes from --sandbox / -d / FLASH_DSN
assert(client:query [[
  CREATE TABLE IF NOT EXISTS posts (
    id serial PRIMARY KEY, title text NOT NULL, active boolean NOT NULL DEFAULT true,
    tags text[], meta jsonb, created_at timestamptz NOT NULL DEFAULT now())]])

local posts = assert(client:listen {
  table = "public.posts",
  fields = { "id", "title", "active", "tags", "meta" },
  where = { active = true },          -- soft deletes: active=false arrives as a delete
})

local function show(row)
  if not row then return "-" end
  local tags = row.tags ~= flash.null and ("{" .. table.concat(row.tags, ",") .. "}") or "null"
  local meta = row.meta ~= flash.null and ("views=" .. tostring(row.meta.views)) or "meta=null"
  return string.format("#%d %q tags=%s %s", row.id, row.title, tags, meta)
end

posts:on("all", function(ev)
  print(string.format("%-8s %s  new=%s  old=%s", ev.op, ev.table, show(ev.new), show(ev.old)))
end)

-- Writes that the listener sees: one step per half second, then stop.
local steps = {
  { "INSERT INTO posts (title, tags, meta) VALUES ($1, $2, $3)", "Hello", "{lua,pg}", '{"views": 0}' },
  { "INSERT INTO posts (title, active) VALUES ($1, false)", "Draft" },
  { "UPDATE posts SET meta = jsonb_set(meta, '{views}', '42') WHERE title = $1", "Hello" },
  { "UPDATE posts SET active = true WHERE title LIKE $1", "Draft%" },   -- enters the where: insert
  { "UPDATE posts SET active = false WHERE title = $1", "Hello" },      -- leaves it: delete
  { "DELETE FROM posts" },
}
local i = 0
flash.every(0.5, function()
  i = i + 1
  local s = steps[i]
  if not s then return flash.stop() end
  print("-- " .. s[1])
  assert(client:query(unpack(s)))
end)
print("listening on public.posts; writing rows...")
