"""The compiled CPU kernels (``csrc/``): where they come from, which
instruction set runs, and whether they are there at all.

The kernels are compiled ahead of time by ``pip install .``, ``pip wheel .``
and ``pip install -e .`` (setup.py) into the extension ``mmdat.ops._C``:
every kernel source once per instruction set (AVX-512, AVX2 + FMA, scalar),
the best one this CPU has chosen at run time, so a wheel runs on any x86-64
machine and nothing is compiled on first use. Where that module is missing
(a source checkout that was never built), the same sources are compiled
once with ``torch.utils.cpp_extension.load`` (the development fallback,
about a minute, cached under ``~/.cache/torch_extensions``). Where neither
works, or with ``MMDAT_NO_EXT=1``, the attention uses its pure-PyTorch
implementations with a single warning: same results, slower.

Environment: ``MMDAT_EXT=aot`` or ``jit`` takes only that source;
``MMDAT_ISA=avx2`` or ``scalar`` caps the instruction set (``set_isa``
switches it within a process, for tests).
"""
import contextlib
import ctypes
import glob
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import warnings
from typing import Dict, Iterator, List, Optional, Tuple

import torch

_CSRC = os.path.join(os.path.dirname(__file__), 'csrc')
_SRCS = sorted(glob.glob(os.path.join(_CSRC, '*.cpp')))
_HEADERS = sorted(glob.glob(os.path.join(_CSRC, '*.h')))
_AOT_MODULE = 'mmdat.ops._C'
_STATE: Dict[str, object] = {}


def cpu_ops_available() -> bool:
    """Load (or, failing that, build) the C++ CPU ops once per process;
    True when they are registered."""
    if 'ok' not in _STATE:
        _STATE['ok'] = _load()
    return bool(_STATE['ok'])


# The first load may happen in the first call of a torch.compile'd model:
# dynamo runs this at trace time (a constant) instead of tracing the loader.
@torch.compiler.assume_constant_result
def ops_loaded() -> bool:
    """:func:`cpu_ops_available`, as a constant under ``torch.compile``."""
    return cpu_ops_available()


def fused_deform_attention_available() -> bool:
    """Whether the one-pass deformable attention kernels (float32, AVX-512
    only) can run: the ops are loaded and the instruction set in use has
    them."""
    if not cpu_ops_available():
        return False
    key = ('fused_da', isa())
    if key not in _STATE:
        _STATE[key] = bool(torch.ops.mmdat.has_fused_deform_attention())
    return bool(_STATE[key])


def unavailable_reason() -> str:
    """Why the C++ ops are not loaded ('' when they are)."""
    return '' if cpu_ops_available() else str(_STATE.get('reason', ''))


def isa() -> Optional[str]:
    """The instruction set of the kernels in use: ``'avx512'``, ``'avx2'``
    or ``'scalar'``; None when the ops are not loaded."""
    lib = _handle()
    return lib.mmdat_isa().decode() if lib is not None else None


def available_isas() -> List[str]:
    """The instruction sets built into the loaded ops that this CPU can
    run, best first (empty when the ops are not loaded)."""
    lib = _handle()
    return lib.mmdat_isas(1).decode().split(',') if lib is not None else []


def set_isa(name: str = 'auto') -> None:
    """Run the kernels of instruction set ``name`` from now on (``'auto'``:
    the best this CPU has, capped by ``MMDAT_ISA``). Raises ValueError for
    a name that is not built in or that this CPU cannot run."""
    lib = _handle()
    if lib is None:
        raise RuntimeError('the mmdat C++ ops are not loaded: ' +
                           unavailable_reason())
    rc = lib.mmdat_set_isa(name.encode())
    if rc == 1:
        raise ValueError(f'unknown instruction set {name!r}; built in: '
                         f'{lib.mmdat_isas(0).decode()}')
    if rc == 2:
        raise ValueError(f'this CPU cannot run the {name!r} kernels; it can '
                         f'run: {lib.mmdat_isas(1).decode()}')


