/*
 * server.h - the pieces of a Keelson member, shared inside server/ only.
 *
 * config.c   flags and ETCD_* environment, etcd's defaults and usage errors
 * log.c      etcd-style log lines (zap JSON or capnslog text)
 * node.c     the node loop: owns writes, group-commits every batch in one LMDB txn
 *            (node_internal.h: its state; node_boot.c: Raft's start; node_read.c: read-index
 *            reads; node_snap.c: state snapshots for followers behind the compacted log)
 * kv.c       the KV service: validation as etcd's v3rpc, reads on gRPC threads
 * maint.c    the Maintenance service (Status) and the response header
 * corrupt.c  the initial and periodic corruption checks (HashKV against peers)
 * http.c     /health, /version and /metrics on --listen-metrics-urls
 * main.c     start-up and shut-down
 * etcdimport.c  a stopped etcd member's data dir (member/snap/db + member/wal) imported once
 */
#ifndef KEELSON_SERVER_H
#define KEELSON_SERVER_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "api/api.h"
#include "server/identity.h"
#include "storage/storage.h"

#define KEELSON_VERSION "0.1.0"
/* The etcd version a member reports by default: the apiserver gates features on it. */
#define KEELSON_DEFAULT_ETCD_VERSION "3.5.17"

/* ---- config.c ---- */

#define CONFIG_MAX_URLS 8

typedef struct config_urls {
	int n;
	char *url[CONFIG_MAX_URLS]; /* "http://host:port" as given */
} config_urls;

typedef struct config {
	char *name;
	char *data_dir;
	char *wal_dir;
	uint64_t snapshot_count;
	uint64_t snapshot_catchup_entries; /* log entries kept behind a snapshot point */
	uint64_t heartbeat_ms;
	uint64_t election_ms;
	config_urls listen_client;
	config_urls advertise_client;
	config_urls listen_peer;
	config_urls initial_advertise_peer;
	config_urls listen_metrics;
	char *initial_cluster;
	char *initial_cluster_state;
	char *initial_cluster_token;
	uint64_t quota_backend_bytes;
	uint64_t max_txn_ops;
	uint64_t max_request_bytes;
	uint64_t max_concurrent_streams;
	uint64_t grpc_keepalive_min_time_ms;
	uint64_t grpc_keepalive_interval_ms;
	uint64_t grpc_keepalive_timeout_ms;
	char *auto_compaction_retention;
	char *auto_compaction_mode;
	char *logger;
	char *log_level;
	char *log_outputs;
	char *etcd_version; /* the version Status and /version report */
	uint64_t watch_progress_notify_ms;
	/* Lease checkpoints: the leader records remaining TTLs through the log every interval,
	 * so they survive a leader change or a restart (off by default, as in etcd 3.4). */
	int lease_checkpoint;
	uint64_t lease_checkpoint_interval_ms;
	char *cert_file, *key_file, *trusted_ca_file; /* client TLS */
	uint64_t auth_token_ttl; /* seconds */
	uint64_t bcrypt_cost;    /* --bcrypt-cost: new passwords are bcrypt-hashed, as etcd's */
	int client_cert_auth;
	/* corruption checks (corrupt.c) */
	int initial_corrupt_check; /* --experimental-initial-corrupt-check */
	uint64_t corrupt_check_ms; /* --experimental-corrupt-check-time, 0 = off */
	uint64_t backend_batch_interval_ms; /* --backend-batch-interval, 0: an LMDB commit per apply */
	uint64_t backend_batch_limit;       /* --backend-batch-limit, 0: 10,000 */
	/* Peer TLS (--peer-*, as etcd). main.c builds peer_tls from them before node_start;
	 * node.c hands it to the peer transport (NULL: plaintext peers). */
	char *peer_cert_file, *peer_key_file, *peer_trusted_ca_file, *peer_crl_file;
	char *peer_cert_allowed_cn;
	int peer_client_cert_auth, peer_auto_tls;
	int peer_skip_client_san; /* etcd 3.5's --experimental-peer-skip-client-san-verification */
	struct peer_tls *peer_tls;
	int pre_vote;
	int force_new_cluster;
	int show_version;
	int show_help;
	/* auth and client TLS (issue 7) */
	char *auth_token;      /* --auth-token: "simple", "jwt,pub-key=...,..." */
	char *client_crl_file; /* revoked client certificates, PEM or DER */
	char *cipher_suites;   /* Go's TLS 1.2 suite names, comma-separated */
	int auto_tls;          /* a self-signed client certificate under <data-dir>/fixtures/client */
	char *tls_min_version, *tls_max_version; /* etcd 3.5's: "", "TLS1.2" or "TLS1.3" */
	char *config_file;     /* --config-file: etcd's YAML; flags and env are then ignored */
	/* scheduled backups (backup.c; Keelson's own flags, after keelsonutl backup's) */
	char *backup_dir;      /* "" : off */
	char *backup_interval; /* Go duration; "" : 1h unless a schedule */
	char *backup_schedule; /* cron expression */
	int backup_utc;        /* the schedule in UTC rather than local time */
	uint64_t backup_retain;
	char *backup_max_age;  /* Go duration; "" : no age limit */
	int backup_thin;
	int backup_compress;
} config;

