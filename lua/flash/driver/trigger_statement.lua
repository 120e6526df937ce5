-- flash.trigger_statement: the `trigger_statement` driver. Per table and operation, an
-- AFTER ... FOR EACH STATEMENT trigger with a transition table: one INSERT ... SELECT per
-- statement appends all its rows to the events table, whatever the number of rows or
-- listeners. Partitions and INHERITS children get triggers of their own (a statement
-- fires the statement triggers of the table it names only). The machinery is
-- flash.driver.capture.
--
-- Rows an UPDATE moves to another partition are a delete (from the partition the row
-- left) and an insert (into the one it entered), as under every other driver
-- (docs/drivers.md "Rows moved between partitions"). A statement trigger's transition
-- tables cannot say where a row lived, so on a partitioned table:
--   * a BEFORE UPDATE statement trigger counts the UPDATEs in progress in the session in a
--     transaction-local setting (the "marker": one 'u' per statement; 'm' once a moved row
--     was seen);
--   * AFTER INSERT OR DELETE row triggers on the listened partitioned table (PostgreSQL
--     clones them to every partition, present and future) whose WHEN reads the marker:
--     an ordinary INSERT or DELETE pays that test per row and nothing more; during an
--     UPDATE, a moved row fires them as a delete on its old partition and an insert on its
--     new one, and they note the row's text and partition in the `moves` table;
--   * the UPDATE's statement trigger then finds, for each (old, new) pair of its
--     transition tables, a noted delete whose row has the old text and a noted insert whose
--     row has the new text, in two different partitions: that pair moved. PostgreSQL puts
--     a row in the partition its values route to, so rows of equal text share a partition:
--     a note of another statement of the same query (a writable CTE, a function called by
--     the UPDATE) can only confirm what is true. The last UPDATE of the query clears the
--     notes and the marker.
-- Forging the marker (it is a setting any session may set) only makes that session's own
-- inserts and deletes write notes that nobody matches, which the next look removes.
local base = require "flash.driver.capture"
local log = require "flash.log"

local Driver = base.class(base.Driver)
local M = base.module(Driver)

-- The marker's setting name: one per instance (a custom setting's name must be a plain
-- identifier, so the schema's name is hashed).
function Driver:marker_name()
  local h = 0
  for i = 1, #self.schema do h = (h * 31 + self.schema:byte(i)) % 4294967296 end
  return string.format("flashlua.moving_%08x", h)
end

