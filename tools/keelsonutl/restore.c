/*
 * restore.c - `snapshot restore`: a new member's data dir from an etcd-format snapshot
 * (written by Keelson, by `etcdctl snapshot save` against etcd or Keelson, or a copied
 * member/snap/db with --skip-hash-check).
 *
 * Everything is built in DIR.tmp and renamed to DIR only when whole and synced:
 *   1. storage_import_etcd(FILE, DIR.tmp/member): keys, values, revisions, compaction,
 *      leases, applied index = the snapshot's consistent index.
 *   2. --bump-revision N --mark-compacted: the store revision becomes old+N (next write
 *      old+N+1) and is compacted there, as etcdutl does it (see bump_revision()).
 *   3. The member metadata a new cluster starts from, exactly what the member would write
 *      at its first start with the same flags (server/main.c load_or_store_ids,
 *      server/members.c members_start): meta "cluster_id" and "member_id" (8 bytes BE)
 *      and "members" (an encoded MemberListResponse of --initial-cluster, no header, no
 *      client URLs: each member publishes its own when it starts, as after etcd's
 *      restore). Raft starts fresh: no log entries and no hard state, and a raft snapshot
 *      point at the applied index (term 1, no stored configuration, so server/node.c
 *      raft_boot takes the voters from "members"): every member restored from the same
 *      file and flags agrees on it.
 * Users, roles and the auth switch (authUsers, authRoles, auth) become the auth store's
 * record; password hashes stay as they are (etcd's bcrypt and Keelson's PBKDF2 both check).
 * Alarms and unknown buckets are counted and reported, not restored; the snapshot's own
 * membership is replaced, as etcd's restore does.
 */
#define _GNU_SOURCE /* nftw, mkdtemp, %m */
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <lmdb.h>

#include "api/proto/rpc.pb-c.h"
#include "tools/keelsonutl/keelsonutl.h"

/* Users and roles (etcd's authUsers / authRoles entries, encoded authpb messages) and the
 * auth switch: restored into the auth store's record. */
#define RESTORE_MAX_AUTH 4096

/* Alarms: etcd's "alarm" bucket (an encoded AlarmMember as key). A member restored by etcd
 * 3.4 starts with them raised (a NOSPACE one keeps refusing writes until disarmed), so the
 * restored Keelson member does too. */
#define RESTORE_MAX_ALARMS 64

typedef struct visit_ctx {
	uint64_t vc_alarm, vc_other;
	uint64_t vc_alarm_member[RESTORE_MAX_ALARMS];
	uint32_t vc_alarm_type[RESTORE_MAX_ALARMS];
	size_t vc_n_alarms;
	ProtobufCBinaryData vc_users[RESTORE_MAX_AUTH], vc_roles[RESTORE_MAX_AUTH]; /* malloc'd */
	size_t vc_n_users, vc_n_roles;
	int vc_auth_enabled;
	uint64_t vc_auth_revision;
	int vc_nomem;
} visit_ctx;

static void visit_free(visit_ctx *v)
{
	for (size_t i = 0; i < v->vc_n_users; i++)
		free(v->vc_users[i].data);
	for (size_t i = 0; i < v->vc_n_roles; i++)
		free(v->vc_roles[i].data);
}

static int visit(void *ctx, const char *bucket, const uint8_t *key, size_t klen,
		 const uint8_t *val, size_t vlen)
{
	visit_ctx *v = ctx;
	(void)key;
	int user = strcmp(bucket, "authUsers") == 0;
	if (user || strcmp(bucket, "authRoles") == 0) {
		ProtobufCBinaryData *list = user ? v->vc_users : v->vc_roles;
		size_t *n = user ? &v->vc_n_users : &v->vc_n_roles;
		if (*n == RESTORE_MAX_AUTH)
			return 0;
		uint8_t *copy = malloc(vlen ? vlen : 1);
		if (copy == NULL) {
			v->vc_nomem = 1;
			return 0;
		}
		memcpy(copy, val, vlen);
		list[(*n)++] = (ProtobufCBinaryData){vlen, copy};
	} else if (strcmp(bucket, "auth") == 0) {
		if (klen == 11 && memcmp(key, "authEnabled", 11) == 0 && vlen == 1)
			v->vc_auth_enabled = val[0] == 1;
		else if (klen == 12 && memcmp(key, "authRevision", 12) == 0 && vlen == 8)
			for (int i = 0; i < 8; i++)
				v->vc_auth_revision = v->vc_auth_revision << 8 | val[i];
	} else if (strcmp(bucket, "alarm") == 0) {
		Etcdserverpb__AlarmMember *am = etcdserverpb__alarm_member__unpack(NULL, klen, key);
		if (am == NULL || am->alarm == ETCDSERVERPB__ALARM_TYPE__NONE ||
		    v->vc_n_alarms == RESTORE_MAX_ALARMS) {
			v->vc_alarm++; /* not restored: counted and reported */
		} else {
			v->vc_alarm_member[v->vc_n_alarms] = am->memberid;
			v->vc_alarm_type[v->vc_n_alarms++] = (uint32_t)am->alarm;
		}
		if (am)
			etcdserverpb__alarm_member__free_unpacked(am, NULL);
	} else if (strcmp(bucket, "members") && strcmp(bucket, "members_removed") &&
		   strcmp(bucket, "cluster") && strcmp(bucket, "meta")) {
		v->vc_other++;
	}
	return 0;
}

