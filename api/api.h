/*
 * api.h - etcd v3's gRPC services on the gRPC core C API.
 *
 * The api module owns the wire: it accepts calls, decodes request bodies with protobuf-c,
 * hands each decoded request to the handler the server routed for its method path, and
 * encodes the reply or an etcd error (status code and exact message, from one table).
 * It holds no business logic.
 *
 * Threads: api_server_start() runs completion-queue threads; handlers run on them and
 * must not block for long. api_call_reply() and api_call_fail() may be called from any
 * thread (gRPC core's start_batch is thread-safe), exactly once per call.
 */
#ifndef KEELSON_API_H
#define KEELSON_API_H

#include <stddef.h>
#include <stdint.h>

#include <protobuf-c/protobuf-c.h>

#include "api/proto/rpc.pb-c.h"

/* etcd's errors as the server reports them; api_call_fail() maps them to gRPC. */
typedef enum api_error {
	API_ERR_EMPTY_KEY,          /* InvalidArgument "etcdserver: key is not provided" */
	API_ERR_KEY_NOT_FOUND,      /* InvalidArgument "etcdserver: key not found" */
	API_ERR_VALUE_PROVIDED,     /* InvalidArgument "etcdserver: value is provided" */
	API_ERR_LEASE_PROVIDED,     /* InvalidArgument "etcdserver: lease is provided" */
	API_ERR_TOO_MANY_OPS,       /* InvalidArgument "etcdserver: too many operations in txn request" */
	API_ERR_DUPLICATE_KEY,      /* InvalidArgument "etcdserver: duplicate key given in txn request" */
	API_ERR_COMPACTED,          /* OutOfRange "etcdserver: mvcc: required revision has been compacted" */
	API_ERR_FUTURE_REV,         /* OutOfRange "etcdserver: mvcc: required revision is a future revision" */
	API_ERR_NO_SPACE,           /* ResourceExhausted "etcdserver: mvcc: database space exceeded" */
	API_ERR_REQUEST_TOO_LARGE,  /* InvalidArgument "etcdserver: request is too large" */
	API_ERR_LEASE_NOT_FOUND,    /* NotFound "etcdserver: requested lease not found" */
	API_ERR_LEASE_EXIST,        /* FailedPrecondition "etcdserver: lease already exists" */
	API_ERR_NO_LEADER,          /* Unavailable "etcdserver: no leader" */
	API_ERR_TIMEOUT,            /* Unavailable "etcdserver: request timed out" */
	API_ERR_STOPPED,            /* Unavailable "etcdserver: server stopped" */
	API_ERR_CORRUPT,            /* DataLoss "etcdserver: corrupt cluster" */
	API_ERR_TOO_MANY_REQUESTS,  /* ResourceExhausted "etcdserver: too many requests" */
	API_ERR_INTERNAL,           /* Unknown, with the message given to api_call_fail_msg() */
	API_ERR_INVALID_SORT,       /* InvalidArgument "etcdserver: invalid sort option" */
	API_ERR_COUNT
} api_error;

/* The gRPC status code and message etcd sends for err. */
int api_error_status(api_error err, const char **message);

typedef struct api_server api_server;
/* One call in flight. Owned by the api module; valid until replied or failed. */
typedef struct api_call api_call;

/*
 * A handler for a unary method. req is the decoded request, owned by the call and valid
 * until the call is replied or failed. ctx is the pointer given to api_server_route().
 * The handler (or whoever it hands the call to) must end the call exactly once.
 */
typedef void (*api_unary_fn)(void *ctx, api_call *call, const ProtobufCMessage *req);

/* ---- Streaming calls (Watch, LeaseKeepAlive, Snapshot, RangeStream) ---- */

/* One streaming call. Reference-counted: the api holds references while gRPC operations are
 * outstanding; a handler that keeps the pointer takes its own with api_stream_retain(). */
typedef struct api_stream api_stream;

typedef struct api_stream_handlers {
	/* The call arrived. Runs before any on_message of this stream. May be NULL. */
	void (*on_open)(void *ctx, api_stream *st);
	/* A request message arrived (a server-streaming method gets exactly one). msg is valid
	 * during this call only. Messages of one stream are delivered one at a time, in order. */
	void (*on_message)(void *ctx, api_stream *st, const ProtobufCMessage *msg);
	/* The call is over (finished by the server, cancelled or broken). Called exactly once,
	 * after every on_message; api_stream_send() fails from then on. May be NULL. */
	void (*on_close)(void *ctx, api_stream *st);
	/* The client closed its sending side (may be NULL: the stream goes on, as etcd's Watch
	 * does; Lease keep-alives end the call then). Called after its last on_message. */
	void (*on_half_close)(void *ctx, api_stream *st);
} api_stream_handlers;

/* Immutable, reference-counted encoded bytes that many streams can send without copies. */
typedef struct api_bytes api_bytes;
/* A new buffer of len bytes (refcount 1); *data is where to write them before sending. */
api_bytes *api_bytes_new(size_t len, uint8_t **data);
void api_bytes_ref(api_bytes *b);
void api_bytes_unref(api_bytes *b);

void api_stream_retain(api_stream *st);
void api_stream_release(api_stream *st);
void api_stream_set_data(api_stream *st, void *data);
void *api_stream_data(api_stream *st);
const char *api_stream_metadata(api_stream *st, const char *key, size_t *len);
/*
 * Queues one message whose encoding is prefix (copied) followed by shared (referenced, may
 * be NULL). Protobuf encodings concatenate: the prefix holds a message's own fields and the
 * shared bytes the repeated field many messages have in common. Returns the bytes queued
 * and not yet sent, after this one, or -1 if the stream is over.
 */
