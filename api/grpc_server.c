/*
 * grpc_server.c - a completion-queue server on gRPC core that serves every method of etcd's
 * services, routed by method path. Unary bodies arrive whole with the call
 * (GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER), so a call is one event in and one batch out.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_posix.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <sys/prctl.h>

#include "api/absl_mutex.h"
#include "api/api.h"
#include "api/internal.h"

/* Calls that may wait for a handler at once, per hot method. */
#define API_PENDING_PER_METHOD 4

static const struct {
	int code;
	const char *msg;
} api_errors[API_ERR_COUNT] = {
	[API_ERR_EMPTY_KEY] = {GRPC_STATUS_INVALID_ARGUMENT, "etcdserver: key is not provided"},
	[API_ERR_KEY_NOT_FOUND] = {GRPC_STATUS_INVALID_ARGUMENT, "etcdserver: key not found"},
	[API_ERR_VALUE_PROVIDED] = {GRPC_STATUS_INVALID_ARGUMENT, "etcdserver: value is provided"},
	[API_ERR_LEASE_PROVIDED] = {GRPC_STATUS_INVALID_ARGUMENT, "etcdserver: lease is provided"},
	[API_ERR_TOO_MANY_OPS] = {GRPC_STATUS_INVALID_ARGUMENT,
				  "etcdserver: too many operations in txn request"},
	[API_ERR_DUPLICATE_KEY] = {GRPC_STATUS_INVALID_ARGUMENT,
				   "etcdserver: duplicate key given in txn request"},
	[API_ERR_COMPACTED] = {GRPC_STATUS_OUT_OF_RANGE,
			       "etcdserver: mvcc: required revision has been compacted"},
	[API_ERR_FUTURE_REV] = {GRPC_STATUS_OUT_OF_RANGE,
				"etcdserver: mvcc: required revision is a future revision"},
	[API_ERR_NO_SPACE] = {GRPC_STATUS_RESOURCE_EXHAUSTED,
			      "etcdserver: mvcc: database space exceeded"},
	[API_ERR_REQUEST_TOO_LARGE] = {GRPC_STATUS_INVALID_ARGUMENT,
				       "etcdserver: request is too large"},
	[API_ERR_LEASE_NOT_FOUND] = {GRPC_STATUS_NOT_FOUND, "etcdserver: requested lease not found"},
	[API_ERR_LEASE_EXIST] = {GRPC_STATUS_FAILED_PRECONDITION, "etcdserver: lease already exists"},
	[API_ERR_NO_LEADER] = {GRPC_STATUS_UNAVAILABLE, "etcdserver: no leader"},
	[API_ERR_TIMEOUT] = {GRPC_STATUS_UNAVAILABLE, "etcdserver: request timed out"},
	[API_ERR_STOPPED] = {GRPC_STATUS_UNAVAILABLE, "etcdserver: server stopped"},
	[API_ERR_CORRUPT] = {GRPC_STATUS_DATA_LOSS, "etcdserver: corrupt cluster"},
	[API_ERR_TOO_MANY_REQUESTS] = {GRPC_STATUS_RESOURCE_EXHAUSTED, "etcdserver: too many requests"},
	[API_ERR_INTERNAL] = {GRPC_STATUS_UNKNOWN, "etcdserver: internal error"},
	[API_ERR_INVALID_SORT] = {GRPC_STATUS_INVALID_ARGUMENT, "etcdserver: invalid sort option"},
};

int api_error_status(api_error err, const char **message)
{
	if ((unsigned)err >= API_ERR_COUNT)
		err = API_ERR_INTERNAL;
	*message = api_errors[err].msg;
	return api_errors[err].code;
}

const char *api_strerror(int err)
{
	switch (err) {
	case 0:
		return "success";
	case API_ERR_BIND:
		return "cannot listen on the address";
	case API_ERR_UNKNOWN_METHOD:
		return "no such method";
	case API_ERR_SYS:
		return "out of memory or threads";
	}
	return "unknown api error";
}

/* The methods that stream; protobuf-c's descriptors do not record it. */
static int method_is_streaming(const char *path)
{
	static const char *const streaming[] = {
		"/etcdserverpb.Watch/Watch",
		"/etcdserverpb.Lease/LeaseKeepAlive",
		"/etcdserverpb.Maintenance/Snapshot",
		"/etcdserverpb.KV/RangeStream",
	};
	for (size_t i = 0; i < sizeof(streaming) / sizeof(streaming[0]); i++)
		if (strcmp(path, streaming[i]) == 0)
			return 1;
	return 0;
}

