#!/usr/bin/env bash
# Sync benchmark: forge (two daemons, QUIC over loopback) against an rsync daemon (TCP over
# loopback) on the same data in the same run. Three cases: the first sync of a tree, the
# incremental sync of its second version, and a third version in which 10% of the files
# are renamed. For each: wall time and bytes on the wire (the loopback interface's byte
# counter over the transfer, both directions, so both tools are measured alike), and the
# ratio forge/rsync (lower is better).
#
#   ./scripts/bench-sync.sh [DATA_DIR]   # default: the Python standard library here
#
# forge's time is the sync alone; the imports that make each version a snapshot are
# timed and printed apart (rsync reads the files it sends as it goes). forge sends the
# compressed ciphertext it already holds, verified by cid at the receiver.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/forge-target}"
data="${1:-$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')}"

command -v rsync >/dev/null 2>&1 || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsync >/dev/null
}
cargo build --release --locked --bin forge >/dev/null
forge="$CARGO_TARGET_DIR/release/forge"

work="$(mktemp -d /var/tmp/forge-bench-sync.XXXXXX)"
cleanup() {
  for vault in a b; do
    FORGE_DATA_DIR="$work/$vault" "$forge" node stop >/dev/null 2>&1 || true
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

# rsync: a daemon on loopback, one module.
mkdir -p "$work/rsync-dst"
cat >"$work/rsyncd.conf" <<EOF
pid file = $work/rsyncd.pid
port = 18873
address = 127.0.0.1
use chroot = no
[dst]
path = $work/rsync-dst
read only = no
uid = root
gid = root
EOF
rsync --daemon --config="$work/rsyncd.conf"
sleep 0.5
rsync_case() { # version → "seconds bytes"
  warm "$work/$1"
  local start bytes_before
  bytes_before=$(lo_bytes)
  start=$(now)
  rsync -a --delete "$work/$1/" rsync://127.0.0.1:18873/dst/ >/dev/null
  echo "$(elapsed "$start" "$(now)") $(($(lo_bytes) - bytes_before))"
}

# forge: two vaults, b trusts a to push new volumes.
for vault in a b; do
  FORGE_DATA_DIR="$work/$vault" "$forge" init >/dev/null
  FORGE_DATA_DIR="$work/$vault" "$forge" node start --metrics-listen off \
    --listen /ip4/127.0.0.1/udp/0/quic-v1 >/dev/null
done
A() { FORGE_DATA_DIR="$work/a" "$forge" "$@"; }
B() { FORGE_DATA_DIR="$work/b" "$forge" "$@"; }
b_addr=$(B node addr --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["addresses"][0])')
a_id=$(A node id --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["node_id"])')
A peer add "$b_addr" --name b >/dev/null
B peer trust "$a_id" --new-volumes >/dev/null
A volume create bench >/dev/null
forge_case() { # version → "seconds bytes import_seconds bytes_sent"
  warm "$work/$1"
  local start import_seconds bytes_before reply
  start=$(now)
  A volume import bench "$work/$1" -m "$1" >/dev/null
  import_seconds=$(elapsed "$start" "$(now)")
  bytes_before=$(lo_bytes)
  start=$(now)
  reply=$(A volume sync bench --peer b --json)
  echo "$(elapsed "$start" "$(now)") $(($(lo_bytes) - bytes_before)) $import_seconds $(echo "$reply" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["bytes_sent"], r["chunks_sent"], r["chunks_skipped"])')"
}

printf '%-12s %10s %14s %10s %14s %9s %9s %s\n' case "rsync s" "rsync bytes" "forge s" "forge bytes" "time x" "bytes x" "(forge import s; reported bytes, chunks sent, skipped)"
first_forge_bytes=0
for version in v1 v2 v3; do
  read -r r_s r_b < <(rsync_case "$version")
  read -r f_s f_b f_import f_sent f_chunks f_skipped < <(forge_case "$version")
  [ "$version" = v1 ] && first_forge_bytes=$f_b
  case $version in v1) name=first ;; v2) name=incremental ;; v3) name=renamed-10% ;; esac
  printf '%-12s %10s %14s %10s %14s %9s %9s (%s; %s, %s, %s)\n' "$name" "$r_s" "$r_b" "$f_s" "$f_b" \
    "$(ratio "$f_s" "$r_s")" "$(ratio "$f_b" "$r_b")" "$f_import" "$f_sent" "$f_chunks" "$f_skipped"
  if [ "$version" = v3 ]; then
    echo "renames: forge sent $(ratio "$f_b" "$first_forge_bytes") of its first sync's bytes (target <= 0.010)"
  fi
done
# The result is checked, not assumed: b exports what a has.
A volume share bench --to b >/dev/null
A volume sync bench --peer b >/dev/null
B volume export bench "$work/out" >/dev/null
diff -r "$work/v3" "$work/out" >/dev/null && echo "b's export of the last version matches it byte for byte"
