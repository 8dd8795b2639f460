/*
 * etcdimport.c - start a member on a stopped etcd member's data dir: import it, once.
 *
 * etcd keeps member/snap/db (the bbolt backend: keys, leases, auth, members, alarms, and
 * meta/consistent_index, the last raft index whose effects are in the file) and member/wal/
 * (the raft log, hard state and the member's and cluster's ids). When --data-dir holds both
 * and no Keelson environment yet (member/data.mdb), the member imports them before it opens
 * storage:
 *   1. The WAL is read and checked whole (storage_etcd_wal_read): a broken CRC chain, a
 *      record cut short anywhere but at the torn tail of the last file, or conflicting
 *      metadata refuses the import before anything is written.
 *   2. The backend file goes through storage_import_etcd() into member/import.tmp: every
 *      revision, the compaction state, leases; the buckets storage does not hold are
 *      collected here: users, roles and the auth switch and revision, alarms, and members.
 *      The member list is etcd 3.4's own: the v2 store of the newest member/snap/NNN.snap
 *      plus the WAL's ConfChanges and member attribute publications after it (the backend's
 *      "members" bucket minus "members_removed" only when neither is there).
 *   3. The raft state. The WAL entries after consistent_index up to the commit index are
 *      converted to Keelson's entry format and applied by server/apply.c, the node loop's own
 *      apply, over the imported state. etcd 3.4 moves consistent_index only with key-space
 *      writes, so these are typically auth, lease grant, member and empty entries that etcd
 *      itself re-applies after a restart (a user or lease that already exists is refused
 *      harmlessly, as in etcd), or writes etcd had committed but not applied. Membership
 *      changes (raft ConfChange entries) up to the commit index are applied to the member
 *      list. The raft snapshot point is then the commit index (with its entry's term); the
 *      entries after it stay in the log, converted, for the cluster to decide (a member's
 *      own commit index may lag the leader's: dropping entries could lose a write the
 *      cluster committed); a lone voter's entries are all committed. The hard state (term,
 *      vote) and etcd's member and cluster ids are kept, so the member answers with
 *      etcd's ids.
 *   4. import.tmp/data.mdb is renamed to member/data.mdb (after fsync) and the directory
 *      removed. etcd's own files are never written, so etcd can still start on them.
 *
 * Users keep etcd's bcrypt password hashes, which server/auth.c checks with crypt(3).
 * Limits: etcd 3.5's ConfChangeV2 entries after consistent_index are refused.
 */
#define _GNU_SOURCE /* F_OFD_GETLK */
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/rand.h>

#include "crc32c/crc32c.h"
#include "raft/raft.h"
#include "server/server.h"

#define IMPORT_MAX_MEMBERS 128
#define IMPORT_MAX_AUTH 4096
#define IMPORT_MAX_ALARMS 64

/* ---- a member as etcd's membership store writes it, in JSON ---- */

typedef struct json {
	const char *p, *e;
} json;

