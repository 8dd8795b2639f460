#!/usr/bin/env bash
# Runs every test of Keelson and closes with one line: `N passed, N failed`.
#
#   bash tests/run_all.sh
#
# 1. installs what the build and the tests need (Debian 12, only what is missing),
# 2. `bazel test //...`: every C unit test target,
# 3. builds //server:keelson and runs the Python integration tests against it
#    (tests/integration: etcdctl, differential against a real etcd 3.4, bad input),
# 4. builds //server:keelson with ASan/UBSan and runs the bad-input and differential
#    tests against that build as well,
# 5. short smoke runs of the fuzzers, of the fault campaign and of the benchmark against etcd.
# Exit status is non-zero if anything failed.
#
# Environment:
#   KEELSON_BIN=/path   test this server binary instead of building //server:keelson
#                       (KEELSON_BIN=/usr/bin/etcd checks the suite itself against etcd)
#   KEELSON_SKIP_ASAN=1 skip step 4
#   KEELSON_SKIP_BAZEL_TEST=1 skip step 2
#   KEELSON_PY_TIMEOUT  seconds allowed for each Python run (default 900)
#   KEELSON_SKIP_SMOKE=1 skip the fuzz and benchmark smoke runs

set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
export DEBIAN_FRONTEND=noninteractive
PY=/usr/bin/python3
PY_TIMEOUT="${KEELSON_PY_TIMEOUT:-900}"
WORK="$(mktemp -d /tmp/keelson-run-all.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

PASSED=0
FAILED=0
declare -a FAILED_WHAT=()

note() { printf '\n=== %s ===\n' "$*"; }
fail_item() { FAILED=$((FAILED + 1)); FAILED_WHAT+=("$1"); }

# ---------------------------------------------------------------------------------------
note "dependencies"
# The same installer the README's run command uses: only what is missing, apt update once.
bash "$ROOT/tools/install-deps.sh" </dev/null || echo "installing dependencies failed"

BAZEL=(bazel)
BAZEL_FLAGS=(--curses=no --color=no)

# ---------------------------------------------------------------------------------------
if [ "${KEELSON_SKIP_BAZEL_TEST:-0}" != 1 ]; then
    note "bazel test //..."
    LOG="$WORK/bazel-test.log"
    t0=$SECONDS
    "${BAZEL[@]}" test "${BAZEL_FLAGS[@]}" --keep_going //... </dev/null 2>&1 | tee "$LOG"
    rc=${PIPESTATUS[0]}
    # Bazel's summary: one line per test target, e.g.
    #   //tests:smoke                    (cached) PASSED in 0.1s
    #   //storage:mvcc_test              FAILED in 2.0s / TIMEOUT / NO STATUS / FAILED TO BUILD
    sed 's/\x1b\[[0-9;]*m//g' "$LOG" |
        grep -E '^//[^ ]+ +(\(cached\) +)?(PASSED|FLAKY|FAILED|TIMEOUT|NO STATUS|INCOMPLETE|SKIPPED|REMOTE FAILURE|FAILED TO BUILD)' \
        > "$WORK/bazel-summary.txt" || true
    bp=$(grep -cE ' (PASSED|FLAKY)( |$)' "$WORK/bazel-summary.txt")
    bf=$(grep -vcE ' (PASSED|FLAKY|SKIPPED)( |$)' "$WORK/bazel-summary.txt")
    PASSED=$((PASSED + bp))
    FAILED=$((FAILED + bf))
    while read -r line; do
        FAILED_WHAT+=("bazel: $line")
    done < <(grep -vE ' (PASSED|FLAKY|SKIPPED)( |$)' "$WORK/bazel-summary.txt")
    # exit 0 ok, 3 some tests failed, 4 no test targets; anything else (1 build failure,
    # 2 bad command line, 36/37 crashes) with nothing counted as failed is a failure too
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 3 ] && [ "$rc" -ne 4 ] && [ "$bf" -eq 0 ]; then
        fail_item "bazel test //... exited $rc"
    fi
    echo "bazel test: $bp passed, $bf failed (exit $rc, $((SECONDS - t0))s)"
fi

