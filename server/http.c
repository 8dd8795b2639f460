/*
 * http.c - the HTTP endpoints etcd serves beside gRPC: /health, /version and /metrics
 * (Prometheus text), on --listen-metrics-urls and, as etcd's cmux does, on the client ports
 * too: this module accepts client connections itself and peeks at the first bytes. A TLS
 * handshake goes to tls_serve.c (https client URLs; a port may serve http and https URLs
 * both); in plaintext, HTTP/2 connections (gRPC) go to gRPC core and HTTP/1 is answered
 * here. Its own libuv loop and thread.
 *
 * One request per connection: read until the end of the headers, answer, close.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sys/socket.h>
#include <unistd.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>
#include <sys/prctl.h>

#include "server/server.h"

#define HTTP_MAX_LISTENERS CONFIG_MAX_URLS
#define HTTP_MAX_REQUEST 8192

/* A client-port listener: a raw socket, so accepted fds can be handed to gRPC core. */
typedef struct mux_listener {
	uv_poll_t ml_poll;
	uv_timer_t ml_retry; /* accepting again after running out of file descriptors */
	uint64_t ml_backoff_ms;
	int ml_fd;
	int ml_plain, ml_tls; /* the port serves http, https URLs (both: etcd's cmux) */
	char ml_hp[256];      /* host:port */
	struct http_server *ml_srv;
} mux_listener;

/* An accepted client connection whose first bytes decide who serves it. */
typedef struct sniff_conn {
	uv_poll_t sc_poll;
	uv_timer_t sc_timer;
	int sc_fd;
	int sc_handles; /* handles still open */
	int sc_keep_fd; /* the fd now belongs to gRPC core, a uv_tcp or the TLS server */
	int sc_plain, sc_tls; /* as its listener's */
	struct http_server *sc_srv;
} sniff_conn;

struct http_server {
	server_ctx *h_sc;
	api_server *h_api;
	uv_loop_t h_loop;
	uv_tcp_t h_listen[HTTP_MAX_LISTENERS];
	int h_nlisten;
	mux_listener h_mux[HTTP_MAX_LISTENERS];
	int h_nmux;
	tls_server *h_tls; /* the https client URLs' TLS; NULL: none */
	uv_async_t h_stop;
	pthread_t h_thread;
};

typedef struct http_conn {
	uv_tcp_t hc_tcp;
	http_server *hc_srv;
	char hc_buf[HTTP_MAX_REQUEST];
	size_t hc_len;
	int hc_answered;
	uv_write_t hc_write;
	char *hc_resp;
} http_conn;

static void conn_closed(uv_handle_t *h)
{
	http_conn *c = h->data;
	free(c->hc_resp);
	free(c);
}

static void on_written(uv_write_t *w, int status)
{
	http_conn *c = w->data;
	uv_close((uv_handle_t *)&c->hc_tcp, conn_closed);
}

/* Appends printf output to a growing buffer. */
typedef struct sbuf {
	char *p;
	size_t len, cap;
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...)
{
	va_list ap;
	for (;;) {
		size_t room = b->cap - b->len;
		va_start(ap, fmt);
		int n = vsnprintf(b->p ? b->p + b->len : NULL, b->p ? room : 0, fmt, ap);
		va_end(ap);
		if (n < 0)
			return;
		if (b->p && (size_t)n < room) {
			b->len += (size_t)n;
			return;
		}
		size_t cap = b->cap ? b->cap * 2 : 4096;
		while (cap < b->len + (size_t)n + 1)
			cap *= 2;
		char *p = realloc(b->p, cap);
		if (p == NULL)
			return;
		b->p = p;
		b->cap = cap;
	}
}

void histogram_observe(histogram *h, uint64_t ns)
{
	double sec = (double)ns / 1e9, bound = h->h_first;
	int i = 0;
	while (i < h->h_n && sec > bound) {
		bound *= 2;
		i++;
	}
	atomic_fetch_add(&h->h_counts[i], 1);
	atomic_fetch_add(&h->h_sum_ns, ns);
}

/* Prometheus' text form of a histogram: cumulative buckets, then _sum and _count. labels
 * is "" or `name="value"` pairs for every line. */
