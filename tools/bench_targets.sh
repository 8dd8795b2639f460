#!/usr/bin/env bash
# tools/bench_targets.sh - the workloads of issue 9's targets, against a 3-member Keelson and a
# 3-member etcd 3.4 in the same run (127.0.0.1, data on disk), printed side by side with ratios:
#   put, 1,000 clients / 100 conns to the leader; put, 1 client to the leader;
#   range of one key, 1,000 clients / 100 conns over all members, linearizable and serializable;
#   apiserver-load then the apiserver mix, 64 clients / 8 conns to the leader (per-op p99).
# (Watch and memory have their own tools: the watch workload, tools/bench_memory.py.)
#
#   tools/bench_targets.sh [--duration S] [--out FILE] [--keep] [--smoke]
#   env: as tools/bench.sh (ETCD_BIN, KEELSON_BIN, BENCH_TMPDIR)
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
mode=full
dur=10
with_etcd=1
out=""
keep=0
while [ $# -gt 0 ]; do
	case "$1" in
	--smoke) mode=smoke ;;
	--duration) dur="$2"; shift ;;
	--duration=*) dur="${1#*=}" ;;
	--out) out="$2"; shift ;;
	--out=*) out="${1#*=}" ;;
	--keep) keep=1 ;;
	-h|--help) sed -n '2,12p' "$0"; exit 0 ;;
	*) echo "bench_targets.sh: unknown argument $1" >&2; exit 2 ;;
	esac
	shift
done
# shellcheck source=tools/bench_lib.sh
. "$repo/tools/bench_lib.sh"
bench_check_tools
bench_setup
start_server keelson 3
start_server etcd 3
wait_ready keelson
wait_ready etcd
find_leader keelson
find_leader etcd
load0="$(cut -d' ' -f1 /proc/loadavg)"
fsync_json="$("$B" fsync --dir "$work" --count 200 --block-size 4096 --json | grep '^{')"
if [ "$mode" = smoke ]; then amt="--total 2000"; amt1="--total 100"; objs="--objects 300 --namespaces 5 --val-size-min 1024 --val-size 4096"; load="--total 300"
else amt="--duration $dur"; amt1="--duration $dur"; objs="--objects 10000 --namespaces 50 --val-size-min 1024 --val-size 4096"; load="--total 10000"; fi
put="--key-size 8 --val-size 256 --key-space-size 100000"
for s in keelson etcd; do
	ETCDCTL_API=3 etcdctl --endpoints "$(endpoints "$s" leader)" put bench-key "$(head -c 256 /dev/zero | tr '\0' v)" >/dev/null
done
# shellcheck disable=SC2086
{
	both put-1000c leader put --conns 100 --clients 1000 $put $amt
	both put-1c leader put --conns 1 --clients 1 $put $amt1
	# What a lone put cannot go below besides the flush: the client's round trip (a
	# serializable read at the leader touches no disk) and the leader's round to its
	# followers (a linearizable read adds one heartbeat round for its read index).
	both get-s-1c leader range bench-key --consistency s --conns 1 --clients 1 $amt1
	both get-l-1c leader range bench-key --consistency l --conns 1 --clients 1 $amt1
	both range-l-1000c all range bench-key --consistency l --conns 100 --clients 1000 $amt
	both range-s-1000c all range bench-key --consistency s --conns 100 --clients 1000 $amt
	both apiserver-load leader apiserver-load $objs --conns 8 --clients 64 $load
	both apiserver-64c leader apiserver $objs --limit 500 --conns 8 --clients 64 $amt
}
report="$(python3 - "$runs" "$fsync_json" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
fs = json.loads(sys.argv[2])
by = {(r["id"], r["server"]): r for r in runs}
order = []
for r in runs:
    if r["id"] not in order:
        order.append(r["id"])
