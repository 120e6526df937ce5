/* fuzz_pgoutput: libFuzzer target for the pgoutput decoder. One input is a session: a
 * version byte, then messages each prefixed by a 2-byte big-endian length, all fed to one
 * decoder so that the relation cache and the stream state carry from message to message.
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -Isrc/core test/fuzz_pgoutput.c src/core/fl_pgoutput.c
 * Built with -DFUZZ_PGOUTPUT_SEEDS instead (any compiler, no libFuzzer), it is a program
 * that writes the captured fixtures into a seed corpus: fuzz_pgoutput_seeds DIR. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "fl_pgoutput.h"

#ifndef FUZZ_PGOUTPUT_SEEDS

/* Beyond memory safety, check what callers rely on: whatever points into the message lies
 * inside it, tuples match their relation, a failed message changes no state. */
#define REQUIRE(c) do { if (!(c)) abort(); } while (0)

static int inside(const char *p, size_t n, const char *buf, size_t len) {
  return p >= buf && n <= len && (size_t)(p - buf) <= len - n;
}

/* A string the decoder returned from the message: its NUL lies inside the message. */
static void check_str(const char *s, const char *buf, size_t len) {
  REQUIRE(s && s >= buf && s < buf + len);
  REQUIRE(memchr(s, 0, len - (size_t)(s - buf)) != NULL);
}

static volatile unsigned sink;

static void check_tuple(const fl_pgo_tuple *t, const fl_pgo_relation *rel, const char *buf,
                        size_t len) {
  int i;
  REQUIRE(t->ncols == rel->ncols);
  for (i = 0; i < t->ncols; i++) {
    const fl_pgo_value *v = &t->vals[i];
    uint32_t k;
    switch (v->kind) {
    case 'n':
    case 'u':
      REQUIRE(v->len == 0 && v->data == NULL);
      break;
    case 't':
    case 'b':
      REQUIRE(inside(v->data, v->len, buf, len));
      /* Touch every byte, so ASan sees a value that strays out of the message. */
      for (k = 0; k < v->len; k++) sink += (unsigned char)v->data[k];
      break;
    default:
      abort();
    }
  }
}

static void check_relation(const fl_pgo *d, const fl_pgo_relation *rel) {
  int i;
  REQUIRE(rel == fl_pgo_relation_get(d, rel->relid));
  REQUIRE(rel->ncols >= 0 && rel->version >= 1);
  sink += (unsigned)strlen(rel->nspname) + (unsigned)strlen(rel->relname);
  for (i = 0; i < rel->ncols; i++) sink += (unsigned)strlen(rel->cols[i].name) + rel->cols[i].typoid;
}

