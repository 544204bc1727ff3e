"""Deformable multi-head attention (block letter ``D``) of DAT / DAT++.

Three exact formulations of the same computation:

* ``reference``: the straightforward one of the spec, materialising the
  (queries x keys x 2) displacement tensor, a ``grid_sample`` of the position
  bias table at every displacement, and the full attention matrix.
* ``fast`` (the default): the bias table is bilinearly interpolated in two
  separable 1-D steps (rows first, then columns, both exact), and queries are
  processed in chunks (bias-GEMM, softmax, GEMM) so that neither the
  displacement nor the full attention matrix is ever materialised.
* ``flex`` (CUDA, opt-in): ``flex_attention`` with the bias computed inside
  the score function.
"""
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .common import (LayerNorm2d, check_impl, flex_attention,
                     normalized_grid, reference_grid, resolve_impl)

# Elements of the (query-chunk x keys) bias block per head-batch kept alive at
# once by the fast path; bounds its peak memory at large resolutions. GPUs
# have the memory and want large launches, CPUs want cache-sized chunks.
_CHUNK_ELEMENTS = 1 << 21
_CHUNK_ELEMENTS_CUDA = 1 << 26


def _chunk_elements(device: torch.device) -> int:
    return _CHUNK_ELEMENTS_CUDA if device.type == 'cuda' else _CHUNK_ELEMENTS


