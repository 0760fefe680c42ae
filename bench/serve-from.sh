#!/usr/bin/env bash
# Reads of `vmnest serve --from` over moto's S3 server (scripts/s3-test-server.sh, objects in
# memory, loopback), comparing two vmnest binaries on the same pushed disk in the same run:
#   seq      nbdcopy of the whole disk to null: from a server just started, with no disk cache
#            (--cache-size 0): every frame is fetched from the remote (MiB/s)
#   rand     fio's nbd engine, 4 KiB random reads over the whole disk for RUNTIME seconds, iodepth
#            4, from a server just started, no disk cache (IOPS)
#   rand-mem the same on the server that has just read the whole disk (nbdcopy) with a disk
#            cache: what its memory holds is read from memory (IOPS)
#   rand-dc  the same from a new server over that disk cache: frames read back from the cache
#            directory, checked (IOPS)
# Each server is given --frame-cache FRAME_CACHE (default 64M: the memory cache of `serve --from`
# was fixed at 64 MiB before it became that option, so a binary from before keeps 64 MiB
# whatever is given), fetch window and read-ahead as built. Rounds alternate the binaries.
#
# Usage: bench/serve-from.sh [--size 1G] [--rounds 2] [--runtime 20] [--frame-cache 64M] BIN_A BIN_B
# Writes bench/work/serve-from/summary.md.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
size=1G rounds=2 runtime=20 frame_cache=64M
while [ $# -gt 2 ]; do
  case $1 in
    --size) size=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --frame-cache) frame_cache=$2; shift 2 ;;
    *) echo "serve-from.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[ $# -eq 2 ] || { sed -n '2,20p' "$0" >&2; exit 2; }
bins=("$1" "$2")
for b in "${bins[@]}"; do [ -x "$b" ] || { echo "serve-from.sh: $b is not executable" >&2; exit 1; }; done
for t in nbdcopy fio; do command -v "$t" >/dev/null || { echo "serve-from.sh: $t missing" >&2; exit 1; }; done
moto_py=${VMNEST_MOTO_DIR:-/opt/vmnest-moto}/bin/python
[ -x "$moto_py" ] || { echo "serve-from.sh: $moto_py missing (scripts/install-test-deps.sh)" >&2; exit 1; }

work=$here/work/serve-from
rm -rf "$work"; mkdir -p "$work"
port=$("$moto_py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
endpoint=http://127.0.0.1:$port
server_pid="" serve_pid=""
cleanup() {
  if [ -n "$serve_pid" ]; then kill "$serve_pid" 2>/dev/null || true; wait "$serve_pid" 2>/dev/null || true; fi
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work/src" "$work/disk.raw" "$work"/store-*
}
trap cleanup EXIT
trap 'exit 130' INT TERM
"$root/scripts/s3-test-server.sh" "$port" >"$work/moto.log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do curl -s -o /dev/null "$endpoint" && break; sleep 0.1; done
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1
export AWS_ENDPOINT_URL=$endpoint AWS_DEFAULT_REGION=us-east-1
"$moto_py" -c "import boto3; boto3.client('s3', endpoint_url='$endpoint').create_bucket(Bucket='bench')"

now() { date +%s.%N; }
# The disk: SIZE of pseudo-random bytes (incompressible: frames stored as they are).
bytes=$(numfmt --from=iec "$size")
head -c "$bytes" /dev/urandom >"$work/disk.raw"
t0=$(now)
"${bins[1]}" --store "$work/src" import "$work/disk.raw" disk >/dev/null
"${bins[1]}" --store "$work/src" remote add r s3://bench/v
"${bins[1]}" --store "$work/src" push r >/dev/null
echo "imported and pushed $size in $(printf '%.1f' "$(echo "$(now) - $t0" | bc)") s"
rm -f "$work/disk.raw"

# serve BIN STORE CACHE_SIZE: starts `serve --from` in the background; sets url and serve_pid.
serve() {
  rm -f "$work/serve.out"
  "$1" --store "$2" serve --from r disk --cache-size "$3" --frame-cache "$frame_cache" \
    --listen 127.0.0.1:0 >"$work/serve.out" 2>"$work/serve.err" &
  serve_pid=$!
  for _ in $(seq 300); do grep -q '^serving' "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
  url=$(awk '/^serving/ {print $2; exit}' "$work/serve.out")
  [ -n "$url" ] || { cat "$work/serve.err" >&2; exit 1; }
}
unserve() { kill "$serve_pid"; wait "$serve_pid" 2>/dev/null || true; serve_pid=""; }
fresh_store() { # BIN NAME
  rm -rf "$work/store-$2"
  "$1" --store "$work/store-$2" remote add r s3://bench/v
  echo "$work/store-$2"
}
rand_iops() { # URL
  fio --name=r --ioengine=nbd --uri="$1" --rw=randread --bs=4k --iodepth=4 --runtime="$runtime" \
    --time_based --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; t=sys.stdin.read(); print(round(json.loads(t[t.index("{"):])["jobs"][0]["read"]["iops"]))'
}

results=$work/results.tsv
: >"$results"
for round in $(seq "$rounds"); do
  for i in 0 1; do
    b=${bins[$i]}
    st=$(fresh_store "$b" "$i-$round")
    serve "$b" "$st" 0
    t0=$(now)
    nbdcopy "$url" null:
    seq_s=$(echo "$(now) - $t0" | bc)
    unserve
    serve "$b" "$st" 0
    rand=$(rand_iops "$url")
    unserve
    serve "$b" "$st" 4G
    nbdcopy "$url" null:
    rand_mem=$(rand_iops "$url")
    unserve
    serve "$b" "$st" 4G
    rand_dc=$(rand_iops "$url")
    unserve
    mibs=$(echo "scale=1; $bytes / 1048576 / $seq_s" | bc)
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$i" "$round" "$mibs" "$rand" "$rand_mem" "$rand_dc" |
      tee -a "$results"
    rm -rf "$st"
  done
done

python3 - "$results" "${bins[0]}" "${bins[1]}" "$size" "$runtime" "$frame_cache" >"$work/summary.md" <<'EOF'
import statistics, sys
rows = [l.split('\t') for l in open(sys.argv[1]).read().split('\n') if l]
names = sys.argv[2:4]
def med(i, col):
    return statistics.median(float(r[col]) for r in rows if r[0] == str(i))
print(f"serve --from over moto, {sys.argv[4]} disk of random bytes, --frame-cache {sys.argv[6]}, "
      f"fio {sys.argv[5]} s, medians of {len(rows) // 2} rounds\n")
print("| | seq MiB/s (cold) | 4 KiB rand IOPS (cold) | rand IOPS (after a full read, same server) "
      "| rand IOPS (new server, disk cache warm) |")
print("|---|---|---|---|---|")
for i in (0, 1):
    print(f"| {names[i]} | " + " | ".join(f"{med(i, c):.1f}" if c == 2 else f"{med(i, c):.0f}"
                                       for c in (2, 3, 4, 5)) + " |")
print("| B / A | " + " | ".join(f"{med(1, c) / med(0, c):.2f}" for c in (2, 3, 4, 5)) + " |")
print("\nPer round (binary, round, seq MiB/s, rand IOPS cold, after a full read, disk cache warm):\n")
for r in rows:
    print("    " + "  ".join(r))
EOF
cat "$work/summary.md"
