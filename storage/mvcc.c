/*
 * mvcc.c - etcd's MVCC semantics over the tables of internal.h: Put, DeleteRange, Range,
 * Txn and Compact, as etcd 3.4/3.5 apply them (server/etcdserver/apply.go and
 * server/mvcc/kvstore_txn.go).
 *
 * Each request of a batch runs in an LMDB child transaction of the batch's transaction, so
 * a request that fails (a Range at a compacted revision inside a Txn, a full map) leaves no
 * trace and the batch goes on.
 */
#include <stdlib.h>

#include "crashpoint/crashpoint.h"
#include "crc32c/crc32c.h"
#include "storage/internal.h"

#define COMPACT_CHUNK 10000 /* revisions examined by storage_batch_compact itself */
int storage__compact_chunk = COMPACT_CHUNK;

/* ---- revision table ---- */

int storage__hist_every = HIST_EVERY;

int storage__rev_put(storage *s, MDB_txn *txn, int64_t main, int64_t sub, uint64_t id, int tomb,
		     int64_t prev_main, int64_t prev_sub, const kvrec *r)
{
	uint8_t kb[REV_KEY_SIZE];
	rev_key(kb, main, sub);
	MDB_val k = {sizeof(kb), kb}, v = {REV_HDR_SIZE + storage__kv_size(r), NULL};
	/* Revisions only grow: MDB_APPEND skips the search and fills pages completely. */
	int rc = mdb_put(txn, s->s_revs, &k, &v, MDB_RESERVE | MDB_APPEND);
	if (rc)
		return rc == MDB_KEYEXIST ? STORAGE_ERR_CORRUPT : storage__mdb_err(rc);
	uint8_t *p = v.mv_data;
	p[0] = (uint8_t)((tomb ? REV_FLAG_TOMB : 0) | REV_FLAG_PREV);
	be64_put(p + 1, id);
	be64_put(p + 9, (uint64_t)prev_main);
	be64_put(p + 17, (uint64_t)prev_sub);
	storage__kv_encode(p + REV_HDR_SIZE, r);
	/* A new key id always gets one: compaction keeps every key id signposted. */
	if (prev_main == 0 || (!tomb && r->version % storage__hist_every == 1))
		return storage__hist_put(s, txn, id, main, sub, tomb);
	return 0;
}

/* The record of revision (main, sub): 0, STORAGE_ERR_NOT_FOUND, or an error. */
static int rev_get(storage *s, MDB_txn *txn, int64_t main, int64_t sub, rev_hdr *h)
{
	uint8_t kb[REV_KEY_SIZE];
	rev_key(kb, main, sub);
	MDB_val k = {sizeof(kb), kb}, v;
	int rc = mdb_get(txn, s->s_revs, &k, &v);
	if (rc)
		return rc == MDB_NOTFOUND ? STORAGE_ERR_NOT_FOUND : storage__mdb_err(rc);
	return storage__rev_parse(&v, h);
}

/* Reads the record of revision (main, sub); byte fields point into the map. */
static int rev_read(storage *s, MDB_txn *txn, int64_t main, int64_t sub, kvrec *r, int *tomb)
{
	rev_hdr h;
	int err = rev_get(s, txn, main, sub, &h);
	if (err)
		return err == STORAGE_ERR_NOT_FOUND ? STORAGE_ERR_CORRUPT : err;
	if (tomb)
		*tomb = h.tomb;
	return storage__kv_decode(h.kv, h.kvlen, r);
}

/*
 * The revision of its key before the record h of revision (main, sub): its prev pointer,
 * or for a record written before those existed, its key's newest signpost below main (each
 * such record has one; a change earlier in the same revision is passed over, which no
 * caller needs). 0, or STORAGE_ERR_NOT_FOUND when the key had none (or compaction removed
 * it). A pointer that does not point back is corrupt: following it could loop.
 */
static int rev_prev(storage *s, MDB_txn *txn, const rev_hdr *h, int64_t main, int64_t sub,
		    int64_t *pmain, int64_t *psub)
{
	if (!h->has_prev) {
		int tomb;
		return storage__hist_at(s, txn, h->id, main - 1, pmain, psub, &tomb);
	}
	*pmain = h->prev_main;
	*psub = h->prev_sub;
	if (h->prev_main == 0)
		return STORAGE_ERR_NOT_FOUND;
	if (h->prev_main > main || (h->prev_main == main && h->prev_sub >= sub) || h->prev_main < 0)
		return STORAGE_ERR_CORRUPT;
	return 0;
}

int storage__rev_at(storage *s, MDB_txn *txn, const ki_state *st, int64_t rev, int64_t *main,
		    int64_t *sub, kvrec *r)
{
	int64_t m = st->ks_mod_main, sb = st->ks_mod_sub;
	if (m > rev) {
		/* Walk back from the first signpost after rev (or the newest revision): fewer
		 * than HIST_EVERY + 1 revisions of the key lie between it and rev. */
		int err = storage__hist_from(s, txn, st->ks_id, rev + 1, 0, &m, &sb);
		if (err == STORAGE_ERR_NOT_FOUND) {
			m = st->ks_mod_main;
			sb = st->ks_mod_sub;
		} else if (err) {
			return err;
		}
	}
	for (int walked = 0;; walked = 1) {
		rev_hdr h;
		int err = rev_get(s, txn, m, sb, &h);
		if (err == STORAGE_ERR_NOT_FOUND)
			/* Compaction removes a tombstone at or below the compacted revision, and
			 * the revision after it may still point at it: the key did not exist. */
			return walked && m <= rev ? STORAGE_ERR_NOT_FOUND : STORAGE_ERR_CORRUPT;
		if (err)
			return err;
		if (h.id != st->ks_id)
			return STORAGE_ERR_CORRUPT;
		if (m <= rev) {
			if (h.tomb)
				return STORAGE_ERR_NOT_FOUND;
			*main = m;
			*sub = sb;
			return r ? storage__kv_decode(h.kv, h.kvlen, r) : 0;
		}
		if ((err = rev_prev(s, txn, &h, m, sb, &m, &sb)))
			return err;
	}
}

int storage__rev_newest_at(storage *s, MDB_txn *txn, const rev_hdr *h, int64_t main, int64_t sub,
			   int64_t rev, int *yes)
{
	*yes = 0;
	if (h->tomb)
		return 0;
	kvrec r;
	int err = storage__kv_decode(h->kv, h->kvlen, &r);
	if (err)
		return err;
	ki_state st;
	err = storage__ki_get(s, txn, r.key, r.klen, &st);
	if (err == STORAGE_ERR_NOT_FOUND)
		return 0;
	if (err)
		return err;
	if (st.ks_id != h->id)
		return 0;
	int64_t km, ks;
	err = storage__rev_at(s, txn, &st, rev, &km, &ks, NULL);
	if (err == STORAGE_ERR_NOT_FOUND)
		return 0;
	if (err)
		return err;
	*yes = km == main && ks == sub;
	return 0;
}

/* ---- response building ---- */

static Etcdserverpb__ResponseHeader *header_new(storage_arena *a, int64_t rev)
{
	Etcdserverpb__ResponseHeader *h = storage_arena_alloc(a, sizeof(*h));
	if (h) {
		Etcdserverpb__ResponseHeader init = ETCDSERVERPB__RESPONSE_HEADER__INIT;
		*h = init;
		h->revision = rev;
	}
	return h;
}

static int bytes_set(mv *v, storage_arena *a, ProtobufCBinaryData *d, const uint8_t *p, size_t n)
{
	d->len = n;
	d->data = NULL;
	if (n == 0)
		return 0;
	if (!v->v_copy) {
		d->data = (uint8_t *)p;
		return 0;
	}
	d->data = storage_arena_dup(a, p, n);
	return d->data ? 0 : STORAGE_ERR_NOMEM;
}

static Mvccpb__KeyValue *kv_new(mv *v, storage_arena *a, const kvrec *r, int with_value)
{
	Mvccpb__KeyValue *kv = storage_arena_alloc(a, sizeof(*kv));
	if (!kv)
		return NULL;
	Mvccpb__KeyValue init = MVCCPB__KEY_VALUE__INIT;
	*kv = init;
	kv->create_revision = r->create;
	kv->mod_revision = r->mod;
	kv->version = r->version;
	kv->lease = r->lease;
	if (bytes_set(v, a, &kv->key, r->key, r->klen))
		return NULL;
	if (with_value && bytes_set(v, a, &kv->value, r->val, r->vlen))
		return NULL;
	return kv;
}

/* A growable array of KeyValue pointers in the arena. */
typedef struct kvarr {
	Mvccpb__KeyValue **kvs;
	size_t n, cap;
} kvarr;

