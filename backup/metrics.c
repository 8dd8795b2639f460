/*
 * metrics.c - the keelson_backup_* metrics in Prometheus' text format: served on the
 * server's /metrics, and by keelsonutl backup in a file or on its own small endpoint.
 */
#define _GNU_SOURCE /* %m */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "backup/backup.h"

size_t backup_metrics_format(const backup_stats *bs, char *buf, size_t len)
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

int backup_metrics_write(const char *path, const backup_stats *bs, char *errbuf, size_t errlen)
{
	char tmp[PATH_MAX], text[4096], dir[PATH_MAX];
	if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp)) {
		snprintf(errbuf, errlen, "metrics file path too long");
		return BACKUP_ERR_USAGE;
	}
	size_t tl = backup_metrics_format(bs, text, sizeof(text));
	FILE *f = fopen(tmp, "w");
	if (f == NULL) {
		snprintf(errbuf, errlen, "open %s: %m", tmp);
		return BACKUP_ERR_IO;
	}
	fwrite(text, 1, tl, f);
	int rc = 0;
	if (fflush(f) != 0 || ferror(f) || fsync(fileno(f)) != 0) {
		snprintf(errbuf, errlen, "write %s: %m", tmp);
		rc = BACKUP_ERR_IO;
	}
	if (fclose(f) != 0 && rc == 0) {
		snprintf(errbuf, errlen, "close %s: %m", tmp);
		rc = BACKUP_ERR_IO;
	}
	if (rc == 0 && rename(tmp, path) != 0) {
		snprintf(errbuf, errlen, "rename %s to %s: %m", tmp, path);
		rc = BACKUP_ERR_IO;
	}
	if (rc) {
		unlink(tmp);
		return rc;
	}
	snprintf(dir, sizeof(dir), "%s", path);
	char *slash = strrchr(dir, '/');
	if (slash == NULL)
		snprintf(dir, sizeof(dir), ".");
	else if (slash == dir)
		slash[1] = '\0';
	else
		*slash = '\0';
	return backup_fsync_dir(dir, errbuf, errlen);
}
