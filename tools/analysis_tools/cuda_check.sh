#!/usr/bin/env bash
# The prepared GPU check (issue 12), in two commands of under 10 minutes
# (one device command's limit), each ratio from one run:
#   tests: tests/test_cuda.py (Triton kernels against float64 references,
#     golden outputs fp32 with TF32 off <= 1e-4 and bf16 <= 5e-2, one
#     compilation per configuration), failures printed as they happen, beside
#     a profile of the DAT-T++ bf16 training step (profile_cuda.py);
#   bench: tools/analysis_tools/benchmark.py --device cuda:
#     - deformable and neighborhood modules 1x64x200x304 (stage 1 of
#       DAT-T++), infer and train, triton vs reference (and auto: what the
#       dispatcher picks), fp32 and bf16 (time and peak-memory ratios);
#     - DAT-T++ backbone bf16: train 2x3x800x1216, infer 1x3x800x1216, infer
#       throughput 128x3x224x224, auto and triton against mmdet's Swin-T;
#     - one Mask R-CNN training iteration (DAT-T++ 1x config vs Swin-T,
#       batch 2 at 1333x800, synthetic annotations, fp16 autocast);
#     - first-call times (Triton compilation from an empty cache) in every
#       line ("first call") and in the JSON (first_call_s).
# Measured 2026-11-30 (H200): tests ~180 s on 12 workers; each benchmark
# variant is a fresh process (5-20 s before its first timed step).
#
# Usage:
#   tools/analysis_tools/cuda_check.sh prepare   # here, once: wheels -> .whl/
#   tools/analysis_tools/cuda_check.sh tests     # on the GPU machine (~4 min)
#   tools/analysis_tools/cuda_check.sh bench     # then this one (~9 min)
#   tools/analysis_tools/cuda_check.sh           # both (over 10 minutes)
# The GPU machine has torch and triton but not mmengine/mmdet/mmcv: the
# `prepare` step downloads them as Python 3.12 wheels into .whl/ (ignored by
# git; carry it), mmcv as mmcv-lite (benchmark.py runs mmcv's nms/RoIAlign on
# torchvision there). Output: $OUT (or work_dirs/cuda_check): check.log (all
# of it), pytest.log, profile.log, bench.json.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-python3}"
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
cd "$ROOT"

if [ "${1:-}" = "prepare" ]; then
  set -e
  mkdir -p .whl
  grep -qs '^/.whl/' .git/info/exclude || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
  plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform manylinux1_x86_64)
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${plat[@]}" -d .whl \
    mmengine==0.10.7 mmdet==3.3.0 addict yapf platformdirs termcolor \
    terminaltables pycocotools shapely 2>&1 | grep -v '^WARNING: Location' || true
  if ! ls .whl/mmcv_lite-2.1.0-*.whl >/dev/null 2>&1; then
    tmp="$(mktemp -d)"
    "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
      -d "$tmp" mmcv==2.1.0 2>&1 | grep -v '^WARNING: Location' || true
    tar -xzf "$tmp"/mmcv-2.1.0.tar.gz -C "$tmp"
    (cd "$tmp/mmcv-2.1.0" && MMCV_WITH_OPS=0 "$PY" -m pip wheel -q --no-deps \
      --no-build-isolation -w "$ROOT/.whl" . 2>&1 | grep -v -e '^WARNING' -e '!!' || true)
    rm -rf "$tmp"
  fi
  ls -la .whl; du -sh .whl
  exit 0
fi

