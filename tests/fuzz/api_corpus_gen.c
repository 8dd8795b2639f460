/*
 * api_corpus_gen.c - writes the seed corpora of api_decode_fuzz and storage_apply_fuzz:
 * real etcd requests encoded with protobuf-c, in each fuzzer's input format.
 *
 *   api_corpus_gen <api_decode dir> <storage_apply dir>
 *
 * Run through `tests/fuzz/run_api_fuzz.sh --gen-corpus`, which builds it and rewrites
 * tests/fuzz/corpus/api_decode/ and tests/fuzz/corpus/storage_apply/.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/proto/rpc.pb-c.h"

/* Selector bytes of api_decode_fuzz.c (its fixed_msgs[] positions). */
enum {
	SEL_RANGE = 0, SEL_PUT, SEL_DELETE, SEL_TXN, SEL_COMPACT, SEL_WATCH, SEL_LEASE_GRANT,
	SEL_LEASE_KEEPALIVE, SEL_AUTHENTICATE, SEL_LEASE_REVOKE, SEL_LEASE_TTL, SEL_LEASE_LEASES,
	SEL_MEMBER_ADD, SEL_MEMBER_REMOVE, SEL_MEMBER_UPDATE, SEL_MEMBER_LIST, SEL_MEMBER_PROMOTE,
	SEL_ALARM, SEL_STATUS, SEL_DEFRAG, SEL_HASH, SEL_HASHKV, SEL_SNAPSHOT, SEL_MOVE_LEADER,
	SEL_DOWNGRADE, SEL_AUTH_ENABLE, SEL_AUTH_DISABLE, SEL_AUTH_STATUS, SEL_USER_ADD,
	SEL_USER_GET, SEL_USER_LIST, SEL_USER_DELETE, SEL_USER_PASSWD, SEL_USER_GRANT,
	SEL_USER_REVOKE, SEL_ROLE_ADD, SEL_ROLE_GET, SEL_ROLE_LIST, SEL_ROLE_DELETE,
	SEL_ROLE_GRANT, SEL_ROLE_REVOKE, SEL_COUNT
};

/* storage_apply_fuzz.c ops. */
enum {
	OP_PUT, OP_DELETE, OP_TXN, OP_RANGE_BATCH, OP_RANGE_READ, OP_TXN_READ, OP_COMPACT,
	OP_COMPACT_REL, OP_EVENTS, OP_COMMIT, OP_ABORT, OP_BATCH_EVENTS, OP_FILL, OP_HOLD,
	OP_RAW_PUT, OP_RAW_RANGE
};

static const char *api_dir, *st_dir;

typedef struct buf {
	uint8_t *p;
	size_t n, cap;
} buf;

static void buf_add(buf *b, const void *p, size_t n)
{
	if (b->n + n > b->cap) {
		b->cap = (b->n + n) * 2 + 64;
		b->p = realloc(b->p, b->cap);
		if (!b->p)
			abort();
	}
	memcpy(b->p + b->n, p, n);
	b->n += n;
}

static void buf_varint(buf *b, uint64_t v)
{
	uint8_t t[10];
	size_t n = 0;
	do {
		t[n] = v & 0x7f;
		v >>= 7;
		if (v)
			t[n] |= 0x80;
		n++;
	} while (v);
	buf_add(b, t, n);
}

static void buf_msg(buf *b, const void *m)
{
	size_t n = protobuf_c_message_get_packed_size(m);
	uint8_t *t = malloc(n + 1);
	protobuf_c_message_pack(m, t);
	buf_add(b, t, n);
	free(t);
}

static void write_file(const char *dir, const char *name, const buf *b)
{
	char path[1024];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	FILE *f = fopen(path, "wb");
	if (!f || fwrite(b->p, 1, b->n, f) != b->n || fclose(f) != 0) {
		perror(path);
		exit(1);
	}
}

/* api_decode: selector + encoded message. */
static void api_seed(const char *name, int sel, const void *m)
{
	buf b = {0};
	uint8_t s = (uint8_t)sel;
	buf_add(&b, &s, 1);
	if (m)
		buf_msg(&b, m);
	write_file(api_dir, name, &b);
	free(b.p);
}

static void api_raw(const char *name, int sel, const void *p, size_t n)
{
	buf b = {0};
	uint8_t s = (uint8_t)sel;
	buf_add(&b, &s, 1);
	buf_add(&b, p, n);
	write_file(api_dir, name, &b);
	free(b.p);
}

