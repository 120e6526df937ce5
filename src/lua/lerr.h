/* lerr: how a binding function reports a run-time failure to Lua: nil, message, kind.
 * kind is the SQLSTATE when the server sent one, else a short word ("connection",
 * "protocol", "memory", "io", "usage", "callback", "stopped", "parse", "system", "redis").
 * Programmer errors (a wrong argument) still raise. */
#ifndef LERR_H
#define LERR_H
#include <lua.h>

/* Pushes nil, msg (trailing newlines and spaces trimmed), kind; returns 3. */
int fl_fail(lua_State *L, const char *msg, const char *kind);
/* The same with a lua_pushfstring format (%s %d %f %p %c %%). */
int fl_failf(lua_State *L, const char *kind, const char *fmt, ...);

#endif
