/*
 * peer_test.c - tests of the peer transport (peer.h), all in one process on one uv loop over
 * 127.0.0.1 ephemeral ports. No sleeps: every wait is uv_run() until a condition holds, under
 * a watchdog timer that fails the test instead of hanging.
 */
#include "server/peer.h"

#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

static int failed;
static const char *cur_test;

#define CHECK(c)                                                                          \
	do {                                                                              \
		if (!(c)) {                                                               \
			fprintf(stderr, "  %s:%d [%s]: CHECK failed: %s\n", __FILE__, __LINE__, \
				cur_test, #c);                                            \
			failed++;                                                         \
		}                                                                         \
	} while (0)

#define CHECK_EQ(a, b)                                                                    \
	do {                                                                              \
		long long a_ = (long long)(a), b_ = (long long)(b);                       \
		if (a_ != b_) {                                                           \
			fprintf(stderr, "  %s:%d [%s]: CHECK_EQ failed: %s == %lld, %s == %lld\n", \
				__FILE__, __LINE__, cur_test, #a, a_, #b, b_);            \
			failed++;                                                         \
		}                                                                         \
	} while (0)

static uv_loop_t loop;

/* ---- waiting, with a watchdog ---- */

static uv_timer_t watchdog;
static int watchdog_fired;

static void on_watchdog(uv_timer_t *tm)
{
	watchdog_fired = 1;
}

/* Runs the loop until cond(arg) holds or ms pass; returns whether cond holds. */
static int run_until(int (*cond)(void *), void *arg, unsigned ms, const char *what)
{
	watchdog_fired = 0;
	uv_timer_start(&watchdog, on_watchdog, ms, 0);
	while (!cond(arg) && !watchdog_fired)
		uv_run(&loop, UV_RUN_ONCE);
	uv_timer_stop(&watchdog);
	if (!cond(arg)) {
		fprintf(stderr, "  [%s]: timed out after %u ms waiting for %s\n", cur_test, ms, what);
		failed++;
		return 0;
	}
	return 1;
}

/* Runs the loop for ms (a bounded observation window, for "nothing happens" checks). */
static void run_for(unsigned ms)
{
	watchdog_fired = 0;
	uv_timer_start(&watchdog, on_watchdog, ms, 0);
	while (!watchdog_fired)
		uv_run(&loop, UV_RUN_ONCE);
}

/* ---- a node: one transport plus what the test observes of it ---- */

#define MAXN 4
#define MSG_MAX (1u << 20)

enum { MODE_PATTERN, MODE_TAGGED };

typedef struct node {
	peer_transport *t;
	uint64_t id;
	int port;
	int closed;
	int mode;
	uint64_t raw_id;           /* messages from this id are only counted */
	uint64_t recv_n[MAXN];     /* messages received, by sender index */
	uint64_t recv_bad;         /* messages that did not match what was expected */
	uint64_t recv_from_other;  /* messages from ids outside 1..MAXN */
	uint64_t recv_gen1, recv_gen2; /* MODE_TAGGED */
	uint64_t last_gen1_seq;
	int connected[MAXN + 1];   /* last on_peer_state, by member id (1..MAXN) */
	int state_changes;
	int remove_on_disconnect;  /* peer_remove from inside on_peer_state(.., 0) */
	int refused_n;             /* on_refused calls */
	int refused_status;        /* the last one's status */
	char logs[64][160];
	int n_logs;
} node;

static uint64_t mix(uint64_t x)
{
	/* splitmix64 */
	x += 0x9E3779B97F4A7C15ULL;
	x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
	x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
	return x ^ (x >> 31);
}

/* The size of message seq from -> to: sizes 0..1 MiB, mostly small so batching shows. */
static size_t pattern_size(uint64_t from, uint64_t to, uint64_t seq)
{
	if (seq == 0)
		return 0;
	if (seq == 1)
		return MSG_MAX;
	uint64_t h = mix((from << 40) ^ (to << 32) ^ seq);
	unsigned r = (unsigned)(h % 100);
	h >>= 8;
	if (r < 70)
		return (size_t)(h % 257);
	if (r < 95)
		return (size_t)(h % 65537);
	return (size_t)(h % (MSG_MAX + 1));
}

static void pattern_fill(uint8_t *b, size_t n, uint64_t from, uint64_t to, uint64_t seq)
{
	uint64_t h = mix((from << 40) ^ (to << 32) ^ seq ^ 0xABCDEF);
	for (size_t i = 0; i < n; i++) {
		if ((i & 7) == 0)
			h = mix(h + i);
		b[i] = (uint8_t)(h >> ((i & 7) * 8));
	}
}

static uint8_t *scratch;

static void on_message(void *ctx, uint64_t from, const void *bytes, size_t len)
{
	node *n = ctx;
	if (from < 1 || from > MAXN) {
		n->recv_from_other++;
		return;
	}
	if (from == n->raw_id) {
		n->recv_n[from - 1]++;
		return;
	}
	if (n->mode == MODE_PATTERN) {
		uint64_t seq = n->recv_n[from - 1]++;
		size_t want = pattern_size(from, n->id, seq);
		if (len != want) {
			if (n->recv_bad++ < 3)
				fprintf(stderr, "  %" PRIu64 "->%" PRIu64 " seq %" PRIu64 ": len %zu, want %zu\n",
					from, n->id, seq, len, want);
			return;
		}
		pattern_fill(scratch, len, from, n->id, seq);
		if (len > 0 && memcmp(scratch, bytes, len) != 0)
			n->recv_bad++;
		return;
	}
	/* MODE_TAGGED: u32 generation, u32 seq; generation 2 must arrive whole and in order
	 * after every generation-1 message; generation 1 may lose messages but not reorder. */
	const uint8_t *b = bytes;
	if (len < 8) {
		n->recv_bad++;
		return;
	}
	uint32_t gen, seq;
	memcpy(&gen, b, 4);
	memcpy(&seq, b + 4, 4);
	if (gen == 1) {
		if (n->recv_gen2 > 0 || (n->recv_gen1 > 0 && seq <= n->last_gen1_seq))
			n->recv_bad++;
		n->last_gen1_seq = seq;
		n->recv_gen1++;
	} else if (gen == 2) {
		if (seq != n->recv_gen2)
			n->recv_bad++;
		n->recv_gen2++;
	} else {
		n->recv_bad++;
	}
}

static void on_peer_state(void *ctx, uint64_t id, int connected)
{
	node *n = ctx;
	if (id >= 1 && id <= MAXN)
		n->connected[id] = connected;
	n->state_changes++;
	if (!connected && n->remove_on_disconnect)
		CHECK_EQ(peer_remove(n->t, id), 0);
}

static void on_log(void *ctx, int level, const char *msg, const char *member, const char *addr,
		   const char *error)
{
	node *n = ctx;
	if (getenv("PEER_TEST_VERBOSE") != NULL)
		fprintf(stderr, "    [node %" PRIu64 "] %d %s member=%s addr=%s error=%s\n", n->id, level,
			msg, member, addr, error);
	if (n->n_logs < 64)
		snprintf(n->logs[n->n_logs++], sizeof(n->logs[0]), "%s: %s", msg, error);
}

static void on_refused(void *ctx, uint64_t id, int status)
{
	node *n = ctx;
	n->refused_n++;
	n->refused_status = status;
}

/* etcd's GET /members, as node.c serves it: a fixed list. */
static char *on_http_get(void *ctx, const char *path, size_t *len, uint64_t *cluster_id)
{
	(void)ctx;
	if (strcmp(path, "/members") != 0)
		return NULL;
	char *body = strdup("[{\"id\":1,\"peerURLs\":[\"http://127.0.0.1:1\"]}]\n");
	*len = body != NULL ? strlen(body) : 1;
	*cluster_id = 0xC1C1;
	return body;
}

static int count_logs(const node *n, const char *needle)
{
	int k = 0;
	for (int i = 0; i < n->n_logs; i++)
		if (strstr(n->logs[i], needle) != NULL)
			k++;
	return k;
}

typedef struct node_opts {
	const char *token;
	uint64_t cluster;
	int zero_cluster;  /* cluster id 0: "not known yet" */
	int port;          /* 0: ephemeral */
	size_t max_frame;
	size_t max_queue;
	unsigned hs_ms;
	const peer_tls *tls; /* NULL: plaintext */
} node_opts;

static int node_start(node *n, uint64_t id, const node_opts *o)
{
	char addr[32];
	const char *listen[1] = {addr};
	snprintf(addr, sizeof(addr), "127.0.0.1:%d", o ? o->port : 0);
	memset(n, 0, sizeof(*n));
	n->id = id;
	peer_config cfg = {
		.pc_self_id = id,
		.pc_cluster_id = o && o->zero_cluster ? 0 : o && o->cluster ? o->cluster : 0xC1C1,
		.pc_cluster_token = o && o->token ? o->token : "keelson-test",
		.pc_listen = listen,
		.pc_n_listen = 1,
		.pc_max_frame = o && o->max_frame ? o->max_frame : 0,
		.pc_max_queue = o && o->max_queue ? o->max_queue : 8u << 20,
		.pc_backoff_min_ms = 5,
		.pc_backoff_max_ms = 40,
		.pc_handshake_timeout_ms = o && o->hs_ms ? o->hs_ms : 2000,
		.pc_seed = id,
		.pc_tls = o ? o->tls : NULL,
	};
	peer_callbacks cb = {on_message, on_peer_state, on_log, on_refused, on_http_get};
	int rc = peer_transport_init(&n->t, &loop, &cfg, cb, n);
	CHECK_EQ(rc, 0);
	if (rc != 0)
		return rc;
	n->port = peer_listen_port(n->t, 0);
	CHECK(n->port > 0);
	return 0;
}

static void on_node_closed(void *ctx)
{
	node *n = ctx;
	n->closed = 1;
	n->t = NULL;
}

static int node_is_closed(void *arg)
{
	return ((node *)arg)->closed;
}

static void node_close(node *n)
{
	if (n->t == NULL)
		return;
	CHECK_EQ(peer_transport_close(n->t, on_node_closed), 0);
	CHECK(!n->closed); /* never synchronous */
	run_until(node_is_closed, n, 5000, "transport close_cb");
}

static void node_add(node *n, uint64_t id, int port)
{
	char addr[32];
	snprintf(addr, sizeof(addr), "127.0.0.1:%d", port);
	CHECK_EQ(peer_add(n->t, id, addr), 0);
}

typedef struct plink {
	node *n;
	uint64_t id;
} plink;

static int is_connected(void *arg)
{
	plink *l = arg;
	return l->n->connected[l->id];
}

static int is_disconnected(void *arg)
{
	plink *l = arg;
	return !l->n->connected[l->id];
}

static void wait_connected(node *n, uint64_t id)
{
	plink l = {n, id};
	run_until(is_connected, &l, 5000, "peer connected");
}

/* ---- raw sockets: misbehaving clients and servers ---- */

typedef struct raw {
	uv_tcp_t tcp;
	uv_connect_t creq;
	uv_write_t wreq;
	uint8_t *out;        /* bytes to send once connected */
	size_t out_len;
	int close_after_write;
	uint8_t in[4096];
	size_t in_len;
	size_t in_total;
	int eof;             /* the remote closed (EOF or reset) */
	int closed;
	/* raw server side */
	int answer_hello;    /* reply with an OK ACK as member ack_id */
	uint64_t ack_id;
	int stop_reading;    /* after the handshake (or at once), never read again */
	int ack_extra;       /* bytes of junk after the ACK */
	uint8_t ack[24];
} raw;

static void raw_on_close(uv_handle_t *h)
{
	((raw *)h->data)->closed = 1;
}

static void raw_close(raw *r)
{
	if (!uv_is_closing((uv_handle_t *)&r->tcp))
		uv_close((uv_handle_t *)&r->tcp, raw_on_close);
}

static void raw_alloc(uv_handle_t *h, size_t sz, uv_buf_t *buf)
{
	raw *r = h->data;
	*buf = uv_buf_init((char *)r->in + r->in_len, (unsigned)(sizeof(r->in) - r->in_len));
}

static void put32(uint8_t *p, uint32_t v)
{
	p[0] = v >> 24, p[1] = v >> 16, p[2] = v >> 8, p[3] = v;
}

static void put64(uint8_t *p, uint64_t v)
{
	put32(p, v >> 32);
	put32(p + 4, (uint32_t)v);
}

static void raw_on_written(uv_write_t *w, int status)
{
	raw *r = w->data;
	if (r->close_after_write)
		raw_close(r);
}

static void raw_on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
	raw *r = s->data;
	if (nread < 0) {
		r->eof = 1;
		raw_close(r);
		return;
	}
	r->in_len += (size_t)nread;
	r->in_total += (size_t)nread;
	if (r->answer_hello && r->in_len >= 4) {
		uint32_t len = ((uint32_t)r->in[0] << 24) | (r->in[1] << 16) | (r->in[2] << 8) | r->in[3];
		if (r->in_len >= 4 + len) {
			r->answer_hello = 0;
			put32(r->ack, 16);
			memcpy(r->ack + 4, "KLSN", 4);
			r->ack[8] = 0, r->ack[9] = PEER_PROTOCOL_VERSION;
			r->ack[10] = 0, r->ack[11] = PEER_HS_OK;
			put64(r->ack + 12, r->ack_id);
			memset(r->ack + 20, 0xEE, 4);
			uv_buf_t b = uv_buf_init((char *)r->ack, 20 + (unsigned)r->ack_extra);
			r->wreq.data = r;
			uv_write(&r->wreq, s, &b, 1, NULL);
			if (r->stop_reading)
				uv_read_stop(s);
		}
	}
	if (r->in_len == sizeof(r->in))
		r->in_len = 0;
}

static void raw_on_connect(uv_connect_t *req, int status)
{
	raw *r = req->data;
	if (status < 0) {
		r->eof = 1;
		raw_close(r);
		return;
	}
	uv_read_start((uv_stream_t *)&r->tcp, raw_alloc, raw_on_read);
	if (r->out_len > 0) {
		uv_buf_t b = uv_buf_init((char *)r->out, (unsigned)r->out_len);
		r->wreq.data = r;
		uv_write(&r->wreq, (uv_stream_t *)&r->tcp, &b, 1, raw_on_written);
	}
}

static void raw_connect(raw *r, int port)
{
	struct sockaddr_in sa;
	uv_ip4_addr("127.0.0.1", port, &sa);
	uv_tcp_init(&loop, &r->tcp);
	r->tcp.data = r;
	r->creq.data = r;
	uv_tcp_connect(&r->creq, &r->tcp, (struct sockaddr *)&sa, raw_on_connect);
}

static int raw_got_ack(void *arg)
{
	return ((raw *)arg)->in_total >= 20;
}

static int raw_is_closed(void *arg)
{
	return ((raw *)arg)->closed;
}

/* A HELLO frame into b; returns its length. */
static size_t make_hello(uint8_t *b, uint64_t cluster, const char *token, uint64_t from, uint64_t to)
{
	size_t tl = strlen(token);
	put32(b, (uint32_t)(34 + tl));
	memcpy(b + 4, "KLSN", 4);
	b[8] = 0, b[9] = PEER_PROTOCOL_VERSION, b[10] = 0, b[11] = 0;
	put64(b + 12, cluster);
	put64(b + 20, from);
	put64(b + 28, to);
	b[36] = (uint8_t)(tl >> 8), b[37] = (uint8_t)tl;
	memcpy(b + 38, token, tl);
	return 38 + tl;
}

/* A raw listening server whose connections are handled by the raw above. */
typedef struct raw_server {
	uv_tcp_t tcp;
	int port;
	raw conn;
	int accepted;
	int closed;
	int answer_hello;
	uint64_t ack_id;
	int ack_extra;
} raw_server;

static void raw_server_on_conn(uv_stream_t *s, int status)
{
	raw_server *rs = s->data;
	if (status < 0 || rs->accepted)
		return;
	rs->accepted = 1;
	memset(&rs->conn, 0, sizeof(rs->conn));
	uv_tcp_init(&loop, &rs->conn.tcp);
	rs->conn.tcp.data = &rs->conn;
	uv_accept(s, (uv_stream_t *)&rs->conn.tcp);
	rs->conn.answer_hello = rs->answer_hello;
	rs->conn.ack_id = rs->ack_id;
	rs->conn.stop_reading = 1;
	rs->conn.ack_extra = rs->ack_extra;
	if (rs->answer_hello)
		uv_read_start((uv_stream_t *)&rs->conn.tcp, raw_alloc, raw_on_read);
	/* else: never read at all */
}

static void raw_server_on_close(uv_handle_t *h)
{
	((raw_server *)h->data)->closed = 1;
}

static void raw_server_start(raw_server *rs, int answer_hello, uint64_t ack_id)
{
	struct sockaddr_in sa;
	struct sockaddr_storage ss;
	int sl = sizeof(ss);
	memset(rs, 0, sizeof(*rs));
	rs->answer_hello = answer_hello;
	rs->ack_id = ack_id;
	uv_ip4_addr("127.0.0.1", 0, &sa);
	uv_tcp_init(&loop, &rs->tcp);
	rs->tcp.data = rs;
	CHECK_EQ(uv_tcp_bind(&rs->tcp, (struct sockaddr *)&sa, 0), 0);
	CHECK_EQ(uv_listen((uv_stream_t *)&rs->tcp, 8, raw_server_on_conn), 0);
	uv_tcp_getsockname(&rs->tcp, (struct sockaddr *)&ss, &sl);
	rs->port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
}

static int raw_server_is_closed(void *arg)
{
	raw_server *rs = arg;
	return rs->closed && (!rs->accepted || rs->conn.closed);
}

static void raw_server_stop(raw_server *rs)
{
	uv_close((uv_handle_t *)&rs->tcp, raw_server_on_close);
	if (rs->accepted)
		raw_close(&rs->conn);
	run_until(raw_server_is_closed, rs, 2000, "raw server close");
}

/* ---- tests ---- */

static void test_api_errors(void)
{
	peer_transport *t = NULL;
	peer_callbacks cb = {0};
	peer_config bad = {0};
	CHECK_EQ(peer_transport_init(&t, &loop, &bad, cb, NULL), PEER_EINVAL); /* self id 0 */
	const char *badaddr[] = {"no-port"};
	peer_config cfg = {.pc_self_id = 1, .pc_listen = badaddr, .pc_n_listen = 1};
	CHECK_EQ(peer_transport_init(&t, &loop, &cfg, cb, NULL), PEER_EADDR);
	/* A port already bound: PEER_EBIND, nothing left behind (the loop check at the end). */
	node a;
	node_start(&a, 1, NULL);
	char busy[32];
	snprintf(busy, sizeof(busy), "127.0.0.1:%d", a.port);
	const char *two[] = {"127.0.0.1:0", busy};
	peer_config cfg2 = {.pc_self_id = 2, .pc_listen = two, .pc_n_listen = 2};
	CHECK_EQ(peer_transport_init(&t, &loop, &cfg2, cb, &a), PEER_EBIND);
	uv_run(&loop, UV_RUN_NOWAIT); /* lets the listener that did open finish closing */

	CHECK_EQ(peer_listen_port(a.t, 1), PEER_EINVAL);
	CHECK_EQ(peer_add(a.t, 1, "127.0.0.1:1"), PEER_EINVAL);  /* self */
	CHECK_EQ(peer_add(a.t, 0, "127.0.0.1:1"), PEER_EINVAL);
	CHECK_EQ(peer_add(a.t, 2, "127.0.0.1"), PEER_EADDR);
	CHECK_EQ(peer_add(a.t, 2, "127.0.0.1:70000"), PEER_EADDR);
	CHECK_EQ(peer_add(a.t, 2, "::1:80"), PEER_EADDR);
	CHECK_EQ(peer_add(a.t, 2, "[::1]:80"), 0);
	CHECK_EQ(peer_add(a.t, 2, "127.0.0.1:2"), PEER_EEXIST);
	CHECK_EQ(peer_update(a.t, 3, "127.0.0.1:2"), PEER_EUNKNOWN);
	CHECK_EQ(peer_send(a.t, 3, "x", 1), PEER_EUNKNOWN);
	CHECK_EQ(peer_send(a.t, 2, NULL, 1), PEER_EINVAL);
	CHECK_EQ(peer_send(a.t, 2, NULL, 0), 0);
	static uint8_t big[(64u << 20) + 1];
	CHECK_EQ(peer_send(a.t, 2, big, sizeof(big)), PEER_ETOOBIG);
	CHECK_EQ(peer_remove(a.t, 2), 0);
	CHECK_EQ(peer_remove(a.t, 2), PEER_EUNKNOWN);
	CHECK(strcmp(peer_strerror(PEER_EFULL), "peer: send queue full") == 0);
	CHECK(peer_strerror(12345) != NULL);

	CHECK_EQ(peer_transport_close(a.t, on_node_closed), 0);
	CHECK_EQ(peer_transport_close(a.t, on_node_closed), PEER_ECLOSED);
	CHECK_EQ(peer_send(a.t, 2, "x", 1), PEER_ECLOSED);
	CHECK_EQ(peer_add(a.t, 5, "127.0.0.1:5"), PEER_ECLOSED);
	run_until(node_is_closed, &a, 2000, "close");
}

/* Three members, every pair exchanging NMSG messages of 0..1 MiB; per-pair order checked. */
#define NMSG 600

typedef struct pump {
	node *nodes;
	int n;
	uint64_t sent[MAXN][MAXN];
	uint64_t efull;
	uv_idle_t idle;
	uint8_t *buf;
} pump;

static void on_pump(uv_idle_t *h)
{
	pump *p = h->data;
	int busy = 0;
	for (int i = 0; i < p->n; i++) {
		for (int j = 0; j < p->n; j++) {
			if (i == j)
				continue;
			node *from = &p->nodes[i], *to = &p->nodes[j];
			while (p->sent[i][j] < NMSG) {
				uint64_t seq = p->sent[i][j];
				size_t len = pattern_size(from->id, to->id, seq);
				pattern_fill(p->buf, len, from->id, to->id, seq);
				int rc = peer_send(from->t, to->id, p->buf, len);
				if (rc == PEER_EFULL) {
					p->efull++;
					break;
				}
				CHECK_EQ(rc, 0);
				if (rc != 0)
					break;
				p->sent[i][j]++;
			}
			busy |= p->sent[i][j] < NMSG;
		}
	}
	if (!busy)
		uv_idle_stop(h);
}

static int all_received(void *arg)
{
	pump *p = arg;
	for (int i = 0; i < p->n; i++)
		for (int j = 0; j < p->n; j++)
			if (i != j && p->nodes[j].recv_n[p->nodes[i].id - 1] < NMSG)
				return 0;
	return 1;
}

static void exchange_three(const node_opts *o)
{
	node nodes[3];
	for (int i = 0; i < 3; i++)
		node_start(&nodes[i], (uint64_t)i + 1, o);
	for (int i = 0; i < 3; i++) {
		for (int j = 0; j < 3; j++) {
			if (i == j)
				continue;
			if (i == 2) {
				/* A host name: exercises uv_getaddrinfo (and the fallback from ::1). */
				char addr[32];
				snprintf(addr, sizeof(addr), "localhost:%d", nodes[j].port);
				CHECK_EQ(peer_add(nodes[i].t, nodes[j].id, addr), 0);
			} else {
				node_add(&nodes[i], nodes[j].id, nodes[j].port);
			}
		}
	}
	/* Sending starts at once: messages queue until the handshakes complete. */
	pump p = {.nodes = nodes, .n = 3};
	p.buf = malloc(MSG_MAX);
	uv_idle_init(&loop, &p.idle);
	p.idle.data = &p;
	uv_idle_start(&p.idle, on_pump);
	run_until(all_received, &p, 60000, "all messages");
	uv_close((uv_handle_t *)&p.idle, NULL);
	uint64_t writes = 0, msgs = 0;
	for (int i = 0; i < 3; i++) {
		CHECK_EQ(nodes[i].recv_bad, 0);
		CHECK_EQ(nodes[i].recv_from_other, 0);
		for (int j = 0; j < 3; j++) {
			if (i == j)
				continue;
			CHECK_EQ(nodes[j].recv_n[i], NMSG);
			CHECK_EQ(nodes[i].connected[nodes[j].id], 1);
			peer_stats st;
			CHECK_EQ(peer_get_stats(nodes[i].t, nodes[j].id, &st), 0);
			CHECK_EQ(st.ps_sent_msgs, NMSG);
			CHECK_EQ(st.ps_dropped_msgs, 0);
			CHECK_EQ(st.ps_queued_bytes, 0);
			CHECK_EQ(st.ps_connects, 1);
			CHECK_EQ(st.ps_recv_msgs, NMSG);
			writes += st.ps_writes;
			msgs += st.ps_sent_msgs;
		}
	}
	/* Batching: frames queued behind a write left together. */
	fprintf(stderr, "  exchange: %" PRIu64 " messages in %" PRIu64 " writes, %" PRIu64
			" EFULL retries\n", msgs, writes, p.efull);
	CHECK(writes < msgs / 2);
	free(p.buf);
	for (int i = 0; i < 3; i++)
		node_close(&nodes[i]);
}

static void test_exchange_three(void)
{
	exchange_three(NULL);
}

typedef struct count_arg {
	node *n;
	uint64_t from;
	uint64_t want;
	int gen2;
} count_arg;

static int received(void *arg)
{
	count_arg *c = arg;
	return c->gen2 ? c->n->recv_gen2 >= c->want : c->n->recv_n[c->from - 1] >= c->want;
}

static int refused_at_least(void *arg)
{
	plink *l = arg; /* n = acceptor, id = how many */
	peer_transport_stats st;
	peer_transport_get_stats(l->n->t, &st);
	return st.pts_refused >= l->id;
}

/* A dialer configured wrongly (opts, dialing `to` at a's port) is refused by a, repeatedly,
 * with the reason logged once on each side and no message delivered. */
static void check_refused(node *a, const node_opts *o, uint64_t dialer_id, uint64_t to,
			  const char *reason)
{
	node d;
	peer_transport_stats before;
	peer_transport_get_stats(a->t, &before);
	node_start(&d, dialer_id, o);
	node_add(&d, to, a->port);
	CHECK_EQ(peer_send(d.t, to, "hello", 5), 0);
	plink l = {a, before.pts_refused + 4};
	run_until(refused_at_least, &l, 5000, "4 refusals");
	CHECK_EQ(count_logs(&d, reason), 1);
	CHECK(d.refused_n >= 3); /* on_refused: every time, unlike the log */
	CHECK_EQ(d.connected[to < MAXN ? to : 0], 0);
	CHECK_EQ(d.state_changes, 0);
	CHECK_EQ(a->recv_n[dialer_id - 1], 0);
	peer_stats st;
	CHECK_EQ(peer_get_stats(d.t, to, &st), 0);
	CHECK_EQ(st.ps_connects, 0);
	CHECK_EQ(st.ps_sent_msgs, 0);
	node_close(&d);
}

typedef struct refused_wait {
	node *n;
	int before;
} refused_wait;

static int refused_n_grew(void *arg)
{
	refused_wait *w = arg;
	return w->n->refused_n > w->before;
}

static void test_handshake_refusal(void)
{
	node a, b;
	node_start(&a, 1, NULL);
	node_start(&b, 2, NULL);
	node_add(&a, 2, b.port);
	node_add(&b, 1, a.port);

	node_opts wrong_token = {.token = "another-cluster"};
	check_refused(&a, &wrong_token, 2, 1, "cluster token mismatch");
	CHECK_EQ(count_logs(&a, "cluster token mismatch"), 1); /* not once per attempt */

	node_opts wrong_cluster = {.cluster = 0xBAD};
	check_refused(&a, &wrong_cluster, 2, 1, "cluster ID mismatch");
	CHECK_EQ(count_logs(&a, "cluster ID mismatch"), 1);

	/* Right cluster, but a thinks it is 1 while the dialer wants member 4 there. */
	check_refused(&a, NULL, 2, 4, "receiver member ID mismatch");
	CHECK_EQ(count_logs(&a, "receiver member ID mismatch"), 1);

	/* A sender a was never told about (peer_add) is refused too. */
	check_refused(&a, NULL, 3, 1, "sender is not a known member");

	/* A joining member that does not know the cluster id yet (0) is accepted on the token;
	 * once it sets a wrong id, its next handshake is refused. */
	node j;
	node_opts joining = {.zero_cluster = 1};
	node_start(&j, 3, &joining);
	node_add(&j, 1, a.port);
	CHECK_EQ(peer_add(a.t, 3, "127.0.0.1:1"), 0);
	j.mode = MODE_TAGGED;
	wait_connected(&j, 1);
	CHECK_EQ(j.refused_n, 0);
	CHECK_EQ(peer_set_cluster_id(j.t, 0xBAD), 0);
	CHECK_EQ(peer_remove(a.t, 3), 0); /* cuts j's connection: j redials with 0xBAD */
	CHECK_EQ(peer_add(a.t, 3, "127.0.0.1:1"), 0);
	plink jl = {&j, 1};
	run_until(is_disconnected, &jl, 5000, "j cut off");
	int refused_before = j.refused_n;
	plink al = {&a, 0};
	peer_transport_stats ast;
	peer_transport_get_stats(a.t, &ast);
	al.id = ast.pts_refused + 1;
	run_until(refused_at_least, &al, 5000, "a refuses j's new cluster id");
	run_until(refused_n_grew, &(refused_wait){&j, refused_before}, 5000, "j told of refusal");
	CHECK_EQ(j.refused_status, PEER_HS_CLUSTER_ID);
	node_close(&j);
	CHECK_EQ(peer_remove(a.t, 3), 0);

	/* Through all of it the real members kept talking. */
	wait_connected(&a, 2);
	wait_connected(&b, 1);
	CHECK_EQ(peer_send(b.t, 1, "", 0), 0); /* pattern seq 0 is the empty message */
	count_arg c = {&a, 2, 1, 0};
	run_until(received, &c, 5000, "b's message");
	CHECK_EQ(a.recv_bad, 0);
	node_close(&a);
	node_close(&b);
}

static int send_tagged(node *n, uint64_t to, uint32_t gen, uint32_t seq)
{
	uint8_t b[64];
	memcpy(b, &gen, 4);
	memcpy(b + 4, &seq, 4);
	memset(b + 8, 0x5A, sizeof(b) - 8);
	return peer_send(n->t, to, b, sizeof(b));
}

static void test_reconnect(void)
{
	node a, b;
	node_start(&a, 1, NULL);
	node_start(&b, 2, NULL);
	a.mode = b.mode = MODE_TAGGED;
	node_add(&a, 2, b.port);
	node_add(&b, 1, a.port);
	wait_connected(&a, 2);
	wait_connected(&b, 1);
	int bport = b.port;

	/* b goes away: a notices, keeps accepting sends (they are dropped on failed dials). */
	node_close(&b);
	plink l = {&a, 2};
	run_until(is_disconnected, &l, 5000, "a sees b down");
	uint32_t seq1 = 0;
	for (int i = 0; i < 50; i++) {
		int rc = send_tagged(&a, 2, 1, seq1++);
		CHECK(rc == 0 || rc == PEER_EFULL);
	}
	run_for(60); /* a few failed dials with the 5..40 ms backoff */
	CHECK_EQ(a.connected[2], 0);
	peer_stats st;
	peer_get_stats(a.t, 2, &st);
	CHECK(st.ps_dropped_msgs > 0);
	CHECK_EQ(count_logs(&a, "connection refused"), 1); /* one line for many failed dials */

	/* b comes back on the same port, as a restarted member would. */
	node_opts o = {.port = bport};
	node_start(&b, 2, &o);
	b.mode = MODE_TAGGED;
	CHECK_EQ(b.port, bport);
	node_add(&b, 1, a.port);
	wait_connected(&a, 2);
	wait_connected(&b, 1);
	CHECK_EQ(count_logs(&a, "peer became active"), 2);
	for (uint32_t i = 0; i < 200; i++) {
		CHECK_EQ(send_tagged(&a, 2, 2, i), 0);
		CHECK_EQ(send_tagged(&b, 1, 2, i), 0);
	}
	count_arg c1 = {&b, 1, 200, 1}, c2 = {&a, 2, 200, 1};
	run_until(received, &c1, 5000, "b got generation 2");
	run_until(received, &c2, 5000, "a got generation 2");
	CHECK_EQ(b.recv_bad, 0);
	CHECK_EQ(a.recv_bad, 0);
	CHECK_EQ(b.recv_gen2, 200);

	/* peer_update: point a's member 2 at a dead port, then back. */
	CHECK_EQ(peer_update(a.t, 2, "127.0.0.1:1"), 0);
	run_until(is_disconnected, &l, 5000, "a disconnected by update");
	CHECK_EQ(peer_update(a.t, 2, "127.0.0.1:1"), 0); /* same address: no-op */
	char addr[32];
	snprintf(addr, sizeof(addr), "127.0.0.1:%d", bport);
	CHECK_EQ(peer_update(a.t, 2, addr), 0);
	wait_connected(&a, 2);

	/* peer_remove on the acceptor side cuts a's connection and refuses its redials. */
	CHECK_EQ(peer_remove(b.t, 1), 0);
	run_until(is_disconnected, &l, 5000, "a cut off by b's peer_remove");
	plink r = {&b, 1};
	run_until(refused_at_least, &r, 5000, "b refuses removed member");
	CHECK_EQ(peer_add(b.t, 1, "127.0.0.1:1"), 0); /* b knows 1 again (address unused) */
	wait_connected(&a, 2);

	node_close(&a);
	node_close(&b);
}

typedef struct bp {
	node *n;
	uint64_t to;
	uint64_t accepted;
	uint64_t accepted_at_last_change;
	int ticks_since_change;
	int last_rc;
	uv_timer_t timer;
	uint8_t *buf;
} bp;

static void on_bp_tick(uv_timer_t *tm)
{
	bp *b = tm->data;
	int rc;
	while ((rc = peer_send(b->n->t, b->to, b->buf, 64 * 1024)) == 0)
		b->accepted++;
	b->last_rc = rc;
	if (b->accepted != b->accepted_at_last_change) {
		b->accepted_at_last_change = b->accepted;
		b->ticks_since_change = 0;
	} else {
		b->ticks_since_change++;
	}
}

static int bp_stalled(void *arg)
{
	bp *b = arg;
	return b->last_rc == PEER_EFULL && b->ticks_since_change >= 50;
}

static void test_backpressure(void)
{
	node a;
	node_opts o = {.max_queue = 1u << 20};
	node_start(&a, 1, &o);

	/* 1. A server that accepts and never reads nor answers: the queue fills at once. */
	raw_server mute;
	raw_server_start(&mute, 0, 0);
	node_add(&a, 2, mute.port);
	static uint8_t chunk[64 * 1024];
	int n = 0, rc;
	while ((rc = peer_send(a.t, 2, chunk, sizeof(chunk))) == 0)
		n++;
	CHECK_EQ(rc, PEER_EFULL);
	CHECK_EQ(n, (1 << 20) / (sizeof(chunk) + 4));
	peer_stats st;
	peer_get_stats(a.t, 2, &st);
	CHECK(st.ps_queued_bytes <= (1u << 20));

	/* 2. A server that completes the handshake, then never reads: writes stall in the
	 * kernel, the queue fills, sends get PEER_EFULL, and the loop keeps running. */
	raw_server slow;
	raw_server_start(&slow, 1, 3);
	node_add(&a, 3, slow.port);
	wait_connected(&a, 3);
	bp b = {.n = &a, .to = 3, .buf = chunk};
	uv_timer_init(&loop, &b.timer);
	b.timer.data = &b;
	uv_timer_start(&b.timer, on_bp_tick, 1, 2);
	run_until(bp_stalled, &b, 20000, "sends to stall");
	uv_close((uv_handle_t *)&b.timer, NULL);
	peer_get_stats(a.t, 3, &st);
	fprintf(stderr, "  backpressure: %" PRIu64 " x 64 KiB accepted, %" PRIu64
			" written to the kernel, %zu queued\n", b.accepted, st.ps_sent_bytes,
		st.ps_queued_bytes);
	CHECK(st.ps_queued_bytes <= (1u << 20));
	CHECK(st.ps_queued_bytes > (1u << 19));
	CHECK_EQ(st.ps_connected, 1);
	CHECK(b.accepted * sizeof(chunk) < (256u << 20)); /* bounded by kernel buffers + queue */

	/* Closing with frames queued and a write stuck in flight frees everything. */
	node_close(&a);
	raw_server_stop(&mute);
	raw_server_stop(&slow);
}

static int inbound_back_to(void *arg)
{
	plink *l = arg;
	peer_transport_stats st;
	peer_transport_get_stats(l->n->t, &st);
	return st.pts_inbound == (int)l->id;
}

typedef struct busy_arg {
	raw *r;
	int n;
	int want;
} busy_arg;

static int some_closed(void *arg)
{
	busy_arg *b = arg;
	int k = 0;
	for (int i = 0; i < b->n; i++)
		k += b->r[i].closed;
	return k >= b->want;
}

static void raw_run(raw *r, int port, const uint8_t *bytes, size_t len, int close_after)
{
	memset(r, 0, sizeof(*r));
	r->out = (uint8_t *)bytes;
	r->out_len = len;
	r->close_after_write = close_after;
	raw_connect(r, port);
	run_until(raw_is_closed, r, 5000, "raw client closed");
}

static void test_garbage(void)
{
	node a, b;
	node_opts o = {.max_frame = 1u << 20, .hs_ms = 300};
	node_start(&a, 1, &o);
	node_start(&b, 2, NULL);
	a.raw_id = 3;
	node_add(&a, 2, b.port);
	node_add(&b, 1, a.port);
	CHECK_EQ(peer_add(a.t, 3, "127.0.0.1:1"), 0); /* the raw client poses as member 3 */
	wait_connected(&b, 1);
	uint8_t m[8 + 2048];
	raw r;

	/* Not our protocol at all: the first four bytes as a length are far over 2 KiB. */
	const char *junk = "PUT / HTTP/1.1\r\nHost: x\r\n\r\n";
	raw_run(&r, a.port, (const uint8_t *)junk, strlen(junk), 0);
	CHECK(r.eof);
	CHECK_EQ(r.in_total, 0);

	/* An HTTP GET (etcd's peer handler): answered, then closed. */
	const char *http = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
	raw_run(&r, a.port, (const uint8_t *)http, strlen(http), 0);
	CHECK(r.eof);
	CHECK(r.in_len > 12 && memcmp(r.in, "HTTP/1.1 404", 12) == 0);
	const char *gm = "GET /members HTTP/1.0\r\n\r\n";
	raw_run(&r, a.port, (const uint8_t *)gm, strlen(gm), 0);
	CHECK(r.eof);
	r.in[r.in_len < sizeof(r.in) ? r.in_len : sizeof(r.in) - 1] = 0;
	CHECK(memcmp(r.in, "HTTP/1.1 200 OK\r\n", 17) == 0);
	CHECK(strstr((char *)r.in, "X-Etcd-Cluster-Id: c1c1\r\n") != NULL);
	CHECK(strstr((char *)r.in, "\r\n\r\n[{\"id\":1,") != NULL);
	const char *bad = "GARBAGE\r\n\r\n";
	raw_run(&r, a.port, (const uint8_t *)bad, strlen(bad), 0);
	CHECK(r.eof);
	CHECK(r.in_len > 12 && memcmp(r.in, "HTTP/1.1 405", 12) == 0);
	/* A header that never ends is cut at the handshake limit. */
	static uint8_t longreq[4096];
	memset(longreq, 'x', sizeof(longreq));
	memcpy(longreq, "GET /", 5);
	raw_run(&r, a.port, longreq, sizeof(longreq), 0);
	CHECK(r.eof);
	CHECK_EQ(r.in_total, 0);

	/* Wrong magic in a well-sized frame. */
	size_t hl = make_hello(m, 0xC1C1, "keelson-test", 3, 1);
	memcpy(m + 4, "XXXX", 4);
	raw_run(&r, a.port, m, hl, 0);
	CHECK(r.eof);
	CHECK_EQ(r.in_total, 0);

	/* A HELLO whose token length runs past the frame. */
	hl = make_hello(m, 0xC1C1, "keelson-test", 3, 1);
	m[36] = 0x03;
	raw_run(&r, a.port, m, hl, 0);
	CHECK(r.eof);

	/* Valid HELLO, then a length of 2^32-1. */
	hl = make_hello(m, 0xC1C1, "keelson-test", 3, 1);
	put32(m + hl, 0xFFFFFFFFu);
	raw_run(&r, a.port, m, hl + 4, 0);
	CHECK(r.eof);
	CHECK_EQ(r.in_total, 20); /* the OK ACK, then the close */

	/* Valid HELLO, then max_frame + 1. */
	put32(m + hl, (1u << 20) + 1);
	raw_run(&r, a.port, m, hl + 4, 0);
	CHECK(r.eof);

	/* Valid HELLO, one good frame, then half a 512 KiB frame and the client hangs up. */
	put32(m + hl, 3);
	memcpy(m + hl + 4, "abc", 3);
	put32(m + hl + 7, 512u << 10);
	memset(m + hl + 11, 0x77, 1000);
	raw_run(&r, a.port, m, hl + 11 + 1000, 1);
	plink l = {&a, 1}; /* only b's connection left */
	run_until(inbound_back_to, &l, 5000, "a drops the half-frame connection");
	CHECK_EQ(a.recv_n[2], 1);

	/* A second HELLO from the same member replaces the first connection. */
	raw r1, r2;
	memset(&r1, 0, sizeof(r1));
	memset(&r2, 0, sizeof(r2));
	hl = make_hello(m, 0xC1C1, "keelson-test", 3, 1);
	r1.out = r2.out = m;
	r1.out_len = r2.out_len = hl;
	raw_connect(&r1, a.port);
	run_until(raw_got_ack, &r1, 5000, "first ACK");
	raw_connect(&r2, a.port);
	run_until(raw_is_closed, &r1, 5000, "first connection replaced");
	CHECK(r1.eof);
	CHECK_EQ(r2.closed, 0);
	raw_close(&r2);
	run_until(raw_is_closed, &r2, 5000, "raw close");
	run_until(inbound_back_to, &l, 5000, "a drops the second connection");

	/* An unknown version and a sender with a's own id get a refusing ACK. */
	hl = make_hello(m, 0xC1C1, "keelson-test", 3, 1);
	m[9] = 9;
	raw_run(&r, a.port, m, hl, 0);
	CHECK_EQ(r.in_total, 20);
	CHECK_EQ(r.in[11], PEER_HS_BAD_VERSION);
	hl = make_hello(m, 0xC1C1, "keelson-test", 1, 1);
	raw_run(&r, a.port, m, hl, 0);
	CHECK_EQ(r.in_total, 20);
	CHECK_EQ(r.in[11], PEER_HS_SELF);

	/* Many silent connections: beyond 64 in handshake, the extra ones are closed at once. */
	enum { NSILENT = 70 };
	static raw silent[NSILENT];
	for (int i = 0; i < NSILENT; i++) {
		memset(&silent[i], 0, sizeof(silent[i]));
		raw_connect(&silent[i], a.port);
	}
	busy_arg ba = {silent, NSILENT, NSILENT - 64};
	run_until(some_closed, &ba, 5000, "connections over the limit closed");
	for (int i = 0; i < NSILENT; i++)
		raw_close(&silent[i]);
	ba.want = NSILENT;
	run_until(some_closed, &ba, 5000, "silent connections closed");
	run_until(inbound_back_to, &l, 5000, "a drops the silent connections");

	/* Silence after connecting: closed by the handshake deadline. */
	raw_run(&r, a.port, NULL, 0, 0);
	CHECK(r.eof);

	/* Three bytes of a length, then hang up. */
	raw_run(&r, a.port, m, 3, 1);
	run_until(inbound_back_to, &l, 5000, "a drops the 3-byte connection");

	peer_transport_stats ts;
	peer_transport_get_stats(a.t, &ts);
	CHECK(ts.pts_proto_errs >= 6);
	CHECK_EQ(a.recv_bad, 0);

	/* a is unharmed: b's messages still arrive. */
	uint64_t before = a.recv_n[1];
	for (int i = 0; i < 10; i++) {
		size_t len = pattern_size(2, 1, before + i);
		pattern_fill(scratch, len, 2, 1, before + i);
		uint8_t *copy = malloc(len + 1);
		memcpy(copy, scratch, len);
		CHECK_EQ(peer_send(b.t, 1, copy, len), 0);
		free(copy); /* peer_send copied it */
	}
	count_arg c = {&a, 2, before + 10, 0};
	run_until(received, &c, 5000, "b's messages after the garbage");
	CHECK_EQ(a.recv_bad, 0);
	node_close(&a);
	node_close(&b);
}

/* Closing a transport from inside its own on_message callback. */
static void on_message_close(void *ctx, uint64_t from, const void *bytes, size_t len)
{
	node *n = ctx;
	n->recv_n[0]++;
	if (n->t != NULL && n->recv_n[0] == 1)
		CHECK_EQ(peer_transport_close(n->t, on_node_closed), 0);
}

static void test_close_in_callback(void)
{
	node a, b;
	node_start(&a, 1, NULL);
	node_start(&b, 2, NULL);
	/* Re-init a's callbacks: close on the first message. */
	node_close(&a);
	memset(&a, 0, sizeof(a));
	a.id = 1;
	const char *listen[] = {"127.0.0.1:0"};
	peer_config cfg = {.pc_self_id = 1, .pc_cluster_id = 0xC1C1,
			   .pc_cluster_token = "keelson-test", .pc_listen = listen, .pc_n_listen = 1};
	peer_callbacks cb = {on_message_close, on_peer_state, on_log};
	CHECK_EQ(peer_transport_init(&a.t, &loop, &cfg, cb, &a), 0);
	a.port = peer_listen_port(a.t, 0);
	CHECK_EQ(peer_add(a.t, 2, "127.0.0.1:1"), 0);
	node_add(&b, 1, a.port);
	for (int i = 0; i < 100; i++)
		CHECK_EQ(peer_send(b.t, 1, "0123456789", 10), 0);
	run_until(node_is_closed, &a, 5000, "a closed from on_message");
	CHECK_EQ(a.recv_n[0], 1); /* nothing delivered after close */
	node_close(&b);
}

/* Seeded random byte streams, with and without a valid HELLO in front: a survives them all
 * and keeps serving b. The seed is printed so a failure can be replayed. */
static void test_random_streams(void)
{
	node a, b;
	node_opts o = {.max_frame = 64u << 10, .hs_ms = 500};
	node_start(&a, 1, &o);
	node_start(&b, 2, NULL);
	a.raw_id = 3;
	a.mode = MODE_TAGGED; /* b's messages: generation 2, in order (they must fit 64 KiB) */
	node_add(&a, 2, b.port);
	node_add(&b, 1, a.port);
	CHECK_EQ(peer_add(a.t, 3, "127.0.0.1:1"), 0);
	wait_connected(&b, 1);
	uint64_t seed = getenv("PEER_TEST_SEED") ? strtoull(getenv("PEER_TEST_SEED"), NULL, 0) : 42;
	fprintf(stderr, "  random_streams: seed %" PRIu64 "\n", seed);
	size_t cap = 256u << 10;
	uint8_t *buf = malloc(cap);
	uint64_t h = seed;
	for (int i = 0; i < 60; i++) {
		size_t n = 0;
		h = mix(h);
		int hello = (int)(h & 1);
		if (hello)
			n = make_hello(buf, 0xC1C1, "keelson-test", 3, 1);
		int frames = (int)((h >> 8) % 20);
		for (int f = 0; f < frames && n + 8 < cap; f++) {
			h = mix(h);
			uint32_t len;
			switch (h % 4) {
			case 0: len = (uint32_t)(h >> 32); break;               /* any length */
			case 1: len = (uint32_t)((h >> 16) % (70u << 10)); break; /* near the limit */
			default: len = (uint32_t)((h >> 16) % 300); break;       /* small */
			}
			put32(buf + n, len);
			n += 4;
			size_t body = len < cap - n ? len : cap - n;
			if ((h >> 40) % 3 == 0)
				body /= 2; /* truncated */
			for (size_t k = 0; k < body; k++)
				buf[n + k] = (uint8_t)mix(h + k);
			n += body;
		}
		if (n == 0) {
			buf[0] = (uint8_t)h;
			n = 1;
		}
		raw r;
		/* After a valid HELLO, a waits for the rest of a frame as long as the sender
		 * lives (no idle timeout on members), so those clients hang up themselves. */
		raw_run(&r, a.port, buf, n, hello || ((h >> 20) & 1));
	}
	free(buf);
	plink l = {&a, 1};
	run_until(inbound_back_to, &l, 5000, "a drops every random connection");
	for (uint32_t i = 0; i < 20; i++)
		CHECK_EQ(send_tagged(&b, 1, 2, i), 0);
	count_arg c = {&a, 2, 20, 1};
	run_until(received, &c, 5000, "b's messages after the random streams");
	CHECK_EQ(a.recv_bad, 0);
	node_close(&a);
	node_close(&b);
}

static int has_log(void *arg)
{
	plink *l = arg; /* id: index into wanted strings */
	static const char *const wanted[] = {"a different member answers at this address",
					     "unexpected data from the acceptor"};
	return count_logs(l->n, wanted[l->id]) > 0;
}

/* What the dialer does when the acceptor misbehaves. */
static void test_bad_acceptor(void)
{
	node a;
	node_start(&a, 1, NULL);
	raw_server wrong, chatty;
	raw_server_start(&wrong, 1, 7); /* answers as member 7 */
	raw_server_start(&chatty, 1, 3);
	chatty.ack_extra = 4;           /* OK ACK, then bytes an acceptor never sends */
	node_add(&a, 2, wrong.port);
	node_add(&a, 3, chatty.port);
	plink l0 = {&a, 0}, l1 = {&a, 1};
	run_until(has_log, &l0, 5000, "wrong member logged");
	run_until(has_log, &l1, 5000, "unexpected data logged");
	CHECK_EQ(a.connected[2], 0);
	node_close(&a);
	raw_server_stop(&wrong);
	raw_server_stop(&chatty);
}

static int no_peer(void *arg)
{
	plink *l = arg;
	peer_stats st;
	return peer_get_stats(l->n->t, l->id, &st) == PEER_EUNKNOWN;
}

/* Adds, updates and removes while resolving and connecting; removes from a callback;
 * closes with a name resolution and a connect in flight. */
static void test_churn(void)
{
	node a, b;
	node_start(&a, 1, NULL);
	node_start(&b, 2, NULL);
	node_add(&b, 1, a.port);
	char byname[32], bynum[32];
	snprintf(byname, sizeof(byname), "localhost:%d", b.port);
	snprintf(bynum, sizeof(bynum), "127.0.0.1:%d", b.port);
	for (int i = 0; i < 20; i++) {
		CHECK_EQ(peer_add(a.t, 2, (i & 1) ? byname : bynum), 0);
		CHECK_EQ(peer_send(a.t, 2, "x", 1), 0);
		for (int k = 0; k < i % 4; k++)
			uv_run(&loop, UV_RUN_NOWAIT); /* dial timer fires: resolve or connect starts */
		if (i % 3 == 0)
			CHECK_EQ(peer_update(a.t, 2, (i & 1) ? bynum : byname), 0);
		uv_run(&loop, UV_RUN_NOWAIT);
		CHECK_EQ(peer_remove(a.t, 2), 0);
	}
	/* Connected, then b goes away; a removes b from inside on_peer_state. (Removed peers
	 * get no callback, so a.connected[2] may be stale from the loop above.) */
	a.connected[2] = 0;
	node_add(&a, 2, b.port);
	wait_connected(&a, 2);
	a.remove_on_disconnect = 1;
	node_close(&b);
	plink l = {&a, 2};
	run_until(no_peer, &l, 5000, "a removed b from its callback");
	a.remove_on_disconnect = 0;
	/* Close with a resolution and a connect in flight. */
	CHECK_EQ(peer_add(a.t, 3, "localhost:1"), 0);
	CHECK_EQ(peer_add(a.t, 4, "127.0.0.1:1"), 0);
	uv_run(&loop, UV_RUN_NOWAIT);
	node_close(&a);
}

/* ---- TLS ---- */

/*
 * Certificates made here with OpenSSL into a temporary directory: CA "A" signs the members'
 * certificates, CA "B" an outsider's. Member certificates name 127.0.0.1 and localhost.
 */
static char tls_dir[256];
static EVP_PKEY *ca_key[2];
static X509 *ca_cert[2];
static long next_serial = 100;

static EVP_PKEY *new_key(void)
{
	return EVP_EC_gen("P-256");
}

static void cert_ext(X509 *x, X509 *issuer, int nid, const char *value)
{
	X509V3_CTX ctx;
	X509V3_set_ctx_nodb(&ctx);
	X509V3_set_ctx(&ctx, issuer, x, NULL, NULL, 0);
	X509_EXTENSION *e = X509V3_EXT_conf_nid(NULL, &ctx, nid, value);
	CHECK(e != NULL);
	if (e != NULL) {
		X509_add_ext(x, e, -1);
		X509_EXTENSION_free(e);
	}
}

/* A certificate for key with common name cn, signed by CA ca (-1: self-signed CA). */
static X509 *make_cert(EVP_PKEY *key, const char *cn, int ca, const char *san, long *serial)
{
	X509 *x = X509_new();
	X509_set_version(x, 2);
	*serial = next_serial++;
	ASN1_INTEGER_set(X509_get_serialNumber(x), *serial);
	X509_gmtime_adj(X509_getm_notBefore(x), -3600);
	X509_gmtime_adj(X509_getm_notAfter(x), 24 * 3600);
	X509_set_pubkey(x, key);
	X509_NAME_add_entry_by_txt(X509_get_subject_name(x), "CN", MBSTRING_ASC,
				   (const unsigned char *)cn, -1, -1, 0);
	X509 *issuer = ca < 0 ? x : ca_cert[ca];
	X509_set_issuer_name(x, X509_get_subject_name(issuer));
	if (ca < 0) {
		cert_ext(x, x, NID_basic_constraints, "critical,CA:TRUE");
		cert_ext(x, x, NID_key_usage, "critical,keyCertSign,cRLSign");
	} else {
		cert_ext(x, issuer, NID_basic_constraints, "CA:FALSE");
		cert_ext(x, issuer, NID_ext_key_usage, "serverAuth,clientAuth");
		if (san != NULL)
			cert_ext(x, issuer, NID_subject_alt_name, san);
	}
	CHECK(X509_sign(x, ca < 0 ? key : ca_key[ca], EVP_sha256()) > 0);
	return x;
}

static void tls_path(char *out, size_t len, const char *name)
{
	snprintf(out, len, "%s/%s", tls_dir, name);
}

static void write_pem(const char *name, X509 *cert, EVP_PKEY *key)
{
	char path[700];
	tls_path(path, sizeof(path), name);
	FILE *f = fopen(path, "w");
	CHECK(f != NULL);
	if (f == NULL)
		return;
	if (cert != NULL)
		CHECK_EQ(PEM_write_X509(f, cert), 1);
	if (key != NULL)
		CHECK_EQ(PEM_write_PrivateKey(f, key, NULL, NULL, 0, NULL, NULL), 1);
	fclose(f);
}

/* <name>.pem and <name>-key.pem, signed by CA ca; returns the serial. */
static long make_member(const char *name, const char *cn, int ca, const char *san)
{
	char fn[128];
	long serial;
	EVP_PKEY *k = new_key();
	X509 *x = make_cert(k, cn, ca, san, &serial);
	snprintf(fn, sizeof(fn), "%s.pem", name);
	write_pem(fn, x, NULL);
	snprintf(fn, sizeof(fn), "%s-key.pem", name);
	write_pem(fn, NULL, k);
	X509_free(x);
	EVP_PKEY_free(k);
	return serial;
}

/* A CRL of CA 0 revoking serial. */
static void make_crl(const char *name, long serial)
{
	X509_CRL *crl = X509_CRL_new();
	X509_CRL_set_version(crl, 1);
	X509_CRL_set_issuer_name(crl, X509_get_subject_name(ca_cert[0]));
	ASN1_TIME *now = ASN1_TIME_adj(NULL, time(NULL), 0, -60);
	ASN1_TIME *next = ASN1_TIME_adj(NULL, time(NULL), 1, 0);
	X509_CRL_set1_lastUpdate(crl, now);
	X509_CRL_set1_nextUpdate(crl, next);
	X509_REVOKED *r = X509_REVOKED_new();
	ASN1_INTEGER *sn = ASN1_INTEGER_new();
	ASN1_INTEGER_set(sn, serial);
	X509_REVOKED_set_serialNumber(r, sn);
	X509_REVOKED_set_revocationDate(r, now);
	X509_CRL_add0_revoked(crl, r);
	X509_CRL_sort(crl);
	CHECK(X509_CRL_sign(crl, ca_key[0], EVP_sha256()) > 0);
	char path[700];
	tls_path(path, sizeof(path), name);
	FILE *f = fopen(path, "w");
	CHECK(f != NULL);
	if (f != NULL) {
		PEM_write_X509_CRL(f, crl);
		fclose(f);
	}
	ASN1_INTEGER_free(sn);
	ASN1_TIME_free(now);
	ASN1_TIME_free(next);
	X509_CRL_free(crl);
}

static long revoked_serial;

static void tls_fixtures(void)
{
	const char *base = getenv("TEST_TMPDIR") ? getenv("TEST_TMPDIR") : "/tmp";
	snprintf(tls_dir, sizeof(tls_dir), "%s/peer_test_tls.XXXXXX", base);
	CHECK(mkdtemp(tls_dir) != NULL);
	long serial;
	for (int i = 0; i < 2; i++) {
		ca_key[i] = new_key();
		ca_cert[i] = make_cert(ca_key[i], i == 0 ? "Keelson test CA A" : "Keelson test CA B",
				       -1, NULL, &serial);
		write_pem(i == 0 ? "caA.pem" : "caB.pem", ca_cert[i], NULL);
	}
	const char *san = "IP:127.0.0.1,DNS:localhost";
	make_member("m1", "m1", 0, san);
	make_member("m2", "m2", 0, san);
	make_member("m3", "m3", 0, san);
	make_member("outsider", "m2", 1, san);               /* right CN, wrong CA */
	make_member("elsewhere", "m1", 0, "DNS:example.com"); /* names another host */
	revoked_serial = make_member("revoked", "m2", 0, san);
	make_crl("crl.pem", revoked_serial);
}

static void tls_fixtures_free(void)
{
	for (int i = 0; i < 2; i++) {
		X509_free(ca_cert[i]);
		EVP_PKEY_free(ca_key[i]);
	}
	char cmd[600];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tls_dir);
	if (system(cmd) != 0)
		fprintf(stderr, "  could not remove %s\n", tls_dir);
}

