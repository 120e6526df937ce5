/* test_c: unit tests of the pure C parsers (fl_json, fl_value, fl_record) on byte fixtures.
 * Every input is copied into a malloc'd buffer of its exact length with no NUL after it,
 * so a sanitizer or valgrind run catches any read past the end. */
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "fl_binary.h"
#include "fl_json.h"
#include "fl_value.h"
#include "fl_record.h"
#include "harness.h"
#include "fixtures_binary.h"

/* Renders bytes so that expected token streams stay readable in the test source. */
static void append(char *out, size_t cap, const char *s, size_t n) {
  size_t o = strlen(out), i;
  for (i = 0; i < n && o + 5 < cap; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out[o++] = (char)c;
    } else {
      snprintf(out + o, cap - o, "\\%02x", c);
      o += 3;
    }
  }
  out[o] = '\0';
}

static void appendz(char *out, size_t cap, const char *s) { append(out, cap, s, strlen(s)); }

/* JSON tokens as text: { } [ ] k:key s:str n:num t f z, then "$" for END or "!msg@pos". */
static void json_trace(const char *in, size_t len, char *out, size_t cap) {
  char *copy = exact_copy(in, len);
  char *buf = malloc(len ? len : 1);
  fl_json_reader r;
  int steps = 0;
  out[0] = '\0';
  fl_json_init(&r, copy, len, buf);
  for (;;) {
    const char *v;
    size_t n;
    char tmp[64];
    fl_json_tok t = fl_json_next(&r, &v, &n);
    if (out[0]) appendz(out, cap, " ");
    switch (t) {
    case FL_JSON_OBJ_OPEN: appendz(out, cap, "{"); break;
    case FL_JSON_OBJ_CLOSE: appendz(out, cap, "}"); break;
    case FL_JSON_ARR_OPEN: appendz(out, cap, "["); break;
    case FL_JSON_ARR_CLOSE: appendz(out, cap, "]"); break;
    case FL_JSON_KEY: appendz(out, cap, "k:"); append(out, cap, v, n); break;
    case FL_JSON_STRING: appendz(out, cap, "s:"); append(out, cap, v, n); break;
    case FL_JSON_NUMBER: appendz(out, cap, "n:"); append(out, cap, v, n); break;
    case FL_JSON_TRUE: appendz(out, cap, "t"); break;
    case FL_JSON_FALSE: appendz(out, cap, "f"); break;
    case FL_JSON_NULL: appendz(out, cap, "z"); break;
    case FL_JSON_END: appendz(out, cap, "$"); break;
    case FL_JSON_ERROR:
      snprintf(tmp, sizeof tmp, "!%s@%zu", r.err ? r.err : "(no message)", r.pos);
      strncat(out, tmp, cap - strlen(out) - 1);
      break;
    }
    if (t == FL_JSON_END || t == FL_JSON_ERROR || ++steps > 100000) {
      /* The end and errors are sticky: a second call must say the same. */
      fl_json_tok again = fl_json_next(&r, &v, &n);
      if (again != t) appendz(out, cap, " (not sticky)");
      break;
    }
  }
  free(buf);
  free_copy(copy, len);
}

#define JSON(in, want) check_json(__FILE__, __LINE__, in, sizeof(in) - 1, want)
static void check_json(const char *file, int line, const char *in, size_t len, const char *want) {
  char got[4096];
  json_trace(in, len, got, sizeof got);
  report(file, line, strcmp(got, want) == 0, "json %s\n  want: %s\n  got:  %s", in, want, got);
}

/* For errors only the message prefix matters to the reader of the test, plus the offset. */
#define JSON_ERR(in, msg, pos) check_json_err(__FILE__, __LINE__, in, sizeof(in) - 1, msg, pos)
static void check_json_err(const char *file, int line, const char *in, size_t len, const char *msg, long pos) {
  char got[4096], want[128];
  const char *bang;
  json_trace(in, len, got, sizeof got);
  snprintf(want, sizeof want, "!%s@%ld", msg, pos);
  bang = strrchr(got, '!');
  report(file, line, bang && strcmp(bang, want) == 0 && !strstr(got, "$"),
         "json %s\n  want error: %s\n  got:        %s", in, want, got);
}

/* Nests objects and arrays alternately, {"":[{"":[...1...]}]}, to the given depth. */
static void check_depth(const char *file, int line, int depth, int want_ok) {
  size_t cap = (size_t)depth * 5 + 1, k = 0;
  char *s = malloc(cap), *got = malloc(65536);
  int i;
  for (i = 0; i < depth; i++) {
    if (i % 2 == 0) {
      memcpy(s + k, "{\"\":", 4);
      k += 4;
    } else {
      s[k++] = '[';
    }
  }
  s[k++] = '1';
  for (i = depth; i-- > 0;) s[k++] = i % 2 == 0 ? '}' : ']';
  json_trace(s, k, got, 65536);
  if (want_ok) report(file, line, strstr(got, "$") && !strchr(got, '!'), "depth %d should parse", depth);
  else report(file, line, strstr(got, "!nesting too deep") != NULL, "depth %d should fail as too deep", depth);
  free(s);
  free(got);
}

/* ---- array literals ---- */

/* ( ) e:elem N (NULL) $ !msg */
static void arr_trace(const char *in, size_t len, char delim, char *out, size_t cap) {
  char *copy = exact_copy(in, len);
  char *buf = malloc(len ? len : 1);
  fl_arr_reader r;
  int steps = 0;
  out[0] = '\0';
  fl_arr_init(&r, copy, len, delim, buf);
  for (;;) {
    const char *v;
    size_t n;
    fl_arr_tok t = fl_arr_next(&r, &v, &n);
    if (out[0]) appendz(out, cap, " ");
    switch (t) {
    case FL_ARR_OPEN: appendz(out, cap, "("); break;
    case FL_ARR_CLOSE: appendz(out, cap, ")"); break;
    case FL_ARR_ELEM: appendz(out, cap, "e:"); append(out, cap, v, n); break;
    case FL_ARR_NULL: appendz(out, cap, "N"); break;
    case FL_ARR_END: appendz(out, cap, "$"); break;
    case FL_ARR_ERROR: appendz(out, cap, "!"); appendz(out, cap, r.err ? r.err : "(no message)"); break;
    }
    if (t == FL_ARR_END || t == FL_ARR_ERROR || ++steps > 100000) {
      if (fl_arr_next(&r, &v, &n) != t) appendz(out, cap, " (not sticky)");
      break;
    }
  }
  free(buf);
  free_copy(copy, len);
}

