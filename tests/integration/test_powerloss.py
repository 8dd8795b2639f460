"""Power loss (issue 10): a member loses what it wrote but had not made durable.

test_crash.py kills the process: everything it wrote is still in the page cache, so a
missing fsync never shows. Here the member runs under the shim tests/fault/powerloss.c
(LD_PRELOAD, //tests/fault:libpowerloss.so), which journals every change to a regular file
under its data dir that is not yet durable; after the SIGKILL tests/fault/powerloss_apply.py
rolls back, from that journal, what a power loss may lose: each 4 KiB page written since
its file's last fsync/fdatasync independently (seeded), file sizes, and directory entries
(creations, renames, unlinks) not followed by an fsync of their directory. Round 0 loses
every un-synced change, round 1 none (a plain kill -9), the others a seeded random part.
The module does not care which files the member writes.

Checked after each restart:
  one member: it starts (no corruption, no refusal); every acknowledged put, txn and delete
    is there, at the revision it was acknowledged with; and the history, revision by
    revision (Range at each revision since the last compaction), equals a model
    (kvmodel.py) replaying the acknowledged operations in revision order, any revision
    without one being some operation that was sent but not acknowledged; an acknowledged
    compaction holds. Compactions (and, every other round, defragments) run while the
    clients write, so some power losses hit them.
  three members: a follower, then the leader, loses power while clients write through the
    others; after its restart every member reaches the same HashKV at the same revision,
    and the restarted member serves every acknowledged write.
The tool itself is checked first (ToolSelfTest): a small writer that acknowledges a record
only after fdatasync passes, the same writer without the fdatasync (or without the fsync of
the directory after a rename) is caught.

Environment: KEELSON_POWERLOSS_SEED (default 1; each round's seed is printed),
KEELSON_POWERLOSS_ROUNDS (one-member rounds, default 6; e.g. 200 for a long run),
KEELSON_POWERLOSS_SHIM (default <repo>/bazel-bin/tests/fault/libpowerloss.so; a missing
shim fails the module). With KEELSON_BIN=etcd only the tool's self-test runs: etcd (Go)
makes its system calls without libc, so an LD_PRELOAD shim cannot see them.
"""

import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest

from etcd3 import etcdrpc as rpc
import grpc

import harness
import kvmodel
from cluster import Cluster
from test_crash import Conn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "fault"))
import powerloss_apply  # noqa: E402

SHIM = os.environ.get("KEELSON_POWERLOSS_SHIM") or os.path.join(
    ROOT, "bazel-bin", "tests", "fault", "libpowerloss.so")
SEED = int(os.environ.get("KEELSON_POWERLOSS_SEED", "1"))
ROUNDS = int(os.environ.get("KEELSON_POWERLOSS_ROUNDS", "6"))
NKEYS = 16


IS_ETCD = os.path.basename(harness.KEELSON_BIN) == "etcd"


def need_shim(member=True):
    if member and IS_ETCD:
        raise unittest.SkipTest("etcd (Go) writes without libc: the shim cannot see it")
    if not os.path.isfile(SHIM):
        raise AssertionError("no %s: bazel build //tests/fault:libpowerloss.so "
                             "(or set KEELSON_POWERLOSS_SHIM)" % SHIM)


def mode_of(rnd):
    return "lose" if rnd == 0 else "keep" if rnd == 1 else "random"


