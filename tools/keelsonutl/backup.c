/*
 * backup.c - `backup`: scheduled snapshots with retention, compression and metrics.
 *
 *   keelsonutl backup --endpoints=... --dir DIR (--interval 1h | --schedule 'CRON' [--utc])
 *                     [--retain N] [--max-age D] [--thin] [--compress] [--verify]
 *                     [--metrics-file PATH] [--listen-metrics HOST:PORT] [--once]
 *
 * When: --interval measures from the start of the previous backup (ticks missed while a
 * backup ran long are skipped, not bunched); --schedule takes a cron expression
 * (schedule.h), in local time or with --utc in UTC, and the wall clock is re-read every
 * second while waiting, so a clock change moves the next run with it.
 *
 * Each backup is taken through the save path (SHA-256 checked, every page checked,
 * fsynced) and named DIR/<UTC time>-rev<revision>.db (.db.gz with --compress), e.g.
 * 20250101T120000.123Z-rev42.db, where the revision is the one a member restored from it
 * serves. A file gets that name only when whole: NAME.snapshot.part -> NAME.snapshot
 * (checked) -> [--compress: NAME.snapshot.gz.part, fsynced] -> the final name, each a rename
 * followed by a directory fsync, so a crash never leaves a half backup that looks whole;
 * leftovers are removed at the next start. DIR/latest is a symlink to the newest backup,
 * replaced atomically (symlink latest.tmp, rename, directory fsync).
 *
 * Retention (schedule.h has the exact rule) runs after each successful backup: --thin
 * (exponential thinning), --max-age, --retain N; the newest backup is never removed.
 * --verify imports each backup into a scratch dir (DIR/.verify-*), checks its revision and
 * the import against the file, and compares the restored store's HashKV with the server's
 * HashKV at that revision (skipped, and said so, when the server has compacted past it); a
 * backup that fails is deleted and never gets a backup name.
 *
 * One line per backup on stdout. --metrics-file is rewritten atomically after every
 * attempt in Prometheus' text format (node_exporter's textfile collector reads it), and
 * --listen-metrics HOST:PORT serves the same text at GET /metrics. A lock
 * file (DIR/.backup.lock) keeps a second scheduler out of the same DIR. SIGINT/SIGTERM stop
 * the scheduler between backups.
 */
#define _GNU_SOURCE /* nftw, mkdtemp, %m */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "tools/keelsonutl/keelsonutl.h"
#include "tools/keelsonutl/schedule.h"

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

