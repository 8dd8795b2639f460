/*
 * model_test.c - random Put/DeleteRange/Range/Txn/Compact sequences, each checked against a
 * plain in-memory model of etcd's MVCC (every event of every key kept in arrays).
 * Usage: model_test [seed [ops]]; the seed is printed and reproduces a failing run.
 */
#include <time.h>

#include "crc32c/crc32c.h"
#include "storage/internal.h"
#include "storage/oldrecords.h"
#include "storage/testutil.h"

static long n_kvs_seen, n_txn_ok, n_err, n_compacts;

/* ---- the model ---- */

typedef struct ev {
	int64_t main, sub, create, version, lease;
	int tomb;
	char val[8];
	size_t vlen;
} ev;

typedef struct mkey {
	char *k;
	size_t n;
	ev *evs;
	size_t nev, cap;
} mkey;

#define NKEYS 48
static mkey K[NKEYS];
static int64_t m_rev, m_compact, m_changes;

static unsigned long long rs;
static unsigned r32(void)
{
	rs ^= rs << 13;
	rs ^= rs >> 7;
	rs ^= rs << 17;
	return (unsigned)(rs >> 11);
}
static int chance(int pct) { return (int)(r32() % 100) < pct; }

static int key_cmp(const void *a, const void *b)
{
	const mkey *x = a, *y = b;
	return storage__bytes_cmp(x->k, x->n, y->k, y->n);
}

static void make_keys(void)
{
	char pre[400];
	memset(pre, 'L', sizeof(pre));
	for (int i = 0; i < NKEYS; i++) {
		size_t n;
		char buf[6000];
		switch (i % 6) {
		case 0: case 1: case 2:
			n = (size_t)snprintf(buf, sizeof(buf), "%c%s%d", 'a' + (int)(r32() % 4),
					     chance(50) ? "/" : "", (int)(r32() % 20));
			break;
		case 3: /* around 400 bytes, sharing a prefix */
			n = 398 + r32() % 5;
			memcpy(buf, pre, 400);
			for (size_t j = 390; j < n; j++)
				buf[j] = "LMN"[r32() % 3];
			break;
		case 4: /* long, same bucket */
			n = 400 + r32() % 3000;
			memcpy(buf, pre, 400);
			for (size_t j = 400; j < n; j++)
				buf[j] = "LMN"[r32() % 3];
			break;
		default: /* long, other buckets */
			n = 400 + r32() % 1000;
			for (size_t j = 0; j < n; j++)
				buf[j] = "bc"[r32() % 2];
			break;
		}
		K[i].k = malloc(n);
		memcpy(K[i].k, buf, n);
		K[i].n = n;
	}
	qsort(K, NKEYS, sizeof(mkey), key_cmp);
	/* drop duplicates by making them distinct */
	for (int i = 1; i < NKEYS; i++)
		if (key_cmp(&K[i - 1], &K[i]) == 0) {
			K[i].k = realloc(K[i].k, K[i].n + 1);
			K[i].k[K[i].n++] = 'z';
		}
	qsort(K, NKEYS, sizeof(mkey), key_cmp);
}

static ev *m_at(mkey *k, int64_t rev)
{
	ev *e = NULL;
	for (size_t i = 0; i < k->nev && k->evs[i].main <= rev; i++)
		e = &k->evs[i];
	return e && !e->tomb ? e : NULL;
}

static void m_push(mkey *k, ev e)
{
	if (k->nev == k->cap) {
		k->cap = k->cap ? k->cap * 2 : 8;
		k->evs = realloc(k->evs, k->cap * sizeof(ev));
	}
	k->evs[k->nev++] = e;
}

static int in_range(mkey *k, const ProtobufCBinaryData *key, const ProtobufCBinaryData *end)
{
	int c = storage__bytes_cmp(k->k, k->n, key->data, key->len);
	if (end->len == 0)
		return c == 0;
	if (c < 0)
		return 0;
	if (end->len == 1 && end->data[0] == 0)
		return 1;
	return storage__bytes_cmp(k->k, k->n, end->data, end->len) < 0;
}

static mkey *find_key(const ProtobufCBinaryData *key)
{
	for (int i = 0; i < NKEYS; i++)
		if (storage__bytes_cmp(K[i].k, K[i].n, key->data, key->len) == 0)
			return &K[i];
	return NULL;
}

static int64_t m_cur(void) { return m_rev + (m_changes > 0); }

/* ---- comparing storage's answers with the model's ---- */

static unsigned long long seed;
static int failed;
static long op_no;
#define FAIL(...)                                                                      \
	do {                                                                           \
		if (!failed)                                                           \
			fprintf(stderr, "seed %llu op %ld: ", seed, op_no);            \
		fprintf(stderr, __VA_ARGS__);                                          \
		fprintf(stderr, " (%s:%d)\n", __FILE__, __LINE__);                     \
		failed = 1;                                                            \
	} while (0)

