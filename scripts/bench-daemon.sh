#!/usr/bin/env bash
# The daemon's costs: an import through `forge node start`'s daemon against the same
# import in-process (no daemon), on the same data, median of FORGE_BENCH_ROUNDS (default
# 3, alternating which goes first; each into a fresh volume); then the latency of a small
# call on the control socket (`Volume.Stats`, typed, of a one-file volume,
# one connection, 10,000 calls: p50, p99, max).
#
#   ./scripts/bench-daemon.sh [DATA_DIR]   # default: the Python standard library
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/forge-target}"
data="${1:-$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')}"
cargo build --release --locked --bin forge --example api_latency >/dev/null
forge="$CARGO_TARGET_DIR/release/forge"
latency="$CARGO_TARGET_DIR/release/examples/api_latency"
work="$(mktemp -d /var/tmp/forge-bench-daemon.XXXXXX)"
export FORGE_DATA_DIR="$work/vault"
trap '"$forge" node stop >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
now() { date +%s.%N; }
elapsed() { python3 -c "print(f'{$2 - $1:.2f}')"; }
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END{print v[int((NR+1)/2)]}'; }
cp -a "$data/." "$work/source"
tar cf - "$work/source" 2>/dev/null | cat >/dev/null
echo "data: $data ($(find "$work/source" -type f | wc -l) files, $(du -sb "$work/source" | cut -f1) bytes)"
"$forge" init >/dev/null

in_process=() through_daemon=()
import_in_process() {
  "$forge" volume create "local-$1" --domain "local-$1" >/dev/null
  sync; local start; start=$(now)
  "$forge" volume import "local-$1" "$work/source" >/dev/null
  in_process+=("$(elapsed "$start" "$(now)")")
}
import_through_daemon() {
  "$forge" node start --metrics-listen off >/dev/null
  "$forge" volume create "daemon-$1" --domain "daemon-$1" >/dev/null
  sync; local start; start=$(now)
  "$forge" volume import "daemon-$1" "$work/source" >/dev/null
  through_daemon+=("$(elapsed "$start" "$(now)")")
  "$forge" node stop >/dev/null
}
rounds="${FORGE_BENCH_ROUNDS:-3}"
for round in $(seq 1 "$rounds"); do
  # A dedup domain of its own per volume, so no import reuses another's chunks.
  if (( round % 2 )); then import_in_process "$round"; import_through_daemon "$round"
  else import_through_daemon "$round"; import_in_process "$round"; fi
done
local_median=$(median "${in_process[@]}")
daemon_median=$(median "${through_daemon[@]}")
printf '%-36s %10s %10s %8s\n' "" in-process daemon "in/daemon"
printf '%-36s %9ss %9ss %8s\n' "import (median of $rounds)" "$local_median" "$daemon_median" "$(python3 -c "print(f'{$local_median / $daemon_median:.2f}')")"
printf '%-36s %10s %10s\n' "  each round" "${in_process[*]}" "${through_daemon[*]}"

mkdir -p "$work/small"
echo "one small file" > "$work/small/file.txt"
"$forge" volume create small >/dev/null
"$forge" volume import small "$work/small" >/dev/null
"$forge" node start --metrics-listen off >/dev/null
"$latency" "$FORGE_DATA_DIR" small "${FORGE_BENCH_CALLS:-10000}"
"$forge" node stop >/dev/null