static int kvarr_push(kvarr *x, storage_arena *a, Mvccpb__KeyValue *kv)
{
	if (!kv)
		return STORAGE_ERR_NOMEM;
	if (x->n == x->cap) {
		size_t cap = x->cap ? x->cap * 2 : 8;
		Mvccpb__KeyValue **n = storage_arena_alloc(a, cap * sizeof(*n));
		if (!n)
			return STORAGE_ERR_NOMEM;
		if (x->n)
			memcpy(n, x->kvs, x->n * sizeof(*n));
		x->kvs = n;
		x->cap = cap;
	}
	x->kvs[x->n++] = kv;
	return 0;
}

/* ---- visiting the keys visible at a revision ---- */

typedef struct vis vis;
/* Called for each key live at vi_rev, with its state at that revision. */
typedef int (*vis_fn)(vis *x, const uint8_t *key, size_t klen, const ki_state *st);
struct vis {
	mv *vi_v;
	int64_t vi_rev;
	vis_fn vi_fn;
	void *vi_arg;
};

static int vis_cb(void *arg, const uint8_t *key, size_t klen, const ki_state *st0)
{
	vis *x = arg;
	ki_state st = *st0;
	if (st.ks_mod_main > x->vi_rev) {
		/* Changed since: find the key's revision as of vi_rev in its history. */
		int64_t main, sub;
		kvrec r;
		int err = storage__rev_at(x->vi_v->v_s, x->vi_v->v_txn, &st, x->vi_rev, &main, &sub, &r);
		if (err == STORAGE_ERR_NOT_FOUND)
			return 0;
		if (err)
			return err;
		st.ks_mod_main = main;
		st.ks_mod_sub = sub;
		st.ks_create = r.create;
		st.ks_version = r.version;
		st.ks_lease = r.lease;
	} else if (st.ks_version == 0) {
		return 0; /* tombstone */
	}
	return x->vi_fn(x, key, klen, &st);
}

/* etcd's mkGteRange: range_end "\0" means no upper bound. */
static int visit(mv *v, int64_t rev, const ProtobufCBinaryData *key, const ProtobufCBinaryData *end,
		 vis_fn fn, void *arg)
{
	vis x = {v, rev, fn, arg};
	if (end->len == 0) {
		ki_state st;
		int err = storage__ki_get(v->v_s, v->v_txn, key->data, key->len, &st);
		if (err == STORAGE_ERR_NOT_FOUND)
			return 0;
		if (err)
			return err;
		err = vis_cb(&x, key->data, key->len, &st);
		return err > 0 ? 0 : err;
	}
	int unbounded = end->len == 1 && end->data[0] == 0;
	return storage__ki_range(v->v_s, v->v_txn, key->data, key->len, unbounded ? NULL : end->data,
				 unbounded ? 0 : end->len, vis_cb, &x);
}

/* ---- Range ---- */

typedef struct range_ctx {
	storage_arena *a;
	int64_t count;
	int64_t fetch;   /* kvs to fetch, 0 = all */
	int count_only;
	int values;      /* fetch values */
	int page_only;   /* stop once fetch kvs are in: count is not the total then */
	kvarr out;
} range_ctx;

static int range_fn(vis *x, const uint8_t *key, size_t klen, const ki_state *st)
{
	range_ctx *c = x->vi_arg;
	mv *v = x->vi_v;
	c->count++;
	if (c->count_only || (c->fetch && (int64_t)c->out.n >= c->fetch))
		return 0;
	kvrec r = {key, klen, st->ks_create, st->ks_mod_main, st->ks_version, st->ks_lease, NULL, 0};
	if (c->values) {
		kvrec full;
		int err = rev_read(v->v_s, v->v_txn, st->ks_mod_main, st->ks_mod_sub, &full, NULL);
		if (err)
			return err;
		r.val = full.val;
		r.vlen = full.vlen;
	}
	int err = kvarr_push(&c->out, c->a, kv_new(v, c->a, &r, c->values));
	if (!err && c->page_only && c->fetch && (int64_t)c->out.n >= c->fetch)
		return 1; /* stops the visit */
	return err;
}

typedef struct sorter {
	int target;
	int desc;
} sorter;

static int kv_cmp(const sorter *so, const Mvccpb__KeyValue *a, const Mvccpb__KeyValue *b)
{
	int c = 0;
	switch (so->target) {
	case ETCDSERVERPB__RANGE_REQUEST__SORT_TARGET__KEY:
		c = storage__bytes_cmp(a->key.data, a->key.len, b->key.data, b->key.len);
		break;
	case ETCDSERVERPB__RANGE_REQUEST__SORT_TARGET__VERSION:
		c = (a->version > b->version) - (a->version < b->version);
		break;
	case ETCDSERVERPB__RANGE_REQUEST__SORT_TARGET__CREATE:
		c = (a->create_revision > b->create_revision) - (a->create_revision < b->create_revision);
		break;
	case ETCDSERVERPB__RANGE_REQUEST__SORT_TARGET__MOD:
		c = (a->mod_revision > b->mod_revision) - (a->mod_revision < b->mod_revision);
		break;
	case ETCDSERVERPB__RANGE_REQUEST__SORT_TARGET__VALUE:
		c = storage__bytes_cmp(a->value.data, a->value.len, b->value.data, b->value.len);
		break;
	}
	return so->desc ? -c : c;
}

/*
 * Stable merge sort: Go's sort.Sort (which etcd uses) is an insertion sort, hence stable,
 * up to 12 elements; beyond that etcd's order of equal elements is unspecified and a stable
 * order (by key, the order they were read in) is as good as any.
 */
static void merge_sort(const sorter *so, Mvccpb__KeyValue **x, Mvccpb__KeyValue **tmp, size_t n)
{
	if (n < 2)
		return;
	size_t m = n / 2;
	merge_sort(so, x, tmp, m);
	merge_sort(so, x + m, tmp, n - m);
	size_t i = 0, j = m, k = 0;
	while (i < m && j < n)
		tmp[k++] = kv_cmp(so, x[j], x[i]) < 0 ? x[j++] : x[i++];
	while (i < m)
		tmp[k++] = x[i++];
	while (j < n)
		tmp[k++] = x[j++];
	memcpy(x, tmp, n * sizeof(*x));
}

/* Range as etcd's applierV3backend.Range over mvcc rangeKeys. */
static int do_range(mv *v, const Etcdserverpb__RangeRequest *req, int page_only, storage_arena *a,
		    Etcdserverpb__RangeResponse *resp)
{
	Etcdserverpb__RangeResponse init = ETCDSERVERPB__RANGE_RESPONSE__INIT;
	*resp = init;
	int64_t rev = req->revision;
	if (rev > v->v_rev)
		return STORAGE_ERR_FUTURE_REV;
	if (rev <= 0)
		rev = v->v_rev;
	if (rev < v->v_compact)
		return STORAGE_ERR_COMPACTED;

	int filtered = req->min_mod_revision || req->max_mod_revision || req->min_create_revision ||
		       req->max_create_revision;
	int order = req->sort_order;
	range_ctx c = {0};
	c.a = a;
	c.count_only = req->count_only;
	c.page_only = page_only && !req->count_only;
	/* etcd fetches everything when it sorts or filters, else limit (+1 for "more"). */
	c.fetch = (order != ETCDSERVERPB__RANGE_REQUEST__SORT_ORDER__NONE || filtered) ? 0
		  : req->limit > 0 ? req->limit + 1 : 0;
	c.values = !req->keys_only || req->sort_target == ETCDSERVERPB__RANGE_REQUEST__SORT_TARGET__VALUE;
	int err = visit(v, rev, &req->key, &req->range_end, range_fn, &c);
	if (err)
		return err;

	kvarr *o = &c.out;
	if (filtered) {
		size_t n = 0;
		for (size_t i = 0; i < o->n; i++) {
			Mvccpb__KeyValue *kv = o->kvs[i];
			if (req->max_mod_revision && kv->mod_revision > req->max_mod_revision)
				continue;
			if (req->min_mod_revision && kv->mod_revision < req->min_mod_revision)
				continue;
			if (req->max_create_revision && kv->create_revision > req->max_create_revision)
				continue;
			if (req->min_create_revision && kv->create_revision < req->min_create_revision)
				continue;
			o->kvs[n++] = kv;
		}
		o->n = n;
	}
	if (req->sort_target != ETCDSERVERPB__RANGE_REQUEST__SORT_TARGET__KEY &&
	    order == ETCDSERVERPB__RANGE_REQUEST__SORT_ORDER__NONE)
		order = ETCDSERVERPB__RANGE_REQUEST__SORT_ORDER__ASCEND;
	/* Keys come in ascending order already. An order the proto does not name sorts nothing,
	 * as in etcd 3.4's apply (the API lets it through, as etcd 3.4 does; kv_check_range). */
	int sorts = order == ETCDSERVERPB__RANGE_REQUEST__SORT_ORDER__ASCEND ||
		    order == ETCDSERVERPB__RANGE_REQUEST__SORT_ORDER__DESCEND;
	if (sorts && o->n > 1 &&
	    !(req->sort_target == ETCDSERVERPB__RANGE_REQUEST__SORT_TARGET__KEY &&
	      order == ETCDSERVERPB__RANGE_REQUEST__SORT_ORDER__ASCEND)) {
		if (req->sort_target == ETCDSERVERPB__RANGE_REQUEST__SORT_TARGET__KEY) {
			for (size_t i = 0; i < o->n / 2; i++) {
				Mvccpb__KeyValue *t = o->kvs[i];
				o->kvs[i] = o->kvs[o->n - 1 - i];
				o->kvs[o->n - 1 - i] = t;
			}
		} else {
			Mvccpb__KeyValue **tmp = storage_arena_alloc(a, o->n * sizeof(*tmp));
			if (!tmp)
				return STORAGE_ERR_NOMEM;
			sorter so = {req->sort_target,
				     order == ETCDSERVERPB__RANGE_REQUEST__SORT_ORDER__DESCEND};
			merge_sort(&so, o->kvs, tmp, o->n);
		}
	}
	if (req->limit > 0 && (int64_t)o->n > req->limit) {
		o->n = (size_t)req->limit;
		resp->more = 1;
	}
	if (req->keys_only) {
		for (size_t i = 0; i < o->n; i++) {
			o->kvs[i]->value.data = NULL;
			o->kvs[i]->value.len = 0;
		}
	}
	resp->header = header_new(a, v->v_rev);
	if (!resp->header)
		return STORAGE_ERR_NOMEM;
	resp->count = c.count;
	resp->n_kvs = o->n;
	resp->kvs = o->kvs;
	return 0;
}

