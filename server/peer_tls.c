/*
 * peer_tls.c - the peer transport's TLS contexts, built from etcd's --peer-* files, and
 * etcd's --peer-auto-tls self-signed certificate (see peer.h). The per-connection TLS is in
 * peer.c.
 */
#include "server/peer_tls.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <arpa/inet.h>

#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

/* "what: OpenSSL's reason" into err, and clears OpenSSL's error queue. */
static void tls_err(char *err, size_t errlen, const char *what, const char *path)
{
	unsigned long code = ERR_peek_last_error();
	const char *reason = code != 0 ? ERR_reason_error_string(code) : NULL;
	if (err != NULL && errlen > 0)
		snprintf(err, errlen, "%s%s%s: %s", what, path ? " " : "", path ? path : "",
			 reason != NULL ? reason : (errno != 0 ? strerror(errno) : "failed"));
	ERR_clear_error();
}

static int is_set(const char *s)
{
	return s != NULL && s[0] != '\0';
}

static SSL_CTX *ctx_new(const SSL_METHOD *m, const peer_tls_config *cfg, char *err, size_t errlen)
{
	SSL_CTX *ctx = SSL_CTX_new(m);
	if (ctx == NULL) {
		tls_err(err, errlen, "cannot create a TLS context", NULL);
		return NULL;
	}
	/* etcd's floor; no renegotiation (a peer connection never needs it), no session
	 * tickets (connections are long-lived and never resumed). */
	SSL_CTX_set_min_proto_version(ctx, cfg->ptc_min_version ? cfg->ptc_min_version : TLS1_2_VERSION);
	SSL_CTX_set_max_proto_version(ctx, cfg->ptc_max_version);
	SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_TICKET);
	SSL_CTX_set_num_tickets(ctx, 0);
	errno = 0;
	if (SSL_CTX_use_certificate_chain_file(ctx, cfg->ptc_cert_file) != 1) {
		tls_err(err, errlen, "cannot use --peer-cert-file", cfg->ptc_cert_file);
		goto fail;
	}
	errno = 0;
	if (SSL_CTX_use_PrivateKey_file(ctx, cfg->ptc_key_file, SSL_FILETYPE_PEM) != 1) {
		tls_err(err, errlen, "cannot use --peer-key-file", cfg->ptc_key_file);
		goto fail;
	}
	if (SSL_CTX_check_private_key(ctx) != 1) {
		tls_err(err, errlen, "--peer-key-file does not match --peer-cert-file",
			cfg->ptc_key_file);
		goto fail;
	}
	errno = 0;
	if (is_set(cfg->ptc_trusted_ca_file)) {
		if (SSL_CTX_load_verify_locations(ctx, cfg->ptc_trusted_ca_file, NULL) != 1) {
			tls_err(err, errlen, "cannot use --peer-trusted-ca-file",
				cfg->ptc_trusted_ca_file);
			goto fail;
		}
	} else if (SSL_CTX_set_default_verify_paths(ctx) != 1) {
		/* As Go without RootCAs: the system's roots. */
		ERR_clear_error();
	}
	return ctx;
fail:
	SSL_CTX_free(ctx);
	return NULL;
}

static X509_CRL *crl_read(const char *path, char *err, size_t errlen)
{
	errno = 0;
	FILE *f = fopen(path, "r");
	if (f == NULL) {
		if (err != NULL)
			snprintf(err, errlen, "cannot read --peer-crl-file %s: %s", path, strerror(errno));
		return NULL;
	}
	X509_CRL *crl = PEM_read_X509_CRL(f, NULL, NULL, NULL);
	if (crl == NULL) {
		/* etcd reads DER as well (x509.ParseCRL takes both). */
		rewind(f);
		ERR_clear_error();
		crl = d2i_X509_CRL_fp(f, NULL);
	}
	fclose(f);
	if (crl == NULL)
		tls_err(err, errlen, "cannot parse --peer-crl-file", path);
	return crl;
}

