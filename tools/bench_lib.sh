# tools/bench_lib.sh - what tools/bench.sh (single member) and tools/bench_cluster.sh (3 members)
# share: building and copying the binaries, the temp dir, free ports, starting members of either
# server, readiness and leader discovery, per-process counters, and run_one (one benchmark
# invocation against one server, recorded as a JSON line). Sourced, not run.
#
# Callers set before sourcing: repo, mode (smoke|full), dur, with_etcd, keep.
# State: SRV_N[server] members; SRV_PID/SRV_CPORT/SRV_MPORT["server,i"]; SRV_LEADER[server] and
# SRV_FOLLOWER[server] (member indexes; 0 and 0 on a single member).

etcd_bin="${ETCD_BIN:-/usr/bin/etcd}"
declare -A SRV_N SRV_PID SRV_CPORT SRV_PPORT SRV_MPORT SRV_LEADER SRV_FOLLOWER SRV_T0
pids=()
failed=0
log() { echo "$*" >&2; }

bench_check_tools() {
	if [ "$with_etcd" = 1 ] && [ ! -x "$etcd_bin" ]; then
		if [ "$mode" = smoke ]; then
			log "bench: $etcd_bin not found; smoke run against Keelson only"
			with_etcd=0
		else
			log "bench: $etcd_bin not found (set ETCD_BIN or pass --no-etcd)"
			exit 2
		fi
	fi
	command -v python3 >/dev/null || { log "bench: needs python3"; exit 2; }
	command -v curl >/dev/null || { log "bench: needs curl"; exit 2; }
}

# Builds, then copies the binaries into a fresh temp dir so a concurrent rebuild cannot swap
# them mid-run. KEELSON_BIN=path benchmarks that binary instead of building //server:keelson.
bench_setup() {
	if [ "${BENCH_NO_BUILD:-0}" = 1 ]; then # the caller has just built them
		keelson_src="${KEELSON_BIN:-$repo/bazel-bin/server/keelson}"
	elif [ -n "${KEELSON_BIN:-}" ]; then
		(cd "$repo" && bazel build //tools:benchmark >&2)
		keelson_src="$KEELSON_BIN"
	else
		(cd "$repo" && bazel build //server:keelson //tools:benchmark >&2)
		keelson_src="$repo/bazel-bin/server/keelson"
	fi
	local tmp_parent="${BENCH_TMPDIR:-${TMPDIR:-/tmp}}"
	if [ "$(stat -c %d "$tmp_parent")" != "$(stat -c %d "$repo")" ]; then
		tmp_parent="$repo/bench/.tmp"
		mkdir -p "$tmp_parent"
	fi
	work="$(mktemp -d "$tmp_parent/keelson-bench.XXXXXX")"
	cp "$keelson_src" "$work/keelson-bin"
	cp "$repo/bazel-bin/tools/benchmark" "$work/benchmark-bin"
	B="$work/benchmark-bin"
	runs="$work/runs.jsonl"
	: >"$runs"
	trap bench_cleanup EXIT
	clk_tck="$(getconf CLK_TCK)"
	# With perf_wrap=1 (set by the caller) and a working `perf stat` on syscall tracepoints (root
	# or a low perf_event_paranoid), each member runs under `perf stat -I 250`, which counts its
	# fdatasync/fsync/msync calls every 250 ms: the syncs of a workload are the intervals ending
	# inside it (+-1 interval at each edge). Attaching perf to a running member (-p) counted nothing
	# in this container, hence the wrapper. Without it those columns are "-".
	perf_ok=0
	if [ "${perf_wrap:-0}" = 1 ] && command -v perf >/dev/null &&
		perf stat -x, -e syscalls:sys_enter_fdatasync -- true >/dev/null 2>&1; then
		perf_ok=1
	fi
}

now_s() { date +%s.%N; }

bench_cleanup() {
	for p in "${pids[@]}"; do
		if kill -0 "$p" 2>/dev/null; then
			kill -TERM "$p" 2>/dev/null || true
			for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
			kill -KILL "$p" 2>/dev/null || true
		fi
	done
	if [ "$keep" = 1 ]; then log "bench: kept $work"; else rm -rf "$work"; fi
}

free_ports() { # N -> N free TCP ports on 127.0.0.1
	python3 -c '
import socket, sys
ss = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])
for s in ss: s.close()' "$1"
}

