/*
 * wal_test.c - the Raft log's WAL (wal.c): round trip, torn tail, a bad record in the
 * middle, suffix replacement, segment rollover and removal, a void clear, a snapshot point
 * that contradicts the log, and the move of an older store's rlog tree into the WAL.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "storage/internal.h"
#include "storage/testutil.h"

static storage *S;
static char *DIR_;
static storage_arena A;
static uint64_t SEG; /* WAL segment size for reopen() */

static int try_open(void)
{
	if (S)
		storage_close(S);
	S = NULL;
	storage_options o = {0};
	o.so_wal_segment_size = SEG;
	return storage_open(DIR_, &o, &S);
}

static void reopen(void)
{
	int err = try_open();
	if (err) {
		fprintf(stderr, "open: %s\n", storage_strerror(err));
		exit(1);
	}
}

static void fresh(const char *name, uint64_t seg)
{
	if (S)
		storage_close(S);
	S = NULL;
	free(DIR_);
	DIR_ = t_tmpdir(name);
	SEG = seg;
	reopen();
}

/* Appends entries first..last of the given term, each holding "i<index>", and a hard state. */
static void append(uint64_t first, uint64_t last, uint64_t term, uint64_t commit)
{
	size_t n = (size_t)(last - first + 1);
	storage_log_entry *e = calloc(n, sizeof(*e));
	char(*d)[24] = calloc(n, sizeof(*d));
	for (size_t i = 0; i < n; i++) {
		snprintf(d[i], sizeof(d[i]), "i%llu", (unsigned long long)(first + i));
		e[i] = (storage_log_entry){first + i, term, 0, (uint32_t)strlen(d[i]), (const uint8_t *)d[i]};
	}
	storage_batch *b;
	CHECK_EQ(storage_batch_begin(S, &b), 0);
	CHECK_EQ(storage_batch_log_append(b, e, n), 0);
	CHECK_EQ(storage_batch_log_hard_state(b, term, 1, commit), 0);
	CHECK_EQ(storage_batch_commit_log(b), 0);
	free(e);
	free(d);
}

static int read_log(storage_log_state *ls)
{
	storage_reader *r;
	int err = storage_read_begin(S, &r);
	if (err)
		return err;
	err = storage_read_log(r, &A, ls);
	storage_read_end(r);
	return err;
}

/* The log holds exactly first..last, of term term from term_from on (else term 1). */
static void check_log(uint64_t first, uint64_t last, uint64_t term_from, uint64_t term)
{
	storage_log_state ls;
	CHECK_EQ(read_log(&ls), 0);
	CHECK_EQ(ls.ls_n_entries, last >= first ? last - first + 1 : 0);
	for (size_t i = 0; i < ls.ls_n_entries; i++) {
		const storage_log_entry *e = &ls.ls_entries[i];
		char d[24];
		snprintf(d, sizeof(d), "i%llu", (unsigned long long)(first + i));
		CHECK_EQ(e->le_index, first + i);
		CHECK_EQ(e->le_term, e->le_index >= term_from ? term : 1);
		CHECK(e->le_len == strlen(d) && memcmp(e->le_data, d, e->le_len) == 0);
	}
}

static char *seg_path(uint64_t seq)
{
	static char p[4200];
	snprintf(p, sizeof(p), "%s/keelson-wal/%016llx.wal", DIR_, (unsigned long long)seq);
	return p;
}

static int nsegs(void)
{
	int n = 0;
	for (uint64_t s = 1; s < 1000; s++)
		n += access(seg_path(s), F_OK) == 0;
	return n;
}

static void snapshot_point(uint64_t index, uint64_t term, int lazy)
{
	storage_batch *b;
	CHECK_EQ(storage_batch_begin(S, &b), 0);
	CHECK_EQ(storage_batch_log_snapshot(b, index, term, "c", 1), 0);
	CHECK_EQ(lazy ? storage_batch_commit_lazy(b, index) : storage_batch_commit(b, index), 0);
}

static void flip_byte(const char *path, off_t off)
{
	int fd = open(path, O_RDWR);
	CHECK(fd >= 0);
	uint8_t c;
	CHECK_EQ(pread(fd, &c, 1, off), 1);
	c ^= 0x55;
	CHECK_EQ(pwrite(fd, &c, 1, off), 1);
	close(fd);
}

