#!/usr/bin/env bash
# llama.cpp's CPU library (scripts/setup.sh runs this), for the checks in tests/gguf_write.rs that llama.cpp itself loads
# the GGUF files `distill convert` writes (tokenization, chat template, logits) and that our Q4_K
# quantiser equals ggml's. It comes from the PyPI wheel llama-cpp-cffi (a prebuilt llama.cpp with a
# cffi binding; 291 MB, most of it CUDA and Vulkan builds we do not load), installed with the cffi
# runtime into $DISTILL_CACHE/llama-cpp, outside the project's venv. Nothing else uses it. The wheel is for CPython 3.11 on x86-64 Linux (glibc ≥ 2.34).
set -euo pipefail
export HOME="${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}"
DISTILL_CACHE="${DISTILL_CACHE:-$HOME/.cache/distill}"
DEST="$DISTILL_CACHE/llama-cpp"
if compgen -G "$DEST/llama/_llama_cpp_cpu*.so" >/dev/null; then
  echo "get-llama-cpp: already in $DEST" >&2
  exit 0
fi
"$DISTILL_CACHE/venv/bin/python" -m pip install -q --no-deps --target "$DEST" \
  "llama-cpp-cffi==0.4.42" "cffi==2.1.1"
echo "get-llama-cpp: installed into $DEST" >&2
