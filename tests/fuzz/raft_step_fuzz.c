/* raft_step_fuzz.c - libFuzzer target: the input is a program of events
 * for a 3-node cluster (plus a joiner): ticks, proposals, reads, campaigns,
 * transfers, conf changes, compaction, crashes, message delivery, drops,
 * duplicates, and forged messages built from raw bytes. The library must
 * never crash, leak or trip a sanitizer, and the basic safety checks below
 * must hold (one leader per term). */
#include <stdlib.h>
#include <string.h>

#include "raft/test/cluster.h"

struct in {
    const uint8_t *p;
    size_t n;
};

static uint8_t byte(struct in *in)
{
    if (in->n == 0)
        return 0;
    in->n--;
    return *in->p++;
}

static uint64_t u64(struct in *in, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++)
        v = v << 8 | byte(in);
    return v;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct tcluster tc;
    struct tc_config c;
    struct in in = {data, size};
    uint64_t leader_of_term[64] = {0};
    tc_default_config(&c);
    c.prevote = byte(&in) & 1;
    c.check_quorum = byte(&in) & 1;
    c.max_inflight = 1 + (byte(&in) & 7);
    c.max_msg_bytes = byte(&in) & 1 ? 64 : 0;
    tc_init(&tc, 3, 0, 4, &c);
    for (int steps = 0; in.n > 0 && steps < 2000; steps++) {
        uint8_t op = byte(&in);
        uint64_t id = 1 + byte(&in) % 4;
        struct tc_node *nd = &tc.nodes[id];
        switch (op % 16) {
        case 0:
        case 1:
            tc_tick(&tc, id, 1 + (byte(&in) & 15));
            break;
        case 2:
            if (!nd->down) {
                char buf[16];
                uint8_t len = byte(&in) & 15;
                for (int i = 0; i < len; i++)
                    buf[i] = (char)byte(&in);
                raft_propose(nd->r, buf, len, NULL);
            }
            break;
        case 3:
            if (!nd->down)
                raft_read_index(nd->r, "r", 1);
            break;
        case 4:
            if (!nd->down)
                raft_campaign(nd->r);
            break;
        case 5:
            if (!nd->down)
                raft_transfer_leader(nd->r, 1 + byte(&in) % 5);
            break;
        case 6:
            if (!nd->down)
                raft_propose_conf_change(nd->r, 1 + byte(&in) % 3, 1 + byte(&in) % 5, NULL);
            break;
        case 7:
            if (!nd->down)
                tc_compact(&tc, id);
            break;
        case 8:
            if (nd->down)
                tc_restart(&tc, id);
            else if (byte(&in) & 1)
                tc_crash(&tc, id);
            break;
        case 9: { /* a forged message: raw fields, sometimes with entries */
            struct raft_message m;
            struct raft_entry e[2];
            memset(&m, 0, sizeof(m));
            m.type = byte(&in) % 15;
            m.from = byte(&in) % 6;
            m.to = id;
            m.term = u64(&in, 1);
            m.index = u64(&in, 1);
            m.log_term = u64(&in, 1);
            m.commit = u64(&in, 1);
            m.reject = byte(&in) & 1;
            m.reject_hint = u64(&in, 1);
            m.hb_seq = u64(&in, 1);
            m.flags = byte(&in) & 1;
            if (byte(&in) & 1) {
                memset(e, 0, sizeof(e));
                e[0].term = m.log_term;
                e[0].index = m.index + 1;
                e[1].term = m.term;
                e[1].index = m.index + 2;
                e[1].type = byte(&in) & 1;
                m.entries = e;
                m.n_entries = 2;
            }
            if (m.type == RAFT_MSG_SNAPSHOT) {
                m.snapshot.meta.index = u64(&in, 1);
                m.snapshot.meta.term = u64(&in, 1);
                m.snapshot.meta.conf = tc.conf;
            }
            if (!nd->down)
                raft_step(nd->r, &m);
            break;
        }
        case 10:
            tc_drop_queue(&tc, id);
            break;
        case 11:
            if (tc.nq > 0) { /* duplicate a queued message */
                size_t k = byte(&in) % tc.nq;
                struct raft_message copy;
                tc_msg_clone(&tc.q[k], &copy);
                if (!tc.nodes[copy.to].down)
                    raft_step(tc.nodes[copy.to].r, &copy);
                tc_msg_free(&copy);
            }
            break;
        case 12:
            tc_isolate(&tc, id);
            break;
        case 13:
            tc_heal(&tc);
            break;
        default:
            tc_deliver(&tc, byte(&in) & 1 ? id : 0);
            break;
        }
        for (uint64_t i = 1; i <= 4; i++)
            tc_process(&tc, i);
        for (uint64_t i = 1; i <= 4; i++) {
            struct raft_status st;
            if (tc.nodes[i].down)
                continue;
            raft_status(tc.nodes[i].r, &st);
            if (st.role == RAFT_LEADER && st.term < 64) {
                if (leader_of_term[st.term] && leader_of_term[st.term] != i)
                    abort(); /* two leaders in one term */
                leader_of_term[st.term] = i;
            }
        }
    }
    tc_close(&tc);
    return 0;
}
