/* lrepl: the logical replication connection for Lua ("flash.repl"), the binding of the
 * stream in src/pq/fl_stream.c: it turns the decoded pgoutput messages the stream hands
 * it into Lua events (values through lvalue), calls the driver's dispatch and hooks
 * protected, and tells the stream what to confirm: a transaction once every callback of
 * it returned, or (manual acknowledgements) what the script acknowledged. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libpq-fe.h>
#include <lua.h>
#include <lauxlib.h>
#include "fl_pgoutput.h"
#include "fl_stream.h"
#include "fl_json.h"
#include "lerr.h"
#include "lredis.h"
#include "lrepl.h"
#include "lvalue.h"

#define REPL_MT "flash.repl"
#define PG_EPOCH_OFFSET_S 946684800.0       /* 2000-01-01 - 1970-01-01 in seconds */

typedef struct {
  fl_stream *s;             /* NULL once collected; its connection closed by close/finish */
  int manual;               /* acks decide: commits go to the commit hook, not to confirm */
  uint32_t txn_pos;         /* changes of the current transaction so far: the event id's second part */
  uint32_t txn_xid;
  uint64_t txn_lsn;
  int64_t txn_time;
  int lsn_ref;              /* registry ref: the current transaction's commit LSN string */
  int rels_ref;             /* registry ref: relid -> { version, table, names, types, want, builders } (ENT_*) */
  unsigned rels_gen;        /* bumped whenever entries of rels may have been replaced */
  int keys_ref;             /* registry ref: the event's field names and op values, interned once (K_*) */
  int masks_ref;            /* registry ref: relid -> { [column name] = true }: the columns converted */
  int typemap_ref;          /* registry ref: declared type oid -> { oid=, elem=, delim= } */
  int relhook_ref;          /* registry ref: on_relation(relid, schema, name, {columns}) or none */
  int commit_ref;           /* registry ref, manual mode: on_commit(end_lsn) */
  int msghook_ref;          /* registry ref: on_message(lsn, content, transactional) or none */
  char msg_prefix[64];      /* ...for logical messages with this prefix only */
  uint64_t events;
  uint64_t values;          /* column values converted to Lua (nulls and unchanged included) */
  char *tag;                /* pg_extension: the listener tag of the next change (flashlua plugin) */
  uint32_t tag_len, tag_cap;
  /* The direct path (repl:direct): relations whose changes go straight into a Redis sink's
   * outbox, encoded from the decoded row, with no Lua event. */
  struct direct_s *direct;
  int ndirect;
  uint32_t direct_pending;  /* changes added directly since the last sync (direct_sync) */
  int direct_hook_ref;      /* registry ref: on_direct(id, inserts, updates, deletes, commit_time) */
  int direct_syncing;       /* on_direct is running: repl:direct must not change the list */
  fl_jbuf body;             /* scratch: a direct change's JSON */
  uint64_t ct_lsn;          /* the transaction whose commit_time and LSN these texts are */
  char ct_txt[FL_JSON_NUM_MAX];
  size_t ct_len;
  char lsn_txt[24];
  size_t lsn_len;
} fl_repl;

#define DIRECT_MAX_KEYS 16
#define DIRECT_SYNC_EVERY 256
/* A relation whose changes go to a sink directly (repl:direct). */
typedef struct direct_s {
  uint32_t relid;
  uint32_t id;              /* the sync hook's name for it (the driver's: the relid) */
  int outbox_ref;           /* registry ref: keeps the outbox alive */
  fl_outbox *o;
  char *table;              /* the listened table's name (ev.table) */
  size_t table_len;
  int nkeys;                /* the partition key's columns, by name, and their indexes in */
  char *keys[DIRECT_MAX_KEYS];
  int keyidx[DIRECT_MAX_KEYS];   /* the relation of version key_version (-1: not a column) */
  uint32_t key_version;
  int keys_ok;
  uint32_t pending[3];      /* inserts, updates, deletes added since the last sync */
} direct_t;

/* A relation's column mask (repl:columns), in its entry: on[i] for each column converted. */
typedef struct col_mask_s {
  int n;                    /* columns on: the row table's size */
  unsigned char on[];
} col_mask;

/* The strings an event is built of, interned once per connection and kept on the pump's
 * stack: setting a field by a C string (lua_setfield) hashes and looks the key up in the
 * string table each time, several times per event. */
enum { K_OP, K_ID, K_TABLE, K_LSN, K_XID, K_COMMIT_TIME, K_NEW, K_OLD, K_INSERT, K_UPDATE, K_DELETE, K_COUNT };
static const char *const key_names[K_COUNT] = {
  "op", "id", "table", "lsn", "xid", "commit_time", "new", "old", "insert", "update", "delete"
};

/* A relation's entry in rels: an array, read with rawgeti. */
enum { ENT_VERSION = 1, ENT_TABLE, ENT_NAMES, ENT_TYPES, ENT_WANT, ENT_BUILD, ENT_SIZE = ENT_BUILD };

/* One pump's consumer state, on the C stack of l_pump. */
typedef struct {
  lua_State *L;
  fl_repl *r;
  int dispatch;             /* stack index of dispatch(ev, relid[, tag]) */
  int flags;
  int keys;                 /* stack index of the first of the K_* strings */
  int ent;                  /* stack index of the slot holding the last relation's entry */
  /* that entry, valid while relid, version and the rels generation are unchanged */
  int ent_ok;
  uint32_t ent_relid, ent_version;
  unsigned ent_gen;
  fl_coltype *ent_types;
  const struct col_mask_s *ent_want;
  int markers_slot;         /* stack index of 3 slots for flash.json's markers (the direct path) */
  int markers;              /* ...markers_slot once they are there, else 0 */
  int tag;                  /* stack index of the slot holding the listener tag as a string */
  int tag_ok;               /* ...which is r->tag's (a tag holds for a transaction's changes) */
} pump_ctx;

static void push_lsn(lua_State *L, uint64_t lsn) {
  char buf[32];
  snprintf(buf, sizeof buf, "%X/%X", (unsigned)(lsn >> 32), (unsigned)lsn);
  lua_pushstring(L, buf);
}

/* The event id: commit LSN and position in the transaction, fixed-width hex, so that ids
 * compare as strings in delivery order (byte order, or COLLATE "C" in SQL); 25 bytes for
 * position pos of the current transaction. By hand: snprintf was a tenth of a consumer's
 * time on small rows. */
static void event_id_text(const fl_repl *r, uint32_t pos, char *buf) {
  static const char hex[] = "0123456789ABCDEF";
  uint64_t lsn = r->txn_lsn;
  for (int i = 15; i >= 0; i--) { buf[i] = hex[lsn & 15]; lsn >>= 4; }
  buf[16] = '/';
  for (int i = 24; i >= 17; i--) { buf[i] = hex[pos & 15]; pos >>= 4; }
}

static void push_event_id(lua_State *L, fl_repl *r) {
  char buf[25];
  event_id_text(r, ++r->txn_pos, buf);
  lua_pushlstring(L, buf, sizeof buf);
}

static fl_repl *check_repl(lua_State *L, int idx) {
  fl_repl *r = luaL_checkudata(L, idx, REPL_MT);
  if (r->s == NULL || !fl_stream_is_open(r->s)) luaL_error(L, "attempt to use a closed replication connection");
  return r;
}

static int stream_fail(lua_State *L, fl_repl *r) {
  return fl_fail(L, fl_stream_error(r->s), fl_stream_error_kind(r->s));
}

/* ------------------------------------------------------------------------------------ */
/* Rows and events */

/* Which columns of rel its mask (repl:columns) keeps, as a col_mask userdata at ENT_WANT of
 * the entry on the stack top; nothing when the relation has no mask. By name, so a column
 * added by DDL stays out and a dropped one is simply not there. */
