/* raft_test.c - one test per rule, each citing the Raft paper ("paper",
 * Ongaro & Ousterhout 2014) or thesis (Ongaro 2014) section it checks. */
#include <string.h>

#include "cluster.h"
#include "unit.h"

static struct tc_config cfg3(void)
{
    struct tc_config c;
    tc_default_config(&c);
    return c;
}

static struct raft_status st_of(struct tcluster *tc, uint64_t id)
{
    struct raft_status st;
    raft_status(tc->nodes[id].r, &st);
    return st;
}

static void elect(struct tcluster *tc, uint64_t id)
{
    raft_campaign(tc->nodes[id].r);
    tc_stabilize(tc);
}

/* Ticks the leader and delivers everything, a few heartbeat rounds. */
static void settle(struct tcluster *tc, uint64_t leader)
{
    for (int i = 0; i < 5; i++) {
        tc_tick(tc, leader, 1);
        tc_stabilize(tc);
    }
}

static int propose(struct tcluster *tc, uint64_t id, const char *s)
{
    return raft_propose(tc->nodes[id].r, s, (uint32_t)strlen(s), NULL);
}

/* Drains node id's Ready without persisting or sending anything. */
static void take_msgs(struct tcluster *tc, uint64_t id, struct raft_message *out, size_t *n)
{
    struct raft_ready rd;
    *n = 0;
    if (!raft_has_ready(tc->nodes[id].r))
        return;
    raft_ready(tc->nodes[id].r, &rd);
    for (size_t i = 0; i < rd.n_messages; i++)
        tc_msg_clone(&rd.messages[i], &out[(*n)++]);
    raft_advance(tc->nodes[id].r, &rd);
}

/* ---- election: paper 5.2 ---- */

TEST(election_basic_5_2)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    tc_init(&tc, 3, 0, 3, &c);
    elect(&tc, 1);
    CHECK_EQ(tc_leader(&tc), 1);
    for (uint64_t i = 1; i <= 3; i++) {
        CHECK_EQ(st_of(&tc, i).term, 1);
        CHECK_EQ(st_of(&tc, i).lead, 1);
    }
    /* the leader's no-op (paper 8) is committed and applied everywhere */
    for (uint64_t i = 1; i <= 3; i++)
        CHECK_EQ(tc.nodes[i].n_applied, 1);
    tc_close(&tc);
}

TEST(election_timeout_randomized_5_2)
{
    /* Timeouts are drawn from [e, 2e) by the injected RNG and differ by seed. */
    unsigned seen[64] = {0};
    int distinct = 0;
    for (uint64_t seed = 1; seed <= 50; seed++) {
        struct tcluster tc;
        struct tc_config c = cfg3();
        unsigned ticks = 0;
        c.seed = seed;
        tc_init(&tc, 3, 0, 3, &c);
        while (st_of(&tc, 1).role == RAFT_FOLLOWER && ticks < 100) {
            raft_tick(tc.nodes[1].r);
            ticks++;
        }
        CHECK(ticks >= c.election && ticks < 2 * c.election);
        if (ticks < 64 && !seen[ticks]++)
            distinct++;
        tc_close(&tc);
    }
    CHECK(distinct >= 5);
}

TEST(election_same_seed_replays_5_2)
{
    /* Determinism: the same seed gives the same timeout. */
    unsigned t[2];
    for (int k = 0; k < 2; k++) {
        struct tcluster tc;
        struct tc_config c = cfg3();
        c.seed = 77;
        tc_init(&tc, 3, 0, 3, &c);
        t[k] = 0;
        while (st_of(&tc, 2).role == RAFT_FOLLOWER)
            raft_tick(tc.nodes[2].r), t[k]++;
        tc_close(&tc);
    }
    CHECK_EQ(t[0], t[1]);
}

TEST(vote_once_per_term_5_2)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    struct raft_message v;
    struct raft_message out[16];
    size_t n;
    tc_init(&tc, 3, 0, 3, &c);
    memset(&v, 0, sizeof(v));
    v.type = RAFT_MSG_VOTE;
    v.from = 1;
    v.to = 3;
    v.term = 1;
    raft_step(tc.nodes[3].r, &v);
    take_msgs(&tc, 3, out, &n);
    CHECK_EQ(n, 1);
    CHECK_EQ(out[0].reject, 0);
    tc_msg_free(&out[0]);
    v.from = 2; /* same term, other candidate */
    raft_step(tc.nodes[3].r, &v);
    take_msgs(&tc, 3, out, &n);
    CHECK_EQ(n, 1);
    CHECK_EQ(out[0].reject, 1);
    tc_msg_free(&out[0]);
    v.from = 1; /* a retransmission to the same candidate is granted again */
    raft_step(tc.nodes[3].r, &v);
    take_msgs(&tc, 3, out, &n);
    CHECK_EQ(out[0].reject, 0);
    tc_msg_free(&out[0]);
    CHECK_EQ(tc.nodes[3].hs.vote, 0); /* take_msgs does not persist */
    tc_close(&tc);
}

TEST(vote_requires_up_to_date_log_5_4_1)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    tc_init(&tc, 3, 0, 3, &c);
    elect(&tc, 1);
    tc_isolate(&tc, 3);
    propose(&tc, 1, "a");
    tc_stabilize(&tc);
    tc_heal(&tc);
    /* 3 lacks "a": 1 and 2 must refuse it, whatever its term. */
    tc_drop_queue(&tc, 3);
    raft_campaign(tc.nodes[3].r);
    tc_stabilize(&tc);
    CHECK(st_of(&tc, 3).role != RAFT_LEADER);
    CHECK(tc_leader(&tc) != 3);
    tc_close(&tc);
}

