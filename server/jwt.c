/*
 * jwt.c - etcd's JWT tokens: options as auth/options.go parses them, signing and checking
 * as jwt-go (the library etcd 3.4 uses) does, with OpenSSL's EVP.
 *
 * Signature encodings are jwt-go's: RSxxx PKCS#1 v1.5; PSxxx RSA-PSS signed with a salt as
 * long as the hash and verified with any salt length; ESxxx the raw r||s pair, each padded
 * to the curve's size (not DER); HSxxx HMAC keyed with the priv-key file's bytes.
 */
#define _GNU_SOURCE /* memmem */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/decoder.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "server/jwt.h"

typedef enum jwt_family { FAM_RSA, FAM_PSS, FAM_EC, FAM_HMAC } jwt_family;

static const struct method {
	const char *name;
	jwt_family family;
	int hash_bits;  /* SHA-256/384/512 */
	int curve_bits; /* ES only: the key's curve size jwt-go demands */
} methods[] = {
	{"RS256", FAM_RSA, 256, 0},  {"RS384", FAM_RSA, 384, 0},  {"RS512", FAM_RSA, 512, 0},
	{"PS256", FAM_PSS, 256, 0},  {"PS384", FAM_PSS, 384, 0},  {"PS512", FAM_PSS, 512, 0},
	{"ES256", FAM_EC, 256, 256}, {"ES384", FAM_EC, 384, 384}, {"ES512", FAM_EC, 512, 521},
	{"HS256", FAM_HMAC, 256, 0}, {"HS384", FAM_HMAC, 384, 0}, {"HS512", FAM_HMAC, 512, 0},
};

struct jwt_signer {
	const struct method *js_method;
	int64_t js_ttl_s;
	EVP_PKEY *js_priv; /* NULL: verify-only */
	EVP_PKEY *js_pub;  /* the key tokens are checked with (the private key's, if given) */
	uint8_t *js_hmac;  /* HS: the priv-key file's bytes */
	size_t js_hmac_len;
};

static const EVP_MD *method_md(const struct method *m)
{
	return m->hash_bits == 256 ? EVP_sha256() : m->hash_bits == 384 ? EVP_sha384() : EVP_sha512();
}

/* ---- base64url without padding ---- */

static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/* Appends the encoding of p[0..n) to out (room for 4*ceil(n/3)+1); returns the length. */
static size_t b64url_encode(const uint8_t *p, size_t n, char *out)
{
	size_t o = 0, i = 0;
	for (; i + 2 < n; i += 3) {
		uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8 | p[i + 2];
		out[o++] = b64[v >> 18];
		out[o++] = b64[(v >> 12) & 63];
		out[o++] = b64[(v >> 6) & 63];
		out[o++] = b64[v & 63];
	}
	if (n - i == 1) {
		uint32_t v = (uint32_t)p[i] << 16;
		out[o++] = b64[v >> 18];
		out[o++] = b64[(v >> 12) & 63];
	} else if (n - i == 2) {
		uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8;
		out[o++] = b64[v >> 18];
		out[o++] = b64[(v >> 12) & 63];
		out[o++] = b64[(v >> 6) & 63];
	}
	out[o] = '\0';
	return o;
}

static int b64_value(char c)
{
	const char *p = c ? strchr(b64, c) : NULL;
	return p ? (int)(p - b64) : -1;
}

/* Decodes n characters (no padding, as jwt-go's DecodeSegment after it strips '=') into out
 * (room for n*3/4+1). Returns the length or -1. */
static long b64url_decode(const char *s, size_t n, uint8_t *out)
{
	if (n % 4 == 1)
		return -1;
	size_t o = 0;
	uint32_t acc = 0;
	int bits = 0;
	for (size_t i = 0; i < n; i++) {
		int v = b64_value(s[i]);
		if (v < 0)
			return -1;
		acc = acc << 6 | (uint32_t)v;
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			out[o++] = (uint8_t)(acc >> bits);
		}
	}
	/* Go's RawURLEncoding is strict: the unused low bits must be zero. */
	if (bits > 0 && (acc & ((1u << bits) - 1)) != 0)
		return -1;
	return (long)o;
}

/* ---- the little JSON jwt tokens need: one flat object ---- */

