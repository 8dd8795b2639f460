/*
 * peer_rpc_test.c - the request channel (peer.h, REQUESTS) between two transports on one uv
 * loop over 127.0.0.1 ephemeral ports: answers, statuses, deadlines, cancels, lost
 * connections, close, and bad frames. Every wait is uv_run() until a condition holds, under
 * a watchdog that fails the test instead of hanging.
 */
#include "server/peer.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* CHECK, CHECK_EQ and the failure count t_fail */
#include "storage/testutil.h"

static uv_loop_t loop;
static uv_timer_t watchdog;
static int watchdog_fired;

static void on_watchdog(uv_timer_t *t)
{
	(void)t;
	watchdog_fired = 1;
}

static int run_until(int (*cond)(void), unsigned ms, const char *what)
{
	watchdog_fired = 0;
	uv_timer_start(&watchdog, on_watchdog, ms, 0);
	while (!cond() && !watchdog_fired)
		uv_run(&loop, UV_RUN_ONCE);
	uv_timer_stop(&watchdog);
	if (!cond()) {
		fprintf(stderr, "  timed out after %u ms waiting for %s\n", ms, what);
		t_fail++;
		return 0;
	}
	return 1;
}

/* Methods member B serves. */
enum { M_ECHO = 1, M_SILENT = 2, M_LATER = 3, M_STATUS = 4 };

typedef struct member {
	uint64_t id;
	peer_transport *t;
	peer_rpc *rpc;
	int connected_to_other;
	int closed;
} member;

static member A, B;
static uv_timer_t later_timer;
static uint64_t later_id;

static void on_message(void *ctx, uint64_t from, const void *bytes, size_t len)
{
	member *m = ctx;
	if (!peer_rpc_on_message(m->rpc, from, bytes, len))
		fprintf(stderr, "  a message that is not the channel's\n");
}

static void on_peer_state(void *ctx, uint64_t id, int connected)
{
	member *m = ctx;
	m->connected_to_other = connected;
	if (!connected)
		peer_rpc_peer_down(m->rpc, id);
}

static void on_later(uv_timer_t *t)
{
	(void)t;
	peer_rpc_respond(B.rpc, A.id, later_id, PEER_RPC_ST_OK, "late", 4);
}

static void serve(void *ctx, uint64_t from, uint64_t call_id, uint8_t method, const void *body, size_t len)
{
	member *m = ctx;
	switch (method) {
	case M_ECHO:
		CHECK_EQ(peer_rpc_respond(m->rpc, from, call_id, PEER_RPC_ST_OK, body, len), 0);
		break;
	case M_SILENT:
		break;
	case M_LATER:
		later_id = call_id;
		uv_timer_start(&later_timer, on_later, 100, 0);
		break;
	case M_STATUS:
		peer_rpc_respond(m->rpc, from, call_id, 7, "why", 3);
		break;
	default:
		peer_rpc_respond(m->rpc, from, call_id, PEER_RPC_ST_NO_METHOD, NULL, 0);
	}
}

static void on_closed(void *ctx)
{
	((member *)ctx)->closed = 1;
}

static void member_start(member *m, uint64_t id)
{
	memset(m, 0, sizeof(*m));
	m->id = id;
	const char *listen[] = {"127.0.0.1:0"};
	peer_config pc = {.pc_self_id = id, .pc_cluster_id = 77, .pc_listen = listen, .pc_n_listen = 1,
			  .pc_backoff_min_ms = 20, .pc_backoff_max_ms = 100};
	peer_callbacks cb = {.on_message = on_message, .on_peer_state = on_peer_state};
	CHECK_EQ(peer_transport_init(&m->t, &loop, &pc, cb, m), 0);
	CHECK_EQ(peer_rpc_init(&m->rpc, m->t, &loop, 0x42, serve, m), 0);
}

static void link_members(void)
{
	char addr[64];
	snprintf(addr, sizeof(addr), "127.0.0.1:%d", peer_listen_port(B.t, 0));
	CHECK_EQ(peer_add(A.t, B.id, addr), 0);
	snprintf(addr, sizeof(addr), "127.0.0.1:%d", peer_listen_port(A.t, 0));
	CHECK_EQ(peer_add(B.t, A.id, addr), 0);
}

/* The last ended call. */
static int n_done;
static uint64_t done_id;
static int done_status;
static char done_body[64];
static size_t done_len;

static void on_done(void *ctx, uint64_t call_id, int status, const void *body, size_t len)
{
	(void)ctx;
	n_done++;
	done_id = call_id;
	done_status = status;
	done_len = len < sizeof(done_body) ? len : sizeof(done_body);
	if (len)
		memcpy(done_body, body, done_len);
}

