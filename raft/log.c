/* log.c - the in-memory log: snapshot boundary, stable prefix, unstable tail.
 *
 * ents[i] holds index snap.meta.index + 1 + i. Entries up to `stable` are
 * durable; later ones are handed out in raft_ready() until the caller
 * acknowledges them (raft_advance()/raft_persisted()). */
#include <string.h>

#include "core.h"

uint64_t raft__first_index(const struct raft *r)
{
    return r->snap.meta.index + 1;
}

uint64_t raft__last_index(const struct raft *r)
{
    return r->snap.meta.index + r->n_ents;
}

struct raft_entry *raft__entry(const struct raft *r, uint64_t index)
{
    if (index <= r->snap.meta.index || index > raft__last_index(r))
        return NULL;
    return &r->ents[index - r->snap.meta.index - 1];
}

int raft__term(const struct raft *r, uint64_t index, uint64_t *term)
{
    if (index == r->snap.meta.index) {
        *term = r->snap.meta.term;
        return 0;
    }
    if (index < r->snap.meta.index)
        return RAFT_ECOMPACTED;
    if (index > raft__last_index(r))
        return RAFT_EUNAVAILABLE;
    *term = r->ents[index - r->snap.meta.index - 1].term;
    return 0;
}

uint64_t raft__term_or0(const struct raft *r, uint64_t index)
{
    uint64_t t = 0;
    if (raft__term(r, index, &t) != 0)
        return 0;
    return t;
}

uint64_t raft__last_term(const struct raft *r)
{
    return raft__term_or0(r, raft__last_index(r));
}

bool raft__match_term(const struct raft *r, uint64_t index, uint64_t term)
{
    uint64_t t;
    return raft__term(r, index, &t) == 0 && t == term;
}

/* Paper 5.4.1: the candidate's log is at least as up-to-date as ours. */
bool raft__up_to_date(const struct raft *r, uint64_t last_index, uint64_t last_term)
{
    uint64_t lt = raft__last_term(r);
    return last_term > lt || (last_term == lt && last_index >= raft__last_index(r));
}

/* Appends copies of es (which must start at last_index + 1). */
int raft__log_append(struct raft *r, const struct raft_entry *es, size_t n)
{
    bool conf = false;
    if (n == 0)
        return 0;
    if (!raft__grow(r, (void **)&r->ents, &r->cap_ents, r->n_ents + n, sizeof(*r->ents)))
        return RAFT_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        struct raft_entry *d = &r->ents[r->n_ents];
        *d = es[i];
        d->index = raft__last_index(r) + 1;
        d->data = NULL;
        if (es[i].len > 0) {
            d->data = raft__malloc(r, es[i].len);
            if (d->data == NULL)
                return RAFT_ENOMEM;
            memcpy(d->data, es[i].data, es[i].len);
        }
        if (d->type == RAFT_ENTRY_CONF_CHANGE)
            conf = true;
        r->n_ents++;
    }
    return conf ? raft__conf_refresh(r) : 0;
}

/* Removes every entry after index `after` (a conflicting suffix, paper 5.3). */
void raft__log_truncate(struct raft *r, uint64_t after)
{
    bool conf = false;
    while (raft__last_index(r) > after && r->n_ents > 0) {
        struct raft_entry *e = &r->ents[r->n_ents - 1];
        if (e->type == RAFT_ENTRY_CONF_CHANGE)
            conf = true;
        raft__bury(r, e->data);
        r->n_ents--;
    }
    if (r->stable > after)
        r->stable = after;
    if (r->persisting > after)
        r->persisting = after;
    if (conf)
        (void)raft__conf_refresh(r); /* shrinking never allocates */
}

/* Paper 5.3 receiver rules 2-5, etcd's maybeAppend. Returns 0 and the last
 * index the message vouches for in *last_new, RAFT_ESTALE on a mismatch at
 * prev (the caller rejects), RAFT_EINVAL if the leader would overwrite a
 * committed entry (impossible unless the message is forged). */
int raft__log_maybe_append(struct raft *r, const struct raft_message *m, uint64_t *last_new)
{
    uint64_t prev = m->index;
    size_t i;
    int rv;
    if (!raft__match_term(r, prev, m->log_term))
        return RAFT_ESTALE;
    /* Skip entries we already have (they may be compacted: treat entries at
     * or below the snapshot as matching, they are committed). */
    for (i = 0; i < m->n_entries; i++) {
        uint64_t idx = prev + 1 + i;
        uint64_t t;
        if (idx <= r->snap.meta.index)
            continue;
        if (raft__term(r, idx, &t) != 0 || t != m->entries[i].term)
            break;
    }
    if (i < m->n_entries) {
        uint64_t idx = prev + 1 + i;
        if (idx <= r->commit)
            return RAFT_EINVAL;
        raft__log_truncate(r, idx - 1);
        rv = raft__log_append(r, &m->entries[i], m->n_entries - i);
        if (rv != 0)
            return rv;
    }
    *last_new = prev + m->n_entries;
    raft__commit_to(r, RAFT__MIN(m->commit, *last_new));
    return 0;
}

