#!/usr/bin/env bash
# Memory snapshots in the store (issue 4): two VMs booted from the same gold disk and saved with
# `migrate "exec:cat > FILE"` (bench/make-vm-memory.sh), imported into a fresh vmnest store,
# exported back and compared byte for byte, and the stored bytes reported against the streams'
# raw size (target <= 0.35).
#
#   vmnest --store DIR import --vm vmN --memory bench/work/vm-memory/vmN.mig
#   vmnest --store DIR export vmN --member memory OUT -O raw       # cmp with the stream
#   vmnest --store DIR du --output json                             # "stored_bytes"
#
# --estimate: instead of the CLI, run dedup-store's example migration_stats over the streams
# (splits them with chunker::qemu_migration, counts pages, zero pages, distinct pages and opaque
# bytes, and estimates the stored bytes with the pack's frame size and zstd level).
#
# Usage: bench/memory.sh [--estimate] [--keep]
# Env: VMNEST_BIN (default: this checkout's target/release/vmnest, built when missing or stale).
# Page cache warm (the streams were just written or read). Needs root (make-vm-memory.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib/store.sh"
root=$(cd "$here/.." && pwd)
estimate=0
keep=0
for a in "$@"; do
  case $a in
    --estimate) estimate=1 ;;
    --keep) keep=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "memory.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done
mem=$here/work/vm-memory
runs=$here/work/memory-runs
mkdir -p "$runs"
"$here/make-vm-memory.sh" "$mem" | sed -n '/^== streams/,$p'
streams=("$mem"/vm1.mig "$mem"/vm2.mig)
raw=0
for s in "${streams[@]}"; do raw=$((raw + $(stat -c %s "$s"))); done

stale() { # BINARY: true when missing or older than a source file
  [ ! -x "$1" ] && return 0
  [ -n "$(find "$root" -path "$root/target" -prune -o -path "$root/fuzz" -prune -o \
    \( -name '*.rs' -o -name Cargo.toml -o -name Cargo.lock \) -newer "$1" -print -quit)" ]
}

if [ "$estimate" = 1 ]; then
  ex=$root/target/release/examples/migration_stats
  if stale "$ex"; then
    echo "== building dedup-store's example migration_stats"
    (cd "$root" && cargo build --release -p dedup-store --example migration_stats)
  fi
  echo "== estimate (no vmnest CLI): $ex"
  /usr/bin/time -f '   %e s, peak RSS %M KiB' "$ex" "${streams[@]}" 2>&1 | tee "$runs/estimate.txt"
  exit 0
fi

vmnest=${VMNEST_BIN:-$root/target/release/vmnest}
if [ -z "${VMNEST_BIN:-}" ] && stale "$vmnest"; then
  echo "== building vmnest (cargo build --release -p vmnest)"
  (cd "$root" && cargo build --release -p vmnest)
fi
store=$runs/store
rm -rf "$store"
fail=0
peak=0
tf=$runs/.time
for s in "${streams[@]}"; do
  vm=$(basename "$s" .mig)
  /usr/bin/time -f '%e %M' -o "$tf" "$vmnest" --store "$store" import --vm "$vm" --memory "$s" \
    >>"$runs/vmnest.log" 2>&1 || { echo "   import $vm FAILED (see $runs/vmnest.log)"; fail=1; continue; }
  read -r wall rss <"$tf"; [ "$rss" -gt "$peak" ] && peak=$rss
  echo "   import $vm: ${wall} s, peak RSS $((rss >> 10)) MiB"
done
for s in "${streams[@]}"; do
  vm=$(basename "$s" .mig)
  out=$runs/$vm.export
  rm -f "$out"
  /usr/bin/time -f '%e %M' -o "$tf" "$vmnest" --store "$store" export "$vm" --member memory "$out" -O raw \
    >>"$runs/vmnest.log" 2>&1 || { echo "   export $vm FAILED (see $runs/vmnest.log)"; fail=1; continue; }
  read -r wall rss <"$tf"; [ "$rss" -gt "$peak" ] && peak=$rss
  if cmp -s "$out" "$s"; then ok="byte-exact"; else ok="MISMATCH"; fail=1; fi
  echo "   export $vm: ${wall} s, peak RSS $((rss >> 10)) MiB, $ok"
  rm -f "$out"
done
stored=$(stored_bytes "$vmnest" "$store") || { stored=0; fail=1; }
dir=$(du -sb "$store" | cut -f1)
echo "== stored: $stored bytes (store directory $dir bytes) for $raw bytes of streams"
echo "   stored / raw = $(printf %.3f "$(echo "scale=4; $stored / $raw" | bc)") (target <= 0.35); directory / raw = $(printf %.3f "$(echo "scale=4; $dir / $raw" | bc)")"
echo "   peak RSS $((peak >> 10)) MiB"
[ "$keep" = 1 ] || rm -rf "$store"
exit "$fail"
