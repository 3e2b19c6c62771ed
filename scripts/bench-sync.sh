#!/usr/bin/env bash
# Sync benchmark: forge (daemons, QUIC over loopback) against an rsync daemon (TCP over
# loopback) on the same data in the same run. Three cases: the first sync of a tree, the
# incremental sync of its second version, and a third version in which 10% of the files
# are renamed. For each: wall time and bytes on the wire (the loopback interface's byte
# counter over the transfer, both directions, so both tools are measured alike), and the
# ratio forge/rsync (lower is better).
#
#   ./scripts/bench-sync.sh [DATA_DIR]   # default: the Python standard library here
#
# The first sync runs FORGE_BENCH_ROUNDS times (default 3), each to a fresh receiver (a
# new vault, an empty rsync module), the two tools alternating which goes first, and the
# medians are compared: one run on a shared VM varies by a third. forge's time is the sync
# alone; the imports that make each version a snapshot are timed and printed apart (rsync
# reads the files it sends as it goes). forge sends the compressed ciphertext it already
# holds, verified by cid at the receiver.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/forge-target}"
data="${1:-$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')}"
rounds="${FORGE_BENCH_ROUNDS:-3}"

command -v rsync >/dev/null 2>&1 || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsync >/dev/null
}
cargo build --release --locked --bin forge >/dev/null
forge="$CARGO_TARGET_DIR/release/forge"

