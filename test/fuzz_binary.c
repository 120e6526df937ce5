/* fuzz_binary: libFuzzer target for fl_binary, the reader of binary send forms, on
 * arbitrary bytes: the first byte picks a type (every type it reads, and arrays), the rest
 * is the value. Build (make fuzz-binary):
 *   clang -fsanitize=fuzzer,address,undefined -Isrc/core test/fuzz_binary.c src/core/fl_binary.c -lm */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "fl_binary.h"

/* Beyond memory safety: text lies in the buffer and fits it, bytes lie in the input, an
 * array yields exactly the elements its header announced, and errors are sticky. */
#define REQUIRE(c) do { if (!(c)) abort(); } while (0)

static const uint32_t types[] = { 16, 17, 18, 19, 20, 21, 23, 25, 26, 114, 700, 701, 1042, 1043,
                                  1082, 1083, 1114, 1184, 1266, 1700, 2950, 3802, 1186, 0 };
#define NTYPES (sizeof types / sizeof types[0])

static void scalar(uint32_t oid, const char *s, size_t len) {
  size_t cap = fl_bin_text_size(oid, s, len);
  char *buf = malloc(cap);
  fl_bin_value v;
  if (!buf) abort();
  REQUIRE(oid == 1700 || cap >= FL_BIN_TEXT_MAX);
  if (fl_bin_scalar(oid, s, len, buf, cap, &v) == 0) {
    REQUIRE(fl_bin_supported(oid));
    switch (v.kind) {
    case FL_BIN_TEXT:
      REQUIRE(v.s == buf && v.len < cap && memchr(v.s, '\0', v.len) == NULL);
      break;
    case FL_BIN_BYTES: case FL_BIN_JSON:
      REQUIRE(v.s >= s && v.len <= len && (size_t)(v.s - s) <= len - v.len);
      break;
    case FL_BIN_BOOL:
      REQUIRE(v.i == 0 || v.i == 1);
      break;
    case FL_BIN_FLOAT:
      /* float4's double reads back as the same float */
      if (oid == 700 && len == 4 && !isnan(v.d)) {
        uint32_t bits = (uint32_t)(unsigned char)s[0] << 24 | (uint32_t)(unsigned char)s[1] << 16 |
                        (uint32_t)(unsigned char)s[2] << 8 | (unsigned char)s[3];
        float f;
        memcpy(&f, &bits, 4);
        REQUIRE((float)v.d == f);
      }
      break;
    default:
      break;
    }
  }
  free(buf);
}

static void array(uint32_t oid, const char *s, size_t len) {
  fl_bin_arr a;
  long n = 0;
  const char *v;
  size_t vl;
  fl_bin_arr_tok t;
  if (fl_bin_arr_init(&a, s, len) != 0) return;
  REQUIRE(a.ndim >= 0 && a.ndim <= FL_BIN_MAXDIM && a.total <= (long)len);
  while ((t = fl_bin_arr_next(&a, &v, &vl)) == FL_BIN_ARR_ELEM || t == FL_BIN_ARR_NULL) {
    REQUIRE(++n <= a.total);
    if (t == FL_BIN_ARR_ELEM) {
      REQUIRE(v >= s && vl <= len && (size_t)(v - s) <= len - vl);
      scalar(oid, v, vl);
    }
  }
  if (t == FL_BIN_ARR_END) REQUIRE(n == a.total);
  REQUIRE(fl_bin_arr_next(&a, &v, &vl) == t);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *s;
  uint32_t oid;
  if (size < 1) return 0;
  oid = types[data[0] % NTYPES];
  size--;
  /* An exact-length copy: a read one byte past the value is a heap overflow ASan sees. */
  s = malloc(size ? size : 1);
  if (!s) abort();
  if (size) memcpy(s, data + 1, size);
  if (data[0] & 0x80) array(oid, s, size);
  else scalar(oid, s, size);
  free(s);
  return 0;
}