static int target_done;
static int reached_done(void)
{
	return n_done >= target_done;
}

static int both_connected(void)
{
	return A.connected_to_other && B.connected_to_other;
}

static void test_decode(void)
{
	peer_rpc_frame f;
	uint8_t ok[] = {0x42, PEER_RPC_RESPONSE, 0, 0, 0, 0, 0, 0, 1, 2, 9, 'x', 'y'};
	CHECK_EQ(peer_rpc_decode(ok, sizeof(ok), 0x42, &f), 0);
	CHECK_EQ(f.pf_kind, PEER_RPC_RESPONSE);
	CHECK_EQ(f.pf_id, 0x102);
	CHECK_EQ(f.pf_code, 9);
	CHECK_EQ(f.pf_len, 2);
	CHECK(f.pf_body == ok + PEER_RPC_HEADER);
	CHECK_EQ(peer_rpc_decode(ok, sizeof(ok), 0x43, &f), PEER_RPC_NOT_MINE);
	CHECK_EQ(peer_rpc_decode(ok, 0, 0x42, &f), PEER_RPC_NOT_MINE);
	CHECK_EQ(peer_rpc_decode(NULL, 5, 0x42, &f), PEER_RPC_NOT_MINE);
	for (size_t n = 1; n < PEER_RPC_HEADER; n++)
		CHECK_EQ(peer_rpc_decode(ok, n, 0x42, &f), PEER_EINVAL);
	CHECK_EQ(peer_rpc_decode(ok, PEER_RPC_HEADER, 0x42, &f), 0);
	CHECK_EQ(f.pf_len, 0);
	uint8_t bad_kind[sizeof(ok)];
	memcpy(bad_kind, ok, sizeof(ok));
	bad_kind[1] = 3;
	CHECK_EQ(peer_rpc_decode(bad_kind, sizeof(ok), 0x42, &f), PEER_EINVAL);
	uint8_t zero_id[PEER_RPC_HEADER] = {0x42, PEER_RPC_REQUEST};
	CHECK_EQ(peer_rpc_decode(zero_id, sizeof(zero_id), 0x42, &f), PEER_EINVAL);
}

static void call_ok(uint8_t method, const char *body, unsigned timeout_ms, uint64_t *id)
{
	CHECK_EQ(peer_rpc_call(A.rpc, B.id, method, body, body ? strlen(body) : 0, timeout_ms, on_done, NULL, id), 0);
}

