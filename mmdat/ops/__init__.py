"""mmdat's operators: one dispatcher per op, implementations side by side.

* :func:`deformable_attention` (``mmdat/ops/deformable_attention/``)
* :func:`neighborhood_attention` (``mmdat/ops/neighborhood_attention/``)
* :func:`bilinear_sample` (``mmdat/ops/bilinear_sample.py``)

Which implementation runs, and why the others do not, is decided in
:mod:`mmdat.ops.dispatch`; :func:`explain` runs a model once and tells, per
attention module. ``MMDAT_LOG_LEVEL=debug`` logs every choice.
"""
from typing import List, Tuple

import torch

from . import dispatch
from .bilinear_sample import bilinear_sample
from .deformable_attention import deformable_attention
from .dispatch import implementations, portable, set_enabled
from .neighborhood_attention import neighborhood_attention

__all__ = ['deformable_attention', 'neighborhood_attention',
           'bilinear_sample', 'explain', 'portable', 'set_enabled',
           'implementations']


def explain(model: torch.nn.Module, *inputs, train: bool = False,
            print_fn=print) -> List[Tuple[str, str, str, str, list]]:
    """Run ``model(*inputs)`` once and report, per op call, which
    implementation ran and why the others did not.

    ``train=True`` runs with autograd on (the training choice). Returns
    ``[(module, op, chosen, requested, [(name, reason), ...]), ...]`` and
    prints a table through ``print_fn`` (None: print nothing).
    """
    for name, m in model.named_modules():
        if hasattr(m, 'op_name'):
            m.op_name = name or type(m).__name__
    with dispatch.recording() as rec, torch.set_grad_enabled(train):
        model(*inputs)
    rows = [(where, op, chosen, requested, found)
            for where, op, requested, chosen, found in rec]
    if print_fn is not None:
        for where, op, chosen, requested, found in rows:
            others = '; '.join(f'{n}: {r or "can run, lower preference"}'
                               for n, r in found if n != chosen)
            print_fn(f'{where or "?"} [{op}] -> {chosen} (impl={requested!r})'
                     + (f'  | others: {others}' if others else ''))
    return rows
