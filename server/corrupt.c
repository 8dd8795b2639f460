/*
 * corrupt.c - etcd's corruption checks (etcdserver/corrupt.go of etcd 3.4).
 *
 * Members that applied the same history hold the same HashKV at every revision, so a member
 * whose data went bad on disk shows up as a hash that differs from its peers' at the same
 * revision and the same compacted revision.
 *
 * - The initial check (--experimental-initial-corrupt-check) runs before the member serves
 *   anything: it asks every peer for HashKV at this member's revision and refuses to start
 *   on a mismatch ("<id> found data inconsistency with peers"). Peers that do not answer
 *   are logged and skipped, as etcd does.
 * - The periodic check (--experimental-corrupt-check-time) runs on its own thread: every
 *   interval the leader hashes its store, asks every follower for HashKV at that revision,
 *   and raises the CORRUPT alarm through Raft for a member that differs (etcd's rules in
 *   check_hash_kv()). With CORRUPT active every member refuses writes with
 *   "etcdserver: corrupt cluster" (apply.c).
 *
 * etcd asks its peers over their peer URLs; Keelson's peer transport carries Raft frames
 * only, so the peers are asked over their client URLs (as published in the member list)
 * with Maintenance.HashKV on gRPC core's C client API, one call at a time, each bounded by
 * etcd's request timeout.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "server/server.h"

#define METHOD_HASHKV "/etcdserverpb.Maintenance/HashKV"

/* One peer's answer to HashKV (etcd's peerHashKVResp). */
typedef struct peer_hash {
	uint64_t ph_id;          /* the member asked */
	char ph_url[256];        /* the client URL that answered, or the last one tried */
	int ph_ok;               /* 1: the fields below hold the answer */
	int ph_code;             /* failed: the gRPC status, -1 if no status came back */
	char ph_err[256];        /* failed: why */
	uint64_t ph_member;      /* header.member_id of the answer */
	int64_t ph_revision;     /* header.revision of the answer */
	int64_t ph_compact_rev;
	uint32_t ph_hash;
} peer_hash;

/* etcd's ReqTimeout: 5s plus two election timeouts. */
static uint64_t request_timeout_ms(const server_ctx *sc)
{
	return 5000 + 2 * sc->cfg->election_ms;
}

/* A PEM file's text, or NULL if it cannot be read or is empty. */
static char *read_pem(const char *path)
{
	char *text = server_read_file(path);
	if (text && text[0] == '\0') {
		free(text);
		text = NULL;
	}
	return text;
}

/* Credentials for a peer's client URL: TLS with this member's client-side files for
 * https (the CA of --trusted-ca-file, the --cert-file/--key-file pair), else plaintext. */
static grpc_channel_credentials *peer_credentials(const config *cfg, int tls)
{
	if (!tls)
		return grpc_insecure_credentials_create();
	char *root = cfg->trusted_ca_file[0] ? read_pem(cfg->trusted_ca_file) : NULL;
	char *cert = cfg->cert_file[0] ? read_pem(cfg->cert_file) : NULL;
	char *key = cfg->key_file[0] ? read_pem(cfg->key_file) : NULL;
	grpc_ssl_pem_key_cert_pair kp = {key, cert};
	grpc_channel_credentials *c = grpc_ssl_credentials_create(root, cert && key ? &kp : NULL, NULL, NULL);
	free(root);
	free(cert);
	if (key) {
		memset(key, 0, strlen(key)); /* a private key should not linger in freed memory */
		free(key);
	}
	return c;
}

/*
 * One unary Maintenance.HashKV to url at rev, bounded by timeout_ms. Fills p (ph_ok, or
 * ph_code and ph_err). The call fails fast when the peer cannot be reached.
 */
