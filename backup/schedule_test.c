/*
 * schedule_test.c - cron parsing and next-run times (UTC and a local zone with DST), and
 * retention/thinning decisions, all with injected times.
 */
#define _GNU_SOURCE /* timegm, setenv */
#include "backup/backup.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* CHECK, CHECK_EQ and the failure count t_fail */
#include "storage/testutil.h"

/* "YYYY-MM-DD HH:MM" in UTC as time_t. */
static time_t utc(const char *s)
{
	struct tm tm;
	memset(&tm, 0, sizeof(tm));
	if (sscanf(s, "%d-%d-%d %d:%d", &tm.tm_year, &tm.tm_mon, &tm.tm_mday, &tm.tm_hour,
		   &tm.tm_min) != 5)
		abort();
	tm.tm_year -= 1900;
	tm.tm_mon -= 1;
	return timegm(&tm);
}

static const char *fmt_utc(time_t t)
{
	static char buf[4][32];
	static int i;
	struct tm tm;
	gmtime_r(&t, &tm);
	i = (i + 1) % 4;
	strftime(buf[i], sizeof(buf[i]), "%Y-%m-%d %H:%M", &tm);
	return buf[i];
}

/* next(expr, after) in UTC equals want ("" for none). */
static void check_next(const char *expr, const char *after, const char *want)
{
	backup_cron c;
	char eb[256] = "";
	if (backup_cron_parse(expr, &c, eb, sizeof(eb)) != 0) {
		fprintf(stderr, "  parse \"%s\" failed: %s\n", expr, eb);
		t_fail++;
		return;
	}
	time_t n = 0;
	int rc = backup_cron_next(&c, utc(after), 1, &n);
	const char *got = rc == 0 ? fmt_utc(n) : "";
	if (strcmp(got, want) != 0) {
		fprintf(stderr, "  next(\"%s\", %s) = \"%s\", want \"%s\"\n", expr, after, got, want);
		t_fail++;
	}
}

static void check_bad(const char *expr)
{
	backup_cron c;
	char eb[256] = "";
	if (backup_cron_parse(expr, &c, eb, sizeof(eb)) == 0) {
		fprintf(stderr, "  \"%s\" parsed, should be refused\n", expr);
		t_fail++;
	} else if (eb[0] == '\0') {
		fprintf(stderr, "  \"%s\" refused without a message\n", expr);
		t_fail++;
	}
}

static void test_cron_parse(void)
{
	backup_cron c;
	char eb[256];
	CHECK_EQ(backup_cron_parse("*/15 1-3,22 * jan-mar,DEC mon-fri", &c, eb, sizeof(eb)), 0);
	CHECK_EQ(c.kc_minutes, (1ULL << 0) | (1ULL << 15) | (1ULL << 30) | (1ULL << 45));
	CHECK_EQ(c.kc_hours, (1u << 1) | (1u << 2) | (1u << 3) | (1u << 22));
	CHECK_EQ(c.kc_months, (1u << 1) | (1u << 2) | (1u << 3) | (1u << 12));
	CHECK_EQ(c.kc_wdays, 0x3e);
	CHECK(c.kc_mday_star);
	CHECK(!c.kc_wday_star);
	CHECK_EQ(backup_cron_parse("5/20 0 1-31/10 * 7", &c, eb, sizeof(eb)), 0);
	CHECK_EQ(c.kc_minutes, (1ULL << 5) | (1ULL << 25) | (1ULL << 45));
	CHECK_EQ(c.kc_mdays, (1u << 1) | (1u << 11) | (1u << 21) | (1u << 31));
	CHECK_EQ(c.kc_wdays, 1); /* 7 is Sunday */
	CHECK_EQ(backup_cron_parse("  @hourly ", &c, eb, sizeof(eb)), 0);
	CHECK_EQ(c.kc_minutes, 1);
	CHECK_EQ(c.kc_hours, 0xffffff);

	check_bad("");
	check_bad("* * * *");
	check_bad("* * * * * *");
	check_bad("60 * * * *");
	check_bad("* 24 * * *");
	check_bad("* * 0 * *");
	check_bad("* * 32 * *");
	check_bad("* * * 13 *");
	check_bad("* * * * 8");
	check_bad("5-1 * * * *");
	check_bad("*/0 * * * *");
	check_bad("1,,2 * * * *");
	check_bad("a * * * *");
	check_bad("* * * foo *");
	check_bad("* * * * mond");
	check_bad("@every5m");
	check_bad("1- * * * *");
	check_bad("99999999999999999999 * * * *");
}

