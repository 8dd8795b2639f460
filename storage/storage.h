/*
 * storage.h - everything a Keelson member keeps on disk: one LMDB environment, and the Raft
 * log in an append-only WAL beside it (wal.c).
 *
 * The MVCC keyspace follows etcd: every write advances the store's main revision; each key
 * has create_revision, mod_revision and version; a delete writes a tombstone. Ranges can be
 * read at any revision newer than the compacted one.
 *
 * Threads: one writer (the node loop) applies batches through storage_batch; any number of
 * readers, each a storage_reader used by one thread at a time (LMDB MDB_NOTLS read txns),
 * may run at once on other threads and never block the writer.
 *
 * Messages are protobuf-c structs from api/proto. Everything a call puts into a response is
 * allocated from the caller's storage_arena; byte fields of responses produced by a reader
 * may point straight into LMDB's map and are valid until storage_read_end().
 */
#ifndef KEELSON_STORAGE_H
#define KEELSON_STORAGE_H

#include <stddef.h>
#include <stdint.h>

#include "api/proto/rpc.pb-c.h"

/* Error codes: 0 is success, storage owns -1000..-1099. */
enum {
	STORAGE_OK = 0,
	STORAGE_ERR_COMPACTED = -1000, /* "mvcc: required revision has been compacted" */
	STORAGE_ERR_FUTURE_REV = -1001, /* "mvcc: required revision is a future revision" */
	STORAGE_ERR_INVALID = -1002,    /* a request storage cannot apply (bad argument) */
	STORAGE_ERR_NOSPACE = -1003,    /* the LMDB map is full */
	STORAGE_ERR_IO = -1004,         /* a read or write to disk failed */
	STORAGE_ERR_CORRUPT = -1005,    /* on-disk data fails a check */
	STORAGE_ERR_NOMEM = -1006,
	STORAGE_ERR_NOT_FOUND = -1007,  /* a meta key that was never written */
	STORAGE_ERR_BUSY = -1008,       /* the data dir is in use by another process */
	STORAGE_ERR_KEY_NOT_FOUND = -1009, /* "etcdserver: key not found" (ignore_value/ignore_lease
					    * on a key that does not exist) */
	STORAGE_ERR_LEASE_NOT_FOUND = -1010, /* "etcdserver: requested lease not found" */
	STORAGE_ERR_LEASE_EXISTS = -1011,    /* "etcdserver: lease already exists" */
};

/* Human-readable text for a storage error code; never NULL. */
const char *storage_strerror(int err);

/*
 * storage_arena: a bump allocator whose memory is released all at once.
 * The struct may live on the stack; zero-initialise it or call storage_arena_init().
 */
typedef struct storage_arena_chunk storage_arena_chunk;
typedef struct storage_arena {
	storage_arena_chunk *sa_head; /* newest chunk first */
	size_t sa_used;               /* bytes used in sa_head */
	size_t sa_cap;                /* capacity of sa_head */
} storage_arena;

void storage_arena_init(storage_arena *a);
/* Returns 16-byte aligned memory owned by the arena, or NULL when out of memory. */
void *storage_arena_alloc(storage_arena *a, size_t n);
/* Copies n bytes into the arena. */
void *storage_arena_dup(storage_arena *a, const void *p, size_t n);
/* Releases every allocation; the arena may be reused afterwards. */
void storage_arena_free(storage_arena *a);

typedef struct storage storage;
typedef struct storage_batch storage_batch;
typedef struct storage_reader storage_reader;

typedef struct storage_options {
	uint64_t so_map_size; /* LMDB map size in bytes; 0 picks the default (8 GiB) */
	uint64_t so_wal_segment_size; /* bytes preallocated per WAL segment; 0: 64 MiB */
} storage_options;

/*
 * Opens (creating if needed) the environment in directory dir (created with mode 0700 if
 * missing). On success *out owns the environment until storage_close().
 * Errors: STORAGE_ERR_IO, STORAGE_ERR_BUSY, STORAGE_ERR_CORRUPT, STORAGE_ERR_NOMEM.
 */
int storage_open(const char *dir, const storage_options *opts, storage **out);
/* Closes the environment. All batches and readers must have ended. */
void storage_close(storage *s);

/* ---- Writes: one batch is one LMDB write transaction and one fsync. ---- */

