#!/usr/bin/python3
"""A fault-injection campaign against a Keelson cluster (issue 10); a short one runs in CI
(run_fault.sh --short).

Concurrent clients do put / linearizable get / compare-and-set txns on a few keys through
random members and record a history (invoke and complete times, results; errors and
time-outs of writes as indeterminate). A watcher per member watches every key from revision
1 (resuming after each failure). Meanwhile a nemesis kills -9, pauses (SIGSTOP / SIGCONT)
and restarts random members and the leader, partitions the network (the peer links pass
through a netproxy.NetProxy: isolate a member or the leader, split minority | majority,
one-way drops, delays), slows down, fails or fills a member's disk (the LD_PRELOAD shim
slowdisk.c, given with --slowdisk), fills the space quota (NOSPACE, then compact, defragment,
disarm) and replaces members (remove, wipe, add). --workload k8s runs the Kubernetes profile
(k8s_workload.py) with per-resource watchers (prev_kv, progress notifications). At the end every member is healed, the per-key
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
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))
sys.path.insert(0, HERE)

import harness  # noqa: E402
import cluster as clusterlib  # noqa: E402
import k8s_workload  # noqa: E402
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


def ev_value(b):
    """An event's / item's value as the checkers keep it: big values (the NOSPACE filler) by
    their digest, so that watchers do not keep megabytes."""
    if len(b) > 1024:
        return "sha1:" + hashlib.sha1(b).hexdigest()
    return b.decode("utf-8", "replace")


# A WatchRequest{progress_request: {}} (field 3, empty): python3-etcd3's protobufs predate it.
PROGRESS_REQUEST = b"\x1a\x00"


class Watcher(threading.Thread):
    """Watches every key (or one prefix) from start_rev on one member and keeps every event;
    after a failure (member killed, stream broken) it watches again from the revision after
    the last event it saw, so the stream must come out gapless and without duplicates.
    prev_kv: keep each event's prev_kv (self.prevs); progress: ask for progress
    notifications (and request one every second) and keep them (self.progress)."""

    def __init__(self, m, stop, start_rev=1, prefix=None, prev_kv=False, progress=False):
        super().__init__(daemon=True)
        self.m, self.stop = m, stop
        self.prefix, self.prev_kv, self.want_progress = prefix, prev_kv, progress
        self.events = []
        self.prevs = []
        self.progress = []      # (number of events received before it, revision)
        self.last = start_rev - 1
        self.reconnects = 0
        self.problems = []
        self.call = None
        self.lock = threading.Lock()

    def name(self):
        return self.m.name + (" " + self.prefix if self.prefix else "")

    def run(self):
        while not self.stop.is_set():
            # (a catch-up response may carry many NOSPACE filler values: past gRPC's 4 MiB)
            ch = grpc.insecure_channel(self.m.endpoint,
                                       options=[("grpc.max_receive_message_length", -1)])
            done = threading.Event()
            if self.prefix:
                key, end = self.prefix.encode(), k8s_workload.prefix_end(self.prefix)
            else:
                key, end = b"\0", b"\0"
            req = etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
                key=key, range_end=end, start_revision=self.last + 1,
                prev_kv=self.prev_kv, progress_notify=self.want_progress))

            def reqs():
                yield req.SerializeToString()
                while not done.wait(1.0):
                    if self.want_progress:
                        yield PROGRESS_REQUEST

            try:
                with self.lock:
                    if self.stop.is_set():
                        break
                    watch = ch.stream_stream("/etcdserverpb.Watch/Watch",
                                             request_serializer=lambda b: b,
                                             response_deserializer=etcdrpc.WatchResponse.FromString)
                    self.call = watch(reqs())
                for resp in self.call:
                    if resp.compact_revision:
                        self.problems.append("%s: watch from %d compacted at %d" % (
                            self.name(), self.last + 1, resp.compact_revision))
                        self.stop.wait(1)
                        break
                    if resp.canceled:
                        self.problems.append("%s: watch canceled: %s" % (
                            self.name(), resp.cancel_reason))
                        self.stop.wait(1)
                        break
                    if not resp.events:
                        if not resp.created and self.want_progress:
                            # every event <= this revision has been sent: resume after it
                            self.progress.append((len(self.events), resp.header.revision))
                            self.last = max(self.last, resp.header.revision)
                        continue
                    for ev in resp.events:
                        kv = ev.kv
                        e = (kv.mod_revision, kv.key.decode("utf-8", "replace"), ev.type,
                             ev_value(kv.value), kv.create_revision, kv.version)
                        self.events.append(e)
                        if self.prev_kv:
                            p = ev.prev_kv if ev.HasField("prev_kv") else None
                            self.prevs.append(None if p is None or not p.key else
                                              (ev_value(p.value), p.mod_revision))
                        self.last = max(self.last, kv.mod_revision)
            except grpc.RpcError:
                pass
            except Exception as e:  # noqa
                self.problems.append("%s: watcher: %r" % (self.name(), e))
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


def read_reference(c, last_rev, from_rev=1, timeout=30):
    """Every event from from_rev to last_rev, watched afresh from a live member."""
    stop = threading.Event()
    for m in c.live():
        w = Watcher(m, stop, start_rev=from_rev)
        w.start()
        deadline = time.monotonic() + timeout
        while w.last < last_rev and time.monotonic() < deadline and w.is_alive():
            time.sleep(0.05)
        w.close()
        if w.last >= last_rev:
            return [e for e in w.events if e[0] <= last_rev], w.problems
        stop = threading.Event()
    raise RuntimeError("no member streamed the history from revision %d up to %d" % (
        from_rev, last_rev))


DISK_FAULTS = ("slow-disk", "fail-disk", "disk-full")
NET_FAULTS = ("isolate", "isolate-leader", "split", "one-way", "one-way-leader", "delay")
# name: weight of the random choice
FAULTS = {"kill": 3, "kill-leader": 3, "pause": 3, "pause-leader": 2, "restart": 1,
          "pause-majority": 1, "kill-many": 1,
          "isolate": 2, "isolate-leader": 2, "split": 2, "one-way": 2, "one-way-leader": 2,
          "delay": 1, "slow-disk": 2, "fail-disk": 1, "disk-full": 1,
          "replace": 1, "nospace": 1}
NOSPACE_ERROR = "etcdserver: mvcc: database space exceeded"
FILL_VALUE_BYTES = 256 * 1024


def disk_control(m):
    return os.path.join(m.tmp, "disk-control")


def set_disk(m, text):
    """Writes m's slowdisk control file (write + rename: the shim never reads half)."""
    p = disk_control(m)
    with open(p + ".tmp", "w") as f:
        f.write(text + "\n")
    os.rename(p + ".tmp", p)


