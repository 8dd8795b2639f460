/*
 * storage_bench.c - rough numbers for storage: put throughput with group commit, and
 * start-up time of a store holding many keys. Usage: storage_bench DIR [nkeys]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "storage/storage.h"

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what, int err)
{
	fprintf(stderr, "%s: %s\n", what, storage_strerror(err));
	exit(1);
}

static void load(storage *s, const char *fmt, long n, long per_batch, size_t vlen)
{
	char key[64], *val = calloc(1, vlen);
	storage_arena a;
	storage_arena_init(&a);
	storage_batch *b = NULL;
	for (long i = 0; i < n; i++) {
		if (!b) {
			int err = storage_batch_begin(s, &b);
			if (err)
				die("begin", err);
		}
		Etcdserverpb__PutRequest req = ETCDSERVERPB__PUT_REQUEST__INIT;
		Etcdserverpb__PutResponse resp;
		int kl = snprintf(key, sizeof(key), fmt, i);
		req.key.data = (uint8_t *)key;
		req.key.len = (size_t)kl;
		req.value.data = (uint8_t *)val;
		req.value.len = vlen;
		int err = storage_batch_put(b, &req, &a, &resp);
		if (err)
			die("put", err);
		storage_arena_free(&a);
		if ((i + 1) % per_batch == 0 || i + 1 == n) {
			if ((err = storage_batch_commit(b, (uint64_t)i)))
				die("commit", err);
			b = NULL;
		}
	}
	free(val);
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: storage_bench DIR [nkeys]\n");
		return 2;
	}
	long nkeys = argc > 2 ? atol(argv[2]) : 1000000;
	char path[4096];
	storage *s;
	int err;

	snprintf(path, sizeof(path), "%s/puts", argv[1]);
	if ((err = storage_open(path, NULL, &s)))
		die("open", err);
	double t0 = now();
	load(s, "bench/put/%08ld", 10000, 100, 256);
	double dt = now() - t0;
	printf("put: 10000 puts (256 B values) in 100 batches of 100, one fsync each: %.3f s, "
	       "%.0f puts/s, %.2f ms/batch\n", dt, 10000 / dt, dt * 1000 / 100);
	t0 = now();
	load(s, "bench/put1/%08ld", 200, 1, 256);
	dt = now() - t0;
	printf("put: 200 puts, one batch (fsync) each: %.0f puts/s, %.2f ms/commit\n", 200 / dt,
	       dt * 1000 / 200);
	storage_close(s);

	snprintf(path, sizeof(path), "%s/million", argv[1]);
	if ((err = storage_open(path, NULL, &s)))
		die("open", err);
	t0 = now();
	load(s, "/registry/pods/default/pod-%010ld", nkeys, 10000, 100);
	dt = now() - t0;
	printf("load: %ld keys (100 B values) in batches of 10000: %.1f s, %.0f puts/s\n", nkeys, dt,
	       nkeys / dt);
	storage_close(s);

	struct rusage ru0, ru1;
	getrusage(RUSAGE_SELF, &ru0);
	t0 = now();
	if ((err = storage_open(path, NULL, &s)))
		die("open", err);
	storage_stats st;
	storage_stat(s, &st);
	storage_reader *r;
	storage_read_begin(s, &r);
	storage_arena a;
	storage_arena_init(&a);
	Etcdserverpb__RangeRequest req = ETCDSERVERPB__RANGE_REQUEST__INIT;
	Etcdserverpb__RangeResponse resp;
	char k[64];
	int kl = snprintf(k, sizeof(k), "/registry/pods/default/pod-%010ld", nkeys / 2);
	req.key.data = (uint8_t *)k;
	req.key.len = (size_t)kl;
	err = storage_range(r, &req, &a, &resp);
	dt = now() - t0;
	getrusage(RUSAGE_SELF, &ru1);
	printf("open: store with %ld keys: open + stat + first get: %.2f ms (found %zu, rev %lld, "
	       "db %.0f MiB, in use %.0f MiB, max RSS growth %ld KiB)\n",
	       nkeys, dt * 1000, resp.n_kvs, (long long)st.st_revision, st.st_db_size / 1048576.0,
	       st.st_db_size_in_use / 1048576.0, ru1.ru_maxrss - ru0.ru_maxrss);
	storage_arena_free(&a);

	/* a prefix range of 500 keys, and a count over everything */
	Etcdserverpb__RangeRequest q2 = ETCDSERVERPB__RANGE_REQUEST__INIT;
	q2.key.data = (uint8_t *)"/registry/pods/default/pod-00000";
	q2.key.len = strlen("/registry/pods/default/pod-00000");
	q2.range_end.data = (uint8_t *)"/registry/pods/default/pod-00001";
	q2.range_end.len = q2.key.len;
	q2.limit = 500;
	t0 = now();
	int n = 100;
	for (int i = 0; i < n; i++) {
		storage_range(r, &q2, &a, &resp);
		storage_arena_free(&a);
	}
	dt = now() - t0;
	printf("range: limit 500 over a 10000-key prefix (count included): %.2f ms each\n",
	       dt * 1000 / n);
	Etcdserverpb__RangeRequest q3 = ETCDSERVERPB__RANGE_REQUEST__INIT;
	q3.key.data = (uint8_t *)"\0";
	q3.key.len = 1;
	q3.range_end = q3.key;
	q3.count_only = 1;
	t0 = now();
	storage_range(r, &q3, &a, &resp);
	dt = now() - t0;
	printf("range: count_only over all %lld keys: %.0f ms\n", (long long)resp.count, dt * 1000);
	storage_read_end(r);
	storage_close(s);
	return 0;
}
