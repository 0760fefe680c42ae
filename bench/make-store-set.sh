#!/usr/bin/env bash
# Builds the store benchmark set (issue 4): a gold Linux disk and clones of it changed the way an
# admin changes a VM, as sparse raw files in OUTDIR:
#
#   gold.raw            bench/make-linux-disk.sh's Debian bookworm disk, as is
#   clone-pkgs.raw      gold + apt-get install nginx postgresql-15 git (with recommends: ~300 MB)
#   clone-upgrade.raw   gold + bookworm-updates and bookworm-security in the sources, apt-get upgrade
#   clone-config.raw    gold + /etc edits (hostname, hosts, sshd_config, timezone, locales, users,
#                       a cron job, a logrotate rule) and a few MiB of logs in /var/log
#
# Each clone starts as a sparse copy of gold; its ext4 partition (at 1 MiB) is loop-mounted, /proc,
# /sys, /dev and /dev/pts are bound, the host's resolv.conf is copied in (the guest's own is put
# back afterwards), a policy-rc.d stops services from starting, and the changes run in a chroot
# with DEBIAN_FRONTEND=noninteractive. Downloaded .debs are removed afterwards (apt-get clean), as
# `apt install` does by default. Needs root and the network (the Debian mirror).
# Cached: a file that exists is not rebuilt (delete it to rebuild).
#
# Usage: bench/make-store-set.sh OUTDIR [LINUX_RAW]   (default LINUX_RAW: bench/work/linux.raw,
#        built with bench/make-linux-disk.sh when missing)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: make-store-set.sh OUTDIR [LINUX_RAW]}
linux=${2:-$here/work/linux.raw}
[ "$(id -u)" = 0 ] || { echo "make-store-set.sh: needs root (loop mounts, chroot)" >&2; exit 1; }
mkdir -p "$out"
out=$(cd "$out" && pwd)

if [ ! -f "$linux" ]; then
  echo "== $linux missing: building it (bench/make-linux-disk.sh)"
  "$here/make-linux-disk.sh" "$linux"
fi

mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
security=$(awk '/^URIs:/ && /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
security=${security:-http://deb.debian.org/debian-security}

report() { # FILE SECONDS
  local f=$1 s=$2
  printf '   %-18s apparent %5d MiB  allocated %5d MiB  %4ds\n' "$(basename "$f")" \
    $(( $(stat -c %s "$f") >> 20 )) $(( $(du -B1 "$f" | cut -f1) >> 20 )) "$s"
}

# --- mounting a clone: state for the cleanup trap ---
mnt=""
loopdev=""
mounted=()
cleanup() {
  local i
  if [ -n "$mnt" ]; then
    rm -f "$mnt/usr/sbin/policy-rc.d" 2>/dev/null || true
    if [ -f "$mnt/etc/resolv.conf.vmnest-bench" ]; then
      mv -f "$mnt/etc/resolv.conf.vmnest-bench" "$mnt/etc/resolv.conf" 2>/dev/null || true
    fi
  fi
  for (( i=${#mounted[@]}-1; i>=0; i-- )); do
    umount "${mounted[$i]}" 2>/dev/null || umount -l "${mounted[$i]}" 2>/dev/null || true
  done
  mounted=()
  if [ -n "$loopdev" ]; then
    losetup -d "$loopdev" 2>/dev/null || true
    loopdev=""
  fi
  if [ -n "$mnt" ]; then
    rmdir "$mnt" 2>/dev/null || true
    mnt=""
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

open_clone() { # IMAGE: loop-mounts its partition at $mnt, ready for chroot
  local img=$1
  mnt=$(mktemp -d /tmp/vmnest-store-set.XXXXXX)
  loopdev=$(losetup -f --show -o $((1 << 20)) "$img")
  mount "$loopdev" "$mnt"; mounted+=("$mnt")
  mount --bind /proc "$mnt/proc"; mounted+=("$mnt/proc")
  mount --bind /sys "$mnt/sys"; mounted+=("$mnt/sys")
  mount --bind /dev "$mnt/dev"; mounted+=("$mnt/dev")
  mount --bind /dev/pts "$mnt/dev/pts"; mounted+=("$mnt/dev/pts")
  if [ -e "$mnt/etc/resolv.conf" ] || [ -L "$mnt/etc/resolv.conf" ]; then
    mv "$mnt/etc/resolv.conf" "$mnt/etc/resolv.conf.vmnest-bench"
  fi
  cp /etc/resolv.conf "$mnt/etc/resolv.conf"
  printf '#!/bin/sh\nexit 101\n' >"$mnt/usr/sbin/policy-rc.d"
  chmod 755 "$mnt/usr/sbin/policy-rc.d"
}

close_clone() {
  sync -f "$mnt"
  cleanup
}

in_chroot() { # SCRIPT (bash, read from stdin of chroot)
  chroot "$mnt" /usr/bin/env -i HOME=/root TERM=dumb PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 /bin/bash -euo pipefail -c "$1"
}

apt_opts='-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold'

# --- the changes, one function per clone (run with the clone mounted at $mnt) ---
change_pkgs() {
  in_chroot "apt-get -q update && apt-get $apt_opts install nginx postgresql-15 git && apt-get clean"
}

change_upgrade() {
  cat >"$mnt/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
EOF
  in_chroot "apt-get -q update && apt-get $apt_opts upgrade && apt-get clean && apt list --upgradable 2>/dev/null | tail -n +2 | wc -l | xargs echo 'still upgradable:'"
}

change_config() {
  # Files an admin edits by hand.
  echo web-07 >"$mnt/etc/hostname"
  cat >"$mnt/etc/hosts" <<'EOF'
127.0.0.1	localhost
127.0.1.1	web-07.example.internal web-07
10.20.0.5	db-01.example.internal db-01
10.20.0.6	cache-01.example.internal cache-01
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF
  cat >"$mnt/etc/fstab" <<'EOF'
# <file system> <mount point> <type> <options> <dump> <pass>
LABEL=root  /  ext4  errors=remount-ro,noatime  0  1
tmpfs       /tmp  tmpfs  nosuid,nodev,size=256m  0  0
EOF
  sed -i -e 's/^#\?PermitRootLogin .*/PermitRootLogin no/' \
    -e 's/^#\?PasswordAuthentication .*/PasswordAuthentication no/' \
    -e 's/^#\?Port .*/Port 2222/' -e 's/^#\?X11Forwarding .*/X11Forwarding no/' \
    "$mnt/etc/ssh/sshd_config"
  printf 'AllowGroups sshusers\nClientAliveInterval 300\nMaxAuthTries 3\n' >>"$mnt/etc/ssh/sshd_config"
  sed -i -e 's/^# *en_US.UTF-8 UTF-8/en_US.UTF-8 UTF-8/' -e 's/^# *de_DE.UTF-8 UTF-8/de_DE.UTF-8 UTF-8/' \
    "$mnt/etc/locale.gen"
  echo 'LANG=en_US.UTF-8' >"$mnt/etc/default/locale"
  cat >"$mnt/etc/cron.d/nightly-backup" <<'EOF'
# m h dom mon dow user command
17 2 * * * root /usr/local/sbin/nightly-backup >>/var/log/nightly-backup.log 2>&1
*/5 * * * * deploy /home/deploy/bin/healthcheck >/dev/null 2>&1
EOF
  mkdir -p "$mnt/usr/local/sbin"
  printf '#!/bin/sh\nset -e\ntar -czf /var/backups/etc-$(date +%%F).tar.gz /etc\nfind /var/backups -name "etc-*.tar.gz" -mtime +14 -delete\n' \
    >"$mnt/usr/local/sbin/nightly-backup"
  chmod 755 "$mnt/usr/local/sbin/nightly-backup"
  cat >"$mnt/etc/motd" <<'EOF'

web-07 -- managed host. Unauthorized access prohibited. Changes go through the ops repo.

EOF
  # Commands an admin runs: users, groups, passwords, timezone, locales.
  in_chroot '
    groupadd -f sshusers
    for u in alice bob carol deploy; do
      id "$u" >/dev/null 2>&1 || useradd -m -s /bin/bash -G sshusers "$u"
      echo "$u:correct-horse-$u" | chpasswd
      install -d -m 700 -o "$u" -g "$u" /home/$u/.ssh
      echo "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI$(echo "$u" | sha256sum | cut -c1-43) $u@laptop" \
        >/home/$u/.ssh/authorized_keys
      chown "$u:$u" /home/$u/.ssh/authorized_keys
    done
    install -d -o deploy -g deploy /home/deploy/bin
    printf "#!/bin/sh\nexit 0\n" >/home/deploy/bin/healthcheck; chmod 755 /home/deploy/bin/healthcheck
    ln -sf /usr/share/zoneinfo/Europe/Berlin /etc/localtime; echo Europe/Berlin >/etc/timezone
    locale-gen
  '
  # Log growth: a few MiB of syslog/auth/nginx-like lines (seeded, so reruns write the same).
  awk -v seed=42 'BEGIN {
    srand(seed)
    split("sshd[%d]: Accepted publickey for %s from 10.20.%d.%d port %d ssh2|CRON[%d]: (%s) CMD (/home/deploy/bin/healthcheck)|systemd[1]: Started session-%d.scope - Session %d of User %s.|kernel: [%d.%06d] EXT4-fs (vda1): mounted filesystem with ordered data mode|sshd[%d]: Failed password for invalid user %s from 203.0.113.%d port %d ssh2", msg, "|")
    split("alice bob carol deploy root admin oracle test", user, " ")
    t = 1700000000
    for (i = 0; i < 60000; i++) {
      t += int(rand() * 7)
      m = msg[int(rand() * 5) + 1]; u = user[int(rand() * 8) + 1]
      line = sprintf(m, int(rand() * 90000), u, int(rand() * 250), int(rand() * 250), int(rand() * 60000) + 1024)
      print strftime("%b %e %H:%M:%S", t) " web-07 " line
    }
  }' >"$mnt/var/log/syslog"
  grep -E 'sshd|CRON' "$mnt/var/log/syslog" >"$mnt/var/log/auth.log"
  mkdir -p "$mnt/var/log/app"
  awk -v seed=7 'BEGIN {
    srand(seed)
    split("GET POST PUT DELETE", verb, " ")
    split("/ /api/v1/orders /api/v1/users /static/app.js /static/app.css /healthz /login", path, " ")
    for (i = 0; i < 40000; i++)
      printf "10.20.%d.%d - - [%s +0100] \"%s %s?id=%d HTTP/1.1\" %d %d \"-\" \"Mozilla/5.0 (X11; Linux x86_64)\" rt=%.3f\n",
        int(rand()*250), int(rand()*250), strftime("%d/%b/%Y:%H:%M:%S", 1700000000 + i * 3), verb[int(rand()*4)+1],
        path[int(rand()*7)+1], int(rand()*1e6), (rand() < 0.97 ? 200 : 502), int(rand()*50000), rand()
  }' >"$mnt/var/log/app/access.log"
  cat >"$mnt/etc/logrotate.d/app" <<'EOF'
/var/log/app/*.log {
    daily
    rotate 14
    compress
    delaycompress
    missingok
    notifempty
}
EOF
}

# --- build ---
t0=$SECONDS
echo "== store set in $out (from $linux)"
if [ -f "$out/gold.raw" ]; then
  echo "   gold.raw exists"
  report "$out/gold.raw" 0
else
  s=$SECONDS
  cp --sparse=always "$linux" "$out/gold.raw.tmp"
  mv "$out/gold.raw.tmp" "$out/gold.raw"
  report "$out/gold.raw" $((SECONDS - s))
fi

for name in pkgs upgrade config; do
  f=$out/clone-$name.raw
  if [ -f "$f" ]; then
    echo "   clone-$name.raw exists"
    report "$f" 0
    continue
  fi
  echo "== clone-$name (log: $out/clone-$name.log)"
  s=$SECONDS
  rm -f "$f.tmp"
  cp --sparse=always "$out/gold.raw" "$f.tmp"
  open_clone "$f.tmp"
  if ! "change_$name" >"$out/clone-$name.log" 2>&1; then
    echo "clone-$name failed; last lines of its log:" >&2
    tail -n 20 "$out/clone-$name.log" >&2
    exit 1
  fi
  grep -E '^(still upgradable|[0-9]+ upgraded)' "$out/clone-$name.log" | sed 's/^/   /' || true
  close_clone
  mv "$f.tmp" "$f"
  report "$f" $((SECONDS - s))
done
echo "== set ready in $((SECONDS - t0))s"
