/*
 * raft.h - Keelson's Raft consensus core.
 *
 * A pure state machine in the style of etcd-io/raft: no I/O, no clock, no
 * threads. Time comes in through raft_tick(), randomness from a seed in the
 * configuration, messages through raft_step(), client requests through
 * raft_propose() and friends. Everything the caller must do (persist, send,
 * install, apply) comes out of raft_ready() as one batch, the `struct
 * raft_ready`, which the caller processes and then hands back with
 * raft_advance().
 *
 * THE LOG
 *   The library keeps the log since the last snapshot in memory (the stable
 *   entries already on disk and the unstable tail that is not). The caller
 *   hands the persisted log to raft_init() on start-up and bounds memory by
 *   calling raft_compact() once entries are applied and a snapshot exists.
 *   There is no storage callback: every call is pure.
 *
 * THE ORDERING CONTRACT (one loop turn)
 *   if (raft_has_ready(r)) {
 *       raft_ready(r, &rd);
 *   0.  (optional, parallel leader write, thesis 10.2.1) messages of type
 *       RAFT_MSG_APPEND may be sent before step 1 completes.
 *   1.  Persist, durably and in this order: rd.snapshot (if non-NULL: the
 *       caller installs rd.snapshot->data into its state machine and records
 *       the snapshot metadata, dropping its stored log), then rd.entries
 *       (an entry with an index already on disk replaces it and every later
 *       entry), then rd.hard_state (if rd.hard_state_changed).
 *   2.  Send rd.messages (every message not sent in step 0).
 *   3.  Apply rd.committed in order; entries of type RAFT_ENTRY_CONF_CHANGE
 *       need no action from the caller (the configuration is already in
 *       effect, see MEMBERSHIP) but may be decoded for bookkeeping.
 *       Answer rd.read_states: serve each read once the applied index
 *       reaches read_state.index.
 *   4.  raft_advance(r, &rd).
 *   }
 *   Between raft_ready() and raft_advance() the caller must not call any
 *   function of this header on the same `struct raft` except raft_status(),
 *   raft_entry_at(), raft_persisted() and raft_applied(); the calls that
 *   change state return RAFT_EBUSY meanwhile. raft_advance() tells the library
 *   that the entries in rd are persisted and rd.committed applied.
 *
 * MEMBERSHIP
 *   Single-server changes (thesis 4.1), one at a time. A configuration
 *   entry carries the complete resulting configuration and takes effect on
 *   every server as soon as it is APPENDED to that server's log, committed
 *   or not (thesis 4.1); a server truncating it reverts to the previous one.
 *   The leader accepts a new change only once the previous one is
 *   committed and once it has committed an entry of its own term (the
 *   raft-dev fix of 2015, thesis 4.1 errata). A leader may not remove itself
 *   (transfer leadership first). Learners receive the log but neither vote
 *   nor count toward quorums.
 *
 * THREADS
 *   A `struct raft` is not thread-safe; use it from one thread.
 *
 * ERRORS
 *   Functions returning int return 0 or a negative RAFT_E* code. After an
 *   allocation failure the instance is unusable: every later call returns
 *   RAFT_ENOMEM (sticky), and the caller restarts it from its disk.
 */
#ifndef KEELSON_RAFT_H
#define KEELSON_RAFT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Error codes: Keelson's raft module owns -1300 .. -1399. */
#define RAFT_ENOMEM       (-1301) /* allocation failed; instance is unusable */
#define RAFT_EINVAL       (-1302) /* invalid argument or malformed message */
#define RAFT_ENOTLEADER   (-1303) /* this call needs the leader */
#define RAFT_EBUSY        (-1304) /* a conf change or leader transfer is pending */
#define RAFT_ECOMPACTED   (-1305) /* index is below the first index in memory */
#define RAFT_EUNAVAILABLE (-1306) /* index is beyond the log */
#define RAFT_ETOOBIG      (-1307) /* data exceeds a configured limit */
#define RAFT_EDROPPED     (-1308) /* proposal dropped (no leader, transferring) */
#define RAFT_ECORRUPT     (-1309) /* checksum mismatch (codec) */
#define RAFT_EMALFORMED   (-1310) /* malformed encoding (codec) */
#define RAFT_ESTALE       (-1311) /* argument refers to a superseded state */

/* Returns a static string describing err (never NULL). */
const char *raft_strerror(int err);

/* Largest number of members (voters + learners) in a configuration. */
#define RAFT_MAX_MEMBERS 16

