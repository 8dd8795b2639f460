#!/usr/bin/env bash
# tools/bench_watch.sh - watch fan-out capacity of Keelson and a real etcd 3.4 (issue 5), single
# member each, data on disk, both running during the same run on free 127.0.0.1 ports.
#
#   tools/bench_watch.sh           full run (~3 min): writes bench/results/<date>-<commit>-watch.txt
#   tools/bench_watch.sh --smoke   tiny ramp (~20 s): exits non-zero if the benchmark reports any
#                                  error, missing/duplicate/out-of-order event against Keelson
#   options: --no-etcd, --out FILE, --keep (keep the temp dir), --step S (seconds per rate step,
#            default 3), --steps N (at most N steps, default 8), --ramp F (rate factor per step,
#            default 2; smaller steps resolve the capacity more finely)
#   env:     as tools/bench.sh (ETCD_BIN, KEELSON_BIN, KEELSON_DESC, BENCH_TMPDIR)
#
# Saturation, not the writer's rate: each run creates the watchers, samples the server's RSS while
# they are idle, then writes at a rate that doubles every step (10,000 watchers on one prefix:
# 5, 10, 20, ... puts/s, each put one event per watcher) until the first step at whose end more
# than one second of its events is still undelivered (tools/benchmark watch --ramp 2). Per step it
# reports the events/s offered and delivered and the delivery latency of the step's own events;
# a step "kept up" if every event arrived, it delivered >= 90% of what it offered and its p99 stayed
# under 1 s. The figure of merit is the best step that kept up ("max sustained events/s").
# The load generator walks responses in place (no unpacking), and its own CPU is reported next to
# the server's: CPU seconds per 1,000 events, robust to the machine's other load.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
mode=full
dur=0
with_etcd=1
out=""
keep=0
step=3
steps=8
ramp=2
while [ $# -gt 0 ]; do
	case "$1" in
	--smoke) mode=smoke ;;
	--no-etcd) with_etcd=0 ;;
	--out) out="$2"; shift ;;
	--out=*) out="${1#*=}" ;;
	--keep) keep=1 ;;
	--step) step="$2"; shift ;;
	--steps) steps="$2"; shift ;;
	--ramp) ramp="$2"; shift ;;
	-h|--help) sed -n '2,22p' "$0"; exit 0 ;;
	*) echo "bench_watch.sh: unknown argument $1" >&2; exit 2 ;;
	esac
	shift
done
[ "$mode" = smoke ] && { step=1; steps=3; }
wdur=$((step * steps))
dur=$((wdur + 30)) # run_one's time limit is dur + 60 s
# shellcheck source=tools/bench_lib.sh
. "$repo/tools/bench_lib.sh"
bench_check_tools
bench_setup

start_server keelson 1
[ "$with_etcd" = 1 ] && start_server etcd 1
wait_ready keelson
[ "$with_etcd" = 1 ] && wait_ready etcd
load0="$(cut -d' ' -f1 /proc/loadavg)"
log "bench_watch.sh: keelson pid ${SRV_PID[keelson,0]}, etcd pid ${SRV_PID[etcd,0]:-none}; data under $work"

common="--val-size 64 --ramp $ramp --step $step --duration $wdur --drain 10 --threads 2"
if [ "$mode" = smoke ]; then
	both watch-ramp-smoke leader watch --watchers 200 --watch-streams 10 --conns 2 --prefixes 1 --rate 20 $common
else
	both watch-10k-1p-ramp leader watch --watchers 10000 --watch-streams 100 --conns 4 --prefixes 1 --rate 5 $common
	both watch-1k-100p-ramp leader watch --watchers 1000 --watch-streams 10 --conns 2 --prefixes 100 --rate 250 $common
fi

header="$(
	echo "Keelson vs etcd: watch fan-out capacity ($mode mode)"
	report_header "tools/bench_watch.sh$([ "$mode" = smoke ] && echo " --smoke") --step $step --steps $steps --ramp $ramp (rate x $ramp every ${step} s, at most $steps steps; 64 B values; load generator bazel-bin/tools/benchmark on the same host)"
)"
table="$(python3 - "$runs" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by, order = {}, []
for r in runs:
    if r["id"] not in order:
        order.append(r["id"])
    by[(r["id"], r["server"])] = r
desc = {
    "watch-ramp-smoke": "200 watchers / 10 streams / 2 conns on 1 prefix",
    "watch-10k-1p-ramp": "10,000 watchers / 100 streams / 4 conns on 1 prefix (each put: 10,000 events)",
    "watch-1k-100p-ramp": "1,000 watchers / 10 streams / 2 conns over 100 prefixes (each put: 10 events)",
}
def best(b):
    ks = [s for s in b.get("steps", []) if s["kept_up"] and s["s"] > 0]
    return max(ks, key=lambda s: s["received_in_step"] / s["s"]) if ks else None
