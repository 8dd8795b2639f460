/*
 * maint.c - member identity, response headers, Maintenance.Status and Cluster.MemberList.
 */
#include <stdlib.h>
#include <string.h>


#include "server/server.h"

int member_compute_ids(const config *cfg, member_info *out, char *errbuf, size_t errlen)
{
	identity_cluster c;
	int rc = identity_parse(&c, cfg->initial_cluster, cfg->initial_cluster_token, errbuf, errlen);
	if (rc)
		return rc;
	uint64_t ids[IDENTITY_MAX_MEMBERS + 1];
	int n = c.ic_n;
	memcpy(ids, c.ic_id, (size_t)n * sizeof(uint64_t));
	int self = identity_find(&c, cfg->name);
	if (self >= 0) {
		out->member_id = c.ic_id[self];
		out->cluster_id = c.ic_cluster_id;
	} else {
		/* Not in --initial-cluster: derive from our own peer URLs. */
		out->member_id = identity_member_id(cfg->initial_advertise_peer.url, cfg->initial_advertise_peer.n,
						    cfg->initial_cluster_token);
		ids[n++] = out->member_id;
		out->cluster_id = identity_cluster_id(ids, n);
	}
	out->name = cfg->name;
	identity_free(&c);
	return 0;
}

void server_fill_header(server_ctx *sc, Etcdserverpb__ResponseHeader *h)
{
	if (h == NULL)
		return;
	h->cluster_id = sc->mi.cluster_id;
	h->member_id = sc->mi.member_id;
	h->raft_term = node_term(sc->nd);
}

static void maint_status(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	storage_stats st;
	int rc = storage_stat(sc->st, &st);
	if (rc) {
		server_fail_storage(call, rc);
		return;
	}
	Etcdserverpb__StatusResponse resp = ETCDSERVERPB__STATUS_RESPONSE__INIT;
	Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
	server_fill_header(sc, &h);
	h.revision = st.st_revision;
	resp.header = &h;
	resp.version = sc->cfg->etcd_version;
	resp.dbsize = (int64_t)st.st_db_size;
	resp.dbsizeinuse = (int64_t)st.st_db_size_in_use;
	resp.leader = node_leader(sc->nd);
	resp.raftindex = node_last_index(sc->nd);
	resp.raftappliedindex = node_applied_index(sc->nd);
	resp.raftterm = node_term(sc->nd);
	resp.dbsizequota = (int64_t)sc->quota_bytes;
	resp.islearner = node_is_learner(sc->nd);
	char *errs[16];
	char errbuf[16][64];
	resp.n_errors = alarm_status_errors(sc->alarms, errs, 16, errbuf);
	resp.errors = errs;
	api_call_reply(call, &resp.base);
}

static void maint_hash_kv(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	if (!maint_admitted(sc, call))
		return;
	const Etcdserverpb__HashKVRequest *req = (const Etcdserverpb__HashKVRequest *)msg;
	storage_reader *r;
	int rc = storage_read_begin(sc->st, &r);
	if (rc) {
		server_fail_storage(call, rc);
		return;
	}
	Etcdserverpb__HashKVResponse resp = ETCDSERVERPB__HASH_KVRESPONSE__INIT;
	Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
	/* The hash covers the revision asked for (0: the current one); the header carries the
	 * store's current revision, as etcd's HashByRev returns it. */
	rc = storage_hash_kv(r, req->revision, &resp.hash, &resp.hash_revision, &resp.compact_revision);
	int64_t current = storage_current_revision(sc->st);
	storage_read_end(r);
	if (rc) {
		server_fail_storage(call, rc);
		return;
	}
	server_fill_header(sc, &h);
	h.revision = req->revision == 0 || current < resp.hash_revision ? resp.hash_revision : current;
	resp.header = &h;
	api_call_reply(call, &resp.base);
}

static void maint_hash(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	if (!maint_admitted(sc, call))
		return;
	storage_reader *r;
	int rc = storage_read_begin(sc->st, &r);
	if (rc) {
		server_fail_storage(call, rc);
		return;
	}
	Etcdserverpb__HashResponse resp = ETCDSERVERPB__HASH_RESPONSE__INIT;
	Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
	rc = storage_hash(r, &resp.hash);
	storage_read_end(r);
	if (rc) {
		server_fail_storage(call, rc);
		return;
	}
	server_fill_header(sc, &h);
	h.revision = storage_current_revision(sc->st);
	resp.header = &h;
	api_call_reply(call, &resp.base);
}

/* etcd 3.4 checks no auth on MoveLeader (nor on Status and Alarm). */
static void maint_move_leader(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	node_submit(sc->nd, NODE_MOVE_LEADER, call, msg);
}

static void maint_defragment(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	if (!maint_admitted(sc, call))
		return;
	node_submit(sc->nd, NODE_DEFRAG, call, msg);
}

int maint_register(api_server *as, server_ctx *sc)
{
	static const struct {
		const char *path;
		api_unary_fn fn;
	} routes[] = {
		{"/etcdserverpb.Maintenance/Status", maint_status},
		{"/etcdserverpb.Maintenance/Hash", maint_hash},
		{"/etcdserverpb.Maintenance/HashKV", maint_hash_kv},
		{"/etcdserverpb.Maintenance/Defragment", maint_defragment},
		{"/etcdserverpb.Maintenance/MoveLeader", maint_move_leader},
	};
	for (size_t i = 0; i < sizeof(routes) / sizeof(routes[0]); i++) {
		int rc = api_server_route(as, routes[i].path, routes[i].fn, sc);
		if (rc)
			return rc;
	}
	return alarm_register(as, sc);
}
