#!/usr/bin/env bash
# Choosing the student's layers (BENCHMARKS.md), in one command (after the README's set-up):
#   bench/prune.sh
# On the demo teacher (SmolLM2-135M, 30 layers) → 10 layers: the demo's every-third list and each
# similarity strategy (`distill prune`, calibration = the first 16 × 256 tokens of the demo's
# Shakespeare folder), each student judged untrained on the demo's validation by the live teacher
# (`distill eval --run examples/demo.toml`: what the demo's "before" row reports). About 15 minutes
# on 2 cores (the iterative strategies measure the shrinking model again each round: most of it).
# Results land in $DISTILL_CACHE/bench/prune/ (one table, one eval JSON per choice).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --release --bins >&2
W="$DISTILL_CACHE/bench/prune"
mkdir -p "$W"
B="$W/distill"
cp "$CARGO_TARGET_DIR/release/distill" "$B" # a copy: a rebuild meanwhile does not change it
run() { echo "+ $*" >&2; "$@"; }
judge() { # name: the student $W/name, judged, then removed (63.7M parameters a folder)
  run "$B" eval "$W/$1" --run examples/demo.toml > "$W/$1.eval.json"
  rm -rf "${W:?}/$1"
}

if [ ! -s "$W/every-third.eval.json" ]; then
  rm -rf "$W/every-third"
  run "$B" convert "$DISTILL_DEMO_TEACHER" "$W/every-third" --layers 0,3,6,9,12,15,18,21,24,29 >&2
  judge every-third
fi
# STRATEGIES="one-shot independent" bench/prune.sh measures only those (results of others stay)
for s in ${STRATEGIES:-one-shot independent iterative iterative:4}; do
  for ends in keep remove; do
    name="${s/:/-}-$ends"
    flag=()
    [ "$ends" = remove ] && flag=(--remove-ends)
    rm -rf "${W:?}/$name"
    run "$B" prune "$DISTILL_DEMO_TEACHER" --keep 10 --data "$DISTILL_DEMO_TEXTS" --strategy "$s" \
      "${flag[@]}" --out "$W/$name" | tee "$W/$name.txt"
    judge "$name"
  done
done
# the one-shot candidates (remove layers l..l+19, l = 0..10), each judged: how well d ranks them
for l in 0 1 2 3 4 5 6 7 8 9 10; do
  name="run-$l"
  [ -s "$W/$name.eval.json" ] && continue
  layers=$(python3 -c "import sys; l=int(sys.argv[1]); print(','.join(map(str, [*range(l), *range(l + 20, 30)])))" $l)
  rm -rf "${W:?}/$name"
  run "$B" convert "$DISTILL_DEMO_TEACHER" "$W/$name" --layers "$layers" >&2
  echo "kept layers: [${layers//,/, }]" > "$W/$name.txt"
  judge "$name"
done
printf '\n%-24s %-40s %14s %8s %6s\n' choice layers "student ppl" KL top-1
for f in "$W"/*.eval.json; do
  name=$(basename "$f" .eval.json)
  layers=$(grep -ho 'kept layers: .*' "$W/$name.txt" 2>/dev/null | cut -d' ' -f3- || true)
  [ -n "$layers" ] || layers="[0, 3, 6, 9, 12, 15, 18, 21, 24, 29]"
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('%-24s %-40s %14.2f %8.3f %6.3f' % (sys.argv[2], sys.argv[3], r['student_ppl'], r['kl'], r['top1']))" "$f" "$name" "$layers"
done | tee "$W/summary.txt"
