/*
 * backup.c - scheduled backups taken by the member itself (--backup-dir and the other
 * --backup-* flags, after `keelsonutl backup`'s options; README "Backups and disaster
 * recovery").
 *
 * One thread of its own takes each backup, so the node loop never waits for one, and only
 * one runs at a time. A backup is the file Maintenance.Snapshot streams (snapshot_write():
 * one LMDB read transaction, etcd's backend format) followed by its SHA-256, exactly what
 * `etcdctl snapshot save` stores: it is written to DIR/STAMP.snapshot.part, fsynced,
 * checked page by page with its trailer (storage_etcd_check), renamed to STAMP.snapshot,
 * and then made a backup by backup/backup.h (the name by time and revision, gzip, `latest`,
 * retention, the directory fsync) - the same code keelsonutl's scheduler runs.
 *
 * The store: while the read transaction is open, storage_defragment() and storage_install()
 * (which take the environment exclusively) would wait for it on the node loop. So the loop
 * calls server_backup_pause() first: the backup's write callback sees the cancel flag and
 * returns, the transaction ends within one write, and the backup is taken again once the
 * loop resumes it. A cancelled backup is not a failure; it is retried at once.
 */
#define _GNU_SOURCE /* %m */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/prctl.h>

#include "backup/backup.h"
#include "server/server.h"

/* What the write callback returns when the node loop wants the store back. */
#define BACKUP_CANCELLED 1

struct server_backup {
	server_ctx *sb_sc;
	backup_dir sb_dir;
	backup_plan sb_plan;
	backup_keep sb_keep;
	pthread_t sb_thread;

	pthread_mutex_t sb_mu;
	pthread_cond_t sb_cv;
	int sb_stop;           /* under sb_mu: the thread ends */
	int sb_paused;         /* under sb_mu: no backup may open a read transaction */
	int sb_reading;        /* under sb_mu: a backup holds a read transaction */
	_Atomic int sb_cancel; /* read by the write callback without the lock */
	backup_stats sb_stats; /* under sb_mu */
};

