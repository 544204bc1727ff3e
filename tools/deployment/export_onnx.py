#!/usr/bin/env python
"""Export a DAT++ model to ONNX (standard operators only) and check it in
ONNX Runtime.

What is exported (input ``image``: the normalised ``(N, 3, H, W)`` batch that
the model's ``data_preprocessor`` produces, i.e. RGB, ``(x - mean) / std``):

==========================  ===============================================
config / option             outputs
==========================  ===============================================
mmpretrain classifier       ``logits`` ``(N, classes)`` (before softmax)
mmseg segmentor             ``seg_logits`` ``(N, classes, H, W)``: whole-image
                            inference, resized to the input size
mmdet detector              ``feat0..featK``: the backbone + neck feature
                            maps; the heads and their post-processing
                            (proposals, NMS, masks) stay in PyTorch
``--backbone-only``,        ``stage<i>`` for each ``i`` of the backbone's
``--arch``, a DAT config    ``out_indices``
==========================  ===============================================

The graph holds only standard ONNX operators (opset >= 17, default domain):
inside the export the attention ops take their portable implementations
(:func:`mmdat.ops.dispatch.portable`): the deformable position bias and the
key sampling are gather-based bilinear lookups (no ``GridSample``),
neighborhood attention is gathers and matmuls. Models whose options force a
non-portable implementation (``impl='cpu'``, ``'triton'``, ``'flex'``) are
refused with an error naming the module and the option.

The exporter is PyTorch's TorchScript-based one (``dynamo=False``): it needs
no package besides ``onnx`` to check the file, is fast (the demo models in a
few seconds, DAT-T++ in under a minute on two busy cores; the torch.export
based exporter took 20x longer and needs ``onnxscript``) and keeps tensor
sizes symbolic, so ``--dynamic`` gives one file for any batch and image size
(check it with ``--verify`` at several sizes: a size-dependent Python branch
in a model would be frozen at the export size).

Examples::

    # classifier logits, one file for any size, checked at two sizes
    python tools/deployment/export_onnx.py configs/mmpretrain/dat_pp_demo.py \\
        work_dirs/dat_pp_demo/epoch_15.pth --out demo_cls.onnx --shape 64 64 \\
        --dynamic --verify --verify-shape 72 88
    # DAT-T++ backbone alone, ONNX Runtime vs PyTorch latency
    python tools/deployment/export_onnx.py --arch tiny --out dat_t.onnx \\
        --dynamic --shape 224 224 --benchmark --bench-shape 224 224 \\
        --bench-shape 800 1216
"""
import argparse
import contextlib
import logging
import os
import os.path as osp
import statistics
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: the lowest opset whose standard operators cover the graph
#: (``LayerNormalization`` is opset 17)
MIN_OPSET = 17
DEFAULT_OPSET = 17
#: operators that must not appear even though they are standard:
#: ``GridSample`` is missing from or miscompiled by some runtimes
FORBIDDEN_OPS = frozenset({'GridSample'})
INPUT_NAME = 'image'
KINDS = ('classifier', 'segmentor', 'detector', 'backbone')
#: which op each attention module calls, for the exportability check
_MODULE_OPS = {'DeformableAttention': 'deformable_attention',
               'NeighborhoodAttention': 'neighborhood_attention'}


# --------------------------------------------------------------- the models
class ClassifierLogits(nn.Module):
    """mmpretrain ``ImageClassifier``: image -> logits (``mode='tensor'``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.model.extract_feat(image))


class SegmentorLogits(nn.Module):
    """mmseg ``EncoderDecoder``: image -> per-class logits of whole-image
    inference (``encode_decode``: decode head, bilinear resize to the input
    size)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.model.decode_head(self.model.extract_feat(image))
        # mmseg takes the size from the image metas (Python ints, which a
        # trace would freeze); the interpolation itself is the same
        align = self.model.decode_head.align_corners
        return F.interpolate(logits, size=image.shape[2:], mode='bilinear',
                             align_corners=align)


