"""Multi-member cluster tests: 3 (and 5) server processes on 127.0.0.1 driven by the real
etcdctl 3.4 and python3-etcd3 (issue 4). Short timings (--heartbeat-interval 50
--election-timeout 500) keep the module at about a minute.

  /usr/bin/python3 tests/integration/run.py test_cluster
  KEELSON_BIN=/usr/bin/etcd /usr/bin/python3 tests/integration/run.py test_cluster  # the oracle

Each test leaves its cluster whole (every member running and caught up), and each ends by
comparing HashKV across the members.
"""

import json
import os
import re
import subprocess
import threading
import time
import unittest

import harness
from harness import etcdctl, poll
import cluster as clusterlib
from cluster import Cluster, ClusterError, etcd3_client

ELECTION_S = clusterlib.ELECTION_MS / 1000.0
# "within a few election timeouts": the bound asserted for a new leader after a kill
NEW_LEADER_BOUND_S = float(os.environ.get("KEELSON_NEW_LEADER_BOUND_S", str(10 * ELECTION_S)))


def hexid(n):
    return "%x" % n


class ClusterCase(unittest.TestCase):
    """Helpers shared by the cluster test classes."""

    cluster = None

    def ctl_ok(self, member_or_eps, *args, **kw):
        ep = member_or_eps if isinstance(member_or_eps, str) else member_or_eps.endpoint
        r = etcdctl(ep, *args, **kw)
        self.assertEqual(r.rc, 0, "etcdctl %s failed: %r" % (" ".join(map(str, args)), r))
        return r

    def get_value(self, m, key, serializable=False):
        args = ["get", key, "--print-value-only"]
        if serializable:
            args.append("--consistency=s")
        r = self.ctl_ok(m, *args, "--command-timeout=5s", timeout=20)
        out = r.stdout
        return out[:-1] if out.endswith("\n") else out

    def assert_hashkv_equal(self, c=None, timeout=20):
        """Every live member: same raft index, same revision, same HashKV."""
        c = c or self.cluster
        deadline = time.monotonic() + timeout
        while True:
            idx, rev = c.wait_converged(timeout=max(1, deadline - time.monotonic()))
            hs = c.hashkv(rev=rev)
            if len(set(hs.values())) == 1:
                break
            if time.monotonic() > deadline:
                self.fail("HashKV differs across members at revision %d: %r\n%s" % (
                    rev, hs, c.logs(10)))
            time.sleep(0.2)
        # and the same through etcdctl's --cluster form (member list + every client URL)
        r = self.ctl_ok(c.endpoints(c.live()), "endpoint", "hashkv", "--cluster", "-w", "json",
                        timeout=30)
        got = json.loads(r.stdout)
        self.assertEqual(len(got), len(c.live()), r.stdout)
        hashes = {g["HashKV"]["hash"] for g in got}
        if len(hashes) != 1:
            # a write may have landed between the two checks only if a test is still writing
            self.fail("endpoint hashkv --cluster: hashes differ: %s" % r.stdout)

    def ctl_reconfig(self, m, *args, timeout=15):
        """A membership change; etcd refuses one until every member has been connected for
        5s ("etcdserver: unhealthy cluster"): that error alone is retried."""
        def once():
            r = etcdctl(m.endpoint, *args)
            if r.rc != 0:
                self.assertIn("etcdserver: unhealthy cluster", r.stderr, r)
                return None
            return r
        return poll(once, timeout, interval=0.5, what="etcdctl " + " ".join(args))

    def watch_json(self, m, n, *args):
        """`etcdctl watch ARGS -w json` on member m, read on a thread: (process, events,
        done), done set once n events arrived. The caller kills the process."""
        p = subprocess.Popen([harness.ETCDCTL_BIN, "--endpoints=" + m.endpoint, "watch", *args,
                              "-w", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=harness.clean_env({"ETCDCTL_API": "3"}))
        events = []
        done = threading.Event()

        def reader():
            for line in p.stdout:
                try:
                    resp = json.loads(line)
                except ValueError:
                    continue
                events.extend(resp.get("Events") or [])
                if len(events) >= n:
                    done.set()
                    return

        threading.Thread(target=reader, daemon=True).start()
        return p, events, done

    def members_json(self, m):
        r = self.ctl_ok(m, "member", "list", "-w", "json", timeout=20)
        return json.loads(r.stdout)["members"]


# ---------------------------------------------------------------------------------------

class ThreeMembers(ClusterCase):
    """One 3-member cluster shared by these tests; each test leaves it whole."""

    @classmethod
    def setUpClass(cls):
        cls.cluster = None
        cls.start_error = None
        try:
            cls.cluster = Cluster(3, label="c3").start()
        except Exception as e:  # noqa
            cls.start_error = e

    @classmethod
    def tearDownClass(cls):
        if cls.cluster is not None:
            cls.cluster.cleanup()

    def setUp(self):
        if self.start_error is not None:
            raise ClusterError("cluster did not start: %s" % self.start_error)
        c = self.cluster
        # repair what an earlier failed test may have left behind
        for m in c.members:
            m.resume()
            if not m.alive():
                c.restart(m)
        c.wait_leader(timeout=20)

    def test_00_health_without_leader(self):
        """/health is 503 {"health":"false"} once a member has no leader (etcd 3.4's rule),
        true again after a leader is back."""
        import urllib.error
        import urllib.request

        def health(m):
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/health" % m.client_port,
                                            timeout=5) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        c = self.cluster
        lone = c.members[0]
        self.assertEqual(health(lone), (200, '{"health":"true"}'))
        for m in c.members[1:]:
            c.kill9(m)
        def changed(want_ok):
            h = health(lone)
            return list(h) if (h[0] == 200) == want_ok else None
        got = harness.poll(lambda: changed(False), timeout=20, what="health false")
        self.assertEqual(got, [503, '{"health":"false"}\n'])
        # a write without a leader gives up at the client's deadline: a failed proposal
        self.assertNotEqual(lone.ctl("put", "/nolead", "v", "--command-timeout=1s").rc, 0)

        def failed_proposals():
            with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % lone.client_port,
                                        timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("etcd_server_proposals_failed_total "):
                        return float(line.split()[1]) >= 1
        harness.poll(failed_proposals, timeout=10, what="etcd_server_proposals_failed_total >= 1")
        for m in c.members[1:]:
            c.restart(m)
        c.wait_leader(timeout=20)
        self.assertEqual(harness.poll(lambda: changed(True), timeout=20, what="health true"),
                         [200, '{"health":"true"}'])

    def test_00_metrics(self):
        """has_leader/is_leader per member, and etcd's prober histogram: a round trip to each
        peer (etcd_network_peer_round_trip_time_seconds{To="<id>"}) within a few probes."""
        import urllib.request

        def metrics(m):
            with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % m.client_port,
                                        timeout=5) as r:
                return r.read().decode()

        c = self.cluster
        ids = {m.name: hexid(m.status()["header"]["member_id"]) for m in c.members}
        leaders = 0
        for m in c.members:
            def probed():
                body = metrics(m)
                counts = {}
                for line in body.splitlines():
                    mm = re.match(r'etcd_network_peer_round_trip_time_seconds_count\{To="([0-9a-f]+)"\} (\d+)', line)
                    if mm:
                        counts[mm.group(1)] = int(mm.group(2))
                want = {ids[o.name] for o in c.members if o is not m}
                return body if set(counts) == want and all(counts.values()) else None
            body = harness.poll(probed, timeout=20, what="round trips to both peers")
            self.assertIn("etcd_server_has_leader 1", body.splitlines())
            leaders += "etcd_server_is_leader 1" in body.splitlines()
        self.assertEqual(leaders, 1)

    # -- basic replication

    def test_01_member_list(self):
        c = self.cluster
        for m in c.members:
            ms = self.members_json(m)
            self.assertEqual(len(ms), 3, ms)
            byname = {x.get("name"): x for x in ms}
            self.assertEqual(sorted(byname), ["m1", "m2", "m3"], ms)
            for mm in c.members:
                x = byname[mm.name]
                self.assertEqual(x.get("clientURLs"), [mm.client_url], x)
                self.assertEqual(x.get("peerURLs"), [mm.peer_url], x)
                self.assertFalse(x.get("isLearner", False), x)
                st = mm.status()
                self.assertEqual(hexid(x["ID"]), hexid(st["header"]["member_id"]), x)
        # the simple table form: "<id>, started, <name>, <peer>, <client>, false"
        r = self.ctl_ok(c.members[0], "member", "list")
        lines = r.stdout.strip().splitlines()
        self.assertEqual(len(lines), 3, r.stdout)
        for line in lines:
            self.assertRegex(line, r"^[0-9a-f]+, started, m[123], http://127\.0\.0\.1:\d+, "
                                   r"http://127\.0\.0\.1:\d+, false$")
        # the cluster id is the same whichever member answers
        cids = {json.loads(self.ctl_ok(m, "member", "list", "-w", "json").stdout)
                ["header"]["cluster_id"] for m in c.members}
        self.assertEqual(len(cids), 1, cids)

    def test_01_member_list_order(self):
        # etcd lists members sorted by ID (membership.MembersByID), whichever member answers
        for m in self.cluster.members:
            ms = self.members_json(m)
            ids = [x["ID"] for x in ms]
            self.assertEqual(ids, sorted(ids), "member list not in etcd's (ID) order: %r" % ms)

    def test_02_write_anywhere_read_everywhere(self):
        c = self.cluster
        for i, w in enumerate(c.members):
            key, val = "/rw/k%d" % i, "via-%s-%d" % (w.name, time.monotonic_ns())
            self.ctl_ok(w, "put", key, val)
            for r in c.members:
                self.assertEqual(self.get_value(r, key), val,
                                 "linearizable get of %s on %s after put on %s" % (
                                     key, r.name, w.name))
        # serializable reads: served locally, so poll until the write is applied there
        idx, rev = c.wait_converged()
        for i, w in enumerate(c.members):
            key = "/rw/k%d" % i
            expect = self.get_value(c.members[0], key)
            for r in c.members:
                self.assertEqual(self.get_value(r, key, serializable=True), expect)
        # a delete through one member is seen through all
        self.ctl_ok(c.members[1], "del", "/rw/k0")
        for r in c.members:
            self.assertEqual(self.get_value(r, "/rw/k0"), "")
        # a txn through a follower
        f = c.followers()[0]
        r = self.ctl_ok(f, "txn", stdin='value("/rw/k1") = "%s"\n\nput /rw/t yes\n\nput /rw/t no\n\n'
                        % self.get_value(f, "/rw/k1"))
        self.assertTrue(r.stdout.startswith("SUCCESS"), r.stdout)
        for m in c.members:
            self.assertEqual(self.get_value(m, "/rw/t"), "yes")
        self.assert_hashkv_equal()

    def test_03_endpoint_status_cluster(self):
        c = self.cluster
        for i in range(20):
            self.ctl_ok(c.members[i % 3], "put", "/st/%d" % i, "x")
        c.wait_converged()
        r = self.ctl_ok(c.members[1], "endpoint", "status", "--cluster", "-w", "json")
        sts = json.loads(r.stdout)
        self.assertEqual(len(sts), 3, r.stdout)
        self.assertEqual({s["Endpoint"] for s in sts}, {m.client_url for m in c.members})
        leaders = {s["Status"]["leader"] for s in sts}
        self.assertEqual(len(leaders), 1, r.stdout)
        is_leader = [s for s in sts if s["Status"]["leader"] == s["Status"]["header"]["member_id"]]
        self.assertEqual(len(is_leader), 1, r.stdout)
        self.assertEqual(len({s["Status"]["raftIndex"] for s in sts}), 1, r.stdout)
        self.assertEqual(len({s["Status"]["raftTerm"] for s in sts}), 1, r.stdout)
        self.assertEqual(len({s["Status"]["header"]["cluster_id"] for s in sts}), 1, r.stdout)
        self.assertEqual(len({s["Status"]["header"]["revision"] for s in sts}), 1, r.stdout)
        # the table form names exactly one leader
        r = self.ctl_ok(c.members[0], "endpoint", "status", "--cluster")
        self.assertEqual(sum(1 for ln in r.stdout.splitlines() if ", true, false," in ln), 1,
                         r.stdout)

    # -- faults

    def _writers(self, c, prefix, stop, nthreads=4):
        """Writer threads doing puts of unique keys through every member (round robin per
        thread). Returns (threads, acked, failed): acked {key: value}, failed set of keys
        whose put errored or timed out (indeterminate)."""
        acked, failed = {}, set()
        lock = threading.Lock()

        def run(t):
            clients = {}
            i = 0
            while not stop.is_set():
                m = c.members[(t + i) % len(c.members)]
                key, val = "%s/w%d/%06d" % (prefix, t, i), "v%d-%d" % (t, i)
                i += 1
                if not m.alive():
                    time.sleep(0.01)
                    continue
                try:
                    cl = clients.get(m.name)
                    if cl is None:
                        cl = clients[m.name] = etcd3_client(m, timeout=3)
                    cl.put(key, val)
                    with lock:
                        acked[key] = val
                except Exception:  # noqa  (indeterminate: may or may not be applied)
                    with lock:
                        failed.add(key)
                    clients.pop(m.name, None)
                    time.sleep(0.02)
            for cl in clients.values():
                try:
                    cl.close()
                except Exception:  # noqa
                    pass

        ts = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(nthreads)]
        for t in ts:
            t.start()
        return ts, acked, failed

    def _check_writes(self, c, prefix, acked, failed):
        """Every acked put present with its value on every member; nothing never written."""
        c.wait_converged(timeout=30)
        for m in c.members:
            cl = etcd3_client(m, timeout=10)
            try:
                resp = cl.get_prefix_response(prefix, serializable=True)
                got = {kv.key.decode(): kv.value.decode() for kv in resp.kvs}
            finally:
                cl.close()
            missing = sorted(k for k in acked if got.get(k) != acked[k])
            phantom = sorted(k for k in got if k not in acked and k not in failed)
            self.assertFalse(missing, "%s: %d acknowledged puts lost or wrong, e.g. %r "
                             "(have %d keys, %d acked, %d indeterminate)\n%s" % (
                                 m.name, len(missing), [(k, got.get(k)) for k in missing[:5]],
                                 len(got), len(acked), len(failed), c.logs(20)))
            self.assertFalse(phantom, "%s: keys never written: %r" % (m.name, phantom[:5]))

    def test_10_kill_leader_under_writes(self):
        c = self.cluster
        old = c.leader()
        stop = threading.Event()
        ts, acked, failed = self._writers(c, "/kl", stop)
        try:
            poll(lambda: len(acked) >= 50, 20, what="50 acked puts before the kill")
            t_kill = time.monotonic()
            c.kill9(old)
            new = c.wait_leader(timeout=30, exclude=(old,))
            elect_s = time.monotonic() - t_kill
            n_at_election = len(acked)
            poll(lambda: len(acked) >= n_at_election + 50, 20,
                 what="50 more acked puts after the election")
        finally:
            stop.set()
            for t in ts:
                t.join(15)
        print("    [kill leader] %s killed, %s elected after %.2fs; %d acked, %d indeterminate"
              % (old.name, new.name, elect_s, len(acked), len(failed)))
        self.assertIsNot(new, old)
        self.assertLess(elect_s, NEW_LEADER_BOUND_S,
                        "new leader only after %.2fs (election timeout %.1fs)" % (
                            elect_s, ELECTION_S))
        c.restart(old)
        self._check_writes(c, "/kl", acked, failed)
        self.assert_hashkv_equal()

    def test_11_follower_restart_catches_up(self):
        c = self.cluster
        ldr = c.leader()
        f = c.followers(ldr)[0]
        c.kill9(f)
        cl = etcd3_client(ldr)
        try:
            for i in range(300):
                cl.put("/fr/%04d" % i, "v%d" % i)
        finally:
            cl.close()
        # a linearizable read through the remaining follower works without f
        other = [m for m in c.members if m is not ldr and m is not f][0]
        self.assertEqual(self.get_value(other, "/fr/0299"), "v299")
        c.restart(f)
        self.assertEqual(self.get_value(f, "/fr/0299"), "v299")
        poll(lambda: self.get_value(f, "/fr/0299", serializable=True) == "v299", 10,
             what="serializable read on the restarted follower")
        r = self.ctl_ok(f, "get", "/fr/", "--prefix", "--keys-only",
                        "--consistency=s")
        self.assertEqual(len([x for x in r.stdout.splitlines() if x]), 300)
        self.assert_hashkv_equal()

    def test_12_paused_follower(self):
        """A SIGSTOP'd follower (minority) does not block writes, catches up after SIGCONT."""
        c = self.cluster
        ldr = c.leader()
        f = c.followers(ldr)[0]
        c.pause(f)
        try:
            t0 = time.monotonic()
            for i in range(50):
                r = etcdctl(ldr.endpoint if i % 2 else
                            [m for m in c.members if m not in (ldr, f)][0].endpoint,
                            "--command-timeout=5s", "put", "/pz/%03d" % i, "v%d" % i)
                self.assertEqual(r.rc, 0, r)
            dt = time.monotonic() - t0
            self.assertLess(dt, 30, "50 puts with a paused follower took %.1fs" % dt)
        finally:
            c.resume(f)
        poll(lambda: self.get_value(f, "/pz/049", serializable=True) == "v49", 15,
             what="paused follower catching up")
        self.assertEqual(self.get_value(f, "/pz/049"), "v49")
        self.assert_hashkv_equal()

    def test_13_isolated_member_no_linearizable_reads(self):
        """With both peers of a member paused, it has no quorum: a linearizable read or a
        write through it must fail (never a stale answer); a serializable read still works."""
        c = self.cluster
        ldr = c.leader()
        self.ctl_ok(ldr, "put", "/iso/k", "old")
        c.wait_converged()
        lone = c.followers(ldr)[0]
        others = [m for m in c.members if m is not lone]
        for m in others:
            c.pause(m)
        try:
            # the write that makes "old" stale goes nowhere (no quorum)...
            r = etcdctl(lone.endpoint, "--command-timeout=3s", "get", "/iso/k",
                        "--print-value-only", timeout=20)
            self.assertNotEqual(r.rc, 0, "linearizable read served without a quorum: %r" % r)
            r = etcdctl(lone.endpoint, "--command-timeout=3s", "get", "/iso/k",
                        "--print-value-only", "--consistency=s", timeout=20)
            self.assertEqual((r.rc, r.stdout), (0, "old\n"), r)
            r = etcdctl(lone.endpoint, "--command-timeout=3s", "put", "/iso/k2", "x", timeout=20)
            self.assertNotEqual(r.rc, 0, "write acknowledged without a quorum: %r" % r)
        finally:
            for m in others:
                c.resume(m)
        c.wait_leader(timeout=20)
        self.assertEqual(self.get_value(lone, "/iso/k"), "old")
        self.assert_hashkv_equal()

    # -- watch and lease

    def test_20_watch_on_follower(self):
        c = self.cluster
        ldr = c.leader()
        f = c.followers(ldr)[0]
        st = ldr.status()
        start_rev = st["header"]["revision"] + 1
        n = 200
        p, events, done = self.watch_json(f, n, "/wt/", "--prefix", "--rev=%d" % start_rev)
        try:
            cl = etcd3_client(ldr)
            try:
                for i in range(n):
                    cl.put("/wt/%d" % (i % 7), "v%d" % i)
            finally:
                cl.close()
            done.wait(20)
        finally:
            p.kill()
            p.wait()
        self.assertEqual(len(events), n, "watch on follower saw %d of %d events" % (
            len(events), n))
        import base64
        vals = [base64.b64decode(e["kv"]["value"]).decode() for e in events]
        self.assertEqual(vals, ["v%d" % i for i in range(n)], "events out of order / missing")
        revs = [e["kv"]["mod_revision"] for e in events]
        self.assertEqual(revs, list(range(start_rev, start_rev + n)),
                         "watch revisions not consecutive from %d" % start_rev)
        self.assert_hashkv_equal()

    def _grant(self, m, ttl):
        r = self.ctl_ok(m, "lease", "grant", str(ttl))
        mo = re.match(r"lease ([0-9a-f]+) granted with TTL\((\d+)s\)", r.stdout)
        self.assertTrue(mo, r.stdout)
        return mo.group(1)

    def test_21_lease_expires(self):
        c = self.cluster
        ldr = c.leader()
        f1, f2 = c.followers(ldr)
        lid = self._grant(f1, 2)
        self.ctl_ok(f2, "put", "/ls/exp", "x", "--lease=" + lid)
        self.ctl_ok(ldr, "put", "/ls/exp2", "y", "--lease=" + lid)
        for m in c.members:
            self.assertEqual(self.get_value(m, "/ls/exp"), "x")
        t0 = time.monotonic()
        poll(lambda: all(self.get_value(m, "/ls/exp") == "" and
                         self.get_value(m, "/ls/exp2") == "" for m in c.members),
             2 + 6, interval=0.2, what="lease expiry deleting its keys on every member")
        print("    [lease] keys of a 2s lease gone %.1fs after the put" % (time.monotonic() - t0))
        r = etcdctl(f2.endpoint, "lease", "timetolive", lid)
        self.assertIn("already expired", r.stdout, r)
        self.assert_hashkv_equal()

    def test_22_lease_kept_alive_via_follower(self):
        c = self.cluster
        ldr = c.leader()
        f1, f2 = c.followers(ldr)
        lid = self._grant(ldr, 2)
        self.ctl_ok(f1, "put", "/ls/ka", "alive", "--lease=" + lid)
        p = subprocess.Popen([harness.ETCDCTL_BIN, "--endpoints=" + f2.endpoint, "lease",
                              "keep-alive", lid], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=harness.clean_env({"ETCDCTL_API": "3"}))
        try:
            for _ in range(6):  # 6s = 3 TTLs
                time.sleep(1)
                if p.poll() is not None:
                    self.fail("keep-alive exited: %r" % (p.communicate(),))
                self.assertEqual(self.get_value(ldr, "/ls/ka"), "alive",
                                 "key of a lease kept alive via a follower vanished")
        finally:
            p.kill()
            out, err = p.communicate()
        self.assertIn("keepalived with TTL(2)", out.decode(), (out, err))
        poll(lambda: self.get_value(f1, "/ls/ka") == "", 8, interval=0.2,
             what="lease expiry after the keep-alive stopped")
        self.assert_hashkv_equal()

    # -- leadership

    def test_30_move_leader(self):
        c = self.cluster
        ldr = c.leader()
        target = c.followers(ldr)[0]
        tid = target.member_id
        r = etcdctl(c.endpoints(), "move-leader", tid, timeout=30)
        if r.rc != 0:
            self.fail("move-leader failed: %r" % r)
        self.assertIn("Leadership transferred from %s to %s" % (ldr.member_id, tid), r.stdout)
        new = c.wait_leader(timeout=10)
        self.assertIs(new, target)
        # asking a member that is not leader, with only that endpoint: etcdctl's own error
        other = c.followers(new)[0]
        r = etcdctl(other.endpoint, "move-leader", ldr.member_id)
        self.assertNotEqual(r.rc, 0)
        self.assertIn("no leader endpoint given at", r.stderr)
        self.assert_hashkv_equal()

    def test_98_compaction_frees_space_on_every_member(self):
        """A compaction is applied by every member, and each removes its own superseded
        revisions: the apply does a first bounded step (10,000 revisions), the rest runs in
        later batches. That continuation once ran only on the member the client asked, so
        the others kept the old values for good (the fault campaign's NOSPACE loop)."""
        c = self.cluster
        asked = c.members[0]
        cli = etcd3_client(asked, timeout=20)
        value = b"v" * 2048
        # 12,500 revisions over 100 keys: more than the apply's first step examines
        for _ in range(125):
            cli.transaction(compare=[], success=[cli.transactions.put("/cmp/%d" % k, value)
                                                 for k in range(100)], failure=[])
        rev = cli.get("/cmp/0")[1].mod_revision
        self.ctl_ok(asked, "compact", str(rev), "--physical", "--command-timeout=30s", timeout=40)

        def sizes():
            out = {}
            for m in c.members:
                self.ctl_ok(m, "defrag", "--command-timeout=30s", timeout=40)
                r = self.ctl_ok(m, "endpoint", "status", "-w", "json")
                out[m.name] = json.loads(r.stdout)[0]["Status"]["dbSize"]
            return out
        # 2,500 revisions of 2 KiB left behind would be 5 MiB more than the asked member
        def converged():
            got = sizes()
            return max(got.values()) - min(got.values()) < (1 << 20) or ("db sizes", got)
        poll(converged, timeout=30, interval=1.0, what="equal db sizes after compact + defrag")
        cli.put("/cmp/after", "x")  # HashKV refuses the compacted revision itself, as etcd
        self.assert_hashkv_equal()

    def test_99_hashkv_at_end(self):
        self.assert_hashkv_equal()


