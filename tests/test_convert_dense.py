"""Whole official detection / segmentation checkpoints, per config.

For every detector and segmentor config (``configs/mmdet/*.py``,
``configs/mmseg/*.py``) a made-up official file in the mmdet 2.26 / mmseg
0.29 layout is converted with ``tools/model_converters/dat2mmdat.py`` and
loaded strictly into the model the config builds:

* backbone keys and shapes come from the official manifests
  (``tests/data/manifests.json``, ``backbone/<arch>``); the output norms are
  those of the config's ``out_indices`` (the official dense backbone has
  ``norms.i`` only for them);
* neck keys are those of the official model's neck (``OFFICIAL_NECKS``,
  written out from the official DAT-Detection / DAT-Segmentation configs and
  built independently of our config), so a config whose neck differs from
  the official one (say, no P6 conv in Mask R-CNN) fails with missing or
  unexpected keys;
* neck/head keys are the mmdet 2.x / mmseg 0.x names. Their patterns are
  written out below from the 2.x / 0.x sources; every key of the new model
  must be one of them, which is the claim that nothing was renamed between
  versions (so that the converter passes them through);
* the file also carries the old ``meta`` (versions, ``CLASSES``, ...) and an
  ``optimizer`` state, as real training checkpoints do.

The demo configs use a small arch that has no official weights; its widths
are those of the official ``mini`` arch, so their models are built with the
``mini`` trunk (same neck and heads).
"""
import functools
import math
import re
import zlib

import pytest
import torch
from mmengine.runner import load_checkpoint

from conftest import ROOT, load_script
from test_configs import CONFIGS, arch_name, build_model, library_of, load

DENSE_CONFIGS = [c for c in CONFIGS if library_of(c) in ('mmdet', 'mmseg')]
CONVERTER = ROOT / 'tools/model_converters/dat2mmdat.py'


def _conv_bn(prefix: str) -> str:
    """A ConvModule with a norm layer (``SyncBN``/``BN`` are named ``bn``;
    the conv has no bias)."""
    return prefix + (r'\.(conv\.weight|bn\.(weight|bias|running_mean|'
                     r'running_var|num_batches_tracked))')


_WB = r'\.(weight|bias)'
_CONV = r'\.conv' + _WB  # a ConvModule without norm
# Parameter/buffer names of the modules our configs use, in mmdet 2.26 and
# mmseg 0.29 (relative to the module), one regular expression per kind.
OLD_NAMES = {
    'FPN': [r'lateral_convs\.\d' + _CONV, r'fpn_convs\.\d' + _CONV],
    'RPNHead': [r'rpn_conv' + _WB, r'rpn_cls' + _WB, r'rpn_reg' + _WB],
    'Shared2FCBBoxHead': [r'shared_fcs\.[01]' + _WB, r'fc_cls' + _WB,
                          r'fc_reg' + _WB],
    'Shared4Conv1FCBBoxHead': [
        _conv_bn(r'shared_convs\.[0-3]'), r'shared_fcs\.0' + _WB,
        r'fc_cls' + _WB, r'fc_reg' + _WB
    ],
    'FCNMaskHead': [r'convs\.[0-3]' + _CONV, r'upsample' + _WB,
                    r'conv_logits' + _WB],
    'RetinaHead': [r'cls_convs\.[0-3]' + _CONV, r'reg_convs\.[0-3]' + _CONV,
                   r'retina_cls' + _WB, r'retina_reg' + _WB],
    'UPerHead': [
        _conv_bn(r'psp_modules\.[0-3]\.1'), _conv_bn('bottleneck'),
        _conv_bn(r'lateral_convs\.[0-2]'), _conv_bn(r'fpn_convs\.[0-2]'),
        _conv_bn('fpn_bottleneck'), r'conv_seg' + _WB
    ],
    'FCNHead': [_conv_bn(r'convs\.0'), r'conv_seg' + _WB],
    'FPNHead': [_conv_bn(r'scale_heads\.[0-3]\.[024]'), r'conv_seg' + _WB],
}


# The official necks (DAT-Detection configs/_base_/models/*_dat_fpn.py,
# DAT-Segmentation configs/_base_/models/fpn_dat.py): FPN on the four stage
# widths, 256 channels, and per detector:
OFFICIAL_NECKS = {
    'MaskRCNN': dict(start_level=0, add_extra_convs='on_input', num_outs=5),
    'CascadeRCNN': dict(start_level=0, add_extra_convs=False, num_outs=5),
    'RetinaNet': dict(start_level=1, add_extra_convs='on_input', num_outs=5),
    'EncoderDecoder': dict(start_level=0, add_extra_convs=False, num_outs=4),
}


