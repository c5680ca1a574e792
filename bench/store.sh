#!/usr/bin/env bash
# The teacher-store measurements of BENCHMARKS.md, in one command (after the README's set-up):
#   bench/store.sh
# 1. selection settings on the demo teacher over the demo's validation positions: bytes/token,
#    k, captured mass, KL(full ‖ reconstructed), KL(reduced), top-1 (`distill store inspect/verify`);
# 2. capture throughput against the bare teacher forward over the same batches;
# 3. quality: the demo's 150 steps from the live teacher and from a store (same seed), both final
#    students judged by the live teacher (`distill eval --run`);
# 4. a training step from a store against the PyTorch online step (same batch, threads).
# About 30 minutes on 2 cores. Results land in $DISTILL_CACHE/bench/store/.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --release --bins >&2
W="$DISTILL_CACHE/bench/store"
mkdir -p "$W"
B="$W/distill"
cp "$CARGO_TARGET_DIR/release/distill" "$B" # a copy: a rebuild meanwhile does not change it
T=$(nproc)
run() { echo "+ $*" >&2; "$@"; }
BW="$DISTILL_CACHE/bench"
[ -e "$BW/teacher/config.json" ] || run "$B" convert "$DISTILL_DEMO_TEACHER" "$BW/teacher" >&2
[ -e "$BW/student/config.json" ] || run "$B" convert "$DISTILL_DEMO_TEACHER" "$BW/student" --layers 0,3,6,9,12,15,18,21,24,29 >&2

# 1. settings (validation positions only: --steps 0)
for s in "0.9 16 u8 0" "0.95 32 u8 0" "0.99 64 u8 0" "0.95 32 f16 0" "0.95 16 u8 32"; do
  set -- $s
  d="$W/settings-$1-$2-$3-$4"
  rm -rf "$d"
  run "$B" --threads "$T" capture examples/demo_store.toml --steps 0 --out "$d" \
    --set capture.coverage=$1 --set capture.max_k=$2 --set "capture.quantisation=\"$3\"" \
    --set capture.tail_samples=$4 >&2
  "$B" store inspect "$d" --json > "$d.inspect.json"
  run "$B" --threads "$T" store verify "$d" --positions 2048 --json > "$d.verify.json"
done

# 2. capture throughput at the defaults (36 sequences, after a warm-up forward)
rm -rf "$W/throughput"
run "$B" --threads "$T" capture examples/demo_store.toml --steps 5 --out "$W/throughput" --compare-forward | tee "$W/throughput.txt"

# 3. quality: live vs store, 150 steps, same seed
run "$B" --threads "$T" train examples/demo.toml --overwrite --set "run.output=\"$W/live\"" >&2
run "$B" --threads "$T" eval "$W/live/student" --run examples/demo.toml > "$W/live.eval.json"
# the top-k store (tail = one bucket) and the sampled-tail store (the defaults)
for kind in topk sampled; do
  # every setting named, so the rows say exactly what was captured whatever the run file holds
  if [ $kind = topk ]; then k=32 n=0; else k=16 n=32; fi
  sets="--set capture.coverage=0.95 --set capture.max_k=$k --set capture.tail_samples=$n --set capture.quantisation=\"u8\""
  rm -rf "$W/store-$kind"
  run "$B" --threads "$T" capture examples/demo_store.toml --steps 150 --out "$W/store-$kind" $sets | tee "$W/capture-$kind.txt"
  run "$B" --threads "$T" train examples/demo_store.toml --overwrite --set "teacher.store=\"$W/store-$kind\"" --set "run.output=\"$W/from-store-$kind\"" >&2
  run "$B" --threads "$T" eval "$W/from-store-$kind/student" --run examples/demo.toml > "$W/from-store-$kind.eval.json"
  "$B" store inspect "$W/store-$kind" --json > "$W/store-$kind.inspect.json"
done

