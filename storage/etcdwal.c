/*
 * etcdwal.c - a reader of etcd's write-ahead log (member/wal/SEQ-INDEX.wal), as etcd 3.4/3.5 write it
 * (go.etcd.io/etcd wal/encoder.go, decoder.go, wal.go ReadAll, walpb/record.proto).
 *
 *   - Files are named %016x-%016x.wal (sequence, first raft index); they are read in
 *     sequence order and the sequences must follow each other (etcd's isValidSeq).
 *   - A frame is a little-endian u64 length word, the record, then zero padding to a
 *     multiple of 8. The low 56 bits are the record's length; when padding is present the
 *     top byte is 0x80 | padding. A zero length word is the end of the written part of a
 *     file (etcd preallocates files with zeros) and the reader goes on with the next file.
 *   - A record is walpb.Record {int64 type = 1; uint32 crc = 2; bytes data = 3}. crc is the
 *     CRC-32C of the data of every record so far, chained across files; a crcType record
 *     (first in each file) carries the chain's value at the cut and must match it (unless
 *     the reader has seen nothing yet: the first file left after a purge).
 *   - Types: metadata 1 (etcdserverpb.Metadata {NodeID = 1, ClusterID = 2}, the same in every
 *     file), entry 2 (raftpb.Entry {Type = 1, Term = 2, Index = 3, Data = 4}; an entry with
 *     an index already seen replaces it and everything after it, as raft's log matching
 *     does), state 3 (raftpb.HardState {Term = 1, Vote = 2, Commit = 3}, the last one wins),
 *     crc 4, snapshot 5 (walpb.Snapshot {Index = 1, Term = 2}).
 *   - The end of the last file may be a torn write: a record cut short by the end of the
 *     file, or one with a zeroed 512-byte sector whose checksum or encoding fails. etcd
 *     treats that as the end of the log (wal.Repair truncates it), and so does this reader.
 *     The same damage anywhere else is corruption and is refused.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "crc32c/crc32c.h"
#include "storage/internal.h"

#define WAL_METADATA 1
#define WAL_ENTRY 2
#define WAL_STATE 3
#define WAL_CRC 4
#define WAL_SNAPSHOT 5
#define WAL_SECTOR 512
/* etcd refuses a record above 10 MB (wal/decoder.go maxWALEntrySizeLimit). */
#define WAL_MAX_RECORD (10u << 20)
#define WAL_MAX_FILES 100000

static int errf(char *buf, size_t len, int err, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
static int errf(char *buf, size_t len, int err, const char *fmt, ...)
{
	if (buf && len) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(buf, len, fmt, ap);
		va_end(ap);
	}
	return err;
}

/* ---- protobuf, by hand: the few messages are all varints and one bytes field ---- */

typedef struct pb_field {
	uint32_t pf_num;
	uint32_t pf_wire;
	uint64_t pf_varint;       /* wire type 0 */
	const uint8_t *pf_bytes;  /* wire type 2 */
	size_t pf_len;
} pb_field;

/* Reads the next field of [*pp, e): 1 if one was read, 0 at the end, or STORAGE_ERR_CORRUPT.
 * Fixed-size fields are skipped over but reported; groups are refused. */
static int pb_next(const uint8_t **pp, const uint8_t *e, pb_field *f)
{
	if (*pp == e)
		return 0;
	uint64_t tag;
	if (storage__varint_get(pp, e, &tag))
		return STORAGE_ERR_CORRUPT;
	f->pf_num = (uint32_t)(tag >> 3);
	f->pf_wire = (uint32_t)(tag & 7);
	if ((tag >> 3) == 0 || (tag >> 3) > 0x1fffffff)
		return STORAGE_ERR_CORRUPT;
	switch (f->pf_wire) {
	case 0:
		return storage__varint_get(pp, e, &f->pf_varint) ? STORAGE_ERR_CORRUPT : 1;
	case 1:
		if (e - *pp < 8)
			return STORAGE_ERR_CORRUPT;
		*pp += 8;
		return 1;
	case 5:
		if (e - *pp < 4)
			return STORAGE_ERR_CORRUPT;
		*pp += 4;
		return 1;
	case 2: {
		uint64_t n;
		if (storage__varint_get(pp, e, &n) || n > (uint64_t)(e - *pp))
			return STORAGE_ERR_CORRUPT;
		f->pf_bytes = *pp;
		f->pf_len = (size_t)n;
		*pp += n;
		return 1;
	}
	default:
		return STORAGE_ERR_CORRUPT;
	}
}

