/* raft.c - the public entry points: init, tick, step, propose, ready/advance,
 * status. Message routing follows paper Figure 2 and etcd-io/raft's Step. */
#include <stdlib.h>
#include <string.h>

#include "core.h"

static const struct {
    int code;
    const char *msg;
} errors[] = {
    {0, "success"},
    {RAFT_ENOMEM, "out of memory"},
    {RAFT_EINVAL, "invalid argument"},
    {RAFT_ENOTLEADER, "not the leader"},
    {RAFT_EBUSY, "a configuration change or leader transfer is pending"},
    {RAFT_ECOMPACTED, "index is compacted"},
    {RAFT_EUNAVAILABLE, "index is beyond the log"},
    {RAFT_ETOOBIG, "too large"},
    {RAFT_EDROPPED, "proposal dropped"},
    {RAFT_ECORRUPT, "checksum mismatch"},
    {RAFT_EMALFORMED, "malformed encoding"},
    {RAFT_ESTALE, "stale"},
};

const char *raft_strerror(int err)
{
    for (size_t i = 0; i < sizeof(errors) / sizeof(errors[0]); i++)
        if (errors[i].code == err)
            return errors[i].msg;
    return "unknown raft error";
}

/* ---- memory ---------------------------------------------------------- */

void *raft__malloc(struct raft *r, size_t n)
{
    void *p = r->al.malloc ? r->al.malloc(r->al.ctx, n) : malloc(n);
    if (p == NULL)
        r->err = RAFT_ENOMEM;
    return p;
}

void *raft__realloc(struct raft *r, void *p, size_t n)
{
    void *q = r->al.realloc ? r->al.realloc(r->al.ctx, p, n) : realloc(p, n);
    if (q == NULL)
        r->err = RAFT_ENOMEM;
    return q;
}

void raft__free(struct raft *r, void *p)
{
    if (p == NULL)
        return;
    if (r->al.free)
        r->al.free(r->al.ctx, p);
    else
        free(p);
}

bool raft__grow(struct raft *r, void **arr, size_t *cap, size_t need, size_t elem)
{
    size_t nc;
    void *p;
    if (need <= *cap)
        return true;
    nc = *cap ? *cap * 2 : 8;
    while (nc < need)
        nc *= 2;
    p = raft__realloc(r, *arr, nc * elem);
    if (p == NULL)
        return false;
    *arr = p;
    *cap = nc;
    return true;
}

void raft__bury(struct raft *r, void *p)
{
    if (p == NULL)
        return;
    if (!raft__grow(r, (void **)&r->grave, &r->cap_grave, r->n_grave + 1, sizeof(void *))) {
        /* The error is now sticky, so no Ready will ever hand out the
         * queued messages that might point at p: freeing is safe. */
        raft__free(r, p);
        return;
    }
    r->grave[r->n_grave++] = p;
}

static void free_grave(struct raft *r)
{
    for (size_t i = 0; i < r->n_grave; i++)
        raft__free(r, r->grave[i]);
    r->n_grave = 0;
}

