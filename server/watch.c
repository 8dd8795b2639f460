/*
 * watch.c - etcd's Watch service and the hub that fans events out to watchers.
 *
 * Synced watchers are grouped by what they ask for (key range, prev_kv, filters). After a
 * batch commits, the node loop hands its events to watch_hub_notify(): each group's matching
 * events are encoded ONCE into a shared buffer, and each watcher's response is its own small
 * prefix (header, watch_id) followed by that buffer. Protobuf encodings concatenate, so the
 * bytes on the wire are a plain WatchResponse. For the same reason a watcher's next events
 * can join its previous response while that one still waits in the stream's send queue (see
 * send_events): the busier the streams, the more batches each gRPC message carries.
 *
 * A watcher that starts in the past, or whose stream's send queue grows past a bound (a slow
 * client), is unsynced: the catch-up thread replays its events from LMDB in bounded batches
 * while its queue has room, then moves it back to its group. A watcher never gets an event
 * twice or misses one: each remembers the lowest revision it has not been sent.
 *
 * One lock (hub_mu) guards the hub, its streams and watchers. The node loop holds it only
 * to match and queue sends; sends themselves are queued on each stream without blocking.
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <sys/prctl.h>

#include "server/server.h"

/* A watcher's queued response grows by later events up to this size (see send_events). */
#define WATCH_MERGE_MAX_BYTES (256u << 10)
/* Past this many queued bytes a stream's watchers leave the fast path. */
#define WATCH_STREAM_MAX_QUEUED (8u << 20)
/* Catch-up sends to a stream only while less than this is queued. */
#define WATCH_STREAM_RESUME_QUEUED (1u << 20)
/* Events read from LMDB per catch-up step. */
#define WATCH_CATCHUP_EVENTS 1000
/* etcd's clientv3.InvalidWatchID */
#define WATCH_ID_NONE (-1)

typedef enum range_kind { RANGE_ONE, RANGE_SPAN, RANGE_FROM } range_kind;

typedef struct watch_group watch_group;
typedef struct watch_stream watch_stream;
typedef struct watcher watcher;

struct watcher {
	int64_t w_id;
	watch_stream *w_stream;
	watcher *w_snext; /* in the stream's list; in its slab's free list while unused */
	watch_group *w_group;
	/* Synced: in the group's list (w_gnext, w_gprev). Unsynced: in the hub's unsynced list,
	 * linked by w_gnext alone. A watcher is in exactly one of them: one pointer serves both. */
	watcher *w_gnext, *w_gprev;
	int64_t w_next_rev; /* the lowest revision not yet sent */
	api_send_mark w_mark; /* its last queued response, which the next events may join */
	unsigned w_synced : 1;
	unsigned w_progress : 1;     /* progress_notify asked */
	unsigned w_progress_due : 1; /* no events since the last progress tick */
	unsigned w_fragment : 1;
};

/*
 * Where an idle watcher's memory goes (issue 5's target: under 350 bytes each, as
 * tools/bench_watch.sh measures it: the server's RSS growth / watchers, 10,000 watchers on
 * one prefix over 100 streams and 4 connections, as etcd's own `benchmark watch` spreads
 * them: 100 a stream). Live heap on the idle server (heaptrack), per watcher:
 *   - its watcher: 80 bytes, from a slab (below). Nothing else is per watcher: its key
 *     range, filters and prev_kv are in its group, shared by every watcher that asks the
 *     same (one group for the benchmark's 10,000), and its events are shared encodings;
 *   - its share of its stream, ~122 bytes at 100 a stream: gRPC core gives each call an
 *     arena of ~11.4 KB (the call, its filters' call data, the HTTP/2 stream;
 *     grpc.minimal_stack would save 1 KB of it), plus ours: api_stream ~0.3 KB, the call's
 *     metadata ~0.5 KB, watch_stream 48 bytes;
 *   - gRPC's buffers grown by the burst of creates: TCP read buffers (64 KB slices, kept;
 *     33-53 bytes) and HTTP/2 slice arrays (~17 bytes since api/stream.c lets at most 32
 *     messages wait for one flush; 10-77 before);
 *   - heap holes left by the burst's short-lived buffers: 30-60 bytes, until the heap
 *     trimmer (heaptrim.c) gives their whole pages back 200-400 ms after the burst.
 * bench/results/2026-11-28-f9ae6d3-watch-idle.md has the runs: 268-354 bytes over 8 runs,
 * median 314, before the trimmer; 270-292 with it (2026-11-28-210c60b). Tried and not kept
 * (no difference within the +-30-byte noise): M_ARENA_MAX 2, gRPC's TCP read chunk capped
 * at 16 KB, grpc.minimal_stack. gRPC core sizes each call's arena from what the channel's
 * earlier calls used; no channel argument shrinks it.
 */

/* Watchers are carved from slabs mapped apart from the malloc heap: no allocator header per
 * watcher (one malloc each took 96 bytes: 80 + glibc's header, rounded up to 16), and only
 * the pages in use count. A slab is aligned to its size, so any watcher finds its slab by
 * masking its address. An empty slab is given back unless it is the last. */
#define WATCH_SLAB_BYTES (64u << 10)
typedef struct watch_slab watch_slab;
struct watch_slab {
	watch_slab *s_next, *s_prev; /* the hub's slabs: those with free slots first */
	watcher *s_free; /* free slots, linked by w_snext */
	unsigned s_used, s_fresh; /* slots in use; slots never handed out (from the end) */
	watcher s_w[];
};
#define WATCH_SLAB_SLOTS ((WATCH_SLAB_BYTES - sizeof(watch_slab)) / sizeof(watcher))

/* What a watcher asks for; synced watchers with equal asks share encodings. */
struct watch_group {
	range_kind g_kind;
	ProtobufCBinaryData g_key, g_end; /* owned */
	int g_prev_kv, g_noput, g_nodelete;
	watcher *g_watchers;
	watch_group *g_next; /* RANGE_ONE: the next group on the same key; else the next range */
	int g_refs; /* watchers, synced or not, that use this group */
	size_t *g_sel; /* this batch's matching events (indexes, revision order) */
	size_t g_nsel, g_selcap;
};

