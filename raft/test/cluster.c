/* cluster.c - see cluster.h. */
#include "cluster.h"

#include <assert.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL)
        abort();
    return p;
}

static uint8_t *dup_bytes(const uint8_t *p, size_t n)
{
    uint8_t *q;
    if (n == 0)
        return NULL;
    q = xmalloc(n);
    memcpy(q, p, n);
    return q;
}

void tc_msg_clone(const struct raft_message *in, struct raft_message *out)
{
    *out = *in;
    if (in->n_entries) {
        out->entries = xmalloc(in->n_entries * sizeof(*out->entries));
        for (uint32_t i = 0; i < in->n_entries; i++) {
            out->entries[i] = in->entries[i];
            out->entries[i].data = dup_bytes(in->entries[i].data, in->entries[i].len);
        }
    }
    out->ctx = dup_bytes(in->ctx, in->ctx_len);
    out->snapshot.data = dup_bytes(in->snapshot.data, in->snapshot.len);
}

void tc_msg_free(struct raft_message *m)
{
    for (uint32_t i = 0; i < m->n_entries; i++)
        free(m->entries[i].data);
    free(m->entries);
    free(m->ctx);
    free(m->snapshot.data);
    memset(m, 0, sizeof(*m));
}

void tc_default_config(struct tc_config *c)
{
    memset(c, 0, sizeof(*c));
    c->election = 10;
    c->heartbeat = 1;
    c->max_inflight = 256;
    c->seed = 1;
}

static void boot(struct tcluster *tc, struct tc_node *nd)
{
    struct raft_config rc;
    int rv;
    memset(&rc, 0, sizeof(rc));
    rc.id = nd->id;
    rc.conf = tc->conf;
    if (nd->id > tc->conf.n_voters + tc->conf.n_learners)
        memset(&rc.conf, 0, sizeof(rc.conf)); /* joiner: learns from the leader */
    rc.election_tick = tc->cfg.election;
    rc.heartbeat_tick = tc->cfg.heartbeat;
    rc.prevote = tc->cfg.prevote;
    rc.check_quorum = tc->cfg.check_quorum;
    rc.max_inflight_msgs = tc->cfg.max_inflight;
    rc.max_inflight_bytes = tc->cfg.max_inflight_bytes;
    rc.max_msg_bytes = tc->cfg.max_msg_bytes;
    rc.seed = tc->cfg.seed;
    rc.hard_state = nd->hs;
    rc.snapshot = nd->has_snap ? &nd->snap : NULL;
    rc.entries = nd->log;
    rc.n_entries = nd->n_log;
    rc.applied = nd->sm_index;
    rv = raft_init(&nd->r, &rc);
    if (rv != 0) {
        fprintf(stderr, "raft_init(%" PRIu64 "): %s\n", nd->id, raft_strerror(rv));
        abort();
    }
    nd->down = false;
}

void tc_init(struct tcluster *tc, size_t voters, size_t learners, size_t total,
             const struct tc_config *cfg)
{
    memset(tc, 0, sizeof(*tc));
    if (total < voters + learners)
        total = voters + learners;
    assert(total <= TC_MAX);
    tc->n = total;
    tc->cfg = *cfg;
    for (size_t i = 0; i < voters; i++)
        tc->conf.voters[tc->conf.n_voters++] = i + 1;
    for (size_t i = 0; i < learners; i++)
        tc->conf.learners[tc->conf.n_learners++] = voters + i + 1;
    for (size_t i = 1; i <= total; i++) {
        tc->nodes[i].id = i;
        boot(tc, &tc->nodes[i]);
    }
}

static void free_disk(struct tc_node *nd)
{
    for (size_t i = 0; i < nd->n_log; i++)
        free(nd->log[i].data);
    free(nd->log);
    nd->log = NULL;
    nd->n_log = 0;
    free(nd->snap.data);
    nd->snap.data = NULL;
}

