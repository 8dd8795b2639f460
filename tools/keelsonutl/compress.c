/*
 * compress.c - gzip for backups (zlib): a compressed copy written as atomically as the
 * snapshot itself, and the transparent reading side (status and restore take a .gz as they
 * take the plain file, by looking at the magic bytes, not the name).
 */
#define _GNU_SOURCE /* %m */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <zlib.h>

#include "backup/backup.h"
#include "tools/keelsonutl/keelsonutl.h"

#define CHUNK (256 * 1024)

int ku_is_gzip(const char *path)
{
	unsigned char m[2];
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t n = read(fd, m, 2);
	close(fd);
	return n == 2 && m[0] == 0x1f && m[1] == 0x8b;
}

static void gzip_progress(void *ctx, uint64_t done, uint64_t total)
{
	ku_progress *pg = ctx;
	if (done == 0)
		ku_progress_start(pg, "compressing", total);
	else
		ku_progress_update(pg, done, 0);
}

int ku_gzip_file(const char *src, const char *dst, uint64_t *out_bytes, char *errbuf,
		 size_t errlen)
{
	ku_progress pg;
	memset(&pg, 0, sizeof(pg));
	int rc = backup_gzip_file(src, dst, gzip_progress, &pg, out_bytes, errbuf, errlen);
	ku_progress_end(&pg);
	if (rc == BACKUP_ERR_NOMEM)
		return KU_ERR_NOMEM;
	return rc ? KU_ERR_IO : 0;
}

int ku_gunzip_to_temp(const char *src, const char *dir, char *tmp, size_t tmplen, char *errbuf,
		      size_t errlen)
{
	if (dir == NULL)
		dir = getenv("TMPDIR");
	if (dir == NULL || *dir == '\0')
		dir = "/tmp";
	if (snprintf(tmp, tmplen, "%s/keelsonutl-gunzip-XXXXXX", dir) >= (int)tmplen)
		return ku_errf(errbuf, errlen, KU_ERR_USAGE, "TMPDIR too long");
	int out = mkstemp(tmp);
	if (out < 0)
		return ku_errf(errbuf, errlen, KU_ERR_IO, "mkstemp %s: %m", tmp);
	int in = open(src, O_RDONLY | O_CLOEXEC);
	gzFile gz = in < 0 ? NULL : gzdopen(in, "rb");
	if (gz == NULL) {
		int rc = ku_errf(errbuf, errlen, KU_ERR_IO, "open %s: %m", src);
		if (in >= 0)
			close(in);
		close(out);
		unlink(tmp);
		return rc;
	}
	ku_progress pg;
	ku_progress_start(&pg, "decompressing", 0); /* gzip does not say its full size up front */
	int rc = 0;
	uint64_t done = 0;
	char *buf = malloc(CHUNK);
	if (buf == NULL)
		rc = ku_errf(errbuf, errlen, KU_ERR_NOMEM, "out of memory");
	while (rc == 0) {
		int n = gzread(gz, buf, CHUNK);
		if (n < 0) {
			int ze;
			const char *m = gzerror(gz, &ze);
			rc = ku_errf(errbuf, errlen, KU_ERR_CORRUPT, "%s: gzip data is damaged (%s)", src,
				     ze == Z_ERRNO ? strerror(errno) : m);
			break;
		}
		if (n == 0)
			break;
		const char *p = buf;
		size_t left = (size_t)n;
		while (left && rc == 0) {
			ssize_t w = write(out, p, left);
			if (w < 0 && errno == EINTR)
				continue;
			if (w < 0)
				rc = ku_errf(errbuf, errlen, KU_ERR_IO, "write %s: %m", tmp);
			else {
				p += w;
				left -= (size_t)w;
			}
		}
		done += (uint64_t)n;
		ku_progress_update(&pg, done, 0);
	}
	ku_progress_end(&pg);
	/* gzread returns 0 at a cut-off stream too; zlib then reports Z_BUF_ERROR. */
	if (rc == 0) {
		int ze;
		const char *m = gzerror(gz, &ze);
		if (ze != Z_OK && ze != Z_STREAM_END)
			rc = ku_errf(errbuf, errlen, KU_ERR_CORRUPT, "%s: gzip data is damaged (%s)",
				     src, m);
	}
	int zc = gzclose(gz);
	if (rc == 0 && zc != Z_OK)
		rc = ku_errf(errbuf, errlen, KU_ERR_CORRUPT,
			     "%s: gzip stream is truncated or damaged", src);
	free(buf);
	close(out);
	if (rc)
		unlink(tmp);
	return rc;
}

int ku_open_snapshot(const char *path, const char *dir, char *tmp, size_t tmplen,
		     const char **plain, char *errbuf, size_t errlen)
{
	tmp[0] = '\0';
	*plain = path;
	if (!ku_is_gzip(path))
		return 0;
	int rc = ku_gunzip_to_temp(path, dir, tmp, tmplen, errbuf, errlen);
	if (rc) {
		tmp[0] = '\0';
		return rc;
	}
	*plain = tmp;
	return 0;
}
