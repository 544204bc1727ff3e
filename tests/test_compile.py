"""``torch.compile`` of the DAT backbone (CPU inductor; g++ needed).

* inductor outputs match eager at two input sizes (the second one
  recompiles), and one backward pass gives the same gradients;
* the known graph break: the fast neighborhood attention builds its tile
  layout with ``torch.unique(dim=0)`` / ``torch.nonzero``
  (``mmdat/models/attentions/neighborhood.py``, ``_tile_layout``), whose
  output shapes depend on data, so ``fullgraph=True`` fails and the default
  mode splits the model into many graphs (and recompiles ``DATStage.block``
  per block index and size until dynamo's recompile limit, after which the
  blocks run eagerly). ``_tile_layout`` only depends on Python ints; the
  same layout computed in plain Python (below) removes every graph break.

The compiles use ``dynamic=False`` (a new input size recompiles): with the
default automatic dynamic shapes, the recompile for the second size took
minutes on 2 CPU cores, and the backward pass failed in inductor with
``TypeError: cannot determine truth value of Relational`` (torch 2.14).

The inductor tests are ``slow`` (about 1-4 minutes each on 2 shared cores);
``test_fullgraph*`` / ``test_graph_breaks*`` are quick.
"""
import inspect
import shutil

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import mmdat.models.attentions.deformable as deformable
import mmdat.models.attentions.neighborhood as neighborhood
from conftest import TINY_ARCH, rel_err
from mmdat.models import DAT

pytestmark = pytest.mark.skipif(
    not hasattr(torch, 'compile'), reason='needs torch.compile')
