/*
 * crc32c.c - CRC-32C, reflected polynomial 0x82F63B78. Every put's entry is checksummed
 * several times (the WAL record on each member, the peer message to each follower and its
 * check there), so the hot path uses the CPU instruction: 8 bytes per step instead of one
 * table lookup per byte.
 */
#include "crc32c/crc32c.h"

#include <string.h>

#define POLY 0x82F63B78u

/* The byte-at-a-time table, built by the compiler: no start-up step, no race. */
#define T1(c) (((c) & 1) ? ((c) >> 1) ^ POLY : (c) >> 1)
#define T8(c) T1(T1(T1(T1(T1(T1(T1(T1((uint32_t)(c)))))))))
#define R4(i) T8(i), T8((i) + 1), T8((i) + 2), T8((i) + 3)
#define R16(i) R4(i), R4((i) + 4), R4((i) + 8), R4((i) + 12)
#define R64(i) R16(i), R16((i) + 16), R16((i) + 32), R16((i) + 48)
static const uint32_t table[256] = {R64(0), R64(64), R64(128), R64(192)};

static uint32_t crc32c_portable(uint32_t crc, const uint8_t *p, size_t n)
{
	crc = ~crc;
	while (n--)
		crc = table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return ~crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("sse4.2"))) static uint32_t crc32c_sse42(uint32_t crc, const uint8_t *p, size_t n)
{
	uint64_t c = ~crc;
	for (; n && ((uintptr_t)p & 7); n--)
		c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
	for (; n >= 8; n -= 8, p += 8) {
		uint64_t w;
		memcpy(&w, p, 8);
		c = __builtin_ia32_crc32di(c, w);
	}
	for (; n; n--)
		c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
	return ~(uint32_t)c;
}

uint32_t crc32c(uint32_t crc, const void *data, size_t n)
{
	/* __builtin_cpu_supports reads what the runtime found at start-up: no state here. */
	if (__builtin_cpu_supports("sse4.2"))
		return crc32c_sse42(crc, data, n);
	return crc32c_portable(crc, data, n);
}
#else
uint32_t crc32c(uint32_t crc, const void *data, size_t n)
{
	return crc32c_portable(crc, data, n);
}
#endif
