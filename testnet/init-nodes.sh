#!/usr/bin/env bash
# Creates N vaults (data directories) under a base directory for a local testnet and prints
# each node's id. Later issues add starting the daemons on loopback and in network namespaces.
#
#   testnet/init-nodes.sh 3 /tmp/forge-testnet    # -> /tmp/forge-testnet/node-{1,2,3}
set -euo pipefail
count="${1:?usage: init-nodes.sh COUNT BASE_DIR}"
base="${2:?usage: init-nodes.sh COUNT BASE_DIR}"
forge="${FORGE_BIN:-forge}"
command -v "$forge" >/dev/null 2>&1 || { echo "forge binary not found: set FORGE_BIN" >&2; exit 1; }
mkdir -p "$base"
for index in $(seq 1 "$count"); do
  dir="$base/node-$index"
  if [ -e "$dir/FORMAT" ]; then
    echo "node-$index $("$forge" --data-dir "$dir" node id) (existing)"
  else
    "$forge" --data-dir "$dir" init >/dev/null
    echo "node-$index $("$forge" --data-dir "$dir" node id)"
  fi
done
