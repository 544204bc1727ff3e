#!/usr/bin/env bash
# The main job: the DAT++ workflow on the bundled demo data, on the CPU.
# Run `bash tools/run_demo.sh -h` for what it does and its options.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
usage: bash tools/run_demo.sh [--work-dir DIR] [--quick] [--verbose] [--no-setup] [-h]

The DAT++ workflow on the bundled synthetic demo data, on the CPU (about
5 minutes on an idle 2-core machine after the set-up):
  1. set up ./.venv (tools/setup_env.sh; nothing to do when it is there) and
     generate the demo data into data/demo/ (tools/dataset_converters/
     make_demo_data.py; kept when up to date);
  2. train and test the classifier (configs/mmpretrain/dat_pp_demo.py): the
     "ImageNet pretraining" of the workflow;
  3. train and test UperNet (configs/mmseg/upernet_dat_pp_demo.py) and
     Mask R-CNN (configs/mmdet/mask_rcnn_dat_pp_demo.py) whose backbones start
     from the classifier's checkpoint through
     init_cfg=dict(type='Pretrained', checkpoint=..., prefix='backbone.'),
     as with converted official ImageNet weights (the configs that say so are
     written to DIR/configs/);
  4. paint the test predictions (DIR/<config>/vis/), then print the metrics,
     the time of every stage and the path of one overview PNG (summary also
     in DIR/summary.json; tools/analysis_tools/summarize_demo.py).

Every stage prints one progress line with an ETA; its output goes to
DIR/logs/<stage>.log (printed in full with --verbose, its tail on failure).
Runs are seeded (configs' randomness.seed, seeded dataloader workers): two
runs on the same machine print the same metrics.

options:
  --work-dir DIR  where runs, logs, summary and overview go (default
                  work_dirs/demo; its previous demo outputs are replaced)
  --quick         a smoke test of the whole job in a few minutes: every
                  stage runs, with schedules of a few iterations on a few
                  images; the floors are not checked (the metrics are low)
  --verbose       print the training and test logs as they are written
  --no-setup      do not run tools/setup_env.sh (use PYTHON as it is)
  --strict        exit 1 when a quality floor is missed (default: a warning)
  -h, --help      show this help and exit

environment:
  PYTHON           the interpreter (default: ./.venv/bin/python)
  OMP_NUM_THREADS  threads per process (default 2)

Exit status: 0 when every stage ran (a missed quality floor - top-1 >= 95,
mIoU >= 85, COCO bbox mAP >= 0.5, segm mAP >= 0.4 - is a warning that the
summary names; with --strict it is status 1); the stage's status when a
stage failed.
EOF
}

WD="work_dirs/demo"
VERBOSE=0
SETUP=1
QUICK=0
STRICT=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --work-dir) [ $# -ge 2 ] || { echo "run_demo.sh: --work-dir needs a value" >&2; usage >&2; exit 2; }
                WD="$2"; shift 2 ;;
    --work-dir=*) WD="${1#*=}"; shift ;;
    --verbose) VERBOSE=1; shift ;;
    --quick) QUICK=1; shift ;;
    --no-setup) SETUP=0; shift ;;
    --strict) STRICT=1; shift ;;
    *) echo "run_demo.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

if [ "$SETUP" = 1 ]; then
  bash "$ROOT/tools/setup_env.sh"
