"""Scheduled backups taken by the server itself (--backup-dir and the other --backup-* flags;
the directory code is backup/backup.h, shared with `keelsonutl backup`).

- an interval with --backup-retain keeps exactly the retained set, `latest` names the newest,
  /metrics shows the last success (its revision is the store's after the last write); every
  file passes `keelsonutl snapshot status` and `etcdctl snapshot status`, and the latest
  restores with `keelsonutl snapshot restore` (Keelson serves the same keys) and with
  `etcdctl snapshot restore` (a real etcd serves the same keys);
- kill -9 of the server in the middle of a (compressed) backup: nothing half is under a
  backup name, the leftovers go at the restart, and backups go on;
- Defragment while backups of a larger store run back to back: every defragment succeeds
  (the backup gives the store up and is taken again), backups go on, the server stays up;
- a follower that backs up its store back to back is sent the leader's snapshot (it fell
  behind the compacted log): the install goes through (a backup in progress gives the store
  up), the follower catches up, and its backups go on with the new state;
- flag checks (exit 2 with the reason), and the same settings from --config-file.

Needs `bazel build //server:keelson //tools:keelsonutl`. Keelson only (etcd has no such
flags): skipped when KEELSON_BIN is etcd.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # noqa: E402
import cluster  # noqa: E402

TOOL = os.environ.get("KEELSONUTL") or os.path.join(
    harness.REPO_ROOT, "bazel-bin", "tools", "keelsonutl")
SUT_IS_KEELSON = os.path.basename(harness.KEELSON_BIN) != "etcd"
HAVE_ETCD = os.path.exists(harness.ETCD_BIN) and os.path.exists(harness.ETCDCTL_BIN)


def ku(*args, check=True):
    p = subprocess.run([TOOL] + [str(a) for a in args], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=120, env=harness.clean_env())
    if check and p.returncode != 0:
        raise AssertionError("keelsonutl %s: rc %d\n%s" % (" ".join(map(str, args)),
                                                           p.returncode, p.stderr.decode()))
    return p


def ctl_offline(*args):
    return subprocess.run([harness.ETCDCTL_BIN] + [str(a) for a in args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120,
                          env=harness.clean_env({"ETCDCTL_API": "3"}))


def ok(r):
    assert r.rc == 0, r
    return r


def backups_in(d):
    return sorted(n for n in os.listdir(d)
                  if re.match(r"^\d{8}T\d{6}\.\d{3}Z-rev\d+\.db(\.gz)?$", n))


def wait_for(cond, timeout, what, step=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise AssertionError("timed out waiting for " + what)


DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no env proxy


def metrics(s):
    with DIRECT.open("http://%s/metrics" % s.endpoint, timeout=5) as resp:
        text = resp.read().decode()
    return dict(l.split() for l in text.splitlines()
                if l.startswith("keelson_backup_"))


def revision(s):
    return json.loads(ok(s.ctl("get", "x", "-w", "json")).stdout)["header"]["revision"]


def all_kvs(s):
    d = json.loads(ok(s.ctl("get", "", "--from-key", "-w", "json")).stdout)
    return [(kv["key"], kv["value"], kv["mod_revision"]) for kv in d.get("kvs", [])]


def server_log(s):
    out = ""
    for i in range(1, s._starts + 1):
        try:
            with open(os.path.join(s.tmp, "server-%d.log" % i), "rb") as f:
                out += f.read().decode("utf-8", "replace")
        except OSError:
            pass
    return out


@unittest.skipUnless(SUT_IS_KEELSON, "the --backup-* flags are Keelson's")
class TestServerBackup(unittest.TestCase):
    def setUp(self):
        if not os.access(TOOL, os.X_OK):
            self.fail("keelsonutl not built: bazel build //tools:keelsonutl (or set KEELSONUTL)")
        self.tmp = tempfile.mkdtemp(prefix="keelson-it-sbk-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def path(self, name):
        return os.path.join(self.tmp, name)

    def test_interval_retention_metrics_restore(self):
        d = self.path("backups")
        s = harness.fresh_server(self, extra_args=[
            "--backup-dir", d, "--backup-interval", "150ms", "--backup-retain", "3"])
        for i in range(10):
            ok(s.ctl("put", "k%02d" % i, "v%d" % i))
        ok(s.ctl("del", "k03"))
        rev = revision(s)
        # a backup taken after the last write shows up on /metrics, after a few others
        m = wait_for(lambda: (lambda m: m if int(float(m["keelson_backup_last_revision"])) == rev
                              and int(m["keelson_backup_successes_total"]) >= 5 else None)(
                                  metrics(s)), 30, "backups of the last revision", step=0.05)
        self.assertEqual(m["keelson_backup_last_success"], "1")
        self.assertEqual(m["keelson_backup_failures_total"], "0")
        self.assertEqual(m["keelson_backup_retained"], "3")
        self.assertGreater(float(m["keelson_backup_last_success_timestamp_seconds"]),
                           time.time() - 60)
        self.assertGreater(int(m["keelson_backup_last_size_bytes"]), 0)
        want = all_kvs(s)
        s.stop()
        # exactly the retained set, `latest` the newest, nothing else left behind
        dbs = backups_in(d)
        self.assertEqual(len(dbs), 3, os.listdir(d))
        self.assertEqual(sorted(os.listdir(d)), sorted(dbs + [".backup.lock", "latest"]))
        self.assertEqual(os.readlink(os.path.join(d, "latest")), dbs[-1])
        self.assertTrue(dbs[-1].endswith("-rev%d.db" % rev), dbs)
        log = server_log(s)
        self.assertIn("scheduled backups started", log)
        self.assertGreaterEqual(log.count("saved backup"), 5)
        latest = os.path.join(d, "latest")
        st = json.loads(ku("snapshot", "status", latest, "-w", "json").stdout)
        self.assertEqual(st["revision"], rev)
        if HAVE_ETCD:
            for n in dbs:  # etcdctl checks the SHA-256 trailer and reads the bbolt file
                r = ctl_offline("snapshot", "status", os.path.join(d, n), "-w", "json")
                self.assertEqual(r.returncode, 0, r.stderr)
        # restores with keelsonutl into a Keelson member
        k = harness.Server(harness.KEELSON_BIN, name="kr", label="restored")
        self.addCleanup(k.cleanup)
        ku("snapshot", "restore", latest, "--data-dir", k.data_dir, "--name", "kr",
           "--initial-cluster", "kr=%s" % k.peer_url, "--initial-advertise-peer-urls", k.peer_url)
        k.start()
        self.assertEqual(all_kvs(k), want)
        k.stop()
        if not HAVE_ETCD:
            return
        # and with etcdctl into a real etcd
        e = harness.Server(harness.ETCD_BIN, name="er", label="etcd-restored")
        self.addCleanup(e.cleanup)
        r = ctl_offline("snapshot", "restore", latest, "--data-dir", e.data_dir, "--name", "er",
                        "--initial-cluster", "er=%s" % e.peer_url,
                        "--initial-advertise-peer-urls", e.peer_url)
        self.assertEqual(r.returncode, 0, r.stderr)
        e.start()
        self.assertEqual(all_kvs(e), want)

    def big_server(self, mb):
        s = harness.fresh_server(self)
        for i in range(mb):
            ok(s.ctl("put", "big/%03d" % i, stdin=os.urandom(500 * 1000).hex().encode()))
        return s

    def test_killed_mid_backup(self):
        s = self.big_server(16)
        d = self.path("backups")
        s.extra_args += ["--backup-dir", d, "--backup-interval", "100ms", "--backup-retain", "2",
                         "--backup-compress"]
        s.restart()

        def in_progress():
            for n in os.listdir(d) if os.path.isdir(d) else []:
                if n.endswith(".part"):
                    try:
                        return os.path.getsize(os.path.join(d, n)) > 0
                    except OSError:
                        pass
            return False
        wait_for(in_progress, 30, "a backup being written", step=0.002)
        s.kill9()
        names = os.listdir(d)
        self.assertTrue([n for n in names if ".snapshot" in n], names)  # the half one
        # nothing that looks like a backup is half: every backup name is a whole file
        before = backups_in(d)
        for n in before:
            ku("snapshot", "status", os.path.join(d, n))
        saved = server_log(s).count("saved backup")
        s.restart()
        wait_for(lambda: server_log(s).count("saved backup") > saved, 60,
                 "a backup after the restart", step=0.05)
        s.stop()
        dbs = backups_in(d)
        self.assertTrue(1 <= len(dbs) <= 2, dbs)
        self.assertEqual([n for n in os.listdir(d) if ".snapshot" in n or n.endswith(".tmp")], [])
        for n in dbs:
            self.assertTrue(n.endswith(".db.gz"))
            ku("snapshot", "status", os.path.join(d, n))
        self.assertEqual(os.readlink(os.path.join(d, "latest")), dbs[-1])

    def test_defragment_during_backups(self):
        s = self.big_server(12)
        d = self.path("backups")
        s.extra_args += ["--backup-dir", d, "--backup-interval", "100ms"]
        s.restart()
        wait_for(lambda: server_log(s).count("saved backup") >= 1, 30, "a first backup")
        # until one defragment lands inside a backup (each backup takes a good part of the
        # interval here, so a few tries do)
        for _ in range(40):
            r = s.ctl("defrag", "--command-timeout=30s")
            self.assertEqual(r.rc, 0, r)
            ok(s.ctl("put", "after-defrag", "1"))
            if "backup interrupted" in server_log(s):
                break
        self.assertIn("backup interrupted by a defragment", server_log(s))
        n = server_log(s).count("saved backup")
        wait_for(lambda: server_log(s).count("saved backup") > n, 30, "backups after defragments")
        self.assertNotIn("backup failed", server_log(s))
        s.stop()
        st = json.loads(ku("snapshot", "status", os.path.join(d, "latest"), "-w", "json").stdout)
        self.assertGreater(st["totalKey"], 12)

    def test_snapshot_install_during_backups(self):
        c = cluster.Cluster(3, label="sbk", extra_args=[
            "--snapshot-count=100", "--experimental-snapshot-catchup-entries=20"])
        self.addCleanup(c.cleanup)
        dirs = {}
        for m in c.members:
            dirs[m.name] = self.path("backups-" + m.name)
            m.extra_args += ["--backup-dir", dirs[m.name], "--backup-interval", "100ms",
                             "--backup-retain", "2"]
        c.start()
        ldr = c.leader()
        f = c.followers(ldr)[0]
        for i in range(8):  # a store whose backups take a good part of the interval
            ok(ldr.ctl("put", "big/%d" % i, stdin=os.urandom(500 * 1000).hex().encode()))
        harness.poll(lambda: f.ctl("get", "big/7", "--consistency=s", "--keys-only").stdout.strip()
                     == "big/7", 20, what="the follower has the data")
        c.kill9(f)
        cl = cluster.etcd3_client(ldr)
        try:
            for i in range(300):
                cl.put("snap/%03d" % i, "v%d" % i)
        finally:
            cl.close()
        rev = revision(ldr)
        ok(ldr.ctl("compaction", str(rev - 20)))
        c.restart(f)
        harness.poll(lambda: "installed a database snapshot" in server_log(f), 30,
                     what="the snapshot installed on the follower")
        harness.poll(lambda: f.ctl("get", "snap/299", "--consistency=s", "--print-value-only")
                     .stdout.strip() == "v299", 30, what="the follower caught up")
        # the follower's backups go on, with the installed state
        harness.poll(lambda: any(int(re.search(r"-rev(\d+)", n).group(1)) >= rev
                                 for n in backups_in(dirs[f.name])), 30,
                     what="a backup of the installed state")
        self.assertNotIn("backup failed", server_log(f))
        hk = c.hashkv(rev=rev)
        self.assertEqual(len(set(h[0] for h in hk.values())), 1, hk)
        f.stop()
        latest = os.path.join(dirs[f.name], "latest")
        st = json.loads(ku("snapshot", "status", latest, "-w", "json").stdout)
        self.assertGreaterEqual(st["revision"], rev)

    def test_flags(self):
        d = self.path("backups")
        for bad, msg in ((["--backup-dir", d, "--backup-interval", "0s"], "invalid --backup-interval 0s"),
                         (["--backup-dir", d, "--backup-interval", "1m", "--backup-schedule", "* * * * *"],
                          "exclusive"),
                         (["--backup-dir", d, "--backup-schedule", "0 0 30 2 *"], "never matches"),
                         (["--backup-dir", d, "--backup-schedule", "60 * * * *"], "minute"),
                         (["--backup-dir", d, "--backup-max-age", "soon"], "invalid --backup-max-age"),
                         (["--backup-dir", d, "--backup-utc"], "--backup-schedule only"),
                         (["--backup-retain", "2"], "need --backup-dir"),
                         (["--backup-retain", "x"], "invalid value")):
            p = subprocess.run([harness.KEELSON_BIN, "--data-dir", self.path("data")] + bad,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30,
                               env=harness.clean_env())
            self.assertEqual(p.returncode, 2, (bad, p.stderr))
            self.assertIn(msg, p.stderr.decode(), bad)
        self.assertFalse(os.path.exists(d))
        # a cron schedule is accepted and described (its first run is a minute away at most)
        s = harness.fresh_server(self, extra_args=[
            "--backup-dir", d, "--backup-schedule", "*/30 * * * *", "--backup-utc"])
        wait_for(lambda: "scheduled backups started" in server_log(s), 10, "the start line")
        self.assertIn('on "*/30 * * * *" (UTC)', server_log(s))
        self.assertEqual(metrics(s)["keelson_backup_successes_total"], "0")
        s.stop()
        # a directory another scheduler holds is refused at start
        lock = subprocess.Popen(["flock", os.path.join(d, ".backup.lock"), "sleep", "30"])
        try:
            wait_for(lambda: subprocess.run(["flock", "-n", os.path.join(d, ".backup.lock"),
                                             "true"]).returncode != 0, 10, "the lock taken")
            p = subprocess.run([harness.KEELSON_BIN, "--data-dir", self.path("data2"),
                                "--listen-client-urls", "http://127.0.0.1:%d" % harness.free_port(),
                                "--listen-peer-urls", "http://127.0.0.1:%d" % harness.free_port(),
                                "--backup-dir", d], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=30, env=harness.clean_env())
            self.assertNotEqual(p.returncode, 0)
            self.assertIn("another backup is running on this directory", p.stdout.decode())
        finally:
            lock.kill()
            lock.wait()

    def test_config_file(self):
        d = self.path("cfgbackups")
        s = harness.Server(harness.KEELSON_BIN, label="sut")
        self.addCleanup(s.cleanup)
        cfg = self.path("keelson.yaml")
        with open(cfg, "w") as f:
            f.write("name: default\ndata-dir: %s\nlisten-client-urls: %s\n"
                    "advertise-client-urls: %s\nlisten-peer-urls: %s\n"
                    "initial-advertise-peer-urls: %s\ninitial-cluster: default=%s\n"
                    "backup-dir: %s\nbackup-interval: 100ms\nbackup-retain: 1\n"
                    "backup-compress: true\n" % (
                        s.data_dir, s.client_url, s.client_url, s.peer_url, s.peer_url,
                        s.peer_url, d))
        s.args = lambda: ["--config-file", cfg]
        s.start()
        wait_for(lambda: int(metrics(s)["keelson_backup_successes_total"]) >= 3, 30,
                 "three backups", step=0.05)
        s.stop()
        dbs = backups_in(d)
        self.assertEqual(len(dbs), 1, os.listdir(d))
        self.assertTrue(dbs[0].endswith(".db.gz"))


if __name__ == "__main__":
    unittest.main()
