/*
 * lease.c - etcd's Lease service and the lessor: which leases exist and when they expire.
 *
 * Grants and revokes are writes: they go through the node loop and storage, and the lessor
 * learns of them once they commit. Keep-alives only move an expiry time in the leader's
 * memory, as in etcd: a follower forwards each one to the leader and answers with the
 * leader's TTL, and asks the leader for TimeToLive too (node_ask, over the peer transport).
 * The node loop asks the lessor every half second which leases have expired, and revokes
 * them through the log like a client's revoke, in bounded batches.
 *
 * Checkpoints (--experimental-enable-lease-checkpoint, as etcd's lessor): every
 * --experimental-lease-checkpoint-interval the leader proposes, through the log, the
 * remaining TTL of each lease longer than the interval, in batches of at most 1000 per
 * entry. Every member records it with the lease (on disk too), and a new leader or a
 * restarted member starts the lease from it instead of from the full TTL, so a long lease
 * is not renewed for free by every leader change. A keep-alive clears the checkpoint. Without
 * the flag nothing is checkpointed and a new leader gives every lease its full TTL.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/rand.h>

#include "server/server.h"

/* etcd's MaxLeaseTTL */
#define LEASE_MAX_TTL 9000000000LL
/* etcd's maxLeaseCheckpointBatchSize: checkpoints per log entry. */
#define LEASE_CHECKPOINT_BATCH 1000
/* Entries of checkpoints proposed per look (every half second), so that a million leases
 * falling due together are checkpointed over seconds, not in one burst. */
#define LEASE_CHECKPOINT_ENTRIES_PER_LOOK 4
/* Table slots one look examines for due checkpoints: the work per look stays bounded however
 * many leases there are; a table of 2^22 slots is covered in 32 looks (16 s). */
#define LEASE_CHECKPOINT_SCAN 131072
/* etcd's defaultLeaseCheckpointInterval */
#define LEASE_CHECKPOINT_DEFAULT_MS (5 * 60 * 1000)

typedef struct lease_entry {
	int64_t le_id; /* 0: empty slot */
	int64_t le_ttl;
	int64_t le_remaining;       /* checkpointed remaining TTL in seconds, 0: none */
	uint64_t le_expiry_ms;
	uint64_t le_checkpoint_ms;  /* when the leader checkpoints it next, 0: never */
	int le_revoking;            /* an expiry revoke is queued */
	int le_clearing;            /* queued in l_clear (each lease at most once) */
} lease_entry;

struct lessor {
	pthread_mutex_t l_mu;
	lease_entry *l_tab; /* open addressing, linear probing; capacity a power of two */
	size_t l_cap, l_n;
	int64_t l_min_ttl;
	uint64_t l_checkpoint_ms;   /* checkpoint interval; 0: checkpoints are off */
	size_t l_scan;              /* where the next look for due checkpoints starts */
	int64_t *l_clear;           /* leases whose checkpoint a keep-alive made stale */
	size_t l_nclear, l_clear_cap;
	/* No lease that is not being revoked expires before this (0: unknown), so that the
	 * leader's look for expired leases skips the table scan while nothing can be due:
	 * renewals only move expiries later, grants and promotes lower it. */
	uint64_t l_no_expiry_before_ms;
};

static uint64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static size_t slot_of(int64_t id, size_t cap)
{
	uint64_t h = (uint64_t)id * 0x9E3779B97F4A7C15ULL;
	return (size_t)(h >> 17) & (cap - 1);
}

static lease_entry *find(lessor *l, int64_t id)
{
	if (l->l_cap == 0)
		return NULL;
	for (size_t i = slot_of(id, l->l_cap);; i = (i + 1) & (l->l_cap - 1)) {
		if (l->l_tab[i].le_id == id)
			return &l->l_tab[i];
		if (l->l_tab[i].le_id == 0)
			return NULL;
	}
}

static int insert(lessor *l, int64_t id, int64_t ttl, uint64_t expiry)
{
	if ((l->l_n + 1) * 2 > l->l_cap) {
		size_t cap = l->l_cap ? l->l_cap * 2 : 1024;
		lease_entry *tab = calloc(cap, sizeof(*tab));
		if (tab == NULL)
			return -1;
		for (size_t i = 0; i < l->l_cap; i++) {
			if (l->l_tab[i].le_id == 0)
				continue;
			size_t j = slot_of(l->l_tab[i].le_id, cap);
			while (tab[j].le_id != 0)
				j = (j + 1) & (cap - 1);
			tab[j] = l->l_tab[i];
		}
		free(l->l_tab);
		l->l_tab = tab;
		l->l_cap = cap;
	}
	lease_entry *e = find(l, id);
	if (e == NULL) {
		size_t i = slot_of(id, l->l_cap);
		while (l->l_tab[i].le_id != 0)
			i = (i + 1) & (l->l_cap - 1);
		e = &l->l_tab[i];
		l->l_n++;
	}
	*e = (lease_entry){.le_id = id, .le_ttl = ttl, .le_expiry_ms = expiry};
	if (expiry < l->l_no_expiry_before_ms)
		l->l_no_expiry_before_ms = expiry;
	return 0;
}

