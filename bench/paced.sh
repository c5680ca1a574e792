#!/usr/bin/env bash
# PACED weighting vs none at equal steps on the arithmetic problems (BENCHMARKS.md, "PACED").
# Two runs of examples/paced.toml, 40 steps (forward KL 1–20, reverse KL 21–40), 88 training
# problems (data.max_train_tokens = 1600), 32 validation problems, 4 rollouts, pass rates refreshed
# after 0 and 20 steps, one thread each, side by side: α = β = 1 (PACED) and α = β = 0 (w ≡ 1: the
# same rollouts and records, no weighting). Outputs under ${OUT:-/tmp/pbench}.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${DISTILL:-$CARGO_TARGET_DIR/release/distill}
OUT=${OUT:-/tmp/pbench}
mkdir -p "$OUT"
sed -e 's/steps = \[1, 50\]/steps = [1, 20]/; s/steps = \[51, 100\]/steps = [21, 40]/' \
  examples/paced.toml > "$OUT/paced40.toml"
cp examples/arithmetic.jsonl examples/arithmetic_validation.jsonl "$OUT/"
COMMON=(--threads 1 train "$OUT/paced40.toml" --overwrite
  --set data.max_train_tokens=1600 --set data.max_validation_sequences=32
  --set run.steps=40 --set run.eval_every=40 --set run.checkpoint_every=40
  --set paced.rollouts=4 --set paced.refresh_every=20)
"$D" "${COMMON[@]}" --set run.output=\""$OUT/paced"\" > "$OUT/paced.log" 2>&1 &
"$D" "${COMMON[@]}" --set paced.alpha=0 --set paced.beta=0 \
  --set run.output=\""$OUT/uniform"\" > "$OUT/uniform.log" 2>&1 &
wait
grep -h '"paced"\|"eval"' "$OUT/paced/metrics.jsonl" "$OUT/uniform/metrics.jsonl"
