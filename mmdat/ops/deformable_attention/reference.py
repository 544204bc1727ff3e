"""Deformable attention as the spec writes it: the (queries x keys x 2)
displacements, a ``grid_sample`` of the bias table at each of them, and the
full attention matrix. Memory grows with queries x keys; the ground truth
the other implementations are tested against."""
from typing import Optional

import torch
import torch.nn.functional as F

from ..dispatch import Context, register
from .lookup import query_grid


def _can_run(ctx: Context) -> Optional[str]:
    return None


@register('deformable_attention', 'reference', can_run=_can_run)
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
