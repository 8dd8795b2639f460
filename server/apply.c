/*
 * apply.c - what a log entry holds and how every member applies it.
 *
 * An entry is [op u8][proposer member id u64 BE][sequence u64 BE][request, protobuf]. Every
 * member applies every entry the same way, from these bytes alone, so members that applied
 * the same log hold the same state; only the proposer answers the client, matching the
 * entry to its waiting call by (proposer, sequence).
 */
#include <stdlib.h>
#include <string.h>

#include "server/server.h"

#define ENTRY_HDR 17

int apply_encode(node_op op, uint64_t proposer, uint64_t seq, const ProtobufCMessage *msg,
		 uint8_t **out, size_t *len)
{
	size_t body = msg ? protobuf_c_message_get_packed_size(msg) : 0;
	uint8_t *p = malloc(ENTRY_HDR + body);
	if (p == NULL)
		return STORAGE_ERR_NOMEM;
	p[0] = (uint8_t)op;
	for (int i = 0; i < 8; i++) {
		p[1 + i] = (uint8_t)(proposer >> (56 - 8 * i));
		p[9 + i] = (uint8_t)(seq >> (56 - 8 * i));
	}
	if (msg)
		protobuf_c_message_pack(msg, p + ENTRY_HDR);
	*out = p;
	*len = ENTRY_HDR + body;
	return 0;
}

/* protobuf-c allocations of an applied request come from the batch arena. */
static void *arena_alloc(void *ctx, size_t n)
{
	return storage_arena_alloc(ctx, n ? n : 1);
}

static void arena_free(void *ctx, void *p)
{
}

static const ProtobufCMessageDescriptor *request_descriptor(node_op op)
{
	switch (op) {
	case NODE_PUT:
		return &etcdserverpb__put_request__descriptor;
	case NODE_DELETE_RANGE:
		return &etcdserverpb__delete_range_request__descriptor;
	case NODE_TXN:
		return &etcdserverpb__txn_request__descriptor;
	case NODE_COMPACT:
		return &etcdserverpb__compaction_request__descriptor;
	case NODE_LEASE_GRANT:
		return &etcdserverpb__lease_grant_request__descriptor;
	case NODE_LEASE_REVOKE:
		return &etcdserverpb__lease_revoke_request__descriptor;
	case NODE_LEASE_CHECKPOINT:
		return &etcdserverpb__lease_checkpoint_request__descriptor;
	case NODE_ALARM:
		return &etcdserverpb__alarm_request__descriptor;
	case NODE_MEMBER_ADD:
	case NODE_MEMBER_UPDATE:
	case NODE_MEMBER_REMOVE:
	case NODE_MEMBER_PROMOTE:
		return &etcdserverpb__member__descriptor;
	case NODE_AUTH_ENABLE:
		return &etcdserverpb__auth_enable_request__descriptor;
	case NODE_AUTH_DISABLE:
		return &etcdserverpb__auth_disable_request__descriptor;
	case NODE_AUTH_AUTHENTICATE:
		return &etcdserverpb__authenticate_request__descriptor;
	case NODE_AUTH_USER_ADD:
		return &etcdserverpb__auth_user_add_request__descriptor;
	case NODE_AUTH_USER_DELETE:
		return &etcdserverpb__auth_user_delete_request__descriptor;
	case NODE_AUTH_USER_CHANGE_PW:
		return &etcdserverpb__auth_user_change_password_request__descriptor;
	case NODE_AUTH_USER_GRANT:
		return &etcdserverpb__auth_user_grant_role_request__descriptor;
	case NODE_AUTH_USER_REVOKE:
		return &etcdserverpb__auth_user_revoke_role_request__descriptor;
	case NODE_AUTH_ROLE_ADD:
		return &etcdserverpb__auth_role_add_request__descriptor;
	case NODE_AUTH_ROLE_DELETE:
		return &etcdserverpb__auth_role_delete_request__descriptor;
	case NODE_AUTH_ROLE_GRANT:
		return &etcdserverpb__auth_role_grant_permission_request__descriptor;
	case NODE_AUTH_ROLE_REVOKE:
		return &etcdserverpb__auth_role_revoke_permission_request__descriptor;
	default:
		return NULL;
	}
}

static int txn_has_put(const Etcdserverpb__TxnRequest *t)
{
	for (int side = 0; side < 2; side++) {
		Etcdserverpb__RequestOp **ops = side ? t->failure : t->success;
		size_t n = side ? t->n_failure : t->n_success;
		for (size_t i = 0; i < n; i++) {
			if (ops[i]->request_case == ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT)
				return 1;
			if (ops[i]->request_case == ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_TXN &&
			    txn_has_put(ops[i]->request_txn))
				return 1;
		}
	}
	return 0;
}

