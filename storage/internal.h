/*
 * internal.h - private to storage/: the on-disk layout and the helpers shared by its files.
 *
 * One LMDB environment, named databases:
 *   "meta"  name -> value. Internal facts under "i:" (revision, compaction state, next key
 *           id, applied index), storage_batch_meta_put() names under "m:".
 *   "keys"  the key index (keyindex.c): user key (or a 400-byte bucket prefix for long keys)
 *           -> latest state of the key (ki_state), see keyindex.c for the design.
 *   "hist"  (key id u64, main u64, sub u64) big-endian -> 1 byte (1 = tombstone). Signposts
 *           in each key's history: its first revision, every HIST_EVERY-th version after
 *           that, and (kept by compaction) its oldest revision left. Between two signposts
 *           a key has fewer than HIST_EVERY + 1 revisions, chained by their prev pointers,
 *           so reading a key at an old revision is one seek here and a short walk back.
 *           Stores written before the prev pointer existed hold a signpost for every
 *           revision of those days (see REV_FLAG_PREV).
 *   "revs"  (main u64, sub u64) big-endian -> [flags u8][key id u64][prev main u64][prev sub
 *           u64][mvccpb.KeyValue]: the revision table; compaction and history replay (watch)
 *           are range scans of it. prev is the key's revision before this one (0, 0: none).
 *           Tombstones carry flag 1 and a KeyValue with key and mod_revision only.
 *   "leases" lease id -> granted TTL [, checkpointed remaining TTL]; "lkeys" (lease id,
 *           key id) -> (): which live keys a lease holds, so revoking it deletes them
 *           without a scan.
 * All integers on disk are big-endian.
 */
#ifndef KEELSON_STORAGE_INTERNAL_H
#define KEELSON_STORAGE_INTERNAL_H

#include <lmdb.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "storage/storage.h"

/* User keys at least this long live in a bucket keyed by their first KI_LONG bytes. */
#define KI_LONG 400
#define KI_STATE_SIZE 48
#define REV_KEY_SIZE 16
#define HIST_KEY_SIZE 24
#define REV_HDR_SIZE 25 /* flags, key id, prev (main, sub) before the encoded KeyValue */
#define REV_HDR_SIZE_OLD 9 /* flags, key id: records without REV_FLAG_PREV */
#define REV_FLAG_TOMB 1
/* The record holds its key's previous revision. Records written before it existed lack it,
 * and each of them has its own entry in "hist", so their predecessor is found there. */
#define REV_FLAG_PREV 2
/* A put writes a "hist" signpost when its version is 1 modulo this (and for a new key id):
 * a put writes one B-tree leaf at random (the key index) instead of two, and reading a key
 * at an old revision walks back at most HIST_EVERY + 1 records. */
#define HIST_EVERY 32
/* HIST_EVERY, except in tests (model_test makes the walks long and frequent). */
extern int storage__hist_every;
/* Revisions storage_batch_compact examines itself (10,000; model_test makes it small, so
 * that compaction goes on in later batches). */
extern int storage__compact_chunk;

/* The latest state of a key (version 0: the latest event is a tombstone). */
typedef struct ki_state {
	uint64_t ks_id; /* key id: names the key in "hist"; kept while the key has history */
	int64_t ks_mod_main;
	int64_t ks_mod_sub;
	int64_t ks_create;
	int64_t ks_version;
	int64_t ks_lease;
} ki_state;

