"""Small building blocks shared by the attention kinds and the backbone."""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...ops.dispatch import is_portable
from ...ops.deformable_attention.lookup import query_grid

# what ``impl=`` accepts: 'auto' or an implementation name of either kind
# (an op without an implementation of that name runs 'auto'; see check_impl)
def check_impl(impl: str, op: Optional[str] = None) -> str:
    """Validate an attention implementation name.

    With ``op``, the name must be ``'auto'`` or one of that op's
    implementations (:func:`mmdat.ops.dispatch.names`); without, one of
    any attention op's. ``'fast'`` (the old name of ``'auto'``) is accepted.
    """
    from ...ops import dispatch
    ops = [op] if op else ['deformable_attention', 'neighborhood_attention']
    valid = {dispatch.AUTO, 'fast'}
    for o in ops:
        valid.update(dispatch.names(o))
    if impl not in valid:
        raise ValueError(f'impl must be one of {sorted(valid)}, got {impl!r}')
    return impl


def onednn_fusable(x: torch.Tensor) -> bool:
    """Whether the fused oneDNN (mkldnn) CPU convolutions may replace plain
    ops for ``x``: a float CPU tensor, no autocast (they are not
    autocast-aware), not under ``torch.compile`` (which fuses by itself)
    or a JIT trace (FLOP counters trace the plain convolutions)."""
    return (x.device.type == 'cpu'
            and x.dtype in (torch.float32, torch.bfloat16)
            and not torch.is_autocast_enabled('cpu')
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and not is_portable()
            and torch.backends.mkldnn.is_available())


def cpu_inference_fusable(x: torch.Tensor) -> bool:
    """:func:`onednn_fusable` with autograd off: in-place tricks allowed."""
    return not torch.is_grad_enabled() and onednn_fusable(x)


def conv_add(conv: nn.Conv2d, x: torch.Tensor,
             residual: torch.Tensor) -> torch.Tensor:
    """``residual + conv(x)``; on CPU one oneDNN convolution with the
    addition as a post-op (bit-identical, one pass over the output instead
    of three), with the convolution's own backward in training."""
    if (onednn_fusable(x) and conv.padding_mode == 'zeros'
            and isinstance(conv.padding, tuple)
            and residual.dtype == x.dtype == conv.weight.dtype
            and not has_hooks(conv)):
        if torch.is_grad_enabled():
            return _ConvAdd.apply(x, residual, conv.weight, conv.bias,
                                  conv.stride, conv.padding, conv.dilation,
                                  conv.groups)
        return _conv_add_onednn(x, residual, conv.weight, conv.bias,
                                conv.stride, conv.padding, conv.dilation,
                                conv.groups)
    return add_into_branch(residual, conv(x))


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (FLOP counters, feature
    extractors): the fused op bypasses the module call, so then it is not
    used."""
    from torch.nn.modules import module as m
    return bool(module._forward_hooks or module._forward_pre_hooks
                or m._global_forward_hooks or m._global_forward_pre_hooks)


def _conv_add_onednn(x, residual, weight, bias, stride, padding, dilation,
                     groups):
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual, weight, bias, list(padding), list(stride),
        list(dilation), groups, 'add', None, None, [], None)


class _ConvAdd(torch.autograd.Function):
    """``residual + conv2d(x)`` through the fused oneDNN op; backward: the
    residual's gradient is the output's, the rest is the convolution's."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, stride, padding, dilation,
                groups):
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups, bias is not None)
        return _conv_add_onednn(x, residual, weight, bias, stride, padding,
                                dilation, groups)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conf
        need = ctx.needs_input_grad
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if has_bias else None,
            list(stride), list(padding), list(dilation), False, [0, 0],
            groups, [need[0], need[2], has_bias and need[3]])
        return (gx, grad if need[1] else None, gw, gb, None, None, None,
                None)


def add_into_branch(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``x + branch``, written into ``branch`` where that gives the same
    result (same dtype and shape): one map-sized allocation less, which on
    CPU costs more (page faults) than the addition.

    ``branch`` must be a fresh output whose producer does not keep it for
    its backward (a convolution, a linear layer, drop path). Views (a
    permuted linear output) are added out of place: in training an in-place
    change of a view makes autograd clone the whole base in backward.
    """
    if torch.compiler.is_compiling():
        return x + branch  # inductor plans its own buffers
    if (branch.dtype == x.dtype and branch.shape == x.shape
            and not (branch._is_view() and torch.is_grad_enabled())):
        return branch.add_(x)
    return x + branch


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dim of an NCHW map.

    The LayerNorm lives in attribute ``norm`` so that the state-dict keys are
    ``<prefix>.norm.weight`` / ``<prefix>.norm.bias`` as in the official code.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.norm.normalized_shape, self.norm.weight,
                         self.norm.bias, self.norm.eps)
        return x.permute(0, 3, 1, 2)


# positions 0..n-1 mapped to [-1, 1] (the query grid of the spec)
normalized_grid = query_grid


def reference_grid(n: int, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """Reference points of the deformable attention along one axis.

    ``linspace(0.5, n - 0.5, n) / (n - 1) * 2 - 1``: not centred, but this is
    what the published weights were trained with. For ``n == 1`` (where the
    official code divides by zero) the single point is the centre (0).
    """
    if torch.jit.is_tracing():
        # branch-free and without linspace (exported as a division by
        # n - 1): bit-identical to the form below for n >= 2, 0 for n == 1
        d = torch.clamp(torch.as_tensor(n - 1), min=1)
        return (torch.arange(n, dtype=dtype, device=device) + 0.5) / d * 2 - 1
    if n == 1:
        return torch.zeros(1, dtype=dtype, device=device)
    return torch.linspace(0.5, n - 0.5, n, dtype=dtype,
                          device=device) / (n - 1) * 2 - 1