/* Progress of an import on a terminal: the import itself reports nothing, but it commits
 * in chunks, so the size of the new data file shows how far it got. A thread polls it. */
typedef struct import_watch {
	ku_progress iw_progress;
	char iw_file[PATH_MAX + 16];
	pthread_t iw_thread;
	int iw_running;
	pthread_mutex_t iw_mu;
	pthread_cond_t iw_cv;
	int iw_stop;
} import_watch;

static void *import_watch_run(void *arg)
{
	import_watch *w = arg;
	pthread_mutex_lock(&w->iw_mu);
	while (!w->iw_stop) {
		struct stat st;
		if (stat(w->iw_file, &st) == 0)
			ku_progress_update(&w->iw_progress, (uint64_t)st.st_size, 0);
		struct timespec until;
		clock_gettime(CLOCK_REALTIME, &until);
		until.tv_nsec += 100 * 1000000;
		if (until.tv_nsec >= 1000000000) {
			until.tv_sec++;
			until.tv_nsec -= 1000000000;
		}
		pthread_cond_timedwait(&w->iw_cv, &w->iw_mu, &until);
	}
	pthread_mutex_unlock(&w->iw_mu);
	return NULL;
}

static void import_watch_start(import_watch *w, const char *member, int quiet)
{
	memset(w, 0, sizeof(*w));
	ku_progress_start(&w->iw_progress, "restoring (written to the new data dir)", 0);
	if (quiet || !w->iw_progress.pg_on)
		return;
	snprintf(w->iw_file, sizeof(w->iw_file), "%s/data.mdb", member);
	pthread_mutex_init(&w->iw_mu, NULL);
	pthread_cond_init(&w->iw_cv, NULL);
	w->iw_running = pthread_create(&w->iw_thread, NULL, import_watch_run, w) == 0;
}

static void import_watch_stop(import_watch *w)
{
	if (!w->iw_running)
		return;
	pthread_mutex_lock(&w->iw_mu);
	w->iw_stop = 1;
	pthread_cond_signal(&w->iw_cv);
	pthread_mutex_unlock(&w->iw_mu);
	pthread_join(w->iw_thread, NULL);
	struct stat st;
	if (stat(w->iw_file, &st) == 0)
		w->iw_progress.pg_done = (uint64_t)st.st_size;
	ku_progress_end(&w->iw_progress);
	pthread_mutex_destroy(&w->iw_mu);
	pthread_cond_destroy(&w->iw_cv);
}

/* 1 if dir does not exist or is an empty directory, 0 if it holds anything, -1 on error. */
static int dir_absent_or_empty(const char *dir)
{
	struct stat st;
	if (stat(dir, &st) != 0)
		return errno == ENOENT ? 1 : -1;
	if (!S_ISDIR(st.st_mode))
		return 0;
	DIR *d = opendir(dir);
	if (d == NULL)
		return -1;
	struct dirent *e;
	int empty = 1;
	while ((e = readdir(d)) != NULL)
		if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
			empty = 0;
	closedir(d);
	return empty;
}

/*
 * Raises the store revision by n. storage.h has no call for this yet, so this one write
 * goes to the environment directly: the 8-byte big-endian "i:rev" of the "meta" table
 * (storage/internal.h META_REV). To fold into storage as
 * storage_batch_bump_revision(b, n); the compaction that follows uses the public API.
 */