/* Removes with backward shift, so probes never meet a hole that hides a later entry. */
static void erase(lessor *l, int64_t id)
{
	lease_entry *e = find(l, id);
	if (e == NULL)
		return;
	size_t i = (size_t)(e - l->l_tab), mask = l->l_cap - 1;
	l->l_tab[i].le_id = 0;
	l->l_n--;
	for (size_t j = (i + 1) & mask; l->l_tab[j].le_id != 0; j = (j + 1) & mask) {
		size_t home = slot_of(l->l_tab[j].le_id, l->l_cap);
		/* Move j back to i if its home does not lie in (i, j]. */
		if ((j > i && (home <= i || home > j)) || (j < i && (home <= i && home > j))) {
			l->l_tab[i] = l->l_tab[j];
			l->l_tab[j].le_id = 0;
			i = j;
		}
	}
}

/* etcd's RemainingTTL(): the checkpointed TTL if there is one, else the granted TTL. */
static int64_t remaining_ttl(const lease_entry *e)
{
	return e->le_remaining > 0 ? e->le_remaining : e->le_ttl;
}

/* etcd's scheduleCheckpointIfNeeded: only leases that outlive an interval get checkpoints. */
static void schedule_checkpoint(lessor *l, lease_entry *e, int64_t ttl_s, uint64_t now)
{
	if (l->l_checkpoint_ms && (uint64_t)ttl_s * 1000 > l->l_checkpoint_ms)
		e->le_checkpoint_ms = now + l->l_checkpoint_ms;
	else
		e->le_checkpoint_ms = 0;
}

/* A lease under a new leader: its remaining TTL from base on, checkpoints scheduled again. */
static void start_from_remaining(lessor *l, lease_entry *e, uint64_t base, uint64_t now)
{
	e->le_expiry_ms = base + (uint64_t)remaining_ttl(e) * 1000;
	l->l_no_expiry_before_ms = 0;
	e->le_revoking = 0;
	e->le_clearing = 0;
	schedule_checkpoint(l, e, remaining_ttl(e), now);
}

int lessor_start(lessor **out, const config *cfg, storage *st)
{
	lessor *l = calloc(1, sizeof(*l));
	if (l == NULL)
		return STORAGE_ERR_NOMEM;
	pthread_mutex_init(&l->l_mu, NULL);
	/* etcd: the minimum TTL is 1.5 election timeouts, so a lease outlives a leader change. */
	uint64_t ticks = cfg->heartbeat_ms ? cfg->election_ms / cfg->heartbeat_ms : 10;
	uint64_t min_ms = (3 * ticks / 2) * cfg->heartbeat_ms;
	l->l_min_ttl = (int64_t)((min_ms + 999) / 1000);
	if (l->l_min_ttl < 1)
		l->l_min_ttl = 1;
	if (cfg->lease_checkpoint)
		l->l_checkpoint_ms = cfg->lease_checkpoint_interval_ms ? cfg->lease_checkpoint_interval_ms
								       : LEASE_CHECKPOINT_DEFAULT_MS;

	storage_reader *r;
	storage_arena a;
	storage_arena_init(&a);
	int rc = storage_read_begin(st, &r);
	if (rc == 0) {
		int64_t *ids, *ttls, *rems;
		size_t n;
		rc = storage_read_leases(r, &a, &ids, &ttls, &rems, &n);
		/* A new leader (here: a starting member) gives every lease its remaining TTL (the
		 * checkpointed one, else the full TTL) plus an election timeout, as etcd's lessor
		 * Promote does. */
		uint64_t now = now_ms(), base = now + cfg->election_ms;
		for (size_t i = 0; rc == 0 && i < n; i++) {
			if (insert(l, ids[i], ttls[i], 0) != 0) {
				rc = STORAGE_ERR_NOMEM;
				break;
			}
			lease_entry *e = find(l, ids[i]);
			e->le_remaining = rems[i];
			start_from_remaining(l, e, base, now);
		}
		storage_read_end(r);
	}
	storage_arena_free(&a);
	if (rc) {
		lessor_free(l);
		return rc;
	}
	*out = l;
	return 0;
}

void lessor_free(lessor *l)
{
	if (l == NULL)
		return;
	pthread_mutex_destroy(&l->l_mu);
	free(l->l_tab);
	free(l->l_clear);
	free(l);
}