# start_server SERVER N: N members of SERVER (keelson|etcd), data under $work/SERVER.I.data,
# logs in $work/SERVER.I.log (SERVER.log for a single member), all on free 127.0.0.1 ports.
start_server() {
	local server="$1" n="$2" bin i ic="" token="bench-$1-$$"
	[ "$server" = keelson ] && bin="$work/keelson-bin" || bin="$etcd_bin"
	local ports
	read -r -a ports < <(free_ports $((3 * n)))
	for ((i = 0; i < n; i++)); do
		SRV_CPORT[$server,$i]=${ports[$((3 * i))]}
		SRV_PPORT[$server,$i]=${ports[$((3 * i + 1))]}
		SRV_MPORT[$server,$i]=${ports[$((3 * i + 2))]}
		ic="$ic${ic:+,}m$i=http://127.0.0.1:${SRV_PPORT[$server,$i]}"
	done
	[ "$n" = 1 ] && ic="default=http://127.0.0.1:${SRV_PPORT[$server,0]}"
	SRV_N[$server]=$n
	for ((i = 0; i < n; i++)); do
		local name="m$i" logf="$work/$server.$i.log"
		[ "$n" = 1 ] && name=default && logf="$work/$server.log"
		local cp=${SRV_CPORT[$server,$i]} pp=${SRV_PPORT[$server,$i]}
		local -a wrap=()
		if [ "$perf_ok" = 1 ]; then
			wrap=(perf stat -I 250 -x, -e syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync,syscalls:sys_enter_msync
				-o "$work/perf.$server.$i" --)
			SRV_T0[$server,$i]=$(now_s)
		fi
		local -a extra=()
		# KEELSON_FLAGS: more flags for Keelson's members (e.g. --backend-batch-interval=25ms)
		[ "$server" = keelson ] && read -r -a extra <<<"${KEELSON_FLAGS:-}"
		"${wrap[@]}" "$bin" "${extra[@]}" --name "$name" --data-dir "$work/$server.$i.data" \
			--listen-client-urls "http://127.0.0.1:$cp" --advertise-client-urls "http://127.0.0.1:$cp" \
			--listen-peer-urls "http://127.0.0.1:$pp" --initial-advertise-peer-urls "http://127.0.0.1:$pp" \
			--initial-cluster "$ic" --initial-cluster-state new --initial-cluster-token "$token" \
			--listen-metrics-urls "http://127.0.0.1:${SRV_MPORT[$server,$i]}" >"$logf" 2>&1 &
		SRV_PID[$server,$i]=$!
		if [ "$perf_ok" = 1 ]; then
			# the member is perf's child: counters and signals go to it; perf exits with it
			local wp=$! child=""
			for _ in $(seq 100); do
				child="$(pgrep -P "$wp" | head -1 || true)"
				[ -n "$child" ] && break
				sleep 0.05
			done
			[ -n "$child" ] || { log "bench: $server member $i did not start under perf"; exit 1; }
			SRV_PID[$server,$i]=$child
			pids+=("$child" "$wp")
		else
			pids+=("$!")
		fi
	done
	SRV_LEADER[$server]=0
	SRV_FOLLOWER[$server]=0
}

member_log() { # server i
	if [ "${SRV_N[$1]}" = 1 ]; then echo "$work/$1.log"; else echo "$work/$1.$2.log"; fi
}

wait_ready() { # server: every member answers a linearizable range (so a leader exists)
	local server="$1" i
	for ((i = 0; i < SRV_N[$server]; i++)); do
		local ok=0
		for _ in $(seq 120); do
			kill -0 "${SRV_PID[$server,$i]}" 2>/dev/null || {
				log "bench: $server member $i exited at start-up:"
				tail -20 "$(member_log "$server" "$i")" >&2
				exit 1
			}
			if "$B" --endpoints "127.0.0.1:${SRV_CPORT[$server,$i]}" --dial-timeout 1 --timeout 2 range bench-ready --total 1 --json >/dev/null 2>&1; then
				ok=1
				break
			fi
			sleep 0.25
		done
		if [ "$ok" = 0 ]; then
			log "bench: $server member $i not serving after 30 s"
			tail -20 "$(member_log "$server" "$i")" >&2
			exit 1
		fi
	done
}

