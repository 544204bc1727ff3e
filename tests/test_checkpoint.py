"""Official checkpoints: conversion, Pretrained init and clear errors."""
import subprocess
import sys

import pytest
import torch
from mmengine.runner import load_checkpoint

from conftest import ROOT, TINY_ARCH
from mmdat.models import DAT
from mmdat.utils.checkpoint import (backbone_state_dict, checkpoint_kind,
                                    read_checkpoint)

CONVERTER = ROOT / 'tools/model_converters/dat2mmdat.py'


def _official_dense(manifests, fill, name='mini'):
    sd = fill.fill_official(manifests[f'backbone/{name}']['state_dict_shapes'])
    full = {f'backbone.{k}': v for k, v in sd.items()}
    full['neck.lateral_convs.0.conv.weight'] = torch.zeros(8, 32, 1, 1)
    return sd, {'state_dict': full, 'meta': {'epoch': 12}}


def test_official_dense_checkpoint_loads_into_backbone(manifests, fill):
    sd, ckpt = _official_dense(manifests, fill)
    model = DAT(arch=manifests['backbone/mini']['official_kwargs'])
    model.load_state_dict(backbone_state_dict(ckpt), strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_pretrained_init_from_official_classification(manifests, fill,
                                                      tmp_path):
    kw = manifests['classification/mini']['official_kwargs']
    sd = fill.fill_official(
        manifests['classification/mini']['state_dict_shapes'])
    path = tmp_path / 'cls.pth'
    torch.save({'model': sd}, path)
    model = DAT(arch=kw, init_cfg=dict(type='Pretrained',
                                       checkpoint=str(path)))
    model.init_weights()
    own = model.state_dict()
    assert torch.equal(own['stages.2.attns.1.rpe_table'],
                       sd['stages.2.attns.1.rpe_table'])
    # cls_norm is not copied into the dense output norms
    assert not torch.equal(own['norms.3.norm.weight'],
                           sd['cls_norm.norm.weight'])


def test_pretrained_init_resizes_rpe_for_384(manifests, fill, tmp_path):
    kw = manifests['classification/mini']['official_kwargs']
    sd = fill.fill_official(
        manifests['classification/mini']['state_dict_shapes'])
    path = tmp_path / 'cls.pth'
    torch.save({'model': sd}, path)
    model = DAT(arch=kw, img_size=384, out_indices=(3, ),
                init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    assert model.state_dict()['stages.0.attns.1.rpe_table'].shape == (
        2, 191, 191)


def test_converter_dense_roundtrip(manifests, fill, tmp_path):
    sd, ckpt = _official_dense(manifests, fill)
    src, dst = tmp_path / 'det.pth', tmp_path / 'out' / 'det_mmdat.pth'
    torch.save(ckpt, src)
    proc = subprocess.run([sys.executable, str(CONVERTER), str(src),
                           str(dst)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = torch.load(dst, weights_only=True)
    assert out['meta']['source_kind'] == 'official-dense'
    assert set(out['state_dict']) == set(ckpt['state_dict'])
    model = DAT(arch=manifests['backbone/mini']['official_kwargs'])
    wrapper = torch.nn.Module()
    wrapper.backbone = model
    wrapper.neck = torch.nn.Module()
    wrapper.neck.lateral_convs = torch.nn.ModuleList([torch.nn.Module()])
    wrapper.neck.lateral_convs[0].conv = torch.nn.Conv2d(32, 8, 1, bias=False)
    load_checkpoint(wrapper, str(dst), strict=True)


def test_converter_refuses_unknown_file(tmp_path):
    src = tmp_path / 'resnet.pth'
    torch.save({'state_dict': {'conv1.weight': torch.zeros(1)}}, src)
    proc = subprocess.run([sys.executable, str(CONVERTER), str(src),
                           str(tmp_path / 'x.pth')], capture_output=True,
                          text=True)
    assert proc.returncode == 1
    assert 'not a DAT/DAT++ checkpoint' in proc.stderr
    assert 'conv1.weight' in proc.stderr
    assert not (tmp_path / 'x.pth').exists()


def test_truncated_and_missing_files(tmp_path, manifests, fill):
    _, ckpt = _official_dense(manifests, fill)
    good = tmp_path / 'good.pth'
    torch.save(ckpt, good)
    bad = tmp_path / 'truncated.pth'
    bad.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match='truncated.pth'):
        read_checkpoint(str(bad))
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        read_checkpoint(str(tmp_path / 'nope.pth'))


def test_checkpoint_of_another_arch_names_the_key(manifests, fill, tmp_path):
    _, ckpt = _official_dense(manifests, fill)
    path = tmp_path / 'mini.pth'
    torch.save(ckpt, path)
    model = DAT(arch=TINY_ARCH, init_cfg=dict(type='Pretrained',
                                              checkpoint=str(path)))
    with pytest.raises(ValueError, match=r'mini.pth does not match.*checkpoint \(64, 32, 3, 3\) vs model \(32, 16, 3, 3\)'):
        model.init_weights()


def test_checkpoint_kind_message_lists_keys():
    with pytest.raises(ValueError, match="found top-level keys \\['foo'\\]"):
        checkpoint_kind({'foo': 1}, 'x.pth')
