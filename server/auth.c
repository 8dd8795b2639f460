/*
 * auth.c - etcd's authentication and role-based access control: users, roles, key-range
 * permissions, the root rules, simple tokens, and the Auth service.
 *
 * Every change (user and role management, enable/disable, and the simple token an
 * Authenticate hands out) is a log entry that every member applies, so every member accepts
 * the same tokens. JWT tokens (--auth-token jwt,...) are stateless: the entry carries no
 * token, each member checks a token's signature with its own copy of the key, and the auth
 * revision in the token must still be current (etcd's ErrAuthOldRevision). With
 * --client-cert-auth and no token, the client certificate's CN is the user, as in etcd.
 * Passwords are hashed by the member that receives the request, before anything is proposed,
 * with bcrypt at --bcrypt-cost as etcd does (crypt(3)), so users move between etcd and
 * Keelson with their passwords; hashes of earlier Keelson versions (salted PBKDF2-SHA256)
 * still check.
 *
 * The state is small and read on every request: it lives in memory, under one mutex, and is
 * persisted as one metadata value in the same batch as the entry that changed it.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <crypt.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "server/jwt.h"
#include "server/server.h"

#define AUTH_META STORAGE_AUTH_META
#define AUTH_MAX_USERS 1024
#define AUTH_MAX_ROLES 1024
#define AUTH_MAX_TOKENS 65536
#define PBKDF2_ITER 10000
#define ROOT "root"

static const struct {
	int code;
	const char *msg;
} auth_errors[] = {
	[-(AUTH_ERR_ROOT_USER_NOT_EXIST - AUTH_ERR_BASE)] = {9, "etcdserver: root user does not exist"},
	[-(AUTH_ERR_ROOT_ROLE_NOT_EXIST - AUTH_ERR_BASE)] = {9, "etcdserver: root user does not have root role"},
	[-(AUTH_ERR_USER_EXISTS - AUTH_ERR_BASE)] = {9, "etcdserver: user name already exists"},
	[-(AUTH_ERR_USER_EMPTY - AUTH_ERR_BASE)] = {3, "etcdserver: user name is empty"},
	[-(AUTH_ERR_USER_NOT_FOUND - AUTH_ERR_BASE)] = {9, "etcdserver: user name not found"},
	[-(AUTH_ERR_ROLE_EXISTS - AUTH_ERR_BASE)] = {9, "etcdserver: role name already exists"},
	[-(AUTH_ERR_ROLE_NOT_FOUND - AUTH_ERR_BASE)] = {9, "etcdserver: role name not found"},
	[-(AUTH_ERR_ROLE_EMPTY - AUTH_ERR_BASE)] = {3, "etcdserver: role name is empty"},
	[-(AUTH_ERR_FAILED - AUTH_ERR_BASE)] = {3, "etcdserver: authentication failed, invalid user ID or password"},
	[-(AUTH_ERR_PERMISSION_DENIED - AUTH_ERR_BASE)] = {7, "etcdserver: permission denied"},
	[-(AUTH_ERR_ROLE_NOT_GRANTED - AUTH_ERR_BASE)] = {9, "etcdserver: role is not granted to the user"},
	[-(AUTH_ERR_PERMISSION_NOT_GRANTED - AUTH_ERR_BASE)] = {9, "etcdserver: permission is not granted to the role"},
	[-(AUTH_ERR_NOT_ENABLED - AUTH_ERR_BASE)] = {9, "etcdserver: authentication is not enabled"},
	[-(AUTH_ERR_INVALID_TOKEN - AUTH_ERR_BASE)] = {16, "etcdserver: invalid auth token"},
	[-(AUTH_ERR_INVALID_MGMT - AUTH_ERR_BASE)] = {3, "etcdserver: invalid auth management"},
	[-(AUTH_ERR_NO_PASSWORD - AUTH_ERR_BASE)] = {3, "etcdserver: password is empty"},
	[-(AUTH_ERR_OLD_REVISION - AUTH_ERR_BASE)] = {3, "etcdserver: revision of auth store is old"},
	/* not one of etcd's rpctypes: grpc-go sends it as Unknown with the error's text */
	[-(AUTH_ERR_VERIFY_ONLY - AUTH_ERR_BASE)] = {2, "auth: token signing attempted with verify-only key"},
	[-(AUTH_ERR_JWT_KEY - AUTH_ERR_BASE)] = {2, "key is invalid"},
};

int auth_error_status(int err, const char **msg)
{
	int i = -(err - AUTH_ERR_BASE);
	if (err > AUTH_ERR_BASE || i >= (int)(sizeof(auth_errors) / sizeof(auth_errors[0])) ||
	    auth_errors[i].msg == NULL)
		return -1;
	*msg = auth_errors[i].msg;
	return auth_errors[i].code;
}

typedef enum auth_token_kind { AUTH_TOKEN_SIMPLE, AUTH_TOKEN_JWT, AUTH_TOKEN_NOP } auth_token_kind;

typedef struct auth_token {
	char t_token[40]; /* "" for a free slot */
	char t_user[256];
	uint64_t t_expiry_ms;
} auth_token;

struct auth_store {
	pthread_mutex_t a_mu;
	_Atomic int a_enabled; /* read without the mutex on every request's fast path */
	uint64_t a_revision;
	Authpb__User *a_users[AUTH_MAX_USERS]; /* owned: protobuf-c unpacked */
	size_t a_nusers;
	Authpb__Role *a_roles[AUTH_MAX_ROLES];
	size_t a_nroles;
	auth_token *a_tokens; /* open addressing by hash of the token */
	size_t a_token_ttl_ms;
	auth_token_kind a_token_kind; /* from --auth-token, fixed at start-up */
	jwt_signer *a_jwt;            /* AUTH_TOKEN_JWT only; used without the mutex */
	int a_cn_is_user;             /* --client-cert-auth: a certificate's CN stands for a token */
};

static uint64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static int bin_eq(const ProtobufCBinaryData *b, const char *s)
{
	return b->len == strlen(s) && memcmp(b->data, s, b->len) == 0;
}

static Authpb__User *find_user(auth_store *as, const char *name, size_t *idx)
{
	for (size_t i = 0; i < as->a_nusers; i++)
		if (bin_eq(&as->a_users[i]->name, name)) {
			if (idx)
				*idx = i;
			return as->a_users[i];
		}
	return NULL;
}

static Authpb__Role *find_role(auth_store *as, const char *name, size_t *idx)
{
	for (size_t i = 0; i < as->a_nroles; i++)
		if (bin_eq(&as->a_roles[i]->name, name)) {
			if (idx)
				*idx = i;
			return as->a_roles[i];
		}
	return NULL;
}

static int has_role(const Authpb__User *u, const char *role)
{
	for (size_t i = 0; i < u->n_roles; i++)
		if (strcmp(u->roles[i], role) == 0)
			return 1;
	return 0;
}

/* A deep copy owned by protobuf-c, through its own encoding. */
static ProtobufCMessage *msg_copy(const ProtobufCMessage *m)
{
	size_t len = protobuf_c_message_get_packed_size(m);
	uint8_t *buf = malloc(len ? len : 1);
	if (buf == NULL)
		return NULL;
	protobuf_c_message_pack(m, buf);
	ProtobufCMessage *c = protobuf_c_message_unpack(m->descriptor, NULL, len, buf);
	free(buf);
	return c;
}

/* ---- persistence: storage's auth record (storage/authrec.c has its layout) ---- */

static uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Packs every user and role into the arena (the record's layout is storage's). */
static int pack_all(auth_store *as, storage_arena *a, ProtobufCBinaryData *users, ProtobufCBinaryData *roles)
{
	for (size_t i = 0; i < as->a_nusers; i++) {
		users[i].len = protobuf_c_message_get_packed_size(&as->a_users[i]->base);
		if ((users[i].data = storage_arena_alloc(a, users[i].len ? users[i].len : 1)) == NULL)
			return STORAGE_ERR_NOMEM;
		protobuf_c_message_pack(&as->a_users[i]->base, users[i].data);
	}
	for (size_t i = 0; i < as->a_nroles; i++) {
		roles[i].len = protobuf_c_message_get_packed_size(&as->a_roles[i]->base);
		if ((roles[i].data = storage_arena_alloc(a, roles[i].len ? roles[i].len : 1)) == NULL)
			return STORAGE_ERR_NOMEM;
		protobuf_c_message_pack(&as->a_roles[i]->base, roles[i].data);
	}
	return 0;
}

static int persist(auth_store *as, storage_batch *b)
{
	static ProtobufCBinaryData users[AUTH_MAX_USERS], roles[AUTH_MAX_ROLES]; /* node loop only */
	storage_arena a;
	storage_arena_init(&a);
	int rc = pack_all(as, &a, users, roles);
	if (rc == 0)
		rc = storage_batch_auth_put(b, as->a_enabled, as->a_revision, users, as->a_nusers, roles, as->a_nroles);
	storage_arena_free(&a);
	return rc;
}

size_t auth_export(auth_store *as, storage_etcd_entry *out, size_t max, storage_arena *a, int *enabled,
		   uint64_t *revision)
{
	ProtobufCBinaryData *bufs = storage_arena_alloc(a, (AUTH_MAX_USERS + AUTH_MAX_ROLES) * sizeof(*bufs));
	size_t n = 0;
	pthread_mutex_lock(&as->a_mu);
	*enabled = as->a_enabled;
	*revision = as->a_revision;
	if (bufs && pack_all(as, a, bufs, bufs + AUTH_MAX_USERS) == 0) {
		/* Names are copied too: the store may change once the lock is released. */
		for (size_t i = 0; i < as->a_nusers && n < max; i++) {
			const ProtobufCBinaryData *nm = &as->a_users[i]->name;
			void *key = storage_arena_alloc(a, nm->len ? nm->len : 1);
			if (key == NULL)
				break;
			memcpy(key, nm->data, nm->len);
			out[n++] = (storage_etcd_entry){"authUsers", key, nm->len, bufs[i].data, bufs[i].len};
		}
		for (size_t i = 0; i < as->a_nroles && n < max; i++) {
			const ProtobufCBinaryData *nm = &as->a_roles[i]->name;
			void *key = storage_arena_alloc(a, nm->len ? nm->len : 1);
			if (key == NULL)
				break;
			memcpy(key, nm->data, nm->len);
			out[n++] = (storage_etcd_entry){"authRoles", key, nm->len, bufs[AUTH_MAX_USERS + i].data,
							bufs[AUTH_MAX_USERS + i].len};
		}
	}
	pthread_mutex_unlock(&as->a_mu);
	return n;
}

static int load(auth_store *as, const uint8_t *p, size_t len)
{
	const uint8_t *end = p + len;
	if (len < 13)
		return STORAGE_ERR_CORRUPT;
	as->a_enabled = p[0];
	as->a_revision = 0;
	for (int i = 0; i < 8; i++)
		as->a_revision = as->a_revision << 8 | p[1 + i];
	p += 9;
	for (int kind = 0; kind < 2; kind++) {
		if (end - p < 4)
			return STORAGE_ERR_CORRUPT;
		uint32_t n = get32(p);
		p += 4;
		for (uint32_t i = 0; i < n; i++) {
			if (end - p < 4 || (size_t)(end - p - 4) < get32(p))
				return STORAGE_ERR_CORRUPT;
			uint32_t l = get32(p);
			if (kind == 0 && as->a_nusers < AUTH_MAX_USERS) {
				Authpb__User *u = authpb__user__unpack(NULL, l, p + 4);
				if (u == NULL)
					return STORAGE_ERR_CORRUPT;
				as->a_users[as->a_nusers++] = u;
			} else if (kind == 1 && as->a_nroles < AUTH_MAX_ROLES) {
				Authpb__Role *r = authpb__role__unpack(NULL, l, p + 4);
				if (r == NULL)
					return STORAGE_ERR_CORRUPT;
				as->a_roles[as->a_nroles++] = r;
			}
			p += 4 + l;
		}
	}
	return 0;
}

/*
 * --auth-token as etcd's NewTokenProvider: "type[,key=value...]" (decomposeOpts: every option
 * is one key=value, no duplicates), type simple, jwt, or "" (a provider that accepts no
 * token). Logs etcd's reason and returns AUTH_ERR_TOKEN_OPTIONS for a start-up failure.
 */
static int token_provider_open(auth_store *as, const char *spec)
{
	char *copy = strdup(spec);
	const char *keys[16], *values[16];
	size_t n = 0;
	int rc = AUTH_ERR_TOKEN_OPTIONS;
	if (copy == NULL)
		return STORAGE_ERR_NOMEM;
	char *save = NULL, *type = copy, *comma = strchr(copy, ',');
	if (comma)
		*comma = '\0';
	for (char *opt = comma ? strtok_r(comma + 1, ",", &save) : NULL; opt; opt = strtok_r(NULL, ",", &save)) {
		char *eq = strchr(opt, '=');
		if (eq == NULL || strchr(eq + 1, '=') != NULL || n == 16) {
			log_at(LOG_ERROR, "invalid token option", "option", spec, NULL);
			goto done;
		}
		*eq = '\0';
		for (size_t k = 0; k < n; k++)
			if (strcmp(keys[k], opt) == 0) {
				log_at(LOG_ERROR, "invalid token option", "option", spec, "duplicate-parameter", opt, NULL);
				goto done;
			}
		keys[n] = opt;
		values[n++] = eq + 1;
	}
	/* Go's strings.Split keeps empty pieces ("jwt,,x=y" has an option ""), strtok_r does not. */
	if (comma && (strstr(spec, ",,") || spec[strlen(spec) - 1] == ',')) {
		log_at(LOG_ERROR, "invalid token option", "option", spec, NULL);
		goto done;
	}
	if (strcmp(type, "simple") == 0) {
		as->a_token_kind = AUTH_TOKEN_SIMPLE;
		rc = 0;
	} else if (strcmp(type, "") == 0) {
		as->a_token_kind = AUTH_TOKEN_NOP;
		rc = 0;
	} else if (strcmp(type, "jwt") == 0) {
		char why[512];
		int jrc = jwt_signer_open(&as->a_jwt, keys, values, n, why, sizeof(why));
		if (jrc == JWT_ERR_OPTIONS) {
			log_at(LOG_ERROR, "problem loading JWT options", "error", why, NULL);
		} else if (jrc == JWT_ERR_KEY) {
			/* etcd returns the key's error itself, not "invalid auth options" */
			log_at(LOG_FATAL, why, NULL);
			rc = AUTH_ERR_TOKEN_KEY;
		} else if (jrc) {
			rc = STORAGE_ERR_NOMEM;
		} else {
			as->a_token_kind = AUTH_TOKEN_JWT;
			rc = 0;
		}
	} else {
		log_at(LOG_WARN, "unknown token type", "type", type, NULL);
	}
done:
	if (rc == AUTH_ERR_TOKEN_OPTIONS)
		log_at(LOG_FATAL, "auth: invalid auth options", NULL);
	free(copy);
	return rc;
}

