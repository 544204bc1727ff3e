"""The C++ kernels' build and loading (mmdat/ops/library.py).

* Where the ahead-of-time module is installed or a compiler is there, the
  ops load: a broken build fails here instead of every kernel test being
  skipped.
* The instruction set is chosen at run time and can be switched or capped
  (``MMDAT_ISA``); every variant this CPU runs is built in.
* The JIT fallback (``MMDAT_EXT=jit``): a lock file left by a killed build
  does not hang the next process (torch >= 2.14 holds an OS advisory lock
  on it, released when its holder dies; older torch waited on the file's
  mere existence), no compiler falls back with one warning, and
  ``MMDAT_NO_EXT=1`` builds nothing.
"""
import os
import platform
import subprocess
import sys
import time

import pytest

from conftest import ROOT

SCRIPT = '''
from mmdat.ops import library as ext
print('OK' if ext.cpu_ops_available() else 'FALLBACK')
'''


def _run(code, env, timeout=300):
    return subprocess.run([sys.executable, '-W', 'always', '-c', code],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_ops_load_where_they_can():
    """A machine with the AOT module or a compiler must get the ops (this
    fails, and does not skip, when the build is broken)."""
    from mmdat.ops import library as ext
    if not ext.cpu_ops_expected():
        pytest.skip('no ahead-of-time module and no compiler here')
    assert ext.cpu_ops_available(), ext.unavailable_reason()
    info = ext.build_info()
    assert info['isa'] in info['isas'] and 'scalar' in info['isas']
    if os.environ.get('MMDAT_EXT', 'auto') != 'jit' and \
            ext.aot_module_path() is not None:
        assert info['source'] == 'aot', info
        assert info['path'] and os.path.samefile(info['path'],
                                                 ext.aot_module_path())


def test_setup_builds_the_extension_in_place():
    """The README's set-up (``pip install -e . --no-build-isolation``) built
    mmdat.ops._C next to its sources, and it is up to date with them."""
    from mmdat.ops import library as ext
    if not (ROOT / '.venv').is_dir():
        pytest.skip('no ./.venv: not set up with tools/setup_env.sh')
    path = ext.aot_module_path()
    assert path is not None, 'mmdat.ops._C missing: run tools/setup_env.sh'
    # (found through the site-packages link that setup_env.sh makes, or
    # through the repository itself)
    assert os.path.samefile(os.path.dirname(path), ROOT / 'mmdat' / 'ops'), \
        path
    built, sources = ext._build_marker(path)
    assert sources == ext.source_hash(), (
        'mmdat.ops._C is stale (csrc/ changed since it was built): run '
        '`pip install -e . --no-deps --no-build-isolation`')


def test_every_instruction_set_of_this_cpu_is_selectable():
    from mmdat.ops import library as ext
    if not ext.cpu_ops_available():
        pytest.skip('ops not available: ' + ext.unavailable_reason())
    compiled = ext.build_info()['compiled']
    if platform.machine() in ('x86_64', 'AMD64'):
        assert compiled == ['avx512', 'avx2', 'scalar']
    try:
        for name in ext.available_isas():
            ext.set_isa(name)
            assert ext.isa() == name
        with pytest.raises(ValueError, match='unknown instruction set'):
            ext.set_isa('sse9')
        for name in set(compiled) - set(ext.available_isas()):
            with pytest.raises(ValueError, match='cannot run'):
                ext.set_isa(name)
    finally:
        ext.set_isa('auto')
    assert ext.isa() == ext.available_isas()[0]


def test_isa_cap_from_the_environment():
    env = dict(os.environ, MMDAT_ISA='scalar')
    proc = _run(SCRIPT + 'print(ext.isa(), ext.fused_deform_attention_'
                'available())', env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from mmdat.ops import library as ext
    if ext.cpu_ops_available():
        assert proc.stdout.split() == ['OK', 'scalar', 'False']


@pytest.mark.slow  # a full run-time build: 1-2 minutes on 2 cores
def test_lock_left_by_killed_build_does_not_hang(tmp_path):
    from mmdat.ops import library as ext
    build_dir = tmp_path / f'mmdat_cpu_ops_{ext._build_tag()}'
    build_dir.mkdir()
    lock = build_dir / 'lock'
    lock.write_text('')
    old = time.time() - 3600
    os.utime(lock, (old, old))
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path),
               MMDAT_EXT='jit')
    env.pop('MMDAT_NO_EXT', None)
    proc = _run(SCRIPT + 'print(ext.build_info()["source"])', env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ['OK', 'jit'], proc.stderr[-2000:]
    assert list(build_dir.glob('*.so')), 'nothing was built'


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path),
               CXX=str(tmp_path / 'no-such-compiler'), MMDAT_EXT='jit')
    env.pop('MMDAT_NO_EXT', None)
    proc = _run(SCRIPT + 'print(ext.cpu_ops_available())', env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ['FALLBACK', 'False']
    assert proc.stderr.count('could not build the fused CPU kernels') == 1


def test_disabled_by_env(tmp_path):
    env = dict(os.environ, MMDAT_NO_EXT='1',
               TORCH_EXTENSIONS_DIR=str(tmp_path))
    proc = _run(SCRIPT + 'print(ext.unavailable_reason())', env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[0] == 'FALLBACK'
    assert 'MMDAT_NO_EXT' in proc.stdout
    assert not any(tmp_path.iterdir())  # nothing was built