static void set_want(lua_State *L, fl_repl *r, const fl_pgo_relation *rel) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->masks_ref);
  lua_rawgeti(L, -1, (int)rel->relid);
  if (lua_istable(L, -1)) {
    col_mask *want = lua_newuserdata(L, sizeof(col_mask) + (size_t)rel->ncols);
    want->n = 0;
    for (int i = 0; i < rel->ncols; i++) {
      lua_getfield(L, -2, rel->cols[i].name);
      want->on[i] = lua_toboolean(L, -1);
      want->n += want->on[i];
      lua_pop(L, 1);
    }
    lua_rawseti(L, -4, ENT_WANT);
  }
  lua_pop(L, 2);
}

/* Up to this many columns an event is built by a function generated for its relation
 * (push_builder); a wider row is built from C (a Lua function takes at most 200-odd
 * parameters). */
#define BUILD_MAX_COLS 120

/* Appends a column name as a Lua string literal: every byte but letters, digits and '_'
 * as a decimal escape. */
static void add_name_literal(luaL_Buffer *b, const char *s) {
  luaL_addchar(b, '"');
  for (; *s; s++) {
    unsigned char ch = (unsigned char)*s;
    if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_') {
      luaL_addchar(b, (char)ch);
    } else {
      char e[8];
      snprintf(e, sizeof e, "\\%03u", ch);
      luaL_addstring(b, e);
    }
  }
  luaL_addchar(b, '"');
}

/* The shapes of events a builder is generated for: the rows they carry (an old row of kind
 * 'K' has the replica identity's key columns only). */
enum { SH_NEW, SH_OLD, SH_OLD_KEY, SH_BOTH, SH_BOTH_KEY, SH_COUNT };
#define SH_HAS_NEW(sh) ((sh) == SH_NEW || (sh) >= SH_BOTH)
#define SH_HAS_OLD(sh) ((sh) != SH_NEW)
#define SH_KEY(sh) ((sh) == SH_OLD_KEY || (sh) == SH_BOTH_KEY)

/* Whether column i of rel is in a row: in the mask (NULL: all) and, for a key-only row,
 * a key column. The same test as push_row's. */
static int in_row(const fl_pgo_relation *rel, const col_mask *want, int i, int key_only) {
  return (!want || want->on[i]) && (!key_only || (rel->cols[i].flags & 1));
}

/* Appends `field` = { ["name"] = vJ, ... } for the columns of one row, J counting on. */
static void add_row(luaL_Buffer *b, const char *field, const fl_pgo_relation *rel, const col_mask *want,
                    int key_only, int *j) {
  char a[32];
  luaL_addstring(b, field);
  luaL_addstring(b, " = {");
  for (int i = 0, first = 1; i < rel->ncols; i++) {
    if (!in_row(rel, want, i, key_only)) continue;
    luaL_addstring(b, first ? " [" : ", [");
    first = 0;
    add_name_literal(b, rel->cols[i].name);
    snprintf(a, sizeof a, "] = v%d", ++*j);
    luaL_addstring(b, a);
  }
  luaL_addstring(b, " }");
}

/* Pushes the builder of rel's events of one shape (SH_*), for its mask (NULL: every
 * column), e.g. for an insert:
 *   function(dispatch, relid, tag, op, id, tbl, lsn, xid, ct, v1, ..., vk)
 *     return dispatch({ op = op, ..., source = tbl, new = { ["c1"] = v1, ... } }, relid, tag)
 *   end
 * and old = { ... } after new for the shapes with an old row.
 * (ev.source: the relation the row lives in, which the drivers set to ev.table before
 * they replace ev.table by the listened table's name; set here, it is no key added later.)
 * A table constructor with constant keys is a copy of a template whose keys are already in
 * place (LuaJIT's TDUP): setting the fields one by one through the C API (lua_rawset, each
 * key inserted anew) was most of the binding's cost per event. Pushes false when the rows
 * are too wide or the code does not load (the event is then built from C). */
static void push_builder(lua_State *L, const fl_pgo_relation *rel, const col_mask *want, int shape) {
  int k = 0;
  for (int i = 0; i < rel->ncols; i++) {
    if (SH_HAS_NEW(shape) && in_row(rel, want, i, 0)) k++;
    if (SH_HAS_OLD(shape) && in_row(rel, want, i, SH_KEY(shape))) k++;
  }
  if (k > BUILD_MAX_COLS) {
    lua_pushboolean(L, 0);
    return;
  }
  char a[32];
  int j = 0;
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  luaL_addstring(&b, "return function(dispatch, relid, tag, op, id, tbl, lsn, xid, ct");
  for (int v = 1; v <= k; v++) {
    snprintf(a, sizeof a, ", v%d", v);
    luaL_addstring(&b, a);
  }
  luaL_addstring(&b, ")\n  return dispatch({ op = op, id = id, table = tbl, lsn = lsn, xid = xid, commit_time = ct,"
                     " source = tbl");
  if (SH_HAS_NEW(shape)) add_row(&b, ", new", rel, want, 0, &j);
  if (SH_HAS_OLD(shape)) add_row(&b, ", old", rel, want, SH_KEY(shape), &j);
  luaL_addstring(&b, " }, relid, tag)\nend\n");
  luaL_pushresult(&b);
  size_t len;
  const char *src = lua_tolstring(L, -1, &len);
  if (luaL_loadbuffer(L, src, len, "=flash.repl") != 0 || lua_pcall(L, 0, 1, 0) != 0 || !lua_isfunction(L, -1)) {
    lua_pop(L, 2);
    lua_pushboolean(L, 0);
    return;
  }
  lua_remove(L, -2);                   /* the source */
}

/* Pushes a new entry for rel: { version, "schema.table", {names}, types userdata, want
 * userdata | nil, {builders} }
 * (ENT_*), built from the decoder's relation, the declared types (repl:types) and its
 * mask (repl:columns). */
static void new_entry(lua_State *L, fl_repl *r, const fl_pgo_relation *rel) {
  lua_createtable(L, ENT_SIZE, 0);
  lua_pushnumber(L, rel->version);
  lua_rawseti(L, -2, ENT_VERSION);
  lua_pushfstring(L, "%s.%s", rel->nspname, rel->relname);
  lua_rawseti(L, -2, ENT_TABLE);
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
  lua_rawseti(L, -3, ENT_TYPES);
  lua_rawseti(L, -2, ENT_NAMES);
  set_want(L, r, rel);
  lua_createtable(L, SH_COUNT, 0);     /* the builders, made on first use (emit_built) */
  lua_rawseti(L, -2, ENT_BUILD);
}

/* Puts the entry of rel in the pump's entry slot, with its types and mask (NULL: every
 * column) in the context. Rebuilt when the decoder's relation version changes (ALTER TABLE
 * while running), the declared types change (repl:types) or its mask does (repl:columns);
 * the rows of one relation in a row find it in the slot without a lookup. */
static void rel_entry(pump_ctx *c, const fl_pgo_relation *rel) {
  lua_State *L = c->L;
  fl_repl *r = c->r;
  if (c->ent_ok && c->ent_relid == rel->relid && c->ent_version == rel->version && c->ent_gen == r->rels_gen)
    return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->rels_ref);
  lua_rawgeti(L, -1, (int)rel->relid);
  int current = 0;
  if (lua_istable(L, -1)) {
    lua_rawgeti(L, -1, ENT_VERSION);
    current = (uint32_t)lua_tonumber(L, -1) == rel->version;
    lua_pop(L, 1);
  }
  if (!current) {
    lua_pop(L, 1);
    new_entry(L, r, rel);
    lua_pushvalue(L, -1);
    lua_rawseti(L, -3, (int)rel->relid);
  }
  lua_rawgeti(L, -1, ENT_TYPES);
  c->ent_types = lua_touserdata(L, -1);
  lua_rawgeti(L, -2, ENT_WANT);
  c->ent_want = lua_touserdata(L, -1);
  lua_pop(L, 2);
  lua_replace(L, c->ent);              /* the slot keeps types and want alive */
  lua_pop(L, 1);                       /* rels */
  c->ent_ok = 1;
  c->ent_relid = rel->relid;
  c->ent_version = rel->version;
  c->ent_gen = r->rels_gen;
}

