/*
 * peer.c - the peer transport (see peer.h for the contract and the wire format).
 *
 * Objects and their lifetimes:
 *   peer_transport  freed when t_refs (open handles + pending getaddrinfo requests) drops to
 *                   zero after peer_transport_close().
 *   peer            one per peer_add(); owns its send queue and a timer (dial / backoff);
 *                   freed in the timer's close callback after peer_remove() or close.
 *   conn            one TCP connection, outgoing (owned by its peer, p_conn) or inbound (on
 *                   t_inbound). It owns a TCP handle and a timer (connect / handshake
 *                   deadline) and is freed when both are closed. A conn outlives the peer
 *                   that dialed it only as a detached orphan (c_peer == NULL) on its way out.
 *   frame           one queued message: the 4-byte header and the payload in one block;
 *                   with TLS, a chunk of several small messages (see peer_send).
 *   batch           one uv_write of up to BATCH_MAX frames; freed in its write callback,
 *                   which libuv runs (with UV_ECANCELED if need be) before the conn's close
 *                   callback, so a batch never outlives its conn.
 *
 * Flushing: peer_send() only queues and starts the transport's idle handle; the idle
 * callback writes each peer's queue in one uv_write. Everything sent during one loop turn
 * leaves in one writev, and frames queued while a write is in flight leave together when it
 * completes.
 *
 * TLS (t_has_tls): each conn owns an SSL over two memory BIOs. Ciphertext read from the
 * socket lands in the transport's one t_tls_rbuf (libuv reads one stream at a time and the
 * bytes go into the read BIO before on_read returns), and SSL_read decrypts into exactly
 * the buffers the plaintext path reads into (c_rbuf, c_big), which are then parsed by the
 * same code. Every SSL call is followed by tls_take_output(): the write BIO's buffer is
 * detached and given to uv_write, and freed by that write's callback.
 */
#include "server/peer.h"
#include "server/peer_tls.h"

#include <inttypes.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <openssl/buffer.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>

#define DEFAULT_MAX_FRAME (64u << 20)
#define DEFAULT_MAX_QUEUE (16u << 20)
#define DEFAULT_BACKOFF_MIN_MS 100
#define DEFAULT_BACKOFF_MAX_MS 5000
#define DEFAULT_HANDSHAKE_MS 5000
#define DEFAULT_DEAD_MS 30000
#define MAX_FRAME_LIMIT (1u << 31)

#define RBUF_SIZE (64 * 1024)        /* read buffer of an inbound connection */
#define DIAL_RBUF_SIZE (4 + 64)      /* a dialer only ever reads the ACK */
#define BATCH_MAX 512                /* frames per uv_write */
#define MAX_PENDING_HANDSHAKES 64    /* inbound connections not yet past their HELLO */
#define HELLO_FIXED 34
#define ACK_LEN 16
#define LOG_QUIET_MS 60000           /* an identical acceptor-side error is logged once per */
#define LOG_SLOTS 8
#define TLS_CHUNK 16384              /* one full TLS record of small messages */
#define TLS_RBUF_SIZE (64 * 1024)    /* ciphertext read buffer, shared by the transport */
#define TLS_RECORD_FIRST 0x16        /* a TLS handshake record's first byte */

/* Reasons a connection ends, beyond libuv's negative codes and handshake statuses. */
enum {
	WHY_REFUSED = 1000,   /* + PEER_HS_*: the remote refused our HELLO */
	WHY_PROTO = 2000,     /* local protocol checks */
	WHY_TOO_LONG = WHY_PROTO + 1,
	WHY_BAD_HELLO = WHY_PROTO + 2,
	WHY_BAD_ACK = WHY_PROTO + 3,
	WHY_WRONG_MEMBER = WHY_PROTO + 4,
	WHY_UNEXPECTED = WHY_PROTO + 5,
	WHY_TIMEOUT = WHY_PROTO + 6,
	WHY_EOF = WHY_PROTO + 7,
	WHY_NOMEM = WHY_PROTO + 8,
	WHY_BUSY = WHY_PROTO + 9,
	WHY_REPLACED = WHY_PROTO + 10,
	WHY_TLS = WHY_PROTO + 11,          /* details in c_tls_err */
	WHY_TLS_EOF = WHY_PROTO + 12,
	WHY_TLS_ON_PLAIN = WHY_PROTO + 13,
};

enum conn_state {
	CONN_CONNECTING, /* outgoing: uv_tcp_connect in flight */
	CONN_HANDSHAKE,  /* HELLO sent (outgoing) or awaited (inbound) */
	CONN_OPEN,       /* handshake done */
	CONN_REFUSING,   /* inbound: writing a refusing ACK, then closing */
	CONN_CLOSING,    /* uv_close called; waiting for the close callbacks */
};

typedef struct frame {
	struct frame *f_next;
	size_t f_len;      /* bytes used: 4 + payload of each message */
	size_t f_cap;      /* bytes allocated in f_data (> f_len only for TLS chunks) */
	unsigned f_msgs;   /* messages in it */
	uint8_t f_data[];
} frame;

typedef struct peer peer;
typedef struct conn conn;

typedef struct batch {
	uv_write_t b_req;
	conn *b_conn;
	frame *b_frames;
	unsigned b_n;
	size_t b_bytes;      /* frame bytes, headers included */
	size_t b_payload;
	BUF_MEM *b_tls;      /* TLS: the ciphertext being written */
	uv_buf_t b_bufs[];
} batch;

/* A TLS write of protocol records only (handshake, alerts). */
typedef struct tls_out {
	uv_write_t o_req;
	BUF_MEM *o_buf;
} tls_out;

struct conn {
	uv_tcp_t c_tcp;
	uv_timer_t c_timer;
	uv_connect_t c_connect;
	uv_write_t c_ctl_req;  /* the HELLO or the ACK */
	peer_transport *c_t;
	peer *c_peer;          /* outgoing: the owner (NULL once detached) */
	peer *c_rpeer;         /* inbound: the sender once the handshake passed */
	conn *c_prev, *c_next; /* inbound list */
	uint64_t c_remote;     /* inbound: the sender's member id */
	uint64_t c_open_ms;
	int c_outgoing;
	int c_state;
	int c_handles;
	int c_writing;
	int c_was_open;
	int c_connect_failed;  /* outgoing: uv_tcp_connect itself failed */
	uint8_t *c_rbuf;
	size_t c_rcap, c_rlen;
	uint8_t *c_big;        /* a frame too large for c_rbuf, filled as bytes arrive */
	size_t c_big_len, c_big_have, c_big_cap;
	char c_addr[64];
	uint8_t c_ctl[4 + HELLO_FIXED + PEER_TOKEN_MAX];
	SSL *c_ssl;            /* NULL: plaintext */
	int c_tls_done;        /* the TLS handshake completed */
	int c_tls_fed;         /* bytes were fed to c_ssl (the first byte was checked) */
	int c_tls_mismatch;    /* inbound: a plaintext HELLO on a TLS listener, to refuse */
	int c_http_done;       /* inbound: an HTTP request answered; closed once written */
	int c_tls_failed;      /* tls_fail: closes once its alert is written */
	BUF_MEM *c_ctl_out;    /* TLS: the ciphertext of the HELLO/ACK being written */
	char c_tls_err[192];   /* the reason of a WHY_TLS failure */
};

struct peer {
	peer *p_next;
	peer_transport *p_t;
	uint64_t p_id;
	char *p_addr;
	int p_tls;            /* dialed in TLS (an https peer URL) */
	uv_timer_t p_timer;
	conn *p_conn;
	struct resolve *p_resolve;
	struct addrinfo *p_ai;     /* resolved addresses of a host name, tried in turn */
	struct addrinfo *p_ai_cur; /* the one being dialed */
	frame *p_qhead, *p_qtail;
	size_t p_queued;        /* queued + in flight */
	unsigned p_attempts;    /* consecutive failures, for the backoff */
	int p_redial_now;
	int p_log_state;        /* 0 nothing logged, 1 "active" logged, 2 failure p_log_why logged */
	int p_log_why;
	char p_log_detail[192];
	int p_removed;
	peer_stats p_st;
};

typedef struct resolve {
	uv_getaddrinfo_t r_req;
	peer_transport *r_t;
	peer *r_peer; /* NULL once the peer no longer waits for it */
} resolve;

typedef struct listener {
	uv_tcp_t l_tcp;
	peer_transport *l_t; /* NULL while init fails */
	int l_port;
	int l_tls; /* its connections are TLS (an https peer URL) */
} listener;

struct peer_transport {
	uv_loop_t *t_loop;
	peer_callbacks t_cb;
	void *t_ctx;
	uint64_t t_self;
	uint64_t t_cluster;
	char *t_token;
	size_t t_token_len;
	size_t t_max_frame;
	size_t t_max_queue;
	unsigned t_backoff_min, t_backoff_max, t_hs_ms, t_dead_ms;
	uint64_t t_rng;
	listener *t_listen[PEER_LISTEN_MAX];
	int t_n_listen;
	uv_idle_t t_idle;    /* flushes queues; also keeps close asynchronous */
	peer *t_peers;
	conn *t_inbound;
	int t_pending_hs;
	long t_refs;
	int t_closing;
	peer_close_cb t_close_cb;
	peer_transport_stats t_st;
	int t_has_tls;
	struct peer_tls t_tls;  /* our references, when t_has_tls */
	uint8_t *t_tls_rbuf;    /* TLS_RBUF_SIZE: ciphertext, see the top of this file */
	struct {
		int why;
		uint64_t id;
		uint64_t ms;
	} t_quiet[LOG_SLOTS];
	unsigned t_quiet_next;
};

/* ---- errors and logging ---- */