static const ProtobufCServiceDescriptor *const etcd_services[] = {
	&etcdserverpb__kv__descriptor,      &etcdserverpb__watch__descriptor,
	&etcdserverpb__lease__descriptor,   &etcdserverpb__cluster__descriptor,
	&etcdserverpb__maintenance__descriptor, &etcdserverpb__auth__descriptor,
};

int api_server_create(const api_options *opts, api_server **out)
{
	api_server *s = calloc(1, sizeof(*s));
	if (s == NULL)
		return API_ERR_SYS;
	s->as_opts = *opts;
	if (s->as_opts.ao_threads <= 0)
		s->as_opts.ao_threads = 2;

	size_t n = 0;
	for (size_t i = 0; i < sizeof(etcd_services) / sizeof(etcd_services[0]); i++)
		n += etcd_services[i]->n_methods;
	s->as_methods = calloc(n, sizeof(api_method));
	if (s->as_methods == NULL) {
		free(s);
		return API_ERR_SYS;
	}
	for (size_t i = 0; i < sizeof(etcd_services) / sizeof(etcd_services[0]); i++) {
		const ProtobufCServiceDescriptor *svc = etcd_services[i];
		for (unsigned j = 0; j < svc->n_methods; j++) {
			api_method *m = &s->as_methods[s->as_nmethods++];
			size_t len = strlen(svc->name) + strlen(svc->methods[j].name) + 3;
			m->am_path = malloc(len);
			if (m->am_path == NULL)
				goto fail;
			snprintf(m->am_path, len, "/%s/%s", svc->name, svc->methods[j].name);
			m->am_input = svc->methods[j].input;
			m->am_streaming = method_is_streaming(m->am_path);
		}
	}

	/* Read by gRPC core once, when its first TLS context is made; see api_options. */
	if (opts->ao_cipher_list && opts->ao_cipher_list[0])
		setenv("GRPC_SSL_CIPHER_SUITES", opts->ao_cipher_list, 1);
	api_absl_deadlock_detection_off();
	grpc_init();
	/* etcd lets a request be max-request-bytes plus gRPC's overhead (512 KiB) on the wire.
	 * gRPC core's own refusal words it differently from grpc-go, so core takes up to four
	 * times that (still bounded) and the size is checked here with grpc-go's message. */
	s->as_max_recv = opts->ao_max_request_bytes + 512 * 1024;
	int max_recv = (int)(s->as_max_recv * 4 > 0x7fffffff ? 0x7fffffff : s->as_max_recv * 4);
	grpc_arg args[8];
	int na = 0;
	args[na++] = (grpc_arg){GRPC_ARG_INTEGER, GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, {.integer = max_recv}};
	args[na++] = (grpc_arg){GRPC_ARG_INTEGER, GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, {.integer = -1}};
	/* etcdctl pings every few seconds without calls; answering them with GOAWAY
	 * (gRPC core's default policy) silently resets clients' watches. */
	args[na++] = (grpc_arg){GRPC_ARG_INTEGER, GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
				{.integer = opts->ao_keepalive_min_time_ms}};
	args[na++] = (grpc_arg){GRPC_ARG_INTEGER, GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, {.integer = 1}};
	args[na++] = (grpc_arg){GRPC_ARG_INTEGER, GRPC_ARG_KEEPALIVE_TIME_MS,
				{.integer = opts->ao_keepalive_interval_ms}};
	args[na++] = (grpc_arg){GRPC_ARG_INTEGER, GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
				{.integer = opts->ao_keepalive_timeout_ms}};
	args[na++] = (grpc_arg){GRPC_ARG_INTEGER, GRPC_ARG_HTTP2_MAX_PING_STRIKES, {.integer = 0}};
	if (opts->ao_max_streams > 0)
		args[na++] = (grpc_arg){GRPC_ARG_INTEGER, GRPC_ARG_MAX_CONCURRENT_STREAMS,
					{.integer = opts->ao_max_streams > 0x7fffffff
							    ? 0x7fffffff
							    : (int)opts->ao_max_streams}};
	grpc_channel_args cargs = {(size_t)na, args};
	s->as_grpc = grpc_server_create(&cargs, NULL);
	s->as_cq = grpc_completion_queue_create_for_next(NULL);
	grpc_server_register_completion_queue(s->as_grpc, s->as_cq, NULL);
	for (size_t i = 0; i < s->as_nmethods; i++) {
		api_method *m = &s->as_methods[i];
		m->am_registered = grpc_server_register_method(
			s->as_grpc, m->am_path, NULL,
			m->am_streaming ? GRPC_SRM_PAYLOAD_NONE : GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
	}
	*out = s;
	return 0;
fail:
	for (size_t i = 0; i < s->as_nmethods; i++)
		free(s->as_methods[i].am_path);
	free(s->as_methods);
	free(s);
	return API_ERR_SYS;
}

int api_server_route(api_server *s, const char *path, api_unary_fn fn, void *ctx)
{
	for (size_t i = 0; i < s->as_nmethods; i++) {
		api_method *m = &s->as_methods[i];
		if (strcmp(m->am_path, path) == 0 && !m->am_streaming) {
			m->am_fn = fn;
			m->am_ctx = ctx;
			return 0;
		}
	}
	return API_ERR_UNKNOWN_METHOD;
}

int api_server_route_stream(api_server *s, const char *path, const api_stream_handlers *h, void *ctx)
{
	for (size_t i = 0; i < s->as_nmethods; i++) {
		api_method *m = &s->as_methods[i];
		if (strcmp(m->am_path, path) == 0 && m->am_streaming) {
			m->am_stream = h;
			m->am_ctx = ctx;
			return 0;
		}
	}
	return API_ERR_UNKNOWN_METHOD;
}

/*
 * The verified client certificate CN of each adopted connection, by fd number. gRPC core
 * serves an adopted fd only in plaintext and names its peer "fd:<n>"; a connection whose TLS
 * Keelson ended itself (server/tls.c) reaches gRPC through such an fd, so its CN is kept
 * here. The entry is replaced whenever the number is adopted again: gRPC closes the fd only
 * after the last call on it is destroyed, so a call always finds its own connection's CN.
 */
static pthread_mutex_t fd_cn_lock = PTHREAD_MUTEX_INITIALIZER;
static char **fd_cn;   /* owned strings; NULL: none */
static size_t fd_cn_n; /* entries in fd_cn */

static void fd_cn_set(int fd, const char *cn)
{
	pthread_mutex_lock(&fd_cn_lock);
	if ((size_t)fd >= fd_cn_n && cn != NULL) {
		size_t n = (size_t)fd * 2 + 64;
		char **grown = realloc(fd_cn, n * sizeof(*grown));
		if (grown != NULL) {
			memset(grown + fd_cn_n, 0, (n - fd_cn_n) * sizeof(*grown));
			fd_cn = grown;
			fd_cn_n = n;
		}
	}
	if ((size_t)fd < fd_cn_n) {
		free(fd_cn[fd]);
		fd_cn[fd] = cn != NULL ? strdup(cn) : NULL;
	}
	pthread_mutex_unlock(&fd_cn_lock);
}

static const char *fd_cn_get(int fd, char *buf, size_t len)
{
	const char *out = NULL;
	pthread_mutex_lock(&fd_cn_lock);
	if (fd >= 0 && (size_t)fd < fd_cn_n && fd_cn[fd] != NULL && strlen(fd_cn[fd]) < len) {
		strcpy(buf, fd_cn[fd]);
		out = buf;
	}
	pthread_mutex_unlock(&fd_cn_lock);
	return out;
}

void api_server_adopt_fd(api_server *s, int fd)
{
	api_server_adopt_fd_cn(s, fd, NULL);
}

void api_server_adopt_fd_cn(api_server *s, int fd, const char *cn)
{
	fd_cn_set(fd, cn);
	grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
	grpc_server_add_channel_from_fd(s->as_grpc, fd, creds);
	grpc_server_credentials_release(creds);
}

int api_server_listen(api_server *s, const char *host_port)
{
	grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
	int port = grpc_server_add_http2_port(s->as_grpc, host_port, creds);
	grpc_server_credentials_release(creds);
	return port > 0 ? 0 : API_ERR_BIND;
}

/*
 * The call whose handler runs on this thread. Handlers take the caller's identity on their
 * own thread before they hand a request on, so the certificate is read only while its call
 * is being dispatched; outside a dispatch there is no identity (and no user).
 */
static _Thread_local grpc_call *dispatching;

void api__dispatch_begin(grpc_call *call)
{
	dispatching = call;
}

void api__dispatch_end(void)
{
	dispatching = NULL;
}

const char *api_dispatch_peer_cn(char *buf, size_t len)
{
	if (dispatching == NULL || len == 0)
		return NULL;
	grpc_auth_context *ctx = grpc_call_auth_context(dispatching);
	if (ctx == NULL) {
		/* Plaintext to gRPC: an adopted fd, whose TLS (if any) Keelson ended itself. */
		char *peer = grpc_call_get_peer(dispatching);
		const char *out = NULL;
		if (peer != NULL && strncmp(peer, "fd:", 3) == 0)
			out = fd_cn_get(atoi(peer + 3), buf, len);
		gpr_free(peer);
		return out;
	}
	const char *out = NULL;
	/* Only a certificate the handshake verified: an unverified one never gets this far
	 * (the TLS listener verifies every certificate it requests). */
	grpc_auth_property_iterator it = grpc_auth_context_find_properties_by_name(ctx, GRPC_X509_CN_PROPERTY_NAME);
	const grpc_auth_property *p = grpc_auth_property_iterator_next(&it);
	if (p != NULL && p->value_length > 0 && p->value_length < len &&
	    memchr(p->value, '\0', p->value_length) == NULL) {
		memcpy(buf, p->value, p->value_length);
		buf[p->value_length] = '\0';
		out = buf;
	}
	grpc_auth_context_release(ctx);
	return out;
}

static void request_next(api_pending *p)
{
	api_server *s = p->ap_server;
	grpc_call_error e;
	p->ap_call = NULL;
	p->ap_payload = NULL;
	grpc_metadata_array_init(&p->ap_md);
	if (p->ap_kind == TAG_GENERIC) {
		grpc_call_details_init(&p->ap_details);
		e = grpc_server_request_call(s->as_grpc, &p->ap_call, &p->ap_details, &p->ap_md,
					     s->as_cq, s->as_cq, p);
	} else {
		e = grpc_server_request_registered_call(
			s->as_grpc, p->ap_method->am_registered, &p->ap_call, &p->ap_deadline,
			&p->ap_md, p->ap_method->am_streaming ? NULL : &p->ap_payload, s->as_cq,
			s->as_cq, p);
	}
	if (e != GRPC_CALL_OK)
		fprintf(stderr, "keelson: grpc request_call failed: %d\n", (int)e);
}

/* Sends status (and the message if any) and ends the call; the batch's completion frees it.
 * Returns -1 if the batch could not start, and the caller must free the call: otherwise the
 * call may already be freed by another thread when this returns. */
static int call_finish(api_call *c, grpc_byte_buffer *resp, int status, const char *details)
{
	grpc_op ops[4];
	size_t n = 0;
	memset(ops, 0, sizeof(ops));
	c->ac_kind = TAG_CALL_DONE;
	c->ac_resp = resp;
	c->ac_details = grpc_slice_from_copied_string(details ? details : "");
	ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
	ops[n++].data.send_initial_metadata.count = 0;
	if (resp != NULL) {
		ops[n].op = GRPC_OP_SEND_MESSAGE;
		ops[n++].data.send_message.send_message = resp;
	}
	ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
	ops[n].data.send_status_from_server.trailing_metadata_count = 0;
	ops[n].data.send_status_from_server.status = (grpc_status_code)status;
	ops[n++].data.send_status_from_server.status_details = details ? &c->ac_details : NULL;
	ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
	ops[n++].data.recv_close_on_server.cancelled = &c->ac_cancelled;
	grpc_call_error e = grpc_call_start_batch(c->ac_call, ops, n, c, NULL);
	if (e != GRPC_CALL_OK) {
		/* The call is unusable; nothing will complete, so release it here. */
		fprintf(stderr, "keelson: grpc start_batch failed: %d\n", (int)e);
		return -1;
	}
	return 0;
}

static void call_free(api_call *c)
{
	if (c->ac_call)
		grpc_call_unref(c->ac_call);
	if (c->ac_resp)
		grpc_byte_buffer_destroy(c->ac_resp);
	grpc_slice_unref(c->ac_details);
	grpc_metadata_array_destroy(&c->ac_md);
	if (c->ac_req)
		protobuf_c_message_free_unpacked(c->ac_req, NULL);
	free(c);
}

void api_call_reply(api_call *c, const ProtobufCMessage *resp)
{
	size_t len = protobuf_c_message_get_packed_size(resp);
	grpc_slice slice = grpc_slice_malloc(len);
	protobuf_c_message_pack(resp, GRPC_SLICE_START_PTR(slice));
	grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&slice, 1);
	grpc_slice_unref(slice);
	if (call_finish(c, bb, GRPC_STATUS_OK, NULL) != 0)
		call_free(c);
}

