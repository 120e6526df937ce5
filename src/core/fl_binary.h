/* fl_binary: PostgreSQL binary send forms (typsend output: pgoutput with binary = true,
 * the flashlua plugin's 'b' values) read into C values, each the same value the type's
 * canonical text form gives (DateStyle=ISO, TimeZone=UTC, IntervalStyle=postgres,
 * extra_float_digits >= 1).
 * Pure C: no Lua, no libpq. Malformed input returns -1; nothing is read out of bounds. */
#ifndef FL_BINARY_H
#define FL_BINARY_H
#include <stddef.h>
#include <stdint.h>

/* What a scalar became. */
typedef enum {
  FL_BIN_BOOL,      /* i: 0 or 1 */
  FL_BIN_INT,       /* i: int2, int4, int8, oid */
  FL_BIN_FLOAT,     /* d: float8 exactly; float4 as the double of its shortest decimal text */
  FL_BIN_TEXT,      /* s, len: the type's canonical text (numeric, dates, times, intervals, uuid, "char") */
  FL_BIN_BYTES,     /* s, len: bytes as they are (text-like types, bytea, json) */
  FL_BIN_JSON       /* s, len: JSON text (jsonb, whose version byte is read off) */
} fl_bin_kind;

typedef struct {
  fl_bin_kind kind;
  int64_t i;
  double d;
  const char *s;    /* into the input (BYTES, JSON) or into the caller's buffer (TEXT) */
  size_t len;
} fl_bin_value;

/* Whether fl_bin_scalar reads the send form of base type oid exactly (built-in types only). */
int fl_bin_supported(uint32_t oid);

/* The buffer fl_bin_scalar needs for the text of p[0..len) of type oid (numeric's text can
 * be far longer than its send form; the others need at most FL_BIN_TEXT_MAX). */
#define FL_BIN_TEXT_MAX 96
size_t fl_bin_text_size(uint32_t oid, const char *p, size_t len);

/* Reads the send form p[0..len) of type oid. buf (cap bytes, at least fl_bin_text_size)
 * takes text values. 0 on success, -1 when malformed, unsupported or buf is too small. */
int fl_bin_scalar(uint32_t oid, const char *p, size_t len, char *buf, size_t cap, fl_bin_value *out);

/* A pull reader of array_send's form: int32 ndim, int32 has-nulls flag, element type OID,
 * per dimension int32 size and lower bound, then the elements in row-major order, each an
 * int32 length (-1: NULL) and its bytes. fl_bin_arr_init checks the header: 0, or -1
 * (more than 6 dimensions, a negative size, more elements than the bytes could hold). */
#define FL_BIN_MAXDIM 6
typedef struct {
  const unsigned char *p, *end;
  int ndim;
  int dims[FL_BIN_MAXDIM];
  uint32_t elemtype;
  long total, seen;      /* elements announced, read so far */
  int failed;            /* an ERROR was returned: every later call returns it too */
} fl_bin_arr;

typedef enum { FL_BIN_ARR_ELEM, FL_BIN_ARR_NULL, FL_BIN_ARR_END, FL_BIN_ARR_ERROR } fl_bin_arr_tok;

int fl_bin_arr_init(fl_bin_arr *a, const char *p, size_t len);
/* The next element: its bytes (ELEM), NULL, END once every announced element was read and
 * the input is used up, ERROR when an element runs past the end or bytes are left over
 * (and from then on). */
fl_bin_arr_tok fl_bin_arr_next(fl_bin_arr *a, const char **val, size_t *len);

#endif
