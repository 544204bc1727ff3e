"""Where a DAT training step spends its GPU time: torch.profiler over one
step after warm-up, CUDA kernels sorted by total time. For the GPU check
(cuda_check.sh); needs CUDA.

    python tools/analysis_tools/profile_cuda.py --impl triton --shape 2 3 800 1216
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--arch', default='tiny', help='DAT preset (default tiny)')
    p.add_argument('--impl', default='triton', help='attention impl')
    p.add_argument('--shape', type=int, nargs=4, default=[2, 3, 800, 1216],
                   metavar=('B', 'C', 'H', 'W'), help='input shape')
    p.add_argument('--dtype', default='bf16', choices=['fp32', 'bf16'],
                   help='autocast dtype (default bf16)')
    p.add_argument('--mode', default='train', choices=['train', 'infer'],
                   help='training step or inference')
    p.add_argument('--rows', type=int, default=30, help='table rows')
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit('profile_cuda.py: CUDA is not available here')
    from mmdat.models import DAT
    model = DAT(arch=args.arch, impl=args.impl).cuda().train(
        args.mode == 'train')
    x = torch.randn(*args.shape, device='cuda')
    amp = torch.autocast('cuda', dtype=torch.bfloat16,
                         enabled=args.dtype == 'bf16')

    def step():
        with torch.set_grad_enabled(args.mode == 'train'), amp:
            loss = sum(o.float().mean() for o in model(x))
        if args.mode == 'train':
            loss.backward()
            model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    for _ in range(3):
        step()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
    print(f'== {args.arch} {args.impl} {args.mode} {args.dtype} {args.shape}')
    print(prof.key_averages().table(sort_by='cuda_time_total',
                                    row_limit=args.rows, max_name_column_width=60))


if __name__ == '__main__':
    main()
