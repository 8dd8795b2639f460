/*
 * node_snap.c - state snapshots for followers behind the leader's compacted log.
 *
 * Raft asks for a snapshot (RAFT_MSG_SNAPSHOT) when a follower needs entries the leader has
 * cut away. The message carries only the snapshot point S; the state goes beside it:
 *
 *   leader:   a compacting LMDB copy of the store (storage_copy, in a read transaction on a
 *             thread of its own: writes go on) into <member dir>/snap.send.<id>, then streamed
 *             in FRAME_SNAP_CHUNK frames of SNAP_CHUNK bytes while less than SNAP_WINDOW is
 *             queued to that peer (flow control), then one FRAME_SNAP_DONE with the size, the
 *             SHA-256 of the whole file and the Raft message. The peer connection is in order,
 *             so the follower has every chunk before the message.
 *   follower: chunks are written to <member dir>/snap.recv/data.mdb as they come; DONE checks
 *             size and hash, fsyncs, and only then steps the Raft message. Raft hands the
 *             snapshot back in a Ready, and node_snap_install() first rewrites the copy's member
 *             id, Raft log and hard state as the follower's own (in the copy, durably), then
 *             moves it in place of the store (storage_install: an atomic rename), and reloads
 *             every in-memory view of the store. A crash leaves the old store or the new one.
 *
 * The copy is taken after Raft chose S, so it holds the state at some applied index A >= S.
 * The follower records A as applied; the entries S+1..A that Raft then hands it are already
 * in the state and the apply loop skips them (it applies only indexes above the applied one).
 *
 *   FRAME_SNAP_CHUNK: [3][u64 transfer id][u64 offset][bytes]
 *   FRAME_SNAP_DONE:  [4][u64 transfer id][u64 size][32-byte SHA-256][raft message]
 *
 * A transfer fails (Raft is told, and retries with a new one) when the peer's connection
 * drops or reconnects meanwhile (queued chunks are lost with it), or on a local I/O error.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <sys/prctl.h>

#include "crashpoint/crashpoint.h"
#include "raft/codec.h"
#include "server/node_internal.h"

#define SNAP_CHUNK (1u << 20)
/* Bytes queued to a peer before the pump waits for the connection to drain. */
#define SNAP_WINDOW (4u << 20)
#define SNAP_PUMP_MS 2
/* Transfers at once: each holds a full copy of the store on disk. */
#define SNAP_MAX_SENDS 2
#define SNAP_HDR 17 /* frame type, transfer id, offset or size */

typedef enum send_state { SEND_COPYING, SEND_STREAMING, SEND_FAILED } send_state;

typedef struct snap_send {
	node *ss_node;
	uint64_t ss_to, ss_id;
	uint8_t *ss_msg; /* the encoded Raft message, owned */
	size_t ss_msg_len;
	char ss_path[PATH_MAX];
	int ss_fd;
	send_state ss_state;
	_Atomic int ss_copy_done; /* set by the copy thread */
	int ss_copy_err;          /* written by the copy thread before ss_copy_done */
	int ss_joined;
	pthread_t ss_thread;
	uint64_t ss_size, ss_off;
	uint64_t ss_connects; /* the peer's connection count when streaming began */
	EVP_MD_CTX *ss_sha;
} snap_send;

struct node_snap {
	uv_timer_t ns_pump;
	uv_async_t ns_copied;
	int ns_pumping;
	int ns_open_handles; /* freed once both handles have closed */
	snap_send *ns_sends[SNAP_MAX_SENDS];
	uint64_t ns_next_id;
	char ns_dir[PATH_MAX];
	/* receiving (one transfer at a time, from the leader) */
	uint64_t nr_from, nr_id, nr_off;
	int nr_fd;
	int nr_ready; /* complete and verified, waiting for Raft to hand the snapshot back */
	EVP_MD_CTX *nr_sha;
	char nr_dir[PATH_MAX];  /* <member>/snap.recv: an environment of its own */
	char nr_path[PATH_MAX]; /* its data.mdb, the file received */
};

static void put64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (56 - 8 * i));
}

static uint64_t get64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = v << 8 | p[i];
	return v;
}

static char *hex_id(uint64_t id, char buf[20])
{
	snprintf(buf, 20, "%llx", (unsigned long long)id);
	return buf;
}

/* ---- sending (leader) ---- */

