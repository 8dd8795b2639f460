/*
 * lease_test.c - the lessor's expiry and checkpoint logic, on a fake monotonic clock.
 *
 * lease.c is compiled into this test with clock_gettime() replaced, so that time is an
 * input: every expiry and checkpoint below happens at an exact millisecond. The services'
 * neighbours (node, auth, alarms) are stubs; node_submit() records what the lessor proposes.
 */
#include <stdint.h>
#include <time.h>

static uint64_t fake_now_ms = 1000000;

static int fake_clock_gettime(clockid_t id, struct timespec *ts)
{
	(void)id;
	ts->tv_sec = (time_t)(fake_now_ms / 1000);
	ts->tv_nsec = (long)(fake_now_ms % 1000) * 1000000;
	return 0;
}

#define clock_gettime fake_clock_gettime
#include "server/lease.c"
#undef clock_gettime

#include "storage/testutil.h" /* CHECK, CHECK_EQ, t_tmpdir */

/* ---- stubs of lease.c's neighbours ---- */

static Etcdserverpb__LeaseCheckpointRequest *submitted[64];
static size_t n_submitted;

void node_submit(node *n, node_op op, api_call *call, const ProtobufCMessage *msg)
{
	(void)n;
	(void)call;
	CHECK_EQ(op, NODE_LEASE_CHECKPOINT);
	if (n_submitted < 64)
		submitted[n_submitted++] = (Etcdserverpb__LeaseCheckpointRequest *)msg;
	else
		protobuf_c_message_free_unpacked((ProtobufCMessage *)msg, NULL);
}

static void clear_submitted(void)
{
	for (size_t i = 0; i < n_submitted; i++)
		protobuf_c_message_free_unpacked(&submitted[i]->base, NULL);
	n_submitted = 0;
}

int call_admitted(server_ctx *sc, api_call *call, int learner_ok, int admin) { return 0; }
int alarm_quota_exceeded(struct server_ctx *sc, size_t request_bytes) { return 0; }
void server_fail_storage(api_call *call, int storage_err) {}
void server_fill_header(server_ctx *sc, Etcdserverpb__ResponseHeader *h) {}
int auth_check_user(auth_store *as, const char *tok, size_t toklen) { return 0; }
int auth_error_status(int err, const char **msg) { return -1; }
uint64_t node_leader(node *n) { return 0; }
void node_ask(node *n, uint64_t to, int method, const void *body, size_t len, uint64_t timeout_ms,
	      node_ask_cb cb, void *ctx) { cb(ctx, NODE_ASK_ESTOPPED, NULL, 0); }
uint64_t node_request_timeout_ms(node *n) { return 7000; }
int node_ans_error(int storage_err, uint8_t **out, size_t *outlen) { *out = NULL; *outlen = 0; return NODE_ANS_ERROR; }
int node_ans_error_decode(const uint8_t *body, size_t len, char *msg, size_t msglen) { return -1; }

/* ---- helpers ---- */

static config test_config(int checkpoint, uint64_t interval_ms)
{
	config c;
	memset(&c, 0, sizeof(c));
	c.heartbeat_ms = 100;
	c.election_ms = 1000;
	c.lease_checkpoint = checkpoint;
	c.lease_checkpoint_interval_ms = interval_ms;
	return c;
}

static storage *empty_storage(const char *name)
{
	storage *st;
	char *dir = t_tmpdir(name);
	CHECK_EQ(storage_open(dir, NULL, &st), 0);
	free(dir);
	return st;
}

static uint64_t expiry_of(lessor *l, int64_t id)
{
	lease_entry *e = find(l, id);
	return e ? e->le_expiry_ms : 0;
}

static void checkpointed(lessor *l, int64_t id, int64_t remaining)
{
	Etcdserverpb__LeaseCheckpoint c = ETCDSERVERPB__LEASE_CHECKPOINT__INIT, *cs[] = {&c};
	Etcdserverpb__LeaseCheckpointRequest r = ETCDSERVERPB__LEASE_CHECKPOINT_REQUEST__INIT;
	c.id = id;
	c.remaining_ttl = remaining;
	r.checkpoints = cs;
	r.n_checkpoints = 1;
	lessor_checkpointed(l, &r);
}

