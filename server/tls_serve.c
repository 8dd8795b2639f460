/*
 * tls_serve.c - client TLS, ended by Keelson itself with OpenSSL, as etcd's Go listener does
 * it: the TLS version range (--tls-min-version, --tls-max-version), --cipher-suites, client
 * certificates checked against --trusted-ca-file and --client-crl-file, and the certificate
 * files read again when they change, so new connections get a replaced certificate.
 *
 * http.c accepts every client connection and hands the ones that start with a TLS handshake
 * here (so http and https URLs may share a port, as etcd's cmux allows). Each TLS connection
 * has a thread: it completes the handshake, then either answers one HTTP/1 request (/health,
 * /version, /metrics) or, for HTTP/2 (gRPC), passes the plaintext through a socketpair whose
 * other end gRPC core serves, with the client certificate's CN kept for auth.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <sys/prctl.h>

#include "server/server.h"

/* A client gets this long for its handshake and first request. */
#define TLS_SETUP_TIMEOUT_MS 10000
/* How often a waiting thread looks at the stop flag. */
#define TLS_POLL_SLICE_MS 100
#define TLS_MAX_FILES 4

/* What a file was when the context was built: a change means build again. */
typedef struct file_stamp {
	const char *fs_path; /* NULL: unused */
	struct timespec fs_mtime;
	off_t fs_size;
	ino_t fs_ino;
} file_stamp;

struct tls_server {
	pthread_mutex_t ts_lock;
	pthread_cond_t ts_idle;
	SSL_CTX *ts_ctx; /* the current context (a reference); connections take their own */
	file_stamp ts_files[TLS_MAX_FILES];
	/* The settings, owned copies. */
	char *ts_cert, *ts_key, *ts_ca, *ts_crl, *ts_ciphers;
	int ts_min, ts_max; /* OpenSSL protocol versions; 0: library's bound */
	int ts_verify;      /* require and verify a client certificate */
	server_ctx *ts_sc;
	api_server *ts_api;
	int ts_busy; /* threads that may still touch ts_sc or ts_api */
	int ts_stopping;
};

static void stamp(file_stamp *f, const char *path)
{
	memset(f, 0, sizeof(*f));
	f->fs_path = path;
	struct stat st;
	if (path != NULL && stat(path, &st) == 0) {
		f->fs_mtime = st.st_mtim;
		f->fs_size = st.st_size;
		f->fs_ino = st.st_ino;
	}
}

static int stamp_changed(const file_stamp *f)
{
	if (f->fs_path == NULL)
		return 0;
	file_stamp now;
	stamp(&now, f->fs_path);
	return now.fs_mtime.tv_sec != f->fs_mtime.tv_sec || now.fs_mtime.tv_nsec != f->fs_mtime.tv_nsec ||
	       now.fs_size != f->fs_size || now.fs_ino != f->fs_ino;
}

static void openssl_reason(char *why, size_t len, const char *what)
{
	unsigned long code = ERR_peek_last_error();
	const char *r = code ? ERR_reason_error_string(code) : NULL;
	snprintf(why, len, "%s: %s", what, r ? r : "failed");
	ERR_clear_error();
}

/* Go's crypto/tls offers HTTP/2 ("h2") and HTTP/1.1 as etcd configures it; a client that
 * offers http/1.1 (curl) gets it, so the HTTP endpoints answer it in HTTP/1. */
static int select_alpn(SSL *ssl, const unsigned char **out, unsigned char *outlen, const unsigned char *in,
		       unsigned int inlen, void *arg)
{
	static const char *const prefs[] = {"http/1.1", "h2"};
	for (size_t k = 0; k < 2; k++) {
		size_t plen = strlen(prefs[k]);
		for (unsigned int i = 0; i < inlen;) {
			unsigned int n = in[i];
			if (i + 1 + n > inlen)
				break;
			if (n == plen && memcmp(in + i + 1, prefs[k], n) == 0) {
				*out = in + i + 1;
				*outlen = (unsigned char)n;
				return SSL_TLSEXT_ERR_OK;
			}
			i += 1 + n;
		}
	}
	return SSL_TLSEXT_ERR_NOACK;
}

