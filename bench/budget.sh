#!/usr/bin/env bash
# A teacher-query budget at demo scale (BENCHMARKS.md, "Teacher-query budget"): examples/demo.toml's
# pair and texts, 60 steps, data.max_train_tokens = 40000 (312 training sequences of 128 tokens),
# one thread per run, two runs at a time: the full teacher, budget 0.3 with `rad`, budget 0.3 with
# `random` (unselected rows train with cross-entropy). Outputs under ${OUT:-/tmp/bbench}.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${DISTILL:-$CARGO_TARGET_DIR/release/distill}
OUT=${OUT:-/tmp/bbench}
mkdir -p "$OUT"
COMMON=(--threads 1 train examples/demo.toml --overwrite
  --set data.max_train_tokens=40000 --set run.steps=60 --set run.eval_every=60
  --set run.checkpoint_every=60 --set run.log_every=1)
run() { # name, extra --set arguments
  local name=$1; shift
  /usr/bin/time -f "%e s wall" "$D" "${COMMON[@]}" --set run.output=\""$OUT/$name"\" "$@" \
    > "$OUT/$name.log" 2>&1
}
run full &
run rad --set teacher.budget=0.3 --set teacher.selection=\"rad\" &
wait
run random --set teacher.budget=0.3 --set teacher.selection=\"random\"
for r in full rad random; do
  echo "== $r: $(tail -1 "$OUT/$r.log")"
  grep -h '"kind":"budget"' "$OUT/$r/metrics.jsonl" | python3 -c 'import json,sys
for l in sys.stdin:
    r=json.loads(l); print("selection", r["selection"], "chosen", r["chosen"], "of", r["sequences"], "in %.1f s" % r["seconds"])' || true
  grep -h '"kind":"eval"\|"kind":"summary"' "$OUT/$r/metrics.jsonl"
  grep -h '"kind":"train"' "$OUT/$r/metrics.jsonl" | tail -1
done