int auth_start(auth_store **out, const config *cfg, storage *st)
{
	auth_store *as = calloc(1, sizeof(*as));
	if (as == NULL)
		return STORAGE_ERR_NOMEM;
	as->a_tokens = calloc(AUTH_MAX_TOKENS, sizeof(auth_token));
	if (as->a_tokens == NULL) {
		free(as);
		return STORAGE_ERR_NOMEM;
	}
	pthread_mutex_init(&as->a_mu, NULL);
	as->a_token_ttl_ms = (cfg->auth_token_ttl ? cfg->auth_token_ttl : 300) * 1000;
	as->a_cn_is_user = cfg->client_cert_auth;
	int trc = token_provider_open(as, cfg->auth_token ? cfg->auth_token : "simple");
	if (trc) {
		auth_free(as);
		return trc;
	}
	as->a_revision = 1;
	storage_reader *r;
	storage_arena a;
	storage_arena_init(&a);
	int rc = storage_read_begin(st, &r);
	if (rc == 0) {
		void *val;
		size_t len;
		rc = storage_read_meta(r, AUTH_META, &a, &val, &len);
		if (rc == 0)
			rc = load(as, val, len);
		else if (rc == STORAGE_ERR_NOT_FOUND)
			rc = 0;
		storage_read_end(r);
	}
	storage_arena_free(&a);
	if (rc) {
		auth_free(as);
		return rc;
	}
	*out = as;
	return 0;
}

void auth_free(auth_store *as)
{
	if (as == NULL)
		return;
	for (size_t i = 0; i < as->a_nusers; i++)
		authpb__user__free_unpacked(as->a_users[i], NULL);
	for (size_t i = 0; i < as->a_nroles; i++)
		authpb__role__free_unpacked(as->a_roles[i], NULL);
	jwt_signer_free(as->a_jwt);
	OPENSSL_cleanse(as->a_tokens, AUTH_MAX_TOKENS * sizeof(auth_token));
	free(as->a_tokens);
	pthread_mutex_destroy(&as->a_mu);
	free(as);
}

int auth_reload(auth_store *as, const config *cfg, storage *st)
{
	auth_store *fresh;
	int rc = auth_start(&fresh, cfg, st);
	if (rc)
		return rc;
	/* Users, roles and the switch come from the store; tokens already handed out stay. */
	pthread_mutex_lock(&as->a_mu);
	Authpb__User *users[AUTH_MAX_USERS];
	Authpb__Role *roles[AUTH_MAX_ROLES];
	size_t nusers = as->a_nusers, nroles = as->a_nroles;
	memcpy(users, as->a_users, sizeof(users));
	memcpy(roles, as->a_roles, sizeof(roles));
	memcpy(as->a_users, fresh->a_users, sizeof(users));
	memcpy(as->a_roles, fresh->a_roles, sizeof(roles));
	as->a_nusers = fresh->a_nusers;
	as->a_nroles = fresh->a_nroles;
	as->a_revision = fresh->a_revision;
	atomic_store(&as->a_enabled, atomic_load(&fresh->a_enabled));
	pthread_mutex_unlock(&as->a_mu);
	memcpy(fresh->a_users, users, sizeof(users));
	memcpy(fresh->a_roles, roles, sizeof(roles));
	fresh->a_nusers = nusers;
	fresh->a_nroles = nroles;
	auth_free(fresh);
	return 0;
}

/* ---- passwords ---- */

static void hex(const uint8_t *p, size_t n, char *out)
{
	static const char d[] = "0123456789abcdef";
	for (size_t i = 0; i < n; i++) {
		out[2 * i] = d[p[i] >> 4];
		out[2 * i + 1] = d[p[i] & 15];
	}
	out[2 * n] = '\0';
}

/* "pbkdf2-sha256$iterations$salt$hash", salt and hash in hex. */
static int hash_password(const char *pw, const uint8_t salt[16], char *out, size_t outlen)
{
	uint8_t dk[32];
	char shex[33], dhex[65];
	if (PKCS5_PBKDF2_HMAC(pw, (int)strlen(pw), salt, 16, PBKDF2_ITER, EVP_sha256(), sizeof(dk), dk) != 1)
		return -1;
	hex(salt, 16, shex);
	hex(dk, sizeof(dk), dhex);
	OPENSSL_cleanse(dk, sizeof(dk));
	snprintf(out, outlen, "pbkdf2-sha256$%d$%s$%s", PBKDF2_ITER, shex, dhex);
	return 0;
}

/* etcd stores bcrypt hashes ("$2a$10$..."): users imported from an etcd data dir or
 * snapshot keep them, and crypt(3) (libxcrypt) checks them as Go's bcrypt does. */
static int check_bcrypt(const char *stored, const char *pw)
{
	struct crypt_data *cd = calloc(1, sizeof(*cd));
	if (cd == NULL)
		return 0;
	const char *got = crypt_r(pw, stored, cd);
	size_t n = strlen(stored);
	int ok = got != NULL && got[0] == '$' && strlen(got) == n && CRYPTO_memcmp(got, stored, n) == 0;
	OPENSSL_cleanse(cd, sizeof(*cd));
	free(cd);
	return ok;
}

static int check_password(const ProtobufCBinaryData *stored, const char *pw)
{
	char s[256], computed[256];
	if (stored->len == 0 || stored->len >= sizeof(s))
		return 0;
	memcpy(s, stored->data, stored->len);
	s[stored->len] = '\0';
	if (strncmp(s, "$2a$", 4) == 0 || strncmp(s, "$2b$", 4) == 0 || strncmp(s, "$2y$", 4) == 0)
		return check_bcrypt(s, pw);
	char *salt = strchr(s, '$');
	salt = salt ? strchr(salt + 1, '$') : NULL;
	if (salt == NULL || strlen(salt + 1) < 32)
		return 0;
	uint8_t raw[16];
	for (int i = 0; i < 16; i++) {
		unsigned v;
		if (sscanf(salt + 1 + 2 * i, "%2x", &v) != 1)
			return 0;
		raw[i] = (uint8_t)v;
	}
	if (hash_password(pw, raw, computed, sizeof(computed)) != 0)
		return 0;
	size_t n = strlen(computed);
	int ok = n == stored->len && CRYPTO_memcmp(computed, stored->data, n) == 0;
	OPENSSL_cleanse(computed, sizeof(computed));
	return ok;
}

/* ---- tokens ---- */

static size_t token_slot(const char *tok)
{
	uint64_t h = 1469598103934665603ULL;
	for (const char *p = tok; *p; p++)
		h = (h ^ (uint8_t)*p) * 1099511628211ULL;
	return (size_t)(h % AUTH_MAX_TOKENS);
}

/* The user of a valid token (renewing it), copied into user; 0 or an AUTH_ERR_*. */
static int token_user(auth_store *as, const char *tok, size_t len, char *user, size_t ulen)
{
	char t[40];
	if (len == 0 || len >= sizeof(t))
		return AUTH_ERR_INVALID_TOKEN;
	memcpy(t, tok, len);
	t[len] = '\0';
	uint64_t now = now_ms();
	size_t s = token_slot(t);
	for (size_t k = 0; k < 8; k++) {
		auth_token *e = &as->a_tokens[(s + k) % AUTH_MAX_TOKENS];
		if (strcmp(e->t_token, t) == 0 && e->t_expiry_ms > now) {
			e->t_expiry_ms = now + as->a_token_ttl_ms;
			snprintf(user, ulen, "%s", e->t_user);
			return 0;
		}
	}
	return AUTH_ERR_INVALID_TOKEN;
}

static void token_add(auth_store *as, const char *tok, const char *user)
{
	uint64_t now = now_ms();
	size_t s = token_slot(tok), pick = s;
	for (size_t k = 0; k < 8; k++) {
		auth_token *e = &as->a_tokens[(s + k) % AUTH_MAX_TOKENS];
		if (e->t_token[0] == '\0' || e->t_expiry_ms <= now) {
			pick = (s + k) % AUTH_MAX_TOKENS;
			break;
		}
	}
	auth_token *e = &as->a_tokens[pick];
	snprintf(e->t_token, sizeof(e->t_token), "%s", tok);
	snprintf(e->t_user, sizeof(e->t_user), "%s", user);
	e->t_expiry_ms = now + as->a_token_ttl_ms;
}