const char *peer_strerror(int err)
{
	switch (err) {
	case 0: return "success";
	case PEER_EINVAL: return "peer: invalid argument";
	case PEER_ENOMEM: return "peer: out of memory";
	case PEER_EFULL: return "peer: send queue full";
	case PEER_EUNKNOWN: return "peer: unknown member";
	case PEER_EEXIST: return "peer: member already added";
	case PEER_ETOOBIG: return "peer: message larger than the frame limit";
	case PEER_EADDR: return "peer: invalid address";
	case PEER_EBIND: return "peer: cannot listen on address";
	case PEER_ECLOSED: return "peer: transport closed";
	case PEER_ETLS: return "peer: TLS setup failed";
	case PEER_ETIMEDOUT: return "peer: request timed out";
	case PEER_EDOWN: return "peer: connection to the member lost";
	case PEER_RPC_NOT_MINE: return "peer: not a request channel message";
	default: return "peer: unknown error";
	}
}

static const char *hs_status_text(int st)
{
	switch (st) {
	case PEER_HS_OK: return "accepted";
	case PEER_HS_BAD_VERSION: return "unsupported protocol version";
	case PEER_HS_CLUSTER_ID: return "cluster ID mismatch";
	case PEER_HS_TOKEN: return "cluster token mismatch";
	case PEER_HS_RECEIVER: return "receiver member ID mismatch";
	case PEER_HS_UNKNOWN_SENDER: return "sender is not a known member";
	case PEER_HS_SELF: return "sender has the receiver's own member ID";
	case PEER_HS_TLS_MISMATCH: return "TLS mismatch: one member uses TLS (https peer URLs), the other plaintext (http)";
	default: return "unknown handshake status";
	}
}

static const char *why_text(int why)
{
	if (why < 0)
		return uv_strerror(why);
	if (why >= WHY_REFUSED && why < WHY_PROTO)
		return hs_status_text(why - WHY_REFUSED);
	switch (why) {
	case WHY_TOO_LONG: return "frame length over the limit";
	case WHY_BAD_HELLO: return "malformed handshake";
	case WHY_BAD_ACK: return "malformed handshake reply";
	case WHY_WRONG_MEMBER: return "a different member answers at this address";
	case WHY_UNEXPECTED: return "unexpected data from the acceptor";
	case WHY_TIMEOUT: return "connect or handshake timed out";
	case WHY_EOF: return "connection closed by the remote";
	case WHY_NOMEM: return "out of memory";
	case WHY_BUSY: return "too many connections in handshake";
	case WHY_REPLACED: return "replaced by a newer connection from the same member";
	case WHY_TLS: return "TLS error";
	case WHY_TLS_EOF: return "connection closed during the TLS handshake (does the peer serve plaintext http peer URLs?)";
	case WHY_TLS_ON_PLAIN: return "TLS handshake on a plaintext peer listener (the dialing member uses https peer URLs, this one http)";
	default: return "unknown";
	}
}

static void tlog(peer_transport *t, int lvl, const char *msg, uint64_t id, const char *addr,
		 const char *err)
{
	char idhex[17] = "";
	if (t->t_closing)
		return;
	if (id != 0)
		snprintf(idhex, sizeof(idhex), "%" PRIx64, id);
	if (addr == NULL)
		addr = "";
	if (err == NULL)
		err = "";
	if (t->t_cb.on_log != NULL)
		t->t_cb.on_log(t->t_ctx, lvl, msg, idhex, addr, err);
	else if (lvl >= PEER_LOG_WARN)
		fprintf(stderr, "keelson peer: %s remote-peer-id=%s address=%s error=%s\n", msg, idhex,
			addr, err);
}

/* Whether an acceptor-side error (why, id) was logged within LOG_QUIET_MS; records it if not. */
static int maybe_quiet(peer_transport *t, int why, uint64_t id)
{
	uint64_t now = uv_now(t->t_loop);
	for (unsigned i = 0; i < LOG_SLOTS; i++) {
		if (t->t_quiet[i].ms != 0 && t->t_quiet[i].why == why && t->t_quiet[i].id == id) {
			if (now - t->t_quiet[i].ms < LOG_QUIET_MS)
				return 1;
			t->t_quiet[i].ms = now;
			return 0;
		}
	}
	unsigned i = t->t_quiet_next++ % LOG_SLOTS;
	t->t_quiet[i].why = why;
	t->t_quiet[i].id = id;
	t->t_quiet[i].ms = now ? now : 1;
	return 0;
}

/* ---- small helpers ---- */

static void put_be16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static void put_be32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

static void put_be64(uint8_t *p, uint64_t v)
{
	put_be32(p, (uint32_t)(v >> 32));
	put_be32(p + 4, (uint32_t)v);
}

static uint16_t get_be16(const uint8_t *p)
{
	return (uint16_t)((p[0] << 8) | p[1]);
}

