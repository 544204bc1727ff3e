import glob
import importlib.util
import os
import os.path as osp
import platform
import shutil
import sys
import sysconfig
from typing import Tuple

from setuptools import find_packages, setup

# What openmim (``mim search/train/test mmdat``) looks for in
# ``<installed package>/.mim``.
MIM_FILES = ('model-index.yml', 'configs', 'tools')
# Developer-only scripts (GPU checks of this repository's kernels, the
# repository's venv set-up and test runner): in the repository, not in
# wheels. Matched by file name anywhere below tools/.
DEV_ONLY_TOOLS = ('cuda_quick.py', 'cuda_check.sh', 'setup_env.sh',
                  'run_tests.sh')


def read_version() -> str:
    ns = {}
    with open('mmdat/version.py') as f:
        exec(f.read(), ns)
    return ns['__version__']


def add_mim_extension() -> None:
    """Put ``model-index.yml``, ``configs`` and ``tools`` into ``mmdat/.mim``
    (the OpenMMLab pattern, as in mmdet's setup.py).

    Editable installs (``develop``; ``editable_wheel`` for PEP 660) get
    symlinks to the originals, builds (wheel, sdist) get copies. Any other
    command leaves ``mmdat/.mim`` alone.
    """
    if 'develop' in sys.argv or 'editable_wheel' in sys.argv:
        mode = 'copy' if platform.system() == 'Windows' else 'symlink'
    elif any(cmd in sys.argv for cmd in ('sdist', 'bdist_wheel', 'build')):
        mode = 'copy'
    else:
        return
    root = osp.dirname(osp.abspath(__file__))
    mim_path = osp.join(root, 'mmdat', '.mim')
    os.makedirs(mim_path, exist_ok=True)
    for name in MIM_FILES:
        src, dst = osp.join(root, name), osp.join(mim_path, name)
        if not osp.exists(src):
            continue
        if osp.islink(dst) or osp.isfile(dst):
            os.remove(dst)
        elif osp.isdir(dst):
            shutil.rmtree(dst)
        if mode == 'symlink':
            os.symlink(osp.relpath(src, mim_path), dst)
        elif osp.isdir(src):
            ignore = shutil.ignore_patterns('__pycache__', '*.pyc',
                                            *DEV_ONLY_TOOLS)
            shutil.copytree(src, dst, ignore=ignore)
        else:
            shutil.copyfile(src, dst)


def cpu_extension() -> Tuple[list, dict]:
    """The C++ CPU kernels as the extension ``mmdat.ops._C`` (see
    mmdat/ops/library.py): every source is compiled for the baseline
    target; the kernel files switch the instruction set per variant
    themselves (AVX-512, AVX2 + FMA, scalar; chosen at run time), so there
    is no ``-march=native`` and the wheel runs on any x86-64 CPU.

    Needs torch at build time: the one installed in the target environment
    (also seen from pip's isolated build environment). Without torch, or
    with ``MMDAT_NO_EXT=1``, the package is built without the module and
    compiles the kernels on first use instead.
    """
    if os.environ.get('MMDAT_NO_EXT', '') not in ('', '0'):
        return [], {}
    try:
        import torch  # noqa: F401 - needed to build the extension
    except ImportError:
        # pip's isolated build environment hides the packages of the
        # environment it installs into; build against the torch installed
        # there (the one the module will be loaded into: same C++ ABI)
        for key in ('platlib', 'purelib'):
            path = sysconfig.get_paths()[key]
            if path not in sys.path:
                sys.path.append(path)
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print('mmdat: torch is not importable at build time; building '
              'without the compiled CPU kernels (compiled on first use '
              'instead). Install torch first.', file=sys.stderr)
        return [], {}
    if sys.platform not in ('linux', 'darwin'):
        return [], {}
    # the loader's own flags (torch version, sources' hash: it loads only a
    # build that matches both); loaded by path, so that nothing of mmdat
    # but this torch-only module is imported
    spec = importlib.util.spec_from_file_location(
        '_mmdat_ops_library', osp.join('mmdat', 'ops', 'library.py'))
    library = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(library)
    csrc = osp.join('mmdat', 'ops', 'csrc')
    sources = sorted(glob.glob(osp.join(csrc, '*.cpp')))
    openmp = ['-fopenmp'] if sys.platform == 'linux' else []
    ext = CppExtension(
        'mmdat.ops._C',
        sources=sources,
        include_dirs=[osp.abspath(csrc)],
        depends=sorted(glob.glob(osp.join(csrc, '*.h'))),
        extra_compile_args={
            'cxx': ['-O3', '-g0'] + library.build_flags() + openmp
        },
        extra_link_args=openmp)
    return [ext], {'build_ext': BuildExtension}


if __name__ == '__main__':
    add_mim_extension()
    ext_modules, cmdclass = cpu_extension()
    setup(
        name='mmdat',
        version=read_version(),
        description='DAT++ (deformable attention vision transformer) '
        'backbone for mmdet, mmseg and mmpretrain (OpenMMLab 2.0)',
        long_description=open('README.md').read(),
        long_description_content_type='text/markdown',
        packages=find_packages(include=['mmdat', 'mmdat.*']),
        package_data={
            'mmdat': [
                '.mim/model-index.yml', '.mim/configs/**/*.py',
                '.mim/configs/**/*.yml', '.mim/tools/**/*.py',
                '.mim/tools/**/*.sh',
                # the development fallback compiles them at run time
                # (torch.utils.cpp_extension.load) where mmdat.ops._C is
                # missing or built for another torch
                'ops/csrc/*.cpp', 'ops/csrc/*.h'
            ]
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        python_requires='>=3.8',
        # 2.4: torch.library.custom_op / register_fake, used at import
        install_requires=['torch>=2.4', 'mmengine>=0.10.0'],
        extras_require={
            'all': [
                'mmcv>=2.0.0,<2.2.0', 'mmdet>=3.0.0',
                'mmsegmentation>=1.0.0', 'mmpretrain>=1.0.0'
            ],
            # ONNX export and its check with onnxruntime (opset >= 17);
            # ml_dtypes 0.6 (an onnx dependency) needs numpy >= 2
            'deploy': ['onnx>=1.16', 'onnxruntime>=1.18', 'ml_dtypes<0.6'],
        },
        license='Apache License 2.0',
        zip_safe=False,
    )
