/*
 * maint.c - member identity, response headers, Maintenance.Status, Hash, HashKV,
 * Defragment, MoveLeader and Downgrade.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>


#include "server/peer.h"
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

/* A go-semver number: optional sign and digits only (strconv.ParseInt's form). */
static int semver_int(const char *s, size_t len, long long *out)
{
	size_t i = len > 0 && (s[0] == '+' || s[0] == '-') ? 1 : 0;
	if (i == len || len - i > 18)
		return -1;
	long long v = 0;
	for (size_t k = i; k < len; k++) {
		if (s[k] < '0' || s[k] > '9')
			return -1;
		v = v * 10 + (s[k] - '0');
	}
	*out = s[0] == '-' ? -v : v;
	return 0;
}

/* go-semver's NewVersion: "major.minor.patch[-pre][+meta]"; major and minor out. */
static int semver_parse(const char *v, long long *major, long long *minor)
{
	size_t len = strcspn(v, "+");
	size_t core = strcspn(v, "-+");
	if (core > len)
		core = len;
	const char *d1 = memchr(v, '.', core);
	const char *d2 = d1 ? memchr(d1 + 1, '.', (size_t)(v + core - d1 - 1)) : NULL;
	long long patch;
	if (d1 == NULL || d2 == NULL || semver_int(v, (size_t)(d1 - v), major) != 0 ||
	    semver_int(d1 + 1, (size_t)(d2 - d1 - 1), minor) != 0 ||
	    semver_int(d2 + 1, (size_t)(v + core - d2 - 1), &patch) != 0)
		return -1;
	return 0;
}

/*
 * etcd 3.5's Maintenance.Downgrade. A target is valid only one minor version below the
 * cluster version (etcd's AllowedDowngradeVersion); VALIDATE then answers with the cluster
 * version. Keelson cannot run a downgrade: no job is ever in progress (so CANCEL has none to
 * cancel), and ENABLE of a valid target is refused as unimplemented.
 */
static void maint_downgrade(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	const Etcdserverpb__DowngradeRequest *req = (const Etcdserverpb__DowngradeRequest *)msg;
	if (!maint_admitted(sc, call))
		return;
	long long cmajor = 0, cminor = 0;
	if (semver_parse(sc->cfg->etcd_version, &cmajor, &cminor) != 0) {
		api_call_fail_msg(call, 14 /* UNAVAILABLE */, "etcdserver: cluster version not found during downgrade");
		return;
	}
	char cluster[64];
	snprintf(cluster, sizeof(cluster), "%lld.%lld.0", cmajor, cminor);
	switch (req->action) {
	case ETCDSERVERPB__DOWNGRADE_REQUEST__DOWNGRADE_ACTION__VALIDATE:
	case ETCDSERVERPB__DOWNGRADE_REQUEST__DOWNGRADE_ACTION__ENABLE: {
		/* etcd takes "major.minor" as "major.minor.0" and keeps major.minor only. */
		long long major, minor;
		const char *v = req->version ? req->version : "";
		char with_patch[300];
		snprintf(with_patch, sizeof(with_patch), "%.250s.0", v);
		if (semver_parse(v, &major, &minor) != 0 &&
		    (strlen(v) > 250 || semver_parse(with_patch, &major, &minor) != 0)) {
			api_call_fail_msg(call, 3 /* INVALID_ARGUMENT */, "etcdserver: wrong downgrade target version format");
			return;
		}
		if (major != cmajor || minor != cminor - 1) {
			api_call_fail_msg(call, 3 /* INVALID_ARGUMENT */, "etcdserver: invalid downgrade target version");
			return;
		}
		if (req->action == ETCDSERVERPB__DOWNGRADE_REQUEST__DOWNGRADE_ACTION__ENABLE) {
			api_call_fail_msg(call, 12 /* UNIMPLEMENTED */, "keelson: downgrading a cluster is not supported");
			return;
		}
		break;
	}
	case ETCDSERVERPB__DOWNGRADE_REQUEST__DOWNGRADE_ACTION__CANCEL:
		api_call_fail_msg(call, 9 /* FAILED_PRECONDITION */, "etcdserver: no inflight downgrade job");
		return;
	default:
		api_call_fail_msg(call, 2 /* UNKNOWN */, "etcdserver: unknown method");
		return;
	}
	Etcdserverpb__DowngradeResponse resp = ETCDSERVERPB__DOWNGRADE_RESPONSE__INIT;
	Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
	server_fill_header(sc, &h);
	h.revision = storage_current_revision(sc->st);
	resp.header = &h;
	resp.version = cluster;
	api_call_reply(call, &resp.base);
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
		{"/etcdserverpb.Maintenance/Downgrade", maint_downgrade},
	};
	for (size_t i = 0; i < sizeof(routes) / sizeof(routes[0]); i++) {
		int rc = api_server_route(as, routes[i].path, routes[i].fn, sc);
		if (rc)
			return rc;
	}
	return alarm_register(as, sc);
}

/* How long one running member may take to answer GET /members. */
#define MEMBERS_ASK_MS 2000

/* The JSON string starting at s (its opening quote): cut in place (its closing quote becomes
 * a NUL); *next after it. NULL if it does not end before end. etcd's names and URLs carry
 * no escapes; a string with one is kept as it is. */
static char *cut_string(char *s, const char *end, char **next)
{
	if (s >= end || *s != '"')
		return NULL;
	char *e = s + 1;
	while (e < end && *e != '"')
		e += *e == '\\' && e + 1 < end ? 2 : 1;
	if (e >= end)
		return NULL;
	*e = '\0';
	*next = e + 1;
	return s + 1;
}

