"""Official checkpoints: conversion, Pretrained init and clear errors."""
import pytest
import torch
from mmengine.runner import load_checkpoint

from conftest import ROOT, TINY_ARCH, load_script
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
    # in process (the command line itself runs in tests/test_golden.py)
    assert load_script(CONVERTER).main([str(src), str(dst)]) == 0
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


def test_converter_refuses_unknown_file(tmp_path, capsys):
    src = tmp_path / 'resnet.pth'
    torch.save({'state_dict': {'conv1.weight': torch.zeros(1)}}, src)
    assert load_script(CONVERTER).main([str(src),
                                        str(tmp_path / 'x.pth')]) == 1
    err = capsys.readouterr().err
    assert 'not a DAT/DAT++ checkpoint' in err
    assert 'conv1.weight' in err
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


# --------------------------------------------------------------------------
# safe loading (mmdat.utils.checkpoint.safe_load)
# --------------------------------------------------------------------------
_RAN = []


def _record(tag):
    _RAN.append(tag)
    return tag


class _Payload:
    """Unpickling it calls ``_record``: stands for any code a pickle runs."""

    def __reduce__(self):
        return (_record, ('payload ran', ))


def _runner_like_checkpoint():
    """What an mmengine runner checkpoint holds besides tensors."""
    import numpy as np
    from mmengine.logging import MessageHub
    from mmengine.optim.scheduler import MultiStepLR
    hub = MessageHub.get_instance('mmdat_test_safe_load')
    for i in range(3):
        hub.update_scalar('train/loss', np.float64(1.0 / (i + 1)))
        hub.update_scalar('train/lr', 1e-4)
    hub.update_info('iter', 3)
    hub.update_info('arr', np.arange(3, dtype=np.int64))
    param = torch.nn.Parameter(torch.zeros(2))
    optim = torch.optim.AdamW([param], lr=1e-4)
    sched = MultiStepLR(optim, milestones=[8, 11], by_epoch=True)
    return {
        'meta': {'epoch': 1, 'iter': 3, 'cfg': 'model = dict()',
                 'seed': np.int64(0), 'dataset_meta': {'classes': ('a', )}},
        'state_dict': {'w': torch.ones(2)},
        'message_hub': hub.state_dict(),
        'optimizer': optim.state_dict(),
        'param_schedulers': [sched.state_dict()],
    }


def test_safe_load_reads_runner_checkpoints(tmp_path):
    from mmdat.utils import safe_load
    path = tmp_path / 'epoch_1.pth'
    torch.save(_runner_like_checkpoint(), path)
    ckpt = safe_load(str(path))  # not trusted: weights-only + allowlist
    hub = ckpt['message_hub']
    assert hub['log_scalars']['train/loss'].mean() == pytest.approx(
        (1 + 1 / 2 + 1 / 3) / 3)
    assert list(ckpt['param_schedulers'][0]['milestones']) == [8, 11]


def test_safe_load_refuses_foreign_globals(tmp_path, monkeypatch):
    from mmdat.utils import UntrustedCheckpointError, safe_load
    monkeypatch.delenv('MMDAT_TRUSTED_CHECKPOINTS', raising=False)
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.ones(1)}, 'cfg': _Payload()}, path)
    _RAN.clear()
    with pytest.raises(UntrustedCheckpointError) as info:
        safe_load(str(path))
    message = str(info.value)
    assert _RAN == []  # nothing of the pickle ran
    assert 'evil.pth' in message
    assert f'{__name__}._record' in message  # the global, by name
    assert 'trusted=True' in message and 'MMDAT_TRUSTED_CHECKPOINTS' in message
    assert info.value.globals == [f'{__name__}._record']

    with pytest.warns(UserWarning, match='weights_only=False'):
        ckpt = safe_load(str(path), trusted=True)
    assert ckpt['cfg'] == 'payload ran'

    # trusting the directory through the environment
    _RAN.clear()
    monkeypatch.setenv('MMDAT_TRUSTED_CHECKPOINTS', str(tmp_path))
    with pytest.warns(UserWarning, match='weights_only=False'):
        safe_load(str(path))
    assert _RAN == ['payload ran']
    monkeypatch.setenv('MMDAT_TRUSTED_CHECKPOINTS', str(tmp_path / 'other'))
    with pytest.raises(UntrustedCheckpointError):
        safe_load(str(path))