/* Pushes the value of column i of tup (an unchanged TOAST value: old's, if it has one). */
static void push_col(pump_ctx *c, const fl_pgo_tuple *tup, const fl_pgo_tuple *old, int i) {
  lua_State *L = c->L;
  const fl_coltype *t = &c->ent_types[i];
  const fl_pgo_value *v = &tup->vals[i];
  c->r->values++;
  if (v->kind == 'u' && old && i < old->ncols && old->vals[i].kind != 'u')
    v = &old->vals[i];
  switch (v->kind) {
    /* the callers made room for the value's slots: FL_STACK_READY */
    case 't':
      if (v == &tup->vals[i]) fl_push_value_owned(L, t, (char *)v->data, v->len, c->flags | FL_STACK_READY);
      else fl_push_value(L, t, v->data, v->len, c->flags | FL_STACK_READY);
      break;
    case 'b': fl_push_value_binary(L, t, v->data, v->len, c->flags | FL_STACK_READY); break;
    case 'u': lua_pushlightuserdata(L, FL_UNCHANGED); break;
    default: lua_pushlightuserdata(L, FL_NULL); break;
  }
}

/* Pushes a row table. key_only: just the replica identity key columns (an old tuple of
 * kind 'K' sends the others as nulls that are not the row's values). The entry's mask
 * (NULL: all): the columns some listener needs (repl:columns); the others are left out,
 * never converted, which is the point on a wide table of which a listener takes two
 * fields. An unchanged TOAST column takes the old tuple's value when there is one, else
 * flash.unchanged.
 * The tuple's own values are decoded over their text (fl_push_value_owned): the message
 * buffer is ours (PQgetCopyData's copy, or a streamed transaction's record) and each value
 * is read once — the new row borrows old values without overwriting them, since the old
 * row is built from them next. */
static void push_row(pump_ctx *c, const fl_pgo_relation *rel, const fl_pgo_tuple *tup, const fl_pgo_tuple *old,
                     int key_only) {
  lua_State *L = c->L;
  const col_mask *want = c->ent_want;
  luaL_checkstack(L, FL_VALUE_SLOTS + 4, "building a row");   /* names, row, key, value */
  lua_rawgeti(L, c->ent, ENT_NAMES);
  lua_createtable(L, 0, want ? want->n : tup->ncols);
  for (int i = 0; i < tup->ncols && i < rel->ncols; i++) {
    if (key_only && !(rel->cols[i].flags & 1)) continue;
    if (want && !want->on[i]) continue;
    lua_rawgeti(L, -2, i + 1);
    push_col(c, tup, old, i);
    lua_rawset(L, -3);
  }
  lua_remove(L, -2);
}

/* Calls the function below its nargs arguments protected: 0 to go on, 1 when it returned
 * false (stop), -1 on an error (the stream's error, kind "callback", after `what`). */
static int call_hook(lua_State *L, fl_repl *r, int nargs, const char *what) {
  if (lua_pcall(L, nargs, 1, 0) != 0) {
    fl_stream_fail(r->s, "callback", "%s%s", what, lua_tostring(L, -1));
    lua_pop(L, 1);
    return -1;
  }
  int stop = lua_isboolean(L, -1) && !lua_toboolean(L, -1);
  lua_pop(L, 1);
  return stop;
}

/* Pushes the current listener tag (the flashlua plugin's), interned once per tag. */
static void push_tag(pump_ctx *c) {
  if (!c->tag_ok) {
    lua_pushlstring(c->L, c->r->tag, c->r->tag_len);
    lua_replace(c->L, c->tag);
    c->tag_ok = 1;
  }
  lua_pushvalue(c->L, c->tag);
}

/* Calls dispatch(ev, relid) (function and event on the stack top) protected: the relation's
 * OID lets the caller follow a table through renames and map partitions to the listened
 * ancestor. Returns 0 to go on, 1 when dispatch asked to stop, -1 on an error. */
static int call_dispatch(pump_ctx *c, uint32_t relid) {
  int nargs = 2;
  c->r->events++;
  lua_pushnumber(c->L, relid);
  if (c->r->tag_len) {            /* dispatch(ev, relid, tag): the listeners it is for */
    push_tag(c);                  /* it holds until the next tag or the Commit */
    nargs = 3;
  }
  return call_hook(c->L, c->r, nargs, "dispatch: ");
}

/* The event of a change by the relation's builder for its shape (push_builder): the
 * builder, its arguments, then dispatch(ev, relid, tag) called by it, protected. Returns
 * what emit_change does, or 2 (nothing pushed) when the shape has no builder. */
static int emit_built(pump_ctx *c, const fl_pgo_msg *m, int op, int shape) {
  lua_State *L = c->L;
  fl_repl *r = c->r;
  const fl_pgo_relation *rel = m->rel;
  const col_mask *want = c->ent_want;
  const fl_pgo_tuple *old = SH_HAS_OLD(shape) ? &m->oldtup : NULL;
  luaL_checkstack(L, 10 + 2 * rel->ncols + FL_VALUE_SLOTS, "building an event");   /* builder, arguments */
  lua_rawgeti(L, c->ent, ENT_BUILD);
  lua_rawgeti(L, -1, shape + 1);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    push_builder(L, rel, want, shape);
    lua_pushvalue(L, -1);
    lua_rawseti(L, -3, shape + 1);
  }
  if (!lua_isfunction(L, -1)) {
    lua_pop(L, 2);
    return 2;
  }
  lua_remove(L, -2);                   /* the builders */
  lua_pushvalue(L, c->dispatch);
  lua_pushnumber(L, rel->relid);
  if (r->tag_len) push_tag(c);         /* the listeners it is for */
  else lua_pushnil(L);
  lua_pushvalue(L, c->keys + op);
  push_event_id(L, r);
  lua_rawgeti(L, c->ent, ENT_TABLE);
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->lsn_ref);
  lua_pushnumber(L, r->txn_xid);
  lua_pushnumber(L, (double)r->txn_time / 1e6 + PG_EPOCH_OFFSET_S);
  int n = 0;
  if (SH_HAS_NEW(shape)) {
    /* an unchanged TOAST value of the new row takes the old row's (full old rows only) */
    const fl_pgo_tuple *from = shape == SH_BOTH ? old : NULL;
    for (int i = 0; i < rel->ncols; i++)
      if (in_row(rel, want, i, 0)) { push_col(c, &m->newtup, from, i); n++; }
  }
  if (old) {
    for (int i = 0; i < rel->ncols; i++)
      if (in_row(rel, want, i, SH_KEY(shape))) { push_col(c, old, NULL, i); n++; }
  }
  r->events++;
  return call_hook(L, r, 9 + n, "dispatch: ");
}

/* Whether change m carries the usual rows: every column of its relation, a new row when it
 * has one (has_new), an old row only of kind 'K' or 'O' (a builder's shapes, SH_*). */
static int usual_rows(const fl_pgo_msg *m, int has_new) {
  const fl_pgo_relation *rel = m->rel;
  const fl_pgo_tuple *old = m->old_kind ? &m->oldtup : NULL;
  return (!has_new || m->newtup.ncols == rel->ncols) &&
         (!old || ((m->old_kind == 'K' || m->old_kind == 'O') && m->oldtup.ncols == rel->ncols)) && (has_new || old);
}

/* ------------------------------------------------------------------------------------ */
/* The direct path: the changes of a relation whose only consumer is a Redis sink
 * (repl:direct, set by the wal_logical driver) are encoded from the decoded row into the
 * sink's outbox, with no Lua event: the JSON and the partition are the ones the sink makes
 * of the event (flash.sink.redis), value by value (fl_value_scalar; a value of another kind
 * goes through its Lua value and fl_json_put). A change the direct path does not take (a
 * binary or unchanged TOAST value it cannot resolve, a key it does not hash the Lua way, a
 * closed connection) goes the Lua way, after the sync below, so the sink's entries stay in
 * stream order. on_direct(id, inserts, updates, deletes, commit_time) tells the driver what
 * was added (at most DIRECT_SYNC_EVERY changes late, and before any other message): it
 * counts them, tracks them as outstanding (acknowledgements) and hands them to the sink. */