/* ---- tests ---- */

/* Checkpoints fall due one interval after the grant, hold the remaining TTL rounded up, and
 * come again every interval; leases no longer than the interval never get one. */
static void test_schedule(void)
{
	storage *st = empty_storage("lease-schedule");
	config c = test_config(1, 10000);
	lessor *l;
	CHECK_EQ(lessor_start(&l, &c, st), 0);
	int64_t ids[8], rem[8];
	lessor_granted(l, 1, 60);
	lessor_granted(l, 2, 10); /* not longer than the interval */
	lessor_granted(l, 3, 11);
	fake_now_ms += 9999;
	CHECK_EQ(lessor_due_checkpoints(l, ids, rem, 8), 0);
	fake_now_ms += 2; /* 10.001 s after the grant: 49.999 s left, recorded as 50 */
	size_t n = lessor_due_checkpoints(l, ids, rem, 8);
	CHECK_EQ(n, 2);
	for (size_t i = 0; i < n; i++) {
		CHECK(ids[i] == 1 || ids[i] == 3);
		CHECK_EQ(rem[i], ids[i] == 1 ? 50 : 1);
	}
	CHECK_EQ(lessor_due_checkpoints(l, ids, rem, 8), 0); /* rescheduled */
	fake_now_ms += 500;
	CHECK_EQ(lessor_due_checkpoints(l, ids, rem, 8), 0);
	fake_now_ms += 9500;
	/* lease 3 expired meanwhile (its checkpoint said 1 s: no new one); lease 1 has 40 s */
	n = lessor_due_checkpoints(l, ids, rem, 8);
	CHECK_EQ(n, 1);
	CHECK(ids[0] == 1 && rem[0] == 40);
	/* A lease renewed since its last checkpoint has nothing to record, but stays scheduled. */
	CHECK_EQ(lessor_renew(l, 1), 60);
	fake_now_ms += 10000;
	CHECK_EQ(lessor_due_checkpoints(l, ids, rem, 8), 1);
	CHECK(ids[0] == 1 && rem[0] == 50);
	lessor_free(l);
	storage_close(st);
}

/* A new leader starts each lease from its checkpoint (or its full TTL) plus the extension. */
static void test_promote(void)
{
	storage *st = empty_storage("lease-promote");
	config c = test_config(1, 5000);
	lessor *l;
	CHECK_EQ(lessor_start(&l, &c, st), 0);
	lessor_granted(l, 7, 100);
	lessor_granted(l, 8, 100);
	fake_now_ms += 30000;
	checkpointed(l, 7, 70);
	checkpointed(l, 999, 5); /* unknown: ignored */
	lessor_promote(l, 1000);
	CHECK_EQ(expiry_of(l, 7), fake_now_ms + 1000 + 70000);
	CHECK_EQ(expiry_of(l, 8), fake_now_ms + 1000 + 100000);
	/* A checkpoint of 0 clears it again. */
	checkpointed(l, 7, 0);
	lessor_promote(l, 1000);
	CHECK_EQ(expiry_of(l, 7), fake_now_ms + 1000 + 100000);
	lessor_free(l);
	storage_close(st);
}

/* A keep-alive of a checkpointed lease asks once for a clearing checkpoint (etcd's Renew),
 * also with checkpoints off; a promote forgets clears it may never have proposed. */
