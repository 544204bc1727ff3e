"""Deformable attention in plain PyTorch, chunk by chunk of query rows.

Each chunk's bias is the separable bilinear lookup of
:mod:`.lookup` done with gathers (row part per (query row, key), column part
per (query column, key)), handed to ``scaled_dot_product_attention`` as its
additive mask. Neither the displacements nor the full bias/attention matrix
exist; in training each chunk is recomputed in backward (checkpointed).
Lookups outside the table are zero (as ``grid_sample`` with zero padding),
so tanh-bounded offsets (DAT v1) are covered too. Only standard ops: this
is also the implementation exported to ONNX (one chunk when portable).
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..dispatch import is_portable, register, runs_anywhere
from .lookup import table_coordinate

# Elements of a (query-chunk x keys) bias block per head-batch kept alive at
# once; bounds the peak memory at large resolutions. GPUs have the memory
# and want large launches, CPUs want cache-sized chunks.
CHUNK_ELEMENTS = 1 << 22
CHUNK_ELEMENTS_CUDA = 1 << 26


@register('deformable_attention', 'chunked', can_run=runs_anywhere,
          portable=True)
def deformable_attention_chunked(q, k, v, pos, table, *, H, W, scale,
                                 positions_in_range=True):
    """Row chunks: gathered bilinear bias + ``scaled_dot_product_attention``."""
    if table is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    B, h, M, c = q.shape
    Ns = k.shape[2]
    g = pos.shape[1]
    # one chunk when exporting: the chunk count must not depend on the size
    single = is_portable() or torch.jit.is_tracing()
    budget = CHUNK_ELEMENTS_CUDA if q.is_cuda else CHUNK_ELEMENTS
    rows = H if single else max(1, min(H, budget // max(1, B * h * W * Ns)))
    tab = table.to(pos.dtype).reshape(g, h // g, *table.shape[1:])
    y = _axis_lookup(pos[..., 0], H, table.shape[1])
    x = _axis_lookup(pos[..., 1], W, table.shape[2])
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, pos, table))
    outs = []
    for i0 in range(0, H, rows):
        i1 = min(H, i0 + rows)
        args = (q[:, :, i0 * W:i1 * W], k, v, tab,
                *(t[:, :, i0:i1] for t in y), *x)
        if grad and rows < H:
            outs.append(checkpoint(_chunk, *args, scale,
                                   use_reentrant=False))
        else:
            outs.append(_chunk(*args, scale))
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def _axis_lookup(p: torch.Tensor, n_query: int, size: int):
    """Corner indices and weights along one axis, ``(B, g, n_query, Ns)``
    each: ``(i0, i1, w0, w1)`` with the indices clamped into the table and
    the weight of a corner outside the table zero. NaN positions give NaN
    weights (a NaN output), never an out-of-range index."""
    u = table_coordinate(p, n_query, size)
    f0 = u.detach().floor()
    frac = u - f0
    w0 = (1 - frac) * ((f0 >= 0) & (f0 <= size - 1)).to(frac.dtype)
    w1 = frac * ((f0 >= -1) & (f0 <= size - 2)).to(frac.dtype)
    i0 = f0.nan_to_num(0.0).clamp(0, size - 1).long()
    i1 = (f0 + 1).nan_to_num(0.0).clamp(0, size - 1).long()
    return i0, i1, w0, w1


def _chunk(q, k, v, tab, y0, y1, wy0, wy1, x0, x1, wx0, wx1, scale):
    bias = _bias(tab, y0, y1, wy0, wy1, x0, x1, wx0, wx1)
    return F.scaled_dot_product_attention(q, k, v,
                                          attn_mask=bias.to(q.dtype),
                                          scale=scale)


def _bias(tab, y0, y1, wy0, wy1, x0, x1, wx0, wx1):
    """Bias ``(B, h, r*W, Ns)`` of a chunk of ``r`` query rows.

    ``tab``: ``(g, hg, Ty, Tx)``; ``y*``: ``(B, g, r, Ns)``; ``x*``:
    ``(B, g, W, Ns)``.
    """
    g, hg, Ty, Tx = tab.shape
    B, _, r, Ns = y0.shape
    W = x0.shape[2]
    gi = torch.arange(g, device=tab.device).view(1, g, 1, 1, 1)
    hi = torch.arange(hg, device=tab.device).view(1, 1, hg, 1, 1)
    # row part: (B, g, hg, r, Ns, Tx), the table row interpolated at every
    # (query row, key)
    rows = (tab[gi, hi, y0[:, :, None]] * wy0[:, :, None, ..., None]
            + tab[gi, hi, y1[:, :, None]] * wy1[:, :, None, ..., None])
    flat = rows.reshape(B, g, hg, r, Ns * Tx)
    base = torch.arange(Ns, device=tab.device) * Tx
    shape = (B, g, hg, r, W * Ns)

    def column(idx, w):
        idx = (idx + base).reshape(B, g, 1, 1, W * Ns).expand(shape)
        return torch.gather(flat, 4, idx) * w.reshape(B, g, 1, 1, W * Ns)

    bias = column(x0, wx0) + column(x1, wx1)
    return bias.reshape(B, g * hg, r * W, Ns)
