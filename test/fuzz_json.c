/* fuzz_json: libFuzzer target for the pure parsers (JSON reader, array reader, bytea,
 * int64, double, the row and COPY line readers of fl_record) and the JSON writer's parts (number text, escaping) on arbitrary bytes. Build:
 *   clang -fsanitize=fuzzer,address,undefined -Isrc/core test/fuzz_json.c src/core/fl_json.c src/core/fl_value.c */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "fl_json.h"
#include "fl_value.h"
#include "fl_record.h"

/* Beyond memory safety, check what callers rely on: values lie inside the scratch buffer
 * or the input and fit in it, containers balance, and the end/error states are sticky. */
#define REQUIRE(c) do { if (!(c)) abort(); } while (0)

static int inside(const char *v, size_t n, const char *base, size_t cap) {
  return v >= base && n <= cap && (size_t)(v - base) <= cap - n;
}

/* Escaped, then read back by the reader as one JSON string: the same bytes. */
static void fuzz_escape(const char *v, size_t n) {
  char *esc = malloc(6 * n + 2), *back = malloc(6 * n + 2);
  size_t en;
  fl_json_reader r;
  const char *bv;
  size_t bn;
  if (!esc || !back) abort();
  esc[0] = '"';
  en = fl_json_escape(v, n, esc + 1);
  REQUIRE(en <= 6 * n);
  esc[en + 1] = '"';
  fl_json_init(&r, esc, en + 2, back);
  REQUIRE(fl_json_next(&r, &bv, &bn) == FL_JSON_STRING);
  REQUIRE(bn == n && memcmp(bv, v, n) == 0);
  REQUIRE(fl_json_next(&r, &bv, &bn) == FL_JSON_END);
  free(back);
  free(esc);
}

static void fuzz_json(const char *s, size_t len, char *buf) {
  fl_json_reader r;
  int depth = 0;
  size_t steps = 0;
  fl_json_init(&r, s, len, buf);
  for (;;) {
    const char *v;
    size_t n;
    fl_json_tok t = fl_json_next(&r, &v, &n);
    REQUIRE(++steps <= len + 2);
    switch (t) {
    case FL_JSON_OBJ_OPEN:
    case FL_JSON_ARR_OPEN:
      REQUIRE(++depth <= FL_JSON_MAX_DEPTH);
      break;
    case FL_JSON_OBJ_CLOSE:
    case FL_JSON_ARR_CLOSE:
      REQUIRE(--depth >= 0);
      break;
    case FL_JSON_KEY:
    case FL_JSON_STRING:
      REQUIRE(inside(v, n, buf, len));
      fuzz_escape(v, n);
      break;
    case FL_JSON_NUMBER: {
      double d, back;
      char txt[FL_JSON_NUM_MAX];
      int exact;
      size_t tn;
      REQUIRE(inside(v, n, s, len));
      /* Every JSON number is also valid double text (when it fits the copy). */
      if (n <= 512) REQUIRE(fl_parse_double(v, n, &d) == 0);
      /* ... and a number to fl_json_number; one it calls a double prints back as JSON that
       * reads as that same double (and again as exact). */
      exact = fl_json_number(v, n, &d);
      REQUIRE(exact == 0 || exact == 1);
      if (exact == 1) {
        tn = fl_json_format_double(d, txt);
        REQUIRE(tn > 0 && tn < FL_JSON_NUM_MAX && txt[tn] == '\0');
        REQUIRE(fl_json_number(txt, tn, &back) == 1 && back == d);
      }
      break;
    }
    case FL_JSON_END:
      REQUIRE(depth == 0);
      REQUIRE(fl_json_next(&r, &v, &n) == FL_JSON_END);
      return;
    case FL_JSON_ERROR:
      REQUIRE(r.err != NULL && r.pos <= len);
      REQUIRE(fl_json_next(&r, &v, &n) == FL_JSON_ERROR);
      return;
    default:
      break;
    }
  }
}

