"""The Triton kernels (impl='triton'), checked without a GPU: under the
Triton interpreter (``TRITON_INTERPRET=1``) on CPU tensors.

The interpreter must be switched on before the kernels are defined, and it
must not leak into the other tests, so the checks run in a child process:
this file is also the worker (``python tests/test_triton.py ops|models``),
which prints one JSON line of errors against float64 references and of the
kernel launches it counted. Skipped only when triton cannot be imported.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAVE_TRITON = importlib.util.find_spec('triton') is not None
pytestmark = pytest.mark.skipif(not HAVE_TRITON,
                                reason='triton not importable')

TOL = 1e-5  # float32 kernels against float64 references, relative to max
TOL_HALF = 3e-2  # bfloat16 / float16 inputs


# ----------------------------------------------------------------- worker
def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _query_grid(n, dtype):
    import torch
    if n == 1:
        return torch.zeros(1, dtype=dtype)
    return torch.arange(n, dtype=dtype) / (n - 1) * 2 - 1


def _deformable_ref(q, k, v, pos, table, H, W, scale):
    """float64 deformable attention with the spec's gather formulation
    (lower corner clamped to size - 2, a 1-wide table repeated): written
    here, independently of the code under test."""
    import torch
    B, h, M, c = q.shape
    g, Ns = pos.shape[1], pos.shape[2]
    hg = h // g
    attn = torch.einsum('bhmc,bhnc->bhmn', q, k) * scale
    if table is not None:
        qg = torch.stack(torch.meshgrid(_query_grid(H, q.dtype),
                                        _query_grid(W, q.dtype),
                                        indexing='ij'), -1).reshape(M, 2)
        disp = (qg.view(1, 1, M, 1, 2) - pos.view(B, g, 1, Ns, 2)) * 0.5
        Ty, Tx = table.shape[1:]
        uy = (disp[..., 0] + 1) * 0.5 * (Ty - 1)
        ux = (disp[..., 1] + 1) * 0.5 * (Tx - 1)
        # the corner as float32 arithmetic finds it: where u is an integer
        # in float64 (positions on the border and grid-aligned queries), the
        # kernels' float32 u may fall on the other side; both corners give
        # the same value and the two one-sided derivatives
        y0 = _corner32(pos[..., 0], H, Ty).repeat_interleave(W, 2)
        x0 = _corner32(pos[..., 1], W, Tx).repeat(1, 1, H, 1)
        fy = (uy - y0).repeat_interleave(hg, 1)
        fx = (ux - x0).repeat_interleave(hg, 1)
        tab = table.repeat(1, 2 if Ty == 1 else 1, 2 if Tx == 1 else 1)
        Txp = tab.shape[2]
        flat = tab.reshape(h, -1)
        y0 = y0.long().repeat_interleave(hg, 1)
        x0 = x0.long().repeat_interleave(hg, 1)
        heads = torch.arange(h).view(1, h, 1, 1)

        def at(dy, dx):
            return flat[heads, (y0 + dy) * Txp + x0 + dx]

        top = at(0, 0) * (1 - fx) + at(0, 1) * fx
        bot = at(1, 0) * (1 - fx) + at(1, 1) * fx
        attn = attn + top * (1 - fy) + bot * fy
    return attn.softmax(-1) @ v


def _corner32(p, n, size):
    """``min(floor(u), size - 2)`` with ``u`` computed in float32 in the
    kernels' order of operations: ``(i * step - 1 - p + 2) * (size-1)/4``."""
    import torch
    p = p.detach().float()
    step, off = (2.0 / (n - 1), 1.0) if n > 1 else (0.0, 0.0)
    qs = (torch.arange(n, dtype=torch.float32) * step - off).view(1, 1, n, 1)
    u = (qs - p.unsqueeze(2) + 2.0) * (0.25 * (size - 1))
    return u.floor().clamp(0, max(size - 2, 0)).double()  # (B, g, n, Ns)


