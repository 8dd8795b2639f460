/*
 * schedule.h - the pure decisions of `keelsonutl backup`: when the next backup is due (a
 * cron expression) and which backups retention keeps. No I/O and no clock of their own
 * (every function takes "now"), so unit tests drive them with injected times
 * (tools/keelsonutl/schedule_test.c).
 */
#ifndef KEELSON_TOOLS_KEELSONUTL_SCHEDULE_H
#define KEELSON_TOOLS_KEELSONUTL_SCHEDULE_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

/* ---- cron (schedule.c) ----
 * Five fields, as crontab(5) writes them: minute (0-59), hour (0-23), day of month (1-31),
 * month (1-12 or jan-dec), day of week (0-7 or sun-sat; 0 and 7 are Sunday). Each field is
 * a list ("1,5,9") of "*", "N", "N-M", each optionally with a step "/S" ("*\/15", "1-30/2",
 * "5/10" meaning 5-max/10). Also @yearly, @annually, @monthly, @weekly, @daily, @midnight,
 * @hourly. As in Vixie cron, when both day fields are restricted (neither starts with "*")
 * a day matches if either matches; otherwise both must. */
typedef struct ku_cron {
	uint64_t kc_minutes; /* bit m: minute m */
	uint32_t kc_hours;   /* bit h */
	uint32_t kc_mdays;   /* bit d (1..31) */
	uint16_t kc_months;  /* bit m (1..12) */
	uint8_t kc_wdays;    /* bit w (0..6, Sunday 0) */
	int kc_mday_star;    /* the day-of-month field started with "*" */
	int kc_wday_star;
} ku_cron;

/* Returns 0, or -1 with a message in errbuf ("field 2 (hour): 24 out of range 0-23"). */
int ku_cron_parse(const char *expr, ku_cron *out, char *errbuf, size_t errlen);

/* The first whole minute strictly after `after` that matches, in UTC (utc != 0) or the
 * local time zone (a minute that a DST change skips is not run; one repeated runs once
 * per occurrence mktime reports). Returns 0, or -1 if nothing matches within 8 years
 * (e.g. "0 0 30 2 *"). */
int ku_cron_next(const ku_cron *c, time_t after, int utc, time_t *next);

/* ---- retention (schedule.c) ----
 * Given the finished backups (their times), decides which stay. The rule, in order:
 *   1. --thin: exponential thinning by age (now - time):
 *        younger than 1 hour:  all kept;
 *        1 hour to 1 day:      the oldest backup of each clock hour (UTC) is kept;
 *        1 day to 1 week:      the oldest of each UTC day;
 *        1 week to 8 weeks:    the oldest of each 7-day period counted from the Unix epoch;
 *        older:                the oldest of each 30-day period counted from the epoch.
 *      Buckets are fixed in time, so a kept backup stays kept as it ages within a tier; it
 *      competes again only when it moves to a coarser tier.
 *   2. --max-age D: backups older than D go.
 *   3. --retain N (N > 0): of what is left, only the newest N stay.
 *   4. The newest backup always stays, whatever 1-3 say (it is the newest whole one, and
 *      with --verify the newest verified one: failed backups never get a backup name).
 */
typedef struct ku_retention_policy {
	int rp_retain;          /* 0: no count limit */
	double rp_max_age;      /* seconds; 0: no age limit */
	int rp_thin;
} ku_retention_policy;

/* times[i] in milliseconds since the epoch, any order; keep[i] is set to 1 or 0.
 * Returns the number kept, or -1 when out of memory. */
int ku_retention_select(const int64_t *times, size_t n, const ku_retention_policy *p,
			int64_t now_ms, int *keep);

#endif
