/* fl_stream: the logical replication stream (fl_stream.h): the CopyBoth loop after
 * pg_recvlogical.c, standby status on a deadline, streamed transactions through fl_spill,
 * decoded messages to the consumer's callback, confirmation only when the consumer says. */
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sched.h>
#include <string.h>
#include <time.h>
#include "fl_spill.h"
#include "fl_stream.h"
#include "fl_pqconn.h"
#include "fl_ticker.h"

#define STATUS_INTERVAL_US 10000000LL      /* standby status at least every 10 s */
#define CONFIRM_DELAY_US 1000000LL         /* confirmed positions are reported within 1 s... */
#define CONFIRM_COUNT 1000                 /* ...or once this many are waiting, if sooner */
#define SPILL_MEM_DEFAULT (8u << 20)       /* buffered bytes of streamed changes before spilling */
#define KEEPER_AFTER_US 1000000LL          /* the keeper's status update once none went for 1 s */

/* Who may use the connection and the positions (s->own): the consumer's thread inside an
 * fl_stream function (MAIN), nobody (FREE: the consumer is in its callback, or anywhere
 * outside this file), or the keeper thread sending a status update (KEEPER). */
enum { OWN_MAIN, OWN_FREE, OWN_KEEPER };

struct fl_stream {
  PGconn *pg;
  fl_pgo *dec;
  int copying;
  uint64_t received, flushed, delivered, server_end, confirmed;
  uint64_t passed;            /* a keepalive's position while nothing was being delivered */
  int64_t last_status;        /* monotonic µs of the last status update */
  int64_t unconfirmed_since;  /* monotonic µs when flushed first moved past confirmed (0: not) */
  uint32_t unconfirmed;       /* confirmations since the last status update */
  int in_txn;
  int idle_confirm;           /* the consumer lets idle keepalives move the position */
  fl_spill *spill;
  int cur_open;               /* between Stream Start and Stream Stop of cur_xid */
  uint32_t cur_xid;
  int replaying;              /* the decoder is in a replay's synthetic stream */
  uint64_t messages, bytes, largest;
  char *copybuf;              /* PQgetCopyData's buffer, ours until PQfreemem: a consumer
                                 error raised past the pump leaves it here, freed next time */
  PGresult *res;              /* the last fl_stream_exec result */
  char err[512];
  char kind[16];
  /* The keeper: while streaming, a thread that sends a status update whenever none was
   * sent for KEEPER_AFTER_US and the connection is FREE, so that a callback (or anything
   * the consumer does between pumps: a backfill's read, a sink's wait) taking longer than
   * the server's wal_sender_timeout does not get the connection closed under it. */
  int own;                    /* OWN_*, changed with __atomic builtins only */
  int depth;                  /* the consumer's nesting of fl_stream calls (its thread only) */
  uint64_t kept;              /* status updates the keeper sent */
  fl_ticker keeper;
};

/* The consumer's thread takes the connection (waiting while the keeper sends) unless it
 * holds it already; leave() gives it back after the outermost call. */
static void enter(fl_stream *s) {
  if (s->depth++ > 0) return;
  for (;;) {
    int expect = OWN_FREE;
    if (__atomic_compare_exchange_n(&s->own, &expect, OWN_MAIN, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) return;
    sched_yield();              /* the keeper holds it for one status update */
  }
}

static void leave(fl_stream *s) {
  if (--s->depth == 0) __atomic_store_n(&s->own, OWN_FREE, __ATOMIC_RELEASE);
}

/* The consumer's callback, with the connection FREE while it runs (however deep the pump
 * that called it): the keeper may send status updates meanwhile, and the callback may call
 * fl_stream functions itself. */
static int call_fn(fl_stream *s, fl_stream_fn fn, void *ud, const fl_pgo_msg *m) {
  int depth = s->depth;
  s->depth = 0;
  __atomic_store_n(&s->own, OWN_FREE, __ATOMIC_RELEASE);
  int rc = fn(ud, s, m);
  s->depth = 0;                 /* (whatever the callback left: an error raised through it) */
  enter(s);
  s->depth = depth;
  return rc;
}

static void keep(void *ud);

int64_t fl_stream_now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* The same clock, read at the kernel tick's resolution (a few ms): the pump's time budget is
 * checked after every message, and the precise clock cost 3% of a small row's event. */
static int64_t coarse_now_us(void) {
#ifdef CLOCK_MONOTONIC_COARSE
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
#else
  return fl_stream_now_us();
#endif
}

static int64_t pg_now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return ((int64_t)ts.tv_sec - 946684800LL) * 1000000 + ts.tv_nsec / 1000;
}