/* Node ids are non-zero; 0 means "none". */
#define RAFT_NONE 0

enum raft_entry_type {
    RAFT_ENTRY_NORMAL = 0,      /* opaque application data (may be empty) */
    RAFT_ENTRY_CONF_CHANGE = 1, /* membership change, see raft_conf_change */
};

/* One log entry. data is opaque to raft. When the library hands an entry to
 * the caller, data points into library memory, valid until raft_advance(). */
struct raft_entry {
    uint64_t term;
    uint64_t index;
    uint8_t type; /* enum raft_entry_type */
    uint32_t len;
    uint8_t *data;
};

/* A cluster configuration. Arrays hold distinct non-zero ids; a node is in
 * at most one of them. */
struct raft_conf {
    uint32_t n_voters;
    uint32_t n_learners;
    uint64_t voters[RAFT_MAX_MEMBERS];
    uint64_t learners[RAFT_MAX_MEMBERS];
};

struct raft_snapshot_meta {
    uint64_t index; /* last entry the snapshot covers */
    uint64_t term;  /* its term */
    struct raft_conf conf; /* configuration as of index */
};

/* A snapshot: metadata plus opaque data. The data is whatever the caller
 * gave raft_compact() (typically a small descriptor that lets the transport
 * ship the bulk state; raft never looks inside). */
struct raft_snapshot {
    struct raft_snapshot_meta meta;
    uint32_t len;
    uint8_t *data;
};

enum raft_msg_type {
    RAFT_MSG_APPEND = 1,       /* AppendEntries (paper 5.3) */
    RAFT_MSG_APPEND_RESP,      /* its answer; reject + hint on mismatch */
    RAFT_MSG_VOTE,             /* RequestVote (paper 5.2) */
    RAFT_MSG_VOTE_RESP,
    RAFT_MSG_PREVOTE,          /* thesis 9.6 */
    RAFT_MSG_PREVOTE_RESP,
    RAFT_MSG_HEARTBEAT,        /* empty AppendEntries carrying commit */
    RAFT_MSG_HEARTBEAT_RESP,
    RAFT_MSG_SNAPSHOT,         /* InstallSnapshot (paper 7) */
    RAFT_MSG_TIMEOUT_NOW,      /* leader transfer (thesis 3.10) */
    RAFT_MSG_READ_INDEX,       /* follower -> leader read request (thesis 6.4) */
    RAFT_MSG_READ_INDEX_RESP,
    RAFT_MSG_PROPOSE,          /* follower -> leader forwarded proposals */
    RAFT_MSG_TYPE_MAX = RAFT_MSG_PROPOSE
};

/* Message flags. */
#define RAFT_MSG_FLAG_FORCE 0x1 /* VOTE/PREVOTE after TimeoutNow: ignore leases */

/* A message between two nodes. Messages handed out by raft_ready() and all
 * their pointers are valid until raft_advance(). Messages passed to
 * raft_step() remain owned by the caller; raft copies what it keeps. */
struct raft_message {
    uint8_t type; /* enum raft_msg_type */
    uint8_t reject;
    uint16_t flags;
    uint64_t from;
    uint64_t to;
    uint64_t term;
    /* APPEND: prev_log_index/term; VOTE*: last log index/term;
     * APPEND_RESP: accepted last index, or rejected prev index with
     * log_term = term at reject_hint; READ_INDEX_RESP: the read index. */
    uint64_t index;
    uint64_t log_term;
    uint64_t commit;
    uint64_t reject_hint;
    uint64_t hb_seq; /* HEARTBEAT(_RESP): read-index round number */
    uint32_t n_entries;
    struct raft_entry *entries; /* APPEND, PROPOSE */
    struct raft_snapshot snapshot; /* SNAPSHOT only */
    uint32_t ctx_len;
    uint8_t *ctx; /* READ_INDEX(_RESP): the caller's request context */
};

/* Durable vote state (paper Figure 2, "persistent state"). commit is
 * persisted too, as etcd does, so a restart can re-apply quickly. */
struct raft_hard_state {
    uint64_t term;
    uint64_t vote;
    uint64_t commit;
};

enum raft_role {
    RAFT_FOLLOWER = 0,
    RAFT_PRE_CANDIDATE,
    RAFT_CANDIDATE,
    RAFT_LEADER,
};

struct raft_soft_state {
    uint64_t lead; /* RAFT_NONE if unknown */
    uint8_t role;  /* enum raft_role */
};

