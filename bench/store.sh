#!/usr/bin/env bash
# The store benchmark of issue 4: vmnest's store side by side with restic and borg (Debian
# packages) in one run, on the same set (bench/make-store-set.sh: a Debian gold disk and three
# clones changed by an admin, 3 GiB sparse raw files each).
#
# Per tool, in a fresh repository: import gold then the clones in order (one snapshot/archive per
# image), stored bytes (du -sb of the repository; vmnest's own `du --output json` stored_bytes
# too), restore every image to a raw file and `cmp` it with its source (a mismatch is a failure),
# peak memory (/usr/bin/time %M, max over the steps), wall time per step. The page cache is dropped
# before every import and restore step when /proc/sys/vm/drop_caches is writable ("cold"), else
# everything runs warm; the mode is printed. A restore step's time includes `sync` of its output,
# so every tool's output is durable when timed (restic and borg write to stdout; vmnest's export
# syncs its own output); the unsynced time is in the step log too.
#
#   restic     restic init (RESTIC_PASSWORD fixed; repository v2, compression auto),
#              restic backup FILE, restore: restic dump --path FILE latest FILE > OUT
#   borg       borg init -e none, borg create REPO::NAME FILE (default lz4, default chunker),
#              restore: borg extract --stdout REPO::NAME FILE > OUT
#   borg-zstd  the same with borg create --compression zstd,3
#   vmnest@SIZE  the same with import --chunk-size SIZE (e.g. vmnest@16K), for the chunk-size table
#   vmnest     vmnest --store DIR import SRC NAME; vmnest --store DIR export NAME DST -O raw;
#              vmnest --store DIR du --output json ("stored_bytes"). The binary is this
#              checkout's target/release/vmnest, built (cargo build --release -p vmnest) when
#              missing or older than a source file (VMNEST_BIN=PATH: use that binary instead).
#
# Usage: bench/store.sh [--only vmnest,restic,borg,borg-zstd] [--warm] [--set DIR] [--keep]
#   --only   the tools to run (default: vmnest,restic,borg,borg-zstd; also vmnest@4K etc.)
#   --warm   never drop the page cache
#   --set    the image set (default bench/work/store-set, built when missing)
#   --keep   keep the repositories (bench/work/store-runs/TOOL) after the run
# Needs root (make-store-set.sh, drop_caches). Writes results to bench/work/store-runs/.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
tools="vmnest,restic,borg,borg-zstd"
warm=0
keep=0
set_dir=$here/work/store-set
while [ $# -gt 0 ]; do
  case $1 in
    --only) tools=$2; shift 2 ;;
    --only=*) tools=${1#--only=}; shift ;;
    --warm) warm=1; shift ;;
    --keep) keep=1; shift ;;
    --set) set_dir=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "store.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
IFS=, read -r -a tool_list <<<"$tools"
for t in "${tool_list[@]}"; do
  case $t in vmnest|vmnest@[0-9]*[KM]|restic|borg|borg-zstd) ;; *) echo "store.sh: unknown tool $t" >&2; exit 2 ;; esac
done
has_tool() { local t; for t in "${tool_list[@]}"; do [ "$t" = "$1" ] && return 0; done; return 1; }
has_vmnest() { local t; for t in "${tool_list[@]}"; do [ "${t%%@*}" = vmnest ] && return 0; done; return 1; }

images=(gold clone-pkgs clone-upgrade clone-config)
runs=$here/work/store-runs
mkdir -p "$runs"
steps=$runs/steps.tsv        # tool step image wall_s rss_kib extra
summary=$runs/summary.md

# --- prerequisites ---
need=()
[ -x /usr/bin/time ] || need+=(time)
command -v bc >/dev/null || need+=(bc)
if has_tool restic && ! command -v restic >/dev/null; then need+=(restic); fi
if { has_tool borg || has_tool borg-zstd; } && ! command -v borg >/dev/null; then need+=(borgbackup); fi
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
vmnest=${VMNEST_BIN:-$root/target/release/vmnest}
if has_vmnest && [ -z "${VMNEST_BIN:-}" ]; then
  newest_src=$(find "$root" -path "$root/target" -prune -o -path "$root/fuzz" -prune -o \
    \( -name '*.rs' -o -name Cargo.toml -o -name Cargo.lock \) -newer "$vmnest" -print -quit 2>/dev/null || echo missing)
  if [ ! -x "$vmnest" ] || [ -n "$newest_src" ]; then
    echo "== building vmnest (cargo build --release -p vmnest)"
    (cd "$root" && cargo build --release -p vmnest)
  fi
