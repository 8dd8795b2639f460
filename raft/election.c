/* election.c - roles, timeouts, votes, PreVote, CheckQuorum, leader transfer.
 *
 * Role transitions (paper Figure 4, thesis 9.6 for PreVote):
 *   follower      -> pre-candidate (timeout, prevote) | candidate (timeout)
 *   pre-candidate -> candidate (prevote quorum) | follower
 *   candidate     -> leader (vote quorum) | follower (higher term / leader)
 *   leader        -> follower (higher term, CheckQuorum failure)
 * Any role -> follower on a higher term (paper 5.1). */
#include <assert.h>
#include <string.h>

#include "core.h"

/* Allowed transitions, asserted on every change. */
static const bool transition_ok[4][4] = {
    /*                 F     PC     C     L   */
    /* follower  */ {true, true, true, false},
    /* pre-cand  */ {true, true, true, false},
    /* candidate */ {true, true, true, true},
    /* leader    */ {true, false, false, true},
};

static void set_role(struct raft *r, uint8_t role)
{
    assert(transition_ok[r->role][role]);
    (void)transition_ok;
    r->role = role;
}

/* Paper 5.2: election timeouts are chosen randomly from [e, 2e). */
void raft__reset_timeouts(struct raft *r)
{
    r->election_elapsed = 0;
    r->heartbeat_elapsed = 0;
    r->randomized_timeout = r->election_tick + (unsigned)(raft__rand(r) % r->election_tick);
}

static void reset(struct raft *r, uint64_t term)
{
    if (r->term != term) {
        r->term = term;
        r->vote = RAFT_NONE;
    }
    r->lead = RAFT_NONE;
    raft__reset_timeouts(r);
    raft__abort_transfer(r);
    raft__read_reset(r);
    raft__pr_reset_all(r);
    r->pending_conf_index = 0;
    r->uncommitted_bytes = 0;
}

void raft__become_follower(struct raft *r, uint64_t term, uint64_t lead)
{
    set_role(r, RAFT_FOLLOWER);
    reset(r, term);
    r->lead = lead;
}

void raft__become_pre_candidate(struct raft *r)
{
    /* PreVote does not change term or vote (thesis 9.6). */
    set_role(r, RAFT_PRE_CANDIDATE);
    raft__pr_reset_all(r);
    raft__read_reset(r);
    r->lead = RAFT_NONE;
}

void raft__become_candidate(struct raft *r)
{
    set_role(r, RAFT_CANDIDATE);
    reset(r, r->term + 1);
    r->vote = r->id;
}

int raft__become_leader(struct raft *r)
{
    struct raft_entry noop;
    set_role(r, RAFT_LEADER);
    reset(r, r->term);
    r->lead = r->id;
    /* Any conf change already in the log must commit before a new one. */
    r->pending_conf_index = raft__last_index(r);
    r->read_confirmed = r->read_seq;
    for (uint32_t i = 0; i < r->n_prs; i++)
        if (r->prs[i].pr_id == r->id) {
            /* our own log needs no probing */
            raft__pr_become_replicate(&r->prs[i]);
            r->prs[i].pr_match = r->stable;
        }
    /* Thesis 6.4 / paper 8: commit a no-op to learn the commit index. */
    memset(&noop, 0, sizeof(noop));
    noop.term = r->term;
    return raft__append_local(r, &noop, 1);
}

static void send_vote_requests(struct raft *r, bool prevote, bool force)
{
    uint64_t term = prevote ? r->term + 1 : r->term;
    for (uint32_t i = 0; i < r->n_prs; i++) {
        struct raft__progress *pr = &r->prs[i];
        struct raft_message m;
        if (pr->pr_learner || pr->pr_id == r->id)
            continue;
        memset(&m, 0, sizeof(m));
        m.type = prevote ? RAFT_MSG_PREVOTE : RAFT_MSG_VOTE;
        m.to = pr->pr_id;
        m.term = term;
        m.index = raft__last_index(r);
        m.log_term = raft__last_term(r);
        if (force)
            m.flags = RAFT_MSG_FLAG_FORCE;
        raft__send(r, &m);
    }
}

static void record_vote(struct raft *r, uint64_t id, bool granted)
{
    struct raft__progress *pr = raft__pr_find(r, id);
    if (pr != NULL && pr->pr_vote == 0)
        pr->pr_vote = granted ? 1 : 2;
}

void raft__campaign(struct raft *r, bool prevote, bool force)
{
    if (!raft__promotable(r))
        return;
    /* A pending snapshot or unapplied conf change is fine: the
     * configuration in use is the latest appended one. */
    if (prevote)
        raft__become_pre_candidate(r);
    else
        raft__become_candidate(r);
    record_vote(r, r->id, true);
    if (raft__vote_result(r) == 1) {
        /* single voter: win at once */
        if (prevote) {
            raft__campaign(r, false, force);
            return;
        }
        (void)raft__become_leader(r);
        return;
    }
    send_vote_requests(r, prevote, force);
}

int raft_campaign(struct raft *r)
{
    RAFT__ENTER(r);
    if (r->role == RAFT_LEADER)
        return 0;
    raft__campaign(r, r->prevote, false);
    return r->err;
}

