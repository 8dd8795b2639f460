#!/usr/bin/env bash
# tools/bench_put1.sh - put with 1 client to the leader of a 3-member Keelson and a 3-member etcd
# 3.4, on a fresh store and again after a preload of puts with 1,000 clients (the store grows to
# ~100,000 keys; bench_targets.sh measures put-1c at that point), alternating the servers per
# round. Per run: p50/p99, the average WAL fdatasync and backend commit of the leader and a
# follower (both servers' etcd_disk_wal_fsync / etcd_disk_backend_commit_duration_seconds), and
# the data dir's block device writes per put (all members). It shows what slows a lone writer
# as the store grows: the device's flushes, shared by the WAL and the LMDB commits.
#
#   tools/bench_put1.sh [--duration S] [--preload S] [--rounds N] [--out FILE] [--keep] [--no-etcd]
#   env: as tools/bench.sh (ETCD_BIN, KEELSON_BIN, BENCH_TMPDIR)
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
mode=full
dur=8
preload=10
rounds=2
with_etcd=1
out=""
keep=0
while [ $# -gt 0 ]; do
	case "$1" in
	--duration) dur="$2"; shift ;;
	--preload) preload="$2"; shift ;;
	--rounds) rounds="$2"; shift ;;
	--out) out="$2"; shift ;;
	--keep) keep=1 ;;
	--no-etcd) with_etcd=0 ;;
	-h|--help) sed -n '2,12p' "$0"; exit 0 ;;
	*) echo "bench_put1.sh: unknown argument $1" >&2; exit 2 ;;
	esac
	shift
done
# shellcheck source=tools/bench_lib.sh
. "$repo/tools/bench_lib.sh"
bench_check_tools
bench_setup
load0="$(cut -d' ' -f1 /proc/loadavg)"
fsync_json="$("$B" fsync --dir "$work" --count 200 --block-size 4096 --json | grep '^{')"
flush_metrics() { # server i -> "wal_sum wal_count commit_sum commit_count"
	local p=${SRV_MPORT[$1,$2]}
	curl -s --max-time 5 "http://127.0.0.1:$p/metrics" | awk '
		$1 == "etcd_disk_wal_fsync_duration_seconds_sum" {a = $2}
		$1 == "etcd_disk_wal_fsync_duration_seconds_count" {b = $2}
		$1 == "etcd_disk_backend_commit_duration_seconds_sum" {c = $2}
		$1 == "etcd_disk_backend_commit_duration_seconds_count" {d = $2}
		END {print a + 0, b + 0, c + 0, d + 0}'
}
lines="$work/put1.jsonl"
: >"$lines"

# put1 SERVER ROUND PHASE: one 1-client put run on the leader, recorded as a JSON line.
put1() {
	local server="$1" round="$2" phase="$3" l=${SRV_LEADER[$1]} f=${SRV_FOLLOWER[$1]} js s0 ml0 mf0
	ml0="$(flush_metrics "$server" "$l")"
	mf0="$(flush_metrics "$server" "$f")"
	s0=$(disk_sectors)
	js="$("$B" --endpoints "$(endpoints "$server" leader)" --label "$server/$phase" --json put --conns 1 --clients 1 \
		--key-size 8 --val-size 256 --key-space-size 100000 --duration "$dur" 2>/dev/null | grep '^{' | tail -1)" || true
	python3 - "$server" "$round" "$phase" "$js" "$(($(disk_sectors) - s0))" "$ml0" "$(flush_metrics "$server" "$l")" \
		"$mf0" "$(flush_metrics "$server" "$f")" >>"$lines" <<'PY'
import json, sys
server, rnd, phase, js, sectors = sys.argv[1:6]
def avg(a, b, i):
    a, b = [float(x) for x in a.split()], [float(x) for x in b.split()]
    n = b[i + 1] - a[i + 1]
    return (b[i] - a[i]) / n * 1000.0 if n > 0 else None
ml0, ml1, mf0, mf1 = sys.argv[6:10]
print(json.dumps({"server": server, "round": int(rnd), "phase": phase,
                  "bench": json.loads(js) if js.strip() else None, "device_bytes": int(sectors) * 512,
                  "leader_wal_ms": avg(ml0, ml1, 0), "leader_commit_ms": avg(ml0, ml1, 2),
                  "follower_wal_ms": avg(mf0, mf1, 0), "follower_commit_ms": avg(mf0, mf1, 2)}))
PY
	log "  $server round $round $phase: $(tail -1 "$lines" | python3 -c 'import json,sys
j=json.load(sys.stdin)["bench"] or {}; print("p50 %.3f ms" % j["lat_ms"]["p50"] if j else "no report")')"
}

