"""Degenerate input sizes: every (H, W) in 1..40 x 1..40, and long thin inputs.

For ``TINY_ARCH`` (all 1600 sizes) and the official ``mini`` arch
(``backbone/mini`` of ``manifests.json``; a 211-size subset that reaches every
combination of stage sizes of the grid), with ``impl='auto'`` and
``impl='reference'``:

* the dense backbone (``out_indices=(0, 1, 2, 3)``) returns finite maps with
  ``dims[i]`` channels and the spatial size of stage ``i``: the stem is two
  ``k3 s2 p1`` convolutions and each down-sampling one more, so every step is
  ``n -> ceil(n / 2)`` (stage 0: ``ceil(ceil(H/2)/2)``);
* mmpretrain's ``ImageClassifier`` (DAT ``out_indices=(3,)`` +
  ``GlobalAveragePooling`` + ``LinearClsHead``, same trunk weights) returns
  finite logits that are the head applied to the pooled stage-4 map;
* both implementations agree.

Covering all 1600 sizes with one forward each would take about a minute per
model and implementation on a shared CPU. Instead the stem
(``patch_proj``) is run on each of the 1600 inputs, its outputs are grouped by
their (identical) spatial size - inputs with equal ``ceil(H/4), ceil(W/4)``
reach stage 0 at the same size - and each group goes through the rest of the
real ``DAT.forward`` as one batch (the stem is replaced by a module that
returns the stacked stem outputs). Samples are independent in eval mode, so
this is the same computation; a sample of sizes (all the corners included) is
also run one by one through the untouched model and must agree. The long thin
inputs 1333x32, 32x1333 and 8x2000 are run as they are.
"""
import time
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn

from conftest import TINY_ARCH, rel_err
import mmdat  # noqa: F401  (registers DAT in mmpretrain)
from mmdat.models import DAT
from mmdat.models.attentions import DeformableAttention, NeighborhoodAttention
from mmdat.models.attentions.common import normalized_grid, reference_grid
from mmdat.ops.deformable_attention.reference import bias_reference

IMPLS = ('auto', 'chunked', 'reference')  # auto: the C++ kernels on CPU
GRID = [(H, W) for H in range(1, 41) for W in range(1, 41)]
LARGE = [(1333, 32), (32, 1333), (8, 2000)]
# run one by one through the untouched model to validate the batched replay
SAMPLE = [(1, 1), (1, 2), (2, 1), (1, 40), (40, 1), (40, 40), (2, 3), (3, 2),
          (4, 4), (5, 5), (7, 33), (33, 7), (8, 8), (9, 16), (17, 1),
          (1, 29), (31, 32), (32, 31)]
# The official mini arch (wider, more heads and groups) gets a subset that
# still reaches every combination of stage sizes the grid produces (one
# batch per stage-0 size, i.e. per (ceil(H/4), ceil(W/4))): the smallest and
# the largest input of each class, plus the sample.
MINI_SIZES = sorted({(H, W) for H, W in GRID
                     if (H % 4 == 1 and W % 4 == 1) or (H % 4 == 0
                                                        and W % 4 == 0)}
                    | set(SAMPLE))
SIZES = {'tiny': GRID, 'mini': MINI_SIZES}
NUM_CLASSES = 10
TOL_IMPL = 1e-4  # auto vs reference, float32 (the contract's tolerance)
TOL_REPLAY = 1e-5  # batched replay vs one-by-one forward, float32


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """Single-threaded torch for this module (restored afterwards): small
    ops on a shared CPU are slower with more threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stage_sizes(H, W):
    """Spatial size of the four stage outputs: ceil-halving per conv."""
    sizes = []
    h, w = H, W
    for i in range(4):
        for _ in range(2 if i == 0 else 1):
            h, w = -(-h // 2), -(-w // 2)
        sizes.append((h, w))
    return sizes


def test_stage_sizes_formula():
    assert stage_sizes(1, 1) == [(1, 1)] * 4
    assert stage_sizes(224, 224) == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert stage_sizes(197, 263) == [(50, 66), (25, 33), (13, 17), (7, 9)]
    assert stage_sizes(8, 2000) == [(2, 500), (1, 250), (1, 125), (1, 63)]
    # matches the convolution arithmetic floor((n + 2 - 3) / 2) + 1
    for n in range(1, 100):
        assert -(-n // 2) == (n + 2 - 3) // 2 + 1


class _Replay(nn.Module):
    """Stands in for ``patch_proj``: returns precomputed stem outputs."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out


