/* lcore: the flash.core module entry point: the poll loop primitive, signals, clocks
 * and the sentinels. Connections live in lconn.c, value decoding in lvalue.c. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <lua.h>
#include <lauxlib.h>
#include "lconn.h"
#include "lerr.h"
#include "lhttp.h"
#include "lrepl.h"
#include "lredis.h"
#include "lvalue.h"
#include "lworkers.h"

/* Signals reach the loop through a self-pipe, so a signal that lands just before poll()
 * still wakes it. These are the only module-level mutable variables of the C side, and they
 * stay process-wide by nature: a process has one disposition per signal, and a handler
 * gets no argument through which it could find a Lua state. They are written by the
 * handler (sig_atomic_t) and by core.signals, which only the state that runs the loop
 * (the host's main state) calls; another Lua state of the process (a worker) leaves them
 * alone and is told to stop by that loop. Everything else lives in a userdata or a
 * state's registry: two states in one process share nothing mutable. */
static int sig_pipe[2] = { -1, -1 };
static volatile sig_atomic_t sig_count = 0;
static volatile sig_atomic_t sig_last = 0;
static struct sigaction old_int, old_term, old_hup;
static int sig_installed = 0;
static int hup_installed = 0;

static void on_signal(int sig) {
  int saved = errno;
  if (sig_count > 0) _exit(128 + sig);   /* the second signal exits at once */
  sig_count++;
  /* The byte first: once sig_last is set, the byte is there for signal_pending to drain
   * (the handler may run on another thread of the process, a worker's). */
  if (sig_pipe[1] >= 0) {
    ssize_t w = write(sig_pipe[1], "s", 1);
    (void)w;
  }
  sig_last = sig;
  errno = saved;
}

/* core.signals(true|false): install or restore SIGINT/SIGTERM handlers, and SIGHUP's (a
 * closed terminal, a dropped ssh session: a graceful stop too, not the default death that
 * left triggers and publications behind) unless it is ignored (nohup): then it stays so. */