static direct_t *find_direct(fl_repl *r, uint32_t relid) {
  for (int i = 0; i < r->ndirect; i++)
    if (r->direct[i].relid == relid) return &r->direct[i];
  return NULL;
}

/* Calls on_direct for every relation with changes added since the last sync, then
 * on_direct() once: only then may a sink write its output and read Redis's answers (the
 * relations of one sink -- partitions -- share its outbox: each one's entries must be in
 * the sink's queue before any answer is counted). 0, or -1 (the hook raised: the stream's
 * error). */
static int direct_sync(lua_State *L, fl_repl *r) {
  if (r->direct_pending == 0) return 0;
  r->direct_pending = 0;
  r->direct_syncing = 1;
  for (int i = 0; i <= r->ndirect; i++) {
    if (i == r->ndirect) {
      lua_rawgeti(L, LUA_REGISTRYINDEX, r->direct_hook_ref);
      if (call_hook(L, r, 0, "dispatch: on_direct: ") < 0) {
        r->direct_syncing = 0;
        return -1;
      }
      break;
    }
    uint32_t n[3];
    memcpy(n, r->direct[i].pending, sizeof n);
    if ((n[0] | n[1] | n[2]) == 0) continue;
    memset(r->direct[i].pending, 0, sizeof n);
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->direct_hook_ref);
    lua_pushnumber(L, r->direct[i].id);
    for (int k = 0; k < 3; k++) lua_pushnumber(L, n[k]);
    lua_pushnumber(L, (double)r->txn_time / 1e6 + PG_EPOCH_OFFSET_S);
    if (call_hook(L, r, 5, "dispatch: on_direct: ") < 0) {
      r->direct_syncing = 0;
      return -1;
    }
  }
  r->direct_syncing = 0;
  return 0;
}

/* Room for n more bytes in b: NULL out of memory. */
static char *jb_room(fl_jbuf *b, size_t n) {
  if (b->cap - b->len < n) {
    size_t cap = b->cap * 2 + n;
    char *p = realloc(b->p, cap);
    if (!p) return NULL;
    b->p = p;
    b->cap = cap;
  }
  return b->p + b->len;
}

static int jb_add(fl_jbuf *b, const char *s, size_t n) {
  char *w = jb_room(b, n);
  if (!w) return -1;
  memcpy(w, s, n);
  b->len += n;
  return 0;
}

/* A JSON string, escaped in chunks (flash.json's way). */
static int jb_str(fl_jbuf *b, const char *s, size_t n) {
  if (jb_add(b, "\"", 1) != 0) return -1;
  while (n > 0) {
    size_t k = fl_json_piece(s, n, 4096);
    char *w = jb_room(b, 6 * k);
    if (!w) return -1;
    b->len += fl_json_escape(s, k, w);
    s += k;
    n -= k;
  }
  return jb_add(b, "\"", 1);
}

/* A number as flash.json writes one (NaN and infinities as PostgreSQL's to_json strings). */
static int jb_num(fl_jbuf *b, double d) {
  char buf[FL_JSON_NUM_MAX];
  size_t n = fl_json_format_double(d, buf);
  if (n > 0) return jb_add(b, buf, n);
  if (d != d) return jb_add(b, "\"NaN\"", 5);
  return d > 0 ? jb_add(b, "\"Infinity\"", 10) : jb_add(b, "\"-Infinity\"", 11);
}

/* The JSON of column i of tup (an unchanged TOAST value: from's). 0, 1 when the direct
 * path does not take it (binary or unchanged), -1 out of memory. */
static int direct_value(pump_ctx *c, const fl_pgo_tuple *tup, const fl_pgo_tuple *from, int i, fl_jbuf *b) {
  const fl_pgo_value *v = &tup->vals[i];
  const fl_coltype *t = &c->ent_types[i];
  double d;
  if (v->kind == 'u' && from && i < from->ncols && from->vals[i].kind != 'u') v = &from->vals[i];
  if (v->kind == 'n') return jb_add(b, "null", 4);
  if (v->kind != 't') return 1;
  switch (fl_value_scalar(t, v->data, v->len, c->flags, &d)) {
    case FL_VAL_NULL: return jb_add(b, "null", 4);
    case FL_VAL_NUMBER: return jb_num(b, d);
    case FL_VAL_STRING: return jb_str(b, v->data, v->len);
    case FL_VAL_TRUE: return jb_add(b, "true", 4);
    case FL_VAL_FALSE: return jb_add(b, "false", 5);
    default: break;
  }
  /* Arrays, JSON, bytea...: their Lua value, encoded as the sink encodes it. The text is
   * not overwritten (fl_push_value): the Lua way may read it again. */
  if (!c->markers) {
    int m = fl_json_markers(c->L);
    lua_replace(c->L, c->markers_slot + 2);
    lua_replace(c->L, c->markers_slot + 1);
    lua_replace(c->L, c->markers_slot);
    (void)m;
    c->markers = c->markers_slot;
  }
  fl_push_value(c->L, t, v->data, v->len, c->flags);
  fl_json_put(c->L, lua_gettop(c->L), c->markers, b);
  lua_pop(c->L, 1);
  return 0;
}

/* ,"field":{"column":value,...} for the columns of one row (key_only: the replica
 * identity's, an old row of kind 'K'). */
static int direct_row(pump_ctx *c, fl_jbuf *b, const char *field, const fl_pgo_relation *rel,
                      const fl_pgo_tuple *tup, const fl_pgo_tuple *from, int key_only) {
  int first = 1, rc;
  if (jb_add(b, field, strlen(field)) != 0) return -1;
  for (int i = 0; i < rel->ncols; i++) {
    if (!in_row(rel, NULL, i, key_only)) continue;
    if (!first && jb_add(b, ",", 1) != 0) return -1;
    first = 0;
    if (jb_str(b, rel->cols[i].name, strlen(rel->cols[i].name)) != 0 || jb_add(b, ":", 1) != 0) return -1;
    if ((rc = direct_value(c, tup, from, i, b)) != 0) return rc;
    c->r->values++;
  }
  return jb_add(b, "}", 1);
}

/* The partition hash goes on with the key columns' texts, joined by "\0", as the sink's
 * key is made of the Lua values: a string's text, a whole number's digits (below 1e14, as
 * tostring prints them), "" for a column the row does not carry. 0, or 1 for a value the
 * direct path leaves to the sink (NULL, other numbers, arrays...). */
static int direct_key(pump_ctx *c, const direct_t *d, const fl_pgo_relation *rel, const fl_pgo_tuple *row,
                      int key_only, uint32_t *h) {
  for (int k = 0; k < d->nkeys; k++) {
    int i = d->keyidx[k];
    const fl_pgo_value *v;
    double num;
    if (k > 0) *h = fl_fnv1a(*h, "", 1);
    if (i < 0 || i >= row->ncols || !in_row(rel, NULL, i, key_only)) continue;
    v = &row->vals[i];
    if (v->kind != 't') return 1;
    switch (fl_value_scalar(&c->ent_types[i], v->data, v->len, c->flags, &num)) {
      case FL_VAL_STRING:
        *h = fl_fnv1a(*h, v->data, v->len);
        break;
      case FL_VAL_NUMBER: {
        char buf[24];
        size_t n = fl_key_number(num, buf);
        if (n == 0) return 1;
        *h = fl_fnv1a(*h, buf, n);
        break;
      }
      default: return 1;
    }
  }
  return 0;
}

