"""ONNX export (issue 13): the portable bilinear sampling op, and the
exported demo classifier / segmentor / detector features / DAT-T++ backbone
in ONNX Runtime against PyTorch at two input sizes through one dynamic file.

The export tests need ``onnx`` and ``onnxruntime`` (``pip install
mmdat[deploy]``) and are skipped without them; the op tests need neither.
"""
import importlib.util
import os.path as osp
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mmdat.ops import dispatch
from mmdat.ops.bilinear_sample import (bilinear_sample, gather_impl,
                                       grid_sample_impl)

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
RTOL = 1e-4  # the bound: max |ORT - PyTorch| / max |PyTorch|


# ------------------------------------------------------- bilinear sampling
def _grid_sample(x, pos):
    """The contract, written out independently of the implementations."""
    return F.grid_sample(x, pos.flip(-1), mode='bilinear',
                         padding_mode='zeros', align_corners=True)


def _positions(N, Hk, Wk, H, W, gen):
    """Random positions in [-1.4, 1.4] (a third outside the map), with
    pixel centres, the borders +-1 and exact corner hits mixed in."""
    pos = torch.rand(N, Hk, Wk, 2, generator=gen, dtype=torch.float64)
    pos = pos * 2.8 - 1.4
    flat = pos.view(-1, 2)
    n = flat.shape[0]
    # on pixel centres (integer table coordinates)
    iy = torch.randint(0, H, (n, ), generator=gen).double()
    ix = torch.randint(0, W, (n, ), generator=gen).double()
    centre = torch.stack([iy / max(H - 1, 1) * 2 - 1,
                          ix / max(W - 1, 1) * 2 - 1], -1)
    flat[::3] = centre[::3]
    flat[1::5] = torch.tensor([1.0, -1.0], dtype=torch.float64)
    return pos


@pytest.mark.parametrize('N,C,H,W,Hk,Wk', [
    (2, 3, 5, 7, 4, 3),
    (1, 2, 1, 6, 3, 3),   # one-pixel-high map
    (1, 2, 4, 1, 2, 5),   # one-pixel-wide map
    (1, 1, 1, 1, 2, 2),
    (3, 4, 9, 8, 1, 1),
])
def test_gather_equals_grid_sample_float64(N, C, H, W, Hk, Wk):
    gen = torch.Generator().manual_seed(H * 100 + W)
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64,
                    requires_grad=True)
    pos = _positions(N, Hk, Wk, H, W, gen).requires_grad_()
    ref = _grid_sample(x, pos)
    out = gather_impl(x, pos)
    assert out.shape == (N, C, Hk, Wk)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(grid_sample_impl(x, pos), ref, rtol=0,
                               atol=0)
    grad = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    g_ref = torch.autograd.grad(ref, (x, pos), grad)
    g_out = torch.autograd.grad(out, (x, pos), grad)
    for a, b, name in zip(g_out, g_ref, ('x', 'pos')):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12,
                                   msg=lambda m: f'grad {name}: {m}')


def test_gather_outside_is_zero_and_pixels_exact():
    x = torch.arange(12, dtype=torch.float64).view(1, 1, 3, 4) + 1
    # pixel centres give the pixel, far outside gives 0, half a pixel
    # outside the border gives half the border pixel (zero padding)
    pos = torch.tensor([[[[-1.0, -1.0], [1.0, 1.0], [0.0, -1 / 3],
                          [-3.0, 0.0], [1.0, 1 + 1 / 3]]]],
                       dtype=torch.float64)
    out = gather_impl(x, pos)[0, 0, 0]
    expect = torch.tensor([1.0, 12.0, 6.0, 0.0, 6.0], dtype=torch.float64)
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-12)


def test_gather_nan_positions_like_grid_sample():
    """NaN / inf positions give NaN (as grid_sample), never an
    out-of-range read."""
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    pos = torch.zeros(2, 1, 4, 2, dtype=torch.float64)
    pos[0, 0, 0, 0] = float('nan')
    pos[0, 0, 1, 1] = float('inf')
    pos[1, 0, 2, 0] = -float('inf')
    pos[1, 0, 3] = 0.25
    out = gather_impl(x, pos)
    ref = _grid_sample(x, pos)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12, equal_nan=True)
    assert out[0, :, 0, 0].isnan().all() and out[1, :, 0, 3].isfinite().all()