static X509_CRL *read_crl(const char *path)
{
	FILE *f = fopen(path, "rb");
	if (f == NULL)
		return NULL;
	/* Go's x509.ParseCRL takes PEM or DER. */
	X509_CRL *crl = PEM_read_X509_CRL(f, NULL, NULL, NULL);
	if (crl == NULL) {
		ERR_clear_error();
		rewind(f);
		crl = d2i_X509_CRL_fp(f, NULL);
	}
	fclose(f);
	return crl;
}

/* The context's --client-crl-file (ex data, freed with the context). */
static int crl_index = -1;

/* etcd's checkCRL: a client certificate whose serial the CRL lists is refused; a CRL is not
 * needed for every issuer (OpenSSL's own CRL check would want one for each). */
static int verify_with_crl(int ok, X509_STORE_CTX *x)
{
	if (!ok)
		return 0;
	SSL *ssl = X509_STORE_CTX_get_ex_data(x, SSL_get_ex_data_X509_STORE_CTX_idx());
	X509_CRL *crl = ssl ? SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), crl_index) : NULL;
	X509 *cert = X509_STORE_CTX_get_current_cert(x);
	X509_REVOKED *rev = NULL;
	if (crl != NULL && cert != NULL &&
	    X509_CRL_get0_by_serial(crl, &rev, (ASN1_INTEGER *)X509_get0_serialNumber(cert)) == 1) {
		X509_STORE_CTX_set_error(x, X509_V_ERR_CERT_REVOKED);
		return 0;
	}
	return 1;
}

static void free_crl_data(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp)
{
	X509_CRL_free(ptr);
}

/* A context from the files as they are now; NULL with the reason in why. */
static SSL_CTX *build_ctx(const tls_server *t, char *why, size_t len)
{
	SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
	if (ctx == NULL) {
		openssl_reason(why, len, "cannot create a TLS context");
		return NULL;
	}
	SSL_CTX_set_min_proto_version(ctx, t->ts_min);
	SSL_CTX_set_max_proto_version(ctx, t->ts_max);
	SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
	SSL_CTX_set_alpn_select_cb(ctx, select_alpn, NULL);
	if (t->ts_ciphers != NULL && SSL_CTX_set_cipher_list(ctx, t->ts_ciphers) != 1) {
		openssl_reason(why, len, "cannot use --cipher-suites");
		goto fail;
	}
	if (SSL_CTX_use_certificate_chain_file(ctx, t->ts_cert) != 1) {
		openssl_reason(why, len, "cannot use --cert-file");
		goto fail;
	}
	if (SSL_CTX_use_PrivateKey_file(ctx, t->ts_key, SSL_FILETYPE_PEM) != 1 || SSL_CTX_check_private_key(ctx) != 1) {
		openssl_reason(why, len, "cannot use --key-file");
		goto fail;
	}
	if (t->ts_ca != NULL) {
		if (SSL_CTX_load_verify_locations(ctx, t->ts_ca, NULL) != 1) {
			openssl_reason(why, len, "cannot use --trusted-ca-file");
			goto fail;
		}
		STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(t->ts_ca);
		if (names != NULL)
			SSL_CTX_set_client_CA_list(ctx, names);
		ERR_clear_error();
	}
	if (t->ts_crl != NULL) {
		X509_CRL *crl = read_crl(t->ts_crl);
		if (crl == NULL) {
			openssl_reason(why, len, "cannot read --client-crl-file");
			goto fail;
		}
		SSL_CTX_set_ex_data(ctx, crl_index, crl); /* freed with the context */
	}
	if (t->ts_verify)
		SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, verify_with_crl);
	else
		SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
	return ctx;
fail:
	SSL_CTX_free(ctx);
	return NULL;
}