static int bump_revision(const char *lmdb_dir, uint64_t n, int64_t *rev, char *errbuf,
			 size_t errlen)
{
	MDB_env *env = NULL;
	MDB_txn *txn = NULL;
	MDB_dbi meta;
	int rc = mdb_env_create(&env);
	if (rc == 0)
		rc = mdb_env_set_maxdbs(env, 32);
	if (rc == 0)
		rc = mdb_env_open(env, lmdb_dir, MDB_NOTLS, 0600);
	if (rc == 0)
		rc = mdb_txn_begin(env, NULL, 0, &txn);
	if (rc == 0)
		rc = mdb_dbi_open(txn, "meta", 0, &meta);
	MDB_val k = {5, (void *)"i:rev"}, v;
	uint8_t buf[8];
	int64_t old = 1;
	if (rc == 0) {
		rc = mdb_get(txn, meta, &k, &v);
		if (rc == 0 && v.mv_size != 8)
			rc = MDB_CORRUPTED;
		if (rc == 0)
			for (int i = 0; i < 8; i++)
				old = (i ? old << 8 : 0) | ((const uint8_t *)v.mv_data)[i];
		else if (rc == MDB_NOTFOUND)
			rc = 0; /* an empty store is at revision 1 */
	}
	if (rc == 0) {
		if (old < 0 || n > (uint64_t)INT64_MAX - (uint64_t)old) {
			mdb_txn_abort(txn);
			mdb_env_close(env);
			return ku_errf(errbuf, errlen, KU_ERR_USAGE, "--bump-revision %" PRIu64 " overflows revision %" PRId64, n, old);
		}
		*rev = old + (int64_t)n;
		for (int i = 7, j = 0; i >= 0; i--, j++)
			buf[j] = (uint8_t)((uint64_t)*rev >> (8 * i));
		v.mv_size = 8;
		v.mv_data = buf;
		rc = mdb_put(txn, meta, &k, &v, 0);
	}
	if (rc == 0) {
		rc = mdb_txn_commit(txn);
		txn = NULL;
	}
	if (txn)
		mdb_txn_abort(txn);
	if (env)
		mdb_env_close(env);
	if (rc)
		return ku_errf(errbuf, errlen, KU_ERR_STORAGE, "bump revision in %s: %s", lmdb_dir,
			       mdb_strerror(rc));
	return 0;
}

static int storage_fail(int err, const char *what, const char *dir, char *errbuf, size_t errlen)
{
	return ku_errf(errbuf, errlen, KU_ERR_STORAGE, "%s %s: %s", what, dir, storage_strerror(err));
}

/* Compacts at rev (the public API), then finishes the physical removal. */
static int compact_all(storage *st, int64_t rev, char *errbuf, size_t errlen)
{
	storage_batch *b;
	storage_arena a;
	storage_arena_init(&a);
	storage_stats stats;
	int err = storage_stat(st, &stats);
	if (err == 0 && rev <= stats.st_compact_revision)
		return 0; /* already compacted there */
	if (err == 0)
		err = storage_batch_begin(st, &b);
	if (err == 0) {
		Etcdserverpb__CompactionRequest req = ETCDSERVERPB__COMPACTION_REQUEST__INIT;
		Etcdserverpb__CompactionResponse resp;
		req.revision = rev;
		err = storage_batch_compact(b, &req, &a, &resp);
		if (err == 0)
			err = storage_batch_commit(b, stats.st_applied_index);
		else
			storage_batch_abort(b);
	}
	for (int done = 0; err == 0 && !done;) {
		if ((err = storage_batch_begin(st, &b)) != 0)
			break;
		err = storage_batch_compact_continue(b, 100000, &done);
		if (err == 0)
			err = storage_batch_commit(b, stats.st_applied_index);
		else
			storage_batch_abort(b);
	}
	storage_arena_free(&a);
	if (err)
		return ku_errf(errbuf, errlen, KU_ERR_STORAGE, "compact at %" PRId64 ": %s", rev,
			       storage_strerror(err));
	return 0;
}

static void put_be64(uint8_t *p, uint64_t v)
{
	for (int i = 7; i >= 0; i--, v >>= 8)
		p[i] = (uint8_t)v;
}

