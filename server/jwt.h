/*
 * jwt.h - etcd's JWT auth tokens (etcd 3.4 auth/jwt.go and auth/options.go), with OpenSSL.
 *
 * A token is base64url(header).base64url(claims).base64url(signature), no padding, with the
 * header {"alg":<method>,"typ":"JWT"} and the claims {"exp":<unix s>,"revision":<auth
 * revision>,"username":<user>} as jwt-go encodes them. Tokens are stateless: any member that
 * has the public (or HMAC) key verifies them, so they are never stored or replicated.
 */
#ifndef KEELSON_JWT_H
#define KEELSON_JWT_H

#include <stddef.h>
#include <stdint.h>

enum {
	JWT_ERR_OPTIONS = -1300,     /* etcd: "auth: invalid auth options" (reason logged apart) */
	JWT_ERR_KEY = -1301,         /* a key etcd refuses; the reason is jwt-go's message */
	JWT_ERR_VERIFY_ONLY = -1302, /* "auth: token signing attempted with verify-only key" */
	JWT_ERR_INVALID = -1303,     /* a token that does not verify, is malformed or expired */
	JWT_ERR_NOMEM = -1304,
};

typedef struct jwt_signer jwt_signer;

/*
 * Opens a signer from the options after "jwt," in --auth-token (pub-key=FILE, priv-key=FILE,
 * sign-method=RS256|...|HS512, ttl=DURATION; the split on ',' and '=' is the caller's, as
 * etcd's decomposeOpts). keys/values: n pairs. On error returns JWT_ERR_OPTIONS or
 * JWT_ERR_KEY with etcd's reason in why ("auth: invalid auth signature method", "open F: no
 * such file or directory", "auth: public and private keys don't match", ...).
 */
int jwt_signer_open(jwt_signer **out, const char *const *keys, const char *const *values, size_t n,
		    char *why, size_t whylen);
void jwt_signer_free(jwt_signer *s);
/* The token's lifetime in seconds (ttl=, default 5m). */
int64_t jwt_signer_ttl(const jwt_signer *s);

/* A token for user at auth revision, expiring ttl after now (unix seconds); *out malloc'd,
 * the caller frees. JWT_ERR_VERIFY_ONLY when only a public key was given. */
int jwt_sign(jwt_signer *s, const char *user, uint64_t revision, int64_t now, char **out);

/* Verifies tok (len bytes): the header's alg must be the signer's, the signature valid and
 * exp not passed at now. Copies the username into user (truncation is an error) and the
 * revision claim into *revision. 0 or JWT_ERR_INVALID. Thread-safe. */
int jwt_verify(jwt_signer *s, const char *tok, size_t len, int64_t now, char *user, size_t ulen,
	       uint64_t *revision);

#endif
