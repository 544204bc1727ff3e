"""Optional compiled CPU kernels, built on first use.

``csrc/*.cpp`` (the deformable attention's bias lookup, neighborhood
attention) are compiled with the system C++ compiler through
``torch.utils.cpp_extension`` for this CPU (``-march=native``), cached under
``~/.cache/torch_extensions`` in a directory named after the CPU's features,
so that a home directory shared between different machines never hands one
of them code for another's instruction set (about 20 s, once). Where no
compiler is available, or with ``MMDAT_NO_EXT=1``, the attention falls back
to its pure-PyTorch path with a single warning: same results, slower.
"""
import glob
import hashlib
import logging
import os
import platform
import warnings

import torch

_SRCS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), 'csrc',
                                      '*.cpp')))
_HEADERS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), 'csrc',
                                         '*.h')))
_STATE = {}


def cpu_ops_available() -> bool:
    """Build/load the fused CPU ops once per process; True when usable."""
    if 'ok' not in _STATE:
        _STATE['ok'] = _load()
    return _STATE['ok']


def use_cpu_ops(x: torch.Tensor) -> bool:
    """Whether attention on ``x`` runs the fused CPU ops: a CPU tensor, in
    eager mode (under ``torch.compile`` inductor gets the pure-PyTorch path,
    the ops have no meta kernels), and the ops are built."""
    return (x.device.type == 'cpu' and not torch.compiler.is_compiling()
            and cpu_ops_available())


def fused_deform_attention_available() -> bool:
    """Whether the one-pass deformable attention kernel for float32
    inference (AVX-512 builds) is there."""
    if 'fused_da' not in _STATE:
        _STATE['fused_da'] = (cpu_ops_available() and bool(
            torch.ops.mmdat.has_fused_deform_attention()))
    return _STATE['fused_da']


def _load() -> bool:
    if os.environ.get('MMDAT_NO_EXT', '') not in ('', '0'):
        return False
    if hasattr(torch.ops.mmdat, 'neighborhood_attention'):
        return True  # already registered in this process
    log = logging.getLogger('torch.utils.cpp_extension')
    level = log.level
    log.setLevel(logging.ERROR)  # "No CUDA runtime is found": irrelevant
    try:
        from torch.utils.cpp_extension import load
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            load(name=f'mmdat_cpu_ops_{_build_tag()}', sources=_SRCS,
                 extra_cflags=['-O3', '-march=native', '-fopenmp'],
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


def _build_tag() -> str:
    """Short hash of the CPU model and feature flags, and of the shared
    headers (torch rebuilds on changed sources, not on changed headers)."""
    info = platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith(('model name', 'flags', 'Features')):
                    info += line
                if line.startswith(('flags', 'Features')):
                    break
    except OSError:
        info += platform.processor()
    for header in _HEADERS:
        with open(header) as f:
            info += f.read()
    return hashlib.sha1(info.encode()).hexdigest()[:10]
