/* fl_stream: a logical replication stream over libpq, no Lua. START_REPLICATION with
 * pgoutput, the CopyBoth loop in the manner of pg_recvlogical.c (keepalives, standby status
 * updates on a deadline), streamed transactions held in an fl_spill until their commit,
 * and every decoded pgoutput message handed to the consumer's C callback. The position
 * confirmed to the server moves only when the consumer calls fl_stream_confirm. */
#ifndef FL_STREAM_H
#define FL_STREAM_H
#include <stddef.h>
#include <stdint.h>
#include <libpq-fe.h>
#include "fl_pgoutput.h"

typedef struct fl_stream fl_stream;

/* Called with each message, in stream order:
 *  - Begin; then Insert/Update/Delete/Truncate; then Commit.
 *  - A streamed transaction arrives whole at its Stream Commit: a Begin made from the Stream
 *    Commit (xid, commit LSN, time), its changes, then the Stream Commit itself. (Its
 *    Relation messages are replayed into the decoder's cache too, so rows streamed before
 *    an ALTER TABLE of the same transaction keep their columns, but not handed again.)
 *  - Relation as it arrives (inside a stream too), and logical Messages outside streams.
 * Returns 0 to go on, 1 to stop the pump, -1 on an error set with fl_stream_fail. */
typedef int (*fl_stream_fn)(void *ud, fl_stream *s, const fl_pgo_msg *m);
/* Told after a message larger than FL_STREAM_LARGE is done with: memory may be given back. */
typedef void (*fl_stream_large_fn)(void *ud, size_t bytes);

#define FL_STREAM_LARGE (8u << 20)

typedef struct {
  uint64_t received;        /* highest WAL position received */
  uint64_t flushed;         /* confirmed by the consumer: reported as flushed */
  uint64_t delivered;       /* every transaction before it has been handed to the consumer */
  uint64_t passed;          /* every transaction that committed before it has been (delivered,
                             * or a keepalive's position: open streamed ones commit later) */
  uint64_t confirmed;       /* the flushed position the last status update reported */
  uint64_t server_end;      /* the last position the server reported */
  int in_txn, copying, streams_open;
  uint64_t messages, bytes, largest;
  size_t stream_buffered, stream_buffered_peak;
  uint64_t stream_spilled;
  uint64_t keeper_updates;  /* status updates sent while the consumer was busy elsewhere */
} fl_stream_state;

fl_stream *fl_stream_new(void);                     /* NULL on out of memory */
void fl_stream_free(fl_stream *s);                   /* closes the connection, frees all */
/* A replication=database connection whose walsender prints values in canonical text forms. */
int fl_stream_connect(fl_stream *s, const char *dsn);
/* A replication command before streaming (IDENTIFY_SYSTEM, CREATE_REPLICATION_SLOT, ...):
 * the result (tuples or command ok) belongs to s until the next exec or free; NULL on error. */
const PGresult *fl_stream_exec(fl_stream *s, const char *cmd);
/* The same, without waiting (CREATE_REPLICATION_SLOT may wait for running transactions):
 * fl_stream_send sends it (0, or -1 on an error); fl_stream_result then returns 1 and the
 * result in *out (it belongs to s as exec's does) once it has come, 0 while it has not,
 * -1 on an error. */
int fl_stream_send(fl_stream *s, const char *cmd);
int fl_stream_result(fl_stream *s, const PGresult **out);
/* Asks the server to cancel the command fl_stream_send sent (a CREATE_REPLICATION_SLOT
 * waiting for old transactions: its walsender would wait on, holding the slot, after the
 * connection is closed). 0, or -1 with the reason in err. */
int fl_stream_cancel(fl_stream *s, char *err, size_t len);
/* The whole START_REPLICATION statement (built and quoted by the caller). */
int fl_stream_start(fl_stream *s, const char *cmd, int proto);
/* Reads what has arrived, at most budget messages, until the monotonic µs deadline `until`
 * (0: none), or (txn_end) until no transaction is open. Returns 1 when it stopped with more
 * possibly waiting, 0 when the socket is drained, -1 on an error, -2 when the consumer
 * asked to stop. Sends a status update when one is due. */
int fl_stream_pump(fl_stream *s, long budget, int64_t until, int txn_end,
                   fl_stream_fn fn, fl_stream_large_fn large, void *ud);
/* Everything before lsn has been handled: it is reported within 1 s or 1,000 confirmations. */
int fl_stream_confirm(fl_stream *s, uint64_t lsn);
/* Whether a keepalive's position may be confirmed while nothing is delivered and pending
 * (no transaction open): the consumer says so (every delivered event handled). */
void fl_stream_confirm_idle(fl_stream *s, int on);
int fl_stream_status(fl_stream *s, int reply_requested);   /* a status update now */
int64_t fl_stream_due(fl_stream *s);                 /* monotonic µs of the next one */
void fl_stream_set_spill_limit(fl_stream *s, size_t bytes);
/* A last status update, the end of the copy, and a wait of up to timeout_s for the server
 * to end it too; then the connection is closed. */
void fl_stream_finish(fl_stream *s, double timeout_s);
void fl_stream_close(fl_stream *s);                        /* the connection only */
int fl_stream_socket(const fl_stream *s);
int fl_stream_is_open(const fl_stream *s);
void fl_stream_get_state(fl_stream *s, fl_stream_state *st);
const fl_pgo_relation *fl_stream_relation(const fl_stream *s, uint32_t relid);
int64_t fl_stream_now_us(void);                            /* the monotonic clock used */

/* The last error: its message, and its kind (the SQLSTATE when the server sent one, else a
 * short word: "connection", "protocol", "memory", "io", "usage", or the consumer's). */
const char *fl_stream_error(const fl_stream *s);
const char *fl_stream_error_kind(const fl_stream *s);
int fl_stream_fail(fl_stream *s, const char *kind, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));

#endif
