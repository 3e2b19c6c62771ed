#!/usr/bin/env bash
# Runs the whole test suite (the README's test command calls this after setup).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/forge-target}"
cargo nextest run --workspace --locked --no-fail-fast
# nextest does not run doctests; they are cheap, so run them too.
cargo test --workspace --locked --doc
