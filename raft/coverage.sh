#!/bin/bash
# Line coverage of raft/ (library sources only) from the unit tests, the
# codec tests, the scenario scripts and a sample of simulator seeds.
# Builds with gcc --coverage outside Bazel.   raft/coverage.sh [SIM_SEEDS]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
seeds="${1:-300}"
out="${COV_OUT:-/tmp/keelson-raft-cov}"
rm -rf "$out" && mkdir -p "$out" && cd "$out"
lib=(election log membership progress raft readindex replication codec)
cflags=(-std=gnu11 -O0 -g --coverage -I"$root")
objs=()
for f in "${lib[@]}"; do
    gcc "${cflags[@]}" -c "$root/raft/$f.c" -o "$f.o"
    objs+=("$f.o")
done
gcc -std=gnu11 -O0 -g -I"$root" -c "$root/raft/test/cluster.c" -o cluster.o
for t in raft_test codec_test scenario; do
    gcc -std=gnu11 -O0 -g -I"$root" "$root/raft/test/$t.c" cluster.o "${objs[@]}" --coverage -o "$t"
done
gcc -std=gnu11 -O0 -g -I"$root" "$root/tests/sim/raft_sim.c" "${objs[@]}" --coverage -o raft_sim
./raft_test >/dev/null
./codec_test >/dev/null
./scenario "$root"/raft/testdata/*.txt >/dev/null
./raft_sim --seeds "$seeds" --start 1 >/dev/null
./raft_sim --seeds 50 --start 5000 --nodes 1 >/dev/null
total=0
hit=0
for f in "${lib[@]}"; do
    line=$(gcov -n "$f.o" 2>/dev/null | grep -A1 "File '.*raft/$f.c'" | tail -1)
    pct=$(echo "$line" | sed -E 's/Lines executed:([0-9.]+)% of ([0-9]+)/\1/')
    n=$(echo "$line" | sed -E 's/Lines executed:([0-9.]+)% of ([0-9]+)/\2/')
    printf '%-14s %6s%% of %4s lines\n' "$f.c" "$pct" "$n"
    total=$((total + n))
    hit=$(awk -v h="$hit" -v p="$pct" -v n="$n" 'BEGIN { printf "%d", h + p * n / 100 + 0.5 }')
done
awk -v h="$hit" -v t="$total" 'BEGIN { printf "TOTAL raft/: %.1f%% of %d lines\n", 100 * h / t, t }'
