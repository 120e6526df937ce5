/* lredis: Redis for Lua through hiredis.
 * - "flash.redis": a blocking connection (the redis_streams driver, benchmarks): one call
 *   writes a whole batch of commands, then reads every reply, bounded by the timeout given
 *   at connect.
 * - "flash.redis_outbox": the Redis Streams sink's connection (lua/flash/sink/redis.lua),
 *   non-blocking: one call per event encodes it (JSON, partition, XADD) into hiredis's
 *   output buffer; the loop writes that buffer and counts the replies as they come, so
 *   flashlua decodes the next events while Redis works on the last ones.
 * A connection that failed stays failed (the caller opens another). */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <hiredis/hiredis.h>
#include "fl_json.h"
#include "fl_stream.h"   /* fl_stream_now_us: the monotonic clock */
#include "fl_ticker.h"
#include "lerr.h"
#include "lredis.h"
#include "lconn.h"
#include "lvalue.h"

#define REDIS_MT "flash.redis"

typedef struct {
  redisContext *c;
} fl_redis;

static struct timeval to_timeval(double s) {
  struct timeval tv;
  tv.tv_sec = (time_t)s;
  tv.tv_usec = (suseconds_t)((s - (double)tv.tv_sec) * 1e6);
  return tv;
}

/* hiredis's blocking connection to host:port, or with port 0 to the Unix socket at path
 * host (NULL, or a context whose err says why). */
static redisContext *dial(const char *host, int port, struct timeval tv) {
  return port == 0 ? redisConnectUnixWithTimeout(host, tv) : redisConnectWithTimeout(host, port, tv);
}

/* dial()'s connection, or NULL with nil, err, kind pushed (fl_fail's values): the caller
 * returns 3. */
static redisContext *connect_to(lua_State *L, const char *host, int port, struct timeval tv) {
  redisContext *c = dial(host, port, tv);
  if (!c) {
    fl_fail(L, "cannot allocate a Redis connection", "memory");
    return NULL;
  }
  if (c->err) {
    if (port == 0)
      fl_failf(L, "connection", "cannot connect to Redis at unix://%s: %s", host, c->errstr);
    else
      fl_failf(L, "connection", "cannot connect to Redis at %s:%d: %s", host, port, c->errstr);
    redisFree(c);
    return NULL;
  }
  return c;
}

/* core.redis_connect(host, port, timeout_seconds) -> conn | nil, err, kind
 * (port 0: host is the path of Redis's Unix socket) */
static int l_connect(lua_State *L) {
  const char *host = luaL_checkstring(L, 1);
  int port = (int)luaL_checkinteger(L, 2);
  struct timeval tv = to_timeval(luaL_optnumber(L, 3, 5.0));
  redisContext *c = connect_to(L, host, port, tv);
  if (!c) return 3;
  redisSetTimeout(c, tv);
  fl_redis *r = lua_newuserdata(L, sizeof *r);
  r->c = c;
  luaL_getmetatable(L, REDIS_MT);
  lua_setmetatable(L, -2);
  return 1;
}

static fl_redis *check(lua_State *L) {
  return luaL_checkudata(L, 1, REDIS_MT);
}

/* A reply as a Lua value: strings and statuses as strings, integers as numbers, nil as
 * false, arrays as tables, an error reply as { err = "message" }. */
static void push_reply(lua_State *L, const redisReply *rep) {
  switch (rep->type) {
  case REDIS_REPLY_STRING:
  case REDIS_REPLY_STATUS:
    lua_pushlstring(L, rep->str, rep->len);
    break;
  case REDIS_REPLY_INTEGER:
    lua_pushnumber(L, (lua_Number)rep->integer);
    break;
  case REDIS_REPLY_ARRAY:
    lua_createtable(L, (int)rep->elements, 0);
    for (size_t i = 0; i < rep->elements; i++) {
      push_reply(L, rep->element[i]);
      lua_rawseti(L, -2, (int)i + 1);
    }
    break;
  case REDIS_REPLY_ERROR:
    lua_createtable(L, 0, 1);
    lua_pushlstring(L, rep->str, rep->len);
    lua_setfield(L, -2, "err");
    break;
  default:
    lua_pushboolean(L, 0);
    break;
  }
}

/* conn:pipeline({ {"XADD", key, ...}, ... }) -> { reply, ... } | nil, err, kind
 * Every command is written, then every reply read. A connection error (the server went
 * away, the timeout passed) fails the whole batch: which of its commands took effect is
 * unknown, so the caller sends them again on a new connection (at-least-once). */
