/*
 * env.c - the LMDB environment: open/close, the data-dir lock, batches (write txns),
 * readers (read txns), meta values and statistics.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <stdatomic.h>

#include "crashpoint/crashpoint.h"
#include "storage/internal.h"

static int committer_start(storage *s);
static void committer_stop(storage *s);
static int wait_published(storage *s, uint64_t need_applied);
static void flush_parked(storage *s);

#define DEFAULT_MAP_SIZE (8ull << 30)
#define MAX_DBS 32
#define MAX_READERS 1022
#define LOCK_NAME "keelson.lock"
#define DEFRAG_TMP "data.mdb.defrag"

static const char *const errtab[] = {
	"mvcc: required revision has been compacted",
	"mvcc: required revision is a future revision",
	"storage: invalid request",
	"etcdserver: mvcc: database space exceeded",
	"storage: I/O error",
	"storage: data corrupted",
	"storage: out of memory",
	"storage: not found",
	"storage: data directory is in use by another process",
	"etcdserver: key not found",
	"etcdserver: requested lease not found",
	"etcdserver: lease already exists",
};

const char *storage_strerror(int err)
{
	if (err == 0)
		return "success";
	int i = -1000 - err;
	if (i >= 0 && i < (int)(sizeof(errtab) / sizeof(errtab[0])))
		return errtab[i];
	return "storage: unknown error";
}

int storage__mdb_err(int rc)
{
	switch (rc) {
	case 0:
		return 0;
	case MDB_MAP_FULL:
	case MDB_TXN_FULL: /* a batch too big for one transaction: same remedy */
		return STORAGE_ERR_NOSPACE;
	case MDB_NOTFOUND:
		return STORAGE_ERR_NOT_FOUND;
	case MDB_CORRUPTED:
	case MDB_PAGE_NOTFOUND:
	case MDB_INVALID:
	case MDB_VERSION_MISMATCH:
	case MDB_BAD_VALSIZE:
		return STORAGE_ERR_CORRUPT;
	case ENOMEM:
		return STORAGE_ERR_NOMEM;
	case ENOSPC:
		return STORAGE_ERR_NOSPACE;
	default:
		return STORAGE_ERR_IO;
	}
}

int storage__meta_get_i64(storage *s, MDB_txn *txn, const char *name, int64_t dflt,
			  int64_t *out)
{
	MDB_val k = {strlen(name), (void *)name}, v;
	int rc = mdb_get(txn, s->s_meta, &k, &v);
	if (rc == MDB_NOTFOUND) {
		*out = dflt;
		return 0;
	}
	if (rc)
		return storage__mdb_err(rc);
	if (v.mv_size != 8)
		return STORAGE_ERR_CORRUPT;
	*out = (int64_t)be64_get(v.mv_data);
	return 0;
}

int storage__meta_put_i64(storage *s, MDB_txn *txn, const char *name, int64_t val)
{
	uint8_t buf[8];
	be64_put(buf, (uint64_t)val);
	MDB_val k = {strlen(name), (void *)name}, v = {8, buf};
	return storage__mdb_err(mdb_put(txn, s->s_meta, &k, &v, 0));
}

int storage__fsync_dir(const char *dir)
{
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return STORAGE_ERR_IO;
	int rc = fsync(fd);
	close(fd);
	return rc ? STORAGE_ERR_IO : 0;
}

/* Creates dir and its missing parents. Each directory made is fsynced into its parent:
 * otherwise a power loss can take a new member's whole store away with the writes it
 * acknowledged (the files' data is synced at every commit, their names are not). */
static int mkdir_p(const char *dir)
{
	char path[PATH_MAX];
	size_t n = strlen(dir);
	if (n == 0 || n >= sizeof(path))
		return STORAGE_ERR_INVALID;
	memcpy(path, dir, n + 1);
	size_t parent_end = 0; /* path[0, parent_end) is the last component's parent */
	for (size_t i = 1; i <= n; i++) {
		if (path[i] != '/' && path[i] != '\0')
			continue;
		char c = path[i];
		path[i] = '\0';
		if (mkdir(path, 0700) == 0) {
			char parent[PATH_MAX];
			if (parent_end == 0)
				strcpy(parent, path[0] == '/' ? "/" : ".");
			else
				memcpy(parent, path, parent_end), parent[parent_end] = '\0';
			int err = storage__fsync_dir(parent);
			if (err)
				return err;
		} else if (errno != EEXIST) {
			return STORAGE_ERR_IO;
		}
		path[i] = c;
		parent_end = i;
	}
	return 0;
}

/* Refuses (MDB_VERSION_MISMATCH) a store whose record format is newer than this build's;
 * with mark, records this build's in txn if the store had an older one. An LMDB code. */
static int format_check(MDB_txn *txn, MDB_dbi meta, int mark)
{
	MDB_val k = {strlen(META_FORMAT), (void *)META_FORMAT}, v;
	int64_t f = 1;
	int rc = mdb_get(txn, meta, &k, &v);
	if (rc == 0 && v.mv_size != 8)
		return MDB_CORRUPTED;
	if (rc == 0)
		f = (int64_t)be64_get(v.mv_data);
	else if (rc != MDB_NOTFOUND)
		return rc;
	if (f < 1)
		return MDB_CORRUPTED;
	if (f > STORE_FORMAT) {
		fprintf(stderr, "keelson: storage: the store's record format %lld is newer than this build's (%d)\n",
			(long long)f, STORE_FORMAT);
		return MDB_VERSION_MISMATCH;
	}
	if (!mark || f == STORE_FORMAT)
		return 0;
	uint8_t buf[8];
	be64_put(buf, STORE_FORMAT);
	MDB_val nv = {8, buf};
	return mdb_put(txn, meta, &k, &nv, 0);
}

