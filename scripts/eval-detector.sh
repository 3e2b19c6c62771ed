#!/usr/bin/env bash
# Evaluates the behaviour detector on real forge mounts (a report, not a timed test):
#
# - ransomware: a simulator reads each document of a tree of real text documents from
#   this machine (/usr/share/doc, /usr/share/common-licenses, /etc) and writes it
#   encrypted (ChaCha20 by openssl, a random key), in variants: in place; in place then
#   renamed to .locked; to a new .locked file then the original deleted; slowly (one file
#   every SLOW_SECONDS, default 60); partially (the first 4 KiB only). For each: the files
#   and bytes damaged before the freeze, and whether the quarantine branch restores every
#   document byte-exact. Anchor: CryptoDrop (Scaife et al., 2016), median 10 files lost.
#   Targets: median <= 5, never more than 20.
# - benign: untar and build a C tree, git clone of a local repository then checkout and gc,
#   compressed media and archives copied in, SQLite under write load, dpkg -x of packages
#   (downloaded with apt-get download), rsync of a tree with many renames. Each is a false
#   positive if it freezes the volume. Target: none.
#
#   ./scripts/eval-detector.sh [DOCUMENTS]      # SLOW_SECONDS=60 by default
#
# The detector's cost in write throughput is bench-mount.sh's "write, detector on vs off".
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/forge-target}"
slow_seconds="${SLOW_SECONDS:-60}"
cargo build --release --locked --bin forge >/dev/null
forge="$CARGO_TARGET_DIR/release/forge"
for tool in openssl git gcc make rsync python3 apt-get dpkg; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done