typedef struct tls_opts {
	const char *member; /* m1.pem + m1-key.pem */
	const char *ca;     /* NULL: none */
	const char *crl;
	const char *allowed_cn;
	int client_cert_auth;
	int skip_verify;
} tls_opts;

static peer_tls *tls_new(const tls_opts *o)
{
	char cert[600], key[600], ca[600], crl[600], name[128];
	snprintf(name, sizeof(name), "%s.pem", o->member);
	tls_path(cert, sizeof(cert), name);
	snprintf(name, sizeof(name), "%s-key.pem", o->member);
	tls_path(key, sizeof(key), name);
	if (o->ca != NULL)
		tls_path(ca, sizeof(ca), o->ca);
	if (o->crl != NULL)
		tls_path(crl, sizeof(crl), o->crl);
	peer_tls_config c = {
		.ptc_cert_file = cert,
		.ptc_key_file = key,
		.ptc_trusted_ca_file = o->ca ? ca : NULL,
		.ptc_crl_file = o->crl ? crl : NULL,
		.ptc_allowed_cn = o->allowed_cn,
		.ptc_client_cert_auth = o->client_cert_auth,
		.ptc_skip_verify = o->skip_verify,
	};
	peer_tls *t = NULL;
	char err[256];
	int rc = peer_tls_new(&t, &c, err, sizeof(err));
	if (rc != 0)
		fprintf(stderr, "  peer_tls_new(%s): %s\n", o->member, err);
	CHECK_EQ(rc, 0);
	return t;
}

