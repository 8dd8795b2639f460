/*
 * crash_test.c - storage survives a process killed at its crash points (crashpoint.h).
 *
 * The test re-runs itself as a child with KEELSON_CRASHPOINT=name:N; the child writes a
 * fixed sequence of batches to a store (puts, then a compaction in small steps, or a
 * defragment) and reports on a pipe each batch that storage_batch_commit acknowledged,
 * until the point kills it. The parent then opens the store and checks that it opens,
 * that it holds exactly the first n batches with n the acknowledged count (or one more
 * after the commit point), that an interrupted compaction finishes, and that HashKV and
 * every key equal those of a store that did the same n batches without a crash.
 */
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "storage/testutil.h"

#define NPUTS 120     /* batches, each a txn putting WIDTH keys: revision i + 2 */
#define WIDTH 150
#define COMPACT_AT 90   /* ~13,000 revision records to examine: the first 10,000 in the */
#define COMPACT_STEP 1000 /* compaction's own batch, the rest in continue steps */

enum { WL_PUTS, WL_COMPACT, WL_DEFRAG };

static storage_arena A;

static storage *open_store(const char *dir)
{
	storage *s;
	int err = storage_open(dir, NULL, &s);
	if (err) {
		fprintf(stderr, "open %s: %s\n", dir, storage_strerror(err));
		exit(2);
	}
	return s;
}

/* Batch i of the put sequence: one txn of WIDTH puts, revision i + 2. */
static int put_batch(storage *s, int i)
{
	char k[WIDTH][16], v[WIDTH][32];
	Etcdserverpb__PutRequest puts[WIDTH];
	Etcdserverpb__RequestOp ops[WIDTH], *opp[WIDTH];
	for (int j = 0; j < WIDTH; j++) {
		sprintf(k[j], "key%03d", j);
		sprintf(v[j], "value-%d-%d", i, j);
		Etcdserverpb__PutRequest p = ETCDSERVERPB__PUT_REQUEST__INIT;
		p.key = t_str(k[j]);
		p.value = t_str(v[j]);
		puts[j] = p;
		Etcdserverpb__RequestOp o = ETCDSERVERPB__REQUEST_OP__INIT;
		o.request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT;
		o.request_put = &puts[j];
		ops[j] = o;
		opp[j] = &ops[j];
	}
	Etcdserverpb__TxnRequest req = ETCDSERVERPB__TXN_REQUEST__INIT;
	req.n_success = WIDTH;
	req.success = opp;
	Etcdserverpb__TxnResponse resp;
	storage_batch *b;
	int err = storage_batch_begin(s, &b);
	if (err)
		return err;
	if ((err = storage_batch_txn(b, &req, &A, &resp))) {
		storage_batch_abort(b);
		return err;
	}
	err = storage_batch_commit(b, (uint64_t)i + 1);
	storage_arena_free(&A);
	return err;
}

static int compact_begin(storage *s, int64_t rev)
{
	Etcdserverpb__CompactionRequest req = ETCDSERVERPB__COMPACTION_REQUEST__INIT;
	req.revision = rev;
	req.physical = 1;
	Etcdserverpb__CompactionResponse resp;
	storage_batch *b;
	int err = storage_batch_begin(s, &b);
	if (err)
		return err;
	if ((err = storage_batch_compact(b, &req, &A, &resp))) {
		storage_batch_abort(b);
		return err;
	}
	err = storage_batch_commit(b, NPUTS);
	storage_arena_free(&A);
	return err;
}

/* Continue steps until done; returns the number of steps taken or a negative error. */
static int compact_finish(storage *s)
{
	int done = 0, steps = 0;
	while (!done) {
		storage_batch *b;
		int err = storage_batch_begin(s, &b);
		if (err)
			return err;
		if ((err = storage_batch_compact_continue(b, COMPACT_STEP, &done))) {
			storage_batch_abort(b);
			return err;
		}
		if ((err = storage_batch_commit(b, NPUTS)))
			return err;
		steps++;
	}
	return steps;
}