/* Starts a batch. Only one batch may be open at a time (the caller is the only writer). */
int storage_batch_begin(storage *s, storage_batch **out);

/*
 * Applies one request inside the batch as etcd would. A request that writes advances the
 * revision by one (a Txn's writes all share that revision, with sub-revisions in order).
 * A request that fails leaves the batch as if it had not been applied (nested txn) and
 * the batch stays usable. resp is filled from arena a, header included (header->revision
 * is the store revision after the request; the caller fills cluster/member id and term).
 * Errors: STORAGE_ERR_COMPACTED / STORAGE_ERR_FUTURE_REV (Range at such a revision,
 * also inside a Txn), STORAGE_ERR_KEY_NOT_FOUND (ignore_value/ignore_lease on a missing key,
 * also inside a Txn), STORAGE_ERR_INVALID (empty Put key), STORAGE_ERR_NOSPACE,
 * STORAGE_ERR_IO.
 * Txn follows etcd's applyTxn: every compare, nested ones included, is evaluated against
 * the state before the txn; nested TxnResponses carry an empty header (revision 0) as
 * etcd's do. Request validation that etcd does in its API layer (empty keys, duplicate keys,
 * --max-txn-ops, request size) is not done here.
 * Byte fields of responses are copies in the arena (the writer's map pages move).
 */
int storage_batch_put(storage_batch *b, const Etcdserverpb__PutRequest *req, storage_arena *a,
		      Etcdserverpb__PutResponse *resp);
int storage_batch_delete_range(storage_batch *b, const Etcdserverpb__DeleteRangeRequest *req,
			       storage_arena *a, Etcdserverpb__DeleteRangeResponse *resp);
int storage_batch_txn(storage_batch *b, const Etcdserverpb__TxnRequest *req, storage_arena *a,
		      Etcdserverpb__TxnResponse *resp);
/* A Range seen by the writer (for linearizable reads ordered with writes). */
int storage_batch_range(storage_batch *b, const Etcdserverpb__RangeRequest *req, storage_arena *a,
			Etcdserverpb__RangeResponse *resp);
/*
 * Records req->revision as the compacted revision (errors as etcd: compacting at or below
 * the current compacted revision is STORAGE_ERR_COMPACTED, beyond the current revision
 * STORAGE_ERR_FUTURE_REV; a fresh store counts as compacted at -1, so 0 is accepted once)
 * and removes superseded revisions up to a bounded amount of work (10,000 revisions
 * examined); the rest is removed by storage_batch_compact_continue() in later batches.
 * Reads are exact whatever is left: physical removal only frees space. req->physical is
 * for the caller (wait until continue reports done). The revision is not advanced.
 */
int storage_batch_compact(storage_batch *b, const Etcdserverpb__CompactionRequest *req,
			  storage_arena *a, Etcdserverpb__CompactionResponse *resp);
/*
 * Removes up to max_revisions superseded revisions left by earlier compactions.
 * *done is set to 1 when nothing is left to remove.
 */
int storage_batch_compact_continue(storage_batch *b, size_t max_revisions, int *done);

/*
 * The events of every write applied in this batch so far, in revision order, with prev_kv
 * filled for keys that existed before (the caller drops it for watchers that did not ask).
 * Allocated in arena a and copied out of the map: valid after commit, until a is freed.
 * *rev is the store revision after the batch.
 */
int storage_batch_events(storage_batch *b, storage_arena *a, Mvccpb__Event ***events, size_t *n,
			 int64_t *rev);

/* The store revision as the batch sees it so far. */
int64_t storage_batch_revision(storage_batch *b);

/*
 * Leases. A Put whose lease is not 0 (and not ignore_lease) fails with
 * STORAGE_ERR_LEASE_NOT_FOUND unless the lease was granted; a Put or a delete moves the key
 * between leases.
 * Grant records lease id with ttl seconds: STORAGE_ERR_LEASE_EXISTS if it is there already.
 * Revoke deletes every key attached to the lease, in key order, as one new revision (no
 * revision if it holds none), then the lease: STORAGE_ERR_LEASE_NOT_FOUND if unknown.
 * resp, if not NULL, gets the header revision.
 */
