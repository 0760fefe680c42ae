#!/usr/bin/env bash
# Installs what vmnest's tests need on a Debian machine: the peers used as oracles
# (qemu-img, libyal's readers, libnbd's nbdinfo/nbdcopy/nbdsh/nbdfuse), fusermount3 for `vmnest mount`,
# sfdisk and e2fsprogs (mkfs.ext4, debugfs) to build and check partitioned disks, and bzip2 for the
# sample images. Idempotent; needs root (or sudo).
set -euo pipefail

packages=(qemu-utils libvmdk-utils libvhdi-utils libqcow-utils bzip2 libnbd-bin python3-libnbd openssl
  fuse3 fdisk e2fsprogs mount)
need=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