/* One change into d's outbox. 0 added, 1 left to the Lua way, -1 an error (the stream's). */
static int emit_direct(pump_ctx *c, const fl_pgo_msg *m, int op, direct_t *d) {
  lua_State *L = c->L;
  fl_repl *r = c->r;
  const fl_pgo_relation *rel = m->rel;
  const fl_pgo_tuple *old = m->old_kind ? &m->oldtup : NULL;
  int has_new = op != K_DELETE, key_only = m->old_kind == 'K', rc;
  fl_jbuf *b = &r->body;
  char id[25];
  const char *src;
  size_t src_len;
  uint32_t h;
  if (r->tag_len || r->direct_hook_ref == LUA_NOREF || !fl_outbox_connected(d->o)) return 1;
  if (!usual_rows(m, has_new)) return 1;   /* emit_change's builder shapes only */
  rel_entry(c, rel);
  if (c->ent_want) return 1;
  if (!d->keys_ok || d->key_version != rel->version) {
    for (int k = 0; k < d->nkeys; k++) {
      d->keyidx[k] = -1;
      for (int i = 0; i < rel->ncols; i++)
        if (strcmp(rel->cols[i].name, d->keys[k]) == 0) d->keyidx[k] = i;
    }
    d->key_version = rel->version;
    d->keys_ok = 1;
  }
  h = fl_partition_hash(d->table, d->table_len);
  if (direct_key(c, d, rel, old ? old : &m->newtup, old ? key_only : 0, &h) != 0) return 1;

  event_id_text(r, r->txn_pos + 1, id);
  lua_rawgeti(L, c->ent, ENT_TABLE);   /* the entry keeps the string alive */
  src = lua_tolstring(L, -1, &src_len);
  lua_pop(L, 1);
  b->len = 0;
  rc = -1;
  if (jb_add(b, "{\"id\":", 6) || jb_str(b, id, sizeof id) || jb_add(b, ",\"table\":", 9) ||
      jb_str(b, d->table, d->table_len) || jb_add(b, ",\"op\":", 6) ||
      jb_str(b, key_names[op], strlen(key_names[op])))
    goto fail;
  if (has_new && (rc = direct_row(c, b, ",\"new\":{", rel, &m->newtup, old && !key_only ? old : NULL, 0)) != 0)
    goto fail;
  if (old && (rc = direct_row(c, b, ",\"old\":{", rel, old, NULL, key_only)) != 0) goto fail;
  rc = -1;
  if (r->ct_len == 0 || r->ct_lsn != r->txn_lsn) {   /* the transaction's: made once */
    r->ct_len = fl_json_format_double((double)r->txn_time / 1e6 + PG_EPOCH_OFFSET_S, r->ct_txt);
    r->lsn_len = (size_t)snprintf(r->lsn_txt, sizeof r->lsn_txt, "%X/%X", (unsigned)(r->txn_lsn >> 32),
                                  (unsigned)r->txn_lsn);
    r->ct_lsn = r->txn_lsn;
  }
  if (jb_add(b, ",\"lsn\":", 7) || jb_str(b, r->lsn_txt, r->lsn_len) || jb_add(b, ",\"commit_time\":", 15) ||
      jb_add(b, r->ct_txt, r->ct_len) || jb_add(b, ",\"xid\":", 7) || jb_num(b, r->txn_xid) ||
      jb_add(b, ",\"source\":", 10) || jb_str(b, src, src_len) || jb_add(b, "}", 1))
    goto fail;
  if (fl_outbox_add_entry(d->o, h % fl_outbox_partitions(d->o), id, sizeof id, b->p, b->len) != 0)
    goto fail;
  r->txn_pos++;
  r->events++;
  d->pending[op - K_INSERT]++;
  if (++r->direct_pending >= DIRECT_SYNC_EVERY) return direct_sync(L, r);
  return 0;
fail:
  if (rc > 0) return 1;
  fl_stream_fail(r->s, "memory", "out of memory encoding a change for Redis");
  return -1;
}

/* Builds the event of one change (op: K_INSERT, K_UPDATE or K_DELETE) and calls
 * dispatch(ev) protected. Returns 0 to go on, 1 when dispatch asked to stop, -1 on an
 * error. Fields are set with the pump's interned keys (lua_rawset), not by C string. */
static int emit_change(pump_ctx *c, const fl_pgo_msg *m, int op) {
  lua_State *L = c->L;
  fl_repl *r = c->r;
  const fl_pgo_relation *rel = m->rel;
  const fl_pgo_tuple *old = m->old_kind ? &m->oldtup : NULL;
  int has_new = m->type == FL_PGO_INSERT || m->type == FL_PGO_UPDATE;
  if (r->ndirect) {
    direct_t *d = find_direct(r, rel->relid);
    if (d) {
      int rc = emit_direct(c, m, op, d);
      if (rc <= 0) return rc;
    }
  }
  if (r->direct_pending && direct_sync(L, r) < 0) return -1;   /* the sink's entries in order */
  rel_entry(c, rel);
  /* The usual rows (every column of the relation) by its builder for their shape. */
  if (usual_rows(m, has_new)) {
    int shape = !old ? SH_NEW : (has_new ? SH_BOTH : SH_OLD) + (m->old_kind == 'K');
    int rc = emit_built(c, m, op, shape);
    if (rc != 2) return rc;
  }
  lua_pushvalue(L, c->dispatch);
  /* op, id, table, lsn, xid, commit_time, new and/or old, and the driver's ev.source */
  lua_createtable(L, 0, 7 + has_new + (old != NULL));
  int ev = lua_gettop(L);
  lua_pushvalue(L, c->keys + K_OP);
  lua_pushvalue(L, c->keys + op);
  lua_rawset(L, ev);
  lua_pushvalue(L, c->keys + K_ID);
  push_event_id(L, r);
  lua_rawset(L, ev);
  lua_pushvalue(L, c->keys + K_TABLE);
  lua_rawgeti(L, c->ent, ENT_TABLE);
  lua_rawset(L, ev);
  lua_pushvalue(L, c->keys + K_LSN);
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->lsn_ref);
  lua_rawset(L, ev);
  lua_pushvalue(L, c->keys + K_XID);
  lua_pushnumber(L, r->txn_xid);
  lua_rawset(L, ev);
  lua_pushvalue(L, c->keys + K_COMMIT_TIME);
  lua_pushnumber(L, (double)r->txn_time / 1e6 + PG_EPOCH_OFFSET_S);
  lua_rawset(L, ev);
  if (has_new) {
    lua_pushvalue(L, c->keys + K_NEW);
    push_row(c, rel, &m->newtup, m->old_kind == 'O' ? old : NULL, 0);
    lua_rawset(L, ev);
  }
  if (old) {
    lua_pushvalue(L, c->keys + K_OLD);
    push_row(c, rel, old, NULL, m->old_kind == 'K');
    lua_rawset(L, ev);
  }
  return call_dispatch(c, rel->relid);
}

static int emit_truncate(pump_ctx *c, const fl_pgo_msg *m) {
  lua_State *L = c->L;
  fl_repl *r = c->r;
  for (int i = 0; i < m->nrelids; i++) {
    const fl_pgo_relation *rel = fl_stream_relation(r->s, m->relids[i]);
    if (!rel) { r->txn_pos++; continue; }
    lua_pushvalue(L, c->dispatch);
    lua_createtable(L, 0, 7);
    lua_pushstring(L, "truncate");
    lua_setfield(L, -2, "op");
    push_event_id(L, r);
    lua_setfield(L, -2, "id");
    lua_pushfstring(L, "%s.%s", rel->nspname, rel->relname);
    lua_setfield(L, -2, "table");
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->lsn_ref);
    lua_setfield(L, -2, "lsn");
    lua_pushnumber(L, r->txn_xid);
    lua_setfield(L, -2, "xid");
    lua_pushnumber(L, (double)r->txn_time / 1e6 + PG_EPOCH_OFFSET_S);
    lua_setfield(L, -2, "commit_time");
    int rc = call_dispatch(c, rel->relid);
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

/* A logical message of the flashlua plugin (prefix "flashlua"). */
static int plugin_message(const fl_pgo_msg *m) {
  return m->type == FL_PGO_MESSAGE && m->prefix && strcmp(m->prefix, "flashlua") == 0;
}

/* Its 'L' messages are listener tags: kept for the change messages that follow (until the
 * next tag or the Commit). Returns 1 for a tag, 0 for anything else, -1 out of memory. */
static int keep_tag(fl_repl *r, const fl_pgo_msg *m) {
  if (!plugin_message(m) || m->content_len == 0 || m->content[0] != 'L') return 0;
  if (m->content_len > r->tag_cap) {
    char *t = realloc(r->tag, m->content_len);
    if (!t) return fl_stream_fail(r->s, "memory", "out of memory");
    r->tag = t;
    r->tag_cap = m->content_len;
  }
  memcpy(r->tag, m->content, m->content_len);
  r->tag_len = m->content_len;
  return 1;
}

/* A transaction ending at end_lsn has been delivered. In auto mode every callback of it
 * has returned: the binding confirms it to the stream. In manual mode the commit hook is
 * told, and the script's acknowledgements confirm (repl:confirm). */
static int handled(lua_State *L, fl_repl *r, uint64_t end_lsn) {
  if (!r->manual) return fl_stream_confirm(r->s, end_lsn);
  fl_stream_confirm_idle(r->s, 0);      /* until the script says all is acked (repl:confirm) */
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->commit_ref);
  lua_pushnumber(L, (double)end_lsn);
  if (lua_pcall(L, 1, 0, 0) != 0) {
    fl_stream_fail(r->s, "callback", "dispatch: on_commit: %s", lua_tostring(L, -1));
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
    fl_stream_fail(r->s, "callback", "dispatch: on_relation: %s", lua_tostring(L, -1));
    lua_pop(L, 1);
    return -1;
  }
  return 0;
}

