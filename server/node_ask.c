/*
 * node_ask.c - members asking each other (server.h, node_ask), on the peer transport's
 * request channel (peer.h, REQUESTS).
 *
 * Asking: a gRPC thread (or the corruption check's) queues the question like a proposal;
 * the node loop keeps it in n_asks until it is answered or its deadline passes. A question
 * for "the leader" follows etcd's forwarding loop (v3_server.go LeaseRenew/LeaseTimeToLive):
 * wait for a leader, ask it, and ask again 50 ms after a lost connection, a leader change or
 * an answer from a member that no longer leads. When the deadline passes it ends with
 * etcd's ErrNoLeader if no leader was known, else ErrTimeout.
 *
 * Answering: lease questions are answered at once on the loop (they only touch the
 * lessor and one lease); HashKV hashes the whole store, so it runs on libuv's threadpool
 * and is answered when done, keeping the loop (and the heartbeats) going meanwhile.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "server/node_internal.h"

/* etcd's throttle between forwarding attempts. */
#define ASK_RETRY_MS 50

struct node_ask_req {
	uint64_t na_to;        /* 0: the leader, whoever it is */
	uint8_t na_method;
	uint8_t *na_body;
	size_t na_len;
	uint64_t na_timeout_ms;
	uint64_t na_deadline_ms; /* set when the loop takes it */
	uint64_t na_call;      /* call in flight (peer_rpc), 0: none */
	uint64_t na_target;    /* the member na_call went to */
	uint64_t na_retry_ms;  /* no new attempt before this */
	node_ask_cb na_cb;
	void *na_ctx;
	node *na_node;
	node_ask_req *na_next;
};

static uint64_t now_ms(void)
{
	return node_now_ns() / 1000000;
}

uint64_t node_request_timeout_ms(node *n)
{
	return n->n_req_timeout_ms;
}

static void ask_free(node_ask_req *a)
{
	free(a->na_body);
	free(a);
}

void node_ask_abandon(node_ask_req *a)
{
	a->na_cb(a->na_ctx, NODE_ASK_ESTOPPED, NULL, 0);
	ask_free(a);
}

void node_ask(node *n, uint64_t to, int method, const void *body, size_t len, uint64_t timeout_ms,
	      node_ask_cb cb, void *ctx)
{
	node_ask_req *a = calloc(1, sizeof(*a));
	node_req *r = calloc(1, sizeof(*r));
	uint8_t *copy = len ? malloc(len) : NULL;
	if (a == NULL || r == NULL || (len && copy == NULL)) {
		free(a);
		free(r);
		free(copy);
		/* Nothing better to say: the member cannot take the question now. */
		cb(ctx, NODE_ASK_ESTOPPED, NULL, 0);
		return;
	}
	if (len)
		memcpy(copy, body, len);
	a->na_to = to;
	a->na_method = (uint8_t)method;
	a->na_body = copy;
	a->na_len = len;
	a->na_timeout_ms = timeout_ms ? timeout_ms : n->n_req_timeout_ms;
	a->na_cb = cb;
	a->na_ctx = ctx;
	r->nr_op = NODE_ASK;
	r->nr_ask = a;
	node_enqueue(n, r);
}

/* Unlinks a from n_asks and ends it. */
static void finish(node *n, node_ask_req *a, int status, const uint8_t *body, size_t len)
{
	for (node_ask_req **pp = &n->n_asks; *pp; pp = &(*pp)->na_next) {
		if (*pp == a) {
			*pp = a->na_next;
			break;
		}
	}
	if (a->na_call) {
		peer_rpc_cancel(n->n_rpc, a->na_call);
		a->na_call = 0;
	}
	a->na_cb(a->na_ctx, status, body, len);
	ask_free(a);
	if (n->n_asks == NULL)
		uv_timer_stop(&n->n_ask_timer);
}

