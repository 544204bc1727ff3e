"""Deformable multi-head attention (block letter ``D``) of DAT / DAT++.

The module holds the parameters (official state-dict keys) and computes the
sampling positions and sampled keys; the attention itself is one op,
:func:`mmdat.ops.deformable_attention`, whose dispatcher chooses the
implementation (``mmdat/ops/deformable_attention/``).
"""
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...ops import bilinear_sample, deformable_attention
from .common import LayerNorm2d, check_impl, reference_grid


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
        impl: ``'auto'`` or an implementation of
            :mod:`mmdat.ops.deformable_attention` (``'cpu'``, ``'triton'``,
            ``'chunked'``, ``'reference'``).
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
        self.impl = check_impl(impl, 'deformable_attention')
        self.op_name = type(self).__name__  # set to the module path by explain
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
            if torch.jit.is_tracing():  # sizes are tensors (ONNX export)
                rng = torch.stack([
                    1.0 / torch.clamp(torch.as_tensor(n - 1), min=1).to(
                        offset.dtype) for n in (Hk, Wk)]).view(1, 2, 1, 1)
            else:
                rng = offset.new_tensor([1.0 / max(Hk - 1, 1),
                                         1.0 / max(Wk - 1, 1)]).view(
                                             1, 2, 1, 1)
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
        sampled = bilinear_sample(_group_batch(x, self.num_groups), pos,
                                  where=self.op_name)
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
        h, c, g = self.num_heads, self.head_dim, self.num_groups
        q = self.proj_q(x)
        pos = self.sampling_positions(q)
        sampled = self.sample_keys(x, pos)
        Ns = sampled.shape[-2] * sampled.shape[-1]
        # (B, h, n, c) views of the NCHW maps: the implementations take any
        # strides, so a channels-last map is never transposed here
        k = self.proj_k(sampled).reshape(B, h, c, Ns).transpose(2, 3)
        v = self.proj_v(sampled).reshape(B, h, c, Ns).transpose(2, 3)
        q = q.reshape(B, h, c, H * W).transpose(2, 3)
        out = deformable_attention(
            q, k, v, pos.reshape(B, g, Ns, 2),
            self.rpe_table if self.use_pe else None, H=H, W=W,
            scale=self.scale,
            positions_in_range=self.offset_range_factor < 0,
            impl=self.impl, where=self.op_name)
        # (B, h, M, c) -> (B, C, H, W); free when the memory is (B, M, h, c)
        out = out.transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)
        return self.proj_out(out), pos


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