static void print_histogram(sbuf *b, const char *name, const char *help, const char *labels,
			    const histogram *h, int with_header)
{
	if (with_header)
		sb_printf(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
	const char *sep = labels[0] ? "," : "";
	uint64_t total = 0;
	double bound = h->h_first;
	for (int i = 0; i <= h->h_n; i++) {
		total += atomic_load(&h->h_counts[i]);
		if (i < h->h_n)
			sb_printf(b, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, labels, sep, bound, (unsigned long long)total);
		else
			sb_printf(b, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, sep, (unsigned long long)total);
		bound *= 2;
	}
	const char *open = labels[0] ? "{" : "", *close = labels[0] ? "}" : "";
	sb_printf(b, "%s_sum%s%s%s %.9g\n%s_count%s%s%s %llu\n", name, open, labels, close,
		  (double)atomic_load(&h->h_sum_ns) / 1e9, name, open, labels, close, (unsigned long long)total);
}

static void metrics_body(server_ctx *sc, sbuf *b)
{
	storage_stats st = {0};
	storage_stat(sc->st, &st);
	uint64_t reqs = 0, commits = 0;
	node_batch_stats(sc->nd, &reqs, &commits);
	uint64_t lead = node_leader(sc->nd);
	const node_metrics *nm = node_get_metrics(sc->nd);
	sb_printf(b, "# HELP etcd_server_has_leader Whether or not a leader exists. 1 is existence, 0 is not.\n"
		     "# TYPE etcd_server_has_leader gauge\netcd_server_has_leader %d\n", lead != 0);
	sb_printf(b, "# HELP etcd_server_is_leader Whether or not this member is a leader. 1 if is, 0 otherwise.\n"
		     "# TYPE etcd_server_is_leader gauge\netcd_server_is_leader %d\n", lead == sc->mi.member_id);
	sb_printf(b, "# HELP etcd_server_leader_changes_seen_total The number of leader changes seen.\n"
		     "# TYPE etcd_server_leader_changes_seen_total counter\netcd_server_leader_changes_seen_total %llu\n",
		  (unsigned long long)atomic_load(&nm->nm_leader_changes));
	print_histogram(b, "etcd_disk_wal_fsync_duration_seconds", "The latency distributions of fsync called by WAL.", "",
			&nm->nm_wal_fsync, 1);
	print_histogram(b, "etcd_disk_backend_commit_duration_seconds",
			"The latency distributions of commit called by backend.", "", &nm->nm_backend_commit, 1);
	int rtt_header = 1;
	for (int i = 0; i < NODE_RTT_PEERS; i++) {
		uint64_t id = atomic_load(&nm->nm_rtt[i].id);
		if (id == 0)
			continue;
		char label[48];
		snprintf(label, sizeof(label), "To=\"%llx\"", (unsigned long long)id);
		print_histogram(b, "etcd_network_peer_round_trip_time_seconds", "Round-Trip-Time histogram between peers",
				label, &nm->nm_rtt[i].h, rtt_header);
		rtt_header = 0;
	}
	sb_printf(b, "# HELP etcd_server_proposals_committed_total The total number of consensus proposals committed.\n"
		     "# TYPE etcd_server_proposals_committed_total gauge\netcd_server_proposals_committed_total %llu\n",
		  (unsigned long long)atomic_load(&node_get_metrics(sc->nd)->nm_committed));
	sb_printf(b, "# HELP etcd_server_proposals_pending The current number of pending proposals to commit.\n"
		     "# TYPE etcd_server_proposals_pending gauge\netcd_server_proposals_pending %lld\n",
		  (long long)atomic_load(&node_get_metrics(sc->nd)->nm_proposals_pending));
	sb_printf(b, "# HELP etcd_server_proposals_failed_total The total number of failed proposals seen.\n"
		     "# TYPE etcd_server_proposals_failed_total counter\netcd_server_proposals_failed_total %llu\n",
		  (unsigned long long)atomic_load(&node_get_metrics(sc->nd)->nm_proposals_failed));
	sb_printf(b, "# HELP etcd_server_proposals_applied_total The total number of consensus proposals applied.\n"
		     "# TYPE etcd_server_proposals_applied_total gauge\netcd_server_proposals_applied_total %llu\n",
		  (unsigned long long)node_applied_index(sc->nd));
	sb_printf(b, "# HELP etcd_mvcc_db_total_size_in_bytes Total size of the underlying database physically allocated in bytes.\n"
		     "# TYPE etcd_mvcc_db_total_size_in_bytes gauge\netcd_mvcc_db_total_size_in_bytes %llu\n",
		  (unsigned long long)st.st_db_size);
	sb_printf(b, "# HELP etcd_mvcc_db_total_size_in_use_in_bytes Total size of the underlying database logically in use in bytes.\n"
		     "# TYPE etcd_mvcc_db_total_size_in_use_in_bytes gauge\netcd_mvcc_db_total_size_in_use_in_bytes %llu\n",
		  (unsigned long long)st.st_db_size_in_use);
	sb_printf(b, "# HELP etcd_debugging_mvcc_current_revision The current revision of store.\n"
		     "# TYPE etcd_debugging_mvcc_current_revision gauge\netcd_debugging_mvcc_current_revision %lld\n",
		  (long long)st.st_revision);
	sb_printf(b, "# HELP etcd_debugging_mvcc_compact_revision The revision of the last compaction in store.\n"
		     "# TYPE etcd_debugging_mvcc_compact_revision gauge\netcd_debugging_mvcc_compact_revision %lld\n",
		  (long long)(st.st_compact_revision ? st.st_compact_revision : -1));
	watch_stats ws = {0};
	if (sc->hub)
		watch_hub_stats(sc->hub, &ws);
	sb_printf(b, "# HELP etcd_debugging_mvcc_events_total Total number of events sent by this member.\n"
		     "# TYPE etcd_debugging_mvcc_events_total counter\netcd_debugging_mvcc_events_total %llu\n",
		  (unsigned long long)ws.ws_events_total);
	sb_printf(b, "# HELP etcd_debugging_mvcc_pending_events_total Total number of pending events to be sent.\n"
		     "# TYPE etcd_debugging_mvcc_pending_events_total gauge\netcd_debugging_mvcc_pending_events_total %llu\n",
		  (unsigned long long)ws.ws_pending_events);
	sb_printf(b, "# HELP etcd_debugging_mvcc_slow_watcher_total Total number of unsynced slow watchers.\n"
		     "# TYPE etcd_debugging_mvcc_slow_watcher_total gauge\netcd_debugging_mvcc_slow_watcher_total %llu\n",
		  (unsigned long long)ws.ws_unsynced);
	sb_printf(b, "# HELP keelson_watch_pending_bytes Watch responses queued on streams and not yet sent, in bytes.\n"
		     "# TYPE keelson_watch_pending_bytes gauge\nkeelson_watch_pending_bytes %llu\n",
		  (unsigned long long)ws.ws_pending_bytes);
	sb_printf(b, "# HELP etcd_debugging_mvcc_watch_stream_total Total number of watch streams.\n"
		     "# TYPE etcd_debugging_mvcc_watch_stream_total gauge\netcd_debugging_mvcc_watch_stream_total %llu\n",
		  (unsigned long long)ws.ws_streams);
	sb_printf(b, "# HELP etcd_debugging_mvcc_watcher_total Total number of watchers.\n"
		     "# TYPE etcd_debugging_mvcc_watcher_total gauge\netcd_debugging_mvcc_watcher_total %llu\n",
		  (unsigned long long)ws.ws_watchers);
	sb_printf(b, "# HELP keelson_watch_slow_total Times a watcher fell behind and moved to catch-up.\n"
		     "# TYPE keelson_watch_slow_total counter\nkeelson_watch_slow_total %llu\n",
		  (unsigned long long)ws.ws_slow_total);
	sb_printf(b, "# HELP keelson_batch_requests_total Writes applied by the node loop.\n"
		     "# TYPE keelson_batch_requests_total counter\nkeelson_batch_requests_total %llu\n",
		  (unsigned long long)reqs);
	sb_printf(b, "# HELP keelson_batch_commits_total Write batches committed: the Raft log records of one Ready (one WAL fdatasync) and the entries it applies (one LMDB transaction).\n"
		     "# TYPE keelson_batch_commits_total counter\nkeelson_batch_commits_total %llu\n",
		  (unsigned long long)commits);
	char backup[2048];
	if (server_backup_metrics(sc->backup, backup, sizeof(backup)) > 0)
		sb_printf(b, "%s", backup);
}

/* Whether ?exclude=NAME (any of several, as etcd's query parsing) names the alarm. */
static int alarm_excluded(const char *query, const char *name)
{
	size_t n = strlen(name);
	for (const char *q = query; q && *q; q = strchr(q, '&'), q = q ? q + 1 : NULL)
		if (strncmp(q, "exclude=", 8) == 0 && strncmp(q + 8, name, n) == 0 && (q[8 + n] == '&' || q[8 + n] == '\0'))
			return 1;
	return 0;
}

/*
 * etcd 3.4's /health: false while an alarm is raised (unless the query excludes it with
 * ?exclude=NOSPACE or ?exclude=CORRUPT) or while the member knows no leader. etcd then
 * also makes a quorum read with a one-second deadline; this handler answers without
 * blocking its loop, so a member cut off from a quorum reports healthy until it loses its
 * leader (an election timeout later: check-quorum and pre-vote).
 */
static int member_healthy(server_ctx *sc, const char *query)
{
	if (alarm_nospace(sc->alarms) && !alarm_excluded(query, "NOSPACE"))
		return 0;
	if (alarm_corrupt(sc->alarms) && !alarm_excluded(query, "CORRUPT"))
		return 0;
	return node_leader(sc->nd) != 0;
}

char *http_response(server_ctx *sc, const char *req, size_t *out_len)
{
	sbuf body = {0}, out = {0};
	const char *status = "200 OK", *ctype = "text/plain; charset=utf-8";
	char method[16] = "", path[256] = "";
	if (sscanf(req, "%15s %255s", method, path) != 2) {
		status = "400 Bad Request";
		sb_printf(&body, "bad request\n");
	} else if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
		status = "405 Method Not Allowed";
		sb_printf(&body, "Method Not Allowed\n");
	} else if (strcmp(path, "/health") == 0 || strncmp(path, "/health?", 8) == 0) {
		int ok = member_healthy(sc, path[7] == '?' ? path + 8 : "");
		if (!ok)
			status = "503 Service Unavailable";
		/* etcd answers an unhealthy member through http.Error, which adds a newline */
		sb_printf(&body, ok ? "{\"health\":\"true\"}" : "{\"health\":\"false\"}\n");
	} else if (strcmp(path, "/version") == 0) {
		ctype = "application/json";
		/* etcd reports the cluster version as major.minor.0 */
		char cluster[32];
		snprintf(cluster, sizeof(cluster), "%s", sc->cfg->etcd_version);
		char *dot = strchr(cluster, '.');
		if (dot && (dot = strchr(dot + 1, '.')))
			strcpy(dot, ".0");
		sb_printf(&body, "{\"etcdserver\":\"%s\",\"etcdcluster\":\"%s\"}", sc->cfg->etcd_version, cluster);
	} else if (strcmp(path, "/metrics") == 0) {
		ctype = "text/plain; version=0.0.4; charset=utf-8";
		metrics_body(sc, &body);
	} else {
		status = "404 Not Found";
		sb_printf(&body, "404 page not found\n");
	}
	sb_printf(&out, "HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n%.*s",
		  status, ctype, body.len, strcmp(method, "HEAD") == 0 ? 0 : (int)body.len, body.p ? body.p : "");
	free(body.p);
	*out_len = out.len;
	return out.p;
}

