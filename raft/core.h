/* core.h - private state of the raft module (not part of the API). */
#ifndef KEELSON_RAFT_CORE_H
#define KEELSON_RAFT_CORE_H

#include "raft.h"

/* Flow control: a ring of (last index, bytes) for in-flight APPENDs. */
struct raft__inflight {
    uint64_t index;
    uint64_t bytes;
};

struct raft__inflights {
    uint32_t start;
    uint32_t count;
    uint32_t cap;
    uint64_t bytes;
    struct raft__inflight *buf;
};

/* Leader's view of one member (paper Figure 2 nextIndex/matchIndex). */
struct raft__progress {
    uint64_t pr_id;
    uint64_t pr_match;
    uint64_t pr_next;
    uint8_t pr_state;       /* enum raft_progress_state */
    bool pr_learner;
    bool pr_probe_sent;     /* PROBE: one APPEND outstanding, paused */
    bool pr_recent_active;  /* CheckQuorum: heard from since last check */
    uint8_t pr_vote;        /* 0 unknown, 1 granted, 2 rejected */
    uint64_t pr_pending_snapshot; /* SNAPSHOT: index sent */
    unsigned pr_snap_elapsed;     /* ticks in SNAPSHOT state */
    uint64_t pr_hb_seq;     /* highest read round acknowledged */
    struct raft__inflights pr_ins;
};

struct raft__read {
    uint64_t rd_index;
    uint64_t rd_from; /* requester: self or a follower */
    uint64_t rd_seq;  /* round that confirms it; 0 = waiting for first commit */
    uint32_t rd_ctx_len;
    uint8_t *rd_ctx;
};

struct raft {
    struct raft_allocator al;
    int err; /* sticky */

    /* configuration */
    uint64_t id;
    unsigned election_tick;
    unsigned heartbeat_tick;
    bool prevote;
    bool check_quorum;
    unsigned max_inflight_msgs;
    uint64_t max_inflight_bytes;
    uint64_t max_msg_bytes;
    uint64_t max_uncommitted_bytes;
    uint64_t rng;
    bool async_persist;

    /* persistent state */
    uint64_t term;
    uint64_t vote;

    /* volatile state */
    uint8_t role;
    uint64_t lead;
    unsigned election_elapsed;
    unsigned heartbeat_elapsed;
    unsigned randomized_timeout;
    uint64_t lead_transferee;
    unsigned transfer_elapsed;
    uint64_t pending_conf_index;
    uint64_t uncommitted_bytes;

    /* log: ents[i].index == snap.meta.index + 1 + i */
    struct raft_entry *ents;
    size_t n_ents;
    size_t cap_ents;
    uint64_t stable;   /* durable up to here */
    uint64_t persisting; /* handed out for persistence up to here (>= stable) */
    uint64_t commit;
    uint64_t applying; /* handed out for apply up to here */
    uint64_t applied;
    struct raft_snapshot snap; /* latest snapshot (owned data) */
    bool snap_pending;         /* restored, not yet handed to the caller */

    /* membership (latest configuration in the log, thesis 4.1) */
    struct raft_conf conf;
    struct raft__progress prs[RAFT_MAX_MEMBERS];
    uint32_t n_prs;

    /* ReadIndex (thesis 6.4) */
    struct raft__read *reads;
    size_t n_reads;
    size_t cap_reads;
    uint64_t read_seq;       /* last round started */
    uint64_t read_confirmed; /* last round confirmed by a quorum */

    /* output, reset by raft_advance() */
    struct raft_message *msgs;
    size_t n_msgs;
    size_t cap_msgs;
    struct raft_read_state *rstates;
    size_t n_rstates;
    size_t cap_rstates;
    void **grave; /* buffers to free at the next raft_advance() */
    size_t n_grave;
    size_t cap_grave;
    struct raft_hard_state prev_hs;
    struct raft_soft_state prev_ss;
    bool in_ready;
    struct raft_ready cur; /* what raft_ready() handed out */
};

/* memory (raft.c) */
void *raft__malloc(struct raft *r, size_t n);
void *raft__realloc(struct raft *r, void *p, size_t n);
void raft__free(struct raft *r, void *p);
void raft__bury(struct raft *r, void *p); /* free at next advance */
bool raft__grow(struct raft *r, void **arr, size_t *cap, size_t need, size_t elem);
void raft__send(struct raft *r, struct raft_message *m);
uint64_t raft__rand(struct raft *r);

/* log.c */
uint64_t raft__last_index(const struct raft *r);
uint64_t raft__first_index(const struct raft *r);
uint64_t raft__last_term(const struct raft *r);
int raft__term(const struct raft *r, uint64_t index, uint64_t *term);
uint64_t raft__term_or0(const struct raft *r, uint64_t index);
bool raft__match_term(const struct raft *r, uint64_t index, uint64_t term);
struct raft_entry *raft__entry(const struct raft *r, uint64_t index);
bool raft__up_to_date(const struct raft *r, uint64_t last_index, uint64_t last_term);
int raft__log_append(struct raft *r, const struct raft_entry *es, size_t n);
void raft__log_truncate(struct raft *r, uint64_t after);
int raft__log_maybe_append(struct raft *r, const struct raft_message *m, uint64_t *last_new);
bool raft__commit_to(struct raft *r, uint64_t index);
uint64_t raft__find_conflict_by_term(const struct raft *r, uint64_t index, uint64_t term,
                                     uint64_t *found_term);
