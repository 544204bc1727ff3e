"""Every implementation the dispatcher can choose on a CPU is exact against
the reference formulation (float64: outputs, input gradients and parameter
gradients)."""
import copy

import pytest
import torch

from conftest import CPU_IMPLS, TINY_ARCH, rel_err, require_impl
from mmdat.models import DAT
from mmdat.models.attentions import DeformableAttention, NeighborhoodAttention

TOL = 1e-5


def _compare(fast, ref, x):
    xf = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    of, orf = fast(xf), ref(xr)
    assert rel_err(of, orf) <= TOL
    g = torch.randn_like(of)
    (of * g).sum().backward()
    (orf * g).sum().backward()
    assert rel_err(xf.grad, xr.grad) <= TOL
    _compare_param_grads(fast, ref)


def _compare_param_grads(fast, ref):
    """Relative to each gradient's size, floored at the largest parameter
    gradient: some are exactly zero in theory (e.g. ``proj_k.bias``, to which
    softmax is invariant) and only rounding noise in practice."""
    floor = max(float(p.grad.abs().max()) for p in ref.parameters()
                if p.grad is not None)
    for (n, pf), (_, pr) in zip(fast.named_parameters(),
                                ref.named_parameters()):
        assert (pf.grad is None) == (pr.grad is None), n
        if pr.grad is None:
            continue
        scale = max(float(pr.grad.abs().max()), floor)
        assert float((pf.grad - pr.grad).abs().max()) <= TOL * scale, n


@pytest.fixture(params=CPU_IMPLS)
def impl(request):
    """An implementation the dispatcher can choose for CPU tensors; the C++
    kernels must be built (a failed build fails here, it does not skip)."""
    require_impl(request.param)
    return request.param


def _pair(module, impl):
    ref = copy.deepcopy(module)
    ref.impl = 'reference'
    module.impl = impl
    return module.double(), ref.double()


@pytest.mark.parametrize('hw', [(16, 24), (7, 7), (9, 30), (30, 8), (13, 17),
                                (21, 11)])
@pytest.mark.parametrize('kernel', [3, 7])
def test_neighborhood_fast_equals_reference(hw, kernel, impl):
    torch.manual_seed(0)
    m = NeighborhoodAttention(16, 2, kernel)
    with torch.no_grad():
        m.rpb.normal_()
    fast, ref = _pair(m, impl)
    _compare(fast, ref, torch.randn(2, 16, *hw, dtype=torch.float64))


@pytest.mark.parametrize('hw', [(4, 6), (2, 3), (1, 5), (5, 1), (1, 1)])
def test_neighborhood_smaller_than_kernel(hw, impl):
    torch.manual_seed(1)
    fast, ref = _pair(NeighborhoodAttention(8, 2, 7), impl)
    _compare(fast, ref, torch.randn(1, 8, *hw, dtype=torch.float64))


@pytest.mark.parametrize('hw', [(32, 48), (17, 23), (9, 40), (40, 3),
                                (2, 2), (1, 7), (6, 1), (1, 1)])
@pytest.mark.parametrize('setting', [
    dict(num_heads=2, num_groups=1, stride=8, offset_kernel=9, rpe_size=56),
    dict(num_heads=4, num_groups=2, stride=2, offset_kernel=5, rpe_size=14),
    dict(num_heads=4, num_groups=4, stride=1, offset_kernel=3, rpe_size=7),
    dict(num_heads=2, num_groups=2, stride=2, offset_kernel=2, rpe_size=1),
])
def test_deformable_fast_equals_reference(hw, setting, impl):
    torch.manual_seed(0)
    m = DeformableAttention(16, **setting)
    with torch.no_grad():
        m.rpe_table.normal_()
        m.conv_offset[3].weight.mul_(20)  # large offsets: clamped positions
    fast, ref = _pair(m, impl)
    _compare(fast, ref, torch.randn(2, 16, *hw, dtype=torch.float64))


def test_deformable_chunked_path_equals_reference(monkeypatch, impl):
    from mmdat.ops.deformable_attention import chunked
    monkeypatch.setattr(chunked, 'CHUNK_ELEMENTS', 200)
    torch.manual_seed(0)
    m = DeformableAttention(16, 2, 1, stride=2, offset_kernel=3, rpe_size=14)
    fast, ref = _pair(m, impl)
    _compare(fast, ref, torch.randn(1, 16, 19, 13, dtype=torch.float64))