static void kv_check(const Mvccpb__KeyValue *kv, mkey *k, ev *e, int with_value)
{
	if (!kv) {
		FAIL("missing kv");
		return;
	}
	if (storage__bytes_cmp(kv->key.data, kv->key.len, k->k, k->n))
		FAIL("key mismatch (len %zu vs %zu)", kv->key.len, k->n);
	if (kv->create_revision != e->create || kv->mod_revision != e->main ||
	    kv->version != e->version || kv->lease != e->lease)
		FAIL("kv meta mismatch: got c%lld m%lld v%lld l%lld want c%lld m%lld v%lld l%lld",
		     (long long)kv->create_revision, (long long)kv->mod_revision,
		     (long long)kv->version, (long long)kv->lease, (long long)e->create,
		     (long long)e->main, (long long)e->version, (long long)e->lease);
	size_t vl = with_value ? e->vlen : 0;
	if (kv->value.len != vl || (vl && memcmp(kv->value.data, e->val, vl)))
		FAIL("value mismatch");
}

typedef struct mhit {
	mkey *k;
	ev *e;
} mhit;

static int sort_tgt, sort_dsc;
static int64_t hit_field(const mhit *h)
{
	switch (sort_tgt) {
	case 1: return h->e->version;
	case 2: return h->e->create;
	case 3: return h->e->main;
	default: return 0;
	}
}
static int hit_cmp(const mhit *a, const mhit *b)
{
	int c;
	if (sort_tgt == 0)
		c = storage__bytes_cmp(a->k->k, a->k->n, b->k->k, b->k->n);
	else if (sort_tgt == 4)
		c = storage__bytes_cmp(a->e->val, a->e->vlen, b->e->val, b->e->vlen);
	else
		c = (hit_field(a) > hit_field(b)) - (hit_field(a) < hit_field(b));
	return sort_dsc ? -c : c;
}

/* The model's Range, as etcd's apply.go Range. Returns 0 or an error code. */
static int m_range(const Etcdserverpb__RangeRequest *q, int64_t check_rev,
		   const Etcdserverpb__RangeResponse *got)
{
	int64_t cur = m_cur();
	int64_t rev = q->revision;
	if (rev > cur)
		return STORAGE_ERR_FUTURE_REV;
	if (rev <= 0)
		rev = cur;
	if (rev < m_compact)
		return STORAGE_ERR_COMPACTED;
	if (!got)
		return 0;
	mhit hits[NKEYS];
	int n = 0, count = 0;
	int filt = q->min_mod_revision || q->max_mod_revision || q->min_create_revision ||
		   q->max_create_revision;
	int fetch = (q->sort_order || filt) ? NKEYS : q->limit > 0 ? (int)q->limit + 1 : NKEYS;
	for (int i = 0; i < NKEYS; i++) {
		if (!in_range(&K[i], &q->key, &q->range_end))
			continue;
		ev *e = m_at(&K[i], rev);
		if (!e)
			continue;
		count++;
		if (!q->count_only && n < fetch)
			hits[n++] = (mhit){&K[i], e};
	}
	int m = 0;
	for (int i = 0; i < n; i++) {
		ev *e = hits[i].e;
		if ((q->max_mod_revision && e->main > q->max_mod_revision) ||
		    (q->min_mod_revision && e->main < q->min_mod_revision) ||
		    (q->max_create_revision && e->create > q->max_create_revision) ||
		    (q->min_create_revision && e->create < q->min_create_revision))
			continue;
		hits[m++] = hits[i];
	}
	n = m;
	int order = q->sort_order;
	if (q->sort_target && !order)
		order = 1;
	if (order) {
		sort_tgt = q->sort_target;
		sort_dsc = order == 2;
		/* insertion sort: stable */
		for (int i = 1; i < n; i++)
			for (int j = i; j > 0 && hit_cmp(&hits[j], &hits[j - 1]) < 0; j--) {
				mhit t = hits[j];
				hits[j] = hits[j - 1];
				hits[j - 1] = t;
			}
	}
	int more = 0;
	if (q->limit > 0 && n > q->limit) {
		n = (int)q->limit;
		more = 1;
	}
	if (got->count != count)
		FAIL("range count %lld want %d", (long long)got->count, count);
	if ((int)got->n_kvs != n)
		FAIL("range n_kvs %zu want %d", got->n_kvs, n);
	if (got->more != more)
		FAIL("range more %d want %d", got->more, more);
	if (!got->header || got->header->revision != check_rev)
		FAIL("range header revision %lld want %lld",
		     got->header ? (long long)got->header->revision : -1LL, (long long)check_rev);
	n_kvs_seen += n;
	for (int i = 0; i < n && i < (int)got->n_kvs; i++)
		kv_check(got->kvs[i], hits[i].k, hits[i].e, !q->keys_only);
	return 0;
}

static int m_apply_err; /* a put with ignore_* met a missing key while applying a txn */