struct watch_stream {
	api_stream *ws_api;
	watcher *ws_watchers;
	int64_t ws_next_id;
	int ws_progress_requested; /* a WatchProgressRequest waits for every watcher to sync */
	watch_stream *ws_next, *ws_prev;
};

struct watch_hub {
	server_ctx *h_sc;
	pthread_mutex_t h_mu;
	pthread_cond_t h_cond;
	pthread_t h_thread;
	int h_stop;
	int64_t h_rev; /* revision of the last batch notified */
	/* The group index: single-key groups by key (open addressing; a slot holds the first
	 * group on its key, the others follow by g_next), and the key-range groups in a list. An
	 * event then costs one lookup plus the range groups, not one test per group. */
	watch_group **h_keyed;
	size_t h_keyed_cap, h_keyed_n;
	watch_group *h_ranges;
	size_t h_nranges;
	watch_group **h_touched; /* groups with events in the current batch */
	size_t h_ntouched, h_touched_cap;
	watcher *h_unsynced;
	watch_stream *h_streams;
	watch_slab *h_slabs, *h_slabs_tail; /* slabs with a free slot come first */
	uint64_t h_progress_ms;
	uint64_t h_nwatchers, h_nstreams, h_nslow;
	uint64_t h_nevents; /* events queued to clients */
	/* The last ResponseHeader encoded (field 1 of WatchResponse, tag and length included):
	 * every watcher of a batch has the same one, so it is packed once per batch. */
	Etcdserverpb__ResponseHeader h_hdr;
	uint8_t h_hdr_buf[64];
	size_t h_hdr_len;
};

/* ---- matching and encoding ---- */

static int bytes_cmp(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen)
{
	size_t n = alen < blen ? alen : blen;
	int c = n ? memcmp(a, b, n) : 0;
	if (c)
		return c;
	return alen < blen ? -1 : alen > blen;
}


static uint64_t key_hash(const uint8_t *p, size_t len)
{
	uint64_t h = 1469598103934665603ULL; /* FNV-1a */
	for (size_t i = 0; i < len; i++)
		h = (h ^ p[i]) * 1099511628211ULL;
	return h;
}

/* The slot of key in the keyed table: its group list, or the empty slot it would take. */
static size_t keyed_slot(const watch_hub *h, const uint8_t *key, size_t len)
{
	size_t mask = h->h_keyed_cap - 1, i = (size_t)key_hash(key, len) & mask;
	while (h->h_keyed[i] &&
	       bytes_cmp(h->h_keyed[i]->g_key.data, h->h_keyed[i]->g_key.len, key, len) != 0)
		i = (i + 1) & mask;
	return i;
}

static watch_group *keyed_find(const watch_hub *h, const uint8_t *key, size_t len)
{
	return h->h_keyed_n ? h->h_keyed[keyed_slot(h, key, len)] : NULL;
}

static int keyed_grow(watch_hub *h)
{
	size_t cap = h->h_keyed_cap ? h->h_keyed_cap * 2 : 64;
	watch_group **old = h->h_keyed, **tab = calloc(cap, sizeof(*tab));
	size_t oldcap = h->h_keyed_cap;
	if (tab == NULL)
		return -1;
	h->h_keyed = tab;
	h->h_keyed_cap = cap;
	for (size_t i = 0; i < oldcap; i++)
		if (old[i])
			tab[keyed_slot(h, old[i]->g_key.data, old[i]->g_key.len)] = old[i];
	free(old);
	return 0;
}

/* Adds a single-key group in front of the others on its key. */
static int keyed_add(watch_hub *h, watch_group *g)
{
	if ((h->h_keyed_n + 1) * 4 > h->h_keyed_cap * 3 && keyed_grow(h) != 0)
		return -1;
	size_t i = keyed_slot(h, g->g_key.data, g->g_key.len);
	if (h->h_keyed[i] == NULL)
		h->h_keyed_n++;
	g->g_next = h->h_keyed[i];
	h->h_keyed[i] = g;
	return 0;
}

static void keyed_remove(watch_hub *h, watch_group *g)
{
	size_t mask = h->h_keyed_cap - 1, i = keyed_slot(h, g->g_key.data, g->g_key.len);
	watch_group **pp = &h->h_keyed[i];
	while (*pp && *pp != g)
		pp = &(*pp)->g_next;
	if (*pp)
		*pp = g->g_next;
	if (h->h_keyed[i])
		return;
	/* The key's last group left: close the gap (backward shift, no tombstones). */
	h->h_keyed_n--;
	for (size_t j = (i + 1) & mask; h->h_keyed[j]; j = (j + 1) & mask) {
		watch_group *e = h->h_keyed[j];
		size_t home = (size_t)key_hash(e->g_key.data, e->g_key.len) & mask;
		if ((j > i && (home <= i || home > j)) || (j < i && (home <= i && home > j))) {
			h->h_keyed[i] = e;
			h->h_keyed[j] = NULL;
			i = j;
		}
	}
}

static int filters_pass(const watch_group *g, const Mvccpb__Event *ev)
{
	if (g->g_noput && ev->type == MVCCPB__EVENT__EVENT_TYPE__PUT)
		return 0;
	return !(g->g_nodelete && ev->type == MVCCPB__EVENT__EVENT_TYPE__DELETE);
}

static int group_matches(const watch_group *g, const Mvccpb__Event *ev)
{
	if (!filters_pass(g, ev))
		return 0;
	const ProtobufCBinaryData *k = &ev->kv->key;
	int lo = bytes_cmp(k->data, k->len, g->g_key.data, g->g_key.len);
	switch (g->g_kind) {
	case RANGE_ONE:
		return lo == 0;
	case RANGE_FROM:
		return lo >= 0;
	case RANGE_SPAN:
		return lo >= 0 && bytes_cmp(k->data, k->len, g->g_end.data, g->g_end.len) < 0;
	}
	return 0;
}

static size_t varint_len(uint64_t v)
{
	size_t n = 1;
	while (v >= 0x80) {
		v >>= 7;
		n++;
	}
	return n;
}

static uint8_t *varint_put(uint8_t *p, uint64_t v)
{
	while (v >= 0x80) {
		*p++ = (uint8_t)(v | 0x80);
		v >>= 7;
	}
	*p++ = (uint8_t)v;
	return p;
}

/* WatchResponse.events is field 11, length-delimited. */
#define EVENTS_TAG ((11 << 3) | 2)

