#!/usr/bin/env bash
# Mount benchmark: a forge FUSE mount against the native file system of the same disk, in
# the same run. Prints MB/s (or seconds) for each and the ratio forge/native.
#
#   ./scripts/bench-mount.sh [SIZE_MIB]     # default 1024 (a 1 GiB file)
#
# - first read: sequential read of a file imported into the vault, through a fresh mount
#   (nothing cached: every chunk is read, verified and decrypted), against the native
#   copy with the page cache dropped;
# - warm re-read: the same file read again through the same mount (kernel page cache);
# - sequential write: SIZE_MIB written into the mount and closed (chunked, sealed, stored);
#   again through a mount without the behaviour detector (its cost: target <= 5%);
# - small files: create and stat 10,000 files of 1 KiB.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/forge-target}"
size_mib="${1:-1024}"
cargo build --release --locked --bin forge >/dev/null
forge="$CARGO_TARGET_DIR/release/forge"

work="$(mktemp -d /var/tmp/forge-bench-mount.XXXXXX)"
mnt="$work/mnt"
cleanup() { fusermount3 -uz "$mnt" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
export FORGE_DATA_DIR="$work/vault"
mkdir -p "$mnt" "$work/native/src"

now() { date +%s.%N; }
seconds() { python3 -c "print(f'{$2 - $1:.3f}')"; }
mbps() { python3 -c "print(f'{$1 / 1048576 / ($3 - $2):.0f}')"; }
ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
bytes=$((size_mib * 1048576))

echo "data: ${size_mib} MiB of random bytes (incompressible), 10,000 files of 1 KiB"
head -c "$bytes" /dev/urandom > "$work/native/src/big.bin"
"$forge" init >/dev/null
"$forge" volume create bench >/dev/null
"$forge" volume import bench "$work/native/src" >/dev/null

# Native: first read with a dropped page cache, then the warm re-read. Forge: the same
# through a fresh mount, with the page cache dropped again (the vault's files are cold too).
drop_caches
start=$(now); cat "$work/native/src/big.bin" > /dev/null; end=$(now)
native_first=$(mbps "$bytes" "$start" "$end")
start=$(now); cat "$work/native/src/big.bin" > /dev/null; end=$(now)
native_warm=$(mbps "$bytes" "$start" "$end")
"$forge" volume mount bench "$mnt" --read-only --background >/dev/null
drop_caches
start=$(now); cat "$mnt/big.bin" > /dev/null; end=$(now)
forge_first=$(mbps "$bytes" "$start" "$end")
start=$(now); cat "$mnt/big.bin" > /dev/null; end=$(now)
forge_warm=$(mbps "$bytes" "$start" "$end")
cmp -s "$mnt/big.bin" "$work/native/src/big.bin" || { echo "read through the mount differs" >&2; exit 1; }
"$forge" volume unmount "$mnt" >/dev/null

# Sequential write (including close, which chunks and stores it) and small files.
"$forge" volume mount bench "$mnt" --background >/dev/null
start=$(now); dd if="$work/native/src/big.bin" of="$work/native/copy.bin" bs=1M status=none conv=fsync; end=$(now)
native_write=$(mbps "$bytes" "$start" "$end")
start=$(now); dd if="$work/native/src/big.bin" of="$mnt/copy.bin" bs=1M status=none conv=fsync; end=$(now)
forge_write=$(mbps "$bytes" "$start" "$end")
small() {
  python3 - "$1" <<'PY'
import os, sys, time
root = os.path.join(sys.argv[1], "small")
os.makedirs(root)
payload = b"x" * 1024
start = time.time()
for index in range(10000):
    path = os.path.join(root, f"f{index:05d}")
    with open(path, "wb") as handle:
        handle.write(payload)
    os.stat(path)
print(f"{time.time() - start:.3f}")
PY
}
native_small=$(small "$work/native")
forge_small=$(small "$mnt")
start=$(now); "$forge" volume unmount "$mnt" >/dev/null; end=$(now)
commit_seconds=$(seconds "$start" "$end")

# The behaviour detector's cost: the same sequential write through a mount without it
# (FORGE_DETECTOR=off in the mount host's environment), in the same run.
FORGE_DETECTOR=off "$forge" volume mount bench "$mnt" --background >/dev/null
start=$(now); dd if="$work/native/src/big.bin" of="$mnt/copy-undetected.bin" bs=1M status=none conv=fsync; end=$(now)
forge_write_undetected=$(mbps "$bytes" "$start" "$end")
"$forge" volume unmount "$mnt" >/dev/null

printf '\n%-36s %10s %10s %8s\n' "" "forge" "native" "ratio"
printf '%-36s %10s %10s %8s\n' "first read (MB/s, cold)" "$forge_first" "$native_first" "$(ratio "$forge_first" "$native_first")"
printf '%-36s %10s %10s %8s\n' "warm re-read (MB/s)" "$forge_warm" "$native_warm" "$(ratio "$forge_warm" "$native_warm")"
printf '%-36s %10s %10s %8s\n' "sequential write + fsync (MB/s)" "$forge_write" "$native_write" "$(ratio "$forge_write" "$native_write")"
printf '%-36s %10s %10s %8s\n' "create+stat 10,000 files (s)" "$forge_small" "$native_small" "$(ratio "$forge_small" "$native_small")"
printf '%-36s %10s %10s %8s\n' "write, detector on vs off (MB/s)" "$forge_write" "$forge_write_undetected" "$(ratio "$forge_write" "$forge_write_undetected")"
echo "unmount (commits the snapshot): ${commit_seconds}s"
echo "targets: warm re-read >= 0.5x native; first read >= 300 MB/s"