TEST(higher_term_makes_follower_5_1)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    struct raft_message m;
    tc_init(&tc, 3, 0, 3, &c);
    elect(&tc, 1);
    memset(&m, 0, sizeof(m));
    m.type = RAFT_MSG_APPEND_RESP;
    m.from = 2;
    m.to = 1;
    m.term = 5;
    raft_step(tc.nodes[1].r, &m);
    CHECK_EQ(st_of(&tc, 1).role, RAFT_FOLLOWER);
    CHECK_EQ(st_of(&tc, 1).term, 5);
    tc_close(&tc);
}

TEST(single_node_commits_after_persist_10_2_1)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    tc_init(&tc, 1, 0, 1, &c);
    raft_campaign(tc.nodes[1].r);
    CHECK_EQ(st_of(&tc, 1).role, RAFT_LEADER);
    CHECK_EQ(st_of(&tc, 1).commit, 0); /* no-op not yet durable */
    tc_process(&tc, 1);
    CHECK_EQ(st_of(&tc, 1).commit, 1);
    propose(&tc, 1, "x");
    tc_stabilize(&tc);
    CHECK_EQ(tc.nodes[1].n_applied, 2);
    CHECK(strcmp(tc.nodes[1].applied[1].data, "x") == 0);
    tc_close(&tc);
}

/* ---- PreVote and CheckQuorum: thesis 9.6, 6.2, 4.2.3 ---- */

TEST(prevote_isolated_node_keeps_term_9_6)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    c.prevote = true;
    tc_init(&tc, 3, 0, 3, &c);
    elect(&tc, 1);
    tc_isolate(&tc, 3);
    tc_tick(&tc, 3, 100);
    tc_stabilize(&tc);
    CHECK_EQ(st_of(&tc, 3).term, 1);
    CHECK_EQ(st_of(&tc, 3).role, RAFT_PRE_CANDIDATE);
    tc_heal(&tc);
    tc_tick(&tc, 1, 1); /* heartbeat */
    tc_stabilize(&tc);
    CHECK_EQ(tc_leader(&tc), 1);
    CHECK_EQ(st_of(&tc, 1).term, 1);
    CHECK_EQ(st_of(&tc, 3).lead, 1);
    tc_close(&tc);
}

TEST(without_prevote_rejoin_disrupts_9_6)
{
    /* The contrast case: the isolated node's term races ahead. */
    struct tcluster tc;
    struct tc_config c = cfg3();
    tc_init(&tc, 3, 0, 3, &c);
    elect(&tc, 1);
    tc_isolate(&tc, 3);
    tc_tick(&tc, 3, 100);
    CHECK(st_of(&tc, 3).term > 1);
    tc_close(&tc);
}

TEST(check_quorum_leader_steps_down_6_2)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    c.check_quorum = true;
    tc_init(&tc, 3, 0, 3, &c);
    elect(&tc, 1);
    tc_isolate(&tc, 1);
    for (int i = 0; i < 2 * 10 + 1; i++) {
        tc_tick(&tc, 1, 1);
        tc_stabilize(&tc);
    }
    CHECK_EQ(st_of(&tc, 1).role, RAFT_FOLLOWER);
    tc_close(&tc);
}

TEST(check_quorum_lease_ignores_votes_4_2_3)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    struct raft_message v;
    c.check_quorum = true;
    tc_init(&tc, 3, 0, 3, &c);
    elect(&tc, 1);
    memset(&v, 0, sizeof(v));
    v.type = RAFT_MSG_VOTE;
    v.from = 3;
    v.to = 2;
    v.term = 9;
    v.index = 100;
    v.log_term = 9;
    raft_step(tc.nodes[2].r, &v); /* 2 heard from leader 1 just now */
    CHECK_EQ(st_of(&tc, 2).term, 1);
    CHECK_EQ(st_of(&tc, 2).lead, 1);
    /* once the lease expired the vote is considered */
    tc_tick(&tc, 2, 10);
    raft_step(tc.nodes[2].r, &v);
    CHECK_EQ(st_of(&tc, 2).term, 9);
    tc_close(&tc);
}

/* ---- replication: paper 5.3, thesis 10.2 ---- */

TEST(replication_commit_apply_5_3)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    tc_init(&tc, 5, 0, 5, &c);
    elect(&tc, 1);
    propose(&tc, 1, "a");
    propose(&tc, 1, "b");
    tc_stabilize(&tc);
    for (uint64_t i = 1; i <= 5; i++) {
        CHECK_EQ(tc.nodes[i].n_applied, 3);
        CHECK(strcmp(tc.nodes[i].applied[2].data, "b") == 0);
        CHECK_EQ(st_of(&tc, i).commit, 3);
    }
    tc_close(&tc);
}

TEST(batching_one_append_per_follower_10_2)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    struct raft_ready rd;
    tc_init(&tc, 3, 0, 3, &c);
    elect(&tc, 1);
    for (int i = 0; i < 10; i++)
        propose(&tc, 1, "p");
    raft_ready(tc.nodes[1].r, &rd);
    CHECK_EQ(rd.n_entries, 10); /* one write for the batch */
    CHECK_EQ(rd.n_messages, 2); /* one APPEND per follower */
    for (size_t i = 0; i < rd.n_messages; i++) {
        CHECK_EQ(rd.messages[i].type, RAFT_MSG_APPEND);
        CHECK_EQ(rd.messages[i].n_entries, 10);
    }
    raft_advance(tc.nodes[1].r, &rd); /* messages lost */
    settle(&tc, 1);
    CHECK_EQ(tc.nodes[3].n_applied, 11);
    tc_close(&tc);
}