/* Decodes a message whose fields 1..nvar are varints (into v[]) and whose field bytes_field
 * (if bytes is not NULL) is bytes; other fields are skipped, a known field with the wrong
 * wire type is refused. */
static int pb_varints(const uint8_t *p, size_t n, uint64_t v[4], uint32_t nvar,
		      uint32_t bytes_field, const uint8_t **bytes, size_t *blen)
{
	const uint8_t *e = p + n;
	pb_field f;
	int rc;
	memset(v, 0, 4 * sizeof(v[0]));
	if (bytes) {
		*bytes = NULL;
		*blen = 0;
	}
	while ((rc = pb_next(&p, e, &f)) == 1) {
		if (bytes && f.pf_num == bytes_field) {
			if (f.pf_wire != 2)
				return STORAGE_ERR_CORRUPT;
			*bytes = f.pf_bytes;
			*blen = f.pf_len;
		} else if (f.pf_num >= 1 && f.pf_num <= nvar) {
			if (f.pf_wire != 0)
				return STORAGE_ERR_CORRUPT;
			v[f.pf_num - 1] = f.pf_varint;
		}
	}
	return rc;
}

/* ---- the decoder ---- */

static uint64_t le64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 7; i >= 0; i--)
		v = v << 8 | p[i];
	return v;
}

static int all_zero(const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (p[i])
			return 0;
	return 1;
}

/* etcd's isTornEntry: a frame body (at file offset off) with a 512-byte sector (aligned to
 * the file) that is all zeros was not wholly written. */
static int torn(const uint8_t *data, size_t n, size_t off)
{
	size_t cur = 0;
	while (cur < n) {
		size_t chunk = WAL_SECTOR - (off % WAL_SECTOR);
		if (chunk > n - cur)
			chunk = n - cur;
		if (all_zero(data + cur, chunk))
			return 1;
		cur += chunk;
		off += chunk;
	}
	return 0;
}

typedef struct wal_decoder {
	storage_etcd_wal *w;
	uint32_t crc;
	const uint8_t *meta; /* the first metadata record's data */
	size_t meta_len;
	size_t cap;
	char *err;
	size_t errlen;
} wal_decoder;

static int add_entry(wal_decoder *d, const storage_etcd_wal_entry *e, size_t file, size_t off)
{
	storage_etcd_wal *w = d->w;
	if (e->we_index == 0)
		return errf(d->err, d->errlen, STORAGE_ERR_CORRUPT,
			    "wal file %zu offset %zu: entry with index 0", file, off);
	if (w->ew_n_entries > 0) {
		uint64_t first = w->ew_entries[0].we_index;
		if (e->we_index < first) {
			w->ew_n_entries = 0; /* replaces the whole tail */
		} else if (e->we_index - first > w->ew_n_entries) {
			return errf(d->err, d->errlen, STORAGE_ERR_CORRUPT,
				    "wal file %zu offset %zu: entry %" PRIu64 " follows entry %" PRIu64
				    " (a gap in the log)",
				    file, off, e->we_index, first + w->ew_n_entries - 1);
		} else {
			w->ew_n_entries = (size_t)(e->we_index - first);
		}
	}
	if (w->ew_n_entries == d->cap) {
		size_t ncap = d->cap ? d->cap * 2 : 256;
		storage_etcd_wal_entry *ne = realloc(w->ew_entries, ncap * sizeof(*ne));
		if (ne == NULL)
			return errf(d->err, d->errlen, STORAGE_ERR_NOMEM, "out of memory");
		w->ew_entries = ne;
		d->cap = ncap;
	}
	w->ew_entries[w->ew_n_entries++] = *e;
	return 0;
}

