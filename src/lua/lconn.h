/* lconn: the libpq connection userdata ("flash.conn") and trigger-payload decoding. */
#ifndef LCONN_H
#define LCONN_H
#include <lua.h>
#include <libpq-fe.h>

/* Pushes nil, message, kind for a failed result (the "ERROR:  " prefix dropped; kind the
 * SQLSTATE, or "connection" / "protocol" when there is none, lerr.h) and
 * clears it; returns 3. res may be NULL (the connection's message is used). */
int fl_push_pgerror(lua_State *L, PGconn *pg, PGresult *res);
void fl_conn_open(lua_State *L);    /* registers metatables; leaves nothing on the stack */
/* Registers userdata metatable `name`: __gc, and `methods` (may be NULL) as __index. */
void fl_new_metatable(lua_State *L, const char *name, lua_CFunction gc, const luaL_Reg *methods);
extern const luaL_Reg fl_conn_funcs[];  /* module-level functions: connect, layout */
#endif
