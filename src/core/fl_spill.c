/* fl_spill: streamed transactions buffered until their Stream Commit, memory-bounded,
 * spilled to temporary files past the bound (fl_spill.h). */
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include "fl_spill.h"

typedef struct txn {
  uint32_t xid;
  char *mem;
  size_t len, cap;
  FILE *spill;          /* past the memory bound everything goes here */
  size_t flen;          /* bytes written to it */
  uint32_t *aborted;    /* aborted subtransactions: their records are skipped at replay */
  int naborted, capaborted;
  struct txn *next;
} txn;

struct fl_spill {
  txn *txns;
  size_t mem, limit, peak;
  uint64_t spilled;
  int open;
  txn *replaying;       /* fl_spill_next reads this one... */
  size_t pos;           /* ...from here, when it is in memory */
  char *rec;            /* the record read back from a spill file */
  size_t reccap;
  char err[256];
  const char *kind;
};

static int fail(fl_spill *sp, const char *kind, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));

static int fail(fl_spill *sp, const char *kind, const char *fmt, ...) {
  va_list ap;
  sp->kind = kind;
  va_start(ap, fmt);
  vsnprintf(sp->err, sizeof sp->err, fmt, ap);
  va_end(ap);
  return -1;
}

static uint32_t get_u32(const unsigned char *p) {
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put_u32(char *p, uint32_t v) {
  p[0] = (char)(v >> 24); p[1] = (char)(v >> 16); p[2] = (char)(v >> 8); p[3] = (char)v;
}

static txn *find(const fl_spill *sp, uint32_t xid) {
  for (txn *t = sp->txns; t; t = t->next)
    if (t->xid == xid) return t;
  return NULL;
}

fl_spill *fl_spill_new(size_t limit) {
  fl_spill *sp = calloc(1, sizeof *sp);
  if (sp) sp->limit = limit;
  return sp;
}

void fl_spill_set_limit(fl_spill *sp, size_t limit) { sp->limit = limit; }

static void txn_free(txn *t) {
  if (t->spill) fclose(t->spill);
  free(t->mem);
  free(t->aborted);
  free(t);
}

void fl_spill_drop(fl_spill *sp, uint32_t xid) {
  for (txn **p = &sp->txns; *p; p = &(*p)->next) {
    txn *t = *p;
    if (t->xid != xid) continue;
    *p = t->next;
    sp->mem -= t->len;
    sp->open--;
    if (sp->replaying == t) sp->replaying = NULL;
    txn_free(t);
    break;
  }
  if (!sp->replaying) {
    free(sp->rec);
    sp->rec = NULL;
    sp->reccap = 0;
  }
}

void fl_spill_clear(fl_spill *sp) {
  while (sp->txns) fl_spill_drop(sp, sp->txns->xid);
}

void fl_spill_free(fl_spill *sp) {
  if (!sp) return;
  fl_spill_clear(sp);
  free(sp->rec);
  free(sp);
}

int fl_spill_has(const fl_spill *sp, uint32_t xid) { return find(sp, xid) != NULL; }

int fl_spill_begin(fl_spill *sp, uint32_t xid) {
  if (find(sp, xid)) return 0;
  txn *t = calloc(1, sizeof *t);
  if (!t) return fail(sp, "memory", "out of memory");
  t->xid = xid;
  t->next = sp->txns;
  sp->txns = t;
  sp->open++;
  return 0;
}

int fl_spill_append(fl_spill *sp, uint32_t xid, uint32_t sub, const char *buf, uint32_t len) {
  txn *t = find(sp, xid);
  if (!t) return fail(sp, "protocol", "streamed change for unknown transaction %u", xid);
  char hdr[FL_SPILL_HEADER];
  put_u32(hdr, len);
  put_u32(hdr + 4, sub);
  size_t need = (size_t)len + FL_SPILL_HEADER;
  if (!t->spill && sp->mem + need > sp->limit) {
    /* Past the bound: move what this transaction holds to a file and keep appending there. */
    t->spill = tmpfile();
    if (!t->spill)
      return fail(sp, "io", "cannot create a spill file for streamed transaction %u: %s", xid, strerror(errno));
    if (t->len && fwrite(t->mem, 1, t->len, t->spill) != t->len) goto werr;
    t->flen = t->len;
    sp->spilled += t->len;
    sp->mem -= t->len;
    free(t->mem);
    t->mem = NULL; t->len = t->cap = 0;
  }
  if (t->spill) {
    if (fwrite(hdr, 1, FL_SPILL_HEADER, t->spill) != FL_SPILL_HEADER || fwrite(buf, 1, len, t->spill) != len)
      goto werr;
    t->flen += need;
    sp->spilled += need;
    return 0;
  }
  if (t->len + need > t->cap) {
    size_t cap = t->cap ? t->cap * 2 : 65536;
    while (cap < t->len + need) cap *= 2;
    char *m = realloc(t->mem, cap);
    if (!m) return fail(sp, "memory", "out of memory buffering a streamed transaction");
    t->mem = m; t->cap = cap;
  }
  memcpy(t->mem + t->len, hdr, FL_SPILL_HEADER);
  memcpy(t->mem + t->len + FL_SPILL_HEADER, buf, len);
  t->len += need;
  sp->mem += need;
  if (sp->mem > sp->peak) sp->peak = sp->mem;
  return 0;
werr:
  return fail(sp, "io", "cannot write the spill file of streamed transaction %u: %s", xid, strerror(errno));
}

int fl_spill_abort(fl_spill *sp, uint32_t xid, uint32_t sub) {
  txn *t = find(sp, xid);
  if (!t) return 0;
  if (sub == xid || sub == 0) {
    fl_spill_drop(sp, xid);
    return 0;
  }
  if (t->naborted == t->capaborted) {
    int cap = t->capaborted ? t->capaborted * 2 : 8;
    uint32_t *a = realloc(t->aborted, sizeof(uint32_t) * (size_t)cap);
    if (!a) return fail(sp, "memory", "out of memory");
    t->aborted = a; t->capaborted = cap;
  }
  t->aborted[t->naborted++] = sub;
  return 0;
}

int fl_spill_replay(fl_spill *sp, uint32_t xid) {
  txn *t = find(sp, xid);
  sp->replaying = t;
  sp->pos = 0;
  if (!t) return 0;
  if (t->spill) {
    fflush(t->spill);
    rewind(t->spill);
  }
  return 1;
}

/* One record, aborted ones included: 1, 0 at the end, -1 on error. */
static int read_record(fl_spill *sp, txn *t, char **body, uint32_t *len, uint32_t *sub) {
  unsigned char hdr[FL_SPILL_HEADER];
  if (!t->spill) {
    if (sp->pos >= t->len) return 0;
    if (t->len - sp->pos < FL_SPILL_HEADER) return fail(sp, "protocol", "buffer of transaction %u is truncated", t->xid);
    memcpy(hdr, t->mem + sp->pos, FL_SPILL_HEADER);
    *len = get_u32(hdr);
    *sub = get_u32(hdr + 4);
    if (t->len - sp->pos - FL_SPILL_HEADER < *len) return fail(sp, "protocol", "buffer of transaction %u is truncated", t->xid);
    *body = t->mem + sp->pos + FL_SPILL_HEADER;
    sp->pos += FL_SPILL_HEADER + (size_t)*len;
    return 1;
  }
  size_t got = fread(hdr, 1, FL_SPILL_HEADER, t->spill);
  if (got == 0 && !ferror(t->spill)) return 0;
  if (got != FL_SPILL_HEADER) return fail(sp, "io", "spill file of transaction %u is truncated", t->xid);
  *len = get_u32(hdr);
  *sub = get_u32(hdr + 4);
  sp->pos += FL_SPILL_HEADER;
  /* A length past what was written is a damaged file: no allocation of its size. */
  if (sp->pos > t->flen || *len > t->flen - sp->pos)
    return fail(sp, "io", "spill file of transaction %u is damaged (a record of %u bytes)", t->xid, *len);
  sp->pos += *len;
  if (*len > sp->reccap || !sp->rec) {
    char *n = realloc(sp->rec, *len ? *len : 1);
    if (!n) return fail(sp, "memory", "out of memory replaying transaction %u", t->xid);
    sp->rec = n;
    sp->reccap = *len;
  }
  if (fread(sp->rec, 1, *len, t->spill) != *len) return fail(sp, "io", "spill file of transaction %u is truncated", t->xid);
  *body = sp->rec;
  return 1;
}

int fl_spill_next(fl_spill *sp, char **body, uint32_t *len, uint32_t *sub) {
  txn *t = sp->replaying;
  if (!t) return 0;
  for (;;) {
    int rc = read_record(sp, t, body, len, sub);
    if (rc <= 0) return rc;
    int skip = 0;
    for (int i = 0; i < t->naborted; i++) if (t->aborted[i] == *sub) skip = 1;
    if (!skip) return 1;
  }
}

void fl_spill_get_stats(const fl_spill *sp, fl_spill_stats *st) {
  st->mem = sp->mem;
  st->peak = sp->peak;
  st->spilled = sp->spilled;
  st->open = sp->open;
}

const char *fl_spill_error(const fl_spill *sp) { return sp->err; }

const char *fl_spill_error_kind(const fl_spill *sp) { return sp->kind ? sp->kind : "io"; }

FILE *fl_spill_file(fl_spill *sp, uint32_t xid) {
  txn *t = find(sp, xid);
  return t ? t->spill : NULL;
}
