"""Crash safety of storage (issue 10): a member dies at named points of its write path and
must come back whole.

The server is started with KEELSON_CRASHPOINT=name:N (crashpoint/crashpoint.h): the Nth time
it passes the named point it kills itself with SIGKILL. Points:

  wal.cut                        a new WAL segment created and synced, nothing in it yet
  wal.written / wal.synced       a batch's log records in the WAL, before / after fdatasync
                                 (the LMDB commit not begun)
  commit.before / commit.after   around the LMDB commit of a batch (group commit; an apply
                                 batch's commit runs after its answers, on the committer thread)
  compact.continue               between the bounded steps of a physical compaction
  defrag.opened / defrag.copied  a defragment's copy beside the store, empty / whole
  defrag.renamed                 the copy renamed over the store, directory not yet synced
  snap.copied                    leader: a snapshot copy made for a follower, none sent
  snap.recv.chunk / .done        follower: part of a snapshot received / all of it, verified
  snap.rewritten                 follower: the copy rewritten with its own log and identity
  snap.logcleared                follower: the WAL's clear (void until the install) synced
  install.renamed                follower: the copy renamed over its store
  snap.installed                 follower: the new store in place, the WAL's clear in force
  (wal.removed and wal.migrated: storage/wal_test.c; they need a 64 MiB log or an old store)

After each crash the member is restarted (without the variable) and checked: it starts;
every acknowledged write is there and nothing but a prefix of what was sent (the workloads
are sequential, so revision r is the (r-1)th request: the whole keyspace and history are
compared with a model); the revision and compaction are what the model says; HashKV equals
a real etcd's that applied the same requests (single member) or the other members' (in a
cluster, after catch-up); no temp file is left behind, and a defragment still works.

Everything is deterministic (a point and a hit count, sequential clients) and the module
runs in well under a minute on 2 cores. The points are Keelson's: with KEELSON_BIN=etcd the
module is skipped.
"""

import functools
import json
import os
import re
import subprocess
import time
import unittest

import etcd3
from etcd3 import etcdrpc as rpc
import grpc

import harness
import kvmodel
from harness import poll
from cluster import Cluster, ClusterError

IS_ETCD = os.path.basename(harness.KEELSON_BIN) == "etcd"
TEMP_NAMES = re.compile(r"^(data\.mdb\.defrag|snap\.recv|snap\.send\..*)$")
STORE_FILES = {"data.mdb", "lock.mdb", "keelson.lock"}


# ---------------------------------------------------------------------------------------
# workloads: a fixed list of requests, each one revision, sent one at a time

def put_op(key, value):
    return ("put", rpc.PutRequest(key=key.encode(), value=value.encode()))


def txn_op(pairs):
    return ("txn", rpc.TxnRequest(success=[
        rpc.RequestOp(request_put=rpc.PutRequest(key=k.encode(), value=v.encode()))
        for k, v in pairs]))


def puts_workload(n=300, nkeys=40, size=64):
    """n puts over nkeys keys (each key rewritten, so there is history to compact)."""
    return [put_op("/crash/k%03d" % (i % nkeys), ("v%d-" % i).ljust(size, "x"))
            for i in range(n)]


def txns_workload(n=250, width=128):
    """n txns of width puts each: enough revision records (n * width) for a physical
    compaction to take several bounded steps (10,000 records a step)."""
    return [txn_op([("/ctx/%03d" % j, "t%d-%d" % (i, j)) for j in range(width)])
            for i in range(n)]


def model_state(ops, n, at_rev=None):
    """{key: (value, create_revision, mod_revision, version)} after the first n ops
    (op i is revision i + 2 on a fresh store), as seen at revision at_rev."""
    return kvmodel.replay([(i + 2, ops[i]) for i in range(n)], at_rev)


def send(kv, op):
    kind, req = op
    if kind == "put":
        return kv.Put(req, timeout=10).header.revision
    return kv.Txn(req, timeout=10).header.revision


class Conn:
    """A python3-etcd3 client's gRPC stubs for one server."""

    def __init__(self, server):
        self.c = etcd3.client(host="127.0.0.1", port=server.client_port, timeout=10)
        self.kv = self.c.kvstub
        self.maint = self.c.maintenancestub

    def close(self):
        self.c.close()

    def revision(self):
        return self.kv.Range(rpc.RangeRequest(key=b"\0", limit=1), timeout=10).header.revision

    def hashkv(self, rev):
        r = self.maint.HashKV(rpc.HashKVRequest(revision=rev), timeout=30)
        return r.hash, r.compact_revision

    def range_all(self, rev=0, serializable=False):
        r = self.kv.Range(rpc.RangeRequest(key=b"\0", range_end=b"\0", revision=rev,
                                           serializable=serializable), timeout=30)
        return {kv.key: (kv.value, kv.create_revision, kv.mod_revision, kv.version)
                for kv in r.kvs}