static void test_clear_on_renew(void)
{
	for (int on = 0; on < 2; on++) {
		storage *st = empty_storage(on ? "lease-clear-on" : "lease-clear-off");
		config c = test_config(on, 60000);
		lessor *l;
		CHECK_EQ(lessor_start(&l, &c, st), 0);
		int64_t ids[8], rem[8];
		lessor_granted(l, 5, 30);
		CHECK_EQ(lessor_renew(l, 5), 30);
		CHECK_EQ(lessor_due_checkpoints(l, ids, rem, 8), 0); /* nothing to clear */
		checkpointed(l, 5, 12);
		CHECK_EQ(lessor_renew(l, 5), 30);
		CHECK_EQ(lessor_renew(l, 5), 30);
		CHECK_EQ(lessor_due_checkpoints(l, ids, rem, 8), 1);
		CHECK(ids[0] == 5 && rem[0] == 0);
		CHECK_EQ(lessor_due_checkpoints(l, ids, rem, 8), 0);
		checkpointed(l, 5, 0);
		CHECK_EQ(lessor_renew(l, 5), 30);
		CHECK_EQ(lessor_due_checkpoints(l, ids, rem, 8), 0);
		/* queued, then a leader change: the new leader starts from the checkpoint */
		checkpointed(l, 5, 9);
		CHECK_EQ(lessor_renew(l, 5), 30);
		lessor_promote(l, 0);
		CHECK_EQ(lessor_due_checkpoints(l, ids, rem, 8), 0);
		CHECK_EQ(expiry_of(l, 5), fake_now_ms + 9000);
		lessor_free(l);
		storage_close(st);
	}
}

/* Batches: at most max per call, at most 1000 per proposed entry, 4 entries per look, and a
 * bounded slice of the table examined per call. */
static void test_bounds(void)
{
	storage *st = empty_storage("lease-bounds");
	config c = test_config(1, 1000);
	lessor *l;
	CHECK_EQ(lessor_start(&l, &c, st), 0);
	const size_t N = 100000; /* a table of 262144 slots: two slices */
	for (size_t i = 1; i <= N; i++)
		lessor_granted(l, (int64_t)i, 3600);
	fake_now_ms += 2000;
	server_ctx sc;
	memset(&sc, 0, sizeof(sc));
	sc.lessor = l;
	size_t total = 0, looks = 0;
	while (looks < 100) {
		clear_submitted();
		lessor_propose_checkpoints(&sc);
		looks++;
		CHECK(n_submitted <= LEASE_CHECKPOINT_ENTRIES_PER_LOOK);
		size_t in_look = 0;
		for (size_t i = 0; i < n_submitted; i++) {
			CHECK(submitted[i]->n_checkpoints <= LEASE_CHECKPOINT_BATCH);
			in_look += submitted[i]->n_checkpoints;
			for (size_t j = 0; j < submitted[i]->n_checkpoints; j++)
				CHECK_EQ(submitted[i]->checkpoints[j]->remaining_ttl, 3598);
		}
		total += in_look;
		if (in_look == 0)
			break;
	}
	clear_submitted();
	CHECK_EQ(total, N);
	CHECK(looks >= N / (LEASE_CHECKPOINT_BATCH * LEASE_CHECKPOINT_ENTRIES_PER_LOOK));
	/* the scan slice alone bounds a call, whatever max is */
	int64_t *ids = malloc(N * sizeof(int64_t)), *rem = malloc(N * sizeof(int64_t));
	fake_now_ms += 1000;
	size_t first = lessor_due_checkpoints(l, ids, rem, N);
	size_t second = lessor_due_checkpoints(l, ids, rem, N);
	CHECK(first > 0 && first < N);
	CHECK_EQ(first + second, N);
	free(ids);
	free(rem);
	lessor_free(l);
	storage_close(st);
}