@pytest.mark.parametrize('orf', [2.0, 0.0])
def test_deformable_tanh_offsets_and_no_pe(orf, impl):
    if impl == 'cpu':
        pytest.skip('the C++ kernels assume positions inside the table '
                    '(test_ops_dispatch checks that cpu refuses them)')
    torch.manual_seed(0)
    for use_pe in (True, False):
        m = DeformableAttention(16, 2, 2, stride=2, offset_kernel=3,
                                rpe_size=8, offset_range_factor=orf,
                                use_pe=use_pe)
        fast, ref = _pair(m, impl)
        _compare(fast, ref, torch.randn(1, 16, 12, 10, dtype=torch.float64))


@pytest.mark.parametrize('hw', [(64, 96), (45, 37)])
def test_whole_backbone_equals_reference(hw, impl):
    if impl == 'chunked' and hw == (64, 96):
        pytest.skip('one size suffices for the slow float64 chunked path')
    torch.manual_seed(0)
    fast = DAT(arch=TINY_ARCH, impl=impl).double()
    ref = DAT(arch=TINY_ARCH, impl='reference').double()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(1, 3, *hw, dtype=torch.float64)
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    of, orf = fast(xf), ref(xr)
    for a, b in zip(of, orf):
        assert rel_err(a, b) <= TOL
    sum((o * o).sum() for o in of).backward()
    sum((o * o).sum() for o in orf).backward()
    assert rel_err(xf.grad, xr.grad) <= TOL
    _compare_param_grads(fast, ref)


# 37 keys: two 16-wide (AVX-512) or four 8-wide (AVX2) gather steps and a
# scalar tail in float32; 11: the tail alone
@pytest.mark.parametrize('Ns', [11, 37])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32,
                                   torch.bfloat16])
def test_fused_bias_kernel_equals_pytorch(dtype, Ns):
    """``torch.ops.mmdat.deform_bias`` and its backward against the gathers
    of the pure-PyTorch path and autograd."""
    require_impl('cpu')
    torch.manual_seed(0)
    B, g, hg, r, Ty, Tx, W = 2, 3, 2, 4, 7, 9, 13
    f64 = dict(dtype=torch.float64)
    table = torch.randn(g, hg, Ty, Tx, **f64)
    y0 = torch.randint(0, Ty - 1, (B * g, r, Ns))
    fy = torch.rand(B * g, r, Ns, **f64)
    x0 = torch.randint(0, Tx - 1, (B * g, W, Ns))
    fx = torch.rand(B * g, W, Ns, **f64)
    grad = torch.randn(B * g, hg, r, W, Ns, **f64)
    leaves = [t.clone().requires_grad_() for t in (table, fy, fx)]
    want = _bias_by_indexing(leaves[0], y0, leaves[1], x0, leaves[2])
    want_grads = torch.autograd.grad(want, leaves, grad)
    args = (table.to(dtype), y0.int(), fy.to(dtype), x0.int(), fx.to(dtype))
    got = torch.ops.mmdat.deform_bias(*args)
    g_table, g_fy, g_fx = torch.ops.mmdat.deform_bias_backward(
        grad.to(dtype), *args)
    g_table = g_table.view(B, g, r, hg, Ty, Tx).sum((0, 2))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5,
           torch.bfloat16: 2e-2}[dtype]
    assert got.dtype == dtype and got.shape == want.shape
    assert rel_err(got, want) <= tol
    buf = torch.full((got.numel() + 5,), float('nan'), dtype=dtype)
    into = torch.ops.mmdat.deform_bias_out(*args, buf[:got.numel()])
    assert torch.equal(into.view_as(got), got)
    assert buf[got.numel():].isnan().all()  # nothing written past the end
    for a, b in zip((g_table, g_fy, g_fx), want_grads):
        assert rel_err(a, b) <= tol


def _bias_by_indexing(table, y0, fy, x0, fx):
    """The bias kernel's output ``(B*g, hg, r, W, Ns)`` by plain indexing:
    ``table`` ``(g, hg, Ty, Tx)``, ``y0/fy`` ``(B*g, r, Ns)``, ``x0/fx``
    ``(B*g, W, Ns)``."""
    g, hg = table.shape[:2]
    Bg, r, Ns = y0.shape
    W = x0.shape[1]
    gi = (torch.arange(Bg) % g).view(Bg, 1, 1, 1, 1)
    hi = torch.arange(hg).view(1, hg, 1, 1, 1)
    y = y0.long().view(Bg, 1, r, 1, Ns)
    x = x0.long().view(Bg, 1, 1, W, Ns)
    wy = fy.view(Bg, 1, r, 1, Ns)
    wx = fx.view(Bg, 1, 1, W, Ns)
    top = table[gi, hi, y, x] * (1 - wx) + table[gi, hi, y, x + 1] * wx
    bot = (table[gi, hi, y + 1, x] * (1 - wx)
           + table[gi, hi, y + 1, x + 1] * wx)
    return top * (1 - wy) + bot * wy