struct storage {
	MDB_env *s_env;
	MDB_dbi s_meta, s_keys, s_hist, s_revs;
	MDB_dbi s_leases; /* lease id (i64 BE) -> granted TTL in seconds (i64 BE), then the
			   * checkpointed remaining TTL (i64 BE) if a checkpoint holds one */
	MDB_dbi s_lkeys;  /* (lease id, key id) BE -> nothing: the keys attached to a lease */
	MDB_dbi s_rlog;   /* the Raft log before wal.c: index (u64 BE) -> [term u64 BE][type u8]
			   * [data]; emptied into the WAL at open (migrate_rlog) */
	/* wal.c: the Raft log and hard state. The writer alone touches these. */
	int s_wal_fd;             /* the last segment, -1 before the first */
	uint64_t s_wal_off;       /* where the next record goes in it */
	uint64_t s_wal_cap;       /* its preallocated size */
	uint64_t s_wal_seg_size;
	uint64_t *s_wal_segs;     /* sequence numbers, oldest first */
	uint64_t *s_wal_seg_max;  /* the highest entry index each segment holds (0: none) */
	size_t s_wal_nsegs;
	int s_wal_has_hs;
	uint64_t s_wal_hs[3];     /* the last hard state written: term, vote, commit */
	int s_wal_failed;         /* a write failed: what is on disk is unknown, write no more */
	int s_lockfd;
	storage_batch *s_batch; /* the open batch, if any */
	uint64_t s_map_size;
	char *s_dir;
	_Atomic int64_t s_rev; /* answered revision, for storage_current_revision() */
	/* The committer (env.c): the thread that begins and ends every batch's LMDB txn. */
	pthread_t s_cm_thread;
	int s_cm_started;
	pthread_mutex_t s_cm_mu;  /* guards the job slot and the counters' waits */
	pthread_cond_t s_cm_cond; /* a job was posted or finished, or a commit published */
	int s_cm_job;             /* CM_*: what the committer is asked to do, CM_NONE when idle */
	int s_cm_done;            /* the posted job is finished; s_cm_err its result */
	int s_cm_err;
	storage_batch *s_cm_batch;
	int s_cm_lazy, s_cm_async;
	void (*_Atomic s_cm_observe)(void *arg, uint64_t ns, int err); /* storage_set_commit_observer */
	void *_Atomic s_cm_observe_arg;
	_Atomic int s_cm_async_err; /* an asynchronous commit failed: later batches and reads fail */
	/* Commits handed over vs made visible: a reader waits until the second reaches the
	 * first (or, storage_read_begin_at, until s_pub_applied reaches its read index), so it
	 * never misses a write answered before it began. */
	_Atomic uint64_t s_cm_handed, s_cm_published;
	/* The applied index of the latest visible commit: a reader that needs only that much
	 * (storage_read_begin_at) need not wait for later commits. */
	_Atomic uint64_t s_pub_applied;
	/* storage_set_commit_window(): an answered batch may wait ("parked") so that the next
	 * applies continue its transaction (storage_batch_begin_apply) and one commit writes
	 * them all. The committer commits it once the window has passed and the writer is idle
	 * (s_cm_writer_idle: storage_set_writer_idle), or a quarter window later whatever the
	 * writer does, at once when someone waits for it (s_cm_kick), and before any other job. */
	storage_batch *s_cm_parked;
	uint64_t s_cm_window_ns;  /* 0: never park */
	int64_t s_cm_window_revs; /* nor once the parked txn holds this many revisions */
	int s_cm_kick;
	_Atomic int s_cm_writer_idle;
	/* Readers and the batch hold it shared; defragment, which replaces the environment,
	 * holds it exclusively. */
	pthread_rwlock_t s_envlock;
};

