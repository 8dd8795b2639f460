/*
 * etcdfmt_tool.c - etcd-format snapshots from the command line (see storage.h, etcd section).
 *
 *   etcdfmt_tool write LMDB_DIR OUT [--no-hash] [--index N] [--term N]
 *                [--member ID,NAME,PEER_URL[,CLIENT_URL]]...
 *       writes the store as an etcd backend file plus the SHA-256 trailer (as `etcdctl
 *       snapshot save` stores it; --no-hash: the bare file, as member/snap/db)
 *   etcdfmt_tool import SNAPSHOT LMDB_DIR [--skip-hash-check]
 *   etcdfmt_tool status SNAPSHOT [--skip-hash-check]
 *       JSON as `etcdctl snapshot status -w json`, plus what else the check found
 *   etcdfmt_tool gen LMDB_DIR SEED OPS      a mixed workload through storage_batch_* (tests)
 *   etcdfmt_tool dump LMDB_DIR [REV]        JSON: every key at REV (0: current), leases,
 *                                           HashKV, as etcdctl -w json shows kvs (base64)
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "storage/storage.h"

static int usage(void)
{
	fprintf(stderr,
		"usage: etcdfmt_tool write LMDB_DIR OUT [--no-hash] [--index N] [--term N] "
		"[--member ID,NAME,PEER_URL[,CLIENT_URL]]...\n"
		"       etcdfmt_tool import SNAPSHOT LMDB_DIR [--skip-hash-check]\n"
		"       etcdfmt_tool status SNAPSHOT [--skip-hash-check]\n"
		"       etcdfmt_tool gen LMDB_DIR SEED OPS\n"
		"       etcdfmt_tool dump LMDB_DIR [REV]\n"
		"       etcdfmt_tool wal WAL_DIR      (etcd's member/wal: ids, hard state, entries)\n");
	return 2;
}

static int fd_write(void *ctx, const void *buf, size_t len)
{
	int fd = *(int *)ctx;
	const char *p = buf;
	while (len) {
		ssize_t n = write(fd, p, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return STORAGE_ERR_IO;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

#define MAX_MEMBERS 16

static int cmd_write(int argc, char **argv)
{
	if (argc < 2)
		return usage();
	const char *dir = argv[0], *out = argv[1];
	int nohash = 0;
	storage_snapshot_info info = {0};
	storage_etcd_member members[MAX_MEMBERS];
	char *peer[MAX_MEMBERS], *client[MAX_MEMBERS];
	size_t nm = 0;
	for (int i = 2; i < argc; i++) {
		if (strcmp(argv[i], "--no-hash") == 0) {
			nohash = 1;
		} else if (strcmp(argv[i], "--index") == 0 && i + 1 < argc) {
			info.si_consistent_index = strtoull(argv[++i], NULL, 0);
		} else if (strcmp(argv[i], "--term") == 0 && i + 1 < argc) {
			info.si_term = strtoull(argv[++i], NULL, 0);
		} else if (strcmp(argv[i], "--member") == 0 && i + 1 < argc && nm < MAX_MEMBERS) {
			char *spec = argv[++i];
			char *id = strtok(spec, ","), *name = strtok(NULL, ","), *pu = strtok(NULL, ","),
			     *cu = strtok(NULL, ",");
			if (!id || !name || !pu)
				return usage();
			storage_etcd_member *m = &members[nm];
			memset(m, 0, sizeof(*m));
			m->em_id = strtoull(id, NULL, 16);
			m->em_name = name;
			peer[nm] = pu;
			client[nm] = cu;
			m->em_peer_urls = (const char *const *)&peer[nm];
			m->em_n_peer_urls = 1;
			m->em_client_urls = (const char *const *)&client[nm];
			m->em_n_client_urls = cu ? 1 : 0;
			nm++;
		} else {
			return usage();
		}
	}
	info.si_members = members;
	info.si_n_members = nm;

	storage *s;
	int err = storage_open(dir, NULL, &s);
	if (err) {
		fprintf(stderr, "etcdfmt_tool: %s: %s\n", dir, storage_strerror(err));
		return 1;
	}
	char tmp[4096];
	snprintf(tmp, sizeof(tmp), "%s.part", out);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) {
		fprintf(stderr, "etcdfmt_tool: %s: %s\n", tmp, strerror(errno));
		storage_close(s);
		return 1;
	}
	storage_reader *r;
	err = storage_read_begin(s, &r);
	if (!err) {
		if (nohash)
			err = storage_snapshot_etcd(r, &info, fd_write, &fd, NULL);
		else
			err = storage_snapshot_etcd_stream(r, &info, fd_write, &fd);
		storage_read_end(r);
	}
	if (!err && fsync(fd) != 0)
		err = STORAGE_ERR_IO;
	close(fd);
	if (!err && rename(tmp, out) != 0)
		err = STORAGE_ERR_IO;
	storage_close(s);
	if (err) {
		unlink(tmp);
		fprintf(stderr, "etcdfmt_tool: write: %s\n", storage_strerror(err));
		return 1;
	}
	return 0;
}

static void print_info(const storage_etcd_file_info *in)
{
	printf("{\"hash\":%" PRIu32 ",\"revision\":%" PRId64 ",\"totalKey\":%" PRIu64
	       ",\"totalSize\":%" PRIu64 ",\"storeRevision\":%" PRId64 ",\"compactRevision\":%" PRId64
	       ",\"scheduledCompactRevision\":%" PRId64 ",\"consistentIndex\":%" PRIu64
	       ",\"term\":%" PRIu64 ",\"revisions\":%" PRIu64 ",\"tombstones\":%" PRIu64
	       ",\"leases\":%" PRIu64 ",\"pageSize\":%" PRIu32 ",\"hasSha256\":%s}\n",
	       in->ef_hash, in->ef_revision, in->ef_total_keys, in->ef_total_size,
	       in->ef_store_revision, in->ef_compact_revision, in->ef_scheduled_compact,
	       in->ef_consistent_index, in->ef_term, in->ef_revisions, in->ef_tombstones,
	       in->ef_leases, in->ef_page_size, in->ef_has_sha256 ? "true" : "false");
}

static int cmd_status(int argc, char **argv)
{
	if (argc < 1)
		return usage();
	int mode = argc > 1 && strcmp(argv[1], "--skip-hash-check") == 0 ? STORAGE_ETCD_HASH_SKIP
									 : STORAGE_ETCD_HASH_IF_PRESENT;
	char eb[512];
	storage_etcd_file_info in;
	int err = storage_etcd_check(argv[0], mode, &in, eb, sizeof(eb));
	if (err) {
		fprintf(stderr, "etcdfmt_tool: %s\n", eb[0] ? eb : storage_strerror(err));
		return 1;
	}
	print_info(&in);
	return 0;
}

static int print_entry(void *ctx, const char *bucket, const uint8_t *k, size_t kl,
		       const uint8_t *v, size_t vl)
{
	(void)ctx;
	(void)v;
	fprintf(stderr, "etcdfmt_tool: not imported: %s/%.*s (%zu bytes)\n", bucket, (int)kl,
		(const char *)k, vl);
	return 0;
}

static int cmd_import(int argc, char **argv)
{
	if (argc < 2)
		return usage();
	char eb[512];
	storage_etcd_import_options o = {0};
	o.ei_hash_check = argc > 2 && strcmp(argv[2], "--skip-hash-check") == 0
			  ? STORAGE_ETCD_HASH_SKIP : STORAGE_ETCD_HASH_REQUIRE;
	o.ei_errbuf = eb;
	o.ei_errlen = sizeof(eb);
	o.ei_visit = getenv("ETCDFMT_VERBOSE") ? print_entry : NULL;
	storage_etcd_file_info in;
	int err = storage_import_etcd(argv[0], argv[1], &o, &in);
	if (err) {
		fprintf(stderr, "etcdfmt_tool: %s\n", eb[0] ? eb : storage_strerror(err));
		return 1;
	}
	print_info(&in);
	return 0;
}

/* ---- gen: a deterministic mixed workload ---- */

