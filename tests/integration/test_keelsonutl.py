"""keelsonutl (tools/keelsonutl): snapshot save/status/restore and scheduled backups.

- save from a live Keelson and from a real etcd: `keelsonutl snapshot status` prints exactly
  what `etcdctl snapshot status` prints for the same file, in every output format;
- restore a Keelson snapshot and a real etcd snapshot into new single-member data dirs, start
  Keelson there, and compare every key, value and revision (every revision from the compacted
  one up), HashKV, leases and their keys with the source; the restored member's cluster and
  member ids are those a real etcd restored by `etcdctl snapshot restore` with the same flags
  reports;
- restore one snapshot into three data dirs with one --initial-cluster: they form a cluster
  that serves the data and takes writes;
- --bump-revision N --mark-compacted: the next write gets old+N+1, old revisions are compacted;
- `backup --once` twice with --retain 1: exactly one backup, `latest` names it;
- truncated and corrupted snapshots are refused with a clear message, leaving no data dir.

Needs `bazel build //server:keelson //tools:keelsonutl` (KEELSONUTL overrides the tool's path).
The etcd parts are skipped when /usr/bin/etcd is missing; the restore tests when KEELSON_BIN
is not Keelson (restore writes Keelson's data dir format).
"""

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
import cluster  # noqa: E402

TOOL = os.environ.get("KEELSONUTL") or os.path.join(
    harness.REPO_ROOT, "bazel-bin", "tools", "keelsonutl")
HAVE_ETCD = os.path.exists(harness.ETCD_BIN) and os.path.exists(harness.ETCDCTL_BIN)
# restore writes Keelson's data dir format: with KEELSON_BIN=/usr/bin/etcd (checking the
# suite itself) only the save, status and backup tests apply
SUT_IS_KEELSON = os.path.basename(harness.KEELSON_BIN) != "etcd"


def ku(*args, check=True, timeout=120):
    p = subprocess.run([TOOL] + [str(a) for a in args], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=timeout, env=harness.clean_env())
    if check and p.returncode != 0:
        raise AssertionError("keelsonutl %s: rc %d\nstdout: %s\nstderr: %s" % (
            " ".join(map(str, args)), p.returncode, p.stdout.decode(errors="replace"),
            p.stderr.decode(errors="replace")))
    return p


