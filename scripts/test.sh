#!/usr/bin/env bash
# The test command: set-up (idempotent), then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --release --bins
cargo test --release -- --test-threads=2 "$@"
