#!/usr/bin/env bash
# Installs the system packages forge needs to build and test on Debian 12 (idempotent).
set -euo pipefail

packages=(
  clang libclang-dev        # bindgen for RocksDB's C API
  protobuf-compiler         # tonic/prost code generation for the client API
  libprotobuf-dev           # google/protobuf/*.proto, which etcd-client (the consensus benchmark) imports
  fuse3 libfuse3-dev        # FUSE mounts (fusermount3) and their tests
  pkg-config build-essential
  acl attr                  # getfacl and getfattr: tests compare restores with them
)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
command -v cargo-nextest >/dev/null 2>&1 || cargo install --locked cargo-nextest