typedef struct json_field {
	char key[32];
	int is_string;
	char str[256]; /* string values, unescaped */
	double num;    /* number values */
} json_field;

static const char *skip_ws(const char *p, const char *end)
{
	while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
		p++;
	return p;
}

/* A JSON string at p ('"' first) into out (UTF-8); returns the position after it or NULL. */
static const char *json_string(const char *p, const char *end, char *out, size_t cap)
{
	size_t o = 0;
	if (p >= end || *p != '"')
		return NULL;
	for (p++; p < end && *p != '"'; p++) {
		unsigned c = (unsigned char)*p;
		if (c < 0x20)
			return NULL;
		if (c == '\\') {
			if (++p >= end)
				return NULL;
			switch (*p) {
			case '"': case '\\': case '/': c = (unsigned char)*p; break;
			case 'b': c = '\b'; break;
			case 'f': c = '\f'; break;
			case 'n': c = '\n'; break;
			case 'r': c = '\r'; break;
			case 't': c = '\t'; break;
			case 'u': {
				if (end - p < 5)
					return NULL;
				char hex[5] = {p[1], p[2], p[3], p[4], 0};
				char *e;
				c = (unsigned)strtoul(hex, &e, 16);
				if (*e != '\0')
					return NULL;
				p += 4;
				break;
			}
			default:
				return NULL;
			}
		}
		/* Code points as UTF-8 (surrogate pairs are not something etcd user names need). */
		if (c < 0x80) {
			if (o + 1 >= cap) return NULL;
			out[o++] = (char)c;
		} else if (c < 0x800) {
			if (o + 2 >= cap) return NULL;
			out[o++] = (char)(0xc0 | c >> 6);
			out[o++] = (char)(0x80 | (c & 63));
		} else {
			if (o + 3 >= cap) return NULL;
			out[o++] = (char)(0xe0 | c >> 12);
			out[o++] = (char)(0x80 | ((c >> 6) & 63));
			out[o++] = (char)(0x80 | (c & 63));
		}
	}
	if (p >= end)
		return NULL;
	out[o] = '\0';
	return p + 1;
}

/* Parses {"k":v,...} with string, number, true, false and null values; up to max fields. */
static int json_object(const char *p, size_t len, json_field *f, size_t max, size_t *n)
{
	const char *end = p + len;
	*n = 0;
	p = skip_ws(p, end);
	if (p >= end || *p++ != '{')
		return -1;
	p = skip_ws(p, end);
	if (p < end && *p == '}')
		return skip_ws(p + 1, end) == end ? 0 : -1;
	for (;;) {
		if (*n == max)
			return -1;
		json_field *x = &f[(*n)++];
		memset(x, 0, sizeof(*x));
		p = json_string(skip_ws(p, end), end, x->key, sizeof(x->key));
		if (p == NULL)
			return -1;
		p = skip_ws(p, end);
		if (p >= end || *p++ != ':')
			return -1;
		p = skip_ws(p, end);
		if (p < end && *p == '"') {
			x->is_string = 1;
			p = json_string(p, end, x->str, sizeof(x->str));
			if (p == NULL)
				return -1;
		} else if (end - p >= 4 && (memcmp(p, "true", 4) == 0 || memcmp(p, "null", 4) == 0)) {
			p += 4;
		} else if (end - p >= 5 && memcmp(p, "false", 5) == 0) {
			p += 5;
		} else {
			char num[64];
			size_t k = 0;
			while (p < end && k + 1 < sizeof(num) && strchr("0123456789+-.eE", *p))
				num[k++] = *p++;
			num[k] = '\0';
			char *e;
			if (k == 0)
				return -1;
			x->num = strtod(num, &e);
			if (*e != '\0')
				return -1;
		}
		p = skip_ws(p, end);
		if (p < end && *p == ',') {
			p++;
			continue;
		}
		if (p < end && *p == '}')
			return skip_ws(p + 1, end) == end ? 0 : -1;
		return -1;
	}
}

static const json_field *field(const json_field *f, size_t n, const char *key)
{
	for (size_t i = 0; i < n; i++)
		if (strcmp(f[i].key, key) == 0)
			return &f[i];
	return NULL;
}

