#!/usr/bin/env bash
# One-shot GPU check (used on the lent GPU machine): flex-vs-reference
# gradients per tensor, the CUDA tests (mixed precision first), then the
# deformable-attention benchmark of the default (auto), chunked (fast) and
# reference paths. Writes logs/JSON to ${OUT:-work_dirs/cuda_check}.
# Each step has its own timeout so that the whole fits in ~9 minutes.
set -uo pipefail
OUT="${OUT:-work_dirs/cuda_check}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
# the machine has torch but not mmengine & co: wheels carried in .whl/
DEPS="${DEPS:-/tmp/mmdat_deps}"
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-deps --target "$DEPS" .whl/*.whl 2>&1 | tail -2
fi
export PYTHONPATH="$PWD:$DEPS${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c 'import torch; print("torch", torch.__version__)' | tee -a "$OUT/gpu.txt"
T="timeout -k 5"
$T "${QUICK_TIMEOUT:-150}" "$PY" tools/analysis_tools/cuda_quick.py 2>&1 | grep -v -i warn | tee "$OUT/quick.log"
PT="$PY -m pytest tests/test_cuda.py -q -p no:cacheprovider -rA --tb=short --durations=5"
$T "${TEST_TIMEOUT:-300}" $PT -k autocast > "$OUT/pytest_autocast.log" 2>&1; tail -25 "$OUT/pytest_autocast.log"
$T "${TEST_TIMEOUT:-300}" $PT -k 'not autocast' > "$OUT/pytest.log" 2>&1; tail -25 "$OUT/pytest.log"
$T "${BENCH_TIMEOUT:-90}" "$PY" tools/analysis_tools/benchmark.py --repeat 5 --warmup 2 --target deform-attn --shape 1 64 200 304 --mode both --variants auto,fast,reference --json "$OUT/deform.json" 2>&1 | grep -v -i warn | tee "$OUT/bench.log"
