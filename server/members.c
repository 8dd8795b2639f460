/*
 * members.c - the cluster's membership as etcd shows it (ids, names, peer and client URLs,
 * learners) and the Cluster service.
 *
 * Raft owns who votes; this store owns what etcd reports about each member. It starts from
 * --initial-cluster, changes only by applying log entries (member add/update, and Raft's
 * configuration changes for removal and promotion), and is persisted in the member's
 * metadata as an encoded MemberListResponse, so every member reports the same list.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/sha.h>

#include "server/server.h"

#define MEMBERS_META "members"
/* The ids removed from the cluster, 8 bytes big-endian each: as etcd's members_removed
 * bucket, an id once removed is never given again (MemberAdd skips it). */
#define MEMBERS_REMOVED_META "members_removed"

struct members {
	pthread_mutex_t m_mu;
	Etcdserverpb__MemberListResponse *m_list; /* protobuf-c owned (unpacked or built) */
	uint64_t m_self;
	uint8_t *m_removed;   /* MEMBERS_REMOVED_META's bytes */
	size_t m_nremoved;    /* ids in it */
};

static uint64_t removed_at(const members *ms, size_t i)
{
	uint64_t v = 0;
	for (int k = 0; k < 8; k++)
		v = v << 8 | ms->m_removed[8 * i + (size_t)k];
	return v;
}

static int was_removed(const members *ms, uint64_t id)
{
	for (size_t i = 0; i < ms->m_nremoved; i++)
		if (removed_at(ms, i) == id)
			return 1;
	return 0;
}

/* Adds id to the removed ids, in memory and in b. Called with m_mu held. */
static int note_removed(members *ms, storage_batch *b, uint64_t id)
{
	if (was_removed(ms, id))
		return 0;
	uint8_t *nb = realloc(ms->m_removed, 8 * (ms->m_nremoved + 1));
	if (nb == NULL)
		return STORAGE_ERR_NOMEM;
	ms->m_removed = nb;
	for (int k = 0; k < 8; k++)
		nb[8 * ms->m_nremoved + (size_t)k] = (uint8_t)(id >> (56 - 8 * k));
	ms->m_nremoved++;
	return storage_batch_meta_put(b, MEMBERS_REMOVED_META, ms->m_removed, 8 * ms->m_nremoved);
}

static char *xstrdup(const char *s)
{
	return strdup(s ? s : "");
}

static void member_free(Etcdserverpb__Member *m)
{
	if (m == NULL)
		return;
	free(m->name);
	for (size_t i = 0; i < m->n_peerurls; i++)
		free(m->peerurls[i]);
	for (size_t i = 0; i < m->n_clienturls; i++)
		free(m->clienturls[i]);
	free(m->peerurls);
	free(m->clienturls);
	free(m);
}

/* A deep copy with malloc'd strings, so the list can be freed field by field. */
static Etcdserverpb__Member *member_dup(const Etcdserverpb__Member *src)
{
	Etcdserverpb__Member *m = malloc(sizeof(*m));
	if (m == NULL)
		return NULL;
	etcdserverpb__member__init(m);
	m->id = src->id;
	m->islearner = src->islearner;
	m->name = xstrdup(src->name);
	m->peerurls = calloc(src->n_peerurls + 1, sizeof(char *));
	m->clienturls = calloc(src->n_clienturls + 1, sizeof(char *));
	if (m->name == NULL || m->peerurls == NULL || m->clienturls == NULL) {
		member_free(m);
		return NULL;
	}
	for (size_t i = 0; i < src->n_peerurls; i++)
		if ((m->peerurls[m->n_peerurls++] = xstrdup(src->peerurls[i])) == NULL) {
			member_free(m);
			return NULL;
		}
	for (size_t i = 0; i < src->n_clienturls; i++)
		if ((m->clienturls[m->n_clienturls++] = xstrdup(src->clienturls[i])) == NULL) {
			member_free(m);
			return NULL;
		}
	return m;
}

static void list_free(Etcdserverpb__MemberListResponse *l)
{
	if (l == NULL)
		return;
	for (size_t i = 0; i < l->n_members; i++)
		member_free(l->members[i]);
	free(l->members);
	free(l);
}