/* ---- writes ---- */

/* The view of the writer: the current revision includes the current request's writes. */
static mv batch_view(storage_batch *b, MDB_txn *txn)
{
	mv v = {b->b_s, txn, 1, b->b_rev + (b->b_changes > 0), b->b_compact};
	return v;
}

/* Reads the live KeyValue of a key into the arena (copied). *found = 0 if not live. */
static int live_kv(storage_batch *b, MDB_txn *txn, const ProtobufCBinaryData *key,
		   storage_arena *a, ki_state *st, int *have_entry, Mvccpb__KeyValue **out)
{
	*out = NULL;
	*have_entry = 0;
	int err = storage__ki_get(b->b_s, txn, key->data, key->len, st);
	if (err == STORAGE_ERR_NOT_FOUND)
		return 0;
	if (err)
		return err;
	*have_entry = 1;
	if (st->ks_version == 0)
		return 0;
	kvrec r;
	if ((err = rev_read(b->b_s, txn, st->ks_mod_main, st->ks_mod_sub, &r, NULL)))
		return err;
	mv v = batch_view(b, txn);
	*out = kv_new(&v, a, &r, 1);
	return *out ? 0 : STORAGE_ERR_NOMEM;
}

/* ---- lease tables ---- */

static int lease_exists(storage *s, MDB_txn *txn, int64_t id)
{
	uint8_t kb[8];
	be64_put(kb, (uint64_t)id);
	MDB_val k = {sizeof(kb), kb}, v;
	int rc = mdb_get(txn, s->s_leases, &k, &v);
	if (rc == MDB_NOTFOUND)
		return STORAGE_ERR_LEASE_NOT_FOUND;
	return storage__mdb_err(rc);
}

/* Attaches (on = 1) or detaches key id from lease. */
static int lkey_set(storage *s, MDB_txn *txn, int64_t lease, uint64_t key_id, int on)
{
	uint8_t kb[16];
	be64_put(kb, (uint64_t)lease);
	be64_put(kb + 8, key_id);
	MDB_val k = {sizeof(kb), kb}, v = {0, NULL};
	int rc = on ? mdb_put(txn, s->s_lkeys, &k, &v, 0) : mdb_del(txn, s->s_lkeys, &k, NULL);
	if (rc == MDB_NOTFOUND)
		rc = 0;
	return storage__mdb_err(rc);
}

static int do_put(storage_batch *b, MDB_txn *txn, const Etcdserverpb__PutRequest *req,
		  storage_arena *a, Etcdserverpb__PutResponse *resp)
{
	Etcdserverpb__PutResponse init = ETCDSERVERPB__PUT_RESPONSE__INIT;
	*resp = init;
	if (req->key.len == 0)
		return STORAGE_ERR_INVALID;
	storage *s = b->b_s;
	ki_state st;
	int have_entry, err;
	Mvccpb__KeyValue *prev = NULL;
	int want_prev = req->prev_kv || req->ignore_value || req->ignore_lease;
	if (want_prev) {
		if ((err = live_kv(b, txn, &req->key, a, &st, &have_entry, &prev)))
			return err;
	} else {
		err = storage__ki_get(s, txn, req->key.data, req->key.len, &st);
		if (err && err != STORAGE_ERR_NOT_FOUND)
			return err;
		have_entry = err == 0;
	}
	int live = have_entry && st.ks_version > 0;
	if ((req->ignore_value || req->ignore_lease) && !live)
		return STORAGE_ERR_KEY_NOT_FOUND;

	int64_t main = b->b_rev + 1, sub = b->b_changes;
	ki_state ns;
	ns.ks_id = have_entry ? st.ks_id : (uint64_t)b->b_next_id++;
	ns.ks_mod_main = main;
	ns.ks_mod_sub = sub;
	ns.ks_create = live ? st.ks_create : main;
	ns.ks_version = live ? st.ks_version + 1 : 1;
	ns.ks_lease = req->ignore_lease ? prev->lease : req->lease;
	kvrec r = {req->key.data, req->key.len, ns.ks_create, main, ns.ks_version, ns.ks_lease,
		   req->value.data, req->value.len};
	if (req->ignore_value) {
		r.val = prev->value.data;
		r.vlen = prev->value.len;
	}
	/* Move the key between leases: etcd refuses a lease it does not know. */
	int64_t old_lease = live ? st.ks_lease : 0;
	if (old_lease != ns.ks_lease) {
		if (ns.ks_lease != 0 && (err = lease_exists(s, txn, ns.ks_lease)))
			return err;
		if (old_lease != 0 && (err = lkey_set(s, txn, old_lease, ns.ks_id, 0)))
			return err;
		if (ns.ks_lease != 0 && (err = lkey_set(s, txn, ns.ks_lease, ns.ks_id, 1)))
			return err;
	}
	int64_t pmain = have_entry ? st.ks_mod_main : 0, psub = have_entry ? st.ks_mod_sub : 0;
	if ((err = storage__rev_put(s, txn, main, sub, ns.ks_id, 0, pmain, psub, &r)))
		return err;
	if ((err = storage__ki_set(s, txn, req->key.data, req->key.len, &ns)))
		return err;
	b->b_changes++;
	resp->header = header_new(a, main);
	if (!resp->header)
		return STORAGE_ERR_NOMEM;
	if (req->prev_kv)
		resp->prev_kv = prev;
	return 0;
}

typedef struct del_item {
	const uint8_t *key;
	size_t klen;
	ki_state st;
} del_item;

typedef struct del_ctx {
	storage_arena *a;
	del_item *items;
	size_t n, cap;
} del_ctx;

static int del_fn(vis *x, const uint8_t *key, size_t klen, const ki_state *st)
{
	del_ctx *c = x->vi_arg;
	if (c->n == c->cap) {
		size_t cap = c->cap ? c->cap * 2 : 16;
		del_item *n = storage_arena_alloc(c->a, cap * sizeof(*n));
		if (!n)
			return STORAGE_ERR_NOMEM;
		if (c->n)
			memcpy(n, c->items, c->n * sizeof(*n));
		c->items = n;
		c->cap = cap;
	}
	del_item *it = &c->items[c->n];
	it->key = storage_arena_dup(c->a, key, klen);
	if (!it->key)
		return STORAGE_ERR_NOMEM;
	it->klen = klen;
	it->st = *st;
	c->n++;
	return 0;
}

