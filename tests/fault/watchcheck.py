#!/usr/bin/python3
"""Checks of the watch streams recorded by the fault campaign (campaign.py, issue 10).

A watcher per member watches every key from revision 1, reconnecting after each failure from
the revision after the last one it saw. After the run a reference stream is read once more
from revision 1. An event is (revision, key, type, value, create_revision, version); the
campaign writes one key per revision (puts and single-put txns), so revisions are gapless.

check_streams(streams, reference, ops, first_rev, last_rev) returns a list of problems:
- every stream: revisions strictly increasing (no duplicates, never back in time);
- every stream: exactly the reference's events, in order, up to last_rev (no gaps, nothing
  extra, the same events on every member);
- the reference: one event per revision from first_rev to last_rev (no gaps);
- the reference agrees with the clients' history: every acknowledged write (a put, a txn
  that succeeded) is the event at its response revision with its key and value, and every
  event's value was written by some client (nothing invented); a compare-and-delete that
  succeeded is a DELETE event; a write refused with NOSPACE ("refused") never appears.

check_prefix_stream(name, events, prevs, progress, reference, prefix, last_rev): a watch of
one prefix with prev_kv and progress notifications (the Kubernetes profile):
- ordered and unique, and exactly the reference's events under the prefix (no gaps);
- prev_kv: the key's previous event in the reference (its value and mod revision), absent
  when the key did not exist before;
- a progress notification at revision X comes after every event <= X and before every
  event > X (never ahead of the stream).

check_lists(lists, reference): every paginated list (pinned at one revision) is exactly the
state under its prefix that the reference stream gives at that revision.

  watchcheck.py --self-test
"""

import bisect
import sys

PUT, DELETE = 0, 1


def ev_fmt(e):
    return "rev %d %s %s=%r (create %d, version %d)" % (
        e[0], "PUT" if e[2] == PUT else "DELETE", e[1], e[3], e[4], e[5])


def check_streams(streams, reference, ops, first_rev, last_rev, max_problems=20):
    """streams: {name: [event]}, reference: [event], ops: the campaign history."""
    problems = []

    def add(msg):
        if len(problems) < max_problems:
            problems.append(msg)

    # the reference itself: gapless, increasing
    revs = [e[0] for e in reference]
    want = list(range(first_rev, last_rev + 1))
    if revs != want:
        missing = sorted(set(want) - set(revs))
        extra = sorted(set(revs) - set(want))
        dup = len(revs) - len(set(revs))
        add("reference stream: %d events, expected revisions %d..%d; missing %s, extra %s, "
            "%d duplicates" % (len(revs), first_rev, last_rev, missing[:10], extra[:10], dup))
    by_rev = {e[0]: e for e in reference}

    # every member's live stream
    for name, evs in sorted(streams.items()):
        last = 0
        for e in evs:
            if e[0] <= last:
                add("%s: revision %d after %d (duplicate or back in time): %s" % (
                    name, e[0], last, ev_fmt(e)))
            last = max(last, e[0])
        upto = [e for e in reference if e[0] <= last_rev]
        got = [e for e in evs if e[0] <= last_rev]
        if got != upto:
            for i, (a, b) in enumerate(zip(got, upto)):
                if a != b:
                    add("%s: event %d is %s, the reference has %s" % (
                        name, i, ev_fmt(a), ev_fmt(b)))
                    break
            else:
                add("%s: %d events up to revision %d, the reference has %d (last seen %s)" % (
                    name, len(got), last_rev, len(upto), got[-1][0] if got else None))

    # the reference against what clients were told
    written = set()
    refused = set()
    for o in ops:
        if o["op"] not in ("put", "cas"):
            continue
        if "value" in o:
            if o["value"] is not None and (o["key"], o["value"]) in written:
                # the checks (and linearizability.py's model) need each value written once
                add("harness bug: %s=%r written twice" % (o["key"], o["value"]))
            written.add((o["key"], o["value"]))
            if o.get("refused"):
                refused.add((o["key"], o["value"]))
        if not o.get("ok"):
            continue
        if o["op"] == "cas" and not o.get("result"):
            continue
        e = by_rev.get(o.get("rev"))
        want = PUT if o["value"] is not None else DELETE
        if (e is None or e[1] != o["key"] or e[2] != want
                or (want == PUT and e[3] != o["value"])):
            add("acknowledged %s %s=%r at revision %s, the watch has %s" % (
                o["op"], o["key"], o["value"], o.get("rev"), e and ev_fmt(e)))
    for e in reference:
        if e[2] == PUT and (e[1], e[3]) not in written:
            add("event no client wrote: %s" % ev_fmt(e))
        if e[2] == PUT and (e[1], e[3]) in refused:
            add("a write refused with NOSPACE was applied: %s" % ev_fmt(e))
    return problems