class Oracle:
    """Real etcd servers that applied a whole workload (and a compaction): HashKV at any
    revision of it is what a member that applied a prefix must report."""

    def __init__(self):
        self.servers = {}

    def hashkv(self, name, ops, rev, compact=None):
        key = (name, compact)
        if key not in self.servers:
            s = harness.Server(binary=harness.ETCD_BIN, label="crash-oracle")
            s.start()
            self.servers[key] = s
            conn = Conn(s)
            try:
                for op in ops:
                    send(conn.kv, op)
                if compact is not None:
                    conn.kv.Compact(rpc.CompactionRequest(revision=compact, physical=True),
                                    timeout=30)
            finally:
                conn.close()
        conn = Conn(self.servers[key])
        try:
            return conn.hashkv(rev)
        finally:
            conn.close()

    def cleanup(self):
        for s in self.servers.values():
            s.cleanup(graceful=False)


def logs_on_failure(method):
    """A cluster test whose failure (most would be time-outs: a follower that never gets its
    snapshot, never catches up) carries every log of every member, each start's apart. CI
    removes the data dirs, and the cause is as likely in the leader's log (did it redial,
    send, send again?) or in the follower's crashed start as in the follower's last log,
    the only one the harness' messages show."""
    @functools.wraps(method)
    def run(self, *args, **kw):
        t0 = time.monotonic()
        try:
            return method(self, *args, **kw)
        except (AssertionError, ClusterError, harness.ServerError, grpc.RpcError) as e:
            raise AssertionError("%s\n(%.1fs into the test; every member's logs follow)\n%s"
                                 % (e, time.monotonic() - t0, all_logs(self.c))) from e
    return run


def all_logs(c, n=25):
    """The last n lines of each log of each member of cluster c."""
    out = []
    for m in c.members:
        for i in range(1, m._starts + 1):
            p = os.path.join(m.tmp, "server-%d.log" % i)
            try:
                with open(p, "rb") as f:
                    lines = f.read().decode("utf-8", "replace").splitlines()
            except OSError:
                continue
            out.append("---- %s, last %d lines ----\n%s" % (p, n, "\n".join(lines[-n:])))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------

class CrashCase(unittest.TestCase):

    def member_dir(self, m):
        return os.path.join(m.data_dir, "member")

    def arm(self, m, spec):
        m.env = {"KEELSON_CRASHPOINT": spec}

    def disarm(self, m):
        m.env = {}

    def wait_crashed(self, m, point, timeout=20):
        """The member died by the armed point (not some other way, and not never)."""
        try:
            m.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail("%s still running %.0fs after crash point %s should have been hit\n%s"
                      % (m.label, timeout, point, m.log_tail(20)))
        m._reaped()
        log = open(m.log_path, "rb").read().decode("utf-8", "replace")
        self.assertIn("crashpoint %s hit" % point, log, m.log_tail(20))
        self.assertEqual(m.proc.returncode, -9, m.log_tail(20))

    def assert_no_temp_files(self, m):
        names = os.listdir(self.member_dir(m))
        self.assertEqual([n for n in names if TEMP_NAMES.match(n)], [],
                         "temp files left in %s: %s" % (self.member_dir(m), names))

    def drive(self, m, ops, expect_crash):
        """Sends ops one at a time; returns (acked, sent). With expect_crash the member must
        die before the last op is acknowledged."""
        conn = Conn(m)
        acked = 0
        try:
            for op in ops:
                try:
                    rev = send(conn.kv, op)
                except grpc.RpcError:
                    if not expect_crash:
                        raise
                    return acked, acked + 1
                self.assertEqual(rev, acked + 2, "op %d got revision %d" % (acked, rev))
                acked += 1
        finally:
            conn.close()
        if expect_crash:
            self.fail("the member acknowledged all %d ops without reaching the crash point\n%s"
                      % (len(ops), m.log_tail(20)))
        return acked, acked