static Etcdserverpb__MemberListResponse *list_new(void)
{
	Etcdserverpb__MemberListResponse *l = calloc(1, sizeof(*l));
	if (l)
		etcdserverpb__member_list_response__init(l);
	return l;
}

/* Adds m keeping the list in id order, the order etcd lists members in. */
static int list_add(Etcdserverpb__MemberListResponse *l, Etcdserverpb__Member *m)
{
	Etcdserverpb__Member **ms = realloc(l->members, (l->n_members + 1) * sizeof(*ms));
	if (ms == NULL)
		return -1;
	l->members = ms;
	size_t i = l->n_members;
	while (i > 0 && ms[i - 1]->id > m->id) {
		ms[i] = ms[i - 1];
		i--;
	}
	ms[i] = m;
	l->n_members++;
	return 0;
}

/* etcd's --strict-reconfig-check: would the voters after a change still have a quorum among
 * the members this one reaches? delta_add: a new voter (not reachable yet); remove: a voter
 * leaving. */
static int reconfig_keeps_quorum(server_ctx *sc, uint64_t adding, uint64_t removing)
{
	members *ms = sc->members;
	size_t voters = 0, active = 0;
	pthread_mutex_lock(&ms->m_mu);
	for (size_t i = 0; i < ms->m_list->n_members; i++) {
		Etcdserverpb__Member *m = ms->m_list->members[i];
		if (m->islearner || m->id == removing)
			continue;
		voters++;
		if (m->id == sc->mi.member_id || node_peer_active(sc->nd, m->id))
			active++;
	}
	pthread_mutex_unlock(&ms->m_mu);
	if (adding)
		voters++;
	return active >= voters / 2 + 1;
}

static Etcdserverpb__Member *list_find(const Etcdserverpb__MemberListResponse *l, uint64_t id)
{
	for (size_t i = 0; i < l->n_members; i++)
		if (l->members[i]->id == id)
			return l->members[i];
	return NULL;
}

/* Unpacked lists are owned by protobuf-c; copy into one we can edit field by field. */
static Etcdserverpb__MemberListResponse *list_from_bytes(const void *buf, size_t len)
{
	Etcdserverpb__MemberListResponse *u = etcdserverpb__member_list_response__unpack(NULL, len, buf);
	if (u == NULL)
		return NULL;
	Etcdserverpb__MemberListResponse *l = list_new();
	for (size_t i = 0; l && i < u->n_members; i++) {
		Etcdserverpb__Member *m = member_dup(u->members[i]);
		if (m == NULL || list_add(l, m) != 0) {
			member_free(m);
			list_free(l);
			l = NULL;
		}
	}
	etcdserverpb__member_list_response__free_unpacked(u, NULL);
	return l;
}

static int persist(members *ms, storage_batch *b)
{
	Etcdserverpb__ResponseHeader *h = ms->m_list->header;
	ms->m_list->header = NULL;
	size_t len = etcdserverpb__member_list_response__get_packed_size(ms->m_list);
	uint8_t *buf = malloc(len ? len : 1);
	if (buf == NULL) {
		ms->m_list->header = h;
		return STORAGE_ERR_NOMEM;
	}
	etcdserverpb__member_list_response__pack(ms->m_list, buf);
	ms->m_list->header = h;
	int rc = storage_batch_meta_put(b, MEMBERS_META, buf, len);
	free(buf);
	return rc;
}

