/* lrepl: the logical replication connection userdata ("flash.repl"). */
#ifndef LREPL_H
#define LREPL_H
#include <lua.h>
#include <lauxlib.h>
void fl_repl_open(lua_State *L);          /* registers the metatable */
extern const luaL_Reg fl_repl_funcs[];    /* core.replication, core.lsn */
#endif
