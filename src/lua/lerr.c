/* lerr: the one way a binding function returns a run-time failure (lerr.h). */
#include <stdarg.h>
#include <string.h>
#include "lerr.h"

int fl_fail(lua_State *L, const char *msg, const char *kind) {
  size_t n = strlen(msg);
  while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == ' ')) n--;
  lua_pushnil(L);
  lua_pushlstring(L, msg, n);
  lua_pushstring(L, kind);
  return 3;
}

int fl_failf(lua_State *L, const char *kind, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  const char *msg = lua_pushvfstring(L, fmt, ap);
  va_end(ap);
  int n = fl_fail(L, msg, kind);
  lua_remove(L, -4);     /* the formatted message under nil, message, kind */
  return n;
}
