/* fl_pgoutput: decoder for pgoutput logical replication messages (protocol v1, and v2
 * streaming), laid out like PostgreSQL's proto.c: one read function per message type. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "fl_pgoutput.h"

/* A cache entry lives at a fixed address for the decoder's lifetime: callers keep the
 * const fl_pgo_relation * of an Insert, and a table rehash must not move it. A replaced
 * relation keeps its entry; only the blob (column array and all strings) is swapped. */
typedef struct {
  fl_pgo_relation rel;
  void *blob;
} pgo_entry;

struct fl_pgo {
  int proto_version;
  int in_stream;
  uint32_t stream_xid;        /* of the open Stream Start, for Stream Stop and error text */
  pgo_entry **slots;          /* open addressing, linear probing, at most half full */
  size_t nslots;              /* a power of two */
  size_t nrels;
  int slot_shift;             /* 32 - log2(nslots), for Fibonacci hashing */
  /* Every cached relation has ncols <= valcap, so tuples never allocate. */
  fl_pgo_value *newvals, *oldvals;
  int valcap;
  uint32_t *relids;
  size_t relidcap;
  char err[256];
};

/* Where a message is being read: like PostgreSQL's StringInfo cursor, except that running
 * short is recorded instead of raised, and checked once per message or before any use of
 * a value read (an allocation size, a cache lookup, a loop bound). */
typedef struct {
  const unsigned char *p, *end;
  int short_read;
  int no_nul;                 /* the short read was a string with no terminator */
} pgo_in;

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static int fail(fl_pgo *d, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(d->err, sizeof d->err, fmt, ap);
  va_end(ap);
  return -1;
}

static int truncated(fl_pgo *d, const pgo_in *in, const char *what) {
  if (in->no_nul) return fail(d, "truncated %s message: string without NUL terminator", what);
  return fail(d, "truncated %s message", what);
}

static size_t left(const pgo_in *in) { return (size_t)(in->end - in->p); }

/* After a short read the cursor sits at the end, so every later read is short too and a
 * reader needs to check only once. */
static int out_of_bytes(pgo_in *in, size_t n) {
  if (left(in) >= n) return 0;
  in->short_read = 1;
  in->p = in->end;
  return 1;
}

static uint8_t get_int8(pgo_in *in) {
  if (out_of_bytes(in, 1)) return 0;
  return *in->p++;
}

static int16_t get_int16(pgo_in *in) {
  uint16_t v;
  if (out_of_bytes(in, 2)) return 0;
  v = (uint16_t)((unsigned)in->p[0] << 8 | in->p[1]);
  in->p += 2;
  return (int16_t)v;
}

static uint32_t get_int32(pgo_in *in) {
  uint32_t v;
  if (out_of_bytes(in, 4)) return 0;
  v = (uint32_t)in->p[0] << 24 | (uint32_t)in->p[1] << 16 | (uint32_t)in->p[2] << 8 | in->p[3];
  in->p += 4;
  return v;
}

static uint64_t get_int64(pgo_in *in) {
  uint64_t hi = get_int32(in);
  return hi << 32 | get_int32(in);
}

/* A NUL-terminated string inside the message; "" after a short read, so callers may look
 * at it before checking. *len (optional) excludes the NUL. */
static const char *get_string(pgo_in *in, size_t *len) {
  const unsigned char *s = in->p, *nul = in->p < in->end ? memchr(in->p, 0, left(in)) : NULL;
  if (!nul) {
    /* Bytes but no NUL is worth saying; no bytes at all is a plain truncation. */
    if (!in->short_read && in->p < in->end) in->no_nul = 1;
    in->short_read = 1;
    in->p = in->end;
    if (len) *len = 0;
    return "";
  }
  in->p = nul + 1;
  if (len) *len = (size_t)(nul - s);
  return (const char *)s;
}

/* The end of every message: nothing missing, nothing left over. */
static int finish(fl_pgo *d, const pgo_in *in, const char *what) {
  if (in->short_read) return truncated(d, in, what);
  if (in->p != in->end)
    return fail(d, "trailing bytes after %s message (%zu extra)", what, left(in));
  return 0;
}

/* Relation, Type, Insert, Update, Delete, Truncate and Message carry the (sub)transaction's
 * xid first while a v2 stream is open; in_stream is never set under v1. */
static void get_stream_xid(const fl_pgo *d, pgo_in *in, fl_pgo_msg *m) {
  if (d->in_stream) m->xid = get_int32(in);
}

static int not_in_stream(fl_pgo *d, const char *what) {
  if (!d->in_stream) return 0;
  return fail(d, "%s inside a stream (no Stream Stop for xid %u)", what, d->stream_xid);
}

