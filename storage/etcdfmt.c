/*
 * etcdfmt.c - etcd's backend file (a bbolt database with etcd's buckets), both ways.
 *
 * bbolt, as etcd 3.4/3.5 use it (go.etcd.io/bbolt: page.go, node.go, db.go, bucket.go,
 * freelist.go, tx.go):
 *   - The file is an array of pages. Page 0 and page 1 are meta pages; the valid one with the
 *     higher txid is current. A meta (after the 16-byte page header) is magic 0xED0CDAED,
 *     version 2, page size, flags, root bucket {root pgid, sequence}, freelist pgid (all ones:
 *     not written, the free pages are the unreachable ones), pgid (high-water mark: pages in
 *     use), txid, and an FNV-1a 64 checksum of the 56 bytes before it. Little-endian.
 *   - Page header: id u64, flags u16 (branch 1, leaf 2, meta 4, freelist 0x10), count u16,
 *     overflow u32 (a node larger than a page spans 1 + overflow contiguous pages).
 *   - Branch element: pos u32, ksize u32, child pgid u64; leaf element: flags u32 (1: the
 *     value is a bucket), pos u32, ksize u32, vsize u32. pos counts from the element itself;
 *     key and value follow each other.
 *   - A bucket value is {root pgid u64, sequence u64}; root 0 means inline: a leaf page
 *     (header and elements) follows in the value itself. The root bucket holds the buckets.
 *   - Freelist page: count u16 in the header (0xFFFF: the first u64 is the count), then the
 *     free page ids as u64.
 *
 * The writer plans each bucket's B+tree in a first pass over its entries (leaves packed up to
 * a page, then branch levels), assigns page ids in the order pages will be written (metas,
 * freelist, each bucket's leaves then branches, the root bucket last), writes the meta pages,
 * then renders every page in a second pass over the same read transaction. Small buckets
 * (a page header plus elements up to a quarter page, bbolt's rule) are written inline.
 *
 * The reader maps the file and trusts nothing: every offset is checked against the page it
 * is in and every page id against the high-water mark and the file size; each page may be
 * used once (which also stops cycles); keys must increase; with a freelist, every page is
 * either reachable or free, never both (bbolt's tx.Check).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "crc32c/crc32c.h"
#include "storage/internal.h"

#define BB_MAGIC 0xED0CDAEDu
#define BB_VERSION 2
#define BB_PAGE 4096
#define BB_HDR 16
#define BB_ELEM 16
#define BB_BRANCH 0x01
#define BB_LEAF 0x02
#define BB_META 0x04
#define BB_FREELIST 0x10
#define BB_BUCKET_FLAG 0x01
#define BB_NO_FREELIST UINT64_MAX
#define BB_META_CKSUM_OFF 56 /* checksummed bytes of the meta struct */
#define BB_BUCKET_HDR 16
#define BB_MAX_DEPTH 64      /* far beyond any real tree; stops runaway recursion */
#define ETCD_REV_LEN 17
#define IMPORT_CHUNK 100000  /* revisions per import transaction */

/* ---- little helpers ---- */