/* Follower/candidate tick (paper 5.2). */
void raft__tick_election(struct raft *r)
{
    r->election_elapsed++;
    if (raft__promotable(r) && r->election_elapsed >= r->randomized_timeout) {
        r->election_elapsed = 0;
        raft__campaign(r, r->prevote, false);
    }
}

/* Leader tick: heartbeats (paper 5.2), CheckQuorum (thesis 6.2), transfer
 * timeout (thesis 3.10), snapshot retry. */
void raft__tick_heartbeat(struct raft *r)
{
    r->heartbeat_elapsed++;
    r->election_elapsed++;
    if (r->election_elapsed >= r->election_tick) {
        r->election_elapsed = 0;
        if (r->check_quorum && !raft__quorum_active(r)) {
            raft__become_follower(r, r->term, RAFT_NONE);
            return;
        }
    }
    if (r->lead_transferee != RAFT_NONE && ++r->transfer_elapsed >= r->election_tick)
        raft__abort_transfer(r);
    for (uint32_t i = 0; i < r->n_prs; i++) {
        struct raft__progress *pr = &r->prs[i];
        if (pr->pr_state == RAFT_PROGRESS_SNAPSHOT
            && ++pr->pr_snap_elapsed >= r->election_tick) {
            /* The snapshot was probably lost: probe again. */
            raft__pr_become_probe(pr);
            pr->pr_next = pr->pr_match + 1;
        }
    }
    if (r->heartbeat_elapsed >= r->heartbeat_tick) {
        r->heartbeat_elapsed = 0;
        raft__bcast_heartbeat(r);
    }
}

/* RequestVote / PreVote receiver (paper 5.2, 5.4.1; thesis 9.6). Terms have
 * been handled by raft_step already. */
void raft__step_vote(struct raft *r, const struct raft_message *m)
{
    bool prevote = m->type == RAFT_MSG_PREVOTE;
    struct raft_message resp;
    bool can_vote = r->vote == m->from || (r->vote == RAFT_NONE && r->lead == RAFT_NONE)
                    || (prevote && m->term > r->term);
    bool grant = can_vote && raft__up_to_date(r, m->index, m->log_term);
    memset(&resp, 0, sizeof(resp));
    resp.type = prevote ? RAFT_MSG_PREVOTE_RESP : RAFT_MSG_VOTE_RESP;
    resp.to = m->from;
    if (grant) {
        /* A granted prevote answers in the candidate's future term so it
         * can count it; a real vote is recorded durably (Figure 2). */
        resp.term = m->term;
        if (!prevote) {
            r->election_elapsed = 0;
            r->vote = m->from;
        }
    } else {
        resp.term = r->term;
        resp.reject = 1;
    }
    raft__send(r, &resp);
}

void raft__step_vote_resp(struct raft *r, const struct raft_message *m)
{
    bool prevote = m->type == RAFT_MSG_PREVOTE_RESP;
    int res;
    if ((prevote && r->role != RAFT_PRE_CANDIDATE) || (!prevote && r->role != RAFT_CANDIDATE))
        return;
    record_vote(r, m->from, !m->reject);
    res = raft__vote_result(r);
    if (res == 1) {
        if (prevote)
            raft__campaign(r, false, false);
        else {
            (void)raft__become_leader(r);
            raft__bcast_append(r);
        }
    } else if (res == -1) {
        raft__become_follower(r, r->term, RAFT_NONE);
    }
}

/* Leader transfer target: campaign now, skipping PreVote and leases. */
void raft__step_timeout_now(struct raft *r, const struct raft_message *m)
{
    (void)m;
    if (!raft__promotable(r))
        return;
    raft__campaign(r, false, true);
}

void raft__abort_transfer(struct raft *r)
{
    r->lead_transferee = RAFT_NONE;
    r->transfer_elapsed = 0;
}

static void send_timeout_now(struct raft *r, uint64_t to)
{
    struct raft_message m;
    memset(&m, 0, sizeof(m));
    m.type = RAFT_MSG_TIMEOUT_NOW;
    m.to = to;
    raft__send(r, &m);
}

int raft_transfer_leader(struct raft *r, uint64_t to)
{
    struct raft__progress *pr;
    RAFT__ENTER(r);
    if (r->role != RAFT_LEADER)
        return RAFT_ENOTLEADER;
    pr = raft__pr_find(r, to);
    if (pr == NULL || pr->pr_learner)
        return RAFT_EINVAL;
    if (to == r->id)
        return 0;
    if (r->lead_transferee == to)
        return 0;
    r->lead_transferee = to;
    r->transfer_elapsed = 0;
    if (pr->pr_match == raft__last_index(r))
        send_timeout_now(r, to);
    else
        raft__maybe_send_append(r, pr, true);
    return r->err;
}

/* Called by replication when the transferee catches up. */
void raft__transfer_progress(struct raft *r, struct raft__progress *pr);
void raft__transfer_progress(struct raft *r, struct raft__progress *pr)
{
    if (r->lead_transferee == pr->pr_id && pr->pr_match == raft__last_index(r))
        send_timeout_now(r, pr->pr_id);
}