int peer_tls_new(peer_tls **out, const peer_tls_config *cfg, char *err, size_t errlen)
{
	if (err != NULL && errlen > 0)
		err[0] = '\0';
	if (out == NULL || cfg == NULL || !is_set(cfg->ptc_cert_file) || !is_set(cfg->ptc_key_file)) {
		if (err != NULL)
			snprintf(err, errlen, "KeyFile and CertFile are not presented");
		return PEER_EINVAL;
	}
	peer_tls *t = calloc(1, sizeof(*t));
	if (t == NULL)
		return PEER_ENOMEM;
	int rc = PEER_ETLS;
	t->pt_server = ctx_new(TLS_server_method(), cfg, err, errlen);
	if (t->pt_server == NULL)
		goto fail;
	t->pt_client = ctx_new(TLS_client_method(), cfg, err, errlen);
	if (t->pt_client == NULL)
		goto fail;
	/* etcd's ServerConfig: a trusted CA or client-cert-auth means RequireAndVerifyClientCert. */
	t->pt_verify_client = is_set(cfg->ptc_trusted_ca_file) || cfg->ptc_client_cert_auth;
	t->pt_verify = !cfg->ptc_skip_verify;
	t->pt_check_san = !cfg->ptc_skip_client_san;
	if (t->pt_verify_client) {
		SSL_CTX_set_verify(t->pt_server, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
		if (is_set(cfg->ptc_trusted_ca_file)) {
			STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(cfg->ptc_trusted_ca_file);
			if (names != NULL)
				SSL_CTX_set_client_CA_list(t->pt_server, names);
			ERR_clear_error();
		}
	} else {
		SSL_CTX_set_verify(t->pt_server, SSL_VERIFY_NONE, NULL);
	}
	SSL_CTX_set_verify(t->pt_client, t->pt_verify ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, NULL);
	if (is_set(cfg->ptc_crl_file)) {
		t->pt_crl = crl_read(cfg->ptc_crl_file, err, errlen);
		if (t->pt_crl == NULL)
			goto fail;
	}
	if (is_set(cfg->ptc_allowed_cn)) {
		t->pt_allowed_cn = strdup(cfg->ptc_allowed_cn);
		if (t->pt_allowed_cn == NULL) {
			rc = PEER_ENOMEM;
			goto fail;
		}
	}
	*out = t;
	return 0;
fail:
	peer_tls_free(t);
	return rc;
}

void peer_tls_free(peer_tls *t)
{
	if (t == NULL)
		return;
	peer_tls__release(t);
	free(t);
}

int peer_tls__hold(struct peer_tls *dst, const struct peer_tls *src)
{
	memset(dst, 0, sizeof(*dst));
	if (src->pt_allowed_cn != NULL && (dst->pt_allowed_cn = strdup(src->pt_allowed_cn)) == NULL)
		return PEER_ENOMEM;
	SSL_CTX_up_ref(src->pt_server);
	SSL_CTX_up_ref(src->pt_client);
	if (src->pt_crl != NULL)
		X509_CRL_up_ref(src->pt_crl);
	dst->pt_server = src->pt_server;
	dst->pt_client = src->pt_client;
	dst->pt_crl = src->pt_crl;
	dst->pt_verify = src->pt_verify;
	dst->pt_verify_client = src->pt_verify_client;
	dst->pt_check_san = src->pt_check_san;
	return 0;
}

void peer_tls__release(struct peer_tls *t)
{
	SSL_CTX_free(t->pt_server);
	SSL_CTX_free(t->pt_client);
	X509_CRL_free(t->pt_crl);
	free(t->pt_allowed_cn);
	memset(t, 0, sizeof(*t));
}

/* The host of "ip:port" or "[ip6]:port" into host. */
static int split_host(const char *addr, char *host, size_t len)
{
	const char *colon = strrchr(addr, ':');
	if (colon == NULL)
		return -1;
	const char *b = addr, *e = colon;
	if (*b == '[' && e > b && e[-1] == ']') {
		b++;
		e--;
	}
	if ((size_t)(e - b) >= len)
		return -1;
	memcpy(host, b, (size_t)(e - b));
	host[e - b] = '\0';
	return 0;
}

/* An IP SAN (4 or 16 bytes) equal to ip (4 or 16 bytes), as Go's net.IP.Equal: an IPv4
 * address equals its IPv4-mapped IPv6 form. */
static int ip_equal(const unsigned char *a, int alen, const unsigned char *b, int blen)
{
	static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
	if (alen == blen)
		return memcmp(a, b, (size_t)alen) == 0;
	const unsigned char *v4 = alen == 4 ? a : b, *v6 = alen == 4 ? b : a;
	return (alen == 4 || blen == 4) && memcmp(v6, mapped, 12) == 0 && memcmp(v6 + 12, v4, 4) == 0;
}

/*
 * etcd's checkSAN (pkg/transport/listener_tls.go), done by every https peer listener on the
 * certificate a dialing member presents: a certificate naming IPs must name the address
 * the connection comes from (else Go's x509 error); one naming DNS names must name it by
 * a reverse lookup of that address (wildcards too) or a forward lookup of a name (else
 * etcd's error). A certificate with no IP or DNS SAN passes. The lookups block: they are
 * done only when the IPs do not already match.
 */
static int check_san(X509 *cert, const char *remote_addr, char *err, size_t errlen)
{
	GENERAL_NAMES *sans = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
	char host[INET6_ADDRSTRLEN + 2];
	unsigned char hip[16];
	int hlen = 0, n_ip = 0, n_dns = 0, rc = X509_V_OK;
	char ips[160] = "", dns[160] = "";
	if (sans == NULL)
		return X509_V_OK;
	if (remote_addr == NULL || split_host(remote_addr, host, sizeof(host)) != 0)
		goto done; /* Go's SplitHostPort error: not reachable with an accepted TCP peer */
	hlen = inet_pton(AF_INET, host, hip) == 1 ? 4 : inet_pton(AF_INET6, host, hip) == 1 ? 16 : 0;
	int ip_ok = 0;
	for (int i = 0; i < sk_GENERAL_NAME_num(sans); i++) {
		GENERAL_NAME *g = sk_GENERAL_NAME_value(sans, i);
		if (g->type == GEN_IPADD) {
			const unsigned char *d = ASN1_STRING_get0_data(g->d.iPAddress);
			int l = ASN1_STRING_length(g->d.iPAddress);
			char text[INET6_ADDRSTRLEN] = "?";
			if (l == 4 || l == 16)
				inet_ntop(l == 4 ? AF_INET : AF_INET6, d, text, sizeof(text));
			size_t used = strlen(ips);
			snprintf(ips + used, sizeof(ips) - used, "%s%s", n_ip ? ", " : "", text);
			n_ip++;
			if (hlen && (l == 4 || l == 16) && ip_equal(d, l, hip, hlen))
				ip_ok = 1;
		} else if (g->type == GEN_DNS) {
			n_dns++;
		}
	}
	if (n_ip == 0 && n_dns == 0)
		goto done;
	if (n_ip > 0 && ip_ok)
		goto done;
	if (n_dns == 0) {
		/* Go's x509.HostnameError for an IP host. */
		snprintf(err, errlen, "x509: certificate is valid for %s, not %s", ips, host);
		rc = X509_V_ERR_IP_ADDRESS_MISMATCH;
		goto done;
	}
	/* etcd's isHostInDNS: the reverse lookup of the address, then each name forward. */
	char rname[NI_MAXHOST] = "";
	struct sockaddr_storage ss;
	memset(&ss, 0, sizeof(ss));
	socklen_t sl = 0;
	if (hlen == 4) {
		struct sockaddr_in *in = (struct sockaddr_in *)&ss;
		in->sin_family = AF_INET;
		memcpy(&in->sin_addr, hip, 4);
		sl = sizeof(*in);
	} else if (hlen == 16) {
		struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
		in6->sin6_family = AF_INET6;
		memcpy(&in6->sin6_addr, hip, 16);
		sl = sizeof(*in6);
	}
	int have_rname = sl && getnameinfo((struct sockaddr *)&ss, sl, rname, sizeof(rname), NULL, 0, NI_NAMEREQD) == 0;
	size_t rl = strlen(rname);
	if (rl > 0 && rname[rl - 1] == '.')
		rname[--rl] = '\0';
	char lookup_err[96] = "";
	for (int i = 0; i < sk_GENERAL_NAME_num(sans); i++) {
		GENERAL_NAME *g = sk_GENERAL_NAME_value(sans, i);
		if (g->type != GEN_DNS)
			continue;
		const char *name = (const char *)ASN1_STRING_get0_data(g->d.dNSName);
		size_t nl = (size_t)ASN1_STRING_length(g->d.dNSName);
		if (memchr(name, '\0', nl) != NULL)
			continue;
		size_t used = strlen(dns);
		snprintf(dns + used, sizeof(dns) - used, "%s\"%.*s\"", used ? " " : "", (int)nl, name);
		if (have_rname) {
			if (nl > 1 && name[0] == '*' && name[1] == '.') {
				if (rl >= nl - 1 && memcmp(rname + rl - (nl - 1), name + 1, nl - 1) == 0)
					goto done;
			} else if (rl == nl && memcmp(rname, name, nl) == 0) {
				goto done;
			}
		}
		if (nl > 1 && name[0] == '*' && name[1] == '.')
			continue;
		char fwd[256];
		snprintf(fwd, sizeof(fwd), "%.*s", (int)nl, name);
		struct addrinfo hints, *res = NULL;
		memset(&hints, 0, sizeof(hints));
		hints.ai_socktype = SOCK_STREAM;
		int gai = getaddrinfo(fwd, NULL, &hints, &res);
		if (gai != 0) {
			snprintf(lookup_err, sizeof(lookup_err), "lookup %.40s: %s", fwd, gai_strerror(gai));
			continue;
		}
		int match = 0;
		for (struct addrinfo *a = res; a != NULL && !match; a = a->ai_next) {
			char text[INET6_ADDRSTRLEN] = "";
			const void *p = a->ai_family == AF_INET ? (const void *)&((struct sockaddr_in *)a->ai_addr)->sin_addr
								: (const void *)&((struct sockaddr_in6 *)a->ai_addr)->sin6_addr;
			if (inet_ntop(a->ai_family, p, text, sizeof(text)) != NULL && strcmp(text, host) == 0)
				match = 1;
		}
		freeaddrinfo(res);
		if (match)
			goto done;
	}
	snprintf(err, errlen, "tls: \"%s\" does not match any of DNSNames [%s]%s%s%s", host, dns,
		 lookup_err[0] ? " (" : "", lookup_err, lookup_err[0] ? ")" : "");
	rc = X509_V_ERR_HOSTNAME_MISMATCH;
done:
	GENERAL_NAMES_free(sans);
	return rc;
}

int peer_tls__check_cert(const struct peer_tls *t, X509 *cert, int depth, int acceptor,
			 const char *remote_addr, char *err, size_t errlen)
{
	if (depth == 0 && acceptor && t->pt_check_san) {
		int rc = check_san(cert, remote_addr, err, errlen);
		if (rc != X509_V_OK)
			return rc;
	}
	if (depth == 0 && t->pt_allowed_cn != NULL) {
		char cn[256] = "";
		X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, cn, sizeof(cn));
		if (strcmp(cn, t->pt_allowed_cn) != 0) {
			snprintf(err, errlen, "tls: CommonName authentication failed (CN %.64s, allowed %.64s)",
				 cn, t->pt_allowed_cn);
			return X509_V_ERR_APPLICATION_VERIFICATION;
		}
	}
	/* etcd's checkCRL: any certificate of the peer whose serial the CRL revokes. */
	X509_REVOKED *rev = NULL;
	if (acceptor && t->pt_crl != NULL &&
	    X509_CRL_get0_by_serial(t->pt_crl, &rev, (ASN1_INTEGER *)X509_get0_serialNumber(cert)) == 1) {
		snprintf(err, errlen, "tls: the peer's certificate is revoked (--peer-crl-file)");
		return X509_V_ERR_CERT_REVOKED;
	}
	return X509_V_OK;
}

