/* lrepl: the logical replication connection for Lua ("flash.repl"): START_REPLICATION with
 * pgoutput, the CopyBoth loop in the manner of pg_recvlogical.c, standby status updates
 * that confirm only what the callbacks have handled, streamed transactions buffered with
 * a memory bound (spilled to a temporary file past it), and rows decoded into events. */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <libpq-fe.h>
#include <lua.h>
#include <lauxlib.h>
#include "fl_pgoutput.h"
#include "lconn.h"
#include "lrepl.h"
#include "lvalue.h"

#define REPL_MT "flash.repl"
#define PG_EPOCH_OFFSET_S 946684800.0       /* 2000-01-01 - 1970-01-01 in seconds */
#define STATUS_INTERVAL_US 10000000LL      /* standby status at least every 10 s */
#define CONFIRM_DELAY_US 1000000LL         /* handled transactions are confirmed within 1 s... */
#define CONFIRM_TXNS 1000                  /* ...or once this many are handled, if sooner */
#define STREAM_MEM_DEFAULT (8u << 20)      /* buffered bytes of streamed changes before spilling */
#define LARGE_MESSAGE (8u << 20)           /* past this, memory is given back after the message */

/* A streamed (in-progress) transaction's changes, kept until its Stream Commit. Records are
 * [u32 len][u32 xid][message bytes]. */
typedef struct stream {
  uint32_t xid;
  char *mem;
  size_t len, cap;
  FILE *spill;          /* past the memory bound everything goes here */
  size_t spilled;
  uint32_t *aborted;    /* aborted subtransactions: their records are skipped at replay */
  int naborted, capaborted;
  struct stream *next;
} stream;

typedef struct {
  PGconn *pg;
  fl_pgo *dec;
  int proto;
  int copying;
  uint64_t received;        /* highest WAL position received */
  uint64_t flushed;         /* everything before it has been handled: safe to confirm */
  uint64_t delivered;       /* everything before it has been delivered (handled or not) */
  uint64_t server_end;      /* last position the server reported (keepalive) */
  int64_t last_status;      /* monotonic µs of the last status update */
  uint64_t confirmed;       /* the flushed position the last status update reported */
  int64_t unconfirmed_since; /* monotonic µs when flushed first moved past confirmed (0: not) */
  uint32_t unconfirmed_txns; /* transactions handled since the last status update */
  int in_txn;
  int manual;               /* acks decide: commits go to the commit hook, not to flushed */
  int all_acked;            /* manual: every delivered event is acknowledged */
  uint32_t txn_pos;         /* changes of the current transaction so far: the event id's second part */
  uint32_t txn_xid;
  uint64_t txn_lsn, txn_end;
  int64_t txn_time;
  int lsn_ref;              /* registry ref: the current transaction's commit LSN string */
  int rels_ref;             /* registry ref: relid -> { version, table, names, types } */
  int typemap_ref;          /* registry ref: declared type oid -> { oid=, elem=, delim= } */
  int relhook_ref;          /* registry ref: on_relation(relid, schema, name, {columns}) or none */
  int commit_ref;           /* registry ref, manual mode: on_commit(end_lsn) */
  int msghook_ref;          /* registry ref: on_message(lsn, content, transactional) or none */
  char msg_prefix[64];      /* ...for logical messages with this prefix only */
  stream *streams, *cur_stream;
  size_t stream_mem;        /* bytes of streamed changes held in memory, all streams */
  size_t stream_limit;
  size_t stream_peak;       /* the most held in memory at once, for stats */
  uint64_t spilled_total;
  uint64_t events, messages, bytes;
  uint64_t largest;         /* the largest message received: libpq's input buffer is as large */
  char *tag;                /* pg_extension: the listener tag of the next change (flashlua plugin) */
  uint32_t tag_len, tag_cap;
  char err[512];
} fl_repl;

static int send_status(fl_repl *r, int reply_requested);

static int64_t now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static int64_t pg_now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return ((int64_t)ts.tv_sec - 946684800LL) * 1000000 + ts.tv_nsec / 1000;
}

static uint64_t get_u64(const char *p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v = (v << 8) | (unsigned char)p[i];
  return v;
}

static void put_u64(char *p, uint64_t v) {
  for (int i = 7; i >= 0; i--) { p[i] = (char)(v & 0xff); v >>= 8; }
}

static void push_lsn(lua_State *L, uint64_t lsn) {
  char buf[32];
  snprintf(buf, sizeof buf, "%X/%X", (unsigned)(lsn >> 32), (unsigned)lsn);
  lua_pushstring(L, buf);
}

/* The event id: commit LSN and position in the transaction, fixed-width hex, so that ids
 * compare as strings in delivery order (byte order, or COLLATE "C" in SQL). */
static void push_event_id(lua_State *L, fl_repl *r) {
  static const char hex[] = "0123456789ABCDEF";
  char buf[25];
  uint64_t lsn = r->txn_lsn;
  uint32_t pos = ++r->txn_pos;
  /* by hand: snprintf was a tenth of a consumer's time on small rows */
  for (int i = 15; i >= 0; i--) { buf[i] = hex[lsn & 15]; lsn >>= 4; }
  buf[16] = '/';
  for (int i = 24; i >= 17; i--) { buf[i] = hex[pos & 15]; pos >>= 4; }
  lua_pushlstring(L, buf, sizeof buf);
}

static fl_repl *check_repl(lua_State *L, int idx) {
  fl_repl *r = luaL_checkudata(L, idx, REPL_MT);
  if (r->pg == NULL) luaL_error(L, "attempt to use a closed replication connection");
  return r;
}

static int fail(lua_State *L, const char *msg) {
  size_t n = strlen(msg);
  while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == ' ')) n--;
  lua_pushnil(L);
  lua_pushlstring(L, msg, n);
  return 2;
}

/* ------------------------------------------------------------------------------------ */
/* Streams */

static void stream_free(stream *s) {
  if (s->spill) fclose(s->spill);
  free(s->mem);
  free(s->aborted);
  free(s);
}

static stream *stream_find(fl_repl *r, uint32_t xid, int create) {
  for (stream *s = r->streams; s; s = s->next)
    if (s->xid == xid) return s;
  if (!create) return NULL;
  stream *s = calloc(1, sizeof *s);
  if (!s) return NULL;
  s->xid = xid;
  s->next = r->streams;
  r->streams = s;
  return s;
}

