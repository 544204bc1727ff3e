"""CPU fast paths that must not change results: oneDNN convolutions with
the residual addition fused (inference and training), in-place GELU, the
channels-last layout kept through the deformable attention, and the
one-pass deformable attention kernels."""
import pytest
import torch

from mmdat.models.attentions.common import conv_add, cpu_inference_fusable
from mmdat.models.attentions.deformable import (DeformableAttention,
                                                _group_batch)
from mmdat.models.backbones.dat import ConvFFN
from conftest import require_impl

CL = torch.channels_last


@pytest.mark.parametrize('layout', ['nchw', 'cl', 'mixed'])
def test_conv_add_equals_plain(layout):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, 1, 1, groups=8)
    x, res = torch.randn(2, 8, 9, 7), torch.randn(2, 8, 9, 7)
    if layout != 'nchw':
        x = x.contiguous(memory_format=CL)
    if layout == 'cl':
        res = res.contiguous(memory_format=CL)
    want = res + conv(x)
    with torch.no_grad():
        assert cpu_inference_fusable(x)
        got = conv_add(conv, x, res)
    assert torch.allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize('same', [True, False])
def test_conv_add_training_grads_equal_plain(same):
    """The fused op with the convolution's own backward, also when the
    convolution's input is the residual (ConvFFN, local perception unit)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, 1, 1, groups=8)
    x0 = torch.randn(2, 8, 9, 7).contiguous(memory_format=CL)
    r0 = x0 if same else torch.randn(2, 8, 9, 7)
    grads = []
    for fused in (True, False):
        x = x0.clone().requires_grad_()
        r = x if same else r0.clone().requires_grad_()
        conv.zero_grad()
        out = conv_add(conv, x, r) if fused else r + conv(x)
        (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
        grads.append([out.detach(), x.grad, conv.weight.grad.clone(),
                      conv.bias.grad.clone()] + ([] if same else [r.grad]))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fusion_only_without_autograd_and_autocast():
    x = torch.zeros(1, 2, 3, 3)
    assert not cpu_inference_fusable(x)  # grad mode on
    with torch.no_grad():
        assert not cpu_inference_fusable(x.double())
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert not cpu_inference_fusable(x)


def test_conv_ffn_inference_equals_training_path():
    torch.manual_seed(0)
    ffn = ConvFFN(8).eval()
    x = torch.randn(2, 8, 11, 6).contiguous(memory_format=CL)
    want = ffn(x)  # autograd on: the plain ops
    with torch.no_grad():
        got = ffn(x)
    assert torch.allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize('B', [1, 3])
def test_group_batch_keeps_channels_last(B):
    t = torch.randn(B, 12, 5, 7)
    want = t.reshape(B * 3, 4, 5, 7)
    got = _group_batch(t.contiguous(memory_format=CL), 3)
    assert torch.equal(got, want)
    # standard channels-last strides, which convolutions take as they are
    assert got.stride() == want.contiguous(memory_format=CL).stride()
    assert torch.equal(_group_batch(t, 3), want)


@pytest.mark.parametrize('B', [1, 2])
def test_deformable_output_channels_last_and_equal(B):
    torch.manual_seed(0)
    attn = DeformableAttention(32, 4, 2, 2, 3, 8).eval()
    x = torch.randn(B, 32, 10, 12)
    with torch.no_grad():
        want = attn(x)
        got = attn(x.contiguous(memory_format=CL))
    assert got.is_contiguous(memory_format=CL)
    assert torch.allclose(got, want, rtol=0, atol=1e-5)


def _spy(monkeypatch, *names):
    """Record which C++ ops run (their names, in call order)."""
    calls = []
    for name in names:
        op = getattr(torch.ops.mmdat, name)
        monkeypatch.setattr(torch.ops.mmdat, name,
                            lambda *a, op=op, name=name: calls.append(name)
                            or op(*a))
    return calls


def _one_pass(isa):
    """Whether this instruction set has the one-pass deformable kernels."""
    from mmdat.ops import library
    return library.fused_deform_attention_available()


@pytest.fixture
def fused_kernel(isa):
    """The one-pass deformable kernels (AVX-512 only)."""
    if not _one_pass(isa):
        pytest.skip(f'no one-pass deformable kernel in the {isa} build')


# (channels, heads, groups, stride, offset kernel, rpe size, B, H, W):
# several query tiles and a partial one (W > 32), fewer queries than one
# 8-row block, key counts off the 16-lane width, one key, 2 groups
FUSED_CASES = [(64, 2, 1, 8, 9, 7, 1, 40, 75),
               (64, 4, 2, 4, 5, 16, 2, 45, 37),
               (32, 2, 1, 2, 3, 8, 2, 5, 7),
               (32, 2, 2, 2, 3, 8, 1, 1, 1),
               (32, 1, 1, 1, 3, 4, 1, 9, 16)]


@pytest.mark.parametrize('case', FUSED_CASES)
def test_fused_deformable_inference_equals_reference(case, monkeypatch, isa):
    """float32 inference through the C++ kernels of each instruction set
    (one-pass kernel on AVX-512, bias kernel + SDPA otherwise) against the
    reference path in float64."""
    C, h, g, r, ks, rpe, B, H, W = case
    torch.manual_seed(0)
    fused = DeformableAttention(C, h, g, r, ks, rpe, impl='cpu').eval()
    with torch.no_grad():
        fused.rpe_table.normal_()  # a bias that matters
    ref = DeformableAttention(C, h, g, r, ks, rpe, impl='reference').eval()
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(B, C, H, W)
    calls = _spy(monkeypatch, 'deform_attention_infer', 'deform_bias_out')
    with torch.no_grad():
        got = fused(x.contiguous(memory_format=CL))
    want_op = ('deform_attention_infer' if _one_pass(isa) else
               'deform_bias_out')
    assert want_op in calls, f'{want_op} did not run ({isa})'
    with torch.no_grad():
        want = ref.double()(x.double())
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert err <= 1e-5, err


def test_fused_deformable_kernel_rejects_bad_input(fused_kernel):
    args = [torch.zeros(1, 2, 6, 32), torch.zeros(2, 32, 4),
            torch.zeros(2, 4, 32), torch.zeros(1, 2, 3, 3),
            torch.zeros(1, 2, 4, dtype=torch.int32), torch.zeros(1, 2, 4),
            torch.zeros(1, 3, 4, dtype=torch.int32), torch.zeros(1, 3, 4)]
    torch.ops.mmdat.deform_attention_infer(*args, 0.1)  # consistent sizes
    bad = list(args)
    bad[0] = torch.zeros(1, 2, 6, 24)
    with pytest.raises(RuntimeError, match='multiple of 16'):
        torch.ops.mmdat.deform_attention_infer(*bad, 0.1)
    bad = list(args)
    bad[0] = torch.zeros(1, 2, 5, 32)
    with pytest.raises(RuntimeError, match='disagree'):
        torch.ops.mmdat.deform_attention_infer(*bad, 0.1)
    bad = [a.double() if a.dtype == torch.float32 else a for a in args]
    with pytest.raises(RuntimeError, match='float32 only'):
        torch.ops.mmdat.deform_attention_infer(*bad, 0.1)


@pytest.mark.parametrize('case', FUSED_CASES + [
    (64, 4, 2, 4, 5, 16, 2, 23, 41), (32, 2, 1, 2, 3, 8, 1, 3, 5)])
def test_fused_kernels_in_training_give_reference_grads(case, monkeypatch,
                                                        isa):
    """float32 training through the C++ kernels of each instruction set
    (one-pass forward and backward kernels on AVX-512; bias kernel, SDPA
    and the bias backward kernel otherwise) against the reference path in
    float64 (outputs and every gradient)."""
    C, h, g, r, ks, rpe, B, H, W = case
    torch.manual_seed(0)
    fast = DeformableAttention(C, h, g, r, ks, rpe, impl='cpu')
    with torch.no_grad():
        fast.rpe_table.normal_()
    ref = DeformableAttention(C, h, g, r, ks, rpe, impl='reference').double()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(B, C, H, W)
    xf, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    calls = _spy(monkeypatch, 'deform_attention_infer',
                 'deform_attention_backward', 'deform_bias_out',
                 'deform_bias_backward')
    of, orf = fast(xf), ref(xr)
    assert float((of.double() - orf).abs().max() / orf.abs().max()) <= 1e-5
    (of.double() ** 2).sum().backward()
    (orf ** 2).sum().backward()

    # scale of the parameter gradients: proj_k.bias's is zero in exact
    # arithmetic (a constant added to every logit of a query)
    floor = max(float(p.grad.abs().max()) for p in ref.parameters())

    def close(a, b, scale=None):
        scale = float(b.abs().max()) if scale is None else scale
        return float((a.double() - b).abs().max()) <= 1e-4 * scale

    want_ops = (['deform_attention_backward', 'deform_attention_infer']
                if _one_pass(isa) else
                ['deform_bias_backward', 'deform_bias_out'])
    assert sorted(set(calls)) == want_ops, isa
    assert close(xf.grad, xr.grad)
    for (n, pf), (_, pr) in zip(fast.named_parameters(),
                                ref.named_parameters()):
        assert close(pf.grad, pr.grad,
                     max(float(pr.grad.abs().max()), floor)), n


def test_conv_add_runs_module_hooks():
    """A hook on the convolution (FLOP counters, feature extractors) still
    sees the call: the fused op is not used then."""
    conv = torch.nn.Conv2d(4, 4, 3, 1, 1, groups=4)
    seen = []
    conv.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        out = conv_add(conv, x, x)
    assert seen == [out.shape]


@pytest.mark.parametrize('hw', [(12, 40), (7, 7), (9, 23)])
def test_neighborhood_training_float32_gives_reference_grads(hw, isa,
                                                             monkeypatch):
    """float32 training through the fused kernels (on AVX-512 builds the
    vectorised forward also writes the probabilities the backward uses)
    against the reference path in float64."""
    from mmdat.models.attentions import NeighborhoodAttention
    require_impl('cpu')
    torch.manual_seed(0)
    fast = NeighborhoodAttention(64, 2, impl='cpu')
    with torch.no_grad():
        fast.rpb.normal_()
    ref = NeighborhoodAttention(64, 2, impl='reference').double()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 64, *hw)
    xf, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    calls = _spy(monkeypatch, 'neighborhood_attention',
                 'neighborhood_attention_backward',
                 'neighborhood_attention_inference')
    of, orf = fast(xf), ref(xr)
    assert float((of.double() - orf).abs().max() / orf.abs().max()) <= 1e-5
    (of.double() ** 2).sum().backward()
    (orf ** 2).sum().backward()
    assert calls == ['neighborhood_attention',
                     'neighborhood_attention_backward'], calls
    with torch.no_grad():  # the inference kernel of this instruction set
        oi = fast(x)
    assert calls[-1] == 'neighborhood_attention_inference'
    assert float((oi.double() - orf).abs().max() / orf.abs().max()) <= 1e-5
    floor = max(float(p.grad.abs().max()) for p in ref.parameters())
    assert float((xf.grad - xr.grad).abs().max()) <= 1e-4 * float(
        xr.grad.abs().max())
    for (n, pf), (_, pr) in zip(fast.named_parameters(),
                                ref.named_parameters()):
        scale = max(float(pr.grad.abs().max()), floor)
        assert float((pf.grad - pr.grad).abs().max()) <= 1e-4 * scale, n
