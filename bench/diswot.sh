#!/usr/bin/env bash
# Ranking students without training (BENCHMARKS.md, "Ranking students without training (DisWOT)"),
# in one command (after the README's set-up):
#   bench/diswot.sh
# On the demo teacher (SmolLM2-135M, 30 layers): six 10-layer students ranked by
# `distill rank-students` (DisWOT, default calibration: the first 32 × 128 tokens of the demo's
# Shakespeare folder), then each trained for the SAME short run (examples/demo.toml with 40 steps,
# evaluated before and at the end on the demo's validation by the live teacher), and Spearman's ρ
# between each training-free ranking and the after-training one. About 25 minutes on 2 idle cores
# (a 40-step run is ~4 minutes; 19 while other jobs shared the cores). Results land in
# $DISTILL_CACHE/bench/diswot/ (the ranking, each run's metrics.jsonl, summary.txt); a run already
# finished is not run again.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --release --bins >&2
W="$DISTILL_CACHE/bench/diswot"
mkdir -p "$W"
B="$W/distill"
cp "$CARGO_TARGET_DIR/release/distill" "$B" # a copy: a rebuild meanwhile does not change it
run() { echo "+ $*" >&2; "$@"; }

# name and the teacher's layers it keeps
CANDIDATES="
every-third 0,3,6,9,12,15,18,21,24,29
similarity 0,1,16,18,19,20,22,23,24,29
one-shot 0,1,22,23,24,25,26,27,28,29
first-ten 0,1,2,3,4,5,6,7,8,9
last-ten 20,21,22,23,24,25,26,27,28,29
random 1,8,9,12,13,15,16,24,27,28
"
# (random = sorted(random.Random(0).sample(range(30), 10)); similarity (iterative) and one-shot are
# `distill prune`'s choices in BENCHMARKS.md, "Choosing the student's layers")

specs=()
while read -r name layers; do
  [ -n "$name" ] && specs+=("layers:$layers")
done <<< "$CANDIDATES"
if [ ! -s "$W/ranking.json" ]; then
  start=$(date +%s)
  run "$B" rank-students "$DISTILL_DEMO_TEACHER" "${specs[@]}" --data "$DISTILL_DEMO_TEXTS" --json > "$W/ranking.json.tmp"
  mv "$W/ranking.json.tmp" "$W/ranking.json"
  echo "ranking took $(( $(date +%s) - start )) s" | tee "$W/ranking.time" >&2
fi

while read -r name layers; do
  [ -n "$name" ] || continue
  out="$W/$name"
  if [ -s "$out/metrics.jsonl" ] && grep '"kind":"eval"' "$out/metrics.jsonl" | grep -q '"step":40[,}]'; then
    continue
  fi
  start=$(date +%s)
  run "$B" train examples/demo.toml --overwrite \
    --set "student.from_teacher.layers=[$layers]" \
    --set run.steps=40 --set run.eval_every=0 --set run.checkpoint_every=0 \
    --set "run.output=\"$out\"" >&2
  echo "$(( $(date +%s) - start ))" > "$out/seconds"
  rm -rf "${out:?}/student" "$out"/checkpoint* # 63.7M parameters a folder; the metrics stay
done <<< "$CANDIDATES"

CANDIDATES="$CANDIDATES" python3 - "$W" <<'EOF' | tee "$W/summary.txt"
import json, os, sys

w = sys.argv[1]
ranking = json.load(open(f"{w}/ranking.json"))
by_layers = {tuple(c["layers"]): c for c in ranking["candidates"]}
rows = []
for line in os.environ["CANDIDATES"].split("\n"):
    if not line.strip():
        continue
    name, layers = line.split()
    layers = tuple(int(x) for x in layers.split(","))
    evals = {}
    for rec in map(json.loads, open(f"{w}/{name}/metrics.jsonl")):
        if rec.get("kind") == "eval":
            evals[rec["step"]] = rec
    r = by_layers[layers]
    secs = open(f"{w}/{name}/seconds").read().strip()
    rows.append(dict(name=name, layers=layers, score=r["score"], sem=r["semantic"], rel=r["relation"],
                     calib_ppl=r["ppl"], ppl0=evals[0]["student_ppl"], ppl=evals[40]["student_ppl"],
                     kl=evals[40]["kl"], top1=evals[40]["top1"], secs=secs))


def ranks(xs):
    """ranks 1.. of xs, ascending, ties averaged"""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a, b):
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb)


rows.sort(key=lambda r: -r["score"])
print(f"{'student':<12} {'layers':<34} {'DisWOT':>9} {'d_sem':>8} {'d_rel':>8} {'calib ppl':>12} "
      f"{'ppl step 0':>12} {'ppl step 40':>11} {'KL 40':>6} {'top-1':>6} {'run s':>6}")
for r in rows:
    print(f"{r['name']:<12} {','.join(map(str, r['layers'])):<34} {r['score']:>9.5f} {r['sem']:>8.5f} "
          f"{r['rel']:>8.5f} {r['calib_ppl']:>12.1f} {r['ppl0']:>12.1f} {r['ppl']:>11.2f} {r['kl']:>6.3f} "
          f"{r['top1']:>6.3f} {r['secs']:>6}")
after = [r["ppl"] for r in rows]  # lower is better: correlate predicted "badness" with it
print()
print(f"Spearman rho with the after-training perplexity ranking (n = {len(rows)}; +1 = the same order):")
for label, key, sign in [
    ("DisWOT score (-(d_sem + d_rel))", "score", -1),
    ("semantic term alone (d_sem)", "sem", 1),
    ("relation term alone (d_rel)", "rel", 1),
    ("untrained perplexity, calibration text", "calib_ppl", 1),
    ("untrained perplexity, validation (step 0)", "ppl0", 1),
]:
    print(f"  {label:<44} {spearman([sign * r[key] for r in rows], after):+.3f}")
print(f"  {'after-training KL (check: same run)':<44} {spearman([r['kl'] for r in rows], after):+.3f}")
EOF