/* The meta a new member of cluster c, as member self, would write at its first start. */
static int write_member_meta(storage *st, const identity_cluster *c, int self, uint64_t applied,
			     const visit_ctx *auth, char *errbuf, size_t errlen)
{
	Etcdserverpb__Member ms[KU_MAX_MEMBERS], *mp[KU_MAX_MEMBERS];
	Etcdserverpb__MemberListResponse list = ETCDSERVERPB__MEMBER_LIST_RESPONSE__INIT;
	for (int k = 0; k < c->ic_n; k++) {
		Etcdserverpb__Member init = ETCDSERVERPB__MEMBER__INIT;
		ms[k] = init;
		ms[k].id = c->ic_id[k];
		ms[k].name = c->ic_name[k];
		ms[k].n_peerurls = (size_t)c->ic_n_urls[k];
		ms[k].peerurls = (char **)c->ic_urls[k];
		mp[k] = &ms[k];
	}
	list.n_members = (size_t)c->ic_n;
	list.members = mp;
	size_t len = etcdserverpb__member_list_response__get_packed_size(&list);
	uint8_t *buf = malloc(len ? len : 1);
	if (buf == NULL)
		return ku_errf(errbuf, errlen, KU_ERR_NOMEM, "out of memory");
	etcdserverpb__member_list_response__pack(&list, buf);
	storage_batch *b;
	uint8_t id[8];
	int err = storage_batch_begin(st, &b);
	if (err == 0) {
		put_be64(id, c->ic_cluster_id);
		err = storage_batch_meta_put(b, "cluster_id", id, 8);
		put_be64(id, c->ic_id[self]);
		if (err == 0)
			err = storage_batch_meta_put(b, "member_id", id, 8);
		if (err == 0)
			err = storage_batch_meta_put(b, "members", buf, len);
		/* Users (with their password hashes: Keelson's PBKDF2 or etcd's bcrypt, both
		 * checked by the server), roles and the auth switch, as the snapshot had them. */
		/* The alarms in server/alarm.c's record (meta "alarms"): 12 bytes each, the
		 * member id (8, big-endian) and the type (4, big-endian), as etcd left them. */
		uint8_t alarms[RESTORE_MAX_ALARMS * 12];
		for (size_t i = 0; i < auth->vc_n_alarms; i++) {
			put_be64(alarms + 12 * i, auth->vc_alarm_member[i]);
			for (int k = 0; k < 4; k++)
				alarms[12 * i + 8 + k] = (uint8_t)(auth->vc_alarm_type[i] >> (24 - 8 * k));
		}
		if (err == 0 && auth->vc_n_alarms)
			err = storage_batch_meta_put(b, "alarms", alarms, 12 * auth->vc_n_alarms);
		if (err == 0 && (auth->vc_n_users || auth->vc_n_roles || auth->vc_auth_enabled))
			err = storage_batch_auth_put(b, auth->vc_auth_enabled,
						     auth->vc_auth_revision ? auth->vc_auth_revision : 1, auth->vc_users,
						     auth->vc_n_users, auth->vc_roles, auth->vc_n_roles);
		/* The raft snapshot point: the state is the snapshot at the applied index (term
		 * 1, the configuration of "members"). raft_boot derives the same point when the
		 * log is empty, but not once entries follow it: without this record the member
		 * would not restart after its first write. */
		if (err == 0 && applied > 0)
			err = storage_batch_log_snapshot(b, applied, 1, NULL, 0);
		if (err == 0)
			err = storage_batch_commit(b, applied);
		else
			storage_batch_abort(b);
	}
	free(buf);
	if (err)
		return ku_errf(errbuf, errlen, KU_ERR_STORAGE, "write member metadata: %s",
			       storage_strerror(err));
	return 0;
}

/* Checks that --initial-advertise-peer-urls are the URLs --initial-cluster gives name. */
static int check_advertise(const identity_cluster *c, int self, const char *adv, char *errbuf,
			   size_t errlen)
{
	char *copy = strdup(adv), *save = NULL;
	if (copy == NULL)
		return ku_errf(errbuf, errlen, KU_ERR_NOMEM, "out of memory");
	int n = 0, ok = 1;
	for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
		int found = 0;
		for (int u = 0; u < c->ic_n_urls[self]; u++)
			found |= strcmp(c->ic_urls[self][u], t) == 0;
		ok &= found;
		n++;
	}
	free(copy);
	if (!ok || n != c->ic_n_urls[self])
		return ku_errf(errbuf, errlen, KU_ERR_USAGE,
			       "--initial-cluster has %s=%s but --initial-advertise-peer-urls is %s "
			       "(they must match)", c->ic_name[self], c->ic_urls[self][0], adv);
	return 0;
}

