"""Deformable multi-head attention (block letter ``D``) of DAT / DAT++.

Three exact formulations of the same computation:

* ``reference``: the straightforward one of the spec, materialising the
  (queries x keys x 2) displacement tensor, a ``grid_sample`` of the position
  bias table at every displacement, and the full attention matrix.
* ``fast`` (the default on CPU, and for training on CUDA): queries are
  processed in chunks of rows; each chunk's bias is a bilinear lookup of the
  table whose row part depends only on (query row, key) and column part only
  on (query column, key), computed in the (queries x keys) layout and handed
  to ``scaled_dot_product_attention`` as its mask. On CPU the lookup is a
  fused C++ kernel (``csrc/deform_bias.cpp``) and one autograd Function
  runs all chunks with a hand-written backward; in float32 on AVX-512
  machines the forward is one kernel that computes bias, scores, softmax
  and values per tile of queries in cache. Elsewhere (CUDA, under
  ``torch.compile``, or without a compiler) the same lookup is done with
  gathers and the chunks are checkpointed. Neither the displacement nor the
  full bias/attention matrix ever exists.
* ``flex`` (CUDA; what ``auto`` uses for inference there): ``flex_attention``
  with the bias computed inside the score function.
"""
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .common import (LayerNorm2d, check_impl, flex_attention,
                     normalized_grid, reference_grid, resolve_impl)
from ...ops.library import fused_deform_attention_available, use_cpu_ops

