# Copyright (c) OpenMMLab. All rights reserved.
"""Train a model from an mmdat config (mmdet, mmseg or mmpretrain).

The library is chosen by the config's ``default_scope``; see
:mod:`mmdat.apis.runner`. Modelled on mmdet's ``tools/train.py``.
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

from mmdat.apis import (apply_amp, apply_auto_scale_lr,  # noqa: E402
                        apply_resume, build_runner, load_config,
                        setup_work_dir)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Train a model (mmdet / mmseg / mmpretrain config)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--amp',
        action='store_true',
        default=False,
        help='enable automatic-mixed-precision training (bfloat16 autocast '
        'when CUDA is not available)')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='enable automatically scaling LR.')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='If specify checkpoint path, resume from it, while if not '
        'specify, try to auto resume from the latest checkpoint '
        'in the work directory.')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override some settings in the used config, the key-value pair '
        'in xxx=yyy format will be merged into config file. If the value to '
        'be overwritten is a list, it should be like key="[a,b]" or key=a,b '
        'It also allows nested list/tuple values, e.g. key="[(a,b),(c,d)]" '
        'Note that the quotation marks are necessary and that no white space '
        'is allowed.')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    # When using PyTorch version >= 2.0.0, the `torch.distributed.launch`
    # will pass the `--local-rank` parameter to `tools/train.py` instead
    # of `--local_rank`.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
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

    cfg = load_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher

    # work_dir is determined in this priority: CLI > segment in file > filename
    setup_work_dir(cfg, args, args.config)

    if args.amp:
        apply_amp(cfg)
    if args.auto_scale_lr:
        apply_auto_scale_lr(cfg)
    # resume is determined in this priority: resume from > auto_resume
    apply_resume(cfg, args.resume)

    # Runner.from_cfg, or RUNNERS.build if cfg.runner_type is set
    runner = build_runner(cfg)
    runner.train()


if __name__ == '__main__':
    main()
