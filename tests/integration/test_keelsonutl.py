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
- truncated and corrupted snapshots are refused with a clear message, leaving no data dir;
- --compress: gzip files that status and restore read as the plain ones (a damaged or cut
  gzip is refused); the restored state equals the source's;
- progress lines on a pseudo-terminal for save and restore, nothing on a pipe;
- scheduled runs: --interval with --retain/--max-age/--thin keeps exactly what the rule says;
  --schedule (cron) flag checks and its first wait; --metrics-file and --listen-metrics;
- kill -9 of the server mid-snapshot and of keelsonutl mid-write: no half file under a backup
  name, leftovers removed at the next start, the scheduler goes on;
- TLS with client certificates (made by `openssl`) and auth: save and backup --verify with
  --user/--password, refusals for a wrong password and for missing certificates;
- --bump-revision --mark-compacted: a watcher resuming past the snapshot is told "compacted"
  and new events have higher revisions than any it saw;
- a compressed snapshot of a larger dataset (two compactions, large values, a revoked lease)
  restored into a new 3-member cluster: every key, value, revision, HashKV and lease compared
  on every member; a snapshot saved by `etcdctl snapshot save` from Keelson restores too.
- alarms: a snapshot taken while NOSPACE is raised (from Keelson and from etcd) restores with
  the alarm raised and writes refused, by keelsonutl into Keelson and by etcdctl into etcd, as
  etcd 3.4 does.
