/*
 * etcdfmt_test.c - etcd-format snapshots: a store written as an etcd backend file and read
 * back into a fresh store must serve the same history; a real etcd 3.4 snapshot
 * (testdata/etcd34_snapshot.db, made by `etcdctl snapshot save`) imports with etcd's answers;
 * truncated and damaged files are refused (or, where bbolt has no checksum to tell, read)
 * without crashing.
 */
#include <fcntl.h>
#include <sys/stat.h>

#include "storage/testutil.h"

/* ---- helpers ---- */

typedef struct buf {
	uint8_t *p;
	size_t n, cap;
} buf;

static int buf_write(void *ctx, const void *p, size_t n)
{
	buf *b = ctx;
	if (b->n + n > b->cap) {
		size_t cap = b->cap ? b->cap : 65536;
		while (cap < b->n + n)
			cap *= 2;
		uint8_t *np = realloc(b->p, cap);
		if (!np)
			return STORAGE_ERR_NOMEM;
		b->p = np;
		b->cap = cap;
	}
	memcpy(b->p + b->n, p, n);
	b->n += n;
	return 0;
}

static void file_put(const char *path, const void *p, size_t n)
{
	FILE *f = fopen(path, "wb");
	if (!f || (n && fwrite(p, 1, n, f) != n) || fclose(f) != 0) {
		fprintf(stderr, "cannot write %s\n", path);
		abort();
	}
}

