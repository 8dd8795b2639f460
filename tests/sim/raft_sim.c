/* raft_sim.c - deterministic cluster simulator for raft/ (FoundationDB style).
 *
 *   raft_sim --seeds N --start S [--nodes K] [--steps T] [--trace]
 *
 * Each seed builds a cluster of K in {1,3,5} voters (random if --nodes is
 * absent) plus spare ids for membership changes, and runs T time units of
 * chaos: a network that drops, duplicates, delays and reorders messages and
 * partitions/heals; disks that lose what was not persisted when a node
 * crashes (including between sending the leader's APPENDs and its write);
 * crash/restart, compaction, membership changes, leader transfers, client
 * proposals and read-index requests. After every time unit it checks:
 *   election safety      at most one leader per term
 *   log matching         equal (index, term) => equal prefixes
 *   leader completeness  every leader holds every committed entry
 *   state machine safety every node applies the same entry at an index,
 *                        and snapshots carry the same state hash
 *   acked not lost       proposals acknowledged to a client stay committed
 *                        and are finally applied everywhere
 *   read linearizable    a read index covers every write applied anywhere
 *                        before the read was issued
 *   liveness             after healing everything, a leader is elected and
 *                        a new proposal commits on all members within bound
 * Any failure prints the seed and the command line to replay it. */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "raft/raft.h"

#define MAXN 8
#define LIVENESS_TICKS 1500

static uint64_t rs; /* sim RNG state */
static uint64_t rnd(void)
{
    uint64_t z = (rs += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
static unsigned rn(unsigned n) { return n ? (unsigned)(rnd() % n) : 0; }
static bool chance(unsigned pct) { return rn(1000) < pct; } /* per mille */

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        abort();
    return p;
}
static uint8_t *dup_bytes(const uint8_t *p, size_t n)
{
    uint8_t *q;
    if (!n)
        return NULL;
    q = xmalloc(n);
    memcpy(q, p, n);
    return q;
}

static uint64_t mix(uint64_t h, uint64_t v) { return h ^ (v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2)); }
static uint64_t entry_hash(const struct raft_entry *e)
{
    uint64_t h = mix(e->term, e->type);
    for (uint32_t i = 0; i < e->len; i++)
        h = mix(h, e->data[i]);
    return h;
}

/* ---- world ---- */

struct node {
    uint64_t id;
    struct raft *r;
    bool up, exists, removed;
    struct raft_hard_state hs;
    struct raft_entry *log;
    size_t n_log;
    bool has_snap;
    struct raft_snapshot snap;
    uint64_t sm_index, sm_hash;
};

struct pkt {
    uint64_t at;
    struct raft_message m;
};

struct prop {
    uint64_t id;
    uint64_t node;
    bool acked;
    uint64_t index;
};

struct readreq {
    uint64_t ctx;
    uint64_t lower; /* max applied anywhere when issued */
    bool done;
};

static struct {
    uint64_t seed;
    int nvoters, nmax;
    bool trace;
    struct node n[MAXN + 1];
    struct pkt *net;
    size_t nnet, capnet;
    bool cut[MAXN + 1][MAXN + 1];
    uint64_t now;
    /* fault knobs (per mille) */
    unsigned p_drop, p_dup, max_delay, p_crash, p_crash_ready, p_part, p_prop, p_read, p_conf,
        p_transfer, p_compact;
    struct raft_config base;
    /* global truth */
    uint64_t *leader_of_term; /* term -> id */
    size_t cap_terms;
    uint64_t *commit_hash; /* index -> entry hash (0: unknown) */
    uint64_t *chain;       /* index -> state hash after applying it */
    uint64_t *commit_term; /* index -> upper bound of the term it committed in */
    size_t cap_commit;
    uint64_t max_term;
    uint64_t max_applied;
    struct prop *props;
    size_t nprops, capprops;
    struct readreq *reads;
    size_t nreads, capreads;
    uint64_t next_id;
    const char *fail;
    char failbuf[512];
    unsigned long stats_commits, stats_reads, stats_elections, stats_snaps, stats_confs, stats_crashes;
} W;

static void failf(const char *fmt, ...)
{
    va_list ap;
    if (W.fail)
        return;
    va_start(ap, fmt);
    vsnprintf(W.failbuf, sizeof(W.failbuf), fmt, ap);
    va_end(ap);
    W.fail = W.failbuf;
}