int storage_batch_lease_grant(storage_batch *b, int64_t id, int64_t ttl);
/* Records lease checkpoints, all or none: each lease's remaining TTL (seconds, 0 clears it)
 * as the leader saw it, from which a new leader or a restarted member starts the lease
 * (etcd's leasepb.Lease RemainingTTL). Leases that are gone are skipped, as etcd does. */
int storage_batch_lease_checkpoint(storage_batch *b, const Etcdserverpb__LeaseCheckpointRequest *req);
int storage_batch_lease_revoke(storage_batch *b, int64_t id, storage_arena *a,
			       Etcdserverpb__LeaseRevokeResponse *resp);

/* Small persistent facts of the member (cluster id, member id, ...), binary-safe. */
int storage_batch_meta_put(storage_batch *b, const char *name, const void *val, size_t len);

/*
 * Commits the batch durably (fsync) and ends it, recording applied_index in the same
 * transaction so that a crash never applies an entry twice or loses one.
 * The batch's log records go to the WAL (synced) first. On error the batch is aborted and
 * nothing of its LMDB part is on disk; if the WAL part was written, the store takes no more
 * log records (fail-stop: its files hold a log the LMDB state does not follow).
 */
int storage_batch_commit(storage_batch *b, uint64_t applied_index);
/*
 * Commits the batch with one sync instead of two: a crash may undo it (never corrupt the
 * environment) until the next commit syncs. For batches whose effects the caller can redo,
 * such as applying Raft entries already durable in the log.
 */
int storage_batch_commit_lazy(storage_batch *b, uint64_t applied_index);
/*
 * The batch's Raft log records (entries, hard states, clears) are written to the WAL and
 * made durable with one fdatasync, before anything of it reaches LMDB. storage_batch_commit*
 * do this first themselves; calling it earlier lets the caller time the two apart.
 */
int storage_batch_sync_log(storage_batch *b);
/* For a batch that holds only log records (a follower's append): syncs them and ends the
 * batch WITHOUT an LMDB commit; any LMDB write in it is discarded. */
int storage_batch_commit_log(storage_batch *b);
/*
 * A batch for log records only (entries, hard states, clears), ended by
 * storage_batch_commit_log() or storage_batch_abort(): it has no LMDB transaction, so it
 * begins at once even while an asynchronous commit runs.
 */
int storage_batch_begin_log(storage *s, storage_batch **out);
/*
 * As storage_batch_commit_lazy(), but returns once the batch's log records are durable and
 * its LMDB commit is handed to the committer thread, which writes and flushes it while the
 * caller goes on: the caller may answer the batch's requests at once (a crash redoes them
 * from the log). Until the commit is visible, new readers (storage_read_begin, stat, copy)
 * wait for it, so nobody reads less than what was answered; the next batch's begin waits
 * too. A failure of that commit makes every later batch begin and read fail with it, and
 * is reported to the commit observer.
 */
int storage_batch_commit_async(storage_batch *b, uint64_t applied_index);
/*
 * Lets storage_batch_commit_async() keep an answered batch's transaction open ("parked")
 * for window_ns (a quarter more while the writer is busy: storage_set_writer_idle), or
 * until it holds max_revisions revisions (<= 0: no limit), so that
 * the next storage_batch_begin_apply() continues it and one LMDB commit writes several
 * batches (etcd's --backend-batch-interval / --backend-batch-limit). Readers (read_begin,
 * stat, copy) that need a parked batch have it committed at once and wait for it; any
 * other batch begin, defragment, install and close commit it first. 0 turns it off.
 */
void storage_set_commit_window(storage *s, uint64_t window_ns, int64_t max_revisions);
/*
 * The writer says whether an apply may come soon (0) or not (1: it has nothing in flight).
 * LMDB has one writer: an apply that meets the parked batch's commit waits for its flush.
 * So a batch whose window has passed is committed when the writer is idle, and a quarter
 * window later if the writer never is. Call it from the writer's thread; any value is safe.
 * A store opens with the writer idle (the window alone decides).
 */
void storage_set_writer_idle(storage *s, int idle);
/*
 * As storage_batch_begin(), but continues the parked batch if there is one (in a child
 * transaction: an abort drops only what this batch added). For the writer's applies, with
 * no read of the store between this begin and the batch's commit or abort on the same
 * thread (such a read would wait for the batch itself).
 */
