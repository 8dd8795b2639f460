/*
 * peer.h - the peer transport: moves opaque, already-encoded Raft messages between the
 * members of one cluster over long-lived TCP connections.
 *
 * THREADS
 *   A transport lives inside the caller's libuv loop (the node loop) and must only be used
 *   from that loop's thread. It starts no threads and takes no locks. Callbacks run on that
 *   thread, from inside uv_run(), never from inside a call of this header (one exception:
 *   peer_transport_init() may call on_log to say why a listen address failed). The process
 *   must ignore SIGPIPE (libuv writes with write(2)): a remote that resets a connection
 *   while a write is pending otherwise kills it.
 *
 * CONNECTIONS (one per direction)
 *   Every member dials every member it was told about (peer_add) and uses that connection
 *   ONLY to send its own messages; connections it accepts are ONLY read from. A pair of
 *   members therefore shares two TCP connections, one per direction. This needs no
 *   tie-breaking between simultaneous dials, and a slow reader on one side never delays the
 *   other direction.
 *
 * WIRE FORMAT (all integers big-endian)
 *   Every frame is a u32 payload length followed by the payload.
 *   1. The dialer sends a HELLO frame (34 + token_len bytes of payload):
 *        "KLSN" | u16 version (1) | u16 flags (PEER_HELLO_TLS: sent inside TLS; other bits 0)
 *        | u64 cluster id | u64 sender member id | u64 receiver member id
 *        | u16 token_len | token bytes (at most PEER_TOKEN_MAX)
 *   2. The acceptor answers with an ACK frame (16 bytes of payload):
 *        "KLSN" | u16 version | u16 status (PEER_HS_*) | u64 acceptor member id
 *      A non-zero status refuses the connection: the acceptor logs why, writes the ACK and
 *      closes. It refuses a different cluster id or token, a receiver id that is not its own,
 *      a sender that is itself or that it does not know (peer_add), and unknown versions.
 *      "A member from another cluster is refused." A cluster id of 0 on either side stands
 *      for "not known yet" (a member joining with --initial-cluster-state existing) and
 *      matches any id; the token must match regardless. A HELLO whose PEER_HELLO_TLS flag
 *      disagrees with the connection (see TLS) is refused with PEER_HS_TLS_MISMATCH.
 *   3. After an OK ACK, the dialer sends message frames; the acceptor sends nothing more.
 *   A length above the limit (2 KiB before the handshake, cfg.max_frame after it), a
 *   malformed HELLO/ACK, or any byte from an acceptor after its ACK closes the connection.
 *   Lengths are checked before any allocation; a large frame's buffer grows with the bytes
 *   actually received, never with the announced length alone. Give every member the same
 *   cfg.max_frame: a frame over the receiver's limit costs the sender its connection.
 *   Host names are resolved on every dial (libuv's threadpool); each address is tried in
 *   turn before the attempt counts as failed.
 *
 * DELIVERY
 *   In order and at most once per (sender, receiver) pair. A message is lost if the
 *   connection carrying it fails, or if it is still queued when a connection attempt or an
 *   established connection fails: a failure discards the whole send queue of that peer
 *   (Raft resends what matters; stale appends are useless after a reconnect). Messages
 *   sent while a connection is being (re-)established wait in the queue.
 *
 * LIVENESS
 *   TCP_NODELAY and keepalive on every connection, and TCP_USER_TIMEOUT (Linux) of
 *   cfg.pc_dead_timeout_ms: a connection whose sent data stays unacknowledged that long
 *   (a vanished host, or on recent kernels a reader that stopped reading) is closed and
 *   redialed. Connect plus handshake must finish within cfg.pc_handshake_timeout_ms.
 *   Reconnects back off exponentially with jitter; a connection that dies soon after its
 *   handshake does not reset the backoff.
 *
 * TLS (cfg.pc_tls, see peer_tls_new below)
 *   With a TLS context, every listener serves TLS and every dial is TLS (1.2 or later): the
 *   dialer is the TLS client, the acceptor the TLS server, and the whole stream above (HELLO,
 *   ACK, frames) travels inside it unchanged, HELLO flagged PEER_HELLO_TLS. The TLS
 *   handshake counts against cfg.pc_handshake_timeout_ms and the limit on inbound
 *   connections in handshake, as the HELLO does.
 *   OpenSSL runs over memory BIOs: ciphertext read from the socket is fed to the read BIO
 *   and SSL_read decrypts straight into the frame buffers (a large frame's own buffer); the
 *   write BIO's buffer is handed to uv_write whole (no copy) after each batch. A batch is
 *   written with one SSL_write per queued chunk: with TLS, peer_send() appends small
 *   messages to the tail of the queue in 16 KiB chunks (one full TLS record each) instead
 *   of one record per message.
 *   Verification, as etcd's: the acceptor requires and verifies a client certificate when
 *   given a trusted CA or client_cert_auth (then also --peer-cert-allowed-cn and the CRL);
 *   the dialer verifies the acceptor's chain against the trusted CA (the system's roots
 *   without one) and its name or IP against the host it dialed, unless skip_verify
 *   (--peer-auto-tls). Failures close the connection and are logged with OpenSSL's reason.
 *   Mismatches never hang: a plaintext HELLO arriving on a TLS listener gets a plaintext
 *   ACK refusing it with PEER_HS_TLS_MISMATCH; a TLS handshake arriving on a plaintext
 *   listener is closed at its first byte and the dialer logs that the peer closed during
 *   the TLS handshake.
 *
 * ERRORS
 *   Functions returning int return 0 or a negative PEER_E* code; peer_strerror() names it.
 *   If a call fails, nothing it would have caused (callbacks, close_cb) happens.
 */
