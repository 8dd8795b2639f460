"""Leases (issue 6): differential tests against a real etcd 3.4, plus lock/elect properties.

The same etcdctl commands go to the server under test and to a real etcd 3.4; outputs are
compared after normalize.py's rules and, here, also:
  - lease ids (each server picks its own): numbered per server in order of appearance,
    in hex (simple output, lock/election key names) and decimal (json) form;
  - remaining TTLs (`remaining(Ns)`, json "TTL"): compared with a 1s tolerance.
`etcdctl lock` (3 lockers, no overlapping critical sections) and `etcdctl elect` (failover
after the leader resigns, and after the leader is killed and its session lease ends) are
checked on both servers. python3-etcd3's lease refresh keeps keys alive. Leases survive a
restart and get their full TTL again (etcd without lease checkpoints).
"""

import json
import os
import re
import subprocess
import threading
import time
import unittest

import grpc
from etcd3.etcdrpc import rpc_pb2 as pb

import harness
import normalize as N
from test_watch import BgCtl, on_both

LEASE = "/etcdserverpb.Lease/"


class LeaseIds:
    """Per-server numbering of lease ids: hex (%016x or shorter) and decimal forms."""
    HEX = re.compile(rb"\b([0-9a-f]{16})\b")
    DEC = re.compile(rb'("ID":|"id":|"lease":|"Lease" : |"ID" : )(\d+)')
    REM = re.compile(rb"remaining\((-?\d+)s\)")
    TTLJ = re.compile(rb'"TTL":(-?\d+)')
    KEYS = re.compile(rb"attached keys\(\[([^\]]*)\]\)")
    KEYSJ = re.compile(rb'"keys":\[([^\]]*)\]')

    def __init__(self):
        self.ids = {}

    def num(self, v):
        if v == 0:
            return "0"
        return "<L%d>" % self.ids.setdefault(v, len(self.ids) + 1)

    def norm(self, out, json_ttl=False):
        out = self.HEX.sub(lambda m: self.num(int(m.group(1), 16)).encode(), out)
        out = self.DEC.sub(lambda m: m.group(1) + self.num(int(m.group(2))).encode(), out)
        # etcd lists a lease's keys from a Go map: their order is not defined
        out = self.KEYS.sub(lambda m: b"attached keys([" + b" ".join(
            sorted(m.group(1).split())) + b"])", out)
        out = self.KEYSJ.sub(lambda m: b'"keys":[' + b",".join(
            sorted(m.group(1).split(b","))) + b"]", out)
        rems = [int(x) for x in self.REM.findall(out)]
        out = self.REM.sub(b"remaining(<R>)", out)
        if json_ttl:
            rems += [int(x) for x in self.TTLJ.findall(out)]
            out = self.TTLJ.sub(b'"TTL":<R>', out)
        return out, rems