int storage_batch_begin_apply(storage *s, storage_batch **out);
/* Calls observe(arg, ns, 0) after every LMDB commit with its duration, on the committer
 * thread (observe must be thread-safe), and observe(arg, ns, err) when an asynchronous
 * commit fails: its batch was answered, so the caller should stop (the store already
 * refuses every later batch and read). NULL stops it; returns once no commit uses the old. */
void storage_set_commit_observer(storage *s, void (*observe)(void *arg, uint64_t ns, int err), void *arg);
/* Discards the batch (log records already synced by storage_batch_sync_log stay). */
void storage_batch_abort(storage_batch *b);

/* ---- Reads: LMDB read transactions, any thread. ---- */

int storage_read_begin(storage *s, storage_reader **out);
/* As storage_read_begin, but waits only until the visible state holds Raft index
 * applied_index (what a linearizable read at that read index needs), not for commits of
 * later applies. 0: as storage_read_begin. It relies on what the commits record: a batch
 * committed with applied_index i (storage_batch_commit*) holds, with the commits before it,
 * everything applied up to i. */
int storage_read_begin_at(storage *s, uint64_t applied_index, storage_reader **out);
/* Range as etcd serves it (limit, count, more, sort, filters, keys_only, count_only). */
int storage_range(storage_reader *r, const Etcdserverpb__RangeRequest *req, storage_arena *a,
		  Etcdserverpb__RangeResponse *resp);
/*
 * One page of a Range: as storage_range, but the walk stops once limit + 1 keys are read
 * (sorted or filtered requests still read everything), so resp->more is right and
 * resp->count is NOT the total. For RangeStream's later chunks, whose cost must not grow
 * with the keys left after them.
 */
int storage_range_page(storage_reader *r, const Etcdserverpb__RangeRequest *req, storage_arena *a,
		       Etcdserverpb__RangeResponse *resp);
/*
 * A Txn whose every branch op is a Range (compares evaluated, success or failure taken);
 * STORAGE_ERR_INVALID if any op in the chosen or untaken branch writes.
 */
int storage_read_txn(storage_reader *r, const Etcdserverpb__TxnRequest *req, storage_arena *a,
		     Etcdserverpb__TxnResponse *resp);
/*
 * History replay for watches: the events with revision >= from_rev, in revision order,
 * prev_kv filled as in storage_batch_events(). Stops after max_events, but never inside a
 * revision (a revision's events always come together). *reader_rev is the revision this
 * reader sees, *compact_rev the compacted one (-1 if none). STORAGE_ERR_COMPACTED if from_rev is below
 * the compacted revision. Byte fields point into the map: valid until storage_read_end().
 */
int storage_read_events(storage_reader *r, int64_t from_rev, size_t max_events, storage_arena *a,
			Mvccpb__Event ***events, size_t *n, int64_t *reader_rev,
			int64_t *compact_rev);
/* The granted TTL of a lease and, if keys is not NULL, the keys attached to it (in the
 * arena, in key order). STORAGE_ERR_LEASE_NOT_FOUND if there is no such lease. */
int storage_read_lease(storage_reader *r, int64_t id, int64_t *ttl, storage_arena *a,
		       ProtobufCBinaryData **keys, size_t *nkeys);
/* Every lease: ids, granted TTLs and (if remaining is not NULL) checkpointed remaining TTLs
 * (0: none), in id order, in the arena. */
int storage_read_leases(storage_reader *r, storage_arena *a, int64_t **ids, int64_t **ttls,
			int64_t **remaining, size_t *n);
/* Reads a meta value into the arena. STORAGE_ERR_NOT_FOUND if never written. */
int storage_read_meta(storage_reader *r, const char *name, storage_arena *a, void **val,
		      size_t *len);
/* Ends the read transaction; byte fields pointing into the map become invalid. */
void storage_read_end(storage_reader *r);

/* Bytes the data file spans (LMDB's high-water mark), without a transaction: etcd's
 * quota is checked against this. */
uint64_t storage_db_size(storage *s);
/* What --quota-backend-bytes is held against: storage_db_size(), as etcd (the Raft log is in
 * the WAL, outside the file, here as in etcd). */
uint64_t storage_quota_size(storage *s);

