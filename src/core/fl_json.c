/* fl_json: validating pull reader for JSON text (RFC 8259). Every read is bounded by
 * r->end, so payloads from the network can be decoded (and fuzzed) without trusting them. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "fl_json.h"

enum {
  ST_TOP,        /* the one top-level value */
  ST_VALUE,      /* a value after ':' or ',' in an array */
  ST_ARR_FIRST,  /* after '[': a value or ']' */
  ST_OBJ_FIRST,  /* after '{': a key or '}' */
  ST_OBJ_KEY,    /* after ',' in an object: a key (so "{\"a\":1,}" is caught) */
  ST_COLON,      /* after a key */
  ST_AFTER,      /* after a value: ',' or a closer, or the end at depth 0 */
  ST_DONE,
  ST_ERR
};

void fl_json_init(fl_json_reader *r, const char *s, size_t len, char *buf) {
  r->s = s;
  r->p = s;
  r->end = s + len;
  r->buf = buf;
  r->depth = 0;
  r->state = ST_TOP;
  r->err = NULL;
  r->pos = 0;
}

static fl_json_tok fail(fl_json_reader *r, const char *at, const char *msg) {
  r->state = ST_ERR;
  r->err = msg;
  r->pos = (size_t)(at - r->s);
  return FL_JSON_ERROR;
}