#ifndef KEELSON_SERVER_PEER_H
#define KEELSON_SERVER_PEER_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

/* Error codes: the peer module owns -1400..-1499. */
enum {
	PEER_EINVAL = -1400,   /* bad argument or configuration */
	PEER_ENOMEM = -1401,   /* allocation failed; nothing was changed */
	PEER_EFULL = -1402,    /* the peer's send queue is over cfg.max_queue: drop the message */
	PEER_EUNKNOWN = -1403, /* no peer with that member id (peer_add it first) */
	PEER_EEXIST = -1404,   /* peer_add of a member id that is already a peer */
	PEER_ETOOBIG = -1405,  /* a message larger than cfg.max_frame */
	PEER_EADDR = -1406,    /* an address that is not "host:port" or does not resolve */
	PEER_EBIND = -1407,    /* a listen address could not be bound or listened on */
	PEER_ECLOSED = -1408,  /* peer_transport_close() was called */
	PEER_ETLS = -1409,     /* a TLS certificate, key, CA or CRL could not be used */
	PEER_ETIMEDOUT = -1410, /* peer_rpc: no answer before the call's deadline */
	PEER_EDOWN = -1411,    /* peer_rpc: the connection to the member asked was lost */
	PEER_RPC_NOT_MINE = -1412, /* peer_rpc_decode: the message is not an rpc message */
};

/* Static text for a PEER_E* code (or "unknown error"); never NULL. */
const char *peer_strerror(int err);

/* Handshake statuses carried in the ACK frame (see WIRE FORMAT). */
enum {
	PEER_HS_OK = 0,
	PEER_HS_BAD_VERSION = 1,    /* magic or version not understood */
	PEER_HS_CLUSTER_ID = 2,     /* cluster id mismatch */
	PEER_HS_TOKEN = 3,          /* cluster token mismatch */
	PEER_HS_RECEIVER = 4,       /* receiver member id is not the acceptor's */
	PEER_HS_UNKNOWN_SENDER = 5, /* the acceptor has no peer with the sender's id */
	PEER_HS_SELF = 6,           /* sender id equals the acceptor's own id */
	PEER_HS_TLS_MISMATCH = 7,   /* one side uses TLS (https peer URLs), the other not */
};

/* HELLO flags. */
#define PEER_HELLO_TLS 0x0001   /* the HELLO travels inside TLS */

#define PEER_PROTOCOL_VERSION 1
#define PEER_TOKEN_MAX 1024     /* longest cluster token */
#define PEER_HANDSHAKE_MAX 2048 /* frame limit before the handshake completes */
#define PEER_LISTEN_MAX 8       /* most listen addresses */

/* Log levels handed to peer_callbacks.on_log: same order as server.h's log_level. */
enum { PEER_LOG_DEBUG = 0, PEER_LOG_INFO = 1, PEER_LOG_WARN = 2, PEER_LOG_ERROR = 3 };

/*
 * Configuration. peer_transport_init() copies everything it needs; cfg and its strings
 * may be freed when it returns. Zero fields take the documented defaults.
 */
