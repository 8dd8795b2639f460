/*
 * kvcodec.c - mvccpb.KeyValue and varints on the wire, written exactly as etcd (gogoproto)
 * writes them: fields in order, zero fields left out; and CRC-32C, etcd's hash. Shared by
 * the revision table (mvcc.c) and etcd's backend format (etcdfmt.c), so both hold
 * byte-identical values and hashes.
 */
#include <stdatomic.h>
#include <string.h>

#include "storage/internal.h"

/* ---- mvccpb.KeyValue encoding (proto3: zero fields omitted, fields in order) ---- */

size_t storage__varint_size(uint64_t v)
{
	size_t n = 1;
	while (v >= 0x80) {
		v >>= 7;
		n++;
	}
	return n;
}

uint8_t *storage__varint_put(uint8_t *p, uint64_t v)
{
	while (v >= 0x80) {
		*p++ = (uint8_t)(v | 0x80);
		v >>= 7;
	}
	*p++ = (uint8_t)v;
	return p;
}

int storage__varint_get(const uint8_t **pp, const uint8_t *e, uint64_t *out)
{
	const uint8_t *p = *pp;
	uint64_t v = 0;
	for (int shift = 0; shift < 64; shift += 7) {
		if (p >= e)
			return STORAGE_ERR_CORRUPT;
		uint8_t c = *p++;
		v |= (uint64_t)(c & 0x7f) << shift;
		if (!(c & 0x80)) {
			*pp = p;
			*out = v;
			return 0;
		}
	}
	return STORAGE_ERR_CORRUPT;
}

size_t storage__kv_size(const kvrec *r)
{
	size_t n = 0;
	if (r->klen)
		n += 1 + storage__varint_size(r->klen) + r->klen;
	if (r->create)
		n += 1 + storage__varint_size((uint64_t)r->create);
	if (r->mod)
		n += 1 + storage__varint_size((uint64_t)r->mod);
	if (r->version)
		n += 1 + storage__varint_size((uint64_t)r->version);
	if (r->vlen)
		n += 1 + storage__varint_size(r->vlen) + r->vlen;
	if (r->lease)
		n += 1 + storage__varint_size((uint64_t)r->lease);
	return n;
}

uint8_t *storage__kv_encode(uint8_t *p, const kvrec *r)
{
	if (r->klen) {
		*p++ = 0x0a;
		p = storage__varint_put(p, r->klen);
		memcpy(p, r->key, r->klen);
		p += r->klen;
	}
	if (r->create) {
		*p++ = 0x10;
		p = storage__varint_put(p, (uint64_t)r->create);
	}
	if (r->mod) {
		*p++ = 0x18;
		p = storage__varint_put(p, (uint64_t)r->mod);
	}
	if (r->version) {
		*p++ = 0x20;
		p = storage__varint_put(p, (uint64_t)r->version);
	}
	if (r->vlen) {
		*p++ = 0x2a;
		p = storage__varint_put(p, r->vlen);
		memcpy(p, r->val, r->vlen);
		p += r->vlen;
	}
	if (r->lease) {
		*p++ = 0x30;
		p = storage__varint_put(p, (uint64_t)r->lease);
	}
	return p;
}

/* Decodes a KeyValue; byte fields point into p. */
int storage__kv_decode(const uint8_t *p, size_t n, kvrec *r)
{
	const uint8_t *e = p + n;
	memset(r, 0, sizeof(*r));
	while (p < e) {
		uint64_t tag, v;
		int err = storage__varint_get(&p, e, &tag);
		if (err)
			return err;
		switch (tag & 7) {
		case 0:
			if ((err = storage__varint_get(&p, e, &v)))
				return err;
			switch (tag >> 3) {
			case 2: r->create = (int64_t)v; break;
			case 3: r->mod = (int64_t)v; break;
			case 4: r->version = (int64_t)v; break;
			case 6: r->lease = (int64_t)v; break;
			}
			break;
		case 2:
			if ((err = storage__varint_get(&p, e, &v)))
				return err;
			if (v > (uint64_t)(e - p))
				return STORAGE_ERR_CORRUPT;
			if (tag >> 3 == 1) {
				r->key = p;
				r->klen = v;
			} else if (tag >> 3 == 5) {
				r->val = p;
				r->vlen = v;
			}
			p += v;
			break;
		case 1:
			if (e - p < 8)
				return STORAGE_ERR_CORRUPT;
			p += 8;
			break;
		case 5:
			if (e - p < 4)
				return STORAGE_ERR_CORRUPT;
			p += 4;
			break;
		default:
			return STORAGE_ERR_CORRUPT;
		}
	}
	return 0;
}