TEST(max_msg_bytes_and_inflight_window_10_2_2)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    struct raft_ready rd;
    c.max_msg_bytes = 60; /* 24 bytes overhead + data: two entries of 10 */
    c.max_inflight = 3;
    tc_init(&tc, 2, 0, 2, &c);
    elect(&tc, 1);
    for (int i = 0; i < 20; i++)
        propose(&tc, 1, "0123456789");
    raft_ready(tc.nodes[1].r, &rd);
    CHECK_EQ(rd.n_messages, 3); /* window of 3 */
    for (size_t i = 0; i < rd.n_messages; i++)
        CHECK(rd.messages[i].n_entries <= 2 && rd.messages[i].n_entries >= 1);
    raft_advance(tc.nodes[1].r, &rd); /* lost: recovery via heartbeats */
    settle(&tc, 1);
    CHECK_EQ(tc.nodes[2].n_applied, 21);
    tc_close(&tc);
}

TEST(inflight_bytes_window_10_2_2)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    struct raft_ready rd;
    c.max_msg_bytes = 40;
    c.max_inflight_bytes = 70;
    tc_init(&tc, 2, 0, 2, &c);
    elect(&tc, 1);
    for (int i = 0; i < 20; i++)
        propose(&tc, 1, "0123456789");
    raft_ready(tc.nodes[1].r, &rd);
    CHECK_EQ(rd.n_messages, 3); /* 34 + 34 >= 70 only after the third */
    raft_advance(tc.nodes[1].r, &rd); /* lost: recovery via heartbeats */
    settle(&tc, 1);
    CHECK_EQ(tc.nodes[2].n_applied, 21);
    tc_close(&tc);
}

TEST(leader_commit_needs_own_persist_10_2_1)
{
    /* async_persist: the leader sent its entries but its disk write is not
     * done; one follower ack is not a majority without the leader. */
    struct tcluster tc;
    struct tc_config c = cfg3();
    struct raft_ready rd;
    struct raft_message out[8];
    size_t n = 0;
    uint64_t idx;
    tc_init(&tc, 3, 0, 3, &c);
    elect(&tc, 1);
    raft_close(tc.nodes[1].r);
    {
        struct raft_config rc;
        memset(&rc, 0, sizeof(rc));
        rc.id = 1;
        rc.conf = tc.conf;
        rc.election_tick = 10;
        rc.heartbeat_tick = 1;
        rc.max_inflight_msgs = 16;
        rc.async_persist = true;
        rc.hard_state = tc.nodes[1].hs;
        rc.entries = tc.nodes[1].log;
        rc.n_entries = tc.nodes[1].n_log;
        rc.applied = tc.nodes[1].sm_index;
        CHECK_EQ(raft_init(&tc.nodes[1].r, &rc), 0);
    }
    raft_campaign(tc.nodes[1].r);
    tc_isolate(&tc, 3);
    tc_stabilize(&tc); /* node 2 votes; leader (term 2) sends no-op */
    CHECK_EQ(st_of(&tc, 1).role, RAFT_LEADER);
    /* the no-op: handed out, "written" async, never reported: no commit */
    CHECK_EQ(st_of(&tc, 1).commit, 1);
    raft_persisted(tc.nodes[1].r, st_of(&tc, 1).last_index, 2);
    tc_stabilize(&tc);
    CHECK_EQ(st_of(&tc, 1).commit, 2);
    raft_propose(tc.nodes[1].r, "z", 1, &idx);
    raft_ready(tc.nodes[1].r, &rd);
    CHECK_EQ(rd.n_entries, 1);
    for (size_t i = 0; i < rd.n_messages; i++)
        tc_msg_clone(&rd.messages[i], &out[n++]);
    raft_advance(tc.nodes[1].r, &rd); /* NOT durable yet */
    for (size_t i = 0; i < n; i++) {
        if (out[i].to == 2)
            raft_step(tc.nodes[2].r, &out[i]);
        tc_msg_free(&out[i]);
    }
    tc_process(&tc, 2);
    tc_deliver(&tc, 1); /* 2's ack reaches the leader */
    CHECK_EQ(st_of(&tc, 1).commit, 2);
    CHECK_EQ(st_of(&tc, 1).stable_index, 2);
    raft_persisted(tc.nodes[1].r, idx, 2);
    CHECK_EQ(st_of(&tc, 1).commit, idx);
    tc_close(&tc);
}

TEST(fast_backtracking_reject_hint_5_3)
{
    /* Follower 3 holds many entries of a stale term; the leader finds the
     * divergence point in O(terms) probes, not O(entries). */
    struct tcluster tc;
    struct tc_config c = cfg3();
    int probes = 0;
    tc_init(&tc, 3, 0, 3, &c);
    elect(&tc, 1);
    tc_isolate(&tc, 1);
    for (int i = 0; i < 50; i++)
        propose(&tc, 1, "stale"); /* never committed */
    tc_stabilize(&tc);
    raft_campaign(tc.nodes[2].r);
    tc_stabilize(&tc);
    CHECK_EQ(tc_leader(&tc), 2);
    for (int i = 0; i < 5; i++)
        propose(&tc, 2, "new");
    tc_stabilize(&tc);
    /* 2 restarts and leads term 3: its progress for 1 starts at last + 1 */
    tc_restart(&tc, 2);
    raft_campaign(tc.nodes[2].r);
    tc_stabilize(&tc);
    CHECK_EQ(tc_leader(&tc), 2);
    tc_heal(&tc);
    tc_tick(&tc, 2, 1);
    for (int round = 0; round < 50; round++) {
        int work = tc_process(&tc, 1) + tc_process(&tc, 2);
        for (size_t i = 0; i < tc.nq; i++)
            if (tc.q[i].type == RAFT_MSG_APPEND_RESP && tc.q[i].reject && tc.q[i].from == 1)
                probes++;
        if (work + tc_deliver(&tc, 0) == 0)
            break;
    }
    CHECK(probes >= 1 && probes <= 2);
    CHECK_EQ(st_of(&tc, 1).commit, st_of(&tc, 2).commit);
    CHECK_EQ(tc.nodes[1].applied[tc.nodes[1].n_applied - 1].term, 3);
    CHECK_EQ(st_of(&tc, 1).last_index, 8);
    tc_close(&tc);
}

