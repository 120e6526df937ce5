/* fl_ticker: a thread that calls fn(ud) every `every_ms` milliseconds until stopped -- the
 * keepers that send a replication status update (fl_stream) or renew Redis locks
 * (lredis) while the consumer's thread is busy elsewhere. fn runs on the ticker's thread
 * with no lock held: what it shares with others is its own to guard. */
#ifndef FL_TICKER_H
#define FL_TICKER_H
#include <pthread.h>

typedef struct {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  pthread_t thread;
  int running, stop;
  long every_ms;
  void (*fn)(void *ud);
  void *ud;
} fl_ticker;

/* 0, or -1 when no thread could be made (t is then not running; stop is still safe). */
int fl_ticker_start(fl_ticker *t, long every_ms, void (*fn)(void *ud), void *ud);
/* Wakes the thread, waits for a call in progress to return, joins; a no-op when not running. */
void fl_ticker_stop(fl_ticker *t);
#endif
