#!/usr/bin/env bash
# Runs the whole test suite (the README's test command calls this after setup).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/forge-target}"
# nextest does not run doctests; run them first so the suite's closing line is nextest's.
cargo test --workspace --locked --doc --quiet
cargo nextest run --workspace --locked --no-fail-fast