def ctl_retry(members, *args, timeout=20, retry_on=("etcdserver: unhealthy cluster",)):
    """etcdctl through the first member that answers; retried while the error is one of
    retry_on (etcd refuses reconfiguration until every member has been connected ~5 s) or
    the member does not answer. Returns the last Result."""
    deadline = time.monotonic() + timeout
    r = None
    while True:
        for m in members:
            if not m.alive() or m.paused:
                continue
            try:
                r = harness.etcdctl(m.endpoint, "--command-timeout=5s", *args, timeout=15)
            except subprocess.TimeoutExpired:
                continue
            if r.rc == 0:
                return r
            if not any(x in r.stderr for x in retry_on + ("context deadline exceeded",
                                                          "no leader", "connection refused")):
                return r
        if time.monotonic() > deadline:
            return r
        time.sleep(0.3)


class Nemesis(threading.Thread):
    def __init__(self, c, rec, stop, seed, interval, max_down, faults, schedule=(),
                 quota_bytes=0, replace_urls="both", replace_target="any"):
        super().__init__(daemon=True)
        self.replace_target = replace_target
        self.replace_urls = replace_urls
        self.quota_bytes = quota_bytes
        self.watchers = []               # every watcher: caught up before a compaction
        self.ref_saved = []              # the reference stream up to ref_upto, read before
        self.ref_upto = 0                # a compaction (nospace) made it unreadable
        self.by_kind = {}
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
            if self.quota_bytes and self.nospace_raised() and self.all_healthy():
                # the workload filled the quota on its own: recover as an operator would
                self.by_kind["nospace-recover"] = self.by_kind.get("nospace-recover", 0) + 1
                self.rec.event("nospace-found")
                self.nospace_recover([], self.by_kind["nospace-recover"] + 1000)
                continue
            if self.schedule:
                f = self.schedule.pop(0)
            else:
                f = self.rnd.choices(self.faults, weights)[0]
            dur = self.rnd.uniform(0.5, 3.0)
            self.count += 1
            self.by_kind[f] = self.by_kind.get(f, 0) + 1
            if f == "replace":
                self.replace()
                continue
            if f == "nospace":
                self.nospace()
                continue
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
        if f == "disk-full":
            self.disk_full(dur)
            return
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
        t_fail = self.rec.now()
        deadline = time.monotonic() + 15
        while m.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if m.alive():
            # only a member that had something to write must have stopped: the cluster may
            # have taken no write meanwhile (NOSPACE raised, no quorum)
            t_end = self.rec.now()
            with self.rec.lock:
                writes = sum(1 for o in self.rec.ops if o.get("ok") and o["op"] in (
                    "put", "cas") and o.get("result", True) and t_fail < o["end"] < t_end)
            if writes:
                self.problems.append("%s kept running 15 s after its disk failed (%d writes "
                                     "acknowledged meanwhile)" % (m.name, writes))
            self.rec.event("disk-failed-member-still-running", member=m.name,
                           writes_meanwhile=writes)
        else:
            self.rec.event("stopped-on-disk-failure", member=m.name,
                           status=m.proc.returncode)
        set_disk(m, "")
        self.sleep(min(dur, 1.0))
        self.restart(m)

    def disk_full(self, dur):
        """The member's disk is full (every write, sync, ftruncate, fallocate fails with
        ENOSPC) for dur seconds: it must stop, or go on refusing writes, and never lie (the
        checkers: no acknowledged write lost, HashKV equal); when space comes back it is
        restarted and must catch up."""
        m = self.leader_or_random(self.rnd.random() < 0.5)
        if not m.alive():
            return
        self.rec.event("disk-full", member=m.name, seconds=round(dur, 2))
        self.expected_crashes.add((m.name, m._starts))
        set_disk(m, "enospc=1")
        self.sleep(dur)
        stopped = not m.alive()
        set_disk(m, "")
        self.rec.event("disk-space-back", member=m.name, stopped=stopped,
                       status=m.proc.returncode if stopped else None)
        self.restart(m)

    def all_healthy(self, timeout=20):
        try:
            for m in self.c.members:
                if not m.alive():
                    return False
                m.resume()
            self.c.wait_healthy(self.c.members, timeout=timeout)
            return True
        except Exception:  # noqa
            return False

    def replace(self):
        """Member replacement: member remove, wipe its data dir, member add of a fresh member
        (same name and client address; the same peer address, or a new one: --replace-urls)
        started with --initial-cluster-state existing, while the workload runs. It must get
        a new id (etcd mixes the time into it), catch up, and end with the same HashKV."""
        c = self.c
        if not self.all_healthy():
            self.rec.event("replace-skipped", reason="cluster not healthy")
            return
        if self.replace_target == "follower":
            ldr = c.find_leader()
            cands = [o for o in c.members if o is not ldr]
            m = self.rnd.choice(cands)
        else:
            m = self.leader_or_random(self.rnd.random() < 0.3)
        if m.status() is None or m.member_id is None:
            self.rec.event("replace-skipped", reason="no status from " + m.name)
            return
        others = [o for o in c.members if o is not m]
        old_id = m.member_id
        self.rec.event("replace", member=m.name, id=old_id)
        r = ctl_retry(others, "member", "remove", old_id)
        if r is None or r.rc != 0:
            self.rec.event("replace-remove-failed", member=m.name, error=r and r.stderr[-300:])
            if r is not None and "unhealthy cluster" not in r.stderr:
                self.problems.append("member remove %s failed: %r" % (old_id, r))
            return
        # etcd: the removed member notices and exits
        try:
            m.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.problems.append("removed member %s (%s) still running 20 s after its removal"
                                 % (m.name, old_id))
            m.kill9()
        self.rec.event("removed", member=m.name, status=m.proc.returncode)
        shutil.rmtree(m.data_dir, ignore_errors=True)
        mode = self.replace_urls if self.replace_urls != "both" else self.rnd.choice(
            ("same", "new"))
        if mode == "new":
            # a new machine: a new peer address (and its own proxy listener)
            m._wait_ports_free()
            m.peer_port = harness.free_port()
            m.proxy_port = c.proxy.add_member(m.name, m.peer_port, harness.free_port())
        r = ctl_retry(others, "member", "add", m.name, "--peer-urls=" + m.advertise_peer_url,
                      timeout=60)
        mo = r is not None and re.search(r"Member\s+([0-9a-f]+) added", r.stdout)
        if not mo:
            self.problems.append("member add %s after its removal failed: %r" % (m.name, r))
            self.rec.event("replace-add-failed", member=m.name)
            return
        if mo.group(1) == old_id:
            self.problems.append("member add gave %s the id %s of the member just removed "
                                 "(etcd: a new id)" % (m.name, old_id))
        m.member_id = mo.group(1)
        m.state = "existing"
        m.initial_cluster = None
        c.learn_proxy_ids()
        self.restart(m)
        try:
            c.wait_healthy([m], timeout=60)
            self.rec.event("replaced", member=m.name, id=m.member_id, urls=mode)
        except Exception as e:  # noqa
            self.problems.append("replacement %s (%s) not healthy in 60 s: %s" % (
                m.name, m.member_id, str(e)[:300]))

    def kv_call(self, m, fn, *a):
        ch = grpc.insecure_channel(m.endpoint)
        try:
            return fn(etcdrpc.KVStub(ch), *a)
        finally:
            ch.close()

    def record_write(self, m, key, raw, delete=False):
        """One nemesis write (a put of raw, or a delete), recorded in the history. Returns
        (ok, error text, response)."""
        op = {"id": self.rec.new_id(), "client": -1, "key": key, "op": "put",
              "value": None if delete else ev_value(raw), "member": m.name,
              "start": self.rec.now()}
        try:
            if delete:
                resp = self.kv_call(m, lambda kv: kv.DeleteRange(
                    etcdrpc.DeleteRangeRequest(key=key.encode()), timeout=5))
            else:
                resp = self.kv_call(m, lambda kv: kv.Put(
                    etcdrpc.PutRequest(key=key.encode(), value=raw), timeout=5))
        except grpc.RpcError as e:
            op.update(end=None, ok=False)
            try:
                op["error"] = "%s: %s" % (e.code().name, e.details())
            except Exception:  # noqa
                op["error"] = str(e)[:200]
            if NOSPACE_ERROR in op["error"]:
                op["refused"] = True
            self.rec.add(op)
            return False, op["error"], None
        op.update(end=self.rec.now(), ok=True, rev=resp.header.revision)
        if delete and resp.deleted == 0:
            # nothing deleted, no revision: a linearizable observation of absence
            op.update(op="get", result=None)
            del op["value"]
        self.rec.add(op)
        return True, None, resp

    def alarms(self, m):
        r = harness.etcdctl(m.endpoint, "--command-timeout=5s", "alarm", "list", timeout=15)
        return r.stdout if r.rc == 0 else None

    def save_reference(self, rev):
        """Reads the reference stream up to rev (from where the last save ended): kept, as a
        compaction at rev makes it unreadable."""
        evs, probs = read_reference(self.c, rev, from_rev=self.ref_upto + 1)
        self.ref_saved.extend(evs)
        self.ref_upto = rev
        self.problems.extend(probs)

    def nospace(self):
        """etcd's space quota (--quota-backend-bytes) under the campaign load: fill until a
        write is refused with NOSPACE_ERROR, check the NOSPACE alarm is raised on every
        member and every member refuses writes, then delete the filler, compact, defragment
        every member, disarm, and writes must resume. Refused writes are in the history
        ("refused"): the watch check makes sure none of them was applied."""
        c = self.c
        if not self.quota_bytes:
            return
        if not self.all_healthy():
            self.rec.event("nospace-skipped", reason="cluster not healthy")
            return
        n = self.by_kind.get("nospace", 0)
        self.rec.event("nospace", quota=self.quota_bytes)
        filled, refused = [], None
        deadline = time.monotonic() + 120
        max_puts = self.quota_bytes // FILL_VALUE_BYTES * 4 + 100
        i = 0
        while time.monotonic() < deadline and i < max_puts and not self.stop.is_set():
            m = self.rnd.choice(c.live() or c.members)
            key = "/fill/%d/%d" % (n, i)
            raw = ("%s:" % key).encode() + os.urandom(FILL_VALUE_BYTES // 2).hex().encode()
            i += 1
            ok, err, _ = self.record_write(m, key, raw)
            filled.append(key)
            if not ok and NOSPACE_ERROR in err:
                refused = err
                break
            if not ok:
                time.sleep(0.1)
        if refused is None:
            if not self.stop.is_set():
                self.problems.append("no NOSPACE after %d writes of %d bytes (quota %d)" % (
                    i, FILL_VALUE_BYTES, self.quota_bytes))
        else:
            self.rec.event("nospace-refused", writes=i, error=refused)
            # the alarm is raised everywhere, and every member refuses a small write
            t_end = time.monotonic() + 15
            missing = list(c.members)
            while missing and time.monotonic() < t_end:
                missing = [m for m in missing if "alarm:NOSPACE" not in (self.alarms(m) or "")]
                if missing:
                    time.sleep(0.2)
            if missing:
                self.problems.append("NOSPACE alarm not listed by %s" % [m.name for m in missing])
            for m in c.members:
                ok, err, _ = self.record_write(m, "/fill/%d/probe-%s" % (n, m.name), b"small")
                if ok:
                    self.problems.append("%s accepted a write with the NOSPACE alarm raised"
                                         % m.name)
                elif NOSPACE_ERROR not in err:
                    self.rec.event("nospace-probe-error", member=m.name, error=err)
        self.nospace_recover(filled, n)

    def nospace_raised(self):
        for m in self.c.live():
            try:
                a = self.alarms(m)
            except subprocess.TimeoutExpired:
                continue
            if a is not None:
                return "alarm:NOSPACE" in a
        return False

    def nospace_recover(self, filled, n):
        """Deletes the filler keys (one a revision), saves the reference stream, compacts at
        the current revision, defragments every member, disarms; writes must resume."""
        c = self.c
        err = None
        rev = 0
        for key in filled:
            for attempt in range(20):
                m = self.rnd.choice(c.live() or c.members)
                ok, err, resp = self.record_write(m, key, None, delete=True)
                if ok:
                    rev = max(rev, resp.header.revision)
                    break
                time.sleep(0.2)
            else:
                self.problems.append("could not delete %s with NOSPACE raised: %s" % (key, err))
        try:
            _, rev = c.wait_converged(timeout=30)
            # every watcher past rev before the compaction (a prefix watcher moves on with
            # progress notifications)
            t_end = time.monotonic() + 20
            while any(w.last < rev for w in self.watchers) and time.monotonic() < t_end:
                time.sleep(0.05)
            behind = ["%s at %d" % (w.name(), w.last) for w in self.watchers if w.last < rev]
            if behind:
                self.rec.event("watchers-behind-compaction", rev=rev, watchers=behind)
            self.save_reference(rev)
        except Exception as e:  # noqa
            self.problems.append("nospace: could not save the reference before compacting: %s"
                                 % e)
            return
        r = ctl_retry(c.members, "compact", str(rev), "--physical")
        if r is not None and r.rc != 0 and "required revision has been compacted" in r.stderr:
            # no write since the last recovery compacted at this revision: etcd's answer too
            self.rec.event("compact-already-done", rev=rev)
        elif r is None or r.rc != 0:
            self.problems.append("compact %d failed: %r" % (rev, r))
        for m in c.members:
            r = ctl_retry([m], "defrag", timeout=30,
                          retry_on=("unhealthy cluster", "defragment"))
            if r is None or r.rc != 0:
                self.problems.append("defrag of %s failed: %r" % (m.name, r))
        r = ctl_retry(c.members, "alarm", "disarm")
        if r is None or r.rc != 0:
            self.problems.append("alarm disarm failed: %r" % (r,))
        t_end = time.monotonic() + 20
        resumed = False
        attempt = 0
        while time.monotonic() < t_end:
            m = self.rnd.choice(c.live() or c.members)
            attempt += 1     # (a new value each time: every value is written once)
            ok, err, _ = self.record_write(m, "/fill/%d/after" % n, b"resumed-%d" % attempt)
            if ok:
                resumed = True
                break
            time.sleep(0.2)
        if not resumed:
            self.problems.append("writes did not resume 20 s after compact+defrag+disarm: %s"
                                 % err)
        leftover = [m.name for m in c.members if "alarm:" in (self.alarms(m) or "")]
        if leftover:
            self.problems.append("alarms still listed after disarm by %s" % leftover)
        self.rec.event("nospace-recovered", compacted=rev, resumed=resumed)

    def restart(self, m):
        t = time.monotonic()
        try:
            self.c.restart(m, wait=False)
            self.rec.event("restarted", member=m.name)
        except Exception as e:  # noqa
            self.rec.event("restart-failed", member=m.name, error=str(e)[:300],
                           took=round(time.monotonic() - t, 2))


def check_events_lease(c, lease_id):
    """Every event under /registry/events/ carries the shared lease, and the lease lists
    exactly those keys."""
    probs = []
    m = c.live()[0]
    # a long run leaves many events: more than gRPC's default 4 MiB in one answer
    ch = grpc.insecure_channel(m.endpoint, options=[("grpc.max_receive_message_length", -1)])
    try:
        p = k8s_workload.EVENTS_PREFIX
        r = etcdrpc.KVStub(ch).Range(etcdrpc.RangeRequest(
            key=p.encode(), range_end=k8s_workload.prefix_end(p), keys_only=True), timeout=30)
        keys = set()
        for kv in r.kvs:
            keys.add(kv.key)
            if kv.lease != lease_id:
                probs.append("event %s has lease %x, not the shared %x" % (
                    kv.key, kv.lease, lease_id))
        t = etcdrpc.LeaseStub(ch).LeaseTimeToLive(
            etcdrpc.LeaseTimeToLiveRequest(ID=lease_id, keys=True), timeout=30)
        if t.TTL <= 0:
            probs.append("the shared events lease %x is gone (TTL %d)" % (lease_id, t.TTL))
        if set(t.keys) != keys:
            probs.append("lease %x lists %d keys, %d events exist (e.g. %r)" % (
                lease_id, len(t.keys), len(keys), sorted(set(t.keys) ^ keys)[:3]))
    except grpc.RpcError as e:
        probs.append("events lease check failed: %s" % e)
    finally:
        ch.close()
    return probs[:10]


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
    ap.add_argument("--workload", choices=("kv", "k8s", "mixed"), default="kv",
                    help="kv: put / get / CAS on --keys keys; k8s: the Kubernetes profile "
                    "(k8s_workload.py); mixed: half the clients of each")
    ap.add_argument("--quota-mib", type=float, default=32,
                    help="--quota-backend-bytes of every member, in MiB, for the nospace "
                    "fault (0: no quota, no nospace fault)")
    ap.add_argument("--replace-urls", choices=("same", "new", "both"), default="both",
                    help="the replace fault's new member: the removed one's peer address, a "
                    "new one, or either at random")
    ap.add_argument("--replace-target", choices=("any", "follower"), default="any",
                    help="which member the replace fault removes (any: the leader 30%% of "
                    "the time and at random otherwise)")
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
    quota = int(opts.quota_mib * 1024 * 1024)
    extra = []
    if quota:
        extra += ["--quota-backend-bytes", str(quota)]
    else:
        faults = [f for f in faults if f != "nospace"]
        schedule = [f for f in schedule if f != "nospace"]
    k8s = opts.workload in ("k8s", "mixed")
    if k8s:
        # progress notifications every second, for the per-resource watchers
        extra += ["--experimental-watch-progress-notify-interval", "1s"]
    c = clusterlib.Cluster(opts.members, label="fault", proxy=True, extra_args=extra,
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
               "binary": c.binary, "faults_enabled": faults, "workload": opts.workload,
               "quota_bytes": quota}
    ok = True
    wstop = threading.Event()
    watchers, pwatchers = [], []
    try:
        rec = Recorder(time.monotonic())
        stop = threading.Event()
        keys = ["/f/k%d" % i for i in range(opts.keys)]
        n_k8s = {"kv": 0, "k8s": opts.clients, "mixed": max(1, opts.clients // 2)}[opts.workload]
        clients = [Client(i, c, rec, keys, stop, seed * 1000 + i, opts.op_timeout)
                   for i in range(opts.clients - n_k8s)]
        lease_id = 0
        if k8s:
            # shared by every event; it must outlive the run (expiry is not modelled)
            lease_id = k8s_workload.grant_shared_lease(c, int(opts.duration) + 3600)
            summary["events_lease"] = "%x" % lease_id
            clients += [k8s_workload.K8sClient(i, c, rec, stop, seed * 1000 + i,
                                               opts.op_timeout, lease_id)
                        for i in range(opts.clients - n_k8s, opts.clients)]
        lo, hi = (float(x) for x in opts.fault_interval.split(","))
        nem = Nemesis(c, rec, stop, seed, (lo, hi), max(1, (opts.members - 1) // 2),
                      faults, schedule, quota_bytes=quota, replace_urls=opts.replace_urls,
                      replace_target=opts.replace_target)
        if not opts.no_watch:
            watchers = [Watcher(m, wstop) for m in c.members]
            if k8s:
                pwatchers = [Watcher(m, wstop, prefix=p, prev_kv=True, progress=True)
                             for m in c.members for p in k8s_workload.watch_prefixes()]
            nem.watchers = watchers + pwatchers
            for w in watchers + pwatchers:
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
            nem.join(240)
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
            try:
                hs = c.hashkv(rev=rev)
            except clusterlib.ClusterError as e:
                # HashKV refuses the compacted revision itself (etcd 3.4's HashByRev: rev <=
                # compactRev): a nospace recovery with no write after it ends there. Without
                # --rev each member hashes its current revision, which is rev (converged).
                if "has been compacted" not in str(e):
                    raise
                hs = c.hashkv()
            summary["final"] = {"raft_index": idx, "revision": rev, "hashkv": hs}
            if len(set(hs.values())) != 1:
                heal_problems.append("HashKV differs at revision %d: %r" % (rev, hs))
        except Exception as e:  # noqa
            heal_problems.append("cluster did not heal: %s" % e)
        # final linearizable reads of every key through every member, into the history
        fin = Client(999, c, rec, keys, threading.Event(), 0, 10.0)
        fin_k8s = k8s_workload.K8sClient(999, c, rec, threading.Event(), 0, 10.0, 0)
        for m in c.members:
            for k in keys:
                fin.do(m, k, "get")
            if k8s:
                for k in k8s_workload.object_keys():
                    fin_k8s.get(m, k)
        want_fin = len(c.members) * (len(keys) + (len(k8s_workload.object_keys()) if k8s else 0))
        fin_ok = [o for o in rec.ops if o["client"] == 999 and o.get("ok")]
        if len(fin_ok) != want_fin:
            heal_problems.append("final reads: %d of %d succeeded" % (len(fin_ok), want_fin))
        if k8s:
            heal_problems.extend(check_events_lease(c, lease_id))
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
                        "faults": nem.count, "faults_by_kind": nem.by_kind,
                        "heal_problems": heal_problems})
        if nem.error:
            summary["nemesis_error"] = nem.error
            heal_problems.append("nemesis failed: " + nem.error)
        print("history: %d ops (%d ok, %d indeterminate writes), %s; %d faults %s" % (
            len(ops), n_ok, n_ind, kinds, summary["faults"], nem.by_kind), flush=True)

        t = time.monotonic()
        results = linearizability.check_history(ops, budget_s=opts.check_budget)
        lin = {}
        quiet = 0
        for k, r in results.items():
            if r.ok is True and r.n_ops <= 2:
                quiet += 1        # (a Kubernetes event key: created once)
            else:
                print("  %r" % r)
            lin[k] = {"ok": r.ok, "ops": r.n_ops, "explored": r.explored,
                      "seconds": round(r.elapsed, 2)}
            if r.ok is False:
                print(r.detail)
                lin[k]["detail"] = r.detail
                ok = False
            elif r.ok is None:
                lin[k]["detail"] = "time budget exhausted"
        if quiet:
            print("  ... and %d keys of 1-2 ops: linearizable" % quiet)
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
                while (any(w.last < last_rev for w in pwatchers)
                       and time.monotonic() < deadline):
                    time.sleep(0.05)
                for w in watchers + pwatchers:
                    w.close()
                    wprobs.extend(w.problems)
                ref, refprobs = read_reference(c, last_rev, from_rev=nem.ref_upto + 1)
                ref = nem.ref_saved + ref
                wprobs.extend(refprobs)
                wprobs.extend(watchcheck.check_streams(
                    {w.m.name: w.events for w in watchers}, ref, ops, 2, last_rev))
                for w in pwatchers:
                    wprobs.extend(watchcheck.check_prefix_stream(
                        w.m.name, w.events, w.prevs, w.progress, ref, w.prefix, last_rev))
                lists = [o for o in ops if o["op"] == "list" and o.get("ok")]
                wprobs.extend(watchcheck.check_lists(lists, ref))
                if k8s:
                    summary["k8s"] = {
                        "lists": len(lists),
                        "prefix_watch_events": sum(len(w.events) for w in pwatchers),
                        "progress_notifications": sum(len(w.progress) for w in pwatchers)}
                    print("k8s: %d lists checked, %d prefix-watch events, %d progress "
                          "notifications" % (len(lists), summary["k8s"]["prefix_watch_events"],
                                             summary["k8s"]["progress_notifications"]))
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
        for w in watchers + pwatchers:
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
    if not ok:
        print("history: %s   re-check: /usr/bin/python3 tests/fault/linearizability.py %s" % (
            os.path.join(out, "history.json"), os.path.join(out, "history.json")))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
