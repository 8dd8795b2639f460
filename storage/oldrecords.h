/*
 * oldrecords.h - for storage's tests: rewrites a store into the shape one written before
 * revision records named their key's previous revision had: 9-byte record headers and a
 * "hist" entry for every revision. Needs internal.h first.
 */
#ifndef KEELSON_STORAGE_OLDRECORDS_H
#define KEELSON_STORAGE_OLDRECORDS_H

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* 0, or an LMDB code / storage error. No batch may be open. */
static inline int t_to_old_records(storage *s)
{
	MDB_txn *txn;
	MDB_cursor *c;
	MDB_val k, v;
	int rc = mdb_txn_begin(s->s_env, NULL, 0, &txn);
	if (rc)
		return rc;
	if ((rc = mdb_cursor_open(txn, s->s_revs, &c))) {
		mdb_txn_abort(txn);
		return rc;
	}
	for (rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == 0; rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
		rev_hdr h;
		if ((rc = storage__rev_parse(&v, &h)))
			break;
		/* A record of another size is deleted and inserted: copy what points into it. */
		uint8_t kb[REV_KEY_SIZE];
		memcpy(kb, k.mv_data, sizeof(kb));
		k.mv_data = kb;
		size_t n = REV_HDR_SIZE_OLD + h.kvlen;
		uint8_t *buf = malloc(n);
		if (!buf) {
			rc = ENOMEM;
			break;
		}
		buf[0] = h.tomb ? REV_FLAG_TOMB : 0;
		be64_put(buf + 1, h.id);
		memcpy(buf + REV_HDR_SIZE_OLD, h.kv, h.kvlen);
		MDB_val nv = {n, buf};
		rc = mdb_cursor_put(c, &k, &nv, MDB_CURRENT);
		free(buf);
		if (!rc)
			rc = storage__hist_put(s, txn, h.id, (int64_t)be64_get(kb), (int64_t)be64_get(kb + 8), h.tomb);
		if (rc)
			break;
	}
	mdb_cursor_close(c);
	if (rc != MDB_NOTFOUND) {
		mdb_txn_abort(txn);
		return rc;
	}
	return mdb_txn_commit(txn);
}

#endif
