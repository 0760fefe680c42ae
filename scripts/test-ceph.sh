#!/usr/bin/env bash
# The remote test suite against a real distributed object store: starts a single-node Ceph RADOS
# Gateway (scripts/ceph-rgw.sh; installs Debian's radosgw, ceph-mon and ceph-osd when missing),
# runs every integration test whose path contains `remote` or `serve_from` against it (the
# remote, remote_gc, remote_crypt and serve_from modules, and mount's `mount --from` test)
# (VMNEST_S3_ENDPOINT: the tests' S3 helper uses it instead of starting moto), then stops it.
# scripts/test.sh runs this when VMNEST_HEAVY is set. Extra arguments go to the test binary.
set -euo pipefail
cd "$(dirname "$0")/.."
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
$sudo scripts/ceph-rgw.sh install
dir=$(mktemp -d /tmp/vmnest-ceph.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
trap 'scripts/ceph-rgw.sh stop "$dir"' EXIT
# The tests' keys (tests/src/s3.rs KEY and SECRET).
scripts/ceph-rgw.sh start "$dir" "$port" vmnest-test-key vmnest-Secret-7Qz9xK2pL
# The tests run the vmnest binary, which `cargo test -p vmnest-tests` alone does not rebuild.
cargo build -p vmnest
VMNEST_S3_ENDPOINT="http://127.0.0.1:$port" \
  cargo test -p vmnest-tests --test integration -- remote serve_from "$@"
