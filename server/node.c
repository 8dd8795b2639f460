/*
 * node.c - the node loop: the one thread that writes.
 *
 * gRPC threads queue writes and wake the loop with uv_async_send(). Each turn the loop takes
 * everything queued, applies it in ONE storage batch (one LMDB write transaction), commits it
 * with ONE fsync, and only then replies: a write is durable before it is acknowledged.
 * Writes that arrive while a commit is in progress wait in the queue and share the next
 * batch: that is the group commit.
 *
 * A single member for now: each write is one log entry, and each start is a new term (the
 * election a lone member wins at boot). The replicated cluster puts Raft between the queue
 * and the batch.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "server/server.h"

/* Bounds a batch so one turn never holds replies back for long. */
#define NODE_MAX_BATCH 4096
/* Revisions removed per batch while a compaction is still being carried out. */
#define NODE_COMPACT_STEP 10000
/* How often expired leases are looked for, and at most how many are revoked per look
 * (etcd revokes at most 1000 leases a second, so expiry never floods the log). */
#define NODE_LEASE_CHECK_MS 500
#define NODE_LEASE_REVOKES_PER_CHECK 500

typedef struct node_req node_req;
struct node_req {
	node_op nr_op;
	api_call *nr_call;
	const ProtobufCMessage *nr_msg; /* owned by the call, or by the node when nr_call is NULL */
	ProtobufCMessage *nr_resp;      /* in the batch arena */
	int nr_err;                     /* storage error, 0 if applied */
	alarm_change nr_alarm;          /* NODE_ALARM: what changed, made visible after commit */
	node_req *nr_next;
};

struct node {
	server_ctx *n_sc;
	uv_loop_t n_loop;
	uv_async_t n_wake;
	uv_async_t n_stop;
	uv_timer_t n_lease_timer;
	pthread_t n_thread;

	pthread_mutex_t n_mu; /* guards the queue */
	node_req *n_head, *n_tail;
	int n_stopping;

	node_req *n_compact_waiters; /* physical compactions waiting for the removal to finish */
	int n_compacting;

	_Atomic uint64_t n_term;
	_Atomic uint64_t n_applied;
	_Atomic uint64_t n_stat_requests;
	_Atomic uint64_t n_stat_commits;
};

uint64_t node_term(node *n)
{
	return atomic_load(&n->n_term);
}

uint64_t node_applied_index(node *n)
{
	return atomic_load(&n->n_applied);
}

void node_batch_stats(node *n, uint64_t *requests, uint64_t *commits)
{
	*requests = atomic_load(&n->n_stat_requests);
	*commits = atomic_load(&n->n_stat_commits);
}

