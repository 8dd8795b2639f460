/*
 * backup.c - `backup`: scheduled snapshots with retention.
 *
 *   keelsonutl backup --endpoints=... --dir DIR --interval 1h --retain N [--verify] [--once]
 *
 * Every interval (measured from the start of the previous backup; ticks missed while a
 * backup ran long are skipped, not bunched) one snapshot is taken through the save path
 * (SHA-256 checked, every page checked, fsynced) and named DIR/<UTC time>-rev<revision>.db,
 * e.g. 20250101T120000.123Z-rev42.db, where the revision is the one a member restored from
 * it serves. A file gets that name only when whole (NAME.snapshot.part -> NAME.snapshot ->
 * the final name, each a rename followed by a directory fsync), so a crash never leaves a
 * half backup that looks whole; leftovers are removed at the next start. DIR/latest is a
 * symlink to the newest backup, replaced atomically (symlink latest.tmp, rename). Only the
 * newest N backups are kept (--retain 0 keeps all). --verify imports each backup into a
 * scratch dir (DIR/.verify-*), checks its revision and the import against the file, and
 * compares the restored store's HashKV with the server's HashKV at that revision (skipped,
 * and said so, when the server has compacted past it); a backup that fails is deleted.
 * One line per backup on stdout. A lock file (DIR/.backup.lock) keeps a second scheduler
 * out of the same DIR. SIGINT/SIGTERM stop the scheduler between backups.
 */
#define _GNU_SOURCE /* nftw, mkdtemp, %m */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "tools/keelsonutl/keelsonutl.h"

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
	(void)sig;
	stop_requested = 1;
}

static double now_mono(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void log_line(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void log_line(const char *fmt, ...)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	struct tm tm;
	gmtime_r(&ts.tv_sec, &tm);
	char when[32];
	strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
	printf("%s.%03ldZ ", when, ts.tv_nsec / 1000000);
	va_list ap;
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
	fflush(stdout);
}

/* "YYYYMMDDTHHMMSS.mmmZ-rev<digits>.db": a finished backup. */
static int is_backup_name(const char *s)
{
	const char *p = s;
	for (const char *q = "ddddddddTdddddd.dddZ-rev"; *q; q++, p++) {
		if (*q == 'd' ? (*p < '0' || *p > '9') : *p != *q)
			return 0;
	}
	const char *d = p;
	while (*p >= '0' && *p <= '9')
		p++;
	return p > d && strcmp(p, ".db") == 0;
}

static int cmp_desc(const void *a, const void *b)
{
	return -strcmp(*(char *const *)a, *(char *const *)b);
}

/* Removes leftovers of interrupted backups (*.snapshot, *.snapshot.part, latest.tmp,
 * .verify-* scratch dirs). Only called with the lock held. */
static void remove_leftovers(const char *dir)
{
	DIR *d = opendir(dir);
	if (d == NULL)
		return;
	struct dirent *e;
	char path[PATH_MAX];
	while ((e = readdir(d)) != NULL) {
		size_t n = strlen(e->d_name);
		int snap = (n > 9 && strcmp(e->d_name + n - 9, ".snapshot") == 0) ||
			   (n > 14 && strcmp(e->d_name + n - 14, ".snapshot.part") == 0) ||
			   strcmp(e->d_name, "latest.tmp") == 0;
		int scratch = strncmp(e->d_name, ".verify-", 8) == 0;
		if (!snap && !scratch)
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
		if (scratch)
			ku_remove_tree(path);
		else
			unlink(path);
	}
	closedir(d);
}

/* Keeps the newest retain backups; returns how many were removed (or -1). */
static int apply_retention(const char *dir, int retain, int *kept)
{
	DIR *d = opendir(dir);
	if (d == NULL)
		return -1;
	char **names = NULL;
	size_t n = 0, cap = 0;
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		if (!is_backup_name(e->d_name))
			continue;
		if (n == cap) {
			cap = cap ? cap * 2 : 64;
			char **nn = realloc(names, cap * sizeof(char *));
			if (nn == NULL)
				break;
			names = nn;
		}
		if ((names[n] = strdup(e->d_name)) != NULL)
			n++;
	}
	closedir(d);
	qsort(names, n, sizeof(char *), cmp_desc);
	int removed = 0;
	char path[PATH_MAX];
	for (size_t i = 0; i < n; i++) {
		if (retain > 0 && i >= (size_t)retain) {
			snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
			if (unlink(path) == 0)
				removed++;
		}
		free(names[i]);
	}
	free(names);
	*kept = (int)(retain > 0 && n > (size_t)retain ? (size_t)retain : n);
	return removed;
}

