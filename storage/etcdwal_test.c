/*
 * etcdwal_test.c - the etcd WAL reader: a real etcd 3.4 WAL (testdata/etcd34_wal, the
 * written part of a single member's first file after `put a 1`, `put b 2`, `lease grant`,
 * `user add root`, `role add r1`), and files built here with etcd's encoder rules, whole
 * and damaged in each way the reader must refuse or, for a torn tail, accept.
 */
#define _GNU_SOURCE /* memmem */
#include <string.h>
#include <sys/stat.h>

#include "crc32c/crc32c.h"
#include "storage/internal.h"
#include "storage/testutil.h"

/* ---- an encoder, as etcd's wal/encoder.go ---- */

typedef struct wbuf {
	uint8_t b[1 << 16];
	size_t n;
} wbuf;

static uint8_t *put_varint(uint8_t *p, uint64_t v)
{
	while (v >= 0x80) {
		*p++ = (uint8_t)(v | 0x80);
		v >>= 7;
	}
	*p++ = (uint8_t)v;
	return p;
}

static uint32_t chain; /* the running CRC of the file set being built */
static size_t last_start; /* where the last record's frame starts */

static void record(wbuf *w, uint64_t type, const uint8_t *data, size_t len)
{
	uint8_t rec[4096], *p = rec;
	uint32_t crc = type == 4 ? chain : (chain = crc32c(chain, data, len));
	p = put_varint(p, 1 << 3);
	p = put_varint(p, type);
	p = put_varint(p, 2 << 3);
	p = put_varint(p, crc);
	if (len) {
		p = put_varint(p, 3 << 3 | 2);
		p = put_varint(p, len);
		memcpy(p, data, len);
		p += len;
	}
	size_t n = (size_t)(p - rec), pad = (8 - n % 8) % 8;
	uint64_t word = n | (pad ? (uint64_t)(0x80 | pad) << 56 : 0);
	last_start = w->n;
	for (int i = 0; i < 8; i++)
		w->b[w->n++] = (uint8_t)(word >> (8 * i));
	memcpy(w->b + w->n, rec, n);
	w->n += n;
	memset(w->b + w->n, 0, pad);
	w->n += pad;
}

static size_t msg3(uint8_t *out, uint64_t a, uint64_t b, uint64_t c)
{
	uint8_t *p = out;
	p = put_varint(p, 1 << 3);
	p = put_varint(p, a);
	p = put_varint(p, 2 << 3);
	p = put_varint(p, b);
	p = put_varint(p, 3 << 3);
	p = put_varint(p, c);
	return (size_t)(p - out);
}

static void metadata(wbuf *w, uint64_t node, uint64_t cluster)
{
	uint8_t m[32];
	uint8_t *p = m;
	p = put_varint(p, 1 << 3);
	p = put_varint(p, node);
	p = put_varint(p, 2 << 3);
	p = put_varint(p, cluster);
	record(w, 1, m, (size_t)(p - m));
}

static void entry(wbuf *w, uint64_t term, uint64_t index, const char *data)
{
	uint8_t m[2048];
	size_t n = msg3(m, 0, term, index); /* Type, Term, Index */
	uint8_t *p = m + n;
	p = put_varint(p, 4 << 3 | 2);
	p = put_varint(p, strlen(data));
	memcpy(p, data, strlen(data));
	record(w, 2, m, (size_t)(p - m) + strlen(data));
}

static void state(wbuf *w, uint64_t term, uint64_t vote, uint64_t commit)
{
	uint8_t m[32];
	record(w, 3, m, msg3(m, term, vote, commit));
}

static void snapshot(wbuf *w, uint64_t index, uint64_t term)
{
	uint8_t m[32];
	uint8_t *p = m;
	p = put_varint(p, 1 << 3);
	p = put_varint(p, index);
	p = put_varint(p, 2 << 3);
	p = put_varint(p, term);
	record(w, 5, m, (size_t)(p - m));
}

/* Two files as etcd writes them: the first from the start, the second after a cut. */
static void build(wbuf *f0, wbuf *f1)
{
	memset(f0, 0, sizeof(*f0));
	memset(f1, 0, sizeof(*f1));
	chain = 0;
	record(f0, 4, NULL, 0);
	metadata(f0, 0x1111, 0x2222);
	snapshot(f0, 0, 0);
	entry(f0, 1, 1, "one");
	entry(f0, 1, 2, "two");
	state(f0, 1, 0x1111, 2);
	record(f1, 4, NULL, 0); /* carries the chain so far */
	metadata(f1, 0x1111, 0x2222);
	state(f1, 1, 0x1111, 2);
	entry(f1, 2, 3, "three");
	entry(f1, 2, 4, "four");
	state(f1, 2, 0x1111, 4);
}