void node_submit(node *n, node_op op, api_call *call, const ProtobufCMessage *msg)
{
	node_req *r = calloc(1, sizeof(*r));
	if (r == NULL) {
		if (call)
			api_call_fail_msg(call, 8 /* RESOURCE_EXHAUSTED */, "keelson: out of memory");
		else
			protobuf_c_message_free_unpacked((ProtobufCMessage *)msg, NULL);
		return;
	}
	r->nr_op = op;
	r->nr_call = call;
	r->nr_msg = msg;
	pthread_mutex_lock(&n->n_mu);
	int stopping = n->n_stopping;
	if (!stopping) {
		if (n->n_tail)
			n->n_tail->nr_next = r;
		else
			n->n_head = r;
		n->n_tail = r;
	}
	pthread_mutex_unlock(&n->n_mu);
	if (stopping) {
		free(r);
		if (call)
			api_call_fail(call, API_ERR_STOPPED);
		else
			protobuf_c_message_free_unpacked((ProtobufCMessage *)msg, NULL);
		return;
	}
	uv_async_send(&n->n_wake);
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
static int refused_for_space(node *n, const node_req *r)
{
	if (!alarm_nospace(n->n_sc->alarms))
		return 0;
	switch (r->nr_op) {
	case NODE_PUT:
	case NODE_LEASE_GRANT:
		return 1;
	case NODE_TXN:
		return txn_has_put((const Etcdserverpb__TxnRequest *)r->nr_msg);
	default:
		return 0;
	}
}

static int apply_one(node *n, storage_batch *b, node_req *r, storage_arena *a)
{
	if (refused_for_space(n, r))
		return STORAGE_ERR_NOSPACE;
	switch (r->nr_op) {
	case NODE_PUT: {
		Etcdserverpb__PutResponse *resp = storage_arena_alloc(a, sizeof(*resp));
		if (resp == NULL)
			return STORAGE_ERR_NOMEM;
		etcdserverpb__put_response__init(resp);
		r->nr_resp = &resp->base;
		return storage_batch_put(b, (const Etcdserverpb__PutRequest *)r->nr_msg, a, resp);
	}
	case NODE_DELETE_RANGE: {
		Etcdserverpb__DeleteRangeResponse *resp = storage_arena_alloc(a, sizeof(*resp));
		if (resp == NULL)
			return STORAGE_ERR_NOMEM;
		etcdserverpb__delete_range_response__init(resp);
		r->nr_resp = &resp->base;
		return storage_batch_delete_range(b, (const Etcdserverpb__DeleteRangeRequest *)r->nr_msg, a, resp);
	}
	case NODE_TXN: {
		Etcdserverpb__TxnResponse *resp = storage_arena_alloc(a, sizeof(*resp));
		if (resp == NULL)
			return STORAGE_ERR_NOMEM;
		etcdserverpb__txn_response__init(resp);
		r->nr_resp = &resp->base;
		return storage_batch_txn(b, (const Etcdserverpb__TxnRequest *)r->nr_msg, a, resp);
	}
	case NODE_COMPACT: {
		Etcdserverpb__CompactionResponse *resp = storage_arena_alloc(a, sizeof(*resp));
		if (resp == NULL)
			return STORAGE_ERR_NOMEM;
		etcdserverpb__compaction_response__init(resp);
		r->nr_resp = &resp->base;
		return storage_batch_compact(b, (const Etcdserverpb__CompactionRequest *)r->nr_msg, a, resp);
	}
	case NODE_LEASE_GRANT: {
		const Etcdserverpb__LeaseGrantRequest *req = (const Etcdserverpb__LeaseGrantRequest *)r->nr_msg;
		Etcdserverpb__LeaseGrantResponse *resp = storage_arena_alloc(a, sizeof(*resp));
		Etcdserverpb__ResponseHeader *h = storage_arena_alloc(a, sizeof(*h));
		if (resp == NULL || h == NULL)
			return STORAGE_ERR_NOMEM;
		etcdserverpb__lease_grant_response__init(resp);
		etcdserverpb__response_header__init(h);
		int rc = storage_batch_lease_grant(b, req->id, req->ttl);
		h->revision = storage_batch_revision(b);
		resp->header = h;
		resp->id = req->id;
		resp->ttl = req->ttl;
		r->nr_resp = &resp->base;
		return rc;
	}
	case NODE_LEASE_REVOKE: {
		Etcdserverpb__LeaseRevokeResponse *resp = storage_arena_alloc(a, sizeof(*resp));
		if (resp == NULL)
			return STORAGE_ERR_NOMEM;
		etcdserverpb__lease_revoke_response__init(resp);
		r->nr_resp = &resp->base;
		return storage_batch_lease_revoke(b, ((const Etcdserverpb__LeaseRevokeRequest *)r->nr_msg)->id, a, resp);
	}
	case NODE_ALARM: {
		Etcdserverpb__AlarmResponse *resp = storage_arena_alloc(a, sizeof(*resp));
		Etcdserverpb__ResponseHeader *h = storage_arena_alloc(a, sizeof(*h));
		if (resp == NULL || h == NULL)
			return STORAGE_ERR_NOMEM;
		etcdserverpb__alarm_response__init(resp);
		etcdserverpb__response_header__init(h);
		h->revision = storage_batch_revision(b);
		resp->header = h;
		r->nr_resp = &resp->base;
		return alarm_apply(n->n_sc->alarms, b, (const Etcdserverpb__AlarmRequest *)r->nr_msg, a, resp,
				   &r->nr_alarm);
	}
	case NODE_DEFRAG:
		break; /* never inside a batch: on_wake runs it alone */
	}
	return STORAGE_ERR_INVALID;
}

static void fill_headers(server_ctx *sc, node_req *r)
{
	switch (r->nr_op) {
	case NODE_PUT:
		server_fill_header(sc, ((Etcdserverpb__PutResponse *)r->nr_resp)->header);
		break;
	case NODE_DELETE_RANGE:
		server_fill_header(sc, ((Etcdserverpb__DeleteRangeResponse *)r->nr_resp)->header);
		break;
	case NODE_TXN:
		server_fill_txn_headers(sc, (Etcdserverpb__TxnResponse *)r->nr_resp);
		break;
	case NODE_COMPACT:
		server_fill_header(sc, ((Etcdserverpb__CompactionResponse *)r->nr_resp)->header);
		break;
	case NODE_LEASE_GRANT:
		server_fill_header(sc, ((Etcdserverpb__LeaseGrantResponse *)r->nr_resp)->header);
		break;
	case NODE_LEASE_REVOKE:
		server_fill_header(sc, ((Etcdserverpb__LeaseRevokeResponse *)r->nr_resp)->header);
		break;
	case NODE_ALARM:
		server_fill_header(sc, ((Etcdserverpb__AlarmResponse *)r->nr_resp)->header);
		break;
	case NODE_DEFRAG:
		break;
	}
}

/* Raises NOSPACE for this member (the map is full): an alarm is a write like any other. */
static void raise_nospace(node *n)
{
	Etcdserverpb__AlarmRequest *req = malloc(sizeof(*req));
	if (req == NULL)
		return;
	etcdserverpb__alarm_request__init(req);
	req->action = ETCDSERVERPB__ALARM_REQUEST__ALARM_ACTION__ACTIVATE;
	req->memberid = n->n_sc->mi.member_id;
	req->alarm = ETCDSERVERPB__ALARM_TYPE__NOSPACE;
	node_submit(n, NODE_ALARM, NULL, &req->base);
}

/* Defragment runs between batches, alone: it replaces the LMDB environment. */
static void run_defrag(node *n, node_req *r)
{
	int rc = storage_defragment(n->n_sc->st);
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
	free(r);
}

/* After commit: the lessor learns of grants and revokes; expiry revokes have no caller. */
static void finish_lease_op(node *n, node_req *r, int committed)
{
	lessor *l = n->n_sc->lessor;
	if (r->nr_op == NODE_LEASE_GRANT && committed && r->nr_err == 0) {
		const Etcdserverpb__LeaseGrantRequest *req = (const Etcdserverpb__LeaseGrantRequest *)r->nr_msg;
		lessor_granted(l, req->id, req->ttl);
	} else if (r->nr_op == NODE_LEASE_REVOKE) {
		int64_t id = ((const Etcdserverpb__LeaseRevokeRequest *)r->nr_msg)->id;
		if (committed && (r->nr_err == 0 || r->nr_err == STORAGE_ERR_LEASE_NOT_FOUND))
			lessor_revoked(l, id);
		else if (r->nr_call == NULL)
			lessor_revoke_failed(l, id);
	}
}

/* Keeps removing compacted revisions, one bounded batch per loop turn, then releases the
 * physical compactions waiting for it. */
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
	storage_arena a;
	storage_arena_init(&a);
	while (n->n_compact_waiters) {
		node_req *r = n->n_compact_waiters;
		n->n_compact_waiters = r->nr_next;
		Etcdserverpb__CompactionResponse resp = ETCDSERVERPB__COMPACTION_RESPONSE__INIT;
		Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
		storage_stats st;
		if (storage_stat(n->n_sc->st, &st) == 0)
			h.revision = st.st_revision;
		server_fill_header(n->n_sc, &h);
		resp.header = &h;
		api_call_reply(r->nr_call, &resp.base);
		free(r);
	}
	storage_arena_free(&a);
}

