/*
 * rangestream.c - KV.RangeStream (etcd 3.7): a Range answered in chunks, so that a LIST of
 * any size never sits whole in the member's memory.
 *
 * etcd's layout, which a client undoes with proto Merge of every message:
 *   1st message   header{cluster_id, member_id, raft_term}
 *   1st chunk     header{revision}, kvs
 *   middle chunks kvs
 *   last chunk    kvs, count, more
 * Every chunk is read from one LMDB read transaction, so all of them see one revision even
 * while writes go on. The chunk starts at 10 keys and adapts to --max-request-bytes as
 * etcd's does: doubled while an encoded chunk is under half of it, cut to 2/3 while it is
 * over twice it. Sorted or filtered requests (and count_only or single-key ones, which are
 * small) are answered as one message holding the whole Range answer, as etcd falls back.
 *
 * Each stream runs on a thread of its own (a LIST may take seconds; it must not hold a gRPC
 * thread), and waits while more than --max-request-bytes are queued and not yet taken by
 * the client: with gRPC's flow control, a slow client slows the reads, not the memory.
 * At shutdown rangestream_drain() ends the streams at their next chunk ("server stopped")
 * and waits for their threads, which read the store, before it is closed.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/prctl.h>

#include "server/server.h"

#define CHUNK_FIRST_KEYS 10

/* One read-index wait, shared by the stream's thread and the node loop (two references). */
typedef struct barrier {
	pthread_mutex_t b_mu;
	pthread_cond_t b_cv;
	int b_refs;
	int b_done;
	int b_err; /* 0, or an api_error + 1 */
} barrier;

/* The streams whose thread still runs, so that shutdown can wait for them. */
struct rangestream_set {
	pthread_mutex_t rs_mu;
	pthread_cond_t rs_cv;
	int rs_running;
	_Atomic int rs_stopping; /* the member is shutting down: streams end at their next chunk */
};

typedef struct rs_job {
	server_ctx *rj_sc;
	api_stream *rj_st;
	Etcdserverpb__RangeRequest *rj_req; /* owned: unpacked copy of the request */
} rs_job;

static void barrier_release(barrier *b)
{
	pthread_mutex_lock(&b->b_mu);
	int last = --b->b_refs == 0;
	pthread_mutex_unlock(&b->b_mu);
	if (last) {
		pthread_cond_destroy(&b->b_cv);
		pthread_mutex_destroy(&b->b_mu);
		free(b);
	}
}

/* node_read_barrier's callback, on the node loop. */
static void barrier_done(void *arg, int err)
{
	barrier *b = arg;
	pthread_mutex_lock(&b->b_mu);
	b->b_done = 1;
	b->b_err = err;
	pthread_cond_signal(&b->b_cv);
	pthread_mutex_unlock(&b->b_mu);
	barrier_release(b);
}

/* A linearizable read's wait, as kv_range's: 0, or an api_error + 1. */
static int wait_read_index(server_ctx *sc)
{
	if (!node_reads_need_index(sc->nd))
		return 0; /* one voter: everything acknowledged is applied */
	barrier *b = calloc(1, sizeof(*b));
	if (b == NULL)
		return API_ERR_INTERNAL + 1;
	pthread_mutex_init(&b->b_mu, NULL);
	pthread_cond_init(&b->b_cv, NULL);
	b->b_refs = 2;
	node_read_barrier(sc->nd, barrier_done, b);
	/* etcd's request timeout: 5 s plus two elections. */
	struct timespec until;
	clock_gettime(CLOCK_REALTIME, &until);
	uint64_t ms = 5000 + 2 * sc->cfg->election_ms;
	until.tv_sec += (time_t)(ms / 1000);
	until.tv_nsec += (long)(ms % 1000) * 1000000L;
	if (until.tv_nsec >= 1000000000L) {
		until.tv_sec++;
		until.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&b->b_mu);
	while (!b->b_done)
		if (pthread_cond_timedwait(&b->b_cv, &b->b_mu, &until) == ETIMEDOUT)
			break;
	int err = b->b_done ? b->b_err : API_ERR_TIMEOUT + 1;
	pthread_mutex_unlock(&b->b_mu);
	barrier_release(b);
	return err;
}

static void finish_api_error(api_stream *st, int err_plus_1)
{
	const char *msg;
	int code = api_error_status((api_error)(err_plus_1 - 1), &msg);
	api_stream_finish(st, code, msg);
}

static void finish_storage_error(api_stream *st, int err)
{
	const char *msg;
	int code = server_storage_status(err, &msg);
	api_stream_finish(st, code, msg);
}

static int stopping(server_ctx *sc)
{
	return atomic_load(&sc->rangestreams->rs_stopping);
}

/* Waits until the client has taken what is queued beyond max; -1 if the stream is over or
 * the member is stopping. */
static int wait_for_room(server_ctx *sc, api_stream *st, size_t max)
{
	struct timespec ms = {0, 1000000};
	while (api_stream_queued_bytes(st) > max) {
		if (api_stream_closed(st) || stopping(sc))
			return -1;
		nanosleep(&ms, NULL);
	}
	return api_stream_closed(st) || stopping(sc) ? -1 : 0;
}

