"""Model zoo metadata: ``model-index.yml`` and ``configs/*/metafile.yml``.

The files follow the schema of the OpenMMLab repositories as read by openmim
and the ``model-index`` package (``Import`` / ``Collections`` / ``Models`` with
``Name``, ``In Collection``, ``Config``, ``Metadata``, ``Results``). Checked:

* every file parses with ``yaml.safe_load`` and, as a whole, with
  ``modelindex.load`` without check errors;
* every non-demo config under ``configs/`` is listed exactly once (and no demo
  config), every ``Config`` path exists, names are unique;
* the results are the published numbers of the official DAT++ release, hard-coded
  below from the reference's "Published results" table (facts from the paper,
  not produced by this code), and agree with the ``Official: ...`` header of
  each config;
* the weights are not hosted here: each model says ``Converted From`` the
  official code instead of giving a ``Weights`` URL.
"""
import glob
import os.path as osp

import pytest
import yaml

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
INDEX = osp.join(ROOT, 'model-index.yml')
METAFILES = ('configs/mmdet/metafile.yml', 'configs/mmseg/metafile.yml',
             'configs/mmpretrain/metafile.yml')
# the official code of each task (the dense-prediction runs have their own
# repositories)
OFFICIAL_CODE = {'mmdet': 'https://github.com/LeapLabTHU/DAT-Detection',
                 'mmseg': 'https://github.com/LeapLabTHU/DAT-Segmentation',
                 'mmpretrain': 'https://github.com/LeapLabTHU/DAT'}
TASKS = {
    'mmdet': {'Object Detection', 'Instance Segmentation'},
    'mmseg': {'Semantic Segmentation'},
    'mmpretrain': {'Image Classification'},
}

# Published results (reference README, "Published results (official
# repositories)"), keyed by our config name.
DET = {  # box AP, mask AP (None: RetinaNet)
    'retinanet_dat_pp_t_1x': (46.8, None),
    'retinanet_dat_pp_t_3x': (49.2, None),
    'retinanet_dat_pp_s_1x': (48.3, None),
    'retinanet_dat_pp_s_3x': (50.2, None),
    'mask_rcnn_dat_pp_t_1x': (48.7, 43.7),
    'mask_rcnn_dat_pp_t_3x': (50.5, 45.1),
    'mask_rcnn_dat_pp_s_1x': (49.8, 44.5),
    'mask_rcnn_dat_pp_s_3x': (51.2, 45.7),
    'cascade_mask_rcnn_dat_pp_t_1x': (52.2, 45.0),
    'cascade_mask_rcnn_dat_pp_t_3x': (53.0, 46.0),
    'cascade_mask_rcnn_dat_pp_s_3x': (54.2, 46.9),
    'cascade_mask_rcnn_dat_pp_b_3x': (54.5, 47.0),
}
SEG = {  # mIoU single-scale, multi-scale
    'upernet_dat_pp_t_160k_ade20k': (49.4, 50.3),
    'upernet_dat_pp_s_160k_ade20k': (50.5, 51.2),
    'upernet_dat_pp_b_160k_ade20k': (51.0, 51.5),
    'fpn_dat_pp_t_80k_ade20k': (48.4, 48.8),
    'fpn_dat_pp_s_80k_ade20k': (49.9, 50.7),
    'fpn_dat_pp_b_80k_ade20k': (50.4, 51.1),
}
CLS = {  # top-1, params (M, rounded as published), GFLOPs at 224 (or None)
    'dat_pp_t_in1k': (83.9, 24.0, 4.3),
    'dat_pp_s_in1k': (84.6, 53.1, 9.4),
    'dat_pp_b_in1k': (84.9, 93.7, 16.6),
    'dat_pp_b_in1k_384': (85.9, 93.7, 49.7),
}


def _load(rel):
    with open(osp.join(ROOT, rel)) as f:
        return yaml.safe_load(f)


def _non_demo_configs():
    paths = sorted(
        osp.relpath(p, ROOT)
        for lib in ('mmdet', 'mmseg', 'mmpretrain')
        for p in glob.glob(osp.join(ROOT, 'configs', lib, '*.py')))
    return [p for p in paths if not osp.basename(p).endswith('_demo.py')]


@pytest.fixture(scope='module')
def metafiles():
    return {rel: _load(rel) for rel in METAFILES}


@pytest.fixture(scope='module')
def models(metafiles):
    """name -> (library, model dict)."""
    out = {}
    for rel, data in metafiles.items():
        lib = rel.split('/')[1]
        for m in data['Models']:
            assert m['Name'] not in out, f'duplicate model name {m["Name"]}'
            out[m['Name']] = (lib, m)
    return out


def test_model_index_imports_the_three_metafiles():
    index = _load('model-index.yml')
    assert set(index) == {'Import'}
    assert sorted(index['Import']) == sorted(METAFILES)
    for rel in index['Import']:
        assert osp.isfile(osp.join(ROOT, rel)), rel


