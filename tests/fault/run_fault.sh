#!/usr/bin/env bash
# A fault-injection campaign against a Keelson cluster (not in CI):
#   tests/fault/run_fault.sh [--duration SECONDS] [--members 3|5] [--seed N] [--runs N] [campaign.py options]
# Builds //server:keelson, copies the binary (others may rebuild meanwhile), runs
# tests/fault/campaign.py --runs times (new seed each time unless --seed), and exits non-zero
# if any run fails a check. The checker's unit tests run first.
# Environment: KEELSON_BIN to test a given binary instead of building.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
runs=1
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="$2"; shift 2;;
    *) args+=("$1"); shift;;
  esac
done
/usr/bin/python3 tests/fault/linearizability.py --self-test >/dev/null 2>&1 || {
  echo "linearizability checker self-test failed"; /usr/bin/python3 tests/fault/linearizability.py --self-test; exit 2; }
bin="${KEELSON_BIN:-}"
if [ -z "$bin" ]; then
  bazel build //server:keelson >/dev/null 2>&1 || { echo "bazel build failed"; exit 2; }
  bin="$(mktemp -d /tmp/keelson-fault-bin.XXXXXX)/keelson"
  cp bazel-bin/server/keelson "$bin"
fi
rc=0
for i in $(seq 1 "$runs"); do
  echo "=== run $i/$runs"
  /usr/bin/python3 tests/fault/campaign.py --binary "$bin" "${args[@]+"${args[@]}"}" || rc=1
done
exit $rc