static double now_wall(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double now_mono(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

typedef struct file_sink {
	server_backup *fs_b;
	int fs_fd;
	storage_sha256 fs_sha;
	int fs_errno;
} file_sink;

static int write_all(file_sink *f, const void *buf, size_t len)
{
	const char *p = buf;
	while (len > 0) {
		ssize_t n = write(f->fs_fd, p, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			f->fs_errno = errno;
			return STORAGE_ERR_IO;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static int sink_write(void *ctx, const void *buf, size_t len)
{
	file_sink *f = ctx;
	if (atomic_load(&f->fs_b->sb_cancel))
		return BACKUP_CANCELLED;
	storage_sha256_update(&f->fs_sha, buf, len);
	return write_all(f, buf, len);
}

/* Writes the snapshot with its trailer to the slot's part file while holding the store
 * (unless paused: waits), fsyncs and checks it, and renames it to bs_plain. */
static int take_snapshot(server_backup *b, const backup_slot *slot, storage_etcd_file_info *info,
			 char *eb, size_t elen)
{
	file_sink f = {b, -1, {0}, 0};
	f.fs_fd = open(slot->bs_part, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (f.fs_fd < 0) {
		snprintf(eb, elen, "create %s: %m", slot->bs_part);
		return STORAGE_ERR_IO;
	}
	if (storage_sha256_init(&f.fs_sha) != 0) {
		close(f.fs_fd);
		snprintf(eb, elen, "out of memory");
		return STORAGE_ERR_NOMEM;
	}
	pthread_mutex_lock(&b->sb_mu);
	while (b->sb_paused && !b->sb_stop)
		pthread_cond_wait(&b->sb_cv, &b->sb_mu);
	int rc = b->sb_stop ? BACKUP_CANCELLED : 0;
	if (rc == 0) {
		b->sb_reading = 1;
		atomic_store(&b->sb_cancel, 0);
	}
	pthread_mutex_unlock(&b->sb_mu);
	uint64_t size = 0;
	if (rc == 0)
		rc = snapshot_write(b->sb_sc, sink_write, &f, &size);
	pthread_mutex_lock(&b->sb_mu);
	b->sb_reading = 0;
	pthread_cond_broadcast(&b->sb_cv);
	pthread_mutex_unlock(&b->sb_mu);

	uint8_t digest[32];
	storage_sha256_final(&f.fs_sha, digest);
	if (rc == 0) /* etcdctl's file: the backend followed by its SHA-256 */
		rc = write_all(&f, digest, sizeof(digest));
	if (rc == STORAGE_ERR_IO) {
		errno = f.fs_errno;
		snprintf(eb, elen, "write %s: %m", slot->bs_part);
	}
	if (rc == 0 && fsync(f.fs_fd) != 0) {
		snprintf(eb, elen, "fsync %s: %m", slot->bs_part);
		rc = STORAGE_ERR_IO;
	}
	if (close(f.fs_fd) != 0 && rc == 0) {
		snprintf(eb, elen, "close %s: %m", slot->bs_part);
		rc = STORAGE_ERR_IO;
	}
	if (rc == BACKUP_CANCELLED)
		return rc;
	if (rc != 0 && rc != STORAGE_ERR_IO)
		snprintf(eb, elen, "snapshot: %s", storage_strerror(rc));
	if (rc == 0) {
		/* Read back as a restore reads it: a file that fails here is never named. */
		char ceb[512] = "";
		int err = storage_etcd_check(slot->bs_part, STORAGE_ETCD_HASH_REQUIRE, info, ceb, sizeof(ceb));
		if (err) {
			snprintf(eb, elen, "the written snapshot fails its check: %s", ceb[0] ? ceb : storage_strerror(err));
			rc = err;
		}
	}
	if (rc == 0 && rename(slot->bs_part, slot->bs_plain) != 0) {
		snprintf(eb, elen, "rename %s: %m", slot->bs_part);
		rc = STORAGE_ERR_IO;
	}
	return rc;
}

/* One backup; its log line; the stats. Returns BACKUP_CANCELLED if paused or stopped. */
static int backup_once(server_backup *b)
{
	char eb[5000] = "";
	double t0 = now_mono();
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	backup_slot slot;
	backup_slot_init(&b->sb_dir, &ts, &slot);
	storage_etcd_file_info info;
	memset(&info, 0, sizeof(info));
	int rc = take_snapshot(b, &slot, &info, eb, sizeof(eb));
	backup_commit_result cr;
	if (rc == 0 && backup_dir_commit(&b->sb_dir, &slot, info.ef_store_revision, &b->sb_keep,
					  (int64_t)(now_wall() * 1000), &cr, eb, sizeof(eb)) != 0)
		rc = STORAGE_ERR_IO;
	if (rc)
		backup_slot_discard(&slot);
	if (rc == BACKUP_CANCELLED)
		return rc;
	double took = now_mono() - t0;
	pthread_mutex_lock(&b->sb_mu);
	backup_stats *bs = &b->sb_stats;
	bs->bs_last_attempt = now_wall();
	if (rc) {
		bs->bs_failures++;
		bs->bs_last_ok = 0;
	} else {
		bs->bs_successes++;
		bs->bs_last_ok = 1;
		bs->bs_last_success = bs->bs_last_attempt;
		bs->bs_last_duration = took;
		bs->bs_last_size = cr.bc_file_bytes;
		bs->bs_last_revision = info.ef_store_revision;
		bs->bs_kept = cr.bc_kept;
	}
	pthread_mutex_unlock(&b->sb_mu);
	char t[32];
	snprintf(t, sizeof(t), "%.3fs", took);
	if (rc) {
		log_at(LOG_ERROR, "backup failed", "dir", b->sb_dir.bd_path, "error", eb, "took", t, NULL);
		return rc;
	}
	char path[4400], rev[32], size[32], hash[16], kept[16], removed[16];
	snprintf(path, sizeof(path), "%s/%s", b->sb_dir.bd_path, cr.bc_name);
	snprintf(rev, sizeof(rev), "%" PRId64, info.ef_store_revision);
	snprintf(size, sizeof(size), "%" PRIu64, cr.bc_file_bytes);
	snprintf(hash, sizeof(hash), "%x", info.ef_hash);
	snprintf(kept, sizeof(kept), "%d", cr.bc_kept);
	snprintf(removed, sizeof(removed), "%d", cr.bc_removed);
	log_at(LOG_INFO, "saved backup", "path", path, "revision", rev, "size-bytes", size, "hash", hash,
	       "took", t, "kept", kept, "removed", removed, NULL);
	return 0;
}

/* Waits until the monotonic time `until` (or the wall-clock time `wall_until` when not 0,
 * re-read every second so that a clock step moves the wake-up), or a stop. Returns 1 if
 * stopped. Called with sb_mu held. */
static int wait_locked(server_backup *b, double until, time_t wall_until)
{
	while (!b->sb_stop) {
		double left = wall_until ? (double)wall_until - now_wall() : until - now_mono();
		if (left <= 0)
			return 0;
		if (left > 1)
			left = 1;
		struct timespec at;
		clock_gettime(CLOCK_REALTIME, &at);
		double ns = (double)at.tv_nsec + left * 1e9;
		at.tv_sec += (time_t)(ns / 1e9);
		at.tv_nsec = (long)(ns - (double)(time_t)(ns / 1e9) * 1e9);
		pthread_cond_timedwait(&b->sb_cv, &b->sb_mu, &at);
	}
	return 1;
}

static void *backup_thread(void *arg)
{
	prctl(PR_SET_NAME, "backup"); /* names the thread in top -H, perf, gdb */
	server_backup *b = arg;
	const backup_plan *p = &b->sb_plan;
	double due = now_mono();
	pthread_mutex_lock(&b->sb_mu);
	for (;;) {
		time_t wall = 0;
		if (p->bp_cron_on && backup_cron_next(&p->bp_cron, time(NULL), p->bp_utc, &wall) != 0)
			break; /* checked at start-up; only a clock gone wild gets here */
		if (wait_locked(b, due, wall))
			break;
		pthread_mutex_unlock(&b->sb_mu);
		double start = now_mono();
		int rc;
		/* A backup the node loop cancelled (defragment, snapshot install) is taken again
		 * as soon as it lets go of the store. */
		while ((rc = backup_once(b)) == BACKUP_CANCELLED) {
			pthread_mutex_lock(&b->sb_mu);
			int stop = b->sb_stop;
			pthread_mutex_unlock(&b->sb_mu);
			if (stop)
				break;
			log_at(LOG_INFO, "backup interrupted by a defragment or snapshot install; taking it again", NULL);
		}
		pthread_mutex_lock(&b->sb_mu);
		if (!p->bp_cron_on)
			due = backup_plan_next_interval(p, due, start, now_mono());
	}
	pthread_mutex_unlock(&b->sb_mu);
	return NULL;
}

int server_backup_start(server_backup **out, server_ctx *sc)
{
	const config *cfg = sc->cfg;
	*out = NULL;
	if (cfg->backup_dir == NULL || cfg->backup_dir[0] == '\0')
		return 0;
	server_backup *b = calloc(1, sizeof(*b));
	if (b == NULL)
		return STORAGE_ERR_NOMEM;
	char eb[512];
	b->sb_sc = sc;
	/* config.c checked these; parsed again here for their values */
	if (backup_plan_parse(&b->sb_plan, cfg->backup_interval, cfg->backup_schedule, cfg->backup_utc,
			      "--backup-", eb, sizeof(eb)) != 0) {
		log_at(LOG_ERROR, "invalid backup settings", "error", eb, NULL);
		free(b);
		return STORAGE_ERR_INVALID;
	}
	double age = 0;
	if (cfg->backup_max_age && cfg->backup_max_age[0])
		backup_parse_duration(cfg->backup_max_age, &age);
	b->sb_keep.bk_retention.rp_retain = (int)cfg->backup_retain;
	b->sb_keep.bk_retention.rp_max_age = age;
	b->sb_keep.bk_retention.rp_thin = cfg->backup_thin;
	b->sb_keep.bk_compress = cfg->backup_compress;
	if (backup_dir_open(&b->sb_dir, cfg->backup_dir, eb, sizeof(eb)) != 0) {
		log_at(LOG_ERROR, "cannot use the backup directory", "dir", cfg->backup_dir, "error", eb, NULL);
		free(b);
		return STORAGE_ERR_IO;
	}
	pthread_mutex_init(&b->sb_mu, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_cond_init(&b->sb_cv, &ca);
	pthread_condattr_destroy(&ca);
	if (pthread_create(&b->sb_thread, NULL, backup_thread, b) != 0) {
		backup_dir_close(&b->sb_dir);
		pthread_cond_destroy(&b->sb_cv);
		pthread_mutex_destroy(&b->sb_mu);
		free(b);
		return STORAGE_ERR_NOMEM;
	}
	char when[256], retain[32];
	backup_plan_describe(&b->sb_plan, cfg->backup_schedule, when, sizeof(when));
	snprintf(retain, sizeof(retain), "%llu", (unsigned long long)cfg->backup_retain);
	log_at(LOG_INFO, "scheduled backups started", "dir", cfg->backup_dir, "when", when, "retain", retain,
	       "max-age", cfg->backup_max_age && cfg->backup_max_age[0] ? cfg->backup_max_age : "none",
	       "thin", cfg->backup_thin ? "true" : "false", "compress", cfg->backup_compress ? "true" : "false",
	       NULL);
	*out = b;
	return 0;
}

void server_backup_stop(server_backup *b)
{
	if (b == NULL)
		return;
	pthread_mutex_lock(&b->sb_mu);
	b->sb_stop = 1;
	atomic_store(&b->sb_cancel, 1);
	pthread_cond_broadcast(&b->sb_cv);
	pthread_mutex_unlock(&b->sb_mu);
	pthread_join(b->sb_thread, NULL);
	backup_dir_close(&b->sb_dir);
	pthread_cond_destroy(&b->sb_cv);
	pthread_mutex_destroy(&b->sb_mu);
	free(b);
}

void server_backup_pause(server_backup *b)
{
	if (b == NULL)
		return;
	pthread_mutex_lock(&b->sb_mu);
	b->sb_paused = 1;
	atomic_store(&b->sb_cancel, 1);
	while (b->sb_reading)
		pthread_cond_wait(&b->sb_cv, &b->sb_mu);
	pthread_mutex_unlock(&b->sb_mu);
}

void server_backup_resume(server_backup *b)
{
	if (b == NULL)
		return;
	pthread_mutex_lock(&b->sb_mu);
	b->sb_paused = 0;
	pthread_cond_broadcast(&b->sb_cv);
	pthread_mutex_unlock(&b->sb_mu);
}

size_t server_backup_metrics(server_backup *b, char *buf, size_t len)
{
	if (b == NULL || len == 0)
		return 0;
	pthread_mutex_lock(&b->sb_mu);
	backup_stats bs = b->sb_stats;
	pthread_mutex_unlock(&b->sb_mu);
	return backup_metrics_format(&bs, buf, len);
}
