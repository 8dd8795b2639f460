/*
 * heaptrim.c - gives the heap's free pages back to the system after a burst of work.
 *
 * glibc keeps freed memory resident: a burst that allocates many short-lived buffers
 * (10,000 watch creates and their created responses, a large Range, a compaction) leaves
 * free chunks between live ones, in each of the malloc arenas that gRPC's and our threads
 * use, and only the top of each heap is ever returned on its own. Those pages stay in the
 * member's RSS until a later burst reuses them. malloc_trim(0) madvises the whole free pages
 * of every arena back (tools/bench_watch.sh: 15-45 bytes of each idle watcher's 250-330).
 *
 * When: a thread looks at the process's CPU time every HEAP_TRIM_CHECK_MS. An interval that
 * used less than HEAP_TRIM_QUIET_US is quiet; a burst is a run of intervals that were not,
 * and it calls for a trim when it used at least HEAP_TRIM_BURST_US in all. So a steadily busy
 * member never trims (its heap reuses its holes), nor does one whose light load comes in
 * small bursts (a put a second to 10,000 watchers: ~20 ms each), and after a big burst the
 * trim comes 200-400 ms after the last work. malloc_trim
 * walks each arena's free chunks under that arena's lock, one arena at a time: it runs here,
 * never on the node loop or the apply path, and only when the member is quiet, so the
 * threads it can delay have (almost) nothing to do.
 */
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>
#include <sys/prctl.h>

#include "server/server.h"

#define HEAP_TRIM_CHECK_MS 200
/* CPU of a burst that calls for a trim: 10,000 watch creates take ~100 ms. */
#define HEAP_TRIM_BURST_US 50000
/* CPU in one interval under which the member is quiet (an idle member: ~0.2 ms). */
#define HEAP_TRIM_QUIET_US 4000

struct heap_trimmer {
	pthread_t ht_thread;
	pthread_mutex_t ht_mu;
	pthread_cond_t ht_cond; /* signalled by heap_trimmer_stop() */
	int ht_stop;            /* under ht_mu */
};

/* The process's user + system CPU time in microseconds, or -1. */
static int64_t cpu_us(void)
{
	struct rusage ru;
	if (getrusage(RUSAGE_SELF, &ru) != 0)
		return -1;
	return (int64_t)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000 + ru.ru_utime.tv_usec +
	       ru.ru_stime.tv_usec;
}

static uint64_t now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

/* Sleeps HEAP_TRIM_CHECK_MS or until stopped; returns whether the trimmer is stopping. */
static int trimmer_wait(heap_trimmer *t)
{
	struct timespec until;
	clock_gettime(CLOCK_MONOTONIC, &until);
	until.tv_nsec += HEAP_TRIM_CHECK_MS * 1000000L;
	if (until.tv_nsec >= 1000000000L) {
		until.tv_sec++;
		until.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&t->ht_mu);
	while (!t->ht_stop && pthread_cond_timedwait(&t->ht_cond, &t->ht_mu, &until) != ETIMEDOUT)
		;
	int stop = t->ht_stop;
	pthread_mutex_unlock(&t->ht_mu);
	return stop;
}

static void *trimmer_main(void *arg)
{
	prctl(PR_SET_NAME, "heap-trim"); /* names the thread in top -H, perf, gdb */
	heap_trimmer *t = arg;
	int64_t last = cpu_us(), burst = 0;
	while (!trimmer_wait(t)) {
		int64_t now = cpu_us();
		if (now < 0 || last < 0) {
			last = now;
			continue;
		}
		int64_t used = now - last;
		last = now;
		if (used >= HEAP_TRIM_QUIET_US) {
			burst += used;
			continue;
		}
		/* quiet: the burst, if any, is over */
		int due = burst >= HEAP_TRIM_BURST_US;
		burst = 0;
		if (!due)
			continue;
		uint64_t t0 = now_us();
		malloc_trim(0);
		uint64_t took = now_us() - t0;
		char us[32];
		snprintf(us, sizeof(us), "%llu", (unsigned long long)took);
		log_at(LOG_DEBUG, "gave the heap's free pages back after a burst", "took-us", us, NULL);
		/* the trim's own CPU time is not a burst */
		last = cpu_us();
	}
	return NULL;
}

int heap_trimmer_start(heap_trimmer **out)
{
	*out = NULL;
	heap_trimmer *t = calloc(1, sizeof(*t));
	if (t == NULL)
		return -1;
	pthread_mutex_init(&t->ht_mu, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&t->ht_cond, &ca);
	pthread_condattr_destroy(&ca);
	if (pthread_create(&t->ht_thread, NULL, trimmer_main, t) != 0) {
		pthread_cond_destroy(&t->ht_cond);
		pthread_mutex_destroy(&t->ht_mu);
		free(t);
		return -1;
	}
	*out = t;
	return 0;
}

void heap_trimmer_stop(heap_trimmer *t)
{
	if (t == NULL)
		return;
	pthread_mutex_lock(&t->ht_mu);
	t->ht_stop = 1;
	pthread_cond_signal(&t->ht_cond);
	pthread_mutex_unlock(&t->ht_mu);
	pthread_join(t->ht_thread, NULL);
	pthread_cond_destroy(&t->ht_cond);
	pthread_mutex_destroy(&t->ht_mu);
	free(t);
}
