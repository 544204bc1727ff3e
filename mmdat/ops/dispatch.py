"""Which implementation of an op runs, and why: the one place that decides.

Every op (``deformable_attention``, ``neighborhood_attention``,
``bilinear_sample``) has implementations registered here in preference
order. Each states what it can run through ``can_run(ctx)``, which returns
``None`` (it can) or a reason (it cannot). :func:`choose` takes the first
implementation that can run, or the one asked for by name (failing with the
reason when it cannot run). The choice and the reasons of the others are
logged at debug level (``MMDAT_LOG_LEVEL=debug``) and recorded for
:func:`mmdat.ops.explain`.

Global switches (timm style): :func:`portable` (only standard PyTorch ops
that ONNX and other exporters understand) and :func:`set_enabled`
(switch an implementation off, e.g. for tests or a broken machine).
"""
import contextlib
import dataclasses
import logging
import os
import threading
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

logger = logging.getLogger('mmdat.ops')
_level = os.environ.get('MMDAT_LOG_LEVEL', '').upper()
if _level:
    logger.setLevel(getattr(logging, _level, logging.INFO))
    if not logger.handlers:
        _handler = logging.StreamHandler()
        _handler.setFormatter(logging.Formatter('[mmdat.ops] %(message)s'))
        logger.addHandler(_handler)

#: what ``impl=`` accepts besides the implementation names of each op
AUTO = 'auto'
#: old name of ``auto`` (it named three algorithms); accepted with a warning
_ALIASES = {'fast': AUTO}


@dataclasses.dataclass(frozen=True)
class Context:
    """What the implementations may need to know about one call.

    ``device``/``dtype`` of the main input, whether gradients will be
    needed, the head dim, the op's own facts (``facts``) and the execution
    mode (eager, compiling, exporting, tracing, portable).
    """
    device: torch.device
    dtype: torch.dtype
    requires_grad: bool
    head_dim: int = 0
    facts: Tuple[Tuple[str, object], ...] = ()

    def fact(self, name: str, default=None):
        return dict(self.facts).get(name, default)

    @property
    def compiling(self) -> bool:
        """Under ``torch.compile`` / ``torch.export`` (dynamo tracing)."""
        return torch.compiler.is_compiling()

    @property
    def jit_tracing(self) -> bool:
        return torch.jit.is_tracing()

    @property
    def portable(self) -> bool:
        """Only standard PyTorch ops: ONNX export or :func:`portable`."""
        return is_portable()


@dataclasses.dataclass
class Implementation:
    """One implementation of an op.

    ``fn`` has the op's signature; ``can_run(ctx)`` returns ``None`` or the
    reason why it cannot run ``ctx``; ``portable``: built from standard
    PyTorch ops only (exportable to ONNX).
    """
    op: str
    name: str
    fn: Callable
    can_run: Callable[[Context], Optional[str]]
    portable: bool = False
    doc: str = ''
    #: why ``auto`` passes it over for ``ctx`` although it can run (a
    #: measured preference, e.g. by device or size), or ``None``; ``auto``
    #: still takes it when nothing else can run
    auto_skip: Optional[Callable[[Context], Optional[str]]] = None


_REGISTRY: Dict[str, List[Implementation]] = {}


class _State(threading.local):
    portable = False


_STATE = _State()
_DISABLED: set = set()
#: implementations that ``auto`` does not pick (yet), with the reason;
#: naming them with ``impl=`` still selects them, and
#: ``MMDAT_AUTO_INCLUDE=triton`` (a comma list) lets ``auto`` pick them
AUTO_EXCLUDED: Dict[str, str] = {
    'triton': ('slower than the reference path on an H200 (2026-11-30: '
               'DAT-T++ training step 3.9x Swin-T) and its position '
               'gradients not yet confirmed there; impl="triton" (or '
               'MMDAT_AUTO_INCLUDE=triton) selects it'),
}


def _auto_excluded(name: str) -> Optional[str]:
    included = os.environ.get('MMDAT_AUTO_INCLUDE', '').split(',')
    return None if name in included else AUTO_EXCLUDED.get(name)


def runs_anywhere(ctx: Context) -> Optional[str]:
    """``can_run`` of an implementation in plain PyTorch ops: any input."""
    return None


def register(op: str, name: str, can_run: Callable[[Context], Optional[str]],
             portable: bool = False,
             auto_skip: Optional[Callable[[Context], Optional[str]]] = None
             ) -> Callable:
    """Decorator: register ``fn`` as implementation ``name`` of ``op``.

    The preference order for ``impl='auto'`` is :func:`set_order`'s;
    ``auto_skip(ctx)`` (a reason or ``None``) lets ``auto`` pass it over
    where it can run but another is measured better.
    """
    def wrap(fn: Callable) -> Callable:
        impls = _REGISTRY.setdefault(op, [])
        impls[:] = [i for i in impls if i.name != name]
        impls.append(Implementation(op, name, fn, can_run, portable,
                                    (fn.__doc__ or '').strip().split('\n')[0],
                                    auto_skip))
        return fn
    return wrap


_ORDER: Dict[str, Tuple[str, ...]] = {}