void api_call_fail_msg(api_call *c, int status, const char *message)
{
	if (call_finish(c, NULL, status, message) != 0)
		call_free(c);
}

void api_call_fail(api_call *c, api_error err)
{
	const char *msg;
	int code = api_error_status(err, &msg);
	api_call_fail_msg(c, code, msg);
}

const char *api_call_metadata(api_call *c, const char *key, size_t *len)
{
	size_t klen = strlen(key);
	for (size_t i = 0; i < c->ac_md.count; i++) {
		grpc_slice k = c->ac_md.metadata[i].key;
		if (GRPC_SLICE_LENGTH(k) == klen && memcmp(GRPC_SLICE_START_PTR(k), key, klen) == 0) {
			/* Point into the array's slice, not a copy: small slices are inlined. */
			grpc_slice *v = &c->ac_md.metadata[i].value;
			if (len)
				*len = GRPC_SLICE_LENGTH(*v);
			return (const char *)GRPC_SLICE_START_PTR(*v);
		}
	}
	return NULL;
}

size_t api_call_request_size(api_call *c)
{
	return c->ac_req_size;
}

int64_t api_call_remaining_ms(api_call *c)
{
	gpr_timespec inf = gpr_inf_future(c->ac_deadline.clock_type);
	if (gpr_time_cmp(c->ac_deadline, inf) == 0)
		return -1;
	gpr_timespec now = gpr_now(GPR_CLOCK_MONOTONIC);
	gpr_timespec dl = gpr_convert_clock_type(c->ac_deadline, GPR_CLOCK_MONOTONIC);
	if (gpr_time_cmp(dl, now) <= 0)
		return 0;
	return gpr_time_to_millis(gpr_time_sub(dl, now));
}

