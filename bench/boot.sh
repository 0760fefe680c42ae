#!/usr/bin/env bash
# Boots a Linux disk straight from the store over NBD (issue 5's heavy check), side by side with
# the same disk served by qemu-nbd from a qcow2 file.
#
# The disk (default bench/work/linux.raw: Debian bookworm from debootstrap, built by
# bench/make-linux-disk.sh when missing) is imported into a fresh store and served by
# `vmnest serve store:vm` on a Unix socket; qemu-system-x86_64 7.2 (unpacked privately, see
# bench/lib/qemu-system.sh) boots it under TCG with the kernel and initrd of its own /boot
# (-kernel/-initrd, root=/dev/vda1) until the serial console shows a login prompt. Then the
# same with `qemu-nbd -r` serving a qcow2 of the disk. Guest writes go to a qemu-side temporary
# overlay (snapshot=on) in both runs; with --rw vmnest serves a writable volume instead and
# the script then commits it as a new snapshot.
#
# Prints seconds to the login prompt for each and the ratio (qemu-nbd / vmnest; TCG boot time
# is mostly guest CPU, so about 1 is expected: the point is that it boots).
#
# Usage: bench/boot.sh [IMAGE.raw] [--rw] [--only vmnest]
# Env: BOOT_TIMEOUT (s, default 900), POWERDOWN_WAIT (s, default 60), VMNEST (binary; default: cargo build --release)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
rw=0
only=""
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --rw) rw=1 ;;
    --only) only=$2; shift ;;
    *) args+=("$1") ;;
  esac
  shift
done
image=${args[0]:-$here/work/linux.raw}
boot_timeout=${BOOT_TIMEOUT:-900}
[ "$(id -u)" = 0 ] || { echo "boot.sh: needs root (loop mount of the image's /boot)" >&2; exit 1; }
[ -f "$image" ] || "$here/make-linux-disk.sh" "$image" 3
for tool in qemu-nbd:qemu-utils qemu-img:qemu-utils; do
  command -v "${tool%%:*}" >/dev/null || { echo "${tool%%:*} missing: apt-get install ${tool##*:}" >&2; exit 1; }
done
if [ -n "${VMNEST:-}" ]; then
  vmnest=$VMNEST
else
  (cd "$here/.." && cargo build --release -q -p vmnest)
  vmnest=$here/../target/release/vmnest
fi

. "$here/lib/qemu-system.sh"
private_qemu "$here"
work=$(mktemp -d "${TMPDIR:-/tmp}/vmnest-boot.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

kernel_from_image "$image" "$here/work/boot-kernel"
kdir=$here/work/boot-kernel
echo "== kernel $(cat "$kdir/version") from $image"

# monitor SOCKET COMMAND: one HMP command.
monitor() {
  python3 - "$1" "$2" <<'PY' >/dev/null || true
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(10)
s.recv(4096); s.sendall(sys.argv[2].encode() + b"\n")
try:
    s.recv(4096)
except OSError:
    pass
PY
}

# boot NAME DRIVE: boots with -drive DRIVE, prints the seconds to the login prompt on stdout.
boot() {
  local name=$1 drive=$2 t0 qpid
  t0=$(date +%s.%N)
  LD_LIBRARY_PATH=$qemu_libs "$qemu" -L "$qroot/usr/share/qemu" -machine pc,accel=tcg -m 512 -smp 1 \
    -nographic -nodefaults -no-user-config \
    -kernel "$kdir/vmlinuz" -initrd "$kdir/initrd.img" \
    -append "root=/dev/vda1 rw console=ttyS0 panic=-1" \
    -drive "$drive" -serial "file:$work/$name.console.log" \
    -monitor "unix:$work/$name.mon,server=on,wait=off" \
    -no-reboot </dev/null >"$work/$name.qemu.log" 2>&1 &
  qpid=$!
  pids+=("$qpid")
  if ! wait_for_login "$work/$name.console.log" "$qpid" "$boot_timeout" >&2; then
    cat "$work/$name.qemu.log" >&2
    return 1
  fi
  awk -v t0="$t0" -v t1="$(date +%s.%N)" 'BEGIN { printf "%.1f", t1 - t0 }'
  echo "   $name: $(grep -a -m1 'login:' "$work/$name.console.log" | tr -d '\r')" >&2
  # Read-only runs just stop the VM. A writable run asks the guest to power off (ACPI), so its
  # writes reach the disk, and stops it after POWERDOWN_WAIT seconds if it has not; what the
  # guest flushed before then is on the volume either way.
  monitor "$work/$name.mon" "$([ "$rw" = 1 ] && echo system_powerdown || echo quit)"
  if [ "$rw" = 1 ]; then
    for _ in $(seq "${POWERDOWN_WAIT:-60}"); do kill -0 "$qpid" 2>/dev/null || break; sleep 1; done
    kill -0 "$qpid" 2>/dev/null && monitor "$work/$name.mon" quit
  fi
  kill "$qpid" 2>/dev/null || true
  wait "$qpid" 2>/dev/null || true
}

# --- vmnest: the disk imported into a store and served from it ---
store=$work/store
"$vmnest" --store "$store" init >/dev/null
"$vmnest" --store "$store" import "$image" vm
sock=$work/vmnest.sock
serve_args=(--socket "$sock" --export-name vm store:vm)
snapshot=",snapshot=on"
if [ "$rw" = 1 ]; then
  serve_args=(--rw "${serve_args[@]}")
  snapshot=""
fi
"$vmnest" --store "$store" serve "${serve_args[@]}" >"$work/serve.out" 2>"$work/serve.err" &
spid=$!
pids+=("$spid")
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { cat "$work/serve.err" >&2; exit 1; }
echo "== booting from vmnest serve store:vm$([ "$rw" = 1 ] && echo ' --rw')"
t_vmnest=$(boot vmnest "file=nbd+unix:///vm?socket=$sock,format=raw,if=virtio,cache=unsafe$snapshot")
echo "   login prompt after ${t_vmnest}s"
kill "$spid"
wait "$spid" 2>/dev/null || true
if [ "$rw" = 1 ]; then
  "$vmnest" --store "$store" commit vm
  "$vmnest" --store "$store" log vm
  if "$vmnest" --store "$store" diff vm@~1 vm >"$work/diff.out"; then
    echo "boot.sh: the committed snapshot equals the imported one; the guest wrote nothing?" >&2
    exit 1
  fi
  echo "   the boot changed $(wc -l <"$work/diff.out") ranges; vm@~1 is the untouched import"
fi
[ "$only" = vmnest ] && exit 0

# --- qemu-nbd serving a qcow2 of the same disk ---
qemu-img convert -f raw -O qcow2 "$image" "$work/vm.qcow2"
qsock=$work/qemu-nbd.sock
qemu-nbd -r -f qcow2 -t -x vm -k "$qsock" "$work/vm.qcow2" 2>"$work/qemu-nbd.err" &
pids+=("$!")
for _ in $(seq 100); do [ -S "$qsock" ] && break; sleep 0.1; done
echo "== booting from qemu-nbd -r vm.qcow2"
t_qemu=$(boot qemu-nbd "file=nbd+unix:///vm?socket=$qsock,format=raw,if=virtio,cache=unsafe,snapshot=on")
echo "   login prompt after ${t_qemu}s"
echo "== seconds to the login prompt: vmnest ${t_vmnest}, qemu-nbd ${t_qemu}, ratio (qemu-nbd / vmnest) $(awk "BEGIN{printf \"%.2f\", $t_qemu / $t_vmnest}")"