static uint32_t get_be32(const uint8_t *p)
{
	return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static uint64_t get_be64(const uint8_t *p)
{
	return ((uint64_t)get_be32(p) << 32) | get_be32(p + 4);
}

static uint64_t rng_next(peer_transport *t)
{
	/* xorshift64* */
	uint64_t x = t->t_rng;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	t->t_rng = x;
	return x * 0x2545F4914F6CDD1DULL;
}

/*
 * Splits "host:port" or "[v6]:port" into host and port. Returns 0 or PEER_EADDR.
 * An empty host is allowed (listen on every address).
 */
static int parse_host_port(const char *s, char *host, size_t hostlen, int *port)
{
	const char *colon;
	size_t hl;
	if (s == NULL)
		return PEER_EADDR;
	if (s[0] == '[') {
		const char *end = strchr(s, ']');
		if (end == NULL || end[1] != ':')
			return PEER_EADDR;
		hl = (size_t)(end - s - 1);
		if (hl == 0 || hl >= hostlen)
			return PEER_EADDR;
		memcpy(host, s + 1, hl);
		colon = end + 1;
	} else {
		colon = strrchr(s, ':');
		if (colon == NULL || memchr(s, ':', (size_t)(colon - s)) != NULL)
			return PEER_EADDR;
		hl = (size_t)(colon - s);
		if (hl >= hostlen)
			return PEER_EADDR;
		memcpy(host, s, hl);
	}
	host[hl] = '\0';
	const char *d = colon + 1;
	long v = 0;
	if (*d == '\0')
		return PEER_EADDR;
	for (; *d != '\0'; d++) {
		if (*d < '0' || *d > '9')
			return PEER_EADDR;
		v = v * 10 + (*d - '0');
		if (v > 65535)
			return PEER_EADDR;
	}
	*port = (int)v;
	return 0;
}

/*
 * An address with an optional scheme (see peer_config.pc_listen): the "host:port" part, and
 * whether it is TLS in *tls (no scheme: as the transport, TLS when it has a context).
 * An https:// address on a transport without TLS is plaintext too: an https listener is
 * then refused (peer_transport_init), and a peer there is dialed in plaintext, whose
 * refusal says why (PEER_HS_TLS_MISMATCH).
 */
static const char *addr_scheme(const peer_transport *t, const char *addr, int *tls)
{
	*tls = t->t_has_tls;
	if (strncmp(addr, "http://", 7) == 0) {
		*tls = 0;
		return addr + 7;
	}
	if (strncmp(addr, "https://", 8) == 0) {
		*tls = t->t_has_tls;
		return addr + 8;
	}
	return addr;
}

static int check_peer_addr(const char *addr)
{
	char host[256];
	int port;
	if (parse_host_port(addr, host, sizeof(host), &port) != 0 || host[0] == '\0' || port == 0)
		return PEER_EADDR;
	return 0;
}

static void addr_text(const struct sockaddr *sa, char *out, size_t outlen)
{
	char ip[INET6_ADDRSTRLEN] = "?";
	int port = 0;
	if (sa->sa_family == AF_INET) {
		const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
		uv_ip4_name(in, ip, sizeof(ip));
		port = ntohs(in->sin_port);
		snprintf(out, outlen, "%s:%d", ip, port);
	} else if (sa->sa_family == AF_INET6) {
		const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
		uv_ip6_name(in6, ip, sizeof(ip));
		port = ntohs(in6->sin6_port);
		snprintf(out, outlen, "[%s]:%d", ip, port);
	} else {
		snprintf(out, outlen, "?");
	}
}

static peer *peer_find(const peer_transport *t, uint64_t id)
{
	for (peer *p = t->t_peers; p != NULL; p = p->p_next)
		if (p->p_id == id)
			return p;
	return NULL;
}

static void maybe_free_transport(peer_transport *t)
{
	if (!t->t_closing || t->t_refs > 0)
		return;
	peer_close_cb cb = t->t_close_cb;
	void *ctx = t->t_ctx;
	if (t->t_has_tls)
		peer_tls__release(&t->t_tls);
	free(t->t_tls_rbuf);
	free(t->t_token);
	free(t);
	if (cb != NULL)
		cb(ctx);
}

static void schedule_flush(peer_transport *t);
static void peer_schedule_dial(peer *p);
static void peer_connect_to(peer *p, const struct sockaddr *sa);

static void peer_free_ai(peer *p)
{
	if (p->p_ai != NULL)
		uv_freeaddrinfo(p->p_ai);
	p->p_ai = p->p_ai_cur = NULL;
}

/* ---- the send queue ---- */

/* Frees every queued (not in flight) frame of p, counting them as dropped. */
static void peer_drop_queue(peer *p)
{
	frame *f = p->p_qhead;
	while (f != NULL) {
		frame *next = f->f_next;
		p->p_queued -= f->f_len;
		p->p_st.ps_dropped_msgs += f->f_msgs;
		free(f);
		f = next;
	}
	p->p_qhead = p->p_qtail = NULL;
}

/* ---- connections ---- */

static void on_conn_closed(uv_handle_t *h)
{
	conn *c = h->data;
	peer_transport *t = c->c_t;
	t->t_refs--;
	if (--c->c_handles > 0)
		return;
	peer *p = c->c_outgoing ? c->c_peer : NULL;
	free(c->c_rbuf);
	free(c->c_big);
	SSL_free(c->c_ssl);
	BUF_MEM_free(c->c_ctl_out);
	int was_open = c->c_was_open;
	int connect_failed = c->c_connect_failed;
	uint64_t open_ms = c->c_open_ms;
	free(c);
	if (p != NULL && connect_failed && !p->p_redial_now && !t->t_closing && !p->p_removed &&
	    p->p_ai_cur != NULL && p->p_ai_cur->ai_next != NULL) {
		/* The name has more addresses (say ::1 then 127.0.0.1 for localhost): try the
		 * next one now; the attempt fails only when all did. */
		p->p_conn = NULL;
		p->p_ai_cur = p->p_ai_cur->ai_next;
		peer_connect_to(p, p->p_ai_cur->ai_addr);
		maybe_free_transport(t);
		return;
	}
	if (p != NULL) {
		/* The connection is gone: what it did not send is stale (see DELIVERY). */
		p->p_conn = NULL;
		peer_free_ai(p);
		peer_drop_queue(p);
		if (p->p_redial_now) {
			p->p_redial_now = 0;
			p->p_attempts = 0;
		} else if (was_open && uv_now(t->t_loop) - open_ms >= t->t_backoff_max) {
			/* A connection that lived long enough resets the backoff; one that dies
			 * right after its handshake keeps escalating it, so a flapping peer
			 * costs little. */
			p->p_attempts = 0;
		} else if (p->p_attempts < 32) {
			p->p_attempts++;
		}
		if (was_open) {
			p->p_st.ps_connected = 0;
			if (!t->t_closing && t->t_cb.on_peer_state != NULL)
				t->t_cb.on_peer_state(t->t_ctx, p->p_id, 0);
		}
		if (!t->t_closing && !p->p_removed)
			peer_schedule_dial(p);
	}
	maybe_free_transport(t);
}

static void conn_close(conn *c)
{
	peer_transport *t = c->c_t;
	if (c->c_state == CONN_CLOSING)
		return;
	if (!c->c_outgoing) {
		if (c->c_state == CONN_HANDSHAKE)
			t->t_pending_hs--;
		if (c->c_prev != NULL)
			c->c_prev->c_next = c->c_next;
		else
			t->t_inbound = c->c_next;
		if (c->c_next != NULL)
			c->c_next->c_prev = c->c_prev;
		c->c_prev = c->c_next = NULL;
		t->t_st.pts_inbound--;
	}
	c->c_state = CONN_CLOSING;
	uv_close((uv_handle_t *)&c->c_tcp, on_conn_closed);
	uv_close((uv_handle_t *)&c->c_timer, on_conn_closed);
}

/* An outgoing connection (attempt) failed: log the first of a run of identical failures. */
static void dial_failed_log(peer *p, int why, const char *detail)
{
	peer_transport *t = p->p_t;
	if (detail == NULL)
		detail = why_text(why);
	if (p->p_log_state == 2 && p->p_log_why == why && strcmp(p->p_log_detail, detail) == 0)
		return;
	const char *msg = p->p_log_state == 1 ? "peer became inactive (connection lost)"
					       : "failed to connect to peer";
	if (why >= WHY_REFUSED && why < WHY_PROTO)
		msg = "peer refused the connection";
	tlog(t, PEER_LOG_WARN, msg, p->p_id, p->p_addr, detail);
	p->p_log_state = 2;
	p->p_log_why = why;
	snprintf(p->p_log_detail, sizeof(p->p_log_detail), "%s", detail);
}

/* Closes c for reason why, logging it (outgoing: once per run; inbound: rate-limited). */
/* Logs why c fails (outgoing: once per run; inbound: rate-limited). */
static void conn_log_failure(conn *c, int why)
{
	peer_transport *t = c->c_t;
	const char *detail = why == WHY_TLS && c->c_tls_err[0] != '\0' ? c->c_tls_err : why_text(why);
	if (c->c_outgoing) {
		peer *p = c->c_peer;
		/* Not yet a failure if the name has another address to try (on_conn_closed). */
		int more = c->c_connect_failed && p != NULL && p->p_ai_cur != NULL &&
			   p->p_ai_cur->ai_next != NULL;
		if (p != NULL && !more)
			dial_failed_log(p, why, detail);
	} else {
		uint64_t id = c->c_remote;
		if (why != WHY_EOF && why != UV_ECONNRESET && why != WHY_REPLACED)
			t->t_st.pts_proto_errs++;
		int lvl = (why == WHY_EOF || why == UV_ECONNRESET || why == WHY_REPLACED)
				  ? PEER_LOG_INFO
				  : PEER_LOG_WARN;
		if (!maybe_quiet(t, why, id))
			tlog(t, lvl, "closed inbound peer connection", id, c->c_addr, detail);
	}
}

/* Closes c for reason why, logging it. */
static void conn_fail(conn *c, int why)
{
	if (c->c_state == CONN_CLOSING)
		return;
	conn_log_failure(c, why);
	conn_close(c);
}

static conn *conn_new(peer_transport *t, int outgoing)
{
	conn *c = calloc(1, sizeof(*c));
	if (c == NULL)
		return NULL;
	c->c_rcap = outgoing ? DIAL_RBUF_SIZE : RBUF_SIZE;
	c->c_rbuf = malloc(c->c_rcap);
	if (c->c_rbuf == NULL) {
		free(c);
		return NULL;
	}
	c->c_t = t;
	c->c_outgoing = outgoing;
	uv_tcp_init(t->t_loop, &c->c_tcp);
	uv_timer_init(t->t_loop, &c->c_timer);
	c->c_tcp.data = c;
	c->c_timer.data = c;
	c->c_handles = 2;
	t->t_refs += 2;
	return c;
}

/* TCP_NODELAY, keepalive, and a bound on how long unacknowledged data may stay unacked. */
static void conn_tune(conn *c)
{
	peer_transport *t = c->c_t;
	unsigned dead_s = t->t_dead_ms / 1000;
	unsigned idle = dead_s / 2 > 0 ? dead_s / 2 : 1;
	uv_tcp_nodelay(&c->c_tcp, 1);
	uv_tcp_keepalive(&c->c_tcp, 1, idle);
	uv_os_fd_t fd;
	if (uv_fileno((uv_handle_t *)&c->c_tcp, &fd) != 0)
		return;
#if defined(TCP_KEEPINTVL) && defined(TCP_KEEPCNT)
	int intvl = dead_s / 6 > 0 ? (int)(dead_s / 6) : 1, cnt = 3;
	setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
	setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
#endif
#ifdef TCP_USER_TIMEOUT
	unsigned int ms = t->t_dead_ms;
	setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &ms, sizeof(ms));
#endif
}

static void on_conn_timeout(uv_timer_t *timer)
{
	conn_fail(timer->data, WHY_TIMEOUT);
}

/* The frame length this connection accepts in its current state. */
static size_t conn_frame_limit(const conn *c)
{
	if (c->c_outgoing)
		return DIAL_RBUF_SIZE - 4; /* the ACK, with room to grow */
	if (c->c_state == CONN_OPEN)
		return c->c_t->t_max_frame;
	return PEER_HANDSHAKE_MAX;
}

static void on_ctl_written(uv_write_t *req, int status)
{
	conn *c = req->data;
	BUF_MEM_free(c->c_ctl_out);
	c->c_ctl_out = NULL;
	if (c->c_state == CONN_CLOSING)
		return;
	if (c->c_state == CONN_REFUSING) {
		conn_close(c);
		return;
	}
	if (status < 0)
		conn_fail(c, status);
}

/* ---- TLS (see the top of this file) ---- */

/* The reason of c's TLS failure into c_tls_err; clears OpenSSL's (per-thread) error queue. */
static void tls_note_error(conn *c, const char *what)
{
	if (c->c_tls_err[0] != '\0') { /* set by tls_verify_cb: more precise */
		ERR_clear_error();
		return;
	}
	unsigned long code = ERR_peek_last_error();
	const char *reason = code != 0 ? ERR_reason_error_string(code) : NULL;
	long vr = c->c_ssl != NULL ? SSL_get_verify_result(c->c_ssl) : X509_V_OK;
	if (reason == NULL)
		reason = what;
	if (vr != X509_V_OK)
		snprintf(c->c_tls_err, sizeof(c->c_tls_err), "tls: %s: %s", reason,
			 X509_verify_cert_error_string(vr));
	else
		snprintf(c->c_tls_err, sizeof(c->c_tls_err), "tls: %s", reason);
	ERR_clear_error();
}

/*
 * Detaches the bytes c's write BIO holds: the BIO gets a fresh empty buffer and the caller
 * owns the full one (BUF_MEM_free), so ciphertext reaches uv_write without a copy. NULL if
 * there is nothing, or on allocation failure (*nomem set).
 */
static BUF_MEM *tls_take_output(conn *c, int *nomem)
{
	BIO *wb = SSL_get_wbio(c->c_ssl);
	BUF_MEM *full = NULL;
	*nomem = 0;
	if (BIO_ctrl_pending(wb) == 0)
		return NULL;
	BUF_MEM *fresh = BUF_MEM_new();
	if (fresh == NULL) {
		*nomem = 1;
		return NULL;
	}
	BIO_get_mem_ptr(wb, &full);
	BIO_set_close(wb, BIO_NOCLOSE); /* the BIO must not free `full` when it lets go of it */
	BIO_set_mem_buf(wb, fresh, BIO_CLOSE);
	return full;
}

static void on_tls_out_written(uv_write_t *req, int status)
{
	tls_out *o = (tls_out *)req;
	conn *c = req->data;
	BUF_MEM_free(o->o_buf);
	free(o);
	if (c->c_state == CONN_CLOSING)
		return;
	if (c->c_tls_failed || c->c_http_done) /* the alert or the HTTP answer is out */
		conn_close(c);
	else if (status < 0)
		conn_fail(c, status);
}

/* Writes the TLS records c's SSL produced (handshake, alerts). 0, or -1 once c failed. */
static int tls_flush(conn *c)
{
	int nomem;
	BUF_MEM *bm = tls_take_output(c, &nomem);
	if (bm == NULL) {
		if (!nomem)
			return 0;
		conn_fail(c, WHY_NOMEM);
		return -1;
	}
	tls_out *o = malloc(sizeof(*o));
	if (o == NULL) {
		BUF_MEM_free(bm);
		conn_fail(c, WHY_NOMEM);
		return -1;
	}
	o->o_buf = bm;
	o->o_req.data = c;
	uv_buf_t b = uv_buf_init(bm->data, (unsigned)bm->length);
	int r = uv_write(&o->o_req, (uv_stream_t *)&c->c_tcp, &b, 1, on_tls_out_written);
	if (r < 0) {
		BUF_MEM_free(bm);
		free(o);
		conn_fail(c, r);
		return -1;
	}
	return 0;
}