def official_neck_state(cfg, model_cfg, dims, out_channels=256) -> dict:
    """{key: tensor-like} of the official model's neck (empty for UperNet,
    which has none), from an FPN built with the official settings."""
    import importlib
    if model_cfg.get('neck') is None:
        return {}
    assert model_cfg.neck.type == 'FPN'
    registry = importlib.import_module(f'{cfg.default_scope}.registry').MODELS
    neck = registry.build(dict(type='FPN', in_channels=list(dims),
                               out_channels=out_channels,
                               **OFFICIAL_NECKS[model_cfg.type]))
    return {'neck.' + k: v for k, v in neck.state_dict().items()}


def old_patterns(model_cfg) -> list:
    """(module prefix + old name) patterns of the config's neck/heads."""
    parts = []  # (prefix, module type)
    for field in ('neck', 'rpn_head', 'bbox_head', 'decode_head',
                  'auxiliary_head'):
        if model_cfg.get(field) is not None:
            parts.append((field, model_cfg[field]['type']))
    roi = model_cfg.get('roi_head')
    if roi is not None:
        stages = roi.get('num_stages')  # CascadeRoIHead: a head per stage
        for head in ('bbox_head', 'mask_head'):
            cfgs = roi[head]
            if stages is None:
                parts.append((f'roi_head.{head}', cfgs['type']))
                continue
            if not isinstance(cfgs, (list, tuple)):  # one cfg for all stages
                cfgs = [cfgs] * stages
            parts += [(f'roi_head.{head}.{i}', c['type'])
                      for i, c in enumerate(cfgs)]
    return [re.escape(prefix) + r'\.' + name for prefix, kind in parts
            for name in OLD_NAMES[kind]]


def _manifest_name(backbone_cfg, manifests) -> str:
    arch = backbone_cfg.get('arch', 'tiny')
    if isinstance(arch, str):
        return f'backbone/{arch_name(backbone_cfg)}'
    mini = manifests['backbone/mini']['official_kwargs']
    assert (arch['dim_stem'], list(arch['dims'])) == (
        mini['dim_stem'], mini['dims']), 'demo arch no longer as wide as mini'
    return 'backbone/mini'


@functools.lru_cache(maxsize=1)
def _pool() -> torch.Tensor:
    return torch.rand(2**25, generator=torch.Generator().manual_seed(0))