static void test_tls_config_errors(void)
{
	peer_tls *t = NULL;
	char err[256], cert[600], key[600], missing[600];
	tls_path(cert, sizeof(cert), "m1.pem");
	tls_path(key, sizeof(key), "m2-key.pem");
	tls_path(missing, sizeof(missing), "nope.pem");
	peer_tls_config c = {.ptc_cert_file = cert};
	CHECK_EQ(peer_tls_new(&t, &c, err, sizeof(err)), PEER_EINVAL);
	CHECK(strstr(err, "KeyFile and CertFile are not presented") != NULL);
	c.ptc_key_file = key; /* m2's key with m1's certificate */
	CHECK_EQ(peer_tls_new(&t, &c, err, sizeof(err)), PEER_ETLS);
	if (strstr(err, "--peer-key-file") == NULL)
		fprintf(stderr, "  mismatched key: %s\n", err);
	CHECK(strstr(err, "--peer-key-file") != NULL);
	c.ptc_key_file = missing;
	CHECK_EQ(peer_tls_new(&t, &c, err, sizeof(err)), PEER_ETLS);
	CHECK(strstr(err, "nope.pem") != NULL);
	tls_path(key, sizeof(key), "m1-key.pem");
	c.ptc_key_file = key;
	c.ptc_trusted_ca_file = missing;
	CHECK_EQ(peer_tls_new(&t, &c, err, sizeof(err)), PEER_ETLS);
	c.ptc_trusted_ca_file = NULL;
	c.ptc_crl_file = cert; /* not a CRL */
	CHECK_EQ(peer_tls_new(&t, &c, err, sizeof(err)), PEER_ETLS);
	CHECK(strstr(err, "--peer-crl-file") != NULL);
	c.ptc_crl_file = NULL;
	CHECK_EQ(peer_tls_new(&t, &c, err, sizeof(err)), 0);
	peer_tls_free(t);
}

