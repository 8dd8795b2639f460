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
static uint64_t member_id(char **urls, int n, const char *token)
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

void member_compute_ids(const config *cfg, member_info *out)
{
	/* Group --initial-cluster "name=url,..." by name. */
	char *ic = strdup(cfg->initial_cluster);
	char *names[64], *urls[64][CONFIG_MAX_URLS];
	int nurls[64] = {0}, nm = 0;
	char *save = NULL;
	for (char *tok = strtok_r(ic, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		char *eq = strchr(tok, '=');
		if (eq == NULL)
			continue;
		*eq = '\0';
		int k;
		for (k = 0; k < nm; k++)
			if (strcmp(names[k], tok) == 0)
				break;
		if (k == nm) {
			if (nm == 64)
				continue;
			names[nm++] = tok;
		}
		if (nurls[k] < CONFIG_MAX_URLS)
			urls[k][nurls[k]++] = eq + 1;
	}
	uint64_t ids[64];
	out->member_id = 0;
	for (int k = 0; k < nm; k++) {
		ids[k] = member_id(urls[k], nurls[k], cfg->initial_cluster_token);
		if (strcmp(names[k], cfg->name) == 0)
			out->member_id = ids[k];
	}
	if (out->member_id == 0) {
		/* Not in --initial-cluster: derive from our own peer URLs. */
		char *own[CONFIG_MAX_URLS];
		for (int u = 0; u < cfg->initial_advertise_peer.n; u++)
			own[u] = cfg->initial_advertise_peer.url[u];
		out->member_id = member_id(own, cfg->initial_advertise_peer.n, cfg->initial_cluster_token);
		ids[nm++ < 64 ? nm - 1 : 63] = out->member_id;
	}
	/* etcd's cluster id: sha1 of the sorted member ids, big-endian. */
	qsort(ids, (size_t)nm, sizeof(uint64_t), cmp_u64);
	uint8_t buf[64 * 8], d[SHA_DIGEST_LENGTH];
	for (int k = 0; k < nm; k++)
		for (int i = 0; i < 8; i++)
			buf[8 * k + i] = (uint8_t)(ids[k] >> (56 - 8 * i));
	SHA1(buf, (size_t)nm * 8, d);
	out->cluster_id = be64(d);
	out->name = cfg->name;
	free(ic);
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
	resp.leader = sc->mi.member_id;
	resp.raftindex = node_applied_index(sc->nd);
	resp.raftappliedindex = node_applied_index(sc->nd);
	resp.raftterm = node_term(sc->nd);
	resp.dbsizequota = (int64_t)sc->quota_bytes;
	char *errs[16];
	char errbuf[16][64];
	resp.n_errors = alarm_status_errors(sc->alarms, errs, 16, errbuf);
	resp.errors = errs;
	api_call_reply(call, &resp.base);
}

static void cluster_member_list(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	storage_stats st;
	int rc = storage_stat(sc->st, &st);
	if (rc) {
		server_fail_storage(call, rc);
		return;
	}
	Etcdserverpb__MemberListResponse resp = ETCDSERVERPB__MEMBER_LIST_RESPONSE__INIT;
	Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
	Etcdserverpb__Member m = ETCDSERVERPB__MEMBER__INIT;
	Etcdserverpb__Member *members[1] = {&m};
	server_fill_header(sc, &h);
	resp.header = &h;
	m.id = sc->mi.member_id;
	m.name = sc->cfg->name;
	m.n_peerurls = (size_t)sc->cfg->initial_advertise_peer.n;
	m.peerurls = sc->cfg->initial_advertise_peer.url;
	m.n_clienturls = (size_t)sc->cfg->advertise_client.n;
	m.clienturls = sc->cfg->advertise_client.url;
	resp.n_members = 1;
	resp.members = members;
	api_call_reply(call, &resp.base);
}

static void maint_hash_kv(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
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

static void maint_defragment(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
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
		{"/etcdserverpb.Cluster/MemberList", cluster_member_list},
	};
	for (size_t i = 0; i < sizeof(routes) / sizeof(routes[0]); i++) {
		int rc = api_server_route(as, routes[i].path, routes[i].fn, sc);
		if (rc)
			return rc;
	}
	return alarm_register(as, sc);
}
