"""Tests for tools/dataset_converters/make_demo_data.py (synthetic demo datasets)."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import load_script

SCRIPT = (Path(__file__).resolve().parents[1] / 'tools' / 'dataset_converters'
          / 'make_demo_data.py')


mdd = load_script(SCRIPT)


def _digests(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob('*')) if p.is_file()
    }


@pytest.fixture(scope='module')
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('demo_a')
    assert mdd.main([str(out)]) == 0
    return out


def _rgb(path: Path) -> np.ndarray:
    im = Image.open(path)
    assert im.mode == 'RGB'
    return np.asarray(im).astype(np.float64)


# dominant RGB channel of each class colour family
DOMINANT = {'circle': 0, 'square': 1, 'triangle': 2}


def test_deterministic_and_stamp(demo, tmp_path, capsys):
    ref = _digests(demo)
    assert (demo / mdd.STAMP_NAME).is_file()
    assert (demo / 'README.txt').is_file()
    assert len(ref) > 300

    # Up-to-date: nothing is rewritten.
    capsys.readouterr()
    assert mdd.main([str(demo)]) == 0
    assert 'up to date' in capsys.readouterr().out
    assert _digests(demo) == ref

    # A fresh, forced run elsewhere gives byte-identical files.
    other = tmp_path / 'demo_b'
    assert mdd.main([str(other), '--force']) == 0
    assert _digests(other) == ref

    # --force over an existing (tampered) set regenerates it identically,
    # and a missing stamp triggers regeneration without --force.
    (other / 'coco' / 'train' / '000001.png').write_bytes(b'junk')
    (other / 'coco' / 'train' / 'stale.png').write_bytes(b'junk')
    assert mdd.main([str(other), '--force']) == 0
    assert _digests(other) == ref
    (other / mdd.STAMP_NAME).unlink()
    (other / 'ade' / 'images' / 'training' / '000001.png').unlink()
    assert mdd.main([str(other)]) == 0
    assert _digests(other) == ref


def test_default_out_dir():
    assert mdd.DEFAULT_OUT_DIR == SCRIPT.parents[2] / 'data' / 'demo'


@pytest.mark.parametrize('split,n_img', [('train', 160), ('val', 24)])
def test_coco(demo, split, n_img):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    root = demo / 'coco'
    ann_file = root / 'annotations' / f'instances_{split}.json'
    coco = COCO(str(ann_file))
    cats = coco.loadCats(coco.getCatIds())
    assert [(c['id'], c['name']) for c in cats] == [
        (1, 'circle'), (2, 'square'), (3, 'triangle')]
    assert len(coco.getImgIds()) == n_img
    raw = json.loads(ann_file.read_text())
    assert len({a['id'] for a in raw['annotations']}) == len(raw['annotations'])

    shapes, seen_cats = set(), set()
    for img_id in coco.getImgIds():
        info = coco.loadImgs(img_id)[0]
        h, w = info['height'], info['width']
        img = _rgb(root / split / info['file_name'])
        assert img.shape == (h, w, 3)
        shapes.add((h, w))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        assert 1 <= len(anns) <= 3
        masks = []
        for ann in anns:
            assert ann['iscrowd'] == 0
            assert ann['category_id'] in (1, 2, 3)
            seen_cats.add(ann['category_id'])
            poly = ann['segmentation']
            assert len(poly) == 1 and len(poly[0]) >= 6
            rles = mask_utils.frPyObjects(poly, h, w)
            m = mask_utils.decode(mask_utils.merge(rles)).astype(bool)
            # polygon area ~ rasterised mask pixels
            assert m.sum() == pytest.approx(ann['area'], rel=0.1, abs=8)
            # mask lies within the bbox (1 px slack)
            x, y, bw, bh = ann['bbox']
            # large objects (nominal size 40..72 px; a square's side is
            # 0.84 of it), at most about half the image side plus rotation
            assert 33 <= max(bw, bh) <= 90
            assert max(bw, bh) <= 0.7 * max(h, w)
            ys, xs = np.nonzero(m)
            assert xs.min() >= x - 1 and xs.max() <= x + bw + 1
            assert ys.min() >= y - 1 and ys.max() <= y + bh + 1
            # painted pixels == polygon rasterised at pixel centres
            own = mdd.polygon_mask(list(zip(poly[0][::2], poly[0][1::2])), h, w)
            iou = (own & m).sum() / (own | m).sum()
            assert iou > 0.85
            masks.append((m, ann))
        union = np.zeros((h, w), bool)
        for m, _ in masks:
            assert not (union & m).any(), 'objects overlap'
            union |= m
        bg_mean = img[~union].mean(0)
        for m, ann in masks:
            obj_mean = img[m].mean(0)
            assert np.linalg.norm(obj_mean - bg_mean) > 40
            cls = mdd.COCO_CLASSES[ann['category_id'] - 1]
            assert int(np.argmax(obj_mean)) == DOMINANT[cls]
    assert seen_cats == {1, 2, 3}
    if split == 'train':
        assert any(h != w for h, w in shapes), 'expected non-square images'


def test_ade(demo):
    root = demo / 'ade'
    for split, n_img in (('training', 96), ('validation', 24)):
        imgs = sorted((root / 'images' / split).glob('*.png'))
        labels = sorted((root / 'annotations' / split).glob('*.png'))
        assert len(imgs) == n_img
        assert [p.name for p in imgs] == [p.name for p in labels]
        seen = set()
        for ip, lp in zip(imgs, labels):
            lab_im = Image.open(lp)
            assert lab_im.mode == 'L'
            lab = np.asarray(lab_im)
            img = _rgb(ip)
            assert img.shape[:2] == lab.shape
            values = set(np.unique(lab).tolist())
            assert values <= {1, 2, 3, 4}
            assert 1 in values and len(values) >= 2
            seen |= values
            for v in values - {1}:
                cls = mdd.ADE_CLASSES[v - 1]
                assert int(np.argmax(img[lab == v].mean(0))) == DOMINANT[cls]
        assert seen == {1, 2, 3, 4}, split


def test_imagenet(demo):
    root = demo / 'imagenet'
    classes = (root / 'meta' / 'classes.txt').read_text().split()
    assert tuple(classes) == mdd.IMAGENET_CLASSES == (
        'circle', 'square', 'triangle', 'cross')
    for split, n_per in (('train', 48), ('val', 16)):
        lines = (root / 'meta' / f'{split}.txt').read_text().splitlines()
        assert len(lines) == n_per * len(classes)
        listed = set()
        for line in lines:
            rel, label = line.split(' ')
            cls = rel.split('/')[0]
            assert int(label) == classes.index(cls)
            assert Path(rel).name.startswith(cls + '_')
            im = Image.open(root / split / rel)
            assert im.mode == 'RGB' and im.size == (64, 64)
            listed.add(rel)
        on_disk = {str(p.relative_to(root / split)).replace('\\', '/')
                   for p in (root / split).rglob('*.png')}
        assert on_disk == listed
