/*
 * bench.h - the Keelson load generator (tools/benchmark), modeled on etcd's
 * `benchmark` tool: same subcommands and flags where they exist there.
 *
 * The engine (runner.c) drives N concurrent unary calls ("clients") over M
 * gRPC channels ("conns"), each channel its own TCP connection, from T threads
 * each with its own completion queue. A workload (workload.c) encodes request
 * number `seq` and checks a response. main.c parses flags and prints reports.
 */
#ifndef KEELSON_TOOLS_BENCHMARK_BENCH_H
#define KEELSON_TOOLS_BENCHMARK_BENCH_H

#include <stddef.h>
#include <stdint.h>

#include <protobuf-c/protobuf-c.h>

#define BENCH_MAX_ENDPOINTS 16
#define BENCH_NSTATUS 18 /* gRPC codes 0..16, plus 17 = response did not decode */
#define BENCH_STATUS_DECODE 17

struct bench_opts {
	/* connection */
	const char *endpoints[BENCH_MAX_ENDPOINTS];
	int n_endpoints;
	int conns;
	int clients;
	int threads;
	double dial_timeout; /* seconds to wait for every channel to be READY */
	double timeout;	     /* per-request deadline, seconds */
	/* amount */
	uint64_t total;	 /* requests; 0 = unbounded (then duration must be set) */
	double duration; /* seconds; 0 = until total */
	/* put / txn-put */
	int key_size;
	int val_size;
	uint64_t key_space;
	int sequential;
	int txn_ops;
	const char *key_prefix; /* put: prepended to each key (so a LIST can select them) */
	/* txn-mixed / apiserver */
	double read_fraction; /* txn-mixed: share of requests that are range reads */
	int val_size_min;     /* apiserver: values are val_size_min..val_size bytes */
	int objects;	      /* apiserver: object name space */
	int namespaces;
	int watch_resources; /* apiserver: 1 = a watch per resource prefix during the mix */
	/* range */
	const char *range_key;
	const char *range_end;
	int serializable;
	int64_t limit;
	int stream; /* list: one KV.RangeStream call instead of Range pages */
	/* fsync */
	const char *dir;
	int count;
	int block_size;
	/* watch / lease-keepalive (streaming workloads, runner.c) */
	int watchers;
	int watch_streams;
	int prefixes;
	double rate;  /* puts/s of the watch workload's writer */
	double drain; /* seconds without a new event before giving up on missing ones */
	const char *ready_file; /* created when all watchers exist; writes start once it is removed */
	/* watch saturation: the writer's rate is multiplied by ramp every step seconds (rate,
	 * rate*ramp, ...) until --duration or the first step whose delivery fell behind */
	double ramp, step;
	double max_p99_ms; /* a step keeps up only if its events' delivery p99 stays below this */
	int leases;
	/* output */
	const char *label;
	int quiet; /* JSON line only */
};

struct bench_rng {
	uint64_t s;
};