static void le16_put(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void le32_put(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}
static void le64_put(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}
static uint16_t le16_get(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t le32_get(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t le64_get(const uint8_t *p)
{
	return (uint64_t)le32_get(p) | (uint64_t)le32_get(p + 4) << 32;
}

static uint64_t fnv1a64(const uint8_t *p, size_t n)
{
	uint64_t h = 14695981039346656037ull;
	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= 1099511628211ull;
	}
	return h;
}

/* etcdctl snapshot status hashes the buckets with CRC-32C (crc32c/). */

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

/* ---- protobuf bits: mvccpb.KeyValue and leasepb.Lease ---- */

typedef kvrec ekv;

/* leasepb.Lease: ID = 1, TTL = 2, RemainingTTL = 3 (a checkpoint's; 0 or absent: none). */
static int lease_decode(const uint8_t *p, size_t n, int64_t *id, int64_t *ttl, int64_t *remaining)
{
	const uint8_t *e = p + n;
	*id = *ttl = *remaining = 0;
	while (p < e) {
		uint64_t tag, v;
		if (storage__varint_get(&p, e, &tag))
			return -1;
		switch (tag & 7) {
		case 0:
			if (storage__varint_get(&p, e, &v))
				return -1;
			if (tag >> 3 == 1)
				*id = (int64_t)v;
			else if (tag >> 3 == 2)
				*ttl = (int64_t)v;
			else if (tag >> 3 == 3)
				*remaining = (int64_t)v;
			break;
		case 2:
			if (storage__varint_get(&p, e, &v) || v > (uint64_t)(e - p))
				return -1;
			p += v;
			break;
		case 1:
			if (e - p < 8)
				return -1;
			p += 8;
			break;
		case 5:
			if (e - p < 4)
				return -1;
			p += 4;
			break;
		default:
			return -1;
		}
	}
	return 0;
}

static size_t lease_encode(uint8_t *buf, int64_t id, int64_t ttl, int64_t remaining)
{
	uint8_t *p = buf;
	if (id) {
		*p++ = 0x08;
		p = storage__varint_put(p, (uint64_t)id);
	}
	if (ttl) {
		*p++ = 0x10;
		p = storage__varint_put(p, (uint64_t)ttl);
	}
	if (remaining) {
		*p++ = 0x18;
		p = storage__varint_put(p, (uint64_t)remaining);
	}
	return (size_t)(p - buf);
}

static void etcd_rev_put(uint8_t *p, int64_t main, int64_t sub)
{
	be64_put(p, (uint64_t)main);
	p[8] = '_';
	be64_put(p + 9, (uint64_t)sub);
}

/* ---- SHA-256 ---- */

int storage_sha256_init(storage_sha256 *h)
{
	EVP_MD_CTX *c = EVP_MD_CTX_new();
	if (!c)
		return STORAGE_ERR_NOMEM;
	if (EVP_DigestInit_ex(c, EVP_sha256(), NULL) != 1) {
		EVP_MD_CTX_free(c);
		return STORAGE_ERR_NOMEM;
	}
	h->sh_ctx = c;
	return 0;
}

void storage_sha256_update(storage_sha256 *h, const void *p, size_t n)
{
	EVP_DigestUpdate(h->sh_ctx, p, n);
}

void storage_sha256_final(storage_sha256 *h, uint8_t out[32])
{
	unsigned int len = 32;
	EVP_DigestFinal_ex(h->sh_ctx, out, &len);
	EVP_MD_CTX_free(h->sh_ctx);
	h->sh_ctx = NULL;
}

/* ======================================================================================
 * Writer
 * ====================================================================================== */

/* One entry of a bucket; bytes valid until the next entry is asked for. */
typedef struct bb_ent {
	const uint8_t *k;
	size_t kl;
	const uint8_t *v;
	size_t vl;
	uint32_t fl;
} bb_ent;

/* A bucket's entries in key order: from memory, or from the revision table. */
typedef struct wsrc {
	int ws_revs;             /* 1: the revision table of ws_r */
	const bb_ent *ws_ents;   /* memory */
	size_t ws_n, ws_i;
	storage_reader *ws_r;    /* revision table */
	MDB_cursor *ws_cur;
	int ws_started;
	uint8_t ws_key[ETCD_REV_LEN + 1];
	uint8_t *ws_tbuf;        /* a tombstone's KeyValue{key} */
	size_t ws_tcap;
} wsrc;

static void wsrc_close(wsrc *s)
{
	if (s->ws_cur)
		mdb_cursor_close(s->ws_cur);
	s->ws_cur = NULL;
	free(s->ws_tbuf);
	s->ws_tbuf = NULL;
	s->ws_tcap = 0;
}

static int wsrc_rewind(wsrc *s)
{
	s->ws_i = 0;
	s->ws_started = 0;
	if (!s->ws_revs)
		return 0;
	if (s->ws_cur)
		mdb_cursor_close(s->ws_cur);
	s->ws_cur = NULL;
	return storage__mdb_err(mdb_cursor_open(s->ws_r->r_txn, s->ws_r->r_s->s_revs, &s->ws_cur));
}

/* Whether the revision record h at (main, sub) is what etcd keeps after a compaction at the
 * reader's compacted revision (storage_hash_kv's rule: each key's newest revision at or
 * below it, unless a tombstone). */
static int rev_kept(storage_reader *r, int64_t main, int64_t sub, const rev_hdr *h, int *keep)
{
	*keep = 1;
	if (r->r_compact < 0 || main > r->r_compact)
		return 0;
	return storage__rev_newest_at(r->r_s, r->r_txn, h, main, sub, r->r_compact, keep);
}

/* 1 with an entry, 0 at the end, or an error. */
static int wsrc_next(wsrc *s, bb_ent *e)
{
	if (!s->ws_revs) {
		if (s->ws_i >= s->ws_n)
			return 0;
		*e = s->ws_ents[s->ws_i++];
		return 1;
	}
	for (;;) {
		MDB_val k, v;
		int rc = mdb_cursor_get(s->ws_cur, &k, &v, s->ws_started ? MDB_NEXT : MDB_FIRST);
		s->ws_started = 1;
		if (rc == MDB_NOTFOUND)
			return 0;
		if (rc)
			return storage__mdb_err(rc);
		rev_hdr h;
		if (k.mv_size != REV_KEY_SIZE || storage__rev_parse(&v, &h))
			return STORAGE_ERR_CORRUPT;
		int64_t main = (int64_t)be64_get(k.mv_data);
		int64_t sub = (int64_t)be64_get((uint8_t *)k.mv_data + 8);
		int tomb = h.tomb, keep, err;
		if ((err = rev_kept(s->ws_r, main, sub, &h, &keep)))
			return err;
		if (!keep)
			continue;
		etcd_rev_put(s->ws_key, main, sub);
		e->k = s->ws_key;
		e->kl = ETCD_REV_LEN;
		e->fl = 0;
		if (!tomb) {
			e->v = h.kv;
			e->vl = h.kvlen;
			return 1;
		}
		/* etcd writes a tombstone as KeyValue{key} under the revision plus 't'. */
		s->ws_key[ETCD_REV_LEN] = 't';
		e->kl = ETCD_REV_LEN + 1;
		ekv r;
		if (storage__kv_decode(h.kv, h.kvlen, &r))
			return STORAGE_ERR_CORRUPT;
		ekv t = {0};
		t.key = r.key;
		t.klen = r.klen;
		size_t n = storage__kv_size(&t);
		if (n > s->ws_tcap) {
			uint8_t *nb = realloc(s->ws_tbuf, n);
			if (!nb)
				return STORAGE_ERR_NOMEM;
			s->ws_tbuf = nb;
			s->ws_tcap = n;
		}
		storage__kv_encode(s->ws_tbuf, &t);
		e->v = s->ws_tbuf;
		e->vl = n;
		return 1;
	}
}

/* A planned node: a page (plus overflow) of a bucket's tree. */
typedef struct pnode {
	uint8_t *key;   /* first key (copy) */
	size_t klen;
	uint64_t pgid;
	uint32_t npages;
	uint32_t count; /* elements */
	size_t first;   /* branch: first child in the level below */
} pnode;

typedef struct plevel {
	pnode *n;
	size_t len, cap;
} plevel;

typedef struct ptree {
	plevel lv[BB_MAX_DEPTH];
	int nlv;            /* lv[0]: leaves */
	uint64_t npages;    /* pages the tree takes (0 if inline) */
	uint64_t root;
	uint8_t *inl;       /* inline bucket value (bucket header + leaf page), or NULL */
	size_t inl_len;
} ptree;

static void ptree_free(ptree *t)
{
	for (int i = 0; i < t->nlv; i++) {
		for (size_t j = 0; j < t->lv[i].len; j++)
			free(t->lv[i].n[j].key);
		free(t->lv[i].n);
	}
	free(t->inl);
	memset(t, 0, sizeof(*t));
}

static int plevel_push(plevel *l, const uint8_t *key, size_t klen, size_t bytes, uint32_t count,
		       size_t first)
{
	if (l->len == l->cap) {
		size_t cap = l->cap ? l->cap * 2 : 16;
		pnode *n = realloc(l->n, cap * sizeof(*n));
		if (!n)
			return STORAGE_ERR_NOMEM;
		l->n = n;
		l->cap = cap;
	}
	pnode *p = &l->n[l->len];
	memset(p, 0, sizeof(*p));
	p->key = malloc(klen ? klen : 1);
	if (!p->key)
		return STORAGE_ERR_NOMEM;
	if (klen)
		memcpy(p->key, key, klen);
	p->klen = klen;
	p->npages = (uint32_t)((bytes + BB_PAGE - 1) / BB_PAGE);
	p->count = count;
	p->first = first;
	l->len++;
	return 0;
}

/* Leaves: greedy packing up to a page; an entry that fits no page gets one with overflow. */
static int plan_leaves(ptree *t, wsrc *s, int *has_buckets)
{
	plevel *l = &t->lv[0];
	t->nlv = 1;
	size_t size = BB_HDR;
	uint32_t count = 0;
	uint8_t *first = NULL;
	size_t firstlen = 0;
	int err = wsrc_rewind(s), rc;
	bb_ent e;
	*has_buckets = 0;
	while (!err && (rc = wsrc_next(s, &e)) == 1) {
		size_t need = BB_ELEM + e.kl + e.vl;
		if (e.fl & BB_BUCKET_FLAG)
			*has_buckets = 1;
		if (count && (size + need > BB_PAGE || count == UINT16_MAX)) {
			err = plevel_push(l, first, firstlen, size, count, 0);
			size = BB_HDR;
			count = 0;
		}
		if (!err && count == 0) {
			free(first);
			first = malloc(e.kl ? e.kl : 1);
			if (!first) {
				err = STORAGE_ERR_NOMEM;
				break;
			}
			memcpy(first, e.k, e.kl);
			firstlen = e.kl;
		}
		size += need;
		count++;
	}
	if (!err && rc < 0)
		err = rc;
	/* The last leaf, or the one empty leaf of an empty bucket. */
	if (!err && (count || l->len == 0))
		err = plevel_push(l, first, firstlen, size, count, 0);
	free(first);
	return err;
}

static int plan_branches(ptree *t)
{
	while (t->lv[t->nlv - 1].len > 1) {
		if (t->nlv == BB_MAX_DEPTH)
			return STORAGE_ERR_INVALID;
		plevel *below = &t->lv[t->nlv - 1], *l = &t->lv[t->nlv];
		memset(l, 0, sizeof(*l));
		t->nlv++;
		size_t size = BB_HDR, first = 0;
		uint32_t count = 0;
		for (size_t i = 0; i < below->len; i++) {
			size_t need = BB_ELEM + below->n[i].klen;
			if (count && (size + need > BB_PAGE || count == UINT16_MAX)) {
				int err = plevel_push(l, below->n[first].key, below->n[first].klen,
						      size, count, first);
				if (err)
					return err;
				size = BB_HDR;
				count = 0;
				first = i;
			}
			size += need;
			count++;
		}
		int err = plevel_push(l, below->n[first].key, below->n[first].klen, size, count, first);
		if (err)
			return err;
	}
	return 0;
}

/* Renders the leaf of count entries from s into buf (npages * BB_PAGE, zeroed). */
static int render_leaf(uint8_t *buf, size_t bufsize, uint64_t pgid, uint32_t count, wsrc *s)
{
	le64_put(buf, pgid);
	le16_put(buf + 8, BB_LEAF);
	le16_put(buf + 10, (uint16_t)count);
	le32_put(buf + 12, (uint32_t)(bufsize / BB_PAGE - 1));
	size_t data = BB_HDR + (size_t)count * BB_ELEM;
	for (uint32_t i = 0; i < count; i++) {
		bb_ent e;
		int rc = wsrc_next(s, &e);
		if (rc < 0)
			return rc;
		if (rc == 0 || data + e.kl + e.vl > bufsize)
			return STORAGE_ERR_CORRUPT; /* the data changed between the passes */
		uint8_t *el = buf + BB_HDR + (size_t)i * BB_ELEM;
		le32_put(el, e.fl);
		le32_put(el + 4, (uint32_t)(data - (BB_HDR + (size_t)i * BB_ELEM)));
		le32_put(el + 8, (uint32_t)e.kl);
		le32_put(el + 12, (uint32_t)e.vl);
		memcpy(buf + data, e.k, e.kl);
		if (e.vl)
			memcpy(buf + data + e.kl, e.v, e.vl);
		data += e.kl + e.vl;
	}
	return 0;
}

/* Plans bucket tree t over s. Inline if it may be (bbolt's Bucket.inlineable). */
static int plan_tree(ptree *t, wsrc *s, int allow_inline)
{
	int has_buckets;
	int err = plan_leaves(t, s, &has_buckets);
	if (err)
		return err;
	if (allow_inline && !has_buckets && t->lv[0].len == 1) {
		size_t size = BB_HDR;
		/* the leaf's size: recount, entries are few */
		bb_ent e;
		int rc;
		if ((err = wsrc_rewind(s)))
			return err;
		while ((rc = wsrc_next(s, &e)) == 1)
			size += BB_ELEM + e.kl + e.vl;
		if (rc < 0)
			return rc;
		if (size <= BB_PAGE / 4) {
			t->inl_len = BB_BUCKET_HDR + size;
			t->inl = calloc(1, t->inl_len > BB_PAGE ? t->inl_len : BB_PAGE);
			if (!t->inl)
				return STORAGE_ERR_NOMEM;
			if ((err = wsrc_rewind(s)))
				return err;
			err = render_leaf(t->inl + BB_BUCKET_HDR, BB_PAGE, 0, t->lv[0].n[0].count, s);
			le32_put(t->inl + BB_BUCKET_HDR + 12, 0);
			return err;
		}
	}
	return plan_branches(t);
}

static uint64_t assign_pages(ptree *t, uint64_t next)
{
	if (t->inl)
		return next;
	uint64_t start = next;
	for (int i = 0; i < t->nlv; i++)
		for (size_t j = 0; j < t->lv[i].len; j++) {
			t->lv[i].n[j].pgid = next;
			next += t->lv[i].n[j].npages;
		}
	t->root = t->lv[t->nlv - 1].n[0].pgid;
	t->npages = next - start;
	return next;
}

typedef struct wout {
	storage_write_fn w_fn;
	void *w_ctx;
	uint64_t w_off;
	uint8_t *w_buf; /* a scratch page buffer */
	size_t w_cap;
} wout;

static int wout_write(wout *o, const void *p, size_t n)
{
	int rc = o->w_fn(o->w_ctx, p, n);
	o->w_off += n;
	return rc;
}

static uint8_t *wout_buf(wout *o, size_t n)
{
	if (n > o->w_cap) {
		free(o->w_buf);
		o->w_buf = malloc(n);
		o->w_cap = o->w_buf ? n : 0;
	}
	if (o->w_buf)
		memset(o->w_buf, 0, n);
	return o->w_buf;
}

static int emit_tree(ptree *t, wsrc *s, wout *o)
{
	if (t->inl)
		return 0;
	int err = wsrc_rewind(s);
	if (err)
		return err;
	plevel *leaves = &t->lv[0];
	for (size_t j = 0; j < leaves->len; j++) {
		pnode *n = &leaves->n[j];
		size_t size = (size_t)n->npages * BB_PAGE;
		uint8_t *buf = wout_buf(o, size);
		if (!buf)
			return STORAGE_ERR_NOMEM;
		if (o->w_off != n->pgid * BB_PAGE)
			return STORAGE_ERR_CORRUPT;
		if ((err = render_leaf(buf, size, n->pgid, n->count, s)))
			return err;
		if ((err = wout_write(o, buf, size)))
			return err;
	}
	bb_ent e;
	int rc = wsrc_next(s, &e);
	if (rc != 0)
		return rc < 0 ? rc : STORAGE_ERR_CORRUPT;
	for (int i = 1; i < t->nlv; i++) {
		plevel *l = &t->lv[i], *below = &t->lv[i - 1];
		for (size_t j = 0; j < l->len; j++) {
			pnode *n = &l->n[j];
			size_t size = (size_t)n->npages * BB_PAGE;
			uint8_t *buf = wout_buf(o, size);
			if (!buf)
				return STORAGE_ERR_NOMEM;
			if (o->w_off != n->pgid * BB_PAGE)
				return STORAGE_ERR_CORRUPT;
			le64_put(buf, n->pgid);
			le16_put(buf + 8, BB_BRANCH);
			le16_put(buf + 10, (uint16_t)n->count);
			le32_put(buf + 12, n->npages - 1);
			size_t data = BB_HDR + (size_t)n->count * BB_ELEM;
			for (uint32_t c = 0; c < n->count; c++) {
				pnode *ch = &below->n[n->first + c];
				uint8_t *el = buf + BB_HDR + (size_t)c * BB_ELEM;
				le32_put(el, (uint32_t)(data - (BB_HDR + (size_t)c * BB_ELEM)));
				le32_put(el + 4, (uint32_t)ch->klen);
				le64_put(el + 8, ch->pgid);
				memcpy(buf + data, ch->key, ch->klen);
				data += ch->klen;
			}
			if ((err = wout_write(o, buf, size)))
				return err;
		}
	}
	return 0;
}

/* ---- the small buckets, built in memory ---- */

typedef struct membuf {
	bb_ent *ents;
	size_t n, cap;
	char **owned; /* allocations to free */
	size_t nowned, capowned;
} membuf;

static void *membuf_own(membuf *m, void *p)
{
	if (!p)
		return NULL;
	if (m->nowned == m->capowned) {
		size_t cap = m->capowned ? m->capowned * 2 : 32;
		char **n = realloc(m->owned, cap * sizeof(*n));
		if (!n) {
			free(p);
			return NULL;
		}
		m->owned = n;
		m->capowned = cap;
	}
	m->owned[m->nowned++] = p;
	return p;
}

static void membuf_free(membuf *m)
{
	for (size_t i = 0; i < m->nowned; i++)
		free(m->owned[i]);
	free(m->owned);
	free(m->ents);
	memset(m, 0, sizeof(*m));
}

/* Adds an entry whose bytes outlive the snapshot call (or are owned by m). */
static int membuf_add(membuf *m, const void *k, size_t kl, const void *v, size_t vl, uint32_t fl)
{
	if (m->n == m->cap) {
		size_t cap = m->cap ? m->cap * 2 : 16;
		bb_ent *n = realloc(m->ents, cap * sizeof(*n));
		if (!n)
			return STORAGE_ERR_NOMEM;
		m->ents = n;
		m->cap = cap;
	}
	bb_ent e = {k, kl, v, vl, fl};
	m->ents[m->n++] = e;
	return 0;
}

static int membuf_add_copy(membuf *m, const void *k, size_t kl, const void *v, size_t vl)
{
	uint8_t *p = membuf_own(m, malloc(kl + vl + 1));
	if (!p)
		return STORAGE_ERR_NOMEM;
	memcpy(p, k, kl);
	if (vl)
		memcpy(p + kl, v, vl);
	return membuf_add(m, p, kl, p + kl, vl, 0);
}

static int ent_cmp(const void *x, const void *y)
{
	const bb_ent *a = x, *b = y;
	return storage__bytes_cmp(a->k, a->kl, b->k, b->kl);
}

/* Sorts the entries; a key given twice is STORAGE_ERR_INVALID. */
static int membuf_sort(membuf *m)
{
	if (m->n > 1)
		qsort(m->ents, m->n, sizeof(*m->ents), ent_cmp);
	for (size_t i = 1; i < m->n; i++)
		if (ent_cmp(&m->ents[i - 1], &m->ents[i]) == 0)
			return STORAGE_ERR_INVALID;
	return 0;
}

/* A growable string for JSON. */
typedef struct sbuf {
	char *p;
	size_t n, cap;
	int oom;
} sbuf;

static void sb_putn(sbuf *b, const char *s, size_t n)
{
	if (b->oom)
		return;
	if (b->n + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 64;
		while (cap < b->n + n + 1)
			cap *= 2;
		char *np = realloc(b->p, cap);
		if (!np) {
			b->oom = 1;
			return;
		}
		b->p = np;
		b->cap = cap;
	}
	memcpy(b->p + b->n, s, n);
	b->n += n;
	b->p[b->n] = 0;
}
static void sb_puts(sbuf *b, const char *s) { sb_putn(b, s, strlen(s)); }

/* A JSON string as Go's encoding/json writes it (<, >, & escaped too). */
static void sb_json_str(sbuf *b, const char *s)
{
	static const char hex[] = "0123456789abcdef";
	sb_putn(b, "\"", 1);
	for (const unsigned char *p = (const unsigned char *)(s ? s : ""); *p; p++) {
		unsigned char c = *p;
		if (c == '"' || c == '\\') {
			char e[2] = {'\\', (char)c};
			sb_putn(b, e, 2);
		} else if (c == '\n') {
			sb_puts(b, "\\n");
		} else if (c == '\r') {
			sb_puts(b, "\\r");
		} else if (c == '\t') {
			sb_puts(b, "\\t");
		} else if (c < 0x20 || c == '<' || c == '>' || c == '&') {
			char e[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
			sb_putn(b, e, 6);
		} else {
			sb_putn(b, (const char *)p, 1);
		}
	}
	sb_putn(b, "\"", 1);
}

static void sb_json_strs(sbuf *b, const char *const *v, size_t n)
{
	sb_puts(b, "[");
	for (size_t i = 0; i < n; i++) {
		if (i)
			sb_puts(b, ",");
		sb_json_str(b, v[i]);
	}
	sb_puts(b, "]");
}

/* etcd 3.4's membership.Member as encoding/json writes it (store.go mustSaveMemberToBackend):
 * {"id":N,"peerURLs":[...],"isLearner":true?,"name":"..."?,"clientURLs":[...]?} */
static char *member_json(const storage_etcd_member *m, size_t *len)
{
	sbuf b = {0};
	char num[32];
	snprintf(num, sizeof(num), "%llu", (unsigned long long)m->em_id);
	sb_puts(&b, "{\"id\":");
	sb_puts(&b, num);
	sb_puts(&b, ",\"peerURLs\":");
	if (m->em_n_peer_urls)
		sb_json_strs(&b, m->em_peer_urls, m->em_n_peer_urls);
	else
		sb_puts(&b, "null");
	if (m->em_is_learner)
		sb_puts(&b, ",\"isLearner\":true");
	if (m->em_name && *m->em_name) {
		sb_puts(&b, ",\"name\":");
		sb_json_str(&b, m->em_name);
	}
	if (m->em_n_client_urls) {
		sb_puts(&b, ",\"clientURLs\":");
		sb_json_strs(&b, m->em_client_urls, m->em_n_client_urls);
	}
	sb_puts(&b, "}");
	if (b.oom) {
		free(b.p);
		return NULL;
	}
	*len = b.n;
	return b.p;
}

static const char *const std_buckets[] = {
	"alarm", "auth", "authRoles", "authUsers", "cluster", "key",
	"lease", "members", "members_removed", "meta",
};
#define N_STD_BUCKETS (sizeof(std_buckets) / sizeof(std_buckets[0]))
#define MAX_BUCKETS 64

typedef struct wbucket {
	const char *name;
	membuf mem;
	wsrc src;
	ptree tree;
} wbucket;

static wbucket *bucket_get(wbucket *bs, size_t *n, const char *name)
{
	for (size_t i = 0; i < *n; i++)
		if (strcmp(bs[i].name, name) == 0)
			return &bs[i];
	if (*n == MAX_BUCKETS || !*name)
		return NULL;
	wbucket *b = &bs[(*n)++];
	memset(b, 0, sizeof(*b));
	b->name = name;
	return b;
}

static int bucket_name_cmp(const void *x, const void *y)
{
	const wbucket *a = x, *b = y;
	return storage__bytes_cmp(a->name, strlen(a->name), b->name, strlen(b->name));
}

/* Fills the in-memory buckets from r and info. */
static int build_buckets(storage_reader *r, const storage_snapshot_info *info, wbucket *bs,
			 size_t *nb)
{
	int err = 0;
	*nb = 0;
	for (size_t i = 0; i < N_STD_BUCKETS; i++)
		bucket_get(bs, nb, std_buckets[i]);
	wbucket *meta = bucket_get(bs, nb, "meta");
	uint8_t b8[8];
	be64_put(b8, info->si_consistent_index);
	if ((err = membuf_add_copy(&meta->mem, "consistent_index", 16, b8, 8)))
		return err;
	if (info->si_term) {
		be64_put(b8, info->si_term);
		if ((err = membuf_add_copy(&meta->mem, "term", 4, b8, 8)))
			return err;
	}
	if (r->r_compact >= 0) {
		uint8_t rv[ETCD_REV_LEN];
		etcd_rev_put(rv, r->r_compact, 0);
		if ((err = membuf_add_copy(&meta->mem, "finishedCompactRev", 18, rv, sizeof(rv))) ||
		    (err = membuf_add_copy(&meta->mem, "scheduledCompactRev", 19, rv, sizeof(rv))))
			return err;
	}

	wbucket *cl = bucket_get(bs, nb, "cluster");
	const char *cv = info->si_cluster_version ? info->si_cluster_version : "3.4.0";
	if ((err = membuf_add_copy(&cl->mem, "clusterVersion", 14, cv, strlen(cv))))
		return err;

	wbucket *au = bucket_get(bs, nb, "auth");
	uint8_t en = info->si_auth_enabled ? 1 : 0;
	be64_put(b8, info->si_auth_revision ? info->si_auth_revision : 1);
	if ((err = membuf_add_copy(&au->mem, "authEnabled", 11, &en, 1)) ||
	    (err = membuf_add_copy(&au->mem, "authRevision", 12, b8, 8)))
		return err;

	wbucket *mb = bucket_get(bs, nb, "members");
	for (size_t i = 0; i < info->si_n_members; i++) {
		size_t len;
		char id[17];
		char *js = member_json(&info->si_members[i], &len);
		if (!js)
			return STORAGE_ERR_NOMEM;
		snprintf(id, sizeof(id), "%016llx", (unsigned long long)info->si_members[i].em_id);
		err = membuf_add_copy(&mb->mem, id, 16, js, len);
		free(js);
		if (err)
			return err;
	}
	wbucket *rm = bucket_get(bs, nb, "members_removed");
	for (size_t i = 0; i < info->si_n_removed; i++) {
		char id[17];
		snprintf(id, sizeof(id), "%016llx", (unsigned long long)info->si_removed[i]);
		if ((err = membuf_add_copy(&rm->mem, id, 16, "removed", 7)))
			return err;
	}

	wbucket *ls = bucket_get(bs, nb, "lease");
	storage_arena a;
	storage_arena_init(&a);
	int64_t *ids, *ttls, *rems;
	size_t n;
	err = storage_read_leases(r, &a, &ids, &ttls, &rems, &n);
	for (size_t i = 0; !err && i < n; i++) {
		uint8_t k[8], v[40];
		be64_put(k, (uint64_t)ids[i]);
		err = membuf_add_copy(&ls->mem, k, 8, v, lease_encode(v, ids[i], ttls[i], rems[i]));
	}
	storage_arena_free(&a);
	if (err)
		return err;

	for (size_t i = 0; i < info->si_n_extra; i++) {
		const storage_etcd_entry *x = &info->si_extra[i];
		if (!x->ee_bucket || strcmp(x->ee_bucket, "key") == 0)
			return STORAGE_ERR_INVALID;
		wbucket *b = bucket_get(bs, nb, x->ee_bucket);
		if (!b)
			return STORAGE_ERR_INVALID;
		if ((err = membuf_add(&b->mem, x->ee_key, x->ee_klen, x->ee_val, x->ee_vlen, 0)))
			return err;
	}
	for (size_t i = 0; i < *nb; i++) {
		if ((err = membuf_sort(&bs[i].mem)))
			return err;
		if (strcmp(bs[i].name, "key") == 0) {
			bs[i].src.ws_revs = 1;
			bs[i].src.ws_r = r;
		} else {
			bs[i].src.ws_ents = bs[i].mem.ents;
			bs[i].src.ws_n = bs[i].mem.n;
		}
	}
	qsort(bs, *nb, sizeof(*bs), bucket_name_cmp);
	return 0;
}

static void meta_page(uint8_t *p, uint64_t pgid, uint64_t root, uint64_t freelist, uint64_t npages,
		      uint64_t txid)
{
	memset(p, 0, BB_PAGE);
	le64_put(p, pgid);
	le16_put(p + 8, BB_META);
	uint8_t *m = p + BB_HDR;
	le32_put(m, BB_MAGIC);
	le32_put(m + 4, BB_VERSION);
	le32_put(m + 8, BB_PAGE);
	le32_put(m + 12, 0);
	le64_put(m + 16, root);
	le64_put(m + 24, 0);
	le64_put(m + 32, freelist);
	le64_put(m + 40, npages);
	le64_put(m + 48, txid);
	le64_put(m + 56, fnv1a64(m, BB_META_CKSUM_OFF));
}

int storage_snapshot_etcd(storage_reader *r, const storage_snapshot_info *info,
			  storage_write_fn write, void *ctx, uint64_t *size)
{
	static const storage_snapshot_info noinfo;
	wbucket *bs = calloc(MAX_BUCKETS, sizeof(*bs));
	size_t nb = 0;
	membuf rootmem = {0};
	wsrc rootsrc = {0};
	ptree roottree = {0};
	wout o = {write, ctx, 0, NULL, 0};
	int err;
	if (!bs)
		return STORAGE_ERR_NOMEM;
	if ((err = build_buckets(r, info ? info : &noinfo, bs, &nb)))
		goto out;

	/* Plan: pages 0 and 1 are the metas, 2 the (empty) freelist, then the buckets. */
	uint64_t next = 3;
	for (size_t i = 0; i < nb; i++) {
		if ((err = plan_tree(&bs[i].tree, &bs[i].src, 1)))
			goto out;
		next = assign_pages(&bs[i].tree, next);
	}
	for (size_t i = 0; i < nb; i++) {
		ptree *t = &bs[i].tree;
		uint8_t *v = t->inl;
		size_t vl = t->inl_len;
		if (!v) {
			v = membuf_own(&rootmem, malloc(BB_BUCKET_HDR));
			if (!v) {
				err = STORAGE_ERR_NOMEM;
				goto out;
			}
			le64_put(v, t->root);
			le64_put(v + 8, 0);
			vl = BB_BUCKET_HDR;
		}
		if ((err = membuf_add(&rootmem, bs[i].name, strlen(bs[i].name), v, vl, BB_BUCKET_FLAG)))
			goto out;
	}
	rootsrc.ws_ents = rootmem.ents;
	rootsrc.ws_n = rootmem.n;
	if ((err = plan_tree(&roottree, &rootsrc, 0)))
		goto out;
	next = assign_pages(&roottree, next);

	/* Write: metas (txid 0 and 1, as a fresh bbolt file), freelist, trees in page order. */
	uint8_t *page = wout_buf(&o, BB_PAGE);
	if (!page) {
		err = STORAGE_ERR_NOMEM;
		goto out;
	}
	for (uint64_t m = 0; m < 2 && !err; m++) {
		meta_page(page, m, roottree.root, 2, next, m);
		err = wout_write(&o, page, BB_PAGE);
	}
	if (err)
		goto out;
	memset(page, 0, BB_PAGE);
	le64_put(page, 2);
	le16_put(page + 8, BB_FREELIST);
	if ((err = wout_write(&o, page, BB_PAGE)))
		goto out;
	for (size_t i = 0; i < nb && !err; i++)
		err = emit_tree(&bs[i].tree, &bs[i].src, &o);
	if (!err)
		err = emit_tree(&roottree, &rootsrc, &o);
	if (!err && o.w_off != next * BB_PAGE)
		err = STORAGE_ERR_CORRUPT;
	if (!err && size)
		*size = o.w_off;
out:
	for (size_t i = 0; i < nb; i++) {
		wsrc_close(&bs[i].src);
		ptree_free(&bs[i].tree);
		membuf_free(&bs[i].mem);
	}
	free(bs);
	ptree_free(&roottree);
	membuf_free(&rootmem);
	free(o.w_buf);
	return err;
}

typedef struct sha_writer {
	storage_write_fn fn;
	void *ctx;
	storage_sha256 h;
} sha_writer;

static int sha_write(void *ctx, const void *buf, size_t len)
{
	sha_writer *w = ctx;
	storage_sha256_update(&w->h, buf, len);
	return w->fn(w->ctx, buf, len);
}

int storage_snapshot_etcd_stream(storage_reader *r, const storage_snapshot_info *info,
				 storage_write_fn write, void *ctx)
{
	sha_writer w = {write, ctx, {NULL}};
	int err = storage_sha256_init(&w.h);
	if (err)
		return err;
	err = storage_snapshot_etcd(r, info, sha_write, &w, NULL);
	uint8_t sum[32];
	storage_sha256_final(&w.h, sum);
	if (!err)
		err = write(ctx, sum, sizeof(sum));
	return err;
}

/* ======================================================================================
 * Reader
 * ====================================================================================== */

typedef struct bbf {
	const uint8_t *map;
	size_t mapsize;
	size_t dbsize;       /* without the SHA-256 trailer */
	uint32_t psize;
	uint64_t npages;     /* the meta's high-water mark */
	uint64_t root;
	uint64_t freelist;
	int has_sha;
	uint8_t *used;       /* bitmap: pages reachable from the root or the meta */
	uint8_t *freed;      /* bitmap: pages on the freelist */
	char *err;
	size_t errlen;
} bbf;

static int bit_get(const uint8_t *m, uint64_t i) { return m[i >> 3] >> (i & 7) & 1; }
static void bit_set(uint8_t *m, uint64_t i) { m[i >> 3] |= (uint8_t)(1u << (i & 7)); }

static void bbf_close(bbf *f)
{
	if (f->map && f->map != MAP_FAILED)
		munmap((void *)f->map, f->mapsize);
	free(f->used);
	free(f->freed);
	memset(f, 0, sizeof(*f));
}

/* Validates the meta at byte offset off: 0 and its txid, or -1 with why in f->err. */
static int meta_check(bbf *f, size_t off, uint64_t want_id, uint64_t *txid)
{
	if (off + BB_HDR + 64 > f->dbsize)
		return errf(f->err, f->errlen, -1, "meta page %llu: beyond the end of the file",
			    (unsigned long long)want_id);
	const uint8_t *p = f->map + off, *m = p + BB_HDR;
	if (le32_get(m) != BB_MAGIC)
		return errf(f->err, f->errlen, -1, "meta page %llu: bad magic %08x (not a bbolt file)",
			    (unsigned long long)want_id, le32_get(m));
	if (le32_get(m + 4) != BB_VERSION)
		return errf(f->err, f->errlen, -1, "meta page %llu: unsupported version %u",
			    (unsigned long long)want_id, le32_get(m + 4));
	if (le64_get(m + 56) != fnv1a64(m, BB_META_CKSUM_OFF))
		return errf(f->err, f->errlen, -1, "meta page %llu: checksum mismatch",
			    (unsigned long long)want_id);
	if (!(le16_get(p + 8) & BB_META) || le64_get(p) != want_id)
		return errf(f->err, f->errlen, -1, "meta page %llu: bad page header",
			    (unsigned long long)want_id);
	uint32_t ps = le32_get(m + 8);
	if (ps < 512 || ps > 65536 || (ps & (ps - 1)))
		return errf(f->err, f->errlen, -1, "meta page %llu: bad page size %u",
			    (unsigned long long)want_id, ps);
	*txid = le64_get(m + 48);
	return 0;
}

/* Opens and maps path, checks the trailer and picks the meta. */
static int bbf_open(bbf *f, const char *path, int hash_check, char *err, size_t errlen)
{
	memset(f, 0, sizeof(*f));
	f->err = err;
	f->errlen = errlen;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errf(err, errlen, errno == ENOENT ? STORAGE_ERR_NOT_FOUND : STORAGE_ERR_IO,
			    "%s: %s", path, strerror(errno));
	struct stat st;
	if (fstat(fd, &st) != 0) {
		int e = errno;
		close(fd);
		return errf(err, errlen, STORAGE_ERR_IO, "%s: %s", path, strerror(e));
	}
	if (!S_ISREG(st.st_mode)) {
		close(fd);
		return errf(err, errlen, STORAGE_ERR_CORRUPT, "%s: not a regular file", path);
	}
	f->mapsize = (size_t)st.st_size;
	if (f->mapsize < 1024) {
		close(fd);
		return errf(err, errlen, STORAGE_ERR_CORRUPT,
			    "%s: %zu bytes: too short for an etcd backend file (truncated?)", path,
			    f->mapsize);
	}
	f->map = mmap(NULL, f->mapsize, PROT_READ, MAP_PRIVATE, fd, 0);
	close(fd);
	if (f->map == MAP_FAILED) {
		f->map = NULL;
		return errf(err, errlen, STORAGE_ERR_IO, "%s: mmap: %s", path, strerror(errno));
	}
	f->dbsize = f->mapsize;
	/* etcd's rule (snapshot restore): a trailer makes the size 32 past a 512 multiple. */
	if (f->mapsize % 512 == 32) {
		f->dbsize = f->mapsize - 32;
		f->has_sha = 1;
		if (hash_check != STORAGE_ETCD_HASH_SKIP) {
			storage_sha256 h;
			uint8_t sum[32];
			if (storage_sha256_init(&h))
				return STORAGE_ERR_NOMEM;
			storage_sha256_update(&h, f->map, f->dbsize);
			storage_sha256_final(&h, sum);
			if (memcmp(sum, f->map + f->dbsize, 32) != 0)
				return errf(err, errlen, STORAGE_ERR_CORRUPT,
					    "%s: SHA-256 trailer does not match the file (corrupt or "
					    "truncated snapshot)", path);
		}
	} else if (hash_check == STORAGE_ETCD_HASH_REQUIRE) {
		return errf(err, errlen, STORAGE_ERR_CORRUPT,
			    "%s: %zu bytes: no SHA-256 trailer (truncated snapshot? a copied "
			    "member/snap/db needs the hash check skipped)", path, f->mapsize);
	}

	/* bbolt: the page size comes from meta 0; if it is damaged, look for meta 1 at the
	 * usual page size. The valid meta with the higher txid wins. */
	char e0[256] = "", e1[256] = "";
	uint64_t tx0 = 0, tx1 = 0;
	f->err = e0;
	f->errlen = sizeof(e0);
	int ok0 = meta_check(f, 0, 0, &tx0) == 0;
	uint32_t ps = ok0 ? le32_get(f->map + BB_HDR + 8) : BB_PAGE;
	f->err = e1;
	f->errlen = sizeof(e1);
	int ok1 = meta_check(f, ps, 1, &tx1) == 0 && le32_get(f->map + ps + BB_HDR + 8) == ps;
	f->err = err;
	f->errlen = errlen;
	if (!ok0 && !ok1)
		return errf(err, errlen, STORAGE_ERR_CORRUPT, "%s: no valid meta page (%s; %s)", path,
			    e0, e1[0] ? e1 : "meta page 1: page size differs");
	const uint8_t *m = f->map + ((ok1 && (!ok0 || tx1 > tx0)) ? ps : 0) + BB_HDR;
	f->psize = ps;
	f->root = le64_get(m + 16);
	f->freelist = le64_get(m + 32);
	f->npages = le64_get(m + 40);
	if (f->npages < 3 || f->npages > f->dbsize / ps)
		return errf(err, errlen, STORAGE_ERR_CORRUPT,
			    "%s: meta says %llu pages of %u bytes but the file holds %zu bytes "
			    "(truncated?)", path, (unsigned long long)f->npages, ps, f->dbsize);
	if (f->root < 2 || f->root >= f->npages)
		return errf(err, errlen, STORAGE_ERR_CORRUPT, "%s: root page %llu out of range",
			    path, (unsigned long long)f->root);
	if (f->freelist != BB_NO_FREELIST && (f->freelist < 2 || f->freelist >= f->npages))
		return errf(err, errlen, STORAGE_ERR_CORRUPT, "%s: freelist page %llu out of range",
			    path, (unsigned long long)f->freelist);
	size_t bm = (size_t)(f->npages / 8 + 1);
	f->used = calloc(1, bm);
	f->freed = calloc(1, bm);
	if (!f->used || !f->freed)
		return STORAGE_ERR_NOMEM;
	return 0;
}

/* Marks pages [id, id + n) used; refuses pages beyond the high-water mark or used twice. */
static int mark_used(bbf *f, uint64_t id, uint64_t n, const char *what)
{
	if (id >= f->npages || n > f->npages - id)
		return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
			    "page %llu (+%llu overflow, %s): beyond the high-water mark %llu",
			    (unsigned long long)id, (unsigned long long)(n - 1), what,
			    (unsigned long long)f->npages);
	for (uint64_t i = id; i < id + n; i++) {
		if (bit_get(f->used, i))
			return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
				    "page %llu: referenced twice (%s)", (unsigned long long)i, what);
		bit_set(f->used, i);
	}
	return 0;
}

static int check_freelist(bbf *f)
{
	if (f->freelist == BB_NO_FREELIST)
		return 0;
	const uint8_t *p = f->map + f->freelist * f->psize;
	if (le64_get(p) != f->freelist || !(le16_get(p + 8) & BB_FREELIST))
		return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT, "freelist page %llu: bad header",
			    (unsigned long long)f->freelist);
	uint64_t ov = le32_get(p + 12);
	int err = mark_used(f, f->freelist, ov + 1, "freelist");
	if (err)
		return err;
	uint64_t span = (ov + 1) * f->psize, count = le16_get(p + 10), start = BB_HDR;
	if (count == 0xFFFF) {
		if (span < BB_HDR + 8)
			return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT, "freelist: truncated");
		count = le64_get(p + BB_HDR);
		start += 8;
	}
	if (count > (span - start) / 8)
		return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
			    "freelist: %llu ids do not fit in its %llu pages", (unsigned long long)count,
			    (unsigned long long)(ov + 1));
	for (uint64_t i = 0; i < count; i++) {
		uint64_t id = le64_get(p + start + 8 * i);
		if (id < 2 || id >= f->npages)
			return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
				    "freelist: page id %llu out of range", (unsigned long long)id);
		if (bit_get(f->freed, id))
			return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
				    "freelist: page %llu freed twice", (unsigned long long)id);
		bit_set(f->freed, id);
	}
	return 0;
}

