#!/usr/bin/python3
"""A fault-injection campaign against a Keelson cluster (issue 10); a short one runs in CI
(run_fault.sh --short).

Concurrent clients do put / linearizable get / compare-and-set txns on a few keys through
random members and record a history (invoke and complete times, results; errors and
time-outs of writes as indeterminate). A watcher per member watches every key from revision
1 (resuming after each failure). Meanwhile a nemesis kills -9, pauses (SIGSTOP / SIGCONT)
and restarts random members and the leader, partitions the network (the peer links pass
through a netproxy.NetProxy: isolate a member or the leader, split minority | majority,
one-way drops, delays), and slows down or fails a member's disk (the LD_PRELOAD shim
slowdisk.c, given with --slowdisk). At the end every member is healed, the per-key
histories are checked for linearizability (linearizability.py), response revisions must
never go back in time, HashKV must agree on every member, the watch streams must be the
committed history on every member (watchcheck.py), and a member whose disk failed must
have stopped rather than go on.

  tests/fault/run_fault.sh --duration 300 --members 3 --seed 7
  /usr/bin/python3 tests/fault/campaign.py --help

Writes <out>/history.json, <out>/events.json, <out>/summary.json and the server logs
(<out>/logs/). Exit status 0 only if every check passed.
"""

import argparse
import json
import os
import random
import shutil
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))
sys.path.insert(0, HERE)

import harness  # noqa: E402
import cluster as clusterlib  # noqa: E402
import linearizability  # noqa: E402
import watchcheck  # noqa: E402

import grpc  # noqa: E402
from etcd3 import etcdrpc  # noqa: E402


class Recorder:
    def __init__(self, t0):
        self.t0 = t0
        self.ops = []
        self.events = []
        self.lock = threading.Lock()
        self.next_id = 0

    def now(self):
        return time.monotonic() - self.t0

    def new_id(self):
        with self.lock:
            self.next_id += 1
            return self.next_id

    def add(self, op):
        with self.lock:
            self.ops.append(op)

    def event(self, what, **kw):
        e = dict(kw, t=self.now(), what=what)
        with self.lock:
            self.events.append(e)
        print("  %8.3f  %s %s" % (e["t"], what, " ".join("%s=%s" % kv for kv in kw.items())),
              flush=True)


class Client(threading.Thread):
    def __init__(self, cid, c, rec, keys, stop, seed, timeout):
        super().__init__(daemon=True)
        self.cid, self.c, self.rec, self.keys, self.stop = cid, c, rec, keys, stop
        self.rnd = random.Random(seed)
        self.timeout = timeout
        self.stubs = {}
        self.last_seen = {}
        self.counter = 0

    def stub(self, m):
        s = self.stubs.get(m.name)
        if s is None:
            ch = grpc.insecure_channel(m.endpoint)
            s = self.stubs[m.name] = (ch, etcdrpc.KVStub(ch))
        return s[1]

    def run(self):
        while not self.stop.is_set():
            m = self.rnd.choice(self.c.members)
            key = self.rnd.choice(self.keys)
            r = self.rnd.random()
            if r < 0.4:
                self.do(m, key, "get")
            elif r < 0.7:
                self.do(m, key, "put")
            else:
                self.do(m, key, "cas")
        for ch, _ in self.stubs.values():
            ch.close()

    def value(self):
        self.counter += 1
        return "c%d-%d" % (self.cid, self.counter)

    def do(self, m, key, kind):
        kv = self.stub(m)
        op = {"id": self.rec.new_id(), "client": self.cid, "key": key, "op": kind,
              "member": m.name}
        bkey = key.encode()
        if kind == "get":
            req = etcdrpc.RangeRequest(key=bkey)
            call = kv.Range
        elif kind == "put":
            op["value"] = self.value()
            req = etcdrpc.PutRequest(key=bkey, value=op["value"].encode())
            call = kv.Put
        else:
            exp = self.last_seen.get(key)
            op["expect"], op["value"] = exp, self.value()
            if exp is None:
                cmp = etcdrpc.Compare(key=bkey, result=etcdrpc.Compare.EQUAL,
                                      target=etcdrpc.Compare.CREATE, create_revision=0)
            else:
                cmp = etcdrpc.Compare(key=bkey, result=etcdrpc.Compare.EQUAL,
                                      target=etcdrpc.Compare.VALUE, value=exp.encode())
            put = etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(
                key=bkey, value=op["value"].encode()))
            req = etcdrpc.TxnRequest(compare=[cmp], success=[put])
            call = kv.Txn
        op["start"] = self.rec.now()
        try:
            resp = call(req, timeout=self.timeout)
        except grpc.RpcError as e:
            op["end"] = None
            op["ok"] = False
            try:
                op["error"] = "%s: %s" % (e.code().name, e.details())
            except Exception:  # noqa
                op["error"] = str(e)[:200]
            if kind != "get":
                self.rec.add(op)   # indeterminate: may still take effect
            time.sleep(0.02)
            return
        op["end"] = self.rec.now()
        op["ok"] = True
        op["rev"] = resp.header.revision
        if kind == "get":
            op["result"] = resp.kvs[0].value.decode() if resp.kvs else None
            self.last_seen[key] = op["result"]
        elif kind == "cas":
            op["result"] = bool(resp.succeeded)
            if op["result"]:
                self.last_seen[key] = op["value"]
        else:
            self.last_seen[key] = op["value"]
        self.rec.add(op)