static void stream_remove(fl_repl *r, stream *s) {
  for (stream **p = &r->streams; *p; p = &(*p)->next) {
    if (*p == s) { *p = s->next; break; }
  }
  r->stream_mem -= s->len;
  if (r->cur_stream == s) r->cur_stream = NULL;
  stream_free(s);
}

static int stream_append(fl_repl *r, stream *s, uint32_t xid, const char *buf, uint32_t len) {
  char hdr[8];
  hdr[0] = (char)(len >> 24); hdr[1] = (char)(len >> 16); hdr[2] = (char)(len >> 8); hdr[3] = (char)len;
  hdr[4] = (char)(xid >> 24); hdr[5] = (char)(xid >> 16); hdr[6] = (char)(xid >> 8); hdr[7] = (char)xid;
  if (!s->spill && r->stream_mem + len + 8 > r->stream_limit) {
    /* Past the bound: move what this stream holds to a file and keep appending there. */
    s->spill = tmpfile();
    if (!s->spill) {
      snprintf(r->err, sizeof r->err, "cannot create a spill file for streamed transaction %u: %s", s->xid, strerror(errno));
      return -1;
    }
    if (s->len && fwrite(s->mem, 1, s->len, s->spill) != s->len) goto werr;
    s->spilled += s->len;
    r->spilled_total += s->len;
    r->stream_mem -= s->len;
    free(s->mem);
    s->mem = NULL; s->len = s->cap = 0;
  }
  if (s->spill) {
    if (fwrite(hdr, 1, 8, s->spill) != 8 || fwrite(buf, 1, len, s->spill) != len) goto werr;
    s->spilled += len + 8;
    r->spilled_total += len + 8;
    return 0;
  }
  if (s->len + len + 8 > s->cap) {
    size_t cap = s->cap ? s->cap * 2 : 65536;
    while (cap < s->len + len + 8) cap *= 2;
    char *m = realloc(s->mem, cap);
    if (!m) { snprintf(r->err, sizeof r->err, "out of memory buffering a streamed transaction"); return -1; }
    s->mem = m; s->cap = cap;
  }
  memcpy(s->mem + s->len, hdr, 8);
  memcpy(s->mem + s->len + 8, buf, len);
  s->len += len + 8;
  r->stream_mem += len + 8;
  if (r->stream_mem > r->stream_peak) r->stream_peak = r->stream_mem;
  return 0;
werr:
  snprintf(r->err, sizeof r->err, "cannot write the spill file of streamed transaction %u: %s", s->xid, strerror(errno));
  return -1;
}

/* ------------------------------------------------------------------------------------ */
/* Rows and events */

/* The Lua-side description of a relation: { version=, table=, names={}, types=userdata }
 * rebuilt when the decoder's relation version changes (ALTER TABLE while running). */