/* "YYYYMMDDTHHMMSS.mmmZ-rev<digits>.db[.gz]": a finished backup; *ms gets its time. */
static int is_backup_name(const char *s, int64_t *ms)
{
	const char *p = s;
	for (const char *q = "ddddddddTdddddd.dddZ-rev"; *q; q++, p++) {
		if (*q == 'd' ? (*p < '0' || *p > '9') : *p != *q)
			return 0;
	}
	const char *d = p;
	while (*p >= '0' && *p <= '9')
		p++;
	if (p == d || (strcmp(p, ".db") != 0 && strcmp(p, ".db.gz") != 0))
		return 0;
	struct tm tm;
	memset(&tm, 0, sizeof(tm));
	int msec;
	if (sscanf(s, "%4d%2d%2dT%2d%2d%2d.%3dZ", &tm.tm_year, &tm.tm_mon, &tm.tm_mday, &tm.tm_hour,
		   &tm.tm_min, &tm.tm_sec, &msec) != 7)
		return 0;
	tm.tm_year -= 1900;
	tm.tm_mon -= 1;
	*ms = (int64_t)timegm(&tm) * 1000 + msec;
	return 1;
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
			   (n > 17 && strcmp(e->d_name + n - 17, ".snapshot.gz.part") == 0) ||
			   strcmp(e->d_name, "latest.tmp") == 0 || strcmp(e->d_name, "metrics.tmp") == 0;
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

/* Applies the retention policy (schedule.h) to DIR's backups at now_ms; returns how many
 * were removed (or -1), *kept gets how many remain. */
static int apply_retention(const char *dir, const ku_retention_policy *pol, int64_t now_ms,
			   int *kept)
{
	DIR *d = opendir(dir);
	if (d == NULL)
		return -1;
	char **names = NULL;
	int64_t *times = NULL;
	size_t n = 0, cap = 0;
	int failed = 0;
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		int64_t ms;
		if (!is_backup_name(e->d_name, &ms))
			continue;
		if (n == cap) {
			cap = cap ? cap * 2 : 64;
			char **nn = realloc(names, cap * sizeof(char *));
			if (nn)
				names = nn;
			int64_t *nt = realloc(times, cap * sizeof(int64_t));
			if (nt)
				times = nt;
			if (nn == NULL || nt == NULL) {
				failed = 1;
				break;
			}
		}
		if ((names[n] = strdup(e->d_name)) == NULL) {
			failed = 1;
			break;
		}
		times[n++] = ms;
	}
	closedir(d);
	int *keep = failed ? NULL : malloc((n ? n : 1) * sizeof(int));
	/* Out of memory: remove nothing rather than the wrong thing. */
	int k = keep ? ku_retention_select(times, n, pol, now_ms, keep) : -1;
	int removed = k < 0 ? -1 : 0;
	char path[PATH_MAX];
	for (size_t i = 0; i < n; i++) {
		if (k >= 0 && !keep[i]) {
			snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
			if (unlink(path) == 0)
				removed++;
		}
		free(names[i]);
	}
	*kept = k < 0 ? (int)n : k;
	free(names);
	free(times);
	free(keep);
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
	ku_retention_policy bc_retention;
	int bc_verify;
	int bc_compress;
	const char *bc_metrics; /* NULL: none */
} backup_cfg;

/* What --metrics-file reports; kept across backups of one run. */
typedef struct backup_stats {
	double bs_last_success;   /* wall-clock seconds; 0: none yet */
	double bs_last_attempt;
	double bs_last_duration;  /* of the last successful backup */
	uint64_t bs_last_size;    /* bytes of its file */
	int64_t bs_last_revision;
	uint64_t bs_successes, bs_failures;
	int bs_kept;
	int bs_last_ok;
} backup_stats;