static uint64_t get_u64(const char *p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v = (v << 8) | (unsigned char)p[i];
  return v;
}

static void put_u64(char *p, uint64_t v) {
  for (int i = 7; i >= 0; i--) { p[i] = (char)(v & 0xff); v >>= 8; }
}

int fl_stream_fail(fl_stream *s, const char *kind, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(s->err, sizeof s->err, fmt, ap);
  va_end(ap);
  snprintf(s->kind, sizeof s->kind, "%s", kind);
  return -1;
}

const char *fl_stream_error(const fl_stream *s) { return s->err; }
const char *fl_stream_error_kind(const fl_stream *s) { return s->kind; }

/* A server error: its message without the "ERROR:  " prefix, the SQLSTATE as its kind. */
static int pg_fail(fl_stream *s, const PGresult *res) {
  const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
  const char *msg = res ? PQresultErrorMessage(res) : NULL;
  if (!msg || !*msg) msg = PQerrorMessage(s->pg);
  if (strncmp(msg, "ERROR:  ", 8) == 0) msg += 8;
  return fl_stream_fail(s, state && *state ? state : "connection", "%s", msg);
}

static void release_copybuf(fl_stream *s) {
  if (s->copybuf) { PQfreemem(s->copybuf); s->copybuf = NULL; }
}

fl_stream *fl_stream_new(void) {
  fl_stream *s = calloc(1, sizeof *s);
  if (!s) return NULL;
  s->spill = fl_spill_new(SPILL_MEM_DEFAULT);
  if (!s->spill) { free(s); return NULL; }
  s->idle_confirm = 1;
  s->own = OWN_FREE;
  return s;
}

void fl_stream_close(fl_stream *s) {
  enter(s);
  fl_ticker_stop(&s->keeper);   /* (we hold the connection: the keeper is not sending) */
  release_copybuf(s);
  if (s->res) { PQclear(s->res); s->res = NULL; }
  if (s->pg) { PQfinish(s->pg); s->pg = NULL; }
  s->copying = 0;
  s->in_txn = s->cur_open = 0;
  fl_spill_clear(s->spill);     /* unconfirmed: sent again on the next connection */
  leave(s);
}

void fl_stream_free(fl_stream *s) {
  if (!s) return;
  fl_stream_close(s);
  fl_pgo_free(s->dec);
  fl_spill_free(s->spill);
  free(s);
}

int fl_stream_connect(fl_stream *s, const char *dsn) {
  const char *keys[] = { "dbname", "replication", "fallback_application_name", "client_encoding", "options", NULL };
  const char *vals[] = { dsn, "database", "flashlua", "UTF8",
    "-c DateStyle=ISO,MDY -c TimeZone=UTC -c IntervalStyle=postgres -c extra_float_digits=3 -c bytea_output=hex "
    "-c default_transaction_read_only=off",
    NULL };
  PGconn *pg = PQconnectdbParams(keys, vals, 1);
  if (!pg) return fl_stream_fail(s, "memory", "out of memory");
  if (PQstatus(pg) != CONNECTION_OK) {
    fl_stream_fail(s, "connection", "cannot open a replication connection: %s", PQerrorMessage(pg));
    PQfinish(pg);
    return -1;
  }
  if (fl_pq_raw_encoding(pg) != 0) {
    fl_stream_fail(s, "connection", "cannot set client_encoding on the replication connection: %s", PQerrorMessage(pg));
    PQfinish(pg);
    return -1;
  }
  enter(s);
  s->pg = pg;
  leave(s);
  return 0;
}

