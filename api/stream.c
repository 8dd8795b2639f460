/*
 * stream.c - streaming calls on gRPC core.
 *
 * gRPC core allows one outstanding operation of each kind per call: one RECV_MESSAGE, one
 * SEND_MESSAGE. So each stream keeps its own send queue; a send completion starts the next
 * one, and a requested status goes out once the queue is empty. A RECV_CLOSE_ON_SERVER is
 * outstanding for the whole call: its completion is the one moment the call is over.
 *
 * Lifetime: every outstanding operation holds a reference, handlers may hold more
 * (api_stream_retain); the last release frees the stream.
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/slice_buffer.h>

#include "api/api.h"
#include "api/internal.h"

/* Messages in a row the transport may buffer before one flushes them (start_send_locked). */
#define API_STREAM_MAX_HINTED 32

typedef struct stream_tag {
	tag_kind kind;
	api_stream *st;
} stream_tag;

typedef struct send_item {
	grpc_byte_buffer *si_bb;
	size_t si_bytes;
	size_t si_units; /* what the sender counts in it (watch: events) */
	uint64_t si_seq; /* the stream's number for it, from 1 */
	struct send_item *si_next;
} send_item;

struct api_stream {
	api_server *st_srv;
	api_method *st_method;
	grpc_call *st_call;
	grpc_metadata_array st_md;
	void *st_data;

	pthread_mutex_t st_mu; /* guards everything below */
	int st_refs;
	stream_tag st_t_recv, st_t_send, st_t_close, st_t_status;
	grpc_byte_buffer *st_recv_bb;
	int st_cancelled; /* written by RECV_CLOSE_ON_SERVER */

	send_item *st_q_head, *st_q_tail;
	size_t st_q_bytes, st_q_units;
	/* Merging (api_stream_send_merge): items are numbered; an item numbered above both
	 * st_sent_seq (the last one handed to gRPC or dropped) and st_barrier_seq (the last one
	 * that later messages must not overtake) is still queued and may grow. */
	uint64_t st_seq, st_sent_seq, st_barrier_seq;
	int st_sending;
	int st_hinted; /* messages sent with GRPC_WRITE_BUFFER_HINT since the last one without */
	int st_sent_initial_md;
	int st_finishing;
	int st_status_started;
	int st_status;
	grpc_slice st_status_msg;
	int st_closed;
	int st_in_message;    /* on_message is running */
	int st_close_pending; /* the call ended while on_message ran: on_close follows it */
};

/* The bytes are a gRPC slice made once: each send takes a slice reference (an atomic
 * increment), not a new slice with its own allocated refcount. */
struct api_bytes {
	_Atomic int ab_refs;
	size_t ab_len;
	grpc_slice ab_slice;
};

api_bytes *api_bytes_new(size_t len, uint8_t **data)
{
	api_bytes *b = malloc(sizeof(*b));
	if (b == NULL)
		return NULL;
	atomic_init(&b->ab_refs, 1);
	b->ab_len = len;
	b->ab_slice = grpc_slice_malloc(len);
	*data = GRPC_SLICE_START_PTR(b->ab_slice);
	return b;
}

void api_bytes_ref(api_bytes *b)
{
	atomic_fetch_add(&b->ab_refs, 1);
}

void api_bytes_unref(api_bytes *b)
{
	if (b && atomic_fetch_sub(&b->ab_refs, 1) == 1) {
		grpc_slice_unref(b->ab_slice);
		free(b);
	}
}

static void stream_free(api_stream *st)
{
	send_item *it, *next;
	for (it = st->st_q_head; it; it = next) {
		next = it->si_next;
		grpc_byte_buffer_destroy(it->si_bb);
		free(it);
	}
	if (st->st_recv_bb)
		grpc_byte_buffer_destroy(st->st_recv_bb);
	grpc_slice_unref(st->st_status_msg);
	grpc_metadata_array_destroy(&st->st_md);
	grpc_call_unref(st->st_call);
	pthread_mutex_destroy(&st->st_mu);
	free(st);
}