# 4. the step: PyTorch online, ours online, ours from a store (batch 4 × 512, chunk 512)
run python bench/reference_step.py --teacher "$BW/teacher" --student "$BW/student" --batch 4 --seq 512 --steps 3 --threads "$T" > "$W/step-pytorch.json"
run "$B" --threads "$T" bench step --teacher "$BW/teacher" --student "$BW/student" --batch 4 --seq 512 --steps 3 --chunk 512 --json "$W/step-live.json" >/dev/null
rm -rf "$W/step-store"
run "$B" --threads "$T" bench step --teacher "$BW/teacher" --student "$BW/student" --batch 4 --seq 512 --steps 3 --chunk 512 --store "$W/step-store" --json "$W/step-store.json" >/dev/null
run "$B" --threads "$T" bench step --teacher "$BW/teacher" --student "$BW/student" --batch 4 --seq 512 --steps 3 --chunk 128 --store "$W/step-store" --json "$W/step-store-c128.json" >/dev/null

python - "$W" <<'PY'
import json, sys, os, glob
w = sys.argv[1]
j = lambda f: json.load(open(os.path.join(w, f)))
print("\nSelection settings (demo teacher, the demo's 2,032 validation positions, T = 1)\n")
print("| coverage | max_k | tail draws | log p | bytes/token | mean k | p90 k | captured mass | KL(full ‖ reconstructed) | KL(reduced) | top-1 |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for s in ["0.9-16-u8-0", "0.95-32-u8-0", "0.99-64-u8-0", "0.95-32-f16-0", "0.95-16-u8-32"]:
    i, v = j(f"settings-{s}.inspect.json"), j(f"settings-{s}.verify.json")
    c, k, q, n = s.split("-")
    print(f"| {c} | {k} | {n} | {q} | {i['bytes_per_token']:.1f} | {i['mean_k']:.1f} | {i['p90_k']} | {v['captured_mass']:.3f} | {v['kl_reconstructed']:.3f} | {v['kl_reduced']:.5f} | {v['top1']:.3f} |")
print("\nCapture throughput: " + open(os.path.join(w, "throughput.txt")).read().strip().replace("\n", "; "))
live = j("live.eval.json")
print(f"\nQuality: the demo, 150 steps, seed 0; every student judged by the live teacher on the 16 validation sequences\n")
print("| teacher signal | bytes/token | student ppl | KL(teacher ‖ student) | top-1 | ppl vs live | KL vs live |")
print("|---|---|---|---|---|---|---|")
print(f"| live teacher | — | {live['student_ppl']:.2f} | {live['kl']:.4f} | {live['top1']:.4f} | | |")
for kind, name in (("topk", "store: top 32 + tail bucket"), ("sampled", "store: head 16 + 32 tail draws")):
    st, ins = j(f"from-store-{kind}.eval.json"), j(f"store-{kind}.inspect.json")
    print(f"| {name} | {ins['bytes_per_token']:.1f} | {st['student_ppl']:.2f} | {st['kl']:.4f} | {st['top1']:.4f} | {100*(st['student_ppl']/live['student_ppl']-1):+.1f}% | {100*(st['kl']/live['kl']-1):+.1f}% |")
for f in ("live", "from-store-topk", "from-store-sampled"):
    recs = [json.loads(l) for l in open(os.path.join(w, f, "metrics.jsonl"))]
    s = [r for r in recs if r["kind"] == "summary"][0]
    print(f"{f}: run wall time {s['seconds']:.0f} s")
ref, on, sto, c128 = j("step-pytorch.json"), j("step-live.json"), j("step-store.json"), j("step-store-c128.json")
print("\nStep: batch 4 × 512, median of 3 steps after 1 warm-up\n")
print("| implementation | tokens/s | vs PyTorch | peak RSS (MiB) | vs PyTorch |")
print("|---|---|---|---|---|")
for r in (ref, on, sto, c128):
    print(f"| {r['implementation']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s']/ref['tokens_per_s']:.2f}x | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib']/ref['peak_rss_mib']:.2f}x |")
PY
