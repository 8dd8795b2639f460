"""Keelson started on a stopped etcd 3.4 member's data dir (member/snap/db + member/wal).

A real etcd (single member) gets a mixed dataset in two runs (puts, deletes, txns, leases with
keys, a lease revoked with its keys, compactions, users and roles with permissions), is stopped
with SIGTERM, and its answers are recorded: every key with its revisions, every revision
from the compacted one up, lease list and each lease's granted TTL and keys, users, roles and
their grants, member list, cluster and member ids, HashKV. Then Keelson starts on a copy of
that data dir with the same flags and must answer the same:
  - in place: the db and WAL as etcd left them; a second start must not import again;
  - with the backend file of the end of the first run and the WAL of both runs: the WAL
    entries the db has not applied are applied by Keelson (as etcd replays them);
  - etcd's own files must be byte-identical after the import;
  - a data dir `etcdctl snapshot restore` wrote, against etcd on an identical one.
Damaged data dirs (a flipped byte in the WAL, a WAL cut short before its last file, a
truncated db) and a data dir an etcd is still running on make Keelson exit non-zero with a
clear message, create nothing, and change none of the files. A 3-member etcd cluster is
taken over member by member the same way.
"""

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # noqa: E402

HAVE_ETCD = os.path.exists(harness.ETCD_BIN) and os.path.exists(harness.ETCDCTL_BIN)


def ok(r):
    if r.rc != 0:
        raise AssertionError("etcdctl %s: rc %d\n%s" % (" ".join(r.argv[1:]), r.rc, r.stderr))
    return r.stdout


def ctl_json(s, *args):
    return json.loads(ok(s.ctl("-w", "json", *args)))


def b64(s):
    return base64.b64encode(s.encode()).decode()


def sparse_copy(src, dst):
    """etcd preallocates 64 MB WAL files: copies keep the zeros as holes."""
    subprocess.run(["cp", "-a", "--sparse=always", src, dst], check=True, timeout=120)


def file_digests(data_dir):
    """sha256 of every file under member/snap and member/wal."""
    out = {}
    for sub in ("snap", "wal"):
        d = os.path.join(data_dir, "member", sub)
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as f:
                out["%s/%s" % (sub, name)] = hashlib.sha256(f.read()).hexdigest()
    return out


def answers(s):
    """Everything compared between etcd before its stop and Keelson after the import."""
    a = {}
    g = ctl_json(s, "get", "", "--prefix")
    rev = g["header"]["revision"]
    a["cluster_id"] = g["header"]["cluster_id"]
    a["member_id"] = g["header"]["member_id"]
    a["revision"] = rev
    a["kvs"] = g.get("kvs", [])
    h = ctl_json(s, "endpoint", "hashkv")[0]["HashKV"]
    a["hashkv"] = (h["hash"], h.get("compact_revision"))
    # Every revision that can still be read: the compacted one up (older ones must fail).
    crev = h.get("compact_revision", 0)
    a["history"] = {}
    for r in range(max(crev, 1), rev + 1):
        res = s.ctl("-w", "json", "get", "", "--prefix", "--rev=%d" % r)
        a["history"][r] = json.loads(res.stdout).get("kvs", []) if res.rc == 0 else res.stderr
    if crev > 1:
        res = s.ctl("get", "", "--prefix", "--rev=%d" % (crev - 1))
        a["below_compacted"] = (res.rc, "required revision has been compacted" in res.stderr)
    leases = ctl_json(s, "lease", "list").get("leases") or []
    a["leases"] = {}
    for l in sorted(x["id"] for x in leases):
        t = ctl_json(s, "lease", "timetolive", "%x" % l, "--keys")
        a["leases"][l] = (t.get("grantedTTL"), sorted(t.get("keys") or []))
    a["users"] = ok(s.ctl("user", "list"))
    a["roles"] = ok(s.ctl("role", "list"))
    for u in a["users"].split():
        a["user " + u] = ok(s.ctl("user", "get", u))
    for r in a["roles"].split():
        a["role " + r] = ok(s.ctl("role", "get", r))
    ms = ctl_json(s, "member", "list")["members"]
    a["members"] = sorted((m["ID"], m.get("name"), m.get("peerURLs"), m.get("clientURLs"))
                          for m in ms)
    st = ctl_json(s, "endpoint", "status")[0]["Status"]
    a["status_ids"] = (st["header"]["cluster_id"], st["header"]["member_id"],
                       st["header"]["revision"])
    return a


