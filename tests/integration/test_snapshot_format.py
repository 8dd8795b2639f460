"""etcd-format snapshots both ways, against the real etcd 3.4 and etcdctl.

Keelson -> etcd: a store built through storage_batch_* (`etcdfmt_tool gen`) is written as an
etcd snapshot (`etcdfmt_tool write`); the real `etcdctl snapshot status` must agree with it,
`etcdctl snapshot restore` must accept it, and the real etcd started on the restored data dir
must serve every key, value and revision (every revision from the compacted one up, HashKV,
leases) as Keelson's store does.

etcd -> Keelson: a real etcd gets puts, deletes, txns, leases and compactions; its snapshot
(`etcdctl snapshot save`, with the SHA-256 trailer), the same file without the trailer, and the
stopped member's member/snap/db are imported (`etcdfmt_tool import`); every revision must read
back as etcd served it. Damaged files are refused with a message, never a crash.

Needs //storage:etcdfmt_tool built (`bazel build //storage:etcdfmt_tool`; ETCDFMT_TOOL
overrides the path). Skipped only when the real etcd is missing.
"""

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # noqa: E402

TOOL = os.environ.get("ETCDFMT_TOOL") or os.path.join(
    harness.REPO_ROOT, "bazel-bin", "storage", "etcdfmt_tool")
HAVE_ETCD = os.path.exists(harness.ETCD_BIN) and os.path.exists(harness.ETCDCTL_BIN)