static void fuzz_array(const char *s, size_t len, char *buf, char delim) {
  fl_arr_reader r;
  int depth = 0;
  size_t steps = 0;
  fl_arr_init(&r, s, len, delim, buf);
  for (;;) {
    const char *v;
    size_t n;
    fl_arr_tok t = fl_arr_next(&r, &v, &n);
    REQUIRE(++steps <= len + 2);
    switch (t) {
    case FL_ARR_OPEN: REQUIRE(++depth == r.depth); break;
    case FL_ARR_CLOSE: REQUIRE(--depth == r.depth && depth >= 0); break;
    case FL_ARR_ELEM: REQUIRE(inside(v, n, buf, len)); break;
    case FL_ARR_NULL: break;
    case FL_ARR_END:
      REQUIRE(depth == 0);
      REQUIRE(fl_arr_next(&r, &v, &n) == FL_ARR_END);
      return;
    case FL_ARR_ERROR:
      REQUIRE(r.err != NULL);
      REQUIRE(fl_arr_next(&r, &v, &n) == FL_ARR_ERROR);
      return;
    }
  }
}

/* The row reader on arbitrary bytes: values inside the scratch buffer, in order, never
 * overlapping; END and ERROR sticky. */
static void fuzz_record(const char *s, size_t len, char *buf) {
  fl_rec_reader r;
  const char *v, *prev_end = buf;
  size_t n;
  fl_rec_tok t;
  fl_rec_init(&r, s, len, buf);
  for (;;) {
    t = fl_rec_next(&r, &v, &n);
    if (t == FL_REC_FIELD) {
      REQUIRE(inside(v, n, buf, len));
      REQUIRE(v >= prev_end);
      prev_end = v + n;
    } else if (t != FL_REC_NULL) {
      break;
    }
  }
  REQUIRE(fl_rec_next(&r, &v, &n) == t);
}

/* Fields cut from the input (at bytes 0x00, each at most 255 bytes, 0x01 alone = NULL),
 * written as record_out writes them, read back: the same fields. */
static void fuzz_record_roundtrip(const char *s, size_t len) {
  char *text = malloc(4 * len + 8), *buf = malloc(4 * len + 8);
  size_t o = 0, i = 0, nf = 0;
  const char *starts[512];
  size_t lens[512];
  int nulls[512];
  if (!text || !buf) abort();
  text[o++] = '(';
  while (i <= len && nf < 512) {
    size_t j = i;
    while (j < len && s[j] != '\0' && j - i < 255) j++;
    starts[nf] = s + i;
    lens[nf] = j - i;
    nulls[nf] = (lens[nf] == 1 && s[i] == '\x01');
    if (nf) text[o++] = ',';
    if (!nulls[nf]) {
      int quote = lens[nf] == 0;
      for (size_t k = i; k < j; k++) {
        char c = s[k];
        if (c == '"' || c == '\\' || c == '(' || c == ')' || c == ',' || c == ' ' || c == '\t' ||
            c == '\n' || c == '\r' || c == '\v' || c == '\f') quote = 1;
      }
      if (quote) text[o++] = '"';
      for (size_t k = i; k < j; k++) {
        if (s[k] == '"' || s[k] == '\\') text[o++] = s[k];
        text[o++] = s[k];
      }
      if (quote) text[o++] = '"';
    }
    nf++;
    i = j + 1;
  }
  text[o++] = ')';
  {
    fl_rec_reader r;
    const char *v;
    size_t n;
    fl_rec_init(&r, text, o, buf);
    for (size_t f = 0; f < nf; f++) {
      fl_rec_tok t = fl_rec_next(&r, &v, &n);
      if (nulls[f]) {
        REQUIRE(t == FL_REC_NULL);
      } else {
        REQUIRE(t == FL_REC_FIELD && n == lens[f] && memcmp(v, starts[f], n) == 0);
      }
    }
    REQUIRE(fl_rec_next(&r, &v, &n) == FL_REC_END);
  }
  free(buf);
  free(text);
}

/* A COPY line on arbitrary bytes, read twice: from a buffer of its own and in place (lconn
 * reads a line without a backslash where it is, others from a copy). The same tokens; a
 * value lies in the line or the scratch buffer; END and ERROR sticky. */
static void fuzz_copy(const char *s, size_t len, char *buf) {
  char *line = malloc(len ? len : 1);
  fl_copy_reader a, b;
  const char *va, *vb;
  size_t na, nb, steps = 0;
  fl_rec_tok ta, tb;
  if (!line) abort();
  if (len) memcpy(line, s, len);
  fl_copy_init(&a, s, len, buf);
  fl_copy_init(&b, line, len, line);
  for (;;) {
    ta = fl_copy_next(&a, &va, &na);
    tb = fl_copy_next(&b, &vb, &nb);
    REQUIRE(ta == tb && ++steps <= len + 2);
    if (ta != FL_REC_FIELD && ta != FL_REC_NULL) break;
    if (ta == FL_REC_FIELD) {
      REQUIRE(inside(va, na, buf, len) || inside(va, na, s, len));
      REQUIRE(inside(vb, nb, line, len));
      REQUIRE(na == nb && memcmp(va, vb, na) == 0);
    }
  }
  REQUIRE(fl_copy_next(&a, &va, &na) == ta && fl_copy_next(&b, &vb, &nb) == tb);
  free(line);
}