/* A JSON string body as Go's encoding/json writes it (it escapes <, > and & too). */
static size_t json_quote(const char *s, char *out, size_t cap)
{
	size_t o = 0;
	out[o++] = '"';
	for (; *s && o + 8 < cap; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\') {
			out[o++] = '\\';
			out[o++] = (char)c;
		} else if (c == '\n') {
			out[o++] = '\\';
			out[o++] = 'n';
		} else if (c == '\r') {
			out[o++] = '\\';
			out[o++] = 'r';
		} else if (c == '\t') {
			out[o++] = '\\';
			out[o++] = 't';
		} else if (c < 0x20 || c == '<' || c == '>' || c == '&') {
			o += (size_t)snprintf(out + o, cap - o, "\\u%04x", c);
		} else {
			out[o++] = (char)c;
		}
	}
	out[o++] = '"';
	out[o] = '\0';
	return o;
}

/* ---- options and keys ---- */

/* Go's time.ParseDuration for the units a ttl uses; seconds, rounded down. */
static int parse_ttl(const char *s, int64_t *out)
{
	double total = 0;
	const char *p = s;
	if (strcmp(s, "0") == 0) {
		*out = 0;
		return 0;
	}
	if (*p == '\0')
		return -1;
	while (*p) {
		char *end;
		double v = strtod(p, &end);
		if (end == p || v < 0)
			return -1;
		p = end;
		double unit;
		if (strncmp(p, "ns", 2) == 0) { unit = 1e-9; p += 2; }
		else if (strncmp(p, "us", 2) == 0) { unit = 1e-6; p += 2; }
		else if (strncmp(p, "ms", 2) == 0) { unit = 1e-3; p += 2; }
		else if (*p == 's') { unit = 1; p += 1; }
		else if (*p == 'm') { unit = 60; p += 1; }
		else if (*p == 'h') { unit = 3600; p += 1; }
		else return -1;
		total += v * unit;
	}
	*out = (int64_t)total;
	return 0;
}

/* The whole file, as Go's ioutil.ReadFile; why gets Go's "open F: reason" on failure. */
static uint8_t *read_all(const char *path, size_t *len, char *why, size_t whylen)
{
	FILE *f = fopen(path, "rb");
	if (f == NULL) {
		snprintf(why, whylen, "open %s: %s", path, errno == ENOENT ? "no such file or directory" : strerror(errno));
		return NULL;
	}
	size_t cap = 4096, n = 0;
	uint8_t *buf = malloc(cap);
	while (buf) {
		size_t r = fread(buf + n, 1, cap - n, f);
		n += r;
		if (r == 0)
			break;
		if (n == cap) {
			uint8_t *b = realloc(buf, cap * 2);
			if (b == NULL) {
				free(buf);
				buf = NULL;
				break;
			}
			buf = b;
			cap *= 2;
		}
	}
	fclose(f);
	if (buf == NULL)
		snprintf(why, whylen, "out of memory reading %s", path);
	*len = n;
	return buf;
}

static int key_family_ok(EVP_PKEY *k, jwt_family fam)
{
	int id = EVP_PKEY_get_base_id(k);
	return fam == FAM_EC ? id == EVP_PKEY_EC : id == EVP_PKEY_RSA || id == EVP_PKEY_RSA_PSS;
}

/* jwt-go's ParseRSA/ECPrivateKeyFromPEM: PKCS#1, SEC1 or PKCS#8 PEM. */
static EVP_PKEY *load_private(const uint8_t *pem, size_t len, jwt_family fam, char *why, size_t whylen)
{
	BIO *bio = BIO_new_mem_buf(pem, (int)len);
	EVP_PKEY *k = bio ? PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL) : NULL;
	BIO_free(bio);
	if (k == NULL) {
		snprintf(why, whylen, "Invalid Key: Key must be PEM encoded PKCS1 or PKCS8 private key");
		return NULL;
	}
	/* A key of the other family in its own PEM form fails Go's x509 parsers, whose error
	 * jwt-go passes on; in PKCS#8 form it parses and then is the wrong type. */
	if (!key_family_ok(k, fam) && fam != FAM_EC && memmem(pem, len, "-----BEGIN EC PRIVATE KEY", 25)) {
		snprintf(why, whylen, "x509: failed to parse private key (use ParseECPrivateKey instead for this key format)");
		EVP_PKEY_free(k);
		return NULL;
	}
	if (!key_family_ok(k, fam) && fam == FAM_EC && memmem(pem, len, "-----BEGIN RSA PRIVATE KEY", 26)) {
		snprintf(why, whylen, "x509: failed to parse private key (use ParsePKCS1PrivateKey instead for this key format)");
		EVP_PKEY_free(k);
		return NULL;
	}
	if (!key_family_ok(k, fam)) {
		snprintf(why, whylen, fam == FAM_EC ? "Key is not a valid ECDSA private key"
						     : "Key is not a valid RSA private key");
		EVP_PKEY_free(k);
		return NULL;
	}
	return k;
}

