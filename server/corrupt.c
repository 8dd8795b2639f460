/*
 * corrupt.c - etcd's corruption checks (etcdserver/corrupt.go of etcd 3.4).
 *
 * Members that applied the same history hold the same HashKV at every revision, so a member
 * whose data went bad on disk shows up as a hash that differs from its peers' at the same
 * revision and the same compacted revision.
 *
 * - The initial check (--experimental-initial-corrupt-check) runs before the member serves
 *   any client: it asks every peer for HashKV at this member's revision and refuses to start
 *   on a mismatch ("<id> found data inconsistency with peers"). Peers that do not answer
 *   are logged and skipped, as etcd does.
 * - The periodic check (--experimental-corrupt-check-time) runs on its own thread: every
 *   interval the leader hashes its store, asks every follower for HashKV at that revision,
 *   and raises the CORRUPT alarm through Raft for a member that differs (etcd's rules in
 *   check_hash_kv()). With CORRUPT active every member refuses writes with
 *   "etcdserver: corrupt cluster" (apply.c).
 *
 * etcd 3.4 asks its peers over the peer transport (/members/hashkv on the peer URLs), so
 * the check needs no client credentials and works with auth on; Keelson asks over the
 * peer transport's request channel (node_ask, NODE_ASK_HASHKV), every peer at once, each
 * bounded by etcd's request timeout. The initial check therefore runs once the node (and
 * its transport) started, before any client is served.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/prctl.h>

#include "server/server.h"

/* The gRPC status codes etcd's errors carry here. */
#define GRPC_CODE_OUT_OF_RANGE 11

typedef struct hash_wait hash_wait;

/* One peer's answer to HashKV (etcd's peerHashKVResp). */
typedef struct peer_hash {
	uint64_t ph_id;          /* the member asked */
	char ph_url[256];        /* its peer URL (for the logs) */
	int ph_ok;               /* 1: the fields below hold the answer */
	int ph_code;             /* failed: the gRPC status, -1 if no status came back */
	char ph_err[256];        /* failed: why */
	uint64_t ph_member;      /* header.member_id of the answer */
	int64_t ph_revision;     /* header.revision of the answer */
	int64_t ph_compact_rev;
	uint32_t ph_hash;
	hash_wait *ph_wait;
} peer_hash;

/* The questions of one round, answered on the node loop while the asker waits. */
struct hash_wait {
	pthread_mutex_t hw_mu;
	pthread_cond_t hw_cv;
	size_t hw_left;
};

int corrupt_serve_hash_kv(server_ctx *sc, const uint8_t *body, size_t len, uint8_t **out, size_t *outlen)
{
	*out = NULL;
	*outlen = 0;
	Etcdserverpb__HashKVRequest *req = etcdserverpb__hash_kvrequest__unpack(NULL, len, body);
	if (req == NULL)
		return NODE_ANS_BAD_REQUEST;
	int64_t want = req->revision;
	etcdserverpb__hash_kvrequest__free_unpacked(req, NULL);
	storage_reader *r;
	int rc = storage_read_begin(sc->st, &r);
	if (rc)
		return node_ans_error(rc, out, outlen);
	Etcdserverpb__HashKVResponse resp = ETCDSERVERPB__HASH_KVRESPONSE__INIT;
	Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
	rc = storage_hash_kv(r, want, &resp.hash, &resp.hash_revision, &resp.compact_revision);
	int64_t current = storage_current_revision(sc->st);
	storage_read_end(r);
	if (rc)
		return node_ans_error(rc, out, outlen);
	/* As Maintenance.HashKV: the header carries the store's current revision. */
	server_fill_header(sc, &h);
	h.revision = want == 0 || current < resp.hash_revision ? resp.hash_revision : current;
	resp.header = &h;
	size_t n = etcdserverpb__hash_kvresponse__get_packed_size(&resp);
	*out = malloc(n ? n : 1);
	if (*out == NULL)
		return node_ans_error(STORAGE_ERR_NOMEM, out, outlen);
	*outlen = etcdserverpb__hash_kvresponse__pack(&resp, *out);
	return NODE_ANS_OK;
}

