"""Geometry of the deformable position bias, shared by the implementations.

The bias of query ``(i, j)`` and key ``n`` is a bilinear lookup of the
head's ``rpe_table`` (``align_corners=True``, zero outside) at the
normalised displacement ``((qy_i - py_n) / 2, (qx_j - px_n) / 2)``. It
separates into a row part (query row, key) and a column part (query column,
key), which is what makes it cheap to evaluate without materialising
``(queries x keys x 2)`` displacements.
"""
from typing import Tuple

import torch


def query_grid(n: int, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """Query positions ``0..n-1`` mapped to [-1, 1].

    The official code divides by ``n - 1`` and returns NaN for ``n == 1``;
    a single position is placed at the centre (0) instead.
    """
    if torch.jit.is_tracing():
        # n is a tensor when tracing (ONNX export): branch-free, so that
        # neither n == 1 nor n > 1 is baked into the graph (+0.0 for n > 1)
        d = torch.clamp(torch.as_tensor(n - 1), min=1)
        return (torch.arange(n, dtype=dtype, device=device) / d * 2 - 1
                + torch.as_tensor(n == 1).to(dtype))
    if n == 1:
        return torch.zeros(1, dtype=dtype, device=device)
    return torch.arange(n, dtype=dtype, device=device) / (n - 1) * 2 - 1


def table_coordinate(p: torch.Tensor, n_query: int,
                     size: int) -> torch.Tensor:
    """Table coordinate ``u = (d + 1) / 2 * (size - 1)`` of the displacement
    ``d = (query - p) / 2`` along one axis.

    ``p``: key positions ``(B, g, Ns)``; returns ``(B, g, n_query, Ns)``.
    """
    qs = query_grid(n_query, p.dtype, p.device)
    disp = (qs.view(1, 1, -1, 1) - p.unsqueeze(2)) * 0.5
    return (disp + 1) * 0.5 * (size - 1)


def clamped_corner(p: torch.Tensor, n_query: int,
                   size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lower corner and fraction for positions inside [-1, 1] (DAT++).

    The corner is ``min(floor(u), max(size - 2, 0))``, so that both corners
    exist in a table padded to at least two entries
    (:func:`at_least_two_wide`); a NaN position gives corner 0 and a NaN
    fraction (so a NaN output, never an out-of-range read).
    Returns ``(i0 (long), u - i0)``, both ``(B, g, n_query, Ns)``.
    """
    u = table_coordinate(p, n_query, size)
    i0 = u.detach().floor().nan_to_num(0.0).clamp(0, max(size - 2, 0))
    return i0.long(), u - i0


def at_least_two_wide(table: torch.Tensor) -> torch.Tensor:
    """The table ``(h, Ty, Tx)`` with a 1-wide axis repeated (rpe size 1),
    so that both bilinear corners always exist; lookups into it land on the
    first row/column (coordinate 0), as in the 1-wide original."""
    if table.shape[1] > 1 and table.shape[2] > 1:
        return table
    return table.repeat(1, 2 if table.shape[1] == 1 else 1,
                        2 if table.shape[2] == 1 else 1)
