/* codec.c - see codec.h. */
#include "raft/codec.h"

#include "crc32c/crc32c.h"

#include <stdlib.h>
#include <string.h>

/* ---- encoding ---- */

static size_t uvlen(uint64_t v)
{
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

static uint8_t *put_uv(uint8_t *p, uint64_t v)
{
    while (v >= 0x80) {
        *p++ = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    *p++ = (uint8_t)v;
    return p;
}

static size_t entry_size(const struct raft_entry *e)
{
    return uvlen(e->term) + uvlen(e->index) + uvlen(e->type) + uvlen(e->len) + e->len + 4;
}

size_t raft_codec_size(const struct raft_message *m)
{
    size_t n = 3;
    n += uvlen(m->type) + uvlen(m->flags) + uvlen(m->reject) + uvlen(m->from) + uvlen(m->to)
         + uvlen(m->term) + uvlen(m->index) + uvlen(m->log_term) + uvlen(m->commit)
         + uvlen(m->reject_hint) + uvlen(m->hb_seq);
    n += uvlen(m->ctx_len) + m->ctx_len;
    if (m->type == RAFT_MSG_SNAPSHOT) {
        const struct raft_snapshot *s = &m->snapshot;
        n += uvlen(s->meta.index) + uvlen(s->meta.term) + uvlen(s->meta.conf.n_voters)
             + uvlen(s->meta.conf.n_learners) + uvlen(s->len) + s->len;
        for (uint32_t i = 0; i < s->meta.conf.n_voters && i < RAFT_MAX_MEMBERS; i++)
            n += uvlen(s->meta.conf.voters[i]);
        for (uint32_t i = 0; i < s->meta.conf.n_learners && i < RAFT_MAX_MEMBERS; i++)
            n += uvlen(s->meta.conf.learners[i]);
    }
    n += uvlen(m->n_entries);
    for (uint32_t i = 0; i < m->n_entries; i++)
        n += entry_size(&m->entries[i]);
    return n;
}

int raft_codec_encode(const struct raft_message *m, uint8_t *buf, size_t cap, size_t *len)
{
    size_t need = raft_codec_size(m);
    uint8_t *p = buf;
    if (need > cap)
        return RAFT_ETOOBIG;
    if (m->snapshot.meta.conf.n_voters > RAFT_MAX_MEMBERS
        || m->snapshot.meta.conf.n_learners > RAFT_MAX_MEMBERS)
        return RAFT_EINVAL;
    *p++ = 'K';
    *p++ = 'R';
    *p++ = RAFT_CODEC_VERSION;
    p = put_uv(p, m->type);
    p = put_uv(p, m->flags);
    p = put_uv(p, m->reject);
    p = put_uv(p, m->from);
    p = put_uv(p, m->to);
    p = put_uv(p, m->term);
    p = put_uv(p, m->index);
    p = put_uv(p, m->log_term);
    p = put_uv(p, m->commit);
    p = put_uv(p, m->reject_hint);
    p = put_uv(p, m->hb_seq);
    p = put_uv(p, m->ctx_len);
    if (m->ctx_len) {
        memcpy(p, m->ctx, m->ctx_len);
        p += m->ctx_len;
    }
    if (m->type == RAFT_MSG_SNAPSHOT) {
        const struct raft_snapshot *s = &m->snapshot;
        p = put_uv(p, s->meta.index);
        p = put_uv(p, s->meta.term);
        p = put_uv(p, s->meta.conf.n_voters);
        for (uint32_t i = 0; i < s->meta.conf.n_voters; i++)
            p = put_uv(p, s->meta.conf.voters[i]);
        p = put_uv(p, s->meta.conf.n_learners);
        for (uint32_t i = 0; i < s->meta.conf.n_learners; i++)
            p = put_uv(p, s->meta.conf.learners[i]);
        p = put_uv(p, s->len);
        if (s->len) {
            memcpy(p, s->data, s->len);
            p += s->len;
        }
    }
    p = put_uv(p, m->n_entries);
    for (uint32_t i = 0; i < m->n_entries; i++) {
        const struct raft_entry *e = &m->entries[i];
        uint8_t *start = p;
        uint32_t crc;
        p = put_uv(p, e->term);
        p = put_uv(p, e->index);
        p = put_uv(p, e->type);
        p = put_uv(p, e->len);
        if (e->len) {
            memcpy(p, e->data, e->len);
            p += e->len;
        }
        crc = crc32c(0, start, (size_t)(p - start));
        for (int k = 0; k < 4; k++)
            *p++ = (uint8_t)(crc >> (8 * k));
    }
    *len = (size_t)(p - buf);
    return 0;
}

/* ---- decoding ---- */

struct rd {
    const uint8_t *p, *end;
    int err;
};

static uint64_t get_uv(struct rd *r)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        uint8_t b;
        if (r->p >= r->end) {
            r->err = RAFT_EMALFORMED;
            return 0;
        }
        b = *r->p++;
        if (shift == 63 && b > 1) {
            r->err = RAFT_EMALFORMED; /* overflows 64 bits */
            return 0;
        }
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            if (b == 0 && shift > 0)
                r->err = RAFT_EMALFORMED; /* overlong: one canonical encoding */
            return v;
        }
    }
    r->err = RAFT_EMALFORMED;
    return 0;
}