static void stamp_all(tls_server *t)
{
	const char *paths[TLS_MAX_FILES] = {t->ts_cert, t->ts_key, t->ts_ca, t->ts_crl};
	for (int i = 0; i < TLS_MAX_FILES; i++)
		stamp(&t->ts_files[i], paths[i]);
}

/* The context for a new connection (a reference the caller frees), built again first if a
 * file changed. A change that does not load (a pair half written, say) keeps the old
 * certificate and is tried again on the next connection. */
static SSL_CTX *current_ctx(tls_server *t)
{
	pthread_mutex_lock(&t->ts_lock);
	int changed = 0;
	for (int i = 0; i < TLS_MAX_FILES; i++)
		changed |= stamp_changed(&t->ts_files[i]);
	if (changed) {
		char why[256];
		SSL_CTX *fresh = build_ctx(t, why, sizeof(why));
		if (fresh != NULL) {
			SSL_CTX_free(t->ts_ctx);
			t->ts_ctx = fresh;
			stamp_all(t);
			log_at(LOG_INFO, "reloaded client TLS certificate files", "cert-file", t->ts_cert, NULL);
		} else {
			log_at(LOG_WARN, "cannot reload client TLS files; keeping the previous ones", "error", why, NULL);
		}
	}
	SSL_CTX *ctx = t->ts_ctx;
	SSL_CTX_up_ref(ctx);
	pthread_mutex_unlock(&t->ts_lock);
	return ctx;
}

/* "TLS1.2"/"TLS1.3"/"" as OpenSSL's version (0 for ""); -1 for anything else. */
static int tls_version(const char *s)
{
	if (s == NULL || s[0] == '\0')
		return 0;
	if (strcmp(s, "TLS1.2") == 0)
		return TLS1_2_VERSION;
	if (strcmp(s, "TLS1.3") == 0)
		return TLS1_3_VERSION;
	return -1;
}

int tls_check_versions(const config *cfg, char *why, size_t len)
{
	int min = tls_version(cfg->tls_min_version), max = tls_version(cfg->tls_max_version);
	const char *bad = min < 0 ? cfg->tls_min_version : max < 0 ? cfg->tls_max_version : NULL;
	if (bad != NULL) {
		snprintf(why, len, "unexpected TLS version \"%.64s\" (must be one of: TLS1.2, TLS1.3)", bad);
		return -1;
	}
	if (max != 0 && min > max) {
		snprintf(why, len, "min version (%s) is greater than max version (%s)", cfg->tls_min_version,
			 cfg->tls_max_version);
		return -1;
	}
	/* Go cannot choose TLS 1.3 suites. */
	if (min == TLS1_3_VERSION && cfg->cipher_suites[0]) {
		snprintf(why, len, "cipher suites cannot be configured when only TLS1.3 is enabled");
		return -1;
	}
	return 0;
}

int tls_version_bounds(const config *cfg, int *min, int *max)
{
	*min = tls_version(cfg->tls_min_version);
	*max = tls_version(cfg->tls_max_version);
	if (*min < 0 || *max < 0)
		return -1;
	if (*min == 0)
		*min = TLS1_2_VERSION; /* etcd's floor */
	return 0;
}

static char *dup_or_null(const char *s)
{
	return s != NULL && s[0] ? strdup(s) : NULL;
}

