"""Deformable attention with ``torch.nn.attention.flex_attention`` (CUDA):
the bias is computed inside the score function, nothing of size
(queries x keys) is materialised. Compiled once per process and shape
family; its forward matches the golden outputs on an H100, its gradients
are not verified, so ``auto`` uses it for CUDA inference only."""
from typing import Optional

import torch

from ..dispatch import Context, register
from ..flex import flex_attention, flex_supported
from .lookup import at_least_two_wide


def _can_run(ctx: Context) -> Optional[str]:
    if ctx.device.type != 'cuda':
        return f'needs CUDA tensors, got {ctx.device.type}'
    if not ctx.fact('positions_in_range', True):
        return 'positions may leave the table (tanh-bounded offsets)'
    if not flex_supported():
        return 'torch.nn.attention.flex_attention is not importable'
    if ctx.requires_grad and not ctx.fact('explicit', False):
        return 'gradients not verified on a GPU (impl="flex" forces it)'
    return None


@register('deformable_attention', 'flex', can_run=_can_run)
def deformable_attention_flex(q, k, v, pos, table, *, H, W, scale,
                              positions_in_range=True):
    """flex_attention with the bilinear bias in the score function."""
    B, h, M, c = q.shape
    g = pos.shape[1]
    hg = h // g
    score_mod = None
    if table is not None:
        tab = at_least_two_wide(table.float())
        Ty, Tx = tab.shape[-2:]
        py = pos[..., 0].float().contiguous()
        px = pos[..., 1].float().contiguous()
        # sizes as tensors, so that a new input size is not a new graph
        consts = torch.tensor([
            2.0 / (H - 1) if H > 1 else 0.0, 1.0 if H > 1 else 0.0,
            2.0 / (W - 1) if W > 1 else 0.0, 1.0 if W > 1 else 0.0,
            table.shape[-2] - 1, table.shape[-1] - 1, Ty - 2, Tx - 2],
            dtype=torch.float32, device=q.device)
        width = torch.tensor(W, dtype=torch.int64, device=q.device)
        # flex's backward allows one indexing per captured tensor that needs
        # a gradient: one copy of the table per bilinear corner
        t00, t01, t10, t11 = (tab.clone() for _ in range(4))

        def score_mod(score, b, hh, q_idx, kv_idx):
            i = q_idx // width
            j = q_idx - i * width
            grp = hh // hg
            uy = ((i * consts[0] - consts[1] - py[b, grp, kv_idx]) * 0.5
                  + 1) * 0.5 * consts[4]
            ux = ((j * consts[2] - consts[3] - px[b, grp, kv_idx]) * 0.5
                  + 1) * 0.5 * consts[5]
            y0 = torch.minimum(torch.clamp(torch.floor(uy), min=0), consts[6])
            x0 = torch.minimum(torch.clamp(torch.floor(ux), min=0), consts[7])
            fy = uy - y0
            fx = ux - x0
            y0 = y0.to(torch.int32)
            x0 = x0.to(torch.int32)
            top = t00[hh, y0, x0] * (1 - fx) + t01[hh, y0, x0 + 1] * fx
            bot = t10[hh, y0 + 1, x0] * (1 - fx) + t11[hh, y0 + 1, x0 + 1] * fx
            return score + top * (1 - fy) + bot * fy

    return flex_attention(q, k, v, score_mod=score_mod, scale=scale)
