"""Neighborhood attention in plain PyTorch for export: every query's window
gathered with one flat-index gather per tensor, scores and values by
multiply-sum. The same computation as the reference; in an ONNX graph it is
one Gather per tensor (multi-axis indexing becomes transpose-gather-
transpose of the 49x-sized tensors) and no per-query Einsum, about twice as
fast in ONNX Runtime. Portable: chosen under ``mmdat.ops.portable()`` and
ONNX export."""

from ..dispatch import register, runs_anywhere
from .reference import window_indices


@register('neighborhood_attention', 'gather', can_run=runs_anywhere,
          portable=True)
def neighborhood_attention_gather(q, k, v, rpb, *, kernel_size, scale):
    """One flat-index gather per tensor, multiply-sum (ONNX friendly)."""
    B, h, H, W, c = q.shape
    ks = kernel_size
    rows, cols, rel_r, rel_c = window_indices(H, W, ks, q.device)
    # flat key index of every (query, window slot): one gather on one axis
    # (exports as a single Gather; multi-axis indexing becomes transposes)
    idx = (rows[:, None, :, None] * W + cols[None, :, None, :]).reshape(-1)
    kn = k.reshape(B, h, H * W, c).index_select(2, idx).reshape(
        B, h, H * W, ks * ks, c)
    vn = v.reshape(B, h, H * W, c).index_select(2, idx).reshape(
        B, h, H * W, ks * ks, c)
    bidx = (rel_r[:, None, :, None] * (2 * ks - 1)
            + rel_c[None, :, None, :]).reshape(-1)
    bias = rpb.reshape(h, -1).index_select(1, bidx).reshape(
        1, h, H * W, ks * ks)
    logits = (kn * (q * scale).reshape(B, h, H * W, 1, c)).sum(-1)
    attn = (logits + bias.to(logits.dtype)).softmax(-1)
    return (attn.unsqueeze(-1) * vn).sum(-2).reshape(B, h, H, W, c)