/* protobuf-c unpacks nested messages recursively with no depth limit, and a TxnRequest
 * can nest itself through RequestOp.request_txn: a small body could exhaust the stack.
 * Scan the wire bytes first and refuse nesting deeper than this, as protobuf-go refuses
 * messages deeper than its recursion limit. */
#define API_MAX_TXN_DEPTH 100

static int read_varint(const uint8_t **p, const uint8_t *end, uint64_t *v)
{
	*v = 0;
	for (int shift = 0; shift < 64 && *p < end; shift += 7) {
		uint8_t b = *(*p)++;
		*v |= (uint64_t)(b & 0x7f) << shift;
		if (!(b & 0x80))
			return 0;
	}
	return -1;
}

/* Returns 0 if the message at [p, end) nests txns no deeper than the limit (or is malformed
 * in a way protobuf-c will reject anyway), -1 if too deep. is_txn: TxnRequest, else RequestOp. */
static int txn_depth_ok(const uint8_t *p, const uint8_t *end, int is_txn, int depth)
{
	if (depth > API_MAX_TXN_DEPTH)
		return -1;
	while (p < end) {
		uint64_t key, len;
		if (read_varint(&p, end, &key))
			return 0;
		switch (key & 7) {
		case 0:
			if (read_varint(&p, end, &len))
				return 0;
			break;
		case 1:
			p += 8;
			break;
		case 5:
			p += 4;
			break;
		case 2:
			if (read_varint(&p, end, &len) || len > (uint64_t)(end - p))
				return 0;
			if (is_txn && (key >> 3 == 2 || key >> 3 == 3)) {
				if (txn_depth_ok(p, p + len, 0, depth))
					return -1;
			} else if (!is_txn && key >> 3 == 4) {
				if (txn_depth_ok(p, p + len, 1, depth + 1))
					return -1;
			}
			p += len;
			break;
		default:
			return 0;
		}
	}
	return 0;
}

