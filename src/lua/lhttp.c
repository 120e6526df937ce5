/* lhttp: a small HTTP server for Lua ("flash.http") through libmicrohttpd, for the metrics
 * and health endpoints (lua/flash/metrics.lua). No thread of its own: libmicrohttpd runs in
 * external epoll mode, the caller's loop polls server:fd() (one epoll descriptor), waits at
 * most server:timeout() and calls server:run(); each request is answered during run() by
 * the Lua handler given at creation, called protected, in the loop's thread. HTTP parsing
 * is libmicrohttpd's. */
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <microhttpd.h>
#include "lerr.h"
#include "lhttp.h"
#include "lconn.h"

#define HTTP_MT "flash.http"

typedef struct {
  struct MHD_Daemon *d;
  lua_State *L;      /* the state running server:run(); NULL outside it */
  int handler;       /* registry ref of the Lua handler */
  int port;
  unsigned long requests;
} fl_http;

static fl_http *check(lua_State *L) {
  fl_http *h = luaL_checkudata(L, 1, HTTP_MT);
  if (!h->d) luaL_error(L, "HTTP server is closed");
  return h;
}

static enum MHD_Result reply(struct MHD_Connection *conn, unsigned status, const char *type,
                             const char *body, size_t len) {
  struct MHD_Response *r = MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_MUST_COPY);
  if (!r) return MHD_NO;
  MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
  enum MHD_Result ret = MHD_queue_response(conn, status, r);
  MHD_destroy_response(r);
  return ret;
}

/* A request, once its headers are in (GET and HEAD carry no body we read): the handler is
 * called as handler(method, path) and returns status, body, content type. */
static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **req_cls) {
  static int first;
  fl_http *h = cls;
  (void)version; (void)upload_data;
  if (*req_cls == NULL) {   /* the headers: answer on the next call */
    *req_cls = &first;
    return MHD_YES;
  }
  if (*upload_data_size != 0) {   /* a body nobody reads */
    *upload_data_size = 0;
    return MHD_YES;
  }
  if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 && strcmp(method, MHD_HTTP_METHOD_HEAD) != 0) {
    static const char msg[] = "only GET and HEAD\n";
    return reply(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", msg, sizeof msg - 1);
  }
  lua_State *L = h->L;
  h->requests++;
  if (!L || !lua_checkstack(L, 4)) {
    static const char msg[] = "not ready\n";
    return reply(conn, MHD_HTTP_SERVICE_UNAVAILABLE, "text/plain; charset=utf-8", msg, sizeof msg - 1);
  }
  int top = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, h->handler);
  lua_pushstring(L, method);
  lua_pushstring(L, url);
  enum MHD_Result ret;
  if (lua_pcall(L, 2, 3, 0) != 0) {
    size_t len;
    const char *err = lua_tolstring(L, -1, &len);
    char buf[512];
    int n = snprintf(buf, sizeof buf, "internal error: %s\n", err ? err : "?");
    if (n < 0) n = 0;
    if ((size_t)n >= sizeof buf) n = sizeof buf - 1;
    ret = reply(conn, MHD_HTTP_INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8", buf, (size_t)n);
  } else {
    size_t len = 0;
    unsigned status = (unsigned)luaL_optinteger(L, top + 1, 200);
    const char *body = lua_tolstring(L, top + 2, &len);
    const char *type = lua_tostring(L, top + 3);
    ret = reply(conn, status, type ? type : "text/plain; charset=utf-8", body ? body : "", body ? len : 0);
  }
  lua_settop(L, top);
  return ret;
}

/* The listening socket is ours (so that "address in use" or a bad address is an error with
 * its reason), handed to libmicrohttpd. Returns the socket, or -1 with `err` filled.
 * `want`: the address family to try (AF_UNSPEC: any the host name has). */
static int open_socket_in(const char *host, const char *port, int want, int *family, int *eno, char *err,
                          size_t errlen) {
  struct addrinfo hints, *res = NULL, *ai;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = want;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  int rc = getaddrinfo(*host ? host : NULL, port, &hints, &res);
  if (rc != 0) {
    snprintf(err, errlen, "%s", gai_strerror(rc));
    return -1;
  }
  int fd = -1;
  snprintf(err, errlen, "no usable address");
  for (ai = res; ai; ai = ai->ai_next) {
    fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
    if (fd < 0) {
      *eno = errno;
      snprintf(err, errlen, "%s", strerror(errno));
      continue;
    }
    int one = 1, zero = 0;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);   /* a restart reuses the port at once */
    if (ai->ai_family == AF_INET6 && !*host)   /* "every address": IPv4 too, on the same socket */
      setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 32) == 0) {
      *family = ai->ai_family;
      break;
    }
    *eno = errno;
    snprintf(err, errlen, "%s", strerror(errno));
    close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  return fd;
}