int ku_restore(const ku_restore_opts *o, ku_restore_result *res, char *errbuf, size_t errlen)
{
	memset(res, 0, sizeof(*res));
	identity_cluster c;
	char tmp[PATH_MAX], member[PATH_MAX], eb[512] = "", gztmp[PATH_MAX] = "";
	visit_ctx *vc = NULL; /* large (users and roles): on the heap */
	int rc = identity_parse(&c, o->ro_initial_cluster, o->ro_token, errbuf, errlen);
	if (rc)
		return rc == IDENTITY_ERR_NOMEM ? KU_ERR_NOMEM : KU_ERR_USAGE;
	int self = identity_find(&c, o->ro_name);
	if (self < 0) {
		identity_free(&c);
		return ku_errf(errbuf, errlen, KU_ERR_USAGE,
			       "couldn't find local name \"%s\" in the initial cluster configuration",
			       o->ro_name);
	}
	if ((rc = check_advertise(&c, self, o->ro_advertise_peer_urls, errbuf, errlen)))
		goto out;
	if (o->ro_bump_revision && !o->ro_mark_compacted) {
		rc = ku_errf(errbuf, errlen, KU_ERR_USAGE, "--mark-compacted required if --bump-revision > 0");
		goto out;
	}
	int empty = dir_absent_or_empty(o->ro_data_dir);
	if (empty <= 0) {
		rc = empty < 0 ? ku_errf(errbuf, errlen, KU_ERR_IO, "data-dir %s: %m", o->ro_data_dir)
			       : ku_errf(errbuf, errlen, KU_ERR_EXISTS, "data-dir \"%s\" exists", o->ro_data_dir);
		goto out;
	}
	if (snprintf(tmp, sizeof(tmp), "%s.tmp", o->ro_data_dir) >= (int)sizeof(tmp) ||
	    snprintf(member, sizeof(member), "%s/member", tmp) >= (int)sizeof(member)) {
		rc = ku_errf(errbuf, errlen, KU_ERR_USAGE, "data-dir path too long");
		goto out;
	}
	if (mkdir(tmp, 0700) != 0) {
		rc = errno == EEXIST
			     ? ku_errf(errbuf, errlen, KU_ERR_EXISTS,
				       "%s exists (left by an interrupted restore?): remove it first", tmp)
			     : ku_errf(errbuf, errlen, KU_ERR_IO, "mkdir %s: %m", tmp);
		goto out;
	}

	/* A gzip file is expanded inside DIR.tmp: the target's file system, removed with it. */
	const char *plain;
	if ((rc = ku_open_snapshot(o->ro_snapshot, tmp, gztmp, sizeof(gztmp), &plain, errbuf, errlen)))
		goto fail;
	if ((vc = calloc(1, sizeof(*vc))) == NULL) {
		rc = ku_errf(errbuf, errlen, KU_ERR_NOMEM, "out of memory");
		goto fail;
	}
	storage_etcd_import_options io = {0};
	io.ei_hash_check = o->ro_skip_hash_check ? STORAGE_ETCD_HASH_SKIP : STORAGE_ETCD_HASH_REQUIRE;
	io.ei_visit = visit;
	io.ei_ctx = vc;
	io.ei_errbuf = eb;
	io.ei_errlen = sizeof(eb);
	import_watch iw;
	import_watch_start(&iw, member, o->ro_quiet);
	int err = storage_import_etcd(plain, member, &io, &res->rr_info);
	import_watch_stop(&iw);
	if (gztmp[0]) {
		unlink(gztmp);
		gztmp[0] = '\0';
	}
	if (err) {
		rc = ku_errf(errbuf, errlen, err == STORAGE_ERR_CORRUPT ? KU_ERR_CORRUPT : KU_ERR_STORAGE,
			     "snapshot %s refused: %s", o->ro_snapshot, eb[0] ? eb : storage_strerror(err));
		goto fail;
	}
	res->rr_skipped = vc->vc_alarm + vc->vc_other;
	if (vc->vc_nomem) {
		rc = ku_errf(errbuf, errlen, KU_ERR_NOMEM, "out of memory reading the snapshot's users and roles");
		goto fail;
	}
	int64_t bumped = 0;
	if (o->ro_bump_revision && (rc = bump_revision(member, o->ro_bump_revision, &bumped, errbuf, errlen)))
		goto fail;

	storage *st;
	if ((err = storage_open(member, NULL, &st))) {
		rc = storage_fail(err, "open", member, errbuf, errlen);
		goto fail;
	}
	storage_stats stats;
	err = storage_stat(st, &stats);
	if (err)
		rc = storage_fail(err, "stat", member, errbuf, errlen);
	if (rc == 0 && o->ro_mark_compacted)
		rc = compact_all(st, stats.st_revision, errbuf, errlen);
	if (rc == 0)
		rc = write_member_meta(st, &c, self, stats.st_applied_index, vc, errbuf, errlen);
	if (rc == 0 && (err = storage_stat(st, &stats)))
		rc = storage_fail(err, "stat", member, errbuf, errlen);
	storage_close(st);
	if (rc)
		goto fail;
	res->rr_revision = stats.st_revision;
	res->rr_applied = stats.st_applied_index;
	res->rr_member_id = c.ic_id[self];
	res->rr_cluster_id = c.ic_cluster_id;

	if ((rc = ku_fsync_dir(member, errbuf, errlen)) || (rc = ku_fsync_dir(tmp, errbuf, errlen)))
		goto fail;
	if (rename(tmp, o->ro_data_dir) != 0) {
		rc = ku_errf(errbuf, errlen, KU_ERR_IO, "rename %s to %s: %m", tmp, o->ro_data_dir);
		goto fail;
	}
	rc = ku_fsync_parent(o->ro_data_dir, errbuf, errlen);
	if (!o->ro_quiet) {
		if (vc->vc_alarm)
			fprintf(stderr, "warning: %" PRIu64 " alarms not restored\n", vc->vc_alarm);
		for (size_t i = 0; i < vc->vc_n_alarms; i++)
			fprintf(stderr, "warning: alarm %s of member %" PRIx64 " restored (raised, as etcd "
				"restores it): `etcdctl alarm disarm` clears it\n",
				vc->vc_alarm_type[i] == ETCDSERVERPB__ALARM_TYPE__NOSPACE ? "NOSPACE"
				: vc->vc_alarm_type[i] == ETCDSERVERPB__ALARM_TYPE__CORRUPT ? "CORRUPT" : "?",
				vc->vc_alarm_member[i]);
		if (vc->vc_other)
			fprintf(stderr, "warning: %" PRIu64 " entries of unknown buckets not restored\n",
				vc->vc_other);
	}
	goto out;
fail:
	ku_remove_tree(tmp);
out:
	if (gztmp[0])
		unlink(gztmp);
	if (vc) {
		visit_free(vc);
		free(vc);
	}
	identity_free(&c);
	return rc;
}