class Base(unittest.TestCase):
    maxDiff = None

    def setUp(self):
        self.sut, self.oracle = harness.pair_for_test(self)
        self.both = (self.sut, self.oracle)
        self.lid = {self.sut: LeaseIds(), self.oracle: LeaseIds()}
        self.mismatches = []

    def norm(self, s, args, r):
        rc, out, err = N.normalize([str(a) for a in args], r.rc, r.out, r.err, s.endpoint)
        js = "json" in args
        out, rems = self.lid[s].norm(out, js)
        err, rems2 = self.lid[s].norm(err)
        return (rc, out, err), rems + rems2

    def ctl_both(self, *args, stdin=None, ttl_tolerance=1):
        args = [str(a) for a in args]
        ra, rb = on_both(lambda s: s.ctl(*args, stdin=stdin), self.sut, self.oracle)
        na, rema = self.norm(self.sut, args, ra)
        nb, remb = self.norm(self.oracle, args, rb)
        bad = na != nb or len(rema) != len(remb) or any(
            abs(x - y) > ttl_tolerance for x, y in zip(rema, remb))
        if bad:
            self.mismatches.append("etcdctl %s:\n  keelson: %r remaining=%s\n"
                                   "  etcd:    %r remaining=%s" % (
                                       " ".join(args), na, rema, nb, remb))
        return ra, rb

    def grant_both(self, ttl):
        ra, rb = self.ctl_both("lease", "grant", ttl)
        ids = []
        for s, r in ((self.sut, ra), (self.oracle, rb)):
            m = re.match(r"lease ([0-9a-f]+) granted", r.stdout)
            self.assertTrue(m, "%s: %r" % (s.label, r))
            ids.append(m.group(1))
            self.lid[s].num(int(m.group(1), 16))
        return ids

    def per_server(self, ids, fmt):
        """Run an etcdctl command whose argument is each server's own lease id."""
        args = {s: [a.format(id=i) for a in fmt] for s, i in zip(self.both, ids)}
        ra, rb = on_both(lambda s: s.ctl(*args[s]), self.sut, self.oracle)
        na, rema = self.norm(self.sut, args[self.sut], ra)
        nb, remb = self.norm(self.oracle, args[self.oracle], rb)
        if na != nb or len(rema) != len(remb) or any(abs(x - y) > 1
                                                     for x, y in zip(rema, remb)):
            self.mismatches.append("etcdctl %s:\n  keelson: %r remaining=%s\n"
                                   "  etcd:    %r remaining=%s" % (
                                       " ".join(fmt), na, rema, nb, remb))
        return ra, rb

    def check(self):
        if self.mismatches:
            self.fail("%d difference(s) between keelson and etcd 3.4:\n\n%s" % (
                len(self.mismatches), "\n\n".join(self.mismatches)))


