/*
 * dir.c - the backup directory: the lock, the leftovers of interrupted backups, a finished
 * snapshot made into a named (and maybe compressed) backup, `latest`, and retention.
 */
#define _GNU_SOURCE /* nftw, %m */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <zlib.h>

#include "backup/backup.h"

#define GZ_CHUNK (256 * 1024)

static int errf(char *errbuf, size_t errlen, int code, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
static int errf(char *errbuf, size_t errlen, int code, const char *fmt, ...)
{
	if (errbuf && errlen) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(errbuf, errlen, fmt, ap);
		va_end(ap);
	}
	return code;
}

int backup_fsync_dir(const char *dir, char *errbuf, size_t errlen)
{
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return errf(errbuf, errlen, BACKUP_ERR_IO, "open %s: %m", dir);
	int rc = fsync(fd);
	close(fd);
	if (rc != 0)
		return errf(errbuf, errlen, BACKUP_ERR_IO, "fsync %s: %m", dir);
	return 0;
}

int backup_name_parse(const char *s, int64_t *ms)
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

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	return remove(path);
}

static int ends_with(const char *s, size_t n, const char *suffix)
{
	size_t k = strlen(suffix);
	return n > k && strcmp(s + n - k, suffix) == 0;
}

/* Removes leftovers of interrupted backups. Only called with the lock held. */
static void remove_leftovers(const char *dir)
{
	DIR *d = opendir(dir);
	if (d == NULL)
		return;
	struct dirent *e;
	char path[PATH_MAX + 300];
	while ((e = readdir(d)) != NULL) {
		size_t n = strlen(e->d_name);
		int snap = ends_with(e->d_name, n, ".snapshot") || ends_with(e->d_name, n, ".snapshot.part") ||
			   ends_with(e->d_name, n, ".snapshot.gz.part") ||
			   strcmp(e->d_name, "latest.tmp") == 0 || strcmp(e->d_name, "metrics.tmp") == 0;
		int scratch = strncmp(e->d_name, ".verify-", 8) == 0;
		if (!snap && !scratch)
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
		if (scratch)
			nftw(path, rm_one, 16, FTW_DEPTH | FTW_PHYS);
		else
			unlink(path);
	}
	closedir(d);
}

int backup_dir_open(backup_dir *d, const char *dir, char *errbuf, size_t errlen)
{
	memset(d, 0, sizeof(*d));
	d->bd_lock_fd = -1;
	if (snprintf(d->bd_path, sizeof(d->bd_path), "%s", dir) >= (int)sizeof(d->bd_path) - 64)
		return errf(errbuf, errlen, BACKUP_ERR_USAGE, "backup directory path too long");
	if (mkdir(dir, 0700) != 0 && errno != EEXIST)
		return errf(errbuf, errlen, BACKUP_ERR_IO, "mkdir %s: %m", dir);
	char lockpath[PATH_MAX];
	snprintf(lockpath, sizeof(lockpath), "%s/.backup.lock", dir);
	d->bd_lock_fd = open(lockpath, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (d->bd_lock_fd < 0)
		return errf(errbuf, errlen, BACKUP_ERR_IO, "%s: %m", lockpath);
	if (flock(d->bd_lock_fd, LOCK_EX | LOCK_NB) != 0) {
		close(d->bd_lock_fd);
		d->bd_lock_fd = -1;
		return errf(errbuf, errlen, BACKUP_ERR_BUSY, "%s: another backup is running on this directory",
			    lockpath);
	}
	remove_leftovers(dir);
	return 0;
}

void backup_dir_close(backup_dir *d)
{
	if (d->bd_lock_fd >= 0)
		close(d->bd_lock_fd);
	d->bd_lock_fd = -1;
}

void backup_slot_init(const backup_dir *d, const struct timespec *now, backup_slot *s)
{
	struct tm tm;
	gmtime_r(&now->tv_sec, &tm);
	strftime(s->bs_stamp, sizeof(s->bs_stamp), "%Y%m%dT%H%M%S", &tm);
	size_t n = strlen(s->bs_stamp);
	snprintf(s->bs_stamp + n, sizeof(s->bs_stamp) - n, ".%03ldZ", now->tv_nsec / 1000000);
	snprintf(s->bs_plain, sizeof(s->bs_plain), "%s/%s.snapshot", d->bd_path, s->bs_stamp);
	snprintf(s->bs_part, sizeof(s->bs_part), "%s.part", s->bs_plain);
}

void backup_slot_discard(const backup_slot *s)
{
	char gz[sizeof(s->bs_plain) + 16];
	snprintf(gz, sizeof(gz), "%s.gz.part", s->bs_plain);
	unlink(s->bs_part);
	unlink(s->bs_plain);
	unlink(gz);
}

int backup_gzip_file(const char *src, const char *dst, backup_progress_fn progress, void *ctx,
		     uint64_t *out_bytes, char *errbuf, size_t errlen)
{
	int in = open(src, O_RDONLY | O_CLOEXEC);
	if (in < 0)
		return errf(errbuf, errlen, BACKUP_ERR_IO, "open %s: %m", src);
	int out = open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (out < 0) {
		int rc = errf(errbuf, errlen, BACKUP_ERR_IO, "create %s: %m", dst);
		close(in);
		return rc;
	}
	struct stat st;
	uint64_t total = fstat(in, &st) == 0 ? (uint64_t)st.st_size : 0, done = 0;
	if (progress)
		progress(ctx, 0, total);
	/* gzdopen takes its own descriptor so that ours stays open for the fsync. */
	int gfd = dup(out);
	gzFile gz = gfd < 0 ? NULL : gzdopen(gfd, "wb6");
	int rc = 0;
	char *buf = malloc(GZ_CHUNK);
	if (gz == NULL || buf == NULL) {
		if (gfd >= 0 && gz == NULL)
			close(gfd);
		rc = errf(errbuf, errlen, BACKUP_ERR_NOMEM, "gzip %s: cannot start", dst);
	}
	while (rc == 0) {
		ssize_t n = read(in, buf, GZ_CHUNK);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			rc = errf(errbuf, errlen, BACKUP_ERR_IO, "read %s: %m", src);
			break;
		}
		if (n == 0)
			break;
		if (gzwrite(gz, buf, (unsigned)n) != (int)n) {
			int ze;
			const char *m = gzerror(gz, &ze);
			rc = errf(errbuf, errlen, BACKUP_ERR_IO, "write %s: %s", dst,
				  ze == Z_ERRNO ? strerror(errno) : m);
			break;
		}
		done += (uint64_t)n;
		if (progress)
			progress(ctx, done, total);
	}
	free(buf);
	if (gz && gzclose(gz) != Z_OK && rc == 0)
		rc = errf(errbuf, errlen, BACKUP_ERR_IO, "write %s: gzclose failed", dst);
	if (rc == 0 && fsync(out) != 0)
		rc = errf(errbuf, errlen, BACKUP_ERR_IO, "fsync %s: %m", dst);
	if (rc == 0 && out_bytes && fstat(out, &st) == 0)
		*out_bytes = (uint64_t)st.st_size;
	close(out);
	close(in);
	if (rc)
		unlink(dst);
	return rc;
}