/*
 * Walks the B+tree nodes of a bucket in key order. visit gets each leaf element; for a
 * nested bucket (only in the root bucket, for etcd) it returns 1 to skip it, 0 to walk it
 * (with depth + 1), or an error.
 */
typedef int (*walk_fn)(void *ctx, int depth, const uint8_t *k, size_t kl, const uint8_t *v,
		       size_t vl, uint32_t flags);

typedef struct walk {
	bbf *f;
	walk_fn fn;
	void *ctx;
	int check;            /* first pass: mark and check pages */
} walk;

typedef struct keyrange {
	const uint8_t *prev;  /* last key seen in this bucket */
	size_t prevlen;
	int have_prev;
} keyrange;

static int walk_bucket(walk *w, int depth, const uint8_t *bval, size_t blen);

/* Checks a node's header and elements. p: the node; span: bytes it may use. */
static int node_check(walk *w, const uint8_t *p, uint64_t span, const char *where,
		      unsigned long long id)
{
	bbf *f = w->f;
	uint16_t flags = le16_get(p + 8);
	uint64_t count = le16_get(p + 10);
	if (flags != BB_BRANCH && flags != BB_LEAF)
		return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
			    "%s %llu: invalid page type %#x", where, id, flags);
	if (flags == BB_BRANCH && count == 0)
		return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT, "%s %llu: empty branch", where,
			    id);
	uint64_t elems = BB_HDR + count * BB_ELEM;
	if (elems > span)
		return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
			    "%s %llu: %llu elements overrun the page", where, id,
			    (unsigned long long)count);
	for (uint64_t i = 0; i < count; i++) {
		const uint8_t *el = p + BB_HDR + i * BB_ELEM;
		uint64_t eoff = BB_HDR + i * BB_ELEM, pos, len;
		if (flags == BB_BRANCH) {
			pos = le32_get(el);
			len = le32_get(el + 4);
		} else {
			pos = le32_get(el + 4);
			len = (uint64_t)le32_get(el + 8) + le32_get(el + 12);
			if (le32_get(el) & ~(uint32_t)BB_BUCKET_FLAG)
				return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
					    "%s %llu: element %llu: bad flags %#x", where, id,
					    (unsigned long long)i, le32_get(el));
		}
		if (eoff + pos < elems || eoff + pos + len > span)
			return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
				    "%s %llu: element %llu: key/value outside the page", where, id,
				    (unsigned long long)i);
	}
	return 0;
}