TEST(commit_only_current_term_by_counting_5_4_2)
{
    /* Figure 8: an old-term entry replicated on a majority is not
     * committed by counting until an entry of the current term is. */
    struct tcluster tc;
    struct tc_config c = cfg3();
    struct raft_ready rd;
    tc_init(&tc, 3, 0, 3, &c);
    elect(&tc, 1);
    tc_isolate(&tc, 1);
    propose(&tc, 1, "old"); /* index 2, term 1, only on 1 */
    tc_process(&tc, 1);
    tc_heal(&tc);
    {
        struct raft_message m; /* 1 learns of term 2 and steps down */
        memset(&m, 0, sizeof(m));
        m.type = RAFT_MSG_APPEND_RESP;
        m.from = 3;
        m.to = 1;
        m.term = 2;
        raft_step(tc.nodes[1].r, &m);
        tc_process(&tc, 1);
    }
    /* 1 wins term 3 with 2's vote; its no-op at 3 is not yet acked */
    raft_campaign(tc.nodes[1].r);
    tc_process(&tc, 1);
    tc_deliver(&tc, 2);
    tc_process(&tc, 2);
    tc_deliver(&tc, 1); /* vote */
    CHECK_EQ(st_of(&tc, 1).role, RAFT_LEADER);
    raft_ready(tc.nodes[1].r, &rd);
    raft_advance(tc.nodes[1].r, &rd); /* drop messages; entries durable */
    /* Forge 2's ack for index 2 only (term-1 entry): must not commit. */
    {
        struct raft_message m;
        memset(&m, 0, sizeof(m));
        m.type = RAFT_MSG_APPEND_RESP;
        m.from = 2;
        m.to = 1;
        m.term = st_of(&tc, 1).term;
        m.index = 2;
        raft_step(tc.nodes[1].r, &m);
        CHECK_EQ(st_of(&tc, 1).commit, 1);
        m.index = 3;
        raft_step(tc.nodes[1].r, &m);
        CHECK_EQ(st_of(&tc, 1).commit, 3);
    }
    tc_close(&tc);
}

TEST(restart_from_disk_keeps_term_vote_log_figure2)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    tc_init(&tc, 3, 0, 3, &c);
    elect(&tc, 1);
    propose(&tc, 1, "a");
    tc_stabilize(&tc);
    for (uint64_t i = 1; i <= 3; i++)
        tc_restart(&tc, i);
    CHECK_EQ(st_of(&tc, 2).term, 1);
    CHECK_EQ(st_of(&tc, 2).vote, 1);
    CHECK_EQ(st_of(&tc, 2).last_index, 2);
    elect(&tc, 2);
    CHECK_EQ(tc_leader(&tc), 2);
    propose(&tc, 2, "b");
    tc_stabilize(&tc);
    CHECK_EQ(st_of(&tc, 1).commit, 4);
    tc_close(&tc);
}

TEST(follower_truncates_conflicting_suffix_5_3)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    tc_init(&tc, 3, 0, 3, &c);
    elect(&tc, 1);
    tc_isolate(&tc, 1);
    propose(&tc, 1, "lost1");
    propose(&tc, 1, "lost2");
    tc_stabilize(&tc);
    raft_campaign(tc.nodes[2].r);
    tc_stabilize(&tc);
    propose(&tc, 2, "kept");
    tc_stabilize(&tc);
    tc_heal(&tc);
    tc_tick(&tc, 2, 1);
    tc_stabilize(&tc);
    CHECK_EQ(st_of(&tc, 1).last_index, st_of(&tc, 2).last_index);
    CHECK(strcmp(tc.nodes[1].applied[tc.nodes[1].n_applied - 1].data, "kept") == 0);
    for (size_t i = 0; i < tc.nodes[1].n_applied; i++)
        CHECK(strncmp(tc.nodes[1].applied[i].data, "lost", 4) != 0);
    tc_close(&tc);
}

/* ---- snapshots: paper 7 ---- */

/* Leaves node lagger behind the leader (node 1): n entries of data proposed while it is cut
 * off, then the leader's log compacted past them, then the partition healed. Returns
 * tc_compact()'s result. */
static int leave_behind_compaction(struct tcluster *tc, uint64_t lagger, int n, const char *data)
{
    tc_isolate(tc, lagger);
    for (int i = 0; i < n; i++)
        propose(tc, 1, data);
    tc_stabilize(tc);
    int rc = tc_compact(tc, 1);
    tc_heal(tc);
    return rc;
}

TEST(snapshot_catch_up_7)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    tc_init(&tc, 3, 0, 3, &c);
    elect(&tc, 1);
    CHECK_EQ(leave_behind_compaction(&tc, 3, 10, "s"), 0);
    CHECK_EQ(st_of(&tc, 1).first_index, 12);
    CHECK_EQ(raft_compact(tc.nodes[1].r, 5, NULL, 0), RAFT_ECOMPACTED);
    tc_tick(&tc, 1, 1);
    tc_stabilize(&tc);
    CHECK_EQ(st_of(&tc, 3).commit, 11);
    CHECK_EQ(tc.nodes[3].sm_index, 11);
    CHECK_EQ(tc.nodes[3].sm_hash, tc.nodes[1].sm_hash);
    CHECK_EQ(st_of(&tc, 3).first_index, 12);
    propose(&tc, 1, "after");
    tc_stabilize(&tc);
    CHECK_EQ(tc.nodes[3].sm_hash, tc.nodes[1].sm_hash);
    /* restart from the installed snapshot */
    tc_restart(&tc, 3);
    CHECK_EQ(st_of(&tc, 3).commit, 12);
    tc_close(&tc);
}

