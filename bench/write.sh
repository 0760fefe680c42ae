#!/usr/bin/env bash
# Writes through NBD into an image file in place: `vmnest serve --rw FILE` against
# `qemu-nbd -f FMT FILE` (its default cache, writeback), the same fresh image for both, side by
# side in one run. For each format (qcow2 with 64 KiB clusters, dynamic VHD), each case three times
# per server, alternating, best kept:
#   rand 4k write   fio --ioengine=nbd, 4 KiB random writes, queue depth 32, 10 s, into a fresh
#                   empty 4 GiB image (nearly every write allocates), the image checked afterwards
#                   by `qemu-img check`
#   nbdcopy --flush nbdcopy --flush RAW NBD-URL: the 3 GiB Debian disk of bench/make-linux-disk.sh
#                   (bench/work/linux.raw) copied into a fresh image and flushed, then
#                   `qemu-img compare` with the source
# Ratios: vmnest IOPS / qemu-nbd IOPS and qemu-nbd time / vmnest time (> 1: vmnest better).
#
# Usage: bench/write.sh   (WRITE_FORMATS="qcow2 vhd" picks the formats; VMNEST_BIN another
#                          vmnest binary than a fresh release build)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib/serve.sh
work=bench/work/write
mkdir -p "$work"
for tool in qemu-nbd:qemu-utils nbdcopy:libnbd-bin fio:fio; do
  command -v "${tool%%:*}" >/dev/null || {
    echo "${tool%%:*} missing: apt-get install ${tool##*:}" >&2
    exit 1
  }
done
src=bench/work/linux.raw
[ -f "$src" ] || bench/make-linux-disk.sh "$src" 3
if [ -n "${VMNEST_BIN:-}" ]; then
  vmnest=$VMNEST_BIN
else
  cargo build --release -q -p vmnest
  vmnest=$PWD/target/release/vmnest
fi
pid= url= result=
cleanup() {
  [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
  rm -f "$work"/img.*
}
trap cleanup EXIT

# fresh FMT: a new empty 4 GiB image of FMT (qcow2 or vhd) at $work/img.FMT.
fresh() {
  rm -f "$work/img.$1"
  case $1 in
    qcow2) qemu-img create -q -f qcow2 "$work/img.qcow2" 4G ;;
    vhd) qemu-img create -q -f vpc -o subformat=dynamic "$work/img.vhd" 4G ;;
  esac
}

# start SERVER FMT: serves $work/img.FMT writable; sets pid and url (not in a subshell: the
# server must not hold a command substitution's pipe).
start() {
  local port fmt=$2
  if [ "$1" = vmnest ]; then
    "$vmnest" serve --rw --listen 127.0.0.1:0 "$work/img.$2" >"$work/serve.out" 2>"$work/serve.err" &
    pid=$!
    url=$(serving_url "$work/serve.out" "$work/serve.err")
  else
    port=$(free_port)
    [ "$fmt" = vhd ] && fmt=vpc
    qemu-nbd -f "$fmt" -t -e 16 -p "$port" "$work/img.$2" >/dev/null 2>"$work/serve.err" &
    pid=$!
    url="nbd://127.0.0.1:$port"
    for _ in $(seq 50); do nbdinfo --size "$url" >/dev/null 2>&1 && break; sleep 0.1; done
  fi
}

stop() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  pid=
}

# check FMT [SOURCE]: qemu-img check (qcow2) and, with SOURCE, compare.
check() {
  local fmt=$1
  [ "$fmt" = vhd ] && fmt=vpc
  if [ "$1" = qcow2 ]; then qemu-img check -q -f qcow2 "$work/img.$1"; fi
  if [ $# -gt 1 ]; then qemu-img compare -q -f raw -F "$fmt" "$2" "$work/img.$1"; fi
}

# randwrite SERVER FMT: sets result to the IOPS of one fio run into a fresh image.
randwrite() {
  local out
  fresh "$2"
  start "$1" "$2"
  out=$(fio --name=w --ioengine=nbd --uri="$url" --rw=randwrite --bs=4k --iodepth=32 \
    --runtime=10 --time_based --size=4g --output-format=json 2>"$work/fio.err") ||
    { cat "$work/fio.err" >&2; stop; return 1; }
  stop
  check "$2"
  result=$(python3 -c 'import json,sys
t=sys.stdin.read(); print(int(json.loads(t[t.index("{"):])["jobs"][0]["write"]["iops"]))' <<<"$out")
}

# copy SERVER FMT: sets result to the seconds of nbdcopy --flush of the Debian disk into a
# fresh image.
copy() {
  local t0 t1
  fresh "$2"
  start "$1" "$2"
  t0=$(date +%s.%N)
  nbdcopy --flush "$src" "$url"
  t1=$(date +%s.%N)
  stop
  check "$2" "$src"
  result=$(awk "BEGIN{printf \"%.3f\", $t1 - $t0}")
}

best_max() { sort -n | tail -1; }
best_min() { sort -n | head -1; }
ratio() { awk "BEGIN{printf \"%.2f\", $1 / $2}"; }

# runs CASE FMT: three runs of CASE per server, alternating so that load from elsewhere falls on
# both alike; sets q and v to the results.
runs() {
  q=() v=()
  for _ in 1 2 3; do
    "$1" qemu "$2"; q+=("$result")
    "$1" vmnest "$2"; v+=("$result")
  done
}

cat "$src" >/dev/null
echo "| format | case | qemu-nbd | vmnest | ratio |"
echo "|---|---|---:|---:|---:|"
for fmt in ${WRITE_FORMATS:-qcow2 vhd}; do
  runs randwrite "$fmt"
  qb=$(printf '%s\n' "${q[@]}" | best_max) vb=$(printf '%s\n' "${v[@]}" | best_max)
  echo "| $fmt | fio 4 KiB random writes, IOPS | $qb | $vb | $(ratio "$vb" "$qb")× |"
  runs copy "$fmt"
  qb=$(printf '%s\n' "${q[@]}" | best_min) vb=$(printf '%s\n' "${v[@]}" | best_min)
  echo "| $fmt | nbdcopy --flush 3 GiB disk, s | $qb | $vb | $(ratio "$qb" "$vb")× |"
done
