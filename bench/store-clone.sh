#!/usr/bin/env bash
# Clone cost: `vmnest clone` of a 1 TiB sparse image and of a 4 GiB fully written one, 50 clones
# each; prints milliseconds per clone, and the store's packs and stored bytes before and after (a
# clone writes a small manifest and a ref, never a chunk).
#
# Usage: bench/store-clone.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-img >/dev/null || { echo "qemu-img missing: scripts/install-test-deps.sh" >&2; exit 1; }
cargo build --release -q -p vmnest
vmnest=$PWD/target/release/vmnest
work=bench/work/clone
rm -rf "$work/store"
mkdir -p "$work"
export VMNEST_STORE=$work/store
[ -f "$work/full.raw" ] || head -c 4G /dev/urandom >"$work/full.raw"
[ -f "$work/sparse.qcow2" ] || qemu-img create -q -f qcow2 "$work/sparse.qcow2" 1T
"$vmnest" import "$work/sparse.qcow2" tera >/dev/null
"$vmnest" import "$work/full.raw" full >/dev/null
. bench/lib/store.sh
stored() { stored_bytes "$vmnest" "$VMNEST_STORE"; }
packs() { ls "$work/store/packs" | wc -l; }
before_bytes=$(stored); before_packs=$(packs)
per_clone() { # NAME: ms per clone over 50 clones made by one command, and one clone alone
  local s e one
  s=$(date +%s%N); "$vmnest" clone "$1" "$1-{01..50}" >/dev/null; e=$(date +%s%N)
  local fifty=$(( (e - s) / 50000 ))
  s=$(date +%s%N); "$vmnest" clone "$1" "$1-single" >/dev/null; e=$(date +%s%N)
  one=$(( (e - s) / 1000 ))
  echo "$fifty $one"
}
read -r t50 t1 <<<"$(per_clone tera)"
read -r f50 f1 <<<"$(per_clone full)"
after_bytes=$(stored); after_packs=$(packs)
printf '%-28s %16s %22s\n' "image" "us per clone (x50)" "one clone, whole process"
printf '%-28s %16s %20s us\n' "1 TiB sparse (qcow2)" "$t50" "$t1"
printf '%-28s %16s %20s us\n' "4 GiB full (random data)" "$f50" "$f1"
echo "stored bytes before/after 102 clones: $before_bytes / $after_bytes; packs $before_packs / $after_packs"
