/*
 * http.c - the HTTP endpoints etcd serves beside gRPC: /health, /version and /metrics
 * (Prometheus text), on --listen-metrics-urls. gRPC core owns the client port, so these
 * live on their own listener, with their own libuv loop and thread.
 *
 * One request per connection: read until the end of the headers, answer, close.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "server/server.h"

#define HTTP_MAX_LISTENERS CONFIG_MAX_URLS
#define HTTP_MAX_REQUEST 8192

struct http_server {
	server_ctx *h_sc;
	uv_loop_t h_loop;
	uv_tcp_t h_listen[HTTP_MAX_LISTENERS];
	int h_nlisten;
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

static void metrics_body(server_ctx *sc, sbuf *b)
{
	storage_stats st = {0};
	storage_stat(sc->st, &st);
	uint64_t reqs = 0, commits = 0;
	node_batch_stats(sc->nd, &reqs, &commits);
	sb_printf(b, "# HELP etcd_server_has_leader Whether or not a leader exists. 1 is existence, 0 is not.\n"
		     "# TYPE etcd_server_has_leader gauge\netcd_server_has_leader 1\n");
	sb_printf(b, "# HELP etcd_server_is_leader Whether or not this member is a leader. 1 if is, 0 otherwise.\n"
		     "# TYPE etcd_server_is_leader gauge\netcd_server_is_leader 1\n");
	sb_printf(b, "# HELP etcd_server_proposals_committed_total The total number of consensus proposals committed.\n"
		     "# TYPE etcd_server_proposals_committed_total gauge\netcd_server_proposals_committed_total %llu\n",
		  (unsigned long long)node_applied_index(sc->nd));
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
	uint64_t streams = 0, watchers = 0, slow = 0;
	if (sc->hub)
		watch_hub_stats(sc->hub, &streams, &watchers, &slow);
	sb_printf(b, "# HELP etcd_debugging_mvcc_watch_stream_total Total number of watch streams.\n"
		     "# TYPE etcd_debugging_mvcc_watch_stream_total gauge\netcd_debugging_mvcc_watch_stream_total %llu\n",
		  (unsigned long long)streams);
	sb_printf(b, "# HELP etcd_debugging_mvcc_watcher_total Total number of watchers.\n"
		     "# TYPE etcd_debugging_mvcc_watcher_total gauge\netcd_debugging_mvcc_watcher_total %llu\n",
		  (unsigned long long)watchers);
	sb_printf(b, "# HELP keelson_watch_slow_total Times a watcher fell behind and moved to catch-up.\n"
		     "# TYPE keelson_watch_slow_total counter\nkeelson_watch_slow_total %llu\n",
		  (unsigned long long)slow);
	sb_printf(b, "# HELP keelson_batch_requests_total Writes applied by the node loop.\n"
		     "# TYPE keelson_batch_requests_total counter\nkeelson_batch_requests_total %llu\n",
		  (unsigned long long)reqs);
	sb_printf(b, "# HELP keelson_batch_commits_total Write batches committed, each one LMDB transaction and one fsync.\n"
		     "# TYPE keelson_batch_commits_total counter\nkeelson_batch_commits_total %llu\n",
		  (unsigned long long)commits);
}

static void answer(http_conn *c)
{
	server_ctx *sc = c->hc_srv->h_sc;
	sbuf body = {0}, out = {0};
	const char *status = "200 OK", *ctype = "text/plain; charset=utf-8";
	char method[16] = "", path[256] = "";
	if (sscanf(c->hc_buf, "%15s %255s", method, path) != 2) {
		status = "400 Bad Request";
		sb_printf(&body, "bad request\n");
	} else if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
		status = "405 Method Not Allowed";
		sb_printf(&body, "Method Not Allowed\n");
	} else if (strcmp(path, "/health") == 0 || strncmp(path, "/health?", 8) == 0) {
		sb_printf(&body, "{\"health\":\"true\"}");
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
	c->hc_resp = out.p;
	c->hc_write.data = c;
	uv_buf_t buf = uv_buf_init(out.p, (unsigned)out.len);
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

static void close_walk(uv_handle_t *h, void *arg)
{
	if (!uv_is_closing(h))
		uv_close(h, h->type == UV_TCP && h->data != arg ? conn_closed : NULL);
}

static void on_stop(uv_async_t *a)
{
	http_server *h = a->data;
	uv_walk(&h->h_loop, close_walk, h);
}

static void *http_thread(void *arg)
{
	http_server *h = arg;
	uv_run(&h->h_loop, UV_RUN_DEFAULT);
	return NULL;
}

int http_start(http_server **out, server_ctx *sc, const config_urls *urls)
{
	*out = NULL;
	if (urls->n == 0)
		return 0;
	http_server *h = calloc(1, sizeof(*h));
	if (h == NULL)
		return -1;
	h->h_sc = sc;
	uv_loop_init(&h->h_loop);
	uv_async_init(&h->h_loop, &h->h_stop, on_stop);
	h->h_stop.data = h;
	for (int i = 0; i < urls->n; i++) {
		char hp[256], host[256];
		struct sockaddr_storage addr;
		if (config_url_host_port(urls->url[i], hp, sizeof(hp)) != 0)
			goto fail;
		char *colon = strrchr(hp, ':');
		int port = atoi(colon + 1);
		snprintf(host, sizeof(host), "%.*s", (int)(colon - hp), hp);
		if (strcmp(host, "localhost") == 0)
			strcpy(host, "127.0.0.1");
		if (host[0] == '[') {
			memmove(host, host + 1, strlen(host));
			host[strlen(host) - 1] = '\0';
			if (uv_ip6_addr(host, port, (struct sockaddr_in6 *)&addr) != 0)
				goto fail;
		} else if (uv_ip4_addr(host, port, (struct sockaddr_in *)&addr) != 0) {
			goto fail;
		}
		uv_tcp_t *t = &h->h_listen[h->h_nlisten++];
		uv_tcp_init(&h->h_loop, t);
		t->data = h;
		if (uv_tcp_bind(t, (struct sockaddr *)&addr, 0) != 0 ||
		    uv_listen((uv_stream_t *)t, 128, on_connection) != 0) {
			log_at(LOG_ERROR, "cannot listen for metrics", "url", urls->url[i], NULL);
			goto fail;
		}
	}
	if (pthread_create(&h->h_thread, NULL, http_thread, h) != 0)
		goto fail;
	*out = h;
	return 0;
fail:
	uv_walk(&h->h_loop, close_walk, h);
	uv_run(&h->h_loop, UV_RUN_DEFAULT);
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
	free(h);
}
