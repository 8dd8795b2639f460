#!/usr/bin/env bash
# tools/bench.sh - side-by-side benchmark of Keelson and a real etcd 3.4, single member each,
# data on disk, both running during the same run on free 127.0.0.1 ports.
#
#   tools/bench.sh            full run (~4 min; adds watch and lease keep-alive runs): writes bench/results/<date>-<commit>.txt and prints it
#   tools/bench.sh --smoke    CI smoke (~30 s, tiny totals; then a 3-member Keelson smoke, which
#                             BENCH_SMOKE_CLUSTER=0 skips): exits non-zero if the benchmark tool
#                             reports any error against Keelson or Keelson dies; writes no file
#   tools/bench.sh --members 3 [--smoke]   3-member clusters: runs tools/bench_cluster.sh (see there)
#   (the watch fan-out's capacity, a rising write rate until delivery falls behind: tools/bench_watch.sh)
#   options: --duration S (seconds per workload, full mode; default 12), --no-etcd,
#            --out FILE (results file), --keep (keep the temp dir with data and logs)
#   env:     ETCD_BIN (default /usr/bin/etcd), KEELSON_BIN (benchmark this binary instead of
#            building //server:keelson; KEELSON_DESC describes it in the report), KEELSON_FLAGS (more
#            flags for every Keelson member, e.g. --backend-batch-interval=25ms), BENCH_TMPDIR (parent of the temp dir; must be on
#            the same filesystem as the repo, else the script uses bench/.tmp/)
#
# For each workload and server it reports throughput, latency p50/p90/p99/p99.9/max, errors,
# the server's CPU seconds per 1,000 requests (/proc/PID/stat utime+stime), its peak RSS
# (/proc/PID/status VmHWM), and entries per fsync (Keelson: keelson_batch_requests_total /
# keelson_batch_commits_total; etcd: puts / etcd_disk_wal_fsync_duration_seconds_count), plus the
# disk's fdatasync latency (4 KiB write + fdatasync, 200 times) as the floor of a durable write.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
mode=full
dur=12
with_etcd=1
out=""
keep=0
# --members N (N > 1): the cluster script takes every argument (it has a few more of its own)
for a in "$@"; do
	case "$a" in --members=1 | --members=*) [ "$a" != --members=1 ] && exec bash "$repo/tools/bench_cluster.sh" "$@" ;; esac
done
prev=""
for a in "$@"; do
	[ "$prev" = --members ] && [ "$a" != 1 ] && exec bash "$repo/tools/bench_cluster.sh" "$@"
	prev="$a"
done
while [ $# -gt 0 ]; do
	case "$1" in
	--smoke) mode=smoke ;;
	--duration) dur="$2"; shift ;;
	--duration=*) dur="${1#*=}" ;;
	--no-etcd) with_etcd=0 ;;
	--out) out="$2"; shift ;;
	--out=*) out="${1#*=}" ;;
	--keep) keep=1 ;;
	--members) shift ;;
	--members=*) ;;
	-h|--help) sed -n '2,21p' "$0"; exit 0 ;;
	*) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
	esac
	shift
done
# shellcheck source=tools/bench_lib.sh
. "$repo/tools/bench_lib.sh"
bench_check_tools
bench_setup

start_server keelson 1
[ "$with_etcd" = 1 ] && start_server etcd 1
wait_ready keelson
[ "$with_etcd" = 1 ] && wait_ready etcd
kc=${SRV_CPORT[keelson,0]}
ec=${SRV_CPORT[etcd,0]:-}

load0="$(cut -d' ' -f1 /proc/loadavg)"

# --- the disk's floor ------------------------------------------------------------------------
fsync_json="$("$B" fsync --dir "$work" --count 200 --block-size 4096 --json | grep '^{')"

