#!/usr/bin/env bash
# One command for every benchmark in BENCHMARKS.md (after the README's set-up):
#   bench/run.sh [BATCH] [SEQ] [STEPS]
# The demo pair: SmolLM2-135M (converted from the demo GGUF) and its 10-layer student. Prints the
# side-by-side tables; JSON reports land in $DISTILL_CACHE/bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --release --bins >&2
B=$CARGO_TARGET_DIR/release/distill
BATCH=${1:-4} SEQ=${2:-512} STEPS=${3:-3}
THREADS=$(nproc)
W="$DISTILL_CACHE/bench"
mkdir -p "$W"
[ -e "$W/teacher/config.json" ] || "$B" convert "$DISTILL_DEMO_TEACHER" "$W/teacher" >&2
[ -e "$W/student/config.json" ] || "$B" convert "$DISTILL_DEMO_TEACHER" "$W/student" --layers 0,3,6,9,12,15,18,21,24,29 >&2
run() { echo "+ $*" >&2; "$@"; }
run "$B" --threads "$THREADS" bench matmul | tee "$W/matmul.txt"
run "$B" --threads "$THREADS" bench step --teacher "$W/teacher" --student "$W/student" --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" --json "$W/ours.json" >/dev/null
run "$B" --threads "$THREADS" bench step --teacher "$W/teacher" --student "$W/student" --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" --chunk 512 --json "$W/ours_chunked.json" >/dev/null
run python bench/reference_step.py --teacher "$W/teacher" --student "$W/student" --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" --threads "$THREADS" > "$W/pytorch.json"
run "$B" --threads "$THREADS" bench losses --shape 4,512,49152 --json "$W/losses_ours.json" >/dev/null
run python bench/reference_losses.py --shape 4,512,49152 --threads "$THREADS" > "$W/losses_pytorch.json"
python - "$W" <<'PY'
import json, sys, os
w = sys.argv[1]
ours, chunked, ref = (json.load(open(os.path.join(w, f))) for f in ("ours.json", "ours_chunked.json", "pytorch.json"))
peak = ours["matmul_peak_gflops"]
fpt = ours["flops_per_token"]
print(f"\nStep: batch {ours['batch']}, seq {ours['seq']}, {ours['threads']} threads, median of {ours['steps']} steps after 1 warm-up; matmul peak {peak:.0f} GFLOP/s; {fpt/1e9:.2f} GFLOP/token\n")
print("| implementation | tokens/s | ms/step | vs PyTorch | MFU | peak RSS (MiB) | vs PyTorch |")
print("|---|---|---|---|---|---|---|")
for r in (ref, ours, chunked):
    mfu = fpt * r["tokens_per_s"] / (peak * 1e9)
    print(f"| {r['implementation']} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.0f} | {r['tokens_per_s']/ref['tokens_per_s']:.2f}x | {100*mfu:.1f}% | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib']/ref['peak_rss_mib']:.2f}x |")
print("\nPhases (median ms): " + ", ".join(n for n, _ in ref["phases"]))
print("| implementation | " + " | ".join(n for n, _ in ref["phases"]) + " |")
print("|---|" + "---|" * len(ref["phases"]))
for r in (ref, ours, chunked):
    print(f"| {r['implementation']} | " + " | ".join(f"{v:.0f}" for _, v in r["phases"]) + " |")
lo, lr = (json.load(open(os.path.join(w, f))) for f in ("losses_ours.json", "losses_pytorch.json"))
print("\nLoss kernels, forward + backward over [4, 512, 49152] (median ms; peak RSS above baseline, MiB)\n")
print("| loss | distill ms | PyTorch ms | ratio | distill MiB | PyTorch MiB |")
print("|---|---|---|---|---|---|")
ref_by = {r["loss"]: r for r in lr}
for r in lo:
    p = ref_by.get(r["loss"])  # the registry's kinds without a PyTorch reference get a dash
    if p is None:
        print(f"| {r['loss']} | {r['ms']:.0f} | — | — | {r['peak_rss_mib']:.0f} | — |")
        continue
    print(f"| {r['loss']} | {r['ms']:.0f} | {p['ms']:.0f} | {p['ms']/r['ms']:.2f}x | {r['peak_rss_mib']:.0f} | {p['peak_rss_mib']:.0f} |")
PY
