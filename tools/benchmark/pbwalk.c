/*
 * pbwalk.c - a minimal protobuf wire walker. The load generator reads large responses (watch
 * batches, LIST pages) in place with it: protobuf-c's unpack copies every bytes field and
 * allocates every message, which on the cores the servers share costs more than it measures.
 */
#include "tools/benchmark/bench.h"

static int pb_varint(const uint8_t **p, const uint8_t *end, uint64_t *v)
{
	uint64_t r = 0;
	for (int sh = 0; sh < 64 && *p < end; sh += 7) {
		uint8_t b = *(*p)++;
		r |= (uint64_t)(b & 0x7f) << sh;
		if (!(b & 0x80)) {
			*v = r;
			return 0;
		}
	}
	return -1;
}

int bench_pb_next(const uint8_t **p, const uint8_t *end, struct bench_pbf *f)
{
	if (*p >= end)
		return 0;
	uint64_t tag;
	if (pb_varint(p, end, &tag) != 0)
		return -1;
	f->num = (uint32_t)(tag >> 3);
	f->wt = (int)(tag & 7);
	switch (f->wt) {
	case 0:
		return pb_varint(p, end, &f->v) == 0 ? 1 : -1;
	case 1:
		if (end - *p < 8)
			return -1;
		*p += 8;
		return 1;
	case 5:
		if (end - *p < 4)
			return -1;
		*p += 4;
		return 1;
	case 2: {
		uint64_t l;
		if (pb_varint(p, end, &l) != 0 || l > (uint64_t)(end - *p))
			return -1;
		f->p = *p;
		f->len = (size_t)l;
		*p += l;
		return 1;
	}
	default:
		return -1;
	}
}