static void test_round_trip(void)
{
	fresh("wal_rt", 0);
	storage_log_state ls;
	CHECK_EQ(read_log(&ls), 0);
	CHECK(ls.ls_n_entries == 0 && ls.ls_term == 0 && ls.ls_vote == 0);
	CHECK_EQ(access(seg_path(1), F_OK), -1); /* nothing written, no WAL */
	append(1, 10, 1, 0);
	append(11, 20, 1, 10);
	/* a new leader of term 3 replaces 15.. */
	append(15, 16, 3, 12);
	reopen();
	check_log(1, 16, 15, 3);
	CHECK_EQ(read_log(&ls), 0);
	CHECK(ls.ls_term == 3 && ls.ls_vote == 1 && ls.ls_commit == 12);
	/* the segment is preallocated: one fdatasync needs no size change */
	struct stat st;
	CHECK_EQ(stat(seg_path(1), &st), 0);
	CHECK_EQ(st.st_size, 64 << 20);
	/* non-contiguous appends are refused */
	storage_log_entry g[2] = {{17, 3, 0, 0, NULL}, {19, 3, 0, 0, NULL}};
	storage_batch *b;
	CHECK_EQ(storage_batch_begin(S, &b), 0);
	CHECK_EQ(storage_batch_log_append(b, g, 2), STORAGE_ERR_INVALID);
	storage_batch_abort(b);
	/* the commit index never passes the log's end */
	append(17, 17, 3, 40);
	reopen();
	CHECK_EQ(read_log(&ls), 0);
	CHECK_EQ(ls.ls_commit, 17);
}

/* The size of the record of entry "i<index>" (wal.c: header 8, type 1, entry header 17). */
static off_t entry_record_size(uint64_t index)
{
	char d[24];
	return 8 + 1 + 17 + snprintf(d, sizeof(d), "i%llu", (unsigned long long)index);
}

static void close_store(void)
{
	storage_close(S);
	S = NULL;
}

static void test_torn_tail(void)
{
	fresh("wal_torn", 0);
	append(1, 5, 1, 0);
	append(6, 8, 1, 5);
	/* the last record (entry 8: a batch's hard state comes first) torn */
	off_t end = (off_t)S->s_wal_off;
	close_store();
	flip_byte(seg_path(1), end - 3);
	reopen();
	check_log(1, 7, 99, 0);
	storage_log_state ls;
	CHECK_EQ(read_log(&ls), 0);
	CHECK_EQ(ls.ls_commit, 5); /* the second batch's hard state, ahead of its entries */
	CHECK_EQ(S->s_wal_off, (uint64_t)(end - entry_record_size(8)));
	/* writes go on after the cut, and the stale bytes were zeroed */
	append(8, 9, 2, 8);
	reopen();
	check_log(1, 9, 8, 2);
	/* a bad record at the very start (the first batch's hard state) ends the log there */
	close_store();
	flip_byte(seg_path(1), 20);
	reopen();
	check_log(1, 0, 1, 1);
}

/* A torn batch keeps a prefix of its records. The first append of a new leader carries
 * entries of its term: whatever prefix survives, the hard state read back has at least the
 * term of every entry kept (Raft refuses a log with entries of a term above its own). */
static void test_torn_new_term(void)
{
	for (uint64_t cut = 0; cut < 3; cut++) {
		fresh("wal_torn_term", 0);
		append(1, 3, 1, 2);
		off_t start = (off_t)S->s_wal_off;
		append(4, 5, 2, 3);
		/* tear: entry 5 (cut 0), entry 4 (cut 1), the hard state (cut 2) */
		off_t at = (off_t)S->s_wal_off - 3;
		if (cut >= 1)
			at -= entry_record_size(5);
		if (cut >= 2)
			at = start + 3;
		close_store();
		flip_byte(seg_path(1), at);
		reopen();
		storage_log_state ls;
		CHECK_EQ(read_log(&ls), 0);
		uint64_t kept = cut == 0 ? 4 : 3;
		CHECK_EQ(ls.ls_n_entries, kept);
		CHECK_EQ(ls.ls_term, cut == 2 ? 1 : 2);
		for (size_t i = 0; i < ls.ls_n_entries; i++)
			CHECK(ls.ls_entries[i].le_term <= ls.ls_term);
	}
}

