"""``torch.compile`` of the DAT backbone (CPU inductor; g++ needed).

* inductor compiles the backbone as one graph (``fullgraph=True``) whose
  outputs match eager at two input sizes (the second one recompiles), and
  one backward pass gives the same gradients;
* the whole backbone is one graph also for ``aot_eager``: the neighborhood
  attention's tile layout is computed in Python from the sizes, not with
  data-dependent tensor ops.

The inductor tests build a backbone of one block per stage (both attention
kinds, every stage and downsampling): inductor's compile time grows with the
blocks, and more of the same blocks check nothing new.

The compiles use ``dynamic=False`` (a new input size recompiles): with the
default automatic dynamic shapes, the recompile for the second size took
minutes on 2 CPU cores, and the backward pass failed in inductor with
``TypeError: cannot determine truth value of Relational`` (torch 2.14).

The inductor tests are ``slow`` (about a minute each on 2 cores);
``test_fullgraph`` and the graph-break check are quick.
"""
import shutil

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from mmdat.ops.deformable_attention import chunked
import mmdat.models.attentions.neighborhood as neighborhood
from conftest import TINY_ARCH, rel_err
from mmdat.models import DAT

pytestmark = pytest.mark.skipif(
    not hasattr(torch, 'compile'), reason='needs torch.compile')
SIZES = [(64, 64), (96, 64)]
#: one block per stage, N and D both present (inductor compile time)
COMPILE_ARCH = dict(TINY_ARCH, depths=[1, 1, 1, 1],
                    stage_spec=[['N'], ['D'], ['N'], ['D']])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import torch._inductor.config as inductor_config
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    old_threads = inductor_config.compile_threads
    old_caches = inductor_config.force_disable_caches
    inductor_config.compile_threads = 1  # no worker pool on a shared CPU
    # a compiled graph cached by an earlier checkout could hold its custom
    # ops' old output strides: compile what this checkout says
    inductor_config.force_disable_caches = True
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    inductor_config.compile_threads = old_threads
    inductor_config.force_disable_caches = old_caches
    torch.set_num_threads(n)


def _model(train=False, arch=TINY_ARCH):
    torch.manual_seed(0)
    model = DAT(arch=arch, drop_path_rate=0.0)
    return model.train(train)


def _backend():
    """inductor on CPU needs a C++ compiler."""
    if shutil.which('g++') is None and shutil.which('c++') is None:
        pytest.skip('CPU inductor needs a C++ compiler')
    return 'inductor'


@pytest.mark.slow
def test_inductor_forward_matches_eager():
    model = _model(arch=COMPILE_ARCH).eval()
    compiled = torch.compile(model, backend=_backend(), fullgraph=True,
                             dynamic=False)
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
    # a small chunk budget makes the chunked paths (the C++ one where the
    # one-pass kernels do not apply) run in several query chunks
    monkeypatch.setattr(chunked, 'CHUNK_ELEMENTS', 256)
    model = _model(train=True, arch=COMPILE_ARCH)
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


def test_fullgraph():
    """The backbone compiles as a single graph (no graph breaks)."""
    model = _model().eval()
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True,
                             dynamic=False)
    for hw in SIZES:
        x = torch.randn(1, 3, *hw)
        with torch.no_grad():
            for a, b in zip(compiled(x), model(x)):
                assert rel_err(a, b) < 1e-5


def test_neighborhood_attention_has_no_graph_break():
    """The tile layout is computed in Python from the sizes, so dynamo sees
    no data-dependent shapes."""
    na = neighborhood.NeighborhoodAttention(16, 2, kernel_size=3).eval()
    explain = torch._dynamo.explain(na)(torch.randn(1, 16, 8, 8))
    assert explain.graph_break_count == 0, explain.break_reasons


def _graph_ops(model, x, train):
    """The ops of the single graph dynamo captures for ``model(x)``."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend, fullgraph=True,
                             dynamic=False)
    with torch.set_grad_enabled(train):
        out = compiled(x)
    assert len(graphs) == 1
    return out, {str(n.target) for n in graphs[0].graph.nodes
                 if n.op == 'call_function'}


@pytest.mark.parametrize('train', [False, True])
def test_cpu_kernels_stay_in_the_compiled_graph(train):
    """Under torch.compile the C++ kernels are custom ops in the graph (not
    the gather fallback), and the result equals eager."""
    from conftest import require_impl
    require_impl('cpu')
    model = _model(train)
    x = torch.randn(1, 3, 64, 64)
    out, ops = _graph_ops(model, x, train)
    mmdat_ops = {t.split('.')[1] for t in ops if t.startswith('mmdat.')}
    na = ('neighborhood_attention_cpu' if train else
          'neighborhood_attention_cpu_inference')
    assert mmdat_ops == {'deformable_attention_cpu', na}, ops
    with torch.set_grad_enabled(train):
        for a, b in zip(out, model(x)):
            assert rel_err(a, b) < 1e-5
