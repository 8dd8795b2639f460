/*
 * wal.c - Keelson's own write-ahead log of Raft entries and hard states, in
 * <storage dir>/keelson-wal/ (never etcd's member/wal, which an imported data dir keeps).
 *
 * Why not LMDB: a durable LMDB commit costs two flushes and rewrites B+tree pages
 * copy-on-write; an append to a preallocated file costs one fdatasync (no metadata to
 * flush: the blocks and the size are already there) and writes only the records.
 *
 * Segments are named %016llx.wal by sequence number and preallocated (fallocate) to the
 * segment size; a batch that does not fit in the current one starts a new one, which begins
 * with the latest hard state so that older segments can be removed. A record is
 *   [len u32 LE][crc32c u32 LE of the len bytes that follow][type u8][payload]
 * with len = 1 + payload length, and the payloads:
 *   WAL_ENTRY [index u64][term u64][entry type u8][data]
 *   WAL_HS    [term u64][vote u64][commit u64]
 *   WAL_CLEAR [snapshot index u64]: drops every entry before it (an installed snapshot
 *             replaces the log), but only once LMDB records a snapshot point at or past
 *             that index; before that the install did not commit and the clear and all
 *             after it are ignored (and cut off at open).
 * All integers in payloads are big-endian. An entry at an index <= the last one replaces
 * the suffix from there (Raft's log matching), as etcd's WAL reader does.
 *
 * Reading: a zero length ends a segment (the rest is preallocated zeros); a torn or bad
 * record in the LAST segment ends the log (open cuts it off and re-zeroes the tail); a bad
 * record in any other segment is STORAGE_ERR_CORRUPT: the middle of a log is never
 * silently dropped.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "crashpoint/crashpoint.h"
#include "crc32c/crc32c.h"
#include "storage/internal.h"

#define WAL_DIR "keelson-wal"
#define WAL_HDR 8
#define WAL_ENTRY 1
#define WAL_HS 2
#define WAL_CLEAR 3
#define WAL_ENTRY_HDR 17 /* index, term, entry type */
#define DEFAULT_SEGMENT_SIZE (64ULL << 20)

static void le32_put(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
	p[2] = (uint8_t)(v >> 16);
	p[3] = (uint8_t)(v >> 24);
}

static uint32_t le32_get(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* ---- the batch's record buffer ---- */

static uint8_t *rec_reserve(storage_batch *b, uint8_t type, size_t payload)
{
	size_t need = WAL_HDR + 1 + payload;
	if (payload > UINT32_MAX - 1)
		return NULL;
	if (b->b_wal_len + need > b->b_wal_cap) {
		size_t cap = b->b_wal_cap ? b->b_wal_cap : 4096;
		while (cap < b->b_wal_len + need)
			cap *= 2;
		uint8_t *p = realloc(b->b_wal, cap);
		if (p == NULL)
			return NULL;
		b->b_wal = p;
		b->b_wal_cap = cap;
	}
	uint8_t *r = b->b_wal + b->b_wal_len;
	le32_put(r, (uint32_t)(1 + payload));
	r[WAL_HDR] = type;
	b->b_wal_len += need;
	return r;
}

/* Fills in the crc of the record at r once its payload is written. */
static void rec_seal(uint8_t *r)
{
	uint32_t len = le32_get(r);
	le32_put(r + 4, crc32c(0, r + WAL_HDR, len));
}

int storage__wal_add_entries(storage_batch *b, const storage_log_entry *e, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (i > 0 && e[i].le_index != e[i - 1].le_index + 1)
			return STORAGE_ERR_INVALID;
		uint8_t *r = rec_reserve(b, WAL_ENTRY, WAL_ENTRY_HDR + (size_t)e[i].le_len);
		if (r == NULL)
			return STORAGE_ERR_NOMEM;
		uint8_t *p = r + WAL_HDR + 1;
		be64_put(p, e[i].le_index);
		be64_put(p + 8, e[i].le_term);
		p[16] = e[i].le_type;
		if (e[i].le_len)
			memcpy(p + WAL_ENTRY_HDR, e[i].le_data, e[i].le_len);
		rec_seal(r);
		if (e[i].le_index > b->b_wal_max_index)
			b->b_wal_max_index = e[i].le_index;
	}
	return 0;
}

