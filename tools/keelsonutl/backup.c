/*
 * backup.c - `backup`: scheduled snapshots with retention, compression and metrics.
 *
 *   keelsonutl backup --endpoints=... --dir DIR (--interval 1h | --schedule 'CRON' [--utc])
 *                     [--retain N] [--max-age D] [--thin] [--compress] [--verify]
 *                     [--metrics-file PATH] [--listen-metrics HOST:PORT] [--once]
 *
 * When: --interval measures from the start of the previous backup (ticks missed while a
 * backup ran long are skipped, not bunched); --schedule takes a cron expression
 * (backup/backup.h), in local time or with --utc in UTC, and the wall clock is re-read every
 * second while waiting, so a clock change moves the next run with it.
 *
 * Each backup is taken through the save path (SHA-256 checked, every page checked,
 * fsynced) into the directory's next slot; the directory itself (names by time and
 * revision, the atomic renames, gzip, `latest`, retention, the leftovers of a crash
 * removed at start) is backup/backup.h's, shared with the server's --backup-* flags.
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

#include "backup/backup.h"
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

typedef struct backup_cfg {
	ku_conn_opts bc_conn;
	backup_dir bc_dir;
	backup_keep bc_keep;
	int bc_verify;
	const char *bc_metrics; /* NULL: none */
} backup_cfg;