/* protobuf-c keeps a field numbered 0 as an unknown field, though the wire format forbids
 * it (grpc-go refuses it: "illegal tag 0"), and then cannot read back its own re-encoding.
 * Refuse such messages at the door, as etcd does. */
static int has_illegal_field(const ProtobufCMessage *m, int depth)
{
	if (m == NULL || depth > 200)
		return 0;
	for (unsigned i = 0; i < m->n_unknown_fields; i++)
		if (m->unknown_fields[i].tag == 0)
			return 1;
	const ProtobufCMessageDescriptor *d = m->descriptor;
	for (unsigned i = 0; i < d->n_fields; i++) {
		const ProtobufCFieldDescriptor *f = &d->fields[i];
		if (f->type != PROTOBUF_C_TYPE_MESSAGE)
			continue;
		const char *base = (const char *)m + f->offset;
		if (f->label == PROTOBUF_C_LABEL_REPEATED) {
			size_t n = *(const size_t *)((const char *)m + f->quantifier_offset);
			ProtobufCMessage *const *v = *(ProtobufCMessage *const *const *)base;
			for (size_t k = 0; k < n; k++)
				if (has_illegal_field(v[k], depth + 1))
					return 1;
		} else if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
			uint32_t which = *(const uint32_t *)((const char *)m + f->quantifier_offset);
			if (which == f->id && has_illegal_field(*(ProtobufCMessage *const *)base, depth + 1))
				return 1;
		} else if (has_illegal_field(*(ProtobufCMessage *const *)base, depth + 1)) {
			return 1;
		}
	}
	return 0;
}