/* etcd's capped applier: with NOSPACE raised, only writes that take no space pass. */
static int refused_for_space(server_ctx *sc, node_op op, const ProtobufCMessage *req)
{
	if (!alarm_applied_nospace(sc->alarms))
		return 0;
	switch (op) {
	case NODE_PUT:
	case NODE_LEASE_GRANT:
		return 1;
	case NODE_TXN:
		return txn_has_put((const Etcdserverpb__TxnRequest *)req);
	default:
		return 0;
	}
}

/* Allocates a response of descriptor d in the arena, with an empty header if it has one. */
static void *response_new(storage_arena *a, const ProtobufCMessageDescriptor *d)
{
	ProtobufCMessage *m = storage_arena_alloc(a, d->sizeof_message);
	if (m)
		d->message_init(m);
	return m;
}

/* etcd's applierV3Corrupt: with CORRUPT raised, no write changes the store. */
static int refused_for_corruption(server_ctx *sc, node_op op)
{
	switch (op) {
	case NODE_PUT:
	case NODE_DELETE_RANGE:
	case NODE_TXN:
	case NODE_COMPACT:
	case NODE_LEASE_GRANT:
	case NODE_LEASE_REVOKE:
		return alarm_applied_corrupt(sc->alarms);
	default:
		return 0;
	}
}

static int apply_request(server_ctx *sc, storage_batch *b, apply_result *r, storage_arena *a)
{
	if (refused_for_corruption(sc, r->ar_op))
		return ALARM_ERR_CORRUPT;
	if (refused_for_space(sc, r->ar_op, r->ar_req))
		return STORAGE_ERR_NOSPACE;
	switch (r->ar_op) {
	case NODE_PUT: {
		Etcdserverpb__PutResponse *resp = response_new(a, &etcdserverpb__put_response__descriptor);
		if (resp == NULL)
			return STORAGE_ERR_NOMEM;
		r->ar_resp = &resp->base;
		return storage_batch_put(b, (const Etcdserverpb__PutRequest *)r->ar_req, a, resp);
	}
	case NODE_DELETE_RANGE: {
		Etcdserverpb__DeleteRangeResponse *resp = response_new(a, &etcdserverpb__delete_range_response__descriptor);
		if (resp == NULL)
			return STORAGE_ERR_NOMEM;
		r->ar_resp = &resp->base;
		return storage_batch_delete_range(b, (const Etcdserverpb__DeleteRangeRequest *)r->ar_req, a, resp);
	}
	case NODE_TXN: {
		Etcdserverpb__TxnResponse *resp = response_new(a, &etcdserverpb__txn_response__descriptor);
		if (resp == NULL)
			return STORAGE_ERR_NOMEM;
		r->ar_resp = &resp->base;
		return storage_batch_txn(b, (const Etcdserverpb__TxnRequest *)r->ar_req, a, resp);
	}
	case NODE_COMPACT: {
		Etcdserverpb__CompactionResponse *resp = response_new(a, &etcdserverpb__compaction_response__descriptor);
		if (resp == NULL)
			return STORAGE_ERR_NOMEM;
		r->ar_resp = &resp->base;
		return storage_batch_compact(b, (const Etcdserverpb__CompactionRequest *)r->ar_req, a, resp);
	}
	case NODE_LEASE_GRANT: {
		const Etcdserverpb__LeaseGrantRequest *req = (const Etcdserverpb__LeaseGrantRequest *)r->ar_req;
		Etcdserverpb__LeaseGrantResponse *resp = response_new(a, &etcdserverpb__lease_grant_response__descriptor);
		Etcdserverpb__ResponseHeader *h = response_new(a, &etcdserverpb__response_header__descriptor);
		if (resp == NULL || h == NULL)
			return STORAGE_ERR_NOMEM;
		int rc = storage_batch_lease_grant(b, req->id, req->ttl);
		h->revision = storage_batch_revision(b);
		resp->header = h;
		resp->id = req->id;
		resp->ttl = req->ttl;
		r->ar_resp = &resp->base;
		return rc;
	}
	case NODE_LEASE_REVOKE: {
		Etcdserverpb__LeaseRevokeResponse *resp = response_new(a, &etcdserverpb__lease_revoke_response__descriptor);
		if (resp == NULL)
			return STORAGE_ERR_NOMEM;
		r->ar_resp = &resp->base;
		return storage_batch_lease_revoke(b, ((const Etcdserverpb__LeaseRevokeRequest *)r->ar_req)->id, a, resp);
	}
	case NODE_LEASE_CHECKPOINT: {
		Etcdserverpb__LeaseCheckpointResponse *resp = response_new(a, &etcdserverpb__lease_checkpoint_response__descriptor);
		Etcdserverpb__ResponseHeader *h = response_new(a, &etcdserverpb__response_header__descriptor);
		if (resp == NULL || h == NULL)
			return STORAGE_ERR_NOMEM;
		h->revision = storage_batch_revision(b);
		resp->header = h;
		r->ar_resp = &resp->base;
		return storage_batch_lease_checkpoint(b, (const Etcdserverpb__LeaseCheckpointRequest *)r->ar_req);
	}
	case NODE_ALARM: {
		Etcdserverpb__AlarmResponse *resp = response_new(a, &etcdserverpb__alarm_response__descriptor);
		Etcdserverpb__ResponseHeader *h = response_new(a, &etcdserverpb__response_header__descriptor);
		if (resp == NULL || h == NULL)
			return STORAGE_ERR_NOMEM;
		h->revision = storage_batch_revision(b);
		resp->header = h;
		r->ar_resp = &resp->base;
		return alarm_apply(sc->alarms, b, (const Etcdserverpb__AlarmRequest *)r->ar_req, a, resp, &r->ar_alarm);
	}
	case NODE_MEMBER_ADD:
	case NODE_MEMBER_UPDATE:
		return members_apply(sc->members, b, r->ar_op, (const Etcdserverpb__Member *)r->ar_req);
	case NODE_MEMBER_REMOVE:
	case NODE_MEMBER_PROMOTE:
		return 0; /* the configuration change that follows does the work */
	default:
		if (r->ar_op >= NODE_AUTH_ENABLE && r->ar_op <= NODE_AUTH_ROLE_REVOKE)
			return auth_apply(sc->auth, b, r->ar_op, r->ar_req, a, &r->ar_resp);
		return STORAGE_ERR_INVALID;
	}
}