work="$(mktemp -d /var/tmp/forge-bench-sync.XXXXXX)"
cleanup() {
  for vault in "$work"/a "$work"/b*; do
    [ -d "$vault" ] && FORGE_DATA_DIR="$vault" "$forge" node stop >/dev/null 2>&1 || true
  done
  [ -f "$work/rsyncd.pid" ] && kill "$(cat "$work/rsyncd.pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
echo "data: $data ($(find "$data" -type f | wc -l) files, $(du -sb "$data" | cut -f1) bytes)"

# Version 1: a copy; version 2: every 100th .py file gets two lines, every 50th .txt file
# goes, a few files come (as scripts/bench.sh); version 3: version 2 with every 10th file
# renamed (same directory, new name).
cp -a "$data/." "$work/v1"
cp -a "$work/v1/." "$work/v2"
find "$work/v2" -type f -name '*.py' -print0 | sort -z | awk -v RS='\0' 'NR % 100 == 0' |
  while IFS= read -r file; do printf '\n# forge bench edit\nEDITED = True\n' >>"$file"; done
find "$work/v2" -type f -name '*.txt' -print0 | sort -z | awk -v RS='\0' 'NR % 50 == 0' |
  while IFS= read -r file; do rm -f "$file"; done
mkdir -p "$work/v2/forge_bench_added"
for index in 1 2 3 4 5; do head -c 200000 /dev/urandom >"$work/v2/forge_bench_added/blob-$index.bin"; done
cp -a "$work/v2/." "$work/v3"
find "$work/v3" -type f -print0 | sort -z | awk -v RS='\0' 'NR % 10 == 0' |
  while IFS= read -r file; do mv "$file" "$file.renamed"; done

now() { date +%s.%N; }
elapsed() { python3 -c "print(f'{$2 - $1:.2f}')"; }
ratio() { python3 -c "print(f'{$1 / $2:.3f}' if $2 else 'n/a')"; }
lo_bytes() { awk '/^ *lo:/ {print $2}' /proc/net/dev; }
warm() { tar cf - "$@" 2>/dev/null | cat >/dev/null; }
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END{print v[int((NR+1)/2)]}'; }

# rsync: a daemon on loopback, one module per round.
{
  echo "pid file = $work/rsyncd.pid"
  echo "port = 18873"
  echo "address = 127.0.0.1"
  echo "use chroot = no"
  echo "uid = root"
  echo "gid = root"
  for round in $(seq 1 "$rounds"); do
    mkdir -p "$work/rsync-dst-$round"
    printf '[dst%s]\npath = %s\nread only = no\n' "$round" "$work/rsync-dst-$round"
  done
} >"$work/rsyncd.conf"
rsync --daemon --config="$work/rsyncd.conf"
sleep 0.5
rsync_case() { # version module -> "seconds bytes"
  warm "$work/$1"
  local start bytes_before
  bytes_before=$(lo_bytes)
  start=$(now)
  rsync -a --delete "$work/$1/" "rsync://127.0.0.1:18873/$2/" >/dev/null
  echo "$(elapsed "$start" "$(now)") $(($(lo_bytes) - bytes_before))"
}

# forge: a sender, and one receiver per round that trusts it to push new volumes.
F() {
  local vault=$1
  shift
  FORGE_DATA_DIR="$work/$vault" "$forge" "$@"
}
json_field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
start_vault() {
  F "$1" init >/dev/null
  F "$1" node start --metrics-listen off --listen /ip4/127.0.0.1/udp/0/quic-v1 >/dev/null
}
start_vault a
a_id=$(F a node id --json | json_field '["node_id"]')
F a volume create bench >/dev/null
for round in $(seq 1 "$rounds"); do
  start_vault "b$round"
  address=$(F "b$round" node addr --json | json_field '["addresses"][0]')
  F a peer add "$address" --name "b$round" >/dev/null
  F "b$round" peer trust "$a_id" --new-volumes >/dev/null
done
forge_import() { # version -> seconds
  warm "$work/$1"
  local start
  start=$(now)
  F a volume import bench "$work/$1" -m "$1" >/dev/null
  elapsed "$start" "$(now)"
}
forge_sync() { # peer -> "seconds bytes reported_bytes chunks_sent chunks_skipped"
  local start bytes_before reply
  bytes_before=$(lo_bytes)
  start=$(now)
  reply=$(F a volume sync bench --peer "$1" --json)
  echo "$(elapsed "$start" "$(now)") $(($(lo_bytes) - bytes_before))" \
    "$(echo "$reply" | json_field '["bytes_sent"]')" \
    "$(echo "$reply" | json_field '["chunks_sent"]')" \
    "$(echo "$reply" | json_field '["chunks_skipped"]')"
}
row() { # name rsync_s rsync_bytes forge_s forge_bytes import_s reported chunks skipped
  printf '%-12s %10s %14s %10s %14s %9s %9s (%s; %s, %s, %s)\n' "$1" "$2" "$3" "$4" "$5" \
    "$(ratio "$4" "$2")" "$(ratio "$5" "$3")" "$6" "$7" "$8" "$9"
}

printf '%-12s %10s %14s %10s %14s %9s %9s %s\n' case "rsync s" "rsync bytes" "forge s" \
  "forge bytes" "time x" "bytes x" "(forge import s; reported bytes, chunks sent, skipped)"
import_s=$(forge_import v1)
rsync_times=()
forge_times=()
for round in $(seq 1 "$rounds"); do
  if [ $((round % 2)) -eq 1 ]; then
    read -r r_s r_b < <(rsync_case v1 "dst$round")
    read -r f_s f_b f_sent f_chunks f_skipped < <(forge_sync "b$round")
  else
    read -r f_s f_b f_sent f_chunks f_skipped < <(forge_sync "b$round")
    read -r r_s r_b < <(rsync_case v1 "dst$round")
  fi
  rsync_times+=("$r_s")
  forge_times+=("$f_s")
  echo "  first sync, round $round: rsync $r_s s, forge $f_s s"
done
first_forge_bytes=$f_b
row first "$(median "${rsync_times[@]}")" "$r_b" "$(median "${forge_times[@]}")" "$f_b" \
  "$import_s" "$f_sent" "$f_chunks" "$f_skipped"
# The later versions go to the last round's receiver and rsync module.
last=$rounds
for version in v2 v3; do
  import_s=$(forge_import "$version")
  read -r r_s r_b < <(rsync_case "$version" "dst$last")
  read -r f_s f_b f_sent f_chunks f_skipped < <(forge_sync "b$last")
  case $version in v2) name=incremental ;; v3) name=renamed-10% ;; esac
  row "$name" "$r_s" "$r_b" "$f_s" "$f_b" "$import_s" "$f_sent" "$f_chunks" "$f_skipped"
done
echo "renames: forge sent $(ratio "$f_b" "$first_forge_bytes") of its first sync's bytes (target <= 0.010)"

# The result is checked, not assumed: the receiver exports what a has.
F a volume share bench --to "b$last" >/dev/null
F a volume sync bench --peer "b$last" >/dev/null
F "b$last" volume export bench "$work/out" >/dev/null
diff -r "$work/v3" "$work/out" >/dev/null &&
  echo "the receiver's export of the last version matches it byte for byte"