/* Walks page pgid of the current bucket; keys must lie in [lo, hi) and increase. */
static int walk_page(walk *w, int depth, int level, uint64_t pgid, const uint8_t *lo, size_t lolen,
		     const uint8_t *hi, size_t hilen, int has_hi, keyrange *kr)
{
	bbf *f = w->f;
	if (level > BB_MAX_DEPTH)
		return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT, "page %llu: tree too deep",
			    (unsigned long long)pgid);
	if (pgid < 2 || pgid >= f->npages)
		return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
			    "page %llu: id out of range (high-water mark %llu)",
			    (unsigned long long)pgid, (unsigned long long)f->npages);
	const uint8_t *p = f->map + pgid * f->psize;
	uint64_t ov = le32_get(p + 12);
	if (w->check) {
		if (le64_get(p) != pgid)
			return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
				    "page %llu: header says it is page %llu", (unsigned long long)pgid,
				    (unsigned long long)le64_get(p));
		int err = mark_used(f, pgid, ov + 1, "tree node");
		if (err)
			return err;
		if ((err = node_check(w, p, (ov + 1) * f->psize, "page", (unsigned long long)pgid)))
			return err;
	}
	uint16_t flags = le16_get(p + 8);
	uint64_t count = le16_get(p + 10);
	for (uint64_t i = 0; i < count; i++) {
		const uint8_t *el = p + BB_HDR + i * BB_ELEM;
		const uint8_t *k;
		size_t kl;
		if (flags == BB_BRANCH) {
			k = el + le32_get(el);
			kl = le32_get(el + 4);
		} else {
			k = el + le32_get(el + 4);
			kl = le32_get(el + 8);
		}
		if (w->check && (storage__bytes_cmp(k, kl, lo, lolen) < 0 ||
				 (has_hi && storage__bytes_cmp(k, kl, hi, hilen) >= 0)))
			return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
				    "page %llu: element %llu: key out of its parent's range",
				    (unsigned long long)pgid, (unsigned long long)i);
		if (flags == BB_BRANCH) {
			const uint8_t *nel = el + BB_ELEM;
			int nhas = i + 1 < count;
			const uint8_t *nk = nhas ? nel + le32_get(nel) : hi;
			size_t nkl = nhas ? le32_get(nel + 4) : hilen;
			if (w->check && nhas && storage__bytes_cmp(k, kl, nk, nkl) >= 0)
				return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
					    "page %llu: branch keys out of order",
					    (unsigned long long)pgid);
			int err = walk_page(w, depth, level + 1, le64_get(el + 8), k, kl, nk, nkl,
					    nhas || has_hi, kr);
			if (err)
				return err;
			continue;
		}
		const uint8_t *v = k + kl;
		size_t vl = le32_get(el + 12);
		uint32_t efl = le32_get(el);
		if (w->check && kr->have_prev && storage__bytes_cmp(kr->prev, kr->prevlen, k, kl) >= 0)
			return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
				    "page %llu: element %llu: keys out of order",
				    (unsigned long long)pgid, (unsigned long long)i);
		kr->prev = k;
		kr->prevlen = kl;
		kr->have_prev = 1;
		int rc = w->fn(w->ctx, depth, k, kl, v, vl, efl);
		if (rc < 0)
			return rc;
		if (rc == 0 && (efl & BB_BUCKET_FLAG)) {
			if ((rc = walk_bucket(w, depth + 1, v, vl)))
				return rc;
		}
	}
	return 0;
}

