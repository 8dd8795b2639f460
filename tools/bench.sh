#!/usr/bin/env bash
# tools/bench.sh - side-by-side benchmark of Keelson and a real etcd 3.4, single member each,
# data on disk, both running during the same run on free 127.0.0.1 ports.
#
#   tools/bench.sh            full run (~4 min; adds watch and lease keep-alive runs): writes bench/results/<date>-<commit>.txt and prints it
#   tools/bench.sh --smoke    CI smoke (~20 s, tiny totals): exits non-zero if the benchmark tool
#                             reports any error against Keelson or Keelson dies; writes no file
#   options: --duration S (seconds per workload, full mode; default 12), --no-etcd,
#            --out FILE (results file), --keep (keep the temp dir with data and logs)
#   env:     ETCD_BIN (default /usr/bin/etcd), KEELSON_BIN (benchmark this binary instead of
#            building //server:keelson; KEELSON_DESC describes it in the report), BENCH_TMPDIR (parent of the temp dir; must be on
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
while [ $# -gt 0 ]; do
	case "$1" in
	--smoke) mode=smoke ;;
	--duration) dur="$2"; shift ;;
	--duration=*) dur="${1#*=}" ;;
	--no-etcd) with_etcd=0 ;;
	--out) out="$2"; shift ;;
	--out=*) out="${1#*=}" ;;
	--keep) keep=1 ;;
	-h|--help) sed -n '2,21p' "$0"; exit 0 ;;
	*) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
	esac
	shift
done
etcd_bin="${ETCD_BIN:-/usr/bin/etcd}"
if [ "$with_etcd" = 1 ] && [ ! -x "$etcd_bin" ]; then
	if [ "$mode" = smoke ]; then
		echo "bench.sh: $etcd_bin not found; smoke run against Keelson only" >&2
		with_etcd=0
	else
		echo "bench.sh: $etcd_bin not found (set ETCD_BIN or pass --no-etcd)" >&2
		exit 2
	fi
fi
command -v python3 >/dev/null || { echo "bench.sh: needs python3" >&2; exit 2; }
command -v curl >/dev/null || { echo "bench.sh: needs curl" >&2; exit 2; }