void tc_close(struct tcluster *tc)
{
    for (size_t i = 1; i <= tc->n; i++) {
        struct tc_node *nd = &tc->nodes[i];
        raft_close(nd->r);
        free_disk(nd);
        free(nd->applied);
    }
    for (size_t i = 0; i < tc->nq; i++)
        tc_msg_free(&tc->q[i]);
    free(tc->q);
}

void tc_crash(struct tcluster *tc, uint64_t id)
{
    struct tc_node *nd = &tc->nodes[id];
    if (nd->down)
        return;
    raft_close(nd->r);
    nd->r = NULL;
    nd->down = true;
    nd->n_reads = 0;
    tc_drop_queue(tc, id);
}

void tc_restart(struct tcluster *tc, uint64_t id)
{
    tc_crash(tc, id);
    boot(tc, &tc->nodes[id]);
}

/* ---- formatting ---- */

static const char *msg_names[] = {"?", "APP", "APP_RESP", "VOTE", "VOTE_RESP", "PREVOTE",
                                  "PREVOTE_RESP", "HB", "HB_RESP", "SNAP", "TIMEOUT_NOW",
                                  "READ_INDEX", "READ_INDEX_RESP", "PROP"};

static void fmt_entry(const struct raft_entry *e, char *buf, size_t len)
{
    if (e->type == RAFT_ENTRY_CONF_CHANGE) {
        struct raft_conf_change cc;
        static const char *ops[] = {"?", "add", "learner", "remove"};
        if (raft_conf_change_decode(e, &cc) == 0)
            snprintf(buf, len, "%" PRIu64 "/%" PRIu64 " conf:%s%" PRIu64, e->term, e->index,
                     ops[cc.op], cc.node);
        else
            snprintf(buf, len, "%" PRIu64 "/%" PRIu64 " conf:?", e->term, e->index);
    } else {
        snprintf(buf, len, "%" PRIu64 "/%" PRIu64 " \"%.*s\"", e->term, e->index,
                 (int)(e->len > 32 ? 32 : e->len), e->data ? (const char *)e->data : "");
    }
}

void tc_fmt_msg(const struct raft_message *m, char *buf, size_t len)
{
    size_t o = 0;
    o += snprintf(buf + o, len - o, "%" PRIu64 "->%" PRIu64 " %s term=%" PRIu64, m->from, m->to,
                  m->type <= RAFT_MSG_TYPE_MAX ? msg_names[m->type] : "?", m->term);
    switch (m->type) {
    case RAFT_MSG_APPEND:
        o += snprintf(buf + o, len - o, " prev=%" PRIu64 "/%" PRIu64 " commit=%" PRIu64,
                      m->log_term, m->index, m->commit);
        break;
    case RAFT_MSG_APPEND_RESP:
        o += snprintf(buf + o, len - o, " idx=%" PRIu64, m->index);
        if (m->reject)
            o += snprintf(buf + o, len - o, " REJECT hint=%" PRIu64 "/%" PRIu64, m->log_term,
                          m->reject_hint);
        break;
    case RAFT_MSG_VOTE:
    case RAFT_MSG_PREVOTE:
        o += snprintf(buf + o, len - o, " last=%" PRIu64 "/%" PRIu64 "%s", m->log_term, m->index,
                      (m->flags & RAFT_MSG_FLAG_FORCE) ? " force" : "");
        break;
    case RAFT_MSG_VOTE_RESP:
    case RAFT_MSG_PREVOTE_RESP:
        o += snprintf(buf + o, len - o, "%s", m->reject ? " REJECT" : " grant");
        break;
    case RAFT_MSG_HEARTBEAT:
        o += snprintf(buf + o, len - o, " commit=%" PRIu64 " seq=%" PRIu64, m->commit, m->hb_seq);
        break;
    case RAFT_MSG_HEARTBEAT_RESP:
        o += snprintf(buf + o, len - o, " seq=%" PRIu64, m->hb_seq);
        break;
    case RAFT_MSG_SNAPSHOT:
        o += snprintf(buf + o, len - o, " snap=%" PRIu64 "/%" PRIu64 " voters=%u",
                      m->snapshot.meta.term, m->snapshot.meta.index, m->snapshot.meta.conf.n_voters);
        break;
    case RAFT_MSG_READ_INDEX:
    case RAFT_MSG_READ_INDEX_RESP:
        o += snprintf(buf + o, len - o, " idx=%" PRIu64 " ctx=%.*s", m->index, (int)m->ctx_len,
                      m->ctx ? (const char *)m->ctx : "");
        break;
    default:
        break;
    }
    if (m->n_entries && o < len) {
        o += snprintf(buf + o, len - o, " [");
        for (uint32_t i = 0; i < m->n_entries && o < len; i++) {
            char eb[96];
            fmt_entry(&m->entries[i], eb, sizeof(eb));
            o += snprintf(buf + o, len - o, "%s%s", i ? " " : "", eb);
        }
        if (o < len)
            snprintf(buf + o, len - o, "]");
    }
}

