/*
 * node.c - the node loop: the one thread that drives Raft and writes.
 *
 * gRPC threads queue requests and wake the loop with uv_async_send(). Each turn the loop
 * proposes everything queued to Raft, then processes Raft's Ready as raft.h orders it:
 * appends to followers go out first (the leader writes its log in parallel), then ONE storage
 * batch holds the new entries, the hard state and the apply of every newly committed entry
 * with the applied index, committed with one fsync (group commit), then the other messages
 * go out, watchers hear of the batch, and the proposers answer their clients.
 *
 * With a single voter an entry is committed as soon as it is durable, so the batch that
 * appends it applies it too (one transaction per write batch, not two).
 *
 * Entries are applied from their bytes by apply.c on every member; the member that proposed
 * an entry finds its waiting call by sequence number. Linearizable reads take a read index
 * (one round for every read that arrived meanwhile) and are served once applied reaches it.
 */
#include <pthread.h>
#include <signal.h>
#include <unistd.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <uv.h>
#include <sys/prctl.h>

#include "raft/codec.h"
#include "raft/raft.h"
#include "server/node_internal.h"

uint64_t node_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t now_ms(void)
{
	return node_now_ns() / 1000000;
}

const node_metrics *node_get_metrics(node *n)
{
	return &n->n_metrics;
}

uint64_t node_term(node *n)
{
	return atomic_load(&n->n_term);
}

uint64_t node_applied_index(node *n)
{
	return atomic_load(&n->n_applied);
}

uint64_t node_last_index(node *n)
{
	return atomic_load(&n->n_last_index);
}

uint64_t node_leader(node *n)
{
	return atomic_load(&n->n_lead);
}

int node_peer_active(node *n, uint64_t id)
{
	for (size_t i = 0; i < MEMBER_LIST_MAX; i++)
		if (atomic_load(&n->n_active[i]) == id)
			return 1;
	return 0;
}

int node_is_learner(node *n)
{
	return atomic_load(&n->n_learner);
}

int node_reads_need_index(node *n)
{
	return !atomic_load(&n->n_lone_voter);
}

void node_batch_stats(node *n, uint64_t *requests, uint64_t *commits)
{
	*requests = atomic_load(&n->n_stat_requests);
	*commits = atomic_load(&n->n_stat_commits);
}

void node_req_free(node_req *r)
{
	if (r->nr_ask)
		node_ask_abandon(r->nr_ask);
	if (r->nr_owns_msg && r->nr_msg)
		protobuf_c_message_free_unpacked((ProtobufCMessage *)r->nr_msg, NULL);
	for (size_t i = 0; i < r->nr_n_urls; i++)
		free(r->nr_urls[i]);
	free(r->nr_urls);
	free(r);
}

void node_req_fail(node_req *r, api_error e)
{
	if (r->nr_call)
		api_call_fail(r->nr_call, e);
	if (r->nr_done)
		r->nr_done(r->nr_done_arg, (int)e + 1);
	node_req_free(r);
}

void node_enqueue(node *n, node_req *r)
{
	pthread_mutex_lock(&n->n_mu);
	int stopping = n->n_stopping;
	if (!stopping)
		node_req_append(&n->n_head, &n->n_tail, r);
	pthread_mutex_unlock(&n->n_mu);
	if (stopping) {
		node_req_fail(r, API_ERR_STOPPED);
		return;
	}
	uv_async_send(&n->n_wake);
}

void node_submit(node *n, node_op op, api_call *call, const ProtobufCMessage *msg)
{
	node_req *r = calloc(1, sizeof(*r));
	if (r == NULL) {
		if (call)
			api_call_fail_msg(call, 8 /* RESOURCE_EXHAUSTED */, "keelson: out of memory");
		else if (msg)
			protobuf_c_message_free_unpacked((ProtobufCMessage *)msg, NULL);
		return;
	}
	r->nr_op = op;
	r->nr_call = call;
	r->nr_msg = msg;
	r->nr_owns_msg = call == NULL;
	node_enqueue(n, r);
}

void node_read_barrier(node *n, void (*done)(void *arg, int err), void *arg)
{
	node_req *r = calloc(1, sizeof(*r));
	if (r == NULL) {
		done(arg, API_ERR_INTERNAL + 1);
		return;
	}
	r->nr_op = NODE_READ_BARRIER;
	r->nr_done = done;
	r->nr_done_arg = arg;
	node_enqueue(n, r);
}

void node_member_change(node *n, node_op op, api_call *call, uint64_t id, int learner, char **urls,
			size_t n_urls)
{
	node_req *r = calloc(1, sizeof(*r));
	if (r == NULL) {
		api_call_fail_msg(call, 8, "keelson: out of memory");
		return;
	}
	r->nr_op = op;
	r->nr_call = call;
	r->nr_member = id;
	r->nr_learner = learner;
	if (n_urls) {
		r->nr_urls = calloc(n_urls, sizeof(char *));
		for (size_t i = 0; r->nr_urls && i < n_urls; i++)
			if ((r->nr_urls[r->nr_n_urls] = strdup(urls[i])) != NULL)
				r->nr_n_urls++;
	}
	node_enqueue(n, r);
}

/* ---- the peer transport's side ---- */

static void send_raft_message(node *n, const struct raft_message *m)
{
	size_t len = raft_codec_size(m) + 1;
	uint8_t stackbuf[4096];
	uint8_t *buf = len <= sizeof(stackbuf) ? stackbuf : malloc(len);
	if (buf == NULL)
		return;
	size_t used;
	buf[0] = FRAME_RAFT;
	if (raft_codec_encode(m, buf + 1, len - 1, &used) == 0) {
		int rc = peer_send(n->n_peers, m->to, buf, used + 1);
		if (rc == PEER_EFULL || rc == PEER_EUNKNOWN)
			raft_report_unreachable(n->n_raft, m->to);
	}
	if (buf != stackbuf)
		free(buf);
}

static void process_ready(node *n);

/* A joining member learns the cluster id from a peer and keeps it. */
static void adopt_cluster_id(node *n, uint64_t cid)
{
	storage_batch *b;
	uint8_t buf[8];
	for (int i = 0; i < 8; i++)
		buf[i] = (uint8_t)(cid >> (56 - 8 * i));
	if (storage_batch_begin(n->n_sc->st, &b) != 0)
		return;
	if (storage_batch_meta_put(b, "cluster_id", buf, 8) != 0 ||
	    storage_batch_commit(b, atomic_load(&n->n_applied)) != 0)
		return;
	n->n_sc->mi.cluster_id = cid;
	peer_set_cluster_id(n->n_peers, cid);
	char id[20];
	snprintf(id, sizeof(id), "%llx", (unsigned long long)cid);
	log_at(LOG_INFO, "joined the cluster", "cluster-id", id, NULL);
}

/* Every message that arrived in one turn of the loop is stepped before the Ready is taken:
 * forwarded proposals and acknowledgements from all peers then share one batch (one LMDB
 * transaction, one fsync) instead of one each. The check phase runs right after the loop's
 * I/O, so this adds no wait. */
static void on_messages_stepped(uv_check_t *h)
{
	node *n = h->data;
	uv_check_stop(h);
	n->n_step_pending = 0;
	process_ready(n);
	node_snap_after_ready(n);
}

void node_ready_soon(node *n)
{
	if (!n->n_step_pending) {
		n->n_step_pending = 1;
		uv_check_start(&n->n_stepped, on_messages_stepped);
	}
}

/*
 * Runs as the loop is about to wait for I/O. LMDB has one writer, so an apply that meets the
 * commit of the parked batch (storage_set_commit_window) waits for its flush; storage commits
 * a batch whose window has passed when the loop says no apply is near. One is, while requests
 * are queued or messages unstepped, and on a leader while its log holds entries not yet
 * applied (their acknowledgements are on the way). A follower's next append is written and
 * acknowledged before its apply begins, so its entries in flight do not count.
 */
static void on_loop_waits(uv_prepare_t *h)
{
	node *n = h->data;
	pthread_mutex_lock(&n->n_mu);
	int queued = n->n_head != NULL;
	pthread_mutex_unlock(&n->n_mu);
	int in_flight = n->n_role == RAFT_LEADER && atomic_load(&n->n_last_index) > atomic_load(&n->n_applied);
	storage_set_writer_idle(n->n_sc->st, !queued && !in_flight && !n->n_step_pending);
}

