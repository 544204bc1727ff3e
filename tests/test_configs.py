"""Checks of every config under ``configs/``.

For each top-level config (``configs/<library>/*.py``, bases excluded):

* it loads with ``mmengine.Config.fromfile``, imports ``mmdat`` through
  ``custom_imports`` and has the ``default_scope`` of its library;
* the recipe facts of the official DAT++ training (drop path, optimizer,
  schedule, checkpointing, pretrained weights, ...) are what the config says;
* the model builds in the registry of its library with the backbone shrunk to
  a small DAT++ (and SyncBN turned into BN), and a forward pass in
  ``mode='tensor'`` on a 1x3x64x64 input gives finite outputs of the expected
  shapes.

The full-size classifiers are also built as they are, and their parameter
count (backbone + head) must be the published one.
"""
import copy
import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG_ROOT = osp.join(ROOT, 'configs')
LIBRARIES = ('mmdet', 'mmseg', 'mmpretrain')

CONFIGS = sorted(
    osp.relpath(path, CONFIG_ROOT)
    for lib in LIBRARIES
    for path in glob.glob(osp.join(CONFIG_ROOT, lib, '*.py')))

# Every config the project promises (the glob above must find all of them).
REQUIRED = {
    'mmdet': [
        'mask_rcnn_dat_pp_t_1x.py', 'mask_rcnn_dat_pp_t_3x.py',
        'mask_rcnn_dat_pp_s_1x.py', 'mask_rcnn_dat_pp_s_3x.py',
        'cascade_mask_rcnn_dat_pp_t_1x.py', 'cascade_mask_rcnn_dat_pp_t_3x.py',
        'cascade_mask_rcnn_dat_pp_s_3x.py', 'cascade_mask_rcnn_dat_pp_b_3x.py',
        'retinanet_dat_pp_t_1x.py', 'retinanet_dat_pp_t_3x.py',
        'retinanet_dat_pp_s_1x.py', 'retinanet_dat_pp_s_3x.py',
        'mask_rcnn_dat_pp_demo.py'
    ],
    'mmseg': [
        'upernet_dat_pp_t_160k_ade20k.py', 'upernet_dat_pp_s_160k_ade20k.py',
        'upernet_dat_pp_b_160k_ade20k.py', 'fpn_dat_pp_t_80k_ade20k.py',
        'fpn_dat_pp_s_80k_ade20k.py', 'fpn_dat_pp_b_80k_ade20k.py',
        'upernet_dat_pp_demo.py'
    ],
    'mmpretrain': [
        'dat_pp_t_in1k.py', 'dat_pp_s_in1k.py', 'dat_pp_b_in1k.py',
        'dat_pp_b_in1k_384.py', 'dat_pp_demo.py'
    ],
}

# The small DAT++ every model is shrunk to for the forward tests: the demo
# configs' arch.
SMALL_ARCH = Config.fromfile(osp.join(
    ROOT, 'configs/_base_/dat_pp_demo_arch.py')).dat_demo_arch.to_dict()
DIMS = dict(
    tiny=[64, 128, 256, 512],
    small=[96, 192, 384, 768],
    base=[128, 256, 512, 1024])
IN_SIZE = 64

# Published parameter counts of the ImageNet classifiers (backbone + head).
# The 384 model keeps the position bias tables of the 224 one (the official
# fine-tuning config sets img_size 224), so it has the same count.
CLS_PARAMS = {
    'mmpretrain/dat_pp_t_in1k.py': 23_962_876,
    'mmpretrain/dat_pp_s_in1k.py': 53_127_366,
    'mmpretrain/dat_pp_b_in1k.py': 93_690_640,
    'mmpretrain/dat_pp_b_in1k_384.py': 93_690_640,
}