static const char *role_names[] = {"follower", "pre-candidate", "candidate", "leader"};
static const char *pr_names[] = {"probe", "replicate", "snapshot"};

void tc_print_status(struct tcluster *tc, uint64_t id, FILE *out)
{
    struct raft_status st;
    if (tc->nodes[id].down) {
        fprintf(out, "%" PRIu64 ": down\n", id);
        return;
    }
    raft_status(tc->nodes[id].r, &st);
    fprintf(out,
            "%" PRIu64 ": %s term=%" PRIu64 " vote=%" PRIu64 " lead=%" PRIu64 " commit=%" PRIu64
            " applied=%" PRIu64 " log=[%" PRIu64 ",%" PRIu64 "] voters=%u learners=%u\n",
            id, role_names[st.role], st.term, st.vote, st.lead, st.commit, st.applied,
            st.first_index, st.last_index, st.conf.n_voters, st.conf.n_learners);
    for (uint32_t i = 0; i < st.n_progress; i++) {
        const struct raft_progress_status *p = &st.progress[i];
        fprintf(out, "  %" PRIu64 ": %s match=%" PRIu64 " next=%" PRIu64 "%s inflight=%u\n",
                p->id, pr_names[p->state], p->match, p->next, p->learner ? " learner" : "",
                p->inflight);
    }
}

void tc_print_log(struct tcluster *tc, uint64_t id, FILE *out)
{
    struct raft_status st;
    struct tc_node *nd = &tc->nodes[id];
    raft_status(nd->r, &st);
    fprintf(out, "%" PRIu64 ": log", id);
    for (uint64_t i = st.first_index; i <= st.last_index; i++) {
        const struct raft_entry *e;
        char eb[96];
        if (raft_entry_at(nd->r, i, &e) != 0)
            break;
        fmt_entry(e, eb, sizeof(eb));
        fprintf(out, " %s", eb);
    }
    fprintf(out, "\n");
}

/* ---- processing ---- */

static uint64_t mix(uint64_t h, uint64_t v)
{
    h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    return h;
}

static void apply(struct tc_node *nd, const struct raft_entry *e)
{
    struct tc_applied *a;
    uint64_t h = e->term;
    for (uint32_t i = 0; i < e->len; i++)
        h = mix(h, e->data[i]);
    nd->sm_hash = mix(nd->sm_hash, h);
    nd->sm_index = e->index;
    nd->applied = realloc(nd->applied, (nd->n_applied + 1) * sizeof(*nd->applied));
    a = &nd->applied[nd->n_applied++];
    a->index = e->index;
    a->term = e->term;
    a->type = e->type;
    snprintf(a->data, sizeof(a->data), "%.*s", (int)(e->len > 63 ? 63 : e->len),
             e->data ? (const char *)e->data : "");
}

static void enqueue(struct tcluster *tc, const struct raft_message *m)
{
    if (tc->nodes[m->from].down || m->to == 0 || m->to > tc->n || tc->cut[m->from][m->to])
        return;
    if (tc->nq == tc->capq) {
        tc->capq = tc->capq ? tc->capq * 2 : 64;
        tc->q = realloc(tc->q, tc->capq * sizeof(*tc->q));
    }
    tc_msg_clone(m, &tc->q[tc->nq++]);
}