/* jwt-go's ParseRSA/ECPublicKeyFromPEM: a PKIX public key, PKCS#1 public key or certificate. */
static EVP_PKEY *load_public(const uint8_t *pem, size_t len, jwt_family fam, char *why, size_t whylen)
{
	BIO *bio = BIO_new_mem_buf(pem, (int)len);
	EVP_PKEY *k = bio ? PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL) : NULL;
	if (k == NULL && bio) {
		BIO_reset(bio);
		X509 *x = PEM_read_bio_X509(bio, NULL, NULL, NULL);
		if (x) {
			k = X509_get_pubkey(x);
			X509_free(x);
		}
	}
	if (k == NULL && fam != FAM_EC) {
		/* "RSA PUBLIC KEY" (PKCS#1), which PEM_read_bio_PUBKEY does not take */
		OSSL_DECODER_CTX *d = OSSL_DECODER_CTX_new_for_pkey(&k, "PEM", NULL, "RSA", OSSL_KEYMGMT_SELECT_PUBLIC_KEY,
								    NULL, NULL);
		const unsigned char *data = pem;
		size_t dl = len;
		if (d == NULL || OSSL_DECODER_from_data(d, &data, &dl) != 1)
			k = NULL;
		OSSL_DECODER_CTX_free(d);
	}
	BIO_free(bio);
	if (k == NULL) {
		snprintf(why, whylen, "Invalid Key: Key must be PEM encoded PKCS1 or PKCS8 private key");
		return NULL;
	}
	if (!key_family_ok(k, fam)) {
		snprintf(why, whylen, fam == FAM_EC ? "Key is not a valid ECDSA public key"
						     : "Key is not a valid RSA public key");
		EVP_PKEY_free(k);
		return NULL;
	}
	return k;
}

/*
 * etcd's rsaKey() refuses a pair only when both the exponent and the modulus differ
 * ("pub.E != priv.E && pub.N.Cmp(priv.N) != 0"), so two RSA keys with the usual exponent
 * 65537 always pass, and the private key is what signs and verifies. Its ecKey() never
 * compares. Keelson starts whenever etcd does.
 */
static int keys_mismatch(EVP_PKEY *priv, EVP_PKEY *pub, jwt_family fam)
{
	if (fam == FAM_EC)
		return 0;
	BIGNUM *e1 = NULL, *e2 = NULL, *n1 = NULL, *n2 = NULL;
	int differ = 0;
	if (EVP_PKEY_get_bn_param(priv, OSSL_PKEY_PARAM_RSA_E, &e1) == 1 &&
	    EVP_PKEY_get_bn_param(pub, OSSL_PKEY_PARAM_RSA_E, &e2) == 1 &&
	    EVP_PKEY_get_bn_param(priv, OSSL_PKEY_PARAM_RSA_N, &n1) == 1 &&
	    EVP_PKEY_get_bn_param(pub, OSSL_PKEY_PARAM_RSA_N, &n2) == 1)
		differ = BN_cmp(e1, e2) != 0 && BN_cmp(n1, n2) != 0;
	BN_free(e1);
	BN_free(e2);
	BN_free(n1);
	BN_free(n2);
	return differ;
}