# Elements of the (query-chunk x keys) bias block per head-batch kept alive at
# once by the fast path; bounds its peak memory at large resolutions. GPUs
# have the memory and want large launches, CPUs want cache-sized chunks.
_CHUNK_ELEMENTS = 1 << 22
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
        impl: ``'auto'``, ``'fast'``, ``'reference'`` or ``'flex'`` (CUDA).
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
        q_off = _group_batch(q, self.num_groups)
        ks = self.conv_offset[0].kernel_size[0]
        if self.conv_offset[0].padding[0] == 0 and (H < ks or W < ks):
            # unpadded offset conv (ks == stride) on a map smaller than its
            # kernel: zero-pad bottom/right so that one key is still sampled
            q_off = F.pad(q_off, (0, max(0, ks - W), 0, max(0, ks - H)))
        # Positions are kept in at least float32 under autocast: in bf16 a
        # coordinate near 1 is only known to 2^-8, half a cell of the 111-wide
        # stage-1 bias table.
        offset = self.conv_offset(q_off).to(
            torch.promote_types(q.dtype, torch.float32))
        Hk, Wk = offset.shape[-2:]
        if self.offset_range_factor >= 0 and not self.no_off:
            rng = offset.new_tensor([1.0 / max(Hk - 1, 1),
                                     1.0 / max(Wk - 1, 1)]).view(1, 2, 1, 1)
            offset = offset.tanh() * rng * self.offset_range_factor
        offset = offset.permute(0, 2, 3, 1)
        ref = torch.stack(torch.meshgrid(
            reference_grid(Hk, offset.dtype, q.device),
            reference_grid(Wk, offset.dtype, q.device), indexing='ij'), dim=-1)
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
            _group_batch(x, self.num_groups),
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
        out = self.proj_out(out)
        return out, pos

    # --------------------------------------------------------- reference path
    def _attend_reference(self, q, k, v, pos, H, W):
        Bh, c, M = q.shape
        attn = torch.einsum('bcm,bcn->bmn', q, k) * self.scale
        if self.use_pe:
            attn = attn + self._bias_reference(pos, H, W)
        attn = attn.softmax(dim=-1)
        out = torch.einsum('bmn,bcn->bcm', attn, v)
        return out.reshape(-1, self.dim, H, W)

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
            table = _at_least_two_wide(self.rpe_table.float())
            Ty, Tx = table.shape[-2:]
            py = pos[..., 0].float().reshape(B, g, Ns).contiguous()
            px = pos[..., 1].float().reshape(B, g, Ns).contiguous()
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
        return out.transpose(2, 3).reshape(-1, self.dim, H, W)

    # -------------------------------------------------------------- fast path
    def _bias_lookup(self, pos, H, W):
        """Bias table ``(g, hg, Ty, Tx)`` in >= float32 and the lookup's
        row/column corners and fractions (see :func:`_corner`)."""
        table = _at_least_two_wide(self.rpe_table.to(pos.dtype))
        table = table.reshape(self.num_groups, self.heads_per_group,
                              *table.shape[1:])
        y0, fy = _corner(pos[..., 0], H, self.rpe_table.shape[1])
        x0, fx = _corner(pos[..., 1], W, self.rpe_table.shape[2])
        return table, y0, fy, x0, fx

    def _attend_fused_cpu(self, q, k, v, pos, H, W):
        """float32 CPU inference: one kernel per (head, query-row tile) does
        bias, scores, softmax and values in cache
        (``torch.ops.mmdat.deform_attention_infer``)."""
        table, y0, fy, x0, fx = self._bias_lookup(pos, H, W)
        # (B, h, M, c): a view of q (of a channels-last map), no copy
        q = q.unflatten(0, (-1, self.num_heads)).transpose(2, 3)
        out = torch.ops.mmdat.deform_attention_infer(
            q, k.contiguous(), v.transpose(1, 2).contiguous(), table,
            y0.int(), fy, x0.int(), fx, self.scale)
        return out.view(-1, H, W, self.dim).permute(0, 3, 1, 2)

    def _attend_fast(self, q, k, v, pos, H, W):
        # Queries are processed in chunks of rows; each chunk's bias is built
        # in the (queries x keys) layout and handed to
        # scaled_dot_product_attention as its additive mask, so neither the
        # displacement nor the full bias/attention matrix ever exists.
        Bh, c, M = q.shape
        if (self.use_pe and self.offset_range_factor < 0 and use_cpu_ops(q)
                and not torch.is_grad_enabled()
                and _fused_kernel_applies(c, q, pos)):
            return self._attend_fused_cpu(q, k, v, pos, H, W)
        # (Bh, M, c) and (Bh, Ns, c), contiguous: the fused CPU kernel of
        # scaled_dot_product_attention needs it (else the slow math path)
        q = q.transpose(1, 2).contiguous()
        k = k.transpose(1, 2).contiguous()
        v = v.transpose(1, 2).contiguous()
        if not self.use_pe:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
            return out.transpose(1, 2).reshape(-1, self.dim, H, W)
        Ns = k.shape[1]
        rows = max(1, min(H, _chunk_elements(q.device) // max(1, Bh * W * Ns)))
        if self.offset_range_factor >= 0:
            # tanh-bounded offsets (DAT v1) can leave the table: zero padding
            # of the reference lookup, materialised once
            bias = self._bias_reference(pos, H, W)
            out = _over_row_chunks(
                lambda i0, i1: _plain_chunk(q[:, i0 * W:i1 * W], k, v,
                                            bias[:, i0 * W:i1 * W],
                                            self.scale), H, rows)
            return out.reshape(-1, self.dim, H, W)
        table, y0, fy, x0, fx = self._bias_lookup(pos, H, W)
        if use_cpu_ops(q):
            out = _BiasedAttention.apply(q, k, v, table, y0.int(), fy,
                                         x0.int(), fx, self.scale, rows,
                                         self.num_heads)
            # (B, M, h, c) memory: a channels-last map without a copy
            return out.view(-1, H, W, out.shape[2] * c).permute(0, 3, 1, 2)

        def chunk(i0, i1):
            args = (q[:, i0 * W:i1 * W], k, v, table, y0[:, i0:i1],
                    fy[:, i0:i1], x0, fx, self.scale)
            if torch.is_grad_enabled() and rows < H and any(
                    t.requires_grad for t in args[:8]):
                # recompute the chunk in backward instead of keeping every
                # chunk's bias and attention block alive
                return checkpoint(_biased_chunk, *args, use_reentrant=False)
            return _biased_chunk(*args)

        return _over_row_chunks(chunk, H, rows).reshape(-1, self.dim, H, W)


def _group_batch(t: torch.Tensor, g: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B*g, C/g, H, W)``.

    A channels-last map stays channels-last, copied in runs of ``C/g``
    channels: a plain reshape gives strides that no convolution kernel takes,
    and the convolution then transposes the whole map to NCHW (~10x slower).
    """
    if g == 1:
        return t
    B, C, H, W = t.shape
    if t.is_contiguous() or not t.is_contiguous(
            memory_format=torch.channels_last):
        return t.reshape(B * g, C // g, H, W)
    runs = t.permute(0, 2, 3, 1).reshape(B, H, W, g, C // g)
    runs = runs.permute(0, 3, 1, 2, 4).contiguous().view(B * g, H, W, C // g)
    return runs.permute(0, 3, 1, 2)


def _at_least_two_wide(table: torch.Tensor) -> torch.Tensor:
    """The bias table ``(h, Ty, Tx)`` with a 1-wide axis repeated (rpe size
    1), so that both bilinear corners always exist; lookups into it land on
    the first row/column (coordinate 0), as in the 1-wide original."""
    return table.repeat(1, 2 if table.shape[1] == 1 else 1,
                        2 if table.shape[2] == 1 else 1)


def _over_row_chunks(chunk, H: int, rows: int) -> torch.Tensor:
    """Concatenate ``chunk(i0, i1)`` outputs ``(B*h, rows*W, c)`` over the
    query rows; returns ``(B*h, c, H*W)``."""
    outs = [chunk(i0, min(H, i0 + rows)) for i0 in range(0, H, rows)]
    out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2)


def _corner(p: torch.Tensor, n_query: int, size: int):
    """Table corner and fraction of the bias lookup along one axis.

    ``p``: key positions ``(B*g, Hk, Wk)`` along this axis, in [-1, 1]. The
    displacement ``(query - p) / 2`` lies in [-1, 1] and maps, as in
    ``grid_sample`` with ``align_corners=True``, to table coordinate
    ``u = (d + 1) / 2 * (size - 1)`` in ``[0, size - 1]``. Returns the lower
    corner ``i0 = min(floor(u), max(size - 2, 0))`` (the upper one is
    ``i0 + 1`` in a table padded to >= 2) and ``u - i0``, both
    ``(B*g, n_query, Ns)``.
    """
    Bg = p.shape[0]
    qs = normalized_grid(n_query, p.dtype, p.device)
    disp = (qs.view(1, -1, 1) - p.reshape(Bg, 1, -1)) * 0.5
    u = (disp + 1) * 0.5 * (size - 1)
    i0 = u.detach().floor().clamp(0, max(size - 2, 0))
    return i0.long(), u - i0


def _table_rows(table, y0, fy):
    """Row part of the lookup: ``(B*g, hg, r, Ns, Tx)``, the table row
    interpolated at every (query row, key). ``table``: ``(g, hg, Ty, Tx)``;
    ``y0``/``fy``: ``(B*g, r, Ns)``."""
    g, hg = table.shape[:2]
    Bg = y0.shape[0]
    gi = (torch.arange(Bg, device=y0.device) % g).view(Bg, 1, 1, 1)
    hi = torch.arange(hg, device=y0.device).view(1, hg, 1, 1)
    y = y0[:, None]
    return torch.lerp(table[gi, hi, y], table[gi, hi, y + 1],
                      fy[:, None, :, :, None])


def _column_lerp(rows, x0, fx):
    """Column part, pure PyTorch: ``(B*g, hg, r, W, Ns)`` from ``rows``
    ``(B*g, hg, r, Ns, Tx)`` and ``x0``/``fx`` ``(B*g, W, Ns)``. Together
    with :func:`_table_rows`, the same as the fused
    ``torch.ops.mmdat.deform_bias`` (``csrc/deform_bias.cpp``)."""
    Bg, hg, r, Ns, Tx = rows.shape
    W = x0.shape[1]
    flat = rows.reshape(Bg, hg, r, Ns * Tx)
    idx = (x0 + torch.arange(Ns, device=x0.device) * Tx).reshape(Bg, 1, 1, -1)
    shape = (Bg, hg, r, W * Ns)
    idx = idx.expand(shape)
    out = torch.lerp(torch.gather(flat, 3, idx),
                     torch.gather(flat, 3, idx + 1),
                     fx.reshape(Bg, 1, 1, -1).expand(shape))
    return out.reshape(Bg, hg, r, W, Ns)


def _biased_chunk(q, k, v, table, y0, fy, x0, fx, scale):
    """One chunk of queries ``(Bh, r*W, c)``, pure PyTorch (differentiable)."""
    bias = _column_lerp(_table_rows(table, y0, fy), x0, fx)
    return _plain_chunk(q, k, v, bias.reshape(q.shape[0], q.shape[1], -1),
                        scale)


def _fused_kernel_applies(head_dim: int, *tensors: torch.Tensor) -> bool:
    """Whether ``torch.ops.mmdat.deform_attention_infer`` (float32, head dim
    a multiple of 16, AVX-512 builds) takes these inputs."""
    return (head_dim % 16 == 0
            and all(t.dtype == torch.float32 for t in tensors)
            and fused_deform_attention_available())


def _chunk_buffer(like: torch.Tensor, Bh: int, rows: int, W: int,
                  Ns: int) -> torch.Tensor:
    """Flat buffer for one chunk's (queries x keys) block, reused by every
    chunk: a fresh block of this size would be page-faulted in each time,
    which costs more than filling it."""
    return like.new_empty(Bh * rows * W * Ns)


def _bias_into(buf, table, y0, fy, x0, fx):
    """The fused bias of a chunk, written into the front of ``buf``;
    ``(B*h, r*W, Ns)``."""
    Bg, r, Ns = y0.shape
    n = Bg * table.shape[1] * r * x0.shape[1] * Ns
    out = torch.ops.mmdat.deform_bias_out(table, y0, fy, x0, fx, buf[:n])
    return out.view(Bg * table.shape[1], -1, Ns)


def _plain_chunk(q, k, v, bias, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                          scale=scale)


class _BiasedAttention(torch.autograd.Function):
    """Deformable attention with the fused CPU kernels, chunk by chunk of
    ``rows`` query rows.

    Forward: the one-pass kernel (float32, AVX-512 builds), else per chunk
    bias (fused kernel) + ``scaled_dot_product_attention`` into one
    preallocated output; only the inputs and the output are kept.
    Backward recomputes each chunk's bias and attention probabilities and
    applies the softmax-attention gradient by hand, into preallocated
    gradients, so nothing of size (queries x keys) outlives a chunk and the
    same-sized chunk buffers are reused by the allocator.
    """

    @staticmethod
    def forward(ctx, q, k, v, table, y0, fy, x0, fx, scale, rows, heads):
        Bh, M, c = q.shape
        H = y0.shape[1]
        W = M // H
        if _fused_kernel_applies(c, q, table):
            out = torch.ops.mmdat.deform_attention_infer(
                q.view(-1, heads, M, c), k.transpose(1, 2).contiguous(), v,
                table, y0, fy, x0, fx, scale)
        else:
            out = q.new_empty(Bh // heads, M, heads, c)
            bias_buf = _chunk_buffer(table, Bh, rows, W, k.shape[1])
            for i0 in range(0, H, rows):
                i1 = min(H, i0 + rows)
                bias = _bias_into(bias_buf, table, y0[:, i0:i1],
                                  fy[:, i0:i1], x0, fx)
                chunk = _plain_chunk(q[:, i0 * W:i1 * W], k, v, bias, scale)
                out[:, i0 * W:i1 * W] = chunk.unflatten(
                    0, (-1, heads)).transpose(1, 2)
                del bias
        ctx.save_for_backward(q, k, v, table, y0, fy, x0, fx, out)
        ctx.scale, ctx.rows, ctx.heads = scale, rows, heads
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors  # unpacked once (checkpointing)
        q, k, v, table, y0, fy, x0, fx, out = saved
        scale, rows = ctx.scale, ctx.rows
        Bh, M, c = q.shape
        H = y0.shape[1]
        W = M // H
        need_bias = any(ctx.needs_input_grad[i] for i in (3, 5, 7))
        if _fused_kernel_applies(c, q, table, grad_out):
            return _BiasedAttention.fused_backward(
                ctx, grad_out, saved) + (None,) * 3
        # (B, M, h, c) -> (B*h, M, c)
        out = out.transpose(1, 2).reshape(Bh, M, c)
        grad_out = grad_out.to(q.dtype).transpose(1, 2).reshape(Bh, M, c)
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros_like(k)
        grad_v = torch.zeros_like(v)
        g = table.shape[0]
        grad_table = torch.zeros_like(table) if need_bias else None
        grad_fy = torch.zeros_like(fy) if need_bias else None
        grad_fx = torch.zeros_like(fx) if need_bias else None
        Ns = k.shape[1]
        bias_buf = _chunk_buffer(table, Bh, rows, W, Ns)
        grad_buf = _chunk_buffer(q, Bh, rows, W, Ns)
        for i0 in range(0, H, rows):
            i1 = min(H, i0 + rows)
            sl = slice(i0 * W, i1 * W)
            q_c, go_c = q[:, sl], grad_out[:, sl]
            y0_c, fy_c = y0[:, i0:i1], fy[:, i0:i1]
            # logits, then probabilities, in place in the bias buffer
            attn = _bias_into(bias_buf, table, y0_c, fy_c, x0, fx).to(q.dtype)
            attn.baddbmm_(q_c, k.transpose(1, 2), alpha=scale)
            torch.ops.aten._softmax.out(attn, -1, False, out=attn)
            grad_v.baddbmm_(attn.transpose(1, 2), go_c)
            grad_attn = torch.bmm(go_c, v.transpose(1, 2),
                                  out=grad_buf[:attn.numel()].view_as(attn))
            delta = (go_c * out[:, sl]).sum(-1, keepdim=True)
            grad_logits = grad_attn.sub_(delta).mul_(attn)  # softmax backward
            del attn
            torch.bmm(grad_logits, k, out=grad_q[:, sl])
            grad_k.baddbmm_(grad_logits.transpose(1, 2), q_c, alpha=scale)
            if need_bias:
                g_table, g_fy, g_fx = torch.ops.mmdat.deform_bias_backward(
                    grad_logits, table, y0_c, fy_c, x0, fx)
                del grad_logits
                # (B*g, r, hg, Ty, Tx) per (batch, query row) -> (g, hg, ..)
                grad_table += g_table.view(-1, g, *g_table.shape[1:]).sum(
                    (0, 2))
                grad_fy[:, i0:i1] = g_fy
                grad_fx += g_fx
        grad_q.mul_(scale)
        return (grad_q, grad_k, grad_v, grad_table, None, grad_fy, None,
                grad_fx, None, None, None)

    @staticmethod
    def fused_backward(ctx, grad_out, saved):
        """The one-pass backward kernel (float32, AVX-512 builds): per
        (batch, head) task, the per-tile recomputation and all gradients in
        cache; per-task table/fy/fx gradients are summed here."""
        q, k, v, table, y0, fy, x0, fx, out = saved
        Bh, M, c = q.shape
        g, hg, Ty, Tx = table.shape
        B = Bh // (g * hg)
        dq, dk, dv, dtab, dfy, dfx = torch.ops.mmdat.deform_attention_backward(
            grad_out, q.view(B, g * hg, M, c), k, v, out, table, y0, fy, x0,
            fx, ctx.scale)
        grad_table = dtab.view(B, g, hg, Ty, Tx).sum(0)
        grad_fy = dfy.view(B, g, hg, *fy.shape[1:]).sum(2).flatten(0, 1)
        grad_fx = dfx.view(B, g, hg, *fx.shape[1:]).sum(2).flatten(0, 1)
        return (dq, dk, dv, grad_table, None, grad_fy, None, grad_fx)