static void test_calls(void)
{
	/* An answer, its body, and the id it ends. */
	uint64_t id;
	call_ok(M_ECHO, "hello", 5000, &id);
	target_done = n_done + 1;
	run_until(reached_done, 5000, "the echo");
	CHECK_EQ(done_id, id);
	CHECK_EQ(done_status, PEER_RPC_ST_OK);
	CHECK_EQ(done_len, 5);
	CHECK(memcmp(done_body, "hello", 5) == 0);

	/* A large body crosses too (beyond the stack buffer). */
	static char big[100000];
	memset(big, 'b', sizeof(big) - 1);
	call_ok(M_ECHO, big, 5000, &id);
	target_done = n_done + 1;
	run_until(reached_done, 5000, "the large echo");
	CHECK_EQ(done_status, PEER_RPC_ST_OK);

	/* The responder's own status and an unknown method. */
	call_ok(M_STATUS, NULL, 5000, &id);
	target_done = n_done + 1;
	run_until(reached_done, 5000, "a status");
	CHECK_EQ(done_status, 7);
	CHECK_EQ(done_len, 3);
	call_ok(200, NULL, 5000, &id);
	target_done = n_done + 1;
	run_until(reached_done, 5000, "no method");
	CHECK_EQ(done_status, PEER_RPC_ST_NO_METHOD);

	/* No answer: the deadline ends it, not before. */
	uint64_t t0 = uv_now(&loop);
	call_ok(M_SILENT, NULL, 200, &id);
	target_done = n_done + 1;
	run_until(reached_done, 3000, "the timeout");
	CHECK_EQ(done_id, id);
	CHECK_EQ(done_status, PEER_ETIMEDOUT);
	CHECK(uv_now(&loop) - t0 >= 200);

	/* A cancelled call never ends; its late answer is counted as unmatched. */
	peer_rpc_stats st0, st1;
	peer_rpc_get_stats(A.rpc, &st0);
	int before = n_done;
	call_ok(M_LATER, NULL, 5000, &id);
	peer_rpc_cancel(A.rpc, id);
	target_done = n_done + 1;
	watchdog_fired = 0;
	uv_timer_start(&watchdog, on_watchdog, 3000, 0);
	for (;;) {
		peer_rpc_get_stats(A.rpc, &st1);
		if (st1.prs_unmatched > st0.prs_unmatched || watchdog_fired)
			break;
		uv_run(&loop, UV_RUN_ONCE);
	}
	uv_timer_stop(&watchdog);
	CHECK_EQ(st1.prs_unmatched, st0.prs_unmatched + 1);
	CHECK_EQ(n_done, before);

	/* Forged and malformed frames: an answer from a member that was not asked does not end
	 * a call; bad frames are taken and counted, others' frames are left alone. */
	call_ok(M_SILENT, NULL, 300, &id);
	uint8_t forged[PEER_RPC_HEADER] = {0x42, PEER_RPC_RESPONSE};
	for (int i = 0; i < 8; i++)
		forged[2 + i] = (uint8_t)(id >> (56 - 8 * i));
	CHECK_EQ(peer_rpc_on_message(A.rpc, 99, forged, sizeof(forged)), 1);
	CHECK_EQ(n_done, before);
	uint8_t shortf[3] = {0x42, 1, 0};
	CHECK_EQ(peer_rpc_on_message(A.rpc, B.id, shortf, sizeof(shortf)), 1);
	uint8_t other[4] = {0x01, 2, 3, 4};
	CHECK_EQ(peer_rpc_on_message(A.rpc, B.id, other, sizeof(other)), 0);
	peer_rpc_get_stats(A.rpc, &st1);
	CHECK_EQ(st1.prs_malformed, st0.prs_malformed + 1);
	target_done = n_done + 1;
	run_until(reached_done, 3000, "the timeout after a forged answer");
	CHECK_EQ(done_status, PEER_ETIMEDOUT);

	/* Bad arguments fail at once and never call back. */
	CHECK_EQ(peer_rpc_call(A.rpc, 0, 1, NULL, 0, 100, on_done, NULL, NULL), PEER_EINVAL);
	CHECK_EQ(peer_rpc_call(A.rpc, 12345, 1, NULL, 0, 100, on_done, NULL, NULL), PEER_EUNKNOWN);
	CHECK_EQ(peer_rpc_call(A.rpc, B.id, 1, NULL, 3, 100, on_done, NULL, NULL), PEER_EINVAL);
}

static int b_closed(void)
{
	return B.closed;
}

/* The member asked goes away: the call ends with PEER_EDOWN once the connection drops,
 * long before its deadline. */
static void test_peer_down(void)
{
	uint64_t id;
	call_ok(M_SILENT, NULL, 60000, &id);
	int before = n_done;
	peer_rpc_close(B.rpc);
	CHECK_EQ(peer_transport_close(B.t, on_closed), 0);
	run_until(b_closed, 5000, "B closed");
	target_done = before + 1;
	run_until(reached_done, 10000, "the call to a member that went away");
	CHECK_EQ(done_id, id);
	CHECK_EQ(done_status, PEER_EDOWN);
}

/* Closing the channel ends what is in flight, and later calls fail. */
static void test_close(void)
{
	int before = n_done;
	CHECK_EQ(peer_rpc_call(A.rpc, B.id, M_SILENT, NULL, 0, 60000, on_done, NULL, NULL), 0);
	peer_rpc_close(A.rpc);
	CHECK_EQ(n_done, before + 1);
	CHECK_EQ(done_status, PEER_ECLOSED);
}

int main(void)
{
	signal(SIGPIPE, SIG_IGN);
	uv_loop_init(&loop);
	uv_timer_init(&loop, &watchdog);
	uv_timer_init(&loop, &later_timer);
	test_decode();
	member_start(&A, 1);
	member_start(&B, 2);
	link_members();
	run_until(both_connected, 5000, "both connected");
	test_calls();
	test_peer_down();
	test_close();
	A.closed = 0;
	peer_transport_close(A.t, on_closed);
	uv_close((uv_handle_t *)&watchdog, NULL);
	uv_close((uv_handle_t *)&later_timer, NULL);
	uv_run(&loop, UV_RUN_DEFAULT);
	CHECK_EQ(uv_loop_close(&loop), 0);
	if (t_fail) {
		fprintf(stderr, "peer_rpc_test: %d check(s) failed\n", t_fail);
		return 1;
	}
	printf("peer_rpc_test: ok\n");
	return 0;
}
