/*
 * api_guard_glue.h - gives a fuzz target the REAL TxnRequest depth guard of the gRPC glue.
 *
 * txn_depth_ok() is static in api/grpc_server.c, so the fuzzers pull that whole file into
 * their translation unit (link with -lgrpc -lgpr; gRPC is never initialised) and stub the
 * two symbols it needs from api/stream.c. Once the guard lives in a file of its own
 * (suggested: api/wire_guard.c with a header), include that instead and drop gRPC.
 *
 * Include this exactly once per fuzz target, before anything that also defines api_* symbols.
 */
#ifndef KEELSON_FUZZ_API_GUARD_GLUE_H
#define KEELSON_FUZZ_API_GUARD_GLUE_H

#include <stdlib.h>

#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wunused-function"
#include "api/grpc_server.c"
#pragma clang diagnostic pop

/* api/stream.c is not linked: no stream is ever started by a fuzzer. */
void api__stream_start(api_server *s, api_method *m, grpc_call *call, grpc_metadata_array *md)
{
	(void)s, (void)m, (void)call, (void)md;
	abort();
}

void api__stream_event(void *tag, int ok)
{
	(void)tag, (void)ok;
	abort();
}

/* The depth the guard allows: a TxnRequest may nest this many TxnRequests below it. */
#define FUZZ_MAX_TXN_DEPTH API_MAX_TXN_DEPTH

/* 1 if the server would hand these TxnRequest wire bytes to protobuf-c, 0 if it refuses them. */
static inline int fuzz_txn_wire_ok(const uint8_t *p, size_t n)
{
	return txn_depth_ok(p, p + n, 1, 0) == 0;
}

/* Nesting depth of a decoded TxnRequest: 0 when no op is itself a txn. */
static inline int fuzz_txn_depth(const Etcdserverpb__TxnRequest *t)
{
	int d = 0;
	for (int side = 0; side < 2; side++) {
		size_t n = side ? t->n_failure : t->n_success;
		Etcdserverpb__RequestOp **ops = side ? t->failure : t->success;
		for (size_t i = 0; i < n; i++) {
			if (ops[i]->request_case != ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_TXN ||
			    ops[i]->request_txn == NULL)
				continue;
			int c = 1 + fuzz_txn_depth(ops[i]->request_txn);
			if (c > d)
				d = c;
		}
	}
	return d;
}

#endif
