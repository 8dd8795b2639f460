/*
 * etcd_wal_fuzz.c - libFuzzer target: arbitrary bytes as etcd WAL files into the decoder
 * (storage/etcdwal.c). The input is split into up to four files at the byte sequence
 * "\xffFILE\xff" (so the seeds are real WAL files joined with it). Whatever the bytes, the
 * decoder must return an error or a log whose entries are contiguous and lie inside the
 * input, never crash, read out of bounds or leak.
 */
#define _GNU_SOURCE /* memmem */
#include <stdlib.h>
#include <string.h>

#include "storage/storage.h"

#define SEP "\xff" "FILE\xff"
#define MAX_FILES 4

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const uint8_t *files[MAX_FILES];
	size_t lens[MAX_FILES], n = 0;
	const uint8_t *p = data, *end = data + size;
	while (n < MAX_FILES) {
		const uint8_t *s = n + 1 < MAX_FILES ? memmem(p, (size_t)(end - p), SEP, 6) : NULL;
		files[n] = p;
		lens[n] = s ? (size_t)(s - p) : (size_t)(end - p);
		n++;
		if (s == NULL)
			break;
		p = s + 6;
	}
	storage_etcd_wal w;
	char eb[256];
	if (storage_etcd_wal_decode(files, lens, n, &w, eb, sizeof(eb)) != 0) {
		if (eb[0] == '\0')
			abort(); /* every refusal says why */
		return 0;
	}
	for (size_t i = 0; i < w.ew_n_entries; i++) {
		const storage_etcd_wal_entry *e = &w.ew_entries[i];
		if (i > 0 && e->we_index != w.ew_entries[i - 1].we_index + 1)
			abort();
		if (storage_etcd_wal_entry_at(&w, e->we_index) != e)
			abort();
		if (e->we_len && (e->we_data < data || e->we_data + e->we_len > end))
			abort();
	}
	storage_etcd_wal_free(&w);
	return 0;
}