/* ---- permissions ---- */

typedef struct span {
	const uint8_t *lo;
	size_t lolen;
	const uint8_t *hi; /* NULL: +infinity */
	size_t hilen;
} span;

static int bcmp_(const uint8_t *a, size_t an, const uint8_t *b, size_t bn)
{
	size_t n = an < bn ? an : bn;
	int c = n ? memcmp(a, b, n) : 0;
	return c ? c : (an < bn ? -1 : an > bn);
}

/* A permission or request range as an interval: an empty end is the key alone
 * ([key, key+"\0")), "\0" is from the key on. */
static int key_in(const uint8_t *k, size_t kl, const span *s)
{
	if (bcmp_(k, kl, s->lo, s->lolen) < 0)
		return 0;
	return s->hi == NULL || bcmp_(k, kl, s->hi, s->hilen) < 0;
}

/* Is [key, end) covered by the user's permissions of this kind? Coverage by the union of
 * intervals, as etcd merges a role's permissions. */
static int user_permits(auth_store *as, const Authpb__User *u, int write, const ProtobufCBinaryData *key,
			const ProtobufCBinaryData *end)
{
	if (has_role(u, ROOT))
		return 1;
	span spans[512];
	const ProtobufCBinaryData *singles[512];
	size_t n = 0, ns = 0;
	for (size_t i = 0; i < u->n_roles; i++) {
		Authpb__Role *r = find_role(as, u->roles[i], NULL);
		for (size_t j = 0; r && j < r->n_keypermission; j++) {
			Authpb__Permission *p = r->keypermission[j];
			int ok = p->permtype == AUTHPB__PERMISSION__TYPE__READWRITE ||
				 (write ? p->permtype == AUTHPB__PERMISSION__TYPE__WRITE
					: p->permtype == AUTHPB__PERMISSION__TYPE__READ);
			if (!ok)
				continue;
			if (p->range_end.len == 0) {
				if (ns < 512)
					singles[ns++] = &p->key;
				continue;
			}
			if (n == 512)
				continue;
			span s = {p->key.data, p->key.len, NULL, 0};
			if (!(p->range_end.len == 1 && p->range_end.data[0] == 0)) {
				s.hi = p->range_end.data;
				s.hilen = p->range_end.len;
			}
			spans[n++] = s;
		}
	}
	if (end->len == 0) {
		for (size_t i = 0; i < ns; i++)
			if (bcmp_(singles[i]->data, singles[i]->len, key->data, key->len) == 0)
				return 1;
		for (size_t i = 0; i < n; i++)
			if (key_in(key->data, key->len, &spans[i]))
				return 1;
		return 0;
	}
	/* A range: walk from key, jumping to the furthest end of a span containing the point;
	 * covered when the walk passes the range's end. */
	int from_key = end->len == 1 && end->data[0] == 0;
	const uint8_t *pt = key->data;
	size_t ptl = key->len;
	for (size_t guard = 0; guard <= n; guard++) {
		if (!from_key && bcmp_(pt, ptl, end->data, end->len) >= 0)
			return 1;
		const span *best = NULL;
		for (size_t i = 0; i < n; i++) {
			if (!key_in(pt, ptl, &spans[i]))
				continue;
			if (best == NULL || spans[i].hi == NULL ||
			    (best->hi != NULL && bcmp_(spans[i].hi, spans[i].hilen, best->hi, best->hilen) > 0))
				best = &spans[i];
		}
		if (best == NULL)
			return 0;
		if (best->hi == NULL)
			return 1;
		pt = best->hi;
		ptl = best->hilen;
	}
	return !from_key && bcmp_(pt, ptl, end->data, end->len) >= 0;
}

/*
 * Who a request acts for, as far as can be told without the mutex: a JWT's verified user and
 * revision, or the client certificate's CN (etcd's AuthInfoFromTLS, only with
 * --client-cert-auth and no token). Simple tokens are looked up under the mutex.
 */
typedef struct caller {
	const char *c_tok; /* simple token, NULL if none */
	size_t c_toklen;
	char c_name[256];  /* JWT or CN user, "" if none */
	uint64_t c_rev;    /* a JWT's auth revision */
	int c_jwt;
	int c_err;         /* an error found already */
} caller;

static void identify(auth_store *as, const char *tok, size_t toklen, caller *c)
{
	memset(c, 0, sizeof(*c));
	if (tok == NULL) {
		if (!(as->a_cn_is_user && api_dispatch_peer_cn(c->c_name, sizeof(c->c_name))))
			c->c_err = AUTH_ERR_USER_EMPTY;
		return;
	}
	switch (as->a_token_kind) {
	case AUTH_TOKEN_SIMPLE:
		c->c_tok = tok;
		c->c_toklen = toklen;
		return;
	case AUTH_TOKEN_JWT:
		c->c_jwt = 1;
		if (jwt_verify(as->a_jwt, tok, toklen, (int64_t)time(NULL), c->c_name, sizeof(c->c_name), &c->c_rev) != 0)
			c->c_err = AUTH_ERR_INVALID_TOKEN;
		return;
	case AUTH_TOKEN_NOP:
		c->c_err = AUTH_ERR_INVALID_TOKEN;
		return;
	}
}

/* The caller's user, under the mutex: 0 and *u, or an error. A JWT or CN naming no user is
 * AUTH_ERR_USER_NOT_FOUND (etcd's admin check says so; its key checks say permission denied). */
static int caller_user(auth_store *as, const caller *c, Authpb__User **u)
{
	*u = NULL;
	if (c->c_err)
		return c->c_err;
	if (c->c_tok) {
		char user[256];
		int rc = token_user(as, c->c_tok, c->c_toklen, user, sizeof(user));
		if (rc)
			return rc;
		*u = find_user(as, user, NULL);
		return *u ? 0 : AUTH_ERR_INVALID_TOKEN;
	}
	*u = find_user(as, c->c_name, NULL);
	return *u ? 0 : AUTH_ERR_USER_NOT_FOUND;
}

/* etcd's isOpPermitted before the permission itself: a JWT from before the last auth
 * change is refused (the client authenticates again), and an unknown user is denied. */
static int caller_key_user(auth_store *as, const caller *c, Authpb__User **u)
{
	int rc = caller_user(as, c, u);
	if (rc == AUTH_ERR_USER_NOT_FOUND)
		return AUTH_ERR_PERMISSION_DENIED;
	if (rc == 0 && c->c_jwt && c->c_rev < as->a_revision)
		return AUTH_ERR_OLD_REVISION;
	return rc;
}

int auth_check_range(auth_store *as, const char *tok, size_t toklen, int write,
		     const ProtobufCBinaryData *key, const ProtobufCBinaryData *end)
{
	if (!atomic_load(&as->a_enabled))
		return 0; /* auth off: no lock on the request path */
	caller c;
	identify(as, tok, toklen, &c);
	pthread_mutex_lock(&as->a_mu);
	Authpb__User *u;
	int rc = as->a_enabled ? caller_key_user(as, &c, &u) : 0;
	if (rc == 0 && as->a_enabled && !user_permits(as, u, write, key, end))
		rc = AUTH_ERR_PERMISSION_DENIED;
	pthread_mutex_unlock(&as->a_mu);
	return rc;
}

