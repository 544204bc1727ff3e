"""Swin-style (shifted) window attention: DAT v1 block letters ``L`` and ``S``.

Keys as in the official DAT v1 code: ``proj_qkv``, ``proj_out``,
``relative_position_bias_table`` ((2w-1)^2, h) and the buffer
``relative_position_index``. Maps whose size is not a multiple of the window
are zero-padded on the bottom/right and cropped back, as mmdet's Swin does.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class WindowAttention(nn.Module):
    """Multi-head self-attention in non-overlapping ``w x w`` windows.

    Args:
        dim: channels. num_heads: heads. window_size: ``w``.
        shift: cyclic shift of the windows (``w // 2`` for letter ``S``,
            0 for ``L``).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7,
                 shift: int = 0):
        super().__init__()
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
                             rel[..., 0] * (2 * w - 1) + rel[..., 1])

    def _shift_mask(self, Hp: int, Wp: int, device) -> torch.Tensor:
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
            mask, float('-inf'))

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