static int do_delete(storage_batch *b, MDB_txn *txn, const Etcdserverpb__DeleteRangeRequest *req,
		     storage_arena *a, Etcdserverpb__DeleteRangeResponse *resp)
{
	Etcdserverpb__DeleteRangeResponse init = ETCDSERVERPB__DELETE_RANGE_RESPONSE__INIT;
	*resp = init;
	storage *s = b->b_s;
	mv v = batch_view(b, txn);
	del_ctx c = {a, NULL, 0, 0};
	/* Collect first: the index cannot be written while a cursor walks it. */
	int err = visit(&v, v.v_rev, &req->key, &req->range_end, del_fn, &c);
	if (err)
		return err;
	if (req->prev_kv && c.n) {
		resp->prev_kvs = storage_arena_alloc(a, c.n * sizeof(*resp->prev_kvs));
		if (!resp->prev_kvs)
			return STORAGE_ERR_NOMEM;
		for (size_t i = 0; i < c.n; i++) {
			kvrec r;
			del_item *it = &c.items[i];
			if ((err = rev_read(s, txn, it->st.ks_mod_main, it->st.ks_mod_sub, &r, NULL)))
				return err;
			if (!(resp->prev_kvs[i] = kv_new(&v, a, &r, 1)))
				return STORAGE_ERR_NOMEM;
		}
		resp->n_prev_kvs = c.n;
	}
	int64_t main = b->b_rev + 1;
	for (size_t i = 0; i < c.n; i++) {
		del_item *it = &c.items[i];
		int64_t sub = b->b_changes;
		kvrec r = {it->key, it->klen, 0, main, 0, 0, NULL, 0};
		ki_state ns = {it->st.ks_id, main, sub, 0, 0, 0};
		if (it->st.ks_lease != 0 && (err = lkey_set(s, txn, it->st.ks_lease, ns.ks_id, 0)))
			return err;
		if ((err = storage__rev_put(s, txn, main, sub, ns.ks_id, 1, it->st.ks_mod_main,
					    it->st.ks_mod_sub, &r)))
			return err;
		if ((err = storage__ki_set(s, txn, it->key, it->klen, &ns)))
			return err;
		b->b_changes++;
	}
	resp->deleted = (int64_t)c.n;
	resp->header = header_new(a, b->b_rev + (b->b_changes > 0));
	return resp->header ? 0 : STORAGE_ERR_NOMEM;
}

/* ---- Txn ---- */

typedef struct cmp_ctx {
	const Etcdserverpb__Compare *c;
	int ok;
	int any;
} cmp_ctx;

/* etcd's compareKV. */
static int compare_kv(const Etcdserverpb__Compare *c, const kvrec *r)
{
	int res = 0;
	int64_t want = 0;
	switch (c->target) {
	case ETCDSERVERPB__COMPARE__COMPARE_TARGET__VALUE: {
		const uint8_t *p = NULL;
		size_t n = 0;
		if (c->target_union_case == ETCDSERVERPB__COMPARE__TARGET_UNION_VALUE) {
			p = c->value.data;
			n = c->value.len;
		}
		res = storage__bytes_cmp(r->val, r->vlen, p, n);
		break;
	}
	case ETCDSERVERPB__COMPARE__COMPARE_TARGET__CREATE:
		if (c->target_union_case == ETCDSERVERPB__COMPARE__TARGET_UNION_CREATE_REVISION)
			want = c->create_revision;
		res = (r->create > want) - (r->create < want);
		break;
	case ETCDSERVERPB__COMPARE__COMPARE_TARGET__MOD:
		if (c->target_union_case == ETCDSERVERPB__COMPARE__TARGET_UNION_MOD_REVISION)
			want = c->mod_revision;
		res = (r->mod > want) - (r->mod < want);
		break;
	case ETCDSERVERPB__COMPARE__COMPARE_TARGET__VERSION:
		if (c->target_union_case == ETCDSERVERPB__COMPARE__TARGET_UNION_VERSION)
			want = c->version;
		res = (r->version > want) - (r->version < want);
		break;
	case ETCDSERVERPB__COMPARE__COMPARE_TARGET__LEASE:
		if (c->target_union_case == ETCDSERVERPB__COMPARE__TARGET_UNION_LEASE)
			want = c->lease;
		res = (r->lease > want) - (r->lease < want);
		break;
	default:
		break;
	}
	switch (c->result) {
	case ETCDSERVERPB__COMPARE__COMPARE_RESULT__EQUAL:
		return res == 0;
	case ETCDSERVERPB__COMPARE__COMPARE_RESULT__NOT_EQUAL:
		return res != 0;
	case ETCDSERVERPB__COMPARE__COMPARE_RESULT__GREATER:
		return res > 0;
	case ETCDSERVERPB__COMPARE__COMPARE_RESULT__LESS:
		return res < 0;
	default:
		return 1;
	}
}

static int cmp_fn(vis *x, const uint8_t *key, size_t klen, const ki_state *st)
{
	cmp_ctx *c = x->vi_arg;
	kvrec r = {key, klen, st->ks_create, st->ks_mod_main, st->ks_version, st->ks_lease, NULL, 0};
	c->any = 1;
	if (c->c->target == ETCDSERVERPB__COMPARE__COMPARE_TARGET__VALUE) {
		kvrec full;
		int err = rev_read(x->vi_v->v_s, x->vi_v->v_txn, st->ks_mod_main, st->ks_mod_sub,
				   &full, NULL);
		if (err)
			return err;
		r.val = full.val;
		r.vlen = full.vlen;
	}
	if (!compare_kv(c->c, &r)) {
		c->ok = 0;
		return 1;
	}
	return 0;
}

/* etcd's applyCompare: every key in the range must satisfy it; no key compares as zero. */
static int compare_eval(mv *v, const Etcdserverpb__Compare *c, int *ok)
{
	cmp_ctx cc = {c, 1, 0};
	int err = visit(v, v->v_rev, &c->key, &c->range_end, cmp_fn, &cc);
	if (err)
		return err;
	if (!cc.any) {
		kvrec zero = {0};
		*ok = c->target != ETCDSERVERPB__COMPARE__COMPARE_TARGET__VALUE && compare_kv(c, &zero);
	} else {
		*ok = cc.ok;
	}
	return 0;
}

typedef struct path {
	uint8_t *p;
	size_t n, cap;
} path;

/* etcd's compareToPath: every compare, nested ones included, sees the state before the txn. */
static int txn_path(mv *v, const Etcdserverpb__TxnRequest *t, storage_arena *a, path *p)
{
	int ok = 1, err;
	for (size_t i = 0; i < t->n_compare && ok; i++)
		if ((err = compare_eval(v, t->compare[i], &ok)))
			return err;
	if (p->n == p->cap) {
		size_t cap = p->cap ? p->cap * 2 : 16;
		uint8_t *n = storage_arena_alloc(a, cap);
		if (!n)
			return STORAGE_ERR_NOMEM;
		if (p->n)
			memcpy(n, p->p, p->n);
		p->p = n;
		p->cap = cap;
	}
	p->p[p->n++] = (uint8_t)ok;
	size_t nops = ok ? t->n_success : t->n_failure;
	Etcdserverpb__RequestOp **ops = ok ? t->success : t->failure;
	for (size_t i = 0; i < nops; i++)
		if (ops[i]->request_case == ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_TXN &&
		    ops[i]->request_txn && (err = txn_path(v, ops[i]->request_txn, a, p)))
			return err;
	return 0;
}

/* etcd's checkRequests with checkPut (puts != 0) or checkRange, along the chosen path. */
static int txn_check(mv *v, const Etcdserverpb__TxnRequest *t, const path *p, size_t *idx, int puts)
{
	int ok = p->p[(*idx)++];
	size_t nops = ok ? t->n_success : t->n_failure;
	Etcdserverpb__RequestOp **ops = ok ? t->success : t->failure;
	int err;
	for (size_t i = 0; i < nops; i++) {
		const Etcdserverpb__RequestOp *op = ops[i];
		switch (op->request_case) {
		case ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT: {
			const Etcdserverpb__PutRequest *r = op->request_put;
			if (!puts || !r || !(r->ignore_value || r->ignore_lease))
				break;
			ki_state st;
			err = storage__ki_get(v->v_s, v->v_txn, r->key.data, r->key.len, &st);
			if (err == STORAGE_ERR_NOT_FOUND || (!err && st.ks_version == 0))
				return STORAGE_ERR_KEY_NOT_FOUND;
			if (err)
				return err;
			break;
		}
		case ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_RANGE: {
			const Etcdserverpb__RangeRequest *r = op->request_range;
			if (puts || !r || r->revision == 0)
				break;
			if (r->revision > v->v_rev)
				return STORAGE_ERR_FUTURE_REV;
			if (r->revision < v->v_compact)
				return STORAGE_ERR_COMPACTED;
			break;
		}
		case ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_TXN:
			if (op->request_txn && (err = txn_check(v, op->request_txn, p, idx, puts)))
				return err;
			break;
		default:
			break;
		}
	}
	return 0;
}

static int txn_readonly(const Etcdserverpb__TxnRequest *t)
{
	for (size_t i = 0; i < t->n_success; i++)
		if (t->success[i]->request_case != ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_RANGE)
			return 0;
	for (size_t i = 0; i < t->n_failure; i++)
		if (t->failure[i]->request_case != ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_RANGE)
			return 0;
	return 1;
}