static uint64_t rng = 88172645463325252ull;
static uint64_t rnd(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static storage_batch *begin(storage *s)
{
	storage_batch *b = NULL;
	CHECK_EQ(storage_batch_begin(s, &b), 0);
	return b;
}

static void put(storage_batch *b, const char *k, size_t kl, const char *v, size_t vl, int64_t lease)
{
	storage_arena a;
	storage_arena_init(&a);
	Etcdserverpb__PutRequest req = ETCDSERVERPB__PUT_REQUEST__INIT;
	Etcdserverpb__PutResponse resp;
	req.key = t_bin(k, kl);
	req.value = t_bin(v, vl);
	req.lease = lease;
	CHECK_EQ(storage_batch_put(b, &req, &a, &resp), 0);
	storage_arena_free(&a);
}

static void del(storage_batch *b, const char *k, const char *end)
{
	storage_arena a;
	storage_arena_init(&a);
	Etcdserverpb__DeleteRangeRequest req = ETCDSERVERPB__DELETE_RANGE_REQUEST__INIT;
	Etcdserverpb__DeleteRangeResponse resp;
	req.key = t_str(k);
	req.range_end = t_str(end);
	CHECK_EQ(storage_batch_delete_range(b, &req, &a, &resp), 0);
	storage_arena_free(&a);
}

static int compact(storage_batch *b, int64_t rev)
{
	storage_arena a;
	storage_arena_init(&a);
	Etcdserverpb__CompactionRequest req = ETCDSERVERPB__COMPACTION_REQUEST__INIT;
	Etcdserverpb__CompactionResponse resp;
	req.revision = rev;
	int err = storage_batch_compact(b, &req, &a, &resp);
	storage_arena_free(&a);
	return err;
}

/* Every key at rev: a Range over everything. */
static int range_all(storage_reader *r, int64_t rev, storage_arena *a,
		     Etcdserverpb__RangeResponse *resp)
{
	Etcdserverpb__RangeRequest req = ETCDSERVERPB__RANGE_REQUEST__INIT;
	static uint8_t zero = 0;
	req.key = t_bin(&zero, 1);
	req.range_end = t_bin(&zero, 1);
	req.revision = rev;
	return storage_range(r, &req, a, resp);
}

static int kv_eq(const Mvccpb__KeyValue *x, const Mvccpb__KeyValue *y)
{
	return x->key.len == y->key.len && !memcmp(x->key.data, y->key.data, x->key.len) &&
	       x->value.len == y->value.len &&
	       (!x->value.len || !memcmp(x->value.data, y->value.data, x->value.len)) &&
	       x->create_revision == y->create_revision && x->mod_revision == y->mod_revision &&
	       x->version == y->version && x->lease == y->lease;
}

/* Checks that stores a and b answer alike: revisions, ranges at every revision step of
 * `step`, every event after the compacted revision, leases and their keys, HashKV. */
static void compare_stores(storage *sa, storage *sb, int64_t step)
{
	storage_reader *ra, *rb;
	CHECK_EQ(storage_read_begin(sa, &ra), 0);
	CHECK_EQ(storage_read_begin(sb, &rb), 0);
	storage_stats sta, stb;
	CHECK_EQ(storage_stat(sa, &sta), 0);
	CHECK_EQ(storage_stat(sb, &stb), 0);
	CHECK_EQ(sta.st_revision, stb.st_revision);
	CHECK_EQ(sta.st_compact_revision, stb.st_compact_revision);
	int64_t cur = sta.st_revision, comp = sta.st_compact_revision;

	for (int64_t rev = comp > 0 ? comp : 1; rev <= cur; rev += step) {
		storage_arena a;
		storage_arena_init(&a);
		Etcdserverpb__RangeResponse x, y;
		int ea = range_all(ra, rev, &a, &x), eb = range_all(rb, rev, &a, &y);
		CHECK_EQ(ea, eb);
		if (!ea && !eb) {
			CHECK_EQ(x.count, y.count);
			CHECK_EQ(x.n_kvs, y.n_kvs);
			int same = x.n_kvs == y.n_kvs;
			for (size_t i = 0; same && i < x.n_kvs; i++)
				same = kv_eq(x.kvs[i], y.kvs[i]);
			if (!same)
				fprintf(stderr, "range at revision %lld differs\n", (long long)rev);
			CHECK(same);
		}
		storage_arena_free(&a);
		if (rev < cur && rev + step > cur)
			rev = cur - step;
	}

	/* Every event after the compacted revision (at it, a pending physical compaction may
	 * still hold superseded revisions in the source). */
	storage_arena a;
	storage_arena_init(&a);
	Mvccpb__Event **ea, **eb;
	size_t na, nb;
	int64_t rr, cr;
	CHECK_EQ(storage_read_events(ra, comp + 1, (size_t)-1, &a, &ea, &na, &rr, &cr), 0);
	CHECK_EQ(storage_read_events(rb, comp + 1, (size_t)-1, &a, &eb, &nb, &rr, &cr), 0);
	CHECK_EQ(na, nb);
	size_t bad = 0;
	for (size_t i = 0; i < na && i < nb; i++) {
		int same = ea[i]->type == eb[i]->type && kv_eq(ea[i]->kv, eb[i]->kv) &&
			   !ea[i]->prev_kv == !eb[i]->prev_kv &&
			   (!ea[i]->prev_kv || kv_eq(ea[i]->prev_kv, eb[i]->prev_kv));
		bad += !same;
	}
	CHECK_EQ(bad, 0);

	int64_t *ida, *ttla, *rema, *idb, *ttlb, *remb;
	size_t la, lb;
	CHECK_EQ(storage_read_leases(ra, &a, &ida, &ttla, &rema, &la), 0);
	CHECK_EQ(storage_read_leases(rb, &a, &idb, &ttlb, &remb, &lb), 0);
	CHECK_EQ(la, lb);
	for (size_t i = 0; i < la && i < lb; i++) {
		CHECK_EQ(ida[i], idb[i]);
		CHECK_EQ(ttla[i], ttlb[i]);
		CHECK_EQ(rema[i], remb[i]);
		int64_t t1, t2;
		ProtobufCBinaryData *k1, *k2;
		size_t n1 = 0, n2 = 0;
		CHECK_EQ(storage_read_lease(ra, ida[i], &t1, &a, &k1, &n1), 0);
		CHECK_EQ(storage_read_lease(rb, idb[i], &t2, &a, &k2, &n2), 0);
		CHECK_EQ(n1, n2);
		for (size_t j = 0; j < n1 && j < n2; j++)
			CHECK(k1[j].len == k2[j].len && !memcmp(k1[j].data, k2[j].data, k1[j].len));
	}
	uint32_t h1 = 0, h2 = 1;
	int64_t hr, hc;
	CHECK_EQ(storage_hash_kv(ra, 0, &h1, &hr, &hc), 0);
	CHECK_EQ(storage_hash_kv(rb, 0, &h2, &hr, &hc), 0);
	CHECK_EQ(h1, h2);
	storage_arena_free(&a);
	storage_read_end(ra);
	storage_read_end(rb);
}

static void snapshot_of(storage *s, const storage_snapshot_info *info, buf *out, int stream)
{
	storage_reader *r;
	CHECK_EQ(storage_read_begin(s, &r), 0);
	out->n = 0;
	if (stream)
		CHECK_EQ(storage_snapshot_etcd_stream(r, info, buf_write, out), 0);
	else
		CHECK_EQ(storage_snapshot_etcd(r, info, buf_write, out, NULL), 0);
	storage_read_end(r);
}

/* ---- a store with a bit of everything ---- */

static void build_store(storage *s, int64_t *final_rev)
{
	static char big[200000];
	for (size_t i = 0; i < sizeof(big); i++)
		big[i] = (char)('a' + i % 26);
	char longkey[1000];
	memset(longkey, 'L', sizeof(longkey));
	char k[64], v[64];
	uint64_t applied = 0;

	storage_batch *b = begin(s);
	CHECK_EQ(storage_batch_lease_grant(b, 0x51, 300), 0);
	CHECK_EQ(storage_batch_lease_grant(b, 0x52, 60), 0);
	CHECK_EQ(storage_batch_lease_grant(b, 0x7fffffffffff0001ll, 9000), 0);
	/* A checkpointed lease: its remaining TTL travels as leasepb.Lease's RemainingTTL. */
	Etcdserverpb__LeaseCheckpoint c = ETCDSERVERPB__LEASE_CHECKPOINT__INIT, *cs[] = {&c};
	Etcdserverpb__LeaseCheckpointRequest cr = ETCDSERVERPB__LEASE_CHECKPOINT_REQUEST__INIT;
	c.id = 0x7fffffffffff0001ll;
	c.remaining_ttl = 4321;
	cr.checkpoints = cs;
	cr.n_checkpoints = 1;
	CHECK_EQ(storage_batch_lease_checkpoint(b, &cr), 0);
	CHECK_EQ(storage_batch_commit(b, ++applied), 0);

	/* Enough revisions for several levels of branch pages. */
	for (int batch = 0; batch < 60; batch++) {
		b = begin(s);
		for (int i = 0; i < 400; i++) {
			int n = (int)(rnd() % 3000);
			snprintf(k, sizeof(k), "/registry/k%05d", n);
			snprintf(v, sizeof(v), "value %d.%d", batch, i);
			int64_t lease = n % 97 == 0 ? 0x51 : n % 89 == 0 ? 0x7fffffffffff0001ll : 0;
			put(b, k, strlen(k), v, strlen(v), lease);
			if (rnd() % 20 == 0) {
				snprintf(k, sizeof(k), "/registry/k%05d", (int)(rnd() % 3000));
				del(b, k, NULL);
			}
		}
		if (batch == 10) {
			/* values spanning overflow pages, an empty value, long keys */
			put(b, "/big/1", 6, big, 5000, 0);
			put(b, "/big/2", 6, big, sizeof(big), 0x52);
			put(b, "/empty", 6, "", 0, 0);
			put(b, longkey, 600, "long1", 5, 0);
			put(b, longkey, 999, "long2", 5, 0x51);
			/* binary keys */
			put(b, "\x00\x01\xff", 3, "bin", 3, 0);
			put(b, "\xff\xff", 2, "bin2", 4, 0);
		}
		if (batch == 20) {
			/* a txn: two puts and a delete share one revision */
			storage_arena a;
			storage_arena_init(&a);
			Etcdserverpb__PutRequest p1 = ETCDSERVERPB__PUT_REQUEST__INIT, p2 = p1;
			p1.key = t_str("/txn/a");
			p1.value = t_str("A");
			p2.key = t_str("/txn/b");
			p2.value = t_str("B");
			Etcdserverpb__DeleteRangeRequest d = ETCDSERVERPB__DELETE_RANGE_REQUEST__INIT;
			d.key = t_str("/registry/k0");
			d.range_end = t_str("/registry/k1");
			Etcdserverpb__RequestOp o1 = ETCDSERVERPB__REQUEST_OP__INIT, o2 = o1, o3 = o1;
			o1.request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT;
			o1.request_put = &p1;
			o2.request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT;
			o2.request_put = &p2;
			o3.request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_DELETE_RANGE;
			o3.request_delete_range = &d;
			Etcdserverpb__RequestOp *ops[] = {&o1, &o2, &o3};
			Etcdserverpb__TxnRequest t = ETCDSERVERPB__TXN_REQUEST__INIT;
			Etcdserverpb__TxnResponse tr;
			t.n_success = 3;
			t.success = ops;
			CHECK_EQ(storage_batch_txn(b, &t, &a, &tr), 0);
			storage_arena_free(&a);
		}
		if (batch == 30)
			CHECK_EQ(compact(b, storage_batch_revision(b) - 500), 0);
		if (batch == 40) {
			storage_arena a;
			storage_arena_init(&a);
			Etcdserverpb__LeaseRevokeResponse lr;
			CHECK_EQ(storage_batch_lease_revoke(b, 0x52, &a, &lr), 0);
			storage_arena_free(&a);
		}
		CHECK_EQ(storage_batch_commit(b, ++applied), 0);
	}
	/* A compaction whose physical part is left pending (it examines 10,000 revisions per
	 * call and more are below it). */
	b = begin(s);
	CHECK_EQ(compact(b, storage_batch_revision(b) - 100), 0);
	del(b, "/registry/k00", "/registry/k01"); /* deletes after it */
	*final_rev = storage_batch_revision(b);
	CHECK_EQ(storage_batch_commit(b, ++applied), 0);
}

static const char *urls[] = {"http://127.0.0.1:2380", "http://10.0.0.1:2380"};
static const char *curls[] = {"http://127.0.0.1:2379"};

static void test_round_trip(void)
{
	char *src = t_tmpdir("etcdfmt-src"), *dst = t_tmpdir("etcdfmt-dst"),
	     *file = t_tmpdir("etcdfmt-snap.db");
	storage *s;
	CHECK_EQ(storage_open(src, NULL, &s), 0);
	int64_t rev;
	build_store(s, &rev);

	storage_etcd_member m[2] = {
		{0x8e9e05c52164694dull, "infra1", urls, 1, curls, 1, 0},
		{0x91bc3c398fb3c146ull, "in\"fra<2>", urls + 1, 1, NULL, 0, 1},
	};
	uint64_t removed[] = {0x1234};
	storage_etcd_entry extra[] = {
		{"authUsers", "root", 4, "\x0a\x04root", 6},
		{"alarm", "\x08\x01\x10\x01", 4, "", 0},
		{"mybucket", "k", 1, "v", 1},
	};
	storage_snapshot_info info = {0};
	info.si_consistent_index = 12345;
	info.si_term = 7;
	info.si_members = m;
	info.si_n_members = 2;
	info.si_removed = removed;
	info.si_n_removed = 1;
	info.si_auth_enabled = 1;
	info.si_auth_revision = 9;
	info.si_extra = extra;
	info.si_n_extra = 3;
	buf snap = {0};
	snapshot_of(s, &info, &snap, 1);
	CHECK(snap.n > 4096 * 10);
	CHECK_EQ(snap.n % 4096, 32);
	file_put(file, snap.p, snap.n);

	/* A writer goes on while a reader takes a snapshot, which shows the reader's view. */
	storage_reader *r;
	CHECK_EQ(storage_read_begin(s, &r), 0);
	storage_batch *b = begin(s);
	put(b, "/during", 7, "x", 1, 0);
	CHECK_EQ(storage_batch_commit(b, 1000), 0);
	buf snap2 = {0};
	CHECK_EQ(storage_snapshot_etcd_stream(r, &info, buf_write, &snap2), 0);
	storage_read_end(r);
	CHECK(snap2.n == snap.n && !memcmp(snap2.p, snap.p, snap.n));
	free(snap2.p);
	storage_close(s);

	char eb[512];
	storage_etcd_file_info fi;
	CHECK_EQ(storage_etcd_check(file, STORAGE_ETCD_HASH_REQUIRE, &fi, eb, sizeof(eb)), 0);
	CHECK_EQ(fi.ef_store_revision, rev);
	CHECK_EQ(fi.ef_consistent_index, 12345);
	CHECK_EQ(fi.ef_term, 7);
	CHECK_EQ(fi.ef_leases, 2);
	CHECK(fi.ef_has_sha256);
	CHECK(fi.ef_revisions > 1000);
	CHECK(fi.ef_tombstones > 10);

	/* Import, and compare with the source as the snapshot saw it. */
	storage_etcd_import_options o = {0};
	o.ei_errbuf = eb;
	o.ei_errlen = sizeof(eb);
	storage_etcd_file_info ii;
	int err = storage_import_etcd(file, dst, &o, &ii);
	if (err)
		fprintf(stderr, "import: %s\n", eb);
	CHECK_EQ(err, 0);
	CHECK_EQ(ii.ef_store_revision, rev);
	storage *d;
	CHECK_EQ(storage_open(dst, NULL, &d), 0);
	storage_stats st;
	CHECK_EQ(storage_stat(d, &st), 0);
	CHECK_EQ(st.st_revision, rev);
	CHECK_EQ(st.st_applied_index, 12345);

	/* The source as the snapshot saw it: built again, without the write made meanwhile. */
	char *src2 = t_tmpdir("etcdfmt-src2");
	rng = 88172645463325252ull;
	CHECK_EQ(storage_open(src2, NULL, &s), 0);
	int64_t rev2;
	build_store(s, &rev2);
	CHECK_EQ(rev2, rev);
	compare_stores(s, d, 7);

	/* The import writes the same snapshot again, byte for byte. */
	buf again = {0};
	snapshot_of(d, &info, &again, 1);
	CHECK(again.n == snap.n && !memcmp(again.p, snap.p, snap.n));
	free(again.p);

	storage_close(d);
	storage_close(s);
	free(snap.p);
	free(src);
	free(src2);
	free(dst);
	free(file);
}

typedef struct seen {
	int members, removed, auth, extra, cluster;
	char member_json[512];
} seen;

static int visit(void *ctx, const char *bucket, const uint8_t *k, size_t kl, const uint8_t *v,
		 size_t vl)
{
	seen *s = ctx;
	if (!strcmp(bucket, "members")) {
		if (s->members++ == 1 && vl < sizeof(s->member_json))
			memcpy(s->member_json, v, vl);
	}
	s->removed += !strcmp(bucket, "members_removed") && vl == 7 && !memcmp(v, "removed", 7);
	s->auth += !strcmp(bucket, "auth") || !strcmp(bucket, "authUsers");
	s->extra += !strcmp(bucket, "mybucket") || !strcmp(bucket, "alarm");
	s->cluster += !strcmp(bucket, "cluster") && vl == 5 && !memcmp(v, "3.4.0", 5);
	(void)k;
	(void)kl;
	return 0;
}

static int fail_write(void *ctx, const void *p, size_t n)
{
	(void)ctx;
	(void)p;
	(void)n;
	return 42;
}

static void test_visitor_and_small(void)
{
	char *src = t_tmpdir("etcdfmt-small"), *dst = t_tmpdir("etcdfmt-small-dst"),
	     *file = t_tmpdir("etcdfmt-small.db");
	storage *s;
	CHECK_EQ(storage_open(src, NULL, &s), 0);
	storage_etcd_member m[2] = {
		{0x8e9e05c52164694dull, "infra1", urls, 1, curls, 1, 0},
		{0x91bc3c398fb3c146ull, "in\"fra<2>", urls + 1, 1, NULL, 0, 1},
	};
	uint64_t removed[] = {0x1234};
	storage_etcd_entry extra[] = {
		{"authUsers", "root", 4, "\x0a\x04root", 6},
		{"alarm", "\x08\x01\x10\x01", 4, "", 0},
		{"mybucket", "k", 1, "v", 1},
	};
	storage_snapshot_info info = {0};
	info.si_members = m;
	info.si_n_members = 2;
	info.si_removed = removed;
	info.si_n_removed = 1;
	info.si_extra = extra;
	info.si_n_extra = 3;

	/* An empty store: every bucket inline, the smallest file. */
	buf snap = {0};
	snapshot_of(s, &info, &snap, 0);
	CHECK_EQ(snap.n, 4 * 4096);
	file_put(file, snap.p, snap.n);
	storage_etcd_file_info fi;
	char eb[512];
	CHECK_EQ(storage_etcd_check(file, STORAGE_ETCD_HASH_REQUIRE, &fi, eb, sizeof(eb)),
		 STORAGE_ERR_CORRUPT); /* no trailer */
	CHECK(strstr(eb, "SHA-256") != NULL);
	CHECK_EQ(storage_etcd_check(file, STORAGE_ETCD_HASH_SKIP, &fi, eb, sizeof(eb)), 0);
	CHECK_EQ(fi.ef_revision, 0);
	CHECK_EQ(fi.ef_store_revision, 1);
	CHECK_EQ(fi.ef_compact_revision, -1);

	seen sn = {0};
	storage_etcd_import_options o = {0};
	o.ei_hash_check = STORAGE_ETCD_HASH_SKIP;
	o.ei_visit = visit;
	o.ei_ctx = &sn;
	o.ei_errbuf = eb;
	o.ei_errlen = sizeof(eb);
	CHECK_EQ(storage_import_etcd(file, dst, &o, NULL), 0);
	CHECK_EQ(sn.members, 2);
	CHECK_EQ(sn.removed, 1);
	CHECK_EQ(sn.auth, 3); /* authEnabled, authRevision, authUsers/root */
	CHECK_EQ(sn.extra, 2);
	CHECK_EQ(sn.cluster, 1);
	CHECK(strcmp(sn.member_json,
		     "{\"id\":10501334649042878790,\"peerURLs\":[\"http://10.0.0.1:2380\"],"
		     "\"isLearner\":true,\"name\":\"in\\\"fra\\u003c2\\u003e\"}") == 0);
	/* importing twice into the same dir is refused: it holds revisions only once it has
	 * some, so put one and try again */
	storage *d;
	CHECK_EQ(storage_open(dst, NULL, &d), 0);
	storage_batch *b = begin(d);
	put(b, "x", 1, "y", 1, 0);
	CHECK_EQ(storage_batch_commit(b, 1), 0);
	storage_close(d);
	CHECK_EQ(storage_import_etcd(file, dst, &o, NULL), STORAGE_ERR_INVALID);

	/* Duplicate entries in info are refused. */
	storage_etcd_entry dup[] = {{"meta", "consistent_index", 16, "12345678", 8}};
	info.si_extra = dup;
	info.si_n_extra = 1;
	storage_reader *r;
	CHECK_EQ(storage_read_begin(s, &r), 0);
	buf x = {0};
	CHECK_EQ(storage_snapshot_etcd(r, &info, buf_write, &x, NULL), STORAGE_ERR_INVALID);
	storage_read_end(r);
	free(x.p);
	/* A write callback's error stops the snapshot and is returned. */
	CHECK_EQ(storage_read_begin(s, &r), 0);
	CHECK_EQ(storage_snapshot_etcd(r, NULL, fail_write, NULL, NULL), 42);
	storage_read_end(r);

	storage_close(s);
	free(snap.p);
	free(src);
	free(dst);
	free(file);
}

/* ---- a real etcd 3.4 snapshot ---- */

static void test_real_etcd(void)
{
	const char *path = "storage/testdata/etcd34_snapshot.db";
	char *dst = t_tmpdir("etcdfmt-real");
	char eb[512];
	storage_etcd_file_info fi;
	int err = storage_etcd_check(path, STORAGE_ETCD_HASH_REQUIRE, &fi, eb, sizeof(eb));
	if (err)
		fprintf(stderr, "%s: %s\n", path, eb);
	CHECK_EQ(err, 0);
	/* What `etcdctl snapshot status -w json` says of it. */
	CHECK_EQ(fi.ef_hash, 3726517026u);
	CHECK_EQ(fi.ef_revision, 309);
	CHECK_EQ(fi.ef_total_keys, 299);
	CHECK_EQ(fi.ef_total_size, 94208);
	CHECK_EQ(fi.ef_compact_revision, 150);
	CHECK_EQ(fi.ef_consistent_index, 314);

	storage_etcd_import_options o = {0};
	o.ei_errbuf = eb;
	o.ei_errlen = sizeof(eb);
	CHECK_EQ(storage_import_etcd(path, dst, &o, NULL), 0);
	storage *s;
	CHECK_EQ(storage_open(dst, NULL, &s), 0);
	storage_reader *r;
	CHECK_EQ(storage_read_begin(s, &r), 0);
	storage_arena a;
	storage_arena_init(&a);
	Etcdserverpb__RangeResponse resp;
	/* The etcd it came from answered: 112 keys at 309, 121 at 200, HashKV 1506861479. */
	CHECK_EQ(range_all(r, 0, &a, &resp), 0);
	CHECK_EQ(resp.header->revision, 309);
	CHECK_EQ(resp.count, 112);
	CHECK_EQ(range_all(r, 200, &a, &resp), 0);
	CHECK_EQ(resp.count, 121);
	CHECK_EQ(range_all(r, 149, &a, &resp), STORAGE_ERR_COMPACTED);
	uint32_t h;
	int64_t hr, hc;
	CHECK_EQ(storage_hash_kv(r, 0, &h, &hr, &hc), 0);
	CHECK_EQ(h, 1506861479u);
	CHECK_EQ(hc, 150);
	int64_t *ids, *ttls;
	size_t n;
	CHECK_EQ(storage_read_leases(r, &a, &ids, &ttls, NULL, &n), 0);
	CHECK_EQ(n, 1);
	ProtobufCBinaryData *keys;
	size_t nk = 0;
	int64_t ttl;
	if (n == 1) {
		CHECK_EQ(storage_read_lease(r, ids[0], &ttl, &a, &keys, &nk), 0);
		CHECK_EQ(ttl, 900);
		CHECK_EQ(nk, 2); /* /leased/a, /leased/b */
	}
	storage_arena_free(&a);
	storage_read_end(r);

	/* Written back out, etcdctl's view of the key bucket is unchanged: same revision,
	 * same HashKV after a second import. */
	buf snap = {0};
	snapshot_of(s, NULL, &snap, 1);
	char *file = t_tmpdir("etcdfmt-real-again.db"), *dst2 = t_tmpdir("etcdfmt-real2");
	file_put(file, snap.p, snap.n);
	CHECK_EQ(storage_import_etcd(file, dst2, &o, NULL), 0);
	storage *s2;
	CHECK_EQ(storage_open(dst2, NULL, &s2), 0);
	compare_stores(s, s2, 1);
	storage_close(s2);
	storage_close(s);
	free(snap.p);
	free(file);
	free(dst);
	free(dst2);
}

/* ---- damaged files ---- */

static size_t real_size;
static uint8_t *read_file(const char *path)
{
	int fd = open(path, O_RDONLY);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) != 0)
		abort();
	uint8_t *p = malloc((size_t)st.st_size);
	if (read(fd, p, (size_t)st.st_size) != st.st_size)
		abort();
	close(fd);
	real_size = (size_t)st.st_size;
	return p;
}