/* ---- --peer-auto-tls ---- */

static int add_ext(X509 *x, int nid, const char *value)
{
	X509V3_CTX ctx;
	X509V3_set_ctx_nodb(&ctx);
	X509V3_set_ctx(&ctx, x, x, NULL, NULL, 0);
	X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, &ctx, nid, value);
	if (ext == NULL)
		return -1;
	int ok = X509_add_ext(x, ext, -1);
	X509_EXTENSION_free(ext);
	return ok == 1 ? 0 : -1;
}

/* Writes data to path through a temporary file, fsync and rename: never half a file. */
static int write_file_atomic(const char *path, const char *data, size_t len, mode_t mode)
{
	char tmp[4200];
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, mode);
	if (fd < 0)
		return -1;
	size_t off = 0;
	while (off < len) {
		ssize_t w = write(fd, data + off, len - off);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			close(fd);
			unlink(tmp);
			return -1;
		}
		off += (size_t)w;
	}
	if (fsync(fd) != 0 || close(fd) != 0 || rename(tmp, path) != 0) {
		unlink(tmp);
		return -1;
	}
	return 0;
}

/* PEM of a key or certificate into a malloc'ed string. */
static char *pem_string(EVP_PKEY *key, X509 *cert, size_t *len)
{
	BIO *b = BIO_new(BIO_s_mem());
	if (b == NULL)
		return NULL;
	int ok = key != NULL ? PEM_write_bio_PrivateKey(b, key, NULL, NULL, 0, NULL, NULL)
			     : PEM_write_bio_X509(b, cert);
	char *out = NULL;
	char *data;
	long n = BIO_get_mem_data(b, &data);
	if (ok == 1 && n > 0 && (out = malloc((size_t)n)) != NULL) {
		memcpy(out, data, (size_t)n);
		*len = (size_t)n;
	}
	BIO_free(b);
	return out;
}