int lessor_reload(lessor *l, const config *cfg, storage *st)
{
	lessor *fresh;
	int rc = lessor_start(&fresh, cfg, st);
	if (rc)
		return rc;
	pthread_mutex_lock(&l->l_mu);
	lease_entry *tab = l->l_tab;
	size_t cap = l->l_cap, cnt = l->l_n;
	l->l_tab = fresh->l_tab;
	l->l_cap = fresh->l_cap;
	l->l_n = fresh->l_n;
	/* Every expiry changed: the bound and the scan restart, queued clears are void. */
	l->l_no_expiry_before_ms = 0;
	l->l_scan = 0;
	l->l_nclear = 0;
	pthread_mutex_unlock(&l->l_mu);
	fresh->l_tab = tab;
	fresh->l_cap = cap;
	fresh->l_n = cnt;
	lessor_free(fresh);
	return 0;
}

void lessor_granted(lessor *l, int64_t id, int64_t ttl)
{
	uint64_t now = now_ms();
	pthread_mutex_lock(&l->l_mu);
	if (insert(l, id, ttl, now + (uint64_t)ttl * 1000) == 0)
		schedule_checkpoint(l, find(l, id), ttl, now);
	pthread_mutex_unlock(&l->l_mu);
}

void lessor_revoked(lessor *l, int64_t id)
{
	pthread_mutex_lock(&l->l_mu);
	erase(l, id);
	pthread_mutex_unlock(&l->l_mu);
}

/* Only the leader renews (followers forward keep-alives to it): the lease must not have
 * expired, since its expiry is the leader's to judge. */
int64_t lessor_renew(lessor *l, int64_t id)
{
	int64_t ttl = 0;
	uint64_t now = now_ms();
	pthread_mutex_lock(&l->l_mu);
	lease_entry *e = find(l, id);
	if (e && !e->le_revoking && e->le_expiry_ms > now) {
		e->le_expiry_ms = now + (uint64_t)e->le_ttl * 1000;
		ttl = e->le_ttl;
		/* etcd clears a checkpoint on renewal (one entry per lease at most, until the
		 * next checkpoint), so that a new leader does not cut the renewed lease short.
		 * Also with checkpoints off: a data dir may hold them from a run with them on. */
		if (e->le_remaining > 0 && !e->le_clearing) {
			if (l->l_nclear == l->l_clear_cap) {
				size_t cap = l->l_clear_cap ? l->l_clear_cap * 2 : 64;
				int64_t *v = realloc(l->l_clear, cap * sizeof(*v));
				if (v) {
					l->l_clear = v;
					l->l_clear_cap = cap;
				}
			}
			if (l->l_nclear < l->l_clear_cap) {
				l->l_clear[l->l_nclear++] = id;
				e->le_clearing = 1;
			}
		}
	}
	pthread_mutex_unlock(&l->l_mu);
	return ttl;
}

void lessor_promote(lessor *l, uint64_t extend_ms)
{
	uint64_t now = now_ms(), base = now + extend_ms;
	pthread_mutex_lock(&l->l_mu);
	for (size_t i = 0; i < l->l_cap; i++) {
		lease_entry *e = &l->l_tab[i];
		if (e->le_id != 0)
			start_from_remaining(l, e, base, now);
	}
	/* Clears queued under an earlier leadership may never have been proposed. */
	l->l_nclear = 0;
	pthread_mutex_unlock(&l->l_mu);
}

void lessor_checkpointed(lessor *l, const Etcdserverpb__LeaseCheckpointRequest *req)
{
	pthread_mutex_lock(&l->l_mu);
	for (size_t i = 0; i < req->n_checkpoints; i++) {
		lease_entry *e = find(l, req->checkpoints[i]->id);
		if (e == NULL)
			continue;
		/* Only the remaining TTL: a later promote turns it into an expiry, as in etcd. */
		e->le_remaining = req->checkpoints[i]->remaining_ttl > 0 ? req->checkpoints[i]->remaining_ttl : 0;
	}
	pthread_mutex_unlock(&l->l_mu);
}

size_t lessor_due_checkpoints(lessor *l, int64_t *ids, int64_t *remaining, size_t max)
{
	size_t n = 0;
	uint64_t now = now_ms();
	pthread_mutex_lock(&l->l_mu);
	if (l->l_cap == 0) {
		pthread_mutex_unlock(&l->l_mu);
		return 0;
	}
	/* First the clears keep-alives asked for. */
	while (n < max && l->l_nclear > 0) {
		int64_t id = l->l_clear[--l->l_nclear];
		lease_entry *e = find(l, id);
		if (e == NULL || !e->le_clearing)
			continue;
		e->le_clearing = 0;
		ids[n] = id;
		remaining[n++] = 0;
	}
	size_t scanned = 0, mask = l->l_cap - 1;
	if (l->l_scan > mask)
		l->l_scan = 0;
	for (; l->l_checkpoint_ms && n < max && scanned < LEASE_CHECKPOINT_SCAN && scanned < l->l_cap;
	     scanned++) {
		lease_entry *e = &l->l_tab[l->l_scan];
		l->l_scan = (l->l_scan + 1) & mask;
		if (e->le_id == 0 || e->le_checkpoint_ms == 0 || e->le_checkpoint_ms > now)
			continue;
		if (e->le_revoking || e->le_expiry_ms <= now) {
			e->le_checkpoint_ms = 0; /* expiring: nothing left to keep */
			continue;
		}
		/* etcd's findDueScheduledCheckpoints: the remaining TTL rounded up; a lease
		 * renewed since has nothing to record this time. */
		int64_t rem = (int64_t)((e->le_expiry_ms - now + 999) / 1000);
		if (rem >= e->le_ttl) {
			schedule_checkpoint(l, e, e->le_ttl, now);
			continue;
		}
		ids[n] = e->le_id;
		remaining[n++] = rem;
		schedule_checkpoint(l, e, rem, now);
	}
	pthread_mutex_unlock(&l->l_mu);
	return n;
}

