"""Neighborhood attention in Triton: a fused window walk, forward and
backward, with the relative position bias inside the kernels.

Forward: per tile of queries, the ``k x k`` window of each query (start
``clamp(i - k//2, 0, n - k)`` per axis: windows slide inward at the borders)
is walked key by key with an online softmax; only the output and the
log-sum-exp are written. Backward: one kernel per query tile gives ``dq``
and adds the ``rpb`` gradient atomically; one kernel per key tile walks the
queries whose windows hold the key (a contiguous range per axis, found from
the clamp) and gives ``dk`` and ``dv`` without atomics.

Sizes and the kernel size are runtime arguments: one compilation per
(dtype, head-dim block, bias or not). CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``.
"""
from typing import Optional

import torch

from ..deformable_attention.triton import (LAUNCHES, _DTYPES, _IMPORT_ERROR,
                                           _INTERPRETED, _MAX_HEAD_DIM,
                                           _block_d,
                                           triton)
from ..deformable_attention import triton as _da_triton

if triton is not None:
    import triton.language as tl


def can_run_triton(ctx) -> Optional[str]:
    """``None`` when these kernels take ``ctx``, else why not."""
    if triton is None:
        return _IMPORT_ERROR or 'triton not importable'
    if ctx.device.type != 'cuda' and not (ctx.device.type == 'cpu'
                                          and _INTERPRETED):
        return 'needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)'
    if ctx.dtype not in _DTYPES:
        return f'dtype {ctx.dtype} unsupported (float32, bfloat16, float16)'
    if ctx.head_dim and not 1 <= ctx.head_dim <= _MAX_HEAD_DIM:
        return f'head dim {ctx.head_dim} unsupported (1-{_MAX_HEAD_DIM})'
    return None


def _num_warps(block_d: int) -> int:
    # ptxas -v (sm_90): head dims up to 32 fit 4 warps without spills,
    # larger ones need 8
    return 4 if block_d <= 32 else 8


def _block_m(block_d: int) -> int:
    if _da_triton.BLOCK_OVERRIDE is not None:
        return _da_triton.BLOCK_OVERRIDE[0]
    return 64 if block_d <= 64 else 32


