"""Neighborhood attention with ``flex_attention`` (CUDA): the window as a
block mask, ``rpb`` as a score modification. Forward verified on an H100;
gradients not, so ``auto`` uses it for CUDA inference only."""
from typing import Optional

import torch

from ..dispatch import Context, register
from ..flex import create_block_mask, flex_attention, flex_supported


def _can_run(ctx: Context) -> Optional[str]:
    if ctx.device.type != 'cuda':
        return f'needs CUDA tensors, got {ctx.device.type}'
    if not flex_supported():
        return 'torch.nn.attention.flex_attention is not importable'
    if ctx.requires_grad and not ctx.fact('explicit', False):
        return 'gradients not verified on a GPU (impl="flex" forces it)'
    return None


@register('neighborhood_attention', 'flex', can_run=_can_run)
def neighborhood_attention_flex(q, k, v, rpb, *, kernel_size, scale):
    """flex_attention with a sliding-window block mask."""
    B, h, H, W, c = q.shape
    ks = kernel_size
    width = torch.tensor(W, dtype=torch.int64, device=q.device)

    def score_mod(score, b, hh, q_idx, kv_idx):
        qi, ki = q_idx // width, kv_idx // width
        qj, kj = q_idx - qi * width, kv_idx - ki * width
        # clamped: masked-out pairs are evaluated too before masking
        ri = torch.clamp(ki - qi + ks - 1, 0, 2 * ks - 2)
        rj = torch.clamp(kj - qj + ks - 1, 0, 2 * ks - 2)
        return score + rpb[hh, ri, rj]

    out = flex_attention(
        q.reshape(B, h, H * W, c), k.reshape(B, h, H * W, c),
        v.reshape(B, h, H * W, c), score_mod=score_mod,
        block_mask=_window_block_mask(H, W, ks, q.device), scale=scale)
    return out.reshape(B, h, H, W, c)


_BLOCK_MASKS = {}


def _window_block_mask(H: int, W: int, ks: int, device):
    """Block mask of the sliding windows, cached per (H, W, k, device)."""
    key = (H, W, ks, str(device))
    if key not in _BLOCK_MASKS:
        def mask_mod(b, hh, q_idx, kv_idx):
            qi, ki = q_idx // W, kv_idx // W
            qj, kj = q_idx - qi * W, kv_idx - ki * W
            si = torch.clamp(qi - ks // 2, 0, H - ks)
            sj = torch.clamp(qj - ks // 2, 0, W - ks)
            return (ki >= si) & (ki < si + ks) & (kj >= sj) & (kj < sj + ks)

        if len(_BLOCK_MASKS) > 64:
            _BLOCK_MASKS.clear()
        _BLOCK_MASKS[key] = create_block_mask(mask_mod, None, None, H * W,
                                              H * W, device=device)
    return _BLOCK_MASKS[key]