/* The question answered here: this member is the one asked (it leads now). */
static void answer_locally(node *n, node_ask_req *a)
{
	uint8_t *out = NULL;
	size_t outlen = 0;
	int st;
	if (a->na_method == NODE_ASK_LEASE_RENEW || a->na_method == NODE_ASK_LEASE_TTL)
		st = lease_serve_peer(n->n_sc, n->n_role == RAFT_LEADER, a->na_method, a->na_body, a->na_len, &out,
				      &outlen);
	else if (a->na_method == NODE_ASK_HASHKV)
		st = corrupt_serve_hash_kv(n->n_sc, a->na_body, a->na_len, &out, &outlen);
	else
		st = PEER_RPC_ST_NO_METHOD;
	if (st == NODE_ANS_NOT_LEADER && a->na_to == 0) {
		a->na_retry_ms = now_ms() + ASK_RETRY_MS; /* the leader id is ahead of the role */
		free(out);
		return;
	}
	finish(n, a, st, out, outlen);
	free(out);
}

static void on_answer(void *ctx, uint64_t call_id, int status, const void *body, size_t len);

/* One attempt, if a is not waiting for an answer or a retry. */
static void try_ask(node *n, node_ask_req *a, uint64_t now)
{
	if (a->na_call || now < a->na_retry_ms)
		return;
	uint64_t self = n->n_sc->mi.member_id;
	uint64_t target = a->na_to ? a->na_to : atomic_load(&n->n_lead);
	if (target == 0)
		return; /* etcd's waitLeader */
	if (target == self) {
		answer_locally(n, a);
		return;
	}
	uint64_t left = a->na_deadline_ms > now ? a->na_deadline_ms - now : 1;
	uint64_t id = 0;
	int rc = peer_rpc_call(n->n_rpc, target, a->na_method, a->na_body, a->na_len, (unsigned)left, on_answer, a,
			       &id);
	if (rc == 0) {
		a->na_call = id;
		a->na_target = target;
	} else if (a->na_to != 0) {
		finish(n, a, rc == PEER_ECLOSED ? NODE_ASK_ESTOPPED : NODE_ASK_EUNREACHABLE, NULL, 0);
	} else {
		a->na_retry_ms = now + ASK_RETRY_MS;
	}
}

static void on_answer(void *ctx, uint64_t call_id, int status, const void *body, size_t len)
{
	node_ask_req *a = ctx;
	node *n = a->na_node;
	(void)call_id;
	a->na_call = 0;
	if (status == PEER_ECLOSED) {
		finish(n, a, NODE_ASK_ESTOPPED, NULL, 0);
	} else if (status == PEER_ETIMEDOUT) {
		/* An attempt's deadline is the question's: the member asked kept it all along
		 * (etcd: the HTTP request to a leader that hangs runs into the context's end). */
		finish(n, a, NODE_ASK_ETIMEDOUT, NULL, 0);
	} else if (status >= 0 && !(a->na_to == 0 && status == NODE_ANS_NOT_LEADER)) {
		finish(n, a, status, body, len);
	} else if (a->na_to != 0) {
		finish(n, a, status == PEER_ETIMEDOUT ? NODE_ASK_ETIMEDOUT : NODE_ASK_EUNREACHABLE, NULL, 0);
	} else {
		a->na_retry_ms = now_ms() + ASK_RETRY_MS; /* the leader moved or went away */
	}
}

/* Every ASK_RETRY_MS while questions wait: deadlines, then new attempts. */
static void on_ask_timer(uv_timer_t *t)
{
	node *n = t->data;
	uint64_t now = now_ms();
	node_ask_req *next;
	for (node_ask_req *a = n->n_asks; a; a = next) {
		next = a->na_next;
		if (now < a->na_deadline_ms)
			continue;
		/* etcd's ErrNoLeader comes from waitLeader: only when no attempt is in flight. */
		int no_leader = a->na_to == 0 && a->na_call == 0 && atomic_load(&n->n_lead) == 0;
		finish(n, a, no_leader ? NODE_ASK_ENOLEADER : NODE_ASK_ETIMEDOUT, NULL, 0);
	}
	/* An attempt ends at most its own question (answered locally, or not sendable), and
	 * the callbacks only queue new ones: next stays valid. */
	for (node_ask_req *a = n->n_asks; a; a = next) {
		next = a->na_next;
		try_ask(n, a, now);
	}
}

void node_ask_begin(node *n, node_ask_req *a)
{
	a->na_node = n;
	uint64_t now = now_ms();
	a->na_deadline_ms = now + a->na_timeout_ms;
	a->na_next = n->n_asks;
	if (n->n_asks == NULL)
		uv_timer_start(&n->n_ask_timer, on_ask_timer, ASK_RETRY_MS, ASK_RETRY_MS);
	n->n_asks = a;
	try_ask(n, a, now);
}