static fl_coltype *rel_entry(lua_State *L, fl_repl *r, const fl_pgo_relation *rel) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->rels_ref);
  lua_rawgeti(L, -1, (int)rel->relid);
  if (lua_istable(L, -1)) {
    lua_getfield(L, -1, "version");
    if ((uint32_t)lua_tonumber(L, -1) == rel->version) {
      lua_pop(L, 1);
      lua_remove(L, -2);
      lua_getfield(L, -1, "types");
      fl_coltype *t = lua_touserdata(L, -1);
      lua_pop(L, 1);
      return t;                       /* entry on the stack top */
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  lua_createtable(L, 0, 4);
  lua_pushnumber(L, rel->version);
  lua_setfield(L, -2, "version");
  lua_pushfstring(L, "%s.%s", rel->nspname, rel->relname);
  lua_setfield(L, -2, "table");
  lua_createtable(L, rel->ncols, 0);
  fl_coltype *types = lua_newuserdata(L, sizeof(fl_coltype) * (rel->ncols ? rel->ncols : 1));
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->typemap_ref);
  for (int i = 0; i < rel->ncols; i++) {
    const fl_pgo_column *c = &rel->cols[i];
    lua_pushstring(L, c->name);
    lua_rawseti(L, -4, i + 1);
    types[i].oid = c->typoid;
    types[i].elem = fl_builtin_elem(c->typoid);
    types[i].delim = ',';
    lua_rawgeti(L, -1, (int)c->typoid);   /* a domain or user array type the listener resolved */
    if (lua_istable(L, -1)) {
      lua_getfield(L, -1, "oid");
      if (lua_isnumber(L, -1)) types[i].oid = (uint32_t)lua_tonumber(L, -1);
      lua_getfield(L, -2, "elem");
      if (lua_isnumber(L, -1)) types[i].elem = (uint32_t)lua_tonumber(L, -1);
      lua_getfield(L, -3, "delim");
      if (lua_isstring(L, -1)) types[i].delim = lua_tostring(L, -1)[0];
      lua_pop(L, 3);
      if (types[i].elem == 0) types[i].elem = fl_builtin_elem(types[i].oid);
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);                       /* typemap */
  lua_setfield(L, -3, "types");
  lua_setfield(L, -2, "names");
  lua_pushvalue(L, -1);
  lua_rawseti(L, -3, (int)rel->relid);
  lua_remove(L, -2);                   /* rels */
  lua_getfield(L, -1, "types");
  fl_coltype *t = lua_touserdata(L, -1);
  lua_pop(L, 1);
  return t;
}

/* Pushes a row table. key_only: just the replica identity key columns (an old tuple of
 * kind 'K' sends the others as nulls that are not the row's values). An unchanged TOAST
 * column takes the old tuple's value when there is one, else flash.unchanged.
 * The tuple's own values are decoded over their text (fl_push_value_owned): the message
 * buffer is ours (PQgetCopyData's copy, or a streamed transaction's record) and each value
 * is read once — the new row borrows old values without overwriting them, since the old
 * row is built from them next. */
static void push_row(lua_State *L, int entry, const fl_coltype *types, const fl_pgo_relation *rel,
                     const fl_pgo_tuple *tup, const fl_pgo_tuple *old, int key_only, int flags) {
  lua_getfield(L, entry, "names");
  lua_createtable(L, 0, tup->ncols);
  for (int i = 0; i < tup->ncols && i < rel->ncols; i++) {
    if (key_only && !(rel->cols[i].flags & 1)) continue;
    const fl_pgo_value *v = &tup->vals[i];
    lua_rawgeti(L, -2, i + 1);
    if (v->kind == 'u' && old && i < old->ncols && old->vals[i].kind != 'u')
      v = &old->vals[i];
    switch (v->kind) {
      case 't':
        if (v == &tup->vals[i]) fl_push_value_owned(L, &types[i], (char *)v->data, v->len, flags);
        else fl_push_value(L, &types[i], v->data, v->len, flags);
        break;
      case 'b': fl_push_value_binary(L, &types[i], v->data, v->len, flags); break;
      case 'u': lua_pushlightuserdata(L, FL_UNCHANGED); break;
      default: lua_pushlightuserdata(L, FL_NULL); break;
    }
    lua_rawset(L, -3);
  }
  lua_remove(L, -2);
}

/* Calls the function below its nargs arguments protected: 0 to go on, 1 when it returned
 * false (stop), -1 on an error (message in r->err, after `what`). */
static int call_hook(lua_State *L, fl_repl *r, int nargs, const char *what) {
  if (lua_pcall(L, nargs, 1, 0) != 0) {
    snprintf(r->err, sizeof r->err, "%s%s", what, lua_tostring(L, -1));
    lua_pop(L, 1);
    return -1;
  }
  int stop = lua_isboolean(L, -1) && !lua_toboolean(L, -1);
  lua_pop(L, 1);
  return stop;
}

/* Calls dispatch(ev, relid) (function and event on the stack top) protected: the relation's
 * OID lets the caller follow a table through renames and map partitions to the listened
 * ancestor. Returns 0 to go on, 1 when dispatch asked to stop, -1 on an error (message in
 * r->err). */
static int call_dispatch(lua_State *L, fl_repl *r, uint32_t relid) {
  int nargs = 2;
  r->events++;
  lua_pushnumber(L, relid);
  if (r->tag_len) {               /* dispatch(ev, relid, tag): the listeners it is for */
    lua_pushlstring(L, r->tag, r->tag_len);   /* it holds until the next tag or the Commit */
    nargs = 3;
  }
  return call_hook(L, r, nargs, "dispatch: ");
}

/* Builds the event of one change and calls dispatch(ev) protected. Returns 0 to go on,
 * 1 when dispatch asked to stop, -1 on an error (message in r->err). */
static int emit_change(lua_State *L, fl_repl *r, int dispatch, int flags, const fl_pgo_msg *m,
                       uint32_t xid, const char *op) {
  const fl_pgo_relation *rel = m->rel;
  lua_pushvalue(L, dispatch);
  lua_createtable(L, 0, 9);
  int ev = lua_gettop(L);
  fl_coltype *types = rel_entry(L, r, rel);
  int entry = lua_gettop(L);
  lua_pushstring(L, op);
  lua_setfield(L, ev, "op");
  push_event_id(L, r);
  lua_setfield(L, ev, "id");
  lua_getfield(L, entry, "table");
  lua_setfield(L, ev, "table");
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->lsn_ref);
  lua_setfield(L, ev, "lsn");
  lua_pushnumber(L, xid);
  lua_setfield(L, ev, "xid");
  lua_pushnumber(L, (double)r->txn_time / 1e6 + PG_EPOCH_OFFSET_S);
  lua_setfield(L, ev, "commit_time");
  const fl_pgo_tuple *old = m->old_kind ? &m->oldtup : NULL;
  if (m->type == FL_PGO_INSERT || m->type == FL_PGO_UPDATE) {
    push_row(L, entry, types, rel, &m->newtup, m->old_kind == 'O' ? old : NULL, 0, flags);
    lua_setfield(L, ev, "new");
  }
  if (old) {
    push_row(L, entry, types, rel, old, NULL, m->old_kind == 'K', flags);
    lua_setfield(L, ev, "old");
  }
  lua_pop(L, 1);                        /* entry */
  return call_dispatch(L, r, rel->relid);
}

static int emit_truncate(lua_State *L, fl_repl *r, int dispatch, const fl_pgo_msg *m, uint32_t xid) {
  for (int i = 0; i < m->nrelids; i++) {
    const fl_pgo_relation *rel = fl_pgo_relation_get(r->dec, m->relids[i]);
    if (!rel) { r->txn_pos++; continue; }
    lua_pushvalue(L, dispatch);
    lua_createtable(L, 0, 7);
    lua_pushstring(L, "truncate");
    lua_setfield(L, -2, "op");
    push_event_id(L, r);
    lua_setfield(L, -2, "id");
    lua_pushfstring(L, "%s.%s", rel->nspname, rel->relname);
    lua_setfield(L, -2, "table");
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->lsn_ref);
    lua_setfield(L, -2, "lsn");
    lua_pushnumber(L, xid);
    lua_setfield(L, -2, "xid");
    lua_pushnumber(L, (double)r->txn_time / 1e6 + PG_EPOCH_OFFSET_S);
    lua_setfield(L, -2, "commit_time");
    int rc = call_dispatch(L, r, rel->relid);
    if (rc != 0) return rc;
  }
  return 0;
}

static void set_txn(lua_State *L, fl_repl *r, uint32_t xid, uint64_t lsn, int64_t ts) {
  r->txn_xid = xid;
  r->txn_lsn = lsn;
  r->txn_pos = 0;
  r->txn_time = ts;
  push_lsn(L, lsn);
  lua_rawseti(L, LUA_REGISTRYINDEX, r->lsn_ref);
}

static int dispatch_dml(lua_State *L, fl_repl *r, int dispatch, int flags, const fl_pgo_msg *m) {
  switch (m->type) {
    case FL_PGO_INSERT: return emit_change(L, r, dispatch, flags, m, r->txn_xid, "insert");
    case FL_PGO_UPDATE: return emit_change(L, r, dispatch, flags, m, r->txn_xid, "update");
    case FL_PGO_DELETE: return emit_change(L, r, dispatch, flags, m, r->txn_xid, "delete");
    case FL_PGO_TRUNCATE: return emit_truncate(L, r, dispatch, m, r->txn_xid);
    default: return 0;
  }
}

/* A logical message of the flashlua plugin (prefix "flashlua"). */
static int plugin_message(const fl_pgo_msg *m) {
  return m->type == FL_PGO_MESSAGE && m->prefix && strcmp(m->prefix, "flashlua") == 0;
}