class Watcher(threading.Thread):
    """Watches every key from revision 1 on one member and keeps every event; after a
    failure (member killed, stream broken) it watches again from the revision after the
    last event it saw, so the stream must come out gapless and without duplicates."""

    def __init__(self, m, stop):
        super().__init__(daemon=True)
        self.m, self.stop = m, stop
        self.events = []
        self.last = 0
        self.reconnects = 0
        self.problems = []
        self.call = None
        self.lock = threading.Lock()

    def run(self):
        while not self.stop.is_set():
            ch = grpc.insecure_channel(self.m.endpoint)
            done = threading.Event()
            req = etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
                key=b"\0", range_end=b"\0", start_revision=self.last + 1))

            def reqs():
                yield req
                done.wait()

            try:
                with self.lock:
                    if self.stop.is_set():
                        break
                    self.call = etcdrpc.WatchStub(ch).Watch(reqs())
                for resp in self.call:
                    if resp.compact_revision:
                        self.problems.append("%s: watch from %d compacted at %d" % (
                            self.m.name, self.last + 1, resp.compact_revision))
                        self.stop.wait(1)
                        break
                    if resp.canceled:
                        self.problems.append("%s: watch canceled: %s" % (
                            self.m.name, resp.cancel_reason))
                        self.stop.wait(1)
                        break
                    for ev in resp.events:
                        kv = ev.kv
                        e = (kv.mod_revision, kv.key.decode("utf-8", "replace"), ev.type,
                             kv.value.decode("utf-8", "replace"), kv.create_revision,
                             kv.version)
                        self.events.append(e)
                        self.last = max(self.last, kv.mod_revision)
            except grpc.RpcError:
                pass
            except Exception as e:  # noqa
                self.problems.append("%s: watcher: %r" % (self.m.name, e))
            finally:
                done.set()
                ch.close()
            self.reconnects += 1
            self.stop.wait(0.2)

    def close(self):
        with self.lock:
            self.stop.set()
            if self.call is not None:
                self.call.cancel()
        self.join(5)


def read_reference(c, last_rev, timeout=30):
    """Every event from revision 1 to last_rev, watched afresh from a live member."""
    stop = threading.Event()
    for m in c.live():
        w = Watcher(m, stop)
        w.start()
        deadline = time.monotonic() + timeout
        while w.last < last_rev and time.monotonic() < deadline and w.is_alive():
            time.sleep(0.05)
        w.close()
        if w.last >= last_rev:
            return w.events, w.problems
        stop = threading.Event()
    raise RuntimeError("no member streamed the history up to revision %d" % last_rev)


