#!/usr/bin/env bash
# vmnest compare vs qemu-img compare, side by side in one run, on the same pair of multi-GiB
# images: one qcow2, one VMDK (monolithicSparse), made by qemu-img from the same raw disk.
#
# Usage: bench/compare.sh [SIZE_GIB]   (default 4; about a third of the disk is data)
# Prints wall time (best of 3, warm page cache) and peak RSS for each tool and the ratio
# qemu-img time / vmnest time (> 1 means vmnest is faster).
set -euo pipefail
cd "$(dirname "$0")/.."
size_gib=${1:-4}
work=bench/work/compare
mkdir -p "$work"
command -v qemu-img >/dev/null || { echo "qemu-img missing: scripts/install-test-deps.sh" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "/usr/bin/time missing: apt-get install time" >&2; exit 1; }

cargo build --release -q -p vmnest
vmnest=target/release/vmnest

raw=$work/disk.raw
if [ ! -f "$work/disk.vmdk" ] || [ "$(stat -c %s "$raw" 2>/dev/null || echo 0)" != $((size_gib << 30)) ]; then
  echo "building a ${size_gib} GiB test disk (data: random, text-like and zero runs, with holes)..."
  rm -f "$raw"
  truncate -s "${size_gib}G" "$raw"
  # Every 96 MiB: 24 MiB random, 8 MiB of compressible text, 4 MiB of written zeros.
  step=96
  for ((mb = 0; mb + 36 <= size_gib * 1024; mb += step)); do
    head -c 24M /dev/urandom | dd of="$raw" bs=1M seek=$mb conv=notrunc,sparse status=none
    (yes "vmnest benchmark line $mb" || true) | head -c 8M | dd of="$raw" bs=1M seek=$((mb + 24)) conv=notrunc status=none
    head -c 4M /dev/zero | dd of="$raw" bs=1M seek=$((mb + 32)) conv=notrunc status=none
  done
  qemu-img convert -f raw -O qcow2 "$raw" "$work/disk.qcow2"
  qemu-img convert -f raw -O vmdk -o subformat=monolithicSparse "$raw" "$work/disk.vmdk"
fi
a=$work/disk.qcow2
b=$work/disk.vmdk

# run NAME CMD...: best wall seconds of 3 and peak RSS (KiB), exit status must be 0 (identical).
run() {
  local name=$1; shift
  local best="" rss=0
  for _ in 1 2 3; do
    /usr/bin/time -f "%e %M" -o "$work/time.$name" "$@" >/dev/null
    read -r secs kib <"$work/time.$name"
    if [ -z "$best" ] || awk "BEGIN{exit !($secs < $best)}"; then best=$secs; fi
    [ "$kib" -gt "$rss" ] && rss=$kib
  done
  echo "$best $rss"
}

"$vmnest" compare "$a" "$b" >/dev/null # warm the page cache for both tools alike
read -r q_s q_kib < <(run qemu qemu-img compare -f qcow2 -F vmdk "$a" "$b")
read -r v_s v_kib < <(run vmnest "$vmnest" compare -f qcow2 -F vmdk "$a" "$b")
ratio=$(awk "BEGIN{printf \"%.2f\", $q_s / ($v_s > 0 ? $v_s : 0.001)}")
printf '%-28s %10s %12s\n' "compare qcow2 vs vmdk" "wall s" "peak RSS MiB"
printf '%-28s %10s %12d\n' "qemu-img compare" "$q_s" $((q_kib / 1024))
printf '%-28s %10s %12d\n' "vmnest compare" "$v_s" $((v_kib / 1024))
echo "ratio qemu-img/vmnest: ${ratio}x (disk ${size_gib} GiB, $(nproc) cores)"
