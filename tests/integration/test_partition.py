"""Network partitions between members (issue 4's Tests, issue 10): every peer link passes
through a test-controlled proxy (netproxy.py, Cluster(proxy=True)) that drops a pair's
messages one way or both, so the members stay up and only the network fails.

- a follower isolated both ways answers linearizable reads with a time-out, as etcd does
  (`Error: context deadline exceeded` with --command-timeout), serves --consistency=s reads
  of its stale state, and after the heal has every write made meanwhile;
- an isolated leader steps down (check-quorum), the majority elects a new one and keeps
  taking writes; the old leader's side takes none;
- a one-way drop leader -> follower does not disturb the cluster (pre-vote: the deaf
  follower neither raises the term nor wins an election) and the follower catches up after;
- a 2|3 split of a 5-member cluster with the leader on the 2 side: the 3 side elects and
  works, the 2 side refuses writes and linearizable reads.
Each test heals, then checks that every acknowledged write is on every member and that HashKV
agrees.

  /usr/bin/python3 tests/integration/run.py test_partition
  KEELSON_BIN=/usr/bin/etcd /usr/bin/python3 tests/integration/run.py test_partition  # oracle

etcd 3.4 runs with --pre-vote=true (its default from 3.5 on; Keelson always pre-votes).
"""

import os
import time
import unittest

import harness
from harness import etcdctl, poll
import cluster as clusterlib
from cluster import Cluster

ELECTION_S = clusterlib.ELECTION_MS / 1000.0
ARGS = ("--pre-vote=true",)
DEADLINE_MSG = "context deadline exceeded"
IS_ETCD = os.path.basename(harness.KEELSON_BIN) == "etcd"


class PartitionCase(unittest.TestCase):
    cluster = None

    def ctl(self, m, *args, timeout=20):
        return etcdctl(m.endpoint, "--dial-timeout=2s", *args, timeout=timeout)

    def put_ok(self, m, key, value, acked):
        r = self.ctl(m, "--command-timeout=5s", "put", key, value)
        self.assertEqual(r.rc, 0, "write through %s refused: %r" % (m.name, r))
        acked[key] = value

    def assert_refused_write(self, m, key):
        r = self.ctl(m, "--command-timeout=2s", "put", key, "never")
        self.assertNotEqual(r.rc, 0, "%s acknowledged a write without a quorum: %r" % (
            m.name, r))

    def assert_no_linearizable_read(self, m, key):
        """etcd answers a linearizable read on a member cut off from the quorum with a
        time-out: `Error: context deadline exceeded` (never a stale value)."""
        r = self.ctl(m, "--command-timeout=2s", "get", key)
        self.assertNotEqual(r.rc, 0, "%s served a linearizable read without a quorum: %r" % (
            m.name, r))
        self.assertIn(DEADLINE_MSG, r.stderr, r)

    def serializable(self, m, prefix):
        r = self.ctl(m, "--command-timeout=5s", "get", "--consistency=s", "--prefix", prefix)
        self.assertEqual(r.rc, 0, r)
        lines = r.stdout.splitlines()
        return dict(zip(lines[0::2], lines[1::2]))

    def has_all(self, m, prefix, acked):
        """True if m serves every acknowledged write (else the differences, for the log)."""
        got = self.serializable(m, prefix)
        diff = {k: (v, got.get(k)) for k, v in acked.items() if got.get(k) != v}
        return True if not diff else ("missing", diff, "extra", set(got) - set(acked))

    def status(self, m):
        st = m.status()
        self.assertIsNotNone(st, "no endpoint status from %s" % m.name)
        return st

    def leader_id(self, m):
        return "%x" % self.status(m).get("leader", 0)

    def assert_healed(self, c, acked, prefix):
        """After the heal: one leader, every member converged, every acknowledged write on
        every member (serializable reads, so each member answers from its own state), and
        the same HashKV everywhere."""
        c.wait_leader(timeout=20 * ELECTION_S + 10)
        deadline = time.monotonic() + 30
        while True:
            idx, rev = c.wait_converged(timeout=30)
            hs = c.hashkv(rev=rev)
            if len(set(hs.values())) == 1:
                break
            if time.monotonic() > deadline:
                self.fail("HashKV differs at revision %d: %r" % (rev, hs))
            time.sleep(0.2)
        for m in c.members:
            got = self.serializable(m, prefix)
            missing = {k: v for k, v in acked.items() if got.get(k) != v}
            self.assertEqual(missing, {}, "acknowledged writes missing or wrong on %s: %r" % (
                m.name, {k: got.get(k) for k in missing}))