static void answer(http_conn *c)
{
	size_t len = 0;
	c->hc_resp = http_response(c->hc_srv->h_sc, c->hc_buf, &len);
	if (c->hc_resp == NULL) {
		uv_close((uv_handle_t *)&c->hc_tcp, conn_closed);
		return;
	}
	c->hc_write.data = c;
	uv_buf_t buf = uv_buf_init(c->hc_resp, (unsigned)len);
	if (uv_write(&c->hc_write, (uv_stream_t *)&c->hc_tcp, &buf, 1, on_written) != 0)
		uv_close((uv_handle_t *)&c->hc_tcp, conn_closed);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
	http_conn *c = h->data;
	size_t room = sizeof(c->hc_buf) - 1 - c->hc_len;
	*buf = uv_buf_init(c->hc_buf + c->hc_len, (unsigned)room);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
	http_conn *c = s->data;
	if (c->hc_answered)
		return;
	if (nread < 0) {
		uv_close((uv_handle_t *)s, conn_closed);
		return;
	}
	c->hc_len += (size_t)nread;
	c->hc_buf[c->hc_len] = '\0';
	if (strstr(c->hc_buf, "\r\n\r\n") || strstr(c->hc_buf, "\n\n") ||
	    c->hc_len + 1 >= sizeof(c->hc_buf)) {
		c->hc_answered = 1;
		uv_read_stop(s);
		answer(c);
	}
}