# --- build, then run private copies so a concurrent rebuild cannot swap binaries mid-run -------
# KEELSON_BIN=path benchmarks that binary instead of building //server:keelson.
if [ -n "${KEELSON_BIN:-}" ]; then
	(cd "$repo" && bazel build //tools:benchmark >&2)
	keelson_src="$KEELSON_BIN"
else
	(cd "$repo" && bazel build //server:keelson //tools:benchmark >&2)
	keelson_src="$repo/bazel-bin/server/keelson"
fi

tmp_parent="${BENCH_TMPDIR:-${TMPDIR:-/tmp}}"
if [ "$(stat -c %d "$tmp_parent")" != "$(stat -c %d "$repo")" ]; then
	tmp_parent="$repo/bench/.tmp"
	mkdir -p "$tmp_parent"
fi
work="$(mktemp -d "$tmp_parent/keelson-bench.XXXXXX")"
cp "$keelson_src" "$work/keelson-bin"
cp "$repo/bazel-bin/tools/benchmark" "$work/benchmark-bin"
B="$work/benchmark-bin"

pids=()
cleanup() {
	for p in "${pids[@]}"; do
		if kill -0 "$p" 2>/dev/null; then
			kill -TERM "$p" 2>/dev/null || true
			for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
			kill -KILL "$p" 2>/dev/null || true
		fi
	done
	if [ "$keep" = 1 ]; then echo "bench.sh: kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

read -r kc kp km ec ep em < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(6)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])
for s in ss: s.close()')

member_flags() { # name client peer metrics dir
	echo --name "$1" --data-dir "$5" \
		--listen-client-urls "http://127.0.0.1:$2" --advertise-client-urls "http://127.0.0.1:$2" \
		--listen-peer-urls "http://127.0.0.1:$3" --initial-advertise-peer-urls "http://127.0.0.1:$3" \
		--initial-cluster "$1=http://127.0.0.1:$3" --listen-metrics-urls "http://127.0.0.1:$4"
}

# shellcheck disable=SC2046
"$work/keelson-bin" $(member_flags default "$kc" "$kp" "$km" "$work/keelson.data") >"$work/keelson.log" 2>&1 &
kpid=$!
pids+=("$kpid")
if [ "$with_etcd" = 1 ]; then
	# shellcheck disable=SC2046
	"$etcd_bin" $(member_flags default "$ec" "$ep" "$em" "$work/etcd.data") >"$work/etcd.log" 2>&1 &
	epid=$!
	pids+=("$epid")
fi

wait_ready() { # name port pid
	for _ in $(seq 60); do
		kill -0 "$3" 2>/dev/null || { echo "bench.sh: $1 exited at start-up:" >&2; tail -20 "$work/$1.log" >&2; exit 1; }
		if "$B" --endpoints "127.0.0.1:$2" --dial-timeout 1 --timeout 2 range bench-ready --total 1 --json >/dev/null 2>&1; then
			return 0
		fi
		sleep 0.25
	done
	echo "bench.sh: $1 not serving after 15 s" >&2
	tail -20 "$work/$1.log" >&2
	exit 1
}
wait_ready keelson "$kc" "$kpid"
[ "$with_etcd" = 1 ] && wait_ready etcd "$ec" "$epid"

load0="$(cut -d' ' -f1 /proc/loadavg)"

# --- the disk's floor ------------------------------------------------------------------------
fsync_json="$("$B" fsync --dir "$work" --count 200 --block-size 4096 --json | grep '^{')"

# --- per-process counters --------------------------------------------------------------------
clk_tck="$(getconf CLK_TCK)"
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
hwm_kb() { awk '/^VmHWM:/{print $2}' "/proc/$1/status"; }
rss_kb() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }
anon_kb() { awk '/^RssAnon:/{print $2}' "/proc/$1/status"; }
metric() { # port name -> value (0 if absent)
	curl -s --max-time 5 "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n {v = $2} END {print (v == "" ? 0 : v)}'
}
runs="$work/runs.jsonl"
: >"$runs"
failed=0
log() { echo "$*" >&2; }