static uint64_t rng_state;
static uint64_t rnd(void)
{
	rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
	return rng_state >> 33;
}

static void gen_key(char *buf, size_t cap)
{
	static const char *const pfx[] = {"/a/", "/b/", "/registry/pods/", "k"};
	snprintf(buf, cap, "%s%u", pfx[rnd() % 4], (unsigned)(rnd() % 40));
}

static int cmd_gen(int argc, char **argv)
{
	if (argc < 3)
		return usage();
	rng_state = strtoull(argv[1], NULL, 0) * 2654435761u + 1;
	long ops = strtol(argv[2], NULL, 0);
	storage *s;
	int err = storage_open(argv[0], NULL, &s);
	if (err) {
		fprintf(stderr, "etcdfmt_tool: %s: %s\n", argv[0], storage_strerror(err));
		return 1;
	}
	int64_t leases[8] = {0};
	int nleases = 0;
	int64_t next_lease = 0x1000;
	static char big[300000];
	memset(big, 'v', sizeof(big));
	char longkey[700];
	memset(longkey, 'L', sizeof(longkey) - 1);
	longkey[sizeof(longkey) - 1] = 0;
	for (long i = 0; i < ops && !err; i++) {
		storage_batch *b;
		storage_arena a;
		storage_arena_init(&a);
		if ((err = storage_batch_begin(s, &b)))
			break;
		char key[64], val[64];
		unsigned op = (unsigned)(rnd() % 100);
		int rc = 0;
		if (op < 50) {
			Etcdserverpb__PutRequest put = ETCDSERVERPB__PUT_REQUEST__INIT;
			Etcdserverpb__PutResponse pr;
			gen_key(key, sizeof(key));
			snprintf(val, sizeof(val), "v%ld", i);
			put.key.data = (uint8_t *)key;
			put.key.len = strlen(key);
			put.value.data = (uint8_t *)val;
			put.value.len = strlen(val);
			if (op < 3) {
				put.value.data = (uint8_t *)big;
				put.value.len = op == 0 ? 5000 : op == 1 ? 70000 : 0;
			} else if (op < 5) {
				put.key.data = (uint8_t *)longkey;
				put.key.len = strlen(longkey) - op; /* two long keys */
			}
			if (nleases && rnd() % 4 == 0)
				put.lease = leases[rnd() % (uint64_t)nleases];
			rc = storage_batch_put(b, &put, &a, &pr);
		} else if (op < 65) {
			Etcdserverpb__DeleteRangeRequest dr = ETCDSERVERPB__DELETE_RANGE_REQUEST__INIT;
			Etcdserverpb__DeleteRangeResponse dresp;
			gen_key(key, sizeof(key));
			dr.key.data = (uint8_t *)key;
			dr.key.len = strlen(key);
			char end[80];
			if (rnd() % 3 == 0) { /* a small range */
				snprintf(end, sizeof(end), "%s5", key);
				dr.range_end.data = (uint8_t *)end;
				dr.range_end.len = strlen(end);
			}
			rc = storage_batch_delete_range(b, &dr, &a, &dresp);
		} else if (op < 80) {
			/* txn: compare on a version, then two puts and a delete, or one put */
			Etcdserverpb__Compare cmp = ETCDSERVERPB__COMPARE__INIT;
			char ck[64], k1[64], k2[64], k3[64];
			gen_key(ck, sizeof(ck));
			cmp.key.data = (uint8_t *)ck;
			cmp.key.len = strlen(ck);
			cmp.target = ETCDSERVERPB__COMPARE__COMPARE_TARGET__VERSION;
			cmp.result = ETCDSERVERPB__COMPARE__COMPARE_RESULT__GREATER;
			cmp.target_union_case = ETCDSERVERPB__COMPARE__TARGET_UNION_VERSION;
			cmp.version = 0;
			Etcdserverpb__Compare *cmps[1] = {&cmp};
			Etcdserverpb__PutRequest p1 = ETCDSERVERPB__PUT_REQUEST__INIT,
						p2 = ETCDSERVERPB__PUT_REQUEST__INIT;
			Etcdserverpb__DeleteRangeRequest d3 = ETCDSERVERPB__DELETE_RANGE_REQUEST__INIT;
			snprintf(k1, sizeof(k1), "/txn/x%u", (unsigned)(rnd() % 10));
			snprintf(k2, sizeof(k2), "/txn/y%u", (unsigned)(rnd() % 10));
			snprintf(k3, sizeof(k3), "/txn/z%u", (unsigned)(rnd() % 10));
			snprintf(val, sizeof(val), "t%ld", i);
			p1.key.data = (uint8_t *)k1;
			p1.key.len = strlen(k1);
			p1.value.data = (uint8_t *)val;
			p1.value.len = strlen(val);
			p2 = p1;
			p2.key.data = (uint8_t *)k2;
			p2.key.len = strlen(k2);
			d3.key.data = (uint8_t *)k3;
			d3.key.len = strlen(k3);
			Etcdserverpb__RequestOp o1 = ETCDSERVERPB__REQUEST_OP__INIT,
						o2 = ETCDSERVERPB__REQUEST_OP__INIT,
						o3 = ETCDSERVERPB__REQUEST_OP__INIT;
			o1.request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT;
			o1.request_put = &p1;
			o2.request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT;
			o2.request_put = &p2;
			o3.request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_DELETE_RANGE;
			o3.request_delete_range = &d3;
			Etcdserverpb__RequestOp *succ[3] = {&o1, &o2, &o3}, *fail[1] = {&o1};
			Etcdserverpb__TxnRequest t = ETCDSERVERPB__TXN_REQUEST__INIT;
			Etcdserverpb__TxnResponse tr;
			t.n_compare = 1;
			t.compare = cmps;
			t.n_success = 3;
			t.success = succ;
			t.n_failure = 1;
			t.failure = fail;
			rc = storage_batch_txn(b, &t, &a, &tr);
		} else if (op < 87) {
			if (nleases < 8) {
				leases[nleases] = next_lease++;
				rc = storage_batch_lease_grant(b, leases[nleases], 100 + (int64_t)(rnd() % 1000));
				if (rc == 0)
					nleases++;
			}
		} else if (op < 91) {
			if (nleases) {
				int j = (int)(rnd() % (uint64_t)nleases);
				Etcdserverpb__LeaseRevokeResponse lr;
				rc = storage_batch_lease_revoke(b, leases[j], &a, &lr);
				leases[j] = leases[--nleases];
			}
		} else if (i < ops / 2) {
			/* compact somewhere in the recent past (in the first half only, so that
			 * the second half stays readable at every revision) */
			int64_t cur = storage_batch_revision(b);
			Etcdserverpb__CompactionRequest cr = ETCDSERVERPB__COMPACTION_REQUEST__INIT;
			Etcdserverpb__CompactionResponse cresp;
			cr.revision = cur - (int64_t)(rnd() % 10);
			rc = storage_batch_compact(b, &cr, &a, &cresp);
			if (rc == STORAGE_ERR_COMPACTED || rc == STORAGE_ERR_FUTURE_REV)
				rc = 0;
		}
		if (rc && rc != STORAGE_ERR_LEASE_NOT_FOUND && rc != STORAGE_ERR_KEY_NOT_FOUND) {
			fprintf(stderr, "etcdfmt_tool: gen op %ld: %s\n", i, storage_strerror(rc));
			err = rc;
			storage_batch_abort(b);
		} else {
			err = storage_batch_commit(b, (uint64_t)i + 1);
		}
		storage_arena_free(&a);
	}
	storage_close(s);
	if (err) {
		fprintf(stderr, "etcdfmt_tool: gen: %s\n", storage_strerror(err));
		return 1;
	}
	return 0;
}

