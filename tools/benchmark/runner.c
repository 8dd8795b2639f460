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
	void *state; /* the workload's per-client bytes */
	struct bench_call bc;
};

struct shared {
	const struct bench_opts *o;
	const struct bench_workload *w;
	atomic_uint_fast64_t issued;
	uint64_t start_ns, stop_ns; /* stop issuing at stop_ns (0 = never) */
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
	struct bench_op_result ops[BENCH_MAX_OPS]; /* per op class (mixed workloads) */
	size_t op_cap[BENCH_MAX_OPS];
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
	s->bc = (struct bench_call){0, sh->w->method, sh->w->resp_desc};
	size_t n = sh->w->encode(sh->o, seq, &t->rng, s->state, &s->bc, &t->buf, &t->cap);
	grpc_slice sl = grpc_slice_from_copied_buffer((const char *)t->buf, n);
	s->send = grpc_raw_byte_buffer_create(&sl, 1);
	grpc_slice_unref(sl);
	s->recv = NULL;
	s->details = grpc_empty_slice();
	grpc_metadata_array_init(&s->md_init);
	grpc_metadata_array_init(&s->md_trail);
	gpr_timespec deadline = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
					     gpr_time_from_millis((int64_t)(sh->o->timeout * 1000), GPR_TIMESPAN));
	s->call = grpc_channel_create_call(s->ch, NULL, GRPC_PROPAGATE_DEFAULTS, t->cq,
					   grpc_slice_from_static_string(s->bc.method), NULL, deadline, NULL);
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

static void record_op(struct thr *t, int k, uint64_t ns)
{
	struct bench_op_result *op = &t->ops[k];
	struct thr tmp = {.lat = op->lat_us, .nlat = op->n_lat, .caplat = t->op_cap[k], .lat_sum = op->lat_sum_us};
	record_latency(&tmp, ns);
	op->lat_us = tmp.lat;
	op->n_lat = tmp.nlat;
	t->op_cap[k] = tmp.caplat;
	op->lat_sum_us = tmp.lat_sum;
}

static void finish_call(struct thr *t, struct slot *s, int success)
{
	uint64_t now = bench_now_ns();
	const struct bench_workload *w = t->sh->w;
	int k = s->bc.op >= 0 && s->bc.op < BENCH_MAX_OPS ? s->bc.op : 0;
	struct bench_op_result *op = &t->ops[k];
	uint64_t ok_before = t->ok;
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
			int v = BENCH_CHECK_BAD;
			if (w->check_wire) {
				v = w->check_wire(t->sh->o, s->state, &s->bc, GRPC_SLICE_START_PTR(all),
						  GRPC_SLICE_LENGTH(all));
			} else {
				ProtobufCMessage *m = protobuf_c_message_unpack(s->bc.resp_desc, NULL, GRPC_SLICE_LENGTH(all),
										GRPC_SLICE_START_PTR(all));
				if (m) {
					v = w->check(t->sh->o, s->state, &s->bc, m);
					protobuf_c_message_free_unpacked(m, NULL);
				}
			}
			bad = v != BENCH_CHECK_OK && v != BENCH_CHECK_CONFLICT;
			if (v == BENCH_CHECK_CONFLICT)
				op->conflicts++;
			grpc_slice_unref(all);
		}
		if (bad) {
			note_error(t, BENCH_STATUS_DECODE, "response did not decode or failed its check", 43);
		} else {
			t->ok++;
			record_latency(t, now - s->t0);
			op->ok++;
			record_op(t, k, now - s->t0);
		}
	}
	if (t->ok == ok_before)
		op->errors++;
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

void bench_sort_u32(uint32_t *v, size_t n)
{
	qsort(v, n, sizeof *v, cmp_u32);
}

grpc_channel *bench_channel(const char *endpoint)
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

	/* Encode once single-threaded so lazily built shared state (the value) exists. */
	{
		uint8_t *b = NULL;
		size_t c = 0;
		struct bench_rng r = {.s = 1};
		void *st = calloc(1, w->state_size ? w->state_size : 1);
		struct bench_call bc = {0, w->method, w->resp_desc};
		w->encode(o, 0, &r, st, &bc, &b, &c);
		free(st);
		free(b);
	}

	grpc_init();
	grpc_channel **chs = calloc((size_t)o->conns, sizeof *chs);
	for (int i = 0; i < o->conns; i++)
		chs[i] = bench_channel(o->endpoints[i % o->n_endpoints]);
	if (wait_ready(chs, o->conns, o->dial_timeout, res->setup_error, sizeof res->setup_error) != 0) {
		res->setup_failed = 1;
		for (int i = 0; i < o->conns; i++)
			grpc_channel_destroy(chs[i]);
		free(chs);
		grpc_shutdown();
		return -1;
	}
	if (w->prepare && w->prepare(o, chs[0], res->setup_error, sizeof res->setup_error) != 0) {
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
		s->state = w->state_size ? calloc(1, w->state_size) : NULL;
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
		for (int k = 0; k < BENCH_MAX_OPS; k++) {
			struct bench_op_result *d = &res->ops[k], *sop = &t->ops[k];
			if (sop->n_lat) {
				uint32_t *nl = realloc(d->lat_us, (d->n_lat + sop->n_lat) * sizeof(uint32_t));
				if (!nl)
					abort();
				memcpy(nl + d->n_lat, sop->lat_us, sop->n_lat * sizeof(uint32_t));
				d->lat_us = nl;
				d->n_lat += sop->n_lat;
			}
			d->lat_sum_us += sop->lat_sum_us;
			d->ok += sop->ok;
			d->conflicts += sop->conflicts;
			d->errors += sop->errors;
			res->conflicts += sop->conflicts;
			free(sop->lat_us);
		}
		for (int i2 = 0; i2 < t->nslots; i2++)
			free(t->slots[i2].state);
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
	res->n_ops = w->n_ops > 1 ? w->n_ops : 0;
	for (int k = 0; k < res->n_ops && k < BENCH_MAX_OPS; k++) {
		res->ops[k].name = w->op_names[k];
		qsort(res->ops[k].lat_us, res->ops[k].n_lat, sizeof(uint32_t), cmp_u32);
	}
	if (!res->n_ops)
		for (int k = 0; k < BENCH_MAX_OPS; k++) {
			free(res->ops[k].lat_us);
			res->ops[k] = (struct bench_op_result){0};
		}
	free(ts);
	if (w->finish)
		w->finish(o, res);
	for (int i = 0; i < o->conns; i++)
		grpc_channel_destroy(chs[i]);
	free(chs);
	grpc_shutdown();
	return 0;
}

