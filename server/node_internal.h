/*
 * node_internal.h - the node loop's state, shared by the files that make up the node
 * (node.c: the loop, proposals and the Ready; node_snap.c: state snapshots for followers
 * behind the leader's compacted log). Used only from the node loop's thread unless a field
 * says otherwise.
 */
#ifndef KEELSON_SERVER_NODE_INTERNAL_H
#define KEELSON_SERVER_NODE_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include <uv.h>

#include "raft/raft.h"
#include "server/peer.h"
#include "server/server.h"

/* Bounds how many queued requests one turn proposes, so replies are never held long. */
#define NODE_MAX_BATCH 4096
/* Revisions removed per batch while a compaction is still being carried out. */
#define NODE_COMPACT_STEP 10000
/* How often expired leases are looked for, and at most how many are revoked per look
 * (etcd revokes at most 1000 leases a second, so expiry never floods the log). */
#define NODE_LEASE_CHECK_MS 500
#define NODE_LEASE_REVOKES_PER_CHECK 500
/* Log entries kept in memory behind the applied index for followers that lag. */
#define NODE_LOG_KEEP 5000
/* Peer frame types (the first byte of every transport message). 1 was a lease keep-alive
 * a follower passed on without an answer; its forwarding is now a FRAME_RPC question. */
#define FRAME_RAFT 0
#define FRAME_CLUSTER_ID 2 /* a member tells a peer the cluster id once connected */
#define FRAME_SNAP_CHUNK 3 /* a piece of a state snapshot (node_snap.c) */
#define FRAME_SNAP_DONE 4  /* its end: size, SHA-256 and the Raft snapshot message */
#define FRAME_RPC 5        /* the request channel (peer.h, REQUESTS; node_ask.c) */

typedef struct node_snap node_snap;
typedef struct node_req node_req;
typedef struct node_ask_req node_ask_req;
struct node_req {
	node_op nr_op;
	api_call *nr_call;              /* NULL: internal (expiry revoke, alarm) */
	const ProtobufCMessage *nr_msg; /* owned by the call, or by the node if nr_owns_msg */
	int nr_owns_msg;                /* internal requests: the node frees nr_msg */
	uint64_t nr_seq;                /* proposal sequence: matches the applied entry */
	uint64_t nr_read_index;         /* reads: the index their round confirmed */
	uint64_t nr_deadline_ms;
	uint64_t nr_member;             /* member changes */
	int nr_learner;
	char **nr_urls;                 /* peer URLs; client URLs when nr_publish */
	size_t nr_n_urls;
	int nr_publish;                 /* NODE_MEMBER_UPDATE: this member's name and client URLs */
	node_ask_req *nr_ask;           /* NODE_ASK: the question (owned until the loop takes it) */
	void (*nr_done)(void *arg, int err); /* NODE_READ_BARRIER: see node_read_barrier() */
	void *nr_done_arg;
	node_req *nr_next;
};

/* A configuration change the leader will propose once Raft takes calls again. */
typedef struct pending_conf {
	int pc_op; /* enum raft_conf_op */
	uint64_t pc_node;
	uint64_t pc_deadline_ms;
} pending_conf;

#define NODE_MAX_PENDING_CONF 16

/* Appends r to the queue head..tail (node_req's nr_next chain); the caller holds its lock. */
static inline void node_req_append(node_req **head, node_req **tail, node_req *r)
{
	r->nr_next = NULL;
	if (*tail)
		(*tail)->nr_next = r;
	else
		*head = r;
	*tail = r;
}

/* Threads that serve linearizable reads once their read index is applied (node_read.c). */
#define NODE_READ_WORKERS 2

typedef struct read_pool {
	pthread_mutex_t rp_mu; /* guards the queue and rp_stop */
	pthread_cond_t rp_cond;
	node_req *rp_head, *rp_tail;
	int rp_stop;
	pthread_t rp_threads[NODE_READ_WORKERS];
	int rp_nthreads;
} read_pool;

typedef struct read_round {
	uint64_t rr_id;
	uint64_t rr_index; /* 0 until the read index is known */
	node_req *rr_reqs;
	struct read_round *rr_next;
} read_round;

struct node {
	server_ctx *n_sc;
	uv_loop_t n_loop;
	uv_async_t n_wake;
	uv_check_t n_stepped;         /* takes the Ready once a turn's peer messages are stepped */
	uv_prepare_t n_idle_check;    /* tells storage, before the loop waits, if an apply is near */
	int n_step_pending;
	uv_async_t n_stop;
	uv_timer_t n_tick;
	uv_timer_t n_lease_timer;
	uv_timer_t n_timeout_timer;
	pthread_t n_thread;

	pthread_mutex_t n_mu; /* guards the queue */
	node_req *n_head, *n_tail;
	int n_stopping;