/*
 * Fills cfg from ETCD_* environment variables and argv (flags win), with etcd's defaults.
 * Returns 0, or an exit status (2 for usage errors, after printing etcd's message on
 * stderr; 0 with show_help/show_version set when the caller should print and exit).
 */
int config_parse(config *cfg, int argc, char **argv);
void config_print_usage(void);
/* Frees what config_parse() allocated. */
void config_free(config *cfg);
/* Splits "host:port" out of "http://host:port"; returns 0 or -1 for a URL we cannot serve. */
int config_url_host_port(const char *url, char *out, size_t outlen);

/* ---- etcdimport.c ---- */

/*
 * If member_dir holds etcd's snap/db and wal/ (or cfg->wal_dir) and no Keelson environment
 * (data.mdb) yet, imports them into a new environment there: keys, revisions, compaction,
 * leases, members, auth, alarms, etcd's member and cluster ids, the raft hard state, the
 * committed WAL entries the backend has not applied (applied with server/apply.c) and the
 * uncommitted ones (kept in the log). etcd's files are not modified. Returns 0 (imported, or nothing to import) or a storage error
 * after logging why (nothing of the import is left behind then).
 */
int etcd_import_maybe(const config *cfg, const char *member_dir);

/* ---- main.c ---- */

/* A whole (small) file as a NUL-terminated string (malloc'd; "" if empty), NULL on error. */
char *server_read_file(const char *path);

/* ---- log.c ---- */

typedef enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR, LOG_FATAL } log_level;
void log_setup(const char *logger, const char *level);
/* msg, then key/value string pairs ending with NULL: log_at(LOG_INFO, "started", "name", n, NULL) */
void log_at(log_level lvl, const char *msg, ...);

/* ---- member identity (maint.c) ---- */

typedef struct member_info {
	uint64_t cluster_id;
	uint64_t member_id;
	const char *name;
} member_info;

/* This member's etcd ids from --initial-cluster (server/identity.h); 0 or an IDENTITY_ERR_*
 * with the reason in errbuf. */
int member_compute_ids(const config *cfg, member_info *out, char *errbuf, size_t errlen);

#define MEMBER_LIST_MAX IDENTITY_MAX_MEMBERS

/* ---- node.c ---- */

typedef struct node node;

typedef enum node_op {
	NODE_NOOP, /* a new leader's empty entry */
	NODE_PUT,
	NODE_DELETE_RANGE,
	NODE_TXN,
	NODE_COMPACT,
	NODE_LEASE_GRANT,
	NODE_LEASE_REVOKE,
	NODE_ALARM,
	NODE_DEFRAG,        /* local: never in the log */
	NODE_MEMBER_ADD,    /* a Member: recorded, then Raft adds it */
	NODE_MEMBER_UPDATE, /* a Member: new peer URLs, or a started member's attributes */
	NODE_MEMBER_REMOVE, /* a Member (id): the leader then proposes Raft's removal */
	NODE_MEMBER_PROMOTE, /* a Member (id): the leader then proposes Raft's promotion */
	NODE_READ_RANGE,    /* local: a linearizable Range waiting for a read index */
	NODE_READ_TXN,      /* local: a linearizable read-only Txn */
	NODE_ASK,           /* local: a request to another member (node_ask) */
	NODE_MOVE_LEADER,   /* local: Maintenance.MoveLeader, a Raft leadership transfer */
	NODE_READ_BARRIER,  /* local: a read index wait for a reader that is not a call (RangeStream) */
	/* The leader's lease checkpoints (LeaseCheckpointRequest); a fixed value, as entries
	 * in the log keep it. */
	NODE_LEASE_CHECKPOINT = 32,
	NODE_AUTH_ENABLE = 64, /* the Auth service's changes, in the log */
	NODE_AUTH_DISABLE,
	NODE_AUTH_AUTHENTICATE, /* carries the token the receiving member chose */
	NODE_AUTH_USER_ADD,
	NODE_AUTH_USER_DELETE,
	NODE_AUTH_USER_CHANGE_PW,
	NODE_AUTH_USER_GRANT,
	NODE_AUTH_USER_REVOKE,
	NODE_AUTH_ROLE_ADD,
	NODE_AUTH_ROLE_DELETE,
	NODE_AUTH_ROLE_GRANT,
	NODE_AUTH_ROLE_REVOKE,
} node_op;

struct server_ctx;
/* Starts the node loop thread. The term and applied index continue from storage. */
int node_start(node **out, struct server_ctx *sc);
/* Applies and answers what is queued, then stops the loop; later writes fail "server stopped". */
void node_stop(node *n);
/* Frees the node once no gRPC thread can call node_submit() any more. */
void node_free(node *n);
/* Queues a write; the node loop applies it in the next batch and replies to call. */
void node_submit(node *n, node_op op, api_call *call, const ProtobufCMessage *req);
/* Whether linearizable reads need a read index (more than one voter), or may be served
 * straight from local storage. */
