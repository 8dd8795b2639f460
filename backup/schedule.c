/*
 * schedule.c - cron expressions and backup retention (see backup.h for the rules).
 */
#define _GNU_SOURCE /* timegm, qsort_r */
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "backup/backup.h"

/* ---- cron ---- */

typedef struct field_spec {
	const char *fs_name;
	int fs_min, fs_max;
	const char *const *fs_names; /* names for fs_min.. (NULL: none) */
} field_spec;

static const char *const month_names[] = {"jan", "feb", "mar", "apr", "may", "jun",
					   "jul", "aug", "sep", "oct", "nov", "dec", NULL};
static const char *const day_names[] = {"sun", "mon", "tue", "wed", "thu", "fri", "sat", NULL};

static const field_spec fields[5] = {
	{"minute", 0, 59, NULL},
	{"hour", 0, 23, NULL},
	{"day of month", 1, 31, NULL},
	{"month", 1, 12, month_names},
	{"day of week", 0, 7, day_names},
};

/* A number or (where the field has names) a three-letter name; advances *p. */
static int parse_value(const char **p, const field_spec *f, int *out)
{
	const char *s = *p;
	if (isdigit((unsigned char)*s)) {
		long v = 0;
		while (isdigit((unsigned char)*s)) {
			v = v * 10 + (*s++ - '0');
			if (v > 1000)
				return -1;
		}
		*p = s;
		*out = (int)v;
		return 0;
	}
	if (f->fs_names) {
		for (int i = 0; f->fs_names[i]; i++) {
			if (strncasecmp(s, f->fs_names[i], 3) == 0 && !isalpha((unsigned char)s[3])) {
				*p = s + 3;
				*out = f->fs_min + i;
				return 0;
			}
		}
	}
	return -1;
}

/* One field ("*", "1-5/2,10") into a bit set over fs_min..fs_max. */
static int parse_field(const char *text, int idx, uint64_t *bits, int *star, char *errbuf,
		       size_t errlen)
{
	const field_spec *f = &fields[idx];
	const char *p = text;
	*bits = 0;
	*star = text[0] == '*';
	for (;;) {
		int lo, hi, step = 1;
		if (*p == '*') {
			lo = f->fs_min;
			hi = f->fs_max;
			p++;
		} else {
			if (parse_value(&p, f, &lo) != 0)
				goto bad;
			hi = lo;
			if (*p == '-') {
				p++;
				if (parse_value(&p, f, &hi) != 0)
					goto bad;
			} else if (*p == '/') {
				hi = f->fs_max; /* "5/10": from 5 to the end, every 10 */
			}
		}
		if (*p == '/') {
			p++;
			if (parse_value(&p, &(field_spec){"step", 1, 1000, NULL}, &step) != 0 || step < 1)
				goto bad;
		}
		if (lo < f->fs_min || hi > f->fs_max || lo > hi) {
			snprintf(errbuf, errlen, "field %d (%s): %d-%d out of range %d-%d in \"%s\"",
				 idx + 1, f->fs_name, lo, hi, f->fs_min, f->fs_max, text);
			return -1;
		}
		for (int v = lo; v <= hi; v += step)
			*bits |= 1ULL << v;
		if (*p == '\0')
			return 0;
		if (*p != ',')
			goto bad;
		p++;
	}
bad:
	snprintf(errbuf, errlen, "field %d (%s): cannot parse \"%s\"", idx + 1, f->fs_name, text);
	return -1;
}

int backup_cron_parse(const char *expr, backup_cron *out, char *errbuf, size_t errlen)
{
	static const struct {
		const char *name, *expansion;
	} macros[] = {
		{"@yearly", "0 0 1 1 *"},  {"@annually", "0 0 1 1 *"}, {"@monthly", "0 0 1 * *"},
		{"@weekly", "0 0 * * 0"},  {"@daily", "0 0 * * *"},    {"@midnight", "0 0 * * *"},
		{"@hourly", "0 * * * *"},
	};
	while (isspace((unsigned char)*expr))
		expr++;
	if (expr[0] == '@') {
		for (size_t i = 0; i < sizeof(macros) / sizeof(macros[0]); i++) {
			size_t n = strlen(macros[i].name);
			if (strncmp(expr, macros[i].name, n) == 0 &&
			    strspn(expr + n, " \t") == strlen(expr + n))
				return backup_cron_parse(macros[i].expansion, out, errbuf, errlen);
		}
		snprintf(errbuf, errlen, "unknown cron macro \"%s\"", expr);
		return -1;
	}
	char copy[256];
	if (strlen(expr) >= sizeof(copy)) {
		snprintf(errbuf, errlen, "cron expression too long");
		return -1;
	}
	strcpy(copy, expr);
	char *tok[6], *save = NULL;
	int n = 0;
	for (char *t = strtok_r(copy, " \t", &save); t; t = strtok_r(NULL, " \t", &save)) {
		if (n == 6)
			break;
		tok[n++] = t;
	}
	if (n != 5) {
		snprintf(errbuf, errlen,
			 "a cron expression has 5 fields (minute hour day-of-month month day-of-week), "
			 "got %d in \"%s\"", n, expr);
		return -1;
	}
	uint64_t bits[5];
	int star[5];
	for (int i = 0; i < 5; i++)
		if (parse_field(tok[i], i, &bits[i], &star[i], errbuf, errlen) != 0)
			return -1;
	memset(out, 0, sizeof(*out));
	out->kc_minutes = bits[0];
	out->kc_hours = (uint32_t)bits[1];
	out->kc_mdays = (uint32_t)bits[2];
	out->kc_months = (uint16_t)bits[3];
	/* 7 is Sunday too */
	out->kc_wdays = (uint8_t)((bits[4] & 0x7f) | ((bits[4] >> 7) & 1));
	out->kc_mday_star = star[2];
	out->kc_wday_star = star[4];
	return 0;
}