@contextmanager
def replayed_stem(backbone, stem_out):
    orig = backbone.patch_proj
    backbone.patch_proj = _Replay(stem_out)
    try:
        yield
    finally:
        backbone.patch_proj = orig


def _arch(name, manifests):
    if name == 'tiny':
        return dict(TINY_ARCH)
    return dict(manifests['backbone/mini']['official_kwargs'])


def build_models(arch):
    """Dense backbones and classifiers for both impls, sharing one set of
    weights."""
    from mmpretrain.registry import MODELS

    torch.manual_seed(0)
    dense = {}
    for impl in IMPLS:
        dense[impl] = DAT(arch=arch, out_indices=(0, 1, 2, 3),
                          impl=impl).eval()
    sd = dense['auto'].state_dict()
    for impl in IMPLS[1:]:
        dense[impl].load_state_dict(sd)
    cls = {}
    for impl in IMPLS:
        model = MODELS.build(dict(
            type='ImageClassifier',
            _scope_='mmpretrain',  # whatever scope earlier tests left set
            backbone=dict(type='DAT', arch=arch, out_indices=(3, ),
                          impl=impl),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=NUM_CLASSES,
                      in_channels=arch['dims'][-1]))).eval()
        own = model.backbone.state_dict()
        model.backbone.load_state_dict({k: sd[k] for k in own}, strict=True)
        if impl != 'auto':
            model.head.load_state_dict(cls['auto'].head.state_dict())
        cls[impl] = model
    return dense, cls


def check_outputs(outs, logits, dims, H, W, B, where):
    assert len(outs) == 4, where
    for i, (o, (h, w)) in enumerate(zip(outs, stage_sizes(H, W))):
        assert tuple(o.shape) == (B, dims[i], h, w), (where, i, o.shape)
        assert torch.isfinite(o).all(), (where, i)
    assert tuple(logits.shape) == (B, NUM_CLASSES), where
    assert torch.isfinite(logits).all(), where


def check_head(cls, out3, logits, where):
    """logits == fc(mean over H, W of the stage-4 map)."""
    expected = cls.head.fc(out3.mean(dim=(2, 3)))
    assert rel_err(logits, expected) <= 1e-5, where