-- A trigger function's PL/pgSQL body: `declare` (or nil), the statements, RETURN NULL.
local function trigger_body(declare, lines)
  local out = {}
  if declare then out[1] = "DECLARE " .. declare end
  out[#out + 1] = "BEGIN"
  for _, l in ipairs(lines) do out[#out + 1] = l end
  out[#out + 1] = "RETURN NULL;"
  out[#out + 1] = "END"
  return table.concat(out, "\n")
end

-- Update pairs: PostgreSQL appends each updated row's old and new versions to the two
-- transition tables together, so the n-th old row is the n-th new row's previous version.
-- Pairing by position is right even when the update changes the primary key, and needs
-- none; a FULL JOIN keeps an unpaired row (which PostgreSQL does not produce) as a
-- delete or an insert rather than losing it.
--
-- The arguments: (mode, tag). The tag is the trigger's route (Driver:route_tag). The mode
-- of an UPDATE trigger on a partitioned table is 'all', or 'moves' when no listener wants
-- updates: the pairs that moved between partitions are a delete and an insert of the
-- partitions' rows (see the top of this file); the others are updates ('all' only). Any
-- other trigger's is 'rows'. Triggers made before routes pass ([mode]), tagged 0.
function Driver:statement_function()
  local S = self:ident(self.schema)
  local E = S .. ".events"
  local L = self.max_row
  local G = self:literal(self:marker_name())
  local ins = "INSERT INTO " .. E .. " (xid, op, rel, tag, new, old, big)\n  "
  -- Each side's row and its text (NULL past the limits of flash.driver.capture).
  local function rows(alias, tbl)
    return "(SELECT pg_catalog.row_number() OVER () AS i, t.r, t.txt, pg_catalog.octet_length(t.txt) AS len FROM " ..
      "(SELECT ROW(s.*) AS r, " .. self:row_text_sql("ROW(s.*)") .. " AS txt FROM " .. tbl .. " s) t) " .. alias
  end
  local function text(a) return "CASE WHEN " .. a .. ".len OPERATOR(pg_catalog.>) " .. L .. " THEN NULL ELSE " ..
    a .. ".txt END" end
  local function big(a) return "CASE WHEN " .. a .. ".i IS NOT NULL AND " .. a .. ".txt IS NULL THEN " ..
    "-pg_catalog.pg_column_size(" .. a .. ".r) WHEN " .. a .. ".len OPERATOR(pg_catalog.>) " .. L .. " THEN " ..
    a .. ".len END" end
  local eq = " OPERATOR(pg_catalog.=) "
  -- For one partition (%1$s its oid, %2$s its columns as s.col, in its order): each pair's
  -- old and new row as that partition's text (a record's text holds only its values, so a
  -- ROW of the same columns in the partition's order prints as the partition's row does).
  local function side(op, tbl)
    return "SELECT pg_catalog.oidin(@REL@) AS rel, " .. self:literal(op) .. "::\"char\" AS op, x.i, " ..
      self:row_text_sql("x.r") .. " AS t FROM (SELECT pg_catalog.row_number() OVER () AS i, ROW(@COLS@) AS r FROM " ..
      tbl .. " s) x"
  end
  -- A format() template: its own % doubled, then the two arguments' places.
  local per_part = self:literal(((side("D", "old_rows") .. " UNION ALL " .. side("I", "new_rows")):gsub("%%", "%%%%")
    :gsub("@REL@", "%%1$L"):gsub("@COLS@", "%%2$s")))
  -- The pairs whose old text was deleted from one partition and whose new text was inserted
  -- into another, by the notes of the moves table.
  local match = "WITH m AS (SELECT DISTINCT op, rel, txt FROM " .. S .. ".moves WHERE xid" .. eq .. "$1), " ..
    "h AS (SELECT DISTINCT ON (p.op, p.i) p.op, p.i, p.rel, p.t FROM (%s) p JOIN m ON m.op" .. eq .. "p.op AND " ..
    "m.rel" .. eq .. "p.rel AND m.txt" .. eq .. "p.t COLLATE pg_catalog.\"C\" ORDER BY p.op, p.i) " ..
    "SELECT pg_catalog.array_agg(d.i ORDER BY d.i), pg_catalog.array_agg(d.rel ORDER BY d.i), " ..
    "pg_catalog.array_agg(d.t ORDER BY d.i), pg_catalog.array_agg(n.rel ORDER BY d.i), " ..
    "pg_catalog.array_agg(n.t ORDER BY d.i) FROM h d JOIN h n ON n.op" .. eq .. "'I' AND n.i" .. eq .. "d.i AND " ..
    "n.rel OPERATOR(pg_catalog.<>) d.rel WHERE d.op" .. eq .. "'D'"
  return trigger_body("capture_xid bigint := pg_catalog.txid_current(); g text; done boolean := false; " ..
    "q text := ''; part oid; cols text; mi bigint[]; ms oid[]; mo text[]; md oid[]; mn text[]; " ..
    "mode text := CASE WHEN TG_NARGS OPERATOR(pg_catalog.>) 0 THEN TG_ARGV[0] END; " ..
    "tag integer := CASE WHEN TG_NARGS OPERATOR(pg_catalog.>) 1 THEN pg_catalog.int4in(pg_catalog.textout(TG_ARGV[1])) " ..
    "ELSE 0 END;", {
    "IF TG_OP = 'INSERT' THEN",
    "  " .. ins .. "SELECT capture_xid, 'I', TG_RELID, tag, " .. text("n") .. ", NULL, " .. big("n") ..
      " FROM " .. rows("n", "new_rows") .. " ORDER BY n.i;",
    "ELSIF TG_OP = 'DELETE' THEN",
    "  " .. ins .. "SELECT capture_xid, 'D', TG_RELID, tag, NULL, " .. text("o") .. ", " .. big("o") ..
      " FROM " .. rows("o", "old_rows") .. " ORDER BY o.i;",
    "ELSIF TG_OP = 'UPDATE' THEN",
    "  IF mode OPERATOR(pg_catalog.=) ANY ('{all,moves}'::pg_catalog.text[]) THEN",
    "    g := pg_catalog.current_setting(" .. G .. ", true);",
    "    IF pg_catalog.strpos(g, 'm') OPERATOR(pg_catalog.>) 0 THEN",
    "      BEGIN",
    "        FOR part, cols IN SELECT a.attrelid, pg_catalog.string_agg('s.' OPERATOR(pg_catalog.||) " ..
      "pg_catalog.quote_ident(a.attname), ', ' ORDER BY a.attnum)",
    "            FROM pg_catalog.pg_attribute a WHERE a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped",
    "            AND a.attrelid IN (SELECT DISTINCT v.rel FROM " .. S .. ".moves v WHERE v.xid" .. eq .. "capture_xid)",
    "            AND a.attrelid IN (SELECT t.relid FROM pg_catalog.pg_partition_tree(TG_RELID) t WHERE t.isleaf)",
    "            GROUP BY a.attrelid",
    "        LOOP",
    "          q := q OPERATOR(pg_catalog.||) CASE WHEN q" .. eq .. "'' THEN '' ELSE ' UNION ALL ' END " ..
      "OPERATOR(pg_catalog.||) pg_catalog.format(" .. per_part .. ", part, cols);",
    "        END LOOP;",
    "        IF q OPERATOR(pg_catalog.<>) '' THEN",
    "          EXECUTE pg_catalog.format(" .. self:literal(match) .. ", q) INTO mi, ms, mo, md, mn USING capture_xid;",
    "        END IF;",
    "      EXCEPTION WHEN OTHERS THEN",
    "        -- Never the user's failure: the pairs are then delivered as updates.",
    "        RAISE WARNING 'flashlua (%): cannot tell rows moved between partitions: %', " ..
      self:literal(self.schema) .. ", SQLERRM;",
    "        mi := NULL;",
    "      END;",
    "    END IF;",
    "    -- This UPDATE is over; the last one of the query clears the notes and the marker.",
    "    IF pg_catalog.strpos(g, 'u') OPERATOR(pg_catalog.>) 0 THEN",
    "      g := pg_catalog.overlay(g, '', pg_catalog.strpos(g, 'u'), 1);",
    "    END IF;",
    "    done := g IS NULL OR pg_catalog.strpos(g, 'u')" .. eq .. "0;",
    "  END IF;",
    "  -- 'moves' with none found: nothing to capture (the pairs are not even printed).",
    "  IF mode IS DISTINCT FROM 'moves' OR mi IS NOT NULL THEN",
    "  " .. ins .. "SELECT capture_xid, x.op, x.rel, tag, x.new, x.old, x.big FROM (",
    "  SELECT coalesce(o.i, n.i) AS ord, 0 AS sub,",
    "         CASE WHEN o.i IS NULL THEN 'I' WHEN n.i IS NULL THEN 'D' ELSE 'U' END::\"char\" AS op,",
    "         TG_RELID AS rel, " .. text("n") .. " AS new, " .. text("o") .. " AS old, CASE WHEN least(" .. big("n") ..
      ", " .. big("o") .. ") < 0 THEN least(" .. big("n") .. ", " .. big("o") .. ") ELSE greatest(" .. big("n") .. ", " ..
      big("o") .. ") END AS big",
    "  FROM " .. rows("o", "old_rows") .. " FULL JOIN " .. rows("n", "new_rows"),
    "  ON n.i" .. eq .. "o.i",
    "  WHERE mode IS DISTINCT FROM 'moves'",
    "    AND (mi IS NULL OR NOT coalesce(o.i, n.i)" .. eq .. "ANY (mi))",
    "  UNION ALL SELECT v.i, 0, 'D', v.rel, NULL, v.txt, NULL FROM ROWS FROM (pg_catalog.unnest(mi),",
    "    pg_catalog.unnest(ms), pg_catalog.unnest(mo)) v(i, rel, txt)",
    "  UNION ALL SELECT v.i, 1, 'I', v.rel, v.txt, NULL, NULL FROM ROWS FROM (pg_catalog.unnest(mi),",
    "    pg_catalog.unnest(md), pg_catalog.unnest(mn)) v(i, rel, txt)",
    "  ) x ORDER BY x.ord, x.sub;",
    "  END IF;",
    "  IF g IS NULL THEN",
    "    NULL;",
    "  ELSIF done THEN",
    "    IF pg_catalog.strpos(g, 'm') OPERATOR(pg_catalog.>) 0 THEN",
    "      DELETE FROM " .. S .. ".moves WHERE xid" .. eq .. "capture_xid;",
    "    END IF;",
    "    IF g OPERATOR(pg_catalog.<>) '' THEN PERFORM pg_catalog.set_config(" .. G .. ", '', true); END IF;",
    "  ELSE",
    "    PERFORM pg_catalog.set_config(" .. G .. ", g, true);",
    "  END IF;",
    "END IF;",
  })
end

-- BEFORE UPDATE of a partitioned table: one more UPDATE in progress.
function Driver:update_begin_function()
  local G = self:literal(self:marker_name())
  return trigger_body(nil, { "PERFORM pg_catalog.set_config(" .. G .. ", 'u' OPERATOR(pg_catalog.||) " ..
    "coalesce(pg_catalog.current_setting(" .. G .. ", true), ''), true);" })
end

-- AFTER INSERT OR DELETE of a row of a partition while an UPDATE is in progress: the
-- row's text and partition, for the UPDATE's statement trigger (Driver:statement_function).
function Driver:note_move_function()
  local S = self:ident(self.schema)
  local G = self:literal(self:marker_name())
  return trigger_body("g text := pg_catalog.current_setting(" .. G .. ", true); t text;", {
    "IF pg_catalog.strpos(g, 'u') OPERATOR(pg_catalog.=) 0 THEN RETURN NULL; END IF;",
    "IF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN t := " .. self:row_text_sql("OLD") .. ";",
    "ELSE t := " .. self:row_text_sql("NEW") .. "; END IF;",
    "IF pg_catalog.octet_length(t) OPERATOR(pg_catalog.<=) " .. self.max_row .. " THEN",
    "  INSERT INTO " .. S .. ".moves (xid, op, rel, txt) VALUES (pg_catalog.txid_current(), " ..
      "pg_catalog.substr(TG_OP, 1, 1)::\"char\", TG_RELID, t);",
    "  IF pg_catalog.strpos(g, 'm') OPERATOR(pg_catalog.=) 0 THEN",
    "    PERFORM pg_catalog.set_config(" .. G .. ", g OPERATOR(pg_catalog.||) 'm', true);",
    "  END IF;",
    "END IF;",
  })
end

function Driver:schema_sql()
  local list = base.Driver.schema_sql(self)
  local S = self:ident(self.schema)
  -- Transition tables have no statistics: the planner's guesses would switch JIT on,
  -- which costs more than the whole query.
  list[#list + 1] = "CREATE OR REPLACE FUNCTION " .. S .. ".capture_statement() RETURNS trigger LANGUAGE plpgsql " ..
    base.FUNC_SETTINGS .. "SET jit = off AS " .. self:literal(self:statement_function())
  list[#list + 1] = "REVOKE ALL ON FUNCTION " .. S .. ".capture_statement() FROM PUBLIC"
  -- Rows moved between partitions (see the top of this file): the notes live only inside
  -- the writer's transaction.
  list[#list + 1] = "CREATE UNLOGGED TABLE IF NOT EXISTS " .. S .. ".moves (xid bigint NOT NULL, op \"char\" NOT NULL, " ..
    "rel oid NOT NULL, txt text)"
  list[#list + 1] = "CREATE OR REPLACE FUNCTION " .. S .. ".update_begin() RETURNS trigger LANGUAGE plpgsql " ..
    base.FUNC_SETTINGS .. " AS " .. self:literal(self:update_begin_function())
  list[#list + 1] = "REVOKE ALL ON FUNCTION " .. S .. ".update_begin() FROM PUBLIC"
  list[#list + 1] = "CREATE OR REPLACE FUNCTION " .. S .. ".note_move() RETURNS trigger LANGUAGE plpgsql " ..
    base.FUNC_SETTINGS .. " AS " .. self:literal(self:note_move_function())
  list[#list + 1] = "REVOKE ALL ON FUNCTION " .. S .. ".note_move() FROM PUBLIC"
  return list
end

local REFERENCING = {
  insert = "REFERENCING NEW TABLE AS new_rows",
  update = "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
  delete = "REFERENCING OLD TABLE AS old_rows",
}

-- Notes of transactions that are over (only a session that set the marker itself leaves
-- any: the last UPDATE of a query removes its own) go at every look for new partitions.
-- A statement fires the statement triggers of the table it names only, and the transition
-- tables of a partitioned or parent table do not say which partition or child a row is in:
-- a listener on a partition or an INHERITS child would miss, silently, every row written by
-- a statement that names its partitioned table or parent. Such a table is refused at listen
-- (Driver:check), and one that becomes a partition or child while listening is named
-- in a warning (check_ancestors, at every refresh).
local ANCESTOR_SQL = [[SELECT pg_catalog.format('%s.%s', n.nspname, p.relname) AS parent, p.relkind::text AS relkind
  FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class p ON p.oid = i.inhparent
  JOIN pg_catalog.pg_namespace n ON n.oid = p.relnamespace WHERE i.inhrelid = $1 ORDER BY i.inhseqno LIMIT 1]]

-- What misses: said of a table that is a partition or child of `r.parent`.
local function ancestor_text(r)
  local kind = r.relkind == "p" and "partition" or "child table"
  return string.format("a %s of %s, and rows written by statements that name %s are not captured for it (a " ..
    "statement trigger sees the rows of the table its statement names, and the transition tables of %s do not " ..
    "say which %s a row is in) (listen to %s, or use the trigger or trigger_global driver)", kind, r.parent,
    r.parent, r.parent, kind, r.parent)
end

function Driver:check(l)
  local ok, err = base.Driver.check(self, l)
  if not ok then return nil, err end
  local rows
  rows, err = self:exec(ANCESTOR_SQL, string.format("%d", l.table.oid))
  if not rows then return nil, err end
  if rows[1] then
    return nil, "cannot listen to " .. l.table_name .. " under the trigger_statement driver: it is " .. ancestor_text(rows[1])
  end
  return true
end

function Driver:check_ancestors()
  self.warned_ancestor = self.warned_ancestor or {}
  for _, l in ipairs(self.client.listeners) do
    if not l.gone and not self.warned_ancestor[l.id] then
      local rows = self:exec(ANCESTOR_SQL, string.format("%d", l.table.oid))
      if rows and rows[1] then
        self.warned_ancestor[l.id] = true
        log.warn(string.format("listener #%d: %s became %s", l.id, l.table_name, ancestor_text(rows[1])))
      end
    end
  end
end

function Driver:sync_all()
  local ok, err = base.Driver.sync_all(self)
  if ok and self.listening then
    self:exec("DELETE FROM " .. self:ident(self.schema) .. ".moves WHERE xid OPERATOR(pg_catalog.<) " ..
      "pg_catalog.txid_snapshot_xmin(pg_catalog.txid_current_snapshot())")
    self:check_generated()
    self:check_ancestors()
  end
  return ok, err
end

-- PostgreSQL (15) leaves a stored generated column NULL in the transition table of an
-- INSERT through a partitioned table, for the rows that go to a partition whose columns
-- are laid out differently (another order, dropped columns: attached tables, mostly):
-- their insert events would say NULL where the row has a value. Nothing in a statement
-- trigger can tell, so each such partition of a listened table is named once in a
-- warning with the drivers that capture it exactly.
function Driver:check_generated()
  local oids = {}
  for _, l in ipairs(self.client.listeners) do
    oids[#oids + 1] = string.format("%d", l.table.oid)
  end
  if #oids == 0 then return end
  local rows = self:exec([[WITH RECURSIVE d(root, oid) AS (
      SELECT x, x FROM pg_catalog.unnest($1::oid[]) x
      UNION SELECT d.root, i.inhrelid FROM pg_catalog.pg_inherits i JOIN d ON i.inhparent = d.oid)
    SELECT d.root::bigint AS root, pg_catalog.format('%s.%s', n.nspname, c.relname) AS part,
      (SELECT pg_catalog.string_agg(a.attname::text, ', ' ORDER BY a.attnum) FROM pg_catalog.pg_attribute a
        WHERE a.attrelid = d.root AND a.attgenerated = 's' AND NOT a.attisdropped) AS cols
    FROM d JOIN pg_catalog.pg_class c ON c.oid = d.oid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_catalog.pg_class rc ON rc.oid = d.root
    WHERE rc.relkind = 'p' AND c.relkind = 'r' AND c.relispartition
      AND EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a WHERE a.attrelid = d.root AND a.attgenerated = 's'
                    AND NOT a.attisdropped)
      AND EXISTS ((SELECT a.attnum, a.attisdropped, CASE WHEN a.attisdropped THEN '' ELSE a.attname::text END
                     FROM pg_catalog.pg_attribute a WHERE a.attrelid = d.root AND a.attnum > 0
                   EXCEPT SELECT a.attnum, a.attisdropped, CASE WHEN a.attisdropped THEN '' ELSE a.attname::text END
                     FROM pg_catalog.pg_attribute a WHERE a.attrelid = d.oid AND a.attnum > 0)
                  UNION ALL
                  (SELECT a.attnum, a.attisdropped, CASE WHEN a.attisdropped THEN '' ELSE a.attname::text END
                     FROM pg_catalog.pg_attribute a WHERE a.attrelid = d.oid AND a.attnum > 0
                   EXCEPT SELECT a.attnum, a.attisdropped, CASE WHEN a.attisdropped THEN '' ELSE a.attname::text END
                     FROM pg_catalog.pg_attribute a WHERE a.attrelid = d.root AND a.attnum > 0))
    ORDER BY 1, 2]], "{" .. table.concat(oids, ",") .. "}")
  self.warned_generated = self.warned_generated or {}
  for _, r in ipairs(rows or {}) do
    local key = r.root .. "/" .. r.part
    if not self.warned_generated[key] then
      self.warned_generated[key] = true
      local name = r.part
      for _, l in ipairs(self.client.listeners) do
        if l.table.oid == r.root then name = l.table_name break end
      end
      log.warn(string.format("partition %s of %s has its columns in another order than the table (or dropped " ..
        "columns): under trigger_statement, rows inserted through %s into it arrive with their stored generated " ..
        "columns (%s) NULL, as PostgreSQL's transition tables carry them; the trigger and trigger_global drivers " ..
        "capture them exactly", r.part, name, name, r.cols))
    end
  end
end

-- Its only row triggers on partitioned tables are the move notes' (Driver:row_capture).
function Driver:row_functions()
  return { self:ident(self.schema) .. ".note_move()" }
end

function Driver:wanted_triggers()
  local S = self:ident(self.schema)
  local tables, truncs = base.table_ops(self.client.listeners, function(l) return l.relations or {} end)
  local out = {}
  local function add(r, suffix, what, ddl)
    local name = base.fit_name(self.schema, suffix)
    out[#out + 1] = { key = r.oid .. "/" .. name, name = name, qualified = self:qualified_rel(r), what = what,
      display = r.schema .. "." .. r.name, ddl = ddl }
  end
  for _, t in ipairs(tables) do
    local q = self:qualified_rel(t.r)
    -- Tagged with the listened tables it captures for (Driver:route_tag).
    local tag, err = self:route_tag(0, t.roots)
    if not tag then return nil, err end
    -- A partitioned table's UPDATE can move rows between its partitions: a delete and an
    -- insert, captured when a listener wants either, even if none wants updates.
    local moves = t.r.relkind == "p" and (t.ops.insert or t.ops.delete or t.ops.update)
    for _, op in ipairs({ "insert", "update", "delete" }) do
      if t.ops[op] or (op == "update" and moves) then
        local mode = "rows"
        if op == "update" and moves then mode = t.ops.update and "all" or "moves" end
        add(t.r, "_" .. op, op, "AFTER " .. base.OP_KEYWORD[op] .. " ON " .. q .. " " .. REFERENCING[op] ..
          " FOR EACH STATEMENT EXECUTE FUNCTION " .. S .. ".capture_statement('" .. mode .. "', '" .. tag .. "')")
      end
    end
    if moves then
      add(t.r, "_update_begin", "update", "BEFORE UPDATE ON " .. q .. " FOR EACH STATEMENT EXECUTE FUNCTION " ..
        S .. ".update_begin()")
    end
  end
  -- The notes of moved rows: row triggers on each listened partitioned table, which
  -- PostgreSQL clones to every partition at every depth, present and future. Their WHEN
  -- is all an ordinary INSERT or DELETE pays.
  local noted = {}
  for _, l in ipairs(self.client.listeners) do
    for _, r in ipairs(l.relations or {}) do
      if r.oid == l.table.oid and r.relkind == "p" and not noted[r.oid] then
        local need = base.needed_ops(l)
        if need.insert or need.delete or need.update then
          noted[r.oid] = true
          add(r, "_moves", "update", "AFTER INSERT OR DELETE ON " .. self:qualified_rel(r) .. " FOR EACH ROW WHEN (" ..
            "pg_catalog.strpos(pg_catalog.current_setting(" .. self:literal(self:marker_name()) .. ", true), 'u') " ..
            "OPERATOR(pg_catalog.>) 0) EXECUTE FUNCTION " .. S .. ".note_move()")
        end
      end
    end
  end
  return self:truncate_triggers(truncs, out)
end

return M
