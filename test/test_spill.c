/* test_spill: the buffer of streamed transactions (fl_spill) on byte fixtures: the record
 * layout written to a spill file, aborted subtransactions skipped in memory and on file,
 * the bound shared by all open transactions, truncated spill files reported, not read past. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "fl_spill.h"
#include "harness.h"

/* Reads xid back: the records' bodies joined as "sub:body|..." in out; the last
 * fl_spill_next result. */
static int replay(fl_spill *sp, uint32_t xid, char *out, size_t cap) {
  out[0] = 0;
  if (!fl_spill_replay(sp, xid)) return -9;
  for (;;) {
    char *body;
    uint32_t len, sub;
    int rc = fl_spill_next(sp, &body, &len, &sub);
    if (rc <= 0) return rc;
    size_t o = strlen(out);
    snprintf(out + o, cap - o, "%u:%.*s|", (unsigned)sub, (int)len, body);
  }
}

static size_t file_bytes(fl_spill *sp, uint32_t xid, char *out, size_t cap) {
  FILE *f = fl_spill_file(sp, xid);
  if (!f) return 0;
  fflush(f);
  rewind(f);
  size_t n = fread(out, 1, cap, f);
  fseek(f, 0, SEEK_END);
  return n;
}

static void test_memory(void) {
  fl_spill *sp = fl_spill_new(1 << 20);
  char got[256];
  fl_spill_stats st;
  CHECK(fl_spill_begin(sp, 7) == 0, "begin");
  CHECK(fl_spill_append(sp, 7, 7, "Iabc", 4) == 0, "append");
  CHECK(fl_spill_append(sp, 7, 9, "", 0) == 0, "append an empty record");
  CHECK(fl_spill_append(sp, 7, 7, "Dx", 2) == 0, "append");
  fl_spill_get_stats(sp, &st);
  CHECK(st.mem == 8 + 4 + 8 + 8 + 2 && st.open == 1 && st.spilled == 0, "memory %zu open %d spilled %llu",
        st.mem, st.open, (unsigned long long)st.spilled);
  CHECK(fl_spill_file(sp, 7) == NULL, "still in memory");
  CHECK(replay(sp, 7, got, sizeof got) == 0 && strcmp(got, "7:Iabc|9:|7:Dx|") == 0, "replay: %s", got);
  CHECK(fl_spill_abort(sp, 7, 9) == 0, "abort a subtransaction");
  CHECK(replay(sp, 7, got, sizeof got) == 0 && strcmp(got, "7:Iabc|7:Dx|") == 0, "aborted skipped: %s", got);
  fl_spill_drop(sp, 7);
  fl_spill_get_stats(sp, &st);
  CHECK(st.mem == 0 && st.open == 0 && st.peak == 30, "after drop: mem %zu open %d peak %zu", st.mem, st.open, st.peak);
  CHECK(fl_spill_replay(sp, 7) == 0, "a dropped transaction is unknown");
  fl_spill_free(sp);
}

/* Past the bound, the transaction's records move to a file in the same layout:
 * [u32 len][u32 sub] big-endian, then the message. */
static void test_file_layout(void) {
  fl_spill *sp = fl_spill_new(30);
  char got[256], file[256];
  fl_spill_stats st;
  fl_spill_begin(sp, 0x01020304);
  CHECK(fl_spill_append(sp, 0x01020304, 0x01020304, "Iabc", 4) == 0, "append");
  CHECK(fl_spill_append(sp, 0x01020304, 0x0a0b0c0d, "U", 1) == 0, "append");
  CHECK(fl_spill_file(sp, 0x01020304) == NULL, "21 bytes stay in memory");
  CHECK(fl_spill_append(sp, 0x01020304, 0x01020304, "Dxyz", 4) == 0, "append past the bound");
  CHECK(fl_spill_file(sp, 0x01020304) != NULL, "spilled");
  static const char want[] =
    "\x00\x00\x00\x04\x01\x02\x03\x04" "Iabc"
    "\x00\x00\x00\x01\x0a\x0b\x0c\x0d" "U"
    "\x00\x00\x00\x04\x01\x02\x03\x04" "Dxyz";
  size_t n = file_bytes(sp, 0x01020304, file, sizeof file);
  CHECK(n == sizeof want - 1 && memcmp(file, want, n) == 0, "file layout (%zu bytes)", n);
  fl_spill_get_stats(sp, &st);
  CHECK(st.mem == 0 && st.spilled == sizeof want - 1 && st.peak == 21, "mem %zu spilled %llu peak %zu",
        st.mem, (unsigned long long)st.spilled, st.peak);
  CHECK(fl_spill_abort(sp, 0x01020304, 0x0a0b0c0d) == 0, "abort");
  CHECK(replay(sp, 0x01020304, got, sizeof got) == 0 && strcmp(got, "16909060:Iabc|16909060:Dxyz|") == 0,
        "replay from file: %s", got);
  fl_spill_free(sp);
}

