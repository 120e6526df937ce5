/* fl_value: parsers for PostgreSQL text output forms (int8, float, bytea, array literals).
 * Pure C over (pointer, length) pairs; input is never assumed to be NUL-terminated. */
#include <locale.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "fl_value.h"

int fl_parse_int64(const char *s, size_t len, int64_t *out) {
  const char *p = s, *end = s + len;
  int neg = 0;
  uint64_t v = 0, limit;
  if (p < end && *p == '-') {
    neg = 1;
    p++;
  }
  if (p == end) return -1;
  /* The magnitude of INT64_MIN is one more than INT64_MAX. */
  limit = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
  for (; p < end; p++) {
    unsigned d;
    if (*p < '0' || *p > '9') return -1;
    d = (unsigned)(*p - '0');
    if (v > (limit - d) / 10) return -1;
    v = v * 10 + d;
  }
  if (neg) *out = v == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)v;
  else *out = (int64_t)v;
  return 0;
}

#define FL_DOUBLE_MAX_TEXT 512

static int ieq(const char *s, size_t len, const char *word) {
  size_t i;
  if (strlen(word) != len) return 0;
  for (i = 0; i < len; i++) {
    char c = s[i];
    if (c >= 'A' && c <= 'Z') c = (char)(c - 'A' + 'a');
    if (c != word[i]) return 0;
  }
  return 1;
}

static int is_digit(char c) { return c >= '0' && c <= '9'; }

/* Plain decimal only: strtod would also take leading blanks, hex floats and "nan(...)",
 * none of which PostgreSQL prints, and a value column must not parse differently here
 * than on the server. */
static int decimal_grammar(const char *s, size_t len) {
  const char *p = s, *end = s + len;
  int digits = 0;
  if (p < end && (*p == '-' || *p == '+')) p++;
  while (p < end && is_digit(*p)) p++, digits++;
  if (p < end && *p == '.') {
    p++;
    while (p < end && is_digit(*p)) p++, digits++;
  }
  if (!digits) return 0;
  if (p < end && (*p == 'e' || *p == 'E')) {
    p++;
    if (p < end && (*p == '-' || *p == '+')) p++;
    if (p == end || !is_digit(*p)) return 0;
    while (p < end && is_digit(*p)) p++;
  }
  return p == end;
}

/* Out-of-range text ("1e400") gives what strtod gives, ±HUGE_VAL or a denormal/zero:
 * PostgreSQL never prints such text for a float, and numeric beyond double range is
 * best approximated by infinity. */
int fl_parse_double(const char *s, size_t len, double *out) {
  char tmp[FL_DOUBLE_MAX_TEXT + 1];
  if (len == 0 || len > FL_DOUBLE_MAX_TEXT) return -1;
  /* The spellings float8in accepts; PostgreSQL prints NaN, Infinity, -Infinity. */
  if (ieq(s, len, "nan")) { *out = NAN; return 0; }
  if (ieq(s, len, "infinity") || ieq(s, len, "+infinity") || ieq(s, len, "inf") || ieq(s, len, "+inf")) {
    *out = INFINITY;
    return 0;
  }
  if (ieq(s, len, "-infinity") || ieq(s, len, "-inf")) { *out = -INFINITY; return 0; }
  if (!decimal_grammar(s, len)) return -1;
  memcpy(tmp, s, len);
  tmp[len] = '\0';
  return fl_strtod_copy(tmp, len, out);
}

