/* lworkers: parallel handler states (flash.client{ workers = N }, lua/flash/workers.lua).
 * Each worker is a thread with its own lua_State (the OpenResty worker model: nothing
 * mutable is shared between states); events reach it as serialized bytes through its own
 * bounded fl_queue, and completions come back through one shared queue. The main state
 * only ever touches the pool through this file's "flash.workers" userdata. */
#define _GNU_SOURCE   /* pthread_tryjoin_np */
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>
#include "fl_queue.h"
#include "lerr.h"
#include "lworkers.h"

#define WORKERS_MT "flash.workers"

int luaopen_flash_core(lua_State *L);

/* Tags of the messages on the completion queue. */
enum { TAG_READY = 1, TAG_DONE = 2, TAG_EXIT = 3 };

struct pool;
typedef struct worker {
  struct pool *pool;
  int idx;              /* 1-based, as Lua sees it */
  int running;          /* a thread was created (to join) */
  pthread_t th;
  fl_queue in;
} worker;

typedef struct pool {
  int n;
  worker *w;
  fl_queue done;
  char *path, *cpath, *handlers, *config;
} pool;

typedef struct { pool *p; } pool_box;

static char *dup_str(const char *s) {
  size_t n = strlen(s);
  char *d = malloc(n + 1);
  if (d) memcpy(d, s, n + 1);
  return d;
}

static char *dup_bytes(const char *s, size_t n) {
  char *d = malloc(n + 1);
  if (d) { memcpy(d, s, n); d[n] = '\0'; }
  return d;
}

/* A message to the main state; waits for room (the main state collects while it waits). */
static void post(pool *p, int tag, uint64_t id, double value, const char *data, size_t len) {
  fl_msg m = { id, tag, value, NULL, 0 };
  if (data) {
    m.data = dup_bytes(data, len);
    m.len = m.data ? len : 0;
  }
  if (fl_queue_push(&p->done, &m, -1) != 0) free(m.data);
}

/* In a worker state: take() -> id, bytes | nil once the queue is closed. */
static int w_take(lua_State *L) {
  worker *w = lua_touserdata(L, lua_upvalueindex(1));
  fl_msg m;
  if (fl_queue_pop(&w->in, &m, -1) != 0) return 0;
  lua_pushnumber(L, (lua_Number)m.id);
  lua_pushlstring(L, m.data ? m.data : "", m.len);
  free(m.data);
  return 2;
}

/* In a worker state: done(id, err|nil, seconds) */
static int w_done(lua_State *L) {
  worker *w = lua_touserdata(L, lua_upvalueindex(1));
  uint64_t id = (uint64_t)luaL_checknumber(L, 1);
  size_t len = 0;
  const char *err = lua_isnoneornil(L, 2) ? NULL : luaL_checklstring(L, 2, &len);
  post(w->pool, TAG_DONE, id, luaL_optnumber(L, 3, 0), err, len);
  return 0;
}

/* In a worker state: ready(names) : the handlers are loaded; names lists their functions. */
static int w_ready(lua_State *L) {
  worker *w = lua_touserdata(L, lua_upvalueindex(1));
  size_t len;
  const char *names = luaL_checklstring(L, 1, &len);
  post(w->pool, TAG_READY, (uint64_t)w->idx, 0, names, len);
  return 0;
}

/* What a worker state's loop calls, each bound to its worker. */
static const luaL_Reg worker_ctx[] = {
  { "take", w_take },
  { "done", w_done },
  { "ready", w_ready },
  { NULL, NULL }
};

static int w_traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  lua_getglobal(L, "debug");
  lua_getfield(L, -1, "traceback");
  lua_pushstring(L, msg ? msg : "(error object is not a string)");
  lua_pushinteger(L, 2);
  lua_call(L, 2, 1);
  return 1;
}

/* The state's body: flash.workers._worker(ctx, idx, handlers, config) loads the handlers
 * and loops on take(). */
static int w_body(lua_State *L) {
  worker *w = lua_touserdata(L, 1);
  pool *p = w->pool;
  luaL_openlibs(L);
  lua_getglobal(L, "package");
  lua_pushstring(L, p->path);
  lua_setfield(L, -2, "path");
  lua_pushstring(L, p->cpath);
  lua_setfield(L, -2, "cpath");
  lua_getfield(L, -1, "preload");
  lua_pushcfunction(L, luaopen_flash_core);
  lua_setfield(L, -2, "flash.core");
  lua_pop(L, 2);
  lua_getglobal(L, "require");
  lua_pushstring(L, "flash.workers");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "_worker");
  lua_createtable(L, 0, 3);
  for (const luaL_Reg *f = worker_ctx; f->name; f++) {
    lua_pushlightuserdata(L, w);
    lua_pushcclosure(L, f->func, 1);
    lua_setfield(L, -2, f->name);
  }
  lua_pushinteger(L, w->idx);
  lua_pushstring(L, p->handlers);
  lua_pushstring(L, p->config);
  lua_call(L, 4, 0);
  return 0;
}

