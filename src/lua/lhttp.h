/* lhttp: a small HTTP server for Lua ("flash.http") through libmicrohttpd, driven by the
 * caller's own poll loop. */
#ifndef LHTTP_H
#define LHTTP_H
#include <lua.h>
#include <lauxlib.h>

void fl_http_open(lua_State *L);      /* registers the metatable; leaves nothing on the stack */
extern const luaL_Reg fl_http_funcs[]; /* module-level functions: http_listen */
#endif