/* Applies the chosen branch. b == NULL: read-only, through view ro. */
static int txn_apply(storage_batch *b, MDB_txn *txn, mv *ro, const Etcdserverpb__TxnRequest *t,
		     const path *p, size_t *idx, storage_arena *a, Etcdserverpb__TxnResponse *resp)
{
	Etcdserverpb__TxnResponse init = ETCDSERVERPB__TXN_RESPONSE__INIT;
	*resp = init;
	int ok = p->p[(*idx)++];
	size_t nops = ok ? t->n_success : t->n_failure;
	Etcdserverpb__RequestOp **ops = ok ? t->success : t->failure;
	resp->succeeded = ok;
	/* etcd gives a nested txn an empty header; the caller sets the top one's revision. */
	if (!(resp->header = header_new(a, 0)))
		return STORAGE_ERR_NOMEM;
	if (nops && !(resp->responses = storage_arena_alloc(a, nops * sizeof(*resp->responses))))
		return STORAGE_ERR_NOMEM;
	resp->n_responses = nops;
	int err = 0;
	for (size_t i = 0; i < nops; i++) {
		const Etcdserverpb__RequestOp *op = ops[i];
		Etcdserverpb__ResponseOp *ro_ = storage_arena_alloc(a, sizeof(*ro_));
		if (!ro_)
			return STORAGE_ERR_NOMEM;
		Etcdserverpb__ResponseOp rinit = ETCDSERVERPB__RESPONSE_OP__INIT;
		*ro_ = rinit;
		resp->responses[i] = ro_;
		switch (op->request_case) {
		case ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_RANGE: {
			Etcdserverpb__RangeResponse *r = storage_arena_alloc(a, sizeof(*r));
			if (!r)
				return STORAGE_ERR_NOMEM;
			mv v = b ? batch_view(b, txn) : *ro;
			err = do_range(&v, op->request_range, 0, a, r);
			ro_->response_case = ETCDSERVERPB__RESPONSE_OP__RESPONSE_RESPONSE_RANGE;
			ro_->response_range = r;
			break;
		}
		case ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT: {
			Etcdserverpb__PutResponse *r = storage_arena_alloc(a, sizeof(*r));
			if (!r)
				return STORAGE_ERR_NOMEM;
			err = b ? do_put(b, txn, op->request_put, a, r) : STORAGE_ERR_INVALID;
			ro_->response_case = ETCDSERVERPB__RESPONSE_OP__RESPONSE_RESPONSE_PUT;
			ro_->response_put = r;
			break;
		}
		case ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_DELETE_RANGE: {
			Etcdserverpb__DeleteRangeResponse *r = storage_arena_alloc(a, sizeof(*r));
			if (!r)
				return STORAGE_ERR_NOMEM;
			err = b ? do_delete(b, txn, op->request_delete_range, a, r) : STORAGE_ERR_INVALID;
			ro_->response_case = ETCDSERVERPB__RESPONSE_OP__RESPONSE_RESPONSE_DELETE_RANGE;
			ro_->response_delete_range = r;
			break;
		}
		case ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_TXN: {
			Etcdserverpb__TxnResponse *r = storage_arena_alloc(a, sizeof(*r));
			if (!r)
				return STORAGE_ERR_NOMEM;
			err = b ? txn_apply(b, txn, ro, op->request_txn, p, idx, a, r) : STORAGE_ERR_INVALID;
			ro_->response_case = ETCDSERVERPB__RESPONSE_OP__RESPONSE_RESPONSE_TXN;
			ro_->response_txn = r;
			break;
		}
		default:
			/* An op with nothing set: etcd leaves an empty ResponseOp. */
			break;
		}
		if (err)
			return err;
	}
	return 0;
}

static int validate_ops(const Etcdserverpb__TxnRequest *t)
{
	for (int br = 0; br < 2; br++) {
		size_t n = br ? t->n_failure : t->n_success;
		Etcdserverpb__RequestOp **ops = br ? t->failure : t->success;
		for (size_t i = 0; i < n; i++) {
			const Etcdserverpb__RequestOp *op = ops[i];
			if (op->request_case == ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_TXN &&
			    op->request_txn && validate_ops(op->request_txn))
				return STORAGE_ERR_INVALID;
			/* protobuf-c gives a set oneof a non-NULL message */
			if (op->request_case != ETCDSERVERPB__REQUEST_OP__REQUEST__NOT_SET &&
			    !op->request_range)
				return STORAGE_ERR_INVALID;
		}
	}
	return 0;
}

/* ---- requests inside a batch: one child txn each ---- */

typedef struct saved {
	int64_t compact, cnext_main, cnext_sub, cpending, next_id;
} saved;

static int req_begin(storage_batch *b, MDB_txn **child, saved *sv)
{
	b->b_changes = 0;
	sv->compact = b->b_compact;
	sv->cnext_main = b->b_cnext_main;
	sv->cnext_sub = b->b_cnext_sub;
	sv->cpending = b->b_cpending;
	sv->next_id = b->b_next_id;
	return storage__mdb_err(mdb_txn_begin(b->b_s->s_env, b->b_txn, 0, child));
}

static int req_end(storage_batch *b, MDB_txn *child, const saved *sv, int err)
{
	if (!err)
		err = storage__mdb_err(mdb_txn_commit(child));
	else
		mdb_txn_abort(child);
	if (err) {
		b->b_compact = sv->compact;
		b->b_cnext_main = sv->cnext_main;
		b->b_cnext_sub = sv->cnext_sub;
		b->b_cpending = sv->cpending;
		b->b_next_id = sv->next_id;
	} else if (b->b_changes) {
		b->b_rev++;
	}
	b->b_changes = 0;
	return err;
}

int storage_batch_put(storage_batch *b, const Etcdserverpb__PutRequest *req, storage_arena *a,
		      Etcdserverpb__PutResponse *resp)
{
	MDB_txn *txn;
	saved sv;
	int err = req_begin(b, &txn, &sv);
	if (err)
		return err;
	return req_end(b, txn, &sv, do_put(b, txn, req, a, resp));
}

int storage_batch_delete_range(storage_batch *b, const Etcdserverpb__DeleteRangeRequest *req,
			       storage_arena *a, Etcdserverpb__DeleteRangeResponse *resp)
{
	MDB_txn *txn;
	saved sv;
	int err = req_begin(b, &txn, &sv);
	if (err)
		return err;
	return req_end(b, txn, &sv, do_delete(b, txn, req, a, resp));
}

int storage_batch_range(storage_batch *b, const Etcdserverpb__RangeRequest *req, storage_arena *a,
			Etcdserverpb__RangeResponse *resp)
{
	b->b_changes = 0;
	mv v = batch_view(b, b->b_txn);
	return do_range(&v, req, 0, a, resp);
}

static int txn_run(storage_batch *b, MDB_txn *txn, const Etcdserverpb__TxnRequest *req,
		   storage_arena *a, Etcdserverpb__TxnResponse *resp)
{
	mv v = batch_view(b, txn);
	path p = {0};
	size_t idx;
	int err = validate_ops(req);
	if (!err)
		err = txn_path(&v, req, a, &p);
	if (!err && !txn_readonly(req)) {
		idx = 0;
		err = txn_check(&v, req, &p, &idx, 1);
	}
	if (!err) {
		idx = 0;
		err = txn_check(&v, req, &p, &idx, 0);
	}
	if (!err) {
		idx = 0;
		err = txn_apply(b, txn, NULL, req, &p, &idx, a, resp);
	}
	if (!err)
		resp->header->revision = b->b_rev + (b->b_changes > 0);
	return err;
}

int storage_batch_txn(storage_batch *b, const Etcdserverpb__TxnRequest *req, storage_arena *a,
		      Etcdserverpb__TxnResponse *resp)
{
	MDB_txn *txn;
	saved sv;
	int err = req_begin(b, &txn, &sv);
	if (err)
		return err;
	return req_end(b, txn, &sv, txn_run(b, txn, req, a, resp));
}

/* ---- reads ---- */

static mv reader_view(storage_reader *r)
{
	mv v = {r->r_s, r->r_txn, 0, r->r_rev, r->r_compact};
	return v;
}

int storage_range(storage_reader *r, const Etcdserverpb__RangeRequest *req, storage_arena *a,
		  Etcdserverpb__RangeResponse *resp)
{
	mv v = reader_view(r);
	return do_range(&v, req, 0, a, resp);
}

int storage_range_page(storage_reader *r, const Etcdserverpb__RangeRequest *req, storage_arena *a,
		       Etcdserverpb__RangeResponse *resp)
{
	mv v = reader_view(r);
	return do_range(&v, req, 1, a, resp);
}