static void test_cron_next_utc(void)
{
	check_next("* * * * *", "2026-03-01 10:00", "2026-03-01 10:01");
	check_next("*/15 * * * *", "2026-03-01 10:07", "2026-03-01 10:15");
	check_next("*/15 * * * *", "2026-03-01 23:50", "2026-03-02 00:00");
	check_next("30 2 * * *", "2026-03-01 02:30", "2026-03-02 02:30");
	check_next("0 0 1 * *", "2026-12-15 12:00", "2027-01-01 00:00");
	check_next("0 0 29 2 *", "2026-03-01 00:00", "2028-02-29 00:00"); /* leap day */
	check_next("0 0 31 * *", "2026-04-01 00:00", "2026-05-31 00:00");
	check_next("0 12 * * mon", "2026-11-27 00:00", "2026-11-30 12:00"); /* a Friday */
	/* both day fields restricted: either matches (the 1st, or a Sunday) */
	check_next("0 0 1 * sun", "2026-11-27 00:00", "2026-11-29 00:00");
	check_next("0 0 1 * sun", "2026-11-29 00:00", "2026-12-01 00:00");
	/* day of month "*": only the weekday counts */
	check_next("0 0 * * 3", "2026-11-27 00:00", "2026-12-02 00:00");
	check_next("0 9-17/4 * jun sat", "2026-01-01 00:00", "2026-06-06 09:00");
	check_next("@yearly", "2026-11-27 10:00", "2027-01-01 00:00");
	check_next("0 0 30 2 *", "2026-01-01 00:00", ""); /* never */
	/* seconds within the minute do not matter */
	backup_cron c;
	char eb[64];
	time_t n;
	CHECK_EQ(backup_cron_parse("* * * * *", &c, eb, sizeof(eb)), 0);
	CHECK_EQ(backup_cron_next(&c, utc("2026-03-01 10:00") + 59, 1, &n), 0);
	CHECK_EQ(n, utc("2026-03-01 10:01"));
}

static void test_cron_next_local(void)
{
	setenv("TZ", "America/New_York", 1);
	tzset();
	backup_cron c;
	char eb[64];
	time_t n;
	/* 02:30 does not exist on 2026-03-08 in New York (clocks jump 02:00 -> 03:00). */
	CHECK_EQ(backup_cron_parse("30 2 * * *", &c, eb, sizeof(eb)), 0);
	CHECK_EQ(backup_cron_next(&c, utc("2026-03-07 12:00"), 0, &n), 0); /* 07:00 local */
	CHECK_EQ(n, utc("2026-03-09 06:30")); /* 02:30 EDT on the 9th */
	/* 09:00 local is 14:00 UTC in winter, 13:00 UTC in summer. */
	CHECK_EQ(backup_cron_parse("0 9 * * *", &c, eb, sizeof(eb)), 0);
	CHECK_EQ(backup_cron_next(&c, utc("2026-01-10 00:00"), 0, &n), 0);
	CHECK_EQ(n, utc("2026-01-10 14:00"));
	CHECK_EQ(backup_cron_next(&c, utc("2026-07-10 00:00"), 0, &n), 0);
	CHECK_EQ(n, utc("2026-07-10 13:00"));
	/* the same expression in UTC */
	CHECK_EQ(backup_cron_next(&c, utc("2026-07-10 00:00"), 1, &n), 0);
	CHECK_EQ(n, utc("2026-07-10 09:00"));
	unsetenv("TZ");
	tzset();
}

#define MIN_MS (60LL * 1000)
#define H_MS (60 * MIN_MS)
#define D_MS (24 * H_MS)

static int tier(int64_t age)
{
	return age < H_MS ? 0 : age < D_MS ? 1 : age < 7 * D_MS ? 2 : age < 56 * D_MS ? 3 : 4;
}