/* Its 'L' messages are listener tags: kept for the change messages that follow (until the
 * next tag or the Commit). Returns 1 for a tag, 0 for anything else, -1 out of memory
 * (r->err). */
static int keep_tag(fl_repl *r, const fl_pgo_msg *m) {
  if (!plugin_message(m) || m->content_len == 0 || m->content[0] != 'L') return 0;
  if (m->content_len > r->tag_cap) {
    char *t = realloc(r->tag, m->content_len);
    if (!t) { snprintf(r->err, sizeof r->err, "out of memory"); return -1; }
    r->tag = t;
    r->tag_cap = m->content_len;
  }
  memcpy(r->tag, m->content, m->content_len);
  r->tag_len = m->content_len;
  return 1;
}

static int message_hook(lua_State *L, fl_repl *r, const fl_pgo_msg *m);

/* Replays a committed streamed transaction in order, then forgets it. */
static int replay_stream(lua_State *L, fl_repl *r, int dispatch, int flags, stream *s) {
  char synth[6] = { 'S', (char)(s->xid >> 24), (char)(s->xid >> 16), (char)(s->xid >> 8), (char)s->xid, 0 };
  fl_pgo_msg m;
  if (fl_pgo_decode(r->dec, synth, sizeof synth, &m) != 0) {
    snprintf(r->err, sizeof r->err, "replaying streamed transaction %u: %s", s->xid, fl_pgo_error(r->dec));
    return -1;
  }
  int rc = 0;
  char *rec = NULL;
  size_t reccap = 0;
  r->tag_len = 0;
  const char *p = s->mem, *end = s->mem ? s->mem + s->len : NULL;
  if (s->spill) {
    fflush(s->spill);
    rewind(s->spill);
  }
  for (;;) {
    uint32_t len, xid;
    const char *body;
    if (s->spill) {
      unsigned char hdr[8];
      size_t got = fread(hdr, 1, 8, s->spill);
      if (got == 0) break;
      if (got != 8) { snprintf(r->err, sizeof r->err, "spill file of transaction %u is truncated", s->xid); rc = -1; break; }
      len = (uint32_t)hdr[0] << 24 | (uint32_t)hdr[1] << 16 | (uint32_t)hdr[2] << 8 | hdr[3];
      xid = (uint32_t)hdr[4] << 24 | (uint32_t)hdr[5] << 16 | (uint32_t)hdr[6] << 8 | hdr[7];
      if (len > reccap) {
        char *n = realloc(rec, len);
        if (!n) { snprintf(r->err, sizeof r->err, "out of memory replaying transaction %u", s->xid); rc = -1; break; }
        rec = n; reccap = len;
      }
      if (fread(rec, 1, len, s->spill) != len) {
        snprintf(r->err, sizeof r->err, "spill file of transaction %u is truncated", s->xid); rc = -1; break;
      }
      body = rec;
    } else {
      if (!p || p >= end) break;
      const unsigned char *h = (const unsigned char *)p;
      len = (uint32_t)h[0] << 24 | (uint32_t)h[1] << 16 | (uint32_t)h[2] << 8 | h[3];
      xid = (uint32_t)h[4] << 24 | (uint32_t)h[5] << 16 | (uint32_t)h[6] << 8 | h[7];
      body = p + 8;
      p += 8 + len;
    }
    int skip = 0;
    for (int i = 0; i < s->naborted; i++) if (s->aborted[i] == xid) skip = 1;
    if (skip) continue;
    if (fl_pgo_decode(r->dec, body, len, &m) != 0) {
      snprintf(r->err, sizeof r->err, "replaying streamed transaction %u: %s", s->xid, fl_pgo_error(r->dec));
      rc = -1;
      break;
    }
    if (m.type == FL_PGO_MESSAGE) {
      /* the flashlua plugin's tags and messages, kept in order with the changes */
      rc = keep_tag(r, &m);
      if (rc == 0) rc = message_hook(L, r, &m);
      if (rc < 0) break;
      rc = 0;
      continue;
    }
    rc = dispatch_dml(L, r, dispatch, flags, &m);
    if (rc != 0) break;
  }
  r->tag_len = 0;
  free(rec);
  char stop = 'E';
  fl_pgo_decode(r->dec, &stop, 1, &m);
  return rc;
}

/* Everything before end_lsn has been handled: it may be confirmed, and is, once
 * CONFIRM_DELAY_US has passed since the first unconfirmed one or CONFIRM_TXNS of them are
 * waiting, so a crash redelivers a bounded amount. Returns 0, or -1 (error in r->err). */
static int advance(fl_repl *r, uint64_t end_lsn) {
  if (end_lsn <= r->flushed) return 0;
  r->flushed = end_lsn;
  int64_t now = now_us();
  if (!r->unconfirmed_since) r->unconfirmed_since = now;
  r->unconfirmed_txns++;
  if (r->unconfirmed_txns >= CONFIRM_TXNS || now - r->unconfirmed_since >= CONFIRM_DELAY_US)
    return send_status(r, 0);
  return 0;
}

/* A transaction ending at end_lsn has been delivered. In auto mode every callback of it
 * has returned: it is handled. In manual mode the commit hook is told, and the script's
 * acknowledgements move the position (repl:confirm). */
static int handled(lua_State *L, fl_repl *r, uint64_t end_lsn) {
  if (end_lsn > r->delivered) r->delivered = end_lsn;
  if (!r->manual) return advance(r, end_lsn);
  r->all_acked = 0;                     /* until the hook says otherwise (repl:confirm) */
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->commit_ref);
  lua_pushnumber(L, (double)end_lsn);
  if (lua_pcall(L, 1, 0, 0) != 0) {
    snprintf(r->err, sizeof r->err, "dispatch: on_commit: %s", lua_tostring(L, -1));
    lua_pop(L, 1);
    return -1;
  }
  return 0;
}

/* A Relation message arrived (a new relation, or one changed by DDL: renamed, columns
 * added or dropped): tells the on_relation hook, if any, protected. */
static int relation_hook(lua_State *L, fl_repl *r, const fl_pgo_relation *rel) {
  if (r->relhook_ref == LUA_NOREF || r->relhook_ref == LUA_REFNIL) return 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->relhook_ref);
  lua_pushnumber(L, rel->relid);
  lua_pushstring(L, rel->nspname);
  lua_pushstring(L, rel->relname);
  lua_createtable(L, rel->ncols, 0);
  for (int i = 0; i < rel->ncols; i++) {
    lua_pushstring(L, rel->cols[i].name);
    lua_rawseti(L, -2, i + 1);
  }
  if (lua_pcall(L, 4, 0, 0) != 0) {
    snprintf(r->err, sizeof r->err, "dispatch: on_relation: %s", lua_tostring(L, -1));
    lua_pop(L, 1);
    return -1;
  }
  return 0;
}

