#!/usr/bin/env bash
# Memory snapshots for the store benchmark (issue 4): boots two VMs from the same gold disk under
# Debian bookworm's qemu-system-x86_64 7.2 (TCG, 512 MiB RAM, 1 vCPU), each on its own qcow2
# overlay, waits for the login prompt on each serial console, then saves each VM the way
# `virsh save` does: `stop`, then HMP `migrate "exec:cat > OUTDIR/vmN.mig"`, waits for the
# migration to complete, quits. Prints the stream sizes.
#
# qemu-system-x86_64 is unpacked privately (bench/lib/qemu-system.sh says why and how); the
# kernel and initrd are copied out of the image's /boot and passed with -kernel/-initrd, root=/dev/vda1. The VMs run one after the other (TCG is CPU-heavy).
# Cached: an existing OUTDIR/vmN.mig is kept.
#
# Usage: bench/make-vm-memory.sh OUTDIR [GOLD.raw] [--live]
#   GOLD.raw  default bench/work/store-set/gold.raw, else bench/work/linux.raw
#   --live    migrate the running VM (precopy, several passes) instead of stopping it first
# Env: VMS (default 2), BOOT_TIMEOUT (s, default 600), SETTLE (s after the prompt, default 10)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
live=0
args=()
for a in "$@"; do
  case $a in --live) live=1 ;; *) args+=("$a") ;; esac
done
out=${args[0]:?usage: make-vm-memory.sh OUTDIR [GOLD.raw] [--live]}
gold=${args[1]:-}
if [ -z "$gold" ]; then
  gold=$here/work/store-set/gold.raw
  [ -f "$gold" ] || gold=$here/work/linux.raw
fi
[ -f "$gold" ] || { echo "no gold image ($gold): run bench/make-store-set.sh or bench/make-linux-disk.sh" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "make-vm-memory.sh: needs root (loop mount)" >&2; exit 1; }
vms=${VMS:-2}
boot_timeout=${BOOT_TIMEOUT:-600}
settle=${SETTLE:-10}
mkdir -p "$out"
out=$(cd "$out" && pwd)
gold=$(cd "$(dirname "$gold")" && pwd)/$(basename "$gold")

# --- private qemu-system-x86 7.2 ---
. "$here/lib/qemu-system.sh"
private_qemu "$here"

# --- state for the cleanup trap ---
qpid=""
cleanup() {
  if [ -n "$qpid" ] && kill -0 "$qpid" 2>/dev/null; then
    kill "$qpid" 2>/dev/null || true
    sleep 1
    kill -9 "$qpid" 2>/dev/null || true
  fi
  qpid=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- kernel and initrd from the image's /boot ---
boot=$out/boot
kernel_from_image "$gold" "$boot"
echo "== kernel $(cat "$boot/version") from $gold"

# hmp SOCKET COMMAND...: sends HMP commands over the monitor socket, prints the replies.
# A command "@wait-migration" polls `info migrate` until completed (fails if failed/cancelled).
hmp() {
  python3 - "$@" <<'EOF'
import socket, sys, time
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
sock.settimeout(60)
def until_prompt():
    buf = b""
    while not buf.endswith(b"(qemu) "):
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace")
until_prompt()  # banner
for cmd in sys.argv[2:]:
    if cmd == "@wait-migration":
        deadline = time.time() + 600
        while True:
            sock.sendall(b"info migrate\n")
            reply = until_prompt()
            status = [l for l in reply.splitlines() if l.startswith("Migration status:")]
            status = status[0].split(":", 1)[1].strip() if status else "?"
            if status == "completed":
                print("\n".join(l for l in reply.splitlines()
                                if l.split(":")[0] in ("total time", "transferred ram", "duplicate",
                                                       "normal", "normal bytes", "total ram", "dirty sync count")))
                break
            if status in ("failed", "cancelled") or time.time() > deadline:
                sys.exit("migration " + status + ":\n" + reply)
            time.sleep(0.5)
        continue
    sock.sendall(cmd.encode() + b"\n")
    if cmd == "quit":
        break
    reply = until_prompt()
    lines = [l for l in reply.replace("\r", "").splitlines()[1:] if l and not l.startswith("(qemu)")]
    if lines:
        print("\n".join(lines))
EOF
}

for n in $(seq 1 "$vms"); do
  mig=$out/vm$n.mig
  if [ -f "$mig" ]; then
    echo "== vm$n: $mig exists ($(stat -c %s "$mig") bytes)"
    continue
  fi
  echo "== vm$n: booting (TCG, 512 MiB; console $out/vm$n.console.log)"
  overlay=$out/vm$n.qcow2
  rm -f "$overlay" "$mig.tmp" "$out/vm$n.console.log" "$out/vm$n.mon"
  qemu-img create -q -f qcow2 -b "$gold" -F raw "$overlay"
  t0=$SECONDS
  LD_LIBRARY_PATH=$qemu_libs "$qemu" -L "$qroot/usr/share/qemu" -machine pc,accel=tcg -m 512 -smp 1 \
    -nographic -nodefaults -no-user-config \
    -kernel "$boot/vmlinuz" -initrd "$boot/initrd.img" \
    -append "root=/dev/vda1 rw console=ttyS0 panic=-1" \
    -drive "file=$overlay,format=qcow2,if=virtio,cache=unsafe" \
    -serial "file:$out/vm$n.console.log" \
    -monitor "unix:$out/vm$n.mon,server=on,wait=off" \
    -no-reboot </dev/null >"$out/vm$n.qemu.log" 2>&1 &
  qpid=$!
  wait_for_login "$out/vm$n.console.log" "$qpid" "$boot_timeout"
  echo "   login prompt after $((SECONDS - t0))s: $(grep -a 'login:' "$out/vm$n.console.log" | head -1 | tr -d '\r')"
  sleep "$settle"
  s=$SECONDS
  cmds=("migrate_set_parameter max-bandwidth 4G")
  [ "$live" = 1 ] || cmds+=(stop)
  cmds+=("migrate \"exec:cat > $mig.tmp\"" "@wait-migration" quit)
  hmp "$out/vm$n.mon" "${cmds[@]}" | sed 's/^/   /'
  wait "$qpid" || true
  qpid=""
  mv "$mig.tmp" "$mig"
  rm -f "$overlay" "$out/vm$n.mon"
  echo "   saved $mig: $(stat -c %s "$mig") bytes in $((SECONDS - s))s"
done

echo "== streams"
total=0
for n in $(seq 1 "$vms"); do
  sz=$(stat -c %s "$out/vm$n.mig")
  total=$((total + sz))
  printf '   vm%d.mig  %12d bytes  %7.1f MiB\n' "$n" "$sz" "$(echo "$sz / 1048576" | bc -l)"
done
printf '   total    %12d bytes  %7.1f MiB\n' "$total" "$(echo "$total / 1048576" | bc -l)"