/* Creates the LMDB environment in dir and opens its tables. Returns an LMDB code. */
static int env_open(storage *s, const char *dir)
{
	MDB_txn *txn = NULL;
	int rc = mdb_env_create(&s->s_env);
	if (rc == 0)
		rc = mdb_env_set_maxdbs(s->s_env, MAX_DBS);
	if (rc == 0)
		rc = mdb_env_set_maxreaders(s->s_env, MAX_READERS);
	if (rc == 0)
		rc = mdb_env_set_mapsize(s->s_env, s->s_map_size);
	/* MDB_NOTLS: read txns belong to storage_reader objects, not threads.
	 * MDB_NORDAHEAD: random access over a map much larger than the working set. */
	if (rc == 0)
		rc = mdb_env_open(s->s_env, dir, MDB_NOTLS | MDB_NORDAHEAD, 0600);
	if (rc == 0)
		rc = mdb_txn_begin(s->s_env, NULL, 0, &txn);
	if (rc == 0)
		rc = mdb_dbi_open(txn, "meta", MDB_CREATE, &s->s_meta);
	if (rc == 0)
		rc = mdb_dbi_open(txn, "keys", MDB_CREATE, &s->s_keys);
	if (rc == 0)
		rc = mdb_dbi_open(txn, "hist", MDB_CREATE, &s->s_hist);
	if (rc == 0)
		rc = mdb_dbi_open(txn, "revs", MDB_CREATE, &s->s_revs);
	if (rc == 0)
		rc = mdb_dbi_open(txn, "leases", MDB_CREATE, &s->s_leases);
	if (rc == 0)
		rc = mdb_dbi_open(txn, "lkeys", MDB_CREATE, &s->s_lkeys);
	if (rc == 0)
		rc = mdb_dbi_open(txn, "rlog", MDB_CREATE, &s->s_rlog);
	if (rc == 0)
		rc = format_check(txn, s->s_meta, 1);
	if (rc == 0) {
		rc = mdb_txn_commit(txn);
		txn = NULL;
	}
	if (txn)
		mdb_txn_abort(txn);
	if (rc && s->s_env) {
		mdb_env_close(s->s_env);
		s->s_env = NULL;
	}
	return rc;
}

/* The committed revision, cached for callers that only need it (no read txn), and the
 * applied index the visible state holds (s_pub_applied: a read at a read index it covers
 * need not wait for the next commit). At open and after an environment is replaced. */
static int load_revision(storage *s)
{
	MDB_txn *txn;
	int64_t rev = 1, applied = 0;
	int rc = mdb_txn_begin(s->s_env, NULL, MDB_RDONLY, &txn);
	if (rc)
		return rc;
	int err = storage__meta_get_i64(s, txn, META_REV, 1, &rev);
	if (!err)
		err = storage__meta_get_i64(s, txn, META_APPLIED, 0, &applied);
	mdb_txn_abort(txn);
	atomic_store(&s->s_rev, rev);
	atomic_store(&s->s_pub_applied, applied > 0 ? (uint64_t)applied : 0);
	return err ? MDB_CORRUPTED : 0;
}


int storage_open(const char *dir, const storage_options *opts, storage **out)
{
	int err;
	MDB_txn *txn = NULL;
	storage *s = calloc(1, sizeof(*s));
	if (!s)
		return STORAGE_ERR_NOMEM;
	s->s_lockfd = -1;
	s->s_wal_fd = -1;
	pthread_rwlock_init(&s->s_envlock, NULL);
	if ((s->s_dir = strdup(dir)) == NULL) {
		err = STORAGE_ERR_NOMEM;
		goto fail;
	}

	if ((err = mkdir_p(dir)))
		goto fail;
	char lock[PATH_MAX];
	if (snprintf(lock, sizeof(lock), "%s/%s", dir, LOCK_NAME) >= (int)sizeof(lock)) {
		err = STORAGE_ERR_INVALID;
		goto fail;
	}
	/* LMDB's own lock file lets several processes share an env; a member's data dir must
	 * have exactly one owner, hence flock on a file of our own (released by the kernel
	 * when the process dies, so a kill -9 never leaves it stale). */
	s->s_lockfd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (s->s_lockfd < 0) {
		err = STORAGE_ERR_IO;
		goto fail;
	}
	if (flock(s->s_lockfd, LOCK_EX | LOCK_NB) != 0) {
		err = errno == EWOULDBLOCK ? STORAGE_ERR_BUSY : STORAGE_ERR_IO;
		goto fail;
	}

	/* A defragment that a crash interrupted leaves its copy beside the data file (the
	 * rename is the commit point, so the copy is never needed): it would only take up as
	 * much disk as the store itself. We hold the data dir's lock, so no copy is in flight. */
	char tmp[PATH_MAX];
	if (snprintf(tmp, sizeof(tmp), "%s/%s", dir, DEFRAG_TMP) < (int)sizeof(tmp))
		unlink(tmp);

	s->s_map_size = opts && opts->so_map_size ? opts->so_map_size : DEFAULT_MAP_SIZE;
	int rc = env_open(s, dir);
	if (rc == 0)
		rc = load_revision(s);
	if (rc) {
		err = storage__mdb_err(rc);
		goto fail;
	}
	/* data.mdb and the lock files may have just been created: their names too must
	 * survive a power loss before the first commit is acknowledged. */
	if ((err = storage__fsync_dir(dir)))
		goto fail;
	/* The WAL needs LMDB's snapshot point to tell a committed clear from a void one. */
	int64_t snap_index = 0, snap_term = 0;
	if ((err = storage__mdb_err(mdb_txn_begin(s->s_env, NULL, MDB_RDONLY, &txn))))
		goto fail;
	err = storage__meta_get_i64(s, txn, META_RL_SNAP_INDEX, 0, &snap_index);
	if (!err)
		err = storage__meta_get_i64(s, txn, META_RL_SNAP_TERM, 0, &snap_term);
	mdb_txn_abort(txn);
	txn = NULL;
	if (!err)
		err = storage__wal_open(s, opts ? opts->so_wal_segment_size : 0, (uint64_t)snap_index,
					(uint64_t)snap_term);
	if (!err)
		err = storage__migrate_rlog(s);
	/* Idle until the writer says otherwise: a user that never does commits at the window. */
	atomic_store(&s->s_cm_writer_idle, 1);
	if (!err)
		err = committer_start(s);
	if (err)
		goto fail;
	*out = s;
	return 0;
fail:
	if (txn)
		mdb_txn_abort(txn);
	storage__wal_close(s);
	if (s->s_env)
		mdb_env_close(s->s_env);
	if (s->s_lockfd >= 0)
		close(s->s_lockfd);
	pthread_rwlock_destroy(&s->s_envlock);
	free(s->s_dir);
	free(s);
	return err;
}