def say(msg):
    sys.stdout.write("  " + msg + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------
# the workload: concurrent clients, each op's outcome recorded

class Workload:
    """nclients threads sending puts, txns (two puts) and deletes over NKEYS shared keys
    until stop(). acked: [(revision, op)] of the ops that made a revision; noop_deletes:
    [(revision, key)] of acknowledged deletes of a missing key; unacked: ops that failed or
    timed out (they may or may not have been applied)."""

    def __init__(self, members, seed, tag, nclients=3):
        self.members = members
        self.rng = random.Random(seed)
        self.tag = tag
        self.acked, self.noop_deletes, self.unacked = [], [], []
        self.mu = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.client, args=(i, self.rng.random()),
                                         daemon=True) for i in range(nclients)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def stop(self):
        self.stopping.set()
        for t in self.threads:
            t.join(30)

    def client(self, cid, seed):
        rng = random.Random(seed)
        m = self.members[cid % len(self.members)]
        conn = Conn(m)
        try:
            i = 0
            while not self.stopping.is_set():
                i += 1
                val = ("%s-c%d-%d" % (self.tag, cid, i)).encode()
                key = lambda: b"/pl/k%02d" % rng.randrange(NKEYS)  # noqa: E731
                x = rng.random()
                if x < 0.5:
                    op = ("put", rpc.PutRequest(key=key(), value=val))
                elif x < 0.75:
                    k1 = key()
                    k2 = k1
                    while k2 == k1:
                        k2 = key()
                    op = ("txn", rpc.TxnRequest(success=[
                        rpc.RequestOp(request_put=rpc.PutRequest(key=k1, value=val + b"a")),
                        rpc.RequestOp(request_put=rpc.PutRequest(key=k2, value=val + b"b"))]))
                else:
                    op = ("delete", rpc.DeleteRangeRequest(key=key()))
                try:
                    if op[0] == "put":
                        r = conn.kv.Put(op[1], timeout=5)
                    elif op[0] == "txn":
                        r = conn.kv.Txn(op[1], timeout=5)
                    else:
                        r = conn.kv.DeleteRange(op[1], timeout=5)
                except grpc.RpcError:
                    with self.mu:
                        self.unacked.append(op)
                    self.stopping.wait(0.05)
                    continue
                with self.mu:
                    if op[0] == "delete" and r.deleted == 0:
                        self.noop_deletes.append((r.header.revision, op[1].key))
                    else:
                        self.acked.append((r.header.revision, op))
        finally:
            conn.close()


class History:
    """What the store must hold: the operations at every revision checked so far."""

    def __init__(self):
        self.ops = {}          # revision -> op
        self.verified = 1      # every revision up to this one is identified and checked
        self.compacted = 0     # the highest acknowledged compaction

    def model(self, at_rev=None):
        return kvmodel.replay(sorted(self.ops.items(), key=lambda x: x[0]), at_rev)


