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
  event's value was written by some client (nothing invented).

  watchcheck.py --self-test
"""

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
    for o in ops:
        if o["op"] in ("put", "cas") and "value" in o:
            written.add((o["key"], o["value"]))
        if not o.get("ok") or o["op"] == "get":
            continue
        if o["op"] == "cas" and not o.get("result"):
            continue
        e = by_rev.get(o.get("rev"))
        if e is None or e[1] != o["key"] or e[3] != o["value"] or e[2] != PUT:
            add("acknowledged %s %s=%r at revision %s, the watch has %s" % (
                o["op"], o["key"], o["value"], o.get("rev"), e and ev_fmt(e)))
    for e in reference:
        if e[2] == PUT and (e[1], e[3]) not in written:
            add("event no client wrote: %s" % ev_fmt(e))
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
    print("watchcheck self-test: %d cases ok" % (len(cases) + 1))
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        sys.exit(self_test())
    print(__doc__)
    sys.exit(2)