void storage_close(storage *s)
{
	if (!s)
		return;
	if (s->s_batch)
		storage_batch_abort(s->s_batch);
	committer_stop(s);
	storage__wal_close(s);
	mdb_env_close(s->s_env);
	close(s->s_lockfd);
	pthread_rwlock_destroy(&s->s_envlock);
	free(s->s_dir);
	free(s);
}

uint64_t storage_db_size(storage *s)
{
	MDB_envinfo info;
	MDB_stat st;
	pthread_rwlock_rdlock(&s->s_envlock);
	mdb_env_info(s->s_env, &info);
	mdb_env_stat(s->s_env, &st);
	pthread_rwlock_unlock(&s->s_envlock);
	return ((uint64_t)info.me_last_pgno + 1) * st.ms_psize;
}

uint64_t storage_quota_size(storage *s)
{
	return storage_db_size(s);
}

int64_t storage_current_revision(storage *s)
{
	return atomic_load(&s->s_rev);
}

/*
 * Puts the environment file at path in place of the current one and reopens it. Called
 * with s_envlock held exclusively and no batch open. The file is renamed over the data
 * file and the directory fsynced, so a crash leaves either the old file or the new one.
 */
static int replace_env(storage *s, const char *path, const char *crashpoint_renamed)
{
	char data[PATH_MAX];
	if (snprintf(data, sizeof(data), "%s/data.mdb", s->s_dir) >= (int)sizeof(data))
		return STORAGE_ERR_INVALID;
	int err = 0;
	mdb_env_close(s->s_env);
	s->s_env = NULL;
	if (rename(path, data) != 0) {
		err = STORAGE_ERR_IO;
		unlink(path);
	} else {
		CRASHPOINT(crashpoint_renamed); /* the new file in place, the directory not synced */
		int dfd = open(s->s_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		if (dfd >= 0) {
			fsync(dfd);
			close(dfd);
		}
	}
	/* Reopen whichever file is in place; a member cannot go on without it. */
	int rc = env_open(s, s->s_dir);
	if (rc == 0)
		rc = load_revision(s);
	if (rc) {
		fprintf(stderr, "keelson: storage: cannot reopen the environment: %s\n", mdb_strerror(rc));
		abort();
	}
	return err;
}

/* A compacting copy of the environment into fd, fsynced. Returns an LMDB/errno code. */
static int copy_env(storage *s, int fd)
{
	int rc = mdb_env_copyfd2(s->s_env, fd, MDB_CP_COMPACT);
	if (rc == 0 && fsync(fd) != 0)
		rc = errno;
	return rc;
}

/*
 * A compacting copy of the environment replaces it: LMDB reuses freed pages but never
 * shrinks its file. Readers and the writer wait meanwhile (as etcd's defragment blocks).
 */
int storage_defragment(storage *s)
{
	char tmp[PATH_MAX];
	if (snprintf(tmp, sizeof(tmp), "%s/%s", s->s_dir, DEFRAG_TMP) >= (int)sizeof(tmp))
		return STORAGE_ERR_INVALID;
	flush_parked(s); /* it holds the environment shared */
	pthread_rwlock_wrlock(&s->s_envlock);
	int err = 0;
	if (s->s_batch) {
		err = STORAGE_ERR_INVALID;
		goto out;
	}
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) {
		err = STORAGE_ERR_IO;
		goto out;
	}
	CRASHPOINT("defrag.opened"); /* an empty copy beside the store */
	int rc = copy_env(s, fd);
	close(fd);
	if (rc) {
		unlink(tmp);
		err = storage__mdb_err(rc);
		goto out;
	}
	CRASHPOINT("defrag.copied"); /* a whole, synced copy beside the store */
	err = replace_env(s, tmp, "defrag.renamed");
out:
	pthread_rwlock_unlock(&s->s_envlock);
	return err;
}

int storage_copy(storage *s, int fd)
{
	/* Shared: the copy reads in its own LMDB read txn while batches go on. */
	int werr = wait_published(s, 0);
	if (werr)
		return werr;
	pthread_rwlock_rdlock(&s->s_envlock);
	int rc = copy_env(s, fd);
	pthread_rwlock_unlock(&s->s_envlock);
	return rc ? storage__mdb_err(rc) : 0;
}

int storage_install(storage *s, const char *path)
{
	MDB_env *env;
	int rc = mdb_env_create(&env);
	if (rc == 0) {
		/* Refuse a file that is not an LMDB environment before touching ours. */
		rc = mdb_env_set_maxdbs(env, MAX_DBS);
		if (rc == 0)
			rc = mdb_env_set_mapsize(env, s->s_map_size);
		if (rc == 0)
			rc = mdb_env_open(env, path, MDB_NOSUBDIR | MDB_RDONLY | MDB_NOLOCK | MDB_NOTLS, 0600);
		/* ... or one of a newer record format than this build reads. */
		MDB_txn *txn;
		MDB_dbi meta;
		if (rc == 0 && (rc = mdb_txn_begin(env, NULL, MDB_RDONLY, &txn)) == 0) {
			rc = mdb_dbi_open(txn, "meta", 0, &meta);
			if (rc == 0)
				rc = format_check(txn, meta, 0);
			mdb_txn_abort(txn);
		}
		mdb_env_close(env);
	}
	if (rc)
		return STORAGE_ERR_CORRUPT;
	flush_parked(s); /* it holds the environment shared */
	pthread_rwlock_wrlock(&s->s_envlock);
	int err = s->s_batch ? STORAGE_ERR_INVALID : replace_env(s, path, "install.renamed");
	pthread_rwlock_unlock(&s->s_envlock);
	return err;
}