/* The hard state is written ahead of the batch's other records (storage__wal_write): a
 * torn batch may keep a prefix of its records, and entries of a new term kept without the
 * hard state of that term would be a log Raft refuses to start from. */
int storage__wal_add_hs(storage_batch *b, uint64_t term, uint64_t vote, uint64_t commit)
{
	b->b_wal_hs_set = 1;
	b->b_wal_hs[0] = term;
	b->b_wal_hs[1] = vote;
	b->b_wal_hs[2] = commit;
	return 0;
}

int storage__wal_add_clear(storage_batch *b, uint64_t snap_index)
{
	uint8_t *r = rec_reserve(b, WAL_CLEAR, 8);
	if (r == NULL)
		return STORAGE_ERR_NOMEM;
	/* Sealed at commit: a point the batch itself records later takes its place. */
	be64_put(r + WAL_HDR + 1, snap_index);
	b->b_wal_clear_off = (int64_t)(r - b->b_wal);
	return 0;
}

/* ---- segments ---- */

static int wal_path(storage *s, char *buf, size_t n, uint64_t seq)
{
	int w = seq ? snprintf(buf, n, "%s/%s/%016llx.wal", s->s_dir, WAL_DIR, (unsigned long long)seq)
		    : snprintf(buf, n, "%s/%s", s->s_dir, WAL_DIR);
	return w < 0 || (size_t)w >= n ? STORAGE_ERR_INVALID : 0;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* The sequence numbers of the segments, ascending (malloc'd; *n = 0 and NULL if none). */
static int list_segments(storage *s, uint64_t **out, size_t *n)
{
	char dir[PATH_MAX];
	*out = NULL;
	*n = 0;
	int err = wal_path(s, dir, sizeof(dir), 0);
	if (err)
		return err;
	DIR *d = opendir(dir);
	if (d == NULL)
		return errno == ENOENT ? 0 : STORAGE_ERR_IO;
	uint64_t *v = NULL;
	size_t cnt = 0, cap = 0;
	struct dirent *de;
	while ((de = readdir(d)) != NULL) {
		const char *nm = de->d_name;
		if (strlen(nm) != 20 || strcmp(nm + 16, ".wal") != 0)
			continue;
		char *end;
		unsigned long long seq = strtoull(nm, &end, 16);
		if (end != nm + 16 || seq == 0)
			continue;
		if (cnt == cap) {
			cap = cap ? cap * 2 : 8;
			uint64_t *nv = realloc(v, cap * sizeof(*v));
			if (nv == NULL) {
				free(v);
				closedir(d);
				return STORAGE_ERR_NOMEM;
			}
			v = nv;
		}
		v[cnt++] = seq;
	}
	closedir(d);
	if (cnt)
		qsort(v, cnt, sizeof(*v), cmp_u64);
	/* Segments are only ever added at the end and removed at the front. */
	for (size_t i = 1; i < cnt; i++) {
		if (v[i] != v[i - 1] + 1) {
			free(v);
			return STORAGE_ERR_CORRUPT;
		}
	}
	*out = v;
	*n = cnt;
	return 0;
}

static int read_file(const char *path, storage_arena *a, uint8_t **buf, size_t *len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return STORAGE_ERR_IO;
	struct stat st;
	if (fstat(fd, &st) != 0) {
		close(fd);
		return STORAGE_ERR_IO;
	}
	size_t n = (size_t)st.st_size;
	uint8_t *p = storage_arena_alloc(a, n ? n : 1);
	if (p == NULL) {
		close(fd);
		return STORAGE_ERR_NOMEM;
	}
	size_t off = 0;
	while (off < n) {
		ssize_t r = pread(fd, p + off, n - off, (off_t)off);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			close(fd);
			return STORAGE_ERR_IO;
		}
		off += (size_t)r;
	}
	close(fd);
	*buf = p;
	*len = n;
	return 0;
}

/* ---- reading ---- */

static int log_push(storage__wal_log *l, const storage_log_entry *e)
{
	if (l->wl_n > 0) {
		uint64_t first = l->wl_e[0].le_index, last = l->wl_e[l->wl_n - 1].le_index;
		if (e->le_index > last + 1)
			return STORAGE_ERR_CORRUPT; /* a hole: no append leaves one */
		if (e->le_index <= last)
			l->wl_n = e->le_index >= first ? (size_t)(e->le_index - first) : 0;
	}
	if (l->wl_n == l->wl_cap) {
		size_t cap = l->wl_cap ? l->wl_cap * 2 : 256;
		storage_log_entry *ne = realloc(l->wl_e, cap * sizeof(*ne));
		if (ne == NULL)
			return STORAGE_ERR_NOMEM;
		l->wl_e = ne;
		l->wl_cap = cap;
	}
	l->wl_e[l->wl_n++] = *e;
	return 0;
}

void storage__wal_log_free(storage__wal_log *l)
{
	free(l->wl_e);
	free(l->wl_seg_max);
	memset(l, 0, sizeof(*l));
}

/*
 * Parses one segment's records into l. *end gets the offset where the valid records stop;
 * *clean is 0 when a bad or torn record (or an unhonoured clear) stopped it. A bad record
 * is an error unless last is set.
 */
static int parse_segment(const uint8_t *p, size_t n, int last, uint64_t snap_index, storage__wal_log *l,
			 uint64_t *seg_max, size_t *end, int *clean)
{
	size_t off = 0;
	*clean = 1;
	while (off + WAL_HDR <= n) {
		uint32_t len = le32_get(p + off);
		if (len == 0 && le32_get(p + off + 4) == 0)
			break; /* the preallocated zeros after the last record */
		int bad = len == 0 || len > n - off - WAL_HDR ||
			  crc32c(0, p + off + WAL_HDR, len) != le32_get(p + off + 4);
		const uint8_t *r = p + off + WAL_HDR + 1;
		size_t plen = len ? len - 1 : 0;
		uint8_t type = bad ? 0 : p[off + WAL_HDR];
		if (!bad) {
			if (type == WAL_ENTRY && plen >= WAL_ENTRY_HDR) {
				storage_log_entry e = {be64_get(r), be64_get(r + 8), r[16],
						       (uint32_t)(plen - WAL_ENTRY_HDR), r + WAL_ENTRY_HDR};
				int err = log_push(l, &e);
				if (err)
					return err;
				if (e.le_index > *seg_max)
					*seg_max = e.le_index;
			} else if (type == WAL_HS && plen == 24) {
				l->wl_has_hs = 1;
				l->wl_hs[0] = be64_get(r);
				l->wl_hs[1] = be64_get(r + 8);
				l->wl_hs[2] = be64_get(r + 16);
			} else if (type == WAL_CLEAR && plen == 8) {
				if (be64_get(r) > snap_index) {
					/* The install that wrote it never committed: it and all after
					 * it are void. Nothing can follow it but in this segment. */
					if (!last)
						return STORAGE_ERR_CORRUPT;
					*clean = 0;
					break;
				}
				l->wl_n = 0;
			} else {
				return STORAGE_ERR_CORRUPT; /* a good crc around a record we cannot read */
			}
		} else {
			if (!last)
				return STORAGE_ERR_CORRUPT;
			*clean = 0;
			break;
		}
		off += WAL_HDR + len;
	}
	*end = off;
	return 0;
}

int storage__wal_decode(const uint8_t *const *bufs, const size_t *lens, size_t n, uint64_t snap_index,
			storage__wal_log *l, size_t *tail, int *tail_clean)
{
	memset(l, 0, sizeof(*l));
	int err = 0;
	if (n && (l->wl_seg_max = calloc(n, sizeof(uint64_t))) == NULL)
		err = STORAGE_ERR_NOMEM;
	*tail = 0;
	*tail_clean = 1;
	for (size_t i = 0; !err && i < n; i++) {
		size_t end;
		int clean;
		err = parse_segment(bufs[i], lens[i], i + 1 == n, snap_index, l, &l->wl_seg_max[i], &end, &clean);
		if (!err && i + 1 == n) {
			*tail = end;
			/* Anything not zero after the last record must go before we write there. */
			for (size_t j = end; clean && j < lens[i]; j++)
				clean = bufs[i][j] == 0;
			*tail_clean = clean;
		}
	}
	if (err)
		storage__wal_log_free(l);
	return err;
}

int storage__wal_load(storage *s, storage_arena *a, uint64_t snap_index, storage__wal_log *l,
		      uint64_t **segs, size_t *nsegs, size_t *tail, int *tail_clean)
{
	memset(l, 0, sizeof(*l));
	int err = list_segments(s, segs, nsegs);
	if (err)
		return err;
	const uint8_t **bufs = calloc(*nsegs ? *nsegs : 1, sizeof(*bufs));
	size_t *lens = calloc(*nsegs ? *nsegs : 1, sizeof(*lens));
	if (bufs == NULL || lens == NULL)
		err = STORAGE_ERR_NOMEM;
	for (size_t i = 0; !err && i < *nsegs; i++) {
		char path[PATH_MAX];
		uint8_t *buf;
		if ((err = wal_path(s, path, sizeof(path), (*segs)[i])))
			break;
		if ((err = read_file(path, a, &buf, &lens[i])))
			break;
		bufs[i] = buf;
	}
	if (!err)
		err = storage__wal_decode(bufs, lens, *nsegs, snap_index, l, tail, tail_clean);
	free(bufs);
	free(lens);
	if (err) {
		free(*segs);
		*segs = NULL;
		*nsegs = 0;
	}
	return err;
}

/* ---- opening, writing, removing ---- */

/*
 * Whether the WAL's log contradicts LMDB's snapshot point: a crash between a snapshot's
 * install and its clear record leaves the old log, which ends before the point or has
 * another term at it. Reading drops it, but new entries appended after the point would
 * leave a hole (or sit behind the contradicting entry): it must be cleared for good.
 */
static int contradicts(const storage__wal_log *l, uint64_t snap_index, uint64_t snap_term)
{
	if (l->wl_n == 0 || snap_index == 0)
		return 0;
	uint64_t first = l->wl_e[0].le_index, last = l->wl_e[l->wl_n - 1].le_index;
	if (last < snap_index)
		return 1;
	return snap_index >= first && l->wl_e[snap_index - first].le_term != snap_term;
}

int storage__wal_open(storage *s, uint64_t segment_size, uint64_t snap_index, uint64_t snap_term)
{
	s->s_wal_fd = -1;
	s->s_wal_seg_size = segment_size ? segment_size : DEFAULT_SEGMENT_SIZE;
	storage_arena a;
	storage_arena_init(&a);
	storage__wal_log l;
	uint64_t *segs;
	size_t nsegs, tail;
	int clean;
	int err = storage__wal_load(s, &a, snap_index, &l, &segs, &nsegs, &tail, &clean);
	if (err) {
		storage_arena_free(&a);
		return err;
	}
	s->s_wal_segs = segs;
	s->s_wal_seg_max = l.wl_seg_max;
	l.wl_seg_max = NULL;
	s->s_wal_nsegs = nsegs;
	s->s_wal_has_hs = l.wl_has_hs;
	memcpy(s->s_wal_hs, l.wl_hs, sizeof(s->s_wal_hs));
	int clear = contradicts(&l, snap_index, snap_term);
	storage__wal_log_free(&l);
	storage_arena_free(&a);
	if (nsegs == 0)
		return 0;
	char path[PATH_MAX];
	if ((err = wal_path(s, path, sizeof(path), segs[nsegs - 1])))
		return err;
	int fd = open(path, O_RDWR | O_CLOEXEC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) != 0) {
		if (fd >= 0)
			close(fd);
		return STORAGE_ERR_IO;
	}
	if (!clean) {
		/* A torn write (or a void clear) ends the log: cut it off and give the space back
		 * as zeros, so that no stale record can ever be read after our next one. */
		if (ftruncate(fd, (off_t)tail) != 0 || fallocate(fd, 0, 0, st.st_size) != 0 ||
		    fsync(fd) != 0) {
			close(fd);
			return STORAGE_ERR_IO;
		}
	}
	s->s_wal_fd = fd;
	s->s_wal_off = tail;
	s->s_wal_cap = (uint64_t)st.st_size;
	if (clear) {
		storage_batch b;
		memset(&b, 0, sizeof(b));
		b.b_s = s;
		b.b_wal_clear_off = -1;
		err = storage__wal_add_clear(&b, 0);
		if (!err)
			err = storage__wal_write(&b); /* snapshot index 0: always honoured */
		free(b.b_wal);
	}
	return err;
}