static void on_peer_message(void *ctx, uint64_t from, const void *bytes, size_t len)
{
	node *n = ctx;
	const uint8_t *p = bytes;
	if (len < 1)
		return;
	if (p[0] == FRAME_RAFT) {
		storage_set_writer_idle(n->n_sc->st, 0);
		struct raft_message m;
		if (raft_codec_decode(p + 1, len - 1, &m) != 0) {
			log_at(LOG_WARN, "dropped a malformed raft message from a peer", NULL);
			return;
		}
		raft_step(n->n_raft, &m);
		raft_codec_free(&m);
		node_ready_soon(n);
	} else if (p[0] == FRAME_SNAP_CHUNK || p[0] == FRAME_SNAP_DONE) {
		struct raft_message m;
		if (node_snap_on_frame(n, from, p, len, &m)) {
			raft_step(n->n_raft, &m);
			raft_codec_free(&m);
			node_ready_soon(n);
		}
	} else if (p[0] == FRAME_CLUSTER_ID && len == 9) {
		uint64_t cid = 0;
		for (int i = 0; i < 8; i++)
			cid = cid << 8 | p[1 + i];
		if (n->n_sc->mi.cluster_id == 0 && cid != 0)
			adopt_cluster_id(n, cid);
	} else if (p[0] == FRAME_RPC) {
		peer_rpc_on_message(n->n_rpc, from, bytes, len);
	}
}

static void note_refusal(node *n, uint64_t id, int refused);

/* Once connected to a peer, tell it the cluster id: a member that joined learns it so. */
static void on_peer_state(void *ctx, uint64_t member, int connected)
{
	node *n = ctx;
	uint64_t cid = n->n_sc->mi.cluster_id;
	if (connected) {
		note_refusal(n, member, 0);
	} else {
		node_snap_peer_down(n, member);
		peer_rpc_peer_down(n->n_rpc, member);
	}
	/* Which peers this member reaches, for the reconfiguration check on gRPC threads. */
	for (size_t i = 0; i < MEMBER_LIST_MAX; i++) {
		uint64_t cur = atomic_load(&n->n_active[i]);
		if (!connected && cur == member)
			atomic_store(&n->n_active[i], 0);
		if (connected && cur == member)
			break;
		if (connected && cur == 0) {
			uint64_t zero = 0;
			if (atomic_compare_exchange_strong(&n->n_active[i], &zero, member))
				break;
		}
	}
	if (!connected || cid == 0)
		return;
	uint8_t frame[9];
	frame[0] = FRAME_CLUSTER_ID;
	for (int i = 0; i < 8; i++)
		frame[1 + i] = (uint8_t)(cid >> (56 - 8 * i));
	peer_send(n->n_peers, member, frame, sizeof(frame));
}

/*
 * A removed member rarely hears of its own removal: the leader stops sending to it as soon
 * as the change is appended. Its peers then refuse it as an unknown sender; when most of
 * them do, after it had been part of the cluster (this start, or before: a restart with its
 * old data dir), it has been removed, and stops as etcd's member does.
 */
static void note_refusal(node *n, uint64_t id, int refused)
{
	size_t i;
	for (i = 0; i < n->n_nrefusing; i++)
		if (n->n_refusing[i] == id)
			break;
	if (!refused) {
		if (i < n->n_nrefusing)
			n->n_refusing[i] = n->n_refusing[--n->n_nrefusing];
		return;
	}
	if (i == n->n_nrefusing && n->n_nrefusing < MEMBER_LIST_MAX)
		n->n_refusing[n->n_nrefusing++] = id;
	if ((n->n_published || n->n_was_member) && n->n_npeers > 0 && n->n_nrefusing * 2 > n->n_npeers &&
	    !n->n_removed) {
		n->n_removed = 1;
		log_at(LOG_WARN, "the member has been permanently removed from the cluster", NULL);
		kill(getpid(), SIGTERM);
	}
}

/* etcd's peer handler GET /members: the member list and the cluster id, which a member
 * joining with --initial-cluster-state existing asks for its id (maint.c). */
static char *on_peer_http_get(void *ctx, const char *path, size_t *len, uint64_t *cluster_id)
{
	node *n = ctx;
	*len = 0;
	if (strcmp(path, "/members") != 0)
		return NULL;
	char *body = members_json(n->n_sc->members, len);
	if (body == NULL)
		*len = 1; /* out of memory: 500 */
	*cluster_id = n->n_sc->mi.cluster_id;
	return body;
}

/* A peer refused our connection: as an unknown sender, it no longer counts us a member. */
static void on_peer_refused(void *ctx, uint64_t member, int status)
{
	note_refusal(ctx, member, status == PEER_HS_UNKNOWN_SENDER);
}

static void on_peer_log(void *ctx, int level, const char *msg, const char *member, const char *addr,
			const char *error)
{
	(void)ctx;
	log_at(level >= PEER_LOG_ERROR ? LOG_ERROR : level >= PEER_LOG_WARN ? LOG_WARN
		       : level >= PEER_LOG_INFO ? LOG_INFO : LOG_DEBUG,
	       msg, "remote-peer-id", member, "address", addr, "error", error, NULL);
}

/* Dials every member we know and forgets those that left. */
static void sync_peers(node *n)
{
	uint64_t ids[MEMBER_LIST_MAX];
	char urls[MEMBER_LIST_MAX][256];
	int learner[MEMBER_LIST_MAX];
	size_t k = members_peers(n->n_sc->members, ids, urls, learner, MEMBER_LIST_MAX);
	for (size_t i = 0; i < k; i++) {
		if (ids[i] == n->n_sc->mi.member_id || urls[i][0] == '\0')
			continue;
		if (peer_add(n->n_peers, ids[i], urls[i]) == PEER_EEXIST)
			peer_update(n->n_peers, ids[i], urls[i]);
	}
	/* Members no longer in the list: Raft removed them. */
	for (size_t i = 0; i < n->n_npeers; i++) {
		int kept = 0;
		for (size_t j = 0; j < k; j++)
			kept |= ids[j] == n->n_peer_ids[i];
		if (!kept)
			peer_remove(n->n_peers, n->n_peer_ids[i]);
	}
	n->n_npeers = 0;
	for (size_t j = 0; j < k; j++)
		if (ids[j] != n->n_sc->mi.member_id)
			n->n_peer_ids[n->n_npeers++] = ids[j];
}

/* ---- applying ---- */

/* The waiting request of an entry this member proposed, removed from the waiters. */
static node_req *take_waiter(node *n, uint64_t seq)
{
	node_req *prev = NULL;
	for (node_req *r = n->n_waiters; r; prev = r, r = r->nr_next) {
		if (r->nr_seq != seq)
			continue;
		if (prev)
			prev->nr_next = r->nr_next;
		else
			n->n_waiters = r->nr_next;
		if (n->n_waiters_tail == r)
			n->n_waiters_tail = prev;
		r->nr_next = NULL;
		atomic_fetch_sub(&n->n_metrics.nm_proposals_pending, 1);
		return r;
	}
	return NULL;
}

static void add_waiter(node *n, node_req *r)
{
	r->nr_deadline_ms = now_ms() + n->n_req_timeout_ms;
	node_req_append(&n->n_waiters, &n->n_waiters_tail, r);
	atomic_fetch_add(&n->n_metrics.nm_proposals_pending, 1);
}

/* What one batch applied, answered after it commits. */
typedef struct applied_entry {
	apply_result ae_res;
	node_req *ae_req; /* the waiting call, if this member proposed it */
	int ae_conf_op;   /* a configuration change: enum raft_conf_op, 0 otherwise */
	uint64_t ae_conf_node;
} applied_entry;

typedef struct apply_batch {
	applied_entry *ab_v;
	size_t ab_n, ab_cap;
} apply_batch;

static applied_entry *batch_push(apply_batch *ab)
{
	if (ab->ab_n == ab->ab_cap) {
		size_t cap = ab->ab_cap ? ab->ab_cap * 2 : 64;
		applied_entry *v = realloc(ab->ab_v, cap * sizeof(*v));
		if (v == NULL)
			return NULL;
		ab->ab_v = v;
		ab->ab_cap = cap;
	}
	applied_entry *e = &ab->ab_v[ab->ab_n++];
	memset(e, 0, sizeof(*e));
	return e;
}

