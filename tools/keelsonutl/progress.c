/*
 * progress.c - a one-line progress display on stderr for long saves and restores: bytes
 * done (of the total when known), percentage, rate. Only when stderr is a terminal: logs
 * and pipes get nothing from here.
 */
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "tools/keelsonutl/keelsonutl.h"

static double now_mono(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void ku_progress_start(ku_progress *p, const char *what, uint64_t total)
{
	memset(p, 0, sizeof(*p));
	p->pg_on = isatty(STDERR_FILENO);
	p->pg_what = what;
	p->pg_total = total;
	p->pg_start = now_mono();
}

static void draw(ku_progress *p, double now)
{
	char done[32], tot[96] = "", rate[32];
	double secs = now - p->pg_start;
	ku_human_bytes(p->pg_done, done, sizeof(done));
	ku_human_bytes(secs > 0 ? (uint64_t)((double)p->pg_done / secs) : 0, rate, sizeof(rate));
	if (p->pg_total) {
		char t[32];
		ku_human_bytes(p->pg_total, t, sizeof(t));
		int pct = (int)(p->pg_done * 100 / p->pg_total);
		if (pct > 100)
			pct = 100;
		char bar[21];
		memset(bar, '#', (size_t)pct / 5);
		memset(bar + pct / 5, '.', 20 - (size_t)pct / 5);
		bar[20] = '\0';
		snprintf(tot, sizeof(tot), " of %s [%s] %3d%%", t, bar, pct);
	}
	/* \r and a clear-to-end: the line is redrawn in place */
	fprintf(stderr, "\r%s: %s%s, %s/s, %.1fs\033[K", p->pg_what, done, tot, rate, secs);
	fflush(stderr);
	p->pg_drawn = 1;
}

void ku_progress_update(ku_progress *p, uint64_t done, uint64_t total)
{
	if (!p->pg_on)
		return;
	p->pg_done = done;
	if (total)
		p->pg_total = total;
	double now = now_mono();
	if (now - p->pg_last < 0.1) /* at most ten redraws a second */
		return;
	p->pg_last = now;
	draw(p, now);
}

void ku_progress_end(ku_progress *p)
{
	if (!p->pg_on)
		return;
	if (p->pg_drawn || p->pg_done) { /* a fast run still gets its one summary line */
		draw(p, now_mono());
		fputc('\n', stderr);
		fflush(stderr);
	}
	p->pg_on = 0;
}