#define ARR(in, delim, want) check_arr(__FILE__, __LINE__, in, sizeof(in) - 1, delim, want)
static void check_arr(const char *file, int line, const char *in, size_t len, char delim, const char *want) {
  char got[4096];
  arr_trace(in, len, delim, got, sizeof got);
  report(file, line, strcmp(got, want) == 0, "array %s\n  want: %s\n  got:  %s", in, want, got);
}

#define ARR_ERR(in) check_arr_err(__FILE__, __LINE__, in, sizeof(in) - 1)
static void check_arr_err(const char *file, int line, const char *in, size_t len) {
  char got[4096];
  arr_trace(in, len, ',', got, sizeof got);
  report(file, line, strchr(got, '!') != NULL && !strstr(got, "$"), "array %s should be malformed, got: %s", in, got);
}

/* ---- scalars ---- */

#define INT64_OK(in, want) check_int64(__FILE__, __LINE__, in, sizeof(in) - 1, 1, want)
#define INT64_BAD(in) check_int64(__FILE__, __LINE__, in, sizeof(in) - 1, 0, 0)
static void check_int64(const char *file, int line, const char *in, size_t len, int want_ok, int64_t want) {
  char *copy = exact_copy(in, len);
  int64_t v = 12345;
  int rc = fl_parse_int64(copy, len, &v);
  if (want_ok)
    report(file, line, rc == 0 && v == want, "int64 \"%s\": rc %d value %lld, want %lld", in, rc, (long long)v,
           (long long)want);
  else
    report(file, line, rc == -1, "int64 \"%s\" should be rejected (rc %d, value %lld)", in, rc, (long long)v);
  free_copy(copy, len);
}

#define DBL_OK(in, want) check_double(__FILE__, __LINE__, in, sizeof(in) - 1, 1, want)
#define DBL_BAD(in) check_double(__FILE__, __LINE__, in, sizeof(in) - 1, 0, 0)
static void check_double(const char *file, int line, const char *in, size_t len, int want_ok, double want) {
  char *copy = exact_copy(in, len);
  double v = 12345;
  int rc = fl_parse_double(copy, len, &v);
  if (!want_ok) {
    report(file, line, rc == -1, "double \"%s\" should be rejected (rc %d)", in, rc);
  } else {
    int same = isnan(want) ? isnan(v) : (v == want && signbit(v) == signbit(want));
    report(file, line, rc == 0 && same, "double \"%s\": rc %d value %.17g, want %.17g", in, rc, v, want);
  }
  free_copy(copy, len);
}

#define BYTEA_OK(in, want) check_bytea(__FILE__, __LINE__, in, sizeof(in) - 1, want, (long)sizeof(want) - 1)
#define BYTEA_BAD(in) check_bytea(__FILE__, __LINE__, in, sizeof(in) - 1, NULL, -1)
static void check_bytea(const char *file, int line, const char *in, size_t len, const char *want, long wlen) {
  char *copy = exact_copy(in, len);
  char *out = malloc(len ? len : 1);
  long n = fl_bytea_decode(copy, len, out);
  char got[512] = "", exp[512] = "";
  if (n > 0) append(got, sizeof got, out, (size_t)n);
  if (wlen > 0) append(exp, sizeof exp, want, (size_t)wlen);
  report(file, line, n == wlen && (wlen <= 0 || memcmp(out, want, (size_t)wlen) == 0),
         "bytea \"%s\": got %ld \"%s\", want %ld \"%s\"", in, n, got, wlen, exp);
  /* Decoded over its own text: the same bytes, and malformed text left as it was. */
  char *inplace = exact_copy(in, len);
  long m = fl_bytea_decode_inplace(inplace, len);
  report(file, line, m == wlen && (wlen > 0 ? memcmp(inplace, want, (size_t)wlen) == 0 :
                                   wlen < 0 ? len == 0 || memcmp(inplace, in, len) == 0 : 1),
         "bytea in place \"%s\": got %ld, want %ld", in, m, wlen);
  free_copy(inplace, len);
  free(out);
  free_copy(copy, len);
}