static void *copy_thread(void *arg)
{
	prctl(PR_SET_NAME, "snap-send"); /* names the thread in top -H, perf, gdb */
	snap_send *ss = arg;
	ss->ss_copy_err = storage_copy(ss->ss_node->n_sc->st, ss->ss_fd);
	CRASHPOINT("snap.copied"); /* leader: a whole copy in snap.send.<id>, none of it sent */
	atomic_store(&ss->ss_copy_done, 1);
	uv_async_send(&ss->ss_node->n_snap->ns_copied);
	return NULL;
}

static void send_free(snap_send *ss)
{
	if (!ss->ss_joined)
		pthread_join(ss->ss_thread, NULL);
	if (ss->ss_fd >= 0)
		close(ss->ss_fd);
	unlink(ss->ss_path);
	EVP_MD_CTX_free(ss->ss_sha);
	free(ss->ss_msg);
	free(ss);
}

/* Ends a transfer; Raft hears whether it reached the peer. */
static void send_end(node *n, size_t slot, int ok)
{
	snap_send *ss = n->n_snap->ns_sends[slot];
	n->n_snap->ns_sends[slot] = NULL;
	char id[20];
	if (ok)
		log_at(LOG_INFO, "sent a database snapshot", "to", hex_id(ss->ss_to, id), NULL);
	else
		log_at(LOG_WARN, "failed to send a database snapshot", "to", hex_id(ss->ss_to, id), NULL);
	raft_report_snapshot(n->n_raft, ss->ss_to, ok);
	send_free(ss);
	node_ready_soon(n); /* the probe that follows need not wait for a tick */
}

