/* harness: what every C test program shares: pass/fail counts with file:line, CHECK,
 * exact-length copies of inputs (no NUL after them, so ASan or valgrind catch a read past
 * the end), and the summary line scripts/run-tests reads. Included once per test program. */
#ifndef HARNESS_H
#define HARNESS_H
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define COUNT(a) ((int)(sizeof(a) / sizeof((a)[0])))

static int n_pass, n_fail;

#if defined(__GNUC__)
__attribute__((format(printf, 4, 5)))
#endif
static inline void report(const char *file, int line, int ok, const char *fmt, ...) {
  va_list ap;
  if (ok) {
    n_pass++;
    return;
  }
  n_fail++;
  fprintf(stderr, "%s:%d: FAIL: ", file, line);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
}

#define CHECK(ok, ...) report(__FILE__, __LINE__, (ok), __VA_ARGS__)

/* A malloc'd copy of exactly len bytes. malloc(0) may return NULL, which the readers need
 * not accept: an empty input gets a static byte that the reader is told not to touch. */
static inline char *exact_copy(const char *s, size_t len) {
  static char empty_dummy;
  char *p;
  if (len == 0) return &empty_dummy;
  p = malloc(len);
  if (!p) abort();
  memcpy(p, s, len);
  return p;
}

static inline void free_copy(char *p, size_t len) {
  if (len) free(p);
}

/* The last line of every test program; its exit status. */
static inline int summary(void) {
  printf("%d passed, %d failed\n", n_pass, n_fail);
  return n_fail ? 1 : 0;
}

#endif