void lessor_propose_checkpoints(server_ctx *sc)
{
	int64_t ids[LEASE_CHECKPOINT_BATCH], rems[LEASE_CHECKPOINT_BATCH];
	for (int k = 0; k < LEASE_CHECKPOINT_ENTRIES_PER_LOOK; k++) {
		size_t n = lessor_due_checkpoints(sc->lessor, ids, rems, LEASE_CHECKPOINT_BATCH);
		if (n == 0)
			return;
		/* The node frees the request with protobuf_c_message_free_unpacked(): every
		 * piece is malloc'd as protobuf-c's own unpacking would. */
		Etcdserverpb__LeaseCheckpointRequest *req = malloc(sizeof(*req));
		Etcdserverpb__LeaseCheckpoint **cps = calloc(n, sizeof(*cps));
		if (req == NULL || cps == NULL) {
			free(req);
			free(cps);
			return; /* the leases are due again at the next interval */
		}
		etcdserverpb__lease_checkpoint_request__init(req);
		req->checkpoints = cps;
		for (size_t i = 0; i < n; i++) {
			Etcdserverpb__LeaseCheckpoint *c = malloc(sizeof(*c));
			if (c == NULL)
				break;
			etcdserverpb__lease_checkpoint__init(c);
			c->id = ids[i];
			c->remaining_ttl = rems[i];
			cps[req->n_checkpoints++] = c;
		}
		node_submit(sc->nd, NODE_LEASE_CHECKPOINT, NULL, &req->base);
		if (n < LEASE_CHECKPOINT_BATCH)
			return;
	}
}

size_t lessor_expired(lessor *l, int64_t *ids, size_t max)
{
	size_t n = 0, i;
	uint64_t now = now_ms(), next = UINT64_MAX;
	pthread_mutex_lock(&l->l_mu);
	if (l->l_no_expiry_before_ms > now) {
		pthread_mutex_unlock(&l->l_mu);
		return 0;
	}
	for (i = 0; i < l->l_cap && n < max; i++) {
		lease_entry *e = &l->l_tab[i];
		if (e->le_id == 0 || e->le_revoking)
			continue;
		if (e->le_expiry_ms <= now) {
			e->le_revoking = 1;
			ids[n++] = e->le_id;
		} else if (e->le_expiry_ms < next) {
			next = e->le_expiry_ms;
		}
	}
	/* A scan cut short has not seen every lease: look again next time. */
	l->l_no_expiry_before_ms = i == l->l_cap ? next : 0;
	pthread_mutex_unlock(&l->l_mu);
	return n;
}

void lessor_revoke_failed(lessor *l, int64_t id)
{
	pthread_mutex_lock(&l->l_mu);
	lease_entry *e = find(l, id);
	if (e) {
		e->le_revoking = 0;
		l->l_no_expiry_before_ms = 0;
	}
	pthread_mutex_unlock(&l->l_mu);
}

/* ---- the Lease service ---- */

static int64_t current_revision(server_ctx *sc)
{
	return storage_current_revision(sc->st);
}

static void lease_grant(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	if (!call_admitted(sc, call, 0, 0))
		return;
	/* The call owns its decoded request; the grant is settled here, before the log, so
	 * that every member would apply the same id and TTL. */
	Etcdserverpb__LeaseGrantRequest *req = (Etcdserverpb__LeaseGrantRequest *)msg;
	if (req->ttl > LEASE_MAX_TTL) {
		api_call_fail_msg(call, 11 /* OUT_OF_RANGE */, "etcdserver: too large lease TTL");
		return;
	}
	if (req->ttl < sc->lessor->l_min_ttl)
		req->ttl = sc->lessor->l_min_ttl;
	if (alarm_quota_exceeded(sc, api_call_request_size(call))) {
		api_call_fail(call, API_ERR_NO_SPACE);
		return;
	}
	if (req->id == 0) {
		/* A random positive id not in use; etcd's ids are as opaque. */
		do {
			uint64_t v = 0;
			if (RAND_bytes((unsigned char *)&v, sizeof(v)) != 1)
				v = now_ms() * 6364136223846793005ULL;
			req->id = (int64_t)(v >> 1);
			pthread_mutex_lock(&sc->lessor->l_mu);
			int used = find(sc->lessor, req->id) != NULL;
			pthread_mutex_unlock(&sc->lessor->l_mu);
			if (used)
				req->id = 0;
		} while (req->id == 0);
	}
	node_submit(sc->nd, NODE_LEASE_GRANT, call, msg);
}

