"""DAT backbone: official keys/shapes, options, errors and odd input sizes."""
import copy

import pytest
import torch

from conftest import TINY_ARCH
from mmdat.models import DAT


@pytest.mark.parametrize('name', ['tiny', 'small', 'base'])
def test_state_dict_matches_official(manifests, name):
    model = DAT(arch=name, out_indices=(0, 1, 2, 3))
    ref = manifests[f'backbone/{name}']
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert own == ref['state_dict_shapes']
    assert sum(p.numel() for p in model.parameters()) == ref['params']


def test_official_kwargs_port_by_copy(manifests):
    kw = manifests['backbone/mini']['official_kwargs']
    model = DAT(arch=copy.deepcopy(kw))
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert own == manifests['backbone/mini']['state_dict_shapes']


def test_out_indices_and_strides():
    model = DAT(arch=TINY_ARCH, out_indices=(1, 3)).eval()
    outs = model(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 32, 8, 12), (1, 64, 2, 3)]
    assert model.num_features == [32, 64]
    assert not any(k.startswith('norms.0') for k in model.state_dict())


@pytest.mark.parametrize('hw', [(197, 263), (33, 47), (100, 31), (65, 65)])
def test_shapes_for_sizes_not_multiple_of_32(hw):
    H, W = hw
    model = DAT(arch=TINY_ARCH).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, H, W))
    h, w = H, W
    for i, o in enumerate(outs):
        for _ in range(2 if i == 0 else 1):
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        assert tuple(o.shape) == (1, TINY_ARCH['dims'][i], h, w)
        assert torch.isfinite(o).all()


def test_tiny_preset_at_odd_size():
    model = DAT(arch='tiny').eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 197, 263))
    assert [tuple(o.shape) for o in outs] == [
        (1, 64, 50, 66), (1, 128, 25, 33), (1, 256, 13, 17), (1, 512, 7, 9)]


def test_with_cp_gives_same_outputs_and_grads():
    torch.manual_seed(0)
    a = DAT(arch=TINY_ARCH, drop_path_rate=0.0)
    b = DAT(arch=TINY_ARCH, with_cp=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    la = sum(o.square().mean() for o in a(x))
    lb = sum(o.square().mean() for o in b(x))
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb, atol=1e-6)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5, rtol=1e-4), n


def test_default_path_grads_equal_reference_float64():
    """The whole backbone in training (residuals added in place, fused
    kernels) against the reference path: outputs and every gradient."""
    torch.manual_seed(0)
    a = DAT(arch=TINY_ARCH, drop_path_rate=0.0).double()
    with torch.no_grad():
        for n, p in a.named_parameters():
            if n.endswith(('rpe_table', 'rpb')):
                p.normal_()
    b = DAT(arch=TINY_ARCH, drop_path_rate=0.0, impl='reference').double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 45, 61, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    oa, ob = a(xa), b(xb)
    for u, w in zip(oa, ob):
        assert torch.allclose(u, w, rtol=1e-9, atol=1e-9)
    sum(o.square().mean() for o in oa).backward()
    sum(o.square().mean() for o in ob).backward()
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-7, atol=1e-9)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-7, atol=1e-9), n


def test_frozen_stages():
    model = DAT(arch=TINY_ARCH, frozen_stages=2)
    model.train()
    frozen = [model.patch_proj, model.stages[0], model.stages[1],
              model.down_projs[0], model.down_projs[1], model.norms[0],
              model.norms[1]]
    for m in frozen:
        assert not m.training
        assert all(not p.requires_grad for p in m.parameters())
    for m in (model.stages[2], model.stages[3], model.down_projs[2]):
        assert m.training
        assert all(p.requires_grad for p in m.parameters())


