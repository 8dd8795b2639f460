/* testutil.h - helpers shared by storage's tests (not part of the library). */
#ifndef KEELSON_STORAGE_TESTUTIL_H
#define KEELSON_STORAGE_TESTUTIL_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "storage/storage.h"

static int t_fail, t_checks;
#define CHECK(c)                                                                            \
	do {                                                                                \
		t_checks++;                                                                 \
		if (!(c)) {                                                                 \
			t_fail++;                                                           \
			fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #c); \
		}                                                                           \
	} while (0)
#define CHECK_EQ(a, b)                                                                      \
	do {                                                                                \
		long long _a = (long long)(a), _b = (long long)(b);                         \
		t_checks++;                                                                 \
		if (_a != _b) {                                                             \
			t_fail++;                                                           \
			fprintf(stderr, "%s:%d: %s == %lld, want %s == %lld\n", __FILE__, __LINE__, \
				#a, _a, #b, _b);                                            \
		}                                                                           \
	} while (0)

static inline char *t_tmpdir(const char *name)
{
	const char *base = getenv("TEST_TMPDIR");
	if (!base)
		base = "/tmp";
	char *p = malloc(strlen(base) + strlen(name) + 64);
	sprintf(p, "%s/%s.%d", base, name, (int)getpid());
	char cmd[4096];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", p);
	if (system(cmd) != 0)
		abort();
	return p;
}

static inline ProtobufCBinaryData t_bin(const void *p, size_t n)
{
	ProtobufCBinaryData d = {n, (uint8_t *)p};
	return d;
}
static inline ProtobufCBinaryData t_str(const char *s)
{
	return t_bin(s, s ? strlen(s) : 0);
}

#endif
