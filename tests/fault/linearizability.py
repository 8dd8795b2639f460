#!/usr/bin/python3
"""A Wing-Gong / Lowe / Porcupine-style linearizability checker for per-key register
histories (put, get, compare-and-set), in plain Python.

History format (a list of dicts, JSON-friendly):
  {"id": 7, "client": 2, "key": "k1", "op": "put", "value": "v7",
   "start": 1.25, "end": 1.31, "ok": true}
  {"op": "get", ..., "ok": true, "result": "v7"}          # result None: key absent
  {"op": "cas", "expect": "v7", "value": "v9", "ok": true, "result": true}   # txn succeeded
  {"op": "cas", ..., "ok": true, "result": false}          # compare failed, nothing written
  {"op": "cas", ..., "result": false, "observed": "v8"}    # ... and the Else branch read v8
  {"op": "cas", "expect": "v7", "value": null, ...}        # compare-and-delete (value None)
  {"op": "put" | "cas", ..., "ok": false, "end": null}     # error / timeout: indeterminate,
                                                           # may take effect at any later time
The Kubernetes workload's optimistic-concurrency txns map onto cas: a create
(If CreateRevision==0) expects None, an update / delete (If ModRevision==r) expects the value
the client read at mod revision r (every value is written once, so the two compares agree).
A failed get has no effect and is dropped; ops of other kinds (e.g. "list") are skipped. Every op also may carry "rev" (the response
header revision) and "member"; check_revisions() uses them.

The register model is nondeterministic (indeterminate writes may or may not apply), handled
as Porcupine's NondeterministicModel does: the state is the set of possible values.

Search (Lowe's improvement of Wing & Gong): ops become call/return entries in a doubly
linked list ordered by time; repeatedly linearize a pending call whose model step succeeds
(lifting it from the list), backtrack on reaching a return whose call is not linearized yet;
memoize (set of linearized ops, model state) pairs already explored.

Usage:
  linearizability.py history.json     # check a history file written by campaign.py
  linearizability.py --self-test      # the unit tests (hand-made histories)
"""

import json
import sys
import time
from collections import defaultdict

INF = float("inf")
ABSENT = None


# ---------------------------------------------------------------------------------------
# the register model over a set of possible states

def step(state, op):
    """state: frozenset of possible values (None = absent). Returns the new frozenset, empty
    if op's observed outcome is impossible from every state in the set."""
    kind = op["op"]
    done = op.get("ok", True)
    if kind == "get":
        v = op.get("result")
        return frozenset([v]) if v in state else frozenset()
    if kind == "put":
        if done:
            return frozenset([op["value"]])
        return state | frozenset([op["value"]])        # applied, or not (yet / ever)
    if kind == "cas":
        exp, new = op["expect"], op["value"]
        if done:
            if op["result"]:
                return frozenset([new]) if exp in state else frozenset()
            if "observed" in op:
                # the txn's Else branch read the key (Kubernetes' update / delete): the value
                # then is known, and it is not the expected one
                obs = op["observed"]
                return frozenset([obs]) if obs in state and obs != exp else frozenset()
            rest = state - frozenset([exp])
            return rest
        # indeterminate: nothing happened, or it succeeded, or it ran and failed
        return state | (frozenset([new]) if exp in state else frozenset())
    raise ValueError("unknown op %r" % kind)


class _Entry:
    __slots__ = ("op", "idx", "is_call", "time", "match", "prev", "next")

    def __init__(self, op, idx, is_call, t):
        self.op, self.idx, self.is_call, self.time = op, idx, is_call, t
        self.match = self.prev = self.next = None


def _build_list(ops):
    entries = []
    for i, op in enumerate(ops):
        end = op.get("end")
        c = _Entry(op, i, True, op["start"])
        r = _Entry(op, i, False, INF if end is None else end)
        c.match = r
        entries += [c, r]
    # by time; at equal times calls first (the more permissive reading: the two overlap)
    entries.sort(key=lambda e: (e.time, 0 if e.is_call else 1))
    head = _Entry(None, -1, False, -INF)
    prev = head
    for e in entries:
        prev.next = e
        e.prev = prev
        prev = e
    return head


def _lift(e):
    e.prev.next = e.next
    if e.next:
        e.next.prev = e.prev
    r = e.match
    r.prev.next = r.next
    if r.next:
        r.next.prev = r.prev