typedef struct peer_config {
	uint64_t pc_self_id;            /* this member's id; non-zero */
	uint64_t pc_cluster_id;         /* checked on every connection */
	const char *pc_cluster_token;   /* --initial-cluster-token; NULL means "" */
	/* "host:port" (IPv6 as "[::1]:2380"; port 0 picks one), optionally "http://host:port"
	 * (plaintext) or "https://host:port" (TLS; PEER_EINVAL without pc_tls): etcd serves each peer URL in
	 * its own scheme. Without a scheme: TLS when pc_tls is set. Peer addresses
	 * (peer_add, peer_update) take the same forms; a peer is dialed in its scheme. */
	const char *const *pc_listen;
	int pc_n_listen;                /* 0..PEER_LISTEN_MAX; 0 = send only */
	size_t pc_max_frame;            /* largest message; default 64 MiB, at most 2^31 */
	size_t pc_max_queue;            /* send queue bytes per peer; default 16 MiB */
	unsigned pc_backoff_min_ms;     /* first reconnect delay; default 100 */
	unsigned pc_backoff_max_ms;     /* cap of the doubling delay; default 5000 */
	unsigned pc_handshake_timeout_ms; /* connect + handshake deadline; default 5000 */
	unsigned pc_dead_timeout_ms;    /* keepalive and TCP_USER_TIMEOUT; default 30000 */
	uint64_t pc_seed;               /* reconnect jitter; 0 = from self id and the clock */
	const struct peer_tls *pc_tls;  /* NULL: plaintext; else TLS on connections (see pc_listen; the
					 * transport takes its own reference) */
} peer_config;

/*
 * Callbacks, all optional (NULL), all called with the ctx given to peer_transport_init().
 * They may call any function of this header, including peer_transport_close().
 */
typedef struct peer_callbacks {
	/*
	 * A message from member `from`. bytes is valid during the call only (copy what you
	 * keep); len may be 0. Messages from one sender arrive in the order it sent them.
	 */
	void (*on_message)(void *ctx, uint64_t from, const void *bytes, size_t len);
	/*
	 * The OUTGOING connection to member_id was established (connected=1: handshake
	 * accepted) or lost (0). Not called for peers removed with peer_remove() nor after
	 * peer_transport_close().
	 */
	void (*on_peer_state)(void *ctx, uint64_t member_id, int connected);
	/*
	 * A log line. member is the remote member id in hex (as etcd prints ids) or "",
	 * addr the remote "host:port" or "", error the reason or "". Pointers are valid during
	 * the call only. NULL: lines of level WARN and above go to stderr.
	 * Connection errors are logged once per run of identical failures, not per attempt.
	 */
	void (*on_log)(void *ctx, int level, const char *msg, const char *member,
		       const char *addr, const char *error);
	/*
	 * The member at member_id's address refused OUR handshake with status (PEER_HS_*).
	 * Called on every refusal (at most once per reconnect backoff), unlike on_log. A
	 * member that most of its peers refuse with PEER_HS_UNKNOWN_SENDER has most likely
	 * been removed from the cluster. Refusals of other members' handshakes by this
	 * transport are only logged.
	 */
	void (*on_refused)(void *ctx, uint64_t member_id, int status);
	/*
	 * An HTTP GET on a listener (etcd serves its peer handlers there; a member joining an
	 * existing cluster asks GET /members, see peer_http_get_members). path is the request's
	 * path. Returns the malloc'd JSON body (*len bytes; the transport frees it) and sets
	 * *cluster_id, or NULL for a path it does not serve (answered 404; out of memory: 500
	 * with *len set to 1). Called on the loop thread. NULL callback: every GET gets 404.
	 */
	char *(*on_http_get)(void *ctx, const char *path, size_t *len, uint64_t *cluster_id);
} peer_callbacks;

typedef struct peer_transport peer_transport;

/*
 * A peer TLS context: both sides' OpenSSL contexts, built once from files at start-up.
 * Thread-safe reference counting (OpenSSL's); the transport holds its own reference, so
 * the caller may peer_tls_free() its reference once peer_transport_init() returned.
 */
typedef struct peer_tls peer_tls;