int api_message_is_valid(const ProtobufCMessage *m)
{
	return !has_illegal_field(m, 0);
}

/* A registered method's call arrived: decode and dispatch, then ask for the next one. */
static void on_registered(api_pending *p, int ok)
{
	api_server *s = p->ap_server;
	if (!ok || s->as_shutting_down) {
		grpc_metadata_array_destroy(&p->ap_md);
		if (p->ap_payload)
			grpc_byte_buffer_destroy(p->ap_payload);
		return;
	}
	api_call *c = calloc(1, sizeof(*c));
	if (c == NULL) {
		/* Out of memory: drop the call; gRPC cancels it when unreffed. */
		grpc_call_unref(p->ap_call);
		grpc_metadata_array_destroy(&p->ap_md);
		if (p->ap_payload)
			grpc_byte_buffer_destroy(p->ap_payload);
		request_next(p);
		return;
	}
	c->ac_server = s;
	c->ac_method = p->ap_method;
	c->ac_call = p->ap_call;
	c->ac_deadline = p->ap_deadline;
	c->ac_md = p->ap_md; /* moves ownership of the array */
	c->ac_details = grpc_empty_slice();
	grpc_byte_buffer *payload = p->ap_payload;
	request_next(p);

	api_method *m = c->ac_method;
	if (m->am_streaming && m->am_stream) {
		grpc_call *call = c->ac_call;
		grpc_metadata_array md = c->ac_md;
		free(c);
		api__stream_start(s, m, call, &md);
		return;
	}
	if (m->am_streaming || m->am_fn == NULL) {
		if (payload)
			grpc_byte_buffer_destroy(payload);
		char msg[160];
		snprintf(msg, sizeof(msg), "keelson: method %s is not implemented yet", m->am_path);
		api_call_fail_msg(c, GRPC_STATUS_UNIMPLEMENTED, msg);
		return;
	}
	if (payload == NULL) {
		api_call_fail_msg(c, GRPC_STATUS_INTERNAL, "grpc: error unmarshalling request: no body");
		return;
	}
	grpc_byte_buffer_reader reader;
	grpc_slice body;
	if (!grpc_byte_buffer_reader_init(&reader, payload)) {
		grpc_byte_buffer_destroy(payload);
		api_call_fail_msg(c, GRPC_STATUS_INTERNAL, "grpc: error unmarshalling request: bad body");
		return;
	}
	body = grpc_byte_buffer_reader_readall(&reader);
	grpc_byte_buffer_reader_destroy(&reader);
	grpc_byte_buffer_destroy(payload);
	c->ac_req_size = GRPC_SLICE_LENGTH(body);
	if (c->ac_req_size > s->as_max_recv) {
		char msg[128];
		snprintf(msg, sizeof(msg), "grpc: received message larger than max (%zu vs. %zu)",
			 c->ac_req_size, s->as_max_recv);
		grpc_slice_unref(body);
		api_call_fail_msg(c, GRPC_STATUS_RESOURCE_EXHAUSTED, msg);
		return;
	}
	if (m->am_input == &etcdserverpb__txn_request__descriptor &&
	    txn_depth_ok(GRPC_SLICE_START_PTR(body), GRPC_SLICE_END_PTR(body), 1, 0) != 0) {
		grpc_slice_unref(body);
		api_call_fail_msg(c, GRPC_STATUS_INTERNAL,
				  "grpc: error unmarshalling request: exceeded maximum recursion depth");
		return;
	}
	c->ac_req = protobuf_c_message_unpack(m->am_input, NULL, GRPC_SLICE_LENGTH(body),
					      GRPC_SLICE_START_PTR(body));
	grpc_slice_unref(body);
	if (c->ac_req == NULL) {
		api_call_fail_msg(c, GRPC_STATUS_INTERNAL,
				  "grpc: error unmarshalling request: unexpected EOF");
		return;
	}
	if (!api_message_is_valid(c->ac_req)) {
		api_call_fail_msg(c, GRPC_STATUS_INTERNAL,
				  "grpc: error unmarshalling request: proto: illegal tag 0");
		return;
	}
	api__dispatch_begin(c->ac_call);
	m->am_fn(m->am_ctx, c, c->ac_req);
	api__dispatch_end();
}