int node_reads_need_index(node *n);
/*
 * Waits, as a linearizable Range does, until this member has applied everything committed
 * when it was called, then calls done(arg, 0) on the node loop; done(arg, e + 1) with the
 * api_error e if that fails. done is called exactly once, and must not block.
 */
void node_read_barrier(node *n, void (*done)(void *arg, int err), void *arg);
/* A membership change from the Cluster service (peer URLs copied). */
void node_member_change(node *n, node_op op, api_call *call, uint64_t id, int learner,
			char **peer_urls, size_t n_urls);
/* The current leader's member id, 0 if none. */
uint64_t node_leader(node *n);
/* Whether this member's connection to peer id is up. */
int node_peer_active(node *n, uint64_t id);
/* Whether this member is a learner (it serves only serializable reads, as etcd's). */
int node_is_learner(node *n);
/* Raft's last log index. */
uint64_t node_last_index(node *n);

/*
 * A Prometheus histogram with buckets that double from h_first seconds (as Go's
 * prometheus.ExponentialBuckets, which etcd's metrics use); observed from any thread.
 */
#define HISTOGRAM_MAX_BUCKETS 16
typedef struct histogram {
	double h_first;
	int h_n;                                             /* buckets, +Inf aside */
	_Atomic uint64_t h_counts[HISTOGRAM_MAX_BUCKETS + 1]; /* per bucket (not cumulative); last: +Inf */
	_Atomic uint64_t h_sum_ns;
} histogram;
void histogram_observe(histogram *h, uint64_t ns);

/* The node's figures for /metrics (etcd's names in http.c). */
#define NODE_RTT_PEERS 16
typedef struct node_metrics {
	_Atomic uint64_t nm_leader_changes;
	_Atomic int64_t nm_proposals_pending; /* proposed by this member, not yet applied */
	_Atomic uint64_t nm_proposals_failed; /* proposals that timed out or could not be made */
	_Atomic uint64_t nm_committed;        /* Raft's commit index */
	histogram nm_wal_fsync;       /* commits that make log entries durable */
	histogram nm_backend_commit;  /* every commit of a batch */
	struct {
		_Atomic uint64_t id; /* 0: a free slot */
		histogram h;
	} nm_rtt[NODE_RTT_PEERS]; /* round trips of a probe to each peer (etcd's prober) */
} node_metrics;
const node_metrics *node_get_metrics(node *n);
/*
 * Asking other members (node_ask.c), over the peer transport's request channel (peer.h,
 * REQUESTS): what etcd's members ask each other over peer HTTP (/leases,
 * /leases/internal, /members/hashkv).
 */
enum node_ask_method {
	NODE_ASK_LEASE_RENEW = 1, /* LeaseKeepAliveRequest -> LeaseKeepAliveResponse (leader) */
	NODE_ASK_LEASE_TTL = 2,   /* LeaseTimeToLiveRequest -> LeaseTimeToLiveResponse (leader) */
	NODE_ASK_HASHKV = 3,      /* HashKVRequest -> HashKVResponse (any member) */
	NODE_ASK_PING = 4,        /* empty -> empty (any member): the round-trip probe */
};
/* The answer's status (>= 0): the responder's. */
enum {
	NODE_ANS_OK = 0,
	NODE_ANS_NOT_LEADER = 1,      /* a leader-only method reached a member that does not lead */
	NODE_ANS_LEASE_NOT_FOUND = 2, /* etcd's lease.ErrLeaseNotFound */
	NODE_ANS_ERROR = 3,           /* body: u8 gRPC status code, then etcd's message */
	NODE_ANS_BAD_REQUEST = 4,     /* the request body did not decode */
};
/* Failures of the asking member (< 0). */
enum {
	NODE_ASK_ENOLEADER = -1,   /* no leader known until the deadline (etcd's ErrNoLeader) */
	NODE_ASK_ETIMEDOUT = -2,   /* no answer until the deadline (etcd's ErrTimeout) */
	NODE_ASK_ESTOPPED = -3,    /* the member is stopping */
	NODE_ASK_EUNREACHABLE = -4, /* a given member (not the leader) could not be asked */
};
/*
 * The answer to node_ask: status as above; body (valid during the call only) with
 * NODE_ANS_OK and NODE_ANS_ERROR. Runs on the node loop's thread (do not block in it),
 * except NODE_ASK_ESTOPPED for a question the stopping member never took, which may run
 * on the thread that called node_ask(), from inside it.
 */
typedef void (*node_ask_cb)(void *ctx, int status, const uint8_t *body, size_t len);
/*
 * Asks member `to`, or with to == 0 the leader, whoever it is until the answer: etcd's
 * forwarding loop (EtcdServer.LeaseRenew, LeaseTimeToLive): wait for a leader, ask it, and
 * on a lost connection, a leader change or NODE_ANS_NOT_LEADER ask again 50 ms later, until
 * timeout_ms (0: etcd's request timeout). A leader that is this member answers locally.
 * body is copied. From any thread; cb(ctx, ...) runs exactly once.
 */