/* ---- batches ---- */

/* ---- the committer ----
 *
 * LMDB ties a write transaction to the thread that began it: mdb_txn_begin takes the
 * writer's mutex (robust and process-shared: only its owner may release it) and the commit
 * or abort releases it. So one thread, the committer, begins and ends every batch's
 * transaction, and the batch's owner fills it in between (a write txn keeps no per-thread
 * state besides; the hand-over through s_cm_mu orders the accesses). That lets
 * storage_batch_commit_async() return while the commit writes and flushes its pages: the
 * caller answers once the batch's log records are durable, and readers wait for the commit
 * to be visible (wait_published), so none misses a write answered before it began.
 * One job at a time: whoever posts the next waits until the committer is idle.
 */
enum { CM_NONE, CM_BEGIN, CM_COMMIT, CM_ABORT, CM_STOP };

static int begin_txn(storage_batch *b);
static int finish_commit(storage_batch *b, int lazy, int async);
static void batch_end(storage_batch *b);

static uint64_t mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* How long past its window a parked batch may wait for an idle writer: a quarter window.
 * A lone client's writer is idle between its puts (every ~0.6 ms); a busy one never is, and
 * there a longer wait only makes commits larger (waiting a whole window more: put with 1,000
 * clients -3% throughput, +10% p99). */
static uint64_t idle_slack_ns(const storage *s)
{
	return s->s_cm_window_ns / 4;
}

/* Under s_cm_mu: whether the parked batch p must be committed now. Past its window it waits
 * for the writer to be idle (with writer_idle 0: the caller is the writer, at work), so that
 * its flush does not hold up an apply that is on its way, but no longer than the slack. */
static int parked_due(storage *s, const storage_batch *p, int writer_idle)
{
	uint64_t age = mono_ns() - p->b_parked_ns;
	return s->s_cm_kick || age >= s->s_cm_window_ns + idle_slack_ns(s) ||
	       (age >= s->s_cm_window_ns && writer_idle);
}

/* Under s_cm_mu, with no job posted: makes the parked batch the job if its time has come.
 * (It resets s_cm_done, which a synchronous run_job() waiter reads: none can be waiting here,
 * since only the writer parks, and it is not inside run_job() while a batch is parked.) */
static int take_parked(storage *s)
{
	storage_batch *p = s->s_cm_parked;
	if (p == NULL || !parked_due(s, p, atomic_load(&s->s_cm_writer_idle)))
		return 0;
	s->s_cm_parked = NULL;
	s->s_cm_kick = 0;
	s->s_cm_job = CM_COMMIT;
	s->s_cm_batch = p;
	s->s_cm_lazy = 1;
	s->s_cm_async = 1;
	s->s_cm_done = 0;
	return 1;
}

static void *committer_main(void *arg)
{
	storage *s = arg;
	prctl(PR_SET_NAME, "lmdb-commit"); /* names the thread in top -H, perf, gdb */
	pthread_mutex_lock(&s->s_cm_mu);
	for (;;) {
		while (s->s_cm_job == CM_NONE && !take_parked(s)) {
			if (s->s_cm_parked) {
				/* Wakes at the window's end, then (the writer busy) at the end of
				 * the slack or when storage_set_writer_idle() signals. */
				uint64_t at = s->s_cm_parked->b_parked_ns + s->s_cm_window_ns;
				if (mono_ns() >= at && !atomic_load(&s->s_cm_writer_idle))
					at += idle_slack_ns(s);
				struct timespec ts = {(time_t)(at / 1000000000u), (long)(at % 1000000000u)};
				pthread_cond_timedwait(&s->s_cm_cond, &s->s_cm_mu, &ts);
			} else {
				pthread_cond_wait(&s->s_cm_cond, &s->s_cm_mu);
			}
		}
		int job = s->s_cm_job, lazy = s->s_cm_lazy, async = s->s_cm_async;
		storage_batch *b = s->s_cm_batch;
		if (job == CM_STOP)
			break;
		uint64_t seq = b ? b->b_seq : 0, applied = b ? b->b_applied : 0; /* b is gone after its commit */
		pthread_mutex_unlock(&s->s_cm_mu);
		int err = 0;
		if (job == CM_BEGIN) {
			err = begin_txn(b);
		} else if (job == CM_COMMIT) {
			err = finish_commit(b, lazy, async); /* ends the batch */
		} else {
			mdb_txn_abort(b->b_txn);
			batch_end(b);
		}
		pthread_mutex_lock(&s->s_cm_mu);
		if (job == CM_COMMIT) {
			if (err && async)
				s->s_cm_async_err = err;
			atomic_store(&s->s_cm_published, seq); /* commits end in the order handed */
			if (!err && applied > atomic_load(&s->s_pub_applied))
				atomic_store(&s->s_pub_applied, applied);
		}
		s->s_cm_err = err;
		s->s_cm_done = 1;
		s->s_cm_job = CM_NONE;
		pthread_cond_broadcast(&s->s_cm_cond);
	}
	s->s_cm_job = CM_NONE;
	s->s_cm_done = 1;
	pthread_cond_broadcast(&s->s_cm_cond);
	pthread_mutex_unlock(&s->s_cm_mu);
	return NULL;
}

/* Under s_cm_mu: waits until the committer is idle with nothing parked. A parked batch holds
 * LMDB's writer (and the environment, shared): it is committed before anything else. */
static void wait_idle(storage *s)
{
	while (s->s_cm_job != CM_NONE || s->s_cm_parked) {
		if (s->s_cm_parked) {
			s->s_cm_kick = 1;
			pthread_cond_broadcast(&s->s_cm_cond);
		}
		pthread_cond_wait(&s->s_cm_cond, &s->s_cm_mu);
	}
}