int members_start(members **out, const config *cfg, storage *st, uint64_t self, const remote_members *remote)
{
	members *ms = calloc(1, sizeof(*ms));
	if (ms == NULL)
		return STORAGE_ERR_NOMEM;
	pthread_mutex_init(&ms->m_mu, NULL);
	ms->m_self = self;
	storage_reader *r;
	storage_arena a;
	storage_arena_init(&a);
	int rc = storage_read_begin(st, &r);
	if (rc == 0) {
		void *val;
		size_t len;
		rc = storage_read_meta(r, MEMBERS_META, &a, &val, &len);
		if (rc == 0 && (ms->m_list = list_from_bytes(val, len)) == NULL)
			rc = STORAGE_ERR_CORRUPT;
		void *rv;
		size_t rlen;
		int rrc = storage_read_meta(r, MEMBERS_REMOVED_META, &a, &rv, &rlen);
		if (rrc == 0 && rlen % 8 == 0 && rlen > 0) {
			if ((ms->m_removed = malloc(rlen)) == NULL) {
				rc = STORAGE_ERR_NOMEM;
			} else {
				memcpy(ms->m_removed, rv, rlen);
				ms->m_nremoved = rlen / 8;
			}
		} else if (rrc != 0 && rrc != STORAGE_ERR_NOT_FOUND && (rc == 0 || rc == STORAGE_ERR_NOT_FOUND)) {
			rc = rrc;
		}
		storage_read_end(r);
	}
	storage_arena_free(&a);
	if (rc == STORAGE_ERR_NOT_FOUND) {
		/* A new member: the cluster is the one a running member gave us (joining), else
		 * --initial-cluster. */
		identity_cluster ids;
		memset(&ids, 0, sizeof(ids));
		if (remote != NULL) {
			ids.ic_n = remote->rm_n;
			for (int i = 0; i < remote->rm_n; i++) {
				ids.ic_id[i] = remote->rm_id[i];
				ids.ic_name[i] = remote->rm_name[i];
				ids.ic_n_urls[i] = remote->rm_n_urls[i];
				memcpy(ids.ic_urls[i], remote->rm_urls[i], sizeof(ids.ic_urls[i]));
			}
			rc = 0;
		} else {
			rc = identity_parse(&ids, cfg->initial_cluster, cfg->initial_cluster_token, NULL, 0);
		}
		if (rc == 0) {
			ms->m_list = list_new();
			rc = ms->m_list ? 0 : STORAGE_ERR_NOMEM;
		}
		for (int i = 0; rc == 0 && i < ids.ic_n; i++) {
			Etcdserverpb__Member tmpl = ETCDSERVERPB__MEMBER__INIT;
			tmpl.id = ids.ic_id[i];
			tmpl.name = ids.ic_name[i];
			tmpl.n_peerurls = (size_t)ids.ic_n_urls[i];
			tmpl.peerurls = ids.ic_urls[i];
			tmpl.islearner = remote != NULL && remote->rm_learner[i];
			if (ids.ic_id[i] == self) {
				tmpl.n_clienturls = (size_t)cfg->advertise_client.n;
				tmpl.clienturls = (char **)cfg->advertise_client.url;
			}
			Etcdserverpb__Member *m = member_dup(&tmpl);
			if (m == NULL || list_add(ms->m_list, m) != 0) {
				member_free(m);
				rc = STORAGE_ERR_NOMEM;
			}
		}
		identity_free(&ids);
		storage_batch *b;
		if (rc == 0 && (rc = storage_batch_begin(st, &b)) == 0) {
			storage_stats stats;
			rc = storage_stat(st, &stats);
			if (rc == 0)
				rc = persist(ms, b);
			if (rc == 0)
				rc = storage_batch_commit(b, stats.st_applied_index);
			else
				storage_batch_abort(b);
		}
	}
	if (rc) {
		members_free(ms);
		return rc;
	}
	*out = ms;
	return 0;
}

void members_free(members *ms)
{
	if (ms == NULL)
		return;
	list_free(ms->m_list);
	free(ms->m_removed);
	pthread_mutex_destroy(&ms->m_mu);
	free(ms);
}

int members_reload(members *ms, const config *cfg, storage *st)
{
	members *fresh;
	int rc = members_start(&fresh, cfg, st, ms->m_self, NULL);
	if (rc)
		return rc;
	pthread_mutex_lock(&ms->m_mu);
	Etcdserverpb__MemberListResponse *old = ms->m_list;
	ms->m_list = fresh->m_list;
	uint8_t *old_removed = ms->m_removed;
	ms->m_removed = fresh->m_removed;
	ms->m_nremoved = fresh->m_nremoved;
	pthread_mutex_unlock(&ms->m_mu);
	fresh->m_list = old;
	fresh->m_removed = old_removed;
	members_free(fresh);
	return 0;
}

