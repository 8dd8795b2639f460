#!/usr/bin/python3
"""tools/bench_memory.py - memory and start-up of Keelson next to a real etcd 3.4, one member
each, data on disk, both running during the same run on free 127.0.0.1 ports.

  /usr/bin/python3 tools/bench_memory.py [--list-keys 100000] [--list-val 2048]
        [--million 1000000] [--million-val 1024] [--no-etcd] [--skip-million] [--out FILE]

1. LIST probe: --list-keys keys of --list-val bytes under list/, then one full LIST of list/
   three ways, the member's VmRSS/RssAnon sampled every 10 ms (VmHWM reset before each):
   Range without limit (one response), KV.RangeStream (etcd 3.7; etcd 3.4 answers
   UNIMPLEMENTED), Range pages of 500 at the first page's revision.
2. Million keys: --million keys of --million-val bytes under mk/ (load rate), RSS and data size
   after the load, then the member is stopped (SIGTERM; then once more with SIGKILL) and
   restarted: the time from the process start to the first successful linearizable Range of
   the loaded prefix (count checked), and the RSS after it.
Needs bazel-bin/server/keelson and bazel-bin/tools/benchmark (bazel build //server:keelson
//tools:benchmark); python3-grpcio and python3-etcd3 (Debian). Prints a text report and the raw
JSON; --out writes the report to a file too.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import grpc
from etcd3.etcdrpc import rpc_pb2 as pb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_ports(n):
    ss = [socket.socket() for _ in range(n)]
    for s in ss:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in ss]
    for s in ss:
        s.close()
    return ports


def proc_status(pid):
    d = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "VmHWM"):
                d[k] = int(v.split()[0])
    return d


def cpu_s(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def du_kb(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total // 1024


class Member:
    def __init__(self, kind, binary, work):
        self.kind, self.binary = kind, binary
        self.data = os.path.join(work, kind + ".data")
        self.logf = os.path.join(work, kind + ".log")
        self.cport, self.pport, self.mport = free_ports(3)
        self.proc = None
        self.token = "mem-%s-%d" % (kind, os.getpid())

    @property
    def endpoint(self):
        return "127.0.0.1:%d" % self.cport

    def spawn(self, new):
        args = [self.binary, "--name", "default", "--data-dir", self.data,
                "--listen-client-urls", "http://" + self.endpoint,
                "--advertise-client-urls", "http://" + self.endpoint,
                "--listen-peer-urls", "http://127.0.0.1:%d" % self.pport,
                "--initial-advertise-peer-urls", "http://127.0.0.1:%d" % self.pport,
                "--initial-cluster", "default=http://127.0.0.1:%d" % self.pport,
                "--initial-cluster-token", self.token,
                "--listen-metrics-urls", "http://127.0.0.1:%d" % self.mport,
                "--quota-backend-bytes", str(8 << 30)]
        if new:
            args += ["--initial-cluster-state", "new"]
        t0 = time.monotonic()
        self.proc = subprocess.Popen(args, stdout=open(self.logf, "a"), stderr=subprocess.STDOUT)
        return t0

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def first_range(member, prefix, t0, want_count, timeout=600):
    """Seconds from t0 to the first successful linearizable Range of prefix with want_count keys."""
    end = prefix[:-1] + bytes([prefix[-1] + 1])
    req = pb.RangeRequest(key=prefix, range_end=end, limit=1).SerializeToString()
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        if member.proc.poll() is not None:
            raise RuntimeError("%s exited at start-up (see %s)" % (member.kind, member.logf))
        ch = grpc.insecure_channel(member.endpoint)
        try:
            call = ch.unary_unary("/etcdserverpb.KV/Range", request_serializer=lambda b: b,
                                  response_deserializer=lambda b: b)
            r = pb.RangeResponse()
            r.ParseFromString(call(req, timeout=2))
            if r.count == want_count:
                return time.monotonic() - t0
        except grpc.RpcError:
            pass
        finally:
            ch.close()
        time.sleep(0.01)
    raise RuntimeError("%s: no successful Range within %d s" % (member.kind, timeout))


def bench(binary, endpoint, *args, label=""):
    out = subprocess.run([binary, "--endpoints", endpoint, "--json", "--label", label, "--timeout", "300"]
                         + list(args), capture_output=True, text=True)
    js = [line for line in out.stdout.splitlines() if line.startswith("{")]
    res = json.loads(js[-1]) if js else None
    return out.returncode, res, out.stderr[-400:]


class Sampler(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.stop_ev = pid, threading.Event()
        self.base = proc_status(pid)
        self.peak = dict(self.base)

    def run(self):
        while not self.stop_ev.is_set():
            try:
                d = proc_status(self.pid)
            except OSError:
                break
            for k in d:
                self.peak[k] = max(self.peak.get(k, 0), d[k])
            time.sleep(0.01)

    def finish(self):
        self.stop_ev.set()
        self.join()
        return self.base, self.peak


def list_probe(b, m, how):
    pid = m.proc.pid
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")  # VmHWM := VmRSS now
    except OSError:
        pass
    s = Sampler(pid)
    s.start()
    args = {"range": ["list", "list/", "--limit", "0"],
            "stream": ["list", "list/", "--stream"],
            "paged": ["list", "list/", "--limit", "500"]}[how]
    rc, res, err = bench(b, m.endpoint, *args, label="%s/list-%s" % (m.kind, how))
    base, peak = s.finish()
    hwm = proc_status(pid).get("VmHWM", 0)
    return {"server": m.kind, "id": "list-" + how, "rc": rc, "base": base, "peak": peak, "hwm_kb": hwm,
            "bench": res, "stderr": err if rc else ""}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--list-keys", type=int, default=100000)
    ap.add_argument("--list-val", type=int, default=2048)
    ap.add_argument("--million", type=int, default=1000000)
    ap.add_argument("--million-val", type=int, default=1024)
    ap.add_argument("--no-etcd", action="store_true")
    ap.add_argument("--skip-million", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--keep", action="store_true")
    o = ap.parse_args()

    keelson = os.environ.get("KEELSON_BIN", os.path.join(REPO, "bazel-bin/server/keelson"))
    etcd = os.environ.get("ETCD_BIN", "/usr/bin/etcd")
    parent = os.environ.get("BENCH_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    work = tempfile.mkdtemp(prefix="keelson-mem.", dir=parent)
    shutil.copy(keelson, os.path.join(work, "keelson-bin"))
    shutil.copy(os.path.join(REPO, "bazel-bin/tools/benchmark"), os.path.join(work, "benchmark-bin"))
    b = os.path.join(work, "benchmark-bin")
    kinds = [("keelson", os.path.join(work, "keelson-bin"))]
    if not o.no_etcd:
        kinds.append(("etcd", etcd))
    members = {k: Member(k, path, work) for k, path in kinds}
    rows = []
    t_start = time.time()
    load0 = os.getloadavg()[0]
    try:
        for m in members.values():
            t0 = m.spawn(True)
            first_range(m, b"list/", t0, 0, timeout=60)
        # 1. LIST probe
        for m in members.values():
            t0 = time.monotonic()
            rc, res, err = bench(b, m.endpoint, "put", "--key-prefix", "list/", "--sequential-keys",
                                 "--key-space-size", str(o.list_keys), "--total", str(o.list_keys),
                                 "--key-size", "8", "--val-size", str(o.list_val), "--conns", "8",
                                 "--clients", "64", label=m.kind + "/list-load")
            rows.append({"server": m.kind, "id": "list-load", "rc": rc, "s": time.monotonic() - t0,
                         "rss": proc_status(m.proc.pid), "bench": res})
            print("%s: loaded %d x %d B (rc %d)" % (m.kind, o.list_keys, o.list_val, rc), file=sys.stderr)
            for how in ("range", "stream", "paged"):
                r = list_probe(b, m, how)
                rows.append(r)
                print("  %s list-%s: rc %d, RSS %d -> %d KiB" % (m.kind, how, r["rc"], r["base"]["VmRSS"],
                                                                r["peak"]["VmRSS"]), file=sys.stderr)
        # 2. a million keys
        if not o.skip_million:
            for m in members.values():
                t0 = time.monotonic()
                c0 = cpu_s(m.proc.pid)
                rc, res, err = bench(b, m.endpoint, "put", "--key-prefix", "mk/", "--sequential-keys",
                                     "--key-space-size", str(o.million), "--total", str(o.million),
                                     "--key-size", "8", "--val-size", str(o.million_val), "--conns", "8",
                                     "--clients", "64", label=m.kind + "/million-load")
                row = {"server": m.kind, "id": "million", "rc": rc, "load_s": time.monotonic() - t0,
                       "load_cpu_s": cpu_s(m.proc.pid) - c0, "rss_after_load": proc_status(m.proc.pid),
                       "bench": res, "stderr": err if rc else ""}
                first_range(m, b"mk/", time.monotonic(), o.million, timeout=60)
                row["data_kb"] = du_kb(m.data)
                print("%s: loaded %d keys in %.1f s (rc %d)" % (m.kind, o.million, row["load_s"], rc),
                      file=sys.stderr)
                for sig, name in ((signal.SIGTERM, "restart"), (signal.SIGKILL, "restart_kill9")):
                    m.stop(sig)
                    t0 = m.spawn(False)
                    row[name + "_s"] = first_range(m, b"mk/", t0, o.million)
                    row[name + "_rss"] = proc_status(m.proc.pid)
                    print("  %s %s: first Range after %.2f s" % (m.kind, name, row[name + "_s"]),
                          file=sys.stderr)
                rows.append(row)
    finally:
        for m in members.values():
            m.stop()
    report = render(o, rows, t_start, load0)
    print(report)
    if o.out:
        with open(o.out, "w") as f:
            f.write(report)
    if o.keep:
        print("kept " + work, file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    bad = [r for r in rows if r["server"] == "keelson" and r.get("rc")]
    return 1 if bad else 0


def mib(kb):
    return "%.1f" % (kb / 1024.0) if kb is not None else "-"


def render(o, rows, t_start, load0):
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    etcd_v = subprocess.run([os.environ.get("ETCD_BIN", "/usr/bin/etcd"), "--version"], capture_output=True,
                            text=True).stdout.splitlines()[:1]
    by = {(r["server"], r["id"]): r for r in rows}
    L = []
    L.append("Keelson vs etcd: memory during large LISTs, a million keys, restart time (one member each)")
    L.append("date:     " + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t_start)))
    L.append("commit:   %s%s" % (commit, " (with uncommitted changes)" if dirty else ""))
    L.append("machine:  %d CPUs, load average %.2f at start, %.2f at end (shared with other engineers)"
             % (os.cpu_count(), load0, os.getloadavg()[0]))
    L.append("etcd:     " + (etcd_v[0] if etcd_v else "?"))
    L.append("command:  tools/bench_memory.py --list-keys %d --list-val %d --million %d --million-val %d"
             % (o.list_keys, o.list_val, o.million, o.million_val))
    L.append("")
    L.append("LIST probe: %d keys of %d B under list/; one full LIST from the member, RSS sampled every 10 ms"
             % (o.list_keys, o.list_val))
    L.append("%-40s %12s %12s %8s" % ("", "keelson", "etcd", "k/e"))

    def line(name, k, e, fmt="%.1f"):
        ks = fmt % k if isinstance(k, (int, float)) else (k or "-")
        es = fmt % e if isinstance(e, (int, float)) else (e or "-")
        ratio = "%.2f" % (k / e) if isinstance(k, (int, float)) and isinstance(e, (int, float)) and e else "-"
        L.append("%-40s %12s %12s %8s" % (name, ks, es, ratio))

    for how, title in (("range", "Range without limit (one response)"),
                       ("stream", "KV.RangeStream (etcd 3.7; etcd 3.4: UNIMPLEMENTED)"),
                       ("paged", "Range, pages of 500 at one revision")):
        L.append(title)
        vals = {}
        for s in ("keelson", "etcd"):
            r = by.get((s, "list-" + how))
            if r is None:
                vals[s] = None
                continue
            bres = r.get("bench") or {}
            ok = r["rc"] == 0 and bres.get("errors", 1) == 0
            vals[s] = {
                "time s": bres.get("elapsed_s") if ok else "error",
                "messages": bres.get("pages") if ok else "-",
                "keys": bres.get("keys") if ok else "-",
                "RSS before MiB": r["base"]["VmRSS"] / 1024.0,
                "RSS peak MiB": r["peak"]["VmRSS"] / 1024.0,
                "RSS growth MiB": (r["peak"]["VmRSS"] - r["base"]["VmRSS"]) / 1024.0,
                "anon growth MiB": (r["peak"]["RssAnon"] - r["base"]["RssAnon"]) / 1024.0,
            }
            if not ok:
                err = ((bres.get("errors_by_status") or {}) if bres else {})
                vals[s]["time s"] = "error " + (",".join(err) or "rc %d" % r["rc"])
        for key in ("time s", "messages", "keys", "RSS before MiB", "RSS peak MiB", "RSS growth MiB",
                    "anon growth MiB"):
            k = vals["keelson"][key] if vals.get("keelson") else None
            e = vals["etcd"][key] if vals.get("etcd") else None
            line("  " + key, k, e, "%.0f" if key in ("messages", "keys") else "%.3f" if key == "time s" else "%.1f")
    if any(r["id"] == "million" for r in rows):
        L.append("")
        L.append("A million keys: %d keys of %d B under mk/ (64 clients / 8 conns), then restarts"
                 % (o.million, o.million_val))
        L.append("%-40s %12s %12s %8s" % ("", "keelson", "etcd", "k/e"))
        k, e = by.get(("keelson", "million")), by.get(("etcd", "million"))

        def g(r, f):
            try:
                return f(r) if r else None
            except (KeyError, TypeError):
                return None
        for name, f, fmt in (
                ("load time s", lambda r: r["load_s"], "%.1f"),
                ("load puts/s", lambda r: r["bench"]["rps"], "%.0f"),
                ("load errors", lambda r: r["bench"]["errors"], "%.0f"),
                ("server CPU s per 1k puts", lambda r: r["load_cpu_s"] * 1000.0 / o.million, "%.3f"),
                ("RSS after load MiB", lambda r: r["rss_after_load"]["VmRSS"] / 1024.0, "%.1f"),
                ("RssAnon after load MiB", lambda r: r["rss_after_load"]["RssAnon"] / 1024.0, "%.1f"),
                ("peak RSS (VmHWM) during load MiB", lambda r: r["rss_after_load"]["VmHWM"] / 1024.0, "%.1f"),
                ("data dir on disk MiB", lambda r: r["data_kb"] / 1024.0, "%.1f"),
                ("restart (SIGTERM) to first Range s", lambda r: r["restart_s"], "%.2f"),
                ("  RSS then MiB", lambda r: r["restart_rss"]["VmRSS"] / 1024.0, "%.1f"),
                ("  RssAnon then MiB", lambda r: r["restart_rss"]["RssAnon"] / 1024.0, "%.1f"),
                ("restart (kill -9) to first Range s", lambda r: r["restart_kill9_s"], "%.2f"),
                ("  RSS then MiB", lambda r: r["restart_kill9_rss"]["VmRSS"] / 1024.0, "%.1f"),
                ("  RssAnon then MiB", lambda r: r["restart_kill9_rss"]["RssAnon"] / 1024.0, "%.1f")):
            line("  " + name, g(k, f), g(e, f), fmt)
    L.append("")
    L.append("RSS = VmRSS (includes the mapped pages of LMDB / bbolt files that were touched); RssAnon = heap.")
    L.append("restart: time from the process start to the first successful linearizable Range of mk/ whose")
    L.append("count is the number of keys loaded.")
    L.append("")
    L.append("raw JSON lines:")
    for r in rows:
        L.append("  " + json.dumps(r, sort_keys=True))
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