/* storage_apply: records. */
static void rec_msg(buf *b, int op, const void *m)
{
	uint8_t o = (uint8_t)op;
	buf_add(b, &o, 1);
	buf_varint(b, m ? protobuf_c_message_get_packed_size(m) : 0);
	if (m)
		buf_msg(b, m);
}

static void rec_raw(buf *b, int op, const void *p, size_t n)
{
	uint8_t o = (uint8_t)op;
	buf_add(b, &o, 1);
	buf_varint(b, n);
	buf_add(b, p, n);
}

static ProtobufCBinaryData bin(const char *s)
{
	ProtobufCBinaryData d = {strlen(s), (uint8_t *)s};
	return d;
}

static ProtobufCBinaryData binn(const void *p, size_t n)
{
	ProtobufCBinaryData d = {n, (uint8_t *)p};
	return d;
}

/* ---- request builders (static storage: valid until the next call of the same builder) ---- */

static Etcdserverpb__PutRequest put(const char *k, const char *v)
{
	Etcdserverpb__PutRequest r = ETCDSERVERPB__PUT_REQUEST__INIT;
	r.key = bin(k);
	r.value = bin(v);
	return r;
}

static Etcdserverpb__RangeRequest range(const char *k, const char *end)
{
	Etcdserverpb__RangeRequest r = ETCDSERVERPB__RANGE_REQUEST__INIT;
	r.key = bin(k);
	if (end)
		r.range_end = end[0] ? bin(end) : binn("", 1);
	return r;
}

static Etcdserverpb__DeleteRangeRequest del(const char *k, const char *end)
{
	Etcdserverpb__DeleteRangeRequest r = ETCDSERVERPB__DELETE_RANGE_REQUEST__INIT;
	r.key = bin(k);
	if (end)
		r.range_end = end[0] ? bin(end) : binn("", 1);
	return r;
}

static Etcdserverpb__CompactionRequest compact(int64_t rev)
{
	Etcdserverpb__CompactionRequest r = ETCDSERVERPB__COMPACTION_REQUEST__INIT;
	r.revision = rev;
	return r;
}

static Etcdserverpb__WatchCreateRequest watch_from(int64_t rev, int64_t max)
{
	Etcdserverpb__WatchCreateRequest r = ETCDSERVERPB__WATCH_CREATE_REQUEST__INIT;
	r.key = bin("a");
	r.start_revision = rev;
	r.watch_id = max;
	return r;
}

/* A txn: if compare then put k=v / range k else delete k. */
typedef struct txn_parts {
	Etcdserverpb__Compare cmp;
	Etcdserverpb__Compare *cmps[1];
	Etcdserverpb__PutRequest p;
	Etcdserverpb__RangeRequest rg;
	Etcdserverpb__DeleteRangeRequest d;
	Etcdserverpb__RequestOp ops[3];
	Etcdserverpb__RequestOp *succ[2], *fail[1];
	Etcdserverpb__TxnRequest t;
} txn_parts;

static void txn_cas(txn_parts *x, const char *k, int target, int result, int64_t want,
		    const char *v)
{
	Etcdserverpb__Compare c = ETCDSERVERPB__COMPARE__INIT;
	c.key = bin(k);
	c.target = target;
	c.result = result;
	switch (target) {
	case ETCDSERVERPB__COMPARE__COMPARE_TARGET__VERSION:
		c.target_union_case = ETCDSERVERPB__COMPARE__TARGET_UNION_VERSION;
		c.version = want;
		break;
	case ETCDSERVERPB__COMPARE__COMPARE_TARGET__CREATE:
		c.target_union_case = ETCDSERVERPB__COMPARE__TARGET_UNION_CREATE_REVISION;
		c.create_revision = want;
		break;
	case ETCDSERVERPB__COMPARE__COMPARE_TARGET__MOD:
		c.target_union_case = ETCDSERVERPB__COMPARE__TARGET_UNION_MOD_REVISION;
		c.mod_revision = want;
		break;
	case ETCDSERVERPB__COMPARE__COMPARE_TARGET__VALUE:
		c.target_union_case = ETCDSERVERPB__COMPARE__TARGET_UNION_VALUE;
		c.value = bin(v);
		break;
	default:
		c.target_union_case = ETCDSERVERPB__COMPARE__TARGET_UNION_LEASE;
		c.lease = want;
		break;
	}
	x->cmp = c;
	x->cmps[0] = &x->cmp;
	x->p = put(k, v);
	x->p.prev_kv = 1;
	x->rg = range(k, NULL);
	x->d = del(k, NULL);
	x->d.prev_kv = 1;
	Etcdserverpb__RequestOp init = ETCDSERVERPB__REQUEST_OP__INIT;
	for (int i = 0; i < 3; i++)
		x->ops[i] = init;
	x->ops[0].request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT;
	x->ops[0].request_put = &x->p;
	x->ops[1].request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_RANGE;
	x->ops[1].request_range = &x->rg;
	x->ops[2].request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_DELETE_RANGE;
	x->ops[2].request_delete_range = &x->d;
	x->succ[0] = &x->ops[0];
	x->succ[1] = &x->ops[1];
	x->fail[0] = &x->ops[2];
	Etcdserverpb__TxnRequest t = ETCDSERVERPB__TXN_REQUEST__INIT;
	t.n_compare = 1;
	t.compare = x->cmps;
	t.n_success = 2;
	t.success = x->succ;
	t.n_failure = 1;
	t.failure = x->fail;
	x->t = t;
}

