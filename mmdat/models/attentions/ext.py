"""Optional compiled CPU kernels, built on first use.

``csrc/deform_bias.cpp`` is compiled with the system C++ compiler through
``torch.utils.cpp_extension`` (cached under ``~/.cache/torch_extensions``;
about 10 s once). Where no compiler is available, or with
``MMDAT_NO_EXT=1``, the attention falls back to its pure-PyTorch path with a
single warning: same results, slower.
"""
import logging
import os
import warnings

import torch

_SRC = os.path.join(os.path.dirname(__file__), 'csrc', 'deform_bias.cpp')
_STATE = {}


def cpu_ops_available() -> bool:
    """Build/load the fused CPU ops once per process; True when usable."""
    if 'ok' not in _STATE:
        _STATE['ok'] = _load()
    return _STATE['ok']


def _load() -> bool:
    if os.environ.get('MMDAT_NO_EXT', '') not in ('', '0'):
        return False
    if hasattr(torch.ops.mmdat, 'deform_bias'):
        return True  # already registered in this process
    log = logging.getLogger('torch.utils.cpp_extension')
    level = log.level
    log.setLevel(logging.ERROR)  # "No CUDA runtime is found": irrelevant
    try:
        from torch.utils.cpp_extension import load
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            load(name='mmdat_cpu_ops', sources=[_SRC],
                 extra_cflags=['-O3', '-fopenmp'],
                 extra_ldflags=['-fopenmp'], is_python_module=False,
                 verbose=False)
        return True
    except Exception as exc:  # noqa: BLE001 - any build failure -> fallback
        warnings.warn(
            'mmdat: could not build the fused CPU kernels of the deformable '
            f'attention ({type(exc).__name__}: {str(exc)[:300]}); using the '
            'slower pure-PyTorch path (same results). Install a C++ compiler '
            'and ninja to get the fast path, or set MMDAT_NO_EXT=1 to silence '
            'this.')
        return False
    finally:
        log.setLevel(level)
