/*
 * peer_http.c - the one HTTP request a member makes on a peer port: GET /members of etcd's
 * peer handler (the server side is in peer.c, conn_http), blocking, when it joins an
 * existing cluster with a new data dir, before its node loop runs (etcd's
 * GetClusterFromRemotePeers). HTTP/1.0, so that etcd answers without chunked encoding and
 * closes the connection after the body.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "server/peer.h"
#include "server/peer_tls.h"

#define HTTP_MAX_ANSWER (4u << 20) /* a member list is a few KiB; refuse anything huge */

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Splits "http(s)://host:port[/...]" into host and port; *tls set for https. 0 or -1. */
static int split_url(const char *url, char *host, size_t hostlen, char *port, size_t portlen, int *tls)
{
	const char *p;
	if (strncmp(url, "http://", 7) == 0) {
		p = url + 7;
		*tls = 0;
	} else if (strncmp(url, "https://", 8) == 0) {
		p = url + 8;
		*tls = 1;
	} else {
		return -1;
	}
	size_t n = strcspn(p, "/");
	const char *colon;
	const char *h = p;
	size_t hl;
	if (*p == '[') {
		const char *rb = memchr(p, ']', n);
		if (rb == NULL || rb[1] != ':')
			return -1;
		h = p + 1;
		hl = (size_t)(rb - h);
		colon = rb + 1;
	} else {
		colon = memchr(p, ':', n);
		if (colon == NULL)
			return -1;
		hl = (size_t)(colon - p);
	}
	size_t pl = (size_t)(p + n - colon - 1);
	if (hl == 0 || hl >= hostlen || pl == 0 || pl >= portlen)
		return -1;
	memcpy(host, h, hl);
	host[hl] = '\0';
	memcpy(port, colon + 1, pl);
	port[pl] = '\0';
	return 0;
}

/* Waits for ev on fd until deadline: 0, or PEER_ETIMEDOUT. */
static int wait_fd(int fd, short ev, int64_t deadline)
{
	for (;;) {
		int64_t left = deadline - now_ms();
		if (left <= 0)
			return PEER_ETIMEDOUT;
		struct pollfd pfd = {fd, ev, 0};
		int r = poll(&pfd, 1, (int)left);
		if (r > 0)
			return 0;
		if (r < 0 && errno != EINTR)
			return PEER_EADDR;
	}
}

/* A connected non-blocking socket to host:port, or an error with the reason in err. */
static int dial(const char *host, const char *port, int64_t deadline, int *out, char *err, size_t errlen)
{
	struct addrinfo hints = {0}, *ai = NULL;
	hints.ai_socktype = SOCK_STREAM;
	int g = getaddrinfo(host, port, &hints, &ai);
	if (g != 0) {
		snprintf(err, errlen, "cannot resolve %s: %s", host, gai_strerror(g));
		return PEER_EADDR;
	}
	int rc = PEER_EADDR;
	snprintf(err, errlen, "cannot connect");
	for (struct addrinfo *a = ai; a != NULL; a = a->ai_next) {
		int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
		if (fd < 0)
			continue;
		int r = connect(fd, a->ai_addr, a->ai_addrlen);
		if (r != 0 && errno == EINPROGRESS) {
			rc = wait_fd(fd, POLLOUT, deadline);
			int soerr = 0;
			socklen_t sl = sizeof(soerr);
			if (rc == 0 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) == 0 && soerr == 0)
				r = 0;
			else if (rc == 0)
				errno = soerr;
		}
		if (r == 0) {
			freeaddrinfo(ai);
			*out = fd;
			return 0;
		}
		snprintf(err, errlen, "%s", rc == PEER_ETIMEDOUT ? "connect timed out" : strerror(errno));
		rc = rc == PEER_ETIMEDOUT ? rc : PEER_EADDR;
		close(fd);
	}
	freeaddrinfo(ai);
	return rc;
}