static void m_put_apply(const Etcdserverpb__PutRequest *q, const Etcdserverpb__PutResponse *got)
{
	mkey *k = find_key(&q->key);
	ev *prev = m_at(k, m_cur());
	if ((q->ignore_value || q->ignore_lease) && !prev) {
		m_apply_err = STORAGE_ERR_KEY_NOT_FOUND;
		return;
	}
	ev e = {0};
	e.main = m_rev + 1;
	e.sub = m_changes++;
	e.create = prev ? prev->create : e.main;
	e.version = prev ? prev->version + 1 : 1;
	e.lease = q->ignore_lease ? prev->lease : q->lease;
	if (q->ignore_value) {
		memcpy(e.val, prev->val, prev->vlen);
		e.vlen = prev->vlen;
	} else {
		memcpy(e.val, q->value.data, q->value.len);
		e.vlen = q->value.len;
	}
	if (got) {
		if (!got->header || got->header->revision != m_rev + 1)
			FAIL("put header revision");
		if (q->prev_kv && prev)
			kv_check(got->prev_kv, k, prev, 1);
		else if (got->prev_kv)
			FAIL("unexpected prev_kv");
	}
	m_push(k, e);
}

static void m_del_apply(const Etcdserverpb__DeleteRangeRequest *q,
			const Etcdserverpb__DeleteRangeResponse *got)
{
	int n = 0;
	int64_t cur = m_cur();
	for (int i = 0; i < NKEYS; i++) {
		if (!in_range(&K[i], &q->key, &q->range_end))
			continue;
		ev *e = m_at(&K[i], cur);
		if (!e)
			continue;
		if (got && q->prev_kv) {
			if (n < (int)got->n_prev_kvs)
				kv_check(got->prev_kvs[n], &K[i], e, 1);
		}
		ev t = {0};
		t.main = m_rev + 1;
		t.sub = m_changes++;
		t.tomb = 1;
		m_push(&K[i], t);
		n++;
	}
	if (got) {
		if (got->deleted != n)
			FAIL("deleted %lld want %d", (long long)got->deleted, n);
		if (q->prev_kv && (int)got->n_prev_kvs != n)
			FAIL("prev_kvs %zu want %d", got->n_prev_kvs, n);
		int64_t hr = (n || m_changes) ? m_rev + 1 : m_rev;
		if (!got->header || got->header->revision != hr)
			FAIL("delete header revision %lld want %lld",
			     got->header ? (long long)got->header->revision : -1LL, (long long)hr);
	}
}

static int m_compare(const Etcdserverpb__Compare *c)
{
	int any = 0;
	for (int i = 0; i < NKEYS; i++) {
		if (!in_range(&K[i], &c->key, &c->range_end))
			continue;
		ev *e = m_at(&K[i], m_cur());
		if (!e)
			continue;
		any = 1;
		int r;
		if (c->target == 3)
			r = storage__bytes_cmp(e->val, e->vlen, c->value.data, c->value.len);
		else {
			int64_t have = c->target == 0 ? e->version : c->target == 1 ? e->create
							: c->target == 2 ? e->main : e->lease;
			int64_t want = c->target == 0 ? c->version : c->target == 1 ? c->create_revision
							: c->target == 2 ? c->mod_revision : c->lease;
			r = (have > want) - (have < want);
		}
		int ok = c->result == 0 ? r == 0 : c->result == 1 ? r > 0 : c->result == 2 ? r < 0 : r != 0;
		if (!ok)
			return 0;
	}
	if (!any) {
		if (c->target == 3)
			return 0;
		int64_t want = c->target == 0 ? c->version : c->target == 1 ? c->create_revision
						: c->target == 2 ? c->mod_revision : c->lease;
		int r = (0 > want) - (0 < want);
		return c->result == 0 ? r == 0 : c->result == 1 ? r > 0 : c->result == 2 ? r < 0 : r != 0;
	}
	return 1;
}

/* Path of a txn (preorder), compares against the pre-txn state. */
static void m_path(const Etcdserverpb__TxnRequest *t, int *path, int *np)
{
	int ok = 1;
	for (size_t i = 0; i < t->n_compare && ok; i++)
		ok = m_compare(t->compare[i]);
	path[(*np)++] = ok;
	size_t n = ok ? t->n_success : t->n_failure;
	Etcdserverpb__RequestOp **ops = ok ? t->success : t->failure;
	for (size_t i = 0; i < n; i++)
		if (ops[i]->request_case == ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_TXN)
			m_path(ops[i]->request_txn, path, np);
}

static int m_check(const Etcdserverpb__TxnRequest *t, const int *path, int *ip, int puts)
{
	int ok = path[(*ip)++];
	size_t n = ok ? t->n_success : t->n_failure;
	Etcdserverpb__RequestOp **ops = ok ? t->success : t->failure;
	for (size_t i = 0; i < n; i++) {
		const Etcdserverpb__RequestOp *op = ops[i];
		if (op->request_case == ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT && puts) {
			const Etcdserverpb__PutRequest *p = op->request_put;
			if ((p->ignore_value || p->ignore_lease) && !m_at(find_key(&p->key), m_cur()))
				return STORAGE_ERR_KEY_NOT_FOUND;
		} else if (op->request_case == ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_RANGE && !puts) {
			int64_t r = op->request_range->revision;
			if (r && r > m_cur())
				return STORAGE_ERR_FUTURE_REV;
			if (r && r < m_compact)
				return STORAGE_ERR_COMPACTED;
		} else if (op->request_case == ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_TXN) {
			int err = m_check(op->request_txn, path, ip, puts);
			if (err)
				return err;
		}
	}
	return 0;
}