def check_prefix_stream(name, events, prevs, progress, reference, prefix, last_rev,
                        max_problems=20):
    """events: [event] of one watch of prefix, prevs: the prev_kv of each ((value,
    mod_revision) or None), progress: [(number of events received before it, revision)]."""
    problems = []

    def add(msg):
        if len(problems) < max_problems:
            problems.append("%s %s: %s" % (name, prefix, msg))

    last = 0
    for e in events:
        if e[0] <= last:
            add("revision %d after %d (duplicate or back in time)" % (e[0], last))
        last = max(last, e[0])
    want = [e for e in reference if e[1].startswith(prefix) and e[0] <= last_rev]
    got = [e for e in events if e[0] <= last_rev]
    if got != want:
        for i, (a, b) in enumerate(zip(got, want)):
            if a != b:
                add("event %d is %s, the reference has %s" % (i, ev_fmt(a), ev_fmt(b)))
                break
        else:
            add("%d events up to revision %d, the reference has %d" % (
                len(got), last_rev, len(want)))
    # prev_kv from the reference: the key's event before this one
    before = {}
    latest = {}
    for e in reference:
        p = latest.get(e[1])
        before[(e[0], e[1])] = p
        latest[e[1]] = (e[3], e[0]) if e[2] == PUT else None
    for e, p in zip(events, prevs):
        if (e[0], e[1]) not in before:
            continue    # not in the reference: reported above
        w = before[(e[0], e[1])]
        if p != w:
            add("prev_kv of %s is %r, the key's previous state is %r" % (ev_fmt(e), p, w))
    # progress notifications: never ahead of the stream
    ref_revs = [e[0] for e in want]
    revs = [e[0] for e in events]
    if revs != sorted(revs):
        return problems      # out of order: reported above, the counting below needs order
    for n_before, x in progress:
        if x > last_rev:
            continue
        need = bisect.bisect_right(ref_revs, x)
        have = bisect.bisect_right(revs, x, 0, n_before)
        if have < need:
            add("progress notification at revision %d after %d events, but %d events "
                "under the prefix are <= %d" % (x, have, need, x))
        if n_before < len(revs) and revs[n_before] <= x:
            add("an event <= %d came after the progress notification at %d" % (x, x))
    return problems


def check_lists(lists, reference, max_problems=20):
    """lists: the history's ok "list" ops ({"key": prefix, "rev": R, "items": [[key, value,
    mod_revision, create_revision]], "count": total}). Returns problems."""
    problems = []
    by_prefix = {}
    for o in lists:
        by_prefix.setdefault(o["key"], []).append(o)
    ref_sorted = sorted(reference, key=lambda e: e[0])
    # per prefix, one sweep of its events (the state of every key would make each list cost
    # the whole key space: tens of thousands of event keys in a long Kubernetes run)
    for prefix, los in sorted(by_prefix.items()):
        ref = [e for e in ref_sorted if e[1].startswith(prefix)]
        state = {}        # key -> [value, mod_revision, create_revision]
        i = 0
        for o in sorted(los, key=lambda o: o["rev"]):
            while i < len(ref) and ref[i][0] <= o["rev"]:
                e = ref[i]
                if e[2] == PUT:
                    state[e[1]] = [e[3], e[0], e[4]]
                else:
                    state.pop(e[1], None)
                i += 1
            want = [[k] + v for k, v in sorted(state.items())]
            if o["items"] != want or (o.get("count") is not None and o["count"] != len(want)):
                if len(problems) < max_problems:
                    problems.append("list of %s at revision %d (%d pages, through %s): %r "
                                    "(count %s), the reference has %r" % (
                                        o["key"], o["rev"], o.get("pages", 0), o.get("member"),
                                        o["items"][:6], o.get("count"), want[:6]))
    return problems