static void trace(const char *fmt, ...)
{
    va_list ap;
    if (!W.trace)
        return;
    printf("[t=%" PRIu64 "] ", W.now);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
}

static void grow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return;
    size_t nc = *cap ? *cap : 64;
    while (nc < need)
        nc *= 2;
    *p = realloc(*p, nc * elem);
    memset((char *)*p + *cap * elem, 0, (nc - *cap) * elem);
    *cap = nc;
}

static void msg_clone(const struct raft_message *in, struct raft_message *out)
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

static void msg_free(struct raft_message *m)
{
    for (uint32_t i = 0; i < m->n_entries; i++)
        free(m->entries[i].data);
    free(m->entries);
    free(m->ctx);
    free(m->snapshot.data);
}

static void net_send(const struct raft_message *m)
{
    if (m->to == 0 || m->to > (uint64_t)W.nmax)
        return;
    grow((void **)&W.net, &W.capnet, W.nnet + 1, sizeof(*W.net));
    W.net[W.nnet].at = W.now + rn(W.max_delay + 1);
    msg_clone(m, &W.net[W.nnet].m);
    W.nnet++;
}

/* ---- disk ---- */

static void disk_free(struct node *nd)
{
    for (size_t i = 0; i < nd->n_log; i++)
        free(nd->log[i].data);
    free(nd->log);
    nd->log = NULL;
    nd->n_log = 0;
    free(nd->snap.data);
    memset(&nd->snap, 0, sizeof(nd->snap));
    nd->has_snap = false;
}

static void boot(struct node *nd)
{
    struct raft_config c = W.base;
    int rv;
    c.id = nd->id;
    if (nd->id > (uint64_t)W.nvoters)
        memset(&c.conf, 0, sizeof(c.conf)); /* joiner */
    c.hard_state = nd->hs;
    c.snapshot = nd->has_snap ? &nd->snap : NULL;
    c.entries = nd->log;
    c.n_entries = nd->n_log;
    c.applied = nd->sm_index;
    c.seed = W.seed * 1000003 + W.now;
    rv = raft_init(&nd->r, &c);
    if (rv != 0) {
        failf("raft_init(%" PRIu64 ") failed on restart: %s", nd->id, raft_strerror(rv));
        return;
    }
    nd->up = true;
    nd->exists = true;
}

static void crash(struct node *nd)
{
    if (!nd->up)
        return;
    raft_close(nd->r);
    nd->r = NULL;
    nd->up = false;
    W.stats_crashes++;
    trace("crash %" PRIu64, nd->id);
}

/* ---- applying ---- */

static void ensure(uint64_t index)
{
    size_t nc = W.cap_commit ? W.cap_commit : 256;
    if (index < W.cap_commit)
        return;
    while (nc <= index)
        nc *= 2;
    W.chain = realloc(W.chain, nc * 8);
    W.commit_hash = realloc(W.commit_hash, nc * 8);
    W.commit_term = realloc(W.commit_term, nc * 8);
    memset(W.chain + W.cap_commit, 0, (nc - W.cap_commit) * 8);
    memset(W.commit_hash + W.cap_commit, 0, (nc - W.cap_commit) * 8);
    memset(W.commit_term + W.cap_commit, 0, (nc - W.cap_commit) * 8);
    W.cap_commit = nc;
}

static void check_chain(struct node *nd, uint64_t index, uint64_t hash)
{
    ensure(index);
    if (W.chain[index] == 0)
        W.chain[index] = hash;
    else if (W.chain[index] != hash)
        failf("state machine safety: node %" PRIu64 " state at %" PRIu64 " differs", nd->id, index);
}