/* One record's payload, already checked against the CRC chain. */
static int take_record(wal_decoder *d, uint64_t type, const uint8_t *data, size_t len,
		       size_t file, size_t off)
{
	storage_etcd_wal *w = d->w;
	uint64_t v[4];
	int rc;
	switch (type) {
	case WAL_METADATA:
		if (d->meta && (d->meta_len != len || memcmp(d->meta, data, len) != 0))
			return errf(d->err, d->errlen, STORAGE_ERR_CORRUPT,
				    "wal file %zu offset %zu: metadata differs from the first file's "
				    "(etcd: wal: conflicting metadata found)", file, off);
		if ((rc = pb_varints(data, len, v, 2, 0, NULL, NULL)) != 0)
			break;
		d->meta = data;
		d->meta_len = len;
		w->ew_has_metadata = 1;
		w->ew_node_id = v[0];
		w->ew_cluster_id = v[1];
		return 0;
	case WAL_ENTRY: {
		storage_etcd_wal_entry e;
		if ((rc = pb_varints(data, len, v, 3, 4, &e.we_data, &e.we_len)) != 0)
			break;
		if (v[0] > UINT32_MAX)
			return errf(d->err, d->errlen, STORAGE_ERR_CORRUPT,
				    "wal file %zu offset %zu: entry type %" PRIu64, file, off, v[0]);
		e.we_type = (uint32_t)v[0];
		e.we_term = v[1];
		e.we_index = v[2];
		return add_entry(d, &e, file, off);
	}
	case WAL_STATE:
		if ((rc = pb_varints(data, len, v, 3, 0, NULL, NULL)) != 0)
			break;
		w->ew_has_state = 1;
		w->ew_term = v[0];
		w->ew_vote = v[1];
		w->ew_commit = v[2];
		return 0;
	case WAL_SNAPSHOT:
		if ((rc = pb_varints(data, len, v, 2, 0, NULL, NULL)) != 0) /* 3.5's conf_state skipped */
			break;
		w->ew_snap_index = v[0];
		w->ew_snap_term = v[1];
		w->ew_has_snapshot = 1;
		return 0;
	default:
		return errf(d->err, d->errlen, STORAGE_ERR_CORRUPT,
			    "wal file %zu offset %zu: unexpected record type %" PRIu64, file, off, type);
	}
	return errf(d->err, d->errlen, STORAGE_ERR_CORRUPT,
		    "wal file %zu offset %zu: a record of type %" PRIu64 " does not decode", file, off,
		    type);
}

/* Decodes one file. 1: a torn tail ended the log (only in the last file). */
static int decode_file(wal_decoder *d, const uint8_t *p, size_t n, size_t file, int last)
{
	size_t off = 0;
	for (;;) {
		if (n - off < 8) {
			if (n == off || all_zero(p + off, n - off))
				return 0;
			if (last)
				return 1;
			return errf(d->err, d->errlen, STORAGE_ERR_CORRUPT,
				    "wal file %zu offset %zu: truncated length word", file, off);
		}
		uint64_t word = le64(p + off);
		if (word == 0)
			return 0; /* preallocated space: the end of this file */
		uint64_t len = word & ~(0xffULL << 56);
		unsigned top = (unsigned)(word >> 56), pad = top & 0x80 ? top & 7 : 0;
		if ((top != 0 && top != (0x80u | pad)) || (len + pad) % 8 != 0 || len == 0 ||
		    len > WAL_MAX_RECORD)
			return errf(d->err, d->errlen, STORAGE_ERR_CORRUPT,
				    "wal file %zu offset %zu: bad frame length word %016" PRIx64, file,
				    off, word);
		if (len + pad > n - off - 8) {
			if (last)
				return 1; /* cut short by the end of the file: a torn write */
			return errf(d->err, d->errlen, STORAGE_ERR_CORRUPT,
				    "wal file %zu offset %zu: record of %" PRIu64
				    " bytes runs past the end of the file (%zu bytes)",
				    file, off, len, n);
		}
		const uint8_t *frame = p + off + 8;
		const uint8_t *e = frame + len, *q = frame;
		uint64_t type = 0, crc = 0;
		const uint8_t *data = NULL;
		size_t dlen = 0;
		int has_type = 0, has_crc = 0, rc;
		pb_field f;
		while ((rc = pb_next(&q, e, &f)) == 1) {
			if (f.pf_num == 1 && f.pf_wire == 0) {
				type = f.pf_varint;
				has_type = 1;
			} else if (f.pf_num == 2 && f.pf_wire == 0 && f.pf_varint <= UINT32_MAX) {
				crc = f.pf_varint;
				has_crc = 1;
			} else if (f.pf_num == 3 && f.pf_wire == 2) {
				data = f.pf_bytes;
				dlen = f.pf_len;
			} else if (f.pf_num <= 3) {
				rc = STORAGE_ERR_CORRUPT;
				break;
			}
		}
		int bad = rc != 0 || !has_type;
		uint32_t want = d->crc;
		if (!bad && type != WAL_CRC) {
			want = crc32c(d->crc, data ? data : (const uint8_t *)"", dlen);
			bad = !has_crc || (uint32_t)crc != want;
		}
		if (bad) {
			if (last && torn(frame, len + pad, off + 8))
				return 1;
			if (rc != 0 || !has_type)
				return errf(d->err, d->errlen, STORAGE_ERR_CORRUPT,
					    "wal file %zu offset %zu: record does not decode", file, off);
			return errf(d->err, d->errlen, STORAGE_ERR_CORRUPT,
				    "wal file %zu offset %zu: CRC mismatch (record %08x, computed %08x)",
				    file, off, (unsigned)crc, (unsigned)want);
		}
		if (pad && !all_zero(e, pad))
			return errf(d->err, d->errlen, STORAGE_ERR_CORRUPT,
				    "wal file %zu offset %zu: non-zero padding", file, off);
		if (type == WAL_CRC) {
			/* The chain's value at the cut; 0 before anything was read (etcd checks
			 * only a decoder that has read something). */
			if (d->crc != 0 && (uint32_t)crc != d->crc)
				return errf(d->err, d->errlen, STORAGE_ERR_CORRUPT,
					    "wal file %zu offset %zu: CRC chain broken (file starts at "
					    "%08x, the previous file ended at %08x)",
					    file, off, (unsigned)crc, (unsigned)d->crc);
			d->crc = (uint32_t)crc;
		} else {
			d->crc = want;
			if ((rc = take_record(d, type, data ? data : (const uint8_t *)"", dlen, file, off)))
				return rc;
		}
		d->w->ew_records++;
		off += 8 + len + pad;
	}
}