/* (The keeper never opens or closes the connection: these read s->pg as it is.) */
int fl_stream_is_open(const fl_stream *s) { return s->pg != NULL; }
int fl_stream_socket(const fl_stream *s) { return s->pg ? PQsocket(s->pg) : -1; }

/* A command's result, kept by s until the next one; NULL (and the error set) unless it has
 * rows or says the command is done. */
static const PGresult *keep_result(fl_stream *s, PGresult *res) {
  if (s->res) PQclear(s->res);
  s->res = res;
  ExecStatusType st = PQresultStatus(res);
  if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) {
    pg_fail(s, s->res);
    PQclear(s->res);
    s->res = NULL;
    return NULL;
  }
  return s->res;
}

const PGresult *fl_stream_exec(fl_stream *s, const char *cmd) {
  enter(s);
  const PGresult *res = keep_result(s, PQexec(s->pg, cmd));
  leave(s);
  return res;
}

int fl_stream_send(fl_stream *s, const char *cmd) {
  int rc = 0;
  enter(s);
  if (!PQsendQuery(s->pg, cmd)) rc = fl_stream_fail(s, "connection", "%s", PQerrorMessage(s->pg));
  leave(s);
  return rc;
}

int fl_stream_cancel(fl_stream *s, char *err, size_t len) {
  enter(s);
  PGcancel *c = s->pg ? PQgetCancel(s->pg) : NULL;
  int ok = 0;
  if (c) {
    ok = PQcancel(c, err, len > 4096 ? 4096 : (int)len);
    PQfreeCancel(c);
  } else if (len > 0) {
    snprintf(err, len, "no connection to cancel on");
  }
  leave(s);
  return ok ? 0 : -1;
}

static int result_(fl_stream *s, const PGresult **out) {
  if (!PQconsumeInput(s->pg)) return fl_stream_fail(s, "connection", "%s", PQerrorMessage(s->pg));
  if (PQisBusy(s->pg)) return 0;
  PGresult *res = PQgetResult(s->pg), *more;
  if (!res) return fl_stream_fail(s, "usage", "no command was sent");
  /* The end of the command (ReadyForQuery) comes in the same packet as its result. */
  while ((more = PQgetResult(s->pg)) != NULL) PQclear(more);
  *out = keep_result(s, res);
  return *out ? 1 : -1;
}

int fl_stream_result(fl_stream *s, const PGresult **out) {
  enter(s);
  int rc = result_(s, out);
  leave(s);
  return rc;
}

static int start_(fl_stream *s, const char *cmd, int proto) {
  fl_pgo_free(s->dec);
  s->dec = fl_pgo_new(proto);
  if (!s->dec) return fl_stream_fail(s, "memory", "out of memory");
  PGresult *res = PQexec(s->pg, cmd);
  if (PQresultStatus(res) != PGRES_COPY_BOTH) {
    pg_fail(s, res);
    PQclear(res);
    return -1;
  }
  PQclear(res);
  PQsetnonblocking(s->pg, 1);
  s->copying = 1;
  s->last_status = 0;
  /* The keeper (without one if no thread can be made: the stream works as before, with
   * only the pump's own status updates). */
  if (!s->keeper.running) fl_ticker_start(&s->keeper, 250, keep, s);
  return 0;
}

int fl_stream_start(fl_stream *s, const char *cmd, int proto) {
  enter(s);
  int rc = start_(s, cmd, proto);
  leave(s);
  return rc;
}

/* A standby status update: 0, or -1 when it could not be sent (no error recorded: the
 * keeper calls it too, and the consumer's next call finds the connection broken). */
