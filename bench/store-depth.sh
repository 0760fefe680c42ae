#!/usr/bin/env bash
# Read cost at clone depth: a gold disk, then 50 levels of clones, each a clone of the level
# before with one chunk changed. vmnest reads the deepest clone through one map of the same
# depth as gold's; a qcow2 chain of 50 overlays (one changed cluster each) is the peer.
#
# Usage: bench/store-depth.sh [LEVELS]   (default 50)
# Prints the time to read every byte of level 0 and of level N (best of 3, warm cache, written to
# /dev/shm) for both tools, and the ratio deep/gold (1.0 = depth costs nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
levels=${1:-50}
work=bench/work/depth
rm -rf "$work"
mkdir -p "$work"
command -v qemu-img >/dev/null || { echo "qemu-img missing: scripts/install-test-deps.sh" >&2; exit 1; }
cargo build --release -q -p vmnest
vmnest=$PWD/target/release/vmnest
export VMNEST_STORE=$work/store
out=/dev/shm/vmnest-depth-$$.raw
trap 'rm -f "$out"' EXIT

raw=$work/disk.raw
truncate -s 1G "$raw"
head -c 640M /dev/urandom | dd of="$raw" bs=1M conv=notrunc status=none
(yes "vmnest depth benchmark line" || true) | head -c 128M | dd of="$raw" bs=1M seek=640 conv=notrunc status=none

echo "building $levels levels..."
"$vmnest" import "$raw" level-0 >/dev/null
qemu-img convert -f raw -O qcow2 "$raw" "$work/level-0.qcow2"
for ((i = 1; i <= levels; i++)); do
  # One 16 KiB chunk (one 64 KiB qcow2 cluster) changes per level, spread over the data.
  off=$(( (i * 12289) % 40000 * 16384 ))
  head -c 16384 /dev/urandom | dd of="$raw" bs=16384 seek=$((off / 16384)) conv=notrunc status=none
  "$vmnest" clone "level-$((i - 1))" "level-$i" >/dev/null
  "$vmnest" import "$raw" "level-$i" >/dev/null
  qemu-img create -q -f qcow2 -F qcow2 -b "level-$((i - 1)).qcow2" "$work/level-$i.qcow2"
  qemu-io -f qcow2 -c "write -P $((i % 250 + 1)) $off 16384" "$work/level-$i.qcow2" >/dev/null
done

best() { # best wall seconds of 3 runs of CMD...
  local b=""
  for _ in 1 2 3; do
    rm -f "$out"
    local s e
    s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N)
    b=$(echo "$s $e ${b:-999}" | awk '{t=$2-$1; print (t<$3)?t:$3}')
  done
  echo "$b"
}
v0=$(best "$vmnest" export level-0 "$out" --no-sync)
vn=$(best "$vmnest" export "level-$levels" "$out" --no-sync)
q0=$(best qemu-img convert -f qcow2 -O raw "$work/level-0.qcow2" "$out")
qn=$(best qemu-img convert -f qcow2 -O raw "$work/level-$levels.qcow2" "$out")
depth=$("$vmnest" log "level-$levels" | wc -l)
printf '%-34s %8s %8s %10s\n' "read all of (1 GiB, 768 MiB data)" "level 0" "level $levels" "deep/gold"
printf '%-34s %7.2fs %7.2fs %10.2f\n' "vmnest store (lineage $depth)" "$v0" "$vn" "$(echo "$vn $v0" | awk '{print $1/$2}')"
printf '%-34s %7.2fs %7.2fs %10.2f\n' "qemu-img, qcow2 chain" "$q0" "$qn" "$(echo "$qn $q0" | awk '{print $1/$2}')"