/* --- relation cache ------------------------------------------------------------------- */

static size_t slot_of(const fl_pgo *d, uint32_t relid) {
  return (size_t)((relid * 2654435769u) >> d->slot_shift);
}

static pgo_entry *cache_find(const fl_pgo *d, uint32_t relid) {
  size_t mask = d->nslots - 1, i = slot_of(d, relid);
  for (;;) {
    pgo_entry *e = d->slots[i];
    if (!e || e->rel.relid == relid) return e;
    i = (i + 1) & mask;
  }
}

static int cache_resize(fl_pgo *d, int bits) {
  size_t n = (size_t)1 << bits, i;
  pgo_entry **slots = calloc(n, sizeof *slots);
  pgo_entry **old = d->slots;
  size_t oldn = d->nslots;
  if (!slots) return -1;
  d->slots = slots;
  d->nslots = n;
  d->slot_shift = 32 - bits;
  for (i = 0; i < oldn; i++) {
    size_t j;
    if (!old[i]) continue;
    for (j = slot_of(d, old[i]->rel.relid); slots[j]; j = (j + 1) & (n - 1)) {}
    slots[j] = old[i];
  }
  free(old);
  return 0;
}

/* Only called once nothing else can fail, so a cache never holds a half-built entry. */
static void cache_add(fl_pgo *d, pgo_entry *e) {
  size_t mask = d->nslots - 1, i;
  for (i = slot_of(d, e->rel.relid); d->slots[i]; i = (i + 1) & mask) {}
  d->slots[i] = e;
  d->nrels++;
}

static int grow_values(fl_pgo *d, int ncols) {
  int cap = d->valcap ? d->valcap : 8;
  fl_pgo_value *v;
  while (cap < ncols) cap *= 2;
  v = realloc(d->newvals, (size_t)cap * sizeof *v);
  if (!v) return -1;
  d->newvals = v;
  v = realloc(d->oldvals, (size_t)cap * sizeof *v);
  if (!v) return -1;
  d->oldvals = v;
  d->valcap = cap;
  return 0;
}

/* --- message readers ----------------------------------------------------------------------- */

static int read_begin(fl_pgo *d, pgo_in *in, fl_pgo_msg *m) {
  if (not_in_stream(d, "Begin")) return -1;
  m->lsn = get_int64(in);
  m->timestamp = (int64_t)get_int64(in);
  m->xid = get_int32(in);
  return finish(d, in, "Begin");
}

static int read_commit(fl_pgo *d, pgo_in *in, fl_pgo_msg *m) {
  if (not_in_stream(d, "Commit")) return -1;
  m->flags = get_int8(in);
  m->lsn = get_int64(in);
  m->end_lsn = get_int64(in);
  m->timestamp = (int64_t)get_int64(in);
  return finish(d, in, "Commit");
}

/* Allowed inside a stream: pgoutput sends it right after a Stream Start. */
static int read_origin(fl_pgo *d, pgo_in *in, fl_pgo_msg *m) {
  m->lsn = get_int64(in);
  m->origin = get_string(in, NULL);
  return finish(d, in, "Origin");
}

/* Two passes over the columns: the first checks the whole message and sizes one block for
 * the column array and every string, the second fills it. Only then is the cache touched,
 * so a bad Relation message leaves the previous entry for its OID as it was. */