static void lease_revoke(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	if (!call_admitted(sc, call, 0, 0))
		return;
	node_submit(sc->nd, NODE_LEASE_REVOKE, call, msg);
}

/*
 * The leader's LeaseTimeToLive (etcd's primary lessor Lookup): fills resp's id, TTLs and
 * keys (pointing into a, and valid while r is open), not its header. Returns 0,
 * STORAGE_ERR_LEASE_NOT_FOUND or another storage error.
 */
static int time_to_live_local(server_ctx *sc, storage_reader *r, storage_arena *a,
			      const Etcdserverpb__LeaseTimeToLiveRequest *req, Etcdserverpb__LeaseTimeToLiveResponse *resp)
{
	int64_t ttl = 0;
	ProtobufCBinaryData *keys = NULL;
	size_t nkeys = 0;
	int rc = storage_read_lease(r, req->id, &ttl, a, req->keys ? &keys : NULL, &nkeys);
	if (rc)
		return rc;
	uint64_t now = now_ms();
	pthread_mutex_lock(&sc->lessor->l_mu);
	lease_entry *e = find(sc->lessor, req->id);
	int64_t remaining = e && e->le_expiry_ms > now ? (int64_t)((e->le_expiry_ms - now) / 1000) : 0;
	pthread_mutex_unlock(&sc->lessor->l_mu);
	resp->id = req->id;
	resp->ttl = remaining;
	resp->grantedttl = ttl;
	resp->keys = keys;
	resp->n_keys = nkeys;
	return 0;
}

/* etcd answers an unknown lease with TTL -1, not an error. */
static void reply_ttl_not_found(server_ctx *sc, api_call *call, int64_t id)
{
	Etcdserverpb__LeaseTimeToLiveResponse resp = ETCDSERVERPB__LEASE_TIME_TO_LIVE_RESPONSE__INIT;
	Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
	server_fill_header(sc, &h);
	h.revision = current_revision(sc);
	resp.header = &h;
	resp.id = id;
	resp.ttl = -1;
	api_call_reply(call, &resp.base);
}

/* Ends a forwarded lease request that got no answer with etcd's error for it. */
static int ask_failure(int status, const uint8_t *body, size_t len, const char **msg, char *buf, size_t buflen)
{
	api_error e;
	switch (status) {
	case NODE_ASK_ENOLEADER:
		e = API_ERR_NO_LEADER;
		break;
	case NODE_ASK_ETIMEDOUT:
		e = API_ERR_TIMEOUT;
		break;
	case NODE_ASK_ESTOPPED:
		e = API_ERR_STOPPED;
		break;
	case NODE_ANS_ERROR: {
		int code = node_ans_error_decode(body, len, buf, buflen);
		if (code >= 0) {
			*msg = buf;
			return code;
		}
		e = API_ERR_INTERNAL;
		break;
	}
	default:
		e = API_ERR_INTERNAL;
	}
	return api_error_status(e, msg);
}

typedef struct ttl_forward {
	server_ctx *tf_sc;
	api_call *tf_call;
	int64_t tf_id;
} ttl_forward;

/* The leader's answer to a follower's LeaseTimeToLive (on the node loop). */
static void ttl_forwarded(void *ctx, int status, const uint8_t *body, size_t len)
{
	ttl_forward *f = ctx;
	server_ctx *sc = f->tf_sc;
	api_call *call = f->tf_call;
	int64_t id = f->tf_id;
	free(f);
	if (status == NODE_ANS_LEASE_NOT_FOUND) {
		reply_ttl_not_found(sc, call, id);
		return;
	}
	if (status == NODE_ANS_OK) {
		Etcdserverpb__LeaseTimeToLiveResponse *resp =
			etcdserverpb__lease_time_to_live_response__unpack(NULL, len, body);
		if (resp) {
			/* etcd's LeaseServer fills the header with the serving member's own. */
			Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
			server_fill_header(sc, &h);
			h.revision = current_revision(sc);
			Etcdserverpb__ResponseHeader *theirs = resp->header;
			resp->header = &h;
			api_call_reply(call, &resp->base);
			resp->header = theirs;
			etcdserverpb__lease_time_to_live_response__free_unpacked(resp, NULL);
			return;
		}
		status = -100; /* an answer that does not decode */
	}
	char buf[256];
	const char *msg;
	int code = ask_failure(status, body, len, &msg, buf, sizeof(buf));
	api_call_fail_msg(call, code, msg);
}