/* Walks a bucket given its value (bucket header, inline page if root is 0). */
static int walk_bucket(walk *w, int depth, const uint8_t *bval, size_t blen)
{
	bbf *f = w->f;
	keyrange kr = {0};
	if (depth > 2)
		return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT, "buckets nested too deep");
	if (blen < BB_BUCKET_HDR)
		return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT, "bucket header truncated");
	uint64_t root = le64_get(bval);
	if (root != 0)
		return walk_page(w, depth, 0, root, (const uint8_t *)"", 0, NULL, 0, 0, &kr);
	/* Inline: a leaf page inside the value. */
	const uint8_t *p = bval + BB_BUCKET_HDR;
	uint64_t span = blen - BB_BUCKET_HDR;
	if (span < BB_HDR)
		return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT, "inline bucket truncated");
	if (w->check) {
		int err = node_check(w, p, span, "inline bucket at depth", (unsigned long long)depth);
		if (err)
			return err;
		if (le16_get(p + 8) != BB_LEAF)
			return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
				    "inline bucket: not a leaf");
	}
	uint64_t count = le16_get(p + 10);
	for (uint64_t i = 0; i < count; i++) {
		const uint8_t *el = p + BB_HDR + i * BB_ELEM;
		const uint8_t *k = el + le32_get(el + 4);
		size_t kl = le32_get(el + 8);
		const uint8_t *v = k + kl;
		size_t vl = le32_get(el + 12);
		uint32_t efl = le32_get(el);
		if (w->check && kr.have_prev && storage__bytes_cmp(kr.prev, kr.prevlen, k, kl) >= 0)
			return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
				    "inline bucket: keys out of order");
		kr.prev = k;
		kr.prevlen = kl;
		kr.have_prev = 1;
		int rc = w->fn(w->ctx, depth, k, kl, v, vl, efl);
		if (rc < 0)
			return rc;
		if (rc == 0 && (efl & BB_BUCKET_FLAG) && (rc = walk_bucket(w, depth + 1, v, vl)))
			return rc;
	}
	return 0;
}