static int read_relation(fl_pgo *d, pgo_in *in, fl_pgo_msg *m) {
  uint32_t relid;
  const char *nsp, *relname;
  size_t nsplen, rellen, strbytes, namelen;
  char replident;
  int ncols, i;
  pgo_in cols;
  fl_pgo_column *c;
  char *s;
  void *blob;
  pgo_entry *e, *fresh = NULL;

  get_stream_xid(d, in, m);
  relid = get_int32(in);
  nsp = get_string(in, &nsplen);
  relname = get_string(in, &rellen);
  replident = (char)get_int8(in);
  ncols = get_int16(in);
  if (in->short_read) return truncated(d, in, "Relation");
  if (ncols < 0) return fail(d, "Relation message for %u has negative column count %d", relid, ncols);

  cols = *in;
  strbytes = nsplen + 1 + rellen + 1;
  for (i = 0; i < ncols && !in->short_read; i++) {
    get_int8(in);
    get_string(in, &namelen);
    get_int32(in);
    get_int32(in);
    strbytes += namelen + 1;
  }
  if (finish(d, in, "Relation")) return -1;

  blob = malloc((size_t)ncols * sizeof *c + strbytes);
  if (!blob) return fail(d, "out of memory for relation %u", relid);
  if (ncols > d->valcap && grow_values(d, ncols)) {
    free(blob);
    return fail(d, "out of memory for relation %u", relid);
  }
  e = cache_find(d, relid);
  if (!e) {
    int bits = 32 - d->slot_shift;
    /* Grow before the add, keeping the table at most half full so probes stay short. */
    if ((d->nrels + 1) * 2 > d->nslots && cache_resize(d, bits + 1)) {
      free(blob);
      return fail(d, "out of memory for relation %u", relid);
    }
    fresh = calloc(1, sizeof *fresh);
    if (!fresh) {
      free(blob);
      return fail(d, "out of memory for relation %u", relid);
    }
    e = fresh;
  }

  c = blob;
  s = (char *)blob + (size_t)ncols * sizeof *c;
  for (i = 0; i < ncols; i++) {
    const char *name;
    c[i].flags = get_int8(&cols);
    name = get_string(&cols, &namelen);
    memcpy(s, name, namelen + 1);
    c[i].name = s;
    s += namelen + 1;
    c[i].typoid = get_int32(&cols);
    c[i].typmod = (int32_t)get_int32(&cols);
  }
  memcpy(s, nsp, nsplen + 1);
  e->rel.nspname = s;
  s += nsplen + 1;
  memcpy(s, relname, rellen + 1);
  e->rel.relname = s;

  free(e->blob);
  e->blob = blob;
  e->rel.relid = relid;
  e->rel.replident = replident;
  e->rel.ncols = ncols;
  e->rel.cols = c;
  e->rel.version++;
  if (fresh) cache_add(d, fresh);
  m->rel = &e->rel;
  return 0;
}

static int read_type(fl_pgo *d, pgo_in *in, fl_pgo_msg *m) {
  get_stream_xid(d, in, m);
  m->type_oid = get_int32(in);
  m->type_nsp = get_string(in, NULL);
  m->type_name = get_string(in, NULL);
  return finish(d, in, "Type");
}

/* The relation named by an Insert/Update/Delete must have been described already: without
 * its column count the tuple cannot be checked, nor its values named. */
static const fl_pgo_relation *get_relation(fl_pgo *d, pgo_in *in, fl_pgo_msg *m, const char *what) {
  uint32_t relid;
  pgo_entry *e;
  get_stream_xid(d, in, m);
  relid = get_int32(in);
  if (in->short_read) {
    truncated(d, in, what);
    return NULL;
  }
  e = cache_find(d, relid);
  if (!e) {
    fail(d, "%s for unknown relation %u", what, relid);
    return NULL;
  }
  m->rel = &e->rel;
  return &e->rel;
}

/* TupleData. Values point into the message; the value array is the decoder's own, sized
 * when the relation was cached. */
static int read_tuple(fl_pgo *d, pgo_in *in, const fl_pgo_relation *rel, fl_pgo_value *vals,
                      fl_pgo_tuple *t, const char *what) {
  int ncols = get_int16(in), i;
  if (in->short_read) return truncated(d, in, what);
  if (ncols != rel->ncols)
    return fail(d, "%s: tuple has %d columns, relation %s.%s has %d", what, ncols,
                rel->nspname, rel->relname, rel->ncols);
  for (i = 0; i < ncols; i++) {
    fl_pgo_value *v = &vals[i];
    uint32_t len;
    if (in->p == in->end) return truncated(d, in, what);
    v->kind = (char)*in->p++;
    switch (v->kind) {
    case 'n':
    case 'u':
      v->len = 0;
      v->data = NULL;
      break;
    case 't':
    case 'b':
      len = get_int32(in);
      if (in->short_read) return truncated(d, in, what);
      if ((int32_t)len < 0)
        return fail(d, "%s: column %d (%s) has negative length %d", what, i + 1,
                    rel->cols[i].name, (int)(int32_t)len);
      if (len > left(in))
        return fail(d, "%s: column %d (%s) has length %u, past the end of the message "
                    "(%zu remaining)", what, i + 1, rel->cols[i].name, len, left(in));
      v->len = len;
      v->data = (const char *)in->p;
      in->p += len;
      break;
    default:
      return fail(d, "%s: column %d (%s) has unknown kind 0x%02x", what, i + 1,
                  rel->cols[i].name, (unsigned char)v->kind);
    }
  }
  t->ncols = ncols;
  t->vals = vals;
  return 0;
}