void api_stream_retain(api_stream *st)
{
	pthread_mutex_lock(&st->st_mu);
	st->st_refs++;
	pthread_mutex_unlock(&st->st_mu);
}

void api_stream_release(api_stream *st)
{
	pthread_mutex_lock(&st->st_mu);
	int last = --st->st_refs == 0;
	pthread_mutex_unlock(&st->st_mu);
	if (last)
		stream_free(st);
}

void api_stream_set_data(api_stream *st, void *data)
{
	st->st_data = data;
}

void *api_stream_data(api_stream *st)
{
	return st->st_data;
}

const char *api_stream_metadata(api_stream *st, const char *key, size_t *len)
{
	size_t klen = strlen(key);
	for (size_t i = 0; i < st->st_md.count; i++) {
		grpc_slice *k = &st->st_md.metadata[i].key;
		if (GRPC_SLICE_LENGTH(*k) == klen && memcmp(GRPC_SLICE_START_PTR(*k), key, klen) == 0) {
			grpc_slice *v = &st->st_md.metadata[i].value;
			if (len)
				*len = GRPC_SLICE_LENGTH(*v);
			return (const char *)GRPC_SLICE_START_PTR(*v);
		}
	}
	return NULL;
}

/* Starts the status batch. Called with st_mu held, when nothing is being sent. */
static void start_status_locked(api_stream *st)
{
	grpc_op ops[2];
	size_t n = 0;
	memset(ops, 0, sizeof(ops));
	if (!st->st_sent_initial_md) {
		ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
		ops[n++].data.send_initial_metadata.count = 0;
		st->st_sent_initial_md = 1;
	}
	ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
	ops[n].data.send_status_from_server.status = (grpc_status_code)st->st_status;
	ops[n++].data.send_status_from_server.status_details =
		GRPC_SLICE_LENGTH(st->st_status_msg) ? &st->st_status_msg : NULL;
	st->st_status_started = 1;
	st->st_refs++;
	if (grpc_call_start_batch(st->st_call, ops, n, &st->st_t_status, NULL) != GRPC_CALL_OK)
		st->st_refs--;
}

/* Starts sending the head of the queue. Called with st_mu held, when nothing is being sent. */
static void start_send_locked(api_stream *st)
{
	send_item *it = st->st_q_head;
	grpc_op ops[2];
	size_t n = 0;
	memset(ops, 0, sizeof(ops));
	if (!st->st_sent_initial_md) {
		ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
		ops[n++].data.send_initial_metadata.count = 0;
		st->st_sent_initial_md = 1;
	}
	ops[n].op = GRPC_OP_SEND_MESSAGE;
	/* More messages wait behind this one: let the transport buffer it (its send completes
	 * once buffered) so that one write carries many messages; the queue's last message goes
	 * without the hint and flushes them. gRPC allows one send in flight per call, so without
	 * the hint every message costs a write of its own (a sendmsg per message under fan-out).
	 * At most API_STREAM_MAX_HINTED in a row, though: the HTTP/2 stream holds what it buffers
	 * in an array of slices (two a message) that grows to the longest run and never shrinks
	 * while the call lives. A burst of 100 watch creates on a stream (100 created responses)
	 * left it up to 8 KB of array: 10-77 bytes per idle watcher, varying from run to run
	 * (issue 5); runs of 32 leave ~2 KB. */
	if (it->si_next && st->st_hinted < API_STREAM_MAX_HINTED) {
		ops[n].flags = GRPC_WRITE_BUFFER_HINT;
		st->st_hinted++;
	} else {
		st->st_hinted = 0;
	}
	ops[n++].data.send_message.send_message = it->si_bb;
	st->st_sent_seq = it->si_seq; /* gRPC owns its bytes now: no more merging into it */
	st->st_sending = 1;
	st->st_refs++;
	if (grpc_call_start_batch(st->st_call, ops, n, &st->st_t_send, NULL) != GRPC_CALL_OK) {
		st->st_sending = 0;
		st->st_refs--;
	}
}

