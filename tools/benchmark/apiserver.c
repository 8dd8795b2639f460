/*
 * apiserver.c - the kube-apiserver profile and the LIST probe.
 *
 *   apiserver-load  creates objects 0..--objects-1 the way the apiserver creates them:
 *                   Txn(If CreateRevision(k) == 0 Then Put(k, v)); an object that already
 *                   exists is a conflict, not an error (so a second load is harmless).
 *   apiserver       the mix, per new operation (a LIST then continues page by page on the
 *                   same client until its last page):
 *                     get     30%  Range(k), linearizable
 *                     list     6%  Range(prefix, limit --limit (default 500)); the next pages
 *                                  continue from the last key + "\0" at the first page's
 *                                  revision; 1 in 4 lists a whole resource, the rest one namespace
 *                     count    2%  Range(/registry/<resource>/, count_only)
 *                     create   8%  Txn(If CreateRevision(k) == 0 Then Put(k, v)) on an absent object
 *                     update  38%  Txn(If ModRevision(k) == r Then Put(k, v) Else Range(k))
 *                     delete   8%  Txn(If ModRevision(k) == r Then DeleteRange(k) Else Range(k))
 *                     event    8%  Txn(If CreateRevision(e) == 0 Then Put(e, v, lease)), one
 *                                  shared lease for all events (as the apiserver's event TTL)
 *                   r is the object's mod_revision as this process last saw it (the apiserver's
 *                   watch cache); a failed compare is a conflict, counted apart from errors.
 *                   With the watch on (default), one Watch stream per resource prefix
 *                   (prev_kv, progress_notify) runs during the mix and reports delivery latency
 *                   of the PUT events (values start with their send time).
 *   list PREFIX     one full LIST of PREFIX, paginated with --limit (0 = a single request): the
 *                   figure for the server's memory during large LISTs.
 *
 * Objects: object i is /registry/<resources[i % 5]>/ns-<(i / 5) % --namespaces>/obj-<i>, values
 * --val-size-min..--val-size bytes.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "api/proto/rpc.pb-c.h"
#include "tools/benchmark/bench.h"

static const char *const resources[] = {"pods", "configmaps", "secrets", "deployments", "services"};
#define N_RESOURCES 5

enum { AS_GET, AS_LIST, AS_COUNT, AS_CREATE, AS_UPDATE, AS_DELETE, AS_EVENT, AS_N_OPS };
static const char *const as_ops[] = {"get", "list-page", "count", "create", "update", "delete", "event", "watch-event"};

/* mod_revision per object as last seen: -1 unknown, 0 absent, > 0 present. Shared by all clients. */
static _Atomic int64_t *g_rev;
static int g_nobj;
static int64_t g_lease;
static atomic_uint_fast64_t g_event_seq;

static int obj_key(const struct bench_opts *o, int i, char *out, size_t len)
{
	return snprintf(out, len, "/registry/%s/ns-%03d/obj-%07d", resources[i % N_RESOURCES],
			(i / N_RESOURCES) % o->namespaces, i);
}

/* The index of an object key, or -1 for other keys (events). */
static int obj_index(const uint8_t *k, size_t len)
{
	const char *tag = "/obj-";
	for (size_t i = len >= 12 ? len - 12 : 0; i + 5 <= len; i++)
		if (!memcmp(k + i, tag, 5)) {
			int v = 0;
			for (size_t j = i + 5; j < len; j++) {
				if (k[j] < '0' || k[j] > '9')
					return -1;
				v = v * 10 + (k[j] - '0');
			}
			return v;
		}
	return -1;
}

static double uniform(struct bench_rng *rng)
{
	return (double)(bench_rand(rng) >> 11) / 9007199254740992.0;
}

/* A value of val_size_min..val_size bytes that starts with its send time ("t=<ns>;"). Caller frees. */
static uint8_t *stamped_value(const struct bench_opts *o, struct bench_rng *rng, int fixed_min, size_t *len)
{
	int lo = o->val_size_min >= 0 && o->val_size_min <= o->val_size ? o->val_size_min : o->val_size;
	int n = fixed_min ? lo : lo + (int)(bench_rand(rng) % (uint64_t)(o->val_size - lo + 1));
	if (n < 32)
		n = 32;
	uint8_t *v = malloc((size_t)n);
	if (!v)
		abort();
	memset(v, 'x', (size_t)n);
	memcpy(v, bench_value_bytes(o), (size_t)(n < o->val_size ? n : o->val_size));
	char ts[32];
	int tl = snprintf(ts, sizeof ts, "t=%llu;", (unsigned long long)bench_now_ns());
	memcpy(v, ts, (size_t)tl);
	*len = (size_t)n;
	return v;
}

struct as_state {
	int in_list;	  /* a paginated LIST is in progress on this client */
	char end[64];	  /* its range_end */
	uint8_t next[96]; /* its next key */
	size_t next_len;
	int64_t list_rev; /* pinned at the first page's revision */
	int obj;	  /* the object of the request in flight */
};

static void compare_init(Etcdserverpb__Compare *c, const char *key, int create, int64_t rev)
{
	*c = (Etcdserverpb__Compare)ETCDSERVERPB__COMPARE__INIT;
	c->result = ETCDSERVERPB__COMPARE__COMPARE_RESULT__EQUAL;
	c->key.data = (uint8_t *)key;
	c->key.len = strlen(key);
	if (create) {
		c->target = ETCDSERVERPB__COMPARE__COMPARE_TARGET__CREATE;
		c->target_union_case = ETCDSERVERPB__COMPARE__TARGET_UNION_CREATE_REVISION;
		c->create_revision = rev;
	} else {
		c->target = ETCDSERVERPB__COMPARE__COMPARE_TARGET__MOD;
		c->target_union_case = ETCDSERVERPB__COMPARE__TARGET_UNION_MOD_REVISION;
		c->mod_revision = rev;
	}
}

