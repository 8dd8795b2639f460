/* progress.c - the leader's per-member progress tracker and quorum math.
 *
 * States (etcd-io/raft tracker/progress.go, thesis 10.2 pipelining):
 *   PROBE      one APPEND at a time until a match is found (paper 5.3).
 *   REPLICATE  pipelined APPENDs, bounded by the in-flight window.
 *   SNAPSHOT   waiting for a snapshot to be installed (paper 7). */
#include <string.h>

#include "core.h"

int raft__ins_init(struct raft *r, struct raft__inflights *in, uint32_t cap)
{
    memset(in, 0, sizeof(*in));
    in->cap = cap;
    in->buf = raft__malloc(r, sizeof(*in->buf) * cap);
    return in->buf == NULL ? RAFT_ENOMEM : 0;
}

void raft__ins_reset(struct raft__inflights *in)
{
    in->start = 0;
    in->count = 0;
    in->bytes = 0;
}

bool raft__ins_full(const struct raft__inflights *in, uint64_t max_bytes)
{
    return in->count >= in->cap || (max_bytes != 0 && in->bytes >= max_bytes);
}

void raft__ins_add(struct raft__inflights *in, uint64_t index, uint64_t bytes)
{
    if (in->count >= in->cap)
        return; /* callers check full first */
    uint32_t pos = (in->start + in->count) % in->cap;
    in->buf[pos].index = index;
    in->buf[pos].bytes = bytes;
    in->count++;
    in->bytes += bytes;
}

/* Frees every in-flight APPEND whose last index is <= index. */
void raft__ins_free_le(struct raft__inflights *in, uint64_t index)
{
    while (in->count > 0 && in->buf[in->start].index <= index) {
        in->bytes -= in->buf[in->start].bytes;
        in->start = (in->start + 1) % in->cap;
        in->count--;
    }
    if (in->count == 0)
        in->start = 0;
}

void raft__ins_free_first(struct raft__inflights *in)
{
    if (in->count > 0)
        raft__ins_free_le(in, in->buf[in->start].index);
}

static void pr_reset_state(struct raft__progress *pr, uint8_t state)
{
    pr->pr_probe_sent = false;
    pr->pr_pending_snapshot = 0;
    pr->pr_snap_elapsed = 0;
    pr->pr_state = state;
    raft__ins_reset(&pr->pr_ins);
}

void raft__pr_become_probe(struct raft__progress *pr)
{
    /* Leaving SNAPSHOT: resume after the snapshot if it got there. */
    if (pr->pr_state == RAFT_PROGRESS_SNAPSHOT) {
        uint64_t ps = pr->pr_pending_snapshot;
        pr_reset_state(pr, RAFT_PROGRESS_PROBE);
        pr->pr_next = RAFT__MAX(pr->pr_match + 1, ps + 1);
    } else {
        pr_reset_state(pr, RAFT_PROGRESS_PROBE);
        pr->pr_next = pr->pr_match + 1;
    }
}

void raft__pr_become_replicate(struct raft__progress *pr)
{
    pr_reset_state(pr, RAFT_PROGRESS_REPLICATE);
    pr->pr_next = pr->pr_match + 1;
}

void raft__pr_become_snapshot(struct raft__progress *pr, uint64_t index)
{
    pr_reset_state(pr, RAFT_PROGRESS_SNAPSHOT);
    pr->pr_pending_snapshot = index;
}

/* An APPEND up to index was accepted. Returns whether match moved. */
bool raft__pr_maybe_update(struct raft__progress *pr, uint64_t index)
{
    bool updated = false;
    if (pr->pr_match < index) {
        pr->pr_match = index;
        updated = true;
        pr->pr_probe_sent = false;
    }
    if (pr->pr_next < index + 1)
        pr->pr_next = index + 1;
    return updated;
}

/* An APPEND with prev index `rejected` was refused; `hint` is where the
 * leader's and follower's logs may agree. Returns false for stale rejects. */
bool raft__pr_maybe_decr(struct raft__progress *pr, uint64_t rejected, uint64_t hint)
{
    if (pr->pr_state == RAFT_PROGRESS_REPLICATE) {
        if (rejected <= pr->pr_match)
            return false; /* stale: older than what we know matches */
        pr->pr_next = pr->pr_match + 1;
        return true;
    }
    if (pr->pr_next - 1 != rejected)
        return false; /* not the probe we sent last */
    pr->pr_next = RAFT__MAX(RAFT__MIN(rejected, hint + 1), pr->pr_match + 1);
    pr->pr_probe_sent = false;
    return true;
}

