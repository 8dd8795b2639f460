/*
 * client.c - the gRPC client side of keelsonutl on gRPC core's C API: channels (plain or
 * TLS), the server-streaming Maintenance.Snapshot call, and a unary Maintenance.HashKV.
 *
 * One call at a time on a pluck completion queue; each batch is waited for by its tag, so
 * every loop here is bounded by the call's deadline (--command-timeout) or, without one, by
 * gRPC keepalive pings that fail a call whose server went away.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "api/proto/rpc.pb-c.h"
#include "tools/keelsonutl/keelsonutl.h"

#define METHOD_SNAPSHOT "/etcdserverpb.Maintenance/Snapshot"
#define METHOD_HASHKV "/etcdserverpb.Maintenance/HashKV"
#define METHOD_AUTHENTICATE "/etcdserverpb.Auth/Authenticate"

static char *read_pem(const char *path, char *errbuf, size_t errlen)
{
	FILE *f = fopen(path, "rb");
	if (f == NULL) {
		ku_errf(errbuf, errlen, KU_ERR_IO, "open %s: %m", path);
		return NULL;
	}
	size_t cap = 8192, len = 0, n;
	char *buf = malloc(cap);
	while (buf && (n = fread(buf + len, 1, cap - len - 1, f)) > 0) {
		len += n;
		if (cap - len < 2) {
			char *nb = realloc(buf, cap *= 2);
			if (nb == NULL) {
				free(buf);
				buf = NULL;
			}
			buf = nb;
		}
	}
	fclose(f);
	if (buf == NULL) {
		ku_errf(errbuf, errlen, KU_ERR_NOMEM, "out of memory reading %s", path);
		return NULL;
	}
	buf[len] = '\0';
	return buf;
}

/* Shuts cq down and destroys it once empty. Bounded: if an event never comes (a gRPC bug),
 * the queue is leaked rather than the process hung. */
static void drain_queue(grpc_completion_queue *cq)
{
	grpc_completion_queue_shutdown(cq);
	for (;;) {
		gpr_timespec limit = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
						  gpr_time_from_millis(2000, GPR_TIMESPAN));
		grpc_event ev = grpc_completion_queue_next(cq, limit, NULL);
		if (ev.type == GRPC_QUEUE_SHUTDOWN)
			break;
		if (ev.type == GRPC_QUEUE_TIMEOUT)
			return;
	}
	grpc_completion_queue_destroy(cq);
}

/* A channel to endpoint i, connected (READY) within the dial timeout. */
static int conn_open(const ku_conn_opts *o, int i, grpc_channel **out, char *errbuf, size_t errlen)
{
	const char *target = o->co_endpoints[i];
	int tls = o->co_cacert || o->co_cert;
	if (strncmp(target, "http://", 7) == 0) {
		target += 7;
	} else if (strncmp(target, "https://", 8) == 0) {
		target += 8;
		tls = 1;
	}
	grpc_arg args[] = {
		{GRPC_ARG_INTEGER, GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, {.integer = -1}},
		{GRPC_ARG_INTEGER, GRPC_ARG_ENABLE_RETRIES, {.integer = 0}},
		{GRPC_ARG_INTEGER, GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, {.integer = 1}},
		/* A server that dies mid-stream fails the call instead of hanging it. */
		{GRPC_ARG_INTEGER, GRPC_ARG_KEEPALIVE_TIME_MS, {.integer = 10000}},
		{GRPC_ARG_INTEGER, GRPC_ARG_KEEPALIVE_TIMEOUT_MS, {.integer = 10000}},
		{GRPC_ARG_INTEGER, GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, {.integer = 0}},
	};
	grpc_channel_args ca = {sizeof(args) / sizeof(args[0]), args};
	grpc_channel_credentials *creds;
	if (tls) {
		char *root = NULL, *cert = NULL, *key = NULL;
		if (o->co_cacert && (root = read_pem(o->co_cacert, errbuf, errlen)) == NULL)
			return KU_ERR_IO;
		if (o->co_cert && ((cert = read_pem(o->co_cert, errbuf, errlen)) == NULL ||
				   (key = read_pem(o->co_key, errbuf, errlen)) == NULL)) {
			free(root);
			free(cert);
			return KU_ERR_IO;
		}
		grpc_ssl_pem_key_cert_pair kp = {key, cert};
		creds = grpc_ssl_credentials_create(root, cert ? &kp : NULL, NULL, NULL);
		free(root);
		free(cert);
		free(key);
	} else {
		creds = grpc_insecure_credentials_create();
	}
	grpc_channel *ch = grpc_channel_create(target, creds, &ca);
	grpc_channel_credentials_release(creds);

	grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
	gpr_timespec deadline = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
					     gpr_time_from_millis((int64_t)(o->co_dial_timeout * 1000), GPR_TIMESPAN));
	/* gRPC may deliver a connectivity watch late (grpc/grpc#16128): never wait on the queue
	 * past the dial deadline and a second, so a stuck watch cannot hang the tool. */
	gpr_timespec wait_limit = gpr_time_add(deadline, gpr_time_from_millis(1000, GPR_TIMESPAN));
	int stuck = 0;
	grpc_connectivity_state st = grpc_channel_check_connectivity_state(ch, 1);
	while (st != GRPC_CHANNEL_READY) {
		grpc_channel_watch_connectivity_state(ch, st, deadline, cq, NULL);
		grpc_event ev = grpc_completion_queue_next(cq, wait_limit, NULL);
		if (ev.type == GRPC_QUEUE_TIMEOUT) {
			stuck = 1; /* the watch is still pending */
			break;
		}
		st = grpc_channel_check_connectivity_state(ch, 1);
		if (ev.type != GRPC_OP_COMPLETE || !ev.success)
			break; /* the dial deadline passed */
	}
	if (st != GRPC_CHANNEL_READY || stuck) {
		/* Destroying the channel completes a pending watch; then the queue drains. */
		grpc_channel_destroy(ch);
		drain_queue(cq);
		return ku_errf(errbuf, errlen, KU_ERR_CONNECT, "%s: no connection within %.1fs (%s)",
			       o->co_endpoints[i], o->co_dial_timeout,
			       tls ? "TLS handshake or connect failed" : "connect failed");
	}
	drain_queue(cq);
	*out = ch;
	return 0;
}