def _unlift(e):
    r = e.match
    r.prev.next = r
    if r.next:
        r.next.prev = r
    e.prev.next = e
    if e.next:
        e.next.prev = e


class Result:
    def __init__(self, ok, key, n_ops, explored, elapsed, detail=None, timed_out=False):
        self.ok, self.key, self.n_ops = ok, key, n_ops
        self.explored, self.elapsed, self.detail, self.timed_out = explored, elapsed, detail, timed_out

    def __repr__(self):
        s = "linearizable" if self.ok else ("UNKNOWN (time budget)" if self.timed_out
                                             else "NOT linearizable")
        return "key %r: %s (%d ops, %d states explored, %.2fs)" % (
            self.key, s, self.n_ops, self.explored, self.elapsed)


def check_ops(ops, key=None, init=ABSENT, budget_s=60.0):
    """Check one key's history. Returns a Result (ok True/False; timed_out when the time
    budget ran out, in which case ok is None)."""
    t0 = time.monotonic()
    ops = [o for o in ops if not (o["op"] == "get" and not o.get("ok", True))]
    n = len(ops)
    if n == 0:
        return Result(True, key, 0, 0, 0.0)
    head = _build_list(ops)
    state = frozenset([init])
    linearized = 0
    cache = set()
    calls = []            # stack of (entry, state before it)
    entry = head.next
    explored = 0
    longest = []          # the longest linearized prefix seen (for the report)
    deadline = t0 + budget_s
    while head.next is not None:
        explored += 1
        if explored & 0xFFF == 0 and time.monotonic() > deadline:
            return Result(None, key, n, explored, time.monotonic() - t0, timed_out=True)
        if entry.is_call:
            new_state = step(state, entry.op)
            if new_state:
                new_lin = linearized | (1 << entry.idx)
                ck = (new_lin, new_state)
                if ck not in cache:
                    cache.add(ck)
                    calls.append((entry, state))
                    state = new_state
                    linearized = new_lin
                    _lift(entry)
                    if len(calls) > len(longest):
                        longest = [c[0].op for c in calls]
                    entry = head.next
                    continue
            entry = entry.next
        else:
            # a return whose call is not linearized: backtrack
            if not calls:
                detail = _explain(ops, longest, entry)
                return Result(False, key, n, explored, time.monotonic() - t0, detail)
            e, state = calls.pop()
            linearized &= ~(1 << e.idx)
            _unlift(e)
            entry = e.next
    return Result(True, key, n, explored, time.monotonic() - t0)


def _explain(ops, longest, stuck):
    lines = ["longest linearizable prefix found (%d of %d ops), last 8:" % (
        len(longest), len(ops))]
    for o in longest[-8:]:
        lines.append("    " + fmt_op(o))
    lin_ids = {id(o) for o in longest}
    pending = [o for o in ops if id(o) not in lin_ids]
    pending.sort(key=lambda o: o["start"])
    lines.append("first ops that could not be placed after it:")
    for o in pending[:8]:
        lines.append("    " + fmt_op(o))
    return "\n".join(lines)


def fmt_op(o):
    end = o.get("end")
    res = ""
    if o["op"] == "get":
        res = "-> %r" % (o.get("result"),)
    elif o["op"] == "cas":
        res = "(%r -> %r) %s" % (o.get("expect"), o.get("value"),
                                 "?" if not o.get("ok", True) else
                                 ("succeeded" if o.get("result") else "failed"))
        if "observed" in o:
            res += ", read %r" % (o["observed"],)
    else:
        res = "%r%s" % (o.get("value"), "" if o.get("ok", True) else " ?")
    return "[%.6f .. %s] c%s %s %s %s%s" % (
        o["start"], "inf" if end is None else "%.6f" % end, o.get("client", "?"),
        o["op"], o.get("key", ""), res,
        ("  rev=%s member=%s" % (o.get("rev"), o.get("member"))) if "rev" in o else "")


def prune_unobserved(ops):
    """Drop indeterminate writes whose value nobody ever observed (no read returned it, no
    CAS expected it). Sound only for a "linearizable" answer (dropping an op removes
    possibilities); a "not linearizable" answer must be re-checked on the full history."""
    seen = set()
    for o in ops:
        if o["op"] == "get" and o.get("ok", True):
            seen.add(o.get("result"))
        if o["op"] == "cas":
            seen.add(o.get("expect"))
    return [o for o in ops if o.get("ok", True) or o["op"] == "get" or o["value"] in seen]


