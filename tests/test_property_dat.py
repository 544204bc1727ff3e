"""Property-based tests of the DAT backbone (hypothesis).

Random small but valid architectures - widths a multiple of the heads, heads a
multiple of the groups, 1-2 blocks per stage of random letters ``N``/``D``,
deformable strides 1-4 and offset kernels 1-5 (every combination is accepted:
the offset conv pads ``ks // 2``, or 0 when ``ks == stride``, and a map
smaller than an unpadded kernel is zero-padded so that one key is still
sampled), neighborhood kernels 3/5/7, with or without position bias, LPU and
ConvFFN, DAT++ (clamped) or tanh-bounded offsets, pre-training sizes down to
32 (1x1 bias tables in stage 4) - on random inputs of 1..48 x 1..48, batch 1-2,
in float64:

* the outputs have the stage widths and ``ceil``-halved sizes and are finite;
* ``impl='auto'`` (the C++ kernels) and ``impl='chunked'`` agree with
  ``impl='reference'`` within 1e-6 relative;
* samples of a batch are processed independently;
* the query chunking (forced with a small ``CHUNK_ELEMENTS``)
  changes nothing, gradients included.

``MMDAT_HYPOTHESIS_EXAMPLES`` raises the number of examples for a longer local
search (default 25 per test, the file runs in well under a minute).
"""
import os
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import rel_err
from mmdat.ops.deformable_attention import chunked as deformable_chunked
from mmdat.models import DAT
from mmdat.models.attentions import DeformableAttention

MAX_EXAMPLES = int(os.environ.get('MMDAT_HYPOTHESIS_EXAMPLES', '25'))
SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
TOL = 1e-6


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """Single-threaded torch for this module (restored afterwards): small
    ops on a shared CPU are slower with more threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@st.composite
def stage(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from(
        [c for c in (2, 4, 8, 16) if 8 <= heads * c <= 32]))
    groups = draw(st.sampled_from([g for g in (1, 2, 4) if heads % g == 0]))
    depth = draw(st.integers(1, 2))
    letters = draw(st.lists(st.sampled_from('ND'), min_size=depth,
                            max_size=depth))
    return dict(dims=heads * head_dim, heads=heads, groups=groups,
                depths=depth, stage_spec=letters,
                strides=draw(st.integers(1, 4)),
                ksizes=draw(st.integers(1, 5)),
                nat_ksizes=draw(st.sampled_from([3, 5, 7])),
                use_pes=draw(st.booleans()),
                use_lpus=draw(st.booleans()),
                use_dwc_mlps=draw(st.booleans()),
                offset_range_factor=draw(st.sampled_from([-1, -1, 0, 2])))


@st.composite
def archs(draw):
    stages = [draw(stage()) for _ in range(4)]
    arch = {k: [s[k] for s in stages] for k in stages[0]}
    arch['dim_stem'] = draw(st.sampled_from([8, 16]))
    arch['img_size'] = draw(st.sampled_from([32, 64, 224]))
    return arch


@st.composite
def cases(draw):
    arch = draw(archs())
    out_indices = draw(st.lists(st.integers(0, 3), min_size=1, max_size=4,
                                unique=True))
    B = draw(st.integers(1, 2))
    H = draw(st.integers(1, 48))
    W = draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**16))
    # None: the default chunk size (one chunk at these sizes); small values
    # split the queries of the fast deformable path into row chunks
    chunk = draw(st.sampled_from([None, None, 1, 64, 4096]))
    # auto: the C++ kernels (whose chunked path serves float64 too)
    impl = draw(st.sampled_from(['auto', 'chunked']))
    return arch, tuple(sorted(out_indices)), (B, 3, H, W), seed, chunk, impl


def chunking(chunk):
    if chunk is None:
        chunk = deformable_chunked.CHUNK_ELEMENTS
    return mock.patch.object(deformable_chunked, 'CHUNK_ELEMENTS', chunk)


def expected_shapes(arch, out_indices, shape):
    B, _, H, W = shape
    shapes, h, w = [], H, W
    for i in range(4):
        for _ in range(2 if i == 0 else 1):
            h, w = -(-h // 2), -(-w // 2)
        if i in out_indices:
            shapes.append((B, arch['dims'][i], h, w))
    return shapes


def build_pair(arch, out_indices, seed, impl='auto'):
    torch.manual_seed(seed)
    auto = DAT(arch=arch, out_indices=out_indices, impl=impl)
    ref = DAT(arch=arch, out_indices=out_indices, impl='reference')
    ref.load_state_dict(auto.state_dict())
    return auto.double().eval(), ref.double().eval()


@SETTINGS
@given(cases())
def test_shapes_finite_and_impls_agree(case):
    arch, out_indices, shape, seed, chunk, impl = case
    auto, ref = build_pair(arch, out_indices, seed, impl)
    x = torch.randn(shape, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), chunking(chunk):
        out_a = auto(x)
        out_r = ref(x)
    expected = expected_shapes(arch, out_indices, shape)
    assert [tuple(o.shape) for o in out_a] == expected
    assert [tuple(o.shape) for o in out_r] == expected
    for i, (a, r) in enumerate(zip(out_a, out_r)):
        assert torch.isfinite(a).all(), (i, arch, shape)
        assert torch.isfinite(r).all(), (i, arch, shape)
        assert rel_err(a, r) <= TOL, (i, rel_err(a, r), arch, shape)
    if shape[0] == 2:
        # each sample alone gives its slice of the batched output
        with torch.no_grad(), chunking(chunk):
            single = auto(x[1:2])
        for a, s in zip(out_a, single):
            assert rel_err(a[1:2], s) <= 1e-10, (arch, shape)


@SETTINGS
@given(archs(), st.integers(1, 48), st.integers(1, 48))
def test_deformable_sampling_positions_in_range(arch, H, W):
    """Sampling positions are finite; clamped to [-1, 1] for DAT++ offsets;
    the key grid is the offset conv's output grid."""

    torch.manual_seed(0)
    model = DAT(arch=arch, out_indices=(3, )).double().eval()
    seen = []

    def hook(module, inputs, output):
        x = inputs[0]
        pos = module.sampling_positions(module.proj_q(x))
        conv = module.conv_offset[0]
        ks, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        h, w = x.shape[-2:]
        if p == 0:  # zero-padded up to the kernel when smaller
            h, w = max(h, ks), max(w, ks)
        hk = (h + 2 * p - ks) // s + 1
        wk = (w + 2 * p - ks) // s + 1
        assert pos.shape == (x.shape[0] * module.num_groups, hk, wk, 2)
        assert torch.isfinite(pos).all()
        if module.offset_range_factor < 0:
            assert pos.abs().max() <= 1.0
        seen.append(pos.shape)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, DeformableAttention)]
    with torch.no_grad():
        model(torch.randn(1, 3, H, W, dtype=torch.float64))
    for h in handles:
        h.remove()
    n_d = sum(spec.count('D') for spec in arch['stage_spec'])
    assert len(seen) == n_d