/* Expired leases are neither checkpointed nor renewed, and come out of lessor_expired once. */
static void test_expiry(void)
{
	storage *st = empty_storage("lease-expiry");
	config c = test_config(1, 1000);
	lessor *l;
	CHECK_EQ(lessor_start(&l, &c, st), 0);
	lessor_granted(l, 11, 5);
	lessor_granted(l, 12, 50);
	fake_now_ms += 5000;
	int64_t ids[8], rem[8];
	CHECK_EQ(lessor_due_checkpoints(l, ids, rem, 8), 1);
	CHECK_EQ(ids[0], 12);
	CHECK_EQ(lessor_renew(l, 11), 0);
	CHECK_EQ(lessor_expired(l, ids, 8), 1);
	CHECK_EQ(ids[0], 11);
	CHECK_EQ(lessor_expired(l, ids, 8), 0);
	lessor_revoke_failed(l, 11);
	CHECK_EQ(lessor_expired(l, ids, 8), 1);
	lessor_revoked(l, 11);
	CHECK_EQ(lessor_expired(l, ids, 8), 0);
	CHECK_EQ(lessor_renew(l, 11), 0);
	/* after a full scan found nothing due, a new shorter lease is still found in time */
	CHECK_EQ(lessor_expired(l, ids, 8), 0);
	lessor_granted(l, 13, 2);
	fake_now_ms += 1999;
	CHECK_EQ(lessor_expired(l, ids, 8), 0);
	fake_now_ms += 1;
	CHECK_EQ(lessor_expired(l, ids, 8), 1);
	CHECK_EQ(ids[0], 13);
	/* a scan cut short by max does not hide the rest */
	for (int64_t id = 100; id < 110; id++)
		lessor_granted(l, id, 1);
	fake_now_ms += 1000;
	size_t got = lessor_expired(l, ids, 4);
	CHECK_EQ(got, 4);
	got += lessor_expired(l, ids, 4);
	got += lessor_expired(l, ids, 4);
	CHECK_EQ(got, 10);
	/* the leader renews no lease that expired, is being revoked or is unknown */
	lessor_granted(l, 14, 1);
	fake_now_ms += 1000;
	CHECK_EQ(lessor_renew(l, 14), 0);
	CHECK_EQ(lessor_renew(l, 13), 0); /* being revoked */
	CHECK_EQ(lessor_renew(l, 999), 0);
	CHECK_EQ(lessor_renew(l, 12), 50);
	lessor_free(l);
	storage_close(st);
}

/* A restarted member starts each lease from the checkpoint on disk, plus an election timeout. */
static void test_restart(void)
{
	char *dir = t_tmpdir("lease-restart");
	storage *st;
	CHECK_EQ(storage_open(dir, NULL, &st), 0);
	storage_batch *b;
	CHECK_EQ(storage_batch_begin(st, &b), 0);
	CHECK_EQ(storage_batch_lease_grant(b, 21, 600), 0);
	CHECK_EQ(storage_batch_lease_grant(b, 22, 600), 0);
	Etcdserverpb__LeaseCheckpoint cp = ETCDSERVERPB__LEASE_CHECKPOINT__INIT, *cps[] = {&cp};
	Etcdserverpb__LeaseCheckpointRequest req = ETCDSERVERPB__LEASE_CHECKPOINT_REQUEST__INIT;
	cp.id = 21;
	cp.remaining_ttl = 240;
	req.checkpoints = cps;
	req.n_checkpoints = 1;
	CHECK_EQ(storage_batch_lease_checkpoint(b, &req), 0);
	CHECK_EQ(storage_batch_commit(b, 1), 0);
	storage_close(st);
	CHECK_EQ(storage_open(dir, NULL, &st), 0);
	for (int on = 0; on < 2; on++) {
		config c = test_config(on, 60000);
		lessor *l;
		CHECK_EQ(lessor_start(&l, &c, st), 0);
		CHECK_EQ(expiry_of(l, 21), fake_now_ms + 1000 + 240000);
		CHECK_EQ(expiry_of(l, 22), fake_now_ms + 1000 + 600000);
		lessor_free(l);
	}
	storage_close(st);
	free(dir);
}

int main(void)
{
	test_schedule();
	test_promote();
	test_clear_on_renew();
	test_bounds();
	test_expiry();
	test_restart();
	printf("%d checks, %d failed\n", t_checks, t_fail);
	return t_fail ? 1 : 0;
}