int raft__log_restore(struct raft *r, const struct raft_snapshot *s);
int raft__log_compact(struct raft *r, uint64_t index, const void *data, uint32_t len);
size_t raft__log_limit(const struct raft *r, uint64_t lo, uint64_t hi, uint64_t max_bytes,
                       uint64_t *bytes);

/* progress.c */
int raft__ins_init(struct raft *r, struct raft__inflights *in, uint32_t cap);
void raft__ins_add(struct raft__inflights *in, uint64_t index, uint64_t bytes);
void raft__ins_free_le(struct raft__inflights *in, uint64_t index);
void raft__ins_free_first(struct raft__inflights *in);
bool raft__ins_full(const struct raft__inflights *in, uint64_t max_bytes);
void raft__ins_reset(struct raft__inflights *in);
void raft__pr_become_probe(struct raft__progress *pr);
void raft__pr_become_replicate(struct raft__progress *pr);
void raft__pr_become_snapshot(struct raft__progress *pr, uint64_t index);
bool raft__pr_maybe_update(struct raft__progress *pr, uint64_t index);
bool raft__pr_maybe_decr(struct raft__progress *pr, uint64_t rejected, uint64_t hint);
bool raft__pr_paused(const struct raft *r, const struct raft__progress *pr);
struct raft__progress *raft__pr_find(struct raft *r, uint64_t id);
void raft__pr_reset_all(struct raft *r);
uint64_t raft__quorum_match(const struct raft *r);
int raft__vote_result(const struct raft *r); /* 1 won, -1 lost, 0 pending */
bool raft__quorum_active(struct raft *r);

/* membership.c */
bool raft__conf_is_voter(const struct raft_conf *c, uint64_t id);
bool raft__conf_is_learner(const struct raft_conf *c, uint64_t id);
bool raft__conf_valid(const struct raft_conf *c);
int raft__conf_encode(struct raft *r, uint8_t op, uint64_t node, const struct raft_conf *c,
                      uint8_t **data, uint32_t *len);
int raft__conf_refresh(struct raft *r);
bool raft__promotable(const struct raft *r);

/* election.c */
void raft__become_follower(struct raft *r, uint64_t term, uint64_t lead);
void raft__become_pre_candidate(struct raft *r);
void raft__become_candidate(struct raft *r);
int raft__become_leader(struct raft *r);
void raft__campaign(struct raft *r, bool prevote, bool force);
void raft__tick_election(struct raft *r);
void raft__tick_heartbeat(struct raft *r);
void raft__step_vote(struct raft *r, const struct raft_message *m);
void raft__step_vote_resp(struct raft *r, const struct raft_message *m);
void raft__reset_timeouts(struct raft *r);
void raft__step_timeout_now(struct raft *r, const struct raft_message *m);
void raft__abort_transfer(struct raft *r);

/* replication.c */
bool raft__maybe_send_append(struct raft *r, struct raft__progress *pr, bool send_empty);
void raft__bcast_append(struct raft *r);
void raft__bcast_heartbeat(struct raft *r);
bool raft__maybe_commit(struct raft *r);
int raft__append_local(struct raft *r, struct raft_entry *es, size_t n);
void raft__step_append(struct raft *r, const struct raft_message *m);
void raft__step_heartbeat(struct raft *r, const struct raft_message *m);
void raft__step_snapshot(struct raft *r, const struct raft_message *m);
void raft__step_append_resp(struct raft *r, const struct raft_message *m);
void raft__step_heartbeat_resp(struct raft *r, const struct raft_message *m);
void raft__self_persisted(struct raft *r);

/* readindex.c */
int raft__read_request(struct raft *r, uint64_t from, const uint8_t *ctx, uint32_t len);
void raft__read_on_first_commit(struct raft *r);
void raft__read_check(struct raft *r);
void raft__read_reset(struct raft *r);
int raft__read_state_add(struct raft *r, uint64_t index, const uint8_t *ctx, uint32_t len);

/* Entry check of calls that change state: sticky error, and no mutation
 * while a Ready is out (its pointers must stay valid). */
#define RAFT__ENTER(r)                  \
    do {                                \
        if ((r)->err)                   \
            return (r)->err;            \
        if ((r)->in_ready)              \
            return RAFT_EBUSY;          \
    } while (0)

#define RAFT__MIN(a, b) ((a) < (b) ? (a) : (b))
#define RAFT__MAX(a, b) ((a) > (b) ? (a) : (b))

#endif
