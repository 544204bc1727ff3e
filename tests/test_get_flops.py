"""tools/analysis_tools/get_flops.py: published FLOPs/params of DAT-T/S/B++,
hand-computed small cases, and agreement with mmengine's FlopAnalyzer.

Convention (fvcore / mmengine.analysis): 1 multiply-add = 1 FLOP; element-wise
ops not counted; LayerNorm 5 per element; bilinear sampling 4 per sampled
element and channel.
"""
import json
import warnings

import pytest
import torch

from conftest import ROOT, TINY_ARCH, load_script
from mmdat.models import DAT
from mmdat.models.attentions import (DeformableAttention,
                                     NeighborhoodAttention, WindowAttention)

gf = load_script(ROOT / 'tools/analysis_tools/get_flops.py')


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize('arch,gflops,params', [
    ('tiny', 4.3, 23_962_876),
    ('small', 9.4, 53_127_366),
    ('base', 16.6, 93_690_640),
])
def test_published_flops_and_params(arch, gflops, params):
    res = gf.get_flops(arch=arch, shape=(224, 224))
    assert res['params'] == params
    assert abs(res['gflops'] - gflops) / gflops < 0.03, res['gflops']
    # the breakdowns add up, every stage costs something, and attention
    # (not only the convs) is in the count
    assert sum(res['by_stage'].values()) == res['flops']
    assert sum(res['by_kind'].values()) == res['flops']
    for i in range(1, 5):
        assert res['by_stage'][f'stage{i}'] > 0
    for kind in ('conv', 'linear', 'norm', 'attn_qk', 'attn_v',
                 'grid_sample', 'pos_bias'):
        assert res['by_kind'][kind] > 0, kind
    # the third stage (18 blocks) dominates, as in the paper
    assert res['by_stage']['stage3'] == max(res['by_stage'].values())


def _count_module(module, shape):
    """count_flops of one NCHW module on a zero input of ``shape``."""
    return gf.count_flops(module, shape[2:], batch=shape[0],
                          in_channels=shape[1])


def test_neighborhood_attention_by_hand():
    # 1x16x8x8, 2 heads (head_dim 8), kernel 3: 64 tokens
    na = NeighborhoodAttention(16, 2, kernel_size=3)
    res = _count_module(na, (1, 16, 8, 8))
    qkv = 64 * 16 * 48            # Linear 16 -> 48 per token
    proj = 64 * 16 * 16           # Linear 16 -> 16 per token
    qk = 2 * 64 * 9 * 8           # heads * queries * k*k keys * head_dim
    av = 2 * 64 * 9 * 8
    assert res['by_kind'] == {'linear': qkv + proj, 'attn_qk': qk,
                              'attn_v': av}
    assert res['flops'] == 83_968
    assert res['params'] == 16 * 48 + 48 + 16 * 16 + 16 + 2 * 5 * 5


def test_neighborhood_attention_padded_map_by_hand():
    # 5x5 map, kernel 7: padded to 7x7 for qkv and attention, proj on 5x5
    na = NeighborhoodAttention(16, 2, kernel_size=7)
    res = _count_module(na, (2, 16, 5, 5))
    assert res['by_kind'] == {
        'linear': 2 * 49 * 16 * 48 + 2 * 25 * 16 * 16,
        'attn_qk': 2 * 2 * 49 * 49 * 8,
        'attn_v': 2 * 2 * 49 * 49 * 8}


@pytest.mark.parametrize('impl', ['auto', 'reference'])
def test_deformable_attention_by_hand(impl):
    # 1x16x8x8, 2 heads (head_dim 8), 1 group, stride 2, offset kernel 3
    # (padding 1): keys on a 4x4 grid, Ns = 16, M = 64 queries
    da = DeformableAttention(16, 2, 1, stride=2, offset_kernel=3,
                             rpe_size=8, impl=impl)
    res = _count_module(da, (1, 16, 8, 8))
    offset_dw = 16 * 4 * 4 * 9    # depthwise 3x3, stride 2 -> 16x4x4
    offset_ln = 5 * 16 * 4 * 4
    offset_pw = 2 * 4 * 4 * 16    # 1x1, 16 -> 2
    proj_q = proj_out = 64 * 16 * 16
    proj_k = proj_v = 16 * 16 * 16
    sample = 4 * 16 * 16          # 4 corners x channels x sampled keys
    qk = av = 2 * 64 * 16 * 8     # heads x M x Ns x head_dim
    bias = 4 * 2 * 64 * 16        # bilinear table lookup per head, M, Ns
    assert res['by_kind'] == {
        'conv': offset_dw + offset_pw + proj_q + proj_k + proj_v + proj_out,
        'norm': offset_ln, 'grid_sample': sample, 'attn_qk': qk,
        'attn_v': av, 'pos_bias': bias}
    assert res['flops'] == 87_040