static int txn_permitted(auth_store *as, Authpb__User *u, const Etcdserverpb__TxnRequest *t)
{
	for (size_t i = 0; i < t->n_compare; i++)
		if (!user_permits(as, u, 0, &t->compare[i]->key, &t->compare[i]->range_end))
			return 0;
	for (int side = 0; side < 2; side++) {
		Etcdserverpb__RequestOp **ops = side ? t->failure : t->success;
		size_t n = side ? t->n_failure : t->n_success;
		for (size_t i = 0; i < n; i++) {
			const Etcdserverpb__RequestOp *op = ops[i];
			static const ProtobufCBinaryData none = {0, NULL};
			switch (op->request_case) {
			case ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_RANGE:
				if (!user_permits(as, u, 0, &op->request_range->key, &op->request_range->range_end))
					return 0;
				break;
			case ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT:
				if (!user_permits(as, u, 1, &op->request_put->key, &none))
					return 0;
				break;
			case ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_DELETE_RANGE:
				if (!user_permits(as, u, 1, &op->request_delete_range->key,
						  &op->request_delete_range->range_end))
					return 0;
				break;
			case ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_TXN:
				if (!txn_permitted(as, u, op->request_txn))
					return 0;
				break;
			default:
				break;
			}
		}
	}
	return 1;
}

int auth_check_txn(auth_store *as, const char *tok, size_t toklen, const Etcdserverpb__TxnRequest *t)
{
	if (!atomic_load(&as->a_enabled))
		return 0; /* auth off: no lock on the request path */
	caller c;
	identify(as, tok, toklen, &c);
	pthread_mutex_lock(&as->a_mu);
	Authpb__User *u;
	int rc = as->a_enabled ? caller_key_user(as, &c, &u) : 0;
	if (rc == 0 && as->a_enabled && !txn_permitted(as, u, t))
		rc = AUTH_ERR_PERMISSION_DENIED;
	pthread_mutex_unlock(&as->a_mu);
	return rc;
}

/* A known caller, and with need_root one with the root role. */
static int check_caller(auth_store *as, const char *tok, size_t toklen, int need_root)
{
	if (!atomic_load(&as->a_enabled))
		return 0; /* auth off: no lock on the request path */
	caller c;
	identify(as, tok, toklen, &c);
	pthread_mutex_lock(&as->a_mu);
	Authpb__User *u;
	int rc = as->a_enabled ? caller_user(as, &c, &u) : 0;
	if (rc == 0 && need_root && as->a_enabled && !has_role(u, ROOT))
		rc = AUTH_ERR_PERMISSION_DENIED;
	pthread_mutex_unlock(&as->a_mu);
	return rc;
}

int auth_check_admin(auth_store *as, const char *tok, size_t toklen)
{
	return check_caller(as, tok, toklen, 1);
}

int auth_check_user(auth_store *as, const char *tok, size_t toklen)
{
	return check_caller(as, tok, toklen, 0);
}

int auth_enabled(auth_store *as)
{
	pthread_mutex_lock(&as->a_mu);
	int v = as->a_enabled;
	pthread_mutex_unlock(&as->a_mu);
	return v;
}

/* ---- applying the log ---- */

static Authpb__User *user_new(const char *name, const char *hashed, int no_password)
{
	Authpb__User u = AUTHPB__USER__INIT;
	Authpb__UserAddOptions o = AUTHPB__USER_ADD_OPTIONS__INIT;
	u.name.data = (uint8_t *)name;
	u.name.len = strlen(name);
	u.password.data = (uint8_t *)hashed;
	u.password.len = hashed ? strlen(hashed) : 0;
	o.no_password = no_password;
	u.options = &o;
	return (Authpb__User *)msg_copy(&u.base);
}

/* Replaces user i with a copy that has (add) or lacks role. */
static int user_set_role(auth_store *as, size_t i, const char *role, int add)
{
	Authpb__User *old = as->a_users[i];
	Authpb__User u = *old;
	char *roles[256];
	size_t n = 0;
	for (size_t k = 0; k < old->n_roles && n < 255; k++)
		if (strcmp(old->roles[k], role) != 0)
			roles[n++] = old->roles[k];
	if (add)
		roles[n++] = (char *)role;
	/* etcd keeps a user's roles sorted */
	for (size_t a = 1; a < n; a++)
		for (size_t b = a; b > 0 && strcmp(roles[b - 1], roles[b]) > 0; b--) {
			char *t = roles[b];
			roles[b] = roles[b - 1];
			roles[b - 1] = t;
		}
	u.roles = roles;
	u.n_roles = n;
	Authpb__User *c = (Authpb__User *)msg_copy(&u.base);
	if (c == NULL)
		return STORAGE_ERR_NOMEM;
	as->a_users[i] = c;
	authpb__user__free_unpacked(old, NULL);
	return 0;
}

static int role_set_perm(auth_store *as, size_t i, const Authpb__Permission *p,
			 const ProtobufCBinaryData *key, const ProtobufCBinaryData *end)
{
	Authpb__Role *old = as->a_roles[i];
	Authpb__Role r = *old;
	Authpb__Permission *perms[1024];
	size_t n = 0;
	int found = 0;
	for (size_t k = 0; k < old->n_keypermission && n < 1023; k++) {
		Authpb__Permission *q = old->keypermission[k];
		int same = bcmp_(q->key.data, q->key.len, key->data, key->len) == 0 &&
			   bcmp_(q->range_end.data, q->range_end.len, end->data, end->len) == 0;
		if (same) {
			found = 1;
			continue; /* replaced (grant) or dropped (revoke) */
		}
		perms[n++] = q;
	}
	if (p)
		perms[n++] = (Authpb__Permission *)p;
	else if (!found)
		return AUTH_ERR_PERMISSION_NOT_GRANTED;
	/* etcd keeps permissions sorted by key */
	for (size_t a = 1; a < n; a++)
		for (size_t b = a; b > 0 && bcmp_(perms[b - 1]->key.data, perms[b - 1]->key.len, perms[b]->key.data,
						   perms[b]->key.len) > 0; b--) {
			Authpb__Permission *t = perms[b];
			perms[b] = perms[b - 1];
			perms[b - 1] = t;
		}
	r.keypermission = perms;
	r.n_keypermission = n;
	Authpb__Role *c = (Authpb__Role *)msg_copy(&r.base);
	if (c == NULL)
		return STORAGE_ERR_NOMEM;
	as->a_roles[i] = c;
	authpb__role__free_unpacked(old, NULL);
	return 0;
}