/* Writes all of data on fd (or through ssl): 0, or an error. */
static int send_all(int fd, SSL *ssl, const char *data, size_t len, int64_t deadline)
{
	while (len > 0) {
		ssize_t n;
		if (ssl != NULL) {
			int r = SSL_write(ssl, data, (int)len);
			if (r <= 0) {
				int e = SSL_get_error(ssl, r);
				if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
					return PEER_ETLS;
				if (wait_fd(fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline) != 0)
					return PEER_ETIMEDOUT;
				continue;
			}
			n = r;
		} else {
			n = send(fd, data, len, MSG_NOSIGNAL);
			if (n < 0) {
				if (errno != EAGAIN && errno != EINTR)
					return PEER_EADDR;
				if (wait_fd(fd, POLLOUT, deadline) != 0)
					return PEER_ETIMEDOUT;
				continue;
			}
		}
		data += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Reads until the other side closes: the whole answer into *buf (NUL-ended), *len. */
static int recv_all(int fd, SSL *ssl, char **buf, size_t *len, int64_t deadline)
{
	size_t cap = 4096, n = 0;
	char *b = malloc(cap);
	if (b == NULL)
		return PEER_ENOMEM;
	for (;;) {
		if (n + 1 >= cap) {
			if (cap >= HTTP_MAX_ANSWER) {
				free(b);
				return PEER_EINVAL;
			}
			char *nb = realloc(b, cap * 2);
			if (nb == NULL) {
				free(b);
				return PEER_ENOMEM;
			}
			b = nb;
			cap *= 2;
		}
		ssize_t r;
		if (ssl != NULL) {
			int s = SSL_read(ssl, b + n, (int)(cap - n - 1));
			if (s <= 0) {
				int e = SSL_get_error(ssl, s);
				if (e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && n > 0))
					break; /* close_notify, or a plain close after the answer */
				if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
					free(b);
					return PEER_ETLS;
				}
				if (wait_fd(fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline) != 0) {
					free(b);
					return PEER_ETIMEDOUT;
				}
				continue;
			}
			r = s;
		} else {
			r = recv(fd, b + n, cap - n - 1, 0);
			if (r == 0)
				break;
			if (r < 0) {
				if (errno != EAGAIN && errno != EINTR) {
					free(b);
					return PEER_EADDR;
				}
				if (wait_fd(fd, POLLIN, deadline) != 0) {
					free(b);
					return PEER_ETIMEDOUT;
				}
				continue;
			}
		}
		n += (size_t)r;
	}
	b[n] = '\0';
	*buf = b;
	*len = n;
	return 0;
}

/* As peer.c's dialer: peer_tls__check_cert on every certificate OpenSSL accepted. */
static int verify_cb(int ok, X509_STORE_CTX *xs)
{
	SSL *ssl = X509_STORE_CTX_get_ex_data(xs, SSL_get_ex_data_X509_STORE_CTX_idx());
	const struct peer_tls *t = ssl != NULL ? SSL_get_app_data(ssl) : NULL;
	X509 *cert = X509_STORE_CTX_get_current_cert(xs);
	if (!ok || t == NULL || cert == NULL)
		return ok;
	char why[256];
	int e = peer_tls__check_cert(t, cert, X509_STORE_CTX_get_error_depth(xs), 0, "", why, sizeof(why));
	if (e == X509_V_OK)
		return 1;
	X509_STORE_CTX_set_error(xs, e);
	return 0;
}

/* The TLS client handshake on fd, verifying the host as peer.c's dialer does. */
static int tls_connect(SSL **out, const struct peer_tls *tls, int fd, const char *host, int64_t deadline,
		       char *err, size_t errlen)
{
	SSL *ssl = SSL_new(tls->pt_client);
	if (ssl == NULL || SSL_set_fd(ssl, fd) != 1) {
		SSL_free(ssl);
		ERR_clear_error();
		snprintf(err, errlen, "out of memory");
		return PEER_ENOMEM;
	}
	SSL_set_app_data(ssl, (void *)tls);
	SSL_set_verify(ssl, SSL_get_verify_mode(ssl), verify_cb);
	if (tls->pt_verify) {
		X509_VERIFY_PARAM *vp = SSL_get0_param(ssl);
		if (X509_VERIFY_PARAM_set1_ip_asc(vp, host) != 1) {
			ERR_clear_error();
			SSL_set_tlsext_host_name(ssl, host);
			X509_VERIFY_PARAM_set1_host(vp, host, 0);
		}
	}
	for (;;) {
		int r = SSL_connect(ssl);
		if (r == 1)
			break;
		int e = SSL_get_error(ssl, r);
		if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
			if (wait_fd(fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline) == 0)
				continue;
			snprintf(err, errlen, "TLS handshake timed out");
			SSL_free(ssl);
			return PEER_ETIMEDOUT;
		}
		unsigned long code = ERR_peek_last_error();
		const char *reason = code != 0 ? ERR_reason_error_string(code) : NULL;
		long vr = SSL_get_verify_result(ssl);
		snprintf(err, errlen, "tls: %s%s%s", reason != NULL ? reason : "handshake failed",
			 vr != X509_V_OK ? ": " : "", vr != X509_V_OK ? X509_verify_cert_error_string(vr) : "");
		ERR_clear_error();
		SSL_free(ssl);
		return PEER_ETLS;
	}
	*out = ssl;
	return 0;
}