static void on_connection(uv_stream_t *server, int status)
{
	http_server *h = server->data;
	if (status < 0)
		return;
	http_conn *c = calloc(1, sizeof(*c));
	if (c == NULL)
		return;
	c->hc_srv = h;
	uv_tcp_init(&h->h_loop, &c->hc_tcp);
	c->hc_tcp.data = c;
	if (uv_accept(server, (uv_stream_t *)&c->hc_tcp) != 0 ||
	    uv_read_start((uv_stream_t *)&c->hc_tcp, on_alloc, on_read) != 0)
		uv_close((uv_handle_t *)&c->hc_tcp, conn_closed);
}

/* ---- the client port: HTTP/2 to gRPC core, HTTP/1 here ---- */

#define SNIFF_TIMEOUT_MS 10000

static void sniff_closed(uv_handle_t *hd)
{
	sniff_conn *c = hd->data;
	if (--c->sc_handles > 0)
		return;
	if (!c->sc_keep_fd)
		close(c->sc_fd);
	free(c);
}

static void sniff_end(sniff_conn *c, int keep_fd)
{
	c->sc_keep_fd = keep_fd;
	if (!uv_is_closing((uv_handle_t *)&c->sc_poll))
		uv_close((uv_handle_t *)&c->sc_poll, sniff_closed);
	if (!uv_is_closing((uv_handle_t *)&c->sc_timer))
		uv_close((uv_handle_t *)&c->sc_timer, sniff_closed);
}