/* Mutual TLS between three members: the plaintext exchange test, 1 MiB messages included. */
static void test_tls_exchange_three(void)
{
	tls_opts to = {.member = "m1", .ca = "caA.pem", .client_cert_auth = 1};
	/* One context for all three: each transport holds its own reference, and a member's
	 * certificate is accepted by the others whoever presents it. */
	peer_tls *tls = tls_new(&to);
	node_opts o = {.tls = tls};
	exchange_three(&o);
	peer_tls_free(tls);
}

typedef struct http_ask {
	const char *url;
	const peer_tls *tls;
	int rc;
	char *body;
	uint64_t cid;
	char err[256];
	_Atomic int done;
} http_ask;

static void *http_ask_main(void *arg)
{
	http_ask *h = arg;
	h->rc = peer_http_get_members(h->url, h->tls, 3000, &h->body, &h->cid, h->err, sizeof(h->err));
	h->done = 1;
	return NULL;
}

static void on_tick(uv_timer_t *t)
{
	(void)t;
}

static int http_asked(void *arg)
{
	return ((http_ask *)arg)->done;
}

/* peer_http_get_members (blocking, in a thread) against a transport on this loop. */
static void http_ask_run(http_ask *h)
{
	pthread_t th;
	h->done = 0;
	h->body = NULL;
	CHECK_EQ(pthread_create(&th, NULL, http_ask_main, h), 0);
	/* The loop only looks at the condition when it wakes: a ticking timer wakes it. */
	uv_timer_t tick;
	uv_timer_init(&loop, &tick);
	uv_timer_start(&tick, on_tick, 5, 5);
	run_until(http_asked, h, 8000, "GET /members answered");
	pthread_join(th, NULL);
	uv_close((uv_handle_t *)&tick, NULL);
	uv_run(&loop, UV_RUN_NOWAIT);
}

