/* fl_spill: the changes of streamed (in-progress) transactions, kept until their Stream
 * Commit and then read back in order. Pure C: no libpq, no Lua. Each open transaction's
 * records are [u32 len][u32 xid][message bytes] (big-endian), in memory until all open
 * transactions together pass a bound, then in a temporary file. A record of an aborted
 * subtransaction is skipped when read back. */
#ifndef FL_SPILL_H
#define FL_SPILL_H
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define FL_SPILL_HEADER 8        /* bytes before each record's message */

typedef struct fl_spill fl_spill;      /* the open streamed transactions of one connection */

typedef struct {
  size_t mem;           /* bytes held in memory now, all transactions */
  size_t peak;          /* the most held in memory at once */
  uint64_t spilled;     /* bytes ever written to spill files */
  int open;             /* open transactions */
} fl_spill_stats;

fl_spill *fl_spill_new(size_t limit);     /* NULL on out of memory */
void fl_spill_free(fl_spill *sp);
void fl_spill_set_limit(fl_spill *sp, size_t limit);

/* Stream Start: the transaction xid is open (created if new). 0, or -1 (fl_spill_error). */
int fl_spill_begin(fl_spill *sp, uint32_t xid);
/* Appends one message of subtransaction `sub` to open transaction xid. 0, or -1 (unknown
 * xid, out of memory, a spill file that cannot be written: fl_spill_error). */
int fl_spill_append(fl_spill *sp, uint32_t xid, uint32_t sub, const char *buf, uint32_t len);
/* Stream Abort: sub == xid or 0 forgets the whole transaction, another sub marks that
 * subtransaction's records to be skipped. 0, or -1 on out of memory. */
int fl_spill_abort(fl_spill *sp, uint32_t xid, uint32_t sub);
int fl_spill_has(const fl_spill *sp, uint32_t xid);
void fl_spill_drop(fl_spill *sp, uint32_t xid);
void fl_spill_clear(fl_spill *sp);       /* drops every open transaction (the counters stay) */

/* Reading a committed transaction back: fl_spill_replay(xid) (1: it is open, 0: unknown),
 * then fl_spill_next until it returns 0 (end) or -1 (a truncated or unreadable spill file,
 * out of memory: fl_spill_error). *body stays valid until the next call; the caller may
 * write into it (it is read once). The read buffer belongs to sp, so a caller that never
 * finishes (an error raised past it) leaks nothing: fl_spill_drop or fl_spill_free frees. */
int fl_spill_replay(fl_spill *sp, uint32_t xid);
int fl_spill_next(fl_spill *sp, char **body, uint32_t *len, uint32_t *sub);

void fl_spill_get_stats(const fl_spill *sp, fl_spill_stats *st);
const char *fl_spill_error(const fl_spill *sp);
const char *fl_spill_error_kind(const fl_spill *sp);   /* "memory", "io" or "protocol" */

/* The spill file of xid, or NULL while it is in memory: for tests that corrupt it. */
FILE *fl_spill_file(fl_spill *sp, uint32_t xid);

#endif