@pytest.mark.parametrize('arch_name', ['tiny', 'mini'])
def test_all_sizes_1_to_40(arch_name, manifests):
    t0 = time.perf_counter()
    arch = _arch(arch_name, manifests)
    dims = arch['dims']
    dense, cls = build_models(arch)
    gen = torch.Generator().manual_seed(1)
    sizes = SIZES[arch_name]
    inputs = {hw: torch.randn(1, 3, *hw, generator=gen) for hw in sizes}

    with torch.no_grad():
        groups = {}
        for hw, x in inputs.items():
            stem = dense['auto'].patch_proj(x)
            assert tuple(stem.shape[-2:]) == stage_sizes(*hw)[0], hw
            groups.setdefault(tuple(stem.shape[-2:]), []).append((hw, stem))
        assert len(groups) == 100  # ceil(H/4), ceil(W/4) in 1..10
        replay = {}  # (H, W) -> {impl: (outs, logits)} for the sample
        sample = set(SAMPLE)
        for members in groups.values():
            batch = torch.cat([s for _, s in members])
            B = batch.shape[0]
            dummy = torch.zeros(B, 3, 1, 1)
            res = {}
            for impl in IMPLS:
                with replayed_stem(dense[impl], batch):
                    outs = dense[impl](dummy)
                with replayed_stem(cls[impl].backbone, batch):
                    logits = cls[impl](dummy, mode='tensor')
                H, W = members[0][0]
                where = (arch_name, impl, [hw for hw, _ in members])
                # every member of the group has these stage sizes
                assert all(stage_sizes(*hw) == stage_sizes(H, W)
                           for hw, _ in members), where
                check_outputs(outs, logits, dims, H, W, B, where)
                check_head(cls[impl], outs[3], logits, where)
                res[impl] = (outs, logits)
            for impl in IMPLS[:-1]:
                for a, b in zip(res[impl][0], res['reference'][0]):
                    assert rel_err(a, b) <= TOL_IMPL, (arch_name, members[0][0])
                assert rel_err(res[impl][1],
                               res['reference'][1]) <= TOL_IMPL, impl
            for j, (hw, _) in enumerate(members):
                if hw in sample:
                    replay[hw] = {
                        impl: ([o[j:j + 1] for o in res[impl][0]],
                               res[impl][1][j:j + 1])
                        for impl in IMPLS
                    }

        # the batched replay is the model's own one-by-one forward
        assert set(replay) == sample
        for hw in SAMPLE:
            for impl in IMPLS:
                outs = dense[impl](inputs[hw])
                logits = cls[impl](inputs[hw], mode='tensor')
                check_outputs(outs, logits, dims, *hw, 1, (hw, impl))
                r_outs, r_logits = replay[hw][impl]
                for a, b in zip(outs, r_outs):
                    assert rel_err(b, a) <= TOL_REPLAY, (arch_name, hw, impl)
                assert rel_err(r_logits, logits) <= TOL_REPLAY, (hw, impl)
    print(f'\n{arch_name}: {len(sizes)} sizes x {len(IMPLS)} impls x '
          f'(backbone + classifier) in {time.perf_counter() - t0:.1f}s')


@pytest.mark.parametrize('arch_name', ['tiny', 'mini'])
def test_long_thin_inputs(arch_name, manifests):
    arch = _arch(arch_name, manifests)
    dense, cls = build_models(arch)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for hw in LARGE:
            x = torch.randn(1, 3, *hw, generator=gen)
            res = {}
            for impl in IMPLS:
                outs = dense[impl](x)
                logits = cls[impl](x, mode='tensor')
                check_outputs(outs, logits, arch['dims'], *hw, 1,
                              (arch_name, hw, impl))
                check_head(cls[impl], outs[3], logits, (hw, impl))
                res[impl] = (outs, logits)
            for impl in IMPLS[:-1]:
                for a, b in zip(res[impl][0], res['reference'][0]):
                    assert rel_err(a, b) <= TOL_IMPL, (arch_name, hw)
                assert rel_err(res[impl][1],
                               res['reference'][1]) <= TOL_IMPL, impl


# --------------------------------------------------------------------------
# 1-pixel-high / -wide maps: the single position is the centre
# --------------------------------------------------------------------------
def test_single_position_is_the_centre():
    """A 1-pixel-high (or -wide) map has its single query row and its single
    reference row at the centre, 0, of the normalised [-1, 1] range.

    The official code computes the query grid as ``arange(n) / (n - 1) * 2 - 1``
    and the reference points as ``linspace(0.5, n - 0.5, n) / (n - 1) * 2 - 1``;
    for ``n == 1`` both divide by zero (0/0 = NaN for the queries, hence NaN
    bias and NaN output). mmdat deliberately departs from that (see README,
    "Known defect of the official code, not reproduced").
    """
    official_query = torch.arange(1.) / (1 - 1) * 2 - 1
    assert torch.isnan(official_query).all()
    for fn in (normalized_grid, reference_grid):
        g = fn(1, torch.float64, torch.device('cpu'))
        assert g.tolist() == [0.0]
    # n >= 2 is the official formula
    assert normalized_grid(3, torch.float64, 'cpu').tolist() == [-1., 0., 1.]
    assert reference_grid(3, torch.float64, 'cpu').tolist() == [-.5, .5, 1.5]


