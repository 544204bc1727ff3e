"""The contract: outputs of the official implementation (golden_mini.pt)."""
import hashlib
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, rel_err, require_impl
from mmdat.models import DAT

TOL = 1e-4


def sd_sha256(sd):
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope='module')
def backbone_weights(golden, manifests, fill):
    sd = fill.fill_official(manifests['backbone/mini']['state_dict_shapes'],
                            seed=golden['backbone']['fill_seed'])
    assert sd_sha256(sd) == golden['backbone']['filled_state_dict_sha256']
    return sd


@pytest.mark.parametrize('impl', ['cpu', 'chunked', 'reference'])
def test_backbone_matches_official(golden, backbone_weights, fill, impl):
    arch = dict(golden['backbone']['official_kwargs'])
    require_impl(impl)
    model = DAT(arch=arch, out_indices=(0, 1, 2, 3), impl=impl).eval()
    model.load_state_dict(backbone_weights, strict=True)
    for case in golden['backbone']['cases']:
        x = fill.make_input(case['input_shape'], case['input_seed'])
        with torch.no_grad():
            outs = model(x)
        assert len(outs) == len(case['outputs'])
        for out, ref in zip(outs, case['outputs']):
            assert out.shape == ref.shape
            assert rel_err(out, ref) <= TOL, (case['input_shape'], impl)


def test_classifier_through_converter_matches_official(
        golden, manifests, fill, tmp_path):
    from mmengine.runner import load_checkpoint
    from mmpretrain.registry import MODELS
    from mmpretrain.utils import register_all_modules

    import mmdat  # noqa: F401
    register_all_modules(init_default_scope=True)
    sd = fill.fill_official(
        manifests['classification/mini']['state_dict_shapes'],
        seed=golden['classification']['fill_seed'])
    assert sd_sha256(sd) == golden['classification'][
        'filled_state_dict_sha256']
    src, dst = tmp_path / 'official.pth', tmp_path / 'mmdat.pth'
    torch.save({'model': sd, 'epoch': 300}, src)
    proc = subprocess.run(
        [sys.executable, str(ROOT / 'tools/model_converters/dat2mmdat.py'),
         str(src), str(dst)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    kw = golden['classification']['official_kwargs']
    model = MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='DAT', arch=dict(kw), out_indices=(3, )),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=kw['num_classes'],
                  in_channels=kw['dims'][-1]))).eval()
    ckpt = load_checkpoint(model, str(dst), map_location='cpu', strict=True)
    assert ckpt['meta']['source_kind'] == 'official-classification'
    for case in golden['classification']['cases']:
        x = fill.make_input(case['input_shape'], case['input_seed'])
        with torch.no_grad():
            logits = model(x, mode='tensor')
        ref = case['outputs'][0]
        assert logits.shape == ref.shape
        assert rel_err(logits, ref) <= TOL, case['input_shape']