class ThreeMembers(PartitionCase):

    @classmethod
    def setUpClass(cls):
        cls.cluster = Cluster(3, label="part", proxy=True, extra_args=ARGS).start()

    @classmethod
    def tearDownClass(cls):
        if cls.cluster is not None:
            cls.cluster.cleanup()

    def setUp(self):
        self.addCleanup(self.cluster.proxy.heal)

    def test_isolated_follower(self):
        c = self.cluster
        ldr = c.leader()
        f = c.followers(ldr)[0]
        acked = {}
        self.put_ok(ldr, "/p1/k", "old", acked)
        c.wait_converged()
        c.proxy.isolate(f.name)
        # at once, and after it has surely lost its leader (two election timeouts)
        self.assert_no_linearizable_read(f, "/p1/k")
        time.sleep(2 * ELECTION_S)
        self.assert_no_linearizable_read(f, "/p1/k")
        self.assert_refused_write(f, "/p1/minority")
        other = [m for m in c.members if m not in (ldr, f)][0]
        for i in range(10):   # the majority keeps working, through either of its members
            self.put_ok(ldr if i % 2 else other, "/p1/w%02d" % i, "v%d" % i, acked)
        self.put_ok(other, "/p1/k", "new", acked)
        # the isolated follower serves its own (stale) state to serializable reads
        self.assertEqual(self.serializable(f, "/p1/"), {"/p1/k": "old"})
        c.proxy.heal()
        # it catches up: every write made meanwhile becomes readable from it
        poll(lambda: self.has_all(f, "/p1/", acked), 20, 0.1,
             "the healed follower has every write")
        r = self.ctl(f, "--command-timeout=5s", "get", "/p1/k", "--print-value-only")
        self.assertEqual((r.rc, r.stdout), (0, "new\n"), r)
        self.assert_healed(c, acked, "/p1/")

    def test_cut_links_then_slow_links(self):
        """Connections of a follower refused and closed (not silently dropped) for a while:
        it redials with backoff and catches up once the links are back. Then its links are
        slow (100 ms each way): it still forwards writes and serves linearizable reads
        that see the latest write made elsewhere."""
        c = self.cluster
        ldr = c.leader()
        f = c.followers(ldr)[0]
        acked = {}
        c.proxy.isolate(f.name, mode="cut")
        for i in range(5):
            self.put_ok(ldr, "/p6/w%d" % i, "v%d" % i, acked)
        self.assert_no_linearizable_read(f, "/p6/w0")
        time.sleep(2 * ELECTION_S)
        c.proxy.heal()
        poll(lambda: self.has_all(f, "/p6/", acked), 20, 0.1,
             "the follower has every write after its links are back")
        for other in c.members:
            if other is not f:
                c.proxy.set(f.name, other.name, "delay", 100)
                c.proxy.set(other.name, f.name, "delay", 100)
        for i in range(3):
            self.put_ok(f, "/p6/slow%d" % i, "s%d" % i, acked)
            self.put_ok(ldr, "/p6/k", "latest%d" % i, acked)
            r = self.ctl(f, "--command-timeout=5s", "get", "/p6/k", "--print-value-only")
            self.assertEqual((r.rc, r.stdout), (0, "latest%d\n" % i), r)
        c.proxy.heal()
        self.assert_healed(c, acked, "/p6/")

    def test_timed_out_minority_write_not_applied_later(self):
        """A write sent to an isolated member times out on the client (etcdctl's
        --command-timeout, i.e. the gRPC deadline). etcd abandons the proposal with the
        client's context, so after the heal the write is not there; a server that parks it
        and proposes it once a leader reappears turns a refused write into an accepted one,
        seconds after the client was told it failed."""
        c = self.cluster
        ldr = c.leader()
        f = c.followers(ldr)[0]
        c.proxy.isolate(f.name)
        time.sleep(2 * ELECTION_S)   # f has lost its leader
        self.assert_refused_write(f, "/p5/minority")
        c.proxy.heal()
        acked = {}
        self.put_ok(ldr, "/p5/after", "x", acked)
        self.assert_healed(c, acked, "/p5/")
        # give a parked proposal time to get through (the server's own request time-out is
        # 5 s + 2 election timeouts), then look on every member
        time.sleep(1.0)
        c.wait_converged()
        for m in c.members:
            self.assertNotIn("/p5/minority", self.serializable(m, "/p5/"),
                             "%s: the write that timed out was applied after the heal" % m.name)

    def test_isolated_leader_steps_down(self):
        c = self.cluster
        old = c.leader()
        old_id = old.member_id
        others = [m for m in c.members if m is not old]
        acked = {}
        self.put_ok(old, "/p2/before", "x", acked)
        c.wait_converged()
        c.proxy.isolate(old.name)
        t0 = time.monotonic()
        new = c.wait_leader(timeout=20 * ELECTION_S, members=others, exclude=(old,))
        took = time.monotonic() - t0
        self.assertIsNot(new, old)
        # check-quorum: the old leader notices it no longer hears a majority and steps down
        poll(lambda: self.leader_id(old) != old_id, 10 * ELECTION_S, 0.1,
             "the isolated leader %s steps down" % old.name)
        for i, m in enumerate(others * 3):
            self.put_ok(m, "/p2/w%d" % i, "v%d" % i, acked)
        self.assert_refused_write(old, "/p2/minority")
        self.assert_no_linearizable_read(old, "/p2/before")
        for m in others:   # the refused write is not visible on the majority side
            r = self.ctl(m, "--command-timeout=5s", "get", "/p2/minority")
            self.assertEqual((r.rc, r.stdout), (0, ""), r)
        c.proxy.heal()
        self.assert_healed(c, acked, "/p2/")
        self.assertLess(took, 20 * ELECTION_S)

    def test_one_way_drop_leader_to_follower(self):
        """Messages leader -> follower are lost, follower -> leader still pass. The deaf
        follower pre-votes and loses (its peers still hear the leader), so no term is
        raised, the leader stays, writes keep working; after the heal it catches up."""
        c = self.cluster
        ldr = c.leader()
        f, other = c.followers(ldr)
        term0 = self.status(ldr)["raftTerm"]
        acked = {}
        c.proxy.set(ldr.name, f.name, "drop")
        end = time.monotonic() + 8 * ELECTION_S
        i = 0
        while time.monotonic() < end:
            self.put_ok(ldr if i % 2 else other, "/p3/w%d" % i, "v%d" % i, acked)
            i += 1
            for m in (ldr, other, f):
                st = self.status(m)
                self.assertEqual(st["raftTerm"], term0, "%s raised the term to %s "
                                 "(a partial partition disrupts the cluster)" % (
                                     m.name, st["raftTerm"]))
            self.assertEqual(self.leader_id(ldr), ldr.member_id)
            self.assertEqual(self.leader_id(other), ldr.member_id)
            self.assertNotEqual(self.leader_id(f), f.member_id)
            time.sleep(0.1)
        self.assertGreater(c.proxy.stats().get((ldr.name, f.name), {}).get("dropped", 0), 0,
                           "the proxy dropped nothing: the test tested nothing")
        self.assertLess(len(self.serializable(f, "/p3/")), len(acked))
        c.proxy.heal()
        poll(lambda: self.has_all(f, "/p3/", acked), 20, 0.1,
             "the follower has every write after the heal")
        self.assertEqual(c.leader(), ldr)
        self.assert_healed(c, acked, "/p3/")