static gpr_timespec call_deadline(const ku_conn_opts *o)
{
	if (o->co_command_timeout <= 0)
		return gpr_inf_future(GPR_CLOCK_MONOTONIC);
	return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
			    gpr_time_from_millis((int64_t)(o->co_command_timeout * 1000), GPR_TIMESPAN));
}

/* Runs one batch and waits for it. Returns the batch's success flag (0/1) or -1. */
static int run_batch(grpc_call *call, grpc_completion_queue *cq, grpc_op *ops, size_t n, void *tag)
{
	if (grpc_call_start_batch(call, ops, n, tag, NULL) != GRPC_CALL_OK)
		return -1;
	grpc_event ev = grpc_completion_queue_pluck(cq, tag, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
	return ev.type == GRPC_OP_COMPLETE ? ev.success : -1;
}

static grpc_slice buffer_slice(grpc_byte_buffer *bb)
{
	grpc_byte_buffer_reader rd;
	if (!grpc_byte_buffer_reader_init(&rd, bb))
		return grpc_empty_slice();
	grpc_slice all = grpc_byte_buffer_reader_readall(&rd);
	grpc_byte_buffer_reader_destroy(&rd);
	return all;
}

static int status_error(grpc_status_code code, grpc_slice details, const char *ep,
			char *errbuf, size_t errlen)
{
	char *d = grpc_slice_to_c_string(details);
	int rc = ku_errf(errbuf, errlen, KU_ERR_RPC, "%s: rpc error: code = %d desc = %s", ep,
			 (int)code, d);
	gpr_free(d);
	return rc;
}

/* One unary call: req (packed) out, the response's bytes into *resp (caller unrefs).
 * token (may be NULL) goes out as the "token" metadata etcd's servers read. */
static int unary_call(grpc_channel *ch, const ku_conn_opts *o, int ep, const char *method,
		      const uint8_t *req, size_t reqlen, const char *token, grpc_slice *resp,
		      char *errbuf, size_t errlen)
{
	grpc_slice sl = grpc_slice_from_copied_buffer((const char *)req, reqlen);
	grpc_byte_buffer *send = grpc_raw_byte_buffer_create(&sl, 1), *recv = NULL;
	grpc_slice_unref(sl);
	grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
	ku_conn_opts o2 = *o;
	if (o2.co_command_timeout <= 0)
		o2.co_command_timeout = 60;
	grpc_call *call = grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq,
						   grpc_slice_from_static_string(method), NULL,
						   call_deadline(&o2), NULL);
	grpc_metadata_array md_init, md_trail;
	grpc_metadata_array_init(&md_init);
	grpc_metadata_array_init(&md_trail);
	grpc_status_code code = GRPC_STATUS_UNKNOWN;
	grpc_slice details = grpc_empty_slice();
	grpc_metadata md;
	memset(&md, 0, sizeof(md));
	if (token) {
		md.key = grpc_slice_from_static_string("token");
		md.value = grpc_slice_from_copied_string(token);
	}
	grpc_op ops[6];
	memset(ops, 0, sizeof(ops));
	ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
	ops[0].data.send_initial_metadata.count = token ? 1 : 0;
	ops[0].data.send_initial_metadata.metadata = token ? &md : NULL;
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
	int ok = run_batch(call, cq, ops, 6, (void *)1);
	int rc = 0;
	if (ok != 1)
		rc = ku_errf(errbuf, errlen, KU_ERR_RPC, "%s: %s failed", o->co_endpoints[ep], method);
	else if (code != GRPC_STATUS_OK)
		rc = status_error(code, details, o->co_endpoints[ep], errbuf, errlen);
	else
		*resp = recv ? buffer_slice(recv) : grpc_empty_slice();
	if (token)
		grpc_slice_unref(md.value);
	if (recv)
		grpc_byte_buffer_destroy(recv);
	grpc_byte_buffer_destroy(send);
	grpc_slice_unref(details);
	grpc_metadata_array_destroy(&md_init);
	grpc_metadata_array_destroy(&md_trail);
	grpc_call_unref(call);
	grpc_completion_queue_shutdown(cq);
	grpc_completion_queue_destroy(cq);
	return rc;
}

