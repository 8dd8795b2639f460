/*
 * kv.c - etcd's KV service. Requests are validated as etcd's v3rpc layer does, reads are
 * served on the calling gRPC thread from an LMDB read transaction, and writes go to the
 * node loop, which group-commits them.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/server.h"

static size_t varint_len(uint64_t v)
{
	size_t n = 1;
	for (; v >= 0x80; v >>= 7)
		n++;
	return n;
}

/*
 * Encoded size of InternalRaftRequest{header{ID}, <op>} around a request of n bytes: etcd
 * checks the whole proposal against --max-request-bytes, not the bare request. The op is a
 * field of number < 16 (1-byte tag) and the header field 100 (2-byte tag). etcd's request
 * ID (idutil) puts the low 16 bits of the member id above a 48-bit timestamp and counter,
 * so its varint takes 9 or 10 bytes as that id's bit 15 is clear or set: etcd's limit
 * moves by a byte from member to member, and ours with it (Keelson's member ids are
 * etcd's). Not counted: the user name and auth revision etcd adds with auth enabled.
 */
static size_t raft_request_overhead(server_ctx *sc, size_t n)
{
	uint64_t id = (sc->mi.member_id & 0xffff) << 48 | 1ull << 47;
	size_t header = 1 + varint_len(id); /* RequestHeader{ID} */
	return 2 + varint_len(header) + header + 1 + varint_len(n);
}

static api_error storage_to_api(int err)
{
	switch (err) {
	case STORAGE_ERR_COMPACTED:
		return API_ERR_COMPACTED;
	case STORAGE_ERR_FUTURE_REV:
		return API_ERR_FUTURE_REV;
	case STORAGE_ERR_NOSPACE:
		return API_ERR_NO_SPACE;
	case STORAGE_ERR_KEY_NOT_FOUND:
		return API_ERR_KEY_NOT_FOUND;
	case STORAGE_ERR_LEASE_NOT_FOUND:
		return API_ERR_LEASE_NOT_FOUND;
	case STORAGE_ERR_LEASE_EXISTS:
		return API_ERR_LEASE_EXIST;
	case ALARM_ERR_CORRUPT:
		return API_ERR_CORRUPT;
	default:
		return API_ERR_INTERNAL;
	}
}


const char *call_token(api_call *call, size_t *len)
{
	return api_call_metadata(call, "token", len);
}


int learner_refuses(server_ctx *sc, api_call *call)
{
	if (!node_is_learner(sc->nd))
		return 0;
	api_call_fail_msg(call, 9 /* FAILED_PRECONDITION */, "etcdserver: rpc not supported for learner");
	return 1;
}

/* Auth checks of KV requests, the token read once: whether the request may go on. */
static int range_permitted(server_ctx *sc, api_call *call, int write, const ProtobufCBinaryData *key,
			   const ProtobufCBinaryData *end)
{
	size_t len = 0;
	const char *tok = call_token(call, &len);
	return permitted(sc, call, auth_check_range(sc->auth, tok, len, write, key, end));
}

static int txn_permitted(server_ctx *sc, api_call *call, const Etcdserverpb__TxnRequest *req)
{
	size_t len = 0;
	const char *tok = call_token(call, &len);
	return permitted(sc, call, auth_check_txn(sc->auth, tok, len, req));
}

int call_admitted(server_ctx *sc, api_call *call, int learner_ok, int admin)
{
	if (!learner_ok && learner_refuses(sc, call))
		return 0;
	size_t toklen = 0;
	const char *tok = call_token(call, &toklen);
	return permitted(sc, call, admin ? auth_check_admin(sc->auth, tok, toklen)
					 : auth_check_user(sc->auth, tok, toklen));
}

int auth_error_raw(int auth_err, char *msg, size_t len)
{
	const char *m;
	if (auth_error_status(auth_err, &m) < 0)
		m = "etcdserver: internal error";
	snprintf(msg, len, "auth: %s", strncmp(m, "etcdserver: ", 12) == 0 ? m + 12 : m);
	return 2; /* UNKNOWN */
}

int maint_admitted(server_ctx *sc, api_call *call)
{
	size_t toklen = 0;
	const char *tok = call_token(call, &toklen);
	int err = auth_check_admin(sc->auth, tok, toklen);
	if (err == 0)
		return 1;
	char msg[128];
	api_call_fail_msg(call, auth_error_raw(err, msg, sizeof(msg)), msg);
	return 0;
}

