-- spec/63-exactly_once_spec.lua: examples/exactly_once.lua copies a table into another
-- exactly once: rounds of kill -9 while a writer inserts, updates and deletes, then a run
-- to the current position; the target then equals the source, with no duplicate.
local core = require "flash.core"
local H = require "helpers"

describe("examples/exactly_once.lua", function()
  it("copies exactly once across kill -9 rounds under a steady writer", function()
    local src = H.table("id int PRIMARY KEY, v int, note text")
    H.sql("ALTER TABLE " .. src .. " REPLICA IDENTITY FULL")
    local dst = H.table("id int, v int, note text")   -- no key: a duplicate would stay
    local example = H.root .. "examples/exactly_once.lua"
    local args = { example, "public." .. src, "public." .. dst, "id", "" }
    local slot = ("flash_copy_public_" .. src .. "_public_" .. dst):sub(1, 63)
    math.randomseed(11)
    local ops = 0
    local function write(n)
      for _ = 1, n do
        local r, id = math.random(), math.random(1, 150)
        if r < 0.55 then
          H.sql("INSERT INTO " .. src .. " VALUES ($1, 0, $2) ON CONFLICT (id) DO UPDATE SET v = " .. src .. ".v + 1",
            id, "row " .. id)
        elseif r < 0.75 then
          H.sql("DELETE FROM " .. src .. " WHERE id = $1", id)
        else
          -- Several rows in one transaction: a batch may end inside it.
          H.sql("UPDATE " .. src .. " SET v = v + 1, note = note || '+' WHERE id % 10 = $1", id % 10)
        end
        ops = ops + 1
      end
    end
    -- Rows committed before the slot exists are not part of the copy: the target starts
    -- with them, and a first run creates the slot.
    write(100)
    H.sql("INSERT INTO " .. dst .. " SELECT * FROM " .. src)
    local function position()
      return H.scalar("SELECT last_id FROM flash_copy_position WHERE name = $1", slot)
    end
    args[6] = "until-current"
    local rc, _, err = H.run_flashlua(args, 60)
    assert.equal(0, rc, err)
    args[6] = nil
    local rounds, killed_after = 20, {}
    for round = 1, rounds do
      local before = position()
      local h = H.spawn(args)
      assert.is_true(h.await("resuming after event", 20, "err"), h.err())
      -- The writer writes on while the copier works; once it has written a batch, more
      -- writes (a different number each round), then kill -9.
      write(30)
      local deadline = core.now() + 20
      while position() == before and core.now() < deadline do write(1) end
      write(10 + 15 * (round % 5))
      h.kill("KILL")
      assert.equal(137, h.wait(10))
      killed_after[#killed_after + 1] = position()
      assert.is_true(killed_after[round] > before, "round " .. round .. " wrote no batch")
      os.remove(h.base .. ".out") os.remove(h.base .. ".err") os.remove(h.base .. ".rc")
    end
    args[6] = "until-current"
    rc, _, err = H.run_flashlua(args, 60)
    assert.equal(0, rc, err)
    local missing = H.scalar("SELECT count(*) FROM (SELECT * FROM " .. src .. " EXCEPT ALL SELECT * FROM " .. dst .. ") x")
    local extra = H.scalar("SELECT count(*) FROM (SELECT * FROM " .. dst .. " EXCEPT ALL SELECT * FROM " .. src .. ") x")
    local dups = H.scalar("SELECT count(*) FROM (SELECT id FROM " .. dst .. " GROUP BY id HAVING count(*) > 1) x")
    local n = H.scalar("SELECT count(*) FROM " .. src)
    print(string.format("\n  exactly-once: %d writes, %d kill -9 rounds, %d rows", ops, rounds, n))
    assert.same({ 0, 0, 0 }, { tonumber(missing), tonumber(extra), tonumber(dups) })
    assert.is_true(tonumber(n) > 0)
    H.drop_slot(slot)
    H.sql("DELETE FROM flash_copy_position WHERE name = $1", slot)
  end)
end)
