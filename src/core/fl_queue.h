/* fl_queue: a bounded queue of byte messages between threads (mutex + two condition
 * variables). The parallel handler states (src/lua/lworkers.c) take events from one and
 * hand completions back through another; a full queue makes its producer wait, so memory
 * stays bounded by the capacity. Pure C: no Lua, no libpq. */
#ifndef FL_QUEUE_H
#define FL_QUEUE_H
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

typedef struct fl_msg {
  uint64_t id;     /* the sender's number for the message */
  int32_t tag;     /* what it is (the sender's to define) */
  double value;    /* a number that travels with it (e.g. seconds spent) */
  char *data;      /* malloc'd bytes owned by the queue until popped, or NULL */
  size_t len;
} fl_msg;

typedef struct fl_queue {
  pthread_mutex_t mu;
  pthread_cond_t not_empty, not_full;
  fl_msg *ring;
  size_t cap, head, count;
  int closed;      /* no more pushes; pops drain what is left */
  int aborted;     /* no more pushes or pops; what is left is freed at destroy */
} fl_queue;

/* 0, or -1 when out of memory. cap >= 1. */
int fl_queue_init(fl_queue *q, size_t cap);
/* Frees what is left (their data too). No thread may use q any more. */
void fl_queue_destroy(fl_queue *q);
/* Appends m, waiting at most timeout_s (< 0: for ever) for room. 0: queued (the queue owns
 * m->data now); 1: still full after timeout_s; -1: closed or aborted (m->data stays the
 * caller's). */
int fl_queue_push(fl_queue *q, const fl_msg *m, double timeout_s);
/* Takes the oldest message into *out, waiting at most timeout_s (< 0: for ever). 0: taken
 * (out->data is the caller's to free); 1: empty after timeout_s; -1: closed and empty, or
 * aborted. */
int fl_queue_pop(fl_queue *q, fl_msg *out, double timeout_s);
/* close: pushes fail, pops drain what is queued then fail. abort: both fail at once. Both
 * wake every waiting thread. */
void fl_queue_close(fl_queue *q);
void fl_queue_abort(fl_queue *q);
size_t fl_queue_count(fl_queue *q);
#endif