/* The value of header name (case-insensitive) in the head [h, end), or NULL. */
static const char *header(const char *h, const char *end, const char *name, size_t *vlen)
{
	size_t nl = strlen(name);
	for (const char *line = strstr(h, "\r\n"); line != NULL && line < end; line = strstr(line + 2, "\r\n")) {
		const char *s = line + 2;
		if (s + nl + 1 <= end && strncasecmp(s, name, nl) == 0 && s[nl] == ':') {
			const char *v = s + nl + 1;
			while (*v == ' ' || *v == '\t')
				v++;
			const char *e = strstr(v, "\r\n");
			*vlen = e != NULL ? (size_t)(e - v) : strlen(v);
			return v;
		}
	}
	return NULL;
}

/* Why a send or a read failed: OpenSSL's reason for a TLS failure ("tls: ..."). */
static const char *tls_reason(int rc)
{
	static _Thread_local char buf[200];
	unsigned long code = rc == PEER_ETLS ? ERR_peek_last_error() : 0;
	const char *reason = code != 0 ? ERR_reason_error_string(code) : NULL;
	if (reason == NULL)
		return peer_strerror(rc);
	snprintf(buf, sizeof(buf), "tls: %s", reason);
	ERR_clear_error();
	return buf;
}

int peer_http_get_members(const char *url, const peer_tls *tls, unsigned timeout_ms, char **body,
			  uint64_t *cluster_id, char *err, size_t errlen)
{
	char host[256], port[16];
	int is_tls = 0;
	int64_t deadline = now_ms() + timeout_ms;
	*body = NULL;
	*cluster_id = 0;
	if (split_url(url, host, sizeof(host), port, sizeof(port), &is_tls) != 0) {
		snprintf(err, errlen, "not an http(s)://host:port URL");
		return PEER_EADDR;
	}
	if (is_tls && tls == NULL) {
		snprintf(err, errlen, "an https peer URL without peer TLS");
		return PEER_ETLS;
	}
	int fd;
	int rc = dial(host, port, deadline, &fd, err, errlen);
	if (rc)
		return rc;
	SSL *ssl = NULL;
	if (is_tls)
		rc = tls_connect(&ssl, tls, fd, host, deadline, err, errlen);
	char req[512];
	int rl = snprintf(req, sizeof(req), "GET /members HTTP/1.0\r\nHost: %s:%s\r\n\r\n", host, port);
	char *ans = NULL;
	size_t alen = 0;
	if (rc == 0) {
		rc = send_all(fd, ssl, req, (size_t)rl, deadline);
		if (rc)
			snprintf(err, errlen, "cannot send the request: %s", tls_reason(rc));
	}
	if (rc == 0) {
		/* TLS 1.3: a refused client certificate shows here, as the server's alert. */
		rc = recv_all(fd, ssl, &ans, &alen, deadline);
		if (rc)
			snprintf(err, errlen, "cannot read the answer: %s", tls_reason(rc));
	}
	if (ssl != NULL) {
		SSL_free(ssl);
		ERR_clear_error();
	}
	close(fd);
	if (rc)
		return rc;
	const char *end = strstr(ans, "\r\n\r\n");
	int status = 0;
	if (end == NULL || sscanf(ans, "HTTP/1.%*d %d", &status) != 1 || status != 200) {
		snprintf(err, errlen, "answer: %.*s", (int)strcspn(ans, "\r\n"), ans);
		free(ans);
		return PEER_EINVAL;
	}
	size_t vl = 0;
	const char *cid = header(ans, end, "X-Etcd-Cluster-Id", &vl);
	if (cid != NULL)
		*cluster_id = strtoull(cid, NULL, 16);
	size_t hl = (size_t)(end + 4 - ans);
	memmove(ans, ans + hl, alen - hl + 1);
	*body = ans;
	return 0;
}
