#!/bin/bash
# Runs raft_sim once per group of arguments; groups are separated by "+".
#   run_sim.sh --seeds 10 --start 1 + --seeds 10 --start 100 --nodes 5
set -u
sim="${TEST_SRCDIR:-.}/${TEST_WORKSPACE:-keelson}/tests/sim/raft_sim"
[ -x "$sim" ] || sim="$(dirname "$0")/raft_sim"
rc=0
run() {
    local start
    start=$(date +%s)
    "$sim" "$@" || rc=1
    echo "  ($(($(date +%s) - start))s for: raft_sim $*)"
}
group=()
for a in "$@"; do
    if [ "$a" = "+" ]; then
        run "${group[@]}"
        group=()
    else
        group+=("$a")
    fi
done
[ ${#group[@]} -gt 0 ] && run "${group[@]}"
exit $rc