def test_safe_load_restricts_getattr(tmp_path):
    """``getattr`` is allowed only for HistoryBuffer's statistics methods."""
    from mmengine.logging.history_buffer import HistoryBuffer

    from mmdat.utils import UntrustedCheckpointError, safe_load

    class _Getattr:
        def __reduce__(self):
            return (getattr, (HistoryBuffer, '__init__'))

    path = tmp_path / 'getattr.pth'
    torch.save({'x': _Getattr()}, path)
    with pytest.raises(UntrustedCheckpointError, match='refusing getattr'):
        safe_load(str(path))


@pytest.fixture()
def http_dir(tmp_path):
    """A local HTTP server serving ``tmp_path / 'srv'``."""
    import functools
    import http.server
    import threading
    root = tmp_path / 'srv'
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()


def test_safe_load_http_url_uses_the_hub_cache(http_dir, tmp_path,
                                               monkeypatch):
    from mmdat.utils import UntrustedCheckpointError, safe_load
    root, url = http_dir
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    torch.save({'state_dict': {'w': torch.arange(3.)}}, root / 'good.pth')
    ckpt = safe_load(f'{url}/good.pth')
    assert torch.equal(ckpt['state_dict']['w'], torch.arange(3.))
    cached = tmp_path / 'torch_home' / 'hub' / 'checkpoints' / 'good.pth'
    assert cached.is_file()
    torch.save({'cfg': _Payload()}, root / 'evil.pth')
    _RAN.clear()
    with pytest.raises(UntrustedCheckpointError, match='evil.pth'):
        safe_load(f'{url}/evil.pth')
    assert _RAN == []
    assert torch.load is not None and torch.load.__name__ == 'load'


def test_pretrained_init_from_url(http_dir, tmp_path, monkeypatch, manifests,
                                  fill):
    root, url = http_dir
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    _, ckpt = _official_dense(manifests, fill)
    torch.save(ckpt, root / 'det.pth')
    model = DAT(arch=manifests['backbone/mini']['official_kwargs'],
                init_cfg=dict(type='Pretrained', checkpoint=f'{url}/det.pth'))
    model.init_weights()
    assert torch.equal(model.state_dict()['patch_proj.0.weight'],
                       ckpt['state_dict']['backbone.patch_proj.0.weight'])


def test_converter_needs_trust_for_foreign_globals(manifests, fill,
                                                   tmp_path, capsys):
    sd = fill.fill_official(
        manifests['classification/mini']['state_dict_shapes'])
    src = tmp_path / 'cls_with_config.pth'
    torch.save({'model': sd, 'config': _Payload()}, src)
    dst = tmp_path / 'out.pth'
    converter = load_script(CONVERTER)
    _RAN.clear()
    assert converter.main([str(src), str(dst)]) == 1
    err = capsys.readouterr().err
    assert '_record' in err and '--trust' in err
    assert not dst.exists() and _RAN == []
    assert converter.main(['--trust', str(src), str(dst)]) == 0
    assert _RAN == ['payload ran']
    assert torch.load(dst, weights_only=True)['meta']['source_kind'] == \
        'official-classification'


