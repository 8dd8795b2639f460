/* pbwalk_test.c - bench_pb_next against protobuf-c's own encoding of etcd messages, and on
 * malformed input. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/proto/rpc.pb-c.h"
#include "tools/benchmark/bench.h"
#include "tests/unit/check.h"


/* Walks all fields of p..p+n; returns bench_pb_next's last result (0 = clean end). */
static int walk_all(const uint8_t *p, size_t n, int *fields)
{
	const uint8_t *end = p + n;
	struct bench_pbf f;
	int r;
	*fields = 0;
	while ((r = bench_pb_next(&p, end, &f)) == 1)
		(*fields)++;
	return r;
}

int main(void)
{
	/* A RangeResponse as a server sends it: header, three kvs, more, count. */
	Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
	h.cluster_id = 0xfeedfacecafebeefull; /* a 10-byte varint */
	h.revision = 300;
	Mvccpb__KeyValue kv[3];
	Mvccpb__KeyValue *kvs[3];
	char keys[3][16];
	uint8_t val[3000];
	memset(val, 'v', sizeof val);
	for (int i = 0; i < 3; i++) {
		kv[i] = (Mvccpb__KeyValue)MVCCPB__KEY_VALUE__INIT;
		snprintf(keys[i], sizeof keys[i], "/k/%d", i);
		kv[i].key.data = (uint8_t *)keys[i];
		kv[i].key.len = strlen(keys[i]);
		kv[i].mod_revision = 100 + i;
		kv[i].value.data = val;
		kv[i].value.len = (size_t)(i * 1000); /* 0, 1000 and 2000 bytes */
		kvs[i] = &kv[i];
	}
	Etcdserverpb__RangeResponse rr = ETCDSERVERPB__RANGE_RESPONSE__INIT;
	rr.header = &h;
	rr.n_kvs = 3;
	rr.kvs = kvs;
	rr.more = 1;
	rr.count = 7;
	size_t n = protobuf_c_message_get_packed_size(&rr.base);
	uint8_t *buf = malloc(n);
	CHECK(buf != NULL);
	if (!buf)
		return 1;
	CHECK(protobuf_c_message_pack(&rr.base, buf) == n);

	const uint8_t *p = buf, *end = buf + n;
	struct bench_pbf f;
	int n_kvs = 0, more = 0, r;
	int64_t count = 0, revision = 0;
	while ((r = bench_pb_next(&p, end, &f)) == 1) {
		if (f.num == 1 && f.wt == 2) {
			const uint8_t *q = f.p, *qe = f.p + f.len;
			struct bench_pbf g;
			while (bench_pb_next(&q, qe, &g) == 1)
				if (g.num == 3 && g.wt == 0)
					revision = (int64_t)g.v;
		} else if (f.num == 2 && f.wt == 2) {
			const uint8_t *q = f.p, *qe = f.p + f.len;
			struct bench_pbf g;
			int64_t mod = 0;
			size_t vlen = 0;
			const uint8_t *key = NULL;
			size_t klen = 0;
			while (bench_pb_next(&q, qe, &g) == 1) {
				if (g.num == 1 && g.wt == 2) {
					key = g.p;
					klen = g.len;
				} else if (g.num == 3 && g.wt == 0) {
					mod = (int64_t)g.v;
				} else if (g.num == 5 && g.wt == 2) {
					vlen = g.len;
				}
			}
			CHECK(key && klen == strlen(keys[n_kvs]) && memcmp(key, keys[n_kvs], klen) == 0);
			CHECK(mod == 100 + n_kvs);
			CHECK(vlen == (size_t)(n_kvs * 1000));
			n_kvs++;
		} else if (f.num == 3 && f.wt == 0) {
			more = f.v != 0;
		} else if (f.num == 4 && f.wt == 0) {
			count = (int64_t)f.v;
		}
	}
	CHECK(r == 0 && p == end);
	CHECK(revision == 300 && n_kvs == 3 && more == 1 && count == 7);

	/* Every cut short of the end is malformed or ends on a field boundary: never a read
	 * past the end, and the clean ends are exactly the field boundaries. */
	int fields;
	CHECK(walk_all(buf, n, &fields) == 0 && fields == 6); /* header, 3 kvs, more, count */
	for (size_t cut = 0; cut < n; cut++) {
		int rc = walk_all(buf, cut, &fields);
		CHECK(rc == 0 || rc == -1);
	}
	CHECK(walk_all(buf, n - 1, &fields) == -1); /* the count's varint cut */
	free(buf);

	/* Fixed-width fields, and wire types 3, 4, 6 and 7 (groups, unknown) refused. */
	const uint8_t fixed[] = {0x09, 1, 2, 3, 4, 5, 6, 7, 8, 0x15, 1, 2, 3, 4};
	CHECK(walk_all(fixed, sizeof fixed, &fields) == 0 && fields == 2);
	CHECK(walk_all(fixed, sizeof fixed - 1, &fields) == -1);
	for (uint8_t wt = 3; wt <= 7; wt++) {
		if (wt == 5)
			continue;
		uint8_t bad[] = {(uint8_t)(1 << 3 | wt), 0};
		CHECK(walk_all(bad, sizeof bad, &fields) == -1);
	}
	/* A length past the end; an 11-byte varint. */
	const uint8_t longlen[] = {0x0a, 0x05, 'a', 'b'};
	CHECK(walk_all(longlen, sizeof longlen, &fields) == -1);
	const uint8_t longvar[] = {0x08, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01};
	CHECK(walk_all(longvar, sizeof longvar, &fields) == -1);
	CHECK(walk_all(NULL, 0, &fields) == 0 && fields == 0);

	printf("pbwalk_test: %s\n", check_failures ? "FAILED" : "ok");
	return check_failures ? 1 : 0;
}