static void lease_time_to_live(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	if (!call_admitted(sc, call, 0, 0))
		return;
	const Etcdserverpb__LeaseTimeToLiveRequest *req = (const Etcdserverpb__LeaseTimeToLiveRequest *)msg;
	if (node_leader(sc->nd) != sc->mi.member_id) {
		/* etcd: only the leader's lessor knows the remaining TTL; ask it (etcd's
		 * /leases/internal over peer HTTP), within the call's deadline. */
		ttl_forward *f = malloc(sizeof(*f));
		size_t n = etcdserverpb__lease_time_to_live_request__get_packed_size(req);
		uint8_t *buf = malloc(n ? n : 1);
		if (f == NULL || buf == NULL) {
			free(f);
			free(buf);
			api_call_fail_msg(call, 8 /* RESOURCE_EXHAUSTED */, "keelson: out of memory");
			return;
		}
		etcdserverpb__lease_time_to_live_request__pack(req, buf);
		f->tf_sc = sc;
		f->tf_call = call;
		f->tf_id = req->id;
		uint64_t timeout = node_request_timeout_ms(sc->nd);
		int64_t left = api_call_remaining_ms(call);
		if (left >= 0 && (uint64_t)left < timeout)
			timeout = left > 0 ? (uint64_t)left : 1;
		node_ask(sc->nd, 0, NODE_ASK_LEASE_TTL, buf, n, timeout, ttl_forwarded, f);
		free(buf);
		return;
	}
	storage_reader *r;
	storage_arena a;
	storage_arena_init(&a);
	int rc = storage_read_begin(sc->st, &r);
	if (rc) {
		server_fail_storage(call, rc);
		return;
	}
	Etcdserverpb__LeaseTimeToLiveResponse resp = ETCDSERVERPB__LEASE_TIME_TO_LIVE_RESPONSE__INIT;
	Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
	rc = time_to_live_local(sc, r, &a, req, &resp);
	if (rc == STORAGE_ERR_LEASE_NOT_FOUND) {
		reply_ttl_not_found(sc, call, req->id);
	} else if (rc) {
		server_fail_storage(call, rc);
	} else {
		server_fill_header(sc, &h);
		h.revision = current_revision(sc);
		resp.header = &h;
		api_call_reply(call, &resp.base);
	}
	storage_read_end(r);
	storage_arena_free(&a);
}

/* Packs msg into a new buffer for a peer's answer; NODE_ANS_OK, or -1 out of memory. */
static int pack_answer(const ProtobufCMessage *msg, uint8_t **out, size_t *outlen)
{
	size_t n = protobuf_c_message_get_packed_size(msg);
	*out = malloc(n ? n : 1);
	if (*out == NULL)
		return -1;
	*outlen = protobuf_c_message_pack(msg, *out);
	return NODE_ANS_OK;
}

int lease_serve_peer(server_ctx *sc, int leader, int method, const uint8_t *body, size_t len, uint8_t **out,
		     size_t *outlen)
{
	*out = NULL;
	*outlen = 0;
	if (method == NODE_ASK_LEASE_RENEW) {
		Etcdserverpb__LeaseKeepAliveRequest *req = etcdserverpb__lease_keep_alive_request__unpack(NULL, len, body);
		if (req == NULL)
			return NODE_ANS_BAD_REQUEST;
		int64_t id = req->id;
		etcdserverpb__lease_keep_alive_request__free_unpacked(req, NULL);
		if (!leader)
			return NODE_ANS_NOT_LEADER;
		/* etcd's leasehttp handler: the primary lessor's Renew. */
		int64_t ttl = lessor_renew(sc->lessor, id);
		if (ttl <= 0)
			return NODE_ANS_LEASE_NOT_FOUND;
		Etcdserverpb__LeaseKeepAliveResponse resp = ETCDSERVERPB__LEASE_KEEP_ALIVE_RESPONSE__INIT;
		resp.id = id;
		resp.ttl = ttl;
		int st = pack_answer(&resp.base, out, outlen);
		return st == NODE_ANS_OK ? st : node_ans_error(STORAGE_ERR_NOMEM, out, outlen);
	}
	if (method != NODE_ASK_LEASE_TTL)
		return NODE_ANS_BAD_REQUEST;
	Etcdserverpb__LeaseTimeToLiveRequest *req = etcdserverpb__lease_time_to_live_request__unpack(NULL, len, body);
	if (req == NULL)
		return NODE_ANS_BAD_REQUEST;
	int st;
	if (!leader) {
		st = NODE_ANS_NOT_LEADER;
	} else {
		storage_reader *r;
		storage_arena a;
		storage_arena_init(&a);
		int rc = storage_read_begin(sc->st, &r);
		if (rc == 0) {
			Etcdserverpb__LeaseTimeToLiveResponse resp = ETCDSERVERPB__LEASE_TIME_TO_LIVE_RESPONSE__INIT;
			rc = time_to_live_local(sc, r, &a, req, &resp);
			if (rc == 0 && pack_answer(&resp.base, out, outlen) != NODE_ANS_OK)
				rc = STORAGE_ERR_NOMEM;
			storage_read_end(r);
		}
		storage_arena_free(&a);
		st = rc == 0 ? NODE_ANS_OK
		     : rc == STORAGE_ERR_LEASE_NOT_FOUND ? NODE_ANS_LEASE_NOT_FOUND
							 : node_ans_error(rc, out, outlen);
	}
	etcdserverpb__lease_time_to_live_request__free_unpacked(req, NULL);
	return st;
}