static void apply_entry(struct node *nd, const struct raft_entry *e)
{
    uint64_t h = entry_hash(e);
    if (e->index != nd->sm_index + 1) {
        failf("node %" PRIu64 " applies %" PRIu64 " after %" PRIu64, nd->id, e->index, nd->sm_index);
        return;
    }
    ensure(e->index);
    if (W.commit_hash[e->index] == 0) {
        W.commit_hash[e->index] = h;
        for (int i = 1; i <= W.nmax; i++) {
            struct raft_status st;
            if (!W.n[i].up)
                continue;
            raft_status(W.n[i].r, &st);
            if (st.term > W.max_term)
                W.max_term = st.term;
        }
        W.commit_term[e->index] = W.max_term;
        W.stats_commits++;
    } else if (W.commit_hash[e->index] != h) {
        failf("state machine safety: index %" PRIu64 " applied differently on node %" PRIu64,
              e->index, nd->id);
    }
    nd->sm_hash = mix(nd->sm_hash, h);
    nd->sm_index = e->index;
    check_chain(nd, e->index, nd->sm_hash);
    if (e->index > W.max_applied)
        W.max_applied = e->index;
    if (e->type == RAFT_ENTRY_NORMAL && e->len >= 8) {
        uint64_t pid;
        memcpy(&pid, e->data, 8);
        if (pid > 0 && pid <= W.nprops) {
            struct prop *p = &W.props[pid - 1];
            if (p->node == nd->id && !p->acked) {
                p->acked = true;
                p->index = e->index;
            }
            /* A forwarded proposal duplicated by the network may commit
             * twice (at-least-once, as in etcd): the application dedups by
             * request id. Not a Raft safety property. */
        }
    } else if (e->type == RAFT_ENTRY_CONF_CHANGE) {
        struct raft_conf_change cc;
        if (raft_conf_change_decode(e, &cc) == 0 && cc.op == RAFT_CONF_REMOVE) {
            /* like etcd: a removed member shuts down once the removal applies */
            struct node *gone = &W.n[cc.node];
            if (!gone->removed) {
                gone->removed = true;
                crash(gone);
                trace("removed %" PRIu64 " stops", cc.node);
            }
        }
    }
}

/* The node loop: persist, send, apply, advance (raft/README.md). */
static void process(struct node *nd)
{
    int guard = 0;
    while (nd->up && raft_has_ready(nd->r) && !W.fail) {
        struct raft_ready rd;
        if (++guard > 100) {
            failf("node %" PRIu64 " Ready loop does not converge", nd->id);
            return;
        }
        if (raft_ready(nd->r, &rd) != 0) {
            failf("raft_ready failed");
            return;
        }
        /* parallel leader write: APPENDs may leave before the write */
        for (size_t i = 0; i < rd.n_messages; i++)
            if (rd.messages[i].type == RAFT_MSG_APPEND)
                net_send(&rd.messages[i]);
        if (rd.must_sync && chance(W.p_crash_ready)) {
            trace("crash %" PRIu64 " before its write (loses %zu entries)", nd->id, rd.n_entries);
            crash(nd);
            return;
        }
        if (rd.snapshot) {
            uint64_t idx, h;
            disk_free(nd);
            nd->snap = *rd.snapshot;
            nd->snap.data = dup_bytes(rd.snapshot->data, rd.snapshot->len);
            nd->has_snap = true;
            if (rd.snapshot->len != 16) {
                failf("snapshot data length %u", rd.snapshot->len);
                return;
            }
            memcpy(&idx, rd.snapshot->data, 8);
            memcpy(&h, rd.snapshot->data + 8, 8);
            if (idx != rd.snapshot->meta.index)
                failf("snapshot index mismatch");
            if (idx < nd->sm_index)
                failf("snapshot %" PRIu64 " behind applied %" PRIu64, idx, nd->sm_index);
            nd->sm_index = idx;
            nd->sm_hash = h;
            check_chain(nd, idx, h);
            W.stats_snaps++;
            trace("%" PRIu64 " installs snapshot %" PRIu64, nd->id, idx);
        }
        for (size_t i = 0; i < rd.n_entries; i++) {
            const struct raft_entry *e = &rd.entries[i];
            uint64_t base = nd->has_snap ? nd->snap.meta.index : 0;
            size_t pos;
            if (e->index <= base || e->index - base - 1 > nd->n_log) {
                failf("node %" PRIu64 " asked to persist %" PRIu64 " with a gap", nd->id, e->index);
                return;
            }
            pos = (size_t)(e->index - base - 1);
            while (nd->n_log > pos)
                free(nd->log[--nd->n_log].data);
            nd->log = realloc(nd->log, (nd->n_log + 1) * sizeof(*nd->log));
            nd->log[nd->n_log] = *e;
            nd->log[nd->n_log].data = dup_bytes(e->data, e->len);
            nd->n_log++;
        }
        if (rd.hard_state_changed)
            nd->hs = rd.hard_state;
        for (size_t i = 0; i < rd.n_messages; i++)
            if (rd.messages[i].type != RAFT_MSG_APPEND)
                net_send(&rd.messages[i]);
        for (size_t i = 0; i < rd.n_committed && !W.fail; i++)
            apply_entry(nd, &rd.committed[i]);
        for (size_t i = 0; i < rd.n_read_states; i++) {
            const struct raft_read_state *s = &rd.read_states[i];
            uint64_t ctx = 0;
            if (s->ctx_len == 8)
                memcpy(&ctx, s->ctx, 8);
            if (ctx == 0 || ctx > W.nreads) {
                failf("unknown read ctx");
                continue;
            }
            struct readreq *q = &W.reads[ctx - 1];
            if (s->index < q->lower)
                failf("read index %" PRIu64 " < %" PRIu64 " applied before the read began (ctx %" PRIu64 ")",
                      s->index, q->lower, ctx);
            q->done = true;
            W.stats_reads++;
        }
        if (raft_advance(nd->r, &rd) != 0)
            failf("raft_advance failed");
    }
}