/* Ends call with the auth error if there is one; whether the request may go on. */
int permitted(server_ctx *sc, api_call *call, int auth_err)
{
	if (auth_err == 0)
		return 1;
	server_fail_storage(call, auth_err);
	return 0;
}

int server_storage_status(int err, const char **msg)
{
	int code = auth_error_status(err, msg);
	if (code >= 0)
		return code;
	api_error e = storage_to_api(err);
	if (e == API_ERR_INTERNAL) {
		log_at(LOG_ERROR, "storage error", "error", storage_strerror(err), NULL);
		*msg = storage_strerror(err);
		return 2; /* UNKNOWN */
	}
	return api_error_status(e, msg);
}

/* Fails call with the storage error, logging errors that are not the client's doing. */
void server_fail_storage(api_call *call, int err)
{
	const char *msg;
	int code = server_storage_status(err, &msg);
	api_call_fail_msg(call, code, msg);
}

static int check_put(const Etcdserverpb__PutRequest *r)
{
	if (r->key.len == 0)
		return API_ERR_EMPTY_KEY + 1;
	if (r->ignore_value && r->value.len != 0)
		return API_ERR_VALUE_PROVIDED + 1;
	if (r->ignore_lease && r->lease != 0)
		return API_ERR_LEASE_PROVIDED + 1;
	return 0;
}

/*
 * etcd's checks of a Range. A sort target the proto does not name is refused with etcd's
 * "invalid sort option" (v3rpc checkRangeRequest, v3.5 on): etcd 3.4 has no check, and its
 * apply then sorts with a nil sorter and the member crashes. An unknown sort order is let
 * through as etcd 3.4 does (it sorts nothing; storage does the same), where v3.5 refuses it.
 */
int kv_check_range(const Etcdserverpb__RangeRequest *r)
{
	if (r->key.len == 0)
		return API_ERR_EMPTY_KEY + 1;
	if ((unsigned)r->sort_target > ETCDSERVERPB__RANGE_REQUEST__SORT_TARGET__VALUE)
		return API_ERR_INVALID_SORT + 1;
	return 0;
}

static int check_request_op(const Etcdserverpb__RequestOp *op, size_t max_ops)
{
	switch (op->request_case) {
	case ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_RANGE:
		return kv_check_range(op->request_range);
	case ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT:
		return check_put(op->request_put);
	case ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_DELETE_RANGE:
		return op->request_delete_range->key.len == 0 ? API_ERR_EMPTY_KEY + 1 : 0;
	case ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_TXN:
		return kv_check_txn(op->request_txn, max_ops);
	default:
		/* An empty op: etcd answers "key not found". */
		return API_ERR_KEY_NOT_FOUND + 1;
	}
}

/* etcd v3rpc checkTxnRequest: op counts, then every op. max_ops shrinks with depth, as etcd's. */
static int check_txn_ops(const Etcdserverpb__TxnRequest *r, long max_ops)
{
	size_t opc = r->n_compare;
	if (opc < r->n_success)
		opc = r->n_success;
	if (opc < r->n_failure)
		opc = r->n_failure;
	if ((long)opc > max_ops)
		return API_ERR_TOO_MANY_OPS + 1;
	for (size_t i = 0; i < r->n_compare; i++)
		if (r->compare[i]->key.len == 0)
			return API_ERR_EMPTY_KEY + 1;
	for (size_t i = 0; i < r->n_success; i++) {
		int e = check_request_op(r->success[i], (size_t)(max_ops - (long)opc));
		if (e)
			return e;
	}
	for (size_t i = 0; i < r->n_failure; i++) {
		int e = check_request_op(r->failure[i], (size_t)(max_ops - (long)opc));
		if (e)
			return e;
	}
	return 0;
}

/* ---- checkIntervals: puts and deletes of one txn must not touch the same key ---- */

typedef struct bytes_ref {
	const uint8_t *p;
	size_t len;
} bytes_ref;

/* An interval [lo, hi) in etcd's "affine" string order, where an empty hi is +infinity;
 * a point is lo with is_point set. */
typedef struct interval {
	bytes_ref lo, hi;
	int is_point;
} interval;

typedef struct ivec {
	interval *v;
	size_t n, cap;
} ivec;

typedef struct kset {
	bytes_ref *v;
	size_t n, cap;
} kset;

static int bytes_cmp(bytes_ref a, bytes_ref b)
{
	size_t n = a.len < b.len ? a.len : b.len;
	int c = n ? memcmp(a.p, b.p, n) : 0;
	if (c)
		return c;
	return a.len < b.len ? -1 : a.len > b.len;
}

