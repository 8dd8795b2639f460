"""Corruption checks: etcd's --experimental-initial-corrupt-check and
--experimental-corrupt-check-time, and the CORRUPT alarm.

A member is corrupted on purpose with the test-only tool //tests/tools:kv_corrupt, which
rewrites a key's newest value inside the stopped member's LMDB environment without a new
revision (bit rot: same history, different bytes). Then:
- restarted with the initial check, the member refuses to start with etcd's
  "<member id> found data inconsistency with peers";
- restarted without it in a cluster running the periodic check, the leader finds the
  member's HashKV differing and raises CORRUPT through Raft: `etcdctl alarm list` shows it,
  writes fail with etcd's "etcdserver: corrupt cluster", reads still work;
- a healthy cluster under writes and a compaction never raises it;
- with auth enabled, both checks still work: peers are asked over the peer transport (as
  etcd's /members/hashkv), which needs no client credentials.
What CORRUPT refuses is compared with a real etcd 3.4, on which the alarm is activated over
gRPC (etcd accepts Alarm ACTIVATE from clients).

Environment: KEELSON_CORRUPT_TOOL (default <repo>/bazel-bin/tests/tools/kv_corrupt). With
KEELSON_BIN=/usr/bin/etcd the corruption tests are skipped (the tool edits LMDB, not bbolt).
"""

import os
import re
import subprocess
import threading
import time
import unittest

import grpc
from etcd3.etcdrpc import rpc_pb2 as pb, rpc_pb2_grpc as pbg

import harness
import normalize as N
from cluster import Cluster

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.environ.get("KEELSON_CORRUPT_TOOL",
                      os.path.join(REPO, "bazel-bin", "tests", "tools", "kv_corrupt"))
IS_ETCD = os.path.basename(harness.KEELSON_BIN) == "etcd"
CHECK_EVERY = "200ms"
CORRUPT_ERR = "etcdserver: corrupt cluster"


def poll(cond, timeout, what):
    """cond() until truthy (returned) or the timeout (AssertionError naming what)."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.0fs waiting for %s" % (timeout, what))
        time.sleep(0.1)


def corrupt(member, key, value):
    if not (os.path.isfile(TOOL) and os.access(TOOL, os.X_OK)):
        raise AssertionError("%s not built (bazel build //tests/tools:kv_corrupt)" % TOOL)
    r = subprocess.run([TOOL, os.path.join(member.data_dir, "member"), key, value],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    if r.returncode != 0:
        raise AssertionError("kv_corrupt failed: %r %r" % (r.stdout, r.stderr))


def alarms(member):
    r = member.ctl("alarm", "list")
    if r.rc != 0:
        return None
    return r.stdout.strip()


def norm(cmd, r, server):
    """etcdctl's result with what legitimately differs (ids, endpoint, timestamps) masked."""
    rc, out, err = N.normalize(list(cmd), r.rc, r.out, r.err, server.endpoint)
    return rc, re.sub(rb"memberID:\d+", b"memberID:<ID>", out), err


def write_keys(member, n, prefix="k"):
    for i in range(n):
        r = member.ctl("put", "%s%d" % (prefix, i), "v%d" % i)
        if r.rc != 0:
            raise AssertionError("put failed: %r" % r)


@unittest.skipIf(IS_ETCD, "the corruption tool edits Keelson's LMDB data")
class InitialCheck(unittest.TestCase):
    def setUp(self):
        self.c = Cluster(3, label="ic", extra_args=["--experimental-initial-corrupt-check"])
        self.c.start()
        self.addCleanup(self.c.cleanup)

    def test_healthy_restart_passes_corrupted_restart_refused(self):
        c = self.c
        ldr = c.leader()
        write_keys(ldr, 10)
        c.wait_converged()
        f1, f2 = c.followers(ldr)[:2]

        # A healthy member passes the check against its peers and serves again.
        f1.stop()
        c.restart(f1)
        self.assertIn("initial corruption checking passed", f1.log_tail(400))

        # The same after corrupting one value: it must refuse to start.
        c.wait_converged()
        f2.status()  # learns f2.member_id
        f2.stop()
        corrupt(f2, "k5", "rotten")
        c.restart(f2, wait=False)
        rc = poll(lambda: f2.proc.poll() is not None and (f2.proc.returncode,), 60,
                  "the corrupted member to exit")[0]
        log = f2.log_tail(400)
        self.assertNotEqual(rc, 0, log)
        self.assertIn("%s found data inconsistency with peers" % f2.member_id, log)
        self.assertIn("found different hash values from remote peer", log)
        # The cluster is unaffected and raised nothing.
        self.assertEqual(alarms(ldr), "")
        self.assertEqual(ldr.ctl("put", "after", "1").rc, 0)


