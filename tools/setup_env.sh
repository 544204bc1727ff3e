#!/usr/bin/env bash
# Create ./.venv with the pinned OpenMMLab 2 stack and mmdat installed in editable mode.
# Idempotent: when everything is already installed it returns in seconds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.mmdat-stack-v1"

if [ -f "$STAMP" ] && "$PY" -c 'import mmdat, mmcv.ops, mmdet, mmseg, mmpretrain' 2>/dev/null; then
  exit 0
fi

if [ ! -x "$PY" ]; then
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
PIP=("$PY" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade pip 'setuptools<70' wheel ninja
# torch first: mmcv is compiled against it (no mmcv 2.1.0 wheel exists for torch 2.14).
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1 'numpy<2'
if ! "$PY" -c 'import mmcv.ops' 2>/dev/null; then
  echo "[mmdat] building mmcv 2.1.0 from source (about 13 minutes on 2 cores, cached by pip afterwards)"
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" "${PIP[@]}" --no-build-isolation mmengine==0.10.7 mmcv==2.1.0
fi
"${PIP[@]}" -r "$ROOT/requirements.txt"
"${PIP[@]}" --no-deps -e "$ROOT"
touch "$STAMP"