# A key to read, 256-byte value, written through the tool's own code path.
val256="$(head -c 192 /dev/urandom | base64 -w0 | head -c 256)"
prefill() { # port
	if command -v etcdctl >/dev/null; then
		ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$1" put bench-key "$val256" >/dev/null
	fi
}
prefill "$kc"
[ "$with_etcd" = 1 ] && prefill "$ec"

put="--key-size 8 --val-size 256 --key-space-size 100000"
if [ "$mode" = smoke ]; then
	amt1="--total 200"; amt="--total 2000"
else
	amt1="--duration $dur"; amt="--duration $dur"
fi
log "bench.sh: keelson pid ${SRV_PID[keelson,0]} on :$kc, etcd pid ${SRV_PID[etcd,0]:-none} on :${ec:-none}; data under $work"
# shellcheck disable=SC2086
{
	both put-1c leader put --conns 1 --clients 1 $put $amt1
	both put-64c leader put --conns 8 --clients 64 $put $amt
	[ "$mode" = smoke ] && both txn-put-64c leader txn-put --conns 8 --clients 64 $put --total 500
	both range-s-64c leader range bench-key --consistency s --conns 8 --clients 64 $amt
	both range-l-64c leader range bench-key --consistency l --conns 8 --clients 64 $amt
	if [ "$mode" = smoke ]; then
		both watch-smoke leader watch --watchers 100 --watch-streams 10 --prefixes 10 --rate 100 --duration 1 --val-size 64 --drain 5
		both lease-keepalive-smoke leader lease-keepalive --leases 100 --conns 2 --clients 16 --total 2000
		both txn-mixed-smoke leader txn-mixed --key-space-size 20 --read-fraction 0.5 --val-size 256 --conns 2 --clients 16 --total 1000
		both apiserver-load-smoke leader apiserver-load --objects 500 --val-size-min 1024 --val-size 4096 --conns 2 --clients 16 --total 500
		both apiserver-smoke leader apiserver --objects 500 --val-size-min 1024 --val-size 4096 --limit 100 --conns 2 --clients 16 --total 1500
	else
		# issue 5's load runs: idle-watcher memory, then a steady write rate for 10 s
		both watch-10k-1p leader watch --watchers 10000 --watch-streams 100 --conns 4 --prefixes 1 --rate 50 --duration 10 --val-size 64 --drain 15
		both watch-1k-100p leader watch --watchers 1000 --watch-streams 10 --conns 2 --prefixes 100 --rate 500 --duration 10 --val-size 64 --drain 15
		# issue 6's keep-alive throughput: 1,000 leases, 64 streams over 8 connections
		both lease-keepalive-64s leader lease-keepalive --leases 1000 --conns 8 --clients 64 $amt
	fi
}

# --- report ---------------------------------------------------------------------------------
header="$(
	echo "Keelson vs etcd benchmark ($mode mode)"
	report_header "tools/bench.sh$([ "$mode" = smoke ] && echo " --smoke") (per workload: $([ "$mode" = smoke ] && echo "fixed totals" || echo "${dur} s"); key 8 B, value 256 B, 100k-key space; load generator bazel-bin/tools/benchmark on the same host)"
)"
table="$(python3 - "$runs" "$fsync_json" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
fs = json.loads(sys.argv[2])
by = {}
order = []
for r in runs:
    if r["id"] not in order:
        order.append(r["id"])
    by[(r["id"], r["server"])] = r
