"""Small building blocks shared by the attention kinds and the backbone."""
import torch
import torch.nn as nn
import torch.nn.functional as F

IMPLS = ('auto', 'reference', 'fast')


def check_impl(impl: str) -> str:
    """Validate an attention implementation name."""
    if impl not in IMPLS:
        raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')
    return impl


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


def normalized_grid(n: int, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """Positions ``0..n-1`` mapped to [-1, 1] (the query grid of the spec).

    The official code divides by ``n - 1`` and returns NaN for ``n == 1``;
    a single position is placed at the centre (0) instead.
    """
    if n == 1:
        return torch.zeros(1, dtype=dtype, device=device)
    return torch.arange(n, dtype=dtype, device=device) / (n - 1) * 2 - 1


def reference_grid(n: int, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """Reference points of the deformable attention along one axis.

    ``linspace(0.5, n - 0.5, n) / (n - 1) * 2 - 1``: not centred, but this is
    what the published weights were trained with. For ``n == 1`` (where the
    official code divides by zero) the single point is the centre (0).
    """
    if n == 1:
        return torch.zeros(1, dtype=dtype, device=device)
    return torch.linspace(0.5, n - 0.5, n, dtype=dtype,
                          device=device) / (n - 1) * 2 - 1
