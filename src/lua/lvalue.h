/* lvalue: PostgreSQL text value -> Lua value, by type OID (API.md type table).
 * The one decoder every driver shares. */
#ifndef LVALUE_H
#define LVALUE_H
#include <stddef.h>
#include <stdint.h>
#include <lua.h>

/* Column type information needed to decode a value. */
typedef struct {
  uint32_t oid;       /* the column's type OID */
  uint32_t elem;      /* element type OID when oid is an array type, else 0 */
  char delim;         /* array delimiter (pg_type.typdelim of the element type), ',' default */
} fl_coltype;

#define FL_NUMERIC_AS_NUMBER 1
/* The caller made room for FL_VALUE_SLOTS stack slots (lua_checkstack): the push functions
 * below skip their own check, which is a tenth of a small value's cost. A caller pushing
 * many values checks once for all of them. */
#define FL_STACK_READY 0x100
#define FL_VALUE_SLOTS 4

/* Light userdata sentinels: NULL (same as cjson.null) and "unchanged TOAST". */
#define FL_NULL ((void *)0)
extern char fl_unchanged_sentinel;
#define FL_UNCHANGED ((void *)&fl_unchanged_sentinel)

/* The element type of a built-in array type OID (int4[] -> int4, ...), or 0. Used where
 * the catalog was not asked (query results, pgoutput columns of built-in types). */
uint32_t fl_builtin_elem(uint32_t oid);

/* Pushes exactly one value. s == NULL pushes flash.null. Malformed input for a typed
 * column (e.g. bad JSON) falls back to pushing the text as a string: the user gets the
 * value, never a crash. flags: FL_NUMERIC_AS_NUMBER, FL_STACK_READY. */
void fl_push_value(lua_State *L, const fl_coltype *t, const char *s, size_t len, int flags);
/* What fl_push_value makes of a scalar's text, without Lua: FL_VAL_NULL (s == NULL),
 * FL_VAL_NUMBER (*num), FL_VAL_STRING (the text itself), FL_VAL_TRUE, FL_VAL_FALSE, or
 * FL_VAL_OTHER (arrays, JSON, bytea, a number's text past 512 bytes: fl_push_value's). */
enum { FL_VAL_NULL, FL_VAL_NUMBER, FL_VAL_STRING, FL_VAL_TRUE, FL_VAL_FALSE, FL_VAL_OTHER };
int fl_value_scalar(const fl_coltype *t, const char *s, size_t len, int flags, double *num);
/* The same for text the caller owns and does not read again: it may be overwritten
 * (a bytea is decoded in place). */
void fl_push_value_owned(lua_State *L, const fl_coltype *t, char *s, size_t len, int flags);

/* The same for a value in its binary send form (pgoutput's binary = true, the flashlua
 * plugin's 'b' values): the Lua value its text form gives, for the types fl_binary reads
 * (fl_binary_supported) and arrays of them. Any other type, or malformed bytes, pushes the
 * bytes as they are and returns -1; 0 otherwise. */
int fl_push_value_binary(lua_State *L, const fl_coltype *t, const char *s, size_t len, int flags);
int fl_binary_supported(const fl_coltype *t);

/* Gives back memory after a large value: a full Lua collection, then malloc_trim. */
void fl_release_memory(lua_State *L);

/* Pushes the Lua value of JSON text s (objects/arrays as tables marked with flash.object_mt
 * and flash.array_mt, null as flash.null, numbers no double holds exactly as
 * { text = "..." } marked with flash.number_mt).
 * Returns 0, or -1 with nothing pushed when s is not valid JSON. */
int fl_push_json(lua_State *L, const char *s, size_t len);
/* The same, saying why on failure: *err (static) and *pos (byte offset); either may be NULL. */
int fl_push_json_err(lua_State *L, const char *s, size_t len, const char **err, size_t *pos);

/* JSON of Lua values for C callers (the Redis sink), by flash.json.encode's rules
 * (flash.unchanged raises), into a buffer the caller owns: grown with realloc, and still
 * the caller's to free when an encoding raises half-way (b->len then stays as it was). */
typedef struct {
  char *p;
  size_t len, cap;
} fl_jbuf;
/* Pushes the marker metatables fl_json_put needs (3 slots); returns the first's index. */
int fl_json_markers(lua_State *L);
/* Appends the JSON of the value at idx (an absolute index) to b. */
void fl_json_put(lua_State *L, int idx, int markers, fl_jbuf *b);

/* Adds json_encode, json_decode and the marker metatables (array_mt, object_mt,
 * number_mt) to the module table on top of the stack. */
void fl_value_open(lua_State *L);

#endif