class PowerLossCase(unittest.TestCase):

    def arm(self, m, journal, sync_delay_ms=0):
        os.makedirs(m.data_dir, exist_ok=True)   # the shim resolves the dir at its first call
        m.env = {"LD_PRELOAD": SHIM, "POWERLOSS_DIR": m.data_dir,
                 "POWERLOSS_JOURNAL": journal, "POWERLOSS_SYNC_DELAY_MS": str(sync_delay_ms)}

    def power_loss(self, m, journal, mode, seed):
        """SIGKILL, then the simulated loss of what was not durable."""
        m.kill9()
        # LMDB maps lock.mdb shared and writable: its reader table, no data
        s = powerloss_apply.apply(journal, os.path.realpath(m.data_dir), mode, seed, log=say,
                                  allow_mmap=("lock.mdb",))
        self.assertGreater(s["records"], 0, "the shim journalled nothing: is it loaded?")
        return s

    def maintenance(self, m, hist, at, defrag, work):
        """A compaction at the last verified revision at a moment of the round (recorded if
        acknowledged) and, with defrag, defragments until the kill."""
        time.sleep(at)
        try:
            conn = Conn(m)
        except Exception:  # noqa: the member may be gone already
            return
        try:
            if hist.verified > hist.compacted and hist.verified > 1:
                try:
                    conn.kv.Compact(rpc.CompactionRequest(revision=hist.verified,
                                                          physical=True), timeout=10)
                    hist.compacted = hist.verified
                    say("compacted at %d" % hist.verified)
                except grpc.RpcError:
                    pass
            while defrag and not work.stopping.is_set():
                try:
                    conn.maint.Defragment(rpc.DefragmentRequest(), timeout=10)
                except grpc.RpcError:
                    return
                work.stopping.wait(0.2)
        finally:
            conn.close()

    def check_history(self, m, hist, work, what):
        """The member's history from the last verified revision on against the model;
        identifies the revisions of unacknowledged ops. Updates hist."""
        conn = Conn(m)
        try:
            rev = conn.revision()
            compact = max(conn.hashkv(rev)[1], 0)   # -1: never compacted
            self.assertGreaterEqual(compact, hist.compacted,
                                    "%s: acknowledged compaction at %d lost (store: %d)"
                                    % (what, hist.compacted, compact))
            acked = dict(work.acked)
            self.assertEqual(len(acked), len(work.acked), "two acks with one revision")
            lost = sorted(r for r in acked if r > rev)
            if lost:
                self.fail("%s: acknowledged writes lost: store at revision %d, acknowledged "
                          "up to %d (%d lost: %s)" % (what, rev, max(acked), len(lost),
                                                      [(r, acked[r]) for r in lost[:3]]))
            start = max(hist.verified, compact, 1)
            state = hist.model(start)
            if start > 1:
                self.assertEqual(conn.range_all(rev=start), state,
                                 "%s: the keyspace at revision %d changed" % (what, start))
            pool = list(work.unacked)
            noop = {}
            for r, k in work.noop_deletes:
                noop.setdefault(r, []).append(k)
            for r in range(start + 1, rev + 1):
                got = conn.range_all(rev=r)
                cands = [acked[r]] if r in acked else pool
                for op in cands:
                    nxt = dict(state)
                    if kvmodel.apply_op(nxt, r, op) and nxt == got:
                        break
                else:
                    self.fail("%s: revision %d is %s, which is no op %s (model before it: %s)"
                              % (what, r, diff(state, got),
                                 "acknowledged at it: %s" % (acked[r],) if r in acked
                                 else "sent (%d unacknowledged)" % len(pool), state))
                if r not in acked:
                    pool.remove(op)
                hist.ops[r] = op
                state = nxt
                for k in noop.get(r, []):
                    self.assertNotIn(k, state, "%s: acknowledged delete of a missing key %r "
                                     "at %d, the key is there" % (what, k, r))
            self.assertEqual(conn.range_all(), state)
            hist.verified = rev
            return rev
        finally:
            conn.close()


def diff(a, b):
    keys = sorted(set(a) | set(b))
    return {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}


# ---------------------------------------------------------------------------------------