static void hash_kv_call(const config *cfg, const char *url, int64_t rev, uint64_t timeout_ms, peer_hash *p)
{
	const char *target = url;
	char unix_target[300];
	int tls = 0;
	if (strncmp(url, "http://", 7) == 0) {
		target = url + 7;
	} else if (strncmp(url, "https://", 8) == 0) {
		target = url + 8;
		tls = 1;
	} else if (strncmp(url, "unix://", 7) == 0 || strncmp(url, "unixs://", 8) == 0) {
		/* etcd's unix client URLs: gRPC names the socket "unix:path". */
		tls = url[4] == 's';
		snprintf(unix_target, sizeof(unix_target), "unix:%s", url + (tls ? 8 : 7));
		target = unix_target;
	}
	snprintf(p->ph_url, sizeof(p->ph_url), "%s", url);
	p->ph_ok = 0;
	p->ph_code = -1;

	grpc_arg args[] = {
		{GRPC_ARG_INTEGER, GRPC_ARG_ENABLE_RETRIES, {.integer = 0}},
		{GRPC_ARG_INTEGER, GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, {.integer = 1}},
	};
	grpc_channel_args ca = {sizeof(args) / sizeof(args[0]), args};
	grpc_channel_credentials *creds = peer_credentials(cfg, tls);
	if (creds == NULL) {
		snprintf(p->ph_err, sizeof(p->ph_err), "cannot make TLS credentials");
		return;
	}
	grpc_channel *ch = grpc_channel_create(target, creds, &ca);
	grpc_channel_credentials_release(creds);

	Etcdserverpb__HashKVRequest req = ETCDSERVERPB__HASH_KVREQUEST__INIT;
	req.revision = rev;
	uint8_t buf[32];
	size_t n = etcdserverpb__hash_kvrequest__pack(&req, buf);
	grpc_slice sl = grpc_slice_from_copied_buffer((const char *)buf, n);
	grpc_byte_buffer *send = grpc_raw_byte_buffer_create(&sl, 1), *recv = NULL;
	grpc_slice_unref(sl);
	grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
	gpr_timespec deadline = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
					     gpr_time_from_millis((int64_t)timeout_ms, GPR_TIMESPAN));
	grpc_call *call = grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq,
						   grpc_slice_from_static_string(METHOD_HASHKV), NULL, deadline,
						   NULL);
	grpc_metadata_array md_init, md_trail;
	grpc_metadata_array_init(&md_init);
	grpc_metadata_array_init(&md_trail);
	grpc_status_code code = GRPC_STATUS_UNKNOWN;
	grpc_slice details = grpc_empty_slice();
	grpc_op ops[6];
	memset(ops, 0, sizeof(ops));
	ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
	ops[1].op = GRPC_OP_SEND_MESSAGE;
	ops[1].data.send_message.send_message = send;
	ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
	ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
	ops[3].data.recv_initial_metadata.recv_initial_metadata = &md_init;
	ops[4].op = GRPC_OP_RECV_MESSAGE;
	ops[4].data.recv_message.recv_message = &recv;
	ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
	ops[5].data.recv_status_on_client.trailing_metadata = &md_trail;
	ops[5].data.recv_status_on_client.status = &code;
	ops[5].data.recv_status_on_client.status_details = &details;
	int ok = 0;
	if (call != NULL && grpc_call_start_batch(call, ops, 6, (void *)1, NULL) == GRPC_CALL_OK) {
		/* The call's deadline bounds this wait; the extra second covers its delivery. */
		gpr_timespec wait = gpr_time_add(deadline, gpr_time_from_millis(1000, GPR_TIMESPAN));
		grpc_event ev = grpc_completion_queue_pluck(cq, (void *)1, wait, NULL);
		if (ev.type == GRPC_OP_COMPLETE) {
			ok = ev.success;
		} else {
			/* Not expected past the deadline; cancel and collect the batch anyway, so
			 * that nothing it points at (our stack) is used after we return. */
			grpc_call_cancel(call, NULL);
			grpc_completion_queue_pluck(cq, (void *)1, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
		}
	}
	if (!ok) {
		snprintf(p->ph_err, sizeof(p->ph_err), "the call failed");
	} else if (code != GRPC_STATUS_OK) {
		char *d = grpc_slice_to_c_string(details);
		p->ph_code = (int)code;
		snprintf(p->ph_err, sizeof(p->ph_err), "rpc error: code = %d desc = %s", (int)code, d);
		gpr_free(d);
	} else if (recv == NULL) {
		snprintf(p->ph_err, sizeof(p->ph_err), "no response message");
	} else {
		grpc_byte_buffer_reader rd;
		grpc_slice all = grpc_empty_slice();
		if (grpc_byte_buffer_reader_init(&rd, recv)) {
			all = grpc_byte_buffer_reader_readall(&rd);
			grpc_byte_buffer_reader_destroy(&rd);
		}
		Etcdserverpb__HashKVResponse *m =
			etcdserverpb__hash_kvresponse__unpack(NULL, GRPC_SLICE_LENGTH(all), GRPC_SLICE_START_PTR(all));
		grpc_slice_unref(all);
		if (m == NULL) {
			snprintf(p->ph_err, sizeof(p->ph_err), "the response did not decode");
		} else {
			p->ph_ok = 1;
			p->ph_code = 0;
			p->ph_hash = m->hash;
			p->ph_compact_rev = m->compact_revision;
			p->ph_member = m->header ? m->header->member_id : 0;
			p->ph_revision = m->header ? m->header->revision : 0;
			etcdserverpb__hash_kvresponse__free_unpacked(m, NULL);
		}
	}
	if (recv)
		grpc_byte_buffer_destroy(recv);
	grpc_byte_buffer_destroy(send);
	grpc_slice_unref(details);
	grpc_metadata_array_destroy(&md_init);
	grpc_metadata_array_destroy(&md_trail);
	if (call)
		grpc_call_unref(call);
	/* The one batch has been collected above, so the queue is empty. */
	grpc_completion_queue_shutdown(cq);
	grpc_completion_queue_destroy(cq);
	grpc_channel_destroy(ch);
}