void node_snap_send(node *n, const struct raft_message *m)
{
	node_snap *ns = n->n_snap;
	size_t slot = SNAP_MAX_SENDS;
	for (size_t i = 0; i < SNAP_MAX_SENDS; i++) {
		if (ns->ns_sends[i] && ns->ns_sends[i]->ss_to == m->to)
			return; /* one transfer per follower; Raft waits for it */
		if (ns->ns_sends[i] == NULL && slot == SNAP_MAX_SENDS)
			slot = i;
	}
	if (slot == SNAP_MAX_SENDS)
		return; /* Raft asks again later */
	snap_send *ss = calloc(1, sizeof(*ss));
	if (ss == NULL)
		return;
	ss->ss_node = n;
	ss->ss_to = m->to;
	ss->ss_id = ++ns->ns_next_id;
	ss->ss_fd = -1;
	ss->ss_joined = 1;
	ss->ss_msg_len = raft_codec_size(m);
	ss->ss_msg = malloc(ss->ss_msg_len);
	size_t used;
	if (ss->ss_msg == NULL || raft_codec_encode(m, ss->ss_msg, ss->ss_msg_len, &used) != 0 ||
	    (ss->ss_sha = EVP_MD_CTX_new()) == NULL || EVP_DigestInit_ex(ss->ss_sha, EVP_sha256(), NULL) != 1 ||
	    snprintf(ss->ss_path, sizeof(ss->ss_path), "%s/snap.send.%llu", ns->ns_dir,
		     (unsigned long long)ss->ss_id) >= (int)sizeof(ss->ss_path)) {
		send_free(ss);
		return;
	}
	ss->ss_msg_len = used;
	ss->ss_fd = open(ss->ss_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (ss->ss_fd < 0) {
		log_at(LOG_WARN, "cannot create a snapshot file", "path", ss->ss_path, "error", strerror(errno), NULL);
		send_free(ss);
		return;
	}
	ns->ns_sends[slot] = ss;
	char id[20];
	log_at(LOG_INFO, "sending a database snapshot", "to", hex_id(m->to, id), NULL);
	if (pthread_create(&ss->ss_thread, NULL, copy_thread, ss) != 0) {
		ss->ss_state = SEND_FAILED;
		uv_async_send(&ns->ns_copied);
		return;
	}
	ss->ss_joined = 0;
}

static void on_pump(uv_timer_t *t);

static void pump_start(node *n)
{
	if (!n->n_snap->ns_pumping) {
		n->n_snap->ns_pumping = 1;
		uv_timer_start(&n->n_snap->ns_pump, on_pump, 0, SNAP_PUMP_MS);
	}
}

/* A copy finished: its transfer starts streaming. */
static void on_copied(uv_async_t *h)
{
	node *n = h->data;
	node_snap *ns = n->n_snap;
	for (size_t i = 0; i < SNAP_MAX_SENDS; i++) {
		snap_send *ss = ns->ns_sends[i];
		if (ss == NULL || ss->ss_state != SEND_COPYING || !atomic_load(&ss->ss_copy_done))
			continue;
		pthread_join(ss->ss_thread, NULL);
		ss->ss_joined = 1;
		off_t size = lseek(ss->ss_fd, 0, SEEK_END);
		peer_stats ps;
		if (ss->ss_copy_err || size <= 0 || peer_get_stats(n->n_peers, ss->ss_to, &ps) != 0 || !ps.ps_connected) {
			ss->ss_state = SEND_FAILED;
		} else {
			ss->ss_size = (uint64_t)size;
			ss->ss_connects = ps.ps_connects;
			ss->ss_state = SEND_STREAMING;
		}
	}
	pump_start(n);
}

/* Streams one transfer as far as its window allows. Returns 1 when it is over (ok or not). */
static int pump_one(node *n, snap_send *ss, int *ok)
{
	static uint8_t chunk[SNAP_HDR + SNAP_CHUNK];
	*ok = 0;
	if (ss->ss_state == SEND_COPYING)
		return 0;
	if (ss->ss_state == SEND_FAILED)
		return 1;
	peer_stats ps;
	if (peer_get_stats(n->n_peers, ss->ss_to, &ps) != 0 || !ps.ps_connected || ps.ps_connects != ss->ss_connects)
		return 1; /* queued chunks went with the connection */
	size_t queued = ps.ps_queued_bytes;
	while (ss->ss_off < ss->ss_size && queued < SNAP_WINDOW) {
		size_t want = ss->ss_size - ss->ss_off < SNAP_CHUNK ? (size_t)(ss->ss_size - ss->ss_off) : SNAP_CHUNK;
		ssize_t got = pread(ss->ss_fd, chunk + SNAP_HDR, want, (off_t)ss->ss_off);
		if (got != (ssize_t)want)
			return 1;
		chunk[0] = FRAME_SNAP_CHUNK;
		put64(chunk + 1, ss->ss_id);
		put64(chunk + 9, ss->ss_off);
		if (EVP_DigestUpdate(ss->ss_sha, chunk + SNAP_HDR, want) != 1 ||
		    peer_send(n->n_peers, ss->ss_to, chunk, SNAP_HDR + want) != 0)
			return 1;
		ss->ss_off += want;
		queued += SNAP_HDR + want;
	}
	if (ss->ss_off < ss->ss_size)
		return 0;
	size_t len = SNAP_HDR + 32 + ss->ss_msg_len;
	uint8_t *done = malloc(len);
	unsigned int hlen = 0;
	if (done == NULL)
		return 1;
	done[0] = FRAME_SNAP_DONE;
	put64(done + 1, ss->ss_id);
	put64(done + 9, ss->ss_size);
	int rc = EVP_DigestFinal_ex(ss->ss_sha, done + SNAP_HDR, &hlen) == 1 && hlen == 32 ? 0 : -1;
	memcpy(done + SNAP_HDR + 32, ss->ss_msg, ss->ss_msg_len);
	if (rc == 0)
		rc = peer_send(n->n_peers, ss->ss_to, done, len);
	free(done);
	*ok = rc == 0;
	return 1;
}

static void on_pump(uv_timer_t *t)
{
	node *n = t->data;
	node_snap *ns = n->n_snap;
	int active = 0;
	for (size_t i = 0; i < SNAP_MAX_SENDS; i++) {
		if (ns->ns_sends[i] == NULL)
			continue;
		int ok;
		if (pump_one(n, ns->ns_sends[i], &ok))
			send_end(n, i, ok);
		else
			active = 1;
	}
	if (!active) {
		uv_timer_stop(&ns->ns_pump);
		ns->ns_pumping = 0;
	}
}

int node_snap_busy(node *n)
{
	for (size_t i = 0; i < SNAP_MAX_SENDS; i++)
		if (n->n_snap->ns_sends[i])
			return 1;
	return 0;
}

void node_snap_peer_down(node *n, uint64_t id)
{
	(void)id;
	/* The pump sees the connection down and ends the transfer outside any Ready. */
	for (size_t i = 0; i < SNAP_MAX_SENDS; i++)
		if (n->n_snap->ns_sends[i])
			pump_start(n);
}

/* ---- receiving (follower) ---- */

/* Removes the receiving directory and what LMDB and storage put beside the data file. */
static void remove_recv_dir(const char *dir)
{
	static const char *const files[] = {"data.mdb", "lock.mdb", "keelson.lock"};
	char path[PATH_MAX];
	for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++)
		if (snprintf(path, sizeof(path), "%s/%s", dir, files[i]) < (int)sizeof(path))
			unlink(path);
	/* A copy from an older Keelson holds its log in LMDB; opening it moved that into a WAL
	 * of the copy's own, which is not this member's log: it goes with the copy. */
	char wal[PATH_MAX];
	if (snprintf(wal, sizeof(wal), "%s/keelson-wal", dir) < (int)sizeof(wal)) {
		DIR *d = opendir(wal);
		struct dirent *de;
		while (d && (de = readdir(d)) != NULL)
			if (de->d_name[0] != '.' && snprintf(path, sizeof(path), "%s/%s", wal, de->d_name) < (int)sizeof(path))
				unlink(path);
		if (d)
			closedir(d);
		rmdir(wal);
	}
	rmdir(dir);
}