@pytest.mark.parametrize('hw', [(1, 9), (9, 1), (1, 1)])
@pytest.mark.parametrize('stride', [1, 4])
def test_deformable_attention_on_one_pixel_maps(hw, stride):
    """On a map with H == 1 (W == 1) the sampled keys have one row (column)
    whose reference position is 0, i.e. ``pos_y = clamp(offset_y)``; with the
    offsets switched off the keys sit exactly on the centre row. The query row
    is the centre too: its position bias equals that of the middle row of a
    3-row map. Both implementations give finite, equal outputs."""
    torch.manual_seed(0)
    H, W = hw
    kw = dict(dim=8, num_heads=2, num_groups=2, stride=stride,
              offset_kernel=3, rpe_size=7)
    x = torch.randn(1, 8, H, W, dtype=torch.float64)
    mods = {}
    for impl in IMPLS:
        mods[impl] = DeformableAttention(**kw, impl=impl).double().eval()
    for impl in IMPLS[:-1]:
        mods[impl].load_state_dict(mods['reference'].state_dict())
    m = mods['auto']
    with torch.no_grad():
        q = m.proj_q(x)
        pos = m.sampling_positions(q)
        offset = m.conv_offset(q.reshape(2, 4, H, W)).permute(0, 2, 3, 1)
        assert pos.shape[:3] == offset.shape[:3]
        ref = torch.stack(torch.meshgrid(
            reference_grid(pos.shape[1], q.dtype, q.device),
            reference_grid(pos.shape[2], q.dtype, q.device), indexing='ij'),
            dim=-1)
        torch.testing.assert_close(pos, (offset + ref).clamp(-1, 1))
        if H == 1:
            assert pos.shape[1] == 1
            torch.testing.assert_close(pos[..., 0],
                                       offset[..., 0].clamp(-1, 1))
        if W == 1:
            assert pos.shape[2] == 1
            torch.testing.assert_close(pos[..., 1],
                                       offset[..., 1].clamp(-1, 1))
        outs = {impl: mods[impl](x) for impl in IMPLS}
        for o in outs.values():
            assert o.shape == x.shape and torch.isfinite(o).all()
        for impl in IMPLS[:-1]:
            assert rel_err(outs[impl], outs['reference']) <= 1e-10, impl

        # queries of a 1-row map are at y = 0 = the middle row of 3 rows
        if H == 1:
            p4 = pos.reshape(1, 2, -1, 2)
            bias1 = bias_reference(p4, m.rpe_table, 1, W)  # (B, h, W, Ns)
            bias3 = bias_reference(p4, m.rpe_table, 3, W).reshape(
                *bias1.shape[:2], 3, W, -1)[:, :, 1]
            torch.testing.assert_close(bias1, bias3.reshape(bias1.shape))

    no_off = DeformableAttention(**kw, no_off=True).double().eval()
    with torch.no_grad():
        pos = no_off.sampling_positions(no_off.proj_q(x))
    if H == 1:
        assert (pos[..., 0] == 0).all()
    if W == 1:
        assert (pos[..., 1] == 0).all()


@pytest.mark.parametrize('hw', [(1, 12), (12, 1), (1, 1), (2, 1)])
def test_neighborhood_attention_on_one_pixel_maps(hw):
    """Maps smaller than the kernel are zero-padded bottom/right, attended and
    cropped back: finite, and both implementations agree."""
    torch.manual_seed(0)
    mods = {impl: NeighborhoodAttention(8, 2, 7, impl=impl).double().eval()
            for impl in IMPLS}
    for impl in IMPLS[:-1]:
        mods[impl].load_state_dict(mods['reference'].state_dict())
    x = torch.randn(1, 8, *hw, dtype=torch.float64)
    with torch.no_grad():
        outs = {impl: mods[impl](x) for impl in IMPLS}
    for o in outs.values():
        assert o.shape == x.shape and torch.isfinite(o).all()
    for impl in IMPLS[:-1]:
        assert rel_err(outs[impl], outs['reference']) <= 1e-10, impl