static int walk_root(walk *w)
{
	uint8_t hdr[BB_BUCKET_HDR];
	le64_put(hdr, w->f->root);
	le64_put(hdr + 8, 0);
	return walk_bucket(w, 0, hdr, sizeof(hdr));
}

/* ---- etcd's schema over the walk ---- */

enum { B_OTHER, B_KEY, B_META, B_LEASE };

typedef struct etcd_walk {
	bbf *f;
	int bucket;                 /* B_* of the bucket being walked */
	char name[256];             /* its name */
	storage_etcd_file_info *info;
	uint32_t hash;
	int64_t last_main, last_sub;
	int only;                   /* import passes: -1 all but key, B_KEY only key */
	/* import */
	storage *s;
	MDB_txn *txn;
	uint64_t next_id;
	uint64_t in_txn;            /* revisions in the current txn */
	const storage_etcd_import_options *opts;
	int visit_rc;               /* what the caller's visitor returned to stop */
} etcd_walk;

static int parse_rev17(const uint8_t *v, size_t vl, int64_t *main)
{
	if (vl != ETCD_REV_LEN || v[8] != '_')
		return -1;
	*main = (int64_t)be64_get(v);
	return *main < 0 ? -1 : 0;
}

/* Checks one entry of etcd's schema; fills the info. */
static int etcd_check_entry(etcd_walk *x, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
	bbf *f = x->f;
	storage_etcd_file_info *in = x->info;
	in->ef_total_keys++;
	x->hash = crc32c(x->hash, k, kl);
	x->hash = crc32c(x->hash, v, vl);
	switch (x->bucket) {
	case B_KEY: {
		if ((kl != ETCD_REV_LEN && kl != ETCD_REV_LEN + 1) || k[8] != '_' ||
		    (kl == ETCD_REV_LEN + 1 && k[ETCD_REV_LEN] != 't'))
			return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
				    "bucket key: entry %llu: malformed revision key (%zu bytes)",
				    (unsigned long long)in->ef_revisions, kl);
		int64_t main = (int64_t)be64_get(k), sub = (int64_t)be64_get(k + 9);
		if (main <= 0 || sub < 0)
			return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
				    "bucket key: revision %lld_%lld out of range", (long long)main,
				    (long long)sub);
		if (in->ef_revisions && (main < x->last_main ||
					 (main == x->last_main && sub <= x->last_sub)))
			return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
				    "bucket key: revision %lld_%lld appears twice", (long long)main,
				    (long long)sub);
		ekv r;
		if (storage__kv_decode(v, vl, &r) || r.klen == 0)
			return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
				    "bucket key: revision %lld_%lld: bad mvccpb.KeyValue",
				    (long long)main, (long long)sub);
		if (kl == ETCD_REV_LEN &&
		    (r.mod != main || r.version <= 0 || r.create <= 0 || r.create > main))
			return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
				    "bucket key: revision %lld_%lld: KeyValue revisions do not match "
				    "(mod %lld create %lld version %lld)", (long long)main,
				    (long long)sub, (long long)r.mod, (long long)r.create,
				    (long long)r.version);
		x->last_main = main;
		x->last_sub = sub;
		in->ef_revision = main;
		in->ef_revisions++;
		if (kl != ETCD_REV_LEN)
			in->ef_tombstones++;
		return 0;
	}
	case B_META: {
		int64_t rev;
		if (kl == 16 && memcmp(k, "consistent_index", 16) == 0) {
			if (vl != 8)
				return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
					    "meta/consistent_index: %zu bytes", vl);
			in->ef_consistent_index = be64_get(v);
		} else if (kl == 4 && memcmp(k, "term", 4) == 0) {
			if (vl != 8)
				return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT, "meta/term: %zu bytes",
					    vl);
			in->ef_term = be64_get(v);
		} else if (kl == 18 && memcmp(k, "finishedCompactRev", 18) == 0) {
			if (parse_rev17(v, vl, &rev))
				return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
					    "meta/finishedCompactRev: malformed");
			in->ef_compact_revision = rev;
		} else if (kl == 19 && memcmp(k, "scheduledCompactRev", 19) == 0) {
			if (parse_rev17(v, vl, &rev))
				return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
					    "meta/scheduledCompactRev: malformed");
			in->ef_scheduled_compact = rev;
		}
		return 0;
	}
	case B_LEASE: {
		int64_t id, ttl, rem;
		if (kl != 8 || lease_decode(v, vl, &id, &ttl, &rem) || id != (int64_t)be64_get(k))
			return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
				    "bucket lease: entry %llu: malformed leasepb.Lease",
				    (unsigned long long)in->ef_leases);
		in->ef_leases++;
		return 0;
	}
	default:
		return 0;
	}
}

