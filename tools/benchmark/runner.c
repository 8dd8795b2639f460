/*
 * runner.c - the load engine on gRPC core's client API.
 *
 * `conns` channels, each with a local subchannel pool so that each is its own
 * TCP connection; `clients` slots, each keeping one unary call in flight (slot
 * g uses channel g % conns); `threads` threads, each owning a completion queue
 * and the slots g with g % threads == its index. A unary call is one
 * grpc_call_start_batch with all six ops; on its completion the slot records
 * the latency and, while budget remains (--total, --duration), starts the next.
 *
 * Every loop is bounded: issuing stops at --total or --duration, every call
 * carries a --timeout deadline, and a thread that is still waiting past its
 * hard limit cancels what is in flight and drains.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "tools/benchmark/bench.h"

uint64_t bench_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static const char *status_names[BENCH_NSTATUS] = {
	"OK",	     "CANCELLED",	   "UNKNOWN",	     "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
	"ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
	"OUT_OF_RANGE",	"UNIMPLEMENTED",   "INTERNAL",	       "UNAVAILABLE",	   "DATA_LOSS",
	"UNAUTHENTICATED", "BAD_RESPONSE",
};

const char *bench_status_name(int code)
{
	return code >= 0 && code < BENCH_NSTATUS ? status_names[code] : "UNKNOWN";
}

struct thr;

struct slot {
	struct thr *t;
	grpc_channel *ch;
	grpc_call *call;
	grpc_metadata_array md_init, md_trail;
	grpc_byte_buffer *send, *recv;
	grpc_status_code status;
	grpc_slice details;
	uint64_t t0;
};

struct shared {
	const struct bench_opts *o;
	const struct bench_workload *w;
	atomic_uint_fast64_t issued;
	uint64_t start_ns, stop_ns; /* stop issuing at stop_ns (0 = never) */
	grpc_slice method;
};

struct thr {
	struct shared *sh;
	pthread_t tid;
	int idx;
	grpc_completion_queue *cq;
	struct slot *slots;
	int nslots;
	struct bench_rng rng;
	uint8_t *buf;
	size_t cap;
	uint32_t *lat;
	size_t nlat, caplat;
	double lat_sum;
	uint64_t ok, by_status[BENCH_NSTATUS];
	char first_error[BENCH_NSTATUS][200];
	uint64_t last_done_ns;
};

/* Claims request number *seq if the budget allows one more. */
static int may_issue(struct shared *sh, uint64_t *seq)
{
	if (sh->stop_ns && bench_now_ns() >= sh->stop_ns)
		return 0;
	uint64_t n = atomic_fetch_add(&sh->issued, 1);
	if (sh->o->total && n >= sh->o->total)
		return 0;
	*seq = n;
	return 1;
}

static void note_error(struct thr *t, int code, const char *msg, size_t len)
{
	if (code < 0 || code >= BENCH_NSTATUS)
		code = 2;
	if (t->by_status[code]++ == 0) {
		if (len >= sizeof t->first_error[code])
			len = sizeof t->first_error[code] - 1;
		memcpy(t->first_error[code], msg, len);
		t->first_error[code][len] = 0;
	}
}

