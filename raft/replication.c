/* replication.c - AppendEntries, heartbeats, snapshots and commitment.
 *
 * Paper 5.3 (log replication), 5.4.2 (commit only entries of the current
 * term by counting), 7 (snapshots), thesis 10.2.1 (the leader writes its log
 * in parallel with sending: its own match is its durable index). */
#include <string.h>

#include "core.h"

void raft__transfer_progress(struct raft *r, struct raft__progress *pr);
uint64_t raft__quorum_hb_seq(const struct raft *r);

static void send_snapshot(struct raft *r, struct raft__progress *pr)
{
    struct raft_message m;
    memset(&m, 0, sizeof(m));
    m.type = RAFT_MSG_SNAPSHOT;
    m.to = pr->pr_id;
    m.snapshot = r->snap;
    raft__pr_become_snapshot(pr, r->snap.meta.index);
    raft__send(r, &m);
}

/* Sends the next APPEND to pr if its flow control allows. With send_empty,
 * an APPEND without entries is sent too (to probe or carry commit).
 * Returns whether a message was sent. */
bool raft__maybe_send_append(struct raft *r, struct raft__progress *pr, bool send_empty)
{
    struct raft_message m;
    uint64_t prev, prev_term, last = raft__last_index(r), bytes = 0;
    size_t n = 0;
    if (pr->pr_id == r->id || raft__pr_paused(r, pr) || r->err)
        return false;
    prev = pr->pr_next - 1;
    if (raft__term(r, prev, &prev_term) != 0) {
        if (prev < r->snap.meta.index) {
            /* Paper 7: the follower needs entries we discarded. */
            send_snapshot(r, pr);
            return true;
        }
        /* next beyond our log (stale progress): restart probing. */
        raft__pr_become_probe(pr);
        pr->pr_next = RAFT__MIN(pr->pr_next, last + 1);
        prev = pr->pr_next - 1;
        if (raft__term(r, prev, &prev_term) != 0) {
            send_snapshot(r, pr);
            return true;
        }
    }
    if (pr->pr_next <= last)
        n = raft__log_limit(r, pr->pr_next, last, r->max_msg_bytes, &bytes);
    if (n == 0 && !send_empty)
        return false;
    memset(&m, 0, sizeof(m));
    m.type = RAFT_MSG_APPEND;
    m.to = pr->pr_id;
    m.index = prev;
    m.log_term = prev_term;
    m.commit = r->commit;
    if (n > 0) {
        m.entries = raft__malloc(r, n * sizeof(*m.entries));
        if (m.entries == NULL)
            return false;
        memcpy(m.entries, raft__entry(r, pr->pr_next), n * sizeof(*m.entries));
        m.n_entries = (uint32_t)n;
    }
    switch (pr->pr_state) {
    case RAFT_PROGRESS_REPLICATE:
        if (n > 0) {
            /* Pipelining (thesis 10.2.2): assume success, bounded window. */
            pr->pr_next = prev + n + 1;
            raft__ins_add(&pr->pr_ins, prev + n, bytes);
        }
        break;
    case RAFT_PROGRESS_PROBE:
        pr->pr_probe_sent = true;
        break;
    }
    raft__send(r, &m);
    return true;
}

void raft__bcast_append(struct raft *r)
{
    for (uint32_t i = 0; i < r->n_prs; i++)
        raft__maybe_send_append(r, &r->prs[i], true);
}

void raft__bcast_heartbeat(struct raft *r)
{
    for (uint32_t i = 0; i < r->n_prs; i++) {
        struct raft__progress *pr = &r->prs[i];
        struct raft_message m;
        if (pr->pr_id == r->id)
            continue;
        memset(&m, 0, sizeof(m));
        m.type = RAFT_MSG_HEARTBEAT;
        m.to = pr->pr_id;
        /* Never tell a follower to commit beyond what it is known to hold. */
        m.commit = RAFT__MIN(pr->pr_match, r->commit);
        m.hb_seq = r->read_seq;
        raft__send(r, &m);
    }
}

/* Paper 5.3/5.4.2: commit the largest index durable on a majority if it
 * belongs to the current term. Returns whether commit moved. */
bool raft__maybe_commit(struct raft *r)
{
    uint64_t q = raft__quorum_match(r), old = r->commit;
    if (q <= r->commit || !raft__match_term(r, q, r->term))
        return false;
    r->commit = q;
    for (uint64_t i = old + 1; i <= q; i++) {
        uint64_t len = raft__entry(r, i)->len;
        r->uncommitted_bytes = r->uncommitted_bytes > len ? r->uncommitted_bytes - len : 0;
    }
    raft__read_on_first_commit(r);
    return true;
}

/* Leader appends new entries to its own log (terms set here). */
int raft__append_local(struct raft *r, struct raft_entry *es, size_t n)
{
    uint64_t size = 0;
    int rv;
    for (size_t i = 0; i < n; i++) {
        es[i].term = r->term;
        size += es[i].len;
    }
    if (r->max_uncommitted_bytes != 0 && r->uncommitted_bytes > 0
        && r->uncommitted_bytes + size > r->max_uncommitted_bytes)
        return RAFT_EDROPPED;
    rv = raft__log_append(r, es, n);
    if (rv != 0)
        return r->err = rv;
    r->uncommitted_bytes += size;
    return 0;
}

/* Leader: our own log became durable further (thesis 10.2.1). */
void raft__self_persisted(struct raft *r)
{
    struct raft__progress *pr = raft__pr_find(r, r->id);
    if (r->role != RAFT_LEADER || pr == NULL)
        return;
    if (raft__pr_maybe_update(pr, r->stable) && raft__maybe_commit(r))
        raft__bcast_append(r);
}

