/* raft_decode_fuzz.c - libFuzzer target: arbitrary bytes into the wire
 * decoder; anything it accepts must re-encode to the same bytes (one
 * canonical encoding) and be safe to feed to raft_step(). */
#include <stdlib.h>
#include <string.h>

#include "raft/codec.h"
#include "raft/raft.h"

static struct raft *node;

static void init_node(void)
{
    struct raft_config c;
    memset(&c, 0, sizeof(c));
    c.id = 1;
    c.conf.n_voters = 3;
    c.conf.voters[0] = 1;
    c.conf.voters[1] = 2;
    c.conf.voters[2] = 3;
    c.election_tick = 10;
    c.heartbeat_tick = 1;
    c.max_inflight_msgs = 4;
    c.prevote = true;
    c.check_quorum = true;
    if (raft_init(&node, &c) != 0)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct raft_message m;
    if (node == NULL)
        init_node();
    if (raft_codec_decode(data, size, &m) != 0)
        return 0;
    size_t n = raft_codec_size(&m), len = 0;
    uint8_t *buf = malloc(n);
    if (raft_codec_encode(&m, buf, n, &len) != 0 || len != size || memcmp(buf, data, size) != 0)
        abort(); /* decode accepted something that is not canonical */
    free(buf);
    raft_step(node, &m);
    if (raft_has_ready(node)) {
        struct raft_ready rd;
        if (raft_ready(node, &rd) == 0)
            raft_advance(node, &rd);
    }
    raft_codec_free(&m);
    return 0;
}
