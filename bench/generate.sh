#!/usr/bin/env bash
# Batched generation against transformers' generate (BENCHMARKS.md), after the README's set-up:
#   bench/generate.sh [BATCH] [MAX_NEW_TOKENS]
# The demo teacher (SmolLM2-135M-Instruct, f32 HF folder) answers the 20 prompts of
# examples/chat.jsonl (each conversation without its final answer, chat template applied), BATCH
# at a time, greedy, EOS ignored (every answer MAX_NEW_TOKENS long), with all cores; then
# transformers does the same. Loading is excluded from both times. Results in
# $DISTILL_CACHE/bench/generate/. THREADS=1 bench/generate.sh runs both on one thread.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --release --bins >&2
B=$CARGO_TARGET_DIR/release/distill
BATCH=${1:-8} NEW=${2:-32}
THREADS=${THREADS:-$(nproc)}
W="$DISTILL_CACHE/bench/generate"
mkdir -p "$W"
T="$DISTILL_CACHE/bench/teacher"
[ -e "$T/config.json" ] || "$B" convert "$DISTILL_DEMO_TEACHER" "$T" >&2
python3 - examples/chat.jsonl "$W/prompts.jsonl" <<'PY'
import json, sys
with open(sys.argv[2], "w") as out:
    for line in open(sys.argv[1]):
        m = json.loads(line)["messages"]
        while m and m[-1]["role"] == "assistant":
            m = m[:-1]
        out.write(json.dumps({"messages": m}) + "\n")
PY
run() { echo "+ $*" >&2; "$@"; }
run "$B" --threads "$THREADS" generate "$T" --prompts "$W/prompts.jsonl" --batch "$BATCH" \
  --max-new-tokens "$NEW" --ignore-eos --out "$W/ours.jsonl" 2> "$W/ours.txt"
cat "$W/ours.txt" >&2
run python bench/reference_generate.py --model "$T" --prompts "$W/prompts.jsonl" --batch "$BATCH" \
  --max-new-tokens "$NEW" --threads "$THREADS" > "$W/transformers.json"
python3 - "$W" "$BATCH" "$NEW" "$THREADS" <<'PY'
import json, re, sys
w, batch, new, threads = sys.argv[1:]
ours = [json.loads(l) for l in open(f"{w}/ours.jsonl")]
line = open(f"{w}/ours.txt").read()
ours_s = float(re.search(r"in ([0-9.]+) s", line).group(1))
ours_n = sum(r["tokens"] for r in ours)
ref = json.load(open(f"{w}/transformers.json"))
same = sum(a["completion"] == b for a, b in zip(ours, ref["completions"]))
print(f"\nGeneration: {len(ours)} prompts, batch {batch}, {new} new tokens each, greedy, {threads} threads")
print(f"{'':14} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
print(f"{'distill':14} {ours_n:>7} {ours_s:>8.2f} {ours_n / ours_s:>9.1f}")
print(f"{'transformers':14} {ref['tokens']:>7} {ref['seconds']:>8.2f} {ref['tokens_per_s']:>9.1f}")
print(f"ratio (distill / transformers): {(ours_n / ours_s) / ref['tokens_per_s']:.2f}x; identical answers: {same} of {len(ours)}")
PY
