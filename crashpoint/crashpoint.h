/*
 * crashpoint.h - named points on the write path where a test can make the process die.
 *
 * A crash test starts the member with KEELSON_CRASHPOINT=name:N in its environment; the Nth
 * time the code passes CRASHPOINT("name") the process writes one line to stderr
 * ("keelson: crashpoint name hit N: killing the process") and kills itself with SIGKILL, as
 * a kill -9 or a power cut of the process would (no atexit, no LMDB close, nothing flushed
 * that was not already written). tests/integration/test_crash.py drives it; the names are
 * listed there and beside each CRASHPOINT.
 *
 * Why a runtime switch in every build rather than a test-only binary: the test must crash
 * the binary that ships, and a second build of the server and storage (with a -D flag)
 * would cost every `bazel build //...` and CI run the compile of both again. The cost in a
 * normal run is one load of a global and a branch predicted not taken, at points that each
 * sit next to an fsync or a rename (microseconds to milliseconds): not measurable. The
 * variable is read once, at start-up (a constructor), and nowhere else. A build that wants
 * the points gone entirely defines KEELSON_NO_CRASHPOINTS (--copt=-DKEELSON_NO_CRASHPOINTS).
 *
 * Why named points rather than an LD_PRELOAD shim killing on the Nth fsync or rename: the
 * number of fsyncs before an interesting moment depends on timing (group commit batches
 * whatever arrived), so "the Nth fsync" is not the same moment twice; a name is. A crash
 * here keeps what the process wrote to the page cache (the kernel survives): it tests the
 * order of our commits, renames and temp files, not LMDB's fsync ordering under power loss.
 */
#ifndef KEELSON_CRASHPOINT_H
#define KEELSON_CRASHPOINT_H

/* Nonzero when KEELSON_CRASHPOINT was set at start-up. Read-only after start-up. */
extern int crashpoint__armed;
/* Counts a hit of name; kills the process if it is the armed point's Nth hit. Thread-safe. */
void crashpoint__hit(const char *name);

#ifdef KEELSON_NO_CRASHPOINTS
#define CRASHPOINT(name) ((void)0)
#else
#define CRASHPOINT(name)                                   \
	do {                                               \
		if (__builtin_expect(crashpoint__armed, 0)) \
			crashpoint__hit(name);             \
	} while (0)
#endif

#endif