static uint32_t be32(const unsigned char *p) {
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void one(fl_pgo *d, const char *buf, size_t len) {
  fl_pgo_msg m;
  int streaming = fl_pgo_in_stream(d), rc;
  const fl_pgo_relation *before = NULL;
  uint32_t relid = 0, version = 0;
  size_t at = streaming ? 5 : 1;

  if (len >= at + 4 && buf[0] == 'R') {
    relid = be32((const unsigned char *)buf + at);
    before = fl_pgo_relation_get(d, relid);
    if (before) version = before->version;
  }
  rc = fl_pgo_decode(d, buf, len, &m);
  if (rc != 0) {
    REQUIRE(rc == -1 && fl_pgo_error(d)[0] != '\0');
    REQUIRE(fl_pgo_in_stream(d) == streaming);
    if (relid) {
      REQUIRE(fl_pgo_relation_get(d, relid) == before);
      REQUIRE(!before || before->version == version);
    }
    return;
  }
  REQUIRE(len > 0 && (unsigned char)m.type == (unsigned char)buf[0]);
  switch (m.type) {
  case FL_PGO_ORIGIN:
    check_str(m.origin, buf, len);
    break;
  case FL_PGO_RELATION:
    check_relation(d, m.rel);
    REQUIRE(m.rel->relid == relid && (!before || (m.rel == before && m.rel->version == version + 1)));
    break;
  case FL_PGO_TYPE:
    check_str(m.type_nsp, buf, len);
    check_str(m.type_name, buf, len);
    break;
  case FL_PGO_INSERT:
    check_relation(d, m.rel);
    REQUIRE(m.old_kind == 0);
    check_tuple(&m.newtup, m.rel, buf, len);
    break;
  case FL_PGO_UPDATE:
    check_relation(d, m.rel);
    if (m.old_kind) check_tuple(&m.oldtup, m.rel, buf, len);
    check_tuple(&m.newtup, m.rel, buf, len);
    break;
  case FL_PGO_DELETE:
    check_relation(d, m.rel);
    REQUIRE(m.old_kind == 'K' || m.old_kind == 'O');
    check_tuple(&m.oldtup, m.rel, buf, len);
    break;
  case FL_PGO_TRUNCATE:
    REQUIRE(m.nrelids >= 0 && (size_t)m.nrelids * 4 < len);
    if (m.nrelids) sink += m.relids[m.nrelids - 1];
    break;
  case FL_PGO_MESSAGE:
    check_str(m.prefix, buf, len);
    REQUIRE(inside(m.content, m.content_len, buf, len));
    break;
  case FL_PGO_STREAM_START:
    REQUIRE(!streaming && fl_pgo_in_stream(d));
    break;
  case FL_PGO_STREAM_STOP:
    REQUIRE(streaming && !fl_pgo_in_stream(d));
    break;
  case FL_PGO_BEGIN:
  case FL_PGO_COMMIT:
  case FL_PGO_STREAM_COMMIT:
  case FL_PGO_STREAM_ABORT:
    REQUIRE(!streaming && !fl_pgo_in_stream(d));
    break;
  default:
    abort();
  }
  if (m.type != FL_PGO_STREAM_START && m.type != FL_PGO_STREAM_STOP)
    REQUIRE(fl_pgo_in_stream(d) == streaming);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fl_pgo *d;
  size_t i = 1;
  if (size < 1) return 0;
  d = fl_pgo_new(data[0] & 1 ? 2 : 1);
  if (!d) abort();
  while (i + 2 <= size) {
    size_t n = (size_t)data[i] << 8 | data[i + 1];
    char *msg;
    i += 2;
    if (n > size - i) n = size - i;
    /* Each message in a buffer of its own exact size: a read past its end is caught even
     * where the fuzzer's input goes on. */
    msg = malloc(n ? n : 1);
    if (!msg) abort();
    if (n) memcpy(msg, data + i, n);
    one(d, msg, n);
    free(msg);
    i += n;
  }
  fl_pgo_free(d);
  return 0;
}

#else /* FUZZ_PGOUTPUT_SEEDS */

#include "fixtures_pgoutput.h"

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

/* Writes fixture messages [from, to) as one session file. */
static int write_seed(const char *dir, const char *name, int version, const pgo_fixture *fx,
                      size_t from, size_t to) {
  char path[4096];
  FILE *f;
  size_t i;
  snprintf(path, sizeof path, "%s/%s", dir, name);
  f = fopen(path, "wb");
  if (!f) {
    perror(path);
    return -1;
  }
  fputc(version == 2 ? 1 : 0, f);
  for (i = from; i < to; i++) {
    fputc((int)(fx[i].len >> 8), f);
    fputc((int)(fx[i].len & 0xff), f);
    fwrite(fx[i].data, 1, fx[i].len, f);
  }
  return fclose(f);
}

/* The whole captures, and each transaction of v1 on its own (short inputs mutate faster;
 * a lone transaction without its Relation message exercises the unknown-relation path). */
int main(int argc, char **argv) {
  size_t i, start = 0;
  int n = 0, rc = 0;
  char name[64];
  if (argc != 2) {
    fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  rc |= write_seed(argv[1], "v1-all", 1, pgo_fix_v1, 0, COUNT(pgo_fix_v1));
  rc |= write_seed(argv[1], "v2-all", 2, pgo_fix_v2, 0, COUNT(pgo_fix_v2));
  for (i = 0; i < COUNT(pgo_fix_v1); i++) {
    char t = pgo_fix_v1[i].data[0];
    if (t == 'C' || (t == 'M' && i == start)) {
      snprintf(name, sizeof name, "v1-xact-%02d", n++);
      rc |= write_seed(argv[1], name, 1, pgo_fix_v1, start, i + 1);
      start = i + 1;
    }
  }
  return rc ? 1 : 0;
}

#endif