static int check_bytes(const char *file, const uint8_t *p, size_t n, int mode)
{
	file_put(file, p, n);
	char eb[512] = "";
	storage_etcd_file_info fi;
	int err = storage_etcd_check(file, mode, &fi, eb, sizeof(eb));
	if (err)
		CHECK(eb[0] != 0); /* a refusal says why */
	return err;
}

static void fuzz_one(const char *name, const uint8_t *orig, size_t size, int imports)
{
	char *file = t_tmpdir(name);
	uint8_t *p = malloc(size);
	size_t db = size % 512 == 32 ? size - 32 : size;

	/* Truncations: always refused (hash mismatch, missing pages or a short file) below the
	 * pages the meta counts; exactly those pages is a valid file without the trailer. */
	int refused = 0, tried = 0;
	for (size_t len = 0; len < size; len += len < 8192 ? 97 : 1021) {
		tried++;
		int err = check_bytes(file, orig, len, STORAGE_ETCD_HASH_IF_PRESENT);
		refused += err != 0;
		if (len < db)
			CHECK(err != 0);
	}
	CHECK_EQ(check_bytes(file, orig, db, STORAGE_ETCD_HASH_IF_PRESENT), 0);
	CHECK(refused >= tried - 1);

	/* With the trailer, any flipped bit is caught by the SHA-256. */
	if (db != size) {
		for (int i = 0; i < 50; i++) {
			memcpy(p, orig, size);
			size_t off = (size_t)(rnd() % db);
			p[off] ^= (uint8_t)(1u << (rnd() % 8));
			CHECK_EQ(check_bytes(file, p, size, STORAGE_ETCD_HASH_REQUIRE), STORAGE_ERR_CORRUPT);
		}
	}

	/* Without it, bbolt has checksums only on the metas: a flipped bit in a key or a value
	 * may go unnoticed, but the reader must never crash, and what it accepts imports. */
	int accepted = 0, flips = 0;
	for (int i = 0; i < 3000; i++) {
		memcpy(p, orig, db);
		int nflip = 1 + (int)(rnd() % 3);
		for (int j = 0; j < nflip; j++) {
			size_t off;
			uint64_t pick = rnd() % 4;
			if (pick == 0) {
				off = (size_t)(rnd() % db); /* anywhere */
			} else {
				/* page headers and element arrays: the structure */
				size_t pg = (size_t)(rnd() % (db / 4096));
				off = pg * 4096 + (size_t)(rnd() % (pick == 1 ? 16 : 400));
			}
			if (rnd() % 4 == 0)
				p[off] = (uint8_t)rnd();
			else
				p[off] ^= (uint8_t)(1u << (rnd() % 8));
		}
		flips++;
		int err = check_bytes(file, p, db, STORAGE_ETCD_HASH_SKIP);
		if (err == 0) {
			accepted++;
			if (imports > 0) {
				imports--;
				char *dst = t_tmpdir("etcdfmt-fuzz-dst");
				storage_etcd_import_options o = {0};
				o.ei_hash_check = STORAGE_ETCD_HASH_SKIP;
				storage *s;
				if (storage_import_etcd(file, dst, &o, NULL) == 0 &&
				    storage_open(dst, NULL, &s) == 0) {
					/* read what came in: no crash, ranges answer */
					storage_reader *r;
					if (storage_read_begin(s, &r) == 0) {
						storage_arena a;
						storage_arena_init(&a);
						Etcdserverpb__RangeResponse resp;
						range_all(r, 0, &a, &resp);
						storage_arena_free(&a);
						storage_read_end(r);
					}
					storage_close(s);
				}
				free(dst);
			}
		}
	}
	fprintf(stderr, "%s: %d of %d damaged files passed the check (bits in keys/values)\n",
		name, accepted, flips);
	CHECK(accepted < flips);

	/* Garbage of many sizes. */
	for (int i = 0; i < 200; i++) {
		size_t n = (size_t)(rnd() % (5 * 4096));
		for (size_t j = 0; j < n; j++)
			p[j < size ? j : 0] = (uint8_t)rnd();
		if (n <= size)
			CHECK(check_bytes(file, p, n, STORAGE_ETCD_HASH_SKIP) != 0);
	}
	free(p);
	free(file);
}