typedef struct peer_tls_config {
	const char *ptc_cert_file;       /* PEM certificate (chain): server and client cert */
	const char *ptc_key_file;        /* its PEM private key */
	const char *ptc_trusted_ca_file; /* NULL/"": dialers verify with the system's roots */
	const char *ptc_crl_file;        /* NULL/"": none; acceptor refuses revoked serials */
	const char *ptc_allowed_cn;      /* NULL/"": any; else the other side's CN must match */
	int ptc_client_cert_auth;        /* acceptor requires and verifies a client cert */
	int ptc_skip_verify;             /* --peer-auto-tls: encrypt, verify nothing */
	int ptc_skip_client_san;         /* etcd 3.5's --experimental-peer-skip-client-san-verification */
	int ptc_min_version, ptc_max_version; /* OpenSSL's TLS versions (--tls-min/max-version);
					       * 0: TLS 1.2, and no upper bound */
} peer_tls_config;

/*
 * Reads the files and builds the contexts. Errors: PEER_EINVAL (no cert or key file),
 * PEER_ETLS (a file that cannot be read or used; the reason in err), PEER_ENOMEM.
 */
int peer_tls_new(peer_tls **out, const peer_tls_config *cfg, char *err, size_t errlen);
void peer_tls_free(peer_tls *tls);

/*
 * GET <url>/members of etcd's peer handler, blocking, at most timeout_ms in all: url an
 * "http(s)://host:port" peer URL; tls the peer TLS for https URLs (NULL: those fail with
 * PEER_ETLS). On 0, *body is the response body (malloc'd, NUL-ended) and *cluster_id the
 * X-Etcd-Cluster-ID header (0 if absent). Errors: PEER_EADDR (cannot connect), PEER_ETLS,
 * PEER_ETIMEDOUT, PEER_EINVAL (not a 200 answer), PEER_ENOMEM; the reason in err.
 */
int peer_http_get_members(const char *url, const peer_tls *tls, unsigned timeout_ms, char **body,
			  uint64_t *cluster_id, char *err, size_t errlen);

/*
 * etcd's --peer-auto-tls certificate: <dir>/cert.pem and <dir>/key.pem, kept if both exist,
 * else made: a self-signed ECDSA P-521 certificate of organization "etcd", valid one year,
 * for server and client auth, with each host (IP or DNS name; "host:port" accepted) as a
 * subject alternative name. dir is created (0700); the key file is 0600. Errors: PEER_ETLS
 * (reason in err).
 */
int peer_tls_self_cert(const char *dir, const char *const *hosts, int n_hosts, char *err,
		       size_t errlen);

/*
 * Creates a transport on loop, binds and listens on every cfg->pc_listen address (host
 * names are resolved here, blocking; use IP literals in the node loop). On success *out
 * owns the transport until peer_transport_close(). Errors: PEER_EINVAL, PEER_EADDR,
 * PEER_EBIND, PEER_ENOMEM; on error, listeners already opened are closed (libuv frees them
 * on the next loop turn) and no callback fires.
 */
int peer_transport_init(peer_transport **out, uv_loop_t *loop, const peer_config *cfg,
			peer_callbacks cb, void *ctx);

/*
 * The port the i-th listen address is bound to (useful with port 0), or PEER_EINVAL for
 * an index that does not exist.
 */
int peer_listen_port(const peer_transport *t, int i);

/*
 * Adds member_id (non-zero, not self) reachable at addr ("host:port", copied). The
 * transport starts dialing it on the next loop turn and accepts its inbound connections
 * from now on. addr may carry a scheme (see pc_listen; https:// without pc_tls is dialed in
 * plaintext). Errors: PEER_EINVAL, PEER_EADDR (syntax only; names resolve when dialing),
 * PEER_EEXIST, PEER_ENOMEM, PEER_ECLOSED.
 */
int peer_add(peer_transport *t, uint64_t member_id, const char *addr);

/*
 * Changes the address of member_id. A different address closes the current outgoing
 * connection (dropping its queue) and dials the new one at once. Same errors as peer_add,
 * PEER_EUNKNOWN instead of PEER_EEXIST.
 */
int peer_update(peer_transport *t, uint64_t member_id, const char *addr);

/*
 * Forgets member_id: frees its queue, closes its outgoing and inbound connections and
 * refuses its future connections. No callback fires for it afterwards.
 * Errors: PEER_EUNKNOWN, PEER_ECLOSED.
 */
int peer_remove(peer_transport *t, uint64_t member_id);