/* ---- The auth store's record ---- */

/* The meta key of the auth store's record (server/auth.c reads it). */
#define STORAGE_AUTH_META "auth"
/* Writes the record: the auth switch, its revision, and every user and role as encoded
 * authpb.User / authpb.Role messages (see authrec.c for the layout). */
int storage_batch_auth_put(storage_batch *b, int enabled, uint64_t revision, const ProtobufCBinaryData *users,
			   size_t n_users, const ProtobufCBinaryData *roles, size_t n_roles);

/* ---- The Raft log, hard state and snapshot metadata ----
 * Entries and hard states are in the WAL, <dir>/keelson-wal/ (wal.c); the snapshot point is
 * in LMDB, committed with the state it describes. Entries the point covers stay in the WAL
 * until a durable LMDB state covers their whole segment. */

typedef struct storage_log_entry {
	uint64_t le_index;
	uint64_t le_term;
	uint8_t le_type;
	uint32_t le_len;
	const uint8_t *le_data; /* from storage_read_log(): points into the arena */
} storage_log_entry;

/* Appends entries (contiguous indexes); any stored entry at or after e[0].index is
 * replaced first, as Raft's log matching requires. */
int storage_batch_log_append(storage_batch *b, const storage_log_entry *e, size_t n);
int storage_batch_log_hard_state(storage_batch *b, uint64_t term, uint64_t vote, uint64_t commit);
/* Records a snapshot point (index, term, encoded configuration) and drops the entries it
 * covers. The state machine itself is the LMDB keyspace as of the applied index. */
int storage_batch_log_snapshot(storage_batch *b, uint64_t index, uint64_t term, const void *conf,
			       size_t conf_len);
/* Drops every stored log entry: an installed snapshot replaces the whole log. The clear
 * counts only once the store's snapshot point is at or past snap_index (or the batch
 * records such a point itself), so it can be written before the install: a crash between
 * the two leaves the old log with the old store. The batch's hard state goes after it. */
int storage_batch_log_clear(storage_batch *b, uint64_t snap_index);

typedef struct storage_log_state {
	uint64_t ls_term, ls_vote, ls_commit;
	uint64_t ls_snap_index, ls_snap_term;
	const void *ls_snap_conf; /* NULL if no snapshot point */
	size_t ls_snap_conf_len;
	storage_log_entry *ls_entries; /* after the snapshot point, in order, in the arena */
	size_t ls_n_entries;
} storage_log_state;
/* Everything Raft needs to restart (reads the WAL's files: at start-up, no batch open).
 * snap_conf points into the map, entries' data into the arena. */
int storage_read_log(storage_reader *r, storage_arena *a, storage_log_state *out);

/* The committed store revision, without a transaction. */
int64_t storage_current_revision(storage *s);

/*
 * Rewrites the environment as a compacting copy so the file shrinks to what is in use.
 * Waits for readers to end and blocks new ones meanwhile; no batch may be open.
 */
int storage_defragment(storage *s);

/* A consistent, compacting copy of the environment written to fd (fsynced), taken in a read
 * transaction: batches go on meanwhile. Can run on any thread; may take long. */
int storage_copy(storage *s, int fd);

/*
 * Replaces the environment by the file at path (a storage_copy() of another member's) and
 * reopens it: the file is moved into place. Waits for readers to end; no batch may be open.
 * STORAGE_ERR_CORRUPT, leaving everything as it was, if path is not an LMDB environment.
 */
int storage_install(storage *s, const char *path);

/*
 * etcd's HashKV: CRC-32C over every revision record at or below rev (0: current) in etcd's
 * key layout (8-byte main, '_', 8-byte sub, 't' for a tombstone) followed by the encoded
 * KeyValue, in revision order. Members that applied the same history agree on it.
 * *hash_rev is the revision hashed, *compact_rev the compacted revision.
 * STORAGE_ERR_COMPACTED / STORAGE_ERR_FUTURE_REV as for Range.
 */
int storage_hash_kv(storage_reader *r, int64_t rev, uint32_t *hash, int64_t *hash_rev,
		    int64_t *compact_rev);
/* CRC-32C over every table of the environment (etcd's Hash, a test aid). */
int storage_hash(storage_reader *r, uint32_t *hash);

