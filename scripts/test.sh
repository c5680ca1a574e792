#!/usr/bin/env bash
# The test command: set-up (idempotent), then the whole suite, closing with one summary line.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
# the user's binary (default features) goes on the PATH; the tests build their own with the
# fault-test hooks (feature `fault-injection`)
cargo build --release --bins
install_distill # `distill` on the PATH of every new shell (scripts/setup.sh)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --release --features fault-injection -- --test-threads=2 "$@" 2>&1 | tee "$log" || status=$?
# every test binary's "test result:" line, added up
read -r passed failed < <(awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } } END { print p + 0, f + 0 }' "$log")
echo
echo "$passed passed, $failed failed"
exit "$status"