int apply_entry(server_ctx *sc, storage_batch *b, const uint8_t *data, size_t len, storage_arena *a,
		apply_result *r)
{
	memset(r, 0, sizeof(*r));
	if (len == 0) {
		r->ar_op = NODE_NOOP; /* a new leader's empty entry */
		return 0;
	}
	if (len < ENTRY_HDR)
		return STORAGE_ERR_CORRUPT;
	r->ar_op = (node_op)data[0];
	for (int i = 0; i < 8; i++) {
		r->ar_proposer = r->ar_proposer << 8 | data[1 + i];
		r->ar_seq = r->ar_seq << 8 | data[9 + i];
	}
	const ProtobufCMessageDescriptor *d = request_descriptor(r->ar_op);
	if (d == NULL)
		return STORAGE_ERR_CORRUPT;
	ProtobufCAllocator alloc = {arena_alloc, arena_free, a};
	r->ar_req = protobuf_c_message_unpack(d, &alloc, len - ENTRY_HDR, data + ENTRY_HDR);
	if (r->ar_req == NULL)
		return STORAGE_ERR_CORRUPT;
	r->ar_err = apply_request(sc, b, r, a);
	return 0;
}

void apply_fill_headers(server_ctx *sc, apply_result *r)
{
	if (r->ar_resp == NULL)
		return;
	if (r->ar_op == NODE_TXN) {
		server_fill_txn_headers(sc, (Etcdserverpb__TxnResponse *)r->ar_resp);
		return;
	}
	/* Every etcd response has its header as field 1, right after the protobuf-c base. */
	struct with_header {
		ProtobufCMessage base;
		Etcdserverpb__ResponseHeader *header;
	} *m = (struct with_header *)r->ar_resp;
	server_fill_header(sc, m->header);
}

void apply_committed(server_ctx *sc, const apply_result *r, int is_leader)
{
	switch (r->ar_op) {
	case NODE_LEASE_GRANT:
		if (r->ar_err == 0) {
			const Etcdserverpb__LeaseGrantRequest *req = (const Etcdserverpb__LeaseGrantRequest *)r->ar_req;
			lessor_granted(sc->lessor, req->id, req->ttl);
		}
		break;
	case NODE_LEASE_REVOKE: {
		int64_t id = ((const Etcdserverpb__LeaseRevokeRequest *)r->ar_req)->id;
		if (r->ar_err == 0 || r->ar_err == STORAGE_ERR_LEASE_NOT_FOUND)
			lessor_revoked(sc->lessor, id);
		else if (r->ar_proposer == sc->mi.member_id)
			lessor_revoke_failed(sc->lessor, id);
		break;
	}
	case NODE_LEASE_CHECKPOINT:
		if (r->ar_err == 0)
			lessor_checkpointed(sc->lessor, (const Etcdserverpb__LeaseCheckpointRequest *)r->ar_req);
		break;
	case NODE_ALARM:
		if (r->ar_err == 0)
			alarm_commit(sc->alarms, &r->ar_alarm);
		break;
	default:
		break;
	}
	(void)is_leader;
}