def test_gather_gradcheck():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 3, 4, generator=gen, dtype=torch.float64,
                    requires_grad=True)
    # away from pixel centres (where the bilinear weights have kinks)
    pos = (torch.rand(1, 2, 3, 2, generator=gen, dtype=torch.float64) * 2.4
           - 1.2) + 1e-3
    pos.requires_grad_()
    assert torch.autograd.gradcheck(gather_impl, (x, pos))


def test_float32_input_float32_positions():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 11, 13, generator=gen)
    pos = torch.rand(2, 5, 6, 2, generator=gen) * 2 - 1
    out = bilinear_sample(x, pos, impl='gather')
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _grid_sample(x, pos), rtol=1e-5,
                               atol=1e-6)


def test_dispatch_choice_and_errors():
    x = torch.randn(1, 2, 3, 3)
    pos = torch.zeros(1, 2, 2, 2)
    ctx = dispatch.Context(x.device, x.dtype, False)
    assert dispatch.choose('bilinear_sample', 'auto', ctx).name == \
        'grid_sample'
    with dispatch.portable():
        assert dispatch.choose('bilinear_sample', 'auto', ctx).name == \
            'gather'
        with dispatch.recording() as rec:
            bilinear_sample(x, pos, where='test')
        assert [r[3] for r in rec] == ['gather']
        with pytest.raises(RuntimeError, match='grid_sample'):
            bilinear_sample(x, pos, impl='grid_sample')
    portable = {i.name: i.portable
                for i in dispatch.implementations('bilinear_sample')}
    assert portable == {'grid_sample': False, 'gather': True}
    with pytest.raises(ValueError, match='impl'):
        bilinear_sample(x, pos, impl='nearest')
    with pytest.raises(ValueError, match='pos'):
        bilinear_sample(x, pos[..., :1])
    with pytest.raises(ValueError, match='x must be'):
        bilinear_sample(x[0], pos)


def test_import_mmdat_needs_no_onnx():
    code = ('import sys, mmdat, mmdat.ops; '
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('onnx', 'onnxruntime', 'onnxscript')); print(bad); "
            'sys.exit(1 if bad else 0)')
    res = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


# --------------------------------------------------------------- the tool
def _load_tool():
    path = osp.join(ROOT, 'tools', 'deployment', 'export_onnx.py')
    spec = importlib.util.spec_from_file_location('export_onnx', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope='module')
def tool():
    pytest.importorskip('onnx')
    pytest.importorskip('onnxruntime')
    return _load_tool()


@pytest.mark.parametrize('n,out', [(7, 3), (13, 6), (5, 6), (1, 2), (17, 1),
                                   (9, None)])
def test_portable_adaptive_pool_equals_pytorch(n, out):
    """The exportable adaptive average pooling (UPerHead's pyramid) gives
    nn.AdaptiveAvgPool2d's bins, non-divisible sizes included."""
    pool = _load_tool().PortableAdaptiveAvgPool2d
    x = torch.randn(2, 3, n, n + 4, dtype=torch.float64)
    for size in ((out, out), (out, 2), out):
        if size is None:
            continue
        torch.testing.assert_close(pool(size)(x),
                                   torch.nn.AdaptiveAvgPool2d(size)(x),
                                   rtol=0, atol=1e-12)


def _check_file(tool, path, expect_gathers=True):
    """Only standard ONNX operators, no GridSample, checked independently
    of the tool's own check too."""
    import onnx
    ops = tool.check_standard_ops(path)
    model = onnx.load(path)
    assert all(n.domain in ('', 'ai.onnx') for n in model.graph.node)
    assert {o.domain for o in model.opset_import} <= {'', 'ai.onnx'}
    assert [o.version for o in model.opset_import
            if o.domain in ('', 'ai.onnx')][0] >= 17
    types = {n.op_type for n in model.graph.node}
    assert 'GridSample' not in types
    assert set(ops) == types
    if expect_gathers:
        # the bilinear lookups (key sampling and deformable bias)
        assert 'GatherElements' in types
    return types


