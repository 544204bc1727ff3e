"""The recipe configs against the official runs (issue 11), beyond the facts
``tests/test_configs.py`` checks.

Facts of the official runs, read from the official DAT-Detection,
DAT-Segmentation and DAT repositories (every ``_base_`` resolved), written
out here by hand:

* Mask R-CNN T/S (1x, 3x): FPN ``add_extra_convs='on_input'`` (P6 is a
  stride-2 conv on C5; the official checkpoints hold
  ``neck.fpn_convs.4.conv.*``); Cascade Mask R-CNN: mmdet's default (P6 by
  max-pool);
* precision: Cascade S/B 3x and UperNet B trained in fp32 (``OptimizerHook``,
  ``fp16=None``), Semantic FPN in fp32, every other detector / UperNet with
  ``Fp16OptimizerHook``, the classifiers with ``--amp``;
* ImageNet test pipeline: ``Resize((256, 256))`` bicubic, ``CenterCrop(224)``;
* from scratch, every layer keeps PyTorch's default initialisation;
* linear lr scaling with the official total batch sizes (``auto_scale_lr``).
"""
import copy
import os.path as osp

import pytest
import torch
import yaml

from test_configs import (CONFIGS, DEMOS, ROOT, build_model, library_of, load,
                          shrink)

RECIPE_CONFIGS = [c for c in CONFIGS if c not in DEMOS]

# config -> (official FPN add_extra_convs, official precision)
DET = {
    'mask_rcnn_dat_pp_t_1x': ('on_input', 'amp'),
    'mask_rcnn_dat_pp_t_3x': ('on_input', 'amp'),
    'mask_rcnn_dat_pp_s_1x': ('on_input', 'amp'),
    'mask_rcnn_dat_pp_s_3x': ('on_input', 'amp'),
    'cascade_mask_rcnn_dat_pp_t_1x': (False, 'amp'),
    'cascade_mask_rcnn_dat_pp_t_3x': (False, 'amp'),
    'cascade_mask_rcnn_dat_pp_s_3x': (False, 'fp32'),
    'cascade_mask_rcnn_dat_pp_b_3x': (False, 'fp32'),
    'retinanet_dat_pp_t_1x': ('on_input', 'amp'),
    'retinanet_dat_pp_t_3x': ('on_input', 'amp'),
    'retinanet_dat_pp_s_1x': ('on_input', 'amp'),
    'retinanet_dat_pp_s_3x': ('on_input', 'amp'),
}
# config -> (official precision, official images per iteration)
SEG = {
    'upernet_dat_pp_t_160k_ade20k': ('amp', 16),
    'upernet_dat_pp_s_160k_ade20k': ('amp', 16),
    'upernet_dat_pp_b_160k_ade20k': ('fp32', 16),
    'fpn_dat_pp_t_80k_ade20k': ('fp32', 32),
    'fpn_dat_pp_s_80k_ade20k': ('fp32', 32),
    'fpn_dat_pp_b_80k_ade20k': ('fp32', 32),
}
CLS = ('dat_pp_t_in1k', 'dat_pp_s_in1k', 'dat_pp_b_in1k', 'dat_pp_b_in1k_384')
WRAPPER = dict(amp='AmpOptimWrapper', fp32='OptimWrapper')
CODE = dict(mmdet='https://github.com/LeapLabTHU/DAT-Detection',
            mmseg='https://github.com/LeapLabTHU/DAT-Segmentation',
            mmpretrain='https://github.com/LeapLabTHU/DAT')
GPUS = 8  # the default launch the dense configs' batch sizes assume


def _name(rel_path):
    return osp.splitext(osp.basename(rel_path))[0]


def precision_of(rel_path):
    lib, name = library_of(rel_path), _name(rel_path)
    if lib == 'mmdet':
        return DET[name][1]
    if lib == 'mmseg':
        return SEG[name][0]
    return 'amp'


def test_every_recipe_config_is_covered():
    names = sorted(_name(c) for c in RECIPE_CONFIGS)
    assert names == sorted(list(DET) + list(SEG) + list(CLS))


@pytest.mark.parametrize('rel_path', RECIPE_CONFIGS)
def test_precision_is_the_official_one(rel_path):
    cfg = load(rel_path)
    assert cfg.optim_wrapper.type == WRAPPER[precision_of(rel_path)]


@pytest.mark.parametrize('name', sorted(DET))
def test_fpn_extra_levels_as_official(name):
    cfg = load(f'mmdet/{name}.py')
    neck = cfg.model.neck
    assert neck.type == 'FPN'
    assert neck.num_outs == 5
    assert neck.get('add_extra_convs', False) == DET[name][0]