size_t members_peers(members *ms, uint64_t *ids, char (*urls)[256], int *learner, size_t max)
{
	size_t n = 0;
	pthread_mutex_lock(&ms->m_mu);
	for (size_t i = 0; i < ms->m_list->n_members && n < max; i++) {
		Etcdserverpb__Member *m = ms->m_list->members[i];
		ids[n] = m->id;
		learner[n] = m->islearner;
		urls[n][0] = '\0';
		char hp[240];
		/* "scheme://host:port": the peer transport dials in the URL's scheme. */
		if (m->n_peerurls > 0 && config_url_host_port(m->peerurls[0], hp, sizeof(hp)) == 0)
			snprintf(urls[n], 256, "%s://%s", strncmp(m->peerurls[0], "https://", 8) == 0 ? "https" : "http", hp);
		n++;
	}
	pthread_mutex_unlock(&ms->m_mu);
	return n;
}

int members_apply(members *ms, storage_batch *b, node_op op, const Etcdserverpb__Member *req)
{
	pthread_mutex_lock(&ms->m_mu);
	int rc = 0;
	Etcdserverpb__Member *cur = list_find(ms->m_list, req->id);
	if (op == NODE_MEMBER_ADD && cur == NULL) {
		Etcdserverpb__Member *m = member_dup(req);
		if (m == NULL || list_add(ms->m_list, m) != 0) {
			member_free(m);
			rc = STORAGE_ERR_NOMEM;
		}
	} else if (op == NODE_MEMBER_ADD) {
		/* Known already (a joining member starts from --initial-cluster): the cluster's
		 * record wins, learner flag included. */
		cur->islearner = req->islearner;
	} else if (cur != NULL) {
		/* An update carries what changed: peer URLs (MemberUpdate) or a started member's
		 * name and client URLs (its publish). */
		Etcdserverpb__Member merged = *cur;
		if (req->n_peerurls) {
			merged.n_peerurls = req->n_peerurls;
			merged.peerurls = req->peerurls;
		}
		if (req->name && req->name[0])
			merged.name = req->name;
		if (req->n_clienturls) {
			merged.n_clienturls = req->n_clienturls;
			merged.clienturls = req->clienturls;
		}
		Etcdserverpb__Member *m = member_dup(&merged);
		if (m == NULL) {
			rc = STORAGE_ERR_NOMEM;
		} else {
			for (size_t i = 0; i < ms->m_list->n_members; i++)
				if (ms->m_list->members[i] == cur)
					ms->m_list->members[i] = m;
			member_free(cur);
		}
	}
	if (rc == 0)
		rc = persist(ms, b);
	pthread_mutex_unlock(&ms->m_mu);
	return rc;
}

int members_conf_changed(members *ms, storage_batch *b, int op, uint64_t id)
{
	pthread_mutex_lock(&ms->m_mu);
	Etcdserverpb__Member *cur = list_find(ms->m_list, id);
	if (cur) {
		if (op == MEMBERS_REMOVE) {
			for (size_t i = 0; i < ms->m_list->n_members; i++) {
				if (ms->m_list->members[i] == cur) {
					memmove(&ms->m_list->members[i], &ms->m_list->members[i + 1],
						(ms->m_list->n_members - i - 1) * sizeof(cur));
					ms->m_list->n_members--;
					break;
				}
			}
			member_free(cur);
		} else if (op == MEMBERS_PROMOTE) {
			cur->islearner = 0;
		}
	}
	int rc = persist(ms, b);
	if (rc == 0 && op == MEMBERS_REMOVE)
		rc = note_removed(ms, b, id);
	pthread_mutex_unlock(&ms->m_mu);
	return rc;
}

int members_exists(members *ms, uint64_t id, int *learner)
{
	pthread_mutex_lock(&ms->m_mu);
	Etcdserverpb__Member *m = list_find(ms->m_list, id);
	if (m && learner)
		*learner = m->islearner;
	pthread_mutex_unlock(&ms->m_mu);
	return m != NULL;
}

/* ---- the Cluster service ---- */

static void cluster_member_list(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	members *ms = sc->members;
	Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
	server_fill_header(sc, &h);
	pthread_mutex_lock(&ms->m_mu);
	Etcdserverpb__MemberListResponse resp = *ms->m_list;
	resp.header = &h;
	api_call_reply(call, &resp.base);
	pthread_mutex_unlock(&ms->m_mu);
}

/* A new member's id, as etcd's MemberAdd (membership.NewMember with the time): sha1 of its
 * sorted peer URLs, an empty cluster name and the Unix time in seconds. The time makes a
 * member re-added at a removed member's peer URLs a new member: the joiner asks the running
 * members for its id (main.c, member_id_from_peers) instead of deriving it. An id still in
 * the list or removed (the same URLs added, or added and removed, within a second) moves on
 * to the next second: as etcd, a removed id never comes back. */
