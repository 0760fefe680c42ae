#!/usr/bin/env bash
# NBD export: `vmnest serve` vs `qemu-nbd -r -f qcow2`, serving the same qcow2 file, side by side in
# one run. Input: bench/work/linux.qcow2, the 3 GiB Debian disk of bench/make-linux-disk.sh
# (built, then converted by qemu-img, when missing).
#
# Cases (best of 3 each, page cache warm for both servers alike):
#   seq nbdcopy      nbdcopy NBD-URL null:            (libnbd's defaults: 4 connections when the
#                                                       server allows multi-conn, block status
#                                                       to skip holes)
#   seq nbdcopy 1c   nbdcopy --connections 1 NBD-URL null:
#   seq qemu-img     qemu-img convert -f raw NBD-URL -O raw FILE (one connection)
#   rand 4k iops     fio --ioengine=nbd, 4 KiB random reads, queue depth 32, 10 s
# Ratios: qemu-nbd time / vmnest time, and vmnest IOPS / qemu-nbd IOPS (> 1: vmnest faster).
#
# Usage: bench/export.sh
set -euo pipefail
cd "$(dirname "$0")/.."
work=bench/work
mkdir -p "$work/out"
for tool in qemu-nbd:qemu-utils nbdcopy:libnbd-bin fio:fio; do
  command -v "${tool%%:*}" >/dev/null || {
    echo "${tool%%:*} missing: apt-get install ${tool##*:}" >&2
    exit 1
  }
done
src=$work/linux.qcow2
if [ ! -f "$src" ]; then
  bench/make-linux-disk.sh "$work/linux.raw" 3
  qemu-img convert -f raw -O qcow2 "$work/linux.raw" "$src"
fi
cargo build --release -q -p vmnest
vmnest=$PWD/target/release/vmnest

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -f "$work/out/"*
}
trap cleanup EXIT

# vmnest serve on a free port; the line it prints names the port.
"$vmnest" serve --export-name linux --listen 127.0.0.1:0 "$src" >"$work/vmnest-serve.out" 2>"$work/vmnest-serve.err" &
pids+=($!)
for _ in $(seq 50); do grep -q '^serving' "$work/vmnest-serve.out" && break; sleep 0.1; done
vurl=$(awk '/^serving/ {print $2; exit}' "$work/vmnest-serve.out")
[ -n "$vurl" ] || { cat "$work/vmnest-serve.err" >&2; exit 1; }

# qemu-nbd read-only, several connections allowed (so nbdcopy can use multi-conn).
qport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
qemu-nbd -r -f qcow2 -t -e 16 -x linux -b 127.0.0.1 -p "$qport" "$src" 2>"$work/qemu-nbd.err" &
pids+=($!)
qurl=nbd://127.0.0.1:$qport/linux
for _ in $(seq 50); do nbdinfo --can connect "$qurl" 2>/dev/null && break; sleep 0.1; done

cat "$src" >/dev/null # warm the page cache for both servers alike

# best_secs CMD...: best wall time of 3 runs.
best_secs() {
  local best="" t0 t1 secs
  for _ in 1 2 3; do
    rm -f "$work/out/"*
    t0=$(date +%s.%N)
    "$@" >/dev/null 2>"$work/err.last" || { cat "$work/err.last" >&2; return 1; }
    t1=$(date +%s.%N)
    secs=$(awk "BEGIN{printf \"%.3f\", $t1 - $t0}")
    if [ -z "$best" ] || awk "BEGIN{exit !($secs < $best)}"; then best=$secs; fi
  done
  echo "$best"
}

# best_iops URL: best read IOPS of 3 fio runs.
best_iops() {
  local best=0 iops
  for _ in 1 2 3; do
    iops=$(fio --name=rand --ioengine=nbd --uri="$1" --rw=randread --bs=4k --iodepth=32 \
      --runtime=10 --time_based --size=3G --output-format=json 2>"$work/err.last" |
      python3 -c 'import json,sys; t=sys.stdin.read(); print(int(json.loads(t[t.index("{"):])["jobs"][0]["read"]["iops"]))') ||
      { cat "$work/err.last" >&2; return 1; }
    [ "$iops" -gt "$best" ] && best=$iops
  done
  echo "$best"
}

row() { # name qemu vmnest ratio unit
  printf '%-16s %12s %12s %7sx %s\n' "$1" "$2" "$3" "$4" "$5"
}

printf '%-16s %12s %12s %8s\n' case qemu-nbd vmnest ratio
q=$(best_secs nbdcopy "$qurl" null:)
v=$(best_secs nbdcopy "$vurl" null:)
row "seq nbdcopy" "$q" "$v" "$(awk "BEGIN{printf \"%.2f\", $q / $v}")" "s"
q=$(best_secs nbdcopy --connections 1 "$qurl" null:)
v=$(best_secs nbdcopy --connections 1 "$vurl" null:)
row "seq nbdcopy 1c" "$q" "$v" "$(awk "BEGIN{printf \"%.2f\", $q / $v}")" "s"
q=$(best_secs qemu-img convert -f raw -O raw "$qurl" "$work/out/q.raw")
v=$(best_secs qemu-img convert -f raw -O raw "$vurl" "$work/out/v.raw")
row "seq qemu-img" "$q" "$v" "$(awk "BEGIN{printf \"%.2f\", $q / $v}")" "s"
q=$(best_iops "$qurl")
v=$(best_iops "$vurl")
row "rand 4k iops" "$q" "$v" "$(awk "BEGIN{printf \"%.2f\", $v / $q}")" "IOPS"
echo "($(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), qemu-nbd $(qemu-nbd --version | head -1 | awk '{print $2}'), libnbd $(nbdcopy --version | awk 'NR==2 {print $2}'), fio $(fio --version))"
