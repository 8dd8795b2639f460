#!/bin/bash
# Builds the raft fuzz targets with clang/libFuzzer (outside Bazel) and runs
# each for SECONDS (default 30).
#   tests/fuzz/run_raft_fuzz.sh [SECONDS]
set -euo pipefail
secs="${1:-30}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${FUZZ_OUT:-/tmp/keelson-raft-fuzz}"
cc="${CC_FUZZ:-clang-14}"
command -v "$cc" >/dev/null || cc=clang
mkdir -p "$out/corpus_decode" "$out/corpus_step"
flags=(-std=gnu11 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -I"$root")
raft_srcs=("$root"/raft/{election,log,membership,progress,raft,readindex,replication,codec}.c "$root/crc32c/crc32c.c")
"$cc" "${flags[@]}" "${raft_srcs[@]}" "$root/tests/fuzz/raft_decode_fuzz.c" -o "$out/raft_decode_fuzz"
"$cc" "${flags[@]}" "${raft_srcs[@]}" "$root/raft/test/cluster.c" "$root/tests/fuzz/raft_step_fuzz.c" -o "$out/raft_step_fuzz"
cp -n "$root"/tests/fuzz/corpus/raft_decode/* "$out/corpus_decode/" 2>/dev/null || true
cp -n "$root"/tests/fuzz/corpus/raft_step/* "$out/corpus_step/" 2>/dev/null || true
echo "== raft_decode_fuzz for ${secs}s"
"$out/raft_decode_fuzz" -max_total_time="$secs" -max_len=4096 -print_final_stats=1 "$out/corpus_decode" 2>&1 | grep -E "^#|stat::|ERROR|SUMMARY|Done" | tail -8
echo "== raft_step_fuzz for ${secs}s"
"$out/raft_step_fuzz" -max_total_time="$secs" -max_len=2048 -print_final_stats=1 "$out/corpus_step" 2>&1 | grep -E "^#|stat::|ERROR|SUMMARY|Done" | tail -8
echo "fuzz: ok (artifacts, if any, in $out)"