class ToolSelfTest(unittest.TestCase):
    """The shim and the apply tool catch a writer that acknowledges before its data is
    durable: a small Python writer (its os.write/os.fsync go through libc, so through the
    shim) appends records and prints each one once it counts as durable."""

    WRITER = textwrap.dedent("""
        import os, sys
        d, mode = sys.argv[1], sys.argv[2]
        fl = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_DSYNC if mode == "dsync" else 0)
        fd = os.open(os.path.join(d, "log"), fl, 0o600)
        dfd = os.open(d, os.O_RDONLY)
        os.fsync(dfd)
        for i in range(200):
            os.write(fd, b"record %05d\\n" % i)
            if mode not in ("nosync", "dsync"):
                os.fdatasync(fd)
            if i % 50 == 49:
                # a snapshot of the log: written beside, synced, renamed in place
                t = os.open(os.path.join(d, "snap.tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.write(t, b"snapshot %05d\\n" % i)
                os.fsync(t)
                os.close(t)
                os.rename(os.path.join(d, "snap.tmp"), os.path.join(d, "snap"))
                if mode != "nodirsync":
                    os.fsync(dfd)
                print("snap %d" % i, flush=True)
            print("ack %d" % i, flush=True)
        print("done", flush=True)
        import time; time.sleep(60)
    """)

    def shim_sandbox(self):
        """A data dir, a journal path and the environment of a process run under the shim."""
        need_shim(member=False)
        tmp = tempfile.mkdtemp(prefix="powerloss-self-")
        self.addCleanup(subprocess.run, ["rm", "-rf", tmp])
        d = os.path.join(tmp, "data")
        os.makedirs(d)
        journal = os.path.join(tmp, "journal")
        return d, journal, dict(os.environ, LD_PRELOAD=SHIM, POWERLOSS_DIR=d,
                                POWERLOSS_JOURNAL=journal)

    def run_writer(self, mode, loss):
        d, journal, env = self.shim_sandbox()
        p = subprocess.Popen([sys.executable, "-c", self.WRITER, d, mode], env=env,
                             stdout=subprocess.PIPE, text=True)
        acks, snap = -1, -1
        for line in p.stdout:
            if line.startswith("ack "):
                acks = int(line.split()[1])
            elif line.startswith("snap "):
                snap = int(line.split()[1])
            elif line.startswith("done"):
                break
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
        self.assertEqual(acks, 199)
        powerloss_apply.apply(journal, d, loss, 7)
        with open(os.path.join(d, "log"), "rb") as f:
            got = f.read().decode().splitlines()
        snap_got = None
        if os.path.exists(os.path.join(d, "snap")):
            snap_got = open(os.path.join(d, "snap")).read().strip()
        return got, snap_got, snap

    def test_synced_writer_passes(self):
        for loss in ("lose", "random"):
            got, s, snap = self.run_writer("sync", loss)
            self.assertEqual(got, ["record %05d" % i for i in range(200)], loss)
            self.assertEqual(s, "snapshot %05d" % snap)

    def test_writer_without_fdatasync_is_caught(self):
        got, _, _ = self.run_writer("nosync", "lose")
        self.assertLess(len(got), 200, "acknowledged records survived without a sync: "
                        "the tool would not catch a missing fdatasync")
        got, _, _ = self.run_writer("nosync", "random")
        self.assertNotEqual(got, ["record %05d" % i for i in range(200)])

    def test_writer_without_directory_sync_is_caught(self):
        _, s, snap = self.run_writer("nodirsync", "lose")
        self.assertNotEqual(s, "snapshot %05d" % snap,
                            "an un-synced rename survived: the tool would not catch it")

    def test_dsync_writes_are_durable(self):
        for loss in ("lose", "random"):
            got, _, _ = self.run_writer("dsync", loss)
            self.assertEqual(got, ["record %05d" % i for i in range(200)], loss)

    def test_shared_mmap_is_refused(self):
        """Writes through a shared mapping are not journalled: the tool refuses the journal
        rather than pass a power loss it cannot simulate (lock.mdb is let through)."""
        d, journal, env = self.shim_sandbox()
        subprocess.run([sys.executable, "-c", textwrap.dedent('''
            import mmap, os, sys
            fd = os.open(os.path.join(sys.argv[1], "map"), os.O_RDWR | os.O_CREAT, 0o600)
            os.ftruncate(fd, 4096)
            m = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            m[0:5] = b"hello"
        '''), d], env=env, check=True, timeout=30)
        with self.assertRaises(ValueError) as cm:
            powerloss_apply.apply(journal, d, "lose", 1)
        self.assertIn("mapped shared and writable", str(cm.exception))
        powerloss_apply.apply(journal, d, "lose", 1, allow_mmap=("map",))

    def test_keep_changes_nothing(self):
        got, s, snap = self.run_writer("nosync", "keep")
        self.assertEqual(got, ["record %05d" % i for i in range(200)])
        self.assertEqual(s, "snapshot %05d" % snap)