static int read_insert(fl_pgo *d, pgo_in *in, fl_pgo_msg *m) {
  const fl_pgo_relation *rel = get_relation(d, in, m, "Insert");
  int action;
  if (!rel) return -1;
  action = get_int8(in);
  if (in->short_read) return truncated(d, in, "Insert");
  if (action != 'N') return fail(d, "Insert: expected 'N' before the new tuple, got 0x%02x", action);
  if (read_tuple(d, in, rel, d->newvals, &m->newtup, "Insert")) return -1;
  return finish(d, in, "Insert");
}

static int read_update(fl_pgo *d, pgo_in *in, fl_pgo_msg *m) {
  const fl_pgo_relation *rel = get_relation(d, in, m, "Update");
  int action;
  if (!rel) return -1;
  action = get_int8(in);
  if (in->short_read) return truncated(d, in, "Update");
  if (action == 'K' || action == 'O') {
    m->old_kind = (char)action;
    if (read_tuple(d, in, rel, d->oldvals, &m->oldtup, "Update")) return -1;
    action = get_int8(in);
    if (in->short_read) return truncated(d, in, "Update");
  }
  if (action != 'N')
    return fail(d, "Update: expected 'K', 'O' or 'N' before a tuple, got 0x%02x", action);
  if (read_tuple(d, in, rel, d->newvals, &m->newtup, "Update")) return -1;
  return finish(d, in, "Update");
}

static int read_delete(fl_pgo *d, pgo_in *in, fl_pgo_msg *m) {
  const fl_pgo_relation *rel = get_relation(d, in, m, "Delete");
  int action;
  if (!rel) return -1;
  action = get_int8(in);
  if (in->short_read) return truncated(d, in, "Delete");
  if (action != 'K' && action != 'O')
    return fail(d, "Delete: expected 'K' or 'O' before the old tuple, got 0x%02x", action);
  m->old_kind = (char)action;
  if (read_tuple(d, in, rel, d->oldvals, &m->oldtup, "Delete")) return -1;
  return finish(d, in, "Delete");
}

/* The relids need not be cached relations: pgoutput sends a Relation message for each
 * first, but a consumer that only wants the OIDs should not depend on it. */
static int read_truncate(fl_pgo *d, pgo_in *in, fl_pgo_msg *m) {
  int32_t nrels;
  int i;
  get_stream_xid(d, in, m);
  nrels = (int32_t)get_int32(in);
  m->flags = get_int8(in);
  if (in->short_read) return truncated(d, in, "Truncate");
  if (nrels < 0) return fail(d, "Truncate message has negative relation count %d", (int)nrels);
  /* Checked against the bytes present before it sizes an allocation. */
  if ((size_t)nrels > left(in) / 4) return truncated(d, in, "Truncate");
  if ((size_t)nrels > d->relidcap) {
    size_t cap = d->relidcap ? d->relidcap : 16;
    uint32_t *r;
    while (cap < (size_t)nrels) cap *= 2;
    r = realloc(d->relids, cap * sizeof *r);
    if (!r) return fail(d, "out of memory for a Truncate of %d relations", (int)nrels);
    d->relids = r;
    d->relidcap = cap;
  }
  for (i = 0; i < nrels; i++) d->relids[i] = get_int32(in);
  m->nrelids = nrels;
  m->relids = d->relids;
  return finish(d, in, "Truncate");
}

static int read_message(fl_pgo *d, pgo_in *in, fl_pgo_msg *m) {
  int32_t len;
  get_stream_xid(d, in, m);
  m->flags = get_int8(in);
  m->lsn = get_int64(in);
  m->prefix = get_string(in, NULL);
  len = (int32_t)get_int32(in);
  if (in->short_read) return truncated(d, in, "Message");
  if (len < 0) return fail(d, "Message has negative content length %d", (int)len);
  if ((size_t)len > left(in))
    return fail(d, "Message content length %d is past the end of the message (%zu remaining)",
                (int)len, left(in));
  m->content = (const char *)in->p;
  m->content_len = (uint32_t)len;
  in->p += len;
  return finish(d, in, "Message");
}

static int need_v2(fl_pgo *d, const char *what) {
  if (d->proto_version >= 2) return 0;
  return fail(d, "%s under protocol version %d (streaming needs version 2)", what, d->proto_version);
}

static int read_stream_start(fl_pgo *d, pgo_in *in, fl_pgo_msg *m) {
  if (need_v2(d, "Stream Start")) return -1;
  if (d->in_stream) return fail(d, "Stream Start inside a stream (xid %u still open)", d->stream_xid);
  m->xid = get_int32(in);
  m->first_segment = get_int8(in) != 0;
  if (finish(d, in, "Stream Start")) return -1;
  d->in_stream = 1;
  d->stream_xid = m->xid;
  return 0;
}