/* A chain of depth nested txns (each success branch holds the next), innermost puts key. */
typedef struct nest {
	Etcdserverpb__TxnRequest *t;
	Etcdserverpb__RequestOp *op;
	Etcdserverpb__RequestOp **opp;
	Etcdserverpb__PutRequest p;
	Etcdserverpb__RequestOp pop;
	Etcdserverpb__RequestOp *popp[1];
	int n;
} nest;

static Etcdserverpb__TxnRequest *txn_nested(nest *x, int depth, const char *key)
{
	x->n = depth + 1;
	x->t = calloc(x->n, sizeof(*x->t));
	x->op = calloc(x->n, sizeof(*x->op));
	x->opp = calloc(x->n, sizeof(*x->opp));
	Etcdserverpb__TxnRequest tinit = ETCDSERVERPB__TXN_REQUEST__INIT;
	Etcdserverpb__RequestOp oinit = ETCDSERVERPB__REQUEST_OP__INIT;
	x->p = put(key, "deep");
	x->pop = oinit;
	x->pop.request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT;
	x->pop.request_put = &x->p;
	x->popp[0] = &x->pop;
	for (int i = depth; i >= 0; i--) {
		x->t[i] = tinit;
		if (i == depth) {
			x->t[i].n_success = 1;
			x->t[i].success = x->popp;
		} else {
			x->op[i] = oinit;
			x->op[i].request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_TXN;
			x->op[i].request_txn = &x->t[i + 1];
			x->opp[i] = &x->op[i];
			x->t[i].n_success = 1;
			x->t[i].success = &x->opp[i];
		}
	}
	return &x->t[0];
}

static void nest_free(nest *x)
{
	free(x->t);
	free(x->op);
	free(x->opp);
}

/* ---- api_decode seeds ---- */