class SingleMember(PowerLossCase):
    """One member, ROUNDS power losses in a row on the same data dir."""

    def test_rounds(self):
        need_shim()
        c = Cluster(1, label="powerloss")
        self.addCleanup(c.cleanup)
        m = c.members[0]
        hist = History()
        jdir = tempfile.mkdtemp(prefix="powerloss-j-", dir=m.tmp)
        # The data dir's files are created by a first start without the shim: a power loss
        # right after a member's first start loses them (FreshMember below, a known bug).
        c.start()
        self.arm(m, os.path.join(jdir, "journal-0"))
        c.restart(m)
        for rnd in range(ROUNDS):
            seed = SEED * 1000 + rnd
            rng = random.Random(seed)
            mode = mode_of(rnd)
            kill_at = rng.uniform(0.8, 2.5)
            defrag = rnd % 2 == 1
            what = "round %d (KEELSON_POWERLOSS_SEED=%d: seed %d, %s)" % (rnd, SEED, seed, mode)
            say("%s: kill at %.2fs%s%s" % (what, kill_at, ", defragments" if defrag else "",
                                           ", syncs 5 ms slower" if rnd % 2 == 1 else ""))
            journal = os.path.join(jdir, "journal-%d" % rnd)
            work = Workload([m], seed, "r%d" % rnd).start()
            maint = threading.Thread(target=self.maintenance,
                                     args=(m, hist, rng.uniform(0, kill_at), defrag, work),
                                     daemon=True)
            maint.start()
            time.sleep(kill_at)
            s = self.power_loss(m, journal, mode, seed)
            work.stop()
            maint.join(30)
            say("%d acknowledged, %d unacknowledged; %d pages rolled back"
                % (len(work.acked) + len(work.noop_deletes), len(work.unacked),
                   s["pages_lost"]))
            self.assertGreater(len(work.acked), 0, "no write acknowledged in the round")
            # every other round the syncs are slow (their windows wider) in the next one
            self.arm(m, os.path.join(jdir, "journal-%d" % (rnd + 1)),
                     sync_delay_ms=5 if rnd % 2 == 0 else 0)
            try:
                c.restart(m)
            except harness.ServerError as e:
                self.fail("%s: the member does not start after the power loss: %s\n%s"
                          % (what, e, m.log_tail(30)))
            rev = self.check_history(m, hist, work, what)
            say("revision %d checked" % rev)

    def test_member_that_skips_syncs_is_caught(self):
        """The checks fail for a member whose syncs do not count (POWERLOSS_DROP_SYNCS:
        the shim records none, as if the member never called fsync/fdatasync)."""
        need_shim()
        c = Cluster(1, label="powerlossd")
        self.addCleanup(c.cleanup)
        m = c.members[0]
        journal = os.path.join(tempfile.mkdtemp(prefix="powerloss-j-", dir=m.tmp), "journal")
        c.start()
        self.arm(m, journal)
        m.env["POWERLOSS_DROP_SYNCS"] = "1"
        c.restart(m)
        work = Workload([m], SEED, "nosync").start()
        time.sleep(1.0)
        self.power_loss(m, journal, "lose", SEED)
        work.stop()
        self.assertGreater(len(work.acked), 0)
        m.env = {}
        try:
            c.restart(m)
        except harness.ServerError:
            return   # refusing to start on a damaged store also counts as caught
        with self.assertRaises(AssertionError) as cm:
            self.check_history(m, History(), work, "member without syncs")
        say("caught: %s" % str(cm.exception).split("\n")[0][:200])

class FreshMember(PowerLossCase):
    """A member's first start creates its data dir and store (member/data.mdb, lock.mdb,
    keelson.lock, keelson-wal/): the files' data is synced at every commit, so their
    directory entries must be made durable too, or a power loss after acknowledged writes
    may take the whole store away (POSIX; a journalling ext4 usually commits the entry with
    the file's first fsync, other file systems and configurations need not). etcd fsyncs
    the parent of its WAL directory after creating it; storage_open fsyncs each directory
    it creates into its parent, and the member dir once the store is open."""

    def test_power_loss_after_first_start(self):
        need_shim()
        c = Cluster(1, label="powerlossf")
        self.addCleanup(c.cleanup)
        m = c.members[0]
        journal = os.path.join(tempfile.mkdtemp(prefix="powerloss-j-", dir=m.tmp), "journal")
        self.arm(m, journal)
        c.start()
        work = Workload([m], SEED, "fresh", nclients=1).start()
        time.sleep(1.0)
        self.power_loss(m, journal, "lose", SEED)
        work.stop()
        self.assertGreater(len(work.acked), 0)
        m.env = {}
        c.restart(m)   # with the store's files gone it starts as a new, empty member
        self.check_history(m, History(), work, "fresh member")


