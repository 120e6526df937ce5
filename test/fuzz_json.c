/* fuzz_json: libFuzzer target for the pure parsers (JSON reader, array reader, bytea,
 * int64, double) and the JSON writer's parts (number text, escaping) on arbitrary bytes. Build:
 *   clang -fsanitize=fuzzer,address,undefined -Isrc test/fuzz_json.c src/fl_json.c src/fl_value.c */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "fl_json.h"
#include "fl_value.h"

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

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  /* An exact-length copy: a read one byte past the input is a heap overflow ASan sees. */
  char *s = malloc(size ? size : 1), *buf = malloc(size ? size : 1);
  int64_t i;
  double d;
  long n;
  if (!s || !buf) abort();
  if (size) memcpy(s, data, size);
  fuzz_json(s, size, buf);
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
