#!/usr/bin/env bash
# `ingot serve` alone (no llama-server build needed) under several argument sets, one model, for an A/B of
# server options; rows appended to $OUT/serve_ab.csv, labelled by each set.
#
#   SERVE_WHEELS=.peers/call2/serve benchmarks/serve_ab.sh MODEL.gguf KEY "--step-tokens 512" "--step-tokens 2048"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/benchmarks/out}
PY=${PYTHON:-python3}
gguf=$1 key=$2; shift 2
if [ -n "${SERVE_WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$SERVE_WHEELS"/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
port=8091
for args in "$@"; do
  label=ingot-$(echo "$args" | tr -s ' -' '_' | sed 's/^_//')
  # shellcheck disable=SC2086
  $PY -m ingot.cli serve "$gguf" --port "$port" --max-batch 32 -c "${SERVE_CTX:-1024}" $args > "$OUT/$label.log" 2>&1 &
  pid=$!
  for _ in $(seq 600); do
    $PY -c "import httpx, sys; sys.exit(httpx.get('http://127.0.0.1:$port/health', timeout=1).status_code != 200)" \
      2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || { tail -20 "$OUT/$label.log"; break; }
    sleep 0.5
  done
  # shellcheck disable=SC2086
  timeout "${SERVE_TIMEOUT:-300}" $PY benchmarks/serve_bench.py "http://127.0.0.1:$port" --streams ${SERVE_STREAMS:-8 32} \
    --engine "$label" --model "$key" --csv "$OUT/serve_ab.csv" || echo "$label: serve bench failed"
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
done