TEST(snapshot_lost_is_retried_7)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    tc_init(&tc, 3, 0, 3, &c);
    elect(&tc, 1);
    leave_behind_compaction(&tc, 3, 5, "s");
    tc_tick(&tc, 1, 1);
    tc_stabilize(&tc);
    /* if 3 got it, fine; force a lost snapshot with node 2 now */
    leave_behind_compaction(&tc, 2, 5, "t");
    tc_tick(&tc, 1, 1);
    tc_process(&tc, 1);
    tc_drop_queue(&tc, 2); /* the snapshot (and all) vanishes */
    for (int i = 0; i < 30; i++) {
        tc_tick(&tc, 1, 1);
        tc_stabilize(&tc);
    }
    CHECK_EQ(st_of(&tc, 2).commit, st_of(&tc, 1).commit);
    CHECK_EQ(tc.nodes[2].sm_hash, tc.nodes[1].sm_hash);
    tc_close(&tc);
}

/* The server reports a snapshot sent once its last frame is queued (server/node_snap.c),
 * before the follower has stepped it; the follower may then die without a trace of it (the
 * crash point snap.recv.done) and restart from its old log. The leader must send again. */
TEST(snapshot_reported_sent_then_lost_is_resent_7)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    tc_init(&tc, 3, 0, 3, &c);
    elect(&tc, 1);
    CHECK_EQ(leave_behind_compaction(&tc, 3, 5, "s"), 0);
    tc_tick(&tc, 1, 1);
    /* heartbeat, response, probe, reject: then the leader sends the snapshot */
    int rounds = 0;
    while (st_of(&tc, 1).progress[2].state != RAFT_PROGRESS_SNAPSHOT && rounds++ < 10) {
        for (uint64_t id = 1; id <= 3; id++)
            tc_process(&tc, id);
        tc_deliver(&tc, 0);
    }
    CHECK_EQ(st_of(&tc, 1).progress[2].state, RAFT_PROGRESS_SNAPSHOT);
    tc_drop_queue(&tc, 3); /* the snapshot reached 3's socket, never its Raft */
    CHECK_EQ(raft_report_snapshot(tc.nodes[1].r, 3, true), 0);
    CHECK_EQ(st_of(&tc, 1).progress[2].state, RAFT_PROGRESS_PROBE);
    tc_restart(&tc, 3); /* killed before it stepped the message: the old log */
    CHECK(st_of(&tc, 3).commit < st_of(&tc, 1).commit);
    for (int i = 0; i < 30; i++) {
        tc_tick(&tc, 1, 1);
        tc_stabilize(&tc);
    }
    CHECK_EQ(st_of(&tc, 3).commit, st_of(&tc, 1).commit);
    CHECK_EQ(tc.nodes[3].sm_hash, tc.nodes[1].sm_hash);
    tc_close(&tc);
}

/* ---- ReadIndex: thesis 6.4 ---- */

TEST(read_index_batched_one_round_6_4)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    int hb = 0;
    tc_init(&tc, 3, 0, 3, &c);
    elect(&tc, 1);
    raft_read_index(tc.nodes[1].r, "r1", 2);
    raft_read_index(tc.nodes[1].r, "r2", 2);
    raft_read_index(tc.nodes[1].r, "r3", 2);
    tc_process(&tc, 1);
    for (size_t i = 0; i < tc.nq; i++)
        hb += tc.q[i].type == RAFT_MSG_HEARTBEAT;
    CHECK_EQ(hb, 2); /* one round: one heartbeat per follower */
    tc_stabilize(&tc);
    CHECK_EQ(tc.nodes[1].n_reads, 3);
    for (size_t i = 0; i < tc.nodes[1].n_reads; i++)
        CHECK_EQ(tc.nodes[1].reads[i].index, 1);
    tc_close(&tc);
}

TEST(read_index_waits_first_commit_in_term_6_4)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    tc_init(&tc, 3, 0, 3, &c);
    raft_campaign(tc.nodes[1].r);
    tc_process(&tc, 1);
    tc_deliver(&tc, 0);
    tc_process(&tc, 2);
    tc_process(&tc, 3);
    tc_deliver(&tc, 1); /* leader now, no-op not committed */
    CHECK_EQ(st_of(&tc, 1).role, RAFT_LEADER);
    CHECK_EQ(st_of(&tc, 1).commit, 0);
    raft_read_index(tc.nodes[1].r, "r", 1);
    tc_process(&tc, 1);
    CHECK_EQ(tc.nodes[1].n_reads, 0);
    tc_stabilize(&tc);
    CHECK_EQ(tc.nodes[1].n_reads, 1);
    CHECK_EQ(tc.nodes[1].reads[0].index, 1); /* the no-op's index */
    tc_close(&tc);
}

TEST(read_index_from_follower_6_4)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    tc_init(&tc, 3, 0, 3, &c);
    elect(&tc, 1);
    propose(&tc, 1, "v");
    tc_stabilize(&tc);
    CHECK_EQ(raft_read_index(tc.nodes[2].r, "f", 1), 0);
    tc_stabilize(&tc);
    CHECK_EQ(tc.nodes[2].n_reads, 1);
    CHECK_EQ(tc.nodes[2].reads[0].index, 2);
    tc_close(&tc);
}

TEST(read_index_isolated_leader_never_answers_6_4)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    tc_init(&tc, 3, 0, 3, &c);
    elect(&tc, 1);
    tc_isolate(&tc, 1);
    raft_read_index(tc.nodes[1].r, "x", 1);
    for (int i = 0; i < 5; i++) {
        tc_tick(&tc, 1, 1);
        tc_stabilize(&tc);
    }
    CHECK_EQ(tc.nodes[1].n_reads, 0);
    tc_close(&tc);
}

TEST(read_index_single_node_immediate_6_4)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    tc_init(&tc, 1, 0, 1, &c);
    elect(&tc, 1);
    raft_read_index(tc.nodes[1].r, "s", 1);
    tc_process(&tc, 1);
    CHECK_EQ(tc.nodes[1].n_reads, 1);
    tc_close(&tc);
}

