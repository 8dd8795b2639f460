/* crashpoint.c - see crashpoint.h. */
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "crashpoint/crashpoint.h"

int crashpoint__armed;

static char armed_name[128];
static long armed_at;      /* the hit that kills: 1 is the first */
static _Atomic long hits;  /* hits of armed_name so far */

/* KEELSON_CRASHPOINT=name:N (N >= 1; ":N" may be left out for the first hit). Anything
 * malformed is reported and ignored: a typo must not look like a point never reached. */
__attribute__((constructor)) static void crashpoint_init(void)
{
	const char *spec = getenv("KEELSON_CRASHPOINT");
	if (spec == NULL || *spec == '\0')
		return;
	const char *colon = strrchr(spec, ':');
	size_t n = colon ? (size_t)(colon - spec) : strlen(spec);
	long at = 1;
	if (colon) {
		char *end;
		at = strtol(colon + 1, &end, 10);
		if (*end != '\0')
			at = 0;
	}
	if (n == 0 || n >= sizeof(armed_name) || at < 1) {
		fprintf(stderr, "keelson: ignoring malformed KEELSON_CRASHPOINT=%s (want name:N)\n", spec);
		return;
	}
	memcpy(armed_name, spec, n);
	armed_name[n] = '\0';
	armed_at = at;
	crashpoint__armed = 1;
	fprintf(stderr, "keelson: crashpoint %s armed at hit %ld\n", armed_name, armed_at);
}

void crashpoint__hit(const char *name)
{
	if (strcmp(name, armed_name) != 0)
		return;
	long h = atomic_fetch_add(&hits, 1) + 1;
	if (h != armed_at)
		return;
	char line[200];
	int len = snprintf(line, sizeof(line), "keelson: crashpoint %s hit %ld: killing the process\n", name, h);
	if (len > 0)
		(void)!write(2, line, (size_t)len < sizeof(line) ? (size_t)len : sizeof(line) - 1);
	kill(getpid(), SIGKILL);
	_exit(137); /* not reached */
}
