"""The fused CPU kernels' build: a lock file left behind by a killed build
does not hang the next process (torch >= 2.14 holds an OS advisory lock on
it, released when its holder dies; older torch waited on the file's mere
existence), and ``MMDAT_NO_EXT=1`` builds nothing."""
import os
import subprocess
import sys
import time

from conftest import ROOT

SCRIPT = '''
from mmdat.ops import library as ext
print('OK' if ext.cpu_ops_available() else 'FALLBACK')
'''


def test_lock_left_by_killed_build_does_not_hang(tmp_path):
    from mmdat.ops import library as ext
    build_dir = tmp_path / f'mmdat_cpu_ops_{ext._build_tag()}'
    build_dir.mkdir()
    lock = build_dir / 'lock'
    lock.write_text('')
    old = time.time() - 3600
    os.utime(lock, (old, old))
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    env.pop('MMDAT_NO_EXT', None)
    proc = subprocess.run([sys.executable, '-c', SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ['OK'], proc.stderr[-2000:]
    assert list(build_dir.glob('*.so')), 'nothing was built'


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path),
               CXX=str(tmp_path / 'no-such-compiler'))
    env.pop('MMDAT_NO_EXT', None)
    proc = subprocess.run(
        [sys.executable, '-W', 'always', '-c',
         SCRIPT + 'print(ext.cpu_ops_available())'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ['FALLBACK', 'False']
    assert proc.stderr.count('could not build the fused CPU kernels') == 1


def test_disabled_by_env(tmp_path):
    env = dict(os.environ, MMDAT_NO_EXT='1', TORCH_EXTENSIONS_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, '-c', SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ['FALLBACK']
    assert not any(tmp_path.iterdir())  # nothing was built