int storage_etcd_wal_decode(const uint8_t *const *files, const size_t *lens, size_t n,
			    storage_etcd_wal *w, char *errbuf, size_t errlen)
{
	wal_decoder d;
	memset(&d, 0, sizeof(d));
	memset(w, 0, sizeof(*w));
	d.w = w;
	d.err = errbuf;
	d.errlen = errlen;
	if (errbuf && errlen)
		errbuf[0] = '\0';
	if (n == 0)
		return errf(errbuf, errlen, STORAGE_ERR_CORRUPT, "no wal files");
	int rc = 0;
	for (size_t i = 0; i < n && rc == 0; i++) {
		rc = decode_file(&d, files[i], lens[i], i, i + 1 == n);
		if (rc == 1) {
			w->ew_torn_tail = 1;
			rc = 0;
		}
		w->ew_files++;
	}
	if (rc == 0 && !w->ew_has_metadata)
		rc = errf(errbuf, errlen, STORAGE_ERR_CORRUPT, "wal has no metadata record");
	if (rc) {
		free(w->ew_entries);
		memset(w, 0, sizeof(*w));
	}
	return rc;
}

const storage_etcd_wal_entry *storage_etcd_wal_entry_at(const storage_etcd_wal *w, uint64_t index)
{
	if (w->ew_n_entries == 0 || index < w->ew_entries[0].we_index ||
	    index - w->ew_entries[0].we_index >= w->ew_n_entries)
		return NULL;
	return &w->ew_entries[index - w->ew_entries[0].we_index];
}

/* ---- the files ---- */

typedef struct wal_name {
	uint64_t seq, index;
	char name[40];
} wal_name;

