"""The README's code blocks marked ``<!-- readme-test: NAME -->`` do what
the README says:

* ``backbone``: runs as written in a fresh interpreter and prints the four
  feature shapes;
* ``pretrained``: a child config that sets the backbone's
  ``init_cfg.checkpoint`` changes the file the backbone loads (while
  ``pretrained = '...'`` alone does not, as the README warns);
* ``own-coco``: the data paths, classes and weights land in every dataset,
  evaluator and head, and the datasets build on COCO-format data (the demo
  data's COCO set standing in for the user's).
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest
from mmengine.config import Config

from conftest import ROOT, load_script

README = ROOT / 'README.md'


def _block(name: str) -> str:
    text = README.read_text()
    found = re.search(
        rf'<!-- readme-test: {re.escape(name)} -->\s*```python\n(.*?)```',
        text, re.S)
    assert found, f'README has no code block marked readme-test: {name}'
    return found.group(1)


def _as_config(code: str, tmp_path, name: str) -> Config:
    """Write a README config into tmp_path/my_configs/ with its `_base_`
    pointing at the repository's configs; load it."""
    code = code.replace("'../configs/", repr(str(ROOT / 'configs'))[:-1] + '/')
    folder = tmp_path / 'my_configs'
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(code)
    return Config.fromfile(str(path))


def test_backbone_snippet_runs_as_written(tmp_path):
    code = _block('backbone')
    env = dict(os.environ, OMP_NUM_THREADS='2', PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
    proc = subprocess.run([sys.executable, '-c', code], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == (
        '[(1, 64, 56, 56), (1, 128, 28, 28), (1, 256, 14, 14), '
        '(1, 512, 7, 7)]'), proc.stdout


def test_pretrained_in_a_child_config(tmp_path):
    code = _block('pretrained')
    wanted = re.search(r"checkpoint='([^']+)'", code).group(1)
    cfg = _as_config(code, tmp_path, 'child.py')
    init = cfg.model.backbone.init_cfg
    assert init.checkpoint == wanted
    assert init.type == 'Pretrained' and init.prefix == 'backbone.'
    # the pitfall the README warns about: the base's value stays
    base = ROOT / 'configs/mmdet/mask_rcnn_dat_pp_t_1x.py'
    (tmp_path / 'pitfall.py').write_text(
        f"_base_ = [{str(base)!r}]\npretrained = {wanted!r}\n")
    pitfall = Config.fromfile(str(tmp_path / 'pitfall.py'))
    assert pitfall.pretrained == wanted
    assert pitfall.model.backbone.init_cfg.checkpoint != wanted
    assert pitfall.model.backbone.init_cfg.checkpoint == Config.fromfile(
        str(base)).model.backbone.init_cfg.checkpoint


def test_pretrained_child_config_loads_that_file(tmp_path):
    """The backbone's init_weights reads the file the child config names."""
    import torch

    import mmdat  # noqa: F401
    from mmdat.models import DAT
    from conftest import TINY_ARCH
    src = DAT(arch=TINY_ARCH, out_indices=(0, 1, 2, 3))
    weights = tmp_path / 'weights.pth'
    torch.save({'state_dict': {f'backbone.{k}': v + 1.0 for k, v in
                               src.state_dict().items()}}, weights)
    code = _block('pretrained')
    code = re.sub(r"checkpoint='[^']+'", f'checkpoint={str(weights)!r}', code)
    cfg = _as_config(code, tmp_path, 'child.py')
    backbone_cfg = dict(cfg.model.backbone)
    backbone_cfg.pop('type')
    backbone_cfg.update(arch=TINY_ARCH, with_cp=False)
    model = DAT(**backbone_cfg)
    model.init_weights()
    key = 'patch_proj.0.weight'
    key = key if key in src.state_dict() else next(iter(src.state_dict()))
    torch.testing.assert_close(model.state_dict()[key],
                               src.state_dict()[key] + 1.0)


def test_own_coco_config(tmp_path):
    code = _block('own-coco')
    root = re.search(r"data_root = '([^']+)'", code).group(1)
    cfg = _as_config(code, tmp_path, 'own.py')
    classes = tuple(cfg.classes)
    for split in ('train', 'val', 'test'):
        ds = cfg[f'{split}_dataloader'].dataset
        assert ds.data_root == root, split
        assert tuple(ds.metainfo.classes) == classes, split
        assert ds.ann_file.startswith('annotations/'), split
        assert 'pipeline' in ds and ds.type == 'CocoDataset', split
    assert cfg.test_dataloader.dataset.ann_file == \
        cfg.val_dataloader.dataset.ann_file
    for ev in (cfg.val_evaluator, cfg.test_evaluator):
        assert ev.ann_file == root + cfg.val_dataloader.dataset.ann_file
        assert ev.type == 'CocoMetric'
    assert cfg.model.roi_head.bbox_head.num_classes == len(classes)
    assert cfg.model.roi_head.mask_head.num_classes == len(classes)
    assert cfg.model.backbone.init_cfg.type == 'Pretrained'

    # the datasets build on COCO-format data laid out as the README says
    pytest.importorskip('mmdet')
    demo = load_script(ROOT / 'tools/dataset_converters/make_demo_data.py')
    data = tmp_path / 'demo' / 'coco'
    if hasattr(demo, 'make_coco'):  # the COCO part alone is faster
        demo.make_coco(data)
    else:
        demo.generate(tmp_path / 'demo')
    assert (data / 'annotations' / 'instances_train.json').is_file()
    code = code.replace(f"data_root = '{root}'", f"data_root = '{data}/'")
    cfg = _as_config(code, tmp_path, 'own_demo.py')
    import mmdet.datasets  # noqa: F401  (registers CocoDataset, transforms)
    from mmdet.registry import DATASETS
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    for split in ('train', 'val'):
        dataset = DATASETS.build(cfg[f'{split}_dataloader'].dataset)
        assert len(dataset) > 0, split
        assert tuple(dataset.metainfo['classes']) == classes
        labels = {inst['bbox_label'] for i in range(len(dataset))
                  for inst in dataset.get_data_info(i)['instances']}
        assert labels and labels <= set(range(len(classes))), labels