long api_stream_send(api_stream *st, const uint8_t *prefix, size_t plen, api_bytes *shared);
/*
 * A message queued by api_stream_send_merge() that later pieces may join. The sender keeps
 * one per destination (a watcher); zero-initialised = none. Only the stream reads it.
 */
typedef struct api_send_mark {
	void *sm_item;
	uint64_t sm_seq;
} api_send_mark;
/*
 * Like api_stream_send(), but if the message *mark names is still queued (not yet handed to
 * gRPC), no api_stream_send() came after it, and it stays within max_bytes, appends `more`
 * (copied) and shared to it instead of queuing another message. Protobuf parsers merge a
 * repeated embedded message field by concatenation and let a later scalar win, so a
 * response followed by `more` (the fields that changed, e.g. a header with a newer revision)
 * and more shared events is one valid response carrying both batches: under load one gRPC
 * message then carries many. units: what the caller counts (api_stream_queued_units).
 * Returns as api_stream_send(); *mark is updated.
 */
long api_stream_send_merge(api_stream *st, api_send_mark *mark, const uint8_t *prefix, size_t plen,
			   const uint8_t *more, size_t mlen, api_bytes *shared, size_t units, size_t max_bytes);
/* Units (see api_stream_send_merge) queued on the stream and not yet sent. */
size_t api_stream_queued_units(api_stream *st);
/* Whether the call is over (no more sends will go out). */
int api_stream_closed(api_stream *st);
/* Bytes queued on the stream and not yet sent. */
size_t api_stream_queued_bytes(api_stream *st);
/* Encodes msg and queues it, as api_stream_send(). */
long api_stream_send_msg(api_stream *st, const ProtobufCMessage *msg);
/* Ends the call with a status once everything queued is sent. Later calls do nothing. */
void api_stream_finish(api_stream *st, int grpc_status, const char *message);

typedef struct api_options {
	size_t ao_max_request_bytes;  /* etcd's --max-request-bytes */
	uint32_t ao_max_streams;      /* --max-concurrent-streams; 0 = gRPC's default */
	int ao_keepalive_min_time_ms; /* --grpc-keepalive-min-time */
	int ao_keepalive_interval_ms; /* --grpc-keepalive-interval */
	int ao_keepalive_timeout_ms;  /* --grpc-keepalive-timeout */
	int ao_threads;               /* completion-queue threads; 0 picks 2 */
	/* OpenSSL's TLS 1.2 cipher list for gRPC core's own TLS (etcd's --cipher-suites; the
	 * member's client channels), NULL for gRPC's default. gRPC core's C API has no per-channel
	 * knob: it is the process-wide GRPC_SSL_CIPHER_SUITES setting, which is read once, so it
	 * is set before gRPC starts. */
	const char *ao_cipher_list;
} api_options;

/* Error codes of the api module: -1100..-1199. */
enum {
	API_ERR_BIND = -1100,    /* a listen address could not be bound */
	API_ERR_UNKNOWN_METHOD = -1101,
	API_ERR_SYS = -1102,     /* out of memory or threads */
};
const char *api_strerror(int err);

int api_server_create(const api_options *opts, api_server **out);
/* Routes a unary method path such as "/etcdserverpb.KV/Range" to fn. Before start only. */
int api_server_route(api_server *s, const char *path, api_unary_fn fn, void *ctx);
/* Routes a streaming method path to handlers (which must outlive the server). */
int api_server_route_stream(api_server *s, const char *path, const api_stream_handlers *h, void *ctx);
/* Serves gRPC on an accepted, connected plaintext socket (taken over; after start). */
void api_server_adopt_fd(api_server *s, int fd);
/* The same, for a connection whose TLS the caller ended: cn (copied; NULL: none) is the
 * verified client certificate's common name, which api_dispatch_peer_cn() then returns. */
void api_server_adopt_fd_cn(api_server *s, int fd, const char *cn);
/* Listens on host:port (plaintext). Before start only. */
int api_server_listen(api_server *s, const char *host_port);
int api_server_start(api_server *s);
/* Stops accepting new calls; calls already accepted still run and must still be ended. */
void api_server_shutdown(api_server *s);
/* Shuts down if not yet, cancels the calls still in flight, joins the threads, frees s. */
void api_server_destroy(api_server *s);

/*
 * The common name of the client certificate the TLS handshake verified, for the call (or
 * stream message) whose handler runs on this thread, copied into buf; NULL on a plaintext
 * connection, without a client certificate, or outside a handler. etcd takes it as the user
 * of a request that has no token when --client-cert-auth is on.
 */
const char *api_dispatch_peer_cn(char *buf, size_t len);
/* The value of request metadata key (lower case), or NULL; valid while the call is. */
const char *api_call_metadata(api_call *call, const char *key, size_t *len);
/* Size in bytes of the encoded request body. */
size_t api_call_request_size(api_call *call);
/* Milliseconds left until the client's deadline (0 once passed), or -1 if it set none. */
int64_t api_call_remaining_ms(api_call *call);

/* Encodes resp, sends it with status OK and ends the call. */
void api_call_reply(api_call *call, const ProtobufCMessage *resp);
/* Sends etcd's status for err and ends the call. */
void api_call_fail(api_call *call, api_error err);
/* Sends an explicit status (grpc_status_code value) and message, and ends the call. */
void api_call_fail_msg(api_call *call, int grpc_status, const char *message);

#endif
