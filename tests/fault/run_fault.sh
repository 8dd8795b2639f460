#!/usr/bin/env bash
# A fault-injection campaign against a Keelson cluster:
#   tests/fault/run_fault.sh [--duration SECONDS] [--members 3|5] [--seed N] [--runs N] [campaign.py options]
#   tests/fault/run_fault.sh --short      # the CI smoke (tests/run_all.sh): well under 2 minutes
# Builds //server:keelson and the slow-disk shim //tests/fault:libslowdisk.so, copies both
# (others may rebuild meanwhile), runs tests/fault/campaign.py --runs times (new seed each
# time unless --seed), and exits non-zero if any run fails a check. The checkers' unit tests
# run first.
# --short: 3 members, 30 s, seed 1, the mixed workload (KV and Kubernetes clients), and a
# fixed first schedule that covers a leader isolation, NOSPACE (quota 16 MiB), a one-way
# drop, a failing disk, a full disk, a 1|2 split, a slow disk and a leader kill, after a
# member replacement (at the same peer URL or a new one: --replace-urls both).
# Environment: KEELSON_BIN to test a given binary instead of building.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
runs=1
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="$2"; shift 2;;
    --short) sched=replace,isolate-leader,nospace,one-way-leader,fail-disk,disk-full,split,slow-disk,kill-leader
             args+=(--duration 30 --members 3 --seed 1 --clients 4 --keys 3 --workload mixed
                    --quota-mib 16 --fault-interval 0.5,1.5 --check-budget 30
                    --schedule "$sched")
             shift;;
    *) args+=("$1"); shift;;
  esac
done
for t in linearizability watchcheck; do
  /usr/bin/python3 "tests/fault/$t.py" --self-test >/dev/null 2>&1 || {
    echo "$t self-test failed"; /usr/bin/python3 "tests/fault/$t.py" --self-test; exit 2; }
done
dir="$(mktemp -d /tmp/keelson-fault-bin.XXXXXX)"
trap 'rm -rf "$dir"' EXIT
bin="${KEELSON_BIN:-}"
if [ -z "$bin" ]; then
  bazel build //server:keelson >/dev/null 2>&1 || { echo "bazel build failed"; exit 2; }
  bin="$dir/keelson"
  cp bazel-bin/server/keelson "$bin"
fi
shim=()
if bazel build //tests/fault:libslowdisk.so >/dev/null 2>&1; then
  cp bazel-bin/tests/fault/libslowdisk.so "$dir/libslowdisk.so"
  shim=(--slowdisk "$dir/libslowdisk.so")
else
  echo "//tests/fault:libslowdisk.so does not build: no disk faults"
fi
rc=0
for i in $(seq 1 "$runs"); do
  echo "=== run $i/$runs"
  /usr/bin/python3 tests/fault/campaign.py --binary "$bin" "${shim[@]}" "${args[@]+"${args[@]}"}" || rc=1
done
exit $rc