# ---------------------------------------------------------------------------------------
run_python() {   # $1 label, $2 server binary, then extra run.py arguments / env already set
    local label="$1" bin="$2"
    shift 2
    local summary="$WORK/py-$label.json"
    rm -f "$summary"
    KEELSON_BIN="$bin" timeout -k 30 "$PY_TIMEOUT" "$PY" tests/integration/run.py \
        --summary "$summary" "$@" </dev/null
    local rc=$?
    if [ -s "$summary" ]; then
        local p f
        read -r p f < <("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["passed"], d["failed"])' "$summary")
        PASSED=$((PASSED + p))
        FAILED=$((FAILED + f))
        while read -r t; do
            [ -n "$t" ] && FAILED_WHAT+=("$label: $t")
        done < <("$PY" -c 'import json,sys; print("\n".join(json.load(open(sys.argv[1]))["failed_tests"]))' "$summary")
        if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
            fail_item "$label: run.py exited $rc"
        fi
    else
        fail_item "$label: python test run did not finish (exit $rc)"
    fi
}

if [ -n "${KEELSON_BIN:-}" ]; then
    SERVER="$KEELSON_BIN"
    note "server under test: $SERVER (from KEELSON_BIN, not built)"
else
    note "bazel build //server:keelson"
    if "${BAZEL[@]}" build "${BAZEL_FLAGS[@]}" //server:keelson </dev/null; then
        SERVER="$ROOT/bazel-bin/server/keelson"
    else
        echo "//server:keelson does not build: the integration tests will fail"
        SERVER="$ROOT/bazel-bin/server/keelson.did-not-build"   # never a stale binary
    fi
fi
# The tools the integration tests drive beside the server.
"${BAZEL[@]}" build "${BAZEL_FLAGS[@]}" //storage:etcdfmt_tool </dev/null ||
    echo "//storage:etcdfmt_tool does not build: the snapshot format tests will fail"
"${BAZEL[@]}" build "${BAZEL_FLAGS[@]}" //tests/tools:kv_corrupt </dev/null ||
    echo "//tests/tools:kv_corrupt does not build: the corruption check tests will fail"
"${BAZEL[@]}" build "${BAZEL_FLAGS[@]}" //tests/fault:libpowerloss.so </dev/null ||
    echo "//tests/fault:libpowerloss.so does not build: the power-loss tests will fail"

note "integration tests (tests/integration) against $SERVER"
t0=$SECONDS
run_python main "$SERVER"
echo "integration tests took $((SECONDS - t0))s"

# ---------------------------------------------------------------------------------------
if [ "${KEELSON_SKIP_ASAN:-0}" != 1 ]; then
    if [ -n "${KEELSON_BIN:-}" ]; then
        ASAN_SERVER="$KEELSON_BIN"
        note "sanitizer pass against $ASAN_SERVER (KEELSON_BIN set: not an ASan build)"
    else
        note "bazel build --config=asan //server:keelson"
        # its own output directory, so that the normal build above is not invalidated
        ASAN_FLAGS=(--config=asan --platform_suffix=asan --strip=never)
        if "${BAZEL[@]}" build "${BAZEL_FLAGS[@]}" "${ASAN_FLAGS[@]}" //server:keelson </dev/null; then
            ASAN_SERVER="$("${BAZEL[@]}" info "${ASAN_FLAGS[@]}" bazel-bin 2>/dev/null)/server/keelson"
        else
            echo "//server:keelson does not build with ASan: the sanitizer pass will fail"
            ASAN_SERVER="$ROOT/bazel-bin/server/keelson.asan-did-not-build"
        fi
    fi
    note "bad-input and differential tests against the ASan/UBSan build"
    t0=$SECONDS
    KEELSON_SANITIZER_CHECK=1 \
    ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:halt_on_error=1}" \
    UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}" \
        run_python asan "$ASAN_SERVER" test_bad_input test_differential
    echo "sanitizer pass took $((SECONDS - t0))s"
fi

# ---------------------------------------------------------------------------------------
# Short smoke runs of the long campaigns: fuzzing (libFuzzer) and the benchmark against etcd.
smoke() {
    local what="$1"; shift
    note "$what"
    t0=$SECONDS
    if "$@" </dev/null; then
        PASSED=$((PASSED + 1))
        echo "$what: ok ($((SECONDS - t0))s)"
    else
        fail_item "$what"
        echo "$what: FAILED ($((SECONDS - t0))s)"
    fi
}
if [ "${KEELSON_SKIP_SMOKE:-0}" != 1 ]; then
    smoke "fuzz smoke: api, storage, etcd WAL, Keelson WAL and import decoders" bash "$ROOT/tests/fuzz/run_api_fuzz.sh" 15
    smoke "fuzz smoke: raft decoder and step" bash "$ROOT/tests/fuzz/run_raft_fuzz.sh" 15
    # a 30 s campaign (fixed seed, KV and Kubernetes clients): kills, pauses, partitions,
    # one-way drops, slow, failing and full disks, NOSPACE; linearizability, watch, list and
    # HashKV checks (tests/fault/README.md)
    smoke "fault campaign smoke" bash "$ROOT/tests/fault/run_fault.sh" --short
    smoke "benchmark smoke: keelson and etcd" bash "$ROOT/tools/bench.sh" --smoke
    smoke "watch saturation smoke: keelson and etcd" env BENCH_NO_BUILD=1 bash "$ROOT/tools/bench_watch.sh" --smoke
fi

# ---------------------------------------------------------------------------------------
note "summary"
if ((${#FAILED_WHAT[@]})); then
    echo "failed:"
    printf '  %s\n' "${FAILED_WHAT[@]}"
fi
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