def self_test():
    def ev(rev, key, value, create=2, version=1):
        return (rev, key, PUT, value, create, version)

    ref = [ev(2, "a", "x"), ev(3, "b", "y", 3), ev(4, "a", "z", 2, 2)]
    ops = [
        {"op": "put", "key": "a", "value": "x", "ok": True, "rev": 2},
        {"op": "cas", "key": "b", "value": "y", "ok": True, "result": True, "rev": 3},
        {"op": "put", "key": "a", "value": "z", "ok": False},        # indeterminate, applied
        {"op": "cas", "key": "a", "value": "q", "ok": True, "result": False, "rev": 4},
        {"op": "get", "key": "a", "ok": True, "result": "z", "rev": 4},
    ]
    ok = {"m1": list(ref), "m2": list(ref)}
    assert check_streams(ok, ref, ops, 2, 4) == [], check_streams(ok, ref, ops, 2, 4)
    cases = {
        "gap": ({"m1": [ref[0], ref[2]], "m2": list(ref)}, ref, ops),
        "duplicate": ({"m1": [ref[0], ref[1], ref[1], ref[2]], "m2": list(ref)}, ref, ops),
        "reorder": ({"m1": [ref[1], ref[0], ref[2]], "m2": list(ref)}, ref, ops),
        "short": ({"m1": ref[:2], "m2": list(ref)}, ref, ops),
        "wrong value": ({"m1": [ref[0], ev(3, "b", "w", 3), ref[2]], "m2": list(ref)},
                        ref, ops),
        "reference gap": (ok, [ref[0], ref[2]], ops),
        "ack not in watch": (ok, ref, ops + [
            {"op": "put", "key": "c", "value": "n", "ok": True, "rev": 3}]),
        "invented": ({"m1": ref + [ev(5, "c", "zz", 5)], "m2": ref + [ev(5, "c", "zz", 5)]},
                     ref + [ev(5, "c", "zz", 5)], ops),
    }
    for what, (streams, r, o) in cases.items():
        last = 5 if what == "invented" else 4
        probs = check_streams(streams, r, o, 2, last)
        assert probs, "self-test case %r found nothing" % what
    # a compare-and-delete and a refused write
    ref2 = ref + [(5, "a", DELETE, "", 0, 0)]
    ops2 = ops + [{"op": "cas", "key": "a", "expect": "z", "value": None, "ok": True,
                   "result": True, "rev": 5}]
    assert check_streams({"m1": ref2}, ref2, ops2, 2, 5) == []
    ops3 = ops2 + [{"op": "put", "key": "b", "value": "y", "ok": False, "refused": True}]
    assert check_streams({"m1": ref2}, ref2, ops3, 2, 5), "refused write applied: not found"
    bad = ops + [{"op": "cas", "key": "b", "expect": "y", "value": None, "ok": True,
                  "result": True, "rev": 4}]
    assert check_streams({"m1": ref}, ref, bad, 2, 4), "missing delete: not found"
    twice = ops + [{"op": "put", "key": "a", "value": "x", "ok": False}]
    assert check_streams({"m1": ref}, ref, twice, 2, 4), "value written twice: not found"

    # prefix streams: prev_kv and progress
    pref = [ev(2, "/p/a", "x"), ev(3, "/q/b", "y", 3), ev(4, "/p/a", "z", 2, 2),
            (5, "/p/a", DELETE, "", 0, 0), ev(6, "/p/a", "w", 6)]
    mine = [e for e in pref if e[1].startswith("/p/")]
    prevs = [None, ("x", 2), ("z", 4), None]
    assert check_prefix_stream("m1", mine, prevs, [(1, 3), (4, 6)], pref, "/p/", 6) == []
    cases2 = {
        "wrong prev": (mine, [None, ("x", 2), ("x", 2), None], []),
        "prev after delete": (mine, [None, ("x", 2), ("z", 4), ("z", 4)], []),
        "progress ahead": (mine, prevs, [(1, 4)]),
        "gap": ([mine[0], mine[2], mine[3]], [None, ("z", 4), None], []),
    }
    for what, (evs, pv, pr) in cases2.items():
        assert check_prefix_stream("m1", evs, pv, pr, pref, "/p/", 6), what

    # lists against the reference
    lst = {"key": "/p/", "rev": 4, "items": [["/p/a", "z", 4, 2]], "count": 1}
    assert check_lists([lst], pref) == []
    assert check_lists([dict(lst, rev=5, items=[], count=0)], pref) == []
    assert check_lists([dict(lst, rev=3, items=[["/p/a", "z", 4, 2]])], pref), "stale list"
    assert check_lists([dict(lst, count=2)], pref), "wrong count"
    # a long Kubernetes run's size: 40,000 event keys, 12,000 lists, 2,000 progress
    # notifications on a 40,000-event stream, in seconds (a sweep per list over every key
    # took minutes)
    import time
    big = [ev(r, "/registry/events/e%d" % r, "v%d" % r, r) for r in range(2, 40002)]
    big += [ev(40002 + r, "/registry/pods/p%d" % (r % 6), "p%d" % r, 40002 + r % 6)
            for r in range(6)]
    lsts = [{"key": "/registry/pods/", "rev": 40010, "count": 6,
             "items": [["/registry/pods/p%d" % k, "p%d" % k, 40002 + k, 40002 + k]
                       for k in range(6)]} for _ in range(12000)]
    t0 = time.monotonic()
    assert check_lists(lsts, big) == []
    evs = [e for e in big if e[1].startswith("/registry/events/")]
    prog = [(i * 20, evs[i * 20 - 1][0]) for i in range(1, 2000)]
    assert check_prefix_stream("m1", evs, [None] * len(evs), prog, big, "/registry/events/",
                               40007) == []
    took = time.monotonic() - t0
    assert took < 10, "checking a long run's lists and progress took %.1fs" % took
    print("watchcheck self-test: %d cases ok" % (len(cases) + len(cases2) + 9))
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        sys.exit(self_test())
    print(__doc__)
    sys.exit(2)
