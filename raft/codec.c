/* codec.c - see codec.h. */
#include "raft/codec.h"

#include <stdlib.h>
#include <string.h>

static const uint32_t crc_table[256] = {
    0x00000000u, 0xf26b8303u, 0xe13b70f7u, 0x1350f3f4u, 0xc79a971fu, 0x35f1141cu,
    0x26a1e7e8u, 0xd4ca64ebu, 0x8ad958cfu, 0x78b2dbccu, 0x6be22838u, 0x9989ab3bu,
    0x4d43cfd0u, 0xbf284cd3u, 0xac78bf27u, 0x5e133c24u, 0x105ec76fu, 0xe235446cu,
    0xf165b798u, 0x030e349bu, 0xd7c45070u, 0x25afd373u, 0x36ff2087u, 0xc494a384u,
    0x9a879fa0u, 0x68ec1ca3u, 0x7bbcef57u, 0x89d76c54u, 0x5d1d08bfu, 0xaf768bbcu,
    0xbc267848u, 0x4e4dfb4bu, 0x20bd8edeu, 0xd2d60dddu, 0xc186fe29u, 0x33ed7d2au,
    0xe72719c1u, 0x154c9ac2u, 0x061c6936u, 0xf477ea35u, 0xaa64d611u, 0x580f5512u,
    0x4b5fa6e6u, 0xb93425e5u, 0x6dfe410eu, 0x9f95c20du, 0x8cc531f9u, 0x7eaeb2fau,
    0x30e349b1u, 0xc288cab2u, 0xd1d83946u, 0x23b3ba45u, 0xf779deaeu, 0x05125dadu,
    0x1642ae59u, 0xe4292d5au, 0xba3a117eu, 0x4851927du, 0x5b016189u, 0xa96ae28au,
    0x7da08661u, 0x8fcb0562u, 0x9c9bf696u, 0x6ef07595u, 0x417b1dbcu, 0xb3109ebfu,
    0xa0406d4bu, 0x522bee48u, 0x86e18aa3u, 0x748a09a0u, 0x67dafa54u, 0x95b17957u,
    0xcba24573u, 0x39c9c670u, 0x2a993584u, 0xd8f2b687u, 0x0c38d26cu, 0xfe53516fu,
    0xed03a29bu, 0x1f682198u, 0x5125dad3u, 0xa34e59d0u, 0xb01eaa24u, 0x42752927u,
    0x96bf4dccu, 0x64d4cecfu, 0x77843d3bu, 0x85efbe38u, 0xdbfc821cu, 0x2997011fu,
    0x3ac7f2ebu, 0xc8ac71e8u, 0x1c661503u, 0xee0d9600u, 0xfd5d65f4u, 0x0f36e6f7u,
    0x61c69362u, 0x93ad1061u, 0x80fde395u, 0x72966096u, 0xa65c047du, 0x5437877eu,
    0x4767748au, 0xb50cf789u, 0xeb1fcbadu, 0x197448aeu, 0x0a24bb5au, 0xf84f3859u,
    0x2c855cb2u, 0xdeeedfb1u, 0xcdbe2c45u, 0x3fd5af46u, 0x7198540du, 0x83f3d70eu,
    0x90a324fau, 0x62c8a7f9u, 0xb602c312u, 0x44694011u, 0x5739b3e5u, 0xa55230e6u,
    0xfb410cc2u, 0x092a8fc1u, 0x1a7a7c35u, 0xe811ff36u, 0x3cdb9bddu, 0xceb018deu,
    0xdde0eb2au, 0x2f8b6829u, 0x82f63b78u, 0x709db87bu, 0x63cd4b8fu, 0x91a6c88cu,
    0x456cac67u, 0xb7072f64u, 0xa457dc90u, 0x563c5f93u, 0x082f63b7u, 0xfa44e0b4u,
    0xe9141340u, 0x1b7f9043u, 0xcfb5f4a8u, 0x3dde77abu, 0x2e8e845fu, 0xdce5075cu,
    0x92a8fc17u, 0x60c37f14u, 0x73938ce0u, 0x81f80fe3u, 0x55326b08u, 0xa759e80bu,
    0xb4091bffu, 0x466298fcu, 0x1871a4d8u, 0xea1a27dbu, 0xf94ad42fu, 0x0b21572cu,
    0xdfeb33c7u, 0x2d80b0c4u, 0x3ed04330u, 0xccbbc033u, 0xa24bb5a6u, 0x502036a5u,
    0x4370c551u, 0xb11b4652u, 0x65d122b9u, 0x97baa1bau, 0x84ea524eu, 0x7681d14du,
    0x2892ed69u, 0xdaf96e6au, 0xc9a99d9eu, 0x3bc21e9du, 0xef087a76u, 0x1d63f975u,
    0x0e330a81u, 0xfc588982u, 0xb21572c9u, 0x407ef1cau, 0x532e023eu, 0xa145813du,
    0x758fe5d6u, 0x87e466d5u, 0x94b49521u, 0x66df1622u, 0x38cc2a06u, 0xcaa7a905u,
    0xd9f75af1u, 0x2b9cd9f2u, 0xff56bd19u, 0x0d3d3e1au, 0x1e6dcdeeu, 0xec064eedu,
    0xc38d26c4u, 0x31e6a5c7u, 0x22b65633u, 0xd0ddd530u, 0x0417b1dbu, 0xf67c32d8u,
    0xe52cc12cu, 0x1747422fu, 0x49547e0bu, 0xbb3ffd08u, 0xa86f0efcu, 0x5a048dffu,
    0x8ecee914u, 0x7ca56a17u, 0x6ff599e3u, 0x9d9e1ae0u, 0xd3d3e1abu, 0x21b862a8u,
    0x32e8915cu, 0xc083125fu, 0x144976b4u, 0xe622f5b7u, 0xf5720643u, 0x07198540u,
    0x590ab964u, 0xab613a67u, 0xb831c993u, 0x4a5a4a90u, 0x9e902e7bu, 0x6cfbad78u,
    0x7fab5e8cu, 0x8dc0dd8fu, 0xe330a81au, 0x115b2b19u, 0x020bd8edu, 0xf0605beeu,
    0x24aa3f05u, 0xd6c1bc06u, 0xc5914ff2u, 0x37faccf1u, 0x69e9f0d5u, 0x9b8273d6u,
    0x88d28022u, 0x7ab90321u, 0xae7367cau, 0x5c18e4c9u, 0x4f48173du, 0xbd23943eu,
    0xf36e6f75u, 0x0105ec76u, 0x12551f82u, 0xe03e9c81u, 0x34f4f86au, 0xc69f7b69u,
    0xd5cf889du, 0x27a40b9eu, 0x79b737bau, 0x8bdcb4b9u, 0x988c474du, 0x6ae7c44eu,
    0xbe2da0a5u, 0x4c4623a6u, 0x5f16d052u, 0xad7d5351u,
};

uint32_t raft_crc32c(uint32_t crc, const uint8_t *p, size_t n)
{
    crc = ~crc;
    while (n--)
        crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

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
        crc = raft_crc32c(0, start, (size_t)(p - start));
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
        got = raft_crc32c(0, start, (size_t)(r.p - start));
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