int tc_process(struct tcluster *tc, uint64_t id)
{
    struct tc_node *nd = &tc->nodes[id];
    int n = 0;
    char buf[1024];
    while (!nd->down && raft_has_ready(nd->r)) {
        struct raft_ready rd;
        int rv = raft_ready(nd->r, &rd);
        assert(rv == 0);
        n++;
        if (rd.snapshot) {
            /* install: replace state machine and disk log */
            free_disk(nd);
            nd->snap = *rd.snapshot;
            nd->snap.data = dup_bytes(rd.snapshot->data, rd.snapshot->len);
            nd->has_snap = true;
            if (rd.snapshot->len >= 16) {
                memcpy(&nd->sm_index, rd.snapshot->data, 8);
                memcpy(&nd->sm_hash, rd.snapshot->data + 8, 8);
            }
            nd->sm_index = rd.snapshot->meta.index;
            if (tc->log)
                fprintf(tc->log, "%" PRIu64 ": install snapshot %" PRIu64 "/%" PRIu64 "\n", id,
                        rd.snapshot->meta.term, rd.snapshot->meta.index);
        }
        for (size_t i = 0; i < rd.n_entries; i++) {
            const struct raft_entry *e = &rd.entries[i];
            uint64_t base = nd->has_snap ? nd->snap.meta.index : 0;
            size_t pos = (size_t)(e->index - base - 1);
            assert(e->index > base && pos <= nd->n_log);
            while (nd->n_log > pos)
                free(nd->log[--nd->n_log].data);
            nd->log = realloc(nd->log, (nd->n_log + 1) * sizeof(*nd->log));
            nd->log[nd->n_log] = *e;
            nd->log[nd->n_log].data = dup_bytes(e->data, e->len);
            nd->n_log++;
        }
        if (rd.hard_state_changed)
            nd->hs = rd.hard_state;
        if (tc->log && rd.n_entries) {
            fprintf(tc->log, "%" PRIu64 ": persist", id);
            for (size_t i = 0; i < rd.n_entries; i++) {
                char eb[96];
                fmt_entry(&rd.entries[i], eb, sizeof(eb));
                fprintf(tc->log, " %s", eb);
            }
            fprintf(tc->log, "\n");
        }
        for (size_t i = 0; i < rd.n_messages; i++)
            enqueue(tc, &rd.messages[i]);
        for (size_t i = 0; i < rd.n_committed; i++) {
            apply(nd, &rd.committed[i]);
            if (tc->log) {
                fmt_entry(&rd.committed[i], buf, sizeof(buf));
                fprintf(tc->log, "%" PRIu64 ": apply %s\n", id, buf);
            }
        }
        for (size_t i = 0; i < rd.n_read_states; i++) {
            if (nd->n_reads < 64)
                nd->reads[nd->n_reads++] = rd.read_states[i];
            if (tc->log)
                fprintf(tc->log, "%" PRIu64 ": read-state idx=%" PRIu64 " ctx=%.*s\n", id,
                        rd.read_states[i].index, (int)rd.read_states[i].ctx_len,
                        (const char *)rd.read_states[i].ctx);
            nd->reads[nd->n_reads - 1].ctx = NULL; /* not kept past advance */
        }
        if (tc->log && rd.soft_state_changed)
            fprintf(tc->log, "%" PRIu64 ": %s lead=%" PRIu64 "\n", id,
                    role_names[rd.soft_state.role], rd.soft_state.lead);
        rv = raft_advance(nd->r, &rd);
        assert(rv == 0);
    }
    return n;
}

void tc_drop_queue(struct tcluster *tc, uint64_t to)
{
    size_t k = 0;
    for (size_t i = 0; i < tc->nq; i++) {
        if (tc->q[i].to == to || tc->q[i].from == to)
            tc_msg_free(&tc->q[i]);
        else
            tc->q[k++] = tc->q[i];
    }
    tc->nq = k;
}