static void lease_leases(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	if (!call_admitted(sc, call, 0, 0))
		return;
	storage_reader *r;
	storage_arena a;
	storage_arena_init(&a);
	int rc = storage_read_begin(sc->st, &r);
	if (rc) {
		server_fail_storage(call, rc);
		return;
	}
	int64_t *ids, *ttls;
	size_t n;
	rc = storage_read_leases(r, &a, &ids, &ttls, NULL, &n);
	Etcdserverpb__LeaseStatus *sts = NULL;
	Etcdserverpb__LeaseStatus **ptrs = NULL;
	if (rc == 0 && n > 0) {
		sts = storage_arena_alloc(&a, n * sizeof(*sts));
		ptrs = storage_arena_alloc(&a, n * sizeof(*ptrs));
		if (sts == NULL || ptrs == NULL)
			rc = STORAGE_ERR_NOMEM;
	}
	if (rc == 0) {
		Etcdserverpb__LeaseLeasesResponse resp = ETCDSERVERPB__LEASE_LEASES_RESPONSE__INIT;
		Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
		server_fill_header(sc, &h);
		h.revision = current_revision(sc);
		resp.header = &h;
		for (size_t i = 0; i < n; i++) {
			Etcdserverpb__LeaseStatus init = ETCDSERVERPB__LEASE_STATUS__INIT;
			sts[i] = init;
			sts[i].id = ids[i];
			ptrs[i] = &sts[i];
		}
		resp.leases = ptrs;
		resp.n_leases = n;
		api_call_reply(call, &resp.base);
	} else {
		server_fail_storage(call, rc);
	}
	storage_read_end(r);
	storage_arena_free(&a);
}

/*
 * A keep-alive stream's renewals that a follower forwarded to the leader: when the client
 * half-closes (python-etcd3's refresh sends one request and closes its side), the call ends
 * only after their answers went out, as etcd answers each request before it reads the next.
 */
typedef struct keepalive_stream {
	pthread_mutex_t ks_mu;
	int ks_inflight;    /* forwarded, not yet answered */
	int ks_half_closed; /* the client stopped sending: finish after the last answer */
	int ks_closed;      /* on_close ran: the last answer frees this */
} keepalive_stream;

static void keepalive_on_open(void *ctx, api_stream *st)
{
	(void)ctx;
	keepalive_stream *ks = calloc(1, sizeof(*ks));
	if (ks)
		pthread_mutex_init(&ks->ks_mu, NULL);
	api_stream_set_data(st, ks); /* NULL: no forwarding on this stream (out of memory) */
}

static void keepalive_stream_free(keepalive_stream *ks)
{
	pthread_mutex_destroy(&ks->ks_mu);
	free(ks);
}

/* One forwarded renewal answered: finishes a half-closed call, frees a closed one's state. */
static void keepalive_stream_answered(api_stream *st, keepalive_stream *ks)
{
	pthread_mutex_lock(&ks->ks_mu);
	int last = --ks->ks_inflight == 0;
	int finish = last && ks->ks_half_closed && !ks->ks_closed;
	int dispose = last && ks->ks_closed;
	pthread_mutex_unlock(&ks->ks_mu);
	if (finish)
		api_stream_finish(st, 0, NULL);
	if (dispose)
		keepalive_stream_free(ks);
}

static void keepalive_on_close(void *ctx, api_stream *st)
{
	(void)ctx;
	keepalive_stream *ks = api_stream_data(st);
	if (ks == NULL)
		return;
	pthread_mutex_lock(&ks->ks_mu);
	ks->ks_closed = 1;
	int dispose = ks->ks_inflight == 0;
	pthread_mutex_unlock(&ks->ks_mu);
	if (dispose)
		keepalive_stream_free(ks);
}

typedef struct keepalive_forward {
	server_ctx *kf_sc;
	api_stream *kf_st; /* a reference of its own */
	int64_t kf_id;
} keepalive_forward;

static void keepalive_reply(server_ctx *sc, api_stream *st, int64_t id, int64_t ttl)
{
	Etcdserverpb__LeaseKeepAliveResponse resp = ETCDSERVERPB__LEASE_KEEP_ALIVE_RESPONSE__INIT;
	Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
	server_fill_header(sc, &h);
	h.revision = current_revision(sc);
	resp.header = &h;
	resp.id = id;
	resp.ttl = ttl;
	api_stream_send_msg(st, &resp.base);
}

