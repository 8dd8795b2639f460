/* membership.c - configurations and single-server changes (thesis 4.1).
 *
 * A CONF_CHANGE entry holds the change and the complete configuration it
 * produces; the latest such entry in a server's log (else its snapshot's
 * configuration) is the configuration that server uses, whether or not the
 * entry is committed. Truncating the entry reverts the configuration. */
#include <string.h>

#include "core.h"

static bool in_list(const uint64_t *ids, uint32_t n, uint64_t id)
{
    for (uint32_t i = 0; i < n; i++)
        if (ids[i] == id)
            return true;
    return false;
}

bool raft__conf_is_voter(const struct raft_conf *c, uint64_t id)
{
    return in_list(c->voters, c->n_voters, id);
}

bool raft__conf_is_learner(const struct raft_conf *c, uint64_t id)
{
    return in_list(c->learners, c->n_learners, id);
}

/* Distinct non-zero ids, at most RAFT_MAX_MEMBERS in all, >= 1 voter. */
bool raft__conf_valid(const struct raft_conf *c)
{
    if (c->n_voters == 0 || c->n_voters > RAFT_MAX_MEMBERS || c->n_learners > RAFT_MAX_MEMBERS
        || c->n_voters + c->n_learners > RAFT_MAX_MEMBERS)
        return false;
    for (uint32_t i = 0; i < c->n_voters; i++)
        if (c->voters[i] == RAFT_NONE || in_list(c->voters, i, c->voters[i]))
            return false;
    for (uint32_t i = 0; i < c->n_learners; i++)
        if (c->learners[i] == RAFT_NONE || in_list(c->learners, i, c->learners[i])
            || in_list(c->voters, c->n_voters, c->learners[i]))
            return false;
    return true;
}

static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

/* Layout: op u8 | node u64le | n_voters u8 | voters u64le.. | n_learners u8 | learners.. */
int raft__conf_encode(struct raft *r, uint8_t op, uint64_t node, const struct raft_conf *c,
                      uint8_t **data, uint32_t *len)
{
    uint32_t n = 1 + 8 + 1 + 8 * c->n_voters + 1 + 8 * c->n_learners;
    uint8_t *p = raft__malloc(r, n), *q;
    if (p == NULL)
        return RAFT_ENOMEM;
    q = p;
    *q++ = op;
    put64(q, node);
    q += 8;
    *q++ = (uint8_t)c->n_voters;
    for (uint32_t i = 0; i < c->n_voters; i++, q += 8)
        put64(q, c->voters[i]);
    *q++ = (uint8_t)c->n_learners;
    for (uint32_t i = 0; i < c->n_learners; i++, q += 8)
        put64(q, c->learners[i]);
    *data = p;
    *len = n;
    return 0;
}

int raft_conf_change_decode(const struct raft_entry *e, struct raft_conf_change *cc)
{
    const uint8_t *p = e->data;
    uint32_t left = e->len;
    if (e->type != RAFT_ENTRY_CONF_CHANGE || left < 11 || p == NULL)
        return RAFT_EMALFORMED;
    memset(cc, 0, sizeof(*cc));
    cc->op = p[0];
    cc->node = get64(p + 1);
    cc->conf.n_voters = p[9];
    p += 10;
    left -= 10;
    if (cc->conf.n_voters > RAFT_MAX_MEMBERS || left < 8 * cc->conf.n_voters + 1)
        return RAFT_EMALFORMED;
    for (uint32_t i = 0; i < cc->conf.n_voters; i++, p += 8)
        cc->conf.voters[i] = get64(p);
    left -= 8 * cc->conf.n_voters;
    cc->conf.n_learners = *p++;
    left--;
    if (cc->conf.n_learners > RAFT_MAX_MEMBERS || left != 8 * cc->conf.n_learners)
        return RAFT_EMALFORMED;
    for (uint32_t i = 0; i < cc->conf.n_learners; i++, p += 8)
        cc->conf.learners[i] = get64(p);
    if (cc->op < RAFT_CONF_ADD_VOTER || cc->op > RAFT_CONF_REMOVE || !raft__conf_valid(&cc->conf))
        return RAFT_EMALFORMED;
    return 0;
}

/* Recomputes r->conf from the log and reshapes the progress table. Adding
 * members allocates; on failure the error is sticky. */
