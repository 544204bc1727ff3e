"""Deformable attention as the spec writes it: the (queries x keys x 2)
displacements, a ``grid_sample`` of the bias table at each of them, and the
full attention matrix. Memory grows with queries x keys; the ground truth
the other implementations are tested against."""
from typing import Optional

import torch
import torch.nn.functional as F

from ..dispatch import Context, register, runs_anywhere
from .lookup import query_grid


#: score-matrix elements (batch x heads x queries x keys) of one call up to
#: which ``auto`` runs this on CUDA: measured on an H200 (2026-11-30) it is
#: the fastest there (stage-1 module 1x64x200x304: 3.5 ms against Triton's
#: 5.4 ms and flex_attention's 7.8 ms; the DAT-T++ training step at
#: 1x3x800x1216 took 35.7 ms against the chunked path's 112 ms), at ~25x the
#: memory. 2**28 covers detection training at 2x800x1216 (2.3e8).
CUDA_AUTO_MAX_SCORES = 2**28


def _auto_skip(ctx: Context) -> Optional[str]:
    if ctx.device.type != 'cuda':
        return 'off CUDA auto prefers the leaner chunked path'
    scores = ctx.fact('scores', 0)
    if scores > CUDA_AUTO_MAX_SCORES:
        return (f'{scores:.2e} attention scores in one call exceed '
                f'CUDA_AUTO_MAX_SCORES={CUDA_AUTO_MAX_SCORES:.2e} (memory)')
    return None


@register('deformable_attention', 'reference', can_run=runs_anywhere,
          auto_skip=_auto_skip)
def deformable_attention_reference(q, k, v, pos, table, *, H, W, scale,
                                   positions_in_range=True):
    """Materialised displacements, ``grid_sample`` bias, full softmax."""
    attn = torch.einsum('bhmc,bhnc->bhmn', q, k) * scale
    if table is not None:
        attn = attn + bias_reference(pos, table, H, W).to(attn.dtype)
    return torch.einsum('bhmn,bhnc->bhmc', attn.softmax(-1), v)


def bias_reference(pos: torch.Tensor, table: torch.Tensor, H: int,
                   W: int) -> torch.Tensor:
    """The bias ``(B, h, H*W, Ns)`` by ``grid_sample`` of ``table``
    ``(h, Ty, Tx)`` at every (query, key) displacement."""
    B, g, Ns, _ = pos.shape
    h = table.shape[0]
    q_grid = torch.stack(torch.meshgrid(
        query_grid(H, pos.dtype, pos.device),
        query_grid(W, pos.dtype, pos.device), indexing='ij'), dim=-1)
    disp = (q_grid.reshape(1, 1, H * W, 1, 2)
            - pos.reshape(B, g, 1, Ns, 2)) * 0.5
    tab = table.to(pos.dtype).reshape(1, g, h // g, *table.shape[1:])
    tab = tab.expand(B, -1, -1, -1, -1).reshape(B * g, h // g,
                                                *table.shape[1:])
    bias = F.grid_sample(tab, disp.reshape(B * g, H * W, Ns, 2).flip(-1),
                         mode='bilinear', padding_mode='zeros',
                         align_corners=True)
    return bias.reshape(B, h, H * W, Ns)