static void report(int fd, int n)
{
	if (write(fd, &n, sizeof(n)) != sizeof(n))
		_exit(3);
}

/* The child: the workload, reporting acknowledged batches (puts: their count; then -1 for
 * the compaction recorded, -2 for it finished, -3 for a defragment done). */
static int child(int wl, const char *dir, int fd)
{
	storage *s = open_store(dir);
	for (int i = 0; i < NPUTS; i++) {
		if (put_batch(s, i))
			return 4;
		report(fd, i + 1);
	}
	if (wl == WL_COMPACT) {
		if (compact_begin(s, COMPACT_AT))
			return 5;
		report(fd, -1);
		if (compact_finish(s) < 0)
			return 6;
		report(fd, -2);
	} else if (wl == WL_DEFRAG) {
		if (storage_defragment(s))
			return 7;
		report(fd, -3);
	}
	storage_close(s);
	return 0;
}

static uint32_t hash_kv(storage *s, int64_t *rev, int64_t *compact)
{
	storage_reader *r;
	uint32_t h = 0;
	int64_t hrev = 0;
	CHECK_EQ(storage_read_begin(s, &r), 0);
	CHECK_EQ(storage_hash_kv(r, 0, &h, &hrev, compact), 0);
	storage_read_end(r);
	*rev = hrev;
	return h;
}

/* Every key of the store equals the reference store's. */
static void same_keys(storage *got, storage *want)
{
	Etcdserverpb__RangeRequest req = ETCDSERVERPB__RANGE_REQUEST__INIT;
	req.key = t_bin("\0", 1);
	req.range_end = t_bin("\0", 1);
	Etcdserverpb__RangeResponse a, b;
	storage_reader *ra, *rb;
	CHECK_EQ(storage_read_begin(got, &ra), 0);
	CHECK_EQ(storage_read_begin(want, &rb), 0);
	CHECK_EQ(storage_range(ra, &req, &A, &a), 0);
	CHECK_EQ(storage_range(rb, &req, &A, &b), 0);
	CHECK_EQ(a.n_kvs, b.n_kvs);
	for (size_t i = 0; i < a.n_kvs && i < b.n_kvs; i++) {
		CHECK(a.kvs[i]->key.len == b.kvs[i]->key.len &&
		      memcmp(a.kvs[i]->key.data, b.kvs[i]->key.data, a.kvs[i]->key.len) == 0);
		CHECK(a.kvs[i]->value.len == b.kvs[i]->value.len &&
		      memcmp(a.kvs[i]->value.data, b.kvs[i]->value.data, a.kvs[i]->value.len) == 0);
		CHECK_EQ(a.kvs[i]->mod_revision, b.kvs[i]->mod_revision);
		CHECK_EQ(a.kvs[i]->create_revision, b.kvs[i]->create_revision);
		CHECK_EQ(a.kvs[i]->version, b.kvs[i]->version);
	}
	storage_read_end(ra);
	storage_read_end(rb);
	storage_arena_free(&A);
}

static int exists(const char *dir, const char *name)
{
	char p[4096];
	struct stat st;
	snprintf(p, sizeof(p), "%s/%s", dir, name);
	return stat(p, &st) == 0;
}

static const char *self_exe;