/* An event as etcd sends it to a watcher: prev_kv only if asked, and never for a create. */
static void event_view(const Mvccpb__Event *ev, int prev_kv, Mvccpb__Event *out)
{
	*out = *ev;
	int create = ev->type == MVCCPB__EVENT__EVENT_TYPE__PUT &&
		     ev->kv->create_revision == ev->kv->mod_revision;
	if (!prev_kv || create)
		out->prev_kv = NULL;
}

/* Encodes the events selected by sel[] (n of them) as repeated field 11 into one shared
 * buffer. Returns NULL when out of memory. */
static api_bytes *encode_events(Mvccpb__Event **evs, const size_t *sel, size_t n, int prev_kv)
{
	size_t total = 0;
	for (size_t i = 0; i < n; i++) {
		Mvccpb__Event v;
		event_view(evs[sel[i]], prev_kv, &v);
		size_t len = mvccpb__event__get_packed_size(&v);
		total += 1 + varint_len(len) + len;
	}
	uint8_t *p;
	api_bytes *b = api_bytes_new(total, &p);
	if (b == NULL)
		return NULL;
	for (size_t i = 0; i < n; i++) {
		Mvccpb__Event v;
		event_view(evs[sel[i]], prev_kv, &v);
		size_t len = mvccpb__event__get_packed_size(&v);
		*p++ = EVENTS_TAG;
		p = varint_put(p, len);
		p += mvccpb__event__pack(&v, p);
	}
	return b;
}

static void fill_header(watch_hub *h, Etcdserverpb__ResponseHeader *hdr, int64_t rev)
{
	server_fill_header(h->h_sc, hdr);
	hdr->revision = rev;
}

/* Queues resp (without events) followed by the shared events; returns queued bytes or -1. */
static long send_response(watch_stream *ws, Etcdserverpb__WatchResponse *resp, api_bytes *events)
{
	uint8_t stackbuf[256];
	size_t len = etcdserverpb__watch_response__get_packed_size(resp);
	uint8_t *buf = len <= sizeof(stackbuf) ? stackbuf : malloc(len);
	if (buf == NULL)
		return -1;
	etcdserverpb__watch_response__pack(resp, buf);
	long q = api_stream_send(ws->ws_api, buf, len, events);
	if (buf != stackbuf)
		free(buf);
	return q;
}

static long send_control(watch_hub *h, watch_stream *ws, int64_t id, int created, int canceled,
			 int64_t compact_rev, const char *reason)
{
	Etcdserverpb__WatchResponse resp = ETCDSERVERPB__WATCH_RESPONSE__INIT;
	Etcdserverpb__ResponseHeader hdr = ETCDSERVERPB__RESPONSE_HEADER__INIT;
	/* etcd's compaction cancel carries no revision in its header. */
	fill_header(h, &hdr, compact_rev != 0 ? 0 : h->h_rev);
	resp.header = &hdr;
	resp.watch_id = id;
	resp.created = created;
	resp.canceled = canceled;
	resp.compact_revision = compact_rev;
	if (reason)
		resp.cancel_reason = (char *)reason;
	return api_stream_send_msg(ws->ws_api, &resp.base);
}

/*
 * Sends events to one watcher, split into fragments if it asked for them and the response
 * would reach --max-request-bytes (etcd's sendFragments). The rare path: encodes per watcher.
 */
static long send_fragmented(watch_hub *h, watcher *w, Mvccpb__Event **evs, const size_t *sel,
			    size_t n, int64_t rev)
{
	/* etcd splits at the request limit plus gRPC's overhead allowance (512 KiB). */
	size_t limit = h->h_sc->cfg->max_request_bytes + 512 * 1024;
	long queued = 0;
	size_t i = 0;
	while (i < n) {
		size_t start = i, size = 64;
		for (; i < n; i++) {
			Mvccpb__Event v;
			event_view(evs[sel[i]], w->w_group->g_prev_kv, &v);
			size_t len = mvccpb__event__get_packed_size(&v);
			size += 1 + varint_len(len) + len;
			if (i > start && size >= limit)
				break;
		}
		Etcdserverpb__WatchResponse resp = ETCDSERVERPB__WATCH_RESPONSE__INIT;
		Etcdserverpb__ResponseHeader hdr = ETCDSERVERPB__RESPONSE_HEADER__INIT;
		fill_header(h, &hdr, rev);
		resp.header = &hdr;
		resp.watch_id = w->w_id;
		resp.fragment = i < n;
		api_bytes *b = encode_events(evs, sel + start, i - start, w->w_group->g_prev_kv);
		if (b == NULL)
			return -1;
		queued = send_response(w->w_stream, &resp, b);
		api_bytes_unref(b);
		if (queued < 0)
			return queued;
	}
	return queued;
}

/*
 * Sends the selected events to w, at header revision rev. If w's previous response is still
 * queued on its stream (the client or the network is behind), the events join it: the bytes
 * appended are a header holding only what may have changed (revision, raft term) and the
 * shared events, which a protobuf parser merges into one response (a later scalar wins,
 * repeated fields concatenate). Under load one gRPC message then carries many batches, so
 * the cost per event falls as the load rises, instead of the queue growing a message per
 * batch and watcher. Each watcher's events stay in revision order: they only ever join its
 * own latest response, and never one queued before a control response (see api.h).
 */