/*
 * etcd's getPeerHashKVs: HashKV at rev from every other member with client URLs, trying
 * its URLs in turn until one answers. Fills up to max entries of out; returns how many.
 */
static size_t peer_hash_kvs(server_ctx *sc, int64_t rev, peer_hash *out, size_t max)
{
	storage_etcd_member ms[MEMBER_LIST_MAX];
	storage_arena a;
	storage_arena_init(&a);
	size_t nm = members_export(sc->members, ms, MEMBER_LIST_MAX, &a);
	size_t n = 0;
	char local[32];
	snprintf(local, sizeof(local), "%" PRIx64, sc->mi.member_id);
	for (size_t i = 0; i < nm && n < max; i++) {
		if (ms[i].em_id == sc->mi.member_id || ms[i].em_n_client_urls == 0)
			continue;
		peer_hash *p = &out[n++];
		memset(p, 0, sizeof(*p));
		p->ph_id = ms[i].em_id;
		for (size_t k = 0; k < ms[i].em_n_client_urls; k++) {
			hash_kv_call(sc->cfg, ms[i].em_client_urls[k], rev, request_timeout_ms(sc), p);
			if (p->ph_ok)
				break;
			char rs[32];
			snprintf(rs, sizeof(rs), "%" PRId64, rev);
			log_at(LOG_WARN, "failed hash kv request", "local-member-id", local, "requested-revision", rs,
			       "remote-peer-endpoint", p->ph_url, "error", p->ph_err, NULL);
		}
	}
	storage_arena_free(&a);
	return n;
}

/* This member's HashKV at its current revision: hash, revision and compacted revision
 * (-1 if never compacted, as etcd). */
static int local_hash(server_ctx *sc, uint32_t *hash, int64_t *rev, int64_t *compact_rev)
{
	storage_reader *r;
	int rc = storage_read_begin(sc->st, &r);
	if (rc)
		return rc;
	rc = storage_hash_kv(r, 0, hash, rev, compact_rev);
	storage_read_end(r);
	return rc;
}