static int apply_locked(auth_store *as, node_op op, const ProtobufCMessage *req)
{
	size_t i;
	switch (op) {
	case NODE_AUTH_ENABLE: {
		Authpb__User *root = find_user(as, ROOT, NULL);
		if (root == NULL)
			return AUTH_ERR_ROOT_USER_NOT_EXIST;
		if (!has_role(root, ROOT))
			return AUTH_ERR_ROOT_ROLE_NOT_EXIST;
		as->a_enabled = 1;
		return 0;
	}
	case NODE_AUTH_DISABLE:
		as->a_enabled = 0;
		return 0;
	case NODE_AUTH_AUTHENTICATE: {
		/* The password field carries the simple token the receiving member chose (empty
		 * for JWT, whose token is signed when the response is made). */
		const Etcdserverpb__AuthenticateRequest *r = (const Etcdserverpb__AuthenticateRequest *)req;
		if (find_user(as, r->name, NULL) == NULL)
			return AUTH_ERR_FAILED;
		if (as->a_token_kind == AUTH_TOKEN_SIMPLE)
			token_add(as, r->password, r->name);
		return 0;
	}
	case NODE_AUTH_USER_ADD: {
		const Etcdserverpb__AuthUserAddRequest *r = (const Etcdserverpb__AuthUserAddRequest *)req;
		if (r->name[0] == '\0')
			return AUTH_ERR_USER_EMPTY;
		if (find_user(as, r->name, NULL))
			return AUTH_ERR_USER_EXISTS;
		if (as->a_nusers == AUTH_MAX_USERS)
			return STORAGE_ERR_NOSPACE;
		Authpb__User *u = user_new(r->name, r->hashedpassword, r->options && r->options->no_password);
		if (u == NULL)
			return STORAGE_ERR_NOMEM;
		as->a_users[as->a_nusers++] = u;
		return 0;
	}
	case NODE_AUTH_USER_DELETE: {
		const Etcdserverpb__AuthUserDeleteRequest *r = (const Etcdserverpb__AuthUserDeleteRequest *)req;
		if (as->a_enabled && strcmp(r->name, ROOT) == 0)
			return AUTH_ERR_INVALID_MGMT;
		if (find_user(as, r->name, &i) == NULL)
			return AUTH_ERR_USER_NOT_FOUND;
		authpb__user__free_unpacked(as->a_users[i], NULL);
		memmove(&as->a_users[i], &as->a_users[i + 1], (as->a_nusers - i - 1) * sizeof(as->a_users[0]));
		as->a_nusers--;
		return 0;
	}
	case NODE_AUTH_USER_CHANGE_PW: {
		const Etcdserverpb__AuthUserChangePasswordRequest *r = (const Etcdserverpb__AuthUserChangePasswordRequest *)req;
		Authpb__User *old = find_user(as, r->name, &i);
		if (old == NULL)
			return AUTH_ERR_USER_NOT_FOUND;
		Authpb__User u = *old;
		u.password.data = (uint8_t *)r->hashedpassword;
		u.password.len = strlen(r->hashedpassword);
		Authpb__User *c = (Authpb__User *)msg_copy(&u.base);
		if (c == NULL)
			return STORAGE_ERR_NOMEM;
		as->a_users[i] = c;
		authpb__user__free_unpacked(old, NULL);
		return 0;
	}
	case NODE_AUTH_USER_GRANT: {
		const Etcdserverpb__AuthUserGrantRoleRequest *r = (const Etcdserverpb__AuthUserGrantRoleRequest *)req;
		if (find_user(as, r->user, &i) == NULL)
			return AUTH_ERR_USER_NOT_FOUND;
		if (strcmp(r->role, ROOT) != 0 && find_role(as, r->role, NULL) == NULL)
			return AUTH_ERR_ROLE_NOT_FOUND;
		return user_set_role(as, i, r->role, 1);
	}
	case NODE_AUTH_USER_REVOKE: {
		const Etcdserverpb__AuthUserRevokeRoleRequest *r = (const Etcdserverpb__AuthUserRevokeRoleRequest *)req;
		if (as->a_enabled && strcmp(r->name, ROOT) == 0 && strcmp(r->role, ROOT) == 0)
			return AUTH_ERR_INVALID_MGMT;
		Authpb__User *u = find_user(as, r->name, &i);
		if (u == NULL)
			return AUTH_ERR_USER_NOT_FOUND;
		if (!has_role(u, r->role))
			return AUTH_ERR_ROLE_NOT_GRANTED;
		return user_set_role(as, i, r->role, 0);
	}
	case NODE_AUTH_ROLE_ADD: {
		const Etcdserverpb__AuthRoleAddRequest *r = (const Etcdserverpb__AuthRoleAddRequest *)req;
		if (r->name[0] == '\0')
			return AUTH_ERR_ROLE_EMPTY;
		if (find_role(as, r->name, NULL))
			return AUTH_ERR_ROLE_EXISTS;
		if (as->a_nroles == AUTH_MAX_ROLES)
			return STORAGE_ERR_NOSPACE;
		Authpb__Role role = AUTHPB__ROLE__INIT;
		role.name.data = (uint8_t *)r->name;
		role.name.len = strlen(r->name);
		Authpb__Role *c = (Authpb__Role *)msg_copy(&role.base);
		if (c == NULL)
			return STORAGE_ERR_NOMEM;
		as->a_roles[as->a_nroles++] = c;
		return 0;
	}
	case NODE_AUTH_ROLE_DELETE: {
		const Etcdserverpb__AuthRoleDeleteRequest *r = (const Etcdserverpb__AuthRoleDeleteRequest *)req;
		if (as->a_enabled && strcmp(r->role, ROOT) == 0)
			return AUTH_ERR_INVALID_MGMT;
		if (find_role(as, r->role, &i) == NULL)
			return AUTH_ERR_ROLE_NOT_FOUND;
		authpb__role__free_unpacked(as->a_roles[i], NULL);
		memmove(&as->a_roles[i], &as->a_roles[i + 1], (as->a_nroles - i - 1) * sizeof(as->a_roles[0]));
		as->a_nroles--;
		/* etcd also takes the role away from every user that had it */
		for (size_t k = 0; k < as->a_nusers; k++)
			if (has_role(as->a_users[k], r->role))
				user_set_role(as, k, r->role, 0);
		return 0;
	}
	case NODE_AUTH_ROLE_GRANT: {
		const Etcdserverpb__AuthRoleGrantPermissionRequest *r = (const Etcdserverpb__AuthRoleGrantPermissionRequest *)req;
		if (find_role(as, r->name, &i) == NULL)
			return AUTH_ERR_ROLE_NOT_FOUND;
		if (r->perm == NULL)
			return AUTH_ERR_PERMISSION_NOT_GRANTED;
		return role_set_perm(as, i, r->perm, &r->perm->key, &r->perm->range_end);
	}
	case NODE_AUTH_ROLE_REVOKE: {
		const Etcdserverpb__AuthRoleRevokePermissionRequest *r = (const Etcdserverpb__AuthRoleRevokePermissionRequest *)req;
		if (find_role(as, r->role, &i) == NULL)
			return AUTH_ERR_ROLE_NOT_FOUND;
		return role_set_perm(as, i, NULL, &r->key, &r->range_end);
	}
	default:
		return STORAGE_ERR_INVALID;
	}
}