class DeformableAttention(nn.Module):
    """Deformable multi-head attention on an NCHW map.

    Args:
        dim: channels ``C``.
        num_heads: attention heads ``h``.
        num_groups: offset groups ``g`` (``h % g == 0``).
        stride: downsampling ``r`` of the sampled key grid.
        offset_kernel: kernel ``ks`` of the depthwise offset conv.
        rpe_size: feature size ``Hq`` of this stage at the pre-training
            resolution; the bias table is ``(h, 2Hq-1, 2Hq-1)``.
        offset_range_factor: ``< 0`` uses raw offsets and clamps the sampling
            positions to [-1, 1] (DAT++); ``>= 0`` bounds offsets with tanh.
        use_pe: add the deformable relative position bias.
        no_off: ignore the predicted offsets (sample on the reference grid).
        impl: ``'auto'``/``'fast'`` or ``'reference'``.
    """

    def __init__(self, dim: int, num_heads: int, num_groups: int, stride: int,
                 offset_kernel: int, rpe_size: int,
                 offset_range_factor: float = -1, use_pe: bool = True,
                 no_off: bool = False, impl: str = 'auto'):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.num_groups = num_groups
        self.head_dim = dim // num_heads
        self.group_dim = dim // num_groups
        self.heads_per_group = num_heads // num_groups
        self.scale = self.head_dim ** -0.5
        self.stride = stride
        self.offset_range_factor = offset_range_factor
        self.use_pe = use_pe
        self.no_off = no_off
        self.impl = check_impl(impl)
        pad = 0 if offset_kernel == stride else offset_kernel // 2
        self.conv_offset = nn.Sequential(
            nn.Conv2d(self.group_dim, self.group_dim, offset_kernel, stride,
                      pad, groups=self.group_dim),
            LayerNorm2d(self.group_dim),
            nn.GELU(),
            nn.Conv2d(self.group_dim, 2, 1, 1, 0, bias=False),
        )
        self.proj_q = nn.Conv2d(dim, dim, 1)
        self.proj_k = nn.Conv2d(dim, dim, 1)
        self.proj_v = nn.Conv2d(dim, dim, 1)
        self.proj_out = nn.Conv2d(dim, dim, 1)
        if use_pe:
            self.rpe_table = nn.Parameter(
                torch.zeros(num_heads, 2 * rpe_size - 1, 2 * rpe_size - 1))
            nn.init.trunc_normal_(self.rpe_table, std=0.01)

    # ------------------------------------------------------------------ parts
    def sampling_positions(self, q: torch.Tensor) -> torch.Tensor:
        """Normalised (y, x) key positions, shape ``(B*g, Hk, Wk, 2)``."""
        B, _, H, W = q.shape
        q_off = q.reshape(B * self.num_groups, self.group_dim, H, W)
        ks = self.conv_offset[0].kernel_size[0]
        if self.conv_offset[0].padding[0] == 0 and (H < ks or W < ks):
            # unpadded offset conv (ks == stride) on a map smaller than its
            # kernel: zero-pad bottom/right so that one key is still sampled
            q_off = F.pad(q_off, (0, max(0, ks - W), 0, max(0, ks - H)))
        offset = self.conv_offset(q_off)
        Hk, Wk = offset.shape[-2:]
        if self.offset_range_factor >= 0 and not self.no_off:
            rng = offset.new_tensor([1.0 / max(Hk - 1, 1),
                                     1.0 / max(Wk - 1, 1)]).view(1, 2, 1, 1)
            offset = offset.tanh() * rng * self.offset_range_factor
        offset = offset.permute(0, 2, 3, 1)
        ref = torch.stack(torch.meshgrid(
            reference_grid(Hk, q.dtype, q.device),
            reference_grid(Wk, q.dtype, q.device), indexing='ij'), dim=-1)
        if self.no_off:
            offset = torch.zeros_like(offset)
        pos = offset + ref
        if self.offset_range_factor < 0:
            pos = pos.clamp(-1.0, 1.0)
        return pos

    def sample_keys(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Bilinear samples of ``x`` at ``pos``: ``(B, C, Hk, Wk)``."""
        B, C, H, W = x.shape
        sampled = F.grid_sample(
            x.reshape(B * self.num_groups, self.group_dim, H, W),
            pos.flip(-1), mode='bilinear', padding_mode='zeros',
            align_corners=True)
        return sampled.reshape(B, C, *pos.shape[1:3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_positions(x)[0]

    def forward_with_positions(
            self, x: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Output plus the sampling positions.

        Returns ``(out, pos)`` with ``pos`` of shape ``(B*g, Hk, Wk, 2)`` in
        (y, x) order, normalised to [-1, 1].
        """
        B, C, H, W = x.shape
        q = self.proj_q(x)
        pos = self.sampling_positions(q)
        sampled = self.sample_keys(x, pos)
        Ns = sampled.shape[-2] * sampled.shape[-1]
        k = self.proj_k(sampled).reshape(B * self.num_heads, self.head_dim, Ns)
        v = self.proj_v(sampled).reshape(B * self.num_heads, self.head_dim, Ns)
        q = q.reshape(B * self.num_heads, self.head_dim, H * W)
        impl = resolve_impl(self.impl, x)
        if impl == 'flex' and self.offset_range_factor >= 0:
            impl = 'fast'  # positions may leave the table: not fused
        if impl == 'reference':
            out = self._attend_reference(q, k, v, pos, H, W)
        elif impl == 'flex':
            out = self._attend_flex(q, k, v, pos, H, W)
        else:
            out = self._attend_fast(q, k, v, pos, H, W)
        out = self.proj_out(out.reshape(B, C, H, W))
        return out, pos

    # --------------------------------------------------------- reference path
    def _attend_reference(self, q, k, v, pos, H, W):
        Bh, c, M = q.shape
        attn = torch.einsum('bcm,bcn->bmn', q, k) * self.scale
        if self.use_pe:
            attn = attn + self._bias_reference(pos, H, W)
        attn = attn.softmax(dim=-1)
        return torch.einsum('bmn,bcn->bcm', attn, v)

    def _bias_reference(self, pos, H, W):
        Bg, Hk, Wk, _ = pos.shape
        B = Bg // self.num_groups
        q_grid = torch.stack(torch.meshgrid(
            normalized_grid(H, pos.dtype, pos.device),
            normalized_grid(W, pos.dtype, pos.device), indexing='ij'), dim=-1)
        displacement = (q_grid.reshape(1, H * W, 1, 2)
                        - pos.reshape(Bg, 1, Hk * Wk, 2)) * 0.5
        table = self.rpe_table.to(pos.dtype)[None].expand(B, -1, -1, -1)
        table = table.reshape(Bg, self.heads_per_group, *table.shape[-2:])
        bias = F.grid_sample(table, displacement.flip(-1), mode='bilinear',
                             padding_mode='zeros', align_corners=True)
        return bias.reshape(B * self.num_heads, H * W, Hk * Wk)

    # -------------------------------------------------------------- CUDA path
    def _attend_flex(self, q, k, v, pos, H, W):
        """Fused attention (flex_attention) with the bias computed inside the
        score function: nothing of size queries x keys is materialised."""
        Bh, c, M = q.shape
        Ns = k.shape[-1]
        h, g, hg = self.num_heads, self.num_groups, self.heads_per_group
        B = Bh // h

        def heads(t):
            return t.reshape(B, h, c, -1).transpose(2, 3)

        score_mod = None
        if self.use_pe:
            table = self.rpe_table.float()
            if table.shape[-2] == 1:
                table = torch.cat([table, table], 1)
            if table.shape[-1] == 1:
                table = torch.cat([table, table], 2)
            Ty, Tx = table.shape[-2:]
            py = pos[..., 0].float().reshape(B, g, Ns)
            px = pos[..., 1].float().reshape(B, g, Ns)
            # sizes as tensors, so that a new input size is not a new graph
            f32 = dict(dtype=torch.float32, device=q.device)
            consts = torch.tensor([
                2.0 / (H - 1) if H > 1 else 0.0, 1.0 if H > 1 else 0.0,
                2.0 / (W - 1) if W > 1 else 0.0, 1.0 if W > 1 else 0.0,
                self.rpe_table.shape[-2] - 1, self.rpe_table.shape[-1] - 1,
                Ty - 2, Tx - 2], **f32)
            width = torch.tensor(W, dtype=torch.int64, device=q.device)
            # flex's backward allows one indexing per captured tensor that
            # needs a gradient: one copy of the table per bilinear corner
            t00, t01, t10, t11 = (table.clone() for _ in range(4))

            def score_mod(score, b, hh, q_idx, kv_idx):
                i = q_idx // width
                j = q_idx - i * width
                grp = hh // hg
                # table coordinate of the displacement (query - key) / 2
                uy = ((i * consts[0] - consts[1] - py[b, grp, kv_idx]) * 0.5
                      + 1) * 0.5 * consts[4]
                ux = ((j * consts[2] - consts[3] - px[b, grp, kv_idx]) * 0.5
                      + 1) * 0.5 * consts[5]
                y0 = torch.minimum(torch.clamp(torch.floor(uy), min=0),
                                   consts[6])
                x0 = torch.minimum(torch.clamp(torch.floor(ux), min=0),
                                   consts[7])
                fy = uy - y0
                fx = ux - x0
                y0 = y0.to(torch.int32)
                x0 = x0.to(torch.int32)
                top = t00[hh, y0, x0] * (1 - fx) + t01[hh, y0, x0 + 1] * fx
                bot = (t10[hh, y0 + 1, x0] * (1 - fx)
                       + t11[hh, y0 + 1, x0 + 1] * fx)
                return score + top * (1 - fy) + bot * fy

        out = flex_attention(heads(q), heads(k), heads(v),
                             score_mod=score_mod, scale=self.scale)
        return out.transpose(2, 3).reshape(Bh, c, M)

    # -------------------------------------------------------------- fast path
    def _attend_fast(self, q, k, v, pos, H, W):
        # Works in the transposed (keys x queries) layout: q and the output
        # stay (B*h, c, H*W) like the NCHW maps, and the bias gathers run
        # along contiguous table rows.
        Bh, c, M = q.shape
        Ns = k.shape[-1]
        k = k.transpose(1, 2)  # (Bh, Ns, c)
        in_range = self.offset_range_factor < 0
        if self.use_pe and in_range:
            table = self.rpe_table.to(q.dtype)
            y0, fy = _corner(pos[..., 0], H, table.shape[-2])
            x0, fx = _corner(pos[..., 1], W, table.shape[-1])
        elif self.use_pe:
            # tanh-bounded offsets (DAT v1) can leave the table: zero padding
            # of the reference lookup
            bias_all = self._bias_reference(pos, H, W).reshape(Bh, H, W, Ns)
            bias_all = bias_all.permute(0, 3, 1, 2)
        rows = max(1, min(H, _chunk_elements(q.device) // max(1, Bh * W * Ns)))
        grad = torch.is_grad_enabled() and rows < H
        q = q.reshape(Bh, c, H, W)
        outs = []
        for i0 in range(0, H, rows):
            i1 = min(H, i0 + rows)
            if self.use_pe and in_range:
                fn = self._chunk_with_bias
                args = (q[:, :, i0:i1], k, v, table, y0[..., i0:i1],
                        fy[..., i0:i1], x0, fx)
            elif self.use_pe:
                fn = self._chunk_with_given_bias
                args = (q[:, :, i0:i1], k, v, bias_all[:, :, i0:i1])
            else:
                fn = self._chunk_plain
                args = (q[:, :, i0:i1], k, v)
            if grad and any(t.requires_grad for t in args):
                # Recompute the chunk in backward instead of keeping every
                # chunk's bias and attention block alive: this is what bounds
                # training memory.
                outs.append(checkpoint(fn, *args, use_reentrant=False))
            else:
                outs.append(fn(*args))
        out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        return out.reshape(Bh, c, M)

    def _chunk_plain(self, q, k, v):
        Bh, c, r, W = q.shape
        out = F.scaled_dot_product_attention(
            q.reshape(Bh, c, r * W).transpose(1, 2), k, v.transpose(1, 2),
            scale=self.scale)
        return out.transpose(1, 2).reshape(Bh, c, r, W)

    def _chunk_with_given_bias(self, q, k, v, bias):
        """``bias``: (Bh, Ns, r, W); returns (Bh, c, r, W)."""
        Bh, c, r, W = q.shape
        attn = torch.baddbmm(bias.reshape(Bh, -1, r * W), k,
                             q.reshape(Bh, c, r * W), alpha=self.scale)
        attn = attn.softmax(dim=1)
        return torch.bmm(v, attn).reshape(Bh, c, r, W)

    def _chunk_with_bias(self, q, k, v, table, y0, fy, x0, fx):
        bias = _separable_bias(table, self.num_groups, y0, fy, x0, fx)
        return self._chunk_with_given_bias(q, k, v, bias)


def _corner(p: torch.Tensor, n_query: int, size: int):
    """Table corners and fraction of the bias lookup along one axis.

    ``p``: key positions ``(B*g, Hk, Wk)`` along this axis, in [-1, 1]. The
    displacement ``(query - p) / 2`` lies in [-1, 1] and maps, as in
    ``grid_sample`` with ``align_corners=True``, to table coordinate
    ``u = (d + 1) / 2 * (size - 1)`` in ``[0, size - 1]``. Returns corner
    indices ``(2, B*g, Ns, n)`` (``i0 = min(floor(u), size - 2)`` and
    ``i0 + 1``, clamped for a 1-wide table) and ``u - i0`` ``(B*g, Ns, n)``.
    """
    Bg = p.shape[0]
    qs = normalized_grid(n_query, p.dtype, p.device)
    disp = (qs.view(1, 1, -1) - p.reshape(Bg, -1, 1)) * 0.5
    u = (disp + 1) * 0.5 * (size - 1)
    i0 = u.detach().floor().clamp(0, max(size - 2, 0))
    frac = u - i0
    i0 = i0.long()
    return torch.stack((i0, (i0 + 1).clamp(max=size - 1))), frac


def _separable_bias(table, groups, y0, fy, x0, fx):
    """Bilinear lookup of ``table`` (h, Ty, Tx) for a chunk of query rows.

    The reference samples the table at ``(query - pos) / 2`` for every
    (query, key) pair; the y part depends only on (query row, key) and the x
    part only on (query column, key), so the lookup splits into a row
    interpolation per (key, row) and a 2-tap column interpolation per
    (key, row, column), gathered along contiguous table rows.
    ``y0``: ``(2, B*g, Ns, r)``, ``fy``: ``(B*g, Ns, r)``; ``x0``:
    ``(2, B*g, Ns, W)``, ``fx``: ``(B*g, Ns, W)``.
    Returns the bias ``(B*h, Ns, r, W)``.
    """
    h, Ty, Tx = table.shape
    Bg, Ns, r = fy.shape
    W = fx.shape[-1]
    hg = h // groups
    B = Bg // groups
    tbl = table.reshape(groups, hg, Ty, Tx)
    g_idx = torch.arange(groups, device=table.device).view(1, groups, 1, 1)
    y = y0.reshape(2, B, groups, Ns, r)
    # (B, g, Ns, r, hg, Tx): table rows at the two row corners
    t0 = tbl[g_idx, :, y[0]]
    t1 = tbl[g_idx, :, y[1]]
    rows = torch.lerp(t0, t1, fy.reshape(B, groups, Ns, r, 1, 1))
    rows = rows.permute(0, 1, 4, 2, 3, 5)  # (B, g, hg, Ns, r, Tx)
    shape = (B, groups, hg, Ns, r, W)
    x = x0.reshape(2, B, groups, 1, Ns, 1, W)
    v0 = torch.gather(rows, 5, x[0].expand(shape))
    v1 = torch.gather(rows, 5, x[1].expand(shape))
    wx = fx.reshape(B, groups, 1, Ns, 1, W).expand(shape)
    return torch.lerp(v0, v1, wx).reshape(Bg * hg, Ns, r, W)