# Official recipes: arch, drop path, lr, weight decay, schedule length.
DET_NO_DECAY = ('rpe_table', 'relative_position_bias_table', 'norm')
RECIPES = {
    # mmdet: (arch, drop_path, lr, epochs)
    'mmdet/mask_rcnn_dat_pp_t_1x.py': ('tiny', 0.0, 1e-4, 12),
    'mmdet/mask_rcnn_dat_pp_t_3x.py': ('tiny', 0.3, 1e-4, 36),
    'mmdet/mask_rcnn_dat_pp_s_1x.py': ('small', 0.1, 1e-4, 12),
    'mmdet/mask_rcnn_dat_pp_s_3x.py': ('small', 0.5, 1e-4, 36),
    'mmdet/cascade_mask_rcnn_dat_pp_t_1x.py': ('tiny', 0.0, 1e-4, 12),
    'mmdet/cascade_mask_rcnn_dat_pp_t_3x.py': ('tiny', 0.1, 1e-4, 36),
    'mmdet/cascade_mask_rcnn_dat_pp_s_3x.py': ('small', 0.5, 1e-4, 36),
    'mmdet/cascade_mask_rcnn_dat_pp_b_3x.py': ('base', 0.8, 1e-4, 36),
    'mmdet/retinanet_dat_pp_t_1x.py': ('tiny', 0.0, 5e-5, 12),
    'mmdet/retinanet_dat_pp_t_3x.py': ('tiny', 0.2, 5e-5, 36),
    'mmdet/retinanet_dat_pp_s_1x.py': ('small', 0.1, 5e-5, 12),
    'mmdet/retinanet_dat_pp_s_3x.py': ('small', 0.5, 5e-5, 36),
    # mmseg: (arch, drop_path, lr, iterations)
    'mmseg/upernet_dat_pp_t_160k_ade20k.py': ('tiny', 0.3, 6e-5, 160000),
    'mmseg/upernet_dat_pp_s_160k_ade20k.py': ('small', 0.5, 6e-5, 160000),
    'mmseg/upernet_dat_pp_b_160k_ade20k.py': ('base', 0.7, 6e-5, 160000),
    'mmseg/fpn_dat_pp_t_80k_ade20k.py': ('tiny', 0.4, 2e-4, 40000),
    'mmseg/fpn_dat_pp_s_80k_ade20k.py': ('small', 0.4, 2e-4, 40000),
    'mmseg/fpn_dat_pp_b_80k_ade20k.py': ('base', 0.7, 2e-4, 40000),
    # mmpretrain: (arch, drop_path, lr for 1024 images, epochs)
    'mmpretrain/dat_pp_t_in1k.py': ('tiny', 0.2, 1e-3, 300),
    'mmpretrain/dat_pp_s_in1k.py': ('small', 0.4, 1e-3, 300),
    'mmpretrain/dat_pp_b_in1k.py': ('base', 0.7, 1e-3, 300),
    'mmpretrain/dat_pp_b_in1k_384.py': ('base', 0.6, 4e-5, 30),
}
# Recipes whose official run trained in fp32 (OptimizerHook, fp16=None); the
# other detectors, the T++/S++ UperNets and the classifiers used mixed
# precision, Semantic FPN fp32 (tests/test_recipes.py checks the rest).
FP32 = {'mmdet/cascade_mask_rcnn_dat_pp_s_3x.py',
        'mmdet/cascade_mask_rcnn_dat_pp_b_3x.py',
        'mmseg/upernet_dat_pp_b_160k_ade20k.py'}
DEMOS = ('mmdet/mask_rcnn_dat_pp_demo.py', 'mmseg/upernet_dat_pp_demo.py',
         'mmpretrain/dat_pp_demo.py')


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
_LOADED = {}


def load(rel_path):
    """The config ``configs/<rel_path>``: read once per session (resolving
    the ``mmdet::``-style bases takes seconds), a fresh copy per call."""
    if rel_path not in _LOADED:
        _LOADED[rel_path] = Config.fromfile(osp.join(CONFIG_ROOT, rel_path))
    return copy.deepcopy(_LOADED[rel_path])


def library_of(rel_path):
    return rel_path.split(osp.sep)[0]


def arch_name(backbone):
    arch = backbone.get('arch', 'tiny')
    return {'t': 'tiny', 's': 'small', 'b': 'base'}.get(arch, arch)