/* Host "" means every address: IPv6 and IPv4 on one socket where the system has IPv6,
 * else IPv4's. */
static int open_socket(const char *host, const char *port, int *family, char *err, size_t errlen) {
  int eno = 0;
  if (*host) return open_socket_in(host, port, AF_UNSPEC, family, &eno, err, errlen);
  int fd = open_socket_in(host, port, AF_INET6, family, &eno, err, errlen);
  if (fd < 0 && eno != EADDRINUSE) fd = open_socket_in(host, port, AF_INET, family, &eno, err, errlen);
  return fd;
}

/* core.http_listen(host, port, handler) -> server | nil, err
 * host "" listens on every address; port 0 takes a free port (server:port() says which).
 * Fails as nil, err, kind ("io": the address; "system": libmicrohttpd). */
static int l_listen(lua_State *L) {
  const char *host = luaL_checkstring(L, 1);
  lua_Integer port = luaL_checkinteger(L, 2);
  luaL_checktype(L, 3, LUA_TFUNCTION);
  luaL_argcheck(L, port >= 0 && port <= 65535, 2, "port from 0 to 65535 expected");
  char portbuf[16], err[256];
  snprintf(portbuf, sizeof portbuf, "%d", (int)port);
  int family = AF_INET;
  int fd = open_socket(host, portbuf, &family, err, sizeof err);
  if (fd < 0) return fl_failf(L, "io", "cannot listen on %s:%d: %s", host, (int)port, err);
  fl_http *h = lua_newuserdata(L, sizeof *h);
  memset(h, 0, sizeof *h);
  h->handler = LUA_NOREF;
  luaL_getmetatable(L, HTTP_MT);
  lua_setmetatable(L, -2);
  unsigned flags = MHD_USE_EPOLL | (family == AF_INET6 ? MHD_USE_IPv6 : 0);
  h->d = MHD_start_daemon(flags, 0, NULL, NULL, on_request, h,
                          MHD_OPTION_LISTEN_SOCKET, (MHD_socket)fd,
                          MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)10,
                          MHD_OPTION_CONNECTION_LIMIT, (unsigned int)64,
                          MHD_OPTION_END);
  if (!h->d) {
    close(fd);
    return fl_failf(L, "system", "cannot serve HTTP on %s:%d: libmicrohttpd did not start", host, (int)port);
  }
  const union MHD_DaemonInfo *info = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
  h->port = info ? info->port : (int)port;
  lua_pushvalue(L, 3);
  h->handler = luaL_ref(L, LUA_REGISTRYINDEX);
  return 1;
}

/* server:fd() -> the descriptor to poll for readability */
static int l_fd(lua_State *L) {
  fl_http *h = check(L);
  const union MHD_DaemonInfo *info = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_EPOLL_FD);
  lua_pushinteger(L, info ? info->epoll_fd : -1);
  return 1;
}

/* server:timeout() -> seconds until run() is due anyway, or nil for none */
static int l_timeout(lua_State *L) {
  fl_http *h = check(L);
  MHD_UNSIGNED_LONG_LONG ms;
  if (MHD_get_timeout(h->d, &ms) != MHD_YES) return 0;
  lua_pushnumber(L, (double)ms / 1000.0);
  return 1;
}

/* server:run() : accept, read, answer and write whatever is ready, without waiting */
static int l_run(lua_State *L) {
  fl_http *h = check(L);
  h->L = L;
  MHD_run(h->d);
  h->L = NULL;
  return 0;
}

static int l_port(lua_State *L) {
  fl_http *h = check(L);
  lua_pushinteger(L, h->port);
  return 1;
}

static int l_requests(lua_State *L) {
  fl_http *h = check(L);
  lua_pushnumber(L, (double)h->requests);
  return 1;
}

/* server:close() and __gc: stop listening, drop open connections. Idempotent. */
static int l_close(lua_State *L) {
  fl_http *h = luaL_checkudata(L, 1, HTTP_MT);
  if (h->d) {
    MHD_stop_daemon(h->d);   /* closes the listening socket too */
    h->d = NULL;
  }
  if (h->handler != LUA_NOREF) {
    luaL_unref(L, LUA_REGISTRYINDEX, h->handler);
    h->handler = LUA_NOREF;
  }
  return 0;
}

static const luaL_Reg methods[] = {
  { "fd", l_fd },
  { "timeout", l_timeout },
  { "run", l_run },
  { "port", l_port },
  { "requests", l_requests },
  { "close", l_close },
  { NULL, NULL }
};

const luaL_Reg fl_http_funcs[] = {
  { "http_listen", l_listen },
  { NULL, NULL }
};

void fl_http_open(lua_State *L) {
  fl_new_metatable(L, HTTP_MT, l_close, methods);
}