def test_deformable_key_grid_small_map():
    # unpadded offset conv (kernel == stride == 8) on a 5x3 map: padded to
    # the kernel first, so one key is sampled (as in the module)
    da = DeformableAttention(16, 2, 1, stride=8, offset_kernel=8,
                             rpe_size=8)
    assert gf.deformable_key_grid(da, 5, 3) == (1, 1)
    assert gf.deformable_key_grid(da, 17, 16) == (2, 2)
    _, pos = da.forward_with_positions(torch.zeros(1, 16, 5, 3))
    assert tuple(pos.shape[1:3]) == (1, 1)


def test_window_attention_by_hand():
    # 1x16x9x9, window 7: padded to 14x14 = 4 windows of 49 tokens
    wa = WindowAttention(16, 2, window_size=7, shift=3)
    res = _count_module(wa, (1, 16, 9, 9))
    n = 4 * 2 * 49 * 49 * 8
    assert res['by_kind'] == {'linear': 196 * 16 * 64, 'attn_qk': n,
                              'attn_v': n}


def test_same_count_for_both_impls():
    counts = [gf.count_flops(DAT(arch=TINY_ARCH, impl=impl), (64, 96))
              for impl in ('auto', 'reference')]
    assert counts[0]['flops'] == counts[1]['flops']
    assert counts[0]['by_stage'] == counts[1]['by_stage']


def test_agrees_with_mmengine_flop_analyzer():
    """Independent check: mmengine's fvcore port traces the reference path
    (einsum attention, grid_sample for sampling and bias) with its default
    handles; the analytic count must agree."""
    from mmengine.analysis import FlopAnalyzer
    model = DAT(arch=TINY_ARCH, impl='reference').eval()
    ours = gf.count_flops(model, (64, 64))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        fa = FlopAnalyzer(model, (torch.zeros(1, 3, 64, 64), ))
        fa.unsupported_ops_warnings(False)
        fa.uncalled_modules_warnings(False)
        fa.tracer_warnings('none')
        total = fa.total()
        by_op = fa.by_operator()
    assert abs(total - ours['flops']) / ours['flops'] < 1e-4
    assert by_op['conv'] == ours['by_kind']['conv']
    assert by_op['linear'] == ours['by_kind']['linear']
    assert by_op['layer_norm'] == ours['by_kind']['norm']
    assert by_op['grid_sampler'] == (ours['by_kind']['grid_sample'] +
                                     ours['by_kind']['pos_bias'])


def test_cli_json(tmp_path, capsys):
    out = tmp_path / 'sub' / 'flops.json'
    rc = gf.main([str(ROOT / 'configs/mmpretrain/dat_pp_demo.py'),
                  '--shape', '64', '--json', str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    for word in ('stage1', 'stage4', 'total', 'params'):
        assert word in text
    res = json.loads(out.read_text())
    assert res['input_shape'] == [1, 3, 64, 64]
    assert res['counted'] == 'classifier'
    assert sum(res['by_stage'].values()) == res['flops'] > 0
    assert res['params'] > 0


def test_detection_config_counts_backbone_and_neck():
    res = gf.get_flops(
        config=str(ROOT / 'configs/mmdet/mask_rcnn_dat_pp_demo.py'),
        shape=(96, 128))
    assert res['counted'] == 'backbone+neck'
    assert res['by_stage']['head'] > 0  # the FPN
    assert all(res['by_stage'][f'stage{i}'] > 0 for i in range(1, 5))