/* A peer's answer (on the node loop): fills its peer_hash and counts it done. */
static void hash_answered(void *ctx, int status, const uint8_t *body, size_t len)
{
	peer_hash *p = ctx;
	p->ph_ok = 0;
	p->ph_code = -1;
	if (status == NODE_ANS_OK) {
		Etcdserverpb__HashKVResponse *m = etcdserverpb__hash_kvresponse__unpack(NULL, len, body);
		if (m == NULL) {
			snprintf(p->ph_err, sizeof(p->ph_err), "the response did not decode");
		} else {
			p->ph_ok = 1;
			p->ph_code = 0;
			p->ph_hash = m->hash;
			p->ph_compact_rev = m->compact_revision;
			p->ph_member = m->header ? m->header->member_id : 0;
			p->ph_revision = m->header ? m->header->revision : 0;
			etcdserverpb__hash_kvresponse__free_unpacked(m, NULL);
		}
	} else if (status == NODE_ANS_ERROR) {
		char msg[200];
		int code = node_ans_error_decode(body, len, msg, sizeof(msg));
		if (code < 0)
			snprintf(msg, sizeof(msg), "a malformed error");
		p->ph_code = code;
		snprintf(p->ph_err, sizeof(p->ph_err), "rpc error: code = %d desc = %s", code, msg);
	} else {
		snprintf(p->ph_err, sizeof(p->ph_err), "%s",
			 status == NODE_ASK_ETIMEDOUT ? "etcdserver: request timed out"
			 : status == NODE_ASK_ESTOPPED ? "etcdserver: server stopped"
			 : status == NODE_ASK_EUNREACHABLE ? "the member cannot be reached"
							   : "the member did not understand the request");
	}
	hash_wait *w = p->ph_wait;
	pthread_mutex_lock(&w->hw_mu);
	w->hw_left--;
	pthread_cond_signal(&w->hw_cv);
	pthread_mutex_unlock(&w->hw_mu);
}

/*
 * etcd's getPeerHashKVs: HashKV at rev from every other member, over the peer transport.
 * Fills up to max entries of out; returns how many. Blocks until each answered or timed
 * out (etcd's request timeout); call it off the node loop.
 */
static size_t peer_hash_kvs(server_ctx *sc, int64_t rev, peer_hash *out, size_t max)
{
	storage_etcd_member ms[MEMBER_LIST_MAX];
	storage_arena a;
	storage_arena_init(&a);
	size_t nm = members_export(sc->members, ms, MEMBER_LIST_MAX, &a);
	hash_wait w;
	pthread_mutex_init(&w.hw_mu, NULL);
	pthread_cond_init(&w.hw_cv, NULL);
	w.hw_left = 0;
	Etcdserverpb__HashKVRequest req = ETCDSERVERPB__HASH_KVREQUEST__INIT;
	req.revision = rev;
	uint8_t buf[32];
	size_t blen = etcdserverpb__hash_kvrequest__pack(&req, buf);
	size_t n = 0;
	for (size_t i = 0; i < nm && n < max; i++) {
		if (ms[i].em_id == sc->mi.member_id)
			continue;
		peer_hash *p = &out[n++];
		memset(p, 0, sizeof(*p));
		p->ph_id = ms[i].em_id;
		p->ph_wait = &w;
		snprintf(p->ph_url, sizeof(p->ph_url), "%s", ms[i].em_n_peer_urls ? ms[i].em_peer_urls[0] : "");
	}
	storage_arena_free(&a);
	pthread_mutex_lock(&w.hw_mu);
	w.hw_left = n;
	pthread_mutex_unlock(&w.hw_mu);
	for (size_t i = 0; i < n; i++)
		node_ask(sc->nd, out[i].ph_id, NODE_ASK_HASHKV, buf, blen, 0, hash_answered, &out[i]);
	/* Each question ends exactly once (answer, timeout or stop): this wait ends. */
	pthread_mutex_lock(&w.hw_mu);
	while (w.hw_left > 0)
		pthread_cond_wait(&w.hw_cv, &w.hw_mu);
	pthread_mutex_unlock(&w.hw_mu);
	pthread_cond_destroy(&w.hw_cv);
	pthread_mutex_destroy(&w.hw_mu);

	char local[32], rs[32], pid[32];
	snprintf(local, sizeof(local), "%" PRIx64, sc->mi.member_id);
	snprintf(rs, sizeof(rs), "%" PRId64, rev);
	for (size_t i = 0; i < n; i++) {
		if (out[i].ph_ok)
			continue;
		snprintf(pid, sizeof(pid), "%" PRIx64, out[i].ph_id);
		log_at(LOG_WARN, "failed hash kv request", "local-member-id", local, "requested-revision", rs,
		       "remote-peer-id", pid, "remote-peer-endpoint", out[i].ph_url, "error", out[i].ph_err, NULL);
	}
	return n;
}