def ctl_offline(*args):
    return subprocess.run([harness.ETCDCTL_BIN] + [str(a) for a in args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120,
                          env=harness.clean_env({"ETCDCTL_API": "3"}))


def ok(r):
    assert r.rc == 0, r
    return r


def load_dataset(s):
    """Puts, overwrites, deletes, a txn, leases with keys, a compaction, more writes.
    Returns (lease ids, compact revision)."""
    for i in range(12):
        ok(s.ctl("put", "key/%02d" % i, "value-%d" % i))
    for i in range(0, 12, 3):
        ok(s.ctl("put", "key/%02d" % i, "overwritten-%d" % i))
    ok(s.ctl("del", "key/01"))
    ok(s.ctl("del", "key/04", "key/06"))  # a range delete: key/04 and key/05
    ok(s.ctl("txn", stdin='value("key/00") = "overwritten-0"\n\nput key/txn1 t1\nput key/txn2 t2\n'
             '\nput key/failed x\n\n'))
    leases = []
    for ttl in (3600, 7200):
        r = ok(s.ctl("lease", "grant", str(ttl)))
        leases.append(int(r.stdout.split()[1], 16))
    ok(s.ctl("put", "--lease=%x" % leases[0], "leased/a", "la"))
    ok(s.ctl("put", "--lease=%x" % leases[0], "leased/b", "lb"))
    ok(s.ctl("put", "--lease=%x" % leases[1], "leased/c", "lc"))
    rev = json.loads(ok(s.ctl("get", "key/00", "-w", "json")).stdout)["header"]["revision"]
    compact = rev - 6
    ok(s.ctl("compact", str(compact)))
    ok(s.ctl("put", "after/compact", "1"))
    ok(s.ctl("put", "key/00", "latest"))
    ok(s.ctl("del", "key/txn1"))
    ok(s.ctl("put", "x" * 600, "a long key"))
    return sorted(leases), compact


def read_state(s, compact):
    """Everything a client can read: kvs at every revision from compact up, HashKV, leases
    and their keys, the current revision."""
    head = json.loads(ok(s.ctl("get", "", "--from-key", "-w", "json")).stdout)
    rev = head["header"]["revision"]
    hist = {}
    for r in range(max(compact, 1), rev + 1):
        d = json.loads(ok(s.ctl("get", "", "--from-key", "-w", "json", "--rev=%d" % r)).stdout)
        hist[r] = d.get("kvs", [])
    hk = json.loads(ok(s.ctl("endpoint", "hashkv", "-w", "json", "--rev=%d" % rev)).stdout)
    hk = hk[0]["HashKV"]
    leases = {}
    lst = json.loads(ok(s.ctl("lease", "list", "-w", "json")).stdout)
    for l in lst.get("leases") or []:
        ttl = json.loads(ok(s.ctl("lease", "timetolive", "%x" % l["id"], "--keys", "-w",
                                  "json")).stdout)
        leases[l["id"]] = (ttl.get("grantedTTL"), sorted(ttl.get("keys") or []))
    return {"rev": rev, "kvs": head.get("kvs", []), "hist": hist, "hash": hk.get("hash"),
            "hash_compact": hk.get("compact_revision", 0), "leases": leases}


def ids(s):
    st = json.loads(ok(s.ctl("endpoint", "status", "-w", "json")).stdout)[0]["Status"]
    return st["header"]["cluster_id"], st["header"]["member_id"]


class Base(unittest.TestCase):
    def setUp(self):
        if not os.access(TOOL, os.X_OK):
            self.fail("keelsonutl not built: bazel build //tools:keelsonutl (or set KEELSONUTL)")
        self.tmp = tempfile.mkdtemp(prefix="keelson-it-ku-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def path(self, name):
        return os.path.join(self.tmp, name)

    def source(self, binary):
        """A server with the dataset loaded: (server, leases, compact)."""
        s = harness.fresh_server(self, binary=binary)
        leases, compact = load_dataset(s)
        return s, leases, compact

    def restored_server(self, snapshot, name="restored", extra=()):
        """A Keelson server (not started) whose data dir keelsonutl restored from snapshot."""
        s = harness.Server(harness.KEELSON_BIN, name=name, label="restored")
        self.addCleanup(s.cleanup)
        r = ku("snapshot", "restore", snapshot, "--data-dir", s.data_dir, "--name", name,
               "--initial-cluster", "%s=%s" % (name, s.peer_url),
               "--initial-advertise-peer-urls", s.peer_url, *extra)
        self.assertIn("Snapshot restored into", r.stdout.decode())
        self.assertFalse(os.path.exists(s.data_dir + ".tmp"))
        return s

    def assert_status_like_etcdctl(self, f):
        for w in ("simple", "table", "json", "fields"):
            mine = ku("snapshot", "status", f, "-w", w)
            theirs = ctl_offline("snapshot", "status", f, "-w", w)
            self.assertEqual(theirs.returncode, 0, theirs.stderr)
            self.assertEqual(mine.stdout.decode(), theirs.stdout.decode(), "-w %s" % w)
        self.assertEqual(ku("snapshot", "status", f).stdout,
                         ctl_offline("snapshot", "status", f).stdout)


@unittest.skipUnless(HAVE_ETCD, "needs the real etcd and etcdctl")
class TestSaveStatus(Base):
    def check_save(self, binary):
        s, _, _ = self.source(binary)
        f = self.path("snap.db")
        r = ku("snapshot", "save", f, "--endpoints=" + s.endpoint)
        self.assertEqual(r.stdout.decode(), "Snapshot saved at %s\n" % f)
        self.assertFalse(os.path.exists(f + ".part"))
        self.assertEqual(os.path.getsize(f) % 512, 32)  # the SHA-256 trailer is kept
        self.assert_status_like_etcdctl(f)
        # etcdctl's own save of the same server: both tools agree on it too
        g = self.path("etcdctl.db")
        ok(s.ctl("snapshot", "save", g))
        self.assert_status_like_etcdctl(g)
        with open(f, "rb") as a, open(g, "rb") as b:
            self.assertEqual(a.read(), b.read(), "keelsonutl and etcdctl saved different bytes")

    def test_save_from_keelson(self):
        self.check_save(harness.KEELSON_BIN)

    def test_save_from_etcd(self):
        self.check_save(harness.ETCD_BIN)

    def test_save_errors(self):
        f = self.path("none.db")
        r = ku("snapshot", "save", f, "--endpoints=127.0.0.1:%d" % harness.free_port(),
               "--dial-timeout=300ms", check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("no connection within", r.stderr.decode())
        self.assertFalse(os.path.exists(f) or os.path.exists(f + ".part"))
        r = ku("snapshot", "save", f, "--user=root:x", check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("not supported yet", r.stderr.decode())


@unittest.skipUnless(HAVE_ETCD, "needs the real etcd and etcdctl")
@unittest.skipUnless(SUT_IS_KEELSON, "restore makes Keelson data dirs")
class TestRestore(Base):
    def check_round_trip(self, binary):
        src, leases, compact = self.source(binary)
        want = read_state(src, compact)
        self.assertEqual(sorted(want["leases"]), leases)
        f = self.path("snap.db")
        ku("snapshot", "save", f, "--endpoints=" + src.endpoint)
        src_ids = ids(src)
        src.cleanup()

        dst = self.restored_server(f)
        dst.start()
        got = read_state(dst, compact)
        self.assertEqual(got["rev"], want["rev"])
        self.assertEqual(got["kvs"], want["kvs"])
        for r in want["hist"]:
            self.assertEqual(got["hist"][r], want["hist"][r], "at revision %d" % r)
        self.assertEqual(got["leases"], want["leases"])
        self.assertEqual((got["hash"], got["hash_compact"]), (want["hash"], want["hash_compact"]))
        below = dst.ctl("get", "key/00", "--rev=%d" % (compact - 1))
        self.assertNotEqual(below.rc, 0)
        self.assertIn("compacted", below.stderr)
        # a new cluster: new ids; and writes go on from the snapshot's revision
        self.assertNotEqual(ids(dst), src_ids)
        put = json.loads(ok(dst.ctl("put", "after/restore", "1", "-w", "json")).stdout)
        self.assertEqual(put["header"]["revision"], want["rev"] + 1)
        members = ok(dst.ctl("member", "list")).stdout
        self.assertIn("restored, %s, %s" % (dst.peer_url, dst.client_url), members)
        # the restored member keeps working across restarts, graceful and kill -9
        dst.restart()
        ok(dst.ctl("put", "after/restart", "1"))
        dst.restart(kill=True)
        again = read_state(dst, compact)
        self.assertEqual(again["rev"], want["rev"] + 2)
        self.assertEqual(again["hist"][want["rev"]], want["kvs"])
        return f, dst, ids(dst)

    def test_restore_keelson_snapshot(self):
        self.check_round_trip(harness.KEELSON_BIN)

    def test_restore_etcd_snapshot(self):
        f, dst, kids = self.check_round_trip(harness.ETCD_BIN)
        # The ids are those etcd computes for a member restored with the same flags.
        dst.stop()
        dst._wait_ports_free()
        e = harness.Server(harness.ETCD_BIN, name="restored", label="etcd-restored")
        self.addCleanup(e.cleanup)
        e.client_port, e.peer_port = dst.client_port, dst.peer_port
        r = ctl_offline("snapshot", "restore", f, "--data-dir", e.data_dir, "--name", "restored",
                        "--initial-cluster", "restored=%s" % e.peer_url,
                        "--initial-advertise-peer-urls", e.peer_url)
        self.assertEqual(r.returncode, 0, r.stderr)
        e.start()
        self.assertEqual(ids(e), kids)

    def test_restore_copied_db_without_trailer(self):
        src, _, compact = self.source(harness.KEELSON_BIN)
        f = self.path("snap.db")
        ku("snapshot", "save", f, "--endpoints=" + src.endpoint)
        want = read_state(src, compact)
        bare = self.path("bare.db")
        with open(f, "rb") as a, open(bare, "wb") as b:
            b.write(a.read()[:-32])
        s = harness.Server(harness.KEELSON_BIN, name="bare", label="restored")
        self.addCleanup(s.cleanup)
        args = ["snapshot", "restore", bare, "--data-dir", s.data_dir, "--name", "bare",
                "--initial-cluster", "bare=%s" % s.peer_url,
                "--initial-advertise-peer-urls", s.peer_url]
        r = ku(*args, check=False)
        self.assertNotEqual(r.returncode, 0, "a file without its hash needs --skip-hash-check")
        self.assertFalse(os.path.exists(s.data_dir))
        ku(*(args + ["--skip-hash-check"]))
        s.start()
        self.assertEqual(read_state(s, compact)["kvs"], want["kvs"])

    def test_bump_revision(self):
        src, _, compact = self.source(harness.KEELSON_BIN)
        f = self.path("snap.db")
        ku("snapshot", "save", f, "--endpoints=" + src.endpoint)
        want = read_state(src, compact)
        s = harness.Server(harness.KEELSON_BIN, name="bumped", label="restored")
        self.addCleanup(s.cleanup)
        args = ["snapshot", "restore", f, "--data-dir", s.data_dir, "--name", "bumped",
                "--initial-cluster", "bumped=%s" % s.peer_url,
                "--initial-advertise-peer-urls", s.peer_url, "--bump-revision", "1000"]
        r = ku(*args, check=False)
        self.assertEqual(r.returncode, 2)
        self.assertIn("--mark-compacted required", r.stderr.decode())
        ku(*(args + ["--mark-compacted"]))
        s.start()
        head = json.loads(ok(s.ctl("get", "", "--from-key", "-w", "json")).stdout)
        self.assertEqual(head["header"]["revision"], want["rev"] + 1000)
        self.assertEqual(head["kvs"], want["kvs"])  # values and their revisions unchanged
        old = s.ctl("get", "key/00", "--rev=%d" % want["rev"])
        self.assertIn("compacted", old.stderr)
        put = json.loads(ok(s.ctl("put", "k", "v", "-w", "json")).stdout)
        self.assertEqual(put["header"]["revision"], want["rev"] + 1001)

    def test_refusals(self):
        src, _, _ = self.source(harness.KEELSON_BIN)
        f = self.path("snap.db")
        ku("snapshot", "save", f, "--endpoints=" + src.endpoint)
        with open(f, "rb") as fh:
            data = fh.read()
        cases = {
            "truncated.db": data[:len(data) // 2],
            "trailer-cut.db": data[:-5],
            "corrupt.db": data[:8192] + bytes([data[8192] ^ 0xff]) + data[8193:],
            "empty.db": b"",
        }
        for name, body in cases.items():
            p = self.path(name)
            with open(p, "wb") as fh:
                fh.write(body)
            dd = self.path("dd-" + name)
            r = ku("snapshot", "restore", p, "--data-dir", dd, check=False)
            err = r.stderr.decode()
            self.assertEqual(r.returncode, 1, "%s: %s" % (name, err))
            self.assertTrue(err.startswith("Error: snapshot %s refused: " % p), err)
            self.assertEqual(err.count("\n"), 1, err)
            self.assertFalse(os.path.exists(dd), name)
            self.assertFalse(os.path.exists(dd + ".tmp"), name)
            if name != "trailer-cut.db":  # the pages are whole: status shows them, as etcdctl
                st = ku("snapshot", "status", p, check=False)
                self.assertEqual(st.returncode, 1, name)
        self.assertIn("truncated", ku("snapshot", "restore", self.path("truncated.db"),
                                      "--data-dir", self.path("x"), check=False).stderr.decode())
        # an existing data dir is never touched
        dd = self.path("existing")
        os.makedirs(dd)
        with open(os.path.join(dd, "keep"), "w") as fh:
            fh.write("x")
        r = ku("snapshot", "restore", f, "--data-dir", dd, check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn('data-dir "%s" exists' % dd, r.stderr.decode())
        self.assertEqual(os.listdir(dd), ["keep"])
        r = ku("snapshot", "restore", f, "--data-dir", self.path("n"), "--name", "nobody",
               "--initial-cluster", "somebody=http://127.0.0.1:1", check=False)
        self.assertIn('couldn\'t find local name "nobody"', r.stderr.decode())


@unittest.skipUnless(SUT_IS_KEELSON, "restore makes Keelson data dirs")
class TestThreeMembers(Base):
    def test_restore_three_member_cluster(self):
        src, leases, compact = self.source(harness.KEELSON_BIN)
        want = read_state(src, compact)
        f = self.path("snap.db")
        ku("snapshot", "save", f, "--endpoints=" + src.endpoint)
        src.cleanup()
        c = cluster.Cluster(3, label="ku3", token="restored-3")
        self.addCleanup(c.cleanup)
        for m in c.members:
            ku("snapshot", "restore", f, "--data-dir", m.data_dir, "--name", m.name,
               "--initial-cluster", c.initial_cluster(), "--initial-cluster-token", c.token,
               "--initial-advertise-peer-urls", m.peer_url)
        c.start()
        ldr = c.leader()
        put = json.loads(ok(ldr.ctl("put", "after/restore", "3", "-w", "json")).stdout)
        self.assertEqual(put["header"]["revision"], want["rev"] + 1)
        c.wait_converged()
        for m in c.members:
            got = json.loads(ok(m.ctl("get", "", "--from-key", "-w", "json",
                                      "--consistency=s")).stdout)
            kvs = [kv for kv in got["kvs"] if kv["key"] != "YWZ0ZXIvcmVzdG9yZQ=="]
            self.assertEqual(kvs, want["kvs"], m.name)
            old = json.loads(ok(m.ctl("get", "", "--from-key", "-w", "json", "--consistency=s",
                                      "--rev=%d" % want["rev"])).stdout)
            self.assertEqual(old["kvs"], want["kvs"], m.name)
        self.assertEqual(len(set(c.hashkv(rev=want["rev"]).values())), 1)
        self.assertEqual(list(c.hashkv(rev=want["rev"]).values())[0][0], want["hash"])
        lst = ok(ldr.ctl("member", "list", "-w", "json")).stdout
        self.assertEqual(sorted(m["name"] for m in json.loads(lst)["members"]),
                         ["m1", "m2", "m3"])
        # a member restarts (kill -9) with the restored state plus what came after
        c.restart(c.members[1])
        c.wait_converged()
        got = json.loads(ok(c.members[1].ctl("get", "after/restore", "-w", "json",
                                             "--consistency=s")).stdout)
        self.assertEqual(got["kvs"][0]["mod_revision"], want["rev"] + 1)
        ldr = c.leader()
        lst = json.loads(ok(ldr.ctl("lease", "list", "-w", "json")).stdout)
        self.assertEqual(sorted(l["id"] for l in lst.get("leases") or []), leases)

class TestBackup(Base):
    def test_backup_once_retain(self):
        s = harness.fresh_server(self)
        ok(s.ctl("put", "a", "1"))
        d = self.path("backups")
        r1 = ku("backup", "--endpoints=" + s.endpoint, "--dir", d, "--retain", "1", "--once",
                "--verify")
        line = r1.stdout.decode()
        self.assertEqual(line.count("\n"), 1, line)
        self.assertIn("backup saved", line)
        self.assertIn("verified (restored HashKV", line)
        first = [n for n in os.listdir(d) if n.endswith(".db")]
        self.assertEqual(len(first), 1)
        ok(s.ctl("put", "b", "2"))
        ku("backup", "--endpoints=" + s.endpoint, "--dir", d, "--retain", "1", "--once")
        dbs = sorted(n for n in os.listdir(d) if n.endswith(".db"))
        self.assertEqual(len(dbs), 1, os.listdir(d))
        self.assertNotEqual(dbs, first)
        rev = json.loads(ok(s.ctl("get", "b", "-w", "json")).stdout)["header"]["revision"]
        self.assertTrue(dbs[0].endswith("-rev%d.db" % rev), dbs)
        self.assertEqual(os.readlink(os.path.join(d, "latest")), dbs[0])
        self.assertEqual(sorted(os.listdir(d)), sorted([".backup.lock", "latest", dbs[0]]))
        st = json.loads(ku("snapshot", "status", os.path.join(d, "latest"), "-w", "json").stdout)
        self.assertEqual(st["revision"], rev)

    def test_backup_scheduler_keeps_retained_set(self):
        s = harness.fresh_server(self)
        d = self.path("backups")
        p = subprocess.Popen([TOOL, "backup", "--endpoints=" + s.endpoint, "--dir", d,
                              "--interval", "200ms", "--retain", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=harness.clean_env())
        try:
            deadline = time.monotonic() + 15
            for i in range(4):
                ok(s.ctl("put", "k", str(i)))
                time.sleep(0.25)
            while time.monotonic() < deadline:
                dbs = [n for n in os.listdir(d) if n.endswith(".db")]
                if len(dbs) == 2 and os.readlink(os.path.join(d, "latest")) == max(dbs):
                    break
                time.sleep(0.05)
        finally:
            p.terminate()
            out, err = p.communicate(timeout=10)
        self.assertEqual(p.returncode, 0, err)
        lines = out.decode().splitlines()
        self.assertGreaterEqual(sum("backup saved" in l for l in lines), 3, out)
        self.assertIn("backup scheduler stopped", lines[-1])
        dbs = sorted(n for n in os.listdir(d) if n.endswith(".db"))
        self.assertEqual(len(dbs), 2, os.listdir(d))
        self.assertEqual(os.readlink(os.path.join(d, "latest")), dbs[-1])

    def test_backup_unreachable(self):
        d = self.path("backups")
        r = ku("backup", "--endpoints=127.0.0.1:%d" % harness.free_port(), "--dir", d,
               "--once", "--dial-timeout=300ms", check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("backup FAILED", r.stdout.decode())
        self.assertEqual([n for n in os.listdir(d) if n != ".backup.lock"], [])


if __name__ == "__main__":
    unittest.main()