/* The slices of one message piece: prefix (copied) and shared (referenced). Returns how many. */
static size_t piece_slices(const uint8_t *prefix, size_t plen, api_bytes *shared, grpc_slice slices[2], size_t *total)
{
	size_t ns = 0;
	*total = plen;
	if (plen > 0 || shared == NULL)
		slices[ns++] = grpc_slice_from_copied_buffer((const char *)prefix, plen);
	if (shared) {
		slices[ns++] = grpc_slice_ref(shared->ab_slice);
		*total += shared->ab_len;
	}
	return ns;
}

/* Queues a new message; *seq gets its number. mergeable 0 makes it a barrier. */
static long queue_new(api_stream *st, const uint8_t *prefix, size_t plen, api_bytes *shared, size_t units,
		      int mergeable, send_item **item, uint64_t *seq)
{
	grpc_slice slices[2];
	size_t total;
	size_t ns = piece_slices(prefix, plen, shared, slices, &total);
	grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(slices, ns);
	for (size_t i = 0; i < ns; i++)
		grpc_slice_unref(slices[i]);
	send_item *it = malloc(sizeof(*it));
	if (it == NULL) {
		grpc_byte_buffer_destroy(bb);
		return -1;
	}
	it->si_bb = bb;
	it->si_bytes = total;
	it->si_units = units;
	it->si_next = NULL;

	pthread_mutex_lock(&st->st_mu);
	if (st->st_closed || st->st_finishing) {
		pthread_mutex_unlock(&st->st_mu);
		grpc_byte_buffer_destroy(bb);
		free(it);
		return -1;
	}
	it->si_seq = ++st->st_seq;
	if (!mergeable)
		st->st_barrier_seq = it->si_seq;
	if (item) {
		*item = it;
		*seq = it->si_seq;
	}
	if (st->st_q_tail)
		st->st_q_tail->si_next = it;
	else
		st->st_q_head = it;
	st->st_q_tail = it;
	st->st_q_bytes += total;
	st->st_q_units += units;
	if (!st->st_sending)
		start_send_locked(st);
	long queued = (long)st->st_q_bytes;
	pthread_mutex_unlock(&st->st_mu);
	return queued;
}

long api_stream_send(api_stream *st, const uint8_t *prefix, size_t plen, api_bytes *shared)
{
	return queue_new(st, prefix, plen, shared, 0, 0, NULL, NULL);
}

long api_stream_send_merge(api_stream *st, api_send_mark *mark, const uint8_t *prefix, size_t plen,
			   const uint8_t *more, size_t mlen, api_bytes *shared, size_t units, size_t max_bytes)
{
	pthread_mutex_lock(&st->st_mu);
	send_item *it = mark->sm_item;
	size_t add = mlen + (shared ? shared->ab_len : 0);
	if (it && !st->st_closed && !st->st_finishing && mark->sm_seq > st->st_sent_seq &&
	    mark->sm_seq > st->st_barrier_seq && it->si_bytes + add <= max_bytes) {
		/* still queued (so alive) and nothing it must precede came after it: grow it */
		grpc_slice slices[2];
		size_t total;
		size_t ns = piece_slices(more, mlen, shared, slices, &total);
		for (size_t i = 0; i < ns; i++)
			grpc_slice_buffer_add(&it->si_bb->data.raw.slice_buffer, slices[i]);
		it->si_bytes += total;
		it->si_units += units;
		st->st_q_bytes += total;
		st->st_q_units += units;
		long queued = (long)st->st_q_bytes;
		pthread_mutex_unlock(&st->st_mu);
		return queued;
	}
	pthread_mutex_unlock(&st->st_mu);
	send_item *nit = NULL;
	uint64_t seq = 0;
	long q = queue_new(st, prefix, plen, shared, units, 1, &nit, &seq);
	mark->sm_item = q >= 0 ? nit : NULL;
	mark->sm_seq = q >= 0 ? seq : 0;
	return q;
}

