/* fl_binary: built-in types' binary send forms read into the values their canonical text
 * gives (see fl_binary.h). Every read is checked against the end of the input: the bytes
 * come from the network. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "fl_binary.h"

enum {
  BOOL_T = 16, BYTEA_T = 17, CHAR_T = 18, NAME_T = 19, INT8_T = 20, INT2_T = 21, INT4_T = 23,
  TEXT_T = 25, OID_T = 26, JSON_T = 114, FLOAT4_T = 700, FLOAT8_T = 701, BPCHAR_T = 1042,
  VARCHAR_T = 1043, DATE_T = 1082, TIME_T = 1083, TIMESTAMP_T = 1114, TIMESTAMPTZ_T = 1184,
  TIMETZ_T = 1266, NUMERIC_T = 1700, UUID_T = 2950, JSONB_T = 3802, INTERVAL_T = 1186
};

#define USECS_PER_DAY 86400000000LL
#define UNIX_DAYS_AT_PG_EPOCH 10957    /* 2000-01-01, PostgreSQL's day 0, in days since 1970 */

static uint32_t be32(const unsigned char *p) {
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t be64(const unsigned char *p) {
  return (uint64_t)be32(p) << 32 | be32(p + 4);
}

static int16_t be16s(const unsigned char *p) {
  return (int16_t)(uint16_t)((unsigned)p[0] << 8 | p[1]);
}

/* Decimal digits without printf, which cost a quarter of a consumer's time on rows of
 * timestamps and numerics. */
static char *put_uint(char *o, uint64_t v) {
  char tmp[20];
  int n = 0;
  do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v);
  while (n) *o++ = tmp[--n];
  return o;
}

/* v in exactly `width` digits, zero-padded (v < 10^width). */
static char *put_pad(char *o, unsigned v, int width) {
  for (int i = width - 1; i >= 0; i--) { o[i] = (char)('0' + v % 10); v /= 10; }
  return o + width;
}

/* At least `width` digits. */
static char *put_min(char *o, uint64_t v, int width) {
  uint64_t lim = 1;
  for (int i = 1; i < width; i++) lim *= 10;
  if (v >= lim) return put_uint(o, v);
  return put_pad(o, (unsigned)v, width);
}

static char *put_str(char *o, const char *s) {
  while (*s) *o++ = *s++;
  return o;
}

int fl_bin_supported(uint32_t oid) {
  switch (oid) {
    case BOOL_T: case BYTEA_T: case CHAR_T: case NAME_T: case INT8_T: case INT2_T: case INT4_T:
    case TEXT_T: case OID_T: case JSON_T: case FLOAT4_T: case FLOAT8_T: case BPCHAR_T:
    case VARCHAR_T: case DATE_T: case TIME_T: case TIMESTAMP_T: case TIMESTAMPTZ_T: case TIMETZ_T:
    case NUMERIC_T: case UUID_T: case JSONB_T: case INTERVAL_T:
      return 1;
    default:
      return 0;
  }
}

/* --- numeric: int16 ndigits, weight, sign, dscale, then ndigits base-10000 digits ----- */

#define NUM_POS 0x0000
#define NUM_NEG 0x4000
#define NUM_NAN 0xC000
#define NUM_PINF 0xD000
#define NUM_NINF 0xF000

size_t fl_bin_text_size(uint32_t oid, const char *p, size_t len) {
  const unsigned char *u = (const unsigned char *)p;
  long weight, dscale;
  if (oid != NUMERIC_T || len < 8) return FL_BIN_TEXT_MAX;
  weight = be16s(u + 2);
  dscale = be16s(u + 6);
  if (dscale < 0) dscale = 0;
  /* sign, integer groups (4 digits each, at least "0"), point, fraction rounded up to a
   * whole group, NUL */
  return (size_t)(1 + 4 * (weight >= 0 ? weight + 1 : 1) + 1 + dscale + 4 + 1);
}

/* The text numeric_out writes: the integer part without leading zeros (at least "0"),
 * then exactly dscale fraction digits. */