/* A logical message (pg_logical_emit_message) with the hook's prefix: tells the hook, which
 * runs callbacks (a backfill chunk delivered at this position in the stream) and returns
 * false to stop. Returns 0, 1 (stop requested) or -1 (error in r->err). */
static int message_hook(lua_State *L, fl_repl *r, const fl_pgo_msg *m) {
  if (r->msghook_ref == LUA_NOREF || r->msghook_ref == LUA_REFNIL) return 0;
  if (!m->prefix || strcmp(m->prefix, r->msg_prefix) != 0) return 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->msghook_ref);
  lua_pushnumber(L, (double)m->lsn);
  lua_pushlstring(L, m->content, m->content_len);
  lua_pushboolean(L, m->flags & 1);
  return call_hook(L, r, 3, "dispatch: on_message: ");
}

/* One XLogData payload. Returns 0, 1 (stop requested) or -1 (error in r->err). */
static int handle_message(lua_State *L, fl_repl *r, int dispatch, int flags, const char *buf, uint32_t len) {
  fl_pgo_msg m;
  int in_stream = fl_pgo_in_stream(r->dec);
  if (fl_pgo_decode(r->dec, buf, len, &m) != 0) {
    snprintf(r->err, sizeof r->err, "cannot decode a pgoutput message: %s", fl_pgo_error(r->dec));
    return -1;
  }
  r->messages++;
  if (m.type == FL_PGO_RELATION && m.rel && relation_hook(L, r, m.rel) != 0) return -1;
  if (in_stream && m.type != FL_PGO_STREAM_STOP && m.type != FL_PGO_STREAM_START) {
    /* A change of an in-progress transaction: keep it until Stream Commit. Relation and
     * Type messages have already updated the decoder's cache. */
    stream *s = r->cur_stream;
    if (!s) { snprintf(r->err, sizeof r->err, "streamed change outside a known stream"); return -1; }
    /* Relation messages are kept too: replayed in order, they give rows streamed before an
     * ALTER TABLE of the same transaction the columns they were written with. */
    if (m.type == FL_PGO_TYPE || (m.type == FL_PGO_MESSAGE && !plugin_message(&m))) return 0;
    return stream_append(r, s, m.xid, buf, len);
  }
  /* The flashlua plugin's listener tag: kept for the change messages that follow (its
   * other messages go to the on_message hook). */
  int tag = keep_tag(r, &m);
  if (tag != 0) return tag < 0 ? -1 : 0;
  switch (m.type) {
    case FL_PGO_BEGIN:
      r->in_txn = 1;
      r->tag_len = 0;
      set_txn(L, r, m.xid, m.lsn, m.timestamp);
      return 0;
    case FL_PGO_COMMIT:
      r->in_txn = 0;
      r->tag_len = 0;
      r->txn_end = m.end_lsn;
      /* Every callback of the transaction has returned: it may be confirmed. */
      return handled(L, r, m.end_lsn);
    case FL_PGO_STREAM_START: {
      stream *s = stream_find(r, m.xid, 1);
      if (!s) { snprintf(r->err, sizeof r->err, "out of memory"); return -1; }
      r->cur_stream = s;
      return 0;
    }
    case FL_PGO_STREAM_STOP:
      r->cur_stream = NULL;
      return 0;
    case FL_PGO_STREAM_ABORT: {
      stream *s = stream_find(r, m.xid, 0);
      if (!s) return 0;
      if (m.subxid == m.xid || m.subxid == 0) {
        stream_remove(r, s);
      } else {
        if (s->naborted == s->capaborted) {
          int cap = s->capaborted ? s->capaborted * 2 : 8;
          uint32_t *a = realloc(s->aborted, sizeof(uint32_t) * cap);
          if (!a) { snprintf(r->err, sizeof r->err, "out of memory"); return -1; }
          s->aborted = a; s->capaborted = cap;
        }
        s->aborted[s->naborted++] = m.subxid;
      }
      return 0;
    }
    case FL_PGO_STREAM_COMMIT: {
      stream *s = stream_find(r, m.xid, 0);
      set_txn(L, r, m.xid, m.lsn, m.timestamp);
      int rc = 0;
      if (s) {
        rc = replay_stream(L, r, dispatch, flags, s);
        stream_remove(r, s);
      }
      if (rc == 0) rc = handled(L, r, m.end_lsn);
      return rc;
    }
    case FL_PGO_INSERT: case FL_PGO_UPDATE: case FL_PGO_DELETE: case FL_PGO_TRUNCATE:
      return dispatch_dml(L, r, dispatch, flags, &m);
    case FL_PGO_MESSAGE:
      return message_hook(L, r, &m);
    default:
      return 0;   /* Relation, Type, Origin, Message: nothing to deliver */
  }
}

/* ------------------------------------------------------------------------------------ */
/* Lua API */

/* core.replication(dsn) -> repl | nil, err : a replication=database connection whose
 * walsender prints values in the canonical text forms. */
static int l_replication(lua_State *L) {
  const char *dsn = luaL_optstring(L, 1, "");
  const char *keys[] = { "dbname", "replication", "fallback_application_name", "client_encoding", "options", NULL };
  const char *vals[] = { dsn, "database", "flashlua", "UTF8",
    "-c DateStyle=ISO,MDY -c TimeZone=UTC -c IntervalStyle=postgres -c extra_float_digits=3 -c bytea_output=hex",
    NULL };
  fl_repl *r = lua_newuserdata(L, sizeof *r);
  memset(r, 0, sizeof *r);
  r->lsn_ref = r->rels_ref = r->typemap_ref = r->relhook_ref = r->commit_ref = r->msghook_ref = LUA_NOREF;
  luaL_getmetatable(L, REPL_MT);
  lua_setmetatable(L, -2);
  r->pg = PQconnectdbParams(keys, vals, 1);
  if (!r->pg) return fail(L, "out of memory");
  if (PQstatus(r->pg) != CONNECTION_OK) {
    lua_pushfstring(L, "cannot open a replication connection: %s", PQerrorMessage(r->pg));
    PQfinish(r->pg);
    r->pg = NULL;
    return fail(L, lua_tostring(L, -1));
  }
  lua_pushstring(L, "");
  r->lsn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_newtable(L);
  r->rels_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_newtable(L);
  r->typemap_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  r->stream_limit = STREAM_MEM_DEFAULT;
  return 1;
}