/* Runs the selection and returns a bit set of kept indexes (n <= 64). */
static uint64_t kept_set(const int64_t *t, size_t n, backup_retention p, int64_t now)
{
	int keep[64];
	int k = backup_retention_select(t, n, &p, now, keep);
	uint64_t set = 0;
	int count = 0;
	for (size_t i = 0; i < n; i++) {
		if (keep[i]) {
			set |= 1ULL << i;
			count++;
		}
	}
	CHECK_EQ(k, count);
	return set;
}

static void test_retention(void)
{
	int64_t now = (int64_t)utc("2026-11-27 12:00") * 1000;
	int64_t t[8];
	for (int i = 0; i < 8; i++) /* t[i] is i minutes old: t[0] newest */
		t[i] = now - i * MIN_MS;
	/* no limits: everything */
	CHECK_EQ(kept_set(t, 8, (backup_retention){0, 0, 0}, now), 0xff);
	/* --retain 3: the three newest */
	CHECK_EQ(kept_set(t, 8, (backup_retention){3, 0, 0}, now), 0x07);
	/* order of the input does not matter */
	int64_t r[3] = {now - 5 * MIN_MS, now, now - 1 * MIN_MS};
	CHECK_EQ(kept_set(r, 3, (backup_retention){1, 0, 0}, now), 0x02);
	/* --max-age 150s: 0, 1 and 2 minutes old */
	CHECK_EQ(kept_set(t, 8, (backup_retention){0, 150, 0}, now), 0x07);
	/* max-age and retain together: the stricter wins */
	CHECK_EQ(kept_set(t, 8, (backup_retention){2, 150, 0}, now), 0x03);
	/* everything too old: the newest stays anyway */
	int64_t old[3] = {now - 10 * D_MS, now - 11 * D_MS, now - 12 * D_MS};
	CHECK_EQ(kept_set(old, 3, (backup_retention){0, 3600, 0}, now), 0x01);
	CHECK_EQ(kept_set(old, 3, (backup_retention){0, 3600, 1}, now), 0x01);
	CHECK_EQ(kept_set(NULL, 0, (backup_retention){1, 0, 0}, now), 0);
}

static void test_thinning(void)
{
	/* A backup every 10 minutes for 60 days, then thin at "now". */
	int64_t now = (int64_t)utc("2026-11-27 12:05") * 1000;
	size_t n = 60 * 24 * 6;
	int64_t *t = malloc(n * sizeof(int64_t));
	int *keep = malloc(n * sizeof(int));
	for (size_t i = 0; i < n; i++)
		t[i] = now - 5 * MIN_MS - (int64_t)i * 10 * MIN_MS;
	backup_retention p = {0, 0, 1};
	int k = backup_retention_select(t, n, &p, now, keep);
	int young = 0, hour = 0, day = 0, week = 0, older = 0;
	for (size_t i = 0; i < n; i++) {
		int64_t age = now - t[i];
		if (!keep[i])
			continue;
		if (age < H_MS)
			young++;
		else if (age < D_MS)
			hour++;
		else if (age < 7 * D_MS)
			day++;
		else if (age < 56 * D_MS)
			week++;
		else
			older++;
		/* a kept backup of a whole hour bucket is its first: minute :00 */
		if (age >= H_MS && age < 23 * H_MS)
			CHECK_EQ((t[i] / MIN_MS) % 60, 0);
	}
	CHECK_EQ(young, 6); /* 5..55 minutes old */
	/* hour buckets wholly inside 1h..24h ages: 23 (the partial ones keep their first too) */
	CHECK(hour >= 22 && hour <= 24);
	CHECK(day >= 5 && day <= 7);
	CHECK(week >= 6 && week <= 8);
	CHECK(older >= 1 && older <= 2);
	CHECK_EQ(k, young + hour + day + week + older);
	CHECK(keep[0]); /* the newest */

	/* Stability: thinning again a little later removes nothing that was kept but aged
	 * within its tier, and the result is the same as thinning once. */
	int64_t *kt = malloc(n * sizeof(int64_t));
	size_t m = 0;
	for (size_t i = 0; i < n; i++)
		if (keep[i])
			kt[m++] = t[i];
	int *keep2 = malloc(m * sizeof(int));
	int k2 = backup_retention_select(kt, m, &p, now, keep2);
	CHECK_EQ(k2, (int)m);
	/* 30 minutes later only backups that moved to a coarser tier can go */
	int k3 = backup_retention_select(kt, m, &p, now + 30 * MIN_MS, keep2);
	CHECK(k3 < (int)m);
	for (size_t i = 0; i < m; i++)
		if (tier(now - kt[i]) == tier(now + 30 * MIN_MS - kt[i]))
			CHECK(keep2[i]);
	/* thinning with --retain: the newest N of the thinned set */
	backup_retention pr = {10, 0, 1};
	CHECK_EQ(backup_retention_select(t, n, &pr, now, keep), 10);
	for (size_t i = 0; i < 7; i++) /* 6 young ones and the 1h05m one */
		CHECK(keep[i]);
	free(t);
	free(keep);
	free(kt);
	free(keep2);
}

