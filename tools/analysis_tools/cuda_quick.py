"""Quick CUDA check of one attention implementation (``--impl``, default
triton) against the reference, fp32 with TF32 off: outputs and every
gradient, per tensor, for single deformable-attention modules (key counts
that are and are not a multiple of the kernels' block sizes), for single
neighborhood-attention modules, and for a tiny backbone. Prints one line per
case; tests/test_cuda.py holds the asserted version of these checks."""
import argparse
import time
from functools import partial

import torch

from mmdat.models import DAT
from mmdat.models.attentions import DeformableAttention, NeighborhoodAttention

ARCH = dict(dim_stem=16, dims=[16, 32, 64, 64], depths=[2, 2, 2, 1],
            stage_spec=[['N', 'D'], ['D', 'N'], ['N', 'D'], ['D']],
            heads=[1, 2, 4, 4], groups=[1, 1, 2, 2])
# (channels, heads, groups, stride, offset kernel, rpe size, H, W)
DA_MODULES = [(32, 2, 1, 8, 9, 8, 64, 96),   # 96 keys: not a multiple of 64
              (32, 2, 1, 2, 3, 8, 32, 32),   # 256 keys
              (64, 4, 2, 4, 5, 16, 45, 37)]  # 120 keys, odd sizes, 2 groups

# (channels, heads, H, W) of neighborhood attention
NA_MODULES = [(32, 2, 20, 13), (64, 4, 7, 9)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def compare(ours: torch.nn.Module, ref: torch.nn.Module, x: torch.Tensor,
            tag: str) -> float:
    # ``ours``: the implementation under test
    """Forward + backward of both; prints the relative error of the outputs,
    the input gradient and each parameter gradient; returns the worst."""
    t = time.time()
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    of, orf = ours(xf), ref(xr)
    of = of if isinstance(of, (list, tuple)) else [of]
    orf = orf if isinstance(orf, (list, tuple)) else [orf]
    sum((o * o).mean() for o in of).backward()
    sum((o * o).mean() for o in orf).backward()
    torch.cuda.synchronize()
    errs = {f'out{i}': rel(a, b) for i, (a, b) in enumerate(zip(of, orf))}
    errs['x.grad'] = rel(xf.grad, xr.grad)
    floor = max(float(p.grad.abs().max()) for p in ref.parameters()
                if p.grad is not None)
    for (n, pf), (_, pr) in zip(ours.named_parameters(),
                                ref.named_parameters()):
        if pr.grad is None:
            continue
        if pf.grad is None:
            errs[n] = float('inf')
            continue
        errs[n] = float((pf.grad - pr.grad).abs().max()) / max(
            float(pr.grad.abs().max()), floor)
    worst = max(errs.values())
    bad = {k: f'{v:.2e}' for k, v in errs.items() if v > 1e-4}
    print(f'{tag}: {time.time() - t:.1f}s worst {worst:.2e} '
          f'{"OK" if worst <= 1e-3 else "FAIL"} >1e-4: {bad}', flush=True)
    return worst


def randomise_biases(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(('rpe_table', 'rpb')):
                p.normal_()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--only', choices=['da', 'na', 'backbone'],
                        help='run only these cases (default: all)')
    parser.add_argument('--impl', default='triton',
                        help='implementation checked against the reference '
                        '(default: triton)')
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cases = []  # (tag, module factory taking impl, input shape)
    if args.only in (None, 'na'):
        cases += [(f'NA C{C} h{h} {H}x{W}',
                   partial(NeighborhoodAttention, C, h), (2, C, H, W))
                  for C, h, H, W in NA_MODULES]
    if args.only in (None, 'da'):
        cases += [(f'DA C{C} h{h} g{g} r{r} {H}x{W}',
                   partial(DeformableAttention, C, h, g, r, ks, rpe),
                   (2, C, H, W))
                  for C, h, g, r, ks, rpe, H, W in DA_MODULES]
    for tag, make, shape in cases:
        torch.manual_seed(0)
        ours, ref = make(impl=args.impl).cuda(), make(impl='reference').cuda()
        randomise_biases(ours)
        ref.load_state_dict(ours.state_dict())
        compare(ours, ref, torch.randn(*shape, device='cuda'), tag)
    if args.only not in (None, 'backbone'):
        return
    torch.manual_seed(0)
    ours = DAT(arch=ARCH, impl=args.impl).cuda()
    randomise_biases(ours)
    ref = DAT(arch=ARCH, impl='reference').cuda()
    ref.load_state_dict(ours.state_dict())
    compare(ours, ref, torch.randn(2, 3, 64, 96, device='cuda'),
            'backbone 2x3x64x96')


if __name__ == '__main__':
    main()