/* ---- invariants ---- */

static void check_invariants(void)
{
    uint64_t maxc = 0;
    for (int i = 1; i <= W.nmax && !W.fail; i++) {
        struct node *nd = &W.n[i];
        struct raft_status st;
        if (!nd->up)
            continue;
        raft_status(nd->r, &st);
        if (st.commit > maxc)
            maxc = st.commit;
        if (st.term > W.max_term)
            W.max_term = st.term;
        if (st.role == RAFT_LEADER) {
            grow((void **)&W.leader_of_term, &W.cap_terms, st.term + 1, sizeof(uint64_t));
            if (W.leader_of_term[st.term] == 0) {
                W.leader_of_term[st.term] = nd->id;
                W.stats_elections++;
                trace("%" PRIu64 " leads term %" PRIu64, nd->id, st.term);
            } else if (W.leader_of_term[st.term] != nd->id) {
                failf("election safety: %" PRIu64 " and %" PRIu64 " lead term %" PRIu64,
                      W.leader_of_term[st.term], nd->id, st.term);
            }
            /* leader completeness: every entry applied anywhere is here */
            for (uint64_t k = st.first_index; k <= W.max_applied && k < W.cap_commit; k++) {
                const struct raft_entry *e;
                if (W.commit_term[k] >= st.term)
                    continue; /* committed in a later term than this leader's */
                if (raft_entry_at(nd->r, k, &e) != 0) {
                    failf("leader completeness: leader %" PRIu64 " (term %" PRIu64
                          ") lacks committed %" PRIu64,
                          nd->id, st.term, k);
                    break;
                }
                if (W.commit_hash[k] && entry_hash(e) != W.commit_hash[k]) {
                    failf("leader completeness: leader %" PRIu64 " has another entry at %" PRIu64,
                          nd->id, k);
                    break;
                }
            }
        }
        if (st.commit < nd->sm_index)
            failf("node %" PRIu64 " applied beyond commit", nd->id);
    }
    /* log matching */
    for (int a = 1; a <= W.nmax && !W.fail; a++)
        for (int b = a + 1; b <= W.nmax && !W.fail; b++) {
            struct raft_status sa, sb;
            uint64_t lo, hi, top = 0;
            if (!W.n[a].up || !W.n[b].up)
                continue;
            raft_status(W.n[a].r, &sa);
            raft_status(W.n[b].r, &sb);
            lo = sa.first_index > sb.first_index ? sa.first_index : sb.first_index;
            hi = sa.last_index < sb.last_index ? sa.last_index : sb.last_index;
            for (uint64_t k = hi; k >= lo && k > 0; k--) {
                const struct raft_entry *x, *y;
                raft_entry_at(W.n[a].r, k, &x);
                raft_entry_at(W.n[b].r, k, &y);
                if (x->term == y->term) {
                    top = k;
                    break;
                }
            }
            for (uint64_t k = lo; k <= top; k++) {
                const struct raft_entry *x, *y;
                raft_entry_at(W.n[a].r, k, &x);
                raft_entry_at(W.n[b].r, k, &y);
                if (entry_hash(x) != entry_hash(y)) {
                    failf("log matching: nodes %d and %d agree at %" PRIu64 " but differ at %" PRIu64,
                          a, b, top, k);
                    break;
                }
            }
        }
    (void)maxc;
}

/* ---- actions ---- */

static struct node *random_up(void)
{
    int ids[MAXN], n = 0;
    for (int i = 1; i <= W.nmax; i++)
        if (W.n[i].up)
            ids[n++] = i;
    return n ? &W.n[ids[rn(n)]] : NULL;
}