/* A TLS failure (reason in c_tls_err): logged now; the alert OpenSSL wrote, if any, goes out
 * before the close, so the other side can log the reason too. */
static void tls_fail(conn *c)
{
	peer_transport *t = c->c_t;
	if (c->c_state == CONN_CLOSING)
		return;
	conn_log_failure(c, WHY_TLS);
	if (c->c_state == CONN_REFUSING || BIO_ctrl_pending(SSL_get_wbio(c->c_ssl)) == 0) {
		conn_close(c);
		return;
	}
	if (!c->c_outgoing && c->c_state == CONN_HANDSHAKE)
		t->t_pending_hs--;
	/* Reading goes on (on_read drops the bytes): closing with unread bytes would send a
	 * reset, which may overtake the alert. */
	c->c_state = CONN_REFUSING;
	c->c_tls_failed = 1;
	uv_timer_start(&c->c_timer, on_conn_timeout, t->t_hs_ms, 0);
	tls_flush(c);
}

/* SSL_write of all of data (in pieces below INT_MAX). 0, or -1 with c_tls_err set. */
static int tls_write_all(conn *c, const uint8_t *data, size_t len)
{
	while (len > 0) {
		int n = len > (1u << 30) ? (1 << 30) : (int)len;
		if (SSL_write(c->c_ssl, data, n) != n) {
			tls_note_error(c, "write failed");
			return -1;
		}
		data += n;
		len -= (size_t)n;
	}
	return 0;
}

/* OpenSSL's chain verification, plus peer_tls__check_cert on each certificate it accepted:
 * a refusal here fails the handshake with an alert the other side can log. */
static int tls_verify_cb(int ok, X509_STORE_CTX *xs)
{
	SSL *ssl = X509_STORE_CTX_get_ex_data(xs, SSL_get_ex_data_X509_STORE_CTX_idx());
	conn *c = ssl != NULL ? SSL_get_app_data(ssl) : NULL;
	X509 *cert = X509_STORE_CTX_get_current_cert(xs);
	if (!ok || c == NULL || cert == NULL)
		return ok;
	int err = peer_tls__check_cert(&c->c_t->t_tls, cert, X509_STORE_CTX_get_error_depth(xs),
				       !c->c_outgoing, c->c_addr, c->c_tls_err, sizeof(c->c_tls_err));
	if (err == X509_V_OK)
		return 1;
	X509_STORE_CTX_set_error(xs, err);
	return 0;
}

/* Gives c an SSL over memory BIOs: the acceptor's server side or the dialer's client side. */
static int conn_tls_begin(conn *c)
{
	peer_transport *t = c->c_t;
	SSL *ssl = SSL_new(c->c_outgoing ? t->t_tls.pt_client : t->t_tls.pt_server);
	BIO *rb = BIO_new(BIO_s_mem()), *wb = BIO_new(BIO_s_mem());
	if (ssl == NULL || rb == NULL || wb == NULL) {
		SSL_free(ssl);
		BIO_free(rb);
		BIO_free(wb);
		ERR_clear_error();
		return -1;
	}
	/* An empty memory BIO means "wait for more bytes", never the end of the stream. */
	BIO_set_mem_eof_return(rb, -1);
	BIO_set_mem_eof_return(wb, -1);
	SSL_set_bio(ssl, rb, wb);
	SSL_set_app_data(ssl, c);
	SSL_set_verify(ssl, SSL_get_verify_mode(ssl), tls_verify_cb);
	c->c_ssl = ssl;
	if (!c->c_outgoing) {
		SSL_set_accept_state(ssl);
		return 0;
	}
	SSL_set_connect_state(ssl);
	char host[256];
	int port;
	if (t->t_tls.pt_verify && c->c_peer != NULL &&
	    parse_host_port(c->c_peer->p_addr, host, sizeof(host), &port) == 0) {
		/* As Go's dialer, which etcd uses: the certificate must name the host dialed. */
		X509_VERIFY_PARAM *vp = SSL_get0_param(ssl);
		if (X509_VERIFY_PARAM_set1_ip_asc(vp, host) != 1) {
			ERR_clear_error();
			SSL_set_tlsext_host_name(ssl, host);
			X509_VERIFY_PARAM_set1_host(vp, host, 0);
		}
	}
	return 0;
}

static int conn_write_ctl(conn *c, size_t len)
{
	uv_buf_t b = uv_buf_init((char *)c->c_ctl, (unsigned)len);
	c->c_ctl_req.data = c;
	if (c->c_ssl != NULL) {
		int nomem;
		ERR_clear_error();
		if (tls_write_all(c, c->c_ctl, len) != 0)
			return UV_EPROTO;
		c->c_ctl_out = tls_take_output(c, &nomem);
		if (c->c_ctl_out == NULL)
			return UV_ENOMEM;
		b = uv_buf_init(c->c_ctl_out->data, (unsigned)c->c_ctl_out->length);
	}
	return uv_write(&c->c_ctl_req, (uv_stream_t *)&c->c_tcp, &b, 1, on_ctl_written);
}

/* ---- inbound: HELLO checks and messages ---- */

static int hello_check(conn *c, const uint8_t *pl, size_t len, uint64_t *sender)
{
	peer_transport *t = c->c_t;
	if (len < 8 || memcmp(pl, "KLSN", 4) != 0)
		return -WHY_BAD_HELLO;
	if (get_be16(pl + 4) != PEER_PROTOCOL_VERSION)
		return PEER_HS_BAD_VERSION;
	if (len < HELLO_FIXED)
		return -WHY_BAD_HELLO;
	size_t tlen = get_be16(pl + 32);
	if (tlen > PEER_TOKEN_MAX || len != HELLO_FIXED + tlen)
		return -WHY_BAD_HELLO;
	*sender = get_be64(pl + 16);
	/* A plaintext HELLO on a TLS listener, or a HELLO that says it travels in TLS when it
	 * does not (a TLS-terminating proxy in between, say): the two members disagree. */
	int tls_hello = (get_be16(pl + 6) & PEER_HELLO_TLS) != 0;
	if (c->c_tls_mismatch || tls_hello != (c->c_ssl != NULL))
		return PEER_HS_TLS_MISMATCH;
	/* 0 is a member joining an existing cluster that has yet to learn the cluster id
	 * (etcd's --initial-cluster-state existing); the token must still match. */
	if (get_be64(pl + 8) != t->t_cluster && get_be64(pl + 8) != 0 && t->t_cluster != 0)
		return PEER_HS_CLUSTER_ID;
	if (tlen != t->t_token_len || memcmp(pl + HELLO_FIXED, t->t_token, tlen) != 0)
		return PEER_HS_TOKEN;
	if (get_be64(pl + 24) != t->t_self)
		return PEER_HS_RECEIVER;
	if (*sender == t->t_self)
		return PEER_HS_SELF;
	if (*sender == 0 || peer_find(t, *sender) == NULL)
		return PEER_HS_UNKNOWN_SENDER;
	return PEER_HS_OK;
}

static void inbound_on_hello(conn *c, const uint8_t *pl, size_t len)
{
	peer_transport *t = c->c_t;
	uint64_t sender = 0;
	int st = hello_check(c, pl, len, &sender);
	if (st < 0) {
		conn_fail(c, -st);
		return;
	}
	uv_timer_stop(&c->c_timer);
	t->t_pending_hs--;
	memcpy(c->c_ctl + 4, "KLSN", 4);
	put_be32(c->c_ctl, ACK_LEN);
	put_be16(c->c_ctl + 8, PEER_PROTOCOL_VERSION);
	put_be16(c->c_ctl + 10, (uint16_t)st);
	put_be64(c->c_ctl + 12, t->t_self);
	if (st != PEER_HS_OK) {
		t->t_st.pts_refused++;
		c->c_remote = sender;
		if (!maybe_quiet(t, WHY_REFUSED + st, sender))
			tlog(t, PEER_LOG_WARN, "refused peer connection", sender, c->c_addr,
			     hs_status_text(st));
		c->c_state = CONN_REFUSING;
		uv_read_stop((uv_stream_t *)&c->c_tcp);
		/* Bound the refusal too: a remote that never reads cannot keep us. */
		uv_timer_start(&c->c_timer, on_conn_timeout, t->t_hs_ms, 0);
		if (conn_write_ctl(c, 4 + ACK_LEN) < 0)
			conn_close(c);
		return;
	}
	/* A newer connection from the same sender means the older one is dead to it; keeping
	 * both could interleave their messages out of order. */
	for (conn *o = t->t_inbound; o != NULL;) {
		conn *next = o->c_next;
		if (o != c && o->c_state == CONN_OPEN && o->c_remote == sender)
			conn_fail(o, WHY_REPLACED);
		o = next;
	}
	c->c_remote = sender;
	c->c_rpeer = peer_find(t, sender);
	c->c_state = CONN_OPEN;
	tlog(t, PEER_LOG_DEBUG, "accepted peer connection", sender, c->c_addr, NULL);
	int r = conn_write_ctl(c, 4 + ACK_LEN);
	if (r < 0)
		conn_fail(c, r);
}

static void inbound_on_message(conn *c, const uint8_t *pl, size_t len)
{
	peer_transport *t = c->c_t;
	if (c->c_rpeer != NULL) {
		c->c_rpeer->p_st.ps_recv_msgs++;
		c->c_rpeer->p_st.ps_recv_bytes += len;
	}
	if (!t->t_closing && t->t_cb.on_message != NULL)
		t->t_cb.on_message(t->t_ctx, c->c_remote, pl, len);
}

/* ---- outgoing: ACK ---- */

