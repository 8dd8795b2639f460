/*
 * maint.c - member identity, response headers, Maintenance.Status and Cluster.MemberList.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/sha.h>

#include "server/server.h"

static uint64_t be64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = v << 8 | p[i];
	return v;
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* etcd's member id: sha1 of the member's sorted peer URLs and the cluster token. */
uint64_t member_id_of(char **urls, int n, const char *token)
{
	uint8_t d[SHA_DIGEST_LENGTH];
	size_t len = strlen(token), off = 0;
	qsort(urls, (size_t)n, sizeof(char *), cmp_str);
	for (int i = 0; i < n; i++)
		len += strlen(urls[i]);
	uint8_t *buf = malloc(len + 1);
	if (buf == NULL)
		return 0;
	for (int i = 0; i < n; i++) {
		memcpy(buf + off, urls[i], strlen(urls[i]));
		off += strlen(urls[i]);
	}
	memcpy(buf + off, token, strlen(token));
	SHA1(buf, len, d);
	free(buf);
	return be64(d);
}

void member_compute_all(const config *cfg, member_id_list *out)
{
	/* Group --initial-cluster "name=url,..." by name. */
	memset(out, 0, sizeof(*out));
	out->buf = strdup(cfg->initial_cluster);
	if (out->buf == NULL)
		return;
	char *save = NULL;
	for (char *tok = strtok_r(out->buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		char *eq = strchr(tok, '=');
		if (eq == NULL)
			continue;
		*eq = '\0';
		int k;
		for (k = 0; k < out->n; k++)
			if (strcmp(out->name[k], tok) == 0)
				break;
		if (k == out->n) {
			if (out->n == MEMBER_LIST_MAX)
				continue;
			out->name[out->n++] = tok;
		}
		if (out->n_urls[k] < CONFIG_MAX_URLS)
			out->urls[k][out->n_urls[k]++] = eq + 1;
	}
	for (int k = 0; k < out->n; k++) {
		char *sorted[CONFIG_MAX_URLS];
		memcpy(sorted, out->urls[k], sizeof(sorted));
		out->id[k] = member_id_of(sorted, out->n_urls[k], cfg->initial_cluster_token);
	}
}

void member_id_list_free(member_id_list *l)
{
	free(l->buf);
	l->buf = NULL;
}

void member_compute_ids(const config *cfg, member_info *out)
{
	member_id_list l;
	member_compute_all(cfg, &l);
	uint64_t ids[MEMBER_LIST_MAX + 1];
	int n = l.n;
	out->member_id = 0;
	for (int k = 0; k < l.n; k++) {
		ids[k] = l.id[k];
		if (strcmp(l.name[k], cfg->name) == 0)
			out->member_id = l.id[k];
	}
	if (out->member_id == 0) {
		/* Not in --initial-cluster: derive from our own peer URLs. */
		char *own[CONFIG_MAX_URLS];
		for (int u = 0; u < cfg->initial_advertise_peer.n; u++)
			own[u] = cfg->initial_advertise_peer.url[u];
		out->member_id = member_id_of(own, cfg->initial_advertise_peer.n, cfg->initial_cluster_token);
		ids[n++] = out->member_id;
	}
	/* etcd's cluster id: sha1 of the sorted member ids, big-endian. */
	qsort(ids, (size_t)n, sizeof(uint64_t), cmp_u64);
	uint8_t buf[(MEMBER_LIST_MAX + 1) * 8], d[SHA_DIGEST_LENGTH];
	for (int k = 0; k < n; k++)
		for (int i = 0; i < 8; i++)
			buf[8 * k + i] = (uint8_t)(ids[k] >> (56 - 8 * i));
	SHA1(buf, (size_t)n * 8, d);
	out->cluster_id = be64(d);
	out->name = cfg->name;
	member_id_list_free(&l);
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
	if (!call_admitted(sc, call, 1, 1))
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
	rc = storage_hash_kv(r, req->revision, &resp.hash, &resp.hash_revision, &resp.compact_revision);
	storage_read_end(r);
	if (rc) {
		server_fail_storage(call, rc);
		return;
	}
	server_fill_header(sc, &h);
	h.revision = resp.hash_revision;
	resp.header = &h;
	api_call_reply(call, &resp.base);
}

static void maint_hash(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	if (!call_admitted(sc, call, 1, 1))
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

static void maint_move_leader(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	if (!call_admitted(sc, call, 1, 1))
		return;
	node_submit(sc->nd, NODE_MOVE_LEADER, call, msg);
}

static void maint_defragment(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	if (!call_admitted(sc, call, 1, 1))
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
