/*
 * node_read.c - linearizable reads by read index (Raft thesis 6.4).
 *
 * Every read that arrives while a round is out waits for the next one: one ReadIndex round
 * (one heartbeat exchange) serves them all. Once the applied index reaches the index the
 * leader confirmed, a round's reads go to the read pool, whose threads serve them from local
 * storage: a page of a LIST encodes megabytes, which the loop (heartbeats, appends, the
 * apply) need not wait for. Serving later than that moment is still linearizable: the store
 * only moves forward. Barriers run on the loop: their callbacks expect it.
 */
#include <pthread.h>
#include <stdlib.h>
#include <sys/prctl.h>

#include "server/node_internal.h"

static void serve_one(node *n, node_req *r)
{
	server_ctx *sc = n->n_sc;
	if (r->nr_op == NODE_READ_BARRIER) {
		r->nr_done(r->nr_done_arg, 0);
		node_req_free(r);
		return;
	}
	/* Only what the read index covers need be visible: a write answered before the read
	 * began was committed by Raft first (a lone voter's entries are committed once durable;
	 * a voter-adding change is proposed alone, so none of its Ready's entries is a client's),
	 * hence its index is at most the read index. */
	storage_reader *rd;
	int rc = storage_read_begin_at(sc->st, r->nr_read_index, &rd);
	if (rc) {
		server_fail_storage(r->nr_call, rc);
		r->nr_call = NULL;
		node_req_free(r);
		return;
	}
	storage_arena a;
	storage_arena_init(&a);
	if (r->nr_op == NODE_READ_RANGE) {
		Etcdserverpb__RangeResponse resp = ETCDSERVERPB__RANGE_RESPONSE__INIT;
		rc = storage_range(rd, (const Etcdserverpb__RangeRequest *)r->nr_msg, &a, &resp);
		if (rc == 0) {
			server_fill_header(sc, resp.header);
			api_call_reply(r->nr_call, &resp.base);
		}
	} else {
		Etcdserverpb__TxnResponse resp = ETCDSERVERPB__TXN_RESPONSE__INIT;
		rc = storage_read_txn(rd, (const Etcdserverpb__TxnRequest *)r->nr_msg, &a, &resp);
		if (rc == 0) {
			server_fill_txn_headers(sc, &resp);
			api_call_reply(r->nr_call, &resp.base);
		}
	}
	if (rc)
		server_fail_storage(r->nr_call, rc);
	storage_read_end(rd);
	storage_arena_free(&a);
	r->nr_call = NULL;
	node_req_free(r);
}

void node_read_serve(node *n)
{
	uint64_t applied = atomic_load(&n->n_applied);
	read_round **pp = &n->n_rounds;
	while (*pp) {
		read_round *rr = *pp;
		if (rr->rr_index == 0 || rr->rr_index > applied) {
			pp = &rr->rr_next;
			continue;
		}
		*pp = rr->rr_next;
		node_req *next;
		read_pool *rp = &n->n_read_pool;
		for (node_req *r = rr->rr_reqs; r; r = next) {
			next = r->nr_next;
			r->nr_read_index = rr->rr_index;
			if (r->nr_op == NODE_READ_BARRIER || rp->rp_nthreads == 0) {
				serve_one(n, r);
				continue;
			}
			pthread_mutex_lock(&rp->rp_mu);
			node_req_append(&rp->rp_head, &rp->rp_tail, r);
			pthread_cond_signal(&rp->rp_cond);
			pthread_mutex_unlock(&rp->rp_mu);
		}
		free(rr);
	}
}

static void *read_worker(void *arg)
{
	prctl(PR_SET_NAME, "read-worker"); /* names the thread in top -H, perf, gdb */
	node *n = arg;
	read_pool *rp = &n->n_read_pool;
	pthread_mutex_lock(&rp->rp_mu);
	for (;;) {
		node_req *r = rp->rp_head;
		if (r == NULL) {
			if (rp->rp_stop)
				break;
			pthread_cond_wait(&rp->rp_cond, &rp->rp_mu);
			continue;
		}
		rp->rp_head = r->nr_next;
		if (rp->rp_head == NULL)
			rp->rp_tail = NULL;
		pthread_mutex_unlock(&rp->rp_mu);
		serve_one(n, r);
		pthread_mutex_lock(&rp->rp_mu);
	}
	pthread_mutex_unlock(&rp->rp_mu);
	return NULL;
}

int node_read_pool_start(node *n)
{
	read_pool *rp = &n->n_read_pool;
	if (pthread_mutex_init(&rp->rp_mu, NULL) != 0)
		return -1;
	if (pthread_cond_init(&rp->rp_cond, NULL) != 0) {
		pthread_mutex_destroy(&rp->rp_mu);
		return -1;
	}
	/* Fewer threads than asked still serve; none at all: the loop serves (node_read_serve). */
	while (rp->rp_nthreads < NODE_READ_WORKERS &&
	       pthread_create(&rp->rp_threads[rp->rp_nthreads], NULL, read_worker, n) == 0)
		rp->rp_nthreads++;
	return 0;
}

void node_read_pool_stop(node *n)
{
	read_pool *rp = &n->n_read_pool;
	pthread_mutex_lock(&rp->rp_mu);
	rp->rp_stop = 1;
	pthread_cond_broadcast(&rp->rp_cond);
	pthread_mutex_unlock(&rp->rp_mu);
	for (int i = 0; i < rp->rp_nthreads; i++)
		pthread_join(rp->rp_threads[i], NULL);
	rp->rp_nthreads = 0;
	pthread_cond_destroy(&rp->rp_cond);
	pthread_mutex_destroy(&rp->rp_mu);
}

void node_read_start_round(node *n)
{
	if (n->n_reads == NULL)
		return;
	read_round *rr = calloc(1, sizeof(*rr));
	if (rr == NULL)
		return;
	rr->rr_id = ++n->n_next_round;
	uint8_t ctx[8];
	for (int i = 0; i < 8; i++)
		ctx[i] = (uint8_t)(rr->rr_id >> (56 - 8 * i));
	int rc = raft_read_index(n->n_raft, ctx, sizeof(ctx));
	if (rc != 0) {
		node_req *next;
		for (node_req *r = n->n_reads; r; r = next) {
			next = r->nr_next;
			node_req_fail(r, API_ERR_NO_LEADER);
		}
		n->n_reads = NULL;
		free(rr);
		return;
	}
	rr->rr_reqs = n->n_reads;
	n->n_reads = NULL;
	rr->rr_next = n->n_rounds;
	n->n_rounds = rr;
}

void node_read_index_known(node *n, const struct raft_read_state *rs)
{
	if (rs->ctx_len != 8)
		return;
	uint64_t id = 0;
	for (int i = 0; i < 8; i++)
		id = id << 8 | rs->ctx[i];
	for (read_round *rr = n->n_rounds; rr; rr = rr->rr_next)
		if (rr->rr_id == id)
			rr->rr_index = rs->index ? rs->index : 1;
}
