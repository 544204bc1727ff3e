"""A wheel built here carries the compiled kernels: installed with
``pip install --no-deps --target DIR`` and run in a process that has no
compiler (``CC``/``CXX`` point at a missing program, ``PATH`` holds none),
the backbone's forward runs the C++ ops of the ahead-of-time module, for
the best instruction set of this CPU, and nothing is compiled."""
import json
import os
import subprocess
import sys
import zipfile

import pytest

pytestmark = pytest.mark.slow  # compiles the kernels: minutes on 2 cores

FORWARD = '''
import json, os, sys
import torch
import mmdat
from mmdat.models import DAT
from mmdat.ops import library
info = library.build_info()
arch = json.loads(sys.argv[1])
model = DAT(arch=arch).eval()
with torch.no_grad(), torch.profiler.profile() as prof:
    out = model(torch.randn(1, 3, 64, 64))
ops = sorted({e.name for e in prof.events() if e.name.startswith('mmdat::')})
print(json.dumps(dict(info=info, ops=ops, mmdat=mmdat.__file__,
                      finite=all(bool(o.isfinite().all()) for o in out))))
'''


def _pip(*args, cwd=None):
    env = dict(os.environ, PIP_NO_INDEX='1',
               PIP_DISABLE_PIP_VERSION_CHECK='1', MAX_JOBS='2')
    env.pop('MMDAT_NO_EXT', None)
    proc = subprocess.run([sys.executable, '-m', 'pip', *map(str, args)],
                          cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]


@pytest.fixture
def wheel(built_wheel):
    return built_wheel


def test_wheel_holds_the_compiled_kernels(wheel):
    assert '-linux_' in wheel.name or '-macosx_' in wheel.name, wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert [n for n in names if n.startswith('mmdat/ops/_C.')
            and n.endswith('.so')], names
    tools = [n for n in names if n.startswith('mmdat/.mim/tools/')]
    assert 'mmdat/.mim/tools/train.py' in tools
    for dev in ('cuda_quick.py', 'cuda_check.sh', 'setup_env.sh',
                'run_tests.sh'):
        assert not [n for n in tools if n.endswith('/' + dev)], dev


def test_wheel_runs_without_a_compiler(wheel, tmp_path):
    from conftest import TINY_ARCH
    site = tmp_path / 'site'
    _pip('install', '--no-deps', '-q', '--target', site, wheel)
    empty = tmp_path / 'bin'
    empty.mkdir()
    ext_dir = tmp_path / 'torch_extensions'
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('MMDAT_', 'PYTHON'))}
    env.update(PATH=str(empty), CC=str(empty / 'no-cc'),
               CXX=str(empty / 'no-c++'), PYTHONPATH=str(site),
               TORCH_EXTENSIONS_DIR=str(ext_dir), OMP_NUM_THREADS='2')
    proc = subprocess.run(
        [sys.executable, '-W', 'error::UserWarning:mmdat.ops.library', '-c',
         FORWARD, json.dumps(TINY_ARCH)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    info = res['info']
    assert res['mmdat'].startswith(str(site)), res['mmdat']
    assert info['source'] == 'aot', info
    assert info['path'].startswith(str(site)), info
    from mmdat.ops import library
    if library.cpu_ops_available():  # the same CPU: the same best ISA
        assert info['isa'] == library.available_isas()[0], info
    # the fused kernels ran: both attention kinds (one-pass deformable
    # kernel on AVX-512 only)
    assert 'mmdat::neighborhood_attention_inference' in res['ops'], res['ops']
    if info['isa'] == 'avx512':
        assert 'mmdat::deform_attention_infer' in res['ops'], res['ops']
    else:
        assert {'mmdat::deform_bias', 'mmdat::deform_bias_out'} & set(
            res['ops']), res['ops']
    assert res['finite']
    assert not ext_dir.exists() or not any(ext_dir.iterdir()), \
        'something was compiled at run time'