static struct node *leader(void)
{
    struct node *best = NULL;
    uint64_t bt = 0;
    for (int i = 1; i <= W.nmax; i++) {
        struct raft_status st;
        if (!W.n[i].up)
            continue;
        raft_status(W.n[i].r, &st);
        if (st.role == RAFT_LEADER && st.term >= bt) {
            bt = st.term;
            best = &W.n[i];
        }
    }
    return best;
}

static void do_propose(struct node *nd)
{
    uint8_t buf[64];
    uint32_t len = 8 + rn(40);
    struct prop *p;
    uint64_t pid = W.nprops + 1;
    memcpy(buf, &pid, 8);
    for (uint32_t i = 8; i < len; i++)
        buf[i] = (uint8_t)rnd();
    if (raft_propose(nd->r, buf, len, NULL) != 0)
        return;
    grow((void **)&W.props, &W.capprops, W.nprops + 1, sizeof(*W.props));
    p = &W.props[W.nprops++];
    p->id = pid;
    p->node = nd->id;
    p->acked = false;
    trace("propose %" PRIu64 " at %" PRIu64, pid, nd->id);
}

static void do_read(struct node *nd)
{
    uint64_t ctx = W.nreads + 1;
    if (raft_read_index(nd->r, &ctx, 8) != 0)
        return;
    grow((void **)&W.reads, &W.capreads, W.nreads + 1, sizeof(*W.reads));
    W.reads[W.nreads].ctx = ctx;
    W.reads[W.nreads].lower = W.max_applied;
    W.reads[W.nreads].done = false;
    W.nreads++;
}

static void do_conf(struct node *ld)
{
    struct raft_status st;
    int cand[MAXN], nc = 0;
    uint64_t target;
    int op;
    raft_status(ld->r, &st);
    op = rn(3);
    if (op == 0 || op == 1) { /* add a spare as learner or voter, or promote */
        for (int i = W.nvoters + 1; i <= W.nmax; i++) {
            bool voter = false;
            for (uint32_t k = 0; k < st.conf.n_voters; k++)
                voter |= st.conf.voters[k] == (uint64_t)i;
            if (!W.n[i].removed && !voter)
                cand[nc++] = i;
        }
        if (!nc)
            return;
        target = cand[rn(nc)];
        if (raft_propose_conf_change(ld->r, op == 0 ? RAFT_CONF_ADD_LEARNER : RAFT_CONF_ADD_VOTER,
                                     target, NULL) == 0) {
            W.stats_confs++;
            trace("conf %s %" PRIu64, op == 0 ? "learner" : "voter", target);
            if (!W.n[target].exists)
                boot(&W.n[target]);
        }
    } else { /* remove a non-leader member, keeping at least 2 voters */
        if (st.conf.n_voters <= 2)
            return;
        for (uint32_t k = 0; k < st.conf.n_voters; k++)
            if (st.conf.voters[k] != ld->id)
                cand[nc++] = (int)st.conf.voters[k];
        for (uint32_t k = 0; k < st.conf.n_learners; k++)
            cand[nc++] = (int)st.conf.learners[k];
        if (!nc)
            return;
        target = cand[rn(nc)];
        if (raft_propose_conf_change(ld->r, RAFT_CONF_REMOVE, target, NULL) == 0) {
            W.stats_confs++;
            trace("conf remove %" PRIu64, target);
        }
    }
}

static void do_compact(struct node *nd)
{
    uint8_t data[16];
    struct raft_status st;
    uint64_t base = nd->has_snap ? nd->snap.meta.index : 0;
    size_t drop;
    raft_status(nd->r, &st);
    if (nd->sm_index < st.first_index + 4)
        return;
    memcpy(data, &nd->sm_index, 8);
    memcpy(data + 8, &nd->sm_hash, 8);
    if (raft_compact(nd->r, nd->sm_index, data, 16) != 0)
        return;
    /* mirror on disk: snapshot metadata from the entries being dropped */
    drop = (size_t)(nd->sm_index - base);
    {
        struct raft_conf conf = nd->has_snap ? nd->snap.meta.conf : W.base.conf;
        if (!nd->has_snap && nd->id > (uint64_t)W.nvoters)
            memset(&conf, 0, sizeof(conf));
        for (size_t i = drop; i > 0; i--) {
            struct raft_conf_change cc;
            if (nd->log[i - 1].type == RAFT_ENTRY_CONF_CHANGE
                && raft_conf_change_decode(&nd->log[i - 1], &cc) == 0) {
                conf = cc.conf;
                break;
            }
        }
        nd->snap.meta.conf = conf;
    }
    nd->snap.meta.term = nd->log[drop - 1].term;
    nd->snap.meta.index = nd->sm_index;
    free(nd->snap.data);
    nd->snap.data = dup_bytes(data, 16);
    nd->snap.len = 16;
    nd->has_snap = true;
    for (size_t i = 0; i < drop; i++)
        free(nd->log[i].data);
    memmove(nd->log, nd->log + drop, (nd->n_log - drop) * sizeof(*nd->log));
    nd->n_log -= drop;
}