class FiveMembers(PartitionCase):

    def test_split_two_three(self):
        """5 members split 2|3, the leader on the 2 side: the 3 side elects a leader and takes
        writes through each of its members; the 2 side refuses writes and linearizable
        reads."""
        c = self.cluster = Cluster(5, label="part5", proxy=True, extra_args=ARGS).start()
        self.addCleanup(c.cleanup)
        ldr = c.leader()
        minority = [ldr, c.followers(ldr)[0]]
        majority = [m for m in c.members if m not in minority]
        acked = {}
        self.put_ok(ldr, "/p4/before", "x", acked)
        c.wait_converged()
        c.proxy.partition([m.name for m in minority], [m.name for m in majority])
        new = c.wait_leader(timeout=20 * ELECTION_S, members=majority, exclude=minority)
        self.assertIn(new, majority)
        poll(lambda: self.leader_id(ldr) != ldr.member_id, 10 * ELECTION_S, 0.1,
             "the old leader on the minority side steps down")
        for i, m in enumerate(majority * 2):
            self.put_ok(m, "/p4/w%d" % i, "v%d" % i, acked)
        for m in minority:
            self.assert_refused_write(m, "/p4/minority-%s" % m.name)
            self.assert_no_linearizable_read(m, "/p4/before")
            self.assertEqual(self.serializable(m, "/p4/"), {"/p4/before": "x"})
        c.proxy.heal()
        self.assert_healed(c, acked, "/p4/")


if __name__ == "__main__":
    unittest.main()
