#!/usr/bin/env bash
# tools/bench_cluster.sh - side-by-side benchmark of a 3-member Keelson cluster and a 3-member
# etcd 3.4 cluster, all six members on 127.0.0.1 with data on disk, running during the same run.
# Also run as `tools/bench.sh --members 3`.
#
#   tools/bench_cluster.sh           full run (~8 min): writes bench/results/<date>-<commit>-cluster.txt
#   tools/bench_cluster.sh --smoke   tiny totals (~30 s): exits non-zero on any Keelson error; no file
#   options: --duration S (seconds per timed workload, full mode; default 10), --no-etcd, --out FILE,
#            --keep (keep the temp dir), --members N (default 3), --list-keys N (LIST probe, default 100000)
#   env:     as tools/bench.sh (ETCD_BIN, KEELSON_BIN, KEELSON_DESC, BENCH_TMPDIR)
#
# Workloads (the same against both clusters; "leader", "follower", "followers" and "all" say which
# members the clients connect to, connections spread round-robin):
#   put with 1 client (leader; follower) and 64 clients (leader; all), 256 B values;
#   linearizable and serializable range of one key through the followers, 64 clients;
#   txn-mixed (CAS txns on 100 hot keys, half the requests reads), 64 clients (leader; all);
#   apiserver-load (10,000 objects of 1-10 KB) then the apiserver mix, 64 clients (leader; all);
#   LIST probe: 100,000 keys of 1 KB, then one full LIST from the leader paginated with limit 500
#   and one without limit (and, on Keelson, one KV.RangeStream), sampling the member's RSS every 10 ms.
# Per workload it reports throughput, latency percentiles, CPU s per 1,000 requests and RSS summed
# over the members, and for writes the entries per commit (Keelson: keelson_batch_requests_total /
# keelson_batch_commits_total; etcd: proposals committed / WAL fsyncs) on the leader AND on a
# follower, plus (when perf works, full mode) the sync calls (fdatasync+fsync+msync) each of those
# members made, i.e. writes per real fsync.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
mode=full
dur=10
with_etcd=1
out=""
keep=0
n_members=3
list_keys=100000
while [ $# -gt 0 ]; do
	case "$1" in
	--smoke) mode=smoke ;;
	--duration) dur="$2"; shift ;;
	--duration=*) dur="${1#*=}" ;;
	--no-etcd) with_etcd=0 ;;
	--out) out="$2"; shift ;;
	--out=*) out="${1#*=}" ;;
	--keep) keep=1 ;;
	--members) n_members="$2"; shift ;;
	--members=*) n_members="${1#*=}" ;;
	--list-keys) list_keys="$2"; shift ;;
	--list-keys=*) list_keys="${1#*=}" ;;
	-h|--help) sed -n '2,24p' "$0"; exit 0 ;;
	*) echo "bench_cluster.sh: unknown argument $1" >&2; exit 2 ;;
	esac
	shift
done
case "$n_members" in 3 | 5) ;; *) echo "bench_cluster.sh: --members must be 3 or 5" >&2; exit 2 ;; esac
command -v etcdctl >/dev/null || { echo "bench_cluster.sh: needs etcdctl (leader discovery)" >&2; exit 2; }
[ "$mode" = full ] && perf_wrap=1
# shellcheck source=tools/bench_lib.sh
. "$repo/tools/bench_lib.sh"
bench_check_tools
bench_setup

start_server keelson "$n_members"
[ "$with_etcd" = 1 ] && start_server etcd "$n_members"
wait_ready keelson
find_leader keelson
if [ "$with_etcd" = 1 ]; then
	wait_ready etcd
	find_leader etcd
fi
load0="$(cut -d' ' -f1 /proc/loadavg)"
fsync_json="$("$B" fsync --dir "$work" --count 200 --block-size 4096 --json | grep '^{')"
for s in keelson etcd; do
	[ "$s" = etcd ] && [ "$with_etcd" = 0 ] && continue
	log "bench_cluster.sh: $s leader m${SRV_LEADER[$s]} (:${SRV_CPORT[$s,${SRV_LEADER[$s]}]}), follower m${SRV_FOLLOWER[$s]}"
done