int api_stream_closed(api_stream *st)
{
	pthread_mutex_lock(&st->st_mu);
	int closed = st->st_closed || st->st_finishing;
	pthread_mutex_unlock(&st->st_mu);
	return closed;
}

size_t api_stream_queued_bytes(api_stream *st)
{
	pthread_mutex_lock(&st->st_mu);
	size_t n = st->st_q_bytes;
	pthread_mutex_unlock(&st->st_mu);
	return n;
}

size_t api_stream_queued_units(api_stream *st)
{
	pthread_mutex_lock(&st->st_mu);
	size_t n = st->st_q_units;
	pthread_mutex_unlock(&st->st_mu);
	return n;
}

long api_stream_send_msg(api_stream *st, const ProtobufCMessage *msg)
{
	size_t len = protobuf_c_message_get_packed_size(msg);
	uint8_t stackbuf[512];
	uint8_t *buf = len <= sizeof(stackbuf) ? stackbuf : malloc(len);
	if (buf == NULL)
		return -1;
	protobuf_c_message_pack(msg, buf);
	long rc = api_stream_send(st, buf, len, NULL);
	if (buf != stackbuf)
		free(buf);
	return rc;
}

void api_stream_finish(api_stream *st, int status, const char *message)
{
	pthread_mutex_lock(&st->st_mu);
	if (!st->st_finishing && !st->st_closed) {
		st->st_finishing = 1;
		st->st_status = status;
		grpc_slice_unref(st->st_status_msg);
		st->st_status_msg = grpc_slice_from_copied_string(message ? message : "");
		if (!st->st_sending)
			start_status_locked(st);
	}
	pthread_mutex_unlock(&st->st_mu);
}

/* Asks for the next message. Called with no lock held; takes a reference for the op. */
static void start_recv(api_stream *st)
{
	grpc_op op;
	memset(&op, 0, sizeof(op));
	op.op = GRPC_OP_RECV_MESSAGE;
	op.data.recv_message.recv_message = &st->st_recv_bb;
	pthread_mutex_lock(&st->st_mu);
	st->st_refs++;
	pthread_mutex_unlock(&st->st_mu);
	if (grpc_call_start_batch(st->st_call, &op, 1, &st->st_t_recv, NULL) != GRPC_CALL_OK)
		api_stream_release(st);
}

void api__stream_start(api_server *s, api_method *m, grpc_call *call, grpc_metadata_array *md)
{
	api_stream *st = calloc(1, sizeof(*st));
	if (st == NULL) {
		grpc_call_unref(call);
		grpc_metadata_array_destroy(md);
		return;
	}
	st->st_srv = s;
	st->st_method = m;
	st->st_call = call;
	st->st_md = *md;
	st->st_status_msg = grpc_empty_slice();
	pthread_mutex_init(&st->st_mu, NULL);
	st->st_t_recv = (stream_tag){TAG_STREAM_RECV, st};
	st->st_t_send = (stream_tag){TAG_STREAM_SEND, st};
	st->st_t_close = (stream_tag){TAG_STREAM_CLOSE, st};
	st->st_t_status = (stream_tag){TAG_STREAM_STATUS, st};
	st->st_refs = 2; /* this function's, and the close op's */

	grpc_op op;
	memset(&op, 0, sizeof(op));
	op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
	op.data.recv_close_on_server.cancelled = &st->st_cancelled;
	if (grpc_call_start_batch(call, &op, 1, &st->st_t_close, NULL) != GRPC_CALL_OK) {
		st->st_refs = 1;
		api_stream_release(st);
		return;
	}
	if (m->am_stream->on_open)
		m->am_stream->on_open(m->am_ctx, st);
	start_recv(st);
	api_stream_release(st);
}

