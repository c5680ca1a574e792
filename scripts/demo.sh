#!/usr/bin/env bash
# The demo: set-up (idempotent), build, then run the demo on the built-in default.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --release --bins
exec "$CARGO_TARGET_DIR/release/distill" demo "$@"