static void test_rollover_and_removal(void)
{
	fresh("wal_roll", 4006);
	for (uint64_t i = 1; i <= 400; i += 10)
		append(i, i + 9, 1, i - 1);
	int n = nsegs();
	CHECK(n > 3);
	reopen();
	check_log(1, 400, 999, 1);
	/* a bad record in a segment that is not the last: refused, never skipped */
	storage_close(S);
	S = NULL;
	flip_byte(seg_path(2), 100);
	CHECK_EQ(try_open(), STORAGE_ERR_CORRUPT);
	flip_byte(seg_path(2), 100);
	reopen();
	/* a snapshot point removes the segments it covers, never the last */
	snapshot_point(200, 1, 1);
	CHECK(nsegs() < n);
	CHECK_EQ(access(seg_path(1), F_OK), -1);
	check_log(201, 400, 999, 1);
	storage_log_state ls;
	CHECK_EQ(read_log(&ls), 0);
	CHECK_EQ(ls.ls_term, 1); /* the hard state survives in the segments left */
	snapshot_point(400, 1, 1);
	CHECK_EQ(nsegs(), 1);
	reopen();
	check_log(401, 400, 999, 1);
	append(401, 420, 2, 400);
	reopen();
	check_log(401, 420, 401, 2);
	CHECK_EQ(read_log(&ls), 0);
	CHECK(ls.ls_term == 2 && ls.ls_commit == 400);
	/* a batch bigger than a segment gets a segment of its own size */
	append(421, 900, 2, 420);
	reopen();
	check_log(401, 900, 401, 2);
}

/* A batch holding what installing snapshot 100 of term 5 records: the clear, the point and
 * the hard state (term 5, vote 2, commit 100). */
static storage_batch *install_batch(void)
{
	storage_batch *b;
	CHECK_EQ(storage_batch_begin(S, &b), 0);
	CHECK_EQ(storage_batch_log_clear(b, 0), 0);
	CHECK_EQ(storage_batch_log_snapshot(b, 100, 5, "c", 1), 0);
	CHECK_EQ(storage_batch_log_hard_state(b, 5, 2, 100), 0);
	return b;
}

/* Installing a snapshot: a clear whose LMDB commit never happened is void. */
static void test_clear(void)
{
	fresh("wal_clear", 0);
	append(1, 20, 1, 10);
	storage_batch *b;
	b = install_batch();
	CHECK_EQ(storage_batch_sync_log(b), 0);
	storage_batch_abort(b); /* as a crash between the WAL and LMDB */
	reopen();
	check_log(1, 20, 99, 0);
	storage_log_state ls;
	CHECK_EQ(read_log(&ls), 0);
	CHECK(ls.ls_term == 1 && ls.ls_commit == 10 && ls.ls_snap_index == 0);
	/* the void clear was cut off: what follows it counts */
	append(21, 22, 2, 20);
	reopen();
	check_log(1, 22, 21, 2);
	/* committed, the clear drops the old log */
	b = install_batch();
	CHECK_EQ(storage_batch_commit(b, 100), 0);
	reopen();
	CHECK_EQ(read_log(&ls), 0);
	CHECK(ls.ls_n_entries == 0 && ls.ls_term == 5 && ls.ls_commit == 100 && ls.ls_snap_index == 100);
	append(101, 105, 5, 100);
	reopen();
	check_log(101, 105, 101, 5);
}

/* A new snapshot point in LMDB, the old log in the WAL (a crash before the clear record). */
static void test_snapshot_mismatch(void)
{
	fresh("wal_mismatch", 0);
	append(1, 30, 1, 10);
	/* the point agrees with the log at 20: the log after it stays */
	snapshot_point(20, 1, 0);
	check_log(21, 30, 99, 0);
	/* a point of another term at 25: the old log after it is stale */
	snapshot_point(25, 4, 0);
	storage_log_state ls;
	CHECK_EQ(read_log(&ls), 0);
	CHECK_EQ(ls.ls_n_entries, 0);
	CHECK_EQ(ls.ls_commit, 25); /* raised to the applied index */
	/* the next open clears the contradicting log for good: appends after the point count */
	reopen();
	append(26, 28, 4, 25);
	reopen();
	check_log(26, 28, 26, 4);
	/* a point past the log's end: nothing of it stays */
	fresh("wal_mismatch2", 0);
	append(1, 5, 1, 5);
	snapshot_point(50, 3, 0);
	CHECK_EQ(read_log(&ls), 0);
	CHECK_EQ(ls.ls_n_entries, 0);
	reopen();
	append(51, 52, 3, 50);
	reopen();
	check_log(51, 52, 51, 3);
}

/* A snapshot's install writes its clear first, for the snapshot point it installs: the
 * clear is void until the store's point gets there, so a crash before the install keeps
 * the old log (here with a stale suffix 6..8 that the snapshot's log does not have). */
