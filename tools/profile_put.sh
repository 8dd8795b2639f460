#!/usr/bin/env bash
# tools/profile_put.sh - where the time of a put goes, on Keelson and on etcd 3.4: 1 and 3
# members, 1 client and 64 clients, all on 127.0.0.1 with data on disk.
#
#   tools/profile_put.sh [--duration S] [--no-etcd] [--out FILE] [--keep]
#
# Per configuration and member: `perf trace -s` (syscall counts and times: fdatasync, the
# O_DSYNC meta-page pwrite64 of LMDB, writes and reads of the peer and gRPC sockets), CPU seconds
# (/proc utime+stime), the entries per commit metric; for the 64-client runs a `perf record -g`
# CPU profile of the leader (top symbols, self time). From those, per put on the reply path:
# the device-flush time of each member, the CPU time, and what remains (network, scheduling,
# waiting). Plus the disk's fdatasync floor. Needs perf (root or low perf_event_paranoid).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
mode=full
dur=8
with_etcd=1
out=""
keep=0
while [ $# -gt 0 ]; do
	case "$1" in
	--duration) dur="$2"; shift ;;
	--duration=*) dur="${1#*=}" ;;
	--no-etcd) with_etcd=0 ;;
	--out) out="$2"; shift ;;
	--out=*) out="${1#*=}" ;;
	--keep) keep=1 ;;
	-h|--help) sed -n '2,14p' "$0"; exit 0 ;;
	*) echo "profile_put.sh: unknown argument $1" >&2; exit 2 ;;
	esac
	shift
done
command -v perf >/dev/null || { echo "profile_put.sh: needs perf" >&2; exit 2; }
# shellcheck source=tools/bench_lib.sh
. "$repo/tools/bench_lib.sh"
bench_check_tools
bench_setup
load0="$(cut -d' ' -f1 /proc/loadavg)"
prof="$work/profile.jsonl"
: >"$prof"
fsync_json="$("$B" fsync --dir "$work" --count 200 --block-size 4096 --json | grep '^{')"

# trace_run SERVER ID CLIENTS CONNS: a put run on the leader while perf traces every member.
trace_run() {
	local server="$1" id="$2" clients="$3" conns="$4" n=${SRV_N[$1]} i
	local -a tp c0 w0
	for ((i = 0; i < n; i++)); do
		perf trace -s -p "${SRV_PID[$server,$i]}" -o "$work/trace.$server.$id.$i" 2>/dev/null &
		tp[i]=$!
	done
	sleep 1 # perf attaches
	for ((i = 0; i < n; i++)); do
		c0[i]=$(cpu_ticks "${SRV_PID[$server,$i]}")
		w0[i]=$(awk '/^write_bytes/{print $2}' "/proc/${SRV_PID[$server,$i]}/io")
	done
	local js rc=0 s0
	s0=$(disk_sectors)
	js="$("$B" --endpoints "$(endpoints "$server" leader)" --label "$server/$id" --json put --conns "$conns" \
		--clients "$clients" --key-size 8 --val-size 256 --key-space-size 100000 --duration "$dur" 2>"$work/bench.err" |
		grep '^{' | tail -1)" || rc=$?
	local cpus="" wbs="" dev_bytes=$((($(disk_sectors) - s0) * 512))
	for ((i = 0; i < n; i++)); do
		cpus="$cpus${cpus:+,}$(awk -v a="${c0[i]}" -v b="$(cpu_ticks "${SRV_PID[$server,$i]}")" -v t="$clk_tck" 'BEGIN{printf "%.3f", (b-a)/t}')"
		wbs="$wbs${wbs:+,}$(($(awk '/^write_bytes/{print $2}' "/proc/${SRV_PID[$server,$i]}/io") - w0[i]))"
	done
	for ((i = 0; i < n; i++)); do kill -INT "${tp[i]}" 2>/dev/null || true; done
	for ((i = 0; i < n; i++)); do wait "${tp[i]}" 2>/dev/null || true; done
	local rec=null
	if [ "$clients" -gt 1 ]; then
		local l=${SRV_LEADER[$server]}
		perf record -g -F 499 -o "$work/perf.$server.$id.data" -p "${SRV_PID[$server,$l]}" -- sleep "$dur" >/dev/null 2>&1 &
		local rp=$!
		"$B" --endpoints "$(endpoints "$server" leader)" --json put --conns "$conns" --clients "$clients" \
			--key-size 8 --val-size 256 --key-space-size 100000 --duration "$dur" >/dev/null 2>&1 || true
		wait "$rp" || true
		perf report -i "$work/perf.$server.$id.data" --no-children --stdio --sort symbol --percent-limit 1.5 \
			2>/dev/null | grep -E '^ +[0-9.]+%' | sed -E 's/ +/ /g; s/ - - *$//' | head -25 >"$work/top.$server.$id" || true
		rec="$(python3 -c 'import json,sys; print(json.dumps(open(sys.argv[1]).read().splitlines()))' "$work/top.$server.$id")"
	fi
	python3 - "$server" "$id" "$clients" "$n" "${SRV_LEADER[$server]}" "$cpus" "$work" "$rc" "$js" "$rec" "$wbs" "$dev_bytes" >>"$prof" <<'PY'