static void apply_one_entry(node *n, storage_batch *b, const struct raft_entry *e, storage_arena *a,
			    apply_batch *ab)
{
	server_ctx *sc = n->n_sc;
	applied_entry *ae = batch_push(ab);
	if (ae == NULL) {
		log_at(LOG_FATAL, "out of memory while applying", NULL);
		abort();
	}
	if (e->type == RAFT_ENTRY_CONF_CHANGE) {
		struct raft_conf_change cc;
		if (raft_conf_change_decode(e, &cc) == 0) {
			ae->ae_conf_op = cc.op;
			ae->ae_conf_node = cc.node;
			int learner = 0;
			if (cc.op == RAFT_CONF_REMOVE) {
				members_conf_changed(sc->members, b, MEMBERS_REMOVE, cc.node);
				if (cc.node == sc->mi.member_id) {
					/* etcd: a removed member stops, once this batch is durable (main
					 * takes the signal and shuts down in order). */
					log_at(LOG_WARN, "the member has been permanently removed from the cluster", NULL);
					kill(getpid(), SIGTERM);
				}
			}
			else if (cc.op == RAFT_CONF_ADD_VOTER && members_exists(sc->members, cc.node, &learner) && learner)
				members_conf_changed(sc->members, b, MEMBERS_PROMOTE, cc.node);
		}
		ae->ae_res.ar_op = NODE_NOOP;
		return;
	}
	int rc = apply_entry(sc, b, e->data, e->len, a, &ae->ae_res);
	if (rc) {
		/* Every member decodes the same bytes: a bad entry is skipped everywhere alike,
		 * and its proposer answers at once rather than at the timeout. */
		log_at(LOG_ERROR, "skipped an entry that cannot be decoded", NULL);
		if (ae->ae_res.ar_proposer == sc->mi.member_id && ae->ae_res.ar_seq != 0) {
			node_req *w = take_waiter(n, ae->ae_res.ar_seq);
			if (w)
				node_req_fail(w, API_ERR_INTERNAL);
		}
		ae->ae_res.ar_op = NODE_NOOP;
		return;
	}
	if (ae->ae_res.ar_proposer == sc->mi.member_id && ae->ae_res.ar_seq != 0)
		ae->ae_req = take_waiter(n, ae->ae_res.ar_seq);
}

static void reply_conf_waiters(node *n, int op, uint64_t id)
{
	node_req *prev = NULL, *next;
	for (node_req *r = n->n_conf_waiters; r; r = next) {
		next = r->nr_next;
		int match = r->nr_member == id &&
			    ((op == RAFT_CONF_REMOVE && r->nr_op == NODE_MEMBER_REMOVE) ||
			     (op == RAFT_CONF_ADD_VOTER && (r->nr_op == NODE_MEMBER_PROMOTE || r->nr_op == NODE_MEMBER_ADD)) ||
			     (op == RAFT_CONF_ADD_LEARNER && r->nr_op == NODE_MEMBER_ADD));
		if (!match) {
			prev = r;
			continue;
		}
		if (prev)
			prev->nr_next = next;
		else
			n->n_conf_waiters = next;
		/* The answers carry the member list after the change, as etcd's do. */
		Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
		server_fill_header(n->n_sc, &h);
		Etcdserverpb__Member m = ETCDSERVERPB__MEMBER__INIT;
		m.id = r->nr_member;
		m.peerurls = r->nr_urls;
		m.n_peerurls = r->nr_n_urls;
		m.islearner = r->nr_learner;
		members_reply(n->n_sc->members, r->nr_call, r->nr_op, &h, &m);
		r->nr_call = NULL;
		node_req_free(r);
	}
}

/*
 * Membership changes travel as normal entries first (so that a follower can ask, and every
 * member records a new member's URLs before it joins); the member that leads when such an
 * entry applies then proposes Raft's configuration change. Raft refuses calls between
 * raft_ready() and raft_advance(), so the change waits in n_pending_conf until then, and is
 * retried while Raft is busy with an earlier one.
 */
static void push_conf_change(node *n, enum raft_conf_op op, uint64_t id);

/* Records (on) or forgets (off) a member whose removal entry applied (n_removing). */
static void note_removing(node *n, uint64_t id, int on)
{
	for (size_t i = 0; i < n->n_nremoving; i++) {
		if (n->n_removing[i] != id)
			continue;
		if (!on)
			n->n_removing[i] = n->n_removing[--n->n_nremoving];
		return;
	}
	if (on && n->n_nremoving < NODE_MAX_PENDING_CONF)
		n->n_removing[n->n_nremoving++] = id;
}

static void queue_conf_change(node *n, const apply_result *r)
{
	if (n->n_role != RAFT_LEADER || n->n_npending_conf == NODE_MAX_PENDING_CONF)
		return;
	const Etcdserverpb__Member *m = (const Etcdserverpb__Member *)r->ar_req;
	enum raft_conf_op op = r->ar_op == NODE_MEMBER_REMOVE ? RAFT_CONF_REMOVE
			       : r->ar_op == NODE_MEMBER_PROMOTE ? RAFT_CONF_ADD_VOTER
			       : m->islearner ? RAFT_CONF_ADD_LEARNER
			       : RAFT_CONF_ADD_VOTER;
	push_conf_change(n, op, m->id);
}

static void push_conf_change(node *n, enum raft_conf_op op, uint64_t id)
{
	if (n->n_npending_conf == NODE_MAX_PENDING_CONF)
		return;
	for (size_t i = 0; i < n->n_npending_conf; i++)
		if (n->n_pending_conf[i].pc_op == (int)op && n->n_pending_conf[i].pc_node == id)
			return; /* already queued */
	n->n_pending_conf[n->n_npending_conf].pc_op = op;
	n->n_pending_conf[n->n_npending_conf].pc_node = id;
	n->n_pending_conf[n->n_npending_conf].pc_deadline_ms = now_ms() + n->n_req_timeout_ms;
	n->n_npending_conf++;
}

/*
 * A new leader finishes what a leader change cut short: a membership entry applied (the
 * member list) whose Raft configuration change its proposer never got to make. The member
 * list is the truth; Raft's configuration follows it. Called inside a Ready: the changes
 * wait in n_pending_conf.
 */
static void reconcile_conf(node *n)
{
	server_ctx *sc = n->n_sc;
	uint64_t ids[MEMBER_LIST_MAX];
	char urls[MEMBER_LIST_MAX][256];
	int learner[MEMBER_LIST_MAX];
	size_t k = members_peers(sc->members, ids, urls, learner, MEMBER_LIST_MAX);
	struct raft_status st;
	raft_status(n->n_raft, &st);
	int listed[RAFT_MAX_MEMBERS * 2] = {0};
	uint64_t conf_ids[RAFT_MAX_MEMBERS * 2];
	size_t nconf = 0;
	for (uint32_t i = 0; i < st.conf.n_voters; i++)
		conf_ids[nconf++] = st.conf.voters[i];
	for (uint32_t i = 0; i < st.conf.n_learners; i++)
		conf_ids[nconf++] = st.conf.learners[i];
	for (size_t i = 0; i < k; i++) {
		int voter = 0, found = 0;
		for (size_t j = 0; j < nconf; j++) {
			if (conf_ids[j] != ids[i])
				continue;
			listed[j] = found = 1;
			voter = j < st.conf.n_voters;
		}
		if (!found)
			push_conf_change(n, learner[i] ? RAFT_CONF_ADD_LEARNER : RAFT_CONF_ADD_VOTER, ids[i]);
		else if (!voter && !learner[i])
			push_conf_change(n, RAFT_CONF_ADD_VOTER, ids[i]); /* a promotion */
	}
	if (k == 0)
		return; /* no member list (cannot happen once started): change nothing */
	for (size_t j = 0; j < nconf; j++) {
		int removing = !listed[j];
		for (size_t i = 0; i < n->n_nremoving; i++)
			removing |= n->n_removing[i] == conf_ids[j];
		if (removing)
			push_conf_change(n, RAFT_CONF_REMOVE, conf_ids[j]);
	}
	if (n->n_npending_conf) {
		char c[24];
		snprintf(c, sizeof(c), "%zu", n->n_npending_conf);
		log_at(LOG_INFO, "finishing membership changes a leader change cut short", "changes", c, NULL);
	}
}

/*
 * Raft does not let a leader remove itself: it hands the leadership to the most caught-up
 * other voter, whose reconcile_conf() then proposes the removal (etcd's leader removes
 * itself and steps down; the outcome is the same, one election later).
 */