static void outgoing_on_ack(conn *c, const uint8_t *pl, size_t len)
{
	peer_transport *t = c->c_t;
	peer *p = c->c_peer;
	if (len != ACK_LEN || memcmp(pl, "KLSN", 4) != 0) {
		conn_fail(c, WHY_BAD_ACK);
		return;
	}
	int st = get_be16(pl + 6);
	if (st != PEER_HS_OK) {
		uint64_t id = p != NULL ? p->p_id : 0;
		conn_fail(c, WHY_REFUSED + st);
		if (id != 0 && !t->t_closing && t->t_cb.on_refused != NULL)
			t->t_cb.on_refused(t->t_ctx, id, st);
		return;
	}
	if (get_be16(pl + 4) != PEER_PROTOCOL_VERSION) {
		conn_fail(c, WHY_BAD_ACK);
		return;
	}
	if (p == NULL || get_be64(pl + 8) != p->p_id) {
		conn_fail(c, WHY_WRONG_MEMBER);
		return;
	}
	uv_timer_stop(&c->c_timer);
	c->c_state = CONN_OPEN;
	c->c_was_open = 1;
	c->c_open_ms = uv_now(t->t_loop);
	p->p_st.ps_connected = 1;
	p->p_st.ps_connects++;
	if (p->p_log_state != 1)
		tlog(t, PEER_LOG_INFO, "peer became active", p->p_id, p->p_addr, NULL);
	p->p_log_state = 1;
	peer_free_ai(p);
	if (p->p_qhead != NULL)
		schedule_flush(t);
	if (t->t_cb.on_peer_state != NULL)
		t->t_cb.on_peer_state(t->t_ctx, p->p_id, 1);
}

/* ---- reading ---- */

/* One complete frame. Callers re-check c_state afterwards: a callback may close c. */
static void conn_on_frame(conn *c, const uint8_t *pl, size_t len)
{
	if (c->c_outgoing) {
		if (c->c_state == CONN_HANDSHAKE)
			outgoing_on_ack(c, pl, len);
		else
			conn_fail(c, WHY_UNEXPECTED);
	} else if (c->c_state == CONN_HANDSHAKE) {
		inbound_on_hello(c, pl, len);
	} else if (c->c_state == CONN_OPEN) {
		inbound_on_message(c, pl, len);
	}
}

/* Where c's next plaintext bytes go: the rest of a large frame, or c_rbuf. base NULL when
 * a large frame's buffer cannot grow. */
static void conn_plain_space(conn *c, uv_buf_t *buf)
{
	if (c->c_big != NULL) {
		size_t want = c->c_big_len - c->c_big_have;
		size_t room = c->c_big_cap - c->c_big_have;
		if (room < want && room < RBUF_SIZE) {
			/* Grow with the bytes that actually arrive (doubling), so an announced
			 * length alone never costs its size in memory. */
			size_t cap = c->c_big_cap * 2;
			if (cap < c->c_big_have + RBUF_SIZE)
				cap = c->c_big_have + RBUF_SIZE;
			if (cap > c->c_big_len)
				cap = c->c_big_len;
			uint8_t *nb = realloc(c->c_big, cap);
			if (nb == NULL) {
				*buf = uv_buf_init(NULL, 0); /* read_cb gets UV_ENOBUFS */
				return;
			}
			c->c_big = nb;
			c->c_big_cap = cap;
			room = cap - c->c_big_have;
		}
		*buf = uv_buf_init((char *)c->c_big + c->c_big_have,
				   (unsigned)(room < want ? room : want));
		return;
	}
	*buf = uv_buf_init((char *)c->c_rbuf + c->c_rlen, (unsigned)(c->c_rcap - c->c_rlen));
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
	conn *c = h->data;
	if (c->c_ssl != NULL)
		*buf = uv_buf_init((char *)c->c_t->t_tls_rbuf, TLS_RBUF_SIZE);
	else
		conn_plain_space(c, buf);
}

/* The HTTP answer of status (with its reason) and body into a new BUF_MEM; NULL out of
 * memory. */
static BUF_MEM *http_answer(const char *status, const char *ctype, uint64_t cluster_id, const char *body,
			    size_t len)
{
	char head[256];
	int hl;
	if (cluster_id != 0)
		hl = snprintf(head, sizeof(head),
			      "HTTP/1.1 %s\r\nContent-Type: %s\r\nX-Etcd-Cluster-Id: %" PRIx64
			      "\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n",
			      status, ctype, cluster_id, len);
	else
		hl = snprintf(head, sizeof(head),
			      "HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
			      "Connection: close\r\n\r\n",
			      status, ctype, len);
	BUF_MEM *bm = BUF_MEM_new();
	if (bm == NULL || BUF_MEM_grow(bm, (size_t)hl + len) == 0) {
		BUF_MEM_free(bm);
		ERR_clear_error();
		return NULL;
	}
	memcpy(bm->data, head, (size_t)hl);
	memcpy(bm->data + hl, body, len);
	return bm;
}

/*
 * An inbound connection that starts with "GET " instead of a HELLO: an HTTP/1.x request to
 * etcd's peer handler (a member joining an existing cluster asks GET /members, as etcd's
 * GetClusterFromRemotePeers). Waits for the whole header, answers through the on_http_get
 * callback and closes once the answer is written: one request per connection.
 */
static void conn_http(conn *c)
{
	peer_transport *t = c->c_t;
	if (c->c_tls_mismatch) { /* plaintext HTTP on a TLS listener */
		conn_fail(c, WHY_TLS_ON_PLAIN);
		return;
	}
	const char *req = (const char *)c->c_rbuf;
	size_t n = c->c_rlen, end = 0;
	for (size_t i = 0; i + 4 <= n; i++)
		if (memcmp(req + i, "\r\n\r\n", 4) == 0) {
			end = i;
			break;
		}
	if (end == 0) {
		if (n >= PEER_HANDSHAKE_MAX)
			conn_fail(c, WHY_TOO_LONG);
		return; /* the rest of the header is still to come */
	}
	char path[256] = "";
	const char *sp = end > 4 ? memchr(req + 4, ' ', end - 4) : NULL;
	size_t pl = sp != NULL ? (size_t)(sp - (req + 4)) : 0;
	int is_get = memcmp(req, "GET ", 4) == 0 && sp != NULL && pl > 0 && pl < sizeof(path);
	if (is_get) {
		memcpy(path, req + 4, pl);
		path[pl] = '\0';
		char *q = strchr(path, '?');
		if (q != NULL)
			*q = '\0';
	}
	BUF_MEM *bm;
	if (!is_get) {
		bm = http_answer("405 Method Not Allowed", "text/plain; charset=utf-8", 0,
				 "Method Not Allowed\n", 19);
	} else {
		size_t len = 0;
		uint64_t cid = 0;
		char *body = t->t_cb.on_http_get != NULL && !t->t_closing
				     ? t->t_cb.on_http_get(t->t_ctx, path, &len, &cid)
				     : NULL;
		if (body != NULL)
			bm = http_answer("200 OK", "application/json", cid, body, len);
		else if (len == 1)
			bm = http_answer("500 Internal Server Error", "text/plain; charset=utf-8", 0,
					 "out of memory\n", 14);
		else
			bm = http_answer("404 Not Found", "text/plain; charset=utf-8", 0,
					 "404 page not found\n", 19);
		free(body);
	}
	if (bm == NULL) {
		conn_fail(c, WHY_NOMEM);
		return;
	}
	/* Like a refusal: no longer a pending handshake, reads dropped, closed once written
	 * (on_tls_out_written), the handshake timer still bounding it. */
	t->t_pending_hs--;
	c->c_state = CONN_REFUSING;
	c->c_http_done = 1;
	if (c->c_ssl != NULL) {
		ERR_clear_error();
		int rc = tls_write_all(c, (const uint8_t *)bm->data, bm->length);
		BUF_MEM_free(bm);
		if (rc != 0) {
			conn_close(c);
			return;
		}
		SSL_shutdown(c->c_ssl); /* close_notify after the answer */
		ERR_clear_error();
		tls_flush(c);
		return;
	}
	tls_out *o = malloc(sizeof(*o));
	if (o == NULL) {
		BUF_MEM_free(bm);
		conn_close(c);
		return;
	}
	o->o_buf = bm;
	o->o_req.data = c;
	uv_buf_t b = uv_buf_init(bm->data, (unsigned)bm->length);
	if (uv_write(&o->o_req, (uv_stream_t *)&c->c_tcp, &b, 1, on_tls_out_written) < 0) {
		BUF_MEM_free(bm);
		free(o);
		conn_close(c);
	}
}

/* Parses every complete frame in c_rbuf; moves a frame too large for it to c_big. */
static void conn_parse(conn *c)
{
	size_t off = 0;
	if (!c->c_outgoing && c->c_state == CONN_HANDSHAKE && c->c_rlen > 0 && c->c_rbuf[0] == 'G') {
		/* A HELLO's first byte is 0: an HTTP GET (etcd's peer handler). */
		conn_http(c);
		return;
	}
	if (!c->c_outgoing && c->c_state == CONN_HANDSHAKE && c->c_rlen > 0 &&
	    c->c_rbuf[0] == TLS_RECORD_FIRST) {
		/* A HELLO's first byte is 0 (its length is at most 2 KiB): this is a TLS
		 * ClientHello from a member that uses https peer URLs. */
		conn_fail(c, WHY_TLS_ON_PLAIN);
		return;
	}
	while (c->c_state != CONN_CLOSING && c->c_rlen - off >= 4) {
		if (c->c_outgoing && c->c_state == CONN_OPEN)
			break; /* anything after the ACK: failed below */
		uint32_t len = get_be32(c->c_rbuf + off);
		if (len > conn_frame_limit(c)) {
			conn_fail(c, WHY_TOO_LONG);
			return;
		}
		size_t avail = c->c_rlen - off - 4;
		if (avail >= len) {
			const uint8_t *pl = c->c_rbuf + off + 4;
			off += 4 + (size_t)len;
			conn_on_frame(c, pl, len);
			continue;
		}
		if (4 + (size_t)len > c->c_rcap) {
			/* Only inbound OPEN connections get here: c_rcap bounds the others. */
			size_t cap = avail > RBUF_SIZE ? avail : RBUF_SIZE;
			if (cap > len)
				cap = len;
			c->c_big = malloc(cap);
			if (c->c_big == NULL) {
				conn_fail(c, WHY_NOMEM);
				return;
			}
			memcpy(c->c_big, c->c_rbuf + off + 4, avail);
			c->c_big_len = len;
			c->c_big_have = avail;
			c->c_big_cap = cap;
			off = c->c_rlen;
		}
		break;
	}
	if (c->c_state == CONN_CLOSING)
		return;
	memmove(c->c_rbuf, c->c_rbuf + off, c->c_rlen - off);
	c->c_rlen -= off;
	if (c->c_outgoing && c->c_state == CONN_OPEN && c->c_rlen > 0)
		conn_fail(c, WHY_UNEXPECTED);
}

