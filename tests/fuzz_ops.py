"""Hypothesis drives every C++ op entry point (``torch.ops.mmdat.*``) with
random shapes, strides, dtypes, NaNs, out-of-range indices and
inconsistent arguments, on every instruction set this CPU runs: each call
either raises a RuntimeError with a message, or returns what a small
float64 PyTorch computation gives (NaN exactly where it gives NaN).

Not collected by pytest on its own (no ``test_`` prefix):
``test_ops_validation.py`` runs it in a subprocess, so that a crash (an
out-of-bounds read that segfaults) fails that test instead of killing the
test session. Run by hand: ``python -m pytest tests/fuzz_ops.py``.
"""
import math
from typing import Callable, List, Optional, Sequence

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mmdat.ops import library

EXAMPLES = 60
SETTINGS = settings(derandomize=True, deadline=None, max_examples=EXAMPLES,
                    database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))
FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 4e-2,
       torch.float16: 8e-3}


# --------------------------------------------------------------- references

def ref_bias(table, y0, fy, x0, fx):
    """float64 bias (Bg, h, R, W, Ns) of the lookup at rows y0 + fy, columns
    x0 + fx (batch b uses table group b % g)."""
    G, H, Ty, Tx = table.shape
    Bg = y0.shape[0]
    t = table.double()[torch.arange(Bg) % G]  # (Bg, H, Ty, Tx)
    yi = y0.long()[:, :, None, :]  # (Bg, R, 1, Ns)
    xi = x0.long()[:, None, :, :]  # (Bg, 1, W, Ns)
    wy = fy.double()[:, None, :, None, :]
    wx = fx.double()[:, None, None, :, :]
    bidx = torch.arange(Bg)[:, None, None, None]

    def at(dy, dx):  # (Bg, H, R, W, Ns)
        return t[bidx, :, yi + dy, xi + dx].permute(0, 4, 1, 2, 3)

    top = at(0, 0) + wx * (at(0, 1) - at(0, 0))
    bot = at(1, 0) + wx * (at(1, 1) - at(1, 0))
    return top + wy * (bot - top)


def ref_deform_attention(q, k, v, table, y0, fy, x0, fx, scale):
    """float64 out (B, M, h, c) of softmax(scale q k^T + bias) v; q
    (B, h, M, c), k/v (B*h, Ns, c)."""
    B, NH, M, c = q.shape
    G, hg = table.shape[:2]
    Ns = k.shape[1]
    bias = ref_bias(table, y0, fy, x0, fx)  # (B*G, hg, R, W, Ns)
    bias = bias.reshape(B, NH, M, Ns)
    s = scale * q.double() @ k.double().view(B, NH, Ns, c).transpose(2, 3)
    p = torch.softmax(s + bias, -1)
    return (p @ v.double().view(B, NH, Ns, c)).transpose(1, 2)