/* The WAL records of a snapshot install written before the install: the clear for index,
 * and the hard state (term, vote, commit = index). */
static void write_clear_for(uint64_t index, uint64_t term, uint64_t vote)
{
	storage_batch *b;
	CHECK_EQ(storage_batch_begin(S, &b), 0);
	CHECK_EQ(storage_batch_log_clear(b, index), 0);
	CHECK_EQ(storage_batch_log_hard_state(b, term, vote, index), 0);
	CHECK_EQ(storage_batch_commit_log(b), 0);
}

static void test_clear_before_install(void)
{
	fresh("wal_clear_first", 0);
	append(1, 5, 1, 5);
	append(6, 8, 2, 5);
	write_clear_for(7, 3, 4);
	reopen(); /* as a crash before the install */
	check_log(1, 8, 6, 2);
	storage_log_state ls;
	CHECK_EQ(read_log(&ls), 0);
	CHECK(ls.ls_term == 2 && ls.ls_vote == 1 && ls.ls_commit == 5);
	/* the install again, then its store: the clear counts, with its hard state */
	write_clear_for(7, 3, 4);
	snapshot_point(7, 3, 0);
	reopen();
	CHECK_EQ(read_log(&ls), 0);
	CHECK(ls.ls_n_entries == 0 && ls.ls_term == 3 && ls.ls_vote == 4 && ls.ls_commit == 7);
	append(8, 9, 3, 9);
	reopen();
	check_log(8, 9, 8, 3);
}

/* Entries 3..7 of term 2 and the hard state (term 2, vote 9, commit 6) as an older Keelson
 * kept them in LMDB's rlog tree; with_snap adds its snapshot point (index 2, term 2). */
static void write_old_rlog(int with_snap)
{
	MDB_txn *txn;
	CHECK_EQ(mdb_txn_begin(S->s_env, NULL, 0, &txn), 0);
	for (uint64_t i = 3; i <= 7; i++) {
		uint8_t k[8], v[9 + 8];
		be64_put(k, i);
		be64_put(v, 2);
		v[8] = 0;
		int dl = snprintf((char *)v + 9, 8, "i%llu", (unsigned long long)i);
		MDB_val mk = {8, k}, mv = {9 + (size_t)dl, v};
		CHECK_EQ(mdb_put(txn, S->s_rlog, &mk, &mv, 0), 0);
	}
	CHECK_EQ(storage__meta_put_i64(S, txn, META_RL_TERM, 2), 0);
	CHECK_EQ(storage__meta_put_i64(S, txn, META_RL_VOTE, 9), 0);
	CHECK_EQ(storage__meta_put_i64(S, txn, META_RL_COMMIT, 6), 0);
	if (with_snap) {
		CHECK_EQ(storage__meta_put_i64(S, txn, META_RL_SNAP_INDEX, 2), 0);
		CHECK_EQ(storage__meta_put_i64(S, txn, META_RL_SNAP_TERM, 2), 0);
	}
	CHECK_EQ(mdb_txn_commit(txn), 0);
}

/* An older Keelson's log in the rlog tree moves into the WAL at open. */
static void test_migration(void)
{
	fresh("wal_migrate", 0);
	MDB_txn *txn;
	write_old_rlog(1);
	/* twice: a crash after the WAL was written but before the tree was emptied */
	for (int round = 0; round < 2; round++) {
		reopen();
		check_log(3, 7, 1, 2);
		storage_log_state ls;
		CHECK_EQ(read_log(&ls), 0);
		CHECK(ls.ls_term == 2 && ls.ls_vote == 9 && ls.ls_commit == 6);
		MDB_stat st;
		CHECK_EQ(mdb_txn_begin(S->s_env, NULL, MDB_RDONLY, &txn), 0);
		CHECK_EQ(mdb_stat(txn, S->s_rlog, &st), 0);
		CHECK_EQ(st.ms_entries, 0);
		mdb_txn_abort(txn);
		if (round == 0) {
			/* put the tree back as if the drop had not committed */
			write_old_rlog(0);
		}
	}
}

int main(void)
{
	storage_arena_init(&A);
	test_round_trip();
	test_torn_tail();
	test_torn_new_term();
	test_clear_before_install();
	test_rollover_and_removal();
	test_clear();
	test_snapshot_mismatch();
	test_migration();
	if (S)
		storage_close(S);
	storage_arena_free(&A);
	free(DIR_);
	printf("wal_test: %d checks, %d failed\n", t_checks, t_fail);
	return t_fail ? 1 : 0;
}