static void repl_release(lua_State *L, fl_repl *r) {
  if (r->pg) { PQfinish(r->pg); r->pg = NULL; }
  if (r->dec) { fl_pgo_free(r->dec); r->dec = NULL; }
  free(r->tag);
  r->tag = NULL;
  r->tag_len = r->tag_cap = 0;
  while (r->streams) stream_remove(r, r->streams);
  luaL_unref(L, LUA_REGISTRYINDEX, r->lsn_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, r->rels_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, r->typemap_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, r->relhook_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, r->commit_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, r->msghook_ref);
  r->lsn_ref = r->rels_ref = r->typemap_ref = r->relhook_ref = r->commit_ref = r->msghook_ref = LUA_NOREF;
}

static int l_close(lua_State *L) {
  fl_repl *r = luaL_checkudata(L, 1, REPL_MT);
  repl_release(L, r);
  return 0;
}

/* repl:exec(command) -> rows (text values) | nil, err, sqlstate : replication commands
 * (IDENTIFY_SYSTEM, CREATE_REPLICATION_SLOT, ...) before streaming starts. */
static int l_exec(lua_State *L) {
  fl_repl *r = check_repl(L, 1);
  const char *sql = luaL_checkstring(L, 2);
  PGresult *res = PQexec(r->pg, sql);
  ExecStatusType st = PQresultStatus(res);
  if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) {
    return fl_push_pgerror(L, r->pg, res);
  }
  int nrows = PQntuples(res), ncols = PQnfields(res);
  lua_createtable(L, nrows, 0);
  for (int i = 0; i < nrows; i++) {
    lua_createtable(L, 0, ncols);
    for (int j = 0; j < ncols; j++) {
      if (PQgetisnull(res, i, j)) lua_pushlightuserdata(L, FL_NULL);
      else lua_pushlstring(L, PQgetvalue(res, i, j), PQgetlength(res, i, j));
      lua_setfield(L, -2, PQfname(res, j));
    }
    lua_rawseti(L, -2, i + 1);
  }
  PQclear(res);
  return 1;
}

static int parse_lsn(const char *s, uint64_t *out) {
  unsigned hi, lo;
  if (sscanf(s, "%X/%X", &hi, &lo) != 2) return -1;
  *out = ((uint64_t)hi << 32) | lo;
  return 0;
}

/* core.lsn("X/Y") -> number ; core.lsn(number) -> "X/Y" */
static int l_lsn(lua_State *L) {
  if (lua_type(L, 1) == LUA_TNUMBER) {
    push_lsn(L, (uint64_t)lua_tonumber(L, 1));
    return 1;
  }
  uint64_t v;
  if (parse_lsn(luaL_checkstring(L, 1), &v) != 0) return fail(L, "malformed LSN (expected X/Y in hex)");
  lua_pushnumber(L, (double)v);
  return 1;
}

/* repl:start(command, proto_version) -> true | nil, err, sqlstate
 * command: the whole START_REPLICATION statement (built and quoted by the caller). */
static int l_start(lua_State *L) {
  fl_repl *r = check_repl(L, 1);
  const char *cmd = luaL_checkstring(L, 2);
  int proto = (int)luaL_optinteger(L, 3, 1);
  if (r->copying) return luaL_error(L, "replication already started");
  r->dec = fl_pgo_new(proto);
  if (!r->dec) return fail(L, "out of memory");
  r->proto = proto;
  PGresult *res = PQexec(r->pg, cmd);
  if (PQresultStatus(res) != PGRES_COPY_BOTH) {
    return fl_push_pgerror(L, r->pg, res);
  }
  PQclear(res);
  PQsetnonblocking(r->pg, 1);
  r->copying = 1;
  r->last_status = 0;
  lua_pushboolean(L, 1);
  return 1;
}

static int send_status(fl_repl *r, int reply_requested) {
  char msg[1 + 8 * 4 + 1];
  msg[0] = 'r';
  uint64_t write = r->received > r->flushed ? r->received : r->flushed;
  put_u64(msg + 1, write);
  put_u64(msg + 9, r->flushed);
  put_u64(msg + 17, r->flushed);
  put_u64(msg + 25, (uint64_t)pg_now_us());
  msg[33] = reply_requested ? 1 : 0;
  if (PQputCopyData(r->pg, msg, sizeof msg) <= 0 || PQflush(r->pg) < 0) {
    snprintf(r->err, sizeof r->err, "cannot send a status update: %s", PQerrorMessage(r->pg));
    return -1;
  }
  r->last_status = now_us();
  r->confirmed = r->flushed;
  r->unconfirmed_since = 0;
  r->unconfirmed_txns = 0;
  return 0;
}

/* repl:status([reply_requested]) -> true | nil, err : confirm what was handled now. */
static int l_status(lua_State *L) {
  fl_repl *r = check_repl(L, 1);
  if (!r->copying) { lua_pushboolean(L, 1); return 1; }
  if (send_status(r, lua_toboolean(L, 2)) != 0) return fail(L, r->err);
  lua_pushboolean(L, 1);
  return 1;
}

/* repl:pump(dispatch, [flags], [budget], [seconds], [txn_end]) -> more | nil, err
 * Handles what has arrived, calling dispatch(ev) for each change; dispatch returning false
 * stops (the transaction is then not confirmed). Returns true when the budget of messages
 * or of time (seconds > 0: checked after each message) ran out, so more may be waiting,
 * false when the socket is drained. The time budget lets a caller whose callbacks are
 * slower than the writers give timers and signals a turn. txn_end: return once no
 * transaction is open (a stop finishing the one it interrupted reads no further). */