int jwt_signer_open(jwt_signer **out, const char *const *keys, const char *const *values, size_t n,
		    char *why, size_t whylen)
{
	const char *method = "", *pub = "", *priv = "", *ttl = "";
	uint8_t *pub_pem = NULL, *priv_pem = NULL;
	size_t pub_len = 0, priv_len = 0;
	int rc = JWT_ERR_OPTIONS;
	jwt_signer *s = calloc(1, sizeof(*s));
	if (s == NULL)
		return JWT_ERR_NOMEM;
	for (size_t i = 0; i < n; i++) {
		if (strcmp(keys[i], "sign-method") == 0) method = values[i];
		else if (strcmp(keys[i], "pub-key") == 0) pub = values[i];
		else if (strcmp(keys[i], "priv-key") == 0) priv = values[i];
		else if (strcmp(keys[i], "ttl") == 0) ttl = values[i];
		/* etcd only warns about other options */
	}
	/* The order of etcd's jwtOptions.Parse: ttl, pub-key, priv-key, then the method. */
	s->js_ttl_s = 300;
	if (ttl[0] && parse_ttl(ttl, &s->js_ttl_s) != 0) {
		snprintf(why, whylen, "time: invalid duration \"%s\"", ttl);
		goto fail;
	}
	if (pub[0] && (pub_pem = read_all(pub, &pub_len, why, whylen)) == NULL)
		goto fail;
	if (priv[0] && (priv_pem = read_all(priv, &priv_len, why, whylen)) == NULL)
		goto fail;
	for (size_t i = 0; i < sizeof(methods) / sizeof(methods[0]); i++)
		if (strcmp(methods[i].name, method) == 0)
			s->js_method = &methods[i];
	if (s->js_method == NULL) {
		snprintf(why, whylen, "auth: invalid auth signature method");
		goto fail;
	}
	/* jwtOptions.Key(): errors from here are returned as they are, not as invalid options. */
	rc = JWT_ERR_KEY;
	jwt_family fam = s->js_method->family;
	if (fam == FAM_HMAC) {
		if (priv_len == 0) {
			snprintf(why, whylen, "auth: missing key data");
			goto fail;
		}
		s->js_hmac = priv_pem;
		s->js_hmac_len = priv_len;
		priv_pem = NULL;
	} else {
		if (priv_len > 0 && (s->js_priv = load_private(priv_pem, priv_len, fam, why, whylen)) == NULL)
			goto fail;
		if (pub_len > 0 && (s->js_pub = load_public(pub_pem, pub_len, fam, why, whylen)) == NULL)
			goto fail;
		if (s->js_priv == NULL && s->js_pub == NULL) {
			snprintf(why, whylen, "auth: missing key data");
			goto fail;
		}
		if (s->js_priv && s->js_pub && keys_mismatch(s->js_priv, s->js_pub, fam)) {
			snprintf(why, whylen, "auth: public and private keys don't match");
			goto fail;
		}
		if (s->js_priv) {
			/* etcd verifies with the private key's own public half. */
			EVP_PKEY_free(s->js_pub);
			s->js_pub = s->js_priv;
			EVP_PKEY_up_ref(s->js_pub);
		}
	}
	free(pub_pem);
	if (priv_pem)
		OPENSSL_cleanse(priv_pem, priv_len);
	free(priv_pem);
	*out = s;
	return 0;
fail:
	free(pub_pem);
	if (priv_pem)
		OPENSSL_cleanse(priv_pem, priv_len);
	free(priv_pem);
	jwt_signer_free(s);
	return rc;
}

void jwt_signer_free(jwt_signer *s)
{
	if (s == NULL)
		return;
	EVP_PKEY_free(s->js_priv);
	EVP_PKEY_free(s->js_pub);
	if (s->js_hmac)
		OPENSSL_cleanse(s->js_hmac, s->js_hmac_len);
	free(s->js_hmac);
	free(s);
}

int64_t jwt_signer_ttl(const jwt_signer *s)
{
	return s->js_ttl_s;
}

/* ---- signatures ---- */

static int pss_setup(EVP_PKEY_CTX *pctx, int signing)
{
	return EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) == 1 &&
	       EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, signing ? RSA_PSS_SALTLEN_DIGEST : RSA_PSS_SALTLEN_AUTO) == 1;
}