/* Txn(If <cmp> Then <put or delete> [Else Range(key)]) */
static size_t encode_cas(const struct bench_opts *o, struct bench_rng *rng, const char *key, int create, int64_t rev,
			 int del, int64_t lease, uint8_t **buf, size_t *cap)
{
	Etcdserverpb__Compare cmp;
	compare_init(&cmp, key, create, rev);
	Etcdserverpb__Compare *cmps[1] = {&cmp};
	Etcdserverpb__PutRequest put = ETCDSERVERPB__PUT_REQUEST__INIT;
	Etcdserverpb__DeleteRangeRequest dr = ETCDSERVERPB__DELETE_RANGE_REQUEST__INIT;
	Etcdserverpb__RangeRequest get = ETCDSERVERPB__RANGE_REQUEST__INIT;
	Etcdserverpb__RequestOp then = ETCDSERVERPB__REQUEST_OP__INIT, other = ETCDSERVERPB__REQUEST_OP__INIT;
	uint8_t *val = NULL;
	if (del) {
		dr.key = cmp.key;
		then.request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_DELETE_RANGE;
		then.request_delete_range = &dr;
	} else {
		size_t vl;
		val = stamped_value(o, rng, lease != 0, &vl);
		put.key = cmp.key;
		put.value.data = val;
		put.value.len = vl;
		put.lease = lease;
		then.request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT;
		then.request_put = &put;
	}
	get.key = cmp.key;
	other.request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_RANGE;
	other.request_range = &get;
	Etcdserverpb__RequestOp *thens[1] = {&then}, *others[1] = {&other};
	Etcdserverpb__TxnRequest req = ETCDSERVERPB__TXN_REQUEST__INIT;
	req.n_compare = 1;
	req.compare = cmps;
	req.n_success = 1;
	req.success = thens;
	if (!create) { /* the apiserver's creates have no Else */
		req.n_failure = 1;
		req.failure = others;
	}
	size_t n = bench_pack(&req.base, buf, cap);
	free(val);
	return n;
}

/* A random object whose known state satisfies want (0: absent, 1: present or unknown), or -1. */
static int pick_obj(struct bench_rng *rng, int want)
{
	for (int tries = 0; tries < 16; tries++) {
		int i = (int)(bench_rand(rng) % (uint64_t)g_nobj);
		int64_t r = g_rev[i];
		if (want == 0 ? r == 0 : r != 0)
			return i;
	}
	return -1;
}

static size_t encode_list_page(const struct bench_opts *o, struct as_state *st, struct bench_call *call, uint8_t **buf,
			       size_t *cap)
{
	call->op = AS_LIST;
	call->method = "/etcdserverpb.KV/Range";
	call->resp_desc = &etcdserverpb__range_response__descriptor;
	Etcdserverpb__RangeRequest req = ETCDSERVERPB__RANGE_REQUEST__INIT;
	req.key.data = st->next;
	req.key.len = st->next_len;
	req.range_end.data = (uint8_t *)st->end;
	req.range_end.len = strlen(st->end);
	req.limit = o->limit > 0 ? o->limit : 500;
	req.revision = st->list_rev;
	return bench_pack(&req.base, buf, cap);
}

static void prefix_end(const char *prefix, char *end, size_t len)
{
	snprintf(end, len, "%s", prefix);
	end[strlen(end) - 1]++;
}

static size_t as_encode(const struct bench_opts *o, uint64_t seq, struct bench_rng *rng, void *state,
			struct bench_call *call, uint8_t **buf, size_t *cap)
{
	struct as_state *st = state;
	char key[128];
	if (st->in_list)
		return encode_list_page(o, st, call, buf, cap);
	if (!g_rev) { /* the engine's dry encode, before prepare */
		obj_key(o, 0, key, sizeof key);
		return encode_cas(o, rng, key, 1, 0, 0, 0, buf, cap);
	}
	double u = uniform(rng) * 100;
	int op = u < 30 ? AS_GET : u < 36 ? AS_LIST : u < 38 ? AS_COUNT : u < 46 ? AS_CREATE : u < 84 ? AS_UPDATE
			 : u < 92 ? AS_DELETE : AS_EVENT;
	if (op == AS_CREATE && (st->obj = pick_obj(rng, 0)) < 0)
		op = AS_UPDATE;
	if ((op == AS_UPDATE || op == AS_DELETE) && (st->obj = pick_obj(rng, 1)) < 0)
		op = AS_GET;
	if (op == AS_GET)
		st->obj = (int)(bench_rand(rng) % (uint64_t)g_nobj);
	call->op = op;
	call->method = "/etcdserverpb.KV/Txn";
	call->resp_desc = &etcdserverpb__txn_response__descriptor;
	switch (op) {
	case AS_LIST: {
		int r = (int)(bench_rand(rng) % N_RESOURCES);
		char prefix[64];
		if (bench_rand(rng) % 4 == 0)
			snprintf(prefix, sizeof prefix, "/registry/%s/", resources[r]);
		else
			snprintf(prefix, sizeof prefix, "/registry/%s/ns-%03d/", resources[r],
				 (int)(bench_rand(rng) % (uint64_t)o->namespaces));
		prefix_end(prefix, st->end, sizeof st->end);
		st->next_len = strlen(prefix);
		memcpy(st->next, prefix, st->next_len);
		st->list_rev = 0;
		st->in_list = 1;
		return encode_list_page(o, st, call, buf, cap);
	}
	case AS_GET:
	case AS_COUNT: {
		Etcdserverpb__RangeRequest req = ETCDSERVERPB__RANGE_REQUEST__INIT;
		char end[128];
		if (op == AS_GET) {
			obj_key(o, st->obj, key, sizeof key);
		} else {
			snprintf(key, sizeof key, "/registry/%s/", resources[bench_rand(rng) % N_RESOURCES]);
			prefix_end(key, end, sizeof end);
			req.range_end.data = (uint8_t *)end;
			req.range_end.len = strlen(end);
			req.count_only = 1;
		}
		req.key.data = (uint8_t *)key;
		req.key.len = strlen(key);
		call->method = "/etcdserverpb.KV/Range";
		call->resp_desc = &etcdserverpb__range_response__descriptor;
		return bench_pack(&req.base, buf, cap);
	}
	case AS_CREATE:
		obj_key(o, st->obj, key, sizeof key);
		return encode_cas(o, rng, key, 1, 0, 0, 0, buf, cap);
	case AS_UPDATE:
	case AS_DELETE: {
		obj_key(o, st->obj, key, sizeof key);
		int64_t r = g_rev[st->obj];
		return encode_cas(o, rng, key, 0, r > 0 ? r : 0, op == AS_DELETE, 0, buf, cap);
	}
	default: { /* AS_EVENT */
		uint64_t n = atomic_fetch_add(&g_event_seq, 1);
		snprintf(key, sizeof key, "/registry/events/ns-%03d/evt-%d-%llu", (int)(n % (uint64_t)o->namespaces),
			 (int)getpid(), (unsigned long long)n);
		return encode_cas(o, rng, key, 1, 0, 0, g_lease, buf, cap);
	}
	}
}

