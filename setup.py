from setuptools import find_packages, setup


def read_version() -> str:
    ns = {}
    with open('mmdat/version.py') as f:
        exec(f.read(), ns)
    return ns['__version__']


setup(
    name='mmdat',
    version=read_version(),
    description='DAT++ (deformable attention vision transformer) backbone '
    'for mmdet, mmseg and mmpretrain (OpenMMLab 2.0)',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmdat', 'mmdat.*']),
    python_requires='>=3.8',
    install_requires=['torch>=2.0', 'mmengine>=0.10.0'],
    extras_require={
        'all': ['mmcv>=2.0.0,<2.2.0', 'mmdet>=3.0.0', 'mmsegmentation>=1.0.0',
                'mmpretrain>=1.0.0'],
    },
    license='Apache License 2.0',
)