static void on_wake(uv_async_t *h)
{
	node *n = h->data;
	server_ctx *sc = n->n_sc;

	for (;;) {
		pthread_mutex_lock(&n->n_mu);
		node_req *head = n->n_head;
		node_req *rest = NULL;
		/* Take at most NODE_MAX_BATCH; leave the rest queued for the next turn. */
		node_req *last = head;
		int count = head ? 1 : 0;
		while (last && last->nr_next && count < NODE_MAX_BATCH) {
			last = last->nr_next;
			count++;
		}
		if (last) {
			rest = last->nr_next;
			last->nr_next = NULL;
		}
		n->n_head = rest;
		if (rest == NULL)
			n->n_tail = NULL;
		/* A defragment ends the batch before it, and runs alone. */
		if (head && head->nr_op == NODE_DEFRAG) {
			node_req *d = head;
			head = d->nr_next;
			d->nr_next = NULL;
			if (head) {
				node_req *t = head;
				while (t->nr_next)
					t = t->nr_next;
				t->nr_next = n->n_head;
				if (n->n_head == NULL)
					n->n_tail = t;
				n->n_head = head;
			}
			pthread_mutex_unlock(&n->n_mu);
			run_defrag(n, d);
			continue;
		}
		for (node_req *t = head; t && t->nr_next; t = t->nr_next) {
			if (t->nr_next->nr_op == NODE_DEFRAG) {
				node_req *back = t->nr_next;
				node_req *u = back;
				while (u->nr_next)
					u = u->nr_next;
				u->nr_next = n->n_head;
				if (n->n_head == NULL)
					n->n_tail = u;
				n->n_head = back;
				t->nr_next = NULL;
				count = 0;
				for (node_req *c = head; c; c = c->nr_next)
					count++;
				break;
			}
		}
		pthread_mutex_unlock(&n->n_mu);
		if (head == NULL)
			break;

		storage_arena a;
		storage_arena_init(&a);
		storage_batch *b;
		int rc = storage_batch_begin(sc->st, &b);
		uint64_t applied = atomic_load(&n->n_applied);
		Mvccpb__Event **events = NULL;
		size_t nevents = 0;
		int64_t rev = 0;
		if (rc == 0) {
			for (node_req *r = head; r; r = r->nr_next) {
				r->nr_err = apply_one(n, b, r, &a);
				applied++;
			}
			rc = storage_batch_events(b, &a, &events, &nevents, &rev);
			if (rc == 0)
				rc = storage_batch_commit(b, applied);
			else
				storage_batch_abort(b);
		}
		/* Watchers hear of a batch only once it is durable, and before its writers do:
		 * a client that sees its put acknowledged may count on its watch having it. */
		if (rc == 0)
			watch_hub_notify(sc->hub, events, nevents, rev);
		if (rc == 0) {
			atomic_store(&n->n_applied, applied);
			atomic_fetch_add(&n->n_stat_requests, (uint64_t)count);
			atomic_fetch_add(&n->n_stat_commits, 1);
		} else {
			log_at(LOG_ERROR, "batch commit failed", "error", storage_strerror(rc), NULL);
		}
		int nospace = rc == STORAGE_ERR_NOSPACE;
		node_req *next;
		for (node_req *r = head; r; r = next) {
			next = r->nr_next;
			finish_lease_op(n, r, rc == 0);
			if (rc == 0 && r->nr_op == NODE_ALARM && r->nr_err == 0)
				alarm_commit(sc->alarms, &r->nr_alarm);
			if (r->nr_err == STORAGE_ERR_NOSPACE && r->nr_op != NODE_ALARM && !alarm_nospace(sc->alarms))
				nospace = 1;
			if (r->nr_call == NULL) {
				/* An expiry revoke: nobody waits for it. */
				if (rc == 0 && r->nr_err != 0 && r->nr_err != STORAGE_ERR_LEASE_NOT_FOUND)
					log_at(LOG_WARN, "failed to revoke expired lease", "error",
					       storage_strerror(r->nr_err), NULL);
				protobuf_c_message_free_unpacked((ProtobufCMessage *)r->nr_msg, NULL);
				free(r);
				continue;
			}
			if (rc != 0) {
				server_fail_storage(r->nr_call, rc);
			} else if (r->nr_err != 0) {
				server_fail_storage(r->nr_call, r->nr_err);
			} else if (r->nr_op == NODE_COMPACT &&
				   ((const Etcdserverpb__CompactionRequest *)r->nr_msg)->physical) {
				/* Reply once the compacted revisions are gone from disk. */
				n->n_compacting = 1;
				r->nr_next = n->n_compact_waiters;
				n->n_compact_waiters = r;
				continue;
			} else {
				if (r->nr_op == NODE_COMPACT)
					n->n_compacting = 1;
				fill_headers(sc, r);
				api_call_reply(r->nr_call, r->nr_resp);
			}
			free(r);
		}
		storage_arena_free(&a);
		if (nospace)
			raise_nospace(n);
	}
	if (n->n_compacting)
		compact_continue(n);
}