int fl_strtod_copy(char *buf, size_t len, double *out) {
  const char *dp;
  char *endp;
  size_t i;
  /* strtod honours LC_NUMERIC, which a script may change with os.setlocale; the text
   * always uses '.', so translate it to whatever strtod expects right now. */
  dp = localeconv()->decimal_point;
  if (dp && dp[0] && dp[0] != '.' && !dp[1])
    for (i = 0; i < len; i++)
      if (buf[i] == '.') buf[i] = dp[0];
  *out = strtod(buf, &endp);
  return endp == buf + len ? 0 : -1;
}

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* out == NULL only checks the text and counts the bytes. */
static long bytea_run(const char *s, size_t len, char *out) {
  const char *p = s, *end = s + len;
  size_t n = 0;
  if (len >= 2 && s[0] == '\\' && s[1] == 'x') {
    /* byteain also takes blanks between byte pairs (never inside one); accept what the
     * server accepts so hand-written hex in a JSON payload decodes too. */
    p += 2;
    while (p < end) {
      int hi, lo;
      if (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') {
        p++;
        continue;
      }
      if (end - p < 2) return -1;
      hi = hexval(p[0]);
      lo = hexval(p[1]);
      if (hi < 0 || lo < 0) return -1;
      if (out) out[n] = (char)(hi << 4 | lo);
      n++;
      p += 2;
    }
    return (long)n;
  }
  while (p < end) {
    char c;
    if (*p != '\\') {
      c = *p++;
    } else if (end - p >= 2 && p[1] == '\\') {
      c = '\\';
      p += 2;
    } else if (end - p >= 4 && p[1] >= '0' && p[1] <= '3' && p[2] >= '0' && p[2] <= '7' &&
               p[3] >= '0' && p[3] <= '7') {
      c = (char)((p[1] - '0') << 6 | (p[2] - '0') << 3 | (p[3] - '0'));
      p += 4;
    } else {
      return -1;
    }
    if (out) out[n] = c;
    n++;
  }
  return (long)n;
}

long fl_bytea_decode(const char *s, size_t len, char *out) {
  return bytea_run(s, len, out);
}

/* Every byte written lies at or before the text still to be read (one byte from two hex
 * digits, from one to four escape characters), so out may be s. Checked first, so that
 * malformed text is left as it was. */
long fl_bytea_decode_inplace(char *s, size_t len) {
  if (bytea_run(s, len, NULL) < 0) return -1;
  return bytea_run(s, len, s);
}

/* ---- array literals ---- */

/* PostgreSQL's MAXDIM: deeper text cannot come from the server, and the limit bounds
 * the Lua stack the binding needs. */
#define FL_ARR_MAX_DEPTH 6

enum { AS_START, AS_FIRST, AS_ITEM, AS_AFTER, AS_TAIL, AS_DONE, AS_ERR };

/* The low byte of r->state is the step above; the rest holds the number of dimensions,
 * fixed by the first element seen (0 until then), so that "{1,{2}}" and "{{1},2}" are
 * refused as array_in refuses them, without widening the public struct. */
#define ST_STEP(r) ((r)->state & 0xFF)
#define ST_NDIM(r) ((r)->state >> 8)
#define ST_SET(r, step) ((r)->state = ((r)->state & ~0xFF) | (step))

void fl_arr_init(fl_arr_reader *r, const char *s, size_t len, char delim, char *buf) {
  r->p = s;
  r->end = s + len;
  r->delim = delim;
  r->buf = buf;
  r->depth = 0;
  r->state = AS_START;
  r->err = NULL;
}

static fl_arr_tok arr_fail(fl_arr_reader *r, const char *msg) {
  r->state = AS_ERR;
  r->err = msg;
  return FL_ARR_ERROR;
}