/* --- checking the answers, read in place (bench_pb_next) ----------------------------------
 * A LIST page is ~0.75 MB: protobuf-c's unpack copied every value and allocated every
 * KeyValue, and the load generator shares the cores with the servers it measures. */

/* The parts of a RangeResponse the checks read. */
struct range_view {
	int header;		 /* a header is present */
	int64_t revision;	 /* header.revision */
	size_t n_kvs;
	int64_t first_mod;	 /* kvs[0].mod_revision */
	const uint8_t *last_key; /* kvs[n_kvs - 1].key */
	size_t last_klen;
	int more;
};

/* The parts of a TxnResponse the checks read. */
struct txn_view {
	int header;
	int64_t revision;
	int succeeded;
	size_t n_responses;
	uint32_t first_case;	 /* the first ResponseOp's response field: 1 = range ... 4 = txn, 0 unset */
	const uint8_t *first_range; /* that response_range's bytes */
	size_t first_range_len;
};

static int header_read(const uint8_t *p, size_t n, int64_t *revision)
{
	const uint8_t *end = p + n;
	struct bench_pbf f;
	int r;
	*revision = 0;
	while ((r = bench_pb_next(&p, end, &f)) == 1)
		if (f.num == 3 && f.wt == 0)
			*revision = (int64_t)f.v;
	return r;
}

/* A KeyValue's key and mod_revision. */
static int kv_read(const uint8_t *p, size_t n, const uint8_t **key, size_t *klen, int64_t *mod)
{
	const uint8_t *end = p + n;
	struct bench_pbf f;
	int r;
	*key = NULL;
	*klen = 0;
	*mod = 0;
	while ((r = bench_pb_next(&p, end, &f)) == 1) {
		if (f.num == 1 && f.wt == 2) {
			*key = f.p;
			*klen = f.len;
		} else if (f.num == 3 && f.wt == 0) {
			*mod = (int64_t)f.v;
		}
	}
	return r;
}

/* Reads a RangeResponse; with learn, each object it holds updates g_rev (a LIST refreshes
 * the apiserver's watch cache; g_rev is only a hint, so a page that then fails its checks
 * may have taught it too). 0, or -1 if it is malformed. */
static int range_read(const uint8_t *p, size_t n, int learn, struct range_view *v)
{
	const uint8_t *end = p + n;
	struct bench_pbf f;
	int r;
	memset(v, 0, sizeof *v);
	while ((r = bench_pb_next(&p, end, &f)) == 1) {
		if (f.num == 1 && f.wt == 2) {
			v->header = 1;
			if (header_read(f.p, f.len, &v->revision) < 0)
				return -1;
		} else if (f.num == 2 && f.wt == 2) {
			const uint8_t *key;
			size_t klen;
			int64_t mod;
			if (kv_read(f.p, f.len, &key, &klen, &mod) < 0)
				return -1;
			if (v->n_kvs++ == 0)
				v->first_mod = mod;
			v->last_key = key;
			v->last_klen = klen;
			int idx = learn && g_rev ? obj_index(key, klen) : -1;
			/* pages at a pinned revision may be older than what this process already saw */
			if (idx >= 0 && idx < g_nobj && mod > g_rev[idx])
				g_rev[idx] = mod;
		} else if (f.num == 3 && f.wt == 0) {
			v->more = f.v != 0;
		}
	}
	return r < 0 ? -1 : 0;
}

static int txn_read(const uint8_t *p, size_t n, struct txn_view *t)
{
	const uint8_t *end = p + n;
	struct bench_pbf f, g;
	int r;
	memset(t, 0, sizeof *t);
	while ((r = bench_pb_next(&p, end, &f)) == 1) {
		if (f.num == 1 && f.wt == 2) {
			t->header = 1;
			if (header_read(f.p, f.len, &t->revision) < 0)
				return -1;
		} else if (f.num == 2 && f.wt == 0) {
			t->succeeded = f.v != 0;
		} else if (f.num == 3 && f.wt == 2) {
			if (t->n_responses++)
				continue;
			/* a oneof: the last of its fields wins */
			const uint8_t *q = f.p, *qe = f.p + f.len;
			int rr;
			while ((rr = bench_pb_next(&q, qe, &g)) == 1) {
				if (g.wt == 2 && g.num >= 1 && g.num <= 4) {
					t->first_case = g.num;
					t->first_range = g.p;
					t->first_range_len = g.len;
				}
			}
			if (rr < 0)
				return -1;
		}
	}
	return r < 0 ? -1 : 0;
}

