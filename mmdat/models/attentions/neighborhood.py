"""Neighborhood attention (block letter ``N``) of DAT++.

The semantics of natten's ``NeighborhoodAttention2D`` with dilation 1 as
used by DAT++: each query attends to the ``k x k`` keys of a window that
slides inward at the borders (never padded), with a relative position bias
``rpb`` of shape ``(h, 2k-1, 2k-1)``. Maps smaller than the kernel are
zero-padded on the bottom/right first and cropped back afterwards.

The module holds the parameters (natten's keys ``qkv``, ``rpb``, ``proj``);
the attention is one op, :func:`mmdat.ops.neighborhood_attention`, whose
dispatcher chooses the implementation
(``mmdat/ops/neighborhood_attention/``).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...ops import neighborhood_attention
from ...ops.neighborhood_attention import window_starts  # noqa: F401
from .common import check_impl


class NeighborhoodAttention(nn.Module):
    """2-D neighborhood attention on an NCHW map (keys ``qkv``, ``rpb``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 7,
                 impl: str = 'auto'):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.kernel_size = kernel_size
        self.impl = check_impl(impl, 'neighborhood_attention')
        self.op_name = type(self).__name__  # set to the module path by explain
        self.qkv = nn.Linear(dim, 3 * dim)
        self.rpb = nn.Parameter(
            torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        nn.init.trunc_normal_(self.rpb, std=0.02)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        k = self.kernel_size
        t = x.permute(0, 2, 3, 1)
        if torch.jit.is_tracing():
            # sizes are tensors when tracing (ONNX export): pad by tensor
            # amounts (0 is a no-op) so that no size is baked into the graph
            t = F.pad(t, (0, 0, 0, torch.clamp(torch.as_tensor(k - W), min=0),
                          0, torch.clamp(torch.as_tensor(k - H), min=0)))
        elif H < k or W < k:
            # the padded tokens go through qkv (bias included) like any other
            t = F.pad(t, (0, 0, 0, max(0, k - W), 0, max(0, k - H)))
        Hp, Wp = t.shape[1:3]
        qkv = self.qkv(t).reshape(B, Hp, Wp, 3, self.num_heads, self.head_dim)
        q, kk, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)  # (B, h, H, W, c)
        # q, k, v are strided views of the qkv output; an implementation
        # that returns (B, H, W, h, c) memory makes the reshape below free
        out = neighborhood_attention(q, kk, v, self.rpb,
                                     kernel_size=self.kernel_size,
                                     scale=self.scale, impl=self.impl,
                                     where=self.op_name)
        out = out.permute(0, 2, 3, 1, 4).reshape(B, Hp, Wp, C)
        out = out[:, :H, :W]
        return self.proj(out).permute(0, 3, 1, 2)
