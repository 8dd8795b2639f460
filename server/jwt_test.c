/*
 * jwt_test.c - jwt.c alone: every sign method round-trips, tampering, expiry and a foreign
 * algorithm are refused, etcd's option errors, verify-only keys.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/pem.h>

#include "server/jwt.h"
#include "tests/unit/check.h"


static char dir[] = "/tmp/jwt_test.XXXXXX";

static void write_key(const char *name, EVP_PKEY *k, int pub)
{
	char path[256];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	FILE *f = fopen(path, "w");
	if (pub)
		PEM_write_PUBKEY(f, k);
	else
		PEM_write_PrivateKey(f, k, NULL, NULL, 0, NULL, NULL);
	fclose(f);
}

static jwt_signer *open_with(const char *method, const char *priv, const char *pub, const char *ttl, int *rc,
			     char *why)
{
	const char *keys[4], *values[4];
	char pp[256], qp[256];
	size_t n = 0;
	keys[n] = "sign-method";
	values[n++] = method;
	if (priv) {
		snprintf(pp, sizeof(pp), "%s/%s", dir, priv);
		keys[n] = "priv-key";
		values[n++] = pp;
	}
	if (pub) {
		snprintf(qp, sizeof(qp), "%s/%s", dir, pub);
		keys[n] = "pub-key";
		values[n++] = qp;
	}
	if (ttl) {
		keys[n] = "ttl";
		values[n++] = ttl;
	}
	jwt_signer *s = NULL;
	*rc = jwt_signer_open(&s, keys, values, n, why, 512);
	return s;
}

static void round_trip(const char *method, const char *priv, const char *pub)
{
	int rc;
	char why[512] = "";
	jwt_signer *s = open_with(method, priv, pub, "1m", &rc, why);
	CHECK(rc == 0);
	if (s == NULL) {
		fprintf(stderr, "%s: %s\n", method, why);
		return;
	}
	CHECK(jwt_signer_ttl(s) == 60);
	char *tok = NULL;
	CHECK(jwt_sign(s, "al<i>ce", 7, 1000, &tok) == 0);
	if (tok == NULL)
		return;
	char user[64];
	uint64_t rev = 0;
	CHECK(jwt_verify(s, tok, strlen(tok), 1000, user, sizeof(user), &rev) == 0);
	CHECK(strcmp(user, "al<i>ce") == 0 && rev == 7);
	CHECK(jwt_verify(s, tok, strlen(tok), 1060, user, sizeof(user), &rev) == 0); /* now == exp */
	CHECK(jwt_verify(s, tok, strlen(tok), 1061, user, sizeof(user), &rev) == JWT_ERR_INVALID);
	/* a flipped signature character, a cut token */
	char *bad = strdup(tok);
	size_t len = strlen(bad);
	bad[len - 2] = bad[len - 2] == 'A' ? 'B' : 'A';
	CHECK(jwt_verify(s, bad, len, 1000, user, sizeof(user), &rev) == JWT_ERR_INVALID);
	CHECK(jwt_verify(s, tok, strrchr(tok, '.') - tok, 1000, user, sizeof(user), &rev) == JWT_ERR_INVALID);
	CHECK(jwt_verify(s, "a.b.c", 5, 1000, user, sizeof(user), &rev) == JWT_ERR_INVALID);
	free(bad);
	free(tok);
	jwt_signer_free(s);
}