@contextlib.contextmanager
def isa_override(name: str) -> Iterator[None]:
    """``set_isa(name)`` for the duration of a ``with`` block."""
    old = isa()
    set_isa(name)
    try:
        yield
    finally:
        set_isa(old or 'auto')


def build_info() -> Dict[str, object]:
    """Where the loaded ops came from: ``source`` (``'aot'``: the extension
    built by pip; ``'jit'``: compiled at run time; None: not loaded),
    ``path``, ``isa``, ``isas`` (runnable here), ``compiled`` (all built
    in), ``torch`` (the torch version they were built against) and
    ``reason`` (why they are not loaded)."""
    ok = cpu_ops_available()
    lib = _handle()
    return {
        'source': _STATE.get('source') if ok else None,
        'path': _STATE.get('path'),
        'isa': isa(),
        'isas': available_isas(),
        'compiled': (lib.mmdat_isas(0).decode().split(',')
                     if lib is not None else []),
        'torch': _built_against(_STATE['path']) if _STATE.get('path') else
        None,
        'reason': unavailable_reason(),
    }


def aot_module_path() -> Optional[str]:
    """The ahead-of-time built extension's file, if it is installed."""
    try:
        spec = importlib.util.find_spec(_AOT_MODULE)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin else None


def cpu_ops_expected() -> bool:
    """Whether the ops should load here: not disabled, and either the
    ahead-of-time module is installed or a compiler and ninja are there to
    build them. Tests use it to fail, not skip, when a build broke."""
    if _disabled():
        return False
    if _mode() != 'jit' and aot_module_path() is not None:
        return True
    if _mode() == 'aot':
        return False
    from torch.utils.cpp_extension import is_ninja_available
    cxx = os.environ.get('CXX', 'c++')
    return shutil.which(cxx) is not None and is_ninja_available()


def _disabled() -> bool:
    return os.environ.get('MMDAT_NO_EXT', '') not in ('', '0')


def _mode() -> str:
    mode = os.environ.get('MMDAT_EXT', 'auto').lower() or 'auto'
    if mode not in ('auto', 'aot', 'jit'):
        raise ValueError(f'MMDAT_EXT must be auto, aot or jit, got {mode!r}')
    return mode


def _handle() -> Optional[ctypes.CDLL]:
    """ctypes handle of the loaded library (its ISA control functions)."""
    if not cpu_ops_available() or not _STATE.get('path'):
        return None
    if 'lib' not in _STATE:
        lib = ctypes.CDLL(str(_STATE['path']))
        lib.mmdat_isa.restype = ctypes.c_char_p
        lib.mmdat_isas.restype = ctypes.c_char_p
        lib.mmdat_isas.argtypes = [ctypes.c_int]
        lib.mmdat_set_isa.restype = ctypes.c_int
        lib.mmdat_set_isa.argtypes = [ctypes.c_char_p]
        _STATE['lib'] = lib
    return _STATE['lib']  # type: ignore[return-value]


def _load() -> bool:
    if _disabled():
        _STATE['reason'] = 'disabled by MMDAT_NO_EXT'
        return False
    if hasattr(torch.ops.mmdat, 'neighborhood_attention'):
        # registered in this process by someone else: we know no path
        _STATE['source'] = 'preloaded'
        return True
    mode = _mode()
    reasons = []
    if mode in ('auto', 'aot'):
        path = aot_module_path()
        if path is None:
            reasons.append(f'no ahead-of-time build ({_AOT_MODULE} is not '
                           'installed; `pip install -e .` builds it)')
        else:
            built, sources = _build_marker(path)
            here = '.'.join(torch.__version__.split('.')[:2])
            if built != here:
                reasons.append(f'{path} was built against torch {built}, '
                               f'this is torch {here}')
            elif sources != source_hash():
                reasons.append(f'{path} was built from other kernel sources '
                               'than those in csrc/ (rebuild it: `pip install '
                               '-e . --no-build-isolation`)')
            else:
                try:
                    _load_library(path)
                    _STATE['source'] = 'aot'
                    return True
                except OSError as exc:
                    reasons.append(f'{path} failed to load: {exc}')
    if mode in ('auto', 'jit'):
        if _jit_build():
            return True
        reasons.append(str(_STATE.get('reason', '')))
    _STATE['reason'] = '; '.join(r for r in reasons if r)
    if mode == 'aot' or reasons and mode == 'auto' and \
            aot_module_path() is not None:
        warnings.warn('mmdat: the C++ CPU kernels could not be loaded (' +
                      _STATE['reason'] + '); using the slower pure-PyTorch '
                      'path (same results).')
    return False


