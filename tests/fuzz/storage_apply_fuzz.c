/*
 * storage_apply_fuzz.c - libFuzzer target for storage/: decoded requests applied in batches.
 *
 * Input: a sequence of records [op byte][length varint][body]; op % 16 picks what to do with
 * the body (most bodies are the protobuf encoding of a request, as a client sends it):
 *   0 Put        1 DeleteRange   2 Txn (batch)        3 Range (batch)
 *   4 Range (reader)             5 Txn (reader, storage_read_txn)
 *   6 Compact (CompactionRequest, revision as given)
 *   7 Compact relative: revision = current - (body revision & 0xff)
 *   8 read_events (WatchCreateRequest: start_revision, max events = watch_id & 63, 0 = all)
 *   9 commit     10 abort        11 batch_events + compact_continue(body[0])
 *   12 fill: body[0] puts of (body[1] % 16 + 1) * 64 KiB, to reach NOSPACE in the small map
 *      (op byte 12 exactly, once per input: it is by far the slowest op; 28, 44, ... do nothing)
 *   13 take/drop a long-lived reader (pins old pages, sees an old revision)
 *   14 raw Put: key = body, value = "v"
 *   15 raw Range in the batch: body[0] splits the rest into key and range_end
 * Requests are validated first as the API layer does (storage does not): empty keys,
 * ignore_value/ignore_lease misuse, and for Txn the real wire depth guard of
 * api/grpc_server.c before protobuf-c, then server/kv.c's kv_check_txn (etcd's
 * checkTxnRequest + checkIntervals, --max-txn-ops 128).
 *
 * Checked: no crash, leak or UB; only errors a client may cause (no IO/CORRUPT/NOMEM/
 * INVALID after validation); revisions advance by exactly one per write; Range results lie
 * in the range, respect limit/keys_only/count_only/filters, come sorted; events come in
 * revision order; what a batch saw is what a reader sees after commit; and every state
 * recorded at an earlier commit is still what a Range at that revision returns unless that
 * revision has been compacted away (states recorded by earlier commits of the same input).
 *
 * The store lives in a temp dir (STORAGE_FUZZ_DIR, else /dev/shm, else $TMPDIR or /tmp),
 * opened once with a 4 MiB map (STORAGE_FUZZ_MAP_MB; with 16 MiB a run was 2x slower, with
 * 64 MiB 10x, all of it spent filling the map) and reused across inputs; it is recreated
 * every 128 inputs or when a quarter of the map is in use. STORAGE_FUZZ_FRESH=1
 * recreates it for every input (use it to reproduce a crash from one file);
 * STORAGE_FUZZ_TRACE=1 prints every record as it is applied.
 */
#define _GNU_SOURCE
#include <ftw.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tests/fuzz/api_guard_glue.h"

#include "server/server.h"
#include "storage/storage.h"