def window(n: int, ks: int) -> torch.Tensor:
    start = (torch.arange(n) - ks // 2).clamp(0, n - ks)
    return start[:, None] + torch.arange(ks)  # (n, ks)


def ref_neighborhood(q, k, v, rpb, ks, scale):
    """float64 (out (B, h, H, W, c), attn (B, h, H, W, ks*ks))."""
    B, NH, H, W, C = q.shape
    ri, ci = window(H, ks), window(W, ks)
    kw = k.double()[:, :, ri][:, :, :, :, ci]  # (B, h, H, ks, W, ks, C)
    vw = v.double()[:, :, ri][:, :, :, :, ci]
    logit = torch.einsum('bnijc,bniajdc->bnijad', q.double(), kw) * scale
    dy = ri - torch.arange(H)[:, None] + ks - 1
    dx = ci - torch.arange(W)[:, None] + ks - 1
    bias = rpb.double()[:, dy[:, None, :, None], dx[None, :, None, :]]
    p = torch.softmax((logit + bias).flatten(-2), -1).view_as(logit)
    out = torch.einsum('bnijad,bniajdc->bnijc', p, vw)
    return out, p.flatten(-2)


# ------------------------------------------------------------------ helpers

@st.composite
def layouts(draw, t: torch.Tensor) -> torch.Tensor:
    """``t`` as contiguous or as a non-contiguous copy with the same values
    (sliced with a step, laid out transposed, or with its first two dims
    swapped in memory)."""
    kind = draw(st.sampled_from(['contiguous', 'step', 'transposed',
                                 'swap01']))
    if kind == 'swap01' and t.dim() >= 3:  # unit last stride, others not
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if kind == 'step' and t.dim() >= 1:
        big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if kind == 'transposed' and t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    return t.contiguous()


def close(got: torch.Tensor, want: torch.Tensor, dtype,
          exact_nans: bool = True) -> None:
    """``got`` agrees with the float64 ``want``: NaN where it is NaN (with
    ``exact_nans=False``, for gradients of NaN inputs, only NaN somewhere
    when ``want`` has NaNs), else within the dtype's tolerance."""
    assert got.shape == want.shape, (got.shape, want.shape)
    g, w = got.double(), want.double()
    if exact_nans:
        assert torch.equal(g.isnan(), w.isnan()), \
            'NaNs differ from the reference'
    elif w.isnan().any():
        assert g.isnan().any(), 'NaN inputs gave no NaN gradients'
        return
    ok = ~w.isnan()
    if ok.any():
        scale = max(1.0, float(w[ok].abs().max()))
        err = float((g[ok] - w[ok]).abs().max()) / scale
        assert err <= TOL[dtype], f'error {err:.3g} > {TOL[dtype]} ({dtype})'


def expect(call: Callable, valid: bool, check: Callable, isa_ok: bool = True):
    """``call`` must raise a RuntimeError with a message when the input is
    invalid (or the instruction set lacks the op), else pass ``check``."""
    event('valid' if valid and isa_ok else 'invalid')
    if not valid or not isa_ok:
        with pytest.raises(RuntimeError) as info:
            call()
        assert str(info.value).strip(), 'error without a message'
        return
    check(call())


def isas() -> List[str]:
    assert library.cpu_ops_available(), library.unavailable_reason()
    return library.available_isas()


def use_isa(draw, prefer: Optional[str] = None) -> str:
    """Switch to a drawn instruction set (mostly ``prefer`` if given and
    available)."""
    names = isas()
    if prefer in names and draw(st.integers(0, 3)):
        name = prefer
    else:
        name = draw(st.sampled_from(names))
    library.set_isa(name)
    event(name)
    return name


@pytest.fixture(autouse=True)
def _restore_isa():
    yield
    library.set_isa('auto')


def corruption(draw, kinds: Sequence[str]) -> str:
    """'none' (valid input) for about half of the cases, else one of
    ``kinds``."""
    return 'none' if draw(st.integers(0, 9)) < 5 else draw(
        st.sampled_from(kinds))


CORRUPT_BIAS = ['nan', 'y0_high', 'y0_negative',
                'x0_high', 'y0_int64', 'fy_dtype', 'table_2d', 'table_1row',
                'groups', 'keys', 'table_int']


@st.composite
def bias_case(draw, dtype=None, valid: bool = False):
    """Bias inputs and what is wrong with them ('none': valid)."""
    G = draw(st.integers(1, 2))
    Bg = G * draw(st.integers(1, 2))
    H = draw(st.integers(1, 3))
    Ty, Tx = draw(st.integers(2, 5)), draw(st.integers(2, 5))
    R, W = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    Ns = draw(st.sampled_from([1, 3, 8, 17, 33]))
    dtype = dtype or draw(st.sampled_from(FLOATS))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(G, H, Ty, Tx, generator=gen).to(dtype)
    y0 = torch.randint(0, Ty - 1, (Bg, R, Ns), generator=gen).int()
    x0 = torch.randint(0, Tx - 1, (Bg, W, Ns), generator=gen).int()
    fy = torch.rand(Bg, R, Ns, generator=gen).to(dtype)
    fx = torch.rand(Bg, W, Ns, generator=gen).to(dtype)
    bad = 'none' if valid else corruption(draw, CORRUPT_BIAS)
    if bad == 'nan':
        which = draw(st.sampled_from(['table', 'fy', 'fx']))
        t = dict(table=table, fy=fy, fx=fx)[which]
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = math.nan
    elif bad == 'y0_high':
        y0.view(-1)[draw(st.integers(0, y0.numel() - 1))] = draw(
            st.sampled_from([Ty - 1, Ty, 1000, 2**31 - 1]))
    elif bad == 'y0_negative':
        y0.view(-1)[draw(st.integers(0, y0.numel() - 1))] = draw(
            st.sampled_from([-1, -2**31]))
    elif bad == 'x0_high':
        x0.view(-1)[draw(st.integers(0, x0.numel() - 1))] = Tx - 1
    elif bad == 'y0_int64':
        y0 = y0.long()
    elif bad == 'fy_dtype':
        fy = fy.to(torch.float64 if dtype != torch.float64 else
                   torch.float32)
    elif bad == 'table_2d':
        table = table[0, 0]
    elif bad == 'table_1row':
        table = table[:, :, :1]
    elif bad == 'groups':
        table = torch.cat([table, table[:1]]) if Bg % (G + 1) else table[:0]
    elif bad == 'keys':
        x0, fx = x0[:, :, :-1], fx[:, :, :-1]
        if Ns == 1:
            x0, fx = x0[:0], fx[:0]  # batch disagrees instead
    elif bad == 'table_int':
        table = table.to(torch.int32)
    args = [draw(layouts(t)) for t in (table, y0, fy, x0, fx)]
    return args, bad


# -------------------------------------------------------------------- tests

@SETTINGS
@given(data=st.data())
def test_deform_bias(data):
    use_isa(data.draw)
    args, bad = data.draw(bias_case())
    dtype = args[0].dtype
    valid = bad in ('none', 'nan')

    def check(out):
        assert out.dtype == dtype
        close(out, ref_bias(*args), dtype)

    expect(lambda: torch.ops.mmdat.deform_bias(*args), valid, check)


@SETTINGS
@given(data=st.data())
def test_deform_bias_out(data):
    use_isa(data.draw)
    args, bad = data.draw(bias_case())
    table, y0, fy, x0, fx = args
    valid = bad in ('none', 'nan')
    n = y0.shape[0] * y0.shape[1] * table.shape[1] * x0.shape[1] * \
        y0.shape[2] if valid else 7
    out_kind = corruption(data.draw, ['short', 'strided', 'dtype'])
    dtype = table.dtype if valid else torch.float32
    buf = torch.full((2 * n + 3, ), math.nan, dtype=dtype)
    out = buf[:n]
    if out_kind == 'short':
        out = buf[:max(0, n - 1)] if n else buf[:1]
    elif out_kind == 'strided':
        out = buf[:2 * n:2]
    elif out_kind == 'dtype':
        out = out.to(torch.float64 if dtype != torch.float64 else
                     torch.float32)
    ok = valid and (out_kind == 'none' or (out_kind == 'strided' and n <= 1))

    def check(res):
        assert res.data_ptr() == out.data_ptr()
        close(res.view(-1), ref_bias(*args).reshape(-1), dtype)
        assert buf[n:].isnan().all(), 'wrote past the end of out'

    expect(lambda: torch.ops.mmdat.deform_bias_out(*args, out), ok, check)


def test_deform_bias_out_rejects_aliased_out():
    """An ``out`` that overlaps the indices could rewrite them while the
    kernel reads them: rejected."""
    assert library.cpu_ops_available()
    table = torch.randn(1, 1, 3, 3)
    idx = torch.zeros(1, 2, 4, dtype=torch.int32)
    frac = torch.rand(1, 2, 4)
    n = 1 * 1 * 2 * 2 * 4
    raw = torch.zeros(n + idx.numel(), dtype=torch.float32)
    y0 = raw[:idx.numel()].view(torch.int32).view(1, 2, 4)
    with pytest.raises(RuntimeError, match='overlaps'):
        torch.ops.mmdat.deform_bias_out(table, y0, frac, idx, frac, raw[:n])


@SETTINGS
@given(data=st.data())
def test_deform_bias_backward(data):
    use_isa(data.draw)
    args, bad = data.draw(bias_case(dtype=data.draw(
        st.sampled_from([torch.float32, torch.float64]))))
    table, y0, fy, x0, fx = args
    valid = bad in ('none', 'nan')
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    if valid:
        shape = (y0.shape[0], table.shape[1], y0.shape[1], x0.shape[1],
                 y0.shape[2])
    else:
        shape = (3, )
    grad = torch.randn(*shape, generator=gen).to(table.dtype)
    grad_kind = corruption(data.draw, ['short', 'int'])
    if grad_kind == 'short':
        grad = grad.flatten()[1:]
    elif grad_kind == 'int':
        grad = grad.to(torch.int32)
    ok = valid and grad_kind == 'none'

    def check(res):
        g_table, g_fy, g_fx = res
        leaves = [t.detach().double().requires_grad_()
                  for t in (table, fy, fx)]
        want = ref_bias(leaves[0], y0, leaves[1], x0, leaves[2])
        wt, wy, wx = torch.autograd.grad(want, leaves, grad.double())
        G = table.shape[0]
        Bg, R = y0.shape[:2]
        got_t = g_table.double().view(Bg // G, G, R,
                                      *table.shape[1:]).sum((0, 2))
        close(got_t, wt, table.dtype, exact_nans=False)
        close(g_fy, wy, table.dtype, exact_nans=False)
        close(g_fx, wx, table.dtype, exact_nans=False)

    expect(lambda: torch.ops.mmdat.deform_bias_backward(grad, *args), ok,
           check)


CORRUPT_FUSED = ['nan_q', 'nan_k', 'c_not_16',
                 'M', 'heads', 'kt_shape', 'v_shape', 'double', 'index',
                 'no_keys']


@st.composite
def fused_case(draw):
    # mostly valid bias inputs: the other arguments are tested here
    bias_ok = draw(st.integers(0, 3)) > 0
    (table, y0, fy, x0, fx), bad_bias = draw(
        bias_case(torch.float32, valid=bias_ok))
    G, hg = table.shape[:2]
    Bg, R, Ns = y0.shape
    W = x0.shape[1]
    B, NH, M = Bg // G, G * hg, R * W
    c = draw(st.sampled_from([16, 32]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    q = torch.randn(B, NH, M, c, generator=gen)
    k = torch.randn(B * NH, Ns, c, generator=gen)
    v = torch.randn(B * NH, Ns, c, generator=gen)
    bad = corruption(draw, CORRUPT_FUSED)
    if bad_bias not in ('none', 'nan'):
        bad = 'bias:' + bad_bias
    elif bad_bias == 'nan':
        bad = 'nan_bias'
    if bad == 'nan_q':
        q.view(-1)[draw(st.integers(0, q.numel() - 1))] = math.nan
    elif bad == 'nan_k':
        k.view(-1)[draw(st.integers(0, k.numel() - 1))] = math.nan
    elif bad == 'c_not_16':
        q, k, v = q[..., :8], k[..., :8], v[..., :8]
    elif bad == 'M':
        q = q[:, :, :-1] if M > 1 else torch.cat([q, q], 2)
    elif bad == 'heads':
        q = torch.cat([q, q[:, :1]], 1)
    elif bad == 'kt_shape':
        k = k[:, :-1] if Ns > 1 else k[:, :0]
    elif bad == 'v_shape':
        v = v[:-1] if B * NH > 1 else v[:, :, :0]
    elif bad == 'double':
        q = q.double()
    elif bad == 'index':
        y0 = y0.contiguous().clone()
        y0.view(-1)[0] = table.shape[2] - 1
    elif bad == 'no_keys':
        k, v, y0, fy, x0, fx = (t[..., :0, :] if t.dim() == 3 and t is k
                                or t is v else t[..., :0]
                                for t in (k, v, y0, fy, x0, fx))
    q = draw(layouts(q))
    scale = draw(st.sampled_from([0.25, 1.0]))
    valid = bad in ('none', 'nan_q', 'nan_k', 'nan_bias')
    event(bad)
    return (q, k, v, table, y0, fy, x0, fx, scale), bad, valid


@settings(SETTINGS, max_examples=2 * EXAMPLES)
@given(data=st.data())
def test_deform_attention_infer(data):
    isa = use_isa(data.draw, 'avx512')
    (q, k, v, table, y0, fy, x0, fx, scale), bad, valid = data.draw(
        fused_case())
    kt = k.transpose(1, 2)  # (B*h, c, Ns), any strides
    call = lambda: torch.ops.mmdat.deform_attention_infer(  # noqa: E731
        q, kt, v, table, y0, fy, x0, fx, scale)

    def check(out):
        close(out, ref_deform_attention(q, k, v, table, y0, fy, x0, fx,
                                        scale), torch.float32)

    expect(call, valid, check, isa_ok=isa == 'avx512')


@settings(SETTINGS, max_examples=2 * EXAMPLES)
@given(data=st.data())
def test_deform_attention_backward(data):
    isa = use_isa(data.draw, 'avx512')
    (q, k, v, table, y0, fy, x0, fx, scale), bad, valid = data.draw(
        fused_case())
    if valid:
        B, NH, M, c = q.shape
        out = ref_deform_attention(q, k, v, table, y0, fy, x0, fx,
                                   scale).float()
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(
            data.draw(st.integers(0, 99))))
    else:
        out = grad = torch.zeros(1, 1, 1, 16)
    if valid and data.draw(st.integers(0, 4)) == 0:
        grad = grad[:, :-1] if grad.shape[1] > 1 else grad[..., :0]
        valid = False
    call = lambda: torch.ops.mmdat.deform_attention_backward(  # noqa: E731
        grad, q, k, v, out, table, y0, fy, x0, fx, scale)

    def check(res):
        dq, dk, dv, dtab, dfy, dfx = res
        leaves = [t.detach().double().requires_grad_()
                  for t in (q, k, v, table, fy, fx)]
        want = ref_deform_attention(leaves[0], leaves[1], leaves[2],
                                    leaves[3], y0, leaves[4], x0, leaves[5],
                                    scale)
        w = torch.autograd.grad(want, leaves, grad.double())
        B, NH, M, c = q.shape
        G, hg = table.shape[:2]
        got = (dq.view(B, NH, M, c), dk, dv,
               dtab.view(B, G, hg, *table.shape[2:]).sum(0),
               dfy.view(B, G, hg, *fy.shape[1:]).sum(2).flatten(0, 1),
               dfx.view(B, G, hg, *fx.shape[1:]).sum(2).flatten(0, 1))
        for a, b in zip(got, w):
            close(a, b, torch.float32, exact_nans=False)

    expect(call, valid, check, isa_ok=isa == 'avx512')


CORRUPT_NA = ['nan_q', 'nan_v', 'nan_rpb', 'small',
              'ks0', 'rpb_shape', 'rpb_heads', 'kv_shape', 'kv_dtype',
              'int', 'rank']


@st.composite
def na_case(draw):
    ks = draw(st.sampled_from([1, 2, 3, 5]))
    B, NH = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    H = draw(st.integers(ks, ks + 4))
    W = draw(st.integers(ks, ks + 20))
    C = draw(st.sampled_from([1, 4, 16, 20, 65]))
    # float32 half of the time: the AVX-512 kernel's dtype
    dtype = (torch.float32 if draw(st.booleans()) else
             draw(st.sampled_from(FLOATS)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    q, k, v = (torch.randn(B, NH, H, W, C, generator=gen).to(dtype)
               for _ in range(3))
    rpb = torch.randn(NH, 2 * ks - 1, 2 * ks - 1, generator=gen)
    bad = corruption(draw, CORRUPT_NA)
    if bad.startswith('nan_'):
        t = dict(nan_q=q, nan_v=v, nan_rpb=rpb)[bad]
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = math.nan
    elif bad == 'small':
        ks = max(H, W) + 1
        rpb = torch.zeros(NH, 2 * ks - 1, 2 * ks - 1)
    elif bad == 'ks0':
        ks = draw(st.sampled_from([0, -1]))
    elif bad == 'rpb_shape':
        rpb = rpb[:, 1:]
    elif bad == 'rpb_heads':
        rpb = torch.cat([rpb, rpb])
    elif bad == 'kv_shape':
        k = k[..., :-1] if C > 1 else k[:, :, :-1]
    elif bad == 'kv_dtype':
        v = v.to(torch.float64 if dtype != torch.float64 else torch.float32)
    elif bad == 'int':
        q, k, v = (t.to(torch.int32) for t in (q, k, v))
    elif bad == 'rank':
        q, k, v = (t[0] for t in (q, k, v))
    q, k, v = (draw(layouts(t)) for t in (q, k, v))
    scale = draw(st.sampled_from([0.125, 1.0]))
    valid = bad in ('none', 'nan_q', 'nan_v', 'nan_rpb')
    return (q, k, v, rpb, ks, scale), valid


@SETTINGS
@given(data=st.data())
def test_neighborhood_attention(data):
    use_isa(data.draw, 'avx512')
    args, valid = data.draw(na_case())
    inference = data.draw(st.booleans())
    op = (torch.ops.mmdat.neighborhood_attention_inference if inference else
          torch.ops.mmdat.neighborhood_attention)

    def check(res):
        out, attn = (res, None) if inference else res
        event(f'{args[0].dtype} C={args[0].shape[-1]} ks={args[4]}')
        want, want_attn = ref_neighborhood(*args)
        close(out, want, args[0].dtype)
        if attn is not None:
            close(attn, want_attn, args[0].dtype)

    expect(lambda: op(*args), valid, check)


@SETTINGS
@given(data=st.data())
def test_neighborhood_attention_backward(data):
    use_isa(data.draw, 'avx512')
    (q, k, v, rpb, ks, scale), valid = data.draw(na_case())
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    if valid:
        _, attn = ref_neighborhood(q, k, v, rpb, ks, scale)
        attn = attn.to(q.dtype)
        grad = torch.randn(q.shape, generator=gen).to(q.dtype)
        bad = corruption(data.draw, ['attn', 'grad'])
        if bad == 'attn':
            attn = attn[..., 1:]
        elif bad == 'grad':
            grad = grad[..., :0] if q.shape[-1] > 1 else grad[:, :0]
        valid = bad == 'none'
    else:
        attn = grad = torch.zeros(1)

    def check(res):
        dq, dk, dv, drpb = res
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v, rpb)]
        out, _ = ref_neighborhood(*leaves, ks, scale)
        want = torch.autograd.grad(out, leaves, grad.double())
        for got, w in zip((dq, dk, dv, drpb), want):
            close(got, w, q.dtype, exact_nans=False)

    expect(lambda: torch.ops.mmdat.neighborhood_attention_backward(
        grad, q, k, v, attn, ks, scale), valid, check)


def test_every_isa_was_driven():
    """The ISAs the tests above switch between are all there is here."""
    assert set(isas()) >= {'scalar'}