static void test_json(void) {
  /* scalars at the top level */
  JSON("true", "t $");
  JSON("false", "f $");
  JSON("null", "z $");
  JSON("  \t\r\n 0 \n", "n:0 $");
  JSON("-0", "n:-0 $");
  JSON("1e10", "n:1e10 $");
  JSON("1.5E-3", "n:1.5E-3 $");
  JSON("-12.25e+07", "n:-12.25e+07 $");
  JSON("123456789012345678901234567890", "n:123456789012345678901234567890 $");
  JSON("\"\"", "s: $");
  JSON("\"plain\"", "s:plain $");
  /* A lone \udc80..\udcff is the byte (fl_json_escape's form of a byte of no UTF-8
   * sequence); a pair with a high surrogate stays a pair. */
  JSON("\"a\\udcffb\\udc80\"", "s:a\\ffb\\80 $");
  JSON("{\"\\udcc3\":1}", "{ k:\\c3 n:1 } $");
  JSON("\"\\udbff\\udcff\"", "s:\\f4\\8f\\b3\\bf $");

  /* containers */
  JSON("{}", "{ } $");
  JSON("[]", "[ ] $");
  JSON(" [ ] ", "[ ] $");
  JSON("[1,2,3]", "[ n:1 n:2 n:3 ] $");
  JSON("{\"a\":1,\"b\":[true,false,null],\"c\":{\"d\":\"e\"}}",
       "{ k:a n:1 k:b [ t f z ] k:c { k:d s:e } } $");
  JSON("[[],[[]],{}]", "[ [ ] [ [ ] ] { } ] $");
  JSON("{ \"k\" : [ 1 , { } ] }", "{ k:k [ n:1 { } ] } $");
  JSON("{\"\":\"\"}", "{ k: s: } $");
  JSON("{\"a\":1,\"a\":2}", "{ k:a n:1 k:a n:2 } $");

  /* escapes */
  JSON("\"\\\"\\\\\\/\\b\\f\\n\\r\\t\"", "s:\"\\5c/\\08\\0c\\0a\\0d\\09 $");
  JSON("\"\\u0041\\u00e9\\u20AC\"", "s:A\\c3\\a9\\e2\\82\\ac $");
  JSON("\"\\u0000x\"", "s:\\00x $");
  JSON("\"\\ud83d\\ude00\"", "s:\\f0\\9f\\98\\80 $");    /* U+1F600 */
  JSON("\"\\uDBFF\\uDFFF\"", "s:\\f4\\8f\\bf\\bf $");    /* U+10FFFF */
  JSON("\"\\uD800\\uDC00\"", "s:\\f0\\90\\80\\80 $");    /* U+10000 */
  JSON("\"\\u07FF\\u0800\\uFFFF\"", "s:\\df\\bf\\e0\\a0\\80\\ef\\bf\\bf $");
  JSON("\"caf\xc3\xa9\"", "s:caf\\c3\\a9 $");            /* raw UTF-8 passes through */
  JSON("{\"k\\u0041y\":\"v\"}", "{ k:kAy s:v } $");

  /* invalid documents */
  JSON_ERR("", "unexpected end of input", 0);
  JSON_ERR("   ", "unexpected end of input", 3);
  JSON_ERR("[1,2", "unexpected end of input", 4);
  JSON_ERR("{\"a\":", "unexpected end of input", 5);
  JSON_ERR("{\"a\"", "unexpected end of input", 4);
  JSON_ERR("[1,]", "unexpected character", 3);
  JSON_ERR("{\"a\":1,}", "expected string key", 7);
  JSON_ERR("[,1]", "unexpected character", 1);
  JSON_ERR("{,}", "expected string key", 1);
  JSON_ERR("{a:1}", "expected string key", 1);
  JSON_ERR("{\"a\" 1}", "expected ':'", 5);
  JSON_ERR("[1 2]", "expected ',' or ']'", 3);
  JSON_ERR("{\"a\":1]", "expected ',' or '}'", 6);
  JSON_ERR("[1}", "expected ',' or ']'", 2);
  JSON_ERR("\"\\x\"", "invalid escape", 1);
  JSON_ERR("\"\\u12G4\"", "invalid \\u escape", 1);
  JSON_ERR("\"\\u12\"", "invalid \\u escape", 1);
  JSON_ERR("\"\\u12", "invalid \\u escape", 1);
  JSON_ERR("\"\\ud83d\"", "lone surrogate", 1);
  JSON_ERR("\"\\ud83dx\"", "lone surrogate", 1);
  JSON_ERR("\"\\ud83d\\u0041\"", "lone surrogate", 1);
  JSON_ERR("\"\\ude00\"", "lone surrogate", 1);
  JSON_ERR("\"\\ude00\\ud83d\"", "lone surrogate", 1);
  JSON_ERR("\"\\udc7f\"", "lone surrogate", 1);
  JSON_ERR("\"\\udd00\"", "lone surrogate", 1);
  JSON_ERR("\"\\ud83d\\uzzzz\"", "invalid \\u escape", 7);
  JSON_ERR("\"abc", "unterminated string", 4);
  JSON_ERR("\"abc\\", "unterminated string", 4);
  JSON_ERR("\"a\nb\"", "control character in string", 2);
  JSON_ERR("\"a\tb\"", "control character in string", 2);
  JSON_ERR("\"\x1f\"", "control character in string", 1);
  JSON_ERR("01", "leading zero in number", 1);
  JSON_ERR("-01", "leading zero in number", 2);
  JSON_ERR("[00]", "leading zero in number", 2);
  JSON_ERR("-", "unexpected end of input", 1);
  JSON_ERR("-a", "invalid number", 1);
  JSON_ERR("+1", "unexpected character", 0);
  JSON_ERR(".5", "unexpected character", 0);
  JSON_ERR("1.", "invalid number", 2);
  JSON_ERR("1.e5", "invalid number", 2);
  JSON_ERR("1e", "invalid number", 2);
  JSON_ERR("1e+", "invalid number", 3);
  JSON_ERR("0x10", "trailing garbage after value", 1);
  JSON_ERR("tru", "unexpected end of input", 3);
  JSON_ERR("trUe", "invalid literal", 0);
  JSON_ERR("nul", "unexpected end of input", 3);
  JSON_ERR("nulx", "invalid literal", 0);
  JSON_ERR("truex", "trailing garbage after value", 4);
  JSON_ERR("NaN", "unexpected character", 0);
  JSON_ERR("{} x", "trailing garbage after value", 3);
  JSON_ERR("[1] [2]", "trailing garbage after value", 4);
  JSON_ERR("1 2", "trailing garbage after value", 2);
  JSON_ERR("\"a\"\"b\"", "trailing garbage after value", 3);
  JSON_ERR("]", "unexpected character", 0);
  JSON_ERR("}", "unexpected character", 0);
  JSON_ERR("'a'", "unexpected character", 0);
  JSON_ERR("\xef\xbb\xbf{}", "unexpected character", 0);   /* no BOM in JSON text */
  JSON_ERR("[1]\0", "trailing garbage after value", 3);  /* an embedded NUL is not white space */

  check_depth(__FILE__, __LINE__, 1, 1);
  check_depth(__FILE__, __LINE__, 999, 1);
  check_depth(__FILE__, __LINE__, FL_JSON_MAX_DEPTH, 1);
  check_depth(__FILE__, __LINE__, FL_JSON_MAX_DEPTH + 1, 0);
  check_depth(__FILE__, __LINE__, 5000, 0);

  /* Each prefix of a valid document is either an error or, for a scalar prefix that is
   * itself a number, valid; none may read past its end (ASan checks the buffers). */
  {
    static const char doc[] =
        "{\"a\":[1,-2.5e+3,\"x\\u00e9\\ud83d\\ude00\",true,false,null,{\"b\":{}}],\"c\":\"\\\"\"}";
    size_t n, full = sizeof doc - 1;
    int bad = 0;
    for (n = 0; n < full; n++) {
      char got[4096];
      json_trace(doc, n, got, sizeof got);
      if (!strchr(got, '!')) bad++;
    }
    report(__FILE__, __LINE__, bad == 0, "%d truncated prefixes of a document parsed as valid", bad);
  }
}