static int numeric_text(const unsigned char *p, size_t len, char *buf, size_t cap, fl_bin_value *out) {
  int ndigits, weight, dscale, d, i;
  unsigned sign;
  char *o = buf;
  if (len < 8) return -1;
  ndigits = be16s(p);
  weight = be16s(p + 2);
  sign = (uint16_t)be16s(p + 4);
  dscale = be16s(p + 6);
  if (ndigits < 0 || dscale < 0 || len != 8 + 2 * (size_t)ndigits) return -1;
  if (sign == NUM_NAN || sign == NUM_PINF || sign == NUM_NINF) {
    const char *s = sign == NUM_NAN ? "NaN" : sign == NUM_PINF ? "Infinity" : "-Infinity";
    if (cap < strlen(s) + 1) return -1;
    strcpy(buf, s);
    out->kind = FL_BIN_TEXT;
    out->s = buf;
    out->len = strlen(s);
    return 0;
  }
  if (sign != NUM_POS && sign != NUM_NEG) return -1;
  for (i = 0; i < ndigits; i++) {
    int g = be16s(p + 8 + 2 * i);
    if (g < 0 || g > 9999) return -1;
  }
  if (cap < fl_bin_text_size(NUMERIC_T, (const char *)p, len)) return -1;
  if (sign == NUM_NEG) *o++ = '-';
  if (weight < 0) {
    *o++ = '0';
  } else {
    for (d = 0; d <= weight; d++) {
      int g = d < ndigits ? be16s(p + 8 + 2 * d) : 0;
      o = d == 0 ? put_uint(o, (unsigned)g) : put_pad(o, (unsigned)g, 4);
    }
  }
  if (dscale > 0) {
    char *point = o;
    *o++ = '.';
    for (i = 0, d = weight + 1; i < dscale; i += 4, d++) {
      int g = d >= 0 && d < ndigits ? be16s(p + 8 + 2 * d) : 0;
      o = put_pad(o, (unsigned)g, 4);
    }
    o = point + 1 + dscale;
  }
  *o = '\0';
  out->kind = FL_BIN_TEXT;
  out->s = buf;
  out->len = (size_t)(o - buf);
  return 0;
}

/* --- dates and times -------------------------------------------------------------------- */

/* Proleptic Gregorian civil date of a day count from 1970-01-01, astronomical years (0 is
 * 1 BC), by the era arithmetic of H. Hinnant's "chrono-compatible low-level date
 * algorithms": a 400-year era holds 146097 days, and a year counted from March puts the
 * leap day last. */
static void civil_from_days(int64_t z, int64_t *y, int *m, int *d) {
  int64_t era, doe, yoe, doy, mp;
  z += 719468;                                   /* days from 0000-03-01 */
  era = (z >= 0 ? z : z - 146096) / 146097;
  doe = z - era * 146097;                        /* [0, 146096] */
  yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;   /* [0, 399] */
  doy = doe - (365 * yoe + yoe / 4 - yoe / 100); /* [0, 365], from March 1st */
  mp = (5 * doy + 2) / 153;                      /* [0, 11], March = 0 */
  *d = (int)(doy - (153 * mp + 2) / 5 + 1);
  *m = (int)(mp < 10 ? mp + 3 : mp - 9);
  *y = yoe + era * 400 + (*m <= 2);
}

/* "YYYY-MM-DD" (at least 4 year digits), years <= 0 as BC years (0 is 1 BC). */
static char *put_date(char *o, int64_t pgdays, int *bc) {
  int64_t y;
  int m, d;
  civil_from_days(pgdays + UNIX_DAYS_AT_PG_EPOCH, &y, &m, &d);
  *bc = y <= 0;
  if (*bc) y = -(y - 1);
  o = put_min(o, (uint64_t)y, 4);
  *o++ = '-';
  o = put_pad(o, (unsigned)m, 2);
  *o++ = '-';
  return put_pad(o, (unsigned)d, 2);
}

/* "HH:MM:SS" and, when there is one, the fraction without trailing zeros. */
static char *put_time(char *o, int64_t us) {
  int64_t h = us / 3600000000LL, rest = us % 3600000000LL;
  int frac = (int)(rest % 1000000);
  o = put_min(o, (uint64_t)h, 2);
  *o++ = ':';
  o = put_pad(o, (unsigned)(rest / 60000000), 2);
  *o++ = ':';
  o = put_pad(o, (unsigned)(rest / 1000000 % 60), 2);
  if (frac) {
    *o++ = '.';
    o = put_pad(o, (unsigned)frac, 6);
    while (o[-1] == '0') o--;
  }
  return o;
}