/* A joining member's GET /members, in plaintext and in TLS (the client verifies the server
 * and presents its certificate, as a peer dialer). */
static void test_http_members(void)
{
	node a;
	node_start(&a, 1, NULL);
	char url[64];
	snprintf(url, sizeof(url), "http://127.0.0.1:%d", a.port);
	http_ask h = {.url = url};
	http_ask_run(&h);
	if (h.rc != 0)
		fprintf(stderr, "  plaintext GET /members: %s\n", h.err);
	CHECK_EQ(h.rc, 0);
	CHECK_EQ(h.cid, 0xC1C1);
	CHECK(h.body != NULL && strcmp(h.body, "[{\"id\":1,\"peerURLs\":[\"http://127.0.0.1:1\"]}]\n") == 0);
	free(h.body);
	/* https to a plaintext listener fails cleanly */
	snprintf(url, sizeof(url), "https://127.0.0.1:%d", a.port);
	tls_opts to = {.member = "m1", .ca = "caA.pem", .client_cert_auth = 1};
	peer_tls *tls = tls_new(&to);
	h.tls = tls;
	http_ask_run(&h);
	CHECK(h.rc != 0);
	free(h.body);
	node_close(&a);

	node b;
	node_opts o = {.tls = tls};
	node_start(&b, 2, &o);
	snprintf(url, sizeof(url), "https://127.0.0.1:%d", b.port);
	http_ask_run(&h);
	if (h.rc != 0)
		fprintf(stderr, "  TLS GET /members: %s\n", h.err);
	CHECK_EQ(h.rc, 0);
	CHECK(h.body != NULL && strstr(h.body, "\"peerURLs\"") != NULL);
	free(h.body);
	/* no TLS given for an https URL */
	h.tls = NULL;
	http_ask_run(&h);
	CHECK_EQ(h.rc, PEER_ETLS);
	/* plaintext to a TLS listener: refused, no answer */
	snprintf(url, sizeof(url), "http://127.0.0.1:%d", b.port);
	http_ask_run(&h);
	CHECK(h.rc != 0);
	free(h.body);
	/* nobody listening */
	snprintf(url, sizeof(url), "http://127.0.0.1:1");
	http_ask_run(&h);
	CHECK_EQ(h.rc, PEER_EADDR);
	node_close(&b);
	peer_tls_free(tls);
}

