#!/usr/bin/env python
"""Time and memory of the DAT backbone (or its attention modules) against the
reference attention path and mmdet's Swin-T, in one run.

Each measurement runs in a fresh process so that peak memory is its own.
CPU: peak RSS growth during the timed runs over the footprint after the
warm-up runs (the kernel's peak counter is restarted there through
``/proc/self/clear_refs``, and freed heap is handed back first), so that
one-time costs -- library code paged in, kernels built on first use -- do
not count; where that counter cannot be restarted, the growth over the
footprint before the warm-up. CUDA: ``torch.cuda.max_memory_allocated``
growth. Times are medians over ``--repeat`` runs after ``--warmup`` runs.

Examples:
  python tools/analysis_tools/benchmark.py --arch tiny --shape 1 3 800 1216 --mode infer
  python tools/analysis_tools/benchmark.py --arch tiny --shape 2 3 512 512 --mode train
  python tools/analysis_tools/benchmark.py --target deform-attn --shape 1 64 200 304
  python tools/analysis_tools/benchmark.py --config configs/mmdet/mask_rcnn_dat_pp_t_3x.py
"""
import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from typing import Dict, List, Optional

# auto: the default path (fused flex attention on CUDA, the chunked exact
# path on CPU); fast: the chunked path; reference: the spec's formulation.
VARIANTS = ('auto', 'fast', 'reference', 'swin')


def _rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _restart_peak_rss() -> bool:
    """Give freed heap back, then restart the kernel's peak-RSS counter
    (VmHWM) at the current RSS; False where that is not possible."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        return False
    return True


def _peak_rss_bytes() -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _build(target: str, variant: str, arch, shape):
    import torch
    if variant == 'swin':
        from mmdet.models.backbones import SwinTransformer
        if target != 'backbone':
            return None
        return SwinTransformer(embed_dims=96, depths=(2, 2, 6, 2),
                               num_heads=(3, 6, 12, 24), window_size=7,
                               out_indices=(0, 1, 2, 3))
    impl = variant
    if target == 'backbone':
        from mmdat.models import DAT
        return DAT(arch=arch, impl=impl)
    C = shape[1]
    if target == 'deform-attn':
        from mmdat.models.attentions import DeformableAttention
        # stage-1 DAT-T++ setting: 2 heads, 1 group, stride 8, offset kernel 9
        return DeformableAttention(C, 2, 1, stride=8, offset_kernel=9,
                                   rpe_size=56, impl=impl)
    if target == 'nat-attn':
        from mmdat.models.attentions import NeighborhoodAttention
        return NeighborhoodAttention(C, 2, 7, impl=impl)
    raise ValueError(f'unknown target {target!r}')


def _measure(job: dict) -> Optional[dict]:
    import torch
    torch.set_num_threads(job['threads'])
    device = torch.device(job['device'])
    torch.manual_seed(0)
    model = _build(job['target'], job['variant'], job['arch'], job['shape'])
    if model is None:
        return None
    model = model.to(device)
    x = torch.randn(*job['shape'], device=device)
    train = job['mode'] == 'train'
    model.train(train)
    if train:
        x.requires_grad_(job['target'] != 'backbone')

    def step():
        if train:
            out = model(x)
            out = out if isinstance(out, (tuple, list)) else [out]
            sum(o.float().mean() for o in out).backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(x)
        if device.type == 'cuda':
            torch.cuda.synchronize()

    base = _rss_bytes() if device.type == 'cpu' else 0
    for _ in range(job['warmup']):
        step()
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    elif _restart_peak_rss():
        base = _rss_bytes()
    times = []
    for _ in range(job['repeat']):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_rss_bytes() - base
    return dict(time_s=statistics.median(times), times_s=times,
                peak_mb=peak / 2**20)


def run_isolated(job: dict) -> Optional[dict]:
    """Run one measurement in a fresh spawned process."""
    ctx = mp.get_context('spawn')
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(_measure, (job, ))


def arch_from_config(path: str):
    from mmengine.config import Config
    cfg = Config.fromfile(path)
    bb = cfg.model.backbone
    return bb.get('arch', 'tiny')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--target', default='backbone',
                   choices=['backbone', 'deform-attn', 'nat-attn'])
    p.add_argument('--arch', default='tiny', help='DAT preset name')
    p.add_argument('--config', help='take the backbone arch from a config')
    p.add_argument('--shape', type=int, nargs=4, default=[1, 3, 224, 224])
    p.add_argument('--mode', default='both', choices=['infer', 'train', 'both'])
    p.add_argument('--variants', default='auto,reference,swin',
                   help=f'comma list from {VARIANTS}')
    p.add_argument('--repeat', type=int, default=5)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--device', default='cuda' if _cuda() else 'cpu')
    p.add_argument('--json', help='write the results here')
    return p.parse_args(argv)


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def main(argv=None) -> List[Dict]:
    args = parse_args(argv)
    arch = arch_from_config(args.config) if args.config else args.arch
    variants = [v for v in args.variants.split(',') if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f'unknown variants {bad}; choose from {VARIANTS}')
    modes = ['infer', 'train'] if args.mode == 'both' else [args.mode]
    results = []
    for mode in modes:
        row = {}
        for v in variants:
            job = dict(target=args.target, variant=v, arch=arch,
                       shape=args.shape, mode=mode, repeat=args.repeat,
                       warmup=args.warmup, threads=args.threads,
                       device=args.device)
            res = run_isolated(job)
            if res is None:
                continue
            row[v] = res
            print(f'{args.target:11s} {mode:5s} {v:9s} shape={args.shape} '
                  f'median {res["time_s"] * 1000:9.1f} ms  peak '
                  f'{res["peak_mb"]:8.1f} MB', flush=True)
        ratios = {}
        # the default path against the others ('fast' is what 'auto' runs
        # on CPU, so either may stand for it)
        base = next((v for v in ('auto', 'fast') if v in row), None)
        for other in VARIANTS if base else ():
            if other != base and other in row:
                ratios[f'time_{base}/{other}'] = (row[base]['time_s'] /
                                                  row[other]['time_s'])
                ratios[f'peak_{base}/{other}'] = (
                    row[base]['peak_mb'] / max(row[other]['peak_mb'], 1e-9))
        for k, val in ratios.items():
            print(f'  {mode} {k} = {val:.3f}')
        results.append(dict(target=args.target, arch=arch, mode=mode,
                            shape=args.shape, device=args.device,
                            threads=args.threads, results=row, ratios=ratios))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=2)
        print(f'wrote {args.json}')
    return results


if __name__ == '__main__':
    main()
