#!/usr/bin/env bash
# The disaster-recovery benchmark of issue 6: vmnest's remotes side by side with restic against
# the same S3 endpoint, on the store set (bench/make-store-set.sh: a Debian gold disk and three
# clones changed by an admin, sparse raw files).
#
#   (a) vmnest: import gold and the three clones (each clone as `vmnest clone gold NAME`, then
#       its image imported as the clone's new version) into a fresh store, `push` everything to
#       s3://BUCKET/vmnest: wall time, bytes uploaded (push --output json)
#   (b) change a few files in one clone (its ext4 at 1 MiB loop-mounted: a package list, /etc
#       edits, 8 MiB of logs; with --small, 4 runs of random bytes written into the raw file),
#       import it as a new version, push again: bytes uploaded against the bytes of the changed
#       chunks (`vmnest diff --output json` of the two versions; target <= 2x plus metadata)
#   (c) restore that clone from the remote into an empty store (`vmnest restore`): wall time,
#       `cmp` with its source
#   (d) `serve --from` a 4 GiB disk (the gold extended with a hole, imported as `big` and pushed
#       after the timed steps) on an empty store: time from the process start to the end of a
#       `qemu-io` read of the first 4 KiB over NBD (target < 2 s)
#   (e) restic 0.14 (RESTIC_PASSWORD fixed) to s3:http://127.0.0.1:PORT/BUCKET/restic: backup of
#       the four images (one snapshot each), then of the changed clone; `restic dump` of it:
#       wall times, bytes uploaded (the bucket's bytes under restic/ before and after, listed
#       through the S3 API with boto3 from moto's venv)
#
# The endpoint: a single-node Ceph RADOS Gateway (scripts/ceph-rgw.sh, memstore OSD), or moto's
# S3 server (scripts/s3-test-server.sh, objects in memory) with --s3 moto or when Ceph does not
# start. Both on loopback.
#
# Usage: bench/dr.sh [--s3 ceph|moto] [--set DIR] [--small] [--encrypt] [--keep]
#   --set    the image set (default bench/work/store-set, built when missing; needs root)
#   --small  generate a small set instead (bench/work/dr-small: 256 MiB images; no root needed:
#            the change step writes random bytes instead of files)
#   --encrypt  vmnest's stores are encrypted (`init --encrypt`, one key file for all of them;
#            the restore and serve stores are made with `init --encrypt --from-remote` before
#            their timed step); restic encrypts always
#   --keep   keep the work directory (bench/work/dr-runs)
# The binary is this checkout's target/release/vmnest (built when missing or older than a
# source; VMNEST_BIN=PATH to use another). Writes results to bench/work/dr-runs/summary.md.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
s3=ceph
set_dir=$here/work/store-set
small=0
keep=0
encrypt=0
while [ $# -gt 0 ]; do
  case $1 in
    --s3) s3=$2; shift 2 ;;
    --set) set_dir=$2; shift 2 ;;
    --small) small=1; shift ;;
    --keep) keep=1; shift ;;
    --encrypt) encrypt=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "dr.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case $s3 in ceph|moto) ;; *) echo "dr.sh: --s3 ceph or moto" >&2; exit 2 ;; esac

