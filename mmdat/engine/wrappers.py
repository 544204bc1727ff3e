"""Model and optimizer wrappers for machines without CUDA.

Registered under their own names in mmengine's root registries (the
upstream ``MMDistributedDataParallel`` / ``AmpOptimWrapper`` entries are
untouched); ``mmdat.apis`` switches a config to them when no GPU is present.
For the libraries' own train scripts (``mim train``), ``AmpOptimWrapper`` in
the mmdet / mmseg / mmpretrain scopes builds mmengine's wrapper with CUDA and
:class:`CPUAmpOptimWrapper` without (:func:`amp_optim_wrapper`).
"""
import contextlib
import logging
from typing import Optional, Sequence, Union

import torch
from mmengine.logging import print_log
from mmengine.model import MMDistributedDataParallel
from mmengine.model.utils import revert_sync_batchnorm
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import MODEL_WRAPPERS, OPTIM_WRAPPERS


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` that also works for CPU modules.

    mmengine always passes ``device_ids=[LOCAL_RANK]``; DDP only accepts
    ``device_ids`` for GPU modules, so they are dropped for CPU modules.
    SyncBN cannot run on CPU either and is reverted to plain BN (the
    statistics are then per process).
    """

    def __init__(self, module: torch.nn.Module, device_ids=None, **kwargs):
        param = next(module.parameters(), None)
        if param is None or param.device.type == 'cpu':
            device_ids = None
            kwargs.pop('output_device', None)
            module = revert_sync_batchnorm(module)
        super().__init__(module=module, device_ids=device_ids, **kwargs)


def _to_float(obj):
    """Low-precision floating tensors in ``obj`` (nested) -> float32."""
    if torch.is_tensor(obj):
        return obj.float() if obj.dtype in (torch.bfloat16,
                                            torch.float16) else obj
    if isinstance(obj, (list, tuple)):
        out = [_to_float(o) for o in obj]
        return type(obj)(out) if not hasattr(obj, '_fields') \
            else type(obj)(*out)
    if isinstance(obj, dict):
        return type(obj)((k, _to_float(v)) for k, v in obj.items())
    return obj


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(OptimWrapper):
    """Mixed precision on CPU: ``torch.autocast('cpu', dtype=bfloat16)``.

    mmengine's ``AmpOptimWrapper`` asserts that a GPU is present. bfloat16
    has the float32 exponent range, so no loss scaling is needed.

    Only the submodules named in ``cast_modules`` (default: the
    ``backbone``, where DAT spends its time) run under autocast and their
    outputs are cast back to float32: mmcv's CPU ops (``nms``,
    ``RoIAlign``, ...) have no bfloat16 kernels, so necks and heads stay in
    float32. A model without any of those submodules autocasts as a whole;
    ``cast_modules=None`` always autocasts the whole model.

    Args:
        dtype: autocast dtype (``'bfloat16'`` or a ``torch.dtype``).
        cast_modules: attribute names of the submodules to autocast.
        loss_scale: accepted (and ignored) for ``AmpOptimWrapper`` configs.
    """

    def __init__(self,
                 dtype: Union[str, torch.dtype, None] = 'bfloat16',
                 cast_modules: Optional[Sequence[str]] = ('backbone', ),
                 loss_scale=None,
                 **kwargs):
        super().__init__(**kwargs)
        dtype = dtype or 'bfloat16'
        self.cast_dtype = getattr(torch, dtype) if isinstance(dtype, str) \
            else dtype
        if not isinstance(self.cast_dtype, torch.dtype) or \
                not self.cast_dtype.is_floating_point:
            raise ValueError(f'CPUAmpOptimWrapper: dtype must be a floating '
                             f'point torch dtype, got {dtype!r}')
        self.cast_modules = None if cast_modules is None else tuple(
            cast_modules)
        self._logged = False

    def _targets(self, model: torch.nn.Module) -> Optional[list]:
        model = getattr(model, 'module', model)  # (CPU)DDP
        if self.cast_modules is None:
            return None
        found = [getattr(model, n) for n in self.cast_modules
                 if isinstance(getattr(model, n, None), torch.nn.Module)]
        return found or None

    @contextlib.contextmanager
    def optim_context(self, model: torch.nn.Module):
        targets = self._targets(model)
        if not self._logged:
            where = 'the whole model' if targets is None else \
                ', '.join(n for n in self.cast_modules
                          if hasattr(getattr(model, 'module', model), n)) + \
                ' (the rest in float32)'
            print_log(f'CPUAmpOptimWrapper: {self.cast_dtype} autocast on '
                      f'CPU in {where}', logger='current',
                      level=logging.INFO)
            self._logged = True
        with super().optim_context(model):
            if targets is None:
                with torch.autocast(device_type='cpu', dtype=self.cast_dtype):
                    yield
                return
            stack = []

            def enter(module, args):
                ctx = torch.autocast(device_type='cpu', dtype=self.cast_dtype)
                ctx.__enter__()
                stack.append(ctx)

            def leave(module, args, output):
                stack.pop().__exit__(None, None, None)
                return _to_float(output)

            handles = []
            for module in targets:
                handles.append(module.register_forward_pre_hook(enter))
                handles.append(module.register_forward_hook(leave))
            try:
                yield
            finally:
                for handle in handles:
                    handle.remove()
                while stack:  # a forward that raised: leave autocast again
                    stack.pop().__exit__(None, None, None)


def amp_optim_wrapper(**kwargs) -> OptimWrapper:
    """``type='AmpOptimWrapper'`` as the recipes name it: mmengine's
    ``AmpOptimWrapper`` where CUDA is available; on a machine without
    (where mmengine's asserts), :class:`CPUAmpOptimWrapper` in bfloat16,
    with a log line. What ``tools/train.py`` does to the config, for the
    libraries' own train scripts (``mim train``)."""
    if torch.cuda.is_available():
        return AmpOptimWrapper(**kwargs)
    print_log('CUDA is not available: AmpOptimWrapper (needs a GPU) is '
              'built as CPUAmpOptimWrapper (bfloat16 autocast in the '
              'backbone; necks, heads and mmcv ops in float32).',
              logger='current', level=logging.WARNING)
    for key in ('loss_scale', 'dtype', 'use_fsdp'):
        kwargs.pop(key, None)
    return CPUAmpOptimWrapper(dtype='bfloat16', **kwargs)


def register_amp_fallback() -> None:
    """Register :func:`amp_optim_wrapper` as ``AmpOptimWrapper`` in the
    ``OPTIM_WRAPPERS`` registries of mmdet, mmseg and mmpretrain (those
    installed; scoped child registries, mmengine's own entry untouched)."""
    import importlib
    for lib in ('mmdet', 'mmseg', 'mmpretrain'):
        try:
            registry = importlib.import_module(f'{lib}.registry')
        except ImportError:
            continue
        registry.OPTIM_WRAPPERS.register_module(
            name='AmpOptimWrapper', module=amp_optim_wrapper, force=True)
