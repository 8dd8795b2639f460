"""Leases on a 3-member cluster (issue 6), with cluster.py's short timings (heartbeat 50 ms,
election timeout 500 ms):

  - a leader killed (kill -9) while clients keep leases alive, one through a follower, one
    through every endpoint starting with the leader: the keys survive the kill and the
    election, and go once the keep-alives stop (within the TTL and a few election timeouts);
  - with --experimental-enable-lease-checkpoint (interval 1 s): a lease's remaining TTL
    survives a leader change instead of starting over, and the lease expires on time;
  - followers ask the leader, as etcd's do: LeaseTimeToLive on a follower answers the
    leader's remaining TTL (also right after a renewal the follower never saw); a keep-alive
    sent to a follower renews on the leader and answers the leader's TTL, on one stream
    across a leader change too; with no leader (the other two members paused) it ends with
    etcd's Unavailable "etcdserver: no leader" after etcd's request timeout, and works again
    once they are back.

  /usr/bin/python3 tests/integration/run.py test_lease_cluster
  KEELSON_BIN=/usr/bin/etcd /usr/bin/python3 tests/integration/run.py test_lease_cluster
      (the oracle runs the first; etcd 3.4 has no checkpoint interval flag)
"""

import json
import os
import queue
import re
import subprocess
import time
import unittest

import grpc
from etcd3.etcdrpc import rpc_pb2 as pb, rpc_pb2_grpc as pbg

import harness
from harness import etcdctl, poll
import cluster as clusterlib
from cluster import Cluster

ELECTION_S = clusterlib.ELECTION_MS / 1000.0


class KeepAlive:
    """`etcdctl lease keep-alive ID` against endpoints, in the background."""

    def __init__(self, endpoints, lid):
        self.proc = subprocess.Popen(
            [harness.ETCDCTL_BIN, "--endpoints=" + endpoints, "lease", "keep-alive", lid],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            env=harness.clean_env({"ETCDCTL_API": "3"}))

    def running(self):
        return self.proc.poll() is None

    def stop(self):
        if self.running():
            self.proc.kill()
        out, err = self.proc.communicate(timeout=10)
        return out.decode(errors="replace"), err.decode(errors="replace")


class LeaseClusterCase(unittest.TestCase):
    extra_args = ()

    @classmethod
    def setUpClass(cls):
        cls.cluster = Cluster(3, label=cls.__name__.lower()[:10],
                              extra_args=list(cls.extra_args)).start()

    @classmethod
    def tearDownClass(cls):
        cls.cluster.cleanup()

    def ctl_ok(self, m, *args, **kw):
        r = etcdctl(m.endpoint, *args, **kw)
        self.assertEqual(r.rc, 0, "etcdctl %s on %s: %r" % (" ".join(args), m.name, r))
        return r

    def grant(self, m, ttl):
        r = self.ctl_ok(m, "lease", "grant", str(ttl))
        mo = re.match(r"lease ([0-9a-f]+) granted with TTL\((\d+)s\)", r.stdout)
        self.assertTrue(mo, r.stdout)
        return mo.group(1)

    def value(self, m, key):
        """A serializable read of key on m alone ("" if absent): answers during an election."""
        r = etcdctl(m.endpoint, "get", key, "--print-value-only", "--consistency=s",
                    "--command-timeout=3s", timeout=10)
        self.assertEqual(r.rc, 0, r)
        return r.stdout.strip()

    def timetolive(self, m, lid):
        r = self.ctl_ok(m, "lease", "timetolive", lid, "-w", "json")
        return json.loads(r.stdout)["ttl"]

    def heal(self, killed):
        """Restart the killed member; every member converges with the same HashKV."""
        c = self.cluster
        c.restart(killed)
        c.wait_leader(timeout=20)
        deadline = time.monotonic() + 30
        while True:
            _, rev = c.wait_converged(timeout=max(1, deadline - time.monotonic()))
            hs = c.hashkv(rev=rev)
            if len(set(hs.values())) == 1:
                return
            if time.monotonic() > deadline:
                self.fail("HashKV differs across members: %r" % hs)
            time.sleep(0.2)