/* Reports the xid of the Stream Start it closes, which the message itself does not carry. */
static int read_stream_stop(fl_pgo *d, pgo_in *in, fl_pgo_msg *m) {
  if (need_v2(d, "Stream Stop")) return -1;
  if (!d->in_stream) return fail(d, "Stream Stop outside a stream");
  if (finish(d, in, "Stream Stop")) return -1;
  m->xid = d->stream_xid;
  d->in_stream = 0;
  return 0;
}

static int read_stream_commit(fl_pgo *d, pgo_in *in, fl_pgo_msg *m) {
  if (need_v2(d, "Stream Commit") || not_in_stream(d, "Stream Commit")) return -1;
  m->xid = get_int32(in);
  m->flags = get_int8(in);
  m->lsn = get_int64(in);
  m->end_lsn = get_int64(in);
  m->timestamp = (int64_t)get_int64(in);
  return finish(d, in, "Stream Commit");
}

/* The v2 form; v4's abort LSN and time (parallel apply) are not accepted. */
static int read_stream_abort(fl_pgo *d, pgo_in *in, fl_pgo_msg *m) {
  if (need_v2(d, "Stream Abort") || not_in_stream(d, "Stream Abort")) return -1;
  m->xid = get_int32(in);
  m->subxid = get_int32(in);
  return finish(d, in, "Stream Abort");
}

/* --- public API --------------------------------------------------------------------------- */

fl_pgo *fl_pgo_new(int proto_version) {
  fl_pgo *d;
  /* Other versions change layouts this decoder does not read (v4's Stream Abort). */
  if (proto_version != 1 && proto_version != 2) return NULL;
  d = calloc(1, sizeof *d);
  if (!d) return NULL;
  d->proto_version = proto_version;
  if (cache_resize(d, 4)) {
    free(d);
    return NULL;
  }
  return d;
}

void fl_pgo_free(fl_pgo *d) {
  size_t i;
  if (!d) return;
  for (i = 0; i < d->nslots; i++) {
    if (!d->slots[i]) continue;
    free(d->slots[i]->blob);
    free(d->slots[i]);
  }
  free(d->slots);
  free(d->newvals);
  free(d->oldvals);
  free(d->relids);
  free(d);
}

int fl_pgo_decode(fl_pgo *d, const char *buf, size_t len, fl_pgo_msg *m) {
  /* Copying a zeroed constant compiles to a few vector moves; a memset of this size
   * became `rep stos`, whose startup cost was a third of decoding an Insert. */
  static const fl_pgo_msg empty;
  pgo_in in;
  unsigned char type;
  *m = empty;
  d->err[0] = '\0';
  if (len == 0) return fail(d, "empty message");
  type = (unsigned char)buf[0];
  m->type = (fl_pgo_type)type;
  in.p = (const unsigned char *)buf + 1;
  in.end = (const unsigned char *)buf + len;
  in.short_read = 0;
  in.no_nul = 0;
  switch (type) {
  case 'B': return read_begin(d, &in, m);
  case 'C': return read_commit(d, &in, m);
  case 'O': return read_origin(d, &in, m);
  case 'R': return read_relation(d, &in, m);
  case 'Y': return read_type(d, &in, m);
  case 'I': return read_insert(d, &in, m);
  case 'U': return read_update(d, &in, m);
  case 'D': return read_delete(d, &in, m);
  case 'T': return read_truncate(d, &in, m);
  case 'M': return read_message(d, &in, m);
  case 'S': return read_stream_start(d, &in, m);
  case 'E': return read_stream_stop(d, &in, m);
  case 'c': return read_stream_commit(d, &in, m);
  case 'A': return read_stream_abort(d, &in, m);
  /* Two-phase commit (protocol v3, two_phase on): named, so the error says what to turn off. */
  case 'b': case 'P': case 'K': case 'r': case 'p':
    return fail(d, "unsupported message type '%c' (two-phase commit, protocol version 3)", type);
  default:
    if (type >= 0x20 && type < 0x7f) return fail(d, "unknown message type 0x%02x ('%c')", type, type);
    return fail(d, "unknown message type 0x%02x", type);
  }
}

const char *fl_pgo_error(const fl_pgo *d) { return d->err; }

const fl_pgo_relation *fl_pgo_relation_get(const fl_pgo *d, uint32_t relid) {
  pgo_entry *e = cache_find(d, relid);
  return e ? &e->rel : NULL;
}

int fl_pgo_in_stream(const fl_pgo *d) { return d->in_stream; }