Cron parsing, retention decisions and the backup directory are unit-tested in C
(//backup:schedule_test, //backup:dir_test); the server's own scheduled backups in
test_server_backup.py.

Needs `bazel build //server:keelson //tools:keelsonutl` (KEELSONUTL overrides the tool's path).
The etcd parts are skipped when /usr/bin/etcd is missing; the restore tests when KEELSON_BIN
is not Keelson (restore writes Keelson's data dir format).
"""

import calendar
import gzip
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.request

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


def load_more(s):
    """On top of load_dataset: more keys, large values, overwrites, a range delete, a lease
    revoked, and a second compaction. Returns the new compact revision."""
    for i in range(40):
        ok(s.ctl("put", "more/%03d" % i, "v%d" % i))
    for i in range(4):
        ok(s.ctl("put", "large/%d" % i, stdin=os.urandom(150 * 1000).hex().encode()))
    ok(s.ctl("del", "more/010", "more/020"))
    r = ok(s.ctl("lease", "grant", "600"))
    lid = int(r.stdout.split()[1], 16)
    ok(s.ctl("put", "--lease=%x" % lid, "more/leased", "x"))
    ok(s.ctl("lease", "revoke", "%x" % lid))
    rev = json.loads(ok(s.ctl("get", "more/000", "-w", "json")).stdout)["header"]["revision"]
    ok(s.ctl("compact", str(rev - 3)))
    ok(s.ctl("put", "more/000", "after-second-compaction"))
    return rev - 3


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
        r = ku("snapshot", "save", f, "--user=root", check=False)
        self.assertEqual(r.returncode, 2)
        self.assertIn("--user needs a password", r.stderr.decode())
        r = ku("snapshot", "save", f, "--password=x", check=False)
        self.assertEqual(r.returncode, 2)
        self.assertIn("--password needs --user", r.stderr.decode())


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

    @unittest.skipUnless(SUT_IS_KEELSON, "the source must be Keelson")
    def test_restore_etcdctl_saved_snapshot(self):
        """`etcdctl snapshot save` against Keelson, restored by keelsonutl."""
        src, leases, compact = self.source(harness.KEELSON_BIN)
        want = read_state(src, compact)
        f = self.path("etcdctl.db")
        ok(src.ctl("snapshot", "save", f))
        src.cleanup()
        dst = self.restored_server(f)
        dst.start()
        self.assertEqual(read_state(dst, compact), want)

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
        src, leases, _ = self.source(harness.KEELSON_BIN)
        compact = load_more(src)
        want = read_state(src, compact)
        f = self.path("snap.db.gz")
        ku("snapshot", "save", f, "--compress", "--endpoints=" + src.endpoint)
        src.cleanup()
        c = cluster.Cluster(3, label="ku3", token="restored-3")
        self.addCleanup(c.cleanup)
        for m in c.members:
            ku("snapshot", "restore", f, "--data-dir", m.data_dir, "--name", m.name,
               "--initial-cluster", c.initial_cluster(), "--initial-cluster-token", c.token,
               "--initial-advertise-peer-urls", m.peer_url)
        c.start()
        c.wait_converged()
        # every key, value and revision (each revision from the compacted one up), HashKV,
        # leases with their TTLs and keys, asked of every member
        for m in c.members:
            got = read_state(m, compact)
            self.assertEqual(got, want, m.name)
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


def big_dataset(s, mb=24):
    """mb MB of incompressible values in 1 MB puts (a snapshot that takes a while)."""
    for i in range(mb):
        ok(s.ctl("put", "big/%03d" % i, stdin=os.urandom(500 * 1000).hex().encode()))


def wait_for(cond, timeout, what, step=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise AssertionError("timed out waiting for " + what)


def backups_in(d):
    return sorted(n for n in os.listdir(d) if re.match(r"^\d{8}T\d{6}\.\d{3}Z-rev\d+\.db(\.gz)?$", n))


class TestCompress(Base):
    @unittest.skipUnless(SUT_IS_KEELSON, "restore makes Keelson data dirs")
    def test_compressed_round_trip(self):
        src, leases, compact = self.source(harness.KEELSON_BIN)
        want = read_state(src, compact)
        f = self.path("snap.db.gz")
        r = ku("snapshot", "save", f, "--compress", "--endpoints=" + src.endpoint)
        self.assertEqual(r.stderr, b"")  # no progress when stderr is not a terminal
        with open(f, "rb") as fh:
            self.assertEqual(fh.read(2), b"\x1f\x8b")
        self.assertFalse(os.path.exists(f + ".part") or os.path.exists(f + ".gz.part"))
        plain = self.path("plain.db")
        with gzip.open(f, "rb") as zin, open(plain, "wb") as out:
            shutil.copyfileobj(zin, out)
        # status reads the .gz as it reads the plain file, and as etcdctl reads the plain one
        for w in ("simple", "json"):
            self.assertEqual(ku("snapshot", "status", f, "-w", w).stdout,
                             ku("snapshot", "status", plain, "-w", w).stdout)
            if HAVE_ETCD:
                self.assertEqual(ku("snapshot", "status", f, "-w", w).stdout,
                                 ctl_offline("snapshot", "status", plain, "-w", w).stdout)
        src.cleanup()
        dst = self.restored_server(f)
        dst.start()
        got = read_state(dst, compact)
        self.assertEqual(got, want)
        # damaged and cut-off gzip files are refused with a clear message, nothing left
        data = open(f, "rb").read()
        for name, bad in (("cut.db.gz", data[:len(data) // 2]),
                          ("flipped.db.gz", data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xff])
                           + data[len(data) // 2 + 1:])):
            bf = self.path(name)
            with open(bf, "wb") as fh:
                fh.write(bad)
            dd = self.path("dd-" + name)
            r = ku("snapshot", "restore", bf, "--data-dir", dd, check=False)
            self.assertEqual(r.returncode, 1, r.stderr)
            self.assertRegex(r.stderr.decode(), "gzip|SHA-256|refused")
            self.assertFalse(os.path.exists(dd) or os.path.exists(dd + ".tmp"))
            r = ku("snapshot", "status", bf, check=False)
            self.assertEqual(r.returncode, 1)
            self.assertTrue(r.stderr.decode().startswith("Error: "), r.stderr)
        self.assertEqual([n for n in os.listdir(tempfile.gettempdir())
                          if n.startswith("keelsonutl-gunzip-")], [])

    def run_on_pty(self, *args):
        """Runs keelsonutl with stderr on a pseudo-terminal; returns (rc, what it drew)."""
        master, slave = pty.openpty()
        p = subprocess.Popen([TOOL] + list(args), stdout=subprocess.PIPE, stderr=slave,
                             env=harness.clean_env())
        os.close(slave)
        out = b""
        while True:
            r, _, _ = select.select([master], [], [], 60)
            if not r:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        p.communicate(timeout=60)
        os.close(master)
        return p.returncode, out.decode(errors="replace")

    def test_progress_on_a_terminal(self):
        s = harness.fresh_server(self)
        big_dataset(s, mb=4)
        f = self.path("snap.db")
        rc, text = self.run_on_pty("snapshot", "save", f, "--endpoints=" + s.endpoint)
        self.assertEqual(rc, 0, text)
        self.assertIn("receiving snapshot: ", text)
        self.assertIn("100%", text)
        self.assertRegex(text, r"\d B/s|[kMG]B/s")
        self.assertIn("\r", text)
        # not on a terminal: nothing
        r = ku("snapshot", "save", self.path("quiet.db"), "--endpoints=" + s.endpoint)
        self.assertEqual(r.stderr, b"")
        if SUT_IS_KEELSON:
            gz = self.path("snap.db.gz")
            ku("snapshot", "save", gz, "--compress", "--endpoints=" + s.endpoint)
            rc, text = self.run_on_pty("snapshot", "restore", gz, "--data-dir", self.path("r"))
            self.assertEqual(rc, 0, text)
            self.assertIn("decompressing: ", text)
            self.assertRegex(text, r"restoring \(written to the new data dir\): [\d.]+ [kM]B")
            r = ku("snapshot", "restore", gz, "--data-dir", self.path("r2"))
            self.assertEqual(r.stderr, b"")


class TestBackupMore(Base):
    def test_compress_metrics_latest(self):
        s = harness.fresh_server(self)
        ok(s.ctl("put", "a", "1"))
        d = self.path("backups")
        m = self.path("backup.prom")
        r = ku("backup", "--endpoints=" + s.endpoint, "--dir", d, "--once", "--compress",
               "--verify", "--metrics-file", m)
        self.assertIn("verified (restored HashKV", r.stdout.decode())
        self.assertIn("compressed", r.stdout.decode())
        dbs = backups_in(d)
        self.assertEqual(len(dbs), 1, os.listdir(d))
        self.assertTrue(dbs[0].endswith(".db.gz"))
        self.assertEqual(os.readlink(os.path.join(d, "latest")), dbs[0])
        st = json.loads(ku("snapshot", "status", os.path.join(d, "latest"), "-w", "json").stdout)
        rev = json.loads(ok(s.ctl("get", "a", "-w", "json")).stdout)["header"]["revision"]
        self.assertEqual(st["revision"], rev)
        metrics = dict(l.split() for l in open(m).read().splitlines() if not l.startswith("#"))
        self.assertGreater(float(metrics["keelson_backup_last_success_timestamp_seconds"]),
                           time.time() - 60)
        self.assertEqual(int(metrics["keelson_backup_last_size_bytes"]),
                         os.path.getsize(os.path.join(d, dbs[0])))
        self.assertEqual(int(metrics["keelson_backup_last_revision"]), rev)
        self.assertEqual(metrics["keelson_backup_failures_total"], "0")
        self.assertEqual(metrics["keelson_backup_last_success"], "1")
        self.assertGreater(float(metrics["keelson_backup_last_duration_seconds"]), 0)
        self.assertFalse(os.path.exists(m + ".tmp"))
        # a failed run says so in the metrics
        r = ku("backup", "--endpoints=127.0.0.1:%d" % harness.free_port(), "--dir", d,
               "--once", "--dial-timeout=300ms", "--metrics-file", m, check=False)
        self.assertEqual(r.returncode, 1)
        metrics = dict(l.split() for l in open(m).read().splitlines() if not l.startswith("#"))
        self.assertEqual(metrics["keelson_backup_failures_total"], "1")
        self.assertEqual(metrics["keelson_backup_last_success"], "0")
        self.assertEqual(backups_in(d), dbs)

    def test_listen_metrics(self):
        s = harness.fresh_server(self)
        d = self.path("backups")
        port = harness.free_port()
        r = ku("backup", "--dir", d, "--once", "--listen-metrics", "nohost:1", check=False)
        self.assertEqual(r.returncode, 2, r.stderr)
        p = subprocess.Popen([TOOL, "backup", "--endpoints=" + s.endpoint, "--dir", d,
                              "--interval", "200ms", "--retain", "2",
                              "--listen-metrics", "127.0.0.1:%d" % port],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=harness.clean_env())
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no env proxy
        try:
            def scrape():
                try:
                    with direct.open("http://127.0.0.1:%d/metrics" % port,
                                                timeout=5) as resp:
                        text = resp.read().decode()
                        self.assertIn("text/plain", resp.headers["Content-Type"])
                except OSError:
                    return None
                m = dict(l.split() for l in text.splitlines() if not l.startswith("#"))
                return m if int(m["keelson_backup_successes_total"]) >= 2 else None
            m = wait_for(scrape, 20, "two backups in the served metrics", step=0.05)
            self.assertEqual(m["keelson_backup_failures_total"], "0")
            self.assertEqual(m["keelson_backup_last_success"], "1")
            self.assertGreater(float(m["keelson_backup_last_success_timestamp_seconds"]),
                               time.time() - 60)
            with self.assertRaises(urllib.error.HTTPError) as cm:
                direct.open("http://127.0.0.1:%d/" % port, timeout=5)
            self.assertEqual(cm.exception.code, 404)
        finally:
            p.terminate()
            out, err = p.communicate(timeout=10)
        self.assertEqual(p.returncode, 0, err)

    def test_schedule_flags(self):
        d = self.path("backups")
        for bad, msg in ((["--schedule", "61 * * * *"], "field 1 (minute)"),
                         (["--schedule", "* * *"], "5 fields"),
                         (["--schedule", "0 0 30 feb *"], "never matches"),
                         (["--schedule", "* * * * *", "--interval", "1m"], "exclusive"),
                         (["--utc"], "--schedule only"),
                         (["--max-age", "soon"], "invalid --max-age"),
                         (["--retain", "-1"], "invalid --retain")):
            r = ku("backup", "--dir", d, *bad, check=False)
            self.assertEqual(r.returncode, 2, (bad, r.stderr))
            self.assertIn(msg, r.stderr.decode(), bad)
        # a valid schedule waits for its first minute (and stops at once on SIGTERM)
        p = subprocess.Popen([TOOL, "backup", "--endpoints=127.0.0.1:1", "--dir", d,
                              "--schedule", "*/5 * * * mon-fri,sun", "--utc"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=harness.clean_env())
        try:
            line1 = p.stdout.readline().decode()
            line2 = p.stdout.readline().decode()
        finally:
            p.terminate()
            out, err = p.communicate(timeout=10)
        self.assertIn('on "*/5 * * * mon-fri,sun" (UTC)', line1)
        m = re.search(r"next backup at \d{4}-\d\d-\d\dT\d\d:(\d\d):00Z", line2)
        self.assertTrue(m, line2)
        self.assertEqual(int(m.group(1)) % 5, 0)
        self.assertEqual(p.returncode, 0, err)
        self.assertEqual(backups_in(d), [])

    def test_scheduled_run_with_age_and_count_retention(self):
        """A short-interval run with --retain and --max-age keeps exactly the set the rule
        says: the newest N, none older than the age, never none."""
        s = harness.fresh_server(self)
        d = self.path("backups")
        p = subprocess.Popen([TOOL, "backup", "--endpoints=" + s.endpoint, "--dir", d,
                              "--interval", "150ms", "--retain", "3", "--max-age", "1s",
                              "--thin", "--compress"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=harness.clean_env())
        try:
            for i in range(10):
                ok(s.ctl("put", "k", str(i)))
            wait_for(lambda: len(backups_in(d)) >= 3, 20, "three backups")
            # stop writes and let the age limit work: the set shrinks to what is < 1s old
            time.sleep(1.2)
            wait_for(lambda: len(backups_in(d)) >= 1, 5, "backups")
        finally:
            p.terminate()
            out, err = p.communicate(timeout=10)
        self.assertEqual(p.returncode, 0, err)
        dbs = backups_in(d)
        self.assertTrue(1 <= len(dbs) <= 3, dbs)
        # every kept one is whole and the newest is what latest names
        self.assertEqual(os.readlink(os.path.join(d, "latest")), dbs[-1])
        for n in dbs:
            ku("snapshot", "status", os.path.join(d, n))
        # the age rule: at the last backup, none older than 1s stayed (names carry the time)
        def ms(n):
            t = time.strptime(n[:15], "%Y%m%dT%H%M%S")
            return (calendar.timegm(t) * 1000) + int(n[16:19])
        self.assertLessEqual(ms(dbs[-1]) - ms(dbs[0]), 1000 + 500, dbs)
        lines = out.decode().splitlines()
        self.assertGreaterEqual(sum("backup saved" in l for l in lines), 5, out)
        self.assertTrue(all("backup FAILED" not in l for l in lines), out)

    def test_server_killed_mid_snapshot(self):
        s = harness.fresh_server(self)
        big_dataset(s)
        d = self.path("backups")
        log = self.path("backup.log")
        with open(log, "wb") as lf:
            p = subprocess.Popen([TOOL, "backup", "--endpoints=" + s.endpoint, "--dir", d,
                                  "--interval", "100ms", "--retain", "3",
                                  "--dial-timeout=500ms"],
                                 stdout=lf, stderr=subprocess.STDOUT, env=harness.clean_env())
        try:
            def part_growing():
                for n in os.listdir(d) if os.path.isdir(d) else []:
                    if n.endswith(".snapshot.part"):
                        try:
                            return os.path.getsize(os.path.join(d, n)) > 0
                        except OSError:
                            pass
                return False
            wait_for(part_growing, 30, "a snapshot being received")
            s.kill9()
            wait_for(lambda: "backup FAILED" in open(log).read(), 30, "a failed backup")
            # nothing that looks like a backup is half: every backup name is a whole file
            for n in backups_in(d):
                ku("snapshot", "status", os.path.join(d, n))
            before = len([l for l in open(log).read().splitlines() if "backup saved" in l])
            s.start()
            wait_for(lambda: len([l for l in open(log).read().splitlines()
                                  if "backup saved" in l]) > before, 60,
                     "a backup after the restart", step=0.05)
        finally:
            p.terminate()
            p.wait(timeout=30)
        self.assertEqual(p.returncode, 0, open(log).read())
        dbs = backups_in(d)
        self.assertTrue(1 <= len(dbs) <= 3, dbs)
        for n in dbs:
            ku("snapshot", "status", os.path.join(d, n))
        self.assertEqual(os.readlink(os.path.join(d, "latest")), dbs[-1])

    def test_tool_killed_mid_write(self):
        s = harness.fresh_server(self)
        big_dataset(s)
        d = self.path("backups")
        os.mkdir(d)
        p = subprocess.Popen([TOOL, "backup", "--endpoints=" + s.endpoint, "--dir", d, "--once",
                              "--compress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=harness.clean_env())
        try:
            wait_for(lambda: any(n.endswith(".part") for n in os.listdir(d)), 30,
                     "a backup being written")
        finally:
            p.kill()
            p.communicate(timeout=10)
        self.assertEqual(p.returncode, -signal.SIGKILL)
        left = os.listdir(d)
        self.assertEqual(backups_in(d), [], left)  # no half file under a backup's name
        self.assertFalse(os.path.exists(os.path.join(d, "latest")))
        self.assertTrue(any(n.endswith(".part") for n in left), left)
        # the next run removes the leftovers and makes one whole backup
        r = ku("backup", "--endpoints=" + s.endpoint, "--dir", d, "--once", "--compress")
        self.assertIn("backup saved", r.stdout.decode())
        dbs = backups_in(d)
        self.assertEqual(len(dbs), 1)
        self.assertEqual(sorted(os.listdir(d)), sorted([".backup.lock", "latest", dbs[0]]))
        ku("snapshot", "status", os.path.join(d, dbs[0]))


class TLSServer(harness.Server):
    """A Keelson serving clients over TLS with client certificates required."""

    def __init__(self, certs, **kw):
        self.certs = certs
        super().__init__(**kw)
        self.extra_args += ["--cert-file", certs["server.crt"], "--key-file", certs["server.key"],
                            "--trusted-ca-file", certs["ca.crt"], "--client-cert-auth"]

    @property
    def client_url(self):
        return "https://127.0.0.1:%d" % self.client_port

    def tls_flags(self):
        return ["--cacert", self.certs["ca.crt"], "--cert", self.certs["client.crt"],
                "--key", self.certs["client.key"]]

    def ctl(self, *args, **kw):
        return harness.etcdctl(self.client_url, *(self.tls_flags() + list(args)), **kw)

    def wait_healthy(self, timeout=harness.START_TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise harness.ServerError("exited during start-up\n" + self.log_tail())
            if self.ctl("--dial-timeout=1s", "endpoint", "health", timeout=10).rc == 0:
                return
            if time.monotonic() > deadline:
                raise harness.ServerTimeout("not healthy\n" + self.log_tail())
            time.sleep(0.05)


def make_certs(d):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, by openssl."""
    def run(*args):
        subprocess.run(["openssl"] + list(args), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, cwd=d)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=keelson-test-ca")
    with open(os.path.join(d, "san.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", name + ".key", "-out", name + ".csr",
            "-subj", "/CN=" + ("127.0.0.1" if name == "server" else "root"))
        run("x509", "-req", "-in", name + ".csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", name + ".crt", "-days", "2", "-extfile", "san.ext")
    return {n: os.path.join(d, n) for n in ("ca.crt", "server.crt", "server.key", "client.crt",
                                             "client.key")}


@unittest.skipUnless(shutil.which("openssl"), "needs the openssl command")
class TestAuthTLS(Base):
    def test_save_and_backup_with_tls_and_auth(self):
        certs = make_certs(self.tmp)
        s = TLSServer(certs, label="tls")
        self.addCleanup(s.cleanup)
        s.start()
        ok(s.ctl("user", "add", "root:rootpw"))
        ok(s.ctl("user", "add", "alice:alicepw"))
        ok(s.ctl("auth", "enable"))
        ok(s.ctl("--user=root:rootpw", "put", "secret", "s3cr3t"))
        rev = json.loads(ok(s.ctl("--user=root:rootpw", "get", "secret", "-w", "json")).stdout)[
            "header"]["revision"]
        ep = "--endpoints=" + s.client_url
        f = self.path("snap.db")
        ku("snapshot", "save", f, ep, *s.tls_flags(), "--user", "root", "--password", "rootpw")
        st = json.loads(ku("snapshot", "status", f, "-w", "json").stdout)
        self.assertEqual(st["revision"], rev)
        # --user NAME:PASSWORD, etcdctl's form, and https:// in the endpoint
        ku("snapshot", "save", self.path("snap2.db"), ep, *s.tls_flags(), "--user=root:rootpw")
        # a wrong password is the server's authentication error; no file is left
        r = ku("snapshot", "save", self.path("bad.db"), ep, *s.tls_flags(),
               "--user=root:wrong", check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("authentication failed", r.stderr.decode())
        self.assertFalse(os.path.exists(self.path("bad.db")) or
                         os.path.exists(self.path("bad.db.part")))
        # without the CA (or the client certificate) the TLS handshake fails
        r = ku("snapshot", "save", self.path("bad.db"), ep, "--user=root:rootpw",
               "--dial-timeout=1s", check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("no connection within", r.stderr.decode())
        r = ku("snapshot", "save", self.path("bad.db"), ep, "--cacert", certs["ca.crt"],
               "--user=root:rootpw", "--dial-timeout=1s", check=False)
        self.assertEqual(r.returncode, 1)
        # a plain-text client cannot talk to it either
        r = ku("snapshot", "save", self.path("bad.db"), "--endpoints=127.0.0.1:%d" % s.client_port,
               "--user=root:rootpw", "--dial-timeout=1s", check=False)
        self.assertEqual(r.returncode, 1)
        # backup --verify: HashKV goes out with the token as well
        d = self.path("backups")
        r = ku("backup", ep, *s.tls_flags(), "--user=root:rootpw", "--dir", d, "--once",
               "--verify", "--compress")
        self.assertIn("verified (restored HashKV", r.stdout.decode())
        self.assertEqual(len(backups_in(d)), 1)


@unittest.skipUnless(HAVE_ETCD and SUT_IS_KEELSON, "needs the real etcd; restore makes Keelson data dirs")
@unittest.skipUnless(HAVE_ETCD and SUT_IS_KEELSON, "needs the real etcd and Keelson's restore")
class TestAlarmsRestored(Base):
    """etcd's snapshot keeps its alarm bucket, and a member etcd 3.4 restored from it starts
    with those alarms raised (a NOSPACE one refuses writes until disarmed). Keelson's
    snapshot carries its alarms the same way and keelsonutl restore keeps them: checked both
    ways against etcd, with a snapshot taken while NOSPACE is raised."""

    def nospace_snapshot(self, binary):
        src = harness.fresh_server(self, binary=binary,
                                   extra_args=["--quota-backend-bytes=1048576"])
        value = os.urandom(30 * 1000).hex().encode()
        for i in range(200):
            r = src.ctl("put", "fill/%03d" % i, stdin=value)
            if r.rc != 0:
                self.assertIn("database space exceeded", r.stderr, r)
                break
        else:
            self.fail("no NOSPACE after 200 puts of 60 kB")
        alarms = ok(src.ctl("alarm", "list")).stdout
        self.assertIn("alarm:NOSPACE", alarms)
        f = self.path("nospace-%s.db" % os.path.basename(binary))
        ku("snapshot", "save", f, "--endpoints=" + src.endpoint)
        src.stop()
        return f, alarms

    def assert_nospace(self, s, alarms):
        self.assertEqual(ok(s.ctl("alarm", "list")).stdout, alarms)
        r = s.ctl("put", "new", "x")
        self.assertNotEqual(r.rc, 0)
        self.assertIn("database space exceeded", r.stderr)

    def test_keelson_snapshot(self):
        f, alarms = self.nospace_snapshot(harness.KEELSON_BIN)
        # restored by keelsonutl into Keelson: raised, writes refused, disarm clears it
        k = self.restored_server(f)
        k.start()
        self.assert_nospace(k, alarms)
        ok(k.ctl("alarm", "disarm"))
        self.assertEqual(ok(k.ctl("alarm", "list")).stdout, "")
        ok(k.ctl("put", "new", "x"))
        k.restart()
        self.assertEqual(ok(k.ctl("alarm", "list")).stdout, "")
        # restored by etcdctl into etcd: the same
        e = harness.Server(harness.ETCD_BIN, name="er", label="etcd-restored")
        self.addCleanup(e.cleanup)
        r = ctl_offline("snapshot", "restore", f, "--data-dir", e.data_dir, "--name", "er",
                        "--initial-cluster", "er=%s" % e.peer_url,
                        "--initial-advertise-peer-urls", e.peer_url)
        self.assertEqual(r.returncode, 0, r.stderr)
        e.start()
        self.assert_nospace(e, alarms)

    def test_etcd_snapshot(self):
        f, alarms = self.nospace_snapshot(harness.ETCD_BIN)
        k = self.restored_server(f)
        k.start()
        self.assert_nospace(k, alarms)


class TestAuthRestored(Base):
    """Users, roles, permissions and the auth switch survive save + restore, from Keelson
    (PBKDF2 hashes) and from etcd (bcrypt hashes), and log in on the restored member."""

    def check(self, binary):
        src = harness.fresh_server(self, binary=binary)
        ok(src.ctl("put", "app/x", "1"))
        ok(src.ctl("user", "add", "root:rootpw"))
        ok(src.ctl("user", "grant-role", "root", "root"))
        ok(src.ctl("role", "add", "app"))
        ok(src.ctl("role", "grant-permission", "app", "read", "app/", "--prefix=true"))
        ok(src.ctl("user", "add", "alice:alicepw"))
        ok(src.ctl("user", "grant-role", "alice", "app"))
        ok(src.ctl("auth", "enable"))
        want_users = ok(src.ctl("--user=root:rootpw", "user", "list")).stdout
        want_role = ok(src.ctl("--user=root:rootpw", "role", "get", "app")).stdout
        f = self.path("snap.db")
        ku("snapshot", "save", f, "--endpoints=" + src.endpoint, "--user=root:rootpw")
        s = self.restored_server(f)
        s.health_args = ["--user=root:rootpw"]  # auth is on from the first start
        s.start()
        self.assertEqual(ok(s.ctl("--user=root:rootpw", "user", "list")).stdout, want_users)
        self.assertEqual(ok(s.ctl("--user=root:rootpw", "role", "get", "app")).stdout, want_role)
        self.assertEqual(ok(s.ctl("--user=alice:alicepw", "get", "app/x", "--print-value-only")).stdout,
                         "1\n")
        r = s.ctl("--user=alice:alicepw", "put", "app/x", "2")
        self.assertIn("permission denied", r.stderr)
        r = s.ctl("get", "app/x")  # auth stayed enabled: no user, no answer
        self.assertNotEqual(r.rc, 0)
        r = s.ctl("--user=alice:wrong", "get", "app/x")
        self.assertIn("authentication failed", r.stderr)

    def test_from_keelson(self):
        self.check(harness.KEELSON_BIN)

    def test_from_etcd(self):
        self.check(harness.ETCD_BIN)

    def test_keelson_users_on_etcd(self):
        """The other way: Keelson hashes new passwords with bcrypt as etcd does, so a Keelson
        snapshot restored by `etcdctl snapshot restore` lets its users log in on etcd."""
        src = harness.fresh_server(self)
        ok(src.ctl("user", "add", "root:rootpw"))
        ok(src.ctl("user", "grant-role", "root", "root"))
        ok(src.ctl("user", "add", "alice:alicepw"))
        ok(src.ctl("put", "k", "v"))
        ok(src.ctl("auth", "enable"))
        f = self.path("snap.db")
        ku("snapshot", "save", f, "--endpoints=" + src.endpoint, "--user=root:rootpw")
        e = harness.Server(harness.ETCD_BIN, name="restored", label="etcd-restored")
        self.addCleanup(e.cleanup)
        r = ctl_offline("snapshot", "restore", f, "--data-dir", e.data_dir, "--name", "restored",
                        "--initial-cluster", "restored=%s" % e.peer_url,
                        "--initial-advertise-peer-urls", e.peer_url)
        self.assertEqual(r.returncode, 0, r.stderr)
        e.health_args = ["--user=root:rootpw"]
        e.start()
        self.assertEqual(ok(e.ctl("--user=root:rootpw", "get", "k", "--print-value-only")).stdout,
                         "v\n")
        r = e.ctl("--user=alice:alicepw", "put", "k", "x")  # logs in; no role: refused
        self.assertIn("permission denied", r.stderr)
        r = e.ctl("--user=alice:wrong", "get", "k")
        self.assertIn("authentication failed", r.stderr)


@unittest.skipUnless(SUT_IS_KEELSON, "restore makes Keelson data dirs")
class TestBumpRevisionWatch(Base):
    def test_watchers_never_see_revisions_go_back(self):
        """Clients of the old cluster saw revisions past the snapshot. After a restore with
        --bump-revision (larger than what they saw) and --mark-compacted, a watch resumed
        from the last revision seen is told it was compacted (so it re-syncs) instead of
        getting nothing or old events, and every new event has a higher revision."""
        src = harness.fresh_server(self)
        ok(src.ctl("put", "w/a", "1"))
        f = self.path("snap.db")
        ku("snapshot", "save", f, "--endpoints=" + src.endpoint)
        snap_rev = json.loads(ku("snapshot", "status", f, "-w", "json").stdout)["revision"]
        for i in range(5):  # written after the snapshot: lost, but watchers saw them
            ok(src.ctl("put", "w/b", str(i)))
        seen = json.loads(ok(src.ctl("get", "w/b", "-w", "json")).stdout)["header"]["revision"]
        self.assertEqual(seen, snap_rev + 5)
        src.cleanup()
        dst = self.restored_server(f, name="bumped", extra=("--bump-revision", "100",
                                                            "--mark-compacted"))
        dst.start()
        r = dst.ctl("watch", "--prefix", "w/", "--rev=%d" % (seen + 1), timeout=20)
        self.assertIn("compacted", r.stdout + r.stderr)
        put = json.loads(ok(dst.ctl("put", "w/c", "x", "-w", "json")).stdout)
        self.assertEqual(put["header"]["revision"], snap_rev + 101)
        self.assertGreater(put["header"]["revision"], seen)
        # a watcher that re-syncs from the current revision gets only newer revisions
        p = subprocess.Popen([harness.ETCDCTL_BIN, "--endpoints=" + dst.endpoint, "watch",
                              "--prefix", "w/", "-w", "json", "--rev=%d" % put["header"]["revision"]],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=harness.clean_env({"ETCDCTL_API": "3"}))
        try:
            ok(dst.ctl("put", "w/d", "y"))
            revs = []
            while len(revs) < 2:
                line = p.stdout.readline()
                if not line:
                    break
                ev = json.loads(line)
                revs += [e["kv"]["mod_revision"] for e in ev.get("Events") or []]
        finally:
            p.kill()
            p.communicate(timeout=10)
        self.assertEqual(revs, [snap_rev + 101, snap_rev + 102])
        self.assertTrue(all(r > seen for r in revs))


if __name__ == "__main__":
    unittest.main()