/* ---- dump ---- */

static void print_b64(const uint8_t *p, size_t n)
{
	static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	putchar('"');
	for (size_t i = 0; i < n; i += 3) {
		uint32_t v = (uint32_t)p[i] << 16;
		if (i + 1 < n)
			v |= (uint32_t)p[i + 1] << 8;
		if (i + 2 < n)
			v |= p[i + 2];
		putchar(tab[v >> 18 & 63]);
		putchar(tab[v >> 12 & 63]);
		putchar(i + 1 < n ? tab[v >> 6 & 63] : '=');
		putchar(i + 2 < n ? tab[v & 63] : '=');
	}
	putchar('"');
}

static int cmd_dump(int argc, char **argv)
{
	if (argc < 1)
		return usage();
	int64_t rev = argc > 1 ? strtoll(argv[1], NULL, 0) : 0;
	storage *s;
	storage_reader *r;
	int err = storage_open(argv[0], NULL, &s);
	if (err) {
		fprintf(stderr, "etcdfmt_tool: %s: %s\n", argv[0], storage_strerror(err));
		return 1;
	}
	if ((err = storage_read_begin(s, &r))) {
		storage_close(s);
		return 1;
	}
	storage_arena a;
	storage_arena_init(&a);
	Etcdserverpb__RangeRequest req = ETCDSERVERPB__RANGE_REQUEST__INIT;
	Etcdserverpb__RangeResponse resp;
	uint8_t zero = 0;
	req.key.data = &zero;
	req.key.len = 1;
	req.range_end.data = &zero;
	req.range_end.len = 1;
	req.revision = rev;
	err = storage_range(r, &req, &a, &resp);
	if (err) {
		fprintf(stderr, "etcdfmt_tool: dump: %s\n", storage_strerror(err));
		goto out;
	}
	storage_stats st;
	storage_stat(s, &st);
	uint32_t hash = 0;
	int64_t hrev = 0, hcompact = 0;
	int herr = storage_hash_kv(r, rev, &hash, &hrev, &hcompact);
	printf("{\"revision\":%" PRId64 ",\"compact_revision\":%" PRId64 ",\"applied\":%" PRIu64,
	       resp.header->revision, st.st_compact_revision, st.st_applied_index);
	if (!herr)
		printf(",\"hashkv\":%" PRIu32, hash);
	printf(",\"count\":%" PRId64 ",\"kvs\":[", resp.count);
	for (size_t i = 0; i < resp.n_kvs; i++) {
		Mvccpb__KeyValue *kv = resp.kvs[i];
		printf("%s{\"key\":", i ? "," : "");
		print_b64(kv->key.data, kv->key.len);
		printf(",\"create_revision\":%" PRId64 ",\"mod_revision\":%" PRId64
		       ",\"version\":%" PRId64 ",\"value\":",
		       kv->create_revision, kv->mod_revision, kv->version);
		print_b64(kv->value.data, kv->value.len);
		if (kv->lease)
			printf(",\"lease\":%" PRId64, kv->lease);
		printf("}");
	}
	printf("],\"leases\":[");
	int64_t *ids, *ttls;
	size_t n;
	if (storage_read_leases(r, &a, &ids, &ttls, NULL, &n) == 0)
		for (size_t i = 0; i < n; i++)
			printf("%s[%" PRId64 ",%" PRId64 "]", i ? "," : "", ids[i], ttls[i]);
	printf("]}\n");
out:
	storage_arena_free(&a);
	storage_read_end(r);
	storage_close(s);
	return err ? 1 : 0;
}