def _random(key: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """Random values for ``key``: a view of one random buffer at an offset
    that depends on the key, so that the made-up file stores the buffer once
    (fast to write) while every tensor holds its own numbers."""
    seed = zlib.crc32(key.encode())
    if not dtype.is_floating_point:  # num_batches_tracked
        return torch.full(tuple(shape), seed % 1000, dtype=dtype)
    pool = _pool()
    numel = math.prod(shape)
    start = seed % (pool.numel() - numel + 1)
    return pool[start:start + numel].view(tuple(shape)).to(dtype)


def _classes(cfg, lib):
    model = cfg.model
    if lib == 'mmseg':
        num = model.decode_head.num_classes
    elif 'roi_head' in model:
        heads = model.roi_head.bbox_head
        num = (heads[0] if isinstance(heads, list) else heads).num_classes
    else:
        num = model.bbox_head.num_classes
    return tuple(f'class{i}' for i in range(num))


def make_case(rel_path, manifests):
    """(model, official checkpoint) for a config; see the module doc."""
    cfg = load(rel_path)
    lib = library_of(rel_path)
    model_cfg = cfg.model
    name = _manifest_name(model_cfg.backbone, manifests)
    manifest = manifests[name]
    if name == 'backbone/mini':
        model_cfg.backbone.arch = dict(manifest['official_kwargs'])
    model_cfg.backbone.init_cfg = None
    model = build_model(cfg, model_cfg)
    own = model.state_dict()

    out_indices = set(model_cfg.backbone.get('out_indices', (0, 1, 2, 3)))
    state = {}
    for key, shape in manifest['state_dict_shapes'].items():
        found = re.match(r'norms\.(\d)\.', key)
        if found and int(found.group(1)) not in out_indices:
            continue
        state['backbone.' + key] = _random(key, shape, torch.float32)
    patterns = old_patterns(model_cfg)
    used = set()
    # the demos (mini trunk, no official weights) have narrower necks
    width = model_cfg.neck.out_channels if name == 'backbone/mini' and \
        model_cfg.get('neck') is not None else 256
    neck = official_neck_state(cfg, model_cfg,
                               manifest['official_kwargs']['dims'], width)
    # trunk: from the manifest; neck: the official one; heads: ours
    heads = {k: v for k, v in own.items()
             if not k.startswith(('backbone.', 'neck.'))}
    for key, value in list(neck.items()) + list(heads.items()):
        hits = [p for p in patterns if re.fullmatch(p, key)]
        assert hits, (f'{key} has no mmdet 2.x / mmseg 0.x name: renamed '
                      'between versions?')
        used.update(hits)
        state[key] = _random(key, value.shape, value.dtype)
    assert used == set(patterns), set(patterns) - used

    version = dict(mmdet='mmdet_version', mmseg='mmseg_version')[lib]
    meta = {
        version: '2.26.0' if lib == 'mmdet' else '0.29.1',
        'mmcv_version': '1.7.0',
        'config': f'# {rel_path} as an mmdet 2 / mmseg 0 config\n',
        'CLASSES': _classes(cfg, lib),
        'epoch': 36,
        'iter': 1000,
        'hook_msgs': {'last_ckpt': 'work_dirs/x/latest.pth'},
    }
    if lib == 'mmseg':
        meta['PALETTE'] = [[i, 2 * i % 256, 3 * i % 256]
                           for i in range(len(meta['CLASSES']))]
    first = next(iter(state))
    optimizer = {
        'state': {0: {'step': torch.tensor(1000.),
                      'exp_avg': torch.zeros_like(state[first]),
                      'exp_avg_sq': torch.ones_like(state[first])}},
        'param_groups': [{'lr': 1e-4, 'betas': (0.9, 0.999),
                          'weight_decay': 0.05, 'params': [0]}],
    }
    return model, {'meta': meta, 'state_dict': state,
                   'optimizer': optimizer}


@pytest.fixture(scope='module')
def converter():
    return load_script(CONVERTER)


def convert(converter, official, tmp_path, name='model'):
    src, dst = tmp_path / f'{name}_official.pth', tmp_path / f'{name}.pth'
    torch.save(official, src)
    assert converter.main([str(src), str(dst)]) == 0
    src.unlink()  # holds the whole random buffer; pytest keeps 3 runs' dirs
    return dst


def test_every_dense_config_is_covered():
    assert len(DENSE_CONFIGS) == 20  # 13 mmdet (1 demo) + 7 mmseg (1 demo)


@pytest.mark.parametrize('rel_path', DENSE_CONFIGS)
def test_official_dense_checkpoint_loads(rel_path, manifests, converter,
                                         tmp_path):
    model, official = make_case(rel_path, manifests)
    dst = convert(converter, official, tmp_path)

    out = torch.load(dst, map_location='cpu', weights_only=True)
    assert set(out) == {'state_dict', 'meta'}  # no optimizer state
    assert out['meta']['source_kind'] == 'official-dense'
    assert list(out['meta']['dataset_meta']['classes']) == list(
        official['meta']['CLASSES'])
    if 'PALETTE' in official['meta']:
        assert out['meta']['dataset_meta']['palette'] == \
            official['meta']['PALETTE']
    own = model.state_dict()
    assert not set(own) - set(out['state_dict']), 'missing keys'
    assert not set(out['state_dict']) - set(own), 'unexpected keys'

    load_checkpoint(model, str(dst), map_location='cpu', strict=True)
    dst.unlink()  # up to 600 MB
    loaded = model.state_dict()
    for key, value in official['state_dict'].items():
        assert loaded[key].dtype == value.dtype, key
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize('src, dst', [
    ('mmdet/mask_rcnn_dat_pp_demo.py', 'mmseg/upernet_dat_pp_demo.py'),
    ('mmseg/upernet_dat_pp_demo.py', 'mmdet/mask_rcnn_dat_pp_demo.py'),
])
def test_checkpoint_of_the_other_task_names_the_keys(src, dst, manifests,
                                                     converter, tmp_path):
    """A converted detector checkpoint does not load into a segmentor (and
    vice versa); the error names the heads' keys on both sides."""
    _, official = make_case(src, manifests)
    path = convert(converter, official, tmp_path)
    target, _ = make_case(dst, manifests)
    heads = {'mmdet': ('rpn_head.rpn_conv.weight', 'roi_head.mask_head.'),
             'mmseg': ('decode_head.conv_seg.weight', 'auxiliary_head.')}
    with pytest.raises(RuntimeError) as info:
        load_checkpoint(target, str(path), map_location='cpu', strict=True)
    message = str(info.value)
    unexpected, missing = message.split('missing keys in source state_dict')
    assert 'unexpected key in source state_dict' in unexpected
    for key in heads[library_of(src)]:
        assert key in unexpected
    for key in heads[library_of(dst)]:
        assert key in missing
    assert 'backbone.' not in message  # the shared trunk itself fits