class Features(nn.Module):
    """Detector backbone + neck (``extract_feat``) or a backbone: image ->
    tuple of feature maps."""

    def __init__(self, model: nn.Module, backbone_only: bool):
        super().__init__()
        self.model = model
        self.backbone_only = backbone_only

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if self.backbone_only:
            return tuple(self.model(image))
        return tuple(self.model.extract_feat(image))


class PortableAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` as two averaging matmuls whose bins are
    computed from the input size, as PyTorch's: bin ``i`` of ``o`` over
    ``n`` is ``[floor(i n / o), ceil((i + 1) n / o))``.

    The TorchScript exporter needs a static input size for adaptive pooling
    to any output but 1 (UPerHead's pyramid pooling: 1, 2, 3, 6); this form
    exports with symbolic sizes. Same values up to summation order.
    """

    def __init__(self, output_size):
        super().__init__()
        size = output_size
        self.output_size = tuple(size) if isinstance(size, (tuple, list)) \
            else (size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        oh, ow = self.output_size
        ph = _pool_matrix(x.shape[-2], oh, x)  # (oh, H)
        pw = _pool_matrix(x.shape[-1], ow, x)  # (ow, W)
        return torch.matmul(torch.matmul(ph, x), pw.transpose(0, 1))


def _pool_matrix(n, o: Optional[int], like: torch.Tensor) -> torch.Tensor:
    """``(o, n)`` averaging weights of adaptive pooling along one axis
    (``o=None``: the input size, i.e. the identity)."""
    j = torch.arange(n, device=like.device)
    if o is None:
        return (j[:, None] == j[None]).to(like.dtype)
    i = torch.arange(o, device=like.device)
    start = torch.div(i * n, o, rounding_mode='floor')
    end = torch.div((i + 1) * n + o - 1, o, rounding_mode='floor')
    inside = (j[None] >= start[:, None]) & (j[None] < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


class _portable_pooling:
    """Within the block, every ``nn.AdaptiveAvgPool2d`` of ``module`` with an
    output other than 1x1 is a :class:`PortableAdaptiveAvgPool2d`."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.swapped = []

    def __enter__(self):
        for name, m in list(self.module.named_modules()):
            if type(m) is nn.AdaptiveAvgPool2d and m.output_size not in (
                    1, (1, 1)):
                parent_name, _, attr = name.rpartition('.')
                parent = self.module.get_submodule(parent_name)
                self.swapped.append((parent, attr, m))
                setattr(parent, attr, PortableAdaptiveAvgPool2d(
                    m.output_size))
        return self

    def __exit__(self, *exc):
        for parent, attr, m in reversed(self.swapped):
            setattr(parent, attr, m)
        self.swapped = []


def model_kind(model: nn.Module) -> str:
    """``'classifier'``, ``'segmentor'``, ``'detector'`` or ``'backbone'``
    (a bare DAT)."""
    from mmdat.models import DAT
    if isinstance(model, DAT):
        return 'backbone'
    module = type(model).__module__
    if module.startswith('mmpretrain'):
        return 'classifier'
    if module.startswith('mmseg'):
        return 'segmentor'
    if module.startswith('mmdet'):
        return 'detector'
    raise ValueError(f'cannot export a {type(model).__name__} '
                     f'({module}): expected an mmpretrain classifier, an '
                     'mmseg segmentor, an mmdet detector or a DAT backbone')


def export_module(model: nn.Module, backbone_only: bool = False
                  ) -> Tuple[nn.Module, str]:
    """The module to export and its kind (see :data:`KINDS`)."""
    kind = model_kind(model)
    if backbone_only and kind != 'backbone':
        if not hasattr(model, 'backbone'):
            raise ValueError(f'--backbone-only: {type(model).__name__} has '
                             'no backbone')
        model, kind = model.backbone, 'backbone'
    if kind == 'classifier':
        if not getattr(model, 'with_head', True):
            raise ValueError('the classifier has no head: nothing gives '
                             'logits (use --backbone-only for features)')
        return ClassifierLogits(model).eval(), kind
    if kind == 'segmentor':
        if not hasattr(model, 'decode_head'):
            raise ValueError(f'{type(model).__name__} has no decode_head')
        return SegmentorLogits(model).eval(), kind
    return Features(model, kind == 'backbone').eval(), kind


def output_names(kind: str, outputs, module: nn.Module) -> List[str]:
    """``logits``, ``seg_logits``, ``feat<level>`` or ``stage<index>``
    (the backbone's ``out_indices``)."""
    if kind == 'classifier':
        return ['logits']
    if kind == 'segmentor':
        return ['seg_logits']
    stages = getattr(getattr(module, 'model', None), 'out_indices', None)
    if kind == 'backbone' and stages is not None and len(stages) == len(
            outputs):
        return [f'stage{i}' for i in stages]
    prefix = 'stage' if kind == 'backbone' else 'feat'
    return [f'{prefix}{i}' for i in range(len(outputs))]


def check_exportable(module: nn.Module) -> None:
    """Raise ``ValueError`` naming every attention module whose ``impl``
    forces an implementation that is not portable (no ONNX export)."""
    from mmdat.ops import dispatch
    bad = []
    for name, m in module.named_modules():
        op = _MODULE_OPS.get(type(m).__name__)
        impl = getattr(m, 'impl', None)
        if op is None or impl is None or impl in (dispatch.AUTO, 'fast'):
            continue
        portable = [i.name for i in dispatch.implementations(op)
                    if i.portable]
        if impl not in portable:
            bad.append(f"{name} ({type(m).__name__}): impl={impl!r}")
    if bad:
        raise ValueError(
            'cannot export to ONNX: these attention modules force an '
            'implementation made of custom kernels (not portable): '
            + '; '.join(bad[:4]) + (f' (+{len(bad) - 4} more)'
                                    if len(bad) > 4 else '')
            + ". Build the model with impl='auto' (e.g. --cfg-options "
            "model.backbone.impl=auto), which exports the portable "
            'implementations.')


# ---------------------------------------------------------------- building
def load_weights(model: nn.Module, checkpoint: str,
                 trusted: bool = False) -> None:
    """Load an mmdat / OpenMMLab 2 checkpoint or an official DAT++ file
    (``torch.load(weights_only=True)``; a file that needs more is refused
    unless ``trusted``, see :func:`mmdat.utils.checkpoint.safe_load`)."""
    from mmdat.models import DAT
    from mmdat.utils.checkpoint import (KIND_CLASSIFICATION, KIND_DENSE,
                                        backbone_state_dict, checkpoint_kind,
                                        convert_official, read_checkpoint)
    ckpt = read_checkpoint(checkpoint, trusted=trusted)
    try:
        kind = checkpoint_kind(ckpt, checkpoint)
    except ValueError:
        kind = None  # not a DAT layout mmdat knows: take its state dict
    if isinstance(model, DAT):
        if kind is None:
            raise ValueError(f'{checkpoint} holds no DAT backbone weights')
        sd = backbone_state_dict(ckpt, checkpoint)
    elif kind in (KIND_CLASSIFICATION, KIND_DENSE):
        sd = convert_official(ckpt, checkpoint)[1]
    else:
        sd = ckpt.get('state_dict', ckpt)
        if not isinstance(sd, dict) or not all(
                torch.is_tensor(v) for v in sd.values()):
            raise ValueError(f'{checkpoint}: no state_dict of tensors')
        sd = {k[len('module.'):] if k.startswith('module.') else k: v
              for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    own = model.state_dict()
    if len(missing) == len(own):
        raise ValueError(f'{checkpoint} does not match this model: none of '
                         f'its {len(own)} tensors was found (keys like '
                         f'{sorted(sd)[:3]})')
    if missing or unexpected:
        warnings.warn(f'{checkpoint}: {len(missing)} missing keys '
                      f'{missing[:5]}, {len(unexpected)} unexpected keys '
                      f'{unexpected[:5]}')


@contextlib.contextmanager
def _quiet_mmengine():
    """mmengine's ``init_weights`` logs one INFO record per parameter."""
    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def build_model(config: Optional[str] = None,
                checkpoint: Optional[str] = None,
                arch: Optional[str] = None,
                cfg_options: Optional[dict] = None,
                trusted: bool = False) -> nn.Module:
    """The config's model (or ``DAT(arch)``) in eval mode on the CPU, with
    ``checkpoint`` loaded; SyncBN becomes BN (same inference)."""
    if (config is None) == (arch is None):
        raise ValueError('give a config or --arch (not both)')
    if arch is not None:
        from mmdat.models import DAT
        model = DAT(arch)
        model.init_weights()
    else:
        import importlib

        from mmdat.apis import load_config
        from mmengine.model import revert_sync_batchnorm
        cfg = load_config(config, cfg_options)
        registry = importlib.import_module(f'{cfg.default_scope}.registry')
        model = registry.MODELS.build(cfg.model)
        if not checkpoint and hasattr(model, 'init_weights'):
            try:
                with _quiet_mmengine():
                    model.init_weights()
            except FileNotFoundError as exc:
                # e.g. the ImageNet weights a dense config starts from
                warnings.warn(f'{config}: the initialisation reads a file '
                              f'that is not there ({exc}); exporting the '
                              'model with random weights (pass a '
                              'checkpoint to export trained ones)')
        model = revert_sync_batchnorm(model)
    if checkpoint:
        load_weights(model, checkpoint, trusted)
    return model.cpu().eval()


# ---------------------------------------------------------------- export
def export(module: nn.Module, kind: str, out: str,
           shape: Sequence[int] = (224, 224), batch: int = 1,
           dynamic: bool = False, opset: int = DEFAULT_OPSET) -> List[str]:
    """Export ``module`` (from :func:`export_module`) to ``out``; returns the
    output names. ``dynamic``: batch and image size are symbolic."""
    from mmdat.ops import dispatch
    if opset < MIN_OPSET:
        raise ValueError(f'--opset {opset}: the graph needs opset >= '
                         f'{MIN_OPSET} (LayerNormalization)')
    check_exportable(module)
    x = torch.randn(batch, 3, *shape)
    with torch.no_grad(), dispatch.portable():
        names = output_names(kind, module(x), module)
    axes = None
    if dynamic:
        axes = {INPUT_NAME: {0: 'batch', 2: 'height', 3: 'width'}}
        for i, name in enumerate(names):
            axes[name] = ({0: 'batch'} if kind == 'classifier' else
                          {0: 'batch', 2: f'height{i}', 3: f'width{i}'})
    d = osp.dirname(osp.abspath(out))
    os.makedirs(d, exist_ok=True)
    with torch.no_grad(), dispatch.portable(), _portable_pooling(module), \
            warnings.catch_warnings():
        # tracing warns about every Python use of a size (checks, loop
        # bounds); --verify at other sizes is what tells whether the graph
        # generalises
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        warnings.filterwarnings('ignore', category=DeprecationWarning,
                                message='.*TorchScript-based ONNX export')
        torch.onnx.export(module, (x, ), out, dynamo=False,
                          opset_version=opset, input_names=[INPUT_NAME],
                          output_names=names, dynamic_axes=axes,
                          do_constant_folding=True)
    return names


def operator_types(path: str) -> Dict[str, set]:
    """``{domain: {op types}}`` of every node of the file (subgraphs too)."""
    import onnx
    model = onnx.load(path, load_external_data=False)
    found: Dict[str, set] = {}

    def walk(graph):
        for node in graph.node:
            found.setdefault(node.domain or 'ai.onnx', set()).add(
                node.op_type)
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return found


def check_standard_ops(path: str) -> List[str]:
    """Check that the file holds only standard ONNX operators of its opset
    (default domain, none of :data:`FORBIDDEN_OPS`) and passes the ONNX
    checker; returns the sorted operator types."""
    import onnx
    model = onnx.load(path, load_external_data=False)
    onnx.checker.check_model(model)
    opsets = {o.domain or 'ai.onnx': o.version for o in model.opset_import}
    if opsets.get('ai.onnx', 0) < MIN_OPSET:
        raise ValueError(f'{path}: opset {opsets.get("ai.onnx")} < '
                         f'{MIN_OPSET}')
    found = operator_types(path)
    custom = {d: sorted(o) for d, o in found.items() if d != 'ai.onnx'}
    if custom:
        raise ValueError(f'{path}: operators outside the standard ONNX '
                         f'domain: {custom}')
    ops = found.get('ai.onnx', set())
    unknown = sorted(op for op in ops if not onnx.defs.has(op))
    forbidden = sorted(ops & FORBIDDEN_OPS)
    if unknown or forbidden:
        raise ValueError(f'{path}: non-standard operators {unknown}, '
                         f'forbidden operators {forbidden}')
    return sorted(ops)


# ----------------------------------------------------------- ONNX Runtime
def ort_session(path: str, threads: Optional[int] = None):
    """An ONNX Runtime CPU session for ``path``."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError('onnxruntime is needed to run the exported file: '
                          "pip install 'mmdat[deploy]' (or onnxruntime)"
                          ) from exc
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(path, opts,
                                providers=['CPUExecutionProvider'])


def torch_outputs(module: nn.Module, x: torch.Tensor,
                  portable: bool = False) -> List[torch.Tensor]:
    """PyTorch outputs of ``module`` (default implementations, or the
    portable ones) as a list."""
    from mmdat.ops import dispatch
    with torch.no_grad(), dispatch.portable(portable):
        out = module(x)
    return [out] if torch.is_tensor(out) else list(out)


def relative_errors(ort_out, ref) -> List[float]:
    """Per output ``max |ort - ref| / max |ref|``."""
    errs = []
    for o, r in zip(ort_out, ref):
        o = torch.from_numpy(o)
        if o.shape != r.shape:
            raise ValueError(f'ONNX Runtime gave shape {tuple(o.shape)}, '
                             f'PyTorch {tuple(r.shape)}')
        scale = r.abs().max().clamp_min(1e-12)
        errs.append(float((o - r).abs().max() / scale))
    return errs


def verify(path: str, module: nn.Module,
           shapes: Sequence[Tuple[int, ...]], session=None
           ) -> List[Tuple[Tuple[int, ...], List[float]]]:
    """Run the file in ONNX Runtime at each ``(N, 3, H, W)`` shape and
    compare with PyTorch; returns ``[(shape, per-output relative error)]``."""
    session = session or ort_session(path)
    results = []
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        x = torch.randn(*shape, generator=gen)
        got = session.run(None, {INPUT_NAME: x.numpy()})
        results.append((tuple(shape),
                        relative_errors(got, torch_outputs(module, x))))
    return results


# ------------------------------------------------------------- benchmark
def _time_ms(fn, warmup: int, repeat: int) -> Tuple[float, float]:
    """Median and best wall-clock time of ``fn`` in ms (the best is the
    steadier figure on a shared machine)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, min(times) * 1e3


def benchmark(path: str, module: nn.Module,
              shapes: Sequence[Tuple[int, ...]], warmup: int = 1,
              repeat: int = 5, threads: Optional[int] = None,
              portable: bool = False) -> List[dict]:
    """Wall-clock latency (median and best, ms) of ONNX Runtime (CPU
    provider) and of PyTorch eager on the CPU (default implementations:
    mmdat's fused kernels where built) at each shape, both with ``threads``
    threads (default: torch's). ``portable``: also PyTorch with the portable
    implementations (the math of the ONNX graph)."""
    threads = threads or torch.get_num_threads()
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    session = ort_session(path, threads)
    rows = []
    try:
        for shape in shapes:
            x = torch.randn(*shape)
            feed = {INPUT_NAME: x.numpy()}
            row = dict(shape=list(shape), threads=threads)
            row['onnxruntime_ms'], row['onnxruntime_best_ms'] = _time_ms(
                lambda: session.run(None, feed), warmup, repeat)
            with torch.inference_mode():
                row['pytorch_ms'], row['pytorch_best_ms'] = _time_ms(
                    lambda: module(x), warmup, repeat)
            if portable:
                row['pytorch_portable_ms'], row['pytorch_portable_best_ms'] \
                    = _time_ms(lambda: torch_outputs(module, x, True),
                               warmup, repeat)
            rows.append(row)
    finally:
        torch.set_num_threads(prev)
    return rows


# -------------------------------------------------------------------- CLI
def _shape(values: Sequence[int], batch: int) -> Tuple[int, ...]:
    h, w = values
    if h < 1 or w < 1:
        raise ValueError(f'sizes must be positive, got {h} {w}')
    return (batch, 3, h, w)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Export an mmdat model (classifier logits, segmentor '
        'logits, detector backbone+neck features, or the DAT backbone) to '
        'ONNX with standard operators only; optionally check it and time '
        'it in ONNX Runtime.',
        epilog=__doc__.split('Examples::')[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', nargs='?', default=None,
                        help='config of mmpretrain, mmseg or mmdet (or one '
                        'whose model is a DAT)')
    parser.add_argument('checkpoint', nargs='?', default=None,
                        help='weights (mmdat / OpenMMLab 2 checkpoint or an '
                        'official DAT++ file); default: the initialised '
                        'model')
    parser.add_argument('--trust', action='store_true',
                        help='the checkpoint is yours: if the weights-only '
                        'load refuses it, load it with weights_only=False')
    parser.add_argument('--arch', default=None,
                        help='export DAT(arch) alone instead of a config '
                        '(tiny, small, base)')
    parser.add_argument('--out', required=True, help='the .onnx file')
    parser.add_argument('--shape', nargs=2, type=int, default=[224, 224],
                        metavar=('H', 'W'), help='input size of the export '
                        '(default 224 224)')
    parser.add_argument('--batch', type=int, default=1,
                        help='batch size of the export (default 1)')
    parser.add_argument('--dynamic', action='store_true',
                        help='symbolic batch, height and width: one file '
                        'for every input size')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET,
                        help=f'ONNX opset (>= {MIN_OPSET}; default '
                        f'{DEFAULT_OPSET})')
    parser.add_argument('--backbone-only', action='store_true',
                        help="export the model's backbone alone")
    parser.add_argument('--verify', action='store_true',
                        help='run the file in ONNX Runtime (CPU) and compare '
                        'with PyTorch at --shape and every --verify-shape')
    parser.add_argument('--verify-shape', nargs=2, type=int, action='append',
                        default=[], metavar=('H', 'W'),
                        help='another input size for --verify (needs '
                        '--dynamic); repeatable')
    parser.add_argument('--rtol', type=float, default=1e-4,
                        help='--verify fails above this relative error '
                        '(max |diff| / max |PyTorch|; default 1e-4)')
    parser.add_argument('--benchmark', action='store_true',
                        help='time ONNX Runtime and PyTorch on the CPU at '
                        'every --bench-shape (default: --shape)')
    parser.add_argument('--bench-shape', nargs=2, type=int, action='append',
                        default=[], metavar=('H', 'W'))
    parser.add_argument('--repeat', type=int, default=5,
                        help='timed runs per measurement (median reported)')
    parser.add_argument('--bench-portable', action='store_true',
                        help='--benchmark also PyTorch with the portable '
                        'implementations (the math of the ONNX graph)')
    parser.add_argument('--threads', type=int, default=None,
                        help='CPU threads of both runtimes (default: '
                        "torch's)")
    parser.add_argument('--cfg-options', nargs='+', default=None,
                        metavar='KEY=VALUE',
                        help='override config settings (mmengine syntax)')
    args = parser.parse_args(argv)
    if args.arch and args.config and not args.checkpoint:
        # `--arch tiny ckpt.pth`: the positional is the checkpoint
        args.config, args.checkpoint = None, args.config
    if args.verify_shape and not args.dynamic:
        parser.error('--verify-shape needs --dynamic (a static file takes '
                     'only --shape)')
    if args.bench_shape and not args.dynamic and any(
            s != args.shape for s in args.bench_shape):
        parser.error('--bench-shape other than --shape needs --dynamic')
    if args.config is None and args.arch is None:
        parser.error('give a config or --arch')
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg_options = None
    if args.cfg_options:
        from mmengine.config import DictAction
        ns = argparse.Namespace()
        DictAction(option_strings=[], dest='o')(None, ns, args.cfg_options)
        cfg_options = ns.o
    model = build_model(args.config, args.checkpoint, args.arch, cfg_options,
                        args.trust)
    module, kind = export_module(model, args.backbone_only)
    names = export(module, kind, args.out, args.shape, args.batch,
                   args.dynamic, args.opset)
    print(f'exported {kind} ({type(model).__name__}) to {args.out}: input '
          f'{INPUT_NAME} (N, 3, H, W), outputs {names}'
          + (' (dynamic batch and size)' if args.dynamic else
             f' (static {args.batch}x3x{args.shape[0]}x{args.shape[1]})'))
    result = dict(kind=kind, out=args.out, outputs=names)
    try:
        import onnx  # noqa: F401
    except ImportError:
        print('onnx is not installed: operator check skipped')
    else:
        result['operators'] = check_standard_ops(args.out)
        print(f'standard ONNX operators only ({len(result["operators"])}): '
              + ' '.join(result['operators']))
    if args.verify:
        shapes = [_shape(args.shape, args.batch)] + [
            _shape(s, args.batch) for s in args.verify_shape]
        result['verify'] = verify(args.out, module, shapes)
        failed = []
        for shape, errs in result['verify']:
            size = 'x'.join(map(str, shape))
            print(f'ONNX Runtime vs PyTorch at {size}: max relative error '
                  + ', '.join(f'{e:.2e}' for e in errs))
            # `not <=`: a NaN error fails too
            failed += [f'{size}: {e:.2e}' for e in errs if not e <= args.rtol]
        if failed:
            raise SystemExit(f'verification failed (--rtol {args.rtol:g}): '
                             + '; '.join(failed))
    if args.benchmark:
        shapes = [_shape(s, args.batch) for s in
                  (args.bench_shape or [args.shape])]
        result['benchmark'] = benchmark(args.out, module, shapes,
                                        repeat=args.repeat,
                                        threads=args.threads,
                                        portable=args.bench_portable)
        for row in result['benchmark']:
            line = (f'{"x".join(map(str, row["shape"]))} ({row["threads"]} '
                    f'threads), median (best) of {args.repeat}: ONNX Runtime '
                    f'{row["onnxruntime_ms"]:.1f} '
                    f'({row["onnxruntime_best_ms"]:.1f}) ms, PyTorch '
                    f'{row["pytorch_ms"]:.1f} ({row["pytorch_best_ms"]:.1f}) '
                    'ms')
            if 'pytorch_portable_ms' in row:
                line += (f', PyTorch portable ops '
                         f'{row["pytorch_portable_ms"]:.1f} '
                         f'({row["pytorch_portable_best_ms"]:.1f}) ms')
            print(line)
    return result


if __name__ == '__main__':
    main()