class EtcdctlLease(Base):

    def test_grant_timetolive_list_revoke(self):
        a = self.grant_both(60)
        b = self.grant_both(100)
        self.ctl_both("lease", "grant", "30", "-w", "json")
        self.per_server(a, ["put", "k1", "v1", "--lease={id}"])
        self.per_server(a, ["put", "k2", "v2", "--lease={id}"])
        self.per_server(b, ["put", "k3", "v3", "--lease={id}"])
        self.ctl_both("put", "k4", "no lease")
        for fmt in ("simple", "json"):
            self.per_server(a, ["lease", "timetolive", "{id}", "-w", fmt])
            self.per_server(a, ["lease", "timetolive", "{id}", "--keys", "-w", fmt])
        self.per_server(b, ["lease", "timetolive", "{id}", "--keys"])
        self.ctl_both("get", "k", "--prefix", "-w", "json")
        for s in self.both:
            r = s.ctl("lease", "list")
            lines = r.stdout.splitlines()
            self.assertEqual((r.rc, lines[0]), (0, "found 3 leases"), r)
        self.per_server(a, ["lease", "keep-alive", "--once", "{id}"])
        self.per_server(a, ["lease", "keep-alive", "--once", "{id}", "-w", "json"])
        # move k2 to lease b, detach k1 (put without lease)
        self.per_server(b, ["put", "k2", "v2b", "--lease={id}"])
        self.ctl_both("put", "k1", "v1b")
        self.per_server(a, ["lease", "timetolive", "{id}", "--keys"])
        self.per_server(b, ["lease", "timetolive", "{id}", "--keys"])
        self.per_server(b, ["lease", "revoke", "{id}"])
        self.ctl_both("get", "k", "--prefix", "-w", "json")
        self.per_server(b, ["lease", "timetolive", "{id}"])
        self.per_server(b, ["lease", "timetolive", "{id}", "-w", "json"])
        self.per_server(b, ["lease", "revoke", "{id}"])
        self.per_server(b, ["lease", "keep-alive", "--once", "{id}"])
        self.per_server(b, ["put", "k9", "v", "--lease={id}"])
        self.check()

    def test_errors_and_ttl_rules(self):
        for bad in ("1234abcd", "ffffffffffffffff", "0"):
            self.ctl_both("lease", "revoke", bad)
            self.ctl_both("lease", "timetolive", bad)
            self.ctl_both("lease", "keep-alive", "--once", bad)
            self.ctl_both("put", "k", "v", "--lease=" + bad)
        self.ctl_both("lease", "revoke", "not-hex")
        self.ctl_both("lease", "revoke")
        # minimum TTL: etcd raises small TTLs to ceil(1.5 * election timeout) = 2s
        for ttl in ("1", "0", "-1", "2", "3", "9000000000", "9000000001", "99999999999"):
            self.ctl_both("lease", "grant", ttl)
        self.ctl_both("lease", "grant", "1", "-w", "json")
        self.ctl_both("lease", "grant", "9000000001", "-w", "json")
        self.check()

    def test_grpc_client_chosen_ids(self):
        """LeaseGrant with an explicit ID; the same ID again; LeaseLeases; revoke unknown."""
        def go(s):
            ch = grpc.insecure_channel(s.endpoint, options=[("grpc.enable_http_proxy", 0)])
            out = []

            def call(m, req, resp_cls):
                f = ch.unary_unary(LEASE + m, request_serializer=None,
                                   response_deserializer=None)
                try:
                    r = resp_cls.FromString(f(req.SerializeToString(), timeout=10))
                    r.ClearField("header")
                    return ("OK", str(r))
                except grpc.RpcError as e:
                    return (e.code().name, e.details())
            out.append(call("LeaseGrant", pb.LeaseGrantRequest(TTL=60, ID=12345),
                            pb.LeaseGrantResponse))
            out.append(call("LeaseGrant", pb.LeaseGrantRequest(TTL=60, ID=12345),
                            pb.LeaseGrantResponse))
            out.append(call("LeaseGrant", pb.LeaseGrantRequest(TTL=5, ID=-7),
                            pb.LeaseGrantResponse))
            out.append(call("LeaseGrant", pb.LeaseGrantRequest(TTL=1, ID=777),
                            pb.LeaseGrantResponse))
            out.append(call("LeaseTimeToLive", pb.LeaseTimeToLiveRequest(ID=777),
                            pb.LeaseTimeToLiveResponse))
            out.append(call("LeaseRevoke", pb.LeaseRevokeRequest(ID=999),
                            pb.LeaseRevokeResponse))
            out.append(call("LeaseRevoke", pb.LeaseRevokeRequest(ID=0),
                            pb.LeaseRevokeResponse))
            out.append(call("LeaseTimeToLive", pb.LeaseTimeToLiveRequest(ID=999, keys=True),
                            pb.LeaseTimeToLiveResponse))
            out.append(call("LeaseRevoke", pb.LeaseRevokeRequest(ID=12345),
                            pb.LeaseRevokeResponse))
            r = call("LeaseLeases", pb.LeaseLeasesRequest(), pb.LeaseLeasesResponse)
            out.append((r[0], sorted(r[1].split("\n"))))
            ch.close()
            return out
        a, b = on_both(go, self.sut, self.oracle)
        a = [(c, re.sub(r"TTL: \d+", "TTL: <R>", x) if isinstance(x, str) else x)
             for c, x in a]
        b = [(c, re.sub(r"TTL: \d+", "TTL: <R>", x) if isinstance(x, str) else x)
             for c, x in b]
        self.assertEqual(a, b)

    def test_expiry_deletes_keys_at_one_revision(self):
        ids = self.grant_both(2)
        for k in ("x/c", "x/a", "x/b", "y"):
            self.per_server(ids, ["put", k, "v", "--lease={id}"])
        self.ctl_both("put", "x/keep", "v")
        self.ctl_both("get", "", "--prefix", "-w", "json")
        t0 = time.monotonic()
        done = {}
        while time.monotonic() - t0 < 15 and len(done) < 2:
            for s in self.both:
                if s not in done and s.ctl("get", "y", "--print-value-only").stdout == "":
                    done[s] = time.monotonic() - t0
            time.sleep(0.1)
        self.assertEqual(len(done), 2, "leases did not expire: %r" % done)
        for s, t in done.items():
            self.assertTrue(1.5 <= t <= 6, "%s: keys of a 2s lease went after %.1fs"
                            % (s.label, t))
        # one revision for all deletions: the history shows them at revision 8
        self.ctl_both("get", "", "--prefix", "-w", "json")
        self.ctl_both("get", "x/a", "--rev", "7", "--print-value-only")
        self.ctl_both("get", "", "--prefix", "--rev", "7", "--keys-only")
        self.ctl_both("put", "after", "v", "-w", "json")
        self.per_server(ids, ["lease", "timetolive", "{id}"])
        self.per_server(ids, ["lease", "revoke", "{id}"])
        self.ctl_both("lease", "list")
        self.check()

    def test_keep_alive_stream(self):
        """`etcdctl lease keep-alive` (the stream) keeps a 2s lease and its key for 5s; after
        it stops the key goes."""
        ids = self.grant_both(2)
        self.per_server(ids, ["put", "ka", "v", "--lease={id}"])
        procs = [BgCtl(s, "lease", "keep-alive", i) for s, i in zip(self.both, ids)]
        try:
            time.sleep(5)
            for s in self.both:
                self.assertEqual(s.ctl("get", "ka", "--print-value-only").stdout, "v\n",
                                 "%s: key gone while kept alive" % s.label)
        finally:
            for p in procs:
                p.stop()
        outs = []
        for s, p in zip(self.both, procs):
            out = p.snapshot()[0]
            lines = set(self.lid[s].norm(out)[0].decode().splitlines())
            outs.append(lines)
        self.assertEqual(outs[0], outs[1])
        time.sleep(4)
        self.ctl_both("get", "ka")
        self.check()


