#!/usr/bin/env bash
# A single-node Ceph RADOS Gateway on loopback, for the heavy remote tests and bench/dr.sh: one
# monitor, one OSD on memstore (RAM, sized by CEPH_MEMSTORE_GIB, default 6), cephx off, pools of
# size 1, the beast frontend on 127.0.0.1:PORT, and an S3 user with the given keys. Everything
# (config, monitor data, logs, pid files) lives in DIR; nothing is installed system-wide beyond
# Debian's packages (`install` adds them).
#
# Usage:
#   scripts/ceph-rgw.sh install                      apt-get install radosgw ceph-mon ceph-osd
#   scripts/ceph-rgw.sh start DIR PORT ACCESS SECRET  starts it (retries once: one start in five
#                                                    was seen to fail), waits until S3 answers
#   scripts/ceph-rgw.sh stop DIR                      stops it and removes DIR
#
# Ceph 16 enforces If-None-Match on PUT but not on CompleteMultipartUpload (TESTING.md), so the
# commit point of a push must be a single PUT (it is: manifests are small).
set -euo pipefail

install() {
  local need=()
  for t in radosgw:radosgw ceph-mon:ceph-mon ceph-osd:ceph-osd; do
    command -v "${t%%:*}" >/dev/null || need+=("${t##*:}")
  done
  [ ${#need[@]} -eq 0 ] && return 0
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

# Kills the daemons whose pid files are in DIR/run.
stop_daemons() {
  local dir=$1 f p
  for f in "$dir"/run/*.pid; do
    [ -f "$f" ] || continue
    p=$(cat "$f")
    kill "$p" 2>/dev/null || true
  done
  for _ in $(seq 50); do
    local alive=0
    for f in "$dir"/run/*.pid; do
      [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && alive=1
    done
    [ "$alive" = 0 ] && break
    sleep 0.2
  done
  for f in "$dir"/run/*.pid; do
    [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true
  done
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_once() {
  local dir=$1 port=$2 access=$3 secret=$4
  local mon_port conf fsid
  mon_port=$(free_port)
  fsid=$(cat /proc/sys/kernel/random/uuid)
  rm -rf "$dir"
  mkdir -p "$dir"/{run,log,mon,osd,rgw}
  conf=$dir/ceph.conf
  cat >"$conf" <<CONF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$mon_port
mon initial members = a
public network = 127.0.0.0/8
auth cluster required = none
auth service required = none
auth client required = none
auth supported = none
# Without cephx only crc connections exist; some daemons default to "secure" only.
ms mon client mode = crc
ms client mode = crc
ms mon cluster mode = crc
ms mon service mode = crc
ms cluster mode = crc
ms service mode = crc
ms bind ipv6 = false
run dir = $dir/run
pid file = $dir/run/\$name.pid
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
keyring = /dev/null
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 1000
mon data avail warn = 2
mon data avail crit = 1
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
[mon]
mon data = $dir/mon/\$cluster-\$id
[osd]
osd data = $dir/osd/\$cluster-\$id
osd objectstore = memstore
memstore device bytes = $(( ${CEPH_MEMSTORE_GIB:-6} << 30 ))
osd max object size = 1073741824
[client.rgw.local]
rgw frontends = beast endpoint=127.0.0.1:$port
rgw data = $dir/rgw
rgw dns name = 127.0.0.1
CONF
  monmaptool --create --addv a "[v2:127.0.0.1:$mon_port]" --fsid "$fsid" "$dir/monmap" >/dev/null
  ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" >"$dir/log/mkfs-mon.log" 2>&1
  ceph-mon -c "$conf" -i a
  ceph -c "$conf" --connect-timeout 20 osd create >/dev/null
  mkdir -p "$dir/osd/ceph-0"
  ceph-osd -c "$conf" -i 0 --mkfs >"$dir/log/mkfs-osd.log" 2>&1 ||
    { echo "ceph-rgw: OSD mkfs failed:" >&2; tail -n 5 "$dir/log/mkfs-osd.log" >&2; return 1; }
  ceph-osd -c "$conf" -i 0
  # The OSD must be up before the gateway creates its pools.
  local up=0
  for _ in $(seq 60); do
    if ceph -c "$conf" --connect-timeout 5 osd stat 2>/dev/null | grep -q '1 up'; then up=1; break; fi
    sleep 0.5
  done
  [ "$up" = 1 ] || { echo "ceph-rgw: the OSD did not come up" >&2; return 1; }
  radosgw -c "$conf" -n client.rgw.local
  # A user with the given keys (the gateway creates its pools on first use).
  local ok=0
  for _ in $(seq 60); do
    if radosgw-admin -c "$conf" -n client.rgw.local user create --uid=vmnest --display-name=vmnest \
      --access-key="$access" --secret="$secret" >"$dir/log/user.log" 2>&1; then ok=1; break; fi
    sleep 0.5
  done
  [ "$ok" = 1 ] || { echo "ceph-rgw: user create failed:" >&2; cat "$dir/log/user.log" >&2; return 1; }
  for _ in $(seq 100); do
    if curl -s -o /dev/null "http://127.0.0.1:$port/"; then return 0; fi
    sleep 0.2
  done
  echo "ceph-rgw: the gateway does not answer on 127.0.0.1:$port" >&2
  return 1
}

case ${1:-} in
  install) install ;;
  start)
    dir=${2:?usage: ceph-rgw.sh start DIR PORT ACCESS SECRET}
    port=${3:?port}; access=${4:?access key}; secret=${5:?secret key}
    install
    for attempt in 1 2; do
      if start_once "$dir" "$port" "$access" "$secret"; then
        echo "ceph-rgw: S3 on http://127.0.0.1:$port (dir $dir)"
        exit 0
      fi
      echo "ceph-rgw: start attempt $attempt failed; logs in $dir/log" >&2
      for f in "$dir"/log/*.log; do tail -n 5 "$f" >&2; done 2>/dev/null || true
      stop_daemons "$dir"
    done
    exit 1
    ;;
  stop)
    dir=${2:?usage: ceph-rgw.sh stop DIR}
    stop_daemons "$dir"
    rm -rf "$dir"
    ;;
  *) sed -n '2,14p' "$0" >&2; exit 2 ;;
esac
