#!/usr/bin/env bash
# Installs what vmnest's tests need on a Debian machine: the peers used as oracles
# (qemu-img, libyal's readers, libnbd's nbdinfo/nbdcopy/nbdsh/nbdfuse), fusermount3 for `vmnest mount`,
# sfdisk and e2fsprogs (mkfs.ext4, debugfs) to build and check partitioned disks, bzip2 for the
# sample images, pkg-config and libssl-dev to build at all (serve --tls-psk links the system's
# OpenSSL), and moto's S3 server (PyPI, in a venv under $VMNEST_MOTO_DIR, default
# /opt/vmnest-moto) for the remote tests. Idempotent; needs root (or sudo).
set -euo pipefail

packages=(qemu-utils libvmdk-utils libvhdi-utils libqcow-utils bzip2 libnbd-bin python3-libnbd openssl python3-venv
  fuse3 fdisk e2fsprogs mount pkg-config libssl-dev)
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

# moto's S3 server for tests/integration/remote.rs (scripts/s3-test-server.sh starts it).
moto_dir="${VMNEST_MOTO_DIR:-/opt/vmnest-moto}"
if ! "$moto_dir/bin/moto_server" --help >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing moto's S3 server into $moto_dir"
  $sudo /usr/bin/python3 -m venv "$moto_dir"
  $sudo "$moto_dir/bin/pip" install -q 'moto[s3,server]==5.2.5' flask flask-cors
fi