servers=(keelson)
[ "$with_etcd" = 1 ] && servers+=(etcd)
for ((r = 1; r <= rounds; r++)); do
	for server in "${servers[@]}"; do
		rm -rf "$work/$server".*.data
		start_server "$server" 3
		wait_ready "$server"
		find_leader "$server"
		put1 "$server" "$r" fresh
		"$B" --endpoints "$(endpoints "$server" leader)" put --conns 100 --clients 1000 --key-size 8 --val-size 256 \
			--key-space-size 100000 --duration "$preload" >/dev/null 2>&1 || true
		put1 "$server" "$r" preloaded
		for ((i = 0; i < 3; i++)); do kill "${SRV_PID[$server,$i]}" 2>/dev/null || true; done
		for ((i = 0; i < 3; i++)); do wait "${SRV_PID[$server,$i]}" 2>/dev/null || true; done
	done
done

report="$(
	echo "Put, 1 client, 3 members: fresh store vs after a ${preload} s preload with 1,000 clients"
	report_header "tools/bench_put1.sh --duration $dur --preload $preload --rounds $rounds"
	echo
	python3 - "$lines" "$fsync_json" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
fs = json.loads(sys.argv[2])
out = ["disk fdatasync floor (4 KiB write + fdatasync, 200 times): median %.3f ms, p90 %.3f ms, p99 %.3f ms"
       % (fs["lat_ms"]["p50"], fs["lat_ms"]["p90"], fs["lat_ms"]["p99"]), "",
       "WAL / commit = average etcd_disk_wal_fsync / etcd_disk_backend_commit_duration_seconds over the run",
       "(Keelson: the WAL write + fdatasync of a Ready, the LMDB commit of an apply on the committer thread;",
       "etcd: its WAL fsync, its backend's periodic commit). device KB/put: the data dir's block device,",
       "all three members.", "",
       "%-8s %-5s %-10s %9s %9s %9s %9s %9s %9s %9s %12s" % ("server", "round", "store", "puts/s", "p50 ms", "p99 ms",
           "L WAL ms", "L cmt ms", "F WAL ms", "F cmt ms", "dev KB/put")]
def f(v):
    return "%9.3f" % v if v is not None else "%9s" % "-"
for r in rows:
    b = r["bench"] or {}
    ok = b.get("ok") or 0
    if not ok:
        out.append("%-8s %-5d %-10s no successful puts" % (r["server"], r["round"], r["phase"]))
        continue
    out.append("%-8s %-5d %-10s %9.0f %9.3f %9.3f %s %s %s %s %12.1f" % (
        r["server"], r["round"], r["phase"], b["rps"], b["lat_ms"]["p50"], b["lat_ms"]["p99"],
        f(r["leader_wal_ms"]), f(r["leader_commit_ms"]), f(r["follower_wal_ms"]), f(r["follower_commit_ms"]),
        r["device_bytes"] / 1024.0 / ok))
out.append("")
for phase in ("fresh", "preloaded"):
    med = {}
    for s in ("keelson", "etcd"):
        v = sorted(r["bench"]["lat_ms"]["p50"] for r in rows if r["server"] == s and r["phase"] == phase and r["bench"])
        if v:
            med[s] = (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2.0
    if len(med) == 2:
        out.append("%s store: p50 keelson/etcd %.2fx (median over rounds: %.3f vs %.3f ms); keelson p50 / floor %.1fx"
                   % (phase, med["keelson"] / med["etcd"], med["keelson"], med["etcd"], med["keelson"] / fs["lat_ms"]["p50"]))
out.append("")
out.append("raw JSON lines:")
out += ["  " + json.dumps(r, sort_keys=True) for r in rows]
print("\n".join(out))
PY
)"
write_report "$report" "-put1"
