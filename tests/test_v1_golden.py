"""DAT v1 blocks (``L``, ``S``, tanh-offset ``D``) against the official code.

``data/golden_v1_mini.pt`` holds logits of the official v1 classifier
(LeapLabTHU/DAT ``models/dat.py``) for a small v1-style arch, with weights
``fill.fill_official(state_dict_shapes, seed=1)``; the official file keys
include the constant buffers ``relative_position_index`` and (classification
code) ``attn_mask``. Checked here:

* the official kwargs are accepted as they are (``-1`` in ``groups`` and
  ``strides`` for window stages);
* a made-up official file with those keys converts, loads with
  ``strict=True`` (the raw official trunk too) and gives the golden logits;
* at map sizes that are not multiples of the window, ``S`` equals the
  official detection code (pad bottom/right, mask per padded input, crop),
  written out below independently, window by window.
"""
import math

import pytest
import torch

from conftest import DATA, ROOT, load_script, rel_err
from mmdat.models import DAT
from mmdat.models.attentions import WindowAttention

TOL = 1e-4
CONVERTER = ROOT / 'tools/model_converters/dat2mmdat.py'
BUFFERS = ('relative_position_index', 'attn_mask')


@pytest.fixture(scope='module')
def golden_v1():
    return torch.load(DATA / 'golden_v1_mini.pt', weights_only=True)


def _official_index(w: int) -> torch.Tensor:
    """Swin's relative position index, one pair of tokens at a time."""
    idx = torch.empty(w * w, w * w, dtype=torch.long)
    for i in range(w * w):
        for j in range(w * w):
            dy = i // w - j // w + w - 1
            dx = i % w - j % w + w - 1
            idx[i, j] = dy * (2 * w - 1) + dx
    return idx


def official_file(golden_v1, fill) -> dict:
    """A made-up official classification checkpoint with the official keys:
    filled weights, the constant index buffers and an ``attn_mask`` of
    garbage (mmdat must recompute the mask, never read it)."""
    shapes = golden_v1['state_dict_shapes']
    weights = {k: v for k, v in shapes.items() if not k.endswith(BUFFERS)}
    sd = fill.fill_official(weights, seed=1)
    for key, shape in shapes.items():
        if key.endswith('relative_position_index'):
            sd[key] = _official_index(math.isqrt(shape[0]))
        elif key.endswith('attn_mask'):
            sd[key] = torch.randn(shape)
    assert set(sd) == set(shapes)
    return {'model': sd, 'epoch': 300}


def build_classifier(kwargs):
    from mmpretrain.registry import MODELS
    from mmpretrain.utils import register_all_modules

    import mmdat  # noqa: F401
    register_all_modules(init_default_scope=True)
    return MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='DAT', arch=dict(kwargs), out_indices=(3, )),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=1000,
                  in_channels=kwargs['dims'][-1]))).eval()


def test_official_v1_kwargs_accepted(golden_v1):
    kw = golden_v1['official_kwargs']
    assert kw['groups'][0] == -1 and kw['strides'][0] == -1
    model = DAT(arch=dict(kw), out_indices=(3, ))
    attn = model.stages[0].attns[1]
    assert isinstance(attn, WindowAttention)
    assert attn.shift == 4  # ceil(7 / 2), not Swin's 3


def test_v1_classifier_through_converter_matches_official(
        golden_v1, fill, tmp_path):
    from mmengine.runner import load_checkpoint
    src, dst = tmp_path / 'v1_official.pth', tmp_path / 'v1.pth'
    torch.save(official_file(golden_v1, fill), src)
    assert load_script(CONVERTER).main([str(src), str(dst)]) == 0
    converted = torch.load(dst, weights_only=True)['state_dict']
    assert not [k for k in converted if k.endswith(BUFFERS)]
    model = build_classifier(golden_v1['official_kwargs'])
    load_checkpoint(model, str(dst), map_location='cpu', strict=True)
    for case in golden_v1['cases']:
        x = fill.make_input(case['input_shape'], case['input_seed'])
        with torch.no_grad():
            logits = model(x, mode='tensor')
        assert logits.shape == case['logits'].shape
        assert rel_err(logits, case['logits']) <= TOL


def _trunk(sd):
    """The official classifier's trunk as the backbone's keys (``cls_norm``
    is the classifier backbone's ``norms.3``)."""
    out = {k: v for k, v in sd.items() if not k.startswith('cls_')}
    out.update({'norms.3.' + k[len('cls_norm.'):]: v for k, v in sd.items()
                if k.startswith('cls_norm.')})
    return out


def test_raw_official_trunk_loads_strictly(golden_v1, fill):
    """The official keys as they are (buffers included) load strictly: the
    constant buffers are checked and dropped, not reported unexpected."""
    sd = official_file(golden_v1, fill)['model']
    trunk = _trunk(sd)
    model = DAT(arch=dict(golden_v1['official_kwargs']), out_indices=(3, ))
    model.load_state_dict(trunk, strict=True)
    assert 'stages.0.attns.0.relative_position_index' not in \
        model.state_dict()


def test_wrong_relative_position_index_is_refused(golden_v1, fill):
    sd = official_file(golden_v1, fill)['model']
    trunk = _trunk(sd)
    trunk['stages.0.attns.0.relative_position_index'] = torch.zeros(
        49, 49, dtype=torch.long)
    model = DAT(arch=dict(golden_v1['official_kwargs']), out_indices=(3, ))
    with pytest.raises(ValueError, match='relative_position_index'):
        model.load_state_dict(trunk, strict=True)