/* A linearizable read has been confirmed: once the applied index reaches
 * index, the read identified by ctx may be served. */
struct raft_read_state {
    uint64_t index;
    uint32_t ctx_len;
    uint8_t *ctx;
};

/* Everything the caller must do, see THE ORDERING CONTRACT. All arrays and
 * pointers are owned by the library and valid until raft_advance(). */
struct raft_ready {
    bool soft_state_changed;
    struct raft_soft_state soft_state;
    bool hard_state_changed;
    struct raft_hard_state hard_state;
    const struct raft_snapshot *snapshot; /* to install, or NULL */
    size_t n_entries;
    const struct raft_entry *entries;   /* to persist */
    size_t n_committed;
    const struct raft_entry *committed; /* to apply */
    size_t n_messages;
    const struct raft_message *messages; /* to send */
    size_t n_read_states;
    const struct raft_read_state *read_states;
    bool must_sync; /* entries or vote/term changed: fsync before sending */
};

/* Optional allocator (NULL fields: libc). */
struct raft_allocator {
    void *ctx;
    void *(*malloc)(void *ctx, size_t size);
    void *(*realloc)(void *ctx, void *ptr, size_t size);
    void (*free)(void *ctx, void *ptr);
};

struct raft_config {
    uint64_t id; /* this node, non-zero */
    /* Initial configuration, used when the log and snapshot hold none
     * (a new cluster). Ignored on restart when snapshot or a persisted
     * CONF_CHANGE entry defines it. */
    struct raft_conf conf;
    unsigned election_tick;  /* ticks; the timeout is random in [e, 2e) */
    unsigned heartbeat_tick; /* ticks between heartbeats, < election_tick */
    bool prevote;            /* thesis 9.6 */
    bool check_quorum;       /* thesis 6.2 / 9.6 leader lease */
    unsigned max_inflight_msgs;   /* per follower, >= 1 */
    uint64_t max_inflight_bytes;  /* per follower, 0 = unlimited */
    uint64_t max_msg_bytes;       /* entry bytes per APPEND, 0 = unlimited
                                   * (one entry is always allowed) */
    uint64_t max_uncommitted_bytes; /* 0 = unlimited; beyond it propose
                                     * returns RAFT_EDROPPED */
    uint64_t seed;           /* RNG seed for election timeouts */
    /* false: raft_advance() means rd.entries are durable.
     * true: raft_advance() only means they were handed to a writer; the
     * caller reports durability later with raft_persisted(), and must send
     * rd.messages (other than RAFT_MSG_APPEND) only after that write. The
     * leader counts itself toward commitment only for durable entries. */
    bool async_persist;
    /* Restart state, all copied by raft_init(): */
    struct raft_hard_state hard_state;
    const struct raft_snapshot *snapshot; /* last persisted snapshot or NULL */
    const struct raft_entry *entries;     /* persisted log after snapshot */
    size_t n_entries;
    uint64_t applied; /* last applied index (>= snapshot index) */
    const struct raft_allocator *allocator; /* NULL: libc */
};

struct raft; /* opaque */

/* Creates a node from cfg (all of it copied). The persisted entries must
 * be contiguous and start right after the snapshot index (or at 1).
 * Returns 0 and *rp, or RAFT_EINVAL / RAFT_ENOMEM. */
int raft_init(struct raft **rp, const struct raft_config *cfg);

/* Frees everything. Pointers from raft_ready() become invalid. */
void raft_close(struct raft *r);

/* Advances the logical clock by one tick: election timeout for followers
 * and candidates, heartbeats and quorum checks for the leader. */
int raft_tick(struct raft *r);

/* Feeds one message received from the network. Messages with a bad shape
 * return RAFT_EINVAL and change nothing; stale ones are ignored (0). */
int raft_step(struct raft *r, const struct raft_message *m);

/* Appends data (copied) as a normal entry. Leader only; a follower that
 * knows the leader forwards it as RAFT_MSG_PROPOSE (returns 0). The entry
 * may still be lost: only seeing it in rd.committed means it is committed.
 * On success *index (may be NULL) receives the index it was given
 * (0 if forwarded). */
int raft_propose(struct raft *r, const void *data, uint32_t len, uint64_t *index);

enum raft_conf_op {
    RAFT_CONF_ADD_VOTER = 1,   /* new voter (or learner promotion) */
    RAFT_CONF_ADD_LEARNER = 2,
    RAFT_CONF_REMOVE = 3,      /* voter or learner */
};

