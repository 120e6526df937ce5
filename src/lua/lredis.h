/* lredis: a Redis connection for Lua ("flash.redis") through hiredis. */
#ifndef LREDIS_H
#define LREDIS_H
#include <lua.h>
#include <lauxlib.h>
#include <stddef.h>
#include <stdint.h>

void fl_redis_open(lua_State *L);      /* registers the metatable; leaves nothing on the stack */
extern const luaL_Reg fl_redis_funcs[]; /* module-level functions: redis_connect */

/* The sink's outbox for lrepl's direct path (a change encoded from its decoded row straight
 * into the outbox, with no Lua event: repl:direct). */
typedef struct fl_outbox fl_outbox;
fl_outbox *fl_outbox_check(lua_State *L, int idx);   /* raises unless idx is an outbox */
int fl_outbox_connected(const fl_outbox *o);
uint32_t fl_outbox_partitions(const fl_outbox *o);
/* FNV-1a, 32 bits, with h carried over from the bytes before (2166136261 to start): the
 * partition hash, hash(table "\0" key) % partitions. */
uint32_t fl_fnv1a(uint32_t h, const char *s, size_t n);
/* The hash of a partition key's first part: the table's name and "\0" (fl_fnv1a goes on
 * with the key's texts, "\0" between them). */
uint32_t fl_partition_hash(const char *table, size_t len);
/* The text tostring gives a key number that is whole, below 1e14 and not -0 (its digits,
 * as LuaJIT's "%.14g" prints them) into buf (24 bytes): its length, or 0 for any other
 * number (its text is tostring's to make). */
size_t fl_key_number(double d, char *buf);
/* Appends an entry (XADD <stream>:<partition> [MAXLEN ~ n] * id <id> event <body>) to the
 * connection's output, and keeps its command until drop() says Redis answered it, so that
 * a new connection gets it again (readd). 0, or -1 out of memory (nothing was added). */
int fl_outbox_add_entry(fl_outbox *o, uint32_t partition, const char *id, size_t id_len, const char *body,
                        size_t body_len);
#endif