static int point_latest(const char *dir, const char *name, char *errbuf, size_t errlen)
{
	char tmp[PATH_MAX], latest[PATH_MAX];
	snprintf(tmp, sizeof(tmp), "%s/latest.tmp", dir);
	snprintf(latest, sizeof(latest), "%s/latest", dir);
	unlink(tmp);
	if (symlink(name, tmp) != 0)
		return ku_errf(errbuf, errlen, KU_ERR_IO, "symlink %s: %m", tmp);
	if (rename(tmp, latest) != 0) {
		unlink(tmp);
		return ku_errf(errbuf, errlen, KU_ERR_IO, "rename %s to %s: %m", tmp, latest);
	}
	return 0;
}

typedef struct backup_cfg {
	ku_conn_opts bc_conn;
	const char *bc_dir;
	int bc_retain;
	int bc_verify;
} backup_cfg;

/* One backup; logs its line. */
static int backup_once(const backup_cfg *bc)
{
	char eb[KU_ERRLEN], stamp[40], base[PATH_MAX], name[128], final[PATH_MAX];
	double t0 = now_mono();
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	struct tm tm;
	gmtime_r(&ts.tv_sec, &tm);
	strftime(stamp, sizeof(stamp), "%Y%m%dT%H%M%S", &tm);
	snprintf(stamp + strlen(stamp), sizeof(stamp) - strlen(stamp), ".%03ldZ", ts.tv_nsec / 1000000);
	snprintf(base, sizeof(base), "%s/%s.snapshot", bc->bc_dir, stamp);

	ku_save_result sr;
	int rc = ku_snapshot_save(&bc->bc_conn, base, &sr, eb, sizeof(eb));
	if (rc) {
		log_line("backup FAILED: %s", eb);
		return rc;
	}
	const storage_etcd_file_info *in = &sr.sr_info;
	char verified[KU_ERRLEN + 128] = "";
	if (bc->bc_verify) {
		char scratch[PATH_MAX], lmdb[PATH_MAX + 16];
		snprintf(scratch, sizeof(scratch), "%s/.verify-XXXXXX", bc->bc_dir);
		if (mkdtemp(scratch) == NULL) {
			rc = ku_errf(eb, sizeof(eb), KU_ERR_IO, "mkdtemp %s: %m", scratch);
		} else {
			snprintf(lmdb, sizeof(lmdb), "%s/member", scratch);
			uint32_t hash = 0, srv_hash = 0;
			int64_t hrev = 0, crev = 0;
			rc = ku_verify_import(base, lmdb, in, &hash, &hrev, eb, sizeof(eb));
			ku_remove_tree(scratch);
			if (rc == 0) {
				char heb[KU_ERRLEN];
				int hr = ku_hash_kv(&bc->bc_conn, sr.sr_endpoint, hrev, &srv_hash, &crev, heb,
						    sizeof(heb));
				if (hr == 0 && srv_hash != hash)
					rc = ku_errf(eb, sizeof(eb), KU_ERR_CORRUPT,
						     "restored HashKV %u at revision %" PRId64
						     " differs from the server's %u",
						     hash, hrev, srv_hash);
				else if (hr == 0)
					snprintf(verified, sizeof(verified),
						 ", verified (restored HashKV %u = server's at revision %" PRId64 ")",
						 hash, hrev);
				else
					snprintf(verified, sizeof(verified),
						 ", verified by restore (HashKV %u; server's not comparable: %s)",
						 hash, heb);
			}
		}
		if (rc) {
			unlink(base);
			log_line("backup FAILED verification (removed): %s", eb);
			return rc;
		}
	}
	snprintf(name, sizeof(name), "%s-rev%" PRId64 ".db", stamp, in->ef_store_revision);
	snprintf(final, sizeof(final), "%s/%s", bc->bc_dir, name);
	if (rename(base, final) != 0) {
		rc = ku_errf(eb, sizeof(eb), KU_ERR_IO, "rename %s to %s: %m", base, final);
		unlink(base);
		log_line("backup FAILED: %s", eb);
		return rc;
	}
	rc = point_latest(bc->bc_dir, name, eb, sizeof(eb));
	int kept = 0, removed = 0;
	if (rc == 0)
		removed = apply_retention(bc->bc_dir, bc->bc_retain, &kept);
	if (rc == 0)
		rc = ku_fsync_dir(bc->bc_dir, eb, sizeof(eb));
	if (rc) {
		log_line("backup FAILED after saving %s: %s", final, eb);
		return rc;
	}
	char hb[32];
	ku_human_bytes(sr.sr_bytes, hb, sizeof(hb));
	log_line("backup saved %s from %s: revision %" PRId64 ", %" PRIu64 " bytes (%s), hash %x, "
		 "took %.2fs%s; %d kept, %d removed",
		 final, bc->bc_conn.co_endpoints[sr.sr_endpoint], in->ef_store_revision, sr.sr_bytes, hb,
		 in->ef_hash, now_mono() - t0, verified, kept, removed < 0 ? 0 : removed);
	return 0;
}

