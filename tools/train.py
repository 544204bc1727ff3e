# Copyright (c) OpenMMLab. All rights reserved.
"""Train a model from an mmdat config of mmdet, mmseg or mmpretrain.

The library is chosen by the config's ``default_scope`` (or its
``configs/<library>/`` folder); see :mod:`mmdat.apis.runner` for what this
adds to the libraries' own ``tools/train.py``.
"""
import argparse
import os
import os.path as osp
import sys

from mmengine.config import DictAction

# allow running from a source checkout without installing mmdat
_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

DESCRIPTION = """\
Train a model from a config of mmdet (detection), mmseg (segmentation) or
mmpretrain (classification): the library is chosen by the config's
`default_scope` (or its configs/<library>/ folder). Logs, the dumped config
and the checkpoints go to the work directory.

Without CUDA the run uses the CPU: distributed runs (tools/dist_train.sh)
use the gloo backend, and AmpOptimWrapper (in the config or from --amp)
becomes CPUAmpOptimWrapper (bfloat16 autocast in the backbone, the rest in
float32).
"""

EPILOG = """\
examples:
  python tools/train.py configs/mmpretrain/dat_pp_demo.py
  python tools/train.py configs/mmdet/mask_rcnn_dat_pp_t_1x.py \\
      --work-dir work_dirs/mrcnn --cfg-options train_dataloader.batch_size=1
  python tools/train.py configs/mmdet/mask_rcnn_dat_pp_t_1x.py --resume
  bash tools/dist_train.sh configs/mmseg/upernet_dat_pp_t_160k_ade20k.py 8
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        'config', help='config file (e.g. configs/mmdet/mask_rcnn_dat_pp_'
        't_1x.py)')
    parser.add_argument(
        '--work-dir',
        help='directory for logs, the dumped config and checkpoints '
        '(default: the config\'s work_dir, else ./work_dirs/<config name>)')
    parser.add_argument(
        '--amp',
        action='store_true',
        default=False,
        help='automatic mixed precision: AmpOptimWrapper (fp16, dynamic '
        'loss scale) with CUDA, CPUAmpOptimWrapper (bfloat16 autocast in the '
        'backbone) without')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='scale the learning rate by (total batch size / '
        'auto_scale_lr.base_batch_size of the config)')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        metavar='CHECKPOINT',
        help='resume training (weights, optimizer, schedule position): from '
        'CHECKPOINT if given, else from the latest checkpoint in the work '
        'directory')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        metavar='KEY=VALUE',
        help='override config settings, e.g. train_dataloader.batch_size=2 '
        'optim_wrapper.optimizer.lr=1e-4; a list is written key="[a,b]" or '
        'key=a,b, nested lists/tuples key="[(a,b),(c,d)]" (quotation marks '
        'needed, no spaces)')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher: none (one process), pytorch (torchrun, as '
        'tools/dist_train.sh does), slurm (tools/slurm_train.sh) or mpi')
    # torch.distributed.launch passes --local-rank (torch >= 2.0) or
    # --local_rank; torchrun sets LOCAL_RANK instead.
    parser.add_argument(
        '--local_rank', '--local-rank', type=int, default=0,
        help='process rank on this node (set by the launcher; do not pass '
        'it yourself)')
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)

    if not osp.isfile(args.config):
        parser.error(f'config file not found: {args.config}')
    if args.resume not in (None, 'auto') and '://' not in args.resume \
            and not osp.isfile(args.resume):
        parser.error(f'checkpoint to resume from not found: {args.resume}')
    return args


def main(argv=None):
    args = parse_args(argv)
    from mmdat.apis import (apply_amp, apply_auto_scale_lr, apply_resume,
                            build_runner, load_config, setup_work_dir)

    cfg = load_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher
    setup_work_dir(cfg, args, args.config)
    apply_amp(cfg, requested=args.amp)
    if args.auto_scale_lr:
        apply_auto_scale_lr(cfg)
    apply_resume(cfg, args.resume)

    runner = build_runner(cfg)
    runner.train()


if __name__ == '__main__':
    main()