static int check_list_page(const struct bench_opts *o, struct as_state *st, const uint8_t *p, size_t n)
{
	int64_t limit = o->limit > 0 ? o->limit : 500;
	struct range_view v;
	if (range_read(p, n, 1, &v) < 0 || !v.header || v.n_kvs > (size_t)limit || (v.more && v.n_kvs == 0)) {
		st->in_list = 0;
		return BENCH_CHECK_BAD;
	}
	if (!v.more) {
		st->in_list = 0;
		return BENCH_CHECK_OK;
	}
	if (v.last_klen + 1 > sizeof st->next) {
		st->in_list = 0;
		return BENCH_CHECK_BAD;
	}
	memcpy(st->next, v.last_key, v.last_klen);
	st->next[v.last_klen] = 0;
	st->next_len = v.last_klen + 1;
	if (!st->list_rev)
		st->list_rev = v.revision;
	return BENCH_CHECK_OK;
}

static int as_check(const struct bench_opts *o, void *state, const struct bench_call *call, const uint8_t *p,
		    size_t n)
{
	struct as_state *st = state;
	if (call->op == AS_LIST)
		return check_list_page(o, st, p, n);
	if (call->op == AS_GET || call->op == AS_COUNT) {
		struct range_view v;
		if (range_read(p, n, 0, &v) < 0 || !v.header || (call->op == AS_COUNT && v.n_kvs) ||
		    (call->op == AS_GET && v.n_kvs > 1))
			return BENCH_CHECK_BAD;
		if (call->op == AS_GET && g_rev && (!v.n_kvs || v.first_mod > g_rev[st->obj]))
			g_rev[st->obj] = v.n_kvs ? v.first_mod : 0;
		return BENCH_CHECK_OK;
	}
	struct txn_view t;
	if (txn_read(p, n, &t) < 0 || !t.header)
		return BENCH_CHECK_BAD;
	int create = call->op == AS_CREATE || call->op == AS_EVENT;
	if (t.succeeded) {
		if (t.n_responses != 1)
			return BENCH_CHECK_BAD;
		if (g_rev && call->op != AS_EVENT)
			g_rev[st->obj] = call->op == AS_DELETE ? 0 : t.revision;
		return BENCH_CHECK_OK;
	}
	if (create) {
		if (t.n_responses != 0)
			return BENCH_CHECK_BAD;
		if (g_rev && call->op == AS_CREATE)
			g_rev[st->obj] = -1; /* exists, revision unknown */
		return BENCH_CHECK_CONFLICT;
	}
	struct range_view g;
	if (t.n_responses != 1 || t.first_case != 1 || range_read(t.first_range, t.first_range_len, 0, &g) < 0)
		return BENCH_CHECK_BAD;
	if (g_rev)
		g_rev[st->obj] = g.n_kvs ? g.first_mod : 0;
	return BENCH_CHECK_CONFLICT;
}

/* --- apiserver-load ------------------------------------------------------------------------ */

static size_t load_encode(const struct bench_opts *o, uint64_t seq, struct bench_rng *rng, void *state,
			  struct bench_call *call, uint8_t **buf, size_t *cap)
{
	char key[128];
	obj_key(o, (int)(seq % (uint64_t)o->objects), key, sizeof key);
	return encode_cas(o, rng, key, 1, 0, 0, 0, buf, cap);
}

static int load_check(const struct bench_opts *o, void *state, const struct bench_call *call, const uint8_t *p,
		      size_t n)
{
	struct txn_view t;
	if (txn_read(p, n, &t) < 0 || !t.header)
		return BENCH_CHECK_BAD;
	return t.succeeded ? (t.n_responses == 1 ? BENCH_CHECK_OK : BENCH_CHECK_BAD) : BENCH_CHECK_CONFLICT;
}

/* --- the watchers: one stream per resource prefix (and events), during the mix --------------- */

#define AS_NW (N_RESOURCES + 1)
struct as_wstream {
	grpc_call *call;
	grpc_byte_buffer *send, *recv;
	grpc_metadata_array mi, mt;
	grpc_status_code status;
	grpc_slice details;
	int pending;
};

static struct {
	grpc_channel *ch;
	grpc_completion_queue *cq;
	pthread_t tid;
	int running;
	struct as_wstream s[AS_NW];
	atomic_int created, stop;
	uint64_t events, progress, errors, canceled;
	char first_error[160];
	uint32_t *lat;
	size_t nlat, caplat;
	double lat_sum;
} W;

static void w_lat(uint64_t ns)
{
	if (W.nlat == W.caplat) {
		size_t c = W.caplat ? W.caplat * 2 : 4096;
		uint32_t *n = realloc(W.lat, c * sizeof *n);
		if (!n)
			abort();
		W.lat = n;
		W.caplat = c;
	}
	W.lat[W.nlat++] = (uint32_t)(ns / 1000 > UINT32_MAX ? UINT32_MAX : ns / 1000);
	W.lat_sum += (double)ns / 1000.0;
}

/* One event of a WatchResponse: counted; a PUT's delivery latency from the send time its
 * value starts with. */
static void w_on_event(const uint8_t *p, size_t n, uint64_t now)
{
	const uint8_t *end = p + n, *val = NULL;
	size_t vlen = 0;
	struct bench_pbf f;
	int type = MVCCPB__EVENT__EVENT_TYPE__PUT, has_kv = 0;
	W.events++;
	while (bench_pb_next(&p, end, &f) == 1) {
		if (f.num == 1 && f.wt == 0) {
			type = (int)f.v;
		} else if (f.num == 2 && f.wt == 2) {
			const uint8_t *q = f.p, *qe = f.p + f.len;
			struct bench_pbf g;
			has_kv = 1;
			val = NULL;
			vlen = 0;
			while (bench_pb_next(&q, qe, &g) == 1)
				if (g.num == 5 && g.wt == 2) {
					val = g.p;
					vlen = g.len;
				}
		}
	}
	if (type != MVCCPB__EVENT__EVENT_TYPE__PUT || !has_kv || vlen < 3 || memcmp(val, "t=", 2))
		return;
	uint64_t ts = 0;
	for (size_t j = 2; j < vlen && val[j] >= '0' && val[j] <= '9'; j++)
		ts = ts * 10 + (uint64_t)(val[j] - '0');
	if (ts && ts <= now)
		w_lat(now - ts);
}