/* array_in's notion of white space (scanner_isspace). */
static int arr_ws(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static void skip_ws(fl_arr_reader *r) {
  while (r->p < r->end && arr_ws(*r->p)) r->p++;
}

static int read_bound(fl_arr_reader *r) {
  int digits = 0;
  if (r->p < r->end && (*r->p == '-' || *r->p == '+')) r->p++;
  while (r->p < r->end && is_digit(*r->p)) r->p++, digits++;
  return digits > 0;
}

/* "[lb:ub][lb:ub]=" (or "[ub]"): only array_out's way of saying the lower bounds are
 * not 1. Lua arrays start at 1 whatever the bounds, so it is checked and skipped. */
static int skip_dims(fl_arr_reader *r) {
  while (r->p < r->end && *r->p == '[') {
    r->p++;
    if (!read_bound(r)) return 0;
    if (r->p < r->end && *r->p == ':') {
      r->p++;
      if (!read_bound(r)) return 0;
    }
    if (r->p >= r->end || *r->p != ']') return 0;
    r->p++;
  }
  skip_ws(r);
  if (r->p >= r->end || *r->p != '=') return 0;
  r->p++;
  skip_ws(r);
  return 1;
}

static fl_arr_tok read_quoted(fl_arr_reader *r, const char **val, size_t *len) {
  const char *p = r->p + 1, *end = r->end;
  char *o = r->buf;
  for (;;) {
    if (p >= end) return arr_fail(r, "unterminated quoted element");
    if (*p == '"') break;
    if (*p == '\\') {
      if (++p >= end) return arr_fail(r, "unterminated quoted element");
    }
    *o++ = *p++;
  }
  r->p = p + 1;
  *val = r->buf;
  *len = (size_t)(o - r->buf);
  return FL_ARR_ELEM;
}

static fl_arr_tok read_unquoted(fl_arr_reader *r, const char **val, size_t *len) {
  const char *p = r->p, *end = r->end;
  char *o = r->buf;
  size_t keep = 0; /* length up to the last byte that trailing-blank trimming must keep */
  int escaped = 0;
  for (;;) {
    if (p >= end) return arr_fail(r, "unexpected end of input");
    if (*p == r->delim || *p == '}') break;
    if (*p == '{' || *p == '"') return arr_fail(r, "unexpected character in element");
    if (*p == '\\') {
      if (++p >= end) return arr_fail(r, "unexpected end of input");
      *o++ = *p++;
      keep = (size_t)(o - r->buf);
      escaped = 1;
      continue;
    }
    *o++ = *p;
    if (!arr_ws(*p)) keep = (size_t)(o - r->buf);
    p++;
  }
  if (keep == 0 && !escaped) return arr_fail(r, "empty element");
  r->p = p;
  /* A NULL spelled with any quoting or escaping is the string "NULL", as in array_in. */
  if (!escaped && keep == 4 && ieq(r->buf, 4, "null")) return FL_ARR_NULL;
  *val = r->buf;
  *len = keep;
  return FL_ARR_ELEM;
}

static fl_arr_tok open_level(fl_arr_reader *r) {
  if (r->depth >= FL_ARR_MAX_DEPTH) return arr_fail(r, "too many dimensions");
  if (ST_NDIM(r) && r->depth >= ST_NDIM(r)) return arr_fail(r, "inconsistent dimensions");
  r->depth++;
  r->p++;
  ST_SET(r, AS_FIRST);
  return FL_ARR_OPEN;
}

static fl_arr_tok close_level(fl_arr_reader *r) {
  r->depth--;
  r->p++;
  ST_SET(r, r->depth == 0 ? AS_TAIL : AS_AFTER);
  return FL_ARR_CLOSE;
}

static fl_arr_tok read_item(fl_arr_reader *r, const char **val, size_t *len) {
  fl_arr_tok t;
  if (*r->p == '{') return open_level(r);
  if (*r->p == '}') return arr_fail(r, "missing element");
  if (ST_NDIM(r) == 0) r->state |= r->depth << 8;
  else if (ST_NDIM(r) != r->depth) return arr_fail(r, "inconsistent dimensions");
  t = *r->p == '"' ? read_quoted(r, val, len) : read_unquoted(r, val, len);
  if (t != FL_ARR_ERROR) ST_SET(r, AS_AFTER);
  return t;
}

fl_arr_tok fl_arr_next(fl_arr_reader *r, const char **val, size_t *len) {
  const char *dummy_v;
  size_t dummy_l;
  if (!val) val = &dummy_v;
  if (!len) len = &dummy_l;
  *val = NULL;
  *len = 0;
  switch (ST_STEP(r)) {
  case AS_DONE: return FL_ARR_END;
  case AS_ERR: return FL_ARR_ERROR;
  case AS_START:
    skip_ws(r);
    if (r->p < r->end && *r->p == '[' && !skip_dims(r)) return arr_fail(r, "malformed dimensions");
    if (r->p >= r->end || *r->p != '{') return arr_fail(r, "expected '{'");
    return open_level(r);
  case AS_TAIL:
    skip_ws(r);
    if (r->p != r->end) return arr_fail(r, "trailing garbage after array");
    r->state = AS_DONE;
    return FL_ARR_END;
  }
  skip_ws(r);
  if (r->p >= r->end) return arr_fail(r, "unexpected end of input");
  switch (ST_STEP(r)) {
  case AS_FIRST:
    if (*r->p == '}') return close_level(r);
    return read_item(r, val, len);
  case AS_ITEM:
    return read_item(r, val, len);
  case AS_AFTER:
    if (*r->p == r->delim) {
      r->p++;
      ST_SET(r, AS_ITEM);
      skip_ws(r);
      if (r->p >= r->end) return arr_fail(r, "unexpected end of input");
      return read_item(r, val, len);
    }
    if (*r->p == '}') return close_level(r);
    return arr_fail(r, "expected delimiter or '}'");
  default:
    return arr_fail(r, "internal: bad reader state");
  }
}
