#!/usr/bin/env bash
# Encryption cost: import and export of the same disk into a plain and an encrypted store, in one
# run, with this checkout's release binary (target/release/vmnest; VMNEST_BIN=PATH to override).
#
# The disk (bench/work/crypt/disk.raw, made when missing; --size, default 1G): a sparse raw file,
# 40% pseudo-random data, 30% text-like compressible data, 30% holes, in 4 MiB runs. Per store
# kind, in a fresh store: `import` (timed), `export -O raw` to a file (timed; the file is checked
# with cmp). Each step runs --runs times (default 3) and the best time is kept. The encrypted store
# uses a passphrase with the default argon2id costs (the key derivation, once per command, is in
# the times) and, with --key-file, a key file instead. Warm page cache.
#
# Usage: bench/crypt.sh [--size 1G] [--runs 3] [--key-file]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
size=1G
runs=3
keyfile=0
while [ $# -gt 0 ]; do
  case $1 in
    --size) size=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --key-file) keyfile=1; shift ;;
    *) echo "usage: $0 [--size 1G] [--runs 3] [--key-file]" >&2; exit 2 ;;
  esac
done
# A fresh release build unless VMNEST_BIN names another binary (an old one would be measured).
if [ -n "${VMNEST_BIN:-}" ]; then
  bin=$VMNEST_BIN
else
  (cd "$root" && cargo build --release -q -p vmnest)
  bin=$root/target/release/vmnest
fi
work=$here/work/crypt
mkdir -p "$work"
disk=$work/disk.raw
if [ ! -f "$disk" ]; then
  python3 - "$disk" "$size" <<'PY'
import os, random, sys
path, size = sys.argv[1], sys.argv[2]
mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
n = int(size[:-1]) * mult[size[-1]] if size[-1] in mult else int(size)
run = 4 << 20
rng = random.Random(7)
words = [b"kernel", b"config", b"usr/lib", b"systemd", b"0x%04x", b"journal", b"  ", b"\n"]
with open(path, "wb") as f:
    f.truncate(n)
    for off in range(0, n, run):
        r = rng.random()
        if r < 0.4:
            f.seek(off); f.write(rng.randbytes(run))
        elif r < 0.7:
            text = bytearray()
            while len(text) < run:
                text += rng.choice(words) + b"%d " % rng.randrange(100000)
            f.seek(off); f.write(bytes(text[:run]))
PY
fi
logical=$(stat -c %s "$disk")
data=$(du -B1 "$disk" | cut -f1)
best() { sort -n | head -1; }
secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); echo "$t1 - $t0" | bc -l; }
export VMNEST_PASSPHRASE="bench passphrase"
declare -A imp exp
for kind in plain encrypted; do
  i_times=(); e_times=()
  for r in $(seq "$runs"); do
    store=$work/store-$kind
    rm -rf "$store" "$work/out.raw"
    extra=()
    if [ "$kind" = encrypted ]; then
      if [ "$keyfile" = 1 ]; then
        rm -f "$work/key"; extra=(--key-file "$work/key")
      fi
      "$bin" --store "$store" "${extra[@]}" init --encrypt >/dev/null
    fi
    i_times+=("$(secs "$bin" --store "$store" "${extra[@]}" import "$disk" vm)")
    e_times+=("$(secs "$bin" --store "$store" "${extra[@]}" export vm "$work/out.raw" -O raw)")
    cmp "$disk" "$work/out.raw"
  done
  imp[$kind]=$(printf '%s\n' "${i_times[@]}" | best)
  exp[$kind]=$(printf '%s\n' "${e_times[@]}" | best)
done
rm -rf "$work/out.raw"
# What opening the encrypted store costs (the key derivation): `ls`, best of 3.
open_s=$(for r in 1 2 3; do secs "$bin" --store "$work/store-encrypted" "${extra[@]}" ls; done | best)
mib() { echo "scale=1; $1 / 1048576" | bc -l; }
rate() { echo "scale=0; $data / 1048576 / $1" | bc -l; }
echo "disk: $(mib "$logical") MiB logical, $(mib "$data") MiB data; best of $runs; $(nproc) cores; $(date -u +%F)"
echo "key: $([ "$keyfile" = 1 ] && echo "key file" || echo "passphrase (argon2id, default costs)"); \
\`ls\` of the encrypted store (opening it, key derivation included): $(printf %.2f "$open_s") s"
printf '| step | plain s (MiB/s of data) | encrypted s (MiB/s) | encrypted / plain time |\n|---|---|---|---|\n'
for step in import export; do
  if [ $step = import ]; then p=${imp[plain]}; e=${imp[encrypted]}; else p=${exp[plain]}; e=${exp[encrypted]}; fi
  printf '| %s | %.2f (%s) | %.2f (%s) | %.2f |\n' "$step" "$p" "$(rate "$p")" "$e" "$(rate "$e")" "$(echo "$e / $p" | bc -l)"
done