/* A UTC offset as timetz_out writes it: +HH, +HH:MM or +HH:MM:SS; zone is seconds west. */
static char *put_zone(char *o, int32_t zone) {
  long a = labs((long)zone);
  long h = a / 3600, mi = a / 60 % 60, s = a % 60;
  *o++ = zone <= 0 ? '+' : '-';
  o = put_pad(o, (unsigned)h, 2);
  if (mi || s) {
    *o++ = ':';
    o = put_pad(o, (unsigned)mi, 2);
  }
  if (s) {
    *o++ = ':';
    o = put_pad(o, (unsigned)s, 2);
  }
  return o;
}

static int timestamp_text(const unsigned char *p, size_t len, int tz, char *buf, fl_bin_value *out) {
  int64_t t, days, us;
  int bc;
  char *o = buf;
  if (len != 8) return -1;
  t = (int64_t)be64(p);
  if (t == INT64_MAX || t == INT64_MIN) {
    o = put_str(o, t == INT64_MAX ? "infinity" : "-infinity");
  } else {
    days = t / USECS_PER_DAY;
    us = t % USECS_PER_DAY;
    if (us < 0) { us += USECS_PER_DAY; days--; }
    o = put_date(o, days, &bc);
    *o++ = ' ';
    o = put_time(o, us);
    if (tz) o = put_str(o, "+00");
    if (bc) o = put_str(o, " BC");
  }
  out->kind = FL_BIN_TEXT;
  out->s = buf;
  out->len = (size_t)(o - buf);
  return 0;
}

static int date_text(const unsigned char *p, size_t len, char *buf, fl_bin_value *out) {
  int32_t d;
  int bc;
  char *o = buf;
  if (len != 4) return -1;
  d = (int32_t)be32(p);
  if (d == INT32_MAX || d == INT32_MIN) {
    o = put_str(o, d == INT32_MAX ? "infinity" : "-infinity");
  } else {
    o = put_date(o, d, &bc);
    if (bc) o = put_str(o, " BC");
  }
  out->kind = FL_BIN_TEXT;
  out->s = buf;
  out->len = (size_t)(o - buf);
  return 0;
}

static int time_text(const unsigned char *p, size_t len, int tz, char *buf, fl_bin_value *out) {
  int64_t t;
  char *o;
  if (len != (tz ? 12u : 8u)) return -1;
  t = (int64_t)be64(p);
  if (t < 0 || t > USECS_PER_DAY) return -1;
  o = put_time(buf, t);
  if (tz) {
    int32_t zone = (int32_t)be32(p + 8);
    if (zone < -15 * 3600 - 59 * 60 - 59 || zone > 15 * 3600 + 59 * 60 + 59) return -1;
    o = put_zone(o, zone);
  }
  out->kind = FL_BIN_TEXT;
  out->s = buf;
  out->len = (size_t)(o - buf);
  return 0;
}

/* --- interval: int64 microseconds, int32 days, int32 months; as interval_out writes it
 * under IntervalStyle=postgres: "1 year 2 mons -3 days +04:05:06.7", "00:00:00" ------- */

/* A nonzero field: separated by a blank, a "+" when the field before was negative and
 * this one is not, the unit in the plural unless the value is 1. */
static char *interval_part(char *o, int64_t v, const char *unit, int *zero, int *before) {
  if (v == 0) return o;
  if (!*zero) *o++ = ' ';
  if (*before && v > 0) *o++ = '+';
  if (v < 0) { *o++ = '-'; o = put_uint(o, (uint64_t)0 - (uint64_t)v); }
  else o = put_uint(o, (uint64_t)v);
  *o++ = ' ';
  o = put_str(o, unit);
  if (v != 1) *o++ = 's';
  *before = v < 0;
  *zero = 0;
  return o;
}

