/*
 * raftlog.c - the Raft log API over the WAL (wal.c) and LMDB: entries and the hard state go
 * to the WAL; the snapshot point describes LMDB's state, so it is in LMDB's meta, written in
 * the LMDB commit of the state it describes.
 */
#include <stdlib.h>
#include <string.h>

#include "crashpoint/crashpoint.h"
#include "storage/internal.h"

#define RLOG_HDR 9 /* the old rlog tree's value: term u64 + type u8 */

int storage_batch_log_append(storage_batch *b, const storage_log_entry *e, size_t n)
{
	return storage__wal_add_entries(b, e, n);
}

int storage_batch_log_hard_state(storage_batch *b, uint64_t term, uint64_t vote, uint64_t commit)
{
	return storage__wal_add_hs(b, term, vote, commit);
}

int storage_batch_log_snapshot(storage_batch *b, uint64_t index, uint64_t term, const void *conf,
			       size_t conf_len)
{
	storage *s = b->b_s;
	MDB_txn *txn = b->b_txn;
	if (b->b_log_only)
		return STORAGE_ERR_INVALID; /* the snapshot point lives in LMDB */
	if (b->b_parked_ns)
		return STORAGE_ERR_INVALID; /* a continued parked batch (begin_apply): its abort
					     * could not take the point's WAL removal back */
	int err = storage__meta_put_i64(s, txn, META_RL_SNAP_INDEX, (int64_t)index);
	if (!err)
		err = storage__meta_put_i64(s, txn, META_RL_SNAP_TERM, (int64_t)term);
	if (err)
		return err;
	MDB_val k = {strlen(META_RL_SNAP_CONF), (void *)META_RL_SNAP_CONF}, v = {conf_len, (void *)conf};
	if ((err = storage__mdb_err(mdb_put(txn, s->s_meta, &k, &v, 0))))
		return err;
	/* The WAL keeps the entries it covers until a durable LMDB state covers them too
	 * (env.c removes whole segments after the commit). Readers skip them. */
	b->b_snap_set = 1;
	b->b_snap_index = index;
	return 0;
}

int storage_batch_log_clear(storage_batch *b, uint64_t snap_index)
{
	return storage__wal_add_clear(b, snap_index);
}

int storage_read_log(storage_reader *r, storage_arena *a, storage_log_state *out)
{
	storage *s = r->r_s;
	MDB_txn *txn = r->r_txn;
	int64_t v[3];
	static const char *const names[3] = {META_RL_SNAP_INDEX, META_RL_SNAP_TERM, META_APPLIED};
	memset(out, 0, sizeof(*out));
	for (int i = 0; i < 3; i++) {
		int err = storage__meta_get_i64(s, txn, names[i], 0, &v[i]);
		if (err)
			return err;
	}
	out->ls_snap_index = (uint64_t)v[0];
	out->ls_snap_term = (uint64_t)v[1];
	MDB_val k = {strlen(META_RL_SNAP_CONF), (void *)META_RL_SNAP_CONF}, cv;
	int rc = mdb_get(txn, s->s_meta, &k, &cv);
	if (rc == 0) {
		out->ls_snap_conf = cv.mv_data;
		out->ls_snap_conf_len = cv.mv_size;
	} else if (rc != MDB_NOTFOUND) {
		return storage__mdb_err(rc);
	}

	storage__wal_log l;
	uint64_t *segs;
	size_t nsegs, tail;
	int clean;
	int err = storage__wal_load(s, a, out->ls_snap_index, &l, &segs, &nsegs, &tail, &clean);
	if (err)
		return err;
	free(segs);
	out->ls_term = l.wl_hs[0];
	out->ls_vote = l.wl_hs[1];
	out->ls_commit = l.wl_hs[2];
	/* Entries the snapshot point covers are LMDB's now. If the WAL's entry at the point has
	 * another term, the log after it is an old one the installed snapshot replaced (a crash
	 * between the install and the clear record): drop it too. */
	size_t from = 0, to = l.wl_n;
	while (from < to && l.wl_e[from].le_index <= out->ls_snap_index) {
		if (l.wl_e[from].le_index == out->ls_snap_index && l.wl_e[from].le_term != out->ls_snap_term)
			to = from + 1;
		from++;
	}
	if (from < to && l.wl_e[from].le_index != out->ls_snap_index + 1)
		err = STORAGE_ERR_CORRUPT; /* entries missing between the point and the log */
	size_t n = to - from;
	storage_log_entry *e = NULL;
	if (!err && n && (e = storage_arena_alloc(a, n * sizeof(*e))) == NULL)
		err = STORAGE_ERR_NOMEM;
	if (!err && n)
		memcpy(e, l.wl_e + from, n * sizeof(*e));
	storage__wal_log_free(&l);
	if (err)
		return err;
	out->ls_entries = e;
	out->ls_n_entries = n;
	/* A commit index past the log's end (its entries lost with a void install) would be a
	 * promise Raft cannot keep; the leader tells it again. */
	uint64_t last = n ? e[n - 1].le_index : out->ls_snap_index;
	if (out->ls_commit > last)
		out->ls_commit = last;
	/* The commit index is written unsynced (and not at all when it alone moves), so it may
	 * trail what LMDB applied: an applied entry was committed. */
	uint64_t applied = (uint64_t)v[2];
	if (out->ls_commit < applied && applied <= last)
		out->ls_commit = applied;
	return 0;
}

