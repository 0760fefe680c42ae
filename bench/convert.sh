#!/usr/bin/env bash
# vmnest convert vs qemu-img convert (with its best flags: -m 16 -W, or -m 16 where qemu-img refuses
# -W, for compressed and streamed outputs), side by side in one run, on
# a real Linux disk (bench/make-linux-disk.sh: Debian bookworm with a kernel, >= 500 MiB of files,
# in an ext4 partition of a 3 GiB disk). For each case: wall time (best of 2, warm page cache),
# peak RSS, and ratios (> 1: vmnest faster). Every vmnest output is checked identical to the source
# with qemu-img compare.
#
# Durability differs by default: vmnest fsyncs its output before renaming it into place, so the
# image is on disk when it exits; qemu-img leaves it in the page cache. So each case is measured
# twice, like for like: qemu-img vs `vmnest --no-sync` (neither syncs), and qemu-img followed by
# `sync FILE` vs vmnest's default (both durable).
#
# Usage: bench/convert.sh [CASE...]   (default: all cases)
set -euo pipefail
cd "$(dirname "$0")/.."
work=bench/work
mkdir -p "$work/out"
[ -x /usr/bin/time ] || { echo "/usr/bin/time missing: apt-get install time" >&2; exit 1; }
bench/make-linux-disk.sh "$work/linux.raw" 3
cargo build --release -q -p vmnest
vmnest=$PWD/target/release/vmnest
src_raw=$work/linux.raw
[ -f "$work/linux.qcow2" ] || qemu-img convert -f raw -O qcow2 "$src_raw" "$work/linux.qcow2"
[ -f "$work/linux.vmdk" ] || qemu-img convert -f raw -O vmdk "$src_raw" "$work/linux.vmdk"

# name | source | source format | qemu-img output args | vmnest output args | output format
cases=(
  "raw->qcow2|$src_raw|raw|-O qcow2|-O qcow2|qcow2"
  "qcow2->raw|$work/linux.qcow2|qcow2|-O raw|-O raw|raw"
  "vmdk->qcow2|$work/linux.vmdk|vmdk|-O qcow2|-O qcow2|qcow2"
  "raw->qcow2 -c zlib|$src_raw|raw|-O qcow2 -c|-O qcow2 -c|qcow2"
  "raw->vmdk stream|$src_raw|raw|-O vmdk -o subformat=streamOptimized|-O vmdk -o subformat=streamOptimized|vmdk"
  "raw->vhdx|$src_raw|raw|-O vhdx|-O vhdx|vhdx"
  "raw->vhd dynamic|$src_raw|raw|-O vpc -o subformat=dynamic,force_size=on|-O vpc -o subformat=dynamic|vpc"
)

# best_of NAME CMD...: prints "seconds peak_kib" (best wall time of 2 runs, max RSS).
best_of() {
  local tag=$1; shift
  local best="" rss=0 secs kib
  for _ in 1 2; do
    rm -f "$work/out/"*
    /usr/bin/time -f "%e %M" -o "$work/time.$tag" "$@" >/dev/null 2>"$work/err.$tag" \
      || { cat "$work/err.$tag" >&2; return 1; }
    read -r secs kib <"$work/time.$tag"
    if [ -z "$best" ] || awk "BEGIN{exit !($secs < $best)}"; then best=$secs; fi
    [ "$kib" -gt "$rss" ] && rss=$kib
  done
  echo "$best $rss"
}

printf '%-20s %7s %14s %6s | %11s %9s %6s | %8s %10s\n' case qemu_s vmnest_nosync_s ratio qemu+sync_s vmnest_s ratio qemu_MiB vmnest_MiB
i=0
for c in "${cases[@]}"; do
  IFS='|' read -r name src sfmt qargs vargs ofmt <<<"$c"
  i=$((i + 1))
  if [ $# -gt 0 ] && ! printf '%s\n' "$@" | grep -qx "$name"; then continue; fi
  cat "$src" >/dev/null # warm the page cache for both tools alike
  qout=$work/out/q$i.img
  vout=$work/out/v$i.img
  # qemu-img refuses -W (out-of-order writes) with compressed or streamed outputs.
  qflags="-m 16 -W"
  case "$qargs" in *-c*|*streamOptimized*) qflags="-m 16" ;; esac
  # shellcheck disable=SC2086
  read -r qs qk < <(best_of "q$i" qemu-img convert $qflags -f "$sfmt" $qargs "$src" "$qout")
  # shellcheck disable=SC2086
  read -r qss _ < <(best_of "s$i" sh -c "qemu-img convert $qflags -f $sfmt $qargs $src $qout.s && sync $qout.s")
  # shellcheck disable=SC2086
  read -r vns _ < <(best_of "n$i" "$vmnest" convert --no-sync -f "$sfmt" $vargs "$src" "$vout")
  # shellcheck disable=SC2086
  read -r vs vk < <(best_of "v$i" "$vmnest" convert -f "$sfmt" $vargs "$src" "$vout")
  qemu-img compare -q -f "$sfmt" -F "$ofmt" "$src" "$vout" || { echo "$name: vmnest output differs!" >&2; exit 1; }
  ratio=$(awk "BEGIN{printf \"%.2f\", $qs / ($vns > 0 ? $vns : 0.001)}")
  ratio_s=$(awk "BEGIN{printf \"%.2f\", $qss / ($vs > 0 ? $vs : 0.001)}")
  printf '%-20s %7s %14s %5sx | %11s %9s %5sx | %8d %10d\n' "$name" "$qs" "$vns" "$ratio" "$qss" "$vs" "$ratio_s" $((qk / 1024)) $((vk / 1024))
  rm -f "$qout" "$qout.s" "$vout"
done
echo "($(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), qemu-img $(qemu-img --version | head -1 | awk '{print $3}'))"