static void send_append_resp(struct raft *r, uint64_t to, uint64_t index)
{
    struct raft_message m;
    memset(&m, 0, sizeof(m));
    m.type = RAFT_MSG_APPEND_RESP;
    m.to = to;
    m.index = index;
    raft__send(r, &m);
}

/* Follower: AppendEntries receiver (paper Figure 2). */
void raft__step_append(struct raft *r, const struct raft_message *m)
{
    uint64_t last_new = 0;
    int rv;
    if (m->index < r->commit) {
        send_append_resp(r, m->from, r->commit);
        return;
    }
    rv = raft__log_maybe_append(r, m, &last_new);
    if (rv == 0) {
        send_append_resp(r, m->from, last_new);
    } else if (rv == RAFT_ESTALE) {
        /* Reject with a hint (etcd's fast backtracking): the largest index
         * <= prev whose term is <= the leader's prev term. */
        struct raft_message resp;
        uint64_t hint_term = 0;
        uint64_t hint = RAFT__MIN(m->index, raft__last_index(r));
        hint = raft__find_conflict_by_term(r, hint, m->log_term, &hint_term);
        memset(&resp, 0, sizeof(resp));
        resp.type = RAFT_MSG_APPEND_RESP;
        resp.to = m->from;
        resp.index = m->index;
        resp.reject = 1;
        resp.reject_hint = hint;
        resp.log_term = hint_term;
        raft__send(r, &resp);
    }
    /* RAFT_EINVAL (would overwrite committed entries) or ENOMEM: drop. */
}

void raft__step_heartbeat(struct raft *r, const struct raft_message *m)
{
    struct raft_message resp;
    raft__commit_to(r, m->commit);
    memset(&resp, 0, sizeof(resp));
    resp.type = RAFT_MSG_HEARTBEAT_RESP;
    resp.to = m->from;
    resp.hb_seq = m->hb_seq;
    raft__send(r, &resp);
}

/* Follower: InstallSnapshot receiver (paper 7). */
void raft__step_snapshot(struct raft *r, const struct raft_message *m)
{
    const struct raft_snapshot_meta *s = &m->snapshot.meta;
    if (s->index <= r->commit) {
        send_append_resp(r, m->from, r->commit);
        return;
    }
    if (raft__match_term(r, s->index, s->term)) {
        /* We hold the snapshot's last entry: just fast-forward commit. */
        raft__commit_to(r, s->index);
        send_append_resp(r, m->from, r->commit);
        return;
    }
    if (raft__log_restore(r, &m->snapshot) != 0) {
        r->err = RAFT_ENOMEM;
        return;
    }
    send_append_resp(r, m->from, raft__last_index(r));
}

void raft__step_append_resp(struct raft *r, const struct raft_message *m)
{
    struct raft__progress *pr = raft__pr_find(r, m->from);
    if (pr == NULL)
        return;
    pr->pr_recent_active = true;
    if (m->reject) {
        uint64_t next_probe = m->reject_hint;
        if (m->log_term > 0)
            next_probe = raft__find_conflict_by_term(r, m->reject_hint, m->log_term, NULL);
        if (raft__pr_maybe_decr(pr, m->index, next_probe)) {
            if (pr->pr_state == RAFT_PROGRESS_REPLICATE)
                raft__pr_become_probe(pr);
            raft__maybe_send_append(r, pr, true);
        }
        return;
    }
    if (m->index > raft__last_index(r))
        return; /* acknowledges entries we never had: forged or stale term */
    bool was_paused = raft__pr_paused(r, pr);
    if (!raft__pr_maybe_update(pr, m->index)) {
        /* Still unpause a snapshot that became redundant. */
        if (pr->pr_state == RAFT_PROGRESS_SNAPSHOT && pr->pr_match >= pr->pr_pending_snapshot) {
            raft__pr_become_probe(pr);
            raft__maybe_send_append(r, pr, false);
        }
        return;
    }
    switch (pr->pr_state) {
    case RAFT_PROGRESS_PROBE:
        raft__pr_become_replicate(pr);
        break;
    case RAFT_PROGRESS_SNAPSHOT:
        if (pr->pr_match + 1 >= raft__first_index(r)) {
            raft__pr_become_probe(pr);
            raft__pr_become_replicate(pr);
        }
        break;
    case RAFT_PROGRESS_REPLICATE:
        raft__ins_free_le(&pr->pr_ins, m->index);
        break;
    }
    if (raft__maybe_commit(r))
        raft__bcast_append(r);
    else if (was_paused)
        raft__maybe_send_append(r, pr, true); /* may carry commit news */
    /* Fill the window (pipelining). */
    while (raft__maybe_send_append(r, pr, false))
        ;
    raft__transfer_progress(r, pr);
}

void raft__step_heartbeat_resp(struct raft *r, const struct raft_message *m)
{
    struct raft__progress *pr = raft__pr_find(r, m->from);
    if (pr == NULL)
        return;
    pr->pr_recent_active = true;
    pr->pr_probe_sent = false;
    if (pr->pr_state == RAFT_PROGRESS_REPLICATE && raft__ins_full(&pr->pr_ins, r->max_inflight_bytes))
        raft__ins_free_first(&pr->pr_ins);
    if (pr->pr_match < raft__last_index(r) || pr->pr_state == RAFT_PROGRESS_PROBE)
        raft__maybe_send_append(r, pr, true);
    if (!pr->pr_learner && m->hb_seq > pr->pr_hb_seq && m->hb_seq <= r->read_seq) {
        pr->pr_hb_seq = m->hb_seq;
        raft__read_check(r);
    }
}
