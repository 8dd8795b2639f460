/*
 * workload.c - request encoders for the benchmark's unary workloads, built the
 * way etcd's benchmark tool builds them:
 *   put      Put(key, value); key = key_size bytes, a zig-zag varint of
 *            rand() % key_space (or seq % key_space with --sequential-keys),
 *            zero padded (Go's binary.PutVarint into make([]byte, keySize)).
 *   range    Range(key [, range_end]) with --limit and --consistency.
 *   txn-put  Txn(success: txn_ops x Put) with no compares.
 */
#include <stdlib.h>
#include <string.h>

#include "api/proto/rpc.pb-c.h"
#include "tools/benchmark/bench.h"

static uint8_t *g_value; /* shared, read-only after first use */
static int g_value_len = -1;

static const uint8_t *value_bytes(const struct bench_opts *o)
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

static size_t pack(const ProtobufCMessage *m, uint8_t **buf, size_t *cap)
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

static size_t put_encode(const struct bench_opts *o, uint64_t seq, struct bench_rng *rng, uint8_t **buf,
			 size_t *cap)
{
	uint8_t key[o->key_size > 0 ? o->key_size : 1];
	make_key(o, seq, rng, key);
	Etcdserverpb__PutRequest req = ETCDSERVERPB__PUT_REQUEST__INIT;
	req.key.data = key;
	req.key.len = (size_t)o->key_size;
	req.value.data = (uint8_t *)value_bytes(o);
	req.value.len = (size_t)o->val_size;
	return pack(&req.base, buf, cap);
}

static size_t range_encode(const struct bench_opts *o, uint64_t seq, struct bench_rng *rng, uint8_t **buf,
			   size_t *cap)
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
	return pack(&req.base, buf, cap);
}

static size_t txn_put_encode(const struct bench_opts *o, uint64_t seq, struct bench_rng *rng, uint8_t **buf,
			     size_t *cap)
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
		puts[i].value.data = (uint8_t *)value_bytes(o);
		puts[i].value.len = (size_t)o->val_size;
		ops[i] = (Etcdserverpb__RequestOp)ETCDSERVERPB__REQUEST_OP__INIT;
		ops[i].request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT;
		ops[i].request_put = &puts[i];
		opp[i] = &ops[i];
	}
	Etcdserverpb__TxnRequest req = ETCDSERVERPB__TXN_REQUEST__INIT;
	req.n_success = (size_t)n;
	req.success = opp;
	return pack(&req.base, buf, cap);
}

static int put_check(const struct bench_opts *o, const ProtobufCMessage *m)
{
	const Etcdserverpb__PutResponse *r = (const Etcdserverpb__PutResponse *)m;
	return r->header && r->header->revision > 0 ? 0 : -1;
}

static int range_check(const struct bench_opts *o, const ProtobufCMessage *m)
{
	const Etcdserverpb__RangeResponse *r = (const Etcdserverpb__RangeResponse *)m;
	if (!r->header)
		return -1;
	if (o->limit > 0 && r->n_kvs > (size_t)o->limit)
		return -1;
	return 0;
}

static int txn_check(const struct bench_opts *o, const ProtobufCMessage *m)
{
	const Etcdserverpb__TxnResponse *r = (const Etcdserverpb__TxnResponse *)m;
	if (!r->header || !r->succeeded || r->n_responses != (size_t)o->txn_ops)
		return -1;
	return 0;
}

static const struct bench_workload workloads[] = {
	{"put", "/etcdserverpb.KV/Put", &etcdserverpb__put_response__descriptor, put_encode, put_check},
	{"range", "/etcdserverpb.KV/Range", &etcdserverpb__range_response__descriptor, range_encode,
	 range_check},
	{"txn-put", "/etcdserverpb.KV/Txn", &etcdserverpb__txn_response__descriptor, txn_put_encode, txn_check},
};

const struct bench_workload *bench_workload_find(const char *name)
{
	for (size_t i = 0; i < sizeof workloads / sizeof workloads[0]; i++)
		if (strcmp(workloads[i].name, name) == 0)
			return &workloads[i];
	return NULL;
}
