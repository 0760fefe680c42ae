#!/usr/bin/env bash
# The test command: installs the test peers, then runs formatting, lints and the whole suite.
# Heavier suites (none yet) run only with VMNEST_HEAVY=1.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