class LeaderKill(LeaseClusterCase):

    def test_keys_survive_leader_kill_while_kept_alive(self):
        c = self.cluster
        ldr = c.leader()
        f1, f2 = c.followers(ldr)
        ttl = 3
        a = self.grant(f1, ttl)
        b = self.grant(ldr, ttl)
        d = self.grant(ldr, ttl)
        self.ctl_ok(f2, "put", "/lk/a", "A", "--lease=" + a)
        self.ctl_ok(f1, "put", "/lk/b", "B", "--lease=" + b)
        self.ctl_ok(f1, "put", "/lk/d", "D", "--lease=" + d)
        keys = ("/lk/a", "/lk/b", "/lk/d")
        # a: through a follower that survives; b: every endpoint, the leader first, so its
        # stream may start on the member about to die and must move; d: the leader alone,
        # then, once it is dead, a new client through the member that does not lead (whose
        # own view of d is a TTL old: only the leader saw d's keep-alives)
        kas = {a: KeepAlive(f1.endpoint, a),
               b: KeepAlive(",".join(m.endpoint for m in (ldr, f1, f2)), b),
               d: KeepAlive(ldr.endpoint, d)}
        try:
            time.sleep(ttl + 1.5)
            for lid, k in kas.items():
                self.assertTrue(k.running(), "keep-alive of %s exited before the kill" % lid)
            t_kill = time.monotonic()
            c.kill9(ldr)
            new = c.wait_leader(timeout=10 * ELECTION_S + 5, members=[f1, f2])
            other = f2 if new is f1 else f1
            print("    [lease] new leader %s %.1fs after the kill" % (
                new.name, time.monotonic() - t_kill))
            kas[d].stop()
            kas[d] = KeepAlive(other.endpoint, d)
            # 3 TTLs after the kill: every key stays on both live members
            while time.monotonic() - t_kill < 3 * ttl:
                for m in (f1, f2):
                    vals = tuple(self.value(m, k) for k in keys)
                    self.assertEqual(vals, ("A", "B", "D"), "%s: a kept-alive lease's key "
                                     "vanished %.1fs after the leader's kill" % (
                                         m.name, time.monotonic() - t_kill))
                for lid, k in kas.items():
                    if not k.running():
                        self.fail("keep-alive of %s exited (status %s) %.1fs after the "
                                  "leader's kill: %r" % (lid, k.proc.returncode,
                                                         time.monotonic() - t_kill, k.stop()))
                time.sleep(0.3)
            for lid in kas:
                self.assertGreater(self.timetolive(new, lid), 0)
        finally:
            outs = [k.stop() for k in kas.values()]
        t_stop = time.monotonic()
        for out, err in outs:
            self.assertIn("keepalived with TTL(%d)" % ttl, out, err)
            self.assertNotIn("expired", out + err)
        # the keep-alives stopped: the keys go within the TTL and a few election timeouts
        bound = ttl + 6 * ELECTION_S + 1.5
        poll(lambda: all(self.value(m, k) == "" for m in (f1, f2) for k in keys),
             bound, what="keys of leases no longer kept alive gone from both members")
        gone = time.monotonic() - t_stop
        print("    [lease] keys gone %.1fs after the keep-alives stopped (TTL %ds)" % (gone, ttl))
        for lid in kas:
            r = self.ctl_ok(new, "lease", "timetolive", lid)
            self.assertIn("already expired", r.stdout)
        self.heal(ldr)


CHECKPOINT_ARGS = ["--experimental-enable-lease-checkpoint",
                   "--experimental-lease-checkpoint-interval", "1s"]


class CheckpointLeaderChange(LeaseClusterCase):
    extra_args = CHECKPOINT_ARGS

    @classmethod
    def setUpClass(cls):
        if os.path.basename(harness.KEELSON_BIN) == "etcd":
            raise unittest.SkipTest("etcd 3.4 has no --experimental-lease-checkpoint-interval")
        super().setUpClass()

    def test_remaining_ttl_survives_leader_change(self):
        c = self.cluster
        ldr = c.leader()
        ttl = 16
        t_grant = time.monotonic()
        lid = self.grant(ldr, ttl)
        self.ctl_ok(ldr, "put", "/cp/k", "v", "--lease=" + lid)
        # Remaining TTLs only shrink with time: 6 s go by (6 checkpoints, 1 s apart).
        time.sleep(6)
        elapsed = time.monotonic() - t_grant
        c.kill9(ldr)
        f1, f2 = [m for m in c.members if m is not ldr]
        new = c.wait_leader(timeout=10 * ELECTION_S + 5, members=[f1, f2])
        got = self.timetolive(new, lid)
        since_grant = time.monotonic() - t_grant
        # From the last checkpoint (at most one interval old) plus the election extension;
        # without checkpoints the new leader would give the full TTL again (~16).
        print("    [checkpoint] TTL %d s on the new leader, %.1f s into a %d s lease"
              % (got, elapsed, ttl))
        self.assertLessEqual(got, ttl - elapsed + ELECTION_S + 1.5,
                             "the new leader did not start the lease from its checkpoint")
        self.assertGreaterEqual(got, ttl - since_grant - 2)
        self.assertEqual(self.value(new, "/cp/k"), "v")
        # ...and the lease ends near its original deadline, not a full TTL after the kill
        poll(lambda: self.value(new, "/cp/k") == "", ttl + 8, what="key of the lease gone")
        gone = time.monotonic() - t_grant
        print("    [checkpoint] key gone %.1f s after the grant (TTL %d s)" % (gone, ttl))
        self.assertLess(gone, ttl + 5, "the lease outlived its deadline by a leader change")
        self.heal(ldr)


