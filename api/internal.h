/*
 * internal.h - what the files of api/ share; not for use outside api/.
 */
#ifndef KEELSON_API_INTERNAL_H
#define KEELSON_API_INTERNAL_H

#include <pthread.h>

#include <grpc/grpc.h>

#include "api/api.h"

typedef enum tag_kind {
	TAG_REGISTERED, /* a registered method's call arrived */
	TAG_GENERIC,    /* a call for a path we do not serve arrived */
	TAG_CALL_DONE,  /* the reply batch of a call completed */
	TAG_SHUTDOWN,
	TAG_STREAM_RECV,  /* a streaming call's next message (or its half-close) arrived */
	TAG_STREAM_SEND,  /* a streaming call's send completed */
	TAG_STREAM_CLOSE, /* a streaming call ended (RECV_CLOSE_ON_SERVER) */
	TAG_STREAM_STATUS, /* a streaming call's status was sent */
} tag_kind;

typedef struct api_method {
	char *am_path;
	const ProtobufCMessageDescriptor *am_input;
	void *am_registered;   /* grpc_server_register_method() handle */
	int am_streaming;      /* client or server streaming: not served by the unary path */
	api_unary_fn am_fn;
	const api_stream_handlers *am_stream; /* for streaming methods */
	void *am_ctx;
} api_method;

/* A request slot: where gRPC core writes the next call of one method. */
typedef struct api_pending {
	tag_kind ap_kind;
	api_server *ap_server;
	api_method *ap_method;
	grpc_call *ap_call;
	gpr_timespec ap_deadline;
	grpc_metadata_array ap_md;
	grpc_byte_buffer *ap_payload;
	grpc_call_details ap_details; /* generic calls only */
} api_pending;

struct api_call {
	tag_kind ac_kind;
	api_server *ac_server;
	api_method *ac_method;
	grpc_call *ac_call;
	grpc_metadata_array ac_md;
	ProtobufCMessage *ac_req;
	size_t ac_req_size;
	grpc_byte_buffer *ac_resp;
	grpc_slice ac_details;
	int ac_cancelled;
	gpr_timespec ac_deadline; /* the client's, as gRPC core reported it */
};

struct api_server {
	api_options as_opts;
	grpc_server *as_grpc;
	grpc_completion_queue *as_cq;
	api_method *as_methods;
	size_t as_nmethods;
	api_pending *as_pending;
	size_t as_npending;
	pthread_t *as_threads;
	int as_nthreads;
	int as_started;
	int as_shutting_down;
	size_t as_max_recv; /* largest request body accepted, as etcd's grpc-go server */
};

/* grpc_server.c: whether a decoded message is one etcd would accept (no field numbered 0). */
int api_message_is_valid(const ProtobufCMessage *m);
/* stream.c: a streaming call arrived on a registered method. Takes ownership of the call
 * and metadata. */
void api__stream_start(api_server *s, api_method *m, grpc_call *call, grpc_metadata_array *md);
/* grpc_server.c: a handler runs for call on this thread (api_dispatch_peer_cn's subject). */
void api__dispatch_begin(grpc_call *call);
void api__dispatch_end(void);
/* stream.c: handles a completion whose tag belongs to a stream. */
void api__stream_event(void *tag, int ok);

#endif