static int l_pipeline(lua_State *L) {
  fl_redis *r = check(L);
  luaL_checktype(L, 2, LUA_TTABLE);
  if (!r->c || r->c->err) return fl_fail(L, r->c ? r->c->errstr : "the Redis connection is closed", "connection");
  int n = (int)lua_objlen(L, 2);
  for (int i = 1; i <= n; i++) {
    lua_rawgeti(L, 2, i);
    if (!lua_istable(L, -1)) return luaL_error(L, "pipeline: command %d is not a table", i);
    int argc = (int)lua_objlen(L, -1);
    if (argc < 1) return luaL_error(L, "pipeline: command %d is empty", i);
    const char **argv = malloc(sizeof *argv * (size_t)argc);
    size_t *lens = malloc(sizeof *lens * (size_t)argc);
    if (!argv || !lens) {
      free(argv);
      free(lens);
      return luaL_error(L, "pipeline: out of memory");
    }
    for (int j = 1; j <= argc; j++) {
      lua_rawgeti(L, -1, j);
      argv[j - 1] = lua_tolstring(L, -1, &lens[j - 1]);
      lua_pop(L, 1);   /* the string stays alive: the command table holds it */
      if (!argv[j - 1]) {
        free(argv);
        free(lens);
        return luaL_error(L, "pipeline: argument %d of command %d is not a string", j, i);
      }
    }
    int rc = redisAppendCommandArgv(r->c, argc, argv, lens);
    free(argv);
    free(lens);
    lua_pop(L, 1);
    if (rc != REDIS_OK) return fl_fail(L, r->c->errstr[0] ? r->c->errstr : "cannot queue a Redis command", "connection");
  }
  lua_createtable(L, n, 0);
  for (int i = 1; i <= n; i++) {
    void *reply = NULL;
    if (redisGetReply(r->c, &reply) != REDIS_OK || !reply)
      return fl_fail(L, r->c->errstr[0] ? r->c->errstr : "the Redis connection failed", "connection");
    push_reply(L, reply);
    freeReplyObject(reply);
    lua_rawseti(L, -2, i);
  }
  return 1;
}

/* conn:ok() -> whether the connection can still be used */
static int l_ok(lua_State *L) {
  fl_redis *r = check(L);
  lua_pushboolean(L, r->c && !r->c->err);
  return 1;
}

static int l_close(lua_State *L) {
  fl_redis *r = check(L);
  if (r->c) {
    redisFree(r->c);
    r->c = NULL;
  }
  return 0;
}

/* ---- The sink's outbox ------------------------------------------------------------ */

#define OUTBOX_MT "flash.redis_outbox"

/* The event fields read, at these indexes of the outbox's environment table (interned
 * once: each event reads them with a rawgeti and a gettable, not a string lookup); the
 * key column names follow them. */
enum { F_ID = 1, F_TABLE, F_OP, F_NEW, F_OLD, F_LSN, F_COMMIT_TIME, F_XID, F_SOURCE, F_TOSTRING, F_MARKERS,
       F_KEYS = F_MARKERS + 3 };
static const char *const field_names[] = { "id", "table", "op", "new", "old", "lsn", "commit_time", "xid", "source" };

struct fl_outbox {
  redisContext *c;         /* NULL when not connected */
  char *stream;            /* streams are <stream>:<partition> */
  size_t stream_len;
  uint32_t partitions;
  int nkeys;               /* key columns (0: the caller gives the key) */
  char maxlen[32];         /* "" or MAXLEN ~'s count */
  fl_jbuf body;            /* scratch: an event's JSON */
  double ct;               /* the last commit_time written, and its text: a transaction's */
  char ct_txt[FL_JSON_NUM_MAX];  /* events share it, and a double's shortest form is dear */
  size_t ct_len;
  /* The entries lrepl added directly (fl_outbox_add_entry) that Redis has not answered
   * yet, oldest first: their formatted commands, a ring of cap slots from head. A new
   * connection gets them again through readd (the sink knows where they go among the
   * entries of Lua events); `readded` of them are on the current connection already. */
  sds *kept;
  size_t *kept_len;
  size_t kept_head, kept_n, kept_cap, readded;
};

static fl_outbox *check_outbox(lua_State *L) {
  return luaL_checkudata(L, 1, OUTBOX_MT);
}

static void outbox_disconnect(fl_outbox *o) {
  if (o->c) {
    redisFree(o->c);
    o->c = NULL;
  }
}

/* Forgets the first n kept entries (Redis answered them). */
static void kept_drop(fl_outbox *o, size_t n) {
  if (n > o->kept_n) n = o->kept_n;
  while (n-- > 0) {
    redisFreeSdsCommand(o->kept[o->kept_head]);
    o->kept[o->kept_head] = NULL;
    o->kept_head = (o->kept_head + 1) % o->kept_cap;
    o->kept_n--;
    if (o->readded > 0) o->readded--;
  }
  if (o->kept_n == 0) o->kept_head = 0;
}

static int kept_push(fl_outbox *o, sds cmd, size_t len) {
  if (o->kept_n == o->kept_cap) {
    size_t cap = o->kept_cap ? o->kept_cap * 2 : 256, i;
    sds *k = malloc(cap * sizeof *k);
    size_t *l = malloc(cap * sizeof *l);
    if (!k || !l) {
      free(k);
      free(l);
      return -1;
    }
    for (i = 0; i < o->kept_n; i++) {   /* unrolled from the ring, oldest first */
      k[i] = o->kept[(o->kept_head + i) % o->kept_cap];
      l[i] = o->kept_len[(o->kept_head + i) % o->kept_cap];
    }
    free(o->kept);
    free(o->kept_len);
    o->kept = k;
    o->kept_len = l;
    o->kept_cap = cap;
    o->kept_head = 0;
  }
  o->kept[(o->kept_head + o->kept_n) % o->kept_cap] = cmd;
  o->kept_len[(o->kept_head + o->kept_n) % o->kept_cap] = len;
  o->kept_n++;
  return 0;
}

fl_outbox *fl_outbox_check(lua_State *L, int idx) {
  return luaL_checkudata(L, idx, OUTBOX_MT);
}

int fl_outbox_connected(const fl_outbox *o) {
  return o->c != NULL && !o->c->err;
}

