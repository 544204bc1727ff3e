#!/usr/bin/env python
"""Convert an official DAT/DAT++ checkpoint into an OpenMMLab 2 checkpoint.

Handles the official classification files (``{'model': ...}``) and the
official detection (mmdet 2.x) / segmentation (mmseg 0.x) files
(``{'state_dict': ...}`` with a ``backbone.`` prefix). The result loads with
``mmengine.runner.load_checkpoint`` into the model of the matching mmdat
config (mmpretrain ``ImageClassifier``, mmdet detector, mmseg segmentor).
Only the weights and the class names (``meta['dataset_meta']``) are written;
an ``optimizer`` state and the rest of the old ``meta`` are dropped.

The source is read with ``weights_only=True`` (mmdat's safe-loading
allowlist). An official training file that pickled other objects (the
classification code saves its yacs config, for instance) is refused with the
name of the object; pass ``--trust`` if you trust the file (downloaded from
the official release) to read it fully. The written file holds tensors,
strings and numbers only.

Usage: python tools/model_converters/dat2mmdat.py [--trust] SRC DST
"""
import argparse
import os
import sys

import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='official checkpoint (.pth)')
    parser.add_argument('dst', help='output OpenMMLab 2 checkpoint (.pth)')
    parser.add_argument(
        '--trust', action='store_true',
        help='SRC is trusted: if it pickles objects other than tensors and '
        'plain data, unpickle them (torch.load weights_only=False)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmengine.utils import ProgressBar

    from mmdat.utils.checkpoint import (UntrustedCheckpointError,
                                        convert_official, dataset_meta_of,
                                        read_checkpoint)
    try:
        ckpt = read_checkpoint(args.src, trusted=args.trust)
        kind, sd = convert_official(ckpt, args.src)
    except (FileNotFoundError, ValueError, RuntimeError, TypeError,
            UntrustedCheckpointError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 1
    print(f'{args.src}: {kind}, {len(sd)} tensors')
    dataset_meta = dataset_meta_of(ckpt)
    del ckpt  # may hold an optimizer state as large as the model again
    out = {}
    # a bar only on a terminal (redirected, it is tens of KB of redraws)
    bar = ProgressBar(len(sd), file=sys.stderr) if sys.stderr.isatty() \
        else None
    for k in list(sd):
        # own storage per tensor (a view would save its whole base); pop so
        # that at most one tensor is held twice
        out[k] = sd.pop(k).detach().clone().contiguous()
        if bar is not None:
            bar.update()
    if bar is not None:
        sys.stderr.write('\n')
    print(f'converted {len(out)} tensors')
    os.makedirs(os.path.dirname(os.path.abspath(args.dst)), exist_ok=True)
    tmp = args.dst + '.tmp'
    meta = dict(mmdat_converted=True, source_kind=kind,
                source=os.path.basename(args.src))
    if dataset_meta:
        meta['dataset_meta'] = dataset_meta
    torch.save({'state_dict': out, 'meta': meta}, tmp)
    os.replace(tmp, args.dst)  # never leave a half-written DST behind
    print(f'saved {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