/* Queues a revoke for each expired lease; they commit with the next batch. */
static void on_lease_timer(uv_timer_t *t)
{
	node *n = t->data;
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
		/* Freed with protobuf-c's free, like a decoded request (it is a flat message). */
		node_submit(n, NODE_LEASE_REVOKE, NULL, &req->base);
	}
}

static void on_stop(uv_async_t *h)
{
	node *n = h->data;
	/* Nothing is queued after n_stopping is set: apply what is, so every call gets its reply. */
	on_wake(&n->n_wake);
	while (n->n_compact_waiters) {
		node_req *r = n->n_compact_waiters;
		n->n_compact_waiters = r->nr_next;
		api_call_fail(r->nr_call, API_ERR_STOPPED);
		free(r);
	}
	uv_close((uv_handle_t *)&n->n_lease_timer, NULL);
	uv_close((uv_handle_t *)&n->n_wake, NULL);
	uv_close((uv_handle_t *)&n->n_stop, NULL);
}

static void *node_thread(void *arg)
{
	node *n = arg;
	uv_run(&n->n_loop, UV_RUN_DEFAULT);
	return NULL;
}

/* A lone member wins an election at every start: a new term, and its empty entry. */
static int node_boot(node *n)
{
	storage *st = n->n_sc->st;
	storage_reader *r;
	storage_arena a;
	uint64_t term = 0;
	storage_arena_init(&a);
	int rc = storage_read_begin(st, &r);
	if (rc)
		return rc;
	void *val;
	size_t len;
	rc = storage_read_meta(r, "term", &a, &val, &len);
	if (rc == 0 && len == 8) {
		for (int i = 0; i < 8; i++)
			term = term << 8 | ((uint8_t *)val)[i];
	} else if (rc != 0 && rc != STORAGE_ERR_NOT_FOUND) {
		storage_read_end(r);
		storage_arena_free(&a);
		return rc;
	}
	storage_read_end(r);
	storage_arena_free(&a);

	storage_stats stats;
	rc = storage_stat(st, &stats);
	if (rc)
		return rc;
	term = term == 0 ? 2 : term + 1; /* etcd's lone member is at term 2 after its first start */
	uint8_t be[8];
	for (int i = 0; i < 8; i++)
		be[i] = (uint8_t)(term >> (56 - 8 * i));
	storage_batch *b;
	rc = storage_batch_begin(st, &b);
	if (rc)
		return rc;
	rc = storage_batch_meta_put(b, "term", be, sizeof(be));
	if (rc) {
		storage_batch_abort(b);
		return rc;
	}
	rc = storage_batch_commit(b, stats.st_applied_index + 1);
	if (rc)
		return rc;
	atomic_store(&n->n_term, term);
	atomic_store(&n->n_applied, stats.st_applied_index + 1);
	return 0;
}