desc = {
    "put-1c": "put, 1 client / 1 conn",
    "put-64c": "put, 64 clients / 8 conns",
    "txn-put-64c": "txn-put, 64 clients / 8 conns",
    "range-s-64c": "range serializable, 1 key, 64 clients / 8 conns",
    "range-l-64c": "range linearizable, 1 key, 64 clients / 8 conns",
    "watch-smoke": "watch, 100 watchers / 10 streams / 10 prefixes, 100 puts/s for 1 s",
    "watch-10k-1p": "watch, 10,000 watchers / 100 streams / 4 conns on 1 prefix, 50 puts/s (64 B values) for 10 s",
    "watch-1k-100p": "watch, 1,000 watchers / 10 streams / 2 conns over 100 prefixes, 500 puts/s (64 B values) for 10 s",
    "lease-keepalive-smoke": "lease keep-alive, 100 leases, 16 streams / 2 conns",
    "lease-keepalive-64s": "lease keep-alive, 1,000 leases, 64 streams / 8 conns (ping-pong per stream)",
    "txn-mixed-smoke": "txn-mixed, 20 hot keys, 50% reads / 50% CAS txns, 16 clients / 2 conns",
    "apiserver-load-smoke": "apiserver-load: create 500 objects of 1-4 KB",
    "apiserver-smoke": "apiserver mix over 500 objects, LIST pages of 100, 6 resource watches",
}
def figs(r):
    if r is None:
        return {}
    b = r["bench"] or {}
    lat = b.get("lat_ms", {})
    ok = b.get("ok", 0)
    if b.get("workload") == "watch":
        nw = b.get("watchers") or 0
        drss = (r["rss_ready_kb"] - r["rss_before_kb"]) * 1024 if r.get("rss_ready_kb") else None
        return {
            "events delivered/s": b.get("rps"),
            "events expected": b.get("expected"),
            "events received": b.get("events"),
            "delivery p50 ms": lat.get("p50"),
            "delivery p90 ms": lat.get("p90"),
            "delivery p99 ms": lat.get("p99"),
            "delivery max ms": lat.get("max"),
            "missing": b.get("missing"),
            "duplicates": b.get("duplicates"),
            "out of order": b.get("out_of_order"),
            "errors": b.get("errors"),
            "watch create s": b.get("create_s"),
            "put p99 ms (writer)": b.get("put_p99_ms"),
            "RSS/idle watcher B": (drss / nw) if (drss is not None and nw) else None,
            "CPU s / 1k events": (r["cpu_s"] / ok * 1000) if ok else None,
            "RSS peak (VmHWM) MiB": r["hwm_kb"] / 1024 if r["hwm_kb"] else None,
        }
    f = {
        ("keep-alives/s" if b.get("workload") == "lease-keepalive" else "throughput req/s"): b.get("rps"),
        "latency p50 ms": lat.get("p50"),
        "latency p90 ms": lat.get("p90"),
        "latency p99 ms": lat.get("p99"),
        "latency p99.9 ms": lat.get("p99_9"),
        "latency max ms": lat.get("max"),
        "errors": b.get("errors"),
        "CPU s / 1k req": (r["cpu_s"] / ok * 1000) if ok else None,
        "RSS peak (VmHWM) MiB": r["hwm_kb"] / 1024 if r["hwm_kb"] else None,
        "RSS anon now MiB": r["anon_kb"] / 1024 if r["anon_kb"] else None,
    }
    if r["id"].startswith(("put", "txn-put")):
        f["entries per fsync"] = (r["d_req"] / r["d_commit"]) if r["d_commit"] else None
    if b.get("conflicts") is not None:
        f["CAS conflicts"] = b.get("conflicts")
    for name, op in (b.get("ops") or {}).items():
        f[name + " p99 ms"] = op["lat_ms"]["p99"]
    return f
def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    if abs(v) >= 1000:
        return "%.0f" % v
    if abs(v) >= 10:
        return "%.1f" % v
    return "%.3f" % v
out = []
fl = fs["lat_ms"]
out.append("disk fdatasync floor (4 KiB write + fdatasync, %d times): median %.3f ms, p90 %.3f ms, p99 %.3f ms, max %.3f ms"
           % (fs["ok"], fl["p50"], fl["p90"], fl["p99"], fl["max"]))
