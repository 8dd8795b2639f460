/* codec_test.c - round trips, checksums, and rejection of malformed input. */
#include <string.h>

#include "cluster.h"
#include "raft/codec.h"
#include "unit.h"

static struct raft_entry ents[3];
static uint8_t d1[] = "hello", d2[] = "world!";

static struct raft_message sample(uint8_t type)
{
    struct raft_message m;
    memset(&m, 0, sizeof(m));
    m.type = type;
    m.from = 1;
    m.to = 300;
    m.term = 7;
    m.index = 1ULL << 40;
    m.log_term = 6;
    m.commit = 99;
    m.reject_hint = 5;
    m.hb_seq = 12345678901ULL;
    if (type == RAFT_MSG_APPEND) {
        ents[0] = (struct raft_entry){6, m.index + 1, RAFT_ENTRY_NORMAL, 5, d1};
        ents[1] = (struct raft_entry){7, m.index + 2, RAFT_ENTRY_NORMAL, 0, NULL};
        ents[2] = (struct raft_entry){7, m.index + 3, RAFT_ENTRY_CONF_CHANGE, 6, d2};
        m.entries = ents;
        m.n_entries = 3;
    }
    if (type == RAFT_MSG_READ_INDEX) {
        m.ctx = d1;
        m.ctx_len = 5;
    }
    if (type == RAFT_MSG_SNAPSHOT) {
        m.snapshot.meta.index = 1000;
        m.snapshot.meta.term = 6;
        m.snapshot.meta.conf.n_voters = 3;
        m.snapshot.meta.conf.voters[0] = 1;
        m.snapshot.meta.conf.voters[1] = 2;
        m.snapshot.meta.conf.voters[2] = UINT64_MAX;
        m.snapshot.meta.conf.n_learners = 1;
        m.snapshot.meta.conf.learners[0] = 4;
        m.snapshot.data = d2;
        m.snapshot.len = 6;
    }
    return m;
}

static bool same(const struct raft_message *a, const struct raft_message *b)
{
    if (a->type != b->type || a->from != b->from || a->to != b->to || a->term != b->term
        || a->index != b->index || a->log_term != b->log_term || a->commit != b->commit
        || a->reject != b->reject || a->reject_hint != b->reject_hint || a->hb_seq != b->hb_seq
        || a->flags != b->flags || a->n_entries != b->n_entries || a->ctx_len != b->ctx_len)
        return false;
    if (a->ctx_len && memcmp(a->ctx, b->ctx, a->ctx_len))
        return false;
    for (uint32_t i = 0; i < a->n_entries; i++) {
        const struct raft_entry *x = &a->entries[i], *y = &b->entries[i];
        if (x->term != y->term || x->index != y->index || x->type != y->type || x->len != y->len
            || (x->len && memcmp(x->data, y->data, x->len)))
            return false;
    }
    if (a->type == RAFT_MSG_SNAPSHOT
        && (memcmp(&a->snapshot.meta, &b->snapshot.meta, sizeof(a->snapshot.meta))
            || a->snapshot.len != b->snapshot.len
            || memcmp(a->snapshot.data, b->snapshot.data, a->snapshot.len)))
        return false;
    return true;
}

TEST(roundtrip_every_type)
{
    for (uint8_t t = 1; t <= RAFT_MSG_TYPE_MAX; t++) {
        struct raft_message m = sample(t), out;
        uint8_t buf[1024];
        size_t len;
        m.reject = t & 1;
        m.flags = (t == RAFT_MSG_VOTE) ? RAFT_MSG_FLAG_FORCE : 0;
        CHECK_EQ(raft_codec_encode(&m, buf, sizeof(buf), &len), 0);
        CHECK_EQ(len, raft_codec_size(&m));
        CHECK_EQ(raft_codec_decode(buf, len, &out), 0);
        CHECK(same(&m, &out));
        raft_codec_free(&out);
        CHECK_EQ(raft_codec_encode(&m, buf, len - 1, &len), RAFT_ETOOBIG);
    }
}

TEST(every_truncation_rejected)
{
    struct raft_message m = sample(RAFT_MSG_APPEND), out;
    uint8_t buf[512];
    size_t len;
    raft_codec_encode(&m, buf, sizeof(buf), &len);
    for (size_t n = 0; n < len; n++)
        CHECK(raft_codec_decode(buf, n, &out) < 0);
    /* and trailing garbage */
    buf[len] = 0;
    CHECK_EQ(raft_codec_decode(buf, len + 1, &out), RAFT_EMALFORMED);
}