/* Affine compare: the empty string is greater than everything else. */
static int affine_cmp(bytes_ref a, bytes_ref b)
{
	if (a.len == 0)
		return b.len == 0 ? 0 : 1;
	if (b.len == 0)
		return -1;
	return bytes_cmp(a, b);
}

static int ivec_push(ivec *iv, interval x)
{
	if (iv->n == iv->cap) {
		size_t cap = iv->cap ? iv->cap * 2 : 8;
		interval *v = realloc(iv->v, cap * sizeof(*v));
		if (v == NULL)
			return -1;
		iv->v = v;
		iv->cap = cap;
	}
	iv->v[iv->n++] = x;
	return 0;
}

static int kset_has(const kset *s, bytes_ref k)
{
	for (size_t i = 0; i < s->n; i++)
		if (bytes_cmp(s->v[i], k) == 0)
			return 1;
	return 0;
}

static int kset_add(kset *s, bytes_ref k)
{
	if (s->n == s->cap) {
		size_t cap = s->cap ? s->cap * 2 : 8;
		bytes_ref *v = realloc(s->v, cap * sizeof(*v));
		if (v == NULL)
			return -1;
		s->v = v;
		s->cap = cap;
	}
	s->v[s->n++] = k;
	return 0;
}

/* Does any interval in dels contain point k?  A point interval [lo, lo+"\0") holds lo only. */
static int ivec_hits(const ivec *dels, bytes_ref k)
{
	for (size_t i = 0; i < dels->n; i++) {
		const interval *d = &dels->v[i];
		if (d->is_point) {
			if (bytes_cmp(d->lo, k) == 0)
				return 1;
		} else if (affine_cmp(d->lo, k) <= 0 && affine_cmp(k, d->hi) < 0) {
			return 1;
		}
	}
	return 0;
}

/* Returns 0, API_ERR_DUPLICATE_KEY + 1, or -1 when out of memory. */
static int check_intervals(Etcdserverpb__RequestOp **reqs, size_t n, kset *puts, ivec *dels)
{
	int rc = 0;
	for (size_t i = 0; i < n; i++) {
		if (reqs[i]->request_case != ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_DELETE_RANGE)
			continue;
		const Etcdserverpb__DeleteRangeRequest *d = reqs[i]->request_delete_range;
		interval x = {{d->key.data, d->key.len}, {d->range_end.data, d->range_end.len}, d->range_end.len == 0};
		if (ivec_push(dels, x))
			return -1;
	}
	for (size_t i = 0; i < n; i++) {
		if (reqs[i]->request_case != ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_TXN)
			continue;
		const Etcdserverpb__TxnRequest *t = reqs[i]->request_txn;
		kset puts_then = {0}, puts_else = {0};
		ivec dels_then = {0}, dels_else = {0};
		rc = check_intervals(t->success, t->n_success, &puts_then, &dels_then);
		if (rc == 0)
			rc = check_intervals(t->failure, t->n_failure, &puts_else, &dels_else);
		for (size_t k = 0; rc == 0 && k < puts_then.n; k++) {
			if (kset_has(puts, puts_then.v[k]) || ivec_hits(dels, puts_then.v[k]))
				rc = API_ERR_DUPLICATE_KEY + 1;
			else if (kset_add(puts, puts_then.v[k]))
				rc = -1;
		}
		for (size_t k = 0; rc == 0 && k < puts_else.n; k++) {
			/* then and else exclude each other, so a key in both is fine */
			if ((kset_has(puts, puts_else.v[k]) && !kset_has(&puts_then, puts_else.v[k])) ||
			    ivec_hits(dels, puts_else.v[k]))
				rc = API_ERR_DUPLICATE_KEY + 1;
			else if (kset_add(puts, puts_else.v[k]))
				rc = -1;
		}
		/* etcd unions the children's deletes that lie within ["\0", +inf). */
		bytes_ref zero = {(const uint8_t *)"\0", 1};
		for (int side = 0; rc == 0 && side < 2; side++) {
			ivec *src = side ? &dels_else : &dels_then;
			for (size_t k = 0; rc == 0 && k < src->n; k++)
				if (affine_cmp(zero, src->v[k].lo) <= 0 && ivec_push(dels, src->v[k]))
					rc = -1;
		}
		free(puts_then.v);
		free(puts_else.v);
		free(dels_then.v);
		free(dels_else.v);
		if (rc)
			return rc;
	}
	for (size_t i = 0; i < n; i++) {
		if (reqs[i]->request_case != ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT)
			continue;
		const Etcdserverpb__PutRequest *p = reqs[i]->request_put;
		bytes_ref k = {p->key.data, p->key.len};
		if (kset_has(puts, k) || ivec_hits(dels, k))
			return API_ERR_DUPLICATE_KEY + 1;
		if (kset_add(puts, k))
			return -1;
	}
	return 0;
}