static int make_dirs(const char *path)
{
	char buf[4096];
	size_t len = strlen(path);
	if (len == 0 || len >= sizeof(buf))
		return -1;
	memcpy(buf, path, len + 1);
	for (size_t i = 1; i <= len; i++) {
		if (buf[i] == '/' || buf[i] == '\0') {
			char c = buf[i];
			buf[i] = '\0';
			if (mkdir(buf, 0700) != 0 && errno != EEXIST)
				return -1;
			buf[i] = c;
		}
	}
	return 0;
}

int peer_tls_self_cert(const char *dir, const char *const *hosts, int n_hosts, char *err,
		       size_t errlen)
{
	char cert_path[4096], key_path[4096];
	struct stat st;
	snprintf(cert_path, sizeof(cert_path), "%s/cert.pem", dir);
	snprintf(key_path, sizeof(key_path), "%s/key.pem", dir);
	if (make_dirs(dir) != 0) {
		snprintf(err, errlen, "cannot create cert directory %s: %s", dir, strerror(errno));
		return PEER_ETLS;
	}
	/* etcd keeps an existing pair: members restart with the same certificate. */
	if (stat(cert_path, &st) == 0 && stat(key_path, &st) == 0)
		return 0;
	int rc = PEER_ETLS;
	EVP_PKEY *key = EVP_EC_gen("P-521");
	X509 *x = X509_new();
	BIGNUM *serial = BN_new();
	char *san = NULL, *kpem = NULL, *cpem = NULL;
	size_t klen = 0, clen = 0;
	if (key == NULL || x == NULL || serial == NULL) {
		tls_err(err, errlen, "cannot generate ECDSA key", NULL);
		goto done;
	}
	/* A random 128-bit serial, as etcd's SelfCert. */
	if (BN_rand(serial, 127, BN_RAND_TOP_ANY, BN_RAND_BOTTOM_ANY) != 1 ||
	    BN_to_ASN1_INTEGER(serial, X509_get_serialNumber(x)) == NULL ||
	    X509_set_version(x, 2) != 1 ||
	    X509_gmtime_adj(X509_getm_notBefore(x), 0) == NULL ||
	    X509_gmtime_adj(X509_getm_notAfter(x), 365L * 24 * 3600) == NULL ||
	    X509_set_pubkey(x, key) != 1 ||
	    X509_NAME_add_entry_by_txt(X509_get_subject_name(x), "O", MBSTRING_ASC,
				       (const unsigned char *)"etcd", -1, -1, 0) != 1 ||
	    X509_set_issuer_name(x, X509_get_subject_name(x)) != 1) {
		tls_err(err, errlen, "cannot generate x509 certificate", NULL);
		goto done;
	}
	size_t cap = 1;
	for (int i = 0; i < n_hosts; i++)
		cap += strlen(hosts[i]) + 8;
	san = calloc(1, cap);
	if (san == NULL) {
		rc = PEER_ENOMEM;
		goto done;
	}
	for (int i = 0; i < n_hosts; i++) {
		/* "host:port" or "[v6]:port" or a bare host. */
		char h[256];
		const char *s = hosts[i];
		size_t hl;
		if (s[0] == '[') {
			const char *end = strchr(s, ']');
			hl = end != NULL ? (size_t)(end - s - 1) : strlen(s + 1);
			s++;
		} else {
			const char *colon = strrchr(s, ':');
			hl = colon != NULL && strchr(s, ':') == colon ? (size_t)(colon - s) : strlen(s);
		}
		if (hl == 0 || hl >= sizeof(h))
			continue;
		memcpy(h, s, hl);
		h[hl] = '\0';
		ASN1_OCTET_STRING *is_ip = a2i_IPADDRESS(h);
		if (san[0] != '\0')
			strcat(san, ",");
		strcat(san, is_ip != NULL ? "IP:" : "DNS:");
		strcat(san, h);
		ASN1_OCTET_STRING_free(is_ip);
	}
	ERR_clear_error();
	if (add_ext(x, NID_basic_constraints, "critical,CA:FALSE") != 0 ||
	    add_ext(x, NID_key_usage, "critical,digitalSignature,keyEncipherment") != 0 ||
	    add_ext(x, NID_ext_key_usage, "serverAuth,clientAuth") != 0 ||
	    (san[0] != '\0' && add_ext(x, NID_subject_alt_name, san) != 0) ||
	    X509_sign(x, key, EVP_sha256()) == 0) {
		tls_err(err, errlen, "cannot generate x509 certificate", NULL);
		goto done;
	}
	kpem = pem_string(key, NULL, &klen);
	cpem = pem_string(NULL, x, &clen);
	if (kpem == NULL || cpem == NULL) {
		rc = PEER_ENOMEM;
		goto done;
	}
	/* The key first: a cert.pem without its key.pem is never left behind. */
	if (write_file_atomic(key_path, kpem, klen, 0600) != 0 ||
	    write_file_atomic(cert_path, cpem, clen, 0644) != 0) {
		snprintf(err, errlen, "cannot write %s: %s", dir, strerror(errno));
		goto done;
	}
	rc = 0;
done:
	if (kpem != NULL) {
		/* The private key should not linger in freed memory. */
		OPENSSL_cleanse(kpem, klen);
		free(kpem);
	}
	free(cpem);
	free(san);
	BN_free(serial);
	X509_free(x);
	EVP_PKEY_free(key);
	return rc;
}