void node_ask_leader_changed(node *n, uint64_t lead)
{
	/* Questions in flight to a member that no longer leads go to the new one next tick.
	 * Losing the leader (lead 0) leaves them waiting for the old one's answer, as etcd's
	 * forwarding does; a new leader is asked at once (etcd keeps waiting on the old one
	 * until its request fails or times out). */
	if (lead == 0)
		return;
	for (node_ask_req *a = n->n_asks; a; a = a->na_next) {
		if (a->na_to != 0 || a->na_call == 0 || a->na_target == lead)
			continue;
		peer_rpc_cancel(n->n_rpc, a->na_call);
		a->na_call = 0;
		a->na_retry_ms = 0;
	}
}

/* ---- answering ---- */

int node_ans_error(int storage_err, uint8_t **out, size_t *outlen)
{
	const char *msg;
	int code = server_storage_status(storage_err, &msg);
	size_t ml = strlen(msg);
	*out = malloc(1 + ml);
	*outlen = 0;
	if (*out) {
		(*out)[0] = (uint8_t)code;
		memcpy(*out + 1, msg, ml);
		*outlen = 1 + ml;
	}
	return NODE_ANS_ERROR;
}

int node_ans_error_decode(const uint8_t *body, size_t len, char *msg, size_t msglen)
{
	if (body == NULL || len < 1 || msglen == 0 || body[0] > 16)
		return -1;
	size_t ml = len - 1 < msglen - 1 ? len - 1 : msglen - 1;
	memcpy(msg, body + 1, ml);
	msg[ml] = '\0';
	/* The message goes into logs and gRPC details: no control bytes. */
	for (size_t i = 0; i < ml; i++)
		if ((unsigned char)msg[i] < 0x20)
			msg[i] = '?';
	return body[0];
}

typedef struct hash_work {
	uv_work_t hw_req;
	node *hw_node;
	uint64_t hw_from, hw_call;
	uint8_t *hw_body;
	size_t hw_len;
	int hw_status;
	uint8_t *hw_out;
	size_t hw_outlen;
} hash_work;

static void hash_work_run(uv_work_t *req)
{
	hash_work *w = req->data;
	w->hw_status = corrupt_serve_hash_kv(w->hw_node->n_sc, w->hw_body, w->hw_len, &w->hw_out, &w->hw_outlen);
}

/*
 * Sends an answer. One the transport cannot take (too big for a frame, the peer's queue
 * full) would leave the asker waiting for its whole deadline: it gets a short error
 * answer instead, and if even that does not go, the reason is logged.
 */
static void respond(node *n, uint64_t to, uint64_t call_id, int status, const uint8_t *body, size_t len)
{
	int rc = peer_rpc_respond(n->n_rpc, to, call_id, (uint8_t)status, body, len);
	if (rc == PEER_ETOOBIG) {
		/* etcd's ErrGRPCRequestTooLarge: InvalidArgument */
		static const char msg[] = "\x03" "etcdserver: request is too large";
		rc = peer_rpc_respond(n->n_rpc, to, call_id, NODE_ANS_ERROR, (const uint8_t *)msg, sizeof(msg) - 1);
	}
	if (rc != 0) {
		char id[20];
		snprintf(id, sizeof(id), "%llx", (unsigned long long)to);
		log_at(LOG_WARN, "cannot answer a peer's request", "to", id, "error", peer_strerror(rc), NULL);
	}
}

static void hash_work_done(uv_work_t *req, int status)
{
	hash_work *w = req->data;
	node *n = w->hw_node;
	/* After node_ask_close() the channel is gone: the asker times out. */
	if (status == 0 && !n->n_ask_closed)
		respond(n, w->hw_from, w->hw_call, w->hw_status, w->hw_out, w->hw_outlen);
	free(w->hw_body);
	free(w->hw_out);
	free(w);
}