class ThreeMembers(PowerLossCase):
    """A follower, then the leader, loses power while clients write through the others (and
    it compacts and defragments); then a follower that was down loses power while or just after it installs a snapshot."""

    def test_follower_then_leader(self):
        need_shim()
        # a short log, cut often: a member that was down needs a snapshot (node_snap.c)
        c = Cluster(3, label="powerlossc", extra_args=[
            "--snapshot-count=100", "--experimental-snapshot-catchup-entries=5"])
        self.addCleanup(c.cleanup)
        jdir = tempfile.mkdtemp(prefix="powerloss-j-", dir=c.members[0].tmp)
        c.start()   # unarmed: see SingleMember
        for m in c.members:
            self.arm(m, os.path.join(jdir, "%s-0" % m.name), sync_delay_ms=3)
            c.restart(m)
        hist = History()
        for rnd, role in enumerate(("follower", "leader", "installing")):
            seed = SEED * 1000 + 500 + rnd
            rng = random.Random(seed)
            mode = "lose" if rnd != 1 else "random"
            ldr = c.leader()
            victim = ldr if role == "leader" else c.followers(ldr)[0]
            others = [x for x in c.members if x is not victim]
            what = "cluster round %d (KEELSON_POWERLOSS_SEED=%d: seed %d, %s, the %s %s)" % (
                rnd, SEED, seed, mode, role, victim.name)
            kill_at = rng.uniform(0.8, 2.0)
            say("%s: kill at %.2fs" % (what, kill_at))
            journal = victim.env["POWERLOSS_JOURNAL"]
            if role == "installing":
                # down while the others write, then back: it installs a snapshot and loses
                # power during or soon after the install
                victim.kill9()   # a crash, not a power loss: its page cache survives
                work = Workload(others, seed, "c%d" % rnd).start()
                # well past --snapshot-count: the leader's log no longer has what it missed
                harness.poll(lambda: len(work.acked) >= 400, 30,
                             what="%s: 400 writes while it is down" % what)
                journal += "-i"
                self.arm(victim, journal, sync_delay_ms=3)
                victim._wait_ports_free()
                victim.spawn()
                if rng.random() < 0.5:
                    harness.poll(lambda: "installed a database snapshot" in open(
                        victim.log_path, "rb").read().decode("utf-8", "replace"), 20,
                        interval=0.01, what="%s: a snapshot install" % what)
                    kill_at = rng.uniform(0, 0.3)
                    say("installed; kill at %.2fs" % kill_at)
                else:
                    kill_at = rng.uniform(0.1, 1.0)   # while it starts, receives, installs
                    say("started; kill at %.2fs" % kill_at)
            else:
                work = Workload(others, seed, "c%d" % rnd).start()
                # a compaction through the victim, and defragments of it, meanwhile
                threading.Thread(target=self.maintenance, daemon=True, args=(
                    victim, hist, rng.uniform(0, kill_at), True, work)).start()
            time.sleep(kill_at)
            self.power_loss(victim, journal, mode, seed)
            time.sleep(1.0)   # the others go on (a new leader is elected)
            self.arm(victim, journal + "-%d" % (rnd + 1), sync_delay_ms=3)
            try:
                c.restart(victim)
            except harness.ServerError as e:
                self.fail("%s: the member does not start after the power loss: %s\n%s"
                          % (what, e, victim.log_tail(30)))
            time.sleep(0.5)
            work.stop()
            say("%d acknowledged, %d unacknowledged" % (len(work.acked), len(work.unacked)))
            self.assertGreater(len(work.acked), 0)
            c.wait_healthy()

            def converged():
                _, rev = c.wait_converged(timeout=20)
                hs = c.hashkv(rev=rev)
                return len(set(hs.values())) == 1 and hs
            harness.poll(converged, 40, what="%s: equal HashKV at one revision" % what)
            # the restarted member's store holds every acknowledged op at its revision
            self.check_history(victim, hist, work, what)


if __name__ == "__main__":
    unittest.main()