import json, re, sys
server, wid, clients, n, leader, cpus, work, rc, js, rec, wbs, dev_bytes = sys.argv[1:13]
n, leader = int(n), int(leader)
members = []
for i in range(n):
    calls = {}
    try:
        text = open("%s/trace.%s.%s.%d" % (work, server, wid, i)).read()
    except OSError:
        text = ""
    # perf trace -s: per thread, "syscall calls errors total(ms) min avg max stddev"
    for line in text.splitlines():
        m = re.match(r"\s+(\w+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", line)
        if m:
            c = calls.setdefault(m.group(1), {"calls": 0, "ms": 0.0, "max_ms": 0.0})
            c["calls"] += int(m.group(2))
            c["ms"] += float(m.group(4))
            c["max_ms"] = max(c["max_ms"], float(m.group(7)))
    members.append({"i": i, "role": "leader" if i == leader else "follower",
                    "cpu_s": float(cpus.split(",")[i]), "write_bytes": int(wbs.split(",")[i]),
                    "syscalls": calls})
print(json.dumps({"server": server, "id": wid, "clients": int(clients), "members": n, "rc": int(rc),
                  "bench": json.loads(js) if js.strip() else None, "per_member": members,
                  "device_write_bytes": int(dev_bytes),
                  "top": json.loads(rec) if rec != "null" else None}))
PY
	log "  $server $id: $(printf '%s' "$js" | python3 -c 'import json,sys
try:
    j=json.load(sys.stdin); print("%.0f req/s, p50 %.2f ms" % (j["rps"], j["lat_ms"]["p50"]))
except Exception: print("no report")')"
}

for members in 1 3; do
	for s in keelson etcd; do
		[ "$s" = etcd ] && [ "$with_etcd" = 0 ] && continue
		start_server "$s" "$members"
		wait_ready "$s"
		[ "$members" -gt 1 ] && find_leader "$s"
		trace_run "$s" "m$members-c1" 1 1
		trace_run "$s" "m$members-c64" 64 8
		for ((i = 0; i < members; i++)); do
			kill -TERM "${SRV_PID[$s,$i]}" 2>/dev/null || true
		done
		for ((i = 0; i < members; i++)); do
			for _ in $(seq 100); do kill -0 "${SRV_PID[$s,$i]}" 2>/dev/null || break; sleep 0.1; done
		done
		rm -rf "$work/$s".*.data # the next configuration starts afresh in the same dirs
	done
done

report="$(python3 - "$prof" "$fsync_json" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
fs = json.loads(sys.argv[2])
out = []
out.append("disk fdatasync floor (4 KiB write + fdatasync, 200 times): median %.3f ms, p90 %.3f ms, p99 %.3f ms"
           % (fs["lat_ms"]["p50"], fs["lat_ms"]["p90"], fs["lat_ms"]["p99"]))
out.append("")
out.append("Per put (totals over the run / successful puts; ms are summed call times, so with many clients")
out.append("one flush serves a whole batch). fdsync = fdatasync + fsync calls. pwrite = pwrite64: LMDB writes")
out.append("each dirty page run of a commit with one, the last being the meta page through its O_DSYNC")
out.append("descriptor (a device flush of its own). flush ms = fdsync ms + pwrite ms. perf trace -p follows")
out.append("the threads that exist when it attaches: Go starts threads later, so etcd's counts are a lower bound.")
out.append("KB wr/op = /proc/PID/io write_bytes during the traced run / puts: what the kernel counts as")
out.append("dirtied by that member; it counts a page again when it is rewritten while being written back, so")
out.append("with many clients it overstates the disk's work. device KB/op = sectors the data dir's block")
out.append("device wrote during the run (all members, journal included) / puts: what reached the disk.")
for r in rows:
    b = r["bench"] or {}
    ok = b.get("ok") or 0
    if not ok:
        out.append("%s %s: no successful puts" % (r["server"], r["id"]))
        continue
    out.append("")
    out.append("%s, %d member(s), %d client(s): %.0f puts/s, p50 %.3f ms, p99 %.3f ms (%d puts)"
               % (r["server"], r["members"], r["clients"], b["rps"], b["lat_ms"]["p50"], b["lat_ms"]["p99"], ok))
    if r.get("device_write_bytes"):
        out.append("  device KB/op (all members): %.2f" % (r["device_write_bytes"] / 1024.0 / ok))
    out.append("  %-9s %9s %9s %9s %9s %9s %9s %9s %9s" % ("member", "fdsync/op", "fdsync ms", "pwrite/op",
                                                              "pwrite ms", "flush ms", "CPU ms", "futex/op", "KB wr/op"))
    for m in r["per_member"]:
        sc = m["syscalls"]
        def g(name, k):
            return sc.get(name, {}).get(k, 0)
        fd_n = g("fdatasync", "calls") + g("fsync", "calls")
        fd_ms = g("fdatasync", "ms") + g("fsync", "ms")
        pw_n, pw_ms = g("pwrite64", "calls"), g("pwrite64", "ms")
        out.append("  %-9s %9.3f %9.3f %9.3f %9.3f %9.3f %9.3f %9.2f %9.2f" % (
            m["role"], fd_n / ok, fd_ms / ok, pw_n / ok, pw_ms / ok, (fd_ms + pw_ms) / ok,
            m["cpu_s"] * 1000.0 / ok, g("futex", "calls") / ok, m.get("write_bytes", 0) / 1024.0 / ok))
    if r.get("top"):
        out.append("  CPU profile of the leader (perf record -g, self time, symbols >= 1.5%):")
        for line in r["top"][:15]:
            out.append("    " + line.strip())
out.append("")
out.append("raw JSON lines:")
for r in rows:
    out.append("  " + json.dumps(r, sort_keys=True))
print("\n".join(out))
PY
)"
hdr="$(report_header "tools/profile_put.sh --duration $dur")"
printf 'Put path profile: Keelson vs etcd 3.4\n%s\n\n%s\n' "$hdr" "$report"
if [ -n "$out" ]; then printf 'Put path profile: Keelson vs etcd 3.4\n%s\n\n%s\n' "$hdr" "$report" >"$out"; fi
