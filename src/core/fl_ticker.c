/* fl_ticker: a thread calling a function on a period (fl_ticker.h). */
#include <time.h>
#include "fl_ticker.h"

static void *ticker_main(void *arg) {
  fl_ticker *t = arg;
  pthread_mutex_lock(&t->mu);
  while (!t->stop) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += t->every_ms / 1000;
    ts.tv_nsec += (t->every_ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
    pthread_cond_timedwait(&t->cv, &t->mu, &ts);
    if (t->stop) break;
    pthread_mutex_unlock(&t->mu);
    t->fn(t->ud);
    pthread_mutex_lock(&t->mu);
  }
  pthread_mutex_unlock(&t->mu);
  return NULL;
}

int fl_ticker_start(fl_ticker *t, long every_ms, void (*fn)(void *ud), void *ud) {
  pthread_condattr_t ca;
  t->running = t->stop = 0;
  t->every_ms = every_ms > 0 ? every_ms : 1;
  t->fn = fn;
  t->ud = ud;
  pthread_mutex_init(&t->mu, NULL);
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&t->cv, &ca);
  pthread_condattr_destroy(&ca);
  if (pthread_create(&t->thread, NULL, ticker_main, t) != 0) {
    pthread_cond_destroy(&t->cv);
    pthread_mutex_destroy(&t->mu);
    return -1;
  }
  t->running = 1;
  return 0;
}

void fl_ticker_stop(fl_ticker *t) {
  if (!t->running) return;
  pthread_mutex_lock(&t->mu);
  t->stop = 1;
  pthread_cond_signal(&t->cv);
  pthread_mutex_unlock(&t->mu);
  pthread_join(t->thread, NULL);
  pthread_cond_destroy(&t->cv);
  pthread_mutex_destroy(&t->mu);
  t->running = 0;
}
