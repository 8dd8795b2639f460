/*
 * check.h - CHECK for the C unit tests that need nothing more: a failed condition is
 * reported with its place and counted, and the test goes on, so one run shows every failure.
 * The test's main reports check_failures and returns non-zero if there were any. (The Raft
 * tests, storage's and the peer transport's have their own, with per-test names and counts.)
 */
#ifndef KEELSON_TESTS_UNIT_CHECK_H
#define KEELSON_TESTS_UNIT_CHECK_H

#include <stdio.h>

static int check_failures;

#define CHECK(cond)                                                                        \
	do {                                                                               \
		if (!(cond)) {                                                             \
			fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
			check_failures++;                                                  \
		}                                                                          \
	} while (0)

#endif