static void test_damaged(void)
{
	/* A Keelson-written file (freelist page, branch pages, overflow) and etcd's own (no
	 * freelist, inline buckets). */
	char *src = t_tmpdir("etcdfmt-fz-src");
	storage *s;
	CHECK_EQ(storage_open(src, NULL, &s), 0);
	storage_batch *b = begin(s);
	char k[32], v[64];
	static char big[9000];
	memset(big, 'x', sizeof(big));
	for (int i = 0; i < 1500; i++) {
		snprintf(k, sizeof(k), "/f/%d", i % 700);
		snprintf(v, sizeof(v), "v%d", i);
		put(b, k, strlen(k), v, strlen(v), 0);
		if (i % 9 == 0)
			del(b, k, NULL);
	}
	put(b, "/big", 4, big, sizeof(big), 0);
	CHECK_EQ(storage_batch_lease_grant(b, 77, 10), 0);
	CHECK_EQ(storage_batch_commit(b, 1), 0);
	buf snap = {0};
	snapshot_of(s, NULL, &snap, 1);
	storage_close(s);
	fuzz_one("etcdfmt-fz-keelson.db", snap.p, snap.n, 20);
	free(snap.p);
	free(src);

	uint8_t *real = read_file("storage/testdata/etcd34_snapshot.db");
	fuzz_one("etcdfmt-fz-etcd.db", real, real_size, 20);
	free(real);

	/* Hand-made damage at the places that matter. */
	char *file = t_tmpdir("etcdfmt-hand.db");
	real = read_file("storage/testdata/etcd34_snapshot.db");
	size_t db = real_size - 32;
	uint8_t *p = malloc(real_size);
	char eb[512];
	storage_etcd_file_info fi;
	/* both metas broken */
	memcpy(p, real, db);
	p[16] ^= 1;
	p[4096 + 16] ^= 1;
	file_put(file, p, db);
	CHECK_EQ(storage_etcd_check(file, STORAGE_ETCD_HASH_SKIP, &fi, eb, sizeof(eb)), STORAGE_ERR_CORRUPT);
	CHECK(strstr(eb, "no valid meta page") != NULL);
	/* one meta broken: the other one serves */
	memcpy(p, real, db);
	p[4096 + 16 + 40] ^= 1;
	file_put(file, p, db);
	CHECK_EQ(storage_etcd_check(file, STORAGE_ETCD_HASH_SKIP, &fi, eb, sizeof(eb)), 0);
	/* a meta with a valid checksum that points past the end */
	memcpy(p, real, db);
	for (int m = 0; m < 2; m++) {
		uint8_t *mp = p + m * 4096 + 16;
		uint64_t big_pgid = 1ull << 40;
		memcpy(mp + 40, &big_pgid, 8);
		uint64_t h = 14695981039346656037ull;
		for (int i = 0; i < 56; i++) {
			h ^= mp[i];
			h *= 1099511628211ull;
		}
		memcpy(mp + 56, &h, 8);
	}
	file_put(file, p, db);
	CHECK_EQ(storage_etcd_check(file, STORAGE_ETCD_HASH_SKIP, &fi, eb, sizeof(eb)), STORAGE_ERR_CORRUPT);
	CHECK(strstr(eb, "truncated") != NULL);
	/* missing file */
	CHECK(storage_etcd_check("/nonexistent/x.db", STORAGE_ETCD_HASH_SKIP, &fi, eb, sizeof(eb)) != 0);
	free(p);
	free(real);
	free(file);
}

int main(void)
{
	test_round_trip();
	test_visitor_and_small();
	test_real_etcd();
	test_damaged();
	fprintf(stderr, "%d checks, %d failures\n", t_checks, t_fail);
	return t_fail ? 1 : 0;
}
