/*
 * peer_rpc.c - requests and their answers between members, on a peer transport (peer.h,
 * REQUESTS). A call is one transport message out and one back; the caller matches the
 * answer by the call id it chose. Calls in flight sit in a short list (a handful at a time:
 * lease forwarding and corruption checks), each with a deadline that one repeating timer
 * watches while the list is not empty.
 */
#include <stdlib.h>
#include <string.h>

#include "server/peer.h"

/* How often deadlines are looked at while calls are in flight. */
#define RPC_SWEEP_MS 10

typedef struct rpc_call {
	uint64_t rc_id;
	uint64_t rc_to;
	uint64_t rc_deadline_ms; /* uv_now() based */
	peer_rpc_done rc_done;
	void *rc_ctx;
	struct rpc_call *rc_next;
} rpc_call;

struct peer_rpc {
	peer_transport *pr_t;
	uv_loop_t *pr_loop;
	uv_timer_t pr_timer;
	uint8_t pr_tag;
	peer_rpc_serve pr_serve;
	void *pr_ctx;
	rpc_call *pr_calls;
	uint64_t pr_next_id;
	int pr_closed;
	peer_rpc_stats pr_stats;
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

int peer_rpc_decode(const void *bytes, size_t len, uint8_t tag, peer_rpc_frame *f)
{
	const uint8_t *p = bytes;
	if (len < 1 || p == NULL || p[0] != tag)
		return PEER_RPC_NOT_MINE;
	if (len < PEER_RPC_HEADER)
		return PEER_EINVAL;
	if (p[1] != PEER_RPC_REQUEST && p[1] != PEER_RPC_RESPONSE)
		return PEER_EINVAL;
	f->pf_kind = p[1];
	f->pf_id = get64(p + 2);
	f->pf_code = p[10];
	f->pf_body = p + PEER_RPC_HEADER;
	f->pf_len = len - PEER_RPC_HEADER;
	/* Call ids start at 1: 0 is never one, so a zeroed frame is not mistaken for an answer. */
	if (f->pf_id == 0)
		return PEER_EINVAL;
	return 0;
}

/* One message: the header then body, sent to member to. */
static int send_frame(peer_rpc *r, uint64_t to, uint8_t kind, uint64_t id, uint8_t code, const void *body,
		      size_t len)
{
	if (body == NULL && len > 0)
		return PEER_EINVAL;
	uint8_t stackbuf[512];
	size_t total = PEER_RPC_HEADER + len;
	uint8_t *buf = total <= sizeof(stackbuf) ? stackbuf : malloc(total);
	if (buf == NULL)
		return PEER_ENOMEM;
	buf[0] = r->pr_tag;
	buf[1] = kind;
	put64(buf + 2, id);
	buf[10] = code;
	if (len)
		memcpy(buf + PEER_RPC_HEADER, body, len);
	int rc = peer_send(r->pr_t, to, buf, total);
	if (buf != stackbuf)
		free(buf);
	return rc;
}

/* Unlinks the call with id, or returns NULL. */
static rpc_call *take_call(peer_rpc *r, uint64_t id)
{
	for (rpc_call **pp = &r->pr_calls; *pp; pp = &(*pp)->rc_next) {
		rpc_call *c = *pp;
		if (c->rc_id == id) {
			*pp = c->rc_next;
			if (r->pr_calls == NULL)
				uv_timer_stop(&r->pr_timer);
			return c;
		}
	}
	return NULL;
}

/* Ends every call matching (to, or all if to == 0) with err; each callback may start new
 * calls, so the list is walked again from its head after each. */
static void fail_calls(peer_rpc *r, uint64_t to, int err, int expired_only)
{
	for (;;) {
		uint64_t now = uv_now(r->pr_loop);
		rpc_call *c = r->pr_calls;
		while (c && !((to == 0 || c->rc_to == to) && (!expired_only || c->rc_deadline_ms <= now)))
			c = c->rc_next;
		if (c == NULL)
			return;
		take_call(r, c->rc_id);
		if (err == PEER_ETIMEDOUT)
			r->pr_stats.prs_timeouts++;
		c->rc_done(c->rc_ctx, c->rc_id, err, NULL, 0);
		free(c);
	}
}

static void on_sweep(uv_timer_t *t)
{
	peer_rpc *r = t->data;
	fail_calls(r, 0, PEER_ETIMEDOUT, 1);
}

int peer_rpc_init(peer_rpc **out, peer_transport *t, uv_loop_t *loop, uint8_t tag, peer_rpc_serve serve,
		  void *ctx)
{
	if (out == NULL || t == NULL || loop == NULL)
		return PEER_EINVAL;
	peer_rpc *r = calloc(1, sizeof(*r));
	if (r == NULL)
		return PEER_ENOMEM;
	r->pr_t = t;
	r->pr_loop = loop;
	r->pr_tag = tag;
	r->pr_serve = serve;
	r->pr_ctx = ctx;
	uv_timer_init(loop, &r->pr_timer);
	r->pr_timer.data = r;
	*out = r;
	return 0;
}

int peer_rpc_call(peer_rpc *r, uint64_t to, uint8_t method, const void *body, size_t len, unsigned timeout_ms,
		  peer_rpc_done done, void *ctx, uint64_t *call_id)
{
	if (r->pr_closed)
		return PEER_ECLOSED;
	if (done == NULL || to == 0)
		return PEER_EINVAL;
	rpc_call *c = calloc(1, sizeof(*c));
	if (c == NULL)
		return PEER_ENOMEM;
	c->rc_id = ++r->pr_next_id;
	int rc = send_frame(r, to, PEER_RPC_REQUEST, c->rc_id, method, body, len);
	if (rc != 0) {
		free(c);
		return rc;
	}
	uv_update_time(r->pr_loop);
	c->rc_to = to;
	c->rc_deadline_ms = uv_now(r->pr_loop) + timeout_ms;
	c->rc_done = done;
	c->rc_ctx = ctx;
	c->rc_next = r->pr_calls;
	if (r->pr_calls == NULL)
		uv_timer_start(&r->pr_timer, on_sweep, RPC_SWEEP_MS, RPC_SWEEP_MS);
	r->pr_calls = c;
	r->pr_stats.prs_calls++;
	if (call_id)
		*call_id = c->rc_id;
	return 0;
}

void peer_rpc_cancel(peer_rpc *r, uint64_t call_id)
{
	free(take_call(r, call_id));
}

int peer_rpc_respond(peer_rpc *r, uint64_t to, uint64_t call_id, uint8_t status, const void *body, size_t len)
{
	if (r->pr_closed)
		return PEER_ECLOSED;
	int rc = send_frame(r, to, PEER_RPC_RESPONSE, call_id, status, body, len);
	if (rc == 0)
		r->pr_stats.prs_served++;
	return rc;
}

int peer_rpc_on_message(peer_rpc *r, uint64_t from, const void *bytes, size_t len)
{
	peer_rpc_frame f;
	int rc = peer_rpc_decode(bytes, len, r->pr_tag, &f);
	if (rc == PEER_RPC_NOT_MINE)
		return 0;
	if (rc != 0 || r->pr_closed) {
		r->pr_stats.prs_malformed += rc != 0;
		return 1;
	}
	if (f.pf_kind == PEER_RPC_REQUEST) {
		if (r->pr_serve)
			r->pr_serve(r->pr_ctx, from, f.pf_id, f.pf_code, f.pf_body, f.pf_len);
		else
			peer_rpc_respond(r, from, f.pf_id, PEER_RPC_ST_NO_METHOD, NULL, 0);
		return 1;
	}
	/* An answer must come from the member asked: another member cannot end our call. */
	rpc_call *c = r->pr_calls;
	while (c && c->rc_id != f.pf_id)
		c = c->rc_next;
	if (c == NULL || c->rc_to != from) {
		r->pr_stats.prs_unmatched++;
		return 1; /* late (timed out, cancelled) or stray */
	}
	take_call(r, c->rc_id);
	c->rc_done(c->rc_ctx, c->rc_id, f.pf_code, f.pf_body, f.pf_len);
	free(c);
	return 1;
}

void peer_rpc_peer_down(peer_rpc *r, uint64_t member)
{
	if (member != 0)
		fail_calls(r, member, PEER_EDOWN, 0);
}

void peer_rpc_get_stats(const peer_rpc *r, peer_rpc_stats *st)
{
	*st = r->pr_stats;
}

static void on_timer_closed(uv_handle_t *h)
{
	free(h->data);
}

void peer_rpc_close(peer_rpc *r)
{
	if (r == NULL || r->pr_closed)
		return;
	r->pr_closed = 1;
	while (r->pr_calls) {
		rpc_call *c = r->pr_calls;
		r->pr_calls = c->rc_next;
		c->rc_done(c->rc_ctx, c->rc_id, PEER_ECLOSED, NULL, 0);
		free(c);
	}
	uv_close((uv_handle_t *)&r->pr_timer, on_timer_closed);
}
