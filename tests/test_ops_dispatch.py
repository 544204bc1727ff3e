"""The ops layer: one dispatcher decides which implementation runs and
says why; custom ops survive torch.export and torch.jit.trace; bad and NaN
inputs give clear errors or NaN outputs."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_ARCH, rel_err, require_impl
from mmdat.models import DAT
from mmdat.models.attentions import DeformableAttention, NeighborhoodAttention
from mmdat.ops import dispatch, explain, portable, set_enabled

OPS = ('deformable_attention', 'neighborhood_attention')


def _ctx(**kw):
    base = dict(device=torch.device('cpu'), dtype=torch.float32,
                requires_grad=False, head_dim=16)
    base.update(kw)
    return dispatch.Context(**base)


@pytest.mark.parametrize('op', OPS)
def test_every_implementation_states_what_it_can_run(op):
    found = dict(dispatch.reasons(op, _ctx()))
    assert {'reference', 'chunked', 'cpu', 'triton'} <= set(found)
    assert found['reference'] is None and found['chunked'] is None
    assert 'CUDA' in found['triton']
    cuda = dict(dispatch.reasons(op, _ctx(device=torch.device('cuda'))))
    assert 'CPU' in cuda['cpu']


@pytest.mark.parametrize('op', OPS)
def test_auto_prefers_the_cpu_kernels_and_falls_back(op):
    require_impl('cpu')
    assert dispatch.choose(op, 'auto', _ctx()).name == 'cpu'
    set_enabled('cpu', False)
    try:
        assert dispatch.choose(op, 'auto', _ctx()).name == 'chunked'
        with pytest.raises(RuntimeError, match='switched off'):
            dispatch.choose(op, 'cpu', _ctx())
    finally:
        set_enabled('cpu', True)


def test_a_named_implementation_that_cannot_run_says_why():
    with pytest.raises(RuntimeError, match="impl='triton'.*CUDA"):
        dispatch.choose('deformable_attention', 'triton', _ctx())
    m = DeformableAttention(16, 2, 1, 2, 3, 4, impl='triton')
    with pytest.raises(RuntimeError, match='needs CUDA'):
        m(torch.randn(1, 16, 8, 8))
    with pytest.raises(RuntimeError, match='positions may leave'):
        DeformableAttention(16, 2, 1, 2, 3, 4, offset_range_factor=2.0,
                            impl='cpu')(torch.randn(1, 16, 8, 8))


def test_auto_on_cuda_materialises_the_scores_up_to_a_budget():
    """The deformable reference is the fastest CUDA path as measured: auto
    takes it on CUDA while one call's score matrix is within budget, the
    chunked path beyond; off CUDA it is the last resort only."""
    from mmdat.ops.deformable_attention import reference
    op, cuda = 'deformable_attention', torch.device('cuda')
    budget = reference.CUDA_AUTO_MAX_SCORES

    def pick(device, scores, impl='auto'):
        ctx = _ctx(device=device, facts=(('scores', scores),
                                         ('explicit', impl != 'auto')))
        return dispatch.choose(op, impl, ctx).name

    assert pick(cuda, budget) == 'reference'
    assert pick(cuda, budget + 1) == 'chunked'
    assert pick(cuda, budget + 1, 'reference') == 'reference'
    found = dict(dispatch.reasons(op, _ctx(device=cuda)))
    assert found['reference'] is None  # it can run; auto prefers otherwise
    set_enabled('cpu', False)
    try:
        assert pick(torch.device('cpu'), 10) == 'chunked'
        set_enabled('chunked', False)
        # nothing else can run: the skipped one is the last resort
        assert pick(torch.device('cpu'), 10) == 'reference'
    finally:
        set_enabled('cpu', True)
        set_enabled('chunked', True)


def test_impl_names_are_checked():
    with pytest.raises(ValueError, match='impl'):
        NeighborhoodAttention(16, 2, impl='natten')
    with pytest.raises(ValueError, match='impl'):
        DAT(arch=TINY_ARCH, impl='gpu')
    # the old name of 'auto'
    DAT(arch=TINY_ARCH, impl='fast')


def test_tanh_offsets_never_take_the_kernels():
    """DAT v1 positions may leave the table: auto skips cpu (which assumes
    them inside) and says so."""
    ctx = _ctx(facts=(('positions_in_range', False),))
    assert dispatch.choose('deformable_attention', 'auto', ctx).name == \
        'chunked'
    assert 'positions may leave' in dict(
        dispatch.reasons('deformable_attention', ctx))['cpu']


def test_portable_mode_takes_portable_implementations():
    with portable():
        got = {op: dispatch.choose(op, 'auto', _ctx()).name
               for op in OPS + ('bilinear_sample', )}
        with pytest.raises(RuntimeError, match='not portable'):
            dispatch.choose('deformable_attention', 'cpu', _ctx())
    assert got == {'deformable_attention': 'chunked',
                   'neighborhood_attention': 'gather',
                   'bilinear_sample': 'gather'}
    assert not dispatch.is_portable()


def test_explain_names_each_attention_module_and_its_implementation():
    require_impl('cpu')
    model = DAT(arch=TINY_ARCH).eval()
    lines = []
    rows = explain(model, torch.randn(1, 3, 64, 64), print_fn=lines.append)
    attn = [r for r in rows if r[1] in OPS]
    # one row per attention block of the arch
    n_blocks = sum(len(s) for s in TINY_ARCH['stage_spec'])
    assert len(attn) == n_blocks
    assert {r[0] for r in attn} == {
        f'stages.{i}.attns.{d}' for i, s in enumerate(TINY_ARCH['stage_spec'])
        for d in range(len(s))}
    assert all(r[2] == 'cpu' for r in attn)
    assert any('flex: needs CUDA' in line for line in lines)
    assert any('reference: can run, lower preference' in line
               for line in lines)
    # the key sampling of each deformable block is named too
    samples = [r for r in rows if r[1] == 'bilinear_sample']
    assert samples and all(r[0].startswith('stages.') for r in samples)
    with dispatch.recording() as rec:  # explain left no recorder behind
        pass
    assert rec == []


def test_debug_log_names_the_choice():
    code = ('import torch; from mmdat.models.attentions import '
            'NeighborhoodAttention as N; '
            'N(16, 2, 3, impl="chunked")(torch.randn(1, 16, 5, 5))')
    env = dict(os.environ, MMDAT_LOG_LEVEL='debug')
    res = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "neighborhood_attention: chunked (impl='chunked')" in res.stderr
    assert 'flex: needs CUDA' in res.stderr


def test_export_keeps_the_custom_ops():
    """torch.export of the backbone succeeds with the C++ kernels as custom
    ops in its graph, and the exported program gives eager's outputs."""
    require_impl('cpu')
    torch.manual_seed(0)
    model = DAT(arch=TINY_ARCH).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ep = torch.export.export(model, (x, ))
        targets = {str(n.target) for n in ep.graph.nodes}
        assert any('mmdat.deformable_attention_cpu' in t for t in targets)
        assert any('mmdat.neighborhood_attention_cpu' in t for t in targets)
        for a, b in zip(ep.module()(x), model(x)):
            assert rel_err(a, b) <= 1e-6