static void on_sniff_timeout(uv_timer_t *t)
{
	sniff_end(t->data, 0);
}

static void on_sniff(uv_poll_t *p, int status, int events)
{
	sniff_conn *c = p->data;
	if (status < 0) {
		sniff_end(c, 0);
		return;
	}
	char buf[16];
	ssize_t n = recv(c->sc_fd, buf, sizeof(buf), MSG_PEEK);
	if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
		return;
	if (n <= 0) {
		sniff_end(c, 0);
		return;
	}
	http_server *h = c->sc_srv;
	/* A TLS connection starts with a handshake record (type 22). */
	if (buf[0] == 0x16 && c->sc_tls) {
		sniff_end(c, 1);
		tls_server_serve(h->h_tls, c->sc_fd);
		return;
	}
	if (!c->sc_plain) {
		sniff_end(c, 0); /* not TLS on an https-only port: Go's handshake fails too */
		return;
	}
	/* HTTP/2 clients speak first, with "PRI * HTTP/2.0"; HTTP/1 with a method name. */
	if (n < 3 && memcmp(buf, "PRI", (size_t)n) == 0)
		return; /* wait for more */
	if (memcmp(buf, "PRI", 3) == 0) {
		sniff_end(c, 1);
		api_server_adopt_fd(h->h_api, c->sc_fd);
		return;
	}
	http_conn *hc = calloc(1, sizeof(*hc));
	if (hc == NULL) {
		sniff_end(c, 0);
		return;
	}
	hc->hc_srv = h;
	uv_tcp_init(&h->h_loop, &hc->hc_tcp);
	hc->hc_tcp.data = hc;
	sniff_end(c, 1);
	if (uv_tcp_open(&hc->hc_tcp, c->sc_fd) != 0 ||
	    uv_read_start((uv_stream_t *)&hc->hc_tcp, on_alloc, on_read) != 0)
		uv_close((uv_handle_t *)&hc->hc_tcp, conn_closed);
}

static void on_mux_accept(uv_poll_t *p, int status, int events);

static void on_mux_retry(uv_timer_t *t)
{
	mux_listener *ml = t->data;
	uv_poll_start(&ml->ml_poll, UV_READABLE, on_mux_accept);
}

