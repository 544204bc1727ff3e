# Copyright (c) OpenMMLab. All rights reserved.
"""Test (and evaluate) a checkpoint with an mmdat config of mmdet, mmseg or
mmpretrain.

The library is chosen by the config's ``default_scope`` (or its
``configs/<library>/`` folder); see :mod:`mmdat.apis.runner` for what this
adds to the libraries' own ``tools/test.py``.
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
Evaluate a checkpoint on the test set of a config of mmdet (COCO bbox/segm
mAP), mmseg (mIoU) or mmpretrain (top-1/top-5): the library is chosen by the
config's `default_scope` (or its configs/<library>/ folder). The metrics are
printed and written to the work directory; --show-dir also draws the
predictions.

The checkpoint is loaded with torch.load(weights_only=True) and an allowlist
of what mmengine checkpoints hold; a file that needs more is refused with an
error naming the missing global and how to trust the file
(MMDAT_TRUSTED_CHECKPOINTS=<file or directory>).
"""

EPILOG = """\
examples:
  python tools/test.py configs/mmdet/mask_rcnn_dat_pp_t_1x.py \\
      checkpoints/mask_rcnn_dat_pp_t_1x.pth --show-dir vis
  bash tools/dist_test.sh configs/mmseg/upernet_dat_pp_t_160k_ade20k.py \\
      checkpoints/upernet_dat_pp_t_160k_ade20k.pth 8
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='config file of the model')
    parser.add_argument(
        'checkpoint',
        help='checkpoint of the whole model (tools/train.py output, or an '
        'official file converted by tools/model_converters/dat2mmdat.py)')
    parser.add_argument(
        '--work-dir',
        help='directory for the log and the metrics file (default: the '
        'config\'s work_dir, else ./work_dirs/<config name>)')
    parser.add_argument(
        '--out',
        type=str,
        help='dump the predictions for offline evaluation: a .pkl file '
        '(mmdet, mmpretrain) or a directory of prediction PNGs (mmseg)')
    parser.add_argument(
        '--show', action='store_true',
        help='show the predictions in a window (needs a display)')
    parser.add_argument(
        '--show-dir',
        help='write images with the predictions drawn on them into this '
        'directory (relative to the current directory)')
    parser.add_argument(
        '--wait-time', type=float, default=2,
        help='seconds each image stays on screen with --show (default 2)')
    parser.add_argument(
        '--interval',
        type=int,
        default=1,
        help='draw every N-th sample (mmseg: every N-th batch) with --show '
        'or --show-dir (default 1; mmdet draws every sample)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        metavar='KEY=VALUE',
        help='override config settings, e.g. test_dataloader.batch_size=2; '
        'a list is written key="[a,b]" or key=a,b, nested lists/tuples '
        'key="[(a,b),(c,d)]" (quotation marks needed, no spaces)')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher: none (one process), pytorch (torchrun, as '
        'tools/dist_test.sh does), slurm (tools/slurm_test.sh) or mpi')
    parser.add_argument(
        '--tta', action='store_true',
        help='test-time augmentation: the config\'s tta_model and '
        'tta_pipeline (mmdet, mmpretrain: horizontal flip if absent)')
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
    if '://' not in args.checkpoint and not osp.isfile(args.checkpoint):
        parser.error(f'checkpoint file not found: {args.checkpoint}')
    return args


def main(argv=None):
    args = parse_args(argv)
    from mmdat.apis import (add_dump_results, apply_out_before_build,
                            apply_tta, build_runner, enable_visualization,
                            load_config, resolve_scope, setup_work_dir)

    cfg = load_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher
    setup_work_dir(cfg, args, args.config)
    cfg.load_from = args.checkpoint

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

    runner = build_runner(cfg)
    if args.out is not None:
        add_dump_results(cfg, runner, args.out)
    runner.test()


if __name__ == '__main__':
    main()