static int hand_over_for_removal(node *n)
{
	struct raft_status st;
	raft_status(n->n_raft, &st);
	if (st.lead_transferee != 0)
		return RAFT_EBUSY; /* already under way */
	uint64_t best = 0, best_match = 0;
	for (uint32_t i = 0; i < st.n_progress; i++) {
		const struct raft_progress_status *p = &st.progress[i];
		if (p->id == st.id || p->learner || !p->recent_active)
			continue;
		if (best == 0 || p->match > best_match) {
			best = p->id;
			best_match = p->match;
		}
	}
	if (best == 0)
		return RAFT_EINVAL; /* no other voter to lead */
	int rc = raft_transfer_leader(n->n_raft, best);
	return rc == 0 ? RAFT_EBUSY : rc; /* keep it pending until we no longer lead */
}

/* Proposes the queued configuration changes Raft will take now; called outside a Ready. */
static void propose_pending_conf(node *n)
{
	size_t keep = 0;
	uint64_t now = now_ms();
	for (size_t i = 0; i < n->n_npending_conf; i++) {
		pending_conf *pc = &n->n_pending_conf[i];
		int self_removal = pc->pc_op == RAFT_CONF_REMOVE && pc->pc_node == n->n_sc->mi.member_id;
		int rc = n->n_role != RAFT_LEADER ? RAFT_ENOTLEADER
			 : self_removal		  ? hand_over_for_removal(n)
						  : raft_propose_conf_change(n->n_raft, pc->pc_op, pc->pc_node, NULL);
		if (rc == RAFT_EBUSY && pc->pc_deadline_ms > now) {
			n->n_pending_conf[keep++] = *pc; /* an earlier change is still in flight */
			continue;
		}
		if (self_removal && rc == RAFT_ENOTLEADER)
			continue; /* handed over: the new leader proposes it */
		if (rc == 0 && self_removal)
			log_at(LOG_INFO, "handing over the leadership: this member is being removed", NULL);
		if (rc != 0) {
			char id[20];
			snprintf(id, sizeof(id), "%llx", (unsigned long long)pc->pc_node);
			log_at(LOG_WARN, "membership change not proposed", "member-id", id, "error", raft_strerror(rc), NULL);
		}
	}
	n->n_npending_conf = keep;
}

static void answer_applied(node *n, apply_batch *ab, int committed)
{
	server_ctx *sc = n->n_sc;
	int leader = atomic_load(&n->n_lead) == sc->mi.member_id;
	int membership = 0;
	for (size_t i = 0; i < ab->ab_n; i++) {
		applied_entry *ae = &ab->ab_v[i];
		if (ae->ae_conf_op) {
			membership = 1;
			reply_conf_waiters(n, ae->ae_conf_op, ae->ae_conf_node);
			if (ae->ae_conf_op == RAFT_CONF_REMOVE)
				note_removing(n, ae->ae_conf_node, 0);
			continue;
		}
		apply_result *r = &ae->ae_res;
		if (committed)
			apply_committed(sc, r, leader);
		/* Every member removes its own compacted revisions, not only the one a client
		 * asked: the apply did the first bounded step, compact_continue() does the rest. */
		if (r->ar_op == NODE_COMPACT && r->ar_err == 0 && committed)
			n->n_compacting = 1;
		if (r->ar_op == NODE_MEMBER_ADD || r->ar_op == NODE_MEMBER_UPDATE)
			membership = 1;
		if (r->ar_op == NODE_MEMBER_REMOVE && r->ar_err == 0 && committed)
			note_removing(n, ((const Etcdserverpb__Member *)r->ar_req)->id, 1);
		if ((r->ar_op == NODE_MEMBER_ADD || r->ar_op == NODE_MEMBER_REMOVE ||
		     r->ar_op == NODE_MEMBER_PROMOTE) && r->ar_err == 0 && committed)
			queue_conf_change(n, r);
		node_req *w = ae->ae_req;
		if (w == NULL)
			continue;
		if (!committed) {
			node_req_fail(w, API_ERR_INTERNAL);
		} else if (w->nr_call == NULL) {
			node_req_free(w); /* internal: nobody waits */
		} else if (w->nr_op == NODE_MEMBER_ADD || w->nr_op == NODE_MEMBER_REMOVE ||
			   w->nr_op == NODE_MEMBER_PROMOTE) {
			/* The leader proposes the configuration change; answer when it commits. */
			w->nr_next = n->n_conf_waiters;
			n->n_conf_waiters = w;
		} else if (w->nr_op == NODE_MEMBER_UPDATE) {
			Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
			server_fill_header(sc, &h);
			members_reply(sc->members, w->nr_call, NODE_MEMBER_UPDATE, &h, NULL);
			w->nr_call = NULL;
			node_req_free(w);
		} else if (r->ar_err != 0) {
			server_fail_storage(w->nr_call, r->ar_err);
			w->nr_call = NULL;
			node_req_free(w);
		} else if (r->ar_op == NODE_COMPACT &&
			   ((const Etcdserverpb__CompactionRequest *)r->ar_req)->physical) {
			/* Reply once the compacted revisions are gone from disk. */
			n->n_compacting = 1;
			w->nr_next = n->n_compact_waiters;
			n->n_compact_waiters = w;
		} else {
			if (r->ar_op == NODE_COMPACT)
				n->n_compacting = 1;
			apply_fill_headers(sc, r);
			api_call_reply(w->nr_call, r->ar_resp);
			w->nr_call = NULL;
			node_req_free(w);
		}
		if (r->ar_err == STORAGE_ERR_NOSPACE && r->ar_op != NODE_ALARM && !alarm_nospace(sc->alarms) &&
		    leader) {
			/* The map is full: raise NOSPACE, a write like any other. */
			Etcdserverpb__AlarmRequest *req = malloc(sizeof(*req));
			if (req) {
				etcdserverpb__alarm_request__init(req);
				req->action = ETCDSERVERPB__ALARM_REQUEST__ALARM_ACTION__ACTIVATE;
				req->memberid = sc->mi.member_id;
				req->alarm = ETCDSERVERPB__ALARM_TYPE__NOSPACE;
				node_submit(n, NODE_ALARM, NULL, &req->base);
			}
		}
	}
	if (membership)
		sync_peers(n);
}

/* ---- the Ready ---- */

static void send_messages(node *n, const struct raft_ready *rd, int appends)
{
	for (size_t i = 0; i < rd->n_messages; i++) {
		const struct raft_message *m = &rd->messages[i];
		if ((m->type == RAFT_MSG_APPEND) != appends)
			continue;
		if (m->type == RAFT_MSG_SNAPSHOT)
			node_snap_send(n, m); /* the state goes first, the message after it */
		else
			send_raft_message(n, m);
	}
}

/* Once a leader is known, a starting member tells the cluster its name and client URLs
 * (etcd's publish), so every member lists them. */
static void publish_attributes(node *n)
{
	server_ctx *sc = n->n_sc;
	n->n_published = 1;
	node_req *r = calloc(1, sizeof(*r));
	if (r == NULL)
		return;
	r->nr_op = NODE_MEMBER_UPDATE;
	r->nr_publish = 1;
	r->nr_member = sc->mi.member_id;
	size_t k = (size_t)sc->cfg->advertise_client.n;
	r->nr_urls = calloc(k ? k : 1, sizeof(char *));
	for (size_t i = 0; r->nr_urls && i < k; i++)
		if ((r->nr_urls[r->nr_n_urls] = strdup(sc->cfg->advertise_client.url[i])) != NULL)
			r->nr_n_urls++;
	/* Not now: we are between raft_ready() and raft_advance(). */
	node_enqueue(n, r);
}

/* A request that waited for a leader past its deadline ends without being proposed. */
static void expire_leaderless(node *n, node_req *r)
{
	if (r->nr_op == NODE_LEASE_REVOKE && r->nr_call == NULL)
		lessor_revoke_failed(n->n_sc->lessor, ((const Etcdserverpb__LeaseRevokeRequest *)r->nr_msg)->id);
	atomic_fetch_add(&n->n_metrics.nm_proposals_failed, 1);
	node_req_fail(r, API_ERR_TIMEOUT);
}