class KeepAliveStream:
    """One LeaseKeepAlive gRPC stream to a member; send() one request, get its answer."""

    def __init__(self, member, timeout=60):
        self.ch = grpc.insecure_channel(member.endpoint)
        self.q = queue.Queue()
        self.it = pbg.LeaseStub(self.ch).LeaseKeepAlive(iter(self.q.get, None), timeout=timeout)

    def ask(self, lid):
        """The response to a keep-alive of lid, or the grpc.RpcError that ended the stream."""
        self.q.put(pb.LeaseKeepAliveRequest(ID=lid))
        try:
            return next(self.it)
        except grpc.RpcError as e:
            return e

    def close(self):
        self.q.put(None)
        self.ch.close()


class FollowerForwarding(LeaseClusterCase):
    """Followers ask the leader (etcd's LeaseRenew / LeaseTimeToLive forwarding)."""

    def ttl_json(self, m, lid, keys=False):
        args = ["lease", "timetolive", lid, "-w", "json"] + (["--keys"] if keys else [])
        return json.loads(self.ctl_ok(m, *args).stdout)

    def test_follower_timetolive_is_the_leaders(self):
        c = self.cluster
        ldr = c.leader()
        f1, f2 = c.followers(ldr)
        lid = self.grant(ldr, 20)
        self.ctl_ok(ldr, "put", "/fw/k1", "v", "--lease=" + lid)
        self.ctl_ok(ldr, "put", "/fw/k2", "v", "--lease=" + lid)
        time.sleep(3.2)
        # The renewal reaches the leader alone: a follower that answered from its own view
        # would still count down from the grant (~16 s), the leader says ~20.
        self.assertIn("keepalived with TTL(20)", self.ctl_ok(ldr, "lease", "keep-alive", "--once", lid).stdout)
        lead = self.ttl_json(ldr, lid, keys=True)
        for f in (f1, f2):
            got = self.ttl_json(f, lid, keys=True)
            self.assertEqual(got["granted-ttl"], 20)
            self.assertGreaterEqual(got["ttl"], 18, "%s answered %r, the leader %r" % (f.name, got, lead))
            self.assertLessEqual(abs(got["ttl"] - lead["ttl"]), 1, (got, lead))
            self.assertEqual(sorted(got["keys"]), sorted(lead["keys"]))
            self.assertEqual(len(got["keys"]), 2)
            # the header is the follower's own, as etcd's LeaseServer fills it
            self.assertEqual(got["cluster_id"], lead["cluster_id"])
            self.assertNotEqual(got["member_id"], lead["member_id"])
        # an unknown lease through a follower: TTL -1, as on the leader
        r = self.ctl_ok(f1, "lease", "timetolive", "1234abcd")
        self.assertIn("already expired", r.stdout)
        self.ctl_ok(ldr, "lease", "revoke", lid)

    def test_keepalive_via_follower_renews_on_leader(self):
        c = self.cluster
        ldr = c.leader()
        f1, f2 = c.followers(ldr)
        lid = self.grant(ldr, 20)
        time.sleep(3.2)
        s = KeepAliveStream(f1)
        try:
            r = s.ask(int(lid, 16))
            self.assertNotIsInstance(r, grpc.RpcError, r)
            self.assertEqual((r.ID, r.TTL), (int(lid, 16), 20))
            self.assertGreaterEqual(self.timetolive(ldr, lid), 19)
            # a lease the leader does not know: TTL 0, and the stream goes on
            r = s.ask(0x1234abcd)
            self.assertNotIsInstance(r, grpc.RpcError, r)
            self.assertEqual(r.TTL, 0)
            # the same stream after a leader change: to the new leader
            new = f2
            self.ctl_ok(ldr, "move-leader", "%x" % int(self.member_id(new), 16))
            c.wait_leader(timeout=10, members=[new])
            time.sleep(3.2)
            r = s.ask(int(lid, 16))
            self.assertNotIsInstance(r, grpc.RpcError, r)
            self.assertEqual(r.TTL, 20)
            self.assertGreaterEqual(self.timetolive(new, lid), 19)
        finally:
            s.close()
        # and through the member that led before, now a follower
        s = KeepAliveStream(ldr)
        try:
            time.sleep(1.2)
            r = s.ask(int(lid, 16))
            self.assertNotIsInstance(r, grpc.RpcError, r)
            self.assertEqual(r.TTL, 20)
            self.assertGreaterEqual(self.timetolive(new, lid), 19)
        finally:
            s.close()
        self.ctl_ok(new, "lease", "revoke", lid)

    def test_one_shot_keepalive_via_follower(self):
        """A client that sends one keep-alive and half-closes at once (python-etcd3's
        refresh) still gets the leader's answer through a follower."""
        import etcd3
        c = self.cluster
        ldr = c.leader()
        f1 = c.followers(ldr)[0]
        lid = self.grant(ldr, 20)
        for _ in range(5):
            resp = pbg.LeaseStub(grpc.insecure_channel(f1.endpoint)).LeaseKeepAlive(
                iter([pb.LeaseKeepAliveRequest(ID=int(lid, 16))]), timeout=15)
            got = list(resp)
            self.assertEqual([(r.ID, r.TTL) for r in got], [(int(lid, 16), 20)])
        cl = etcd3.client(host="127.0.0.1", port=f1.client_port, timeout=15)
        self.assertEqual(list(cl.refresh_lease(int(lid, 16)))[0].TTL, 20)
        # the half-close surely comes first while the leader is paused for a moment
        ldr.pause()
        try:
            resp = pbg.LeaseStub(grpc.insecure_channel(f1.endpoint)).LeaseKeepAlive(
                iter([pb.LeaseKeepAliveRequest(ID=int(lid, 16))]), timeout=15)
            time.sleep(0.5)
        finally:
            ldr.resume()
        self.assertEqual([(r.ID, r.TTL) for r in resp], [(int(lid, 16), 20)])
        self.ctl_ok(ldr, "lease", "revoke", lid)

    def member_id(self, m):
        st = json.loads(self.ctl_ok(m, "endpoint", "status", "-w", "json").stdout)
        return "%x" % st[0]["Status"]["header"]["member_id"]

    def test_keepalive_without_leader_fails_then_recovers(self):
        c = self.cluster
        ldr = c.leader()
        f1, f2 = c.followers(ldr)
        lid = self.grant(ldr, 30)
        # etcd's request timeout: 5 s plus two election timeouts
        req_timeout = 5 + 2 * ELECTION_S
        try:
            c.pause(ldr)
            c.pause(f2)
            # Forwarded to the leader f1 still knows, which never answers: timed out.
            s = KeepAliveStream(f1)
            try:
                t0 = time.monotonic()
                r = s.ask(int(lid, 16))
                waited = time.monotonic() - t0
            finally:
                s.close()
            self.assertIsInstance(r, grpc.RpcError, r)
            self.assertEqual((r.code(), r.details()),
                             (grpc.StatusCode.UNAVAILABLE, "etcdserver: request timed out"))
            print("    [forward] leader paused: timed out after %.1fs (request timeout %.1fs)"
                  % (waited, req_timeout))
            self.assertGreater(waited, req_timeout - 1)
            self.assertLess(waited, req_timeout + 3)
            # Once f1 knows no leader, it waits for one: no leader.
            poll(lambda: (lambda st: st is not None and st.get("leader", 0) == 0)(f1.status()),
                 10 * ELECTION_S + 5, what="f1 without a leader")
            s = KeepAliveStream(f1)
            try:
                t0 = time.monotonic()
                r = s.ask(int(lid, 16))
                waited = time.monotonic() - t0
            finally:
                s.close()
            self.assertIsInstance(r, grpc.RpcError, r)
            self.assertEqual((r.code(), r.details()), (grpc.StatusCode.UNAVAILABLE, "etcdserver: no leader"))
            print("    [forward] no leader after %.1fs" % waited)
            self.assertGreater(waited, req_timeout - 1)
            self.assertLess(waited, req_timeout + 3)
        finally:
            c.resume(ldr)
            c.resume(f2)
        c.wait_leader(timeout=20)

        def once():
            s = KeepAliveStream(f1, timeout=10)
            try:
                r = s.ask(int(lid, 16))
                return ("failed", r) if isinstance(r, grpc.RpcError) else r.TTL
            finally:
                s.close()
        ttl = poll(once, 20, what="a keep-alive through the follower once a leader is back")
        self.assertEqual(ttl, 30)


if __name__ == "__main__":
    unittest.main()
