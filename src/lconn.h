/* lconn: the libpq connection userdata ("flash.conn") and trigger-payload decoding. */
#ifndef LCONN_H
#define LCONN_H
#include <lua.h>
void fl_conn_open(lua_State *L);    /* registers metatables; leaves nothing on the stack */
extern const luaL_Reg fl_conn_funcs[];  /* module-level functions: connect, layout, decode_payload */
#endif
