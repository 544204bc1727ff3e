"""The deformable attention op (block letter ``D``): implementations side by
side, one entry point.

=============  ============================================================
``reference``  the spec: materialised displacements, ``grid_sample`` bias
``chunked``    plain PyTorch, row chunks, gathered bias + SDPA (portable)
``cpu``        fused C++ kernels (``csrc/deform_bias_kernels.h``, validated and registered in ``csrc/ops.cpp``), custom ops
``triton``     fused Triton kernels (CUDA; CPU under ``TRITON_INTERPRET=1``)
=============  ============================================================

``impl='auto'`` takes the first that can run in the order ``cpu``,
``triton`` (not yet: see ``dispatch.AUTO_EXCLUDED``), ``reference`` (on
CUDA, up to ``reference.CUDA_AUTO_MAX_SCORES`` scores per call: the fastest
there as measured), ``chunked``; see :mod:`mmdat.ops.dispatch` for why one
cannot run. (A ``flex_attention`` implementation was removed: on an H200 it
was slower than both Triton and the reference, its gradients unverified.)
"""
import importlib
from typing import Optional

import torch

from ..dispatch import Context, choose, set_order
from . import cpu  # noqa: F401

try:  # the Triton kernels need triton; without it they are not registered
    importlib.import_module(f'{__name__}.triton')
except ImportError:
    pass
from . import chunked  # noqa: F401,E402
from . import reference  # noqa: F401,E402

OP = 'deformable_attention'
set_order(OP, ('cpu', 'triton', 'reference', 'chunked'))


def deformable_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         pos: torch.Tensor, table: Optional[torch.Tensor], *,
                         H: int, W: int, scale: float,
                         positions_in_range: bool = True,
                         impl: str = 'auto',
                         where: str = '') -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` with the deformable position bias.

    Args:
        q: ``(B, h, H*W, c)``; k, v: ``(B, h, Ns, c)`` (any strides).
        pos: key positions ``(B, g, Ns, 2)``, (y, x), normalised to [-1, 1].
        table: the ``rpe_table`` ``(h, Ty, Tx)``, or None for no bias.
        positions_in_range: the caller guarantees ``pos`` in [-1, 1] (DAT++
            clamps them); False for tanh-bounded offsets (DAT v1).
        impl: ``'auto'`` or an implementation name.
        where: the calling module's name, for the dispatch log.
    Returns:
        ``(B, h, H*W, c)`` (any strides).
    """
    ctx = Context(
        device=q.device, dtype=q.dtype,
        requires_grad=torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, pos, table)),
        head_dim=q.shape[-1],
        facts=(('has_table', table is not None),
               ('positions_in_range', positions_in_range),
               ('groups', pos.shape[1]), ('explicit', impl != 'auto'),
               ('scores', q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2])))
    fn = choose(OP, impl, ctx, where).fn
    return fn(q, k, v, pos, table, H=H, W=W, scale=scale,
              positions_in_range=positions_in_range)