/* Posts a job once the committer is idle; unless async, waits for its result. */
static int run_job(storage *s, int job, storage_batch *b, int lazy, int async)
{
	pthread_mutex_lock(&s->s_cm_mu);
	wait_idle(s);
	if (job == CM_BEGIN && s->s_cm_async_err) {
		/* An earlier commit was answered and then failed: stop writing, as a failed
		 * synchronous commit would have. */
		int err = s->s_cm_async_err;
		pthread_mutex_unlock(&s->s_cm_mu);
		return err;
	}
	s->s_cm_job = job;
	s->s_cm_batch = b;
	s->s_cm_lazy = lazy;
	s->s_cm_async = async;
	s->s_cm_done = 0;
	if (job == CM_COMMIT) {
		b->b_seq = atomic_fetch_add(&s->s_cm_handed, 1) + 1;
		s->s_cm_kick = 0; /* whoever asked waits for this commit: it holds all answered */
		/* What the caller answers from here on, once readers wait for it (not before:
		 * a header showing it must not precede a read that could miss it). */
		if (async)
			atomic_store(&s->s_rev, b->b_rev);
	}
	pthread_cond_broadcast(&s->s_cm_cond);
	int err = 0;
	if (!async) {
		while (!s->s_cm_done)
			pthread_cond_wait(&s->s_cm_cond, &s->s_cm_mu);
		err = s->s_cm_err;
	}
	pthread_mutex_unlock(&s->s_cm_mu);
	return err;
}

static int published_enough(storage *s, uint64_t want, uint64_t need_applied)
{
	return atomic_load(&s->s_cm_published) >= want ||
	       (need_applied && atomic_load(&s->s_pub_applied) >= need_applied);
}

/* Waits until every commit handed over so far is visible to new read transactions or, with
 * need_applied != 0, until a visible commit holds Raft index need_applied, whichever comes
 * first: a linearizable read needs what its read index covers, not the applies after it,
 * which may sit in a batch still parked or still being written. Fails once an asynchronous
 * commit has failed: what was answered may then never show. */
static int wait_published(storage *s, uint64_t need_applied)
{
	uint64_t want = atomic_load(&s->s_cm_handed);
	if (published_enough(s, want, need_applied) && !atomic_load(&s->s_cm_async_err))
		return 0;
	pthread_mutex_lock(&s->s_cm_mu);
	while (!published_enough(s, want, need_applied) && s->s_cm_started) {
		/* What was answered may sit in a parked batch, or in the batch continuing it:
		 * that one is committed as soon as it ends (storage_batch_commit_async). */
		if (s->s_cm_job == CM_NONE) { /* not in flight: parked, or being continued */
			s->s_cm_kick = 1;
			pthread_cond_broadcast(&s->s_cm_cond);
		}
		pthread_cond_wait(&s->s_cm_cond, &s->s_cm_mu);
	}
	int err = atomic_load(&s->s_cm_async_err);
	pthread_mutex_unlock(&s->s_cm_mu);
	return err;
}

static int committer_start(storage *s)
{
	if (pthread_mutex_init(&s->s_cm_mu, NULL) != 0)
		return STORAGE_ERR_NOMEM;
	pthread_condattr_t ca;
	int crc = pthread_condattr_init(&ca);
	if (crc == 0) {
		pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* the parked batch's deadline */
		crc = pthread_cond_init(&s->s_cm_cond, &ca);
		pthread_condattr_destroy(&ca);
	}
	if (crc != 0) {
		pthread_mutex_destroy(&s->s_cm_mu);
		return STORAGE_ERR_NOMEM;
	}
	if (pthread_create(&s->s_cm_thread, NULL, committer_main, s) != 0) {
		pthread_cond_destroy(&s->s_cm_cond);
		pthread_mutex_destroy(&s->s_cm_mu);
		return STORAGE_ERR_NOMEM;
	}
	s->s_cm_started = 1;
	return 0;
}

/* Lets an asynchronous commit finish, then ends the thread. */
static void committer_stop(storage *s)
{
	if (!s->s_cm_started)
		return;
	run_job(s, CM_STOP, NULL, 0, 1);
	pthread_join(s->s_cm_thread, NULL);
	s->s_cm_started = 0;
	pthread_cond_destroy(&s->s_cm_cond);
	pthread_mutex_destroy(&s->s_cm_mu);
}

void storage_set_commit_observer(storage *s, void (*observe)(void *arg, uint64_t ns, int err), void *arg)
{
	/* Between jobs: a commit in flight finishes with the old observer, whose arg the
	 * caller may free once this returns. */
	pthread_mutex_lock(&s->s_cm_mu);
	while (s->s_cm_job != CM_NONE)
		pthread_cond_wait(&s->s_cm_cond, &s->s_cm_mu);
	atomic_store(&s->s_cm_observe_arg, arg);
	atomic_store(&s->s_cm_observe, observe);
	pthread_mutex_unlock(&s->s_cm_mu);
}

void storage_set_commit_window(storage *s, uint64_t window_ns, int64_t max_revisions)
{
	pthread_mutex_lock(&s->s_cm_mu);
	s->s_cm_window_ns = window_ns;
	s->s_cm_window_revs = max_revisions > 0 ? max_revisions : INT64_MAX;
	pthread_cond_broadcast(&s->s_cm_cond);
	pthread_mutex_unlock(&s->s_cm_mu);
}

void storage_set_writer_idle(storage *s, int idle)
{
	if (atomic_exchange(&s->s_cm_writer_idle, idle) == idle || !idle || !s->s_cm_started)
		return;
	pthread_mutex_lock(&s->s_cm_mu);
	if (s->s_cm_parked)
		pthread_cond_broadcast(&s->s_cm_cond); /* the committer looks again */
	pthread_mutex_unlock(&s->s_cm_mu);
}

/* Commits the parked batch, if any, and waits until the committer is idle. */
static void flush_parked(storage *s)
{
	pthread_mutex_lock(&s->s_cm_mu);
	wait_idle(s);
	pthread_mutex_unlock(&s->s_cm_mu);
}

/* Hands an answered batch back to the committer to wait for its window (under s_cm_mu). */
static void park(storage *s, storage_batch *b)
{
	s->s_cm_parked = b;
	pthread_cond_broadcast(&s->s_cm_cond);
}

/* ---- batches ---- */

