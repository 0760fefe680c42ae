#!/usr/bin/env bash
# Starts moto's S3 server (installed by scripts/install-test-deps.sh) on 127.0.0.1:PORT, in the
# foreground (the tests run it as a child and kill it). Any access key and secret are accepted;
# objects live in memory only.
set -euo pipefail
port="${1:?usage: s3-test-server.sh PORT}"
moto_dir="${VMNEST_MOTO_DIR:-/opt/vmnest-moto}"
exec "$moto_dir/bin/moto_server" -H 127.0.0.1 -p "$port"