static int send_status(fl_stream *s, int reply_requested) {
  char msg[1 + 8 * 4 + 1];
  msg[0] = 'r';
  uint64_t write = s->received > s->flushed ? s->received : s->flushed;
  put_u64(msg + 1, write);
  put_u64(msg + 9, s->flushed);
  put_u64(msg + 17, s->flushed);
  put_u64(msg + 25, (uint64_t)pg_now_us());
  msg[33] = reply_requested ? 1 : 0;
  if (PQputCopyData(s->pg, msg, sizeof msg) <= 0 || PQflush(s->pg) < 0) return -1;
  s->last_status = fl_stream_now_us();
  s->confirmed = s->flushed;
  s->unconfirmed_since = 0;
  s->unconfirmed = 0;
  return 0;
}

int fl_stream_status(fl_stream *s, int reply_requested) {
  int rc = 0;
  enter(s);
  if (s->copying && send_status(s, reply_requested) != 0)
    rc = fl_stream_fail(s, "connection", "cannot send a status update: %s", PQerrorMessage(s->pg));
  leave(s);
  return rc;
}

/* The keeper's turn (every 250 ms, on its thread): a status update once none went for
 * KEEPER_AFTER_US, if the connection is FREE. */
static void keep(void *ud) {
  fl_stream *s = ud;
  int expect = OWN_FREE;
  if (!__atomic_compare_exchange_n(&s->own, &expect, OWN_KEEPER, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) return;
  if (s->copying && s->pg && fl_stream_now_us() - s->last_status >= KEEPER_AFTER_US && send_status(s, 0) == 0)
    s->kept++;
  __atomic_store_n(&s->own, OWN_FREE, __ATOMIC_RELEASE);
}

/* A crash redelivers a bounded amount: a confirmed position is reported once
 * CONFIRM_DELAY_US has passed since the first unreported one or CONFIRM_COUNT wait. */
int fl_stream_confirm(fl_stream *s, uint64_t lsn) {
  int rc = 0;
  enter(s);
  if (lsn > s->flushed) {
    s->flushed = lsn;
    int64_t now = fl_stream_now_us();
    if (!s->unconfirmed_since) s->unconfirmed_since = now;
    s->unconfirmed++;
    if (s->unconfirmed >= CONFIRM_COUNT || now - s->unconfirmed_since >= CONFIRM_DELAY_US)
      rc = fl_stream_status(s, 0);
  }
  leave(s);
  return rc;
}

void fl_stream_confirm_idle(fl_stream *s, int on) { s->idle_confirm = on; }

int64_t fl_stream_due(fl_stream *s) {
  enter(s);
  int64_t due = s->last_status + STATUS_INTERVAL_US;
  if (s->unconfirmed_since && s->unconfirmed_since + CONFIRM_DELAY_US < due) due = s->unconfirmed_since + CONFIRM_DELAY_US;
  leave(s);
  return due;
}

void fl_stream_set_spill_limit(fl_stream *s, size_t bytes) { fl_spill_set_limit(s->spill, bytes); }

static int spill_fail(fl_stream *s) {
  return fl_stream_fail(s, fl_spill_error_kind(s->spill), "%s", fl_spill_error(s->spill));
}

/* Takes the decoder out of a replay's synthetic stream (also when an error raised in the
 * consumer left the replay midway). */
static void end_replay(fl_stream *s) {
  fl_pgo_msg m;
  char stop = 'E';
  if (!s->replaying) return;
  s->replaying = 0;
  fl_pgo_decode(s->dec, &stop, 1, &m);
}

/* A committed streamed transaction's changes, in order, to the consumer. */
static int replay(fl_stream *s, uint32_t xid, fl_stream_fn fn, void *ud) {
  char synth[6] = { 'S', (char)(xid >> 24), (char)(xid >> 16), (char)(xid >> 8), (char)xid, 0 };
  fl_pgo_msg m;
  if (fl_pgo_decode(s->dec, synth, sizeof synth, &m) != 0)
    return fl_stream_fail(s, "protocol", "replaying streamed transaction %u: %s", xid, fl_pgo_error(s->dec));
  int rc = 0;
  s->replaying = 1;
  fl_spill_replay(s->spill, xid);
  for (;;) {
    char *body;
    uint32_t len, sub;
    int got = fl_spill_next(s->spill, &body, &len, &sub);
    if (got == 0) break;
    if (got < 0) { rc = spill_fail(s); break; }
    if (fl_pgo_decode(s->dec, body, len, &m) != 0) {
      rc = fl_stream_fail(s, "protocol", "replaying streamed transaction %u: %s", xid, fl_pgo_error(s->dec));
      break;
    }
    if (m.type == FL_PGO_INSERT || m.type == FL_PGO_UPDATE || m.type == FL_PGO_DELETE || m.type == FL_PGO_TRUNCATE ||
        m.type == FL_PGO_MESSAGE) {
      rc = call_fn(s, fn, ud, &m);
      if (rc != 0) break;
    }
  }
  end_replay(s);
  return rc;
}

/* One XLogData payload. Returns 0, 1 (stop requested) or -1 (error). */
static int handle(fl_stream *s, const char *buf, uint32_t len, fl_stream_fn fn, void *ud) {
  fl_pgo_msg m;
  int in_stream = fl_pgo_in_stream(s->dec);
  if (fl_pgo_decode(s->dec, buf, len, &m) != 0)
    return fl_stream_fail(s, "protocol", "cannot decode a pgoutput message: %s", fl_pgo_error(s->dec));
  s->messages++;
  if (m.type == FL_PGO_RELATION && m.rel) {
    int rc = call_fn(s, fn, ud, &m);
    if (rc != 0) return rc;
  }
  if (in_stream && m.type != FL_PGO_STREAM_STOP && m.type != FL_PGO_STREAM_START) {
    /* A change of an in-progress transaction: kept until Stream Commit. Relation messages
     * are kept too: replayed in order, they give rows streamed before an ALTER TABLE of the
     * same transaction the columns they were written with; so are its logical messages
     * (the flashlua plugin's listener tags belong to the changes after them). */
    if (!s->cur_open) return fl_stream_fail(s, "protocol", "streamed change outside a known stream");
    if (m.type == FL_PGO_TYPE) return 0;
    return fl_spill_append(s->spill, s->cur_xid, m.xid, buf, len) == 0 ? 0 : spill_fail(s);
  }
  switch (m.type) {
    case FL_PGO_BEGIN:
      s->in_txn = 1;
      return call_fn(s, fn, ud, &m);
    case FL_PGO_COMMIT:
      s->in_txn = 0;
      if (m.end_lsn > s->delivered) s->delivered = m.end_lsn;
      return call_fn(s, fn, ud, &m);
    case FL_PGO_STREAM_START:
      if (fl_spill_begin(s->spill, m.xid) != 0) return spill_fail(s);
      s->cur_open = 1;
      s->cur_xid = m.xid;
      return 0;
    case FL_PGO_STREAM_STOP:
      s->cur_open = 0;
      return 0;
    case FL_PGO_STREAM_ABORT:
      if (fl_spill_abort(s->spill, m.xid, m.subxid) != 0) return spill_fail(s);
      if (s->cur_open && s->cur_xid == m.xid && !fl_spill_has(s->spill, m.xid)) s->cur_open = 0;
      return 0;
    case FL_PGO_STREAM_COMMIT: {
      fl_pgo_msg begin;
      memset(&begin, 0, sizeof begin);
      begin.type = FL_PGO_BEGIN;
      begin.xid = m.xid;
      begin.lsn = m.lsn;
      begin.timestamp = m.timestamp;
      int rc = call_fn(s, fn, ud, &begin);
      if (rc == 0 && fl_spill_has(s->spill, m.xid)) rc = replay(s, m.xid, fn, ud);
      fl_spill_drop(s->spill, m.xid);
      if (s->cur_xid == m.xid) s->cur_open = 0;
      if (rc != 0) return rc;
      if (m.end_lsn > s->delivered) s->delivered = m.end_lsn;
      return call_fn(s, fn, ud, &m);
    }
    case FL_PGO_INSERT: case FL_PGO_UPDATE: case FL_PGO_DELETE: case FL_PGO_TRUNCATE:
    case FL_PGO_MESSAGE:
      return call_fn(s, fn, ud, &m);
    default:
      return 0;   /* Relation (handed above), Type, Origin */
  }
}

static int lost(fl_stream *s) {
  return fl_stream_fail(s, "connection", "replication connection lost: %s", PQerrorMessage(s->pg));
}

static int pump_(fl_stream *s, long budget, int64_t until, int txn_end,
                 fl_stream_fn fn, fl_stream_large_fn large, void *ud) {
  release_copybuf(s);
  end_replay(s);
  if (!s->copying) return fl_stream_fail(s, "usage", "replication has not started");
  int more = 0;
  int consumed_again = 0;
  while (budget-- > 0) {
    int n = PQgetCopyData(s->pg, &s->copybuf, 1);
    if (n == 0) {
      /* Nothing complete buffered: read the socket, and once more before going back to
       * poll. Only then: PQconsumeInput moves what is still buffered to the front of
       * libpq's buffer and grows it to take all the socket holds, so reading while a pump
       * left messages behind (its time budget ran out) copied megabytes each time, and
       * let the buffer grow to whatever the server was ahead by. */
      if (consumed_again) break;
      consumed_again = 1;
      if (!PQconsumeInput(s->pg)) return lost(s);
      continue;
    }
    consumed_again = 0;
    if (n == -1) {
      PGresult *res = PQgetResult(s->pg);
      const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
      fl_stream_fail(s, state && *state ? state : "connection", "replication stream ended by the server: %s",
                     res && PQresultErrorMessage(res)[0] ? PQresultErrorMessage(res) : PQerrorMessage(s->pg));
      PQclear(res);
      s->copying = 0;
      return -1;
    }
    if (n < 0) return lost(s);
    const char *buf = s->copybuf;
    s->bytes += (uint64_t)n;
    if ((uint64_t)n > s->largest) s->largest = (uint64_t)n;
    int rc = 0;
    if (buf[0] == 'k' && n >= 18) {
      uint64_t wal_end = get_u64(buf + 1);
      int reply = buf[17];
      if (wal_end > s->server_end) s->server_end = wal_end;
      /* Idle tables on a busy server: once nothing is pending, the slot may move on (if
       * the consumer allows). Not while a streamed transaction is open: the server reports
       * positions past its changes before its Stream Commit is sent. */
      fl_spill_stats sst;
      fl_spill_get_stats(s->spill, &sst);
      if (!s->in_txn && sst.open == 0) {
        if (wal_end > s->delivered) s->delivered = wal_end;
        if (wal_end > s->flushed && s->idle_confirm) s->flushed = wal_end;
      }
      /* Every transaction that committed before wal_end has been sent before this keepalive
       * (the walsender decodes in WAL order), so, outside a transaction or streamed block
       * being delivered, all of them were: an open streamed transaction commits later, if
       * at all. (For until_lsn; not a position to confirm while it is open.) */
      if (!s->in_txn && !s->cur_open && wal_end > s->passed) s->passed = wal_end;
      if (wal_end > s->received) s->received = wal_end;
      if (reply && fl_stream_status(s, 0) != 0) rc = -1;
    } else if (buf[0] == 'w' && n >= 25) {
      uint64_t start = get_u64(buf + 1);
      uint64_t wal_end = get_u64(buf + 9);
      if (start > s->received) s->received = start;
      if (wal_end > s->server_end) s->server_end = wal_end;
      rc = handle(s, buf + 25, (uint32_t)(n - 25), fn, ud);
    } else {
      rc = fl_stream_fail(s, "protocol", "unexpected replication message type 0x%02x (%d bytes)", (unsigned char)buf[0], n);
    }
    release_copybuf(s);
    if (n > (int)FL_STREAM_LARGE && large) large(ud, (size_t)n);
    if (rc < 0) return -1;
    if (rc > 0) return -2;
    if (budget == 0) more = 1;
    if (until && coarse_now_us() >= until) { more = 1; break; }
    if (txn_end && !s->in_txn) { more = 1; break; }
  }
  int64_t now = fl_stream_now_us();
  if (s->last_status == 0 || now - s->last_status >= STATUS_INTERVAL_US ||
      (s->unconfirmed_since && now - s->unconfirmed_since >= CONFIRM_DELAY_US)) {
    if (fl_stream_status(s, 0) != 0) return -1;
  }
  return more;
}

int fl_stream_pump(fl_stream *s, long budget, int64_t until, int txn_end,
                   fl_stream_fn fn, fl_stream_large_fn large, void *ud) {
  /* A pump is never inside another fl_stream call of this stream (a callback's own pump
   * runs at depth 0): a depth left over is from an error raised through a call that held
   * the connection (a longjmp), taken as given back. */
  if (s->depth != 0) {
    s->depth = 0;
    __atomic_store_n(&s->own, OWN_FREE, __ATOMIC_RELEASE);
  }
  enter(s);
  int rc = pump_(s, budget, until, txn_end, fn, large, ud);
  leave(s);
  return rc;
}

void fl_stream_finish(fl_stream *s, double timeout) {
  enter(s);
  fl_ticker_stop(&s->keeper);
  release_copybuf(s);
  if (!(timeout > 0)) timeout = 0;                /* 0, negative or NaN: do not wait */
  if (timeout > 86400) timeout = 86400;
  if (s->pg && s->copying) {
    fl_stream_status(s, 0);
    PQputCopyEnd(s->pg, NULL);
    int64_t deadline = fl_stream_now_us() + (int64_t)(timeout * 1e6);
    int ended = 0;
    for (;;) {
      if (PQflush(s->pg) < 0) break;
      char *buf = NULL;
      int n = PQgetCopyData(s->pg, &buf, 1);
      if (n > 0) {
        PQfreemem(buf);
        if (fl_stream_now_us() >= deadline) break;  /* a server still streaming does not hold us */
        continue;
      }
      if (n == -1) { ended = 1; break; }  /* the server ended the copy */
      if (n < 0) break;
      int64_t left = deadline - fl_stream_now_us();
      if (left <= 0) break;
      struct pollfd pfd = { PQsocket(s->pg), POLLIN, 0 };
      if (poll(&pfd, 1, (int)(left / 1000) + 1) < 0 && errno != EINTR) break;
      if (!PQconsumeInput(s->pg)) break;
    }
    /* Once the server has ended the copy, its last results are read (bounded: a result
     * still in a COPY state would be returned forever). Otherwise the connection is just
     * closed: the server notices and releases the slot. */
    if (ended) {
      PGresult *res;
      for (int i = 0; i < 16 && PQstatus(s->pg) == CONNECTION_OK && !PQisBusy(s->pg) &&
                      (res = PQgetResult(s->pg)) != NULL; i++) {
        ExecStatusType st = PQresultStatus(res);
        PQclear(res);
        if (st == PGRES_COPY_OUT || st == PGRES_COPY_IN || st == PGRES_COPY_BOTH) break;
      }
    }
    s->copying = 0;
  }
  fl_stream_close(s);
  leave(s);
}

void fl_stream_get_state(fl_stream *s, fl_stream_state *st) {
  enter(s);
  fl_spill_stats sst;
  fl_spill_get_stats(s->spill, &sst);
  st->received = s->received;
  st->flushed = s->flushed;
  st->delivered = s->delivered;
  st->passed = s->passed > s->delivered ? s->passed : s->delivered;
  st->confirmed = s->confirmed;
  st->server_end = s->server_end;
  st->in_txn = s->in_txn;
  st->copying = s->copying;
  st->streams_open = sst.open > 0;
  st->messages = s->messages;
  st->bytes = s->bytes;
  st->largest = s->largest;
  st->stream_buffered = sst.mem;
  st->stream_buffered_peak = sst.peak;
  st->stream_spilled = sst.spilled;
  st->keeper_updates = s->kept;
  leave(s);
}

const fl_pgo_relation *fl_stream_relation(const fl_stream *s, uint32_t relid) {
  return s->dec ? fl_pgo_relation_get(s->dec, relid) : NULL;
}