def lease_id(out):
    # "lease 694d7b... granted with TTL(600s)"
    return out.split()[1]


@unittest.skipUnless(HAVE_ETCD, "needs the real etcd 3.4 and etcdctl")
class EtcdDataDir(unittest.TestCase):
    """One etcd history, taken over by Keelson in several ways."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="keelson-it-etcddir-")
        etcd = harness.Server(harness.ETCD_BIN, name="m1", label="etcd")
        cls.etcd = etcd
        try:
            etcd.start()
            cls.run1(etcd)
            assert etcd.stop() in (0, -15)  # etcd re-raises SIGTERM after its clean stop
            cls.db_run1 = os.path.join(cls.tmp, "db-run1")
            shutil.copyfile(os.path.join(etcd.data_dir, "member", "snap", "db"), cls.db_run1)
            etcd.start()
            cls.run2(etcd)
            cls.want = answers(etcd)
            assert etcd.stop() in (0, -15)  # etcd re-raises SIGTERM after its clean stop
            cls.etcd_dir = os.path.join(cls.tmp, "etcd-data")
            sparse_copy(etcd.data_dir, cls.etcd_dir)
        finally:
            etcd.cleanup()

    @classmethod
    def tearDownClass(cls):
        if os.environ.get("KEELSON_KEEP_LOGS") != "1":
            shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def run1(cls, s):
        for i in range(1, 6):
            ok(s.ctl("put", "k%d" % i, "v%d" % i))
        ok(s.ctl("put", "k1", "v1b"))
        ok(s.ctl("del", "k2"))
        r = s.ctl("txn", stdin="value(\"k1\") = \"v1b\"\n\nput k6 yes\nput k1 v1c\n\nput k7 no\n\n")
        ok(r)
        l1 = lease_id(ok(s.ctl("lease", "grant", "600")))
        l2 = lease_id(ok(s.ctl("lease", "grant", "900")))
        ok(s.ctl("put", "lk1", "a", "--lease=" + l1))
        ok(s.ctl("put", "lk2", "b", "--lease=" + l1))
        ok(s.ctl("put", "lk3", "c", "--lease=" + l2))
        cls.l2 = l2
        ok(s.ctl("user", "add", "alice:pw-a"))
        ok(s.ctl("role", "add", "r1"))
        ok(s.ctl("role", "grant-permission", "r1", "readwrite", "k1", "k5"))
        ok(s.ctl("user", "grant-role", "alice", "r1"))
        ok(s.ctl("compaction", "4"))
        ok(s.ctl("put", "k3", "v3b"))

    @classmethod
    def run2(cls, s):
        ok(s.ctl("put", "k8", "v8"))
        ok(s.ctl("put", "k3", "v3c"))
        ok(s.ctl("del", "k4"))
        ok(s.ctl("txn", stdin="value(\"k8\") = \"nope\"\n\nput k9 yes\n\nput k9 no\ndel k5\n\n"))
        ok(s.ctl("lease", "revoke", cls.l2))
        l3 = lease_id(ok(s.ctl("lease", "grant", "300")))
        ok(s.ctl("put", "lk4", "d", "--lease=" + l3))
        ok(s.ctl("user", "add", "bob:pw-b"))
        ok(s.ctl("role", "add", "r2"))
        ok(s.ctl("role", "grant-permission", "r2", "read", "p", "--prefix"))
        ok(s.ctl("user", "grant-role", "bob", "r2"))
        ok(s.ctl("compaction", "--physical", "12"))
        ok(s.ctl("put", "k10", "v10"))
        ok(s.ctl("lease", "grant", "120"))

    # -- helpers

    def keelson_on(self, data_dir):
        """A Keelson server with etcd's flags and ports, on data_dir (not started)."""
        k = harness.Server(harness.KEELSON_BIN, name="m1", label="sut")
        k.client_port, k.peer_port = self.etcd.client_port, self.etcd.peer_port
        k.data_dir = data_dir

        def done():
            report = k.sanitizer_report() if os.environ.get(
                "KEELSON_SANITIZER_CHECK") == "1" else ""
            k.cleanup()
            if report:
                raise AssertionError("sanitizer report from server:\n" + report)
        self.addCleanup(done)
        return k

    def copy_dir(self, name):
        d = os.path.join(self.tmp, name)
        sparse_copy(self.etcd_dir, d)
        return d

    def log(self, k):
        with open(k.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def assert_same(self, got):
        want = self.want
        self.assertGreater(want["revision"], 15)
        self.assertTrue(want["users"].split() and want["roles"].split() and want["leases"])
        for key in sorted(set(want) | set(got)):
            self.assertEqual(got.get(key), want.get(key), "answers differ on %s" % key)

    def run_refused(self, data_dir, *needles):
        """Keelson must exit non-zero on data_dir, saying why, changing nothing."""
        before = file_digests(data_dir)
        k = self.keelson_on(data_dir)
        with self.assertRaises(harness.ServerError):
            k.start(timeout=20)
        self.assertFalse(k.alive())
        self.assertNotEqual(k.proc.returncode, 0)
        log = self.log(k)
        for n in needles:
            self.assertIn(n, log)
        self.assertEqual(file_digests(data_dir), before)
        member = os.listdir(os.path.join(data_dir, "member"))
        self.assertNotIn("data.mdb", member)
        self.assertNotIn("import.tmp", member)
        return log

    # -- tests

    def test_in_place(self):
        d = self.copy_dir("in-place")
        before = file_digests(d)
        k = self.keelson_on(d).start()
        log = self.log(k)
        self.assertIn("imported the etcd data dir", log)
        self.assert_same(answers(k))
        self.assertEqual(file_digests(d), before, "etcd's files changed")
        # A second start serves the imported environment and does not import again.
        ok(k.ctl("put", "after", "import"))
        k.restart()
        self.assertNotIn("imported the etcd data dir", self.log(k))
        g = ctl_json(k, "get", "after")
        self.assertEqual(g["kvs"][0]["value"], b64("import"))
        self.assertEqual(g["header"]["revision"], self.want["revision"] + 1)
        self.assertEqual(file_digests(d), before)

    def test_imported_users_log_in(self):
        """etcd's bcrypt password hashes come over as they are and still check."""
        d = self.copy_dir("passwords")
        k = self.keelson_on(d).start()
        ok(k.ctl("user", "add", "root:rootpw"))
        ok(k.ctl("user", "grant-role", "root", "root"))
        ok(k.ctl("auth", "enable"))
        self.assertEqual(ok(k.ctl("--user", "alice:pw-a", "get", "k1", "--print-value-only")),
                         "v1c\n")
        r = k.ctl("--user", "alice:wrong", "get", "k1")
        self.assertNotEqual(r.rc, 0)
        self.assertIn("authentication failed, invalid user ID or password", r.stderr)
        r = k.ctl("--user", "bob:pw-b", "get", "k1")
        self.assertIn("permission denied", r.stderr)
        ok(k.ctl("--user", "root:rootpw", "user", "passwd", "alice", "--interactive=false",
                 stdin="new-a\n"))
        ok(k.ctl("--user", "alice:new-a", "get", "k1"))

    def test_unapplied_wal_entries(self):
        """The backend file of the end of run 1 and the WAL of both runs: the WAL entries
        after the file's consistent index are applied by Keelson, as etcd replays them."""
        d = self.copy_dir("replay")
        shutil.copyfile(self.db_run1, os.path.join(d, "member", "snap", "db"))
        k = self.keelson_on(d).start()
        log = self.log(k)
        line = [l for l in log.splitlines() if "imported the etcd data dir" in l]
        self.assertTrue(line, log)
        n = int(line[0].split("wal-entries-applied=")[1].split()[0])
        self.assertGreater(n, 10, line[0])
        self.assert_same(answers(k))

    def test_corrupt_wal_refused(self):
        d = self.copy_dir("corrupt-wal")
        wal = os.path.join(d, "member", "wal")
        name = sorted(n for n in os.listdir(wal) if n.endswith(".wal"))[0]
        with open(os.path.join(wal, name), "r+b") as f:
            data = f.read(1 << 16)
            end = len(data.rstrip(b"\0"))
            pos = end // 2
            f.seek(pos)
            f.write(bytes([data[pos] ^ 0x5a]))
        self.run_refused(d, "the WAL is refused", name)

    def test_truncated_wal_refused(self):
        """A WAL file cut short with a later file after it: not a torn tail, refused."""
        d = self.copy_dir("truncated-wal")
        wal = os.path.join(d, "member", "wal")
        name = sorted(n for n in os.listdir(wal) if n.endswith(".wal"))[-1]
        path = os.path.join(wal, name)
        with open(path, "rb") as f:
            data = f.read()
        end = len(data.rstrip(b"\0"))
        seq = int(name[:16], 16)
        nxt = os.path.join(wal, "%016x-%016x.wal" % (seq + 1, 1 << 20))
        shutil.copyfile(path, nxt)
        with open(path, "r+b") as f:
            f.truncate(end - 5)
        self.run_refused(d, "the WAL is refused", "runs past the end of the file")

    def test_torn_wal_tail_accepted(self):
        """The last record of the last file half-written (a crash during a write): etcd
        reads up to it, and so does Keelson; the state is the backend file's."""
        d = self.copy_dir("torn-tail")
        wal = os.path.join(d, "member", "wal")
        name = sorted(n for n in os.listdir(wal) if n.endswith(".wal"))[-1]
        path = os.path.join(wal, name)
        with open(path, "rb") as f:
            data = f.read()
        end = len(data.rstrip(b"\0"))
        with open(path, "r+b") as f:
            f.truncate(end - 3)
        k = self.keelson_on(d).start()
        self.assertIn("imported the etcd data dir", self.log(k))
        self.assertEqual(ctl_json(k, "get", "k10")["kvs"][0]["value"], b64("v10"))

    def test_restored_data_dir(self):
        """A data dir `etcdctl snapshot restore` wrote (members only in the WAL and the v2
        store, the backend's members bucket still the origin cluster's): Keelson on one copy
        answers as etcd on another."""
        snap = os.path.join(harness.REPO_ROOT, "storage", "testdata", "etcd34_snapshot.db")
        e = harness.Server(harness.ETCD_BIN, name="r1", label="etcd-restored")
        self.addCleanup(e.cleanup)
        dirs = []
        for name in ("restored-etcd", "restored-keelson"):
            d = os.path.join(self.tmp, name)
            p = subprocess.run([harness.ETCDCTL_BIN, "snapshot", "restore", snap, "--name", "r1",
                                "--data-dir", d, "--initial-cluster", "r1=" + e.peer_url,
                                "--initial-advertise-peer-urls", e.peer_url],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
                               env=harness.clean_env({"ETCDCTL_API": "3"}))
            self.assertEqual(p.returncode, 0, p.stderr)
            dirs.append(d)
        e.data_dir = dirs[0]
        e.start()
        want = answers(e)
        e.stop()
        e._wait_ports_free()
        k = harness.Server(harness.KEELSON_BIN, name="r1", label="sut")
        k.client_port, k.peer_port, k.data_dir = e.client_port, e.peer_port, dirs[1]
        self.addCleanup(k.cleanup)
        k.start()
        got = answers(k)
        self.assertGreater(want["revision"], 100)
        self.assertEqual(len(want["members"]), 1)
        for key in sorted(set(want) | set(got)):
            self.assertEqual(got.get(key), want.get(key), "answers differ on %s" % key)

    def test_dedicated_wal_dir(self):
        """etcd run with --wal-dir: Keelson given the same flag finds the WAL there."""
        d = os.path.join(self.tmp, "waldir")
        os.makedirs(d)
        wal = os.path.join(d, "wal")
        e = harness.Server(harness.ETCD_BIN, name="w1", label="etcd-waldir",
                           extra_args=("--wal-dir", wal))
        e.data_dir = os.path.join(d, "data")
        self.addCleanup(e.cleanup)
        e.start()
        ok(e.ctl("put", "w", "x"))
        ok(e.ctl("put", "w", "y"))
        want = ctl_json(e, "get", "w")
        e.stop()
        e._wait_ports_free()
        self.assertFalse(os.path.exists(os.path.join(e.data_dir, "member", "wal")))
        k = harness.Server(harness.KEELSON_BIN, name="w1", label="sut",
                           extra_args=("--wal-dir", wal))
        k.client_port, k.peer_port, k.data_dir = e.client_port, e.peer_port, e.data_dir
        self.addCleanup(k.cleanup)
        k.start()
        got = ctl_json(k, "get", "w")
        self.assertEqual(got["kvs"], want["kvs"])
        self.assertEqual(got["header"]["member_id"], want["header"]["member_id"])

    def test_running_etcd_refused(self):
        """etcd still running on the data dir (its WAL locked): refused, nothing written."""
        d = self.copy_dir("running")
        e = harness.Server(harness.ETCD_BIN, name="m1", label="etcd-running")
        e.data_dir = d
        self.addCleanup(e.cleanup)
        e.start()
        k = self.keelson_on(d)
        with self.assertRaises(harness.ServerError):
            k.start(timeout=20)
        self.assertNotEqual(k.proc.returncode, 0)
        self.assertIn("holds a lock on its WAL", self.log(k))
        self.assertNotIn("data.mdb", os.listdir(os.path.join(d, "member")))
        self.assertEqual(ctl_json(e, "get", "k10")["kvs"][0]["value"], b64("v10"))

    def test_truncated_db_refused(self):
        d = self.copy_dir("truncated-db")
        db = os.path.join(d, "member", "snap", "db")
        size = os.path.getsize(db)
        with open(db, "r+b") as f:
            f.truncate(size // 2 + 100)
        self.run_refused(d, "the backend file is refused")


if __name__ == "__main__":
    unittest.main()


@unittest.skipUnless(HAVE_ETCD, "needs the real etcd 3.4 and etcdctl")
class EtcdClusterDataDirs(unittest.TestCase):
    """A 3-member etcd cluster, stopped, taken over member by member: each member's data dir
    is imported by a Keelson started with that member's flags, and the Keelson cluster
    serves what etcd served, with each member's ids, then takes writes on every member."""

    def test_three_members(self):
        import cluster  # noqa: E402  (imported here: only this test needs it)
        c = cluster.Cluster(3, binary=harness.ETCD_BIN, label="etcd")
        self.addCleanup(c.cleanup)
        c.start()
        s = c.members[0]
        for i in range(1, 20):
            ok(s.ctl("put", "c%02d" % i, "v%d" % i))
        ok(s.ctl("del", "c03"))
        ok(s.ctl("txn", stdin="value(\"c01\") = \"v1\"\n\nput c01 txn\ndel c05\n\nput c99 no\n\n"))
        lid = lease_id(ok(s.ctl("lease", "grant", "600")))
        ok(s.ctl("put", "cl", "leased", "--lease=" + lid))
        ok(s.ctl("user", "add", "carol:pw-c"))
        ok(s.ctl("role", "add", "rc"))
        ok(s.ctl("role", "grant-permission", "rc", "read", "c", "--prefix"))
        ok(s.ctl("user", "grant-role", "carol", "rc"))
        ok(s.ctl("compaction", "10"))
        ok(c.members[2].ctl("put", "c20", "last"))
        c.wait_converged()
        want = {m.name: answers(m) for m in c.members}
        ids = {m.name: want[m.name]["member_id"] for m in c.members}
        self.assertEqual(len(set(ids.values())), 3)
        for m in c.members:
            self.assertIn(m.stop(), (0, -15))
        # Member by member, with the cluster stopped: the same flags, Keelson's binary.
        for m in c.members:
            m.binary = harness.KEELSON_BIN
            m.label = "sut-" + m.name
            m._wait_ports_free()
            m.spawn()
        c.wait_leader()
        c.wait_healthy()
        for m in c.members:
            with open(m.log_path, "rb") as f:
                self.assertIn(b"imported the etcd data dir", f.read())
            got = answers(m)
            for key in sorted(set(want[m.name]) | set(got)):
                self.assertEqual(got.get(key), want[m.name].get(key),
                                 "%s: answers differ on %s" % (m.name, key))
        # The cluster works on: a write through each member, agreed everywhere.
        for i, m in enumerate(c.members):
            ok(m.ctl("put", "after-%d" % i, m.name))
        c.wait_converged()
        hashes = c.hashkv()
        self.assertEqual(len(set(hashes.values())), 1, hashes)
        for m in c.members:
            g = ctl_json(m, "get", "after-", "--prefix", "--consistency=s")
            self.assertEqual(len(g.get("kvs", [])), 3)
