"""Bilinear sampling of a feature map at normalised (y, x) positions.

``bilinear_sample(x, pos)`` is ``F.grid_sample(x, pos.flip(-1), 'bilinear',
'zeros', align_corners=True)``: ``x`` ``(N, C, H, W)``, ``pos``
``(N, Hk, Wk, 2)`` in (y, x) order, ``-1``/``1`` the centres of the first /
last pixel; corners outside the map count as zeros.

Two implementations:

* ``grid_sample``: the PyTorch kernel (fastest in eager mode). Not portable:
  ONNX's ``GridSample`` is missing from or miscompiled by some runtimes
  (TensorRT has computed it wrong without a warning).
* ``gather``: the four corners fetched with one ``gather`` and blended with
  plain arithmetic: only standard ops (ONNX ``GatherElements``, ``Floor``,
  ``Mul``...), any input size (no Python branch on shapes), differentiable
  in ``x`` and ``pos``. Chosen automatically under
  :func:`mmdat.ops.dispatch.portable` and during ONNX export.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from . import dispatch

OP = 'bilinear_sample'


def _always(ctx: dispatch.Context) -> Optional[str]:
    return None


@dispatch.register(OP, 'grid_sample', _always)
def grid_sample_impl(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``F.grid_sample`` (bilinear, zero padding, align_corners=True)."""
    dtype = torch.promote_types(x.dtype, pos.dtype)
    return F.grid_sample(x.to(dtype), pos.to(dtype).flip(-1), mode='bilinear',
                         padding_mode='zeros', align_corners=True)


@dispatch.register(OP, 'gather', _always, portable=True)
def gather_impl(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Gathers and arithmetic only (exportable; same results as
    ``grid_sample``)."""
    dtype = torch.promote_types(x.dtype, pos.dtype)
    N, C, H, W = x.shape
    Hk, Wk = pos.shape[1], pos.shape[2]
    pos = pos.to(dtype)
    # the unnormalisation of grid_sample with align_corners=True; for a
    # 1-pixel axis it maps every position to 0, as grid_sample does
    uy = (pos[..., 0] + 1) * 0.5 * (H - 1)
    ux = (pos[..., 1] + 1) * 0.5 * (W - 1)
    # floor has no gradient: the gradient w.r.t. pos flows through the
    # corner weights only, as in grid_sample's backward
    y0 = uy.detach().floor()
    x0 = ux.detach().floor()
    y1 = y0 + 1
    x1 = x0 + 1
    # corner weights in grid_sample's own form (same rounding)
    wy = torch.stack([y1 - uy, uy - y0])  # (2, N, Hk, Wk) for y0, y1
    wx = torch.stack([x1 - ux, ux - x0])
    ys = torch.stack([y0, y1])
    xs = torch.stack([x0, x1])
    # zero padding: a corner outside the map gets weight 0 and index 0, so
    # one gather serves all four corners and never reads out of range; a
    # NaN/inf position gives NaN weights (a NaN output, as grid_sample)
    vy = (ys >= 0) & (ys <= H - 1)
    vx = (xs >= 0) & (xs <= W - 1)
    wy = wy * vy.to(dtype)
    wx = wx * vx.to(dtype)
    iy = torch.where(vy, ys, 0).long()
    ix = torch.where(vx, xs, 0).long()
    # corners in the order (y0,x0), (y0,x1), (y1,x0), (y1,x1)
    idx = (iy[:, None] * W + ix[None, :]).reshape(4, N, Hk * Wk)
    weight = (wy[:, None] * wx[None, :]).reshape(4, N, 1, Hk * Wk)
    idx = idx.permute(1, 0, 2).reshape(N, 1, 4 * Hk * Wk)
    flat = x.to(dtype).reshape(N, C, H * W)
    vals = torch.gather(flat, 2, idx.expand(N, C, 4 * Hk * Wk))
    vals = vals.reshape(N, C, 4, Hk * Wk)
    out = (vals * weight.permute(1, 2, 0, 3)).sum(2)
    return out.reshape(N, C, Hk, Wk)


def bilinear_sample(x: torch.Tensor, pos: torch.Tensor, impl: str = 'auto',
                    where: str = '') -> torch.Tensor:
    """Bilinear samples of ``x`` ``(N, C, H, W)`` at ``pos``
    ``(N, Hk, Wk, 2)`` ((y, x) in [-1, 1], align_corners=True, zeros
    outside): ``(N, C, Hk, Wk)``.

    ``impl``: ``'auto'`` (``grid_sample``; ``gather`` when only portable
    ops may run), ``'grid_sample'`` or ``'gather'``. ``where`` names the
    caller in the debug log.
    """
    if x.dim() != 4:
        raise ValueError(f'bilinear_sample: x must be (N, C, H, W), got '
                         f'shape {tuple(x.shape)}')
    if pos.dim() != 4 or pos.shape[-1] != 2 or pos.shape[0] != x.shape[0]:
        raise ValueError(f'bilinear_sample: pos must be (N, Hk, Wk, 2) with '
                         f'N={x.shape[0]} as x, got shape {tuple(pos.shape)}')
    ctx = dispatch.Context(
        device=x.device, dtype=x.dtype,
        requires_grad=torch.is_grad_enabled() and (x.requires_grad
                                                   or pos.requires_grad))
    return dispatch.choose(OP, impl, ctx, where=where).fn(x, pos)