static void j_ws(json *j)
{
	while (j->p < j->e && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
		j->p++;
}

static int j_lit(json *j, char c)
{
	j_ws(j);
	if (j->p < j->e && *j->p == c) {
		j->p++;
		return 1;
	}
	return 0;
}

static void put_utf8(char *o, size_t *n, unsigned cp)
{
	if (cp < 0x80) {
		o[(*n)++] = (char)cp;
	} else if (cp < 0x800) {
		o[(*n)++] = (char)(0xc0 | cp >> 6);
		o[(*n)++] = (char)(0x80 | (cp & 0x3f));
	} else {
		o[(*n)++] = (char)(0xe0 | cp >> 12);
		o[(*n)++] = (char)(0x80 | ((cp >> 6) & 0x3f));
		o[(*n)++] = (char)(0x80 | (cp & 0x3f));
	}
}

/* A JSON string, malloc'd (NUL-terminated); NULL if malformed. Surrogate pairs are kept as
 * two 3-byte sequences (Go escapes nothing but control characters, <, > and & in URLs and
 * names, so they do not occur). */
static char *j_string(json *j)
{
	if (!j_lit(j, '"'))
		return NULL;
	char *o = malloc((size_t)(j->e - j->p) * 3 + 1);
	size_t n = 0;
	if (o == NULL)
		return NULL;
	while (j->p < j->e && *j->p != '"') {
		char c = *j->p++;
		if (c != '\\') {
			o[n++] = c;
			continue;
		}
		if (j->p == j->e)
			goto bad;
		c = *j->p++;
		switch (c) {
		case '"': case '\\': case '/': o[n++] = c; break;
		case 'b': o[n++] = '\b'; break;
		case 'f': o[n++] = '\f'; break;
		case 'n': o[n++] = '\n'; break;
		case 'r': o[n++] = '\r'; break;
		case 't': o[n++] = '\t'; break;
		case 'u': {
			unsigned cp = 0;
			for (int i = 0; i < 4; i++) {
				if (j->p == j->e)
					goto bad;
				char h = *j->p++;
				int v = h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10
					: h >= 'A' && h <= 'F' ? h - 'A' + 10 : -1;
				if (v < 0)
					goto bad;
				cp = cp << 4 | (unsigned)v;
			}
			if (cp == 0)
				goto bad;
			put_utf8(o, &n, cp);
			break;
		}
		default:
			goto bad;
		}
	}
	if (j->p == j->e)
		goto bad;
	j->p++;
	o[n] = '\0';
	return o;
bad:
	free(o);
	return NULL;
}

/* Skips any value (depth-limited); 0 or -1. */
static int j_skip(json *j, int depth)
{
	j_ws(j);
	if (j->p == j->e || depth > 64)
		return -1;
	if (*j->p == '"') {
		char *s = j_string(j);
		free(s);
		return s ? 0 : -1;
	}
	if (*j->p == '[' || *j->p == '{') {
		char close = *j->p == '[' ? ']' : '}';
		int obj = *j->p == '{';
		j->p++;
		if (j_lit(j, close))
			return 0;
		do {
			if (obj && (j_skip(j, depth + 1) || !j_lit(j, ':')))
				return -1;
			if (j_skip(j, depth + 1))
				return -1;
		} while (j_lit(j, ','));
		return j_lit(j, close) ? 0 : -1;
	}
	const char *s = j->p;
	while (j->p < j->e && strchr("0123456789+-.eEtruefalsn", *j->p))
		j->p++;
	return j->p > s ? 0 : -1;
}

/* A JSON array of strings, replacing *out (malloc'd strings). */
static int j_strings(json *j, char ***out, size_t *n)
{
	for (size_t i = 0; i < *n; i++)
		free((*out)[i]);
	free(*out);
	*out = NULL;
	*n = 0;
	if (!j_lit(j, '['))
		return -1;
	if (j_lit(j, ']'))
		return 0;
	do {
		char *s = j_string(j);
		char **nv = s ? realloc(*out, (*n + 1) * sizeof(char *)) : NULL;
		if (nv == NULL) {
			free(s);
			return -1;
		}
		*out = nv;
		(*out)[(*n)++] = s;
	} while (j_lit(j, ','));
	return j_lit(j, ']') ? 0 : -1;
}

static void member_clear(Etcdserverpb__Member *m)
{
	if (m->name != protobuf_c_empty_string)
		free(m->name);
	for (size_t i = 0; i < m->n_peerurls; i++)
		free(m->peerurls[i]);
	for (size_t i = 0; i < m->n_clienturls; i++)
		free(m->clienturls[i]);
	free(m->peerurls);
	free(m->clienturls);
	etcdserverpb__member__init(m);
}

/* The fields of {"id":N,"peerURLs":[...],"isLearner":true,"name":"...","clientURLs":[...]}
 * into *m, replacing those present (strings malloc'd; member_clear() frees them). Any subset
 * of the fields (etcd's v2 store keeps raftAttributes and attributes apart); *has_id tells
 * whether "id" was there. On error *m may be partly updated. */
static int member_fields_from_json(const uint8_t *p, size_t n, Etcdserverpb__Member *m,
				   int *has_id_out)
{
	json j = {(const char *)p, (const char *)p + n};
	int rc = j_lit(&j, '{') ? 0 : -1, has_id = 0;
	if (rc == 0 && !j_lit(&j, '}')) {
		while (rc == 0) {
			char *key = j_string(&j);
			if (key == NULL || !j_lit(&j, ':')) {
				free(key);
				rc = -1;
				break;
			}
			j_ws(&j);
			if (strcmp(key, "id") == 0) {
				char *end;
				errno = 0;
				unsigned long long v = strtoull(j.p, &end, 10);
				if (end == j.p || end > j.e || errno || *j.p == '-')
					rc = -1;
				m->id = v;
				j.p = end;
				has_id = 1;
			} else if (strcmp(key, "peerURLs") == 0) {
				rc = j_strings(&j, &m->peerurls, &m->n_peerurls);
			} else if (strcmp(key, "clientURLs") == 0) {
				rc = j_strings(&j, &m->clienturls, &m->n_clienturls);
			} else if (strcmp(key, "name") == 0) {
				char *s = j_string(&j);
				if (s == NULL)
					rc = -1;
				else {
					if (m->name != protobuf_c_empty_string)
						free(m->name);
					m->name = s;
				}
			} else if (strcmp(key, "isLearner") == 0) {
				if (j.e - j.p >= 4 && memcmp(j.p, "true", 4) == 0) {
					m->islearner = 1;
					j.p += 4;
				} else if (j.e - j.p >= 5 && memcmp(j.p, "false", 5) == 0) {
					m->islearner = 0;
					j.p += 5;
				} else {
					rc = -1;
				}
			} else {
				rc = j_skip(&j, 0);
			}
			free(key);
			if (rc || !j_lit(&j, ','))
				break;
		}
		if (rc == 0 && !j_lit(&j, '}'))
			rc = -1;
	}
	j_ws(&j);
	if (rc == 0 && j.p != j.e)
		rc = -1;
	*has_id_out = has_id;
	return rc;
}

/* A whole member (bucket "members", a ConfChange's context): "id" required. */
static int member_from_json(const uint8_t *p, size_t n, Etcdserverpb__Member *m)
{
	int has_id = 0;
	etcdserverpb__member__init(m);
	int rc = member_fields_from_json(p, n, m, &has_id);
	if (rc == 0 && !has_id)
		rc = -1;
	if (rc)
		member_clear(m);
	return rc;
}


/* ---- what the import collects from the buckets storage does not hold ---- */

typedef struct import_ctx {
	Etcdserverpb__Member members[IMPORT_MAX_MEMBERS];
	size_t n_members;
	uint64_t removed[IMPORT_MAX_MEMBERS];
	size_t n_removed;
	uint8_t *users[IMPORT_MAX_AUTH], *roles[IMPORT_MAX_AUTH]; /* encoded, malloc'd */
	size_t user_len[IMPORT_MAX_AUTH], role_len[IMPORT_MAX_AUTH];
	size_t n_users, n_roles;
	int auth_enabled;
	uint64_t auth_revision;
	uint64_t alarm_member[IMPORT_MAX_ALARMS];
	uint32_t alarm_type[IMPORT_MAX_ALARMS];
	size_t n_alarms;
	char err[256];
} import_ctx;

static uint8_t *dup_bytes(const uint8_t *p, size_t n)
{
	uint8_t *d = malloc(n ? n : 1);
	if (d && n)
		memcpy(d, p, n);
	return d;
}

static int visit(void *vctx, const char *bucket, const uint8_t *key, size_t klen, const uint8_t *val,
		 size_t vlen)
{
	import_ctx *c = vctx;
	if (strcmp(bucket, "members") == 0) {
		if (c->n_members == IMPORT_MAX_MEMBERS ||
		    member_from_json(val, vlen, &c->members[c->n_members]) != 0) {
			snprintf(c->err, sizeof(c->err), "bucket members: entry %.*s is not a member",
				 (int)(klen < 32 ? klen : 32), (const char *)key);
			return STORAGE_ERR_CORRUPT;
		}
		c->n_members++;
	} else if (strcmp(bucket, "members_removed") == 0) {
		char hex[32];
		if (klen == 0 || klen >= sizeof(hex) || c->n_removed == IMPORT_MAX_MEMBERS)
			return STORAGE_ERR_CORRUPT;
		memcpy(hex, key, klen);
		hex[klen] = '\0';
		char *end;
		c->removed[c->n_removed++] = strtoull(hex, &end, 16);
		if (*end)
			return STORAGE_ERR_CORRUPT;
	} else if (strcmp(bucket, "authUsers") == 0 || strcmp(bucket, "authRoles") == 0) {
		int user = bucket[4] == 'U';
		/* Checked here so that a bad entry refuses the import, not a later start. */
		ProtobufCMessage *m = user ? (ProtobufCMessage *)authpb__user__unpack(NULL, vlen, val)
					   : (ProtobufCMessage *)authpb__role__unpack(NULL, vlen, val);
		if (m == NULL) {
			snprintf(c->err, sizeof(c->err), "bucket %s: entry %.*s does not decode", bucket,
				 (int)(klen < 64 ? klen : 64), (const char *)key);
			return STORAGE_ERR_CORRUPT;
		}
		protobuf_c_message_free_unpacked(m, NULL);
		size_t *n = user ? &c->n_users : &c->n_roles;
		if (*n == IMPORT_MAX_AUTH)
			return STORAGE_ERR_CORRUPT;
		uint8_t *d = dup_bytes(val, vlen);
		if (d == NULL)
			return STORAGE_ERR_NOMEM;
		(user ? c->users : c->roles)[*n] = d;
		(user ? c->user_len : c->role_len)[*n] = vlen;
		(*n)++;
	} else if (strcmp(bucket, "auth") == 0) {
		if (klen == 11 && memcmp(key, "authEnabled", 11) == 0 && vlen == 1)
			c->auth_enabled = val[0] == 1;
		else if (klen == 12 && memcmp(key, "authRevision", 12) == 0 && vlen == 8)
			for (int i = 0; i < 8; i++)
				c->auth_revision = c->auth_revision << 8 | val[i];
	} else if (strcmp(bucket, "alarm") == 0) {
		/* The key is an encoded AlarmMember; the value is empty. */
		Etcdserverpb__AlarmMember *am = etcdserverpb__alarm_member__unpack(NULL, klen, key);
		if (am == NULL)
			return STORAGE_ERR_CORRUPT;
		if (c->n_alarms < IMPORT_MAX_ALARMS && am->alarm != ETCDSERVERPB__ALARM_TYPE__NONE) {
			c->alarm_member[c->n_alarms] = am->memberid;
			c->alarm_type[c->n_alarms++] = (uint32_t)am->alarm;
		}
		etcdserverpb__alarm_member__free_unpacked(am, NULL);
	}
	return 0;
}

static void import_ctx_free(import_ctx *c)
{
	for (size_t i = 0; i < c->n_members; i++)
		member_clear(&c->members[i]);
	for (size_t i = 0; i < c->n_users; i++)
		free(c->users[i]);
	for (size_t i = 0; i < c->n_roles; i++)
		free(c->roles[i]);
}

static Etcdserverpb__Member *find_member(import_ctx *c, uint64_t id, size_t *idx)
{
	for (size_t i = 0; i < c->n_members; i++)
		if (c->members[i].id == id) {
			if (idx)
				*idx = i;
			return &c->members[i];
		}
	return NULL;
}

static void remove_member(import_ctx *c, uint64_t id)
{
	size_t i;
	if (find_member(c, id, &i) == NULL)
		return;
	member_clear(&c->members[i]);
	memmove(&c->members[i], &c->members[i + 1], (c->n_members - i - 1) * sizeof(c->members[0]));
	c->n_members--;
}

/* ---- WAL entries into Keelson's ---- */

static int get_varint(const uint8_t **p, const uint8_t *e, uint64_t *v)
{
	*v = 0;
	for (int s = 0; s < 64; s += 7) {
		if (*p == e)
			return -1;
		uint8_t b = *(*p)++;
		*v |= (uint64_t)(b & 0x7f) << s;
		if (!(b & 0x80))
			return 0;
	}
	return -1;
}

/* Walks a message's fields; fn gets (field, wire, varint, bytes, len). -1 if malformed. */
typedef int (*field_fn)(void *ctx, uint32_t num, int wire, uint64_t v, const uint8_t *b, size_t n);
static int pb_walk(const uint8_t *p, size_t len, field_fn fn, void *ctx)
{
	const uint8_t *e = p + len;
	while (p < e) {
		uint64_t tag, v = 0;
		const uint8_t *b = NULL;
		if (get_varint(&p, e, &tag) || (tag >> 3) == 0 || (tag >> 3) > 0x1fffffff)
			return -1;
		int wire = (int)(tag & 7);
		if (wire == 0) {
			if (get_varint(&p, e, &v))
				return -1;
		} else if (wire == 1 || wire == 5) {
			size_t k = wire == 1 ? 8 : 4;
			if ((size_t)(e - p) < k)
				return -1;
			p += k;
		} else if (wire == 2) {
			if (get_varint(&p, e, &v) || v > (uint64_t)(e - p))
				return -1;
			b = p;
			p += v;
		} else {
			return -1;
		}
		if (fn(ctx, (uint32_t)(tag >> 3), wire, v, b, (size_t)v) != 0)
			return -1;
	}
	return 0;
}

typedef struct irr {
	uint32_t field;       /* the request's field in InternalRaftRequest, 0 if none */
	const uint8_t *body;
	size_t len;
	int requests;         /* how many request fields (etcd sets exactly one) */
} irr;

static int irr_field(void *ctx, uint32_t num, int wire, uint64_t v, const uint8_t *b, size_t n)
{
	irr *r = ctx;
	(void)v;
	if (num == 1 || num == 100)
		return (num == 1 && wire != 0) || (num == 100 && wire != 2) ? -1 : 0;
	if (wire != 2)
		return -1; /* every other field of InternalRaftRequest is a message */
	r->field = num;
	r->body = b;
	r->len = n;
	r->requests++;
	return 0;
}

static const struct {
	uint32_t field;
	node_op op;
	const ProtobufCMessageDescriptor *d;
} irr_ops[] = {
	{4, NODE_PUT, &etcdserverpb__put_request__descriptor},
	{5, NODE_DELETE_RANGE, &etcdserverpb__delete_range_request__descriptor},
	{6, NODE_TXN, &etcdserverpb__txn_request__descriptor},
	{7, NODE_COMPACT, &etcdserverpb__compaction_request__descriptor},
	{8, NODE_LEASE_GRANT, &etcdserverpb__lease_grant_request__descriptor},
	{9, NODE_LEASE_REVOKE, &etcdserverpb__lease_revoke_request__descriptor},
	{10, NODE_ALARM, &etcdserverpb__alarm_request__descriptor},
	{1000, NODE_AUTH_ENABLE, &etcdserverpb__auth_enable_request__descriptor},
	{1011, NODE_AUTH_DISABLE, &etcdserverpb__auth_disable_request__descriptor},
	{1100, NODE_AUTH_USER_ADD, &etcdserverpb__auth_user_add_request__descriptor},
	{1101, NODE_AUTH_USER_DELETE, &etcdserverpb__auth_user_delete_request__descriptor},
	{1103, NODE_AUTH_USER_CHANGE_PW, &etcdserverpb__auth_user_change_password_request__descriptor},
	{1104, NODE_AUTH_USER_GRANT, &etcdserverpb__auth_user_grant_role_request__descriptor},
	{1105, NODE_AUTH_USER_REVOKE, &etcdserverpb__auth_user_revoke_role_request__descriptor},
	{1200, NODE_AUTH_ROLE_ADD, &etcdserverpb__auth_role_add_request__descriptor},
	{1201, NODE_AUTH_ROLE_DELETE, &etcdserverpb__auth_role_delete_request__descriptor},
	{1203, NODE_AUTH_ROLE_GRANT, &etcdserverpb__auth_role_grant_permission_request__descriptor},
	{1204, NODE_AUTH_ROLE_REVOKE, &etcdserverpb__auth_role_revoke_permission_request__descriptor},
};

/* server/auth.c's stored form of a password ("pbkdf2-sha256$10000$salt$hash", hex), for a
 * clear password etcd 3.4 put in the log (etcd hashes it when applying). malloc'd. */
static char *hash_password(const char *pw)
{
	uint8_t salt[16], dk[32];
	char *out = malloc(160);
	if (out == NULL || RAND_bytes(salt, sizeof(salt)) != 1 ||
	    PKCS5_PBKDF2_HMAC(pw, (int)strlen(pw), salt, 16, 10000, EVP_sha256(), sizeof(dk), dk) != 1) {
		free(out);
		return NULL;
	}
	int n = snprintf(out, 160, "pbkdf2-sha256$10000$");
	for (int i = 0; i < 16; i++)
		n += snprintf(out + n, 160 - (size_t)n, "%02x", salt[i]);
	out[n++] = '$';
	for (int i = 0; i < 32; i++)
		n += snprintf(out + n, 160 - (size_t)n, "%02x", dk[i]);
	return out;
}

/*
 * One etcd normal entry as a Keelson entry (*out malloc'd, *len 0 for an empty entry, which
 * applies as nothing). Requests Keelson does not log (reads, v2 requests such as etcd 3.4's
 * member attribute publication, lease checkpoints, authenticate, 3.5's cluster version and
 * member attributes) become empty entries: their effect is either in the backend file or
 * not part of the state. A payload that does not decode as InternalRaftRequest is a v2
 * Request, as etcd's apply decides.
 */
static int convert_normal(const uint8_t *data, size_t len, uint8_t **out, size_t *olen,
			  node_op *op_out)
{
	*out = NULL;
	*olen = 0;
	*op_out = NODE_NOOP;
	if (len == 0)
		return 0;
	irr r = {0};
	if (pb_walk(data, len, irr_field, &r) != 0 || r.requests != 1)
		return 0; /* a v2 Request */
	for (size_t i = 0; i < sizeof(irr_ops) / sizeof(irr_ops[0]); i++) {
		if (irr_ops[i].field != r.field)
			continue;
		ProtobufCMessage *m = protobuf_c_message_unpack(irr_ops[i].d, NULL, r.len, r.body);
		if (m == NULL)
			return 0; /* etcd would not decode it as InternalRaftRequest either */
		char *hashed = NULL;
		if (irr_ops[i].op == NODE_AUTH_USER_ADD || irr_ops[i].op == NODE_AUTH_USER_CHANGE_PW) {
			char **pw = irr_ops[i].op == NODE_AUTH_USER_ADD
					    ? &((Etcdserverpb__AuthUserAddRequest *)m)->password
					    : &((Etcdserverpb__AuthUserChangePasswordRequest *)m)->password;
			char **hp = irr_ops[i].op == NODE_AUTH_USER_ADD
					    ? &((Etcdserverpb__AuthUserAddRequest *)m)->hashedpassword
					    : &((Etcdserverpb__AuthUserChangePasswordRequest *)m)->hashedpassword;
			if ((*pw)[0] != '\0') {
				if ((hashed = hash_password(*pw)) == NULL) {
					protobuf_c_message_free_unpacked(m, NULL);
					return STORAGE_ERR_NOMEM;
				}
				memset(*pw, 0, strlen(*pw));
				(*pw)[0] = '\0';
				*hp = hashed; /* freed below, not by protobuf-c */
			}
		}
		int rc = apply_encode(irr_ops[i].op, 0, 0, m, out, olen);
		if (hashed) {
			char **hp = irr_ops[i].op == NODE_AUTH_USER_ADD
					    ? &((Etcdserverpb__AuthUserAddRequest *)m)->hashedpassword
					    : &((Etcdserverpb__AuthUserChangePasswordRequest *)m)->hashedpassword;
			*hp = (char *)protobuf_c_empty_string;
			free(hashed);
		}
		protobuf_c_message_free_unpacked(m, NULL);
		*op_out = irr_ops[i].op;
		return rc;
	}
	return 0;
}

typedef struct conf_change {
	uint64_t type, node;
	const uint8_t *ctx;
	size_t ctx_len;
} conf_change;

static int cc_field(void *vctx, uint32_t num, int wire, uint64_t v, const uint8_t *b, size_t n)
{
	conf_change *c = vctx;
	if (num == 2 || num == 3 || num == 1) {
		if (wire != 0)
			return -1;
		if (num == 2)
			c->type = v;
		else if (num == 3)
			c->node = v;
	} else if (num == 4) {
		if (wire != 2)
			return -1;
		c->ctx = b;
		c->ctx_len = n;
	}
	return 0;
}

/* A committed raftpb.ConfChange on the member list, as etcd's applyConfChange does. */
static int apply_conf_change(import_ctx *c, const uint8_t *data, size_t len, uint64_t index,
			     char *err, size_t errlen)
{
	conf_change cc = {0};
	if (pb_walk(data, len, cc_field, &cc) != 0) {
		snprintf(err, errlen, "wal entry %" PRIu64 ": a ConfChange that does not decode", index);
		return STORAGE_ERR_CORRUPT;
	}
	switch (cc.type) {
	case 0: /* AddNode: a new voter, or a learner's promotion */
	case 3: /* AddLearnerNode */
	case 2: /* UpdateNode: new peer URLs */ {
		Etcdserverpb__Member m;
		Etcdserverpb__Member *old = find_member(c, cc.node, NULL);
		if (cc.ctx_len == 0 || member_from_json(cc.ctx, cc.ctx_len, &m) != 0) {
			/* etcd 3.4's promotion carries the member with isLearner false. */
			if (cc.type == 0 && old) {
				old->islearner = 0;
				return 0;
			}
			snprintf(err, errlen, "wal entry %" PRIu64 ": ConfChange context is not a member", index);
			return STORAGE_ERR_CORRUPT;
		}
		if (old && cc.type == 2) {
			/* only the raft attributes change */
			for (size_t i = 0; i < old->n_peerurls; i++)
				free(old->peerurls[i]);
			free(old->peerurls);
			old->peerurls = m.peerurls;
			old->n_peerurls = m.n_peerurls;
			m.peerurls = NULL;
			m.n_peerurls = 0;
			member_clear(&m);
		} else if (old) {
			old->islearner = cc.type == 3;
			member_clear(&m);
		} else if (c->n_members < IMPORT_MAX_MEMBERS) {
			m.islearner = cc.type == 3;
			c->members[c->n_members++] = m;
		} else {
			member_clear(&m);
			return STORAGE_ERR_NOSPACE;
		}
		return 0;
	}
	case 1: /* RemoveNode */
		remove_member(c, cc.node);
		if (c->n_removed < IMPORT_MAX_MEMBERS)
			c->removed[c->n_removed++] = cc.node;
		return 0;
	default:
		snprintf(err, errlen, "wal entry %" PRIu64 ": unknown ConfChange type %" PRIu64, index, cc.type);
		return STORAGE_ERR_CORRUPT;
	}
}

/* ---- etcd 3.4's own membership: the v2 store (member/snap/NNN.snap) and the WAL ----
 *
 * etcd 3.4 reads its member list from the v2 store, not from the backend's "members"
 * bucket, which `etcdctl snapshot restore` leaves as the snapshot's origin cluster had it.
 * The v2 store is the newest snapshot file's (snappb.Snapshot {crc = 1, data = 2}, data a
 * raftpb.Snapshot {data = 1, metadata = 2 {index = 2}}, its data the store as JSON, members
 * under /0/members/<hex id>/{raftAttributes,attributes} and /0/removed_members/<hex id>)
 * and then the WAL's entries after it: ConfChanges and the v2 PUTs of
 * /0/members/<hex id>/attributes by which each member publishes its name and client URLs.
 * Without a snapshot file the WAL starts at index 1 and holds all of it. */

/* In the object at *j, moves *j to the value of key: 1 found, 0 not (or not an object). */
static int j_find(json *j, const char *key)
{
	if (!j_lit(j, '{') || j_lit(j, '}'))
		return 0;
	for (;;) {
		char *k = j_string(j);
		if (k == NULL || !j_lit(j, ':')) {
			free(k);
			return 0;
		}
		int match = strcmp(k, key) == 0;
		free(k);
		if (match) {
			j_ws(j);
			return 1;
		}
		if (j_skip(j, 0) != 0 || !j_lit(j, ','))
			return 0;
	}
}

/* Calls fn on each member of the object at *j ("null" is empty): 0, or -1. */
typedef int (*j_each_fn)(void *ctx, const char *key, json value);
static int j_each(json *j, j_each_fn fn, void *ctx)
{
	j_ws(j);
	if (j->e - j->p >= 4 && memcmp(j->p, "null", 4) == 0) {
		j->p += 4;
		return 0;
	}
	if (!j_lit(j, '{'))
		return -1;
	if (j_lit(j, '}'))
		return 0;
	do {
		char *k = j_string(j);
		if (k == NULL || !j_lit(j, ':')) {
			free(k);
			return -1;
		}
		j_ws(j);
		json v = *j;
		int rc = j_skip(j, 0);
		if (rc == 0) {
			v.e = j->p;
			rc = fn(ctx, k, v);
		}
		free(k);
		if (rc)
			return -1;
	} while (j_lit(j, ','));
	return j_lit(j, '}') ? 0 : -1;
}

static int hex_id(const char *s, size_t n, uint64_t *id)
{
	if (n == 0 || n > 16)
		return -1;
	uint64_t v = 0;
	for (size_t i = 0; i < n; i++) {
		char h = s[i];
		int x = h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10 : -1;
		if (x < 0)
			return -1;
		v = v << 4 | (uint64_t)x;
	}
	*id = v;
	return 0;
}

static Etcdserverpb__Member *find_or_add_member(import_ctx *c, uint64_t id)
{
	Etcdserverpb__Member *m = find_member(c, id, NULL);
	if (m == NULL && c->n_members < IMPORT_MAX_MEMBERS) {
		m = &c->members[c->n_members++];
		etcdserverpb__member__init(m);
		m->id = id;
	}
	return m;
}

static int v2_member(void *ctx, const char *key, json v)
{
	import_ctx *c = ctx;
	uint64_t id;
	Etcdserverpb__Member *m;
	if (hex_id(key, strlen(key), &id) != 0 || (m = find_or_add_member(c, id)) == NULL)
		return -1;
	if (!j_find(&v, "Children"))
		return 0;
	static const char *const parts[] = {"raftAttributes", "attributes"};
	for (int i = 0; i < 2; i++) {
		json x = v;
		if (j_find(&x, parts[i]) && j_find(&x, "Value")) {
			char *val = j_string(&x);
			int has_id;
			int rc = val ? member_fields_from_json((const uint8_t *)val, strlen(val), m, &has_id) : -1;
			free(val);
			if (rc)
				return -1;
		}
	}
	return 0;
}

static int v2_removed(void *ctx, const char *key, json v)
{
	import_ctx *c = ctx;
	uint64_t id;
	(void)v;
	if (hex_id(key, strlen(key), &id) != 0 || c->n_removed == IMPORT_MAX_MEMBERS)
		return -1;
	c->removed[c->n_removed++] = id;
	return 0;
}

/* The member list and removed ids of a v2 store's JSON into c (replacing c's). */
static int v2_store_members(import_ctx *c, const uint8_t *p, size_t n)
{
	json r = {(const char *)p, (const char *)p + n};
	if (!j_find(&r, "Root") || !j_find(&r, "Children") || !j_find(&r, "0") ||
	    !j_find(&r, "Children"))
		return 0; /* no cluster directory yet: no members */
	json m = r, rm = r;
	if (j_find(&m, "members") && j_find(&m, "Children") && j_each(&m, v2_member, c) != 0)
		return -1;
	if (j_find(&rm, "removed_members") && j_find(&rm, "Children") &&
	    j_each(&rm, v2_removed, c) != 0)
		return -1;
	return 0;
}

typedef struct snap_fields {
	uint64_t crc;
	int has_crc;
	const uint8_t *data, *meta;
	size_t len, meta_len;
	uint64_t index;
} snap_fields;

/* snappb.Snapshot {crc = 1, data = 2} and raftpb.Snapshot {data = 1, metadata = 2}. */
static int snappb_field(void *ctx, uint32_t num, int wire, uint64_t v, const uint8_t *b, size_t n)
{
	snap_fields *f = ctx;
	if (num == 1 && wire == 0) {
		f->crc = v;
		f->has_crc = 1;
	} else if (num == 2 && wire == 2) {
		f->data = b;
		f->len = n;
	}
	return 0;
}

static int raft_snapshot_field(void *ctx, uint32_t num, int wire, uint64_t v, const uint8_t *b, size_t n)
{
	snap_fields *f = ctx;
	(void)v;
	if (num == 1 && wire == 2) {
		f->data = b;
		f->len = n;
	} else if (num == 2 && wire == 2) {
		f->meta = b;
		f->meta_len = n;
	}
	return 0;
}

static int snap_meta_field(void *ctx, uint32_t num, int wire, uint64_t v, const uint8_t *b, size_t n)
{
	snap_fields *f = ctx;
	(void)b;
	(void)n;
	if (num == 2 && wire == 0)
		f->index = v;
	return 0;
}

static int cmp_name_desc(const void *a, const void *b)
{
	return strcmp(*(char *const *)b, *(char *const *)a);
}

/* Reads the members of the v2 store of the newest snapshot file in snap_dir whose checksum holds (etcd
 * skips broken ones for older ones too), into c: 0 with *index set, 1 if there is none. */
static int load_v2_snapshot(const char *snap_dir, import_ctx *c, uint64_t *index, char *err,
			    size_t errlen)
{
	DIR *d = opendir(snap_dir);
	if (d == NULL)
		return 1;
	char *names[1024];
	size_t n = 0;
	struct dirent *de;
	while ((de = readdir(d)) != NULL && n < 1024) {
		size_t l = strlen(de->d_name);
		if (l > 5 && strcmp(de->d_name + l - 5, ".snap") == 0 && (names[n] = strdup(de->d_name)))
			n++;
	}
	closedir(d);
	qsort(names, n, sizeof(names[0]), cmp_name_desc);
	int rc = 1;
	for (size_t i = 0; rc == 1 && i < n; i++) {
		char path[4400];
		snprintf(path, sizeof(path), "%s/%s", snap_dir, names[i]);
		FILE *f = fopen(path, "rb");
		struct stat st;
		uint8_t *buf = NULL;
		if (f && fstat(fileno(f), &st) == 0 && st.st_size > 0 && st.st_size < (1LL << 31) &&
		    (buf = malloc((size_t)st.st_size)) != NULL &&
		    fread(buf, 1, (size_t)st.st_size, f) == (size_t)st.st_size) {
			snap_fields outer = {0}, inner = {0};
			if (pb_walk(buf, (size_t)st.st_size, snappb_field, &outer) == 0 && outer.has_crc &&
			    outer.data && crc32c(0, outer.data, outer.len) == (uint32_t)outer.crc &&
			    pb_walk(outer.data, outer.len, raft_snapshot_field, &inner) == 0 && inner.meta &&
			    pb_walk(inner.meta, inner.meta_len, snap_meta_field, &inner) == 0) {
				for (size_t k = 0; k < c->n_members; k++)
					member_clear(&c->members[k]);
				c->n_members = 0;
				c->n_removed = 0;
				if (v2_store_members(c, inner.data ? inner.data : (const uint8_t *)"",
						     inner.len) != 0) {
					snprintf(err, errlen, "%.300s: the v2 store's member list does not decode", path);
					rc = STORAGE_ERR_CORRUPT;
				} else {
					*index = inner.index;
					rc = 0;
				}
			} else {
				log_at(LOG_WARN, "skipped a snapshot file that does not check out", "path", path, NULL);
			}
		}
		free(buf);
		if (f)
			fclose(f);
	}
	for (size_t i = 0; i < n; i++)
		free(names[i]);
	return rc;
}

/* A v2 Request PUT of /0/members/<hex id>/attributes (a member publishing its name and
 * client URLs) on c's member list; anything else is ignored. The request is the entry's
 * payload when it does not decode as InternalRaftRequest, or its v2 field. */
typedef struct v2_request {
	const uint8_t *method, *path, *val;
	size_t method_len, path_len, val_len;
} v2_request;

static int v2_request_field(void *ctx, uint32_t num, int wire, uint64_t v, const uint8_t *b, size_t n)
{
	v2_request *r = ctx;
	(void)v;
	if (wire != 2)
		return 0;
	if (num == 2) {
		r->method = b;
		r->method_len = n;
	} else if (num == 3) {
		r->path = b;
		r->path_len = n;
	} else if (num == 4) {
		r->val = b;
		r->val_len = n;
	}
	return 0;
}

static void v2_member_attributes(import_ctx *c, const uint8_t *data, size_t len)
{
	const uint8_t *req = data;
	size_t rlen = len;
	irr ir = {0};
	if (pb_walk(data, len, irr_field, &ir) == 0 && ir.requests == 1) {
		if (ir.field != 2)
			return; /* a v3 request */
		req = ir.body;
		rlen = ir.len;
	}
	v2_request r = {0};
	static const char prefix[] = "/0/members/", suffix[] = "/attributes";
	if (pb_walk(req, rlen, v2_request_field, &r) != 0 || r.method_len != 3 ||
	    memcmp(r.method, "PUT", 3) != 0 || r.path_len <= sizeof(prefix) - 1 + sizeof(suffix) - 1 ||
	    memcmp(r.path, prefix, sizeof(prefix) - 1) != 0 ||
	    memcmp(r.path + r.path_len - (sizeof(suffix) - 1), suffix, sizeof(suffix) - 1) != 0)
		return;
	uint64_t id;
	Etcdserverpb__Member *m;
	if (hex_id((const char *)r.path + sizeof(prefix) - 1,
		   r.path_len - (sizeof(prefix) - 1) - (sizeof(suffix) - 1), &id) != 0 ||
	    (m = find_member(c, id, NULL)) == NULL)
		return; /* etcd only updates a member it has */
	/* The attributes are replaced whole (an empty list is left out of the JSON). */
	Etcdserverpb__Member attrs = ETCDSERVERPB__MEMBER__INIT;
	int has_id;
	if (member_fields_from_json(r.val ? r.val : (const uint8_t *)"", r.val_len, &attrs, &has_id) == 0) {
		if (m->name != protobuf_c_empty_string)
			free(m->name);
		for (size_t i = 0; i < m->n_clienturls; i++)
			free(m->clienturls[i]);
		free(m->clienturls);
		m->name = attrs.name;
		m->clienturls = attrs.clienturls;
		m->n_clienturls = attrs.n_clienturls;
		attrs.name = (char *)protobuf_c_empty_string;
		attrs.clienturls = NULL;
		attrs.n_clienturls = 0;
	}
	member_clear(&attrs);
}


/* ---- writing the Keelson side ---- */

static void put_be64(uint8_t *p, uint64_t v)
{
	for (int i = 7; i >= 0; i--, v >>= 8)
		p[i] = (uint8_t)v;
}

static void put_be32(uint8_t *p, uint32_t v)
{
	for (int i = 3; i >= 0; i--, v >>= 8)
		p[i] = (uint8_t)v;
}

static int cmp_member(const void *a, const void *b)
{
	const Etcdserverpb__Member *x = a, *y = b;
	return x->id < y->id ? -1 : x->id > y->id;
}

/* server/members.c's record: a MemberListResponse without header, members by id (etcd's
 * member list order). */
static int put_members(storage_batch *b, import_ctx *c)
{
	for (size_t i = 0; i < c->n_removed; i++)
		remove_member(c, c->removed[i]);
	qsort(c->members, c->n_members, sizeof(c->members[0]), cmp_member);
	Etcdserverpb__Member *mp[IMPORT_MAX_MEMBERS];
	for (size_t i = 0; i < c->n_members; i++)
		mp[i] = &c->members[i];
	Etcdserverpb__MemberListResponse list = ETCDSERVERPB__MEMBER_LIST_RESPONSE__INIT;
	list.n_members = c->n_members;
	list.members = mp;
	size_t len = etcdserverpb__member_list_response__get_packed_size(&list);
	uint8_t *buf = malloc(len ? len : 1);
	if (buf == NULL)
		return STORAGE_ERR_NOMEM;
	etcdserverpb__member_list_response__pack(&list, buf);
	int rc = storage_batch_meta_put(b, "members", buf, len);
	free(buf);
	return rc;
}

/* The auth store's record (storage_batch_auth_put), from etcd's authUsers/authRoles. */
static int put_auth(storage_batch *b, const import_ctx *c)
{
	static ProtobufCBinaryData users[IMPORT_MAX_AUTH], roles[IMPORT_MAX_AUTH];
	for (size_t i = 0; i < c->n_users; i++)
		users[i] = (ProtobufCBinaryData){c->user_len[i], c->users[i]};
	for (size_t i = 0; i < c->n_roles; i++)
		roles[i] = (ProtobufCBinaryData){c->role_len[i], c->roles[i]};
	return storage_batch_auth_put(b, c->auth_enabled, c->auth_revision ? c->auth_revision : 1, users, c->n_users,
				      roles, c->n_roles);
}

/* server/alarm.c's record: 12 bytes an alarm, member id (8, BE) and type (4, BE). */
static int put_alarms(storage_batch *b, const import_ctx *c)
{
	uint8_t buf[IMPORT_MAX_ALARMS * 12];
	for (size_t i = 0; i < c->n_alarms; i++) {
		put_be64(buf + 12 * i, c->alarm_member[i]);
		put_be32(buf + 12 * i + 8, c->alarm_type[i]);
	}
	return storage_batch_meta_put(b, "alarms", buf, c->n_alarms * 12);
}

static int exists(const char *path)
{
	struct stat st;
	return stat(path, &st) == 0;
}

static int fsync_path(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	int rc = fsync(fd);
	close(fd);
	return rc;
}

/* Removes the temporary environment (the files LMDB and storage made there) and the
 * directory. Only files are made there, so nothing else is removed. */
static void remove_tmp(const char *tmp)
{
	DIR *d = opendir(tmp);
	if (d == NULL)
		return;
	struct dirent *de;
	char p[4400];
	while ((de = readdir(d)) != NULL) {
		if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
			continue;
		snprintf(p, sizeof(p), "%s/%s", tmp, de->d_name);
		if (unlink(p) != 0 && (errno == EISDIR || errno == EPERM))
			remove_tmp(p); /* keelson-wal/: one level of segments */
	}
	closedir(d);
	rmdir(tmp);
}

/*
 * Whether a process holds a lock on one of the WAL files: a running etcd locks every WAL
 * file it has open (fileutil.LockFile: an OFD lock on Linux, flock elsewhere). Importing
 * while etcd writes would copy a state that keeps changing. Only tested, never taken.
 */
static int wal_locked(const char *wal_dir, char *which, size_t len)
{
	DIR *d = opendir(wal_dir);
	if (d == NULL)
		return 0;
	struct dirent *de;
	int locked = 0;
	while (!locked && (de = readdir(d)) != NULL) {
		size_t n = strlen(de->d_name);
		if (n < 5 || strcmp(de->d_name + n - 4, ".wal") != 0)
			continue;
		char p[4400];
		snprintf(p, sizeof(p), "%s/%s", wal_dir, de->d_name);
		int fd = open(p, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		struct flock fl;
		memset(&fl, 0, sizeof(fl));
		fl.l_type = F_WRLCK;
		fl.l_whence = SEEK_SET;
		if (fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type != F_UNLCK)
			locked = 1;
		if (!locked && flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK)
			locked = 1;
		close(fd); /* also drops the shared flock, if taken */
		if (locked)
			snprintf(which, len, "%s", de->d_name);
	}
	closedir(d);
	return locked;
}

typedef struct import_result {
	storage_etcd_file_info ir_info;
	uint64_t ir_replayed;  /* committed entries after consistent_index, to be applied */
	uint64_t ir_pending;   /* entries after the commit index, kept in the log */
} import_result;

/* Whether the member list has a single voter (then every entry in its WAL is committed:
 * its own write was the quorum). */
static int lone_voter(const import_ctx *c, uint64_t self)
{
	size_t voters = 0;
	int found = 0;
	for (size_t i = 0; i < c->n_members; i++)
		if (!c->members[i].islearner) {
			voters++;
			found |= c->members[i].id == self;
		}
	return voters == 1 && found;
}

/* The term of the entry at index, from the WAL (an entry or a snapshot record); 0 if the
 * WAL has neither. */
static uint64_t term_at(const storage_etcd_wal *w, uint64_t index)
{
	const storage_etcd_wal_entry *at = storage_etcd_wal_entry_at(w, index);
	if (at)
		return at->we_term;
	if (w->ew_has_snapshot && w->ew_snap_index == index)
		return w->ew_snap_term;
	return 0;
}

/*
 * The raft side, member list, auth and ids into the imported environment at dir, then the
 * committed WAL entries the backend has not applied, applied as the node loop applies
 * entries (server/apply.c). The raft snapshot point is then the commit index; entries after
 * it stay in the log, uncommitted.
 */
static int write_raft_state(const config *cfg, const char *dir, const char *snap_dir,
			    const storage_options *so,
			    const storage_etcd_wal *w, import_ctx *c, import_result *res, char *err,
			    size_t errlen)
{
	uint64_t ci = res->ir_info.ef_consistent_index;
	uint64_t commit = w->ew_commit > ci ? w->ew_commit : ci;
	uint64_t last = w->ew_n_entries ? w->ew_entries[w->ew_n_entries - 1].we_index : 0;
	uint64_t ci_term = term_at(w, ci);
	if (ci != 0 && ci_term == 0) {
		if (ci >= last && w->ew_has_state) {
			/* The backend applied an entry the WAL no longer holds: its record was the
			 * torn tail (etcd's leader may apply an entry before its own write is synced).
			 * The entry's term is at most the hard state's; etcd restarts the same way. */
			ci_term = w->ew_term;
			if (w->ew_n_entries && w->ew_entries[w->ew_n_entries - 1].we_term > ci_term)
				ci_term = w->ew_entries[w->ew_n_entries - 1].we_term;
		} else {
			snprintf(err, errlen, "the WAL holds neither the entry nor a snapshot at the backend's "
				 "consistent index %" PRIu64 " (WAL entries %" PRIu64 "..%" PRIu64 ")", ci,
				 w->ew_n_entries ? w->ew_entries[0].we_index : 0, last);
			return STORAGE_ERR_CORRUPT;
		}
	}

	/* Membership as etcd 3.4 has it (see above): the v2 store of the newest snapshot file,
	 * or nothing when the WAL starts at index 1, then the committed ConfChanges and member
	 * attribute publications after that point, in order. Only when neither is there (a
	 * WAL without its beginning and no snapshot file) the backend's "members" bucket is
	 * the base. A lone voter's entries are all committed (its own write was the quorum):
	 * the changes up to its last entry count then. */
	uint64_t v2_index = 0;
	int rc0 = load_v2_snapshot(snap_dir, c, &v2_index, err, errlen);
	if (rc0 < 0)
		return rc0;
	if (rc0 == 1 && w->ew_n_entries && w->ew_entries[0].we_index == 1) {
		for (size_t k = 0; k < c->n_members; k++)
			member_clear(&c->members[k]);
		c->n_members = 0;
		c->n_removed = 0;
	}
	uint64_t from = v2_index;
	for (int pass = 0; pass < 2; pass++) {
		for (size_t i = 0; i < w->ew_n_entries && w->ew_entries[i].we_index <= commit; i++) {
			const storage_etcd_wal_entry *e = &w->ew_entries[i];
			if (e->we_index <= from)
				continue;
			if (e->we_type == STORAGE_ETCD_ENTRY_CONF_CHANGE &&
			    (rc0 = apply_conf_change(c, e->we_data, e->we_len, e->we_index, err, errlen)) != 0)
				return rc0;
			if (e->we_type == STORAGE_ETCD_ENTRY_NORMAL)
				v2_member_attributes(c, e->we_data, e->we_len);
		}
		if (pass == 1 || !lone_voter(c, w->ew_node_id) || last <= commit)
			break;
		from = commit > v2_index ? commit : v2_index;
		commit = last;
	}
	if (commit > ci && (last < commit || storage_etcd_wal_entry_at(w, ci + 1) == NULL)) {
		snprintf(err, errlen, "the WAL does not hold the committed entries %" PRIu64 "..%" PRIu64
			 " the backend has not applied", ci + 1, commit);
		return STORAGE_ERR_CORRUPT;
	}
	uint64_t commit_term = commit == ci ? ci_term : term_at(w, commit);
	/* Convert every entry after ci. */
	size_t n = last > ci ? (size_t)(last - ci) : 0;
	storage_log_entry *le = calloc(n ? n : 1, sizeof(*le));
	uint8_t **bufs = calloc(n ? n : 1, sizeof(*bufs));
	int rc = le && bufs ? 0 : STORAGE_ERR_NOMEM;
	for (size_t i = 0; rc == 0 && i < n; i++) {
		const storage_etcd_wal_entry *e = storage_etcd_wal_entry_at(w, ci + 1 + i);
		size_t len = 0;
		node_op op = NODE_NOOP;
		if (e->we_type == STORAGE_ETCD_ENTRY_NORMAL) {
			rc = convert_normal(e->we_data, e->we_len, &bufs[i], &len, &op);
		} else if (e->we_type == STORAGE_ETCD_ENTRY_CONF_CHANGE) {
			/* applied to the member list above; an empty entry in the log */
		} else {
			snprintf(err, errlen, "wal entry %" PRIu64 " has type %u (etcd 3.5's ConfChangeV2?), "
				 "which Keelson cannot import", e->we_index, e->we_type);
			rc = STORAGE_ERR_INVALID;
		}
		le[i].le_index = e->we_index;
		le[i].le_term = e->we_term;
		le[i].le_type = RAFT_ENTRY_NORMAL;
		le[i].le_len = (uint32_t)len;
		le[i].le_data = bufs[i];
		if (e->we_index <= commit)
			res->ir_replayed++;
		else
			res->ir_pending++;
	}

	if (rc == 0 && find_member(c, w->ew_node_id, NULL) == NULL) {
		int removed = 0;
		for (size_t i = 0; i < c->n_removed; i++)
			removed |= c->removed[i] == w->ew_node_id;
		snprintf(err, errlen, "member %" PRIx64 " (the WAL's) %s", w->ew_node_id,
			 removed ? "has been permanently removed from the cluster"
				 : "is not in the cluster's member list");
		rc = STORAGE_ERR_INVALID;
	}
	server_ctx sc;
	memset(&sc, 0, sizeof(sc));
	sc.cfg = (config *)cfg;
	sc.mi.member_id = w->ew_node_id;
	sc.mi.cluster_id = w->ew_cluster_id;
	storage_batch *b = NULL;
	if (rc == 0 && (rc = storage_open(dir, so, &sc.st)) != 0)
		snprintf(err, errlen, "open the imported environment: %s", storage_strerror(rc));
	/* 1. What the backend file holds beyond storage's part, and etcd's ids. */
	if (rc == 0 && (rc = storage_batch_begin(sc.st, &b)) == 0) {
		uint8_t id[8];
		put_be64(id, w->ew_cluster_id);
		rc = storage_batch_meta_put(b, "cluster_id", id, 8);
		put_be64(id, w->ew_node_id);
		if (rc == 0)
			rc = storage_batch_meta_put(b, "member_id", id, 8);
		if (rc == 0)
			rc = put_members(b, c);
		if (rc == 0)
			rc = put_auth(b, c);
		if (rc == 0 && c->n_alarms)
			rc = put_alarms(b, c);
		if (rc == 0)
			rc = storage_batch_commit(b, ci);
		else
			storage_batch_abort(b);
	}
	/* 2. The committed entries, applied by the same code as the node loop's, over the
	 * auth and alarm state just written; the raft state after them. */
	if (rc == 0)
		rc = alarm_start(&sc.alarms, sc.st);
	if (rc == 0)
		rc = auth_start(&sc.auth, cfg, sc.st);
	if (rc == 0 && (rc = storage_batch_begin(sc.st, &b)) == 0) {
		storage_arena a;
		storage_arena_init(&a);
		for (size_t i = 0; rc == 0 && i < n && le[i].le_index <= commit; i++) {
			apply_result r;
			if (le[i].le_len == 0)
				continue;
			/* A request's own error (a user or lease that exists already, a compaction
			 * at or below the compacted revision) is etcd's too when it re-applies. */
			rc = apply_entry(&sc, b, le[i].le_data, le[i].le_len, &a, &r);
			if (rc)
				snprintf(err, errlen, "wal entry %" PRIu64 " cannot be applied: %s",
					 le[i].le_index, storage_strerror(rc));
		}
		size_t first_pending = commit > ci ? (size_t)(commit - ci) : 0;
		if (rc == 0 && commit > 0)
			rc = storage_batch_log_snapshot(b, commit, commit_term, NULL, 0);
		if (rc == 0 && n > first_pending)
			rc = storage_batch_log_append(b, le + first_pending, n - first_pending);
		uint64_t term = w->ew_term > commit_term ? w->ew_term : commit_term;
		if (rc == 0)
			rc = storage_batch_log_hard_state(b, term, w->ew_vote, commit);
		if (rc == 0)
			rc = storage_batch_commit(b, commit);
		else
			storage_batch_abort(b);
		storage_arena_free(&a);
	}
	if (rc && err[0] == '\0')
		snprintf(err, errlen, "write the imported state: %s", storage_strerror(rc));
	auth_free(sc.auth);
	alarm_free(sc.alarms);
	if (sc.st)
		storage_close(sc.st);
	for (size_t i = 0; bufs && i < n; i++)
		free(bufs[i]);
	free(bufs);
	free(le);
	return rc;
}

int etcd_import_maybe(const config *cfg, const char *member_dir)
{
	char db[4200], wal[4200], mdb[4200], tmp[4200], tmpmdb[4300], kwal[4300], tmpkwal[4400];
	if (strlen(member_dir) > 4000 || (cfg->wal_dir && strlen(cfg->wal_dir) > 4000))
		return 0; /* main.c refuses such paths itself */
	char snapdir[4200];
	snprintf(db, sizeof(db), "%s/snap/db", member_dir);
	snprintf(snapdir, sizeof(snapdir), "%s/snap", member_dir);
	if (cfg->wal_dir && cfg->wal_dir[0])
		snprintf(wal, sizeof(wal), "%s", cfg->wal_dir);
	else
		snprintf(wal, sizeof(wal), "%s/wal", member_dir);
	snprintf(mdb, sizeof(mdb), "%s/data.mdb", member_dir);
	snprintf(tmp, sizeof(tmp), "%s/import.tmp", member_dir);
	snprintf(tmpmdb, sizeof(tmpmdb), "%s/data.mdb", tmp);
	snprintf(kwal, sizeof(kwal), "%s/keelson-wal", member_dir);
	snprintf(tmpkwal, sizeof(tmpkwal), "%s/keelson-wal", tmp);
	if (exists(mdb) || !exists(db) || !exists(wal))
		return 0; /* a Keelson data dir (imported already, or never etcd's), or a new one */

	char err[512] = "";
	if (wal_locked(wal, err, sizeof(err))) {
		log_at(LOG_FATAL, "cannot import the etcd data dir: a process (etcd?) holds a lock on "
		       "its WAL; stop it first", "wal-file", err, NULL);
		return STORAGE_ERR_BUSY;
	}
	log_at(LOG_INFO, "found an etcd data dir: importing it", "db", db, "wal-dir", wal, NULL);
	storage_etcd_wal w;
	int rc = storage_etcd_wal_read(wal, &w, err, sizeof(err));
	if (rc) {
		log_at(LOG_FATAL, "cannot import the etcd data dir: the WAL is refused", "error", err, NULL);
		return rc;
	}
	import_ctx *c = calloc(1, sizeof(*c));
	import_result res;
	memset(&res, 0, sizeof(res));
	if (c == NULL) {
		storage_etcd_wal_free(&w);
		return STORAGE_ERR_NOMEM;
	}
	remove_tmp(tmp); /* left by an interrupted import: it never became the environment */
	/* Our log moved in before an interrupted import's data.mdb did: without that data.mdb it
	 * is not a member's log (etcd's own WAL is in wal/, never touched). */
	remove_tmp(kwal);
	/* The map main.c will open the environment with: room for the quota. */
	storage_options so = {0};
	uint64_t quota = cfg->quota_backend_bytes ? cfg->quota_backend_bytes : 2ULL << 30;
	if (quota + (1ULL << 30) > (8ULL << 30))
		so.so_map_size = quota + (1ULL << 30);
	storage_etcd_import_options io = {0};
	io.ei_storage = &so;
	io.ei_hash_check = STORAGE_ETCD_HASH_SKIP; /* a member's db has no SHA-256 trailer */
	io.ei_visit = visit;
	io.ei_ctx = c;
	io.ei_errbuf = err;
	io.ei_errlen = sizeof(err);
	rc = storage_import_etcd(db, tmp, &io, &res.ir_info);
	if (rc) {
		if (c->err[0])
			snprintf(err, sizeof(err), "%s", c->err);
		log_at(LOG_FATAL, "cannot import the etcd data dir: the backend file is refused", "db", db,
		       "error", err[0] ? err : storage_strerror(rc), NULL);
		goto out;
	}
	err[0] = '\0';
	if ((rc = write_raft_state(cfg, tmp, snapdir, &so, &w, c, &res, err, sizeof(err))) != 0) {
		log_at(LOG_FATAL, "cannot import the etcd data dir", "error", err, NULL);
		goto out;
	}
	/* The log (pending entries, hard state) first, data.mdb last: its rename is the commit
	 * point (a member dir with data.mdb is imported). */
	if ((exists(tmpkwal) && (rename(tmpkwal, kwal) != 0 || fsync_path(member_dir) != 0)) ||
	    fsync_path(tmpmdb) != 0 || rename(tmpmdb, mdb) != 0 || fsync_path(member_dir) != 0) {
		snprintf(err, sizeof(err), "move the imported data.mdb into %.200s: %s", member_dir, strerror(errno));
		log_at(LOG_FATAL, "cannot import the etcd data dir", "error", err, NULL);
		rc = STORAGE_ERR_IO;
		goto out;
	}
	char rev[32], ci[32], replayed[32], pending[32], mid[32], cid[32], term[32], commit[32],
		keys[32], leases[32], members[16], users[16], roles[16];
	snprintf(rev, sizeof(rev), "%" PRId64, res.ir_info.ef_store_revision);
	snprintf(ci, sizeof(ci), "%" PRIu64, res.ir_info.ef_consistent_index);
	snprintf(replayed, sizeof(replayed), "%" PRIu64, res.ir_replayed);
	snprintf(pending, sizeof(pending), "%" PRIu64, res.ir_pending);
	snprintf(mid, sizeof(mid), "%" PRIx64, w.ew_node_id);
	snprintf(cid, sizeof(cid), "%" PRIx64, w.ew_cluster_id);
	snprintf(term, sizeof(term), "%" PRIu64, w.ew_term);
	snprintf(commit, sizeof(commit), "%" PRIu64, w.ew_commit);
	snprintf(keys, sizeof(keys), "%" PRIu64, res.ir_info.ef_revisions);
	snprintf(leases, sizeof(leases), "%" PRIu64, res.ir_info.ef_leases);
	snprintf(members, sizeof(members), "%zu", c->n_members);
	snprintf(users, sizeof(users), "%zu", c->n_users);
	snprintf(roles, sizeof(roles), "%zu", c->n_roles);
	log_at(LOG_INFO, "imported the etcd data dir (its files are left as they were)", "revision", rev,
	       "revisions", keys, "leases", leases, "members", members, "users", users, "roles", roles,
	       "consistent-index", ci, "wal-entries-applied", replayed, "wal-entries-uncommitted", pending,
	       "member-id", mid, "cluster-id", cid, "term", term, "commit", commit, NULL);
out:
	remove_tmp(tmp);
	import_ctx_free(c);
	free(c);
	storage_etcd_wal_free(&w);
	return rc;
}