/* This member's HashKV at its current revision: hash, revision and compacted revision
 * (-1 if never compacted, as etcd). */
static int local_hash(server_ctx *sc, uint32_t *hash, int64_t *rev, int64_t *compact_rev)
{
	storage_reader *r;
	int rc = storage_read_begin(sc->st, &r);
	if (rc)
		return rc;
	rc = storage_hash_kv(r, 0, hash, rev, compact_rev);
	storage_read_end(r);
	return rc;
}

int corrupt_check_initial(server_ctx *sc)
{
	char local[32], timeout[32];
	snprintf(local, sizeof(local), "%" PRIx64, sc->mi.member_id);
	snprintf(timeout, sizeof(timeout), "%" PRIu64 "ms", node_request_timeout_ms(sc->nd));
	log_at(LOG_INFO, "starting initial corruption check", "local-member-id", local, "timeout", timeout, NULL);

	uint32_t h;
	int64_t rev, crev;
	int rc = local_hash(sc, &h, &rev, &crev);
	if (rc) {
		char err[160];
		snprintf(err, sizeof(err), "%s failed to fetch hash (%s)", local, storage_strerror(rc));
		log_at(LOG_FATAL, "discovery failed", "error", err, NULL);
		return -1;
	}
	peer_hash peers[MEMBER_LIST_MAX];
	size_t n = peer_hash_kvs(sc, rev, peers, MEMBER_LIST_MAX);

	int mismatch = 0;
	for (size_t i = 0; i < n; i++) {
		peer_hash *p = &peers[i];
		char lrev[32], lcrev[32], lh[16], pid[32], prev[32], pcrev[32], ph[16];
		snprintf(lrev, sizeof(lrev), "%" PRId64, rev);
		snprintf(lcrev, sizeof(lcrev), "%" PRId64, crev);
		snprintf(lh, sizeof(lh), "%" PRIu32, h);
		if (p->ph_ok) {
			if (p->ph_hash == h)
				continue;
			snprintf(pid, sizeof(pid), "%" PRIx64, p->ph_member);
			snprintf(prev, sizeof(prev), "%" PRId64, p->ph_revision);
			snprintf(pcrev, sizeof(pcrev), "%" PRId64, p->ph_compact_rev);
			snprintf(ph, sizeof(ph), "%" PRIu32, p->ph_hash);
			/* Only the same compacted revision makes the hashes comparable. */
			int same = p->ph_compact_rev == crev;
			mismatch += same;
			log_at(LOG_WARN,
			       same ? "found different hash values from remote peer"
				    : "found different compact revision values from remote peer",
			       "local-member-id", local, "local-member-revision", lrev, "local-member-compact-revision",
			       lcrev, "local-member-hash", lh, "remote-peer-id", pid, "remote-peer-endpoints", p->ph_url,
			       "remote-peer-revision", prev, "remote-peer-compact-revision", pcrev, "remote-peer-hash",
			       ph, NULL);
			continue;
		}
		snprintf(pid, sizeof(pid), "%" PRIx64, p->ph_id);
		if (p->ph_code == GRPC_CODE_OUT_OF_RANGE && strstr(p->ph_err, "future revision"))
			log_at(LOG_WARN, "cannot fetch hash from slow remote peer", "local-member-id", local,
			       "local-member-revision", lrev, "remote-peer-id", pid, "remote-peer-endpoints",
			       p->ph_url, "error", p->ph_err, NULL);
		else if (p->ph_code == GRPC_CODE_OUT_OF_RANGE && strstr(p->ph_err, "compacted"))
			log_at(LOG_WARN, "cannot fetch hash from remote peer; local member is behind", "local-member-id",
			       local, "local-member-revision", lrev, "remote-peer-id", pid, "remote-peer-endpoints",
			       p->ph_url, "error", p->ph_err, NULL);
	}
	if (mismatch > 0) {
		char err[96];
		snprintf(err, sizeof(err), "%s found data inconsistency with peers", local);
		log_at(LOG_WARN, "checkInitialHashKV failed", "error", err, NULL);
		log_at(LOG_FATAL, "discovery failed", "error", err, NULL);
		return -1;
	}
	log_at(LOG_INFO, "initial corruption checking passed; no corruption", "local-member-id", local, NULL);
	return 0;
}

