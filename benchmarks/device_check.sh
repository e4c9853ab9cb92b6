#!/usr/bin/env bash
# Everything Ingot runs on the GPU machine, in as few calls as possible. Writes results under $OUT.
#
#   benchmarks/device_check.sh check          GPU kernel tests + correctness at real shapes + real models
#   benchmarks/device_check.sh bench [KEYS]   synthetic models (GGUF q4_0/q8_0) and `ingot bench` on each
#   benchmarks/device_check.sh kernels        per-kernel bandwidth at real shapes
#   benchmarks/device_check.sh batch [KEYS]   `ingot bench --batch B` for B = 1..32 (q4_0), throughput per batch,
#                                             for this checkout and each carried source tree (as trees)
#   benchmarks/device_check.sh ab [KEYS]      `ingot bench` of each model once per value of an environment
#                                             switch (AB_VAR, default INGOT_PDL; AB_VALUES, default "0 1"),
#                                             the runs interleaved so clock drift hits both alike
#   benchmarks/device_check.sh trees [KEYS]   benchmarks/step_time.py (graph replay of one decode step and a
#                                             checksum of its greedy tokens) for this checkout and for each
#                                             source tree carried in .carry/trees/NAME/ingot (make one with
#                                             `git archive REF ingot | tar -x -C .carry/trees/NAME`),
#                                             and for this checkout under each assignment in TREE_ENVS
#                                             (e.g. "INGOT_GEMV_X_PAIRS=0 INGOT_GEMM_SPLIT=0"), interleaved,
#                                             twice (TREE_REPS)
#
# On this workplace's device tool the machine has no network: missing wheels travel in .whl/ and model
# files in .carry/ (split by benchmarks/carry_split.sh; parts from consecutive calls are collected in
# /tmp/ingot-carry and joined once complete). On your own H100 box just run it with OUT set.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/benchmarks/out}
mkdir -p "$OUT"
MODELS=${INGOT_MODELS:-/tmp/ingot-models}
mkdir -p "$MODELS"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PYTHONPATH  # wheels carried by an earlier call
if [ -d .carry ]; then
  mkdir -p /tmp/ingot-carry && cp -n .carry/* /tmp/ingot-carry/ 2>/dev/null
fi
# Join split model files whose parts have all arrived (NAME.partNN-of-MM).
for first in /tmp/ingot-carry/*.part00-of-*; do
  [ -e "$first" ] || continue
  base=${first%.part00-of-*}; total=${first##*-of-}
  have=$(ls "$base".part*-of-"$total" | wc -l)
  if [ "$have" -eq "$((10#$total))" ] && [ ! -e "$MODELS/$(basename "$base")" ]; then
    cat "$base".part*-of-"$total" > "$MODELS/$(basename "$base")"
  fi
done

gpu_info() {
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv > "$OUT/gpu.csv"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
}

mode=${1:-check}; shift || true
case "$mode" in
  check)
    gpu_info
    # PYTEST_ARGS="-n 12" (pytest-xdist carried in .whl/) spreads the kernels' compiles over the CPU cores.
    $PY -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} tests/test_cuda_*.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
    real=()
    for f in "$MODELS"/*.gguf; do case "$(basename "$f")" in SmolLM2*|gemma-3-270m*) real+=("$f");; esac; done
    $PY benchmarks/gpu_correctness.py --models "$MODELS" --out "$OUT" --real "${real[@]}" 2>&1 | tee "$OUT/gpu_correctness.log" | grep -v "^  " | tail -30
    ;;
  kernels)
    gpu_info
    $PY benchmarks/kernel_bench.py --out "$OUT" 2>&1 | tee "$OUT/kernel_bench.log" | tail -40
    ;;
  bench)
    gpu_info
    keys=${*:-"llama-3.2-1b llama-3.2-3b qwen3-8b"}
    for key in $keys; do
      for quant in q4_0 q8_0; do
        f="$MODELS/$key-$quant.gguf"
        [ -e "$f" ] || $PY -m ingot.bench.synthetic "$key" --quant "$quant" -o "$f" || continue
        $PY -m ingot.cli bench "$f" -p 512 -n 128 -r 5 --roofline -o csv 2>>"$OUT/bench.err" | tee -a "$OUT/bench.csv"
      done
    done
    ;;
  batch)
    gpu_info
    keys=${*:-"llama-3.2-1b qwen3-8b"}
    trees=("$PWD")
    for t in .carry/trees/*/; do [ -d "$t/ingot" ] && trees+=("$PWD/${t%/}"); done
    for key in $keys; do
      f="$MODELS/$key-q4_0.gguf"
      [ -e "$f" ] || $PY -m ingot.bench.synthetic "$key" --quant q4_0 -q -o "$f" || continue
      for b in ${BATCHES:-1 2 4 8 16 32}; do
        for t in "${trees[@]}"; do  # each carried source tree too (see trees), its name first on each row
          # -P: `python -m` would put the working directory (this checkout) ahead of PYTHONPATH's tree
          PYTHONPATH="$t:$PYTHONPATH" $PY -P -m ingot.cli bench "$f" -p "${BATCH_P:-512}" -n 128 -r 3 --batch "$b" \
            -o csv 2>>"$OUT/bench.err" | sed "s|^|$(basename "$t"),|" | tee -a "$OUT/batch.csv"
        done
      done
    done
    ;;
  ab)
    gpu_info
    keys=${*:-"llama-3.2-1b qwen3-8b"}
    var=${AB_VAR:-INGOT_PDL}
    for key in $keys; do
      for quant in ${QUANTS:-q4_0}; do
        f="$MODELS/$key-$quant.gguf"
        [ -e "$f" ] || $PY -m ingot.bench.synthetic "$key" --quant "$quant" -q -o "$f" || continue
        for v in ${AB_VALUES:-0 1}; do
          echo "# $var=$v $key $quant" | tee -a "$OUT/ab.csv"
          env "$var=$v" $PY -m ingot.cli bench "$f" -p 512 -n 128 -r 5 --roofline -o csv 2>>"$OUT/bench.err" \
            | tee -a "$OUT/ab.csv"
        done
      done
    done
    ;;
  trees)
    gpu_info
    keys=${*:-"llama-3.2-1b qwen3-8b"}
    trees=("$PWD")
    for t in .carry/trees/*/; do [ -d "$t/ingot" ] && trees+=("$PWD/${t%/}"); done
    for rep in $(seq "${TREE_REPS:-2}"); do
      for key in $keys; do
        for quant in ${QUANTS:-q4_0}; do
          f="$MODELS/$key-$quant.gguf"
          [ -e "$f" ] || $PY -m ingot.bench.synthetic "$key" --quant "$quant" -q -o "$f" || continue
          # each tree under its own name, then this checkout under each TREE_ENVS assignment
          variants=()
          for t in "${trees[@]}"; do variants+=("$(basename "$t")|PYTHONPATH=$t:$PYTHONPATH"); done
          for e in ${TREE_ENVS:-}; do variants+=("$e|$e"); done
          for v in "${variants[@]}"; do
            env "${v#*|}" $PY benchmarks/step_time.py "$f" --tag "${v%%|*}" 2>>"$OUT/bench.err" \
              | tee -a "$OUT/trees.txt"
          done
        done
      done
    done
    ;;
  collect) ;;  # only gather carried files (the model parts above)
  *) echo "usage: $0 check|kernels|bench|batch|ab|trees|collect [model keys]"; exit 2;;
esac