def replace_syncbn(obj):
    """SyncBN -> BN everywhere in a (nested) config, in place."""
    if isinstance(obj, dict):
        if obj.get('type') == 'SyncBN':
            obj['type'] = 'BN'
        for value in obj.values():
            replace_syncbn(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            replace_syncbn(value)
    return obj


def shrink(model_cfg):
    """The model config with the small DAT++ and matching input channels."""
    model_cfg = copy.deepcopy(model_cfg)
    backbone = model_cfg['backbone']
    backbone['arch'] = copy.deepcopy(SMALL_ARCH)
    backbone['with_cp'] = False
    backbone['init_cfg'] = None
    out_indices = tuple(backbone.get('out_indices', (0, 1, 2, 3)))
    channels = [SMALL_ARCH['dims'][i] for i in out_indices]
    neck = model_cfg.get('neck')
    if isinstance(neck, dict) and 'in_channels' in neck:
        neck['in_channels'] = channels
    head = model_cfg.get('decode_head')
    if head is not None and neck is None:  # UperNet reads the backbone
        head['in_channels'] = channels
    aux = model_cfg.get('auxiliary_head')
    if aux is not None and neck is None:
        aux['in_channels'] = channels[aux['in_index']]
    test_cfg = model_cfg.get('test_cfg')
    if isinstance(test_cfg, dict) and isinstance(test_cfg.get('rpn'), dict):
        # fewer proposals: the (cascade) RoI heads stay fast on the CPU
        test_cfg['rpn'].update(nms_pre=200, max_per_img=50)
    cls_head = model_cfg.get('head')
    if cls_head is not None and 'in_channels' in cls_head:
        cls_head['in_channels'] = channels[-1]
    return replace_syncbn(model_cfg)


def build_model(cfg, model_cfg):
    """Build ``model_cfg`` with the registry of ``cfg.default_scope``."""
    import importlib

    from mmengine.registry import init_default_scope

    import mmdat  # noqa: F401  (registers DAT)
    scope = cfg.default_scope
    importlib.import_module(f'{scope}.utils').register_all_modules(
        init_default_scope=False)
    init_default_scope(scope)
    registry = importlib.import_module(f'{scope}.registry').MODELS
    return registry.build(model_cfg)


def flatten_tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in flatten_tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in flatten_tensors(item)]
    return []


def det_samples(n, size):
    from mmdet.structures import DetDataSample
    samples = []
    for _ in range(n):
        sample = DetDataSample()
        sample.set_metainfo(
            dict(
                img_shape=(size, size),
                ori_shape=(size, size),
                pad_shape=(size, size),
                batch_input_shape=(size, size),
                scale_factor=(1.0, 1.0)))
        samples.append(sample)
    return samples