class PythonLease(Base):

    def test_keepalive_stream_ends_on_client_half_close(self):
        """A LeaseKeepAlive stream whose client sends one request and closes its side:
        etcd answers and ends the call with OK (leaseKeepAlive returns on io.EOF);
        python3-etcd3's Lease.refresh() depends on it."""
        def go(s):
            ch = grpc.insecure_channel(s.endpoint, options=[("grpc.enable_http_proxy", 0)])
            g = ch.unary_unary(LEASE + "LeaseGrant", request_serializer=None,
                               response_deserializer=None)
            lid = pb.LeaseGrantResponse.FromString(
                g(pb.LeaseGrantRequest(TTL=5).SerializeToString(), timeout=5)).ID
            f = ch.stream_stream(LEASE + "LeaseKeepAlive", request_serializer=None,
                                 response_deserializer=None)
            out = []
            try:
                for ident in (lid, 999):
                    for x in f(iter([pb.LeaseKeepAliveRequest(ID=ident).SerializeToString()]),
                               timeout=3):
                        r = pb.LeaseKeepAliveResponse.FromString(x)
                        out.append((r.ID == ident, r.TTL))
                    out.append("OK")
            except grpc.RpcError as e:
                out.append(e.code().name)
            ch.close()
            return out
        a, b = on_both(go, self.sut, self.oracle)
        self.assertEqual(b, [(True, 5), "OK", (True, 0), "OK"])
        self.assertEqual(a, b)

    def test_refresh_keeps_alive(self):
        import etcd3

        def go(s):
            c = etcd3.client(host="127.0.0.1", port=s.client_port, timeout=10)
            lease = c.lease(3)
            c.put("py/k", "v", lease=lease)
            alive = []
            for _ in range(6):
                time.sleep(1)
                r = lease.refresh()
                alive.append((r[0].TTL, c.get("py/k")[0]))
            rem = lease.remaining_ttl
            keys = sorted(lease.keys)
            time.sleep(4.5)
            gone = c.get("py/k")[0]
            ttl = lease.remaining_ttl
            return alive, 2 <= rem <= 3, keys, gone, ttl
        a, b = on_both(go, self.sut, self.oracle)
        self.assertEqual(a, b)
        self.assertEqual(a[0], [(3, b"v")] * 6)