@pytest.mark.parametrize('impl', ['cpu', 'chunked'])
def test_jit_trace(impl):
    require_impl(impl)
    torch.manual_seed(0)
    m = DeformableAttention(32, 2, 1, 2, 3, 8, impl=impl).eval()
    x = torch.randn(1, 32, 12, 10)
    with torch.no_grad():
        traced = torch.jit.trace(m, x, check_trace=False)
        assert rel_err(traced(x), m(x)) <= 1e-6
    if impl == 'cpu':
        assert 'mmdat::deformable_attention_cpu' in str(traced.graph)


@pytest.mark.parametrize('impl', ['cpu', 'chunked', 'reference'])
def test_nan_features_give_nan_not_errors(impl):
    """A NaN feature map turns the offsets and positions NaN: every
    implementation returns NaN there instead of reading out of range."""
    require_impl(impl)
    torch.manual_seed(0)
    m = DeformableAttention(32, 2, 2, 2, 3, 8, impl=impl)
    x = torch.randn(1, 32, 8, 12)
    x[..., 3, 5] = float('nan')
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out = m(x)
        assert out.isnan().any()
    na = NeighborhoodAttention(16, 2, 3, impl=impl)
    y = torch.randn(1, 16, 6, 6)
    y[..., 2, 2] = float('nan')
    assert na(y).isnan().any()


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_custom_ops_pass_opcheck(dtype):
    """Fake kernels (shapes and strides), autograd registration and schemas
    of the custom ops agree with the real kernels, for strided inputs (the
    modules pass views) - what torch.compile's backward relies on."""
    from mmdat.ops.deformable_attention.lookup import clamped_corner
    require_impl('cpu')
    torch.manual_seed(0)
    B, h, g, H, W, Ns, c = 1, 4, 2, 5, 7, 18, 16

    def view(*shape):  # (B, h, n, c) view of a (B, h, c, n) map
        t = torch.randn(B, shape[1], shape[3], shape[2], dtype=dtype)
        return t.transpose(2, 3).requires_grad_()

    q, k, v = view(B, h, H * W, c), view(B, h, Ns, c), view(B, h, Ns, c)
    table = torch.randn(g, h // g, 9, 9, dtype=dtype, requires_grad=True)
    pos = torch.rand(B * g, Ns, 2, dtype=dtype) * 2 - 1
    y0, fy = clamped_corner(pos[None, ..., 0], H, 9)
    x0, fx = clamped_corner(pos[None, ..., 1], W, 9)
    args = (q, k, v, table, y0[0].int(), fy[0].requires_grad_(),
            x0[0].int(), fx[0].requires_grad_(), 0.25)
    torch.library.opcheck(torch.ops.mmdat.deformable_attention_cpu, args)
    qkv = torch.randn(B, 6, 7, 3, h, c, dtype=dtype)
    qn, kn, vn = (t.requires_grad_() for t in
                  qkv.permute(3, 0, 4, 1, 2, 5).unbind(0))
    rpb = torch.randn(h, 5, 5, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.mmdat.neighborhood_attention_cpu,
                          (qn, kn, vn, rpb, 3, 0.25))
    with torch.no_grad():
        torch.library.opcheck(
            torch.ops.mmdat.neighborhood_attention_cpu_inference,
            (qn.detach(), kn.detach(), vn.detach(), rpb.detach(), 3, 0.25))
