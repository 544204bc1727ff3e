"""Register mmdat's models in the MODELS registries of mmdet, mmseg and
mmpretrain, so ``dict(type='DAT', ...)`` builds under any of their scopes."""
import importlib
import warnings
from typing import List

LIBRARIES = ('mmdet', 'mmseg', 'mmpretrain')


def register_models() -> List[str]:
    """Register DAT in every installed library; returns the scopes done."""
    from .models import DAT
    done = []
    for lib in LIBRARIES:
        try:
            registry = importlib.import_module(f'{lib}.registry').MODELS
        except ImportError as exc:  # library not installed: nothing to do
            if not isinstance(exc, ModuleNotFoundError) or exc.name not in (
                    lib, f'{lib}.registry'):
                warnings.warn(f'mmdat: could not register DAT in {lib}: {exc}')
            continue
        # module_dict, not registry.get(): get() imports the library's
        # model zoo (its `locations`) first, which `import mmdat` must not
        if registry.module_dict.get('DAT') is not DAT:
            registry.register_module(name='DAT', module=DAT, force=True)
        done.append(lib)
    return done
