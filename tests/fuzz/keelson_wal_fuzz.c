/*
 * keelson_wal_fuzz.c - libFuzzer target: arbitrary bytes as Keelson's own WAL segments
 * (storage/wal.c, member/keelson-wal/) into its decoder. The first 8 bytes are LMDB's
 * snapshot index (big-endian, to exercise clears); the rest splits into up to four segments
 * at "\xffSEG\xff". Whatever the bytes, the decoder must return an error or a log whose
 * entries are contiguous and lie inside the input, with the tail inside the last segment;
 * never crash, read out of bounds or leak.
 */
#define _GNU_SOURCE /* memmem */
#include <stdlib.h>
#include <string.h>

#include "storage/internal.h"

#define SEP "\xff" "SEG\xff"
#define MAX_SEGS 4

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 8)
		return 0;
	uint64_t snap = be64_get(data);
	const uint8_t *segs[MAX_SEGS];
	size_t lens[MAX_SEGS], n = 0;
	const uint8_t *p = data + 8, *end = data + size;
	while (n < MAX_SEGS) {
		const uint8_t *s = n + 1 < MAX_SEGS ? memmem(p, (size_t)(end - p), SEP, 5) : NULL;
		segs[n] = p;
		lens[n] = s ? (size_t)(s - p) : (size_t)(end - p);
		n++;
		if (s == NULL)
			break;
		p = s + 5;
	}
	storage__wal_log l;
	size_t tail;
	int clean;
	int err = storage__wal_decode(segs, lens, n, snap, &l, &tail, &clean);
	if (err) {
		if (err != STORAGE_ERR_CORRUPT && err != STORAGE_ERR_NOMEM)
			abort();
		return 0;
	}
	if (tail > lens[n - 1])
		abort();
	for (size_t i = 0; i < l.wl_n; i++) {
		const storage_log_entry *e = &l.wl_e[i];
		if (i > 0 && e->le_index != l.wl_e[i - 1].le_index + 1)
			abort();
		if (e->le_len && (e->le_data < data || e->le_data + e->le_len > end))
			abort();
	}
	storage__wal_log_free(&l);
	return 0;
}