int kv_check_txn(const Etcdserverpb__TxnRequest *r, size_t max_ops)
{
	int rc = check_txn_ops(r, (long)max_ops);
	if (rc)
		return rc;
	for (int side = 0; side < 2; side++) {
		kset puts = {0};
		ivec dels = {0};
		rc = side ? check_intervals(r->failure, r->n_failure, &puts, &dels)
			  : check_intervals(r->success, r->n_success, &puts, &dels);
		free(puts.v);
		free(dels.v);
		if (rc < 0)
			return API_ERR_INTERNAL + 1;
		if (rc)
			return rc;
	}
	return 0;
}

static int txn_takes_space(const Etcdserverpb__TxnRequest *r)
{
	for (int side = 0; side < 2; side++) {
		Etcdserverpb__RequestOp **ops = side ? r->failure : r->success;
		size_t n = side ? r->n_failure : r->n_success;
		for (size_t i = 0; i < n; i++) {
			if (ops[i]->request_case == ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT ||
			    (ops[i]->request_case == ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_TXN &&
			     txn_takes_space(ops[i]->request_txn)))
				return 1;
		}
	}
	return 0;
}

static int txn_is_readonly(const Etcdserverpb__TxnRequest *r)
{
	for (int side = 0; side < 2; side++) {
		Etcdserverpb__RequestOp **ops = side ? r->failure : r->success;
		size_t n = side ? r->n_failure : r->n_success;
		for (size_t i = 0; i < n; i++) {
			switch (ops[i]->request_case) {
			case ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_RANGE:
				break;
			case ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_TXN:
				if (!txn_is_readonly(ops[i]->request_txn))
					return 0;
				break;
			default:
				return 0;
			}
		}
	}
	return 1;
}

/* etcd's isTxnSerializable: every range in every branch asks for a serializable read. */
static int txn_is_serializable(const Etcdserverpb__TxnRequest *r)
{
	for (int side = 0; side < 2; side++) {
		Etcdserverpb__RequestOp **ops = side ? r->failure : r->success;
		size_t n = side ? r->n_failure : r->n_success;
		for (size_t i = 0; i < n; i++) {
			if (ops[i]->request_case == ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_RANGE &&
			    !ops[i]->request_range->serializable)
				return 0;
			if (ops[i]->request_case == ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_TXN &&
			    !txn_is_serializable(ops[i]->request_txn))
				return 0;
		}
	}
	return 1;
}

/* etcd fills the outer header only; nested responses carry just their revision. */
void server_fill_txn_headers(server_ctx *sc, Etcdserverpb__TxnResponse *resp)
{
	server_fill_header(sc, resp->header);
}

static void kv_range(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	const Etcdserverpb__RangeRequest *req = (const Etcdserverpb__RangeRequest *)msg;
	int bad = kv_check_range(req);
	if (bad) {
		api_call_fail(call, (api_error)(bad - 1));
		return;
	}
	if (!range_permitted(sc, call, 0, &req->key, &req->range_end))
		return;
	if (!req->serializable && learner_refuses(sc, call))
		return;
	/* With several voters a linearizable read waits for a read index. With one, every
	 * acknowledged write is already applied, so a read transaction opened now is
	 * linearizable as well as serializable. */
	if (!req->serializable && node_reads_need_index(sc->nd)) {
		node_submit(sc->nd, NODE_READ_RANGE, call, msg);
		return;
	}
	storage_reader *r;
	int rc = storage_read_begin(sc->st, &r);
	if (rc) {
		server_fail_storage(call, rc);
		return;
	}
	storage_arena a;
	storage_arena_init(&a);
	Etcdserverpb__RangeResponse resp = ETCDSERVERPB__RANGE_RESPONSE__INIT;
	rc = storage_range(r, req, &a, &resp);
	if (rc == 0) {
		server_fill_header(sc, resp.header);
		api_call_reply(call, &resp.base);
	} else {
		server_fail_storage(call, rc);
	}
	storage_read_end(r);
	storage_arena_free(&a);
}

