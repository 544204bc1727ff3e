"""CUDA: the Triton kernels (what impl='auto' runs on a GPU) against float64
references and the golden outputs, mixed precision, one compilation per
configuration. Skipped on machines without a GPU (tests/test_triton.py
checks the same kernels there under the Triton interpreter)."""
import pytest
import torch

from conftest import TINY_ARCH, rel_err
from mmdat.models import DAT
from test_triton import (TOL, TOL_HALF, _check, _deformable_case,
                         _golden_case, _module_case, _neighborhood_case)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
]


@pytest.fixture(autouse=True)
def no_tf32():
    cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    old = cuda.allow_tf32, cudnn.allow_tf32
    cuda.allow_tf32 = cudnn.allow_tf32 = False
    yield
    cuda.allow_tf32, cudnn.allow_tf32 = old


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# (B, h, g, H, W, Ns, c, table, dtype, blocks, split): GPU block sizes
# (None) unless stated; key counts that are not multiples of the blocks
DA_CASES = {
    'stage1_like': (1, 2, 1, 50, 76, 70, 32, (111, 111), F32, None, 512),
    'groups_dim64': (2, 8, 4, 23, 31, 95, 64, (27, 27), F32, None, 512),
    'dim128_no_split': (1, 2, 1, 9, 17, 33, 128, (13, 13), F32, None, 1),
    'dim24_no_table': (1, 4, 2, 20, 1, 21, 24, None, F32, None, 512),
    'bf16': (2, 4, 2, 25, 38, 100, 32, (55, 55), BF16, None, 512),
    'fp16': (1, 2, 1, 25, 38, 100, 32, (55, 55), F16, None, 512),
}
NA_CASES = {
    'k7': (2, 2, 20, 13, 32, 7, F32, None),
    'k7_dim64': (1, 4, 9, 7, 64, 7, F32, None),
    'k5_bf16': (1, 2, 16, 24, 32, 5, BF16, None),
}


@pytest.mark.parametrize('name', list(DA_CASES))
def test_deformable_triton_matches_float64(name):
    args = DA_CASES[name]
    res = _deformable_case(*args, device='cuda')
    _check(res, TOL if args[8] == F32 else TOL_HALF)


@pytest.mark.parametrize('table_grad', ['rows', 'atomics'])
def test_deformable_table_gradient_paths(table_grad):
    from mmdat.ops.deformable_attention import triton as da
    da.TABLE_GRAD = table_grad
    try:
        res = _deformable_case(1, 2, 1, 40, 60, 50, 32, (27, 27), F32, None,
                               512, device='cuda')
    finally:
        da.TABLE_GRAD = None
    _check(res, TOL)
    assert f'table_grad_{table_grad}' in da.LAUNCHES


@pytest.mark.parametrize('name', list(NA_CASES))
def test_neighborhood_triton_matches_float64(name):
    args = NA_CASES[name]
    res = _neighborhood_case(*args, device='cuda')
    _check(res, TOL if args[6] == F32 else TOL_HALF)


@pytest.mark.parametrize('kind', ['deformable', 'neighborhood'])
def test_module_triton_matches_float64(kind):
    _check(_module_case(kind, 'cuda'), TOL)


@pytest.mark.parametrize('impl', ['auto', 'triton', 'reference'])
def test_golden_on_cuda_fp32(impl):
    res = _golden_case('cuda', impl=impl)
    if impl == 'triton':
        assert 'deformable_attention:triton' in res['chosen'], res['chosen']
        assert 'neighborhood_attention:triton' in res['chosen'], \
            res['chosen']
    _check(res, 1e-4)


@pytest.mark.parametrize('impl', ['auto', 'triton'])
def test_golden_on_cuda_bf16(impl):
    _check(_golden_case('cuda', autocast=BF16, impl=impl), 5e-2)


def test_auto_is_triton_for_training_and_inference(monkeypatch):
    """What auto picks with MMDAT_AUTO_INCLUDE=triton (without it: the
    deformable reference within its score budget, see
    test_ops_dispatch)."""
    from mmdat.ops import dispatch
    monkeypatch.setenv('MMDAT_AUTO_INCLUDE', 'triton')
    model = DAT(arch=TINY_ARCH).cuda()
    x = torch.randn(1, 3, 64, 64, device='cuda')
    for grad in (False, True):
        with torch.set_grad_enabled(grad), dispatch.recording() as chosen:
            model(x)
        impls = {(op, impl) for _, op, _, impl, _ in chosen
                 if op.endswith('_attention')}
        assert impls == {('deformable_attention', 'triton'),
                         ('neighborhood_attention', 'triton')}, (grad, impls)


def test_compiles_once_per_configuration():
    """A second input size reuses the kernels compiled for the first."""
    from mmdat.ops.deformable_attention import triton as da
    from mmdat.ops.neighborhood_attention import triton as na
    kernels = [da._da_fwd, da._da_bwd_dq, da._da_bwd_dkdv, na._na_fwd,
               na._na_bwd_dq, na._na_bwd_dkdv]

    def compiled():
        caches = [getattr(k, 'device_caches', None) for k in kernels]
        if any(c is None for c in caches):
            pytest.skip('this triton keeps no device_caches')
        return [sum(len(v[0]) for v in c.values()) for c in caches]

    # the table-gradient variant follows the geometry (a constexpr): pinned
    # here so that only the sizes change
    da.TABLE_GRAD = 'atomics'
    try:
        _deformable_case(1, 2, 1, 17, 23, 40, 32, (13, 13), F32, None, 512,
                         device='cuda')
        _neighborhood_case(1, 2, 11, 13, 32, 7, F32, None, device='cuda')
        first = compiled()
        _deformable_case(2, 2, 1, 30, 41, 77, 32, (13, 13), F32, None, 512,
                         device='cuda')
        _neighborhood_case(2, 2, 19, 8, 32, 7, F32, None, device='cuda')
    finally:
        da.TABLE_GRAD = None
    assert compiled() == first


@pytest.mark.parametrize('dtype', [BF16, F16])
@pytest.mark.parametrize('impl', ['auto', 'triton'])
def test_autocast_finite_and_close(dtype, impl):
    torch.manual_seed(0)
    model = DAT(arch=TINY_ARCH, impl=impl).cuda()
    x = torch.randn(2, 3, 96, 128, device='cuda')
    ref = [o.detach() for o in model(x)]
    with torch.autocast('cuda', dtype=dtype):
        outs = model(x)
        loss = sum(o.float().square().mean() for o in outs)
    loss.backward()
    for o, r in zip(outs, ref):
        assert torch.isfinite(o).all()
        assert rel_err(o.float(), r) <= 5e-2
    assert all(torch.isfinite(p.grad).all() for p in model.parameters()
               if p.grad is not None)