/* The bound counts every open transaction: the one that passes it spills, the other stays. */
static void test_shared_bound(void) {
  fl_spill *sp = fl_spill_new(40);
  char got[256];
  fl_spill_begin(sp, 1);
  fl_spill_begin(sp, 2);
  CHECK(fl_spill_append(sp, 1, 1, "0123456789abcdef", 16) == 0, "append to 1");
  CHECK(fl_spill_append(sp, 2, 2, "0123456789abcdef", 16) == 0, "append to 2");
  CHECK(fl_spill_file(sp, 1) == NULL && fl_spill_file(sp, 2) != NULL, "2 passed the bound and spilled");
  CHECK(fl_spill_append(sp, 1, 1, "x", 1) == 0, "1 keeps appending in memory");
  CHECK(fl_spill_file(sp, 1) == NULL, "1 stays in memory");
  CHECK(replay(sp, 2, got, sizeof got) == 0 && strcmp(got, "2:0123456789abcdef|") == 0, "2: %s", got);
  CHECK(replay(sp, 1, got, sizeof got) == 0 && strcmp(got, "1:0123456789abcdef|1:x|") == 0, "1: %s", got);
  CHECK(fl_spill_abort(sp, 2, 2) == 0 && !fl_spill_has(sp, 2), "a whole abort forgets 2");
  CHECK(fl_spill_abort(sp, 1, 0) == 0 && !fl_spill_has(sp, 1), "subxid 0 forgets 1");
  CHECK(fl_spill_abort(sp, 3, 3) == 0, "aborting an unknown transaction is nothing");
  fl_spill_free(sp);
}

/* Transaction 42 with two records of 12 bytes each, both in its spill file (*f). */
static fl_spill *two_on_file(FILE **f) {
  fl_spill *sp = fl_spill_new(0);
  fl_spill_begin(sp, 42);
  fl_spill_append(sp, 42, 42, "Iabc", 4);
  fl_spill_append(sp, 42, 42, "Dxyz", 4);
  *f = fl_spill_file(sp, 42);
  fflush(*f);
  return sp;
}

/* A spill file cut short: an error naming the transaction, never a read past what is there. */
static void test_truncated(void) {
  static const long cuts[] = { 3, 8, 10, 11 };
  for (int i = 0; i < COUNT(cuts); i++) {
    FILE *f;
    fl_spill *sp = two_on_file(&f);
    char got[256];
    CHECK(ftruncate(fileno(f), 12 + cuts[i]) == 0, "truncate");
    int rc = replay(sp, 42, got, sizeof got);
    CHECK(rc == -1 && strcmp(got, "42:Iabc|") == 0 &&
          strcmp(fl_spill_error(sp), "spill file of transaction 42 is truncated") == 0 &&
          strcmp(fl_spill_error_kind(sp), "io") == 0,
          "cut at %ld: rc %d got %s err %s", 12 + cuts[i], rc, got, fl_spill_error(sp));
    fl_spill_free(sp);
  }
  /* Cut at a record boundary: the records before it, then the end. */
  FILE *f;
  fl_spill *sp = two_on_file(&f);
  char got[256];
  CHECK(ftruncate(fileno(f), 12) == 0, "truncate");
  CHECK(replay(sp, 42, got, sizeof got) == 0 && strcmp(got, "42:Iabc|") == 0, "cut at a boundary: %s", got);
  fl_spill_free(sp);
}

/* A record length past what was written (a damaged file): an error, not an allocation of
 * that size. */
static void test_damaged_length(void) {
  FILE *f;
  fl_spill *sp = two_on_file(&f);
  char got[256];
  fseek(f, 12, SEEK_SET);
  fwrite("\xff\xff\xff\xf0", 1, 4, f);
  fseek(f, 0, SEEK_END);
  int rc = replay(sp, 42, got, sizeof got);
  CHECK(rc == -1 && strcmp(got, "42:Iabc|") == 0 &&
        strcmp(fl_spill_error(sp), "spill file of transaction 42 is damaged (a record of 4294967280 bytes)") == 0,
        "damaged: rc %d got %s err %s", rc, got, fl_spill_error(sp));
  fl_spill_free(sp);
}

static void test_errors(void) {
  fl_spill *sp = fl_spill_new(1024);
  CHECK(fl_spill_append(sp, 5, 5, "I", 1) == -1 &&
        strcmp(fl_spill_error(sp), "streamed change for unknown transaction 5") == 0 &&
        strcmp(fl_spill_error_kind(sp), "protocol") == 0, "append without begin: %s", fl_spill_error(sp));
  /* Dropped in the middle of a replay: the replay ends, nothing dangles. */
  char *body;
  uint32_t len, sub;
  fl_spill_begin(sp, 6);
  fl_spill_append(sp, 6, 6, "a", 1);
  fl_spill_append(sp, 6, 6, "b", 1);
  CHECK(fl_spill_replay(sp, 6) == 1 && fl_spill_next(sp, &body, &len, &sub) == 1, "first record");
  fl_spill_drop(sp, 6);
  CHECK(fl_spill_next(sp, &body, &len, &sub) == 0, "a dropped replay ends");
  /* Begin twice is one transaction. */
  fl_spill_begin(sp, 8);
  fl_spill_begin(sp, 8);
  fl_spill_stats st;
  fl_spill_get_stats(sp, &st);
  CHECK(st.open == 1, "open %d", st.open);
  fl_spill_clear(sp);
  fl_spill_get_stats(sp, &st);
  CHECK(st.open == 0 && st.mem == 0, "cleared");
  fl_spill_free(sp);
}

int main(void) {
  test_memory();
  test_file_layout();
  test_shared_bound();
  test_truncated();
  test_damaged_length();
  test_errors();
  return summary();
}
