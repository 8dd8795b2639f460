"""Watch property test (issue 5): random writes against random watchers, checked against the
revision history recorded on the client side.

Seeded random writes (puts, single-key and prefix deletes, txns with several puts, occasional
compactions) run while watchers are created on random prefixes at random start revisions
(>= the compacted revision + 1). Every write's revision comes from its response header, so the
client knows the full history (revision, event type, key, value). At the end, each watcher's
received events must equal exactly the history's events for its range from its start revision:
same order, no gaps, no duplicates. The member is restarted in the middle; each watcher is then
re-created from its last seen revision + 1 and must receive the rest.

Compactions never go past what every live watcher has already received (so no watcher may be
canceled for compaction). Seed: KEELSON_WATCH_SEED=N to replay; printed on every run.
Runs against KEELSON_BIN (KEELSON_BIN=/usr/bin/etcd validates the test itself against etcd).
"""

import os
import random
import sys
import threading
import time
import unittest
import queue

import grpc
from etcd3.etcdrpc import rpc_pb2 as pb
from etcd3.etcdrpc import rpc_pb2_grpc as rpcg

import harness

PREFIXES = [b"a/", b"a/x/", b"b/", b"ab/", b"c"]
KEYS = [b"a/1", b"a/2", b"a/x/1", b"a/x/2", b"b/1", b"b/2", b"b/3", b"ab/1", b"c", b"c/1", b"cz"]


def prefix_end(p):
    return p[:-1] + bytes([p[-1] + 1])


def in_range(key, p):
    return key >= p and key < prefix_end(p)


def in_watch(key, w):
    """Whether key is in watcher w's range as etcd reads (key, range_end)."""
    if w.end == b"":
        return key == w.key
    if w.end == b"\0":
        return key >= w.key
    return w.key <= key < w.end


def random_range(rnd):
    """A prefix, a single key, a [from, to) span or a from-key range: the server indexes
    single keys and ranges apart, and sorts a batch's events once it has many ranges."""
    r = rnd.random()
    if r < 0.4:
        p = rnd.choice(PREFIXES)
        return p, prefix_end(p)
    if r < 0.65:
        return rnd.choice(KEYS), b""
    if r < 0.9:
        a, b = sorted(rnd.sample(KEYS + [b"a", b"b/2z", b"d"], 2))
        return a, b
    return rnd.choice(KEYS), b"\0"


class Watcher:
    def __init__(self, wid, key, end, start_rev):
        self.wid = wid
        self.key = key
        self.end = end
        self.prefix = (key, end)  # for messages
        self.start_rev = start_rev
        self.events = []  # (mod_revision, type, key, value)
        self.lock = threading.Lock()
        self.created = threading.Event()
        self.canceled = None
        self.q = None
        self.thread = None
        self.errors = []

    def last_rev(self):
        with self.lock:
            return self.events[-1][0] if self.events else self.start_rev - 1

    def open(self, channel, start_rev):
        stub = rpcg.WatchStub(channel)
        self.q = queue.Queue()
        self.created = threading.Event()
        self.q.put(pb.WatchRequest(create_request=pb.WatchCreateRequest(
            key=self.key, range_end=self.end, start_revision=start_rev)))
        q = self.q

        def reqs():
            while True:
                r = q.get()
                if r is None:
                    return
                yield r

        def run():
            try:
                for resp in stub.Watch(reqs()):
                    if resp.created:
                        self.created.set()
                    if resp.canceled:
                        self.canceled = (resp.compact_revision, resp.cancel_reason)
                    with self.lock:
                        for ev in resp.events:
                            self.events.append((ev.kv.mod_revision, int(ev.type), ev.kv.key, ev.kv.value))
            except grpc.RpcError as e:
                self.errors.append(e.code())
            self.created.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        if not self.created.wait(10):
            raise AssertionError("watcher %d: no created response in 10 s" % self.wid)

    def close(self):
        if self.q is not None:
            self.q.put(None)