# --------------------------------------------------------------------------
# S at sizes that are not multiples of the window: the official detection
# code, one window at a time, in float64.
# --------------------------------------------------------------------------
def official_detection_window(x, m: WindowAttention, shift: int):
    B, C, H, W = x.shape
    w, heads = m.window_size, m.num_heads
    c = C // heads
    Hp, Wp = math.ceil(H / w) * w, math.ceil(W / w) * w
    xp = torch.zeros(B, C, Hp, Wp, dtype=x.dtype)
    xp[:, :, :H, :W] = x
    labels = torch.zeros(Hp, Wp)
    if shift:
        cnt = 0
        for hs in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
            for ws in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
                labels[hs, ws] = cnt
                cnt += 1
        xp = torch.roll(xp, (-shift, -shift), dims=(2, 3))
    index = _official_index(w)
    table = m.relative_position_bias_table.detach().double()
    out = torch.zeros_like(xp)
    for r in range(Hp // w):
        for s in range(Wp // w):
            rows, cols = slice(r * w, r * w + w), slice(s * w, s * w + w)
            tok = xp[:, :, rows, cols].flatten(2).transpose(1, 2)  # B, N, C
            qkv = tok @ m.proj_qkv.weight.double().T + m.proj_qkv.bias.double()
            q, k, v = qkv.chunk(3, dim=2)
            lab = labels[rows, cols].flatten()
            mask = (lab[:, None] != lab[None, :]).double() * -100.0
            heads_out = []
            for h in range(heads):
                hs = slice(h * c, h * c + c)
                logits = (q[..., hs] * c ** -0.5) @ k[..., hs].transpose(1, 2)
                logits = logits + table[index, h] + mask
                heads_out.append(logits.softmax(-1) @ v[..., hs])
            y = torch.cat(heads_out, -1) @ m.proj_out.weight.double().T + \
                m.proj_out.bias.double()
            out[:, :, rows, cols] = y.transpose(1, 2).reshape(B, C, w, w)
    if shift:
        out = torch.roll(out, (shift, shift), dims=(2, 3))
    return out[:, :, :H, :W]


@pytest.mark.parametrize('size', [(14, 14), (17, 23), (5, 9), (7, 12)])
@pytest.mark.parametrize('letter', ['L', 'S'])
def test_window_blocks_follow_official_detection_code(size, letter):
    torch.manual_seed(0)
    w = 7
    shift = math.ceil(w / 2) if letter == 'S' else 0
    m = WindowAttention(16, 2, w, shift=shift).double()
    with torch.no_grad():
        m.relative_position_bias_table.normal_()
    x = torch.randn(2, 16, *size, dtype=torch.float64)
    with torch.no_grad():
        got = m(x)
    ref = official_detection_window(x, m, shift)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-10


def test_official_v1_dense_settings_accepted():
    """The keyword set of the official v1 detection / segmentation configs
    (DAT-Detection configs/_base_/models/mask_rcnn_dat_fpn.py) with the
    block pattern of DAT-T (``L S`` in stages 1-2): the extra options of
    block kinds mmdat does not build are accepted; the ones that would change
    the built blocks must be off; ``-1`` is refused where a ``D`` uses it."""
    kw = dict(
        img_size=224, patch_size=4, num_classes=1000, expansion=4,
        dim_stem=96, dims=[96, 192, 384, 768], depths=[2, 2, 6, 2],
        heads=[3, 6, 12, 24], heads_q=[6, 12, 24, 48],
        window_sizes=[7, 7, 7, 7], drop_rate=0.0, attn_drop_rate=0.0,
        drop_path_rate=0.0, strides=[-1, -1, 1, 1],
        offset_range_factor=[1, 2, 3, 4], local_orf=[-1, -1, -1, -1],
        local_kv_sizes=[-1, -1, -1, -1], offset_pes=[False] * 4,
        stage_spec=[['L', 'S'], ['L', 'S'], ['L', 'D', 'L', 'D', 'L', 'D'],
                    ['L', 'D']],
        groups=[-1, -1, 3, 6], use_pes=[False] * 4, dwc_pes=[False] * 4,
        sr_ratios=[8, 4, 2, 1], lower_lr_kvs={}, fixed_pes=[False] * 4,
        no_offs=[False] * 4, ns_per_pts=[4, 4, 4, 4],
        use_dwc_mlps=[False] * 4, use_conv_patches=False,
        ksizes=[9, 7, 5, 3], ksize_qnas=[3, 3, 3, 3], nqs=[2, 2, 2, 2],
        qna_activation='exp', deform_groups=[0, 0, 0, 0],
        nat_ksizes=[3, 3, 3, 3], layer_scale_values=[-1, -1, -1, -1],
        use_lpus=[False] * 4, use_cmt_mlps=[False] * 4,
        out_indices=(0, 1, 2, 3), use_checkpoint=True)
    model = DAT(arch=kw)
    assert isinstance(model.stages[1].attns[1], WindowAttention)
    assert model.stages[1].attns[1].shift == 4
    with pytest.raises(ValueError, match='use_cmt_mlps'):
        DAT(arch=dict(kw, use_cmt_mlps=[True] * 4))
    with pytest.raises(ValueError, match=r"arch\['strides'\]\[2\].*-1"):
        DAT(arch=dict(kw, strides=[-1, -1, -1, 1]))  # a D stage needs one