@pytest.mark.parametrize('rel_path', RECIPE_CONFIGS)
def test_auto_scale_lr_has_the_official_base(rel_path):
    """``--auto-scale-lr`` scales from the batch size the lr is for: the
    official number of images per iteration (classifiers: mmpretrain's 1024
    convention for lr 1e-3 = 5e-4 per 512)."""
    cfg = load(rel_path)
    lib, name = library_of(rel_path), _name(rel_path)
    auto = cfg.auto_scale_lr
    assert auto.get('enable', False) is False  # opt-in (one flag)
    if lib == 'mmdet':
        assert auto.base_batch_size == 16
    elif lib == 'mmseg':
        assert auto.base_batch_size == SEG[name][1]
    else:
        assert auto.base_batch_size == 1024
    if lib != 'mmpretrain':
        # the default launch (8 GPUs) reproduces the official batch
        assert cfg.train_dataloader.batch_size * GPUS == auto.base_batch_size


@pytest.mark.parametrize('name', CLS)
def test_imagenet_test_pipeline(name):
    cfg = load(f'mmpretrain/{name}.py')
    size = 384 if name.endswith('_384') else 256
    for loader in ('val_dataloader', 'test_dataloader'):
        pipeline = cfg[loader].dataset.pipeline
        assert [t.type for t in pipeline][0] == 'LoadImageFromFile'
        assert pipeline[-1].type == 'PackInputs'
        resize = pipeline[1]
        assert resize.type == 'Resize'
        scale = resize.scale
        scale = (scale, scale) if isinstance(scale, int) else tuple(scale)
        assert scale == (size, size)  # a square, not a short-side resize
        assert resize.get('keep_ratio', False) is False
        assert resize.interpolation == 'bicubic'
        assert resize.backend == 'pillow'  # torchvision's PIL resize
        crops = [t for t in pipeline if t.type == 'CenterCrop']
        if size == 256:
            assert [c.crop_size for c in crops] == [224]
        else:
            assert not crops


@pytest.mark.parametrize('name', CLS)
def test_classifiers_keep_pytorch_default_init(name):
    cfg = load(f'mmpretrain/{name}.py')
    assert cfg.model.get('init_cfg') is None
    assert cfg.model.backbone.get('init_cfg') is None
    assert cfg.model.head.get('init_cfg', 'default') is None


def test_from_scratch_init_changes_nothing():
    """init_weights() of a classifier built from a recipe config leaves every
    parameter as the layers' constructors made it (the official
    ``reset_parameters`` is a no-op)."""
    cfg = load('mmpretrain/dat_pp_t_in1k.py')
    torch.manual_seed(0)
    model = build_model(cfg, shrink(cfg.model))
    before = copy.deepcopy(model.state_dict())
    model.init_weights()
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


# --------------------------------------------------------------------------
# metafiles
# --------------------------------------------------------------------------
def _metafile(lib):
    with open(osp.join(ROOT, 'configs', lib, 'metafile.yml')) as f:
        return yaml.safe_load(f)


def _techniques(lib, model):
    collections = {c['Name']: c for c in _metafile(lib)['Collections']}
    meta = model.get('Metadata', {})
    if 'Training Techniques' in meta:
        return meta['Training Techniques']
    return collections[model['In Collection']]['Metadata'][
        'Training Techniques']


@pytest.mark.parametrize('lib', ['mmdet', 'mmseg', 'mmpretrain'])
def test_metafile_names_the_official_repository(lib):
    data = _metafile(lib)
    for c in data['Collections']:
        assert c['Code']['URL'] == CODE[lib]
    for m in data['Models']:
        assert m['Converted From'] == {'Code': CODE[lib]}, m['Name']


@pytest.mark.parametrize('lib', ['mmdet', 'mmseg', 'mmpretrain'])
def test_metafile_mixed_precision_tag_matches_config(lib):
    for m in _metafile(lib)['Models']:
        amp = 'Mixed Precision Training' in _techniques(lib, m)
        cfg = load(osp.relpath(osp.join(ROOT, m['Config']),
                               osp.join(ROOT, 'configs')))
        assert amp == (cfg.optim_wrapper.type == 'AmpOptimWrapper'), \
            m['Name']


def test_b384_flops_listed():
    models = {m['Name']: m for m in _metafile('mmpretrain')['Models']}
    assert models['dat_pp_b_in1k_384']['Metadata']['FLOPs'] == 49_700_000_000
