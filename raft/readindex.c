/* readindex.c - linearizable reads without log writes (thesis 6.4).
 *
 * 1. The leader records the request with read index = its commit index.
 *    A new leader first commits an entry of its term (its no-op); until
 *    then requests wait, since its commit index may be stale (6.4 step 1).
 * 2. It confirms it is still leader by a round of heartbeats acknowledged
 *    by a majority (step 2). Rounds are numbered (hb_seq); requests that
 *    arrive while a round is in flight wait for the next one, so one round
 *    serves a whole batch.
 * 3. Once confirmed, each request is answered: a read state for local
 *    requests, READ_INDEX_RESP for requests forwarded by followers. The
 *    caller serves the read when its applied index reaches the read index
 *    (steps 3-4). */
#include <string.h>

#include "core.h"

uint64_t raft__quorum_hb_seq(const struct raft *r);

static bool committed_in_term(const struct raft *r)
{
    return raft__match_term(r, r->commit, r->term);
}

static void maybe_start_round(struct raft *r)
{
    bool want = false;
    struct raft__progress *self;
    if (r->read_seq != r->read_confirmed)
        return; /* one round in flight at a time */
    for (size_t i = 0; i < r->n_reads; i++)
        if (r->reads[i].rd_seq == r->read_seq + 1)
            want = true;
    if (!want)
        return;
    r->read_seq++;
    self = raft__pr_find(r, r->id);
    if (self != NULL)
        self->pr_hb_seq = r->read_seq;
    raft__bcast_heartbeat(r);
    raft__read_check(r);
}

int raft__read_state_add(struct raft *r, uint64_t index, const uint8_t *ctx, uint32_t len)
{
    struct raft_read_state *rs;
    uint8_t *copy = NULL;
    if (!raft__grow(r, (void **)&r->rstates, &r->cap_rstates, r->n_rstates + 1, sizeof(*rs)))
        return RAFT_ENOMEM;
    if (len > 0) {
        copy = raft__malloc(r, len);
        if (copy == NULL)
            return RAFT_ENOMEM;
        memcpy(copy, ctx, len);
    }
    rs = &r->rstates[r->n_rstates++];
    rs->index = index;
    rs->ctx_len = len;
    rs->ctx = copy;
    return 0;
}

static void release(struct raft *r, struct raft__read *rd)
{
    if (rd->rd_from == r->id) {
        (void)raft__read_state_add(r, rd->rd_index, rd->rd_ctx, rd->rd_ctx_len);
    } else {
        struct raft_message m;
        memset(&m, 0, sizeof(m));
        m.type = RAFT_MSG_READ_INDEX_RESP;
        m.to = rd->rd_from;
        m.index = rd->rd_index;
        m.ctx = rd->rd_ctx;
        m.ctx_len = rd->rd_ctx_len;
        raft__send(r, &m);
    }
    raft__bury(r, rd->rd_ctx); /* a message may point at it until advance */
}

/* A majority acknowledged rounds up to q: answer every request they cover. */
void raft__read_check(struct raft *r)
{
    uint64_t q = raft__quorum_hb_seq(r);
    size_t k = 0;
    if (q <= r->read_confirmed)
        return;
    r->read_confirmed = q;
    for (size_t i = 0; i < r->n_reads; i++) {
        struct raft__read *rd = &r->reads[i];
        if (rd->rd_seq != 0 && rd->rd_seq <= q)
            release(r, rd);
        else
            r->reads[k++] = *rd;
    }
    r->n_reads = k;
    maybe_start_round(r);
}

int raft__read_request(struct raft *r, uint64_t from, const uint8_t *ctx, uint32_t len)
{
    struct raft__read *rd;
    uint8_t *copy = NULL;
    if (!raft__grow(r, (void **)&r->reads, &r->cap_reads, r->n_reads + 1, sizeof(*rd)))
        return RAFT_ENOMEM;
    if (len > 0) {
        copy = raft__malloc(r, len);
        if (copy == NULL)
            return RAFT_ENOMEM;
        memcpy(copy, ctx, len);
    }
    rd = &r->reads[r->n_reads++];
    rd->rd_from = from;
    rd->rd_ctx = copy;
    rd->rd_ctx_len = len;
    if (committed_in_term(r)) {
        rd->rd_index = r->commit;
        rd->rd_seq = r->read_seq + 1;
        maybe_start_round(r);
    } else {
        rd->rd_index = 0;
        rd->rd_seq = 0;
    }
    return r->err;
}

/* Commit moved: requests waiting for the first commit of the term go. */
void raft__read_on_first_commit(struct raft *r)
{
    bool any = false;
    if (!committed_in_term(r))
        return;
    for (size_t i = 0; i < r->n_reads; i++)
        if (r->reads[i].rd_seq == 0) {
            r->reads[i].rd_seq = r->read_seq + 1;
            r->reads[i].rd_index = r->commit;
            any = true;
        }
    if (any)
        maybe_start_round(r);
}

/* Leadership changes drop every pending request (callers retry). */
void raft__read_reset(struct raft *r)
{
    for (size_t i = 0; i < r->n_reads; i++)
        raft__bury(r, r->reads[i].rd_ctx);
    r->n_reads = 0;
    r->read_confirmed = r->read_seq;
}

int raft_read_index(struct raft *r, const void *ctx, uint32_t ctx_len)
{
    RAFT__ENTER(r);
    if (ctx_len > 65536 || (ctx_len > 0 && ctx == NULL))
        return RAFT_EINVAL;
    if (r->role == RAFT_LEADER)
        return raft__read_request(r, r->id, ctx, ctx_len);
    if (r->lead == RAFT_NONE)
        return RAFT_EDROPPED;
    struct raft_message m;
    uint8_t *copy = NULL;
    if (ctx_len > 0) {
        copy = raft__malloc(r, ctx_len);
        if (copy == NULL)
            return RAFT_ENOMEM;
        memcpy(copy, ctx, ctx_len);
        raft__bury(r, copy);
    }
    memset(&m, 0, sizeof(m));
    m.type = RAFT_MSG_READ_INDEX;
    m.to = r->lead;
    m.ctx = copy;
    m.ctx_len = ctx_len;
    raft__send(r, &m);
    return r->err;
}
