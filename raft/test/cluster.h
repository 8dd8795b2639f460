/* cluster.h - an in-memory cluster for unit and scenario tests: each node
 * has a durable "disk" (hard state, log, snapshot), an applied history and
 * a network queue with controllable delivery. Single-threaded, no clock. */
#ifndef KEELSON_RAFT_TEST_CLUSTER_H
#define KEELSON_RAFT_TEST_CLUSTER_H

#include <stdio.h>

#include "raft/raft.h"

#define TC_MAX 8

struct tc_applied {
    uint64_t index;
    uint64_t term;
    uint8_t type;
    char data[64];
};

struct tc_node {
    uint64_t id;
    struct raft *r;
    bool down;
    /* disk */
    struct raft_hard_state hs;
    struct raft_entry *log;
    size_t n_log;
    struct raft_snapshot snap;
    bool has_snap;
    /* state machine: a hash chain over applied entries */
    uint64_t sm_index;
    uint64_t sm_hash;
    struct tc_applied *applied;
    size_t n_applied;
    struct raft_read_state reads[64];
    size_t n_reads;
};

struct tc_config {
    bool prevote;
    bool check_quorum;
    unsigned election;
    unsigned heartbeat;
    unsigned max_inflight;
    uint64_t max_inflight_bytes;
    uint64_t max_msg_bytes;
    uint64_t seed;
};

struct tcluster {
    size_t n;
    struct tc_node nodes[TC_MAX + 1]; /* 1-based */
    struct tc_config cfg;
    struct raft_conf conf;
    struct raft_message *q; /* in flight (deep copies) */
    size_t nq, capq;
    bool cut[TC_MAX + 1][TC_MAX + 1];
    FILE *log; /* if non-NULL, events are printed here */
};

void tc_default_config(struct tc_config *c);
/* Nodes 1..n voters, nodes n+1..n+learners learners, nodes up to total
 * created (extra ones start with an empty configuration: joiners). */
void tc_init(struct tcluster *tc, size_t voters, size_t learners, size_t total,
             const struct tc_config *cfg);
void tc_close(struct tcluster *tc);
void tc_restart(struct tcluster *tc, uint64_t id); /* crash + boot from disk */
void tc_crash(struct tcluster *tc, uint64_t id);

/* Processes every Ready of node id (persist, queue messages, apply,
 * advance). Returns the number of Readys handled. */
int tc_process(struct tcluster *tc, uint64_t id);
/* Delivers queued messages addressed to id (all if id == 0) once. */
int tc_deliver(struct tcluster *tc, uint64_t id);
/* Process and deliver until no node has work (max rounds). */
void tc_stabilize(struct tcluster *tc);
void tc_tick(struct tcluster *tc, uint64_t id, unsigned n);
void tc_isolate(struct tcluster *tc, uint64_t id);
void tc_heal(struct tcluster *tc);
void tc_cut(struct tcluster *tc, uint64_t a, uint64_t b);
uint64_t tc_leader(struct tcluster *tc); /* the highest-term leader, or 0 */
void tc_drop_queue(struct tcluster *tc, uint64_t to);

void tc_fmt_msg(const struct raft_message *m, char *buf, size_t len);
void tc_print_status(struct tcluster *tc, uint64_t id, FILE *out);
void tc_print_log(struct tcluster *tc, uint64_t id, FILE *out);

void tc_msg_clone(const struct raft_message *in, struct raft_message *out);
void tc_msg_free(struct raft_message *m);



/* Compacts node id's log up to its applied index (memory and disk). */
int tc_compact(struct tcluster *tc, uint64_t id);
#endif
