#!/usr/bin/env bash
# The test command: set-up (idempotent), then the whole suite, every test binary even after one
# fails (--no-fail-fast), closing with each binary's counts and one summary line.
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
cargo test --release --features fault-injection --no-fail-fast -- --test-threads=2 "$@" 2>&1 | tee "$log" || status=$?
# One line per test binary (cargo's "Running X" or "Doc-tests X", then its "test result:" line);
# a binary that started but printed no result (it crashed or was killed) counts as one failure.
# Last line: the totals.
summary=$(awk '
  function close_binary() {
    if (name != "" && !seen) { printf "%-36s no result (crashed?), counted as 1 failed\n", name; f += 1 }
    seen = 0
  }
  /^     Running (unittests )?[^ ]+ \(.*\)$/ { close_binary(); name = ($2 == "unittests") ? $2 " " $3 : $2 }
  /^   Doc-tests [^ ]+$/ { close_binary(); name = "doc-tests " $2 }
  /^test result:/ {
    bp = 0; bf = 0
    for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) bp = $i; if ($(i+1) ~ /^failed/) bf = $i }
    printf "%-36s %d passed, %d failed\n", name, bp, bf
    p += bp; f += bf; seen = 1
  }
  END { close_binary(); print p + 0 " passed, " f + 0 " failed" }
' "$log")
echo
echo "$summary"
failed=$(tail -n 1 <<<"$summary" | awk '{ print $3 }')
if [ "$status" -eq 0 ] && [ "$failed" != 0 ]; then status=1; fi
exit "$status"