/* Fields cut from the input (at bytes 0x00, 0x01 alone = NULL), written as COPY TO writes
 * them (tabs between, \N, backslash escapes), read back: the same fields. */
static void fuzz_copy_roundtrip(const char *s, size_t len) {
  static const char esc_from[] = "\\\t\n\r\b\f\v", esc_to[] = "\\tnrbfv";
  char *text = malloc(2 * len + 8), *buf = malloc(2 * len + 8);
  size_t o = 0, i = 0, nf = 0;
  const char *starts[512];
  size_t lens[512];
  int nulls[512];
  if (!text || !buf) abort();
  while (i <= len && nf < 512) {
    size_t j = i;
    while (j < len && s[j] != '\0') j++;
    starts[nf] = s + i;
    lens[nf] = j - i;
    nulls[nf] = (lens[nf] == 1 && s[i] == '\x01');
    if (nf) text[o++] = '\t';
    if (nulls[nf]) {
      text[o++] = '\\';
      text[o++] = 'N';
    } else {
      for (size_t k = i; k < j; k++) {
        const char *e = memchr(esc_from, s[k], sizeof esc_from - 1);
        if (e) {
          text[o++] = '\\';
          text[o++] = esc_to[e - esc_from];
        } else {
          text[o++] = s[k];
        }
      }
    }
    nf++;
    i = j + 1;
  }
  text[o++] = '\n';
  {
    fl_copy_reader r;
    const char *v;
    size_t n;
    fl_copy_init(&r, text, o, buf);
    for (size_t f = 0; f < nf; f++) {
      fl_rec_tok t = fl_copy_next(&r, &v, &n);
      if (nulls[f]) {
        REQUIRE(t == FL_REC_NULL);
      } else {
        REQUIRE(t == FL_REC_FIELD && n == lens[f] && memcmp(v, starts[f], n) == 0);
      }
    }
    REQUIRE(fl_copy_next(&r, &v, &n) == FL_REC_END);
  }
  free(buf);
  free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  /* An exact-length copy: a read one byte past the input is a heap overflow ASan sees. */
  char *s = malloc(size ? size : 1), *buf = malloc(size ? size : 1);
  int64_t i;
  double d;
  long n;
  if (!s || !buf) abort();
  if (size) memcpy(s, data, size);
  fuzz_json(s, size, buf);
  fuzz_record(s, size, buf);
  fuzz_record_roundtrip(s, size);
  fuzz_copy(s, size, buf);
  fuzz_copy_roundtrip(s, size);
  fuzz_array(s, size, buf, ',');
  fuzz_array(s, size, buf, ';');
  n = fl_bytea_decode(s, size, buf);
  REQUIRE(n >= -1 && n <= (long)size);
  if (fl_parse_int64(s, size, &i) == 0 && size < 64) {
    /* Accepted text must mean the same to strtoll, consumed whole and in range (longer
     * text is only leading zeros, which strtoll takes as well, but needs no copy). */
    char tmp[64], *end;
    REQUIRE(size > 0);
    memcpy(tmp, s, size);
    tmp[size] = '\0';
    errno = 0;
    REQUIRE(strtoll(tmp, &end, 10) == i && errno == 0 && end == tmp + size);
  }
  (void)fl_parse_double(s, size, &d);
  /* Any bytes: -1 unless they are exactly a JSON number. */
  (void)fl_json_number(s, size, &d);
  if (size == sizeof(double)) {
    /* Any double: JSON that reads back as it, or nothing for NaN and infinities. */
    char txt[FL_JSON_NUM_MAX];
    double back;
    size_t tn;
    memcpy(&d, s, sizeof d);
    tn = fl_json_format_double(d, txt);
    REQUIRE(isfinite(d) ? tn > 0 : tn == 0);
    if (tn > 0) REQUIRE(fl_json_number(txt, tn, &back) == 1 && back == d);
  }
  free(buf);
  free(s);
  return 0;
}