int raft__conf_refresh(struct raft *r)
{
    struct raft_conf c = r->snap.meta.conf;
    uint64_t last = raft__last_index(r);
    for (uint64_t i = last; i > r->snap.meta.index; i--) {
        const struct raft_entry *e = raft__entry(r, i);
        struct raft_conf_change cc;
        if (e->type == RAFT_ENTRY_CONF_CHANGE && raft_conf_change_decode(e, &cc) == 0) {
            c = cc.conf;
            break;
        }
    }
    r->conf = c;
    /* drop members that left */
    for (uint32_t i = 0; i < r->n_prs;) {
        struct raft__progress *pr = &r->prs[i];
        if (!raft__conf_is_voter(&c, pr->pr_id) && !raft__conf_is_learner(&c, pr->pr_id)) {
            raft__free(r, pr->pr_ins.buf);
            r->prs[i] = r->prs[--r->n_prs];
            continue;
        }
        pr->pr_learner = raft__conf_is_learner(&c, pr->pr_id);
        i++;
    }
    /* add newcomers */
    for (uint32_t k = 0; k < c.n_voters + c.n_learners; k++) {
        uint64_t id = k < c.n_voters ? c.voters[k] : c.learners[k - c.n_voters];
        struct raft__progress *pr;
        if (raft__pr_find(r, id) != NULL)
            continue;
        pr = &r->prs[r->n_prs];
        memset(pr, 0, sizeof(*pr));
        if (raft__ins_init(r, &pr->pr_ins, r->max_inflight_msgs) != 0)
            return RAFT_ENOMEM;
        r->n_prs++;
        pr->pr_id = id;
        pr->pr_learner = k >= c.n_voters;
        pr->pr_next = last + 1;
        pr->pr_state = RAFT_PROGRESS_PROBE;
        /* A newcomer counts as active so CheckQuorum does not depose a
         * leader right after a change (etcd does the same). */
        pr->pr_recent_active = true;
        if (id == r->id)
            pr->pr_match = r->stable;
    }
    return 0;
}

/* Whether this node may campaign: a voter of its latest configuration. */
bool raft__promotable(const struct raft *r)
{
    return raft__conf_is_voter(&r->conf, r->id);
}

int raft_propose_conf_change(struct raft *r, enum raft_conf_op op, uint64_t node,
                             uint64_t *index)
{
    struct raft_conf c;
    struct raft_entry e;
    int rv;
    RAFT__ENTER(r);
    if (r->role != RAFT_LEADER)
        return RAFT_ENOTLEADER;
    if (node == RAFT_NONE)
        return RAFT_EINVAL;
    /* One change at a time, and not before the first commit in this term
     * (thesis 4.1 and its 2015 errata on single-server changes). */
    if (r->pending_conf_index > r->commit || r->lead_transferee != RAFT_NONE
        || !raft__match_term(r, r->commit, r->term))
        return RAFT_EBUSY;
    c = r->conf;
    switch (op) {
    case RAFT_CONF_ADD_VOTER:
        if (raft__conf_is_voter(&c, node))
            return RAFT_EINVAL;
        if (raft__conf_is_learner(&c, node)) {
            for (uint32_t i = 0; i < c.n_learners; i++)
                if (c.learners[i] == node)
                    c.learners[i] = c.learners[--c.n_learners];
        } else if (c.n_voters + c.n_learners >= RAFT_MAX_MEMBERS) {
            return RAFT_EINVAL;
        }
        c.voters[c.n_voters++] = node;
        break;
    case RAFT_CONF_ADD_LEARNER:
        if (raft__conf_is_voter(&c, node) || raft__conf_is_learner(&c, node)
            || c.n_voters + c.n_learners >= RAFT_MAX_MEMBERS)
            return RAFT_EINVAL;
        c.learners[c.n_learners++] = node;
        break;
    case RAFT_CONF_REMOVE:
        if (node == r->id)
            return RAFT_EINVAL;
        if (raft__conf_is_voter(&c, node)) {
            for (uint32_t i = 0; i < c.n_voters; i++)
                if (c.voters[i] == node)
                    c.voters[i] = c.voters[--c.n_voters];
        } else if (raft__conf_is_learner(&c, node)) {
            for (uint32_t i = 0; i < c.n_learners; i++)
                if (c.learners[i] == node)
                    c.learners[i] = c.learners[--c.n_learners];
        } else {
            return RAFT_EINVAL;
        }
        break;
    default:
        return RAFT_EINVAL;
    }
    if (!raft__conf_valid(&c))
        return RAFT_EINVAL;
    memset(&e, 0, sizeof(e));
    e.type = RAFT_ENTRY_CONF_CHANGE;
    e.term = r->term;
    rv = raft__conf_encode(r, (uint8_t)op, node, &c, &e.data, &e.len);
    if (rv != 0)
        return r->err = rv;
    rv = raft__append_local(r, &e, 1);
    raft__free(r, e.data);
    if (rv != 0)
        return rv;
    r->pending_conf_index = raft__last_index(r);
    if (index)
        *index = r->pending_conf_index;
    return 0;
}