typedef struct storage_stats {
	int64_t st_revision;         /* current main revision (1 on an empty store, as etcd) */
	int64_t st_compact_revision; /* last compacted revision, 0 if none */
	uint64_t st_applied_index;   /* as recorded by the last commit */
	uint64_t st_db_size;         /* bytes the data file takes on disk */
	uint64_t st_db_size_in_use;  /* bytes in pages that are in use */
} storage_stats;

int storage_stat(storage *s, storage_stats *out);

/* ==== etcd-format snapshots (etcdfmt.c; link //storage:etcdfmt) ========================
 *
 * etcd's backend file is a bbolt database (page size 4096 here) with etcd's buckets: "key"
 * (17-byte revision main|'_'|sub, 18 with a trailing 't' for a tombstone -> encoded
 * mvccpb.KeyValue, KeyValue{key} alone for a tombstone), "meta" (consistent_index, term,
 * scheduledCompactRev, finishedCompactRev), "lease" (8-byte BE id -> leasepb.Lease{ID,TTL,RemainingTTL}),
 * "members", "members_removed", "cluster", "auth", "authUsers", "authRoles", "alarm".
 * `etcdctl snapshot save` stores the file followed by the SHA-256 of the file (32 bytes);
 * a member's member/snap/db has no trailer. */

/* A member as etcd 3.4 records it in bucket "members" (JSON keyed by the hex id). */
typedef struct storage_etcd_member {
	uint64_t em_id;
	const char *em_name;                  /* NULL or "" if not yet published */
	const char *const *em_peer_urls;
	size_t em_n_peer_urls;
	const char *const *em_client_urls;
	size_t em_n_client_urls;
	int em_is_learner;
} storage_etcd_member;

/* One raw entry of a bucket (for buckets storage does not hold: authUsers, authRoles,
 * alarm, ...). Keys are bytes, compared as bbolt does (memcmp, shorter first). */
typedef struct storage_etcd_entry {
	const char *ee_bucket;
	const void *ee_key;
	size_t ee_klen;
	const void *ee_val;
	size_t ee_vlen;
} storage_etcd_entry;

/* What the member knows beyond the MVCC keyspace and leases, for storage_snapshot_etcd().
 * Zero-initialise and fill what is known. The cluster id is not part of etcd's backend
 * file (etcd keeps it in the WAL), so it has no field here. */
typedef struct storage_snapshot_info {
	uint64_t si_consistent_index;   /* meta/consistent_index: the applied raft index */
	uint64_t si_term;               /* meta/term (etcd 3.5 writes it); 0: not written */
	const char *si_cluster_version; /* cluster/clusterVersion; NULL: "3.4.0" */
	const storage_etcd_member *si_members;
	size_t si_n_members;
	const uint64_t *si_removed;     /* members_removed: ids of removed members */
	size_t si_n_removed;
	int si_auth_enabled;            /* auth/authEnabled */
	uint64_t si_auth_revision;      /* auth/authRevision; 0: 1 */
	const storage_etcd_entry *si_extra; /* any further entries, any order; a key already
					     * written (or twice here) is STORAGE_ERR_INVALID */
	size_t si_n_extra;
} storage_snapshot_info;

/* Receives the snapshot bytes in order; returns 0, or non-zero to stop (that value is
 * returned by the snapshot call). */
typedef int (*storage_write_fn)(void *ctx, const void *buf, size_t len);

/*
 * Streams the state seen by reader r as an etcd 3.4/3.5 backend file (bbolt) to write, in
 * order, in pieces of at most a few pages (one node: larger when a value is). Everything
 * comes from r's one LMDB read transaction, so writers go on meanwhile. The "key" bucket
 * holds what an etcd compaction at the compacted revision keeps (revisions a pending
 * physical compaction has not removed yet are left out). info may be NULL (nothing but
 * the keyspace, leases and default meta/cluster/auth entries). Memory: the first key of
 * each page plus one node. *size (if not NULL) gets the file's length. Errors: STORAGE_ERR_INVALID (duplicate entries in info), NOMEM, CORRUPT,
 * IO, or the non-zero value write returned.
 */
int storage_snapshot_etcd(storage_reader *r, const storage_snapshot_info *info,
			  storage_write_fn write, void *ctx, uint64_t *size);
