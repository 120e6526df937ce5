/* lvalue: turns a PostgreSQL text value into the Lua value API.md's type table promises.
 * The parsing lives in fl_json/fl_value (pure C); this file only builds Lua values. */
#include <stdlib.h>
#include <string.h>
#include <lua.h>
#include <lauxlib.h>
#include "fl_json.h"
#include "fl_value.h"
#include "lvalue.h"

char fl_unchanged_sentinel;

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

/* fl_parse_double refuses text longer than its stack copy; numeric (and jsonb numbers,
 * which are numeric) can be far longer, so long text is copied into a userdata. Only
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

int fl_push_json(lua_State *L, const char *s, size_t len) {
  /* Iterative, not recursive: each open container keeps its table (and, for objects, the
   * pending key) on the Lua stack, so depth 1000 needs ~2000 slots, checked per level. */
  fl_json_reader r;
  int idx[FL_JSON_MAX_DEPTH];
  char stackbuf[SCRATCH_STACK], *buf;
  int base = lua_gettop(L);
  if (!lua_checkstack(L, 4)) return -1;
  buf = scratch(L, stackbuf, len);
  fl_json_init(&r, s, len, buf);
  for (;;) {
    const char *v;
    size_t n;
    lua_Number num;
    fl_json_tok t = fl_json_next(&r, &v, &n);
    switch (t) {
    case FL_JSON_OBJ_OPEN:
    case FL_JSON_ARR_OPEN:
      if (!lua_checkstack(L, 4)) goto bad;
      if (t == FL_JSON_ARR_OPEN) {
        lua_createtable(L, 4, 0);
        idx[r.depth - 1] = 0;
      } else {
        lua_createtable(L, 0, 4);
      }
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
      if (to_number(L, v, n, &num) != 0) goto bad;
      lua_pushnumber(L, num);
      break;
    case FL_JSON_TRUE: lua_pushboolean(L, 1); break;
    case FL_JSON_FALSE: lua_pushboolean(L, 0); break;
    case FL_JSON_NULL: lua_pushlightuserdata(L, FL_NULL); break;
    case FL_JSON_END:
      drop_scratch(L, stackbuf, buf);
      return 0;
    default:
      goto bad;
    }
    if (r.depth > 0) store(L, &r, idx);
  }
bad:
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
  buf = scratch(L, stackbuf, len);
  fl_arr_init(&r, s, len, t->delim ? t->delim : ',', buf);
  for (;;) {
    const char *v;
    size_t n;
    switch (fl_arr_next(&r, &v, &n)) {
    case FL_ARR_OPEN:
      if (!lua_checkstack(L, 4) || r.depth > (int)(sizeof idx / sizeof idx[0])) goto bad;
      lua_createtable(L, 4, 0);
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

static void push_number_or_text(lua_State *L, const char *s, size_t len) {
  lua_Number d;
  if (to_number(L, s, len, &d) == 0) lua_pushnumber(L, d);
  else lua_pushlstring(L, s, len);
}

void fl_push_value(lua_State *L, const fl_coltype *t, const char *s, size_t len, int flags) {
  int64_t i;
  /* The scratch, the value and a temporary; a caller deep in nested arrays may have
   * used up the 20 slots Lua guarantees. */
  luaL_checkstack(L, 4, "decoding a column value");
  if (s == NULL) {
    lua_pushlightuserdata(L, FL_NULL);
    return;
  }
  if (t->elem != 0) {
    push_array(L, t, s, len, flags);
    return;
  }
  switch (t->oid) {
  case FL_BOOLOID:
    /* 't'/'f' from the server; "true"/"false" from row_to_json in trigger payloads. */
    if ((len == 1 && s[0] == 't') || (len == 4 && memcmp(s, "true", 4) == 0)) lua_pushboolean(L, 1);
    else if ((len == 1 && s[0] == 'f') || (len == 5 && memcmp(s, "false", 5) == 0)) lua_pushboolean(L, 0);
    else lua_pushlstring(L, s, len);
    return;
  case FL_INT2OID:
  case FL_INT4OID:
  case FL_OIDOID:
    if (fl_parse_int64(s, len, &i) == 0) lua_pushnumber(L, (lua_Number)i);
    else push_number_or_text(L, s, len);
    return;
  case FL_FLOAT4OID:
  case FL_FLOAT8OID:
    push_number_or_text(L, s, len);
    return;
  case FL_INT8OID:
    if (fl_parse_int64(s, len, &i) == 0 && i >= -EXACT_INT_MAX && i <= EXACT_INT_MAX)
      lua_pushnumber(L, (lua_Number)i);
    else
      lua_pushlstring(L, s, len);
    return;
  case FL_NUMERICOID:
    if (flags & FL_NUMERIC_AS_NUMBER) push_number_or_text(L, s, len);
    else lua_pushlstring(L, s, len);
    return;
  case FL_JSONOID:
  case FL_JSONBOID:
    if (fl_push_json(L, s, len) != 0) lua_pushlstring(L, s, len);
    return;
  case FL_BYTEAOID:
    push_bytea(L, s, len);
    return;
  default:
    lua_pushlstring(L, s, len);
    return;
  }
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