static double now_wall(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* The metrics in Prometheus' text exposition format; returns the length (truncated to
 * len - 1 if longer, which the fixed set of lines never is with the callers' buffers). */
static size_t format_metrics(const backup_stats *bs, char *buf, size_t len)
{
	int n = snprintf(buf, len,
		"# HELP keelson_backup_last_success_timestamp_seconds When the last successful backup finished (0: none yet).\n"
		"# TYPE keelson_backup_last_success_timestamp_seconds gauge\n"
		"keelson_backup_last_success_timestamp_seconds %.3f\n"
		"# HELP keelson_backup_last_attempt_timestamp_seconds When the last backup attempt finished.\n"
		"# TYPE keelson_backup_last_attempt_timestamp_seconds gauge\n"
		"keelson_backup_last_attempt_timestamp_seconds %.3f\n"
		"# HELP keelson_backup_last_success 1 if the last attempt succeeded, else 0.\n"
		"# TYPE keelson_backup_last_success gauge\n"
		"keelson_backup_last_success %d\n"
		"# HELP keelson_backup_last_duration_seconds How long the last successful backup took.\n"
		"# TYPE keelson_backup_last_duration_seconds gauge\n"
		"keelson_backup_last_duration_seconds %.3f\n"
		"# HELP keelson_backup_last_size_bytes Size of the last successful backup's file.\n"
		"# TYPE keelson_backup_last_size_bytes gauge\n"
		"keelson_backup_last_size_bytes %llu\n"
		"# HELP keelson_backup_last_revision Store revision of the last successful backup.\n"
		"# TYPE keelson_backup_last_revision gauge\n"
		"keelson_backup_last_revision %lld\n"
		"# HELP keelson_backup_successes_total Successful backups since the scheduler started.\n"
		"# TYPE keelson_backup_successes_total counter\n"
		"keelson_backup_successes_total %llu\n"
		"# HELP keelson_backup_failures_total Failed backups since the scheduler started.\n"
		"# TYPE keelson_backup_failures_total counter\n"
		"keelson_backup_failures_total %llu\n"
		"# HELP keelson_backup_retained Backups in the directory after retention.\n"
		"# TYPE keelson_backup_retained gauge\n"
		"keelson_backup_retained %d\n",
		bs->bs_last_success, bs->bs_last_attempt, bs->bs_last_ok, bs->bs_last_duration,
		(unsigned long long)bs->bs_last_size, (long long)bs->bs_last_revision,
		(unsigned long long)bs->bs_successes, (unsigned long long)bs->bs_failures, bs->bs_kept);
	return n < 0 ? 0 : (size_t)n >= len ? len - 1 : (size_t)n;
}

/* Writes the metrics file atomically (PATH.tmp, fsync, rename, directory fsync). */
static int write_metrics(const char *path, const backup_stats *bs, char *errbuf, size_t errlen)
{
	char tmp[PATH_MAX], text[4096];
	if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp))
		return ku_errf(errbuf, errlen, KU_ERR_USAGE, "--metrics-file path too long");
	size_t tl = format_metrics(bs, text, sizeof(text));
	FILE *f = fopen(tmp, "w");
	if (f == NULL)
		return ku_errf(errbuf, errlen, KU_ERR_IO, "open %s: %m", tmp);
	fwrite(text, 1, tl, f);
	int rc = 0;
	if (fflush(f) != 0 || ferror(f) || fsync(fileno(f)) != 0)
		rc = ku_errf(errbuf, errlen, KU_ERR_IO, "write %s: %m", tmp);
	if (fclose(f) != 0 && rc == 0)
		rc = ku_errf(errbuf, errlen, KU_ERR_IO, "close %s: %m", tmp);
	if (rc == 0 && rename(tmp, path) != 0)
		rc = ku_errf(errbuf, errlen, KU_ERR_IO, "rename %s to %s: %m", tmp, path);
	if (rc) {
		unlink(tmp);
		return rc;
	}
	return ku_fsync_parent(path, errbuf, errlen);
}

/* One backup; logs its line. */
/* ---- --listen-metrics: the same metrics over HTTP (GET /metrics), for Prometheus to
 * scrape. One thread answers one request at a time; the stats it reads are a copy taken
 * under mu after each backup. */
typedef struct metrics_server {
	int ms_fd;           /* listening socket */
	int ms_stop[2];      /* a pipe: writing to it ends the thread */
	pthread_t ms_thread;
	pthread_mutex_t ms_mu;
	backup_stats ms_stats; /* under ms_mu */
} metrics_server;

static void serve_one(metrics_server *m, int c)
{
	struct timeval tv = {2, 0}; /* a client that sends nothing cannot hold the thread */
	setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	char req[2048];
	size_t got = 0;
	while (got < sizeof(req) - 1) { /* up to the end of the request line */
		ssize_t n = read(c, req + got, sizeof(req) - 1 - got);
		if (n <= 0)
			break;
		got += (size_t)n;
		req[got] = '\0';
		if (strstr(req, "\r\n") || strchr(req, '\n'))
			break;
	}
	req[got] = '\0';
	char body[4096], head[256];
	size_t bl;
	const char *status;
	if (strncmp(req, "GET /metrics ", 13) == 0 || strncmp(req, "GET /metrics?", 13) == 0) {
		backup_stats snap;
		pthread_mutex_lock(&m->ms_mu);
		snap = m->ms_stats;
		pthread_mutex_unlock(&m->ms_mu);
		bl = format_metrics(&snap, body, sizeof(body));
		status = "200 OK";
	} else {
		bl = (size_t)snprintf(body, sizeof(body), "only GET /metrics is served here\n");
		status = "404 Not Found";
	}
	int hl = snprintf(head, sizeof(head),
			  "HTTP/1.0 %s\r\nContent-Type: text/plain; version=0.0.4\r\n"
			  "Content-Length: %zu\r\nConnection: close\r\n\r\n",
			  status, bl);
	if (write(c, head, (size_t)hl) == hl && write(c, body, bl) == (ssize_t)bl)
		shutdown(c, SHUT_WR);
}

