# Sourced by the benchmarks that boot VMs (make-vm-memory.sh, boot.sh).
#
# Debian's qemu-system-x86 conflicts with the installed qemu-utils, so it is never installed: its
# packages (and the shared libraries missing here, and seabios) are fetched with `apt-get download`
# into bench/work/qemu-debs and unpacked with `dpkg -x` into bench/work/qemu-system (both cached).
#
# private_qemu BENCH_DIR: sets $qroot and $qemu (qemu-system-x86_64 7.2) and $qemu_libs (the
#   LD_LIBRARY_PATH its binary needs; pass it to that command only, never to the system qemu-img).
# kernel_from_image IMAGE OUTDIR: copies the newest /boot/vmlinuz-* and its initrd out of the
#   ext4 partition at 1 MiB of a raw IMAGE (read-only loop mount, needs root) into
#   OUTDIR/vmlinuz, OUTDIR/initrd.img and OUTDIR/version (cached).

private_qemu() {
  local here=$1
  local debs=$here/work/qemu-debs
  qroot=$here/work/qemu-system
  qemu=$qroot/usr/bin/qemu-system-x86_64
  qemu_libs=$qroot/usr/lib/x86_64-linux-gnu:$qroot/lib/x86_64-linux-gnu
  local pkgs=(qemu-system-x86 qemu-system-common qemu-system-data seabios
    libcapstone4 libfdt1 libpmem1 librdmacm1 libibverbs1 libslirp0 libvdeplug2 libndctl6
    libdaxctl1 libnl-3-200 libnl-route-3-200)
  if [ ! -x "$qemu" ]; then
    echo "== unpacking qemu-system-x86 into $qroot"
    mkdir -p "$debs"
    local missing=() p d
    for p in "${pkgs[@]}"; do
      compgen -G "$debs/${p}_*.deb" >/dev/null || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
      (cd "$debs" && apt-get download -q "${missing[@]}" 2>&1 | grep -v 'unsandboxed' || true)
    fi
    for p in "${pkgs[@]}"; do
      compgen -G "$debs/${p}_*.deb" >/dev/null || { echo "apt-get download $p failed" >&2; return 1; }
    done
    rm -rf "$qroot.tmp"
    mkdir -p "$qroot.tmp"
    for d in "$debs"/*.deb; do dpkg -x "$d" "$qroot.tmp"; done
    rm -rf "$qroot"
    mv "$qroot.tmp" "$qroot"
  fi
  if LD_LIBRARY_PATH=$qemu_libs ldd "$qemu" | grep -q 'not found'; then
    echo "qemu-system-x86_64 lacks shared libraries:" >&2
    LD_LIBRARY_PATH=$qemu_libs ldd "$qemu" | grep 'not found' >&2
    return 1
  fi
  echo "== $(LD_LIBRARY_PATH=$qemu_libs "$qemu" --version | head -1)"
}

kernel_from_image() {
  local image=$1 boot=$2 mnt k v
  [ -f "$boot/vmlinuz" ] && [ -f "$boot/initrd.img" ] && return 0
  [ "$(id -u)" = 0 ] || { echo "kernel_from_image: needs root (loop mount)" >&2; return 1; }
  mkdir -p "$boot"
  mnt=$(mktemp -d /tmp/vmnest-boot.XXXXXX)
  mount -o ro,loop,offset=$((1 << 20)) "$image" "$mnt" || { rmdir "$mnt"; return 1; }
  k=$(ls "$mnt"/boot/vmlinuz-* | sort -V | tail -1)
  v=${k##*/vmlinuz-}
  if cp "$k" "$boot/vmlinuz.tmp" && cp "$mnt/boot/initrd.img-$v" "$boot/initrd.img.tmp"; then
    echo "$v" >"$boot/version"
  fi
  umount "$mnt" || umount -l "$mnt"
  rmdir "$mnt"
  [ -f "$boot/version" ] || return 1
  mv "$boot/vmlinuz.tmp" "$boot/vmlinuz"
  mv "$boot/initrd.img.tmp" "$boot/initrd.img"
}

# wait_for_login CONSOLE_LOG PID TIMEOUT_S: waits until the serial console shows a login prompt;
# fails (printing the console's last lines) when the VM exits first or the time runs out.
wait_for_login() {
  local log=$1 pid=$2 timeout=$3 t0=$SECONDS
  until grep -q 'login:' "$log" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "qemu exited before the login prompt; last console lines:" >&2
      tail -n 20 "$log" >&2 || true
      return 1
    fi
    if [ $((SECONDS - t0)) -ge "$timeout" ]; then
      echo "no login prompt after ${timeout}s; last console lines:" >&2
      tail -n 20 "$log" >&2 || true
      return 1
    fi
    sleep 1
  done
}
