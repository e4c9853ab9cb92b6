#!/usr/bin/env bash
# Nsight Compute on the decode GEMVs at real shapes (benchmarks/ncu_gemv.py), one report per shape and
# kernel under $OUT/ncu/: speed of light, warp stall reasons, occupancy, launch statistics.
#   benchmarks/ncu_gemv.sh [SHAPES...]     (default: Qwen3-8B's qkv, gate_up and down)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/benchmarks/out}
mkdir -p "$OUT/ncu"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
NCU=${NCU:-ncu}
for shape in ${*:-qwen8b.qkv qwen8b.gate_up qwen8b.down}; do
  for kernel in ${KERNELS:-word dp4a}; do
    for quant in ${QUANTS:-q4}; do
      $NCU --clock-control none -k regex:gemv --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
        --section SchedulerStats --section MemoryWorkloadAnalysis \
        python3 benchmarks/ncu_gemv.py "$shape" --quant "$quant" --kernel "$kernel" \
        > "$OUT/ncu/$shape-$quant-$kernel.txt" 2>&1
      echo "ncu $shape $quant $kernel rc $?"
    done
  done
done