/* The value of "key": in the object [obj, end), or NULL. */
static char *json_field(char *obj, const char *end, const char *key)
{
	size_t kl = strlen(key);
	for (char *p = obj; p + kl + 3 <= end; p++)
		if (p[0] == '"' && memcmp(p + 1, key, kl) == 0 && p[kl + 1] == '"') {
			char *v = p + kl + 2;
			while (v < end && (*v == ' ' || *v == ':'))
				v++;
			return v < end ? v : NULL;
		}
	return NULL;
}

/* etcd's GET /members JSON (an array of {"id", "peerURLs", "isLearner", "name",
 * "clientURLs"}) into rm, cutting the strings in json in place. 0, or -1 if malformed. */
static int parse_members(char *json, remote_members *rm)
{
	memset(rm->rm_id, 0, sizeof(rm->rm_id));
	rm->rm_n = 0;
	char *p = json;
	while ((p = strchr(p, '{')) != NULL) {
		char *end = strchr(p, '}');
		if (end == NULL || rm->rm_n == IDENTITY_MAX_MEMBERS)
			return -1;
		int k = rm->rm_n;
		char *id = json_field(p, end, "id");
		char *urls = json_field(p, end, "peerURLs");
		char *name = json_field(p, end, "name");
		char *learner = json_field(p, end, "isLearner");
		if (id == NULL || urls == NULL || *urls != '[')
			return -1;
		rm->rm_id[k] = strtoull(id, NULL, 10);
		rm->rm_learner[k] = learner != NULL && strncmp(learner, "true", 4) == 0;
		rm->rm_name[k] = "";
		char *next = NULL;
		if (name != NULL) {
			char *n = cut_string(name, end, &next);
			if (n != NULL)
				rm->rm_name[k] = n;
		}
		rm->rm_n_urls[k] = 0;
		char *u = urls + 1;
		for (;;) {
			while (u < end && (*u == ' ' || *u == ','))
				u++;
			if (u >= end || *u != '"')
				break;
			char *s = cut_string(u, end, &next);
			if (s == NULL || rm->rm_n_urls[k] == IDENTITY_MAX_URLS)
				return -1;
			rm->rm_urls[k][rm->rm_n_urls[k]++] = s;
			u = next;
		}
		if (rm->rm_id[k] == 0 || rm->rm_n_urls[k] == 0)
			return -1;
		rm->rm_n++;
		p = end + 1;
	}
	return rm->rm_n > 0 ? 0 : -1;
}

/* The index of the member with exactly our peer URLs in rm, or -1. */
static int find_self(const remote_members *rm, const config *cfg)
{
	for (int k = 0; k < rm->rm_n; k++) {
		if (rm->rm_n_urls[k] != cfg->initial_advertise_peer.n)
			continue;
		int matched = 0;
		for (int i = 0; i < rm->rm_n_urls[k]; i++)
			for (int j = 0; j < cfg->initial_advertise_peer.n; j++)
				if (strcmp(rm->rm_urls[k][i], cfg->initial_advertise_peer.url[j]) == 0) {
					matched++;
					break;
				}
		if (matched == rm->rm_n_urls[k])
			return k;
	}
	return -1;
}

void remote_members_free(remote_members *rm)
{
	free(rm->rm_buf);
	rm->rm_buf = NULL;
	rm->rm_n = 0;
}

int member_id_from_peers(const config *cfg, remote_members *rm, uint64_t *member_id, char *errbuf,
			 size_t errlen)
{
	identity_cluster c;
	memset(rm, 0, sizeof(*rm));
	*member_id = 0;
	int rc = identity_parse(&c, cfg->initial_cluster, cfg->initial_cluster_token, errbuf, errlen);
	if (rc)
		return -1;
	int answered = 0;
	/* etcd's getRemotePeerURLs: every --initial-cluster member but ourselves. */
	for (int m = 0; m < c.ic_n && *member_id == 0; m++) {
		if (strcmp(c.ic_name[m], cfg->name) == 0)
			continue;
		for (int k = 0; k < c.ic_n_urls[m] && *member_id == 0; k++) {
			char *body = NULL, why[256] = "";
			uint64_t cid = 0;
			int r = peer_http_get_members(c.ic_urls[m][k], cfg->peer_tls, MEMBERS_ASK_MS, &body, &cid,
						      why, sizeof(why));
			if (r != 0) {
				log_at(LOG_WARN, "could not get cluster response", "address", c.ic_urls[m][k],
				       "error", why, NULL);
				continue;
			}
			if (parse_members(body, rm) != 0) {
				log_at(LOG_WARN, "could not get cluster response", "address", c.ic_urls[m][k],
				       "error", "malformed member list", NULL);
				free(body);
				continue;
			}
			answered++;
			int self = find_self(rm, cfg);
			if (self < 0) {
				free(body);
				continue;
			}
			*member_id = rm->rm_id[self];
			rm->rm_name[self] = (char *)cfg->name;
			rm->rm_buf = body; /* the strings of rm */
		}
	}
	identity_free(&c);
	if (*member_id != 0)
		return 0;
	rm->rm_n = 0;
	/* etcd's two failures: no member answered (GetClusterFromRemotePeers), or the list has
	 * no member with our peer URLs (ValidateClusterAndAssignIDs). */
	if (answered == 0)
		snprintf(errbuf, errlen, "cannot fetch cluster info from peer urls: could not retrieve cluster "
					 "information from the given URLs");
	else
		snprintf(errbuf, errlen, "error validating peerURLs: no member of the cluster has the peer URLs "
					 "%s (add it with `member add` first)",
			 cfg->initial_advertise_peer.n > 0 ? cfg->initial_advertise_peer.url[0] : "");
	return -1;
}