static int is_ws(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* Reads the 4 hex digits of a \u escape starting at p; -1 when short or not hex. */
static long hex4(const char *p, const char *end) {
  long v = 0;
  int i;
  if (end - p < 4) return -1;
  for (i = 0; i < 4; i++) {
    int h = hexval(p[i]);
    if (h < 0) return -1;
    v = v * 16 + h;
  }
  return v;
}

static char *put_utf8(char *o, unsigned long cp) {
  if (cp < 0x80) {
    *o++ = (char)cp;
  } else if (cp < 0x800) {
    *o++ = (char)(0xC0 | (cp >> 6));
    *o++ = (char)(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    *o++ = (char)(0xE0 | (cp >> 12));
    *o++ = (char)(0x80 | ((cp >> 6) & 0x3F));
    *o++ = (char)(0x80 | (cp & 0x3F));
  } else {
    *o++ = (char)(0xF0 | (cp >> 18));
    *o++ = (char)(0x80 | ((cp >> 12) & 0x3F));
    *o++ = (char)(0x80 | ((cp >> 6) & 0x3F));
    *o++ = (char)(0x80 | (cp & 0x3F));
  }
  return o;
}

/* r->p is at the opening quote. Unescapes into r->buf; the output never outgrows the
 * input (the longest expansion, a surrogate pair, turns 12 bytes into 4), so a buf of
 * the input's length is enough. Bytes >= 0x80 pass through unchecked: the server has
 * already validated them against its encoding, which need not be UTF-8. */
static fl_json_tok read_string(fl_json_reader *r, fl_json_tok kind, const char **val, size_t *len) {
  const char *p = r->p + 1, *end = r->end;
  char *o = r->buf;
  for (;;) {
    unsigned char c;
    if (p >= end) return fail(r, p, "unterminated string");
    c = (unsigned char)*p;
    if (c == '"') break;
    if (c < 0x20) return fail(r, p, "control character in string");
    if (c != '\\') {
      *o++ = (char)c;
      p++;
      continue;
    }
    if (end - p < 2) return fail(r, p, "unterminated string");
    switch (p[1]) {
    case '"': *o++ = '"'; break;
    case '\\': *o++ = '\\'; break;
    case '/': *o++ = '/'; break;
    case 'b': *o++ = '\b'; break;
    case 'f': *o++ = '\f'; break;
    case 'n': *o++ = '\n'; break;
    case 'r': *o++ = '\r'; break;
    case 't': *o++ = '\t'; break;
    case 'u': {
      long cp = hex4(p + 2, end), lo;
      if (cp < 0) return fail(r, p, "invalid \\u escape");
      if (cp >= 0xDC80 && cp <= 0xDCFF) {
        /* A lone U+DC80..U+DCFF is how fl_json_escape writes a byte that is part of no
         * valid UTF-8 sequence: the byte itself. */
        *o++ = (char)(cp - 0xDC00);
        p += 6;
        continue;
      }
      if (cp >= 0xDC00 && cp <= 0xDFFF) return fail(r, p, "lone surrogate");
      if (cp >= 0xD800 && cp <= 0xDBFF) {
        /* A high surrogate only means something together with the low one after it. */
        if (end - p < 12 || p[6] != '\\' || p[7] != 'u') return fail(r, p, "lone surrogate");
        lo = hex4(p + 8, end);
        if (lo < 0) return fail(r, p + 6, "invalid \\u escape");
        if (lo < 0xDC00 || lo > 0xDFFF) return fail(r, p, "lone surrogate");
        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        p += 6;
      }
      o = put_utf8(o, (unsigned long)cp);
      p += 4;
      break;
    }
    default:
      return fail(r, p, "invalid escape");
    }
    p += 2;
  }
  r->p = p + 1;
  *val = r->buf;
  *len = (size_t)(o - r->buf);
  return kind;
}

static int is_digit(char c) { return c >= '0' && c <= '9'; }

static fl_json_tok read_number(fl_json_reader *r, const char **val, size_t *len) {
  const char *p = r->p, *end = r->end;
  if (*p == '-') p++;
  if (p >= end) return fail(r, p, "unexpected end of input");
  if (*p == '0') {
    p++;
    /* "01" is not JSON; say so instead of a vaguer complaint about the '1'. */
    if (p < end && is_digit(*p)) return fail(r, p, "leading zero in number");
  } else if (is_digit(*p)) {
    while (p < end && is_digit(*p)) p++;
  } else {
    return fail(r, p, "invalid number");
  }
  if (p < end && *p == '.') {
    p++;
    if (p >= end || !is_digit(*p)) return fail(r, p, "invalid number");
    while (p < end && is_digit(*p)) p++;
  }
  if (p < end && (*p == 'e' || *p == 'E')) {
    p++;
    if (p < end && (*p == '+' || *p == '-')) p++;
    if (p >= end || !is_digit(*p)) return fail(r, p, "invalid number");
    while (p < end && is_digit(*p)) p++;
  }
  *val = r->p;
  *len = (size_t)(p - r->p);
  r->p = p;
  return FL_JSON_NUMBER;
}

static fl_json_tok read_literal(fl_json_reader *r, const char *word, size_t n, fl_json_tok tok) {
  size_t have = (size_t)(r->end - r->p);
  if (have < n) {
    if (memcmp(r->p, word, have) == 0) return fail(r, r->end, "unexpected end of input");
    return fail(r, r->p, "invalid literal");
  }
  if (memcmp(r->p, word, n) != 0) return fail(r, r->p, "invalid literal");
  r->p += n;
  return tok;
}

static fl_json_tok read_value(fl_json_reader *r, const char **val, size_t *len) {
  fl_json_tok t;
  switch (*r->p) {
  case '{':
  case '[':
    if (r->depth >= FL_JSON_MAX_DEPTH) return fail(r, r->p, "nesting too deep");
    if (*r->p == '{') {
      r->stack[r->depth++] = 'o';
      r->state = ST_OBJ_FIRST;
      t = FL_JSON_OBJ_OPEN;
    } else {
      r->stack[r->depth++] = 'a';
      r->state = ST_ARR_FIRST;
      t = FL_JSON_ARR_OPEN;
    }
    r->p++;
    return t;
  case '"': t = read_string(r, FL_JSON_STRING, val, len); break;
  case 't': t = read_literal(r, "true", 4, FL_JSON_TRUE); break;
  case 'f': t = read_literal(r, "false", 5, FL_JSON_FALSE); break;
  case 'n': t = read_literal(r, "null", 4, FL_JSON_NULL); break;
  default:
    if (*r->p == '-' || is_digit(*r->p)) t = read_number(r, val, len);
    else return fail(r, r->p, "unexpected character");
  }
  if (t != FL_JSON_ERROR) r->state = ST_AFTER;
  return t;
}

static fl_json_tok close_container(fl_json_reader *r) {
  fl_json_tok t = r->stack[--r->depth] == 'o' ? FL_JSON_OBJ_CLOSE : FL_JSON_ARR_CLOSE;
  r->p++;
  r->state = ST_AFTER;
  return t;
}

fl_json_tok fl_json_next(fl_json_reader *r, const char **val, size_t *len) {
  const char *dummy_v;
  size_t dummy_l;
  if (!val) val = &dummy_v;
  if (!len) len = &dummy_l;
  *val = NULL;
  *len = 0;
  for (;;) {
    if (r->state == ST_DONE) return FL_JSON_END;
    if (r->state == ST_ERR) return FL_JSON_ERROR;
    while (r->p < r->end && is_ws(*r->p)) r->p++;
    if (r->state == ST_AFTER && r->depth == 0) {
      if (r->p != r->end) return fail(r, r->p, "trailing garbage after value");
      r->state = ST_DONE;
      return FL_JSON_END;
    }
    if (r->p >= r->end) return fail(r, r->p, "unexpected end of input");
    switch (r->state) {
    case ST_TOP:
    case ST_VALUE:
      return read_value(r, val, len);
    case ST_ARR_FIRST:
      if (*r->p == ']') return close_container(r);
      return read_value(r, val, len);
    case ST_OBJ_FIRST:
      if (*r->p == '}') return close_container(r);
      /* fall through */
    case ST_OBJ_KEY:
      if (*r->p != '"') return fail(r, r->p, "expected string key");
      {
        fl_json_tok t = read_string(r, FL_JSON_KEY, val, len);
        if (t == FL_JSON_KEY) r->state = ST_COLON;
        return t;
      }
    case ST_COLON:
      if (*r->p != ':') return fail(r, r->p, "expected ':'");
      r->p++;
      r->state = ST_VALUE;
      continue;
    case ST_AFTER: {
      char top = (char)r->stack[r->depth - 1];
      if (*r->p == ',') {
        r->p++;
        r->state = top == 'o' ? ST_OBJ_KEY : ST_VALUE;
        continue;
      }
      if ((top == 'o' && *r->p == '}') || (top == 'a' && *r->p == ']')) return close_container(r);
      return fail(r, r->p, top == 'o' ? "expected ',' or '}'" : "expected ',' or ']'");
    }
    default:
      return fail(r, r->p, "internal: bad reader state");
    }
  }
}

/* ---- numbers ---- */

/* A decimal as its significant digits: value = sign * 0.d1 d2 ... dn * 10^(exp10 + 1),
 * i.e. exp10 is the power of ten of the leading digit. Only the first NUM_KEEP digits are
 * kept; nsig counts them all. Exponents are clamped far outside any double's range, so
 * text such as "1e99999999999999999999" cannot overflow the arithmetic. */
#define NUM_KEEP 20
#define EXP_CLAMP 1000000000LL
typedef struct {
  int neg;
  long long nsig;
  long long exp10;
  char dig[NUM_KEEP];
} fl_decimal;

/* Parses JSON number text into d. 0 ok, -1 when s[0..len) is not exactly a JSON number. */
static int decimal_parse(const char *s, size_t len, fl_decimal *d) {
  const char *p = s, *end = s + len, *int0, *int1, *frac0 = NULL, *frac1 = NULL;
  long long e = 0, pos = 0, first = -1, last = -1, ndig;
  int eneg = 0;
  d->neg = 0;
  if (p < end && *p == '-') { d->neg = 1; p++; }
  int0 = p;
  if (p >= end || !is_digit(*p)) return -1;
  if (*p == '0') p++;
  else while (p < end && is_digit(*p)) p++;
  int1 = p;
  if (p < end && *p == '.') {
    frac0 = ++p;
    while (p < end && is_digit(*p)) p++;
    frac1 = p;
    if (frac1 == frac0) return -1;
  }
  if (p < end && (*p == 'e' || *p == 'E')) {
    p++;
    if (p < end && (*p == '+' || *p == '-')) eneg = *p++ == '-';
    if (p >= end || !is_digit(*p)) return -1;
    while (p < end && is_digit(*p)) {
      if (e < EXP_CLAMP) e = e * 10 + (*p - '0');
      p++;
    }
    if (eneg) e = -e;
  }
  if (p != end) return -1;
  /* The digits of both parts as one sequence, positions 0..ndig-1. */
  ndig = (long long)(int1 - int0) + (frac0 ? (long long)(frac1 - frac0) : 0);
  for (pos = 0; pos < ndig; pos++) {
    char c = pos < int1 - int0 ? int0[pos] : frac0[pos - (int1 - int0)];
    if (c != '0') {
      if (first < 0) first = pos;
      last = pos;
    }
  }
  if (first < 0) {
    d->nsig = 0;
    d->exp10 = 0;
    return 0;
  }
  d->nsig = last - first + 1;
  for (pos = first; pos <= last && pos - first < NUM_KEEP; pos++)
    d->dig[pos - first] = pos < int1 - int0 ? int0[pos] : frac0[pos - (int1 - int0)];
  /* The leading digit sits (int length - 1 - first) places left of the decimal point. */
  d->exp10 = e + ((long long)(int1 - int0) - 1 - first);
  return 0;
}

/* strtod of the kept digits as "[-]D.DDDe+X": '.' never appears, so no locale matters. */
static double decimal_to_double(const fl_decimal *d) {
  char buf[NUM_KEEP + 32];
  int n = d->nsig < 17 ? (int)d->nsig : 17;
  long long e = d->exp10 - (n - 1);
  snprintf(buf, sizeof buf, "%s%.*se%lld", d->neg ? "-" : "", n, d->dig, e);
  return strtod(buf, NULL);
}

int fl_json_number(const char *s, size_t len, double *out) {
  fl_decimal d, back;
  char txt[FL_JSON_NUM_MAX];
  size_t n;
  double v;
  if (decimal_parse(s, len, &d) != 0) return -1;
  if (d.nsig == 0) {
    *out = d.neg ? -0.0 : 0.0;
    return 1;
  }
  if (d.exp10 > 400) {
    *out = d.neg ? -HUGE_VAL : HUGE_VAL;
    return 0;
  }
  if (d.exp10 < -400) {
    *out = d.neg ? -0.0 : 0.0;
    return 0;
  }
  if (d.nsig <= 15) {
    /* Clinger's fast path: a mantissa below 2^53 times or divided by an exact power of
     * ten (<= 1e22) rounds once, correctly, so the common numbers need no strtod. */
    static const double pow10[] = { 1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10,
      1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22 };
    long long p10 = d.exp10 - (d.nsig - 1), i;
    if (p10 >= -22 && p10 <= 22) {
      int64_t m = 0;
      for (i = 0; i < d.nsig; i++) m = m * 10 + (d.dig[i] - '0');
      v = p10 >= 0 ? (double)m * pow10[p10] : (double)m / pow10[-p10];
      *out = d.neg ? -v : v;
      /* <= 15 digits read back as themselves (DBL_DIG) while in the normal range. */
      return 1;
    }
  }
  v = decimal_to_double(&d);
  *out = v;
  /* A double's shortest form has at most 17 digits. */
  if (d.nsig > 17) return 0;
  /* DBL_DIG: up to 15 digits survive text -> double -> text, in the normal range. */
  if (d.nsig <= 15 && d.exp10 >= -290 && d.exp10 <= 290) return 1;
  n = fl_json_format_double(v, txt);
  if (n == 0 || v == 0) return 0;
  if (decimal_parse(txt, n, &back) != 0) return 0;
  return back.neg == d.neg && back.nsig == d.nsig && back.exp10 == d.exp10 &&
         memcmp(back.dig, d.dig, (size_t)d.nsig) == 0;
}

size_t fl_json_format_double(double d, char *out) {
  char tmp[FL_JSON_NUM_MAX];
  size_t i, o = 0;
  int p;
  if (!isfinite(d)) {
    out[0] = '\0';
    return 0;
  }
  if (d == floor(d) && fabs(d) < 9007199254740992.0) {
    /* A whole number's digits, as "%.0f" prints them ("-0" for minus zero) but without
     * printf's arbitrary-precision path: ids, counts and integer columns are most of the
     * numbers encoded. */
    char digits[20];
    unsigned long long u = (unsigned long long)fabs(d);
    int k = 0;
    do {
      digits[k++] = (char)('0' + u % 10);
      u /= 10;
    } while (u > 0);
    if (signbit(d)) out[o++] = '-';
    while (k > 0) out[o++] = digits[--k];
    out[o] = '\0';
    return o;
  } else {
    /* The first precision that reads back: 15 digits always do for a double that came
     * from text of 15 digits or fewer, so 0.1 stays "0.1" (subnormals, with fewer bits,
     * start from 1 digit). strtod here runs in the same locale as snprintf, so their
     * decimal points agree. */
    for (p = fabs(d) < 2.2250738585072014e-308 ? 1 : 15; p <= 17; p++) {
      snprintf(tmp, sizeof tmp, "%.*g", p, d);
      if (strtod(tmp, NULL) == d) break;
    }
  }
  /* The locale's decimal point (one or more bytes that are neither digit, sign nor
   * exponent) becomes '.'. */
  for (i = 0; tmp[i] != '\0'; i++) {
    char c = tmp[i];
    if (is_digit(c) || c == '-' || c == '+' || c == 'e' || c == 'E') {
      out[o++] = c;
    } else if (o == 0 || out[o - 1] != '.') {
      out[o++] = '.';
    }
  }
  out[o] = '\0';
  return o;
}

size_t fl_utf8_seq(const unsigned char *s, size_t i, size_t len) {
  unsigned char c = s[i], lo = 0x80, hi = 0xBF;
  size_t n, k;
  if (c >= 0xC2 && c <= 0xDF) n = 2;
  else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    if (c == 0xE0) lo = 0xA0;
    else if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    if (c == 0xF0) lo = 0x90;
    else if (c == 0xF4) hi = 0x8F;
  } else return 0;
  if (len - i < n) return 0;
  if (s[i + 1] < lo || s[i + 1] > hi) return 0;
  for (k = 2; k < n; k++)
    if (s[i + k] < 0x80 || s[i + k] > 0xBF) return 0;
  return n;
}

size_t fl_json_piece(const char *s, size_t n, size_t max) {
  const unsigned char *u = (const unsigned char *)s;
  size_t k = max;
  if (n <= max) return n;
  /* The next piece must not start with a continuation byte of a sequence begun in this
   * one (at most 3 back: no sequence is longer than 4 bytes). */
  while (k > max - 3 && (u[k] & 0xC0) == 0x80) k--;
  return (u[k] & 0xC0) == 0x80 ? max : k;
}

size_t fl_json_escape(const char *s, size_t len, char *out) {
  static const char hex[] = "0123456789abcdef";
  const unsigned char *u = (const unsigned char *)s;
  char *o = out;
  size_t i;
  for (i = 0; i < len; i++) {
    unsigned char c = u[i];
    if (c >= 0x20 && c < 0x80 && c != '"' && c != '\\') {
      *o++ = (char)c;
      continue;
    }
    if (c >= 0x80) {
      size_t n = fl_utf8_seq(u, i, len);
      if (n > 0) {
        memcpy(o, s + i, n);
        o += n;
        i += n - 1;
        continue;
      }
      /* A byte of no valid sequence: U+DC80..U+DCFF, a lone low surrogate (PEP 383's
       * "surrogateescape"), which no text can mean, so fl_json_next gives the byte back. */
      memcpy(o, "\\udc", 4);
      o += 4;
      *o++ = hex[c >> 4];
      *o++ = hex[c & 15];
      continue;
    }
    *o++ = '\\';
    switch (c) {
    case '"': *o++ = '"'; break;
    case '\\': *o++ = '\\'; break;
    case '\b': *o++ = 'b'; break;
    case '\f': *o++ = 'f'; break;
    case '\n': *o++ = 'n'; break;
    case '\r': *o++ = 'r'; break;
    case '\t': *o++ = 't'; break;
    default:
      *o++ = 'u';
      *o++ = '0';
      *o++ = '0';
      *o++ = hex[c >> 4];
      *o++ = hex[c & 15];
    }
  }
  return (size_t)(o - out);
}