/* A new batch, not yet the open one. */
static storage_batch *batch_new(storage *s, int log_only)
{
	storage_batch *b = calloc(1, sizeof(*b));
	if (!b)
		return NULL;
	b->b_s = s;
	b->b_wal_clear_off = -1;
	b->b_log_only = log_only;
	return b;
}

int storage_batch_begin(storage *s, storage_batch **out)
{
	if (s->s_batch)
		return STORAGE_ERR_INVALID;
	storage_batch *b = batch_new(s, 0);
	if (!b)
		return STORAGE_ERR_NOMEM;
	int err = run_job(s, CM_BEGIN, b, 0, 0);
	if (err) {
		free(b);
		return err;
	}
	s->s_batch = b;
	*out = b;
	return 0;
}

int storage_batch_begin_log(storage *s, storage_batch **out)
{
	if (s->s_batch)
		return STORAGE_ERR_INVALID;
	int failed = atomic_load(&s->s_cm_async_err);
	if (failed)
		return failed; /* as storage_batch_begin: the store stopped at a failed commit */
	storage_batch *b = batch_new(s, 1);
	if (!b)
		return STORAGE_ERR_NOMEM;
	s->s_batch = b;
	*out = b;
	return 0;
}

int storage_batch_begin_apply(storage *s, storage_batch **out)
{
	if (s->s_batch)
		return STORAGE_ERR_INVALID;
	pthread_mutex_lock(&s->s_cm_mu);
	storage_batch *p = s->s_cm_parked;
	int failed = atomic_load(&s->s_cm_async_err);
	if (p && parked_due(s, p, 0))
		p = NULL; /* its time is up: storage_batch_begin() below has it committed first */
	if (p && !failed)
		s->s_cm_parked = NULL;
	pthread_mutex_unlock(&s->s_cm_mu);
	if (failed)
		return failed;
	if (p == NULL)
		return storage_batch_begin(s, out);
	/* Continue the parked batch in a child txn: its own abort leaves the parked part, which
	 * was answered, as it was. LMDB's nested begin takes no lock: any thread may do it. */
	MDB_txn *child;
	int err = storage__mdb_err(mdb_txn_begin(s->s_env, p->b_txn, 0, &child));
	if (err) {
		pthread_mutex_lock(&s->s_cm_mu);
		park(s, p);
		pthread_mutex_unlock(&s->s_cm_mu);
		return err;
	}
	p->b_parent = p->b_txn;
	p->b_txn = child;
	p->b_saved = (struct batch_counters){.rev = p->b_rev,
					     .compact = p->b_compact,
					     .cnext_main = p->b_cnext_main,
					     .cnext_sub = p->b_cnext_sub,
					     .cpending = p->b_cpending,
					     .next_id = p->b_next_id};
	p->b_start_rev = p->b_rev; /* its events are this batch's own */
	p->b_wal_len = 0;         /* the parked batch's log records are written */
	p->b_wal_max_index = 0;
	p->b_wal_hs_set = 0;
	p->b_wal_clear_off = -1;
	s->s_batch = p;
	*out = p;
	return 0;
}

/* Ends the child txn of a continued batch: folded into the parked txn (commit) or dropped
 * with the counters put back (abort; also what a failed fold leaves). */
static int end_child(storage_batch *b, int commit)
{
	if (b->b_parent == NULL)
		return 0;
	int err = commit ? storage__mdb_err(mdb_txn_commit(b->b_txn)) : (mdb_txn_abort(b->b_txn), 0);
	if (err) {
		/* A fold that fails part-way leaves the parked txn unusable (LMDB marks it failed),
		 * and it holds answered writes: stop as after a failed asynchronous commit (its
		 * commit will fail too; the WAL redoes them at the restart). */
		pthread_mutex_lock(&b->b_s->s_cm_mu);
		atomic_store(&b->b_s->s_cm_async_err, err);
		pthread_mutex_unlock(&b->b_s->s_cm_mu);
	}
	if (!commit || err) {
		b->b_rev = b->b_saved.rev;
		b->b_compact = b->b_saved.compact;
		b->b_cnext_main = b->b_saved.cnext_main;
		b->b_cnext_sub = b->b_saved.cnext_sub;
		b->b_cpending = b->b_saved.cpending;
		b->b_next_id = b->b_saved.next_id;
	}
	b->b_txn = b->b_parent;
	b->b_parent = NULL;
	return err;
}

/* The committer's part of storage_batch_begin(). */
static int begin_txn(storage_batch *b)
{
	storage *s = b->b_s;
	pthread_rwlock_rdlock(&s->s_envlock);
	int err = storage__mdb_err(mdb_txn_begin(s->s_env, NULL, 0, &b->b_txn));
	if (!err)
		err = storage__meta_get_i64(s, b->b_txn, META_REV, 1, &b->b_rev);
	if (!err) {
		b->b_start_rev = b->b_rev;
		err = storage__meta_get_i64(s, b->b_txn, META_COMPACT, -1, &b->b_compact);
	}
	if (!err)
		err = storage__meta_get_i64(s, b->b_txn, META_CNEXT_MAIN, 0, &b->b_cnext_main);
	if (!err)
		err = storage__meta_get_i64(s, b->b_txn, META_CNEXT_SUB, 0, &b->b_cnext_sub);
	if (!err)
		err = storage__meta_get_i64(s, b->b_txn, META_CPENDING, 0, &b->b_cpending);
	if (!err)
		err = storage__meta_get_i64(s, b->b_txn, META_NEXT_ID, 1, &b->b_next_id);
	if (err) {
		if (b->b_txn)
			mdb_txn_abort(b->b_txn);
		b->b_txn = NULL;
		pthread_rwlock_unlock(&s->s_envlock);
	}
	return err;
}

int storage_batch_meta_put(storage_batch *b, const char *name, const void *val, size_t len)
{
	size_t n = strlen(name);
	char key[512];
	if (n + 2 > sizeof(key))
		return STORAGE_ERR_INVALID;
	key[0] = 'm';
	key[1] = ':';
	memcpy(key + 2, name, n);
	MDB_val k = {n + 2, key}, v = {len, (void *)val};
	return storage__mdb_err(mdb_put(b->b_txn, b->b_s->s_meta, &k, &v, 0));
}