/* A call for a path we do not serve: answer as grpc-go does. */
static void on_generic(api_pending *p, int ok)
{
	api_server *s = p->ap_server;
	if (!ok || s->as_shutting_down) {
		grpc_metadata_array_destroy(&p->ap_md);
		grpc_call_details_destroy(&p->ap_details);
		return;
	}
	api_call *c = calloc(1, sizeof(*c));
	if (c == NULL) {
		grpc_call_unref(p->ap_call);
		grpc_metadata_array_destroy(&p->ap_md);
		grpc_call_details_destroy(&p->ap_details);
		request_next(p);
		return;
	}
	c->ac_server = s;
	c->ac_call = p->ap_call;
	c->ac_deadline = p->ap_details.deadline;
	c->ac_md = p->ap_md;
	c->ac_details = grpc_empty_slice();
	char path[512];
	size_t plen = GRPC_SLICE_LENGTH(p->ap_details.method);
	if (plen >= sizeof(path))
		plen = sizeof(path) - 1;
	memcpy(path, GRPC_SLICE_START_PTR(p->ap_details.method), plen);
	path[plen] = '\0';
	grpc_call_details_destroy(&p->ap_details);
	request_next(p);

	/* "/pkg.Service/Method": grpc-go says which part it does not know. */
	char msg[600];
	const char *svc = path[0] == '/' ? path + 1 : path;
	const char *slash = strchr(svc, '/');
	int known_service = 0;
	if (slash) {
		for (size_t i = 0; i < sizeof(etcd_services) / sizeof(etcd_services[0]); i++) {
			const char *name = etcd_services[i]->name;
			if (strlen(name) == (size_t)(slash - svc) && memcmp(name, svc, slash - svc) == 0)
				known_service = 1;
		}
	}
	if (slash && known_service)
		snprintf(msg, sizeof(msg), "unknown method %s for service %.*s", slash + 1,
			 (int)(slash - svc), svc);
	else if (slash)
		snprintf(msg, sizeof(msg), "unknown service %.*s", (int)(slash - svc), svc);
	else
		snprintf(msg, sizeof(msg), "malformed method name: \"%s\"", path);
	/* grpc-go answers a path without a service with RESOURCE_EXHAUSTED, oddly; as etcd does. */
	api_call_fail_msg(c, slash ? GRPC_STATUS_UNIMPLEMENTED : GRPC_STATUS_RESOURCE_EXHAUSTED, msg);
}