/* n plaintext bytes arrived where conn_plain_space() said. */
static void conn_plain_got(conn *c, size_t n)
{
	if (c->c_big != NULL) {
		c->c_big_have += n;
		if (c->c_big_have == c->c_big_len) {
			uint8_t *big = c->c_big;
			size_t len = c->c_big_len;
			c->c_big = NULL;
			c->c_big_len = c->c_big_have = c->c_big_cap = 0;
			inbound_on_message(c, big, len);
			free(big);
		}
		return;
	}
	c->c_rlen += n;
	conn_parse(c);
}

static void send_hello(conn *c);

/* Decrypts what the read BIO holds into the plaintext buffers and parses it. */
static void tls_read_plain(conn *c)
{
	while (c->c_state != CONN_CLOSING && c->c_state != CONN_REFUSING) {
		uv_buf_t b;
		conn_plain_space(c, &b);
		if (b.base == NULL) {
			conn_fail(c, WHY_NOMEM);
			return;
		}
		if (b.len == 0) { /* conn_parse always leaves room; never happens */
			conn_fail(c, WHY_TOO_LONG);
			return;
		}
		int r = SSL_read(c->c_ssl, b.base, b.len > INT_MAX ? INT_MAX : (int)b.len);
		if (r <= 0) {
			int e = SSL_get_error(c->c_ssl, r);
			if (e == SSL_ERROR_WANT_READ)
				break;
			if (e == SSL_ERROR_ZERO_RETURN) { /* close_notify */
				conn_fail(c, WHY_EOF);
				return;
			}
			tls_note_error(c, "read failed");
			tls_fail(c);
			return;
		}
		conn_plain_got(c, (size_t)r);
	}
	if (c->c_state != CONN_CLOSING && c->c_state != CONN_REFUSING)
		tls_flush(c);
}

/* n bytes of ciphertext (or, on a TLS listener, maybe a plaintext member's HELLO). */
static void tls_on_read(conn *c, const uint8_t *data, size_t n)
{
	if (!c->c_outgoing && !c->c_tls_fed && data[0] != TLS_RECORD_FIRST) {
		/* Not TLS: most likely a member with http peer URLs. Refuse its HELLO in
		 * plaintext (PEER_HS_TLS_MISMATCH), so that it logs why. */
		SSL_free(c->c_ssl);
		c->c_ssl = NULL;
		c->c_tls_mismatch = 1;
		size_t k = n < c->c_rcap ? n : c->c_rcap;
		memcpy(c->c_rbuf, data, k);
		c->c_rlen = k;
		conn_parse(c);
		return;
	}
	c->c_tls_fed = 1;
	ERR_clear_error();
	if (BIO_write(SSL_get_rbio(c->c_ssl), data, (int)n) != (int)n) {
		ERR_clear_error();
		conn_fail(c, WHY_NOMEM);
		return;
	}
	if (!c->c_tls_done) {
		int r = SSL_do_handshake(c->c_ssl);
		if (r != 1) {
			if (SSL_get_error(c->c_ssl, r) == SSL_ERROR_WANT_READ) {
				tls_flush(c);
				return;
			}
			tls_note_error(c, "handshake failed");
			tls_fail(c);
			return;
		}
		if (tls_flush(c) != 0)
			return;
		c->c_tls_done = 1;
		if (c->c_outgoing)
			send_hello(c);
	}
	tls_read_plain(c);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
	conn *c = s->data;
	if (c->c_state == CONN_CLOSING || c->c_state == CONN_REFUSING)
		return;
	if (nread < 0) {
		int why = nread == UV_EOF ? WHY_EOF : (nread == UV_ENOBUFS ? WHY_NOMEM : (int)nread);
		if (c->c_ssl != NULL && c->c_outgoing && !c->c_tls_done &&
		    (nread == UV_EOF || nread == UV_ECONNRESET))
			why = WHY_TLS_EOF;
		conn_fail(c, why);
		return;
	}
	if (nread == 0)
		return;
	if (c->c_ssl != NULL)
		tls_on_read(c, (const uint8_t *)buf->base, (size_t)nread);
	else
		conn_plain_got(c, (size_t)nread);
}

static void conn_read_start(conn *c)
{
	int r = uv_read_start((uv_stream_t *)&c->c_tcp, on_alloc, on_read);
	if (r < 0)
		conn_fail(c, r);
}

/* ---- accepting ---- */

static void on_connection(uv_stream_t *server, int status)
{
	listener *l = server->data;
	peer_transport *t = l->l_t;
	if (t == NULL || t->t_closing)
		return;
	if (status < 0) {
		if (!maybe_quiet(t, status, 0))
			tlog(t, PEER_LOG_WARN, "failed to accept peer connection", 0, NULL,
			     uv_strerror(status));
		return;
	}
	conn *c = conn_new(t, 0);
	if (c == NULL) {
		if (!maybe_quiet(t, WHY_NOMEM, 0))
			tlog(t, PEER_LOG_ERROR, "failed to accept peer connection", 0, NULL,
			     why_text(WHY_NOMEM));
		return;
	}
	c->c_state = CONN_HANDSHAKE;
	t->t_pending_hs++;
	c->c_next = t->t_inbound;
	if (t->t_inbound != NULL)
		t->t_inbound->c_prev = c;
	t->t_inbound = c;
	t->t_st.pts_inbound++;
	t->t_st.pts_accepted++;
	int r = uv_accept(server, (uv_stream_t *)&c->c_tcp);
	if (r < 0) {
		conn_fail(c, r);
		return;
	}
	struct sockaddr_storage ss;
	int sl = sizeof(ss);
	if (uv_tcp_getpeername(&c->c_tcp, (struct sockaddr *)&ss, &sl) == 0)
		addr_text((struct sockaddr *)&ss, c->c_addr, sizeof(c->c_addr));
	if (t->t_pending_hs > MAX_PENDING_HANDSHAKES) {
		conn_fail(c, WHY_BUSY);
		return;
	}
	conn_tune(c);
	if (l->l_tls && conn_tls_begin(c) != 0) {
		conn_fail(c, WHY_NOMEM);
		return;
	}
	uv_timer_start(&c->c_timer, on_conn_timeout, t->t_hs_ms, 0);
	conn_read_start(c);
}

/* ---- dialing ---- */

static void on_connect(uv_connect_t *req, int status)
{
	conn *c = req->data;
	if (c->c_state == CONN_CLOSING)
		return;
	if (status < 0) {
		c->c_connect_failed = 1;
		conn_fail(c, status);
		return;
	}
	conn_tune(c);
	c->c_state = CONN_HANDSHAKE;
	if (c->c_peer != NULL && c->c_peer->p_tls) {
		/* The HELLO waits for the TLS handshake (tls_on_read). */
		if (conn_tls_begin(c) != 0) {
			conn_fail(c, WHY_NOMEM);
			return;
		}
		ERR_clear_error();
		int r = SSL_do_handshake(c->c_ssl);
		if (r != 1 && SSL_get_error(c->c_ssl, r) != SSL_ERROR_WANT_READ) {
			tls_note_error(c, "handshake failed");
			conn_fail(c, WHY_TLS);
			return;
		}
		if (tls_flush(c) == 0)
			conn_read_start(c);
		return;
	}
	send_hello(c);
	if (c->c_state != CONN_CLOSING)
		conn_read_start(c);
}

/* The dialer's HELLO (see peer.h), once connected (and, with TLS, the handshake done). */
static void send_hello(conn *c)
{
	peer_transport *t = c->c_t;
	uint8_t *h = c->c_ctl;
	put_be32(h, (uint32_t)(HELLO_FIXED + t->t_token_len));
	memcpy(h + 4, "KLSN", 4);
	put_be16(h + 8, PEER_PROTOCOL_VERSION);
	put_be16(h + 10, c->c_ssl != NULL ? PEER_HELLO_TLS : 0);
	put_be64(h + 12, t->t_cluster);
	put_be64(h + 20, t->t_self);
	put_be64(h + 28, c->c_peer != NULL ? c->c_peer->p_id : 0);
	put_be16(h + 36, (uint16_t)t->t_token_len);
	memcpy(h + 4 + HELLO_FIXED, t->t_token, t->t_token_len);
	int r = conn_write_ctl(c, 4 + HELLO_FIXED + t->t_token_len);
	if (r < 0)
		conn_fail(c, r);
}

static void peer_connect_to(peer *p, const struct sockaddr *sa)
{
	peer_transport *t = p->p_t;
	conn *c = conn_new(t, 1);
	if (c == NULL) {
		/* Counts as a failed attempt; the backoff timer retries. */
		dial_failed_log(p, WHY_NOMEM, NULL);
		peer_drop_queue(p);
		if (p->p_attempts < 32)
			p->p_attempts++;
		peer_schedule_dial(p);
		return;
	}
	c->c_peer = p;
	p->p_conn = c;
	c->c_state = CONN_CONNECTING;
	addr_text(sa, c->c_addr, sizeof(c->c_addr));
	c->c_connect.data = c;
	uv_timer_start(&c->c_timer, on_conn_timeout, t->t_hs_ms, 0);
	int r = uv_tcp_connect(&c->c_connect, &c->c_tcp, sa, on_connect);
	if (r < 0) {
		c->c_connect_failed = 1;
		conn_fail(c, r);
	}
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
	resolve *r = (resolve *)req;
	peer_transport *t = r->r_t;
	peer *p = r->r_peer;
	free(r);
	t->t_refs--;
	if (p != NULL) {
		p->p_resolve = NULL;
		if (status < 0 || res == NULL) {
			dial_failed_log(p, status < 0 ? status : UV_EAI_NONAME, NULL);
			peer_drop_queue(p);
			if (p->p_attempts < 32)
				p->p_attempts++;
			peer_schedule_dial(p);
		} else {
			peer_free_ai(p);
			p->p_ai = p->p_ai_cur = res;
			res = NULL;
			peer_connect_to(p, p->p_ai_cur->ai_addr);
		}
	}
	if (res != NULL)
		uv_freeaddrinfo(res);
	maybe_free_transport(t);
}