static int decode2(wbuf *f0, wbuf *f1, storage_etcd_wal *w, char *eb)
{
	const uint8_t *files[2] = {f0->b, f1->b};
	size_t lens[2] = {f0->n, f1->n};
	return storage_etcd_wal_decode(files, lens, 2, w, eb, 256);
}

static void test_real(void)
{
	storage_etcd_wal w;
	char eb[256] = "";
	int rc = storage_etcd_wal_read("storage/testdata/etcd34_wal", &w, eb, sizeof(eb));
	if (rc)
		fprintf(stderr, "real wal: %s\n", eb);
	CHECK_EQ(rc, 0);
	/* etcd's log of that run: local-member-id bdae9bbc11dd390d, cluster-id d1cfaf999eb97a2a */
	CHECK(w.ew_node_id == 0xbdae9bbc11dd390dULL);
	CHECK(w.ew_cluster_id == 0xd1cfaf999eb97a2aULL);
	CHECK_EQ(w.ew_term, 2);
	CHECK(w.ew_vote == 0xbdae9bbc11dd390dULL);
	CHECK_EQ(w.ew_commit, 9);
	CHECK_EQ(w.ew_n_entries, 9);
	CHECK_EQ(w.ew_torn_tail, 0);
	const storage_etcd_wal_entry *e = storage_etcd_wal_entry_at(&w, 1);
	CHECK(e != NULL && e->we_type == STORAGE_ETCD_ENTRY_CONF_CHANGE && e->we_term == 1);
	e = storage_etcd_wal_entry_at(&w, 2);
	CHECK(e != NULL && e->we_type == STORAGE_ETCD_ENTRY_NORMAL && e->we_len == 0);
	CHECK(storage_etcd_wal_entry_at(&w, 10) == NULL);
	CHECK(storage_etcd_wal_entry_at(&w, 0) == NULL);
	storage_etcd_wal_free(&w);
}

static void test_whole(void)
{
	static wbuf f0, f1;
	storage_etcd_wal w;
	char eb[256] = "";
	build(&f0, &f1);
	CHECK_EQ(decode2(&f0, &f1, &w, eb), 0);
	CHECK_EQ(w.ew_n_entries, 4);
	CHECK_EQ(w.ew_commit, 4);
	CHECK_EQ(w.ew_term, 2);
	CHECK(w.ew_node_id == 0x1111 && w.ew_cluster_id == 0x2222);
	CHECK(w.ew_has_snapshot && w.ew_snap_index == 0);
	const storage_etcd_wal_entry *e = storage_etcd_wal_entry_at(&w, 3);
	CHECK(e && e->we_len == 5 && memcmp(e->we_data, "three", 5) == 0 && e->we_term == 2);
	storage_etcd_wal_free(&w);

	/* Preallocated zeros after the records are the end of each file. */
	f0.n += 4096;
	f1.n += 1000;
	CHECK_EQ(decode2(&f0, &f1, &w, eb), 0);
	CHECK_EQ(w.ew_n_entries, 4);
	CHECK_EQ(w.ew_torn_tail, 0);
	storage_etcd_wal_free(&w);

	/* A later entry with an index already seen replaces it and everything after it. */
	build(&f0, &f1);
	entry(&f1, 3, 3, "again");
	CHECK_EQ(decode2(&f0, &f1, &w, eb), 0);
	CHECK_EQ(w.ew_n_entries, 3);
	e = storage_etcd_wal_entry_at(&w, 3);
	CHECK(e && e->we_term == 3 && memcmp(e->we_data, "again", 5) == 0);
	storage_etcd_wal_free(&w);

	/* The first file left after a purge starts the chain from its crc record. */
	build(&f0, &f1);
	const uint8_t *files[1] = {f1.b};
	size_t lens[1] = {f1.n};
	CHECK_EQ(storage_etcd_wal_decode(files, lens, 1, &w, eb, sizeof(eb)), 0);
	CHECK_EQ(w.ew_n_entries, 2);
	storage_etcd_wal_free(&w);
}