/* As storage_snapshot_etcd(), followed by the file's SHA-256 (32 bytes): the stream etcd's
 * Maintenance.Snapshot sends and `etcdctl snapshot save` stores. */
int storage_snapshot_etcd_stream(storage_reader *r, const storage_snapshot_info *info,
				 storage_write_fn write, void *ctx);
/* An incremental SHA-256 (OpenSSL's EVP underneath); _init allocates, _final releases. */
typedef struct storage_sha256 {
	void *sh_ctx; /* EVP_MD_CTX */
} storage_sha256;
int storage_sha256_init(storage_sha256 *h);
void storage_sha256_update(storage_sha256 *h, const void *p, size_t n);
/* Writes the digest and releases h. */
void storage_sha256_final(storage_sha256 *h, uint8_t out[32]);

/* What a check or an import found in an etcd backend file. */
typedef struct storage_etcd_file_info {
	int64_t ef_revision;            /* main revision of the last "key" entry, as etcdctl
					 * snapshot status reports it (0 if none) */
	int64_t ef_store_revision;      /* the revision etcd would serve: max(1, that, compact) */
	int64_t ef_compact_revision;    /* finishedCompactRev, -1 if none */
	int64_t ef_scheduled_compact;   /* scheduledCompactRev, -1 if none */
	uint64_t ef_consistent_index;
	uint64_t ef_term;               /* 0 if none (etcd 3.4) */
	uint64_t ef_revisions;          /* entries of bucket "key" */
	uint64_t ef_tombstones;
	uint64_t ef_leases;
	uint64_t ef_total_keys;         /* entries of every bucket (etcdctl's totalKey) */
	uint64_t ef_total_size;         /* pages * page size (etcdctl's totalSize) */
	uint32_t ef_hash;               /* etcdctl snapshot status's CRC-32C hash */
	uint32_t ef_page_size;
	int ef_has_sha256;              /* the file ended with a (verified) SHA-256 trailer */
} storage_etcd_file_info;

/* Entries of buckets the import does not store itself ("members", "auth", "cluster", ...;
 * meta keys other than the four above); 0 to go on, non-zero to stop (returned). */
typedef int (*storage_etcd_visit_fn)(void *ctx, const char *bucket, const uint8_t *key,
				     size_t klen, const uint8_t *val, size_t vlen);

typedef struct storage_etcd_import_options {
	const storage_options *ei_storage; /* for storage_open() of the new environment */
	int ei_hash_check;                 /* STORAGE_ETCD_HASH_*: 0 requires the trailer;
					    * a copied member/snap/db has none */
	uint64_t ei_applied_index;         /* recorded as applied index; 0: consistent_index */
	storage_etcd_visit_fn ei_visit;
	void *ei_ctx;
	char *ei_errbuf;                   /* if not NULL, why a file was refused */
	size_t ei_errlen;
} storage_etcd_import_options;

/* How a check treats the SHA-256 trailer (the hash_check arguments below). */
enum {
	STORAGE_ETCD_HASH_REQUIRE = 0,    /* a trailer must be there and match (etcd's restore) */
	STORAGE_ETCD_HASH_SKIP = 1,       /* never verified (etcd's --skip-hash-check) */
	STORAGE_ETCD_HASH_IF_PRESENT = 2, /* verified when there, else fine (status) */
};

/*
 * Validates every page of the etcd backend file at path (meta checksums, page bounds and
 * ids, flags, overflow, element bounds, key order, freelist accounting, each page used
 * once, etcd's key and value formats) without trusting any of it, and fills *info.
 * A file whose size modulo 512 is 32 carries a SHA-256 trailer (etcd's rule), treated as
 * hash_check says; past the pages the meta counts, other bytes are ignored. errbuf (may be NULL) gets a message.
 * Errors: STORAGE_ERR_CORRUPT (refused: the message says where and why), STORAGE_ERR_IO,
 * STORAGE_ERR_NOMEM.
 */
int storage_etcd_check(const char *path, int hash_check, storage_etcd_file_info *info,
		       char *errbuf, size_t errlen);