static void peer_dial(peer *p)
{
	peer_transport *t = p->p_t;
	char host[256];
	int port;
	if (p->p_conn != NULL || p->p_resolve != NULL || p->p_removed || t->t_closing)
		return;
	peer_free_ai(p);
	if (parse_host_port(p->p_addr, host, sizeof(host), &port) != 0)
		return; /* checked by peer_add/peer_update */
	struct sockaddr_storage ss;
	if (uv_ip4_addr(host, port, (struct sockaddr_in *)&ss) == 0 ||
	    uv_ip6_addr(host, port, (struct sockaddr_in6 *)&ss) == 0) {
		peer_connect_to(p, (struct sockaddr *)&ss);
		return;
	}
	/* A host name: resolve on libuv's threadpool, never blocking the loop. */
	resolve *r = calloc(1, sizeof(*r));
	char portstr[8];
	struct addrinfo hints;
	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_NUMERICSERV;
	snprintf(portstr, sizeof(portstr), "%d", port);
	int rc = r == NULL ? UV_ENOMEM : 0;
	if (r != NULL) {
		r->r_t = t;
		r->r_peer = p;
		rc = uv_getaddrinfo(t->t_loop, &r->r_req, on_resolved, host, portstr, &hints);
		if (rc == 0) {
			t->t_refs++;
			p->p_resolve = r;
			return;
		}
		free(r);
	}
	dial_failed_log(p, rc, NULL);
	peer_drop_queue(p);
	if (p->p_attempts < 32)
		p->p_attempts++;
	peer_schedule_dial(p);
}

static void on_peer_timer(uv_timer_t *timer)
{
	peer_dial(timer->data);
}

/* Starts the dial timer: at once after success or peer_update, else exponential backoff
 * from t_backoff_min to t_backoff_max with jitter in [delay/2, delay]. */
static void peer_schedule_dial(peer *p)
{
	peer_transport *t = p->p_t;
	uint64_t delay = 0;
	if (p->p_attempts > 0) {
		unsigned shift = p->p_attempts - 1 < 20 ? p->p_attempts - 1 : 20;
		delay = (uint64_t)t->t_backoff_min << shift;
		if (delay > t->t_backoff_max)
			delay = t->t_backoff_max;
		delay = delay / 2 + rng_next(t) % (delay / 2 + 1);
	}
	uv_timer_start(&p->p_timer, on_peer_timer, delay, 0);
}

/* ---- writing ---- */

static void on_batch_written(uv_write_t *req, int status)
{
	batch *b = (batch *)req;
	conn *c = b->b_conn;
	peer *p = c->c_peer;
	c->c_writing = 0;
	if (p != NULL) {
		p->p_queued -= b->b_bytes;
		if (status == 0) {
			p->p_st.ps_sent_msgs += b->b_n;
			p->p_st.ps_sent_bytes += b->b_payload;
			p->p_st.ps_writes++;
		} else {
			p->p_st.ps_dropped_msgs += b->b_n;
		}
	}
	for (frame *f = b->b_frames; f != NULL;) {
		frame *next = f->f_next;
		free(f);
		f = next;
	}
	BUF_MEM_free(b->b_tls);
	free(b);
	if (c->c_state == CONN_CLOSING)
		return;
	if (status < 0)
		conn_fail(c, status);
	else if (p != NULL && p->p_qhead != NULL)
		schedule_flush(c->c_t);
}

/* Writes p's whole queue (up to BATCH_MAX frames) in one uv_write, if nothing is in flight;
 * with TLS, one SSL_write per frame (a chunk of small messages) and one uv_write of it all. */
static void peer_flush(peer *p)
{
	conn *c = p->p_conn;
	if (c == NULL || c->c_state != CONN_OPEN || c->c_writing || p->p_qhead == NULL)
		return;
	unsigned n = 0;
	for (frame *f = p->p_qhead; f != NULL && n < BATCH_MAX; f = f->f_next)
		n++;
	batch *b = malloc(sizeof(*b) + n * sizeof(uv_buf_t));
	if (b == NULL) {
		conn_fail(c, WHY_NOMEM);
		return;
	}
	b->b_conn = c;
	b->b_n = 0;
	b->b_bytes = 0;
	b->b_payload = 0;
	b->b_tls = NULL;
	b->b_frames = p->p_qhead;
	frame *last = NULL, *f = p->p_qhead;
	for (unsigned i = 0; i < n; i++) {
		b->b_bufs[i] = uv_buf_init((char *)f->f_data, (unsigned)f->f_len);
		b->b_n += f->f_msgs;
		b->b_bytes += f->f_len;
		b->b_payload += f->f_len - 4 * (size_t)f->f_msgs;
		last = f;
		f = f->f_next;
	}
	last->f_next = NULL;
	p->p_qhead = f;
	if (f == NULL)
		p->p_qtail = NULL;
	c->c_writing = 1;
	int r;
	if (c->c_ssl != NULL) {
		r = 0;
		ERR_clear_error();
		for (unsigned i = 0; i < n && r == 0; i++)
			if (tls_write_all(c, (const uint8_t *)b->b_bufs[i].base, b->b_bufs[i].len) != 0)
				r = UV_EPROTO;
		int nomem = 0;
		if (r == 0 && (b->b_tls = tls_take_output(c, &nomem)) == NULL)
			r = UV_ENOMEM;
		if (r == 0) {
			uv_buf_t cb = uv_buf_init(b->b_tls->data, (unsigned)b->b_tls->length);
			r = uv_write(&b->b_req, (uv_stream_t *)&c->c_tcp, &cb, 1, on_batch_written);
		}
	} else {
		r = uv_write(&b->b_req, (uv_stream_t *)&c->c_tcp, b->b_bufs, n, on_batch_written);
	}
	if (r < 0) {
		/* libuv will not call back: undo by hand. */
		on_batch_written(&b->b_req, r);
	}
}

static void on_idle(uv_idle_t *idle)
{
	peer_transport *t = idle->data;
	uv_idle_stop(idle);
	for (peer *p = t->t_peers; p != NULL; p = p->p_next)
		peer_flush(p);
}

static void on_idle_closed(uv_handle_t *h)
{
	peer_transport *t = h->data;
	t->t_refs--;
	maybe_free_transport(t);
}

static void schedule_flush(peer_transport *t)
{
	if (!t->t_closing && !uv_is_active((uv_handle_t *)&t->t_idle))
		uv_idle_start(&t->t_idle, on_idle);
}

/* ---- the public API ---- */

static void on_listener_closed(uv_handle_t *h)
{
	listener *l = h->data;
	peer_transport *t = l->l_t;
	free(l);
	if (t != NULL) {
		t->t_refs--;
		maybe_free_transport(t);
	}
}

static int listen_one(peer_transport *t, const char *addr, listener **out)
{
	char host[256], portstr[8];
	int port;
	struct addrinfo hints, *res = NULL;
	if (parse_host_port(addr, host, sizeof(host), &port) != 0)
		return PEER_EADDR;
	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
	snprintf(portstr, sizeof(portstr), "%d", port);
	if (getaddrinfo(host[0] != '\0' ? host : NULL, portstr, &hints, &res) != 0 || res == NULL)
		return PEER_EADDR;
	listener *l = calloc(1, sizeof(*l));
	if (l == NULL) {
		freeaddrinfo(res);
		return PEER_ENOMEM;
	}
	uv_tcp_init(t->t_loop, &l->l_tcp);
	l->l_tcp.data = l;
	*out = l;
	int r = uv_tcp_bind(&l->l_tcp, res->ai_addr, 0);
	freeaddrinfo(res);
	if (r == 0)
		r = uv_listen((uv_stream_t *)&l->l_tcp, 128, on_connection);
	if (r < 0) {
		tlog(t, PEER_LOG_ERROR, "cannot listen for peers", 0, addr, uv_strerror(r));
		return PEER_EBIND;
	}
	struct sockaddr_storage ss;
	int sl = sizeof(ss);
	if (uv_tcp_getsockname(&l->l_tcp, (struct sockaddr *)&ss, &sl) == 0)
		l->l_port = ntohs(((struct sockaddr *)&ss)->sa_family == AF_INET6
					  ? ((struct sockaddr_in6 *)&ss)->sin6_port
					  : ((struct sockaddr_in *)&ss)->sin_port);
	return 0;
}

