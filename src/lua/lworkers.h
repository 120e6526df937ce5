/* lworkers: parallel handler states ("flash.workers"): N LuaJIT states on N threads. */
#ifndef LWORKERS_H
#define LWORKERS_H
#include <lua.h>
#include <lauxlib.h>

void fl_workers_open(lua_State *L);      /* registers the metatable; leaves nothing on the stack */
extern const luaL_Reg fl_workers_funcs[]; /* module-level functions: workers_start */
#endif