static int has_log_text(node *n, const char *s)
{
	return count_logs(n, s) > 0;
}

typedef struct log_wait {
	node *n;
	const char *text;
} log_wait;

static int log_seen(void *arg)
{
	log_wait *w = arg;
	return has_log_text(w->n, w->text);
}

static void wait_log(node *n, const char *text)
{
	log_wait w = {n, text};
	char what[200];
	snprintf(what, sizeof(what), "log \"%s\"", text);
	run_until(log_seen, &w, 5000, what);
}

/*
 * Acceptor a (m1 and options ao) is dialed by member 2 (dialer options dopts): the
 * connection fails, a logs acceptor_log (if not NULL), the dialer logs dialer_log, nothing
 * is delivered and nobody hangs.
 */
static void check_tls_refused(const tls_opts *ao, const tls_opts *dopts, const char *dial_host,
			      const char *acceptor_log, const char *dialer_log)
{
	node a, d;
	peer_tls *at = ao != NULL ? tls_new(ao) : NULL;
	peer_tls *dt = dopts != NULL ? tls_new(dopts) : NULL;
	node_opts aopt = {.tls = at}, dopt = {.tls = dt};
	node_start(&a, 1, &aopt);
	node_start(&d, 2, &dopt);
	peer_tls_free(at);
	peer_tls_free(dt);
	CHECK_EQ(peer_add(a.t, 2, "127.0.0.1:1"), 0);
	char addr[64];
	snprintf(addr, sizeof(addr), "%s:%d", dial_host, a.port);
	CHECK_EQ(peer_add(d.t, 1, addr), 0);
	CHECK_EQ(peer_send(d.t, 1, "hello", 5), 0);
	if (acceptor_log != NULL)
		wait_log(&a, acceptor_log);
	wait_log(&d, dialer_log);
	/* More attempts follow (backoff 5..40 ms): still refused, logged once. */
	run_for(150);
	if (count_logs(&d, dialer_log) != 1)
		for (int i = 0; i < d.n_logs; i++)
			fprintf(stderr, "    dialer log: %s\n", d.logs[i]);
	CHECK_EQ(count_logs(&d, dialer_log), 1);
	CHECK_EQ(d.connected[1], 0);
	CHECK_EQ(a.recv_n[1], 0);
	peer_stats st;
	CHECK_EQ(peer_get_stats(d.t, 1, &st), 0);
	CHECK_EQ(st.ps_connects, 0);
	node_close(&a);
	node_close(&d);
}