int storage_read_txn(storage_reader *r, const Etcdserverpb__TxnRequest *req, storage_arena *a,
		     Etcdserverpb__TxnResponse *resp)
{
	if (!txn_readonly(req) || validate_ops(req))
		return STORAGE_ERR_INVALID;
	mv v = reader_view(r);
	path p = {0};
	size_t idx = 0;
	int err = txn_path(&v, req, a, &p);
	if (!err)
		err = txn_check(&v, req, &p, &idx, 0);
	if (!err) {
		idx = 0;
		err = txn_apply(NULL, NULL, &v, req, &p, &idx, a, resp);
	}
	if (!err)
		resp->header->revision = v.v_rev;
	return err;
}

/* ---- Compact ---- */

/*
 * Compaction met the record h of revision (main, sub), at or below the compacted revision:
 * its predecessor is superseded (if still there: a tombstone's record went when it was met,
 * an earlier predecessor by this very rule). A signpost the predecessor had passes to this
 * revision, unless this one goes too (gone: a tombstone), so every key id keeps one. The
 * predecessor must be a record of the same key: another key's is never deleted.
 */
static int drop_prev(storage *s, MDB_txn *txn, const rev_hdr *h, int64_t main, int64_t sub,
		     int gone)
{
	int64_t pm, ps;
	rev_hdr ph;
	int err = rev_prev(s, txn, h, main, sub, &pm, &ps);
	if (!err)
		err = rev_get(s, txn, pm, ps, &ph);
	if (err)
		return err == STORAGE_ERR_NOT_FOUND ? 0 : err;
	if (ph.id != h->id)
		return STORAGE_ERR_CORRUPT;
	uint8_t pk[REV_KEY_SIZE];
	rev_key(pk, pm, ps);
	MDB_val k = {sizeof(pk), pk};
	if ((err = storage__mdb_err(mdb_del(txn, s->s_revs, &k, NULL))))
		return err;
	int had = storage__hist_del(s, txn, h->id, pm, ps);
	if (had <= 0)
		return had;
	return gone ? 0 : storage__hist_put(s, txn, h->id, main, sub, 0);
}

/*
 * Examines up to max revisions from the compaction cursor. A revision at or below the
 * compacted revision is superseded when it is a tombstone (the key did not exist then) or
 * when a later revision of its key is also at or below it; etcd keeps the others. A record
 * with a prev pointer removes its predecessor (older, so examined already); a record from
 * before those existed is superseded when its key has a later signpost at or below the
 * compacted revision (each revision of those days has one). Either way, when a revision
 * with a signpost goes, the revision after it gets one: every key id keeps one (key_of_id).
 */
static int compact_step(storage_batch *b, MDB_txn *txn, size_t max, int *done)
{
	storage *s = b->b_s;
	MDB_cursor *rc_ = NULL;
	int err = storage__mdb_err(mdb_cursor_open(txn, s->s_revs, &rc_));
	*done = 0;
	for (size_t i = 0; !err && i < max; i++) {
		uint8_t kb[REV_KEY_SIZE];
		rev_key(kb, b->b_cnext_main, b->b_cnext_sub);
		MDB_val k = {sizeof(kb), kb}, v;
		int rc = mdb_cursor_get(rc_, &k, &v, MDB_SET_RANGE);
		int64_t main = rc == 0 ? (int64_t)be64_get(k.mv_data) : 0;
		if (rc == MDB_NOTFOUND || (rc == 0 && main > b->b_compact)) {
			b->b_cpending = 0;
			*done = 1;
			break;
		}
		if (rc) {
			err = storage__mdb_err(rc);
			break;
		}
		rev_hdr h;
		if (k.mv_size != REV_KEY_SIZE || storage__rev_parse(&v, &h)) {
			err = STORAGE_ERR_CORRUPT;
			break;
		}
		int64_t sub = (int64_t)be64_get((uint8_t *)k.mv_data + 8);
		b->b_cnext_main = main;
		b->b_cnext_sub = sub + 1;

		int superseded = h.tomb;
		if (!superseded && !h.has_prev) {
			/* After this record, which may be followed by a change of its key in the
			 * same revision (a txn may put a key, then delete it). */
			int64_t lm, ls;
			err = storage__hist_from(s, txn, h.id, main, sub + 1, &lm, &ls);
			if (err && err != STORAGE_ERR_NOT_FOUND)
				break;
			superseded = err == 0 && lm <= b->b_compact;
			err = 0;
		}
		/* Copies out of the record before anything is deleted: the key of a tombstone
		 * (it may have to leave the index). */
		kvrec r = {0};
		uint8_t *keycopy = NULL;
		if (h.tomb) {
			if ((err = storage__kv_decode(h.kv, h.kvlen, &r)))
				break;
			keycopy = malloc(r.klen ? r.klen : 1);
			if (!keycopy) {
				err = STORAGE_ERR_NOMEM;
				break;
			}
			memcpy(keycopy, r.key, r.klen);
		}
		if (superseded && (rc = mdb_cursor_del(rc_, 0)) == 0) {
			int had = storage__hist_del(s, txn, h.id, main, sub);
			if (had < 0)
				err = had;
		}
		if (!err && !rc && h.has_prev)
			err = drop_prev(s, txn, &h, main, sub, superseded);
		if (!err && !rc && h.tomb) {
			/* Scanning in revision order, every earlier revision of the key is gone by
			 * now; if the tombstone is its newest revision, the key leaves the index. */
			ki_state st;
			err = storage__ki_get(s, txn, keycopy, r.klen, &st);
			if (err == 0 && st.ks_id == h.id && st.ks_mod_main == main && st.ks_mod_sub == sub)
				err = storage__ki_del(s, txn, keycopy, r.klen);
			else if (err == STORAGE_ERR_NOT_FOUND)
				err = 0;
		}
		free(keycopy);
		if (!err && rc)
			err = storage__mdb_err(rc);
	}
	if (rc_)
		mdb_cursor_close(rc_);
	return err;
}

int storage_batch_compact(storage_batch *b, const Etcdserverpb__CompactionRequest *req,
			  storage_arena *a, Etcdserverpb__CompactionResponse *resp)
{
	Etcdserverpb__CompactionResponse init = ETCDSERVERPB__COMPACTION_RESPONSE__INIT;
	*resp = init;
	if (req->revision <= b->b_compact)
		return STORAGE_ERR_COMPACTED;
	if (req->revision > b->b_rev)
		return STORAGE_ERR_FUTURE_REV;
	MDB_txn *txn;
	saved sv;
	int err = req_begin(b, &txn, &sv);
	if (err)
		return err;
	/* Every compaction rescans from the start: revisions an earlier one kept (the latest
	 * of their key then) may be superseded now. What is left there is one per key. */
	b->b_compact = req->revision;
	b->b_cnext_main = 0;
	b->b_cnext_sub = 0;
	b->b_cpending = 1;
	int done;
	err = compact_step(b, txn, (size_t)storage__compact_chunk, &done);
	if (!err && !(resp->header = header_new(a, b->b_rev)))
		err = STORAGE_ERR_NOMEM;
	return req_end(b, txn, &sv, err);
}

int storage_batch_compact_continue(storage_batch *b, size_t max_revisions, int *done)
{
	if (!b->b_cpending) {
		*done = 1;
		return 0;
	}
	CRASHPOINT("compact.continue"); /* earlier steps committed, the rest still on disk */
	MDB_txn *txn;
	saved sv;
	int err = req_begin(b, &txn, &sv);
	if (err)
		return err;
	err = compact_step(b, txn, max_revisions, done);
	return req_end(b, txn, &sv, err);
}

/* ---- events: history replay from the revision table ---- */

/*
 * Reads the events of revisions [from, to] from the revision table of txn, at most max
 * (never splitting a revision). prev_kv is the key's newest revision before the event's,
 * found through its history; a create has none.
 */