struct storage_batch {
	storage *b_s;
	MDB_txn *b_txn;        /* the batch's write txn; each request runs in a child of it */
	int64_t b_rev;         /* store revision before the current request */
	int64_t b_start_rev;   /* store revision when the batch began: its events follow it */
	int64_t b_changes;     /* writes so far in the current request = next sub revision */
	int64_t b_compact;     /* compacted revision, -1 if none */
	int64_t b_cnext_main;  /* physical compaction resumes at this revision */
	int64_t b_cnext_sub;
	int64_t b_cpending;    /* 1 while superseded revisions <= b_compact may remain */
	int64_t b_next_id;     /* next key id to hand out */
	/* The batch's WAL records (wal.c), written and synced before the LMDB commit. */
	uint8_t *b_wal;
	size_t b_wal_len, b_wal_cap;
	uint64_t b_wal_max_index;
	int b_wal_hs_set;
	uint64_t b_wal_hs[3];
	int64_t b_wal_clear_off;  /* offset of a clear record in b_wal, -1 if none */
	int b_wal_written;        /* records of this batch reached the WAL */
	int b_log_only;           /* storage_batch_begin_log(): no LMDB txn, no envlock */
	int b_snap_set;           /* storage_batch_log_snapshot() was called: */
	uint64_t b_snap_index;    /* its index */
	uint64_t b_seq;           /* s_cm_handed when handed over or parked: its commit publishes it */
	uint64_t b_applied;       /* the applied index its commit records */
	uint64_t b_parked_ns;     /* when first parked (0: never), CLOCK_MONOTONIC */
	int64_t b_park_rev;       /* the revision its txn started from when first parked */
	/* Continuing a parked batch: b_txn is a child of b_parent (the parked txn), so that an
	 * abort drops only what came after, and the counters go back to b_saved. */
	MDB_txn *b_parent;
	struct batch_counters {
		int64_t rev, compact, cnext_main, cnext_sub, cpending, next_id;
	} b_saved; /* b_rev, b_compact, b_cnext_main, b_cnext_sub, b_cpending, b_next_id */
};

struct storage_reader {
	storage *r_s;
	MDB_txn *r_txn;
	int64_t r_rev;
	int64_t r_compact;
};

/* Internal meta names. */
#define META_REV "i:rev"
#define META_COMPACT "i:compact"
#define META_CNEXT_MAIN "i:cnext_main"
#define META_CNEXT_SUB "i:cnext_sub"
#define META_CPENDING "i:cpending"
#define META_NEXT_ID "i:next_id"
#define META_APPLIED "i:applied"
/* The record format of the store: STORE_FORMAT, written at open. 1: revision records
 * without prev pointers (read as well). Absent: 1, or 2 from the builds between 6179e90 and
 * the mark. A newer one is refused: an older build would misread its records. */
#define META_FORMAT "i:format"
#define STORE_FORMAT 2
#define META_RL_TERM "i:rl_term"
#define META_RL_VOTE "i:rl_vote"
#define META_RL_COMMIT "i:rl_commit"
#define META_RL_SNAP_INDEX "i:rl_snap_index"
#define META_RL_SNAP_TERM "i:rl_snap_term"
#define META_RL_SNAP_CONF "i:rl_snap_conf"

/* What one read or write pass sees. */
typedef struct mv {
	storage *v_s;
	MDB_txn *v_txn;
	int v_copy;          /* copy bytes into the arena (writer: the map moves under writes) */
	int64_t v_rev;       /* current revision as this view sees it */
	int64_t v_compact;   /* compacted revision, -1 if none */
} mv;

/* ---- big-endian helpers ---- */
static inline void be64_put(uint8_t *p, uint64_t v)
{
	for (int i = 7; i >= 0; i--) {
		p[i] = (uint8_t)v;
		v >>= 8;
	}
}
static inline uint64_t be64_get(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = (v << 8) | p[i];
	return v;
}
static inline void rev_key(uint8_t *p, int64_t main, int64_t sub)
{
	be64_put(p, (uint64_t)main);
	be64_put(p + 8, (uint64_t)sub);
}

/* Lexicographic byte comparison, shorter prefix first (Go's bytes.Compare). */
static inline int storage__bytes_cmp(const void *a, size_t an, const void *b, size_t bn)
{
	size_t n = an < bn ? an : bn;
	int c = n ? memcmp(a, b, n) : 0;
	if (c)
		return c;
	return an < bn ? -1 : an > bn;
}

/* The header of a revision record, as storage__rev_parse() reads it. */
typedef struct rev_hdr {
	int tomb;
	uint64_t id;
	int has_prev;          /* REV_FLAG_PREV: prev_main/prev_sub are the record's */
	int64_t prev_main, prev_sub; /* (0, 0): the key had no revision before */
	const uint8_t *kv;     /* the encoded mvccpb.KeyValue, in the record */
	size_t kvlen;
} rev_hdr;