	struct raft *n_raft;
	peer_transport *n_peers;
	uint64_t n_next_seq;
	node_req *n_waiters;          /* proposed, waiting for their entry to apply (seq order) */
	node_req *n_waiters_tail;
	node_req *n_conf_waiters;     /* member changes waiting for their configuration change */
	node_req *n_transfer;         /* a MoveLeader waiting for the new leader */
	node_req *n_leaderless;       /* proposals waiting for a leader to be known */
	/* Members whose removal entry applied here and whose Raft removal has not: a new
	 * leader proposes what its predecessor did not (reconcile_conf). The member list
	 * keeps a member until Raft's change applies, so this is the only trace. */
	uint64_t n_removing[NODE_MAX_PENDING_CONF];
	size_t n_nremoving;
	pending_conf n_pending_conf[NODE_MAX_PENDING_CONF];
	size_t n_npending_conf;
	node_req *n_reads;            /* linearizable reads not yet in a round */
	read_round *n_rounds;
	read_pool n_read_pool;        /* serves the rounds whose index is applied */
	uint64_t n_next_round;
	uint64_t n_log_snapshot;      /* index of the last log snapshot point */
	node_snap *n_snap;            /* snapshot transfers (node_snap.c) */
	uint64_t n_peer_ids[MEMBER_LIST_MAX]; /* the members the transport knows */
	_Atomic uint64_t n_active[MEMBER_LIST_MAX]; /* peers whose connection is up, 0: free */
	size_t n_npeers;
	int n_role;                   /* enum raft_role */
	int n_published;              /* this start's name and client URLs were proposed */
	int n_was_member;             /* started from a data dir that had applied entries */
	uint64_t n_refusing[MEMBER_LIST_MAX]; /* peers refusing us as an unknown member */
	size_t n_nrefusing;
	int n_removed;
	uint64_t n_req_timeout_ms;

	node_req *n_compact_waiters; /* physical compactions waiting for the removal to finish */
	int n_compacting;

	_Atomic uint64_t n_term;
	_Atomic uint64_t n_applied;
	_Atomic uint64_t n_last_index;
	_Atomic uint64_t n_lead;
	_Atomic int n_lone_voter;  /* the configuration is this member alone */
	_Atomic int n_learner; /* this member is a learner */
	_Atomic uint64_t n_stat_requests;
	_Atomic uint64_t n_stat_commits;
	_Atomic uint64_t n_commit;     /* Raft's commit index as of the last Ready */

	peer_rpc *n_rpc;              /* questions between members (node_ask.c) */
	node_ask_req *n_asks;         /* questions waiting for an answer */
	uv_timer_t n_ask_timer;       /* their deadlines and retries, while there are some */
	uv_timer_t n_probe_timer;     /* round-trip probes to every peer (node_ask.c) */
	int n_ask_closed;

	node_metrics n_metrics;
};

/* ---- node.c ---- */

uint64_t node_now_ns(void);

void node_req_free(node_req *r);
/* Ends r's call (if any) with e and frees r. */
void node_req_fail(node_req *r, api_error e);

/* Takes Raft's Ready once the current loop turn's I/O is done (after the peer messages that
 * arrived together have all been stepped). */
void node_ready_soon(node *n);
/* Publishes Raft's configuration and log end to the gRPC threads' atomics. */
void node_conf_status(node *n);

/* Queues r for the loop (from any thread); fails it "server stopped" once stopping. */
void node_enqueue(node *n, node_req *r);

/* ---- node_ask.c ---- */

/* Sets up the request channel on the node's transport; 0 or a PEER_E* code. */
int node_ask_init(node *n);
/* The loop takes a question queued by node_ask(). */
void node_ask_begin(node *n, node_ask_req *a);
/* A question the loop never took (the member stops): ends it NODE_ASK_ESTOPPED, frees it. */
void node_ask_abandon(node_ask_req *a);
/* The leader changed (inside a Ready): questions in flight elsewhere are asked again. */
void node_ask_leader_changed(node *n, uint64_t lead);
/* Stopping: every question ends NODE_ASK_ESTOPPED; the channel and its timer close. */
void node_ask_close(node *n);

/* ---- node_boot.c ---- */

/* Restores Raft from the log in storage, or starts it from the member list. */
int node_raft_boot(node *n);

/* ---- node_read.c ---- */

/* Starts one read-index round for every read that arrived since the last one. */
void node_read_start_round(node *n);
/* Raft confirmed the read index of a round. */
void node_read_index_known(node *n, const struct raft_read_state *rs);
/* Hands every read round whose read index has been applied to the read pool. */
void node_read_serve(node *n);
/* Starts the read pool's threads; 0 or -1. */
int node_read_pool_start(node *n);
/* Stops the read pool once the loop has ended: what is queued is served, then the threads
 * are joined. */
void node_read_pool_stop(node *n);

/* ---- node_snap.c ---- */

/* Sets up snapshot shipping on the node's loop; 0 or a STORAGE_ERR_*. */
int node_snap_init(node *n);
/* Closes its handles (the loop then ends) and drops transfers in progress. */
void node_snap_close(node *n);
/* Leader: Raft wants the state snapshot m sent to m->to. Starts a transfer: a copy of the
 * state is taken on a thread and streamed in chunks, then m follows. */
void node_snap_send(node *n, const struct raft_message *m);
/* Whether a copy is being made or sent to a follower (compaction and defragment wait). */
int node_snap_busy(node *n);
/* After the Ready that followed a received snapshot: if Raft did not take it (stale), the
 * file is dropped so that the next transfer can start. */
void node_snap_after_ready(node *n);
/* The connection to member id went down: its transfer (if any) fails. */
void node_snap_peer_down(node *n, uint64_t id);
/* A FRAME_SNAP_* frame from a peer. Returns 1 with *m filled (free with raft_codec_free)
 * when a complete, verified snapshot arrived and its Raft message is to be stepped. */
int node_snap_on_frame(node *n, uint64_t from, const uint8_t *p, size_t len, struct raft_message *m);
/* Follower: installs the received state for Raft's snapshot s, replacing the store, the
 * Raft log (its hard state hs kept) and every in-memory view of the store. Fatal if none
 * was received: Raft has already moved its log to s. Returns the applied index installed. */
uint64_t node_snap_install(node *n, const struct raft_snapshot *s, const struct raft_hard_state *hs);

#endif
