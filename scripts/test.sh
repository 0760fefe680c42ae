#!/usr/bin/env bash
# The test command: installs the test peers, then runs formatting, lints and the whole suite.
# VMNEST_HEAVY=1 also runs the heavy suite: the ignored tests (a VM booted from the store over
# NBD, ...), more crash rounds, and the remote tests again against a Ceph RADOS Gateway
# (scripts/test-ceph.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
if [ -n "${VMNEST_HEAVY:-}" ]; then
  cargo test -p vmnest-tests --test integration -- --ignored
  scripts/test-ceph.sh
fi