static void test_torn_tail(void)
{
	static wbuf f0, f1;
	storage_etcd_wal w;
	char eb[256] = "";
	/* Cut inside the last record of the last file: the log ends before it. */
	build(&f0, &f1);
	size_t whole = f1.n;
	CHECK(whole - last_start > 8);
	for (size_t cut = 1; cut < whole - last_start; cut++) {
		f1.n = whole - cut;
		int rc = decode2(&f0, &f1, &w, eb);
		CHECK_EQ(rc, 0);
		CHECK_EQ(w.ew_torn_tail, 1);
		CHECK_EQ(w.ew_n_entries, 4);  /* the cut record is the last hard state */
		CHECK_EQ(w.ew_commit, 2);
		storage_etcd_wal_free(&w);
	}
	f1.n = whole;

	/* A last record whose sector was never written (zeros) but whose length word was. */
	build(&f0, &f1);
	size_t start = f1.n;
	static const char big[] = "a value long enough to span a sector boundary .................."
				  "................................................................"
				  "................................................................"
				  "................................................................"
				  "................................................................"
				  "................................................................"
				  "................................................................"
				  "................................................................"
				  "................................................................";
	entry(&f1, 2, 5, big);
	for (size_t i = start + 8; i < f1.n; i++)
		if ((i % 512) == 0) {
			memset(f1.b + i, 0, f1.n - i < 512 ? f1.n - i : 512);
			break;
		}
	CHECK_EQ(decode2(&f0, &f1, &w, eb), 0);
	CHECK_EQ(w.ew_torn_tail, 1);
	CHECK_EQ(w.ew_n_entries, 4);
	storage_etcd_wal_free(&w);

	/* The same cut in the first of two files is corruption. */
	build(&f0, &f1);
	f0.n -= 5;
	CHECK_EQ(decode2(&f0, &f1, &w, eb), STORAGE_ERR_CORRUPT);
	CHECK(strstr(eb, "runs past the end") != NULL);
}

static void test_refused(void)
{
	static wbuf f0, f1;
	storage_etcd_wal w;
	char eb[256];

	/* A flipped byte in a record's data (not a torn write). */
	build(&f0, &f1);
	uint8_t *p = memmem(f0.b, f0.n, "one", 3);
	CHECK(p != NULL);
	if (p) {
		p[0] = 'O';
		eb[0] = '\0';
		CHECK_EQ(decode2(&f0, &f1, &w, eb), STORAGE_ERR_CORRUPT);
		CHECK(strstr(eb, "CRC mismatch") != NULL);
	}
	/* The same in the last file, where a non-zero damaged record is not a torn write. */
	build(&f0, &f1);
	p = memmem(f1.b, f1.n, "four", 4);
	if (p) {
		p[1] = 'X';
		CHECK_EQ(decode2(&f0, &f1, &w, eb), STORAGE_ERR_CORRUPT);
		CHECK(strstr(eb, "CRC mismatch") != NULL);
	}

	/* A broken chain: the second file's crc record does not continue the first. */
	build(&f0, &f1);
	wbuf *g = malloc(sizeof(wbuf));
	memset(g, 0, sizeof(*g));
	chain = 0x12345678;
	record(g, 4, NULL, 0);
	metadata(g, 0x1111, 0x2222);
	entry(g, 2, 3, "three");
	eb[0] = '\0';
	CHECK_EQ(decode2(&f0, g, &w, eb), STORAGE_ERR_CORRUPT);
	CHECK(strstr(eb, "CRC chain broken") != NULL);

	/* Conflicting metadata. */
	build(&f0, &f1);
	memset(g, 0, sizeof(*g));
	chain = 0;
	record(g, 4, NULL, 0);
	metadata(g, 0x1111, 0x2222);
	metadata(g, 0x1111, 0x3333);
	const uint8_t *files[1] = {g->b};
	size_t lens[1] = {g->n};
	CHECK_EQ(storage_etcd_wal_decode(files, lens, 1, &w, eb, sizeof(eb)), STORAGE_ERR_CORRUPT);
	CHECK(strstr(eb, "metadata") != NULL);

	/* No metadata at all. */
	memset(g, 0, sizeof(*g));
	chain = 0;
	record(g, 4, NULL, 0);
	entry(g, 1, 1, "x");
	lens[0] = g->n;
	CHECK_EQ(storage_etcd_wal_decode(files, lens, 1, &w, eb, sizeof(eb)), STORAGE_ERR_CORRUPT);

	/* A gap between entries. */
	memset(g, 0, sizeof(*g));
	chain = 0;
	metadata(g, 1, 2);
	entry(g, 1, 1, "x");
	entry(g, 1, 3, "y");
	lens[0] = g->n;
	CHECK_EQ(storage_etcd_wal_decode(files, lens, 1, &w, eb, sizeof(eb)), STORAGE_ERR_CORRUPT);
	CHECK(strstr(eb, "gap") != NULL);

	/* An unknown record type. */
	memset(g, 0, sizeof(*g));
	chain = 0;
	metadata(g, 1, 2);
	record(g, 9, (const uint8_t *)"zz", 2);
	lens[0] = g->n;
	CHECK_EQ(storage_etcd_wal_decode(files, lens, 1, &w, eb, sizeof(eb)), STORAGE_ERR_CORRUPT);
	CHECK(strstr(eb, "unexpected record type") != NULL);

	/* Bad length words: padding that does not reach 8 bytes, and a huge length. */
	build(&f0, &f1);
	f0.b[8 * 0 + 7] = 0x83; /* the first (crc) record's word with a wrong pad count */
	CHECK_EQ(decode2(&f0, &f1, &w, eb), STORAGE_ERR_CORRUPT);
	CHECK(strstr(eb, "length word") != NULL);
	build(&f0, &f1);
	f0.b[5] = 0x7f;
	CHECK_EQ(decode2(&f0, &f1, &w, eb), STORAGE_ERR_CORRUPT);
	free(g);

	/* Nothing at all. */
	CHECK_EQ(storage_etcd_wal_decode(files, lens, 0, &w, eb, sizeof(eb)), STORAGE_ERR_CORRUPT);
}