int node_start(node **out, server_ctx *sc)
{
	node *n = calloc(1, sizeof(*n));
	if (n == NULL)
		return STORAGE_ERR_NOMEM;
	n->n_sc = sc;
	int rc = node_boot(n);
	if (rc) {
		free(n);
		return rc;
	}
	pthread_mutex_init(&n->n_mu, NULL);
	uv_loop_init(&n->n_loop);
	uv_async_init(&n->n_loop, &n->n_wake, on_wake);
	uv_async_init(&n->n_loop, &n->n_stop, on_stop);
	n->n_wake.data = n;
	n->n_stop.data = n;
	uv_timer_init(&n->n_loop, &n->n_lease_timer);
	n->n_lease_timer.data = n;
	uv_timer_start(&n->n_lease_timer, on_lease_timer, NODE_LEASE_CHECK_MS, NODE_LEASE_CHECK_MS);
	if (pthread_create(&n->n_thread, NULL, node_thread, n) != 0) {
		uv_loop_close(&n->n_loop);
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
	/* Drain what is queued, then close. */
	uv_async_send(&n->n_wake);
	uv_async_send(&n->n_stop);
	pthread_join(n->n_thread, NULL);
	uv_loop_close(&n->n_loop);
}

void node_free(node *n)
{
	if (n == NULL)
		return;
	pthread_mutex_destroy(&n->n_mu);
	free(n);
}