static void on_mux_accept(uv_poll_t *p, int status, int events)
{
	mux_listener *ml = p->data;
	http_server *h = ml->ml_srv;
	if (status < 0)
		return;
	for (;;) {
		int fd = accept4(ml->ml_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0 && (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)) {
			/* The pending connection stays queued and the listener stays readable:
			 * polling on would spin a core until a descriptor frees up (etcd 3.4 does:
			 * tests/integration/test_limits.py). Back off as Go's net/http Server does
			 * (5 ms, doubling up to 1 s). */
			ml->ml_backoff_ms = ml->ml_backoff_ms ? ml->ml_backoff_ms * 2 : 5;
			if (ml->ml_backoff_ms > 1000)
				ml->ml_backoff_ms = 1000;
			if (ml->ml_backoff_ms == 5)
				log_at(LOG_WARN, "cannot accept client connections; retrying", "error",
				       strerror(errno), NULL);
			uv_poll_stop(&ml->ml_poll);
			uv_timer_start(&ml->ml_retry, on_mux_retry, ml->ml_backoff_ms, 0);
			return;
		}
		if (fd < 0)
			return;
		ml->ml_backoff_ms = 0;
		int one = 1;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		sniff_conn *c = calloc(1, sizeof(*c));
		if (c == NULL) {
			close(fd);
			continue;
		}
		c->sc_fd = fd;
		c->sc_srv = h;
		c->sc_plain = ml->ml_plain;
		c->sc_tls = ml->ml_tls;
		if (uv_poll_init(&h->h_loop, &c->sc_poll, fd) != 0) {
			close(fd);
			free(c);
			continue;
		}
		uv_timer_init(&h->h_loop, &c->sc_timer);
		c->sc_poll.data = c;
		c->sc_timer.data = c;
		c->sc_handles = 2;
		uv_poll_start(&c->sc_poll, UV_READABLE, on_sniff);
		uv_timer_start(&c->sc_timer, on_sniff_timeout, SNIFF_TIMEOUT_MS, 0);
	}
}

