"""The C++ ops check what they read: out-of-range indices, wrong shapes,
dtypes, devices and aliased outputs give a RuntimeError that says what is
wrong, NaN inputs give NaN outputs, and random inputs of every kind
(``fuzz_ops.py``, run here in a subprocess so that a crash fails this test
visibly) give an error or the right result on every instruction set."""
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from mmdat.ops import library


@pytest.fixture(autouse=True)
def _ops():
    if not library.cpu_ops_expected():
        pytest.skip('no compiled kernels here and no compiler to build them')
    # a build that should work but did not is a failure, not a skip
    assert library.cpu_ops_available(), library.unavailable_reason()
    yield
    library.set_isa('auto')


def _bias_args(Ty=4, Tx=4, Ns=5):
    table = torch.randn(1, 2, Ty, Tx)
    y0 = torch.randint(0, Ty - 1, (1, 3, Ns), dtype=torch.int32)
    x0 = torch.randint(0, Tx - 1, (1, 2, Ns), dtype=torch.int32)
    return [table, y0, torch.rand(1, 3, Ns), x0, torch.rand(1, 2, Ns)]


@pytest.mark.parametrize('isa', ['avx512', 'avx2', 'scalar'])
@pytest.mark.parametrize('where,value', [(1, 1000), (1, 3), (1, -1),
                                         (3, 3), (3, -2**31)])
def test_index_out_of_the_table_is_an_error(isa, where, value):
    """The issue's example (y0 = 1000 read past a 16-float table) and the
    edges: the lower corner must be in [0, T-2]."""
    if isa not in library.available_isas():
        pytest.skip(f'this CPU cannot run {isa}')
    library.set_isa(isa)
    args = _bias_args()
    args[where] = args[where].clone()
    args[where][0, 1, 2] = value
    name = 'y0' if where == 1 else 'x0'
    with pytest.raises(RuntimeError, match=rf'{name} must be in \[0, 2\]'):
        torch.ops.mmdat.deform_bias(*args)
    with pytest.raises(RuntimeError, match=rf'{name} must be in \[0, 2\]'):
        torch.ops.mmdat.deform_bias_backward(torch.ones(1, 2, 3, 2, 5),
                                             *args)
    args[where][0, 1, 2] = 2  # the last valid corner
    assert torch.ops.mmdat.deform_bias(*args).isfinite().all()


def test_messages_name_the_problem():
    args = _bias_args()
    with pytest.raises(RuntimeError, match='table must be float32'):
        torch.ops.mmdat.deform_bias(args[0].long(), *args[1:])
    with pytest.raises(RuntimeError, match='at least one group'):
        torch.ops.mmdat.deform_bias(args[0][:0], *args[1:])
    with pytest.raises(RuntimeError, match='kernel size must be at least 1'):
        q = torch.zeros(1, 1, 4, 4, 8)
        torch.ops.mmdat.neighborhood_attention(q, q, q, torch.zeros(1, 1, 1),
                                               0, 1.0)
    q = torch.zeros(1, 2, 5, 5, 4)
    attn = torch.zeros(1, 2, 5, 5, 9)
    with pytest.raises(RuntimeError, match=r'attn must be \(B, h, H, W'):
        torch.ops.mmdat.neighborhood_attention_backward(q, q, q, q,
                                                        attn[..., :8], 3, 1.)
    with pytest.raises(RuntimeError, match='smaller than the kernel'):
        torch.ops.mmdat.neighborhood_attention_backward(q, q, q, q, attn, 7,
                                                        1.)
    with pytest.raises(RuntimeError, match='grad must be shaped like q'):
        torch.ops.mmdat.neighborhood_attention_backward(q[..., :2], q, q, q,
                                                        attn, 3, 1.)


def test_nan_inputs_give_nan_outputs():
    """Per instruction set: a NaN in one query's features makes that
    query's output NaN and nothing else."""
    torch.manual_seed(0)
    for isa in library.available_isas():
        library.set_isa(isa)
        q = torch.randn(1, 2, 9, 24, 16)
        q[0, 1, 4, 20, 3] = math.nan
        k, v = torch.randn_like(q), torch.randn_like(q)
        rpb = torch.randn(2, 5, 5)
        for op in (torch.ops.mmdat.neighborhood_attention_inference,
                   lambda *a: torch.ops.mmdat.neighborhood_attention(*a)[0]):
            out = op(q, k, v, rpb, 3, 0.25)
            nan = out.isnan().any(-1)
            assert nan[0, 1, 4, 20] and nan.sum() == 1, isa
        table, y0, fy, x0, fx = _bias_args(Ns=20)
        fy[0, 1, 7] = math.nan
        bias = torch.ops.mmdat.deform_bias(table, y0, fy, x0, fx)
        assert bias[:, :, 1, :, 7].isnan().all()
        assert bias.isnan().sum() == bias[:, :, 1, :, 7].numel(), isa
        if library.fused_deform_attention_available():
            B, NH, M, c, Ns = 1, 2, 6, 16, 20
            qf = torch.randn(B, NH, M, c)
            qf[0, 0, 4, 5] = math.nan
            kt = torch.randn(B * NH, c, Ns)
            vf = torch.randn(B * NH, Ns, c)
            out = torch.ops.mmdat.deform_attention_infer(
                qf, kt, vf, table.view(1, 2, 4, 4), y0, torch.rand(1, 3, Ns),
                x0, torch.rand(1, 2, Ns), 0.25)  # (B, M, h, c)
            nan = out.isnan().any(-1)
            assert nan[0, 4, 0] and nan.sum() == 1, isa


def test_fused_kernels_follow_the_instruction_set():
    for isa in library.available_isas():
        library.set_isa(isa)
        assert library.isa() == isa
        has = bool(torch.ops.mmdat.has_fused_deform_attention())
        assert has == (isa == 'avx512')
        assert library.fused_deform_attention_available() == has
        if not has:
            with pytest.raises(RuntimeError, match='needs the AVX-512'):
                torch.ops.mmdat.deform_attention_infer(
                    torch.zeros(1, 1, 2, 16), torch.zeros(1, 16, 1),
                    torch.zeros(1, 1, 16), torch.zeros(1, 1, 2, 2),
                    torch.zeros(1, 1, 1, dtype=torch.int32),
                    torch.zeros(1, 1, 1),
                    torch.zeros(1, 2, 1, dtype=torch.int32),
                    torch.zeros(1, 2, 1), 1.0)


def test_random_inputs_never_crash():
    """fuzz_ops.py (hypothesis, derandomized) in a subprocess: a segfault
    or abort shows up here as a failure with the signal's name."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, '-m', 'pytest', str(ROOT / 'tests' / 'fuzz_ops.py'),
         '-q', '-p', 'no:cacheprovider', '-x'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode >= 0, (
        f'crashed: {signal.Signals(-proc.returncode).name}\n{out}')
    assert proc.returncode == 0, out
    assert ' passed' in proc.stdout and 'skipped' not in proc.stdout, out