void node_ask(node *n, uint64_t to, int method, const void *body, size_t len, uint64_t timeout_ms,
	      node_ask_cb cb, void *ctx);
/* A NODE_ANS_ERROR body for storage_err (its gRPC code and etcd's message): returns
 * NODE_ANS_ERROR with *out malloc'd (NULL and 0 if out of memory). */
int node_ans_error(int storage_err, uint8_t **out, size_t *outlen);
/* Decodes a NODE_ANS_ERROR body: the gRPC code, and the message into msg (terminated).
 * Returns -1 for a body that is not one. */
int node_ans_error_decode(const uint8_t *body, size_t len, char *msg, size_t msglen);
/* etcd's ReqTimeout: 5 s plus two election timeouts. */
uint64_t node_request_timeout_ms(node *n);
/*
 * etcd's maxGapBetweenApplyAndCommitIndex: proposals are refused with "etcdserver: too many
 * requests" while the committed index is more than this ahead of the applied one.
 */
#define NODE_MAX_APPLY_GAP 5000
/* Whether a proposal must be refused for the gap between committed and applied. */
static inline int node_apply_gap_too_large(uint64_t committed, uint64_t applied)
{
	return committed > applied + NODE_MAX_APPLY_GAP;
}
/* Term to report in headers. */
uint64_t node_term(node *n);
/* Raft index of the last applied entry. */
uint64_t node_applied_index(node *n);
/* Writes batched so far and fsyncs they took (group commit), for /metrics. */
void node_batch_stats(node *n, uint64_t *requests, uint64_t *commits);

/* ---- watch.c ---- */

typedef struct watch_hub watch_hub;
struct server_ctx;
/* Serves the Watch service and starts the hub's catch-up thread. */
int watch_hub_start(watch_hub **out, struct server_ctx *sc, api_server *as);
/* Called by the node loop after each commit with the batch's events, in revision order,
 * and the store revision after the batch. Events are read during the call only. */
void watch_hub_notify(watch_hub *h, Mvccpb__Event **events, size_t n, int64_t rev);
/* The store was replaced (an installed snapshot) at revision rev: every watcher catches up
 * from storage (or is cancelled as compacted), as after falling behind. */
void watch_hub_resync(watch_hub *h, int64_t rev);
void watch_hub_stop(watch_hub *h);
void watch_hub_free(watch_hub *h);
/* The hub's figures for /metrics (etcd's etcd_debugging_mvcc_* watch gauges and more). */
typedef struct watch_stats {
	uint64_t ws_streams, ws_watchers;
	uint64_t ws_unsynced;	    /* watchers catching up from storage (etcd: slow watchers) */
	uint64_t ws_slow_total;	    /* times a watcher fell behind and left the fast path */
	uint64_t ws_pending_bytes;  /* of responses queued on streams, not yet sent */
	uint64_t ws_pending_events; /* events in those responses */
	uint64_t ws_events_total;   /* events queued to clients since start */
} watch_stats;
void watch_hub_stats(watch_hub *h, watch_stats *out);

/* ---- lease.c ---- */

typedef struct lessor lessor;
/* Loads every lease from storage, each with its remaining TTL (checkpointed, else full) plus
 * an election timeout. */
int lessor_start(lessor **out, const config *cfg, storage *st);
void lessor_free(lessor *l);
/* The store was replaced (an installed snapshot): the leases are loaded again from it. */
int lessor_reload(lessor *l, const config *cfg, storage *st);
/* The node loop reports committed grants and revokes. */
void lessor_granted(lessor *l, int64_t id, int64_t ttl);
void lessor_revoked(lessor *l, int64_t id);
/* Up to max expired leases not yet being revoked; marks them as being revoked. */
size_t lessor_expired(lessor *l, int64_t *ids, size_t max);
/* An expiry revoke did not commit: the lease may be picked again. */
void lessor_revoke_failed(lessor *l, int64_t id);
/* The leader resets a lease's expiry; its granted TTL, or 0 if unknown, already expired
 * or being revoked. */
int64_t lessor_renew(lessor *l, int64_t id);
/*
 * Serves a lease request another member asked of this one (node_ask: NODE_ASK_LEASE_RENEW,
 * NODE_ASK_LEASE_TTL), on the node loop. leader: whether this member leads (only the
 * leader's lessor knows expiry). Returns a NODE_ANS_* status; with NODE_ANS_OK *out
 * (malloc'd, the caller frees) holds the encoded answer.
 */
int lease_serve_peer(struct server_ctx *sc, int leader, int method, const uint8_t *body, size_t len,
		     uint8_t **out, size_t *outlen);
/* A new leader gives every lease its remaining TTL (the checkpointed one, else the full TTL)
 * plus extend_ms before expiring any, and schedules checkpoints again. */
void lessor_promote(lessor *l, uint64_t extend_ms);
/* The node loop reports committed checkpoints (every member): remaining TTLs to start from
 * under a new leader. */
