/* fl_value: PostgreSQL text-form parsers used by the value decoder. Pure C. */
#ifndef FL_VALUE_H
#define FL_VALUE_H
#include <stddef.h>
#include <stdint.h>

/* Well-known type OIDs (pg_type.h). */
enum {
  FL_BOOLOID = 16, FL_BYTEAOID = 17, FL_INT8OID = 20, FL_INT2OID = 21, FL_INT4OID = 23,
  FL_OIDOID = 26, FL_JSONOID = 114, FL_FLOAT4OID = 700, FL_FLOAT8OID = 701,
  FL_NUMERICOID = 1700, FL_JSONBOID = 3802
};

/* Decimal int64 text ("-9223372036854775808".."9223372036854775807"). 0 ok, -1 malformed/overflow. */
int fl_parse_int64(const char *s, size_t len, int64_t *out);

/* float4/float8/int2/int4/oid text incl. "NaN", "Infinity", "-Infinity". 0 ok, -1 malformed. */
int fl_parse_double(const char *s, size_t len, double *out);

/* strtod over buf[0..len), a NUL-terminated copy the caller owns: '.' is translated in
 * place to the locale's decimal point first. 0 when all of it was consumed, else -1. */
int fl_strtod_copy(char *buf, size_t len, double *out);

/* bytea text in either output form: hex ("\x0a0b") or escape ("a\\b\001").
 * out must hold len bytes. Returns bytes written, or -1 when malformed. */
long fl_bytea_decode(const char *s, size_t len, char *out);
/* The same, decoded over the text itself (a large value needs no second buffer); s is
 * left unchanged when malformed. */
long fl_bytea_decode_inplace(char *s, size_t len);

/* A pull reader for array literals: "{1,2,NULL}", "{{a,b},{c,d}}", "{\"x y\",\"q\\\"\"}",
 * with an optional dimension prefix "[0:1]={...}". delim is pg_type.typdelim (',' mostly,
 * ';' for box). Quoted and backslash-escaped elements are unescaped into buf. */
typedef enum { FL_ARR_OPEN, FL_ARR_CLOSE, FL_ARR_ELEM, FL_ARR_NULL, FL_ARR_END, FL_ARR_ERROR } fl_arr_tok;

typedef struct {
  const char *p, *end;
  char delim;
  char *buf;          /* >= input length bytes */
  int depth;
  int state;          /* internal */
  const char *err;
} fl_arr_reader;

void fl_arr_init(fl_arr_reader *r, const char *s, size_t len, char delim, char *buf);
fl_arr_tok fl_arr_next(fl_arr_reader *r, const char **val, size_t *len);

#endif