def test_drop_path_is_stochastic_in_training_only():
    model = DAT(arch=TINY_ARCH, drop_path_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        e1, e2 = model(x)[-1], model(x)[-1]
    assert torch.equal(e1, e2)
    model.train()
    torch.manual_seed(0)
    t1 = model(x)[-1]
    t2 = model(x)[-1]
    assert not torch.allclose(t1, t2)


def test_dat_v1_letters_build_and_run():
    arch = dict(dims=[16, 32, 64, 64], depths=[2, 2, 2, 2],
                stage_spec=[['L', 'S'], ['L', 'D'], ['S', 'D'], ['L', 'D']],
                heads=[1, 2, 4, 4], groups=[1, 1, 2, 2],
                use_lpus=[False] * 4, use_dwc_mlps=[False] * 4,
                use_conv_patches=False, offset_range_factor=[1, 2, 3, 4],
                window_sizes=[4, 4, 4, 2])
    model = DAT(arch=arch).eval()
    keys = model.state_dict().keys()
    assert 'stages.0.attns.0.relative_position_bias_table' in keys
    # a constant of the code: recomputed, not saved (official v1 files hold
    # it, converted ones do not; both load strictly)
    assert 'stages.0.attns.1.relative_position_index' not in keys
    assert 'stages.0.attns.1.relative_position_index' in dict(
        model.named_buffers())
    assert 'stages.0.mlps.0.chunk.linear1.weight' in keys
    assert 'patch_proj.0.weight' in keys and 'patch_proj.1.norm.weight' in keys
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 72, 88))
    assert [o.shape[-2:] for o in outs] == [(18, 22), (9, 11), (4, 5), (2, 2)]
    assert all(torch.isfinite(o).all() for o in outs)


# ----------------------------------------------------------------- errors
def _arch(**kw):
    a = copy.deepcopy(TINY_ARCH)
    a.update(kw)
    return a


@pytest.mark.parametrize('kwargs, exc, words', [
    (dict(arch='huge'), ValueError, ["'huge'", 'tiny']),
    (dict(arch=42), TypeError, ['arch', 'int']),
    (dict(arch=_arch(stage_spec=[['N', 'X'], ['D', 'N'], ['N', 'D'], ['D']])),
     ValueError, ['stage_spec[0][1]', "'X'"]),
    (dict(arch=_arch(dims=[16, 32, 64])), ValueError, ['dims', '3 entries']),
    (dict(arch=_arch(heads=[1, 2, 4, 4, 8])), ValueError, ['heads', '5']),
    (dict(arch=_arch(depths=[2, 2, 3, 1])), ValueError,
     ['stage_spec[2]', 'depths[2] is 3']),
    (dict(arch=_arch(dims=[16, 33, 64, 64])), ValueError,
     ['dims[1]=33', 'heads[1]=2']),
    (dict(arch=_arch(groups=[1, 1, 3, 2])), ValueError,
     ['heads[2]=4', 'groups[2]=3']),
    (dict(arch=_arch(strides=[8, 4, 2])), ValueError, ['strides']),
    (dict(arch=_arch(colour='red')), ValueError, ['colour']),
    (dict(arch={'dims': [16] * 4}), ValueError, ['missing', 'depths']),
    (dict(arch=TINY_ARCH, out_indices=(0, 4)), ValueError, ['out_indices']),
    (dict(arch=TINY_ARCH, frozen_stages=7), ValueError, ['frozen_stages']),
    (dict(arch=TINY_ARCH, drop_path_rate=1.5), ValueError, ['drop_path_rate']),
    (dict(arch=TINY_ARCH, impl='cuda-magic'), ValueError, ['impl']),
])
def test_bad_config_errors_name_the_parameter(kwargs, exc, words):
    with pytest.raises(exc) as info:
        DAT(**kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_wrong_input_channels():
    model = DAT(arch=TINY_ARCH).eval()
    with pytest.raises(ValueError, match=r'3 input channels.*\(1, 4, 32, 32\)'):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match='4-D'):
        model(torch.randn(3, 32, 32))


@pytest.mark.parametrize('train', [False, True])
def test_outputs_are_nchw_contiguous(train):
    """Heads read the maps as NCHW memory: mmcv's RoIAlign takes
    ``data_ptr()`` as NCHW, and a channels-last view scrambled every RoI
    feature of the detectors (their RoI heads stayed at chance)."""
    model = DAT(arch=TINY_ARCH, out_indices=(0, 1, 2, 3)).train(train)
    with torch.set_grad_enabled(train):
        outs = model(torch.randn(1, 3, 64, 96))
    assert all(o.is_contiguous() for o in outs), [o.stride() for o in outs]
