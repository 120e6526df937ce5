/* fl_json: a validating pull reader for JSON text. Pure C (no Lua, no libpq), so the
 * trigger payloads and json/jsonb columns can be decoded and fuzzed without a server. */
#ifndef FL_JSON_H
#define FL_JSON_H
#include <stddef.h>

#define FL_JSON_MAX_DEPTH 1000

typedef enum {
  FL_JSON_OBJ_OPEN, FL_JSON_OBJ_CLOSE,
  FL_JSON_ARR_OPEN, FL_JSON_ARR_CLOSE,
  FL_JSON_KEY,      /* an object key; val and len: unescaped UTF-8 */
  FL_JSON_STRING,   /* val and len: unescaped UTF-8 (may contain NUL from \u0000) */
  FL_JSON_NUMBER,   /* val and len: the number's raw text, already checked against the grammar */
  FL_JSON_TRUE, FL_JSON_FALSE, FL_JSON_NULL,
  FL_JSON_END,      /* the whole input was one value followed only by white space */
  FL_JSON_ERROR     /* r->err says what, r->pos where (byte offset) */
} fl_json_tok;

typedef struct {
  const char *s, *p, *end;
  char *buf;            /* scratch for unescaped strings, >= input length bytes */
  int depth;
  unsigned char stack[FL_JSON_MAX_DEPTH];  /* 'o' or 'a' per open container */
  int state;            /* internal: what may come next */
  const char *err;      /* static message on FL_JSON_ERROR */
  size_t pos;
} fl_json_reader;

/* buf must hold at least len bytes; it is reused by each string token, so copy a
 * token's value before the next call. */
void fl_json_init(fl_json_reader *r, const char *s, size_t len, char *buf);
fl_json_tok fl_json_next(fl_json_reader *r, const char **val, size_t *len);

#endif