/* ---- leader transfer: thesis 3.10 ---- */

TEST(transfer_leader_3_10)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    c.prevote = true;
    c.check_quorum = true;
    tc_init(&tc, 3, 0, 3, &c);
    elect(&tc, 1);
    CHECK_EQ(raft_transfer_leader(tc.nodes[1].r, 3), 0);
    tc_stabilize(&tc);
    CHECK_EQ(tc_leader(&tc), 3);
    CHECK_EQ(st_of(&tc, 3).term, 2);
    tc_close(&tc);
}

TEST(transfer_leader_to_lagging_follower_3_10)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    tc_init(&tc, 3, 0, 3, &c);
    elect(&tc, 1);
    tc_isolate(&tc, 3);
    propose(&tc, 1, "a");
    tc_stabilize(&tc);
    tc_heal(&tc);
    CHECK_EQ(raft_transfer_leader(tc.nodes[1].r, 3), 0);
    CHECK_EQ(propose(&tc, 1, "refused"), RAFT_EDROPPED);
    tc_stabilize(&tc);
    CHECK_EQ(tc_leader(&tc), 3);
    CHECK_EQ(st_of(&tc, 3).commit, st_of(&tc, 3).last_index);
    tc_close(&tc);
}

TEST(transfer_leader_times_out_3_10)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    tc_init(&tc, 3, 0, 3, &c);
    elect(&tc, 1);
    tc_isolate(&tc, 3);
    CHECK_EQ(raft_transfer_leader(tc.nodes[1].r, 3), 0);
    CHECK_EQ(st_of(&tc, 1).lead_transferee, 3);
    tc_tick(&tc, 1, 10);
    CHECK_EQ(st_of(&tc, 1).lead_transferee, 0);
    CHECK_EQ(propose(&tc, 1, "ok"), 0);
    tc_close(&tc);
}

/* ---- membership: thesis 4.1-4.2 ---- */

static int conf(struct tcluster *tc, uint64_t id, enum raft_conf_op op, uint64_t node)
{
    return raft_propose_conf_change(tc->nodes[id].r, op, node, NULL);
}

TEST(add_voter_catches_up_and_counts_4_1)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    tc_init(&tc, 3, 0, 4, &c); /* node 4 is a joiner */
    elect(&tc, 1);
    propose(&tc, 1, "a");
    tc_stabilize(&tc);
    CHECK_EQ(conf(&tc, 1, RAFT_CONF_ADD_VOTER, 4), 0);
    tc_stabilize(&tc);
    tc_tick(&tc, 1, 1);
    tc_stabilize(&tc);
    CHECK_EQ(st_of(&tc, 1).conf.n_voters, 4);
    CHECK_EQ(st_of(&tc, 4).conf.n_voters, 4);
    CHECK_EQ(st_of(&tc, 4).commit, st_of(&tc, 1).commit);
    /* with 2 and 3 down, {1,4} is not a majority of 4 */
    tc_isolate(&tc, 2);
    tc_isolate(&tc, 3);
    propose(&tc, 1, "b");
    tc_stabilize(&tc);
    CHECK(st_of(&tc, 1).commit < st_of(&tc, 1).last_index);
    tc_heal(&tc);
    tc_tick(&tc, 1, 1);
    tc_stabilize(&tc);
    CHECK_EQ(st_of(&tc, 1).commit, st_of(&tc, 1).last_index);
    tc_close(&tc);
}

TEST(one_conf_change_at_a_time_4_1)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    tc_init(&tc, 3, 0, 5, &c);
    raft_campaign(tc.nodes[1].r);
    tc_process(&tc, 1);
    tc_deliver(&tc, 0);
    tc_process(&tc, 2);
    tc_deliver(&tc, 1);
    /* not yet committed an entry of its term */
    CHECK_EQ(conf(&tc, 1, RAFT_CONF_ADD_VOTER, 4), RAFT_EBUSY);
    tc_stabilize(&tc);
    CHECK_EQ(conf(&tc, 1, RAFT_CONF_ADD_VOTER, 4), 0);
    CHECK_EQ(conf(&tc, 1, RAFT_CONF_ADD_VOTER, 5), RAFT_EBUSY);
    tc_stabilize(&tc);
    CHECK_EQ(conf(&tc, 1, RAFT_CONF_ADD_VOTER, 5), 0);
    CHECK_EQ(conf(&tc, 2, RAFT_CONF_ADD_VOTER, 5), RAFT_ENOTLEADER);
    tc_close(&tc);
}

TEST(conf_takes_effect_on_append_and_reverts_on_truncate_4_1)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    tc_init(&tc, 3, 0, 4, &c);
    elect(&tc, 1);
    tc_cut(&tc, 1, 3);
    CHECK_EQ(conf(&tc, 1, RAFT_CONF_ADD_VOTER, 4), 0);
    CHECK_EQ(st_of(&tc, 1).conf.n_voters, 4); /* on append, before commit */
    tc_isolate(&tc, 1);
    tc_stabilize(&tc);
    tc_heal(&tc);
    tc_isolate(&tc, 1);
    /* 2 and 3 elect 2 in term 2; 1's uncommitted change gets truncated */
    raft_campaign(tc.nodes[2].r);
    tc_stabilize(&tc);
    CHECK_EQ(tc_leader(&tc), 2);
    propose(&tc, 2, "x");
    tc_stabilize(&tc);
    tc_heal(&tc);
    tc_tick(&tc, 2, 1);
    tc_stabilize(&tc);
    CHECK_EQ(st_of(&tc, 1).conf.n_voters, 3);
    tc_close(&tc);
}