/* Auth.Authenticate with --user/--password; *token (gpr_free) is NULL without a user. */
static int authenticate(grpc_channel *ch, const ku_conn_opts *o, int ep, char **token,
			char *errbuf, size_t errlen)
{
	*token = NULL;
	if (o->co_user == NULL)
		return 0;
	Etcdserverpb__AuthenticateRequest req = ETCDSERVERPB__AUTHENTICATE_REQUEST__INIT;
	req.name = (char *)o->co_user;
	req.password = (char *)(o->co_password ? o->co_password : "");
	size_t n = etcdserverpb__authenticate_request__get_packed_size(&req);
	uint8_t *buf = malloc(n ? n : 1);
	if (buf == NULL)
		return ku_errf(errbuf, errlen, KU_ERR_NOMEM, "out of memory");
	etcdserverpb__authenticate_request__pack(&req, buf);
	grpc_slice s;
	int rc = unary_call(ch, o, ep, METHOD_AUTHENTICATE, buf, n, NULL, &s, errbuf, errlen);
	free(buf);
	if (rc)
		return rc;
	Etcdserverpb__AuthenticateResponse *m = etcdserverpb__authenticate_response__unpack(
		NULL, GRPC_SLICE_LENGTH(s), GRPC_SLICE_START_PTR(s));
	grpc_slice_unref(s);
	if (m == NULL || m->token == NULL || m->token[0] == '\0') {
		if (m)
			etcdserverpb__authenticate_response__free_unpacked(m, NULL);
		return ku_errf(errbuf, errlen, KU_ERR_RPC, "%s: Authenticate gave no token",
			       o->co_endpoints[ep]);
	}
	*token = strdup(m->token);
	etcdserverpb__authenticate_response__free_unpacked(m, NULL);
	return 0;
}

/* Every grpc_init() here is paired with grpc_shutdown_blocking(), so the library's clean-up
 * is done before the tool goes on (grpc_shutdown() may leave it to a detached thread). Not
 * enough on its own at exit: see OPENSSL_INIT_NO_ATEXIT in main.c. */