static long send_events(watch_hub *h, watcher *w, Mvccpb__Event **evs, const size_t *sel, size_t n,
			api_bytes *shared, int64_t rev)
{
	if (w->w_fragment && n >= 2) {
		w->w_mark.sm_item = NULL;
		long q = send_fragmented(h, w, evs, sel, n, rev);
		if (q >= 0)
			h->h_nevents += n;
		return q;
	}
	Etcdserverpb__ResponseHeader hdr = ETCDSERVERPB__RESPONSE_HEADER__INIT;
	fill_header(h, &hdr, rev);
	api_bytes *own = NULL;
	if (shared == NULL) {
		own = encode_events(evs, sel, n, w->w_group->g_prev_kv);
		if (own == NULL)
			return -1;
		shared = own;
	}
	uint8_t full[96], more[32], *p = more + 2;
	if (h->h_hdr_len == 0 || hdr.revision != h->h_hdr.revision || hdr.raft_term != h->h_hdr.raft_term ||
	    hdr.cluster_id != h->h_hdr.cluster_id || hdr.member_id != h->h_hdr.member_id) {
		/* at most 4 varints of 10 bytes and their tags: fits in h_hdr_buf */
		size_t hl = etcdserverpb__response_header__get_packed_size(&hdr);
		h->h_hdr_buf[0] = (1 << 3) | 2;
		h->h_hdr_buf[1] = (uint8_t)hl;
		etcdserverpb__response_header__pack(&hdr, h->h_hdr_buf + 2);
		h->h_hdr_len = 2 + hl;
		h->h_hdr = hdr;
	}
	/* WatchResponse { header (1), watch_id (2) }, as protobuf-c packs it */
	memcpy(full, h->h_hdr_buf, h->h_hdr_len);
	uint8_t *f = full + h->h_hdr_len;
	if (w->w_id != 0) {
		*f++ = 2 << 3;
		f = varint_put(f, (uint64_t)w->w_id);
	}
	size_t flen = (size_t)(f - full);
	/* what a merged piece repeats: header (field 1) { revision (3), raft_term (4) } */
	*p++ = 3 << 3;
	p = varint_put(p, (uint64_t)hdr.revision);
	*p++ = 4 << 3;
	p = varint_put(p, hdr.raft_term);
	more[0] = (1 << 3) | 2;
	more[1] = (uint8_t)(p - more - 2);
	long q = api_stream_send_merge(w->w_stream->ws_api, &w->w_mark, full, flen, more, (size_t)(p - more),
				       shared, n, WATCH_MERGE_MAX_BYTES);
	if (own)
		api_bytes_unref(own);
	if (q >= 0)
		h->h_nevents += n;
	w->w_progress_due = 0;
	return q;
}

/* ---- watcher slabs ---- */