/* Random expressions from cron's alphabet: every one is parsed or refused with a message,
 * and a parsed one has a next run or says it has none, without crashing or spinning. */
static void test_cron_random(void)
{
	static const char *const atoms[] = {"*", "0", "1", "5", "7", "12", "23", "31", "59", "60",
					    "-", "/", ",", "*/2", "jan", "dec", "sun", "sat",
					    "mon-fri", " ", "@", "x", "999", "2-1"};
	static const char *const fields[] = {"*", "*/2", "1", "5", "7", "1-5", "1,5", "3/7",
					     "2-1", "60", "x", "*/0"};
	unsigned seed = 12345;
	time_t base = utc("2026-11-27 12:00");
	int parsed = 0;
	for (int i = 0; i < 20000; i++) {
		char expr[128] = "";
		/* odd rounds: any sequence of atoms; even rounds: five whole fields */
		int parts = i % 2 ? 1 + (int)((seed = seed * 1103515245 + 12345) >> 16) % 14 : 5;
		for (int k = 0; k < parts; k++) {
			seed = seed * 1103515245 + 12345;
			const char *atom = i % 2 ? atoms[(seed >> 16) % (sizeof(atoms) / sizeof(atoms[0]))]
						 : fields[(seed >> 16) % (sizeof(fields) / sizeof(fields[0]))];
			strncat(expr, atom, sizeof(expr) - strlen(expr) - 1);
			if (i % 2 == 0 && k < 4)
				strncat(expr, " ", sizeof(expr) - strlen(expr) - 1);
		}
		backup_cron c;
		char eb[256] = "";
		if (backup_cron_parse(expr, &c, eb, sizeof(eb)) != 0) {
			CHECK(eb[0] != '\0');
			continue;
		}
		parsed++;
		time_t n;
		if (backup_cron_next(&c, base, 1, &n) == 0)
			CHECK(n > base && n % 60 == 0);
	}
	CHECK(parsed > 500); /* the generator does reach the valid side */
}

static void test_durations(void)
{
	double v = 0;
	CHECK(backup_parse_duration("90", &v) == 0 && v == 90);
	CHECK(backup_parse_duration("1h30m", &v) == 0 && v == 5400);
	CHECK(backup_parse_duration("250ms", &v) == 0 && v == 0.25);
	/* strtod reads these; a duration must not be one */
	CHECK(backup_parse_duration("nan", &v) != 0);
	CHECK(backup_parse_duration("inf", &v) != 0);
	CHECK(backup_parse_duration("infs", &v) != 0);
	CHECK(backup_parse_duration("nanm", &v) != 0);
	CHECK(backup_parse_duration("1e400h", &v) != 0);
	CHECK(backup_parse_duration("-1s", &v) != 0);
	CHECK(backup_parse_duration("", &v) != 0);
}

int main(void)
{
	test_durations();
	test_cron_parse();
	test_cron_next_utc();
	test_cron_next_local();
	test_cron_random();
	test_retention();
	test_thinning();
	if (t_fail) {
		fprintf(stderr, "schedule_test: %d checks failed\n", t_fail);
		return 1;
	}
	printf("schedule_test: all passed\n");
	return 0;
}