/* Proposes a single-server membership change. Leader only.
 * RAFT_EBUSY: a previous change is uncommitted, the leader has not yet
 * committed an entry in its term, or a transfer is in progress.
 * RAFT_EINVAL: node already in that role, unknown, self-removal, or the
 * change would leave no voter. */
int raft_propose_conf_change(struct raft *r, enum raft_conf_op op, uint64_t node,
                             uint64_t *index);

/* A decoded RAFT_ENTRY_CONF_CHANGE entry. */
struct raft_conf_change {
    uint8_t op; /* enum raft_conf_op */
    uint64_t node;
    struct raft_conf conf; /* resulting configuration */
};
int raft_conf_change_decode(const struct raft_entry *e, struct raft_conf_change *cc);

/* Requests a linearizable read (thesis 6.4). ctx (copied, <= 64 KiB)
 * identifies it; a later rd.read_states carries it back with the read
 * index. Reads that arrive while a confirmation round is in flight are
 * batched into the next round. The leader queues requests until it has
 * committed an entry of its own term. A follower forwards to the leader.
 * RAFT_EDROPPED when there is no known leader. */
int raft_read_index(struct raft *r, const void *ctx, uint32_t ctx_len);

/* Leader only: transfers leadership to a voter (thesis 3.10). Proposals
 * are refused with RAFT_EDROPPED until the transfer ends or times out after
 * an election timeout. */
int raft_transfer_leader(struct raft *r, uint64_t to);

/* Starts an election now (PreVote first if enabled). */
int raft_campaign(struct raft *r);

bool raft_has_ready(const struct raft *r);

/* Fills rd with the pending work; see THE ORDERING CONTRACT. */
int raft_ready(struct raft *r, struct raft_ready *rd);

/* Acknowledges that rd has been processed. */
int raft_advance(struct raft *r, const struct raft_ready *rd);

/* Tells raft that its log is durable up to (index, term); for callers that
 * persist asynchronously. Ignored if the entry at index has another term. */
int raft_persisted(struct raft *r, uint64_t index, uint64_t term);

/* Tells raft the application has applied up to index (<= last handed out). */
int raft_applied(struct raft *r, uint64_t index);

/* Discards log entries up to index (<= applied) and records a snapshot
 * with data (copied) as of index, which the leader will send to followers
 * too far behind. RAFT_ECOMPACTED if index <= current snapshot index;
 * RAFT_EUNAVAILABLE if index > applied, or if no configuration is known as
 * of index (a joiner that has not yet received its CONF_CHANGE entry). */
int raft_compact(struct raft *r, uint64_t index, const void *data, uint32_t len);

/* Transport feedback: a snapshot to `to` failed (or succeeded). Optional:
 * without it the leader retries after an election timeout. */
int raft_report_snapshot(struct raft *r, uint64_t to, bool ok);

/* Transport feedback: `to` is unreachable; replication falls back to probing. */
int raft_report_unreachable(struct raft *r, uint64_t to);

enum raft_progress_state {
    RAFT_PROGRESS_PROBE = 0,
    RAFT_PROGRESS_REPLICATE,
    RAFT_PROGRESS_SNAPSHOT,
};

struct raft_progress_status {
    uint64_t id;
    uint64_t match;
    uint64_t next;
    uint8_t state; /* enum raft_progress_state */
    bool learner;
    bool recent_active;
    uint32_t inflight;
};

struct raft_status {
    uint64_t id;
    uint64_t term;
    uint64_t vote;
    uint64_t commit;
    uint64_t applied;
    uint64_t lead;
    uint8_t role;
    uint64_t first_index; /* first entry in memory */
    uint64_t last_index;
    uint64_t stable_index; /* last durable entry as far as raft knows */
    uint64_t lead_transferee;
    struct raft_conf conf;
    uint32_t n_progress; /* leader only */
    struct raft_progress_status progress[RAFT_MAX_MEMBERS];
};

void raft_status(const struct raft *r, struct raft_status *st);

/* Reads the entry at index (pointer valid until the next call that may
 * change the log). RAFT_ECOMPACTED or RAFT_EUNAVAILABLE otherwise. */
int raft_entry_at(const struct raft *r, uint64_t index, const struct raft_entry **e);

#ifdef __cplusplus
}
#endif
#endif /* KEELSON_RAFT_H */