static void w_on_msg(grpc_byte_buffer *bb, uint64_t now)
{
	grpc_byte_buffer_reader rd;
	if (!grpc_byte_buffer_reader_init(&rd, bb)) {
		W.errors++;
		return;
	}
	grpc_slice all = grpc_byte_buffer_reader_readall(&rd);
	grpc_byte_buffer_reader_destroy(&rd);
	const uint8_t *p = GRPC_SLICE_START_PTR(all), *end = p + GRPC_SLICE_LENGTH(all);
	struct bench_pbf f;
	int r, created = 0, canceled = 0;
	size_t n_events = 0;
	char reason[sizeof W.first_error] = "";
	while ((r = bench_pb_next(&p, end, &f)) == 1) { /* a repeated scalar: the last wins */
		if (f.num == 3 && f.wt == 0) {
			created = f.v != 0;
		} else if (f.num == 4 && f.wt == 0) {
			canceled = f.v != 0;
		} else if (f.num == 6 && f.wt == 2) {
			int n = f.len < sizeof reason - 1 ? (int)f.len : (int)sizeof reason - 1;
			snprintf(reason, sizeof reason, "%.*s", n, (const char *)f.p);
		} else if (f.num == 11 && f.wt == 2) {
			n_events++;
			w_on_event(f.p, f.len, now);
		}
	}
	grpc_slice_unref(all);
	if (r < 0) {
		W.errors++;
		return;
	}
	if (created)
		atomic_fetch_add(&W.created, 1);
	if (canceled) {
		W.canceled++;
		if (!W.first_error[0])
			snprintf(W.first_error, sizeof W.first_error, "watch canceled: %s", reason);
	}
	if (!created && !canceled && !n_events)
		W.progress++;
}

static int w_recv(int i)
{
	struct as_wstream *s = &W.s[i];
	grpc_op op;
	memset(&op, 0, sizeof op);
	op.op = GRPC_OP_RECV_MESSAGE;
	op.data.recv_message.recv_message = &s->recv;
	s->recv = NULL;
	if (grpc_call_start_batch(s->call, &op, 1, (void *)(intptr_t)(i * 3 + 2), NULL) != GRPC_CALL_OK)
		return -1;
	s->pending++;
	return 0;
}

static void *w_main(void *arg)
{
	const struct bench_opts *o = arg;
	int open = 0;
	for (int i = 0; i < AS_NW; i++) {
		struct as_wstream *s = &W.s[i];
		char prefix[64], end[64];
		snprintf(prefix, sizeof prefix, "/registry/%s/", i < N_RESOURCES ? resources[i] : "events");
		prefix_end(prefix, end, sizeof end);
		Etcdserverpb__WatchCreateRequest cr = ETCDSERVERPB__WATCH_CREATE_REQUEST__INIT;
		cr.key.data = (uint8_t *)prefix;
		cr.key.len = strlen(prefix);
		cr.range_end.data = (uint8_t *)end;
		cr.range_end.len = strlen(end);
		cr.prev_kv = 1;
		cr.progress_notify = 1;
		Etcdserverpb__WatchRequest rq = ETCDSERVERPB__WATCH_REQUEST__INIT;
		rq.request_union_case = ETCDSERVERPB__WATCH_REQUEST__REQUEST_UNION_CREATE_REQUEST;
		rq.create_request = &cr;
		size_t n = protobuf_c_message_get_packed_size(&rq.base);
		uint8_t *b = malloc(n ? n : 1);
		protobuf_c_message_pack(&rq.base, b);
		grpc_slice sl = grpc_slice_from_copied_buffer((const char *)b, n);
		free(b);
		s->send = grpc_raw_byte_buffer_create(&sl, 1);
		grpc_slice_unref(sl);
		grpc_metadata_array_init(&s->mi);
		grpc_metadata_array_init(&s->mt);
		s->details = grpc_empty_slice();
		s->call = grpc_channel_create_call(W.ch, NULL, GRPC_PROPAGATE_DEFAULTS, W.cq,
						   grpc_slice_from_static_string("/etcdserverpb.Watch/Watch"), NULL,
						   gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
		grpc_op ops[3];
		memset(ops, 0, sizeof ops);
		ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
		ops[1].op = GRPC_OP_SEND_MESSAGE;
		ops[1].data.send_message.send_message = s->send;
		ops[2].op = GRPC_OP_RECV_INITIAL_METADATA;
		ops[2].data.recv_initial_metadata.recv_initial_metadata = &s->mi;
		if (grpc_call_start_batch(s->call, ops, 3, (void *)(intptr_t)(i * 3 + 1), NULL) == GRPC_CALL_OK)
			s->pending++;
		memset(ops, 0, sizeof ops);
		ops[0].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
		ops[0].data.recv_status_on_client.trailing_metadata = &s->mt;
		ops[0].data.recv_status_on_client.status = &s->status;
		ops[0].data.recv_status_on_client.status_details = &s->details;
		if (grpc_call_start_batch(s->call, ops, 1, (void *)(intptr_t)(i * 3 + 3), NULL) == GRPC_CALL_OK)
			s->pending++;
		w_recv(i);
		open++;
	}
	int cancelled = 0;
	(void)o;
	while (open > 0) {
		grpc_event ev = grpc_completion_queue_next(
			W.cq, gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(100, GPR_TIMESPAN)), NULL);
		if (!cancelled && atomic_load(&W.stop)) {
			for (int i = 0; i < AS_NW; i++)
				if (W.s[i].call)
					grpc_call_cancel(W.s[i].call, NULL);
			cancelled = 1;
		}
		if (ev.type != GRPC_OP_COMPLETE)
			continue;
		int tag = (int)(intptr_t)ev.tag - 1, i = tag / 3, kind = tag % 3;
		struct as_wstream *s = &W.s[i];
		s->pending--;
		if (kind == 0) { /* sent */
			grpc_byte_buffer_destroy(s->send);
			s->send = NULL;
		} else if (kind == 1) { /* received */
			if (ev.success && s->recv) {
				w_on_msg(s->recv, bench_now_ns());
				grpc_byte_buffer_destroy(s->recv);
				s->recv = NULL;
				if (!atomic_load(&W.stop))
					w_recv(i);
			}
		} else if (s->status != GRPC_STATUS_OK && s->status != GRPC_STATUS_CANCELLED) {
			W.errors++;
			if (!W.first_error[0]) {
				char *d = grpc_slice_to_c_string(s->details);
				snprintf(W.first_error, sizeof W.first_error, "watch stream: status %d: %s", (int)s->status, d);
				gpr_free(d);
			}
		}
		if (s->pending == 0 && s->call) {
			grpc_call_unref(s->call);
			s->call = NULL;
			grpc_slice_unref(s->details);
			grpc_metadata_array_destroy(&s->mi);
			grpc_metadata_array_destroy(&s->mt);
			open--;
		}
	}
	return NULL;
}