static int start_call(struct thr *t, struct slot *s, uint64_t seq)
{
	struct shared *sh = t->sh;
	size_t n = sh->w->encode(sh->o, seq, &t->rng, &t->buf, &t->cap);
	grpc_slice sl = grpc_slice_from_copied_buffer((const char *)t->buf, n);
	s->send = grpc_raw_byte_buffer_create(&sl, 1);
	grpc_slice_unref(sl);
	s->recv = NULL;
	s->details = grpc_empty_slice();
	grpc_metadata_array_init(&s->md_init);
	grpc_metadata_array_init(&s->md_trail);
	gpr_timespec deadline = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
					     gpr_time_from_millis((int64_t)(sh->o->timeout * 1000), GPR_TIMESPAN));
	s->call = grpc_channel_create_call(s->ch, NULL, GRPC_PROPAGATE_DEFAULTS, t->cq, sh->method, NULL, deadline,
					   NULL);
	grpc_op ops[6];
	memset(ops, 0, sizeof ops);
	ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
	ops[1].op = GRPC_OP_SEND_MESSAGE;
	ops[1].data.send_message.send_message = s->send;
	ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
	ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
	ops[3].data.recv_initial_metadata.recv_initial_metadata = &s->md_init;
	ops[4].op = GRPC_OP_RECV_MESSAGE;
	ops[4].data.recv_message.recv_message = &s->recv;
	ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
	ops[5].data.recv_status_on_client.trailing_metadata = &s->md_trail;
	ops[5].data.recv_status_on_client.status = &s->status;
	ops[5].data.recv_status_on_client.status_details = &s->details;
	s->t0 = bench_now_ns();
	grpc_call_error e = grpc_call_start_batch(s->call, ops, 6, s, NULL);
	if (e != GRPC_CALL_OK) {
		char m[64];
		int l = snprintf(m, sizeof m, "grpc_call_start_batch: error %d", (int)e);
		note_error(t, 13, m, (size_t)l);
		grpc_call_unref(s->call);
		s->call = NULL;
		grpc_byte_buffer_destroy(s->send);
		s->send = NULL;
		grpc_metadata_array_destroy(&s->md_init);
		grpc_metadata_array_destroy(&s->md_trail);
		return -1;
	}
	return 0;
}

static void record_latency(struct thr *t, uint64_t ns)
{
	if (t->nlat == t->caplat) {
		size_t c = t->caplat ? t->caplat * 2 : 4096;
		uint32_t *n = realloc(t->lat, c * sizeof *n);
		if (!n)
			abort();
		t->lat = n;
		t->caplat = c;
	}
	uint64_t us = ns / 1000;
	if (us > UINT32_MAX)
		us = UINT32_MAX;
	t->lat[t->nlat++] = (uint32_t)us;
	t->lat_sum += (double)ns / 1000.0;
}

static void finish_call(struct thr *t, struct slot *s, int success)
{
	uint64_t now = bench_now_ns();
	const struct bench_workload *w = t->sh->w;
	if (!success) {
		note_error(t, 2, "batch completed with success=0", 30);
	} else if (s->status != GRPC_STATUS_OK) {
		char *d = grpc_slice_to_c_string(s->details);
		note_error(t, (int)s->status, d, strlen(d));
		gpr_free(d);
	} else if (!s->recv) {
		note_error(t, BENCH_STATUS_DECODE, "OK status without a response message", 36);
	} else {
		grpc_byte_buffer_reader rd;
		int bad = 1;
		if (grpc_byte_buffer_reader_init(&rd, s->recv)) {
			grpc_slice all = grpc_byte_buffer_reader_readall(&rd);
			grpc_byte_buffer_reader_destroy(&rd);
			ProtobufCMessage *m = protobuf_c_message_unpack(w->resp_desc, NULL, GRPC_SLICE_LENGTH(all),
									GRPC_SLICE_START_PTR(all));
			if (m) {
				bad = w->check(t->sh->o, m) != 0;
				protobuf_c_message_free_unpacked(m, NULL);
			}
			grpc_slice_unref(all);
		}
		if (bad) {
			note_error(t, BENCH_STATUS_DECODE, "response did not decode or failed its check", 43);
		} else {
			t->ok++;
			record_latency(t, now - s->t0);
		}
	}
	t->last_done_ns = now;
	if (s->recv)
		grpc_byte_buffer_destroy(s->recv);
	s->recv = NULL;
	grpc_byte_buffer_destroy(s->send);
	s->send = NULL;
	grpc_slice_unref(s->details);
	grpc_metadata_array_destroy(&s->md_init);
	grpc_metadata_array_destroy(&s->md_trail);
	grpc_call_unref(s->call);
	s->call = NULL;
}

