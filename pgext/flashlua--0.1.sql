-- flashlua 0.1: the listener registry and the SQL API of the pg_extension driver.
\echo Use "CREATE EXTENSION flashlua" to load this file. \quit

-- The registry. A user_catalog_table: the output plugin reads it under the historic
-- snapshot of each change it decodes, so a listener exists exactly from its transaction's
-- commit on (and, inside that transaction, from the listen() call on). Written only by
-- flash._listen / flash._unlisten (C, checking the caller's rights); PUBLIC has nothing.
CREATE TABLE flash.listeners (
  id        bigint PRIMARY KEY,
  consumer  text NOT NULL,        -- the output plugin's `consumer` option selects these
  relid     oid NOT NULL,         -- the listened table (its partitions too)
  ops       smallint NOT NULL,    -- 1 insert, 2 update, 4 delete, 8 truncate
  cols      smallint[],           -- attnums of the columns sent; NULL = all
  pk        smallint[],           -- attnums of the primary key (an update changing it: delete + insert)
  cond_att  smallint[],           -- per condition: attnum,
  cond_op   smallint[],           --   operator (1 = 2 <> 3 < 4 <= 5 > 6 >= 7 is null 8 is not null 9 in),
  cond_n    smallint[],           --   number of constants,
  cond_typ  oid[],                --   the column's type when the constants were cast
  cond_val  bytea[],              -- the constants, flattened, in their type's binary send form
  owner     oid NOT NULL,         -- the role that listened
  note      text,                 -- the client's own label (flashlua: the listener's definition)
  created   timestamptz NOT NULL DEFAULT pg_catalog.now()
) WITH (user_catalog_table = true);
CREATE SEQUENCE flash.listeners_id_seq;
REVOKE ALL ON flash.listeners, flash.listeners_id_seq FROM PUBLIC;

-- The .so's version, so a client can tell a server whose SQL and library differ.
CREATE FUNCTION flash.version() RETURNS text
  LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'flash_version';

-- The C entry point: validates everything again (it may be called directly), casts the
-- constants with the caller's rights, checks SELECT, inserts the registry row.
CREATE FUNCTION flash._listen(tab regclass, ops text[], columns text[], cond_col text[], cond_op text[],
                              cond_n integer[], cond_val text[], primary_key text[], consumer text, note text)
  RETURNS bigint LANGUAGE c AS 'MODULE_PATHNAME', 'flash_listen';

-- flash.listen(table, ops, columns, conditions, primary_key, consumer[, note]) -> listener id
--   ops         {insert,update,delete,truncate} (NULL: all)
--   columns     the columns events carry (NULL: all)
--   conditions  jsonb: [["score", ">=", 10], ["status", "in", ["a", "b"]], ["gone_at", "is null"]]
--   primary_key an update that changes one of these is a delete and an insert
--   consumer    the output plugin's `consumer` option that receives the events
-- Transactional: delivered are exactly the changes after the call, in its transaction,
-- and everything committed after it; a rolled-back listen never existed.
CREATE FUNCTION flash.listen(tab regclass, ops text[] DEFAULT NULL, columns text[] DEFAULT NULL,
                             conditions jsonb DEFAULT NULL, primary_key text[] DEFAULT NULL,
                             consumer text DEFAULT 'default', note text DEFAULT NULL)
  RETURNS bigint LANGUAGE plpgsql
  SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c jsonb;
  v jsonb;
  ccol text[] := '{}';
  cop text[] := '{}';
  cn integer[] := '{}';
  cval text[] := '{}';
BEGIN
  IF conditions IS NOT NULL AND conditions OPERATOR(pg_catalog.<>) 'null'::jsonb THEN
    IF pg_catalog.jsonb_typeof(conditions) OPERATOR(pg_catalog.<>) 'array' THEN
      RAISE EXCEPTION 'flash.listen: conditions must be a JSON array of [column, operator, value] arrays, got %', conditions
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR c IN SELECT e FROM pg_catalog.jsonb_array_elements(conditions) AS e LOOP
      IF pg_catalog.jsonb_typeof(c) OPERATOR(pg_catalog.<>) 'array'
         OR pg_catalog.jsonb_array_length(c) NOT BETWEEN 2 AND 3
         OR pg_catalog.jsonb_typeof(c OPERATOR(pg_catalog.->) 0) OPERATOR(pg_catalog.<>) 'string'
         OR pg_catalog.jsonb_typeof(c OPERATOR(pg_catalog.->) 1) OPERATOR(pg_catalog.<>) 'string' THEN
        RAISE EXCEPTION 'flash.listen: condition % is not [column, operator] or [column, operator, value]', c
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
      ccol := ccol OPERATOR(pg_catalog.||) (c OPERATOR(pg_catalog.->>) 0);
      cop := cop OPERATOR(pg_catalog.||) (c OPERATOR(pg_catalog.->>) 1);
      IF pg_catalog.jsonb_array_length(c) OPERATOR(pg_catalog.=) 2 THEN
        cn := cn OPERATOR(pg_catalog.||) 0;
      ELSIF pg_catalog.jsonb_typeof(c OPERATOR(pg_catalog.->) 2) OPERATOR(pg_catalog.=) 'array' THEN
        cn := cn OPERATOR(pg_catalog.||) pg_catalog.jsonb_array_length(c OPERATOR(pg_catalog.->) 2);
        FOR v IN SELECT e FROM pg_catalog.jsonb_array_elements(c OPERATOR(pg_catalog.->) 2) AS e LOOP
          cval := cval OPERATOR(pg_catalog.||) (v OPERATOR(pg_catalog.#>>) '{}'::text[]);
        END LOOP;
      ELSE
        cn := cn OPERATOR(pg_catalog.||) 1;
        cval := cval OPERATOR(pg_catalog.||) (c OPERATOR(pg_catalog.#>>) '{2}'::text[]);
      END IF;
    END LOOP;
  END IF;
  RETURN flash._listen(tab, ops, columns, ccol, cop, cn, cval, primary_key, consumer, note);
END
$$;

-- flash.unlisten(id) -> whether it existed. Transactional like listen: the listener's
-- last change is the last one committed before the unlisten's commit. The owner's role
-- (or a member of it) only.
CREATE FUNCTION flash.unlisten(id bigint) RETURNS boolean
  LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'flash_unlisten';

-- Each role sees its own listeners (and those of roles it is a member of).
CREATE VIEW flash.my_listeners WITH (security_barrier) AS
  SELECT l.id, l.consumer, l.relid::pg_catalog.regclass AS tab, l.ops, l.cols, l.pk, l.cond_att, l.cond_op,
         l.cond_n, l.note, l.owner::pg_catalog.regrole AS owner, l.created
  FROM flash.listeners l
  WHERE pg_catalog.pg_has_role(l.owner, 'USAGE');

GRANT USAGE ON SCHEMA flash TO PUBLIC;
GRANT SELECT ON flash.my_listeners TO PUBLIC;

-- The trigger drivers' row capture in C (pgext/capture.c, docs/drivers.md "The C capture
-- function"): used instead of their PL/pgSQL function when the extension is created in the
-- database and flashlua's role may EXECUTE it. Not SECURITY DEFINER: nothing it runs runs
-- with anyone's rights but the writer's. Creating a trigger needs EXECUTE; firing one does
-- not, so PUBLIC has none (GRANT EXECUTE ON FUNCTION flash.capture() TO a flashlua role).
CREATE FUNCTION flash.capture() RETURNS trigger
  LANGUAGE c AS 'MODULE_PATHNAME', 'flash_capture';
REVOKE ALL ON FUNCTION flash.capture() FROM PUBLIC;