static void *cq_thread(void *arg)
{
	prctl(PR_SET_NAME, "grpc-cq"); /* names the thread in top -H, perf, gdb */
	api_server *s = arg;
	for (;;) {
		grpc_event ev = grpc_completion_queue_next(s->as_cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
		if (ev.type == GRPC_QUEUE_SHUTDOWN)
			break;
		if (ev.type != GRPC_OP_COMPLETE)
			continue;
		tag_kind kind = *(tag_kind *)ev.tag;
		switch (kind) {
		case TAG_REGISTERED:
			on_registered(ev.tag, ev.success);
			break;
		case TAG_GENERIC:
			on_generic(ev.tag, ev.success);
			break;
		case TAG_CALL_DONE:
			call_free(ev.tag);
			break;
		case TAG_STREAM_RECV:
		case TAG_STREAM_SEND:
		case TAG_STREAM_CLOSE:
		case TAG_STREAM_STATUS:
			api__stream_event(ev.tag, ev.success);
			break;
		case TAG_SHUTDOWN:
			/* Every call has ended: let the threads drain the queue and exit. */
			grpc_completion_queue_shutdown(s->as_cq);
			break;
		}
	}
	return NULL;
}

int api_server_start(api_server *s)
{
	grpc_server_start(s->as_grpc);
	/* Hot KV methods get several waiting slots so that bursts need no round trip through
	 * the completion queue before the next call is accepted. */
	s->as_npending = 1;
	for (size_t i = 0; i < s->as_nmethods; i++)
		s->as_npending += strncmp(s->as_methods[i].am_path, "/etcdserverpb.KV/", 17) == 0
					  ? API_PENDING_PER_METHOD
					  : 1;
	s->as_pending = calloc(s->as_npending, sizeof(api_pending));
	s->as_threads = calloc((size_t)s->as_opts.ao_threads, sizeof(pthread_t));
	if (s->as_pending == NULL || s->as_threads == NULL)
		return API_ERR_SYS;
	size_t k = 0;
	for (size_t i = 0; i < s->as_nmethods; i++) {
		int slots = strncmp(s->as_methods[i].am_path, "/etcdserverpb.KV/", 17) == 0
				    ? API_PENDING_PER_METHOD
				    : 1;
		for (int j = 0; j < slots; j++) {
			api_pending *p = &s->as_pending[k++];
			p->ap_kind = TAG_REGISTERED;
			p->ap_server = s;
			p->ap_method = &s->as_methods[i];
			request_next(p);
		}
	}
	api_pending *g = &s->as_pending[k++];
	g->ap_kind = TAG_GENERIC;
	g->ap_server = s;
	request_next(g);

	for (int i = 0; i < s->as_opts.ao_threads; i++) {
		if (pthread_create(&s->as_threads[i], NULL, cq_thread, s) != 0)
			return API_ERR_SYS;
		s->as_nthreads++;
	}
	s->as_started = 1;
	return 0;
}

static tag_kind shutdown_tag = TAG_SHUTDOWN;

void api_server_shutdown(api_server *s)
{
	if (s->as_shutting_down)
		return;
	s->as_shutting_down = 1;
	grpc_server_shutdown_and_notify(s->as_grpc, s->as_cq, &shutdown_tag);
}

void api_server_destroy(api_server *s)
{
	if (s == NULL)
		return;
	api_server_shutdown(s);
	grpc_server_cancel_all_calls(s->as_grpc);
	if (s->as_nthreads > 0) {
		for (int i = 0; i < s->as_nthreads; i++)
			pthread_join(s->as_threads[i], NULL);
	} else {
		/* Never started: drain here what the threads would have. */
		grpc_event ev;
		do {
			ev = grpc_completion_queue_next(s->as_cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
			if (ev.type == GRPC_OP_COMPLETE && *(tag_kind *)ev.tag == TAG_SHUTDOWN)
				grpc_completion_queue_shutdown(s->as_cq);
		} while (ev.type != GRPC_QUEUE_SHUTDOWN);
	}
	grpc_server_destroy(s->as_grpc);
	grpc_completion_queue_destroy(s->as_cq);
	for (size_t i = 0; i < s->as_nmethods; i++)
		free(s->as_methods[i].am_path);
	free(s->as_methods);
	free(s->as_pending);
	free(s->as_threads);
	free(s);
	grpc_shutdown();
}