void lessor_checkpointed(lessor *l, const Etcdserverpb__LeaseCheckpointRequest *req);
/* Up to max checkpoints due now (id, remaining TTL; 0 clears one a keep-alive made stale,
 * also with checkpoints off), rescheduling them. Bounded work per call. */
size_t lessor_due_checkpoints(lessor *l, int64_t *ids, int64_t *remaining, size_t max);
struct server_ctx;
/* On the leader, every lease look: proposes the due checkpoints through node_submit(), in
 * entries of at most 1000 (etcd's maxLeaseCheckpointBatchSize). */
void lessor_propose_checkpoints(struct server_ctx *sc);

/* ---- alarm.c ---- */

typedef struct alarm_set alarm_set;
/* An alarm change applied in a batch, made visible by alarm_commit() once durable. */
typedef struct alarm_change {
	int ac_changed, ac_activate, ac_type;
	uint64_t ac_member;
} alarm_change;
int alarm_start(alarm_set **out, storage *st);
void alarm_free(alarm_set *a);
/* The store was replaced (an installed snapshot): the alarms are loaded again from it. */
int alarm_reload(alarm_set *a, storage *st);
/* Whether a NOSPACE alarm is active: writes that take space are refused. */
int alarm_nospace(alarm_set *a);
/* etcd's "etcdserver: corrupt cluster" (DataLoss): while a CORRUPT alarm is active every
 * write is refused with it (etcd's applierV3Corrupt). Translated by server_fail_storage(). */
enum { ALARM_ERR_CORRUPT = -1600 }; /* the alarm module owns -1600..-1699 */
/* Whether a CORRUPT alarm is active. */
int alarm_corrupt(alarm_set *a);
int alarm_apply(alarm_set *a, storage_batch *b, const Etcdserverpb__AlarmRequest *req,
		storage_arena *ar, Etcdserverpb__AlarmResponse *resp, alarm_change *chg);
void alarm_commit(alarm_set *a, const alarm_change *chg);
/* Whether NOSPACE / CORRUPT is raised as of the last entry applied (the apply path's view,
 * ahead of alarm_nospace() / alarm_corrupt() by at most the batch being applied). */
int alarm_applied_nospace(alarm_set *a);
int alarm_applied_corrupt(alarm_set *a);
size_t alarm_status_errors(alarm_set *a, char **out, size_t max, char buf[][64]);
/* The alarms recorded in r's view of the store as entries of etcd's "alarm" bucket (the
 * encoded AlarmMember as key, an empty value), in ar; at most max. For snapshots. */
size_t alarm_export(storage_reader *r, storage_arena *ar, storage_etcd_entry *out, size_t max);
struct server_ctx;
/* Refuses (1) a write of request_bytes that the quota cannot take, raising NOSPACE. */
int alarm_quota_exceeded(struct server_ctx *sc, size_t request_bytes);

/* ---- heaptrim.c: free heap pages back after a burst ---- */

typedef struct heap_trimmer heap_trimmer;
/* Starts the thread that calls malloc_trim(0) once the process has been busy (CPU time) and
 * is quiet again, so that the holes a burst of short-lived buffers left in the malloc heap
 * leave the RSS. Returns 0, or -1 when the thread cannot be made (*out is then NULL). */
int heap_trimmer_start(heap_trimmer **out);
/* Stops the thread and frees t; NULL is a no-op. */
void heap_trimmer_stop(heap_trimmer *t);

/* ---- corrupt.c: etcd's corruption checks ---- */

struct server_ctx;
/* --experimental-initial-corrupt-check, after node_start() (peers are asked over its
 * transport) and before any client is served: HashKV from every peer at this member's
 * revision. Returns 0 (also when peers cannot be reached,
 * logged), or -1 on a mismatch after logging etcd's "<id> found data inconsistency with
 * peers" as a fatal error; the caller then exits. */
int corrupt_check_initial(struct server_ctx *sc);
typedef struct corrupt_monitor corrupt_monitor;
/* --experimental-corrupt-check-time: starts the thread that, while this member leads,
 * compares every follower's HashKV with its own each interval and raises CORRUPT for a
 * member that differs. *out is NULL (and 0 returned) when the check is off. */
int corrupt_monitor_start(corrupt_monitor **out, struct server_ctx *sc);
/* Stops the thread (a check in progress finishes first) and frees m; NULL is a no-op.
 * Call before node_stop(). */
void corrupt_monitor_stop(corrupt_monitor *m);
/* Serves a peer's NODE_ASK_HASHKV (etcd's /members/hashkv); may take long on a large store:
 * call it off the node loop. Returns a NODE_ANS_* status and *out (malloc'd) as
 * lease_serve_peer(). */
int corrupt_serve_hash_kv(struct server_ctx *sc, const uint8_t *body, size_t len, uint8_t **out,
			  size_t *outlen);

/* ---- apply.c ---- */