/* A new, empty slab (mmap's pages are zero and take memory only once touched), or NULL. */
static watch_slab *slab_map(void)
{
	size_t sz = WATCH_SLAB_BYTES;
	uint8_t *p = mmap(NULL, 2 * sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return NULL;
	/* keep the aligned slab inside the double-size mapping, unmap the rest */
	uintptr_t a = ((uintptr_t)p + sz - 1) & ~(uintptr_t)(sz - 1);
	size_t head = (size_t)(a - (uintptr_t)p);
	if (head)
		munmap(p, head);
	munmap((uint8_t *)a + sz, sz - head);
	watch_slab *s = (watch_slab *)a;
	s->s_fresh = WATCH_SLAB_SLOTS;
	return s;
}

static void slab_unmap(watch_slab *s)
{
	munmap(s, WATCH_SLAB_BYTES);
}

static watch_slab *slab_of(watcher *w)
{
	return (watch_slab *)((uintptr_t)w & ~(uintptr_t)(WATCH_SLAB_BYTES - 1));
}

static void slab_unlink(watch_hub *h, watch_slab *s)
{
	if (s->s_prev)
		s->s_prev->s_next = s->s_next;
	else
		h->h_slabs = s->s_next;
	if (s->s_next)
		s->s_next->s_prev = s->s_prev;
	else
		h->h_slabs_tail = s->s_prev;
	s->s_next = s->s_prev = NULL;
}

static void slab_push_front(watch_hub *h, watch_slab *s)
{
	s->s_prev = NULL;
	s->s_next = h->h_slabs;
	if (h->h_slabs)
		h->h_slabs->s_prev = s;
	else
		h->h_slabs_tail = s;
	h->h_slabs = s;
}

static void slab_push_back(watch_hub *h, watch_slab *s)
{
	s->s_next = NULL;
	s->s_prev = h->h_slabs_tail;
	if (h->h_slabs_tail)
		h->h_slabs_tail->s_next = s;
	else
		h->h_slabs = s;
	h->h_slabs_tail = s;
}

static int slab_full(const watch_slab *s)
{
	return s->s_free == NULL && s->s_fresh == 0;
}

/* A zeroed watcher, or NULL when out of memory. */
static watcher *watcher_alloc(watch_hub *h)
{
	watch_slab *s = h->h_slabs;
	if (s == NULL || slab_full(s)) {
		/* slabs with free slots come first: all are full */
		s = slab_map();
		if (s == NULL)
			return NULL;
		slab_push_front(h, s);
	}
	watcher *w;
	if (s->s_free) {
		w = s->s_free;
		s->s_free = w->w_snext;
	} else {
		w = &s->s_w[WATCH_SLAB_SLOTS - s->s_fresh--];
	}
	s->s_used++;
	if (slab_full(s)) {
		slab_unlink(h, s);
		slab_push_back(h, s);
	}
	memset(w, 0, sizeof(*w));
	return w;
}

static void watcher_free(watch_hub *h, watcher *w)
{
	watch_slab *s = slab_of(w);
	int was_full = slab_full(s);
	w->w_snext = s->s_free;
	s->s_free = w;
	s->s_used--;
	if (s->s_used == 0 && (s->s_next || s->s_prev)) {
		/* empty and not the last slab: give it back */
		slab_unlink(h, s);
		slab_unmap(s);
	} else if (was_full) {
		slab_unlink(h, s);
		slab_push_front(h, s);
	}
}

/* ---- membership of watchers in groups and lists ---- */

static void group_link(watcher *w)
{
	watch_group *g = w->w_group;
	w->w_gprev = NULL;
	w->w_gnext = g->g_watchers;
	if (g->g_watchers)
		g->g_watchers->w_gprev = w;
	g->g_watchers = w;
	w->w_synced = 1;
}

static void group_unlink(watcher *w)
{
	watch_group *g = w->w_group;
	if (w->w_gprev)
		w->w_gprev->w_gnext = w->w_gnext;
	else
		g->g_watchers = w->w_gnext;
	if (w->w_gnext)
		w->w_gnext->w_gprev = w->w_gprev;
	w->w_gnext = w->w_gprev = NULL;
	w->w_synced = 0;
}

static void unsynced_add(watch_hub *h, watcher *w)
{
	w->w_gnext = h->h_unsynced;
	h->h_unsynced = w;
	pthread_cond_signal(&h->h_cond);
}

static void unsynced_remove(watch_hub *h, watcher *w)
{
	for (watcher **pp = &h->h_unsynced; *pp; pp = &(*pp)->w_gnext) {
		if (*pp == w) {
			*pp = w->w_gnext;
			w->w_gnext = NULL;
			return;
		}
	}
}

static void group_release(watch_hub *h, watch_group *g)
{
	if (--g->g_refs > 0)
		return;
	if (g->g_kind == RANGE_ONE) {
		keyed_remove(h, g);
	} else {
		for (watch_group **pp = &h->h_ranges; *pp; pp = &(*pp)->g_next) {
			if (*pp == g) {
				*pp = g->g_next;
				h->h_nranges--;
				break;
			}
		}
	}
	free(g->g_key.data);
	free(g->g_end.data);
	free(g->g_sel);
	free(g);
}

static int group_same(const watch_group *g, range_kind kind, const ProtobufCBinaryData *key,
		      const ProtobufCBinaryData *end, int prev_kv, int noput, int nodelete)
{
	return g->g_kind == kind && g->g_prev_kv == prev_kv && g->g_noput == noput &&
	       g->g_nodelete == nodelete && bytes_cmp(g->g_key.data, g->g_key.len, key->data, key->len) == 0 &&
	       (kind != RANGE_SPAN || bytes_cmp(g->g_end.data, g->g_end.len, end->data, end->len) == 0);
}

static watch_group *group_get(watch_hub *h, range_kind kind, const ProtobufCBinaryData *key,
			      const ProtobufCBinaryData *end, int prev_kv, int noput, int nodelete)
{
	watch_group *g = kind == RANGE_ONE ? keyed_find(h, key->data, key->len) : h->h_ranges;
	for (; g; g = g->g_next) {
		if (group_same(g, kind, key, end, prev_kv, noput, nodelete)) {
			g->g_refs++;
			return g;
		}
	}
	g = calloc(1, sizeof(*g));
	if (g == NULL)
		return NULL;
	g->g_kind = kind;
	g->g_key.data = malloc(key->len ? key->len : 1);
	g->g_end.data = malloc(end->len ? end->len : 1);
	if (g->g_key.data == NULL || g->g_end.data == NULL) {
		free(g->g_key.data);
		free(g->g_end.data);
		free(g);
		return NULL;
	}
	memcpy(g->g_key.data, key->data, key->len);
	g->g_key.len = key->len;
	if (kind == RANGE_SPAN) {
		memcpy(g->g_end.data, end->data, end->len);
		g->g_end.len = end->len;
	}
	g->g_prev_kv = prev_kv;
	g->g_noput = noput;
	g->g_nodelete = nodelete;
	g->g_refs = 1;
	if (kind == RANGE_ONE) {
		if (keyed_add(h, g) != 0) {
			free(g->g_key.data);
			free(g->g_end.data);
			free(g);
			return NULL;
		}
	} else {
		g->g_next = h->h_ranges;
		h->h_ranges = g;
		h->h_nranges++;
	}
	return g;
}

static void watcher_remove(watch_hub *h, watcher *w)
{
	if (w->w_synced)
		group_unlink(w);
	else
		unsynced_remove(h, w);
	for (watcher **pp = &w->w_stream->ws_watchers; *pp; pp = &(*pp)->w_snext) {
		if (*pp == w) {
			*pp = w->w_snext;
			break;
		}
	}
	group_release(h, w->w_group);
	h->h_nwatchers--;
	watcher_free(h, w);
}

/* The stream is behind: its watchers leave the fast path until catch-up drains it. */
static void stream_mark_slow(watch_hub *h, watch_stream *ws)
{
	for (watcher *w = ws->ws_watchers; w; w = w->w_snext) {
		if (w->w_synced) {
			group_unlink(w);
			unsynced_add(h, w);
			h->h_nslow++;
		}
	}
}

static int stream_all_synced(watch_stream *ws)
{
	for (watcher *w = ws->ws_watchers; w; w = w->w_snext)
		if (!w->w_synced)
			return 0;
	return 1;
}

/* ---- the node loop's side ---- */

/* Notes event i for group g in this batch. Returns -1 when out of memory. */
static int sel_push(watch_hub *h, watch_group *g, size_t i)
{
	if (g->g_nsel == 0) {
		if (h->h_ntouched == h->h_touched_cap) {
			size_t cap = h->h_touched_cap ? h->h_touched_cap * 2 : 64;
			watch_group **t = realloc(h->h_touched, cap * sizeof(*t));
			if (t == NULL)
				return -1;
			h->h_touched = t;
			h->h_touched_cap = cap;
		}
		h->h_touched[h->h_ntouched++] = g;
	}
	if (g->g_nsel == g->g_selcap) {
		size_t cap = g->g_selcap ? g->g_selcap * 2 : 16;
		size_t *v = realloc(g->g_sel, cap * sizeof(*v));
		if (v == NULL)
			return -1;
		g->g_sel = v;
		g->g_selcap = cap;
	}
	g->g_sel[g->g_nsel++] = i;
	return 0;
}

static Mvccpb__Event **sort_evs; /* qsort has no context argument; used under h_mu only */

static int cmp_event_key(const void *a, const void *b)
{
	const ProtobufCBinaryData *x = &sort_evs[*(const size_t *)a]->kv->key;
	const ProtobufCBinaryData *y = &sort_evs[*(const size_t *)b]->kv->key;
	int c = bytes_cmp(x->data, x->len, y->data, y->len);
	return c ? c : (*(const size_t *)a > *(const size_t *)b) - (*(const size_t *)a < *(const size_t *)b);
}

static int cmp_index(const void *a, const void *b)
{
	size_t x = *(const size_t *)a, y = *(const size_t *)b;
	return (x > y) - (x < y);
}

/* Up to this many range groups, testing each event against each beats sorting the batch. */
#define WATCH_DIRECT_RANGES 8

/* Finds every group's events in the batch: a lookup per event for single-key groups, and
 * for key ranges either a test per pair or, for many, a binary search in the batch sorted
 * by key. Each touched group ends with its events in revision order. */
static int match_batch(watch_hub *h, Mvccpb__Event **evs, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		const ProtobufCBinaryData *k = &evs[i]->kv->key;
		for (watch_group *g = keyed_find(h, k->data, k->len); g; g = g->g_next)
			if (g->g_watchers && filters_pass(g, evs[i]) && sel_push(h, g, i) != 0)
				return -1;
	}
	if (h->h_nranges == 0)
		return 0;
	if (h->h_nranges <= WATCH_DIRECT_RANGES) {
		for (watch_group *g = h->h_ranges; g; g = g->g_next)
			for (size_t i = 0; g->g_watchers && i < n; i++)
				if (group_matches(g, evs[i]) && sel_push(h, g, i) != 0)
					return -1;
		return 0;
	}
	size_t *order = malloc(n * sizeof(*order));
	if (order == NULL)
		return -1;
	for (size_t i = 0; i < n; i++)
		order[i] = i;
	sort_evs = evs;
	qsort(order, n, sizeof(*order), cmp_event_key);
	int rc = 0;
	for (watch_group *g = h->h_ranges; g && rc == 0; g = g->g_next) {
		if (g->g_watchers == NULL)
			continue;
		size_t lo = 0, hi = n;
		while (lo < hi) {
			size_t mid = lo + (hi - lo) / 2;
			const ProtobufCBinaryData *k = &evs[order[mid]]->kv->key;
			if (bytes_cmp(k->data, k->len, g->g_key.data, g->g_key.len) < 0)
				lo = mid + 1;
			else
				hi = mid;
		}
		size_t before = g->g_nsel;
		for (size_t j = lo; j < n && rc == 0; j++) {
			const Mvccpb__Event *ev = evs[order[j]];
			if (g->g_kind == RANGE_SPAN &&
			    bytes_cmp(ev->kv->key.data, ev->kv->key.len, g->g_end.data, g->g_end.len) >= 0)
				break;
			if (filters_pass(g, ev))
				rc = sel_push(h, g, order[j]);
		}
		if (g->g_nsel - before > 1)
			qsort(g->g_sel + before, g->g_nsel - before, sizeof(size_t), cmp_index);
	}
	free(order);
	return rc;
}