/* Signs in[0..n) into sig (room for 1024 bytes); returns the length or -1. */
static long sign_bytes(jwt_signer *s, const uint8_t *in, size_t n, uint8_t *sig)
{
	const struct method *m = s->js_method;
	if (m->family == FAM_HMAC) {
		unsigned len = 0;
		if (HMAC(method_md(m), s->js_hmac, (int)s->js_hmac_len, in, n, sig, &len) == NULL)
			return -1;
		return (long)len;
	}
	EVP_MD_CTX *ctx = EVP_MD_CTX_new();
	EVP_PKEY_CTX *pctx = NULL;
	uint8_t der[1024];
	size_t dlen = sizeof(der);
	long out = -1;
	if (ctx == NULL || EVP_DigestSignInit(ctx, &pctx, method_md(m), NULL, s->js_priv) != 1)
		goto done;
	if (m->family == FAM_PSS && !pss_setup(pctx, 1))
		goto done;
	if (EVP_DigestSign(ctx, der, &dlen, in, n) != 1)
		goto done;
	if (m->family != FAM_EC) {
		memcpy(sig, der, dlen);
		out = (long)dlen;
		goto done;
	}
	/* ECDSA: DER SEQUENCE{r, s} to jwt-go's fixed-width r||s. */
	const uint8_t *p = der;
	ECDSA_SIG *es = d2i_ECDSA_SIG(NULL, &p, (long)dlen);
	int width = (m->curve_bits + 7) / 8;
	if (es && BN_bn2binpad(ECDSA_SIG_get0_r(es), sig, width) == width &&
	    BN_bn2binpad(ECDSA_SIG_get0_s(es), sig + width, width) == width)
		out = 2L * width;
	ECDSA_SIG_free(es);
done:
	EVP_MD_CTX_free(ctx);
	return out;
}

static int verify_bytes(jwt_signer *s, const uint8_t *in, size_t n, const uint8_t *sig, size_t slen)
{
	const struct method *m = s->js_method;
	if (m->family == FAM_HMAC) {
		uint8_t mac[EVP_MAX_MD_SIZE];
		unsigned len = 0;
		if (HMAC(method_md(m), s->js_hmac, (int)s->js_hmac_len, in, n, mac, &len) == NULL)
			return 0;
		return len == slen && CRYPTO_memcmp(mac, sig, len) == 0;
	}
	uint8_t der[1024];
	const uint8_t *vsig = sig;
	size_t vlen = slen;
	if (m->family == FAM_EC) {
		/* jwt-go: exactly 2*keysize bytes, else invalid. */
		int width = (m->curve_bits + 7) / 8;
		if (slen != 2u * (size_t)width || EVP_PKEY_get_bits(s->js_pub) != m->curve_bits)
			return 0;
		ECDSA_SIG *es = ECDSA_SIG_new();
		BIGNUM *r = BN_bin2bn(sig, width, NULL), *ss = BN_bin2bn(sig + width, width, NULL);
		if (es == NULL || r == NULL || ss == NULL || ECDSA_SIG_set0(es, r, ss) != 1) {
			ECDSA_SIG_free(es);
			BN_free(r);
			BN_free(ss);
			return 0;
		}
		uint8_t *p = der;
		int dl = i2d_ECDSA_SIG(es, NULL);
		if (dl <= 0 || dl > (int)sizeof(der)) {
			ECDSA_SIG_free(es);
			return 0;
		}
		dl = i2d_ECDSA_SIG(es, &p);
		ECDSA_SIG_free(es);
		vsig = der;
		vlen = (size_t)dl;
	}
	EVP_MD_CTX *ctx = EVP_MD_CTX_new();
	EVP_PKEY_CTX *pctx = NULL;
	int ok = ctx && EVP_DigestVerifyInit(ctx, &pctx, method_md(m), NULL, s->js_pub) == 1 &&
		 (m->family != FAM_PSS || pss_setup(pctx, 0)) &&
		 EVP_DigestVerify(ctx, vsig, vlen, in, n) == 1;
	EVP_MD_CTX_free(ctx);
	return ok;
}

