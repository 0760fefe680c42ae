# Sourced by the benchmarks that start NBD servers (export.sh, tls.sh).
#
# serving_url OUT ERR: the first URL that a `vmnest serve` started in the background prints to OUT
#   (`serving URL`), waiting up to 5 s for it; when none comes, prints ERR (its stderr) and fails.
# free_port: a TCP port on 127.0.0.1 that nothing listens on now (for qemu-nbd, which cannot pick one).

serving_url() {
  local url _
  for _ in $(seq 50); do grep -q '^serving' "$1" && break; sleep 0.1; done
  url=$(awk '/^serving/ {print $2; exit}' "$1")
  [ -n "$url" ] || { cat "$2" >&2; return 1; }
  echo "$url"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
