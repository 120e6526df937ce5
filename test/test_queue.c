/* test_queue: fl_queue between threads (run under ASan and TSan by `make check-threads`):
 * producers and consumers through a small queue, every message once and in order per
 * producer; timeouts; close drains, abort does not. And fl_ticker: it calls its function
 * on its period, stop waits for a call in progress and no call comes after. */
#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "fl_queue.h"
#include "fl_ticker.h"

#define PRODUCERS 3
#define PER 20000

static fl_queue q;
static long seen[PRODUCERS];

static void *producer(void *arg) {
  int p = (int)(long)arg;
  for (long i = 0; i < PER; i++) {
    char buf[32];
    int n = snprintf(buf, sizeof buf, "%d:%ld", p, i);
    fl_msg m = { (uint64_t)(p * PER + i), p, 0, malloc((size_t)n), (size_t)n };
    memcpy(m.data, buf, (size_t)n);
    int rc = fl_queue_push(&q, &m, -1);
    assert(rc == 0);
  }
  return NULL;
}

static void *consumer(void *arg) {
  (void)arg;
  fl_msg m;
  static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
  while (fl_queue_pop(&q, &m, -1) == 0) {
    int p = m.tag;
    long i = (long)(m.id - (uint64_t)p * PER);
    char want[32];
    int n = snprintf(want, sizeof want, "%d:%ld", p, i);
    assert(m.len == (size_t)n && memcmp(m.data, want, (size_t)n) == 0);
    pthread_mutex_lock(&mu);
    seen[p]++;
    pthread_mutex_unlock(&mu);
    free(m.data);
  }
  return NULL;
}

/* One consumer: each producer's messages come out in the order they went in. */
static void *ordered_consumer(void *arg) {
  (void)arg;
  long next[PRODUCERS] = { 0 };
  fl_msg m;
  while (fl_queue_pop(&q, &m, -1) == 0) {
    int p = m.tag;
    assert((long)(m.id - (uint64_t)p * PER) == next[p]);
    next[p]++;
    seen[p]++;
    free(m.data);
  }
  return NULL;
}

static void run(int consumers, void *(*fn)(void *)) {
  pthread_t pt[PRODUCERS], ct[4];
  memset(seen, 0, sizeof seen);
  assert(fl_queue_init(&q, 7) == 0);
  for (int i = 0; i < consumers; i++) pthread_create(&ct[i], NULL, fn, NULL);
  for (long i = 0; i < PRODUCERS; i++) pthread_create(&pt[i], NULL, producer, (void *)i);
  for (int i = 0; i < PRODUCERS; i++) pthread_join(pt[i], NULL);
  fl_queue_close(&q);   /* the consumers drain what is left, then stop */
  for (int i = 0; i < consumers; i++) pthread_join(ct[i], NULL);
  for (int i = 0; i < PRODUCERS; i++) assert(seen[i] == PER);
  fl_queue_destroy(&q);
}

static int ticks, in_tick, after_stop;

static void tick(void *ud) {
  struct timespec nap = { 0, 20 * 1000000L };
  (void)ud;
  __atomic_store_n(&in_tick, 1, __ATOMIC_SEQ_CST);
  nanosleep(&nap, NULL);                 /* a call that takes a while: stop must wait it out */
  __atomic_add_fetch(&ticks, 1, __ATOMIC_SEQ_CST);
  __atomic_store_n(&in_tick, 0, __ATOMIC_SEQ_CST);
}

static void test_ticker(void) {
  fl_ticker t;
  struct timespec nap = { 0, 5 * 1000000L };
  memset(&t, 0, sizeof t);
  fl_ticker_stop(&t);                    /* never started: a no-op */
  assert(fl_ticker_start(&t, 5, tick, NULL) == 0);
  for (int i = 0; i < 2000 && __atomic_load_n(&ticks, __ATOMIC_SEQ_CST) < 3; i++) nanosleep(&nap, NULL);
  assert(__atomic_load_n(&ticks, __ATOMIC_SEQ_CST) >= 3);
  while (!__atomic_load_n(&in_tick, __ATOMIC_SEQ_CST)) nanosleep(&nap, NULL);
  fl_ticker_stop(&t);                    /* while tick() sleeps in its call */
  assert(__atomic_load_n(&in_tick, __ATOMIC_SEQ_CST) == 0);
  after_stop = __atomic_load_n(&ticks, __ATOMIC_SEQ_CST);
  for (int i = 0; i < 10; i++) nanosleep(&nap, NULL);
  assert(__atomic_load_n(&ticks, __ATOMIC_SEQ_CST) == after_stop);
  fl_ticker_stop(&t);                    /* twice: a no-op */
}

int main(void) {
  run(4, consumer);
  run(1, ordered_consumer);

  /* Timeouts, a full queue, close and abort. */
  fl_msg m = { 1, 0, 0, NULL, 0 }, out;
  assert(fl_queue_init(&q, 1) == 0);
  assert(fl_queue_pop(&q, &out, 0.01) == 1);
  m.data = strdup("a"); m.len = 1;
  assert(fl_queue_push(&q, &m, 0) == 0);
  fl_msg m2 = { 2, 0, 0, strdup("b"), 1 };
  assert(fl_queue_push(&q, &m2, 0.01) == 1);   /* full */
  assert(fl_queue_count(&q) == 1);
  fl_queue_close(&q);
  assert(fl_queue_push(&q, &m2, 0) == -1);
  assert(fl_queue_pop(&q, &out, 0) == 0 && out.id == 1);
  free(out.data);
  assert(fl_queue_pop(&q, &out, 0) == -1);
  fl_queue_destroy(&q);
  assert(fl_queue_init(&q, 2) == 0);
  assert(fl_queue_push(&q, &m2, 0) == 0);
  fl_queue_abort(&q);
  assert(fl_queue_pop(&q, &out, -1) == -1);
  fl_queue_destroy(&q);   /* frees m2's data */
  test_ticker();
  printf("4 passed, 0 failed\n");
  return 0;
}