int corrupt_check_initial(server_ctx *sc)
{
	char local[32], timeout[32];
	snprintf(local, sizeof(local), "%" PRIx64, sc->mi.member_id);
	snprintf(timeout, sizeof(timeout), "%" PRIu64 "ms", request_timeout_ms(sc));
	log_at(LOG_INFO, "starting initial corruption check", "local-member-id", local, "timeout", timeout, NULL);

	uint32_t h;
	int64_t rev, crev;
	int rc = local_hash(sc, &h, &rev, &crev);
	if (rc) {
		char err[160];
		snprintf(err, sizeof(err), "%s failed to fetch hash (%s)", local, storage_strerror(rc));
		log_at(LOG_FATAL, "discovery failed", "error", err, NULL);
		return -1;
	}
	peer_hash peers[MEMBER_LIST_MAX];
	grpc_init();
	size_t n = peer_hash_kvs(sc, rev, peers, MEMBER_LIST_MAX);
	grpc_shutdown();

	int mismatch = 0;
	for (size_t i = 0; i < n; i++) {
		peer_hash *p = &peers[i];
		char lrev[32], lcrev[32], lh[16], pid[32], prev[32], pcrev[32], ph[16];
		snprintf(lrev, sizeof(lrev), "%" PRId64, rev);
		snprintf(lcrev, sizeof(lcrev), "%" PRId64, crev);
		snprintf(lh, sizeof(lh), "%" PRIu32, h);
		if (p->ph_ok) {
			if (p->ph_hash == h)
				continue;
			snprintf(pid, sizeof(pid), "%" PRIx64, p->ph_member);
			snprintf(prev, sizeof(prev), "%" PRId64, p->ph_revision);
			snprintf(pcrev, sizeof(pcrev), "%" PRId64, p->ph_compact_rev);
			snprintf(ph, sizeof(ph), "%" PRIu32, p->ph_hash);
			/* Only the same compacted revision makes the hashes comparable. */
			int same = p->ph_compact_rev == crev;
			mismatch += same;
			log_at(LOG_WARN,
			       same ? "found different hash values from remote peer"
				    : "found different compact revision values from remote peer",
			       "local-member-id", local, "local-member-revision", lrev, "local-member-compact-revision",
			       lcrev, "local-member-hash", lh, "remote-peer-id", pid, "remote-peer-endpoints", p->ph_url,
			       "remote-peer-revision", prev, "remote-peer-compact-revision", pcrev, "remote-peer-hash",
			       ph, NULL);
			continue;
		}
		snprintf(pid, sizeof(pid), "%" PRIx64, p->ph_id);
		if (p->ph_code == GRPC_STATUS_OUT_OF_RANGE && strstr(p->ph_err, "future revision"))
			log_at(LOG_WARN, "cannot fetch hash from slow remote peer", "local-member-id", local,
			       "local-member-revision", lrev, "remote-peer-id", pid, "remote-peer-endpoints",
			       p->ph_url, "error", p->ph_err, NULL);
		else if (p->ph_code == GRPC_STATUS_OUT_OF_RANGE && strstr(p->ph_err, "compacted"))
			log_at(LOG_WARN, "cannot fetch hash from remote peer; local member is behind", "local-member-id",
			       local, "local-member-revision", lrev, "remote-peer-id", pid, "remote-peer-endpoints",
			       p->ph_url, "error", p->ph_err, NULL);
	}
	if (mismatch > 0) {
		char err[96];
		snprintf(err, sizeof(err), "%s found data inconsistency with peers", local);
		log_at(LOG_WARN, "checkInitialHashKV failed", "error", err, NULL);
		log_at(LOG_FATAL, "discovery failed", "error", err, NULL);
		return -1;
	}
	log_at(LOG_INFO, "initial corruption checking passed; no corruption", "local-member-id", local, NULL);
	return 0;
}

/* ---- the periodic check ---- */

struct corrupt_monitor {
	server_ctx *cm_sc;
	pthread_t cm_thread;
	pthread_mutex_t cm_mu;
	pthread_cond_t cm_cond; /* signalled by corrupt_monitor_stop() */
	int cm_stop;            /* under cm_mu */
};