# run_one SERVER WORKLOAD-ID ARGS... : one benchmark invocation against one server, recorded in $runs
run_one() {
	local server="$1" id="$2"
	shift 2
	local port pid mport req_name com_name
	if [ "$server" = keelson ]; then
		port=$kc; pid=$kpid; mport=$km
		req_name=keelson_batch_requests_total; com_name=keelson_batch_commits_total
	else
		port=$ec; pid=$epid; mport=$em
		req_name=etcd_server_proposals_committed_total; com_name=etcd_disk_wal_fsync_duration_seconds_count
	fi
	local c0 r0 f0 c1 r1 f1 rc=0 js
	c0=$(cpu_ticks "$pid"); r0=$(metric "$mport" $req_name); f0=$(metric "$mport" $com_name)
	local limit=120
	[ "$mode" = full ] && limit=$((${dur%.*} + 60))
	local rss_before=0 rss_ready=0
	if [ "$1" = watch ]; then
		# watch: the tool creates $rf once every watcher exists and waits for its removal before
		# writing; RSS is sampled in that idle window (1 s after creation) and before the run.
		local rf="$work/ready.$server.$id" bp
		rm -f "$rf"
		rss_before=$(rss_kb "$pid")
		timeout "$limit" "$B" --endpoints "127.0.0.1:$port" --label "$server/$id" --json --ready-file "$rf" "$@" \
			>"$work/bench.out" 2>"$work/bench.err" &
		bp=$!
		for _ in $(seq 2400); do
			if [ -e "$rf" ]; then
				sleep 1
				rss_ready=$(rss_kb "$pid")
				rm -f "$rf"
				break
			fi
			kill -0 "$bp" 2>/dev/null || break
			sleep 0.05
		done
		wait "$bp" || rc=$?
		js="$(cat "$work/bench.out")"
	else
		js="$(timeout "$limit" "$B" --endpoints "127.0.0.1:$port" --label "$server/$id" --json "$@" 2>"$work/bench.err")" || rc=$?
	fi
	js="$(printf '%s\n' "$js" | grep '^{' | tail -1 || true)"
	local alive=1
	kill -0 "$pid" 2>/dev/null || alive=0
	if [ "$alive" = 1 ]; then
		c1=$(cpu_ticks "$pid"); r1=$(metric "$mport" $req_name); f1=$(metric "$mport" $com_name)
		hwm=$(hwm_kb "$pid"); rss=$(rss_kb "$pid"); anon=$(anon_kb "$pid")
	else
		c1=$c0; r1=$r0; f1=$f0; hwm=0; rss=0; anon=0
	fi
	[ -n "$js" ] || js='null'
	printf '{"server":"%s","id":"%s","rc":%d,"alive":%d,"cpu_s":%s,"d_req":%s,"d_commit":%s,"hwm_kb":%s,"rss_kb":%s,"anon_kb":%s,"rss_before_kb":%s,"rss_ready_kb":%s,"bench":%s}\n' \
		"$server" "$id" "$rc" "$alive" "$(awk -v a="$c0" -v b="$c1" -v t="$clk_tck" 'BEGIN{printf "%.3f", (b-a)/t}')" \
		"$(awk -v a="$r0" -v b="$r1" 'BEGIN{printf "%.0f", b-a}')" "$(awk -v a="$f0" -v b="$f1" 'BEGIN{printf "%.0f", b-a}')" \
		"${hwm:-0}" "${rss:-0}" "${anon:-0}" "${rss_before:-0}" "${rss_ready:-0}" "$js" >>"$runs"
	local summary
	summary="$(printf '%s' "$js" | python3 -c 'import json,sys
try:
    j=json.load(sys.stdin); print("%.0f req/s, p99 %.2f ms, %d errors" % (j["rps"], j["lat_ms"]["p99"], j["errors"]))
except Exception: print("no report")')"
	log "  $server $id: $summary (exit $rc)"
	if [ "$rc" != 0 ] && [ "$server" = keelson ]; then
		failed=1
		log "    stderr: $(tail -3 "$work/bench.err" | tr '\n' ' ')"
		log "    report: $js"
	fi
	if [ "$alive" = 0 ]; then
		failed=1
		log "  !! $server (pid $pid) died during $id; last log lines:"
		tail -20 "$work/$server.log" >&2
		return 1
	fi
}

# both WORKLOAD-ID ARGS... : the same workload against Keelson, then etcd
both() {
	run_one keelson "$@" || exit 1
	if [ "$with_etcd" = 1 ]; then run_one etcd "$@" || true; fi
}

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
log "bench.sh: keelson pid $kpid on :$kc, etcd pid ${epid:-none} on :$ec; data under $work"
# shellcheck disable=SC2086
{
	both put-1c put --conns 1 --clients 1 $put $amt1
	both put-64c put --conns 8 --clients 64 $put $amt
	[ "$mode" = smoke ] && both txn-put-64c txn-put --conns 8 --clients 64 $put --total 500
	both range-s-64c range bench-key --consistency s --conns 8 --clients 64 $amt
	both range-l-64c range bench-key --consistency l --conns 8 --clients 64 $amt
	if [ "$mode" = smoke ]; then
		both watch-smoke watch --watchers 100 --watch-streams 10 --prefixes 10 --rate 100 --duration 1 --val-size 64 --drain 5
		both lease-keepalive-smoke lease-keepalive --leases 100 --conns 2 --clients 16 --total 2000
	else
		# issue 5's load runs: idle-watcher memory, then a steady write rate for 10 s
		both watch-10k-1p watch --watchers 10000 --watch-streams 100 --conns 4 --prefixes 1 --rate 50 --duration 10 --val-size 64 --drain 15
		both watch-1k-100p watch --watchers 1000 --watch-streams 10 --conns 2 --prefixes 100 --rate 500 --duration 10 --val-size 64 --drain 15
		# issue 6's keep-alive throughput: 1,000 leases, 64 streams over 8 connections
		both lease-keepalive-64s lease-keepalive --leases 1000 --conns 8 --clients 64 $amt
	fi
}