int peer_transport_init(peer_transport **out, uv_loop_t *loop, const peer_config *cfg,
			peer_callbacks cb, void *ctx)
{
	peer_transport *t = NULL;
	int rc = PEER_EINVAL;
	if (out == NULL || loop == NULL || cfg == NULL || cfg->pc_self_id == 0 ||
	    cfg->pc_n_listen < 0 || cfg->pc_n_listen > PEER_LISTEN_MAX ||
	    (cfg->pc_n_listen > 0 && cfg->pc_listen == NULL) || cfg->pc_max_frame > MAX_FRAME_LIMIT)
		return PEER_EINVAL;
	const char *token = cfg->pc_cluster_token != NULL ? cfg->pc_cluster_token : "";
	if (strlen(token) > PEER_TOKEN_MAX)
		return PEER_EINVAL;
	t = calloc(1, sizeof(*t));
	if (t == NULL)
		return PEER_ENOMEM;
	t->t_token = strdup(token);
	if (t->t_token == NULL) {
		rc = PEER_ENOMEM;
		goto fail;
	}
	t->t_loop = loop;
	t->t_cb = cb;
	t->t_ctx = ctx;
	t->t_self = cfg->pc_self_id;
	t->t_cluster = cfg->pc_cluster_id;
	t->t_token_len = strlen(token);
	t->t_max_frame = cfg->pc_max_frame ? cfg->pc_max_frame : DEFAULT_MAX_FRAME;
	t->t_max_queue = cfg->pc_max_queue ? cfg->pc_max_queue : DEFAULT_MAX_QUEUE;
	t->t_backoff_min = cfg->pc_backoff_min_ms ? cfg->pc_backoff_min_ms : DEFAULT_BACKOFF_MIN_MS;
	t->t_backoff_max = cfg->pc_backoff_max_ms ? cfg->pc_backoff_max_ms : DEFAULT_BACKOFF_MAX_MS;
	if (t->t_backoff_max < t->t_backoff_min)
		t->t_backoff_max = t->t_backoff_min;
	t->t_hs_ms = cfg->pc_handshake_timeout_ms ? cfg->pc_handshake_timeout_ms : DEFAULT_HANDSHAKE_MS;
	t->t_dead_ms = cfg->pc_dead_timeout_ms ? cfg->pc_dead_timeout_ms : DEFAULT_DEAD_MS;
	t->t_rng = cfg->pc_seed ? cfg->pc_seed : (cfg->pc_self_id ^ uv_hrtime()) | 1;
	if (cfg->pc_tls != NULL) {
		if (peer_tls__hold(&t->t_tls, cfg->pc_tls) != 0) {
			rc = PEER_ENOMEM;
			goto fail;
		}
		t->t_has_tls = 1;
		t->t_tls_rbuf = malloc(TLS_RBUF_SIZE);
		if (t->t_tls_rbuf == NULL) {
			rc = PEER_ENOMEM;
			goto fail;
		}
	}
	for (int i = 0; i < cfg->pc_n_listen; i++) {
		listener *l = NULL;
		int tls;
		const char *a = addr_scheme(t, cfg->pc_listen[i], &tls);
		rc = strncmp(cfg->pc_listen[i], "https://", 8) == 0 && !tls ? PEER_EINVAL : listen_one(t, a, &l);
		if (l != NULL) {
			l->l_tls = tls;
			t->t_listen[t->t_n_listen++] = l;
		}
		if (rc != 0)
			goto fail;
	}
	for (int i = 0; i < t->t_n_listen; i++) {
		t->t_listen[i]->l_t = t;
		t->t_refs++;
	}
	uv_idle_init(loop, &t->t_idle);
	t->t_idle.data = t;
	t->t_refs++;
	*out = t;
	return 0;
fail:
	for (int i = 0; i < t->t_n_listen; i++)
		uv_close((uv_handle_t *)&t->t_listen[i]->l_tcp, on_listener_closed);
	if (t->t_has_tls)
		peer_tls__release(&t->t_tls);
	free(t->t_tls_rbuf);
	free(t->t_token);
	free(t);
	return rc;
}

int peer_listen_port(const peer_transport *t, int i)
{
	if (t == NULL || i < 0 || i >= t->t_n_listen)
		return PEER_EINVAL;
	return t->t_listen[i]->l_port;
}

int peer_add(peer_transport *t, uint64_t member_id, const char *addr)
{
	if (t->t_closing)
		return PEER_ECLOSED;
	if (member_id == 0 || member_id == t->t_self)
		return PEER_EINVAL;
	int tls;
	addr = addr_scheme(t, addr, &tls);
	if (check_peer_addr(addr) != 0)
		return PEER_EADDR;
	if (peer_find(t, member_id) != NULL)
		return PEER_EEXIST;
	peer *p = calloc(1, sizeof(*p));
	if (p == NULL)
		return PEER_ENOMEM;
	p->p_addr = strdup(addr);
	if (p->p_addr == NULL) {
		free(p);
		return PEER_ENOMEM;
	}
	p->p_t = t;
	p->p_id = member_id;
	p->p_tls = tls;
	uv_timer_init(t->t_loop, &p->p_timer);
	p->p_timer.data = p;
	t->t_refs++;
	p->p_next = t->t_peers;
	t->t_peers = p;
	peer_schedule_dial(p);
	return 0;
}

int peer_update(peer_transport *t, uint64_t member_id, const char *addr)
{
	if (t->t_closing)
		return PEER_ECLOSED;
	int tls;
	addr = addr_scheme(t, addr, &tls);
	if (check_peer_addr(addr) != 0)
		return PEER_EADDR;
	peer *p = peer_find(t, member_id);
	if (p == NULL)
		return PEER_EUNKNOWN;
	if (strcmp(p->p_addr, addr) == 0 && p->p_tls == tls)
		return 0;
	char *a = strdup(addr);
	if (a == NULL)
		return PEER_ENOMEM;
	free(p->p_addr);
	p->p_addr = a;
	p->p_tls = tls;
	p->p_log_state = 0;
	if (p->p_resolve != NULL) {
		p->p_resolve->r_peer = NULL;
		uv_cancel((uv_req_t *)&p->p_resolve->r_req);
		p->p_resolve = NULL;
	}
	if (p->p_conn != NULL) {
		/* The close callback drops the queue and redials at once. */
		p->p_redial_now = 1;
		conn_close(p->p_conn);
	} else {
		p->p_attempts = 0;
		peer_schedule_dial(p);
	}
	return 0;
}

/* Unlinks nothing: the caller took p off t_peers. */
static void on_peer_timer_closed(uv_handle_t *h)
{
	peer *p = h->data;
	peer_transport *t = p->p_t;
	free(p->p_addr);
	free(p);
	t->t_refs--;
	maybe_free_transport(t);
}

static void peer_destroy(peer *p)
{
	peer_transport *t = p->p_t;
	p->p_removed = 1;
	peer_free_ai(p);
	if (p->p_resolve != NULL) {
		p->p_resolve->r_peer = NULL;
		uv_cancel((uv_req_t *)&p->p_resolve->r_req);
		p->p_resolve = NULL;
	}
	if (p->p_conn != NULL) {
		conn *c = p->p_conn;
		p->p_conn = NULL;
		c->c_peer = NULL;
		conn_close(c);
	}
	peer_drop_queue(p);
	for (conn *c = t->t_inbound; c != NULL;) {
		conn *next = c->c_next;
		if (c->c_rpeer == p) {
			c->c_rpeer = NULL;
			conn_close(c);
		}
		c = next;
	}
	uv_close((uv_handle_t *)&p->p_timer, on_peer_timer_closed);
}

int peer_remove(peer_transport *t, uint64_t member_id)
{
	if (t->t_closing)
		return PEER_ECLOSED;
	for (peer **pp = &t->t_peers; *pp != NULL; pp = &(*pp)->p_next) {
		if ((*pp)->p_id == member_id) {
			peer *p = *pp;
			*pp = p->p_next;
			peer_destroy(p);
			return 0;
		}
	}
	return PEER_EUNKNOWN;
}

int peer_send(peer_transport *t, uint64_t to, const void *bytes, size_t len)
{
	if (t->t_closing)
		return PEER_ECLOSED;
	if (bytes == NULL && len > 0)
		return PEER_EINVAL;
	if (len > t->t_max_frame)
		return PEER_ETOOBIG;
	peer *p = peer_find(t, to);
	if (p == NULL)
		return PEER_EUNKNOWN;
	size_t flen = 4 + len;
	if (p->p_queued > 0 && p->p_queued + flen > t->t_max_queue)
		return PEER_EFULL;
	/* The tail of the queue is never in flight (peer_flush detaches what it writes). */
	frame *f = p->p_qtail;
	if (f == NULL || f->f_cap - f->f_len < flen) {
		/* With TLS, small messages share a chunk of one full record, so that a batch
		 * of heartbeats costs one SSL_write and one record, not one per message. */
		size_t cap = t->t_has_tls && flen < TLS_CHUNK ? TLS_CHUNK : flen;
		f = malloc(sizeof(*f) + cap);
		if (f == NULL)
			return PEER_ENOMEM;
		f->f_next = NULL;
		f->f_len = 0;
		f->f_cap = cap;
		f->f_msgs = 0;
		if (p->p_qtail != NULL)
			p->p_qtail->f_next = f;
		else
			p->p_qhead = f;
		p->p_qtail = f;
	}
	put_be32(f->f_data + f->f_len, (uint32_t)len);
	if (len > 0)
		memcpy(f->f_data + f->f_len + 4, bytes, len);
	f->f_len += flen;
	f->f_msgs++;
	p->p_queued += flen;
	if (p->p_conn != NULL && p->p_conn->c_state == CONN_OPEN && !p->p_conn->c_writing)
		schedule_flush(t);
	return 0;
}

int peer_set_cluster_id(peer_transport *t, uint64_t cluster_id)
{
	if (t->t_closing)
		return PEER_ECLOSED;
	t->t_cluster = cluster_id;
	return 0;
}

int peer_get_stats(const peer_transport *t, uint64_t member_id, peer_stats *st)
{
	const peer *p = peer_find(t, member_id);
	if (p == NULL)
		return PEER_EUNKNOWN;
	*st = p->p_st;
	st->ps_queued_bytes = p->p_queued;
	return 0;
}

void peer_transport_get_stats(const peer_transport *t, peer_transport_stats *st)
{
	*st = t->t_st;
}

int peer_transport_close(peer_transport *t, peer_close_cb close_cb)
{
	if (t->t_closing)
		return PEER_ECLOSED;
	t->t_closing = 1;
	t->t_close_cb = close_cb;
	for (int i = 0; i < t->t_n_listen; i++)
		uv_close((uv_handle_t *)&t->t_listen[i]->l_tcp, on_listener_closed);
	while (t->t_peers != NULL) {
		peer *p = t->t_peers;
		t->t_peers = p->p_next;
		peer_destroy(p);
	}
	while (t->t_inbound != NULL)
		conn_close(t->t_inbound);
	uv_close((uv_handle_t *)&t->t_idle, on_idle_closed);
	return 0;
}
