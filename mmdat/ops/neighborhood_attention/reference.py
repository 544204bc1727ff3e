"""Neighborhood attention as the spec writes it: every query's ``k x k``
window of keys gathered explicitly (natten's ``NeighborhoodAttention2D``
with dilation 1: windows slide inward at the borders, never padded). Only
gathers and einsums (portable; ONNX export prefers the flat ``gather``
form of the same computation)."""

import torch

from ..dispatch import register, runs_anywhere


def window_starts(n, k: int, device=None) -> torch.Tensor:
    """First key index of each query's window: ``clamp(i - k//2, 0, n - k)``."""
    return (torch.arange(n, device=device) - k // 2).clamp(0, n - k)


def window_indices(H, W, ks: int, device=None):
    """Key rows ``(H, ks)`` and columns ``(W, ks)`` of every query's window,
    and their offsets into ``rpb`` (``key - query + ks - 1``), same shapes."""
    ar = torch.arange(ks, device=device)
    rows = window_starts(H, ks, device)[:, None] + ar
    cols = window_starts(W, ks, device)[:, None] + ar
    rel_r = rows - torch.arange(H, device=device)[:, None] + ks - 1
    rel_c = cols - torch.arange(W, device=device)[:, None] + ks - 1
    return rows, cols, rel_r, rel_c


@register('neighborhood_attention', 'reference', can_run=runs_anywhere,
          portable=True)
def neighborhood_attention_reference(q, k, v, rpb, *, kernel_size, scale):
    """Explicit ``k x k`` window gathers, full softmax per query."""
    B, h, H, W, c = q.shape
    ks = kernel_size
    rows, cols, rel_r, rel_c = window_indices(H, W, ks, q.device)
    R = rows[:, None, :, None]
    Cc = cols[None, :, None, :]
    kn = k[:, :, R, Cc]  # (B, h, H, W, ks, ks, c)
    vn = v[:, :, R, Cc]
    logits = torch.einsum('bhijc,bhijxyc->bhijxy', q * scale, kn)
    bias = rpb[:, rel_r[:, None, :, None], rel_c[None, :, None, :]]
    logits = logits + bias.to(logits.dtype)
    attn = logits.reshape(B, h, H, W, ks * ks).softmax(-1)
    attn = attn.reshape(B, h, H, W, ks, ks)
    return torch.einsum('bhijxy,bhijxyc->bhijc', attn, vn)
