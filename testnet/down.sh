#!/usr/bin/env bash
# Stops the daemons testnet/up.sh started in DIR, and only those: each node is asked to
# stop (`forge node stop`, which commits its mounts), and a pid from DIR/pids that is
# still a forge daemon serving that directory afterwards is killed. Data stays in DIR.
#
#   testnet/down.sh --dir /tmp/forge-testnet.Ab12Cd
set -euo pipefail

dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir="${2:?--dir needs a directory}"; shift 2 ;;
    *) echo "usage: testnet/down.sh --dir DIR" >&2; exit 2 ;;
  esac
done
[ -n "$dir" ] || { echo "usage: testnet/down.sh --dir DIR" >&2; exit 2; }
[ -f "$dir/pids" ] || { echo "no testnet in $dir (no $dir/pids)" >&2; exit 1; }

here="$(cd "$(dirname "$0")/.." && pwd)"
forge="${FORGE_BIN:-}"
if [ -z "$forge" ]; then
  if command -v forge >/dev/null 2>&1; then forge="$(command -v forge)";
  else forge="$here/target/release/forge"; fi
fi

for node_dir in "$dir"/node-*; do
  [ -d "$node_dir" ] || continue
  FORGE_DATA_DIR="$node_dir" "$forge" node stop --timeout 30 >/dev/null 2>&1 || true
done
stopped=0
while read -r pid; do
  [ -n "$pid" ] || continue
  # Only a process that is still one of ours: a forge daemon serving a node of DIR.
  if { tr '\0' '\n' < "/proc/$pid/environ"; } 2>/dev/null | grep -q "^FORGE_DATA_DIR=$dir/node-"; then
    kill "$pid" 2>/dev/null || true
  fi
  stopped=$((stopped + 1))
done < "$dir/pids"
rm -f "$dir/pids"
echo "stopped $stopped daemons of the testnet in $dir (data kept)"