typedef struct apply_result {
	node_op ar_op;
	uint64_t ar_proposer, ar_seq;
	ProtobufCMessage *ar_req;  /* decoded, in the arena */
	ProtobufCMessage *ar_resp; /* in the arena */
	int ar_err;                /* the request's storage error, 0 if applied */
	alarm_change ar_alarm;
} apply_result;
struct server_ctx;
/* An entry's payload (malloc'd) for op and its request. */
int apply_encode(node_op op, uint64_t proposer, uint64_t seq, const ProtobufCMessage *msg,
		 uint8_t **out, size_t *len);
/* Applies one entry into b; the request's own error is r->ar_err. Returns an error only for
 * an entry that cannot be decoded. */
int apply_entry(struct server_ctx *sc, storage_batch *b, const uint8_t *data, size_t len,
		storage_arena *a, apply_result *r);
void apply_fill_headers(struct server_ctx *sc, apply_result *r);
/* Once the batch is durable: in-memory effects (lessor, alarms). */
void apply_committed(struct server_ctx *sc, const apply_result *r, int is_leader);

/* ---- members.c ---- */

typedef struct members members;
enum { MEMBERS_REMOVE = 1, MEMBERS_PROMOTE = 2 };
/* Loads the member list, or starts it from remote (a joining member, main.c) or else from
 * --initial-cluster. */
struct remote_members;
int members_start(members **out, const config *cfg, storage *st, uint64_t self,
		  const struct remote_members *remote);
void members_free(members *ms);
/* The store was replaced (an installed snapshot): the member list is loaded again. */
int members_reload(members *ms, const config *cfg, storage *st);
int members_apply(members *ms, storage_batch *b, node_op op, const Etcdserverpb__Member *m);
int members_conf_changed(members *ms, storage_batch *b, int op, uint64_t id);
int members_exists(members *ms, uint64_t id, int *learner);
/* Answers a Cluster change (op: NODE_MEMBER_*) with the member list after it. */
void members_reply(members *ms, api_call *call, node_op op, Etcdserverpb__ResponseHeader *h,
		   Etcdserverpb__Member *added);
/* The members as etcd's snapshot records them, strings copied into the arena. */
size_t members_export(members *ms, storage_etcd_member *out, size_t max, storage_arena *a);
/* Up to max members: ids, first peer URL as "http(s)://host:port", learner flags. */
size_t members_peers(members *ms, uint64_t *ids, char (*urls)[256], int *learner, size_t max);
/* The list as etcd's peer handler GET /members sends it (JSON, newline-ended), malloc'd;
 * NULL out of memory. */
char *members_json(members *ms, size_t *len);
/* The member list a running member gave a joining member (etcd's GET /members). */
typedef struct remote_members {
	int rm_n;
	uint64_t rm_id[IDENTITY_MAX_MEMBERS];
	char *rm_name[IDENTITY_MAX_MEMBERS]; /* "" for a member not started yet */
	int rm_learner[IDENTITY_MAX_MEMBERS];
	int rm_n_urls[IDENTITY_MAX_MEMBERS];
	char *rm_urls[IDENTITY_MAX_MEMBERS][IDENTITY_MAX_URLS];
	char *rm_buf; /* owns the strings */
} remote_members;
/* A member joining with --initial-cluster-state existing and a new data dir: the cluster
 * as a running member (from --initial-cluster) gives it over GET <peer-url>/members, and
 * its own id, the member's with our peer URLs, as etcd's GetClusterFromRemotePeers and
 * ValidateClusterAndAssignIDs: every id comes from the cluster (members re-added at the same
 * URLs have new ones). 0 (free *rm with remote_members_free), or -1 with etcd's message. */
int member_id_from_peers(const config *cfg, remote_members *rm, uint64_t *member_id, char *errbuf,
			 size_t errlen);
void remote_members_free(remote_members *rm);

/* ---- auth.c ---- */

/* Auth errors (etcd's rpctypes), translated by server_fail_storage(). */
enum {
	AUTH_ERR_BASE = -1200,
	AUTH_ERR_ROOT_USER_NOT_EXIST = -1200,
	AUTH_ERR_ROOT_ROLE_NOT_EXIST = -1201,
	AUTH_ERR_USER_EXISTS = -1202,
	AUTH_ERR_USER_EMPTY = -1203,
	AUTH_ERR_USER_NOT_FOUND = -1204,
	AUTH_ERR_ROLE_EXISTS = -1205,
	AUTH_ERR_ROLE_NOT_FOUND = -1206,
	AUTH_ERR_ROLE_EMPTY = -1207,
	AUTH_ERR_FAILED = -1208,
	AUTH_ERR_PERMISSION_DENIED = -1209,
	AUTH_ERR_ROLE_NOT_GRANTED = -1210,
	AUTH_ERR_PERMISSION_NOT_GRANTED = -1211,
	AUTH_ERR_NOT_ENABLED = -1212,
	AUTH_ERR_INVALID_TOKEN = -1213,
	AUTH_ERR_INVALID_MGMT = -1214,
	AUTH_ERR_NO_PASSWORD = -1215,
	AUTH_ERR_OLD_REVISION = -1216,  /* a JWT from before the last auth change */
	AUTH_ERR_VERIFY_ONLY = -1217,   /* JWT with a public key only: cannot sign */
	AUTH_ERR_TOKEN_OPTIONS = -1218, /* start-up: a bad --auth-token (reason logged) */
	AUTH_ERR_TOKEN_KEY = -1219,     /* start-up: a JWT key etcd refuses (reason logged) */
	AUTH_ERR_JWT_KEY = -1220,       /* jwt-go's "key is invalid": an ES key of another curve */
};
/* The gRPC code and message of an AUTH_ERR_*, or -1 if err is not one. */
int auth_error_status(int err, const char **msg);