static void test_arrays(void) {
  ARR("{}", ',', "( ) $");
  ARR("{1,2,3}", ',', "( e:1 e:2 e:3 ) $");
  ARR("{{1,2},{3,4}}", ',', "( ( e:1 e:2 ) ( e:3 e:4 ) ) $");
  ARR("{{{1},{2}},{{3},{4}}}", ',', "( ( ( e:1 ) ( e:2 ) ) ( ( e:3 ) ( e:4 ) ) ) $");
  ARR("{NULL,\"NULL\",null}", ',', "( N e:NULL N ) $");
  ARR("{NuLl,N\\ULL,NULLx}", ',', "( N e:NULL e:NULLx ) $");
  ARR("{\"a b\",\"c\\\"d\",\"e\\\\f\"}", ',', "( e:a b e:c\"d e:e\\5cf ) $");
  ARR("{\"\"}", ',', "( e: ) $");
  ARR("{\"{x}\",\",\",\" \"}", ',', "( e:{x} e:, e:  ) $");
  ARR("{  x  ,y}", ',', "( e:x e:y ) $");
  ARR("{ a b , c }", ',', "( e:a b e:c ) $");
  ARR("{a\\ ,\\ b}", ',', "( e:a  e: b ) $");      /* escaped blanks survive trimming */
  ARR("{a\\,b,c\\}d}", ',', "( e:a,b e:c}d ) $");
  ARR("{ \"q\" , \"r\" }", ',', "( e:q e:r ) $");
  ARR("  {1}  ", ',', "( e:1 ) $");
  ARR("[0:1]={7,8}", ',', "( e:7 e:8 ) $");
  ARR("[-2:-1]={7,8}", ',', "( e:7 e:8 ) $");
  ARR("[1:2][1:1]={{1},{2}}", ',', "( ( e:1 ) ( e:2 ) ) $");
  ARR("[2] = {1,2}", ',', "( e:1 e:2 ) $");
  ARR("{(1,1),(0,0);(2,2),(1,1)}", ';', "( e:(1,1),(0,0) e:(2,2),(1,1) ) $");
  ARR("{2020-01-01 00:00:00+00,\"2020-01-02 00:00:00+00\"}", ',',
      "( e:2020-01-01 00:00:00+00 e:2020-01-02 00:00:00+00 ) $");
  ARR("{\"\\\\x0102\"}", ',', "( e:\\5cx0102 ) $");
  ARR("{\"{\\\"a\\\": 1}\"}", ',', "( e:{\"a\": 1} ) $");   /* a jsonb[] element */
  ARR("{{},{}}", ',', "( ( ) ( ) ) $");
  ARR("{{{{{{1}}}}}}", ',', "( ( ( ( ( ( e:1 ) ) ) ) ) ) $");

  ARR_ERR("");
  ARR_ERR("   ");
  ARR_ERR("{1,2");
  ARR_ERR("{1,2}}");
  ARR_ERR("{1,2} x");
  ARR_ERR("1,2");
  ARR_ERR("{\"abc}");
  ARR_ERR("{\"abc\\");
  ARR_ERR("{abc\\");
  ARR_ERR("{1,}");
  ARR_ERR("{,1}");
  ARR_ERR("{1,,2}");
  ARR_ERR("{\"a\"b}");
  ARR_ERR("{a\"b\"}");
  ARR_ERR("{a{b}");
  ARR_ERR("{1,{2}}");
  ARR_ERR("{{1},2}");
  ARR_ERR("{{{{{{{1}}}}}}}");     /* seven dimensions: more than PostgreSQL's six */
  ARR_ERR("[0:1]{1,2}");
  ARR_ERR("[0:1={1,2}");
  ARR_ERR("[a:1]={1,2}");
  ARR_ERR("[0:]={1}");
  ARR_ERR("{");
  ARR_ERR("}");
  {
    /* ';' is data when ',' delimits, and ',' is data when ';' does. */
    char got[256];
    arr_trace("{1;2}", 5, ',', got, sizeof got);
    report(__FILE__, __LINE__, strcmp(got, "( e:1;2 ) $") == 0, "{1;2} with ',' gave %s", got);
  }
}

static void test_int64(void) {
  INT64_OK("0", 0);
  INT64_OK("-0", 0);
  INT64_OK("42", 42);
  INT64_OK("-42", -42);
  INT64_OK("007", 7);
  INT64_OK("9007199254740993", 9007199254740993LL);
  INT64_OK("9223372036854775807", INT64_MAX);
  INT64_OK("-9223372036854775808", INT64_MIN);
  INT64_BAD("9223372036854775808");
  INT64_BAD("-9223372036854775809");
  INT64_BAD("18446744073709551616");
  INT64_BAD("99999999999999999999999");
  INT64_BAD("");
  INT64_BAD("-");
  INT64_BAD("12a");
  INT64_BAD("+1");
  INT64_BAD(" 1");
  INT64_BAD("1 ");
  INT64_BAD("1.0");
  INT64_BAD("--1");
  INT64_BAD("1\0");
}

static void test_double(void) {
  DBL_OK("1.5", 1.5);
  DBL_OK("-1.5", -1.5);
  DBL_OK("0", 0.0);
  DBL_OK("-0", -0.0);
  DBL_OK("42", 42.0);
  DBL_OK("1e10", 1e10);
  DBL_OK("1.5E-3", 1.5e-3);
  DBL_OK(".5", 0.5);
  DBL_OK("5.", 5.0);
  DBL_OK("+2", 2.0);
  DBL_OK("3.4028235e+38", 3.4028235e+38);
  DBL_OK("0.30000000000000004", 0.30000000000000004);
  DBL_OK("1.7976931348623157e+308", 1.7976931348623157e+308);
  DBL_OK("4.9406564584124654e-324", 4.9406564584124654e-324);
  DBL_OK("NaN", NAN);
  DBL_OK("nan", NAN);
  DBL_OK("Infinity", INFINITY);
  DBL_OK("-Infinity", -INFINITY);
  DBL_OK("inf", INFINITY);
  /* Out of double range: strtod's answer, ±inf (PostgreSQL never prints this for a float;
   * for numeric converted to a number infinity is the closest double). */
  DBL_OK("1e400", INFINITY);
  DBL_OK("-1e400", -INFINITY);
  DBL_BAD("");
  DBL_BAD("-");
  DBL_BAD(".");
  DBL_BAD("e5");
  DBL_BAD("1e");
  DBL_BAD("1.5x");
  DBL_BAD(" 1.5");
  DBL_BAD("1.5 ");
  DBL_BAD("0x10");
  DBL_BAD("nan(1)");
  DBL_BAD("Infinityx");
  DBL_BAD("--1");
  DBL_BAD("1,5");
}

/* 512 bytes is the cap of the NUL-terminated copy; longer text is refused, not cut. */
static void test_double_long(void) {
  char s[513];
  double v;
  char *c;
  memset(s, '0', sizeof s);
  s[0] = '1';
  c = exact_copy(s, 512);
  report(__FILE__, __LINE__, fl_parse_double(c, 512, &v) == 0 && isinf(v), "512 digits should parse as inf");
  free_copy(c, 512);
  c = exact_copy(s, 513);
  report(__FILE__, __LINE__, fl_parse_double(c, 513, &v) == -1, "513 bytes should be refused");
  free_copy(c, 513);
}