def num_params(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------
def test_all_configs_present():
    for lib, names in REQUIRED.items():
        for name in names:
            assert osp.join(lib, name) in CONFIGS, \
                f'missing configs/{lib}/{name}'


@pytest.mark.parametrize('rel_path', CONFIGS)
def test_config_loads(rel_path):
    cfg = load(rel_path)
    lib = library_of(rel_path)
    assert 'mmdat' in cfg.custom_imports['imports']
    assert cfg.custom_imports.get('allow_failed_imports', False) is False
    assert cfg.default_scope == lib
    backbone = cfg.model.backbone
    assert backbone.type == 'DAT'
    if rel_path in DEMOS:
        return
    # pretrained weights: the converted ImageNet checkpoint of the same size
    arch = arch_name(backbone)
    expected_ckpt = f'checkpoints/dat_pp_{arch[0]}_in1k.pth'
    if lib == 'mmpretrain':
        assert backbone.get('init_cfg') is None
        if rel_path.endswith('_384.py'):
            assert cfg.load_from == cfg.pretrained == expected_ckpt
    else:
        assert cfg.pretrained == expected_ckpt
        assert backbone.init_cfg == dict(
            type='Pretrained', checkpoint=expected_ckpt, prefix='backbone.')


@pytest.mark.parametrize('rel_path', sorted(RECIPES))
def test_recipe(rel_path):
    """The official training facts of each config."""
    cfg = load(rel_path)
    lib = library_of(rel_path)
    arch, drop_path, lr, length = RECIPES[rel_path]
    backbone = cfg.model.backbone
    assert arch_name(backbone) == arch
    assert backbone.drop_path_rate == pytest.approx(drop_path)
    optim = cfg.optim_wrapper
    assert optim.optimizer.type == 'AdamW'
    assert optim.optimizer.lr == pytest.approx(lr)
    keys = optim.paramwise_cfg.custom_keys
    if lib == 'mmdet':
        assert optim.type == ('OptimWrapper' if rel_path in FP32 else
                              'AmpOptimWrapper')
        assert backbone.with_cp is True
        assert optim.optimizer.weight_decay == 0.05
        assert tuple(optim.optimizer.betas) == (0.9, 0.999)
        assert optim.paramwise_cfg.norm_decay_mult == 0.
        for key in DET_NO_DECAY:
            assert keys[key] == dict(decay_mult=0.)
        assert cfg.train_cfg.max_epochs == length
        warmup, steps = cfg.param_scheduler
        assert (warmup.type, warmup.by_epoch, warmup.end,
                warmup.start_factor) == ('LinearLR', False, 500, 0.001)
        assert steps.type == 'MultiStepLR' and steps.end == length
        assert list(steps.milestones) == ([8, 11] if length == 12 else
                                          [27, 33])
        assert cfg.auto_scale_lr == dict(enable=False, base_batch_size=16)
        assert cfg.train_dataloader.batch_size == 2  # x 8 GPUs = 16 images
        transforms = [t.type for t in cfg.train_pipeline]
        assert 'RandomChoice' in transforms and 'RandomFlip' in transforms
        neck = cfg.model.neck
        assert neck.get('start_level', 0) == 0
        dims = DIMS[arch]
        if cfg.model.type == 'RetinaNet':
            assert tuple(backbone.out_indices) == (1, 2, 3)
            assert list(neck.in_channels) == dims[1:]
            assert neck.num_outs == 5
            assert neck.add_extra_convs == 'on_input'
        else:
            assert tuple(backbone.out_indices) == (0, 1, 2, 3)
            assert list(neck.in_channels) == dims
        if cfg.model.type == 'CascadeRCNN':
            for head in cfg.model.roi_head.bbox_head:
                assert head.type == 'Shared4Conv1FCBBoxHead'
                assert head.norm_cfg.type == 'SyncBN'
                assert head.loss_bbox.type == 'GIoULoss'
                assert head.reg_decoded_bbox is True
    elif lib == 'mmseg':
        assert cfg.train_cfg.max_iters == length
        assert cfg.param_scheduler[-1].end == length
        assert cfg.param_scheduler[-1].eta_min == 0.0
        for key in DET_NO_DECAY:
            assert keys[key] == dict(decay_mult=0.)
        assert tuple(cfg.crop_size) == (512, 512)
        dims = DIMS[arch]
        if cfg.model.decode_head.type == 'UPerHead':
            assert optim.type == ('OptimWrapper' if rel_path in FP32 else
                                  'AmpOptimWrapper')
            assert backbone.with_cp is True
            assert optim.optimizer.weight_decay == 0.01
            warmup, poly = cfg.param_scheduler
            assert (warmup.type, warmup.end) == ('LinearLR', 1500)
            assert (poly.type, poly.power, poly.begin) == ('PolyLR', 1.0,
                                                           1500)
            assert cfg.train_dataloader.batch_size == 2  # x 8 GPUs
            assert list(cfg.model.decode_head.in_channels) == dims
            aux = cfg.model.auxiliary_head
            assert (aux.type, aux.in_index, aux.in_channels) == ('FCNHead',
                                                                 2, dims[2])
        else:
            assert cfg.model.decode_head.type == 'FPNHead'
            assert optim.optimizer.weight_decay == 0.0001
            (poly, ) = cfg.param_scheduler
            assert (poly.type, poly.power) == ('PolyLR', 0.9)
            assert list(cfg.model.neck.in_channels) == dims
            assert cfg.model.get('pretrained') is None
    else:
        assert cfg.train_cfg.max_epochs == length
        assert tuple(backbone.out_indices) == (3, )
        assert backbone.get('img_size', 224) == 224
        assert cfg.model.neck.type == 'GlobalAveragePooling'
        head = cfg.model.head
        assert (head.type, head.num_classes, head.in_channels) == (
            'LinearClsHead', 1000, DIMS[arch][3])
        assert head.loss.label_smooth_val == 0.1
        augments = {a.type: a.alpha for a in cfg.model.train_cfg.augments}
        assert augments == dict(Mixup=0.8, CutMix=1.0)
        assert optim.clip_grad.max_norm == 5.0
        assert keys['.rpe_table'] == dict(decay_mult=0.)
        assert optim.paramwise_cfg.norm_decay_mult == 0.
        resize = [t for t in cfg.train_pipeline
                  if t.type == 'RandomResizedCrop'][0]
        assert resize.interpolation == 'bicubic'
        test_types = [t.type for t in cfg.test_pipeline]
        if rel_path.endswith('_384.py'):
            assert resize.scale == 384
            assert optim.optimizer.weight_decay == 1e-8
            assert 'CenterCrop' not in test_types
            assert [s.type for s in cfg.param_scheduler] == [
                'CosineAnnealingLR'
            ]  # no warm-up
        else:
            assert resize.scale == 224
            assert optim.optimizer.weight_decay == 0.05
            assert 'CenterCrop' in test_types
            assert cfg.param_scheduler[0].type == 'LinearLR'
            assert cfg.param_scheduler[0].end == 20


@pytest.mark.parametrize('rel_path', DEMOS)
def test_demo_data_root(rel_path):
    """The demo datasets all read from the config's ``data_root``."""
    cfg = load(rel_path)
    assert cfg.data_root.startswith('data/demo/')
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        dataset = cfg[loader].dataset
        assert dataset.data_root == cfg.data_root
        assert cfg[loader].get('persistent_workers', False) is False
    evaluator = cfg.val_evaluator
    if 'ann_file' in evaluator:
        assert evaluator.ann_file.startswith(cfg.data_root)
    assert cfg.optim_wrapper.type == 'OptimWrapper'  # fp32: runs on CPUs


@pytest.mark.parametrize('rel_path', CONFIGS)
def test_build_and_forward(rel_path):
    cfg = load(rel_path)
    lib = library_of(rel_path)
    model = build_model(cfg, shrink(cfg.model))
    model.eval()
    torch.manual_seed(0)
    inputs = torch.rand(1, 3, IN_SIZE, IN_SIZE)

    out_indices = tuple(cfg.model.backbone.get('out_indices', (0, 1, 2, 3)))
    with torch.no_grad():
        feats = model.backbone(inputs)
    assert len(feats) == len(out_indices)
    for feat, i in zip(feats, out_indices):
        size = IN_SIZE // 2**(i + 2)
        assert tuple(feat.shape) == (1, SMALL_ARCH['dims'][i], size, size)

    with torch.no_grad():
        if lib == 'mmdet':
            outs = model(inputs, det_samples(1, IN_SIZE), mode='tensor')
        else:
            outs = model(inputs, mode='tensor')
    tensors = flatten_tensors(outs)
    assert tensors, 'the forward pass returned no tensor'
    for tensor in tensors:
        assert torch.isfinite(tensor).all()
    if lib == 'mmseg':
        num_classes = cfg.model.decode_head.num_classes
        assert outs.shape[:2] == (1, num_classes)
    elif lib == 'mmpretrain':
        assert tuple(outs.shape) == (1, cfg.model.head.num_classes)


@pytest.mark.parametrize('rel_path', sorted(CLS_PARAMS))
def test_classifier_param_count(rel_path):
    """The full-size classifiers have the published number of parameters."""
    cfg = load(rel_path)
    model = build_model(cfg, cfg.model)
    assert num_params(model.backbone) + num_params(model.head) == \
        CLS_PARAMS[rel_path]
    assert num_params(model) == CLS_PARAMS[rel_path]
    if rel_path.endswith('_384.py'):
        model.eval()
        with torch.no_grad():
            logits = model(torch.rand(1, 3, 384, 384), mode='tensor')
        assert tuple(logits.shape) == (1, 1000)
        assert torch.isfinite(logits).all()