int jwt_sign(jwt_signer *s, const char *user, uint64_t revision, int64_t now, char **out)
{
	if (s->js_method->family != FAM_HMAC && s->js_priv == NULL)
		return JWT_ERR_VERIFY_ONLY;
	/* jwt-go refuses to sign with a key of another curve size ("key is invalid"); etcd
	 * starts, and each Authenticate fails. */
	if (s->js_method->family == FAM_EC && EVP_PKEY_get_bits(s->js_priv) != s->js_method->curve_bits)
		return JWT_ERR_KEY;
	size_t ulen = strlen(user);
	if (ulen > 4096)
		return JWT_ERR_INVALID;
	/* jwt-go marshals the header and MapClaims as Go maps: keys sorted. */
	char header[64], quoted[4096 * 6 + 8];
	int hl = snprintf(header, sizeof(header), "{\"alg\":\"%s\",\"typ\":\"JWT\"}", s->js_method->name);
	json_quote(user, quoted, sizeof(quoted));
	size_t clen = strlen(quoted) + 96;
	char *claims = malloc(clen);
	if (claims == NULL)
		return JWT_ERR_NOMEM;
	int cl = snprintf(claims, clen, "{\"exp\":%lld,\"revision\":%llu,\"username\":%s}",
			  (long long)(now + s->js_ttl_s), (unsigned long long)revision, quoted);
	size_t cap = ((size_t)hl + (size_t)cl) * 4 / 3 + 8 + 1400;
	char *tok = malloc(cap);
	if (tok == NULL) {
		free(claims);
		return JWT_ERR_NOMEM;
	}
	size_t t = b64url_encode((const uint8_t *)header, (size_t)hl, tok);
	tok[t++] = '.';
	t += b64url_encode((const uint8_t *)claims, (size_t)cl, tok + t);
	free(claims);
	uint8_t sig[1024];
	long sl = sign_bytes(s, (const uint8_t *)tok, t, sig);
	if (sl < 0) {
		free(tok);
		return JWT_ERR_KEY;
	}
	tok[t++] = '.';
	b64url_encode(sig, (size_t)sl, tok + t);
	*out = tok;
	return 0;
}

int jwt_verify(jwt_signer *s, const char *tok, size_t len, int64_t now, char *user, size_t ulen,
	       uint64_t *revision)
{
	const char *dot1 = memchr(tok, '.', len);
	const char *dot2 = dot1 ? memchr(dot1 + 1, '.', len - (size_t)(dot1 + 1 - tok)) : NULL;
	if (dot2 == NULL || memchr(dot2 + 1, '.', len - (size_t)(dot2 + 1 - tok)) != NULL || len > 16384)
		return JWT_ERR_INVALID;
	size_t hlen = (size_t)(dot1 - tok), clen = (size_t)(dot2 - dot1 - 1);
	size_t slen = len - (size_t)(dot2 + 1 - tok);
	uint8_t *buf = malloc(len + 16);
	if (buf == NULL)
		return JWT_ERR_INVALID;
	int rc = JWT_ERR_INVALID;
	json_field f[16];
	size_t nf;
	long l = b64url_decode(tok, hlen, buf);
	if (l < 0 || json_object((const char *)buf, (size_t)l, f, 16, &nf) != 0)
		goto done;
	const json_field *alg = field(f, nf, "alg");
	if (alg == NULL || !alg->is_string || strcmp(alg->str, s->js_method->name) != 0)
		goto done;
	l = b64url_decode(dot2 + 1, slen, buf);
	if (l < 0 || !verify_bytes(s, (const uint8_t *)tok, (size_t)(dot2 - tok), buf, (size_t)l))
		goto done;
	l = b64url_decode(dot1 + 1, clen, buf);
	if (l < 0 || json_object((const char *)buf, (size_t)l, f, 16, &nf) != 0)
		goto done;
	/* jwt-go's MapClaims.Valid: exp (if present) not passed, nbf and iat not in the future. */
	const json_field *exp = field(f, nf, "exp"), *nbf = field(f, nf, "nbf"), *iat = field(f, nf, "iat");
	if (exp && (exp->is_string || (double)now > exp->num))
		goto done;
	if ((nbf && (nbf->is_string || (double)now < nbf->num)) || (iat && (iat->is_string || (double)now < iat->num)))
		goto done;
	const json_field *u = field(f, nf, "username"), *rev = field(f, nf, "revision");
	if (u == NULL || !u->is_string || rev == NULL || rev->is_string || rev->num < 0 || strlen(u->str) >= ulen)
		goto done;
	strcpy(user, u->str);
	*revision = (uint64_t)rev->num;
	rc = 0;
done:
	free(buf);
	return rc;
}