/* Binds host:port for the client port, or adds the scheme to a listener already there. */
static int mux_listen(http_server *h, const char *url, const struct sockaddr *addr)
{
	int tls = strncmp(url, "https://", 8) == 0;
	char hp[256];
	if (config_url_host_port(url, hp, sizeof(hp)) != 0)
		return -1;
	for (int i = 0; i < h->h_nmux; i++)
		if (strcmp(h->h_mux[i].ml_hp, hp) == 0) {
			*(tls ? &h->h_mux[i].ml_tls : &h->h_mux[i].ml_plain) = 1;
			return 0;
		}
	if (h->h_nmux == HTTP_MAX_LISTENERS)
		return -1;
	int fd = socket(addr->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	socklen_t len = addr->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
	if (bind(fd, addr, len) != 0 || listen(fd, 1024) != 0) {
		close(fd);
		return -1;
	}
	mux_listener *ml = &h->h_mux[h->h_nmux];
	ml->ml_fd = fd;
	ml->ml_srv = h;
	ml->ml_plain = !tls;
	ml->ml_tls = tls;
	snprintf(ml->ml_hp, sizeof(ml->ml_hp), "%s", hp);
	if (uv_poll_init(&h->h_loop, &ml->ml_poll, fd) != 0) {
		close(fd);
		return -1;
	}
	ml->ml_poll.data = ml;
	uv_timer_init(&h->h_loop, &ml->ml_retry);
	ml->ml_retry.data = ml; /* a listener's handle for close_walk */
	h->h_nmux++;
	return uv_poll_start(&ml->ml_poll, UV_READABLE, on_mux_accept);
}

/* Closes every handle of the loop; arg is the http_server, which tells its handles apart:
 * the stop async and the listeners carry it or a listener, connections their own state. */
static void close_walk(uv_handle_t *h, void *arg)
{
	http_server *srv = arg;
	if (uv_is_closing(h))
		return;
	int is_listener = h->data == srv || ((char *)h->data >= (char *)srv->h_mux &&
					     (char *)h->data < (char *)(srv->h_mux + HTTP_MAX_LISTENERS));
	if (is_listener)
		uv_close(h, NULL);
	else if (h->type == UV_TCP)
		uv_close(h, conn_closed);
	else if (h->type == UV_POLL || h->type == UV_TIMER)
		uv_close(h, sniff_closed); /* a connection still being sniffed */
	else
		uv_close(h, NULL);
}

static void on_stop(uv_async_t *a)
{
	http_server *h = a->data;
	uv_walk(&h->h_loop, close_walk, h);
}

static void *http_thread(void *arg)
{
	prctl(PR_SET_NAME, "http"); /* names the thread in top -H, perf, gdb */
	http_server *h = arg;
	uv_run(&h->h_loop, UV_RUN_DEFAULT);
	return NULL;
}

/* "host:port" of url into a socket address; localhost means 127.0.0.1. */
static int url_addr(const char *url, struct sockaddr_storage *addr)
{
	char hp[256], host[256];
	if (config_url_host_port(url, hp, sizeof(hp)) != 0)
		return -1;
	char *colon = strrchr(hp, ':');
	int port = atoi(colon + 1);
	snprintf(host, sizeof(host), "%.*s", (int)(colon - hp), hp);
	if (strcmp(host, "localhost") == 0)
		strcpy(host, "127.0.0.1");
	if (host[0] == '[') {
		memmove(host, host + 1, strlen(host));
		host[strlen(host) - 1] = '\0';
		return uv_ip6_addr(host, port, (struct sockaddr_in6 *)addr) == 0 ? 0 : -1;
	}
	return uv_ip4_addr(host, port, (struct sockaddr_in *)addr) == 0 ? 0 : -1;
}

int http_start(http_server **out, server_ctx *sc, const config_urls *urls, const config_urls *client,
	       api_server *as, tls_server *tls)
{
	*out = NULL;
	int nclient = 0;
	for (int i = 0; i < client->n; i++)
		nclient += strncmp(client->url[i], "http://", 7) == 0 || (tls && strncmp(client->url[i], "https://", 8) == 0);
	if (urls->n == 0 && nclient == 0)
		return 0;
	http_server *h = calloc(1, sizeof(*h));
	if (h == NULL)
		return -1;
	h->h_sc = sc;
	h->h_api = as;
	h->h_tls = tls;
	uv_loop_init(&h->h_loop);
	uv_async_init(&h->h_loop, &h->h_stop, on_stop);
	h->h_stop.data = h;
	for (int i = 0; i < urls->n; i++) {
		struct sockaddr_storage addr;
		if (url_addr(urls->url[i], &addr) != 0)
			goto fail;
		uv_tcp_t *t = &h->h_listen[h->h_nlisten++];
		uv_tcp_init(&h->h_loop, t);
		t->data = h;
		if (uv_tcp_bind(t, (struct sockaddr *)&addr, 0) != 0 ||
		    uv_listen((uv_stream_t *)t, 128, on_connection) != 0) {
			log_at(LOG_ERROR, "cannot listen for metrics", "url", urls->url[i], NULL);
			goto fail;
		}
	}
	for (int i = 0; i < client->n; i++) {
		struct sockaddr_storage addr;
		int tls_url = strncmp(client->url[i], "https://", 8) == 0;
		if (!tls_url && strncmp(client->url[i], "http://", 7) != 0)
			continue;
		if (tls_url && tls == NULL)
			continue;
		if (url_addr(client->url[i], &addr) != 0 || mux_listen(h, client->url[i], (struct sockaddr *)&addr) != 0) {
			log_at(LOG_FATAL, "cannot listen for clients", "url", client->url[i], "error", strerror(errno), NULL);
			goto fail;
		}
		if (tls_url)
			log_at(LOG_INFO, "serving client traffic securely", "url", client->url[i], NULL);
		else
			log_at(LOG_INFO, "serving insecure client requests, this is strongly discouraged!",
			       "url", client->url[i], NULL);
	}
	if (pthread_create(&h->h_thread, NULL, http_thread, h) != 0)
		goto fail;
	*out = h;
	return 0;
fail:
	uv_walk(&h->h_loop, close_walk, h);
	uv_run(&h->h_loop, UV_RUN_DEFAULT);
	for (int i = 0; i < h->h_nmux; i++)
		close(h->h_mux[i].ml_fd);
	uv_loop_close(&h->h_loop);
	free(h);
	return -1;
}

void http_stop(http_server *h)
{
	if (h == NULL)
		return;
	uv_async_send(&h->h_stop);
	pthread_join(h->h_thread, NULL);
	uv_loop_close(&h->h_loop);
	for (int i = 0; i < h->h_nmux; i++)
		close(h->h_mux[i].ml_fd);
	free(h);
}