# --------------------------------------------------------------------------
# dense fine-tuning from a classifier; 224 -> 384 wherever weights load
# --------------------------------------------------------------------------
def test_dense_init_from_converted_classifier_keeps_fresh_norms(
        manifests, fill, tmp_path):
    """As the official dense code: ``cls_norm`` is not copied into the
    output norms, also when the file went through the converter (where it is
    the classifier's ``backbone.norms.3``)."""
    kw = manifests['classification/mini']['official_kwargs']
    sd = fill.fill_official(
        manifests['classification/mini']['state_dict_shapes'])
    src, dst = tmp_path / 'cls.pth', tmp_path / 'cls_mmdat.pth'
    torch.save({'model': sd}, src)
    assert load_script(CONVERTER).main([str(src), str(dst)]) == 0
    assert 'backbone.norms.3.norm.weight' in torch.load(
        dst, weights_only=True)['state_dict']  # the classifier needs it
    model = DAT(arch=kw, init_cfg=dict(type='Pretrained', checkpoint=str(dst),
                                       prefix='backbone.'))
    model.init_weights()
    own = model.state_dict()
    for i in range(4):
        assert torch.equal(own[f'norms.{i}.norm.weight'],
                           torch.ones_like(own[f'norms.{i}.norm.weight']))
        assert torch.equal(own[f'norms.{i}.norm.bias'],
                           torch.zeros_like(own[f'norms.{i}.norm.bias']))
    assert torch.equal(own['stages.3.attns.0.rpe_table'],
                       sd['stages.3.attns.0.rpe_table'])


def test_rpe_tables_resized_by_load_checkpoint(tmp_path):
    """224 weights into an img_size=384 model through mmengine's
    ``load_checkpoint`` (what ``load_from=`` does), with a log line."""
    from mmengine.logging import MMLogger
    small = DAT(arch=TINY_ARCH, img_size=224)
    wrapper = torch.nn.Module()
    wrapper.backbone = small
    path = tmp_path / 'w224.pth'
    torch.save({'state_dict': wrapper.state_dict()}, path)

    big = torch.nn.Module()
    big.backbone = DAT(arch=TINY_ARCH, img_size=384)
    logger = MMLogger.get_instance('mmdat_rpe_test', log_file=str(
        tmp_path / 'log.txt'))
    logger.propagate = False
    assert MMLogger.get_current_instance() is logger
    load_checkpoint(big, str(path), map_location='cpu', strict=True)
    key = 'stages.0.attns.1.rpe_table'
    got = big.backbone.state_dict()[key]
    assert got.shape == (1, 191, 191)
    src = small.state_dict()[key]
    assert torch.equal(got[:, 0, 0], src[:, 0, 0])  # corners kept
    assert torch.equal(got[:, -1, -1], src[:, -1, -1])
    with open(tmp_path / 'log.txt') as f:
        log = f.read()
    assert f'resized backbone.{key} from (1, 111, 111) to (1, 191, 191)' in log

    # plain load_state_dict too
    direct = DAT(arch=TINY_ARCH, img_size=384)
    direct.load_state_dict(small.state_dict(), strict=True)
    assert torch.equal(direct.state_dict()[key], got)


def test_from_scratch_init_is_pytorch_default():
    torch.manual_seed(0)
    model = DAT(arch=TINY_ARCH)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.init_weights()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_safe_load_other_schemes_go_through_the_policy(tmp_path):
    """A scheme registered with mmengine's CheckpointLoader (as s3://,
    open-mmlab:// ... are) is used, and its torch.load is the safe one."""
    from mmengine.runner.checkpoint import CheckpointLoader

    from mmdat.utils import UntrustedCheckpointError, safe_load

    def load_from_test_scheme(filename, map_location=None):
        path = tmp_path / filename[len('mmdattest://'):]
        with open(path, 'rb') as f:
            return torch.load(f, map_location=map_location)

    CheckpointLoader.register_scheme('mmdattest://', load_from_test_scheme,
                                     force=True)
    torch.save({'w': torch.ones(2)}, tmp_path / 'good.pth')
    torch.save({'cfg': _Payload()}, tmp_path / 'evil.pth')
    assert torch.equal(safe_load('mmdattest://good.pth')['w'], torch.ones(2))
    _RAN.clear()
    with pytest.raises(UntrustedCheckpointError, match='_record'):
        safe_load('mmdattest://evil.pth')
    assert _RAN == []
    with pytest.warns(UserWarning, match='weights_only=False'):
        assert safe_load('mmdattest://evil.pth',
                         trusted=True)['cfg'] == 'payload ran'