TEST(learner_replicates_but_never_votes_4_2_1)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    tc_init(&tc, 3, 0, 4, &c);
    elect(&tc, 1);
    CHECK_EQ(conf(&tc, 1, RAFT_CONF_ADD_LEARNER, 4), 0);
    tc_stabilize(&tc);
    tc_tick(&tc, 1, 1);
    tc_stabilize(&tc);
    CHECK_EQ(st_of(&tc, 4).conf.n_learners, 1);
    CHECK_EQ(st_of(&tc, 4).commit, st_of(&tc, 1).commit);
    tc_isolate(&tc, 4);
    tc_tick(&tc, 4, 100);
    CHECK_EQ(st_of(&tc, 4).role, RAFT_FOLLOWER); /* never campaigns */
    tc_heal(&tc);
    /* learners do not count: {1, 4} of voters {1,2,3} is no majority */
    tc_isolate(&tc, 2);
    tc_isolate(&tc, 3);
    propose(&tc, 1, "l");
    tc_stabilize(&tc);
    CHECK(st_of(&tc, 1).commit < st_of(&tc, 1).last_index);
    tc_heal(&tc);
    tc_tick(&tc, 1, 1);
    tc_stabilize(&tc);
    /* promote */
    CHECK_EQ(conf(&tc, 1, RAFT_CONF_ADD_VOTER, 4), 0);
    tc_stabilize(&tc);
    CHECK_EQ(st_of(&tc, 1).conf.n_voters, 4);
    CHECK_EQ(st_of(&tc, 1).conf.n_learners, 0);
    CHECK_EQ(conf(&tc, 1, RAFT_CONF_ADD_LEARNER, 4), RAFT_EINVAL);
    tc_close(&tc);
}

TEST(removed_member_does_not_disrupt_4_2_3)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    c.prevote = true;
    c.check_quorum = true;
    tc_init(&tc, 3, 0, 3, &c);
    elect(&tc, 1);
    tc_cut(&tc, 1, 3); /* 3 never learns it was removed */
    CHECK_EQ(conf(&tc, 1, RAFT_CONF_REMOVE, 3), 0);
    tc_stabilize(&tc);
    CHECK_EQ(st_of(&tc, 1).conf.n_voters, 2);
    CHECK_EQ(conf(&tc, 1, RAFT_CONF_REMOVE, 1), RAFT_EINVAL);
    for (int i = 0; i < 50; i++) {
        tc_tick(&tc, 0, 1);
        tc_stabilize(&tc);
        if (i == 10)
            tc_heal(&tc);
    }
    CHECK_EQ(tc_leader(&tc), 1);
    CHECK_EQ(st_of(&tc, 1).term, 1);
    CHECK_EQ(st_of(&tc, 2).term, 1);
    tc_close(&tc);
}

/* ---- API hygiene ---- */

TEST(step_rejects_malformed_messages)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    struct raft_message m;
    struct raft_entry e;
    tc_init(&tc, 3, 0, 3, &c);
    memset(&m, 0, sizeof(m));
    m.type = 99;
    m.from = 2;
    m.to = 1;
    m.term = 1;
    CHECK_EQ(raft_step(tc.nodes[1].r, &m), RAFT_EINVAL);
    m.type = RAFT_MSG_APPEND;
    m.n_entries = 1;
    m.entries = NULL;
    CHECK_EQ(raft_step(tc.nodes[1].r, &m), RAFT_EINVAL);
    memset(&e, 0, sizeof(e));
    e.index = 7; /* not prev + 1 */
    e.term = 1;
    m.entries = &e;
    CHECK_EQ(raft_step(tc.nodes[1].r, &m), RAFT_EINVAL);
    m.to = 3;
    CHECK_EQ(raft_step(tc.nodes[1].r, &m), RAFT_EINVAL);
    CHECK(strcmp(raft_strerror(RAFT_EINVAL), "invalid argument") == 0);
    CHECK(strcmp(raft_strerror(12345), "unknown raft error") == 0);
    tc_close(&tc);
}

TEST(no_mutation_while_ready_is_out)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    struct raft_ready rd;
    tc_init(&tc, 1, 0, 1, &c);
    raft_campaign(tc.nodes[1].r);
    CHECK_EQ(raft_ready(tc.nodes[1].r, &rd), 0);
    CHECK_EQ(raft_ready(tc.nodes[1].r, &rd), RAFT_EBUSY);
    CHECK_EQ(raft_tick(tc.nodes[1].r), RAFT_EBUSY);
    CHECK_EQ(raft_propose(tc.nodes[1].r, "x", 1, NULL), RAFT_EBUSY);
    CHECK_EQ(raft_read_index(tc.nodes[1].r, "x", 1), RAFT_EBUSY);
    CHECK_EQ(raft_compact(tc.nodes[1].r, 1, NULL, 0), RAFT_EBUSY);
    CHECK(!raft_has_ready(tc.nodes[1].r));
    CHECK_EQ(raft_advance(tc.nodes[1].r, &rd), 0);
    CHECK_EQ(raft_advance(tc.nodes[1].r, &rd), RAFT_EINVAL);
    CHECK_EQ(raft_propose(tc.nodes[1].r, "x", 1, NULL), 0);
    tc_close(&tc);
}

TEST(init_rejects_bad_config)
{
    struct raft_config rc;
    struct raft *r;
    memset(&rc, 0, sizeof(rc));
    rc.id = 1;
    rc.election_tick = 10;
    rc.heartbeat_tick = 10;
    rc.max_inflight_msgs = 1;
    CHECK_EQ(raft_init(&r, &rc), RAFT_EINVAL);
    rc.heartbeat_tick = 1;
    rc.conf.n_voters = 2;
    rc.conf.voters[0] = 1;
    rc.conf.voters[1] = 1; /* duplicate */
    CHECK_EQ(raft_init(&r, &rc), RAFT_EINVAL);
}

/* ---- fault injection: a replaceable allocator (STYLE.md) ---- */