def test_fused_bias_kernel_rejects_bad_input():
    require_impl('cpu')
    table = torch.zeros(1, 1, 3, 4)
    y0, fy = torch.zeros(1, 2, 3).int(), torch.zeros(1, 2, 3)
    with pytest.raises(RuntimeError, match='int32'):
        torch.ops.mmdat.deform_bias(table, y0.long(), fy, y0, fy)
    with pytest.raises(RuntimeError, match='disagree'):
        torch.ops.mmdat.deform_bias(table, y0, fy, torch.zeros(1, 2, 5).int(),
                                    torch.zeros(1, 2, 5))
    with pytest.raises(RuntimeError, match='at least 2x2'):
        torch.ops.mmdat.deform_bias(torch.zeros(1, 1, 1, 4), y0, fy, y0, fy)
    with pytest.raises(RuntimeError, match='out must be contiguous'):
        torch.ops.mmdat.deform_bias_out(table, y0, fy, y0, fy,
                                        torch.zeros(17))


def test_fused_neighborhood_kernel_rejects_bad_input():
    require_impl('cpu')
    q = torch.zeros(1, 2, 5, 5, 4)
    with pytest.raises(RuntimeError, match='smaller than the kernel'):
        torch.ops.mmdat.neighborhood_attention(q, q, q, torch.zeros(2, 13, 13),
                                               7, 0.5)
    with pytest.raises(RuntimeError, match='rpb must be'):
        torch.ops.mmdat.neighborhood_attention(q, q, q, torch.zeros(2, 3, 3),
                                               3, 0.5)


@pytest.mark.parametrize('shape,ks', [
    ((2, 3, 9, 40, 32), 7),    # W not a multiple of 16, B=2, several heads
    ((1, 2, 8, 13, 32), 7),    # W < 16
    ((1, 2, 7, 7, 32), 7),     # H == W == ks
    ((2, 2, 7, 50, 16), 7),    # H == ks, c=16
    ((1, 2, 12, 37, 24), 7),   # c=24 (masked channel tail)
    ((1, 1, 10, 23, 64), 5),
    ((2, 2, 9, 34, 8), 3),
    ((1, 2, 9, 18, 40), 9),
])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_fused_neighborhood_inference_kernel(shape, ks, dtype, isa):
    """The inference op (no attention weights, own float32 kernel) and the
    training op against the float64 reference, also from strided views of a
    qkv tensor."""
    from mmdat.ops.neighborhood_attention.reference import \
        neighborhood_attention_reference
    require_impl('cpu')
    torch.manual_seed(0)
    B, h, H, W, c = shape
    qkv = torch.randn(B, H, W, 3, h, c, dtype=dtype)
    q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)
    rpb = torch.randn(h, 2 * ks - 1, 2 * ks - 1, dtype=dtype)
    want = neighborhood_attention_reference(
        q.double(), k.double(), v.double(), rpb.double(), kernel_size=ks,
        scale=0.3)
    ref, _ = torch.ops.mmdat.neighborhood_attention(q, k, v, rpb, ks, 0.3)
    out = torch.ops.mmdat.neighborhood_attention_inference(q, k, v, rpb, ks,
                                                          0.3)
    assert out.shape == ref.shape
    assert out.permute(0, 2, 3, 1, 4).is_contiguous()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(out, want) <= tol
    assert rel_err(ref, want) <= tol
    out2 = torch.ops.mmdat.neighborhood_attention_inference(
        q.contiguous(), k.contiguous(), v.contiguous(), rpb, ks, 0.3)
    assert torch.equal(out, out2)


@pytest.mark.parametrize('hw', [(20, 37), (7, 9), (4, 6)])
def test_neighborhood_no_grad_equals_training_path(hw):
    """Under no_grad the module takes the inference kernel; same output as
    the autograd path (training kernel)."""
    require_impl('cpu')
    torch.manual_seed(2)
    m = NeighborhoodAttention(64, 2, 7)
    with torch.no_grad():
        m.rpb.normal_()
    x = torch.randn(2, 64, *hw)
    with torch.no_grad():
        out = m(x)
    assert rel_err(out, m(x).detach()) <= 1e-5