SIZES = [(64, 64), (96, 64)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import torch._inductor.config as inductor_config
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    old_threads = inductor_config.compile_threads
    inductor_config.compile_threads = 1  # no worker pool on a shared CPU
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    inductor_config.compile_threads = old_threads
    torch.set_num_threads(n)


def _model(train=False):
    torch.manual_seed(0)
    model = DAT(arch=TINY_ARCH, drop_path_rate=0.0)
    return model.train(train)


def _tile_layout_python(n, ks, T, device):
    """``neighborhood._tile_layout`` in plain Python (no data-dependent
    tensor ops), same return values; the proposed fix."""
    nt = -(-n // T)
    L = min(T + ks - 1, n)
    starts = [min(max(i - ks // 2, 0), n - ks) for i in range(n)]
    qidx = [[min(t * T + j, n - 1) for j in range(T)] for t in range(nt)]
    kidx = [[min(starts[q[0]], n - L) + j for j in range(L)] for q in qidx]
    patterns, tiles = {}, []
    for t in range(nt):
        rel = tuple(
            tuple(k - q + ks - 1 if starts[q] <= k < starts[q] + ks else -1
                  for k in kidx[t]) for q in qidx[t])
        if rel not in patterns:
            patterns[rel] = len(patterns)
            tiles.append([])
        tiles[patterns[rel]].append(t)
    return (torch.tensor(qidx, device=device),
            torch.tensor(kidx, device=device),
            [torch.tensor(p, device=device) for p in patterns],
            [torch.tensor(t, device=device) for t in tiles])


def _backend():
    """inductor on CPU needs a C++ compiler."""
    if shutil.which('g++') is None and shutil.which('c++') is None:
        pytest.skip('CPU inductor needs a C++ compiler')
    return 'inductor'


@pytest.mark.slow
def test_inductor_forward_matches_eager():
    model = _model().eval()
    compiled = torch.compile(model, backend=_backend(), dynamic=False)
    for hw in SIZES:
        x = torch.randn(1, 3, *hw)
        with torch.no_grad():
            ref = model(x)
            out = compiled(x)
        assert len(out) == len(ref) == 4
        assert counters['stats']['unique_graphs'] > 0  # compiled something
        for a, b in zip(out, ref):
            assert a.shape == b.shape
            assert rel_err(a, b) < 1e-4


@pytest.mark.slow
def test_inductor_backward_matches_eager(monkeypatch):
    # a small chunk budget makes the deformable attention's fast path run
    # in several query chunks (4 in stage 1, 2 in stage 2) with activation
    # checkpointing, also under compile
    monkeypatch.setattr(deformable, '_CHUNK_ELEMENTS', 256)
    model = _model(train=True)
    x = torch.randn(1, 3, *SIZES[0])
    w = [torch.randn_like(o) for o in model(x)]

    def grads(fn):
        model.zero_grad(set_to_none=True)
        loss = sum((o * wi).sum() for o, wi in zip(fn(x), w))
        loss.backward()
        return loss.detach(), {n: p.grad.clone()
                               for n, p in model.named_parameters()
                               if p.grad is not None}

    loss_ref, g_ref = grads(model)
    loss_c, g_c = grads(
        torch.compile(model, backend=_backend(), dynamic=False))
    assert rel_err(loss_c, loss_ref) < 1e-4
    assert g_c.keys() == g_ref.keys()
    assert len(g_ref) == len(list(model.parameters()))
    # relative per tensor; tensors whose true gradient is zero (the key
    # biases: softmax is shift invariant) hold rounding noise only and are
    # compared against the largest gradient instead
    g_max = max(float(g.abs().max()) for g in g_ref.values())
    for name in g_ref:
        a, b = g_c[name].double(), g_ref[name].double()
        scale = max(float(b.abs().max()), 1e-3 * g_max)
        assert float((a - b).abs().max()) / scale < 1e-4, name


def test_tile_layout_python_is_the_same_layout():
    for n in (1, 3, 7, 8, 9, 14, 16, 23, 56):
        for ks in (3, 7):
            if n < ks:
                continue
            a = neighborhood._tile_layout(n, ks, 8, 'cpu')
            b = _tile_layout_python(n, ks, 8, 'cpu')
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            # same (tiles -> pattern) map; the patterns' order may differ
            pa = {tuple(t.tolist()): p for p, t in zip(a[2], a[3])}
            pb = {tuple(t.tolist()): p for p, t in zip(b[2], b[3])}
            assert pa.keys() == pb.keys()
            assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.xfail(
    strict=True, raises=torch._dynamo.exc.TorchDynamoException,
    reason='graph break: torch.unique / torch.nonzero in '
    'neighborhood._tile_layout (data-dependent output shape)')
def test_fullgraph():
    model = _model().eval()
    compiled = torch.compile(model, backend='eager', fullgraph=True)
    with torch.no_grad():
        compiled(torch.randn(1, 3, *SIZES[0]))


def test_fullgraph_with_python_tile_layout(monkeypatch):
    """With the layout in plain Python the backbone is a single graph."""
    monkeypatch.setattr(neighborhood, '_tile_layout', _tile_layout_python)
    model = _model().eval()
    # fullgraph=True: any graph break raises
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True,
                             dynamic=False)
    for hw in SIZES:
        x = torch.randn(1, 3, *hw)
        with torch.no_grad():
            for a, b in zip(compiled(x), model(x)):
                assert rel_err(a, b) < 1e-5


@pytest.mark.slow
def test_inductor_fullgraph_with_python_tile_layout(monkeypatch):
    """The proposed fix: inductor compiles the whole backbone as one graph
    and matches eager."""
    monkeypatch.setattr(neighborhood, '_tile_layout', _tile_layout_python)
    model = _model().eval()
    compiled = torch.compile(model, backend=_backend(), fullgraph=True,
                             dynamic=False)
    x = torch.randn(1, 3, *SIZES[0])
    with torch.no_grad():
        for a, b in zip(compiled(x), model(x)):
            assert rel_err(a, b) < 1e-4


def test_graph_breaks_are_in_tile_layout():
    """Where the neighborhood attention breaks the graph: the
    ``torch.unique`` / ``torch.nonzero`` calls of ``_tile_layout``."""
    lines, first = inspect.getsourcelines(neighborhood._tile_layout)
    na = neighborhood.NeighborhoodAttention(16, 2, kernel_size=3).eval()
    explain = torch._dynamo.explain(na)(torch.randn(1, 16, 8, 8))
    assert explain.graph_break_count > 0
    for reason in explain.break_reasons:
        frame = reason.user_stack[-1]
        assert frame.filename.endswith('neighborhood.py'), reason
        assert first <= frame.lineno < first + len(lines), reason
        assert 'Dynamic shape operator' in reason.reason, reason
