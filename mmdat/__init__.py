"""mmdat: the DAT++ backbone for mmdet, mmseg and mmpretrain."""
from . import apis  # noqa: F401  (installs the checkpoint loader fix)
from .models import DAT
from .registry import register_models
from .version import __version__

REGISTERED_SCOPES = register_models()

__all__ = ['DAT', '__version__', 'REGISTERED_SCOPES']
