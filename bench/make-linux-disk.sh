#!/usr/bin/env bash
# Builds a realistic Linux VM disk for the benchmarks: a Debian bookworm root file system
# (debootstrap, with a kernel and a few large packages so it holds >= 500 MiB of real files) in an
# ext4 partition at 1 MiB of a sparse disk with an MBR. Needs root. Cached: run again, no work.
#
# Usage: bench/make-linux-disk.sh OUT.raw [DISK_SIZE_GIB]   (default 3)
set -euo pipefail
out=${1:?usage: make-linux-disk.sh OUT.raw [SIZE_GIB]}
size_gib=${2:-3}
[ -f "$out" ] && { echo "$out exists"; exit 0; }
need=()
for tool in debootstrap:debootstrap sfdisk:fdisk mkfs.ext4:e2fsprogs; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
work=$(dirname "$out")/rootfs-build
rm -rf "$work"
mkdir -p "$work"
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
debootstrap --variant=minbase \
  --include=linux-image-amd64,systemd-sysv,python3,perl,openssh-server,vim-tiny,locales \
  bookworm "$work/root" "${mirror:-http://deb.debian.org/debian}" >"$work.log" 2>&1
mib=$(du -sm "$work/root" | cut -f1)
echo "root file system: ${mib} MiB"
[ "$mib" -ge 500 ] || { echo "root file system under 500 MiB" >&2; exit 1; }
part=$work/part.ext4
part_mib=$((size_gib * 1024 - 2))
truncate -s "${part_mib}M" "$part"
mkfs.ext4 -q -F -L root -d "$work/root" "$part"
truncate -s "${size_gib}G" "$out.tmp"
echo "start=2048, type=83, bootable" | sfdisk -q "$out.tmp"
dd if="$part" of="$out.tmp" bs=1M seek=1 conv=sparse,notrunc status=none
mv "$out.tmp" "$out"
rm -rf "$work"
echo "built $out"