static int l_pump(lua_State *L) {
  fl_repl *r = check_repl(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  int flags = (int)luaL_optinteger(L, 3, 0);
  long budget = (long)luaL_optinteger(L, 4, 100000);
  double seconds = luaL_optnumber(L, 5, 0);
  int64_t until = seconds > 0 ? now_us() + (int64_t)(seconds * 1e6) : 0;
  int txn_end = lua_toboolean(L, 6);
  lua_settop(L, 2);
  if (!r->copying) return fail(L, "replication has not started");
  if (!PQconsumeInput(r->pg)) {
    snprintf(r->err, sizeof r->err, "replication connection lost: %s", PQerrorMessage(r->pg));
    return fail(L, r->err);
  }
  int more = 0;
  int consumed_again = 0;
  while (budget-- > 0) {
    char *buf = NULL;
    int n = PQgetCopyData(r->pg, &buf, 1);
    if (n == 0) {
      /* Nothing complete buffered: read the socket once more before going back to poll. */
      if (consumed_again) break;
      consumed_again = 1;
      if (!PQconsumeInput(r->pg)) {
        snprintf(r->err, sizeof r->err, "replication connection lost: %s", PQerrorMessage(r->pg));
        return fail(L, r->err);
      }
      continue;
    }
    consumed_again = 0;
    if (n == -1) {
      PGresult *res = PQgetResult(r->pg);
      snprintf(r->err, sizeof r->err, "replication stream ended by the server: %s",
               res && PQresultErrorMessage(res)[0] ? PQresultErrorMessage(res) : PQerrorMessage(r->pg));
      PQclear(res);
      r->copying = 0;
      return fail(L, r->err);
    }
    if (n < 0) {
      snprintf(r->err, sizeof r->err, "replication connection lost: %s", PQerrorMessage(r->pg));
      return fail(L, r->err);
    }
    r->bytes += (uint64_t)n;
    if ((uint64_t)n > r->largest) r->largest = (uint64_t)n;
    int rc = 0;
    if (buf[0] == 'k' && n >= 18) {
      uint64_t wal_end = get_u64(buf + 1);
      int reply = buf[17];
      if (wal_end > r->server_end) r->server_end = wal_end;
      /* Idle tables on a busy server: once nothing is pending, the slot may move on. Not
       * while a streamed transaction is open: the server reports positions past its
       * changes before its Stream Commit is sent. */
      if (!r->in_txn && !r->streams) {
        if (wal_end > r->delivered) r->delivered = wal_end;
        if (wal_end > r->flushed && (!r->manual || r->all_acked)) r->flushed = wal_end;
      }
      if (wal_end > r->received) r->received = wal_end;
      if (reply && send_status(r, 0) != 0) rc = -1;
    } else if (buf[0] == 'w' && n >= 25) {
      uint64_t start = get_u64(buf + 1);
      uint64_t wal_end = get_u64(buf + 9);
      if (start > r->received) r->received = start;
      if (wal_end > r->server_end) r->server_end = wal_end;
      rc = handle_message(L, r, 2, flags, buf + 25, (uint32_t)(n - 25));
    } else {
      snprintf(r->err, sizeof r->err, "unexpected replication message type 0x%02x (%d bytes)", (unsigned char)buf[0], n);
      rc = -1;
    }
    PQfreemem(buf);
    if (n > (int)LARGE_MESSAGE) fl_release_memory(L);
    if (rc < 0) return fail(L, r->err);
    if (rc > 0) return fail(L, "stopped by a callback");
    if (budget == 0) more = 1;
    if (until && now_us() >= until) { more = 1; break; }
    if (txn_end && !r->in_txn) { more = 1; break; }
  }
  int64_t now = now_us();
  if (r->last_status == 0 || now - r->last_status >= STATUS_INTERVAL_US ||
      (r->unconfirmed_since && now - r->unconfirmed_since >= CONFIRM_DELAY_US)) {
    if (send_status(r, 0) != 0) return fail(L, r->err);
  }
  lua_pushboolean(L, more);
  return 1;
}

/* repl:types({ [declared oid] = { oid=, elem=, delim= } }) : resolved domain and array types. */
static int l_types(lua_State *L) {
  fl_repl *r = luaL_checkudata(L, 1, REPL_MT);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->typemap_ref);
  lua_pushnil(L);
  while (lua_next(L, 2)) {
    lua_pushvalue(L, -2);
    lua_insert(L, -2);
    lua_rawset(L, -4);
  }
  /* Relations decoded so far are rebuilt with the new types on their next row. */
  lua_newtable(L);
  lua_rawseti(L, LUA_REGISTRYINDEX, r->rels_ref);
  return 0;
}

/* repl:due() -> monotonic seconds (core.now's clock) when the next status update is due:
 * handled transactions waiting to be confirmed, or the periodic one. */
static int l_due(lua_State *L) {
  fl_repl *r = check_repl(L, 1);
  int64_t due = r->last_status + STATUS_INTERVAL_US;
  if (r->unconfirmed_since && r->unconfirmed_since + CONFIRM_DELAY_US < due) due = r->unconfirmed_since + CONFIRM_DELAY_US;
  lua_pushnumber(L, (double)due / 1e6);
  return 1;
}