# find_leader server: sets SRV_LEADER and SRV_FOLLOWER from Maintenance.Status (etcdctl endpoint
# status), polling until every member names the same leader.
find_leader() {
	local server="$1" eps="" i
	for ((i = 0; i < SRV_N[$server]; i++)); do eps="$eps${eps:+,}127.0.0.1:${SRV_CPORT[$server,$i]}"; done
	for _ in $(seq 60); do
		local idx
		idx="$(ETCDCTL_API=3 etcdctl --endpoints "$eps" endpoint status -w json 2>/dev/null | python3 -c '
import json, sys
try:
    st = json.load(sys.stdin)
except Exception:
    sys.exit(1)
leaders = {s["Status"]["leader"] for s in st}
ids = [s["Status"]["header"]["member_id"] for s in st]
if len(leaders) != 1 or len(st) != len(ids):
    sys.exit(1)
l = leaders.pop()
if l not in ids:
    sys.exit(1)
print(ids.index(l))')" && {
			SRV_LEADER[$server]=$idx
			SRV_FOLLOWER[$server]=$(((idx + 1) % SRV_N[$server]))
			return 0
		}
		sleep 0.5
	done
	log "bench: $server members do not agree on a leader"
	exit 1
}

# endpoints SERVER TARGET: leader | follower | all | followers
endpoints() {
	local server="$1" target="$2" i out=""
	case "$target" in
	leader) echo "127.0.0.1:${SRV_CPORT[$server,${SRV_LEADER[$server]}]}" ;;
	follower) echo "127.0.0.1:${SRV_CPORT[$server,${SRV_FOLLOWER[$server]}]}" ;;
	all | followers)
		for ((i = 0; i < SRV_N[$server]; i++)); do
			[ "$target" = followers ] && [ "$i" = "${SRV_LEADER[$server]}" ] && continue
			out="$out${out:+,}127.0.0.1:${SRV_CPORT[$server,$i]}"
		done
		echo "$out" ;;
	esac
}

# --- per-process counters --------------------------------------------------------------------
# Sectors written so far to the block device of the temp dir (/sys/class/block/DEV/stat, field
# 7): what really reaches the disk, from every member (and anything else on that disk); 0 where
# the device has no such file.
disk_sectors() {
	local st
	st="/sys/class/block/$(basename "$(df --output=source "$work" | tail -1)")/stat"
	if [ -r "$st" ]; then awk '{print $7}' "$st"; else echo 0; fi
}
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
hwm_kb() { awk '/^VmHWM:/{print $2}' "/proc/$1/status"; }
rss_kb() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }
anon_kb() { awk '/^RssAnon:/{print $2}' "/proc/$1/status"; }
reset_hwm() { echo 5 >"/proc/$1/clear_refs" 2>/dev/null || true; } # VmHWM := VmRSS now
metric() { # port name -> value (0 if absent)
	curl -s --max-time 5 "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n {v = $2} END {print (v == "" ? 0 : v)}'
}
entry_metrics() { # server -> "requests-metric commits-metric"
	if [ "$1" = keelson ]; then
		echo keelson_batch_requests_total keelson_batch_commits_total
	else
		echo etcd_server_proposals_committed_total etcd_disk_wal_fsync_duration_seconds_count
	fi
}

# syncs_between server i T0 T1 -> fdatasync+fsync+msync calls of the member in the perf intervals
# ending in (T0, T1 + 0.25] (wall-clock seconds), or null without perf.
syncs_between() {
	[ "$perf_ok" = 1 ] && [ -f "$work/perf.$1.$2" ] || { echo null; return 0; }
	awk -F, -v a="$3" -v b="$4" -v z="${SRV_T0[$1,$2]}" '
		$0 !~ /^#/ && $4 ~ /sys_enter_(fdatasync|fsync|msync)/ {
			t = z + $1
			if (t > a && t <= b + 0.25 && $2 ~ /^[0-9]+$/) s += $2
		}
		END {print s + 0}' "$work/perf.$1.$2"
}

