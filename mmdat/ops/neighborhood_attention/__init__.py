"""The neighborhood attention op (block letter ``N``): implementations side
by side, one entry point.

=============  ============================================================
``cpu``        fused C++ window walk (``csrc/neighborhood_kernels.h``), custom ops
``triton``     fused Triton kernels (CUDA; CPU under ``TRITON_INTERPRET=1``)
``flex``       ``flex_attention`` with a window block mask (CUDA)
``chunked``    plain PyTorch, query tiles against key halos, masked SDPA
``gather``     plain PyTorch, one flat gather per tensor (portable: ONNX)
``reference``  the spec: explicit window gathers and einsums
=============  ============================================================
"""
import importlib

import torch

from ..dispatch import Context, choose, set_order
from . import cpu  # noqa: F401

try:
    importlib.import_module(f'{__name__}.triton')
except ImportError:
    pass
from . import flex  # noqa: F401,E402
from . import chunked  # noqa: F401,E402
from . import gather  # noqa: F401,E402
from . import reference  # noqa: F401,E402
from .reference import window_starts  # noqa: E402

OP = 'neighborhood_attention'
set_order(OP, ('cpu', 'triton', 'flex', 'chunked', 'gather', 'reference'))
__all__ = ['neighborhood_attention', 'window_starts']


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           rpb: torch.Tensor, *, kernel_size: int,
                           scale: float, impl: str = 'auto',
                           where: str = '') -> torch.Tensor:
    """2-D neighborhood attention with relative position bias.

    Args:
        q, k, v: ``(B, h, H, W, c)`` (any strides), ``H, W >= kernel_size``.
        rpb: ``(h, 2k-1, 2k-1)``.
    Returns:
        ``(B, h, H, W, c)`` (any strides).
    """
    if q.shape[2] < kernel_size or q.shape[3] < kernel_size:
        raise ValueError(f'neighborhood_attention needs H, W >= kernel_size '
                         f'({kernel_size}), got {tuple(q.shape[2:4])}')
    ctx = Context(
        device=q.device, dtype=q.dtype,
        requires_grad=torch.is_grad_enabled() and any(
            t.requires_grad for t in (q, k, v, rpb)),
        head_dim=q.shape[-1],
        facts=(('kernel_size', kernel_size), ('explicit', impl != 'auto')))
    fn = choose(OP, impl, ctx, where).fn
    return fn(q, k, v, rpb, kernel_size=kernel_size, scale=scale)