static void m_txn_apply(const Etcdserverpb__TxnRequest *t, const int *path, int *ip,
			const Etcdserverpb__TxnResponse *got)
{
	int ok = path[(*ip)++];
	size_t n = ok ? t->n_success : t->n_failure;
	Etcdserverpb__RequestOp **ops = ok ? t->success : t->failure;
	if (got && got->succeeded != ok)
		FAIL("txn succeeded %d want %d", got->succeeded, ok);
	if (got && got->n_responses != n) {
		FAIL("txn responses %zu want %zu", got->n_responses, n);
		return;
	}
	for (size_t i = 0; i < n && !m_apply_err; i++) {
		const Etcdserverpb__RequestOp *op = ops[i];
		const Etcdserverpb__ResponseOp *ro = got ? got->responses[i] : NULL;
		if (ro && (int)ro->response_case != (int)op->request_case) {
			FAIL("txn response kind");
			return;
		}
		switch (op->request_case) {
		case ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_RANGE:
			m_range(op->request_range, m_cur(), ro ? ro->response_range : NULL);
			break;
		case ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT:
			m_put_apply(op->request_put, ro ? ro->response_put : NULL);
			break;
		case ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_DELETE_RANGE:
			m_del_apply(op->request_delete_range, ro ? ro->response_delete_range : NULL);
			break;
		case ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_TXN:
			m_txn_apply(op->request_txn, path, ip, ro ? ro->response_txn : NULL);
			break;
		default:
			break;
		}
	}
}

/* ---- random requests ---- */

static storage_arena A;

static ProtobufCBinaryData rkey(void)
{
	mkey *k = &K[r32() % NKEYS];
	return t_bin(k->k, k->n);
}

static ProtobufCBinaryData rend(const ProtobufCBinaryData *key)
{
	int c = r32() % 10;
	if (c < 3)
		return t_bin(NULL, 0);
	if (c < 4)
		return t_bin("", 1);
	if (c < 6) { /* prefix end */
		uint8_t *p = storage_arena_dup(&A, key->data, key->len);
		size_t n = key->len > 1 && chance(50) ? key->len - 1 : key->len;
		p[n - 1]++;
		return t_bin(p, n);
	}
	return rkey();
}

static char *rval(void)
{
	char *v = storage_arena_alloc(&A, 8);
	snprintf(v, 8, "v%u", r32() % 4);
	if (chance(5))
		v[0] = 0;
	return v;
}

static int64_t rrev(void)
{
	int64_t lo = m_compact > 1 ? m_compact - 1 : 0;
	return lo + (int64_t)(r32() % (uint64_t)(m_cur() - lo + 2));
}

static Etcdserverpb__RangeRequest *gen_range(int in_txn)
{
	Etcdserverpb__RangeRequest *q = storage_arena_alloc(&A, sizeof(*q));
	Etcdserverpb__RangeRequest init = ETCDSERVERPB__RANGE_REQUEST__INIT;
	*q = init;
	q->key = rkey();
	q->range_end = rend(&q->key);
	if (chance(in_txn ? 10 : 40))
		q->revision = rrev();
	if (chance(40))
		q->limit = r32() % 5;
	if (chance(30)) {
		q->sort_order = r32() % 3;
		q->sort_target = r32() % 5;
	}
	q->keys_only = chance(15);
	q->count_only = chance(10);
	if (chance(15)) {
		q->min_mod_revision = chance(50) ? rrev() : 0;
		q->max_mod_revision = chance(50) ? rrev() : 0;
		q->min_create_revision = chance(50) ? rrev() : 0;
		q->max_create_revision = chance(50) ? rrev() : 0;
	}
	return q;
}

static Etcdserverpb__PutRequest *gen_put(void)
{
	Etcdserverpb__PutRequest *q = storage_arena_alloc(&A, sizeof(*q));
	Etcdserverpb__PutRequest init = ETCDSERVERPB__PUT_REQUEST__INIT;
	*q = init;
	q->key = rkey();
	q->value = t_str(rval());
	q->lease = r32() % 3;
	q->prev_kv = chance(50);
	q->ignore_value = chance(8);
	q->ignore_lease = chance(8);
	return q;
}

static Etcdserverpb__DeleteRangeRequest *gen_del(void)
{
	Etcdserverpb__DeleteRangeRequest *q = storage_arena_alloc(&A, sizeof(*q));
	Etcdserverpb__DeleteRangeRequest init = ETCDSERVERPB__DELETE_RANGE_REQUEST__INIT;
	*q = init;
	q->key = rkey();
	q->range_end = chance(60) ? t_bin(NULL, 0) : rend(&q->key);
	q->prev_kv = chance(50);
	return q;
}

static Etcdserverpb__TxnRequest *gen_txn(int depth);

static Etcdserverpb__RequestOp **gen_ops(int depth, size_t *n)
{
	*n = r32() % 4;
	Etcdserverpb__RequestOp **ops = storage_arena_alloc(&A, (*n + 1) * sizeof(*ops));
	for (size_t i = 0; i < *n; i++) {
		Etcdserverpb__RequestOp *o = storage_arena_alloc(&A, sizeof(*o));
		Etcdserverpb__RequestOp init = ETCDSERVERPB__REQUEST_OP__INIT;
		*o = init;
		int c = r32() % 10;
		if (c < 4) {
			o->request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT;
			o->request_put = gen_put();
		} else if (c < 6) {
			o->request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_DELETE_RANGE;
			o->request_delete_range = gen_del();
		} else if (c < 9 || depth >= 2) {
			o->request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_RANGE;
			o->request_range = gen_range(1);
		} else {
			o->request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_TXN;
			o->request_txn = gen_txn(depth + 1);
		}
		ops[i] = o;
	}
	return ops;
}