/* ============================================================================================
 * Streaming workloads: `watch` and `lease-keepalive` (bidirectional streams on gRPC core).
 *
 * watch: `watchers` watchers on `prefixes` prefixes (watcher i watches prefix i % prefixes),
 *   carried by `watch_streams` Watch streams (stream s on channel s % conns, served by thread
 *   s % threads; watcher i on stream i % watch_streams). Each stream sends its create requests
 *   (pipelined, one SEND_MESSAGE at a time) and keeps one RECV_MESSAGE outstanding. When every
 *   watcher is created (and, with --ready-file, after the file has been created and then removed
 *   by the caller: the idle-memory window), a writer on its own channel puts key
 *   "bw/PPPPP/SSSSSSSS" (prefix P, per-prefix sequence S) at --rate puts/s for --duration, value =
 *   send time (CLOCK_MONOTONIC ns, decimal) padded to --val-size. Each event is checked against a
 *   per-watcher bitmap (duplicates), its mod_revision against the watcher's last (order), and at
 *   the end against the successful puts of its prefix (missing); delivery latency = receive time
 *   minus the value's timestamp. Throughput = events received / (first put .. last event).
 *   Responses are walked in place (no protobuf-c unpack, no allocation per event), so the
 *   generator costs far less per event than a server does (its CPU is reported: client_cpu_s).
 *   Saturation (--ramp F --step S): the rate is multiplied by F every S seconds; each step's
 *   events are those of the puts it sent (by the value's timestamp), with their own latency
 *   histogram; the writer stops after the first step at whose end more than one second of its
 *   events is still undelivered. A step kept up if all its events arrived, its delivered
 *   events/s (received during the step) reached 90% of what it offered, and its delivery p99
 *   stayed under --max-p99-ms; the report's max_sustained is the best such step.
 *
 * lease-keepalive: `leases` leases granted up front (TTL 600), then `clients` LeaseKeepAlive
 *   streams over `conns` channels, each ping-ponging keep-alive requests for leases in turn
 *   until --duration (or --total) is reached.
 * ============================================================================================ */
#include <errno.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "api/proto/rpc.pb-c.h"

enum { OP_SEND = 0, OP_RECV = 1, OP_STATUS = 2 };

struct sstream;
struct optag {
	struct sstream *s;
	int kind;
};

struct wwatcher {
	int prefix;
	int64_t last_rev;
	uint64_t *bits;
};

struct sstream {
	int idx;
	int thread;
	grpc_channel *ch;
	grpc_call *call;
	struct optag tags[3];
	int pending; /* ops outstanding */
	int closed;  /* status received */
	grpc_byte_buffer *send, *recv;
	grpc_metadata_array md_init, md_trail;
	grpc_status_code status;
	grpc_slice details;
	int started_init_md;
	/* watch */
	int *watchers; /* global watcher indexes on this stream, creation order */
	int nw, n_sent, n_created;
	int64_t *ht_key; /* watch_id -> position, open addressing */
	int *ht_val;
	int ht_mask;
	/* keepalive */
	int send_done, recv_done;
	uint64_t t0;
	uint64_t ka_next;
};

/* Delivery latency histogram: exact below 64 us, then 32 buckets per power of two (3%). */
#define LH_BUCKETS (64 + 32 * 32)
#define WSTEPS 32

static int lh_bucket(uint64_t us)
{
	if (us < 64)
		return (int)us;
	int e = 63 - __builtin_clzll(us); /* >= 6 */
	if (e > 37)
		return LH_BUCKETS - 1;
	return 64 + (e - 6) * 32 + (int)((us >> (e - 5)) & 31);
}

static uint64_t lh_value(int b)
{
	if (b < 64)
		return (uint64_t)b;
	int e = (b - 64) / 32 + 6, sub = (b - 64) % 32;
	return (uint64_t)(32 + sub) << (e - 5);
}

struct sshared {
	const struct bench_opts *o;
	int is_watch;
	/* watch steps: writer start (0 until it starts) and step length */
	atomic_uint_fast64_t wstart_ns;
	uint64_t step_ns;
	atomic_uint_fast64_t recv_step[WSTEPS]; /* events received during each step */
	atomic_uint_fast64_t expected_so_far;	/* events the acknowledged puts must produce */
	int *per_prefix;			/* watchers per prefix */
	struct sstream *streams;
	int nstreams;
	struct wwatcher *w;
	int nbits_words;
	atomic_int created;
	atomic_int stop;
	atomic_uint_fast64_t events, dups, ooo, unexpected, bad, canceled;
	atomic_uint_fast64_t last_event_ns;
	int64_t *lease_ids;
	int nleases;
	uint64_t stop_ns;
	atomic_uint_fast64_t issued;
};

struct sthr {
	struct sshared *sh;
	pthread_t tid;
	int idx;
	grpc_completion_queue *cq;
	uint32_t *lat;
	size_t nlat, caplat;
	double lat_sum;
	uint64_t ok, by_status[BENCH_NSTATUS];
	char first_error[BENCH_NSTATUS][200];
	uint64_t last_done_ns;
	uint64_t step_events[WSTEPS];
	uint32_t *step_hist; /* WSTEPS x LH_BUCKETS */
};

static void snote_error(struct sthr *t, int code, const char *msg)
{
	if (code < 0 || code >= BENCH_NSTATUS)
		code = 2;
	if (t->by_status[code]++ == 0)
		snprintf(t->first_error[code], sizeof t->first_error[code], "%s", msg);
}

static void srecord(struct sthr *t, uint64_t ns)
{
	struct thr tmp = {0};
	tmp.lat = t->lat;
	tmp.nlat = t->nlat;
	tmp.caplat = t->caplat;
	tmp.lat_sum = t->lat_sum;
	record_latency(&tmp, ns);
	t->lat = tmp.lat;
	t->nlat = tmp.nlat;
	t->caplat = tmp.caplat;
	t->lat_sum = tmp.lat_sum;
}

static grpc_byte_buffer *pack_msg(const ProtobufCMessage *m)
{
	size_t n = protobuf_c_message_get_packed_size(m);
	uint8_t *b = malloc(n ? n : 1);
	protobuf_c_message_pack(m, b);
	grpc_slice sl = grpc_slice_from_copied_buffer((const char *)b, n);
	free(b);
	grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&sl, 1);
	grpc_slice_unref(sl);
	return bb;
}

static ProtobufCMessage *unpack_bb(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *bb)
{
	grpc_byte_buffer_reader rd;
	if (!grpc_byte_buffer_reader_init(&rd, bb))
		return NULL;
	grpc_slice all = grpc_byte_buffer_reader_readall(&rd);
	grpc_byte_buffer_reader_destroy(&rd);
	ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, GRPC_SLICE_LENGTH(all), GRPC_SLICE_START_PTR(all));
	grpc_slice_unref(all);
	return m;
}

static char prefix_buf_unused;

static void prefix_key(int p, char *out) /* "bw/PPPPP/" */
{
	sprintf(out, "bw/%05d/", p);
}

static int stream_send(struct sstream *s, grpc_byte_buffer *bb, int with_init)
{
	grpc_op ops[2];
	memset(ops, 0, sizeof ops);
	int n = 0;
	if (with_init)
		ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
	ops[n].op = GRPC_OP_SEND_MESSAGE;
	ops[n++].data.send_message.send_message = bb;
	s->send = bb;
	if (grpc_call_start_batch(s->call, ops, (size_t)n, &s->tags[OP_SEND], NULL) != GRPC_CALL_OK) {
		grpc_byte_buffer_destroy(bb);
		s->send = NULL;
		return -1;
	}
	s->pending++;
	return 0;
}

static int stream_recv(struct sstream *s)
{
	grpc_op ops[2];
	memset(ops, 0, sizeof ops);
	int n = 0;
	if (!s->started_init_md) {
		ops[n].op = GRPC_OP_RECV_INITIAL_METADATA;
		ops[n++].data.recv_initial_metadata.recv_initial_metadata = &s->md_init;
		s->started_init_md = 1;
	}
	ops[n].op = GRPC_OP_RECV_MESSAGE;
	ops[n++].data.recv_message.recv_message = &s->recv;
	s->recv = NULL;
	if (grpc_call_start_batch(s->call, ops, (size_t)n, &s->tags[OP_RECV], NULL) != GRPC_CALL_OK)
		return -1;
	s->pending++;
	return 0;
}

