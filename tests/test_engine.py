"""``mmdat.engine``: the opt-in shims, and ``import mmdat`` without them.

* ``import mmdat`` registers ``DAT`` and leaves mmengine as it is: the local
  checkpoint loader and the ``MODEL_WRAPPERS``, ``OPTIM_WRAPPERS`` and
  ``HOOKS`` entries are the upstream ones, and nothing of the libraries
  beyond their ``registry`` modules is imported (checked in a fresh
  process).
* ``import mmdat.engine`` adds its names beside the upstream entries.
* ``CPUAmpOptimWrapper`` autocasts only the backbone; one training iteration
  of ``mask_rcnn_dat_pp_t_1x.py``'s model (shrunk) with ``--amp`` on the CPU
  runs mmcv's nms and RoIAlign in float32 and updates the weights.
"""
import copy
import json
import os.path as osp
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

SNAPSHOT = r'''
import json, sys
import mmengine.runner  # noqa: F401  (upstream hooks, wrappers, loaders)
from mmengine.registry import HOOKS, MODEL_WRAPPERS, OPTIM_WRAPPERS
from mmengine.runner.checkpoint import CheckpointLoader


def snap():
    regs = {r.name: {k: f'{v.__module__}.{v.__qualname__}'
                     for k, v in r.module_dict.items()}
            for r in (HOOKS, MODEL_WRAPPERS, OPTIM_WRAPPERS)}
    loader = CheckpointLoader._schemes['']
    regs['loader'] = f'{loader.__module__}.{loader.__qualname__}'
    for lib, reg in LIBS.items():  # the libraries' scoped registries
        regs[f'{lib}.optim_wrapper'] = {
            k: f'{v.__module__}.{v.__qualname__}'
            for k, v in reg.OPTIM_WRAPPERS.module_dict.items()}
    return regs


# importing the libraries' registry modules is fine (``import mmpretrain``
# itself imports ``mmpretrain.apis``): only what comes on top counts
LIBS = {}
for lib in ('mmdet', 'mmseg', 'mmpretrain'):
    try:
        LIBS[lib] = __import__(f'{lib}.registry', fromlist=['registry'])
    except ImportError:
        pass
loaded = set(sys.modules)
before = snap()
import mmdat  # noqa: E402
after_mmdat = snap()
heavy = sorted(m for m in set(sys.modules) - loaded
               if m.split('.')[0] in ('mmdet', 'mmseg', 'mmpretrain'))
engine_imported = 'mmdat.engine' in sys.modules
import mmdat.engine  # noqa: E402
print(json.dumps(dict(before=before, after_mmdat=after_mmdat,
                      after_engine=snap(), heavy=heavy,
                      engine=engine_imported)))
'''