@unittest.skipIf(IS_ETCD, "the corruption tool edits Keelson's LMDB data")
class PeriodicCheck(unittest.TestCase):
    def setUp(self):
        self.c = Cluster(3, label="pc",
                         extra_args=["--experimental-corrupt-check-time", CHECK_EVERY])
        self.c.start()
        self.addCleanup(self.c.cleanup)

    def test_corrupted_follower_raises_alarm_and_writes_fail(self):
        c = self.c
        ldr = c.leader()
        write_keys(ldr, 10)
        c.wait_converged()
        # Several check periods on a healthy cluster first: nothing raised.
        time.sleep(1.0)
        self.assertEqual(alarms(ldr), "")

        f = c.followers(ldr)[0]
        f.status()
        f.stop()
        corrupt(f, "k3", "rotten")
        c.restart(f)
        self.assertEqual(f.ctl("get", "k3", "--consistency=s", "--print-value-only").stdout,
                         "rotten\n")

        listed = poll(lambda: "alarm:CORRUPT" in (alarms(ldr) or "") and alarms(ldr), 30,
                      "a CORRUPT alarm")
        new_ldr = c.leader()
        if new_ldr is ldr:
            # etcd's rule: the follower whose hash differs gets the alarm.
            self.assertEqual(listed, "memberID:%d alarm:CORRUPT" % int(f.member_id, 16))
        log = new_ldr.log_tail(2000)
        self.assertIn("same compact revision then hashes must match", log)

        # Every member refuses writes once the alarm is applied; reads go on.
        for m in c.members:
            r = poll(lambda: (lambda r: r.rc != 0 and r)(m.ctl("put", "x", "y")), 15,
                     "writes refused on %s" % m.name)
            self.assertEqual(r.stderr.strip().splitlines()[-1], "Error: " + CORRUPT_ERR)
            self.assertIn("alarm:CORRUPT", alarms(m))
        r = ldr.ctl("get", "k1", "--print-value-only")
        self.assertEqual((r.rc, r.stdout), (0, "v1\n"))
        r = ldr.ctl("del", "k1")
        self.assertIn(CORRUPT_ERR, r.stderr)


ROOT = "--user=root:rootpw"


def enable_auth(member):
    for args in (("user", "add", "root:rootpw", "--interactive=false"), ("auth", "enable")):
        r = member.ctl(*args)
        if r.rc != 0:
            raise AssertionError("%s: %r" % (args, r))


@unittest.skipIf(IS_ETCD, "the corruption tool edits Keelson's LMDB data")
class AuthEnabled(unittest.TestCase):
    """Both checks with auth on: a client without credentials could not ask for HashKV."""

    def start(self, flags):
        self.c = Cluster(3, label="ca", extra_args=flags)
        self.c.start()
        self.addCleanup(self.c.cleanup)
        ldr = self.c.leader()
        enable_auth(ldr)
        for i in range(10):
            r = ldr.ctl(ROOT, "put", "k%d" % i, "v%d" % i)
            self.assertEqual(r.rc, 0, r)
        # without credentials HashKV is refused, as on etcd
        r = ldr.ctl("endpoint", "hashkv")
        self.assertNotEqual(r.rc, 0, r)
        self.c.wait_converged()
        return ldr

    def restart(self, m):
        """Restarts m and waits until it serves (the harness's health wait has no user)."""
        self.c.restart(m, wait=False)
        poll(lambda: m.ctl(ROOT, "get", "k1", "--consistency=s", "--print-value-only").stdout == "v1\n",
             30, "%s serving again" % m.name)

    def test_initial_check_with_auth(self):
        ldr = self.start(["--experimental-initial-corrupt-check"])
        c = self.c
        f1, f2 = c.followers(ldr)[:2]
        f1.stop()
        self.restart(f1)
        log = f1.log_tail(400)
        self.assertIn("initial corruption checking passed", log)
        self.assertNotIn("failed hash kv request", log)
        f2.status()
        f2.stop()
        corrupt(f2, "k5", "rotten")
        c.restart(f2, wait=False)
        rc = poll(lambda: f2.proc.poll() is not None and (f2.proc.returncode,), 60,
                  "the corrupted member to exit")[0]
        log = f2.log_tail(400)
        self.assertNotEqual(rc, 0, log)
        self.assertIn("%s found data inconsistency with peers" % f2.member_id, log)

    def test_periodic_check_with_auth(self):
        ldr = self.start(["--experimental-corrupt-check-time", CHECK_EVERY])
        c = self.c
        f = c.followers(ldr)[0]
        f.status()
        f.stop()
        corrupt(f, "k3", "rotten")
        self.restart(f)

        def listed():
            r = ldr.ctl(ROOT, "alarm", "list")
            return r.rc == 0 and "alarm:CORRUPT" in r.stdout and r.stdout.strip()
        got = poll(listed, 30, "a CORRUPT alarm with auth on")
        if c.leader() is ldr:
            self.assertEqual(got, "memberID:%d alarm:CORRUPT" % int(f.member_id, 16))
        r = ldr.ctl(ROOT, "put", "x", "y")
        self.assertIn(CORRUPT_ERR, r.stderr)


