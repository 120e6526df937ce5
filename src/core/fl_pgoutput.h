/* fl_pgoutput: a decoder for the pgoutput logical replication protocol (v1 and v2
 * streaming), pure C: no libpq, no Lua. Reads like PostgreSQL's proto.c: one read function
 * per message type, every length checked against the buffer end, a relation cache keyed
 * by relation OID. Malformed input returns an error; it never reads out of bounds. */
#ifndef FL_PGOUTPUT_H
#define FL_PGOUTPUT_H
#include <stddef.h>
#include <stdint.h>

/* One column of a Relation message. */
typedef struct {
  uint8_t flags;          /* 1 = part of the replica identity key */
  char *name;             /* NUL-terminated copy */
  uint32_t typoid;
  int32_t typmod;
} fl_pgo_column;

/* A cached relation, replaced whenever a Relation message for its OID arrives. */
typedef struct {
  uint32_t relid;
  char *nspname;          /* "" is pg_catalog per the protocol; the decoder stores it as given */
  char *relname;
  char replident;         /* 'd' default, 'n' nothing, 'f' full, 'i' index */
  int ncols;
  fl_pgo_column *cols;
  uint32_t version;       /* incremented on each replacement, so callers can cache per version */
} fl_pgo_relation;

/* One column value of a TupleData. */
typedef struct {
  char kind;              /* 'n' null, 'u' unchanged TOAST (not sent), 't' text, 'b' binary */
  uint32_t len;
  const char *data;       /* points into the message buffer (valid until the next decode) */
} fl_pgo_value;

typedef struct {
  int ncols;
  fl_pgo_value *vals;     /* owned by the decoder, reused by each message */
} fl_pgo_tuple;

typedef enum {
  FL_PGO_BEGIN = 'B', FL_PGO_COMMIT = 'C', FL_PGO_ORIGIN = 'O', FL_PGO_RELATION = 'R',
  FL_PGO_TYPE = 'Y', FL_PGO_INSERT = 'I', FL_PGO_UPDATE = 'U', FL_PGO_DELETE = 'D',
  FL_PGO_TRUNCATE = 'T', FL_PGO_MESSAGE = 'M', FL_PGO_STREAM_START = 'S',
  FL_PGO_STREAM_STOP = 'E', FL_PGO_STREAM_COMMIT = 'c', FL_PGO_STREAM_ABORT = 'A'
} fl_pgo_type;

typedef struct {
  fl_pgo_type type;
  uint32_t xid;           /* Begin; Stream Start/Commit/Abort; and, inside a stream (v2),
                             the xid prefix of Relation/Type/Insert/Update/Delete/Truncate/Message */
  uint64_t lsn;           /* Begin: final (commit) LSN; Commit/Stream Commit: commit LSN;
                             Message: the message LSN */
  uint64_t end_lsn;       /* Commit/Stream Commit: end LSN of the transaction */
  int64_t timestamp;      /* Begin/Commit/Stream Commit: microseconds since 2000-01-01 UTC */
  uint8_t flags;          /* Commit/Stream Commit flags; Truncate options (1 cascade, 2 restart
                             identity); Message flags (1 transactional) */
  const fl_pgo_relation *rel;  /* Relation (the new cache entry), Insert/Update/Delete */
  char old_kind;          /* Update/Delete: 'K' key columns, 'O' full old row, 0 none */
  fl_pgo_tuple newtup;    /* Insert/Update */
  fl_pgo_tuple oldtup;    /* Update/Delete when old_kind != 0 */
  int nrelids;            /* Truncate */
  const uint32_t *relids; /* Truncate: owned by the decoder */
  const char *origin;     /* Origin: name (NUL-terminated inside the buffer) */
  const char *prefix;     /* Message: prefix (NUL-terminated inside the buffer) */
  const char *content;    /* Message */
  uint32_t content_len;
  uint32_t subxid;        /* Stream Abort */
  int first_segment;      /* Stream Start */
  uint32_t type_oid;      /* Type message */
  const char *type_nsp, *type_name;
} fl_pgo_msg;

typedef struct fl_pgo fl_pgo;   /* decoder state: relation cache, stream flag, buffers */

fl_pgo *fl_pgo_new(int proto_version);  /* 1, or 2 for streaming; NULL on out of memory */
void fl_pgo_free(fl_pgo *d);

/* Decodes one message (the payload of one XLogData). Returns 0 and fills *m, or -1 with
 * a message in fl_pgo_error(d) ("truncated Insert message", "unknown relation 16384 in
 * Update", "unknown message type 'z'", ...). The decoder tracks Stream Start/Stop to
 * know whether the xid prefix is present. Insert/Update/Delete for a relation OID not in
 * the cache is an error. A tuple with a column count different from the cached relation's
 * is an error. */
int fl_pgo_decode(fl_pgo *d, const char *buf, size_t len, fl_pgo_msg *m);
const char *fl_pgo_error(const fl_pgo *d);

/* The cached relation for an OID, or NULL. */
const fl_pgo_relation *fl_pgo_relation_get(const fl_pgo *d, uint32_t relid);

/* Whether the decoder is between Stream Start and Stream Stop. */
int fl_pgo_in_stream(const fl_pgo *d);

#endif