/*
 * Moves the log of an older Keelson (the rlog tree, the hard state in meta) into the WAL:
 * write and sync the WAL first, then empty the tree in a durable LMDB commit. A crash in
 * between leaves both: the next open appends the same records again, and since an entry at
 * an index the WAL holds replaces the suffix from there, that is harmless.
 */
int storage__migrate_rlog(storage *s)
{
	MDB_txn *txn;
	int err = storage__mdb_err(mdb_txn_begin(s->s_env, NULL, 0, &txn));
	if (err)
		return err;
	MDB_stat st;
	int64_t hs[3] = {0, 0, 0};
	int has_hs = 0;
	static const char *const names[3] = {META_RL_TERM, META_RL_VOTE, META_RL_COMMIT};
	for (int i = 0; !err && i < 3; i++) {
		MDB_val k = {strlen(names[i]), (void *)names[i]}, v;
		int rc = mdb_get(txn, s->s_meta, &k, &v);
		if (rc == 0)
			has_hs = 1;
		else if (rc != MDB_NOTFOUND)
			err = storage__mdb_err(rc);
		if (!err)
			err = storage__meta_get_i64(s, txn, names[i], 0, &hs[i]);
	}
	if (!err)
		err = storage__mdb_err(mdb_stat(txn, s->s_rlog, &st));
	if (err || (!has_hs && st.ms_entries == 0)) {
		mdb_txn_abort(txn);
		return err;
	}
	/* A batch of our own, writing only WAL records, without the batch API's locking. */
	storage_batch b;
	memset(&b, 0, sizeof(b));
	b.b_s = s;
	b.b_wal_clear_off = -1;
	if (has_hs)
		err = storage__wal_add_hs(&b, (uint64_t)hs[0], (uint64_t)hs[1], (uint64_t)hs[2]);
	MDB_cursor *cur = NULL;
	if (!err)
		err = storage__mdb_err(mdb_cursor_open(txn, s->s_rlog, &cur));
	MDB_val ek, ev;
	int rc = err ? MDB_NOTFOUND : mdb_cursor_get(cur, &ek, &ev, MDB_FIRST);
	for (; !err && rc == 0; rc = mdb_cursor_get(cur, &ek, &ev, MDB_NEXT)) {
		if (ek.mv_size != 8 || ev.mv_size < RLOG_HDR) {
			err = STORAGE_ERR_CORRUPT;
			break;
		}
		const uint8_t *p = ev.mv_data;
		storage_log_entry e = {be64_get(ek.mv_data), be64_get(p), p[8],
				       (uint32_t)(ev.mv_size - RLOG_HDR), p + RLOG_HDR};
		err = storage__wal_add_entries(&b, &e, 1);
	}
	if (!err && rc != 0 && rc != MDB_NOTFOUND)
		err = storage__mdb_err(rc);
	if (cur)
		mdb_cursor_close(cur);
	if (!err)
		err = storage__wal_write(&b);
	free(b.b_wal);
	if (!err)
		CRASHPOINT("wal.migrated"); /* the log in both the WAL and the rlog tree */
	if (!err)
		err = storage__mdb_err(mdb_drop(txn, s->s_rlog, 0));
	for (int i = 0; !err && i < 3; i++) {
		MDB_val k = {strlen(names[i]), (void *)names[i]};
		int rc2 = mdb_del(txn, s->s_meta, &k, NULL);
		if (rc2 != 0 && rc2 != MDB_NOTFOUND)
			err = storage__mdb_err(rc2);
	}
	if (err) {
		mdb_txn_abort(txn);
		return err;
	}
	return storage__mdb_err(mdb_txn_commit(txn)); /* default flags: durable */
}