static void *worker_main(void *arg) {
  worker *w = arg;
  lua_State *L = luaL_newstate();
  if (L == NULL) {
    const char *msg = "cannot create a Lua state (out of memory)";
    post(w->pool, TAG_EXIT, (uint64_t)w->idx, 0, msg, strlen(msg));
  } else {
    lua_pushcfunction(L, w_traceback);
    lua_pushcfunction(L, w_body);
    lua_pushlightuserdata(L, w);
    if (lua_pcall(L, 1, 0, 1) != 0) {
      size_t len;
      const char *msg = lua_tolstring(L, -1, &len);
      if (msg == NULL) { msg = "(error object is not a string)"; len = strlen(msg); }
      post(w->pool, TAG_EXIT, (uint64_t)w->idx, 0, msg, len);
    } else {
      post(w->pool, TAG_EXIT, (uint64_t)w->idx, 0, NULL, 0);
    }
    lua_close(L);
  }
  /* Nothing more is taken from this queue: a push to it fails instead of waiting. */
  fl_queue_abort(&w->in);
  return NULL;
}

/* Stops the threads (drain: each takes what is queued first; else after its current
 * event), joins them and frees everything. Idempotent through the box. */
static void pool_free(pool *p, int drain) {
  for (int i = 0; i < p->n; i++) {
    if (drain) fl_queue_close(&p->w[i].in); else fl_queue_abort(&p->w[i].in);
  }
  /* A worker waiting for room on the completion queue must not hold the join up. */
  if (!drain) fl_queue_abort(&p->done);
  for (int i = 0; i < p->n; i++) {
    if (p->w[i].running) {
      if (drain) {
        /* Completions keep coming while the workers finish; discard them so none waits. */
        fl_msg m;
        while (pthread_tryjoin_np(p->w[i].th, NULL) != 0) {
          if (fl_queue_pop(&p->done, &m, 0.01) == 0) free(m.data);
        }
      } else {
        pthread_join(p->w[i].th, NULL);
      }
    }
    fl_queue_destroy(&p->w[i].in);
  }
  fl_queue_destroy(&p->done);
  free(p->w);
  free(p->path);
  free(p->cpath);
  free(p->handlers);
  free(p->config);
  free(p);
}

static const char *opt_string(lua_State *L, const char *k) {
  lua_getfield(L, 1, k);
  const char *s = lua_tostring(L, -1);
  if (s == NULL) luaL_error(L, "workers_start: option '%s' (string) missing", k);
  lua_pop(L, 1);   /* the string stays alive: the options table holds it */
  return s;
}

static lua_Integer opt_int(lua_State *L, const char *k) {
  lua_getfield(L, 1, k);
  lua_Integer v = lua_tointeger(L, -1);
  lua_pop(L, 1);
  return v;
}

/* core.workers_start{ n =, queue =, path =, cpath =, handlers =, config = } -> pool
 * n threads, each with a state that loads `handlers` (a file) with `config` (JSON text);
 * queue: events each worker's queue holds. */
static int l_workers_start(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_Integer n = opt_int(L, "n"), cap = opt_int(L, "queue");
  if (n < 1 || n > 1024) return luaL_argerror(L, 1, "n: 1 to 1024 workers expected");
  if (cap < 1) return luaL_argerror(L, 1, "queue: a capacity >= 1 expected");
  const char *path = opt_string(L, "path"), *cpath = opt_string(L, "cpath");
  const char *handlers = opt_string(L, "handlers"), *config = opt_string(L, "config");
  pool_box *box = lua_newuserdata(L, sizeof *box);
  box->p = NULL;
  luaL_getmetatable(L, WORKERS_MT);
  lua_setmetatable(L, -2);
  pool *p = calloc(1, sizeof *p);
  if (p == NULL) return luaL_error(L, "workers_start: out of memory");
  p->w = calloc((size_t)n, sizeof *p->w);
  p->path = dup_str(path);
  p->cpath = dup_str(cpath);
  p->handlers = dup_str(handlers);
  p->config = dup_str(config);
  /* Room for every completion the workers can owe: their queues, one each in hand, and
   * the ready and exit messages. */
  if (!p->w || !p->path || !p->cpath || !p->handlers || !p->config ||
      fl_queue_init(&p->done, (size_t)n * ((size_t)cap + 3)) != 0) {
    free(p->w); free(p->path); free(p->cpath); free(p->handlers); free(p->config); free(p);
    return luaL_error(L, "workers_start: out of memory");
  }
  p->n = (int)n;
  for (int i = 0; i < p->n; i++) {
    p->w[i].pool = p;
    p->w[i].idx = i + 1;
    if (fl_queue_init(&p->w[i].in, (size_t)cap) != 0) {
      for (int j = 0; j < i; j++) fl_queue_destroy(&p->w[j].in);
      p->n = 0;
      pool_free(p, 0);
      return luaL_error(L, "workers_start: out of memory");
    }
  }
  box->p = p;
  /* Signals go to the main thread (its loop watches for them): the workers block them. */
  sigset_t block, old;
  sigemptyset(&block);
  sigaddset(&block, SIGINT);
  sigaddset(&block, SIGTERM);
  sigaddset(&block, SIGHUP);
  sigaddset(&block, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &block, &old);
  int failed = 0;
  for (int i = 0; i < p->n && !failed; i++) {
    if (pthread_create(&p->w[i].th, NULL, worker_main, &p->w[i]) != 0) failed = 1;
    else p->w[i].running = 1;
  }
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (failed) {
    box->p = NULL;
    pool_free(p, 0);
    return luaL_error(L, "workers_start: cannot create a thread");
  }
  return 1;
}