int main(void)
{
	if (mkdtemp(dir) == NULL)
		return 1;
	EVP_PKEY *rsa = EVP_RSA_gen(2048);
	EVP_PKEY *ec256 = EVP_EC_gen("P-256"), *ec384 = EVP_EC_gen("P-384"), *ec521 = EVP_EC_gen("P-521");
	write_key("rsa.key", rsa, 0);
	write_key("rsa.pub", rsa, 1);
	write_key("ec256.key", ec256, 0);
	write_key("ec256.pub", ec256, 1);
	write_key("ec384.key", ec384, 0);
	write_key("ec521.key", ec521, 0);
	char hp[256];
	snprintf(hp, sizeof(hp), "%s/hmac.key", dir);
	FILE *f = fopen(hp, "w");
	fputs("a shared secret\n", f);
	fclose(f);

	round_trip("RS256", "rsa.key", "rsa.pub");
	round_trip("RS384", "rsa.key", NULL);
	round_trip("RS512", "rsa.key", NULL);
	round_trip("PS256", "rsa.key", NULL);
	round_trip("PS384", "rsa.key", NULL);
	round_trip("PS512", "rsa.key", NULL);
	round_trip("ES256", "ec256.key", "ec256.pub");
	round_trip("ES384", "ec384.key", NULL);
	round_trip("ES512", "ec521.key", NULL);
	round_trip("HS256", "hmac.key", NULL);
	round_trip("HS384", "hmac.key", NULL);
	round_trip("HS512", "hmac.key", NULL);

	/* a token of one method is refused by a signer of another, even with the same key */
	int rc;
	char why[512];
	jwt_signer *a = open_with("RS256", "rsa.key", NULL, NULL, &rc, why);
	jwt_signer *b = open_with("PS256", "rsa.key", NULL, NULL, &rc, why);
	char *tok = NULL, user[64];
	uint64_t rev;
	CHECK(a && b && jwt_sign(a, "u", 1, 0, &tok) == 0);
	CHECK(tok && jwt_verify(b, tok, strlen(tok), 0, user, sizeof(user), &rev) == JWT_ERR_INVALID);
	CHECK(jwt_signer_ttl(a) == 300); /* etcd's default 5m */
	free(tok);
	jwt_signer_free(a);
	jwt_signer_free(b);

	/* verify-only: a public key alone */
	jwt_signer *v = open_with("ES256", NULL, "ec256.pub", NULL, &rc, why);
	CHECK(rc == 0 && v);
	CHECK(v && jwt_sign(v, "u", 1, 0, &tok) == JWT_ERR_VERIFY_ONLY);
	jwt_signer_free(v);

	/* etcd's option and key errors */
	CHECK(open_with("XX256", "rsa.key", NULL, NULL, &rc, why) == NULL && rc == JWT_ERR_OPTIONS &&
	      strcmp(why, "auth: invalid auth signature method") == 0);
	CHECK(open_with("RS256", "nonexistent", NULL, NULL, &rc, why) == NULL && rc == JWT_ERR_OPTIONS &&
	      strstr(why, "no such file or directory") != NULL);
	CHECK(open_with("RS256", "rsa.key", NULL, "soon", &rc, why) == NULL && rc == JWT_ERR_OPTIONS &&
	      strcmp(why, "time: invalid duration \"soon\"") == 0);
	CHECK(open_with("RS256", NULL, NULL, NULL, &rc, why) == NULL && rc == JWT_ERR_KEY &&
	      strcmp(why, "auth: missing key data") == 0);
	CHECK(open_with("HS256", NULL, NULL, NULL, &rc, why) == NULL && rc == JWT_ERR_KEY);
	CHECK(open_with("ES256", "rsa.key", NULL, NULL, &rc, why) == NULL && rc == JWT_ERR_KEY);
	CHECK(open_with("RS256", "hmac.key", NULL, NULL, &rc, why) == NULL && rc == JWT_ERR_KEY &&
	      strcmp(why, "Invalid Key: Key must be PEM encoded PKCS1 or PKCS8 private key") == 0);

	EVP_PKEY_free(rsa);
	EVP_PKEY_free(ec256);
	EVP_PKEY_free(ec384);
	EVP_PKEY_free(ec521);
	char cmd[300];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	if (system(cmd) != 0)
		fprintf(stderr, "could not remove %s\n", dir);
	if (check_failures)
		fprintf(stderr, "%d failures\n", check_failures);
	return check_failures != 0;
}