static uint64_t get_max(struct rd *r, uint64_t max)
{
    uint64_t v = get_uv(r);
    if (v > max)
        r->err = RAFT_EMALFORMED;
    return r->err ? 0 : v;
}

static const uint8_t *get_bytes(struct rd *r, uint64_t n)
{
    const uint8_t *p = r->p;
    if (r->err || n > (uint64_t)(r->end - r->p)) {
        r->err = RAFT_EMALFORMED;
        return NULL;
    }
    r->p += n;
    return n ? p : NULL;
}

int raft_codec_decode(const uint8_t *buf, size_t len, struct raft_message *m)
{
    struct rd r = {buf, buf + len, 0};
    uint64_t n;
    memset(m, 0, sizeof(*m));
    if (len < 3 || buf[0] != 'K' || buf[1] != 'R' || buf[2] != RAFT_CODEC_VERSION)
        return RAFT_EMALFORMED;
    r.p += 3;
    m->type = (uint8_t)get_max(&r, RAFT_MSG_TYPE_MAX);
    m->flags = (uint16_t)get_max(&r, RAFT_MSG_FLAG_FORCE);
    m->reject = (uint8_t)get_max(&r, 1);
    m->from = get_uv(&r);
    m->to = get_uv(&r);
    m->term = get_uv(&r);
    m->index = get_uv(&r);
    m->log_term = get_uv(&r);
    m->commit = get_uv(&r);
    m->reject_hint = get_uv(&r);
    m->hb_seq = get_uv(&r);
    m->ctx_len = (uint32_t)get_max(&r, 65536);
    m->ctx = (uint8_t *)get_bytes(&r, m->ctx_len);
    if (!r.err && m->type == 0)
        r.err = RAFT_EMALFORMED;
    if (!r.err && m->type == RAFT_MSG_SNAPSHOT) {
        struct raft_snapshot *s = &m->snapshot;
        s->meta.index = get_uv(&r);
        s->meta.term = get_uv(&r);
        s->meta.conf.n_voters = (uint32_t)get_max(&r, RAFT_MAX_MEMBERS);
        for (uint32_t i = 0; i < s->meta.conf.n_voters && !r.err; i++)
            s->meta.conf.voters[i] = get_uv(&r);
        s->meta.conf.n_learners = (uint32_t)get_max(&r, RAFT_MAX_MEMBERS);
        for (uint32_t i = 0; i < s->meta.conf.n_learners && !r.err; i++)
            s->meta.conf.learners[i] = get_uv(&r);
        s->len = (uint32_t)get_max(&r, UINT32_MAX);
        s->data = (uint8_t *)get_bytes(&r, s->len);
    }
    /* every entry takes at least 8 bytes: bounds the allocation */
    n = get_max(&r, (uint64_t)(r.end - r.p) / 8);
    if (!r.err && n > 0) {
        m->entries = calloc(n, sizeof(*m->entries));
        if (m->entries == NULL)
            r.err = RAFT_ENOMEM;
        else
            m->n_entries = (uint32_t)n;
    }
    for (uint64_t i = 0; i < n && !r.err; i++) {
        struct raft_entry *e = &m->entries[i];
        const uint8_t *start = r.p, *crcp;
        uint32_t want, got;
        e->term = get_uv(&r);
        e->index = get_uv(&r);
        e->type = (uint8_t)get_max(&r, RAFT_ENTRY_CONF_CHANGE);
        e->len = (uint32_t)get_max(&r, UINT32_MAX);
        e->data = (uint8_t *)get_bytes(&r, e->len);
        if (r.err)
            break;
        got = crc32c(0, start, (size_t)(r.p - start));
        crcp = get_bytes(&r, 4);
        if (r.err)
            break;
        want = (uint32_t)crcp[0] | (uint32_t)crcp[1] << 8 | (uint32_t)crcp[2] << 16
               | (uint32_t)crcp[3] << 24;
        if (want != got)
            r.err = RAFT_ECORRUPT;
    }
    if (!r.err && r.p != r.end)
        r.err = RAFT_EMALFORMED; /* trailing bytes */
    if (r.err) {
        free(m->entries);
        memset(m, 0, sizeof(*m));
        return r.err;
    }
    return 0;
}

void raft_codec_free(struct raft_message *m)
{
    free(m->entries);
    m->entries = NULL;
    m->n_entries = 0;
}