static int interval_text(const unsigned char *p, size_t len, char *buf, fl_bin_value *out) {
  int64_t t, h, mi, sec, frac;
  int32_t days, months;
  int zero = 1, before = 0;
  char *o = buf;
  if (len != 16) return -1;
  t = (int64_t)be64(p);
  days = (int32_t)be32(p + 8);
  months = (int32_t)be32(p + 12);
  o = interval_part(o, months / 12, "year", &zero, &before);
  o = interval_part(o, months % 12, "mon", &zero, &before);
  o = interval_part(o, days, "day", &zero, &before);
  /* every part of the time takes the sign of the whole (division truncates) */
  h = t / 3600000000LL;
  t -= h * 3600000000LL;
  mi = t / 60000000;
  t -= mi * 60000000;
  sec = t / 1000000;
  frac = t - sec * 1000000;
  if (zero || h || mi || sec || frac) {
    int minus = h < 0 || mi < 0 || sec < 0 || frac < 0;
    if (!zero) *o++ = ' ';
    if (minus) *o++ = '-';
    else if (before) *o++ = '+';
    o = put_min(o, h < 0 ? (uint64_t)0 - (uint64_t)h : (uint64_t)h, 2);
    *o++ = ':';
    o = put_pad(o, (unsigned)(mi < 0 ? -mi : mi), 2);
    *o++ = ':';
    o = put_pad(o, (unsigned)(sec < 0 ? -sec : sec), 2);
    if (frac) {
      *o++ = '.';
      o = put_pad(o, (unsigned)(frac < 0 ? -frac : frac), 6);
      while (o[-1] == '0') o--;
    }
  }
  out->kind = FL_BIN_TEXT;
  out->s = buf;
  out->len = (size_t)(o - buf);
  return 0;
}

/* --- float4: the double of the shortest decimal that reads back as the same float, the
 * value the text path gets (float4out writes that decimal when extra_float_digits > 0). */

static int reads_back(const char *s, float f) {
  return strtof(s, NULL) == f;
}

/* The mantissa of "%.*e" text moved by one unit in its last place (delta +1 or -1). */
static void nudge(const char *s, int delta, char *out, size_t cap) {
  char digits[32];
  int n = 0, neg = s[0] == '-', exp;
  long long m;
  const char *e = strchr(s, 'e');
  for (const char *q = s; q < e; q++)
    if (*q >= '0' && *q <= '9') digits[n++] = *q;
  digits[n] = '\0';
  m = atoll(digits) + delta;
  exp = atoi(e + 1) - (n - 1);
  snprintf(out, cap, "%s%llde%d", neg ? "-" : "", m, exp);
}

static double float4_value(float f) {
  char s[48], alt[48];
  if (isnan(f) || isinf(f)) return (double)f;
  for (int prec = 0; prec < 9; prec++) {
    snprintf(s, sizeof s, "%.*e", prec, (double)f);
    if (reads_back(s, f)) return strtod(s, NULL);
    /* Next to a power of 2 the gaps on either side differ: a neighbour of the nearest
     * decimal may read back when the nearest does not, and is as short. */
    for (int delta = -1; delta <= 1; delta += 2) {
      nudge(s, delta, alt, sizeof alt);
      if (reads_back(alt, f)) return strtod(alt, NULL);
    }
  }
  return (double)f;
}