# list_probe SERVER ID LIMIT [ARGS...]: one full LIST of list/ from the leader while a sampler reads the
# member's VmRSS and RssAnon every 10 ms; VmHWM is reset just before (clear_refs 5).
list_probe() {
	local server="$1" id="$2" limit="$3" l=${SRV_LEADER[$1]}
	shift 3
	local pid=${SRV_PID[$server,$l]} rc=0 js
	local stop="$work/sampler.stop" res="$work/sampler.out" ready="$work/sampler.ready"
	rm -f "$stop" "$res" "$ready"
	reset_hwm "$pid"
	python3 - "$pid" "$stop" "$res" "$ready" <<'PY' &
import os, sys, time
pid, stop, out, ready = sys.argv[1:5]
base = peak = None
def read():
    d = {}
    with open("/proc/%s/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon"):
                d[k] = int(v.split()[0])
    return d
base = read(); peak = dict(base)
open(ready, "w").close()
while not os.path.exists(stop):
    try:
        d = read()
    except OSError:
        break
    for k in d:
        peak[k] = max(peak[k], d[k])
    time.sleep(0.01)
open(out, "w").write("%d %d %d %d\n" % (base["VmRSS"], base["RssAnon"], peak["VmRSS"], peak["RssAnon"]))
PY
	local sp=$!
	for _ in $(seq 200); do [ -e "$ready" ] && break; sleep 0.05; done
	js="$(timeout 300 "$B" --endpoints "127.0.0.1:${SRV_CPORT[$server,$l]}" --label "$server/$id" --json --timeout 120 \
		list list/ --limit "$limit" "$@" 2>"$work/bench.err")" || rc=$?
	sleep 0.05
	touch "$stop"
	wait "$sp" || true
	local b_rss b_anon p_rss p_anon hwm
	read -r b_rss b_anon p_rss p_anon <"$res" || { b_rss=0; b_anon=0; p_rss=0; p_anon=0; }
	hwm=$(hwm_kb "$pid" 2>/dev/null || echo 0)
	js="$(printf '%s\n' "$js" | grep '^{' | tail -1 || true)"
	[ -n "$js" ] || js=null
	printf '{"server":"%s","id":"%s","target":"leader","rc":%d,"alive":1,"probe":{"base_rss_kb":%s,"base_anon_kb":%s,"peak_rss_kb":%s,"peak_anon_kb":%s,"hwm_kb":%s},"bench":%s}\n' \
		"$server" "$id" "$rc" "$b_rss" "$b_anon" "$p_rss" "$p_anon" "$hwm" "$js" >>"$runs"
	log "  $server $id: RSS $b_rss -> peak $p_rss KiB, anon $b_anon -> peak $p_anon KiB (exit $rc)"
	if [ "$rc" != 0 ] && [ "$server" = keelson ]; then
		failed=1
		log "    stderr: $(tail -3 "$work/bench.err" | tr '\n' ' ')"
	fi
}

put="--key-size 8 --val-size 256 --key-space-size 100000"
objs="--objects 10000 --namespaces 50 --val-size-min 1024 --val-size 10240"
if [ "$mode" = smoke ]; then
	amt1="--total 100"; amt="--total 1000"; objs="--objects 300 --namespaces 5 --val-size-min 1024 --val-size 4096"
	load_amt="--total 300"; list_keys=2000
else
	amt1="--duration $dur"; amt="--duration $dur"; load_amt="--total 10000"
fi
# shellcheck disable=SC2086
{
	both put-1c-leader leader put --conns 1 --clients 1 $put $amt1
	both put-1c-follower follower put --conns 1 --clients 1 $put $amt1
	both put-64c-leader leader put --conns 8 --clients 64 $put $amt
	both put-64c-all all put --conns 9 --clients 64 $put $amt
	for s in keelson etcd; do # a key to read
		[ "$s" = etcd ] && [ "$with_etcd" = 0 ] && continue
		ETCDCTL_API=3 etcdctl --endpoints "$(endpoints "$s" leader)" put bench-key "$(head -c 256 /dev/zero | tr '\0' v)" >/dev/null
	done
	both range-l-64c-followers followers range bench-key --consistency l --conns 8 --clients 64 $amt
	both range-s-64c-followers followers range bench-key --consistency s --conns 8 --clients 64 $amt
	# the mixes twice: all clients on the leader, then spread (writes through followers are forwarded)
	both txn-mixed-64c-leader leader txn-mixed --key-space-size 100 --read-fraction 0.5 --val-size 256 --conns 8 --clients 64 $amt
	both txn-mixed-64c-all all txn-mixed --key-space-size 100 --read-fraction 0.5 --val-size 256 --conns 9 --clients 64 $amt
	both apiserver-load leader apiserver-load $objs --conns 8 --clients 64 $load_amt
	both apiserver-64c-leader leader apiserver $objs --limit 500 --conns 8 --clients 64 $amt
	both apiserver-64c-all all apiserver $objs --limit 500 --conns 9 --clients 64 $amt
	both list-load leader put --key-prefix list/ --sequential-keys --key-space-size "$list_keys" --total "$list_keys" \
		--key-size 8 --val-size 1024 --conns 8 --clients 64
	for s in keelson etcd; do
		[ "$s" = etcd ] && [ "$with_etcd" = 0 ] && continue
		list_probe "$s" list-paged 500
		list_probe "$s" list-unpaged 0
	done
	list_probe keelson list-stream 0 --stream # KV.RangeStream (etcd 3.4 has none)
}