# run_one SERVER WORKLOAD-ID TARGET ARGS... : one benchmark invocation against SERVER's TARGET
# endpoints (see endpoints; "leader" on a single member), recorded in $runs with the server's
# CPU and RSS summed over members and, per member, its role, CPU, RSS, the entries-per-commit
# metric deltas and (with perf) its sync calls.
run_one() {
	local server="$1" id="$2" target="$3"
	shift 3
	local n=${SRV_N[$server]} i eps
	eps="$(endpoints "$server" "$target")"
	local req_name com_name
	read -r req_name com_name < <(entry_metrics "$server")
	local -a c0 r0 f0
	for ((i = 0; i < n; i++)); do
		c0[i]=$(cpu_ticks "${SRV_PID[$server,$i]}")
		r0[i]=$(metric "${SRV_MPORT[$server,$i]}" $req_name)
		f0[i]=$(metric "${SRV_MPORT[$server,$i]}" $com_name)
	done
	local t_start t_end
	t_start=$(now_s)
	local limit=120 rc=0 js
	[ "$mode" = full ] && limit=$((${dur%.*} + 60))
	local rss_before=0 rss_ready=0
	if [ "$1" = watch ]; then
		# watch: the tool creates $rf once every watcher exists and waits for its removal before
		# writing; RSS is sampled in that idle window (1 s after creation) and before the run.
		local rf="$work/ready.$server.$id" bp
		rm -f "$rf"
		rss_before=$(rss_kb "${SRV_PID[$server,0]}")
		timeout "$limit" "$B" --endpoints "$eps" --label "$server/$id" --json --ready-file "$rf" "$@" \
			>"$work/bench.out" 2>"$work/bench.err" &
		bp=$!
		for _ in $(seq 2400); do
			if [ -e "$rf" ]; then
				sleep 1
				rss_ready=$(rss_kb "${SRV_PID[$server,0]}")
				rm -f "$rf"
				break
			fi
			kill -0 "$bp" 2>/dev/null || break
			sleep 0.05
		done
		wait "$bp" || rc=$?
		js="$(cat "$work/bench.out")"
	else
		js="$(timeout "$limit" "$B" --endpoints "$eps" --label "$server/$id" --json "$@" 2>"$work/bench.err")" || rc=$?
	fi
	t_end=$(now_s)
	[ "$perf_ok" = 1 ] && sleep 0.4 # let perf print the interval that holds t_end
	js="$(printf '%s\n' "$js" | grep '^{' | tail -1 || true)"
	[ -n "$js" ] || js='null'
	local alive=1 members="" cpu_sum=0 hwm_sum=0 rss_sum=0 anon_sum=0 dead="" ldr_req=0 ldr_commit=0
	for ((i = 0; i < n; i++)); do
		local pid=${SRV_PID[$server,$i]} c1 r1 f1 h r a fs role=follower
		[ "$i" = "${SRV_LEADER[$server]}" ] && role=leader
		fs=$(syncs_between "$server" "$i" "$t_start" "$t_end")
		if kill -0 "$pid" 2>/dev/null; then
			c1=$(cpu_ticks "$pid"); r1=$(metric "${SRV_MPORT[$server,$i]}" $req_name); f1=$(metric "${SRV_MPORT[$server,$i]}" $com_name)
			h=$(hwm_kb "$pid"); r=$(rss_kb "$pid"); a=$(anon_kb "$pid")
		else
			alive=0; dead="$dead $i"
			c1=${c0[i]}; r1=${r0[i]}; f1=${f0[i]}; h=0; r=0; a=0
		fi
		local cpu
		cpu=$(awk -v a="${c0[i]}" -v b="$c1" -v t="$clk_tck" 'BEGIN{printf "%.3f", (b-a)/t}')
		cpu_sum=$(awk -v s="$cpu_sum" -v c="$cpu" 'BEGIN{printf "%.3f", s+c}')
		hwm_sum=$((hwm_sum + h)); rss_sum=$((rss_sum + r)); anon_sum=$((anon_sum + a))
		local dr dc
		dr=$(awk -v a="${r0[i]}" -v b="$r1" 'BEGIN{printf "%.0f", b-a}')
		dc=$(awk -v a="${f0[i]}" -v b="$f1" 'BEGIN{printf "%.0f", b-a}')
		# the top-level d_req/d_commit are the leader's (the only member's on a single member)
		[ "$role" = leader ] && { ldr_req=$dr; ldr_commit=$dc; }
		members="$members${members:+,}$(printf '{"i":%d,"role":"%s","cpu_s":%s,"hwm_kb":%s,"rss_kb":%s,"anon_kb":%s,"d_req":%s,"d_commit":%s,"syncs":%s}' \
			"$i" "$role" "$cpu" "$h" "$r" "$a" "$dr" "$dc" "$fs")"
	done
	printf '{"server":"%s","id":"%s","target":"%s","rc":%d,"alive":%d,"cpu_s":%s,"d_req":%s,"d_commit":%s,"hwm_kb":%s,"rss_kb":%s,"anon_kb":%s,"rss_before_kb":%s,"rss_ready_kb":%s,"members":[%s],"bench":%s}\n' \
		"$server" "$id" "$target" "$rc" "$alive" "$cpu_sum" "$ldr_req" "$ldr_commit" \
		"$hwm_sum" "$rss_sum" "$anon_sum" "${rss_before:-0}" "${rss_ready:-0}" "$members" "$js" >>"$runs"
	local summary
	summary="$(printf '%s' "$js" | python3 -c 'import json,sys
try:
    j=json.load(sys.stdin); print("%.0f req/s, p99 %.2f ms, %d errors" % (j["rps"], j["lat_ms"]["p99"], j["errors"]))
except Exception: print("no report")')"
	log "  $server $id ($target): $summary (exit $rc)"
	if [ "$rc" != 0 ] && [ "$server" = keelson ]; then
		failed=1
		log "    stderr: $(tail -3 "$work/bench.err" | tr '\n' ' ')"
		log "    report: $js"
	fi
	if [ "$alive" = 0 ]; then
		failed=1
		log "  !! $server member(s)$dead died during $id; last log lines:"
		for i in $dead; do tail -20 "$(member_log "$server" "$i")" >&2; done
		return 1
	fi
}

