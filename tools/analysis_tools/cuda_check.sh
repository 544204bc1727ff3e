#!/usr/bin/env bash
# One-shot GPU check (used on the lent GPU machine): CUDA tests, then the
# benchmark of the default (auto = flex on CUDA), chunked (fast) and
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
timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/pytest.log"
B="$PY tools/analysis_tools/benchmark.py --repeat 5 --warmup 2"
timeout "${BENCH_TIMEOUT:-90}" $B --arch tiny --shape 1 3 800 1216 --mode infer --variants auto,fast,reference --json "$OUT/infer_800x1216.json" 2>&1 | grep -v -i warn | tee "$OUT/bench.log"
timeout "${BENCH_TIMEOUT:-90}" $B --arch tiny --shape 2 3 512 512 --mode train --variants auto,fast,reference --json "$OUT/train_512.json" 2>&1 | grep -v -i warn | tee -a "$OUT/bench.log"
timeout "${BENCH_TIMEOUT:-90}" $B --target deform-attn --shape 1 64 200 304 --mode both --variants auto,fast,reference --json "$OUT/deform.json" 2>&1 | grep -v -i warn | tee -a "$OUT/bench.log"