/* The leader's answer to a keep-alive this follower forwarded (on the node loop). */
static void keepalive_forwarded(void *ctx, int status, const uint8_t *body, size_t len)
{
	keepalive_forward *f = ctx;
	if (status == NODE_ANS_OK) {
		Etcdserverpb__LeaseKeepAliveResponse *resp = etcdserverpb__lease_keep_alive_response__unpack(NULL, len, body);
		if (resp) {
			keepalive_reply(f->kf_sc, f->kf_st, f->kf_id, resp->ttl);
			etcdserverpb__lease_keep_alive_response__free_unpacked(resp, NULL);
		} else {
			status = -100;
		}
	} else if (status == NODE_ANS_LEASE_NOT_FOUND) {
		keepalive_reply(f->kf_sc, f->kf_st, f->kf_id, 0); /* etcd: TTL 0, the stream goes on */
	}
	if (status != NODE_ANS_OK && status != NODE_ANS_LEASE_NOT_FOUND) {
		/* etcd's LeaseServer returns LeaseRenew's error: the stream ends with it. */
		char buf[256];
		const char *msg;
		int code = ask_failure(status, body, len, &msg, buf, sizeof(buf));
		api_stream_finish(f->kf_st, code, msg);
	}
	keepalive_stream_answered(f->kf_st, api_stream_data(f->kf_st));
	api_stream_release(f->kf_st);
	free(f);
}

static void keepalive_on_message(void *ctx, api_stream *st, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	const Etcdserverpb__LeaseKeepAliveRequest *req = (const Etcdserverpb__LeaseKeepAliveRequest *)msg;
	size_t toklen = 0;
	const char *tok = api_stream_metadata(st, "token", &toklen);
	int aerr = auth_check_user(sc->auth, tok, toklen);
	if (aerr) {
		const char *m;
		int code = auth_error_status(aerr, &m);
		api_stream_finish(st, code, m);
		return;
	}
	if (node_leader(sc->nd) == sc->mi.member_id) {
		keepalive_reply(sc, st, req->id, lessor_renew(sc->lessor, req->id));
		return;
	}
	/* etcd's EtcdServer.LeaseRenew: a follower's lessor is not primary; the renewal goes to
	 * the leader (over peer HTTP in etcd, the request channel here) and the client gets the
	 * leader's TTL, or etcd's error once no leader answered within the request timeout. */
	keepalive_stream *ks = api_stream_data(st);
	keepalive_forward *f = ks ? malloc(sizeof(*f)) : NULL;
	Etcdserverpb__LeaseKeepAliveRequest fwd = ETCDSERVERPB__LEASE_KEEP_ALIVE_REQUEST__INIT;
	fwd.id = req->id;
	uint8_t buf[16];
	size_t n = etcdserverpb__lease_keep_alive_request__pack(&fwd, buf);
	if (f == NULL) {
		api_stream_finish(st, 8 /* RESOURCE_EXHAUSTED */, "keelson: out of memory");
		return;
	}
	pthread_mutex_lock(&ks->ks_mu);
	ks->ks_inflight++;
	pthread_mutex_unlock(&ks->ks_mu);
	api_stream_retain(st);
	f->kf_sc = sc;
	f->kf_st = st;
	f->kf_id = req->id;
	node_ask(sc->nd, 0, NODE_ASK_LEASE_RENEW, buf, n, 0, keepalive_forwarded, f);
}

/* etcd ends the keep-alive call with OK when the client stops sending. */
static void keepalive_on_half_close(void *ctx, api_stream *st)
{
	(void)ctx;
	keepalive_stream *ks = api_stream_data(st);
	int finish = 1;
	if (ks) {
		pthread_mutex_lock(&ks->ks_mu);
		ks->ks_half_closed = 1;
		finish = ks->ks_inflight == 0; /* else the last answer finishes it */
		pthread_mutex_unlock(&ks->ks_mu);
	}
	if (finish)
		api_stream_finish(st, 0, NULL);
}

static const api_stream_handlers keepalive_handlers = {
	.on_open = keepalive_on_open,
	.on_message = keepalive_on_message,
	.on_close = keepalive_on_close,
	.on_half_close = keepalive_on_half_close,
};

int lease_register(api_server *as, server_ctx *sc)
{
	static const struct {
		const char *path;
		api_unary_fn fn;
	} routes[] = {
		{"/etcdserverpb.Lease/LeaseGrant", lease_grant},
		{"/etcdserverpb.Lease/LeaseRevoke", lease_revoke},
		{"/etcdserverpb.Lease/LeaseTimeToLive", lease_time_to_live},
		{"/etcdserverpb.Lease/LeaseLeases", lease_leases},
	};
	for (size_t i = 0; i < sizeof(routes) / sizeof(routes[0]); i++) {
		int rc = api_server_route(as, routes[i].path, routes[i].fn, sc);
		if (rc)
			return rc;
	}
	return api_server_route_stream(as, "/etcdserverpb.Lease/LeaseKeepAlive", &keepalive_handlers, sc);
}