int ku_verify_import(const char *snapshot, const char *lmdb_dir,
		     const storage_etcd_file_info *want, uint32_t *hash, int64_t *rev,
		     char *errbuf, size_t errlen)
{
	char eb[512] = "";
	storage_etcd_file_info got;
	storage_etcd_import_options io = {0};
	io.ei_hash_check = STORAGE_ETCD_HASH_REQUIRE;
	io.ei_errbuf = eb;
	io.ei_errlen = sizeof(eb);
	int err = storage_import_etcd(snapshot, lmdb_dir, &io, &got);
	if (err)
		return ku_errf(errbuf, errlen, KU_ERR_CORRUPT, "restore of %s failed: %s", snapshot,
			       eb[0] ? eb : storage_strerror(err));
	if (got.ef_hash != want->ef_hash || got.ef_revision != want->ef_revision ||
	    got.ef_total_keys != want->ef_total_keys)
		return ku_errf(errbuf, errlen, KU_ERR_CORRUPT,
			       "%s changed between check and restore (hash %x/%x, revision %" PRId64 "/%" PRId64 ")",
			       snapshot, want->ef_hash, got.ef_hash, want->ef_revision, got.ef_revision);
	storage *st;
	if ((err = storage_open(lmdb_dir, NULL, &st)))
		return storage_fail(err, "open", lmdb_dir, errbuf, errlen);
	storage_reader *r;
	int64_t hrev = 0, crev = 0;
	storage_stats stats;
	err = storage_stat(st, &stats);
	if (err == 0 && (err = storage_read_begin(st, &r)) == 0) {
		err = storage_hash_kv(r, 0, hash, &hrev, &crev);
		storage_read_end(r);
	}
	storage_close(st);
	if (err)
		return storage_fail(err, "hash of restored store", lmdb_dir, errbuf, errlen);
	if (stats.st_revision != got.ef_store_revision)
		return ku_errf(errbuf, errlen, KU_ERR_CORRUPT,
			       "restored store is at revision %" PRId64 ", the file says %" PRId64,
			       stats.st_revision, got.ef_store_revision);
	*rev = hrev;
	return 0;
}