# both WORKLOAD-ID TARGET ARGS... : the same workload against Keelson, then etcd
both() {
	run_one keelson "$@" || exit 1
	if [ "$with_etcd" = 1 ]; then run_one etcd "$@" || true; fi
}

# The report's header lines (commit, machine, load, disk, etcd version); $1 = command line.
report_header() {
	local commit dirty etcd_ver=none
	commit="$(cd "$repo" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
	dirty="$(cd "$repo" && git status --porcelain 2>/dev/null | grep -q . && echo " (working tree has uncommitted changes)" || true)"
	if [ "$with_etcd" = 1 ]; then etcd_ver="$("$etcd_bin" --version 2>/dev/null || true)"; etcd_ver="${etcd_ver%%$'\n'*}"; fi
	echo "date:     $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
	echo "commit:   $commit$dirty"
	echo "keelson:  ${KEELSON_BIN:-bazel-bin/server/keelson (built from the working tree)} (sha256 $(sha256sum "$work/keelson-bin" | cut -c1-12))${KEELSON_FLAGS:+ $KEELSON_FLAGS}${KEELSON_DESC:+; $KEELSON_DESC}"
	echo "machine:  $(nproc) CPUs ($(awk -F: '/^model name/{gsub(/^ +/,"",$2); print $2; exit}' /proc/cpuinfo)), $(awk '/^MemTotal:/{printf "%.1f GiB", $2/1048576}' /proc/meminfo) RAM, kernel $(uname -r)"
	echo "load:     1-min load average $load0 at start, $(cut -d' ' -f1 /proc/loadavg) at end (on $(nproc) CPUs shared by both servers and the load generator)"
	echo "disk:     $(df -hT "$work" | awk 'NR==2{print $1" ("$2")"}'), temp dir $work"
	echo "etcd:     $etcd_ver ($etcd_bin)"
	echo "command:  $1"
}

# The most frequent warning/error lines of each member's log.
report_logs() {
	local f
	for f in "$work"/keelson*.log "$work"/etcd*.log; do
		[ -f "$f" ] || continue
		local s n_w
		s="$(basename "$f" .log)"
		n_w=$(grep -cE '^[0-9-]+ [0-9:.]+ [WEC] \||"level":"(warn|error)"' "$f" || true)
		echo "$s log: $(wc -l <"$f") lines, $n_w warning/error lines"
		# most frequent kinds, timestamps dropped and numbers folded to N
		grep -E '^[0-9-]+ [0-9:.]+ [WEC] \||"level":"(warn|error)"' "$f" |
			sed -E 's/^[0-9-]+ [0-9:.]+ //; s/[0-9]+(\.[0-9]+)?/N/g' | sort | uniq -c | sort -rn | head -5 |
			cut -c1-220 | sed 's/^/    /' || true
	done
}

# write_report REPORT SUFFIX: prints it; in full mode also writes bench/results/<date>-<commit>SUFFIX.txt
# (or --out FILE).
write_report() {
	echo "$1"
	if [ "$mode" = full ]; then
		if [ -z "$out" ]; then
			mkdir -p "$repo/bench/results"
			local commit base n=2
			commit="$(cd "$repo" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
			base="$repo/bench/results/$(date -u +%Y-%m-%d)-$commit$2"
			out="$base.txt"
			while [ -e "$out" ]; do out="$base-$n.txt"; n=$((n + 1)); done
		fi
		echo "$1" >"$out"
		log ""
		log "bench: results written to ${out#"$repo"/}"
	fi
}
