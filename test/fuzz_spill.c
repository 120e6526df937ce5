/* fuzz_spill: libFuzzer target for the buffer of streamed transactions (fl_spill). The
 * input is a session of operations (begin, append, abort, replay, a new bound, a spill
 * file cut short) on a few transactions, checked against a model: a replay returns exactly
 * the records appended, in order, less those of aborted subtransactions, whether they sit
 * in memory or in a file; a file cut short is read without reading past anything. Build:
 * `make fuzz-spill`. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "fl_spill.h"

#define REQUIRE(c) do { if (!(c)) abort(); } while (0)
#define NTXN 4
#define MAXREC 512

typedef struct {
  int open, cut;            /* cut: its spill file was cut short */
  int n;
  uint32_t sub[MAXREC];
  uint32_t len[MAXREC];
  char *data[MAXREC];
  uint32_t aborted[64];
  int naborted;
} model;

static void model_drop(model *m) {
  for (int i = 0; i < m->n; i++) free(m->data[i]);
  memset(m, 0, sizeof *m);
}

static int model_skipped(const model *m, uint32_t sub) {
  for (int i = 0; i < m->naborted; i++) if (m->aborted[i] == sub) return 1;
  return 0;
}

static void check_replay(fl_spill *sp, model *m, uint32_t xid) {
  REQUIRE(fl_spill_replay(sp, xid) == 1);
  int i = 0, rc;
  char *body;
  uint32_t len, sub;
  while ((rc = fl_spill_next(sp, &body, &len, &sub)) == 1) {
    if (m->cut) continue;    /* past a cut the bytes are anyone's: only memory safety holds */
    while (i < m->n && model_skipped(m, m->sub[i])) i++;
    REQUIRE(i < m->n);
    REQUIRE(sub == m->sub[i] && len == m->len[i] && memcmp(body, m->data[i], len) == 0);
    if (len) body[0] ^= 1;   /* the caller may write into a record it reads once */
    i++;
  }
  if (!m->cut) {
    REQUIRE(rc == 0);
    while (i < m->n && model_skipped(m, m->sub[i])) i++;
    REQUIRE(i == m->n);
  } else {
    REQUIRE(rc == 0 || rc == -1);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fl_spill *sp = fl_spill_new(64);
  model ms[NTXN];
  memset(ms, 0, sizeof ms);
  size_t p = 0;
  REQUIRE(sp);
  while (p + 2 <= size) {
    uint8_t op = data[p] % 6, arg = data[p + 1];
    p += 2;
    uint32_t xid = (uint32_t)(arg % NTXN) + 1;
    model *m = &ms[xid - 1];
    switch (op) {
      case 0:
        REQUIRE(fl_spill_begin(sp, xid) == 0);
        m->open = 1;
        break;
      case 1: {                          /* append: arg = xid, next byte = sub and length */
        if (p >= size) break;
        uint8_t b = data[p++];
        uint32_t sub = b & 3 ? xid * 100 + (b & 3) : xid;
        uint32_t len = b >> 2;
        if (len > size - p) len = (uint32_t)(size - p);
        int rc = fl_spill_append(sp, xid, sub, (const char *)data + p, len);
        if (!m->open) { REQUIRE(rc == -1); p += len; break; }
        REQUIRE(rc == 0);
        if (m->n < MAXREC && !m->cut) {
          m->sub[m->n] = sub;
          m->len[m->n] = len;
          m->data[m->n] = malloc(len ? len : 1);
          REQUIRE(m->data[m->n]);
          memcpy(m->data[m->n], data + p, len);
          m->n++;
        } else {
          m->cut = 1;                    /* beyond what the model keeps: check less */
        }
        p += len;
        break;
      }
      case 2: {                          /* abort: a subtransaction, or (arg bit 7) all */
        uint32_t sub = arg & 0x80 ? (arg & 0x40 ? 0 : xid) : xid * 100 + 1 + (arg >> 2) % 3;
        REQUIRE(fl_spill_abort(sp, xid, sub) == 0);
        if (sub == 0 || sub == xid) model_drop(m);
        else if (m->open && m->naborted < 64) m->aborted[m->naborted++] = sub;
        else if (m->open) m->cut = 1;
        REQUIRE(fl_spill_has(sp, xid) == m->open);
        break;
      }
      case 3:                            /* commit: replay, then drop */
        if (m->open) check_replay(sp, m, xid);
        else REQUIRE(fl_spill_replay(sp, xid) == 0);
        fl_spill_drop(sp, xid);
        model_drop(m);
        break;
      case 4:
        fl_spill_set_limit(sp, (size_t)arg * 4);
        break;
      case 5: {                          /* a spill file cut short */
        FILE *f = fl_spill_file(sp, xid);
        if (!f) break;
        fflush(f);
        long end = ftell(f);
        if (end > 0) {
          REQUIRE(ftruncate(fileno(f), end - 1 - (long)(arg % (unsigned long)end)) == 0);
          fseek(f, 0, SEEK_END);
          m->cut = 1;
        }
        break;
      }
    }
    fl_spill_stats st;
    fl_spill_get_stats(sp, &st);
    int open = 0;
    for (int i = 0; i < NTXN; i++) open += ms[i].open;
    REQUIRE(st.open == open && st.mem <= st.peak);
  }
  for (int i = 0; i < NTXN; i++) model_drop(&ms[i]);
  fl_spill_free(sp);
  return 0;
}