static int stream_open(struct sstream *s, grpc_completion_queue *cq, const char *method)
{
	for (int k = 0; k < 3; k++) {
		s->tags[k].s = s;
		s->tags[k].kind = k;
	}
	grpc_metadata_array_init(&s->md_init);
	grpc_metadata_array_init(&s->md_trail);
	s->details = grpc_empty_slice();
	s->call = grpc_channel_create_call(s->ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, grpc_slice_from_static_string(method),
					   NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
	grpc_op op;
	memset(&op, 0, sizeof op);
	op.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
	op.data.recv_status_on_client.trailing_metadata = &s->md_trail;
	op.data.recv_status_on_client.status = &s->status;
	op.data.recv_status_on_client.status_details = &s->details;
	if (grpc_call_start_batch(s->call, &op, 1, &s->tags[OP_STATUS], NULL) != GRPC_CALL_OK)
		return -1;
	s->pending++;
	return 0;
}

static grpc_byte_buffer *watch_create_msg(struct sshared *sh, int wi)
{
	char pk[32], pe[32];
	prefix_key(sh->w[wi].prefix, pk);
	strcpy(pe, pk);
	pe[strlen(pe) - 1]++; /* '/' -> '0': the prefix's range end */
	Etcdserverpb__WatchCreateRequest cr = ETCDSERVERPB__WATCH_CREATE_REQUEST__INIT;
	cr.key.data = (uint8_t *)pk;
	cr.key.len = strlen(pk);
	cr.range_end.data = (uint8_t *)pe;
	cr.range_end.len = strlen(pe);
	Etcdserverpb__WatchRequest rq = ETCDSERVERPB__WATCH_REQUEST__INIT;
	rq.request_union_case = ETCDSERVERPB__WATCH_REQUEST__REQUEST_UNION_CREATE_REQUEST;
	rq.create_request = &cr;
	return pack_msg(&rq.base);
}

static grpc_byte_buffer *keepalive_msg(int64_t id)
{
	Etcdserverpb__LeaseKeepAliveRequest rq = ETCDSERVERPB__LEASE_KEEP_ALIVE_REQUEST__INIT;
	rq.id = id;
	return pack_msg(&rq.base);
}

static void ht_put(struct sstream *s, int64_t key, int val)
{
	unsigned h = (unsigned)((uint64_t)key * 0x9e3779b97f4a7c15ULL >> 32) & (unsigned)s->ht_mask;
	while (s->ht_val[h] >= 0 && s->ht_key[h] != key)
		h = (h + 1) & (unsigned)s->ht_mask;
	s->ht_key[h] = key;
	s->ht_val[h] = val;
}

static int ht_get(struct sstream *s, int64_t key)
{
	unsigned h = (unsigned)((uint64_t)key * 0x9e3779b97f4a7c15ULL >> 32) & (unsigned)s->ht_mask;
	while (s->ht_val[h] >= 0) {
		if (s->ht_key[h] == key)
			return s->ht_val[h];
		h = (h + 1) & (unsigned)s->ht_mask;
	}
	return -1;
}

/* ---- the watch client counts events without unpacking (bench_pb_next) ---- */

/* An event's kv key, mod_revision and value (the parts the check needs). */
static int pb_event(const uint8_t *p, size_t len, const uint8_t **key, size_t *klen, int64_t *mod,
		    const uint8_t **val, size_t *vlen)
{
	const uint8_t *end = p + len, *kv = NULL, *q;
	size_t kvlen = 0;
	struct bench_pbf f;
	int r;
	while ((r = bench_pb_next(&p, end, &f)) == 1)
		if (f.num == 2 && f.wt == 2) {
			kv = f.p;
			kvlen = f.len;
		}
	if (r < 0 || kv == NULL)
		return -1;
	*key = *val = NULL;
	*klen = *vlen = 0;
	*mod = 0;
	q = kv;
	end = kv + kvlen;
	while ((r = bench_pb_next(&q, end, &f)) == 1) {
		if (f.num == 1 && f.wt == 2) {
			*key = f.p;
			*klen = f.len;
		} else if (f.num == 3 && f.wt == 0) {
			*mod = (int64_t)f.v;
		} else if (f.num == 5 && f.wt == 2) {
			*val = f.p;
			*vlen = f.len;
		}
	}
	return r;
}

static void watch_on_bytes(struct sthr *t, struct sstream *s, const uint8_t *buf, size_t len, uint64_t now)
{
	struct sshared *sh = t->sh;
	const uint8_t *p = buf, *end = buf + len;
	struct bench_pbf f;
	int r;
	int64_t watch_id = 0, compact = 0;
	int created = 0, canceled = 0;
	size_t n_events = 0;
	char reason[120] = "";
	/* first pass: the response's own fields (a merged response repeats them: last wins) */
	while ((r = bench_pb_next(&p, end, &f)) == 1) {
		if (f.wt == 0 && f.num == 2)
			watch_id = (int64_t)f.v;
		else if (f.wt == 0 && f.num == 3)
			created = f.v != 0;
		else if (f.wt == 0 && f.num == 4)
			canceled = f.v != 0;
		else if (f.wt == 0 && f.num == 5)
			compact = (int64_t)f.v;
		else if (f.wt == 2 && f.num == 6)
			snprintf(reason, sizeof reason, "%.*s", (int)(f.len < 100 ? f.len : 100), (const char *)f.p);
		else if (f.wt == 2 && f.num == 11)
			n_events++;
	}
	if (r < 0) {
		snote_error(t, BENCH_STATUS_DECODE, "WatchResponse did not decode");
		return;
	}
	if (created) {
		if (s->n_created < s->nw) {
			ht_put(s, watch_id, s->watchers[s->n_created]);
			s->n_created++;
			atomic_fetch_add(&sh->created, 1);
		} else {
			atomic_fetch_add(&sh->bad, 1);
		}
	}
	if (canceled) {
		atomic_fetch_add(&sh->canceled, 1);
		char m[200];
		snprintf(m, sizeof m, "watch %lld canceled: %s (compact_revision %lld)", (long long)watch_id, reason,
			 (long long)compact);
		snote_error(t, 9, m);
	}
	if (!n_events)
		return;
	int wi = ht_get(s, watch_id);
	if (wi < 0) {
		atomic_fetch_add(&sh->unexpected, n_events);
		return;
	}
	struct wwatcher *w = &sh->w[wi];
	uint64_t dups = 0, ooo = 0, unexp = 0;
	uint64_t ws = atomic_load(&sh->wstart_ns);
	p = buf;
	while (bench_pb_next(&p, end, &f) == 1) {
		if (f.wt != 2 || f.num != 11)
			continue;
		const uint8_t *key, *val;
		size_t klen, vlen;
		int64_t mod;
		if (pb_event(f.p, f.len, &key, &klen, &mod, &val, &vlen) < 0 || klen != 17) {
			unexp++;
			continue;
		}
		/* "bw/PPPPP/SSSSSSSS" */
		int pfx = 0;
		uint64_t seq = 0;
		for (int i = 3; i < 8; i++)
			pfx = pfx * 10 + (key[i] - '0');
		for (int i = 9; i < 17; i++)
			seq = seq * 10 + (uint64_t)(key[i] - '0');
		if (pfx != w->prefix || seq >= (uint64_t)sh->nbits_words * 64) {
			unexp++;
			continue;
		}
		if (mod <= w->last_rev)
			ooo++;
		else
			w->last_rev = mod;
		uint64_t bit = 1ULL << (seq & 63);
		if (w->bits[seq >> 6] & bit)
			dups++;
		w->bits[seq >> 6] |= bit;
		uint64_t ts = 0;
		for (size_t i = 0; i < vlen && i < 20 && val[i] >= '0' && val[i] <= '9'; i++)
			ts = ts * 10 + (uint64_t)(val[i] - '0');
		if (ts && ts <= now) {
			srecord(t, now - ts);
			if (ws && ts >= ws && sh->step_ns) {
				uint64_t k = (ts - ws) / sh->step_ns;
				if (k < WSTEPS) {
					t->step_events[k]++;
					t->step_hist[k * LH_BUCKETS + (uint64_t)lh_bucket((now - ts) / 1000)]++;
				}
			}
		}
		t->ok++;
	}
	uint64_t got = n_events - unexp;
	atomic_fetch_add(&sh->events, got);
	if (ws && now >= ws && sh->step_ns) {
		uint64_t k = (now - ws) / sh->step_ns;
		if (k < WSTEPS)
			atomic_fetch_add(&sh->recv_step[k], got);
	}
	if (dups)
		atomic_fetch_add(&sh->dups, dups);
	if (ooo)
		atomic_fetch_add(&sh->ooo, ooo);
	if (unexp)
		atomic_fetch_add(&sh->unexpected, unexp);
	atomic_store(&sh->last_event_ns, now);
	t->last_done_ns = now;
}

static void ka_issue(struct sshared *sh, struct sstream *s)
{
	uint64_t n = atomic_fetch_add(&sh->issued, 1);
	if ((sh->o->total && n >= sh->o->total) || (sh->stop_ns && bench_now_ns() >= sh->stop_ns)) {
		grpc_call_cancel(s->call, NULL);
		return;
	}
	s->send_done = s->recv_done = 0;
	s->t0 = bench_now_ns();
	int64_t id = sh->lease_ids[n % (uint64_t)sh->nleases];
	if (stream_send(s, keepalive_msg(id), 0) != 0 || stream_recv(s) != 0)
		grpc_call_cancel(s->call, NULL);
}

static void *sthr_main(void *arg)
{
	struct sthr *t = arg;
	struct sshared *sh = t->sh;
	const char *method = sh->is_watch ? "/etcdserverpb.Watch/Watch" : "/etcdserverpb.Lease/LeaseKeepAlive";
	int open = 0;
	for (int i = 0; i < sh->nstreams; i++) {
		struct sstream *s = &sh->streams[i];
		if (s->thread != t->idx)
			continue;
		if (stream_open(s, t->cq, method) != 0) {
			snote_error(t, 13, "could not start stream");
			s->closed = 1;
			continue;
		}
		open++;
		if (sh->is_watch) {
			if (s->nw) {
				stream_send(s, watch_create_msg(sh, s->watchers[0]), 1);
				s->n_sent = 1;
			} else {
				grpc_op op;
				memset(&op, 0, sizeof op);
				op.op = GRPC_OP_SEND_INITIAL_METADATA;
				grpc_call_start_batch(s->call, &op, 1, &s->tags[OP_SEND], NULL);
				s->pending++;
			}
			stream_recv(s);
		} else {
			grpc_op op;
			memset(&op, 0, sizeof op);
			op.op = GRPC_OP_SEND_INITIAL_METADATA;
			grpc_call_start_batch(s->call, &op, 1, &s->tags[OP_SEND], NULL);
			s->pending++;
			s->send_done = 0;
			s->recv_done = 1; /* first send completion starts the ping-pong */
			s->t0 = 0;
		}
	}
	int cancelled = 0;
	while (open > 0) {
		grpc_event ev = grpc_completion_queue_next(
			t->cq, gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(100, GPR_TIMESPAN)), NULL);
		if (!cancelled && atomic_load(&sh->stop)) {
			for (int i = 0; i < sh->nstreams; i++)
				if (sh->streams[i].thread == t->idx && sh->streams[i].call)
					grpc_call_cancel(sh->streams[i].call, NULL);
			cancelled = 1;
		}
		if (ev.type != GRPC_OP_COMPLETE)
			continue;
		struct optag *tag = ev.tag;
		struct sstream *s = tag->s;
		uint64_t now = bench_now_ns();
		s->pending--;
		if (tag->kind == OP_STATUS) {
			s->closed = 1;
			if (s->status != GRPC_STATUS_OK && s->status != GRPC_STATUS_CANCELLED) {
				char *d = grpc_slice_to_c_string(s->details);
				snote_error(t, (int)s->status, d);
				gpr_free(d);
			} else if (s->status == GRPC_STATUS_OK && !atomic_load(&sh->stop)) {
				snote_error(t, 2, "stream closed by server with OK before the end");
			}
		} else if (tag->kind == OP_SEND) {
			if (s->send)
				grpc_byte_buffer_destroy(s->send);
			s->send = NULL;
			if (ev.success && sh->is_watch && s->n_sent < s->nw && !atomic_load(&sh->stop)) {
				stream_send(s, watch_create_msg(sh, s->watchers[s->n_sent]), 0);
				s->n_sent++;
			} else if (!sh->is_watch && ev.success) {
				s->send_done = 1;
				if (s->recv_done && !atomic_load(&sh->stop))
					ka_issue(sh, s);
			}
		} else { /* OP_RECV */
			if (ev.success && s->recv) {
				if (sh->is_watch) {
					grpc_byte_buffer_reader rd;
					if (grpc_byte_buffer_reader_init(&rd, s->recv)) {
						grpc_slice all = grpc_byte_buffer_reader_readall(&rd);
						grpc_byte_buffer_reader_destroy(&rd);
						watch_on_bytes(t, s, GRPC_SLICE_START_PTR(all), GRPC_SLICE_LENGTH(all), now);
						grpc_slice_unref(all);
					} else {
						snote_error(t, BENCH_STATUS_DECODE, "WatchResponse did not decode");
					}
					grpc_byte_buffer_destroy(s->recv);
					s->recv = NULL;
					if (!atomic_load(&sh->stop))
						stream_recv(s);
				} else {
					Etcdserverpb__LeaseKeepAliveResponse *r = (Etcdserverpb__LeaseKeepAliveResponse *)unpack_bb(
						&etcdserverpb__lease_keep_alive_response__descriptor, s->recv);
					if (r && r->ttl > 0) {
						t->ok++;
						srecord(t, now - s->t0);
					} else {
						char m[100];
						snprintf(m, sizeof m, "keep-alive response %s (ttl %lld)", r ? "bad" : "undecodable",
							 r ? (long long)r->ttl : 0LL);
						snote_error(t, BENCH_STATUS_DECODE, m);
					}
					if (r)
						protobuf_c_message_free_unpacked(&r->base, NULL);
					grpc_byte_buffer_destroy(s->recv);
					s->recv = NULL;
					t->last_done_ns = now;
					s->recv_done = 1;
					if (s->send_done && !atomic_load(&sh->stop))
						ka_issue(sh, s);
				}
			} else if (s->recv) {
				grpc_byte_buffer_destroy(s->recv);
				s->recv = NULL;
			}
		}
		if (s->pending == 0 && s->call) {
			grpc_call_unref(s->call);
			s->call = NULL;
			grpc_slice_unref(s->details);
			grpc_metadata_array_destroy(&s->md_init);
			grpc_metadata_array_destroy(&s->md_trail);
			open--;
		}
	}
	return NULL;
}