static void test_bytea(void) {
  BYTEA_OK("", "");
  BYTEA_OK("\\x", "");
  BYTEA_OK("\\x0a0b", "\x0a\x0b");
  BYTEA_OK("\\xDEADbeef", "\xde\xad\xbe\xef");
  BYTEA_OK("\\x00ff", "\x00\xff");
  BYTEA_OK("\\x 01 02\n", "\x01\x02");              /* byteain's blanks between pairs */
  BYTEA_OK("abc", "abc");
  BYTEA_OK("a\\\\b", "a\\b");
  BYTEA_OK("\\001\\377\\000", "\x01\xff\x00");
  BYTEA_OK("x\\134y", "x\\y");
  BYTEA_OK("\\\\x01", "\\x01");                      /* escape form that starts like hex */
  BYTEA_OK("\xff\x80", "\xff\x80");
  BYTEA_BAD("\\x0");
  BYTEA_BAD("\\x012");
  BYTEA_BAD("\\x0g");
  BYTEA_BAD("\\x0 1");                               /* never inside a pair */
  BYTEA_BAD("\\");
  BYTEA_BAD("a\\");
  BYTEA_BAD("\\4");
  BYTEA_BAD("\\400");
  BYTEA_BAD("\\18");
  BYTEA_BAD("\\08");
  BYTEA_BAD("\\12");
  BYTEA_BAD("\\n");
  BYTEA_BAD("\\X01");
}


/* fl_json_number: 1 = the double prints back as the same decimal value, 0 = keep the text. */
#define NUM(in, want_rc, want_d) check_num(__FILE__, __LINE__, in, sizeof(in) - 1, want_rc, want_d)
static void check_num(const char *file, int line, const char *in, size_t len, int want_rc, double want_d) {
  char *c = exact_copy(in, len);
  double d = 12345.0;
  int rc = fl_json_number(c, len, &d);
  int same = want_rc == -1 || (isnan(want_d) ? 1 : d == want_d && signbit(d) == signbit(want_d));
  report(file, line, rc == want_rc && same, "number \"%s\": want %d %.17g, got %d %.17g", in, want_rc, want_d, rc, d);
  free_copy(c, len);
}

static void test_json_number(void) {
  NUM("0", 1, 0.0);
  NUM("-0", 1, -0.0);
  NUM("-0.000e5", 1, -0.0);
  NUM("1", 1, 1.0);
  NUM("-42", 1, -42.0);
  NUM("0.1", 1, 0.1);
  NUM("1.5e-7", 1, 1.5e-7);
  NUM("19.99", 1, 19.99);
  NUM("100.000", 1, 100.0);
  NUM("1E+2", 1, 100.0);
  NUM("0.30000000000000004", 1, 0.30000000000000004);   /* 17 digits, the double's own */
  NUM("9007199254740992", 1, 9007199254740992.0);
  NUM("9007199254740994", 1, 9007199254740994.0);        /* past 2^53 but a double */
  NUM("1e300", 1, 1e300);
  NUM("1.7976931348623157e308", 1, 1.7976931348623157e308);
  NUM("5e-324", 1, 5e-324);                              /* the smallest subnormal */
  NUM("1e-320", 1, 1e-320);
  NUM("100000000000000000000000", 1, 1e23);              /* one significant digit */
  /* The edges of the fast path (<= 15 digits times or over 10^0..10^22) and just past. */
  NUM("1e22", 1, 1e22);
  NUM("123456789012345e22", 1, 123456789012345e22);
  NUM("123456789012345e-22", 1, 123456789012345e-22);
  NUM("123456789012345e-23", 1, 123456789012345e-23);
  NUM("-999999999999999.5e-7", 0, NAN);                  /* 16 digits no double prints back */
  NUM("999999999999999e-7", 1, 999999999999999e-7);
  NUM("0.000000000000000000000000000001", 1, 1e-30);
  /* Digits a double cannot keep: the text is the value, *out the nearest double. */
  NUM("9007199254740993", 0, 9007199254740992.0);
  NUM("12345678901234567890", 0, 12345678901234567890.0);
  NUM("-98765432109876543210987", 0, NAN);
  NUM("0.10000000000000001", 0, 0.1);
  NUM("3.14159265358979323846264338327950288", 0, NAN);
  NUM("1.00000000000000000000000000001", 0, NAN);
  NUM("9223372036854775808", 0, 9223372036854775808.0);  /* 2^63: exact, but 19 digits */
  NUM("1e400", 0, INFINITY);
  NUM("-1e400", 0, -INFINITY);
  NUM("1e-400", 0, 0.0);
  NUM("2e-324", 0, 0.0);                                 /* rounds to zero */
  NUM("1e99999999999999999999", 0, INFINITY);
  NUM("0.0000000000000000000000000000000000000000000000000000001e56", 1, 10.0);
  NUM("", -1, 0);
  NUM("-", -1, 0);
  NUM("01", -1, 0);
  NUM("1.", -1, 0);
  NUM(".5", -1, 0);
  NUM("1e", -1, 0);
  NUM("1e+", -1, 0);
  NUM("+1", -1, 0);
  NUM("1 ", -1, 0);
  NUM("NaN", -1, 0);
  NUM("0x10", -1, 0);
}

#define FMT(d, want) check_fmt(__FILE__, __LINE__, d, want)
static void check_fmt(const char *file, int line, double d, const char *want) {
  char out[FL_JSON_NUM_MAX];
  size_t n = fl_json_format_double(d, out);
  report(file, line, n == strlen(want) && strcmp(out, want) == 0, "format %.17g: want \"%s\", got \"%s\"", d, want, out);
  if (n > 0) {
    /* What it writes is JSON that reads back as the same double. */
    double back;
    report(file, line, fl_json_number(out, n, &back) == 1 && back == d, "format %.17g: \"%s\" does not read back", d, out);
  }
}

static void test_json_format(void) {
  FMT(0.0, "0");
  FMT(-0.0, "-0");
  FMT(1.0, "1");
  FMT(-42.0, "-42");
  FMT(0.1, "0.1");
  FMT(1.5, "1.5");
  FMT(19.99, "19.99");
  FMT(0.30000000000000004, "0.30000000000000004");
  FMT(1.2345678901234567, "1.2345678901234567");
  FMT(12345678901234.5, "12345678901234.5");
  FMT(9007199254740991.0, "9007199254740991");
  FMT(9007199254740992.0, "9007199254740992");
  FMT(12345678901234567890.0, "1.2345678901234567e+19");
  FMT(1e300, "1e+300");
  FMT(1.5e-7, "1.5e-07");
  FMT(1.7976931348623157e308, "1.7976931348623157e+308");
  FMT(5e-324, "5e-324");
  FMT(2.2250738585072014e-308, "2.2250738585072014e-308");
  FMT(NAN, "");
  FMT(INFINITY, "");
  FMT(-INFINITY, "");
  FMT(-9007199254740991.0, "-9007199254740991");
  FMT(1e15, "1000000000000000");
  /* Whole numbers below 2^53 as "%.0f" prints them: powers of ten and their neighbours,
   * and a spread of others, of both signs. */
  {
    double d = 1.0;
    char want[64];
    int i;
    for (i = 0; i < 16; i++, d *= 10.0) {
      double v[] = { d - 1.0, d, d + 1.0, -d, -(d - 1.0), d * 7.0 + 3.0 };
      size_t j;
      for (j = 0; j < sizeof v / sizeof v[0]; j++) {
        snprintf(want, sizeof want, "%.0f", v[j]);
        FMT(v[j], want);
      }
    }
  }
}