static int etcd_check_fn(void *ctx, int depth, const uint8_t *k, size_t kl, const uint8_t *v,
			 size_t vl, uint32_t flags)
{
	etcd_walk *x = ctx;
	bbf *f = x->f;
	if (depth == 0) {
		if (!(flags & BB_BUCKET_FLAG))
			return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
				    "root bucket: entry that is not a bucket");
		if (kl == 0 || kl >= sizeof(x->name))
			return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT, "bucket name of %zu bytes",
				    kl);
		memcpy(x->name, k, kl);
		x->name[kl] = 0;
		x->bucket = strcmp(x->name, "key") == 0 ? B_KEY
			    : strcmp(x->name, "meta") == 0 ? B_META
			    : strcmp(x->name, "lease") == 0 ? B_LEASE : B_OTHER;
		x->hash = crc32c(x->hash, k, kl);
		return 0;
	}
	if (flags & BB_BUCKET_FLAG)
		return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
			    "bucket %s: nested bucket (etcd writes none)", x->name);
	return etcd_check_entry(x, k, kl, v, vl);
}

/* The full check: every page, then the freelist accounting, then etcd's schema. */
static int etcd_check(bbf *f, storage_etcd_file_info *info)
{
	memset(info, 0, sizeof(*info));
	info->ef_compact_revision = -1;
	info->ef_scheduled_compact = -1;
	info->ef_page_size = f->psize;
	info->ef_has_sha256 = f->has_sha;
	info->ef_total_size = f->npages * f->psize;
	int err = mark_used(f, 0, 2, "meta");
	if (!err)
		err = check_freelist(f);
	if (err)
		return err;
	etcd_walk x = {0};
	x.f = f;
	x.info = info;
	walk w = {f, etcd_check_fn, &x, 1};
	if ((err = walk_root(&w)))
		return err;
	if (f->freelist != BB_NO_FREELIST) {
		for (uint64_t i = 0; i < f->npages; i++) {
			int u = bit_get(f->used, i), fr = bit_get(f->freed, i);
			if (u && fr)
				return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
					    "page %llu: both in use and free", (unsigned long long)i);
			if (!u && !fr)
				return errf(f->err, f->errlen, STORAGE_ERR_CORRUPT,
					    "page %llu: unreachable and not free",
					    (unsigned long long)i);
		}
	}
	info->ef_hash = x.hash;
	int64_t rev = info->ef_revision > 1 ? info->ef_revision : 1;
	int64_t compact = info->ef_compact_revision;
	if (info->ef_scheduled_compact > compact)
		compact = info->ef_scheduled_compact;
	info->ef_store_revision = compact > rev ? compact : rev;
	return 0;
}

int storage_etcd_check(const char *path, int hash_check, storage_etcd_file_info *info,
		       char *errbuf, size_t errlen)
{
	bbf f;
	storage_etcd_file_info tmp;
	if (errbuf && errlen)
		errbuf[0] = 0;
	int err = bbf_open(&f, path, hash_check, errbuf, errlen);
	if (!err)
		err = etcd_check(&f, info ? info : &tmp);
	bbf_close(&f);
	return err;
}

/* ---- import ---- */

static int lease_known(storage *s, MDB_txn *txn, int64_t id)
{
	uint8_t kb[8];
	be64_put(kb, (uint64_t)id);
	MDB_val k = {sizeof(kb), kb}, v;
	int rc = mdb_get(txn, s->s_leases, &k, &v);
	return rc == 0 ? 1 : rc == MDB_NOTFOUND ? 0 : storage__mdb_err(rc);
}

