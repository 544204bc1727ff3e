#!/usr/bin/env bash
# The main job: set up ./.venv if needed, generate the bundled demo data, then
# train and evaluate a small DAT++ classifier (mmpretrain, top-1), segmentor
# (mmseg, mIoU) and detector (mmdet, COCO bbox/segm AP) on the CPU and write
# prediction visualisations as PNG. Results: work_dirs/demo/<config>/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
"$PY" tools/dataset_converters/make_demo_data.py data/demo

CONFIGS=(configs/mmpretrain/dat_pp_demo.py configs/mmseg/upernet_dat_pp_demo.py
         configs/mmdet/mask_rcnn_dat_pp_demo.py)
for cfg in "${CONFIGS[@]}"; do
  name="$(basename "$cfg" .py)"
  wd="work_dirs/demo/$name"
  echo "=== $name: training ($cfg)"
  "$PY" tools/train.py "$cfg" --work-dir "$wd"
  ckpt="$(cat "$wd/last_checkpoint")"
  echo "=== $name: testing $ckpt, visualisations in $wd/vis"
  "$PY" tools/test.py "$cfg" "$ckpt" --work-dir "$wd/test" --show-dir "$ROOT/$wd/vis"
done
"$PY" tools/analysis_tools/summarize_demo.py work_dirs/demo