if triton is not None:
    # sizes and the strides that scale with them are not specialised on
    _SIZES = ['h', 'H', 'W', 'c', 'KS', 'NI', 'NJ', 'sqb', 'sqh', 'sqy',
              'skb', 'skh', 'sky', 'svb', 'svh', 'svy', 'srh', 'sry', 'sob',
              'soh', 'soy']

    @triton.jit(do_not_specialize=_SIZES)
    def _na_fwd(Q, K, V, RPB, OUT, LSE,
                sqb, sqh, sqy, sqx, sqd, skb, skh, sky, skx, skd,
                svb, svh, svy, svx, svd,
                srh, sry, sob, soh, soy, sox,
                h, H, W, c, KS, qk_scale,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr):
        LOG2E: tl.constexpr = 1.4426950408889634
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // h
        hh = bh - b * h
        M = H * W
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < M
        mask_d = offs_d < c
        md = mask_m[:, None] & mask_d[None, :]
        i = tl.minimum(offs_m // W, H - 1)
        j = offs_m - (offs_m // W) * W
        si = tl.minimum(tl.maximum(i - KS // 2, 0), H - KS)
        sj = tl.minimum(tl.maximum(j - KS // 2, 0), W - KS)
        q = tl.load(Q + b.to(tl.int64) * sqb + hh * sqh
                    + (i * sqy + j * sqx)[:, None].to(tl.int64)
                    + offs_d[None, :] * sqd, mask=md, other=0.0).to(tl.float32)
        k_base = K + b.to(tl.int64) * skb + hh * skh
        v_base = V + b.to(tl.int64) * svb + hh * svh
        r_base = RPB + hh * srh
        m_i = tl.full([BLOCK_M], float('-inf'), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for a in range(0, KS):
            ki = si + a
            for bb in range(0, KS):
                kj = sj + bb
                kv = (ki * sky + kj * skx)[:, None].to(tl.int64)
                k = tl.load(k_base + kv + offs_d[None, :] * skd, mask=md,
                            other=0.0).to(tl.float32)
                s = tl.sum(q * k, 1) * qk_scale
                if HAS_BIAS:
                    s += tl.load(r_base + (ki - i + KS - 1) * sry
                                 + (kj - j + KS - 1)).to(tl.float32) * LOG2E
                m_new = tl.maximum(m_i, s)
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new)
                l_i = l_i * alpha + p
                vv = (ki * svy + kj * svx)[:, None].to(tl.int64)
                v = tl.load(v_base + vv + offs_d[None, :] * svd, mask=md,
                            other=0.0).to(tl.float32)
                acc = acc * alpha[:, None] + p[:, None] * v
                m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(OUT + b.to(tl.int64) * sob + hh * soh
                 + (i * soy + j * sox)[:, None].to(tl.int64)
                 + offs_d[None, :], acc.to(OUT.dtype.element_ty), mask=md)
        tl.store(LSE + bh.to(tl.int64) * M + offs_m, m_i + tl.log2(l_i),
                 mask=mask_m)

    @triton.jit(do_not_specialize=_SIZES)
    def _na_bwd_dq(Q, K, V, RPB, DO, LSE, DELTA, DQ, DRPB,
                   sqb, sqh, sqy, sqx, sqd, skb, skh, sky, skx, skd,
                   svb, svh, svy, svx, svd,
                   srh, sry, sob, soh, soy, sox,
                   h, H, W, c, KS, qk_scale, scale,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_D: tl.constexpr):
        """dq of a query tile (``DO``/``DQ`` laid out like the output) and
        the rpb gradient (atomics into float32 ``DRPB``, rpb's strides)."""
        LOG2E: tl.constexpr = 1.4426950408889634
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // h
        hh = bh - b * h
        M = H * W
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < M
        mask_d = offs_d < c
        md = mask_m[:, None] & mask_d[None, :]
        i = tl.minimum(offs_m // W, H - 1)
        j = offs_m - (offs_m // W) * W
        si = tl.minimum(tl.maximum(i - KS // 2, 0), H - KS)
        sj = tl.minimum(tl.maximum(j - KS // 2, 0), W - KS)
        q = tl.load(Q + b.to(tl.int64) * sqb + hh * sqh
                    + (i * sqy + j * sqx)[:, None].to(tl.int64)
                    + offs_d[None, :] * sqd, mask=md, other=0.0).to(tl.float32)
        o_off = (b.to(tl.int64) * sob + hh * soh
                 + (i * soy + j * sox)[:, None].to(tl.int64) + offs_d[None, :])
        do = tl.load(DO + o_off, mask=md, other=0.0).to(tl.float32)
        lse = tl.load(LSE + bh.to(tl.int64) * M + offs_m, mask=mask_m,
                      other=0.0)
        delta = tl.load(DELTA + bh.to(tl.int64) * M + offs_m, mask=mask_m,
                        other=0.0)
        k_base = K + b.to(tl.int64) * skb + hh * skh
        v_base = V + b.to(tl.int64) * svb + hh * svh
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        inner = mask_m & (si == i - KS // 2) & (sj == j - KS // 2)
        for a in range(0, KS):
            ki = si + a
            for bb in range(0, KS):
                kj = sj + bb
                kv = (ki * sky + kj * skx)[:, None].to(tl.int64)
                k = tl.load(k_base + kv + offs_d[None, :] * skd, mask=md,
                            other=0.0).to(tl.float32)
                s = tl.sum(q * k, 1) * qk_scale
                r_off = hh * srh + (ki - i + KS - 1) * sry + (kj - j + KS - 1)
                if HAS_BIAS:
                    s += tl.load(RPB + r_off).to(tl.float32) * LOG2E
                p = tl.where(mask_m, tl.exp2(s - lse), 0.0)
                vv = (ki * svy + kj * svx)[:, None].to(tl.int64)
                v = tl.load(v_base + vv + offs_d[None, :] * svd, mask=md,
                            other=0.0).to(tl.float32)
                ds = p * (tl.sum(do * v, 1) - delta)
                dq += ds[:, None] * k
                if HAS_BIAS:
                    # away from the borders every query of the tile reads
                    # the same bias entry for window offset (a, bb): one
                    # atomic for all of them, one each for the others
                    r_mid = (hh * srh + (a + KS - 1 - KS // 2) * sry
                             + (bb + KS - 1 - KS // 2))
                    tl.atomic_add(DRPB + r_mid,
                                  tl.sum(tl.where(inner, ds, 0.0), 0),
                                  sem='relaxed')
                    tl.atomic_add(DRPB + r_off, ds, mask=mask_m & ~inner,
                                  sem='relaxed')
        tl.store(DQ + o_off, (dq * scale).to(DQ.dtype.element_ty), mask=md)

    @triton.jit(do_not_specialize=_SIZES)
    def _na_bwd_dkdv(Q, K, V, RPB, DO, LSE, DELTA, DK, DV,
                     sqb, sqh, sqy, sqx, sqd, skb, skh, sky, skx, skd,
                     svb, svh, svy, svx, svd, srh, sry, sob, soh, soy, sox,
                     h, H, W, c, KS, NI, NJ, qk_scale, scale,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_D: tl.constexpr):
        """dk and dv of a key tile (``DK``/``DV`` laid out like the output):
        the queries whose window holds key row ``ki`` are the rows
        ``i_lo..i_hi`` (at most ``NI``) from the window clamp; likewise
        columns."""
        LOG2E: tl.constexpr = 1.4426950408889634
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // h
        hh = bh - b * h
        M = H * W
        offs_n = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = offs_n < M
        mask_d = offs_d < c
        nd = mask_n[:, None] & mask_d[None, :]
        ki = tl.minimum(offs_n // W, H - 1)
        kj = offs_n - (offs_n // W) * W
        k = tl.load(K + b.to(tl.int64) * skb + hh * skh
                    + (ki * sky + kj * skx)[:, None].to(tl.int64)
                    + offs_d[None, :] * skd, mask=nd, other=0.0).to(tl.float32)
        v = tl.load(V + b.to(tl.int64) * svb + hh * svh
                    + (ki * svy + kj * svx)[:, None].to(tl.int64)
                    + offs_d[None, :] * svd, mask=nd, other=0.0).to(tl.float32)
        # query i sees key row ki iff s(i) <= ki <= s(i) + KS - 1 with
        # s(i) = clamp(i - KS//2, 0, H - KS), nondecreasing in i
        i_lo = tl.where(ki - KS + 1 <= 0, 0, ki - KS + 1 + KS // 2)
        i_hi = tl.where(ki >= H - KS, H - 1, ki + KS // 2)
        j_lo = tl.where(kj - KS + 1 <= 0, 0, kj - KS + 1 + KS // 2)
        j_hi = tl.where(kj >= W - KS, W - 1, kj + KS // 2)
        q_base = Q + b.to(tl.int64) * sqb + hh * sqh
        o_base = b.to(tl.int64) * sob + hh * soh
        dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for t in range(0, NI):
            i = i_lo + t
            ok_i = mask_n & (i <= i_hi)
            i = tl.minimum(i, H - 1)
            for u in range(0, NJ):
                j = j_lo + u
                ok = ok_i & (j <= j_hi)
                j = tl.minimum(j, W - 1)
                okd = ok[:, None] & mask_d[None, :]
                q = tl.load(q_base + (i * sqy + j * sqx)[:, None].to(tl.int64)
                            + offs_d[None, :] * sqd, mask=okd,
                            other=0.0).to(tl.float32)
                o_off = (o_base + (i * soy + j * sox)[:, None].to(tl.int64)
                         + offs_d[None, :])
                do = tl.load(DO + o_off, mask=okd, other=0.0).to(tl.float32)
                m = i * W + j
                lse = tl.load(LSE + bh.to(tl.int64) * M + m, mask=ok,
                              other=0.0)
                delta = tl.load(DELTA + bh.to(tl.int64) * M + m, mask=ok,
                                other=0.0)
                s = tl.sum(q * k, 1) * qk_scale
                if HAS_BIAS:
                    s += tl.load(RPB + hh * srh + (ki - i + KS - 1) * sry
                                 + (kj - j + KS - 1), mask=ok,
                                 other=0.0).to(tl.float32) * LOG2E
                p = tl.where(ok, tl.exp2(s - lse), 0.0)
                dv += p[:, None] * do
                ds = p * (tl.sum(do * v, 1) - delta)
                dk += ds[:, None] * q
        d_off = (o_base + (ki * soy + kj * sox)[:, None].to(tl.int64)
                 + offs_d[None, :])
        tl.store(DK + d_off, (dk * scale).to(DK.dtype.element_ty), mask=nd)
        tl.store(DV + d_off, dv.to(DV.dtype.element_ty), mask=nd)


def _queries_per_key(n: int, ks: int) -> int:
    """The most query rows (of ``n``) whose ``ks``-window holds one key
    row: ``ks + ks//2`` beside a border, all ``n`` when a key row is beside
    both borders (``n <= 2 ks - 1``)."""
    return n if n <= 2 * ks - 1 else ks + ks // 2


def _s4(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


class _NeighborhoodAttentionTriton(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, rpb, ks, scale):
        B, h, H, W, c = q.shape
        has_bias = rpb is not None
        block_d = _block_d(c)
        block_m = _block_m(block_d)
        # (B, H, W, h, c) memory: what the projection after it reads
        out = q.new_empty(B, H, W, h, c).permute(0, 3, 1, 2, 4)
        lse = torch.empty(B * h, H * W, device=q.device, dtype=torch.float32)
        r = rpb if has_bias else q
        _na_fwd[(triton.cdiv(H * W, block_m), B * h)](
            q, k, v, r, out, lse, *q.stride(), *k.stride(), *v.stride(),
            r.stride(0) if has_bias else 0, r.stride(1) if has_bias else 0,
            *_s4(out), h, H, W, c, ks, scale * 1.4426950408889634,
            HAS_BIAS=has_bias, BLOCK_M=block_m, BLOCK_D=block_d,
            num_warps=_num_warps(block_d))
        LAUNCHES['neighborhood_forward'] += 1
        ctx.save_for_backward(q, k, v, rpb, out, lse)
        ctx.args = (ks, scale)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, rpb, out, lse = ctx.saved_tensors
        ks, scale = ctx.args
        B, h, H, W, c = q.shape
        has_bias = rpb is not None
        block_d = _block_d(c)
        block_m = _block_m(block_d)
        do = torch.empty_like(out)
        do.copy_(grad_out)
        delta = (do.float() * out.float()).sum(-1).reshape(B * h, H * W)
        dq, dk, dv = (torch.empty_like(out) for _ in range(3))
        drpb = torch.zeros(rpb.shape, device=q.device,
                           dtype=torch.float32) if has_bias else None
        r = rpb if has_bias else q
        common = (*q.stride(), *k.stride(), *v.stride(),
                  r.stride(0) if has_bias else 0,
                  r.stride(1) if has_bias else 0, *_s4(out))
        meta = dict(HAS_BIAS=has_bias, BLOCK_M=block_m, BLOCK_D=block_d,
                    num_warps=_num_warps(block_d))
        grid = (triton.cdiv(H * W, block_m), B * h)
        _na_bwd_dq[grid](q, k, v, r, do, lse, delta, dq,
                         drpb if has_bias else dq, *common, h, H, W, c, ks,
                         scale * 1.4426950408889634, scale, **meta)
        LAUNCHES['neighborhood_backward_dq'] += 1
        NI, NJ = _queries_per_key(H, ks), _queries_per_key(W, ks)
        _na_bwd_dkdv[grid](q, k, v, r, do, lse, delta, dk, dv, *common,
                           h, H, W, c, ks, NI, NJ,
                           scale * 1.4426950408889634, scale, **meta)
        LAUNCHES['neighborhood_backward_dkdv'] += 1
        grad_rpb = drpb.to(rpb.dtype) if has_bias else None
        return dq, dk, dv, grad_rpb, None, None


# under torch.compile the kernels run eagerly (a graph break), not traced
@torch.compiler.disable
def neighborhood_attention_triton(q: torch.Tensor, k: torch.Tensor,
                                  v: torch.Tensor,
                                  rpb: Optional[torch.Tensor], *,
                                  kernel_size: int,
                                  scale: float) -> torch.Tensor:
    """Fused neighborhood attention (Triton window walk, forward and
    backward).

    ``q``/``k``/``v`` ``(B, h, H, W, c)`` with ``H, W >= kernel_size``,
    ``rpb`` ``(h, 2k-1, 2k-1)`` or ``None``. Returns ``(B, h, H, W, c)`` in
    ``q``'s dtype (a view of ``(B, H, W, h, c)`` memory).
    """
    if triton is None:
        raise RuntimeError(_IMPORT_ERROR or 'triton not importable')
    if q.dim() != 5 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError('q, k, v must all be (B, h, H, W, c); got '
                         f'{tuple(q.shape)}, {tuple(k.shape)}, '
                         f'{tuple(v.shape)}')
    B, h, H, W, c = q.shape
    ks = int(kernel_size)
    if ks < 1 or H < ks or W < ks:
        raise ValueError(f'neighborhood attention needs 1 <= kernel_size '
                         f'<= H, W; got kernel_size={ks}, H={H}, W={W}')
    if rpb is not None and tuple(rpb.shape) != (h, 2 * ks - 1, 2 * ks - 1):
        raise ValueError(f'rpb must be (h={h}, {2 * ks - 1}, {2 * ks - 1}), '
                         f'got {tuple(rpb.shape)}')
    if c > _MAX_HEAD_DIM:
        raise ValueError(f'head dim {c} unsupported (1-{_MAX_HEAD_DIM})')
    if q.dtype not in _DTYPES:
        raise ValueError(f'dtype {q.dtype} unsupported (float32, bfloat16, '
                         'float16)')
    k = k.to(q.dtype)
    v = v.to(q.dtype)
    if rpb is not None:
        rpb = rpb.float().contiguous()
    return _NeighborhoodAttentionTriton.apply(q, k, v, rpb, ks, float(scale))


from ..dispatch import register  # noqa: E402

register('neighborhood_attention', 'triton',
         can_run=can_run_triton)(neighborhood_attention_triton)
