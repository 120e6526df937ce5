/* lredis: a Redis connection for Lua ("flash.redis") through hiredis, for the Redis Streams
 * sink (lua/flash/sink/redis.lua). One call writes a whole batch of commands, then reads
 * every reply (a pipeline: one round trip per batch). Blocking, bounded by the timeout
 * given at connect; a connection that failed stays failed (the caller opens another). */
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <hiredis/hiredis.h>
#include "lerr.h"
#include "lredis.h"
#include "lconn.h"

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

/* core.redis_connect(host, port, timeout_seconds) -> conn | nil, err, kind */
static int l_connect(lua_State *L) {
  const char *host = luaL_checkstring(L, 1);
  int port = (int)luaL_checkinteger(L, 2);
  struct timeval tv = to_timeval(luaL_optnumber(L, 3, 5.0));
  redisContext *c = redisConnectWithTimeout(host, port, tv);
  if (!c) return fl_fail(L, "cannot allocate a Redis connection", "memory");
  if (c->err) {
    lua_pushfstring(L, "cannot connect to Redis at %s:%d: %s", host, port, c->errstr);
    redisFree(c);
    return fl_fail(L, lua_tostring(L, -1), "connection");
  }
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

static const luaL_Reg methods[] = {
  { "pipeline", l_pipeline },
  { "ok", l_ok },
  { "close", l_close },
  { NULL, NULL }
};

const luaL_Reg fl_redis_funcs[] = {
  { "redis_connect", l_connect },
  { NULL, NULL }
};

void fl_redis_open(lua_State *L) {
  fl_new_metatable(L, REDIS_MT, l_close, methods);
}