class Membership(ClusterCase):
    """member add (learner) / start / promote / remove on a cluster of its own."""

    def setUp(self):
        self.cluster = Cluster(3, label="mb").start()
        self.addCleanup(self.cluster.cleanup)

    def test_learner_add_promote_remove(self):
        c = self.cluster
        ldr = c.leader()
        f = c.followers(ldr)[0]
        for i in range(30):
            self.ctl_ok(ldr, "put", "/mb/%02d" % i, "v%d" % i)
        m4 = c.add_member_object("m4")
        # etcd refuses reconfiguration until every member has been connected for a while
        # (5s: "etcdserver: unhealthy cluster"): retry that error only
        def add():
            r = etcdctl(f.endpoint, "member", "add", "m4", "--learner",
                        "--peer-urls=" + m4.peer_url)
            if r.rc != 0:
                self.assertIn("etcdserver: unhealthy cluster", r.stderr, r)
                return None
            return r
        r = poll(add, 15, interval=0.5, what="member add")
        mo = re.search(r"Member\s+([0-9a-f]+) added to cluster\s+([0-9a-f]+)", r.stdout)
        self.assertTrue(mo, r.stdout)
        m4id = mo.group(1)
        self.assertIn('ETCD_NAME="m4"', r.stdout)
        self.assertIn('ETCD_INITIAL_CLUSTER_STATE="existing"', r.stdout)
        mo2 = re.search(r'ETCD_INITIAL_CLUSTER="([^"]*)"', r.stdout)
        self.assertTrue(mo2, r.stdout)
        self.assertEqual(set(mo2.group(1).split(",")),
                         set(c.initial_cluster().split(",")), r.stdout)
        ms = self.members_json(ldr)
        self.assertEqual(len(ms), 4, ms)
        new = [x for x in ms if hexid(x["ID"]) == m4id]
        self.assertEqual(len(new), 1, ms)
        self.assertTrue(new[0].get("isLearner"), new[0])
        self.assertFalse(new[0].get("name"), "unstarted member has a name: %r" % new[0])
        r = self.ctl_ok(ldr, "member", "list")
        self.assertIn("%s, unstarted, , %s, , true" % (m4id, m4.peer_url), r.stdout)

        # start it: the full --initial-cluster including itself, state existing
        m4.state = "existing"
        m4.spawn()
        poll(lambda: self.get_value(m4, "/mb/29", serializable=True) == "v29", 20,
             what="learner catching up")
        ms = {hexid(x["ID"]): x for x in self.members_json(ldr)}
        self.assertEqual(ms[m4id].get("name"), "m4", ms[m4id])
        self.assertEqual(ms[m4id].get("clientURLs"), [m4.client_url], ms[m4id])
        # a learner does not serve linearizable reads (etcd: rpc not supported for learner)
        r = etcdctl(m4.endpoint, "--command-timeout=3s", "get", "/mb/00")
        self.assertNotEqual(r.rc, 0, "learner served a linearizable read: %r" % r)
        self.assertIn("etcdserver: rpc not supported for learner", r.stderr)

        # promote (etcd refuses until the learner is in sync: retry briefly)
        def promote():
            r = etcdctl(f.endpoint, "member", "promote", m4id)
            if r.rc != 0:
                self.assertIn("can only promote a learner member which is in sync with leader",
                              r.stderr)
                return None
            return r
        r = poll(promote, 15, interval=0.3, what="member promote")
        # etcdctl prints ids with %16x (space-padded)
        self.assertRegex(r.stdout, r"Member\s+%s promoted in cluster" % m4id)
        ms = {hexid(x["ID"]): x for x in self.members_json(f)}
        self.assertEqual(len(ms), 4)
        self.assertFalse(ms[m4id].get("isLearner", False), ms[m4id])
        self.ctl_ok(m4, "put", "/mb/from-m4", "yes")
        for m in c.members:
            self.assertEqual(self.get_value(m, "/mb/from-m4"), "yes")
        self.assert_hashkv_equal()

        # remove an original follower (through another member); it stops serving
        ldr = c.leader()
        victim = [m for m in c.members if m is not ldr and m is not m4][0]
        r = self.ctl_reconfig(m4, "member", "remove", victim.member_id)
        self.assertRegex(r.stdout, r"Member\s+%s removed from cluster" % victim.member_id)
        ms = self.members_json(ldr)
        self.assertEqual(sorted(x["name"] for x in ms),
                         sorted(m.name for m in c.members if m is not victim))
        # etcd: the removed member notices and exits ("the member has been permanently
        # removed from the cluster")
        try:
            victim.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.fail("removed member %s still running 15s after its removal\n%s" % (
                victim.name, victim.log_tail(20)))
        c.members.remove(victim)
        victim.cleanup(graceful=False)
        self.ctl_ok(ldr, "put", "/mb/after-remove", "ok")
        for m in c.members:
            self.assertEqual(self.get_value(m, "/mb/after-remove"), "ok")
        # remove of an unknown id: etcd's error
        r = etcdctl(ldr.endpoint, "member", "remove", "1234")
        self.assertNotEqual(r.rc, 0)
        self.assertIn("etcdserver: member not found", r.stderr)
        self.assert_hashkv_equal()


    def test_reconfig_refused_when_it_would_lose_quorum(self):
        """etcd's strict reconfiguration check (on by default): with 1 of 3 members down,
        adding a voter (4 voters, 2 started < quorum 3) or removing a started member
        (2 voters, 1 started) is refused with `etcdserver: unhealthy cluster`, and the
        membership is unchanged. Accepting either loses the quorum for good."""
        c = self.cluster
        ldr = c.leader()
        down, up = c.followers(ldr)
        before = sorted(x["ID"] for x in self.members_json(ldr))
        c.kill9(down)
        r = etcdctl(ldr.endpoint, "--command-timeout=5s", "member", "add", "m4",
                    "--peer-urls=http://127.0.0.1:%d" % harness.free_port(), timeout=30)
        add = r
        r = etcdctl(ldr.endpoint, "--command-timeout=5s", "member", "remove", up.member_id,
                    timeout=30)
        remove = r
        after = None
        try:
            after = sorted(x["ID"] for x in self.members_json(up))
            alive = etcdctl(ldr.endpoint, "--command-timeout=5s", "put", "/rc/alive", "yes")
        finally:
            c.restart(down, wait=False)
        self.assertNotEqual(add.rc, 0, "voter added with 1 of 3 members down: %r" % add)
        self.assertIn("etcdserver: unhealthy cluster", add.stderr)
        self.assertNotEqual(remove.rc, 0, "started member removed with 1 of 3 down: %r" % remove)
        self.assertIn("etcdserver: unhealthy cluster", remove.stderr)
        self.assertEqual(after, before, "membership changed by a refused reconfiguration")
        self.assertEqual(alive.rc, 0, "no write possible after the refused reconfiguration: %r"
                         % alive)
        c.wait_healthy(timeout=20)
        self.assert_hashkv_equal()