int ku_snapshot_stream(const ku_conn_opts *o, ku_sink_fn sink, void *ctx, int *endpoint_used,
		       char *errbuf, size_t errlen)
{
	grpc_init();
	grpc_channel *ch = NULL;
	int rc = KU_ERR_CONNECT, ep;
	char first[KU_ERRLEN] = "";
	for (ep = 0; ep < o->co_n_endpoints; ep++) {
		rc = conn_open(o, ep, &ch, errbuf, errlen);
		if (rc == 0)
			break;
		if (!first[0])
			snprintf(first, sizeof(first), "%s", errbuf);
	}
	if (rc) {
		if (o->co_n_endpoints > 1)
			ku_errf(errbuf, errlen, rc, "no endpoint answered: %s", first);
		grpc_shutdown_blocking();
		return rc;
	}
	if (endpoint_used)
		*endpoint_used = ep;
	char *token = NULL;
	if ((rc = authenticate(ch, o, ep, &token, errbuf, errlen))) {
		grpc_channel_destroy(ch);
		grpc_shutdown_blocking();
		return rc;
	}

	grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
	grpc_slice method = grpc_slice_from_static_string(METHOD_SNAPSHOT);
	grpc_call *call = grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, method, NULL,
						   call_deadline(o), NULL);
	grpc_metadata_array md_init, md_trail;
	grpc_metadata_array_init(&md_init);
	grpc_metadata_array_init(&md_trail);
	grpc_slice empty = grpc_empty_slice();
	grpc_byte_buffer *req = grpc_raw_byte_buffer_create(&empty, 1); /* SnapshotRequest{} */
	grpc_metadata md;
	memset(&md, 0, sizeof(md));
	if (token) {
		md.key = grpc_slice_from_static_string("token");
		md.value = grpc_slice_from_copied_string(token);
	}
	grpc_op ops[4];
	memset(ops, 0, sizeof(ops));
	ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
	ops[0].data.send_initial_metadata.count = token ? 1 : 0;
	ops[0].data.send_initial_metadata.metadata = token ? &md : NULL;
	ops[1].op = GRPC_OP_SEND_MESSAGE;
	ops[1].data.send_message.send_message = req;
	ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
	ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
	ops[3].data.recv_initial_metadata.recv_initial_metadata = &md_init;
	int ok = run_batch(call, cq, ops, 4, (void *)1);
	grpc_byte_buffer_destroy(req);

	/* Messages until the stream ends (NULL) or the sink stops us. */
	rc = 0;
	int bad_msg = 0;
	while (ok == 1 && rc == 0) {
		grpc_byte_buffer *bb = NULL;
		memset(ops, 0, sizeof(ops));
		ops[0].op = GRPC_OP_RECV_MESSAGE;
		ops[0].data.recv_message.recv_message = &bb;
		if (run_batch(call, cq, ops, 1, (void *)2) != 1 || bb == NULL)
			break;
		grpc_slice s = buffer_slice(bb);
		grpc_byte_buffer_destroy(bb);
		Etcdserverpb__SnapshotResponse *m = etcdserverpb__snapshot_response__unpack(
			NULL, GRPC_SLICE_LENGTH(s), GRPC_SLICE_START_PTR(s));
		grpc_slice_unref(s);
		if (m == NULL) {
			bad_msg = 1;
			break;
		}
		if (m->blob.len)
			rc = sink(ctx, m->blob.data, m->blob.len, m->remaining_bytes);
		etcdserverpb__snapshot_response__free_unpacked(m, NULL);
	}
	if (rc || bad_msg)
		grpc_call_cancel(call, NULL);

	grpc_status_code code = GRPC_STATUS_UNKNOWN;
	grpc_slice details = grpc_empty_slice();
	memset(ops, 0, sizeof(ops));
	ops[0].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
	ops[0].data.recv_status_on_client.trailing_metadata = &md_trail;
	ops[0].data.recv_status_on_client.status = &code;
	ops[0].data.recv_status_on_client.status_details = &details;
	int st = run_batch(call, cq, ops, 1, (void *)3);
	if (rc == 0) {
		if (bad_msg)
			rc = ku_errf(errbuf, errlen, KU_ERR_RPC, "%s: a snapshot message did not decode",
				     o->co_endpoints[ep]);
		else if (st != 1)
			rc = ku_errf(errbuf, errlen, KU_ERR_RPC, "%s: the call failed", o->co_endpoints[ep]);
		else if (code != GRPC_STATUS_OK)
			rc = status_error(code, details, o->co_endpoints[ep], errbuf, errlen);
	}
	grpc_slice_unref(details);
	if (token) {
		grpc_slice_unref(md.value);
		free(token);
	}
	grpc_metadata_array_destroy(&md_init);
	grpc_metadata_array_destroy(&md_trail);
	grpc_call_unref(call);
	grpc_completion_queue_shutdown(cq);
	grpc_completion_queue_destroy(cq);
	grpc_channel_destroy(ch);
	grpc_shutdown_blocking();
	return rc;
}

int ku_hash_kv(const ku_conn_opts *o, int ep, int64_t rev, uint32_t *hash, int64_t *compact_rev,
	       char *errbuf, size_t errlen)
{
	grpc_init();
	grpc_channel *ch;
	int rc = conn_open(o, ep, &ch, errbuf, errlen);
	if (rc) {
		grpc_shutdown_blocking();
		return rc;
	}
	char *token = NULL;
	rc = authenticate(ch, o, ep, &token, errbuf, errlen);
	Etcdserverpb__HashKVRequest req = ETCDSERVERPB__HASH_KVREQUEST__INIT;
	req.revision = rev;
	uint8_t buf[32];
	size_t n = etcdserverpb__hash_kvrequest__pack(&req, buf);
	grpc_slice s;
	if (rc == 0)
		rc = unary_call(ch, o, ep, METHOD_HASHKV, buf, n, token, &s, errbuf, errlen);
	if (rc == 0) {
		Etcdserverpb__HashKVResponse *m = etcdserverpb__hash_kvresponse__unpack(
			NULL, GRPC_SLICE_LENGTH(s), GRPC_SLICE_START_PTR(s));
		grpc_slice_unref(s);
		if (m == NULL) {
			rc = ku_errf(errbuf, errlen, KU_ERR_RPC, "%s: HashKV response did not decode",
				     o->co_endpoints[ep]);
		} else {
			*hash = m->hash;
			*compact_rev = m->compact_revision;
			etcdserverpb__hash_kvresponse__free_unpacked(m, NULL);
		}
	}
	free(token);
	grpc_channel_destroy(ch);
	grpc_shutdown_blocking();
	return rc;
}