static int day_matches(const backup_cron *c, const struct tm *tm)
{
	int md = (c->kc_mdays >> tm->tm_mday) & 1;
	int wd = (c->kc_wdays >> tm->tm_wday) & 1;
	if (c->kc_mday_star || c->kc_wday_star)
		return md && wd;
	return md || wd;
}

static time_t to_time(struct tm *tm, int utc)
{
	tm->tm_isdst = -1;
	return utc ? timegm(tm) : mktime(tm);
}

int backup_cron_next(const backup_cron *c, time_t after, int utc, time_t *next)
{
	time_t t = after - (after % 60 + 60) % 60 + 60; /* the next whole minute */
	time_t limit = after + (time_t)8 * 366 * 86400;
	struct tm tm;
	while (t <= limit) {
		if (utc)
			gmtime_r(&t, &tm);
		else
			localtime_r(&t, &tm);
		if (!((c->kc_months >> (tm.tm_mon + 1)) & 1)) {
			tm.tm_mon++; /* the first minute of next month */
			tm.tm_mday = 1;
			tm.tm_hour = tm.tm_min = tm.tm_sec = 0;
		} else if (!day_matches(c, &tm)) {
			tm.tm_mday++;
			tm.tm_hour = tm.tm_min = tm.tm_sec = 0;
		} else if (!((c->kc_hours >> tm.tm_hour) & 1)) {
			tm.tm_hour++;
			tm.tm_min = tm.tm_sec = 0;
		} else if (!((c->kc_minutes >> tm.tm_min) & 1)) {
			tm.tm_min++;
			tm.tm_sec = 0;
		} else {
			*next = t;
			return 0;
		}
		time_t n = to_time(&tm, utc);
		/* A DST change can map the normalised time back to or before t: step a minute. */
		t = n > t ? n : t + 60;
	}
	return -1;
}

/* ---- retention ---- */

#define HOUR_MS (3600LL * 1000)
#define DAY_MS (24 * HOUR_MS)

/* The thinning bucket a backup of time t falls in at now, or -1 for "keep all" (tier 0).
 * Tiers are kept apart by putting the tier in the high bits. */
static int64_t thin_bucket(int64_t t, int64_t now)
{
	int64_t age = now - t;
	int64_t width;
	int tier;
	if (age < HOUR_MS)
		return -1;
	if (age < DAY_MS) {
		width = HOUR_MS;
		tier = 1;
	} else if (age < 7 * DAY_MS) {
		width = DAY_MS;
		tier = 2;
	} else if (age < 56 * DAY_MS) {
		width = 7 * DAY_MS;
		tier = 3;
	} else {
		width = 30 * DAY_MS;
		tier = 4;
	}
	int64_t b = t >= 0 ? t / width : -((-t + width - 1) / width);
	return ((int64_t)tier << 56) ^ (b & ((1LL << 56) - 1));
}

static int cmp_newest_first(const void *a, const void *b, void *times)
{
	const int64_t *t = times;
	int64_t ta = t[*(const size_t *)a], tb = t[*(const size_t *)b];
	return ta < tb ? 1 : ta > tb ? -1 : 0;
}