/* ---- the periodic check ---- */

struct corrupt_monitor {
	server_ctx *cm_sc;
	pthread_t cm_thread;
	pthread_mutex_t cm_mu;
	pthread_cond_t cm_cond; /* signalled by corrupt_monitor_stop() */
	int cm_stop;            /* under cm_mu */
};

static uint64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Sleeps up to ms or until stopped; returns whether the monitor is stopping. */
static int monitor_wait(corrupt_monitor *m, uint64_t ms)
{
	struct timespec until;
	clock_gettime(CLOCK_MONOTONIC, &until);
	until.tv_sec += (time_t)(ms / 1000);
	until.tv_nsec += (long)(ms % 1000) * 1000000L;
	if (until.tv_nsec >= 1000000000L) {
		until.tv_sec++;
		until.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&m->cm_mu);
	while (!m->cm_stop && pthread_cond_timedwait(&m->cm_cond, &m->cm_mu, &until) != ETIMEDOUT)
		;
	int stop = m->cm_stop;
	pthread_mutex_unlock(&m->cm_mu);
	return stop;
}

/*
 * etcd's linearizableReadNotify, for the leader: everything committed when the peers
 * answered is applied here. The leader's log holds every committed entry, so waiting for
 * its last index covers them. Returns 0, or -1 after etcd's request timeout or a stop.
 */
static int wait_applied(corrupt_monitor *m)
{
	server_ctx *sc = m->cm_sc;
	uint64_t target = node_last_index(sc->nd);
	uint64_t deadline = now_ms() + node_request_timeout_ms(sc->nd);
	while (node_applied_index(sc->nd) < target) {
		if (now_ms() >= deadline || node_leader(sc->nd) != sc->mi.member_id)
			return -1;
		if (monitor_wait(m, 10))
			return -1;
	}
	return 0;
}

/* Proposes CORRUPT for member id through Raft, as any other alarm. */
static void raise_corrupt(server_ctx *sc, uint64_t id)
{
	Etcdserverpb__AlarmRequest *req = malloc(sizeof(*req));
	if (req == NULL)
		return;
	etcdserverpb__alarm_request__init(req);
	req->action = ETCDSERVERPB__ALARM_REQUEST__ALARM_ACTION__ACTIVATE;
	req->memberid = id;
	req->alarm = ETCDSERVERPB__ALARM_TYPE__CORRUPT;
	/* No call: the node owns and frees req (the same internal path as NOSPACE). */
	node_submit(sc->nd, NODE_ALARM, NULL, &req->base);
}

