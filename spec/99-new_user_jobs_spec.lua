-- spec/99-new_user_jobs_spec.lua: a new user's everyday jobs, done as README.md, docs/ and
-- examples/ show them: the documented scripts run side by side, with the output the docs show.
local H = require "helpers"
local flash = require "flash"
local core = require "flash.core"

describe("a new user's everyday jobs", function()
  local pid = core.getpid()
  local base = "nj_" .. pid
  local drops = {}
  after_each(function()
    for i = #drops, 1, -1 do H.sql(drops[i]) end
    drops = {}
  end)

  -- docs/delivery.md's outbox (slot = "flash_outbox") and mailer (slot = "flash_mailer"), and
  -- docs/backfill.md's "flash_search_index", name only their slots. All shared the publication
  -- "flash_publication": the second one started while the first ran was refused ("publication
  -- flash_publication is in use by another running flashlua instance"), and run one after the
  -- other, the mailer's run set the publication to its table, so the outbox's slot skipped
  -- for good the outbox row inserted meanwhile (0 events, its position confirmed past it).
  it("two persistent clients with their own slot = ... (as docs/delivery.md's outbox and mailer) run side by side and lose nothing in turn", function()
    local t1, t2 = base .. "_outbox", base .. "_emails"
    local s1, s2 = "nj_outbox_" .. pid, "nj_mailer_" .. pid
    H.sql("CREATE TABLE " .. t1 .. " (id int PRIMARY KEY, v text); CREATE TABLE " .. t2 .. " (id int PRIMARY KEY, v text)")
    drops[#drops + 1] = "DROP TABLE IF EXISTS " .. t1 .. ", " .. t2
    drops[#drops + 1] = "DROP PUBLICATION IF EXISTS flash_publication"
    drops[#drops + 1] = "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name IN ('" ..
      s1 .. "', '" .. s2 .. "') AND NOT active"
    drops[#drops + 1] = "DROP PUBLICATION IF EXISTS " .. s1 .. ", " .. s2
    local function open(slot, t)
      local c = assert(flash.client { dsn = H.dsn, driver = "wal_logical", persistent = true, slot = slot })
      local got = {}
      assert(c:listen { table = t }):on("insert", function(ev) got[#got + 1] = ev.new.v end)
      local ok, err = c:start()
      return ok and c, err, got
    end
    local a, aerr, got_a = open(s1, t1)
    assert.is_truthy(a, aerr)
    local b, berr, got_b = open(s2, t2)
    assert.is_truthy(b, berr)      -- was: publication flash_publication is in use by another running flashlua instance
    H.sql("INSERT INTO " .. t1 .. " VALUES (1, 'o1'); INSERT INTO " .. t2 .. " VALUES (1, 'm1')")
    H.wait(a, got_a, 1, 10)
    H.wait(b, got_b, 1, 10)
    assert.are.same({ "o1" }, got_a)
    assert.are.same({ "m1" }, got_b)
    assert(a:stop())
    -- The mailer alone runs on; the outbox gets a row meanwhile.
    H.sql("INSERT INTO " .. t1 .. " VALUES (2, 'o2')")
    H.settle(b, 0.3)
    assert(b:stop())
    a, aerr, got_a = open(s1, t1)
    assert.is_truthy(a, aerr)
    H.wait(a, got_a, 1, 10)
    H.settle(a, 0.3)
    assert.are.same({ "o2" }, got_a)        -- was: {} (skipped, and confirmed past)
    assert(a:stop())
    assert.are.same({ s2, s1 }, (function()   -- mailer, outbox: each slot its own publication
      local names = {}
      for _, r in ipairs(H.sql("SELECT pubname::text AS n FROM pg_publication WHERE pubname IN ($1, $2) ORDER BY 1", s1, s2)) do
        names[#names + 1] = r.n
      end
      return names
    end)())
  end)

  it("a slot an earlier version made with flash_publication goes on with it (its backlog decodes), and says so", function()
    local t = base .. "_legacy"
    local s = "nj_legacy_" .. pid
    H.sql("CREATE TABLE " .. t .. " (id int PRIMARY KEY, v text)")
    drops[#drops + 1] = "DROP TABLE IF EXISTS " .. t
    drops[#drops + 1] = "DROP PUBLICATION IF EXISTS flash_publication"
    drops[#drops + 1] = "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '" .. s ..
      "' AND NOT active"
    drops[#drops + 1] = "DROP PUBLICATION IF EXISTS " .. s
    -- As an earlier version left it: the slot, with "flash_publication" naming it.
    local c = assert(flash.client { dsn = H.dsn, driver = "wal_logical", persistent = true, slot = s,
      publication = "flash_publication" })
    local got = {}
    assert(c:listen { table = t }):on("insert", function(ev) got[#got + 1] = ev.new.v end)
    assert(c:start())
    assert(c:stop())
    H.sql("INSERT INTO " .. t .. " VALUES (1, 'backlog')")
    local lines = {}
    local old = flash.log.set_sink(function(line) lines[#lines + 1] = line end)
    local ok, err = pcall(function()
      c = assert(flash.client { dsn = H.dsn, driver = "wal_logical", persistent = true, slot = s })
      got = {}
      assert(c:listen { table = t }):on("insert", function(ev) got[#got + 1] = ev.new.v end)
      assert(c:start())
      H.wait(c, got, 1, 10)
      assert(c:stop())
    end)
    flash.log.set_sink(old)
    assert(ok, err)
    assert.are.same({ "backlog" }, got)
    assert.equal("flash_publication", c:stats().publication)
    assert.equal(0, tonumber(H.scalar("SELECT count(*) FROM pg_publication WHERE pubname = $1", s)))
    local said
    for _, l in ipairs(lines) do
      if l:find("slot " .. s .. " goes on with publication flash_publication, which an earlier version made for it " ..
          "(a named persistent slot now gets a publication of its own name; a new slot name starts one)", 1, true) then
        said = true
      end
    end
    assert.is_true(said, table.concat(lines, "\n"))
  end)
end)
