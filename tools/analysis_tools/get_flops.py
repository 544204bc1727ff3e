#!/usr/bin/env python
"""FLOPs and parameters of a DAT / DAT++ model (backbone or classifier).

Usage::

    python tools/analysis_tools/get_flops.py configs/mmpretrain/dat_pp_t_in1k.py
    python tools/analysis_tools/get_flops.py --arch small --shape 224 224
    python tools/analysis_tools/get_flops.py --arch base --json flops_b.json
    python tools/analysis_tools/get_flops.py configs/mmdet/mask_rcnn_dat_pp_t_1x.py --shape 800 1280

What is counted
---------------
The count is analytic: forward hooks see the input and output shapes of every
module during one ``no_grad`` forward pass, and each supported module adds its
cost from those shapes and its attributes. So the count does not depend on
the attention implementation (``impl='auto'`` and ``'reference'`` give the
same number) and custom ops (``grid_sample``, ``scaled_dot_product_attention``,
the neighborhood attention) are all covered.

Conventions (those of fvcore / ``mmengine.analysis``, which the paper's
"GFLOPs" follow): **one multiply-add (MAC) counts as one FLOP**; element-wise
operations (additions of residuals and biases, activations, softmax, scaling)
are not counted.

========================  ====================================================
module / op               FLOPs
========================  ====================================================
``nn.Conv2d``             ``out.numel() * in_channels / groups * kh * kw``
                          (bias not counted)
``nn.Linear``             ``out.numel() * in_features`` (bias not counted)
LayerNorm (2d)            ``5 * numel`` (affine; fvcore's estimate)
``AdaptiveAvgPool``       ``1 * input numel``
deformable attention      * key sampling ``grid_sample`` (bilinear, 4 corners):
                            ``4 * B * C * Hk * Wk`` (4 per sampled element and
                            channel, fvcore's ``aten::grid_sampler`` handle);
                          * ``q k^T``: ``B * h * (H W) * Ns * head_dim``;
                          * ``attn v``: ``B * h * (H W) * Ns * head_dim``;
                          * position bias (``use_pe``): one bilinear lookup
                            of the bias table per head, query and key,
                            ``4 * B * h * (H W) * Ns`` (the spec's
                            ``grid_sample`` of the table);
                          with ``Ns = Hk * Wk`` recomputed from the offset
                          conv (``conv_offset[0]``: kernel, stride,
                          padding). The convs inside (offset network, q/k/v/
                          out projections) and the offset LayerNorm are
                          counted by their own modules.
neighborhood attention    ``q k^T`` and ``attn v`` over the ``k x k`` window
                          of every query: ``2 * B * h * (Hp Wp) * k^2 *
                          head_dim`` (``Hp, Wp``: the map zero-padded to at
                          least ``k``, as computed); qkv / proj are Linear.
window attention          ``2 * B * h * nW * (w^2)^2 * head_dim`` on the map
                          padded to a multiple of ``w``.
========================  ====================================================

For an mmpretrain config (or ``--arch``) the whole ``ImageClassifier`` is
counted (backbone + pooling + head, ``mode='tensor'``). For mmdet / mmseg
configs the backbone and the neck (if any) are counted, not the heads (their
cost depends on the number of proposals).
"""
import argparse
import json
import os
import os.path as osp
import sys
from collections import OrderedDict
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
ARCH_CONFIGS = {
    'tiny': 'configs/mmpretrain/dat_pp_t_in1k.py',
    'small': 'configs/mmpretrain/dat_pp_s_in1k.py',
    'base': 'configs/mmpretrain/dat_pp_b_in1k.py',
}
ARCH_CONFIGS.update(t=ARCH_CONFIGS['tiny'], s=ARCH_CONFIGS['small'],
                    b=ARCH_CONFIGS['base'])
#: Published DAT++ ImageNet-1k 224 numbers (GFLOPs, params).
PUBLISHED = {
    'tiny': (4.3, 23_962_876),
    'small': (9.4, 53_127_366),
    'base': (16.6, 93_690_640),
}