static void gen_api(void)
{
	char name[64];
	/* An empty body for every message. */
	for (int s = 0; s < SEL_COUNT; s++) {
		snprintf(name, sizeof(name), "empty-%02d", s);
		api_raw(name, s, "", 0);
	}

	Etcdserverpb__RangeRequest rg = range("foo", NULL);
	api_seed("range-key", SEL_RANGE, &rg);
	rg = range("foo", "fop");
	rg.limit = 10;
	rg.revision = 5;
	rg.sort_order = ETCDSERVERPB__RANGE_REQUEST__SORT_ORDER__DESCEND;
	rg.sort_target = ETCDSERVERPB__RANGE_REQUEST__SORT_TARGET__MOD;
	rg.serializable = 1;
	rg.keys_only = 1;
	rg.min_mod_revision = 2;
	rg.max_mod_revision = 9;
	rg.min_create_revision = 1;
	rg.max_create_revision = 8;
	api_seed("range-all-fields", SEL_RANGE, &rg);
	rg = range("\0", "");
	rg.key = binn("", 1);
	rg.count_only = 1;
	api_seed("range-everything-count", SEL_RANGE, &rg);

	Etcdserverpb__PutRequest p = put("foo", "bar");
	api_seed("put", SEL_PUT, &p);
	p.lease = 0x694d7c8f1a2b3c4d;
	p.prev_kv = 1;
	api_seed("put-lease-prev", SEL_PUT, &p);
	p = put("foo", "");
	p.ignore_value = 1;
	p.ignore_lease = 1;
	api_seed("put-ignore", SEL_PUT, &p);
	char big[1200];
	memset(big, 'k', sizeof(big) - 1);
	big[sizeof(big) - 1] = 0;
	p = put(big, "long key");
	api_seed("put-long-key", SEL_PUT, &p);

	Etcdserverpb__DeleteRangeRequest d = del("foo", "");
	d.prev_kv = 1;
	api_seed("delete-from", SEL_DELETE, &d);
	d = del("a", "b");
	api_seed("delete-range", SEL_DELETE, &d);

	static const int targets[] = {
		ETCDSERVERPB__COMPARE__COMPARE_TARGET__VERSION, ETCDSERVERPB__COMPARE__COMPARE_TARGET__CREATE,
		ETCDSERVERPB__COMPARE__COMPARE_TARGET__MOD, ETCDSERVERPB__COMPARE__COMPARE_TARGET__VALUE,
		ETCDSERVERPB__COMPARE__COMPARE_TARGET__LEASE,
	};
	for (int i = 0; i < 5; i++) {
		txn_parts x;
		txn_cas(&x, "k", targets[i], i % 4, i + 1, "v");
		snprintf(name, sizeof(name), "txn-cas-%d", i);
		api_seed(name, SEL_TXN, &x.t);
	}
	txn_parts x;
	txn_cas(&x, "k", ETCDSERVERPB__COMPARE__COMPARE_TARGET__VALUE, 0, 0, "v");
	x.cmp.range_end = bin("z");
	api_seed("txn-cmp-range", SEL_TXN, &x.t);
	/* Put and delete of the same key on one side: etcd refuses it (duplicate key). */
	x.succ[1] = &x.ops[2];
	api_seed("txn-duplicate", SEL_TXN, &x.t);
	nest n;
	api_seed("txn-nested-3", SEL_TXN, txn_nested(&n, 3, "n"));
	nest_free(&n);
	api_seed("txn-depth-100", SEL_TXN, txn_nested(&n, 100, "n")); /* the guard's limit */
	nest_free(&n);
	api_seed("txn-depth-101", SEL_TXN, txn_nested(&n, 101, "n")); /* refused */
	nest_free(&n);

	Etcdserverpb__CompactionRequest c = compact(42);
	c.physical = 1;
	api_seed("compact", SEL_COMPACT, &c);

	Etcdserverpb__WatchCreateRequest wc = watch_from(7, 3);
	wc.range_end = bin("b");
	wc.progress_notify = 1;
	wc.prev_kv = 1;
	wc.fragment = 1;
	Etcdserverpb__WatchCreateRequest__FilterType filters[2] = {
		ETCDSERVERPB__WATCH_CREATE_REQUEST__FILTER_TYPE__NOPUT,
		ETCDSERVERPB__WATCH_CREATE_REQUEST__FILTER_TYPE__NODELETE};
	wc.n_filters = 2;
	wc.filters = filters;
	Etcdserverpb__WatchRequest w = ETCDSERVERPB__WATCH_REQUEST__INIT;
	w.request_union_case = ETCDSERVERPB__WATCH_REQUEST__REQUEST_UNION_CREATE_REQUEST;
	w.create_request = &wc;
	api_seed("watch-create", SEL_WATCH, &w);
	Etcdserverpb__WatchCancelRequest wx = ETCDSERVERPB__WATCH_CANCEL_REQUEST__INIT;
	wx.watch_id = 3;
	w.request_union_case = ETCDSERVERPB__WATCH_REQUEST__REQUEST_UNION_CANCEL_REQUEST;
	w.cancel_request = &wx;
	api_seed("watch-cancel", SEL_WATCH, &w);
	Etcdserverpb__WatchProgressRequest wp = ETCDSERVERPB__WATCH_PROGRESS_REQUEST__INIT;
	w.request_union_case = ETCDSERVERPB__WATCH_REQUEST__REQUEST_UNION_PROGRESS_REQUEST;
	w.progress_request = &wp;
	api_seed("watch-progress", SEL_WATCH, &w);

	Etcdserverpb__LeaseGrantRequest lg = ETCDSERVERPB__LEASE_GRANT_REQUEST__INIT;
	lg.ttl = 60;
	lg.id = 1234;
	api_seed("lease-grant", SEL_LEASE_GRANT, &lg);
	Etcdserverpb__LeaseKeepAliveRequest lk = ETCDSERVERPB__LEASE_KEEP_ALIVE_REQUEST__INIT;
	lk.id = -1;
	api_seed("lease-keepalive-neg", SEL_LEASE_KEEPALIVE, &lk);
	Etcdserverpb__LeaseRevokeRequest lr = ETCDSERVERPB__LEASE_REVOKE_REQUEST__INIT;
	lr.id = 1234;
	api_seed("lease-revoke", SEL_LEASE_REVOKE, &lr);
	Etcdserverpb__LeaseTimeToLiveRequest lt = ETCDSERVERPB__LEASE_TIME_TO_LIVE_REQUEST__INIT;
	lt.id = 1234;
	lt.keys = 1;
	api_seed("lease-ttl", SEL_LEASE_TTL, &lt);

	Etcdserverpb__AuthenticateRequest au = ETCDSERVERPB__AUTHENTICATE_REQUEST__INIT;
	au.name = "root";
	au.password = "s3cr3t";
	api_seed("authenticate", SEL_AUTHENTICATE, &au);
	Authpb__UserAddOptions uo = AUTHPB__USER_ADD_OPTIONS__INIT;
	uo.no_password = 1;
	Etcdserverpb__AuthUserAddRequest ua = ETCDSERVERPB__AUTH_USER_ADD_REQUEST__INIT;
	ua.name = "alice";
	ua.options = &uo;
	ua.hashedpassword = "$2a$10$abcdefghijklmnopqrstuv";
	api_seed("user-add", SEL_USER_ADD, &ua);
	Etcdserverpb__AuthUserGrantRoleRequest ug = ETCDSERVERPB__AUTH_USER_GRANT_ROLE_REQUEST__INIT;
	ug.user = "alice";
	ug.role = "reader";
	api_seed("user-grant", SEL_USER_GRANT, &ug);
	Authpb__Permission perm = AUTHPB__PERMISSION__INIT;
	perm.permtype = AUTHPB__PERMISSION__TYPE__READWRITE;
	perm.key = bin("/registry/");
	perm.range_end = bin("/registry0");
	Etcdserverpb__AuthRoleGrantPermissionRequest rgp =
		ETCDSERVERPB__AUTH_ROLE_GRANT_PERMISSION_REQUEST__INIT;
	rgp.name = "reader";
	rgp.perm = &perm;
	api_seed("role-grant", SEL_ROLE_GRANT, &rgp);
	Etcdserverpb__AuthRoleRevokePermissionRequest rrp =
		ETCDSERVERPB__AUTH_ROLE_REVOKE_PERMISSION_REQUEST__INIT;
	rrp.role = "reader";
	rrp.key = bin("/registry/");
	rrp.range_end = bin("/registry0");
	api_seed("role-revoke", SEL_ROLE_REVOKE, &rrp);

	char *urls[] = {"http://127.0.0.1:2380", "http://10.0.0.2:2380"};
	Etcdserverpb__MemberAddRequest ma = ETCDSERVERPB__MEMBER_ADD_REQUEST__INIT;
	ma.n_peerurls = 2;
	ma.peerurls = urls;
	ma.islearner = 1;
	api_seed("member-add", SEL_MEMBER_ADD, &ma);
	Etcdserverpb__MemberUpdateRequest mu = ETCDSERVERPB__MEMBER_UPDATE_REQUEST__INIT;
	mu.id = 0x8e9e05c52164694dULL;
	mu.n_peerurls = 1;
	mu.peerurls = urls;
	api_seed("member-update", SEL_MEMBER_UPDATE, &mu);
	Etcdserverpb__MemberListRequest ml = ETCDSERVERPB__MEMBER_LIST_REQUEST__INIT;
	ml.linearizable = 1;
	api_seed("member-list", SEL_MEMBER_LIST, &ml);

	Etcdserverpb__AlarmRequest al = ETCDSERVERPB__ALARM_REQUEST__INIT;
	al.action = ETCDSERVERPB__ALARM_REQUEST__ALARM_ACTION__DEACTIVATE;
	al.memberid = 1;
	al.alarm = ETCDSERVERPB__ALARM_TYPE__NOSPACE;
	api_seed("alarm", SEL_ALARM, &al);
	Etcdserverpb__HashKVRequest hk = ETCDSERVERPB__HASH_KVREQUEST__INIT;
	hk.revision = 17;
	api_seed("hashkv", SEL_HASHKV, &hk);
	Etcdserverpb__MoveLeaderRequest mv = ETCDSERVERPB__MOVE_LEADER_REQUEST__INIT;
	mv.targetid = 42;
	api_seed("move-leader", SEL_MOVE_LEADER, &mv);
	Etcdserverpb__DowngradeRequest dg = ETCDSERVERPB__DOWNGRADE_REQUEST__INIT;
	dg.action = ETCDSERVERPB__DOWNGRADE_REQUEST__DOWNGRADE_ACTION__ENABLE;
	dg.version = "3.4.0";
	api_seed("downgrade", SEL_DOWNGRADE, &dg);

	/* Wire oddities: unknown fields of every wire type, a repeated non-repeated field,
	 * an overlong tag, a packed-looking repeated enum. */
	static const uint8_t unknown[] = {0x0a, 0x01, 'k', 0x12, 0x01, 'v', 0xf8, 0x07, 0x01,
					  0xf9, 0x07, 1, 2, 3, 4, 5, 6, 7, 8, 0xfd, 0x07, 1, 2, 3, 4,
					  0xfa, 0x07, 0x02, 'x', 'y'};
	api_raw("put-unknown-fields", SEL_PUT, unknown, sizeof(unknown));
	static const uint8_t twice[] = {0x0a, 0x01, 'a', 0x0a, 0x01, 'b', 0x18, 0x05, 0x18, 0x00};
	api_raw("range-field-twice", SEL_RANGE, twice, sizeof(twice));
	static const uint8_t overlong[] = {0x8a, 0x80, 0x80, 0x00, 0x01, 'k'};
	api_raw("put-overlong-tag", SEL_PUT, overlong, sizeof(overlong));
	static const uint8_t filters_packed[] = {0x0a, 0x06, 0x0a, 0x01, 'a', 0x2a, 0x01, 0x01};
	api_raw("watch-packed-filters", SEL_WATCH, filters_packed, sizeof(filters_packed));
}