runs=$here/work/dr-runs
rm -rf "$runs"
mkdir -p "$runs"
summary=$runs/summary.md
if [ "$encrypt" = 1 ]; then
  export VMNEST_KEY_FILE=$runs/store.key
  (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$VMNEST_KEY_FILE")
fi
# An encrypted store for `--store DIR` sharing the remote's key (nothing to do when plain).
init_from_remote() {
  [ "$encrypt" = 1 ] || return 0
  "$vmnest" --store "$1" init --encrypt --from-remote "s3://$bucket/vmnest" >/dev/null
}
images=(gold clone-pkgs clone-upgrade clone-config)
changed=clone-config
bucket=vmnest-dr
access=vmnestbench
secret=vmnest-bench-secret-0123456789
moto_py=${VMNEST_MOTO_DIR:-/opt/vmnest-moto}/bin/python

# --- prerequisites ---
for c in restic qemu-io bc python3; do
  command -v "$c" >/dev/null || { echo "dr.sh: $c missing (scripts/install-test-deps.sh)" >&2; exit 1; }
done
[ -x "$moto_py" ] || { echo "dr.sh: $moto_py missing (scripts/install-test-deps.sh)" >&2; exit 1; }
vmnest=${VMNEST_BIN:-$root/target/release/vmnest}
if [ -z "${VMNEST_BIN:-}" ]; then
  newest_src=$(find "$root" -path "$root/target" -prune -o -path "$root/fuzz" -prune -o \
    \( -name '*.rs' -o -name Cargo.toml -o -name Cargo.lock \) -newer "$vmnest" -print -quit 2>/dev/null || echo missing)
  if [ ! -x "$vmnest" ] || [ -n "$newest_src" ]; then
    echo "== building vmnest (cargo build --release -p vmnest)"
    (cd "$root" && cargo build --release -p vmnest)
  fi
fi

# --- the image set ---
if [ "$small" = 1 ]; then
  set_dir=$here/work/dr-small
  mkdir -p "$set_dir"
  if [ ! -f "$set_dir/clone-config.raw" ]; then
    echo "== generating the small set in $set_dir (256 MiB images)"
    g=$set_dir/gold.raw
    truncate -s 256M "$g"
    # 160 MiB of data in runs (half random, half text), holes between them.
    for k in 0 1 2 3 4 5 6 7 8 9; do
      dd if=/dev/urandom of="$g" bs=1M seek=$((k * 24)) count=8 conv=notrunc status=none
      { yes "vmnest dr bench line $k with some repeated text" || true; } | head -c $((8 << 20)) |
        dd of="$g" bs=1M seek=$((k * 24 + 8)) conv=notrunc status=none iflag=fullblock
    done
    for c in clone-pkgs clone-upgrade clone-config; do
      cp --sparse=always "$g" "$set_dir/$c.raw"
      for k in 1 2 3; do
        dd if=/dev/urandom of="$set_dir/$c.raw" bs=64K seek=$(( (RANDOM % 4000) )) count=16 conv=notrunc status=none
      done
    done
  fi
elif [ ! -f "$set_dir/gold.raw" ]; then
  "$here/make-store-set.sh" "$set_dir" >"$runs/make-store-set.log" 2>&1 || {
    cat "$runs/make-store-set.log" >&2; exit 1; }
fi
logical=0
for i in "${images[@]}"; do logical=$((logical + $(stat -c %s "$set_dir/$i.raw"))); done

# --- the endpoint ---
port=$("$moto_py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
endpoint=http://127.0.0.1:$port
server_pid=""
ceph_dir=$runs/ceph
stop_server() {
  if [ "$s3" = ceph ] && [ -d "$ceph_dir" ]; then "$root/scripts/ceph-rgw.sh" stop "$ceph_dir" >/dev/null 2>&1 || true; fi
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
}
serve_pid=""
cleanup() {
  if [ -n "$serve_pid" ]; then kill "$serve_pid" 2>/dev/null || true; fi
  stop_server
  if [ "$keep" = 0 ]; then rm -rf "$runs/vmnest" "$runs/restore" "$runs/lazy" "$runs/out.raw" "$runs/v2.raw" "$runs/restic.cache"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if [ "$s3" = ceph ]; then
  if [ ! -x "$root/scripts/ceph-rgw.sh" ] ||
     ! "$root/scripts/ceph-rgw.sh" start "$ceph_dir" "$port" "$access" "$secret" >"$runs/ceph.log" 2>&1; then
    echo "== the Ceph gateway did not start (see $runs/ceph.log): moto instead"
    s3=moto
  fi
fi
if [ "$s3" = moto ]; then
  "$root/scripts/s3-test-server.sh" "$port" >"$runs/moto.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 100); do curl -s -o /dev/null "$endpoint" && break; sleep 0.1; done
fi
export AWS_ACCESS_KEY_ID=$access AWS_SECRET_ACCESS_KEY=$secret AWS_REGION=us-east-1
export AWS_ENDPOINT_URL=$endpoint AWS_DEFAULT_REGION=us-east-1
s3py() { # PYTHON CODE with `s3` a boto3 client
  "$moto_py" -c "import boto3, sys; s3 = boto3.client('s3', endpoint_url='$endpoint'); $1"
}
s3py "s3.create_bucket(Bucket='$bucket')"
bucket_bytes() { # PREFIX
  s3py "
n = 0
for page in s3.get_paginator('list_objects_v2').paginate(Bucket='$bucket', Prefix='$1'):
    n += sum(o['Size'] for o in page.get('Contents', []))
print(n)"
}
echo "== endpoint: $s3 at $endpoint; set: $set_dir"

now() { date +%s.%N; }
secs() { printf '%.2f' "$(echo "$2 - $1" | bc)"; }
jget() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
mib() { printf '%.1f' "$(echo "scale=3; $1 / 1048576" | bc)"; }
add() { printf '%.2f' "$(echo "$1 + $2" | bc)"; }
ratio() { printf "%.${3:-2}f" "$(echo "scale=6; $1 / $2" | bc)"; }

# --- (a) vmnest: import and push ---
st=$runs/vmnest
V() { "$vmnest" --store "$st" "$@"; }
[ "$encrypt" = 1 ] && V init --encrypt >/dev/null
t0=$(now)
V import "$set_dir/gold.raw" gold >/dev/null
for c in "${images[@]:1}"; do
  V clone gold "$c" >/dev/null
  V import "$set_dir/$c.raw" "$c" >/dev/null
done
t1=$(now)
import_s=$(secs "$t0" "$t1")
echo "   import (4 images)      $import_s s (local store)"
V remote add r "s3://$bucket/vmnest"
t0=$(now)
V push r --output json >"$runs/push1.json"
t1=$(now)
push1_s=$(secs "$t0" "$t1")
push1_b=$(jget "['bytes_uploaded']" <"$runs/push1.json")
echo "   push (4 images)        $push1_s s, $(mib "$push1_b") MiB uploaded"

# --- (b) change the clone, push again ---
v2=$runs/v2.raw
cp --sparse=always "$set_dir/$changed.raw" "$v2"
if [ "$small" = 1 ]; then
  for off in 17 61 130 201; do
    dd if=/dev/urandom of="$v2" bs=1M seek="$off" count=1 conv=notrunc status=none
  done
  what="4 MiB of random bytes at 4 places"
else
  [ "$(id -u)" = 0 ] || { echo "dr.sh: the change step loop-mounts the clone: run as root" >&2; exit 1; }
  mnt=$(mktemp -d /tmp/vmnest-dr.XXXXXX)
  loopdev=$(losetup -f --show -o $((1 << 20)) "$v2")
  mount "$loopdev" "$mnt"
  echo "dr-bench-$(date +%s)" >"$mnt/etc/hostname"
  printf '# dr bench\nPermitRootLogin no\n' >>"$mnt/etc/ssh/sshd_config" 2>/dev/null || true
  { head -c $((8 << 20)) /dev/urandom || true; } | base64 >"$mnt/var/log/dr-bench.log"
  cp "$mnt/etc/passwd" "$mnt/etc/passwd.dr" && echo "drbench:x:1999:1999::/home/drbench:/bin/sh" >>"$mnt/etc/passwd"
  umount "$mnt"; losetup -d "$loopdev"; rmdir "$mnt"
  what="hostname, sshd_config, passwd edited, 8 MiB of logs added"
fi
V import "$v2" "$changed" >/dev/null
V diff "$changed@~1" "$changed" --output json >"$runs/diff.json" || true
changed_b=$(python3 - "$runs/diff.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
def ranges(x):
    if isinstance(x, dict):
        yield x['length']
    elif isinstance(x, list):
        for v in x:
            yield from ranges(v)
print(sum(ranges(d)))
EOF
)
t0=$(now)
V push r --output json >"$runs/push2.json"
t1=$(now)
push2_s=$(secs "$t0" "$t1")
push2_b=$(jget "['bytes_uploaded']" <"$runs/push2.json")
push2_chunks=$(jget "['chunk_bytes_needed']" <"$runs/push2.json")
echo "   change: $what; changed chunks $(mib "$changed_b") MiB (diff), $(mib "$push2_chunks") MiB (push: chunks the remote lacked)"
echo "   push (changed clone)   $push2_s s, $(mib "$push2_b") MiB uploaded"

# --- (c) restore from the remote ---
rs=$runs/restore
init_from_remote "$rs"
"$vmnest" --store "$rs" remote add r "s3://$bucket/vmnest"
out=$runs/out.raw
rm -f "$out"
t0=$(now)
"$vmnest" --store "$rs" restore r "$changed" "$out" -O raw >/dev/null
t1=$(now)
restore_s=$(secs "$t0" "$t1")
restore_ok=ok
cmp -s "$out" "$v2" || restore_ok=MISMATCH
echo "   restore $changed       $restore_s s, cmp $restore_ok"
rm -f "$out"

# --- (d) serve --from: time to the first byte ---
# A 4 GiB disk: the gold's bytes, extended with a hole (pushed after the timed steps; it adds
# map nodes only).
big=$runs/big.raw
cp --sparse=always "$set_dir/gold.raw" "$big"
[ "$(stat -c %s "$big")" -ge $((4 << 30)) ] || truncate -s 4G "$big"
V import "$big" big >/dev/null
V push r big --output json >/dev/null
rm -f "$big"
lz=$runs/lazy
init_from_remote "$lz"
"$vmnest" --store "$lz" remote add r "s3://$bucket/vmnest"
gold_size=$(V info store:big --output json | jget "['virtual-size']")
fifo=$runs/serve.out
rm -f "$fifo"; mkfifo "$fifo"
t0=$(now)
"$vmnest" --store "$lz" serve --from r big --listen 127.0.0.1:0 >"$fifo" 2>"$runs/serve.err" &
serve_pid=$!
exec 3<"$fifo"
read -r line <&3
url=${line#serving }
qemu-io -r -f raw -c 'read 0 4k' "$url" >"$runs/qemu-io.out" 2>&1
t1=$(now)
ttfb_s=$(printf '%.3f' "$(echo "$t1 - $t0" | bc)")
kill "$serve_pid"; wait "$serve_pid" 2>/dev/null || true; serve_pid=""
exec 3<&-
echo "   serve --from big: first 4 KiB read $ttfb_s s after the start ($(mib "$gold_size") MiB image; $(grep -o 'opened in [0-9.]* s' "$runs/serve.err" || true))"

# --- (e) restic ---
export RESTIC_PASSWORD=vmnest-bench RESTIC_CACHE_DIR=$runs/restic.cache
repo=s3:$endpoint/$bucket/restic
restic -q -r "$repo" init >/dev/null
b0=$(bucket_bytes restic/)
t0=$(now)
for i in "${images[@]}"; do restic -q -r "$repo" backup "$set_dir/$i.raw" >/dev/null; done
t1=$(now)
rb1_s=$(secs "$t0" "$t1")
b1=$(bucket_bytes restic/)
rb1_b=$((b1 - b0))
echo "   restic backup (4)      $rb1_s s, $(mib "$rb1_b") MiB uploaded"
# The changed clone, at the same path as its first version (restic's parent snapshot).
orig=$set_dir/$changed.raw
mv "$orig" "$orig.dr-orig"
cp --sparse=always "$v2" "$orig"
t0=$(now)
restic -q -r "$repo" backup "$orig" >/dev/null || { mv -f "$orig.dr-orig" "$orig"; exit 1; }
t1=$(now)
rb2_s=$(secs "$t0" "$t1")
b2=$(bucket_bytes restic/)
rb2_b=$((b2 - b1))
mv -f "$orig.dr-orig" "$orig"
echo "   restic backup (change) $rb2_s s, $(mib "$rb2_b") MiB uploaded"
t0=$(now)
restic -q -r "$repo" dump --path "$orig" latest "$orig" >"$out"
t1=$(now)
rr_s=$(secs "$t0" "$t1")
rr_ok=ok
cmp -s "$out" "$v2" || rr_ok=MISMATCH
rm -f "$out"
echo "   restic dump            $rr_s s, cmp $rr_ok"

# --- table ---
{
  echo "$(date -u +%F), vmnest store $([ "$encrypt" = 1 ] && echo encrypted || echo plain), $(nproc)-core $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) >> 20 )) GiB RAM; endpoint: $s3 on loopback"
  echo "Set: ${images[*]} from $set_dir ($(mib "$logical") MiB logical); change: $what in $changed"
  echo
  echo "| step | vmnest s | vmnest MiB up | restic s | restic MiB up | restic / vmnest time |"
  echo "|---|---:|---:|---:|---:|---:|"
  echo "| first push / backup (4 images) | $push1_s | $(mib "$push1_b") | $rb1_s | $(mib "$rb1_b") | $(ratio "$rb1_s" "$push1_s") |"
  echo "| second push / backup (changed clone) | $push2_s | $(mib "$push2_b") | $rb2_s | $(mib "$rb2_b") | $(ratio "$rb2_s" "$push2_s") |"
  echo "| restore $changed ($restore_ok / $rr_ok) | $restore_s | | $rr_s | | $(ratio "$rr_s" "$restore_s") |"
  echo
  echo "- second push: $(mib "$push2_b") MiB uploaded for $(mib "$changed_b") MiB of changed chunks (vmnest diff) = $(ratio "$push2_b" "$changed_b")× (target ≤ 2× plus metadata)"
  echo "- vmnest import of the 4 images into the local store (before the first push): $import_s s; import + push $(add "$import_s" "$push1_s") s, restic / that = $(ratio "$rb1_s" "$(add "$import_s" "$push1_s")")"
  echo "- serve --from big (the gold extended to $(mib "$gold_size") MiB): first 4 KiB read $ttfb_s s after the process start (target < 2 s for 4 GiB)"
} >"$summary"
echo
cat "$summary"
if [ "$restore_ok" != ok ] || [ "$rr_ok" != ok ]; then exit 1; fi
