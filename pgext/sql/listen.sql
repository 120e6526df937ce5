-- flash.listen / flash.unlisten: validation, privileges, and what the output plugin sends
-- (transactional listens, conditions, columns). Frames are shown as kind and listener ids.
SET synchronous_commit = on;
SET client_min_messages = warning;
CREATE EXTENSION flashlua;
CREATE TABLE items (id int PRIMARY KEY, name text, score int, price numeric, tags text[], doc json);
ALTER TABLE items REPLICA IDENTITY FULL;

-- validation
SELECT flash.listen('items', '{insert,upsert}', NULL, NULL, NULL, 'v');
SELECT flash.listen('items', NULL, '{id,nope}', NULL, NULL, 'v');
SELECT flash.listen('items', NULL, NULL, '[["score", "~", 1]]', NULL, 'v');
SELECT flash.listen('items', NULL, NULL, '[["score", ">", "ten"]]', NULL, 'v');
SELECT flash.listen('items', NULL, NULL, '[["score", "in", []]]', NULL, 'v');
SELECT flash.listen('items', NULL, NULL, '[["score", "is null", 1]]', NULL, 'v');
SELECT flash.listen('items', NULL, NULL, '[["score", "=", null]]', NULL, 'v');
SELECT flash.listen('items', NULL, NULL, '[["tags", "=", "{a}"]]', NULL, 'v');
SELECT flash.listen('items', NULL, NULL, '[["doc", "=", "{}"]]', NULL, 'v');
SELECT flash.listen('items', NULL, NULL, '{"score": 1}', NULL, 'v');
SELECT flash.listen('items', NULL, NULL, NULL, NULL, '');
SELECT flash.listen('pg_class', NULL, NULL, NULL, NULL, 'v');
CREATE TEMP TABLE tmp (id int);
SELECT flash.listen('tmp', NULL, NULL, NULL, NULL, 'v');
SELECT count(*) FROM flash.listeners;

-- privileges: a role lists only tables it can SELECT, unlistens only its own listeners,
-- and cannot write the registry
CREATE ROLE flash_reader;
CREATE ROLE flash_other;
GRANT SELECT (id, name) ON items TO flash_reader;
SET ROLE flash_reader;
SELECT flash.listen('items', NULL, NULL, NULL, NULL, 'p');
SELECT flash.listen('items', NULL, '{id,name}', '[["score", ">", 1]]', NULL, 'p');
SELECT flash.listen('items', NULL, '{id,name}', '[["name", "=", "x"]]', NULL, 'p') > 0 AS listened;
INSERT INTO flash.listeners (id, consumer, relid, ops, owner) VALUES (99, 'p', 'items'::regclass, 1, 10);
SELECT consumer, tab, cols FROM flash.my_listeners;
SET ROLE flash_other;
SELECT count(*) FROM flash.my_listeners;
SELECT flash.unlisten(id) FROM flash.listeners;
SELECT flash.unlisten((SELECT max(id) FROM flash.my_listeners));
RESET ROLE;
SELECT flash.unlisten(max(id)) FROM flash.listeners WHERE consumer = 'p';
SELECT flash.unlisten(12345);

-- what the plugin sends: B/C transaction frames, R relation, then for each event an 'M:L'
-- tag with its listener ids followed by the change (I/U/D); 'M:A' marks where a listen of
-- the consumer took effect (its listener id)
CREATE FUNCTION frames(consumer text) RETURNS TABLE (kind text, detail text) LANGUAGE sql AS $$
  SELECT chr(get_byte(data, 0)) || CASE WHEN get_byte(data, 0) = 77 THEN ':' || chr(get_byte(data, 23)) ELSE '' END,
         CASE WHEN get_byte(data, 0) = 77 THEN
                (SELECT string_agg(('x' || encode(substr(data, p, 8), 'hex'))::bit(64)::bigint::text, ',' ORDER BY p)
                 FROM generate_series(25, length(data), 8) p)
              WHEN chr(get_byte(data, 0)) IN ('I', 'U', 'D') THEN
                regexp_replace(encode(substr(data, 6), 'escape'), '(\\[0-7]{3})+', ' ', 'g')
         END
  FROM pg_logical_slot_get_binary_changes('s', NULL, NULL, 'consumer', consumer, 'version', '0.1')
$$;
SELECT 'init' FROM pg_create_logical_replication_slot('s', 'flashlua');
INSERT INTO items VALUES (1, 'before', 1, 1);
BEGIN;
INSERT INTO items VALUES (2, 'same txn, before the listen', 5, 1);
SELECT flash.listen('items', '{insert,update,delete}', '{id,name}', '[["score", ">=", "3"]]', NULL, 'c') AS l1 \gset
INSERT INTO items VALUES (3, 'same txn, after the listen', 5, 1);
INSERT INTO items VALUES (4, 'no match', 0, 1);
COMMIT;
BEGIN;
SELECT flash.listen('items', NULL, NULL, NULL, NULL, 'c') AS rolled_back \gset
INSERT INTO items VALUES (5, 'rolled back listen', 5, 1);
ROLLBACK;
SELECT flash.listen('items', '{insert}', NULL, '[["price", "in", ["1.0", 2]], ["name", "is not null"]]', NULL, 'c') AS l2 \gset
SELECT flash.listen('items', '{insert}', NULL, NULL, NULL, 'someone else') AS other \gset
INSERT INTO items VALUES (6, 'both', 7, 2.00);
INSERT INTO items VALUES (7, NULL, 7, 2.00);
UPDATE items SET score = 0 WHERE id = 6;     -- leaves l1's condition: a delete
UPDATE items SET score = 9 WHERE id = 4;     -- enters it: an insert
UPDATE items SET price = 3 WHERE id = 4;     -- none of l1's columns changed: nothing
UPDATE items SET name = 'renamed' WHERE id = 4;
SELECT flash.unlisten(:l1);
INSERT INTO items VALUES (8, 'after the unlisten', 9, 5);
SELECT :l1 AS l1, :l2 AS l2;
SELECT * FROM frames('c');
-- with binary 'on' the built-in types the client reads go in their send form ('b' values:
-- int4, timestamptz, numeric, text, text[]), others (a domain) as text ('t')
SET synchronous_commit = on;
CREATE DOMAIN small AS int;
CREATE TABLE kinds (id int PRIMARY KEY, at timestamptz, amount numeric, label text, tags text[], d small);
SELECT flash.listen('kinds', NULL, NULL, NULL, NULL, 'b') IS NOT NULL AS listening;
INSERT INTO kinds VALUES (1, '2026-01-02 03:04:05.5+00', 1.50, 'x', '{a,NULL}', 7);
SELECT encode(substr(data, 6), 'hex') AS tuple
  FROM pg_logical_slot_get_binary_changes('s', NULL, NULL, 'consumer', 'b', 'binary', 'on') WHERE get_byte(data, 0) = 73;
DROP TABLE kinds;
DROP DOMAIN small;
SELECT pg_drop_replication_slot('s');
DROP FUNCTION frames(text);
DROP TABLE items;
DROP ROLE flash_reader;
DROP ROLE flash_other;
DROP EXTENSION flashlua;