/* A call of method with a deadline timeout seconds away, on a pluck queue of its own (*cq). */
static grpc_call *open_call(grpc_channel *ch, const char *method, double timeout, grpc_completion_queue **cq)
{
	*cq = grpc_completion_queue_create_for_pluck(NULL);
	gpr_timespec deadline = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
					     gpr_time_from_millis((int64_t)(timeout * 1000), GPR_TIMESPAN));
	return grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, *cq, grpc_slice_from_static_string(method),
					NULL, deadline, NULL);
}

/* One unary call, synchronously on its own completion queue. Returns the grpc status or -1. */
int bench_unary(grpc_channel *ch, const char *method, const ProtobufCMessage *req,
		 const ProtobufCMessageDescriptor *rd, ProtobufCMessage **resp, double timeout, char *err, size_t errlen)
{
	grpc_completion_queue *cq;
	grpc_call *c = open_call(ch, method, timeout, &cq);
	grpc_metadata_array mi, mt;
	grpc_metadata_array_init(&mi);
	grpc_metadata_array_init(&mt);
	grpc_byte_buffer *send = pack_msg(req), *recv = NULL;
	grpc_status_code st = GRPC_STATUS_UNKNOWN;
	grpc_slice det = grpc_empty_slice();
	grpc_op ops[6];
	memset(ops, 0, sizeof ops);
	ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
	ops[1].op = GRPC_OP_SEND_MESSAGE;
	ops[1].data.send_message.send_message = send;
	ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
	ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
	ops[3].data.recv_initial_metadata.recv_initial_metadata = &mi;
	ops[4].op = GRPC_OP_RECV_MESSAGE;
	ops[4].data.recv_message.recv_message = &recv;
	ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
	ops[5].data.recv_status_on_client.trailing_metadata = &mt;
	ops[5].data.recv_status_on_client.status = &st;
	ops[5].data.recv_status_on_client.status_details = &det;
	int rc = -1;
	if (grpc_call_start_batch(c, ops, 6, (void *)1, NULL) == GRPC_CALL_OK) {
		grpc_event ev = grpc_completion_queue_pluck(cq, (void *)1, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
		rc = ev.success ? (int)st : -1;
		if (rc == 0) {
			*resp = recv ? unpack_bb(rd, recv) : NULL;
			if (!*resp)
				rc = BENCH_STATUS_DECODE;
		} else if (err) {
			char *d = grpc_slice_to_c_string(det);
			snprintf(err, errlen, "%s: status %d: %s", method, rc, d);
			gpr_free(d);
		}
	}
	if (recv)
		grpc_byte_buffer_destroy(recv);
	grpc_byte_buffer_destroy(send);
	grpc_slice_unref(det);
	grpc_metadata_array_destroy(&mi);
	grpc_metadata_array_destroy(&mt);
	grpc_call_unref(c);
	grpc_completion_queue_shutdown(cq);
	while (grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type != GRPC_QUEUE_SHUTDOWN)
		;
	grpc_completion_queue_destroy(cq);
	return rc;
}

/*
 * One server-streaming call, synchronously: on_msg gets each decoded message (freed after it
 * returns; a non-zero return cancels the call). Returns the grpc status, BENCH_STATUS_DECODE
 * for a message that does not decode, or -1.
 */
int bench_server_stream(grpc_channel *ch, const char *method, const ProtobufCMessage *req,
			const ProtobufCMessageDescriptor *rd, double timeout,
			int (*on_msg)(void *arg, const ProtobufCMessage *m), void *arg, char *err, size_t errlen)
{
	grpc_completion_queue *cq;
	grpc_call *c = open_call(ch, method, timeout, &cq);
	grpc_metadata_array mi, mt;
	grpc_metadata_array_init(&mi);
	grpc_metadata_array_init(&mt);
	grpc_byte_buffer *send = pack_msg(req), *recv = NULL;
	grpc_status_code st = GRPC_STATUS_UNKNOWN;
	grpc_slice det = grpc_empty_slice();
	grpc_op ops[4];
	memset(ops, 0, sizeof ops);
	ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
	ops[1].op = GRPC_OP_SEND_MESSAGE;
	ops[1].data.send_message.send_message = send;
	ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
	ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
	ops[3].data.recv_initial_metadata.recv_initial_metadata = &mi;
	int rc = -1, bad = 0;
	if (grpc_call_start_batch(c, ops, 4, (void *)1, NULL) == GRPC_CALL_OK &&
	    grpc_completion_queue_pluck(cq, (void *)1, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).success) {
		for (;;) {
			grpc_op op;
			memset(&op, 0, sizeof op);
			op.op = GRPC_OP_RECV_MESSAGE;
			op.data.recv_message.recv_message = &recv;
			if (grpc_call_start_batch(c, &op, 1, (void *)2, NULL) != GRPC_CALL_OK)
				break;
			grpc_event ev = grpc_completion_queue_pluck(cq, (void *)2, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
			if (!ev.success || recv == NULL)
				break; /* the end of the stream: the status follows */
			ProtobufCMessage *m = unpack_bb(rd, recv);
			grpc_byte_buffer_destroy(recv);
			recv = NULL;
			int stop = m == NULL || on_msg(arg, m) != 0;
			if (m)
				protobuf_c_message_free_unpacked(m, NULL);
			else
				bad = 1;
			if (stop) {
				grpc_call_cancel(c, NULL);
				break;
			}
		}
		memset(ops, 0, sizeof ops);
		ops[0].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
		ops[0].data.recv_status_on_client.trailing_metadata = &mt;
		ops[0].data.recv_status_on_client.status = &st;
		ops[0].data.recv_status_on_client.status_details = &det;
		if (grpc_call_start_batch(c, ops, 1, (void *)3, NULL) == GRPC_CALL_OK &&
		    grpc_completion_queue_pluck(cq, (void *)3, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).success)
			rc = bad ? BENCH_STATUS_DECODE : (int)st;
		if (rc != 0 && err) {
			char *d = grpc_slice_to_c_string(det);
			snprintf(err, errlen, "%s: status %d: %s", method, rc, bad ? "message did not decode" : d);
			gpr_free(d);
		}
	}
	if (recv)
		grpc_byte_buffer_destroy(recv);
	grpc_byte_buffer_destroy(send);
	grpc_slice_unref(det);
	grpc_metadata_array_destroy(&mi);
	grpc_metadata_array_destroy(&mt);
	grpc_call_unref(c);
	grpc_completion_queue_shutdown(cq);
	while (grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type != GRPC_QUEUE_SHUTDOWN)
		;
	grpc_completion_queue_destroy(cq);
	return rc;
}

/* The paced writer: puts at o->rate for o->duration with up to 256 in flight. */
struct wslot {
	grpc_call *call;
	grpc_byte_buffer *send, *recv;
	grpc_metadata_array mi, mt;
	grpc_status_code st;
	grpc_slice det;
	uint64_t t0;
	int prefix;
	uint64_t seq;
};

struct writer {
	struct sshared *sh;
	grpc_channel *ch;
	uint64_t nputs, ok, err, *ok_bits; /* ok_bits: per prefix, nbits_words words */
	uint64_t start_ns, end_ns;
	char first_error[200];
	uint32_t *lat;
	size_t nlat, caplat;
	double lat_sum;
	/* steps (one unless --ramp) */
	int nsteps;			/* steps that wrote */
	double step_rate[WSTEPS];	/* puts/s asked */
	double step_s[WSTEPS];		/* seconds written */
	uint64_t step_ok[WSTEPS], step_expected[WSTEPS];
};

/* Puts the whole run may send: every step at its rate (the last one may be cut short). */
static uint64_t writer_max_puts(const struct bench_opts *o, uint64_t step_ns)
{
	double total = 0, rate = o->rate, left = o->duration;
	for (int k = 0; k < WSTEPS && left > 1e-9; k++) {
		double st = (double)step_ns / 1e9 < left ? (double)step_ns / 1e9 : left;
		total += rate * st;
		left -= st;
		rate *= o->ramp;
	}
	return (uint64_t)total + 1;
}

static void *writer_main(void *arg)
{
	struct writer *wr = arg;
	struct sshared *sh = wr->sh;
	const struct bench_opts *o = sh->o;
	enum { MAXF = 256 };
	struct wslot *sl = calloc(MAXF, sizeof *sl);
	int freelist[MAXF], nfree = MAXF, inflight = 0;
	for (int i = 0; i < MAXF; i++)
		freelist[i] = MAXF - 1 - i;
	grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
	uint64_t total = writer_max_puts(o, sh->step_ns);
	uint64_t max_per_prefix = (uint64_t)sh->nbits_words * 64;
	if (total > max_per_prefix * (uint64_t)o->prefixes)
		total = max_per_prefix * (uint64_t)o->prefixes;
	uint64_t start = bench_now_ns();
	uint64_t end_at = start + (uint64_t)(o->duration * 1e9);
	wr->start_ns = start;
	atomic_store(&sh->wstart_ns, start);
	/* step k runs from start + k * step_ns at rate * ramp^k; put j of the step is due j/rate
	 * seconds into it */
	int k = 0;
	uint64_t in_step = 0, step_start = start;
	double rate = o->rate;
	wr->nsteps = 1;
	wr->step_rate[0] = rate;
	uint64_t i = 0;
	uint8_t *val = malloc((size_t)o->val_size + 32);
	while (i < total || inflight > 0) {
		uint64_t now = bench_now_ns();
		if (i < total && now >= end_at)
			total = i;
		while (i < total && now >= step_start + sh->step_ns) {
			/* the step is over: stop if more than a second of its events is undelivered */
			wr->step_s[k] = (double)sh->step_ns / 1e9;
			uint64_t due = atomic_load(&sh->expected_so_far), got = atomic_load(&sh->events);
			if (due > got && (double)(due - got) > rate * (double)o->watchers / (double)o->prefixes) {
				total = i;
				break;
			}
			if (k + 1 >= WSTEPS) {
				total = i;
				break;
			}
			k++;
			rate *= o->ramp;
			step_start += sh->step_ns;
			in_step = 0;
			wr->nsteps = k + 1;
			wr->step_rate[k] = rate;
		}
		while (i < total && nfree > 0 && now >= step_start + (uint64_t)((double)in_step * 1e9 / rate)) {
			in_step++;
			int k = freelist[--nfree];
			struct wslot *w = &sl[k];
			w->prefix = (int)(i % (uint64_t)o->prefixes);
			w->seq = i / (uint64_t)o->prefixes;
			char key[32];
			snprintf(key, sizeof key, "bw/%05d/%08llu", w->prefix, (unsigned long long)w->seq);
			w->t0 = bench_now_ns();
			int vl = snprintf((char *)val, 32, "%llu", (unsigned long long)w->t0);
			int vs = o->val_size > vl ? o->val_size : vl;
			memset(val + vl, 'x', (size_t)(vs - vl));
			Etcdserverpb__PutRequest rq = ETCDSERVERPB__PUT_REQUEST__INIT;
			rq.key.data = (uint8_t *)key;
			rq.key.len = strlen(key);
			rq.value.data = val;
			rq.value.len = (size_t)vs;
			w->send = pack_msg(&rq.base);
			w->recv = NULL;
			w->det = grpc_empty_slice();
			grpc_metadata_array_init(&w->mi);
			grpc_metadata_array_init(&w->mt);
			gpr_timespec dl = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
						       gpr_time_from_millis((int64_t)(o->timeout * 1000), GPR_TIMESPAN));
			w->call = grpc_channel_create_call(wr->ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq,
							   grpc_slice_from_static_string("/etcdserverpb.KV/Put"), NULL, dl, NULL);
			grpc_op ops[6];
			memset(ops, 0, sizeof ops);
			ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
			ops[1].op = GRPC_OP_SEND_MESSAGE;
			ops[1].data.send_message.send_message = w->send;
			ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
			ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
			ops[3].data.recv_initial_metadata.recv_initial_metadata = &w->mi;
			ops[4].op = GRPC_OP_RECV_MESSAGE;
			ops[4].data.recv_message.recv_message = &w->recv;
			ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
			ops[5].data.recv_status_on_client.trailing_metadata = &w->mt;
			ops[5].data.recv_status_on_client.status = &w->st;
			ops[5].data.recv_status_on_client.status_details = &w->det;
			grpc_call_start_batch(w->call, ops, 6, (void *)(intptr_t)(k + 1), NULL);
			inflight++;
			wr->nputs++;
			i++;
		}
		uint64_t next = i < total ? step_start + (uint64_t)((double)in_step * 1e9 / rate) : now + 100000000ULL;
		if (i < total && next > step_start + sh->step_ns)
			next = step_start + sh->step_ns;
		int64_t wait_ns = nfree > 0 ? (int64_t)(next - bench_now_ns()) : 100000000LL;
		if (wait_ns < 0)
			wait_ns = 0;
		grpc_event ev = grpc_completion_queue_next(
			cq, gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_nanos(wait_ns, GPR_TIMESPAN)), NULL);
		if (ev.type != GRPC_OP_COMPLETE)
			continue;
		int k = (int)(intptr_t)ev.tag - 1;
		struct wslot *w = &sl[k];
		uint64_t t1 = bench_now_ns();
		if (ev.success && w->st == GRPC_STATUS_OK && w->recv) {
			wr->ok++;
			wr->ok_bits[(size_t)w->prefix * (size_t)sh->nbits_words + (w->seq >> 6)] |= 1ULL << (w->seq & 63);
			uint64_t sk = (w->t0 - start) / sh->step_ns;
			if (sk < WSTEPS) {
				wr->step_ok[sk]++;
				wr->step_expected[sk] += (uint64_t)sh->per_prefix[w->prefix];
			}
			atomic_fetch_add(&sh->expected_so_far, (uint64_t)sh->per_prefix[w->prefix]);
			struct thr tmp = {.lat = wr->lat, .nlat = wr->nlat, .caplat = wr->caplat, .lat_sum = wr->lat_sum};
			record_latency(&tmp, t1 - w->t0);
			wr->lat = tmp.lat;
			wr->nlat = tmp.nlat;
			wr->caplat = tmp.caplat;
			wr->lat_sum = tmp.lat_sum;
		} else {
			if (wr->err++ == 0) {
				char *d = grpc_slice_to_c_string(w->det);
				snprintf(wr->first_error, sizeof wr->first_error, "put: status %d: %s", (int)w->st, d);
				gpr_free(d);
			}
		}
		if (w->recv)
			grpc_byte_buffer_destroy(w->recv);
		grpc_byte_buffer_destroy(w->send);
		grpc_slice_unref(w->det);
		grpc_metadata_array_destroy(&w->mi);
		grpc_metadata_array_destroy(&w->mt);
		grpc_call_unref(w->call);
		freelist[nfree++] = k;
		inflight--;
	}
	wr->end_ns = bench_now_ns();
	if (wr->step_s[wr->nsteps - 1] == 0) {
		double last = (double)((wr->end_ns < end_at ? wr->end_ns : end_at) - step_start) / 1e9;
		wr->step_s[wr->nsteps - 1] = last > 0 ? last : 0;
	}
	free(val);
	free(sl);
	grpc_completion_queue_shutdown(cq);
	while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type != GRPC_QUEUE_SHUTDOWN)
		;
	grpc_completion_queue_destroy(cq);
	return NULL;
}

