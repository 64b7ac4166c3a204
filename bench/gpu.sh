#!/usr/bin/env bash
# GPU checks and timings in one run, under 5 minutes: engine correctness (CUDA-graph path vs
# plain vs the CPU), one-step and 32-step timings, float16/bfloat16, then lstm-serve on the GPU
# under several load generators. Prints one table last.
#   bash bench/gpu.sh                  # on a GPU host, from the repository root
#   bash bench/gpu.sh --device cpu --quick   # smoke test anywhere
# Wheels for packages the host lacks: WHEELS=dir bash bench/gpu.sh (installed to /tmp/site).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -n "${WHEELS:-}" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
# Run from the source tree, installed or not (lstm_stream lives under proto/).
export PYTHONPATH="$PWD:$PWD/proto:${PYTHONPATH:-}"
exec "$PYTHON" -m bench.gpu "$@"