static double now_wall(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

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
		bl = backup_metrics_format(&snap, body, sizeof(body));
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

/* One backup attempt; logs its line and updates bs. The directory's part (names, gzip,
 * latest, retention) is backup/backup.h's, shared with the server's --backup-* flags. */
static int backup_once(backup_cfg *bc, backup_stats *bs)
{
	char eb[KU_ERRLEN];
	double t0 = now_mono();
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	backup_slot slot;
	backup_slot_init(&bc->bc_dir, &ts, &slot);

	ku_save_result sr;
	ku_save_opts so = {0, 0}; /* compressed by the commit, after --verify read the plain file */
	int rc = ku_snapshot_save(&bc->bc_conn, &so, slot.bs_plain, &sr, eb, sizeof(eb));
	const storage_etcd_file_info *in = &sr.sr_info;
	char verified[KU_ERRLEN + 128] = "";
	const char *failure = "backup FAILED";
	if (rc == 0 && bc->bc_verify) {
		char scratch[PATH_MAX + 32], lmdb[PATH_MAX + 48];
		snprintf(scratch, sizeof(scratch), "%s/.verify-XXXXXX", bc->bc_dir.bd_path);
		if (mkdtemp(scratch) == NULL) {
			rc = ku_errf(eb, sizeof(eb), KU_ERR_IO, "mkdtemp %s: %m", scratch);
		} else {
			snprintf(lmdb, sizeof(lmdb), "%s/member", scratch);
			uint32_t hash = 0, srv_hash = 0;
			int64_t hrev = 0, crev = 0;
			rc = ku_verify_import(slot.bs_plain, lmdb, in, &hash, &hrev, eb, sizeof(eb));
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
	backup_commit_result cr;
	if (rc) {
		backup_slot_discard(&slot);
	} else if (backup_dir_commit(&bc->bc_dir, &slot, in->ef_store_revision, &bc->bc_keep,
				     (int64_t)(now_wall() * 1000), &cr, eb, sizeof(eb)) != 0) {
		rc = KU_ERR_IO;
	}
	if (rc) {
		bs->bs_failures++;
		bs->bs_last_ok = 0;
		log_line("%s after %.2fs: %s", failure, now_mono() - t0, eb);
		return rc;
	}
	double took = now_mono() - t0;
	bs->bs_successes++;
	bs->bs_last_ok = 1;
	bs->bs_last_success = now_wall();
	bs->bs_last_duration = took;
	bs->bs_last_size = cr.bc_file_bytes;
	bs->bs_last_revision = in->ef_store_revision;
	bs->bs_kept = cr.bc_kept;
	char hb[32], hf[64] = "";
	ku_human_bytes(sr.sr_bytes, hb, sizeof(hb));
	if (bc->bc_keep.bk_compress) {
		char h[32];
		ku_human_bytes(cr.bc_file_bytes, h, sizeof(h));
		snprintf(hf, sizeof(hf), ", %s compressed", h);
	}
	log_line("backup saved %s/%s from %s: revision %" PRId64 ", %" PRIu64 " bytes (%s%s), hash %x, "
		"took %.2fs%s; %d kept, %d removed",
		 bc->bc_dir.bd_path, cr.bc_name, bc->bc_conn.co_endpoints[sr.sr_endpoint],
		 in->ef_store_revision, sr.sr_bytes, hb, hf, in->ef_hash, took, verified, cr.bc_kept,
		 cr.bc_removed);
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
	bc.bc_dir.bd_lock_fd = -1;
	char *buf = NULL;
	backup_plan plan;
	int rc = ku_flags_parse(argc, argv, flags, pos, 0, &npos, eb, sizeof(eb));
	if (rc == 0 && dir == NULL)
		rc = ku_errf(eb, sizeof(eb), KU_ERR_USAGE, "backup needs --dir");
	if (rc == 0 && backup_plan_parse(&plan, interval, schedule, utc, "--", eb, sizeof(eb)) != 0)
		rc = KU_ERR_USAGE;
	char *e;
	long r = rc == 0 ? strtol(retain, &e, 10) : 0;
	if (rc == 0 && (*retain == '\0' || *e || r < 0 || r > 1000000))
		rc = ku_errf(eb, sizeof(eb), KU_ERR_USAGE, "invalid --retain %s", retain);
	double age = 0;
	if (rc == 0 && max_age && (backup_parse_duration(max_age, &age) || age <= 0))
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
	bc.bc_keep.bk_retention.rp_retain = (int)r;
	bc.bc_keep.bk_retention.rp_max_age = age;
	bc.bc_keep.bk_retention.rp_thin = thin;
	bc.bc_keep.bk_compress = compress;
	bc.bc_verify = verify;
	bc.bc_metrics = metrics;

	metrics_server ms = {.ms_fd = -1};
	if (backup_dir_open(&bc.bc_dir, dir, eb, sizeof(eb)) != 0) {
		fprintf(stderr, "Error: %s\n", eb);
		goto fail;
	}
	if (listen_metrics && (rc = metrics_server_start(&ms, listen_metrics, eb, sizeof(eb)))) {
		fprintf(stderr, "Error: %s\n", eb);
		backup_dir_close(&bc.bc_dir);
		ku_conn_opts_free(&bc.bc_conn);
		free(buf);
		return rc == KU_ERR_USAGE ? 2 : 1;
	}

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal; /* no SA_RESTART: a sleep ends at once */
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);

	char keep[128], when[160];
	snprintf(keep, sizeof(keep), "keeping %s%s%s%s%s", r ? retain : "all", r ? " newest" : "",
		 thin ? ", thinned" : "", max_age ? ", at most " : "", max_age ? max_age : "");
	backup_plan_describe(&plan, schedule, when, sizeof(when));
	if (!once)
		log_line("backup scheduler started: %s into %s, %s%s", when, dir, keep,
			 compress ? ", gzip" : "");
	backup_stats bs = {0};
	int last = 0;
	double next = now_mono();
	if (!once && plan.bp_cron_on) {
		/* A cron schedule's first backup is at its first matching minute, not now. */
		time_t at;
		backup_cron_next(&plan.bp_cron, time(NULL), utc, &at);
		char w[40];
		fmt_when(at, utc, w, sizeof(w));
		log_line("next backup at %s", w);
		sleep_until_wall(at);
	}
	while (!stop_requested) {
		double start = now_mono();
		last = backup_once(&bc, &bs);
		bs.bs_last_attempt = now_wall();
		if (metrics && backup_metrics_write(metrics, &bs, eb, sizeof(eb)) != 0)
			log_line("metrics not written: %s", eb);
		metrics_server_publish(&ms, &bs);
		if (once)
			break;
		if (plan.bp_cron_on) {
			time_t at;
			if (backup_cron_next(&plan.bp_cron, time(NULL), utc, &at) != 0)
				break; /* checked at start-up; only a clock gone wild gets here */
			sleep_until_wall(at);
			continue;
		}
		next = backup_plan_next_interval(&plan, next, start, now_mono());
		sleep_until_mono(next);
	}
	if (!once)
		log_line("backup scheduler stopped");
	metrics_server_stop(&ms);
	backup_dir_close(&bc.bc_dir);
	ku_conn_opts_free(&bc.bc_conn);
	free(buf);
	return last ? 1 : 0;
fail:
	backup_dir_close(&bc.bc_dir);
	ku_conn_opts_free(&bc.bc_conn);
	free(buf);
	return 1;
}
