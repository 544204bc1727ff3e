import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / 'data'
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault('OMP_NUM_THREADS', '2')
warnings.filterwarnings('ignore', category=UserWarning, module='mmengine')

# A small valid DAT++ arch: every block kind, every stage, tiny widths.
TINY_ARCH = dict(dim_stem=16, dims=[16, 32, 64, 64], depths=[2, 2, 2, 1],
                 stage_spec=[['N', 'D'], ['D', 'N'], ['N', 'D'], ['D']],
                 heads=[1, 2, 4, 4], groups=[1, 1, 2, 2])


# The implementations the dispatcher can choose for CPU tensors besides the
# reference; equivalence, golden and degenerate-size tests run on each.
CPU_IMPLS = ['cpu', 'chunked']

try:  # one derandomized profile: CI runs the same examples every time
    from hypothesis import settings as _hyp_settings
    _hyp_settings.register_profile('mmdat', derandomize=True, deadline=None)
    _hyp_settings.load_profile('mmdat')
except ImportError:
    pass


def require_impl(name: str) -> None:
    """Fail (not skip) when implementation ``name`` cannot run on this
    machine's CPU; skip only when the kernels were switched off on purpose
    (``MMDAT_NO_EXT=1``)."""
    if name != 'cpu':
        return
    from mmdat.ops import library
    if os.environ.get('MMDAT_NO_EXT', '') not in ('', '0'):
        pytest.skip('C++ kernels switched off (MMDAT_NO_EXT)')
    reason = getattr(library, 'unavailable_reason', lambda: '')()
    assert library.cpu_ops_available(), f'C++ kernels not built: {reason}'


@pytest.fixture(params=['avx512', 'avx2', 'scalar'])
def isa(request):
    """Each instruction-set variant of the C++ kernels this CPU can run (a
    failed build fails the test; a CPU without the instruction set skips
    it)."""
    from mmdat.ops import library
    require_impl('cpu')
    if request.param not in library.available_isas():
        pytest.skip(f'this CPU cannot run the {request.param} kernels')
    with library.isa_override(request.param):
        yield request.param


WHEEL_SOURCES = ('setup.py', 'README.md', 'MANIFEST.in', 'requirements.txt',
                 'model-index.yml', 'configs', 'tools', 'mmdat')


@pytest.fixture(scope='session')
def built_wheel(tmp_path_factory):
    """A wheel of this checkout (a copy of the sources, ``pip wheel
    --no-deps --no-build-isolation``, no index), compiled kernels included;
    built once per test session (it compiles for a minute or two)."""
    import shutil
    import subprocess
    if shutil.which(os.environ.get('CXX', 'c++')) is None:
        pytest.skip('no C++ compiler to build the wheel')
    tmp = tmp_path_factory.mktemp('wheel')
    src = tmp / 'src'
    src.mkdir()
    ignore = shutil.ignore_patterns('__pycache__', '*.pyc', '.mim', 'build',
                                    '*.egg-info', '*.so')
    for name in WHEEL_SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, src / name)
    env = dict(os.environ, PIP_NO_INDEX='1',
               PIP_DISABLE_PIP_VERSION_CHECK='1', MAX_JOBS='2')
    env.pop('MMDAT_NO_EXT', None)
    proc = subprocess.run(
        [sys.executable, '-m', 'pip', 'wheel', '.', '--no-deps',
         '--no-build-isolation', '-q', '-w', str(tmp / 'dist')], cwd=src,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    (path, ) = (tmp / 'dist').glob('mmdat-*.whl')
    return path


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: end-to-end runs (minutes)')
    config.addinivalue_line('markers', 'gpu: needs CUDA')


@pytest.fixture(scope='session')
def golden():
    return torch.load(DATA / 'golden_mini.pt', weights_only=False)


@pytest.fixture(scope='session')
def manifests():
    with open(DATA / 'manifests.json') as f:
        return json.load(f)


def load_script(path, name: str = None):
    """Import a script (tools/..., tests/data/fill.py) as a module."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope='session')
def fill():
    return load_script(DATA / 'fill.py', 'dat_fill')


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (the contract's agreement measure)."""
    return float((a.double() - b.double()).abs().max() /
                 b.double().abs().max())
