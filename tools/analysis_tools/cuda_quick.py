"""Quick CUDA check of the opt-in flex path: forward and gradients against the
reference on a tiny model (one input size, fp32)."""
import time

import torch

from mmdat.models import DAT

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
ARCH = dict(dim_stem=16, dims=[16, 32, 64, 64], depths=[2, 2, 2, 1],
            stage_spec=[['N', 'D'], ['D', 'N'], ['N', 'D'], ['D']],
            heads=[1, 2, 4, 4], groups=[1, 1, 2, 2])
torch.manual_seed(0)
flex = DAT(arch=ARCH, impl='flex').cuda()
with torch.no_grad():
    for n, p in flex.named_parameters():
        if n.endswith(('rpe_table', 'rpb')):
            p.normal_()
ref = DAT(arch=ARCH, impl='reference').cuda()
ref.load_state_dict(flex.state_dict())
x = torch.randn(2, 3, 64, 96, device='cuda')
t = time.time()
xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
of, orf = flex(xf), ref(xr)
sum((o * o).mean() for o in of).backward()
sum((o * o).mean() for o in orf).backward()
print('compile+run s', round(time.time() - t, 1))
rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa
print('out', [round(rel(a, b), 7) for a, b in zip(of, orf)])
print('x.grad', rel(xf.grad, xr.grad))
floor = max(float(p.grad.abs().max()) for p in ref.parameters())
worst = max(float((pf.grad - pr.grad).abs().max()) / max(
    float(pr.grad.abs().max()), floor) for pf, pr in zip(
        flex.parameters(), ref.parameters()))
print('param grads worst rel', worst)
