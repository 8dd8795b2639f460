/*
 * backup.h - scheduled backups into a directory, shared by `keelsonutl backup` (which takes
 * each snapshot from a cluster over gRPC) and the server's --backup-* flags (which take it
 * locally): when a backup is due (an interval or a cron expression), how a finished
 * snapshot becomes a backup (named by time and revision, compressed, renamed into place
 * only when whole, the `latest` pointer), which backups retention keeps, and the metrics of
 * the last success. Where the snapshot comes from is the caller's business.
 *
 * schedule.c holds the pure decisions (no I/O, no clock of their own: every function takes
 * "now", so backup/schedule_test.c drives them with injected times); dir.c the directory;
 * metrics.c the Prometheus text.
 *
 * Errors: 0 is success; this module owns -2100..-2199, each failing call also writes a
 * one-line message into its errbuf.
 */
#ifndef KEELSON_BACKUP_BACKUP_H
#define KEELSON_BACKUP_BACKUP_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

enum {
	BACKUP_OK = 0,
	BACKUP_ERR_USAGE = -2100, /* an invalid setting (interval, schedule, retention) */
	BACKUP_ERR_IO = -2101,    /* a file operation failed (errno in the message) */
	BACKUP_ERR_BUSY = -2102,  /* another scheduler holds the directory's lock */
	BACKUP_ERR_NOMEM = -2103,
};

/* ---- cron (schedule.c) ----
 * Five fields, as crontab(5) writes them: minute (0-59), hour (0-23), day of month (1-31),
 * month (1-12 or jan-dec), day of week (0-7 or sun-sat; 0 and 7 are Sunday). Each field is
 * a list ("1,5,9") of "*", "N", "N-M", each optionally with a step "/S" ("*\/15", "1-30/2",
 * "5/10" meaning 5-max/10). Also @yearly, @annually, @monthly, @weekly, @daily, @midnight,
 * @hourly. As in Vixie cron, when both day fields are restricted (neither starts with "*")
 * a day matches if either matches; otherwise both must. */
typedef struct backup_cron {
	uint64_t kc_minutes; /* bit m: minute m */
	uint32_t kc_hours;   /* bit h */
	uint32_t kc_mdays;   /* bit d (1..31) */
	uint16_t kc_months;  /* bit m (1..12) */
	uint8_t kc_wdays;    /* bit w (0..6, Sunday 0) */
	int kc_mday_star;    /* the day-of-month field started with "*" */
	int kc_wday_star;
} backup_cron;

/* Returns 0, or -1 with a message in errbuf ("field 2 (hour): 24 out of range 0-23"). */
int backup_cron_parse(const char *expr, backup_cron *out, char *errbuf, size_t errlen);

/* The first whole minute strictly after `after` that matches, in UTC (utc != 0) or the
 * local time zone (a minute that a DST change skips is not run; one repeated runs once
 * per occurrence mktime reports). Returns 0, or -1 if nothing matches within 8 years
 * (e.g. "0 0 30 2 *"). */
int backup_cron_next(const backup_cron *c, time_t after, int utc, time_t *next);

/* ---- retention (schedule.c) ----
 * Given the finished backups (their times), decides which stay. The rule, in order:
 *   1. --thin: exponential thinning by age (now - time):
 *        younger than 1 hour:  all kept;
 *        1 hour to 1 day:      the oldest backup of each clock hour (UTC) is kept;
 *        1 day to 1 week:      the oldest of each UTC day;
 *        1 week to 8 weeks:    the oldest of each 7-day period counted from the Unix epoch;
 *        older:                the oldest of each 30-day period counted from the epoch.
 *      Buckets are fixed in time, so a kept backup stays kept as it ages within a tier; it
 *      competes again only when it moves to a coarser tier.
 *   2. --max-age D: backups older than D go.
 *   3. --retain N (N > 0): of what is left, only the newest N stay.
 *   4. The newest backup always stays, whatever 1-3 say (it is the newest whole one, and
 *      with --verify the newest verified one: failed backups never get a backup name).
 */
typedef struct backup_retention {
	int rp_retain;          /* 0: no count limit */
	double rp_max_age;      /* seconds; 0: no age limit */
	int rp_thin;
} backup_retention;

/* times[i] in milliseconds since the epoch, any order; keep[i] is set to 1 or 0.
 * Returns the number kept, or -1 when out of memory. */
int backup_retention_select(const int64_t *times, size_t n, const backup_retention *p,
			int64_t now_ms, int *keep);

/* ---- durations (schedule.c) ---- */
/* Go durations ("1h2m3.5s", "500ms", "2s"); a bare number is seconds. 0 or -1. */
int backup_parse_duration(const char *s, double *seconds);

/* ---- the plan: when backups are due (schedule.c) ---- */
typedef struct backup_plan {
	int bp_cron_on;     /* 1: bp_cron decides; 0: every bp_every seconds */
	backup_cron bp_cron;
	int bp_utc;         /* the cron expression is read in UTC (else local time) */
	double bp_every;    /* seconds, at least 0.1 */
} backup_plan;