int tls_server_new(tls_server **out, const tls_server_options *o)
{
	*out = NULL;
	if (crl_index < 0)
		crl_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, free_crl_data);
	tls_server *t = calloc(1, sizeof(*t));
	if (t == NULL)
		return -1;
	pthread_mutex_init(&t->ts_lock, NULL);
	pthread_cond_init(&t->ts_idle, NULL);
	t->ts_cert = dup_or_null(o->to_cert_file);
	t->ts_key = dup_or_null(o->to_key_file);
	t->ts_ca = dup_or_null(o->to_trusted_ca_file);
	t->ts_crl = dup_or_null(o->to_crl_file);
	t->ts_ciphers = dup_or_null(o->to_ciphers);
	t->ts_min = o->to_min_version;
	t->ts_max = o->to_max_version;
	/* etcd 3.4 refuses a client without a verified certificate as soon as it has trusted
	 * CAs, --client-cert-auth or not (observed with etcd 3.4.23; the flag decides only
	 * whether the certificate's CN may stand for the user). */
	t->ts_verify = o->to_client_cert_auth || t->ts_ca != NULL;
	t->ts_sc = o->to_sc;
	t->ts_api = o->to_api;
	char why[256];
	stamp_all(t);
	t->ts_ctx = t->ts_cert && t->ts_key ? build_ctx(t, why, sizeof(why)) : NULL;
	if (t->ts_ctx == NULL) {
		if (!(t->ts_cert && t->ts_key))
			snprintf(why, sizeof(why), "no --cert-file and --key-file");
		log_at(LOG_FATAL, "cannot set up client TLS", "error", why, NULL);
		tls_server_free(t);
		return -1;
	}
	*out = t;
	return 0;
}

void tls_server_stop(tls_server *t)
{
	if (t == NULL)
		return;
	pthread_mutex_lock(&t->ts_lock);
	t->ts_stopping = 1;
	while (t->ts_busy > 0)
		pthread_cond_wait(&t->ts_idle, &t->ts_lock);
	pthread_mutex_unlock(&t->ts_lock);
}

void tls_server_free(tls_server *t)
{
	if (t == NULL)
		return;
	tls_server_stop(t);
	SSL_CTX_free(t->ts_ctx);
	free(t->ts_cert);
	free(t->ts_key);
	free(t->ts_ca);
	free(t->ts_crl);
	free(t->ts_ciphers);
	pthread_mutex_destroy(&t->ts_lock);
	pthread_cond_destroy(&t->ts_idle);
	free(t);
}

/* ---- one connection ---- */

typedef struct tls_conn {
	tls_server *tc_srv;
	int tc_fd;
	SSL *tc_ssl;
} tls_conn;

static int stopping(tls_server *t)
{
	pthread_mutex_lock(&t->ts_lock);
	int s = t->ts_stopping;
	pthread_mutex_unlock(&t->ts_lock);
	return s;
}

static long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

/* Waits for fd to be ready for what OpenSSL asked; 0, or -1 on timeout, stop or error. */
static int wait_ssl(tls_conn *c, int ssl_err, long deadline)
{
	short ev = ssl_err == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN;
	for (;;) {
		if (stopping(c->tc_srv) || now_ms() >= deadline)
			return -1;
		struct pollfd p = {.fd = c->tc_fd, .events = ev};
		int n = poll(&p, 1, TLS_POLL_SLICE_MS);
		if (n > 0)
			return 0;
		if (n < 0 && errno != EINTR)
			return -1;
	}
}

/* Reads decrypted bytes before the deadline; >0, or 0 at the end, -1 on error or timeout. */
static int setup_read(tls_conn *c, char *buf, int len, long deadline)
{
	for (;;) {
		int n = SSL_read(c->tc_ssl, buf, len);
		if (n > 0)
			return n;
		int e = SSL_get_error(c->tc_ssl, n);
		if (e == SSL_ERROR_ZERO_RETURN)
			return 0;
		if ((e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) || wait_ssl(c, e, deadline) != 0)
			return -1;
	}
}

static int write_all_ssl(tls_conn *c, const char *buf, size_t len, long deadline)
{
	while (len > 0) {
		int n = SSL_write(c->tc_ssl, buf, (int)len);
		if (n > 0) {
			buf += n;
			len -= (size_t)n;
			continue;
		}
		int e = SSL_get_error(c->tc_ssl, n);
		if ((e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) || wait_ssl(c, e, deadline) != 0)
			return -1;
	}
	return 0;
}