# --- report ----------------------------------------------------------------------------------
header="$(
	echo "Keelson vs etcd benchmark, $n_members-member clusters ($mode mode)"
	report_header "tools/bench.sh --members $n_members$([ "$mode" = smoke ] && echo " --smoke") (= tools/bench_cluster.sh; per timed workload: $([ "$mode" = smoke ] && echo "fixed totals" || echo "${dur} s"); LIST probe over $list_keys keys of 1 KB; load generator bazel-bin/tools/benchmark on the same host)"
	echo "note:     the machine is shared with other engineers' builds and tests and has 2 CPUs for $((2 * n_members)) members plus the"
	echo "          load generator: absolute figures are noisy; read the ratios of the same run."
	[ "$perf_ok" = 1 ] || echo "syncs:    perf not usable here (or smoke mode): no sync-call counts"
)"
table="$(python3 - "$runs" "$fsync_json" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
fs = json.loads(sys.argv[2])
by, order = {}, []
for r in runs:
    if r["id"] not in order:
        order.append(r["id"])
    by[(r["id"], r["server"])] = r
desc = {
    "put-1c-leader": "put, 1 client / 1 conn, to the leader",
    "put-1c-follower": "put, 1 client / 1 conn, through a follower (forwarded to the leader)",
    "put-64c-leader": "put, 64 clients / 8 conns, all to the leader",
    "put-64c-all": "put, 64 clients / 9 conns spread over all members",
    "range-l-64c-followers": "range linearizable, 1 key, 64 clients / 8 conns over the followers (ReadIndex)",
    "range-s-64c-followers": "range serializable, 1 key, 64 clients / 8 conns over the followers",
    "txn-mixed-64c-leader": "txn-mixed: 100 hot keys, 50% Range / 50% Txn(If mod==r Then Put Else Get), 64 clients to the leader",
    "txn-mixed-64c-all": "txn-mixed: 100 hot keys, 50% Range / 50% Txn(If mod==r Then Put Else Get), 64 clients over all",
    "apiserver-load": "apiserver-load: create the objects (Txn If create==0 Then Put), 64 clients to the leader",
    "apiserver-64c-leader": "apiserver mix (get/list-page/count/create/update/delete/event + 6 prefix watches), 64 clients to the leader",
    "apiserver-64c-all": "apiserver mix (get/list-page/count/create/update/delete/event + 6 prefix watches), 64 clients over all",
    "list-load": "LIST probe data: put keys list/<n> with 1 KB values, 64 clients to the leader",
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
    return "%.3f" % v
def member(r, role):
    for m in r.get("members", []):
        if m["role"] == role:
            return m
    return None
def figs(r):
    if r is None:
        return {}
    b = r["bench"] or {}
    lat = b.get("lat_ms", {})
    ok = b.get("ok", 0)
    f = {
        "throughput req/s": b.get("rps"),
        "latency p50 ms": lat.get("p50"),
        "latency p90 ms": lat.get("p90"),
        "latency p99 ms": lat.get("p99"),
        "latency p99.9 ms": lat.get("p99_9"),
        "latency max ms": lat.get("max"),
        "errors": b.get("errors"),
        "CPU s / 1k req (sum)": (r["cpu_s"] / ok * 1000) if ok else None,
        "RSS peak MiB (sum)": r["hwm_kb"] / 1024 if r["hwm_kb"] else None,
        "RSS anon MiB (sum)": r["anon_kb"] / 1024 if r["anon_kb"] else None,
    }
    if b.get("conflicts") is not None:
        f["CAS conflicts"] = b.get("conflicts")
    ldr, fol = member(r, "leader"), member(r, "follower")
    writes = ldr["d_req"] if ldr else 0
    if writes > 100:
        for name, m in (("leader", ldr), ("follower", fol)):
            if m is None:
                continue
            f["entries/commit " + name] = (m["d_req"] / m["d_commit"]) if m["d_commit"] else None
            f["entries/sync call " + name] = (writes / m["syncs"]) if m.get("syncs") else None
            f["sync calls " + name] = m.get("syncs")
    for name, op in (b.get("ops") or {}).items():
        f["%s /s" % name] = op["rps"]
        f["%s p50 ms" % name] = op["lat_ms"]["p50"]
        f["%s p99 ms" % name] = op["lat_ms"]["p99"]
    return f
out = []
fl = fs["lat_ms"]
out.append("disk fdatasync floor (4 KiB write + fdatasync, %d times): median %.3f ms, p90 %.3f ms, p99 %.3f ms, max %.3f ms"
           % (fs["ok"], fl["p50"], fl["p90"], fl["p99"], fl["max"]))
out.append("")
out.append("%-26s %14s %14s %10s" % ("", "keelson", "etcd", "k/e"))
problems = []
probes = []
for wid in order:
    k, e = by.get((wid, "keelson")), by.get((wid, "etcd"))
    for r in (k, e):
        if r is None:
            continue
        b = r["bench"] or {}
        if r["rc"] != 0 or not r["alive"] or b.get("errors"):
            problems.append("%s %s: exit %d, alive %d, errors %s %s" % (
                r["server"], wid, r["rc"], r["alive"], json.dumps(b.get("errors_by_status")), b.get("first_error", "")))
    if (k or e or {}).get("probe"):
        probes.append((wid, k, e))
        continue
    out.append(desc.get(wid, wid))
    fk, fe = figs(k), figs(e)
    for name in list(fk) + [n for n in fe if n not in fk]:
        vk, ve = fk.get(name), fe.get(name)
        ratio = "-"
        if isinstance(vk, (int, float)) and isinstance(ve, (int, float)) and ve:
            ratio = "%.2f" % (vk / ve)
        out.append("  %-24s %14s %14s %10s" % (name, fmt(vk), fmt(ve), ratio))
    if k and wid.startswith("put-1c") and k["bench"] and fl["p50"]:
        out.append("  %-24s %14s" % ("vs fsync floor (p50)", fmt(k["bench"]["lat_ms"]["p50"] / fl["p50"]) + "x"))
if probes:
    out.append("")
    out.append("LIST memory probe: one full LIST of list/ from the leader (RSS of that member, sampled every 10 ms;")
    out.append("  VmHWM reset with clear_refs just before the LIST, read just after)")
    out.append("%-26s %14s %14s %10s" % ("", "keelson", "etcd", "k/e"))
    for wid, k, e in probes:
        out.append({"list-paged": "LIST with limit 500, continuing from the last key at the first page's revision",
                    "list-stream": "LIST by KV.RangeStream (etcd 3.7; etcd 3.4 has none; pages = messages)"}.get(
                        wid, "LIST without limit (one response)"))
        def pf(r):
            if r is None:
                return {}
            p, b = r["probe"], r["bench"] or {}
            return {
                "keys listed": b.get("keys"),
                "pages": b.get("pages"),
                "MiB listed": (b.get("bytes") or 0) / 1048576,
                "time s": b.get("elapsed_s"),
                "page p99 ms": (b.get("lat_ms") or {}).get("p99"),
                "RSS before MiB": p["base_rss_kb"] / 1024,
                "RSS peak MiB": p["peak_rss_kb"] / 1024,
                "RSS growth MiB": (p["peak_rss_kb"] - p["base_rss_kb"]) / 1024,
                "anon before MiB": p["base_anon_kb"] / 1024,
                "anon peak MiB": p["peak_anon_kb"] / 1024,
                "anon growth MiB": (p["peak_anon_kb"] - p["base_anon_kb"]) / 1024,
                "VmHWM after MiB": p["hwm_kb"] / 1024,
            }
        fk, fe = pf(k), pf(e)
        for name in fk or fe:
            vk, ve = fk.get(name), fe.get(name)
            ratio = "-"
            if isinstance(vk, (int, float)) and isinstance(ve, (int, float)) and ve:
                ratio = "%.2f" % (vk / ve)
            out.append("  %-24s %14s %14s %10s" % (name, fmt(vk), fmt(ve), ratio))
out.append("")
out.append("CPU and RSS are summed over the members (utime+stime delta / successful requests; VmHWM and")
out.append("  RssAnon after the workload; VmHWM includes mapped file pages of LMDB / bbolt).")
out.append("entries/commit: keelson = d(keelson_batch_requests_total)/d(keelson_batch_commits_total) of that member")
out.append("  (LMDB write transactions: log appends, durable, and applies of committed entries, MDB_NOMETASYNC);")
out.append("  etcd = d(etcd_server_proposals_committed_total)/d(etcd_disk_wal_fsync_duration_seconds_count).")
out.append("entries/sync call = writes committed (the leader's requests metric) / fdatasync+fsync+msync calls of")
out.append("  that member counted by perf during the workload, edges +-250 ms. Each LMDB commit makes one")
out.append("  fdatasync; a durable one also writes its meta page through LMDB's O_DSYNC descriptor, a second")
out.append("  device flush this count does not see. etcd: WAL fdatasync per Ready plus bbolt's periodic commits.")
out.append("apiserver: per-op rates and latencies; conflicts = compares that failed (optimistic concurrency")
out.append("  lost), answered with the current object; watch-event latency = receive - send time in the value.")
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
report="$(printf '%s\n\n%s\n\n%s\n' "$header" "$table" "$(report_logs)")"
write_report "$report" "-cluster"
exit $failed
