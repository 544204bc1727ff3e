#!/usr/bin/env python
"""Convert an official DAT/DAT++ checkpoint into an OpenMMLab 2 checkpoint.

Handles the official classification files (``{'model': ...}``) and the
official detection (mmdet 2.x) / segmentation (mmseg 0.x) files
(``{'state_dict': ...}`` with a ``backbone.`` prefix). The result loads with
``mmengine.runner.load_checkpoint`` into the model of the matching mmdat
config (mmpretrain ``ImageClassifier``, mmdet detector, mmseg segmentor).

Usage: python tools/model_converters/dat2mmdat.py SRC DST
"""
import argparse
import os
import sys

import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='official checkpoint (.pth)')
    parser.add_argument('dst', help='output OpenMMLab 2 checkpoint (.pth)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmengine.utils import ProgressBar

    from mmdat.utils.checkpoint import convert_official, read_checkpoint
    try:
        ckpt = read_checkpoint(args.src)
        kind, sd = convert_official(ckpt, args.src)
    except (FileNotFoundError, ValueError, RuntimeError, TypeError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 1
    print(f'{args.src}: {kind}, {len(sd)} tensors')
    out = {}
    bar = ProgressBar(len(sd), file=sys.stderr)
    for k, v in sd.items():
        out[k] = v.detach().clone().contiguous()
        bar.update()
    sys.stderr.write('\n')
    os.makedirs(os.path.dirname(os.path.abspath(args.dst)), exist_ok=True)
    tmp = args.dst + '.tmp'
    torch.save({'state_dict': out,
                'meta': dict(mmdat_converted=True, source_kind=kind,
                             source=os.path.basename(args.src))}, tmp)
    os.replace(tmp, args.dst)  # never leave a half-written DST behind
    print(f'saved {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
