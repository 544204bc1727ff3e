"""Packaging for openmim: ``mmdat/.mim`` holds ``model-index.yml``,
``configs`` and ``tools`` (made by ``add_mim_extension`` in setup.py).

* Editable install: links to the repository's files (skipped while
  ``mmdat/.mim`` does not exist; ``pip install -e . --no-deps
  --no-build-isolation`` makes it).
* Wheel, built from a copy of the sources without network: it holds copies
  of every config, metafile and tool, and once installed (into a temporary
  ``--target`` put first on ``PYTHONPATH``) ``mim search mmdat`` lists every
  config of the model index.

openmim 0.3.9 looks for ``<distribution location>/mmdat/.mim`` with
``pkg_resources``; a PEP 660 editable install (pip >= 21.3 with setuptools
>= 64, as here) keeps its metadata in site-packages and its code in the
repository, so ``tools/setup_env.sh`` links the package into site-packages
(``site-packages/mmdat -> <repo>/mmdat``): ``mim search mmdat`` then works
after the README's install, and ``import mmdat`` still runs the
repository's files.
"""
import glob
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT
from test_model_index import _non_demo_configs

MIM = ROOT / 'mmdat' / '.mim'
MIM_FILES = ('model-index.yml', 'configs', 'tools')


def _expected_names():
    return sorted(osp.splitext(osp.basename(p))[0]
                  for p in _non_demo_configs())


def _dev_only_tools():
    """Developer scripts setup.py leaves out of the wheel (by file name)."""
    sys.path.insert(0, str(ROOT))
    try:
        import setup  # import-safe: setup() runs under __main__ only
    finally:
        sys.path.remove(str(ROOT))
    return tuple(getattr(setup, 'DEV_ONLY_TOOLS', ()))


def _packaged_files():
    """Repository files that must be in ``mmdat/.mim`` (relative paths)."""
    files = ['model-index.yml']
    dev_only = _dev_only_tools()
    for pattern in ('configs/**/*.py', 'configs/**/*.yml', 'tools/**/*.py',
                    'tools/**/*.sh'):
        files += [osp.relpath(p, ROOT)
                  for p in glob.glob(str(ROOT / pattern), recursive=True)
                  if osp.basename(p) not in dev_only]
    return sorted(files)


def _run(cmd, **kwargs):
    env = dict(os.environ, PIP_NO_INDEX='1',
               PIP_DISABLE_PIP_VERSION_CHECK='1')
    env.update(kwargs.pop('env', {}))
    proc = subprocess.run([str(c) for c in cmd], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def test_editable_install_links_the_sources():
    if not MIM.is_dir():
        pytest.skip('mmdat/.mim is missing: run `pip install -e . --no-deps '
                    '--no-build-isolation` (setup.py creates it)')
    modelindex = pytest.importorskip('modelindex')
    for name in MIM_FILES:
        assert (MIM / name).is_symlink(), name
        assert osp.samefile(MIM / name, ROOT / name), name
    index = modelindex.load(str(MIM / 'model-index.yml'))
    assert sorted(m.name for m in index.models) == _expected_names()
    for model in index.models:
        assert (MIM / model.config).is_file(), model.config


@pytest.fixture
def wheel(built_wheel):
    """The session's wheel of this checkout (conftest)."""
    return built_wheel


def test_wheel_holds_configs_and_tools(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for rel in _packaged_files():
            member = f'mmdat/.mim/{rel}'
            assert member in names, member
            assert zf.read(member) == (ROOT / rel).read_bytes(), member
        for name in _dev_only_tools():
            assert not [n for n in names if n.startswith('mmdat/.mim/tools/')
                        and n.endswith('/' + name)], name
        for src in glob.glob(str(ROOT / 'mmdat/**/csrc/*.*'),
                             recursive=True):  # compiled on first use
            assert osp.relpath(src, ROOT) in names, src


def test_mim_search_lists_the_configs(wheel, tmp_path):
    mim = Path(sys.executable).parent / 'mim'
    if not mim.exists():
        pytest.skip('openmim is not installed')
    site = tmp_path / 'site'
    _run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q',
          '--target', site, wheel])
    assert (site / 'mmdat/.mim/model-index.yml').is_file()
    out = _run([mim, 'search', 'mmdat'], cwd=tmp_path,
               env=dict(PYTHONPATH=str(site)))
    assert sorted(re.findall(r'^config id: (\S+)$', out,
                             re.M)) == _expected_names(), out[-3000:]
    assert 'configs/mmdet/cascade_mask_rcnn_dat_pp_b_3x.py' in out


def _mim_configs(out):
    return sorted(re.findall(r'^config id: (\S+)$', out, re.M))


def test_mim_search_with_a_linked_package(tmp_path):
    """The set-up's fix on a temporary site dir: the editable install's
    dist-info plus a link to the repository's package."""
    from importlib import metadata
    mim = Path(sys.executable).parent / 'mim'
    if not mim.exists():
        pytest.skip('openmim is not installed')
    if not MIM.is_dir():
        pytest.skip('mmdat/.mim is missing (no editable install)')
    try:
        dist = metadata.distribution('mmdat')
    except metadata.PackageNotFoundError:
        pytest.skip('mmdat is not pip-installed in this environment')
    info = Path(dist._path)  # the .dist-info folder
    site = tmp_path / 'site'
    site.mkdir()
    shutil.copytree(info, site / info.name)
    (site / 'mmdat').symlink_to(ROOT / 'mmdat')
    out = _run([mim, 'search', 'mmdat'], cwd=tmp_path,
               env=dict(PYTHONPATH=str(site)))
    assert _mim_configs(out) == _expected_names(), out[-3000:]


def test_mim_search_after_the_readme_install(tmp_path):
    """``mim search mmdat`` in this environment, as set up by the README
    (tools/setup_env.sh)."""
    from importlib import metadata
    mim = Path(sys.executable).parent / 'mim'
    if not mim.exists():
        pytest.skip('openmim is not installed')
    try:
        metadata.distribution('mmdat')
    except metadata.PackageNotFoundError:
        pytest.skip('mmdat is not pip-installed in this environment')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    proc = subprocess.run([str(mim), 'search', 'mmdat'], cwd=tmp_path,
                          env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0 and 'Traceback' not in proc.stdout, (
        'mim search mmdat fails after the editable install; '
        'tools/setup_env.sh must link the package into site-packages:\n' +
        proc.stdout[-3000:])
    assert _mim_configs(proc.stdout) == _expected_names()
