"""Two-process DDP (gloo, CPU) training steps of DAT with the DDP warning
"Grad strides do not match bucket view strides" turned into an error: every
parameter's gradient keeps the parameter's layout, so DDP copies nothing.

Convolutions that see channels-last maps (the attention outputs, the fused
oneDNN / cuDNN paths) return depthwise and 1x1 weight gradients whose strides
differ from the parameter's in the size-1 dims, e.g. ``(C, 1, 3, 3)`` with
strides ``(9, 1, 3, 1)`` for ``(9, 9, 3, 1)``. Autograd's layout contract
ignores size-1 dims and keeps them; DDP compares all strides, warns, and
copies every such gradient into its bucket each step.
"""
import json
import os
import socket
import sys
import warnings

import pytest
import torch
import torch.distributed as dist

from conftest import ROOT, TINY_ARCH

MESSAGE = 'Grad strides do not match bucket view strides'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=2)
    result = dict(error=None, mismatched=[])
    try:
        from mmdat.models import DAT
        torch.manual_seed(0)
        model = DAT(arch=TINY_ARCH, drop_path_rate=0.1)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator()
                        .manual_seed(rank))
        with warnings.catch_warnings():
            warnings.filterwarnings('error', message=f'.*{MESSAGE}')
            for _ in range(2):
                loss = sum(o.square().mean() for o in ddp(x))
                loss.backward()
                for n, p in model.named_parameters():
                    if p.grad is not None and p.grad.stride() != p.stride():
                        result['mismatched'].append(
                            f'{n} {tuple(p.shape)}: grad strides '
                            f'{p.grad.stride()}, param {p.stride()}')
                ddp.zero_grad(set_to_none=True)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        result['error'] = f'{type(exc).__name__}: {exc}'
    finally:
        with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
            json.dump(result, f)
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or
                    not dist.is_gloo_available(),
                    reason='needs torch.distributed with gloo')
def test_ddp_grads_keep_parameter_layout(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2,
             join=True)
    for rank in range(2):
        res = json.loads((tmp_path / f'rank{rank}.json').read_text())
        assert res['error'] is None, f'rank {rank}: {res["error"]}'
        assert not res['mismatched'], res['mismatched'][:5]