bool raft__commit_to(struct raft *r, uint64_t index)
{
    if (index > raft__last_index(r))
        index = raft__last_index(r);
    if (index <= r->commit)
        return false;
    r->commit = index;
    return true;
}

/* etcd's findConflictByTerm: the largest index <= index whose term is
 * <= term (fast backtracking, thesis 5.3 "optimization"). */
uint64_t raft__find_conflict_by_term(const struct raft *r, uint64_t index, uint64_t term,
                                     uint64_t *found_term)
{
    uint64_t t = 0;
    if (index > raft__last_index(r))
        index = raft__last_index(r);
    for (;;) {
        if (raft__term(r, index, &t) != 0) {
            t = 0;
            break;
        }
        if (t <= term)
            break;
        if (index == 0)
            break;
        index--;
    }
    if (found_term)
        *found_term = t;
    return index;
}

/* Replaces the whole log by a snapshot received from the leader (paper 7). */
int raft__log_restore(struct raft *r, const struct raft_snapshot *s)
{
    uint8_t *data = NULL;
    if (s->len > 0) {
        data = raft__malloc(r, s->len);
        if (data == NULL)
            return RAFT_ENOMEM;
        memcpy(data, s->data, s->len);
    }
    raft__log_truncate(r, r->snap.meta.index);
    raft__bury(r, r->snap.data);
    r->snap = *s;
    r->snap.data = data;
    r->snap_pending = true;
    r->commit = s->meta.index;
    r->stable = s->meta.index;
    r->persisting = s->meta.index;
    r->applying = s->meta.index;
    if (r->applied > s->meta.index)
        r->applied = s->meta.index;
    return raft__conf_refresh(r);
}

/* Drops entries up to index, recording a snapshot at index (paper 7). */
int raft__log_compact(struct raft *r, uint64_t index, const void *data, uint32_t len)
{
    struct raft_snapshot s;
    uint64_t term;
    size_t drop;
    uint8_t *copy = NULL;
    if (index <= r->snap.meta.index)
        return RAFT_ECOMPACTED;
    if (index > r->applied || index > raft__last_index(r))
        return RAFT_EUNAVAILABLE;
    raft__term(r, index, &term);
    s.meta.index = index;
    s.meta.term = term;
    s.meta.conf = r->snap.meta.conf;
    for (uint64_t i = index; i > r->snap.meta.index; i--) {
        const struct raft_entry *e = raft__entry(r, i);
        struct raft_conf_change cc;
        if (e->type == RAFT_ENTRY_CONF_CHANGE && raft_conf_change_decode(e, &cc) == 0) {
            s.meta.conf = cc.conf;
            break;
        }
    }
    /* A node that joined an existing cluster does not know the bootstrap
     * configuration until it receives a CONF_CHANGE entry or a snapshot;
     * a snapshot without a configuration would be useless to restart from. */
    if (s.meta.conf.n_voters == 0)
        return RAFT_EUNAVAILABLE;
    if (len > 0) {
        copy = raft__malloc(r, len);
        if (copy == NULL)
            return RAFT_ENOMEM;
        memcpy(copy, data, len);
    }
    s.len = len;
    s.data = copy;
    drop = (size_t)(index - r->snap.meta.index);
    for (size_t i = 0; i < drop; i++)
        raft__bury(r, r->ents[i].data);
    memmove(r->ents, r->ents + drop, (r->n_ents - drop) * sizeof(*r->ents));
    r->n_ents -= drop;
    raft__bury(r, r->snap.data);
    r->snap = s;
    if (r->stable < index)
        r->stable = index;
    if (r->persisting < index)
        r->persisting = index;
    return 0;
}

/* Number of entries from lo (inclusive) to hi (inclusive) fitting in
 * max_bytes (at least one if lo <= hi); their byte size in *bytes. */
size_t raft__log_limit(const struct raft *r, uint64_t lo, uint64_t hi, uint64_t max_bytes,
                       uint64_t *bytes)
{
    size_t n = 0;
    uint64_t b = 0;
    for (uint64_t i = lo; i <= hi; i++) {
        const struct raft_entry *e = raft__entry(r, i);
        uint64_t sz = (uint64_t)e->len + 24;
        if (n > 0 && max_bytes != 0 && b + sz > max_bytes)
            break;
        b += sz;
        n++;
    }
    *bytes = b;
    return n;
}
