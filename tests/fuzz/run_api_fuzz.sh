#!/usr/bin/env bash
# run_api_fuzz.sh [seconds]     - builds the API decode, storage apply, etcd WAL, Keelson WAL and etcd import fuzzers (libFuzzer,
# clang with ASan + UBSan) in a temp dir and runs each for the given seconds (default 30) on
# a copy of its committed seed corpus. Exits non-zero if a build fails or a fuzzer finds a
# crash, a sanitizer report, a leak or a timeout; the reproducer is copied to
# $FUZZ_OUT (default: tests/fuzz/crashes/) and the fuzzer's log is printed.
#
# run_api_fuzz.sh --gen-corpus  - rewrites the seed corpora from api_corpus_gen.c.
#
# Environment:
#   CC             clang to use (default: clang-14 if present, else clang)
#   FUZZ_TARGETS   which targets to run (default: "api_decode storage_apply etcd_wal keelson_wal etcd_import peer_rpc")
#   FUZZ_JOBS      run the targets in parallel (1) or one after the other (0, default)
#   FUZZ_KEEP      keep the temp dir (builds, corpora, logs) and print its path
#   FUZZ_OUT       where reproducers go (default: tests/fuzz/crashes)
#   FUZZ_MERGE     1: merge what the run found back into the committed corpora (minimised)
#
# Reproduce a finding: build with FUZZ_KEEP=1 and run the binary on the file, e.g.
#   $TMP/storage_apply_fuzz tests/fuzz/crashes/storage_apply-crash-...   (storage inputs
#   replay from a fresh store with STORAGE_FUZZ_FRESH=1; see storage_apply_fuzz.c).
set -u -o pipefail

secs=${1:-30}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root" || exit 2
CC=${CC:-$(command -v clang-14 || command -v clang)}
targets=${FUZZ_TARGETS:-"api_decode storage_apply etcd_wal keelson_wal etcd_import peer_rpc"}
out=${FUZZ_OUT:-$root/tests/fuzz/crashes}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/keelson-fuzz.XXXXXX") || exit 2
# The storage fuzzer's LMDB store: on tmpfs if there is one, since every input commits
# (fsync) several times; removed at exit even when a fuzzer crashed and left it behind.
if [ -w /dev/shm ]; then
	store=$(mktemp -d /dev/shm/keelson-fuzz-store.XXXXXX) || exit 2
else
	store=$tmp/store
	mkdir -p "$store"
fi
cleanup() {
	rm -rf "$store"
	if [ -n "${FUZZ_KEEP:-}" ]; then
		echo "run_api_fuzz: kept $tmp"
	else
		rm -rf "$tmp"
	fi
}
trap cleanup EXIT

# The generated protobuf-c sources come from the Bazel build (a clean clone has none).
if ! bazel build //api:etcd_proto >"$tmp/bazel.log" 2>&1; then
	cat "$tmp/bazel.log"
	echo "run_api_fuzz: bazel build //api:etcd_proto failed" >&2
	exit 2
fi
gen=$(bazel info bazel-bin 2>/dev/null)/api/proto
for f in rpc kv auth; do
	[ -f "$gen/$f.pb-c.c" ] || { echo "run_api_fuzz: missing $gen/$f.pb-c.c" >&2; exit 2; }
done

CFLAGS=(-g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined
	-fno-sanitize-recover=undefined -I"$root" -I"$(dirname "$(dirname "$gen")")")
LIBS=(-lprotobuf-c -llmdb -lgrpc -lgpr -lpthread -lcrypto -lssl -luv)

# Compiles each source to an object (fuzzer-instrumented), or fails loudly.
compile() {
	local dir=$1
	shift
	mkdir -p "$dir"
	local objs=()
	for src in "$@"; do
		local o="$dir/$(echo "$src" | tr '/' '_').o"
		if ! "$CC" "${CFLAGS[@]}" -w -c "$src" -o "$o" 2>"$o.log"; then
			cat "$o.log" >&2
			echo "run_api_fuzz: cannot compile $src" >&2
			return 1
		fi
		objs+=("$o")
	done
	printf '%s\n' "${objs[@]}"
}

