"""DAT / DAT++ backbone (Xia et al., "DAT++: Spatially Dynamic Vision
Transformer with Deformable Attention") for mmdet, mmseg and mmpretrain.

The module tree and state-dict keys are those of the official code, so its
published weights load as they are (see ``tools/model_converters``).
"""
import copy
import weakref
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmengine.logging import MMLogger
from mmengine.model import BaseModule

from ..attentions import (DeformableAttention, LayerNorm2d,
                          NeighborhoodAttention, WindowAttention)
from ..attentions.common import (add_into_branch, check_impl, conv_add,
                                 cpu_inference_fusable, has_hooks)
from ..attentions.window import official_shift

NUM_STAGES = 4
BLOCK_LETTERS = ('N', 'D', 'L', 'S')


def _dat_pp_spec(depths: Sequence[int]) -> List[List[str]]:
    """DAT++ block pattern: N/D alternating in stages 1-3, all D in stage 4."""
    return [['N', 'D'] * (d // 2) for d in depths[:3]] + [['D'] * depths[3]]


_DAT_PP_DEPTHS = [2, 4, 18, 2]
ARCH_SETTINGS: Dict[str, dict] = {
    'tiny': dict(dim_stem=64, dims=[64, 128, 256, 512], depths=_DAT_PP_DEPTHS,
                 heads=[2, 4, 8, 16], groups=[1, 2, 4, 8],
                 stage_spec=_dat_pp_spec(_DAT_PP_DEPTHS)),
    'small': dict(dim_stem=96, dims=[96, 192, 384, 768],
                  depths=_DAT_PP_DEPTHS, heads=[3, 6, 12, 24],
                  groups=[1, 2, 3, 6], stage_spec=_dat_pp_spec(_DAT_PP_DEPTHS)),
    'base': dict(dim_stem=128, dims=[128, 256, 512, 1024],
                 depths=_DAT_PP_DEPTHS, heads=[4, 8, 16, 32],
                 groups=[2, 4, 8, 16], stage_spec=_dat_pp_spec(_DAT_PP_DEPTHS)),
}
ARCH_SETTINGS['t'] = ARCH_SETTINGS['tiny']
ARCH_SETTINGS['s'] = ARCH_SETTINGS['small']
ARCH_SETTINGS['b'] = ARCH_SETTINGS['base']

# Per-stage options and their DAT++ defaults (official keyword names).
_PER_STAGE_DEFAULTS = dict(
    strides=[8, 4, 2, 1], ksizes=[9, 7, 5, 3], nat_ksizes=[7, 7, 7, 7],
    window_sizes=[7, 7, 7, 7], offset_range_factor=[-1, -1, -1, -1],
    use_pes=[True] * 4, use_dwc_mlps=[True] * 4, use_lpus=[True] * 4,
    no_offs=[False] * 4, dwc_pes=[False] * 4, fixed_pes=[False] * 4)
_REQUIRED = ('dims', 'depths', 'heads', 'groups', 'stage_spec')
_SCALAR_DEFAULTS = dict(dim_stem=None, use_conv_patches=True, expansion=4,
                        patch_size=4, img_size=224)
# Accepted for copy-paste of official settings; the runtime equivalents are
# DAT's own arguments (drop_path_rate, out_indices, with_cp).
_IGNORED = ('drop_path_rate', 'out_indices', 'use_checkpoint', 'num_classes',
            'drop_rate', 'attn_drop_rate', 'layer_scale_values', 'ns_per_pts',
            'sr_ratios', 'log_cpb', 'use_lpus_for_nat',
            # the official v1 detection / segmentation settings also carry
            # options of block letters mmdat does not build (rejected with
            # the letter) and an optimizer option
            'heads_q', 'local_orf', 'local_kv_sizes', 'lower_lr_kvs',
            'ksize_qnas', 'nqs', 'qna_activation', 'deform_groups',
            'offset_pes', 'use_cmt_mlps')
# Of those, options that would change the blocks mmdat builds: must be off.
_MUST_BE_OFF = ('offset_pes', 'use_cmt_mlps')


def resolve_arch(arch: Union[str, dict]) -> dict:
    """Turn a preset name or an official-style dict into a full, checked arch.

    Raises ValueError/TypeError naming the offending key and value.
    """
    if isinstance(arch, str):
        if arch not in ARCH_SETTINGS:
            raise ValueError(
                f'arch {arch!r} is not a DAT++ preset; expected one of '
                f"{sorted(k for k in ARCH_SETTINGS if len(k) > 1)} or a dict")
        arch = ARCH_SETTINGS[arch]
    elif not isinstance(arch, dict):
        raise TypeError(f'arch must be a preset name or a dict, got '
                        f'{type(arch).__name__}')
    missing = [k for k in _REQUIRED if k not in arch]
    if missing:
        raise ValueError(f'arch dict is missing {missing} (required: '
                         f'{list(_REQUIRED)})')
    known = set(_REQUIRED) | set(_PER_STAGE_DEFAULTS) | set(
        _SCALAR_DEFAULTS) | set(_IGNORED)
    unknown = sorted(set(arch) - known)
    if unknown:
        raise ValueError(f'arch dict has unknown keys {unknown}')
    cfg = copy.deepcopy(_SCALAR_DEFAULTS)
    cfg.update({k: copy.deepcopy(v) for k, v in _PER_STAGE_DEFAULTS.items()})
    cfg.update({k: copy.deepcopy(v) for k, v in arch.items()
                if k not in _IGNORED})
    for key in ('drop_rate', 'attn_drop_rate'):
        if arch.get(key, 0.0):
            raise ValueError(f'arch[{key!r}]={arch[key]} is not supported '
                             '(DAT++ uses 0.0)')
    for key in _MUST_BE_OFF:
        val = arch.get(key, False)
        if any(val if isinstance(val, (list, tuple)) else [val]):
            raise ValueError(f'arch[{key!r}]={val!r} is not supported (the '
                             'published models use False)')
    for key in list(_PER_STAGE_DEFAULTS) + list(_REQUIRED):
        val = cfg[key]
        if not isinstance(val, (list, tuple)):
            raise TypeError(f'arch[{key!r}] must be a list with one entry per '
                            f'stage, got {val!r}')
        if len(val) != NUM_STAGES:
            raise ValueError(f'arch[{key!r}] has {len(val)} entries, expected '
                             f'{NUM_STAGES} (one per stage): {list(val)}')
        cfg[key] = list(val)
    for i in range(NUM_STAGES):
        dim, depth = cfg['dims'][i], cfg['depths'][i]
        heads = cfg['heads'][i]
        for key, val in (('dims', dim), ('depths', depth), ('heads', heads)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f'arch[{key!r}][{i}] must be a positive int, '
                                 f'got {val!r}')
        spec = cfg['stage_spec'][i]
        if isinstance(spec, str):
            spec = list(spec)
        if len(spec) != depth:
            raise ValueError(f'arch stage_spec[{i}] has {len(spec)} letters '
                             f'{list(spec)} but depths[{i}] is {depth}')
        for d, letter in enumerate(spec):
            if letter not in BLOCK_LETTERS:
                raise ValueError(
                    f'arch stage_spec[{i}][{d}]: unknown block letter '
                    f'{letter!r}; expected one of {list(BLOCK_LETTERS)}')
        cfg['stage_spec'][i] = list(spec)
        if dim % heads:
            raise ValueError(f'arch dims[{i}]={dim} is not divisible by '
                             f'heads[{i}]={heads}')
        # Each per-stage size is checked only where a block uses it: the
        # official v1 settings put -1 in groups/strides of window stages.
        used = dict(groups='D', strides='D', ksizes='D', nat_ksizes='N',
                    window_sizes='LS')
        for key, letters in used.items():
            val = cfg[key][i]
            if not any(letter in letters for letter in spec):
                continue
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f'arch[{key!r}][{i}] must be a positive int '
                                 f'(stage {i} has blocks {sorted(set(spec))})'
                                 f', got {val!r}')
        if 'D' in spec and heads % cfg['groups'][i]:
            raise ValueError(f'arch heads[{i}]={heads} is not divisible by '
                             f'groups[{i}]={cfg["groups"][i]}')
        for key in ('dwc_pes', 'fixed_pes'):
            if cfg[key][i]:
                raise ValueError(f'arch[{key!r}][{i}]=True is not supported '
                                 '(DAT++ uses False)')
    if cfg['dim_stem'] is None:
        cfg['dim_stem'] = cfg['dims'][0]
    return cfg


class ConvFFN(nn.Module):
    """DAT++ MLP: 1x1 conv -> (+ depthwise 3x3) -> GELU -> 1x1 conv."""

    def __init__(self, dim: int, expansion: int = 4):
        super().__init__()
        hidden = dim * expansion
        self.linear1 = nn.Sequential(nn.Conv2d(dim, hidden, 1))
        self.dwc = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act = nn.GELU()
        self.linear2 = nn.Sequential(nn.Conv2d(hidden, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear1(x)
        x = conv_add(self.dwc, x, x)
        # in inference the sum is a fresh tensor: GELU in place
        x = (torch.ops.aten.gelu_(x)
             if cpu_inference_fusable(x) and not has_hooks(self.act)
             else self.act(x))
        return self.linear2(x)


class MLP(nn.Module):
    """DAT v1 MLP on channels-last tokens (keys ``chunk.linear1/2``)."""

    def __init__(self, dim: int, expansion: int = 4):
        super().__init__()
        self.chunk = nn.Sequential()
        self.chunk.add_module('linear1', nn.Linear(dim, dim * expansion))
        self.chunk.add_module('act', nn.GELU())
        self.chunk.add_module('linear2', nn.Linear(dim * expansion, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.chunk(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Stochastic depth on a residual branch (per sample)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f'p={self.p}'


class _GradInParamLayout:
    """Gradient hook: a gradient whose strides differ from its parameter's
    only in size-1 dims is re-strided like the parameter (same memory, no
    copy).

    Convolutions on channels-last maps (the attention outputs are
    channels-last by design, no transposing copy) give channels-last weight
    gradients; for depthwise ``(C, 1, k, k)`` and 1x1 ``(O, I, 1, 1)``
    weights autograd accepts that layout (size-1 dims do not count), but
    DDP compares every stride, warns "Grad strides do not match bucket view
    strides" and copies those gradients into its buckets at every step.
    """

    def __init__(self, param: torch.Tensor):
        self.param = weakref.ref(param)

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        param = self.param()
        if param is None or grad.stride() == param.stride() or \
                grad.shape != param.shape:
            return grad
        if all(g == p or n == 1 for g, p, n in
               zip(grad.stride(), param.stride(), grad.shape)):
            return grad.as_strided(grad.shape, param.stride(),
                                   grad.storage_offset())
        return grad


class DATStage(nn.Module):
    """One stage: ``depth`` blocks of ``[LPU] -> attention -> MLP``."""

    def __init__(self, index: int, dim_in: int, cfg: dict,
                 drop_paths: Sequence[float], impl: str, with_cp: bool):
        super().__init__()
        i = index
        dim = cfg['dims'][i]
        heads, groups = cfg['heads'][i], cfg['groups'][i]
        spec = cfg['stage_spec'][i]
        depth = len(spec)
        self.with_cp = with_cp
        self.proj = nn.Identity() if dim_in == dim else nn.Conv2d(
            dim_in, dim, 1)
        self.use_lpu = cfg['use_lpus'][i]
        self.layer_norms = nn.ModuleList(
            [LayerNorm2d(dim) for _ in range(2 * depth)])
        mlp = ConvFFN if cfg['use_dwc_mlps'][i] else MLP
        self.mlps = nn.ModuleList(
            [mlp(dim, cfg['expansion']) for _ in range(depth)])
        rpe_size = cfg['img_size'] // 4 // (2 ** i)
        attns = []
        for letter in spec:
            if letter == 'D':
                attns.append(DeformableAttention(
                    dim, heads, groups, cfg['strides'][i], cfg['ksizes'][i],
                    rpe_size, cfg['offset_range_factor'][i],
                    cfg['use_pes'][i], cfg['no_offs'][i], impl))
            elif letter == 'N':
                attns.append(NeighborhoodAttention(
                    dim, heads, cfg['nat_ksizes'][i], impl))
            else:
                w = cfg['window_sizes'][i]
                attns.append(WindowAttention(
                    dim, heads, w,
                    shift=official_shift(w) if letter == 'S' else 0))
        self.attns = nn.ModuleList(attns)
        if self.use_lpu:
            self.local_perception_units = nn.ModuleList([
                nn.Conv2d(dim, dim, 3, 1, 1, groups=dim) for _ in range(depth)
            ])
        self.drop_path = nn.ModuleList([DropPath(p) for p in drop_paths])

    def block(self, d: int, x: torch.Tensor) -> torch.Tensor:
        if self.use_lpu:
            x = conv_add(self.local_perception_units[d], x, x)
        x = add_into_branch(
            x, self.drop_path[d](self.attns[d](self.layer_norms[2 * d](x))))
        x = add_into_branch(
            x, self.drop_path[d](self.mlps[d](self.layer_norms[2 * d + 1](x))))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for d in range(len(self.attns)):
            if self.with_cp and x.requires_grad:
                x = cp.checkpoint(self.block, d, x, use_reentrant=False)
            else:
                x = self.block(d, x)
        return x


class DAT(BaseModule):
    """DAT / DAT++ backbone.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'`` (DAT++ T/S/B) or a dict with
            the official constructor keys (``dims``, ``depths``,
            ``stage_spec``, ``heads``, ``groups`` required; ``dim_stem``,
            ``strides``, ``ksizes``, ``nat_ksizes``, ``use_pes``,
            ``use_dwc_mlps``, ``use_lpus``, ``use_conv_patches``,
            ``offset_range_factor``, ``window_sizes``, ``img_size`` ...
            optional with DAT++ defaults).
        in_channels: input image channels.
        img_size: pre-training resolution; sets the deformable position-bias
            table size (224 for the published models, 384 for B++ 384).
            ``None`` takes it from ``arch`` (default 224).
        out_indices: stages whose (normed) outputs are returned.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        with_cp: gradient checkpointing of each block.
        frozen_stages: ``k >= 0`` freezes the stem and the first ``k`` stages
            (each with its output norm and the downsampling after it).
        impl: attention implementation of every block: ``'auto'`` (the
            dispatcher of :mod:`mmdat.ops` chooses per call), ``'cpu'``
            (C++ kernels), ``'triton'`` (CUDA), ``'chunked'``
            (plain PyTorch, memory-lean) or ``'reference'`` (the spec).
            ``mmdat.ops.explain(model, x)`` tells which ran and why.
        init_cfg: mmengine init config; ``dict(type='Pretrained',
            checkpoint=...)`` accepts official and converted checkpoints.
    """

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 img_size: Optional[int] = None,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 drop_path_rate: float = 0.0,
                 with_cp: bool = False,
                 frozen_stages: int = -1,
                 impl: str = 'auto',
                 pretrained: Optional[str] = None,
                 init_cfg: Optional[dict] = None):
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError('init_cfg and pretrained cannot be both set')
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        cfg = resolve_arch(arch)
        if img_size is not None:
            cfg['img_size'] = img_size
        if not isinstance(cfg['img_size'], int) or cfg['img_size'] < 32:
            raise ValueError(f'img_size must be an int >= 32, got '
                             f'{cfg["img_size"]!r}')
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f'in_channels must be a positive int, got '
                             f'{in_channels!r}')
        if isinstance(out_indices, int):
            out_indices = (out_indices, )
        out_indices = tuple(out_indices)
        if not out_indices or any(
                not isinstance(i, int) or not -NUM_STAGES <= i < NUM_STAGES
                for i in out_indices):
            raise ValueError(f'out_indices must be stage indices in '
                             f'[0, {NUM_STAGES - 1}], got {out_indices!r}')
        out_indices = tuple(sorted({i % NUM_STAGES for i in out_indices}))
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f'drop_path_rate must be in [0, 1), got '
                             f'{drop_path_rate!r}')
        if not isinstance(frozen_stages, int) or not \
                -1 <= frozen_stages <= NUM_STAGES:
            raise ValueError(f'frozen_stages must be an int in [-1, '
                             f'{NUM_STAGES}], got {frozen_stages!r}')
        check_impl(impl)
        self.arch_settings = cfg
        self.in_channels = in_channels
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.with_cp = with_cp
        self.dims = cfg['dims']
        self.num_features = [cfg['dims'][i] for i in out_indices]

        stem = cfg['dim_stem']
        if cfg['use_conv_patches']:
            self.patch_proj = nn.Sequential(
                nn.Conv2d(in_channels, stem // 2, 3, 2, 1),
                LayerNorm2d(stem // 2), nn.GELU(),
                nn.Conv2d(stem // 2, stem, 3, 2, 1), LayerNorm2d(stem))
        else:
            p = cfg['patch_size']
            self.patch_proj = nn.Sequential(
                nn.Conv2d(in_channels, stem, p, p), LayerNorm2d(stem))

        depths = [len(s) for s in cfg['stage_spec']]
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages = []
        for i in range(NUM_STAGES):
            # down_projs already map to dims[i]; only the stem may differ
            dim_in = stem if i == 0 else cfg['dims'][i]
            stages.append(DATStage(i, dim_in, cfg,
                                   dpr[sum(depths[:i]):sum(depths[:i + 1])],
                                   impl, with_cp))
        self.stages = nn.ModuleList(stages)
        self.down_projs = nn.ModuleList()
        for i in range(NUM_STAGES - 1):
            a, b = cfg['dims'][i], cfg['dims'][i + 1]
            conv = nn.Conv2d(a, b, 3, 2, 1, bias=False) if cfg[
                'use_conv_patches'] else nn.Conv2d(a, b, 2, 2, 0, bias=False)
            self.down_projs.append(nn.Sequential(conv, LayerNorm2d(b)))
        # Output norms of the official dense-prediction backbone; the
        # classifier's ``cls_norm`` is ``norms.3`` (see the converter).
        self.norms = nn.ModuleList([
            LayerNorm2d(cfg['dims'][i]) if i in out_indices else nn.Identity()
            for i in range(NUM_STAGES)
        ])
        self._freeze_stages()
        self.register_load_state_dict_pre_hook(_resize_rpe_tables)
        for p in self.parameters():
            if p.requires_grad and p.dim() >= 2 and 1 in p.shape:
                p.register_hook(_GradInParamLayout(p))

    # --------------------------------------------------------------- training
    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        mods: List[nn.Module] = [self.patch_proj]
        for i in range(self.frozen_stages):
            mods += [self.stages[i], self.norms[i]]
            if i < NUM_STAGES - 1:
                mods.append(self.down_projs[i])
        return mods

    def _freeze_stages(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> 'DAT':
        super().train(mode)
        self._freeze_stages()
        return self

    def init_weights(self) -> None:
        """``init_cfg=None``: nothing (PyTorch's default initialisation of
        each layer, as the official code, whose ``reset_parameters`` loops
        over parameters instead of modules and so changes nothing);
        ``dict(type='Pretrained', checkpoint=..., prefix=...)``: official or
        converted weights through
        :func:`mmdat.utils.checkpoint.load_dat_pretrained` (local path, URL
        or any mmengine checkpoint scheme, safe loading);
        other init configs: mmengine's."""
        if self.init_cfg is not None and self.init_cfg.get(
                'type') == 'Pretrained':
            from ...utils.checkpoint import load_dat_pretrained
            load_dat_pretrained(self, self.init_cfg['checkpoint'],
                                prefix=self.init_cfg.get('prefix'),
                                logger=MMLogger.get_current_instance())
            return
        if self.init_cfg is not None:
            super().init_weights()

    # ---------------------------------------------------------------- forward
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f'DAT expects a tensor, got {type(x).__name__}')
        if x.dim() != 4:
            raise ValueError(f'DAT expects a 4-D (N, C, H, W) input, got '
                             f'shape {tuple(x.shape)}')
        if x.shape[1] != self.in_channels:
            raise ValueError(f'DAT expects {self.in_channels} input channels '
                             f'(in_channels), got input of shape '
                             f'{tuple(x.shape)}')
        if x.shape[0] == 0 or x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f'DAT got an empty input of shape '
                             f'{tuple(x.shape)}')

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        self._check_input(x)
        x = self.patch_proj(x)
        outs = []
        for i in range(NUM_STAGES):
            x = self.stages[i](x)
            if i in self.out_indices:
                # the norm's output is a channels-last view; heads expect
                # NCHW memory (mmcv's RoIAlign reads data_ptr() as NCHW and
                # scrambled every RoI feature of the detectors)
                outs.append(self.norms[i](x).contiguous())
            if i < NUM_STAGES - 1:
                if i >= max(self.out_indices):
                    break
                x = self.down_projs[i](x)
        return tuple(outs)


def _resize_rpe_tables(module: nn.Module, state_dict: dict, prefix: str,
                       *args) -> None:
    """``load_state_dict`` pre-hook: deformable position-bias tables of
    another pre-training size (224 weights into an ``img_size=384``
    model) are resized bicubically, whatever loads the weights
    (``init_cfg``, ``load_from``, ``load_checkpoint``)."""
    from ...utils.checkpoint import resize_rpe_table
    logger = None
    for name, param in module.named_parameters():
        if not name.endswith('rpe_table'):
            continue
        key = prefix + name
        value = state_dict.get(key)
        if (not isinstance(value, torch.Tensor) or value.dim() != 3
                or value.shape == param.shape
                or value.shape[0] != param.shape[0]):
            continue  # same size, or a mismatch load_state_dict reports
        state_dict[key] = resize_rpe_table(value, param.shape[-2:])
        logger = logger or MMLogger.get_current_instance()
        logger.info(f'resized {key} from {tuple(value.shape)} to '
                    f'{tuple(param.shape)} (bicubic)')
