#!/usr/bin/python3
"""Runs Keelson's Python integration tests (stdlib unittest, no pip installs).

Usage (from anywhere; use Debian's /usr/bin/python3, which has python3-etcd3 and grpc):
  /usr/bin/python3 tests/integration/run.py                 # every test_*.py here
  /usr/bin/python3 tests/integration/run.py test_bad_input  # some modules
  /usr/bin/python3 tests/integration/run.py -k txn          # tests whose id contains 'txn'
  KEELSON_BIN=/usr/bin/etcd /usr/bin/python3 tests/integration/run.py   # validate vs etcd

Prints one line per test, details of failures, and closes with `N passed, N failed`.
Exit status 0 only if nothing failed. --summary FILE also writes {"passed":N,"failed":N}.
"""

import argparse
import glob
import json
import os
import sys
import time
import traceback
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # noqa: E402


class Result(unittest.TestResult):
    def __init__(self, stream):
        super().__init__()
        self.stream = stream
        self.passed = []
        self.failed = []   # (name, text)
        self.skipped_ = []
        self._t0 = {}
        self._failed_ids = set()   # ids of failed tests (a test counts once)
        self._reported = set()

    def _emit(self, msg):
        self.stream.write(msg + "\n")
        self.stream.flush()

    def startTest(self, test):
        super().startTest(test)
        self._t0[test.id()] = time.monotonic()

    def stopTest(self, test):
        super().stopTest(test)
        tid = test.id()
        if tid in self._failed_ids and tid not in self._reported:
            self._emit("FAIL  %-70s %6.1fs" % (tid, self._dt(test)))
        self._reported.add(tid)

    def _dt(self, test):
        return time.monotonic() - self._t0.get(test.id(), time.monotonic())

    def addSuccess(self, test):
        super().addSuccess(test)
        self.passed.append(test.id())
        self._emit("PASS  %-70s %6.1fs" % (test.id(), self._dt(test)))

    def _fail(self, test, err, kind):
        text = self._exc_info_to_string(err, test) if isinstance(err, tuple) else str(err)
        tid = test.id() if hasattr(test, "id") else str(test)
        self.failed.append((tid, text))
        self._failed_ids.add(tid)
        self._reported.add(tid)
        dt = self._dt(test) if hasattr(test, "id") else 0.0
        self._emit("%-5s %-70s %6.1fs" % (kind, getattr(test, "id", lambda: str(test))(), dt))

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._fail(test, err, "FAIL")

    def addError(self, test, err):
        super().addError(test, err)
        self._fail(test, err, "ERROR")

    def addSubTest(self, test, subtest, err):
        # a test with failing subtests counts once as failed; each subtest's details are kept
        super().addSubTest(test, subtest, err)
        if err is not None:
            text = self._exc_info_to_string(err, test)
            self.failed.append((subtest.id(), text))
            self._failed_ids.add(test.id())
            self._emit("  subtest failed: %s" % subtest.id())

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self.skipped_.append((test.id(), reason))
        self._emit("SKIP  %-70s (%s)" % (test.id(), reason))

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self.passed.append(test.id())

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self.failed.append((test.id(), "unexpected success"))
        self._failed_ids.add(test.id())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("modules", nargs="*", help="test module names (default: all test_*.py)")
    ap.add_argument("-k", dest="pattern", action="append", default=[],
                    help="only tests whose id contains this substring (repeatable)")
    ap.add_argument("--summary", help="write a JSON summary here")
    opts = ap.parse_args()

    mods = opts.modules or sorted(os.path.basename(p)[:-3]
                                  for p in glob.glob(os.path.join(HERE, "test_*.py")))
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    load_failures = []
    for m in mods:
        m = m[:-3] if m.endswith(".py") else m
        try:
            suite.addTests(loader.loadTestsFromName(m))
        except Exception:  # noqa
            load_failures.append((m, traceback.format_exc()))

    def flatten(s):
        for t in s:
            if isinstance(t, unittest.TestSuite):
                yield from flatten(t)
            else:
                yield t

    if opts.pattern:
        tests = [t for t in flatten(suite) if any(p in t.id() for p in opts.pattern)]
        suite = unittest.TestSuite(tests)

    print("server under test: %s" % harness.KEELSON_BIN)
    print("oracle: %s   etcdctl: %s" % (harness.ETCD_BIN, harness.ETCDCTL_BIN))
    print("%d tests in %s" % (suite.countTestCases(), ", ".join(mods)))
    sys.stdout.flush()

    result = Result(sys.stdout)
    t0 = time.monotonic()
    try:
        suite.run(result)
    finally:
        harness.cleanup_all()
    for m, tb in load_failures:
        result.failed.append(("load " + m, tb))
        result._failed_ids.add("load " + m)
        print("ERROR could not load %s" % m)

    if result.failed:
        print("\n" + "=" * 78 + "\nFAILURES\n" + "=" * 78)
        for name, text in result.failed:
            print("-" * 78 + "\n" + name + "\n" + "-" * 78)
            print(text.rstrip())
    npass, nfail = len(result.passed), len(result._failed_ids)
    print("\nPython integration tests took %.1fs (%d skipped)" % (
        time.monotonic() - t0, len(result.skipped_)))
    if opts.summary:
        with open(opts.summary, "w") as f:
            json.dump({"passed": npass, "failed": nfail,
                       "failed_tests": sorted(result._failed_ids)}, f)
    print("%d passed, %d failed" % (npass, nfail))
    return 0 if nfail == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
