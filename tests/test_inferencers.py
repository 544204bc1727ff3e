"""The demo configs through the libraries' own inferencers (CPU).

For each demo config the model is built, its randomly initialised weights are
saved as a checkpoint with ``meta.dataset_meta`` (the demo classes), and the
inferencer of its library loads config + checkpoint and predicts on a demo
image file:

* ``mmdet.apis.DetInferencer``: labels / scores / boxes / masks, a
  visualisation PNG and the JSON predictions in ``out_dir``;
* ``mmseg.apis.MMSegInferencer``: a label map of the image's size;
* ``mmpretrain.apis.ImageClassificationInferencer``: scores over the demo
  classes.

The configs' ``custom_imports = dict(imports=['mmdat'])`` is honoured by the
inferencers (``Config.fromfile`` imports it); ``test_custom_imports_*``
checks that in a fresh interpreter that never imported ``mmdat`` itself.
"""
import importlib
import json
import os
import os.path as osp
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from mmengine.registry import DefaultScope
from PIL import Image

from conftest import ROOT, load_script

CONFIGS = {
    'det': ROOT / 'configs/mmdet/mask_rcnn_dat_pp_demo.py',
    'seg': ROOT / 'configs/mmseg/upernet_dat_pp_demo.py',
    'cls': ROOT / 'configs/mmpretrain/dat_pp_demo.py',
}
CLASSES = {
    'det': ('circle', 'square', 'triangle'),
    'seg': ('background', 'circle', 'square', 'triangle'),
    'cls': ('circle', 'square', 'triangle', 'cross'),
}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def demo_data(tmp_path_factory):
    mod = load_script(ROOT / 'tools/dataset_converters/make_demo_data.py')
    out = tmp_path_factory.mktemp('demo')
    mod.generate(out)
    return out


def _image(demo_data, kind):
    pattern = {'det': 'coco/val/*.png', 'seg': 'ade/images/validation/*.png',
               'cls': 'imagenet/val/*/*.png'}[kind]
    img = sorted(demo_data.glob(pattern))[0]
    w, h = Image.open(img).size
    return str(img), h, w


def _checkpoint(kind, path):
    """Random-init weights of the demo model + dataset_meta, as a file."""
    from mmdat.apis import load_config
    cfg = load_config(str(CONFIGS[kind]))
    registry = {'det': 'mmdet', 'seg': 'mmseg', 'cls': 'mmpretrain'}[kind]
    MODELS = importlib.import_module(f'{registry}.registry').MODELS
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    meta = dict(cfg.metainfo)
    assert tuple(meta['classes']) == CLASSES[kind]
    meta['classes'] = list(meta['classes'])
    torch.save({'state_dict': model.state_dict(),
                'meta': {'dataset_meta': meta}}, path)
    return str(path)


def test_det_inferencer(demo_data, tmp_path):
    from mmdet.apis import DetInferencer
    ckpt = _checkpoint('det', tmp_path / 'det.pth')
    img, h, w = _image(demo_data, 'det')
    inferencer = DetInferencer(model=str(CONFIGS['det']), weights=ckpt,
                               device='cpu', show_progress=False)
    # classes from the checkpoint's meta, not COCO's
    assert tuple(inferencer.model.dataset_meta['classes']) == CLASSES['det']
    out_dir = tmp_path / 'out'
    res = inferencer(img, out_dir=str(out_dir), no_save_pred=False,
                     pred_score_thr=0.0)
    assert len(res['predictions']) == 1
    pred = res['predictions'][0]
    n = len(pred['labels'])
    assert 0 < n <= 20  # test_cfg.rcnn.max_per_img
    assert len(pred['scores']) == len(pred['bboxes']) == len(
        pred['masks']) == n
    assert all(0 <= lbl < len(CLASSES['det']) for lbl in pred['labels'])
    scores = np.asarray(pred['scores'])
    assert ((scores >= 0) & (scores <= 1)).all()
    assert (np.diff(scores) <= 1e-6).all()  # sorted
    boxes = np.asarray(pred['bboxes'])
    assert boxes.shape == (n, 4)
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (
        boxes[:, 3] >= boxes[:, 1]).all()
    assert (boxes >= -1e-3).all() and (boxes[:, [0, 2]] <= w + 1e-3).all() \
        and (boxes[:, [1, 3]] <= h + 1e-3).all()
    assert all(m['size'] == [h, w] for m in pred['masks'])  # RLE
    # visualisation and predictions on disk
    stem = osp.splitext(osp.basename(img))[0]
    vis = out_dir / 'vis' / f'{stem}.png'
    assert vis.is_file()
    assert np.asarray(Image.open(vis)).shape == (h, w, 3)
    saved = json.loads((out_dir / 'preds' / f'{stem}.json').read_text())
    assert saved['labels'] == pred['labels']
    # the data samples: binary masks of the image size
    ds = inferencer(img, return_datasamples=True)['predictions'][0]
    inst = ds.pred_instances
    assert tuple(inst.masks.shape) == (len(inst), h, w)
    assert inst.masks.dtype == torch.bool
    assert tuple(inst.bboxes.shape) == (len(inst), 4)