DISK_FAULTS = ("slow-disk", "fail-disk")
NET_FAULTS = ("isolate", "isolate-leader", "split", "one-way", "one-way-leader", "delay")
# name: weight of the random choice
FAULTS = {"kill": 3, "kill-leader": 3, "pause": 3, "pause-leader": 2, "restart": 1,
          "pause-majority": 1, "kill-many": 1,
          "isolate": 2, "isolate-leader": 2, "split": 2, "one-way": 2, "one-way-leader": 2,
          "delay": 1, "slow-disk": 2, "fail-disk": 1}


def disk_control(m):
    return os.path.join(m.tmp, "disk-control")


def set_disk(m, text):
    """Writes m's slowdisk control file (write + rename: the shim never reads half)."""
    p = disk_control(m)
    with open(p + ".tmp", "w") as f:
        f.write(text + "\n")
    os.rename(p + ".tmp", p)


class Nemesis(threading.Thread):
    def __init__(self, c, rec, stop, seed, interval, max_down, faults, schedule=()):
        super().__init__(daemon=True)
        self.c, self.rec, self.stop = c, rec, stop
        self.rnd = random.Random(seed)
        self.interval = interval
        self.max_down = max_down
        self.faults = list(faults)
        self.schedule = list(schedule)   # done first, in this order
        self.error = None
        self.problems = []
        self.expected_crashes = set()    # (member name, start number) stopped by fail-disk
        self.count = 0

    def sleep(self, s):
        self.stop.wait(s)

    def leader_or_random(self, want_leader):
        if want_leader:
            try:
                return self.c.find_leader() or self.rnd.choice(self.c.members)
            except Exception:  # noqa
                pass
        return self.rnd.choice(self.c.members)

    def run(self):
        try:
            self._run()
        except Exception as e:  # noqa
            import traceback
            self.error = traceback.format_exc()
            self.rec.event("nemesis-error", error=str(e))

    def _run(self):
        c = self.c
        weights = [FAULTS[f] for f in self.faults]
        while not self.stop.is_set():
            self.sleep(self.rnd.uniform(*self.interval))
            if self.stop.is_set():
                break
            if self.schedule:
                f = self.schedule.pop(0)
            else:
                f = self.rnd.choices(self.faults, weights)[0]
            dur = self.rnd.uniform(0.5, 3.0)
            self.count += 1
            if f in NET_FAULTS:
                self.network(f, dur)
                continue
            if f in DISK_FAULTS:
                self.disk(f, dur)
                continue
            if f in ("kill", "kill-leader"):
                m = self.leader_or_random(f == "kill-leader")
                self.rec.event(f, member=m.name)
                c.kill9(m)
                self.sleep(dur)
                self.restart(m)
            elif f == "kill-many":
                ms = self.rnd.sample(c.members, self.max_down)
                self.rec.event(f, members=",".join(m.name for m in ms))
                for m in ms:
                    c.kill9(m)
                self.sleep(dur)
                for m in ms:
                    self.restart(m)
            elif f in ("pause", "pause-leader"):
                m = self.leader_or_random(f == "pause-leader")
                self.rec.event(f, member=m.name, seconds=round(dur, 2))
                c.pause(m)
                self.sleep(dur)
                c.resume(m)
                self.rec.event("resume", member=m.name)
            elif f == "pause-majority":
                ms = self.rnd.sample(c.members, len(c.members) // 2 + 1)
                d = min(dur, 1.5)
                self.rec.event(f, members=",".join(m.name for m in ms), seconds=round(d, 2))
                for m in ms:
                    c.pause(m)
                self.sleep(d)
                for m in ms:
                    c.resume(m)
                self.rec.event("resume", members=",".join(m.name for m in ms))
            elif f == "restart":
                m = self.rnd.choice(c.members)
                self.rec.event("graceful-restart", member=m.name)
                m.stop(timeout=10)
                self.restart(m)

    def network(self, f, dur):
        c, p = self.c, self.c.proxy
        names = [m.name for m in c.members]
        if f in ("isolate", "isolate-leader"):
            m = self.leader_or_random(f == "isolate-leader")
            self.rec.event(f, member=m.name, seconds=round(dur, 2))
            p.isolate(m.name)
        elif f == "split":
            minority = self.rnd.sample(names, (len(names) - 1) // 2)
            majority = [n for n in names if n not in minority]
            self.rec.event(f, minority=",".join(minority), majority=",".join(majority),
                           seconds=round(dur, 2))
            p.partition(minority, majority)
        elif f in ("one-way", "one-way-leader"):
            a = self.leader_or_random(f == "one-way-leader").name
            b = self.rnd.choice([n for n in names if n != a])
            self.rec.event(f, src=a, dst=b, seconds=round(dur, 2))
            p.set(a, b, "drop")
        elif f == "delay":
            m = self.rnd.choice(c.members)
            ms = self.rnd.randint(20, 150)
            self.rec.event(f, member=m.name, ms=ms, seconds=round(dur, 2))
            for n in names:
                if n != m.name:
                    p.set(m.name, n, "delay", ms)
                    p.set(n, m.name, "delay", ms)
        self.sleep(dur)
        p.heal()
        self.rec.event("heal")

    def disk(self, f, dur):
        m = self.rnd.choice(self.c.members)
        if f == "slow-disk":
            sync_ms, write_ms = self.rnd.randint(20, 300), self.rnd.randint(0, 20)
            self.rec.event(f, member=m.name, sync_ms=sync_ms, write_ms=write_ms,
                           seconds=round(dur, 2))
            set_disk(m, "sync_delay_ms=%d write_delay_ms=%d" % (sync_ms, write_ms))
            self.sleep(dur)
            set_disk(m, "")
            self.rec.event("disk-ok", member=m.name)
            return
        # fail-disk: every write and sync fails with EIO; the member must stop (crash)
        # rather than go on answering without its disk
        if not m.alive():
            return
        self.rec.event(f, member=m.name)
        self.expected_crashes.add((m.name, m._starts))
        set_disk(m, "fail=1")
        deadline = time.monotonic() + 15
        while m.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if m.alive():
            self.problems.append("%s kept running 15 s after its disk failed" % m.name)
            self.rec.event("disk-failed-member-still-running", member=m.name)
        else:
            self.rec.event("stopped-on-disk-failure", member=m.name,
                           status=m.proc.returncode)
        set_disk(m, "")
        self.sleep(min(dur, 1.0))
        self.restart(m)

    def restart(self, m):
        t = time.monotonic()
        try:
            self.c.restart(m, wait=False)
            self.rec.event("restarted", member=m.name)
        except Exception as e:  # noqa
            self.rec.event("restart-failed", member=m.name, error=str(e)[:300],
                           took=round(time.monotonic() - t, 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=120, help="seconds of faults")
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--keys", type=int, default=4)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--op-timeout", type=float, default=2.0)
    ap.add_argument("--fault-interval", default="1,4", help="min,max seconds between faults")
    ap.add_argument("--no-faults", action="store_true")
    ap.add_argument("--out", default=None, help="output dir (default: a new /tmp dir)")
    ap.add_argument("--check-budget", type=float, default=120, help="checker seconds per key")
    ap.add_argument("--binary", default=None)
    ap.add_argument("--faults", default=",".join(FAULTS),
                    help="comma-separated faults to choose from (default: all): %s" %
                    ", ".join(FAULTS))
    ap.add_argument("--schedule", default="",
                    help="comma-separated faults done first, in this order")
    ap.add_argument("--slowdisk", default=None,
                    help="libslowdisk.so (bazel build //tests/fault:libslowdisk.so); "
                    "without it there are no disk faults")
    ap.add_argument("--no-watch", action="store_true", help="no watchers, no watch checks")
    opts = ap.parse_args()

    seed = opts.seed if opts.seed is not None else random.randrange(1 << 30)
    out = opts.out or "/tmp/keelson-fault-%s-seed%d" % (time.strftime("%Y%m%d-%H%M%S"), seed)
    os.makedirs(out, exist_ok=True)
    print("seed %d, %d members, %d clients, %d keys, %.0fs; output in %s" % (
        seed, opts.members, opts.clients, opts.keys, opts.duration, out), flush=True)

    faults = [f for f in opts.faults.split(",") if f]
    schedule = [f for f in opts.schedule.split(",") if f]
    for f in faults + schedule:
        if f not in FAULTS:
            ap.error("unknown fault %r" % f)
    c = clusterlib.Cluster(opts.members, label="fault", proxy=True,
                           binary=os.path.abspath(opts.binary) if opts.binary else None)
    if opts.slowdisk and os.path.basename(c.binary) != "etcd":   # (Go does not use libc)
        for m in c.members:
            m.env = {"LD_PRELOAD": os.path.abspath(opts.slowdisk),
                     "SLOWDISK_CONTROL": disk_control(m)}
    else:
        faults = [f for f in faults if f not in DISK_FAULTS]
        schedule = [f for f in schedule if f not in DISK_FAULTS]
    c.start()
    summary = {"seed": seed, "members": opts.members, "duration": opts.duration,
               "binary": c.binary, "faults_enabled": faults}
    ok = True
    wstop = threading.Event()
    watchers = []
    try:
        rec = Recorder(time.monotonic())
        stop = threading.Event()
        keys = ["/f/k%d" % i for i in range(opts.keys)]
        clients = [Client(i, c, rec, keys, stop, seed * 1000 + i, opts.op_timeout)
                   for i in range(opts.clients)]
        lo, hi = (float(x) for x in opts.fault_interval.split(","))
        nem = Nemesis(c, rec, stop, seed, (lo, hi), max(1, (opts.members - 1) // 2),
                      faults, schedule)
        if not opts.no_watch:
            watchers = [Watcher(m, wstop) for m in c.members]
            for w in watchers:
                w.start()
        for cl in clients:
            cl.start()
        if not opts.no_faults:
            nem.start()
        rec.event("start")
        time.sleep(opts.duration)
        stop.set()
        for cl in clients:
            cl.join(opts.op_timeout + 10)
        if nem.is_alive():
            nem.join(60)
        rec.event("stopped")

        # heal everything, then the final checks
        c.proxy.heal()
        for m in c.members:
            if m.env.get("SLOWDISK_CONTROL"):
                set_disk(m, "")
        for m in c.members:
            m.resume()
        for m in c.members:
            if not m.alive():
                rec.event("final-restart", member=m.name)
                c.restart(m, wait=False)
        heal_problems = []
        try:
            c.wait_leader(timeout=60)
            c.wait_healthy(timeout=60)
            idx, rev = c.wait_converged(timeout=60)
            hs = c.hashkv(rev=rev)
            summary["final"] = {"raft_index": idx, "revision": rev, "hashkv": hs}
            if len(set(hs.values())) != 1:
                heal_problems.append("HashKV differs at revision %d: %r" % (rev, hs))
        except Exception as e:  # noqa
            heal_problems.append("cluster did not heal: %s" % e)
        # final linearizable reads of every key through every member, into the history
        fin = Client(999, c, rec, keys, threading.Event(), 0, 10.0)
        for m in c.members:
            for k in keys:
                fin.do(m, k, "get")
        fin_failed = [o for o in rec.ops if o["client"] == 999 and not o.get("ok")]
        if fin_failed:
            heal_problems.append("final reads failed: %r" % fin_failed[:3])
        heal_problems.extend(nem.problems)

        ops = sorted(rec.ops, key=lambda o: o["start"])
        with open(os.path.join(out, "history.json"), "w") as f:
            json.dump(ops, f)
        with open(os.path.join(out, "events.json"), "w") as f:
            json.dump(rec.events, f, indent=1)
        n_ok = sum(1 for o in ops if o.get("ok"))
        n_ind = sum(1 for o in ops if not o.get("ok"))
        kinds = {}
        for o in ops:
            kinds[o["op"]] = kinds.get(o["op"], 0) + 1
        summary.update({"ops": len(ops), "ok": n_ok, "indeterminate": n_ind, "kinds": kinds,
                        "faults": nem.count,
                        "heal_problems": heal_problems})
        if nem.error:
            summary["nemesis_error"] = nem.error
            heal_problems.append("nemesis failed: " + nem.error)
        print("history: %d ops (%d ok, %d indeterminate writes), %s; %d faults" % (
            len(ops), n_ok, n_ind, kinds, summary["faults"]), flush=True)

        t = time.monotonic()
        results = linearizability.check_history(ops, budget_s=opts.check_budget)
        lin = {}
        for k, r in results.items():
            print("  %r" % r)
            lin[k] = {"ok": r.ok, "ops": r.n_ops, "explored": r.explored,
                      "seconds": round(r.elapsed, 2)}
            if r.ok is False:
                print(r.detail)
                lin[k]["detail"] = r.detail
                ok = False
            elif r.ok is None:
                lin[k]["detail"] = "time budget exhausted"
        summary["linearizability"] = lin
        summary["check_seconds"] = round(time.monotonic() - t, 1)
        probs = linearizability.check_revisions(ops)
        summary["revision_regressions"] = len(probs)
        for a, b in probs[:10]:
            print("revision went back in time:\n    %s\n    %s" % (
                linearizability.fmt_op(a), linearizability.fmt_op(b)))
        if probs:
            ok = False
        # watch: every member's stream is the committed history
        if watchers:
            wprobs = []
            try:
                idx, last_rev = c.wait_converged(timeout=30)
                deadline = time.monotonic() + 30
                while (any(w.last < last_rev for w in watchers)
                       and time.monotonic() < deadline):
                    time.sleep(0.05)
                for w in watchers:
                    w.close()
                    wprobs.extend(w.problems)
                ref, refprobs = read_reference(c, last_rev)
                wprobs.extend(refprobs)
                wprobs.extend(watchcheck.check_streams(
                    {w.m.name: w.events for w in watchers}, ref, ops, 2, last_rev))
                summary["watch"] = {"last_revision": last_rev, "events": len(ref),
                                    "reconnects": {w.m.name: w.reconnects for w in watchers}}
                print("watch: %d events up to revision %d on %d members, reconnects %s" % (
                    len(ref), last_rev, len(watchers), summary["watch"]["reconnects"]))
            except Exception as e:  # noqa
                wprobs.append("watch check failed: %s" % e)
            summary["watch_problems"] = wprobs
            for p in wprobs:
                print("WATCH: " + p)
                ok = False
        for p in heal_problems:
            print("PROBLEM: " + p)
            ok = False
        # per member: servers that died on their own (not killed by the nemesis)
        crashed = []
        for m in c.members:
            for i in range(1, m._starts + 1):
                if (m.name, i) in nem.expected_crashes:
                    continue   # stopped on purpose: its disk failed
                p = os.path.join(m.tmp, "server-%d.log" % i)
                if os.path.exists(p):
                    txt = open(p, "rb").read().decode("utf-8", "replace")
                    for marker in ("panic", "Assertion", "AddressSanitizer", "SIGSEGV",
                                   "runtime error", "fatal"):
                        if marker in txt:
                            crashed.append("%s: %s" % (p, marker))
                            break
        summary["log_markers"] = crashed
        for x in crashed:
            print("LOG: " + x)
    finally:
        wstop.set()
        for w in watchers:
            w.close()
        logdir = os.path.join(out, "logs")
        os.makedirs(logdir, exist_ok=True)
        for m in c.members:
            for i in range(1, m._starts + 1):
                p = os.path.join(m.tmp, "server-%d.log" % i)
                if os.path.exists(p):
                    shutil.copy(p, os.path.join(logdir, "%s-%d.log" % (m.name, i)))
        c.cleanup()
    summary["result"] = "PASS" if ok else "FAIL"
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print("%s  (seed %d, output %s)" % (summary["result"], seed, out))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
