-- Failures of the C side reach Lua as nil, message, kind (src/lua/lerr.c): kind is the
-- SQLSTATE when the server sent one, else a word the Lua side decides by.
local core = require "flash.core"
local H = require "helpers"

describe("errors from the C side", function()
  it("says connection when no server answers, and the SQLSTATE when the server refuses", function()
    local c, err, kind = core.connect("host=/nonexistent-flashlua-dir port=1")
    assert.is_nil(c)
    assert.matches("^cannot connect to PostgreSQL: ", err)
    assert.equal("connection", kind)
    local r, rerr, rkind = core.replication("host=/nonexistent-flashlua-dir port=1")
    assert.is_nil(r)
    assert.matches("^cannot open a replication connection: ", rerr)
    assert.equal("connection", rkind)
    local conn = assert(core.connect(H.dsn))
    local rows, qerr, state = conn:exec("SELECT * FROM no_such_relation_flashlua")
    assert.is_nil(rows)
    assert.matches('relation "no_such_relation_flashlua" does not exist', qerr, 1, true)
    assert.equal("42P01", state)
    conn:close()
  end)

  it("says usage for a malformed LSN and parse for malformed JSON", function()
    assert.same({ nil, "malformed LSN (expected X/Y in hex)", "usage" }, { core.lsn("nope") })
    local v, err, kind = core.json_decode("{")
    assert.is_nil(v)
    assert.matches("^invalid JSON at byte", err)
    assert.equal("parse", kind)
  end)

  describe("of the replication stream", function()
    local repl, t, pub
    before_each(function()
      t = H.table("id int PRIMARY KEY")
      pub = "flash_errors_" .. core.getpid()
      H.sql("CREATE PUBLICATION " .. pub .. " FOR TABLE " .. t)
      repl = assert(core.replication(H.dsn))
      local slot = pub .. "_slot"
      assert(repl:exec("CREATE_REPLICATION_SLOT " .. slot .. " TEMPORARY LOGICAL pgoutput NOEXPORT_SNAPSHOT"))
      assert(repl:start("START_REPLICATION SLOT " .. slot .. " LOGICAL 0/0 (proto_version '1', publication_names '" ..
        pub .. "')", 1))
    end)
    after_each(function()
      if repl then repl:close() repl = nil end
      H.sql("DROP PUBLICATION IF EXISTS " .. pub)
    end)

    -- Pumps until the stream fails; returns what the failing pump returned, and the commit
    -- position of the transaction whose event dispatch saw (ev.lsn): confirming that
    -- transaction would move the confirmed position past it. (A position taken before the
    -- INSERT would not do: a transaction of another session committed in between is skipped
    -- by pgoutput, and the keepalive that says so may be confirmed.)
    local function pump_until_failure(dispatch)
      local seen
      local function watched(ev, ...)
        seen = seen or ev.lsn
        return dispatch(ev, ...)
      end
      H.sql("INSERT INTO " .. t .. " VALUES (1)")
      local deadline = core.now() + 20
      while core.now() < deadline do
        core.poll({ repl:fd() }, 0.1)
        local more, err, kind = repl:pump(watched)
        if more == nil then return err, kind, assert(seen and core.lsn(seen), "no event was dispatched") end
      end
      error("the stream did not fail")
    end

    it("says callback when dispatch raises, and keeps the message", function()
      local err, kind, commit = pump_until_failure(function() error("boom", 0) end)
      assert.equal("dispatch: boom", err)
      assert.equal("callback", kind)
      assert.is_true(repl:state().flushed <= commit, "the failed transaction is not confirmed")
    end)

    it("says stopped when dispatch returns false", function()
      local err, kind, commit = pump_until_failure(function() return false end)
      assert.equal("stopped by a callback", err)
      assert.equal("stopped", kind)
      assert.is_true(repl:state().flushed <= commit, "the stopped transaction is not confirmed")
    end)

    it("says the SQLSTATE of a replication command the server refuses", function()
      local other = assert(core.replication(H.dsn))
      local ok, err, kind = other:exec("CREATE_REPLICATION_SLOT " .. pub .. "_slot TEMPORARY LOGICAL pgoutput")
      other:close()
      assert.is_nil(ok)
      assert.matches("already exists", err, 1, true)
      assert.equal("42710", kind)
    end)
  end)
end)