/*
 * Imports the etcd backend file bbolt_path (checked first as storage_etcd_check() does;
 * nothing is written if the check fails) into a new environment at lmdb_dir: every
 * revision and tombstone with its revision, the compaction state (a scheduled compaction
 * etcd had not finished is finished by storage_batch_compact_continue()), leases and which
 * keys they hold, and the applied index. lmdb_dir must not hold any revision yet
 * (STORAGE_ERR_INVALID). Large files are imported in several transactions: on an error the
 * directory is partly written; import into a temporary directory and rename it.
 * The file is mapped: it must not change while it is read. opts and info may be NULL.
 */
int storage_import_etcd(const char *bbolt_path, const char *lmdb_dir,
			const storage_etcd_import_options *opts, storage_etcd_file_info *info);
/* ==== end of etcd-format snapshots ==== */

/* ==== etcd's write-ahead log (etcdwal.c; link //storage:etcdfmt) =======================
 *
 * member/wal/%016x-%016x.wal files, read in sequence order: frames (u64 LE length word with
 * the padding in the top byte, a walpb.Record, zero padding to 8 bytes), a CRC-32C chained
 * over every record's data across files, records of metadata, raft entries, hard states,
 * crc and snapshot points. A torn write at the end of the last file ends the log, as etcd
 * reads it; any other damage is refused. Nothing is written. */

/* raftpb.EntryType */
enum {
	STORAGE_ETCD_ENTRY_NORMAL = 0,
	STORAGE_ETCD_ENTRY_CONF_CHANGE = 1,
	STORAGE_ETCD_ENTRY_CONF_CHANGE_V2 = 2,
};

typedef struct storage_etcd_wal_entry {
	uint64_t we_index;
	uint64_t we_term;
	uint32_t we_type;       /* STORAGE_ETCD_ENTRY_* (other values are passed on as read) */
	const uint8_t *we_data; /* raftpb.Entry.Data: points into the files, valid until
				 * storage_etcd_wal_free() (or into the caller's buffers) */
	size_t we_len;
} storage_etcd_wal_entry;

typedef struct storage_etcd_wal {
	int ew_has_metadata;           /* always 1 after a successful read */
	uint64_t ew_node_id;           /* etcdserverpb.Metadata: this member's id */
	uint64_t ew_cluster_id;
	int ew_has_state;              /* a raftpb.HardState record was seen (the last wins) */
	uint64_t ew_term, ew_vote, ew_commit;
	int ew_has_snapshot;           /* a walpb.Snapshot record was seen (the last wins) */
	uint64_t ew_snap_index, ew_snap_term;
	storage_etcd_wal_entry *ew_entries; /* contiguous indexes, ascending: a later entry with
					     * an index already seen replaced it and all after */
	size_t ew_n_entries;
	size_t ew_files;               /* files read */
	size_t ew_records;             /* records accepted */
	int ew_torn_tail;              /* the last file ended in a torn write (ignored) */
	uint64_t ew_first_seq;         /* sequence number of the first file (read only) */
	/* private to etcdwal.c */
	void **ew__maps;
	size_t *ew__lens;
	size_t ew__n;
} storage_etcd_wal;

/*
 * Reads every *.wal file of dir (other names are ignored, as etcd does) into *w, which owns
 * the mapped files until storage_etcd_wal_free() (even on error nothing needs freeing).
 * Errors: STORAGE_ERR_CORRUPT (no files, a gap in the sequence, a bad length word, a record
 * that does not decode, a CRC mismatch or broken chain, conflicting metadata, a gap between
 * entries, no metadata record; errbuf names the file and offset), STORAGE_ERR_IO,
 * STORAGE_ERR_NOMEM.
 */
int storage_etcd_wal_read(const char *dir, storage_etcd_wal *w, char *errbuf, size_t errlen);
/* The decoder itself, on n files' bytes in sequence order (for tests and fuzzing): entries
 * point into files. Free with storage_etcd_wal_free() (it unmaps nothing here). */
int storage_etcd_wal_decode(const uint8_t *const *files, const size_t *lens, size_t n,
			    storage_etcd_wal *w, char *errbuf, size_t errlen);
/* The entry with this index, or NULL if the log does not hold it. */
const storage_etcd_wal_entry *storage_etcd_wal_entry_at(const storage_etcd_wal *w, uint64_t index);
void storage_etcd_wal_free(storage_etcd_wal *w);
/* ==== end of etcd's write-ahead log ==== */

#endif