static uint64_t new_member_id(members *ms, char **urls, size_t n)
{
	long long now = (long long)time(NULL);
	for (int tries = 0;; tries++) {
		char secs[32];
		snprintf(secs, sizeof(secs), "%lld", now + tries);
		uint64_t id = identity_member_id(urls, (int)(n < IDENTITY_MAX_URLS ? n : IDENTITY_MAX_URLS), secs);
		pthread_mutex_lock(&ms->m_mu);
		int taken = list_find(ms->m_list, id) != NULL || was_removed(ms, id);
		pthread_mutex_unlock(&ms->m_mu);
		if (id == 0 || tries == 16 || !taken)
			return id;
	}
}

static void cluster_member_add(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	if (!call_admitted(sc, call, 1, 1))
		return;
	Etcdserverpb__MemberAddRequest *req = (Etcdserverpb__MemberAddRequest *)msg;
	if (req->n_peerurls == 0) {
		api_call_fail_msg(call, 3 /* INVALID_ARGUMENT */, "etcdserver: member peer urls not provided");
		return;
	}
	for (size_t i = 0; i < req->n_peerurls; i++) {
		char hp[256];
		if (config_url_host_port(req->peerurls[i], hp, sizeof(hp)) != 0) {
			api_call_fail_msg(call, 3, "etcdserver: member peer urls are invalid");
			return;
		}
	}
	/* etcd refuses a peer URL another member already has. */
	members *ms = sc->members;
	pthread_mutex_lock(&ms->m_mu);
	for (size_t i = 0; i < ms->m_list->n_members; i++)
		for (size_t j = 0; j < ms->m_list->members[i]->n_peerurls; j++)
			for (size_t k = 0; k < req->n_peerurls; k++)
				if (strcmp(ms->m_list->members[i]->peerurls[j], req->peerurls[k]) == 0) {
					pthread_mutex_unlock(&ms->m_mu);
					api_call_fail_msg(call, 9 /* FAILED_PRECONDITION */,
							  "etcdserver: Peer URLs already exists");
					return;
				}
	pthread_mutex_unlock(&ms->m_mu);
	uint64_t id = new_member_id(sc->members, req->peerurls, req->n_peerurls);
	if (id == 0) {
		api_call_fail_msg(call, 8 /* RESOURCE_EXHAUSTED */, "etcdserver: out of memory");
		return;
	}
	if (!req->islearner && !reconfig_keeps_quorum(sc, id, 0)) {
		api_call_fail_msg(call, 14 /* UNAVAILABLE */, "etcdserver: unhealthy cluster");
		return;
	}
	node_member_change(sc->nd, NODE_MEMBER_ADD, call, id,
			   req->islearner, req->peerurls, req->n_peerurls);
}

static void cluster_member_remove(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	if (!call_admitted(sc, call, 1, 1))
		return;
	const Etcdserverpb__MemberRemoveRequest *req = (const Etcdserverpb__MemberRemoveRequest *)msg;
	if (!members_exists(sc->members, req->id, NULL)) {
		api_call_fail_msg(call, 5 /* NOT_FOUND */, "etcdserver: member not found");
		return;
	}
	int learner = 0;
	members_exists(sc->members, req->id, &learner);
	if (!learner && !reconfig_keeps_quorum(sc, 0, req->id)) {
		api_call_fail_msg(call, 14, "etcdserver: unhealthy cluster");
		return;
	}
	node_member_change(sc->nd, NODE_MEMBER_REMOVE, call, req->id, 0, NULL, 0);
}

static void cluster_member_promote(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	if (!call_admitted(sc, call, 1, 1))
		return;
	const Etcdserverpb__MemberPromoteRequest *req = (const Etcdserverpb__MemberPromoteRequest *)msg;
	int learner = 0;
	if (!members_exists(sc->members, req->id, &learner)) {
		api_call_fail_msg(call, 5, "etcdserver: member not found");
		return;
	}
	if (!learner) {
		api_call_fail_msg(call, 9, "etcdserver: can only promote a learner member");
		return;
	}
	if (!reconfig_keeps_quorum(sc, req->id, 0)) {
		api_call_fail_msg(call, 14, "etcdserver: unhealthy cluster");
		return;
	}
	node_member_change(sc->nd, NODE_MEMBER_PROMOTE, call, req->id, 0, NULL, 0);
}

