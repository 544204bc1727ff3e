"""Deformable attention with the fused C++ CPU kernels (``csrc/deform_bias_kernels.h``, validated and registered in ``csrc/ops.cpp``).

Registered with ``torch.library`` as ``mmdat::deformable_attention_cpu``
(and its backward), with fake kernels and autograd, so that
``torch.compile`` keeps the kernels in its graph, ``torch.export`` shows
them as one op and ``torch.jit.trace`` records them.

Inside the op: in float32 with a head dim that is a multiple of 16 on
AVX-512 builds, one kernel per (head, tile of query-row) computes bias,
scores, softmax and values in cache (forward), and one task per
(batch, head) recomputes the tiles and gives every gradient (backward).
Otherwise the C++ bias kernel fills one reused chunk buffer that
``scaled_dot_product_attention`` takes as its mask, chunk by chunk of query
rows, with a hand-written backward. Nothing of size (queries x keys)
outlives a chunk.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import library
from ..dispatch import Context, register
from . import chunked
from .lookup import at_least_two_wide, clamped_corner


def _can_run(ctx: Context) -> Optional[str]:
    if ctx.device.type != 'cpu':
        return f'needs CPU tensors, got {ctx.device.type}'
    if not ctx.fact('has_table', True):
        return 'no position bias (plain attention is faster in SDPA)'
    if not ctx.fact('positions_in_range', True):
        return ('positions may leave the table (tanh-bounded offsets); the '
                'kernels assume positions in [-1, 1]')
    if ctx.dtype not in (torch.float32, torch.float64, torch.bfloat16):
        return f'dtype {ctx.dtype} not supported'
    if not library.ops_loaded():
        return _unbuilt()
    return None


def _unbuilt() -> str:
    return ('the C++ kernels are not available (' +
            getattr(library, 'unavailable_reason', lambda: 'not built')() + ')')


@register('deformable_attention', 'cpu', can_run=_can_run)
def deformable_attention_cpu(q, k, v, pos, table, *, H, W, scale,
                             positions_in_range=True):
    """Fused C++ kernels (one-pass AVX-512, else bias kernel + SDPA)."""
    B, h, M, c = q.shape
    g = pos.shape[1]
    Ty, Tx = table.shape[1:]
    dtype = torch.promote_types(q.dtype, torch.float32)
    tab = at_least_two_wide(table.to(dtype)).reshape(g, h // g, *(
        max(Ty, 2), max(Tx, 2)))
    p = pos.to(dtype)
    y0, fy = clamped_corner(p[..., 0], H, Ty)
    x0, fx = clamped_corner(p[..., 1], W, Tx)
    # kernel layout: (B*g, n_query, Ns)
    y0, fy, x0, fx = (t.flatten(0, 1) for t in (y0, fy, x0, fx))
    out = torch.ops.mmdat.deformable_attention_cpu(
        q.to(dtype), k.to(dtype), v.to(dtype), tab, y0.int(), fy,
        x0.int(), fx, scale)
    # (B, M, h, c) memory: a channels-last map without a copy
    return out.transpose(1, 2).to(q.dtype)


def _fused(c: int, *tensors: Tensor) -> bool:
    return (c % 16 == 0 and all(t.dtype == torch.float32 for t in tensors)
            and library.fused_deform_attention_available())


def _rows(Bh: int, H: int, W: int, Ns: int) -> int:
    return max(1, min(H, chunked.CHUNK_ELEMENTS // max(1, Bh * W * Ns)))


@torch.library.custom_op('mmdat::deformable_attention_cpu', mutates_args=())
def _forward(q: Tensor, k: Tensor, v: Tensor, table: Tensor, y0: Tensor,
             fy: Tensor, x0: Tensor, fx: Tensor, scale: float) -> Tensor:
    """q ``(B, h, M, c)``, k/v ``(B, h, Ns, c)``, table ``(g, hg, Ty, Tx)``,
    y0/fy ``(B*g, H, Ns)``, x0/fx ``(B*g, W, Ns)`` -> out ``(B, M, h, c)``."""
    B, h, M, c = q.shape
    Ns = k.shape[2]
    H = y0.shape[1]
    W = M // H
    if _fused(c, q, table):
        kt = k.transpose(2, 3).reshape(B * h, c, Ns).contiguous()
        return torch.ops.mmdat.deform_attention_infer(
            q, kt, v.reshape(B * h, Ns, c).contiguous(), table, y0, fy, x0,
            fx, scale)
    qf = q.reshape(B * h, M, c).contiguous()
    kf = k.reshape(B * h, Ns, c).contiguous()
    vf = v.reshape(B * h, Ns, c).contiguous()
    out = q.new_empty(B, M, h, c)
    rows = _rows(B * h, H, W, Ns)
    buf = table.new_empty(B * h * rows * W * Ns)
    for i0 in range(0, H, rows):
        i1 = min(H, i0 + rows)
        bias = _bias_into(buf, table, y0[:, i0:i1], fy[:, i0:i1], x0, fx)
        chunk = F.scaled_dot_product_attention(
            qf[:, i0 * W:i1 * W], kf, vf, attn_mask=bias.to(q.dtype),
            scale=scale)
        out[:, i0 * W:i1 * W] = chunk.unflatten(0, (B, h)).transpose(1, 2)
        del bias
    return out


@_forward.register_fake
def _forward_fake(q, k, v, table, y0, fy, x0, fx, scale):
    B, h, M, c = q.shape
    return q.new_empty(B, M, h, c)


@torch.library.custom_op('mmdat::deformable_attention_cpu_backward',
                         mutates_args=())
def _backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
              table: Tensor, y0: Tensor, fy: Tensor, x0: Tensor, fx: Tensor,
              scale: float) -> List[Tensor]:
    """Gradients ``[dq, dk, dv, dtable, dfy, dfx]`` (shapes of the inputs)."""
    B, h, M, c = q.shape
    Ns = k.shape[2]
    g, hg, Ty, Tx = table.shape
    qf = q.reshape(B * h, M, c).contiguous()
    kf = k.reshape(B * h, Ns, c).contiguous()
    vf = v.reshape(B * h, Ns, c).contiguous()
    if _fused(c, q, table, grad):
        dq, dk, dv, dtab, dfy, dfx = torch.ops.mmdat.deform_attention_backward(
            grad, qf.view(B, h, M, c), kf, vf, out, table, y0, fy, x0, fx,
            scale)
        dtab = dtab.view(B, g, hg, Ty, Tx).sum(0)
        dfy = dfy.view(B, g, hg, *fy.shape[1:]).sum(2).flatten(0, 1)
        dfx = dfx.view(B, g, hg, *fx.shape[1:]).sum(2).flatten(0, 1)
    else:
        dq, dk, dv, dtab, dfy, dfx = _chunked_backward(
            grad, qf, kf, vf, out, table, y0, fy, x0, fx, scale, h)
    # contiguous, as the fake kernel says
    return [dq.reshape(B, h, M, c).contiguous(),
            dk.reshape(B, h, Ns, c).contiguous(),
            dv.reshape(B, h, Ns, c).contiguous(), dtab.contiguous(),
            dfy.contiguous(), dfx.contiguous()]


@_backward.register_fake
def _backward_fake(grad, q, k, v, out, table, y0, fy, x0, fx, scale):
    # the real gradients are contiguous whatever the inputs' strides
    return [t.new_empty(t.shape) for t in (q, k, v, table, fy, fx)]


def _setup_context(ctx, inputs, output):
    q, k, v, table, y0, fy, x0, fx, scale = inputs
    ctx.save_for_backward(q, k, v, table, y0, fy, x0, fx, output)
    ctx.scale = scale


def _autograd_backward(ctx, grad):
    q, k, v, table, y0, fy, x0, fx, out = ctx.saved_tensors
    # contiguous operands (the kernels copy strided ones anyway): under
    # inductor the saved views may come with other strides than traced
    q, k, v, grad, out = (t.contiguous() for t in (q, k, v, grad, out))
    dq, dk, dv, dtab, dfy, dfx = \
        torch.ops.mmdat.deformable_attention_cpu_backward(
            grad, q, k, v, out, table, y0, fy, x0, fx, ctx.scale)
    return dq, dk, dv, dtab, None, dfy, None, dfx, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def _bias_into(buf: Tensor, table: Tensor, y0: Tensor, fy: Tensor,
               x0: Tensor, fx: Tensor) -> Tensor:
    """The fused bias of a chunk written into the front of ``buf`` (reused
    by every chunk: a fresh block of this size would be page-faulted in each
    time, which costs more than filling it); ``(B*h, r*W, Ns)``."""
    Bg, r, Ns = y0.shape
    n = Bg * table.shape[1] * r * x0.shape[1] * Ns
    out = torch.ops.mmdat.deform_bias_out(table, y0, fy, x0, fx, buf[:n])
    return out.view(Bg * table.shape[1], -1, Ns)


def _chunked_backward(grad, q, k, v, out, table, y0, fy, x0, fx, scale,
                      heads) -> Tuple[Tensor, ...]:
    """Backward of the chunked path: each chunk's probabilities are
    recomputed and the softmax-attention gradient applied by hand, into
    preallocated gradients."""
    Bh, M, c = q.shape
    H = y0.shape[1]
    W = M // H
    Ns = k.shape[1]
    g = table.shape[0]
    out = out.transpose(1, 2).reshape(Bh, M, c)
    grad = grad.to(q.dtype).transpose(1, 2).reshape(Bh, M, c)
    grad_q = torch.empty_like(q)
    grad_k = torch.zeros_like(k)
    grad_v = torch.zeros_like(v)
    grad_table = torch.zeros_like(table)
    grad_fy = torch.zeros_like(fy)
    grad_fx = torch.zeros_like(fx)
    rows = _rows(Bh, H, W, Ns)
    bias_buf = table.new_empty(Bh * rows * W * Ns)
    grad_buf = q.new_empty(Bh * rows * W * Ns)
    for i0 in range(0, H, rows):
        i1 = min(H, i0 + rows)
        sl = slice(i0 * W, i1 * W)
        q_c, go_c = q[:, sl], grad[:, sl]
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
        g_table, g_fy, g_fx = torch.ops.mmdat.deform_bias_backward(
            grad_logits.to(table.dtype), table, y0_c, fy_c, x0, fx)
        del grad_logits
        # (B*g, r, hg, Ty, Tx) per (batch, query row) -> (g, hg, ...)
        grad_table += g_table.view(-1, g, *g_table.shape[1:]).sum((0, 2))
        grad_fy[:, i0:i1] = g_fy
        grad_fx += g_fx
    grad_q.mul_(scale)
    return grad_q, grad_k, grad_v, grad_table, grad_fy, grad_fx