/* The verified client certificate's CN into buf, or NULL. */
static const char *client_cn(SSL *ssl, char *buf, size_t len)
{
	if (SSL_get_verify_result(ssl) != X509_V_OK)
		return NULL;
	X509 *x = SSL_get1_peer_certificate(ssl);
	if (x == NULL)
		return NULL;
	int n = X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, buf, (int)len);
	X509_free(x);
	return n > 0 ? buf : NULL;
}

/*
 * Copies between the TLS connection and plain (gRPC's end) until either side ends. first
 * holds plaintext already read from the client. Nonblocking both ways: a direction whose
 * receiver is full waits without holding up the other.
 */
static void relay(tls_conn *c, int plain, const char *first, size_t first_len)
{
	char up[16384], down[16384]; /* up: client to gRPC; down: gRPC to client */
	size_t up_len = first_len, up_off = 0, down_len = 0, down_off = 0;
	memcpy(up, first, first_len);
	int client_eof = 0, plain_eof = 0;
	for (;;) {
		int progress = 0;
		/* client -> up buffer */
		if (!client_eof && up_len == 0) {
			int n = SSL_read(c->tc_ssl, up, sizeof(up));
			if (n > 0) {
				up_len = (size_t)n;
				up_off = 0;
				progress = 1;
			} else {
				int e = SSL_get_error(c->tc_ssl, n);
				if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
					client_eof = 1;
					shutdown(plain, SHUT_WR);
				}
			}
		}
		/* up buffer -> gRPC */
		if (up_len > 0) {
			ssize_t w = send(plain, up + up_off, up_len - up_off, MSG_NOSIGNAL | MSG_DONTWAIT);
			if (w > 0) {
				up_off += (size_t)w;
				if (up_off == up_len)
					up_len = up_off = 0;
				progress = 1;
			} else if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
				break;
			}
		}
		/* gRPC -> down buffer */
		if (!plain_eof && down_len == 0) {
			ssize_t r = recv(plain, down, sizeof(down), MSG_DONTWAIT);
			if (r > 0) {
				down_len = (size_t)r;
				down_off = 0;
				progress = 1;
			} else if (r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
				plain_eof = 1;
			}
		}
		/* down buffer -> client */
		if (down_len > 0) {
			int n = SSL_write(c->tc_ssl, down + down_off, (int)(down_len - down_off));
			if (n > 0) {
				down_off += (size_t)n;
				if (down_off == down_len)
					down_len = down_off = 0;
				progress = 1;
			} else {
				int e = SSL_get_error(c->tc_ssl, n);
				if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
					break;
			}
		}
		if (plain_eof && down_len == 0)
			break; /* gRPC closed the connection: close the client's */
		if (client_eof && up_len == 0 && plain_eof)
			break;
		if (progress || SSL_pending(c->tc_ssl) > 0)
			continue;
		struct pollfd p[2] = {{.fd = c->tc_fd}, {.fd = plain}};
		/* OpenSSL may want to read to write or the reverse; both directions poll for input,
		 * and for output while something waits to go out. */
		p[0].events = (short)((client_eof ? 0 : POLLIN) | (down_len ? POLLOUT : 0));
		p[1].events = (short)((plain_eof ? 0 : POLLIN) | (up_len ? POLLOUT : 0));
		if (poll(p, 2, -1) < 0 && errno != EINTR)
			break;
	}
}

/* The HTTP/1 endpoints over TLS: one request, as http.c answers them. */
static void serve_http1(tls_conn *c, char *req, size_t len, size_t cap, long deadline)
{
	while (memmem(req, len, "\r\n\r\n", 4) == NULL && len < cap - 1) {
		int n = setup_read(c, req + len, (int)(cap - 1 - len), deadline);
		if (n <= 0)
			return;
		len += (size_t)n;
	}
	req[len] = '\0';
	size_t out_len = 0;
	char *out = http_response(c->tc_srv->ts_sc, req, &out_len);
	if (out != NULL) {
		write_all_ssl(c, out, out_len, deadline);
		free(out);
	}
	SSL_shutdown(c->tc_ssl);
}