static void cluster_member_update(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	if (!call_admitted(sc, call, 1, 1))
		return;
	Etcdserverpb__MemberUpdateRequest *req = (Etcdserverpb__MemberUpdateRequest *)msg;
	if (!members_exists(sc->members, req->id, NULL)) {
		api_call_fail_msg(call, 5, "etcdserver: member not found");
		return;
	}
	node_member_change(sc->nd, NODE_MEMBER_UPDATE, call, req->id, 0, req->peerurls, req->n_peerurls);
}

int members_register(api_server *as, server_ctx *sc)
{
	static const struct {
		const char *path;
		api_unary_fn fn;
	} routes[] = {
		{"/etcdserverpb.Cluster/MemberList", cluster_member_list},
		{"/etcdserverpb.Cluster/MemberAdd", cluster_member_add},
		{"/etcdserverpb.Cluster/MemberRemove", cluster_member_remove},
		{"/etcdserverpb.Cluster/MemberPromote", cluster_member_promote},
		{"/etcdserverpb.Cluster/MemberUpdate", cluster_member_update},
	};
	for (size_t i = 0; i < sizeof(routes) / sizeof(routes[0]); i++) {
		int rc = api_server_route(as, routes[i].path, routes[i].fn, sc);
		if (rc)
			return rc;
	}
	return 0;
}

size_t members_export(members *ms, storage_etcd_member *out, size_t max, storage_arena *a)
{
	size_t n = 0;
	pthread_mutex_lock(&ms->m_mu);
	for (size_t i = 0; i < ms->m_list->n_members && n < max; i++) {
		Etcdserverpb__Member *m = ms->m_list->members[i];
		const char **peers = storage_arena_alloc(a, (m->n_peerurls + 1) * sizeof(char *));
		const char **clients = storage_arena_alloc(a, (m->n_clienturls + 1) * sizeof(char *));
		char *name = storage_arena_dup(a, m->name, strlen(m->name) + 1);
		if (peers == NULL || clients == NULL || name == NULL)
			break;
		for (size_t k = 0; k < m->n_peerurls; k++)
			peers[k] = storage_arena_dup(a, m->peerurls[k], strlen(m->peerurls[k]) + 1);
		for (size_t k = 0; k < m->n_clienturls; k++)
			clients[k] = storage_arena_dup(a, m->clienturls[k], strlen(m->clienturls[k]) + 1);
		out[n++] = (storage_etcd_member){m->id, name, peers, m->n_peerurls, clients, m->n_clienturls,
						 m->islearner};
	}
	pthread_mutex_unlock(&ms->m_mu);
	return n;
}

void members_reply(members *ms, api_call *call, node_op op, Etcdserverpb__ResponseHeader *h,
		   Etcdserverpb__Member *added)
{
	/* etcd's answers carry the member list after the change (etcdctl prints it). */
	pthread_mutex_lock(&ms->m_mu);
	if (op == NODE_MEMBER_ADD) {
		Etcdserverpb__MemberAddResponse resp = ETCDSERVERPB__MEMBER_ADD_RESPONSE__INIT;
		resp.header = h;
		resp.member = added;
		resp.members = ms->m_list->members;
		resp.n_members = ms->m_list->n_members;
		api_call_reply(call, &resp.base);
	} else if (op == NODE_MEMBER_REMOVE) {
		Etcdserverpb__MemberRemoveResponse resp = ETCDSERVERPB__MEMBER_REMOVE_RESPONSE__INIT;
		resp.header = h;
		resp.members = ms->m_list->members;
		resp.n_members = ms->m_list->n_members;
		api_call_reply(call, &resp.base);
	} else if (op == NODE_MEMBER_PROMOTE) {
		Etcdserverpb__MemberPromoteResponse resp = ETCDSERVERPB__MEMBER_PROMOTE_RESPONSE__INIT;
		resp.header = h;
		resp.members = ms->m_list->members;
		resp.n_members = ms->m_list->n_members;
		api_call_reply(call, &resp.base);
	} else {
		Etcdserverpb__MemberUpdateResponse resp = ETCDSERVERPB__MEMBER_UPDATE_RESPONSE__INIT;
		resp.header = h;
		resp.members = ms->m_list->members;
		resp.n_members = ms->m_list->n_members;
		api_call_reply(call, &resp.base);
	}
	pthread_mutex_unlock(&ms->m_mu);
}