# --- report ----------------------------------------------------------------------------------
commit="$(cd "$repo" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
dirty="$(cd "$repo" && git status --porcelain 2>/dev/null | grep -q . && echo " (working tree has uncommitted changes)" || true)"
etcd_ver=none
if [ "$with_etcd" = 1 ]; then etcd_ver="$("$etcd_bin" --version 2>/dev/null || true)"; etcd_ver="${etcd_ver%%$'\n'*}"; fi
header="$(
	echo "Keelson vs etcd benchmark ($mode mode)"
	echo "date:     $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
	echo "commit:   $commit$dirty"
	echo "keelson:  ${KEELSON_BIN:-bazel-bin/server/keelson (built from the working tree)} (sha256 $(sha256sum "$work/keelson-bin" | cut -c1-12))${KEELSON_DESC:+; $KEELSON_DESC}"
	echo "machine:  $(nproc) CPUs ($(awk -F: '/^model name/{gsub(/^ +/,"",$2); print $2; exit}' /proc/cpuinfo)), $(awk '/^MemTotal:/{printf "%.1f GiB", $2/1048576}' /proc/meminfo) RAM, kernel $(uname -r)"
	echo "load:     1-min load average $load0 at start, $(cut -d' ' -f1 /proc/loadavg) at end (on $(nproc) CPUs shared by both servers and the load generator)"
	echo "disk:     $(df -hT "$work" | awk 'NR==2{print $1" ("$2")"}'), temp dir $work"
	echo "etcd:     $etcd_ver ($etcd_bin)"
	echo "command:  tools/bench.sh$([ "$mode" = smoke ] && echo " --smoke") (per workload: $([ "$mode" = smoke ] && echo "fixed totals" || echo "${dur} s"); key 8 B, value 256 B, 100k-key space; load generator bazel-bin/tools/benchmark on the same host)"
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
    if r["id"].startswith(("put", "txn")):
        f["entries per fsync"] = (r["d_req"] / r["d_commit"]) if r["d_commit"] else None
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
logs="$(
	for s in keelson etcd; do
		[ -f "$work/$s.log" ] || continue
		n_w=$(grep -cE '^[0-9-]+ [0-9:.]+ [WEC] \||"level":"(warn|error)"' "$work/$s.log" || true)
		echo "$s log: $(wc -l <"$work/$s.log") lines, $n_w warning/error lines"
		# most frequent kinds, timestamps dropped and numbers folded to N
		grep -E '^[0-9-]+ [0-9:.]+ [WEC] \||"level":"(warn|error)"' "$work/$s.log" |
			sed -E 's/^[0-9-]+ [0-9:.]+ //; s/[0-9]+(\.[0-9]+)?/N/g' | sort | uniq -c | sort -rn | head -5 |
			cut -c1-220 | sed 's/^/    /' || true
	done
)"
report="$(printf '%s\n\n%s\n\n%s\n' "$header" "$table" "$logs")"
echo "$report"
if [ "$mode" = full ]; then
	if [ -z "$out" ]; then
		mkdir -p "$repo/bench/results"
		base="$repo/bench/results/$(date -u +%Y-%m-%d)-$commit"
		out="$base.txt"
		n=2
		while [ -e "$out" ]; do out="$base-$n.txt"; n=$((n + 1)); done
	fi
	echo "$report" >"$out"
	echo >&2
	echo "bench.sh: results written to ${out#"$repo"/}" >&2
fi
exit $failed