static void merge_sthr(struct bench_result *res, struct sthr *ts, int nt)
{
	size_t n = 0;
	for (int i = 0; i < nt; i++)
		n += ts[i].nlat;
	res->lat_us = malloc((n ? n : 1) * sizeof(uint32_t));
	for (int i = 0; i < nt; i++) {
		struct sthr *t = &ts[i];
		if (t->nlat)
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
	}
	qsort(res->lat_us, res->n_lat, sizeof(uint32_t), cmp_u32);
}

static void wait_file_gone(const char *path, double max_s)
{
	uint64_t until = bench_now_ns() + (uint64_t)(max_s * 1e9);
	struct stat st;
	while (stat(path, &st) == 0 && bench_now_ns() < until)
		usleep(20000);
}

int bench_run_stream(const struct bench_opts *o, int is_watch, struct bench_result *res, struct bench_stream_stats *ss)
{
	memset(res, 0, sizeof *res);
	memset(ss, 0, sizeof *ss);
	struct sshared *sh = calloc(1, sizeof *sh);
	sh->o = o;
	sh->is_watch = is_watch;
	grpc_init();
	int nch = o->conns + (is_watch ? 1 : 0);
	grpc_channel **chs = calloc((size_t)nch, sizeof *chs);
	for (int i = 0; i < nch; i++)
		chs[i] = bench_channel(o->endpoints[i % o->n_endpoints]);
	int rc = -1;
	if (wait_ready(chs, nch, o->dial_timeout, res->setup_error, sizeof res->setup_error) != 0) {
		res->setup_failed = 1;
		goto out;
	}
	if (is_watch) {
		sh->nstreams = o->watch_streams;
		sh->w = calloc((size_t)o->watchers, sizeof *sh->w);
		sh->step_ns = (uint64_t)((o->step > 0 && o->step < o->duration ? o->step : o->duration) * 1e9);
		if (sh->step_ns == 0)
			sh->step_ns = 1;
		uint64_t per_prefix = writer_max_puts(o, sh->step_ns) / (uint64_t)o->prefixes + 1;
		sh->nbits_words = (int)((per_prefix + 63) / 64);
		sh->per_prefix = calloc((size_t)o->prefixes, sizeof(int));
		for (int i = 0; i < o->watchers; i++) {
			sh->w[i].prefix = i % o->prefixes;
			sh->w[i].bits = calloc((size_t)sh->nbits_words, 8);
			sh->per_prefix[i % o->prefixes]++;
		}
	} else {
		sh->nstreams = o->clients;
		sh->nleases = o->leases;
		sh->lease_ids = calloc((size_t)o->leases, sizeof(int64_t));
		for (int i = 0; i < o->leases; i++) {
			Etcdserverpb__LeaseGrantRequest rq = ETCDSERVERPB__LEASE_GRANT_REQUEST__INIT;
			rq.ttl = 600;
			ProtobufCMessage *m = NULL;
			int st = bench_unary(chs[i % o->conns], "/etcdserverpb.Lease/LeaseGrant", &rq.base,
				       &etcdserverpb__lease_grant_response__descriptor, &m, o->timeout, res->setup_error,
				       sizeof res->setup_error);
			if (st != 0) {
				res->setup_failed = 1;
				goto out;
			}
			sh->lease_ids[i] = ((Etcdserverpb__LeaseGrantResponse *)m)->id;
			protobuf_c_message_free_unpacked(m, NULL);
		}
	}
	int nt = o->threads < sh->nstreams ? o->threads : sh->nstreams;
	if (nt < 1)
		nt = 1;
	sh->streams = calloc((size_t)sh->nstreams, sizeof *sh->streams);
	for (int s = 0; s < sh->nstreams; s++) {
		struct sstream *st = &sh->streams[s];
		st->idx = s;
		st->thread = s % nt;
		st->ch = chs[s % o->conns];
		if (is_watch) {
			st->nw = o->watchers / sh->nstreams + (s < o->watchers % sh->nstreams);
			st->watchers = calloc((size_t)st->nw + 1, sizeof(int));
			int k = 0;
			for (int i = s; i < o->watchers; i += sh->nstreams)
				st->watchers[k++] = i;
			int sz = 4;
			while (sz < 2 * st->nw + 2)
				sz <<= 1;
			st->ht_mask = sz - 1;
			st->ht_key = calloc((size_t)sz, sizeof(int64_t));
			st->ht_val = malloc((size_t)sz * sizeof(int));
			for (int j = 0; j < sz; j++)
				st->ht_val[j] = -1;
		}
	}
	struct sthr *ts = calloc((size_t)nt, sizeof *ts);
	uint64_t t_start = bench_now_ns();
	if (!is_watch && o->duration > 0)
		sh->stop_ns = t_start + (uint64_t)(o->duration * 1e9);
	for (int i = 0; i < nt; i++) {
		ts[i].sh = sh;
		ts[i].idx = i;
		ts[i].cq = grpc_completion_queue_create_for_next(NULL);
		if (is_watch)
			ts[i].step_hist = calloc((size_t)WSTEPS * LH_BUCKETS, sizeof(uint32_t));
		pthread_create(&ts[i].tid, NULL, sthr_main, &ts[i]);
	}
	struct writer wr = {0};
	if (is_watch) {
		/* wait for every watcher to be created */
		uint64_t until = bench_now_ns() + (uint64_t)((o->dial_timeout + o->timeout + o->watchers / 2000.0) * 1e9);
		while (atomic_load(&sh->created) < o->watchers && bench_now_ns() < until)
			usleep(2000);
		ss->create_s = (double)(bench_now_ns() - t_start) / 1e9;
		ss->created = atomic_load(&sh->created);
		if (ss->created == o->watchers && o->ready_file) {
			FILE *f = fopen(o->ready_file, "w");
			if (f) {
				fprintf(f, "%d\n", ss->created);
				fclose(f);
			}
			wait_file_gone(o->ready_file, 60);
		}
		if (ss->created == o->watchers) {
			wr.sh = sh;
			wr.ch = chs[o->conns];
			wr.ok_bits = calloc((size_t)o->prefixes * (size_t)sh->nbits_words, 8);
			pthread_t wt;
			struct rusage ru0;
			getrusage(RUSAGE_SELF, &ru0);
			pthread_create(&wt, NULL, writer_main, &wr);
			pthread_join(wt, NULL);
			/* drain: until every expected event arrived or no progress for --drain seconds */
			uint64_t expected = 0;
			for (int p = 0; p < o->prefixes; p++) {
				uint64_t cnt = 0;
				for (int k = 0; k < sh->nbits_words; k++)
					cnt += (uint64_t)__builtin_popcountll(wr.ok_bits[(size_t)p * (size_t)sh->nbits_words + (size_t)k]);
				expected += cnt * (uint64_t)(o->watchers / o->prefixes + (p < o->watchers % o->prefixes));
			}
			ss->expected = expected;
			uint64_t last = atomic_load(&sh->events), last_change = bench_now_ns();
			while (atomic_load(&sh->events) < expected) {
				usleep(10000);
				uint64_t e = atomic_load(&sh->events);
				if (e != last) {
					last = e;
					last_change = bench_now_ns();
				} else if (bench_now_ns() - last_change > (uint64_t)(o->drain * 1e9)) {
					break;
				}
			}
			struct rusage ru1;
			getrusage(RUSAGE_SELF, &ru1);
#define RU_S(r) ((double)(r).ru_utime.tv_sec + (double)(r).ru_utime.tv_usec / 1e6 + (double)(r).ru_stime.tv_sec + \
		 (double)(r).ru_stime.tv_usec / 1e6)
			ss->client_cpu_s = RU_S(ru1) - RU_S(ru0);
#undef RU_S
		} else {
			snprintf(res->first_error[4], sizeof res->first_error[4], "only %d of %d watchers created", ss->created,
				 o->watchers);
			res->by_status[4]++;
			res->errors++;
		}
		atomic_store(&sh->stop, 1);
	}
	for (int i = 0; i < nt; i++)
		pthread_join(ts[i].tid, NULL);
	merge_sthr(res, ts, nt);
	if (is_watch) {
		uint64_t end = atomic_load(&sh->last_event_ns);
		res->elapsed = wr.start_ns && end > wr.start_ns ? (double)(end - wr.start_ns) / 1e9 : 0;
		ss->events = atomic_load(&sh->events);
		ss->duplicates = atomic_load(&sh->dups);
		ss->out_of_order = atomic_load(&sh->ooo);
		ss->unexpected = atomic_load(&sh->unexpected);
		ss->canceled = atomic_load(&sh->canceled);
		ss->puts = wr.nputs;
		ss->puts_ok = wr.ok;
		ss->put_errors = wr.err;
		ss->write_s = wr.end_ns > wr.start_ns ? (double)(wr.end_ns - wr.start_ns) / 1e9 : 0;
		if (wr.nlat) {
			qsort(wr.lat, wr.nlat, sizeof(uint32_t), cmp_u32);
			ss->put_p50_ms = wr.lat[(wr.nlat - 1) / 2] / 1000.0;
			ss->put_p99_ms = wr.lat[(size_t)((double)(wr.nlat - 1) * 0.99)] / 1000.0;
		}
		if (wr.err) {
			res->by_status[2] += wr.err;
			res->errors += wr.err;
			snprintf(res->first_error[2], sizeof res->first_error[2], "%s", wr.first_error);
		}
		/* missing: successful puts of the watcher's prefix not received */
		if (wr.ok_bits)
			for (int i = 0; i < o->watchers; i++) {
				const uint64_t *ob = wr.ok_bits + (size_t)sh->w[i].prefix * (size_t)sh->nbits_words;
				for (int k = 0; k < sh->nbits_words; k++)
					ss->missing += (uint64_t)__builtin_popcountll(ob[k] & ~sh->w[i].bits[k]);
			}
		/* the steps: merge the threads' histograms */
		ss->nsteps = wr.nsteps < WSTEPS ? wr.nsteps : WSTEPS;
		if (ss->nsteps > (int)(sizeof ss->steps / sizeof ss->steps[0]))
			ss->nsteps = (int)(sizeof ss->steps / sizeof ss->steps[0]);
		uint32_t *hist = calloc(LH_BUCKETS, sizeof(uint32_t));
		for (int k = 0; k < ss->nsteps; k++) {
			struct bench_watch_step *st = &ss->steps[k];
			memset(hist, 0, LH_BUCKETS * sizeof(uint32_t));
			uint64_t n = 0;
			for (int i = 0; i < nt; i++) {
				n += ts[i].step_events[k];
				for (int b = 0; b < LH_BUCKETS; b++)
					hist[b] += ts[i].step_hist[(size_t)k * LH_BUCKETS + (size_t)b];
			}
			st->rate = wr.step_rate[k];
			st->seconds = wr.step_s[k];
			st->puts_ok = wr.step_ok[k];
			st->expected = wr.step_expected[k];
			st->events = n;
			st->received_in_step = atomic_load(&sh->recv_step[k]);
			uint64_t c = 0, i50 = (n + 1) / 2, i99 = (uint64_t)ceil((double)n * 0.99);
			st->p50_ms = st->p99_ms = 0;
			for (int b = 0; b < LH_BUCKETS && n; b++) {
				uint64_t c2 = c + hist[b];
				if (c < i50 && c2 >= i50)
					st->p50_ms = (double)lh_value(b) / 1000.0;
				if (c < i99 && c2 >= i99)
					st->p99_ms = (double)lh_value(b) / 1000.0;
				c = c2;
			}
			double offered = st->seconds > 0 ? (double)st->expected / st->seconds : 0;
			double delivered = st->seconds > 0 ? (double)st->received_in_step / st->seconds : 0;
			st->kept_up = st->expected > 0 && st->events >= st->expected && delivered >= 0.9 * offered &&
				      st->p99_ms <= o->max_p99_ms;
			if (st->kept_up && delivered > ss->max_sustained)
				ss->max_sustained = delivered;
		}
		free(hist);
		for (int i = 0; i < nt; i++)
			free(ts[i].step_hist);
		free(sh->per_prefix);
		free(wr.lat);
		free(wr.ok_bits);
		for (int i = 0; i < o->watchers; i++)
			free(sh->w[i].bits);
		for (int s = 0; s < sh->nstreams; s++) {
			free(sh->streams[s].watchers);
			free(sh->streams[s].ht_key);
			free(sh->streams[s].ht_val);
		}
		free(sh->w);
	} else {
		uint64_t end = t_start;
		for (int i = 0; i < nt; i++)
			if (ts[i].last_done_ns > end)
				end = ts[i].last_done_ns;
		res->elapsed = (double)(end - t_start) / 1e9;
	}
	for (int i = 0; i < nt; i++) {
		grpc_completion_queue_shutdown(ts[i].cq);
		while (grpc_completion_queue_next(ts[i].cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
		       GRPC_QUEUE_SHUTDOWN)
			;
		grpc_completion_queue_destroy(ts[i].cq);
	}
	free(ts);
	free(sh->streams);
	rc = 0;
out:
	free(sh->lease_ids);
	free(sh);
	for (int i = 0; i < nch; i++)
		grpc_channel_destroy(chs[i]);
	free(chs);
	grpc_shutdown();
	(void)prefix_buf_unused;
	return rc;
}