int auth_apply(auth_store *as, storage_batch *b, node_op op, const ProtobufCMessage *req, storage_arena *a,
	       ProtobufCMessage **resp)
{
	pthread_mutex_lock(&as->a_mu);
	int rc = apply_locked(as, op, req);
	if (rc == 0 && op != NODE_AUTH_AUTHENTICATE) {
		/* etcd's AuthEnable keeps the auth revision (tokens issued before stay good);
		 * every other change commits a new one. */
		if (op != NODE_AUTH_ENABLE)
			as->a_revision++;
		rc = persist(as, b);
	}
	uint64_t revision = as->a_revision;
	pthread_mutex_unlock(&as->a_mu);
	/* Every Auth response is a header alone, except Authenticate's token (filled by the
	 * proposer when it answers). */
	static const ProtobufCMessageDescriptor *const descs[] = {
		[NODE_AUTH_ENABLE - NODE_AUTH_ENABLE] = &etcdserverpb__auth_enable_response__descriptor,
		[NODE_AUTH_DISABLE - NODE_AUTH_ENABLE] = &etcdserverpb__auth_disable_response__descriptor,
		[NODE_AUTH_AUTHENTICATE - NODE_AUTH_ENABLE] = &etcdserverpb__authenticate_response__descriptor,
		[NODE_AUTH_USER_ADD - NODE_AUTH_ENABLE] = &etcdserverpb__auth_user_add_response__descriptor,
		[NODE_AUTH_USER_DELETE - NODE_AUTH_ENABLE] = &etcdserverpb__auth_user_delete_response__descriptor,
		[NODE_AUTH_USER_CHANGE_PW - NODE_AUTH_ENABLE] = &etcdserverpb__auth_user_change_password_response__descriptor,
		[NODE_AUTH_USER_GRANT - NODE_AUTH_ENABLE] = &etcdserverpb__auth_user_grant_role_response__descriptor,
		[NODE_AUTH_USER_REVOKE - NODE_AUTH_ENABLE] = &etcdserverpb__auth_user_revoke_role_response__descriptor,
		[NODE_AUTH_ROLE_ADD - NODE_AUTH_ENABLE] = &etcdserverpb__auth_role_add_response__descriptor,
		[NODE_AUTH_ROLE_DELETE - NODE_AUTH_ENABLE] = &etcdserverpb__auth_role_delete_response__descriptor,
		[NODE_AUTH_ROLE_GRANT - NODE_AUTH_ENABLE] = &etcdserverpb__auth_role_grant_permission_response__descriptor,
		[NODE_AUTH_ROLE_REVOKE - NODE_AUTH_ENABLE] = &etcdserverpb__auth_role_revoke_permission_response__descriptor,
	};
	const ProtobufCMessageDescriptor *d = descs[op - NODE_AUTH_ENABLE];
	ProtobufCMessage *m = storage_arena_alloc(a, d->sizeof_message);
	Etcdserverpb__ResponseHeader *h = storage_arena_alloc(a, sizeof(*h));
	if (m == NULL || h == NULL)
		return rc ? rc : STORAGE_ERR_NOMEM;
	d->message_init(m);
	etcdserverpb__response_header__init(h);
	h->revision = storage_batch_revision(b);
	((struct {
		ProtobufCMessage base;
		Etcdserverpb__ResponseHeader *header;
	} *)m)->header = h;
	if (op == NODE_AUTH_AUTHENTICATE && rc == 0) {
		const Etcdserverpb__AuthenticateRequest *r = (const Etcdserverpb__AuthenticateRequest *)req;
		char *jwt = NULL;
		const char *tok = r->password;
		/* etcd assigns a JWT as the entry applies, with the auth revision at that point. */
		if (as->a_token_kind == AUTH_TOKEN_JWT) {
			int jrc = jwt_sign(as->a_jwt, r->name, revision, (int64_t)time(NULL), &jwt);
			if (jrc == JWT_ERR_VERIFY_ONLY)
				rc = AUTH_ERR_VERIFY_ONLY;
			else if (jrc == JWT_ERR_KEY)
				rc = AUTH_ERR_JWT_KEY;
			else if (jrc)
				rc = STORAGE_ERR_NOMEM;
			tok = jwt ? jwt : "";
		}
		((Etcdserverpb__AuthenticateResponse *)m)->token = storage_arena_dup(a, tok, strlen(tok) + 1);
		free(jwt);
	}
	*resp = m;
	return rc;
}

/* ---- the Auth service ---- */

/* Auth management needs root once auth is on. */
static int admin_ok(server_ctx *sc, api_call *call)
{
	size_t len = 0;
	const char *tok = call_token(call, &len);
	int rc = auth_check_admin(sc->auth, tok, len);
	if (rc) {
		server_fail_storage(call, rc);
		return 0;
	}
	return 1;
}

static void submit(server_ctx *sc, node_op op, api_call *call, const ProtobufCMessage *msg)
{
	if (op != NODE_AUTH_AUTHENTICATE && !admin_ok(sc, call))
		return;
	node_submit(sc->nd, op, call, msg);
}

#define ROUTE(fn, op)                                                                               \
	static void fn(void *ctx, api_call *call, const ProtobufCMessage *msg)                     \
	{                                                                                           \
		submit(ctx, op, call, msg);                                                         \
	}
ROUTE(auth_enable_rpc, NODE_AUTH_ENABLE)
ROUTE(auth_disable_rpc, NODE_AUTH_DISABLE)
ROUTE(user_delete_rpc, NODE_AUTH_USER_DELETE)
ROUTE(user_grant_rpc, NODE_AUTH_USER_GRANT)
ROUTE(user_revoke_rpc, NODE_AUTH_USER_REVOKE)
ROUTE(role_add_rpc, NODE_AUTH_ROLE_ADD)
ROUTE(role_delete_rpc, NODE_AUTH_ROLE_DELETE)
ROUTE(role_grant_rpc, NODE_AUTH_ROLE_GRANT)
ROUTE(role_revoke_rpc, NODE_AUTH_ROLE_REVOKE)

/* Passwords are hashed here, before the log: every member stores the same hash. bcrypt at
 * --bcrypt-cost, as etcd hashes them ("$2a$"): snapshots and data dirs then carry users that
 * log in on etcd as well as on Keelson. */
static int set_hash(const char *password, int cost, char **hashed)
{
	char salt[64];
	struct crypt_data *cd = calloc(1, sizeof(*cd));
	const char *h = NULL;
	if (cost < 4)
		cost = 10; /* Go's bcrypt: below its minimum cost, the default */
	if (cd && crypt_gensalt_rn("$2a$", (unsigned long)cost, NULL, 0, salt, sizeof(salt)) != NULL)
		h = crypt_r(password, salt, cd);
	*hashed = h && h[0] == '$' ? strdup(h) : NULL; /* freed with the request */
	if (cd)
		OPENSSL_cleanse(cd, sizeof(*cd));
	free(cd);
	return *hashed ? 0 : -1;
}

/* Replaces a request's clear password by its hash (in *hashed); the clear text is wiped and
 * never reaches the log. */
static int hash_into(char **password, int cost, char **hashed)
{
	char *h;
	if (set_hash(*password, cost, &h) != 0)
		return -1;
	if (*hashed != protobuf_c_empty_string)
		free(*hashed);
	*hashed = h;
	OPENSSL_cleanse(*password, strlen(*password));
	(*password)[0] = '\0';
	return 0;
}

static void user_add_rpc(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	Etcdserverpb__AuthUserAddRequest *r = (Etcdserverpb__AuthUserAddRequest *)msg;
	if (r->name[0] == '\0') {
		server_fail_storage(call, AUTH_ERR_USER_EMPTY);
		return;
	}
	int no_password = r->options && r->options->no_password;
	if (!no_password && r->password[0] == '\0' && r->hashedpassword[0] == '\0') {
		server_fail_storage(call, AUTH_ERR_NO_PASSWORD);
		return;
	}
	if (!no_password && r->password[0] != '\0' && hash_into(&r->password, (int)sc->cfg->bcrypt_cost, &r->hashedpassword) != 0) {
		api_call_fail(call, API_ERR_INTERNAL);
		return;
	}
	submit(sc, NODE_AUTH_USER_ADD, call, msg);
}

static void user_change_pw_rpc(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	Etcdserverpb__AuthUserChangePasswordRequest *r = (Etcdserverpb__AuthUserChangePasswordRequest *)msg;
	if (r->password[0] != '\0' && hash_into(&r->password, (int)sc->cfg->bcrypt_cost, &r->hashedpassword) != 0) {
		api_call_fail(call, API_ERR_INTERNAL);
		return;
	}
	submit(sc, NODE_AUTH_USER_CHANGE_PW, call, msg);
}