def figs(r):
    if r is None or not r.get("bench"):
        return {}
    b = r["bench"]
    nw = b.get("watchers") or 0
    ev = b.get("events") or 0
    s = best(b)
    drss = (r["rss_ready_kb"] - r["rss_before_kb"]) * 1024 if r.get("rss_ready_kb") else None
    return {
        "max sustained ev/s": b.get("max_sustained"),
        "  at puts/s": s["rate"] if s else None,
        "  p50 delivery ms": s["p50_ms"] if s else None,
        "  p99 delivery ms": s["p99_ms"] if s else None,
        "events received": ev,
        "missing": b.get("missing"),
        "duplicates": b.get("duplicates"),
        "out of order": b.get("out_of_order"),
        "errors": b.get("errors"),
        # below a few thousand watchers the RSS delta is within the allocator's noise
        "RSS/idle watcher B": (drss / nw) if (drss is not None and nw >= 5000) else None,
        "server CPU us/event": (r["cpu_s"] / ev * 1e6) if ev else None,
        "client CPU us/event": (b["client_cpu_s"] / ev * 1e6) if ev and b.get("client_cpu_s") is not None else None,
        "RSS peak MiB": r["hwm_kb"] / 1024 if r["hwm_kb"] else None,
    }
def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    if abs(v) >= 1000:
        return "%.0f" % v
    if abs(v) >= 10:
        return "%.1f" % v
    return "%.4f" % v
out, problems = [], []
out.append("%-24s %14s %14s %10s" % ("", "keelson", "etcd", "k/e"))
for wid in order:
    k, e = by.get((wid, "keelson")), by.get((wid, "etcd"))
    out.append(desc.get(wid, wid))
    fk, fe = figs(k), figs(e)
    # the same rate for both: Keelson's step at etcd's best rate (the target: lower p99 there)
    se = best(e["bench"]) if e and e.get("bench") else None
    sk = [s for s in (k["bench"].get("steps", []) if k and k.get("bench") else []) if se and s["rate"] == se["rate"]]
    if se:
        fk["p50 ms at etcd's best"] = sk[0]["p50_ms"] if sk else None
        fk["p99 ms at etcd's best"] = sk[0]["p99_ms"] if sk else None
        fe["p50 ms at etcd's best"] = se["p50_ms"]
        fe["p99 ms at etcd's best"] = se["p99_ms"]
    for name in fk:
        vk, ve = fk.get(name), fe.get(name)
        ratio = "%.2f" % (vk / ve) if isinstance(vk, (int, float)) and isinstance(ve, (int, float)) and ve else "-"
        out.append("  %-22s %14s %14s %10s" % (name, fmt(vk), fmt(ve), ratio))
    for r in (k, e):
        if r is None:
            continue
        b = r["bench"] or {}
        out.append("  %s steps (puts/s asked: events/s offered -> delivered during the step, step's events p50/p99 ms):" % r["server"])
        for i, s in enumerate(b.get("steps", [])):
            out.append("    %2d %7.0f: %9.0f -> %9.0f  %8.1f %8.1f  %s" % (
                i, s["rate"], s["expected"] / s["s"] if s["s"] else 0,
                s["received_in_step"] / s["s"] if s["s"] else 0, s["p50_ms"], s["p99_ms"],
                "kept up" if s["kept_up"] else "fell behind (%d of %d events)" % (s["events"], s["expected"])))
        bad = b.get("errors") or b.get("missing") or b.get("duplicates") or b.get("out_of_order")
        if r["rc"] != 0 or not r["alive"] or bad:
            problems.append("%s %s: exit %d, alive %d, errors %s, missing %s, duplicates %s, out of order %s %s" % (
                r["server"], wid, r["rc"], r["alive"], b.get("errors"), b.get("missing"), b.get("duplicates"),
                b.get("out_of_order"), b.get("first_error", "")))
out.append("")
out.append("max sustained ev/s = events delivered during the best step that kept up / its length; p50/p99 =")
out.append("  delivery latency of that step's events (receive time - put send time stamped in the value, same host,")
out.append("  CLOCK_MONOTONIC; includes the put's own commit). RSS/idle watcher = (server VmRSS 1 s after all")
out.append("  watchers were created - VmRSS before the run) / watchers. CPU us/event = utime+stime over the whole run")
out.append("  (watcher creation included) / events received (= ms per 1k events); client = the load generator (getrusage, from the")
out.append("  first put to the end of the drain).")
if problems:
    out.append("")
    out.append("PROBLEMS:")
    out.extend("  " + p for p in problems)
out.append("")
out.append("raw JSON lines:")
for r in runs:
    out.append("  " + json.dumps(r, separators=(",", ":")))
print("\n".join(out))
for r in runs:
    if r["server"] == "keelson":
        b = r["bench"] or {}
        if r["rc"] != 0 or not r["alive"] or b.get("errors") or b.get("missing") or b.get("duplicates") or b.get("out_of_order"):
            sys.exit(3)
PY
)" || failed=1
report="$(printf '%s\n\n%s\n\n%s\n' "$header" "$table" "$(report_logs)")"
write_report "$report" "-watch"
exit $failed