int fl_bin_scalar(uint32_t oid, const char *p, size_t len, char *buf, size_t cap, fl_bin_value *out) {
  const unsigned char *u = (const unsigned char *)p;
  memset(out, 0, sizeof *out);
  if (oid != NUMERIC_T && cap < FL_BIN_TEXT_MAX) return -1;
  switch (oid) {
    case BOOL_T:
      if (len != 1 || u[0] > 1) return -1;
      out->kind = FL_BIN_BOOL;
      out->i = u[0];
      return 0;
    case INT2_T:
      if (len != 2) return -1;
      out->kind = FL_BIN_INT;
      out->i = be16s(u);
      return 0;
    case INT4_T:
      if (len != 4) return -1;
      out->kind = FL_BIN_INT;
      out->i = (int32_t)be32(u);
      return 0;
    case OID_T:
      if (len != 4) return -1;
      out->kind = FL_BIN_INT;
      out->i = be32(u);
      return 0;
    case INT8_T:
      if (len != 8) return -1;
      out->kind = FL_BIN_INT;
      out->i = (int64_t)be64(u);
      return 0;
    case FLOAT4_T: {
      uint32_t bits;
      float f;
      if (len != 4) return -1;
      bits = be32(u);
      memcpy(&f, &bits, 4);
      out->kind = FL_BIN_FLOAT;
      out->d = float4_value(f);
      return 0;
    }
    case FLOAT8_T: {
      uint64_t bits;
      if (len != 8) return -1;
      bits = be64(u);
      memcpy(&out->d, &bits, 8);
      out->kind = FL_BIN_FLOAT;
      return 0;
    }
    case NUMERIC_T:
      return numeric_text(u, len, buf, cap, out);
    case DATE_T:
      return date_text(u, len, buf, out);
    case TIMESTAMP_T:
    case TIMESTAMPTZ_T:
      return timestamp_text(u, len, oid == TIMESTAMPTZ_T, buf, out);
    case TIME_T:
    case TIMETZ_T:
      return time_text(u, len, oid == TIMETZ_T, buf, out);
    case INTERVAL_T:
      return interval_text(u, len, buf, out);
    case UUID_T: {
      char *o = buf;
      if (len != 16) return -1;
      for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10) *o++ = '-';
        *o++ = "0123456789abcdef"[u[i] >> 4];
        *o++ = "0123456789abcdef"[u[i] & 15];
      }
      out->kind = FL_BIN_TEXT;
      out->s = buf;
      out->len = 36;
      return 0;
    }
    case CHAR_T:
      /* charout: an ASCII byte as itself, a high-bit one as \ooo, zero as "". */
      if (len > 1) return -1;
      out->kind = FL_BIN_TEXT;
      out->s = buf;
      if (len == 0 || u[0] == 0) out->len = 0;
      else if (u[0] < 0x80) { buf[0] = (char)u[0]; out->len = 1; }
      else out->len = (size_t)sprintf(buf, "\\%03o", u[0]);
      return 0;
    case JSONB_T:
      if (len < 1 || u[0] != 1) return -1;
      out->kind = FL_BIN_JSON;
      out->s = p + 1;
      out->len = len - 1;
      return 0;
    case JSON_T:
      out->kind = FL_BIN_JSON;
      out->s = p;
      out->len = len;
      return 0;
    case BYTEA_T: case NAME_T: case TEXT_T: case BPCHAR_T: case VARCHAR_T:
      out->kind = FL_BIN_BYTES;
      out->s = p;
      out->len = len;
      return 0;
    default:
      return -1;
  }
}

/* --- arrays ----------------------------------------------------------------------------- */

int fl_bin_arr_init(fl_bin_arr *a, const char *p, size_t len) {
  const unsigned char *u = (const unsigned char *)p;
  int32_t ndim;
  memset(a, 0, sizeof *a);
  if (len < 12) return -1;
  ndim = (int32_t)be32(u);
  if (ndim < 0 || ndim > FL_BIN_MAXDIM || len < 12 + 8 * (size_t)ndim) return -1;
  a->ndim = ndim;
  a->elemtype = be32(u + 8);
  a->p = u + 12 + 8 * ndim;
  a->end = u + len;
  a->total = ndim > 0;
  for (int i = 0; i < ndim; i++) {
    int32_t n = (int32_t)be32(u + 12 + 8 * i);
    if (n < 0) return -1;
    a->dims[i] = n;
    /* Each element takes at least its 4-byte length: a count the bytes cannot hold is
     * refused before anyone allocates for it. */
    a->total *= n;
    if (a->total > (a->end - a->p) / 4) return -1;
  }
  return 0;
}

static fl_bin_arr_tok arr_fail(fl_bin_arr *a) {
  a->failed = 1;
  return FL_BIN_ARR_ERROR;
}

fl_bin_arr_tok fl_bin_arr_next(fl_bin_arr *a, const char **val, size_t *len) {
  int32_t n;
  if (a->failed) return FL_BIN_ARR_ERROR;
  if (a->seen == a->total) return a->p == a->end ? FL_BIN_ARR_END : arr_fail(a);
  if (a->end - a->p < 4) return arr_fail(a);
  n = (int32_t)be32(a->p);
  a->p += 4;
  a->seen++;
  if (n == -1) return FL_BIN_ARR_NULL;
  if (n < 0 || n > a->end - a->p) return arr_fail(a);
  *val = (const char *)a->p;
  *len = (size_t)n;
  a->p += n;
  return FL_BIN_ARR_ELEM;
}
