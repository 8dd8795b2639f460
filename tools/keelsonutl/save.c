/*
 * save.c - `snapshot save`: a whole, checked, durable snapshot file or nothing.
 *
 * The stream is the etcd backend file followed by its SHA-256 (32 bytes). While it arrives
 * the bytes go to FILE.part and into a running SHA-256 of everything but the last 32 bytes
 * seen so far; at the end those 32 bytes must equal the digest. The file is then checked
 * page by page (storage_etcd_check), fsynced, renamed to FILE, and the directory fsynced.
 * The trailer is kept in FILE, as etcdctl keeps it, so `etcdctl snapshot restore` (which
 * verifies it) and `keelsonutl snapshot restore` both take the file. With --compress the
 * checked FILE.part is gzipped into FILE.gz.part (fsynced), which is renamed to FILE: the
 * plain file is checked before compression, so a compressed FILE is as sound as a plain one.
 * On a terminal a progress line shows the bytes received of the total the server announces.
 */
#define _GNU_SOURCE /* nftw, mkdtemp, %m */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backup/backup.h"
#include "tools/keelsonutl/keelsonutl.h"

typedef struct save_sink {
	int ss_fd;
	uint64_t ss_bytes;
	storage_sha256 ss_sha;
	uint8_t ss_tail[32]; /* the last bytes seen: the trailer if the stream ends now */
	size_t ss_tail_len;
	int ss_errno;
	ku_progress ss_progress;
} save_sink;

static int write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;
	while (len) {
		ssize_t n = write(fd, p, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static int save_write(void *ctx, const void *buf, size_t len, uint64_t remaining)
{
	save_sink *s = ctx;
	if (write_all(s->ss_fd, buf, len) != 0) {
		s->ss_errno = errno;
		return KU_ERR_IO;
	}
	s->ss_bytes += len;
	ku_progress_update(&s->ss_progress, s->ss_bytes, s->ss_bytes + remaining);
	const uint8_t *p = buf;
	if (len >= 32) {
		/* The old tail and all but the last 32 new bytes are file content. */
		storage_sha256_update(&s->ss_sha, s->ss_tail, s->ss_tail_len);
		storage_sha256_update(&s->ss_sha, p, len - 32);
		memcpy(s->ss_tail, p + len - 32, 32);
		s->ss_tail_len = 32;
		return 0;
	}
	size_t keep = s->ss_tail_len + len;
	if (keep > 32) {
		size_t out = keep - 32;
		storage_sha256_update(&s->ss_sha, s->ss_tail, out);
		memmove(s->ss_tail, s->ss_tail + out, s->ss_tail_len - out);
		s->ss_tail_len -= out;
	}
	memcpy(s->ss_tail + s->ss_tail_len, p, len);
	s->ss_tail_len += len;
	return 0;
}

int ku_fsync_dir(const char *dir, char *errbuf, size_t errlen)
{
	return backup_fsync_dir(dir, errbuf, errlen) ? KU_ERR_IO : 0;
}

int ku_fsync_parent(const char *path, char *errbuf, size_t errlen)
{
	char dir[PATH_MAX];
	snprintf(dir, sizeof(dir), "%s", path);
	char *slash = strrchr(dir, '/');
	if (slash == NULL)
		return ku_fsync_dir(".", errbuf, errlen);
	if (slash == dir)
		slash[1] = '\0';
	else
		*slash = '\0';
	return ku_fsync_dir(dir, errbuf, errlen);
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	return remove(path);
}

int ku_remove_tree(const char *path)
{
	return nftw(path, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

int ku_snapshot_save(const ku_conn_opts *o, const ku_save_opts *so, const char *path,
		     ku_save_result *res, char *errbuf, size_t errlen)
{
	char part[PATH_MAX], gzpart[PATH_MAX];
	memset(res, 0, sizeof(*res));
	if (snprintf(part, sizeof(part), "%s.part", path) >= (int)sizeof(part) ||
	    snprintf(gzpart, sizeof(gzpart), "%s.gz.part", path) >= (int)sizeof(gzpart))
		return ku_errf(errbuf, errlen, KU_ERR_USAGE, "path too long: %s", path);
	int compress = so && so->so_compress;
	save_sink s = {0};
	ku_progress_start(&s.ss_progress, "receiving snapshot", 0);
	if (so == NULL || !so->so_progress)
		s.ss_progress.pg_on = 0;
	s.ss_fd = open(part, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (s.ss_fd < 0)
		return ku_errf(errbuf, errlen, KU_ERR_IO, "could not open %s (%m)", part);
	if (storage_sha256_init(&s.ss_sha) != 0) {
		close(s.ss_fd);
		unlink(part);
		return ku_errf(errbuf, errlen, KU_ERR_NOMEM, "sha256: out of memory");
	}
	int rc = ku_snapshot_stream(o, save_write, &s, &res->sr_endpoint, errbuf, errlen);
	ku_progress_end(&s.ss_progress);
	uint8_t digest[32];
	storage_sha256_final(&s.ss_sha, digest);
	if (rc == KU_ERR_IO) {
		errno = s.ss_errno;
		ku_errf(errbuf, errlen, rc, "write %s: %m", part);
	}
	if (rc == 0 && s.ss_tail_len < 32)
		rc = ku_errf(errbuf, errlen, KU_ERR_CORRUPT,
			     "snapshot stream too short (%llu bytes): no SHA-256 trailer",
			     (unsigned long long)s.ss_bytes);
	if (rc == 0 && memcmp(digest, s.ss_tail, 32) != 0)
		rc = ku_errf(errbuf, errlen, KU_ERR_CORRUPT,
			     "snapshot from %s: SHA-256 mismatch (%llu bytes received): the stream "
			     "was damaged or cut short", o->co_endpoints[res->sr_endpoint],
			     (unsigned long long)s.ss_bytes);
	if (rc == 0 && fsync(s.ss_fd) != 0)
		rc = ku_errf(errbuf, errlen, KU_ERR_IO, "fsync %s: %m", part);
	if (close(s.ss_fd) != 0 && rc == 0)
		rc = ku_errf(errbuf, errlen, KU_ERR_IO, "close %s: %m", part);
	if (rc == 0) {
		char eb[512];
		int err = storage_etcd_check(part, STORAGE_ETCD_HASH_REQUIRE, &res->sr_info, eb, sizeof(eb));
		if (err)
			rc = ku_errf(errbuf, errlen, KU_ERR_CORRUPT, "the received snapshot fails its check: %s",
				     eb[0] ? eb : storage_strerror(err));
	}
	res->sr_file_bytes = s.ss_bytes;
	if (rc == 0 && compress) {
		/* The plain file was checked; its compressed copy takes its place. A stale
		 * .gz.part of an interrupted run is ours to replace. */
		unlink(gzpart);
		rc = ku_gzip_file(part, gzpart, &res->sr_file_bytes, errbuf, errlen);
		unlink(part);
		if (rc == 0 && rename(gzpart, path) != 0)
			rc = ku_errf(errbuf, errlen, KU_ERR_IO, "rename %s to %s: %m", gzpart, path);
		if (rc)
			unlink(gzpart);
	} else if (rc == 0 && rename(part, path) != 0) {
		rc = ku_errf(errbuf, errlen, KU_ERR_IO, "rename %s to %s: %m", part, path);
	}
	if (rc) {
		unlink(part);
		return rc;
	}
	res->sr_bytes = s.ss_bytes;
	return ku_fsync_parent(path, errbuf, errlen);
}