@settings(max_examples=max(5, MAX_EXAMPLES // 2), deadline=None,
          database=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_gradients_agree(case):
    """Input and parameter gradients of both implementations agree (the
    chunked fast path recomputes its chunks in backward)."""
    arch, out_indices, shape, seed, chunk, impl = case
    auto, ref = build_pair(arch, out_indices, seed, impl)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, generator=gen)
    grads = []
    for model in (auto, ref):
        xi = x.clone().requires_grad_()
        with chunking(chunk):
            outs = model(xi)
        gen.manual_seed(seed + 1)
        loss = sum((o * torch.randn(o.shape, dtype=o.dtype, generator=gen)
                    ).sum() for o in outs)
        loss.backward()
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    names = ['input'] + [n for n, _ in auto.named_parameters()]
    # gradients that are 0 analytically (e.g. proj_k biases: softmax is
    # shift-invariant) are rounding noise: compare against the largest one
    scale = max(float(g.abs().max()) for g in grads[1] if g is not None)
    for name, ga, gr in zip(names, *grads):
        if ga is None or gr is None:  # unused parameter in both
            assert ga is None and gr is None, name
            continue
        err = float((ga - gr).abs().max()) / max(scale, 1e-300)
        assert err <= 1e-9, (name, err, arch, shape)


def test_no_off_with_tanh_range_fast_equals_reference():
    torch.manual_seed(0)
    kw = dict(dim=8, num_heads=2, num_groups=1, stride=1, offset_kernel=3,
              rpe_size=7, offset_range_factor=2, use_pe=True, no_off=True)
    fast = DeformableAttention(**kw, impl='auto').double().eval()
    ref = DeformableAttention(**kw, impl='reference').double().eval()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(1, 8, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        assert fast.sampling_positions(fast.proj_q(x)).max() > 1
        assert rel_err(fast(x), ref(x)) <= TOL