fi
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export PYTHONHASHSEED=0
export MPLBACKEND=Agg
case "$WD" in /*) ;; *) WD="$ROOT/$WD" ;; esac

CLS=configs/mmpretrain/dat_pp_demo.py
SEG=configs/mmseg/upernet_dat_pp_demo.py
DET=configs/mmdet/mask_rcnn_dat_pp_demo.py

# Expected seconds per stage on an idle 2-core machine (measured wall times,
# 2026-11-30); the ETA scales the remaining ones by how much slower the
# finished stages ran.
STAGES=(data cls_train cls_test seg_train seg_test det_train det_test summary)
declare -A EXPECT=([data]=8 [cls_train]=25 [cls_test]=10 [seg_train]=60
                   [seg_test]=14 [det_train]=180 [det_test]=12 [summary]=4)
if [ "$QUICK" = 1 ]; then
  EXPECT[cls_train]=20; EXPECT[seg_train]=20; EXPECT[det_train]=25
fi
declare -A TITLE=(
  [data]="generating the demo data (data/demo)"
  [cls_train]="training the classifier ($CLS)"
  [cls_test]="testing the classifier, painting predictions"
  [seg_train]="training UperNet from the classifier's backbone ($SEG)"
  [seg_test]="testing UperNet, painting predictions"
  [det_train]="training Mask R-CNN from the classifier's backbone ($DET)"
  [det_test]="testing Mask R-CNN, painting predictions"
  [summary]="summary and overview image")

mkdir -p "$WD"
for old in logs configs dat_pp_demo upernet_dat_pp_demo mask_rcnn_dat_pp_demo \
           timings.tsv summary.json overview.png; do
  rm -rf "${WD:?}/$old"
done
mkdir -p "$WD/logs" "$WD/configs"
TIMINGS="$WD/timings.tsv"
: > "$TIMINGS"
T0=$(date +%s)
DONE_EXPECTED=0
DONE_ACTUAL=0
N=0

fmt_s() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# scaled SECONDS: SECONDS times how much slower than expected the finished
# stages ran (a shared or slower machine), never less than SECONDS.
scaled() {
  if [ "$DONE_EXPECTED" -gt 0 ] && [ "$DONE_ACTUAL" -gt "$DONE_EXPECTED" ]; then
    echo $(($1 * DONE_ACTUAL / DONE_EXPECTED))
  else
    echo "$1"
  fi
}

# progress NAME: the stage's progress line with its ETA.
progress() {
  local name="$1" now elapsed remaining=0 s
  N=$((N + 1))
  now=$(date +%s); elapsed=$((now - T0))
  for s in "${STAGES[@]:$((N - 1))}"; do remaining=$((remaining + EXPECT[$s])); done
  remaining=$(scaled "$remaining")
  printf '[demo %d/%d | %s elapsed] %s: about %s; whole job ETA %s UTC (%s left)\n' \
    "$N" "${#STAGES[@]}" "$(fmt_s "$elapsed")" "${TITLE[$name]}" \
    "$(fmt_s "$(scaled "${EXPECT[$name]}")")" \
    "$(date -u -d "@$((now + remaining))" +%H:%M:%S)" "$(fmt_s "$remaining")"
}

# run_stage NAME CMD...: progress line, the command's output into
# DIR/logs/NAME.log, wall and CPU (user, sys) seconds into timings.tsv.
run_stage() {
  local name="$1"; shift
  progress "$name"
  local log="$WD/logs/$name.log" tf rc=0
  tf="$(mktemp)"
  local TIMEFORMAT='%R %U %S'
  if [ "$VERBOSE" = 1 ]; then
    { time "$@" > >(tee "$log") 2>&1 ; } 2>"$tf" || rc=$?
  else
    { time "$@" >"$log" 2>&1 ; } 2>"$tf" || rc=$?
  fi
  local wall user sys
  read -r wall user sys < <(tail -n 1 "$tf"); rm -f "$tf"
  printf '%s\t%s\t%s\t%s\n' "$name" "$wall" "$user" "$sys" >> "$TIMINGS"
  DONE_EXPECTED=$((DONE_EXPECTED + EXPECT[$name]))
  DONE_ACTUAL=$((DONE_ACTUAL + ${wall%.*}))
  if [ "$rc" -ne 0 ]; then
    [ "$VERBOSE" = 1 ] || tail -n 40 "$log" >&2
    echo "run_demo.sh: stage '$name' failed (exit status $rc); full log: $log" >&2
    exit "$rc"
  fi
  printf '          done in %.0f s (CPU user+sys %.0f s); log: %s\n' "$wall" \
    "$(awk -v u="$user" -v s="$sys" 'BEGIN { print u + s }')" "$log"
}

# train_stage STAGE CONFIG RUN: train CONFIG into DIR/RUN.
# test_stage STAGE CONFIG RUN: test the last checkpoint of DIR/RUN, painted
# predictions into DIR/RUN/vis.
train_stage() {
  local opts=()
  if [ "$QUICK" = 1 ]; then
    case "$1" in
      cls_train) opts=(train_cfg.max_epochs=2 train_cfg.val_interval=2
                       default_hooks.checkpoint.interval=2
                       train_dataloader.dataset.indices=32) ;;
      seg_train) opts=(train_cfg.max_iters=4 train_cfg.val_interval=4
                       default_hooks.checkpoint.interval=4) ;;
      det_train) opts=(train_cfg.max_epochs=1 train_cfg.val_interval=1
                       default_hooks.checkpoint.interval=1
                       train_dataloader.dataset.indices=8) ;;
    esac
    opts=(--cfg-options "${opts[@]}")
  fi
  run_stage "$1" "$PY" tools/train.py "$2" --work-dir "$WD/$3" "${opts[@]}"
}
test_stage() {
  local ckpt
  ckpt="$(cat "$WD/$3/last_checkpoint")"
  run_stage "$1" "$PY" tools/test.py "$2" "$ckpt" --work-dir "$WD/$3/test" \
    --show-dir "$WD/$3/vis"
}

# A config that starts the backbone of BASE from the classifier's weights,
# in the form that also loads converted official ImageNet weights. The demo
# configs train from scratch by default (init_cfg=None), hence `_delete_`.
write_finetune_config() {
  local base="$1" out="$2" ckpt="$3"
  cat > "$out" <<EOF
# Written by tools/run_demo.sh: $base with its backbone initialised from the
# demo classifier (the workflow's ImageNet pretraining), as with
# checkpoints/dat_pp_t_in1k.pth in the full recipes.
_base_ = ['$ROOT/$base']
model = dict(
    backbone=dict(
        init_cfg=dict(
            _delete_=True,
            type='Pretrained',
            checkpoint='$ckpt',
            prefix='backbone.')))
EOF
}

run_stage data "$PY" tools/dataset_converters/make_demo_data.py data/demo
train_stage cls_train "$CLS" dat_pp_demo
test_stage cls_test "$CLS" dat_pp_demo
CLS_CKPT="$(cat "$WD/dat_pp_demo/last_checkpoint")"
SEG_FT="$WD/configs/upernet_dat_pp_demo_from_cls.py"
DET_FT="$WD/configs/mask_rcnn_dat_pp_demo_from_cls.py"
write_finetune_config "$SEG" "$SEG_FT" "$CLS_CKPT"
write_finetune_config "$DET" "$DET_FT" "$CLS_CKPT"
train_stage seg_train "$SEG_FT" upernet_dat_pp_demo
test_stage seg_test "$SEG_FT" upernet_dat_pp_demo
train_stage det_train "$DET_FT" mask_rcnn_dat_pp_demo
test_stage det_test "$DET_FT" mask_rcnn_dat_pp_demo
progress summary
status=0
floors=()
[ "$QUICK" = 1 ] && floors=(--no-floors)
"$PY" tools/analysis_tools/summarize_demo.py "$WD" "${floors[@]}" || status=$?
if [ "$status" -eq 1 ] && [ "$STRICT" = 0 ] && "$PY" -c '
import json, sys
sys.exit(0 if json.load(open(sys.argv[1]))["missed_floors"] else 1)' \
    "$WD/summary.json" 2>/dev/null; then
  echo "run_demo.sh: WARNING: quality floors missed (named above); every" \
       "stage ran. --strict makes this an error." >&2
  status=0
fi
if [ "$status" -ne 0 ]; then
  echo "run_demo.sh: FAILED (exit status $status): see the summary above" >&2
fi
exit "$status"