class WatchPropertyTest(unittest.TestCase):
    def setUp(self):
        self.server = harness.Server(harness.KEELSON_BIN, label="sut").start()
        self.addCleanup(self.server.cleanup)

    def test_random_history(self):
        seed = int(os.environ.get("KEELSON_WATCH_SEED") or random.randrange(1 << 30))
        sys.stderr.write("\ntest_watch_property: seed %d (KEELSON_WATCH_SEED=%d to replay)\n" % (seed, seed))
        rnd = random.Random(seed)
        history = []  # (rev, type, key, value); type 0 PUT, 1 DELETE
        live = {}
        state = {"rev": 0, "compacted": 0}
        watchers = []

        def connect():
            ch = grpc.insecure_channel(self.server.endpoint)
            grpc.channel_ready_future(ch).result(timeout=15)
            return ch

        ch = connect()
        kv = rpcg.KVStub(ch)
        state["rev"] = kv.Range(pb.RangeRequest(key=b"\0")).header.revision

        def write_one():
            r = rnd.random()
            if r < 0.55:
                k = rnd.choice(KEYS)
                v = b"v%d" % rnd.randrange(1 << 30)
                rev = kv.Put(pb.PutRequest(key=k, value=v)).header.revision
                history.append((rev, 0, k, v))
                live[k] = v
            elif r < 0.75:
                if rnd.random() < 0.5:
                    k = rnd.choice(KEYS)
                    resp = kv.DeleteRange(pb.DeleteRangeRequest(key=k))
                    gone = [k] if k in live else []
                else:
                    p = rnd.choice(PREFIXES)
                    resp = kv.DeleteRange(pb.DeleteRangeRequest(key=p, range_end=prefix_end(p)))
                    gone = sorted(x for x in live if in_range(x, p))
                self.assertEqual(resp.deleted, len(gone), "seed %d: delete count vs model" % seed)
                rev = resp.header.revision
                for k in gone:
                    history.append((rev, 1, k, b""))
                    del live[k]
            elif r < 0.95:
                ks = rnd.sample(KEYS, rnd.randint(2, 4) if rnd.random() < 0.8 else len(KEYS))
                ops, evs = [], []
                for k in ks:
                    v = b"t%d" % rnd.randrange(1 << 30)
                    ops.append(pb.RequestOp(request_put=pb.PutRequest(key=k, value=v)))
                    evs.append((k, v))
                rev = kv.Txn(pb.TxnRequest(success=ops)).header.revision
                for k, v in evs:
                    history.append((rev, 0, k, v))
                    live[k] = v
            else:
                # compact, but never past what a live watcher has received
                cur = history[-1][0] if history else state["rev"]
                floor = min([w.last_rev() for w in watchers] + [cur])
                if floor > state["compacted"]:
                    target = rnd.randint(state["compacted"] + 1, floor)
                    kv.Compact(pb.CompactionRequest(revision=target, physical=rnd.random() < 0.5))
                    state["compacted"] = target
                return
            state["rev"] = rev

        def add_watcher():
            key, end = random_range(rnd)
            lo = state["compacted"] + 1
            start = rnd.randint(lo, state["rev"] + 1)
            w = Watcher(len(watchers), key, end, start)
            watchers.append(w)
            w.open(ch, start)

        def phase(nwrites):
            for _ in range(nwrites):
                if rnd.random() < 0.12:
                    add_watcher()
                write_one()

        phase(250)
        # restart the member; re-create every watcher from its last seen revision + 1
        self.wait_caught_up(watchers, history, seed, timeout=10)
        for w in watchers:
            w.close()
        ch.close()
        self.server.restart()
        for w in watchers:
            w.thread.join(5)
        ch = connect()
        kv = rpcg.KVStub(ch)
        for w in watchers:
            w.open(ch, w.last_rev() + 1)
        phase(250)
        self.wait_caught_up(watchers, history, seed, timeout=15)
        for w in watchers:
            w.close()
        ch.close()

        problems = []
        for w in watchers:
            exp = [e for e in history if e[0] >= w.start_rev and in_watch(e[2], w)]
            with w.lock:
                got = list(w.events)
            if w.canceled:
                problems.append("watcher %d (%r from rev %d): canceled %r" % (w.wid, w.prefix, w.start_rev, w.canceled))
            if got != exp:
                i = next((i for i in range(min(len(got), len(exp))) if got[i] != exp[i]), min(len(got), len(exp)))
                problems.append(
                    "watcher %d (prefix %r, start rev %d): %d events expected, %d got; first difference at "
                    "index %d: expected %r, got %r" % (
                        w.wid, w.prefix, w.start_rev, len(exp), len(got), i,
                        exp[i:i + 3], got[i:i + 3]))
        sys.stderr.write("test_watch_property: seed %d: %d watchers, %d events in history, last rev %d, "
                         "compacted %d\n" % (seed, len(watchers), len(history), state["rev"], state["compacted"]))
        self.assertFalse(problems, "seed %d:\n  " % seed + "\n  ".join(problems[:10]))

    def wait_caught_up(self, watchers, history, seed, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lagging = 0
            for w in watchers:
                exp = sum(1 for e in history if e[0] >= w.start_rev and in_watch(e[2], w))
                with w.lock:
                    if len(w.events) < exp:
                        lagging += 1
            if not lagging:
                return
            time.sleep(0.05)


if __name__ == "__main__":
    unittest.main()