static int too_large(server_ctx *sc, api_call *call)
{
	size_t n = api_call_request_size(call);
	return n + raft_request_overhead(sc, n) > sc->cfg->max_request_bytes;
}

static void kv_put(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	if (learner_refuses(sc, call))
		return;
	const Etcdserverpb__PutRequest *req = (const Etcdserverpb__PutRequest *)msg;
	static const ProtobufCBinaryData single = {0, NULL};
	int e = check_put(req);
	if (e) {
		api_call_fail(call, (api_error)(e - 1));
		return;
	}
	if (!range_permitted(sc, call, 1, &req->key, &single))
		return;
	if (too_large(sc, call)) {
		api_call_fail(call, API_ERR_REQUEST_TOO_LARGE);
		return;
	}
	if (alarm_quota_exceeded(sc, api_call_request_size(call))) {
		api_call_fail(call, API_ERR_NO_SPACE);
		return;
	}
	node_submit(sc->nd, NODE_PUT, call, msg);
}

static void kv_delete_range(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	if (learner_refuses(sc, call))
		return;
	const Etcdserverpb__DeleteRangeRequest *req = (const Etcdserverpb__DeleteRangeRequest *)msg;
	if (req->key.len == 0) {
		api_call_fail(call, API_ERR_EMPTY_KEY);
		return;
	}
	if (!range_permitted(sc, call, 1, &req->key, &req->range_end))
		return;
	if (too_large(sc, call)) {
		api_call_fail(call, API_ERR_REQUEST_TOO_LARGE);
		return;
	}
	node_submit(sc->nd, NODE_DELETE_RANGE, call, msg);
}

static void kv_txn(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	if (learner_refuses(sc, call))
		return;
	const Etcdserverpb__TxnRequest *req = (const Etcdserverpb__TxnRequest *)msg;
	int e = kv_check_txn(req, sc->cfg->max_txn_ops);
	if (e) {
		api_call_fail(call, (api_error)(e - 1));
		return;
	}
	if (!txn_permitted(sc, call, req))
		return;
	if (!txn_is_readonly(req)) {
		if (too_large(sc, call)) {
			api_call_fail(call, API_ERR_REQUEST_TOO_LARGE);
			return;
		}
		/* The quota counts only what takes space: a txn of deletes always passes. */
		if (txn_takes_space(req) && alarm_quota_exceeded(sc, api_call_request_size(call))) {
			api_call_fail(call, API_ERR_NO_SPACE);
			return;
		}
		node_submit(sc->nd, NODE_TXN, call, msg);
		return;
	}
	/* Read-only txns never go through the log, as in etcd; unless every range in them is
	 * serializable they wait for a read index. */
	if (!txn_is_serializable(req) && node_reads_need_index(sc->nd)) {
		node_submit(sc->nd, NODE_READ_TXN, call, msg);
		return;
	}
	storage_reader *r;
	int rc = storage_read_begin(sc->st, &r);
	if (rc) {
		server_fail_storage(call, rc);
		return;
	}
	storage_arena a;
	storage_arena_init(&a);
	Etcdserverpb__TxnResponse resp = ETCDSERVERPB__TXN_RESPONSE__INIT;
	rc = storage_read_txn(r, req, &a, &resp);
	if (rc == 0) {
		server_fill_txn_headers(sc, &resp);
		api_call_reply(call, &resp.base);
	} else {
		server_fail_storage(call, rc);
	}
	storage_read_end(r);
	storage_arena_free(&a);
}

static void kv_compact(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	if (!call_admitted(sc, call, 0, 0))
		return;
	node_submit(sc->nd, NODE_COMPACT, call, msg);
}

int kv_register(api_server *as, server_ctx *sc)
{
	static const struct {
		const char *path;
		api_unary_fn fn;
	} routes[] = {
		{"/etcdserverpb.KV/Range", kv_range},
		{"/etcdserverpb.KV/Put", kv_put},
		{"/etcdserverpb.KV/DeleteRange", kv_delete_range},
		{"/etcdserverpb.KV/Txn", kv_txn},
		{"/etcdserverpb.KV/Compact", kv_compact},
	};
	for (size_t i = 0; i < sizeof(routes) / sizeof(routes[0]); i++) {
		int rc = api_server_route(as, routes[i].path, routes[i].fn, sc);
		if (rc)
			return rc;
	}
	return rangestream_register(as, sc);
}