/* splitmix64: small, good enough for election jitter, deterministic. */
uint64_t raft__rand(struct raft *r)
{
    uint64_t z = (r->rng += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void raft__send(struct raft *r, struct raft_message *m)
{
    m->from = r->id;
    if (m->type == RAFT_MSG_PROPOSE || m->type == RAFT_MSG_READ_INDEX
        || m->type == RAFT_MSG_READ_INDEX_RESP)
        m->term = 0; /* not bound to a term: handled outside term rules */
    else if (m->term == 0)
        m->term = r->term;
    if (!raft__grow(r, (void **)&r->msgs, &r->cap_msgs, r->n_msgs + 1, sizeof(*m))) {
        raft__free(r, m->entries);
        return;
    }
    r->msgs[r->n_msgs++] = *m;
}

/* ---- init / close ----------------------------------------------------- */

int raft_init(struct raft **rp, const struct raft_config *cfg)
{
    struct raft *r;
    const struct raft_allocator *al = cfg->allocator;
    uint64_t last;
    *rp = NULL;
    if (cfg->id == RAFT_NONE || cfg->heartbeat_tick == 0
        || cfg->election_tick <= cfg->heartbeat_tick || cfg->max_inflight_msgs == 0)
        return RAFT_EINVAL;
    r = al && al->malloc ? al->malloc(al->ctx, sizeof(*r)) : malloc(sizeof(*r));
    if (r == NULL)
        return RAFT_ENOMEM;
    memset(r, 0, sizeof(*r));
    if (al)
        r->al = *al;
    r->id = cfg->id;
    r->election_tick = cfg->election_tick;
    r->heartbeat_tick = cfg->heartbeat_tick;
    r->prevote = cfg->prevote;
    r->check_quorum = cfg->check_quorum;
    r->max_inflight_msgs = cfg->max_inflight_msgs;
    r->max_inflight_bytes = cfg->max_inflight_bytes;
    r->max_msg_bytes = cfg->max_msg_bytes;
    r->max_uncommitted_bytes = cfg->max_uncommitted_bytes;
    r->async_persist = cfg->async_persist;
    r->rng = cfg->seed ^ (cfg->id * 0x2545f4914f6cdd1dULL);

    if (cfg->snapshot != NULL) {
        if (cfg->snapshot->meta.index == 0 || !raft__conf_valid(&cfg->snapshot->meta.conf))
            goto invalid;
        r->snap.meta = cfg->snapshot->meta;
        if (cfg->snapshot->len > 0) {
            r->snap.data = raft__malloc(r, cfg->snapshot->len);
            if (r->snap.data == NULL)
                goto fail;
            memcpy(r->snap.data, cfg->snapshot->data, cfg->snapshot->len);
            r->snap.len = cfg->snapshot->len;
        }
    } else {
        r->snap.meta.conf = cfg->conf;
        if (cfg->conf.n_voters + cfg->conf.n_learners > 0 && !raft__conf_valid(&cfg->conf))
            goto invalid;
    }
    for (size_t i = 0; i < cfg->n_entries; i++) {
        const struct raft_entry *e = &cfg->entries[i];
        if (e->index != r->snap.meta.index + 1 + i || e->term > cfg->hard_state.term
            || e->term < (i ? cfg->entries[i - 1].term : r->snap.meta.term)
            || (e->len > 0 && e->data == NULL))
            goto invalid;
    }
    if (raft__log_append(r, cfg->entries, cfg->n_entries) != 0)
        goto fail;
    if (raft__conf_refresh(r) != 0)
        goto fail;
    last = raft__last_index(r);
    r->stable = last;
    r->persisting = last;
    r->term = cfg->hard_state.term;
    r->vote = cfg->hard_state.vote;
    if (cfg->applied > last)
        goto invalid;
    r->applied = RAFT__MAX(cfg->applied, r->snap.meta.index);
    r->applying = r->applied;
    r->commit = RAFT__MIN(RAFT__MAX(cfg->hard_state.commit, r->applied), last);
    r->role = RAFT_FOLLOWER;
    raft__become_follower(r, r->term, RAFT_NONE);
    r->prev_hs.term = r->term;
    r->prev_hs.vote = r->vote;
    r->prev_hs.commit = r->commit;
    r->prev_ss.lead = RAFT_NONE;
    r->prev_ss.role = RAFT_FOLLOWER;
    if (r->err)
        goto fail;
    *rp = r;
    return 0;
invalid:
    raft_close(r);
    return RAFT_EINVAL;
fail:
    raft_close(r);
    return RAFT_ENOMEM;
}

static void clear_output(struct raft *r)
{
    for (size_t i = 0; i < r->n_msgs; i++)
        raft__free(r, r->msgs[i].entries);
    r->n_msgs = 0;
    for (size_t i = 0; i < r->n_rstates; i++)
        raft__free(r, r->rstates[i].ctx);
    r->n_rstates = 0;
    free_grave(r);
}

void raft_close(struct raft *r)
{
    if (r == NULL)
        return;
    clear_output(r);
    for (size_t i = 0; i < r->n_ents; i++)
        raft__free(r, r->ents[i].data);
    raft__free(r, r->ents);
    raft__free(r, r->snap.data);
    for (uint32_t i = 0; i < r->n_prs; i++)
        raft__free(r, r->prs[i].pr_ins.buf);
    for (size_t i = 0; i < r->n_reads; i++)
        raft__free(r, r->reads[i].rd_ctx);
    raft__free(r, r->reads);
    raft__free(r, r->msgs);
    raft__free(r, r->rstates);
    free_grave(r);
    raft__free(r, r->grave);
    raft__free(r, r);
}

/* ---- inputs ------------------------------------------------------------ */

int raft_tick(struct raft *r)
{
    RAFT__ENTER(r);
    if (r->role == RAFT_LEADER)
        raft__tick_heartbeat(r);
    else
        raft__tick_election(r);
    return r->err;
}

/* Rejects messages no correct peer sends; raft must survive anything. */
static bool msg_valid(const struct raft *r, const struct raft_message *m)
{
    if (m->type < RAFT_MSG_APPEND || m->type > RAFT_MSG_TYPE_MAX)
        return false;
    if (m->from == RAFT_NONE || m->from == r->id || m->to != r->id)
        return false;
    if (m->n_entries > 0 && m->entries == NULL)
        return false;
    if (m->ctx_len > 0 && m->ctx == NULL)
        return false;
    if (m->n_entries > 0 && m->type != RAFT_MSG_APPEND && m->type != RAFT_MSG_PROPOSE)
        return false;
    for (uint32_t i = 0; i < m->n_entries; i++) {
        const struct raft_entry *e = &m->entries[i];
        if (e->type > RAFT_ENTRY_CONF_CHANGE || (e->len > 0 && e->data == NULL))
            return false;
        if (m->type == RAFT_MSG_APPEND) {
            if (e->index != m->index + 1 + i || e->term > m->term
                || e->term < (i ? m->entries[i - 1].term : m->log_term))
                return false;
        } else if (e->type != RAFT_ENTRY_NORMAL) {
            return false; /* conf changes are not forwarded */
        }
    }
    if (m->type == RAFT_MSG_APPEND && m->index > UINT64_MAX - 1 - m->n_entries)
        return false;
    if (m->type == RAFT_MSG_SNAPSHOT) {
        const struct raft_snapshot *s = &m->snapshot;
        if (s->meta.index == 0 || s->meta.term == 0 || s->meta.term > m->term
            || !raft__conf_valid(&s->meta.conf) || (s->len > 0 && s->data == NULL))
            return false;
    }
    if (m->term == 0 && m->type != RAFT_MSG_PROPOSE && m->type != RAFT_MSG_READ_INDEX
        && m->type != RAFT_MSG_READ_INDEX_RESP)
        return false;
    return true;
}

static bool is_leader_msg(uint8_t t)
{
    return t == RAFT_MSG_APPEND || t == RAFT_MSG_HEARTBEAT || t == RAFT_MSG_SNAPSHOT;
}

static void step_leader(struct raft *r, const struct raft_message *m)
{
    switch (m->type) {
    case RAFT_MSG_APPEND_RESP:
        raft__step_append_resp(r, m);
        break;
    case RAFT_MSG_HEARTBEAT_RESP:
        raft__step_heartbeat_resp(r, m);
        break;
    case RAFT_MSG_READ_INDEX:
        if (raft__pr_find(r, m->from) != NULL)
            (void)raft__read_request(r, m->from, m->ctx, m->ctx_len);
        break;
    case RAFT_MSG_PROPOSE: {
        struct raft_entry *es;
        if (r->lead_transferee != RAFT_NONE || m->n_entries == 0)
            break;
        es = raft__malloc(r, m->n_entries * sizeof(*es));
        if (es == NULL)
            break;
        memcpy(es, m->entries, m->n_entries * sizeof(*es));
        if (raft__append_local(r, es, m->n_entries) == 0)
            raft__bcast_append(r);
        raft__free(r, es);
        break;
    }
    default:
        break;
    }
}

static void step_candidate(struct raft *r, const struct raft_message *m)
{
    if (is_leader_msg(m->type)) {
        /* A leader exists in our term (paper 5.2). */
        raft__become_follower(r, r->term, m->from);
    }
    switch (m->type) {
    case RAFT_MSG_VOTE_RESP:
    case RAFT_MSG_PREVOTE_RESP:
        raft__step_vote_resp(r, m);
        return;
    default:
        break;
    }
    if (is_leader_msg(m->type)) {
        /* re-dispatch as follower */
        r->election_elapsed = 0;
        if (m->type == RAFT_MSG_APPEND)
            raft__step_append(r, m);
        else if (m->type == RAFT_MSG_HEARTBEAT)
            raft__step_heartbeat(r, m);
        else
            raft__step_snapshot(r, m);
    }
}

static void step_follower(struct raft *r, const struct raft_message *m)
{
    switch (m->type) {
    case RAFT_MSG_APPEND:
        r->election_elapsed = 0;
        r->lead = m->from;
        raft__step_append(r, m);
        break;
    case RAFT_MSG_HEARTBEAT:
        r->election_elapsed = 0;
        r->lead = m->from;
        raft__step_heartbeat(r, m);
        break;
    case RAFT_MSG_SNAPSHOT:
        r->election_elapsed = 0;
        r->lead = m->from;
        raft__step_snapshot(r, m);
        break;
    case RAFT_MSG_TIMEOUT_NOW:
        raft__step_timeout_now(r, m);
        break;
    case RAFT_MSG_READ_INDEX_RESP:
        (void)raft__read_state_add(r, m->index, m->ctx, m->ctx_len);
        break;
    default:
        break;
    }
}

int raft_step(struct raft *r, const struct raft_message *m)
{
    RAFT__ENTER(r);
    if (!msg_valid(r, m))
        return RAFT_EINVAL;
    if (m->type == RAFT_MSG_PROPOSE || m->type == RAFT_MSG_READ_INDEX) {
        if (r->role == RAFT_LEADER)
            step_leader(r, m);
        return r->err; /* followers do not forward others' requests */
    }
    if (m->type == RAFT_MSG_READ_INDEX_RESP) {
        if (r->role != RAFT_LEADER)
            step_follower(r, m);
        return r->err;
    }
    if (m->term > r->term) {
        if (m->type == RAFT_MSG_VOTE || m->type == RAFT_MSG_PREVOTE) {
            /* Thesis 4.2.3 / 9.6: ignore disruptive candidates while a
             * leader is known to be alive (needs CheckQuorum), unless the
             * leader itself asked for it (transfer). */
            bool force = (m->flags & RAFT_MSG_FLAG_FORCE) != 0;
            bool in_lease = r->check_quorum && r->lead != RAFT_NONE
                            && r->election_elapsed < r->election_tick;
            if (!force && in_lease)
                return 0;
        }
        if (m->type == RAFT_MSG_PREVOTE) {
            /* never change term for a prevote */
        } else if (m->type == RAFT_MSG_PREVOTE_RESP && !m->reject) {
            /* our own future term, granted */
        } else {
            raft__become_follower(r, m->term, is_leader_msg(m->type) ? m->from : RAFT_NONE);
        }
    } else if (m->term < r->term) {
        struct raft_message resp;
        memset(&resp, 0, sizeof(resp));
        if ((r->check_quorum || r->prevote)
            && (m->type == RAFT_MSG_HEARTBEAT || m->type == RAFT_MSG_APPEND)) {
            /* Tell a stale leader about the new term so it steps down; a
             * node ignoring votes under CheckQuorum would otherwise never
             * raise that leader's term. */
            resp.type = RAFT_MSG_APPEND_RESP;
            resp.to = m->from;
            raft__send(r, &resp);
        } else if (m->type == RAFT_MSG_PREVOTE) {
            resp.type = RAFT_MSG_PREVOTE_RESP;
            resp.to = m->from;
            resp.reject = 1;
            raft__send(r, &resp);
        }
        return r->err;
    }
    if (m->type == RAFT_MSG_VOTE || m->type == RAFT_MSG_PREVOTE) {
        raft__step_vote(r, m);
        return r->err;
    }
    switch (r->role) {
    case RAFT_LEADER:
        step_leader(r, m);
        break;
    case RAFT_CANDIDATE:
    case RAFT_PRE_CANDIDATE:
        step_candidate(r, m);
        break;
    default:
        step_follower(r, m);
        break;
    }
    return r->err;
}

int raft_propose(struct raft *r, const void *data, uint32_t len, uint64_t *index)
{
    struct raft_entry e;
    int rv;
    RAFT__ENTER(r);
    if (len > 0 && data == NULL)
        return RAFT_EINVAL;
    if (r->max_msg_bytes != 0 && len > r->max_msg_bytes)
        return RAFT_ETOOBIG;
    memset(&e, 0, sizeof(e));
    e.type = RAFT_ENTRY_NORMAL;
    e.len = len;
    e.data = (uint8_t *)data;
    if (r->role != RAFT_LEADER) {
        struct raft_message m;
        struct raft_entry *fe;
        if (r->lead == RAFT_NONE)
            return RAFT_EDROPPED;
        /* forward; the copy lives until the message is handed out */
        fe = raft__malloc(r, sizeof(*fe));
        if (fe == NULL)
            return RAFT_ENOMEM;
        *fe = e;
        if (len > 0) {
            fe->data = raft__malloc(r, len);
            if (fe->data == NULL) {
                raft__free(r, fe);
                return RAFT_ENOMEM;
            }
            memcpy(fe->data, data, len);
            raft__bury(r, fe->data);
        }
        memset(&m, 0, sizeof(m));
        m.type = RAFT_MSG_PROPOSE;
        m.to = r->lead;
        m.entries = fe;
        m.n_entries = 1;
        raft__send(r, &m);
        if (index)
            *index = 0;
        return r->err;
    }
    if (r->lead_transferee != RAFT_NONE)
        return RAFT_EDROPPED;
    rv = raft__append_local(r, &e, 1);
    if (rv != 0)
        return rv;
    if (index)
        *index = raft__last_index(r);
    /* Sending waits for raft_ready() so one turn's proposals share one
     * APPEND per follower (batching). */
    return 0;
}

/* ---- output ------------------------------------------------------------- */

static bool hs_changed(const struct raft *r)
{
    return r->term != r->prev_hs.term || r->vote != r->prev_hs.vote
           || r->commit != r->prev_hs.commit;
}

static bool ss_changed(const struct raft *r)
{
    return r->lead != r->prev_ss.lead || r->role != r->prev_ss.role;
}

static bool bcast_needed(const struct raft *r)
{
    if (r->role != RAFT_LEADER)
        return false;
    for (uint32_t i = 0; i < r->n_prs; i++) {
        const struct raft__progress *pr = &r->prs[i];
        if (pr->pr_id != r->id && pr->pr_next <= raft__last_index(r) && !raft__pr_paused(r, pr))
            return true;
    }
    return false;
}

bool raft_has_ready(const struct raft *r)
{
    if (r->err || r->in_ready)
        return false;
    return ss_changed(r) || hs_changed(r) || r->snap_pending || r->persisting < raft__last_index(r)
           || r->applying < r->commit || r->n_msgs > 0 || r->n_rstates > 0 || bcast_needed(r);
}

int raft_ready(struct raft *r, struct raft_ready *rd)
{
    if (r->err)
        return r->err;
    if (r->in_ready)
        return RAFT_EBUSY;
    /* Flush proposals accumulated this turn: one APPEND per follower. */
    if (r->role == RAFT_LEADER)
        for (uint32_t i = 0; i < r->n_prs; i++)
            while (raft__maybe_send_append(r, &r->prs[i], false))
                ;
    if (r->err)
        return r->err;
    memset(rd, 0, sizeof(*rd));
    rd->soft_state.lead = r->lead;
    rd->soft_state.role = r->role;
    rd->soft_state_changed = ss_changed(r);
    rd->hard_state.term = r->term;
    rd->hard_state.vote = r->vote;
    rd->hard_state.commit = r->commit;
    rd->hard_state_changed = hs_changed(r);
    if (r->snap_pending)
        rd->snapshot = &r->snap;
    if (r->persisting < raft__last_index(r)) {
        uint64_t from = RAFT__MAX(r->persisting + 1, raft__first_index(r));
        rd->entries = raft__entry(r, from);
        rd->n_entries = (size_t)(raft__last_index(r) - from + 1);
    }
    if (r->applying < r->commit) {
        rd->committed = raft__entry(r, r->applying + 1);
        rd->n_committed = (size_t)(r->commit - r->applying);
    }
    rd->messages = r->msgs;
    rd->n_messages = r->n_msgs;
    rd->read_states = r->rstates;
    rd->n_read_states = r->n_rstates;
    rd->must_sync = rd->n_entries > 0 || rd->snapshot != NULL
                    || r->term != r->prev_hs.term || r->vote != r->prev_hs.vote;
    r->cur = *rd;
    r->in_ready = true;
    return 0;
}

static void mark_stable(struct raft *r, uint64_t index, uint64_t term)
{
    if (index <= r->stable || !raft__match_term(r, index, term))
        return;
    r->stable = index;
    if (r->persisting < index)
        r->persisting = index;
}

int raft_advance(struct raft *r, const struct raft_ready *rd)
{
    if (r->err)
        return r->err;
    if (!r->in_ready)
        return RAFT_EINVAL;
    (void)rd; /* r->cur is authoritative */
    rd = &r->cur;
    if (rd->hard_state_changed)
        r->prev_hs = rd->hard_state;
    if (rd->soft_state_changed)
        r->prev_ss = rd->soft_state;
    if (rd->snapshot != NULL) {
        r->snap_pending = false;
        if (r->applied < rd->snapshot->meta.index)
            r->applied = rd->snapshot->meta.index; /* installing applies it */
    }
    if (rd->n_entries > 0) {
        const struct raft_entry *e = &rd->entries[rd->n_entries - 1];
        if (e->index > r->persisting)
            r->persisting = e->index;
        if (!r->async_persist)
            mark_stable(r, e->index, e->term);
    }
    if (rd->n_committed > 0) {
        uint64_t last = rd->committed[rd->n_committed - 1].index;
        if (last > r->applying)
            r->applying = last;
        if (last > r->applied)
            r->applied = last;
    }
    clear_output(r);
    r->in_ready = false;
    raft__self_persisted(r);
    return r->err;
}

int raft_persisted(struct raft *r, uint64_t index, uint64_t term)
{
    if (r->err)
        return r->err;
    mark_stable(r, index, term);
    if (!r->in_ready)
        raft__self_persisted(r);
    return r->err;
}

int raft_applied(struct raft *r, uint64_t index)
{
    if (r->err)
        return r->err;
    if (index > r->applying)
        return RAFT_EINVAL;
    if (index > r->applied)
        r->applied = index;
    return 0;
}

int raft_compact(struct raft *r, uint64_t index, const void *data, uint32_t len)
{
    if (r->err)
        return r->err;
    if (r->in_ready)
        return RAFT_EBUSY;
    if (len > 0 && data == NULL)
        return RAFT_EINVAL;
    return raft__log_compact(r, index, data, len);
}

int raft_report_snapshot(struct raft *r, uint64_t to, bool ok)
{
    struct raft__progress *pr;
    RAFT__ENTER(r);
    if (r->role != RAFT_LEADER || (pr = raft__pr_find(r, to)) == NULL)
        return RAFT_ENOTLEADER;
    if (pr->pr_state != RAFT_PROGRESS_SNAPSHOT)
        return 0;
    if (!ok)
        pr->pr_pending_snapshot = 0;
    /* Wait for the follower's answer before sending more (etcd's rule). */
    raft__pr_become_probe(pr);
    pr->pr_probe_sent = true;
    return 0;
}

int raft_report_unreachable(struct raft *r, uint64_t to)
{
    struct raft__progress *pr;
    RAFT__ENTER(r);
    if (r->role != RAFT_LEADER || (pr = raft__pr_find(r, to)) == NULL)
        return RAFT_ENOTLEADER;
    if (pr->pr_state == RAFT_PROGRESS_REPLICATE)
        raft__pr_become_probe(pr);
    return 0;
}

void raft_status(const struct raft *r, struct raft_status *st)
{
    memset(st, 0, sizeof(*st));
    st->id = r->id;
    st->term = r->term;
    st->vote = r->vote;
    st->commit = r->commit;
    st->applied = r->applied;
    st->lead = r->lead;
    st->role = r->role;
    st->first_index = raft__first_index(r);
    st->last_index = raft__last_index(r);
    st->stable_index = r->stable;
    st->lead_transferee = r->lead_transferee;
    st->conf = r->conf;
    if (r->role != RAFT_LEADER)
        return;
    st->n_progress = r->n_prs;
    for (uint32_t i = 0; i < r->n_prs; i++) {
        const struct raft__progress *pr = &r->prs[i];
        struct raft_progress_status *ps = &st->progress[i];
        ps->id = pr->pr_id;
        ps->match = pr->pr_match;
        ps->next = pr->pr_next;
        ps->state = pr->pr_state;
        ps->learner = pr->pr_learner;
        ps->recent_active = pr->pr_recent_active;
        ps->inflight = pr->pr_ins.count;
    }
}

int raft_entry_at(const struct raft *r, uint64_t index, const struct raft_entry **e)
{
    if (index <= r->snap.meta.index)
        return RAFT_ECOMPACTED;
    if (index > raft__last_index(r))
        return RAFT_EUNAVAILABLE;
    *e = raft__entry(r, index);
    return 0;
}
