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
  FL_JSON_STRING,   /* val and len: unescaped UTF-8 (may contain NUL from \u0000; a lone
                       \udc80..\udcff is the byte 0x80..0xff, as fl_json_escape writes it) */
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

/* Numbers without losing digits. A JSON number becomes a double only when printing that
 * double back (fl_json_format_double) gives the same decimal value; otherwise its text is
 * the value. Returns 1 (*out is that double), 0 (no double prints back as this number:
 * more than 17 significant digits, or out of range; *out is the nearest double, +-HUGE_VAL
 * or +-0), or -1 when s is not a JSON number. Never reads past s + len. */
int fl_json_number(const char *s, size_t len, double *out);

/* The shortest text that reads back as d: "0.1", "12345", "-0", "1e+300", whatever the
 * locale's decimal point. out holds FL_JSON_NUM_MAX bytes (NUL-terminated); returns the
 * length, or 0 for NaN and +-Infinity, which JSON has no number for. */
#define FL_JSON_NUM_MAX 32
size_t fl_json_format_double(double d, char *out);

/* s as the inside of a JSON string: '"', '\\' and control characters escaped, valid UTF-8
 * as it is, and each byte that is part of no valid UTF-8 sequence (a SQL_ASCII database's
 * text holds any bytes) as \udc80..\udcff: a lone low surrogate, PEP 383's
 * "surrogateescape", which fl_json_next reads back as that byte. So the output is always
 * UTF-8 and the bytes come back exactly. out holds 6 * len bytes; returns bytes written. */
size_t fl_json_escape(const char *s, size_t len, char *out);
/* How much of s (n bytes) to escape in one piece of at most max bytes (max >= 4): max,
 * or less so that the piece does not end inside a UTF-8 sequence -- escaped apart, its
 * two halves would each be taken for stray bytes. */
size_t fl_json_piece(const char *s, size_t n, size_t max);

/* The length of the valid UTF-8 sequence at s[i] (i < len, s[i] >= 0x80) within s[0..len),
 * or 0 when that byte starts none: RFC 3629's table, so no overlong forms, no surrogates,
 * nothing past U+10FFFF. */
size_t fl_utf8_seq(const unsigned char *s, size_t i, size_t len);

#endif
