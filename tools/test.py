# Copyright (c) OpenMMLab. All rights reserved.
"""Test (and evaluate) a checkpoint with an mmdat config (mmdet, mmseg or
mmpretrain).

The library is chosen by the config's ``default_scope``; see
:mod:`mmdat.apis.runner`. Modelled on mmdet's ``tools/test.py``.
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

from mmdat.apis import (add_dump_results, apply_out_before_build,  # noqa
                        apply_tta, build_runner, enable_visualization,
                        load_config, resolve_scope, setup_work_dir,
                        trust_checkpoint_path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Test (and eval) a model (mmdet / mmseg / mmpretrain '
        'config)')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir',
        help='the directory to save the file containing evaluation metrics')
    parser.add_argument(
        '--out',
        type=str,
        help='dump predictions for offline evaluation: a .pkl file (mmdet, '
        'mmpretrain) or a directory of prediction PNGs (mmseg)')
    parser.add_argument(
        '--show', action='store_true', help='show prediction results')
    parser.add_argument(
        '--show-dir',
        help='directory where painted images will be saved (mmdet puts a '
        'relative path under work_dir/<timestamp>/; mmseg writes to '
        '<show-dir>/vis_data/vis_image/)')
    parser.add_argument(
        '--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument(
        '--interval',
        type=int,
        default=1,
        help='visualize every N-th sample (mmseg: batch) with --show-dir')
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
    parser.add_argument(
        '--tta', action='store_true', help='Test time augmentation')
    # When using PyTorch version >= 2.0.0, the `torch.distributed.launch`
    # will pass the `--local-rank` parameter to `tools/train.py` instead
    # of `--local_rank`.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)

    if not osp.isfile(args.config):
        parser.error(f'config file not found: {args.config}')
    if '://' not in args.checkpoint and not osp.isfile(args.checkpoint):
        parser.error(f'checkpoint file not found: {args.checkpoint}')
    return args


def main(argv=None):
    args = parse_args(argv)

    cfg = load_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher

    # work_dir is determined in this priority: CLI > segment in file > filename
    setup_work_dir(cfg, args, args.config)

    cfg.load_from = args.checkpoint
    if '://' not in args.checkpoint:
        # the user named this file explicitly (see mmdat.apis.runner)
        trust_checkpoint_path(args.checkpoint)

    if args.show or args.show_dir:
        enable_visualization(
            cfg,
            show_dir=args.show_dir,
            show=args.show,
            wait_time=args.wait_time,
            interval=args.interval)
    if args.tta:
        apply_tta(cfg)
    if args.out is not None:
        if resolve_scope(cfg) == 'mmdet' and \
                not args.out.endswith(('.pkl', '.pickle')):
            raise SystemExit('--out: the dump file must be a .pkl file.')
        apply_out_before_build(cfg, args.out)

    # Runner.from_cfg, or RUNNERS.build if cfg.runner_type is set
    runner = build_runner(cfg)

    if args.out is not None:
        add_dump_results(cfg, runner, args.out)

    runner.test()


if __name__ == '__main__':
    main()