static void *conn_thread(void *arg)
{
	prctl(PR_SET_NAME, "tls-conn"); /* names the thread in top -H, perf, gdb */
	tls_conn *c = arg;
	tls_server *t = c->tc_srv;
	long deadline = now_ms() + TLS_SETUP_TIMEOUT_MS;
	int busy = 1;
	for (;;) {
		ERR_clear_error();
		int n = SSL_accept(c->tc_ssl);
		if (n == 1)
			break;
		int e = SSL_get_error(c->tc_ssl, n);
		if ((e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) || wait_ssl(c, e, deadline) != 0)
			goto done; /* OpenSSL has sent the alert; a refused client is not our error */
	}
	char first[8192];
	int n = 0;
	/* HTTP/2 (gRPC) starts with "PRI * HTTP/2.0"; anything else is an HTTP/1 request. */
	while (n < 3 && (n == 0 || memcmp(first, "PRI", (size_t)n) == 0)) {
		int got = setup_read(c, first + n, (int)sizeof(first) - 1 - n, deadline);
		if (got <= 0)
			goto done;
		n += got;
	}
	if (n < 3 || memcmp(first, "PRI", 3) != 0) {
		serve_http1(c, first, (size_t)n, sizeof(first), deadline);
		goto done;
	}
	int pair[2];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, pair) != 0)
		goto done;
	char cnbuf[256];
	const char *cn = client_cn(c->tc_ssl, cnbuf, sizeof(cnbuf));
	pthread_mutex_lock(&t->ts_lock);
	int stop = t->ts_stopping;
	if (!stop)
		api_server_adopt_fd_cn(t->ts_api, pair[1], cn); /* gRPC owns pair[1] now */
	pthread_mutex_unlock(&t->ts_lock);
	if (stop) {
		close(pair[0]);
		close(pair[1]);
		goto done;
	}
	/* From here on only this connection's own state is touched: the member may stop. */
	pthread_mutex_lock(&t->ts_lock);
	if (--t->ts_busy == 0)
		pthread_cond_broadcast(&t->ts_idle);
	pthread_mutex_unlock(&t->ts_lock);
	busy = 0;
	relay(c, pair[0], first, (size_t)n);
	close(pair[0]);
done:
	SSL_free(c->tc_ssl);
	close(c->tc_fd);
	free(c);
	if (busy) {
		pthread_mutex_lock(&t->ts_lock);
		if (--t->ts_busy == 0)
			pthread_cond_broadcast(&t->ts_idle);
		pthread_mutex_unlock(&t->ts_lock);
	}
	return NULL;
}

void tls_server_serve(tls_server *t, int fd)
{
	tls_conn *c = calloc(1, sizeof(*c));
	SSL_CTX *ctx = current_ctx(t);
	SSL *ssl = ctx ? SSL_new(ctx) : NULL;
	SSL_CTX_free(ctx); /* the SSL holds its own reference */
	if (c == NULL || ssl == NULL || SSL_set_fd(ssl, fd) != 1) {
		SSL_free(ssl);
		free(c);
		close(fd);
		return;
	}
	c->tc_srv = t;
	c->tc_fd = fd;
	c->tc_ssl = ssl;
	pthread_mutex_lock(&t->ts_lock);
	int stop = t->ts_stopping;
	if (!stop)
		t->ts_busy++;
	pthread_mutex_unlock(&t->ts_lock);
	pthread_t th;
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	if (stop || pthread_create(&th, &attr, conn_thread, c) != 0) {
		SSL_free(ssl);
		close(fd);
		free(c);
		if (!stop) {
			pthread_mutex_lock(&t->ts_lock);
			if (--t->ts_busy == 0)
				pthread_cond_broadcast(&t->ts_idle);
			pthread_mutex_unlock(&t->ts_lock);
		}
	}
	pthread_attr_destroy(&attr);
}
