"""Neighborhood attention in plain PyTorch, tile by tile.

Queries are cut into ``T x T`` tiles; each tile attends to the
``(T+k-1)^2`` halo that holds all its windows, with an additive mask (bias
inside the window, -inf outside) through ``scaled_dot_product_attention``.
Tiles fall into a handful of border patterns, so the mask is built per
pattern, not per tile. Far less memory traffic than the reference's
per-query gathers.
"""
import functools
from typing import List, Tuple

import torch
import torch.nn.functional as F

from ..dispatch import register, runs_anywhere

TILE = 8


@register('neighborhood_attention', 'chunked', can_run=runs_anywhere)
def neighborhood_attention_chunked(q, k, v, rpb, *, kernel_size, scale):
    """Query tiles against their key halos, masked SDPA per border pattern."""
    B, h, H, W, c = q.shape
    ks = kernel_size
    T = TILE
    rq, rk, rrel, rpat = _tile_layout(H, ks, T, q.device)
    cq, ck, crel, cpat = _tile_layout(W, ks, T, q.device)
    nth, ntw = rq.shape[0], cq.shape[0]
    Lh, Lw = rk.shape[1], ck.shape[1]
    # (B, h, nth, ntw, T*T, c) query tiles and (.., Lh*Lw, c) key halos
    qt = q[:, :, rq[:, None, :, None], cq[None, :, None, :]]
    qt = qt.reshape(B, h, nth, ntw, T * T, c)
    kt = k[:, :, rk[:, None, :, None], ck[None, :, None, :]]
    kt = kt.reshape(B, h, nth, ntw, Lh * Lw, c)
    vt = v[:, :, rk[:, None, :, None], ck[None, :, None, :]]
    vt = vt.reshape(B, h, nth, ntw, Lh * Lw, c)
    out = qt.new_empty(B, h, nth, ntw, T * T, c)
    for pr, r_tiles in enumerate(rpat):
        for pc, c_tiles in enumerate(cpat):
            mask = _pattern_mask(rpb, rrel[pr], crel[pc], q.dtype)
            sel = (slice(None), slice(None), r_tiles[:, None],
                   c_tiles[None, :])
            out[sel] = F.scaled_dot_product_attention(
                qt[sel], kt[sel], vt[sel], attn_mask=mask[:, None, None],
                scale=scale)
    out = out.reshape(B, h, nth, ntw, T, T, c).permute(0, 1, 2, 4, 3, 5, 6)
    out = out.reshape(B, h, nth * T, ntw * T, c)
    return out[:, :, :H, :W]


def _pattern_mask(rpb: torch.Tensor, rrel: torch.Tensor, crel: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (h, T*T, Lh*Lw): rpb inside the window, -inf outside."""
    T, Lh = rrel.shape
    Lw = crel.shape[1]
    valid = (rrel[:, None, :, None] >= 0) & (crel[None, :, None, :] >= 0)
    bias = rpb[:, rrel.clamp(min=0)[:, None, :, None],
               crel.clamp(min=0)[None, :, None, :]].to(dtype)
    bias = bias.masked_fill(~valid, float('-inf'))
    return bias.reshape(-1, T * T, Lh * Lw)


def _tile_layout(n: int, ks: int, T: int, device) -> Tuple[
        torch.Tensor, torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """Tiling of one axis of length ``n`` (``n >= ks``) into query tiles.

    Returns the query index of each tile slot ``(nt, T)`` (past-the-end
    slots repeat the last index and are cropped later), the halo key indices
    ``(nt, L)``, and the distinct relative-offset patterns: a list of
    ``(T, L)`` tensors holding ``key - query + ks - 1`` inside the window and
    -1 outside, with, for each pattern, the tiles that use it.
    """
    qidx, kidx, patterns, tiles = _tile_layout_lists(n, ks, T)
    return (torch.tensor(qidx, device=device),
            torch.tensor(kidx, device=device),
            [torch.tensor(p, device=device) for p in patterns],
            [torch.tensor(t, device=device) for t in tiles])


@functools.lru_cache(maxsize=256)
def _tile_layout_lists(n: int, ks: int, T: int):
    # Plain Python on ints: the layout depends on the sizes only, and
    # data-dependent tensor ops (unique/nonzero) would break torch.compile
    # graphs on every call.
    nt = -(-n // T)
    L = min(T + ks - 1, n)
    starts = [min(max(i - ks // 2, 0), n - ks) for i in range(n)]
    qidx = [[min(t * T + j, n - 1) for j in range(T)] for t in range(nt)]
    kidx = [[min(starts[q[0]], n - L) + j for j in range(L)] for q in qidx]
    patterns = {}
    for t in range(nt):
        rel = tuple(
            tuple(k - q + ks - 1 if starts[q] <= k < starts[q] + ks else -1
                  for k in kidx[t]) for q in qidx[t])
        patterns.setdefault(rel, []).append(t)
    return qidx, kidx, list(patterns), list(patterns.values())