static void role_changed(node *n, const struct raft_soft_state *ss)
{
	server_ctx *sc = n->n_sc;
	if (ss->lead != 0 && !n->n_published)
		publish_attributes(n);
	uint64_t old = atomic_exchange(&n->n_lead, ss->lead);
	if (ss->lead != 0 && ss->lead != old)
		atomic_fetch_add(&n->n_metrics.nm_leader_changes, 1); /* etcd's leaderChanges */
	n->n_role = ss->role;
	if (old != ss->lead)
		node_ask_leader_changed(n, ss->lead);
	if (ss->lead != 0 && n->n_leaderless) {
		/* Propose them again next turn (not now: we are inside a Ready). */
		node_req *next;
		uint64_t now = now_ms();
		for (node_req *r = n->n_leaderless; r; r = next) {
			next = r->nr_next;
			r->nr_next = NULL;
			if (r->nr_deadline_ms <= now)
				expire_leaderless(n, r); /* its caller has given up: never proposed */
			else
				node_enqueue(n, r);
		}
		n->n_leaderless = NULL;
	}
	if (n->n_transfer && ss->lead == ((const Etcdserverpb__MoveLeaderRequest *)n->n_transfer->nr_msg)->targetid) {
		Etcdserverpb__MoveLeaderResponse resp = ETCDSERVERPB__MOVE_LEADER_RESPONSE__INIT;
		Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
		server_fill_header(sc, &h);
		resp.header = &h;
		api_call_reply(n->n_transfer->nr_call, &resp.base);
		n->n_transfer->nr_call = NULL;
		node_req_free(n->n_transfer);
		n->n_transfer = NULL;
	}
	if (ss->role == RAFT_LEADER && old != sc->mi.member_id)
		reconcile_conf(n);
	if (ss->role == RAFT_LEADER && old != sc->mi.member_id) {
		/* etcd's Promote: every lease gets its full TTL plus an election timeout before
		 * the new leader expires any. */
		lessor_promote(sc->lessor, sc->cfg->election_ms);
		char id[20];
		snprintf(id, sizeof(id), "%llx", (unsigned long long)sc->mi.member_id);
		log_at(LOG_INFO, "became leader", "member-id", id, NULL);
	} else if (old != ss->lead) {
		char id[20];
		snprintf(id, sizeof(id), "%llx", (unsigned long long)ss->lead);
		log_at(LOG_INFO, ss->lead ? "elected leader" : "lost leader", "leader-id", id, NULL);
	}
}

/* Reports this member's configuration after a change. */
void node_conf_status(node *n)
{
	struct raft_status st;
	raft_status(n->n_raft, &st);
	/* Only a configuration of this member alone commits without asking anyone. A member
	 * that joins an existing cluster starts with no configuration at all until the
	 * leader's log reaches it: it is not a lone voter (it must not serve linearizable
	 * reads from its empty store, nor lead). */
	atomic_store(&n->n_lone_voter, st.conf.n_voters == 1 && st.conf.voters[0] == st.id);
	int learner = 0;
	for (uint32_t i = 0; i < st.conf.n_learners; i++)
		learner |= st.conf.learners[i] == st.id;
	atomic_store(&n->n_learner, learner);
	atomic_store(&n->n_last_index, st.last_index);
}

/*
 * Keeps memory bounded: every --snapshot-count applied entries the log is cut to a snapshot
 * point --experimental-snapshot-catchup-entries behind the applied index, as etcd does. A
 * follower that needs an entry before it gets a copy of the state instead (node_snap.c).
 * Called between Readies (Raft refuses to compact inside one); the cut is recorded in a
 * transaction of its own that need not be synced: a crash before it only keeps more log.
 */
static void maybe_compact_log(node *n)
{
	const config *cfg = n->n_sc->cfg;
	uint64_t every = cfg->snapshot_count ? cfg->snapshot_count : 100000;
	uint64_t keep = cfg->snapshot_catchup_entries;
	struct raft_status st;
	raft_status(n->n_raft, &st);
	/* Raft's applied index: after a snapshot install the store may be ahead of it. */
	uint64_t applied = st.applied;
	if (applied < n->n_log_snapshot + every + keep)
		return;
	/* While a follower is being sent a copy, keep the log it will need right after it
	 * (etcd does not compact while snapshots are in flight either). */
	if (node_snap_busy(n))
		return;
	uint64_t index = applied - keep;
	/* The snapshot point records the configuration as of index: with a change after it the
	 * current one is not that, so wait until the change is behind the cut. */
	const struct raft_entry *e;
	for (uint64_t i = index + 1; i <= st.last_index; i++)
		if (raft_entry_at(n->n_raft, i, &e) == 0 && e->type == RAFT_ENTRY_CONF_CHANGE)
			return;
	if (raft_entry_at(n->n_raft, index, &e) != 0)
		return;
	uint64_t term = e->term;
	storage_batch *b;
	if (storage_batch_begin(n->n_sc->st, &b) != 0)
		return;
	if (storage_batch_log_snapshot(b, index, term, &st.conf, sizeof(st.conf)) != 0) {
		storage_batch_abort(b);
		return;
	}
	if (storage_batch_commit_lazy(b, applied) != 0)
		return;
	/* Raft drops its copy only once the cut is on disk: a restart always finds the log
	 * that follows the recorded snapshot point. */
	if (raft_compact(n->n_raft, index, NULL, 0) == 0)
		n->n_log_snapshot = index;
}

/* Writes a Ready's log records (entries, hard state) to the WAL and makes them durable,
 * in a log-only batch. A Ready that only moves the commit index writes nothing
 * (etcd-io/raft's MustSync: the commit index need not be durable; a restart takes it from
 * the applied index and the leader). */
static int persist_log(node *n, const struct raft_ready *rd, storage_arena *a, int *wrote)
{
	*wrote = 0;
	if (rd->hard_state_changed) {
		atomic_store(&n->n_term, rd->hard_state.term);
		atomic_store(&n->n_commit, rd->hard_state.commit);
		atomic_store(&n->n_metrics.nm_committed, rd->hard_state.commit);
	}
	if (!rd->n_entries && !rd->snapshot && !(rd->hard_state_changed && rd->must_sync))
		return 0;
	storage_batch *b;
	int rc = storage_batch_begin_log(n->n_sc->st, &b);
	if (rc)
		return rc;
	if (rd->n_entries) {
		storage_log_entry *le = storage_arena_alloc(a, rd->n_entries * sizeof(*le));
		if (le == NULL)
			rc = STORAGE_ERR_NOMEM;
		for (size_t i = 0; le && i < rd->n_entries; i++)
			le[i] = (storage_log_entry){rd->entries[i].index, rd->entries[i].term, rd->entries[i].type,
						    rd->entries[i].len, rd->entries[i].data};
		if (rc == 0)
			rc = storage_batch_log_append(b, le, rd->n_entries);
	}
	if (rc == 0 && rd->hard_state_changed)
		rc = storage_batch_log_hard_state(b, rd->hard_state.term, rd->hard_state.vote, rd->hard_state.commit);
	if (rc) {
		storage_batch_abort(b);
		return rc;
	}
	uint64_t t0 = node_now_ns();
	rc = storage_batch_commit_log(b);
	histogram_observe(&n->n_metrics.nm_wal_fsync, node_now_ns() - t0);
	*wrote = rc == 0;
	return rc;
}