/* A logical message (pg_logical_emit_message) with the hook's prefix: tells the hook, which
 * runs callbacks (a backfill chunk delivered at this position in the stream) and returns
 * false to stop. The flashlua plugin's listener tag is kept for the change message that
 * follows instead. Returns 0, 1 (stop requested) or -1. */
static int logical_message(lua_State *L, fl_repl *r, const fl_pgo_msg *m) {
  int tag = keep_tag(r, m);
  if (tag != 0) return tag < 0 ? -1 : 0;
  if (r->msghook_ref == LUA_NOREF || r->msghook_ref == LUA_REFNIL) return 0;
  if (!m->prefix || strcmp(m->prefix, r->msg_prefix) != 0) return 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->msghook_ref);
  lua_pushnumber(L, (double)m->lsn);
  lua_pushlstring(L, m->content, m->content_len);
  lua_pushboolean(L, m->flags & 1);
  return call_hook(L, r, 3, "dispatch: on_message: ");
}

/* The stream's consumer (fl_stream_fn): one decoded message, in stream order. */
static int on_stream_message(void *ud, fl_stream *s, const fl_pgo_msg *m) {
  pump_ctx *c = ud;
  lua_State *L = c->L;
  fl_repl *r = c->r;
  (void)s;
  /* Anything but a change: what the direct path added is told first (the commit hook, a
   * relation's hook and a logical message's callbacks come after those changes). */
  if (r->direct_pending && m->type != FL_PGO_INSERT && m->type != FL_PGO_UPDATE && m->type != FL_PGO_DELETE &&
      direct_sync(L, r) < 0)
    return -1;
  switch (m->type) {
    case FL_PGO_RELATION: return relation_hook(L, r, m->rel);
    case FL_PGO_MESSAGE:
      c->tag_ok = 0;                    /* it may be a new listener tag */
      return logical_message(L, r, m);
    case FL_PGO_BEGIN:
      r->tag_len = 0;
      set_txn(L, r, m->xid, m->lsn, m->timestamp);
      return 0;
    case FL_PGO_COMMIT:
      r->tag_len = 0;
      return handled(L, r, m->end_lsn);
    case FL_PGO_STREAM_COMMIT:
      r->tag_len = 0;
      return handled(L, r, m->end_lsn);
    case FL_PGO_INSERT: return emit_change(c, m, K_INSERT);
    case FL_PGO_UPDATE: return emit_change(c, m, K_UPDATE);
    case FL_PGO_DELETE: return emit_change(c, m, K_DELETE);
    case FL_PGO_TRUNCATE: return emit_truncate(c, m);
    default: return 0;
  }
}

/* After a message larger than FL_STREAM_LARGE: its memory goes back (fl_release_memory). */
static void on_stream_large(void *ud, size_t bytes) {
  (void)bytes;
  fl_release_memory(((pump_ctx *)ud)->L);
}

/* ------------------------------------------------------------------------------------ */
/* Lua API */

static void direct_free(lua_State *L, direct_t *d) {
  luaL_unref(L, LUA_REGISTRYINDEX, d->outbox_ref);
  free(d->table);
  for (int k = 0; k < d->nkeys; k++) free(d->keys[k]);
  memset(d, 0, sizeof *d);
}

static void direct_clear(lua_State *L, fl_repl *r) {
  for (int i = 0; i < r->ndirect; i++) direct_free(L, &r->direct[i]);
  r->ndirect = 0;
}

/* Closes the connection and lets go of the Lua side; the stream's counters stay for state(). */
static void repl_release(lua_State *L, fl_repl *r) {
  if (r->s) fl_stream_close(r->s);
  free(r->tag);
  r->tag = NULL;
  r->tag_len = r->tag_cap = 0;
  luaL_unref(L, LUA_REGISTRYINDEX, r->lsn_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, r->rels_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, r->masks_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, r->typemap_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, r->relhook_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, r->commit_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, r->msghook_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, r->keys_ref);
  direct_clear(L, r);
  free(r->direct);
  r->direct = NULL;
  luaL_unref(L, LUA_REGISTRYINDEX, r->direct_hook_ref);
  r->direct_hook_ref = LUA_NOREF;
  free(r->body.p);
  r->body.p = NULL;
  r->body.len = r->body.cap = 0;
  r->rels_gen++;
  r->keys_ref = LUA_NOREF;
  r->lsn_ref = r->rels_ref = r->masks_ref = r->typemap_ref = r->relhook_ref = r->commit_ref = r->msghook_ref =
    LUA_NOREF;
}

/* core.replication(dsn) -> repl | nil, err, kind : a replication=database connection whose
 * walsender prints values in the canonical text forms. */
static int l_replication(lua_State *L) {
  const char *dsn = luaL_optstring(L, 1, "");
  fl_repl *r = lua_newuserdata(L, sizeof *r);
  memset(r, 0, sizeof *r);
  r->keys_ref = LUA_NOREF;
  r->lsn_ref = r->rels_ref = r->masks_ref = r->typemap_ref = r->relhook_ref = r->commit_ref = r->msghook_ref =
    LUA_NOREF;
  r->direct_hook_ref = LUA_NOREF;
  luaL_getmetatable(L, REPL_MT);
  lua_setmetatable(L, -2);
  r->s = fl_stream_new();
  if (!r->s) return fl_fail(L, "out of memory", "memory");
  if (fl_stream_connect(r->s, dsn) != 0) return stream_fail(L, r);
  lua_pushstring(L, "");
  r->lsn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_newtable(L);
  r->rels_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_newtable(L);
  r->masks_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_newtable(L);
  r->typemap_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_createtable(L, K_COUNT, 0);
  for (int i = 0; i < K_COUNT; i++) {
    lua_pushstring(L, key_names[i]);
    lua_rawseti(L, -2, i + 1);
  }
  r->keys_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 1;
}

static int l_close(lua_State *L) {
  repl_release(L, luaL_checkudata(L, 1, REPL_MT));
  return 0;
}

static int l_gc(lua_State *L) {
  fl_repl *r = luaL_checkudata(L, 1, REPL_MT);
  repl_release(L, r);
  fl_stream_free(r->s);
  r->s = NULL;
  return 0;
}

/* A command's result as rows of text values (NULL: the null sentinel); res stays the
 * stream's, so an error raised while converting leaks nothing. */
static int push_rows(lua_State *L, const PGresult *res) {
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
  return 1;
}

/* repl:exec(command) -> rows (text values) | nil, err, kind : replication commands
 * (IDENTIFY_SYSTEM, CREATE_REPLICATION_SLOT, ...) before streaming starts. */
