/* lredis: a Redis connection for Lua ("flash.redis") through hiredis. */
#ifndef LREDIS_H
#define LREDIS_H
#include <lua.h>
#include <lauxlib.h>

void fl_redis_open(lua_State *L);      /* registers the metatable; leaves nothing on the stack */
extern const luaL_Reg fl_redis_funcs[]; /* module-level functions: redis_connect */
#endif