/* Sends group g its events of this batch (g->g_sel), encoded once for all its watchers. */
static void deliver(watch_hub *h, watch_group *g, Mvccpb__Event **evs, int64_t rev, size_t *sub,
		    watch_stream **slow, size_t *nslow)
{
	size_t *sel = g->g_sel, m = g->g_nsel;
	api_bytes *shared = encode_events(evs, sel, m, g->g_prev_kv);
	watcher *next;
	for (watcher *w = g->g_watchers; w; w = next) {
		next = w->w_gnext;
		/* A watcher that just caught up may already have the first revisions. */
		size_t k = 0;
		while (k < m && evs[sel[k]]->kv->mod_revision < w->w_next_rev)
			k++;
		long q;
		if (k == m)
			continue;
		if (k == 0) {
			q = send_events(h, w, evs, sel, m, shared, rev);
		} else {
			memcpy(sub, sel + k, (m - k) * sizeof(size_t));
			q = send_events(h, w, evs, sub, m - k, NULL, rev);
		}
		w->w_next_rev = rev + 1;
		if ((q < 0 || (size_t)q > WATCH_STREAM_MAX_QUEUED) && *nslow < 64)
			slow[(*nslow)++] = w->w_stream;
	}
	api_bytes_unref(shared);
}

void watch_hub_notify(watch_hub *h, Mvccpb__Event **evs, size_t n, int64_t rev)
{
	if (h == NULL)
		return;
	pthread_mutex_lock(&h->h_mu);
	h->h_rev = rev;
	if (n == 0 || (h->h_keyed_n == 0 && h->h_ranges == NULL)) {
		pthread_mutex_unlock(&h->h_mu);
		return;
	}
	size_t *sub = malloc(n * sizeof(size_t));
	int rc = sub ? match_batch(h, evs, n) : -1;
	watch_stream *slow[64];
	size_t nslow = 0;
	for (size_t i = 0; i < h->h_ntouched; i++) {
		watch_group *g = h->h_touched[i];
		if (rc == 0)
			deliver(h, g, evs, rev, sub, slow, &nslow);
		g->g_nsel = 0;
	}
	h->h_ntouched = 0;
	if (rc != 0) {
		/* Out of memory: every watcher catches up from LMDB instead. */
		for (watch_stream *ws = h->h_streams; ws; ws = ws->ws_next)
			stream_mark_slow(h, ws);
	}
	for (size_t i = 0; i < nslow; i++)
		stream_mark_slow(h, slow[i]);
	free(sub);
	pthread_mutex_unlock(&h->h_mu);
}

void watch_hub_resync(watch_hub *h, int64_t rev)
{
	if (h == NULL)
		return;
	pthread_mutex_lock(&h->h_mu);
	h->h_rev = rev;
	for (watch_stream *ws = h->h_streams; ws; ws = ws->ws_next)
		stream_mark_slow(h, ws);
	pthread_cond_signal(&h->h_cond);
	pthread_mutex_unlock(&h->h_mu);
}

/* ---- catch-up and progress: the hub's own thread ---- */

/* One bounded catch-up step for w. Called with h_mu held. Returns 1 if w was removed. */
static int catch_up(watch_hub *h, watcher *w)
{
	storage_reader *r;
	storage_arena a;
	storage_arena_init(&a);
	if (storage_read_begin(h->h_sc->st, &r) != 0)
		return 0;
	Mvccpb__Event **evs = NULL;
	size_t n = 0;
	int64_t reader_rev = 0, compact_rev = 0;
	int rc = storage_read_events(r, w->w_next_rev, WATCH_CATCHUP_EVENTS, &a, &evs, &n, &reader_rev,
				     &compact_rev);
	int removed = 0;
	if (rc == STORAGE_ERR_COMPACTED) {
		/* etcd: the watcher is cancelled with the compacted revision. */
		send_control(h, w->w_stream, w->w_id, 0, 1, compact_rev, NULL);
		watcher_remove(h, w);
		removed = 1;
	} else if (rc == 0) {
		size_t *sel = malloc((n ? n : 1) * sizeof(size_t));
		size_t m = 0;
		if (sel) {
			for (size_t i = 0; i < n; i++)
				if (group_matches(w->w_group, evs[i]))
					sel[m++] = i;
			int64_t upto = n ? evs[n - 1]->kv->mod_revision : reader_rev;
			int done = n < WATCH_CATCHUP_EVENTS;
			if (done)
				upto = reader_rev;
			long q = 0;
			if (m > 0)
				q = send_events(h, w, evs, sel, m, NULL, upto);
			if (q >= 0) {
				w->w_next_rev = upto + 1;
				if (done && (size_t)q <= WATCH_STREAM_MAX_QUEUED) {
					unsynced_remove(h, w);
					group_link(w);
				}
			}
			free(sel);
		}
	}
	storage_read_end(r);
	storage_arena_free(&a);
	return removed;
}