class LockElect(unittest.TestCase):
    """On both servers: properties, not byte comparison (timings differ)."""

    def setUp(self):
        self.sut, self.oracle = harness.pair_for_test(self)

    def _lock(self, s):
        procs = []
        for i in range(3):
            cmd = ("ep=%s; s=$(date +%%s.%%N); sleep 0.4; e=$(date +%%s.%%N); "
                   "ETCDCTL_API=3 %s --endpoints=$ep put rec/%d \"$s $e\" >/dev/null"
                   % (s.endpoint, harness.ETCDCTL_BIN, i))
            procs.append(BgCtl(s, "lock", "mylock", "--", "sh", "-c", cmd))
        for p in procs:
            try:
                p.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        rcs = [p.stop() for p in procs]
        r = s.ctl("get", "rec/", "--prefix", "-w", "json")
        kvs = json.loads(r.stdout).get("kvs", [])
        import base64
        spans = sorted(tuple(float(x) for x in base64.b64decode(kv["value"]).split())
                       for kv in kvs)
        left = s.ctl("get", "mylock", "--prefix", "--keys-only").stdout.strip()
        return rcs, spans, left, [p.snapshot() for p in procs]

    def test_lock_mutual_exclusion(self):
        for s, (rcs, spans, left, outs) in zip((self.sut, self.oracle),
                                               on_both(self._lock, self.sut, self.oracle)):
            self.assertEqual(rcs, [0, 0, 0], "%s: %r" % (s.label, outs))
            self.assertEqual(len(spans), 3, "%s: %r %r" % (s.label, spans, outs))
            for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
                self.assertLessEqual(e1, s2, "%s: critical sections overlap: %r"
                                     % (s.label, spans))
            self.assertEqual(left, "", "%s: lock keys left behind: %r" % (s.label, left))

    def _elect(self, s):
        log = []
        obs = BgCtl(s, "elect", "-l", "myelection")
        cands = {}
        for name in ("p1", "p2", "p3"):
            cands[name] = BgCtl(s, "elect", "myelection", name)
            time.sleep(0.3)

        def leader(timeout=15):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                won = [n for n, p in cands.items() if p.proc.poll() is None
                       and p.snapshot()[0].decode().strip().endswith(n)]
                if won:
                    return won
                time.sleep(0.05)
            return []
        first = leader()
        log.append(("first", first))
        # graceful: the leader is interrupted, resigns and closes its session
        if first:
            cands[first[0]].proc.send_signal(subprocess.signal.SIGINT)
            cands[first[0]].proc.wait(10)
        second = [n for n in leader() if n not in first]
        log.append(("second", second))
        # crash: kill -9 the leader; its session lease (60s TTL) is revoked, as its expiry
        # would do
        if second:
            p = cands[second[0]]
            key = p.snapshot()[0].decode().split()[0]
            p.proc.kill()
            p.proc.wait(10)
            time.sleep(0.5)
            still = s.ctl("get", "myelection", "--prefix", "--keys-only").stdout.split()
            log.append(("keys after kill", len(still)))
            lease_hex = key.rsplit("/", 1)[1]
            log.append(("revoke", s.ctl("lease", "revoke", lease_hex).rc))
        third = [n for n in leader() if n not in first + second]
        log.append(("third", third))
        time.sleep(0.5)
        for p in cands.values():
            p.stop()
        obs.stop()
        seen = [l for l in obs.snapshot()[0].decode().splitlines() if l.startswith("p")]
        log.append(("observer", seen))
        return log

    def test_elect_failover(self):
        a, b = on_both(self._elect, self.sut, self.oracle)
        self.assertIsInstance(b, list, b)
        self.assertEqual(len(b[0][1]), 1, b)
        self.assertIsInstance(a, list, a)
        self.assertEqual(a, b)


class Restart(Base):

    def test_leases_survive_restart_with_full_ttl(self):
        ids = self.grant_both(20)
        self.per_server(ids, ["put", "r/k", "v", "--lease={id}"])
        short = self.grant_both(4)
        self.per_server(short, ["put", "r/short", "v", "--lease={id}"])
        time.sleep(3)
        self.per_server(ids, ["lease", "timetolive", "{id}", "--keys"])
        on_both(lambda s: s.restart(), self.sut, self.oracle)
        # etcd without checkpoints: the TTL starts over (plus the election extension on
        # promotion), so the 4s lease outlives its original deadline
        self.per_server(ids, ["lease", "timetolive", "{id}", "--keys"])
        self.per_server(short, ["lease", "timetolive", "{id}", "--keys"])
        self.ctl_both("get", "r/", "--prefix", "--keys-only")
        for s in self.both:
            r = s.ctl("lease", "list")
            self.assertEqual(r.stdout.splitlines()[0], "found 2 leases", r)
        time.sleep(7)
        self.ctl_both("get", "r/", "--prefix", "--keys-only")
        self.per_server(short, ["lease", "timetolive", "{id}"])
        self.per_server(ids, ["lease", "keep-alive", "--once", "{id}"])
        on_both(lambda s: s.restart(kill=True), self.sut, self.oracle)
        self.per_server(ids, ["lease", "timetolive", "{id}", "--keys"])
        self.ctl_both("get", "r/", "--prefix", "--keys-only")
        self.check()


