"""``tools/visualization/vis_deform_points.py``: one PNG per deformable block.

The tool runs as a subprocess on a tiny DAT++ classifier (a config in
``tmp_path`` that inherits ``configs/mmpretrain/dat_pp_demo.py`` with the
backbone shrunk to ``TINY_ARCH``) and a generated 64x64 PNG. Helpers of the
script (block selection, coordinate mapping) are also checked in-process.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_ARCH, load_script

SCRIPT = ROOT / 'tools' / 'visualization' / 'vis_deform_points.py'
# TINY_ARCH stage_spec [['N', 'D'], ['D', 'N'], ['N', 'D'], ['D']]
TINY_D_BLOCKS = ['stages.0.attns.1', 'stages.1.attns.0', 'stages.2.attns.1',
                 'stages.3.attns.0']


@pytest.fixture(scope='module')
def tool():
    return load_script(SCRIPT)


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp('vis_inputs')
    cfg = d / 'tiny_cls.py'
    cfg.write_text(
        f"_base_ = [{str(ROOT / 'configs/mmpretrain/dat_pp_demo.py')!r}]\n"
        f'model = dict(backbone=dict(arch=dict(_delete_=True, '
        f'**{TINY_ARCH!r}), drop_path_rate=0.0),\n'
        f'             head=dict(in_channels={TINY_ARCH["dims"][-1]}))\n')
    yy, xx = np.mgrid[:64, :64]
    img = np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1).astype(np.uint8)
    img_path = d / 'img.png'
    Image.fromarray(img).save(img_path)
    return cfg, img_path


def _run(*args, timeout=300):
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [str(ROOT)] + [p for p in [env.get('PYTHONPATH')] if p])
    env['OMP_NUM_THREADS'] = '1'
    env['MPLBACKEND'] = 'Agg'
    return subprocess.run([sys.executable, str(SCRIPT)] + [str(a) for a in args],
                          cwd=str(ROOT), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def _check_png(path):
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == 'PNG'
        w, h = im.size
        assert w >= 200 and h >= 200, (path, im.size)
        arr = np.asarray(im.convert('RGB'))
    # the image plus dots in several colours: far from a blank canvas
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 50, path


def test_one_png_per_deformable_block(inputs, tmp_path):
    cfg, img = inputs
    out = tmp_path / 'all'
    proc = _run(cfg, img, '--out', out)
    assert proc.returncode == 0, proc.stdout[-4000:]
    files = sorted(os.listdir(out))
    assert files == sorted(f'{b}.png' for b in TINY_D_BLOCKS)
    for f in files:
        _check_png(out / f)


def test_blocks_selects_and_checkpoint_loads(inputs, tmp_path):
    """--blocks picks blocks; --checkpoint weights are used: with the last
    offset conv zeroed, the keys sit on the (clamped) reference grid."""
    import mmdat  # noqa: F401
    from mmdat.models import DAT

    cfg, img = inputs
    torch.manual_seed(0)
    backbone = DAT(arch=TINY_ARCH, out_indices=(3, ))
    sd = {f'backbone.{k}': v for k, v in backbone.state_dict().items()}
    for k in sd:
        if k.endswith('conv_offset.3.weight'):
            sd[k] = torch.zeros_like(sd[k])
    ckpt = tmp_path / 'tiny.pth'
    # an OpenMMLab 2 checkpoint of the whole classifier (mmengine's loader)
    torch.save({'state_dict': sd, 'meta': {'mmdat_converted': True}}, ckpt)

    out = tmp_path / 'sel'
    proc = _run(cfg, img, '--out', out, '--blocks', '0.1', '3.0',
                '--checkpoint', ckpt, '--img-size', 48, 80, '--save-npz',
                '--mapping', 'centers')
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert sorted(os.listdir(out)) == [
        'stages.0.attns.1.npz', 'stages.0.attns.1.png',
        'stages.3.attns.0.npz', 'stages.3.attns.0.png'
    ]
    _check_png(out / 'stages.0.attns.1.png')
    for name, stride, groups in (('stages.0.attns.1', 4, 1),
                                 ('stages.3.attns.0', 32, 2)):
        data = np.load(out / f'{name}.npz')
        assert tuple(data['img_hw']) == (48, 80)
        feat = tuple(data['feat_hw'])
        assert feat == (-(-48 // stride), -(-80 // stride))
        pos, ref = data['pos'], data['ref']
        assert pos.shape == (groups, ) + ref.shape
        np.testing.assert_allclose(
            pos, np.broadcast_to(np.clip(ref, -1, 1), pos.shape), atol=1e-6)


def test_select_blocks(tool):
    avail = TINY_D_BLOCKS
    assert tool.select_blocks(avail, None) == avail
    assert tool.select_blocks(avail, ['2.1', '0.1', '2.1']) == [
        'stages.2.attns.1', 'stages.0.attns.1'
    ]
    assert tool.select_blocks(avail, ['stages.3.attns.0']) == [
        'stages.3.attns.0'
    ]
    with pytest.raises(ValueError) as err:
        tool.select_blocks(avail, ['0.0'])
    assert 'no deformable block stages.0.attns.0' in str(err.value)
    assert "['0.1', '1.0', '2.1', '3.0']" in str(err.value)
    with pytest.raises(ValueError, match='stages.1.attns.1'):
        tool.select_blocks(avail, ['1.1'])
    with pytest.raises(ValueError, match='no deformable attention'):
        tool.select_blocks([], None)
    assert [tool.stage_stride(b) for b in avail] == [4, 8, 16, 32]


def test_coordinate_mapping(tool):
    p = np.array([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.5]])
    y, x = tool.to_image_coords(p, (4, 6), (64, 96), 16, 'stretch')
    np.testing.assert_allclose(y, [0, 63, 31.5])
    np.testing.assert_allclose(x, [0, 95, 71.25])
    # receptive-field centres: feature pixel j of stride s is image pixel j*s
    y, x = tool.to_image_coords(p, (4, 6), (64, 96), 16, 'centers')
    np.testing.assert_allclose(y, [0, 48, 24])
    np.testing.assert_allclose(x, [0, 80, 60])