OUTD="${OUT:-work_dirs/cuda_check}"; mkdir -p "$OUTD"
LOG="$OUTD/check.log"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  SITE="${DEPS:-/tmp/mmdat_site}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" .whl/*.whl 2>&1 | grep -v -i warn | tail -3
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  if [ -d "$SITE/mmcv" ] && ! ls "$SITE"/mmcv/_ext*.so >/dev/null 2>&1; then
    # mmcv-lite: nms/RoIAlign on torchvision so that mmdet imports and a
    # Mask R-CNN iteration runs (benchmark.py's stand-in; benchmarks only)
    "$PY" -c 'import sys; sys.path.insert(0, "tools/analysis_tools")
import benchmark; benchmark.write_mmcv_ext_standin(sys.argv[1])' "$SITE/mmcv/_ext.py"
  fi
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/mmdat_triton_cache}"
START=$(date +%s)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)'
} 2>&1 | tee "$LOG"

T="timeout -k 5"
MODE="${1:-all}"
step() { echo "== $1 ($(( $(date +%s) - START )) s)" | tee -a "$LOG"; }

if [ "$MODE" = "tests" ] || [ "$MODE" = "all" ]; then
  step "pytest tests/test_cuda.py"
  # about 50 kernel variants compile here (dtypes x head dims x bias):
  # spread over processes (the Triton cache is shared); failures are printed
  # as they happen (a run cut at its cap still says why)
  XDIST=""; "$PY" -c 'import xdist' 2>/dev/null && XDIST="-n ${TEST_WORKERS:-12}"
  export PYTHONPATH="$ROOT/tools/analysis_tools:$PYTHONPATH"  # the plugin
  ( $T 150 "$PY" tools/analysis_tools/profile_cuda.py > "$OUTD/profile.log" 2>&1 ) &
  $T "${TEST_TIMEOUT:-210}" "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider -p pytest_report_now \
    $XDIST -rfEs --tb=short --durations=8 2>&1 \
    | grep -v -e Benchmark -e warner > "$OUTD/pytest.log"
  echo "pytest rc ${PIPESTATUS[0]}" | tee -a "$LOG"; tail -40 "$OUTD/pytest.log" | tee -a "$LOG"
  wait
  tail -45 "$OUTD/profile.log" >> "$LOG"
fi
[ "$MODE" = "tests" ] && { step "done"; exit 0; }

# first-call times are compile times: the benchmarks start from an empty
# Triton cache (the first process of each dtype compiles, later ones load)
rm -rf "$TRITON_CACHE_DIR"
B="$PY tools/analysis_tools/benchmark.py --device cuda --keep-going"
J="$OUTD/bench_parts"; mkdir -p "$J"
bench() {  # name timeout args...
  local name="$1" t="$2"; shift 2
  step "benchmark $name"
  $T "$t" $B --json "$J/$name.json" "$@" 2>&1 | grep -v -i -e warn -e '^ *warnings\.' | tee -a "$LOG"
}
bench deform_fp32 75 --target deform-attn --shape 1 64 200 304 --mode both \
  --variants triton,reference --base triton --repeat 10 --warmup 2
bench deform_bf16 75 --target deform-attn --shape 1 64 200 304 --mode both \
  --variants triton,reference --base triton --dtype bf16 --repeat 10 --warmup 2
bench nat_fp32 75 --target nat-attn --shape 1 64 200 304 --mode both \
  --variants triton,auto,reference --base triton --repeat 10 --warmup 2
bench backbone_train_bf16 90 --arch tiny --shape 2 3 800 1216 --mode train \
  --variants auto,triton,swin --base auto --dtype bf16 --repeat 5 --warmup 2
bench backbone_infer_bf16 60 --arch tiny --shape 1 3 800 1216 --mode infer \
  --variants auto,triton,swin --base auto --dtype bf16 --repeat 10 --warmup 2
bench throughput_bf16 60 --arch tiny --shape 128 3 224 224 --mode infer \
  --variants auto,triton,swin --base auto --dtype bf16 --repeat 5 --warmup 2
bench maskrcnn_fp16 80 --target maskrcnn --shape 2 3 800 1333 --mode train \
  --variants auto,swin --base auto --dtype fp16 --repeat 3 --warmup 2

"$PY" - "$J" "$OUTD/bench.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, pathlib, sys
parts = {p.stem: json.loads(p.read_text())
         for p in sorted(pathlib.Path(sys.argv[1]).glob('*.json'))}
pathlib.Path(sys.argv[2]).write_text(json.dumps(parts, indent=1))
print('== ratios (time and peak memory)')
for name, runs in parts.items():
    for r in runs:
        firsts = {v: round(x['first_call_s'], 1) for v, x in
                  r['results'].items() if x.get('first_call_s') is not None}
        ratios = {k: round(v, 3) for k, v in r['ratios'].items()}
        errors = {v: x['error'] for v, x in r['results'].items()
                  if 'error' in x}
        print(f"{name:22s} {r['mode']:5s} {ratios} first call s {firsts}"
              + (f' ERRORS {errors}' if errors else ''))
EOF
rm -rf "$J"
step "done"