static int read_events(mv *v, int64_t from, int64_t to, size_t max, storage_arena *a,
		       Mvccpb__Event ***out, size_t *nout)
{
	*out = NULL;
	*nout = 0;
	MDB_cursor *cur;
	int err = storage__mdb_err(mdb_cursor_open(v->v_txn, v->v_s->s_revs, &cur));
	if (err)
		return err;
	uint8_t kb[REV_KEY_SIZE];
	rev_key(kb, from, 0);
	MDB_val k = {sizeof(kb), kb}, d;
	size_t n = 0, cap = 0;
	Mvccpb__Event **evs = NULL;
	int64_t last_main = -1;
	int rc = mdb_cursor_get(cur, &k, &d, MDB_SET_RANGE);
	for (; rc == 0; rc = mdb_cursor_get(cur, &k, &d, MDB_NEXT)) {
		rev_hdr h;
		if (k.mv_size != REV_KEY_SIZE || storage__rev_parse(&d, &h)) {
			err = STORAGE_ERR_CORRUPT;
			break;
		}
		int64_t main = (int64_t)be64_get(k.mv_data);
		if (main > to || (n >= max && main != last_main))
			break;
		last_main = main;
		kvrec r;
		if ((err = storage__kv_decode(h.kv, h.kvlen, &r)))
			break;
		Mvccpb__Event *ev = storage_arena_alloc(a, sizeof(*ev));
		if (!ev) {
			err = STORAGE_ERR_NOMEM;
			break;
		}
		Mvccpb__Event init = MVCCPB__EVENT__INIT;
		*ev = init;
		ev->type = h.tomb ? MVCCPB__EVENT__EVENT_TYPE__DELETE : MVCCPB__EVENT__EVENT_TYPE__PUT;
		if (!(ev->kv = kv_new(v, a, &r, 1))) {
			err = STORAGE_ERR_NOMEM;
			break;
		}
		if (h.tomb || r.create != r.mod) {
			/* The key as of main - 1, as etcd reads prev_kv: its revision before this
			 * one, passing over a change earlier in the same revision (a txn may
			 * delete a key, then put it). None if a tombstone; compaction removes a
			 * tombstone at or below the compacted revision, which the revision after
			 * it still points at. */
			int64_t pmain = main, psub = (int64_t)be64_get((uint8_t *)k.mv_data + 8);
			rev_hdr ph = h;
			do
				if ((err = rev_prev(v->v_s, v->v_txn, &ph, pmain, psub, &pmain, &psub)) == 0 &&
				    (err = rev_get(v->v_s, v->v_txn, pmain, psub, &ph)) == 0 && ph.id != h.id)
					err = STORAGE_ERR_CORRUPT;
			while (err == 0 && pmain == main);
			if (err == 0 && !ph.tomb) {
				kvrec pr;
				if ((err = storage__kv_decode(ph.kv, ph.kvlen, &pr)))
					break;
				if (!(ev->prev_kv = kv_new(v, a, &pr, 1))) {
					err = STORAGE_ERR_NOMEM;
					break;
				}
			} else if (err && err != STORAGE_ERR_NOT_FOUND) {
				break;
			}
			err = 0;
		}
		if (n == cap) {
			size_t ncap = cap ? cap * 2 : 16;
			Mvccpb__Event **ne = storage_arena_alloc(a, ncap * sizeof(*ne));
			if (!ne) {
				err = STORAGE_ERR_NOMEM;
				break;
			}
			if (n)
				memcpy(ne, evs, n * sizeof(*ne));
			evs = ne;
			cap = ncap;
		}
		evs[n++] = ev;
	}
	if (!err && rc != 0 && rc != MDB_NOTFOUND)
		err = storage__mdb_err(rc);
	mdb_cursor_close(cur);
	if (!err) {
		*out = evs;
		*nout = n;
	}
	return err;
}

int storage_batch_events(storage_batch *b, storage_arena *a, Mvccpb__Event ***events, size_t *n,
			 int64_t *rev)
{
	if (b->b_log_only)
		return STORAGE_ERR_INVALID; /* no LMDB part: no revision, no events */
	mv v = batch_view(b, b->b_txn);
	*rev = b->b_rev;
	if (b->b_rev == b->b_start_rev) {
		*events = NULL;
		*n = 0;
		return 0;
	}
	return read_events(&v, b->b_start_rev + 1, b->b_rev, (size_t)-1, a, events, n);
}

int storage_read_events(storage_reader *r, int64_t from_rev, size_t max_events, storage_arena *a,
			Mvccpb__Event ***events, size_t *n, int64_t *reader_rev,
			int64_t *compact_rev)
{
	mv v = reader_view(r);
	*reader_rev = r->r_rev;
	*compact_rev = r->r_compact; /* -1 if never compacted, as etcd reports it */
	*events = NULL;
	*n = 0;
	if (from_rev < r->r_compact)
		return STORAGE_ERR_COMPACTED;
	if (from_rev > r->r_rev)
		return 0;
	if (from_rev < 1)
		return 0; /* etcd 3.4: a negative start that is not compacted away replays nothing */
	return read_events(&v, from_rev, r->r_rev, max_events, a, events, n);
}

/* ---- leases ---- */

int storage_batch_lease_grant(storage_batch *b, int64_t id, int64_t ttl)
{
	uint8_t kb[8], vb[8];
	be64_put(kb, (uint64_t)id);
	be64_put(vb, (uint64_t)ttl);
	MDB_val k = {sizeof(kb), kb}, v = {sizeof(vb), vb};
	int rc = mdb_put(b->b_txn, b->b_s->s_leases, &k, &v, MDB_NOOVERWRITE);
	if (rc == MDB_KEYEXIST)
		return STORAGE_ERR_LEASE_EXISTS;
	return storage__mdb_err(rc);
}

/* The key bytes of key id: its newest revision's record names it. Points into the map of
 * txn; copied into the arena. */
static int key_of_id(storage *s, MDB_txn *txn, uint64_t id, storage_arena *a, ProtobufCBinaryData *out)
{
	int64_t main, sub;
	int tomb;
	int err = storage__hist_at(s, txn, id, INT64_MAX - 1, &main, &sub, &tomb);
	if (err)
		return err == STORAGE_ERR_NOT_FOUND ? STORAGE_ERR_CORRUPT : err;
	kvrec r;
	if ((err = rev_read(s, txn, main, sub, &r, NULL)))
		return err;
	out->len = r.klen;
	out->data = storage_arena_dup(a, r.key, r.klen ? r.klen : 1);
	return out->data ? 0 : STORAGE_ERR_NOMEM;
}

static int cmp_binary(const void *x, const void *y)
{
	const ProtobufCBinaryData *a = x, *b = y;
	return storage__bytes_cmp(a->data, a->len, b->data, b->len);
}

/* The keys attached to lease id, in key order, in the arena. */
static int lease_keys(storage *s, MDB_txn *txn, int64_t id, storage_arena *a, ProtobufCBinaryData **keys,
		      size_t *nkeys)
{
	*keys = NULL;
	*nkeys = 0;
	MDB_cursor *cur;
	int err = storage__mdb_err(mdb_cursor_open(txn, s->s_lkeys, &cur));
	if (err)
		return err;
	uint8_t kb[16];
	be64_put(kb, (uint64_t)id);
	be64_put(kb + 8, 0);
	MDB_val k = {sizeof(kb), kb}, v;
	size_t n = 0, cap = 0;
	ProtobufCBinaryData *out = NULL;
	int rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
	for (; rc == 0; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		if (k.mv_size != 16 || be64_get(k.mv_data) != (uint64_t)id)
			break;
		if (n == cap) {
			size_t ncap = cap ? cap * 2 : 16;
			ProtobufCBinaryData *nk = storage_arena_alloc(a, ncap * sizeof(*nk));
			if (!nk) {
				err = STORAGE_ERR_NOMEM;
				break;
			}
			if (n)
				memcpy(nk, out, n * sizeof(*nk));
			out = nk;
			cap = ncap;
		}
		uint64_t key_id = be64_get((uint8_t *)k.mv_data + 8);
		/* The cursor stays valid: key_of_id only reads. */
		if ((err = key_of_id(s, txn, key_id, a, &out[n])))
			break;
		n++;
	}
	if (!err && rc != 0 && rc != MDB_NOTFOUND)
		err = storage__mdb_err(rc);
	mdb_cursor_close(cur);
	if (err)
		return err;
	if (n > 1)
		qsort(out, n, sizeof(*out), cmp_binary);
	*keys = out;
	*nkeys = n;
	return 0;
}

static int do_lease_revoke(storage_batch *b, MDB_txn *txn, int64_t id, storage_arena *a,
			   Etcdserverpb__LeaseRevokeResponse *resp)
{
	storage *s = b->b_s;
	int err = lease_exists(s, txn, id);
	if (err)
		return err;
	ProtobufCBinaryData *keys;
	size_t n;
	if ((err = lease_keys(s, txn, id, a, &keys, &n)))
		return err;
	/* etcd deletes the lease's keys in key order in one txn: one revision, one event each. */
	for (size_t i = 0; i < n; i++) {
		Etcdserverpb__DeleteRangeRequest dr = ETCDSERVERPB__DELETE_RANGE_REQUEST__INIT;
		Etcdserverpb__DeleteRangeResponse dresp;
		dr.key = keys[i];
		if ((err = do_delete(b, txn, &dr, a, &dresp)))
			return err;
	}
	uint8_t kb[8];
	be64_put(kb, (uint64_t)id);
	MDB_val k = {sizeof(kb), kb};
	if ((err = storage__mdb_err(mdb_del(txn, s->s_leases, &k, NULL))))
		return err;
	if (resp) {
		Etcdserverpb__LeaseRevokeResponse init = ETCDSERVERPB__LEASE_REVOKE_RESPONSE__INIT;
		*resp = init;
		resp->header = header_new(a, b->b_rev + (b->b_changes > 0));
		if (!resp->header)
			return STORAGE_ERR_NOMEM;
	}
	return 0;
}