static uint64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Sleeps up to ms or until stopped; returns whether the monitor is stopping. */
static int monitor_wait(corrupt_monitor *m, uint64_t ms)
{
	struct timespec until;
	clock_gettime(CLOCK_MONOTONIC, &until);
	until.tv_sec += (time_t)(ms / 1000);
	until.tv_nsec += (long)(ms % 1000) * 1000000L;
	if (until.tv_nsec >= 1000000000L) {
		until.tv_sec++;
		until.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&m->cm_mu);
	while (!m->cm_stop && pthread_cond_timedwait(&m->cm_cond, &m->cm_mu, &until) != ETIMEDOUT)
		;
	int stop = m->cm_stop;
	pthread_mutex_unlock(&m->cm_mu);
	return stop;
}

/*
 * etcd's linearizableReadNotify, for the leader: everything committed when the peers
 * answered is applied here. The leader's log holds every committed entry, so waiting for
 * its last index covers them. Returns 0, or -1 after etcd's request timeout or a stop.
 */
static int wait_applied(corrupt_monitor *m)
{
	server_ctx *sc = m->cm_sc;
	uint64_t target = node_last_index(sc->nd);
	uint64_t deadline = now_ms() + request_timeout_ms(sc);
	while (node_applied_index(sc->nd) < target) {
		if (now_ms() >= deadline || node_leader(sc->nd) != sc->mi.member_id)
			return -1;
		if (monitor_wait(m, 10))
			return -1;
	}
	return 0;
}

/* Proposes CORRUPT for member id through Raft, as any other alarm. */
static void raise_corrupt(server_ctx *sc, uint64_t id)
{
	Etcdserverpb__AlarmRequest *req = malloc(sizeof(*req));
	if (req == NULL)
		return;
	etcdserverpb__alarm_request__init(req);
	req->action = ETCDSERVERPB__ALARM_REQUEST__ALARM_ACTION__ACTIVATE;
	req->memberid = id;
	req->alarm = ETCDSERVERPB__ALARM_TYPE__CORRUPT;
	/* No call: the node owns and frees req (the same internal path as NOSPACE). */
	node_submit(sc->nd, NODE_ALARM, NULL, &req->base);
}

