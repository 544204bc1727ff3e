#!/usr/bin/env python
r"""Time and memory of the DAT backbone (or its attention modules) against the
reference attention path and mmdet's Swin-T, in one run.

Each measurement runs in a fresh process so that peak memory is its own.
CPU: peak RSS growth during the timed runs over the footprint after the
warm-up runs (the kernel's peak counter is restarted there through
``/proc/self/clear_refs``, and freed heap is handed back first), so that
one-time costs -- library code paged in, kernels built on first use -- do
not count; where that counter cannot be restarted, the growth over the
footprint before the warm-up. CUDA: ``torch.cuda.max_memory_allocated``
growth. Times are medians over ``--repeat`` runs after ``--warmup`` runs.

CUDA: ``--dtype`` runs under autocast (bf16/fp16), TF32 stays off unless
``--tf32``; the first call (which compiles Triton kernels) is timed on its
own (``first_call_s``), and ``images_per_s`` is batch / median time.

Examples:
  python tools/analysis_tools/benchmark.py --arch tiny \
      --shape 1 3 800 1216 --mode infer
  python tools/analysis_tools/benchmark.py --arch tiny \
      --shape 2 3 512 512 --mode train
  python tools/analysis_tools/benchmark.py --target deform-attn \
      --shape 1 64 200 304
  python tools/analysis_tools/benchmark.py --device cuda --dtype bf16 \
      --variants triton,swin --shape 2 3 800 1216 --mode train
  python tools/analysis_tools/benchmark.py --device cuda --target maskrcnn \
      --variants triton,swin --shape 2 3 800 1333 --mode train
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

# run from a checkout without installing it (the spawned measuring
# processes inherit sys.path)
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# auto: what the dispatcher picks (fused CPU kernels on CPU, Triton on
# CUDA); fast: old name of auto; the others force one implementation of both
# attention ops (mmdat.ops); swin: mmdet's Swin-T in place of DAT.
VARIANTS = ('auto', 'fast', 'reference', 'chunked', 'cpu', 'triton', 'flex',
            'swin')
DTYPES = {'fp32': None, 'bf16': 'bfloat16', 'fp16': 'float16'}
SWIN_T = dict(type='SwinTransformer', embed_dims=96, depths=(2, 2, 6, 2),
              num_heads=(3, 6, 12, 24), window_size=7,
              out_indices=(0, 1, 2, 3))


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


# mmcv's compiled extension, as far as a Mask R-CNN iteration needs it
# (nms, RoIAlign), on torchvision; any other op raises when called. For
# mmcv-lite, as carried to a GPU machine whose torch no mmcv wheel is built
# for. Benchmarks only.
MMCV_EXT_STANDIN = '''"""Stand-in for mmcv._ext (mmcv-lite): nms and RoIAlign on
torchvision, any other op raises. Written by
tools/analysis_tools/benchmark.py; benchmarks only."""
import torch
import torchvision


def nms(boxes, scores, iou_threshold, offset=0):
    if offset:
        raise NotImplementedError('nms with offset (mmcv._ext stand-in)')
    return torchvision.ops.nms(boxes, scores, float(iou_threshold))


def _check(pool_mode):
    if pool_mode != 1:
        raise NotImplementedError('RoIAlign max pooling (mmcv._ext stand-in)')


def roi_align_forward(input, rois, output, argmax_y, argmax_x, *,
                      aligned_height, aligned_width, spatial_scale,
                      sampling_ratio, pool_mode, aligned):
    _check(pool_mode)
    output.copy_(torchvision.ops.roi_align(
        input, rois.to(input.dtype), (aligned_height, aligned_width),
        spatial_scale, sampling_ratio, aligned))


def roi_align_backward(grad_output, rois, argmax_y, argmax_x, grad_input, *,
                       aligned_height, aligned_width, spatial_scale,
                       sampling_ratio, pool_mode, aligned):
    # RoIAlign is linear in its input: its vector-Jacobian product at zero
    _check(pool_mode)
    with torch.enable_grad():
        x = torch.zeros_like(grad_input, requires_grad=True)
        y = torchvision.ops.roi_align(
            x, rois.to(x.dtype), (aligned_height, aligned_width),
            spatial_scale, sampling_ratio, aligned)
        grad_input.copy_(torch.autograd.grad(y, x, grad_output.to(y.dtype))[0])


def __getattr__(name):
    if name.startswith('__'):
        raise AttributeError(name)

    def op(*args, **kwargs):
        raise NotImplementedError(f'mmcv op {name}: no compiled mmcv ops '
                                  'here (mmcv._ext stand-in)')
    return op
'''


def write_mmcv_ext_standin(path: str) -> None:
    """Write :data:`MMCV_EXT_STANDIN` as ``mmcv/_ext.py`` of an mmcv-lite
    install (``path``), so that every process imports ``mmcv.ops``."""
    with open(path, 'w') as f:
        f.write(MMCV_EXT_STANDIN)


def mmcv_ops_fallback(force: bool = False) -> bool:
    """Install :data:`MMCV_EXT_STANDIN` as ``mmcv._ext`` in this process
    when mmcv has no compiled extension (or ``force``). Returns whether it
    was installed."""
    import importlib.util
    import types
    if importlib.util.find_spec('mmcv') is None:
        return False
    try:
        have = importlib.util.find_spec('mmcv._ext') is not None
    except (ImportError, ValueError):
        have = False
    if have and not force:
        return False
    ext = types.ModuleType('mmcv._ext')
    exec(compile(MMCV_EXT_STANDIN, 'mmcv_ext_standin', 'exec'), ext.__dict__)
    sys.modules['mmcv._ext'] = ext
    return True


def _build_maskrcnn(variant: str, config: Optional[str]):
    """Mask R-CNN from the DAT-T++ config; ``swin``: the same detector
    with mmdet's Swin-T backbone (its neck widths), as mmdet's Swin-T
    Mask R-CNN."""
    mmcv_ops_fallback(os.environ.get('MMDAT_BENCH_MMCV_FALLBACK') == '1')
    from mmengine.config import Config
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    import mmdat  # noqa: F401
    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(config or os.path.join(
        _ROOT, 'configs/mmdet/mask_rcnn_dat_pp_t_1x.py'))
    model = cfg.model
    if variant == 'swin':
        model.backbone = dict(SWIN_T)
        model.neck.in_channels = [96, 192, 384, 768]
        model.neck.add_extra_convs = False
    else:
        model.backbone.impl = variant
        model.backbone.pop('init_cfg', None)
    return MODELS.build(model)


def _maskrcnn_batch(shape, device):
    """Synthetic images (already normalised) and annotations: five boxes
    with masks per image."""
    import torch
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    B, _, H, W = shape
    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(B):
        xy = torch.rand(5, 2, generator=g) * torch.tensor([W * 0.6, H * 0.6])
        wh = 32 + torch.rand(5, 2, generator=g) * torch.tensor([W, H]) * 0.3
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(5, H, W, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist()):
            m[y0:y1, x0:x1] = 1
        inst = InstanceData(bboxes=boxes.to(device),
                            labels=torch.randint(0, 80, (5, ), generator=g
                                                 ).to(device),
                            masks=BitmapMasks(masks.numpy(), H, W))
        s = DetDataSample(metainfo=dict(
            img_shape=(H, W), ori_shape=(H, W), pad_shape=(H, W),
            scale_factor=(1., 1.), batch_input_shape=(H, W)))
        s.gt_instances = inst
        samples.append(s)
    return torch.randn(*shape, generator=g).to(device), samples


def _build(target: str, variant: str, arch, shape, config=None):
    if target == 'maskrcnn':
        return _build_maskrcnn(variant, config)
    if variant == 'swin':
        mmcv_ops_fallback(os.environ.get('MMDAT_BENCH_MMCV_FALLBACK') == '1')
        from mmdet.models.backbones import SwinTransformer
        if target != 'backbone':
            return None
        return SwinTransformer(**{k: v for k, v in SWIN_T.items()
                                  if k != 'type'})
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
    import contextlib

    import torch
    torch.set_num_threads(job['threads'])
    device = torch.device(job['device'])
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = job['tf32']
        torch.backends.cudnn.allow_tf32 = job['tf32']
    torch.manual_seed(0)
    model = _build(job['target'], job['variant'], job['arch'], job['shape'],
                   job.get('config'))
    if model is None:
        return None
    model = model.to(device)
    train = job['mode'] == 'train'
    model.train(train)
    if job['target'] == 'maskrcnn':
        x, samples = _maskrcnn_batch(job['shape'], device)
    else:
        x = torch.randn(*job['shape'], device=device)
        if train:
            x.requires_grad_(job['target'] != 'backbone')
    dtype = DTYPES[job['dtype']]
    amp = (lambda: torch.autocast(device.type, getattr(torch, dtype))) \
        if dtype else contextlib.nullcontext

    def step():
        if job['target'] == 'maskrcnn':
            with amp():
                if train:
                    losses = model(x, samples, mode='loss')
                else:
                    with torch.no_grad():
                        model(x, samples, mode='predict')
            if train:
                loss, _ = model.parse_losses(losses)
                loss.backward()
                model.zero_grad(set_to_none=True)
        elif train:
            with amp():
                out = model(x)
                out = out if isinstance(out, (tuple, list)) else [out]
                loss = sum(o.float().mean() for o in out)
            loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad(), amp():
                model(x)
        if device.type == 'cuda':
            torch.cuda.synchronize()

    base = _rss_bytes() if device.type == 'cpu' else 0
    first = None
    for i in range(job['warmup']):
        t0 = time.perf_counter()
        step()
        if i == 0:
            first = time.perf_counter() - t0
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
    med = statistics.median(times)
    return dict(time_s=med, times_s=times, peak_mb=peak / 2**20,
                first_call_s=first, images_per_s=job['shape'][0] / med)


def run_isolated(job: dict) -> Optional[dict]:
    """Run one measurement in a fresh spawned process."""
    ctx = mp.get_context('spawn')
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        try:
            return pool.apply(_measure, (job, ))
        except Exception as exc:  # noqa: BLE001 - reported, others still run
            if job.get('strict', True):
                raise
            return dict(error=f'{type(exc).__name__}: {exc}')


def arch_from_config(path: str):
    from mmengine.config import Config
    cfg = Config.fromfile(path)
    bb = cfg.model.backbone
    return bb.get('arch', 'tiny')


def build_parser() -> argparse.ArgumentParser:
    """The command line (every option documented in ``-h``)."""
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--target', default='backbone',
                   choices=['backbone', 'deform-attn', 'nat-attn',
                            'maskrcnn'],
                   help='what to run: the DAT backbone (default), one '
                   'stage-1 deformable or neighborhood attention module '
                   '(--shape is then its B C H W input), or a whole Mask '
                   'R-CNN (--config, synthetic annotations; needs mmdet)')
    p.add_argument('--arch', default='tiny',
                   help='DAT preset name (tiny, small, base) for --target '
                   'backbone (default: tiny)')
    p.add_argument('--config',
                   help='take the backbone arch from this config; with '
                   '--target maskrcnn the detector (default: '
                   'configs/mmdet/mask_rcnn_dat_pp_t_1x.py)')
    p.add_argument('--shape', type=int, nargs=4, default=[1, 3, 224, 224],
                   metavar=('B', 'C', 'H', 'W'),
                   help='input shape (default: 1 3 224 224)')
    p.add_argument('--mode', default='both',
                   choices=['infer', 'train', 'both'],
                   help='inference (no grad), a training step (forward + '
                   'backward), or both (default)')
    p.add_argument('--variants', default='auto,reference,swin',
                   help=f'comma list from {VARIANTS} (default: '
                   'auto,reference,swin); each runs in its own process')
    p.add_argument('--base',
                   help='variant the ratios are taken of (default: auto or '
                   'fast when measured, else the first of --variants)')
    p.add_argument('--repeat', type=int, default=5,
                   help='timed runs; the median is reported (default: 5)')
    p.add_argument('--warmup', type=int, default=1,
                   help='untimed runs first; the first one is reported as '
                   'first_call_s (compilation included) (default: 1)')
    p.add_argument('--threads', type=int, default=2,
                   help='torch CPU threads (default: 2)')
    p.add_argument('--device', default='cuda' if _cuda() else 'cpu',
                   choices=['cpu', 'cuda'],
                   help='where to run (default: cuda when available)')
    p.add_argument('--dtype', default='fp32', choices=sorted(DTYPES),
                   help='fp32 (default), or bf16/fp16 autocast')
    p.add_argument('--tf32', action='store_true',
                   help='allow TF32 matmuls/convolutions on CUDA (off by '
                   'default: fp32 means fp32)')
    p.add_argument('--keep-going', action='store_true',
                   help='a variant that fails is reported as an error and '
                   'the others still run')
    p.add_argument('--json', help='write the results here (JSON list, one '
                   'entry per mode)')
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def main(argv=None) -> List[Dict]:
    args = parse_args(argv)
    if args.device == 'cuda' and not _cuda():
        raise SystemExit('--device cuda: CUDA is not available here')
    arch = arch_from_config(args.config) if (
        args.config and args.target != 'maskrcnn') else args.arch
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
                       device=args.device, dtype=args.dtype, tf32=args.tf32,
                       config=args.config, strict=not args.keep_going)
            res = run_isolated(job)
            if res is None:
                continue
            row[v] = res
            if 'error' in res:
                print(f'{args.target:11s} {mode:5s} {v:9s} FAILED: '
                      f'{res["error"]}', flush=True)
                continue
            first = res['first_call_s']
            print(f'{args.target:11s} {mode:5s} {v:9s} shape={args.shape} '
                  f'{args.dtype} median {res["time_s"] * 1000:9.1f} ms  peak '
                  f'{res["peak_mb"]:8.1f} MB  {res["images_per_s"]:8.1f} '
                  f'img/s' + (f'  first call {first:.1f} s'
                              if first is not None else ''), flush=True)
        ok = {v: r for v, r in row.items() if 'error' not in r}
        base = args.base or next(
            (v for v in ('auto', 'fast') if v in ok),
            next(iter(ok), None))
        ratios = {}
        for other in ok if base in ok else ():
            if other != base:
                ratios[f'time_{base}/{other}'] = (ok[base]['time_s'] /
                                                  ok[other]['time_s'])
                ratios[f'peak_{base}/{other}'] = (
                    ok[base]['peak_mb'] / max(ok[other]['peak_mb'], 1e-9))
        for k, val in ratios.items():
            print(f'  {mode} {k} = {val:.3f}')
        results.append(dict(target=args.target, arch=arch, mode=mode,
                            shape=args.shape, device=args.device,
                            dtype=args.dtype, tf32=args.tf32,
                            threads=args.threads, results=row, ratios=ratios))
        if args.json:  # after each mode: a run cut short keeps what it has
            with open(args.json, 'w') as f:
                json.dump(results, f, indent=2)
    if args.json:
        print(f'wrote {args.json}')
    return results


if __name__ == '__main__':
    main()
