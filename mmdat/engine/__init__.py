"""Engine shims for running mmdat configs with mmengine, opt-in.

``import mmdat`` registers the ``DAT`` backbone and nothing else. Importing
this package (``tools/train.py`` and ``tools/test.py`` do; a config does
with ``custom_imports = dict(imports=['mmdat', 'mmdat.engine'])``):

* registers :class:`CPUDistributedDataParallel` (``MODEL_WRAPPERS``),
  :class:`CPUAmpOptimWrapper` (``OPTIM_WRAPPERS``) and
  :class:`IterationSeedHook` (``HOOKS``) under these names, beside the
  upstream entries (which stay as they are);
* registers ``AmpOptimWrapper`` in the mmdet / mmseg / mmpretrain scopes as
  :func:`~mmdat.engine.wrappers.amp_optim_wrapper`: mmengine's wrapper with
  CUDA, :class:`CPUAmpOptimWrapper` without (so ``mim train`` runs the AMP
  recipes on a machine without a GPU);
* registers :func:`~mmdat.engine.checkpoint.load_from_local` as mmengine's
  local checkpoint loader, so runner checkpoints load on torch >= 2.6 with
  ``weights_only=True`` (see :mod:`mmdat.engine.checkpoint`).

The seed hook runs only where a config lists it in ``custom_hooks``.
"""
from .checkpoint import install_checkpoint_loader, is_trusted, trust_work_dir
from .hooks import IterationSeedHook, reseed
from .wrappers import (CPUAmpOptimWrapper, CPUDistributedDataParallel,
                       register_amp_fallback)

install_checkpoint_loader()
register_amp_fallback()

__all__ = [
    'CPUAmpOptimWrapper', 'CPUDistributedDataParallel', 'IterationSeedHook',
    'reseed', 'install_checkpoint_loader', 'trust_work_dir', 'is_trusted'
]