/* etcd's checkHashKV, run by the leader. Returns 0, or -1 when the check could not run. */
static int check_hash_kv(corrupt_monitor *m)
{
	server_ctx *sc = m->cm_sc;
	uint32_t h, h2;
	int64_t rev, crev, rev2, crev2;
	int rc = local_hash(sc, &h, &rev, &crev);
	if (rc) {
		log_at(LOG_WARN, "failed to check hash KV", "error", storage_strerror(rc), NULL);
		return -1;
	}
	peer_hash peers[MEMBER_LIST_MAX];
	size_t n = peer_hash_kvs(sc, rev, peers, MEMBER_LIST_MAX);
	if (wait_applied(m) != 0) {
		log_at(LOG_WARN, "failed to check hash KV", "error", "etcdserver: request timed out", NULL);
		return -1;
	}
	rc = local_hash(sc, &h2, &rev2, &crev2);
	if (rc) {
		log_at(LOG_WARN, "failed to check hash KV", "error", storage_strerror(rc), NULL);
		return -1;
	}

	/* etcd raises at most one alarm a pass: the first member found at fault. */
	uint64_t culprit = 0;
	char a[32], b[32], c[32], d[32], id[32];
	if (h2 != h && rev2 == rev && crev == crev2) {
		/* The leader's own store changed under the same revision. */
		snprintf(a, sizeof(a), "%" PRId64, rev);
		snprintf(b, sizeof(b), "%" PRIu32, h);
		snprintf(c, sizeof(c), "%" PRIu32, h2);
		log_at(LOG_WARN, "found hash mismatch", "revision-1", a, "hash-1", b, "revision-2", a, "hash-2", c, NULL);
		culprit = sc->mi.member_id;
	}
	for (size_t i = 0; i < n && culprit == 0; i++) {
		peer_hash *p = &peers[i];
		if (!p->ph_ok)
			continue;
		if (p->ph_member == 0) /* an answer without a header: the member we asked */
			p->ph_member = p->ph_id;
		snprintf(id, sizeof(id), "%" PRIx64, p->ph_member);
		if (p->ph_revision > rev2) {
			/* A follower cannot be ahead of what the leader has applied. */
			snprintf(a, sizeof(a), "%" PRId64, rev2);
			snprintf(b, sizeof(b), "%" PRId64, p->ph_revision);
			log_at(LOG_WARN, "revision from follower must be less than or equal to leader's",
			       "leader-revision", a, "follower-revision", b, "follower-peer-id", id, NULL);
			culprit = p->ph_member;
		} else if (p->ph_compact_rev > crev2) {
			snprintf(a, sizeof(a), "%" PRId64, crev2);
			snprintf(b, sizeof(b), "%" PRId64, p->ph_compact_rev);
			log_at(LOG_WARN, "compact revision from follower must be less than or equal to leader's",
			       "leader-compact-revision", a, "follower-compact-revision", b, "follower-peer-id", id,
			       NULL);
			culprit = p->ph_member;
		} else if (p->ph_compact_rev == crev && p->ph_hash != h) {
			snprintf(a, sizeof(a), "%" PRId64, crev2);
			snprintf(b, sizeof(b), "%" PRIu32, h);
			snprintf(c, sizeof(c), "%" PRId64, p->ph_compact_rev);
			snprintf(d, sizeof(d), "%" PRIu32, p->ph_hash);
			log_at(LOG_WARN, "same compact revision then hashes must match", "leader-compact-revision", a,
			       "leader-hash", b, "follower-compact-revision", c, "follower-hash", d, "follower-peer-id",
			       id, NULL);
			culprit = p->ph_member;
		}
	}
	if (culprit != 0)
		raise_corrupt(sc, culprit);
	return 0;
}

static void *monitor_main(void *arg)
{
	prctl(PR_SET_NAME, "corrupt-check"); /* names the thread in top -H, perf, gdb */
	corrupt_monitor *m = arg;
	server_ctx *sc = m->cm_sc;
	while (!monitor_wait(m, sc->cfg->corrupt_check_ms)) {
		if (node_leader(sc->nd) != sc->mi.member_id)
			continue;
		check_hash_kv(m);
	}
	return NULL;
}

int corrupt_monitor_start(corrupt_monitor **out, server_ctx *sc)
{
	*out = NULL;
	if (sc->cfg->corrupt_check_ms == 0)
		return 0;
	corrupt_monitor *m = calloc(1, sizeof(*m));
	if (m == NULL)
		return STORAGE_ERR_NOMEM;
	m->cm_sc = sc;
	pthread_mutex_init(&m->cm_mu, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&m->cm_cond, &ca);
	pthread_condattr_destroy(&ca);
	if (pthread_create(&m->cm_thread, NULL, monitor_main, m) != 0) {
		pthread_cond_destroy(&m->cm_cond);
		pthread_mutex_destroy(&m->cm_mu);
		free(m);
		return STORAGE_ERR_NOMEM;
	}
	char local[32], interval[32];
	snprintf(local, sizeof(local), "%" PRIx64, sc->mi.member_id);
	snprintf(interval, sizeof(interval), "%" PRIu64 "ms", sc->cfg->corrupt_check_ms);
	log_at(LOG_INFO, "enabled corruption checking", "local-member-id", local, "interval", interval, NULL);
	*out = m;
	return 0;
}

void corrupt_monitor_stop(corrupt_monitor *m)
{
	if (m == NULL)
		return;
	pthread_mutex_lock(&m->cm_mu);
	m->cm_stop = 1;
	pthread_cond_signal(&m->cm_cond);
	pthread_mutex_unlock(&m->cm_mu);
	/* A check in progress ends within one request timeout per peer. */
	pthread_join(m->cm_thread, NULL);
	pthread_cond_destroy(&m->cm_cond);
	pthread_mutex_destroy(&m->cm_mu);
	free(m);
}