static void send_progress_if_synced(watch_hub *h, watch_stream *ws)
{
	if (ws->ws_progress_requested && stream_all_synced(ws)) {
		ws->ws_progress_requested = 0;
		send_control(h, ws, WATCH_ID_NONE, 0, 0, 0, NULL);
	}
}

static uint64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void progress_tick(watch_hub *h)
{
	for (watch_stream *ws = h->h_streams; ws; ws = ws->ws_next) {
		for (watcher *w = ws->ws_watchers; w; w = w->w_snext) {
			if (!w->w_progress)
				continue;
			if (w->w_progress_due && w->w_synced)
				send_control(h, ws, w->w_id, 0, 0, 0, NULL);
			w->w_progress_due = 1;
		}
	}
}

static void *hub_thread(void *arg)
{
	prctl(PR_SET_NAME, "watch-hub"); /* names the thread in top -H, perf, gdb */
	watch_hub *h = arg;
	uint64_t next_tick = now_ms() + h->h_progress_ms;
	pthread_mutex_lock(&h->h_mu);
	while (!h->h_stop) {
		int waiting = 0;
		watcher *next;
		for (watcher *w = h->h_unsynced; w; w = next) {
			next = w->w_gnext;
			if (api_stream_queued_bytes(w->w_stream->ws_api) > WATCH_STREAM_RESUME_QUEUED) {
				waiting = 1;
				continue;
			}
			watch_stream *ws = w->w_stream;
			if (!catch_up(h, w))
				send_progress_if_synced(h, ws);
			if (h->h_unsynced)
				waiting = 1;
		}
		uint64_t now = now_ms();
		if (h->h_progress_ms > 0 && now >= next_tick) {
			progress_tick(h);
			next_tick = now + h->h_progress_ms;
		}
		/* Sleep until woken (a new unsynced watcher), or briefly while some wait for their
		 * queues to drain, or until the next progress tick. */
		uint64_t wait_ms = waiting ? 10 : (h->h_progress_ms ? next_tick - now : 1000);
		if (wait_ms > 1000)
			wait_ms = 1000;
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_nsec += (long)(wait_ms % 1000) * 1000000;
		ts.tv_sec += (time_t)(wait_ms / 1000) + ts.tv_nsec / 1000000000;
		ts.tv_nsec %= 1000000000;
		if (h->h_unsynced == NULL || waiting)
			pthread_cond_timedwait(&h->h_cond, &h->h_mu, &ts);
	}
	pthread_mutex_unlock(&h->h_mu);
	return NULL;
}

/* ---- the gRPC stream's side ---- */

static void watch_create(watch_hub *h, watch_stream *ws, const Etcdserverpb__WatchCreateRequest *c)
{
	/* etcd 3.4 takes a negative start revision like a past one: it is cancelled as
	 * compacted below the compacted revision (-1 when none), else replays from there. */
	/* etcd's normalisation: an empty key is "\0", a range end of "\0" means every key >= key. */
	static const uint8_t zero = 0;
	ProtobufCBinaryData key = c->key, end = c->range_end;
	if (key.len == 0) {
		key.data = (uint8_t *)&zero;
		key.len = 1;
	}
	range_kind kind = RANGE_SPAN;
	if (end.len == 0)
		kind = RANGE_ONE;
	else if (end.len == 1 && end.data[0] == 0)
		kind = RANGE_FROM;
	size_t toklen = 0;
	const char *tok = api_stream_metadata(ws->ws_api, "token", &toklen);
	int aerr = auth_check_range(h->h_sc->auth, tok, toklen, 0, &key, &c->range_end);
	if (aerr) {
		const char *m;
		auth_error_status(aerr, &m);
		send_control(h, ws, WATCH_ID_NONE, 1, 1, 0, m);
		return;
	}
	if (kind == RANGE_SPAN && bytes_cmp(key.data, key.len, end.data, end.len) >= 0) {
		send_control(h, ws, WATCH_ID_NONE, 1, 1, 0, "mvcc: watcher range is empty");
		return;
	}
	int64_t id = c->watch_id;
	if (id != 0) {
		for (watcher *o = ws->ws_watchers; o; o = o->w_snext) {
			if (o->w_id == id) {
				send_control(h, ws, WATCH_ID_NONE, 1, 1, 0,
					     "mvcc: duplicate watch ID provided on the WatchStream");
				return;
			}
		}
	} else {
		/* etcd: the next id not in use on this stream */
		for (;;) {
			id = ws->ws_next_id++;
			watcher *o = ws->ws_watchers;
			while (o && o->w_id != id)
				o = o->w_snext;
			if (o == NULL)
				break;
		}
	}
	int noput = 0, nodelete = 0;
	for (size_t i = 0; i < c->n_filters; i++) {
		if (c->filters[i] == ETCDSERVERPB__WATCH_CREATE_REQUEST__FILTER_TYPE__NOPUT)
			noput = 1;
		else if (c->filters[i] == ETCDSERVERPB__WATCH_CREATE_REQUEST__FILTER_TYPE__NODELETE)
			nodelete = 1;
	}
	watcher *w = watcher_alloc(h);
	watch_group *g = w ? group_get(h, kind, &key, &end, c->prev_kv, noput, nodelete) : NULL;
	if (g == NULL) {
		if (w)
			watcher_free(h, w);
		send_control(h, ws, WATCH_ID_NONE, 1, 1, 0, "keelson: out of memory");
		return;
	}
	w->w_id = id;
	w->w_stream = ws;
	w->w_group = g;
	w->w_progress = c->progress_notify != 0;
	w->w_progress_due = 1;
	w->w_fragment = c->fragment != 0;
	w->w_snext = ws->ws_watchers;
	ws->ws_watchers = w;
	h->h_nwatchers++;
	/* The created response goes first: everything for this watcher is queued after it. */
	send_control(h, ws, id, 1, 0, 0, NULL);
	if (c->start_revision == 0 || c->start_revision > h->h_rev) {
		/* from now on (0), or from a future revision */
		w->w_next_rev = c->start_revision ? c->start_revision : h->h_rev + 1;
		group_link(w);
	} else {
		w->w_next_rev = c->start_revision;
		unsynced_add(h, w);
	}
}

