/*
 * arena.c - storage_arena: a bump allocator for response memory, released all at once.
 * Chunks grow geometrically (4 KiB up to 1 MiB); an allocation larger than the chunk size
 * gets a chunk of its own, so large values cost one malloc and no copying of earlier data.
 */
#include <stdlib.h>
#include <string.h>

#include "storage/storage.h"

struct storage_arena_chunk {
	storage_arena_chunk *next;
	size_t cap;
	/* 16-byte aligned payload follows */
	_Alignas(16) unsigned char data[];
};

#define ARENA_MIN 4096
#define ARENA_MAX (1u << 20)

void storage_arena_init(storage_arena *a)
{
	a->sa_head = NULL;
	a->sa_used = 0;
	a->sa_cap = 0;
}

void *storage_arena_alloc(storage_arena *a, size_t n)
{
	size_t need = (n + 15) & ~(size_t)15;
	if (need < n)
		return NULL;
	if (a->sa_head && a->sa_cap - a->sa_used >= need) {
		void *p = a->sa_head->data + a->sa_used;
		a->sa_used += need;
		return p;
	}
	size_t cap = a->sa_cap ? a->sa_cap * 2 : ARENA_MIN;
	if (cap > ARENA_MAX)
		cap = ARENA_MAX;
	if (need > cap / 2) {
		/* A big allocation: its own chunk, behind the current head so that the head's
		 * free space stays usable. */
		storage_arena_chunk *c = malloc(sizeof(*c) + need);
		if (!c)
			return NULL;
		c->cap = need;
		if (a->sa_head) {
			c->next = a->sa_head->next;
			a->sa_head->next = c;
		} else {
			c->next = NULL;
			a->sa_head = c;
			a->sa_used = need;
			a->sa_cap = need;
		}
		return c->data;
	}
	storage_arena_chunk *c = malloc(sizeof(*c) + cap);
	if (!c)
		return NULL;
	c->cap = cap;
	c->next = a->sa_head;
	a->sa_head = c;
	a->sa_cap = cap;
	a->sa_used = need;
	return c->data;
}

void *storage_arena_dup(storage_arena *a, const void *p, size_t n)
{
	void *d = storage_arena_alloc(a, n ? n : 1);
	if (d && n)
		memcpy(d, p, n);
	return d;
}

void storage_arena_free(storage_arena *a)
{
	storage_arena_chunk *c = a->sa_head;
	while (c) {
		storage_arena_chunk *next = c->next;
		free(c);
		c = next;
	}
	storage_arena_init(a);
}