static long send_range(api_stream *st, Etcdserverpb__RangeResponse *rr)
{
	Etcdserverpb__RangeStreamResponse m = ETCDSERVERPB__RANGE_STREAM_RESPONSE__INIT;
	m.range_response = rr;
	return api_stream_send_msg(st, &m.base);
}

/* Requests whose answer etcd does not chunk: it sends the Range answer whole. */
static int answered_whole(const Etcdserverpb__RangeRequest *req)
{
	return req->sort_order != ETCDSERVERPB__RANGE_REQUEST__SORT_ORDER__NONE ||
	       req->sort_target != ETCDSERVERPB__RANGE_REQUEST__SORT_TARGET__KEY ||
	       req->min_mod_revision || req->max_mod_revision || req->min_create_revision ||
	       req->max_create_revision || req->count_only || req->range_end.len == 0;
}

/* The whole answer in one message; 0 or a storage error. */
static int stream_whole(server_ctx *sc, api_stream *st, storage_reader *r,
			const Etcdserverpb__RangeRequest *req)
{
	storage_arena a;
	storage_arena_init(&a);
	Etcdserverpb__RangeResponse resp = ETCDSERVERPB__RANGE_RESPONSE__INIT;
	int rc = storage_range(r, req, &a, &resp);
	if (rc == 0) {
		server_fill_header(sc, resp.header);
		send_range(st, &resp);
	}
	storage_arena_free(&a);
	return rc;
}

/* The chunked answer; 0, a storage error, or 1 if the client went away or the member stops. */
static int stream_chunks(server_ctx *sc, api_stream *st, storage_reader *r,
			 const Etcdserverpb__RangeRequest *req)
{
	size_t max_bytes = sc->cfg->max_request_bytes;
	Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
	server_fill_header(sc, &h);
	Etcdserverpb__RangeResponse first = ETCDSERVERPB__RANGE_RESPONSE__INIT;
	first.header = &h;
	if (send_range(st, &first) < 0)
		return 1;

	Etcdserverpb__RangeRequest page = *req;
	/* The next chunk's start key: the last key sent, then a zero byte (owned). */
	uint8_t *cursor = NULL;
	int64_t left = req->limit; /* keys the client still wants; 0 = all */
	int64_t chunk = CHUNK_FIRST_KEYS;
	int64_t total = 0;
	int rc = 0;
	for (int n = 0;; n++) {
		storage_arena a;
		storage_arena_init(&a);
		Etcdserverpb__RangeResponse resp = ETCDSERVERPB__RANGE_RESPONSE__INIT;
		page.limit = left > 0 && left < chunk ? left : chunk;
		/* Only the first chunk counts every key of the range; the others stop at theirs. */
		rc = n == 0 ? storage_range(r, &page, &a, &resp) : storage_range_page(r, &page, &a, &resp);
		if (rc) {
			storage_arena_free(&a);
			break;
		}
		if (n == 0)
			total = resp.count;
		if (left > 0)
			left -= (int64_t)resp.n_kvs;
		int last = !resp.more || (req->limit > 0 && left <= 0);
		Etcdserverpb__ResponseHeader rev = ETCDSERVERPB__RESPONSE_HEADER__INIT;
		rev.revision = resp.header->revision;
		resp.header = n == 0 ? &rev : NULL;
		resp.count = last ? total : 0;
		/* Range's more: keys past the limit; a chunk's own says only that keys follow. */
		resp.more = last && req->limit > 0 && resp.more;
		if (!last) {
			const ProtobufCBinaryData *k = &resp.kvs[resp.n_kvs - 1]->key;
			uint8_t *next = malloc(k->len + 1);
			if (next == NULL) {
				storage_arena_free(&a);
				rc = STORAGE_ERR_NOMEM;
				break;
			}
			memcpy(next, k->data, k->len);
			next[k->len] = 0;
			free(cursor);
			cursor = next;
			page.key.data = cursor;
			page.key.len = k->len + 1;
		}
		size_t size = protobuf_c_message_get_packed_size(&resp.base);
		long sent = send_range(st, &resp);
		storage_arena_free(&a);
		if (sent < 0) {
			rc = 1;
			break;
		}
		if (last)
			break;
		if (size < max_bytes / 2)
			chunk *= 2;
		else if (size > 2 * max_bytes && chunk > 1)
			chunk = chunk * 2 / 3;
		if (wait_for_room(sc, st, max_bytes) != 0) {
			rc = 1;
			break;
		}
	}
	free(cursor);
	return rc;
}