static void on_recv(api_stream *st, int ok)
{
	grpc_byte_buffer *bb = st->st_recv_bb;
	st->st_recv_bb = NULL;
	if (!ok || bb == NULL) {
		/* Half-close or a dead call: stop reading. As in etcd, a half-closed watch
		 * stream keeps delivering until the call ends; other streams may end here. */
		if (bb)
			grpc_byte_buffer_destroy(bb);
		if (ok && st->st_method->am_stream->on_half_close)
			st->st_method->am_stream->on_half_close(st->st_method->am_ctx, st);
		return;
	}
	grpc_byte_buffer_reader reader;
	ProtobufCMessage *msg = NULL;
	size_t len = 0;
	if (grpc_byte_buffer_reader_init(&reader, bb)) {
		grpc_slice body = grpc_byte_buffer_reader_readall(&reader);
		grpc_byte_buffer_reader_destroy(&reader);
		len = GRPC_SLICE_LENGTH(body);
		msg = protobuf_c_message_unpack(st->st_method->am_input, NULL, len, GRPC_SLICE_START_PTR(body));
		grpc_slice_unref(body);
	}
	grpc_byte_buffer_destroy(bb);
	if (msg == NULL || !api_message_is_valid(msg)) {
		if (msg)
			protobuf_c_message_free_unpacked(msg, NULL);
		api_stream_finish(st, GRPC_STATUS_INTERNAL, "grpc: error unmarshalling request: unexpected EOF");
		return;
	}
	pthread_mutex_lock(&st->st_mu);
	int closed = st->st_closed;
	st->st_in_message = !closed;
	pthread_mutex_unlock(&st->st_mu);
	if (closed) {
		protobuf_c_message_free_unpacked(msg, NULL);
		return;
	}
	api__dispatch_begin(st->st_call);
	st->st_method->am_stream->on_message(st->st_method->am_ctx, st, msg);
	api__dispatch_end();
	protobuf_c_message_free_unpacked(msg, NULL);
	pthread_mutex_lock(&st->st_mu);
	st->st_in_message = 0;
	int close_now = st->st_close_pending;
	pthread_mutex_unlock(&st->st_mu);
	if (!close_now)
		start_recv(st);
	else if (st->st_method->am_stream->on_close)
		st->st_method->am_stream->on_close(st->st_method->am_ctx, st);
}

static void on_send(api_stream *st, int ok)
{
	pthread_mutex_lock(&st->st_mu);
	send_item *it = st->st_q_head;
	st->st_q_head = it->si_next;
	if (st->st_q_head == NULL)
		st->st_q_tail = NULL;
	st->st_q_bytes -= it->si_bytes;
	st->st_q_units -= it->si_units;
	st->st_sending = 0;
	grpc_byte_buffer_destroy(it->si_bb);
	free(it);
	if (!ok) {
		/* The call is broken: drop what is queued; the close op ends the stream. */
		send_item *next;
		for (it = st->st_q_head; it; it = next) {
			next = it->si_next;
			grpc_byte_buffer_destroy(it->si_bb);
			free(it);
		}
		st->st_q_head = st->st_q_tail = NULL;
		st->st_q_bytes = st->st_q_units = 0;
		st->st_sent_seq = st->st_seq;
	} else if (st->st_q_head) {
		start_send_locked(st);
	} else if (st->st_finishing && !st->st_status_started) {
		start_status_locked(st);
	}
	pthread_mutex_unlock(&st->st_mu);
}

/* The call is over. on_close never overlaps on_message: if one runs, it calls on_close. */
static void on_close(api_stream *st)
{
	pthread_mutex_lock(&st->st_mu);
	st->st_closed = 1;
	int defer = st->st_in_message;
	st->st_close_pending = defer;
	pthread_mutex_unlock(&st->st_mu);
	if (!defer && st->st_method->am_stream->on_close)
		st->st_method->am_stream->on_close(st->st_method->am_ctx, st);
}

void api__stream_event(void *tag, int ok)
{
	stream_tag *t = tag;
	api_stream *st = t->st;
	switch (t->kind) {
	case TAG_STREAM_RECV:
		on_recv(st, ok);
		break;
	case TAG_STREAM_SEND:
		on_send(st, ok);
		break;
	case TAG_STREAM_CLOSE:
		on_close(st);
		break;
	default:
		break;
	}
	api_stream_release(st);
}