/* --- prepare / finish ---------------------------------------------------------------------- */

static int learn_revisions(const struct bench_opts *o, grpc_channel *ch, char *err, size_t errlen)
{
	/* The apiserver's reflector LIST: every object's mod_revision, keys only, in pages. */
	uint8_t next[96] = "/registry/";
	size_t next_len = strlen("/registry/");
	int64_t rev = 0;
	for (;;) {
		Etcdserverpb__RangeRequest rq = ETCDSERVERPB__RANGE_REQUEST__INIT;
		rq.key.data = next;
		rq.key.len = next_len;
		rq.range_end.data = (uint8_t *)"/registry0";
		rq.range_end.len = 10;
		rq.keys_only = 1;
		rq.limit = 10000;
		rq.revision = rev;
		ProtobufCMessage *m = NULL;
		int st = bench_unary(ch, "/etcdserverpb.KV/Range", &rq.base, &etcdserverpb__range_response__descriptor, &m,
				     o->timeout * 3, err, errlen);
		if (st != 0) {
			if (st == BENCH_STATUS_DECODE)
				snprintf(err, errlen, "initial LIST: response did not decode");
			return -1;
		}
		Etcdserverpb__RangeResponse *r = (Etcdserverpb__RangeResponse *)m;
		if (!rev && r->header)
			rev = r->header->revision;
		for (size_t i = 0; i < r->n_kvs; i++) {
			int idx = obj_index(r->kvs[i]->key.data, r->kvs[i]->key.len);
			if (idx >= 0 && idx < g_nobj)
				g_rev[idx] = r->kvs[i]->mod_revision;
		}
		int more = r->more && r->n_kvs && r->kvs[r->n_kvs - 1]->key.len + 1 <= sizeof next;
		if (more) {
			Mvccpb__KeyValue *l = r->kvs[r->n_kvs - 1];
			memcpy(next, l->key.data, l->key.len);
			next[l->key.len] = 0;
			next_len = l->key.len + 1;
		}
		protobuf_c_message_free_unpacked(m, NULL);
		if (!more)
			break;
	}
	for (int i = 0; i < g_nobj; i++)
		if (g_rev[i] < 0)
			g_rev[i] = 0;
	return 0;
}

static int as_prepare(const struct bench_opts *o, grpc_channel *ch, char *err, size_t errlen)
{
	g_nobj = o->objects;
	g_rev = malloc((size_t)g_nobj * sizeof *g_rev);
	if (!g_rev) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	for (int i = 0; i < g_nobj; i++)
		g_rev[i] = -1;
	if (learn_revisions(o, ch, err, errlen) != 0)
		return -1;
	Etcdserverpb__LeaseGrantRequest lg = ETCDSERVERPB__LEASE_GRANT_REQUEST__INIT;
	lg.ttl = 3600;
	ProtobufCMessage *m = NULL;
	if (bench_unary(ch, "/etcdserverpb.Lease/LeaseGrant", &lg.base, &etcdserverpb__lease_grant_response__descriptor, &m,
			o->timeout, err, errlen) != 0)
		return -1;
	g_lease = ((Etcdserverpb__LeaseGrantResponse *)m)->id;
	protobuf_c_message_free_unpacked(m, NULL);
	if (!o->watch_resources)
		return 0;
	W.ch = bench_channel(o->endpoints[0]);
	W.cq = grpc_completion_queue_create_for_next(NULL);
	pthread_create(&W.tid, NULL, w_main, (void *)o);
	W.running = 1;
	uint64_t until = bench_now_ns() + (uint64_t)(o->timeout * 1e9);
	while (atomic_load(&W.created) < AS_NW && bench_now_ns() < until)
		usleep(2000);
	if (atomic_load(&W.created) < AS_NW) {
		snprintf(err, errlen, "only %d of %d watches created", atomic_load(&W.created), AS_NW);
		return -1; /* the process exits: no need to stop the watcher */
	}
	return 0;
}

