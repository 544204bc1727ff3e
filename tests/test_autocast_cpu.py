"""bfloat16 autocast on the CPU (what ``--amp`` uses without a GPU): forward
and backward of a small DAT++ stay finite and close to float32, for the
C++ kernels, the chunked and the reference attention.

The deformable attention keeps its sampling positions and bias-table
coordinates in float32 under autocast: in bf16 a position near +-1 is only
known to 2**-8 and the table coordinate to half a cell (``stages.0``, 111
wide), which made the ``rpe_table`` gradients drift (cosine 0.95-0.98);
``test_bf16_rpe_table_gradients_close_to_fp32`` guards that.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_ARCH, rel_err
from mmdat.models import DAT

IMPLS = ['auto', 'chunked', 'reference']  # auto: the C++ kernels on CPU
OUT_TOL = 5e-2  # max |bf16 - fp32| / max |fp32| per output
MIN_COSINE = 0.99  # gradients, bf16 vs fp32
GRAD_FLOOR = 1e-3  # parameters whose gradient stays below this fraction of
# the largest one (the proj_k biases: zero up to rounding, the softmax does
# not see them) are only checked for finiteness


def _model(impl, rpe_std=None):
    """TINY_ARCH with its own init; ``rpe_std``: position bias tables drawn
    from N(0, rpe_std) instead (trained tables are far from the init's
    0.01; the golden fixtures use 0.5)."""
    torch.manual_seed(0)
    model = DAT(arch=TINY_ARCH, impl=impl)
    if rpe_std is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(('rpe_table', 'rpb')):
                    param.normal_(0, rpe_std)
    return model


def _run(model, autocast):
    """Outputs, input gradient and parameter gradients of one step."""
    model.zero_grad(set_to_none=True)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    x.requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        outs = model(x)
    # fixed random projections of the outputs (they are layer-normed, so e.g.
    # their mean square would hardly depend on the weights)
    g = torch.Generator().manual_seed(2)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).mean()
               for o in outs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return [o.detach() for o in outs], x.grad, grads


def _cosine(a, b):
    return float(F.cosine_similarity(a.flatten().double(),
                                     b.flatten().double(), dim=0))


def _fp32_and_bf16(model):
    ref = _run(model, autocast=False)
    low = []  # proof that autocast did run layers in bfloat16
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out: low.append(out.dtype == torch.bfloat16))
        for m in model.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    got = _run(model, autocast=True)
    for hook in hooks:
        hook.remove()
    assert any(low), 'no convolution / linear layer ran in bfloat16'
    return ref, got


def _checked_gradients(ref_grads, grads):
    """(name, cosine) of every parameter with a non-negligible gradient."""
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
    floor = GRAD_FLOOR * max(float(g.abs().max()) for g in ref_grads.values())
    out = [(name, _cosine(grads[name], ref)) for name, ref in ref_grads.items()
           if float(ref.abs().max()) >= floor]
    assert len(out) >= 0.9 * len(grads), (len(out), len(grads))
    return out


@pytest.mark.parametrize('rpe_std', [None, 0.5], ids=['init', 'rpe0.5'])
@pytest.mark.parametrize('impl', IMPLS)
def test_bf16_outputs_close_to_fp32(impl, rpe_std):
    model = _model(impl, rpe_std)
    (ref_outs, _, _), (outs, _, _) = _fp32_and_bf16(model)
    assert len(outs) == len(ref_outs) == 4
    for out, ref in zip(outs, ref_outs):
        assert out.shape == ref.shape
        assert torch.isfinite(out).all()
        assert rel_err(out.float(), ref) <= OUT_TOL


@pytest.mark.parametrize('impl', IMPLS)
def test_bf16_gradients_close_to_fp32(impl):
    """Every gradient but the rpe tables' (checked on their own below)."""
    model = _model(impl)
    (_, ref_xgrad, ref_grads), (_, xgrad, grads) = _fp32_and_bf16(model)
    assert torch.isfinite(xgrad).all()
    assert _cosine(xgrad, ref_xgrad) > MIN_COSINE
    for name, cosine in _checked_gradients(ref_grads, grads):
        if not name.endswith('rpe_table'):
            assert cosine > MIN_COSINE, (name, cosine)


@pytest.mark.parametrize('impl', IMPLS)
def test_bf16_rpe_table_gradients_close_to_fp32(impl):
    model = _model(impl)
    (_, _, ref_grads), (_, _, grads) = _fp32_and_bf16(model)
    cosines = {name: cosine
               for name, cosine in _checked_gradients(ref_grads, grads)
               if name.endswith('rpe_table')}
    assert len(cosines) == 4  # the four 'D' blocks of TINY_ARCH
    assert min(cosines.values()) > MIN_COSINE, cosines
