/* lvalue: turns a PostgreSQL text value into the Lua value API.md's type table promises,
 * and Lua values into JSON (flash.json). The parsing and formatting live in
 * fl_json/fl_value (pure C); this file only walks and builds Lua values. */
#include <stdlib.h>
#include <string.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <lua.h>
#include <lauxlib.h>
#include "fl_binary.h"
#include "fl_json.h"
#include "fl_value.h"
#include "lerr.h"
#include "lvalue.h"

char fl_unchanged_sentinel;

/* Registry keys of the metatables that mark what a Lua table cannot say by itself: a SQL
 * or JSON array (flash.array_mt, so an empty one stays an array), a JSON object
 * (flash.object_mt) and a JSON number no double holds (flash.number_mt, { text = "..." }).
 * The tables are made here; lua/flash/json.lua gives number_mt its metamethods. */
static char array_mt_key, object_mt_key, number_mt_key;

static void push_mt(lua_State *L, void *key) {
  lua_pushlightuserdata(L, key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushlightuserdata(L, key);
    lua_pushvalue(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
  }
}

/* Sets the metatable `key` on the table on top of the stack. */
static void mark(lua_State *L, void *key) {
  push_mt(L, key);
  lua_setmetatable(L, -2);
}

/* Inputs up to this size are unescaped on the C stack; longer ones into a Lua userdata,
 * so that a Lua error (out of memory) thrown half-way leaks nothing: the collector owns
 * the scratch, and no malloc'd block is ever held across a lua_* call. */
#define SCRATCH_STACK 256

/* Beyond 2^53 a double no longer holds every integer, so the text is the exact value. */
#define EXACT_INT_MAX 9007199254740992LL

static char *scratch(lua_State *L, char *stackbuf, size_t need) {
  if (need <= SCRATCH_STACK) return stackbuf;
  return (char *)lua_newuserdata(L, need);
}

/* Drops the scratch userdata (if one was made) that sits just below the pushed result. */
static void drop_scratch(lua_State *L, const char *stackbuf, const char *buf) {
  if (buf != stackbuf) lua_remove(L, -2);
}

/* fl_parse_double refuses text longer than its stack copy; numeric (with numeric =
 * "number") can be far longer, so long text is copied into a userdata. Only
 * decimal characters get that far, so strtod cannot meet "nan(...)" or hex there, and
 * whatever it leaves unconsumed makes the text a string instead. */
static int to_number(lua_State *L, const char *s, size_t len, lua_Number *out) {
  char *tmp;
  size_t i;
  double d;
  if (len <= 512) {
    if (fl_parse_double(s, len, &d) != 0) return -1;
    *out = (lua_Number)d;
    return 0;
  }
  for (i = 0; i < len; i++) {
    char c = s[i];
    if (!((c >= '0' && c <= '9') || c == '.' || c == '-' || c == '+' || c == 'e' || c == 'E'))
      return -1;
  }
  tmp = (char *)lua_newuserdata(L, len + 1);
  memcpy(tmp, s, len);
  tmp[len] = '\0';
  int rc = fl_strtod_copy(tmp, len, &d);
  lua_pop(L, 1);
  if (rc != 0) return -1;
  *out = (lua_Number)d;
  return 0;
}

/* Stores the value on top into the container below it (array slot or object key). */
static void store(lua_State *L, fl_json_reader *r, int *idx) {
  if (r->stack[r->depth - 1] == 'a') lua_rawseti(L, -2, ++idx[r->depth - 1]);
  else lua_rawset(L, -3);
}

/* A JSON number: a Lua number when the double prints back as the same value, else
 * { text = "<the number as written>" } with flash.number_mt, so no digit is lost. */
static int push_json_number(lua_State *L, const char *v, size_t n, int number_mt) {
  double d;
  int rc = fl_json_number(v, n, &d);
  if (rc < 0) return -1;
  if (rc == 1) {
    lua_pushnumber(L, (lua_Number)d);
    return 0;
  }
  lua_createtable(L, 0, 1);
  lua_pushlstring(L, v, n);
  lua_setfield(L, -2, "text");
  lua_pushvalue(L, number_mt);
  lua_setmetatable(L, -2);
  return 0;
}

int fl_push_json(lua_State *L, const char *s, size_t len) {
  return fl_push_json_err(L, s, len, NULL, NULL);
}

int fl_push_json_err(lua_State *L, const char *s, size_t len, const char **err, size_t *pos) {
  /* Iterative, not recursive: each open container keeps its table (and, for objects, the
   * pending key) on the Lua stack, so depth 1000 needs ~2000 slots, checked per level. */
  fl_json_reader r;
  int idx[FL_JSON_MAX_DEPTH];
  char stackbuf[SCRATCH_STACK], *buf;
  int base = lua_gettop(L);
  /* The three markers sit just above base for the whole walk (a registry lookup per
   * container would cost more), then the scratch userdata if one is needed. */
  int array_mt = base + 1, object_mt = base + 2, number_mt = base + 3;
  if (!lua_checkstack(L, 12)) return -1;
  push_mt(L, &array_mt_key);
  push_mt(L, &object_mt_key);
  push_mt(L, &number_mt_key);
  buf = scratch(L, stackbuf, len);
  fl_json_init(&r, s, len, buf);
  for (;;) {
    const char *v;
    size_t n;
    fl_json_tok t = fl_json_next(&r, &v, &n);
    switch (t) {
    case FL_JSON_OBJ_OPEN:
    case FL_JSON_ARR_OPEN:
      if (!lua_checkstack(L, 8)) {
        r.err = "nesting too deep for the Lua stack";
        r.pos = (size_t)(r.p - r.s);
        goto bad;
      }
      if (t == FL_JSON_ARR_OPEN) {
        lua_createtable(L, 4, 0);
        lua_pushvalue(L, array_mt);
        idx[r.depth - 1] = 0;
      } else {
        lua_createtable(L, 0, 4);
        lua_pushvalue(L, object_mt);
      }
      lua_setmetatable(L, -2);
      continue;
    case FL_JSON_OBJ_CLOSE:
    case FL_JSON_ARR_CLOSE:
      if (r.depth > 0) store(L, &r, idx);
      continue;
    case FL_JSON_KEY:
      lua_pushlstring(L, v, n);
      continue;
    case FL_JSON_STRING: lua_pushlstring(L, v, n); break;
    case FL_JSON_NUMBER:
      if (push_json_number(L, v, n, number_mt) != 0) goto bad;
      break;
    case FL_JSON_TRUE: lua_pushboolean(L, 1); break;
    case FL_JSON_FALSE: lua_pushboolean(L, 0); break;
    case FL_JSON_NULL: lua_pushlightuserdata(L, FL_NULL); break;
    case FL_JSON_END:
      /* The value replaces the markers and the scratch. */
      lua_replace(L, base + 1);
      lua_settop(L, base + 1);
      return 0;
    default:
      goto bad;
    }
    if (r.depth > 0) store(L, &r, idx);
  }
bad:
  if (err) *err = r.err ? r.err : "invalid JSON";
  if (pos) *pos = r.pos;
  lua_settop(L, base);
  return -1;
}

static void push_array(lua_State *L, const fl_coltype *t, const char *s, size_t len, int flags) {
  fl_arr_reader r;
  fl_coltype et;
  /* The reader caps dimensions at PostgreSQL's 6, so this C array is enough. */
  int idx[8];
  char stackbuf[SCRATCH_STACK], *buf;
  int base = lua_gettop(L);
  et.oid = t->elem;
  et.elem = 0;
  et.delim = ',';
  flags &= ~FL_STACK_READY;            /* each element checks: the nesting uses slots */
  buf = scratch(L, stackbuf, len);
  fl_arr_init(&r, s, len, t->delim ? t->delim : ',', buf);
  for (;;) {
    const char *v;
    size_t n;
    switch (fl_arr_next(&r, &v, &n)) {
    case FL_ARR_OPEN:
      if (!lua_checkstack(L, 6) || r.depth > (int)(sizeof idx / sizeof idx[0])) goto bad;
      lua_createtable(L, 4, 0);
      mark(L, &array_mt_key);
      idx[r.depth - 1] = 0;
      continue;
    case FL_ARR_CLOSE:
      if (r.depth == 0) continue;
      break;
    case FL_ARR_NULL: lua_pushlightuserdata(L, FL_NULL); break;
    case FL_ARR_ELEM:
      /* v points into buf, which stays alive (stack frame or userdata on the Lua stack)
       * for the duration of the element's own decoding. */
      fl_push_value(L, &et, v, n, flags);
      break;
    case FL_ARR_END:
      drop_scratch(L, stackbuf, buf);
      return;
    default:
      goto bad;
    }
    lua_rawseti(L, -2, ++idx[r.depth - 1]);
  }
bad:
  lua_settop(L, base);
  lua_pushlstring(L, s, len);
}

static void push_bytea(lua_State *L, const char *s, size_t len) {
  char stackbuf[SCRATCH_STACK], *buf = scratch(L, stackbuf, len);
  long n = fl_bytea_decode(s, len, buf);
  if (n < 0) lua_pushlstring(L, s, len);
  else lua_pushlstring(L, buf, (size_t)n);
  drop_scratch(L, stackbuf, buf);
}

/* A value whose text the caller owns and never reads again: a bytea is decoded over its
 * own text, so a large one costs one copy (the Lua string), not two. */
void fl_push_value_owned(lua_State *L, const fl_coltype *t, char *s, size_t len, int flags) {
  if (s != NULL && t->elem == 0 && t->oid == FL_BYTEAOID) {
    long n = fl_bytea_decode_inplace(s, len);
    if (n >= 0) {
      lua_pushlstring(L, s, (size_t)n);
      return;
    }
  }
  fl_push_value(L, t, s, len, flags);
}

/* After a large value: a full collection frees the strings of events nobody keeps, and
 * glibc is asked to give back the free heap it holds (blocks of 128 kB to 32 MB can come
 * from the heap, which glibc keeps unless trimmed). */
void fl_release_memory(lua_State *L) {
  lua_gc(L, LUA_GCCOLLECT, 0);
#ifdef __GLIBC__
  malloc_trim(0);
#endif
}

static void push_number_or_text(lua_State *L, const char *s, size_t len) {
  lua_Number d;
  if (to_number(L, s, len, &d) == 0) lua_pushnumber(L, d);
  else lua_pushlstring(L, s, len);
}

/* The scalar rule of API.md's type table, without Lua: what the text s of a value of type
 * t becomes (FL_VAL_*), its number in *num. FL_VAL_OTHER: not a scalar this decides
 * (arrays, JSON, bytea, a number's text longer than 512 bytes): fl_push_value does it. */
static inline int scalar_kind(const fl_coltype *t, const char *s, size_t len, int flags, double *num) {
  int64_t i;
  if (s == NULL) return FL_VAL_NULL;
  if (t->elem != 0) return FL_VAL_OTHER;
  switch (t->oid) {
  case FL_BOOLOID:
    /* 't'/'f' from the server; "true"/"false" from row_to_json in trigger payloads. */
    if ((len == 1 && s[0] == 't') || (len == 4 && memcmp(s, "true", 4) == 0)) return FL_VAL_TRUE;
    if ((len == 1 && s[0] == 'f') || (len == 5 && memcmp(s, "false", 5) == 0)) return FL_VAL_FALSE;
    return FL_VAL_STRING;
  case FL_INT2OID:
  case FL_INT4OID:
  case FL_OIDOID:
    if (fl_parse_int64(s, len, &i) == 0) { *num = (double)i; return FL_VAL_NUMBER; }
    break;
  case FL_FLOAT4OID:
  case FL_FLOAT8OID:
    break;
  case FL_INT8OID:
    if (fl_parse_int64(s, len, &i) == 0 && i >= -EXACT_INT_MAX && i <= EXACT_INT_MAX) {
      *num = (double)i;
      return FL_VAL_NUMBER;
    }
    return FL_VAL_STRING;
  case FL_NUMERICOID:
    if (flags & FL_NUMERIC_AS_NUMBER) break;
    return FL_VAL_STRING;
  case FL_JSONOID:
  case FL_JSONBOID:
  case FL_BYTEAOID:
    return FL_VAL_OTHER;
  default:
    return FL_VAL_STRING;
  }
  /* A number, or its text when it is none (to_number; past 512 bytes, push_number_or_text). */
  if (len > 512) return FL_VAL_OTHER;
  return fl_parse_double(s, len, num) == 0 ? FL_VAL_NUMBER : FL_VAL_STRING;
}

int fl_value_scalar(const fl_coltype *t, const char *s, size_t len, int flags, double *num) {
  return scalar_kind(t, s, len, flags, num);
}

void fl_push_value(lua_State *L, const fl_coltype *t, const char *s, size_t len, int flags) {
  double d;
  /* The scratch, the value and a temporary; a caller deep in nested arrays may have
   * used up the 20 slots Lua guarantees. */
  if (!(flags & FL_STACK_READY)) luaL_checkstack(L, FL_VALUE_SLOTS, "decoding a column value");
  switch (scalar_kind(t, s, len, flags, &d)) {
  case FL_VAL_NULL: lua_pushlightuserdata(L, FL_NULL); return;
  case FL_VAL_NUMBER: lua_pushnumber(L, (lua_Number)d); return;
  case FL_VAL_STRING: lua_pushlstring(L, s, len); return;
  case FL_VAL_TRUE: lua_pushboolean(L, 1); return;
  case FL_VAL_FALSE: lua_pushboolean(L, 0); return;
  default: break;
  }
  if (t->elem != 0) {
    push_array(L, t, s, len, flags);
    return;
  }
  switch (t->oid) {
  case FL_JSONOID:
  case FL_JSONBOID:
    if (fl_push_json(L, s, len) != 0) lua_pushlstring(L, s, len);
    return;
  case FL_BYTEAOID:
    push_bytea(L, s, len);
    return;
  default:
    push_number_or_text(L, s, len);
    return;
  }
}

/* ---- binary send forms (fl_binary) ---- */

/* One scalar's send form as the Lua value its text gives; 0, or -1 with nothing pushed
 * when fl_binary cannot read it exactly. */
static int push_binary_scalar(lua_State *L, uint32_t oid, const char *s, size_t len, int flags) {
  char stackbuf[SCRATCH_STACK], *buf;
  size_t need = fl_bin_text_size(oid, s, len);
  fl_bin_value v;
  buf = scratch(L, stackbuf, need);
  if (fl_bin_scalar(oid, s, len, buf, need, &v) != 0) {
    if (buf != stackbuf) lua_pop(L, 1);
    return -1;
  }
  switch (v.kind) {
  case FL_BIN_BOOL: lua_pushboolean(L, (int)v.i); break;
  case FL_BIN_INT:
    if (v.i >= -EXACT_INT_MAX && v.i <= EXACT_INT_MAX) {
      lua_pushnumber(L, (lua_Number)v.i);
    } else {
      char t[24];
      int n = snprintf(t, sizeof t, "%lld", (long long)v.i);
      lua_pushlstring(L, t, (size_t)n);
    }
    break;
  case FL_BIN_FLOAT: lua_pushnumber(L, v.d); break;
  case FL_BIN_TEXT:
    if (oid == FL_NUMERICOID && (flags & FL_NUMERIC_AS_NUMBER)) push_number_or_text(L, v.s, v.len);
    else lua_pushlstring(L, v.s, v.len);
    break;
  case FL_BIN_JSON:
    if (fl_push_json(L, v.s, v.len) != 0) lua_pushlstring(L, v.s, v.len);
    break;
  default: lua_pushlstring(L, v.s, v.len); break;
  }
  drop_scratch(L, stackbuf, buf);
  return 0;
}

/* Elements of dimension `dim` onwards as nested Lua arrays, as push_array builds them
 * from the text. -1 (stack as it was) on malformed input. */
static int push_binary_dim(lua_State *L, fl_bin_arr *a, int dim, uint32_t elem, int flags) {
  int n = a->dims[dim];
  if (!lua_checkstack(L, 6)) return -1;
  lua_createtable(L, n, 0);
  mark(L, &array_mt_key);
  for (int i = 1; i <= n; i++) {
    if (dim + 1 < a->ndim) {
      if (push_binary_dim(L, a, dim + 1, elem, flags) != 0) goto bad;
    } else {
      const char *v;
      size_t len;
      switch (fl_bin_arr_next(a, &v, &len)) {
      case FL_BIN_ARR_NULL: lua_pushlightuserdata(L, FL_NULL); break;
      case FL_BIN_ARR_ELEM:
        if (push_binary_scalar(L, elem, v, len, flags) != 0) goto bad;
        break;
      default: goto bad;
      }
    }
    lua_rawseti(L, -2, i);
  }
  return 0;
bad:
  lua_pop(L, 1);
  return -1;
}

int fl_binary_supported(const fl_coltype *t) {
  return fl_bin_supported(t->elem != 0 ? t->elem : t->oid);
}

int fl_push_value_binary(lua_State *L, const fl_coltype *t, const char *s, size_t len, int flags) {
  if (!(flags & FL_STACK_READY)) luaL_checkstack(L, FL_VALUE_SLOTS, "decoding a column value");
  if (s == NULL) {
    lua_pushlightuserdata(L, FL_NULL);
    return 0;
  }
  if (t->elem != 0 && fl_bin_supported(t->elem)) {
    fl_bin_arr a;
    int empty = 0;
    if (fl_bin_arr_init(&a, s, len) == 0) {
      for (int i = 0; i < a.ndim; i++) empty |= a.dims[i] == 0;
      if (a.ndim == 0 || empty) {
        /* '{}' in text, however many dimensions of size 0 the send form names */
        const char *v;
        size_t n;
        if (fl_bin_arr_next(&a, &v, &n) == FL_BIN_ARR_END) {
          lua_createtable(L, 0, 0);
          mark(L, &array_mt_key);
          return 0;
        }
      } else if (push_binary_dim(L, &a, 0, t->elem, flags) == 0) {
        const char *v;
        size_t n;
        if (fl_bin_arr_next(&a, &v, &n) == FL_BIN_ARR_END) return 0;
        lua_pop(L, 1);
      }
    }
  } else if (t->elem == 0 && push_binary_scalar(L, t->oid, s, len, flags) == 0) {
    return 0;
  }
  lua_pushlstring(L, s, len);
  return -1;
}

/* ---- JSON encoding ----
 * The inverse of fl_push_json, for scripts (flash.json.encode) and the --table output: the
 * markers decide array or object, exact numbers are written as their text, doubles in
 * their shortest round-trip form. The output grows in a userdata at a fixed stack slot
 * (replaced when it grows), never in malloc'd memory: an error raised half-way (a
 * function in a table, out of memory) leaves the collector to free it. luaL_Buffer cannot
 * be used: it needs the stack top to itself, and the walk keeps tables and keys there. */

typedef struct {
  lua_State *L;
  int slot;             /* stack index of the output userdata; 0: the output is jb's */
  fl_jbuf *jb;          /* a C caller's buffer (fl_json_put), grown with realloc */
  char *p;
  size_t len, cap;
  int array_mt, object_mt, number_mt;  /* stack indexes of the marker metatables */
  const char *unchanged;  /* what flash.unchanged becomes (a JSON string), or NULL: an error */
  size_t unchanged_len;
} fl_enc;

static char *enc_room(fl_enc *e, size_t n) {
  if (e->cap - e->len < n) {
    size_t cap = e->cap * 2;
    char *np;
    if (cap - e->len < n) cap = e->len + n;
    if (e->slot == 0) {
      /* The caller's buffer: it holds the new block at once, so an error raised later
       * leaves it owning what was allocated. */
      np = (char *)realloc(e->p, cap);
      if (!np) luaL_error(e->L, "cannot encode JSON: out of memory");
      e->jb->p = np;
      e->jb->cap = cap;
    } else {
      np = (char *)lua_newuserdata(e->L, cap);
      memcpy(np, e->p, e->len);
      lua_replace(e->L, e->slot);
    }
    e->p = np;
    e->cap = cap;
  }
  return e->p + e->len;
}

static void enc_add(fl_enc *e, const char *s, size_t n) {
  memcpy(enc_room(e, n), s, n);
  e->len += n;
}

static void enc_string(fl_enc *e, const char *s, size_t n) {
  if (n <= 4096) {
    /* Most strings (keys, short values): one room check for the whole of it. */
    char *w = enc_room(e, 6 * n + 2);
    *w++ = '"';
    w += fl_json_escape(s, n, w);
    *w++ = '"';
    e->len = (size_t)(w - e->p);
    return;
  }
  /* Escaped in chunks so that the room asked for stays small on long strings. */
  enc_add(e, "\"", 1);
  while (n > 0) {
    size_t chunk = fl_json_piece(s, n, 4096);
    e->len += fl_json_escape(s, chunk, enc_room(e, 6 * chunk));
    s += chunk;
    n -= chunk;
  }
  enc_add(e, "\"", 1);
}

static void enc_number(fl_enc *e, lua_Number d) {
  char buf[FL_JSON_NUM_MAX];
  size_t n = fl_json_format_double((double)d, buf);
  if (n > 0) {
    enc_add(e, buf, n);
    return;
  }
  /* JSON has no NaN or infinity; PostgreSQL's to_json writes them as these strings. */
  if (d != d) enc_add(e, "\"NaN\"", 5);
  else if (d > 0) enc_add(e, "\"Infinity\"", 10);
  else enc_add(e, "\"-Infinity\"", 11);
}

static int enc_fail(fl_enc *e, const char *what, const char *hint) {
  return luaL_error(e->L, "cannot encode %s as JSON%s", what, hint);
}

static void enc_value(fl_enc *e, int idx, int depth);

/* An object key: strings as they are; numbers as their JSON text (as lua-cjson does). */
static void enc_key(fl_enc *e, int idx) {
  size_t n;
  const char *k;
  if (lua_type(e->L, idx) == LUA_TNUMBER) {
    char buf[FL_JSON_NUM_MAX];
    n = fl_json_format_double((double)lua_tonumber(e->L, idx), buf);
    if (n == 0) enc_fail(e, "a NaN or infinite table key", "");
    enc_string(e, buf, n);
  } else if (lua_type(e->L, idx) == LUA_TSTRING) {
    k = lua_tolstring(e->L, idx, &n);
    enc_string(e, k, n);
  } else {
    enc_fail(e, lua_pushfstring(e->L, "a table key of type %s", luaL_typename(e->L, idx)), "");
  }
}

static void enc_array(fl_enc *e, int t, size_t n, int depth) {
  size_t i;
  enc_add(e, "[", 1);
  for (i = 1; i <= n; i++) {
    if (i > 1) enc_add(e, ",", 1);
    lua_rawgeti(e->L, t, (int)i);
    enc_value(e, lua_gettop(e->L), depth);
    lua_pop(e->L, 1);
  }
  enc_add(e, "]", 1);
}

static void enc_object(fl_enc *e, int t, int depth) {
  int first = 1;
  enc_add(e, "{", 1);
  lua_pushnil(e->L);
  while (lua_next(e->L, t) != 0) {
    if (!first) enc_add(e, ",", 1);
    first = 0;
    enc_key(e, lua_gettop(e->L) - 1);
    enc_add(e, ":", 1);
    enc_value(e, lua_gettop(e->L), depth);
    lua_pop(e->L, 1);
  }
  enc_add(e, "}", 1);
}

/* An unmarked table is an array when its keys are exactly 1..n (n > 0), else an object:
 * {} is {} as with lua-cjson; a script says [] with setmetatable({}, flash.array_mt). */
static size_t plain_array_len(lua_State *L, int t) {
  size_t count = 0, max = 0;
  lua_pushnil(L);
  while (lua_next(L, t) != 0) {
    lua_Number k;
    lua_pop(L, 1);
    if (lua_type(L, -1) != LUA_TNUMBER) {
      lua_pop(L, 1);
      return 0;
    }
    k = lua_tonumber(L, -1);
    if (!(k >= 1 && k <= 9007199254740992.0) || k != (lua_Number)(long long)k) {
      lua_pop(L, 1);
      return 0;
    }
    if ((size_t)k > max) max = (size_t)k;
    count++;
  }
  return max == count ? count : 0;
}

static void enc_table(fl_enc *e, int t, int depth) {
  lua_State *L = e->L;
  size_t n;
  if (depth >= FL_JSON_MAX_DEPTH) enc_fail(e, "tables nested deeper than 1000", " (a table that contains itself?)");
  if (!lua_checkstack(L, 6)) enc_fail(e, "tables nested this deep", " (no room on the Lua stack)");
  if (lua_getmetatable(L, t)) {
    int which = lua_rawequal(L, -1, e->array_mt) ? 'a' : lua_rawequal(L, -1, e->object_mt) ? 'o'
              : lua_rawequal(L, -1, e->number_mt) ? 'n' : 0;
    lua_pop(L, 1);
    if (which == 'a') {
      enc_array(e, t, lua_objlen(L, t), depth + 1);
      return;
    }
    if (which == 'o') {
      enc_object(e, t, depth + 1);
      return;
    }
    if (which == 'n') {
      const char *txt;
      double d;
      lua_getfield(L, t, "text");
      txt = lua_tolstring(L, -1, &n);
      if (lua_type(L, -1) != LUA_TSTRING || fl_json_number(txt, n, &d) < 0)
        enc_fail(e, "a flash.number_mt value", " (its field 'text' is not a JSON number)");
      enc_add(e, txt, n);
      lua_pop(L, 1);
      return;
    }
  }
  n = plain_array_len(L, t);
  if (n > 0) enc_array(e, t, n, depth + 1);
  else enc_object(e, t, depth + 1);
}

static void enc_value(fl_enc *e, int idx, int depth) {
  lua_State *L = e->L;
  size_t n;
  const char *s;
  switch (lua_type(L, idx)) {
  case LUA_TNIL: enc_add(e, "null", 4); return;
  case LUA_TBOOLEAN:
    if (lua_toboolean(L, idx)) enc_add(e, "true", 4);
    else enc_add(e, "false", 5);
    return;
  case LUA_TNUMBER: enc_number(e, lua_tonumber(L, idx)); return;
  case LUA_TSTRING:
    s = lua_tolstring(L, idx, &n);
    enc_string(e, s, n);
    return;
  case LUA_TTABLE: enc_table(e, idx, depth); return;
  case LUA_TLIGHTUSERDATA:
    if (lua_touserdata(L, idx) == FL_NULL) {
      enc_add(e, "null", 4);
      return;
    }
    if (lua_touserdata(L, idx) == FL_UNCHANGED) {
      if (!e->unchanged)
        enc_fail(e, "flash.unchanged", " (an unchanged TOASTed column: leave it out, or give encode's option 'unchanged')");
      enc_string(e, e->unchanged, e->unchanged_len);
      return;
    }
    /* fall through */
  default:
    enc_fail(e, lua_pushfstring(L, "a value of type %s", luaL_typename(L, idx)), "");
  }
}

/* core.json_encode(value, [opts]) -> JSON text. opts.unchanged: the string flash.unchanged
 * becomes. Raises on what JSON cannot hold (functions, userdata, cycles). */
static int l_json_encode(lua_State *L) {
  fl_enc e;
  luaL_checkany(L, 1);
  lua_settop(L, 2);
  e.L = L;
  e.unchanged = NULL;
  e.unchanged_len = 0;
  if (!lua_isnil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_getfield(L, 2, "unchanged");
    if (!lua_isnil(L, -1)) {
      if (lua_type(L, -1) != LUA_TSTRING) luaL_argerror(L, 2, "option 'unchanged': string expected");
      e.unchanged = lua_tolstring(L, -1, &e.unchanged_len);
    }
    /* Stays on the stack (slot 3), so the string stays alive. */
  } else {
    lua_pushnil(L);
  }
  push_mt(L, &array_mt_key);
  e.array_mt = lua_gettop(L);
  push_mt(L, &object_mt_key);
  e.object_mt = lua_gettop(L);
  push_mt(L, &number_mt_key);
  e.number_mt = lua_gettop(L);
  e.cap = 256;
  e.len = 0;
  e.p = (char *)lua_newuserdata(L, e.cap);
  e.slot = lua_gettop(L);
  e.jb = NULL;
  enc_value(&e, 1, 0);
  lua_pushlstring(L, e.p, e.len);
  return 1;
}

int fl_json_markers(lua_State *L) {
  push_mt(L, &array_mt_key);
  push_mt(L, &object_mt_key);
  push_mt(L, &number_mt_key);
  return lua_gettop(L) - 2;
}

void fl_json_put(lua_State *L, int idx, int markers, fl_jbuf *b) {
  fl_enc e;
  e.L = L;
  e.slot = 0;
  e.jb = b;
  e.p = b->p;
  e.len = b->len;
  e.cap = b->cap;
  e.array_mt = markers;
  e.object_mt = markers + 1;
  e.number_mt = markers + 2;
  e.unchanged = NULL;
  e.unchanged_len = 0;
  enc_value(&e, idx, 0);
  b->len = e.len;
}

/* core.json_decode(text) -> value | nil, err, "parse" : objects and arrays as marked tables, null
 * as flash.null, numbers no double holds as flash.number_mt values. */
static int l_json_decode(lua_State *L) {
  size_t len, pos = 0;
  const char *err = NULL;
  const char *s = luaL_checklstring(L, 1, &len);
  if (fl_push_json_err(L, s, len, &err, &pos) == 0) return 1;
  return fl_failf(L, "parse", "invalid JSON at byte %d: %s", (int)pos + 1, err);
}

/* core.binary_type(oid) -> whether values of base type oid are read exactly from their
 * binary send form (wal_logical's binary = true checks listened columns with it). */
static int l_binary_type(lua_State *L) {
  lua_pushboolean(L, fl_bin_supported((uint32_t)luaL_checknumber(L, 1)));
  return 1;
}

/* core.text_escape(s) -> s with each byte that is part of no valid UTF-8 sequence written
 * as \xNN (log lines: a SQL_ASCII database's values hold any bytes); s itself when it has
 * none. */
static int l_text_escape(lua_State *L) {
  size_t len, i, start = 0;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &len);
  luaL_Buffer b;
  int any = 0;
  for (i = 0; i < len; i++) {
    size_t n;
    if (s[i] < 0x80) continue;
    n = fl_utf8_seq(s, i, len);
    if (n > 0) {
      i += n - 1;
      continue;
    }
    if (!any) luaL_buffinit(L, &b);
    any = 1;
    luaL_addlstring(&b, (const char *)s + start, i - start);
    lua_pushfstring(L, "\\x%c%c", "0123456789abcdef"[s[i] >> 4], "0123456789abcdef"[s[i] & 15]);
    luaL_addvalue(&b);
    start = i + 1;
  }
  if (!any) {
    lua_settop(L, 1);
    return 1;
  }
  luaL_addlstring(&b, (const char *)s + start, len - start);
  luaL_pushresult(&b);
  return 1;
}

