"""Neighborhood attention with the fused C++ CPU kernels
(``csrc/neighborhood_kernels.h``): each query's window is walked directly.

Registered with ``torch.library`` (``mmdat::neighborhood_attention_cpu``
with fake kernel and autograd, and ``..._cpu_inference``), so that
``torch.compile``, ``torch.export`` and ``torch.jit.trace`` keep the kernels.
With autograd off the inference kernel keeps no attention weights and reads
q/k/v straight from the strided views of the qkv projection (float32 with
AVX-512: vectorised across 16 queries of a row).
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import library
from ..dispatch import Context, register


def _can_run(ctx: Context) -> Optional[str]:
    if ctx.device.type != 'cpu':
        return f'needs CPU tensors, got {ctx.device.type}'
    if ctx.dtype not in (torch.float32, torch.float64, torch.bfloat16):
        return f'dtype {ctx.dtype} not supported'
    if not library.ops_loaded():
        return 'the C++ kernels are not available (' + getattr(
            library, 'unavailable_reason', lambda: 'not built')() + ')'
    return None


@register('neighborhood_attention', 'cpu', can_run=_can_run)
def neighborhood_attention_cpu(q, k, v, rpb, *, kernel_size, scale):
    """Fused C++ window walk (inference kernel when autograd is off)."""
    rpb = rpb.to(q.dtype)
    if torch.is_grad_enabled() and any(
            t.requires_grad for t in (q, k, v, rpb)):
        out, _ = torch.ops.mmdat.neighborhood_attention_cpu(
            q, k, v, rpb, kernel_size, scale)
        return out
    out = torch.ops.mmdat.neighborhood_attention_cpu_inference(
        q, k, v, rpb, kernel_size, scale)
    return out.permute(0, 3, 1, 2, 4)  # (B, H, W, h, c) memory


@torch.library.custom_op('mmdat::neighborhood_attention_cpu_inference',
                         mutates_args=())
def _inference(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, ks: int,
               scale: float) -> Tensor:
    """q/k/v ``(B, h, H, W, c)`` (any strides, unit channel stride) ->
    ``(B, H, W, h, c)``."""
    out = torch.ops.mmdat.neighborhood_attention_inference(
        *(t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v)),
        rpb, ks, scale)
    return out.permute(0, 2, 3, 1, 4).contiguous()


@_inference.register_fake
def _inference_fake(q, k, v, rpb, ks, scale):
    B, h, H, W, c = q.shape
    return q.new_empty(B, H, W, h, c)


@torch.library.custom_op('mmdat::neighborhood_attention_cpu',
                         mutates_args=())
def _forward(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, ks: int,
             scale: float) -> Tuple[Tensor, Tensor]:
    """Training forward: ``(out (B, h, H, W, c), attn (B, h, H, W, k*k))``."""
    out, attn = torch.ops.mmdat.neighborhood_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), rpb.contiguous(), ks,
        scale)
    return out.contiguous(), attn.contiguous()


@_forward.register_fake
def _forward_fake(q, k, v, rpb, ks, scale):
    B, h, H, W, c = q.shape
    return q.new_empty(B, h, H, W, c), q.new_empty(B, h, H, W, ks * ks)


@torch.library.custom_op('mmdat::neighborhood_attention_cpu_backward',
                         mutates_args=())
def _backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, attn: Tensor,
              ks: int, scale: float) -> List[Tensor]:
    """``[dq, dk, dv, drpb]``."""
    dq, dk, dv, drpb = torch.ops.mmdat.neighborhood_attention_backward(
        grad.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(),
        attn, ks, scale)
    return [dq, dk, dv, drpb]


@_backward.register_fake
def _backward_fake(grad, q, k, v, attn, ks, scale):
    h = q.shape[1]
    return [torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            q.new_empty(h, 2 * ks - 1, 2 * ks - 1)]


def _setup_context(ctx, inputs, output):
    q, k, v, rpb, ks, scale = inputs
    ctx.save_for_backward(q, k, v, output[1])
    ctx.ks, ctx.scale = ks, scale


def _autograd_backward(ctx, grad_out, grad_attn):
    q, k, v, attn = ctx.saved_tensors
    dq, dk, dv, drpb = torch.ops.mmdat.neighborhood_attention_cpu_backward(
        grad_out, q, k, v, attn, ctx.ks, ctx.scale)
    return dq, dk, dv, drpb, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)