/*
 * Queues one message for member `to`. The bytes are COPIED (the caller keeps ownership
 * of its buffer, which may be freed on return), into one allocation holding the frame
 * header too. Frames queued while a write is in progress leave together in one uv_write.
 * A message into an empty queue is always accepted; otherwise PEER_EFULL when the queued
 * plus in-flight bytes would exceed cfg.max_queue, and the caller drops the message (Raft
 * tolerates loss). Errors: PEER_EFULL, PEER_EUNKNOWN, PEER_ETOOBIG, PEER_ENOMEM,
 * PEER_ECLOSED, PEER_EINVAL (bytes NULL with len > 0).
 */
int peer_send(peer_transport *t, uint64_t to, const void *bytes, size_t len);

/*
 * Sets the cluster id this transport sends in its HELLOs and checks in others' from now on
 * (a joining member that started with 0 and learned the id). Connections already open are
 * kept. Errors: PEER_ECLOSED.
 */
int peer_set_cluster_id(peer_transport *t, uint64_t cluster_id);

/* Counters of one peer, for metrics and tests. */
typedef struct peer_stats {
	int ps_connected;        /* outgoing handshake done and connection up */
	size_t ps_queued_bytes;  /* queued + in-flight bytes, frame headers included */
	uint64_t ps_sent_msgs;   /* messages whose write completed */
	uint64_t ps_sent_bytes;  /* their payload bytes */
	uint64_t ps_writes;      /* uv_write calls (batches) that completed */
	uint64_t ps_dropped_msgs; /* messages discarded by a failure or peer_update */
	uint64_t ps_recv_msgs;   /* messages received from this member */
	uint64_t ps_recv_bytes;  /* their payload bytes */
	uint64_t ps_connects;    /* outgoing connections established */
} peer_stats;

/* Fills *st for member_id. Errors: PEER_EUNKNOWN. */
int peer_get_stats(const peer_transport *t, uint64_t member_id, peer_stats *st);

/* Transport-wide counters. */
typedef struct peer_transport_stats {
	uint64_t pts_accepted;   /* inbound connections accepted (before the handshake) */
	uint64_t pts_refused;    /* handshakes refused */
	uint64_t pts_proto_errs; /* inbound connections closed for a bad frame or timeout */
	int pts_inbound;         /* inbound connections open now */
} peer_transport_stats;

void peer_transport_get_stats(const peer_transport *t, peer_transport_stats *st);

/*
 * Closes every listener and connection, drops every queue, and frees the transport once
 * libuv has closed all its handles; then calls close_cb(ctx) (may be NULL), from inside
 * uv_run(), never from this call. Between this call and close_cb, t may still be passed
 * to the functions of this header, which return PEER_ECLOSED (a second close included),
 * and no other callback fires. Once close_cb runs t is freed: do not touch it again.
 */
typedef void (*peer_close_cb)(void *ctx);
int peer_transport_close(peer_transport *t, peer_close_cb close_cb);

/*
 * REQUESTS (peer_rpc_*, peer_rpc.c): a request/response channel between members on a
 * transport, for what Raft messages do not carry (etcd uses its peer HTTP handlers for the
 * same: /leases, /leases/internal, /members/hashkv). It shares the transport with other
 * traffic: its messages begin with a tag byte the owner chooses, and the owner hands every
 * received message to peer_rpc_on_message(), which takes those with the tag.
 *
 * WIRE (one transport message each; integers big-endian)
 *   u8 tag | u8 kind (PEER_RPC_REQUEST, PEER_RPC_RESPONSE) | u64 call id (never 0)
 *   | u8 code (a request's method, a response's status) | body (the rest, may be empty)
 *   The caller picks the call id; the responder copies it into its answer, which travels on
 *   its own outgoing connection (see CONNECTIONS). Methods, statuses and bodies belong to the
 *   owner, except status PEER_RPC_ST_NO_METHOD (no handler). A frame shorter than the
 *   header, of an unknown kind or with call id 0 is dropped and counted; an answer whose id
 *   is not in flight to the member it comes from (late, cancelled, forged) is dropped.
 *
 * SEMANTICS
 *   At most once: a request is never resent by this layer. Each call ends exactly once,
 *   through its done callback, with the answer or an error: PEER_ETIMEDOUT at its deadline,
 *   PEER_EDOWN when the owner reports the connection to the member lost
 *   (peer_rpc_peer_down, e.g. from on_peer_state), PEER_ECLOSED at peer_rpc_close(). done
 *   never fires from peer_rpc_call(), peer_rpc_respond() or peer_rpc_cancel(); it fires
 *   from peer_rpc_on_message(), peer_rpc_peer_down(), peer_rpc_close() or the loop's timer.
 *   Same thread rule as the transport: the loop's thread only.
 */