static void process_ready(node *n)
{
	server_ctx *sc = n->n_sc;
	while (raft_has_ready(n->n_raft)) {
		struct raft_ready rd;
		if (raft_ready(n->n_raft, &rd) != 0) {
			log_at(LOG_FATAL, "raft failed", NULL);
			abort();
		}
		if (rd.soft_state_changed)
			role_changed(n, &rd.soft_state);
		/* The leader's appends go out while it writes its own log (thesis 10.2.1). */
		send_messages(n, &rd, 1);

		/* A snapshot replaces the store before anything else of this Ready is written. */
		if (rd.snapshot) {
			atomic_store(&n->n_applied, node_snap_install(n, rd.snapshot, &rd.hard_state));
			n->n_log_snapshot = rd.snapshot->meta.index;
		}
		storage_arena a;
		storage_arena_init(&a);
		apply_batch ab = {0};
		storage_batch *b = NULL;
		uint64_t applied = atomic_load(&n->n_applied);
		/* A lone voter's entries are committed once durable: apply them in this Ready. */
		int lone = atomic_load(&n->n_lone_voter) && n->n_role == RAFT_LEADER;
		int to_apply = 0;
		for (size_t i = 0; lone && i < rd.n_entries; i++)
			to_apply |= rd.entries[i].index > applied;
		for (size_t i = 0; i < rd.n_committed; i++)
			to_apply |= rd.committed[i].index > applied;
		/* The log's records first, in a batch of their own: it needs no LMDB txn, so its
		 * WAL write and fdatasync overlap the previous apply's LMDB flush (which the
		 * committer thread is still doing); only then does the apply's batch begin, which
		 * waits for that flush. */
		int wrote_log;
		int rc = persist_log(n, &rd, &a, &wrote_log);
		/* What Raft sends besides the leader's appends (a follower's acks, votes) may
		 * go once the log and hard state are durable: before the apply, which the
		 * leader does not need to hear about. */
		if (rc == 0)
			send_messages(n, &rd, 0);
		Mvccpb__Event **events = NULL;
		size_t nevents = 0;
		int64_t rev = 0;
		if (rc == 0 && to_apply)
			rc = storage_batch_begin_apply(sc->st, &b);
		/* In index order: entries committed earlier (a restart with commit ahead of
		 * applied, say) come before a lone voter's new ones. */
		for (size_t i = 0; rc == 0 && b && i < rd.n_committed; i++) {
			if (rd.committed[i].index <= applied)
				continue;
			apply_one_entry(n, b, &rd.committed[i], &a, &ab);
			applied = rd.committed[i].index;
		}
		if (rc == 0 && lone && b) {
			for (size_t i = 0; i < rd.n_entries; i++) {
				if (rd.entries[i].index <= applied)
					continue;
				/* Only right after what is applied: a restart can find entries in the
				 * log past the applied index (the WAL is synced before LMDB), and
				 * those come first, once Raft commits them. */
				if (rd.entries[i].index != applied + 1)
					break;
				apply_one_entry(n, b, &rd.entries[i], &a, &ab);
				applied = rd.entries[i].index;
			}
		}
		if (rc == 0 && b)
			rc = storage_batch_events(b, &a, &events, &nevents, &rev);
		/* The entries are durable in the WAL, so the apply's LMDB commit can be lazy (one
		 * flush; a crash that undoes it is redone from the log) and asynchronous: the
		 * answers go out while the committer thread writes it (readers wait for it, the
		 * next apply's begin too), and the loop goes on to the next Ready. */
		if (rc == 0 && b)
			rc = storage_batch_commit_async(b, applied);
		else if (b)
			storage_batch_abort(b);
		if (rc != 0) {
			/* The log cannot be written: going on would break Raft's promises. */
			log_at(LOG_FATAL, "cannot persist the raft log", "error", storage_strerror(rc), NULL);
			abort();
		}
		atomic_store(&n->n_applied, applied);
		if (wrote_log || b) /* one group commit: a WAL sync and/or an apply */
			atomic_fetch_add(&n->n_stat_commits, 1);
		atomic_fetch_add(&n->n_stat_requests, ab.ab_n);
		for (size_t i = 0; i < rd.n_read_states; i++)
			node_read_index_known(n, &rd.read_states[i]);
		answer_applied(n, &ab, 1);
		/* After the replies: the fan-out to thousands of watchers takes milliseconds,
		 * which a writer need not wait for (etcd, too, answers before its watchers hear).
		 * A watch created in between is handled: the hub skips revisions a watcher has.
		 * Never before storage_batch_commit_async: the hub's catch-up reads wait for what
		 * was answered, which an open batch continuing a parked one would never commit. */
		if (b)
			watch_hub_notify(sc->hub, events, nevents, rev);
		free(ab.ab_v);
		storage_arena_free(&a);
		if (raft_advance(n->n_raft, &rd) != 0) {
			log_at(LOG_FATAL, "raft failed", NULL);
			abort();
		}
		node_conf_status(n);
		if (rd.snapshot)
			sync_peers(n); /* the installed member list */
		maybe_compact_log(n);
		node_read_serve(n);
		if (n->n_npending_conf)
			propose_pending_conf(n);
	}
	if (n->n_compacting)
		uv_async_send(&n->n_wake);
}

/* ---- the loop ---- */

/* Defragment runs between batches, alone: it replaces the LMDB environment. */
static void run_defrag(node *n, node_req *r)
{
	if (node_snap_busy(n)) {
		/* The copy for a follower holds the store shared; waiting for it here would stop
		 * the loop (and the heartbeats) for as long as the copy takes. */
		api_call_fail_msg(r->nr_call, 14 /* UNAVAILABLE */,
				  "etcdserver: a database snapshot is being sent to a follower; retry the defragment");
		r->nr_call = NULL;
		node_req_free(r);
		return;
	}
	server_backup_pause(n->n_sc->backup); /* a backup's read txn would stall the loop */
	int rc = storage_defragment(n->n_sc->st);
	server_backup_resume(n->n_sc->backup);
	if (rc) {
		log_at(LOG_ERROR, "defragment failed", "error", storage_strerror(rc), NULL);
		server_fail_storage(r->nr_call, rc);
	} else {
		Etcdserverpb__DefragmentResponse resp = ETCDSERVERPB__DEFRAGMENT_RESPONSE__INIT;
		Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
		server_fill_header(n->n_sc, &h);
		resp.header = &h;
		api_call_reply(r->nr_call, &resp.base);
	}
	r->nr_call = NULL;
	node_req_free(r);
}

/* Keeps removing compacted revisions, one bounded batch per loop turn, then releases the
 * physical compactions waiting for it. Local work: every member compacts its own copy. */
static void compact_continue(node *n)
{
	storage_batch *b;
	int done = 0;
	if (storage_batch_begin(n->n_sc->st, &b) != 0)
		return;
	int rc = storage_batch_compact_continue(b, NODE_COMPACT_STEP, &done);
	if (rc == 0)
		rc = storage_batch_commit(b, atomic_load(&n->n_applied));
	else
		storage_batch_abort(b);
	if (rc != 0) {
		log_at(LOG_ERROR, "compaction failed", "error", storage_strerror(rc), NULL);
		done = 1;
	}
	if (!done) {
		uv_async_send(&n->n_wake);
		return;
	}
	n->n_compacting = 0;
	while (n->n_compact_waiters) {
		node_req *r = n->n_compact_waiters;
		n->n_compact_waiters = r->nr_next;
		Etcdserverpb__CompactionResponse resp = ETCDSERVERPB__COMPACTION_RESPONSE__INIT;
		Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
		h.revision = storage_current_revision(n->n_sc->st);
		server_fill_header(n->n_sc, &h);
		resp.header = &h;
		api_call_reply(r->nr_call, &resp.base);
		r->nr_call = NULL;
		node_req_free(r);
	}
}

/* Proposes one queued request. */
static void propose(node *n, node_req *r)
{
	server_ctx *sc = n->n_sc;
	switch (r->nr_op) {
	case NODE_DEFRAG:
		run_defrag(n, r);
		return;
	case NODE_READ_RANGE:
	case NODE_READ_TXN:
	case NODE_READ_BARRIER:
		r->nr_next = n->n_reads;
		n->n_reads = r;
		return;
	case NODE_MOVE_LEADER: {
		/* etcd: only the leader moves leadership, to a voting member. */
		const Etcdserverpb__MoveLeaderRequest *req = (const Etcdserverpb__MoveLeaderRequest *)r->nr_msg;
		if (n->n_role != RAFT_LEADER) {
			api_call_fail_msg(r->nr_call, 14 /* UNAVAILABLE */, "etcdserver: not leader");
			r->nr_call = NULL;
			node_req_free(r);
			return;
		}
		int learner = 0;
		if (!members_exists(sc->members, req->targetid, &learner) || learner || n->n_transfer) {
			api_call_fail_msg(r->nr_call, 9 /* FAILED_PRECONDITION */, "etcdserver: bad leader transferee");
			r->nr_call = NULL;
			node_req_free(r);
			return;
		}
		if (req->targetid == sc->mi.member_id) {
			Etcdserverpb__MoveLeaderResponse resp = ETCDSERVERPB__MOVE_LEADER_RESPONSE__INIT;
			Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
			server_fill_header(sc, &h);
			resp.header = &h;
			api_call_reply(r->nr_call, &resp.base);
			r->nr_call = NULL;
			node_req_free(r);
			return;
		}
		if (raft_transfer_leader(n->n_raft, req->targetid) != 0) {
			api_call_fail_msg(r->nr_call, 9, "etcdserver: bad leader transferee");
			r->nr_call = NULL;
			node_req_free(r);
			return;
		}
		r->nr_deadline_ms = now_ms() + 2 * sc->cfg->election_ms + 1000;
		n->n_transfer = r;
		return;
	}
	case NODE_ASK: {
		node_ask_req *a = r->nr_ask;
		r->nr_ask = NULL;
		node_req_free(r);
		node_ask_begin(n, a);
		return;
	}
	default:
		break;
	}
	uint8_t *data;
	size_t len;
	Etcdserverpb__Member m = ETCDSERVERPB__MEMBER__INIT;
	const ProtobufCMessage *msg = r->nr_msg;
	int membership = r->nr_op == NODE_MEMBER_ADD || r->nr_op == NODE_MEMBER_UPDATE ||
			 r->nr_op == NODE_MEMBER_REMOVE || r->nr_op == NODE_MEMBER_PROMOTE;
	if (membership) {
		m.id = r->nr_member;
		if (r->nr_publish) {
			m.name = (char *)sc->cfg->name;
			m.clienturls = r->nr_urls;
			m.n_clienturls = r->nr_n_urls;
		} else {
			m.peerurls = r->nr_urls;
			m.n_peerurls = r->nr_n_urls;
		}
		m.islearner = r->nr_learner;
		msg = &m.base;
	}
	/* etcd's processInternalRaftRequestOnce: while the applied index trails the committed one
	 * by more than maxGapBetweenApplyAndCommitIndex, new proposals are refused rather than
	 * queued behind the backlog. Internal proposals (expiry revokes, alarms) go on, and so
	 * do membership changes (etcd's configure() path has no such check). */
	if (r->nr_call && !membership && node_apply_gap_too_large(atomic_load(&n->n_commit), atomic_load(&n->n_applied))) {
		node_req_fail(r, API_ERR_TOO_MANY_REQUESTS);
		return;
	}
	r->nr_seq = ++n->n_next_seq;
	if (apply_encode(r->nr_op, sc->mi.member_id, r->nr_seq, msg, &data, &len) != 0) {
		node_req_fail(r, API_ERR_INTERNAL);
		return;
	}
	int rc = raft_propose(n->n_raft, data, (uint32_t)len, NULL);
	free(data);
	if (rc == 0) {
		add_waiter(n, r);
		return;
	}
	if (rc == RAFT_ETOOBIG) {
		node_req_fail(r, API_ERR_REQUEST_TOO_LARGE);
	} else if (rc == RAFT_EDROPPED || rc == RAFT_ENOTLEADER) {
		/* No leader (an election, a transfer): like etcd, wait for one rather than fail
		 * at once; the request is proposed again when a leader is known, or times out. */
		if (r->nr_deadline_ms == 0) {
			/* etcd gives the proposal up when the client does: a write whose caller has
			 * gone must not be applied once a leader appears. */
			uint64_t wait = n->n_req_timeout_ms;
			int64_t left = r->nr_call ? api_call_remaining_ms(r->nr_call) : -1;
			if (left >= 0 && (uint64_t)left < wait)
				wait = (uint64_t)left;
			r->nr_deadline_ms = now_ms() + wait;
		}
		r->nr_next = n->n_leaderless;
		n->n_leaderless = r;
	} else {
		node_req_fail(r, API_ERR_INTERNAL);
	}
}