static int l_signals(lua_State *L) {
  int on = lua_toboolean(L, 1);
  if (on && !sig_installed) {
    if (sig_pipe[0] < 0) {
      if (pipe(sig_pipe) != 0) return luaL_error(L, "pipe: %s", strerror(errno));
      for (int i = 0; i < 2; i++) {
        fcntl(sig_pipe[i], F_SETFL, fcntl(sig_pipe[i], F_GETFL) | O_NONBLOCK);
        fcntl(sig_pipe[i], F_SETFD, FD_CLOEXEC);
      }
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    struct sigaction cur;
    hup_installed = sigaction(SIGHUP, NULL, &cur) == 0 && cur.sa_handler != SIG_IGN &&
      sigaction(SIGHUP, &sa, &old_hup) == 0;
    signal(SIGPIPE, SIG_IGN);
    sig_installed = 1;
  } else if (!on && sig_installed) {
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    if (hup_installed) sigaction(SIGHUP, &old_hup, NULL);
    hup_installed = 0;
    sig_installed = 0;
  }
  return 0;
}

/* core.signal_pending() -> signal name | nil ; clears the pending mark but keeps the
 * count, so a later signal still exits at once. Called at every turn of the loop: no
 * system call unless a signal came (a byte whose handler has not yet set sig_last wakes
 * poll() again until it has). */
static int l_signal_pending(lua_State *L) {
  char drain[64];
  if (sig_last == 0) return 0;
  if (sig_pipe[0] >= 0) while (read(sig_pipe[0], drain, sizeof drain) > 0) {}
  lua_pushstring(L, sig_last == SIGINT ? "SIGINT" : sig_last == SIGTERM ? "SIGTERM" :
    sig_last == SIGHUP ? "SIGHUP" : "signal");
  sig_last = 0;
  return 1;
}

/* core.poll({fd, ...}, timeout_s) -> { [fd] = true, ... }  (empty on timeout or signal)
 * timeout_s < 0 waits forever. */
static int l_poll(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  double timeout = luaL_optnumber(L, 2, -1);
  int n = (int)lua_objlen(L, 1);
  struct pollfd *fds = lua_newuserdata(L, sizeof(struct pollfd) * (n + 1));
  int nfds = 0;
  for (int i = 1; i <= n; i++) {
    lua_rawgeti(L, 1, i);
    int fd = (int)lua_tointeger(L, -1);
    lua_pop(L, 1);
    if (fd < 0) continue;
    fds[nfds].fd = fd; fds[nfds].events = POLLIN; fds[nfds].revents = 0; nfds++;
  }
  if (sig_pipe[0] >= 0) {
    fds[nfds].fd = sig_pipe[0]; fds[nfds].events = POLLIN; fds[nfds].revents = 0; nfds++;
  }
  int ms = timeout < 0 ? -1 : (int)(timeout * 1000.0 + 0.999);
  int rc = poll(fds, nfds, ms);
  lua_createtable(L, 0, rc > 0 ? rc : 0);
  if (rc < 0 && errno != EINTR) return fl_failf(L, "system", "poll: %s", strerror(errno));
  for (int i = 0; rc > 0 && i < nfds; i++) {
    if (fds[i].revents && fds[i].fd != sig_pipe[0]) {
      lua_pushboolean(L, 1);
      lua_rawseti(L, -2, fds[i].fd);
    }
  }
  return 1;
}

/* core.write_stdout(s) -> true | nil, err: s written whole to fd 1 (after what stdio holds
 * for it), or why not. stdio cannot tell: a line-buffered fwrite whose flush fails
 * (EPIPE: the reader has gone, SIGPIPE being ignored) still reports success, and so does
 * the next fflush once the buffer is empty. */
static int l_write_stdout(lua_State *L) {
  size_t len;
  const char *p = luaL_checklstring(L, 1, &len);
  if (fflush(stdout) != 0) return fl_failf(L, "system", "%s", strerror(errno));
  while (len > 0) {
    ssize_t w = write(STDOUT_FILENO, p, len);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {   /* a non-blocking stdout: wait for room */
        struct pollfd pf = { STDOUT_FILENO, POLLOUT, 0 };
        poll(&pf, 1, -1);
        continue;
      }
      return fl_failf(L, "system", "%s", strerror(errno));
    }
    p += w;
    len -= (size_t)w;
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int l_now(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  lua_pushnumber(L, (double)ts.tv_sec + ts.tv_nsec / 1e9);
  return 1;
}

static int l_time(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  lua_pushnumber(L, (double)ts.tv_sec + ts.tv_nsec / 1e9);
  return 1;
}

static int l_cpu(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  lua_pushnumber(L, (double)ts.tv_sec + ts.tv_nsec / 1e9);
  return 1;
}

static int l_sleep(lua_State *L) {
  double s = luaL_checknumber(L, 1);
  struct timespec ts = { (time_t)s, (long)((s - (time_t)s) * 1e9) };
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
  return 0;
}

static int l_getpid(lua_State *L) {
  lua_pushinteger(L, getpid());
  return 1;
}

/* core.decode(oid, text, [elem], [flags]) -> the Lua value: the type mapping on its own,
 * for tests and for users who read text values from elsewhere. */
static int l_decode(lua_State *L) {
  fl_coltype t;
  size_t len;
  t.oid = (uint32_t)luaL_checknumber(L, 1);
  const char *s = lua_isnil(L, 2) ? NULL : luaL_checklstring(L, 2, &len);
  t.elem = (uint32_t)luaL_optnumber(L, 3, 0);
  t.delim = ',';
  fl_push_value(L, &t, s, s ? len : 0, (int)luaL_optinteger(L, 4, 0));
  return 1;
}

/* core.release_memory() : after a large row, give its memory back (see fl_release_memory). */
static int l_release_memory(lua_State *L) {
  fl_release_memory(L);
  return 0;
}

static const luaL_Reg core_funcs[] = {
  { "signals", l_signals },
  { "signal_pending", l_signal_pending },
  { "poll", l_poll },
  { "write_stdout", l_write_stdout },
  { "now", l_now },
  { "time", l_time },
  { "cpu", l_cpu },
  { "sleep", l_sleep },
  { "getpid", l_getpid },
  { "decode", l_decode },
  { "release_memory", l_release_memory },
  { NULL, NULL }
};

int luaopen_flash_core(lua_State *L) {
  fl_conn_open(L);
  fl_repl_open(L);
  fl_redis_open(L);
  fl_http_open(L);
  fl_workers_open(L);
  lua_newtable(L);
  luaL_register(L, NULL, core_funcs);
  luaL_register(L, NULL, fl_conn_funcs);
  luaL_register(L, NULL, fl_repl_funcs);
  luaL_register(L, NULL, fl_redis_funcs);
  luaL_register(L, NULL, fl_http_funcs);
  luaL_register(L, NULL, fl_workers_funcs);
  fl_value_open(L);
  lua_pushlightuserdata(L, FL_NULL);
  lua_setfield(L, -2, "null");
  lua_pushlightuserdata(L, FL_UNCHANGED);
  lua_setfield(L, -2, "unchanged");
  lua_pushinteger(L, FL_NUMERIC_AS_NUMBER);
  lua_setfield(L, -2, "NUMERIC_AS_NUMBER");
  return 1;
}