def _neighborhood_ref(q, k, v, rpb, ks, scale):
    """float64 neighborhood attention, one query at a time (spec: window
    start clamp(i - k//2, 0, n - k), bias rpb[ki - i + k - 1, ...])."""
    import torch
    B, h, H, W, c = q.shape
    out = torch.empty_like(q)
    for i in range(H):
        si = min(max(i - ks // 2, 0), H - ks)
        for j in range(W):
            sj = min(max(j - ks // 2, 0), W - ks)
            kw = k[:, :, si:si + ks, sj:sj + ks].reshape(B, h, -1, c)
            vw = v[:, :, si:si + ks, sj:sj + ks].reshape(B, h, -1, c)
            logits = torch.einsum('bhc,bhnc->bhn', q[:, :, i, j], kw) * scale
            if rpb is not None:
                logits = logits + rpb[:, si - i + ks - 1:si - i + 2 * ks - 1,
                                      sj - j + ks - 1:sj - j + 2 * ks - 1
                                      ].reshape(1, h, -1)
            out[:, :, i, j] = torch.einsum('bhn,bhnc->bhc',
                                           logits.softmax(-1), vw)
    return out


def _compare(fn, ref, inputs, names, dtype, seed, device='cpu',
             skip=None):
    """Run ``fn`` on ``inputs`` (on ``device``, cast to ``dtype`` where
    floating, the positions and tables kept float32) and ``ref`` on float64
    CPU copies; errors of the output and of every input gradient.
    ``skip``: ``{name: bool mask}`` of gradient entries left out."""
    import torch
    torch.manual_seed(seed)
    ours = [None if t is None else
            (t.to(device, dtype) if i < 3 else t.to(device, torch.float32)
             ).requires_grad_() for i, t in enumerate(inputs)]
    theirs = [None if t is None else
              t.detach().cpu().double().requires_grad_() for t in ours]
    out = fn(*ours)
    grad = torch.randn(out.shape, dtype=torch.float64)
    out.backward(grad.to(out.device, out.dtype))
    expect = ref(*theirs)
    expect.backward(grad)
    errs = {'out': _rel(out.detach().cpu(), expect.detach()),
            'out_dtype_ok': float(out.dtype == dtype)}
    for name, a, b in zip(names, ours, theirs):
        if a is not None and (a.grad is not None or b.grad is not None):
            ga, gb = a.grad.cpu(), b.grad
            if skip and name in skip:
                keep = ~skip[name]
                ga, gb = ga[keep], gb[keep]
                errs[f'skipped_{name}'] = float(skip[name].sum())
            errs[f'd{name}'] = _rel(ga, gb)
    return errs


def _kinks(pos, n, size):
    """Which position coordinates (``pos[..., axis]``, float32 values) put
    some query of an ``n``-long axis within rounding of an interior integer
    ``u`` of a ``size`` table: a kink of the bilinear interpolation, where
    the derivative is one-sided and which side the kernel takes depends on
    the last bit of its float32 arithmetic (a GPU contracts ``i * step - 1``
    into one fused multiply-add; the interpreter rounds twice)."""
    import torch
    q = _query_grid(n, torch.float64).view(1, 1, n, 1)
    u = (q - pos.double().unsqueeze(2) + 2) * (0.25 * (size - 1))
    near = ((u - u.round()).abs() < 1e-4) & (u.round() >= 1) & (
        u.round() <= size - 2)
    return near.any(2)  # (B, g, Ns)


def _deformable_case(B, h, g, H, W, Ns, c, table, dtype, blocks, split,
                     seed=0, device='cpu'):
    import torch

    from mmdat.ops.deformable_attention import triton as da
    gen = torch.Generator().manual_seed(seed)
    # q, k as transposed views (d stride != 1), v contiguous
    q = torch.randn(B, h, c, H * W, generator=gen).transpose(2, 3)
    k = torch.randn(B, Ns, h, c, generator=gen).transpose(1, 2)
    v = torch.randn(B, h, Ns, c, generator=gen)
    pos = torch.rand(B, g, Ns, 2, generator=gen) * 2 - 1
    # positions on the table border: the four corners and the edges
    border = torch.tensor([[1., 1.], [-1., -1.], [1., -1.], [-1., 1.],
                           [1., 0.3], [-0.7, -1.]])
    pos[:, :, :min(Ns, 6)] = border[:min(Ns, 6)]
    tab = None if table is None else torch.randn(h, *table, generator=gen)
    skip = None
    if device != 'cpu' and tab is not None:
        # compiled kernels: _corner32 reproduces the interpreter's rounding,
        # not a GPU's fused multiply-adds; at a kink either one-sided
        # derivative is right, so those position gradients are left out
        skip = {'pos': torch.stack([_kinks(pos[..., 0], H, tab.shape[1]),
                                    _kinks(pos[..., 1], W, tab.shape[2])],
                                   -1)}
    da.BLOCK_OVERRIDE = blocks
    da._MIN_PROGRAMS = split
    try:
        return _compare(
            lambda q, k, v, p, t: da.deformable_attention_triton(
                q, k, v, p, t, H=H, W=W, scale=c ** -0.5),
            lambda q, k, v, p, t: _deformable_ref(q, k, v, p, t, H, W,
                                                  c ** -0.5),
            (q, k, v, pos, tab), ('q', 'k', 'v', 'pos', 'table'), dtype,
            seed, device, skip)
    finally:
        da.BLOCK_OVERRIDE, da._MIN_PROGRAMS = None, 512


def _neighborhood_case(B, h, H, W, c, ks, dtype, blocks, bias=True, seed=0,
                       device='cpu'):
    import torch

    from mmdat.ops.deformable_attention import triton as da
    from mmdat.ops.neighborhood_attention import triton as na
    gen = torch.Generator().manual_seed(seed)
    # strided views of one qkv tensor, as the module hands them over
    qkv = torch.randn(B, H, W, 3, h, c, generator=gen)
    q, k, v = (t.detach() for t in qkv.permute(3, 0, 4, 1, 2, 5).unbind(0))
    rpb = torch.randn(h, 2 * ks - 1, 2 * ks - 1, generator=gen) if bias \
        else None
    da.BLOCK_OVERRIDE = blocks
    try:
        return _compare(
            lambda q, k, v, r: na.neighborhood_attention_triton(
                q, k, v, r, kernel_size=ks, scale=c ** -0.5),
            lambda q, k, v, r: _neighborhood_ref(q, k, v, r, ks, c ** -0.5),
            (q, k, v, rpb), ('q', 'k', 'v', 'rpb'), dtype, seed, device)
    finally:
        da.BLOCK_OVERRIDE = None


def _op_cases():
    import torch
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    return {
        # 45 queries = 2 full 16-tiles + a partial one; 37 keys = 2 blocks
        # + 5; 2 groups of 2 heads; query range split over 3 programs
        'da_tiles_groups': lambda: _deformable_case(
            2, 4, 2, 5, 9, 37, 16, (7, 9), f32, (16, 16), 512),
        # H = 1, a 1-wide table axis, head dim 24 (padded to 32), no split
        'da_h1_thin_table': lambda: _deformable_case(
            1, 2, 1, 1, 7, 5, 24, (1, 5), f32, (16, 16), 1),
        # W = 1, no table (no bias)
        'da_w1_no_table': lambda: _deformable_case(
            1, 2, 2, 6, 1, 20, 32, None, f32, (16, 16), 512),
        # the block sizes a GPU gets; 70 keys = one 64-block + 6
        'da_default_blocks': lambda: _deformable_case(
            1, 2, 1, 3, 5, 70, 16, (5, 5), f32, None, 512),
        # a map wider than the table: the table gradient is reduced per
        # query row before its atomics
        'da_wide_rows': lambda: _deformable_case(
            1, 2, 1, 3, 40, 23, 16, (5, 7), f32, (16, 16), 512),
        'da_bf16': lambda: _deformable_case(
            1, 2, 2, 4, 5, 19, 32, (5, 7), bf16, (16, 16), 512),
        # 99 queries in 16-tiles (partial last); k = 3
        'na_tiles': lambda: _neighborhood_case(
            1, 2, 9, 11, 16, 3, f32, (16, 16)),
        # H = 5 <= 2k - 1: the middle key row is in every query's window
        # (more query rows per key than k + k//2)
        'na_small_map': lambda: _neighborhood_case(
            1, 2, 5, 7, 16, 3, f32, (16, 16)),
        # H == kernel size, head dim 24, GPU blocks, 2 batches
        'na_k5_default_blocks': lambda: _neighborhood_case(
            2, 1, 5, 13, 24, 5, f32, None),
        'na_fp16_no_bias': lambda: _neighborhood_case(
            1, 1, 4, 6, 16, 3, f16, (16, 16), bias=False),
    }


def _module_pair(kind):
    import torch

    from mmdat.models.attentions import (DeformableAttention,
                                         NeighborhoodAttention)
    torch.manual_seed(0)
    if kind == 'deformable':
        # 2 groups, stride 2 on a 7 x 9 map: 4 x 5 = 20 keys
        args = (32, 4, 2, 2, 3, 4)
        cls = DeformableAttention
        x = torch.randn(2, 32, 7, 9)
    else:
        args = (32, 2, 3)
        cls = NeighborhoodAttention
        x = torch.randn(1, 32, 6, 9)
    ours = cls(*args, impl='triton')
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith(('rpe_table', 'rpb')):
                p.normal_()
            if n.startswith('conv_offset.3'):
                p.mul_(20)  # offsets that move the keys by cells
    ref = cls(*args, impl='reference').double()
    ref.load_state_dict(ours.state_dict())
    return ours, ref, x


def _module_case(kind, device='cpu'):
    from mmdat.ops.deformable_attention import triton as da
    ours, ref, x = _module_pair(kind)
    ours = ours.to(device)
    before = sum(da.LAUNCHES.values())
    xo = x.clone().to(device).requires_grad_()
    xr = x.double().requires_grad_()
    out, expect = ours(xo), ref(xr)
    g = expect.detach().clone().normal_()
    out.backward(g.to(device, out.dtype))
    expect.backward(g)
    errs = {'out': _rel(out.detach().cpu(), expect.detach()),
            'dx': _rel(xo.grad.cpu(), xr.grad),
            'launches': sum(da.LAUNCHES.values()) - before}
    # a gradient that is zero in exact arithmetic (proj_k's bias: it shifts
    # every key's logit of a query alike) is compared with the largest
    floor = 1e-2 * max(float(p.grad.abs().max()) for p in ref.parameters())
    for (n, a), (_, b) in zip(ours.named_parameters(),
                              ref.named_parameters()):
        scale = max(float(b.grad.abs().max()), floor)
        errs[f'd{n}'] = float((a.grad.cpu().double() - b.grad).abs().max()
                              ) / scale
    return errs


def _golden_case(device='cpu', autocast=None, impl='triton'):
    """The mini backbone with golden weights against the official outputs
    (the smallest golden input; all of them on a GPU)."""
    import contextlib

    import torch

    from mmdat.models import DAT
    from mmdat.ops import dispatch
    sys.path.insert(0, str(ROOT / 'tests'))
    from conftest import DATA, load_script
    fill = load_script(DATA / 'fill.py', 'dat_fill')
    golden = torch.load(DATA / 'golden_mini.pt', weights_only=False)
    with open(DATA / 'manifests.json') as f:
        shapes = json.load(f)['backbone/mini']['state_dict_shapes']
    arch = dict(golden['backbone']['official_kwargs'])
    model = DAT(arch=arch, out_indices=(0, 1, 2, 3), impl=impl).eval()
    model.load_state_dict(fill.fill_official(
        shapes, seed=golden['backbone']['fill_seed']))
    model.to(device)
    cases = golden['backbone']['cases']
    if device == 'cpu':  # the interpreter is slow: the smallest input
        cases = [min(cases, key=lambda c: c['input_shape'][2] *
                     c['input_shape'][3])]
    amp = (torch.autocast(device, dtype=autocast) if autocast
           else contextlib.nullcontext())
    errs = {}
    with torch.no_grad(), dispatch.recording() as chosen, amp:
        for case in cases:
            x = fill.make_input(case['input_shape'], case['input_seed'])
            outs = model(x.to(device))
            tag = 'x'.join(map(str, case['input_shape']))
            errs.update({f'out{i}_{tag}': _rel(o.float().cpu(), r)
                         for i, (o, r) in enumerate(zip(outs,
                                                        case['outputs']))})
    errs['chosen'] = sorted({f'{op}:{impl}' for _, op, _, impl, _ in chosen})
    return errs


def _model_cases():
    return {
        'module_deformable': lambda: _module_case('deformable'),
        'module_neighborhood': lambda: _module_case('neighborhood'),
        'golden_backbone': _golden_case,
    }


def _work(group: str) -> dict:
    import time

    import torch
    torch.set_num_threads(1)
    from mmdat.ops.deformable_attention import triton as da
    assert da.interpreted(), 'worker needs TRITON_INTERPRET=1'
    cases = _op_cases() if group == 'ops' else _model_cases()
    results = {}
    for name, case in cases.items():
        before = dict(da.LAUNCHES)
        t0 = time.time()
        try:
            res = case()
        except Exception as exc:  # noqa: BLE001 - reported to the test
            res = {'error': f'{type(exc).__name__}: {exc}'}
        res['seconds'] = round(time.time() - t0, 1)
        res['launched'] = {k: v - before.get(k, 0)
                           for k, v in da.LAUNCHES.items()
                           if v != before.get(k, 0)}
        results[name] = res
    return results


# ------------------------------------------------------------------ tests
def _run_worker(group: str) -> dict:
    env = dict(os.environ, TRITON_INTERPRET='1', OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join(
                   [str(ROOT), os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run([sys.executable, __file__, group], cwd=str(ROOT),
                          env=env, capture_output=True, text=True,
                          timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{')]
    assert proc.returncode == 0 and lines, (
        f'worker {group} failed (rc {proc.returncode}):\n'
        f'{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}')
    return json.loads(lines[-1])


@pytest.fixture(scope='module')
def op_results():
    return _run_worker('ops')


@pytest.fixture(scope='module')
def model_results():
    return _run_worker('models')


def _check(res, tol):
    assert 'error' not in res, res['error']
    errs = {k: v for k, v in res.items()
            if k.startswith(('out', 'd')) and isinstance(v, float)
            and k != 'out_dtype_ok'}
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f'errors above {tol}: {bad} (all: {errs})'


@pytest.mark.parametrize('case', [
    'da_tiles_groups', 'da_h1_thin_table', 'da_w1_no_table',
    'da_default_blocks', 'da_wide_rows', 'na_tiles', 'na_small_map',
    'na_k5_default_blocks'])
def test_float32_matches_float64_reference(op_results, case):
    res = op_results[case]
    _check(res, TOL)
    assert res['out_dtype_ok'] == 1.0
    # a test that could pass without the kernels would prove nothing
    kind = 'deformable' if case.startswith('da') else 'neighborhood'
    launched = {k: v for k, v in res['launched'].items()
                if k.startswith(kind)}
    assert launched == {f'{kind}_forward': 1, f'{kind}_backward_dq': 1,
                        f'{kind}_backward_dkdv': 1}, res['launched']


@pytest.mark.parametrize('case', ['da_bf16', 'na_fp16_no_bias'])
def test_half_inputs_close_to_float64_reference(op_results, case):
    res = op_results[case]
    _check(res, TOL_HALF)
    assert res['out_dtype_ok'] == 1.0
    assert sum(v for k, v in res['launched'].items()
               if not k.startswith('table_grad')) == 3


def test_both_table_gradient_paths_run(op_results):
    # per-row reduction (maps wider than the table) and per-corner atomics
    modes = {k for res in op_results.values() for k in res['launched']
             if k.startswith('table_grad')}
    assert modes == {'table_grad_rows', 'table_grad_atomics'}
    assert 'table_grad_rows' in op_results['da_wide_rows']['launched']
    assert 'table_grad_atomics' in op_results['da_default_blocks'][
        'launched']


def test_position_and_table_gradients_are_checked(op_results):
    # the border case must compare the gradients the issue names
    res = op_results['da_tiles_groups']
    assert {'dq', 'dk', 'dv', 'dpos', 'dtable'} <= set(res)


def _skip_if_modules_lack_triton(res):
    err = res.get('error', '')
    if 'impl' in err and 'triton' in err and 'must be one of' in err:
        pytest.skip(f'modules do not accept impl="triton" yet: {err}')


@pytest.mark.parametrize('kind', ['deformable', 'neighborhood'])
def test_module_triton_matches_float64_reference(model_results, kind):
    # every parameter gradient, the offset conv (through the positions) and
    # the rpe table / rpb included
    res = model_results[f'module_{kind}']
    _skip_if_modules_lack_triton(res)
    _check(res, TOL)
    assert res['launches'] >= 3


def test_backbone_triton_matches_golden(model_results):
    res = model_results['golden_backbone']
    _skip_if_modules_lack_triton(res)
    _check(res, 1e-4)
    assert 'deformable_attention:triton' in res['chosen'], res['chosen']
    assert 'neighborhood_attention:triton' in res['chosen'], res['chosen']
    # the mini arch has 4 deformable and 3 neighborhood blocks
    assert res['launched'].get('deformable_forward', 0) == 4
    assert res['launched'].get('neighborhood_forward', 0) == 3


def test_can_run_reasons_without_interpreter():
    """In this (non-interpreted) process the kernels refuse CPU tensors
    with the reason the dispatcher reports."""
    if os.environ.get('TRITON_INTERPRET', '0') not in ('', '0'):
        pytest.skip('this process runs the interpreter')
    import torch

    from mmdat.ops.deformable_attention import triton as da
    from mmdat.ops.dispatch import Context
    from mmdat.ops.neighborhood_attention import triton as na

    def ctx(device='cpu', dtype=torch.float32, head_dim=32, **facts):
        return Context(torch.device(device), dtype, False, head_dim,
                       tuple(facts.items()))

    needs = 'needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)'
    assert da.can_run_triton(ctx()) == needs
    assert na.can_run_triton(ctx()) == needs
    cuda = dict(device='cuda')
    assert da.can_run_triton(ctx(**cuda)) is None
    assert da.can_run_triton(ctx(**cuda, positions_in_range=False)) == \
        'positions may leave the table'
    assert 'head dim 256' in da.can_run_triton(ctx(**cuda, head_dim=256))
    assert 'float64' in na.can_run_triton(ctx(**cuda, dtype=torch.float64))
    with pytest.raises(ValueError, match='positions may leave'):
        da.deformable_attention_triton(
            torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16),
            torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 2), None, H=1,
            W=1, scale=1.0, positions_in_range=False)


def _aot_compile(fn, pointers, constexprs, floats, num_warps=8):
    """Compile ``fn`` for an sm_90 GPU (H100/H200) without a GPU: Triton's
    real compiler (to PTX and cubin with the bundled ptxas), not the
    interpreter."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {n: 'constexpr' if n in constexprs else pointers.get(
        n, 'fp32' if n in floats else 'i32') for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget('cuda', 90, 32),
                          options=dict(num_warps=num_warps))


def test_kernels_compile_for_sm90():
    """The compiled path differs from the interpreter (types, scopes, loops
    with tensor bounds): the trickiest variants must compile for Hopper."""
    if os.environ.get('TRITON_INTERPRET', '0') not in ('', '0'):
        pytest.skip('this process runs the interpreter')
    from mmdat.ops.deformable_attention import triton as da
    from mmdat.ops.neighborhood_attention import triton as na
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError as exc:
        pytest.skip(f'no CUDA backend in this triton: {exc}')
    floats = {'sy', 'oy', 'sx', 'ox', 'cy', 'cx', 'ymax', 'xmax',
              'qk_scale', 'scale'}
    ptrs = {n: '*bf16' for n in ('Q', 'K', 'V', 'OUT', 'DO', 'DQ', 'DK',
                                 'DV')}
    ptrs.update({n: '*fp32' for n in ('POS', 'TAB', 'LSE', 'DELTA', 'DPOS',
                                      'DTAB', 'RPB', 'DRPB')})
    da_meta = dict(HAS_BIAS=True, PREC='tf32', UPCAST=False, BLOCK_M=64,
                   BLOCK_D=32)
    _aot_compile(da._da_fwd, ptrs, dict(da_meta, BLOCK_N=64), floats)
    # the per-row table-gradient reduction: loops over tensor bounds
    fp32 = {n: '*fp32' for n in ptrs}
    _aot_compile(da._da_bwd_dkdv, fp32,
                 dict(da_meta, PREC='ieee', BLOCK_N=32, REDUCE_ROWS=True),
                 floats)
    _aot_compile(na._na_bwd_dq, ptrs,
                 dict(HAS_BIAS=True, BLOCK_M=64, BLOCK_D=32), floats,
                 num_warps=4)


if __name__ == '__main__':
    print(json.dumps(_work(sys.argv[1])))