#: FLOPs per element of an affine LayerNorm (fvcore's estimate).
NORM_FLOPS_PER_ELEMENT = 5
#: FLOPs per sampled element (and channel) of a bilinear ``grid_sample``.
BILINEAR_FLOPS_PER_ELEMENT = 4


# ---------------------------------------------------------------------------
# Per-module costs (pure functions of shapes and module attributes)
# ---------------------------------------------------------------------------
def _prod(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def conv2d_flops(module: nn.Conv2d, out_shape: Sequence[int]) -> int:
    kh, kw = module.kernel_size
    return _prod(out_shape) * (module.in_channels // module.groups) * kh * kw


def linear_flops(module: nn.Linear, out_shape: Sequence[int]) -> int:
    return _prod(out_shape) * module.in_features


def layer_norm_flops(in_shape: Sequence[int]) -> int:
    return NORM_FLOPS_PER_ELEMENT * _prod(in_shape)


def _conv_out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def deformable_key_grid(module, H: int, W: int) -> Tuple[int, int]:
    """``(Hk, Wk)`` of the sampled keys, from the offset conv's geometry.

    Mirrors ``DeformableAttention.sampling_positions``: an unpadded offset
    conv (kernel == stride) on a map smaller than its kernel is first
    zero-padded to the kernel size.
    """
    conv = module.conv_offset[0]
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    if p == 0:
        H, W = max(H, k), max(W, k)
    return _conv_out(H, k, s, p), _conv_out(W, k, s, p)


def deformable_attention_flops(module, in_shape: Sequence[int]
                               ) -> Dict[str, int]:
    """Cost of the attention itself (not of its convs), by part."""
    B, C, H, W = (int(v) for v in in_shape)
    Hk, Wk = deformable_key_grid(module, H, W)
    Ns, M = Hk * Wk, H * W
    h, c = module.num_heads, module.head_dim
    parts = OrderedDict(
        grid_sample=BILINEAR_FLOPS_PER_ELEMENT * B * C * Ns,
        attn_qk=B * h * M * Ns * c,
        attn_v=B * h * M * Ns * c)
    if module.use_pe:
        parts['pos_bias'] = BILINEAR_FLOPS_PER_ELEMENT * B * h * M * Ns
    return parts


def neighborhood_attention_flops(module, in_shape: Sequence[int]
                                 ) -> Dict[str, int]:
    B, C, H, W = (int(v) for v in in_shape)
    k = module.kernel_size
    Hp, Wp = max(H, k), max(W, k)
    n = B * module.num_heads * Hp * Wp * k * k * module.head_dim
    return OrderedDict(attn_qk=n, attn_v=n)


def window_attention_flops(module, in_shape: Sequence[int]
                           ) -> Dict[str, int]:
    B, C, H, W = (int(v) for v in in_shape)
    w = module.window_size
    Hp, Wp = H + (-H) % w, W + (-W) % w
    n_win = (Hp // w) * (Wp // w)
    n = B * n_win * module.num_heads * (w * w) ** 2 * module.head_dim
    return OrderedDict(attn_qk=n, attn_v=n)


# ---------------------------------------------------------------------------
# Counting with forward hooks
# ---------------------------------------------------------------------------
def _shape(t) -> Optional[Tuple[int, ...]]:
    if isinstance(t, torch.Tensor):
        return tuple(t.shape)
    if isinstance(t, (tuple, list)) and t and isinstance(t[0], torch.Tensor):
        return tuple(t[0].shape)
    return None


def module_flops(module: nn.Module, inputs, output) -> Dict[str, int]:
    """FLOPs of one call of ``module`` (its own work, not its children's),
    by kind; ``{}`` for modules that cost nothing or are counted through
    their children."""
    from mmdat.models.attentions import (DeformableAttention, LayerNorm2d,
                                         NeighborhoodAttention,
                                         WindowAttention)
    in_shape = _shape(inputs)
    out_shape = _shape(output)
    if isinstance(module, nn.Conv2d):
        return {'conv': conv2d_flops(module, out_shape)}
    if isinstance(module, nn.Linear):
        return {'linear': linear_flops(module, out_shape)}
    if isinstance(module, (LayerNorm2d, nn.LayerNorm)):
        return {'norm': layer_norm_flops(in_shape)}
    if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                           nn.AdaptiveAvgPool3d)):
        return {'pool': _prod(in_shape)}
    if isinstance(module, DeformableAttention):
        return deformable_attention_flops(module, in_shape)
    if isinstance(module, NeighborhoodAttention):
        return neighborhood_attention_flops(module, in_shape)
    if isinstance(module, WindowAttention):
        return window_attention_flops(module, in_shape)
    return {}


def stage_of(name: str) -> str:
    """Group of a module name for the per-stage breakdown.

    ``stem`` (patch_proj), ``stage1..4`` (the blocks, and for stages 2-4 the
    downsampling conv + norm in front of them), ``norm`` (output norms),
    ``head`` (neck/pooling and classification head), ``other``.
    """
    parts = name.split('.')
    if parts and parts[0] == 'backbone':
        parts = parts[1:]
    if not parts:
        return 'other'
    if parts[0] == 'patch_proj':
        return 'stem'
    if parts[0] == 'stages' and len(parts) > 1:
        return f'stage{int(parts[1]) + 1}'
    if parts[0] == 'down_projs' and len(parts) > 1:
        return f'stage{int(parts[1]) + 2}'
    if parts[0] == 'norms':
        return 'norm'
    if parts[0] in ('neck', 'head', 'decode_head', 'auxiliary_head'):
        return 'head'
    return 'other'


def count_flops(model: nn.Module, shape: Sequence[int] = (224, 224),
                batch: int = 1, in_channels: int = 3,
                forward=None) -> dict:
    """Count FLOPs of ``model`` on a ``(batch, in_channels, H, W)`` input.

    ``forward(model, x)`` runs the model (default: ``model(x)``).
    Returns a dict with ``flops`` (total), ``gflops``, ``params``,
    ``by_stage`` and ``by_kind`` (both ``{name: flops}``) and
    ``input_shape``.
    """
    by_stage: Dict[str, int] = OrderedDict(
        (k, 0) for k in ('stem', 'stage1', 'stage2', 'stage3', 'stage4',
                         'norm', 'head', 'other'))
    by_kind: Dict[str, int] = OrderedDict()
    calls = []

    def hook(name):
        def fn(module, inputs, output):
            costs = module_flops(module, inputs, output)
            for kind, n in costs.items():
                by_kind[kind] = by_kind.get(kind, 0) + n
                by_stage[stage_of(name)] += n
            if costs:
                calls.append(name)
        return fn

    handles = [m.register_forward_hook(hook(n))
               for n, m in model.named_modules()]
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(batch, in_channels, *shape)
        with torch.no_grad():
            if forward is None:
                model(x)
            else:
                forward(model, x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    total = sum(by_kind.values())
    by_stage = OrderedDict((k, v) for k, v in by_stage.items()
                           if v or k.startswith('stage'))
    return dict(
        input_shape=[batch, in_channels, *shape],
        flops=total,
        gflops=total / 1e9,
        params=sum(p.numel() for p in model.parameters()),
        by_stage=by_stage,
        by_kind=by_kind,
        modules_counted=len(calls))


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------
def build_from_config(config: str):
    """Build ``cfg.model`` from a config (any of mmpretrain/mmdet/mmseg).

    Returns ``(model, forward, scope)`` where ``forward(model, x)`` runs the
    part that is counted.
    """
    from mmdat.apis import load_config
    cfg = load_config(config)
    scope = cfg.default_scope
    if scope == 'mmpretrain':
        from mmpretrain.registry import MODELS
    elif scope == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    model = MODELS.build(cfg.model)
    if scope == 'mmpretrain':
        def forward(m, x):
            return m(x, mode='tensor')
    else:
        def forward(m, x):
            feats = m.backbone(x)
            if getattr(m, 'with_neck', False) or getattr(m, 'neck', None):
                feats = m.neck(feats)
            return feats
    return model, forward, scope


def build_for_arch(arch: str):
    """The ImageNet-1k classifier of a DAT++ preset (from its config)."""
    if arch not in ARCH_CONFIGS:
        raise ValueError(f'--arch must be one of {sorted(ARCH_CONFIGS)}, '
                         f'got {arch!r}')
    return build_from_config(osp.join(ROOT, ARCH_CONFIGS[arch]))


def get_flops(config: Optional[str] = None, arch: Optional[str] = None,
              shape: Sequence[int] = (224, 224), batch: int = 1) -> dict:
    """Build the model of ``config`` (or preset ``arch``) and count it."""
    if (config is None) == (arch is None):
        raise ValueError('give exactly one of config and arch')
    if config is not None:
        model, forward, scope = build_from_config(config)
    else:
        model, forward, scope = build_for_arch(arch)
    res = count_flops(model, shape, batch, forward=forward)
    res.update(config=config, arch=arch, scope=scope,
               counted='classifier' if scope == 'mmpretrain'
               else 'backbone+neck')
    return res


def format_result(res: dict) -> str:
    lines = []
    name = res.get('config') or f"arch={res.get('arch')}"
    lines.append(f"{name}  ({res.get('counted', 'model')}, input "
                 f"{'x'.join(str(s) for s in res['input_shape'])})")
    lines.append('  per stage:')
    for k, v in res['by_stage'].items():
        lines.append(f'    {k:<8s} {v / 1e9:9.4f} GFLOPs')
    lines.append('  per kind:')
    for k, v in res['by_kind'].items():
        lines.append(f'    {k:<12s} {v / 1e9:9.4f} GFLOPs')
    lines.append(f"  total    {res['gflops']:9.4f} GFLOPs "
                 '(1 multiply-add = 1 FLOP)')
    lines.append(f"  params   {res['params']:,d}")
    return '\n'.join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description='Count the FLOPs (multiply-adds, fvcore convention: one '
        'MAC = one FLOP) and parameters of a DAT / DAT++ model, from the '
        'shapes seen in one forward pass on a random input: the classifier '
        'of a --arch preset, or the backbone of any mmpretrain / mmdet / '
        'mmseg config. The result is printed per stage and per kind of '
        'operation; see the module docstring for what is counted.',
        epilog='examples:\n'
        '  python tools/analysis_tools/get_flops.py --arch small\n'
        '  python tools/analysis_tools/get_flops.py '
        'configs/mmdet/mask_rcnn_dat_pp_t_1x.py --shape 800 1216',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config', nargs='?', help='config file (mmpretrain, '
                   'mmdet or mmseg); default: the classifier of --arch')
    p.add_argument('--arch', choices=['tiny', 'small', 'base'],
                   help='DAT++ preset: count its ImageNet-1k classifier '
                   '(default tiny when no config is given)')
    p.add_argument('--shape', type=int, nargs='+', default=[224, 224],
                   metavar='SIZE',
                   help='input height and width (one value: a square '
                   'input; default 224 224)')
    p.add_argument('--batch', type=int, default=1,
                   help='batch size of the input (default 1)')
    p.add_argument('--json', help='also write the result to this JSON file')
    args = p.parse_args(argv)
    if args.config is None and args.arch is None:
        args.arch = 'tiny'
    if args.config is not None and args.arch is not None:
        p.error('give a config or --arch, not both')
    if len(args.shape) == 1:
        args.shape = args.shape * 2
    if len(args.shape) != 2:
        p.error('--shape takes H W')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(),
                              int(os.environ.get('OMP_NUM_THREADS', 2))))
    res = get_flops(args.config, args.arch, tuple(args.shape), args.batch)
    print(format_result(res))
    if args.arch and tuple(args.shape) == (224, 224) and args.batch == 1:
        g, n = PUBLISHED[args.arch]
        print(f'  published: {g} GFLOPs, {n:,d} params '
              f"({(res['gflops'] - g) / g * 100:+.1f}% FLOPs)")
    if args.json:
        d = osp.dirname(osp.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(res, f, indent=2)
        print(f'  written: {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
