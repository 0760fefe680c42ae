#!/usr/bin/env bash
# NBD export: `vmnest serve` vs `qemu-nbd -r -f qcow2`, serving the same qcow2 file, side by side in
# one run; and `vmnest serve store:linux`, the same disk imported into a store (bench/work/export-store,
# kept between runs), against the same qemu-nbd. Input: bench/work/linux.qcow2, the 3 GiB Debian disk of bench/make-linux-disk.sh
# (built, then converted by qemu-img, when missing).
#
# Cases (best of 3 each, the two servers' runs alternating, page cache warm for both alike):
#   seq nbdcopy      nbdcopy NBD-URL null:            (libnbd's defaults: 4 connections when the
#                                                       server allows multi-conn, block status
#                                                       to skip holes)
#   seq nbdcopy 1c   nbdcopy --connections 1 NBD-URL null:
#   seq qemu-img     qemu-img convert -f raw NBD-URL -O raw FILE (one connection)
#   rand 4k iops     fio --ioengine=nbd, 4 KiB random reads, queue depth 32, 10 s
#   rand 4k cpu      the server's CPU time (all threads) per request in those runs: less
#                    sensitive than IOPS to load from elsewhere on a shared machine
#   fuse seq cat     cat FILE >/dev/null, buffered, FILE being the disk file of `vmnest mount`
#                    of the qcow2 against the file of `nbdfuse -r` over the qemu-nbd above; the
#                    FUSE file's page cache is dropped before each run (fadvise, `dd iflag=nocache
#                    count=0`), the qcow2's stays warm
#   fuse seq dd 1M   dd if=FILE bs=1M of=/dev/null, the same way
# NBD columns: qemu-nbd (qcow2), vmnest (qcow2), vmnest store (the stored snapshot).
# Ratios: qemu-nbd time / vmnest time, vmnest IOPS / qemu-nbd IOPS, and qemu-nbd CPU per request /
# vmnest CPU per request (> 1: vmnest better).
#
# Usage: bench/export.sh [QCOW2]   (another qcow2 instead of the Debian disk, e.g. a small one
#                                   to check the script; EXPORT_CASES="nbd fuse" picks the parts,
#                                   VMNEST_BIN another vmnest binary than a fresh release build)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib/serve.sh
work=bench/work
mkdir -p "$work/out"
cases=${EXPORT_CASES:-nbd fuse}
for tool in qemu-nbd:qemu-utils nbdcopy:libnbd-bin fio:fio nbdfuse:libnbd-bin fusermount3:fuse3; do
  command -v "${tool%%:*}" >/dev/null || {
    echo "${tool%%:*} missing: apt-get install ${tool##*:}" >&2
    exit 1
  }