static pool *check_pool(lua_State *L) {
  pool_box *box = luaL_checkudata(L, 1, WORKERS_MT);
  if (box->p == NULL) luaL_error(L, "the worker pool is closed");
  return box->p;
}

/* pool:push(i, id, bytes, timeout_s) -> true | false (queue i still full) | nil, err
 * (worker i has exited). */
static int l_push(lua_State *L) {
  pool *p = check_pool(L);
  lua_Integer i = luaL_checkinteger(L, 2);
  if (i < 1 || i > p->n) return luaL_argerror(L, 2, "no such worker");
  uint64_t id = (uint64_t)luaL_checknumber(L, 3);
  size_t len;
  const char *s = luaL_checklstring(L, 4, &len);
  double timeout = luaL_optnumber(L, 5, 0);
  fl_msg m = { id, 0, 0, dup_bytes(s, len), len };
  if (m.data == NULL) return luaL_error(L, "out of memory");
  int rc = fl_queue_push(&p->w[i - 1].in, &m, timeout);
  if (rc == 0) { lua_pushboolean(L, 1); return 1; }
  free(m.data);
  if (rc == 1) { lua_pushboolean(L, 0); return 1; }
  return fl_failf(L, "stopped", "worker %d has exited", (int)i);
}

/* pool:collect([timeout_s]) -> { tag, id, seconds, text|false, ... } : every completion
 * waiting now (after waiting at most timeout_s for the first). Tags: 1 ready (id = the
 * worker, text = its handler names), 2 done (text = the error, or false), 3 exited (id =
 * the worker, text = why, or false after a clean stop). */
static int l_collect(lua_State *L) {
  pool *p = check_pool(L);
  double timeout = luaL_optnumber(L, 2, 0);
  lua_newtable(L);
  int k = 0;
  fl_msg m;
  while (fl_queue_pop(&p->done, &m, k == 0 ? timeout : 0) == 0) {
    lua_pushinteger(L, m.tag);
    lua_rawseti(L, -2, ++k);
    lua_pushnumber(L, (lua_Number)m.id);
    lua_rawseti(L, -2, ++k);
    lua_pushnumber(L, m.value);
    lua_rawseti(L, -2, ++k);
    if (m.data) lua_pushlstring(L, m.data, m.len); else lua_pushboolean(L, 0);
    lua_rawseti(L, -2, ++k);
    free(m.data);
    if (k >= 4 * 4096) break;
  }
  return 1;
}

/* pool:queued() -> events waiting in the workers' queues (not yet taken). */
static int l_queued(lua_State *L) {
  pool *p = check_pool(L);
  size_t n = 0;
  for (int i = 0; i < p->n; i++) n += fl_queue_count(&p->w[i].in);
  lua_pushinteger(L, (lua_Integer)n);
  return 1;
}

/* pool:close([drain]) : stops and joins every worker (drain: after what is queued). */
static int l_close(lua_State *L) {
  pool_box *box = luaL_checkudata(L, 1, WORKERS_MT);
  if (box->p) {
    pool *p = box->p;
    box->p = NULL;
    pool_free(p, lua_toboolean(L, 2));
  }
  return 0;
}

static int l_gc(lua_State *L) {
  lua_settop(L, 1);
  return l_close(L);
}

static const luaL_Reg pool_methods[] = {
  { "push", l_push },
  { "collect", l_collect },
  { "queued", l_queued },
  { "close", l_close },
  { NULL, NULL }
};

const luaL_Reg fl_workers_funcs[] = {
  { "workers_start", l_workers_start },
  { NULL, NULL }
};

void fl_workers_open(lua_State *L) {
  if (luaL_newmetatable(L, WORKERS_MT)) {
    lua_newtable(L);
    luaL_register(L, NULL, pool_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
}
