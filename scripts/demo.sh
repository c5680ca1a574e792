#!/usr/bin/env bash
# The demo: set-up (idempotent), build, then run the demo on the built-in default.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --release --bins
install_distill # `distill` on the PATH of every new shell (scripts/setup.sh)
exec "$CARGO_TARGET_DIR/release/distill" demo "$@"