/* Applies the retention policy to DIR's backups at now_ms; returns how many were removed
 * (or -1), *kept gets how many remain. */
static int apply_retention(const char *dir, const backup_retention *pol, int64_t now_ms,
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
		if (!backup_name_parse(e->d_name, &ms))
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
	int k = keep ? backup_retention_select(times, n, pol, now_ms, keep) : -1;
	int removed = k < 0 ? -1 : 0;
	char path[PATH_MAX + 300];
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
	char tmp[PATH_MAX + 16], latest[PATH_MAX + 16];
	snprintf(tmp, sizeof(tmp), "%s/latest.tmp", dir);
	snprintf(latest, sizeof(latest), "%s/latest", dir);
	unlink(tmp);
	if (symlink(name, tmp) != 0)
		return errf(errbuf, errlen, BACKUP_ERR_IO, "symlink %s: %m", tmp);
	if (rename(tmp, latest) != 0) {
		unlink(tmp);
		return errf(errbuf, errlen, BACKUP_ERR_IO, "rename %s to %s: %m", tmp, latest);
	}
	return 0;
}

int backup_dir_commit(const backup_dir *d, const backup_slot *s, int64_t revision,
		      const backup_keep *k, int64_t now_ms, backup_commit_result *r,
		      char *errbuf, size_t errlen)
{
	char gzpart[sizeof(s->bs_plain) + 16], final[PATH_MAX + 160];
	memset(r, 0, sizeof(*r));
	snprintf(gzpart, sizeof(gzpart), "%s.gz.part", s->bs_plain);
	snprintf(r->bc_name, sizeof(r->bc_name), "%s-rev%" PRId64 ".db%s", s->bs_stamp, revision,
		 k->bk_compress ? ".gz" : "");
	snprintf(final, sizeof(final), "%s/%s", d->bd_path, r->bc_name);
	const char *src = s->bs_plain;
	struct stat st;
	int rc = stat(s->bs_plain, &st) == 0 ? 0 : errf(errbuf, errlen, BACKUP_ERR_IO, "stat %s: %m", s->bs_plain);
	r->bc_file_bytes = rc == 0 ? (uint64_t)st.st_size : 0;
	if (rc == 0 && k->bk_compress) {
		unlink(gzpart); /* a stale one of an interrupted run is ours to replace */
		rc = backup_gzip_file(s->bs_plain, gzpart, NULL, NULL, &r->bc_file_bytes, errbuf, errlen);
		src = gzpart;
	}
	if (rc == 0 && rename(src, final) != 0)
		rc = errf(errbuf, errlen, BACKUP_ERR_IO, "rename %s to %s: %m", src, final);
	backup_slot_discard(s);
	if (rc)
		return rc;
	rc = point_latest(d->bd_path, r->bc_name, errbuf, errlen);
	/* The new backup's name is durable before any older backup goes: a crash in between
	 * must never leave fewer whole backups than the retention promised. */
	if (rc == 0)
		rc = backup_fsync_dir(d->bd_path, errbuf, errlen);
	if (rc == 0) {
		r->bc_removed = apply_retention(d->bd_path, &k->bk_retention, now_ms, &r->bc_kept);
		if (r->bc_removed < 0)
			r->bc_removed = 0;
		rc = backup_fsync_dir(d->bd_path, errbuf, errlen);
	}
	return rc;
}
