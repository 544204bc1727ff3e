"""Neighborhood attention (block letter ``N``) in plain PyTorch.

Exactly the semantics of natten's ``NeighborhoodAttention2D`` with dilation 1
as used by DAT++: each query attends to the ``k x k`` keys of a window that
slides inward at the borders (never padded), with a relative position bias
``rpb`` of shape ``(h, 2k-1, 2k-1)``. Maps smaller than the kernel are
zero-padded on the bottom/right first and cropped back afterwards.

* ``reference``: gathers every query's ``k x k`` keys explicitly.
* ``fast`` (the default): on CPU, a fused C++ kernel (``csrc/``, built on
  first use) that walks each query's window directly; with autograd off, an
  inference kernel that keeps no attention weights (float32 with AVX-512:
  vectorised across 16 queries of a row). Elsewhere, or where
  the kernel cannot be built, queries are cut into ``T x T`` tiles; each tile
  attends to the ``(T+k-1)^2`` halo that holds all its windows, with an
  additive mask (bias inside the window, -inf outside) through
  ``scaled_dot_product_attention``. Tiles fall into a handful of border
  patterns, so the mask is built per pattern, not per tile.
"""
import functools
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import (check_impl, create_block_mask, flex_attention,
                     resolve_impl)
from ...ops.library import use_cpu_ops


def window_starts(n: int, k: int, device=None) -> torch.Tensor:
    """First key index of each query's window: ``clamp(i - k//2, 0, n - k)``."""
    return (torch.arange(n, device=device) - k // 2).clamp(0, n - k)


class NeighborhoodAttention(nn.Module):
    """2-D neighborhood attention on an NCHW map (keys ``qkv``, ``rpb``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 7,
                 impl: str = 'auto', tile: int = 8):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.kernel_size = kernel_size
        self.impl = check_impl(impl)
        self.tile = tile
        self.qkv = nn.Linear(dim, 3 * dim)
        self.rpb = nn.Parameter(
            torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        nn.init.trunc_normal_(self.rpb, std=0.02)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        k = self.kernel_size
        t = x.permute(0, 2, 3, 1)
        pad_b, pad_r = max(0, k - H), max(0, k - W)
        if pad_b or pad_r:
            # the padded tokens go through qkv (bias included) like any other
            t = F.pad(t, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = t.shape[1:3]
        qkv = self.qkv(t).reshape(B, Hp, Wp, 3, self.num_heads, self.head_dim)
        q, kk, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)  # (B, h, H, W, c)
        impl = resolve_impl(self.impl, x)
        if impl == 'reference':
            out = self._attend_reference(q, kk, v)
        elif impl == 'flex':
            out = self._attend_flex(q, kk, v)
        elif use_cpu_ops(x) and not torch.is_grad_enabled():
            # no attention weights kept; reads q, k, v straight from qkv and
            # returns a (B, H, W, h, c)-laid-out view: no copies either side
            out = torch.ops.mmdat.neighborhood_attention_inference(
                q, kk, v, self.rpb.to(q.dtype), self.kernel_size, self.scale)
        elif use_cpu_ops(x):
            out = _FusedNeighborhoodAttention.apply(
                q, kk, v, self.rpb, self.kernel_size, self.scale)
        else:
            out = self._attend_tiled(q, kk, v)
        out = out.permute(0, 2, 3, 1, 4).reshape(B, Hp, Wp, C)
        out = out[:, :H, :W]
        return self.proj(out).permute(0, 3, 1, 2)

    # --------------------------------------------------------- reference path
    def _attend_reference(self, q, k, v):
        B, h, H, W, c = q.shape
        ks = self.kernel_size
        ar = torch.arange(ks, device=q.device)
        rows = window_starts(H, ks, q.device)[:, None] + ar  # (H, ks)
        cols = window_starts(W, ks, q.device)[:, None] + ar  # (W, ks)
        R = rows[:, None, :, None]
        Cc = cols[None, :, None, :]
        kn = k[:, :, R, Cc]  # (B, h, H, W, ks, ks, c)
        vn = v[:, :, R, Cc]
        logits = torch.einsum('bhijc,bhijxyc->bhijxy', q * self.scale, kn)
        rel_r = rows - torch.arange(H, device=q.device)[:, None] + ks - 1
        rel_c = cols - torch.arange(W, device=q.device)[:, None] + ks - 1
        bias = self.rpb[:, rel_r[:, None, :, None], rel_c[None, :, None, :]]
        logits = logits + bias.to(logits.dtype)
        attn = logits.reshape(B, h, H, W, ks * ks).softmax(-1)
        attn = attn.reshape(B, h, H, W, ks, ks)
        return torch.einsum('bhijxy,bhijxyc->bhijc', attn, vn)

    # -------------------------------------------------------------- CUDA path
    def _attend_flex(self, q, k, v):
        """flex_attention with the window as a block mask and rpb as a score
        modification."""
        B, h, H, W, c = q.shape
        ks = self.kernel_size
        rpb = self.rpb
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
            block_mask=_window_block_mask(H, W, ks, q.device),
            scale=self.scale)
        return out.reshape(B, h, H, W, c)

    # -------------------------------------------------------------- fast path
    def _attend_tiled(self, q, k, v):
        B, h, H, W, c = q.shape
        ks = self.kernel_size
        T = self.tile
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
                mask = self._pattern_mask(rrel[pr], crel[pc], q.dtype)
                sel = (slice(None), slice(None), r_tiles[:, None],
                       c_tiles[None, :])
                out[sel] = F.scaled_dot_product_attention(
                    qt[sel], kt[sel], vt[sel],
                    attn_mask=mask[:, None, None], scale=self.scale)
        out = out.reshape(B, h, nth, ntw, T, T, c).permute(0, 1, 2, 4, 3, 5, 6)
        out = out.reshape(B, h, nth * T, ntw * T, c)
        return out[:, :, :H, :W]

    def _pattern_mask(self, rrel: torch.Tensor, crel: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
        """Additive mask (h, T*T, Lh*Lw): rpb inside the window, -inf outside."""
        T, Lh = rrel.shape
        Lw = crel.shape[1]
        valid = (rrel[:, None, :, None] >= 0) & (crel[None, :, None, :] >= 0)
        bias = self.rpb[:, rrel.clamp(min=0)[:, None, :, None],
                        crel.clamp(min=0)[None, :, None, :]].to(dtype)
        bias = bias.masked_fill(~valid, float('-inf'))
        return bias.reshape(-1, T * T, Lh * Lw)


class _FusedNeighborhoodAttention(torch.autograd.Function):
    """``torch.ops.mmdat.neighborhood_attention`` with its backward; keeps
    the ``k*k`` attention weights per query for the backward."""

    @staticmethod
    def forward(ctx, q, k, v, rpb, ks: int, scale: float):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, attn = torch.ops.mmdat.neighborhood_attention(
            q, k, v, rpb.to(q.dtype), ks, scale)
        ctx.save_for_backward(q, k, v, attn)
        ctx.ks, ctx.scale, ctx.rpb_dtype = ks, scale, rpb.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, attn = ctx.saved_tensors
        dq, dk, dv, drpb = torch.ops.mmdat.neighborhood_attention_backward(
            grad_out, q, k, v, attn, ctx.ks, ctx.scale)
        return dq, dk, dv, drpb.to(ctx.rpb_dtype), None, None


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