#define ESC(in, want) check_esc(__FILE__, __LINE__, in, sizeof(in) - 1, want, sizeof(want) - 1)
static void check_esc(const char *file, int line, const char *in, size_t len, const char *want, size_t wlen) {
  char *c = exact_copy(in, len);
  char *out = malloc(6 * len + 1);
  size_t n = fl_json_escape(c, len, out);
  report(file, line, n == wlen && memcmp(out, want, n) == 0, "escape: want \"%s\", got \"%.*s\"", want, (int)n, out);
  free(out);
  free_copy(c, len);
}

static void test_json_escape(void) {
  ESC("", "");
  ESC("plain", "plain");
  ESC("q\"b\\s/", "q\\\"b\\\\s/");
  ESC("\b\f\n\r\t", "\\b\\f\\n\\r\\t");
  ESC("\x01\x1f\x7f", "\\u0001\\u001f\x7f");
  ESC("nul\0in", "nul\\u0000in");
  ESC("\xc3\xbc\xe2\x82\xac\xf0\x9f\x98\x80", "\xc3\xbc\xe2\x82\xac\xf0\x9f\x98\x80");  /* ü€😀 as is */
  /* Bytes of no valid UTF-8 sequence (a SQL_ASCII database's text): \udcXX each. */
  ESC("a\xff" "b", "a\\udcffb");
  ESC("\x80\xbf\xc0\x80\xc1\xbf\xf5\xff", "\\udc80\\udcbf\\udcc0\\udc80\\udcc1\\udcbf\\udcf5\\udcff");
  ESC("\xc3", "\\udcc3");                                           /* cut short at the end */
  ESC("\xc3" "a\xe2\x82" "b", "\\udcc3a\\udce2\\udc82b");                 /* cut short before ASCII */
  ESC("\xe0\x80\xaf", "\\udce0\\udc80\\udcaf");                         /* overlong */
  ESC("\xed\xa0\x80\xed\x9f\xbf", "\\udced\\udca0\\udc80\xed\x9f\xbf");    /* a surrogate; U+D7FF */
  ESC("\xf4\x90\x80\x80\xf4\x8f\xbf\xbf", "\\udcf4\\udc90\\udc80\\udc80\xf4\x8f\xbf\xbf"); /* > U+10FFFF; U+10FFFF */
  ESC("\xf0\x8f\xbf\xbf\xf0\x90\x80\x80", "\\udcf0\\udc8f\\udcbf\\udcbf\xf0\x90\x80\x80"); /* overlong; U+10000 */
  ESC("\xc3\xbc\xff\xc3\xbc", "\xc3\xbc\\udcff\xc3\xbc");
  /* Escaped in pieces (fl_json_piece): a sequence across a piece's end stays whole. */
  {
    static char in[8200], whole[6 * 8200], pieces[6 * 8200];
    const char *chars[] = { "\xc3\xbc", "\xe2\x82\xac", "\xf0\x9f\x98\x80", "\xff", "\x80\x80\x80\x80\x80" };
    for (size_t at = 4090; at <= 4097; at++) {
      for (size_t c = 0; c < sizeof chars / sizeof *chars; c++) {
        size_t n = at, cl = strlen(chars[c]), wl, pl = 0;
        memset(in, 'a', at);
        memcpy(in + n, chars[c], cl);
        n += cl;
        memset(in + n, 'b', 10);
        n += 10;
        wl = fl_json_escape(in, n, whole);
        for (size_t off = 0; off < n;) {
          size_t k = fl_json_piece(in + off, n - off, 4096);
          CHECK(k > 0 && k <= 4096, "piece of %zu at %zu", k, off);
          pl += fl_json_escape(in + off, k, pieces + pl);
          off += k;
        }
        CHECK(pl == wl && memcmp(pieces, whole, wl) == 0, "pieces differ from the whole: char %zu at %zu", c, at);
      }
    }
  }
}

/* A reader's tokens rendered as "[v]" for a value and "N" for NULL, then "." at the end
 * or "!" on an error; returns the token after the last (the state must be sticky). */
typedef fl_rec_tok (*next_fn)(void *r, const char **v, size_t *n);

static fl_rec_tok render_tokens(next_fn next, void *r, char *out, size_t cap) {
  const char *v;
  size_t n;
  out[0] = '\0';
  for (;;) {
    fl_rec_tok t = next(r, &v, &n);
    if (t == FL_REC_FIELD) {
      appendz(out, cap, "[");
      append(out, cap, v, n);
      appendz(out, cap, "]");
    } else if (t == FL_REC_NULL) {
      appendz(out, cap, "N");
    } else {
      appendz(out, cap, t == FL_REC_END ? "." : "!");
      break;
    }
  }
  return next(r, &v, &n);
}

static fl_rec_tok rec_next(void *r, const char **v, size_t *n) { return fl_rec_next(r, v, n); }
static fl_rec_tok copy_next(void *r, const char **v, size_t *n) { return fl_copy_next(r, v, n); }

/* fl_record: a row's text as record_out writes it -> its fields. */
static void record_tokens(const char *in, size_t len, char *out, size_t cap) {
  char *s = exact_copy(in, len), *buf = malloc(len ? len : 1);
  fl_rec_reader r;
  if (!buf) abort();
  fl_rec_init(&r, s, len, buf);
  fl_rec_tok t = render_tokens(rec_next, &r, out, cap);
  report(__FILE__, __LINE__, t == FL_REC_END || t == FL_REC_ERROR, "state not sticky for %s", out);
  free(buf);
  free_copy(s, len);
}

#define REC(in, want) do { \
    char got_[512]; \
    record_tokens(in, sizeof(in) - 1, got_, sizeof got_); \
    report(__FILE__, __LINE__, strcmp(got_, want) == 0, "record %s: got %s, want %s", #in, got_, want); \
  } while (0)