static void test_tls_refusals(void)
{
	tls_opts acceptor = {.member = "m1", .ca = "caA.pem", .client_cert_auth = 1};
	tls_opts good = {.member = "m2", .ca = "caA.pem"};
	/* A client certificate from another CA. */
	tls_opts outsider = {.member = "outsider", .ca = "caA.pem"};
	check_tls_refused(&acceptor, &outsider, "127.0.0.1", "tls: certificate verify failed",
			  "tls:");
	/* No client certificate at all is not possible here (peer_tls needs one); a server
	 * whose CA the dialer does not trust: */
	tls_opts trusts_b = {.member = "m2", .ca = "caB.pem"};
	check_tls_refused(&acceptor, &trusts_b, "127.0.0.1", "alert",
			  "tls: certificate verify failed");
	/* A server certificate for another host. */
	tls_opts elsewhere = {.member = "elsewhere", .ca = "caA.pem"};
	check_tls_refused(&elsewhere, &good, "127.0.0.1", "alert bad certificate", "IP address mismatch");
	check_tls_refused(&elsewhere, &good, "localhost", "alert bad certificate", "hostname mismatch");
	/* --peer-cert-allowed-cn. */
	tls_opts only_m9 = {.member = "m1", .ca = "caA.pem", .allowed_cn = "m9"};
	check_tls_refused(&only_m9, &good, "127.0.0.1", "CommonName authentication failed", "tls: ");
	/* --peer-crl-file: the revoked certificate is refused, others are not. */
	tls_opts with_crl = {.member = "m1", .ca = "caA.pem", .crl = "crl.pem"};
	tls_opts revoked = {.member = "revoked", .ca = "caA.pem"};
	check_tls_refused(&with_crl, &revoked, "127.0.0.1", "revoked", "alert certificate revoked");

	node a, b;
	peer_tls *at = tls_new(&with_crl), *bt = tls_new(&good);
	node_opts ao = {.tls = at}, bo = {.tls = bt};
	node_start(&a, 1, &ao);
	node_start(&b, 2, &bo);
	peer_tls_free(at);
	peer_tls_free(bt);
	node_add(&a, 2, b.port);
	node_add(&b, 1, a.port);
	wait_connected(&b, 1);
	wait_connected(&a, 2);
	node_close(&a);
	node_close(&b);
}

/* http against https: refused with a reason on both sides, never a hang. */
static void test_tls_mismatch(void)
{
	tls_opts m1 = {.member = "m1", .ca = "caA.pem"};
	tls_opts m2 = {.member = "m2", .ca = "caA.pem"};
	/* A plaintext dialer: the TLS acceptor refuses its HELLO in plaintext. */
	check_tls_refused(&m1, NULL, "127.0.0.1", "TLS mismatch", "TLS mismatch");
	/* A TLS dialer: the plaintext acceptor closes at the ClientHello. */
	check_tls_refused(NULL, &m2, "127.0.0.1", "TLS handshake on a plaintext peer listener",
			  "connection closed during the TLS handshake");

	/* The refusal reaches on_refused with its status. */
	node a, d;
	peer_tls *at = tls_new(&m1);
	node_opts ao = {.tls = at};
	node_start(&a, 1, &ao);
	peer_tls_free(at);
	node_start(&d, 2, NULL);
	CHECK_EQ(peer_add(a.t, 2, "127.0.0.1:1"), 0);
	node_add(&d, 1, a.port);
	refused_wait w = {&d, 0};
	run_until(refused_n_grew, &w, 5000, "on_refused");
	CHECK_EQ(d.refused_status, PEER_HS_TLS_MISMATCH);
	node_close(&a);
	node_close(&d);

	/* A plaintext HELLO that claims to travel in TLS (a TLS-terminating proxy, say). */
	node p;
	node_start(&p, 1, NULL);
	CHECK_EQ(peer_add(p.t, 3, "127.0.0.1:1"), 0);
	uint8_t m[64];
	size_t hl = make_hello(m, 0xC1C1, "keelson-test", 3, 1);
	m[11] = PEER_HELLO_TLS;
	raw r;
	raw_run(&r, p.port, m, hl, 0);
	CHECK_EQ(r.in_total, 20);
	CHECK_EQ(r.in[11], PEER_HS_TLS_MISMATCH);
	CHECK_EQ(p.recv_n[2], 0);
	node_close(&p);
}

/* --peer-auto-tls: self-signed certificates, nothing verified, and kept across restarts. */
static void test_tls_self_cert(void)
{
	char dir1[600], dir2[600], err[256];
	tls_path(dir1, sizeof(dir1), "fixtures1/peer");
	tls_path(dir2, sizeof(dir2), "fixtures2/peer");
	const char *hosts[] = {"127.0.0.1:2380", "localhost:2380", "[::1]:2380"};
	CHECK_EQ(peer_tls_self_cert(dir1, hosts, 3, err, sizeof(err)), 0);
	CHECK_EQ(peer_tls_self_cert(dir2, hosts, 1, err, sizeof(err)), 0);
	char path[700];
	snprintf(path, sizeof(path), "%s/cert.pem", dir1);
	FILE *f = fopen(path, "r");
	X509 *x = f ? PEM_read_X509(f, NULL, NULL, NULL) : NULL;
	if (f)
		fclose(f);
	CHECK(x != NULL);
	if (x != NULL) {
		X509_VERIFY_PARAM *vp = X509_VERIFY_PARAM_new();
		CHECK_EQ(X509_check_ip_asc(x, "127.0.0.1", 0), 1);
		CHECK_EQ(X509_check_ip_asc(x, "::1", 0), 1);
		CHECK_EQ(X509_check_host(x, "localhost", 0, 0, NULL), 1);
		char org[64] = "";
		X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_organizationName, org, sizeof(org));
		CHECK(strcmp(org, "etcd") == 0);
		X509_VERIFY_PARAM_free(vp);
	}
	struct stat st1;
	snprintf(path, sizeof(path), "%s/key.pem", dir1);
	CHECK_EQ(stat(path, &st1), 0);
	CHECK_EQ(st1.st_mode & 0777, 0600);
	/* A second start keeps the pair. */
	CHECK_EQ(peer_tls_self_cert(dir1, hosts, 3, err, sizeof(err)), 0);
	snprintf(path, sizeof(path), "%s/cert.pem", dir1);
	f = fopen(path, "r");
	X509 *y = f ? PEM_read_X509(f, NULL, NULL, NULL) : NULL;
	if (f)
		fclose(f);
	CHECK(x != NULL && y != NULL && X509_cmp(x, y) == 0);
	X509_free(x);
	X509_free(y);

	/* Two members with their own self-signed certificates talk (skip_verify). */
	char cert[700], key[700];
	peer_tls *t[2] = {NULL, NULL};
	for (int i = 0; i < 2; i++) {
		snprintf(cert, sizeof(cert), "%s/cert.pem", i ? dir2 : dir1);
		snprintf(key, sizeof(key), "%s/key.pem", i ? dir2 : dir1);
		peer_tls_config c = {.ptc_cert_file = cert, .ptc_key_file = key, .ptc_skip_verify = 1};
		CHECK_EQ(peer_tls_new(&t[i], &c, err, sizeof(err)), 0);
	}
	node a, b;
	node_opts ao = {.tls = t[0]}, bo = {.tls = t[1]};
	node_start(&a, 1, &ao);
	node_start(&b, 2, &bo);
	peer_tls_free(t[0]);
	peer_tls_free(t[1]);
	node_add(&a, 2, b.port);
	node_add(&b, 1, a.port);
	for (uint64_t i = 0; i < 50; i++) {
		size_t len = pattern_size(1, 2, i);
		pattern_fill(scratch, len, 1, 2, i);
		CHECK_EQ(peer_send(a.t, 2, scratch, len), 0);
	}
	count_arg c = {&b, 1, 50, 0};
	run_until(received, &c, 10000, "messages over auto TLS");
	CHECK_EQ(b.recv_bad, 0);
	node_close(&a);
	node_close(&b);
}