/* Reads the header of a revision record: 0 or STORAGE_ERR_CORRUPT. */
static inline int storage__rev_parse(const MDB_val *v, rev_hdr *h)
{
	const uint8_t *p = v->mv_data;
	if (v->mv_size < REV_HDR_SIZE_OLD)
		return STORAGE_ERR_CORRUPT;
	h->tomb = p[0] & REV_FLAG_TOMB;
	h->has_prev = (p[0] & REV_FLAG_PREV) != 0;
	h->id = be64_get(p + 1);
	size_t hs = REV_HDR_SIZE_OLD;
	h->prev_main = h->prev_sub = 0;
	if (h->has_prev) {
		if (v->mv_size < REV_HDR_SIZE)
			return STORAGE_ERR_CORRUPT;
		h->prev_main = (int64_t)be64_get(p + 9);
		h->prev_sub = (int64_t)be64_get(p + 17);
		hs = REV_HDR_SIZE;
	}
	h->kv = p + hs;
	h->kvlen = v->mv_size - hs;
	return 0;
}

/* ---- kvcodec.c: mvccpb.KeyValue as etcd encodes it ---- */
typedef struct kvrec {
	const uint8_t *key;
	size_t klen;
	int64_t create, mod, version, lease;
	const uint8_t *val;
	size_t vlen;
} kvrec;
size_t storage__varint_size(uint64_t v);
uint8_t *storage__varint_put(uint8_t *p, uint64_t v);
/* 0, or STORAGE_ERR_CORRUPT for a truncated or overlong varint. */
int storage__varint_get(const uint8_t **pp, const uint8_t *e, uint64_t *out);
size_t storage__kv_size(const kvrec *r);
uint8_t *storage__kv_encode(uint8_t *p, const kvrec *r);
/* Decodes a KeyValue; byte fields point into p; unknown fields are skipped. */
int storage__kv_decode(const uint8_t *p, size_t n, kvrec *r);

/* Translates an LMDB or errno code into a storage code. */
int storage__mdb_err(int rc);
/* fsync of a directory, so the names created, renamed or removed in it are durable. */
int storage__fsync_dir(const char *dir);

/* ---- keyindex.c ---- */
/* Looks up the state of key: 0, STORAGE_ERR_NOT_FOUND, or an error. */
int storage__ki_get(storage *s, MDB_txn *txn, const uint8_t *key, size_t klen, ki_state *st);
/* Inserts or replaces the state of key. */
int storage__ki_set(storage *s, MDB_txn *txn, const uint8_t *key, size_t klen,
		    const ki_state *st);
/* Removes key from the index (no error if absent). */
int storage__ki_del(storage *s, MDB_txn *txn, const uint8_t *key, size_t klen);
/*
 * Visits the keys of the index in [key, end) in order (end == NULL: unbounded). The key
 * pointer is valid during the call only; fn must not write to txn. fn returns 0 to go on,
 * 1 to stop, or a negative error which is returned.
 */
typedef int (*ki_visit_fn)(void *arg, const uint8_t *key, size_t klen, const ki_state *st);
int storage__ki_range(storage *s, MDB_txn *txn, const uint8_t *key, size_t klen,
		      const uint8_t *end, size_t endlen, ki_visit_fn fn, void *arg);
int storage__hist_put(storage *s, MDB_txn *txn, uint64_t id, int64_t main, int64_t sub, int tomb);
/* The newest signpost of key id with main <= rev: 0 or STORAGE_ERR_NOT_FOUND. */
int storage__hist_at(storage *s, MDB_txn *txn, uint64_t id, int64_t rev, int64_t *main,
		     int64_t *sub, int *tomb);
/* The oldest signpost of key id at or after (from_main, from_sub): 0 or STORAGE_ERR_NOT_FOUND. */
int storage__hist_from(storage *s, MDB_txn *txn, uint64_t id, int64_t from_main, int64_t from_sub,
		       int64_t *main, int64_t *sub);