def test_onnx_export_picks_gather_by_itself(tool, tmp_path):
    """Under torch.onnx.export the dispatcher takes the portable
    implementation without being told (no dispatch.portable() block)."""
    import onnx

    class Sample(torch.nn.Module):
        def forward(self, x, pos):
            return bilinear_sample(x, pos)

    x, pos = torch.randn(1, 2, 5, 6), torch.rand(1, 3, 4, 2) * 2 - 1
    out = str(tmp_path / 'sample.onnx')
    torch.onnx.export(Sample(), (x, pos), out, dynamo=False,
                      opset_version=17, input_names=['x', 'pos'],
                      dynamic_axes={'x': {2: 'h', 3: 'w'},
                                    'pos': {1: 'hk', 2: 'wk'}})
    types = {n.op_type for n in onnx.load(out).graph.node}
    assert 'GatherElements' in types and 'GridSample' not in types
    x, pos = torch.randn(1, 2, 7, 3), torch.rand(1, 2, 5, 2) * 2.6 - 1.3
    got = tool.ort_session(out).run(None, {'x': x.numpy(),
                                           'pos': pos.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), _grid_sample(x, pos),
                               rtol=1e-5, atol=1e-6)


def test_cli_classifier_dynamic(tool, tmp_path):
    """The demo classifier through the CLI: one dynamic file, ORT matches
    PyTorch's logits at 64x64, 112x100 and 40x30 (not multiples of 32),
    batch 2. The sizes cross the model's size-dependent cases: the
    stage-3 map is padded to the neighborhood kernel (7) at 64x64 and 40x30
    but not at 112x100; the stage-1 key grid is one column wide at 40x30."""
    config = osp.join(ROOT, 'configs/mmpretrain/dat_pp_demo.py')
    # a checkpoint of our own: the file must hold these weights
    torch.manual_seed(3)
    model = tool.build_model(config)
    ckpt = str(tmp_path / 'cls.pth')
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, ckpt)
    out = str(tmp_path / 'cls.onnx')
    res = tool.main([config, ckpt,
                     '--out', out, '--shape', '64', '64', '--batch', '2',
                     '--dynamic', '--verify', '--verify-shape', '112', '100',
                     '--verify-shape', '40', '30'])
    assert res['kind'] == 'classifier' and res['outputs'] == ['logits']
    _check_file(tool, out)
    assert [s for s, _ in res['verify']] == [
        (2, 3, 64, 64), (2, 3, 112, 100), (2, 3, 40, 30)]
    for shape, errs in res['verify']:
        assert max(errs) < RTOL, (shape, errs)
    # the logits of the checkpoint's classifier (4 demo classes), as
    # mmpretrain computes them
    x = torch.randn(3, 3, 70, 66)
    y = tool.ort_session(out).run(None, {'image': x.numpy()})[0]
    with torch.no_grad():
        ref = model(x, mode='tensor')
    assert y.shape == (3, 4)
    assert (torch.from_numpy(y) - ref).abs().max() < RTOL * ref.abs().max()