uint32_t fl_outbox_partitions(const fl_outbox *o) {
  return o->partitions;
}

static int l_outbox_gc(lua_State *L) {
  fl_outbox *o = check_outbox(L);
  outbox_disconnect(o);
  free(o->stream);
  o->stream = NULL;
  free(o->body.p);
  o->body.p = NULL;
  o->body.len = o->body.cap = 0;
  kept_drop(o, o->kept_n);
  free(o->kept);
  free(o->kept_len);
  o->kept = NULL;
  o->kept_len = NULL;
  o->kept_cap = 0;
  return 0;
}

/* core.redis_outbox{ stream = "flash", partitions = n, key = { "col", ... } | nil,
 * maxlen = n | nil } -> outbox (not connected). The options are checked by the sink. */
static int l_outbox_new(lua_State *L) {
  size_t len;
  const char *stream;
  fl_outbox *o;
  int i, nkeys = 0;
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  lua_getfield(L, 1, "stream");
  stream = luaL_checklstring(L, -1, &len);
  o = lua_newuserdata(L, sizeof *o);   /* 3 */
  memset(o, 0, sizeof *o);
  o->ct = -1.0;
  luaL_getmetatable(L, OUTBOX_MT);
  lua_setmetatable(L, -2);
  o->stream = malloc(len + 1);
  o->body.cap = 4096;
  o->body.p = malloc(o->body.cap);
  if (!o->stream || !o->body.p) return luaL_error(L, "redis_outbox: out of memory");
  memcpy(o->stream, stream, len + 1);
  o->stream_len = len;
  lua_getfield(L, 1, "partitions");
  o->partitions = (uint32_t)luaL_optinteger(L, -1, 1);
  lua_pop(L, 1);
  if (o->partitions < 1) return luaL_error(L, "redis_outbox: partitions must be at least 1");
  lua_getfield(L, 1, "maxlen");
  if (!lua_isnil(L, -1)) snprintf(o->maxlen, sizeof o->maxlen, "%.0f", (double)luaL_checknumber(L, -1));
  lua_pop(L, 1);
  lua_createtable(L, F_KEYS + 4, 0);   /* the environment */
  for (i = 0; i < F_TOSTRING - 1; i++) {
    lua_pushstring(L, field_names[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_getglobal(L, "tostring");
  lua_rawseti(L, -2, F_TOSTRING);
  /* flash.json's markers, fetched once: fl_json_put wants them on the stack. */
  fl_json_markers(L);
  lua_rawseti(L, -4, F_MARKERS + 2);
  lua_rawseti(L, -3, F_MARKERS + 1);
  lua_rawseti(L, -2, F_MARKERS);
  lua_getfield(L, 1, "key");
  if (lua_istable(L, -1)) {
    nkeys = (int)lua_objlen(L, -1);
    for (i = 1; i <= nkeys; i++) {
      lua_rawgeti(L, -1, i);
      if (lua_type(L, -1) != LUA_TSTRING) return luaL_error(L, "redis_outbox: key column %d is not a string", i);
      lua_rawseti(L, -3, F_KEYS + i - 1);
    }
  }
  lua_pop(L, 1);
  o->nkeys = nkeys;
  lua_setfenv(L, 3);
  lua_settop(L, 3);
  return 1;
}

/* The outbox's replies, as hiredis's reader builds them: all it needs of an XADD's reply is
 * whether Redis refused it. A reply is the address of `reply_ok`, or for a top-level error
 * a malloc'd copy of its message: no allocation per entry written (hiredis's own reply
 * objects cost two mallocs and two frees each). */
static char reply_ok;

typedef struct {
  size_t len;
  char str[];
} reply_err;

static void *reply_string(const redisReadTask *task, char *str, size_t len) {
  reply_err *e;
  if (task->type != REDIS_REPLY_ERROR || task->parent) return &reply_ok;
  e = malloc(sizeof *e + len);
  if (!e) return NULL;   /* the reader fails with "out of memory" */
  e->len = len;
  memcpy(e->str, str, len);
  return e;
}
static void *reply_array(const redisReadTask *task, int elements) {
  (void)task;
  (void)elements;
  return &reply_ok;
}
static void *reply_integer(const redisReadTask *task, long long value) {
  (void)task;
  (void)value;
  return &reply_ok;
}
static void *reply_nil(const redisReadTask *task) {
  (void)task;
  return &reply_ok;
}
static void reply_free(void *reply) {
  if (reply != &reply_ok) free(reply);
}
static redisReplyObjectFunctions reply_fns = { reply_string, reply_array, reply_integer, reply_nil, reply_free };

/* outbox:connect(host, port, timeout_seconds) -> true | nil, err, kind (port 0: host is
 * the path of Redis's Unix socket). Any connection before is closed: what was queued on it
 * is the caller's to add again. */
static int l_outbox_connect(lua_State *L) {
  fl_outbox *o = check_outbox(L);
  const char *host = luaL_checkstring(L, 2);
  int port = (int)luaL_checkinteger(L, 3);
  struct timeval tv = to_timeval(luaL_optnumber(L, 4, 5.0));
  redisContext *c;
  int fl;
  outbox_disconnect(o);
  c = connect_to(L, host, port, tv);
  if (!c) return 3;
  /* From here on hiredis never waits: a write takes what the socket takes, a read what
   * has come (its EAGAIN is "later" once REDIS_BLOCK is off). */
  fl = fcntl(c->fd, F_GETFL, 0);
  if (fl < 0 || fcntl(c->fd, F_SETFL, fl | O_NONBLOCK) < 0) {
    redisFree(c);
    return fl_fail(L, "cannot make the Redis connection non-blocking", "system");
  }
  c->flags &= ~REDIS_BLOCK;
  c->reader->fn = &reply_fns;
  o->c = c;
  o->readded = 0;                       /* the kept entries are the caller's to add again */
  lua_pushboolean(L, 1);
  return 1;
}

/* FNV-1a, 32 bits (flash.sink.redis's hash): h carried over from the bytes before. */
uint32_t fl_fnv1a(uint32_t h, const char *s, size_t n) {
  size_t i;
  for (i = 0; i < n; i++) {
    h ^= (unsigned char)s[i];
    h *= 16777619u;
  }
  return h;
}

/* Writes u's decimal digits at w; returns the end. */
static char *put_digits(char *w, unsigned long long u) {
  char digits[24];
  int k = 0;
  do {
    digits[k++] = (char)('0' + u % 10);
    u /= 10;
  } while (u > 0);
  while (k > 0) *w++ = digits[--k];
  return w;
}

size_t fl_key_number(double d, char *buf) {
  char *w = buf;
  if (!(d == floor(d) && fabs(d) < 1e14 && !(d == 0 && signbit(d)))) return 0;
  if (d < 0) *w++ = '-';
  w = put_digits(w, (unsigned long long)fabs(d));
  return (size_t)(w - buf);
}

uint32_t fl_partition_hash(const char *table, size_t len) {
  return fl_fnv1a(fl_fnv1a(2166136261u, table, len), "", 1);
}

/* The text tostring(v) gives for the value at idx (nil: ""), as the sink's Lua key has
 * always hashed it. Strings and whole numbers (LuaJIT's "%.14g" prints those below 1e14
 * as their digits) are read here; anything else goes through tostring. May push one
 * value (the caller restores the stack). */
static const char *key_text(lua_State *L, int idx, int env, char *buf, size_t *len) {
  int t = lua_type(L, idx);
  if (t == LUA_TSTRING) return lua_tolstring(L, idx, len);
  if (t == LUA_TNIL) {
    *len = 0;
    return "";
  }
  if (t == LUA_TNUMBER && (*len = fl_key_number(lua_tonumber(L, idx), buf)) > 0) return buf;
  lua_rawgeti(L, env, F_TOSTRING);
  lua_pushvalue(L, idx);
  lua_call(L, 1, 1);
  if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "flash.sink.redis: tostring of a key value is not a string");
  return lua_tolstring(L, -1, len);
}

/* The partition of the event at ev: hash(table .. "\0" .. key) % partitions, the key being
 * the given string (key = function) or the key columns' texts joined by "\0", taken from
 * the old row when the event has one. */
static uint32_t partition_of(lua_State *L, fl_outbox *o, int ev, int env, int tbl, int given) {
  size_t n;
  const char *s = lua_tolstring(L, tbl, &n);
  uint32_t h = fl_partition_hash(s, n);
  if (given) {
    s = lua_tolstring(L, given, &n);
    h = fl_fnv1a(h, s, n);
  } else {
    int i, row, top = lua_gettop(L);
    char buf[32];
    lua_rawgeti(L, env, F_OLD);
    lua_gettable(L, ev);
    if (!lua_istable(L, -1)) {
      lua_pop(L, 1);
      lua_rawgeti(L, env, F_NEW);
      lua_gettable(L, ev);
    }
    row = lua_gettop(L);
    for (i = 0; i < o->nkeys; i++) {
      if (i > 0) h = fl_fnv1a(h, "", 1);
      if (lua_istable(L, row)) {
        lua_rawgeti(L, env, F_KEYS + i);
        lua_gettable(L, row);
      } else {
        lua_pushboolean(L, 0);   /* no row (a truncate): the Lua sink hashed "false" */
      }
      s = key_text(L, lua_gettop(L), env, buf, &n);
      h = fl_fnv1a(h, s, n);
      lua_settop(L, row);
    }
    lua_settop(L, top);
  }
  return h % o->partitions;
}

/* Room for n more bytes in b (grown with realloc; b keeps what it has either way). */
static char *body_room(lua_State *L, fl_jbuf *b, size_t n) {
  if (b->cap - b->len < n) {
    size_t cap = b->cap * 2 + n;
    char *p = realloc(b->p, cap);
    if (!p) luaL_error(L, "flash.sink.redis: out of memory");
    b->p = p;
    b->cap = cap;
  }
  return b->p + b->len;
}

static void body_add(lua_State *L, fl_jbuf *b, const char *s, size_t n) {
  memcpy(body_room(L, b, n), s, n);
  b->len += n;
}

/* Appends ,"name":<JSON of the value at idx> (no comma for the first) unless it is nil.
 * A number as commit_time is written from the text kept of the last one: the events of a
 * transaction share it, and a double's shortest form costs a few printf/strtod rounds. */
static void put_field(lua_State *L, fl_outbox *o, int markers, int field, int idx, int *first) {
  const char *name = field_names[field - 1];
  size_t n = strlen(name);
  fl_jbuf *b = &o->body;
  char *w;
  if (lua_isnil(L, idx)) return;
  w = body_room(L, b, n + 4);
  if (!*first) *w++ = ',';
  *w++ = '"';
  memcpy(w, name, n);
  w += n;
  *w++ = '"';
  *w++ = ':';
  b->len = (size_t)(w - b->p);
  *first = 0;
  if (field == F_COMMIT_TIME && lua_type(L, idx) == LUA_TNUMBER) {
    lua_Number d = lua_tonumber(L, idx);
    if (o->ct_len == 0 || d != o->ct) {
      o->ct_len = fl_json_format_double((double)d, o->ct_txt);
      o->ct = d;
    }
    if (o->ct_len > 0) {
      body_add(L, b, o->ct_txt, o->ct_len);
      return;
    }
  }
  if (lua_type(L, idx) == LUA_TSTRING) {
    /* The id, table, op, lsn, source: a string straight in (fl_json_put's way, less its
     * set-up). */
    const char *v = lua_tolstring(L, idx, &n);
    w = body_room(L, b, 6 * n + 2);
    *w++ = '"';
    w += fl_json_escape(v, n, w);
    *w++ = '"';
    b->len = (size_t)(w - b->p);
    return;
  }
  fl_json_put(L, idx, markers, b);
}

/* The arguments of an entry's XADD (see outbox:add below) into argv/lens; returns argc, or
 * -1 out of memory. The stream name is written to stream_buf (256 bytes) or, longer, to
 * a malloc'd copy the caller frees (argv[1] != stream_buf). */
static int entry_argv(fl_outbox *o, uint32_t p, const char *id, size_t id_len, const char *body, size_t body_len,
                      char *stream_buf, const char **argv, size_t *lens) {
  char part[16];
  char *stream = stream_buf;
  int argc = 0;
  size_t n;
  part[0] = ':';
  n = (size_t)(put_digits(part + 1, p) - part);
  if (o->stream_len + n + 1 > 256) {
    stream = malloc(o->stream_len + n + 1);
    if (!stream) return -1;
  }
  memcpy(stream, o->stream, o->stream_len);
  memcpy(stream + o->stream_len, part, n);
  argv[argc] = "XADD"; lens[argc++] = 4;
  argv[argc] = stream; lens[argc++] = o->stream_len + n;
  if (o->maxlen[0]) {
    argv[argc] = "MAXLEN"; lens[argc++] = 6;
    argv[argc] = "~"; lens[argc++] = 1;
    argv[argc] = o->maxlen; lens[argc++] = strlen(o->maxlen);
  }
  argv[argc] = "*"; lens[argc++] = 1;
  argv[argc] = "id"; lens[argc++] = 2;
  argv[argc] = id; lens[argc++] = id_len;
  argv[argc] = "event"; lens[argc++] = 5;
  argv[argc] = body; lens[argc++] = body_len;
  return argc;
}

/* outbox:add(ev [, key]) -> bytes waiting to be written
 * Appends ev's entry to the connection's output: XADD <stream>:<p> [MAXLEN ~ n] * id <id>
 * event <JSON of id, table, op, new, old, lsn, commit_time, xid, source>. Raises when not
 * connected or when the event cannot be encoded; then nothing of it was queued. */
static int l_outbox_add(lua_State *L) {
  fl_outbox *o = check_outbox(L);
  int env, base, markers, first = 1, argc, i;
  const char *argv[16], *id;
  size_t lens[16], id_len;
  char stream_buf[256], idbuf[32];
  uint32_t p;
  int given;
  luaL_checktype(L, 2, LUA_TTABLE);
  given = lua_isnoneornil(L, 3) ? 0 : 3;
  if (given) luaL_checkstring(L, 3);
  if (!o->c || o->c->err) return luaL_error(L, "flash.sink.redis: add without a connection");
  lua_settop(L, 3);
  lua_getfenv(L, 1);
  env = 4;
  base = lua_gettop(L);
  for (i = F_ID; i <= F_SOURCE; i++) {   /* base + i: the event's fields */
    lua_rawgeti(L, env, i);
    lua_gettable(L, 2);
  }
  if (lua_type(L, base + F_TABLE) != LUA_TSTRING)
    return luaL_error(L, "flash.sink.redis: the event's table is not a string");
  if (lua_type(L, base + F_OP) != LUA_TSTRING)
    return luaL_error(L, "flash.sink.redis: the event's op is not a string");
  markers = lua_gettop(L) + 1;
  for (i = 0; i < 3; i++) lua_rawgeti(L, env, F_MARKERS + i);

  o->body.len = 0;
  body_add(L, &o->body, "{", 1);
  for (i = F_ID; i <= F_SOURCE; i++) put_field(L, o, markers, i, base + i, &first);
  body_add(L, &o->body, "}", 1);

  p = partition_of(L, o, 2, env, base + F_TABLE, given);
  if (lua_type(L, base + F_ID) == LUA_TSTRING || lua_isnil(L, base + F_ID)) {
    id = lua_isnil(L, base + F_ID) ? "" : lua_tolstring(L, base + F_ID, &id_len);
    if (lua_isnil(L, base + F_ID)) id_len = 0;
  } else {
    id = key_text(L, base + F_ID, env, idbuf, &id_len);   /* tostring(ev.id) */
  }
  argc = entry_argv(o, p, id, id_len, o->body.p, o->body.len, stream_buf, argv, lens);
  if (argc < 0) return luaL_error(L, "flash.sink.redis: out of memory");

  /* hiredis formats the command (RESP is its job, not ours) and queues it. */
  i = redisAppendCommandArgv(o->c, argc, argv, lens);
  if (argv[1] != stream_buf) free((char *)argv[1]);
  if (i != REDIS_OK) return luaL_error(L, "flash.sink.redis: out of memory");
  lua_pushnumber(L, (lua_Number)sdslen(o->c->obuf));
  return 1;
}

int fl_outbox_add_entry(fl_outbox *o, uint32_t partition, const char *id, size_t id_len, const char *body,
                        size_t body_len) {
  const char *argv[16];
  size_t lens[16];
  char stream_buf[256];
  sds cmd = NULL;
  int len;
  int argc = entry_argv(o, partition, id, id_len, body, body_len, stream_buf, argv, lens);
  if (argc < 0) return -1;
  /* The sds formatter (sdscatfmt): the char * one prints each length with sprintf. */
  len = redisFormatSdsCommandArgv(&cmd, argc, argv, lens);
  if (argv[1] != stream_buf) free((char *)argv[1]);
  if (len < 0) return -1;
  if (kept_push(o, cmd, (size_t)len) != 0) {
    redisFreeSdsCommand(cmd);
    return -1;
  }
  if (redisAppendFormattedCommand(o->c, cmd, (size_t)len) != REDIS_OK) {
    o->kept_n--;                        /* not added: not kept either */
    redisFreeSdsCommand(cmd);
    return -1;
  }
  o->readded++;
  return 0;
}

/* outbox:drop(n): Redis answered the first n kept entries (the sink's acks). */
static int l_outbox_drop(lua_State *L) {
  fl_outbox *o = check_outbox(L);
  kept_drop(o, (size_t)luaL_checknumber(L, 2));
  return 0;
}

/* outbox:readd(n) -> bytes waiting: the next n kept entries not yet on this connection
 * are added to it (a new connection after one was lost: the sink adds its entries again
 * in their order). */
static int l_outbox_readd(lua_State *L) {
  fl_outbox *o = check_outbox(L);
  size_t n = (size_t)luaL_checknumber(L, 2);
  if (!o->c || o->c->err) return luaL_error(L, "flash.sink.redis: add without a connection");
  while (n-- > 0 && o->readded < o->kept_n) {
    size_t k = (o->kept_head + o->readded) % o->kept_cap;
    if (redisAppendFormattedCommand(o->c, o->kept[k], o->kept_len[k]) != REDIS_OK)
      return luaL_error(L, "flash.sink.redis: out of memory");
    o->readded++;
  }
  lua_pushnumber(L, (lua_Number)sdslen(o->c->obuf));
  return 1;
}

/* outbox:kept() -> entries added directly that Redis has not answered (for specs). */
static int l_outbox_kept(lua_State *L) {
  lua_pushnumber(L, (lua_Number)check_outbox(L)->kept_n);
  return 1;
}

/* outbox:partition(ev [, key]) -> the partition add would write ev to (for specs). */
static int l_outbox_partition(lua_State *L) {
  fl_outbox *o = check_outbox(L);
  int given;
  luaL_checktype(L, 2, LUA_TTABLE);
  given = lua_isnoneornil(L, 3) ? 0 : 3;
  if (given) luaL_checkstring(L, 3);
  lua_settop(L, 3);
  lua_getfenv(L, 1);                    /* 4 */
  lua_rawgeti(L, 4, F_TABLE);
  lua_gettable(L, 2);                   /* 5 */
  if (lua_type(L, 5) != LUA_TSTRING) return luaL_error(L, "flash.sink.redis: the event's table is not a string");
  lua_pushnumber(L, (lua_Number)partition_of(L, o, 2, 4, 5, given));
  return 1;
}

/* outbox:send() -> true (all written) | false (the socket took part of it) | nil, err, kind */
static int l_outbox_send(lua_State *L) {
  fl_outbox *o = check_outbox(L);
  int done = 0;
  if (!o->c || o->c->err) return fl_fail(L, o->c ? o->c->errstr : "the Redis connection is closed", "connection");
  if (redisBufferWrite(o->c, &done) != REDIS_OK)
    return fl_fail(L, o->c->errstr[0] ? o->c->errstr : "cannot write to Redis", "connection");
  lua_pushboolean(L, done);
  return 1;
}

/* outbox:receive() -> n [, refused] | nil, err, kind
 * Reads the replies that have come, without waiting: n entries Redis wrote (in the order
 * they were added), then, when Redis refused the next one, its error (the replies after
 * it are not read: the caller closes the connection and adds them again to another). */
static int l_outbox_receive(lua_State *L) {
  fl_outbox *o = check_outbox(L);
  lua_Number n = 0;
  redisContext *c = o->c;
  if (!c || c->err) return fl_fail(L, c ? c->errstr : "the Redis connection is closed", "connection");
  for (;;) {
    size_t before;
    for (;;) {
      void *reply = NULL;
      if (redisGetReplyFromReader(c, &reply) != REDIS_OK)
        return fl_fail(L, c->errstr[0] ? c->errstr : "cannot read Redis's reply", "connection");
      if (!reply) break;
      if (reply != &reply_ok) {
        reply_err *e = reply;
        lua_pushnumber(L, n);
        lua_pushlstring(L, e->str, e->len);
        reply_free(reply);
        return 2;
      }
      n++;
    }
    /* A read that fed the reader nothing met EAGAIN: what has come is read. */
    before = c->reader->len;
    if (redisBufferRead(c) != REDIS_OK)
      return fl_fail(L, c->errstr[0] ? c->errstr : "cannot read from Redis", "connection");
    if (c->reader->len == before) break;
  }
  lua_pushnumber(L, n);
  return 1;
}

/* outbox:wait(seconds) -> whether the connection can be written to (when output waits)
 * or read from before the time is up. */
static int l_outbox_wait(lua_State *L) {
  fl_outbox *o = check_outbox(L);
  double s = luaL_checknumber(L, 2);
  struct pollfd pfd;
  int rc;
  if (!o->c || o->c->err) {
    lua_pushboolean(L, 0);
    return 1;
  }
  pfd.fd = o->c->fd;
  pfd.events = POLLIN | (sdslen(o->c->obuf) > 0 ? POLLOUT : 0);
  pfd.revents = 0;
  do {
    rc = poll(&pfd, 1, s > 0 ? (int)(s * 1000 + 0.999) : 0);
  } while (rc < 0 && errno == EINTR);
  lua_pushboolean(L, rc > 0);
  return 1;
}

/* outbox:fd() -> the connection's socket, or nil */
static int l_outbox_fd(lua_State *L) {
  fl_outbox *o = check_outbox(L);
  if (!o->c || o->c->err) return 0;
  lua_pushinteger(L, o->c->fd);
  return 1;
}

/* outbox:ok() -> whether the connection can still be used */
static int l_outbox_ok(lua_State *L) {
  fl_outbox *o = check_outbox(L);
  lua_pushboolean(L, o->c && !o->c->err);
  return 1;
}

static int l_outbox_close(lua_State *L) {
  outbox_disconnect(check_outbox(L));
  return 0;
}

static const luaL_Reg outbox_methods[] = {
  { "connect", l_outbox_connect },
  { "add", l_outbox_add },
  { "drop", l_outbox_drop },
  { "readd", l_outbox_readd },
  { "kept", l_outbox_kept },
  { "partition", l_outbox_partition },
  { "send", l_outbox_send },
  { "receive", l_outbox_receive },
  { "wait", l_outbox_wait },
  { "fd", l_outbox_fd },
  { "ok", l_outbox_ok },
  { "close", l_outbox_close },
  { NULL, NULL }
};

/* ---------------------------------------------------------------------------------------
 * "flash.redis_keeper": a redis_streams worker's partition locks and heartbeat, renewed by a
 * thread of its own (its own connection) while the worker's loop is blocked -- a callback
 * that calls a slow API, a long timer -- so the partitions are not taken over by another
 * worker, which would handle the same entries at the same time, out of order. The loop
 * says it is alive with keeper:beat(); the thread renews only once it has been silent for
 * `every` seconds, and gives up after `limit` seconds (a callback that never returns does
 * not hold its partitions for ever). What to renew is the loop's (keeper:plan). */
#define KEEPER_MT "flash.redis_keeper"

typedef struct {
  fl_ticker ticker;             /* every 100 ms: keeper_tick */
  pthread_mutex_t mu;           /* the plan, the counters and the thread's connection */
  char *host;
  int port;
  double every, limit;          /* seconds */
  int64_t last_beat, last_renew; /* monotonic ms */
  /* The plan, under mu: ZADD workers_key <now> consumer; EVAL script 1 key consumer ttl_ms
   * for each lock key. */
  char *workers_key, *consumer, *script;
  char **keys;
  int nkeys;
  long ttl_ms;
  uint64_t renewals;            /* rounds the thread sent */
  redisContext *c;              /* the thread's own */
} fl_keeper;

static void keeper_free_plan(fl_keeper *k) {
  for (int i = 0; i < k->nkeys; i++) free(k->keys[i]);
  free(k->keys);
  free(k->workers_key);
  free(k->consumer);
  free(k->script);
  k->keys = NULL;
  k->nkeys = 0;
  k->workers_key = k->consumer = k->script = NULL;
}

/* One round of renewals on the thread's connection (mu held: the plan cannot change). */
static void keeper_renew(fl_keeper *k) {
  char now[32], ttl[32];
  struct timeval tv = to_timeval(k->every > 0.5 ? k->every : 0.5);
  if (!k->workers_key) return;
  if (!k->c) {
    k->c = dial(k->host, k->port, tv);
    if (!k->c) return;
    if (k->c->err) { redisFree(k->c); k->c = NULL; return; }
    redisSetTimeout(k->c, tv);
  }
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);       /* the heartbeat's score: wall-clock ms */
  snprintf(now, sizeof now, "%lld", (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000);
  snprintf(ttl, sizeof ttl, "%ld", k->ttl_ms);
  const char *zadd[] = { "ZADD", k->workers_key, now, k->consumer };
  int sent = redisAppendCommandArgv(k->c, 4, zadd, NULL) == REDIS_OK;
  for (int i = 0; sent && i < k->nkeys; i++) {
    const char *eval[] = { "EVAL", k->script, "1", k->keys[i], k->consumer, ttl };
    sent = redisAppendCommandArgv(k->c, 6, eval, NULL) == REDIS_OK;
  }
  for (int i = 0; sent && i <= k->nkeys; i++) {
    void *reply = NULL;
    if (redisGetReply(k->c, &reply) != REDIS_OK) { sent = 0; break; }
    freeReplyObject(reply);
  }
  if (!sent) { redisFree(k->c); k->c = NULL; return; }   /* again next round, reconnected */
  k->renewals++;
}

static void keeper_tick(void *ud) {
  fl_keeper *k = ud;
  int64_t now = fl_stream_now_us() / 1000, every = (int64_t)(k->every * 1000);
  int64_t quiet = now - __atomic_load_n(&k->last_beat, __ATOMIC_ACQUIRE);
  pthread_mutex_lock(&k->mu);
  if (quiet >= every && quiet <= (int64_t)(k->limit * 1000) && now - k->last_renew >= every) {
    k->last_renew = now;
    keeper_renew(k);
  }
  pthread_mutex_unlock(&k->mu);
}

/* core.redis_keeper(host, port, every_s, limit_s) -> keeper (port 0: host is a Unix
 * socket's path); the thread starts at once, renewing nothing until keeper:plan. */
static int l_keeper_new(lua_State *L) {
  const char *host = luaL_checkstring(L, 1);
  int port = (int)luaL_checkinteger(L, 2);
  double every = luaL_checknumber(L, 3), limit = luaL_checknumber(L, 4);
  fl_keeper *k = lua_newuserdata(L, sizeof *k);
  memset(k, 0, sizeof *k);
  k->host = strdup(host);
  if (!k->host) return luaL_error(L, "out of memory");
  k->port = port;
  k->every = every;
  k->limit = limit;
  k->last_beat = fl_stream_now_us() / 1000;
  pthread_mutex_init(&k->mu, NULL);
  luaL_getmetatable(L, KEEPER_MT);
  lua_setmetatable(L, -2);
  if (fl_ticker_start(&k->ticker, 100, keeper_tick, k) != 0) return fl_fail(L, "cannot start a thread", "system");
  return 1;
}

static fl_keeper *check_keeper(lua_State *L) {
  return luaL_checkudata(L, 1, KEEPER_MT);
}

/* keeper:plan(ttl_ms, workers_key, consumer, script, {lock keys}) : what a round renews. */
static int l_keeper_plan(lua_State *L) {
  fl_keeper *k = check_keeper(L);
  long ttl = (long)luaL_checkinteger(L, 2);
  const char *wk = luaL_checkstring(L, 3), *consumer = luaL_checkstring(L, 4), *script = luaL_checkstring(L, 5);
  luaL_checktype(L, 6, LUA_TTABLE);
  int n = (int)lua_objlen(L, 6);
  for (int i = 1; i <= n; i++) {
    lua_rawgeti(L, 6, i);
    luaL_checkstring(L, -1);
    lua_pop(L, 1);
  }
  pthread_mutex_lock(&k->mu);
  keeper_free_plan(k);
  k->ttl_ms = ttl;
  k->workers_key = strdup(wk);
  k->consumer = strdup(consumer);
  k->script = strdup(script);
  k->keys = calloc((size_t)(n > 0 ? n : 1), sizeof *k->keys);
  int ok = k->workers_key && k->consumer && k->script && k->keys;
  for (int i = 0; ok && i < n; i++) {
    lua_rawgeti(L, 6, i + 1);
    k->keys[i] = strdup(lua_tostring(L, -1));
    lua_pop(L, 1);
    if (!k->keys[i]) ok = 0;
    else k->nkeys = i + 1;
  }
  if (!ok) keeper_free_plan(k);
  pthread_mutex_unlock(&k->mu);
  if (!ok) return luaL_error(L, "out of memory");
  return 0;
}

/* keeper:beat() : the loop is alive (cheap: called every loop step). */
static int l_keeper_beat(lua_State *L) {
  fl_keeper *k = check_keeper(L);
  __atomic_store_n(&k->last_beat, fl_stream_now_us() / 1000, __ATOMIC_RELEASE);
  return 0;
}

/* keeper:renewals() -> rounds the thread sent while the loop was blocked */
static int l_keeper_renewals(lua_State *L) {
  fl_keeper *k = check_keeper(L);
  pthread_mutex_lock(&k->mu);
  double n = (double)k->renewals;
  pthread_mutex_unlock(&k->mu);
  lua_pushnumber(L, n);
  return 1;
}

/* keeper:close() : stops the thread (waits out a round in flight) and its connection. */
static int l_keeper_close(lua_State *L) {
  fl_keeper *k = check_keeper(L);
  fl_ticker_stop(&k->ticker);
  if (k->c) { redisFree(k->c); k->c = NULL; }
  keeper_free_plan(k);
  if (k->host) {
    free(k->host);
    k->host = NULL;
    pthread_mutex_destroy(&k->mu);
  }
  return 0;
}

static const luaL_Reg keeper_methods[] = {
  { "plan", l_keeper_plan },
  { "beat", l_keeper_beat },
  { "renewals", l_keeper_renewals },
  { "close", l_keeper_close },
  { NULL, NULL }
};

static const luaL_Reg methods[] = {
  { "pipeline", l_pipeline },
  { "ok", l_ok },
  { "close", l_close },
  { NULL, NULL }
};

const luaL_Reg fl_redis_funcs[] = {
  { "redis_connect", l_connect },
  { "redis_outbox", l_outbox_new },
  { "redis_keeper", l_keeper_new },
  { NULL, NULL }
};

void fl_redis_open(lua_State *L) {
  fl_new_metatable(L, REDIS_MT, l_close, methods);
  fl_new_metatable(L, OUTBOX_MT, l_outbox_gc, outbox_methods);
  fl_new_metatable(L, KEEPER_MT, l_keeper_close, keeper_methods);
}