static void watch_on_open(void *ctx, api_stream *st)
{
	watch_hub *h = ctx;
	/* etcd's clients mark watch streams "hasleader": such a stream is refused while the
	 * member knows no leader, so the client moves to another member. */
	size_t hl = 0;
	const char *has_leader = api_stream_metadata(st, "hasleader", &hl);
	if (has_leader && hl == 4 && memcmp(has_leader, "true", 4) == 0 && node_leader(h->h_sc->nd) == 0) {
		api_stream_finish(st, 14 /* UNAVAILABLE */, "etcdserver: no leader");
		return;
	}
	watch_stream *ws = calloc(1, sizeof(*ws));
	if (ws == NULL) {
		api_stream_finish(st, 8 /* RESOURCE_EXHAUSTED */, "keelson: out of memory");
		return;
	}
	api_stream_retain(st);
	ws->ws_api = st;
	api_stream_set_data(st, ws);
	pthread_mutex_lock(&h->h_mu);
	ws->ws_next = h->h_streams;
	if (h->h_streams)
		h->h_streams->ws_prev = ws;
	h->h_streams = ws;
	h->h_nstreams++;
	pthread_mutex_unlock(&h->h_mu);
}

static void watch_on_message(void *ctx, api_stream *st, const ProtobufCMessage *msg)
{
	watch_hub *h = ctx;
	watch_stream *ws = api_stream_data(st);
	const Etcdserverpb__WatchRequest *req = (const Etcdserverpb__WatchRequest *)msg;
	if (ws == NULL)
		return;
	pthread_mutex_lock(&h->h_mu);
	switch (req->request_union_case) {
	case ETCDSERVERPB__WATCH_REQUEST__REQUEST_UNION_CREATE_REQUEST:
		watch_create(h, ws, req->create_request);
		break;
	case ETCDSERVERPB__WATCH_REQUEST__REQUEST_UNION_CANCEL_REQUEST: {
		int64_t id = req->cancel_request->watch_id;
		for (watcher *w = ws->ws_watchers; w; w = w->w_snext) {
			if (w->w_id == id) {
				watcher_remove(h, w);
				send_control(h, ws, id, 0, 1, 0, NULL);
				break;
			}
		}
		break;
	}
	case ETCDSERVERPB__WATCH_REQUEST__REQUEST_UNION_PROGRESS_REQUEST:
		ws->ws_progress_requested = 1;
		send_progress_if_synced(h, ws);
		break;
	default:
		/* etcd ignores requests it does not know */
		break;
	}
	pthread_mutex_unlock(&h->h_mu);
}

static void watch_on_close(void *ctx, api_stream *st)
{
	watch_hub *h = ctx;
	watch_stream *ws = api_stream_data(st);
	if (ws == NULL)
		return;
	pthread_mutex_lock(&h->h_mu);
	while (ws->ws_watchers)
		watcher_remove(h, ws->ws_watchers);
	if (ws->ws_prev)
		ws->ws_prev->ws_next = ws->ws_next;
	else
		h->h_streams = ws->ws_next;
	if (ws->ws_next)
		ws->ws_next->ws_prev = ws->ws_prev;
	h->h_nstreams--;
	pthread_mutex_unlock(&h->h_mu);
	api_stream_set_data(st, NULL);
	api_stream_release(st);
	free(ws);
}

static const api_stream_handlers watch_handlers = {
	.on_open = watch_on_open,
	.on_message = watch_on_message,
	.on_close = watch_on_close,
};

int watch_hub_start(watch_hub **out, server_ctx *sc, api_server *as)
{
	watch_hub *h = calloc(1, sizeof(*h));
	if (h == NULL)
		return -1;
	h->h_sc = sc;
	h->h_progress_ms = sc->cfg->watch_progress_notify_ms;
	storage_stats st;
	if (storage_stat(sc->st, &st) != 0) {
		free(h);
		return -1;
	}
	h->h_rev = st.st_revision;
	pthread_mutex_init(&h->h_mu, NULL);
	pthread_cond_init(&h->h_cond, NULL);
	if (api_server_route_stream(as, "/etcdserverpb.Watch/Watch", &watch_handlers, h) != 0 ||
	    pthread_create(&h->h_thread, NULL, hub_thread, h) != 0) {
		pthread_mutex_destroy(&h->h_mu);
		pthread_cond_destroy(&h->h_cond);
		free(h);
		return -1;
	}
	*out = h;
	return 0;
}

void watch_hub_stop(watch_hub *h)
{
	if (h == NULL)
		return;
	pthread_mutex_lock(&h->h_mu);
	h->h_stop = 1;
	pthread_cond_signal(&h->h_cond);
	pthread_mutex_unlock(&h->h_mu);
	pthread_join(h->h_thread, NULL);
}

void watch_hub_free(watch_hub *h)
{
	if (h == NULL)
		return;
	free(h->h_keyed);
	free(h->h_touched);
	while (h->h_slabs) {
		watch_slab *s = h->h_slabs;
		slab_unlink(h, s);
		slab_unmap(s);
	}
	pthread_mutex_destroy(&h->h_mu);
	pthread_cond_destroy(&h->h_cond);
	free(h);
}

void watch_hub_stats(watch_hub *h, watch_stats *out)
{
	memset(out, 0, sizeof(*out));
	pthread_mutex_lock(&h->h_mu);
	out->ws_streams = h->h_nstreams;
	out->ws_watchers = h->h_nwatchers;
	out->ws_slow_total = h->h_nslow;
	out->ws_events_total = h->h_nevents;
	for (watcher *w = h->h_unsynced; w; w = w->w_gnext)
		out->ws_unsynced++;
	for (watch_stream *ws = h->h_streams; ws; ws = ws->ws_next) {
		out->ws_pending_bytes += api_stream_queued_bytes(ws->ws_api);
		out->ws_pending_events += api_stream_queued_units(ws->ws_api);
	}
	pthread_mutex_unlock(&h->h_mu);
}
