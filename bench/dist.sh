#!/usr/bin/env bash
# Data parallel on this machine (BENCHMARKS.md, "Several processes"), after the README's set-up:
#   bench/dist.sh [STEPS]
# The demo's run (examples/demo.toml: SmolLM2-135M → its 10 layers, forward KL, global micro-batch
# 4 × 128 tokens), STEPS steps (default 12), no evaluation but the last: once as one process with
# one thread, once as `distill launch --nproc 2` with one thread each (micro_batch 2 per process:
# the same global batch), and for comparison once as one process with two threads. Prints the
# median training tokens/s of each (the first 2 steps left out), the scaling efficiency (2-process tokens/s ÷ (2 × 1-process tokens/s)), the median seconds
# rank 0 spends in the gradients' all-reduce per step, and the largest difference between the
# two students' weights. Results in $DISTILL_CACHE/bench/dist/.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --release --bins >&2
W="$DISTILL_CACHE/bench/dist"
mkdir -p "$W"
B="$W/distill"
cp "$CARGO_TARGET_DIR/release/distill" "$B" # a copy: a rebuild meanwhile does not change it
STEPS=${1:-12}
conf() { # name micro_batch
  sed -e "s|^output = .*|output = \"$W/$1\"|" -e "s|^steps = .*|steps = $STEPS|" \
    -e "s|^eval_every = .*|eval_every = 0|" -e "s|^checkpoint_every = .*|checkpoint_every = 0|" \
    -e "s|^micro_batch = .*|micro_batch = $2|" examples/demo.toml > "$W/$1.toml"
}
conf one 4
conf two 2
conf one2 4
echo "+ distill --threads 1 train $W/one.toml --overwrite" >&2
/usr/bin/time -f "one process: %e s wall, peak RSS %M KiB" "$B" --threads 1 train "$W/one.toml" --overwrite > "$W/one.log" 2>&1
echo "+ distill --threads 1 launch --nproc 2 $W/two.toml --overwrite" >&2
/usr/bin/time -f "two processes: %e s wall" "$B" --threads 1 launch --nproc 2 "$W/two.toml" --overwrite > "$W/two.log" 2>&1
echo "+ distill --threads 2 train $W/one2.toml --overwrite" >&2
/usr/bin/time -f "one process, 2 threads: %e s wall" "$B" --threads 2 train "$W/one2.toml" --overwrite > "$W/one2.log" 2>&1
tail -n 1 "$W/one.log" "$W/two.log" "$W/one2.log"
"$DISTILL_CACHE/venv/bin/python" - "$W" <<'PY'
import json, statistics, sys
from safetensors.numpy import load_file
w = sys.argv[1]
def train(name):
    return [r for r in map(json.loads, open(f"{w}/{name}/metrics.jsonl")) if r.get("kind") == "train"][2:]
one, two, one2 = train("one"), train("two"), train("one2")
t1 = statistics.median(r["tokens_per_s"] for r in one)
t2 = statistics.median(r["tokens_per_s"] for r in two)
ar = statistics.median(r["all_reduce_seconds"] for r in two)
st = statistics.median(r["seconds"] for r in two)
a = load_file(f"{w}/one/student/model.safetensors")
b = load_file(f"{w}/two/student/model.safetensors")
diff = max(float(abs(a[k] - b[k]).max()) for k in a)
print(f"| processes × threads | tokens/s (median, {len(one)} steps) | scaling efficiency | all-reduce s/step | step s |")
print(f"|---|---|---|---|---|")
print(f"| 1 × 1 | {t1:.1f} | — | — | {statistics.median(r['seconds'] for r in one):.2f} |")
print(f"| 2 × 1 | {t2:.1f} | {t2 / (2 * t1):.2f} | {ar:.3f} | {st:.2f} |")
t12 = statistics.median(r["tokens_per_s"] for r in one2)
print(f"| 1 × 2 (one process, two threads) | {t12:.1f} | {t12 / (2 * t1):.2f} | — | {statistics.median(r['seconds'] for r in one2):.2f} |")
print(f"largest weight difference between the two students: {diff:.2e}")
PY