static void *rangestream_thread(void *arg)
{
	prctl(PR_SET_NAME, "range-stream"); /* names the thread in top -H, perf, gdb */
	rs_job *job = arg;
	server_ctx *sc = job->rj_sc;
	api_stream *st = job->rj_st;
	const Etcdserverpb__RangeRequest *req = job->rj_req;
	int err = req->serializable ? 0 : wait_read_index(sc);
	if (err) {
		finish_api_error(st, err);
	} else {
		storage_reader *r;
		int rc = storage_read_begin(sc->st, &r);
		if (rc == 0) {
			rc = answered_whole(req) ? stream_whole(sc, st, r, req) : stream_chunks(sc, st, r, req);
			storage_read_end(r);
		}
		if (rc < 0)
			finish_storage_error(st, rc);
		else if (rc > 0 && stopping(sc))
			finish_api_error(st, API_ERR_STOPPED + 1);
		else
			api_stream_finish(st, 0, NULL);
	}
	protobuf_c_message_free_unpacked(&job->rj_req->base, NULL);
	api_stream_release(st);
	free(job);
	struct rangestream_set *set = sc->rangestreams;
	pthread_mutex_lock(&set->rs_mu);
	if (--set->rs_running == 0)
		pthread_cond_broadcast(&set->rs_cv);
	pthread_mutex_unlock(&set->rs_mu);
	return NULL;
}

/* A copy of the request that outlives on_message (msg is valid during the call only). */
static Etcdserverpb__RangeRequest *copy_request(const ProtobufCMessage *msg)
{
	size_t len = protobuf_c_message_get_packed_size(msg);
	uint8_t *buf = malloc(len ? len : 1);
	if (buf == NULL)
		return NULL;
	protobuf_c_message_pack(msg, buf);
	Etcdserverpb__RangeRequest *req = etcdserverpb__range_request__unpack(NULL, len, buf);
	free(buf);
	return req;
}

static void rangestream_on_message(void *ctx, api_stream *st, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	const Etcdserverpb__RangeRequest *req = (const Etcdserverpb__RangeRequest *)msg;
	int bad = kv_check_range(req);
	if (bad) {
		finish_api_error(st, bad);
		return;
	}
	/* The gate of Range: auth (checked here, on the gRPC thread that knows the peer's
	 * certificate), then a learner serves serializable reads only. */
	size_t toklen = 0;
	const char *tok = api_stream_metadata(st, "token", &toklen);
	int aerr = auth_check_range(sc->auth, tok, toklen, 0, &req->key, &req->range_end);
	if (aerr) {
		finish_storage_error(st, aerr);
		return;
	}
	if (!req->serializable && node_is_learner(sc->nd)) {
		api_stream_finish(st, 9 /* FAILED_PRECONDITION */, "etcdserver: rpc not supported for learner");
		return;
	}
	rs_job *job = calloc(1, sizeof(*job));
	if (job == NULL || (job->rj_req = copy_request(msg)) == NULL) {
		free(job);
		api_stream_finish(st, 8 /* RESOURCE_EXHAUSTED */, "keelson: out of memory");
		return;
	}
	job->rj_sc = sc;
	job->rj_st = st;
	api_stream_retain(st);
	struct rangestream_set *set = sc->rangestreams;
	pthread_mutex_lock(&set->rs_mu);
	int refuse = atomic_load(&set->rs_stopping);
	if (!refuse)
		set->rs_running++;
	pthread_mutex_unlock(&set->rs_mu);
	if (refuse) {
		protobuf_c_message_free_unpacked(&job->rj_req->base, NULL);
		free(job);
		finish_api_error(st, API_ERR_STOPPED + 1);
		api_stream_release(st);
		return;
	}
	pthread_t t;
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	if (pthread_create(&t, &attr, rangestream_thread, job) != 0) {
		protobuf_c_message_free_unpacked(&job->rj_req->base, NULL);
		free(job);
		api_stream_finish(st, 8, "keelson: cannot start the range stream");
		api_stream_release(st);
		pthread_mutex_lock(&set->rs_mu);
		set->rs_running--;
		pthread_mutex_unlock(&set->rs_mu);
	}
	pthread_attr_destroy(&attr);
}

static const api_stream_handlers rangestream_handlers = {
	.on_message = rangestream_on_message,
};

int rangestream_register(api_server *as, server_ctx *sc)
{
	struct rangestream_set *set = calloc(1, sizeof(*set));
	if (set == NULL)
		return API_ERR_SYS;
	pthread_mutex_init(&set->rs_mu, NULL);
	pthread_cond_init(&set->rs_cv, NULL);
	sc->rangestreams = set;
	return api_server_route_stream(as, "/etcdserverpb.KV/RangeStream", &rangestream_handlers, sc);
}

void rangestream_drain(server_ctx *sc)
{
	struct rangestream_set *set = sc->rangestreams;
	if (set == NULL)
		return;
	pthread_mutex_lock(&set->rs_mu);
	atomic_store(&set->rs_stopping, 1);
	while (set->rs_running > 0)
		pthread_cond_wait(&set->rs_cv, &set->rs_mu);
	pthread_mutex_unlock(&set->rs_mu);
}

void rangestream_free(server_ctx *sc)
{
	struct rangestream_set *set = sc->rangestreams;
	if (set == NULL)
		return;
	pthread_cond_destroy(&set->rs_cv);
	pthread_mutex_destroy(&set->rs_mu);
	free(set);
	sc->rangestreams = NULL;
}