static void partition(void)
{
    int side[MAXN + 1];
    for (int a = 1; a <= W.nmax; a++)
        side[a] = rn(2);
    for (int a = 1; a <= W.nmax; a++)
        for (int b = 1; b <= W.nmax; b++)
            W.cut[a][b] = side[a] != side[b];
    trace("partition");
}

static void heal(void)
{
    memset(W.cut, 0, sizeof(W.cut));
    trace("heal");
}

static void deliver_due(bool lossless)
{
    /* deliver in random order everything that is due */
    size_t i = 0;
    while (i < W.nnet && !W.fail) {
        if (W.net[i].at > W.now) {
            i++;
            continue;
        }
        size_t pick = i + rn((unsigned)(W.nnet - i));
        if (W.net[pick].at > W.now)
            pick = i;
        struct pkt p = W.net[pick];
        W.net[pick] = W.net[--W.nnet];
        struct node *to = &W.n[p.m.to];
        bool drop = !lossless && chance(W.p_drop);
        if (!lossless && chance(W.p_dup)) {
            grow((void **)&W.net, &W.capnet, W.nnet + 1, sizeof(*W.net));
            W.net[W.nnet].at = W.now + rn(W.max_delay + 1);
            msg_clone(&p.m, &W.net[W.nnet].m);
            W.nnet++;
        }
        if (to->up && !drop && !W.cut[p.m.from][p.m.to]) {
            int rv = raft_step(to->r, &p.m);
            if (rv != 0 && rv != RAFT_EINVAL)
                failf("raft_step: %s", raft_strerror(rv));
            process(to);
        }
        msg_free(&p.m);
    }
}

static void tick_all(void)
{
    for (int i = 1; i <= W.nmax && !W.fail; i++)
        if (W.n[i].up) {
            raft_tick(W.n[i].r);
            process(&W.n[i]);
        }
}

static void world_free(void)
{
    for (int i = 1; i <= MAXN; i++) {
        if (W.n[i].up)
            raft_close(W.n[i].r);
        disk_free(&W.n[i]);
    }
    for (size_t i = 0; i < W.nnet; i++)
        msg_free(&W.net[i].m);
    free(W.net);
    free(W.leader_of_term);
    free(W.commit_hash);
    free(W.chain);
    free(W.commit_term);
    free(W.props);
    free(W.reads);
}