/* etcd's checkHashKV, run by the leader. Returns 0, or -1 when the check could not run. */
static int check_hash_kv(corrupt_monitor *m)
{
	server_ctx *sc = m->cm_sc;
	uint32_t h, h2;
	int64_t rev, crev, rev2, crev2;
	int rc = local_hash(sc, &h, &rev, &crev);
	if (rc) {
		log_at(LOG_WARN, "failed to check hash KV", "error", storage_strerror(rc), NULL);
		return -1;
	}
	peer_hash peers[MEMBER_LIST_MAX];
	size_t n = peer_hash_kvs(sc, rev, peers, MEMBER_LIST_MAX);
	if (wait_applied(m) != 0) {
		log_at(LOG_WARN, "failed to check hash KV", "error", "etcdserver: request timed out", NULL);
		return -1;
	}
	rc = local_hash(sc, &h2, &rev2, &crev2);
	if (rc) {
		log_at(LOG_WARN, "failed to check hash KV", "error", storage_strerror(rc), NULL);
		return -1;
	}

	/* etcd raises at most one alarm a pass: the first member found at fault. */
	uint64_t culprit = 0;
	char a[32], b[32], c[32], d[32], id[32];
	if (h2 != h && rev2 == rev && crev == crev2) {
		/* The leader's own store changed under the same revision. */
		snprintf(a, sizeof(a), "%" PRId64, rev);
		snprintf(b, sizeof(b), "%" PRIu32, h);
		snprintf(c, sizeof(c), "%" PRIu32, h2);
		log_at(LOG_WARN, "found hash mismatch", "revision-1", a, "hash-1", b, "revision-2", a, "hash-2", c, NULL);
		culprit = sc->mi.member_id;
	}
	for (size_t i = 0; i < n && culprit == 0; i++) {
		peer_hash *p = &peers[i];
		if (!p->ph_ok)
			continue;
		if (p->ph_member == 0) /* an answer without a header: the member we asked */
			p->ph_member = p->ph_id;
		snprintf(id, sizeof(id), "%" PRIx64, p->ph_member);
		if (p->ph_revision > rev2) {
			/* A follower cannot be ahead of what the leader has applied. */
			snprintf(a, sizeof(a), "%" PRId64, rev2);
			snprintf(b, sizeof(b), "%" PRId64, p->ph_revision);
			log_at(LOG_WARN, "revision from follower must be less than or equal to leader's",
			       "leader-revision", a, "follower-revision", b, "follower-peer-id", id, NULL);
			culprit = p->ph_member;
		} else if (p->ph_compact_rev > crev2) {
			snprintf(a, sizeof(a), "%" PRId64, crev2);
			snprintf(b, sizeof(b), "%" PRId64, p->ph_compact_rev);
			log_at(LOG_WARN, "compact revision from follower must be less than or equal to leader's",
			       "leader-compact-revision", a, "follower-compact-revision", b, "follower-peer-id", id,
			       NULL);
			culprit = p->ph_member;
		} else if (p->ph_compact_rev == crev && p->ph_hash != h) {
			snprintf(a, sizeof(a), "%" PRId64, crev2);
			snprintf(b, sizeof(b), "%" PRIu32, h);
			snprintf(c, sizeof(c), "%" PRId64, p->ph_compact_rev);
			snprintf(d, sizeof(d), "%" PRIu32, p->ph_hash);
			log_at(LOG_WARN, "same compact revision then hashes must match", "leader-compact-revision", a,
			       "leader-hash", b, "follower-compact-revision", c, "follower-hash", d, "follower-peer-id",
			       id, NULL);
			culprit = p->ph_member;
		}
	}
	if (culprit != 0)
		raise_corrupt(sc, culprit);
	return 0;
}

static void *monitor_main(void *arg)
{
	corrupt_monitor *m = arg;
	server_ctx *sc = m->cm_sc;
	/* gRPC's client side is set up once for the thread's life. */
	grpc_init();
	while (!monitor_wait(m, sc->cfg->corrupt_check_ms)) {
		if (node_leader(sc->nd) != sc->mi.member_id)
			continue;
		check_hash_kv(m);
	}
	grpc_shutdown();
	return NULL;
}

int corrupt_monitor_start(corrupt_monitor **out, server_ctx *sc)
{
	*out = NULL;
	if (sc->cfg->corrupt_check_ms == 0)
		return 0;
	corrupt_monitor *m = calloc(1, sizeof(*m));
	if (m == NULL)
		return STORAGE_ERR_NOMEM;
	m->cm_sc = sc;
	pthread_mutex_init(&m->cm_mu, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&m->cm_cond, &ca);
	pthread_condattr_destroy(&ca);
	if (pthread_create(&m->cm_thread, NULL, monitor_main, m) != 0) {
		pthread_cond_destroy(&m->cm_cond);
		pthread_mutex_destroy(&m->cm_mu);
		free(m);
		return STORAGE_ERR_NOMEM;
	}
	char local[32], interval[32];
	snprintf(local, sizeof(local), "%" PRIx64, sc->mi.member_id);
	snprintf(interval, sizeof(interval), "%" PRIu64 "ms", sc->cfg->corrupt_check_ms);
	log_at(LOG_INFO, "enabled corruption checking", "local-member-id", local, "interval", interval, NULL);
	*out = m;
	return 0;
}

void corrupt_monitor_stop(corrupt_monitor *m)
{
	if (m == NULL)
		return;
	pthread_mutex_lock(&m->cm_mu);
	m->cm_stop = 1;
	pthread_cond_signal(&m->cm_cond);
	pthread_mutex_unlock(&m->cm_mu);
	/* A check in progress ends within one request timeout per peer. */
	pthread_join(m->cm_thread, NULL);
	pthread_cond_destroy(&m->cm_cond);
	pthread_mutex_destroy(&m->cm_mu);
	free(m);
}