/* ---- etcd's GET /members on the peer port ---- */

/* s as a JSON string into buf (at *off, growing it). 0, or -1 out of memory. */
static int json_str(char **buf, size_t *off, size_t *cap, const char *s)
{
	size_t need = *off + 6 * strlen(s) + 3;
	if (need > *cap) {
		size_t nc = need * 2;
		char *nb = realloc(*buf, nc);
		if (nb == NULL)
			return -1;
		*buf = nb;
		*cap = nc;
	}
	char *p = *buf + *off;
	*p++ = '"';
	for (const unsigned char *c = (const unsigned char *)s; *c != '\0'; c++) {
		if (*c == '"' || *c == '\\') {
			*p++ = '\\';
			*p++ = (char)*c;
		} else if (*c < 0x20) {
			p += sprintf(p, "\\u%04x", *c);
		} else {
			*p++ = (char)*c;
		}
	}
	*p++ = '"';
	*off = (size_t)(p - *buf);
	return 0;
}

static int json_raw(char **buf, size_t *off, size_t *cap, const char *s)
{
	size_t n = strlen(s);
	if (*off + n + 1 > *cap) {
		size_t nc = (*off + n + 1) * 2;
		char *nb = realloc(*buf, nc);
		if (nb == NULL)
			return -1;
		*buf = nb;
		*cap = nc;
	}
	memcpy(*buf + *off, s, n + 1);
	*off += n;
	return 0;
}

char *members_json(members *ms, size_t *len)
{
	size_t off = 0, cap = 256;
	char *buf = malloc(cap);
	int rc = buf == NULL ? -1 : 0;
	pthread_mutex_lock(&ms->m_mu);
	if (rc == 0)
		rc = json_raw(&buf, &off, &cap, "[");
	for (size_t i = 0; rc == 0 && i < ms->m_list->n_members; i++) {
		const Etcdserverpb__Member *m = ms->m_list->members[i];
		char num[64];
		/* etcd's membership.Member: the id is a JSON number (types.ID is a uint64). */
		snprintf(num, sizeof(num), "%s{\"id\":%llu,\"peerURLs\":[", i ? "," : "", (unsigned long long)m->id);
		rc = json_raw(&buf, &off, &cap, num);
		for (size_t j = 0; rc == 0 && j < m->n_peerurls; j++) {
			if (j)
				rc = json_raw(&buf, &off, &cap, ",");
			if (rc == 0)
				rc = json_str(&buf, &off, &cap, m->peerurls[j]);
		}
		if (rc == 0)
			rc = json_raw(&buf, &off, &cap, "]");
		if (rc == 0 && m->islearner)
			rc = json_raw(&buf, &off, &cap, ",\"isLearner\":true");
		if (rc == 0 && m->name != NULL && m->name[0] != '\0') {
			rc = json_raw(&buf, &off, &cap, ",\"name\":");
			if (rc == 0)
				rc = json_str(&buf, &off, &cap, m->name);
		}
		if (rc == 0 && m->n_clienturls > 0) {
			rc = json_raw(&buf, &off, &cap, ",\"clientURLs\":[");
			for (size_t j = 0; rc == 0 && j < m->n_clienturls; j++) {
				if (j)
					rc = json_raw(&buf, &off, &cap, ",");
				if (rc == 0)
					rc = json_str(&buf, &off, &cap, m->clienturls[j]);
			}
			if (rc == 0)
				rc = json_raw(&buf, &off, &cap, "]");
		}
		if (rc == 0)
			rc = json_raw(&buf, &off, &cap, "}");
	}
	pthread_mutex_unlock(&ms->m_mu);
	/* json.Encoder ends the value with a newline. */
	if (rc == 0)
		rc = json_raw(&buf, &off, &cap, "]\n");
	if (rc != 0) {
		free(buf);
		return NULL;
	}
	*len = off;
	return buf;
}