out = ["disk fdatasync floor (4 KiB write + fdatasync, 200 times): median %.3f ms, p90 %.3f ms, p99 %.3f ms"
       % (fs["lat_ms"]["p50"], fs["lat_ms"]["p90"], fs["lat_ms"]["p99"]), ""]
out.append("%-34s %12s %12s %8s" % ("", "keelson", "etcd", "k/e"))
def row(name, k, e, fmt="%.3f"):
    ks = fmt % k if isinstance(k, (int, float)) else "-"
    es = fmt % e if isinstance(e, (int, float)) else "-"
    ratio = "%.2f" % (k / e) if isinstance(k, (int, float)) and isinstance(e, (int, float)) and e else "-"
    out.append("%-34s %12s %12s %8s" % (name, ks, es, ratio))
for wid in order:
    k, e = by.get((wid, "keelson")), by.get((wid, "etcd"))
    out.append(wid)
    kb, eb = (k or {}).get("bench") or {}, (e or {}).get("bench") or {}
    row("  throughput req/s", kb.get("rps"), eb.get("rps"), "%.1f")
    for p in ("p50", "p90", "p99", "p99_9", "max"):
        row("  latency %s ms" % p, (kb.get("lat_ms") or {}).get(p), (eb.get("lat_ms") or {}).get(p))
    row("  errors", kb.get("errors"), eb.get("errors"), "%.0f")
    def cpu(r, b):
        return r["cpu_s"] * 1000.0 / b["ok"] if r and b.get("ok") else None
    row("  CPU s / 1k req (sum of members)", cpu(k, kb), cpu(e, eb))
    row("  RSS anon MiB (sum)", (k or {}).get("anon_kb", 0) / 1024.0 or None, (e or {}).get("anon_kb", 0) / 1024.0 or None, "%.1f")
    if wid == "put-1c" and kb.get("lat_ms"):
        out.append("  keelson p50 / fsync floor p50: %.2fx; etcd: %.2fx" % (
            kb["lat_ms"]["p50"] / fs["lat_ms"]["p50"], (eb.get("lat_ms") or {}).get("p50", 0) / fs["lat_ms"]["p50"]))
    if wid == "get-l-1c":
        # A put on 3 members needs at least: the client's round trip, and the longer of the
        # leader's WAL flush and (a round to a follower + its WAL flush).
        for srv in ("keelson", "etcd"):
            p = lambda w: (((by.get((w, srv)) or {}).get("bench") or {}).get("lat_ms") or {}).get("p50")
            put1, gs, gl = p("put-1c"), p("get-s-1c"), p("get-l-1c")
            if None in (put1, gs, gl):
                continue
            bound = gl + fs["lat_ms"]["p50"]  # the linearizable read is both round trips
            out.append("  %s put-1c bound: client round trip %.3f + peer round trip %.3f + floor %.3f = %.3f ms"
                       " (%.2fx the floor); put-1c p50 %.3f = %.2fx the bound" % (
                           srv, gs, gl - gs, fs["lat_ms"]["p50"], bound, bound / fs["lat_ms"]["p50"], put1, put1 / bound))
    for op in (kb.get("ops") or {}):
        ko, eo = kb["ops"][op], (eb.get("ops") or {}).get(op, {})
        row("  %s /s" % op, ko.get("rps"), eo.get("rps"), "%.1f")
        row("  %s p99 ms" % op, ko["lat_ms"]["p99"], (eo.get("lat_ms") or {}).get("p99"))
out.append("")
out.append("raw JSON lines:")
for r in runs:
    out.append("  " + json.dumps(r))
print("\n".join(out))
PY
)"
full="$(printf 'Issue 9 target workloads: 3-member Keelson vs 3-member etcd 3.4 (%s mode)\n%s\n\n%s\n' "$mode" \
	"$(report_header "tools/bench_targets.sh ($([ "$mode" = smoke ] && echo "fixed totals" || echo "${dur} s per workload"); load generator on the same host)")" "$report")"
write_report "$full" "-targets"
[ "$failed" = 0 ]
