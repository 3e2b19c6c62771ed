#!/usr/bin/env bash
# Starts a local testnet: N forge daemons on loopback (each its own QUIC and metrics port,
# data directory DIR/node-i, log beside it in DIR/node-i/logs/daemon.log), forms a cluster
# of them and a volume group named `testnet` with the given layout, and prints how to use
# it. testnet/down.sh stops exactly the daemons this started (their pids are in DIR/pids).
#
#   testnet/up.sh 3                      # 3 nodes, group layout 2+1, in a new temp dir
#   testnet/up.sh 6 --ec 4+2 --dir /tmp/tn
#
# FORGE_BIN names the forge binary (default: forge on PATH, else target/release/forge).
set -euo pipefail

usage() { echo "usage: testnet/up.sh N [--ec K+M] [--dir DIR]" >&2; exit 2; }
count="${1:-}"
[[ "$count" =~ ^[0-9]+$ ]] && [ "$count" -ge 1 ] || usage
shift
layout=""
dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --ec) layout="${2:?--ec needs K+M}"; shift 2 ;;
    --dir) dir="${2:?--dir needs a directory}"; shift 2 ;;
    *) usage ;;
  esac
done
if [ -z "$layout" ]; then
  # The widest layout with one parity shard that fits (a single node: 1+0).
  if [ "$count" -ge 2 ]; then layout="$((count - 1))+1"; else layout="1+0"; fi
fi
width=$(( ${layout%+*} + ${layout#*+} ))
if [ "$width" -gt "$count" ]; then
  echo "a $layout layout puts each chunk's $width shards on $width different nodes: start at least $width" >&2
  exit 2
fi

here="$(cd "$(dirname "$0")/.." && pwd)"
forge="${FORGE_BIN:-}"
if [ -z "$forge" ]; then
  if command -v forge >/dev/null 2>&1; then forge="$(command -v forge)";
  elif [ -x "$here/target/release/forge" ]; then forge="$here/target/release/forge";
  else echo "no forge binary: set FORGE_BIN, or cargo build --release" >&2; exit 1; fi
fi
if [ -z "$dir" ]; then dir="$(mktemp -d -t forge-testnet.XXXXXX)"; fi
mkdir -p "$dir"
if [ -s "$dir/pids" ]; then
  echo "$dir already has a running testnet (testnet/down.sh --dir $dir first)" >&2
  exit 1
fi

on() { local node="$1"; shift; FORGE_DATA_DIR="$dir/node-$node" "$forge" "$@"; }
json_field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

ids=()
for node in $(seq 1 "$count"); do
  [ -e "$dir/node-$node/FORMAT" ] || on "$node" init >/dev/null
  line="$(on "$node" node start --listen /ip4/127.0.0.1/udp/0/quic-v1 --metrics-listen 127.0.0.1:0)"
  pid="$(echo "$line" | grep -oE 'pid [0-9]+' | grep -oE '[0-9]+' | head -1)"
  echo "$pid" >> "$dir/pids"
  ids+=("$(on "$node" node id --json | json_field '["node_id"]')")
done
address() { on "$1" node addr --json | json_field '["addresses"][0]'; }

on 1 cluster init >/dev/null
first="$(address 1)"
for node in $(seq 2 "$count"); do
  on "$node" peer add "$first" --name node-1 >/dev/null
  on 1 peer add "$(address "$node")" --name "node-$node" >/dev/null
  on 1 peer trust "node-$node" --cluster >/dev/null
  on "$node" cluster join node-1 >/dev/null
done
members="$(IFS=,; echo "${ids[*]}")"
on 1 group create testnet --nodes "$members" --ec "$layout" >/dev/null
# Ready once the group has a leader as its members see it.
for _ in $(seq 1 150); do
  leader="$(on "$count" cluster status --json | python3 -c '
import json, sys
groups = [g for g in json.load(sys.stdin)["groups"] if g["name"] == "testnet"]
print(groups[0].get("leader") or "" if groups else "")')"
  [ -n "$leader" ] && break
  sleep 0.2
done
[ -n "$leader" ] || { echo "group testnet has no leader after 30 s: see $dir/node-*/logs/daemon.log" >&2; exit 1; }

cat <<EOF
testnet of $count nodes in $dir (group testnet, layout $layout)
  node-1 .. node-$count: data in $dir/node-i, logs in $dir/node-i/logs/daemon.log
  FORGE_DATA_DIR=$dir/node-1 $forge cluster status
  FORGE_DATA_DIR=$dir/node-2 $forge cluster status --json
  FORGE_DATA_DIR=$dir/node-1 $forge volume create data --group testnet
  FORGE_DATA_DIR=$dir/node-1 $forge volume import data /some/dir
  FORGE_DATA_DIR=$dir/node-$count $forge volume export data /tmp/out
  testnet/down.sh --dir $dir
EOF
