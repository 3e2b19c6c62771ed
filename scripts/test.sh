#!/usr/bin/env bash
# Runs the whole test suite (the README's test command calls this after setup).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/forge-target}"
# The mesh's libp2p network is a feature (the forge binary does not use it yet): test it
# too. The same features as .ci/run's clippy, so nothing is compiled twice.
FEATURES=(--features forge-mesh/libp2p)
# nextest does not run doctests; run them first so the suite's closing line is nextest's.
cargo test --workspace --locked "${FEATURES[@]}" --doc --quiet
cargo nextest run --workspace --locked "${FEATURES[@]}" --no-fail-fast