/* Runs the workload in a child armed with point spec; checks the store it leaves. */
static void crash_case(int wl, const char *spec)
{
	char name[64];
	snprintf(name, sizeof(name), "crash-%d-%s", wl, spec);
	for (char *p = name; *p; p++)
		if (*p == ':' || *p == '.')
			*p = '_';
	char *dir = t_tmpdir(name);
	int fds[2];
	if (pipe(fds) != 0)
		abort();
	pid_t pid = fork();
	if (pid == 0) {
		close(fds[0]);
		char wls[8], fd[8];
		snprintf(wls, sizeof(wls), "%d", wl);
		snprintf(fd, sizeof(fd), "%d", fds[1]);
		setenv("KEELSON_CRASHPOINT", spec, 1);
		execl(self_exe, self_exe, "child", wls, dir, fd, (char *)NULL);
		_exit(127);
	}
	close(fds[1]);
	int acked = 0, compacted = 0, compact_done = 0, defragged = 0, n;
	while (read(fds[0], &n, sizeof(n)) == sizeof(n)) {
		if (n > 0)
			acked = n;
		compacted |= n == -1;
		compact_done |= n == -2;
		defragged |= n == -3;
	}
	close(fds[0]);
	int status;
	waitpid(pid, &status, 0);
	if (!(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)) {
		fprintf(stderr, "%s: the child was not killed at its point (status %d)\n", spec, status);
		t_fail++;
		return;
	}
	CHECK(!compact_done && !defragged); /* killed before the end of the workload */

	/* the store opens, holds the acknowledged batches and perhaps the one in flight */
	storage *s = open_store(dir);
	CHECK(!exists(dir, "data.mdb.defrag"));
	storage_stats st;
	CHECK_EQ(storage_stat(s, &st), 0);
	int64_t applied = st.st_revision - 1;
	CHECK(applied >= acked && applied <= acked + 1);
	if (strncmp(spec, "commit.before", 13) == 0)
		CHECK_EQ(applied, acked);
	CHECK_EQ(st.st_applied_index, (uint64_t)applied);
	int store_compacted = st.st_compact_revision == COMPACT_AT;
	CHECK(store_compacted >= compacted); /* an acknowledged compaction holds */
	if (store_compacted)
		CHECK(compact_finish(s) >= 1);

	/* the reference: the same batches, no crash */
	char *rdir = t_tmpdir("crash-reference");
	storage *ref = open_store(rdir);
	for (int i = 0; i < applied; i++)
		CHECK_EQ(put_batch(ref, i), 0);
	if (store_compacted) {
		CHECK_EQ(compact_begin(ref, COMPACT_AT), 0);
		CHECK(compact_finish(ref) >= 1);
	}
	int64_t r1, r2, c1, c2;
	uint32_t h1 = hash_kv(s, &r1, &c1), h2 = hash_kv(ref, &r2, &c2);
	CHECK_EQ(r1, r2);
	CHECK_EQ(c1, c2);
	CHECK_EQ(h1, h2);
	same_keys(s, ref);
	/* and the store goes on: the rest of the puts, a defragment */
	for (int i = (int)applied; i < NPUTS; i++)
		CHECK_EQ(put_batch(s, i), 0);
	CHECK_EQ(storage_defragment(s), 0);
	CHECK(!exists(dir, "data.mdb.defrag"));
	storage_close(ref);
	storage_close(s);
	free(rdir);
	free(dir);
	fprintf(stderr, "%-24s acknowledged %d, recovered %lld%s\n", spec, acked, (long long)applied,
		store_compacted ? ", compaction finished after restart" : "");
}

int main(int argc, char **argv)
{
	if (argc == 5 && strcmp(argv[1], "child") == 0)
		return child(atoi(argv[2]), argv[3], atoi(argv[4]));
	self_exe = "/proc/self/exe";
	crash_case(WL_PUTS, "commit.before:1");
	crash_case(WL_PUTS, "commit.before:57");
	crash_case(WL_PUTS, "commit.after:1");
	crash_case(WL_PUTS, "commit.after:60");
	crash_case(WL_COMPACT, "commit.after:121");  /* the compaction committed, no step more */
	crash_case(WL_COMPACT, "compact.continue:1");
	crash_case(WL_COMPACT, "compact.continue:3");
	crash_case(WL_COMPACT, "commit.before:123"); /* inside a continue step's commit */
	crash_case(WL_DEFRAG, "defrag.opened:1");
	crash_case(WL_DEFRAG, "defrag.copied:1");
	crash_case(WL_DEFRAG, "defrag.renamed:1");
	printf("%d checks, %d failed\n", t_checks, t_fail);
	return t_fail ? 1 : 0;
}
