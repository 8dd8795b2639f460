/*
 * snapshot.c - Maintenance.Snapshot: the member's state streamed as an etcd backend file
 * (bbolt) followed by its SHA-256, exactly what `etcdctl snapshot save` stores and what
 * `etcdctl snapshot restore` and `keelsonutl snapshot restore` read.
 *
 * The file is written from one LMDB read transaction (writers go on meanwhile) into a
 * temporary file in the data dir, because every message carries the bytes remaining; then
 * it is sent in 32 KiB chunks with the send queue kept small, on a thread of its own so a
 * slow client never holds a gRPC thread.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/prctl.h>

#include "server/server.h"

#define SNAPSHOT_CHUNK (32 * 1024)
/* Bytes queued on the stream before the sender waits for the client. */
#define SNAPSHOT_QUEUE_MAX (4u << 20)

typedef struct snap_job {
	server_ctx *sj_sc;
	api_stream *sj_st;
} snap_job;

static int write_fd(void *ctx, const void *buf, size_t len)
{
	int fd = *(int *)ctx;
	const char *p = buf;
	while (len > 0) {
		ssize_t n = write(fd, p, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return STORAGE_ERR_IO;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Waits until the client has taken most of what is queued; -1 if the stream is over. */
static int wait_for_room(api_stream *st)
{
	struct timespec ms = {0, 1000000};
	while (api_stream_queued_bytes(st) > SNAPSHOT_QUEUE_MAX) {
		if (api_stream_closed(st))
			return -1;
		nanosleep(&ms, NULL);
	}
	return 0;
}

#define SNAPSHOT_MAX_AUTH 2048
#define SNAPSHOT_MAX_ALARMS 64

int snapshot_write(server_ctx *sc, storage_write_fn write, void *ctx, uint64_t *size)
{
	storage_reader *r;
	storage_arena a;
	storage_arena_init(&a);
	int rc = storage_read_begin(sc->st, &r);
	if (rc)
		return rc;
	storage_etcd_member members[MEMBER_LIST_MAX];
	storage_snapshot_info info;
	memset(&info, 0, sizeof(info));
	info.si_consistent_index = node_applied_index(sc->nd);
	info.si_term = node_term(sc->nd);
	info.si_members = members;
	info.si_n_members = members_export(sc->members, members, MEMBER_LIST_MAX, &a);
	/* Users and roles in etcd's buckets: a restore (keelsonutl's, or etcd's) keeps them.
	 * The alarms too, read in this transaction: etcd's snapshot keeps its alarm bucket and
	 * a member restored from it starts with those alarms raised (etcd 3.4 does so). */
	storage_etcd_entry *extra =
		storage_arena_alloc(&a, (SNAPSHOT_MAX_AUTH + SNAPSHOT_MAX_ALARMS) * sizeof(*extra));
	if (extra == NULL) {
		storage_read_end(r);
		storage_arena_free(&a);
		return STORAGE_ERR_NOMEM;
	}
	info.si_extra = extra;
	info.si_n_extra = auth_export(sc->auth, extra, SNAPSHOT_MAX_AUTH, &a, &info.si_auth_enabled,
				      &info.si_auth_revision);
	info.si_n_extra += alarm_export(r, &a, extra + info.si_n_extra, SNAPSHOT_MAX_ALARMS);
	rc = storage_snapshot_etcd(r, &info, write, ctx, size);
	storage_read_end(r);
	storage_arena_free(&a);
	return rc;
}

/* Writes the backend file into fd; its size in *size. */
static int write_snapshot(server_ctx *sc, int fd, uint64_t *size)
{
	int rc = snapshot_write(sc, write_fd, &fd, size);
	if (rc == 0 && fsync(fd) != 0)
		rc = STORAGE_ERR_IO;
	return rc;
}

static void *snapshot_thread(void *arg)
{
	prctl(PR_SET_NAME, "snapshot-save"); /* names the thread in top -H, perf, gdb */
	snap_job *job = arg;
	server_ctx *sc = job->sj_sc;
	api_stream *st = job->sj_st;
	char path[4200];
	snprintf(path, sizeof(path), "%s/member/snapshot.tmp.XXXXXX", sc->cfg->data_dir);
	int fd = mkstemp(path);
	uint64_t size = 0;
	int rc = fd < 0 ? STORAGE_ERR_IO : write_snapshot(sc, fd, &size);
	if (fd >= 0)
		unlink(path); /* the open fd keeps it until we are done */
	if (rc) {
		log_at(LOG_ERROR, "snapshot failed", "error", storage_strerror(rc), NULL);
		api_stream_finish(st, 2 /* UNKNOWN */, storage_strerror(rc));
	} else {
		storage_sha256 h;
		uint8_t *buf = malloc(SNAPSHOT_CHUNK);
		int ok = buf != NULL && storage_sha256_init(&h) == 0 && lseek(fd, 0, SEEK_SET) == 0;
		uint64_t sent = 0;
		while (ok && sent < size) {
			size_t want = size - sent < SNAPSHOT_CHUNK ? (size_t)(size - sent) : SNAPSHOT_CHUNK;
			ssize_t n = read(fd, buf, want);
			if (n <= 0) {
				ok = 0;
				break;
			}
			storage_sha256_update(&h, buf, (size_t)n);
			sent += (uint64_t)n;
			Etcdserverpb__SnapshotResponse resp = ETCDSERVERPB__SNAPSHOT_RESPONSE__INIT;
			resp.remaining_bytes = size - sent;
			resp.blob.data = buf;
			resp.blob.len = (size_t)n;
			if (api_stream_send_msg(st, &resp.base) < 0 || wait_for_room(st) != 0)
				ok = 0;
		}
		if (buf && ok) {
			/* etcd closes the stream with the digest, for restore to verify. */
			uint8_t sha[32];
			storage_sha256_final(&h, sha);
			Etcdserverpb__SnapshotResponse resp = ETCDSERVERPB__SNAPSHOT_RESPONSE__INIT;
			resp.blob.data = sha;
			resp.blob.len = sizeof(sha);
			api_stream_send_msg(st, &resp.base);
			api_stream_finish(st, 0, NULL);
			char sz[32];
			snprintf(sz, sizeof(sz), "%llu", (unsigned long long)size);
			log_at(LOG_INFO, "sent database snapshot to client", "size-bytes", sz, NULL);
		} else {
			if (buf && sent < size)
				log_at(LOG_WARN, "snapshot stream ended early", NULL);
			api_stream_finish(st, 2, "keelson: snapshot stream failed");
		}
		free(buf);
	}
	if (fd >= 0)
		close(fd);
	api_stream_release(st);
	free(job);
	return NULL;
}

/* etcd's gate of Snapshot: a learner refuses it, and with auth on only root may take one. */
static int snapshot_admitted(server_ctx *sc, api_stream *st)
{
	if (node_is_learner(sc->nd)) {
		api_stream_finish(st, 9 /* FAILED_PRECONDITION */, "etcdserver: rpc not supported for learner");
		return 0;
	}
	size_t len = 0;
	const char *tok = api_stream_metadata(st, "token", &len);
	int err = auth_check_admin(sc->auth, tok, len);
	if (err == 0)
		return 1;
	/* etcd 3.4 hands the auth package's own error back here (maint_admitted's form). */
	char msg[128];
	api_stream_finish(st, auth_error_raw(err, msg, sizeof(msg)), msg);
	return 0;
}

static void snapshot_on_message(void *ctx, api_stream *st, const ProtobufCMessage *msg)
{
	if (!snapshot_admitted(ctx, st))
		return;
	snap_job *job = malloc(sizeof(*job));
	pthread_t t;
	pthread_attr_t attr;
	if (job == NULL) {
		api_stream_finish(st, 8, "keelson: out of memory");
		return;
	}
	job->sj_sc = ctx;
	job->sj_st = st;
	api_stream_retain(st);
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	if (pthread_create(&t, &attr, snapshot_thread, job) != 0) {
		api_stream_release(st);
		free(job);
		api_stream_finish(st, 8, "keelson: cannot start the snapshot");
	}
	pthread_attr_destroy(&attr);
}

static const api_stream_handlers snapshot_handlers = {
	.on_message = snapshot_on_message,
};

int snapshot_register(api_server *as, server_ctx *sc)
{
	return api_server_route_stream(as, "/etcdserverpb.Maintenance/Snapshot", &snapshot_handlers, sc);
}