def test_metafile_schema(metafiles):
    for rel, data in metafiles.items():
        lib = rel.split('/')[1]
        assert set(data) == {'Collections', 'Models'}, rel
        collections = {c['Name'] for c in data['Collections']}
        assert len(collections) == len(data['Collections']), rel
        for c in data['Collections']:
            assert c['Paper']['URL'] == 'https://arxiv.org/abs/2309.01430'
            assert 'DAT++' in c['Paper']['Title']
            assert c['Code']['URL'] == OFFICIAL_CODE[lib]
            assert c['Metadata']['Training Data']
            assert isinstance(c['Metadata']['Architecture'], list)
        for m in data['Models']:
            name = m['Name']
            assert m['In Collection'] in collections, name
            assert m['Config'] == f'configs/{lib}/{name}.py', name
            assert isinstance(m.get('Metadata', {}), dict), name
            assert m['Results'], name
            for r in m['Results']:
                assert set(r) == {'Task', 'Dataset', 'Metrics'}, name
                assert r['Task'] in TASKS[lib], (name, r['Task'])
                assert r['Metrics'] and all(
                    isinstance(v, float) for v in r['Metrics'].values()), name
            # The official weights are the authors'; no URL is claimed here.
            assert 'Weights' not in m, name
            assert m['Converted From'] == {'Code': OFFICIAL_CODE[lib]}, name


def test_every_non_demo_config_listed_once(metafiles):
    listed = [m['Config'] for data in metafiles.values()
              for m in data['Models']]
    expected = _non_demo_configs()
    assert len(expected) == 22  # 12 detectors, 6 segmentors, 4 classifiers
    assert sorted(listed) == expected
    assert len(set(listed)) == len(listed)
    for path in listed:
        assert osp.isfile(osp.join(ROOT, path)), path
        assert not path.endswith('_demo.py'), path


def test_detection_results(models):
    for name, (box, mask) in DET.items():
        lib, m = models[name]
        assert lib == 'mmdet'
        got = {r['Task']: r for r in m['Results']}
        assert got['Object Detection']['Dataset'] == 'COCO'
        assert got['Object Detection']['Metrics'] == {'box AP': box}, name
        if mask is None:
            assert m['In Collection'] == 'RetinaNet'
            assert set(got) == {'Object Detection'}, name
        else:
            assert got['Instance Segmentation']['Dataset'] == 'COCO'
            assert got['Instance Segmentation']['Metrics'] == {
                'mask AP': mask}, name
        assert m['Metadata']['Epochs'] == (12 if name.endswith('1x') else 36)


def test_segmentation_results(models):
    for name, (ss, ms) in SEG.items():
        lib, m = models[name]
        assert lib == 'mmseg'
        (r, ) = m['Results']
        assert r['Dataset'] == 'ADE20K'
        assert r['Metrics'] == {'mIoU': ss, 'mIoU(ms)': ms}, name


def test_classification_results(models):
    for name, (top1, params_m, gflops) in CLS.items():
        lib, m = models[name]
        assert lib == 'mmpretrain'
        (r, ) = m['Results']
        assert r['Dataset'] == 'ImageNet-1k'
        assert r['Metrics'] == {'Top 1 Accuracy': top1}, name
        meta = m['Metadata']
        assert round(meta['Parameters'] / 1e6, 1) == params_m, name
        if gflops is None:
            assert 'FLOPs' not in meta, name
        else:
            assert meta['FLOPs'] == round(gflops * 1e9), name


def test_spot_checks(models):
    """A few numbers from the reference table, written out in full."""
    _, m = models['mask_rcnn_dat_pp_t_1x']
    assert [r['Metrics'] for r in m['Results']] == [{'box AP': 48.7},
                                                     {'mask AP': 43.7}]
    _, m = models['cascade_mask_rcnn_dat_pp_b_3x']
    assert [r['Metrics'] for r in m['Results']] == [{'box AP': 54.5},
                                                     {'mask AP': 47.0}]
    _, m = models['upernet_dat_pp_t_160k_ade20k']
    assert m['Results'][0]['Metrics'] == {'mIoU': 49.4, 'mIoU(ms)': 50.3}
    _, m = models['dat_pp_b_in1k_384']
    assert m['Results'][0]['Metrics'] == {'Top 1 Accuracy': 85.9}
    _, m = models['dat_pp_t_in1k']
    assert m['Metadata']['Parameters'] == 23962876  # manifests.json
    assert m['Metadata']['FLOPs'] == 4300000000


def test_results_match_config_headers(models):
    """Each config states its official numbers in its header comment."""
    for name, (lib, m) in models.items():
        with open(osp.join(ROOT, m['Config'])) as f:
            header = ''.join(
                line for line in f if line.startswith('#'))
        for r in m['Results']:
            for value in r['Metrics'].values():
                assert f'{value:.1f}' in header, (name, value)


def test_modelindex_package_loads_it():
    modelindex = pytest.importorskip('modelindex')
    mi = modelindex.load(INDEX)
    errors = [e for e in mi.collect_check_errors() if e['errors']]
    assert not errors, errors
    names = sorted(m.name for m in mi.models)
    expected = sorted(
        osp.splitext(osp.basename(p))[0] for p in _non_demo_configs())
    assert names == expected
    assert len(mi.collections) == 6
    by_name = {m.name: m for m in mi.models}
    m = by_name['mask_rcnn_dat_pp_t_1x']
    assert m.in_collection == 'Mask R-CNN'
    assert [r.metrics for r in m.results] == [{'box AP': 48.7},
                                              {'mask AP': 43.7}]
    assert osp.isfile(osp.join(ROOT, m.config))
    full = m.full_model  # collection metadata merged in
    assert full.metadata.training_data == 'COCO'
    assert 'DAT++' in full.metadata.architecture
    assert by_name['dat_pp_s_in1k'].metadata.parameters == 53127366
