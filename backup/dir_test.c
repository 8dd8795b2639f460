/*
 * dir_test.c - the backup directory: the lock, leftovers removed at open, commits named by
 * time and revision, `latest`, retention keeping exactly the retained set, compression, and
 * the plan's flag checks.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backup/backup.h"
#include "tests/unit/check.h"


static void write_file(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");
	fputs(text, f);
	fclose(f);
}

static int exists(const char *dir, const char *name)
{
	char p[8192];
	struct stat st;
	snprintf(p, sizeof(p), "%s/%s", dir, name);
	return lstat(p, &st) == 0;
}

/* Finished backups in dir. */
static int count_backups(const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	int n = 0;
	int64_t ms;
	while ((e = readdir(d)) != NULL)
		n += backup_name_parse(e->d_name, &ms);
	closedir(d);
	return n;
}

int main(void)
{
	char base[4096], eb[512];
	const char *t = getenv("TEST_TMPDIR");
	snprintf(base, sizeof(base), "%s/backupdirXXXXXX", t ? t : "/tmp");
	CHECK(mkdtemp(base) != NULL);
	char dir[4200];
	snprintf(dir, sizeof(dir), "%s/b", base);

	/* open creates, locks; a second open of the same dir is refused */
	backup_dir d, d2;
	CHECK(backup_dir_open(&d, dir, eb, sizeof(eb)) == 0);
	CHECK(backup_dir_open(&d2, dir, eb, sizeof(eb)) == BACKUP_ERR_BUSY);
	CHECK(strstr(eb, "another backup") != NULL);

	/* leftovers of a crash go at the next open; finished backups stay */
	char p[8400];
	const char *leftovers[] = {"20250101T000000.000Z.snapshot.part", "20250101T000000.000Z.snapshot",
				   "20250101T000000.000Z.snapshot.gz.part", "latest.tmp"};
	for (size_t i = 0; i < 4; i++) {
		snprintf(p, sizeof(p), "%s/%s", dir, leftovers[i]);
		write_file(p, "half");
	}
	snprintf(p, sizeof(p), "%s/20250101T000000.000Z-rev5.db", dir);
	write_file(p, "whole");
	backup_dir_close(&d);
	CHECK(backup_dir_open(&d, dir, eb, sizeof(eb)) == 0);
	for (size_t i = 0; i < 4; i++)
		CHECK(!exists(dir, leftovers[i]));
	CHECK(exists(dir, "20250101T000000.000Z-rev5.db"));
	unlink(p);

	/* five commits, --retain 3: exactly the newest three stay, latest is the newest */
	backup_keep k = {{3, 0, 0}, 0};
	backup_commit_result r;
	char names[5][128];
	for (int i = 0; i < 5; i++) {
		struct timespec now = {1700000000 + i * 10, 123000000};
		backup_slot s;
		backup_slot_init(&d, &now, &s);
		CHECK(strstr(s.bs_part, ".snapshot.part") != NULL);
		write_file(s.bs_plain, "snapshot bytes");
		CHECK(backup_dir_commit(&d, &s, 40 + i, &k, (int64_t)now.tv_sec * 1000 + 200, &r, eb,
					sizeof(eb)) == 0);
		snprintf(names[i], sizeof(names[i]), "%s", r.bc_name);
		CHECK(!exists(dir, strrchr(s.bs_plain, '/') + 1));
		CHECK(r.bc_file_bytes == 14);
	}
	CHECK(strcmp(names[4], "20231114T221400.123Z-rev44.db") == 0);
	CHECK(count_backups(dir) == 3);
	CHECK(r.bc_kept == 3 && r.bc_removed == 1);
	CHECK(!exists(dir, names[0]) && !exists(dir, names[1]));
	CHECK(exists(dir, names[2]) && exists(dir, names[3]) && exists(dir, names[4]));
	char target[256] = "";
	snprintf(p, sizeof(p), "%s/latest", dir);
	ssize_t tl = readlink(p, target, sizeof(target) - 1);
	CHECK(tl > 0 && strcmp(target, names[4]) == 0);

	/* compressed: a gzip file with a .db.gz name */
	k.bk_compress = 1;
	struct timespec now = {1700000100, 0};
	backup_slot s;
	backup_slot_init(&d, &now, &s);
	write_file(s.bs_plain, "snapshot bytes, compressed");
	CHECK(backup_dir_commit(&d, &s, 50, &k, 1700000100000LL, &r, eb, sizeof(eb)) == 0);
	CHECK(strcmp(r.bc_name, "20231114T221500.000Z-rev50.db.gz") == 0);
	snprintf(p, sizeof(p), "%s/%s", dir, r.bc_name);
	unsigned char m[2] = {0, 0};
	int fd = open(p, O_RDONLY);
	CHECK(fd >= 0 && read(fd, m, 2) == 2 && m[0] == 0x1f && m[1] == 0x8b);
	close(fd);
	CHECK(count_backups(dir) == 3);

	/* a missing snapshot is an error and names nothing */
	now.tv_sec += 10;
	backup_slot_init(&d, &now, &s);
	CHECK(backup_dir_commit(&d, &s, 51, &k, 1700000110000LL, &r, eb, sizeof(eb)) == BACKUP_ERR_IO);
	CHECK(count_backups(dir) == 3);
	backup_dir_close(&d);

	/* names */
	int64_t ms;
	CHECK(backup_name_parse("20250101T120000.123Z-rev42.db", &ms) && ms == 1735732800123LL);
	CHECK(backup_name_parse("20250101T120000.123Z-rev42.db.gz", &ms));
	CHECK(!backup_name_parse("20250101T120000.123Z-rev42.db.part", &ms));
	CHECK(!backup_name_parse("20250101T120000.123Z-rev.db", &ms));
	CHECK(!backup_name_parse("20250101T120000.123Z.snapshot", &ms));

	/* the plan */
	backup_plan pl;
	CHECK(backup_plan_parse(&pl, NULL, NULL, 0, "--backup-", eb, sizeof(eb)) == 0 && pl.bp_every == 3600);
	CHECK(backup_plan_parse(&pl, "90s", NULL, 0, "--backup-", eb, sizeof(eb)) == 0 && pl.bp_every == 90);
	CHECK(backup_plan_parse(&pl, "0s", NULL, 0, "--backup-", eb, sizeof(eb)) == BACKUP_ERR_USAGE);
	CHECK(strcmp(eb, "invalid --backup-interval 0s (a duration of at least 100ms)") == 0);
	CHECK(backup_plan_parse(&pl, "1h", "0 * * * *", 0, "--", eb, sizeof(eb)) == BACKUP_ERR_USAGE);
	CHECK(strcmp(eb, "--interval and --schedule are exclusive") == 0);
	CHECK(backup_plan_parse(&pl, NULL, "0 0 30 2 *", 0, "--", eb, sizeof(eb)) == BACKUP_ERR_USAGE);
	CHECK(backup_plan_parse(&pl, NULL, "61 * * * *", 0, "--", eb, sizeof(eb)) == BACKUP_ERR_USAGE);
	CHECK(backup_plan_parse(&pl, "1h", NULL, 1, "--", eb, sizeof(eb)) == BACKUP_ERR_USAGE);
	CHECK(backup_plan_parse(&pl, NULL, "*/5 * * * *", 1, "--", eb, sizeof(eb)) == 0 && pl.bp_cron_on);
	/* an interval skips ticks missed by a long backup instead of bunching them */
	CHECK(backup_plan_parse(&pl, "10s", NULL, 0, "--", eb, sizeof(eb)) == 0);
	CHECK(backup_plan_next_interval(&pl, 100, 100, 103) == 110);
	CHECK(backup_plan_next_interval(&pl, 100, 100, 125) == 130);

	snprintf(p, sizeof(p), "rm -rf '%s'", base);
	if (system(p) != 0)
		fprintf(stderr, "could not remove %s\n", base);
	if (check_failures) {
		fprintf(stderr, "%d failures\n", check_failures);
		return 1;
	}
	printf("ok\n");
	return 0;
}
