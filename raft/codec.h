/*
 * codec.h - wire encoding of struct raft_message (target //raft:codec).
 *
 * Hand-written, dependency-free: a 3-byte header ("KR", version 1), then
 * LEB128 varints for every integer field, length-prefixed byte strings, and
 * for each entry a CRC32C (Castagnoli) over that entry's encoded bytes.
 * Layout (v1):
 *   'K' 'R' 0x01
 *   type flags reject from to term index log_term commit reject_hint hb_seq
 *   ctx_len ctx[ctx_len]
 *   if type == SNAPSHOT: index term n_voters voters.. n_learners learners..
 *                        data_len data[data_len]
 *   n_entries { term index type len data[len] crc32c(4 bytes LE) }*
 * The decoder accepts exactly one message filling the buffer and rejects
 * anything else: bad header, truncation, overlong or overflowing varints,
 * out-of-range fields, trailing bytes (RAFT_EMALFORMED) and checksum
 * mismatches (RAFT_ECORRUPT). It never reads outside the buffer.
 */
#ifndef KEELSON_RAFT_CODEC_H
#define KEELSON_RAFT_CODEC_H

#include "raft/raft.h"

#ifdef __cplusplus
extern "C" {
#endif

#define RAFT_CODEC_VERSION 1

/* Exact number of bytes raft_codec_encode() writes for m. */
size_t raft_codec_size(const struct raft_message *m);

/* Encodes m into buf (cap bytes). Returns 0 and *len, or RAFT_ETOOBIG if
 * cap is too small. */
int raft_codec_encode(const struct raft_message *m, uint8_t *buf, size_t cap, size_t *len);

/* Decodes buf into *m. On success the entries array is allocated (free it
 * with raft_codec_free()) and every data/ctx pointer in *m points INTO buf:
 * *m is valid while buf is. On error *m is zeroed and nothing is allocated. */
int raft_codec_decode(const uint8_t *buf, size_t len, struct raft_message *m);

/* Frees what raft_codec_decode() allocated (not buf). */
void raft_codec_free(struct raft_message *m);

#ifdef __cplusplus
}
#endif
#endif