def set_order(op: str, order: Tuple[str, ...]) -> None:
    """Preference order of ``op``'s implementations for ``impl='auto'``
    (names not listed come after, in registration order)."""
    _ORDER[op] = tuple(order)


def implementations(op: str) -> List[Implementation]:
    """The registered implementations of ``op``, in preference order."""
    _import_impls()
    order = _ORDER.get(op, ())
    impls = _REGISTRY.get(op, [])
    return sorted(impls, key=lambda i: (
        order.index(i.name) if i.name in order else len(order)))


def names(op: str) -> Tuple[str, ...]:
    return tuple(i.name for i in implementations(op))


def check_impl(op: str, impl: str) -> str:
    """Validate a requested implementation name for ``op``."""
    impl = _ALIASES.get(impl, impl)
    valid = (AUTO, ) + names(op)
    if impl not in valid:
        raise ValueError(f'impl for {op} must be one of {valid}, '
                         f'got {impl!r}')
    return impl


def reasons(op: str, ctx: Context) -> List[Tuple[str, Optional[str]]]:
    """``(name, reason or None)`` for every implementation of ``op``."""
    out = []
    for impl in implementations(op):
        if impl.name in _DISABLED or f'{op}.{impl.name}' in _DISABLED:
            out.append((impl.name, 'switched off (mmdat.ops.set_enabled)'))
            continue
        reason = impl.can_run(ctx)
        if reason is None and ctx.portable and not impl.portable:
            reason = 'not portable (ONNX export or mmdat.ops.portable())'
        out.append((impl.name, reason))
    return out


def choose(op: str, impl: str, ctx: Context,
           where: str = '') -> Implementation:
    """The implementation of ``op`` that runs ``ctx``.

    ``impl='auto'`` takes the first one that can run; a name takes that one
    or raises ``RuntimeError`` with the reason it cannot run.
    """
    impl = _ALIASES.get(impl, impl)
    found = reasons(op, ctx)
    by_name = {i.name: i for i in implementations(op)}
    if impl == AUTO:
        found = [(n, _auto_excluded(n) if r is None else r)
                 for n, r in found]
        # a preference skip leaves the implementation as the last resort
        fallback = next((n for n, r in found if r is None), None)
        found = [(n, by_name[n].auto_skip(ctx) if r is None
                  and by_name[n].auto_skip else r) for n, r in found]
        chosen = next((n for n, r in found if r is None), fallback)
        if chosen is None:
            raise RuntimeError(f'no implementation of {op} can run this '
                               f'input: {_format(found)}')
    else:
        if impl not in by_name:
            raise ValueError(f'impl for {op} must be one of '
                             f'{(AUTO, ) + tuple(by_name)}, got {impl!r}')
        reason = dict(found)[impl]
        if reason is not None:
            raise RuntimeError(f"{op}: impl={impl!r} cannot run this input: "
                               f'{reason}')
        chosen = impl
    if not (ctx.compiling or ctx.jit_tracing):
        _record(op, where, chosen, found, impl)
    return by_name[chosen]


def _format(found) -> str:
    return '; '.join(f'{n}: {r or "can run"}' for n, r in found)


# ------------------------------------------------------------- explanations
_LAST: Dict[str, Tuple[str, str, List[Tuple[str, Optional[str]]], str]] = {}
_RECORDING: List[Optional[list]] = [None]


def _record(op, where, chosen, found, requested) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug('%s%s: %s (impl=%r); %s', f'{where}: ' if where else '',
                     op, chosen, requested,
                     _format([f for f in found if f[0] != chosen]))
    if _RECORDING[0] is not None:
        _RECORDING[0].append((where, op, requested, chosen, found))


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Collect ``(where, op, requested, chosen, reasons)`` of every choice
    made inside the block."""
    prev = _RECORDING[0]
    _RECORDING[0] = []
    try:
        yield _RECORDING[0]
    finally:
        _RECORDING[0] = prev


# -------------------------------------------------------------- switches
@contextlib.contextmanager
def portable(enabled: bool = True) -> Iterator[None]:
    """Inside the block only portable implementations (standard PyTorch
    ops, no custom kernels, no ``grid_sample``) are chosen: for ONNX
    export."""
    prev = _STATE.portable
    _STATE.portable = enabled
    try:
        yield
    finally:
        _STATE.portable = prev


def set_enabled(name: str, enabled: bool) -> None:
    """Switch an implementation off (``'cpu'`` or ``'deformable_attention.cpu'``)
    or back on, for every op it belongs to."""
    if enabled:
        _DISABLED.discard(name)
    else:
        _DISABLED.add(name)


def is_portable() -> bool:
    """Whether only portable implementations may run now (ONNX export or
    inside :func:`portable`)."""
    return _STATE.portable or _onnx_exporting()


def _onnx_exporting() -> bool:
    try:
        return bool(torch.onnx.is_in_onnx_export())
    except Exception:  # noqa: BLE001 - older torch without the query
        return False


def _import_impls() -> None:
    # the op packages register their implementations when imported
    from . import bilinear_sample, deformable_attention  # noqa: F401
    from . import neighborhood_attention  # noqa: F401
