#!/usr/bin/env bash
# NBD over TLS with a pre-shared key: `vmnest serve --tls-psk` vs `qemu-nbd --object tls-creds-psk`,
# serving the same qcow2 read-only, side by side in one run. Both servers read the same key file
# (qemu's keys.psk format, identity `qemu`); the client is libnbd's nbdcopy, which, like qemu, does
# TLS with GnuTLS (both negotiate TLS 1.3 here).
#
# Cases (best of 3 each, the two servers' runs alternating, page cache warm for both alike):
#   seq nbdcopy      nbdcopy NBDS-URL null:         (libnbd's defaults: 4 connections when the server
#                                                     allows multi-conn)
#   seq nbdcopy 1c   nbdcopy --connections 1 NBDS-URL null:
# Ratio: qemu-nbd time / vmnest time (> 1: vmnest faster). Also the servers' CPU seconds over
# their three runs of each case (TLS costs CPU on both ends: on 2 cores the client competes).
#
# Input: a qcow2 whose every cluster holds data (so that block status skips nothing), 1 GiB by
# default, made once with qemu-img and qemu-io as bench/work/tls-SIZE.qcow2 and kept between runs.
#
# Usage: bench/tls.sh [SIZE]   (SIZE as qemu-img takes it, default 1G; VMNEST_BIN another vmnest
#                               binary than a fresh release build)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib/serve.sh
work=bench/work
size=${1:-1G}
mkdir -p "$work/tls-creds"
for tool in qemu-nbd:qemu-utils qemu-io:qemu-utils nbdcopy:libnbd-bin nbdinfo:libnbd-bin; do
  command -v "${tool%%:*}" >/dev/null || {
    echo "${tool%%:*} missing: apt-get install ${tool##*:}" >&2
    exit 1
  }
done
src=$work/tls-$size.qcow2
if [ ! -f "$src" ]; then
  qemu-img create -q -f qcow2 "$src.tmp" "$size"
  # Distinct bytes per MiB, written in one qemu-io run.
  bytes=$(qemu-img info --output=json "$src.tmp" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
  python3 -c 'import sys
n = int(sys.argv[1]) >> 20
print("\n".join(f"write -q -P {i % 251 + 1} {i << 20} 1M" for i in range(n)))' "$bytes" |
    qemu-io -f qcow2 "$src.tmp" >/dev/null
  mv "$src.tmp" "$src"
fi
keys=$work/tls-creds/keys.psk
[ -s "$keys" ] || echo "qemu:$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')" >"$keys"
if [ -n "${VMNEST_BIN:-}" ]; then
  vmnest=$VMNEST_BIN
else
  cargo build --release -q -p vmnest
  vmnest=$PWD/target/release/vmnest
fi

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP PIPE

"$vmnest" serve --tls-psk "$keys" --export-name disk --listen 127.0.0.1:0 "$src" \
  >"$work/tls-vmnest.out" 2>"$work/tls-vmnest.err" &
vpid=$!
pids+=("$vpid")
vaddr=$(serving_url "$work/tls-vmnest.out" "$work/tls-vmnest.err")
vaddr=${vaddr#nbds://}
vaddr=${vaddr%%/*}

qport=$(free_port)
qemu-nbd -r -f qcow2 -t -e 16 -x disk -b 127.0.0.1 -p "$qport" \
  --object "tls-creds-psk,id=tls0,endpoint=server,dir=$PWD/$work/tls-creds" --tls-creds tls0 \
  "$src" 2>"$work/tls-qemu-nbd.err" &
qpid=$!
pids+=("$qpid")

url() { echo "nbds://qemu@$1/disk?tls-psk-file=$PWD/$keys"; }
vurl=$(url "$vaddr")
qurl=$(url "127.0.0.1:$qport")
for _ in $(seq 50); do nbdinfo --can connect "$qurl" 2>/dev/null && break; sleep 0.1; done
for u in "$vurl" "$qurl"; do
  nbdinfo "$u" | grep -q 'with TLS' || { echo "no TLS at $u" >&2; exit 1; }
done

cat "$src" >/dev/null # warm the page cache for both servers alike

secs() {
  local t0 t1
  t0=$(date +%s.%N)
  "$@" >/dev/null 2>"$work/err.last" || { cat "$work/err.last" >&2; return 1; }
  t1=$(date +%s.%N)
  awk "BEGIN{printf \"%.3f\", $t1 - $t0}"
}
cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"; }
min() { awk 'BEGIN{m=""} NF {if (m == "" || $1 < m) m = $1} END{print m}'; }
ratio() { awk "BEGIN{printf \"%.2f\", $1 / $2}"; }
mbs() { awk "BEGIN{printf \"%.0f\", $bytes_served / $1 / 1e6}"; }
bytes_served=$(qemu-img info --output=json "$src" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')

seq_case() {
  local name=$1; shift
  local q="" v="" qc0 qc1 vc0 vc1
  qc0=$(cpu "$qpid"); vc0=$(cpu "$vpid")
  for _ in 1 2 3; do
    q+="$(secs "${@//URL/$qurl}")"$'\n'
    v+="$(secs "${@//URL/$vurl}")"$'\n'
  done
  qc1=$(cpu "$qpid"); vc1=$(cpu "$vpid")
  q=$(min <<<"$q"); v=$(min <<<"$v")
  printf '%-16s %8s %6s %8s %6s %7sx   %9s %9s\n' "$name" "$q" "$(mbs "$q")" "$v" "$(mbs "$v")" \
    "$(ratio "$q" "$v")" "$(awk "BEGIN{print $qc1 - $qc0}")" "$(awk "BEGIN{print $vc1 - $vc0}")"
}

echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-16s %8s %6s %8s %6s %8s   %9s %9s\n' case qemu-nbd MB/s vmnest MB/s ratio "qemu cpu" "vmnest cpu"
seq_case "seq nbdcopy" nbdcopy URL null:
seq_case "seq nbdcopy 1c" nbdcopy --connections 1 URL null:
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "($size qcow2; $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), qemu-nbd $(qemu-nbd --version | head -1 | awk '{print $2}'), libnbd $(nbdcopy --version | awk 'NR==2 {print $2}'), $(openssl version | awk '{print $1, $2}'))"