typedef struct auth_store auth_store;
int auth_start(auth_store **out, const config *cfg, storage *st);
void auth_free(auth_store *as);
/* The store was replaced (an installed snapshot): users, roles and the switch are loaded
 * again; tokens handed out stay valid. */
int auth_reload(auth_store *as, const config *cfg, storage *st);
/* Users and roles as etcd's snapshot buckets authUsers / authRoles hold them (messages
 * packed into the arena; up to max entries), with the switch and the revision. */
size_t auth_export(auth_store *as, storage_etcd_entry *out, size_t max, storage_arena *a, int *enabled,
		   uint64_t *revision);
int auth_enabled(auth_store *as);
/* Checks of a request's token (metadata "token", NULL if absent): 0 or an AUTH_ERR_*.
 * All pass while auth is disabled. */
int auth_check_range(auth_store *as, const char *tok, size_t toklen, int write,
		     const ProtobufCBinaryData *key, const ProtobufCBinaryData *end);
int auth_check_txn(auth_store *as, const char *tok, size_t toklen, const Etcdserverpb__TxnRequest *t);
int auth_check_admin(auth_store *as, const char *tok, size_t toklen);
int auth_check_user(auth_store *as, const char *tok, size_t toklen);
/* The node loop applies an Auth change (persisted in b); *resp from the arena. */
int auth_apply(auth_store *as, storage_batch *b, node_op op, const ProtobufCMessage *req, storage_arena *a,
	       ProtobufCMessage **resp);

/* ---- kv.c / maint.c: service registration ---- */

typedef struct server_ctx {
	config *cfg;
	storage *st;
	node *nd;
	watch_hub *hub;
	lessor *lessor;
	alarm_set *alarms;
	members *members;
	auth_store *auth;
	uint64_t quota_bytes; /* --quota-backend-bytes, or etcd's 2 GiB default */
	member_info mi;
	/* NULL unless --backup-dir; set by main once the node loop (which reads it) runs */
	struct server_backup *_Atomic backup;
	struct rangestream_set *rangestreams; /* rangestream.c: the streams still reading */
} server_ctx;

/* Fills the header's cluster, member and term; revision is the caller's. */
void server_fill_header(server_ctx *sc, Etcdserverpb__ResponseHeader *h);
int kv_register(api_server *as, server_ctx *sc);
int maint_register(api_server *as, server_ctx *sc);
int lease_register(api_server *as, server_ctx *sc);
int alarm_register(api_server *as, server_ctx *sc);
int members_register(api_server *as, server_ctx *sc);
int snapshot_register(api_server *as, server_ctx *sc);
/* The member's state as an etcd backend file (no SHA-256 trailer) passed to write, from one
 * LMDB read transaction (held until it returns): keys, leases, members, auth and alarms.
 * *size gets the length. Errors: storage's, or the non-zero value write returned. */
int snapshot_write(server_ctx *sc, storage_write_fn write, void *ctx, uint64_t *size);

/* ---- backup.c: --backup-dir scheduled backups (backup/backup.h does the directory) ---- */
typedef struct server_backup server_backup;
/* Starts the backup thread if --backup-dir is set (*out NULL otherwise). */
int server_backup_start(server_backup **out, server_ctx *sc);
/* Stops the thread (a backup in progress is abandoned, its temporary files removed). */
void server_backup_stop(server_backup *b);
/* The store is about to be rewritten (defragment) or replaced (a snapshot install): a backup
 * reading it gives up its read transaction (it is retried once resumed) and this waits
 * until it has, which takes one write of a few pages; no backup starts until the resume.
 * Both are no-ops on NULL. Node loop only. */
void server_backup_pause(server_backup *b);
void server_backup_resume(server_backup *b);
/* The keelson_backup_* metrics (nothing when b is NULL); returns the length. */
size_t server_backup_metrics(server_backup *b, char *buf, size_t len);
/* KV.RangeStream (etcd 3.7), rangestream.c; kv_register() calls it. */
int rangestream_register(api_server *as, server_ctx *sc);
/* Ends every RangeStream at its next chunk ("server stopped"), refuses new ones, and waits
 * until their reading threads are gone. After node_stop() (a stream waiting for a read index
 * is then failed), before api_server_destroy() and the storage is closed. */
void rangestream_drain(server_ctx *sc);
/* Frees what rangestream_register() allocated, once no call can arrive (after api_server_destroy()). */
void rangestream_free(server_ctx *sc);
int auth_register(api_server *as, server_ctx *sc);
/* etcd: a learner refuses every request but serializable reads, Status and MemberList.
 * Ends call with etcd's error and returns 1 if this member must refuse. */