static long alloc_budget;
static long live_allocs;
static void *fail_malloc(void *ctx, size_t n)
{
    (void)ctx;
    if (alloc_budget-- <= 0)
        return NULL;
    live_allocs++;
    return malloc(n);
}
static void *fail_realloc(void *ctx, void *p, size_t n)
{
    (void)ctx;
    if (alloc_budget-- <= 0)
        return NULL;
    if (p == NULL)
        live_allocs++;
    return realloc(p, n);
}
static void fail_free(void *ctx, void *p)
{
    (void)ctx;
    if (p)
        live_allocs--;
    free(p);
}

TEST(allocation_failure_is_sticky_and_leak_free)
{
    struct raft_allocator al = {NULL, fail_malloc, fail_realloc, fail_free};
    int saw_enomem = 0;
    for (long budget = 0; budget < 60; budget++) {
        struct raft_config rc;
        struct raft *r;
        int rv;
        memset(&rc, 0, sizeof(rc));
        rc.id = 1;
        rc.conf.n_voters = 1;
        rc.conf.voters[0] = 1;
        rc.election_tick = 10;
        rc.heartbeat_tick = 1;
        rc.max_inflight_msgs = 4;
        rc.allocator = &al;
        alloc_budget = budget;
        live_allocs = 0;
        rv = raft_init(&r, &rc);
        if (rv != 0) {
            CHECK_EQ(rv, RAFT_ENOMEM);
            CHECK_EQ(live_allocs, 0);
            saw_enomem++;
            continue;
        }
        bool failed = false;
        raft_campaign(r);
        for (int i = 0; i < 10 && !failed; i++) {
            struct raft_ready rd;
            rv = raft_propose(r, "data", 4, NULL);
            rv = rv ? rv : raft_read_index(r, "c", 1);
            if (rv == 0 && raft_has_ready(r)) {
                rv = raft_ready(r, &rd);
                if (rv == 0)
                    rv = raft_advance(r, &rd);
            }
            if (rv == RAFT_ENOMEM)
                failed = true;
            else
                CHECK_EQ(rv, 0);
        }
        if (failed) {
            saw_enomem++;
            /* sticky: every entry point refuses */
            CHECK_EQ(raft_tick(r), RAFT_ENOMEM);
            CHECK_EQ(raft_propose(r, "x", 1, NULL), RAFT_ENOMEM);
            CHECK_EQ(raft_campaign(r), RAFT_ENOMEM);
            CHECK(!raft_has_ready(r));
        }
        raft_close(r);
        CHECK_EQ(live_allocs, 0);
    }
    CHECK(saw_enomem > 10);
}

TEST(report_snapshot_unreachable_and_applied)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    tc_init(&tc, 3, 0, 3, &c);
    CHECK_EQ(raft_report_unreachable(tc.nodes[1].r, 2), RAFT_ENOTLEADER);
    elect(&tc, 1);
    propose(&tc, 1, "a");
    tc_stabilize(&tc);
    CHECK_EQ(raft_report_unreachable(tc.nodes[1].r, 2), 0);
    CHECK_EQ(st_of(&tc, 1).progress[1].state, RAFT_PROGRESS_PROBE);
    CHECK_EQ(raft_report_snapshot(tc.nodes[1].r, 2, false), 0); /* not in snapshot: no-op */
    CHECK_EQ(raft_applied(tc.nodes[2].r, 100), RAFT_EINVAL);
    CHECK_EQ(raft_applied(tc.nodes[2].r, 1), 0);
    /* a snapshot the transport reports as failed is retried */
    tc_isolate(&tc, 3);
    propose(&tc, 1, "b");
    tc_stabilize(&tc);
    tc_compact(&tc, 1);
    tc_heal(&tc);
    tc_tick(&tc, 1, 1);
    tc_process(&tc, 1);
    tc_deliver(&tc, 1);
    tc_process(&tc, 1);
    tc_deliver(&tc, 3);
    tc_process(&tc, 3);
    tc_deliver(&tc, 1);
    tc_process(&tc, 1);
    tc_drop_queue(&tc, 3);
    CHECK_EQ(raft_report_snapshot(tc.nodes[1].r, 3, false), 0);
    for (int i = 0; i < 5; i++) {
        tc_tick(&tc, 1, 1);
        tc_stabilize(&tc);
    }
    CHECK_EQ(st_of(&tc, 3).commit, st_of(&tc, 1).commit);
    CHECK_EQ(raft_report_snapshot(tc.nodes[2].r, 3, true), RAFT_ENOTLEADER);
    tc_close(&tc);
}

TEST(entry_at_bounds_and_compaction_limits)
{
    struct tcluster tc;
    struct tc_config c = cfg3();
    const struct raft_entry *e;
    tc_init(&tc, 1, 0, 1, &c);
    elect(&tc, 1);
    propose(&tc, 1, "a");
    tc_stabilize(&tc);
    CHECK_EQ(raft_entry_at(tc.nodes[1].r, 0, &e), RAFT_ECOMPACTED);
    CHECK_EQ(raft_entry_at(tc.nodes[1].r, 3, &e), RAFT_EUNAVAILABLE);
    CHECK_EQ(raft_entry_at(tc.nodes[1].r, 2, &e), 0);
    CHECK_EQ(e->len, 1);
    CHECK_EQ(raft_compact(tc.nodes[1].r, 5, "s", 1), RAFT_EUNAVAILABLE);
    CHECK_EQ(raft_compact(tc.nodes[1].r, 1, NULL, 3), RAFT_EINVAL);
    CHECK_EQ(tc_compact(&tc, 1), 0);
    CHECK_EQ(raft_entry_at(tc.nodes[1].r, 2, &e), RAFT_ECOMPACTED);
    tc_restart(&tc, 1);
    CHECK_EQ(st_of(&tc, 1).first_index, 3);
    CHECK_EQ(st_of(&tc, 1).commit, 2);
    tc_close(&tc);
}

UNIT_MAIN()