/*
 * interval (a duration) and schedule (cron) are exclusive; neither: every hour. utc applies
 * to a schedule only. The flag names for messages come from prefix ("--" for keelsonutl,
 * "--backup-" for the server): "invalid --backup-interval 0s (a duration of at least 100ms)".
 * BACKUP_ERR_USAGE with the message; a cron expression that never matches is refused.
 */
int backup_plan_parse(backup_plan *p, const char *interval, const char *schedule, int utc,
		      const char *prefix, char *errbuf, size_t errlen);
/* "every 3600s" or "on \"0 * * * *\" (UTC)", for the scheduler's first log line. */
void backup_plan_describe(const backup_plan *p, const char *schedule, char *out, size_t len);
/*
 * With an interval: the monotonic time of the backup after the one due at `due` that
 * started at `start`, now being `now`; ticks missed while a backup ran long are skipped,
 * not bunched. With a schedule: unused (backup_cron_next on the wall clock).
 */
double backup_plan_next_interval(const backup_plan *p, double due, double start, double now);

/* ---- the directory (dir.c) ----
 * DIR holds finished backups named <UTC time>-rev<revision>.db (.db.gz compressed), e.g.
 * 20250101T120000.123Z-rev42.db, where the revision is the one a member restored from it
 * serves, and `latest`, a symlink to the newest. A file gets a backup name only when whole:
 * the snapshot is written to STAMP.snapshot.part and becomes STAMP.snapshot once checked
 * (the caller's part), then [compressed: STAMP.snapshot.gz.part, fsynced] the final name,
 * each a rename followed by a directory fsync; a crash never leaves a half backup that
 * looks whole, and the leftovers are removed when the directory is opened again. */

typedef struct backup_dir {
	char bd_path[4096];
	int bd_lock_fd;   /* DIR/.backup.lock, flock()ed: one scheduler per directory */
} backup_dir;

/* Creates DIR (0700) if needed, takes its lock (BACKUP_ERR_BUSY if held), and removes
 * the leftovers of interrupted backups (*.snapshot, *.snapshot.part, *.gz.part,
 * latest.tmp, .verify-* scratch dirs). */
int backup_dir_open(backup_dir *d, const char *dir, char *errbuf, size_t errlen);
void backup_dir_close(backup_dir *d);

/* Where one backup is made, named from the wall-clock time it starts at. */
typedef struct backup_slot {
	char bs_stamp[40];   /* 20250101T120000.123Z */
	char bs_plain[4200]; /* DIR/STAMP.snapshot: the checked, fsynced snapshot (trailer kept) */
	char bs_part[4208];  /* DIR/STAMP.snapshot.part: where it is written first */
} backup_slot;
void backup_slot_init(const backup_dir *d, const struct timespec *now, backup_slot *s);
/* Removes whatever of the slot's files exist (after a failure). */
void backup_slot_discard(const backup_slot *s);

typedef struct backup_keep {
	backup_retention bk_retention;
	int bk_compress;  /* gzip the backup */
} backup_keep;

typedef struct backup_commit_result {
	char bc_name[128];     /* the backup's name in DIR */
	uint64_t bc_file_bytes; /* its size (compressed if so) */
	int bc_kept, bc_removed; /* backups in DIR after retention, and removed by it */
} backup_commit_result;

/*
 * Turns the slot's checked snapshot (bs_plain, fsynced) into the backup of store revision
 * `revision`: compressed if asked, renamed to its backup name, `latest` pointed at it
 * (symlink latest.tmp, rename), retention applied at now_ms, and the directory fsynced.
 * The slot's temporary files are gone afterwards, whatever happened.
 */
int backup_dir_commit(const backup_dir *d, const backup_slot *s, int64_t revision,
		      const backup_keep *k, int64_t now_ms, backup_commit_result *r,
		      char *errbuf, size_t errlen);

/* 1 if name is a finished backup's ("...Z-rev42.db[.gz]"); *ms gets its time. */
int backup_name_parse(const char *name, int64_t *ms);

/* Receives the bytes done so far (0 total: unknown), for a progress line. */
typedef void (*backup_progress_fn)(void *ctx, uint64_t done, uint64_t total);
/* Writes src gzip-compressed to dst (created exclusively, 0600) and fsyncs it; dst is
 * removed on an error. *out_bytes (if not NULL) gets the compressed size. progress may be
 * NULL. */
int backup_gzip_file(const char *src, const char *dst, backup_progress_fn progress, void *ctx,
		     uint64_t *out_bytes, char *errbuf, size_t errlen);
/* fsync of a directory. */
int backup_fsync_dir(const char *dir, char *errbuf, size_t errlen);

/* ---- metrics (metrics.c) ---- */

/* What a scheduler reports; kept across the backups of one run. */
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

/* The keelson_backup_* metrics in Prometheus' text format; returns the length (the text is
 * cut at len - 1; 2 KiB always suffice). */
size_t backup_metrics_format(const backup_stats *bs, char *buf, size_t len);
/* Writes them to path atomically (PATH.tmp, fsync, rename, directory fsync): node_exporter's
 * textfile collector reads such a file. */
int backup_metrics_write(const char *path, const backup_stats *bs, char *errbuf, size_t errlen);

#endif