fi

"$here/make-store-set.sh" "$set_dir" >"$runs/make-store-set.log" 2>&1 || {
  cat "$runs/make-store-set.log" >&2; exit 1; }
sed -n '/apparent/p' "$runs/make-store-set.log"
logical=0
for i in "${images[@]}"; do logical=$((logical + $(stat -c %s "$set_dir/$i.raw"))); done

cold=0
if [ "$warm" = 0 ] && [ -w /proc/sys/vm/drop_caches ] && (sync && echo 3 >/proc/sys/vm/drop_caches) 2>/dev/null; then
  cold=1
fi
drop() { if [ "$cold" = 1 ]; then sync; echo 3 >/proc/sys/vm/drop_caches; fi; }
mode=$([ "$cold" = 1 ] && echo "cold (page cache dropped before each step)" || echo "warm (page cache not dropped)")
echo "== cache: $mode"

# --- the tools: init / import IMAGE / restore IMAGE OUT / stored bytes ---
export RESTIC_PASSWORD=vmnest-bench
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes

tool_init() { # TOOL REPO
  case $1 in
    restic) RESTIC_CACHE_DIR=$2.cache restic -q -r "$2" init >/dev/null ;;
    borg|borg-zstd) BORG_BASE_DIR=$2.base borg init -e none "$2" ;;
    vmnest*) mkdir -p "$2" ;;
  esac
}
tool_import() { # TOOL REPO IMAGE
  local f=$set_dir/$3.raw
  case $1 in
    restic) RESTIC_CACHE_DIR=$2.cache restic -q -r "$2" backup "$f" ;;
    borg) BORG_BASE_DIR=$2.base borg create "$2::$3" "$f" ;;
    borg-zstd) BORG_BASE_DIR=$2.base borg create --compression zstd,3 "$2::$3" "$f" ;;
    vmnest) "$vmnest" --store "$2" import "$f" "$3" ;;
    vmnest@*) "$vmnest" --store "$2" import --chunk-size "${1#vmnest@}" "$f" "$3" ;;
  esac
}
tool_restore() { # TOOL REPO IMAGE OUT
  local f=$set_dir/$3.raw
  case $1 in
    restic) RESTIC_CACHE_DIR=$2.cache restic -q -r "$2" dump --path "$f" latest "$f" >"$4" ;;
    borg|borg-zstd) BORG_BASE_DIR=$2.base borg extract --stdout "$2::$3" "${f#/}" >"$4" ;;
    vmnest*) "$vmnest" --store "$2" export "$3" "$4" -O raw ;;
  esac
}
. "$here/lib/store.sh"

# timed STEPLOG CMD...: runs CMD under /usr/bin/time; sets $wall and $rss (KiB); fails with CMD
timed() {
  local tf=$runs/.time
  if ! /usr/bin/time -f '%e %M' -o "$tf" "$@"; then return 1; fi
  read -r wall rss <"$tf"
}
add() { printf '%.2f' "$(echo "$1 + $2" | bc)"; }
# Shell functions cannot run under /usr/bin/time: export what they need and run them via bash -c.
export -f tool_import tool_restore
export set_dir vmnest