def _channel(s):
    return grpc.insecure_channel(s.endpoint, options=[("grpc.enable_http_proxy", 0)])


def _unary(ch, method, req, resp_cls, timeout=10):
    f = ch.unary_unary(LEASE + method, request_serializer=None, response_deserializer=None)
    return resp_cls.FromString(f(req.SerializeToString(), timeout=timeout))


class KeepAliveGone(Base):

    def test_keep_alive_of_revoked_and_expired_leases_answers_ttl_0(self):
        """On one keep-alive stream: a live lease, the same lease after LeaseRevoke, a lease
        whose expiry deleted its key, an id never granted: etcd answers TTL 0 (not an
        error, the stream goes on) for all but the first; TimeToLive then says -1."""
        def go(s):
            import queue
            ch = _channel(s)
            q = queue.Queue()
            ka = ch.stream_stream(LEASE + "LeaseKeepAlive", request_serializer=None,
                                  response_deserializer=None)
            it = ka(iter(q.get, None), timeout=30)

            def keepalive(ident):
                q.put(pb.LeaseKeepAliveRequest(ID=ident).SerializeToString())
                r = pb.LeaseKeepAliveResponse.FromString(next(it))
                return (r.ID == ident, r.TTL)
            out = []
            a = _unary(ch, "LeaseGrant", pb.LeaseGrantRequest(TTL=30), pb.LeaseGrantResponse).ID
            b = _unary(ch, "LeaseGrant", pb.LeaseGrantRequest(TTL=2), pb.LeaseGrantResponse).ID
            kv = ch.unary_unary("/etcdserverpb.KV/Put", request_serializer=None,
                                response_deserializer=None)
            kv(pb.PutRequest(key=b"gone/b", value=b"v", lease=b).SerializeToString(),
               timeout=10)
            out.append(("live", keepalive(a)))
            _unary(ch, "LeaseRevoke", pb.LeaseRevokeRequest(ID=a), pb.LeaseRevokeResponse)
            out.append(("revoked", keepalive(a)))
            out.append(("revoked again", keepalive(a)))
            rng = ch.unary_unary("/etcdserverpb.KV/Range", request_serializer=None,
                                 response_deserializer=None)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                r = pb.RangeResponse.FromString(rng(pb.RangeRequest(
                    key=b"gone/b").SerializeToString(), timeout=10))
                if r.count == 0:
                    break
                time.sleep(0.1)
            out.append(("key of expired lease gone", r.count == 0))
            out.append(("expired", keepalive(b)))
            out.append(("never granted", keepalive(0x7eadbeef)))
            for ident in (a, b):
                r = _unary(ch, "LeaseTimeToLive", pb.LeaseTimeToLiveRequest(ID=ident),
                           pb.LeaseTimeToLiveResponse)
                out.append(("timetolive", r.TTL, r.grantedTTL))
            q.put(None)
            out.append(("stream ends", [x for x in it]))
            ch.close()
            return out
        a, b = on_both(go, self.sut, self.oracle)
        self.assertEqual(b[0], ("live", (True, 30)), b)
        self.assertEqual(b[1], ("revoked", (True, 0)), b)
        self.assertEqual(a, b)


def _sut_is_etcd():
    return os.path.basename(harness.KEELSON_BIN) == "etcd"


# Checkpoints every second, so that tests see several in a few seconds.
CHECKPOINT_ARGS = ["--experimental-enable-lease-checkpoint",
                   "--experimental-lease-checkpoint-interval", "1s"]


