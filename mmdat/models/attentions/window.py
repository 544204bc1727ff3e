"""Swin-style (shifted) window attention: DAT v1 block letters ``L`` and ``S``.

Keys as in the official DAT v1 code: ``proj_qkv``, ``proj_out``,
``relative_position_bias_table`` ((2w-1)^2, h). The official constant buffers
(``relative_position_index``, and ``attn_mask`` of the classification code)
are recomputed here: our ``relative_position_index`` is not saved, and both
are dropped from a state dict on loading, so raw official files (which hold
them) and converted ones (which do not) both load with ``strict=True``.

Maps whose size is not a multiple of the window are zero-padded on the
bottom/right and cropped back, and the shift mask is built per input after
padding, as the official detection code does (at 224x224 this equals the
classification code's fixed mask).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# The official S block fills its cross-region mask with -100, not -inf: a
# finite logit keeps a little weight after softmax, which the weights saw.
SHIFT_MASK_VALUE = -100.0
# Constant buffers of the official code that mmdat recomputes.
_OFFICIAL_CONSTANTS = ('relative_position_index', 'attn_mask')


def official_shift(window_size: int) -> int:
    """Shift of the official ``S`` block: ``ceil(w / 2)`` (4 for a 7-window,
    where Swin uses ``w // 2`` = 3)."""
    return math.ceil(window_size / 2)


class WindowAttention(nn.Module):
    """Multi-head self-attention in non-overlapping ``w x w`` windows.

    Args:
        dim: channels. num_heads: heads. window_size: ``w``.
        shift: cyclic shift of the windows (:func:`official_shift` for
            letter ``S``, 0 for ``L``); must be in ``[0, w)``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7,
                 shift: int = 0):
        super().__init__()
        if not 0 <= shift < window_size:
            raise ValueError(f'shift must be in [0, window_size={window_size})'
                             f', got {shift}')
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.window_size = window_size
        self.shift = shift
        self.proj_qkv = nn.Linear(dim, 3 * dim)
        self.proj_out = nn.Linear(dim, dim)
        w = window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * w - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.01)
        coords = torch.stack(torch.meshgrid(
            torch.arange(w), torch.arange(w), indexing='ij')).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + w - 1
        self.register_buffer('relative_position_index',
                             rel[..., 0] * (2 * w - 1) + rel[..., 1],
                             persistent=False)
        self.register_load_state_dict_pre_hook(_drop_official_constants)

    def _shift_mask(self, Hp: int, Wp: int, device) -> torch.Tensor:
        """(windows, w*w, w*w) additive mask of the shifted windows:
        ``SHIFT_MASK_VALUE`` between tokens of different regions."""
        w, s = self.window_size, self.shift
        img = torch.zeros(Hp, Wp, device=device)
        cnt = 0
        for hs in (slice(0, -w), slice(-w, -s), slice(-s, None)):
            for ws in (slice(0, -w), slice(-w, -s), slice(-s, None)):
                img[hs, ws] = cnt
                cnt += 1
        win = img.reshape(Hp // w, w, Wp // w, w).permute(0, 2, 1, 3)
        win = win.reshape(-1, w * w)
        mask = win[:, None, :] != win[:, :, None]
        return torch.zeros(mask.shape, device=device).masked_fill(
            mask, SHIFT_MASK_VALUE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        w, s = self.window_size, self.shift
        t = x.permute(0, 2, 3, 1)
        pad_b, pad_r = (-H) % w, (-W) % w
        t = F.pad(t, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = t.shape[1:3]
        if s:
            t = torch.roll(t, (-s, -s), dims=(1, 2))
        win = t.reshape(B, Hp // w, w, Wp // w, w, C).permute(0, 1, 3, 2, 4, 5)
        win = win.reshape(-1, w * w, C)
        qkv = self.proj_qkv(win).reshape(-1, w * w, 3, self.num_heads,
                                         self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.relative_position_bias_table[
            self.relative_position_index.reshape(-1)].reshape(
                w * w, w * w, -1).permute(2, 0, 1).to(q.dtype)
        mask = bias[None]
        if s:
            nw = (Hp // w) * (Wp // w)
            shift_mask = self._shift_mask(Hp, Wp, x.device).to(q.dtype)
            mask = (mask + shift_mask[:, None]).repeat(B, 1, 1, 1)
            mask = mask.reshape(B * nw, self.num_heads, w * w, w * w)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             scale=self.scale)
        out = out.transpose(1, 2).reshape(-1, w * w, C)
        out = self.proj_out(out)
        out = out.reshape(B, Hp // w, Wp // w, w, w, C).permute(0, 1, 3, 2, 4, 5)
        out = out.reshape(B, Hp, Wp, C)
        if s:
            out = torch.roll(out, (s, s), dims=(1, 2))
        return out[:, :H, :W].permute(0, 3, 1, 2)


def _drop_official_constants(module, state_dict, prefix, *args) -> None:
    """``load_state_dict`` pre-hook: remove the official constant buffers
    (recomputed here), after checking that an official
    ``relative_position_index`` is the one this window size gives."""
    index = state_dict.pop(prefix + 'relative_position_index', None)
    if index is not None and not (
            index.shape == module.relative_position_index.shape and
            torch.equal(index.to(module.relative_position_index),
                        module.relative_position_index)):
        raise ValueError(
            f'{prefix}relative_position_index of the checkpoint '
            f'{tuple(index.shape)} is not the one of a '
            f'{module.window_size}x{module.window_size} window: another '
            'window size?')
    state_dict.pop(prefix + 'attn_mask', None)