def test_seg_inferencer(demo_data, tmp_path):
    from mmseg.apis import MMSegInferencer
    ckpt = _checkpoint('seg', tmp_path / 'seg.pth')
    img, h, w = _image(demo_data, 'seg')
    inferencer = MMSegInferencer(model=str(CONFIGS['seg']), weights=ckpt,
                                 device='cpu')
    inferencer.show_progress = False
    assert tuple(inferencer.model.dataset_meta['classes']) == CLASSES['seg']
    out_dir = tmp_path / 'out'
    res = inferencer(img, out_dir=str(out_dir))
    pred = res['predictions']
    assert isinstance(pred, np.ndarray)
    assert pred.shape == (h, w)
    assert pred.min() >= 0 and pred.max() < len(CLASSES['seg'])
    assert list((out_dir / 'vis').glob('*.png'))
    pred_png = list((out_dir / 'pred').glob('*.png'))
    assert len(pred_png) == 1
    assert np.asarray(Image.open(pred_png[0])).shape[:2] == (h, w)
    ds = inferencer(img, return_datasamples=True)
    assert tuple(ds.pred_sem_seg.data.shape) == (1, h, w)
    assert tuple(ds.seg_logits.data.shape) == (len(CLASSES['seg']), h, w)
    assert torch.equal(ds.pred_sem_seg.data[0],
                       ds.seg_logits.data.argmax(0))


def test_cls_inferencer(demo_data, tmp_path):
    from mmpretrain.apis import ImageClassificationInferencer
    ckpt = _checkpoint('cls', tmp_path / 'cls.pth')
    img, h, w = _image(demo_data, 'cls')
    # Unlike DetInferencer / MMSegInferencer, mmpretrain's inferencer does
    # not set the default scope for its pipeline and visualizer: after an
    # mmdet/mmseg inferencer in the same process it would look up
    # `PackInputs` in mmseg's registry (KeyError). Pin the scope.
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        inferencer = ImageClassificationInferencer(
            model=str(CONFIGS['cls']), pretrained=ckpt, device='cpu')
        assert tuple(inferencer.classes) == CLASSES['cls']
        show_dir = tmp_path / 'vis'
        res = inferencer(img, show_dir=str(show_dir))
    assert len(res) == 1
    pred = res[0]
    scores = pred['pred_scores']
    assert scores.shape == (len(CLASSES['cls']), )
    assert abs(float(scores.sum()) - 1) < 1e-5
    assert 0 <= pred['pred_label'] < len(CLASSES['cls'])
    assert pred['pred_label'] == int(np.argmax(scores))
    assert pred['pred_score'] == pytest.approx(float(scores.max()))
    assert pred['pred_class'] == CLASSES['cls'][pred['pred_label']]
    assert list(show_dir.glob('*.png'))


def test_custom_imports_honoured_without_importing_mmdat(demo_data,
                                                         tmp_path):
    """A fresh interpreter that only imports the libraries: the configs'
    ``custom_imports`` registers DAT for all three inferencers."""
    ckpts = {k: _checkpoint(k, tmp_path / f'{k}.pth') for k in CONFIGS}
    img, _, _ = _image(demo_data, 'cls')
    code = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(1)
        from mmdet.apis import DetInferencer
        from mmseg.apis import MMSegInferencer
        from mmpretrain.apis import ImageClassificationInferencer
        assert 'mmdat' not in sys.modules
        # mmpretrain's inferencer first: it builds its pipeline in the
        # current default scope, which the other two inferencers set
        inf = ImageClassificationInferencer(
            model={str(CONFIGS['cls'])!r}, pretrained={ckpts['cls']!r},
            device='cpu')
        assert 'mmdat' in sys.modules
        print('LABEL', inf({img!r})[0]['pred_label'])
        DetInferencer(model={str(CONFIGS['det'])!r},
                      weights={ckpts['det']!r}, device='cpu')
        MMSegInferencer(model={str(CONFIGS['seg'])!r},
                        weights={ckpts['seg']!r}, device='cpu')
        print('BUILT')
    """)
    proc = subprocess.run([sys.executable, '-c', code], cwd=str(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300,
                          env={**os.environ,
                               'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert 'LABEL' in proc.stdout and 'BUILT' in proc.stdout
