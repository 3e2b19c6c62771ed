#!/usr/bin/env bash
# Compare-and-swap throughput and latency of a 3-node forge group against a 3-member etcd,
# both on loopback, at 1, 16 and 256 concurrent clients, 30 s each (FORGE_BENCH_SECONDS,
# FORGE_BENCH_CLIENTS to change), the same load generator driving both
# (consensus/examples/cas_bench.rs). Installs Debian's etcd-server if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/forge-target}"
unset RUSTFLAGS
seconds="${FORGE_BENCH_SECONDS:-30}"
clients="${FORGE_BENCH_CLIENTS:-1,16,256}"

if ! command -v etcd >/dev/null 2>&1; then
  apt-get install -y -q etcd-server etcd-client >/dev/null
fi
work="$(mktemp -d -t forge-bench-consensus.XXXXXX)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# A 3-member etcd on loopback, each member with its own data directory (fsync on, as
# forge's group has it).
cluster="e1=http://127.0.0.1:2380,e2=http://127.0.0.1:22380,e3=http://127.0.0.1:32380"
endpoints=""
for member in 1 2 3; do
  case $member in 1) client=2379; peer=2380 ;; 2) client=22379; peer=22380 ;; 3) client=32379; peer=32380 ;; esac
  ETCD_UNSUPPORTED_ARCH= etcd --name "e$member" --data-dir "$work/e$member" \
    --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token forge-bench \
    --log-level error >"$work/e$member.log" 2>&1 &
  pids+=($!)
  endpoints="${endpoints:+$endpoints,}127.0.0.1:$client"
done
for _ in $(seq 1 100); do
  if ETCDCTL_API=3 etcdctl --endpoints "$endpoints" endpoint health >/dev/null 2>&1; then break; fi
  sleep 0.2
done
echo "etcd $(etcd --version | head -1 | awk '{print $3}') on $endpoints"

profile="${FORGE_BENCH_PROFILE:-release}"
cargo build --profile "$profile" --locked -p forge-consensus --example cas_bench 2>&1 | tail -1
dir="$profile"; [ "$profile" = dev ] && dir=debug
"$CARGO_TARGET_DIR/$dir/examples/cas_bench" --etcd "$endpoints" --seconds "$seconds" --clients "$clients"
