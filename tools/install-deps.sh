#!/usr/bin/env bash
# Installs the Debian 12 packages Keelson builds and tests with. Idempotent: apt runs only
# when a package is missing, and `apt-get update` only then.
set -euo pipefail

PACKAGES=(
  bazel-bootstrap
  gcc libc6-dev
  clang libclang-rt-14-dev
  pkg-config
  libgrpc-dev
  protobuf-c-compiler libprotobuf-c-dev
  liblmdb-dev lmdb-utils
  libuv1-dev
  libssl-dev
  zlib1g-dev
  libcrypt-dev
  libyaml-dev
  etcd-client
  etcd-server
  python3 python3-etcd3 python3-grpcio
  curl procps
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's etcd-server package may start an etcd on 2379 where a service manager runs;
# Keelson's own server wants that port.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
  systemctl stop etcd || true
  systemctl disable etcd >/dev/null 2>&1 || true
fi