/* Reconnect over TLS: the acceptor restarts on the same port; the dialer redials. */
static void test_tls_reconnect(void)
{
	tls_opts o1 = {.member = "m1", .ca = "caA.pem", .client_cert_auth = 1};
	tls_opts o2 = {.member = "m2", .ca = "caA.pem", .client_cert_auth = 1};
	peer_tls *t1 = tls_new(&o1), *t2 = tls_new(&o2);
	node a, b;
	node_opts ao = {.tls = t1}, bo = {.tls = t2};
	node_start(&a, 1, &ao);
	node_start(&b, 2, &bo);
	node_add(&a, 2, b.port);
	node_add(&b, 1, a.port);
	wait_connected(&a, 2);
	for (uint32_t i = 0; i < 10; i++)
		CHECK_EQ(peer_send(a.t, 2, scratch, 100), 0);
	count_arg c = {&b, 1, 10, 0};
	b.raw_id = 1; /* count only */
	run_until(received, &c, 5000, "before the restart");
	int port = b.port;
	node_close(&b);
	plink l = {&a, 2};
	run_until(is_disconnected, &l, 5000, "a sees b go");
	bo.port = port;
	node_start(&b, 2, &bo);
	b.raw_id = 1;
	node_add(&b, 1, a.port);
	wait_connected(&a, 2);
	for (uint32_t i = 0; i < 10; i++)
		CHECK_EQ(peer_send(a.t, 2, scratch, 100), 0);
	run_until(received, &c, 5000, "after the restart");
	peer_stats st;
	CHECK_EQ(peer_get_stats(a.t, 2, &st), 0);
	CHECK_EQ(st.ps_connects, 2);
	peer_tls_free(t1);
	peer_tls_free(t2);
	node_close(&a);
	node_close(&b);
}

/*
 * A TLS server on its own thread (blocking OpenSSL on a socket): completes the handshake,
 * answers the HELLO with an OK ACK as member ack_id, then never reads again until stopped.
 */
typedef struct tls_mute {
	int lfd;
	int port;
	int stop[2];
	uint64_t ack_id;
	SSL_CTX *ctx;
	pthread_t th;
	int handshook;
} tls_mute;

static int read_full(SSL *ssl, uint8_t *b, int n)
{
	int have = 0;
	while (have < n) {
		int r = SSL_read(ssl, b + have, n - have);
		if (r <= 0)
			return -1;
		have += r;
	}
	return 0;
}

static void *tls_mute_main(void *arg)
{
	tls_mute *m = arg;
	int fd = accept(m->lfd, NULL, NULL);
	if (fd < 0)
		return NULL;
	SSL *ssl = SSL_new(m->ctx);
	SSL_set_fd(ssl, fd);
	uint8_t hdr[4], body[2048];
	if (SSL_accept(ssl) == 1 && read_full(ssl, hdr, 4) == 0) {
		uint32_t len = ((uint32_t)hdr[0] << 24) | (hdr[1] << 16) | (hdr[2] << 8) | hdr[3];
		if (len <= sizeof(body) && read_full(ssl, body, (int)len) == 0) {
			uint8_t ack[20];
			put32(ack, 16);
			memcpy(ack + 4, "KLSN", 4);
			ack[8] = 0, ack[9] = PEER_PROTOCOL_VERSION, ack[10] = 0, ack[11] = PEER_HS_OK;
			put64(ack + 12, m->ack_id);
			if (SSL_write(ssl, ack, sizeof(ack)) == sizeof(ack))
				m->handshook = 1;
		}
	}
	char c;
	while (read(m->stop[0], &c, 1) < 0 && errno == EINTR)
		;
	SSL_free(ssl);
	close(fd);
	return NULL;
}

static void tls_mute_start(tls_mute *m, uint64_t ack_id)
{
	char cert[600], key[600];
	memset(m, 0, sizeof(*m));
	m->ack_id = ack_id;
	tls_path(cert, sizeof(cert), "m3.pem");
	tls_path(key, sizeof(key), "m3-key.pem");
	m->ctx = SSL_CTX_new(TLS_server_method());
	CHECK_EQ(SSL_CTX_use_certificate_file(m->ctx, cert, SSL_FILETYPE_PEM), 1);
	CHECK_EQ(SSL_CTX_use_PrivateKey_file(m->ctx, key, SSL_FILETYPE_PEM), 1);
	/* A small receive buffer, so that the sender's writes stall soon. */
	m->lfd = socket(AF_INET, SOCK_STREAM, 0);
	int rcv = 64 * 1024;
	setsockopt(m->lfd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof(rcv));
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t sl = sizeof(sa);
	CHECK_EQ(bind(m->lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	CHECK_EQ(listen(m->lfd, 4), 0);
	getsockname(m->lfd, (struct sockaddr *)&sa, &sl);
	m->port = ntohs(sa.sin_port);
	CHECK_EQ(pipe(m->stop), 0);
	CHECK_EQ(pthread_create(&m->th, NULL, tls_mute_main, m), 0);
}

static void tls_mute_stop(tls_mute *m)
{
	if (write(m->stop[1], "x", 1) != 1)
		CHECK(0);
	shutdown(m->lfd, SHUT_RDWR); /* unblocks accept() if nobody came */
	pthread_join(m->th, NULL);
	close(m->lfd);
	close(m->stop[0]);
	close(m->stop[1]);
	SSL_CTX_free(m->ctx);
}

/* Backpressure over TLS: a peer that stops reading after the handshake fills the queue up to
 * max_queue, sends get PEER_EFULL, and the loop keeps running. */
static void test_tls_backpressure(void)
{
	tls_opts o = {.member = "m1", .ca = "caA.pem"};
	peer_tls *t = tls_new(&o);
	node a;
	node_opts ao = {.max_queue = 1u << 20, .tls = t};
	node_start(&a, 1, &ao);
	peer_tls_free(t);
	tls_mute m;
	tls_mute_start(&m, 3);
	char addr[32];
	snprintf(addr, sizeof(addr), "127.0.0.1:%d", m.port);
	CHECK_EQ(peer_add(a.t, 3, addr), 0);
	wait_connected(&a, 3);
	static uint8_t chunk[64 * 1024];
	bp b = {.n = &a, .to = 3, .buf = chunk};
	uv_timer_init(&loop, &b.timer);
	b.timer.data = &b;
	uv_timer_start(&b.timer, on_bp_tick, 1, 2);
	run_until(bp_stalled, &b, 20000, "sends to stall");
	uv_close((uv_handle_t *)&b.timer, NULL);
	peer_stats st;
	peer_get_stats(a.t, 3, &st);
	fprintf(stderr, "  tls backpressure: %" PRIu64 " x 64 KiB accepted, %" PRIu64
			" written, %zu queued\n", b.accepted, st.ps_sent_bytes, st.ps_queued_bytes);
	CHECK(m.handshook);
	CHECK(st.ps_queued_bytes <= (1u << 20));
	CHECK(st.ps_queued_bytes > (1u << 19));
	CHECK_EQ(st.ps_connected, 1);
	CHECK(b.accepted * sizeof(chunk) < (256u << 20));
	/* Small messages still queue into chunks while stalled, within the same bound. */
	node_close(&a);
	tls_mute_stop(&m);
}

static void count_handle(uv_handle_t *h, void *arg)
{
	if (h != (uv_handle_t *)&watchdog)
		(*(int *)arg)++;
}

int main(void)
{
	static const struct {
		const char *name;
		void (*fn)(void);
	} tests[] = {
		{"api_errors", test_api_errors},
		{"exchange_three", test_exchange_three},
		{"handshake_refusal", test_handshake_refusal},
		{"reconnect", test_reconnect},
		{"backpressure", test_backpressure},
		{"garbage", test_garbage},
		{"close_in_callback", test_close_in_callback},
		{"churn", test_churn},
		{"bad_acceptor", test_bad_acceptor},
		{"random_streams", test_random_streams},
		{"tls_config_errors", test_tls_config_errors},
		{"tls_exchange_three", test_tls_exchange_three},
		{"http_members", test_http_members},
		{"tls_refusals", test_tls_refusals},
		{"tls_mismatch", test_tls_mismatch},
		{"tls_self_cert", test_tls_self_cert},
		{"tls_reconnect", test_tls_reconnect},
		{"tls_backpressure", test_tls_backpressure},
	};
	const char *only = getenv("PEER_TEST_ONLY");
	/* As the server does (main.c): a write to a connection the remote reset must fail with
	 * EPIPE, not kill the process. */
	signal(SIGPIPE, SIG_IGN);
	scratch = malloc(MSG_MAX);
	tls_fixtures();
	uv_loop_init(&loop);
	uv_timer_init(&loop, &watchdog);
	for (size_t i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
		if (only != NULL && strcmp(only, tests[i].name) != 0)
			continue;
		int before = failed;
		cur_test = tests[i].name;
		uint64_t t0 = uv_hrtime();
		tests[i].fn();
		/* Every test closes what it opened: only the watchdog may remain. */
		uv_run(&loop, UV_RUN_NOWAIT);
		int handles = 0;
		uv_walk(&loop, count_handle, &handles);
		CHECK_EQ(handles, 0);
		fprintf(stderr, "%s %s (%.0f ms)\n", failed == before ? "PASS" : "FAIL", tests[i].name,
			(uv_hrtime() - t0) / 1e6);
	}
	uv_close((uv_handle_t *)&watchdog, NULL);
	uv_run(&loop, UV_RUN_DEFAULT);
	CHECK_EQ(uv_loop_close(&loop), 0);
	free(scratch);
	tls_fixtures_free();
	if (failed) {
		fprintf(stderr, "%d check(s) failed\n", failed);
		return 1;
	}
	fprintf(stderr, "all peer tests passed\n");
	return 0;
}