static void test_record(void) {
  /* What PostgreSQL's record_out prints (checked against the server). */
  REC("(1,,\"a b\",\"\",\"x\"\"y\\\\z\",\"{1,2}\")", "[1]N[a b][][x\"y\\5cz][{1,2}].");
  REC("()", "N.");                                  /* one NULL column, or no column */
  REC("(,)", "NN.");
  REC("(\"\")", "[].");                             /* an empty string is not NULL */
  REC("(\"(1,2)\",\"\\\\x00ff\")", "[(1,2)][\\5cx00ff].");  /* a nested row; bytea */
  REC("(\"{\"\"a\"\": [1, 2]}\")", "[{\"a\": [1, 2]}].");   /* json */
  REC("(\"2026-01-02 03:04:05+00\",t,-1.5e+300)", "[2026-01-02 03:04:05+00][t][-1.5e+300].");
  REC("(\"line\nbreak\",\"tab\there\")", "[line\\0abreak][tab\\09here].");
  REC("(\xc3\xa9t\xc3\xa9,\xf0\x9f\x98\x80)", "[\\c3\\a9t\\c3\\a9][\\f0\\9f\\98\\80].");
  /* record_in's grammar beyond record_out: mixed quoting, backslashes outside quotes. */
  REC("(ab\"c d\"e,x\\,y)", "[abc de][x,y].");
  REC("  (1)  ", "[1].");
  /* Malformed: never a crash, never a read past the end. */
  REC("", "!");
  REC("1,2)", "!");
  REC("(1,2", "[1]!");
  REC("(\"open", "!");
  REC("(1)x", "[1]!");
  REC("(\\", "!");
  REC("(\"a\\", "!");
}

/* fl_copy: a line of COPY TO STDOUT (text) -> its fields, decoded in place as lconn does. */
static void copy_tokens(const char *in, size_t len, char *out, size_t cap) {
  char *s = exact_copy(in, len);
  fl_copy_reader r;
  fl_copy_init(&r, s, len, s);
  fl_rec_tok t = render_tokens(copy_next, &r, out, cap);
  report(__FILE__, __LINE__, t == FL_REC_END || t == FL_REC_ERROR, "state not sticky for %s", out);
  free_copy(s, len);
}

#define COPYLINE(in, want) do { \
    char got_[512]; \
    copy_tokens(in, sizeof(in) - 1, got_, sizeof got_); \
    report(__FILE__, __LINE__, strcmp(got_, want) == 0, "copy line %s: got %s, want %s", #in, got_, want); \
  } while (0)

static void test_copy_line(void) {
  /* What PostgreSQL's COPY TO prints (checked against the server). */
  COPYLINE("1\t\\N\tabc\n", "[1]N[abc].");
  COPYLINE("1\t\\N\t\\\\x00ff\n", "[1]N[\\5cx00ff].");
  COPYLINE("a\\tb\\nc\\\\d\\re\n", "[a\\09b\\0ac\\5cd\\0de].");
  COPYLINE("\t\n", "[][].");                       /* two empty strings */
  COPYLINE("", "[].");
  COPYLINE("\\101\\x41\\x4\\q\\b\\f\\v", "[AA\\04q\\08\\0c\\0b].");
  COPYLINE("\xc3\xa9\t{\"a\": 1}", "[\\c3\\a9][{\"a\": 1}].");
  COPYLINE("\\NN\t\\N", "[NN]N.");                /* only a whole field is NULL */
  COPYLINE("\\N\tx", "N[x].");                    /* a NULL first field, decoded in place */
  COPYLINE("\\N", "N.");
  COPYLINE("ab\tc\\td\te", "[ab][c\\09d][e].");   /* unescaped fields move as blocks */
  /* Malformed: never a crash, never a read past the end. */
  COPYLINE("a\\", "!");
  COPYLINE("\\x", "[x].");
}

/* fl_binary on PostgreSQL's own send forms (test/fixtures_binary.h): each value reads as
 * what the text path makes of the text of the same value. */
static size_t unhex(const char *hex, char *out) {
  size_t n = 0;
  for (; hex[0] && hex[1]; hex += 2) {
    unsigned b;
    sscanf(hex, "%2x", &b);
    out[n++] = (char)b;
  }
  return n;
}

static void test_binary_fixtures(void) {
  for (size_t k = 0; k < sizeof binary_fixtures / sizeof binary_fixtures[0]; k++) {
    unsigned oid = binary_fixtures[k].oid;
    const char *text = binary_fixtures[k].text;
    size_t tlen = strlen(text);
    char raw[256], buf[512];
    size_t n = unhex(binary_fixtures[k].hex, raw);
    char *c = exact_copy(raw, n);
    fl_bin_value v;
    int rc, ok = 0;
    rc = fl_bin_scalar(oid, c, n, buf, fl_bin_text_size(oid, c, n), &v);
    if (rc == 0) {
      switch (v.kind) {
      case FL_BIN_BOOL: ok = v.i == (text[0] == 't'); break;
      case FL_BIN_INT: {
        int64_t want;
        ok = fl_parse_int64(text, tlen, &want) == 0 && want == v.i;
        break;
      }
      case FL_BIN_FLOAT: {
        double want;
        ok = fl_parse_double(text, tlen, &want) == 0 &&
             (isnan(want) ? isnan(v.d) : want == v.d && signbit(want) == signbit(v.d));
        break;
      }
      case FL_BIN_BYTES:
        if (oid == 17) {
          char dec[256];
          long dn = fl_bytea_decode(text, tlen, dec);
          ok = dn == (long)v.len && memcmp(dec, v.s, v.len) == 0;
        } else {
          ok = v.len == tlen && memcmp(v.s, text, tlen) == 0;
        }
        break;
      default:
        ok = v.len == tlen && memcmp(v.s, text, tlen) == 0;
        break;
      }
    }
    report(__FILE__, __LINE__, ok, "binary fixture %zu (type %u, text \"%s\"): rc %d, kind %d, got \"%.*s\" %lld %.17g",
           k, oid, text, rc, (int)v.kind, rc == 0 && v.s ? (int)v.len : 0, rc == 0 && v.s ? v.s : "", (long long)v.i, v.d);
    free_copy(c, n);
  }
}

#define BIN_BAD(oid, hex) check_bin_bad(__FILE__, __LINE__, oid, hex)
static void check_bin_bad(const char *file, int line, unsigned oid, const char *hex) {
  char raw[128], buf[256];
  size_t n = unhex(hex, raw);
  char *c = exact_copy(raw, n);
  fl_bin_value v;
  report(file, line, fl_bin_scalar(oid, c, n, buf, sizeof buf, &v) == -1, "type %u \"%s\" should be refused", oid, hex);
  free_copy(c, n);
}