static int batch_commit(storage_batch *b, uint64_t applied_index, int lazy);

int storage_batch_commit(storage_batch *b, uint64_t applied_index)
{
	return batch_commit(b, applied_index, 0);
}

int storage_batch_commit_lazy(storage_batch *b, uint64_t applied_index)
{
	return batch_commit(b, applied_index, 1);
}

/* Ends a batch: on the committer for one with a transaction (the envlock is its too). */
static void batch_end(storage_batch *b)
{
	if (!b->b_log_only)
		pthread_rwlock_unlock(&b->b_s->s_envlock);
	free(b->b_wal);
	free(b);
}

/* Hands the batch back for good: the next one may begin. */
static void batch_release(storage_batch *b)
{
	if (b->b_s->s_batch == b)
		b->b_s->s_batch = NULL;
}

static void batch_discard(storage_batch *b)
{
	storage *s = b->b_s;
	batch_release(b);
	if (b->b_log_only) {
		batch_end(b);
	} else if (b->b_parked_ns) {
		/* A continued parked batch: drop what this batch added; what was parked was
		 * answered and is committed as it would have been. */
		end_child(b, 0);
		pthread_mutex_lock(&s->s_cm_mu);
		park(s, b);
		pthread_mutex_unlock(&s->s_cm_mu);
	} else {
		run_job(s, CM_ABORT, b, 0, 0);
	}
}

int storage_batch_sync_log(storage_batch *b)
{
	int had = storage__wal_pending(b);
	int err = storage__wal_write(b);
	if (!err && had)
		CRASHPOINT("wal.synced"); /* the log records durable, the LMDB part not written */
	return err;
}

int storage_batch_commit_log(storage_batch *b)
{
	int err = storage_batch_sync_log(b);
	batch_discard(b);
	return err;
}

/* The caller's part of a commit: the log first (the LMDB state may only ever be ahead of
 * what the log can redo if the log holds it, and a follower's entries must be durable
 * before it acks them), then the batch's counters. On error the batch is discarded. */
static int batch_prepare(storage_batch *b, uint64_t applied_index)
{
	storage *s = b->b_s;
	if (b->b_log_only) {
		batch_discard(b);
		return STORAGE_ERR_INVALID;
	}
	MDB_txn *txn = b->b_txn;
	int err = storage_batch_sync_log(b);
	if (!err)
		err = storage__meta_put_i64(s, txn, META_REV, b->b_rev);
	if (!err)
		err = storage__meta_put_i64(s, txn, META_COMPACT, b->b_compact);
	if (!err)
		err = storage__meta_put_i64(s, txn, META_CNEXT_MAIN, b->b_cnext_main);
	if (!err)
		err = storage__meta_put_i64(s, txn, META_CNEXT_SUB, b->b_cnext_sub);
	if (!err)
		err = storage__meta_put_i64(s, txn, META_CPENDING, b->b_cpending);
	if (!err)
		err = storage__meta_put_i64(s, txn, META_NEXT_ID, b->b_next_id);
	if (!err)
		err = storage__meta_put_i64(s, txn, META_APPLIED, (int64_t)applied_index);
	if (!err)
		err = end_child(b, 1); /* one txn again, for the committer */
	if (err) {
		batch_discard(b); /* a parked batch it continued keeps its own b_applied */
		return err;
	}
	b->b_applied = applied_index;
	return 0;
}

static int batch_commit(storage_batch *b, uint64_t applied_index, int lazy)
{
	storage *s = b->b_s;
	int err = batch_prepare(b, applied_index);
	if (err)
		return err;
	batch_release(b);
	return run_job(s, CM_COMMIT, b, lazy, 0);
}

int storage_batch_commit_async(storage_batch *b, uint64_t applied_index)
{
	storage *s = b->b_s;
	/* Removing WAL segments (after a snapshot point) touches the WAL, which the caller's
	 * next batch writes: that commit runs while the caller waits. */
	if (b->b_snap_set)
		return batch_commit(b, applied_index, 1);
	int err = batch_prepare(b, applied_index);
	if (err)
		return err;
	batch_release(b);
	pthread_mutex_lock(&s->s_cm_mu);
	if (s->s_cm_window_ns && !s->s_cm_kick && !s->s_cm_async_err && (!b->b_parked_ns || !parked_due(s, b, 0)) &&
	    b->b_rev - (b->b_parked_ns ? b->b_park_rev : b->b_start_rev) < s->s_cm_window_revs) {
		/* Answered, readable once committed: the committer commits it when a reader asks,
		 * or once the window has passed and the writer is idle (a quarter window later at
		 * the latest), unless the next apply continues it first. */
		b->b_seq = atomic_fetch_add(&s->s_cm_handed, 1) + 1;
		atomic_store(&s->s_rev, b->b_rev);
		if (!b->b_parked_ns) {
			b->b_parked_ns = mono_ns();
			b->b_park_rev = b->b_start_rev;
		}
		park(s, b);
		pthread_mutex_unlock(&s->s_cm_mu);
		return 0;
	}
	pthread_mutex_unlock(&s->s_cm_mu);
	return run_job(s, CM_COMMIT, b, 1, 1);
}