static void *metrics_thread(void *arg)
{
	metrics_server *m = arg;
	for (;;) {
		struct pollfd p[2] = {{m->ms_fd, POLLIN, 0}, {m->ms_stop[0], POLLIN, 0}};
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (p[1].revents)
			break;
		int c = accept4(m->ms_fd, NULL, NULL, SOCK_CLOEXEC);
		if (c < 0)
			continue;
		serve_one(m, c);
		close(c);
	}
	return NULL;
}

/* Binds host:port (numeric IPv4, or "" / "*" for all) and starts the thread. */
static int metrics_server_start(metrics_server *m, const char *addr, char *errbuf, size_t errlen)
{
	memset(m, 0, sizeof(*m));
	m->ms_fd = -1;
	char host[64];
	const char *colon = strrchr(addr, ':');
	char *e;
	long port = colon ? strtol(colon + 1, &e, 10) : -1;
	if (colon == NULL || (size_t)(colon - addr) >= sizeof(host) || colon[1] == '\0' || *e ||
	    port < 0 || port > 65535)
		return ku_errf(errbuf, errlen, KU_ERR_USAGE, "invalid --listen-metrics %s (HOST:PORT)",
			       addr);
	memcpy(host, addr, (size_t)(colon - addr));
	host[colon - addr] = '\0';
	struct sockaddr_in sa;
	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_port = htons((uint16_t)port);
	if (host[0] == '\0' || strcmp(host, "*") == 0)
		sa.sin_addr.s_addr = htonl(INADDR_ANY);
	else if (strcmp(host, "localhost") == 0)
		sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	else if (inet_pton(AF_INET, host, &sa.sin_addr) != 1)
		return ku_errf(errbuf, errlen, KU_ERR_USAGE,
			       "invalid --listen-metrics host %s (an IPv4 address)", host);
	int one = 1;
	m->ms_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (m->ms_fd < 0)
		return ku_errf(errbuf, errlen, KU_ERR_IO, "socket: %m");
	setsockopt(m->ms_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(m->ms_fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(m->ms_fd, 16) != 0) {
		int rc = ku_errf(errbuf, errlen, KU_ERR_IO, "--listen-metrics %s: %m", addr);
		close(m->ms_fd);
		m->ms_fd = -1;
		return rc;
	}
	if (pipe2(m->ms_stop, O_CLOEXEC) != 0) {
		close(m->ms_fd);
		m->ms_fd = -1;
		return ku_errf(errbuf, errlen, KU_ERR_IO, "pipe: %m");
	}
	pthread_mutex_init(&m->ms_mu, NULL);
	if (pthread_create(&m->ms_thread, NULL, metrics_thread, m) != 0) {
		close(m->ms_fd);
		close(m->ms_stop[0]);
		close(m->ms_stop[1]);
		m->ms_fd = -1;
		return ku_errf(errbuf, errlen, KU_ERR_IO, "cannot start the metrics thread");
	}
	return 0;
}

static void metrics_server_publish(metrics_server *m, const backup_stats *bs)
{
	if (m->ms_fd < 0)
		return;
	pthread_mutex_lock(&m->ms_mu);
	m->ms_stats = *bs;
	pthread_mutex_unlock(&m->ms_mu);
}

static void metrics_server_stop(metrics_server *m)
{
	if (m->ms_fd < 0)
		return;
	char x = 1;
	if (write(m->ms_stop[1], &x, 1) == 1)
		pthread_join(m->ms_thread, NULL);
	close(m->ms_fd);
	close(m->ms_stop[0]);
	close(m->ms_stop[1]);
	pthread_mutex_destroy(&m->ms_mu);
	m->ms_fd = -1;
}

/* One backup attempt; logs its line and updates bs. */
static int backup_once(const backup_cfg *bc, backup_stats *bs)
{
	char eb[KU_ERRLEN], stamp[40], base[PATH_MAX], gzpart[PATH_MAX + 16], name[128],
		final[PATH_MAX];
	double t0 = now_mono();
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	struct tm tm;
	gmtime_r(&ts.tv_sec, &tm);
	strftime(stamp, sizeof(stamp), "%Y%m%dT%H%M%S", &tm);
	snprintf(stamp + strlen(stamp), sizeof(stamp) - strlen(stamp), ".%03ldZ", ts.tv_nsec / 1000000);
	snprintf(base, sizeof(base), "%s/%s.snapshot", bc->bc_dir, stamp);
	snprintf(gzpart, sizeof(gzpart), "%s.gz.part", base);

	ku_save_result sr;
	ku_save_opts so = {0, 0}; /* compressed below, after --verify read the plain file */
	int rc = ku_snapshot_save(&bc->bc_conn, &so, base, &sr, eb, sizeof(eb));
	const storage_etcd_file_info *in = &sr.sr_info;
	char verified[KU_ERRLEN + 128] = "";
	const char *failure = "backup FAILED";
	if (rc == 0 && bc->bc_verify) {
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
		if (rc)
			failure = "backup FAILED verification (removed)";
	}
	snprintf(name, sizeof(name), "%s-rev%" PRId64 ".db%s", stamp, in->ef_store_revision,
		 bc->bc_compress ? ".gz" : "");
	snprintf(final, sizeof(final), "%s/%s", bc->bc_dir, name);
	const char *src = base;
	uint64_t file_bytes = sr.sr_bytes;
	if (rc == 0 && bc->bc_compress) {
		rc = ku_gzip_file(base, gzpart, &file_bytes, eb, sizeof(eb));
		src = gzpart;
	}
	if (rc == 0 && rename(src, final) != 0)
		rc = ku_errf(eb, sizeof(eb), KU_ERR_IO, "rename %s to %s: %m", src, final);
	if (src != base)
		unlink(base);
	if (rc) {
		unlink(src);
		bs->bs_failures++;
		bs->bs_last_ok = 0;
		log_line("%s after %.2fs: %s", failure, now_mono() - t0, eb);
		return rc;
	}
	rc = point_latest(bc->bc_dir, name, eb, sizeof(eb));
	int kept = 0, removed = 0;
	if (rc == 0)
		removed = apply_retention(bc->bc_dir, &bc->bc_retention, (int64_t)(now_wall() * 1000),
					  &kept);
	if (rc == 0)
		rc = ku_fsync_dir(bc->bc_dir, eb, sizeof(eb));
	if (rc) {
		bs->bs_failures++;
		bs->bs_last_ok = 0;
		log_line("backup FAILED after saving %s: %s", final, eb);
		return rc;
	}
	double took = now_mono() - t0;
	bs->bs_successes++;
	bs->bs_last_ok = 1;
	bs->bs_last_success = now_wall();
	bs->bs_last_duration = took;
	bs->bs_last_size = file_bytes;
	bs->bs_last_revision = in->ef_store_revision;
	bs->bs_kept = kept;
	char hb[32], hf[64] = "";
	ku_human_bytes(sr.sr_bytes, hb, sizeof(hb));
	if (bc->bc_compress) {
		char h[32];
		ku_human_bytes(file_bytes, h, sizeof(h));
		snprintf(hf, sizeof(hf), ", %s compressed", h);
	}
	log_line("backup saved %s from %s: revision %" PRId64 ", %" PRIu64 " bytes (%s%s), hash %x, "
		"took %.2fs%s; %d kept, %d removed",
		 final, bc->bc_conn.co_endpoints[sr.sr_endpoint], in->ef_store_revision, sr.sr_bytes, hb,
		 hf, in->ef_hash, took, verified, kept, removed < 0 ? 0 : removed);
	return 0;
}

/* Sleeps until the monotonic time `until`, or a stop request. */
static void sleep_until_mono(double until)
{
	double now;
	while (!stop_requested && (now = now_mono()) < until) {
		double left = until - now;
		struct timespec ts = {(time_t)left, (long)((left - (double)(time_t)left) * 1e9)};
		nanosleep(&ts, NULL);
	}
}

/* Sleeps until the wall-clock time `until`, re-reading the clock at least every second so
 * that a clock step moves the wake-up with it. */
static void sleep_until_wall(time_t until)
{
	double now;
	while (!stop_requested && (now = now_wall()) < (double)until) {
		double left = (double)until - now;
		if (left > 1)
			left = 1;
		struct timespec ts = {(time_t)left, (long)((left - (double)(time_t)left) * 1e9)};
		nanosleep(&ts, NULL);
	}
}

static void fmt_when(time_t t, int utc, char *out, size_t len)
{
	struct tm tm;
	if (utc)
		gmtime_r(&t, &tm);
	else
		localtime_r(&t, &tm);
	strftime(out, len, utc ? "%Y-%m-%dT%H:%M:%SZ" : "%Y-%m-%dT%H:%M:%S%z", &tm);
}

int ku_cmd_backup(int argc, char **argv)
{
	ku_conn_flags cf = {0};
	const char *dir = NULL, *interval = NULL, *retain = "0", *schedule = NULL, *max_age = NULL,
		   *metrics = NULL, *listen_metrics = NULL;
	int verify = 0, once = 0, utc = 0, thin = 0, compress = 0;
	ku_flag flags[] = {
		KU_CONN_FLAGS(cf),
		{"dir", KU_FLAG_STR, &dir, NULL},
		{"interval", KU_FLAG_STR, &interval, NULL},
		{"schedule", KU_FLAG_STR, &schedule, NULL},
		{"utc", KU_FLAG_BOOL, NULL, &utc},
		{"retain", KU_FLAG_STR, &retain, NULL},
		{"max-age", KU_FLAG_STR, &max_age, NULL},
		{"thin", KU_FLAG_BOOL, NULL, &thin},
		{"compress", KU_FLAG_BOOL, NULL, &compress},
		{"metrics-file", KU_FLAG_STR, &metrics, NULL},
		{"listen-metrics", KU_FLAG_STR, &listen_metrics, NULL},
		{"verify", KU_FLAG_BOOL, NULL, &verify},
		{"once", KU_FLAG_BOOL, NULL, &once},
		{NULL, 0, NULL, NULL},
	};
	char *pos[1];
	int npos;
	char eb[KU_ERRLEN];
	backup_cfg bc = {0};
	char *buf = NULL;
	double every = 3600;
	ku_cron cron;
	int rc = ku_flags_parse(argc, argv, flags, pos, 0, &npos, eb, sizeof(eb));
	if (rc == 0 && dir == NULL)
		rc = ku_errf(eb, sizeof(eb), KU_ERR_USAGE, "backup needs --dir");
	if (rc == 0 && interval && schedule)
		rc = ku_errf(eb, sizeof(eb), KU_ERR_USAGE, "--interval and --schedule are exclusive");
	if (rc == 0 && utc && !schedule)
		rc = ku_errf(eb, sizeof(eb), KU_ERR_USAGE, "--utc applies to --schedule only");
	if (rc == 0 && interval && (ku_parse_duration(interval, &every) || every < 0.1))
		rc = ku_errf(eb, sizeof(eb), KU_ERR_USAGE, "invalid --interval %s (a duration of at least 100ms)",
			     interval);
	if (rc == 0 && schedule) {
		char ceb[256];
		time_t probe;
		if (ku_cron_parse(schedule, &cron, ceb, sizeof(ceb)) != 0)
			rc = ku_errf(eb, sizeof(eb), KU_ERR_USAGE, "invalid --schedule: %s", ceb);
		else if (ku_cron_next(&cron, time(NULL), utc, &probe) != 0)
			rc = ku_errf(eb, sizeof(eb), KU_ERR_USAGE,
				     "invalid --schedule: \"%s\" never matches a date", schedule);
	}
	char *e;
	long r = rc == 0 ? strtol(retain, &e, 10) : 0;
	if (rc == 0 && (*retain == '\0' || *e || r < 0 || r > 1000000))
		rc = ku_errf(eb, sizeof(eb), KU_ERR_USAGE, "invalid --retain %s", retain);
	double age = 0;
	if (rc == 0 && max_age && (ku_parse_duration(max_age, &age) || age <= 0))
		rc = ku_errf(eb, sizeof(eb), KU_ERR_USAGE, "invalid --max-age %s (a positive duration)",
			     max_age);
	if (rc == 0)
		rc = ku_conn_opts_from_flags(&bc.bc_conn, &cf, &buf, eb, sizeof(eb));
	if (rc) {
		fprintf(stderr, "Error: %s\n", eb);
		ku_conn_opts_free(&bc.bc_conn);
		free(buf);
		return rc == KU_ERR_USAGE ? 2 : 1;
	}
	bc.bc_dir = dir;
	bc.bc_retention.rp_retain = (int)r;
	bc.bc_retention.rp_max_age = age;
	bc.bc_retention.rp_thin = thin;
	bc.bc_verify = verify;
	bc.bc_compress = compress;
	bc.bc_metrics = metrics;

	int lockfd = -1;
	metrics_server ms = {.ms_fd = -1};
	if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
		fprintf(stderr, "Error: mkdir %s: %m\n", dir);
		goto fail;
	}
	char lockpath[PATH_MAX];
	snprintf(lockpath, sizeof(lockpath), "%s/.backup.lock", dir);
	lockfd = open(lockpath, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (lockfd < 0 || flock(lockfd, LOCK_EX | LOCK_NB) != 0) {
		fprintf(stderr, "Error: %s: %s\n", lockpath,
			lockfd < 0 ? strerror(errno) : "another backup is running on this directory");
		goto fail;
	}
	remove_leftovers(dir);
	if (listen_metrics && (rc = metrics_server_start(&ms, listen_metrics, eb, sizeof(eb)))) {
		fprintf(stderr, "Error: %s\n", eb);
		close(lockfd);
		ku_conn_opts_free(&bc.bc_conn);
		free(buf);
		return rc == KU_ERR_USAGE ? 2 : 1;
	}

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal; /* no SA_RESTART: a sleep ends at once */
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);

	char keep[128];
	snprintf(keep, sizeof(keep), "keeping %s%s%s%s%s", r ? retain : "all", r ? " newest" : "",
		 thin ? ", thinned" : "", max_age ? ", at most " : "", max_age ? max_age : "");
	if (!once && schedule)
		log_line("backup scheduler started: on \"%s\" (%s) into %s, %s%s", schedule,
			 utc ? "UTC" : "local time", dir, keep, compress ? ", gzip" : "");
	else if (!once)
		log_line("backup scheduler started: every %gs into %s, %s%s", every, dir, keep,
			 compress ? ", gzip" : "");
	backup_stats bs = {0};
	int last = 0;
	double next = now_mono();
	if (!once && schedule) {
		/* A cron schedule's first backup is at its first matching minute, not now. */
		time_t at;
		ku_cron_next(&cron, time(NULL), utc, &at);
		char when[40];
		fmt_when(at, utc, when, sizeof(when));
		log_line("next backup at %s", when);
		sleep_until_wall(at);
	}
	while (!stop_requested) {
		double start = now_mono();
		last = backup_once(&bc, &bs);
		bs.bs_last_attempt = now_wall();
		if (metrics && write_metrics(metrics, &bs, eb, sizeof(eb)) != 0)
			log_line("metrics not written: %s", eb);
		metrics_server_publish(&ms, &bs);
		if (once)
			break;
		if (schedule) {
			time_t at;
			if (ku_cron_next(&cron, time(NULL), utc, &at) != 0)
				break; /* checked at start-up; only a clock gone wild gets here */
			sleep_until_wall(at);
			continue;
		}
		next += every;
		double now = now_mono();
		if (next <= now) /* ran longer than the interval: skip the missed ticks */
			next = start + every * (1 + (double)(long)((now - start) / every));
		sleep_until_mono(next);
	}
	if (!once)
		log_line("backup scheduler stopped");
	metrics_server_stop(&ms);
	close(lockfd);
	ku_conn_opts_free(&bc.bc_conn);
	free(buf);
	return last ? 1 : 0;
fail:
	if (lockfd >= 0)
		close(lockfd);
	ku_conn_opts_free(&bc.bc_conn);
	free(buf);
	return 1;
}
