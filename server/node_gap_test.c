/*
 * node_gap_test.c - etcd's "too many requests" rule (server.h, node_apply_gap_too_large):
 * proposals are refused once the committed index is more than maxGapBetweenApplyAndCommitIndex
 * (5000) ahead of the applied one, with etcd's ResourceExhausted "etcdserver: too many
 * requests". node.c's propose() applies it to every client proposal.
 */
#include <stdio.h>
#include <string.h>

#include "server/server.h"
#include "tests/unit/check.h"


int main(void)
{
	/* etcd: ci > ai + maxGapBetweenApplyAndCommitIndex */
	CHECK(NODE_MAX_APPLY_GAP == 5000);
	CHECK(!node_apply_gap_too_large(0, 0));
	CHECK(!node_apply_gap_too_large(5000, 0));
	CHECK(node_apply_gap_too_large(5001, 0));
	CHECK(!node_apply_gap_too_large(105000, 100000));
	CHECK(node_apply_gap_too_large(105001, 100000));
	/* applied ahead of a stale committed index (after a snapshot install): never refused */
	CHECK(!node_apply_gap_too_large(10, 100000));
	CHECK(!node_apply_gap_too_large(UINT64_MAX - 1, UINT64_MAX - 5001));
	CHECK(node_apply_gap_too_large(UINT64_MAX, UINT64_MAX - 5001));

	/* The error as etcd's rpctypes.ErrGRPCTooManyRequests. */
	const char *msg = NULL;
	int code = api_error_status(API_ERR_TOO_MANY_REQUESTS, &msg);
	CHECK(code == 8 /* RESOURCE_EXHAUSTED */);
	CHECK(msg && strcmp(msg, "etcdserver: too many requests") == 0);

	if (check_failures) {
		fprintf(stderr, "node_gap_test: %d check(s) failed\n", check_failures);
		return 1;
	}
	printf("node_gap_test: ok\n");
	return 0;
}