static int cmp_seq(const void *a, const void *b)
{
	const wal_name *x = a, *y = b;
	return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* etcd's parseWALName: exactly %016x-%016x.wal. */
static int parse_name(const char *s, wal_name *out)
{
	if (strlen(s) != 37 || s[16] != '-' || strcmp(s + 33, ".wal") != 0)
		return 0;
	uint64_t v[2] = {0, 0};
	for (int k = 0; k < 2; k++)
		for (int i = 0; i < 16; i++) {
			char c = s[k * 17 + i];
			int x = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
			if (x < 0)
				return 0;
			v[k] = v[k] << 4 | (uint64_t)x;
		}
	out->seq = v[0];
	out->index = v[1];
	memcpy(out->name, s, 38);
	return 1;
}

int storage_etcd_wal_read(const char *dir, storage_etcd_wal *w, char *errbuf, size_t errlen)
{
	memset(w, 0, sizeof(*w));
	DIR *dp = opendir(dir);
	if (dp == NULL)
		return errf(errbuf, errlen, STORAGE_ERR_IO, "open wal dir %s: %s", dir, strerror(errno));
	wal_name *names = NULL;
	size_t n = 0, cap = 0;
	int rc = 0;
	struct dirent *de;
	while ((de = readdir(dp)) != NULL) {
		wal_name wn;
		if (!parse_name(de->d_name, &wn))
			continue; /* etcd ignores other files (0.tmp, ...) */
		if (n == WAL_MAX_FILES) {
			rc = errf(errbuf, errlen, STORAGE_ERR_CORRUPT, "more than %d wal files", WAL_MAX_FILES);
			break;
		}
		if (n == cap) {
			cap = cap ? cap * 2 : 16;
			wal_name *nn = realloc(names, cap * sizeof(*nn));
			if (nn == NULL) {
				rc = errf(errbuf, errlen, STORAGE_ERR_NOMEM, "out of memory");
				break;
			}
			names = nn;
		}
		names[n++] = wn;
	}
	closedir(dp);
	if (rc == 0 && n == 0)
		rc = errf(errbuf, errlen, STORAGE_ERR_CORRUPT, "no wal files in %s", dir);
	if (rc == 0)
		qsort(names, n, sizeof(*names), cmp_seq);
	for (size_t i = 1; rc == 0 && i < n; i++)
		if (names[i].seq != names[i - 1].seq + 1)
			rc = errf(errbuf, errlen, STORAGE_ERR_CORRUPT,
				  "wal files out of sequence: %s follows %s", names[i].name,
				  names[i - 1].name);
	const uint8_t **maps = NULL;
	size_t *lens = NULL;
	if (rc == 0) {
		maps = calloc(n, sizeof(*maps));
		lens = calloc(n, sizeof(*lens));
		if (maps == NULL || lens == NULL)
			rc = errf(errbuf, errlen, STORAGE_ERR_NOMEM, "out of memory");
	}
	for (size_t i = 0; rc == 0 && i < n; i++) {
		char path[4096];
		snprintf(path, sizeof(path), "%s/%s", dir, names[i].name);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		struct stat st;
		if (fd < 0 || fstat(fd, &st) != 0) {
			rc = errf(errbuf, errlen, STORAGE_ERR_IO, "open %s: %s", path, strerror(errno));
		} else if (st.st_size > 0) {
			void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
			if (m == MAP_FAILED)
				rc = errf(errbuf, errlen, STORAGE_ERR_IO, "mmap %s: %s", path, strerror(errno));
			else {
				maps[i] = m;
				lens[i] = (size_t)st.st_size;
			}
		} else {
			maps[i] = (const uint8_t *)"";
		}
		if (fd >= 0)
			close(fd);
	}
	if (rc == 0) {
		char eb[256] = "";
		rc = storage_etcd_wal_decode(maps, lens, n, w, eb, sizeof(eb));
		if (rc) {
			/* Name the file rather than its position. */
			const char *p = strstr(eb, "wal file ");
			unsigned long k;
			if (p == eb && sscanf(eb, "wal file %lu", &k) == 1 && k < n) {
				const char *rest = strchr(eb + 9, ' ');
				errf(errbuf, errlen, rc, "%s/%s%s", dir, names[k].name, rest ? rest : "");
			} else {
				errf(errbuf, errlen, rc, "%s: %s", dir, eb);
			}
		}
	}
	if (rc == 0) {
		w->ew__maps = (void **)maps;
		w->ew__lens = lens;
		w->ew__n = n;
		w->ew_first_seq = names[0].seq;
	} else {
		for (size_t i = 0; maps && i < n; i++)
			if (maps[i] && lens[i])
				munmap((void *)maps[i], lens[i]);
		free(maps);
		free(lens);
	}
	free(names);
	return rc;
}

void storage_etcd_wal_free(storage_etcd_wal *w)
{
	for (size_t i = 0; i < w->ew__n; i++)
		if (w->ew__maps[i] && w->ew__lens[i])
			munmap(w->ew__maps[i], w->ew__lens[i]);
	free(w->ew__maps);
	free(w->ew__lens);
	free(w->ew_entries);
	memset(w, 0, sizeof(*w));
}