/* Prints what an etcd WAL holds: one line of ids and state, then one line per entry. */
static int cmd_wal(int argc, char **argv)
{
	if (argc != 1)
		return usage();
	storage_etcd_wal w;
	char eb[512];
	int err = storage_etcd_wal_read(argv[0], &w, eb, sizeof(eb));
	if (err) {
		fprintf(stderr, "Error: %s\n", eb);
		return 1;
	}
	printf("member %llx cluster %llx term %llu vote %llx commit %llu snapshot %llu/%llu "
	       "files %zu records %zu entries %zu torn-tail %d\n",
	       (unsigned long long)w.ew_node_id, (unsigned long long)w.ew_cluster_id,
	       (unsigned long long)w.ew_term, (unsigned long long)w.ew_vote,
	       (unsigned long long)w.ew_commit, (unsigned long long)w.ew_snap_index,
	       (unsigned long long)w.ew_snap_term, w.ew_files, w.ew_records, w.ew_n_entries,
	       w.ew_torn_tail);
	for (size_t i = 0; i < w.ew_n_entries; i++)
		printf("entry %llu term %llu type %u bytes %zu\n",
		       (unsigned long long)w.ew_entries[i].we_index,
		       (unsigned long long)w.ew_entries[i].we_term, w.ew_entries[i].we_type,
		       w.ew_entries[i].we_len);
	storage_etcd_wal_free(&w);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return usage();
	const char *cmd = argv[1];
	if (strcmp(cmd, "write") == 0)
		return cmd_write(argc - 2, argv + 2);
	if (strcmp(cmd, "import") == 0)
		return cmd_import(argc - 2, argv + 2);
	if (strcmp(cmd, "status") == 0)
		return cmd_status(argc - 2, argv + 2);
	if (strcmp(cmd, "gen") == 0)
		return cmd_gen(argc - 2, argv + 2);
	if (strcmp(cmd, "dump") == 0)
		return cmd_dump(argc - 2, argv + 2);
	if (strcmp(cmd, "wal") == 0)
		return cmd_wal(argc - 2, argv + 2);
	return usage();
}