class FiveMembers(ClusterCase):
    def setUp(self):
        self.cluster = Cluster(5, label="c5").start()
        self.addCleanup(self.cluster.cleanup)

    def test_two_down_then_back(self):
        c = self.cluster
        ldr = c.leader()
        # kill the leader and one follower: 3 of 5 remain, a quorum
        f = c.followers(ldr)[0]
        c.kill9(ldr)
        c.kill9(f)
        t0 = time.monotonic()
        new = c.wait_leader(timeout=30)
        el = time.monotonic() - t0
        self.assertLess(el, NEW_LEADER_BOUND_S, "5 members, 2 down: leader after %.1fs" % el)
        for i, m in enumerate(c.live()):
            self.ctl_ok(m, "put", "/five/%d" % i, "v%d" % i)
        for m in c.live():
            for i in range(3):
                self.assertEqual(self.get_value(m, "/five/%d" % i), "v%d" % i)
        c.restart(ldr)
        c.restart(f)
        for m in (ldr, f):
            self.assertEqual(self.get_value(m, "/five/2"), "v2")
        self.assert_hashkv_equal()


class SnapshotCatchUp(ClusterCase):
    """A follower behind the leader's compacted log gets a copy of the state (issue 4):
    --snapshot-count 100 and 20 catch-up entries make the leader cut its log often."""

    @classmethod
    def setUpClass(cls):
        cls.is_etcd = os.path.basename(harness.KEELSON_BIN) == "etcd"
        args = ["--snapshot-count=100"]
        if not cls.is_etcd:  # etcd 3.4 keeps 5000 entries, without a flag
            args.append("--experimental-snapshot-catchup-entries=20")
        cls.cluster = Cluster(3, label="snap", extra_args=args)
        cls.cluster.start()

    @classmethod
    def tearDownClass(cls):
        cls.cluster.cleanup()

    def log_text(self, m):
        with open(m.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def assert_snapshot_installed(self, ldr, f):
        if self.is_etcd:
            return
        poll(lambda: "installed a database snapshot" in self.log_text(f), 20,
             what="snapshot installed on %s" % f.name)
        self.assertIn("sent a database snapshot", self.log_text(ldr))

    def test_1_restarted_follower_gets_snapshot(self):
        c = self.cluster
        ldr = c.leader()
        f = c.followers(ldr)[0]
        lease = None
        self.ctl_ok(ldr, "user", "add", "snapuser:pw")
        r = self.ctl_ok(ldr, "lease", "grant", "600")
        lease = re.match(r"lease ([0-9a-f]+) granted", r.stdout).group(1)
        c.kill9(f)
        cl = etcd3_client(ldr)
        try:
            for i in range(400):
                cl.put("/snap/%04d" % i, "v%d" % i)
            for i in range(0, 400, 4):
                cl.delete("/snap/%04d" % i)
        finally:
            cl.close()
        self.ctl_ok(ldr, "put", "/snap/leased", "x", "--lease=" + lease)
        rev = ldr.status()["header"]["revision"]
        self.ctl_ok(ldr, "compaction", str(rev - 50))
        c.restart(f)
        self.assert_snapshot_installed(ldr, f)
        poll(lambda: self.get_value(f, "/snap/0399", serializable=True) == "v399", 20,
             what="restarted follower caught up")
        r = self.ctl_ok(f, "get", "/snap/", "--prefix", "--keys-only", "--consistency=s")
        self.assertEqual(len([x for x in r.stdout.splitlines() if x]), 301)
        self.assertIn(lease, self.ctl_ok(f, "lease", "list").stdout)
        self.assertIn("snapuser", self.ctl_ok(f, "user", "list").stdout)
        self.assertEqual(len(self.members_json(f)), 3)
        # the member keeps serving writes and linearizable reads after the install
        self.ctl_ok(f, "put", "/snap/after", "y")
        self.assertEqual(self.get_value(f, "/snap/after"), "y")
        self.assert_hashkv_equal()
        # and restarts from the installed state
        c.restart(f)
        self.assertEqual(self.get_value(f, "/snap/after", serializable=True), "y")
        self.assert_hashkv_equal()

    def test_3_killed_during_install(self):
        """kill -9 at random moments while a follower receives and installs a snapshot: it
        always restarts as itself (its own member id, never the sender's) and catches up."""
        import random
        c = self.cluster
        ldr = c.leader()
        f = c.followers(ldr)[0]
        own_id = f.status()["header"]["member_id"]
        rnd = random.Random(int(os.environ.get("KEELSON_SNAP_KILL_SEED", "7")))
        for round_ in range(4):
            c.kill9(f)
            cl = etcd3_client(ldr)
            try:
                for i in range(150):
                    cl.put("/sk/%d/%d" % (round_, i), "x" * 2000)
            finally:
                cl.close()
            c.restart(f, wait=False)
            time.sleep(rnd.uniform(0.05, 0.6))
            c.kill9(f)
        c.restart(f)
        self.assertEqual(f.status()["header"]["member_id"], own_id)
        poll(lambda: self.get_value(f, "/sk/3/149", serializable=True) == "x" * 2000, 20,
             what="follower caught up after the kills")
        self.assertEqual(len(self.members_json(f)), 3)
        self.assert_hashkv_equal()

    def test_2_watch_across_install(self):
        """A watcher on a paused follower sees every event once the follower catches up by
        snapshot: the store is replaced under it, and it replays from the new one."""
        c = self.cluster
        ldr = c.leader()
        f = c.followers(ldr)[0]
        start_rev = ldr.status()["header"]["revision"] + 1
        # 25 MB while f is stopped: more than the leader queues for a peer (16 MiB), so
        # messages are dropped and f needs the state, not the log, when it wakes up.
        n = 400
        pad = "x" * 65536
        p, events, done = self.watch_json(f, n, "/sw/", "--prefix")
        try:
            time.sleep(0.5)  # the watch is created before the pause
            installs = self.log_text(f).count("installed a database snapshot")
            c.pause(f)
            try:
                cl = etcd3_client(ldr)
                try:
                    for i in range(n):
                        cl.put("/sw/%d" % (i % 11), pad + "v%d" % i)
                finally:
                    cl.close()
            finally:
                c.resume(f)
            if not self.is_etcd:
                poll(lambda: self.log_text(f).count("installed a database snapshot") > installs,
                     20, what="a second snapshot install")
            done.wait(30)
        finally:
            p.kill()
            p.wait()
        import base64
        vals = [base64.b64decode(e["kv"]["value"]).decode()[len(pad):] for e in events]
        self.assertEqual(vals, ["v%d" % i for i in range(n)], "events missing or out of order")
        revs = [e["kv"]["mod_revision"] for e in events]
        self.assertEqual(revs, list(range(start_rev, start_rev + n)))
        self.assert_hashkv_equal()


if __name__ == "__main__":
    unittest.main()