bool raft__pr_paused(const struct raft *r, const struct raft__progress *pr)
{
    switch (pr->pr_state) {
    case RAFT_PROGRESS_PROBE:
        return pr->pr_probe_sent;
    case RAFT_PROGRESS_REPLICATE:
        return raft__ins_full(&pr->pr_ins, r->max_inflight_bytes);
    default:
        return true;
    }
}

struct raft__progress *raft__pr_find(struct raft *r, uint64_t id)
{
    for (uint32_t i = 0; i < r->n_prs; i++)
        if (r->prs[i].pr_id == id)
            return &r->prs[i];
    return NULL;
}

/* On becoming leader (paper Figure 2: nextIndex = last + 1, matchIndex = 0). */
void raft__pr_reset_all(struct raft *r)
{
    uint64_t last = raft__last_index(r);
    for (uint32_t i = 0; i < r->n_prs; i++) {
        struct raft__progress *pr = &r->prs[i];
        pr_reset_state(pr, RAFT_PROGRESS_PROBE);
        pr->pr_match = 0;
        pr->pr_next = last + 1;
        pr->pr_vote = 0;
        pr->pr_recent_active = false;
        pr->pr_hb_seq = 0;
        if (pr->pr_id == r->id) {
            pr->pr_match = r->stable; /* counted only once durable */
            pr->pr_recent_active = true;
        }
    }
}

static int cmp_desc(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* Sorts n values descending; returns the one a majority reached. */
static uint64_t quorum_value(uint64_t *v, size_t n)
{
    if (n == 0)
        return 0;
    /* insertion sort: n <= RAFT_MAX_MEMBERS */
    for (size_t i = 1; i < n; i++)
        for (size_t j = i; j > 0 && cmp_desc(&v[j - 1], &v[j]) > 0; j--) {
            uint64_t t = v[j];
            v[j] = v[j - 1];
            v[j - 1] = t;
        }
    return v[n / 2];
}

/* Largest index durable on a majority of voters (paper 5.3/5.4.2). */
uint64_t raft__quorum_match(const struct raft *r)
{
    uint64_t v[RAFT_MAX_MEMBERS];
    size_t n = 0;
    for (uint32_t i = 0; i < r->n_prs; i++)
        if (!r->prs[i].pr_learner)
            v[n++] = r->prs[i].pr_match;
    return quorum_value(v, n);
}

/* Largest read round acknowledged by a majority of voters. */
uint64_t raft__quorum_hb_seq(const struct raft *r);
uint64_t raft__quorum_hb_seq(const struct raft *r)
{
    uint64_t v[RAFT_MAX_MEMBERS];
    size_t n = 0;
    for (uint32_t i = 0; i < r->n_prs; i++)
        if (!r->prs[i].pr_learner)
            v[n++] = r->prs[i].pr_hb_seq;
    return quorum_value(v, n);
}

int raft__vote_result(const struct raft *r)
{
    size_t voters = 0, yes = 0, no = 0;
    for (uint32_t i = 0; i < r->n_prs; i++) {
        if (r->prs[i].pr_learner)
            continue;
        voters++;
        if (r->prs[i].pr_vote == 1)
            yes++;
        else if (r->prs[i].pr_vote == 2)
            no++;
    }
    if (voters == 0)
        return -1;
    if (yes > voters / 2)
        return 1;
    if (no >= voters - voters / 2)
        return -1;
    return 0;
}

/* CheckQuorum (thesis 6.2): whether a majority was heard from since the
 * last check; resets the marks. */
bool raft__quorum_active(struct raft *r)
{
    size_t voters = 0, active = 0;
    for (uint32_t i = 0; i < r->n_prs; i++) {
        struct raft__progress *pr = &r->prs[i];
        if (pr->pr_id == r->id)
            pr->pr_recent_active = true;
        if (!pr->pr_learner) {
            voters++;
            if (pr->pr_recent_active)
                active++;
        }
        if (pr->pr_id != r->id)
            pr->pr_recent_active = false;
    }
    return active > voters / 2;
}