static void on_wake(uv_async_t *h)
{
	node *n = h->data;
	storage_set_writer_idle(n->n_sc->st, 0);
	for (;;) {
		pthread_mutex_lock(&n->n_mu);
		node_req *head = n->n_head;
		node_req *last = head;
		int count = head ? 1 : 0;
		while (last && last->nr_next && count < NODE_MAX_BATCH) {
			last = last->nr_next;
			count++;
		}
		if (last) {
			n->n_head = last->nr_next;
			last->nr_next = NULL;
			if (n->n_head == NULL)
				n->n_tail = NULL;
		}
		pthread_mutex_unlock(&n->n_mu);
		if (head == NULL)
			break;
		node_req *next;
		for (node_req *r = head; r; r = next) {
			next = r->nr_next;
			r->nr_next = NULL;
			propose(n, r);
		}
		node_read_start_round(n);
		/* Everything proposed this turn goes into one Ready: one batch, one fsync. */
		process_ready(n);
	}
	if (n->n_compacting)
		compact_continue(n);
}

static void on_tick(uv_timer_t *t)
{
	node *n = t->data;
	storage_set_writer_idle(n->n_sc->st, 0); /* a tick may commit entries (a lone voter's) */
	raft_tick(n->n_raft);
	process_ready(n);
	if (n->n_npending_conf) {
		propose_pending_conf(n);
		process_ready(n);
	}
}

/* Queues a revoke for each expired lease; only the leader expires leases. */
static void on_lease_timer(uv_timer_t *t)
{
	node *n = t->data;
	if (atomic_load(&n->n_lead) != n->n_sc->mi.member_id)
		return;
	storage_set_writer_idle(n->n_sc->st, 0); /* revokes and checkpoints to apply */
	lessor_propose_checkpoints(n->n_sc);
	int64_t ids[NODE_LEASE_REVOKES_PER_CHECK];
	size_t k = lessor_expired(n->n_sc->lessor, ids, NODE_LEASE_REVOKES_PER_CHECK);
	for (size_t i = 0; i < k; i++) {
		Etcdserverpb__LeaseRevokeRequest *req = malloc(sizeof(*req));
		if (req == NULL) {
			lessor_revoke_failed(n->n_sc->lessor, ids[i]);
			continue;
		}
		etcdserverpb__lease_revoke_request__init(req);
		req->id = ids[i];
		node_req *r = calloc(1, sizeof(*r));
		if (r == NULL) {
			free(req);
			lessor_revoke_failed(n->n_sc->lessor, ids[i]);
			continue;
		}
		r->nr_op = NODE_LEASE_REVOKE;
		r->nr_msg = &req->base;
		r->nr_owns_msg = 1;
		propose(n, r);
	}
	if (k)
		process_ready(n);
}

/* Answers "request timed out" for proposals that never came back (lost in a leader change). */
static void on_timeout_timer(uv_timer_t *t)
{
	node *n = t->data;
	uint64_t now = now_ms();
	node_req **pp = &n->n_leaderless;
	while (*pp) {
		node_req *r = *pp;
		if (r->nr_deadline_ms > now) {
			pp = &r->nr_next;
			continue;
		}
		*pp = r->nr_next;
		expire_leaderless(n, r);
	}
	if (n->n_transfer && n->n_transfer->nr_deadline_ms <= now) {
		/* etcd: the transfer did not finish within the election timeout. */
		api_call_fail_msg(n->n_transfer->nr_call, 14, "etcdserver: request timed out, leader transfer took too long");
		n->n_transfer->nr_call = NULL;
		node_req_free(n->n_transfer);
		n->n_transfer = NULL;
	}
	node_req *prev = NULL, *next;
	for (node_req *r = n->n_waiters; r; r = next) {
		next = r->nr_next;
		if (r->nr_deadline_ms > now) {
			prev = r;
			continue;
		}
		if (prev)
			prev->nr_next = next;
		else
			n->n_waiters = next;
		if (n->n_waiters_tail == r)
			n->n_waiters_tail = prev;
		if (r->nr_op == NODE_LEASE_REVOKE && r->nr_call == NULL)
			lessor_revoke_failed(n->n_sc->lessor, ((const Etcdserverpb__LeaseRevokeRequest *)r->nr_msg)->id);
		atomic_fetch_sub(&n->n_metrics.nm_proposals_pending, 1);
		atomic_fetch_add(&n->n_metrics.nm_proposals_failed, 1); /* etcd: proposalsFailed on timeout */
		node_req_fail(r, API_ERR_TIMEOUT);
	}
}

static void close_all(node *n)
{
	uv_close((uv_handle_t *)&n->n_tick, NULL);
	uv_close((uv_handle_t *)&n->n_lease_timer, NULL);
	uv_close((uv_handle_t *)&n->n_timeout_timer, NULL);
	uv_close((uv_handle_t *)&n->n_wake, NULL);
	uv_close((uv_handle_t *)&n->n_stop, NULL);
	uv_close((uv_handle_t *)&n->n_stepped, NULL);
	uv_close((uv_handle_t *)&n->n_idle_check, NULL);
	node_snap_close(n);
}

static void on_stop(uv_async_t *h)
{
	node *n = h->data;
	/* Nothing is queued after n_stopping is set: propose what is, then end every call. */
	on_wake(&n->n_wake);
	node_req *next;
	for (node_req *r = n->n_waiters; r; r = next) {
		next = r->nr_next;
		node_req_fail(r, API_ERR_STOPPED);
	}
	n->n_waiters = n->n_waiters_tail = NULL;
	for (node_req *r = n->n_conf_waiters; r; r = next) {
		next = r->nr_next;
		node_req_fail(r, API_ERR_STOPPED);
	}
	n->n_conf_waiters = NULL;
	if (n->n_transfer) {
		node_req_fail(n->n_transfer, API_ERR_STOPPED);
		n->n_transfer = NULL;
	}
	for (node_req *r = n->n_leaderless; r; r = next) {
		next = r->nr_next;
		node_req_fail(r, API_ERR_STOPPED);
	}
	n->n_leaderless = NULL;
	for (node_req *r = n->n_reads; r; r = next) {
		next = r->nr_next;
		node_req_fail(r, API_ERR_STOPPED);
	}
	n->n_reads = NULL;
	while (n->n_rounds) {
		read_round *rr = n->n_rounds;
		n->n_rounds = rr->rr_next;
		for (node_req *r = rr->rr_reqs; r; r = next) {
			next = r->nr_next;
			node_req_fail(r, API_ERR_STOPPED);
		}
		free(rr);
	}
	for (node_req *r = n->n_compact_waiters; r; r = next) {
		next = r->nr_next;
		node_req_fail(r, API_ERR_STOPPED);
	}
	n->n_compact_waiters = NULL;
	node_ask_close(n);
	peer_transport_close(n->n_peers, NULL);
	close_all(n);
}