static void *thr_main(void *arg)
{
	struct thr *t = arg;
	struct shared *sh = t->sh;
	int active = 0;
	uint64_t seq;
	for (int i = 0; i < t->nslots; i++)
		if (may_issue(sh, &seq) && start_call(t, &t->slots[i], seq) == 0)
			active++;
	/* A thread waits at most this long past the end of issuing before cancelling. */
	uint64_t grace = (uint64_t)((sh->o->timeout + 5.0) * 1e9);
	int cancelled = 0;
	uint64_t last_progress = bench_now_ns();
	while (active > 0) {
		grpc_event ev = grpc_completion_queue_next(
			t->cq, gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(200, GPR_TIMESPAN)),
			NULL);
		uint64_t now = bench_now_ns();
		if (ev.type == GRPC_QUEUE_TIMEOUT) {
			if (!cancelled && now - last_progress > grace) {
				for (int i = 0; i < t->nslots; i++)
					if (t->slots[i].call)
						grpc_call_cancel(t->slots[i].call, NULL);
				cancelled = 1;
			}
			continue;
		}
		if (ev.type != GRPC_OP_COMPLETE)
			break; /* shutdown: cannot happen before we shut it down */
		last_progress = now;
		struct slot *s = ev.tag;
		finish_call(t, s, ev.success);
		active--;
		if (!cancelled && may_issue(sh, &seq) && start_call(t, s, seq) == 0)
			active++;
	}
	return NULL;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return x < y ? -1 : x > y;
}

static grpc_channel *make_channel(const char *endpoint)
{
	const char *target = endpoint;
	if (strncmp(target, "http://", 7) == 0)
		target += 7;
	grpc_arg args[3] = {
		{GRPC_ARG_INTEGER, GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, {.integer = 1}},
		{GRPC_ARG_INTEGER, GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, {.integer = -1}},
		{GRPC_ARG_INTEGER, GRPC_ARG_ENABLE_RETRIES, {.integer = 0}},
	};
	grpc_channel_args ca = {3, args};
	grpc_channel_credentials *creds = grpc_insecure_credentials_create();
	grpc_channel *ch = grpc_channel_create(target, creds, &ca);
	grpc_channel_credentials_release(creds);
	return ch;
}

/* Waits until every channel is READY (connecting them all in parallel). */
static int wait_ready(grpc_channel **chs, int n, double timeout, char *err, size_t errlen)
{
	grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
	gpr_timespec deadline = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
					     gpr_time_from_millis((int64_t)(timeout * 1000), GPR_TIMESPAN));
	int pending = 0, rc = 0;
	for (int i = 0; i < n; i++) {
		grpc_connectivity_state st = grpc_channel_check_connectivity_state(chs[i], 1);
		if (st != GRPC_CHANNEL_READY) {
			grpc_channel_watch_connectivity_state(chs[i], st, deadline, cq, (void *)(intptr_t)i);
			pending++;
		}
	}
	while (pending > 0) {
		grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
		if (ev.type != GRPC_OP_COMPLETE)
			break;
		int i = (int)(intptr_t)ev.tag;
		grpc_connectivity_state st = grpc_channel_check_connectivity_state(chs[i], 1);
		if (st == GRPC_CHANNEL_READY) {
			pending--;
		} else if (!ev.success) { /* deadline passed */
			snprintf(err, errlen, "connection %d not ready after %.1fs (state %d)", i, timeout, (int)st);
			rc = -1;
			pending--;
		} else {
			grpc_channel_watch_connectivity_state(chs[i], st, deadline, cq, (void *)(intptr_t)i);
		}
	}
	grpc_completion_queue_shutdown(cq);
	while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type != GRPC_QUEUE_SHUTDOWN)
		;
	grpc_completion_queue_destroy(cq);
	return rc;
}