done
src=${1:-$work/linux.qcow2}
if [ ! -f "$src" ] && [ $# -eq 0 ]; then
  bench/make-linux-disk.sh "$work/linux.raw" 3
  qemu-img convert -f raw -O qcow2 "$work/linux.raw" "$src"
fi
vsize=$(qemu-img info --output=json "$src" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
if [ -n "${VMNEST_BIN:-}" ]; then
  vmnest=$VMNEST_BIN # another build, e.g. to check the script with a debug binary
else
  cargo build --release -q -p vmnest
  vmnest=$PWD/target/release/vmnest
fi

pids=()
fmnt=$work/fuse-vmnest
qmnt=$work/fuse-nbdfuse
cleanup() {
  if mountpoint -q "$fmnt" 2>/dev/null; then "$vmnest" umount "$fmnt" >/dev/null || true; fi
  if mountpoint -q "$qmnt" 2>/dev/null; then fusermount3 -u "$qmnt" || true; fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -f "$work/out/"*
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP PIPE

# vmnest serve on a free port; the line it prints names the port.
"$vmnest" serve --export-name linux --listen 127.0.0.1:0 "$src" >"$work/vmnest-serve.out" 2>"$work/vmnest-serve.err" &
vpid=$!
pids+=("$vpid")
vurl=$(serving_url "$work/vmnest-serve.out" "$work/vmnest-serve.err")

# vmnest serve of the same disk imported into a store (imported once, kept).
store=$work/export-store
if [ ! -f "$store/refs/linux" ]; then
  rm -rf "$store"
  "$vmnest" --store "$store" import "$src" linux >/dev/null
fi
"$vmnest" --store "$store" serve --export-name linux --listen 127.0.0.1:0 store:linux >"$work/vmnest-serve-store.out" 2>"$work/vmnest-serve-store.err" &
spid=$!
pids+=("$spid")
surl=$(serving_url "$work/vmnest-serve-store.out" "$work/vmnest-serve-store.err")

# qemu-nbd read-only, several connections allowed (so nbdcopy can use multi-conn).
qport=$(free_port)
qemu-nbd -r -f qcow2 -t -e 16 -x linux -b 127.0.0.1 -p "$qport" "$src" 2>"$work/qemu-nbd.err" &
qpid=$!
pids+=("$qpid")
qurl=nbd://127.0.0.1:$qport/linux
for _ in $(seq 50); do nbdinfo --can connect "$qurl" 2>/dev/null && break; sleep 0.1; done

cat "$src" >/dev/null # warm the page cache for both servers alike
cat "$store"/packs/* >/dev/null # and the store's packs

# secs CMD...: wall time of one run.
secs() {
  local t0 t1
  rm -f "$work/out/"*
  t0=$(date +%s.%N)
  "$@" >/dev/null 2>"$work/err.last" || { cat "$work/err.last" >&2; return 1; }
  t1=$(date +%s.%N)
  awk "BEGIN{printf \"%.3f\", $t1 - $t0}"
}

# cpu PID: CPU seconds (user + system, all threads) the process has used so far.
cpu() {
  awk -v hz="$(getconf CLK_TCK)" '{printf "%.3f", ($14 + $15) / hz}' "/proc/$1/stat"
}

# iops URL PID: "IOPS server-CPU-microseconds-per-request" of one fio run.
iops() {
  local c0 c1 out
  c0=$(cpu "$2")
  out=$(fio --name=rand --ioengine=nbd --uri="$1" --rw=randread --bs=4k --iodepth=32 \
    --runtime=10 --time_based --size=$vsize --output-format=json 2>"$work/err.last") ||
    { cat "$work/err.last" >&2; return 1; }
  c1=$(cpu "$2")
  # fio prints a line before its JSON.
  python3 -c 'import json,sys
t=sys.stdin.read(); r=json.loads(t[t.index("{"):])["jobs"][0]["read"]
print(int(r["iops"]), "%.1f" % ((float(sys.argv[2]) - float(sys.argv[1])) * 1e6 / r["total_ios"]))' "$c0" "$c1" <<<"$out"
}

min() { awk 'BEGIN{m=""} NF {if (m == "" || $1 < m) m = $1} END{print m}'; }
max() { awk 'BEGIN{m=""} NF {if (m == "" || $1 > m) m = $1} END{print m}'; }

# ratio A B: A / B with two decimals.
ratio() { awk "BEGIN{printf \"%.2f\", $1 / $2}"; }

# seq NAME CMD-WITH-URL...: three runs of each server, alternating so that load from elsewhere
# falls on all alike; best times; ratios qemu-nbd / vmnest. "URL" in the command is replaced.
seq_case() {
  local name=$1; shift
  local q="" v="" st=""
  for _ in 1 2 3; do
    q+="$(secs "${@//URL/$qurl}")"$'\n'
    v+="$(secs "${@//URL/$vurl}")"$'\n'
    st+="$(secs "${@//URL/$surl}")"$'\n'
  done
  q=$(min <<<"$q"); v=$(min <<<"$v"); st=$(min <<<"$st")
  printf '%-16s %10s %10s %12s %7sx %7sx  (s)\n' "$name" "$q" "$v" "$st" "$(ratio "$q" "$v")" "$(ratio "$q" "$st")"
}

if [[ " $cases " == *" nbd "* ]]; then
printf '%-16s %10s %10s %12s %8s %8s\n' case qemu-nbd vmnest "vmnest store" ratio "ratio st"
seq_case "seq nbdcopy" nbdcopy URL null:
seq_case "seq nbdcopy 1c" nbdcopy --connections 1 URL null:
seq_case "seq qemu-img" qemu-img convert -f raw -O raw URL "$work/out/copy.raw"
qi="" vi="" si="" qc="" vc="" sc=""
for _ in 1 2 3; do
  read -r i c < <(iops "$qurl" "$qpid"); qi+="$i"$'\n'; qc+="$c"$'\n'
  read -r i c < <(iops "$vurl" "$vpid"); vi+="$i"$'\n'; vc+="$c"$'\n'
  read -r i c < <(iops "$surl" "$spid"); si+="$i"$'\n'; sc+="$c"$'\n'
done
qi=$(max <<<"$qi"); vi=$(max <<<"$vi"); si=$(max <<<"$si")
qc=$(min <<<"$qc"); vc=$(min <<<"$vc"); sc=$(min <<<"$sc")
printf '%-16s %10s %10s %12s %7sx %7sx  (IOPS, best)\n' "rand 4k iops" "$qi" "$vi" "$si" "$(ratio "$vi" "$qi")" "$(ratio "$si" "$qi")"
printf '%-16s %10s %10s %12s %7sx %7sx  (server CPU us per request, qemu-nbd / vmnest)\n' "rand 4k cpu" "$qc" "$vc" "$sc" "$(ratio "$qc" "$vc")" "$(ratio "$qc" "$sc")"
fi

if [[ " $cases " == *" fuse "* ]]; then
  # vmnest mount of the qcow2 (returns once mounted) against nbdfuse over the qemu-nbd above.
  mkdir -p "$fmnt" "$qmnt"
  "$vmnest" mount "$src" "$fmnt" >"$work/vmnest-mount.out"
  rm -f "$work/nbdfuse.pid" # nbdfuse writes it when its mount is ready
  nbdfuse -r -P "$work/nbdfuse.pid" "$qmnt" "$qurl" 2>"$work/nbdfuse.err" &
  pids+=("$!")
  for _ in $(seq 100); do [ -s "$work/nbdfuse.pid" ] && break; sleep 0.1; done
  [ -f "$qmnt/nbd" ] || { echo "nbdfuse did not mount:" >&2; cat "$work/nbdfuse.err" >&2; exit 1; }
  # fuse_case NAME CMD-WITH-FILE...: like seq_case, on the two FUSE files ("FILE" is replaced),
  # each file's page cache dropped before each run.
  fuse_case() {
    local name=$1; shift
    local q="" v="" f
    for _ in 1 2 3; do
      for f in "$qmnt/nbd" "$fmnt/disk"; do
        dd if="$f" iflag=nocache count=0 status=none
        if [ "$f" = "$qmnt/nbd" ]; then
          q+="$(secs "${@//FILE/$f}")"$'\n'
        else
          v+="$(secs "${@//FILE/$f}")"$'\n'
        fi
      done
    done
    q=$(min <<<"$q")
    v=$(min <<<"$v")
    printf '%-16s %10s %10s %12s %7sx  (s; nbdfuse+qemu-nbd vs vmnest mount)\n' "$name" "$q" "$v" "" "$(ratio "$q" "$v")"
  }
  fuse_case "fuse seq cat" cat FILE
  fuse_case "fuse seq dd 1M" dd if=FILE of=/dev/null bs=1M
fi
echo "($(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), qemu-nbd $(qemu-nbd --version | head -1 | awk '{print $2}'), libnbd $(nbdcopy --version | awk 'NR==2 {print $2}'), fio $(fio --version))"
