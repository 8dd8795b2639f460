/*
 * fsync.c - the physical floor of a durable write: `benchmark fsync --dir D`
 * writes --block-size bytes (default 4 KiB) and calls fdatasync, --count times
 * (default 200), appending into a file preallocated and synced beforehand (as
 * etcd's WAL and LMDB's data file are), and reports the latency distribution.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tools/benchmark/bench.h"

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return x < y ? -1 : x > y;
}

int bench_fsync(const struct bench_opts *o, struct bench_result *res)
{
	memset(res, 0, sizeof *res);
	char path[4096];
	snprintf(path, sizeof path, "%s/keelson-fsync-probe.%d", o->dir, (int)getpid());
	int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600);
	if (fd < 0) {
		snprintf(res->setup_error, sizeof res->setup_error, "open %.200s: %s", path, strerror(errno));
		res->setup_failed = 1;
		return -1;
	}
	size_t bs = (size_t)o->block_size;
	off_t size = (off_t)bs * o->count;
	int rc = posix_fallocate(fd, 0, size);
	if (rc == 0 && fsync(fd) != 0)
		rc = errno;
	char *buf = malloc(bs);
	memset(buf, 'k', bs);
	res->lat_us = malloc(sizeof(uint32_t) * (size_t)o->count);
	uint64_t start = bench_now_ns();
	for (int i = 0; i < o->count && rc == 0; i++) {
		uint64_t t0 = bench_now_ns();
		if (pwrite(fd, buf, bs, (off_t)bs * i) != (ssize_t)bs || fdatasync(fd) != 0) {
			rc = errno ? errno : EIO;
			break;
		}
		uint64_t us = (bench_now_ns() - t0) / 1000;
		res->lat_us[res->n_lat++] = (uint32_t)us;
		res->lat_sum_us += (double)us;
		res->ok++;
	}
	res->elapsed = (double)(bench_now_ns() - start) / 1e9;
	free(buf);
	close(fd);
	unlink(path);
	if (rc != 0) {
		snprintf(res->first_error[2], sizeof res->first_error[2], "write/fdatasync: %s", strerror(rc));
		res->by_status[2]++;
		res->errors++;
	}
	qsort(res->lat_us, res->n_lat, sizeof(uint32_t), cmp_u32);
	return rc == 0 ? 0 : -1;
}