class SingleMember(CrashCase):
    """One member: the write path, compaction and defragment. HashKV against etcd."""

    @classmethod
    def setUpClass(cls):
        if IS_ETCD:
            raise unittest.SkipTest("crash points are Keelson's")
        cls.oracle = Oracle()
        cls.puts = puts_workload()
        cls.txns = txns_workload()

    @classmethod
    def tearDownClass(cls):
        cls.oracle.cleanup()

    def setUp(self):
        # one LMDB commit per apply, so that "the Nth commit" falls inside the run (the
        # default --backend-batch-interval lets several applies share one: tested below)
        self.c = Cluster(1, label="crash", extra_args=["--backend-batch-interval=0"])
        self.m = self.c.members[0]
        self.addCleanup(self.c.cleanup)

    def start_armed(self, spec):
        self.arm(self.m, spec)
        self.m.spawn()
        self.c.wait_healthy([self.m])

    def restart(self):
        self.disarm(self.m)
        self.c.restart(self.m)

    def check(self, name, ops, acked, sent, compact=None):
        """Everything acknowledged is there, nothing but a prefix of ops, equal to etcd's."""
        conn = Conn(self.m)
        try:
            rev = conn.revision()
            n = rev - 1
            self.assertGreaterEqual(n, acked, "acknowledged writes lost: revision %d" % rev)
            self.assertLessEqual(n, sent, "revision %d beyond the %d ops sent" % (rev, sent))
            self.assertEqual(conn.range_all(), model_state(ops, n))
            if compact is None:
                # history too: the keyspace at an older revision
                mid = max(1, rev // 2)
                self.assertEqual(conn.range_all(rev=mid), model_state(ops, n, at_rev=mid))
            else:
                with self.assertRaises(grpc.RpcError) as cm:
                    conn.range_all(rev=compact - 1)
                self.assertIn("compacted", cm.exception.details())
                self.assertEqual(conn.range_all(rev=compact), model_state(ops, n, at_rev=compact))
            got = conn.hashkv(rev)
            want = self.oracle.hashkv(name, ops, rev, compact)
            self.assertEqual(got, want, "HashKV at %d (hash, compact revision)" % rev)
        finally:
            conn.close()
        self.assert_no_temp_files(self.m)
        return rev

    def defragment_still_works(self):
        conn = Conn(self.m)
        try:
            before = conn.range_all()
            conn.maint.Defragment(rpc.DefragmentRequest(), timeout=60)
            self.assertEqual(conn.range_all(), before)
        finally:
            conn.close()
        self.assert_no_temp_files(self.m)

    # -- the LMDB commit of a batch

    def crash_in_writes(self, spec):
        point = spec.split(":")[0]
        self.start_armed(spec)
        acked, sent = self.drive(self.m, self.puts, expect_crash=True)
        self.wait_crashed(self.m, point)
        self.restart()
        rev = self.check("puts", self.puts, acked, sent)
        if point in ("wal.written", "wal.synced"):
            # the batch that died had its entry in the WAL (written survives a kill -9, the
            # page cache does): the op in flight is applied at the restart
            self.assertEqual(rev - 1, sent)
        elif point == "commit.before":
            # the LMDB commit runs on the committer thread after its batch was answered
            # (storage_batch_commit_async): that op is redone from the WAL; the client's
            # next one may have been sent and not yet written, and is then lost unanswered
            self.assertIn(rev - 1, (sent - 1, sent))
        # the member goes on writing where it stopped, and survives a clean restart
        acked2, _ = self.drive_rest(rev - 1)
        self.c.restart(self.m)
        self.check("puts", self.puts, acked2, acked2)

    def drive_rest(self, done):
        conn = Conn(self.m)
        try:
            for i in range(done, len(self.puts)):
                self.assertEqual(send(conn.kv, self.puts[i]), i + 2)
        finally:
            conn.close()
        return len(self.puts), len(self.puts)

    def test_commit_before_early(self):
        self.crash_in_writes("commit.before:20")

    def test_commit_before_late(self):
        self.crash_in_writes("commit.before:150")

    def test_commit_before_in_window(self):
        # the default --backend-batch-interval (5 ms): several answered applies wait in one
        # LMDB transaction; a crash before its commit loses none of them (redone from the WAL)
        self.c = Cluster(1, label="crashw")
        self.m = self.c.members[0]
        self.addCleanup(self.c.cleanup)
        self.crash_in_writes("commit.before:8")

    def test_wal_written_early(self):
        self.crash_in_writes("wal.written:20")

    def test_wal_written_late(self):
        self.crash_in_writes("wal.written:150")

    def test_wal_synced_early(self):
        self.crash_in_writes("wal.synced:20")

    def test_wal_synced_late(self):
        self.crash_in_writes("wal.synced:150")

    def test_wal_first_segment_cut(self):
        # the first segment, made at the first write of a new member
        self.arm(self.m, "wal.cut:1")
        self.m.spawn()
        self.wait_crashed(self.m, "wal.cut")
        self.restart()
        acked, _ = self.drive(self.m, self.puts, expect_crash=False)
        self.c.restart(self.m)
        self.check("puts", self.puts, acked, acked)

    def test_commit_after_early(self):
        self.crash_in_writes("commit.after:21")

    def test_commit_after_late(self):
        self.crash_in_writes("commit.after:151")

    # -- physical compaction, between its bounded steps

    def crash_in_compaction(self, spec, compact=200):
        point = spec.split(":")[0]
        self.start_armed(spec)
        acked, _ = self.drive(self.m, self.txns, expect_crash=False)
        conn = Conn(self.m)
        try:
            with self.assertRaises(grpc.RpcError):
                conn.kv.Compact(rpc.CompactionRequest(revision=compact, physical=True), timeout=30)
        finally:
            conn.close()
        self.wait_crashed(self.m, point)
        self.restart()
        # the compaction itself was committed with its first step: it holds after the crash
        self.check("txns", self.txns, acked, acked, compact=compact)
        # and the superseded revisions still on disk are removed after the restart, without
        # waiting for another compaction: every key's revision at 200, and those above it
        width = len(self.txns[0][1].success)
        want = width * (len(self.txns) + 1 - compact + 1)
        poll(lambda: self.revision_records() == want, 20,
             what="the interrupted compaction finished (%d revision records)" % want)
        self.check("txns", self.txns, acked, acked, compact=compact)
        self.defragment_still_works()

    def revision_records(self):
        """Entries of the member's revision table (mdb_stat reads a live environment)."""
        r = subprocess.run(["mdb_stat", "-s", "revs", self.member_dir(self.m)],
                           capture_output=True, text=True, timeout=20)
        m = re.search(r"Entries: (\d+)", r.stdout)
        return int(m.group(1)) if m else None

    def test_compaction_after_first_step(self):
        self.crash_in_compaction("compact.continue:1")

    def test_compaction_after_second_step(self):
        self.crash_in_compaction("compact.continue:2")

    # -- defragment

    def crash_in_defrag(self, point):
        self.start_armed(point + ":1")
        acked, _ = self.drive(self.m, self.puts, expect_crash=False)
        conn = Conn(self.m)
        try:
            with self.assertRaises(grpc.RpcError):
                conn.maint.Defragment(rpc.DefragmentRequest(), timeout=60)
        finally:
            conn.close()
        self.wait_crashed(self.m, point)
        if point != "defrag.renamed":
            self.assertTrue(os.path.exists(os.path.join(self.member_dir(self.m), "data.mdb.defrag")),
                            "the point should leave a copy behind")
        self.restart()
        self.check("puts", self.puts, acked, acked)
        self.defragment_still_works()
        self.c.restart(self.m)
        self.check("puts", self.puts, acked, acked)

    def test_defrag_opened(self):
        self.crash_in_defrag("defrag.opened")

    def test_defrag_copied(self):
        self.crash_in_defrag("defrag.copied")

    def test_defrag_renamed(self):
        self.crash_in_defrag("defrag.renamed")


class ClusterMember(CrashCase):
    """Three members: a follower dies while it receives and installs a snapshot, the leader
    while it copies one, a follower at a commit. After the restart every member has the same
    HashKV and the follower serves every acknowledged write."""

    NPUTS = 60

    @classmethod
    def setUpClass(cls):
        if IS_ETCD:
            raise unittest.SkipTest("crash points are Keelson's")

    def setUp(self):
        # a short log, cut often: a follower that misses NPUTS writes needs a snapshot
        self.c = Cluster(3, label="crashc", extra_args=[
            "--snapshot-count=20", "--experimental-snapshot-catchup-entries=5"])
        self.c.start()
        self.addCleanup(self.c.cleanup)

    def write(self, m, prefix, n, size=40000):
        """n puts through m, values large enough that a snapshot is several 1 MiB chunks.
        Returns {key: value} of what was acknowledged."""
        conn = Conn(m)
        acked = {}
        try:
            for i in range(n):
                k, v = ("%s%03d" % (prefix, i)).encode(), (("%d-" % i) * size)[:size].encode()
                conn.kv.Put(rpc.PutRequest(key=k, value=v), timeout=10)
                acked[k] = v
        finally:
            conn.close()
        return acked

    def check_cluster(self, f, acked):
        c = self.c
        c.wait_healthy()
        self.assert_no_temp_files(f)

        def converged():
            idx, rev = c.wait_converged(timeout=20)
            hs = c.hashkv(rev=rev)
            return len(set(hs.values())) == 1 and hs
        poll(converged, 30, what="equal HashKV on every member")
        conn = Conn(f)
        try:
            got = conn.range_all(serializable=True)
        finally:
            conn.close()
        for k, v in acked.items():
            self.assertEqual(got.get(k, (None,))[0], v, "acknowledged %r missing on %s" % (k, f.name))
        # and it keeps taking writes
        more = self.write(f, "/after/", 3, size=10)
        self.assertEqual(len(more), 3)

    @logs_on_failure
    def crash_follower_in_install(self, spec):
        c = self.c
        point = spec.split(":")[0]
        ldr = c.leader()
        f = c.followers(ldr)[0]
        c.kill9(f)
        acked = self.write(ldr, "/snap/", self.NPUTS)
        self.arm(f, spec)
        f.spawn()
        self.wait_crashed(f, point)
        self.disarm(f)
        c.restart(f)
        self.assertIn("installed a database snapshot",
                      open(f.log_path, "rb").read().decode("utf-8", "replace"))
        self.check_cluster(f, acked)

    def test_snapshot_receive_middle(self):
        self.crash_follower_in_install("snap.recv.chunk:2")

    def test_snapshot_received_whole(self):
        self.crash_follower_in_install("snap.recv.done:1")

    def test_snapshot_rewritten(self):
        self.crash_follower_in_install("snap.rewritten:1")

    def test_snapshot_log_cleared(self):
        # the clear is in the WAL, the old store still in place: the clear is void
        self.crash_follower_in_install("snap.logcleared:1")

    def test_snapshot_renamed(self):
        self.crash_follower_in_install("install.renamed:1")

    def test_snapshot_installed(self):
        self.crash_follower_in_install("snap.installed:1")

    @logs_on_failure
    def test_leader_copying_snapshot(self):
        c = self.c
        ldr = c.leader()
        f = c.followers(ldr)[0]
        c.kill9(f)
        acked = self.write(ldr, "/snap/", self.NPUTS)
        # every member that may lead dies at its first snapshot copy: restart the two with
        # the point (one of them leads), then the follower that needs the snapshot
        others = [m for m in c.members if m is not f]
        for m in others:
            c.kill9(m)
            self.arm(m, "snap.copied:1")
            m._wait_ports_free()
            m.spawn()
        c.wait_leader(members=others)
        c.restart(f, wait=False)
        poll(lambda: any(not m.alive() for m in others), 30, what="a leader hit snap.copied")
        dead = [m for m in others if not m.alive()]
        self.wait_crashed(dead[0], "snap.copied")
        self.assertTrue([n for n in os.listdir(self.member_dir(dead[0]))
                         if n.startswith("snap.send.")],
                        "the point should leave the leader's copy behind")
        for m in others:  # the other one is still armed: restart it without the point
            self.disarm(m)
            c.restart(m, wait=False)
        c.wait_healthy()
        for m in c.members:
            self.assert_no_temp_files(m)
        self.check_cluster(f, acked)
        self.check_cluster(dead[0], acked)

    def test_follower_commit(self):
        self.follower_crash("commit.before:30")

    def test_follower_wal_synced(self):
        # a follower's append is WAL-only: it dies with entries durable it never acked
        self.follower_crash("wal.synced:30")

    @logs_on_failure
    def follower_crash(self, spec):
        point = spec.split(":")[0]
        c = self.c
        ldr = c.leader()
        f = c.followers(ldr)[0]
        c.kill9(f)
        self.arm(f, spec)
        c.restart(f)
        conn = Conn(ldr)
        acked = {}
        try:
            for i in range(200):
                if not f.alive():
                    break
                k, v = b"/fc/%03d" % i, b"v%d" % i
                conn.kv.Put(rpc.PutRequest(key=k, value=v), timeout=10)
                acked[k] = v
        finally:
            conn.close()
        self.wait_crashed(f, point)
        acked.update(self.write(ldr, "/fc2/", 20, size=10))
        self.disarm(f)
        c.restart(f)
        self.check_cluster(f, acked)


if __name__ == "__main__":
    unittest.main()