/* The committer's part of a commit; ends the batch whatever happens. */
static int finish_commit(storage_batch *b, int lazy, int async)
{
	storage *s = b->b_s;
	int had_log = b->b_wal_written; /* by batch_prepare() or an earlier storage_batch_sync_log() */
	/* mdb_txn_commit frees the txn whatever it returns; with default flags it fsyncs the
	 * data and then the meta page. A lazy commit syncs the data only (LMDB's
	 * MDB_NOMETASYNC): the database stays intact through a crash, which may undo this
	 * commit until the next one syncs. The committer is the only committer, so the flag
	 * can be set around this call. */
	if (lazy)
		mdb_env_set_flags(s->s_env, MDB_NOMETASYNC, 1);
	CRASHPOINT("commit.before"); /* the batch complete in memory, nothing of it on disk */
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	int err = storage__mdb_err(mdb_txn_commit(b->b_txn));
	clock_gettime(CLOCK_MONOTONIC, &t1);
	void (*observe)(void *, uint64_t, int) = atomic_load(&s->s_cm_observe);
	if (observe && (!err || async))
		observe(atomic_load(&s->s_cm_observe_arg),
			(uint64_t)((t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec)), err);
	if (lazy)
		mdb_env_set_flags(s->s_env, MDB_NOMETASYNC, 0);
	if (!err) {
		CRASHPOINT("commit.after"); /* durable (lazy: written); acknowledged only if async */
		atomic_store(&s->s_rev, b->b_rev);
	} else if (had_log && !async) {
		/* The WAL holds records LMDB does not follow: stop, as a failed write does. (An
		 * asynchronous commit's failure stops every later batch instead: run_job.) */
		s->s_wal_failed = 1;
	}
	/* Segments whose entries the new snapshot point covers can go once that point is
	 * durable: this commit may be lazy, so flush LMDB first (once per segment, rare). A
	 * failure leaves them for the next compaction. Never for an asynchronous commit. */
	if (!err && b->b_snap_set && storage__wal_removable(s, b->b_snap_index) &&
	    mdb_env_sync(s->s_env, 1) == 0)
		(void)storage__wal_remove_through(s, b->b_snap_index);
	batch_end(b);
	return err;
}

void storage_batch_abort(storage_batch *b)
{
	batch_discard(b);
}

/* ---- readers ---- */

int storage_read_begin(storage *s, storage_reader **out)
{
	return storage_read_begin_at(s, 0, out);
}

int storage_read_begin_at(storage *s, uint64_t applied_index, storage_reader **out)
{
	storage_reader *r = calloc(1, sizeof(*r));
	if (!r)
		return STORAGE_ERR_NOMEM;
	r->r_s = s;
	int werr = wait_published(s, applied_index);
	if (werr) {
		free(r);
		return werr;
	}
	pthread_rwlock_rdlock(&s->s_envlock);
	int err = storage__mdb_err(mdb_txn_begin(s->s_env, NULL, MDB_RDONLY, &r->r_txn));
	if (!err)
		err = storage__meta_get_i64(s, r->r_txn, META_REV, 1, &r->r_rev);
	if (!err)
		err = storage__meta_get_i64(s, r->r_txn, META_COMPACT, -1, &r->r_compact);
	if (err) {
		if (r->r_txn)
			mdb_txn_abort(r->r_txn);
		pthread_rwlock_unlock(&s->s_envlock);
		free(r);
		return err;
	}
	*out = r;
	return 0;
}

void storage_read_end(storage_reader *r)
{
	if (!r)
		return;
	mdb_txn_abort(r->r_txn);
	pthread_rwlock_unlock(&r->r_s->s_envlock);
	free(r);
}

int storage_read_meta(storage_reader *r, const char *name, storage_arena *a, void **val,
		      size_t *len)
{
	size_t n = strlen(name);
	char key[512];
	if (n + 2 > sizeof(key))
		return STORAGE_ERR_INVALID;
	key[0] = 'm';
	key[1] = ':';
	memcpy(key + 2, name, n);
	MDB_val k = {n + 2, key}, v;
	int rc = mdb_get(r->r_txn, r->r_s->s_meta, &k, &v);
	if (rc)
		return storage__mdb_err(rc);
	*val = storage_arena_dup(a, v.mv_data, v.mv_size);
	if (!*val)
		return STORAGE_ERR_NOMEM;
	*len = v.mv_size;
	return 0;
}

/* ---- statistics ---- */

int storage_stat(storage *s, storage_stats *out)
{
	MDB_txn *txn = NULL;
	MDB_cursor *cur = NULL;
	int64_t applied = 0;
	memset(out, 0, sizeof(*out));
	int werr = wait_published(s, 0);
	if (werr)
		return werr;
	pthread_rwlock_rdlock(&s->s_envlock);
	int err = storage__mdb_err(mdb_txn_begin(s->s_env, NULL, MDB_RDONLY, &txn));
	if (err) {
		pthread_rwlock_unlock(&s->s_envlock);
		return err;
	}
	err = storage__meta_get_i64(s, txn, META_REV, 1, &out->st_revision);
	if (!err)
		err = storage__meta_get_i64(s, txn, META_COMPACT, -1, &out->st_compact_revision);
	if (!err)
		err = storage__meta_get_i64(s, txn, META_APPLIED, 0, &applied);
	if (err)
		goto done;
	if (out->st_compact_revision < 0)
		out->st_compact_revision = 0;
	out->st_applied_index = (uint64_t)applied;

	MDB_envinfo info;
	MDB_stat st;
	mdb_env_info(s->s_env, &info);
	mdb_env_stat(s->s_env, &st);
	const char *path;
	struct stat fst;
	if (mdb_env_get_path(s->s_env, &path) == 0) {
		char file[PATH_MAX];
		snprintf(file, sizeof(file), "%s/data.mdb", path);
		if (stat(file, &fst) == 0)
			out->st_db_size = (uint64_t)fst.st_size;
	}
	/* In use: pages up to the high-water mark minus the pages on LMDB's free list
	 * (DBI 0; each value is an ID list whose first word is its length). */
	uint64_t freepages = 0;
	if (mdb_cursor_open(txn, 0, &cur) == 0) {
		MDB_val k, v;
		int rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST);
		while (rc == 0) {
			if (v.mv_size >= sizeof(size_t))
				freepages += *(size_t *)v.mv_data;
			rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
		}
		mdb_cursor_close(cur);
	}
	uint64_t used = (uint64_t)info.me_last_pgno + 1;
	used = used > freepages ? used - freepages : 0;
	out->st_db_size_in_use = used * st.ms_psize;
done:
	mdb_txn_abort(txn);
	pthread_rwlock_unlock(&s->s_envlock);
	return err;
}
