#!/usr/bin/env bash
# The main job on the embedded default vault, from a fresh Debian 12 machine: install the
# system packages, build forge (release), create a vault in a new temporary directory,
# create a volume, import a directory into it, and show the volume's statistics.
#
#   ./scripts/demo.sh [DIRECTORY]     # default: /usr/share/doc
set -euo pipefail
cd "$(dirname "$0")/.."
source_dir="${1:-/usr/share/doc}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/forge-target}"

./scripts/setup.sh
cargo build --release --locked --bin forge
forge="$CARGO_TARGET_DIR/release/forge"

export FORGE_DATA_DIR="${FORGE_DATA_DIR:-$(mktemp -d)/vault}"
echo "== vault in $FORGE_DATA_DIR"
"$forge" init
"$forge" volume create demo
"$forge" volume import demo "$source_dir" -m "demo import of $source_dir"
"$forge" snapshot list demo
"$forge" volume stats demo
"$forge" stats
echo "== try: $forge volume export demo /tmp/demo-export   (with FORGE_DATA_DIR=$FORGE_DATA_DIR)"
echo "== or:  mkdir -p /tmp/demo-mnt && $forge volume mount demo /tmp/demo-mnt --background   (then: $forge volume unmount /tmp/demo-mnt)"