work="$(mktemp -d /var/tmp/forge-eval-detector.XXXXXX)"
cleanup() {
  { grep -E " $work/[^ ]* fuse\.forge " /proc/mounts || true; } | awk '{print $2}' | while read -r m; do
    fusermount3 -uz "$m" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

# The documents: real text files of this machine, 1 KiB to 256 KiB, up to 300 of them.
docs="$work/documents"
mkdir -p "$docs"
if [ -n "${1:-}" ]; then
  cp -r "$1"/. "$docs"/
else
  find /usr/share/doc /usr/share/common-licenses /etc -type f -size +1k -size -256k \
      \( -name '*.txt' -o -name 'copyright' -o -name '*.md' -o -name '*.html' -o -name '*.conf' \
         -o -name 'README*' -o -name 'NEWS*' -o -path '/usr/share/common-licenses/*' \) \
      -readable 2>/dev/null | sort | head -300 | while read -r file; do
    cp "$file" "$docs/$(echo "$file" | tr '/' '_' | sed 's/^_//')" 2>/dev/null || true
  done || true  # head closing the pipe early is not a failure
fi
count=$(find "$docs" -type f | wc -l)
size=$(du -sb "$docs" | cut -f1)
echo "documents: $count files, $size bytes"

fresh_vault() {
  export FORGE_DATA_DIR="$work/vault-$1"
  "$forge" init >/dev/null
  "$forge" volume create v >/dev/null
}

ransomware() { # MOUNT VARIANT
  python3 - "$1" "$2" "$slow_seconds" <<'PY'
import os, subprocess, sys, time
root, variant, slow = sys.argv[1], sys.argv[2], float(sys.argv[3])
key, iv = os.urandom(32).hex(), os.urandom(16).hex()
def encrypt(data):
    return subprocess.run(["openssl", "enc", "-chacha20", "-K", key, "-iv", iv],
                          input=data, capture_output=True, check=True).stdout
files, damaged_bytes = 0, 0
for name in sorted(os.listdir(root)):
    path = os.path.join(root, name)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        if variant == "partial":
            with open(path, "r+b") as handle:
                handle.write(encrypt(data[:4096]))
        elif variant == "copy-then-delete":
            with open(path + ".locked", "wb") as handle:
                handle.write(encrypt(data))
            os.remove(path)
        else:
            with open(path, "r+b") as handle:
                handle.write(encrypt(data))
            if variant == "rename":
                os.rename(path, path + ".locked")
    except OSError as error:
        print(f"stopped by: {error.strerror}", file=sys.stderr)
        break
    files += 1
    damaged_bytes += len(data)
    if variant == "slow":
        time.sleep(slow)
print(files, damaged_bytes)
PY
}

echo
printf '%-18s %8s %12s %8s %s\n' "ransomware" "files" "bytes" "frozen" "quarantine restores every document"
losses=()
for variant in in-place rename copy-then-delete partial slow; do
  fresh_vault "$variant"
  "$forge" volume import v "$docs" >/dev/null
  mnt="$work/mnt-$variant"; mkdir -p "$mnt"
  "$forge" volume mount v "$mnt" --background >/dev/null
  read -r files bytes < <(ransomware "$mnt" "$variant" 2>/dev/null)
  "$forge" volume unmount "$mnt" >/dev/null
  frozen=no; restored=-
  if ! "$forge" volume trust-check v --json >"$work/check.json" 2>/dev/null; then
    if python3 -c '
import json, sys
report = json.load(open(sys.argv[1]))
sys.exit(0 if any(c["check"] == "anomalies" and not c["passed"] for c in report["checks"]) else 1)' "$work/check.json"; then
      frozen=yes
      quarantine=$("$forge" snapshot list v --json | python3 -c '
import json, sys
for snapshot in json.load(sys.stdin):
    for branch in snapshot["branches"]:
        if "-quarantine-" in branch: print(branch)')
      rm -rf "$work/restored"
      "$forge" volume export v "$work/restored" --branch "$quarantine" >/dev/null
      if diff -r "$docs" "$work/restored" >/dev/null; then restored=yes; else restored=NO; fi
    fi
  fi
  losses+=("$files")
  printf '%-18s %8s %12s %8s %s\n' "$variant" "$files" "$bytes" "$frozen" "$restored"
done
sorted=$(printf '%s\n' "${losses[@]}" | sort -n | tr '\n' ' ')
median=$(printf '%s\n' "${losses[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
worst=$(printf '%s\n' "${losses[@]}" | sort -n | tail -1)
echo "files lost before the freeze: $sorted(median $median, worst $worst; target median <= 5, worst <= 20; CryptoDrop's median: 10)"

echo
echo "benign suite (one volume, one mount; a freeze is a false positive)"
fresh_vault benign
"$forge" volume import v "$docs" >/dev/null
mnt="$work/mnt-benign"; mkdir -p "$mnt"
false_positives=0
benign() { # NAME COMMAND...
  local name="$1"; shift
  "$forge" volume mount v "$mnt" --background >/dev/null
  local outcome=ok
  if ! (cd "$mnt" && "$@") >"$work/benign.log" 2>&1; then outcome="failed (see below)"; fi
  "$forge" volume unmount "$mnt" >/dev/null
  if "$forge" volume trust-check v >/dev/null 2>&1; then
    printf '  %-44s %s\n' "$name" "not frozen ($outcome)"
  else
    false_positives=$((false_positives + 1))
    printf '  %-44s %s\n' "$name" "FROZEN: false positive"
    "$forge" volume unfreeze v >/dev/null
  fi
  if [ "$outcome" != ok ]; then tail -5 "$work/benign.log"; fi
}
# A C tree: sources written, a tarball made and extracted, built with make, cleaned.
mkdir -p "$work/ctree/src"
for i in $(seq 1 60); do
  printf '#include <stdio.h>\nint f%d(int x) { int s = 0; for (int i = 0; i < x; i++) s += i * %d; return s; }\n' "$i" "$i" >"$work/ctree/src/f$i.c"
done
printf 'int main(void) { return 0; }\n' >"$work/ctree/src/main.c"
printf 'SRC := $(wildcard src/*.c)\nOBJ := $(SRC:.c=.o)\nprog: $(OBJ)\n\tgcc -o $@ $^\n%%.o: %%.c\n\tgcc -O1 -c -o $@ $<\nclean:\n\trm -f $(OBJ) prog\n' >"$work/ctree/Makefile"
tar -C "$work" -czf "$work/ctree.tar.gz" ctree
benign "untar and build a C tree, then clean" sh -c "tar -xzf '$work/ctree.tar.gz' && make -C ctree -j2 >/dev/null && make -C ctree clean >/dev/null && make -C ctree -j2 >/dev/null"
benign "git clone of a local repository, checkout, gc" sh -c "git clone -q '$PWD' repo && cd repo && git checkout -q HEAD~5 && git checkout -q - && git gc -q --aggressive"
benign "compressed media and archives copied in" sh -c "mkdir -p media && find /usr/share/doc -name '*.gz' | head -400 | xargs -I{} cp --backup=numbered {} media/ && cp '$work/ctree.tar.gz' media/"
benign "SQLite under write load" python3 -c "
import sqlite3, random
db = sqlite3.connect('app.db')
db.execute('create table if not exists t (id integer primary key, name text, value integer)')
for round in range(200):
    with db:
        for i in range(100):
            db.execute('insert or replace into t values (?, ?, ?)', (random.randrange(5000), 'name-%d' % i, round))
db.close()"
mkdir -p "$work/debs"
if (cd "$work/debs" && apt-get download -q rsync zstd bzip2 >/dev/null 2>&1); then
  benign "dpkg -x of packages" sh -c "for deb in '$work'/debs/*.deb; do dpkg -x \"\$deb\" pkgroot; done"
else
  echo "  dpkg -x of packages: skipped (apt-get download failed)"
fi
cp -r "$docs" "$work/mirror-source"
benign "rsync of a tree, then again after many renames" sh -c "rsync -a '$work/mirror-source/' mirror/ && cd '$work/mirror-source' && for f in \$(ls | head -150); do mv \"\$f\" \"renamed-\$f\"; done && cd - >/dev/null && rsync -a --delete '$work/mirror-source/' mirror/"
echo "false positives: $false_positives (target 0)"
