/*
 * status.c - `snapshot status FILE [-w simple|table|json|fields]`, printed byte for byte as
 * etcdctl 3.4 prints it (its makeDBStatusTable, tablewriter with right-aligned cells,
 * go-humanize's Bytes, encoding/json of snapshot.Status).
 */
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "tools/keelsonutl/keelsonutl.h"

void ku_human_bytes(uint64_t n, char *out, size_t len)
{
	/* go-humanize Bytes: SI units, one decimal below 10. */
	static const char *const sizes[] = {"B", "kB", "MB", "GB", "TB", "PB", "EB"};
	if (n < 10) {
		snprintf(out, len, "%llu B", (unsigned long long)n);
		return;
	}
	double e = floor(log((double)n) / log(1000.0));
	double val = floor((double)n / pow(1000.0, e) * 10 + 0.5) / 10;
	snprintf(out, len, val < 10 ? "%.1f %s" : "%.0f %s", val, sizes[(int)e]);
}

/* tablewriter's header cell: centred, the odd space on the right. */
static void cell_center(const char *s, size_t w)
{
	size_t gap = w - strlen(s), left = gap / 2;
	printf(" %*s%s%*s |", (int)left, "", s, (int)(gap - left), "");
}

static void print_table(char *const *row)
{
	static const char *const hdr[] = {"HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE"};
	size_t w[4];
	for (int i = 0; i < 4; i++) {
		w[i] = strlen(hdr[i]);
		if (strlen(row[i]) > w[i])
			w[i] = strlen(row[i]);
	}
	char line[256];
	size_t off = 0;
	line[off++] = '+';
	for (int i = 0; i < 4; i++) {
		memset(line + off, '-', w[i] + 2);
		off += w[i] + 2;
		line[off++] = '+';
	}
	line[off] = '\0';
	printf("%s\n|", line);
	for (int i = 0; i < 4; i++)
		cell_center(hdr[i], w[i]);
	printf("\n%s\n|", line);
	for (int i = 0; i < 4; i++)
		printf(" %*s |", (int)w[i], row[i]);
	printf("\n%s\n", line);
}

int ku_cmd_snapshot_status(int argc, char **argv)
{
	const char *w = NULL, *wl = NULL;
	int skip = 0;
	ku_flag flags[] = {
		{"w", KU_FLAG_STR, &w, NULL},
		{"write-out", KU_FLAG_STR, &wl, NULL},
		{"skip-hash-check", KU_FLAG_BOOL, NULL, &skip},
		{NULL, 0, NULL, NULL},
	};
	char *pos[2];
	int npos;
	char eb[KU_ERRLEN];
	int rc = ku_flags_parse(argc, argv, flags, pos, 2, &npos, eb, sizeof(eb));
	if (rc == 0 && npos != 1)
		rc = ku_errf(eb, sizeof(eb), KU_ERR_USAGE, "snapshot status requires exactly one argument");
	const char *fmt = wl ? wl : w ? w : "simple";
	if (rc == 0 && strcmp(fmt, "simple") && strcmp(fmt, "table") && strcmp(fmt, "json") &&
	    strcmp(fmt, "fields"))
		rc = ku_errf(eb, sizeof(eb), KU_ERR_USAGE, "unknown output format %s (simple, table, json, fields)",
			     fmt);
	if (rc) {
		fprintf(stderr, "Error: %s\n", eb);
		return 2;
	}
	char tmp[4096];
	const char *plain;
	if ((rc = ku_open_snapshot(pos[0], NULL, tmp, sizeof(tmp), &plain, eb, sizeof(eb)))) {
		fprintf(stderr, "Error: %s\n", eb);
		return 1;
	}
	storage_etcd_file_info in;
	/* A trailer that is there is verified (etcdctl does not look at it): a damaged file
	 * should not look fine. --skip-hash-check for a file someone appended to. */
	int err = storage_etcd_check(plain, skip ? STORAGE_ETCD_HASH_SKIP : STORAGE_ETCD_HASH_IF_PRESENT,
				     &in, eb, sizeof(eb));
	if (tmp[0])
		unlink(tmp);
	if (err) {
		fprintf(stderr, "Error: %s\n", eb[0] ? eb : storage_strerror(err));
		return 1;
	}
	char hash[16], revs[32], keys[32], size[32];
	snprintf(hash, sizeof(hash), "%x", in.ef_hash);
	snprintf(revs, sizeof(revs), "%lld", (long long)in.ef_revision);
	snprintf(keys, sizeof(keys), "%llu", (unsigned long long)in.ef_total_keys);
	ku_human_bytes(in.ef_total_size, size, sizeof(size));
	char *row[4] = {hash, revs, keys, size};
	if (strcmp(fmt, "simple") == 0) {
		printf("%s, %s, %s, %s\n", hash, revs, keys, size);
	} else if (strcmp(fmt, "table") == 0) {
		print_table(row);
	} else if (strcmp(fmt, "json") == 0) {
		printf("{\"hash\":%u,\"revision\":%lld,\"totalKey\":%llu,\"totalSize\":%llu}\n", in.ef_hash,
		       (long long)in.ef_revision, (unsigned long long)in.ef_total_keys,
		       (unsigned long long)in.ef_total_size);
	} else {
		printf("\"Hash\" : %u\n\"Revision\" : %lld\n\"Keys\" : %llu\n\"Size\" : %llu\n", in.ef_hash,
		       (long long)in.ef_revision, (unsigned long long)in.ef_total_keys,
		       (unsigned long long)in.ef_total_size);
	}
	return 0;
}
