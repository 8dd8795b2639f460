/*
 * tls.c - what a member prepares for client TLS: etcd's --auto-tls certificate and
 * --cipher-suites in OpenSSL's names (the connections are in tls_serve.c).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <openssl/bn.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "server/server.h"

/* Go's crypto/tls names (tls.CipherSuites() and tls.InsecureCipherSuites(), which etcd 3.4
 * accepts) and OpenSSL's names for them. TLS 1.3 suites are accepted and, as in Go, have no
 * effect: TLS 1.3 always uses its own. */
static const struct {
	const char *go, *openssl;
} suites[] = {
	{"TLS_RSA_WITH_RC4_128_SHA", "RC4-SHA"},
	{"TLS_RSA_WITH_3DES_EDE_CBC_SHA", "DES-CBC3-SHA"},
	{"TLS_RSA_WITH_AES_128_CBC_SHA", "AES128-SHA"},
	{"TLS_RSA_WITH_AES_256_CBC_SHA", "AES256-SHA"},
	{"TLS_RSA_WITH_AES_128_CBC_SHA256", "AES128-SHA256"},
	{"TLS_RSA_WITH_AES_128_GCM_SHA256", "AES128-GCM-SHA256"},
	{"TLS_RSA_WITH_AES_256_GCM_SHA384", "AES256-GCM-SHA384"},
	{"TLS_ECDHE_ECDSA_WITH_RC4_128_SHA", "ECDHE-ECDSA-RC4-SHA"},
	{"TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA", "ECDHE-ECDSA-AES128-SHA"},
	{"TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA", "ECDHE-ECDSA-AES256-SHA"},
	{"TLS_ECDHE_RSA_WITH_RC4_128_SHA", "ECDHE-RSA-RC4-SHA"},
	{"TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA", "ECDHE-RSA-DES-CBC3-SHA"},
	{"TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA", "ECDHE-RSA-AES128-SHA"},
	{"TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA", "ECDHE-RSA-AES256-SHA"},
	{"TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256", "ECDHE-ECDSA-AES128-SHA256"},
	{"TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256", "ECDHE-RSA-AES128-SHA256"},
	{"TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "ECDHE-RSA-AES128-GCM-SHA256"},
	{"TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "ECDHE-ECDSA-AES128-GCM-SHA256"},
	{"TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", "ECDHE-RSA-AES256-GCM-SHA384"},
	{"TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "ECDHE-ECDSA-AES256-GCM-SHA384"},
	{"TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305", "ECDHE-RSA-CHACHA20-POLY1305"},
	{"TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305", "ECDHE-ECDSA-CHACHA20-POLY1305"},
	{"TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256", "ECDHE-RSA-CHACHA20-POLY1305"},
	{"TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"},
	{"TLS_AES_128_GCM_SHA256", NULL},
	{"TLS_AES_256_GCM_SHA384", NULL},
	{"TLS_CHACHA20_POLY1305_SHA256", NULL},
};

int tls_cipher_list(const char *go_names, char *out, size_t outlen)
{
	size_t o = 0;
	out[0] = '\0';
	const char *p = go_names;
	while (*p) {
		size_t len = strcspn(p, ",");
		const char *ossl = NULL;
		int known = 0;
		for (size_t i = 0; i < sizeof(suites) / sizeof(suites[0]); i++)
			if (strlen(suites[i].go) == len && memcmp(suites[i].go, p, len) == 0) {
				known = 1;
				ossl = suites[i].openssl;
			}
		if (!known) {
			char msg[256];
			snprintf(msg, sizeof(msg), "unexpected TLS cipher suite \"%.*s\"", (int)(len < 200 ? len : 200), p);
			log_at(LOG_FATAL, msg, NULL);
			return -1;
		}
		if (ossl) {
			int n = snprintf(out + o, outlen - o, "%s%s", o ? ":" : "", ossl);
			if (n < 0 || (size_t)n >= outlen - o)
				return -1;
			o += (size_t)n;
		}
		p += len;
		if (*p == ',')
			p++;
	}
	return 0;
}

int tls_ciphers_http2_ok(const char *go_names)
{
	static const char *const need[] = {"TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
					   "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"};
	for (const char *p = go_names; *p;) {
		size_t len = strcspn(p, ",");
		for (size_t i = 0; i < 2; i++)
			if (strlen(need[i]) == len && memcmp(need[i], p, len) == 0)
				return 1;
		p += len;
		if (*p == ',')
			p++;
	}
	return 0;
}

static int write_pem(const char *path, int mode, int (*write)(BIO *, void *), void *obj)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, mode);
	if (fd < 0)
		return -1;
	BIO *b = BIO_new_fd(fd, BIO_CLOSE);
	if (b == NULL) {
		close(fd);
		return -1;
	}
	int ok = write(b, obj) == 1 && BIO_flush(b) == 1;
	BIO_free(b);
	return ok ? 0 : -1;
}

static int write_cert(BIO *b, void *x)
{
	return PEM_write_bio_X509(b, x);
}

static int write_key(BIO *b, void *k)
{
	return PEM_write_bio_PrivateKey_traditional(b, k, NULL, NULL, 0, NULL, NULL);
}

/* etcd's transport.SelfCert: an ECDSA P-521 key and a self-signed certificate for a year,
 * organization "etcd", server auth, naming every listen host (IPs as IP SANs). */
static int self_cert(const char *cert_path, const char *key_path, const config_urls *hosts)
{
	int rc = -1;
	EVP_PKEY *k = EVP_EC_gen("P-521");
	X509 *x = X509_new();
	BIGNUM *serial = BN_new();
	GENERAL_NAMES *sans = GENERAL_NAMES_new();
	if (k == NULL || x == NULL || serial == NULL || sans == NULL)
		goto done;
	if (BN_rand(serial, 128, BN_RAND_TOP_ANY, BN_RAND_BOTTOM_ANY) != 1 ||
	    BN_to_ASN1_INTEGER(serial, X509_get_serialNumber(x)) == NULL || X509_set_version(x, 2) != 1)
		goto done;
	X509_gmtime_adj(X509_getm_notBefore(x), 0);
	X509_gmtime_adj(X509_getm_notAfter(x), 365L * 24 * 3600);
	X509_NAME *name = X509_get_subject_name(x);
	X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC, (const unsigned char *)"etcd", -1, -1, 0);
	X509_set_issuer_name(x, name);
	X509_set_pubkey(x, k);
	for (int i = 0; i < hosts->n; i++) {
		char hp[256];
		if (config_url_host_port(hosts->url[i], hp, sizeof(hp)) != 0)
			continue;
		char *colon = strrchr(hp, ':');
		*colon = '\0';
		char *h = hp;
		if (h[0] == '[') { /* [v6]:port */
			h++;
			h[strlen(h) - 1] = '\0';
		}
		unsigned char ip[16];
		GENERAL_NAME *gn = GENERAL_NAME_new();
		if (gn == NULL)
			goto done;
		int iplen = inet_pton(AF_INET, h, ip) == 1 ? 4 : inet_pton(AF_INET6, h, ip) == 1 ? 16 : 0;
		if (iplen) {
			ASN1_OCTET_STRING *os = ASN1_OCTET_STRING_new();
			ASN1_OCTET_STRING_set(os, ip, iplen);
			GENERAL_NAME_set0_value(gn, GEN_IPADD, os);
		} else {
			ASN1_IA5STRING *s = ASN1_IA5STRING_new();
			ASN1_STRING_set(s, h, -1);
			GENERAL_NAME_set0_value(gn, GEN_DNS, s);
		}
		sk_GENERAL_NAME_push(sans, gn);
	}
	if (sk_GENERAL_NAME_num(sans) > 0 && X509_add1_ext_i2d(x, NID_subject_alt_name, sans, 0, 0) != 1)
		goto done;
	X509V3_CTX v3;
	X509V3_set_ctx(&v3, x, x, NULL, NULL, 0);
	static const char *const exts[][2] = {
		{"keyUsage", "critical,digitalSignature,keyEncipherment"},
		{"extendedKeyUsage", "serverAuth"},
		{"basicConstraints", "critical,CA:FALSE"},
	};
	for (size_t i = 0; i < 3; i++) {
		X509_EXTENSION *e = X509V3_EXT_nconf(NULL, &v3, exts[i][0], exts[i][1]);
		if (e == NULL || X509_add_ext(x, e, -1) != 1) {
			X509_EXTENSION_free(e);
			goto done;
		}
		X509_EXTENSION_free(e);
	}
	if (X509_sign(x, k, EVP_sha512()) <= 0)
		goto done;
	if (write_pem(cert_path, 0644, write_cert, x) != 0 || write_pem(key_path, 0600, write_key, k) != 0)
		goto done;
	rc = 0;
done:
	GENERAL_NAMES_free(sans);
	BN_free(serial);
	X509_free(x);
	EVP_PKEY_free(k);
	return rc;
}

int tls_auto_cert(const config *cfg, char *cert_path, char *key_path, size_t pathlen)
{
	char dir[4096];
	snprintf(dir, sizeof(dir), "%s/fixtures", cfg->data_dir);
	mkdir(dir, 0700);
	snprintf(dir, sizeof(dir), "%s/fixtures/client", cfg->data_dir);
	if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
		log_at(LOG_FATAL, "cannot create auto TLS directory", "path", dir, "error", strerror(errno), NULL);
		return -1;
	}
	snprintf(cert_path, pathlen, "%s/cert.pem", dir);
	snprintf(key_path, pathlen, "%s/key.pem", dir);
	/* etcd reuses a pair left by an earlier start. */
	if (access(cert_path, F_OK) == 0 && access(key_path, F_OK) == 0)
		return 0;
	if (self_cert(cert_path, key_path, &cfg->listen_client) != 0) {
		log_at(LOG_FATAL, "cannot generate auto TLS certificate", "path", dir, NULL);
		return -1;
	}
	log_at(LOG_INFO, "generated self-signed client certificate", "cert-file", cert_path, "key-file", key_path, NULL);
	return 0;
}