int tc_deliver(struct tcluster *tc, uint64_t id)
{
    struct raft_message *batch;
    size_t nb = 0, k = 0;
    int delivered = 0;
    char buf[1024];
    batch = xmalloc((tc->nq + 1) * sizeof(*batch));
    for (size_t i = 0; i < tc->nq; i++) {
        if (id == 0 || tc->q[i].to == id)
            batch[nb++] = tc->q[i];
        else
            tc->q[k++] = tc->q[i];
    }
    tc->nq = k;
    for (size_t i = 0; i < nb; i++) {
        struct tc_node *nd = &tc->nodes[batch[i].to];
        if (!nd->down && !tc->cut[batch[i].from][batch[i].to]) {
            if (tc->log) {
                tc_fmt_msg(&batch[i], buf, sizeof(buf));
                fprintf(tc->log, "  deliver %s\n", buf);
            }
            raft_step(nd->r, &batch[i]);
            delivered++;
        }
        tc_msg_free(&batch[i]);
    }
    free(batch);
    return delivered;
}

void tc_stabilize(struct tcluster *tc)
{
    for (int round = 0; round < 1000; round++) {
        int work = 0;
        for (size_t i = 1; i <= tc->n; i++)
            work += tc_process(tc, i);
        work += tc_deliver(tc, 0);
        if (work == 0)
            return;
    }
}

void tc_tick(struct tcluster *tc, uint64_t id, unsigned n)
{
    for (unsigned k = 0; k < n; k++)
        for (size_t i = 1; i <= tc->n; i++)
            if ((id == 0 || i == id) && !tc->nodes[i].down)
                raft_tick(tc->nodes[i].r);
}

void tc_cut(struct tcluster *tc, uint64_t a, uint64_t b)
{
    tc->cut[a][b] = tc->cut[b][a] = true;
}

void tc_isolate(struct tcluster *tc, uint64_t id)
{
    for (size_t i = 1; i <= tc->n; i++)
        if (i != id)
            tc_cut(tc, id, i);
}

void tc_heal(struct tcluster *tc)
{
    memset(tc->cut, 0, sizeof(tc->cut));
}

uint64_t tc_leader(struct tcluster *tc)
{
    uint64_t best = 0, bt = 0;
    for (size_t i = 1; i <= tc->n; i++) {
        struct raft_status st;
        if (tc->nodes[i].down)
            continue;
        raft_status(tc->nodes[i].r, &st);
        if (st.role == RAFT_LEADER && st.term >= bt) {
            best = i;
            bt = st.term;
        }
    }
    return best;
}

int tc_compact(struct tcluster *tc, uint64_t id)
{
    struct tc_node *nd = &tc->nodes[id];
    uint8_t data[16];
    uint64_t base;
    size_t drop;
    int rv;
    memcpy(data, &nd->sm_index, 8);
    memcpy(data + 8, &nd->sm_hash, 8);
    rv = raft_compact(nd->r, nd->sm_index, data, sizeof(data));
    if (rv != 0)
        return rv;
    base = nd->has_snap ? nd->snap.meta.index : 0;
    drop = (size_t)(nd->sm_index - base);
    if (drop > nd->n_log)
        drop = nd->n_log;
    {
        struct raft_conf conf = nd->has_snap ? nd->snap.meta.conf : tc->conf;
        uint64_t term = drop ? nd->log[drop - 1].term : nd->snap.meta.term;
        for (size_t i = drop; i > 0; i--) {
            struct raft_conf_change cc;
            if (nd->log[i - 1].type == RAFT_ENTRY_CONF_CHANGE
                && raft_conf_change_decode(&nd->log[i - 1], &cc) == 0) {
                conf = cc.conf;
                break;
            }
        }
        free(nd->snap.data);
        nd->snap.meta.index = nd->sm_index;
        nd->snap.meta.term = term;
        nd->snap.meta.conf = conf;
    }
    nd->snap.len = 16;
    nd->snap.data = dup_bytes(data, 16);
    for (size_t i = 0; i < drop; i++)
        free(nd->log[i].data);
    memmove(nd->log, nd->log + drop, (nd->n_log - drop) * sizeof(*nd->log));
    nd->n_log -= drop;
    nd->has_snap = true;
    return 0;
}