static void on_request(void *ctx, uint64_t from, uint64_t call_id, uint8_t method, const void *body, size_t len)
{
	node *n = ctx;
	uint8_t *out = NULL;
	size_t outlen = 0;
	int st;
	switch (method) {
	case NODE_ASK_LEASE_RENEW:
	case NODE_ASK_LEASE_TTL:
		st = lease_serve_peer(n->n_sc, n->n_role == RAFT_LEADER, method, body, len, &out, &outlen);
		break;
	case NODE_ASK_HASHKV: {
		hash_work *w = calloc(1, sizeof(*w));
		uint8_t *copy = len ? malloc(len) : NULL;
		if (w == NULL || (len && copy == NULL)) {
			free(w);
			free(copy);
			return; /* the asker times out */
		}
		if (len)
			memcpy(copy, body, len);
		w->hw_req.data = w;
		w->hw_node = n;
		w->hw_from = from;
		w->hw_call = call_id;
		w->hw_body = copy;
		w->hw_len = len;
		if (uv_queue_work(&n->n_loop, &w->hw_req, hash_work_run, hash_work_done) != 0) {
			free(copy);
			free(w);
		}
		return;
	}
	case NODE_ASK_PING:
		st = NODE_ANS_OK;
		break;
	default:
		st = PEER_RPC_ST_NO_METHOD;
	}
	respond(n, from, call_id, st, out, outlen);
	free(out);
}

/*
 * etcd's prober: every few seconds each member times a round trip to every peer, kept per
 * peer in etcd_network_peer_round_trip_time_seconds{To="<id>"}.
 */
#define PROBE_INTERVAL_MS 4000 /* etcd's proberInterval: ConnReadTimeout - 1 s */

typedef struct probe {
	node *p_node;
	uint64_t p_to;
	uint64_t p_start_ns;
} probe;

static void probe_answered(void *ctx, int status, const uint8_t *body, size_t len)
{
	(void)body;
	(void)len;
	probe *p = ctx;
	node_metrics *m = &p->p_node->n_metrics;
	if (status == NODE_ANS_OK) {
		uint64_t took = node_now_ns() - p->p_start_ns;
		int slot = -1;
		for (int i = 0; i < NODE_RTT_PEERS && slot < 0; i++)
			if (atomic_load(&m->nm_rtt[i].id) == p->p_to)
				slot = i;
		for (int i = 0; i < NODE_RTT_PEERS && slot < 0; i++) {
			uint64_t free_id = 0;
			/* only this loop's thread writes ids; the exchange keeps /metrics' reads whole */
			if (atomic_compare_exchange_strong(&m->nm_rtt[i].id, &free_id, p->p_to))
				slot = i;
		}
		if (slot >= 0)
			histogram_observe(&m->nm_rtt[slot].h, took);
	}
	free(p);
}

static void on_probe_timer(uv_timer_t *t)
{
	node *n = t->data;
	server_ctx *sc = n->n_sc;
	storage_etcd_member ms[MEMBER_LIST_MAX];
	storage_arena a;
	storage_arena_init(&a);
	size_t nm = members_export(sc->members, ms, MEMBER_LIST_MAX, &a);
	for (size_t i = 0; i < nm; i++) {
		if (ms[i].em_id == sc->mi.member_id)
			continue;
		probe *p = malloc(sizeof(*p));
		if (p == NULL)
			break;
		*p = (probe){n, ms[i].em_id, node_now_ns()};
		node_ask(n, ms[i].em_id, NODE_ASK_PING, NULL, 0, PROBE_INTERVAL_MS, probe_answered, p);
	}
	storage_arena_free(&a);
}

int node_ask_init(node *n)
{
	int rc = peer_rpc_init(&n->n_rpc, n->n_peers, &n->n_loop, FRAME_RPC, on_request, n);
	if (rc != 0)
		return rc;
	uv_timer_init(&n->n_loop, &n->n_ask_timer);
	n->n_ask_timer.data = n;
	uv_timer_init(&n->n_loop, &n->n_probe_timer);
	n->n_probe_timer.data = n;
	uv_timer_start(&n->n_probe_timer, on_probe_timer, PROBE_INTERVAL_MS, PROBE_INTERVAL_MS);
	return 0;
}

void node_ask_close(node *n)
{
	n->n_ask_closed = 1;
	/* Each question in flight ends ESTOPPED through its call's PEER_ECLOSED... */
	peer_rpc_close(n->n_rpc);
	/* ...and those waiting for a leader or a retry end here. */
	while (n->n_asks)
		finish(n, n->n_asks, NODE_ASK_ESTOPPED, NULL, 0);
	uv_close((uv_handle_t *)&n->n_ask_timer, NULL);
	uv_close((uv_handle_t *)&n->n_probe_timer, NULL);
}
