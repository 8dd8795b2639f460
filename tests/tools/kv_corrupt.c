/*
 * kv_corrupt.c - a test aid that corrupts a stopped member's data on purpose.
 *
 * It rewrites the value of a key's newest revision in the revision table ("revs", see
 * storage/internal.h: (main, sub) -> [flags u8][key id u64][mvccpb.KeyValue]) and nothing
 * else: no new revision, no change to the key index, so the member still believes it holds
 * the same history as its peers while its HashKV and its reads differ. This is the bit rot
 * the corruption checks exist to find.
 *
 * Usage: kv_corrupt <member dir> <key> <new value>. Exit 0 once changed, 1 if the key has
 * no live revision, 2 on usage or LMDB errors. The member must not be running.
 */
#include <lmdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/proto/kv.pb-c.h"

#define REV_KEY_SIZE 16
/* storage/internal.h: [flags][key id] and, with REV_FLAG_PREV, [prev main][prev sub] */
#define REV_HDR_SIZE_OLD 9
#define REV_HDR_SIZE 25
#define REV_FLAG_TOMB 1
#define REV_FLAG_PREV 2

static int fail(const char *what, int rc)
{
	fprintf(stderr, "kv_corrupt: %s: %s\n", what, mdb_strerror(rc));
	return 2;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: kv_corrupt <member dir> <key> <new value>\n");
		return 2;
	}
	const char *dir = argv[1], *key = argv[2], *value = argv[3];
	size_t klen = strlen(key);
	MDB_env *env;
	MDB_txn *txn;
	MDB_dbi revs;
	int rc = mdb_env_create(&env);
	if (rc)
		return fail("mdb_env_create", rc);
	mdb_env_set_maxdbs(env, 16);
	mdb_env_set_mapsize(env, 1ULL << 30); /* room to rewrite; the member sets its own again */
	if ((rc = mdb_env_open(env, dir, MDB_NOTLS, 0600)) != 0)
		return fail(dir, rc);
	if ((rc = mdb_txn_begin(env, NULL, 0, &txn)) != 0)
		return fail("mdb_txn_begin", rc);
	if ((rc = mdb_dbi_open(txn, "revs", 0, &revs)) != 0)
		return fail("open revs", rc);

	/* The newest revision of the key: scan from the end of the revision table. */
	MDB_cursor *cur;
	if ((rc = mdb_cursor_open(txn, revs, &cur)) != 0)
		return fail("mdb_cursor_open", rc);
	MDB_val k, v;
	int found = 0;
	uint8_t rk[REV_KEY_SIZE];
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_LAST); rc == 0; rc = mdb_cursor_get(cur, &k, &v, MDB_PREV)) {
		const uint8_t *p = v.mv_data;
		size_t hs = v.mv_size > 0 && (p[0] & REV_FLAG_PREV) ? REV_HDR_SIZE : REV_HDR_SIZE_OLD;
		if (k.mv_size != REV_KEY_SIZE || v.mv_size < hs)
			continue;
		Mvccpb__KeyValue *kv = mvccpb__key_value__unpack(NULL, v.mv_size - hs, p + hs);
		if (kv == NULL)
			continue;
		int match = kv->key.len == klen && memcmp(kv->key.data, key, klen) == 0;
		if (match && !(p[0] & REV_FLAG_TOMB)) {
			kv->value.data = (uint8_t *)value;
			kv->value.len = strlen(value);
			size_t n = mvccpb__key_value__get_packed_size(kv);
			uint8_t *buf = malloc(hs + n);
			if (buf == NULL) {
				fprintf(stderr, "kv_corrupt: out of memory\n");
				return 2;
			}
			memcpy(buf, p, hs);
			mvccpb__key_value__pack(kv, buf + hs);
			memcpy(rk, k.mv_data, REV_KEY_SIZE);
			MDB_val nk = {REV_KEY_SIZE, rk}, nv = {hs + n, buf};
			kv->value.data = NULL; /* not ours to free */
			kv->value.len = 0;
			mvccpb__key_value__free_unpacked(kv, NULL);
			mdb_cursor_close(cur);
			cur = NULL;
			rc = mdb_put(txn, revs, &nk, &nv, 0);
			free(buf);
			if (rc)
				return fail("mdb_put", rc);
			found = 1;
			break;
		}
		mvccpb__key_value__free_unpacked(kv, NULL);
		if (match)
			break; /* the newest revision is a tombstone: the key is not live */
	}
	if (cur)
		mdb_cursor_close(cur);
	if (!found) {
		mdb_txn_abort(txn);
		mdb_env_close(env);
		fprintf(stderr, "kv_corrupt: no live revision of %s\n", key);
		return 1;
	}
	if ((rc = mdb_txn_commit(txn)) != 0)
		return fail("mdb_txn_commit", rc);
	mdb_env_close(env);
	printf("changed the newest revision of %s\n", key);
	return 0;
}