TEST(entry_corruption_detected)
{
    struct raft_message m = sample(RAFT_MSG_APPEND), out;
    uint8_t buf[512];
    size_t len;
    int corrupt = 0, other = 0;
    raft_codec_encode(&m, buf, sizeof(buf), &len);
    /* flip every bit of the last entry's data ("world!") */
    for (size_t i = len - 10; i < len - 4; i++)
        for (int b = 0; b < 8; b++) {
            buf[i] ^= (uint8_t)(1 << b);
            int rv = raft_codec_decode(buf, len, &out);
            corrupt += rv == RAFT_ECORRUPT;
            other += rv == 0;
            if (rv == 0)
                raft_codec_free(&out);
            buf[i] ^= (uint8_t)(1 << b);
        }
    CHECK_EQ(corrupt, 48);
    CHECK_EQ(other, 0);
}

TEST(single_byte_flips_never_crash)
{
    struct raft_message m = sample(RAFT_MSG_SNAPSHOT), out;
    uint8_t buf[512];
    size_t len;
    raft_codec_encode(&m, buf, sizeof(buf), &len);
    for (size_t i = 0; i < len; i++)
        for (int v = 0; v < 256; v++) {
            uint8_t old = buf[i];
            buf[i] = (uint8_t)v;
            if (raft_codec_decode(buf, len, &out) == 0)
                raft_codec_free(&out);
            buf[i] = old;
        }
    CHECK(1);
}

TEST(malformed_headers_and_varints)
{
    struct raft_message out;
    const uint8_t bad_magic[] = {'X', 'R', 1, 1};
    const uint8_t bad_version[] = {'K', 'R', 9, 1};
    const uint8_t bad_type[] = {'K', 'R', 1, 99};
    const uint8_t zero_type[] = {'K', 'R', 1, 0};
    const uint8_t overlong[] = {'K', 'R', 1, 0x81, 0x00};
    uint8_t huge[16] = {'K', 'R', 1, 1, 0, 0};
    CHECK_EQ(raft_codec_decode(bad_magic, sizeof(bad_magic), &out), RAFT_EMALFORMED);
    CHECK_EQ(raft_codec_decode(bad_version, sizeof(bad_version), &out), RAFT_EMALFORMED);
    CHECK_EQ(raft_codec_decode(bad_type, sizeof(bad_type), &out), RAFT_EMALFORMED);
    CHECK_EQ(raft_codec_decode(zero_type, sizeof(zero_type), &out), RAFT_EMALFORMED);
    CHECK_EQ(raft_codec_decode(overlong, sizeof(overlong), &out), RAFT_EMALFORMED);
    /* an 11-byte varint for `from` */
    memset(huge + 6, 0xff, 10);
    CHECK_EQ(raft_codec_decode(huge, sizeof(huge), &out), RAFT_EMALFORMED);
    CHECK_EQ(raft_codec_decode(NULL, 0, &out), RAFT_EMALFORMED);
}

TEST(decoded_message_steps_into_raft)
{
    /* the codec sits between real nodes: run a cluster through it */
    struct tcluster tc;
    struct tc_config c;
    tc_default_config(&c);
    tc_init(&tc, 3, 0, 3, &c);
    raft_campaign(tc.nodes[1].r);
    for (int round = 0; round < 50; round++) {
        int work = 0;
        for (uint64_t i = 1; i <= 3; i++)
            work += tc_process(&tc, i);
        for (size_t i = 0; i < tc.nq; i++) {
            uint8_t buf[4096];
            size_t len;
            struct raft_message out;
            CHECK_EQ(raft_codec_encode(&tc.q[i], buf, sizeof(buf), &len), 0);
            CHECK_EQ(raft_codec_decode(buf, len, &out), 0);
            CHECK(same(&tc.q[i], &out));
            raft_step(tc.nodes[out.to].r, &out);
            raft_codec_free(&out);
            tc_msg_free(&tc.q[i]);
            work++;
        }
        tc.nq = 0;
        if (round == 5)
            raft_propose(tc.nodes[1].r, "via-codec", 9, NULL);
        if (!work)
            break;
    }
    CHECK_EQ(tc.nodes[3].n_applied, 2);
    tc_close(&tc);
}

UNIT_MAIN()