/* Arrays: array_send of '{{1,NULL},{3,4}}'::int4[], '[0:1]={a,b}'::text[], '{}'::int4[]. */
static void test_binary_arrays(void) {
  static const char two_by_two[] =
    "00000002" "00000001" "00000017" "00000002" "00000001" "00000002" "00000001"
    "00000004" "00000001" "ffffffff" "00000004" "00000003" "00000004" "00000004";
  static const char lower0[] = "00000001" "00000000" "00000019" "00000002" "00000000" "00000001" "61" "00000001" "62";
  char raw[128];
  size_t n = unhex(two_by_two, raw);
  char *c = exact_copy(raw, n);
  fl_bin_arr a;
  const char *v;
  size_t len;
  report(__FILE__, __LINE__, fl_bin_arr_init(&a, c, n) == 0 && a.ndim == 2 && a.dims[0] == 2 && a.dims[1] == 2 &&
         a.elemtype == 23, "2x2 int4 header");
  report(__FILE__, __LINE__, fl_bin_arr_next(&a, &v, &len) == FL_BIN_ARR_ELEM && len == 4 && v[3] == 1, "elem 1");
  report(__FILE__, __LINE__, fl_bin_arr_next(&a, &v, &len) == FL_BIN_ARR_NULL, "elem 2 NULL");
  report(__FILE__, __LINE__, fl_bin_arr_next(&a, &v, &len) == FL_BIN_ARR_ELEM && v[3] == 3, "elem 3");
  report(__FILE__, __LINE__, fl_bin_arr_next(&a, &v, &len) == FL_BIN_ARR_ELEM && v[3] == 4, "elem 4");
  report(__FILE__, __LINE__, fl_bin_arr_next(&a, &v, &len) == FL_BIN_ARR_END, "end");
  report(__FILE__, __LINE__, fl_bin_arr_next(&a, &v, &len) == FL_BIN_ARR_END, "end stays");
  free_copy(c, n);
  /* one byte short: the last element runs past the end, and the error stays */
  c = exact_copy(raw, n - 1);
  fl_bin_arr_init(&a, c, n - 1);
  for (int i = 0; i < 3; i++) fl_bin_arr_next(&a, &v, &len);
  report(__FILE__, __LINE__, fl_bin_arr_next(&a, &v, &len) == FL_BIN_ARR_ERROR, "truncated element");
  report(__FILE__, __LINE__, fl_bin_arr_next(&a, &v, &len) == FL_BIN_ARR_ERROR, "error stays");
  free_copy(c, n - 1);
  /* a byte left over after the last element */
  raw[n] = 0;
  c = exact_copy(raw, n + 1);
  fl_bin_arr_init(&a, c, n + 1);
  for (int i = 0; i < 4; i++) fl_bin_arr_next(&a, &v, &len);
  report(__FILE__, __LINE__, fl_bin_arr_next(&a, &v, &len) == FL_BIN_ARR_ERROR, "trailing byte");
  free_copy(c, n + 1);

  n = unhex(lower0, raw);
  c = exact_copy(raw, n);
  report(__FILE__, __LINE__, fl_bin_arr_init(&a, c, n) == 0 && a.ndim == 1 && a.dims[0] == 2 && a.elemtype == 25,
         "[0:1] text header");
  report(__FILE__, __LINE__, fl_bin_arr_next(&a, &v, &len) == FL_BIN_ARR_ELEM && len == 1 && v[0] == 'a', "a");
  report(__FILE__, __LINE__, fl_bin_arr_next(&a, &v, &len) == FL_BIN_ARR_ELEM && len == 1 && v[0] == 'b', "b");
  report(__FILE__, __LINE__, fl_bin_arr_next(&a, &v, &len) == FL_BIN_ARR_END, "end");
  free_copy(c, n);

  n = unhex("00000000" "00000000" "00000017", raw);
  c = exact_copy(raw, n);
  report(__FILE__, __LINE__, fl_bin_arr_init(&a, c, n) == 0 && a.ndim == 0 &&
         fl_bin_arr_next(&a, &v, &len) == FL_BIN_ARR_END, "empty");
  free_copy(c, n);
  /* 7 dimensions; a count the bytes cannot hold; a negative size */
  n = unhex("00000007" "00000000" "00000017", raw);
  c = exact_copy(raw, n);
  report(__FILE__, __LINE__, fl_bin_arr_init(&a, c, n) == -1, "7 dims");
  free_copy(c, n);
  n = unhex("00000001" "00000000" "00000017" "7fffffff" "00000001" "00000000", raw);
  c = exact_copy(raw, n);
  report(__FILE__, __LINE__, fl_bin_arr_init(&a, c, n) == -1, "huge count");
  free_copy(c, n);
  n = unhex("00000001" "00000000" "00000017" "ffffffff" "00000001", raw);
  c = exact_copy(raw, n);
  report(__FILE__, __LINE__, fl_bin_arr_init(&a, c, n) == -1, "negative size");
  free_copy(c, n);
}

static void test_binary_bad(void) {
  BIN_BAD(16, "02");                  /* bool is 0 or 1 */
  BIN_BAD(16, "");
  BIN_BAD(23, "000001");
  BIN_BAD(20, "00000000000000000000");
  BIN_BAD(700, "000000");
  BIN_BAD(1700, "0001000000000000");                 /* one digit announced, none sent */
  BIN_BAD(1700, "000100000000000027100000");         /* digit 10000 */
  BIN_BAD(1700, "0000000012340000");                 /* unknown sign */
  BIN_BAD(1700, "00000000");
  BIN_BAD(1082, "000000");
  BIN_BAD(1083, "ffffffffffffffff");                 /* negative time */
  BIN_BAD(1083, "00000014290000001");
  BIN_BAD(1266, "0000000000000000");                 /* timetz without its zone */
  BIN_BAD(1266, "000000000000000000100000");         /* zone out of range */
  BIN_BAD(2950, "00");
  BIN_BAD(3802, "027b7d");                           /* jsonb version 2 */
  BIN_BAD(3802, "");
  BIN_BAD(18, "6162");
  BIN_BAD(1186, "00");                               /* interval is 16 bytes */
  BIN_BAD(1186, "0000000000000000000000000000000000");
  BIN_BAD(3904, "00");                               /* int4range: not read */
  {
    /* numeric's text needs more than a small buffer: refused, not overrun */
    char raw[16], buf[8];
    fl_bin_value v;
    size_t n = unhex("000100050000000000010000", raw);  /* 1e20 */
    report(__FILE__, __LINE__, fl_bin_text_size(1700, raw, n) > sizeof buf &&
           fl_bin_scalar(1700, raw, n, buf, sizeof buf, &v) == -1, "numeric into a short buffer");
  }
}

int main(void) {
  test_json();
  test_arrays();
  test_int64();
  test_double();
  test_double_long();
  test_bytea();
  test_json_number();
  test_json_format();
  test_json_escape();
  test_record();
  test_copy_line();
  test_binary_fixtures();
  test_binary_arrays();
  test_binary_bad();
  return summary();
}