static void as_finish(const struct bench_opts *o, struct bench_result *res)
{
	int n = 0;
	if (W.running) {
		atomic_store(&W.stop, 1);
		pthread_join(W.tid, NULL);
		grpc_completion_queue_shutdown(W.cq);
		while (grpc_completion_queue_next(W.cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type != GRPC_QUEUE_SHUTDOWN)
			;
		grpc_completion_queue_destroy(W.cq);
		grpc_channel_destroy(W.ch);
		W.running = 0;
		if (res->n_ops < BENCH_MAX_OPS) {
			struct bench_op_result *op = &res->ops[res->n_ops++];
			op->name = as_ops[AS_N_OPS];
			op->ok = W.events;
			op->errors = W.errors + W.canceled;
			bench_sort_u32(W.lat, W.nlat);
			op->lat_us = W.lat;
			op->n_lat = W.nlat;
			op->lat_sum_us = W.lat_sum;
			W.lat = NULL;
		}
		if (W.errors + W.canceled) {
			res->errors += W.errors + W.canceled;
			res->by_status[2] += W.errors + W.canceled;
			if (!res->first_error[2][0])
				snprintf(res->first_error[2], sizeof res->first_error[2], "%s", W.first_error);
		}
		n = snprintf(res->extra_json, sizeof res->extra_json,
			     ",\"watch_streams\":%d,\"watch_events\":%llu,\"watch_progress\":%llu,\"watch_errors\":%llu", AS_NW,
			     (unsigned long long)W.events, (unsigned long long)W.progress,
			     (unsigned long long)(W.errors + W.canceled));
	}
	uint64_t present = 0;
	for (int i = 0; i < g_nobj; i++)
		present += g_rev[i] != 0;
	snprintf(res->extra_json + n, sizeof res->extra_json - (size_t)n, ",\"objects\":%d,\"objects_present_at_end\":%llu",
		 g_nobj, (unsigned long long)present);
	free((void *)g_rev);
	g_rev = NULL;
}

static const char *const load_ops[] = {"create"};

static const struct bench_workload as_workloads[] = {
	{.name = "apiserver",
	 .method = "/etcdserverpb.KV/Txn",
	 .resp_desc = &etcdserverpb__txn_response__descriptor,
	 .encode = as_encode,
	 .check_wire = as_check,
	 .state_size = sizeof(struct as_state),
	 .op_names = as_ops,
	 .n_ops = AS_N_OPS,
	 .prepare = as_prepare,
	 .finish = as_finish},
	{.name = "apiserver-load",
	 .method = "/etcdserverpb.KV/Txn",
	 .resp_desc = &etcdserverpb__txn_response__descriptor,
	 .encode = load_encode,
	 .check_wire = load_check,
	 .op_names = load_ops,
	 .n_ops = 1},
};

const struct bench_workload *bench_apiserver_find(const char *name)
{
	for (size_t i = 0; i < sizeof as_workloads / sizeof as_workloads[0]; i++)
		if (strcmp(as_workloads[i].name, name) == 0)
			return &as_workloads[i];
	return NULL;
}

/* --- list ---------------------------------------------------------------------------------- */

/* A RangeStream merged as proto Merge does, with each message's arrival as a "page". */
struct list_stream {
	struct bench_result *res;
	size_t caplat;
	uint64_t last_ns;
	int64_t rev, count;
	int more;
	uint64_t keys, bytes, pages;
};

static int list_stream_msg(void *arg, const ProtobufCMessage *m)
{
	struct list_stream *ls = arg;
	const Etcdserverpb__RangeStreamResponse *sr = (const Etcdserverpb__RangeStreamResponse *)m;
	const Etcdserverpb__RangeResponse *r = sr->range_response;
	uint64_t now = bench_now_ns();
	struct bench_result *res = ls->res;
	if (res->n_lat == ls->caplat) {
		ls->caplat = ls->caplat ? ls->caplat * 2 : 256;
		res->lat_us = realloc(res->lat_us, ls->caplat * sizeof(uint32_t));
		if (!res->lat_us)
			abort();
	}
	res->lat_us[res->n_lat++] = (uint32_t)((now - ls->last_ns) / 1000);
	res->lat_sum_us += (double)(now - ls->last_ns) / 1000.0;
	ls->last_ns = now;
	ls->pages++;
	if (r == NULL)
		return 0;
	if (r->header && r->header->revision)
		ls->rev = r->header->revision;
	if (r->count)
		ls->count = r->count;
	if (r->more)
		ls->more = 1;
	ls->keys += r->n_kvs;
	for (size_t i = 0; i < r->n_kvs; i++)
		ls->bytes += r->kvs[i]->key.len + r->kvs[i]->value.len;
	return 0;
}

static int bench_list_stream(const struct bench_opts *o, const char *prefix, const char *end,
			     struct bench_result *res)
{
	grpc_channel *ch = bench_channel(o->endpoints[0]);
	Etcdserverpb__RangeRequest rq = ETCDSERVERPB__RANGE_REQUEST__INIT;
	rq.key.data = (uint8_t *)prefix;
	rq.key.len = strlen(prefix);
	rq.range_end.data = (uint8_t *)end;
	rq.range_end.len = strlen(end);
	rq.limit = o->limit;
	rq.serializable = o->serializable;
	struct list_stream ls = {.res = res, .count = 0};
	uint64_t t0 = bench_now_ns();
	ls.last_ns = t0;
	char err[200] = "";
	int st = bench_server_stream(ch, "/etcdserverpb.KV/RangeStream", &rq.base,
				     &etcdserverpb__range_stream_response__descriptor, o->timeout, list_stream_msg, &ls,
				     err, sizeof err);
	res->elapsed = (double)(bench_now_ns() - t0) / 1e9;
	int rc = 0;
	if (st != 0) {
		int code = st > 0 && st < BENCH_NSTATUS ? st : 2;
		res->by_status[code]++;
		res->errors++;
		snprintf(res->first_error[code], sizeof res->first_error[code], "%s", err[0] ? err : "call failed");
		rc = -1;
	} else {
		res->ok = 1;
		/* The merged answer must be Range's: count = every key (no limit), or keys <= limit. */
		int bad = o->limit > 0 ? ls.keys != (uint64_t)(ls.count < o->limit ? ls.count : o->limit)
				       : ls.keys != (uint64_t)ls.count || ls.more;
		if (bad) {
			res->by_status[BENCH_STATUS_DECODE]++;
			res->errors++;
			snprintf(res->first_error[BENCH_STATUS_DECODE], 200, "stream gave %llu keys, count %lld",
				 (unsigned long long)ls.keys, (long long)ls.count);
			rc = -1;
		}
	}
	bench_sort_u32(res->lat_us, res->n_lat);
	snprintf(res->extra_json, sizeof res->extra_json,
		 ",\"stream\":true,\"pages\":%llu,\"keys\":%llu,\"bytes\":%llu,\"revision\":%lld",
		 (unsigned long long)ls.pages, (unsigned long long)ls.keys, (unsigned long long)ls.bytes,
		 (long long)ls.rev);
	grpc_channel_destroy(ch);
	return rc;
}

int bench_list(const struct bench_opts *o, const char *prefix, struct bench_result *res)
{
	memset(res, 0, sizeof *res);
	size_t pl = strlen(prefix);
	if (pl == 0 || pl >= 200) {
		snprintf(res->setup_error, sizeof res->setup_error, "list: prefix must be 1..199 bytes");
		res->setup_failed = 1;
		return -1;
	}
	char end[256];
	prefix_end(prefix, end, sizeof end);
	grpc_init();
	if (o->stream) {
		int src = bench_list_stream(o, prefix, end, res);
		grpc_shutdown();
		return src;
	}
	grpc_channel *ch = bench_channel(o->endpoints[0]);
	uint8_t *next = malloc(pl + 1);
	size_t next_len = pl, cap_next = pl + 1;
	memcpy(next, prefix, pl);
	int64_t rev = 0, count = -1;
	uint64_t keys = 0, bytes = 0, pages = 0;
	size_t caplat = 0;
	uint64_t t0 = bench_now_ns();
	int rc = 0;
	for (;;) {
		Etcdserverpb__RangeRequest rq = ETCDSERVERPB__RANGE_REQUEST__INIT;
		rq.key.data = next;
		rq.key.len = next_len;
		rq.range_end.data = (uint8_t *)end;
		rq.range_end.len = strlen(end);
		rq.limit = o->limit;
		rq.revision = rev;
		rq.serializable = o->serializable;
		ProtobufCMessage *m = NULL;
		char err[200] = "";
		uint64_t c0 = bench_now_ns();
		int st = bench_unary(ch, "/etcdserverpb.KV/Range", &rq.base, &etcdserverpb__range_response__descriptor, &m,
				     o->timeout, err, sizeof err);
		uint64_t c1 = bench_now_ns();
		if (st != 0) {
			int code = st > 0 && st < BENCH_NSTATUS ? st : 2;
			res->by_status[code]++;
			res->errors++;
			snprintf(res->first_error[code], sizeof res->first_error[code], "%s", err[0] ? err : "call failed");
			rc = -1;
			break;
		}
		Etcdserverpb__RangeResponse *r = (Etcdserverpb__RangeResponse *)m;
		if (!rev && r->header)
			rev = r->header->revision;
		if (count < 0)
			count = r->count;
		pages++;
		keys += r->n_kvs;
		for (size_t i = 0; i < r->n_kvs; i++)
			bytes += r->kvs[i]->key.len + r->kvs[i]->value.len;
		if (res->n_lat == caplat) {
			caplat = caplat ? caplat * 2 : 256;
			res->lat_us = realloc(res->lat_us, caplat * sizeof(uint32_t));
			if (!res->lat_us)
				abort();
		}
		res->lat_us[res->n_lat++] = (uint32_t)((c1 - c0) / 1000);
		res->lat_sum_us += (double)(c1 - c0) / 1000.0;
		res->ok++;
		int bad = !r->header || (o->limit > 0 && r->n_kvs > (size_t)o->limit) || (r->more && !r->n_kvs);
		int more = r->more && !bad;
		if (more) {
			Mvccpb__KeyValue *l = r->kvs[r->n_kvs - 1];
			if (l->key.len + 1 > cap_next) {
				cap_next = l->key.len + 1;
				next = realloc(next, cap_next);
			}
			memcpy(next, l->key.data, l->key.len);
			next[l->key.len] = 0;
			next_len = l->key.len + 1;
		}
		protobuf_c_message_free_unpacked(m, NULL);
		if (bad) {
			res->by_status[BENCH_STATUS_DECODE]++;
			res->errors++;
			snprintf(res->first_error[BENCH_STATUS_DECODE], 200, "page %llu broke the limit or continuation",
				 (unsigned long long)pages);
			rc = -1;
			break;
		}
		if (!more)
			break;
	}
	res->elapsed = (double)(bench_now_ns() - t0) / 1e9;
	if (rc == 0 && count >= 0 && (uint64_t)count != keys) {
		res->by_status[BENCH_STATUS_DECODE]++;
		res->errors++;
		snprintf(res->first_error[BENCH_STATUS_DECODE], 200, "listed %llu keys but the first page counted %lld",
			 (unsigned long long)keys, (long long)count);
	}
	bench_sort_u32(res->lat_us, res->n_lat);
	snprintf(res->extra_json, sizeof res->extra_json, ",\"pages\":%llu,\"keys\":%llu,\"bytes\":%llu,\"revision\":%lld",
		 (unsigned long long)pages, (unsigned long long)keys, (unsigned long long)bytes, (long long)rev);
	free(next);
	grpc_channel_destroy(ch);
	grpc_shutdown();
	return rc;
}
