"""`import mmdat` / custom_imports make DAT buildable in all three libraries."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_ARCH


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg', 'mmpretrain'])
def test_build_under_default_scope(scope):
    import importlib

    from mmengine.registry import DefaultScope

    import mmdat
    from mmdat.models import DAT
    assert scope in mmdat.REGISTERED_SCOPES
    registry = importlib.import_module(f'{scope}.registry').MODELS
    with DefaultScope.overwrite_default_scope(scope):
        model = registry.build(dict(type='DAT', arch=TINY_ARCH,
                                    out_indices=(2, 3)))
    assert type(model) is DAT
    outs = model.eval()(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [64, 64]


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg', 'mmpretrain'])
def test_custom_imports_in_a_fresh_process(scope, tmp_path):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text(
        "custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)\n"
        f"default_scope = '{scope}'\n"
        f"backbone = dict(type='DAT', arch={TINY_ARCH!r})\n")
    code = (
        'import importlib, sys\n'
        'from mmengine.config import Config\n'
        'from mmengine.registry import init_default_scope\n'
        f'cfg = Config.fromfile({str(cfg)!r})\n'
        'init_default_scope(cfg.default_scope)\n'
        "assert 'mmdat' in sys.modules\n"
        f"MODELS = importlib.import_module('{scope}.registry').MODELS\n"
        'm = MODELS.build(cfg.backbone)\n'
        'print(type(m).__module__, type(m).__name__)\n')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith('mmdat.models.backbones.dat DAT')