static void recv_reset(node_snap *ns)
{
	if (ns->nr_fd >= 0)
		close(ns->nr_fd);
	ns->nr_fd = -1;
	if (ns->nr_id || ns->nr_ready)
		remove_recv_dir(ns->nr_dir);
	ns->nr_from = ns->nr_id = ns->nr_off = 0;
	ns->nr_ready = 0;
}

static int write_all(int fd, const uint8_t *p, size_t len)
{
	while (len > 0) {
		ssize_t w = write(fd, p, len);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		p += w;
		len -= (size_t)w;
	}
	return 0;
}

static void on_chunk(node_snap *ns, uint64_t from, uint64_t id, uint64_t off, const uint8_t *p, size_t len)
{
	if (ns->nr_ready)
		return; /* a verified snapshot waits for Raft's Ready in this loop turn */
	if (from != ns->nr_from || id != ns->nr_id) {
		if (off != 0)
			return; /* the rest of a transfer we gave up on */
		recv_reset(ns);
		remove_recv_dir(ns->nr_dir);
		if (mkdir(ns->nr_dir, 0700) == 0)
			ns->nr_fd = open(ns->nr_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
		if (ns->nr_fd < 0 || EVP_DigestInit_ex(ns->nr_sha, EVP_sha256(), NULL) != 1) {
			log_at(LOG_ERROR, "cannot receive a database snapshot", "path", ns->nr_path, "error",
			       strerror(errno), NULL);
			recv_reset(ns);
			return;
		}
		ns->nr_from = from;
		ns->nr_id = id;
		char hid[20];
		log_at(LOG_INFO, "receiving a database snapshot", "from", hex_id(from, hid), NULL);
	}
	if (ns->nr_fd < 0 || off != ns->nr_off || write_all(ns->nr_fd, p, len) != 0 ||
	    EVP_DigestUpdate(ns->nr_sha, p, len) != 1) {
		log_at(LOG_WARN, "dropped an incomplete database snapshot", NULL);
		recv_reset(ns);
		return;
	}
	ns->nr_off += len;
	CRASHPOINT("snap.recv.chunk"); /* follower: part of the copy in snap.recv, unsynced */
}

int node_snap_on_frame(node *n, uint64_t from, const uint8_t *p, size_t len, struct raft_message *m)
{
	node_snap *ns = n->n_snap;
	if (len < SNAP_HDR)
		return 0;
	uint64_t id = get64(p + 1), v = get64(p + 9);
	if (p[0] == FRAME_SNAP_CHUNK) {
		on_chunk(ns, from, id, v, p + SNAP_HDR, len - SNAP_HDR);
		return 0;
	}
	if (p[0] != FRAME_SNAP_DONE || len < SNAP_HDR + 32 || from != ns->nr_from || id != ns->nr_id ||
	    ns->nr_fd < 0)
		return 0;
	uint8_t sum[32];
	unsigned int hlen = 0;
	int ok = v == ns->nr_off && EVP_DigestFinal_ex(ns->nr_sha, sum, &hlen) == 1 && hlen == 32 &&
		 memcmp(sum, p + SNAP_HDR, 32) == 0;
	if (ok && fsync(ns->nr_fd) != 0)
		ok = 0;
	close(ns->nr_fd);
	ns->nr_fd = -1;
	if (ok && raft_codec_decode(p + SNAP_HDR + 32, len - SNAP_HDR - 32, m) != 0)
		ok = 0;
	if (ok && m->type != RAFT_MSG_SNAPSHOT) {
		raft_codec_free(m);
		ok = 0;
	}
	if (!ok) {
		log_at(LOG_WARN, "refused a database snapshot that fails its size or SHA-256 check", NULL);
		recv_reset(ns);
		return 0;
	}
	ns->nr_ready = 1;
	CRASHPOINT("snap.recv.done"); /* the whole copy verified and synced, Raft not told */
	return 1;
}

void node_snap_after_ready(node *n)
{
	node_snap *ns = n->n_snap;
	if (ns->nr_ready) {
		log_at(LOG_INFO, "dropped a database snapshot Raft did not need", NULL);
		recv_reset(ns);
	}
}

/*
 * The copy holds the sender's member id, Raft log and hard state. They are replaced by this
 * member's own in the received environment itself, durably, BEFORE it is moved in place: a
 * crash at any point then leaves either the old store or the new one with this member's
 * identity and votes (a vote recorded as the sender's could let this member vote twice).
 * Returns the applied index the copy holds.
 */
static int prepare_received(node *n, const struct raft_snapshot *s, const struct raft_hard_state *hs,
			    uint64_t *applied)
{
	server_ctx *sc = n->n_sc;
	node_snap *ns = n->n_snap;
	storage_options so = {0};
	so.so_map_size = sc->quota_bytes + (1ULL << 30); /* as main.c opens the store */
	storage *st;
	int rc = storage_open(ns->nr_dir, &so, &st);
	if (rc)
		return rc;
	storage_stats stats;
	storage_batch *b = NULL;
	if ((rc = storage_stat(st, &stats)) == 0 && stats.st_applied_index < s->meta.index)
		rc = STORAGE_ERR_CORRUPT; /* a copy older than the snapshot point */
	if (rc == 0)
		rc = storage_batch_begin(st, &b);
	uint8_t id[8];
	put64(id, sc->mi.member_id);
	/* The copy's LMDB holds no log (that is in the sender's WAL), only its snapshot point. */
	if (rc == 0)
		rc = storage_batch_log_snapshot(b, s->meta.index, s->meta.term, &s->meta.conf, sizeof(s->meta.conf));
	if (rc == 0)
		rc = storage_batch_meta_put(b, "member_id", id, sizeof(id));
	if (rc == 0)
		rc = storage_batch_commit(b, stats.st_applied_index);
	else if (b)
		storage_batch_abort(b);
	storage_close(st);
	*applied = stats.st_applied_index;
	return rc;
}

uint64_t node_snap_install(node *n, const struct raft_snapshot *s, const struct raft_hard_state *hs)
{
	server_ctx *sc = n->n_sc;
	node_snap *ns = n->n_snap;
	if (!ns->nr_ready) {
		log_at(LOG_FATAL, "raft moved to a snapshot this member has not received", NULL);
		abort();
	}
	/* A copy this member was making as a leader holds the store shared: end it first (the
	 * wait is as long as that copy takes; this member is now a follower far behind). */
	for (size_t i = 0; i < SNAP_MAX_SENDS; i++) {
		if (ns->ns_sends[i]) {
			send_free(ns->ns_sends[i]);
			ns->ns_sends[i] = NULL;
		}
	}
	uint64_t applied = 0;
	int rc = prepare_received(n, s, hs, &applied);
	if (rc == 0)
		CRASHPOINT("snap.rewritten"); /* the copy holds this member's log and identity */
	/* First the log: it starts over at the snapshot point, with this Ready's hard state.
	 * The clear counts only once the store's snapshot point reaches s->meta.index, that is
	 * once the install below commits: a crash in between leaves the old log with the old
	 * store. (Written after the install, a crash in between would leave the new store with
	 * an old log whose stale suffix reading could take as committed.) */
	storage_batch *lb = NULL;
	if (rc == 0)
		rc = storage_batch_begin(sc->st, &lb);
	if (rc == 0)
		rc = storage_batch_log_clear(lb, s->meta.index);
	if (rc == 0)
		rc = storage_batch_log_hard_state(lb, hs->term, hs->vote, hs->commit);
	if (rc == 0)
		rc = storage_batch_commit_log(lb);
	else if (lb)
		storage_batch_abort(lb);
	if (rc == 0)
		CRASHPOINT("snap.logcleared"); /* the clear in the WAL, void until the install */
	if (rc == 0) {
		server_backup_pause(sc->backup); /* a backup's read txn would stall the install */
		rc = storage_install(sc->st, ns->nr_path);
		server_backup_resume(sc->backup);
	}
	if (rc == 0)
		CRASHPOINT("snap.installed"); /* the new store, the WAL's clear in force */
	remove_recv_dir(ns->nr_dir);
	ns->nr_ready = 0;
	ns->nr_from = ns->nr_id = ns->nr_off = 0;
	storage_stats stats;
	if (rc == 0)
		rc = storage_stat(sc->st, &stats);
	if (rc == 0)
		rc = lessor_reload(sc->lessor, sc->cfg, sc->st);
	if (rc == 0)
		rc = alarm_reload(sc->alarms, sc->st);
	if (rc == 0)
		rc = members_reload(sc->members, sc->cfg, sc->st);
	if (rc == 0)
		rc = auth_reload(sc->auth, sc->cfg, sc->st);
	if (rc) {
		/* Raft's log already starts at the snapshot: going on would lose entries. */
		log_at(LOG_FATAL, "cannot install the database snapshot", "error", storage_strerror(rc), NULL);
		abort();
	}
	watch_hub_resync(sc->hub, stats.st_revision);
	char idx[24], rev[24];
	snprintf(idx, sizeof(idx), "%llu", (unsigned long long)applied);
	snprintf(rev, sizeof(rev), "%lld", (long long)stats.st_revision);
	log_at(LOG_INFO, "installed a database snapshot", "applied-index", idx, "revision", rev, NULL);
	return applied;
}

/* ---- set-up ---- */

static void remove_leftovers(const char *dir)
{
	DIR *d = opendir(dir);
	if (d == NULL)
		return;
	struct dirent *e;
	char path[PATH_MAX];
	while ((e = readdir(d)) != NULL) {
		if (strncmp(e->d_name, "snap.send.", 10) == 0 &&
		    snprintf(path, sizeof(path), "%s/%s", dir, e->d_name) < (int)sizeof(path))
			unlink(path);
	}
	closedir(d);
}

int node_snap_init(node *n)
{
	node_snap *ns = calloc(1, sizeof(*ns));
	if (ns == NULL || (ns->nr_sha = EVP_MD_CTX_new()) == NULL) {
		free(ns);
		return STORAGE_ERR_NOMEM;
	}
	ns->nr_fd = -1;
	const char *dir = n->n_sc->cfg->data_dir;
	if (snprintf(ns->ns_dir, sizeof(ns->ns_dir), "%s/member", dir) >= (int)sizeof(ns->ns_dir) ||
	    snprintf(ns->nr_dir, sizeof(ns->nr_dir), "%s/snap.recv", ns->ns_dir) >= (int)sizeof(ns->nr_dir) ||
	    snprintf(ns->nr_path, sizeof(ns->nr_path), "%s/data.mdb", ns->nr_dir) >= (int)sizeof(ns->nr_path)) {
		EVP_MD_CTX_free(ns->nr_sha);
		free(ns);
		return STORAGE_ERR_INVALID;
	}
	remove_leftovers(ns->ns_dir); /* what a crash left half sent or received */
	remove_recv_dir(ns->nr_dir);
	uv_timer_init(&n->n_loop, &ns->ns_pump);
	ns->ns_pump.data = n;
	uv_async_init(&n->n_loop, &ns->ns_copied, on_copied);
	ns->ns_copied.data = n;
	n->n_snap = ns;
	return 0;
}

static void free_on_close(uv_handle_t *h)
{
	node *n = h->data;
	node_snap *ns = n->n_snap;
	if (--ns->ns_open_handles > 0)
		return;
	for (size_t i = 0; i < SNAP_MAX_SENDS; i++)
		if (ns->ns_sends[i])
			send_free(ns->ns_sends[i]);
	recv_reset(ns);
	EVP_MD_CTX_free(ns->nr_sha);
	free(ns);
	n->n_snap = NULL;
}

void node_snap_close(node *n)
{
	/* A copy thread still running would wake a closed handle: wait for it first. */
	for (size_t i = 0; i < SNAP_MAX_SENDS; i++) {
		snap_send *ss = n->n_snap->ns_sends[i];
		if (ss && !ss->ss_joined) {
			pthread_join(ss->ss_thread, NULL);
			ss->ss_joined = 1;
		}
	}
	n->n_snap->ns_open_handles = 2;
	uv_close((uv_handle_t *)&n->n_snap->ns_pump, free_on_close);
	uv_close((uv_handle_t *)&n->n_snap->ns_copied, free_on_close);
}