int ku_cmd_backup(int argc, char **argv)
{
	ku_conn_flags cf = {0};
	const char *dir = NULL, *interval = "1h", *retain = "0";
	int verify = 0, once = 0;
	ku_flag flags[] = {
		KU_CONN_FLAGS(cf),
		{"dir", KU_FLAG_STR, &dir, NULL},
		{"interval", KU_FLAG_STR, &interval, NULL},
		{"retain", KU_FLAG_STR, &retain, NULL},
		{"verify", KU_FLAG_BOOL, NULL, &verify},
		{"once", KU_FLAG_BOOL, NULL, &once},
		{NULL, 0, NULL, NULL},
	};
	char *pos[1];
	int npos;
	char eb[KU_ERRLEN];
	backup_cfg bc = {0};
	char *buf = NULL;
	double every = 0;
	int rc = ku_flags_parse(argc, argv, flags, pos, 0, &npos, eb, sizeof(eb));
	if (rc == 0 && dir == NULL)
		rc = ku_errf(eb, sizeof(eb), KU_ERR_USAGE, "backup needs --dir");
	if (rc == 0 && (ku_parse_duration(interval, &every) || every < 0.1))
		rc = ku_errf(eb, sizeof(eb), KU_ERR_USAGE, "invalid --interval %s (a duration of at least 100ms)",
			     interval);
	char *e;
	long r = rc == 0 ? strtol(retain, &e, 10) : 0;
	if (rc == 0 && (*retain == '\0' || *e || r < 0 || r > 1000000))
		rc = ku_errf(eb, sizeof(eb), KU_ERR_USAGE, "invalid --retain %s", retain);
	if (rc == 0)
		rc = ku_conn_opts_from_flags(&bc.bc_conn, &cf, &buf, eb, sizeof(eb));
	if (rc) {
		fprintf(stderr, "Error: %s\n", eb);
		free(buf);
		return rc == KU_ERR_USAGE ? 2 : 1;
	}
	bc.bc_dir = dir;
	bc.bc_retain = (int)r;
	bc.bc_verify = verify;

	if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
		fprintf(stderr, "Error: mkdir %s: %m\n", dir);
		free(buf);
		return 1;
	}
	char lockpath[PATH_MAX];
	snprintf(lockpath, sizeof(lockpath), "%s/.backup.lock", dir);
	int lockfd = open(lockpath, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (lockfd < 0 || flock(lockfd, LOCK_EX | LOCK_NB) != 0) {
		fprintf(stderr, "Error: %s: %s\n", lockpath,
			lockfd < 0 ? strerror(errno) : "another backup is running on this directory");
		if (lockfd >= 0)
			close(lockfd);
		free(buf);
		return 1;
	}
	remove_leftovers(dir);

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal; /* no SA_RESTART: a sleep ends at once */
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);

	if (!once)
		log_line("backup scheduler started: every %gs into %s, keeping %s", every, dir,
			 bc.bc_retain ? retain : "all");
	int last = 0;
	double next = now_mono();
	while (!stop_requested) {
		double start = now_mono();
		last = backup_once(&bc);
		if (once)
			break;
		next += every;
		double now = now_mono();
		if (next <= now) /* ran longer than the interval: skip the missed ticks */
			next = start + every * (1 + (double)(long)((now - start) / every));
		while (!stop_requested && (now = now_mono()) < next) {
			double left = next - now;
			struct timespec ts = {(time_t)left, (long)((left - (double)(time_t)left) * 1e9)};
			nanosleep(&ts, NULL);
		}
	}
	if (!once)
		log_line("backup scheduler stopped");
	close(lockfd);
	free(buf);
	return last ? 1 : 0;
}