int bench_run(const struct bench_opts *o, const struct bench_workload *w, struct bench_result *res)
{
	memset(res, 0, sizeof *res);
	struct shared sh = {.o = o, .w = w};
	atomic_init(&sh.issued, 0);
	sh.method = grpc_slice_from_static_string(w->method);

	/* Encode once single-threaded so lazily built shared state (the value) exists. */
	{
		uint8_t *b = NULL;
		size_t c = 0;
		struct bench_rng r = {.s = 1};
		w->encode(o, 0, &r, &b, &c);
		free(b);
	}

	grpc_init();
	grpc_channel **chs = calloc((size_t)o->conns, sizeof *chs);
	for (int i = 0; i < o->conns; i++)
		chs[i] = make_channel(o->endpoints[i % o->n_endpoints]);
	if (wait_ready(chs, o->conns, o->dial_timeout, res->setup_error, sizeof res->setup_error) != 0) {
		res->setup_failed = 1;
		for (int i = 0; i < o->conns; i++)
			grpc_channel_destroy(chs[i]);
		free(chs);
		grpc_shutdown();
		return -1;
	}

	int nt = o->threads;
	struct thr *ts = calloc((size_t)nt, sizeof *ts);
	for (int i = 0; i < nt; i++) {
		ts[i].sh = &sh;
		ts[i].idx = i;
		ts[i].cq = grpc_completion_queue_create_for_next(NULL);
		ts[i].slots = calloc((size_t)(o->clients / nt + 1), sizeof(struct slot));
		ts[i].rng.s = 0x1234567ULL * (uint64_t)(i + 1) ^ bench_now_ns();
		if (o->total) {
			size_t want = (size_t)(o->total / (uint64_t)nt + 16);
			if (want > (1u << 22))
				want = 1u << 22;
			ts[i].lat = malloc(want * sizeof(uint32_t));
			ts[i].caplat = ts[i].lat ? want : 0;
		}
	}
	for (int g = 0; g < o->clients; g++) {
		struct thr *t = &ts[g % nt];
		struct slot *s = &t->slots[t->nslots++];
		s->t = t;
		s->ch = chs[g % o->conns];
	}

	sh.start_ns = bench_now_ns();
	if (o->duration > 0)
		sh.stop_ns = sh.start_ns + (uint64_t)(o->duration * 1e9);
	for (int i = 0; i < nt; i++)
		pthread_create(&ts[i].tid, NULL, thr_main, &ts[i]);
	uint64_t end = sh.start_ns;
	for (int i = 0; i < nt; i++) {
		pthread_join(ts[i].tid, NULL);
		if (ts[i].last_done_ns > end)
			end = ts[i].last_done_ns;
	}
	res->elapsed = (double)(end - sh.start_ns) / 1e9;

	size_t n = 0;
	for (int i = 0; i < nt; i++)
		n += ts[i].nlat;
	res->lat_us = malloc((n ? n : 1) * sizeof(uint32_t));
	for (int i = 0; i < nt; i++) {
		struct thr *t = &ts[i];
		memcpy(res->lat_us + res->n_lat, t->lat, t->nlat * sizeof(uint32_t));
		res->n_lat += t->nlat;
		res->lat_sum_us += t->lat_sum;
		res->ok += t->ok;
		for (int c = 1; c < BENCH_NSTATUS; c++) {
			if (t->by_status[c] && !res->by_status[c])
				memcpy(res->first_error[c], t->first_error[c], sizeof res->first_error[c]);
			res->by_status[c] += t->by_status[c];
			res->errors += t->by_status[c];
		}
		free(t->lat);
		free(t->buf);
		free(t->slots);
		grpc_completion_queue_shutdown(t->cq);
		while (grpc_completion_queue_next(t->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
		       GRPC_QUEUE_SHUTDOWN)
			;
		grpc_completion_queue_destroy(t->cq);
	}
	qsort(res->lat_us, res->n_lat, sizeof(uint32_t), cmp_u32);
	free(ts);
	for (int i = 0; i < o->conns; i++)
		grpc_channel_destroy(chs[i]);
	free(chs);
	grpc_shutdown();
	return 0;
}