/* Removes the signpost of (id, main, sub): 1 if there was one, 0 if not, or an error. */
int storage__hist_del(storage *s, MDB_txn *txn, uint64_t id, int64_t main, int64_t sub);

/* ---- mvcc.c: the revision table ---- */
/*
 * Appends the record of revision (main, sub) of key id, whose previous revision was
 * (prev_main, prev_sub) ((0, 0): none, a new key id), and its "hist" signpost if it is due.
 */
int storage__rev_put(storage *s, MDB_txn *txn, int64_t main, int64_t sub, uint64_t id, int tomb,
		     int64_t prev_main, int64_t prev_sub, const kvrec *r);
/*
 * The revision of a key as of rev, given the key's newest state st: 0, or
 * STORAGE_ERR_NOT_FOUND when the key did not exist then (not yet written, or deleted).
 * rev must not be below the compacted revision. r (if not NULL) gets the record, pointing
 * into the map of txn.
 */
int storage__rev_at(storage *s, MDB_txn *txn, const ki_state *st, int64_t rev, int64_t *main,
		    int64_t *sub, kvrec *r);
/*
 * Whether the record h of revision (main, sub) is its key's newest at or below rev and not
 * a tombstone: what a compaction at rev keeps of it.
 */
int storage__rev_newest_at(storage *s, MDB_txn *txn, const rev_hdr *h, int64_t main, int64_t sub,
			   int64_t rev, int *yes);

/* ---- wal.c ---- */
typedef struct storage__wal_log {
	storage_log_entry *wl_e; /* malloc'd; data points into the arena */
	size_t wl_n, wl_cap;
	int wl_has_hs;
	uint64_t wl_hs[3];
	uint64_t *wl_seg_max;
} storage__wal_log;
int storage__wal_add_entries(storage_batch *b, const storage_log_entry *e, size_t n);
int storage__wal_add_hs(storage_batch *b, uint64_t term, uint64_t vote, uint64_t commit);
int storage__wal_add_clear(storage_batch *b, uint64_t snap_index);
/* Whether the batch has WAL records not yet written. */
static inline int storage__wal_pending(const storage_batch *b)
{
	return b->b_wal_len > 0 || b->b_wal_hs_set;
}
/* Reads every segment: the log as the WAL holds it (a clear honoured if snap_index, LMDB's
 * snapshot point, is at or past it). */
int storage__wal_load(storage *s, storage_arena *a, uint64_t snap_index, storage__wal_log *l,
		      uint64_t **segs, size_t *nsegs, size_t *tail, int *tail_clean);
void storage__wal_log_free(storage__wal_log *l);
/* The decoder itself, over segment contents in order (tests/fuzz/keelson_wal_fuzz.c):
 * STORAGE_ERR_CORRUPT for a bad record but at the end of the last segment, or a hole. */
int storage__wal_decode(const uint8_t *const *bufs, const size_t *lens, size_t n, uint64_t snap_index,
			storage__wal_log *l, size_t *tail, int *tail_clean);
/* Opens the WAL: cuts a torn tail off, and clears a log that contradicts LMDB's snapshot
 * point (see contradicts()). */
int storage__wal_open(storage *s, uint64_t segment_size, uint64_t snap_index, uint64_t snap_term);
void storage__wal_close(storage *s);
/* Writes the batch's records and fdatasyncs them (nothing if it has none). */
int storage__wal_write(storage_batch *b);
/* Whether segments would go at this snapshot index; removes the segments (oldest first, never
 * the last) whose entries are all <= durable_snap_index, which LMDB must hold durably. */
int storage__wal_removable(storage *s, uint64_t snap_index);
int storage__wal_remove_through(storage *s, uint64_t durable_snap_index);

/* ---- raftlog.c ---- */
int storage__migrate_rlog(storage *s);

/* ---- env.c ---- */
int storage__meta_get_i64(storage *s, MDB_txn *txn, const char *name, int64_t dflt,
			  int64_t *out);
int storage__meta_put_i64(storage *s, MDB_txn *txn, const char *name, int64_t v);

#endif