static Etcdserverpb__TxnRequest *gen_txn(int depth)
{
	Etcdserverpb__TxnRequest *t = storage_arena_alloc(&A, sizeof(*t));
	Etcdserverpb__TxnRequest init = ETCDSERVERPB__TXN_REQUEST__INIT;
	*t = init;
	t->n_compare = r32() % 3;
	t->compare = storage_arena_alloc(&A, (t->n_compare + 1) * sizeof(*t->compare));
	for (size_t i = 0; i < t->n_compare; i++) {
		Etcdserverpb__Compare *c = storage_arena_alloc(&A, sizeof(*c));
		Etcdserverpb__Compare cinit = ETCDSERVERPB__COMPARE__INIT;
		*c = cinit;
		c->key = rkey();
		if (chance(20))
			c->range_end = rend(&c->key);
		c->result = r32() % 4;
		c->target = r32() % 5;
		switch (c->target) {
		case 0: c->target_union_case = 4; c->version = r32() % 4; break;
		case 1: c->target_union_case = 5; c->create_revision = rrev(); break;
		case 2: c->target_union_case = 6; c->mod_revision = rrev(); break;
		case 3: c->target_union_case = 7; c->value = t_str(rval()); break;
		default: c->target_union_case = 8; c->lease = r32() % 3; break;
		}
		t->compare[i] = c;
	}
	t->success = gen_ops(depth, &t->n_success);
	t->failure = gen_ops(depth, &t->n_failure);
	return t;
}

/* ---- driver ---- */

static storage *S;
static storage_batch *B;
static char *dir;

static void begin(void)
{
	if (storage_batch_begin(S, &B))
		FAIL("batch begin");
}

static void commit(void)
{
	if (storage_batch_commit(B, (uint64_t)op_no))
		FAIL("commit");
	B = NULL;
	/* model: nothing to do, every request is already applied */
}