/* Replaces the hook in *ref by the function at stack index idx (none or nil: no hook). */
static void set_hook(lua_State *L, int *ref, int idx) {
  if (!lua_isnoneornil(L, idx)) luaL_checktype(L, idx, LUA_TFUNCTION);
  luaL_unref(L, LUA_REGISTRYINDEX, *ref);
  *ref = LUA_NOREF;
  if (!lua_isnoneornil(L, idx)) {
    lua_pushvalue(L, idx);
    *ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
}

/* repl:on_relation(fn | nil): fn(relid, schema, name, {column names}) on each Relation message. */
static int l_on_relation(lua_State *L) {
  set_hook(L, &check_repl(L, 1)->relhook_ref, 2);
  return 0;
}

/* repl:on_message(prefix, fn | nil): fn(lsn, content, transactional) for each logical
 * message with that prefix (START_REPLICATION needs `messages 'true'`); fn returning false
 * stops the pump as a callback's failure does. */
static int l_on_message(lua_State *L) {
  fl_repl *r = check_repl(L, 1);
  size_t plen;
  const char *prefix = luaL_checklstring(L, 2, &plen);
  luaL_argcheck(L, plen < sizeof r->msg_prefix, 2, "prefix too long");
  set_hook(L, &r->msghook_ref, 3);
  memcpy(r->msg_prefix, prefix, plen + 1);
  return 0;
}

/* repl:manual(on_commit): manual acknowledgements. on_commit(end_lsn) is called at each
 * transaction's end instead of confirming it; repl:confirm moves the position. */
static int l_manual(lua_State *L) {
  fl_repl *r = check_repl(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  set_hook(L, &r->commit_ref, 2);
  r->manual = 1;
  r->all_acked = 1;
  return 0;
}

/* repl:confirm(lsn, all_acked) -> true | nil, err : manual mode: everything before lsn is
 * acknowledged (confirmed in the next status update); all_acked: nothing delivered is
 * waiting, so an idle stream's keepalives may move the position on. */
static int l_confirm(lua_State *L) {
  fl_repl *r = check_repl(L, 1);
  lua_Number lsn = luaL_checknumber(L, 2);
  r->all_acked = lua_toboolean(L, 3);
  if (lsn > 0 && advance(r, (uint64_t)lsn) != 0) return fail(L, r->err);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_fd(lua_State *L) {
  fl_repl *r = check_repl(L, 1);
  lua_pushinteger(L, PQsocket(r->pg));
  return 1;
}

/* repl:state() -> { received=, flushed=, server_end=, in_txn=, events=, ... } (LSNs as numbers) */
static int l_state(lua_State *L) {
  fl_repl *r = luaL_checkudata(L, 1, REPL_MT);
  lua_createtable(L, 0, 14);
  lua_pushnumber(L, (double)r->received); lua_setfield(L, -2, "received");
  lua_pushnumber(L, (double)r->flushed); lua_setfield(L, -2, "flushed");
  lua_pushnumber(L, (double)r->delivered); lua_setfield(L, -2, "delivered");
  lua_pushnumber(L, (double)r->confirmed); lua_setfield(L, -2, "confirmed");
  lua_pushnumber(L, (double)r->server_end); lua_setfield(L, -2, "server_end");
  lua_pushboolean(L, r->in_txn); lua_setfield(L, -2, "in_txn");
  lua_pushnumber(L, (double)r->events); lua_setfield(L, -2, "events");
  lua_pushnumber(L, (double)r->messages); lua_setfield(L, -2, "messages");
  lua_pushnumber(L, (double)r->bytes); lua_setfield(L, -2, "bytes");
  lua_pushnumber(L, (double)r->largest); lua_setfield(L, -2, "largest_message");
  lua_pushboolean(L, r->streams != NULL); lua_setfield(L, -2, "streams_open");
  lua_pushnumber(L, (double)r->stream_mem); lua_setfield(L, -2, "stream_buffered");
  lua_pushnumber(L, (double)r->stream_peak); lua_setfield(L, -2, "stream_buffered_peak");
  lua_pushnumber(L, (double)r->spilled_total); lua_setfield(L, -2, "stream_spilled");
  lua_pushboolean(L, r->copying); lua_setfield(L, -2, "copying");
  return 1;
}

/* repl:set_stream_limit(bytes): the memory bound of buffered streamed changes. */
static int l_set_stream_limit(lua_State *L) {
  fl_repl *r = luaL_checkudata(L, 1, REPL_MT);
  lua_Number n = luaL_checknumber(L, 2);
  r->stream_limit = n < 1024 ? 1024 : (size_t)n;
  return 0;
}

/* repl:finish([timeout_s]) : a last status update with what was handled, then the end
 * of the copy; waits (up to timeout_s, default 10) for the server to end it too, so the
 * last confirmation has been applied before the connection goes. Changes still in flight
 * are discarded: unconfirmed, they are sent again next time. */
static int l_finish(lua_State *L) {
  fl_repl *r = luaL_checkudata(L, 1, REPL_MT);
  double timeout = luaL_optnumber(L, 2, 10);
  if (!(timeout > 0)) timeout = 0;                /* 0, negative or NaN: do not wait */
  if (timeout > 86400) timeout = 86400;
  if (r->pg && r->copying) {
    send_status(r, 0);
    PQputCopyEnd(r->pg, NULL);
    int64_t deadline = now_us() + (int64_t)(timeout * 1e6);
    int ended = 0;
    for (;;) {
      if (PQflush(r->pg) < 0) break;
      char *buf = NULL;
      int n = PQgetCopyData(r->pg, &buf, 1);
      if (n > 0) {
        PQfreemem(buf);
        if (now_us() >= deadline) break;  /* a server still streaming does not hold us */
        continue;
      }
      if (n == -1) { ended = 1; break; }  /* the server ended the copy */
      if (n < 0) break;
      int64_t left = deadline - now_us();
      if (left <= 0) break;
      struct pollfd pfd = { PQsocket(r->pg), POLLIN, 0 };
      if (poll(&pfd, 1, (int)(left / 1000) + 1) < 0 && errno != EINTR) break;
      if (!PQconsumeInput(r->pg)) break;
    }
    /* Once the server has ended the copy, its last results are read (bounded: a result
     * still in a COPY state would be returned forever). Otherwise the connection is just
     * closed: the server notices and releases the slot. */
    if (ended) {
      PGresult *res;
      for (int i = 0; i < 16 && PQstatus(r->pg) == CONNECTION_OK && !PQisBusy(r->pg) &&
                      (res = PQgetResult(r->pg)) != NULL; i++) {
        ExecStatusType st = PQresultStatus(res);
        PQclear(res);
        if (st == PGRES_COPY_OUT || st == PGRES_COPY_IN || st == PGRES_COPY_BOTH) break;
      }
    }
    r->copying = 0;
  }
  repl_release(L, r);
  return 0;
}

static const luaL_Reg repl_methods[] = {
  { "exec", l_exec },
  { "start", l_start },
  { "pump", l_pump },
  { "status", l_status },
  { "types", l_types },
  { "fd", l_fd },
  { "due", l_due },
  { "on_relation", l_on_relation },
  { "manual", l_manual },
  { "confirm", l_confirm },
  { "on_message", l_on_message },
  { "state", l_state },
  { "set_stream_limit", l_set_stream_limit },
  { "finish", l_finish },
  { "close", l_close },
  { NULL, NULL }
};

const luaL_Reg fl_repl_funcs[] = {
  { "replication", l_replication },
  { "lsn", l_lsn },
  { NULL, NULL }
};

void fl_repl_open(lua_State *L) {
  luaL_newmetatable(L, REPL_MT);
  lua_pushcfunction(L, l_close);
  lua_setfield(L, -2, "__gc");
  lua_newtable(L);
  luaL_register(L, NULL, repl_methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
}