def drop_failed_cas(ops):
    return [o for o in ops if not (o["op"] == "cas" and o.get("ok", True) and
                                   not o.get("result"))]


def check_history(history, budget_s=60.0, init=ABSENT):
    """Per-key partitioned check. Returns {key: Result}.

    Indeterminate writes pending "forever" make the exact search exponential, so:
      1. P = the key's ops without indeterminate writes nobody observed (prune_unobserved).
         P linearizable => the history is (an op dropped is one that was never applied).
      2. Else Q = P without failed CASes. Q not linearizable => the history is not: in any
         linearization of the full history, an unobserved write can only be followed (until
         the next write) by failed CASes, which are read-only, so dropping both keeps a
         legal sequence.
      3. Else the full history, within the time budget (ok None if it runs out).
    """
    by_key = defaultdict(list)
    for o in history:
        if o["op"] in ("get", "put", "cas"):
            by_key[o["key"]].append(o)
    out = {}
    for k in sorted(by_key):
        ops = by_key[k]
        pruned = prune_unobserved(ops)
        r = check_ops(pruned, key=k, init=init, budget_s=budget_s)
        if r.ok is not True and len(pruned) != len(ops):
            q = drop_failed_cas(pruned)
            rq = check_ops(q, key=k, init=init, budget_s=budget_s)
            if rq.ok is False:
                rq.detail = ("(shown without unobserved indeterminate writes and failed "
                             "CASes, which cannot explain it)\n" + rq.detail)
                r = rq
            else:
                r = check_ops(ops, key=k, init=init, budget_s=budget_s)
        out[k] = r
    return out


def check_revisions(history):
    """Across members, responses must not go back in time: an op invoked after another op
    completed carries a header revision >= that op's (for successful ops with "rev")."""
    done = sorted((o for o in history if o.get("ok", True) and o.get("rev") is not None
                   and o.get("end") is not None), key=lambda o: o["end"])
    starts = sorted((o for o in history if o.get("ok", True) and o.get("rev") is not None),
                    key=lambda o: o["start"])
    problems = []
    j = 0
    best = None
    for o in starts:
        while j < len(done) and done[j]["end"] < o["start"]:
            if best is None or done[j]["rev"] > best["rev"]:
                best = done[j]
            j += 1
        if best is not None and o["rev"] < best["rev"]:
            problems.append((best, o))
    return problems


# ---------------------------------------------------------------------------------------
# unit tests on hand-made histories

def _op(i, client, kind, start, end, **kw):
    o = {"id": i, "client": client, "key": "x", "op": kind, "start": start, "end": end,
         "ok": end is not None}
    o.update(kw)
    return o