static int l_exec(lua_State *L) {
  fl_repl *r = check_repl(L, 1);
  const PGresult *res = fl_stream_exec(r->s, luaL_checkstring(L, 2));
  if (!res) return stream_fail(L, r);
  return push_rows(L, res);
}

/* repl:send(command) -> true | nil, err, kind : a replication command sent without waiting
 * for its result (CREATE_REPLICATION_SLOT may wait for running transactions);
 * repl:result() reads it once it has come. */
static int l_send(lua_State *L) {
  fl_repl *r = check_repl(L, 1);
  const char *sql = luaL_checkstring(L, 2);
  fl_stream_state st;
  fl_stream_get_state(r->s, &st);
  if (st.copying) return luaL_error(L, "replication already started");
  if (fl_stream_send(r->s, sql) != 0) return stream_fail(L, r);
  lua_pushboolean(L, 1);
  return 1;
}

/* repl:cancel() -> true | nil, err : asks the server to cancel repl:send's command. */
static int l_cancel(lua_State *L) {
  fl_repl *r = check_repl(L, 1);
  char err[256] = "";
  if (fl_stream_cancel(r->s, err, sizeof err) != 0) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* repl:result() -> rows | false (not there yet) | nil, err, kind : the result of
 * repl:send's command, without blocking while it runs. */
static int l_result(lua_State *L) {
  fl_repl *r = check_repl(L, 1);
  const PGresult *res = NULL;
  int got = fl_stream_result(r->s, &res);
  if (got < 0) return stream_fail(L, r);
  if (got == 0) { lua_pushboolean(L, 0); return 1; }
  return push_rows(L, res);
}

static int parse_lsn(const char *s, uint64_t *out) {
  unsigned hi, lo;
  if (sscanf(s, "%X/%X", &hi, &lo) != 2) return -1;
  *out = ((uint64_t)hi << 32) | lo;
  return 0;
}

/* core.lsn("X/Y") -> number | nil, err, "usage" ; core.lsn(number) -> "X/Y" */
static int l_lsn(lua_State *L) {
  if (lua_type(L, 1) == LUA_TNUMBER) {
    push_lsn(L, (uint64_t)lua_tonumber(L, 1));
    return 1;
  }
  uint64_t v;
  if (parse_lsn(luaL_checkstring(L, 1), &v) != 0) return fl_fail(L, "malformed LSN (expected X/Y in hex)", "usage");
  lua_pushnumber(L, (double)v);
  return 1;
}

/* repl:start(command, proto_version) -> true | nil, err, kind
 * command: the whole START_REPLICATION statement (built and quoted by the caller). */
static int l_start(lua_State *L) {
  fl_repl *r = check_repl(L, 1);
  const char *cmd = luaL_checkstring(L, 2);
  int proto = (int)luaL_optinteger(L, 3, 1);
  fl_stream_state st;
  fl_stream_get_state(r->s, &st);
  if (st.copying) return luaL_error(L, "replication already started");
  if (fl_stream_start(r->s, cmd, proto) != 0) return stream_fail(L, r);
  lua_pushboolean(L, 1);
  return 1;
}

/* repl:status([reply_requested]) -> true | nil, err, kind : report what was confirmed now. */
static int l_status(lua_State *L) {
  fl_repl *r = check_repl(L, 1);
  if (fl_stream_status(r->s, lua_toboolean(L, 2)) != 0) return stream_fail(L, r);
  lua_pushboolean(L, 1);
  return 1;
}

/* repl:pump(dispatch, [flags], [budget], [seconds], [txn_end]) -> more | nil, err, kind
 * Handles what has arrived, calling dispatch(ev) for each change; dispatch returning false
 * stops (the transaction is then not confirmed; kind "stopped"); an error of a hook or of
 * dispatch has kind "callback". Returns true when the budget of messages or of time
 * (seconds > 0: checked after each message) ran out, so more may be waiting, false when
 * the socket is drained. The time budget lets a caller whose callbacks are slower than the
 * writers give timers and signals a turn. txn_end: return once no transaction is open (a
 * stop finishing the one it interrupted reads no further). */
static int l_pump(lua_State *L) {
  fl_repl *r = check_repl(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  pump_ctx c = { .L = L, .r = r, .dispatch = 2, .flags = (int)luaL_optinteger(L, 3, 0) };
  long budget = (long)luaL_optinteger(L, 4, 100000);
  double seconds = luaL_optnumber(L, 5, 0);
  int64_t until = seconds > 0 ? fl_stream_now_us() + (int64_t)(seconds * 1e6) : 0;
  int txn_end = lua_toboolean(L, 6);
  lua_settop(L, 2);
  luaL_checkstack(L, K_COUNT + 30, "pump");
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->keys_ref);
  c.keys = lua_gettop(L) + 1;
  for (int i = 0; i < K_COUNT; i++) lua_rawgeti(L, 3, i + 1);
  lua_pushnil(L);
  c.ent = lua_gettop(L);
  lua_pushnil(L);
  c.tag = lua_gettop(L);
  lua_pushnil(L);
  lua_pushnil(L);
  lua_pushnil(L);
  c.markers_slot = lua_gettop(L) - 2;
  int rc = fl_stream_pump(r->s, budget, until, txn_end, on_stream_message, on_stream_large, &c);
  /* What went into a sink's outbox is the sink's to count, whatever else happened. */
  if (r->direct_pending && direct_sync(L, r) < 0 && rc >= 0) rc = -1;
  if (rc == -1) return stream_fail(L, r);
  if (rc == -2) return fl_fail(L, "stopped by a callback", "stopped");
  lua_pushboolean(L, rc);
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
  r->rels_gen++;
  return 0;
}

/* repl:columns(relid, {names} | nil): converts only these columns of relation relid's rows
 * (nil: every column, as without a mask); repl:columns(nil): every column of every
 * relation. The driver decides (what its listeners need); the mask holds until changed,
 * across the relation's DDL (by name). */
static int l_columns(lua_State *L) {
  fl_repl *r = luaL_checkudata(L, 1, REPL_MT);
  if (r->masks_ref == LUA_NOREF) return 0;          /* closed: nothing is converted any more */
  if (lua_isnoneornil(L, 2)) {
    lua_newtable(L);
    lua_rawseti(L, LUA_REGISTRYINDEX, r->masks_ref);
    lua_newtable(L);
    lua_rawseti(L, LUA_REGISTRYINDEX, r->rels_ref);
    r->rels_gen++;
    return 0;
  }
  int relid = (int)(uint32_t)luaL_checknumber(L, 2);
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->masks_ref);
  if (lua_isnoneornil(L, 3)) {
    lua_pushnil(L);
  } else {
    luaL_checktype(L, 3, LUA_TTABLE);
    int n = (int)lua_objlen(L, 3);
    lua_createtable(L, 0, n);
    for (int i = 1; i <= n; i++) {
      lua_rawgeti(L, 3, i);
      if (lua_type(L, -1) != LUA_TSTRING) luaL_argerror(L, 3, "list of column names expected");
      lua_pushboolean(L, 1);
      lua_rawset(L, -3);
    }
  }
  lua_rawseti(L, -2, relid);
  /* Its entry is rebuilt with the new mask on the next row. */
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->rels_ref);
  lua_pushnil(L);
  lua_rawseti(L, -2, relid);
  r->rels_gen++;
  return 0;
}

/* repl:due() -> monotonic seconds (core.now's clock) when the next status update is due:
 * confirmed transactions waiting to be reported, or the periodic one. */