static inline uint64_t bench_rand(struct bench_rng *r)
{
	/* splitmix64: fast, good enough for picking keys */
	uint64_t z = (r->s += 0x9e3779b97f4a7c15ULL);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

#define BENCH_MAX_OPS 10

/* What one request is: its latency class (op), method and response type. The engine fills it
 * with the workload's defaults (op 0) before encode; mixed workloads change it per request. */
struct bench_call {
	int op;
	const char *method;
	const ProtobufCMessageDescriptor *resp_desc;
};

/* check's verdicts */
#define BENCH_CHECK_OK 0
#define BENCH_CHECK_CONFLICT 1 /* a well-formed answer whose compare failed (optimistic concurrency lost) */
#define BENCH_CHECK_BAD (-1)

typedef struct grpc_channel grpc_channel;
struct bench_result;

/* A workload: unary requests, a request encoder and a response checker. */
struct bench_workload {
	const char *name;
	const char *method; /* default method, e.g. "/etcdserverpb.KV/Put" */
	const ProtobufCMessageDescriptor *resp_desc;
	/* Encode request number `seq` into *buf (grown with realloc as needed); returns its length.
	 * state: the client slot's own bytes (state_size of them, zeroed at start), kept between
	 * its requests (a paginated LIST continues on the same slot). */
	size_t (*encode)(const struct bench_opts *o, uint64_t seq, struct bench_rng *rng, void *state,
			 struct bench_call *call, uint8_t **buf, size_t *cap);
	/* Returns a BENCH_CHECK_* verdict for the decoded response of `call`. */
	int (*check)(const struct bench_opts *o, void *state, const struct bench_call *call, const ProtobufCMessage *resp);
	size_t state_size;
	const char *const *op_names; /* n_ops latency classes; NULL = one class named after the workload */
	int n_ops;
	/* Optional: before the timed run, on a ready channel (e.g. learn the objects' revisions). */
	int (*prepare)(const struct bench_opts *o, grpc_channel *ch, char *err, size_t errlen);
	/* Optional: after the timed run; may add op classes to res (e.g. watch delivery). */
	void (*finish)(const struct bench_opts *o, struct bench_result *res);
	/* Optional, instead of check: the verdict read from the response's wire bytes (with
	 * bench_pb_next), for responses too large to unpack at the load generator's pace. */
	int (*check_wire)(const struct bench_opts *o, void *state, const struct bench_call *call, const uint8_t *p,
			  size_t n);
};

/* pbwalk.c: one field of a protobuf message's wire encoding. */
struct bench_pbf {
	uint32_t num;
	int wt;		  /* wire type */
	uint64_t v;	  /* varint value */
	const uint8_t *p; /* length-delimited: the bytes */
	size_t len;
};
/* The next field at *p (advanced past it); returns 1, 0 at the end, -1 on malformed input. */
int bench_pb_next(const uint8_t **p, const uint8_t *end, struct bench_pbf *f);

const struct bench_workload *bench_workload_find(const char *name);
const struct bench_workload *bench_apiserver_find(const char *name); /* apiserver.c */
/* workload.c helpers: the shared value (val_size bytes), packing into a growable buffer */
const uint8_t *bench_value_bytes(const struct bench_opts *o);
size_t bench_pack(const ProtobufCMessage *m, uint8_t **buf, size_t *cap);

struct bench_op_result {
	const char *name;
	uint64_t ok, conflicts, errors;
	uint32_t *lat_us; /* sorted ascending */
	size_t n_lat;
	double lat_sum_us;
};

struct bench_result {
	uint64_t ok;
	uint64_t errors;
	uint64_t by_status[BENCH_NSTATUS];
	char first_error[BENCH_NSTATUS][200];
	double elapsed; /* seconds from first request to last completion */
	/* latencies of successful requests, microseconds, sorted ascending */
	uint32_t *lat_us;
	size_t n_lat;
	double lat_sum_us;
	int setup_failed; /* could not connect; message in setup_error */
	char setup_error[256];
	/* per-op figures of mixed workloads (n_ops > 1) */
	struct bench_op_result ops[BENCH_MAX_OPS];
	int n_ops;
	uint64_t conflicts;
	char extra_json[512]; /* workload-specific figures, a JSON fragment starting with ',' (or empty) */
};

int bench_run(const struct bench_opts *o, const struct bench_workload *w, struct bench_result *res);
struct bench_stream_stats {
	int created;
	double create_s, write_s;
	uint64_t expected, events, missing, duplicates, out_of_order, unexpected, canceled;
	uint64_t puts, puts_ok, put_errors;
	double put_p50_ms, put_p99_ms;
	double client_cpu_s; /* the load generator's own CPU (user+sys) from first put to the end */
	/* per writer step (one step unless --ramp): see runner.c */
	int nsteps;
	struct bench_watch_step {
		double rate;	   /* puts/s asked */
		double seconds;	   /* how long the step wrote */
		uint64_t puts_ok;  /* puts sent in the step and acknowledged */
		uint64_t expected; /* events those puts must produce */
		uint64_t events;   /* events of those puts received (at any time) */
		uint64_t received_in_step; /* events of any put received during the step */
		double p50_ms, p99_ms;	   /* delivery latency of the step's events */
		int kept_up;
	} steps[32];
	double max_sustained; /* highest delivered events/s of a step that kept up */
};
/* The streaming workloads: is_watch 1 = watch, 0 = lease-keepalive. */
int bench_run_stream(const struct bench_opts *o, int is_watch, struct bench_result *res, struct bench_stream_stats *ss);
int bench_fsync(const struct bench_opts *o, struct bench_result *res);
const char *bench_status_name(int code);
uint64_t bench_now_ns(void);

/* Helpers shared by the engine and the workloads (runner.c). */
grpc_channel *bench_channel(const char *endpoint);
/* One unary call, synchronously. Returns the gRPC status (0 = OK, *resp set), BENCH_STATUS_DECODE, or
 * -1 when the call could not complete; err describes a failure. */
int bench_unary(grpc_channel *ch, const char *method, const ProtobufCMessage *req, const ProtobufCMessageDescriptor *rd,
		ProtobufCMessage **resp, double timeout, char *err, size_t errlen);
void bench_sort_u32(uint32_t *v, size_t n);
/* One server-streaming call: on_msg sees each message (non-zero cancels); status as bench_unary. */
int bench_server_stream(grpc_channel *ch, const char *method, const ProtobufCMessage *req,
			const ProtobufCMessageDescriptor *rd, double timeout,
			int (*on_msg)(void *arg, const ProtobufCMessage *m), void *arg, char *err, size_t errlen);
/* `benchmark list PREFIX`: one full LIST, paginated with --limit (0 = one request), or one
 * KV.RangeStream call with --stream. */
int bench_list(const struct bench_opts *o, const char *prefix, struct bench_result *res);

#endif
