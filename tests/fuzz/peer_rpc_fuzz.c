/*
 * peer_rpc_fuzz.c - libFuzzer target: arbitrary bytes arriving from a peer on the request
 * channel (server/peer.h, REQUESTS) and the answers carried in it.
 *
 * Input: byte 0 picks who the bytes claim to come from (the member asked, or another), the
 * rest is one transport message. Each input:
 *   - goes through peer_rpc_decode(), whose frame must lie inside the input;
 *   - is offered to a live channel (a real transport with no listener, one peer that is never
 *     dialled) that has a call in flight to that peer, with the input's call id patched to
 *     it half of the time, so the answer path runs too; requests are answered with
 *     PEER_RPC_ST_NO_METHOD (queued, never sent);
 *   - has its body decoded as every node_ask answer and request is: node_ans_error_decode()
 *     and the protobuf messages of the lease and HashKV questions.
 * The channel must never call back twice, nor for a call other than the one in flight.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "server/peer.h"
#include "server/server.h"

#define TAG 5 /* node_internal.h's FRAME_RPC */

static uv_loop_t loop;
static peer_transport *tr;
static peer_rpc *rpc;
static int n_done;
static uint64_t done_for;

static void on_done(void *ctx, uint64_t call_id, int status, const void *body, size_t len)
{
	(void)ctx;
	(void)status;
	if (len && body == NULL)
		abort();
	if (len) /* the body must be readable */
		(void)((volatile const uint8_t *)body)[len - 1];
	n_done++;
	done_for = call_id;
}

static void setup(void)
{
	uv_loop_init(&loop);
	peer_config pc;
	memset(&pc, 0, sizeof(pc));
	pc.pc_self_id = 1;
	pc.pc_cluster_id = 9;
	pc.pc_max_queue = 1 << 30;
	peer_callbacks cb;
	memset(&cb, 0, sizeof(cb));
	if (peer_transport_init(&tr, &loop, &pc, cb, NULL) != 0 || peer_rpc_init(&rpc, tr, &loop, TAG, NULL, NULL) != 0)
		abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (rpc == NULL)
		setup();
	if (size < 1)
		return 0;
	/* Peer 2 exists for this input only: removing it frees the messages queued for it (its
	 * handles close on the next input's loop turn), so that every input frees about what
	 * it allocates and the leak checker need not scan after each. */
	uv_run(&loop, UV_RUN_NOWAIT);
	if (peer_add(tr, 2, "127.0.0.1:9") != 0)
		abort();
	uint64_t from = data[0] & 1 ? 2 : 3;
	int patch = data[0] & 2;
	const uint8_t *msg = data + 1;
	size_t len = size - 1;

	peer_rpc_frame f;
	int rc = peer_rpc_decode(msg, len, TAG, &f);
	if (rc == 0 && (f.pf_body < msg || f.pf_body + f.pf_len != msg + len))
		abort();

	uint64_t id = 0;
	if (peer_rpc_call(rpc, 2, 1, "q", 1, 60000, on_done, NULL, &id) != 0)
		abort();
	uint8_t *copy = malloc(len ? len : 1);
	if (copy == NULL)
		return 0;
	if (len)
		memcpy(copy, msg, len);
	if (patch && len >= PEER_RPC_HEADER)
		for (int i = 0; i < 8; i++)
			copy[2 + i] = (uint8_t)(id >> (56 - 8 * i));
	int before = n_done;
	peer_rpc_on_message(rpc, from, copy, len);
	if (n_done > before + 1 || (n_done > before && done_for != id))
		abort();
	if (n_done == before)
		peer_rpc_cancel(rpc, id);
	free(copy);
	peer_remove(tr, 2);

	/* The bodies as the node reads them. */
	const uint8_t *body = rc == 0 ? f.pf_body : msg;
	size_t blen = rc == 0 ? f.pf_len : len;
	char text[64];
	node_ans_error_decode(body, blen, text, sizeof(text));
	if (strlen(text) >= sizeof(text) && node_ans_error_decode(body, blen, text, sizeof(text)) >= 0)
		abort();
	ProtobufCMessage *m;
	if ((m = (ProtobufCMessage *)etcdserverpb__lease_keep_alive_request__unpack(NULL, blen, body)))
		protobuf_c_message_free_unpacked(m, NULL);
	if ((m = (ProtobufCMessage *)etcdserverpb__lease_keep_alive_response__unpack(NULL, blen, body)))
		protobuf_c_message_free_unpacked(m, NULL);
	if ((m = (ProtobufCMessage *)etcdserverpb__lease_time_to_live_request__unpack(NULL, blen, body)))
		protobuf_c_message_free_unpacked(m, NULL);
	if ((m = (ProtobufCMessage *)etcdserverpb__lease_time_to_live_response__unpack(NULL, blen, body)))
		protobuf_c_message_free_unpacked(m, NULL);
	if ((m = (ProtobufCMessage *)etcdserverpb__hash_kvrequest__unpack(NULL, blen, body)))
		protobuf_c_message_free_unpacked(m, NULL);
	if ((m = (ProtobufCMessage *)etcdserverpb__hash_kvresponse__unpack(NULL, blen, body)))
		protobuf_c_message_free_unpacked(m, NULL);
	return 0;
}