static int l_due(lua_State *L) {
  fl_repl *r = check_repl(L, 1);
  lua_pushnumber(L, (double)fl_stream_due(r->s) / 1e6);
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
/* repl:direct(relid, id, outbox, table, { key columns }): relid's changes go straight into
 * outbox (the direct path, above); id names it to on_direct, table is ev.table.
 * repl:direct(relid): they go the Lua way again. repl:direct(): all of them do. What was
 * added directly is told (on_direct) before the list changes. */
static int l_direct(lua_State *L) {
  fl_repl *r = check_repl(L, 1);
  if (r->direct_syncing) return luaL_error(L, "repl:direct: not from on_direct");
  if (r->direct_pending && direct_sync(L, r) < 0) return stream_fail(L, r);
  if (lua_isnoneornil(L, 2)) {
    direct_clear(L, r);
    return 0;
  }
  uint32_t relid = (uint32_t)luaL_checknumber(L, 2);
  direct_t *d = find_direct(r, relid);
  if (d) {
    direct_free(L, d);
    *d = r->direct[--r->ndirect];
  }
  if (lua_isnoneornil(L, 3)) return 0;
  uint32_t id = (uint32_t)luaL_checknumber(L, 3);
  fl_outbox *o = fl_outbox_check(L, 4);
  size_t tlen;
  const char *table = luaL_checklstring(L, 5, &tlen);
  luaL_checktype(L, 6, LUA_TTABLE);
  int nkeys = (int)lua_objlen(L, 6);
  if (nkeys > DIRECT_MAX_KEYS) return 0;   /* that many key columns: the Lua way */
  for (int k = 0; k < nkeys; k++) {
    lua_rawgeti(L, 6, k + 1);
    if (lua_type(L, -1) != LUA_TSTRING) return luaL_error(L, "repl:direct: key column %d is not a string", k + 1);
    lua_pop(L, 1);
  }
  direct_t *list = realloc(r->direct, sizeof *list * (size_t)(r->ndirect + 1));
  if (!list) return luaL_error(L, "repl:direct: out of memory");
  r->direct = list;
  direct_t nd;
  memset(&nd, 0, sizeof nd);
  nd.relid = relid;
  nd.id = id;
  nd.o = o;
  nd.table = malloc(tlen + 1);
  int ok = nd.table != NULL;
  if (ok) {
    memcpy(nd.table, table, tlen + 1);
    nd.table_len = tlen;
  }
  for (int k = 0; ok && k < nkeys; k++) {
    lua_rawgeti(L, 6, k + 1);
    nd.keys[k] = strdup(lua_tostring(L, -1));
    lua_pop(L, 1);
    ok = nd.keys[k] != NULL;
    nd.nkeys = k + 1;
  }
  if (!ok) {
    nd.outbox_ref = LUA_NOREF;
    direct_free(L, &nd);
    return luaL_error(L, "repl:direct: out of memory");
  }
  lua_pushvalue(L, 4);
  nd.outbox_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  list[r->ndirect++] = nd;
  return 0;
}

/* repl:on_direct(fn): fn(id, inserts, updates, deletes, commit_time) after changes of
 * relation `id` went into its outbox directly (repl:direct). */
static int l_on_direct(lua_State *L) {
  fl_repl *r = check_repl(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  set_hook(L, &r->direct_hook_ref, 2);
  return 0;
}

static int l_manual(lua_State *L) {
  fl_repl *r = check_repl(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  set_hook(L, &r->commit_ref, 2);
  r->manual = 1;
  fl_stream_confirm_idle(r->s, 1);
  return 0;
}

/* repl:confirm(lsn, all_acked) -> true | nil, err, kind : manual mode: everything before
 * lsn is acknowledged (confirmed in the next status update); all_acked: nothing delivered
 * is waiting, so an idle stream's keepalives may move the position on. */
static int l_confirm(lua_State *L) {
  fl_repl *r = check_repl(L, 1);
  lua_Number lsn = luaL_checknumber(L, 2);
  fl_stream_confirm_idle(r->s, lua_toboolean(L, 3));
  if (lsn > 0 && fl_stream_confirm(r->s, (uint64_t)lsn) != 0) return stream_fail(L, r);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_fd(lua_State *L) {
  lua_pushinteger(L, fl_stream_socket(check_repl(L, 1)->s));
  return 1;
}

/* The fields of repl:state(), in the order of push_state_field's cases. */
static const char *const state_fields[] = {
  "received", "flushed", "delivered", "confirmed", "server_end", "in_txn", "events", "values", "messages",
  "bytes", "largest_message", "streams_open", "stream_buffered", "stream_buffered_peak", "stream_spilled",
  "copying", "keeper_updates", "passed", NULL
};

static void push_state_field(lua_State *L, const fl_repl *r, const fl_stream_state *st, int i) {
  switch (i) {
    case 0: lua_pushnumber(L, (double)st->received); break;
    case 1: lua_pushnumber(L, (double)st->flushed); break;
    case 2: lua_pushnumber(L, (double)st->delivered); break;
    case 3: lua_pushnumber(L, (double)st->confirmed); break;
    case 4: lua_pushnumber(L, (double)st->server_end); break;
    case 5: lua_pushboolean(L, st->in_txn); break;
    case 6: lua_pushnumber(L, (double)r->events); break;
    case 7: lua_pushnumber(L, (double)r->values); break;
    case 8: lua_pushnumber(L, (double)st->messages); break;
    case 9: lua_pushnumber(L, (double)st->bytes); break;
    case 10: lua_pushnumber(L, (double)st->largest); break;
    case 11: lua_pushboolean(L, st->streams_open); break;
    case 12: lua_pushnumber(L, (double)st->stream_buffered); break;
    case 13: lua_pushnumber(L, (double)st->stream_buffered_peak); break;
    case 14: lua_pushnumber(L, (double)st->stream_spilled); break;
    case 15: lua_pushboolean(L, st->copying); break;
    case 16: lua_pushnumber(L, (double)st->keeper_updates); break;
    default: lua_pushnumber(L, (double)st->passed); break;
  }
}

/* repl:state() -> { received=, flushed=, server_end=, in_txn=, events=, ... } (LSNs as numbers);
 * repl:state(field) -> that field alone, for a driver that asks once per loop step (no
 * table of 16 fields built to read one). */
static int l_state(lua_State *L) {
  fl_repl *r = luaL_checkudata(L, 1, REPL_MT);
  fl_stream_state st;
  memset(&st, 0, sizeof st);
  if (r->s) fl_stream_get_state(r->s, &st);
  if (!lua_isnoneornil(L, 2)) {
    push_state_field(L, r, &st, luaL_checkoption(L, 2, NULL, state_fields));
    return 1;
  }
  lua_createtable(L, 0, 17);
  for (int i = 0; state_fields[i]; i++) {
    push_state_field(L, r, &st, i);
    lua_setfield(L, -2, state_fields[i]);
  }
  return 1;
}

/* repl:set_stream_limit(bytes): the memory bound of buffered streamed changes. */
static int l_set_stream_limit(lua_State *L) {
  fl_repl *r = luaL_checkudata(L, 1, REPL_MT);
  lua_Number n = luaL_checknumber(L, 2);
  if (r->s) fl_stream_set_spill_limit(r->s, n < 1024 ? 1024 : (size_t)n);
  return 0;
}

/* repl:finish([timeout_s]) : a last status update with what was confirmed, then the end
 * of the copy; waits (up to timeout_s, default 10) for the server to end it too, so the
 * last confirmation has been applied before the connection goes. Changes still in flight
 * are discarded: unconfirmed, they are sent again next time. */
static int l_finish(lua_State *L) {
  fl_repl *r = luaL_checkudata(L, 1, REPL_MT);
  double timeout = luaL_optnumber(L, 2, 10);
  if (r->s) fl_stream_finish(r->s, timeout);
  repl_release(L, r);
  return 0;
}

static const luaL_Reg repl_methods[] = {
  { "exec", l_exec },
  { "send", l_send },
  { "result", l_result },
  { "start", l_start },
  { "pump", l_pump },
  { "status", l_status },
  { "types", l_types },
  { "columns", l_columns },
  { "fd", l_fd },
  { "cancel", l_cancel },
  { "due", l_due },
  { "on_relation", l_on_relation },
  { "manual", l_manual },
  { "direct", l_direct },
  { "on_direct", l_on_direct },
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
  lua_pushcfunction(L, l_gc);
  lua_setfield(L, -2, "__gc");
  lua_newtable(L);
  luaL_register(L, NULL, repl_methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
}