# Links; symbols that only the linked server/ code needs (never called by the fuzzer) get
# an aborting stub, so that the server may grow without breaking the fuzz build.
link_with_stubs() {
	local bin=$1
	shift
	if "$CC" "${CFLAGS[@]}" "$@" "${LIBS[@]}" -o "$bin" 2>"$bin.link.log"; then
		return 0
	fi
	local syms
	syms=$(sed -n "s/.*undefined reference to \`\([A-Za-z_][A-Za-z0-9_]*\)'.*/\1/p" "$bin.link.log" | sort -u)
	if [ -z "$syms" ]; then
		cat "$bin.link.log" >&2
		return 1
	fi
	{
		echo '#include <stdio.h>'
		echo '#include <stdlib.h>'
		for s in $syms; do
			echo "void $s(void) { fprintf(stderr, \"fuzz stub $s called\\n\"); abort(); }"
		done
	} >"$bin.stubs.c"
	echo "run_api_fuzz: $(basename "$bin"): stubbed $(echo $syms)"
	if ! "$CC" "${CFLAGS[@]}" "$@" "$bin.stubs.c" "${LIBS[@]}" -o "$bin" 2>"$bin.link.log"; then
		cat "$bin.link.log" >&2
		return 1
	fi
}

build() {
	local t=$1 srcs objs
	case $t in
	api_decode)
		srcs=(tests/fuzz/api_decode_fuzz.c "$gen"/rpc.pb-c.c "$gen"/kv.pb-c.c "$gen"/auth.pb-c.c)
		;;
	storage_apply)
		# every source of //storage:storage (not its tests or tools), so a new file is
		# fuzzed rather than stubbed
		mapfile -t storage_srcs < <(ls storage/*.c | grep -v -e '_test\.c$' -e '_tool\.c$' \
			-e '_bench\.c$' -e '/etcdfmt\.c$' -e '/etcdwal\.c$')
		srcs=(tests/fuzz/storage_apply_fuzz.c server/kv.c crashpoint/crashpoint.c crc32c/crc32c.c "${storage_srcs[@]}"
			"$gen"/rpc.pb-c.c "$gen"/kv.pb-c.c "$gen"/auth.pb-c.c)
		;;
	etcd_wal)
		# the WAL decoder and the varint/CRC-32C helpers it shares with storage
		srcs=(tests/fuzz/etcd_wal_fuzz.c storage/etcdwal.c storage/kvcodec.c crc32c/crc32c.c)
		;;
	keelson_wal)
		# Keelson's own WAL decoder (storage/wal.c) with what it uses of storage
		srcs=(tests/fuzz/keelson_wal_fuzz.c storage/wal.c storage/kvcodec.c storage/arena.c
			crashpoint/crashpoint.c crc32c/crc32c.c)
		;;
	etcd_import)
		# server/etcdimport.c's parsers (the file is included by the target) and the entry
		# encoder of server/apply.c; the rest of the server is stubbed
		srcs=(tests/fuzz/etcd_import_fuzz.c server/apply.c crc32c/crc32c.c
			"$gen"/rpc.pb-c.c "$gen"/kv.pb-c.c "$gen"/auth.pb-c.c)
		;;
	peer_rpc)
		# the peer request channel on a real transport, and the node's answer decoders
		# (server/node_ask.c; the rest of the node is stubbed)
		srcs=(tests/fuzz/peer_rpc_fuzz.c server/peer_rpc.c server/peer.c server/peer_tls.c
			server/node_ask.c "$gen"/rpc.pb-c.c "$gen"/kv.pb-c.c "$gen"/auth.pb-c.c)
		;;
	*)
		echo "run_api_fuzz: unknown target $t" >&2
		return 1
		;;
	esac
	objs=$(compile "$tmp/obj_$t" "${srcs[@]}") || return 1
	# shellcheck disable=SC2086
	link_with_stubs "$tmp/${t}_fuzz" $objs
}

run() {
	local t=$1
	local corpus="$tmp/corpus_$t" log="$tmp/$t.log" art="$tmp/artifacts_$t/"
	mkdir -p "$corpus" "$art"
	if [ -d "tests/fuzz/corpus/$t" ]; then
		cp -r "tests/fuzz/corpus/$t/." "$corpus/"
	fi
	local opts=(-max_total_time="$secs" -timeout=25 -rss_limit_mb=4096 -max_len=8192
		-print_final_stats=1 -artifact_prefix="$art")
	[ -f "tests/fuzz/$t.dict" ] && opts+=(-dict="tests/fuzz/$t.dict")
	STORAGE_FUZZ_DIR="$store" "$tmp/${t}_fuzz" "${opts[@]}" "$corpus" >"$log" 2>&1
	local rc=$?
	local cov execs
	cov=$(grep -Eo 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1)
	execs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$')
	echo "run_api_fuzz: $t: exit $rc, ${execs:-?} runs (limit ${secs}s, ${cov:-no coverage line}), corpus $(ls "$corpus" | wc -l) files"
	if [ "$rc" -ne 0 ] || [ -n "$(ls -A "$art")" ]; then
		mkdir -p "$out"
		for f in "$art"*; do
			[ -e "$f" ] || continue
			cp "$f" "$out/$t-$(basename "$f")"
			echo "run_api_fuzz: $t: reproducer saved as $out/$t-$(basename "$f")"
		done
		tail -n 80 "$log"
		return 1
	fi
	if [ "${FUZZ_MERGE:-0}" = 1 ]; then
		mkdir -p "tests/fuzz/corpus/$t"
		STORAGE_FUZZ_DIR="$store" "$tmp/${t}_fuzz" -merge=1 -max_len=8192 \
			"tests/fuzz/corpus/$t" "$corpus" >"$log.merge" 2>&1 ||
			echo "run_api_fuzz: $t: merge failed (see $log.merge)"
	fi
	return 0
}

if [ "$secs" = --gen-corpus ]; then
	"$CC" -g -fsanitize=address,undefined -I"$root" -I"$(dirname "$(dirname "$gen")")" \
		tests/fuzz/api_corpus_gen.c "$gen"/rpc.pb-c.c "$gen"/kv.pb-c.c "$gen"/auth.pb-c.c \
		-lprotobuf-c -o "$tmp/api_corpus_gen" || exit 2
	rm -rf tests/fuzz/corpus/api_decode tests/fuzz/corpus/storage_apply
	mkdir -p tests/fuzz/corpus/api_decode tests/fuzz/corpus/storage_apply
	"$tmp/api_corpus_gen" tests/fuzz/corpus/api_decode tests/fuzz/corpus/storage_apply || exit 2
	echo "run_api_fuzz: $(ls tests/fuzz/corpus/api_decode | wc -l) api_decode and" \
		"$(ls tests/fuzz/corpus/storage_apply | wc -l) storage_apply seeds written"
	exit 0
fi
case $secs in
'' | *[!0-9]*) echo "usage: $0 [seconds] | --gen-corpus" >&2; exit 2 ;;
esac

status=0
for t in $targets; do
	build "$t" || { echo "run_api_fuzz: build of $t failed" >&2; exit 2; }
done
if [ "${FUZZ_JOBS:-0}" = 1 ]; then
	pids=()
	for t in $targets; do
		run "$t" &
		pids+=($!)
	done
	for p in "${pids[@]}"; do
		wait "$p" || status=1
	done
else
	for t in $targets; do
		run "$t" || status=1
	done
fi
exit $status