/* ---- storage_apply seeds ---- */

static void st_seed(const char *name, buf *b)
{
	write_file(st_dir, name, b);
	free(b->p);
	memset(b, 0, sizeof(*b));
}

static void gen_storage(void)
{
	buf b = {0};
	Etcdserverpb__PutRequest p;
	Etcdserverpb__RangeRequest rg;
	Etcdserverpb__DeleteRangeRequest d;
	Etcdserverpb__CompactionRequest c;
	Etcdserverpb__WatchCreateRequest w;

	/* Basic puts, a range over all keys, commit, read back. */
	p = put("a", "1");
	rec_msg(&b, OP_PUT, &p);
	p = put("b", "2");
	rec_msg(&b, OP_PUT, &p);
	rg = range("a", "");
	rec_msg(&b, OP_RANGE_BATCH, &rg);
	rec_msg(&b, OP_COMMIT, NULL);
	rec_msg(&b, OP_RANGE_READ, &rg);
	st_seed("put-range", &b);

	/* Versions, delete, an old revision, compaction, history replay. */
	for (int i = 0; i < 4; i++) {
		p = put("k", i % 2 ? "odd" : "even");
		p.prev_kv = 1;
		rec_msg(&b, OP_PUT, &p);
	}
	d = del("k", NULL);
	d.prev_kv = 1;
	rec_msg(&b, OP_DELETE, &d);
	p = put("k", "again");
	rec_msg(&b, OP_PUT, &p);
	rec_msg(&b, OP_COMMIT, NULL);
	rg = range("k", NULL);
	rg.revision = 3;
	rec_msg(&b, OP_RANGE_READ, &rg);
	w = watch_from(1, 0);
	rec_msg(&b, OP_EVENTS, &w);
	c = compact(3);
	rec_msg(&b, OP_COMPACT_REL, &c);
	rec_msg(&b, OP_COMMIT, NULL);
	w = watch_from(2, 2);
	rec_msg(&b, OP_EVENTS, &w);
	rec_msg(&b, OP_RANGE_READ, &rg);
	st_seed("history-compact", &b);

	/* Compare-and-swap txns of every target, then read-only txns through a reader. */
	static const int targets[] = {
		ETCDSERVERPB__COMPARE__COMPARE_TARGET__VERSION, ETCDSERVERPB__COMPARE__COMPARE_TARGET__CREATE,
		ETCDSERVERPB__COMPARE__COMPARE_TARGET__MOD, ETCDSERVERPB__COMPARE__COMPARE_TARGET__VALUE,
		ETCDSERVERPB__COMPARE__COMPARE_TARGET__LEASE,
	};
	for (int i = 0; i < 5; i++) {
		txn_parts x;
		p = put("cas", "0");
		rec_msg(&b, OP_PUT, &p);
		txn_cas(&x, "cas", targets[i], ETCDSERVERPB__COMPARE__COMPARE_RESULT__EQUAL, i ? 2 : 1, "0");
		rec_msg(&b, OP_TXN, &x.t);
		txn_cas(&x, "cas", targets[i], ETCDSERVERPB__COMPARE__COMPARE_RESULT__GREATER, 0, "");
		rec_msg(&b, OP_TXN, &x.t);
		rec_msg(&b, OP_COMMIT, NULL);
		Etcdserverpb__RequestOp *ro[1] = {&x.ops[1]};
		x.t.n_success = 1;
		x.t.success = ro;
		x.t.n_failure = 0;
		rec_msg(&b, OP_TXN_READ, &x.t);
		char name[32];
		snprintf(name, sizeof(name), "txn-cas-%d", i);
		st_seed(name, &b);
	}

	/* Nested txns, up to the guard's depth. */
	nest n;
	rec_msg(&b, OP_TXN, txn_nested(&n, 2, "n2"));
	nest_free(&n);
	rec_msg(&b, OP_TXN, txn_nested(&n, 100, "n100"));
	nest_free(&n);
	rg = range("n", "o");
	rec_msg(&b, OP_RANGE_BATCH, &rg);
	st_seed("txn-nested", &b);

	/* Long keys around LMDB's 511-byte limit and the 400-byte bucket prefix. */
	static const size_t lens[] = {399, 400, 401, 450, 511, 512, 600, 1000, 1000};
	char kb[1100];
	for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
		memset(kb, 'L', lens[i]);
		kb[lens[i]] = 0;
		if (i == 8)
			kb[999] = 'M'; /* same 400-byte bucket as the one before */
		p = put(kb, "long");
		rec_msg(&b, OP_PUT, &p);
	}
	rec_msg(&b, OP_COMMIT, NULL);
	rg = range("L", "M");
	rg.sort_order = ETCDSERVERPB__RANGE_REQUEST__SORT_ORDER__DESCEND;
	rec_msg(&b, OP_RANGE_READ, &rg);
	memset(kb, 'L', 450);
	kb[450] = 0;
	d = del(kb, "");
	d.prev_kv = 1;
	rec_msg(&b, OP_DELETE, &d);
	rec_msg(&b, OP_COMMIT, NULL);
	c = compact(0);
	rec_msg(&b, OP_COMPACT_REL, &c);
	rg = range("L", "M");
	rec_msg(&b, OP_RANGE_BATCH, &rg);
	st_seed("long-keys", &b);

	/* Prefix deletes and ranges with every option. */
	const char *keys[] = {"/registry/pods/a", "/registry/pods/b", "/registry/pods/c",
			      "/registry/svc/x", "/registry0", "\xff\xfe", "\x01"};
	for (int i = 0; i < 7; i++) {
		p = put(keys[i], keys[(i + 3) % 7]);
		rec_msg(&b, OP_PUT, &p);
	}
	static const int orders[] = {0, 1, 2};
	for (int t = 0; t < 5; t++) {
		rg = range("/registry/", "/registry0");
		rg.sort_target = t;
		rg.sort_order = orders[t % 3];
		rg.limit = t;
		rg.keys_only = t & 1;
		rg.count_only = t == 4;
		rec_msg(&b, OP_RANGE_BATCH, &rg);
	}
	rg = range("/registry/", "/registry0");
	rg.min_mod_revision = 3;
	rg.max_create_revision = 5;
	rec_msg(&b, OP_RANGE_BATCH, &rg);
	d = del("/registry/pods/", "/registry/pods0");
	d.prev_kv = 1;
	rec_msg(&b, OP_DELETE, &d);
	d = del("\x01", "");
	rec_msg(&b, OP_DELETE, &d);
	rec_msg(&b, OP_BATCH_EVENTS, NULL);
	rec_raw(&b, OP_RAW_RANGE, "\x05/regi\x00", 7);
	st_seed("prefix-options", &b);

	/* ignore_value / ignore_lease on present and missing keys; a lease nobody granted. */
	p = put("iv", "x");
	rec_msg(&b, OP_PUT, &p);
	p = put("iv", "");
	p.ignore_value = 1;
	rec_msg(&b, OP_PUT, &p);
	p = put("missing", "");
	p.ignore_lease = 1;
	rec_msg(&b, OP_PUT, &p);
	p = put("leased", "v");
	p.lease = 7;
	rec_msg(&b, OP_PUT, &p);
	st_seed("ignore-lease", &b);

	/* A held reader sees the old revision while the writer moves on and compacts. */
	p = put("h", "1");
	rec_msg(&b, OP_PUT, &p);
	rec_msg(&b, OP_COMMIT, NULL);
	rec_msg(&b, OP_HOLD, NULL);
	p = put("h", "2");
	rec_msg(&b, OP_PUT, &p);
	rec_msg(&b, OP_COMMIT, NULL);
	c = compact(0);
	rec_msg(&b, OP_COMPACT_REL, &c);
	rec_msg(&b, OP_COMMIT, NULL);
	rg = range("h", NULL);
	rec_msg(&b, OP_RANGE_READ, &rg);
	w = watch_from(1, 1);
	rec_msg(&b, OP_EVENTS, &w);
	rec_msg(&b, OP_HOLD, NULL);
	st_seed("held-reader", &b);

	/* Compaction errors: twice at one revision, in the future, continue in steps. */
	for (int i = 0; i < 6; i++) {
		p = put(i % 2 ? "c1" : "c2", "v");
		rec_msg(&b, OP_PUT, &p);
	}
	c = compact(0);
	rec_msg(&b, OP_COMPACT, &c);
	c = compact(4);
	rec_msg(&b, OP_COMPACT, &c);
	rec_msg(&b, OP_COMPACT, &c);
	c = compact(1000);
	rec_msg(&b, OP_COMPACT, &c);
	rec_raw(&b, OP_BATCH_EVENTS, "\x01", 1);
	rec_raw(&b, OP_BATCH_EVENTS, "\x01", 1);
	rec_msg(&b, OP_ABORT, NULL);
	st_seed("compact-errors", &b);

	/* Fill the 4 MiB map (storage_apply_fuzz's default): NOSPACE inside a batch, which
	 * stays usable; then a store left nearly full by a committed fill. */
	rec_raw(&b, OP_FILL, "\x08\x0f", 2); /* 8 x 1 MiB */
	p = put("after", "nospace");
	rec_msg(&b, OP_PUT, &p);
	rec_msg(&b, OP_ABORT, NULL);
	st_seed("fill-nospace", &b);
	rec_raw(&b, OP_FILL, "\x03\x0f", 2); /* 3 MiB */
	rec_msg(&b, OP_COMMIT, NULL);
	for (int i = 0; i < 4; i++) {
		p = put("full", "x");
		rec_msg(&b, OP_PUT, &p);
	}
	c = compact(0);
	rec_msg(&b, OP_COMPACT_REL, &c);
	rec_raw(&b, OP_BATCH_EVENTS, "\xff", 1);
	rec_msg(&b, OP_COMMIT, NULL);
	st_seed("fill-full-commit", &b);
	rec_raw(&b, OP_FILL, "\x03\x03", 2); /* 3 x 256 KiB */
	rec_msg(&b, OP_COMMIT, NULL);
	d = del("fill/", "fill0");
	rec_msg(&b, OP_DELETE, &d);
	c = compact(0);
	rec_msg(&b, OP_COMPACT_REL, &c);
	st_seed("fill-small", &b);

	/* Raw keys with odd bytes. */
	rec_raw(&b, OP_RAW_PUT, "\x00", 1);
	rec_raw(&b, OP_RAW_PUT, "\x00\x00", 2);
	rec_raw(&b, OP_RAW_PUT, "\xff", 1);
	rec_raw(&b, OP_RAW_RANGE, "\x00\x00\x00", 3);
	d = del("\0", "");
	d.key = binn("", 1);
	rec_msg(&b, OP_DELETE, &d);
	st_seed("raw-bytes", &b);
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s <api_decode dir> <storage_apply dir>\n", argv[0]);
		return 2;
	}
	api_dir = argv[1];
	st_dir = argv[2];
	gen_api();
	gen_storage();
	return 0;
}
