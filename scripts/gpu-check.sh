#!/usr/bin/env bash
# The GPU check: one short script for a machine with CUDA (BENCHMARKS.md, "On a GPU"). It builds,
# then prints one table:
#   1. CUDA found (torch's view and distill's: a matmul on cuda)
#   2. a training step on CUDA equals the CPU step: the demo run's first 2 steps on each, f32;
#      the logged loss and gradient norm of each step and the evaluation's KL within 1e-3
#      (relative); TF32 is off in libtorch by default, so both are f32 products
#   3. a bf16 student trains on CUDA: 12 steps, every loss finite, the last below the first
#   4. the bench step (teacher forward, student forward/backward, forward KL, AdamW; batch 8 × 512)
#      against the PyTorch reference on the same GPU, and its MFU against the GPU's measured f32
#      matmul peak
#   5. with 2 GPUs: `distill launch --nproc 2` on NCCL against one process, same global batch
# Usage: scripts/gpu-check.sh            (results also in $DISTILL_CACHE/gpu-check/)
#        GPU_CHECK_DRY=1 scripts/gpu-check.sh   every step on the CPU instead (a rehearsal of the
#        script on a machine without a GPU: "CUDA" rows then compare the CPU with itself)
# Needs the README's set-up (the venv with a CUDA torch, the demo assets): on a machine without
# network, a set-up made before. The checks after the build take ~3-5 minutes on one H100-class GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh >/dev/null || { echo "gpu-check: the set-up failed (scripts/setup.sh)"; exit 1; }
set +e
cargo build --release --bins >&2 || { echo "gpu-check: the build failed"; exit 1; }
B="$CARGO_TARGET_DIR/release/distill"
W="$DISTILL_CACHE/gpu-check"
mkdir -p "$W"
PY="$DISTILL_CACHE/venv/bin/python"
declare -a ROWS
row() { ROWS+=("| $1 | $2 | $3 |"); echo "gpu-check: $1: $2 ($3)" >&2; }
started=$(date +%s)
DEV=cuda BATCH=8 SEQ=512
if [ -n "${GPU_CHECK_DRY:-}" ]; then DEV=cpu BATCH=2 SEQ=128; fi

# 1. CUDA
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
name=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')")
peak=$("$B" --device $DEV bench matmul --n $([ $DEV = cpu ] && echo 1024 || echo 8192) 2>"$W/matmul.err" | sed -n 's/.*: \([0-9.]*\) GFLOP\/s/\1/p')
if [ -n "${GPU_CHECK_DRY:-}" ]; then
  row "CUDA found" "dry run" "every step on the CPU; f32 matmul peak $peak GFLOP/s"
elif [ "$gpus" -gt 0 ] && [ -n "$peak" ]; then
  row "CUDA found" "yes" "$gpus × $name; torch $("$PY" -c 'import torch; print(torch.__version__)'); distill's f32 matmul peak $peak GFLOP/s; NCCL built: $(nm "$B" | grep -q ProcessGroupNCCL && echo yes || echo no)"
else
  row "CUDA found" "NO" "torch sees $gpus GPUs; distill: $(tail -n 1 "$W/matmul.err")"
  printf '\n| check | result | detail |\n|---|---|---|\n'; printf '%s\n' "${ROWS[@]}"
  exit 1
fi

# the demo pair as HF folders (as bench/run.sh makes them)
T="$DISTILL_CACHE/bench/teacher" S="$DISTILL_CACHE/bench/student"
[ -e "$T/config.json" ] || "$B" convert "$DISTILL_DEMO_TEACHER" "$T" >&2
[ -e "$S/config.json" ] || "$B" convert "$DISTILL_DEMO_TEACHER" "$S" --layers 0,1,2,3,24,25,26,27,28,29 >&2
conf() { # name steps [one more sed expression]
  local extra=()
  [ -n "${3:-}" ] && extra=(-e "$3")
  sed -e "s|^output = .*|output = \"$W/$1\"|" -e "s|^steps = .*|steps = $2|" \
    -e "s|^eval_every = .*|eval_every = $2|" -e "s|^checkpoint_every = .*|checkpoint_every = 0|" \
    -e "s|^max_train_tokens = .*|max_train_tokens = 40000|" "${extra[@]}" examples/demo.toml > "$W/$1.toml"
}