out.append("")
w = 24
out.append("%-24s %14s %14s %10s" % ("", "keelson", "etcd", "k/e"))
problems = []
for wid in order:
    k, e = by.get((wid, "keelson")), by.get((wid, "etcd"))
    out.append("%s" % desc.get(wid, wid))
    fk, fe = figs(k), figs(e)
    for name in fk:
        vk, ve = fk.get(name), fe.get(name)
        ratio = "-"
        if isinstance(vk, (int, float)) and isinstance(ve, (int, float)) and ve:
            ratio = "%.2f" % (vk / ve)
        out.append("  %-22s %14s %14s %10s" % (name, fmt(vk), fmt(ve), ratio))
    for r in (k, e):
        if r is None:
            continue
        b = r["bench"] or {}
        if r["rc"] != 0 or not r["alive"] or b.get("errors"):
            problems.append("%s %s: exit %d, alive %d, errors %s %s" % (
                r["server"], wid, r["rc"], r["alive"], json.dumps(b.get("errors_by_status")), b.get("first_error", "")))
    if k and wid.startswith("put"):
        out.append("  %-22s %14s" % ("vs fsync floor (p50)", fmt(k["bench"]["lat_ms"]["p50"] / fl["p50"]) + "x" if k["bench"] and fl["p50"] else "-"))
out.append("")
out.append("watch: events delivered/s = events received by all watchers / (first put .. last event); delivery")
out.append("  latency = receive time - send time stamped in the value (same host, CLOCK_MONOTONIC); missing =")
out.append("  acknowledged puts of a watcher's prefix it never received (after up to --drain s of quiet);")
out.append("  RSS/idle watcher = (server VmRSS 1 s after all watchers were created, before any write -")
out.append("  VmRSS before the run) / watchers (includes the streams' and connections' own memory).")
out.append("lease keep-alive: each stream has one LeaseKeepAlive request in flight; latency = request to response.")
out.append("entries per fsync: keelson = d(keelson_batch_requests_total)/d(keelson_batch_commits_total);")
out.append("  etcd = d(etcd_server_proposals_committed_total)/d(etcd_disk_wal_fsync_duration_seconds_count).")
out.append("CPU s / 1k req = server utime+stime delta over the workload / successful requests * 1000.")
out.append("RSS peak = the server's VmHWM after the workload (high-water mark since start; includes mapped")
out.append("  file pages: LMDB's and bbolt's data files); RSS anon = RssAnon after the workload (heap, stacks).")
if problems:
    out.append("")
    out.append("PROBLEMS:")
    out.extend("  " + p for p in problems)
out.append("")
out.append("raw JSON lines:")
out.append("  " + json.dumps(fs, separators=(",", ":")))
for r in runs:
    out.append("  " + json.dumps(r, separators=(",", ":")))
print("\n".join(out))
PY
)"
logs="$(report_logs)"
report="$(printf '%s\n\n%s\n\n%s\n' "$header" "$table" "$logs")"
write_report "$report" ""
if [ "$mode" = smoke ] && [ "${BENCH_SMOKE_CLUSTER:-1}" = 1 ] && ! command -v etcdctl >/dev/null; then
	log "bench.sh: no etcdctl (leader discovery): 3-member smoke skipped"
elif [ "$mode" = smoke ] && [ "${BENCH_SMOKE_CLUSTER:-1}" = 1 ]; then
	# The cluster paths (forwarding, ReadIndex, replication under load) get a smoke too: a
	# 3-member Keelson cluster alone, tiny totals (~10 s); its errors fail this smoke.
	log ""
	log "bench.sh: 3-member Keelson smoke (tools/bench_cluster.sh --smoke --no-etcd)"
	if ! BENCH_NO_BUILD=1 bash "$repo/tools/bench_cluster.sh" --smoke --no-etcd >"$work/cluster-smoke.txt" 2>"$work/cluster-smoke.err"; then
		failed=1
		log "bench.sh: the 3-member smoke failed:"
		tail -30 "$work/cluster-smoke.err" >&2
		grep -A 10 '^PROBLEMS:' "$work/cluster-smoke.txt" >&2 || true
	else
		grep -E '^  keelson ' "$work/cluster-smoke.err" >&2 || true
	fi
fi
exit $failed