class Checkpoints(unittest.TestCase):
    """--experimental-enable-lease-checkpoint: the remaining TTL survives a restart (etcd 3.4
    keeps checkpoints in memory only; Keelson persists them with the lease), and the etcd snapshot carries it to a real etcd. Keelson only: etcd 3.4 has no
    --experimental-lease-checkpoint-interval (its interval is 5 minutes)."""

    def setUp(self):
        if _sut_is_etcd():
            self.skipTest("etcd 3.4 has no --experimental-lease-checkpoint-interval")

    def ttl(self, s, lid):
        r = s.ctl("lease", "timetolive", lid, "-w", "json")
        self.assertEqual(r.rc, 0, r)
        return json.loads(r.stdout)["ttl"]

    def test_remaining_ttl_survives_restart_and_snapshot(self):
        s = harness.fresh_server(self, extra_args=CHECKPOINT_ARGS)
        r = s.ctl("lease", "grant", "20")
        lid = re.match(r"lease ([0-9a-f]+) granted", r.stdout).group(1)
        self.assertEqual(s.ctl("put", "cp/k", "v", "--lease=" + lid).rc, 0)
        kept = re.match(r"lease ([0-9a-f]+) granted", s.ctl("lease", "grant", "20").stdout)
        kept = kept.group(1)
        t0 = time.monotonic()
        # The remaining TTL can only shrink with time: let 4 s (4 checkpoints) go by.
        time.sleep(4)
        # A keep-alive clears the checkpoint of `kept`: it restarts from its full TTL.
        self.assertEqual(s.ctl("lease", "keep-alive", "--once", kept).rc, 0)
        time.sleep(1.5)  # a look of the lessor (every 0.5 s) proposes the clearing
        elapsed = time.monotonic() - t0
        s.restart(kill=True)
        ttl = self.ttl(s, lid)
        since_grant = time.monotonic() - t0
        # full TTL again would be 20 + 1 (the election extension); the checkpoint is at most
        # 1 s (one interval) older than the kill
        self.assertLessEqual(ttl, 20 + 1 - elapsed + 1.5,
                             "TTL %d after %.1fs: checkpoint not used" % (ttl, elapsed))
        self.assertGreaterEqual(ttl, 20 - since_grant - 2)
        self.assertGreaterEqual(self.ttl(s, kept), 19)
        print("    [checkpoint] TTL %d s after a restart %.1f s into a 20 s lease"
              % (ttl, elapsed))
        # The etcd snapshot carries it (leasepb.Lease.RemainingTTL): a real etcd 3.4
        # restored from it starts the lease from there too (its Promote reads it).
        snap = os.path.join(s.tmp, "cp.db")
        self.assertEqual(s.ctl("snapshot", "save", snap).rc, 0)
        e = harness.Server(harness.ETCD_BIN, name="restored", label="etcd-restored")
        self.addCleanup(e.cleanup)
        data = os.path.join(e.tmp, "restored")
        p = subprocess.run([harness.ETCDCTL_BIN, "snapshot", "restore", snap, "--data-dir",
                            data, "--name", e.name, "--initial-cluster",
                            "%s=%s" % (e.name, e.peer_url), "--initial-advertise-peer-urls",
                            e.peer_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env=harness.clean_env({"ETCDCTL_API": "3"}), timeout=60)
        self.assertEqual(p.returncode, 0, p.stderr)
        e.data_dir = data
        e.start()
        ettl = self.ttl(e, lid)
        self.assertLessEqual(ettl, ttl + 1, "etcd restored from the snapshot: TTL %d" % ettl)
        self.assertGreaterEqual(self.ttl(e, kept), 18)


def _grpc_window(ch, method, reqs, resp_cls, window=256):
    """Unary calls with up to `window` in flight; raises on the first error."""
    f = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
    pending = []
    for req in reqs:
        pending.append(f.future(req.SerializeToString(), timeout=60))
        if len(pending) >= window:
            pending.pop(0).result()
    for p in pending:
        p.result()


class ExpiryUnderLoad(unittest.TestCase):
    """KEELSON_LEASE_LOAD_COUNT leases (default 20000; a million in a script run), one key
    each, all expiring within a few seconds of each other while a writer keeps writing: the
    writer's latency stays bounded (KEELSON_LEASE_LOAD_MAX_LATENCY_S, default 2 s), every key
    goes, no lease is left. The leader revokes at etcd's rate (1000 leases a second, in
    bounded batches through the log), so the count sets the test's length."""

    def test_mass_expiry_while_writing(self):
        n = int(os.environ.get("KEELSON_LEASE_LOAD_COUNT", "20000"))
        bound = float(os.environ.get("KEELSON_LEASE_LOAD_MAX_LATENCY_S", "2"))
        s = harness.fresh_server(self)
        ch = _channel(s)
        self.addCleanup(ch.close)
        # The TTL leaves time to grant and attach everything before the first expiry.
        ttl = int(os.environ.get("KEELSON_LEASE_LOAD_TTL", str(5 + n // 4000)))
        t0 = time.monotonic()
        _grpc_window(ch, LEASE + "LeaseGrant",
                     (pb.LeaseGrantRequest(TTL=ttl, ID=i + 1) for i in range(n)),
                     pb.LeaseGrantResponse)
        t_granted = time.monotonic()

        def txns():
            for base in range(0, n, 128):
                ops = [pb.RequestOp(request_put=pb.PutRequest(
                    key=b"load/%08d" % i, value=b"v", lease=i + 1))
                    for i in range(base, min(n, base + 128))]
                yield pb.TxnRequest(success=ops)
        _grpc_window(ch, "/etcdserverpb.KV/Txn", txns(), pb.TxnResponse, window=16)
        t_attached = time.monotonic()
        self.assertLess(t_attached - t0, ttl - 1,
                        "setup took %.1fs, longer than the %ds TTL: raise "
                        "KEELSON_LEASE_LOAD_TTL" % (t_attached - t0, ttl))

        rng = ch.unary_unary("/etcdserverpb.KV/Range", request_serializer=None,
                             response_deserializer=None)

        def count():
            return pb.RangeResponse.FromString(rng(pb.RangeRequest(
                key=b"load/", range_end=b"load0", count_only=True).SerializeToString(),
                timeout=30)).count
        self.assertEqual(count(), n)

        stop = threading.Event()
        lat = []   # (time since t0, seconds)
        errors = []

        def writer():
            wch = _channel(s)
            put = wch.unary_unary("/etcdserverpb.KV/Put", request_serializer=None,
                                  response_deserializer=None)
            i = 0
            while not stop.is_set():
                a = time.monotonic()
                try:
                    put(pb.PutRequest(key=b"writer", value=b"%d" % i).SerializeToString(),
                        timeout=30)
                except grpc.RpcError as e:
                    errors.append(e.code().name)
                lat.append((a - t0, time.monotonic() - a))
                i += 1
            wch.close()
        w = threading.Thread(target=writer, daemon=True)
        w.start()
        try:
            deadline = t_granted + ttl + n / 1000.0 * 1.5 + 30
            first_gone = None
            while True:
                c = count()
                if c < n and first_gone is None:
                    first_gone = time.monotonic()
                if c == 0:
                    break
                self.assertLess(time.monotonic(), deadline,
                                "%d of %d keys still there" % (c, n))
                time.sleep(1)  # a count reads every key left: not too often
            t_all_gone = time.monotonic()
        finally:
            stop.set()
            w.join(60)
        leases = _unary(ch, "LeaseLeases", pb.LeaseLeasesRequest(), pb.LeaseLeasesResponse)
        self.assertEqual(len(leases.leases), 0, "leases left after expiry")
        self.assertEqual(errors, [])
        during = sorted(d for t, d in lat if first_gone - t0 - 1 <= t <= t_all_gone - t0)
        self.assertTrue(during, "the writer wrote nothing during the expiry")
        mx = during[-1]
        p99 = during[int(len(during) * 0.99)]
        print("    [expiry under load] %d leases: granted in %.1fs, attached in %.1fs; "
              "expired keys gone over %.1fs (%.0f/s); writer during expiry: %d puts, "
              "p50 %.1f ms, p99 %.1f ms, max %.1f ms"
              % (n, t_granted - t0, t_attached - t_granted, t_all_gone - first_gone,
                 n / max(t_all_gone - first_gone, 1e-3), len(during),
                 during[len(during) // 2] * 1e3, p99 * 1e3, mx * 1e3))
        self.assertLess(mx, bound, "a write took %.2fs while leases expired" % mx)


if __name__ == "__main__":
    unittest.main()