static int lkey_set(storage *s, MDB_txn *txn, int64_t lease, uint64_t key_id, int on)
{
	uint8_t kb[16];
	be64_put(kb, (uint64_t)lease);
	be64_put(kb + 8, key_id);
	MDB_val k = {sizeof(kb), kb}, v = {0, NULL};
	int rc = on ? mdb_put(txn, s->s_lkeys, &k, &v, 0) : mdb_del(txn, s->s_lkeys, &k, NULL);
	return storage__mdb_err(rc == MDB_NOTFOUND ? 0 : rc);
}

/* One revision of bucket "key" into revs, hist and the key index. */
static int import_rev(etcd_walk *x, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
	storage *s = x->s;
	MDB_txn *txn = x->txn;
	int64_t main = (int64_t)be64_get(k), sub = (int64_t)be64_get(k + 9);
	int tomb = kl == ETCD_REV_LEN + 1;
	ekv r;
	if (storage__kv_decode(v, vl, &r))
		return STORAGE_ERR_CORRUPT; /* the check pass refused it already */
	ki_state st;
	int err = storage__ki_get(s, txn, r.key, r.klen, &st);
	if (err && err != STORAGE_ERR_NOT_FOUND)
		return err;
	int have = err == 0;
	int64_t old_lease = have && st.ks_version > 0 ? st.ks_lease : 0;
	ki_state ns = {have ? st.ks_id : x->next_id++, main, sub, 0, 0, 0};
	ekv rec = {0};
	rec.key = r.key;
	rec.klen = r.klen;
	rec.mod = main;
	if (!tomb) {
		ns.ks_create = r.create;
		ns.ks_version = r.version;
		ns.ks_lease = r.lease;
		rec = r;
	}
	if (old_lease != ns.ks_lease) {
		if (old_lease && (err = lkey_set(s, txn, old_lease, ns.ks_id, 0)))
			return err;
		/* A key whose lease is gone keeps the id (etcd only logs it); only a lease
		 * that exists holds keys. */
		if (ns.ks_lease) {
			int known = lease_known(s, txn, ns.ks_lease);
			if (known < 0)
				return known;
			if (known && (err = lkey_set(s, txn, ns.ks_lease, ns.ks_id, 1)))
				return err;
		}
	}
	if ((err = storage__rev_put(s, txn, main, sub, ns.ks_id, tomb, have ? st.ks_mod_main : 0,
				    have ? st.ks_mod_sub : 0, &rec)))
		return err;
	return storage__ki_set(s, txn, r.key, r.klen, &ns);
}

static int etcd_import_fn(void *ctx, int depth, const uint8_t *k, size_t kl, const uint8_t *v,
			  size_t vl, uint32_t flags)
{
	etcd_walk *x = ctx;
	if (depth == 0) {
		memcpy(x->name, k, kl); /* checked: 0 < kl < sizeof(name) */
		x->name[kl] = 0;
		x->bucket = strcmp(x->name, "key") == 0 ? B_KEY
			    : strcmp(x->name, "meta") == 0 ? B_META
			    : strcmp(x->name, "lease") == 0 ? B_LEASE : B_OTHER;
		/* Keys go last: leases must be there to attach keys to them. */
		return (x->only == B_KEY) != (x->bucket == B_KEY) ? 1 : 0;
	}
	int err;
	if (x->bucket == B_KEY) {
		if ((err = import_rev(x, k, kl, v, vl)))
			return err;
		if (++x->in_txn >= IMPORT_CHUNK) {
			/* Bound the transaction: commit and go on in a new one. */
			if ((err = storage__meta_put_i64(x->s, x->txn, META_NEXT_ID, (int64_t)x->next_id)))
				return err;
			err = storage__mdb_err(mdb_txn_commit(x->txn));
			x->txn = NULL;
			if (!err)
				err = storage__mdb_err(mdb_txn_begin(x->s->s_env, NULL, 0, &x->txn));
			x->in_txn = 0;
			return err;
		}
		return 0;
	}
	if (x->bucket == B_LEASE) {
		int64_t id, ttl, rem;
		if (lease_decode(v, vl, &id, &ttl, &rem))
			return STORAGE_ERR_CORRUPT;
		/* storage's lease record (mvcc.c): the TTL, then the remaining TTL if checkpointed */
		uint8_t vb[16];
		be64_put(vb, (uint64_t)ttl);
		be64_put(vb + 8, (uint64_t)rem);
		MDB_val mk = {8, (void *)k}, mv_ = {rem > 0 ? 16 : 8, vb};
		return storage__mdb_err(mdb_put(x->txn, x->s->s_leases, &mk, &mv_, 0));
	}
	if (x->bucket == B_META &&
	    ((kl == 16 && memcmp(k, "consistent_index", 16) == 0) ||
	     (kl == 4 && memcmp(k, "term", 4) == 0) ||
	     (kl == 18 && memcmp(k, "finishedCompactRev", 18) == 0) ||
	     (kl == 19 && memcmp(k, "scheduledCompactRev", 19) == 0)))
		return 0;
	if (x->opts && x->opts->ei_visit) {
		int rc = x->opts->ei_visit(x->opts->ei_ctx, x->name, k, kl, v, vl);
		if (rc) {
			/* The walk takes a positive value for "skip": carry it aside. */
			x->visit_rc = rc;
			return STORAGE_ERR_INVALID;
		}
	}
	return 0;
}

int storage_import_etcd(const char *bbolt_path, const char *lmdb_dir,
			const storage_etcd_import_options *opts, storage_etcd_file_info *info)
{
	static const storage_etcd_import_options noopts;
	storage_etcd_file_info tmp;
	bbf f;
	storage *s = NULL;
	etcd_walk x = {0};
	if (!opts)
		opts = &noopts;
	if (!info)
		info = &tmp;
	char *eb = opts->ei_errbuf;
	size_t el = opts->ei_errlen;
	if (eb && el)
		eb[0] = 0;
	int err = bbf_open(&f, bbolt_path, opts->ei_hash_check, eb, el);
	if (!err)
		err = etcd_check(&f, info);
	if (err)
		goto out;
	if ((err = storage_open(lmdb_dir, opts->ei_storage, &s))) {
		errf(eb, el, err, "%s: %s", lmdb_dir, storage_strerror(err));
		goto out;
	}
	x.f = &f;
	x.s = s;
	x.opts = opts;
	x.info = info;
	if ((err = storage__mdb_err(mdb_txn_begin(s->s_env, NULL, 0, &x.txn))))
		goto out;
	MDB_stat st;
	if ((err = storage__mdb_err(mdb_stat(x.txn, s->s_revs, &st))))
		goto out;
	if (st.ms_entries) {
		err = errf(eb, el, STORAGE_ERR_INVALID, "%s: already holds revisions", lmdb_dir);
		goto out;
	}
	int64_t next_id;
	if ((err = storage__meta_get_i64(s, x.txn, META_NEXT_ID, 1, &next_id)))
		goto out;
	x.next_id = (uint64_t)next_id;
	walk w = {&f, etcd_import_fn, &x, 0};
	x.only = -1;
	if ((err = walk_root(&w))) {
		if (x.visit_rc)
			err = x.visit_rc;
		goto out;
	}
	x.only = B_KEY;
	if ((err = walk_root(&w)))
		goto out;

	int64_t compact = info->ef_compact_revision;
	int pending = 0;
	if (info->ef_scheduled_compact > compact) {
		/* etcd would finish this compaction at start-up; so does Keelson's. */
		compact = info->ef_scheduled_compact;
		pending = 1;
	}
	uint64_t applied = opts->ei_applied_index ? opts->ei_applied_index : info->ef_consistent_index;
	err = storage__meta_put_i64(s, x.txn, META_REV, info->ef_store_revision);
	if (!err)
		err = storage__meta_put_i64(s, x.txn, META_COMPACT, compact);
	if (!err)
		err = storage__meta_put_i64(s, x.txn, META_CNEXT_MAIN, 0);
	if (!err)
		err = storage__meta_put_i64(s, x.txn, META_CNEXT_SUB, 0);
	if (!err)
		err = storage__meta_put_i64(s, x.txn, META_CPENDING, pending);
	if (!err)
		err = storage__meta_put_i64(s, x.txn, META_NEXT_ID, (int64_t)x.next_id);
	if (!err)
		err = storage__meta_put_i64(s, x.txn, META_APPLIED, (int64_t)applied);
	if (!err) {
		err = storage__mdb_err(mdb_txn_commit(x.txn));
		x.txn = NULL;
	}
out:
	if (err && eb && el && !eb[0])
		snprintf(eb, el, "import into %s: %s", lmdb_dir, storage_strerror(err));
	if (x.txn)
		mdb_txn_abort(x.txn);
	if (s)
		storage_close(s);
	bbf_close(&f);
	return err;
}