: >"$steps"
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
declare -A imp_s rest_s rest_nosync_s peak stored stored_own fails
for t in "${tool_list[@]}"; do
  repo=$runs/$t
  rm -rf "$repo" "$repo.cache" "$repo.base"
  echo "== $t"
  tool_init "$t" "$repo" >"$runs/$t.log" 2>&1 || { cat "$runs/$t.log" >&2; exit 1; }
  imp_s[$t]=0; rest_s[$t]=0; rest_nosync_s[$t]=0; peak[$t]=0; fails[$t]=0
  for i in "${images[@]}"; do
    drop
    if ! timed bash -c 'tool_import "$@"' _ "$t" "$repo" "$i" >>"$runs/$t.log" 2>&1; then
      echo "   import $i FAILED (see $runs/$t.log)"; fails[$t]=$((fails[$t] + 1)); continue
    fi
    imp_s[$t]=$(add "${imp_s[$t]}" "$wall")
    [ "$rss" -gt "${peak[$t]}" ] && peak[$t]=$rss
    size=$(du -sb "$repo" | cut -f1)
    printf '%s\timport\t%s\t%s\t%s\trepo_bytes=%s\n' "$t" "$i" "$wall" "$rss" "$size" >>"$steps"
    printf '   import  %-14s %7.2f s  %6d MiB RSS  repo %7d MiB\n' "$i" "$wall" $((rss >> 10)) $((size >> 20))
  done
  stored[$t]=$(du -sb "$repo" | cut -f1)
  stored_own[$t]=""
  if [ "${t%%@*}" = vmnest ]; then stored_own[$t]=$(stored_bytes "$vmnest" "$repo" 2>>"$runs/$t.log" || echo "?"); fi
  out=$runs/restore.raw
  for i in "${images[@]}"; do
    rm -f "$out"
    drop
    if ! timed bash -c 'tool_restore "$@"' _ "$t" "$repo" "$i" "$out" 2>>"$runs/$t.log"; then
      echo "   restore $i FAILED (see $runs/$t.log)"; fails[$t]=$((fails[$t] + 1)); continue
    fi
    w1=$wall; r1=$rss
    s0=$(date +%s.%N); sync "$out"; s1=$(date +%s.%N)
    w=$(printf '%.2f' "$(echo "$w1 + $s1 - $s0" | bc)")
    rest_s[$t]=$(add "${rest_s[$t]}" "$w")
    rest_nosync_s[$t]=$(add "${rest_nosync_s[$t]}" "$w1")
    [ "$r1" -gt "${peak[$t]}" ] && peak[$t]=$r1
    ok=ok
    if ! cmp -s "$out" "$set_dir/$i.raw"; then ok=MISMATCH; fails[$t]=$((fails[$t] + 1)); fi
    printf '%s\trestore\t%s\t%s\t%s\tunsynced_s=%s %s\n' "$t" "$i" "$w" "$r1" "$w1" "$ok" >>"$steps"
    printf '   restore %-14s %7.2f s  %6d MiB RSS  (unsynced %.2f s)  cmp %s\n' "$i" "$w" $((r1 >> 10)) "$w1" "$ok"
  done
  rm -f "$out"
  if [ "$keep" = 0 ]; then rm -rf "$repo" "$repo.cache" "$repo.base"; fi
done

# --- table and ratios ---
mib() { printf '%.1f' "$(echo "scale=3; $1 / 1048576" | bc)"; }
ratio() { printf "%.${3:-2}f" "$(echo "scale=6; $1 / $2" | bc)"; }
{
  echo "$(date -u +%F), $(nproc)-core $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) >> 20 )) GiB RAM; cache: $mode"
  echo "Load average (1/5/15 min) at the start: $load_start, at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "Set: ${images[*]} (sparse raw files, $(mib "$logical") MiB logical in all)"
  echo
  echo "| tool | import s (4 images) | import MiB/s | stored MiB | restore s (synced) | restore s (unsynced) | peak RSS MiB | failures |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  for t in "${tool_list[@]}"; do
    speed=$(echo "scale=0; $logical / 1048576 / ${imp_s[$t]}" | bc 2>/dev/null || echo "?")
    own=""; [ -n "${stored_own[$t]}" ] && own=" (own du: $(mib "${stored_own[$t]}" 2>/dev/null || echo "${stored_own[$t]}"))"
    echo "| $t | ${imp_s[$t]} | $speed | $(mib "${stored[$t]}")$own | ${rest_s[$t]} | ${rest_nosync_s[$t]} | $(( ${peak[$t]} >> 10 )) | ${fails[$t]} |"
  done
  if has_tool vmnest && [ "${fails[vmnest]}" = 0 ]; then
    echo
    best=""
    for t in restic borg borg-zstd; do
      has_tool "$t" || continue
      if [ -z "$best" ] || [ "${stored[$t]}" -lt "${stored[$best]}" ]; then best=$t; fi
    done
    if [ -n "$best" ]; then
      echo "- stored: vmnest / $best (smallest peer) = $(ratio "${stored[vmnest]}" "${stored[$best]}" 3) (target ≤ 0.85)"
    fi
    if has_tool restic; then
      echo "- import: restic / vmnest = $(ratio "${imp_s[restic]}" "${imp_s[vmnest]}")× (target ≥ 3×)"
      echo "- restore: restic / vmnest = $(ratio "${rest_s[restic]}" "${rest_s[vmnest]}")× synced, $(ratio "${rest_nosync_s[restic]}" "${rest_nosync_s[vmnest]}")× unsynced (target ≥ 2×)"
    fi
    echo "- peak memory: vmnest $(( ${peak[vmnest]} >> 10 )) MiB (target ≤ 512 MiB)"
  fi
} >"$summary"
echo
cat "$summary"
echo
echo "steps: $steps; summary: $summary"
