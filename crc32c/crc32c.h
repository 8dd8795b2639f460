/*
 * crc32c.h - CRC-32C (Castagnoli), the checksum of etcd's WAL and hashes and of Keelson's WAL
 * and peer messages: Go's crc32.Update(crc, crc32.MakeTable(crc32.Castagnoli), data).
 */
#ifndef KEELSON_CRC32C_H
#define KEELSON_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Continues crc (0 to start) over n bytes of data. Pure; safe from any thread. Uses the
 * CPU's crc32 instruction where there is one (x86-64 SSE4.2), a table otherwise. */
uint32_t crc32c(uint32_t crc, const void *data, size_t n);

#endif