# 2. CPU step = CUDA step
conf cpu 2; conf cuda 2
"$B" --device cpu train "$W/cpu.toml" --overwrite >"$W/cpu.log" 2>&1
"$B" --device $DEV train "$W/cuda.toml" --overwrite >"$W/cuda.log" 2>&1
same=$("$PY" - "$W" <<'PY'
import json, sys
w = sys.argv[1]
def recs(n):
    try:
        return [json.loads(l) for l in open(f"{w}/{n}/metrics.jsonl")]
    except OSError as e:
        return []
a, b = recs("cpu"), recs("cuda")
pairs = []
for r, s in zip([r for r in a if r.get("kind") == "train"], [r for r in b if r.get("kind") == "train"]):
    pairs += [("loss", r["loss"], s["loss"]), ("grad_norm", r["grad_norm"], s["grad_norm"])]
ea, eb = [r for r in a if r.get("kind") == "eval"], [r for r in b if r.get("kind") == "eval"]
if ea and eb:
    pairs.append(("eval KL", ea[-1]["kl"], eb[-1]["kl"]))
if len(pairs) < 5:
    print("FAIL a run did not finish (see cpu.log, cuda.log)")
else:
    worst = max(abs(x - y) / max(abs(x), 1e-12) for _, x, y in pairs)
    print(("yes" if worst <= 1e-3 else "NO") + f" largest relative difference {worst:.1e} over {len(pairs)} values (loss, grad norm per step; eval KL)")
PY
)
row "CUDA step = CPU step (f32, 1e-3)" "${same%% *}" "${same#* }"

# 3. bf16 trains
conf bf16 12 's|^from_teacher = \(.*\)|from_teacher = \1\ndtype = "bf16"|' 
"$B" --device $DEV train "$W/bf16.toml" --overwrite >"$W/bf16.log" 2>&1
bf=$("$PY" - "$W" <<'PY'
import json, math, sys
try:
    l = [json.loads(x)["loss"] for x in open(f"{sys.argv[1]}/bf16/metrics.jsonl") if '"kind":"train"' in x.replace(" ", "")]
except OSError:
    l = []
ok = len(l) == 12 and all(x is not None and math.isfinite(x) for x in l) and l[-1] < l[0]
print(("yes" if ok else "NO") + (f" loss {l[0]:.3f} -> {l[-1]:.3f} over 12 steps" if l and l[0] is not None and l[-1] is not None else " no losses (see bf16.log)"))
PY
)
row "bf16 student trains" "${bf%% *}" "${bf#* }"

# 4. the bench step against PyTorch on the GPU
"$B" --device $DEV bench step --teacher "$T" --student "$S" --batch $BATCH --seq $SEQ --steps 5 --json "$W/ours.json" >/dev/null 2>"$W/ours.err"
"$B" --device $DEV bench step --teacher "$T" --student "$S" --batch $BATCH --seq $SEQ --steps 5 --chunk 1024 --json "$W/ours_chunked.json" >/dev/null 2>>"$W/ours.err"
"$PY" bench/reference_step.py --teacher "$T" --student "$S" --batch $BATCH --seq $SEQ --steps 5 --device $DEV >"$W/pytorch.json" 2>"$W/pytorch.err"
st=$("$PY" - "$W" "$BATCH x $SEQ" <<'PY'
import json, sys
w = sys.argv[1]
try:
    ours, ch, ref = (json.load(open(f"{w}/{f}")) for f in ("ours.json", "ours_chunked.json", "pytorch.json"))
except (OSError, ValueError) as e:
    print(f"FAIL {e}")
    sys.exit()
peak = ours["matmul_peak_gflops"] * 1e9
mfu = lambda r: 100 * ours["flops_per_token"] * r["tokens_per_s"] / peak
gpu = f", peak GPU memory {ref['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in ref else ""
print(f"{ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x ours {ours['tokens_per_s']:.0f} tok/s (MFU {mfu(ours):.1f}%), chunk 1024 {ch['tokens_per_s']:.0f} tok/s (MFU {mfu(ch):.1f}%), PyTorch {ref['tokens_per_s']:.0f} tok/s (MFU {mfu(ref):.1f}%{gpu}); batch {sys.argv[2]}, peak {peak / 1e9:.0f} GFLOP/s f32")
PY
)
row "bench step vs PyTorch (GPU)" "${st%% *}" "${st#* }"

# 5. two processes on NCCL
if [ "$gpus" -ge 2 ] && [ -z "${GPU_CHECK_DRY:-}" ]; then
  conf one 4 's|^micro_batch = .*|micro_batch = 4|'
  conf two 4 's|^micro_batch = .*|micro_batch = 2|' 
  "$B" --device cuda train "$W/one.toml" --overwrite >"$W/one.log" 2>&1
  "$B" --device cuda launch --nproc 2 "$W/two.toml" --overwrite >"$W/two.log" 2>&1
  nc=$("$PY" - "$W" <<'PY'
import sys
from safetensors.numpy import load_file
w = sys.argv[1]
try:
    a, b = (load_file(f"{w}/{n}/student/model.safetensors") for n in ("one", "two"))
except OSError as e:
    print(f"FAIL {e}"); sys.exit()
d = max(float(abs(a[k] - b[k]).max()) for k in a)
print(("yes" if d < 1e-4 else "NO") + f" largest weight difference {d:.1e} after 4 steps (1 x 4 rows vs 2 x 2)")
PY
)
  row "2 processes on NCCL = 1 process" "${nc%% *}" "${nc#* }"
else
  row "2 processes on NCCL" "not run" "$gpus GPU on this machine (needs 2)"
fi

printf '\n| check | result | detail |\n|---|---|---|\n'
printf '%s\n' "${ROWS[@]}"
echo "checks took $(( $(date +%s) - started )) s"