def tool(*args, check=True):
    p = subprocess.run([TOOL] + [str(a) for a in args], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError("etcdfmt_tool %s: rc %d\n%s" % (
            " ".join(map(str, args)), p.returncode, p.stderr.decode(errors="replace")))
    return p


def tool_json(*args):
    return json.loads(tool(*args).stdout)


def ctl_offline(*args):
    """etcdctl for commands that need no server (snapshot status/restore)."""
    p = subprocess.run([harness.ETCDCTL_BIN] + [str(a) for a in args], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=120,
                       env=harness.clean_env({"ETCDCTL_API": "3"}))
    return p


def norm_kvs(kvs):
    """kvs as etcdctl -w json and etcdfmt_tool dump show them, zero fields filled in."""
    return [(k["key"], k.get("create_revision", 0), k.get("mod_revision", 0),
             k.get("version", 0), k.get("value", ""), k.get("lease", 0)) for k in kvs or []]


def etcd_get_all(server, rev=0):
    args = ["get", "", "--from-key", "-w", "json"]
    if rev:
        args.append("--rev=%d" % rev)
    r = server.ctl(*args)
    if r.rc != 0:
        return None, r.stderr
    d = json.loads(r.out)
    return d, None


def etcd_hashkv(server, rev=0):
    args = ["endpoint", "hashkv", "-w", "json"]
    if rev:
        args.append("--rev=%d" % rev)
    r = server.ctl(*args)
    assert r.rc == 0, r
    return json.loads(r.out)[0]["HashKV"]


def require_tool(tc):
    if not os.access(TOOL, os.X_OK):
        tc.fail("%s not built: bazel build //storage:etcdfmt_tool (or set ETCDFMT_TOOL)" % TOOL)


@unittest.skipUnless(HAVE_ETCD, "the real etcd (/usr/bin/etcd, etcdctl) is not installed")
class KeelsonSnapshotServedByEtcd(unittest.TestCase):
    """Keelson's writer -> etcdctl snapshot status/restore -> the real etcd serves it."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="keelson-snapfmt-")
        cls.server = None
        if not os.access(TOOL, os.X_OK):
            return
        cls.src = os.path.join(cls.tmp, "src")
        cls.snap = os.path.join(cls.tmp, "snap.db")
        tool("gen", cls.src, 11, 600)
        tool("write", cls.src, cls.snap, "--index", 600, "--term", 3,
             "--member", "8e9e05c52164694d,keelson0,http://127.0.0.1:2380,http://127.0.0.1:2379")
        cls.expect = tool_json("dump", cls.src)

    @classmethod
    def tearDownClass(cls):
        if cls.server:
            cls.server.cleanup()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def setUp(self):
        require_tool(self)

    def test_1_snapshot_status(self):
        p = ctl_offline("snapshot", "status", self.snap, "-w", "json")
        self.assertEqual(p.returncode, 0, p.stderr.decode(errors="replace"))
        st = json.loads(p.stdout)
        mine = tool_json("status", self.snap)
        for f in ("hash", "revision", "totalKey", "totalSize"):
            self.assertEqual(st[f], mine[f], f)
        # The last revision in the file is the store's unless a compaction removed it.
        self.assertLessEqual(st["revision"], self.expect["revision"])
        self.assertGreater(st["revision"], self.expect["compact_revision"])
        self.assertGreater(st["totalKey"], 100)

    def test_2_restore_and_serve(self):
        srv = harness.Server(harness.ETCD_BIN, name="restored", label="etcd-restored")
        type(self).server = srv
        data = os.path.join(srv.tmp, "restored")
        p = ctl_offline("snapshot", "restore", self.snap, "--data-dir", data,
                        "--name", srv.name, "--initial-cluster",
                        "%s=%s" % (srv.name, srv.peer_url),
                        "--initial-advertise-peer-urls", srv.peer_url)
        self.assertEqual(p.returncode, 0, p.stderr.decode(errors="replace"))
        srv.data_dir = data
        srv.start()

        cur, comp = self.expect["revision"], self.expect["compact_revision"]
        d, err = etcd_get_all(srv)
        self.assertIsNone(err)
        self.assertEqual(d["header"]["revision"], cur)
        self.assertEqual(d.get("count", 0), self.expect["count"])
        self.assertEqual(norm_kvs(d.get("kvs")), norm_kvs(self.expect["kvs"]))

        # Every revision from the compacted one up reads the same.
        for rev in range(max(comp, 1), cur + 1):
            d, err = etcd_get_all(srv, rev)
            self.assertIsNone(err, "rev %d" % rev)
            want = tool_json("dump", self.src, rev)
            self.assertEqual(norm_kvs(d.get("kvs")), norm_kvs(want["kvs"]), "rev %d" % rev)
        if comp > 1:
            _, err = etcd_get_all(srv, comp - 1)
            self.assertIn("compacted", err)

        h = etcd_hashkv(srv)
        self.assertEqual(h["hash"], self.expect["hashkv"])
        self.assertEqual(h.get("compact_revision", 0), comp)

        # Leases, with their granted TTLs and the keys they hold.
        r = srv.ctl("lease", "list", "-w", "json")
        self.assertEqual(r.rc, 0, r)
        ids = sorted(l["id"] for l in json.loads(r.out).get("leases") or [])
        self.assertEqual(ids, sorted(l[0] for l in self.expect["leases"]))
        for lid, ttl in self.expect["leases"]:
            r = srv.ctl("lease", "timetolive", "%x" % lid, "--keys", "-w", "json")
            self.assertEqual(r.rc, 0, r)
            t = json.loads(r.out)
            self.assertEqual(t["granted-ttl"], ttl)
            held = sorted(base64.b64decode(k) for k in t.get("keys") or [])
            want = sorted(base64.b64decode(k["key"]) for k in self.expect["kvs"]
                          if k.get("lease") == lid)
            self.assertEqual(held, want)

        # And etcd goes on from there.
        r = srv.ctl("put", "/after/restore", "x", "-w", "json")
        self.assertEqual(r.rc, 0, r)
        self.assertEqual(json.loads(r.out)["header"]["revision"], cur + 1)


@unittest.skipUnless(HAVE_ETCD, "the real etcd (/usr/bin/etcd, etcdctl) is not installed")
class EtcdSnapshotImported(unittest.TestCase):
    """A real etcd's snapshot (and its member/snap/db) -> Keelson's reader -> same answers."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="keelson-snapimp-")
        cls.srv = harness.Server(harness.ETCD_BIN, name="etcd0", label="etcd-src")
        srv = cls.srv.start()

        def ok(*args, stdin=None):
            r = srv.ctl(*args, stdin=stdin)
            assert r.rc == 0, r
            return r

        for i in range(40):
            ok("put", "/k/%d" % (i % 15), "value-%d" % i)
        ok("put", "/big", "B" * 20000)
        ok("put", "/empty", "")
        ok("put", "L" * 700, "long key")
        lease = json.loads(ok("lease", "grant", "1000", "-w", "json").out)["ID"]
        ok("put", "--lease=%x" % lease, "/leased/a", "1")
        ok("put", "--lease=%x" % lease, "/leased/b", "2")
        short = json.loads(ok("lease", "grant", "2000", "-w", "json").out)["ID"]
        ok("put", "--lease=%x" % short, "/leased/c", "3")
        ok("lease", "revoke", "%x" % short)
        ok("del", "/k/1")
        ok("del", "/k/1", "--prefix")
        ok("txn", stdin='value("/k/5") = "value-35"\n\nput /t/1 one\nput /t/2 two\n'
                        'del /k/6\n\nput /t/f fail\n\n')
        ok("compact", "20")
        for i in range(10):
            ok("put", "/k/%d" % i, "second-%d" % i)
        ok("del", "/k/8")
        ok("compact", "60")
        ok("put", "/last", "x")
        d, _ = etcd_get_all(srv)
        cls.cur = d["header"]["revision"]
        cls.comp = 60
        cls.want = {}
        for rev in range(cls.comp, cls.cur + 1):
            cls.want[rev], err = etcd_get_all(srv, rev)
            assert err is None, err
        cls.hashkv = etcd_hashkv(srv)["hash"]
        cls.lease = lease
        cls.snap = os.path.join(cls.tmp, "etcd.db")
        ok("snapshot", "save", cls.snap)
        srv.stop()
        cls.memberdb = os.path.join(cls.tmp, "member.db")
        shutil.copyfile(os.path.join(srv.data_dir, "member", "snap", "db"), cls.memberdb)
        with open(cls.snap, "rb") as f:
            data = f.read()
        cls.bare = os.path.join(cls.tmp, "bare.db")
        with open(cls.bare, "wb") as f:
            f.write(data[:-32])
        cls.data = data

    @classmethod
    def tearDownClass(cls):
        cls.srv.cleanup()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def setUp(self):
        require_tool(self)

    def check_imported(self, path, *flags):
        dst = tempfile.mkdtemp(prefix="imp-", dir=self.tmp)
        shutil.rmtree(dst)
        info = json.loads(tool("import", path, dst, *flags).stdout)
        self.assertEqual(info["storeRevision"], self.cur)
        self.assertEqual(info["compactRevision"], self.comp)
        for rev in range(self.comp, self.cur + 1):
            got = tool_json("dump", dst, rev)
            self.assertEqual(got["revision"], self.cur)
            self.assertEqual(norm_kvs(got["kvs"]), norm_kvs(self.want[rev].get("kvs")),
                             "rev %d" % rev)
            self.assertEqual(got["count"], self.want[rev].get("count", 0))
        got = tool_json("dump", dst)
        self.assertEqual(got["hashkv"], self.hashkv)
        self.assertEqual(got["compact_revision"], self.comp)
        self.assertEqual([l[0] for l in got["leases"]], [self.lease])
        self.assertEqual(got["leases"][0][1], 1000)
        p = tool("dump", dst, self.comp - 1, check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn(b"compacted", p.stderr)
        return dst

    def test_status_matches_etcdctl(self):
        for path, flags in ((self.snap, ()), (self.memberdb, ("--skip-hash-check",))):
            p = ctl_offline("snapshot", "status", path, "-w", "json")
            self.assertEqual(p.returncode, 0, p.stderr)
            st = json.loads(p.stdout)
            mine = tool_json("status", path, *flags)
            for f in ("hash", "revision", "totalKey", "totalSize"):
                self.assertEqual(st[f], mine[f], "%s %s" % (path, f))

    def test_import_with_trailer(self):
        self.check_imported(self.snap)

    def test_import_without_trailer(self):
        p = tool("import", self.bare, os.path.join(self.tmp, "refused"), check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn(b"SHA-256", p.stderr)
        self.check_imported(self.bare, "--skip-hash-check")

    def test_import_member_db(self):
        self.check_imported(self.memberdb, "--skip-hash-check")

    def test_keelson_rewrite_is_etcd_equivalent(self):
        # etcd -> Keelson -> etcd format: etcdctl sees the same keyspace.
        dst = self.check_imported(self.snap)
        out = os.path.join(self.tmp, "rewritten.db")
        tool("write", dst, out)
        p = ctl_offline("snapshot", "status", out, "-w", "json")
        self.assertEqual(p.returncode, 0, p.stderr)
        st = json.loads(p.stdout)
        orig = json.loads(ctl_offline("snapshot", "status", self.snap, "-w", "json").stdout)
        self.assertEqual(st["revision"], orig["revision"])

    def test_damaged_files_refused(self):
        data = self.data
        cases = {
            "truncated-half": data[:len(data) // 2],
            "truncated-page": data[:4096 * 3],
            "flipped": data[:5000] + bytes([data[5000] ^ 0x10]) + data[5001:],
            "empty": b"",
            "garbage": os.urandom(8192 + 32),
        }
        for name, blob in cases.items():
            path = os.path.join(self.tmp, name + ".db")
            with open(path, "wb") as f:
                f.write(blob)
            p = tool("import", path, os.path.join(self.tmp, "dst-" + name), check=False)
            self.assertEqual(p.returncode, 1, "%s: %r" % (name, p))  # refused, not a crash
            self.assertTrue(p.stderr.strip(), name)
            self.assertFalse(os.path.exists(os.path.join(self.tmp, "dst-" + name)), name)
            p = tool("status", path, "--skip-hash-check", check=False)
            self.assertIn(p.returncode, (0, 1), name)


if __name__ == "__main__":
    unittest.main()


@unittest.skipUnless(HAVE_ETCD, "real etcd/etcdctl not installed")
class EtcdctlSnapshotSaveFromKeelson(unittest.TestCase):
    """`etcdctl snapshot save` against a live Keelson member (Maintenance.Snapshot), then
    the real `etcdctl snapshot status` / `restore` and the real etcd serving the result."""

    def test_save_status_restore(self):
        k = harness.Server(label="keelson-snapshot")
        e = None
        tmp = tempfile.mkdtemp(prefix="keelson-snapsave-")
        try:
            k.start()
            for i in range(40):
                self.assertEqual(k.ctl("put", "key%02d" % i, "value%d" % i).rc, 0)
            self.assertEqual(k.ctl("del", "key05").rc, 0)
            want = json.loads(k.ctl("get", "key", "--prefix", "-w", "json").out)
            snap = os.path.join(tmp, "snap.db")
            r = k.ctl("snapshot", "save", snap)
            self.assertEqual(r.rc, 0, r)
            st = ctl_offline("snapshot", "status", snap, "-w", "json")
            self.assertEqual(st.returncode, 0, st.stderr)
            self.assertEqual(json.loads(st.stdout)["revision"], want["header"]["revision"])
            data = os.path.join(tmp, "restored")
            rr = ctl_offline("snapshot", "restore", snap, "--data-dir", data)
            self.assertEqual(rr.returncode, 0, rr.stderr)
            e = harness.Server(binary=harness.ETCD_BIN, label="etcd-restored")
            e.data_dir = data
            e.start()
            got = json.loads(e.ctl("get", "key", "--prefix", "-w", "json").out)
            self.assertEqual(norm_kvs(got.get("kvs")), norm_kvs(want.get("kvs")))
            self.assertEqual(got["header"]["revision"], want["header"]["revision"])
        finally:
            k.cleanup()
            if e is not None:
                e.cleanup()
            shutil.rmtree(tmp, ignore_errors=True)