static void authenticate_rpc(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	Etcdserverpb__AuthenticateRequest *r = (Etcdserverpb__AuthenticateRequest *)msg;
	auth_store *as = sc->auth;
	/* The hash is checked outside the lock: bcrypt takes tens of milliseconds, and every
	 * request's permission check takes the lock while auth is on. */
	uint8_t stored[256];
	ProtobufCBinaryData hash = {0, stored};
	pthread_mutex_lock(&as->a_mu);
	int enabled = as->a_enabled;
	Authpb__User *u = find_user(as, r->name, NULL);
	if (u && !(u->options && u->options->no_password) && u->password.len <= sizeof(stored)) {
		memcpy(stored, u->password.data, u->password.len);
		hash.len = u->password.len;
	}
	pthread_mutex_unlock(&as->a_mu);
	int ok = hash.len > 0 && check_password(&hash, r->password);
	OPENSSL_cleanse(stored, sizeof(stored));
	if (!enabled) {
		server_fail_storage(call, AUTH_ERR_NOT_ENABLED);
		return;
	}
	if (!ok) {
		server_fail_storage(call, AUTH_ERR_FAILED);
		return;
	}
	/* etcd's simple token: 16 random letters, a dot, and a counter. */
	static const char letters[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
	uint8_t rnd[16];
	char tok[40];
	if (RAND_bytes(rnd, sizeof(rnd)) != 1) {
		api_call_fail(call, API_ERR_INTERNAL);
		return;
	}
	for (int i = 0; i < 16; i++)
		tok[i] = letters[rnd[i] % 52];
	static _Atomic uint64_t counter;
	snprintf(tok + 16, sizeof(tok) - 16, ".%llu", (unsigned long long)++counter);
	OPENSSL_cleanse(r->password, strlen(r->password));
	char *t = strdup(as->a_token_kind == AUTH_TOKEN_SIMPLE ? tok : "");
	if (t == NULL) {
		api_call_fail(call, API_ERR_INTERNAL);
		return;
	}
	free(r->password);
	r->password = t; /* the entry carries the token, never the password */
	submit(sc, NODE_AUTH_AUTHENTICATE, call, msg);
}

static void auth_status_rpc(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	Etcdserverpb__AuthStatusResponse resp = ETCDSERVERPB__AUTH_STATUS_RESPONSE__INIT;
	Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
	server_fill_header(sc, &h);
	h.revision = storage_current_revision(sc->st);
	pthread_mutex_lock(&sc->auth->a_mu);
	resp.enabled = sc->auth->a_enabled;
	resp.authrevision = sc->auth->a_revision;
	pthread_mutex_unlock(&sc->auth->a_mu);
	resp.header = &h;
	api_call_reply(call, &resp.base);
}

static void user_get_rpc(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	const Etcdserverpb__AuthUserGetRequest *r = (const Etcdserverpb__AuthUserGetRequest *)msg;
	if (!admin_ok(sc, call))
		return;
	Etcdserverpb__AuthUserGetResponse resp = ETCDSERVERPB__AUTH_USER_GET_RESPONSE__INIT;
	Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
	server_fill_header(sc, &h);
	h.revision = storage_current_revision(sc->st);
	resp.header = &h;
	pthread_mutex_lock(&sc->auth->a_mu);
	Authpb__User *u = find_user(sc->auth, r->name, NULL);
	if (u) {
		resp.roles = u->roles;
		resp.n_roles = u->n_roles;
		api_call_reply(call, &resp.base);
	}
	pthread_mutex_unlock(&sc->auth->a_mu);
	if (!u)
		server_fail_storage(call, AUTH_ERR_USER_NOT_FOUND);
}

/* Sorted copies of the names of users (roles == 0) or roles; *n of them, malloc'd. */
static char **sorted_names(auth_store *as, int roles, size_t *n)
{
	pthread_mutex_lock(&as->a_mu);
	size_t count = roles ? as->a_nroles : as->a_nusers;
	char **names = calloc(count ? count : 1, sizeof(char *));
	*n = 0;
	for (size_t i = 0; names && i < count; i++) {
		const ProtobufCBinaryData *nm = roles ? &as->a_roles[i]->name : &as->a_users[i]->name;
		char *c = malloc(nm->len + 1);
		if (c == NULL)
			break;
		memcpy(c, nm->data, nm->len);
		c[nm->len] = '\0';
		names[(*n)++] = c;
	}
	pthread_mutex_unlock(&as->a_mu);
	for (size_t a = 1; names && a < *n; a++)
		for (size_t b = a; b > 0 && strcmp(names[b - 1], names[b]) > 0; b--) {
			char *t = names[b];
			names[b] = names[b - 1];
			names[b - 1] = t;
		}
	return names;
}

static void free_names(char **names, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(names[i]);
	free(names);
}

static void user_list_rpc(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	if (!admin_ok(sc, call))
		return;
	Etcdserverpb__AuthUserListResponse resp = ETCDSERVERPB__AUTH_USER_LIST_RESPONSE__INIT;
	Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
	server_fill_header(sc, &h);
	h.revision = storage_current_revision(sc->st);
	resp.header = &h;
	resp.users = sorted_names(sc->auth, 0, &resp.n_users);
	api_call_reply(call, &resp.base);
	free_names(resp.users, resp.n_users);
}

static void role_get_rpc(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	const Etcdserverpb__AuthRoleGetRequest *r = (const Etcdserverpb__AuthRoleGetRequest *)msg;
	if (!admin_ok(sc, call))
		return;
	Etcdserverpb__AuthRoleGetResponse resp = ETCDSERVERPB__AUTH_ROLE_GET_RESPONSE__INIT;
	Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
	server_fill_header(sc, &h);
	h.revision = storage_current_revision(sc->st);
	resp.header = &h;
	pthread_mutex_lock(&sc->auth->a_mu);
	Authpb__Role *role = find_role(sc->auth, r->role, NULL);
	int found = role != NULL || strcmp(r->role, ROOT) == 0;
	if (role) {
		resp.perm = role->keypermission;
		resp.n_perm = role->n_keypermission;
	}
	if (found)
		api_call_reply(call, &resp.base);
	pthread_mutex_unlock(&sc->auth->a_mu);
	if (!found)
		server_fail_storage(call, AUTH_ERR_ROLE_NOT_FOUND);
}

static void role_list_rpc(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	if (!admin_ok(sc, call))
		return;
	Etcdserverpb__AuthRoleListResponse resp = ETCDSERVERPB__AUTH_ROLE_LIST_RESPONSE__INIT;
	Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
	server_fill_header(sc, &h);
	h.revision = storage_current_revision(sc->st);
	resp.header = &h;
	resp.roles = sorted_names(sc->auth, 1, &resp.n_roles);
	api_call_reply(call, &resp.base);
	free_names(resp.roles, resp.n_roles);
}

int auth_register(api_server *as, server_ctx *sc)
{
	static const struct {
		const char *path;
		api_unary_fn fn;
	} routes[] = {
		{"/etcdserverpb.Auth/AuthEnable", auth_enable_rpc},
		{"/etcdserverpb.Auth/AuthDisable", auth_disable_rpc},
		{"/etcdserverpb.Auth/AuthStatus", auth_status_rpc},
		{"/etcdserverpb.Auth/Authenticate", authenticate_rpc},
		{"/etcdserverpb.Auth/UserAdd", user_add_rpc},
		{"/etcdserverpb.Auth/UserGet", user_get_rpc},
		{"/etcdserverpb.Auth/UserList", user_list_rpc},
		{"/etcdserverpb.Auth/UserDelete", user_delete_rpc},
		{"/etcdserverpb.Auth/UserChangePassword", user_change_pw_rpc},
		{"/etcdserverpb.Auth/UserGrantRole", user_grant_rpc},
		{"/etcdserverpb.Auth/UserRevokeRole", user_revoke_rpc},
		{"/etcdserverpb.Auth/RoleAdd", role_add_rpc},
		{"/etcdserverpb.Auth/RoleGet", role_get_rpc},
		{"/etcdserverpb.Auth/RoleList", role_list_rpc},
		{"/etcdserverpb.Auth/RoleDelete", role_delete_rpc},
		{"/etcdserverpb.Auth/RoleGrantPermission", role_grant_rpc},
		{"/etcdserverpb.Auth/RoleRevokePermission", role_revoke_rpc},
	};
	for (size_t i = 0; i < sizeof(routes) / sizeof(routes[0]); i++) {
		int rc = api_server_route(as, routes[i].path, routes[i].fn, sc);
		if (rc)
			return rc;
	}
	return 0;
}
