/*
 * workload.c - request encoders for the benchmark's unary workloads, built the
 * way etcd's benchmark tool builds them:
 *   put      Put(key, value); key = key_size bytes, a zig-zag varint of
 *            rand() % key_space (or seq % key_space with --sequential-keys),
 *            zero padded (Go's binary.PutVarint into make([]byte, keySize)).
 *   range    Range(key [, range_end]) with --limit and --consistency.
 *   txn-put  Txn(success: txn_ops x Put) with no compares.
 *   txn-mixed optimistic concurrency on a hot key set (apiserver-style updates): with
 *            probability --read-fraction a Range of one hot key, else
 *            Txn(If ModRevision(k) == r Then Put(k) Else Range(k)) where r is the revision
 *            this client last saw for k (any client's answer updates the shared table); a
 *            failed compare is a "conflict", counted apart from errors.
 * (the apiserver profile and `list` are in apiserver.c)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/proto/rpc.pb-c.h"
#include "tools/benchmark/bench.h"

static uint8_t *g_value; /* shared, read-only after first use */
static int g_value_len = -1;

const uint8_t *bench_value_bytes(const struct bench_opts *o)
{
	/* Called first from bench_run's single-threaded setup (via a dry encode). */
	if (g_value_len != o->val_size) {
		free(g_value);
		g_value = malloc(o->val_size > 0 ? (size_t)o->val_size : 1);
		struct bench_rng r = {.s = 42};
		for (int i = 0; i < o->val_size; i++)
			g_value[i] = 'a' + (uint8_t)(bench_rand(&r) % 26);
		g_value_len = o->val_size;
	}
	return g_value;
}

static void make_key(const struct bench_opts *o, uint64_t seq, struct bench_rng *rng, uint8_t *k)
{
	uint64_t n = o->sequential ? seq % o->key_space : bench_rand(rng) % o->key_space;
	memset(k, 0, (size_t)o->key_size);
	uint64_t ux = n << 1; /* zig-zag of a non-negative int64 */
	for (int i = 0; i < o->key_size; i++) {
		if (ux < 0x80) {
			k[i] = (uint8_t)ux;
			break;
		}
		k[i] = (uint8_t)(ux | 0x80);
		ux >>= 7;
	}
}

size_t bench_pack(const ProtobufCMessage *m, uint8_t **buf, size_t *cap)
{
	size_t n = protobuf_c_message_get_packed_size(m);
	if (n > *cap) {
		size_t c = n < 256 ? 256 : n * 2;
		uint8_t *nb = realloc(*buf, c);
		if (!nb)
			abort();
		*buf = nb;
		*cap = c;
	}
	return protobuf_c_message_pack(m, *buf);
}

static size_t put_encode(const struct bench_opts *o, uint64_t seq, struct bench_rng *rng, void *state,
			 struct bench_call *call, uint8_t **buf, size_t *cap)
{
	size_t pl = o->key_prefix ? strlen(o->key_prefix) : 0;
	uint8_t key[pl + (size_t)(o->key_size > 0 ? o->key_size : 1)];
	if (pl)
		memcpy(key, o->key_prefix, pl);
	make_key(o, seq, rng, key + pl);
	Etcdserverpb__PutRequest req = ETCDSERVERPB__PUT_REQUEST__INIT;
	req.key.data = key;
	req.key.len = pl + (size_t)o->key_size;
	req.value.data = (uint8_t *)bench_value_bytes(o);
	req.value.len = (size_t)o->val_size;
	return bench_pack(&req.base, buf, cap);
}

static size_t range_encode(const struct bench_opts *o, uint64_t seq, struct bench_rng *rng, void *state,
			   struct bench_call *call, uint8_t **buf, size_t *cap)
{
	Etcdserverpb__RangeRequest req = ETCDSERVERPB__RANGE_REQUEST__INIT;
	req.key.data = (uint8_t *)o->range_key;
	req.key.len = strlen(o->range_key);
	if (o->range_end) {
		req.range_end.data = (uint8_t *)o->range_end;
		req.range_end.len = strlen(o->range_end);
	}
	req.limit = o->limit;
	req.serializable = o->serializable;
	return bench_pack(&req.base, buf, cap);
}