@pytest.mark.parametrize('config,kind,sizes', [
    ('configs/mmseg/upernet_dat_pp_demo.py', 'segmentor',
     [(64, 96), (83, 75)]),
    ('configs/mmdet/mask_rcnn_dat_pp_demo.py', 'detector',
     [(96, 64), (75, 83)]),
])
def test_dense_demo_dynamic(tool, tmp_path, config, kind, sizes):
    model = tool.build_model(osp.join(ROOT, config))
    module, got_kind = tool.export_module(model)
    assert got_kind == kind
    out = str(tmp_path / f'{kind}.onnx')
    names = tool.export(module, kind, out, sizes[0], dynamic=True)
    _check_file(tool, out)
    results = tool.verify(out, module, [(1, 3, *s) for s in sizes])
    for shape, errs in results:
        assert max(errs) < RTOL, (shape, errs)
    x = torch.randn(1, 3, *sizes[1])
    ref = tool.torch_outputs(module, x)
    if kind == 'segmentor':
        assert names == ['seg_logits']
        # whole-image inference of mmseg itself gives the same logits
        meta = [dict(img_shape=sizes[1], pad_shape=sizes[1])]
        with torch.no_grad():
            lib = model.encode_decode(x, meta)
        torch.testing.assert_close(ref[0], lib, rtol=1e-5, atol=1e-5)
        assert ref[0].shape == (1, 4, *sizes[1])
    else:
        assert names == [f'feat{i}' for i in range(5)]  # FPN levels
        with torch.no_grad():
            lib = model.extract_feat(x)
        assert len(lib) == len(ref)


def test_dat_tiny_backbone_dynamic(tool, tmp_path):
    """The DAT-T++ backbone (all 26 blocks), tiny inputs."""
    model = tool.build_model(arch='tiny')
    module, kind = tool.export_module(model)
    assert kind == 'backbone'
    out = str(tmp_path / 'dat_t.onnx')
    names = tool.export(module, kind, out, (64, 64), dynamic=True)
    assert names == ['stage0', 'stage1', 'stage2', 'stage3']
    _check_file(tool, out)
    results = tool.verify(out, module, [(1, 3, 64, 64), (2, 3, 72, 88)])
    for shape, errs in results:
        assert max(errs) < RTOL, (shape, errs)


TINY_ARCH = dict(dims=[8, 8, 8, 8], depths=[1, 1, 1, 1],
                 stage_spec=[['D'], ['N'], ['D'], ['D']], heads=[1] * 4,
                 groups=[1] * 4)


def test_forced_custom_kernel_is_refused(tool, tmp_path):
    from mmdat.models import DAT
    non_portable = [i.name for i in
                    dispatch.implementations('deformable_attention')
                    if not i.portable]
    assert non_portable
    model = DAT(TINY_ARCH, impl=non_portable[0]).eval()
    module, kind = tool.export_module(model)
    with pytest.raises(ValueError, match=f"impl='{non_portable[0]}'"):
        tool.export(module, kind, str(tmp_path / 'x.onnx'), (32, 32))
    assert not (tmp_path / 'x.onnx').exists()


def test_opset_below_17_refused(tool, tmp_path):
    from mmdat.models import DAT
    module, kind = tool.export_module(DAT(TINY_ARCH).eval())
    with pytest.raises(ValueError, match='opset'):
        tool.export(module, kind, str(tmp_path / 'x.onnx'), (32, 32),
                    opset=16)


def test_dat_config_static_and_cli_errors(tool, tmp_path):
    """A config whose model is a DAT exports the backbone; a static file
    takes only its own size; bad option combinations are refused."""
    cfg = tmp_path / 'dat_only.py'
    cfg.write_text(f"default_scope = 'mmpretrain'\n"
                   f"model = dict(type='DAT', arch={TINY_ARCH!r}, "
                   "out_indices=(1, 3))\n")
    out = str(tmp_path / 'dat.onnx')
    res = tool.main([str(cfg), '--out', out, '--shape', '40', '48',
                     '--verify', '--benchmark', '--repeat', '1',
                     '--bench-portable'])
    assert res['kind'] == 'backbone'
    row, = res['benchmark']
    assert row['shape'] == [1, 3, 40, 48]
    assert all(row[k] > 0 for k in ('onnxruntime_ms', 'pytorch_ms',
                                    'pytorch_portable_ms'))
    assert res['outputs'] == ['stage1', 'stage3']
    assert max(res['verify'][0][1]) < RTOL
    import onnx
    dims = [d.dim_value for d in
            onnx.load(out).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 40, 48]
    with pytest.raises(SystemExit):  # another size needs --dynamic
        tool.main([str(cfg), '--out', out, '--verify-shape', '64', '64'])
    with pytest.raises(SystemExit):  # neither config nor arch
        tool.parse_args(['--out', out])