class HealthyCluster(unittest.TestCase):
    """No false alarm under concurrent writes, deletes and a compaction (also on etcd)."""

    def test_no_alarm_under_writes(self):
        c = Cluster(3, label="hc", extra_args=["--experimental-corrupt-check-time", "100ms"])
        c.start()
        self.addCleanup(c.cleanup)
        ldr = c.leader()
        stop = threading.Event()
        errors = []

        def load(i):
            cli = None
            try:
                import etcd3
                m = c.members[i % len(c.members)]
                cli = etcd3.client(host="127.0.0.1", port=m.client_port, timeout=10)
                n = 0
                while not stop.is_set():
                    cli.put("load/%d/%d" % (i, n % 50), "x" * (n % 300))
                    if n % 7 == 0:
                        cli.delete("load/%d/%d" % (i, (n // 7) % 50))
                    n += 1
            except Exception as e:  # noqa
                errors.append(e)
            finally:
                if cli is not None:
                    cli.close()

        ts = [threading.Thread(target=load, args=(i,)) for i in range(3)]
        for t in ts:
            t.start()
        try:
            time.sleep(1.5)
            rev = int(ldr.status()["header"]["revision"])
            r = ldr.ctl("compaction", str(rev // 2))
            self.assertEqual(r.rc, 0, r)
            time.sleep(1.5)
        finally:
            stop.set()
            for t in ts:
                t.join(30)
        self.assertEqual(errors, [])
        c.wait_converged()
        time.sleep(0.5)  # a few more check periods at rest
        for m in c.members:
            self.assertEqual(alarms(m), "", m.log_tail(50))
        # All members agree, so the check had nothing to find.
        hashes = {h for h, _, _ in c.hashkv().values()}
        self.assertEqual(len(hashes), 1)


class CorruptAlarmAgainstEtcd(unittest.TestCase):
    """What an active CORRUPT alarm refuses, compared with etcd (the alarm activated over
    gRPC on both): the same etcdctl output for writes, reads, alarm list and disarm."""

    def test_same_answers_as_etcd(self):
        sut, oracle = harness.pair_for_test(self)
        for s in (sut, oracle):
            self.assertEqual(s.ctl("put", "a", "1").rc, 0)
            with grpc.insecure_channel(s.endpoint) as ch:
                m = pbg.MaintenanceStub(ch)
                mid = m.Status(pb.StatusRequest(), timeout=5).header.member_id
                m.Alarm(pb.AlarmRequest(action=pb.AlarmRequest.ACTIVATE, memberID=mid,
                                        alarm=pb.CORRUPT), timeout=5)
            # The alarm applies with the entry; the next write must see it.
            poll(lambda: s.ctl("put", "probe", "1").rc != 0, 10, "writes refused on " + s.label)
        cmds = [
            ("put", "a", "2"),
            ("get", "a"),
            ("del", "a"),
            ("lease", "grant", "10"),
            ("compaction", "1"),
            ("alarm", "list"),
            ("get", "a", "--consistency=s"),
            ("txn", "-w", "json"),
            ("alarm", "disarm"),
            ("put", "a", "3"),
            ("get", "a"),
        ]
        for cmd in cmds:
            stdin = b"\n\nput x y\n\n" if cmd[0] == "txn" else None
            a, b = sut.ctl(*cmd, stdin=stdin), oracle.ctl(*cmd, stdin=stdin)
            self.assertEqual(norm(cmd, a, sut), norm(cmd, b, oracle), cmd)


if __name__ == "__main__":
    unittest.main()