def self_test():
    import unittest

    P = lambda i, c, s, e, v: _op(i, c, "put", s, e, value=v)              # noqa
    G = lambda i, c, s, e, r: _op(i, c, "get", s, e, result=r)             # noqa
    C = lambda i, c, s, e, x, v, r=None: _op(i, c, "cas", s, e, expect=x, value=v, result=r)  # noqa

    class T(unittest.TestCase):
        def lin(self, h):
            r = check_ops(h, "x")
            self.assertTrue(r.ok, r)

        def notlin(self, h):
            r = check_ops(h, "x")
            self.assertFalse(r.ok, r)
            self.assertFalse(r.timed_out)

        def test_empty_and_initial_read(self):
            self.lin([])
            self.lin([G(0, 0, 0, 1, None)])
            self.notlin([G(0, 0, 0, 1, "a")])

        def test_sequential(self):
            self.lin([P(0, 0, 0, 1, "a"), G(1, 0, 2, 3, "a"), P(2, 0, 4, 5, "b"),
                      G(3, 1, 6, 7, "b")])

        def test_stale_read(self):
            # the put of b completed before the read began: reading a is stale
            self.notlin([P(0, 0, 0, 1, "a"), P(1, 0, 2, 3, "b"), G(2, 1, 4, 5, "a")])

        def test_concurrent_read_either(self):
            for v in ("a", "b"):
                self.lin([P(0, 0, 0, 1, "a"), P(1, 0, 2, 6, "b"), G(2, 1, 3, 4, v)])

        def test_read_never_written(self):
            self.notlin([P(0, 0, 0, 1, "a"), G(1, 1, 2, 3, "zz")])

        def test_read_goes_back(self):
            # two reads during a slow write: once b is seen, a later read may not see a
            self.lin([P(0, 0, 0, 1, "a"), P(1, 0, 2, 10, "b"), G(2, 1, 3, 4, "a"),
                      G(3, 1, 5, 6, "b")])
            self.notlin([P(0, 0, 0, 1, "a"), P(1, 0, 2, 10, "b"), G(2, 1, 3, 4, "b"),
                         G(3, 1, 5, 6, "a")])

        def test_lost_write(self):
            # an acknowledged write that later reads never see, with nothing after it
            self.notlin([P(0, 0, 0, 1, "a"), P(1, 1, 2, 3, "b"), G(2, 0, 4, 5, "a")])

        def test_indeterminate_write(self):
            # a timed-out write may apply at any later time, or never
            self.lin([P(0, 0, 0, 1, "a"), P(1, 1, 2, None, "b"), G(2, 0, 3, 4, "a"),
                      G(3, 0, 5, 6, "b")])
            self.lin([P(0, 0, 0, 1, "a"), P(1, 1, 2, None, "b"), G(2, 0, 3, 4, "a")])
            # ... but not before it was invoked
            self.notlin([P(0, 0, 0, 1, "a"), G(1, 0, 2, 3, "b"), P(2, 1, 4, None, "b")])
            # ... and once, not twice
            self.notlin([P(0, 0, 0, 1, "a"), P(1, 1, 2, None, "b"), G(2, 0, 3, 4, "b"),
                         P(3, 0, 5, 6, "c"), G(4, 0, 7, 8, "b")])

        def test_cas(self):
            self.lin([P(0, 0, 0, 1, "a"), C(1, 1, 2, 3, "a", "b", True), G(2, 0, 4, 5, "b")])
            self.notlin([P(0, 0, 0, 1, "a"), C(1, 1, 2, 3, "a", "b", False)])
            self.notlin([P(0, 0, 0, 1, "a"), C(1, 1, 2, 3, "z", "b", True)])
            self.lin([P(0, 0, 0, 1, "a"), C(1, 1, 2, 3, "z", "b", False), G(2, 0, 4, 5, "a")])
            # two CAS from the same value both succeeding: not linearizable
            self.notlin([P(0, 0, 0, 1, "a"), C(1, 1, 2, 5, "a", "b", True),
                         C(2, 2, 2, 5, "a", "c", True)])
            # concurrent: one wins, one fails
            self.lin([P(0, 0, 0, 1, "a"), C(1, 1, 2, 5, "a", "b", True),
                      C(2, 2, 2, 5, "a", "c", False), G(3, 0, 6, 7, "b")])

        def test_indeterminate_cas(self):
            self.lin([P(0, 0, 0, 1, "a"), C(1, 1, 2, None, "a", "b"), G(2, 0, 3, 4, "b")])
            self.lin([P(0, 0, 0, 1, "a"), C(1, 1, 2, None, "a", "b"), G(2, 0, 3, 4, "a")])
            self.notlin([P(0, 0, 0, 1, "a"), C(1, 1, 2, None, "q", "b"), G(2, 0, 3, 4, "b")])

        def test_cas_else_get(self):
            Co = lambda i, c, s, e, x, v, obs: dict(C(i, c, s, e, x, v, False), observed=obs)  # noqa
            self.lin([P(0, 0, 0, 1, "a"), P(1, 0, 2, 3, "b"), Co(2, 1, 4, 5, "a", "c", "b")])
            # the Else branch read a value that was not current
            self.notlin([P(0, 0, 0, 1, "a"), P(1, 0, 2, 3, "b"), Co(2, 1, 4, 5, "a", "c", "a")])
            # ... nor one equal to the expected one (the compare would have passed)
            self.notlin([P(0, 0, 0, 1, "b"), Co(1, 1, 2, 3, "b", "c", "b")])
            # a concurrent write explains it
            self.lin([P(0, 0, 0, 1, "a"), P(1, 0, 2, 6, "b"), Co(2, 1, 3, 5, "a", "c", "b")])
            # create (expects absent) and compare-and-delete (value None)
            self.lin([C(0, 0, 0, 1, None, "a", True), C(1, 1, 2, 3, "a", None, True),
                      G(2, 0, 4, 5, None), Co(3, 1, 6, 7, "a", "x", None)])
            self.notlin([C(0, 0, 0, 1, None, "a", True), C(1, 1, 2, 3, "a", None, True),
                         G(2, 0, 4, 5, "a")])
            self.notlin([C(0, 0, 0, 1, None, "a", True), C(1, 1, 2, 3, None, "b", True)])

        def test_other_kinds_skipped(self):
            h = [P(0, 0, 0, 1, "a"), dict(_op(1, 1, "list", 2, 3), key="/r/")]
            self.assertEqual(list(check_history(h)), ["x"])

        def test_failed_get_dropped(self):
            self.lin([P(0, 0, 0, 1, "a"), _op(1, 1, "get", 2, None, result="zzz")])

        def test_larger_concurrent(self):
            # 4 clients, overlapping writes and reads, one legal order exists
            h = [P(0, 0, 0, 10, "a"), P(1, 1, 1, 11, "b"), P(2, 2, 2, 12, "c"),
                 G(3, 3, 3, 13, "b"), G(4, 3, 14, 15, "c"), G(5, 0, 16, 17, "c")]
            self.lin(h)
            h[-1] = G(5, 0, 16, 17, "a")     # c was seen, a is older (a before b before c)
            self.notlin(h)

        def test_prune_keeps_answer(self):
            h = [P(0, 0, 0, 1, "a"), P(1, 1, 2, None, "never-read"), G(2, 0, 3, 4, "a")]
            self.assertEqual(len(prune_unobserved(h)), 2)
            r = check_history(h)
            self.assertTrue(r["x"].ok)

        def test_check_history_violation_with_unobserved_indeterminate(self):
            # 30 unobserved timed-out writes pending forever plus a stale read: found fast
            h = [P(0, 0, 0, 1, "a"), P(1, 0, 2, 3, "b")]
            h += [P(10 + i, 1 + i % 3, 1 + i * 0.1, None, "lost%d" % i) for i in range(30)]
            h += [G(100, 4, 10, 11, "a")]
            r = check_history(h, budget_s=10)["x"]
            self.assertIs(r.ok, False, r)
            # a failed CAS explained only by an unobserved indeterminate write: linearizable
            h = [P(0, 0, 0, 1, "a"), P(1, 1, 2, None, "w"), C(2, 0, 3, 4, "a", "q", False)]
            self.assertTrue(check_history(h)["x"].ok)
            self.lin(h)

        def test_revisions(self):
            h = [dict(P(0, 0, 0, 1, "a"), rev=5), dict(G(1, 1, 2, 3, "a"), rev=4)]
            self.assertEqual(len(check_revisions(h)), 1)
            h[1]["rev"] = 5
            self.assertEqual(check_revisions(h), [])

        def test_many_ops_fast(self):
            import random
            rnd = random.Random(1)
            h, t, val = [], 0.0, None
            for i in range(3000):      # a sequential history with jittered overlaps
                s = t
                t += 1.0
                if rnd.random() < 0.5:
                    val = "v%d" % i
                    h.append(P(i, i % 5, s, t + 0.4, val))
                else:
                    h.append(G(i, i % 5, s, t + 0.4, val))
            r = check_ops(h, "x", budget_s=30)
            self.assertTrue(r.ok, r)

    suite = unittest.defaultTestLoader.loadTestsFromTestCase(T)
    res = unittest.TextTestRunner(verbosity=2).run(suite)
    return 0 if res.wasSuccessful() else 1


def main(argv):
    if len(argv) > 1 and argv[1] == "--self-test":
        return self_test()
    if len(argv) < 2:
        print(__doc__)
        return 2
    with open(argv[1]) as f:
        history = json.load(f)
    if isinstance(history, dict):
        history = history["ops"]
    bad = 0
    for k, r in check_history(history).items():
        print(r)
        if r.ok is False:
            bad += 1
            print(r.detail)
    probs = check_revisions(history)
    for a, b in probs[:10]:
        print("revision went back: %s\n   then %s" % (fmt_op(a), fmt_op(b)))
    return 1 if bad or probs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