static void write_file(const char *path, const wbuf *b)
{
	FILE *f = fopen(path, "wb");
	CHECK(f != NULL);
	if (f) {
		CHECK_EQ(fwrite(b->b, 1, b->n, f), b->n);
		fclose(f);
	}
}

static void test_dir(void)
{
	static wbuf f0, f1;
	char *dir = t_tmpdir("etcdwal");
	char path[4096], eb[256];
	storage_etcd_wal w;
	CHECK_EQ(mkdir(dir, 0700), 0);
	build(&f0, &f1);
	snprintf(path, sizeof(path), "%s/0000000000000000-0000000000000000.wal", dir);
	write_file(path, &f0);
	snprintf(path, sizeof(path), "%s/0.tmp", dir); /* etcd's preallocated next file */
	write_file(path, &f1);
	snprintf(path, sizeof(path), "%s/0000000000000002-0000000000000003.wal", dir);
	write_file(path, &f1);
	/* sequence 0 then 2: a file is missing */
	CHECK_EQ(storage_etcd_wal_read(dir, &w, eb, sizeof(eb)), STORAGE_ERR_CORRUPT);
	CHECK(strstr(eb, "out of sequence") != NULL);
	char path2[4096];
	snprintf(path2, sizeof(path2), "%s/0000000000000001-0000000000000003.wal", dir);
	CHECK_EQ(rename(path, path2), 0);
	CHECK_EQ(storage_etcd_wal_read(dir, &w, eb, sizeof(eb)), 0);
	CHECK_EQ(w.ew_files, 2);
	CHECK_EQ(w.ew_n_entries, 4);
	storage_etcd_wal_free(&w);
	/* Errors name the file. */
	f1.b[20] ^= 0xff;
	write_file(path2, &f1);
	CHECK_EQ(storage_etcd_wal_read(dir, &w, eb, sizeof(eb)), STORAGE_ERR_CORRUPT);
	CHECK(strstr(eb, "0000000000000001-0000000000000003.wal") != NULL);
	snprintf(path, sizeof(path), "%s/missing", dir);
	CHECK_EQ(storage_etcd_wal_read(path, &w, eb, sizeof(eb)), STORAGE_ERR_IO);
	free(dir);
}

int main(void)
{
	test_real();
	test_whole();
	test_torn_tail();
	test_refused();
	test_dir();
	printf("etcdwal_test: %d checks, %d failed\n", t_checks, t_fail);
	return t_fail ? 1 : 0;
}