static int id_cmp(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* "hist" holds signposts only of revisions that exist, of their own key id, and at least
 * one for every key id that has revisions (compaction hands them on). */
static void check_signposts(MDB_txn *txn)
{
	MDB_cursor *c;
	MDB_val k, v;
	uint64_t *ids = NULL;
	size_t n = 0, cap = 0;
	mdb_cursor_open(txn, S->s_hist, &c);
	for (int rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == 0; rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
		const uint8_t *p = k.mv_data;
		uint8_t rk[REV_KEY_SIZE];
		memcpy(rk, p + 8, REV_KEY_SIZE);
		MDB_val kk = {sizeof(rk), rk}, rv;
		rev_hdr h;
		if (mdb_get(txn, S->s_revs, &kk, &rv) || storage__rev_parse(&rv, &h) || h.id != be64_get(p))
			FAIL("signpost (%llu, %lld) names no revision of its key id",
			     (unsigned long long)be64_get(p), (long long)be64_get(p + 8));
		if (n == cap) {
			cap = cap ? cap * 2 : 64;
			ids = realloc(ids, cap * sizeof(*ids));
		}
		ids[n++] = be64_get(p);
	}
	mdb_cursor_close(c);
	/* And no key runs more than storage__hist_every revisions without one (puts between
	 * two signposts, and a tombstone): what bounds a walk back along the prev pointers. */
	int64_t *run = NULL;
	size_t nrun = 0;
	mdb_cursor_open(txn, S->s_revs, &c);
	for (int rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == 0; rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
		rev_hdr h;
		if (storage__rev_parse(&v, &h)) {
			FAIL("revision record unreadable");
			continue;
		}
		if (!bsearch(&h.id, ids, n, sizeof(*ids), id_cmp))
			FAIL("key id %llu has revisions but no signpost", (unsigned long long)h.id);
		if (h.id >= nrun) {
			size_t nn = (size_t)h.id * 2 + 16;
			run = realloc(run, nn * sizeof(*run));
			memset(run + nrun, 0, (nn - nrun) * sizeof(*run));
			nrun = nn;
		}
		uint8_t hk[HIST_KEY_SIZE];
		be64_put(hk, h.id);
		memcpy(hk + 8, k.mv_data, REV_KEY_SIZE);
		MDB_val hkv = {sizeof(hk), hk}, hv;
		if (mdb_get(txn, S->s_hist, &hkv, &hv) == 0)
			run[h.id] = 0;
		else if (++run[h.id] > storage__hist_every)
			FAIL("key id %llu: %lld revisions in a row without a signpost (every %d)",
			     (unsigned long long)h.id, (long long)run[h.id], storage__hist_every);
	}
	mdb_cursor_close(c);
	free(run);
	free(ids);
}

/* HashKV of the committed state at its newest revision (-1 in *rev: none, at the compacted
 * revision itself etcd refuses it). */
static uint32_t committed_hash(int64_t *rev)
{
	storage_reader *r;
	uint32_t h = 0;
	int64_t compact;
	*rev = -1;
	if (storage_read_begin(S, &r)) {
		FAIL("read begin");
		return 0;
	}
	int err = storage_hash_kv(r, 0, &h, rev, &compact);
	if (err == STORAGE_ERR_COMPACTED)
		*rev = -1;
	else if (err)
		FAIL("hash_kv: %d", err);
	storage_read_end(r);
	return h;
}

typedef struct hev {
	mkey *k;
	ev *e;
} hev;

static int hev_cmp(const void *a, const void *b)
{
	const ev *x = ((const hev *)a)->e, *y = ((const hev *)b)->e;
	if (x->main != y->main)
		return x->main < y->main ? -1 : 1;
	return x->sub < y->sub ? -1 : x->sub > y->sub;
}

/* HashKV at rev as etcd computes it, from the model: every revision up to rev in order,
 * except those at or below the compacted revision that a compaction at rev would drop
 * (all but each key's newest at rev, and that one too if a tombstone). */
static uint32_t model_hash(int64_t rev)
{
	size_t n = 0;
	for (int i = 0; i < NKEYS; i++)
		n += K[i].nev;
	hev *all = malloc((n ? n : 1) * sizeof(*all));
	n = 0;
	for (int i = 0; i < NKEYS; i++) {
		ev *newest = NULL;
		for (size_t j = 0; j < K[i].nev && K[i].evs[j].main <= rev; j++)
			newest = &K[i].evs[j];
		for (size_t j = 0; j < K[i].nev && K[i].evs[j].main <= rev; j++) {
			ev *e = &K[i].evs[j];
			if (e->main > m_compact || (e == newest && !e->tomb))
				all[n++] = (hev){&K[i], e};
		}
	}
	qsort(all, n, sizeof(*all), hev_cmp);
	uint32_t h = crc32c(0, "key", 3);
	uint8_t buf[4096];
	for (size_t i = 0; i < n; i++) {
		ev *e = all[i].e;
		uint8_t ek[18];
		be64_put(ek, (uint64_t)e->main);
		ek[8] = '_';
		be64_put(ek + 9, (uint64_t)e->sub);
		ek[17] = 't';
		h = crc32c(h, ek, e->tomb ? 18 : 17);
		kvrec r = {(const uint8_t *)all[i].k->k, all[i].k->n, 0, 0, 0, 0, NULL, 0};
		if (!e->tomb) {
			r.create = e->create;
			r.mod = e->main;
			r.version = e->version;
			r.lease = e->lease;
			r.val = (const uint8_t *)e->val;
			r.vlen = e->vlen;
		}
		if (storage__kv_size(&r) > sizeof(buf)) {
			FAIL("model_hash: key too long for the buffer");
			break;
		}
		h = crc32c(h, buf, (size_t)(storage__kv_encode(buf, &r) - buf));
	}
	free(all);
	return h;
}

/* The committed history from a random revision above the compacted one, against the model:
 * every event, its kv, and its prev_kv (the key as of the revision before, unless deleted
 * or not yet written then). */
static void check_events(void)
{
	storage_reader *r;
	if (storage_read_begin(S, &r)) {
		FAIL("read begin");
		return;
	}
	/* Above the compacted revision: at it, only what compaction kept is left. */
	int64_t lo = m_compact >= 1 ? m_compact + 1 : 1;
	if (lo > m_rev) {
		storage_read_end(r);
		return;
	}
	int64_t from = lo + (int64_t)(r32() % (uint64_t)(m_rev - lo + 1));
	Mvccpb__Event **evs;
	size_t n, want = 0;
	int64_t rrev, crev;
	int err = storage_read_events(r, from, (size_t)1 << 30, &A, &evs, &n, &rrev, &crev);
	if (err) {
		FAIL("read_events from %lld: %d", (long long)from, err);
		storage_read_end(r);
		return;
	}
	for (int i = 0; i < NKEYS; i++)
		for (size_t j = 0; j < K[i].nev; j++)
			want += K[i].evs[j].main >= from && K[i].evs[j].main <= rrev;
	if (n != want)
		FAIL("read_events from %lld: %zu events, want %zu", (long long)from, n, want);
	/* A key's events come in its model order (a txn may change a key twice in one
	 * revision: delete, then put). */
	size_t next[NKEYS];
	for (int i = 0; i < NKEYS; i++)
		for (next[i] = 0; next[i] < K[i].nev && K[i].evs[next[i]].main < from;)
			next[i]++;
	for (size_t x = 0; x < n && !failed; x++) {
		Mvccpb__Event *e = evs[x];
		mkey *k = find_key(&e->kv->key);
		size_t j = k ? next[k - K]++ : 0;
		if (!k || j >= k->nev || k->evs[j].main != e->kv->mod_revision) {
			FAIL("event at %lld: not the model's next event of its key",
			     (long long)e->kv->mod_revision);
			break;
		}
		ev *m = &k->evs[j];
		if ((e->type == MVCCPB__EVENT__EVENT_TYPE__DELETE) != m->tomb)
			FAIL("event at %lld: wrong type", (long long)m->main);
		if (!m->tomb)
			kv_check(e->kv, k, m, 1);
		/* etcd's prev_kv: the key as of the revision before (a txn may have changed
		 * it earlier in the same revision: that change is not it). */
		size_t pj = j;
		while (pj > 0 && k->evs[pj - 1].main == m->main)
			pj--;
		ev *p = pj > 0 && !k->evs[pj - 1].tomb ? &k->evs[pj - 1] : NULL;
		if (!m->tomb && m->create == m->main)
			p = NULL; /* a create has none, even after a delete in its revision */
		if (p)
			kv_check(e->prev_kv, k, p, 1);
		else if (e->prev_kv)
			FAIL("event at %lld: prev_kv where the key had none", (long long)m->main);
	}
	storage_read_end(r);
}

/* After compaction finished, the revision table holds exactly: for each key, its latest
 * revision <= compacted if that is not a tombstone, plus every revision above. */
static void check_physical(void)
{
	int done = 0;
	commit();
	begin();
	int64_t hrev;
	uint32_t before = committed_hash(&hrev);
	while (!done)
		if (storage_batch_compact_continue(B, 1 + r32() % 50, &done))
			FAIL("compact continue");
	commit();
	int64_t hrev2;
	uint32_t after = committed_hash(&hrev2);
	if (hrev >= 0 && (hrev2 != hrev || after != before))
		FAIL("HashKV at %lld changed when compaction removed the superseded revisions",
		     (long long)hrev);
	if (hrev2 >= 0 && after != model_hash(hrev2))
		FAIL("HashKV at %lld differs from the model's", (long long)hrev2);
	check_events();
	size_t want = 0;
	for (int i = 0; i < NKEYS; i++) {
		if (m_at(&K[i], m_compact))
			want++;
		for (size_t j = 0; j < K[i].nev; j++)
			want += K[i].evs[j].main > m_compact;
	}
	MDB_txn *txn;
	MDB_stat st;
	mdb_txn_begin(S->s_env, NULL, MDB_RDONLY, &txn);
	mdb_stat(txn, S->s_revs, &st);
	if (st.ms_entries != want)
		FAIL("after compaction: %zu revisions, want %zu", st.ms_entries, want);
	check_signposts(txn);
	mdb_txn_abort(txn);
	begin();
}

/* Signposts every 2 to 6 versions (every 4th seed: the default): short gaps make the walks
 * back along the prev pointers long and frequent. */
static int hist_every_of(unsigned long long sd)
{
	return sd % 4 == 3 ? HIST_EVERY : 2 + (int)(sd % 5);
}

static void run(unsigned long long sd, long nops)
{
	seed = sd;
	storage__hist_every = hist_every_of(sd);
	/* Compaction in small steps, finished by later batches (compact_continue). */
	storage__compact_chunk = 1 + (int)(sd % 50);
	rs = sd * 2654435761ull + 1;
	for (int i = 0; i < NKEYS; i++) {
		free(K[i].k);
		free(K[i].evs);
	}
	memset(K, 0, sizeof(K));
	make_keys();
	m_rev = 1;
	m_compact = -1;
	m_changes = 0;
	dir = t_tmpdir("model");
	storage_options o = {256 << 20};
	if (storage_open(dir, &o, &S)) {
		FAIL("open");
		return;
	}
	begin();
	/* The model's puts use leases 0..2; storage refuses leases never granted. */
	if (storage_batch_lease_grant(B, 1, 60) || storage_batch_lease_grant(B, 2, 60))
		FAIL("lease grant");
	for (op_no = 0; op_no < nops && !failed; op_no++) {
		storage_arena_free(&A);
		if (r32() % 500 == 0 && B->b_cpending == 0) {
			/* Now and then every record so far turns into one of an older build's
			 * (no prev pointer, a hist entry each): the later ones chain onto them.
			 * Not while a compaction is part-way: an upgrade never turns a record it
			 * has examined into an older build's. */
			commit();
			if (t_to_old_records(S))
				FAIL("rewriting the records as an older build's");
			begin();
		}
		int c = r32() % 100;
		int err;
		if (c < 30) {
			Etcdserverpb__PutRequest *q = gen_put();
			Etcdserverpb__PutResponse resp;
			err = storage_batch_put(B, q, &A, &resp);
			int want = (q->ignore_value || q->ignore_lease) && !m_at(find_key(&q->key), m_rev)
					   ? STORAGE_ERR_KEY_NOT_FOUND
					   : 0;
			if (err != want)
				FAIL("put err %d want %d", err, want);
			if (!err && !want) {
				m_put_apply(q, &resp);
				m_rev++;
				m_changes = 0;
			}
		} else if (c < 40) {
			Etcdserverpb__DeleteRangeRequest *q = gen_del();
			Etcdserverpb__DeleteRangeResponse resp;
			if ((err = storage_batch_delete_range(B, q, &A, &resp)))
				FAIL("delete err %d", err);
			else {
				m_del_apply(q, &resp);
				if (m_changes)
					m_rev++;
				m_changes = 0;
			}
		} else if (c < 65) {
			Etcdserverpb__RangeRequest *q = gen_range(0);
			Etcdserverpb__RangeResponse resp;
			storage_reader *r = NULL;
			int via_reader = chance(50);
			if (via_reader) {
				commit();
				begin();
				storage_read_begin(S, &r);
				err = storage_range(r, q, &A, &resp);
			} else {
				err = storage_batch_range(B, q, &A, &resp);
			}
			int want = m_range(q, m_rev, NULL);
			n_err += err != 0;
			if (err != want)
				FAIL("range err %d want %d", err, want);
			else if (!err)
				m_range(q, m_rev, &resp);
			storage_read_end(r);
		} else if (c < 90) {
			Etcdserverpb__TxnRequest *t = gen_txn(0);
			Etcdserverpb__TxnResponse resp;
			err = storage_batch_txn(B, t, &A, &resp);
			int path[256], np = 0, ip = 0;
			m_path(t, path, &np);
			int ro = 1;
			for (size_t i = 0; i < t->n_success; i++)
				ro &= t->success[i]->request_case == ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_RANGE;
			for (size_t i = 0; i < t->n_failure; i++)
				ro &= t->failure[i]->request_case == ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_RANGE;
			int want = ro ? 0 : m_check(t, path, &ip, 1);
			ip = 0;
			if (!want)
				want = m_check(t, path, &ip, 0);
			size_t saved[NKEYS];
			for (int i = 0; i < NKEYS; i++)
				saved[i] = K[i].nev;
			if (!want) {
				/* etcd panics where a put with ignore_* meets a key deleted earlier in
				 * the same txn (its API layer rejects such txns as duplicates);
				 * storage rejects the request. Dry-run the model to know. */
				ip = 0;
				m_apply_err = 0;
				m_txn_apply(t, path, &ip, NULL);
				want = m_apply_err;
				m_apply_err = 0;
				for (int i = 0; i < NKEYS; i++)
					K[i].nev = saved[i];
				m_changes = 0;
			}
			if (err != want)
				FAIL("txn err %d want %d", err, want);
			else if (!err) {
				ip = 0;
				n_txn_ok++;
				m_txn_apply(t, path, &ip, &resp);
				if (resp.header->revision != m_cur())
					FAIL("txn header revision %lld want %lld",
					     (long long)resp.header->revision, (long long)m_cur());
				if (m_changes)
					m_rev++;
				m_changes = 0;
			}
		} else if (c < 94) {
			Etcdserverpb__CompactionRequest q = ETCDSERVERPB__COMPACTION_REQUEST__INIT;
			Etcdserverpb__CompactionResponse resp;
			q.revision = rrev();
			err = storage_batch_compact(B, &q, &A, &resp);
			int want = q.revision <= m_compact ? STORAGE_ERR_COMPACTED
				   : q.revision > m_rev    ? STORAGE_ERR_FUTURE_REV
							   : 0;
			if (err != want)
				FAIL("compact(%lld) err %d want %d", (long long)q.revision, err, want);
			n_err += err != 0;
			if (!err) {
				n_compacts++;
				m_compact = q.revision;
				if (chance(30))
					check_physical();
			}
		} else if (c < 98) {
			int done;
			if (storage_batch_compact_continue(B, 1 + r32() % 20, &done))
				FAIL("compact continue");
			if (chance(50)) {
				commit();
				begin();
			}
		} else if (c < 99) {
			if (chance(50)) {
				commit();
			} else {
				/* drop the batch: roll the model back by replaying is not possible
				 * here, so only abort batches with nothing in them */
				commit();
			}
			storage_close(S);
			if (storage_open(dir, &o, &S))
				FAIL("reopen");
			begin();
		} else {
			commit();
			begin();
		}
	}
	if (!failed) {
		storage_stats st;
		commit();
		storage_stat(S, &st);
		if (st.st_revision != m_rev)
			FAIL("final revision %lld want %lld", (long long)st.st_revision, (long long)m_rev);
		begin();
		if (m_compact >= 0)
			check_physical();
		commit();
	} else if (B) {
		storage_batch_abort(B);
	}
	storage_close(S);
	S = NULL;
	char cmd[4096];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	if (system(cmd) != 0)
		abort();
	free(dir);
}

int main(int argc, char **argv)
{
	(void)t_fail;
	(void)t_checks;
	storage_arena_init(&A);
	unsigned long long first = argc > 1 ? strtoull(argv[1], NULL, 10) : (unsigned long long)time(NULL);
	long nops = argc > 2 ? atol(argv[2]) : 4000;
	int seeds = argc > 1 ? 1 : 6;
	long total = 0;
	for (int i = 0; i < seeds && !failed; i++) {
		printf("model_test: seed %llu, %ld ops, signposts every %d versions\n", first + i, nops,
		       hist_every_of(first + i));
		fflush(stdout);
		run(first + i, nops);
		total += op_no;
	}
	storage_arena_free(&A);
	if (failed) {
		printf("model_test: FAILED with seed %llu (rerun: model_test %llu %ld)\n", seed, seed,
		       nops);
		return 1;
	}
	printf("model_test: %d seeds, %ld ops, all matched the model (%ld kvs compared, %ld txns, "
	       "%ld compactions, %ld expected errors)\n",
	       seeds, total, n_kvs_seen, n_txn_ok, n_compacts, n_err);
	return 0;
}
