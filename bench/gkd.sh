#!/usr/bin/env bash
# GKD against off-policy distillation at demo scale (BENCHMARKS.md), after the README's set-up:
#   bench/gkd.sh [STEPS_GKD] [STEPS_OFF]
# The demo's run (examples/demo.toml: SmolLM2-135M → its 10 layers, Shakespeare, forward KL), once
# with `[onpolicy] fraction = 0.5` (GKD: half the steps on the student's own 32-token continuations
# of 32-token prompts) and once with `fraction = 0` (off-policy, step for step the plain run, but its
# evaluations add the same exposure-bias measure). Both runs go at once, one thread each, so that
# they share the machine alike; the off-policy run gets more steps for about the same wall time
# (STEPS_OFF; choose it from the GKD run's time per step). Every evaluation reports the held-out
# perplexity and, on the student's own continuations of the validation prompts, the teacher's
# per-token KL and perplexity (`onpolicy` in the eval records). Results in $DISTILL_CACHE/bench/gkd/.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --release --bins >&2
W="$DISTILL_CACHE/bench/gkd"
mkdir -p "$W"
B="$W/distill"
cp "$CARGO_TARGET_DIR/release/distill" "$B" # a copy: a rebuild meanwhile does not change it
GKD=${1:-150} OFF=${2:-150}
run() { # name steps fraction
  sed -e "s|^output = .*|output = \"$W/$1\"|" -e "s|^steps = .*|steps = $2|" \
    -e "s|^eval_every = .*|eval_every = 25|" examples/demo.toml > "$W/$1.toml"
  printf '\n[onpolicy]\nfraction = %s\nprompt_tokens = 32\nmax_new_tokens = 32\n' "$3" >> "$W/$1.toml"
  echo "+ distill --threads 1 train $W/$1.toml --overwrite" >&2
  /usr/bin/time -f "$1: %e s wall" "$B" --threads 1 train "$W/$1.toml" --overwrite > "$W/$1.log" 2>&1
}
run gkd "$GKD" 0.5 &
run off "$OFF" 0 &
wait
tail -n 1 "$W/gkd.log" "$W/off.log"
python3 - "$W" <<'PY'
import json, sys
w = sys.argv[1]
# seconds: the training steps' own time up to the evaluation (evaluations excluded)
print(f"{'run':5} {'step':>5} {'seconds':>8} {'held-out ppl':>12} {'KL':>7} {'own-text KL':>11} {'teacher ppl of own text':>24}")
for name in ["gkd", "off"]:
    t = 0.0
    for line in open(f"{w}/{name}/metrics.jsonl"):
        r = json.loads(line)
        if r.get("kind") == "train":
            t += r["seconds"]
        if r.get("kind") == "eval":
            o = r["onpolicy"]
            print(f"{name:5} {r['step']:>5} {t:>8.0f} {r['student_ppl']:>12.2f} {r['kl']:>7.4f} {o['kl']:>11.4f} {o['teacher_ppl']:>24.2f}")
PY