/* The committer thread's measure of each LMDB commit (etcd's backend commit duration). A
 * failed asynchronous commit was answered already: stop, as a failed synchronous one does
 * (process_ready); the restart redoes its entries from the WAL. */
static void observe_backend_commit(void *arg, uint64_t ns, int err)
{
	if (err) {
		log_at(LOG_FATAL, "cannot commit the applied entries", "error", storage_strerror(err), NULL);
		abort();
	}
	histogram_observe(arg, ns);
}

static void *node_thread(void *arg)
{
	prctl(PR_SET_NAME, "raft-node"); /* names the thread in top -H, perf, gdb */
	node *n = arg;
	uv_run(&n->n_loop, UV_RUN_DEFAULT);
	return NULL;
}

int node_start(node **out, server_ctx *sc)
{
	node *n = calloc(1, sizeof(*n));
	if (n == NULL)
		return STORAGE_ERR_NOMEM;
	n->n_sc = sc;
	/* Sequence numbers must not repeat across restarts: entries this member proposed before
	 * a crash may be applied again after it (the store's lazy commits lag the WAL), and a
	 * new proposal with the same number would take that old entry's result as its answer
	 * (fault campaign seed 2918: CAS successes at stale revisions). So they start from the
	 * wall clock in ns, as etcd's request ids are time-based. */
	struct timespec boot;
	clock_gettime(CLOCK_REALTIME, &boot);
	n->n_next_seq = (uint64_t)boot.tv_sec * 1000000000u + (uint64_t)boot.tv_nsec;
	/* etcd's buckets: ExponentialBuckets(0.001, 2, 14) for both disk histograms,
	 * (0.0001, 2, 14) for peer round trips */
	n->n_metrics.nm_wal_fsync.h_first = n->n_metrics.nm_backend_commit.h_first = 0.001;
	n->n_metrics.nm_wal_fsync.h_n = n->n_metrics.nm_backend_commit.h_n = 14;
	for (int i = 0; i < NODE_RTT_PEERS; i++) {
		n->n_metrics.nm_rtt[i].h.h_first = 0.0001;
		n->n_metrics.nm_rtt[i].h.h_n = 14;
	}
	n->n_req_timeout_ms = 5000 + 2 * sc->cfg->election_ms;
	int rc = node_raft_boot(n);
	if (rc) {
		free(n);
		return rc;
	}
	pthread_mutex_init(&n->n_mu, NULL);
	uv_loop_init(&n->n_loop);

	const char *listen[PEER_LISTEN_MAX];
	char hp[PEER_LISTEN_MAX][256], url[PEER_LISTEN_MAX][272];
	int nl = 0;
	for (int i = 0; i < sc->cfg->listen_peer.n && nl < PEER_LISTEN_MAX; i++)
		if (config_url_host_port(sc->cfg->listen_peer.url[i], hp[nl], sizeof(hp[nl])) == 0) {
			/* Each listener in its URL's scheme, as etcd. */
			int https = strncmp(sc->cfg->listen_peer.url[i], "https://", 8) == 0;
			snprintf(url[nl], sizeof(url[nl]), "%s://%s", https ? "https" : "http", hp[nl]);
			listen[nl] = url[nl];
			nl++;
		}
	peer_config pc;
	memset(&pc, 0, sizeof(pc));
	pc.pc_self_id = sc->mi.member_id;
	pc.pc_cluster_id = sc->mi.cluster_id;
	pc.pc_cluster_token = sc->cfg->initial_cluster_token;
	pc.pc_listen = listen;
	pc.pc_n_listen = nl;
	pc.pc_tls = sc->cfg->peer_tls; /* built by main.c from the --peer-* TLS flags */
	peer_callbacks cb = {on_peer_message, on_peer_state, on_peer_log, on_peer_refused, on_peer_http_get};
	int prc = peer_transport_init(&n->n_peers, &n->n_loop, &pc, cb, n);
	if (prc != 0) {
		log_at(LOG_FATAL, "cannot listen for peers", "error", peer_strerror(prc), NULL);
		raft_close(n->n_raft);
		uv_loop_close(&n->n_loop);
		free(n);
		return STORAGE_ERR_IO;
	}
	sync_peers(n);
	if (node_ask_init(n) != 0)
		rc = STORAGE_ERR_NOMEM;
	else
		rc = node_snap_init(n);
	if (rc != 0) {
		if (n->n_rpc)
			node_ask_close(n);
		peer_transport_close(n->n_peers, NULL);
		uv_run(&n->n_loop, UV_RUN_DEFAULT);
		raft_close(n->n_raft);
		uv_loop_close(&n->n_loop);
		free(n);
		return rc;
	}

	uv_check_init(&n->n_loop, &n->n_stepped);
	n->n_stepped.data = n;
	uv_prepare_init(&n->n_loop, &n->n_idle_check);
	n->n_idle_check.data = n;
	uv_prepare_start(&n->n_idle_check, on_loop_waits);
	uv_async_init(&n->n_loop, &n->n_wake, on_wake);
	uv_async_init(&n->n_loop, &n->n_stop, on_stop);
	n->n_wake.data = n;
	n->n_stop.data = n;
	uv_timer_init(&n->n_loop, &n->n_tick);
	n->n_tick.data = n;
	uint64_t hb = sc->cfg->heartbeat_ms ? sc->cfg->heartbeat_ms : 100;
	uv_timer_start(&n->n_tick, on_tick, hb, hb);
	uv_timer_init(&n->n_loop, &n->n_lease_timer);
	n->n_lease_timer.data = n;
	uv_timer_start(&n->n_lease_timer, on_lease_timer, NODE_LEASE_CHECK_MS, NODE_LEASE_CHECK_MS);
	uv_timer_init(&n->n_loop, &n->n_timeout_timer);
	n->n_timeout_timer.data = n;
	uv_timer_start(&n->n_timeout_timer, on_timeout_timer, 500, 500);

	storage_set_commit_observer(sc->st, observe_backend_commit, &n->n_metrics.nm_backend_commit);
	/* Applies may share one LMDB commit (etcd's backend batch interval and limit). */
	storage_set_commit_window(sc->st, sc->cfg->backend_batch_interval_ms * 1000000u,
				  sc->cfg->backend_batch_limit ? (int64_t)sc->cfg->backend_batch_limit : 10000);
	n->n_compacting = 1; /* finish a physical compaction a crash cut short (none: one no-op batch) */
	/* A lone voter need not wait an election timeout to lead (etcd's tick advance). */
	if (atomic_load(&n->n_lone_voter)) {
		raft_campaign(n->n_raft);
		process_ready(n);
	}
	if (node_read_pool_start(n) != 0) {
		storage_set_commit_observer(sc->st, NULL, NULL);
		raft_close(n->n_raft);
		free(n);
		return STORAGE_ERR_NOMEM;
	}
	if (pthread_create(&n->n_thread, NULL, node_thread, n) != 0) {
		storage_set_commit_observer(sc->st, NULL, NULL);
		node_read_pool_stop(n);
		raft_close(n->n_raft);
		free(n);
		return STORAGE_ERR_NOMEM;
	}
	*out = n;
	return 0;
}

void node_stop(node *n)
{
	if (n == NULL)
		return;
	pthread_mutex_lock(&n->n_mu);
	n->n_stopping = 1;
	pthread_mutex_unlock(&n->n_mu);
	uv_async_send(&n->n_stop);
	pthread_join(n->n_thread, NULL);
	node_read_pool_stop(n);
	uv_loop_close(&n->n_loop);
}

void node_free(node *n)
{
	if (n == NULL)
		return;
	storage_set_commit_window(n->n_sc->st, 0, 0);
	storage_set_commit_observer(n->n_sc->st, NULL, NULL);
	raft_close(n->n_raft);
	pthread_mutex_destroy(&n->n_mu);
	free(n);
}
