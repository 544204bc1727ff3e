#!/usr/bin/env bash
# Train on a Slurm cluster through srun (tools/train.py --launcher slurm).
usage() {
  cat <<USAGE
Usage: [GPUS=8] $0 PARTITION JOB_NAME CONFIG WORK_DIR [train.py options...]

  PARTITION  Slurm partition
  JOB_NAME   Slurm job name
  CONFIG     config file, e.g. configs/mmdet/mask_rcnn_dat_pp_t_1x.py
  WORK_DIR   directory for logs and checkpoints
  further options go to tools/train.py (see: python tools/train.py -h)

Environment: GPUS (total tasks, 8), GPUS_PER_NODE (8), CPUS_PER_TASK (5),
SRUN_ARGS (extra srun options), PYTHON (interpreter, default: python).
USAGE
}
case "${1:-}" in -h|--help) usage; exit 0;; esac
if [ $# -lt 4 ]; then usage >&2; exit 2; fi
if [ ! -f "$3" ]; then echo "$0: config file not found: $3" >&2; exit 2; fi
if ! command -v srun >/dev/null; then
  echo "$0: srun not found (this script needs a Slurm cluster; on one machine use tools/dist_train.sh)" >&2
  exit 2
fi

set -x

PARTITION=$1
JOB_NAME=$2
CONFIG=$3
WORK_DIR=$4
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-""}
PY_ARGS=("${@:5}")

PYTHONPATH="$(dirname "$0")/..":$PYTHONPATH \
srun -p ${PARTITION} \
    --job-name=${JOB_NAME} \
    --gres=gpu:${GPUS_PER_NODE} \
    --ntasks=${GPUS} \
    --ntasks-per-node=${GPUS_PER_NODE} \
    --cpus-per-task=${CPUS_PER_TASK} \
    --kill-on-bad-exit=1 \
    ${SRUN_ARGS} \
    ${PYTHON:-python} -u "$(dirname "$0")/train.py" "${CONFIG}" --work-dir="${WORK_DIR}" --launcher="slurm" "${PY_ARGS[@]}"