static const luaL_Reg value_funcs[] = {
  { "binary_type", l_binary_type },
  { "text_escape", l_text_escape },
  { "json_encode", l_json_encode },
  { "json_decode", l_json_decode },
  { NULL, NULL }
};

void fl_value_open(lua_State *L) {
  luaL_register(L, NULL, value_funcs);
  push_mt(L, &array_mt_key);
  lua_setfield(L, -2, "array_mt");
  push_mt(L, &object_mt_key);
  lua_setfield(L, -2, "object_mt");
  push_mt(L, &number_mt_key);
  lua_setfield(L, -2, "number_mt");
}

uint32_t fl_builtin_elem(uint32_t oid) {
  switch (oid) {
    case 1000: return 16;   case 1001: return 17;   case 1016: return 20;
    case 1005: return 21;   case 1007: return 23;   case 1028: return 26;
    case 1021: return 700;  case 1022: return 701;  case 1231: return 1700;
    case 199: return 114;   case 3807: return 3802; case 1009: return 25;
    case 1015: return 1043; case 1014: return 1042; case 2951: return 2950;
    case 1115: return 1114; case 1185: return 1184; case 1182: return 1082;
    case 1183: return 1083; case 1187: return 1186; case 1041: return 869;
    case 651: return 650;   case 1003: return 19;
    default: return 0;
  }
}
