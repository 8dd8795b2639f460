/*
 * keyindex.c - the key index: every user key, in order, with its latest state, and the
 * per-key revision history used to read at old revisions.
 *
 * Design. etcd keeps its key index in memory (a B-tree rebuilt from the revision table at
 * start-up: seconds and hundreds of bytes of RAM per key for millions of keys). Keelson keeps
 * it in LMDB, so opening a store is O(1) and the index costs no heap. The obstacle is
 * LMDB's 511-byte key limit, while etcd keys may be up to the request limit (1.5 MiB).
 *
 *  - A key shorter than KI_LONG (400) bytes is its own LMDB key in "keys"; its value is its
 *    ki_state (48 bytes: key id, latest mod revision, create revision, version, lease).
 *  - A key of KI_LONG bytes or more lives in a bucket: the LMDB key is its first KI_LONG
 *    bytes, and the value lists every long key sharing that prefix, sorted, each with its
 *    ki_state. No short key is exactly KI_LONG bytes long, so an LMDB key of that length
 *    is always a bucket. Order is preserved: a short key s and a bucket prefix P compare as
 *    s and any key extending P do (if s is a prefix of P, s is smaller than all of them;
 *    otherwise they differ inside s). Within a bucket the list is sorted.
 *  - Per-key history: each revision record names the key's previous revision, and "hist",
 *    keyed by (key id, main, sub) big-endian, holds signposts every HIST_EVERY versions
 *    (internal.h). Reading a key at revision R is one seek there (the first signpost after
 *    R) and a walk back along the prev pointers; a hot key's history never makes any single
 *    value grow (unlike keeping a revision list in the index value). A key id is handed out
 *    when a key is first written and kept until compaction removes the key's last revision.
 *
 * Costs: a put of a short key is one index get + put and one revision put (appended), plus
 * a hist put every HIST_EVERY versions: one leaf written at random instead of two. A long
 * key rewrites its bucket (the key itself plus its neighbours sharing 400 bytes of prefix,
 * which in practice are few). Range at the current revision reads only the index and the
 * revision table; at an older revision, each key modified since costs a seek and a walk.
 */
#include <stdlib.h>

#include "storage/internal.h"

static void st_encode(uint8_t *p, const ki_state *st)
{
	be64_put(p, st->ks_id);
	be64_put(p + 8, (uint64_t)st->ks_mod_main);
	be64_put(p + 16, (uint64_t)st->ks_mod_sub);
	be64_put(p + 24, (uint64_t)st->ks_create);
	be64_put(p + 32, (uint64_t)st->ks_version);
	be64_put(p + 40, (uint64_t)st->ks_lease);
}

static void st_decode(const uint8_t *p, ki_state *st)
{
	st->ks_id = be64_get(p);
	st->ks_mod_main = (int64_t)be64_get(p + 8);
	st->ks_mod_sub = (int64_t)be64_get(p + 16);
	st->ks_create = (int64_t)be64_get(p + 24);
	st->ks_version = (int64_t)be64_get(p + 32);
	st->ks_lease = (int64_t)be64_get(p + 40);
}