/* Returns 0 if the seed passes. */
static int run_seed(uint64_t seed, int nodes, unsigned steps, bool tracing)
{
    memset(&W, 0, sizeof(W));
    rs = seed * 0x9e3779b97f4a7c15ULL + 12345;
    W.seed = seed;
    W.trace = tracing;
    W.nvoters = nodes ? nodes : (int[]){1, 3, 5}[rn(3)];
    W.nmax = W.nvoters == 1 ? 1 : W.nvoters + 2;
    W.p_drop = rn(4) ? rn(150) : 0;
    W.p_dup = rn(50);
    W.max_delay = rn(4);
    W.p_crash = rn(8);
    W.p_crash_ready = rn(20);
    W.p_part = rn(15);
    W.p_prop = 100 + rn(400);
    W.p_read = rn(200);
    W.p_conf = W.nvoters > 1 ? rn(30) : 0;
    W.p_transfer = rn(15);
    W.p_compact = rn(100);
    memset(&W.base, 0, sizeof(W.base));
    for (int i = 0; i < W.nvoters; i++)
        W.base.conf.voters[W.base.conf.n_voters++] = i + 1;
    W.base.election_tick = 10;
    W.base.heartbeat_tick = 1 + rn(3);
    W.base.prevote = rn(2);
    W.base.check_quorum = rn(2);
    W.base.max_inflight_msgs = 1 + rn(8);
    W.base.max_inflight_bytes = rn(2) ? 0 : 200 + rn(2000);
    W.base.max_msg_bytes = rn(2) ? 0 : 40 + rn(300);
    for (int i = 1; i <= W.nmax; i++)
        W.n[i].id = i;
    for (int i = 1; i <= W.nvoters; i++)
        boot(&W.n[i]);
    if (tracing)
        printf("seed %" PRIu64 ": %d voters (+%d spare) prevote=%d checkquorum=%d drop=%u dup=%u delay=%u\n",
               seed, W.nvoters, W.nmax - W.nvoters, W.base.prevote, W.base.check_quorum, W.p_drop,
               W.p_dup, W.max_delay);

    bool parted = false;
    for (W.now = 1; W.now <= steps && !W.fail; W.now++) {
        struct node *nd;
        if (chance(W.p_part)) {
            if (parted)
                heal();
            else
                partition();
            parted = !parted;
        }
        if (chance(W.p_crash) && (nd = random_up()) != NULL && W.nvoters > 1)
            crash(nd);
        for (int i = 1; i <= W.nmax; i++)
            if (W.n[i].exists && !W.n[i].up && !W.n[i].removed && chance(100)) {
                boot(&W.n[i]);
                trace("restart %d", i);
            }
        for (int k = 0; k < 3; k++)
            if (chance(W.p_prop) && (nd = (rn(3) ? leader() : random_up())) != NULL)
                do_propose(nd);
        if (chance(W.p_read) && (nd = random_up()) != NULL)
            do_read(nd);
        if (chance(W.p_conf) && (nd = leader()) != NULL)
            do_conf(nd);
        if (chance(W.p_transfer) && (nd = leader()) != NULL) {
            uint64_t to = 1 + rn(W.nmax);
            if (raft_transfer_leader(nd->r, to) == 0)
                trace("transfer %" PRIu64 " -> %" PRIu64, nd->id, to);
        }
        if (chance(W.p_compact) && (nd = random_up()) != NULL)
            do_compact(nd);
        for (int i = 1; i <= W.nmax; i++)
            if (W.n[i].up)
                process(&W.n[i]);
        deliver_due(false);
        tick_all();
        check_invariants();
    }

    /* liveness: heal, restart, lossless network; a leader must emerge and a
     * new proposal must commit on every member within the bound */
    if (!W.fail) {
        uint64_t bound = W.now + LIVENESS_TICKS, probe_index = 0, probe_lead = 0, probe_term = 0;
        struct node *ld = NULL;
        heal();
        for (int i = 1; i <= W.nmax; i++)
            if (W.n[i].exists && !W.n[i].up && !W.n[i].removed)
                boot(&W.n[i]);
        W.p_crash_ready = 0;
        /* a stable network: no loss, delay <= 1, so a lagging learner with a
         * one-entry message cap and a window of 1 still catches up in time */
        if (W.max_delay > 1)
            W.max_delay = 1;
        while (W.now < bound && !W.fail) {
            W.now++;
            for (int i = 1; i <= W.nmax; i++)
                if (W.n[i].up)
                    process(&W.n[i]);
            deliver_due(true);
            tick_all();
            check_invariants();
            ld = leader();
            if (ld) {
                struct raft_status st;
                raft_status(ld->r, &st);
                if (ld->id != probe_lead || st.term != probe_term)
                    probe_index = 0; /* new leader: the probe may be lost */
            }
            if (ld && probe_index == 0) {
                uint8_t buf[8] = {0};
                struct raft_status st;
                raft_status(ld->r, &st);
                probe_lead = ld->id;
                probe_term = st.term;
                if (raft_propose(ld->r, buf, 8, &probe_index) != 0)
                    probe_index = 0;
            }
            if (probe_index && ld == NULL)
                probe_index = 0; /* leader lost: propose again later */
            if (probe_index) {
                bool all = true;
                struct raft_status st;
                raft_status(ld->r, &st);
                for (uint32_t k = 0; k < st.conf.n_voters + st.conf.n_learners; k++) {
                    uint64_t id = k < st.conf.n_voters ? st.conf.voters[k]
                                                       : st.conf.learners[k - st.conf.n_voters];
                    if (!W.n[id].up || W.n[id].sm_index < probe_index)
                        all = false;
                }
                if (all)
                    break;
            }
        }
        if (!W.fail && W.now >= bound && W.trace)
            for (int i = 1; i <= W.nmax; i++) {
                struct raft_status st;
                if (!W.n[i].up) {
                    printf("  node %d down%s\n", i, W.n[i].removed ? " (removed)" : "");
                    continue;
                }
                raft_status(W.n[i].r, &st);
                printf("  node %d role=%u term=%" PRIu64 " lead=%" PRIu64 " commit=%" PRIu64
                       " applied=%" PRIu64 " sm=%" PRIu64 " log=[%" PRIu64 ",%" PRIu64 "] voters=%u learners=%u\n",
                       i, st.role, st.term, st.lead, st.commit, st.applied, W.n[i].sm_index,
                       st.first_index, st.last_index, st.conf.n_voters, st.conf.n_learners);
                for (uint32_t k = 0; k < st.n_progress; k++)
                    printf("    pr %" PRIu64 " state=%u match=%" PRIu64 " next=%" PRIu64 " inflight=%u\n",
                           st.progress[k].id, st.progress[k].state, st.progress[k].match,
                           st.progress[k].next, st.progress[k].inflight);
            }
        if (!W.fail && W.now >= bound)
            failf("liveness: no leader or commit within %d ticks of healing (leader=%" PRIu64
                  ", probe=%" PRIu64 ")",
                  LIVENESS_TICKS, ld ? ld->id : 0, probe_index);
        /* acknowledged proposals are in every member's state machine */
        for (size_t i = 0; i < W.nprops && !W.fail; i++) {
            struct prop *p = &W.props[i];
            if (p->acked && (p->index >= W.cap_commit || W.commit_hash[p->index] == 0))
                failf("acked proposal %" PRIu64 " lost", p->id);
        }
    }
    int rv = W.fail ? 1 : 0;
    if (W.fail) {
        printf("FAIL seed %" PRIu64 " (nodes=%d): %s\n", seed, W.nvoters, W.fail);
        printf("  replay: raft_sim --seeds 1 --start %" PRIu64 "%s%s --trace\n", seed,
               nodes ? " --nodes " : "", nodes ? (nodes == 1 ? "1" : nodes == 3 ? "3" : "5") : "");
    } else if (tracing) {
        printf("seed %" PRIu64 " ok: %lu commits, %lu reads, %lu elections, %lu snapshots, %lu conf "
               "changes, %lu crashes\n",
               seed, W.stats_commits, W.stats_reads, W.stats_elections, W.stats_snaps, W.stats_confs,
               W.stats_crashes);
    }
    world_free();
    return rv;
}

