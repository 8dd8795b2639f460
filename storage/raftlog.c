/*
 * raftlog.c - the Raft log, the hard state and the snapshot point, in the member's LMDB
 * environment beside the keyspace, so that one transaction can hold a Ready's entries, its
 * hard state and the apply of its committed entries.
 */
#include <stdlib.h>
#include <string.h>

#include "storage/internal.h"

#define RLOG_HDR 9 /* term u64 + type u8 */

int storage_batch_log_append(storage_batch *b, const storage_log_entry *e, size_t n)
{
	if (n == 0)
		return 0;
	storage *s = b->b_s;
	MDB_txn *txn = b->b_txn;
	MDB_cursor *cur;
	int err = storage__mdb_err(mdb_cursor_open(txn, s->s_rlog, &cur));
	if (err)
		return err;
	/* Drop the conflicting suffix: every entry at or after the first new index. */
	uint8_t kb[8];
	be64_put(kb, e[0].le_index);
	MDB_val k = {sizeof(kb), kb}, v;
	int rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
	/* After mdb_cursor_del the cursor rests on the next record, which MDB_NEXT returns. */
	while (rc == 0) {
		if ((rc = mdb_cursor_del(cur, 0)) != 0)
			break;
		rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
	}
	mdb_cursor_close(cur);
	if (rc != MDB_NOTFOUND && rc != 0)
		return storage__mdb_err(rc);
	for (size_t i = 0; i < n; i++) {
		if (i > 0 && e[i].le_index != e[i - 1].le_index + 1)
			return STORAGE_ERR_INVALID;
		be64_put(kb, e[i].le_index);
		MDB_val key = {sizeof(kb), kb}, val = {RLOG_HDR + e[i].le_len, NULL};
		/* Indexes only grow once the suffix is gone: append without searching. */
		if ((rc = mdb_put(txn, s->s_rlog, &key, &val, MDB_RESERVE | MDB_APPEND)) != 0)
			return storage__mdb_err(rc);
		uint8_t *p = val.mv_data;
		be64_put(p, e[i].le_term);
		p[8] = e[i].le_type;
		if (e[i].le_len)
			memcpy(p + RLOG_HDR, e[i].le_data, e[i].le_len);
	}
	return 0;
}

int storage_batch_log_hard_state(storage_batch *b, uint64_t term, uint64_t vote, uint64_t commit)
{
	storage *s = b->b_s;
	int err = storage__meta_put_i64(s, b->b_txn, META_RL_TERM, (int64_t)term);
	if (!err)
		err = storage__meta_put_i64(s, b->b_txn, META_RL_VOTE, (int64_t)vote);
	if (!err)
		err = storage__meta_put_i64(s, b->b_txn, META_RL_COMMIT, (int64_t)commit);
	return err;
}

int storage_batch_log_snapshot(storage_batch *b, uint64_t index, uint64_t term, const void *conf,
			       size_t conf_len)
{
	storage *s = b->b_s;
	MDB_txn *txn = b->b_txn;
	int err = storage__meta_put_i64(s, txn, META_RL_SNAP_INDEX, (int64_t)index);
	if (!err)
		err = storage__meta_put_i64(s, txn, META_RL_SNAP_TERM, (int64_t)term);
	if (err)
		return err;
	MDB_val k = {strlen(META_RL_SNAP_CONF), (void *)META_RL_SNAP_CONF}, v = {conf_len, (void *)conf};
	if ((err = storage__mdb_err(mdb_put(txn, s->s_meta, &k, &v, 0))))
		return err;
	/* Drop the entries the snapshot covers, oldest first. */
	MDB_cursor *cur;
	if ((err = storage__mdb_err(mdb_cursor_open(txn, s->s_rlog, &cur))))
		return err;
	MDB_val ck, cv;
	int rc = mdb_cursor_get(cur, &ck, &cv, MDB_FIRST);
	while (rc == 0 && ck.mv_size == 8 && be64_get(ck.mv_data) <= index) {
		if ((rc = mdb_cursor_del(cur, 0)) != 0)
			break;
		rc = mdb_cursor_get(cur, &ck, &cv, MDB_NEXT);
	}
	mdb_cursor_close(cur);
	return rc == 0 || rc == MDB_NOTFOUND ? 0 : storage__mdb_err(rc);
}

int storage_read_log(storage_reader *r, storage_arena *a, storage_log_state *out)
{
	storage *s = r->r_s;
	MDB_txn *txn = r->r_txn;
	int64_t v[5];
	static const char *const names[5] = {META_RL_TERM, META_RL_VOTE, META_RL_COMMIT,
					     META_RL_SNAP_INDEX, META_RL_SNAP_TERM};
	memset(out, 0, sizeof(*out));
	for (int i = 0; i < 5; i++) {
		int err = storage__meta_get_i64(s, txn, names[i], 0, &v[i]);
		if (err)
			return err;
	}
	out->ls_term = (uint64_t)v[0];
	out->ls_vote = (uint64_t)v[1];
	out->ls_commit = (uint64_t)v[2];
	out->ls_snap_index = (uint64_t)v[3];
	out->ls_snap_term = (uint64_t)v[4];
	MDB_val k = {strlen(META_RL_SNAP_CONF), (void *)META_RL_SNAP_CONF}, cv;
	int rc = mdb_get(txn, s->s_meta, &k, &cv);
	if (rc == 0) {
		out->ls_snap_conf = cv.mv_data;
		out->ls_snap_conf_len = cv.mv_size;
	} else if (rc != MDB_NOTFOUND) {
		return storage__mdb_err(rc);
	}

	MDB_stat st;
	int err = storage__mdb_err(mdb_stat(txn, s->s_rlog, &st));
	if (err)
		return err;
	if (st.ms_entries == 0)
		return 0;
	storage_log_entry *e = storage_arena_alloc(a, st.ms_entries * sizeof(*e));
	if (e == NULL)
		return STORAGE_ERR_NOMEM;
	MDB_cursor *cur;
	if ((err = storage__mdb_err(mdb_cursor_open(txn, s->s_rlog, &cur))))
		return err;
	size_t n = 0;
	MDB_val ek, ev;
	for (rc = mdb_cursor_get(cur, &ek, &ev, MDB_FIRST); rc == 0 && n < st.ms_entries;
	     rc = mdb_cursor_get(cur, &ek, &ev, MDB_NEXT)) {
		if (ek.mv_size != 8 || ev.mv_size < RLOG_HDR) {
			err = STORAGE_ERR_CORRUPT;
			break;
		}
		const uint8_t *p = ev.mv_data;
		e[n].le_index = be64_get(ek.mv_data);
		e[n].le_term = be64_get(p);
		e[n].le_type = p[8];
		e[n].le_len = (uint32_t)(ev.mv_size - RLOG_HDR);
		e[n].le_data = p + RLOG_HDR;
		/* The log after the snapshot point must be contiguous. */
		if (e[n].le_index <= out->ls_snap_index ||
		    (n > 0 && e[n].le_index != e[n - 1].le_index + 1)) {
			err = STORAGE_ERR_CORRUPT;
			break;
		}
		n++;
	}
	if (!err && rc != 0 && rc != MDB_NOTFOUND)
		err = storage__mdb_err(rc);
	mdb_cursor_close(cur);
	if (err)
		return err;
	out->ls_entries = e;
	out->ls_n_entries = n;
	return 0;
}

int storage_batch_log_clear(storage_batch *b)
{
	return storage__mdb_err(mdb_drop(b->b_txn, b->b_s->s_rlog, 0));
}
