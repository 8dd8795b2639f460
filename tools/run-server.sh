#!/usr/bin/env bash
# Builds Keelson and starts a single member with etcd's defaults: clients on
# 127.0.0.1:2379, data in ./default.etcd (relative to where you run this).
# Extra arguments are passed on as etcd flags, e.g. --name, --data-dir.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
"$repo/tools/install-deps.sh"
(cd "$repo" && bazel build //server:keelson)
exec "$repo/bazel-bin/server/keelson" "$@"