static uint32_t be32_get(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void be32_put(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

/* Bucket entry: [u32 key length][key][ki_state]. */
typedef struct bent {
	const uint8_t *key;
	size_t klen;
	const uint8_t *state;
	size_t size; /* whole entry */
} bent;

/* Parses the entry at p (n bytes left). Returns 0 or STORAGE_ERR_CORRUPT. */
static int bent_parse(const uint8_t *p, size_t n, bent *e)
{
	if (n < 4)
		return STORAGE_ERR_CORRUPT;
	size_t kl = be32_get(p);
	if (n - 4 < kl || n - 4 - kl < KI_STATE_SIZE)
		return STORAGE_ERR_CORRUPT;
	e->key = p + 4;
	e->klen = kl;
	e->state = p + 4 + kl;
	e->size = 4 + kl + KI_STATE_SIZE;
	return 0;
}

static MDB_val lmdb_key(const uint8_t *key, size_t klen)
{
	MDB_val k = {klen < KI_LONG ? klen : KI_LONG, (void *)key};
	return k;
}

int storage__ki_get(storage *s, MDB_txn *txn, const uint8_t *key, size_t klen, ki_state *st)
{
	if (klen == 0)
		return STORAGE_ERR_NOT_FOUND;
	MDB_val k = lmdb_key(key, klen), v;
	int rc = mdb_get(txn, s->s_keys, &k, &v);
	if (rc)
		return storage__mdb_err(rc);
	if (klen < KI_LONG) {
		if (v.mv_size != KI_STATE_SIZE)
			return STORAGE_ERR_CORRUPT;
		st_decode(v.mv_data, st);
		return 0;
	}
	const uint8_t *p = v.mv_data;
	size_t n = v.mv_size;
	while (n) {
		bent e;
		int err = bent_parse(p, n, &e);
		if (err)
			return err;
		int c = storage__bytes_cmp(e.key, e.klen, key, klen);
		if (c == 0) {
			st_decode(e.state, st);
			return 0;
		}
		if (c > 0)
			break;
		p += e.size;
		n -= e.size;
	}
	return STORAGE_ERR_NOT_FOUND;
}

/* Rewrites the bucket of a long key: replaces, inserts (st != NULL) or removes it. */
static int bucket_update(storage *s, MDB_txn *txn, const uint8_t *key, size_t klen,
			 const ki_state *st)
{
	MDB_val k = lmdb_key(key, klen), v;
	uint8_t *old = NULL;
	size_t oldn = 0;
	int rc = mdb_get(txn, s->s_keys, &k, &v);
	if (rc && rc != MDB_NOTFOUND)
		return storage__mdb_err(rc);
	if (rc == 0) {
		/* The value may move when we write: keep a copy. */
		old = malloc(v.mv_size ? v.mv_size : 1);
		if (!old)
			return STORAGE_ERR_NOMEM;
		memcpy(old, v.mv_data, v.mv_size);
		oldn = v.mv_size;
	}
	/* Find where key goes: [0, at) sorts before it; skip an equal entry. */
	size_t at = 0, after = 0;
	int err = 0;
	while (at < oldn) {
		bent e;
		if ((err = bent_parse(old + at, oldn - at, &e)))
			goto done;
		int c = storage__bytes_cmp(e.key, e.klen, key, klen);
		if (c >= 0) {
			after = c == 0 ? at + e.size : at;
			break;
		}
		at += e.size;
	}
	if (at >= oldn)
		after = oldn;
	size_t add = st ? 4 + klen + KI_STATE_SIZE : 0;
	size_t newn = at + add + (oldn - after);
	if (newn == 0) {
		rc = mdb_del(txn, s->s_keys, &k, NULL);
		err = rc == MDB_NOTFOUND ? 0 : storage__mdb_err(rc);
		goto done;
	}
	v.mv_size = newn;
	if ((rc = mdb_put(txn, s->s_keys, &k, &v, MDB_RESERVE))) {
		err = storage__mdb_err(rc);
		goto done;
	}
	uint8_t *p = v.mv_data;
	if (at)
		memcpy(p, old, at);
	p += at;
	if (st) {
		be32_put(p, (uint32_t)klen);
		memcpy(p + 4, key, klen);
		st_encode(p + 4 + klen, st);
		p += add;
	}
	if (oldn > after)
		memcpy(p, old + after, oldn - after);
done:
	free(old);
	return err;
}

int storage__ki_set(storage *s, MDB_txn *txn, const uint8_t *key, size_t klen,
		    const ki_state *st)
{
	if (klen >= KI_LONG)
		return bucket_update(s, txn, key, klen, st);
	uint8_t buf[KI_STATE_SIZE];
	st_encode(buf, st);
	MDB_val k = lmdb_key(key, klen), v = {KI_STATE_SIZE, buf};
	return storage__mdb_err(mdb_put(txn, s->s_keys, &k, &v, 0));
}

int storage__ki_del(storage *s, MDB_txn *txn, const uint8_t *key, size_t klen)
{
	if (klen >= KI_LONG)
		return bucket_update(s, txn, key, klen, NULL);
	MDB_val k = lmdb_key(key, klen);
	int rc = mdb_del(txn, s->s_keys, &k, NULL);
	return rc == MDB_NOTFOUND ? 0 : storage__mdb_err(rc);
}

int storage__ki_range(storage *s, MDB_txn *txn, const uint8_t *key, size_t klen,
		      const uint8_t *end, size_t endlen, ki_visit_fn fn, void *arg)
{
	MDB_cursor *cur;
	int rc = mdb_cursor_open(txn, s->s_keys, &cur);
	if (rc)
		return storage__mdb_err(rc);
	MDB_val k = lmdb_key(key, klen), v;
	int err = 0;
	ki_state st;
	rc = mdb_cursor_get(cur, &k, &v, klen ? MDB_SET_RANGE : MDB_FIRST);
	while (rc == 0) {
		if (end && storage__bytes_cmp(k.mv_data, k.mv_size, end, endlen) >= 0)
			break; /* every key of a bucket is >= its prefix */
		if (k.mv_size < KI_LONG) {
			if (v.mv_size != KI_STATE_SIZE) {
				err = STORAGE_ERR_CORRUPT;
				break;
			}
			st_decode(v.mv_data, &st);
			if ((err = fn(arg, k.mv_data, k.mv_size, &st)))
				break;
		} else {
			const uint8_t *p = v.mv_data;
			size_t n = v.mv_size;
			while (n) {
				bent e;
				if ((err = bent_parse(p, n, &e)))
					goto out;
				p += e.size;
				n -= e.size;
				if (storage__bytes_cmp(e.key, e.klen, key, klen) < 0)
					continue;
				if (end && storage__bytes_cmp(e.key, e.klen, end, endlen) >= 0) {
					err = 1;
					goto out;
				}
				st_decode(e.state, &st);
				if ((err = fn(arg, e.key, e.klen, &st)))
					goto out;
			}
		}
		rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
	}
	if (!err && rc && rc != MDB_NOTFOUND)
		err = storage__mdb_err(rc);
out:
	mdb_cursor_close(cur);
	return err > 0 ? 0 : err;
}

static void hist_key(uint8_t *p, uint64_t id, int64_t main, int64_t sub)
{
	be64_put(p, id);
	be64_put(p + 8, (uint64_t)main);
	be64_put(p + 16, (uint64_t)sub);
}

int storage__hist_put(storage *s, MDB_txn *txn, uint64_t id, int64_t main, int64_t sub, int tomb)
{
	uint8_t kb[HIST_KEY_SIZE], vb = tomb ? 1 : 0;
	hist_key(kb, id, main, sub);
	MDB_val k = {sizeof(kb), kb}, v = {1, &vb};
	return storage__mdb_err(mdb_put(txn, s->s_hist, &k, &v, 0));
}

/*
 * The signpost of key id at or after (main, sub), or with before, the last one before it:
 * 0, STORAGE_ERR_NOT_FOUND (none of that key there), or an error.
 */
static int hist_seek(storage *s, MDB_txn *txn, uint64_t id, int64_t main, int64_t sub, int before,
		     int64_t *out_main, int64_t *out_sub, int *tomb)
{
	MDB_cursor *cur;
	int rc = mdb_cursor_open(txn, s->s_hist, &cur);
	if (rc)
		return storage__mdb_err(rc);
	uint8_t kb[HIST_KEY_SIZE];
	hist_key(kb, id, main, sub);
	MDB_val k = {sizeof(kb), kb}, v;
	rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
	if (before && rc == 0)
		rc = mdb_cursor_get(cur, &k, &v, MDB_PREV);
	else if (before && rc == MDB_NOTFOUND)
		rc = mdb_cursor_get(cur, &k, &v, MDB_LAST);
	int err;
	if (rc) {
		err = storage__mdb_err(rc);
	} else if (k.mv_size != HIST_KEY_SIZE || v.mv_size != 1) {
		err = STORAGE_ERR_CORRUPT;
	} else if (be64_get(k.mv_data) != id) {
		err = STORAGE_ERR_NOT_FOUND;
	} else {
		*out_main = (int64_t)be64_get((uint8_t *)k.mv_data + 8);
		*out_sub = (int64_t)be64_get((uint8_t *)k.mv_data + 16);
		*tomb = *(uint8_t *)v.mv_data != 0;
		err = 0;
	}
	mdb_cursor_close(cur);
	return err;
}

int storage__hist_from(storage *s, MDB_txn *txn, uint64_t id, int64_t from_main, int64_t from_sub,
		       int64_t *main, int64_t *sub)
{
	int tomb;
	return hist_seek(s, txn, id, from_main, from_sub, 0, main, sub, &tomb);
}

int storage__hist_at(storage *s, MDB_txn *txn, uint64_t id, int64_t rev, int64_t *main,
		     int64_t *sub, int *tomb)
{
	return hist_seek(s, txn, id, rev + 1, 0, 1, main, sub, tomb);
}

int storage__hist_del(storage *s, MDB_txn *txn, uint64_t id, int64_t main, int64_t sub)
{
	uint8_t kb[HIST_KEY_SIZE];
	hist_key(kb, id, main, sub);
	MDB_val k = {sizeof(kb), kb};
	int rc = mdb_del(txn, s->s_hist, &k, NULL);
	if (rc == MDB_NOTFOUND)
		return 0;
	return rc ? storage__mdb_err(rc) : 1;
}