int main(int argc, char **argv)
{
    uint64_t seeds = 100, start = 1;
    int nodes = 0;
    unsigned steps = 600;
    bool tracing = false;
    unsigned long commits = 0, reads = 0, elections = 0, snaps = 0, confs = 0, crashes = 0;
    int failed = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--seeds") && i + 1 < argc)
            seeds = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--start") && i + 1 < argc)
            start = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--nodes") && i + 1 < argc)
            nodes = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc)
            steps = (unsigned)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--trace"))
            tracing = true;
        else {
            fprintf(stderr, "usage: raft_sim --seeds N --start S [--nodes 1|3|5] [--steps T] [--trace]\n");
            return 2;
        }
    }
    if (nodes != 0 && nodes != 1 && nodes != 3 && nodes != 5) {
        fprintf(stderr, "--nodes must be 1, 3 or 5\n");
        return 2;
    }
    for (uint64_t s = start; s < start + seeds; s++) {
        int rv = run_seed(s, nodes, steps, tracing);
        failed += rv;
        commits += W.stats_commits;
        reads += W.stats_reads;
        elections += W.stats_elections;
        snaps += W.stats_snaps;
        confs += W.stats_confs;
        crashes += W.stats_crashes;
        if (failed >= 5)
            break;
    }
    printf("raft_sim: seeds %" PRIu64 "..%" PRIu64 " nodes=%s: %d failed; %lu commits, %lu reads, "
           "%lu elections, %lu snapshot installs, %lu conf changes, %lu crashes\n",
           start, start + seeds - 1, nodes ? (nodes == 1 ? "1" : nodes == 3 ? "3" : "5") : "mixed",
           failed, commits, reads, elections, snaps, confs, crashes);
    return failed ? 1 : 0;
}