#define FUZZ_CHECK(c)                                                                  \
	do {                                                                           \
		if (!(c)) {                                                            \
			fprintf(stderr, "storage_apply_fuzz: %s:%d: check failed: %s\n", \
				__FILE__, __LINE__, #c);                               \
			abort();                                                       \
		}                                                                      \
	} while (0)

/* An error a client request may legitimately get from storage. */
#define FUZZ_CHECK_ERR(e)                                                                     \
	do {                                                                                  \
		int e_ = (e);                                                                 \
		if (!(e_ == 0 || e_ == STORAGE_ERR_COMPACTED || e_ == STORAGE_ERR_FUTURE_REV ||   \
		      e_ == STORAGE_ERR_NOSPACE || e_ == STORAGE_ERR_KEY_NOT_FOUND ||             \
		      e_ == -1010 /* LEASE_NOT_FOUND */)) {                                   \
			fprintf(stderr, "storage_apply_fuzz: %s:%d: unexpected error %d (%s)\n", \
				__FILE__, __LINE__, e_, storage_strerror(e_));                \
			abort();                                                              \
		}                                                                             \
	} while (0)

/* server/kv.c is linked for kv_check_txn(); whatever else of the server it references (the
 * node loop, logging, alarms, ...) is never called here and gets an aborting stub generated
 * by run_api_fuzz.sh from the link errors, so that kv.c may grow without breaking this. */

/* ---- the store ---- */

#define MAX_OPS_PER_INPUT 64
#define AUTO_COMMIT_WRITES 8
#define RESET_EVERY 128
#define MAX_TXN_OPS 128 /* etcd's --max-txn-ops default */
#define MAX_SNAPS 4

typedef struct kvcopy {
	uint8_t *key;
	size_t klen, vlen;
	uint64_t vhash; /* values can be MiBs (op 12): keep a hash */
	int64_t create, mod, version, lease;
} kvcopy;

/* The whole keyspace as a Range at revision rev returned it. */
typedef struct snap {
	int64_t rev;
	size_t n;
	kvcopy *kv;
} snap;

static struct {
	char dir[512];    /* our temp dir */
	char db[600];     /* the store inside it */
	uint64_t map_size;
	int fresh;
	int trace;              /* STORAGE_FUZZ_TRACE: print each record */
	storage *st;
	storage_batch *b;
	storage_reader *held;   /* op 13 */
	int64_t held_rev;
	int64_t rev;            /* revision the open batch is at */
	int64_t committed;      /* revision of the last commit */
	int64_t compacted;      /* highest compaction applied in a committed batch, -1 if none */
	int64_t batch_compacted;
	int writes;             /* writes in the open batch since the last commit */
	unsigned inputs;        /* since the last reset */
	snap snaps[MAX_SNAPS];  /* states at earlier commits, oldest first */
	size_t nsnaps;
	uint8_t *fill;          /* value bytes for op 12 */
	int filled;             /* op 12 ran in this input */
} F;

static void snap_free(snap *s)
{
	for (size_t i = 0; i < s->n; i++)
		free(s->kv[i].key);
	free(s->kv);
	memset(s, 0, sizeof(*s));
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
	(void)sb, (void)flag, (void)ftw;
	remove(path);
	return 0;
}

static void rm_rf(const char *path)
{
	nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static void store_stats(storage_stats *ss)
{
	FUZZ_CHECK(storage_stat(F.st, ss) == 0);
}

static void batch_begin(void)
{
	FUZZ_CHECK(storage_batch_begin(F.st, &F.b) == 0);
	F.rev = F.committed;
	F.batch_compacted = F.compacted;
	F.writes = 0;
}

static void store_close(void)
{
	if (F.b)
		storage_batch_abort(F.b);
	F.b = NULL;
	if (F.held)
		storage_read_end(F.held);
	F.held = NULL;
	if (F.st)
		storage_close(F.st);
	F.st = NULL;
	for (size_t i = 0; i < F.nsnaps; i++)
		snap_free(&F.snaps[i]);
	F.nsnaps = 0;
}

static void store_reset(void)
{
	store_close();
	rm_rf(F.db);
	storage_options o = {F.map_size};
	int err = storage_open(F.db, &o, &F.st);
	if (err) {
		fprintf(stderr, "storage_apply_fuzz: storage_open %s: %s\n", F.db, storage_strerror(err));
		abort();
	}
	storage_stats ss;
	store_stats(&ss);
	FUZZ_CHECK(ss.st_revision == 1);
	F.committed = 1;
	F.compacted = -1;
	F.inputs = 0;
	batch_begin();
}

static void at_exit(void)
{
	store_close();
	if (F.dir[0])
		rm_rf(F.dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc, (void)argv;
	const char *base = getenv("STORAGE_FUZZ_DIR");
	if (!base)
		base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : getenv("TMPDIR");
	if (!base)
		base = "/tmp";
	snprintf(F.dir, sizeof(F.dir), "%s/keelson-storage-fuzz.XXXXXX", base);
	if (!mkdtemp(F.dir)) {
		perror("storage_apply_fuzz: mkdtemp");
		abort();
	}
	snprintf(F.db, sizeof(F.db), "%s/member", F.dir);
	const char *mb = getenv("STORAGE_FUZZ_MAP_MB");
	F.map_size = (uint64_t)(mb ? atoi(mb) : 4) << 20;
	F.fresh = getenv("STORAGE_FUZZ_FRESH") != NULL;
	F.trace = getenv("STORAGE_FUZZ_TRACE") != NULL;
	F.fill = malloc(16 << 16);
	FUZZ_CHECK(F.fill != NULL);
	memset(F.fill, 'f', 16 << 16);
	atexit(at_exit);
	store_reset();
	return 0;
}

/* ---- checks on responses ---- */

static int bytes_cmp(const uint8_t *a, size_t an, const uint8_t *b, size_t bn)
{
	size_t n = an < bn ? an : bn;
	int c = n ? memcmp(a, b, n) : 0;
	if (c)
		return c;
	return an < bn ? -1 : an > bn;
}

/* Is k in the range [key, range_end) as etcd reads it? */
static int in_range(const ProtobufCBinaryData *key, const ProtobufCBinaryData *end,
		    const ProtobufCBinaryData *k)
{
	if (end->len == 0)
		return bytes_cmp(k->data, k->len, key->data, key->len) == 0;
	if (bytes_cmp(k->data, k->len, key->data, key->len) < 0)
		return 0;
	if (end->len == 1 && end->data[0] == 0)
		return 1; /* "\0": every key from key on */
	return bytes_cmp(k->data, k->len, end->data, end->len) < 0;
}

static void check_kv(const Mvccpb__KeyValue *kv, int64_t rev)
{
	FUZZ_CHECK(kv != NULL);
	FUZZ_CHECK(kv->key.len > 0);
	FUZZ_CHECK(kv->create_revision >= 2 && kv->create_revision <= kv->mod_revision);
	FUZZ_CHECK(kv->mod_revision <= rev);
	FUZZ_CHECK(kv->version >= 1);
}

/* at: the revision the range was served at (the view's revision when req->revision <= 0). */
static void check_range(const Etcdserverpb__RangeRequest *req, const Etcdserverpb__RangeResponse *r,
			int64_t view_rev)
{
	FUZZ_CHECK(r->header != NULL);
	FUZZ_CHECK(r->header->revision == view_rev);
	int64_t at = req->revision > 0 ? req->revision : view_rev;
	if (req->count_only)
		FUZZ_CHECK(r->n_kvs == 0);
	FUZZ_CHECK(r->count >= (int64_t)r->n_kvs);
	if (req->limit > 0)
		FUZZ_CHECK((int64_t)r->n_kvs <= req->limit);
	if (r->more)
		FUZZ_CHECK(req->limit > 0);
	int key_order = req->sort_target == ETCDSERVERPB__RANGE_REQUEST__SORT_TARGET__KEY &&
			req->sort_order != ETCDSERVERPB__RANGE_REQUEST__SORT_ORDER__DESCEND;
	for (size_t i = 0; i < r->n_kvs; i++) {
		const Mvccpb__KeyValue *kv = r->kvs[i];
		check_kv(kv, at);
		FUZZ_CHECK(in_range(&req->key, &req->range_end, &kv->key));
		if (req->keys_only)
			FUZZ_CHECK(kv->value.len == 0);
		if (req->min_mod_revision)
			FUZZ_CHECK(kv->mod_revision >= req->min_mod_revision);
		if (req->max_mod_revision)
			FUZZ_CHECK(kv->mod_revision <= req->max_mod_revision);
		if (req->min_create_revision)
			FUZZ_CHECK(kv->create_revision >= req->min_create_revision);
		if (req->max_create_revision)
			FUZZ_CHECK(kv->create_revision <= req->max_create_revision);
		if (i > 0 && key_order)
			FUZZ_CHECK(bytes_cmp(r->kvs[i - 1]->key.data, r->kvs[i - 1]->key.len,
					     kv->key.data, kv->key.len) < 0);
	}
}

/* Events of revisions [from, to]; more than max only to finish the last revision. */
static void check_events(Mvccpb__Event **ev, size_t n, int64_t from, int64_t to, size_t max)
{
	for (size_t i = 0; i < n; i++) {
		const Mvccpb__Event *e = ev[i];
		FUZZ_CHECK(e != NULL && e->kv != NULL);
		int64_t rev = e->kv->mod_revision;
		FUZZ_CHECK(rev >= from && rev <= to);
		FUZZ_CHECK(e->kv->key.len > 0);
		if (i > 0)
			FUZZ_CHECK(ev[i - 1]->kv->mod_revision <= rev);
		if (i >= max)
			FUZZ_CHECK(rev == ev[max - 1]->kv->mod_revision);
		if (e->type == MVCCPB__EVENT__EVENT_TYPE__PUT)
			check_kv(e->kv, to);
		else
			FUZZ_CHECK(e->type == MVCCPB__EVENT__EVENT_TYPE__DELETE);
		if (e->prev_kv) {
			check_kv(e->prev_kv, rev - 1);
			FUZZ_CHECK(bytes_cmp(e->prev_kv->key.data, e->prev_kv->key.len, e->kv->key.data,
					     e->kv->key.len) == 0);
		}
	}
}

/* ---- whole-keyspace snapshots ---- */

static const uint8_t zero_byte[1] = {0};

static Etcdserverpb__RangeRequest all_keys(int64_t rev)
{
	Etcdserverpb__RangeRequest q = ETCDSERVERPB__RANGE_REQUEST__INIT;
	q.key.data = (uint8_t *)zero_byte;
	q.key.len = 1;
	q.range_end.data = (uint8_t *)zero_byte;
	q.range_end.len = 1;
	q.revision = rev;
	return q;
}

/* A value's fingerprint: all of it up to 8 KiB, else its length and first and last 4 KiB
 * (values that big come from op 12 and are uniform; hashing MiBs per commit was the main
 * cost of a run). Not instrumented: its branches say nothing about the code under test. */
__attribute__((no_sanitize("coverage"))) static uint64_t fnv1a(const ProtobufCBinaryData *d)
{
	uint64_t h = 0xcbf29ce484222325ull ^ d->len;
	size_t n = d->len;
	for (size_t i = 0; i < n; i++) {
		if (n > 8192 && i == 4096)
			i = n - 4096;
		h = (h ^ d->data[i]) * 0x100000001b3ull;
	}
	return h;
}

static uint8_t *dup_bytes(const ProtobufCBinaryData *d)
{
	uint8_t *p = malloc(d->len ? d->len : 1);
	FUZZ_CHECK(p != NULL);
	if (d->len)
		memcpy(p, d->data, d->len);
	return p;
}

static void snap_take(const Etcdserverpb__RangeResponse *r, int64_t rev, snap *out)
{
	out->rev = rev;
	out->n = r->n_kvs;
	out->kv = calloc(r->n_kvs ? r->n_kvs : 1, sizeof(kvcopy));
	FUZZ_CHECK(out->kv != NULL);
	for (size_t i = 0; i < r->n_kvs; i++) {
		const Mvccpb__KeyValue *kv = r->kvs[i];
		kvcopy *c = &out->kv[i];
		c->key = dup_bytes(&kv->key);
		c->klen = kv->key.len;
		c->vhash = fnv1a(&kv->value);
		c->vlen = kv->value.len;
		c->create = kv->create_revision;
		c->mod = kv->mod_revision;
		c->version = kv->version;
		c->lease = kv->lease;
	}
}

static void snap_compare(const snap *want, const Etcdserverpb__RangeResponse *got, const char *what)
{
	int same = want->n == got->n_kvs;
	for (size_t i = 0; same && i < want->n; i++) {
		const kvcopy *w = &want->kv[i];
		const Mvccpb__KeyValue *g = got->kvs[i];
		same = bytes_cmp(w->key, w->klen, g->key.data, g->key.len) == 0 &&
		       w->vlen == g->value.len && w->vhash == fnv1a(&g->value) &&
		       w->create == g->create_revision && w->mod == g->mod_revision &&
		       w->version == g->version && w->lease == g->lease;
	}
	if (!same) {
		fprintf(stderr, "storage_apply_fuzz: %s: state at revision %lld differs (%zu keys, now %zu)\n",
			what, (long long)want->rev, want->n, got->n_kvs);
		abort();
	}
}

/* ---- applying one input ---- */

typedef struct rd {
	const uint8_t *p, *e;
} rd;

static int rd_varint(rd *r, uint64_t *v)
{
	*v = 0;
	for (int shift = 0; shift < 64 && r->p < r->e; shift += 7) {
		uint8_t b = *r->p++;
		*v |= (uint64_t)(b & 0x7f) << shift;
		if (!(b & 0x80))
			return 0;
	}
	return -1;
}

static void note_write(int64_t new_rev, int wrote)
{
	FUZZ_CHECK(new_rev == F.rev + (wrote ? 1 : 0));
	F.rev = new_rev;
	if (wrote)
		F.writes++;
}

static void do_commit(void)
{
	storage_arena a;
	storage_arena_init(&a);
	/* What the batch sees now must be what a reader sees after the commit. */
	Etcdserverpb__RangeRequest q = all_keys(0);
	Etcdserverpb__RangeResponse before;
	int err = storage_batch_range(F.b, &q, &a, &before);
	FUZZ_CHECK(err == 0);
	check_range(&q, &before, F.rev);
	snap s = {0};
	snap_take(&before, F.rev, &s);
	storage_arena_free(&a);

	err = storage_batch_commit(F.b, (uint64_t)F.rev);
	F.b = NULL;
	FUZZ_CHECK(err == 0 || err == STORAGE_ERR_NOSPACE);
	if (err == 0) {
		F.committed = F.rev;
		F.compacted = F.batch_compacted;
	}
	storage_stats ss;
	store_stats(&ss);
	FUZZ_CHECK(ss.st_revision == F.committed);
	FUZZ_CHECK(ss.st_compact_revision == (F.compacted < 0 ? 0 : F.compacted));
	if (err) {
		snap_free(&s);
		batch_begin();
		return;
	}

	storage_reader *r;
	FUZZ_CHECK(storage_read_begin(F.st, &r) == 0);
	storage_arena_init(&a);
	Etcdserverpb__RangeResponse after;
	FUZZ_CHECK(storage_range(r, &q, &a, &after) == 0);
	check_range(&q, &after, F.committed);
	snap_compare(&s, &after, "after commit");
	/* Earlier states stay readable at their revision until compacted. */
	for (size_t i = 0; i < F.nsnaps; i++) {
		Etcdserverpb__RangeRequest oq = all_keys(F.snaps[i].rev);
		Etcdserverpb__RangeResponse old;
		err = storage_range(r, &oq, &a, &old);
		if (F.snaps[i].rev < F.compacted) {
			FUZZ_CHECK(err == STORAGE_ERR_COMPACTED);
			continue;
		}
		FUZZ_CHECK(err == 0);
		check_range(&oq, &old, F.committed);
		snap_compare(&F.snaps[i], &old, "history");
	}
	storage_arena_free(&a);
	storage_read_end(r);

	if (F.nsnaps > 0 && F.snaps[F.nsnaps - 1].rev == s.rev) {
		snap_free(&s);
	} else {
		if (F.nsnaps == MAX_SNAPS) {
			snap_free(&F.snaps[0]);
			memmove(&F.snaps[0], &F.snaps[1], (MAX_SNAPS - 1) * sizeof(snap));
			memset(&F.snaps[MAX_SNAPS - 1], 0, sizeof(snap));
			F.nsnaps--;
		}
		F.snaps[F.nsnaps++] = s;
	}
	batch_begin();
}

static int put_ok(const Etcdserverpb__PutRequest *r)
{
	if (r->key.len == 0)
		return 0;
	if (r->ignore_value && r->value.len != 0)
		return 0;
	if (r->ignore_lease && r->lease != 0)
		return 0;
	return 1;
}

static void op_put(const Etcdserverpb__PutRequest *req, storage_arena *a)
{
	Etcdserverpb__PutResponse resp;
	int err = storage_batch_put(F.b, req, a, &resp);
	FUZZ_CHECK_ERR(err);
	if (err)
		return;
	FUZZ_CHECK(resp.header != NULL);
	note_write(resp.header->revision, 1);
	if (resp.prev_kv) {
		check_kv(resp.prev_kv, F.rev - 1);
		FUZZ_CHECK(bytes_cmp(resp.prev_kv->key.data, resp.prev_kv->key.len, req->key.data,
				     req->key.len) == 0);
	}
}

static void op_range_batch(const Etcdserverpb__RangeRequest *req, storage_arena *a)
{
	Etcdserverpb__RangeResponse resp;
	int err = storage_batch_range(F.b, req, a, &resp);
	FUZZ_CHECK_ERR(err);
	if (err == 0)
		check_range(req, &resp, F.rev);
	else
		FUZZ_CHECK(err == STORAGE_ERR_COMPACTED || err == STORAGE_ERR_FUTURE_REV);
}

/* Range or read-only Txn through the held reader or a new one. */
static void op_read(const ProtobufCMessage *m, storage_arena *a)
{
	storage_reader *r = F.held;
	int64_t rev = F.held_rev;
	if (!r) {
		FUZZ_CHECK(storage_read_begin(F.st, &r) == 0);
		rev = F.committed;
	}
	int err;
	if (m->descriptor == &etcdserverpb__range_request__descriptor) {
		const Etcdserverpb__RangeRequest *req = (const void *)m;
		Etcdserverpb__RangeResponse resp;
		err = storage_range(r, req, a, &resp);
		FUZZ_CHECK_ERR(err);
		if (err == 0)
			check_range(req, &resp, rev);
	} else {
		Etcdserverpb__TxnResponse resp;
		err = storage_read_txn(r, (const void *)m, a, &resp);
		if (err != STORAGE_ERR_INVALID) /* a txn that writes */
			FUZZ_CHECK_ERR(err);
		if (err == 0)
			FUZZ_CHECK(resp.header != NULL && resp.header->revision == rev);
	}
	if (r != F.held)
		storage_read_end(r);
}

static void op_events(const Etcdserverpb__WatchCreateRequest *w, storage_arena *a)
{
	storage_reader *r = F.held;
	int64_t rev = F.held_rev;
	if (!r) {
		FUZZ_CHECK(storage_read_begin(F.st, &r) == 0);
		rev = F.committed;
	}
	int64_t from = w->start_revision > 0 ? w->start_revision : rev + 1;
	size_t max = (size_t)(w->watch_id & 63);
	if (max == 0)
		max = (size_t)-1;
	Mvccpb__Event **ev;
	size_t n;
	int64_t rrev, crev;
	int err = storage_read_events(r, from, max, a, &ev, &n, &rrev, &crev);
	FUZZ_CHECK(err == 0 || err == STORAGE_ERR_COMPACTED);
	FUZZ_CHECK(rrev == rev);
	if (err == 0)
		check_events(ev, n, from, rev, max);
	if (r != F.held)
		storage_read_end(r);
}

static void op_compact(int64_t revision, storage_arena *a)
{
	Etcdserverpb__CompactionRequest req = ETCDSERVERPB__COMPACTION_REQUEST__INIT;
	req.revision = revision;
	Etcdserverpb__CompactionResponse resp;
	int err = storage_batch_compact(F.b, &req, a, &resp);
	FUZZ_CHECK_ERR(err);
	if (revision <= F.batch_compacted)
		FUZZ_CHECK(err == STORAGE_ERR_COMPACTED);
	else if (revision > F.rev)
		FUZZ_CHECK(err == STORAGE_ERR_FUTURE_REV);
	else
		FUZZ_CHECK(err == 0 || err == STORAGE_ERR_NOSPACE);
	if (err == 0) {
		FUZZ_CHECK(resp.header != NULL && resp.header->revision == F.rev);
		F.batch_compacted = revision;
	}
}

static void op_fill(const uint8_t *body, size_t len, storage_arena *a)
{
	/* Writing a map's worth of values is what makes an input slow: once per input. */
	if (F.filled++)
		return;
	unsigned count = len > 0 ? body[0] : 1;
	size_t vsize = (size_t)((len > 1 ? body[1] % 16 : 15) + 1) << 16;
	int nospace = 0, writes = F.writes;
	for (unsigned i = 0; i < count && !nospace; i++) {
		char key[16];
		snprintf(key, sizeof(key), "fill/%u", i % 4);
		Etcdserverpb__PutRequest req = ETCDSERVERPB__PUT_REQUEST__INIT;
		req.key.data = (uint8_t *)key;
		req.key.len = strlen(key);
		req.value.data = F.fill;
		req.value.len = vsize;
		Etcdserverpb__PutResponse resp;
		int err = storage_batch_put(F.b, &req, a, &resp);
		FUZZ_CHECK(err == 0 || err == STORAGE_ERR_NOSPACE);
		if (err == 0)
			note_write(resp.header->revision, 1);
		nospace = err == STORAGE_ERR_NOSPACE;
		storage_arena_free(a);
	}
	F.writes = writes; /* whether the fill gets committed is the input's choice */
	if (F.trace)
		fprintf(stderr, "storage_apply_fuzz: fill: %s at revision %lld\n",
			nospace ? "NOSPACE" : "no NOSPACE", (long long)F.rev);
	if (nospace) {
		/* A failed request leaves the batch usable. */
		Etcdserverpb__RangeRequest q = all_keys(0);
		q.count_only = 1;
		Etcdserverpb__RangeResponse resp;
		FUZZ_CHECK(storage_batch_range(F.b, &q, a, &resp) == 0);
		check_range(&q, &resp, F.rev);
	}
}

static void apply_record(uint8_t op, const uint8_t *body, size_t len)
{
	static const char *const names[16] = {
		"put", "delete", "txn", "range(batch)", "range(reader)", "txn(reader)", "compact",
		"compact(rel)", "events", "commit", "abort", "batch_events", "fill", "hold",
		"put(raw)", "range(raw)"};
	if (F.trace)
		fprintf(stderr, "storage_apply_fuzz: rev %lld committed %lld compacted %lld: %s, %zu bytes\n",
			(long long)F.rev, (long long)F.committed, (long long)F.batch_compacted,
			names[op % 16], len);
	storage_arena a;
	storage_arena_init(&a);
	ProtobufCMessage *m = NULL;
	switch (op % 16) {
	case 0:
		m = protobuf_c_message_unpack(&etcdserverpb__put_request__descriptor, NULL, len, body);
		if (m && put_ok((void *)m))
			op_put((void *)m, &a);
		break;
	case 1: {
		m = protobuf_c_message_unpack(&etcdserverpb__delete_range_request__descriptor, NULL, len,
					      body);
		const Etcdserverpb__DeleteRangeRequest *req = (void *)m;
		if (!m || req->key.len == 0)
			break;
		Etcdserverpb__DeleteRangeResponse resp;
		int err = storage_batch_delete_range(F.b, req, &a, &resp);
		FUZZ_CHECK_ERR(err);
		if (err)
			break;
		FUZZ_CHECK(resp.header != NULL && resp.deleted >= 0);
		note_write(resp.header->revision, resp.deleted > 0);
		if (req->prev_kv)
			FUZZ_CHECK(resp.n_prev_kvs == (size_t)resp.deleted);
		for (size_t i = 0; i < resp.n_prev_kvs; i++) {
			check_kv(resp.prev_kvs[i], F.rev - 1);
			FUZZ_CHECK(in_range(&req->key, &req->range_end, &resp.prev_kvs[i]->key));
		}
		break;
	}
	case 2:
	case 5: {
		if (!fuzz_txn_wire_ok(body, len))
			break;
		m = protobuf_c_message_unpack(&etcdserverpb__txn_request__descriptor, NULL, len, body);
		if (!m || kv_check_txn((void *)m, MAX_TXN_OPS) != 0)
			break;
		if (op % 16 == 5) {
			op_read(m, &a);
			break;
		}
		Etcdserverpb__TxnResponse resp;
		int err = storage_batch_txn(F.b, (void *)m, &a, &resp);
		FUZZ_CHECK_ERR(err);
		if (err)
			break;
		FUZZ_CHECK(resp.header != NULL);
		FUZZ_CHECK(resp.header->revision == F.rev || resp.header->revision == F.rev + 1);
		note_write(resp.header->revision, resp.header->revision == F.rev + 1);
		break;
	}
	case 3:
	case 4: {
		m = protobuf_c_message_unpack(&etcdserverpb__range_request__descriptor, NULL, len, body);
		if (!m || ((Etcdserverpb__RangeRequest *)m)->key.len == 0)
			break;
		if (op % 16 == 3)
			op_range_batch((void *)m, &a);
		else
			op_read(m, &a);
		break;
	}
	case 6:
	case 7: {
		m = protobuf_c_message_unpack(&etcdserverpb__compaction_request__descriptor, NULL, len,
					      body);
		if (!m)
			break;
		int64_t rev = ((Etcdserverpb__CompactionRequest *)m)->revision;
		op_compact(op % 16 == 6 ? rev : F.rev - (rev & 0xff), &a);
		break;
	}
	case 8:
		m = protobuf_c_message_unpack(&etcdserverpb__watch_create_request__descriptor, NULL, len,
					      body);
		if (m)
			op_events((void *)m, &a);
		break;
	case 9:
		do_commit();
		break;
	case 10:
		storage_batch_abort(F.b);
		F.b = NULL;
		batch_begin();
		break;
	case 11: {
		Mvccpb__Event **ev;
		size_t n;
		int64_t rev;
		int err = storage_batch_events(F.b, &a, &ev, &n, &rev);
		FUZZ_CHECK(err == 0);
		FUZZ_CHECK(rev == F.rev);
		check_events(ev, n, F.committed + 1, F.rev, (size_t)-1);
		int done = 0;
		err = storage_batch_compact_continue(F.b, len ? body[0] : 1, &done);
		FUZZ_CHECK(err == 0 || err == STORAGE_ERR_NOSPACE);
		break;
	}
	case 12:
		/* Only the exact byte: random mutations of op bytes would fill far too often. */
		if (op == 12)
			op_fill(body, len, &a);
		break;
	case 13:
		if (F.held) {
			storage_read_end(F.held);
			F.held = NULL;
		} else {
			FUZZ_CHECK(storage_read_begin(F.st, &F.held) == 0);
			F.held_rev = F.committed;
		}
		break;
	case 14: {
		if (len == 0)
			break;
		Etcdserverpb__PutRequest req = ETCDSERVERPB__PUT_REQUEST__INIT;
		req.key.data = (uint8_t *)body;
		req.key.len = len;
		req.value.data = (uint8_t *)"v";
		req.value.len = 1;
		req.prev_kv = 1;
		op_put(&req, &a);
		break;
	}
	case 15: {
		if (len < 2)
			break;
		size_t split = 1 + body[0] % (len - 1);
		Etcdserverpb__RangeRequest req = ETCDSERVERPB__RANGE_REQUEST__INIT;
		req.key.data = (uint8_t *)body + 1;
		req.key.len = split;
		req.range_end.data = (uint8_t *)body + 1 + split;
		req.range_end.len = len - 1 - split;
		if (req.key.len > 0)
			op_range_batch(&req, &a);
		break;
	}
	}
	if (m)
		protobuf_c_message_free_unpacked(m, NULL);
	storage_arena_free(&a);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	storage_stats ss;
	store_stats(&ss);
	if (F.fresh || ++F.inputs > RESET_EVERY || ss.st_db_size_in_use > F.map_size / 4)
		store_reset();

	F.filled = 0;
	rd r = {data, data + size};
	for (int nops = 0; nops < MAX_OPS_PER_INPUT && r.p < r.e; nops++) {
		uint8_t op = *r.p++;
		uint64_t len;
		if (rd_varint(&r, &len))
			break;
		if (len > (uint64_t)(r.e - r.p))
			len = (uint64_t)(r.e - r.p);
		apply_record(op, r.p, (size_t)len);
		r.p += len;
		if (F.writes >= AUTO_COMMIT_WRITES)
			do_commit();
	}
	/* Every input ends committed; a held reader and the recorded states do not outlive
	 * their input (libFuzzer re-runs an input under LeakSanitizer whenever its mallocs and
	 * frees do not match, which is slow). */
	do_commit();
	if (F.held) {
		storage_read_end(F.held);
		F.held = NULL;
	}
	for (size_t i = 0; i < F.nsnaps; i++)
		snap_free(&F.snaps[i]);
	F.nsnaps = 0;
	return 0;
}
