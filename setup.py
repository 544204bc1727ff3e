import os
import os.path as osp
import platform
import shutil
import sys

from setuptools import find_packages, setup

# What openmim (``mim search/train/test mmdat``) looks for in
# ``<installed package>/.mim``.
MIM_FILES = ('model-index.yml', 'configs', 'tools')


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
            ignore = shutil.ignore_patterns('__pycache__', '*.pyc')
            shutil.copytree(src, dst, ignore=ignore)
        else:
            shutil.copyfile(src, dst)


if __name__ == '__main__':
    add_mim_extension()
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
                # compiled on first use (torch.utils.cpp_extension.load)
                'ops/csrc/*.cpp', 'ops/csrc/*.h'
            ]
        },
        python_requires='>=3.8',
        install_requires=['torch>=2.0', 'mmengine>=0.10.0'],
        extras_require={
            'all': [
                'mmcv>=2.0.0,<2.2.0', 'mmdet>=3.0.0',
                'mmsegmentation>=1.0.0', 'mmpretrain>=1.0.0'
            ],
        },
        license='Apache License 2.0',
        zip_safe=False,
    )