int backup_retention_select(const int64_t *times, size_t n, const backup_retention *p,
			int64_t now_ms, int *keep)
{
	if (n == 0)
		return 0;
	size_t *order = malloc(n * sizeof(size_t));
	int64_t *buckets = malloc(n * sizeof(int64_t));
	if (order == NULL || buckets == NULL) {
		free(order);
		free(buckets);
		return -1;
	}
	for (size_t i = 0; i < n; i++) {
		order[i] = i;
		keep[i] = 1;
	}
	qsort_r(order, n, sizeof(size_t), cmp_newest_first, (void *)times);

	if (p->rp_thin) {
		/* Oldest first, so the first backup seen in a bucket is the one it keeps. */
		size_t nb = 0;
		for (size_t k = n; k-- > 0;) {
			size_t i = order[k];
			int64_t b = thin_bucket(times[i], now_ms);
			if (b == -1)
				continue;
			size_t j;
			for (j = 0; j < nb && buckets[j] != b; j++)
				;
			if (j < nb)
				keep[i] = 0;
			else
				buckets[nb++] = b;
		}
	}
	if (p->rp_max_age > 0) {
		int64_t max_ms = (int64_t)(p->rp_max_age * 1000);
		for (size_t i = 0; i < n; i++)
			if (now_ms - times[i] > max_ms)
				keep[i] = 0;
	}
	if (p->rp_retain > 0) {
		int seen = 0;
		for (size_t k = 0; k < n; k++) {
			size_t i = order[k];
			if (keep[i] && ++seen > p->rp_retain)
				keep[i] = 0;
		}
	}
	keep[order[0]] = 1;
	int kept = 0;
	for (size_t i = 0; i < n; i++)
		kept += keep[i];
	free(order);
	free(buckets);
	return kept;
}

/* ---- durations ---- */

int backup_parse_duration(const char *s, double *seconds)
{
	double total = 0;
	const char *p = s;
	if (*p == '\0')
		return -1;
	char *e;
	double v = strtod(p, &e);
	if (e != p && *e == '\0') { /* a bare number: seconds */
		if (!isfinite(v) || v < 0) /* strtod takes "nan" and "inf" too */
			return -1;
		*seconds = v;
		return 0;
	}
	while (*p) {
		v = strtod(p, &e);
		if (e == p || !isfinite(v) || v < 0)
			return -1;
		p = e;
		double unit;
		if (strncmp(p, "ms", 2) == 0) {
			unit = 1e-3;
			p += 2;
		} else if (strncmp(p, "us", 2) == 0) {
			unit = 1e-6;
			p += 2;
		} else if (strncmp(p, "ns", 2) == 0) {
			unit = 1e-9;
			p += 2;
		} else if (*p == 'h') {
			unit = 3600;
			p++;
		} else if (*p == 'm') {
			unit = 60;
			p++;
		} else if (*p == 's') {
			unit = 1;
			p++;
		} else {
			return -1;
		}
		total += v * unit;
	}
	if (!isfinite(total))
		return -1;
	*seconds = total;
	return 0;
}

/* ---- the plan ---- */

int backup_plan_parse(backup_plan *p, const char *interval, const char *schedule, int utc,
		      const char *prefix, char *errbuf, size_t errlen)
{
	memset(p, 0, sizeof(*p));
	p->bp_every = 3600;
	p->bp_utc = utc;
	if (interval && *interval == '\0')
		interval = NULL;
	if (schedule && *schedule == '\0')
		schedule = NULL;
	if (interval && schedule) {
		snprintf(errbuf, errlen, "%sinterval and %sschedule are exclusive", prefix, prefix);
		return BACKUP_ERR_USAGE;
	}
	if (utc && !schedule) {
		snprintf(errbuf, errlen, "%sutc applies to %sschedule only", prefix, prefix);
		return BACKUP_ERR_USAGE;
	}
	if (interval && (backup_parse_duration(interval, &p->bp_every) != 0 || p->bp_every < 0.1)) {
		snprintf(errbuf, errlen, "invalid %sinterval %s (a duration of at least 100ms)", prefix,
			 interval);
		return BACKUP_ERR_USAGE;
	}
	if (schedule) {
		char ceb[256];
		time_t probe;
		if (backup_cron_parse(schedule, &p->bp_cron, ceb, sizeof(ceb)) != 0) {
			snprintf(errbuf, errlen, "invalid %sschedule: %s", prefix, ceb);
			return BACKUP_ERR_USAGE;
		}
		if (backup_cron_next(&p->bp_cron, time(NULL), utc, &probe) != 0) {
			snprintf(errbuf, errlen, "invalid %sschedule: \"%s\" never matches a date", prefix,
				 schedule);
			return BACKUP_ERR_USAGE;
		}
		p->bp_cron_on = 1;
	}
	return 0;
}

void backup_plan_describe(const backup_plan *p, const char *schedule, char *out, size_t len)
{
	if (p->bp_cron_on)
		snprintf(out, len, "on \"%s\" (%s)", schedule, p->bp_utc ? "UTC" : "local time");
	else
		snprintf(out, len, "every %gs", p->bp_every);
}

double backup_plan_next_interval(const backup_plan *p, double due, double start, double now)
{
	double next = due + p->bp_every;
	if (next <= now) /* ran longer than the interval: skip the missed ticks */
		next = start + p->bp_every * (1 + (double)(long)((now - start) / p->bp_every));
	return next;
}