typedef struct peer_rpc peer_rpc;

#define PEER_RPC_HEADER 11 /* tag, kind, call id, code */
enum { PEER_RPC_REQUEST = 1, PEER_RPC_RESPONSE = 2 };
#define PEER_RPC_ST_OK 0
#define PEER_RPC_ST_NO_METHOD 255

/* A decoded rpc message. pf_body points into the decoded bytes. */
typedef struct peer_rpc_frame {
	uint8_t pf_kind;
	uint64_t pf_id;
	uint8_t pf_code;
	const uint8_t *pf_body;
	size_t pf_len;
} peer_rpc_frame;

/*
 * Decodes one message: 0 with *f filled, PEER_RPC_NOT_MINE if it does not start with tag
 * (or is empty), PEER_EINVAL if it does but is malformed. Pure; safe on any bytes.
 */
int peer_rpc_decode(const void *bytes, size_t len, uint8_t tag, peer_rpc_frame *f);

/*
 * A call ended: status >= 0 is the responder's status (PEER_RPC_ST_OK, the owner's codes,
 * PEER_RPC_ST_NO_METHOD) with its body (valid during the call only); < 0 is a PEER_E* error
 * with no body.
 */
typedef void (*peer_rpc_done)(void *ctx, uint64_t call_id, int status, const void *body, size_t len);

/*
 * A request from member `from`. body is valid during the call only. Answer it with
 * peer_rpc_respond(r, from, call_id, ...) now or later (on the loop's thread), at most once;
 * a request never answered ends at the caller's deadline.
 */
typedef void (*peer_rpc_serve)(void *ctx, uint64_t from, uint64_t call_id, uint8_t method, const void *body,
			       size_t len);

/* Creates the channel on transport t (which must outlive it) and loop. serve may be NULL
 * (every request answered PEER_RPC_ST_NO_METHOD). Errors: PEER_EINVAL, PEER_ENOMEM. */
int peer_rpc_init(peer_rpc **out, peer_transport *t, uv_loop_t *loop, uint8_t tag, peer_rpc_serve serve,
		  void *ctx);

/*
 * Sends request (method, body copied) to member `to` and returns its call id in *call_id
 * (may be NULL). done(ctx, ...) fires once, at the latest timeout_ms from now. Errors (done
 * will not fire): PEER_EINVAL, PEER_ENOMEM, PEER_ECLOSED and peer_send()'s.
 */
int peer_rpc_call(peer_rpc *r, uint64_t to, uint8_t method, const void *body, size_t len, unsigned timeout_ms,
		  peer_rpc_done done, void *ctx, uint64_t *call_id);

/* Forgets a call in flight: its done never fires; its answer, if one comes, is dropped. */
void peer_rpc_cancel(peer_rpc *r, uint64_t call_id);

/* Answers request call_id of member `to` (body copied). Errors: peer_send()'s, PEER_ECLOSED. */
int peer_rpc_respond(peer_rpc *r, uint64_t to, uint64_t call_id, uint8_t status, const void *body, size_t len);

/* Offers a received transport message: returns 1 if it carried the tag (taken: served,
 * answered a call, or dropped as malformed), 0 if it is someone else's. */
int peer_rpc_on_message(peer_rpc *r, uint64_t from, const void *bytes, size_t len);

/* The connection to member is lost: its calls in flight end with PEER_EDOWN. */
void peer_rpc_peer_down(peer_rpc *r, uint64_t member);

typedef struct peer_rpc_stats {
	uint64_t prs_calls;     /* calls sent */
	uint64_t prs_timeouts;  /* calls that ended at their deadline */
	uint64_t prs_served;    /* answers sent */
	uint64_t prs_malformed; /* tagged messages dropped as malformed */
	uint64_t prs_unmatched; /* answers to no call in flight */
} peer_rpc_stats;

void peer_rpc_get_stats(const peer_rpc *r, peer_rpc_stats *st);

/* Ends every call in flight with PEER_ECLOSED (from inside this call), then frees the
 * channel once libuv has closed its timer. Close it before its transport's loop ends. */
void peer_rpc_close(peer_rpc *r);

#endif /* KEELSON_SERVER_PEER_H */