def _load_library(path: str) -> None:
    before = set(torch.ops.loaded_libraries)
    torch.ops.load_library(path)
    new = set(torch.ops.loaded_libraries) - before
    _STATE['path'] = next(iter(new)) if new else path


def _build_marker(path: str) -> Tuple[Optional[str], Optional[str]]:
    """torch major.minor the library was compiled against and the hash of
    its sources: a marker string in the binary, read without loading it, so
    that a build for another torch or from other sources is never
    loaded."""
    try:
        with open(path, 'rb') as f:
            m = re.search(rb'MMDAT_BUILD torch=(\d+)\.(\d+);src=(\w+);',
                          f.read())
    except OSError:
        return None, None
    if not m:
        return None, None
    return f'{int(m.group(1))}.{int(m.group(2))}', m.group(3).decode()


def _built_against(path: str) -> Optional[str]:
    return _build_marker(path)[0]


def source_hash() -> str:
    """Hash of the kernel sources in csrc/ (names and contents)."""
    h = hashlib.sha1()
    for path in sorted(_SRCS + _HEADERS, key=os.path.basename):
        h.update(os.path.basename(path).encode() + b'\0')
        with open(path, 'rb') as f:
            h.update(f.read())
    return 'h' + h.hexdigest()[:16]


def build_flags() -> List[str]:
    """Compiler flags that write the torch version and the sources' hash
    into the build (setup.py and the JIT build use them)."""
    major, minor = torch.__version__.split('.')[:2]
    minor = re.match(r'\d+', minor).group()
    return [f'-DMMDAT_TORCH_MAJOR={int(major)}',
            f'-DMMDAT_TORCH_MINOR={int(minor)}',
            f'-DMMDAT_SOURCES={source_hash()}']


def _jit_build() -> bool:
    log = logging.getLogger('torch.utils.cpp_extension')
    level = log.level
    log.setLevel(logging.ERROR)  # "No CUDA runtime is found": irrelevant
    try:
        from torch.utils.cpp_extension import load
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            before = set(torch.ops.loaded_libraries)
            load(name=f'mmdat_cpu_ops_{_build_tag()}', sources=_SRCS,
                 extra_cflags=['-O3', '-g0', '-fopenmp'] + build_flags(),
                 extra_ldflags=['-fopenmp'], extra_include_paths=[_CSRC],
                 is_python_module=False, verbose=False)
            new = set(torch.ops.loaded_libraries) - before
        _STATE['path'] = next(iter(new)) if new else None
        _STATE['source'] = 'jit'
        return True
    except Exception as exc:  # noqa: BLE001 - any build failure -> fallback
        _STATE['reason'] = (f'JIT build failed: {type(exc).__name__}: '
                            f'{str(exc)[:300]}')
        warnings.warn(
            'mmdat: could not build the fused CPU kernels of the deformable '
            f'attention ({type(exc).__name__}: {str(exc)[:300]}); using the '
            'slower pure-PyTorch path (same results). Install mmdat with '
            '`pip install .` (compiles them ahead of time), or a C++ '
            'compiler and ninja for the run-time build, or set '
            'MMDAT_NO_EXT=1 to silence this.')
        return False
    finally:
        log.setLevel(level)


def _build_tag() -> str:
    """Short hash of the kernel sources and headers (torch rebuilds on
    changed sources, not on changed headers) and of the torch version."""
    info = torch.__version__ + source_hash()
    return hashlib.sha1(info.encode()).hexdigest()[:10]
