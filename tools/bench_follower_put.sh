#!/bin/bash
# Quick check of forwarded proposals: a 3-member cluster of BIN (base port BASE), 64 clients
# putting through a FOLLOWER for 8 s.  usage: tools/bench_follower_put.sh BIN BASE
BIN=$1; base=$2
IC=""
for i in 1 2 3; do IC="$IC,n$i=http://127.0.0.1:$((base+10*i+1))"; done; IC=${IC#,}
for i in 1 2 3; do c=$((base+10*i)); p=$((c+1));
  $BIN --name n$i --data-dir d$base-$i --listen-client-urls http://127.0.0.1:$c --advertise-client-urls http://127.0.0.1:$c \
   --listen-peer-urls http://127.0.0.1:$p --initial-advertise-peer-urls http://127.0.0.1:$p --initial-cluster $IC \
   --initial-cluster-token t$base --initial-cluster-state new > log$base-$i 2>&1 &
done
sleep 4
F=$(ETCDCTL_API=3 etcdctl --endpoints=127.0.0.1:$((base+10)),127.0.0.1:$((base+20)),127.0.0.1:$((base+30)) endpoint status -w json | python3 -c 'import json,sys; d=json.load(sys.stdin); print([x["Endpoint"] for x in d if x["Status"]["leader"]!=x["Status"]["header"]["member_id"]][0])')
echo "follower $F"
/work/main/bazel-bin/tools/benchmark put --endpoints=$F --conns=3 --clients=64 --duration=8 --key-space-size=10000 --val-size=256 --label=$(basename $BIN) 2>&1 | grep -E "Throughput|Latency"
pkill -f "initial-cluster-token t$base"; sleep 1; rm -rf d$base-* log$base-*