static size_t txn_put_encode(const struct bench_opts *o, uint64_t seq, struct bench_rng *rng, void *state,
			     struct bench_call *call, uint8_t **buf, size_t *cap)
{
	int n = o->txn_ops;
	uint8_t keys[n][o->key_size > 0 ? o->key_size : 1];
	Etcdserverpb__PutRequest puts[n];
	Etcdserverpb__RequestOp ops[n];
	Etcdserverpb__RequestOp *opp[n];
	/* Distinct keys within one txn (etcd rejects duplicates): consecutive from one base. */
	uint64_t base = o->sequential ? seq * (uint64_t)n : bench_rand(rng);
	struct bench_opts seqo = *o;
	seqo.sequential = 1;
	for (int i = 0; i < n; i++) {
		make_key(&seqo, base + (uint64_t)i, rng, keys[i]);
		puts[i] = (Etcdserverpb__PutRequest)ETCDSERVERPB__PUT_REQUEST__INIT;
		puts[i].key.data = keys[i];
		puts[i].key.len = (size_t)o->key_size;
		puts[i].value.data = (uint8_t *)bench_value_bytes(o);
		puts[i].value.len = (size_t)o->val_size;
		ops[i] = (Etcdserverpb__RequestOp)ETCDSERVERPB__REQUEST_OP__INIT;
		ops[i].request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT;
		ops[i].request_put = &puts[i];
		opp[i] = &ops[i];
	}
	Etcdserverpb__TxnRequest req = ETCDSERVERPB__TXN_REQUEST__INIT;
	req.n_success = (size_t)n;
	req.success = opp;
	return bench_pack(&req.base, buf, cap);
}

static int put_check(const struct bench_opts *o, void *state, const struct bench_call *call, const ProtobufCMessage *m)
{
	const Etcdserverpb__PutResponse *r = (const Etcdserverpb__PutResponse *)m;
	return r->header && r->header->revision > 0 ? 0 : -1;
}

static int range_check(const struct bench_opts *o, void *state, const struct bench_call *call, const ProtobufCMessage *m)
{
	const Etcdserverpb__RangeResponse *r = (const Etcdserverpb__RangeResponse *)m;
	if (!r->header)
		return -1;
	if (o->limit > 0 && r->n_kvs > (size_t)o->limit)
		return -1;
	return 0;
}

static int txn_check(const struct bench_opts *o, void *state, const struct bench_call *call, const ProtobufCMessage *m)
{
	const Etcdserverpb__TxnResponse *r = (const Etcdserverpb__TxnResponse *)m;
	if (!r->header || !r->succeeded || r->n_responses != (size_t)o->txn_ops)
		return -1;
	return 0;
}

/* --- txn-mixed --------------------------------------------------------------------------- */

enum { TM_READ, TM_CAS };
static const char *const txn_mixed_ops[] = {"read", "cas"};
/* Last mod_revision seen per hot key, shared by every client (0 = absent: the first CAS creates). */
static _Atomic int64_t *g_hot_rev;
static uint64_t g_hot_n;

static void hot_key(uint64_t k, char *out, size_t len)
{
	snprintf(out, len, "txn-mixed/%06llu", (unsigned long long)k);
}

static int txn_mixed_prepare(const struct bench_opts *o, grpc_channel *ch, char *err, size_t errlen)
{
	free((void *)g_hot_rev);
	g_hot_n = o->key_space;
	g_hot_rev = calloc(g_hot_n, sizeof *g_hot_rev);
	if (!g_hot_rev) {
		snprintf(err, errlen, "out of memory for %llu hot keys", (unsigned long long)g_hot_n);
		return -1;
	}
	return 0;
}

struct tm_state {
	uint64_t key; /* the hot key of the request in flight */
};