int learner_refuses(server_ctx *sc, api_call *call);
/* The gate of the Lease, Maintenance and Cluster calls: a learner refuses them (unless
 * learner_ok), then auth wants a valid user (root if admin). Ends the call and returns 0
 * when it may not go on. */
int call_admitted(server_ctx *sc, api_call *call, int learner_ok, int admin);
/* etcd 3.4's Maintenance gate (Defragment, Snapshot, Hash, HashKV): root only,
 * and the auth package's own error, untranslated (code Unknown, "auth: ..."). Ends call and
 * returns 0 when it may not go on. */
int maint_admitted(server_ctx *sc, api_call *call);
/* That untranslated form of an AUTH_ERR_*: the gRPC code, and the message in msg. */
int auth_error_raw(int auth_err, char *msg, size_t len);
/* Ends call with the auth error if there is one (auth_check_* result); whether to go on. */
int permitted(server_ctx *sc, api_call *call, int auth_err);
/* The request's auth token (metadata "token"), NULL if none. */
const char *call_token(api_call *call, size_t *len);
/* Ends call with the etcd error for a storage error code. */
void server_fail_storage(api_call *call, int storage_err);
/* The gRPC status and etcd message server_fail_storage() sends for storage_err (or an
 * auth error), for streams that end with it. */
int server_storage_status(int storage_err, const char **msg);
/* Fills the headers of a txn response and of every response nested in it. */
void server_fill_txn_headers(server_ctx *sc, Etcdserverpb__TxnResponse *resp);
/* etcd's validation of a Txn (v3rpc checkTxnRequest + checkIntervals); 0 or an api_error+1. */
int kv_check_txn(const Etcdserverpb__TxnRequest *r, size_t max_ops);
/* etcd's checks of a Range before anything else: 0, or an api_error + 1. */
int kv_check_range(const Etcdserverpb__RangeRequest *r);

/* ---- tls.c: client TLS set-up (issue 7) ---- */

/* --cipher-suites (Go's names, comma-separated) as OpenSSL's cipher list in out; -1 after
 * logging etcd's "unexpected TLS cipher suite" for a name Go does not know. */
int tls_cipher_list(const char *go_names, char *out, size_t outlen);
/* Whether the list has a suite Go's HTTP/2 requires (an ECDHE AES_128_GCM_SHA256): etcd's
 * https listener refuses to start without one. */
int tls_ciphers_http2_ok(const char *go_names);
/* --auto-tls: etcd's self-signed pair under <data-dir>/fixtures/client (made once, then
 * reused); the paths in cert_path and key_path. 0 or -1 (logged). */
int tls_auto_cert(const config *cfg, char *cert_path, char *key_path, size_t pathlen);

/* etcd 3.5's checks of --tls-min-version, --tls-max-version (and --cipher-suites with
 * TLS 1.3 only): 0, or -1 with etcd's error in why. */
int tls_check_versions(const config *cfg, char *why, size_t len);
/* The checked flags as OpenSSL's protocol versions (TLS 1.2 at least; max 0: no bound). */
int tls_version_bounds(const config *cfg, int *min, int *max);

/* ---- tls_serve.c: client TLS connections, ended with OpenSSL (issue 7) ---- */

typedef struct tls_server tls_server;
typedef struct tls_server_options {
	const char *to_cert_file, *to_key_file;
	const char *to_trusted_ca_file; /* NULL or "": none */
	const char *to_crl_file;        /* --client-crl-file; NULL or "": none */
	const char *to_ciphers;         /* OpenSSL's TLS 1.2 cipher list; NULL: OpenSSL's default */
	int to_min_version, to_max_version; /* OpenSSL's protocol versions; 0: no bound */
	int to_client_cert_auth;
	server_ctx *to_sc;   /* answers the HTTP endpoints */
	api_server *to_api;  /* serves the gRPC connections */
} tls_server_options;
/* Loads the files (read again whenever they change); 0, or -1 after logging why. */
int tls_server_new(tls_server **out, const tls_server_options *o);
/* Serves one accepted client connection that starts with a TLS handshake (takes fd). */
void tls_server_serve(tls_server *t, int fd);
/* Waits until no connection thread still needs the server_ctx or the api_server; new
 * connections are closed from then on. Connections already handed to gRPC go on. */
void tls_server_stop(tls_server *t);
void tls_server_free(tls_server *t);

/* ---- http.c ---- */

typedef struct http_server http_server;
/* Serves the metrics URLs and the client URLs (gRPC connections go to as): plaintext ones,
 * and https ones through tls (NULL: none), both schemes on one port if they share it. */
int http_start(http_server **out, server_ctx *sc, const config_urls *urls, const config_urls *client,
	       api_server *as, tls_server *tls);
/* The whole HTTP/1 response (malloc'ed; length in out_len) to the request in req. */
char *http_response(server_ctx *sc, const char *req, size_t *out_len);
void http_stop(http_server *h);

#endif