int ku_cmd_snapshot_restore(int argc, char **argv)
{
	const char *data_dir = NULL, *name = "default", *ic = NULL, *token = "etcd-cluster",
		   *adv = "http://localhost:2380", *bump = NULL;
	int skip = 0, mark = 0;
	ku_flag flags[] = {
		{"data-dir", KU_FLAG_STR, &data_dir, NULL},
		{"name", KU_FLAG_STR, &name, NULL},
		{"initial-cluster", KU_FLAG_STR, &ic, NULL},
		{"initial-cluster-token", KU_FLAG_STR, &token, NULL},
		{"initial-advertise-peer-urls", KU_FLAG_STR, &adv, NULL},
		{"bump-revision", KU_FLAG_STR, &bump, NULL},
		{"skip-hash-check", KU_FLAG_BOOL, NULL, &skip},
		{"mark-compacted", KU_FLAG_BOOL, NULL, &mark},
		{NULL, 0, NULL, NULL},
	};
	char *pos[2];
	int npos;
	char eb[KU_ERRLEN];
	int rc = ku_flags_parse(argc, argv, flags, pos, 2, &npos, eb, sizeof(eb));
	if (rc == 0 && npos != 1)
		rc = ku_errf(eb, sizeof(eb), KU_ERR_USAGE, "snapshot restore requires exactly one argument");
	ku_restore_opts o = {0};
	char dd[PATH_MAX], icbuf[4096];
	if (rc == 0 && bump) {
		char *e;
		errno = 0;
		unsigned long long v = strtoull(bump, &e, 10);
		if (*bump == '\0' || *e || errno || bump[0] == '-')
			rc = ku_errf(eb, sizeof(eb), KU_ERR_USAGE, "invalid --bump-revision: %s", bump);
		o.ro_bump_revision = v;
	}
	if (rc) {
		fprintf(stderr, "Error: %s\n", eb);
		return 2;
	}
	if (data_dir == NULL) {
		snprintf(dd, sizeof(dd), "%s.etcd", name);
		data_dir = dd;
	}
	if (ic == NULL) {
		/* etcd's default: this member alone at its advertised peer URLs. */
		size_t off = 0;
		char *copy = strdup(adv), *save = NULL;
		icbuf[0] = '\0';
		for (char *t = strtok_r(copy, ",", &save); t && off < sizeof(icbuf);
		     t = strtok_r(NULL, ",", &save))
			off += (size_t)snprintf(icbuf + off, sizeof(icbuf) - off, "%s%s=%s", off ? "," : "",
						name, t);
		free(copy);
		ic = icbuf;
	}
	o.ro_snapshot = pos[0];
	o.ro_data_dir = data_dir;
	o.ro_name = name;
	o.ro_initial_cluster = ic;
	o.ro_token = token;
	o.ro_advertise_peer_urls = adv;
	o.ro_skip_hash_check = skip;
	o.ro_mark_compacted = mark;
	ku_restore_result res;
	rc = ku_restore(&o, &res, eb, sizeof(eb));
	if (rc) {
		fprintf(stderr, "Error: %s\n", eb);
		return rc == KU_ERR_USAGE ? 2 : 1;
	}
	printf("Snapshot restored into %s: member %s (id %" PRIx64 ") of cluster %" PRIx64
	       ", revision %" PRId64 ", applied index %" PRIu64 ", %" PRIu64 " revisions, %" PRIu64
	       " leases\n",
	       data_dir, name, res.rr_member_id, res.rr_cluster_id, res.rr_revision, res.rr_applied,
	       res.rr_info.ef_revisions, res.rr_info.ef_leases);
	return 0;
}