@pytest.fixture(scope='module')
def snapshots():
    """Registries and loader before/after ``import mmdat`` and after
    ``import mmdat.engine``, in one fresh process."""
    proc = subprocess.run([sys.executable, '-c', SNAPSHOT], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_mmdat_leaves_mmengine_alone(snapshots):
    res = snapshots
    assert res['after_mmdat'] == res['before']
    assert res['before']['loader'].startswith('mmengine.')
    assert not res['engine']
    assert res['heavy'] == [], res['heavy']


def test_import_mmdat_engine_adds_beside_upstream(snapshots):
    before, after = snapshots['before'], snapshots['after_engine']
    added = {'hook': {'IterationSeedHook'},
             'model_wrapper': {'CPUDistributedDataParallel'},
             'optim_wrapper': {'CPUAmpOptimWrapper'}}
    for name, names in added.items():
        assert set(after[name]) - set(before[name]) == names, name
        for key, value in before[name].items():
            assert after[name][key] == value, (name, key)  # upstream kept
        for key in names:
            assert after[name][key].startswith('mmdat.engine.'), key
    assert after['loader'] == 'mmdat.engine.checkpoint.load_from_local'
    # AmpOptimWrapper of the three scopes: mmengine's with CUDA, the CPU
    # wrapper without (mim train runs the libraries' own train scripts)
    for lib in ('mmdet', 'mmseg', 'mmpretrain'):
        name = f'{lib}.optim_wrapper'
        assert 'AmpOptimWrapper' not in before[name]
        assert after[name]['AmpOptimWrapper'] == \
            'mmdat.engine.wrappers.amp_optim_wrapper'


@pytest.mark.skipif(torch.cuda.is_available(), reason='CPU-only machines')
@pytest.mark.parametrize('scope', ['mmdet', 'mmseg', 'mmpretrain'])
def test_amp_recipes_build_without_a_gpu(scope):
    """``optim_wrapper=dict(type='AmpOptimWrapper', loss_scale='dynamic')``
    (the recipes) builds under each library's scope on a CPU-only machine,
    as with their own train scripts, instead of mmengine's GPU assert."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope

    from mmdat.engine import CPUAmpOptimWrapper
    with DefaultScope.overwrite_default_scope(scope):
        wrapper = build_optim_wrapper(_Net(), dict(
            type='AmpOptimWrapper', loss_scale='dynamic',
            optimizer=dict(type='AdamW', lr=1e-4)))
    assert isinstance(wrapper, CPUAmpOptimWrapper)
    assert wrapper.cast_dtype == torch.bfloat16


class _Net(torch.nn.Module):

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        feats = self.backbone(x)
        self.seen = (feats.dtype, torch.is_autocast_enabled('cpu'))
        return self.head(feats)


def _wrapper(**kwargs):
    from mmengine.optim import build_optim_wrapper

    import mmdat.engine  # noqa: F401

    def build(model):
        return build_optim_wrapper(model, dict(
            type='CPUAmpOptimWrapper', optimizer=dict(type='SGD', lr=0.1),
            **kwargs))
    return build


def test_cpu_amp_autocasts_only_the_backbone():
    net = _Net()
    wrapper = _wrapper()(net)
    with wrapper.optim_context(net):
        out = net(torch.randn(3, 4))
        # back from the backbone: float32 and autocast off for the head
        assert net.seen == (torch.float32, False)
        assert out.dtype == torch.float32
    assert not torch.is_autocast_enabled('cpu')
    before = net.backbone.weight.detach().clone()
    wrapper.update_params(out.pow(2).mean())
    assert not torch.equal(before, net.backbone.weight)
    # the backbone itself ran in bfloat16
    seen = []
    net.backbone.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with wrapper.optim_context(net):
        net(torch.randn(3, 4))
    assert seen == [torch.bfloat16]
    # cast_modules=None: the whole model
    wrapper = _wrapper(cast_modules=None)(net)
    with wrapper.optim_context(net):
        assert net(torch.randn(3, 4)).dtype == torch.bfloat16
    # a forward that raises leaves autocast off again
    wrapper = _wrapper()(net)

    def boom(module, args, output):
        raise RuntimeError('boom')

    handle = net.backbone.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match='boom'):
        with wrapper.optim_context(net):
            net(torch.randn(3, 4))
    handle.remove()
    assert not torch.is_autocast_enabled('cpu')
    with pytest.raises(ValueError, match='dtype'):
        _wrapper(dtype='int8')(net)


def _have_mmcv_ops():
    try:
        import mmcv.ops  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(torch.cuda.is_available(), reason='CPU-only behaviour')
@pytest.mark.skipif(not _have_mmcv_ops(), reason='needs mmcv with its ops')
def test_mask_rcnn_amp_iteration_on_cpu():
    """One training iteration of mask_rcnn_dat_pp_t_1x.py's model as
    tools/train.py --amp builds it on a CPU-only machine (backbone shrunk to
    the demo arch, 64x64 image; with_cp as shipped)."""
    import numpy as np
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    from mmengine.structures import InstanceData

    from mmdat.apis import apply_amp, load_config
    cfg = load_config(osp.join(ROOT, 'configs/mmdet/mask_rcnn_dat_pp_t_1x.py'))
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'  # as shipped
    apply_amp(cfg, requested=True)
    assert cfg.optim_wrapper.type == 'CPUAmpOptimWrapper'
    arch = Config.fromfile(osp.join(
        ROOT, 'configs/_base_/dat_pp_demo_arch.py')).dat_demo_arch.to_dict()
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.backbone.update(arch=arch, init_cfg=None)
    model_cfg.neck.in_channels = arch['dims']
    init_default_scope('mmdet')
    from mmdet.registry import MODELS
    torch.manual_seed(0)
    model = MODELS.build(model_cfg)
    model.init_weights()
    model.train()
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)

    size = 64
    sample = DetDataSample()
    sample.set_metainfo(dict(img_shape=(size, size), ori_shape=(size, size),
                             scale_factor=(1., 1.)))
    masks = np.zeros((2, size, size), np.uint8)
    masks[0, 8:40, 8:40] = 1
    masks[1, 30:60, 20:50] = 1
    sample.gt_instances = InstanceData(
        bboxes=torch.tensor([[8., 8., 40., 40.], [20., 30., 50., 60.]]),
        labels=torch.tensor([1, 3]),
        masks=BitmapMasks(masks, size, size))
    data = dict(inputs=[torch.randint(0, 256, (3, size, size),
                                      dtype=torch.uint8)],
                data_samples=[sample])

    dtypes = {}

    def spy(name):
        def hook(module, args, output):
            first = output[0] if isinstance(output, (list, tuple)) else output
            dtypes[name] = (first.dtype, torch.is_autocast_enabled('cpu'))
        return hook

    model.backbone.stages[0].register_forward_hook(spy('stage0'))
    model.neck.register_forward_hook(spy('neck'))
    model.roi_head.bbox_roi_extractor.register_forward_hook(spy('roi_align'))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    log_vars = model.train_step(data, wrapper)
    assert all(np.isfinite(float(torch.as_tensor(v).detach()))
               for v in log_vars.values()), log_vars
    assert dtypes['stage0'] == (torch.bfloat16, True)
    assert dtypes['neck'] == (torch.float32, False)
    assert dtypes['roi_align'] == (torch.float32, False)
    changed = [k for k, v in model.named_parameters()
               if not torch.equal(before[k], v.detach())]
    assert any(k.startswith('backbone.') for k in changed)
    assert any(k.startswith('roi_head.') for k in changed)


@pytest.mark.skipif(torch.cuda.is_available(), reason='CPU-only behaviour')
def test_amp_configs_get_a_cpu_optim_wrapper():
    """As tools/train.py prepares them on a machine without CUDA, the AMP
    optim wrappers of the three libraries' recipes build and autocast
    (AmpOptimWrapper would assert). One config each: loading them is slow,
    and the optimizer settings come from a few shared bases."""
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper

    from mmdat.apis import apply_amp
    # (mmdet: test_mask_rcnn_amp_iteration_on_cpu)
    paths = [osp.join(ROOT, 'configs', p) for p in (
        'mmseg/upernet_dat_pp_t_160k_ade20k.py',
        'mmpretrain/dat_pp_t_in1k.py')]
    net = _Net()
    kinds = set()
    for path in paths:
        cfg = Config.fromfile(path, import_custom_modules=False)
        shipped = cfg.optim_wrapper.get('type', 'OptimWrapper')
        apply_amp(cfg)
        kinds.add((shipped, cfg.optim_wrapper.type))
        assert cfg.optim_wrapper.type in ('OptimWrapper',
                                          'CPUAmpOptimWrapper'), path
        wrapper = build_optim_wrapper(net, cfg.optim_wrapper)
        with wrapper.optim_context(net):
            net(torch.randn(2, 4))
    assert kinds == {('AmpOptimWrapper', 'CPUAmpOptimWrapper')}