static size_t txn_mixed_encode(const struct bench_opts *o, uint64_t seq, struct bench_rng *rng, void *state,
			       struct bench_call *call, uint8_t **buf, size_t *cap)
{
	struct tm_state *st = state;
	st->key = bench_rand(rng) % o->key_space;
	char key[32];
	hot_key(st->key, key, sizeof key);
	Etcdserverpb__RangeRequest get = ETCDSERVERPB__RANGE_REQUEST__INIT;
	get.key.data = (uint8_t *)key;
	get.key.len = strlen(key);
	get.serializable = o->serializable;
	if ((double)(bench_rand(rng) >> 11) / 9007199254740992.0 < o->read_fraction) {
		call->op = TM_READ;
		call->method = "/etcdserverpb.KV/Range";
		call->resp_desc = &etcdserverpb__range_response__descriptor;
		return bench_pack(&get.base, buf, cap);
	}
	call->op = TM_CAS;
	Etcdserverpb__Compare cmp = ETCDSERVERPB__COMPARE__INIT;
	cmp.result = ETCDSERVERPB__COMPARE__COMPARE_RESULT__EQUAL;
	cmp.target = ETCDSERVERPB__COMPARE__COMPARE_TARGET__MOD;
	cmp.key = get.key;
	cmp.target_union_case = ETCDSERVERPB__COMPARE__TARGET_UNION_MOD_REVISION;
	cmp.mod_revision = g_hot_rev ? g_hot_rev[st->key] : 0;
	Etcdserverpb__Compare *cmps[1] = {&cmp};
	Etcdserverpb__PutRequest put = ETCDSERVERPB__PUT_REQUEST__INIT;
	put.key = get.key;
	put.value.data = (uint8_t *)bench_value_bytes(o);
	put.value.len = (size_t)o->val_size;
	Etcdserverpb__RequestOp then = ETCDSERVERPB__REQUEST_OP__INIT, other = ETCDSERVERPB__REQUEST_OP__INIT;
	then.request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT;
	then.request_put = &put;
	get.serializable = 0;
	other.request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_RANGE;
	other.request_range = &get;
	Etcdserverpb__RequestOp *thens[1] = {&then}, *others[1] = {&other};
	Etcdserverpb__TxnRequest req = ETCDSERVERPB__TXN_REQUEST__INIT;
	req.n_compare = 1;
	req.compare = cmps;
	req.n_success = 1;
	req.success = thens;
	req.n_failure = 1;
	req.failure = others;
	return bench_pack(&req.base, buf, cap);
}

static int txn_mixed_check(const struct bench_opts *o, void *state, const struct bench_call *call,
			   const ProtobufCMessage *m)
{
	struct tm_state *st = state;
	if (call->op == TM_READ) {
		const Etcdserverpb__RangeResponse *r = (const Etcdserverpb__RangeResponse *)m;
		if (!r->header || r->n_kvs > 1)
			return BENCH_CHECK_BAD;
		if (r->n_kvs && g_hot_rev && r->kvs[0]->mod_revision > g_hot_rev[st->key])
			g_hot_rev[st->key] = r->kvs[0]->mod_revision;
		return BENCH_CHECK_OK;
	}
	const Etcdserverpb__TxnResponse *r = (const Etcdserverpb__TxnResponse *)m;
	if (!r->header || r->n_responses != 1 || !r->responses[0])
		return BENCH_CHECK_BAD;
	if (r->succeeded) {
		if (r->responses[0]->response_case != ETCDSERVERPB__RESPONSE_OP__RESPONSE_RESPONSE_PUT)
			return BENCH_CHECK_BAD;
		if (g_hot_rev)
			g_hot_rev[st->key] = r->header->revision; /* our put's revision */
		return BENCH_CHECK_OK;
	}
	const Etcdserverpb__RangeResponse *g = r->responses[0]->response_range;
	if (r->responses[0]->response_case != ETCDSERVERPB__RESPONSE_OP__RESPONSE_RESPONSE_RANGE || !g ||
	    g->n_kvs > 1)
		return BENCH_CHECK_BAD;
	if (g_hot_rev)
		g_hot_rev[st->key] = g->n_kvs ? g->kvs[0]->mod_revision : 0;
	return BENCH_CHECK_CONFLICT;
}

static const struct bench_workload workloads[] = {
	{"put", "/etcdserverpb.KV/Put", &etcdserverpb__put_response__descriptor, put_encode, put_check},
	{"range", "/etcdserverpb.KV/Range", &etcdserverpb__range_response__descriptor, range_encode,
	 range_check},
	{"txn-put", "/etcdserverpb.KV/Txn", &etcdserverpb__txn_response__descriptor, txn_put_encode, txn_check},
	{"txn-mixed", "/etcdserverpb.KV/Txn", &etcdserverpb__txn_response__descriptor, txn_mixed_encode,
	 txn_mixed_check, sizeof(struct tm_state), txn_mixed_ops, 2, txn_mixed_prepare, NULL},
};

const struct bench_workload *bench_workload_find(const char *name)
{
	for (size_t i = 0; i < sizeof workloads / sizeof workloads[0]; i++)
		if (strcmp(workloads[i].name, name) == 0)
			return &workloads[i];
	return bench_apiserver_find(name);
}