void storage__wal_close(storage *s)
{
	if (s->s_wal_fd >= 0)
		close(s->s_wal_fd);
	s->s_wal_fd = -1;
	free(s->s_wal_segs);
	free(s->s_wal_seg_max);
	s->s_wal_segs = NULL;
	s->s_wal_seg_max = NULL;
	s->s_wal_nsegs = 0;
}

static int pwrite_all(int fd, const uint8_t *p, size_t n, uint64_t off)
{
	while (n > 0) {
		ssize_t w = pwrite(fd, p, n, (off_t)off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return STORAGE_ERR_IO;
		p += w;
		n -= (size_t)w;
		off += (uint64_t)w;
	}
	return 0;
}

/* Starts segment seq+1, big enough for need bytes, and makes its name durable. */
static int cut_segment(storage *s, size_t need)
{
	char dir[PATH_MAX], path[PATH_MAX];
	uint64_t seq = s->s_wal_nsegs ? s->s_wal_segs[s->s_wal_nsegs - 1] + 1 : 1;
	int err = wal_path(s, dir, sizeof(dir), 0);
	if (!err)
		err = wal_path(s, path, sizeof(path), seq);
	if (err)
		return err;
	if (s->s_wal_nsegs == 0) {
		if (mkdir(dir, 0700) != 0 && errno != EEXIST)
			return STORAGE_ERR_IO;
		if ((err = storage__fsync_dir(s->s_dir)))
			return err;
	}
	uint64_t size = s->s_wal_seg_size;
	if (size < need)
		size = need;
	uint64_t *segs = realloc(s->s_wal_segs, (s->s_wal_nsegs + 1) * sizeof(*segs));
	if (segs == NULL)
		return STORAGE_ERR_NOMEM;
	s->s_wal_segs = segs;
	uint64_t *mx = realloc(s->s_wal_seg_max, (s->s_wal_nsegs + 1) * sizeof(*mx));
	if (mx == NULL)
		return STORAGE_ERR_NOMEM;
	s->s_wal_seg_max = mx;
	/* O_TRUNC: a file left by a cut that crashed before its name was synced is ours. */
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		return STORAGE_ERR_IO;
	if (fallocate(fd, 0, 0, (off_t)size) != 0 || fsync(fd) != 0) {
		close(fd);
		unlink(path);
		return STORAGE_ERR_IO;
	}
	if ((err = storage__fsync_dir(dir))) {
		close(fd);
		return err;
	}
	CRASHPOINT("wal.cut"); /* a new, empty segment after the old ones */
	if (s->s_wal_fd >= 0)
		close(s->s_wal_fd);
	s->s_wal_fd = fd;
	s->s_wal_off = 0;
	s->s_wal_cap = size;
	s->s_wal_segs[s->s_wal_nsegs] = seq;
	s->s_wal_seg_max[s->s_wal_nsegs] = 0;
	s->s_wal_nsegs++;
	return 0;
}

#define WAL_HS_RECORD (WAL_HDR + 25)

/* A hard-state record of hs (term, vote, commit) in buf; returns its size. */
static size_t hs_record(uint8_t *buf, const uint64_t *hs)
{
	le32_put(buf, 25);
	buf[WAL_HDR] = WAL_HS;
	be64_put(buf + WAL_HDR + 1, hs[0]);
	be64_put(buf + WAL_HDR + 9, hs[1]);
	be64_put(buf + WAL_HDR + 17, hs[2]);
	rec_seal(buf);
	return WAL_HS_RECORD;
}

int storage__wal_write(storage_batch *b)
{
	storage *s = b->b_s;
	if (!storage__wal_pending(b))
		return 0;
	if (s->s_wal_failed)
		return STORAGE_ERR_IO;
	if (b->b_wal_clear_off >= 0) {
		uint8_t *r = b->b_wal + b->b_wal_clear_off;
		if (b->b_snap_set)
			be64_put(r + WAL_HDR + 1, b->b_snap_index);
		rec_seal(r);
	}
	/* A new segment starts with the hard state, so the segments before it can go. The
	 * batch's own hard state goes ahead of its records (storage__wal_add_hs says why),
	 * except after a clear: it belongs to the installed snapshot then (its commit index
	 * counts in the snapshot's log), and must be void with a void clear. */
	int cut = s->s_wal_fd < 0 || s->s_wal_off + 2 * WAL_HS_RECORD + b->b_wal_len > s->s_wal_cap;
	int hs_after = b->b_wal_hs_set && b->b_wal_clear_off >= 0;
	uint8_t head[WAL_HS_RECORD], tail[WAL_HS_RECORD];
	size_t head_len = 0, tail_len = 0;
	if (b->b_wal_hs_set && !hs_after)
		head_len = hs_record(head, b->b_wal_hs);
	else if (cut && s->s_wal_has_hs)
		head_len = hs_record(head, s->s_wal_hs);
	if (hs_after)
		tail_len = hs_record(tail, b->b_wal_hs);
	size_t total = head_len + b->b_wal_len + tail_len;
	if (cut) {
		int err = cut_segment(s, total);
		if (err)
			return err;
	}
	uint64_t off = s->s_wal_off;
	int err = head_len ? pwrite_all(s->s_wal_fd, head, head_len, off) : 0;
	if (!err && b->b_wal_len)
		err = pwrite_all(s->s_wal_fd, b->b_wal, b->b_wal_len, off + head_len);
	if (!err && tail_len)
		err = pwrite_all(s->s_wal_fd, tail, tail_len, off + head_len + b->b_wal_len);
	if (!err) {
		CRASHPOINT("wal.written"); /* in the page cache, not yet flushed */
		/* The blocks and the file size are preallocated: fdatasync flushes data only. */
		if (fdatasync(s->s_wal_fd) != 0)
			err = STORAGE_ERR_IO;
	}
	if (err) {
		/* What reached the file is unknown: stop writing rather than guess. */
		s->s_wal_failed = 1;
		return err;
	}
	s->s_wal_off += total;
	size_t last = s->s_wal_nsegs - 1;
	if (b->b_wal_max_index > s->s_wal_seg_max[last])
		s->s_wal_seg_max[last] = b->b_wal_max_index;
	if (b->b_wal_hs_set) {
		s->s_wal_has_hs = 1;
		memcpy(s->s_wal_hs, b->b_wal_hs, sizeof(s->s_wal_hs));
	}
	b->b_wal_len = 0;
	b->b_wal_hs_set = 0;
	b->b_wal_clear_off = -1;
	b->b_wal_written = 1;
	return 0;
}

int storage__wal_remove_through(storage *s, uint64_t durable_snap_index)
{
	size_t k = 0;
	/* Oldest first, never the segment being written. */
	while (k + 1 < s->s_wal_nsegs && s->s_wal_seg_max[k] <= durable_snap_index)
		k++;
	if (k == 0)
		return 0;
	char dir[PATH_MAX], path[PATH_MAX];
	int err = wal_path(s, dir, sizeof(dir), 0);
	for (size_t i = 0; !err && i < k; i++) {
		if ((err = wal_path(s, path, sizeof(path), s->s_wal_segs[i])))
			break;
		if (unlink(path) != 0 && errno != ENOENT)
			err = STORAGE_ERR_IO;
		CRASHPOINT("wal.removed"); /* a segment whose entries LMDB durably covers is gone */
	}
	if (!err)
		err = storage__fsync_dir(dir);
	if (err)
		return err;
	memmove(s->s_wal_segs, s->s_wal_segs + k, (s->s_wal_nsegs - k) * sizeof(uint64_t));
	memmove(s->s_wal_seg_max, s->s_wal_seg_max + k, (s->s_wal_nsegs - k) * sizeof(uint64_t));
	s->s_wal_nsegs -= k;
	return 0;
}

int storage__wal_removable(storage *s, uint64_t snap_index)
{
	return s->s_wal_nsegs > 1 && s->s_wal_seg_max[0] <= snap_index;
}
