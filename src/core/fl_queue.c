/* fl_queue: a bounded multi-producer multi-consumer queue of byte messages (fl_queue.h). */
#include <errno.h>
#include <stdlib.h>
#include <time.h>
#include "fl_queue.h"

int fl_queue_init(fl_queue *q, size_t cap) {
  if (cap < 1) cap = 1;
  q->ring = calloc(cap, sizeof *q->ring);
  if (q->ring == NULL) return -1;
  q->cap = cap;
  q->head = q->count = 0;
  q->closed = q->aborted = 0;
  pthread_mutex_init(&q->mu, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  /* Deadlines on the monotonic clock: a change of the wall clock never stretches a wait. */
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&q->not_empty, &ca);
  pthread_cond_init(&q->not_full, &ca);
  pthread_condattr_destroy(&ca);
  return 0;
}

void fl_queue_destroy(fl_queue *q) {
  if (q->ring == NULL) return;
  for (size_t i = 0; i < q->count; i++) free(q->ring[(q->head + i) % q->cap].data);
  free(q->ring);
  q->ring = NULL;
  pthread_cond_destroy(&q->not_empty);
  pthread_cond_destroy(&q->not_full);
  pthread_mutex_destroy(&q->mu);
}

static struct timespec deadline(double timeout_s) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  time_t s = (time_t)timeout_s;
  long ns = ts.tv_nsec + (long)((timeout_s - (double)s) * 1e9);
  ts.tv_sec += s + ns / 1000000000L;
  ts.tv_nsec = ns % 1000000000L;
  return ts;
}

/* Waits on c until *ready(q) or a stop; 0 ready, 1 timed out, -1 stopped. Called locked. */
static int wait_for(fl_queue *q, pthread_cond_t *c, int want_room, double timeout_s) {
  struct timespec until;
  if (timeout_s > 0) until = deadline(timeout_s);
  for (;;) {
    if (q->aborted) return -1;
    if (want_room) {
      if (q->closed) return -1;
      if (q->count < q->cap) return 0;
    } else {
      if (q->count > 0) return 0;
      if (q->closed) return -1;
    }
    if (timeout_s == 0) return 1;
    if (timeout_s < 0) {
      pthread_cond_wait(c, &q->mu);
    } else if (pthread_cond_timedwait(c, &q->mu, &until) == ETIMEDOUT) {
      timeout_s = 0;   /* one last look at the state, then time out */
    }
  }
}

int fl_queue_push(fl_queue *q, const fl_msg *m, double timeout_s) {
  pthread_mutex_lock(&q->mu);
  int rc = wait_for(q, &q->not_full, 1, timeout_s);
  if (rc == 0) {
    q->ring[(q->head + q->count) % q->cap] = *m;
    q->count++;
    pthread_cond_signal(&q->not_empty);
  }
  pthread_mutex_unlock(&q->mu);
  return rc;
}

int fl_queue_pop(fl_queue *q, fl_msg *out, double timeout_s) {
  pthread_mutex_lock(&q->mu);
  int rc = wait_for(q, &q->not_empty, 0, timeout_s);
  if (rc == 0) {
    *out = q->ring[q->head];
    q->ring[q->head].data = NULL;
    q->head = (q->head + 1) % q->cap;
    q->count--;
    pthread_cond_signal(&q->not_full);
  }
  pthread_mutex_unlock(&q->mu);
  return rc;
}

static void stop(fl_queue *q, int abort) {
  pthread_mutex_lock(&q->mu);
  q->closed = 1;
  if (abort) q->aborted = 1;
  pthread_cond_broadcast(&q->not_empty);
  pthread_cond_broadcast(&q->not_full);
  pthread_mutex_unlock(&q->mu);
}

void fl_queue_close(fl_queue *q) { stop(q, 0); }
void fl_queue_abort(fl_queue *q) { stop(q, 1); }

size_t fl_queue_count(fl_queue *q) {
  pthread_mutex_lock(&q->mu);
  size_t n = q->count;
  pthread_mutex_unlock(&q->mu);
  return n;
}
