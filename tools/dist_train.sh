#!/usr/bin/env bash
# Train with NPROC processes per node through torchrun (tools/train.py --launcher pytorch).
usage() {
  cat <<USAGE
Usage: [PYTHON=.venv/bin/python] $0 CONFIG NPROC [train.py options...]

  CONFIG  config file, e.g. configs/mmdet/mask_rcnn_dat_pp_t_1x.py
  NPROC   processes per node (one per GPU; without CUDA they run on the CPU
          with the gloo backend)
  further options go to tools/train.py (see: python tools/train.py -h)

Environment: PYTHON (interpreter; default: python if it imports torch and
mmengine, else .venv/bin/python), NNODES (1), NODE_RANK (0),
MASTER_ADDR (127.0.0.1), PORT (29500).
USAGE
}
case "${1:-}" in -h|--help) usage; exit 0;; esac
if [ $# -lt 2 ]; then usage >&2; exit 2; fi
if [ ! -f "$1" ]; then echo "$0: config file not found: $1" >&2; exit 2; fi
if ! [[ "$2" =~ ^[1-9][0-9]*$ ]]; then
  echo "$0: NPROC must be a positive integer, got '$2'" >&2; usage >&2; exit 2
fi

# Interpreter: $PYTHON, else `python` if it has torch and mmengine, else the
# repository's .venv (made by tools/setup_env.sh).
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python
  VENV_PY="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
  if ! python -c 'import torch, mmengine' >/dev/null 2>&1 && [ -x "$VENV_PY" ]; then
    PYTHON="$VENV_PY"
  fi
fi

CONFIG=$1
GPUS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}

PYTHONPATH="$(dirname "$0")/..":$PYTHONPATH \
${PYTHON:-python} -m torch.distributed.run \
    --nnodes=$NNODES \
    --node_rank=$NODE_RANK \
    --master_addr=$MASTER_ADDR \
    --nproc_per_node=$GPUS \
    --master_port=$PORT \
    "$(dirname "$0")/train.py" \
    "$CONFIG" \
    --launcher pytorch "${@:3}"
