"""CPU inference fast paths that must not change results: oneDNN
convolutions with the residual addition fused, in-place GELU, and the
channels-last layout kept through the deformable attention."""
import pytest
import torch

from mmdat.models.attentions.common import conv_add, cpu_inference_fusable
from mmdat.models.attentions.deformable import (DeformableAttention,
                                                _group_batch)
from mmdat.models.backbones.dat import ConvFFN

CL = torch.channels_last


@pytest.mark.parametrize('layout', ['nchw', 'cl', 'mixed'])
def test_conv_add_equals_plain(layout):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, 1, 1, groups=8)
    x, res = torch.randn(2, 8, 9, 7), torch.randn(2, 8, 9, 7)
    if layout != 'nchw':
        x = x.contiguous(memory_format=CL)
    if layout == 'cl':
        res = res.contiguous(memory_format=CL)
    want = res + conv(x)
    with torch.no_grad():
        assert cpu_inference_fusable(x)
        got = conv_add(conv, x, res)
    assert torch.allclose(got, want, rtol=0, atol=1e-6)


def test_fusion_only_without_autograd_and_autocast():
    x = torch.zeros(1, 2, 3, 3)
    assert not cpu_inference_fusable(x)  # grad mode on
    with torch.no_grad():
        assert not cpu_inference_fusable(x.double())
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert not cpu_inference_fusable(x)


def test_conv_ffn_inference_equals_training_path():
    torch.manual_seed(0)
    ffn = ConvFFN(8).eval()
    x = torch.randn(2, 8, 11, 6).contiguous(memory_format=CL)
    want = ffn(x)  # autograd on: the plain ops
    with torch.no_grad():
        got = ffn(x)
    assert torch.allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize('B', [1, 3])
def test_group_batch_keeps_channels_last(B):
    t = torch.randn(B, 12, 5, 7)
    want = t.reshape(B * 3, 4, 5, 7)
    got = _group_batch(t.contiguous(memory_format=CL), 3)
    assert torch.equal(got, want)
    # standard channels-last strides, which convolutions take as they are
    assert got.stride() == want.contiguous(memory_format=CL).stride()
    assert torch.equal(_group_batch(t, 3), want)


@pytest.mark.parametrize('B', [1, 2])
def test_deformable_output_channels_last_and_equal(B):
    torch.manual_seed(0)
    attn = DeformableAttention(32, 4, 2, 2, 3, 8).eval()
    x = torch.randn(B, 32, 10, 12)
    with torch.no_grad():
        want = attn(x)
        got = attn(x.contiguous(memory_format=CL))
    assert got.is_contiguous(memory_format=CL)
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
