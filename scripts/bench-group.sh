#!/usr/bin/env bash
# Volume-group import benchmark: the same tree imported into a single-node vault (4+2, all
# six shards local) and into a volume of a 6-node 4+2 testnet on loopback (each chunk's six
# shards on six daemons, durable there before the branch moves through Raft), in the same
# run; then exported on another member of the testnet (gathering four shards per chunk)
# and checked byte for byte. Prints wall time, MB/s and the group/single ratio.
#
#   ./scripts/bench-group.sh [DATA_DIR]   # default: about 200 MB of /usr/lib and /usr/share
#
# The peer is forge itself on one node: the question is what spreading over a group costs.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/forge-target}"
cargo build --release --locked --bin forge >/dev/null
forge="$CARGO_TARGET_DIR/release/forge"
export FORGE_BIN="$forge"

work="$(mktemp -d /var/tmp/forge-bench-group.XXXXXX)"
cleanup() {
  [ -d "$work/net" ] && testnet/down.sh --dir "$work/net" >/dev/null 2>&1 || true
  [ -d "$work/single" ] && FORGE_DATA_DIR="$work/single" "$forge" node stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

data="${1:-}"
if [ -z "$data" ]; then
  # About 200 MB of real files: Python's library, documentation, locale data.
  data="$work/data"
  mkdir -p "$data"
  for source in /usr/lib/python3* /usr/share/doc /usr/share/locale /usr/share/i18n /usr/lib/x86_64-linux-gnu/perl*; do
    [ -d "$source" ] || continue
    cp -a "$source" "$data/" 2>/dev/null || true
    [ "$(du -sb "$data" | cut -f1)" -ge 200000000 ] && break
  done
fi
bytes="$(du -sb "$data" | cut -f1)"
echo "data: $data ($(find "$data" -type f | wc -l) files, $bytes bytes)"
tar cf - "$data" 2>/dev/null | cat >/dev/null # warm the page cache for both runs

now() { date +%s.%N; }
elapsed() { python3 -c "print(f'{$2 - $1:.2f}')"; }
rate() { python3 -c "print(f'{$1 / 1e6 / $2:.1f}')"; }
ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }

# Single node, the same layout, through its daemon like the testnet's members.
export FORGE_DATA_DIR="$work/single"
"$forge" init >/dev/null
"$forge" node start --listen /ip4/127.0.0.1/udp/0/quic-v1 >/dev/null
"$forge" volume create data --ec 4+2 >/dev/null
start="$(now)"
"$forge" volume import data "$data" >/dev/null
single="$(elapsed "$start" "$(now)")"
"$forge" node stop >/dev/null
unset FORGE_DATA_DIR

testnet/up.sh 6 --ec 4+2 --dir "$work/net" >/dev/null
on() { local node="$1"; shift; FORGE_DATA_DIR="$work/net/node-$node" "$forge" "$@"; }
on 1 volume create data --group testnet >/dev/null
start="$(now)"
on 1 volume import data "$data" >/dev/null
group="$(elapsed "$start" "$(now)")"
# Another member reads it back once its mirror has the snapshot.
for _ in $(seq 1 100); do
  [ "$(on 6 snapshot list data --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" -ge 1 ] && break
  sleep 0.2
done
start="$(now)"
on 6 volume export data "$work/out" >/dev/null
exported="$(elapsed "$start" "$(now)")"
diff -r --no-dereference "$data" "$work/out" >/dev/null && same="byte-identical" || same="DIFFERENT"

printf '%-40s %8s s %8s MB/s\n' "import, single node (4+2 local)" "$single" "$(rate "$bytes" "$single")"
printf '%-40s %8s s %8s MB/s\n' "import, 6-node group (4+2 spread)" "$group" "$(rate "$bytes" "$group")"
printf '%-40s %8s s %8s MB/s  (%s)\n' "export on another member" "$exported" "$(rate "$bytes" "$exported")" "$same"
echo "group/single import time: $(ratio "$group" "$single")x"

# Failures: two members killed with SIGKILL (pairs, the group's leader in one of them),
# the volume exported on a survivor and compared; the two restarted on their ports and
# the group repaired: every chunk back to six shards on their owners.
id_of() { on "$1" node id --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["node_id"])'; }
port_of() { on "$1" node addr --json | python3 -c 'import json,sys; a=json.load(sys.stdin)["addresses"][0]; print(a.split("/udp/")[1].split("/")[0])'; }
pid_of() { on "$1" node status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])'; }
leader_index() {
  local leader
  leader="$(on "$1" cluster status --json | python3 -c '
import json, sys
groups = [g for g in json.load(sys.stdin)["groups"] if g["name"] == "testnet"]
print(groups[0].get("leader") or "")')"
  for node in 1 2 3 4 5 6; do [ "$(id_of "$node")" = "$leader" ] && echo "$node"; done
}
failures=()
for round in 1 2 3; do
  case "$round" in
    1) pair="2 3" ;;
    2) leader="$(leader_index 6)"; other=$(( leader % 6 + 1 )); pair="$leader $other" ;;
    3) # Two nodes in neither earlier pair's place: the last two not killed in round 2.
       rest=(); for node in 1 2 3 4 5 6; do [[ " $pair " == *" $node "* ]] || rest+=("$node"); done
       pair="${rest[-2]} ${rest[-1]}" ;;
  esac
  declare -A ports=()
  for node in $pair; do ports[$node]="$(port_of "$node")"; kill -9 "$(pid_of "$node")"; done
  survivor=1; while [[ " $pair " == *" $survivor "* ]]; do survivor=$((survivor + 1)); done
  rm -rf "$work/out-$round"
  start="$(now)"
  if on "$survivor" volume export data "$work/out-$round" >/dev/null 2>"$work/export-$round.err" &&
     diff -r --no-dereference "$data" "$work/out-$round" >/dev/null; then verdict="byte-identical"; else verdict="FAILED ($(head -c 300 "$work/export-$round.err"))"; fi
  took="$(elapsed "$start" "$(now)")"
  for node in $pair; do
    on "$node" node start --listen "/ip4/127.0.0.1/udp/${ports[$node]}/quic-v1" --metrics-listen 127.0.0.1:0 >/dev/null
  done
  sleep 3
  repaired="$( (on "$survivor" group repair testnet --json || echo '{"shards_held": "?", "shards_expected": "?", "whole": "repair FAILED"}') | python3 -c '
import json, sys
r = json.load(sys.stdin)
print("%s/%s shards on their owners, whole: %s" % (r["shards_held"], r["shards_expected"], r["whole"]))')"
  failures+=("killed nodes $pair: export on node $survivor in $took s: $verdict; after restart and repair: $repaired")
  unset ports
done

printf '%s\n' "${failures[@]}"
