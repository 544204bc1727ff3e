"""mmdat: the DAT++ backbone for mmdet, mmseg and mmpretrain.

``import mmdat`` registers ``DAT`` in the ``MODELS`` registries of the
installed libraries and does nothing else. The engine shims used by
``tools/`` (CPU distributed and mixed-precision wrappers, the iteration seed
hook, checkpoint loading on torch >= 2.6) are opt-in: ``import mmdat.engine``
or ``custom_imports = dict(imports=['mmdat', 'mmdat.engine'])``.
"""
from .models import DAT
from .registry import register_models
from .version import __version__

REGISTERED_SCOPES = register_models()

__all__ = ['DAT', '__version__', 'REGISTERED_SCOPES']