int storage_batch_lease_revoke(storage_batch *b, int64_t id, storage_arena *a,
			       Etcdserverpb__LeaseRevokeResponse *resp)
{
	MDB_txn *txn;
	saved sv;
	int err = req_begin(b, &txn, &sv);
	if (err)
		return err;
	return req_end(b, txn, &sv, do_lease_revoke(b, txn, id, a, resp));
}

/*
 * A lease record is its granted TTL (8 bytes BE), followed, only while a checkpoint holds
 * one, by the remaining TTL (8 more). Leases never checkpointed keep the 8-byte form that
 * data directories written before checkpoints existed hold.
 */
static int lease_value_decode(const MDB_val *v, int64_t *ttl, int64_t *remaining)
{
	if (v->mv_size != 8 && v->mv_size != 16)
		return STORAGE_ERR_CORRUPT;
	*ttl = (int64_t)be64_get(v->mv_data);
	*remaining = v->mv_size == 16 ? (int64_t)be64_get((const uint8_t *)v->mv_data + 8) : 0;
	return 0;
}

static int lease_checkpoint_one(storage *s, MDB_txn *txn, int64_t id, int64_t remaining)
{
	uint8_t kb[8], vb[16];
	be64_put(kb, (uint64_t)id);
	MDB_val k = {sizeof(kb), kb}, v;
	int rc = mdb_get(txn, s->s_leases, &k, &v);
	if (rc == MDB_NOTFOUND)
		return 0; /* revoked meanwhile: etcd ignores the checkpoint */
	if (rc)
		return storage__mdb_err(rc);
	int64_t ttl, old;
	int err = lease_value_decode(&v, &ttl, &old);
	if (err)
		return err;
	if (remaining < 0)
		remaining = 0;
	if (old == remaining)
		return 0;
	be64_put(vb, (uint64_t)ttl);
	be64_put(vb + 8, (uint64_t)remaining);
	MDB_val nv = {remaining > 0 ? 16 : 8, vb};
	return storage__mdb_err(mdb_put(txn, s->s_leases, &k, &nv, 0));
}

int storage_batch_lease_checkpoint(storage_batch *b, const Etcdserverpb__LeaseCheckpointRequest *req)
{
	MDB_txn *txn;
	saved sv;
	int err = req_begin(b, &txn, &sv);
	if (err)
		return err;
	for (size_t i = 0; !err && i < req->n_checkpoints; i++)
		err = lease_checkpoint_one(b->b_s, txn, req->checkpoints[i]->id, req->checkpoints[i]->remaining_ttl);
	return req_end(b, txn, &sv, err);
}

int storage_read_lease(storage_reader *r, int64_t id, int64_t *ttl, storage_arena *a,
		       ProtobufCBinaryData **keys, size_t *nkeys)
{
	uint8_t kb[8];
	be64_put(kb, (uint64_t)id);
	MDB_val k = {sizeof(kb), kb}, v;
	int rc = mdb_get(r->r_txn, r->r_s->s_leases, &k, &v);
	if (rc == MDB_NOTFOUND)
		return STORAGE_ERR_LEASE_NOT_FOUND;
	if (rc)
		return storage__mdb_err(rc);
	int64_t remaining;
	int err = lease_value_decode(&v, ttl, &remaining);
	if (err)
		return err;
	if (keys == NULL)
		return 0;
	return lease_keys(r->r_s, r->r_txn, id, a, keys, nkeys);
}

int storage_read_leases(storage_reader *r, storage_arena *a, int64_t **ids, int64_t **ttls,
			int64_t **remaining, size_t *n)
{
	MDB_stat st;
	int err = storage__mdb_err(mdb_stat(r->r_txn, r->r_s->s_leases, &st));
	if (err)
		return err;
	size_t cap = st.ms_entries ? st.ms_entries : 1;
	*ids = storage_arena_alloc(a, cap * sizeof(int64_t));
	*ttls = storage_arena_alloc(a, cap * sizeof(int64_t));
	if (remaining)
		*remaining = storage_arena_alloc(a, cap * sizeof(int64_t));
	*n = 0;
	if (!*ids || !*ttls || (remaining && !*remaining))
		return STORAGE_ERR_NOMEM;
	MDB_cursor *cur;
	if ((err = storage__mdb_err(mdb_cursor_open(r->r_txn, r->r_s->s_leases, &cur))))
		return err;
	MDB_val k, v;
	int rc;
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0 && *n < cap;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		int64_t rem;
		if (k.mv_size != 8 || lease_value_decode(&v, &(*ttls)[*n], &rem) != 0) {
			err = STORAGE_ERR_CORRUPT;
			break;
		}
		(*ids)[*n] = (int64_t)be64_get(k.mv_data);
		if (remaining)
			(*remaining)[*n] = rem;
		(*n)++;
	}
	if (!err && rc != 0 && rc != MDB_NOTFOUND)
		err = storage__mdb_err(rc);
	mdb_cursor_close(cur);
	return err;
}

int64_t storage_batch_revision(storage_batch *b)
{
	return b->b_rev;
}

/* ---- hashes ---- */


int storage_hash_kv(storage_reader *r, int64_t rev, uint32_t *hash, int64_t *hash_rev,
		    int64_t *compact_rev)
{
	storage *s = r->r_s;
	int64_t compact = r->r_compact;
	*compact_rev = compact; /* -1 before any compaction, as etcd reports */
	if (rev <= 0)
		rev = r->r_rev;
	if (rev > r->r_rev)
		return STORAGE_ERR_FUTURE_REV;
	/* etcd refuses to hash at the compacted revision itself, unlike Range. */
	if (compact >= 0 && rev <= compact)
		return STORAGE_ERR_COMPACTED;
	*hash_rev = rev;
	uint32_t h = crc32c(0, "key", 3);
	MDB_cursor *cur;
	int err = storage__mdb_err(mdb_cursor_open(r->r_txn, s->s_revs, &cur));
	if (err)
		return err;
	MDB_val k, v;
	int rc;
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		rev_hdr hd;
		if (k.mv_size != REV_KEY_SIZE || storage__rev_parse(&v, &hd)) {
			err = STORAGE_ERR_CORRUPT;
			break;
		}
		int64_t main = (int64_t)be64_get(k.mv_data), sub = (int64_t)be64_get((uint8_t *)k.mv_data + 8);
		if (main > rev)
			break;
		int tomb = hd.tomb;
		if (compact >= 0 && main <= compact) {
			/* At or below the compacted revision etcd hashes only what a compaction at
			 * the hash revision would keep: each key's newest revision, if not deleted. */
			int keep;
			if ((err = storage__rev_newest_at(s, r->r_txn, &hd, main, sub, rev, &keep)))
				break;
			if (!keep)
				continue;
		}
		uint8_t ek[18];
		be64_put(ek, (uint64_t)main);
		ek[8] = '_';
		be64_put(ek + 9, (uint64_t)sub);
		ek[17] = 't';
		h = crc32c(h, ek, tomb ? 18 : 17);
		if (tomb) {
			/* etcd stores a tombstone's value as KeyValue{key} alone. */
			kvrec kr;
			if ((err = storage__kv_decode(hd.kv, hd.kvlen, &kr)))
				break;
			uint8_t hdr[11];
			uint8_t *q = hdr;
			*q++ = 0x0a;
			q = storage__varint_put(q, kr.klen);
			h = crc32c(h, hdr, (size_t)(q - hdr));
			h = crc32c(h, kr.key, kr.klen);
		} else {
			h = crc32c(h, hd.kv, hd.kvlen);
		}
	}
	if (!err && rc != 0 && rc != MDB_NOTFOUND)
		err = storage__mdb_err(rc);
	mdb_cursor_close(cur);
	if (!err)
		*hash = h;
	return err;
}

int storage_hash(storage_reader *r, uint32_t *hash)
{
	storage *s = r->r_s;
	const MDB_dbi dbis[] = {s->s_meta, s->s_keys, s->s_hist, s->s_revs, s->s_leases, s->s_lkeys};
	uint32_t h = 0;
	int err = 0;
	for (size_t i = 0; i < sizeof(dbis) / sizeof(dbis[0]) && !err; i++) {
		MDB_cursor *cur;
		if ((err = storage__mdb_err(mdb_cursor_open(r->r_txn, dbis[i], &cur))))
			break;
		MDB_val k, v;
		int rc;
		for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
			h = crc32c(h, k.mv_data, k.mv_size);
			h = crc32c(h, v.mv_data, v.mv_size);
		}
		if (rc != MDB_NOTFOUND)
			err = storage__mdb_err(rc);
		mdb_cursor_close(cur);
	}
	if (!err)
		*hash = h;
	return err;
}
