"""Deformable attention in Triton: flash-style forward and backward with the
deformable relative position bias evaluated inside the kernels.

Per tile of queries the forward computes, for each block of keys, the scores
``q k^T * scale``, adds the bias (a bilinear lookup of the ``rpe_table`` at
the half displacement between query and key, with the spec's clamp of the
lower corner to ``size - 2``), and folds the block into an online softmax
and the weighted values. Only the output and the log-sum-exp are written:
nothing of size queries x keys is ever in memory.

The backward recomputes the tiles. One kernel per query tile gives ``dq``;
one kernel per key tile (the query range optionally split across programs,
so that a few keys still fill the GPU) gives ``dk``, ``dv``, the gradient of
the sampling positions (through the bilinear fractions; the corner index is
piecewise constant) and scatters the table gradient with atomics.

Sizes are runtime arguments and are not specialised on, so a kernel compiles
once per (dtype, head-dim block, bias or not) configuration.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the
Triton interpreter; that is how a machine without a GPU tests these kernels).
"""
import collections
import os
from typing import Optional, Tuple

import torch

try:  # triton is optional: CPU-only installs run without it
    import triton
    import triton.language as tl
    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # noqa: BLE001 - any import failure means "absent"
    triton = tl = None
    _IMPORT_ERROR = f'triton not importable ({type(exc).__name__}: {exc})'

#: kernel launches by name (tests check that the kernels really ran)
LAUNCHES: collections.Counter = collections.Counter()

#: ``(BLOCK_M, BLOCK_N)`` forced for every kernel (tests: several tiles at tiny
#: sizes); ``None`` picks per head dim and dtype
BLOCK_OVERRIDE: Optional[Tuple[int, int]] = None

#: table gradient: ``'rows'`` (reduced per query row, then atomics),
#: ``'atomics'`` (one per bilinear corner) or ``None`` (by geometry)
TABLE_GRAD: Optional[str] = None

#: programs of the key-tile backward wanted at least (query range split)
_MIN_PROGRAMS = 512

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_HEAD_DIM = 128


def interpreted() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET=1``; read when
    the kernels below were defined, so it must be set before this import)."""
    return _INTERPRETED


_INTERPRETED = os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')


def can_run_triton(ctx) -> Optional[str]:
    """``None`` when these kernels take ``ctx`` (a dispatch ``Context``),
    else why not."""
    if triton is None:
        return _IMPORT_ERROR or 'triton not importable'
    if ctx.device.type != 'cuda' and not (ctx.device.type == 'cpu'
                                          and _INTERPRETED):
        return 'needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)'
    if ctx.fact('positions_in_range', True) is False:
        return 'positions may leave the table'
    if ctx.dtype not in _DTYPES:
        return f'dtype {ctx.dtype} unsupported (float32, bfloat16, float16)'
    if ctx.head_dim and not 1 <= ctx.head_dim <= _MAX_HEAD_DIM:
        return f'head dim {ctx.head_dim} unsupported (1-{_MAX_HEAD_DIM})'
    return None


def _blocks(c: int, dtype: torch.dtype, backward: bool) -> Tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)``: chosen so that, with 8 warps, ptxas (sm_90)
    reports no register spills (the bias keeps several (queries x keys)
    tiles alive, the backward more); not yet timed on a GPU."""
    if BLOCK_OVERRIDE is not None:
        return BLOCK_OVERRIDE
    if backward:
        return (64, 32) if c <= 64 else (32, 32)
    if c <= 64 and dtype != torch.float32:
        return 64, 64
    return 64, 32


def _block_d(c: int) -> int:
    return max(16, triton.next_power_of_2(c))


def _reduce_rows(H: int, W: int, Tx: int, block_m: int) -> bool:
    """Whether the table gradient is reduced per query row first: when a
    tile's queries touch few table columns per key (feature maps larger
    than the table's pre-training size, e.g. detection inputs), i.e. the
    per-row loop is shorter than the atomics it saves."""
    if TABLE_GRAD is not None:
        return TABLE_GRAD == 'rows'
    step = (Tx - 1) / (2 * (W - 1)) if W > 1 else 0.0
    rows_per_tile = -(-block_m // W) + 1
    return block_m * step + 2 * rows_per_tile <= 24


def _num_warps(block_m: int, block_n: int, block_d: int,
               backward: bool) -> int:
    # 4 warps spill registers at every block shape above (ptxas -v, sm_90)
    return 8


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact products unless the user allowed TF32 globally
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return 'ieee'
    return 'tf32'


def _upcast(dtype: torch.dtype) -> bool:
    return _INTERPRETED and dtype == torch.bfloat16


# ----------------------------------------------------------------- kernels
if triton is not None:
    # sizes and the strides that scale with them are not specialised on
    # (one compilation for every input size); the token and channel
    # strides are (1 or not, multiple of 16 or not: vectorised loads)
    _SIZES = ['h', 'hg', 'M', 'Ns', 'W', 'c', 'n_split', 'per_split',
              'sqb', 'sqh', 'skb', 'skh', 'svb', 'svh', 'spb', 'spg', 'sth',
              'sob', 'soh']

    @triton.jit
    def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
        """``a @ b`` with float32 accumulation; ``UPCAST``: in float32 (the
        interpreter's bfloat16 dot is wrong; bf16 products are exact in
        float32, so the result is the same as the tensor-core one)."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32),
                          input_precision='ieee')
        else:
            return tl.dot(a, b, input_precision=PREC)

    @triton.jit
    def _bias_tile(TAB, tab_off, sty, qy, qx, py, px, cy, cx, ymax, xmax):
        """Bilinear lookup of one head's table for (queries x keys): returns
        the bias, the corner offsets and values and the fractions."""
        uy = (qy[:, None] - py[None, :] + 2.0) * cy
        ux = (qx[:, None] - px[None, :] + 2.0) * cx
        # a NaN position reads corner 0 and gives a NaN bias (no wild read)
        y0f = tl.minimum(tl.maximum(tl.floor(tl.where(uy == uy, uy, 0.0)),
                                    0.0), ymax)
        x0f = tl.minimum(tl.maximum(tl.floor(tl.where(ux == ux, ux, 0.0)),
                                    0.0), xmax)
        fy = uy - y0f
        fx = ux - x0f
        off = tab_off + y0f.to(tl.int32) * sty + x0f.to(tl.int32)
        t00 = tl.load(TAB + off)
        t01 = tl.load(TAB + off + 1)
        t10 = tl.load(TAB + off + sty)
        t11 = tl.load(TAB + off + sty + 1)
        top = t00 + (t01 - t00) * fx
        bot = t10 + (t11 - t10) * fx
        bias = top + (bot - top) * fy
        return bias, off, fy, fx, top, bot, t00, t01, t10, t11

    @triton.jit(do_not_specialize=_SIZES)
    def _da_fwd(Q, K, V, POS, TAB, OUT, LSE,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                spb, spg, sth, sty, sob, soh, som,
                h, hg, M, Ns, W, c,
                sy, oy, sx, ox, cy, cx, ymax, xmax, qk_scale,
                HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr):
        LOG2E: tl.constexpr = 1.4426950408889634
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // h
        hh = bh - b * h
        grp = hh // hg
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < M
        mask_d = offs_d < c
        q = tl.load(Q + b.to(tl.int64) * sqb + hh * sqh
                    + offs_m[:, None].to(tl.int64) * sqm
                    + offs_d[None, :] * sqd,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        row = offs_m // W
        qy = row.to(tl.float32) * sy - oy
        qx = (offs_m - row * W).to(tl.float32) * sx - ox
        m_i = tl.full([BLOCK_M], float('-inf'), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        k_base = K + b.to(tl.int64) * skb + hh * skh
        v_base = V + b.to(tl.int64) * svb + hh * svh
        p_base = POS + b.to(tl.int64) * spb + grp * spg
        for n0 in range(0, Ns, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < Ns
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(k_base + offs_n[:, None].to(tl.int64) * skn
                        + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
            if HAS_BIAS:
                py = tl.load(p_base + offs_n * 2, mask=mask_n, other=0.0)
                px = tl.load(p_base + offs_n * 2 + 1, mask=mask_n, other=0.0)
                bias, _, _, _, _, _, _, _, _, _ = _bias_tile(
                    TAB, hh * sth, sty, qy, qx, py, px, cy, cx, ymax, xmax)
                s += bias * LOG2E
            s = tl.where(mask_n[None, :], s, float('-inf'))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svn
                        + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC,
                                              UPCAST)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(OUT + b.to(tl.int64) * sob + hh * soh
                 + offs_m[:, None].to(tl.int64) * som + offs_d[None, :],
                 acc.to(OUT.dtype.element_ty),
                 mask=mask_m[:, None] & mask_d[None, :])
        tl.store(LSE + bh.to(tl.int64) * M + offs_m, m_i + tl.log2(l_i),
                 mask=mask_m)

    @triton.jit(do_not_specialize=_SIZES)
    def _da_bwd_dq(Q, K, V, POS, TAB, DO, LSE, DELTA, DQ,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn,
                   svd, spb, spg, sth, sty, sob, soh, som,
                   h, hg, M, Ns, W, c,
                   sy, oy, sx, ox, cy, cx, ymax, xmax, qk_scale, scale,
                   HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                   UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
        """dq of one query tile; ``DO``/``DQ`` share the strides ``so*``
        (both laid out like the output)."""
        LOG2E: tl.constexpr = 1.4426950408889634
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // h
        hh = bh - b * h
        grp = hh // hg
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < M
        mask_d = offs_d < c
        qd_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(Q + b.to(tl.int64) * sqb + hh * sqh
                    + offs_m[:, None].to(tl.int64) * sqm
                    + offs_d[None, :] * sqd,
                    mask=qd_mask, other=0.0)
        o_off = (b.to(tl.int64) * sob + hh * soh
                 + offs_m[:, None].to(tl.int64) * som + offs_d[None, :])
        do = tl.load(DO + o_off, mask=qd_mask, other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * M + offs_m, mask=mask_m,
                      other=0.0)
        delta = tl.load(DELTA + bh.to(tl.int64) * M + offs_m, mask=mask_m,
                        other=0.0)
        row = offs_m // W
        qy = row.to(tl.float32) * sy - oy
        qx = (offs_m - row * W).to(tl.float32) * sx - ox
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        k_base = K + b.to(tl.int64) * skb + hh * skh
        v_base = V + b.to(tl.int64) * svb + hh * svh
        p_base = POS + b.to(tl.int64) * spb + grp * spg
        for n0 in range(0, Ns, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < Ns
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(k_base + offs_n[:, None].to(tl.int64) * skn
                        + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svn
                        + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
            if HAS_BIAS:
                py = tl.load(p_base + offs_n * 2, mask=mask_n, other=0.0)
                px = tl.load(p_base + offs_n * 2 + 1, mask=mask_n, other=0.0)
                bias, _, _, _, _, _, _, _, _, _ = _bias_tile(
                    TAB, hh * sth, sty, qy, qx, py, px, cy, cx, ymax, xmax)
                s += bias * LOG2E
            p = tl.exp2(s - lse[:, None])
            p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
            dp = _dot(do, tl.trans(v), PREC, UPCAST)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, PREC, UPCAST)
        tl.store(DQ + o_off, (dq * scale).to(DQ.dtype.element_ty),
                 mask=qd_mask)

    @triton.jit
    def _table_grad_rows(DTAB, sty, ds, valid, py, mask_n, row, r_first,
                         r_last, off, fx, sy, oy, cy, ymax, xmax):
        """Table gradient of a (queries x keys) tile, reduced per query row
        before the atomics: within one query row the table row of a key is
        fixed, and the table columns its queries touch are a short run
        (``x0`` grows by ``(Tx-1) / (2(W-1))`` per query), so each run is
        summed over the row's queries with the bilinear tent weights
        ``max(0, 1 - |u - x|)`` and added once per (table column, key)."""
        x0f = (off % sty).to(tl.float32)  # lower corner column (finite)
        ux = x0f + fx
        for r in range(r_first, r_last + 1):
            in_r = valid & (row == r)[:, None]
            ds_r = tl.where(in_r, ds, 0.0)
            uy = (r * sy - oy - py + 2.0) * cy
            y0f = tl.minimum(tl.maximum(
                tl.floor(tl.where(uy == uy, uy, 0.0)), 0.0), ymax)
            fy = uy - y0f
            base = tl.min(tl.where(in_r, x0f, 1e9), 0)
            top = tl.max(tl.where(in_r, x0f, -1.0), 0)
            span = tl.max(tl.where(top >= base, top - base, -2.0),
                          0).to(tl.int32) + 2
            base = tl.minimum(base, xmax)
            row_ptr = DTAB + y0f.to(tl.int32) * sty
            for t in range(0, span):
                x = base + t
                w = tl.maximum(1.0 - tl.abs(ux - x[None, :]), 0.0)
                col = tl.sum(ds_r * w, 0)
                ok = mask_n & (x <= xmax + 1.0)
                xi = x.to(tl.int32)
                tl.atomic_add(row_ptr + xi, col - col * fy, mask=ok,
                              sem='relaxed')
                tl.atomic_add(row_ptr + sty + xi, col * fy, mask=ok,
                              sem='relaxed')

    @triton.jit(do_not_specialize=_SIZES)
    def _da_bwd_dkdv(Q, K, V, POS, TAB, DO, LSE, DELTA, DK, DV, DPOS, DTAB,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn,
                     svd, spb, spg, sth, sty, sob, soh, som,
                     h, hg, M, Ns, W, c, n_split, per_split,
                     sy, oy, sx, ox, cy, cx, ymax, xmax, qk_scale, scale,
                     HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                     UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr,
                     REDUCE_ROWS: tl.constexpr):
        """Partial dk, dv, d(pos) of one key tile over one split of the
        query tiles (``(n_split, B*h, Ns, .)`` float32 buffers, summed by
        the caller); the table gradient is added atomically into ``DTAB``
        (float32, laid out like the padded table)."""
        LOG2E: tl.constexpr = 1.4426950408889634
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        split = tl.program_id(2)
        b = bh // h
        hh = bh - b * h
        grp = hh // hg
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = offs_n < Ns
        mask_d = offs_d < c
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + b.to(tl.int64) * skb + hh * skh
                    + offs_n[:, None].to(tl.int64) * skn
                    + offs_d[None, :] * skd,
                    mask=kv_mask, other=0.0)
        v = tl.load(V + b.to(tl.int64) * svb + hh * svh
                    + offs_n[:, None].to(tl.int64) * svn
                    + offs_d[None, :] * svd,
                    mask=kv_mask, other=0.0)
        p_base = POS + b.to(tl.int64) * spb + grp * spg
        py = tl.load(p_base + offs_n * 2, mask=mask_n, other=0.0)
        px = tl.load(p_base + offs_n * 2 + 1, mask=mask_n, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dpy = tl.zeros([BLOCK_N], tl.float32)
        dpx = tl.zeros([BLOCK_N], tl.float32)
        q_base = Q + b.to(tl.int64) * sqb + hh * sqh
        o_base = DO + b.to(tl.int64) * sob + hh * soh
        m_first = split * per_split * BLOCK_M
        m_last = tl.minimum(M, m_first + per_split * BLOCK_M)
        for m0 in range(m_first, m_last, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < m_last
            qd_mask = mask_m[:, None] & mask_d[None, :]
            q = tl.load(q_base + offs_m[:, None].to(tl.int64) * sqm
                        + offs_d[None, :] * sqd, mask=qd_mask, other=0.0)
            do = tl.load(o_base + offs_m[:, None].to(tl.int64) * som
                         + offs_d[None, :], mask=qd_mask, other=0.0)
            lse = tl.load(LSE + bh.to(tl.int64) * M + offs_m, mask=mask_m,
                          other=0.0)
            delta = tl.load(DELTA + bh.to(tl.int64) * M + offs_m,
                            mask=mask_m, other=0.0)
            s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
            if HAS_BIAS:
                row = offs_m // W
                qy = row.to(tl.float32) * sy - oy
                qx = (offs_m - row * W).to(tl.float32) * sx - ox
                bias, off, fy, fx, top, bot, t00, t01, t10, t11 = _bias_tile(
                    TAB, hh * sth, sty, qy, qx, py, px, cy, cx, ymax, xmax)
                s += bias * LOG2E
            valid = mask_m[:, None] & mask_n[None, :]
            p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
            dv += _dot(tl.trans(p.to(do.dtype)), do, PREC, UPCAST)
            dp = _dot(do, tl.trans(v), PREC, UPCAST)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, PREC, UPCAST)
            if HAS_BIAS:
                dpy += tl.sum(ds * (bot - top), 0)
                dpx += tl.sum(ds * ((t01 - t00) + ((t11 - t10)
                                                   - (t01 - t00)) * fy), 0)
                if REDUCE_ROWS:
                    _table_grad_rows(DTAB + hh * sth, sty, ds, valid, py,
                                     mask_n, offs_m // W, m0 // W,
                                     (tl.minimum(m0 + BLOCK_M, m_last) - 1)
                                     // W, off - hh * sth, fx, sy, oy, cy,
                                     ymax, xmax)
                else:
                    # the four corners of every (query, key)
                    g_bot = ds * fy
                    g_top = ds - g_bot
                    tab = DTAB + off  # off includes the head
                    # (relaxed: only the sums matter, no ordering)
                    tl.atomic_add(tab, g_top - g_top * fx, mask=valid,
                                  sem='relaxed')
                    tl.atomic_add(tab + 1, g_top * fx, mask=valid,
                                  sem='relaxed')
                    tl.atomic_add(tab + sty, g_bot - g_bot * fx, mask=valid,
                                  sem='relaxed')
                    tl.atomic_add(tab + sty + 1, g_bot * fx, mask=valid,
                                  sem='relaxed')
        out = ((split * tl.num_programs(1) + bh).to(tl.int64) * Ns
               + offs_n) * c
        nd = out[:, None] + offs_d[None, :]
        tl.store(DK + nd, dk * scale, mask=kv_mask)
        tl.store(DV + nd, dv, mask=kv_mask)
        if HAS_BIAS:
            pos_out = ((split * tl.num_programs(1) + bh).to(tl.int64) * Ns
                       + offs_n) * 2
            # u = (q - p + 2) * c: du/dp = -c
            tl.store(DPOS + pos_out, -dpy * cy, mask=mask_n)
            tl.store(DPOS + pos_out + 1, -dpx * cx, mask=mask_n)


# ------------------------------------------------------------- host side
def _query_coord(n: int) -> Tuple[float, float]:
    """``(step, offset)`` with coordinate ``i * step - offset`` (the spec's
    ``i / (n-1) * 2 - 1``, 0 for ``n == 1``)."""
    return (2.0 / (n - 1), 1.0) if n > 1 else (0.0, 0.0)


def _geometry(H, W, Ty, Tx):
    sy, oy = _query_coord(H)
    sx, ox = _query_coord(W)
    # u = ((q - p) / 2 + 1) / 2 * (size - 1) = (q - p + 2) * (size - 1) / 4;
    # the lower corner is clamped to size - 2 (>= 0: a 1-wide table is
    # padded to 2, and u is always 0 there)
    return (sy, oy, sx, ox, 0.25 * (Ty - 1), 0.25 * (Tx - 1),
            float(max(Ty - 2, 0)), float(max(Tx - 2, 0)))


def _strides(t: torch.Tensor) -> Tuple[int, ...]:
    return t.stride(0), t.stride(1), t.stride(2)


def _strides4(t: torch.Tensor) -> Tuple[int, ...]:
    return t.stride()


class _DeformableAttentionTriton(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, pos, table, H, W, scale, Ty, Tx):
        B, h, M, c = q.shape
        Ns = k.shape[2]
        g = pos.shape[1]
        has_bias = table is not None
        block_m, block_n = _blocks(c, q.dtype, backward=False)
        block_d = _block_d(c)
        # (B, M, h, c) memory: the caller's (B, C, H, W) view of it is a
        # channels-last map, no copy
        out = q.new_empty(B, M, h, c).permute(0, 2, 1, 3)
        lse = torch.empty(B * h, M, device=q.device, dtype=torch.float32)
        tab = table if has_bias else pos
        geo = _geometry(H, W, Ty, Tx)
        grid = (triton.cdiv(M, block_m), B * h)
        _da_fwd[grid](
            q, k, v, pos, tab, out, lse,
            *_strides4(q), *_strides4(k), *_strides4(v), pos.stride(0),
            pos.stride(1), tab.stride(0) if has_bias else 0,
            tab.stride(1) if has_bias else 0, *_strides(out),
            h, h // g, M, Ns, W, c, *geo, scale * 1.4426950408889634,
            HAS_BIAS=has_bias, PREC=_precision(q.dtype),
            UPCAST=_upcast(q.dtype), BLOCK_M=block_m,
            BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=_num_warps(block_m, block_n, block_d, False))
        LAUNCHES['deformable_forward'] += 1
        ctx.save_for_backward(q, k, v, pos, table, out, lse)
        ctx.args = (H, W, scale, Ty, Tx)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, pos, table, out, lse = ctx.saved_tensors
        H, W, scale, Ty, Tx = ctx.args
        B, h, M, c = q.shape
        Ns = k.shape[2]
        g = pos.shape[1]
        has_bias = table is not None
        block_m, block_n = _blocks(c, q.dtype, backward=True)
        block_d = _block_d(c)
        # dO laid out like the output, so both share one set of strides
        do = torch.empty_like(out)
        do.copy_(grad_out)
        delta = (do.float() * out.float()).sum(-1).reshape(B * h, M)
        dq = torch.empty_like(out)
        tab = table if has_bias else pos
        geo = _geometry(H, W, Ty, Tx)
        common = (*_strides4(q), *_strides4(k), *_strides4(v), pos.stride(0),
                  pos.stride(1), tab.stride(0) if has_bias else 0,
                  tab.stride(1) if has_bias else 0, *_strides(out))
        meta = dict(HAS_BIAS=has_bias, PREC=_precision(q.dtype),
            UPCAST=_upcast(q.dtype),
                    BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                    num_warps=_num_warps(block_m, block_n, block_d, True))
        _da_bwd_dq[(triton.cdiv(M, block_m), B * h)](
            q, k, v, pos, tab, do, lse, delta, dq, *common,
            h, h // g, M, Ns, W, c, *geo, scale * 1.4426950408889634, scale,
            **meta)
        LAUNCHES['deformable_backward_dq'] += 1
        n_tiles = triton.cdiv(M, block_m)
        key_programs = triton.cdiv(Ns, block_n) * B * h
        n_split = max(1, min(n_tiles, _MIN_PROGRAMS // max(1, key_programs)))
        per_split = triton.cdiv(n_tiles, n_split)
        n_split = triton.cdiv(n_tiles, per_split)
        f32 = dict(device=q.device, dtype=torch.float32)
        dk = torch.empty(n_split, B * h, Ns, c, **f32)
        dv = torch.empty(n_split, B * h, Ns, c, **f32)
        dpos = torch.empty(n_split, B * h, Ns, 2, **f32) if has_bias else dk
        dtab = torch.zeros(table.shape, **f32) if has_bias else dk
        reduce_rows = has_bias and _reduce_rows(H, W, Tx, block_m)
        _da_bwd_dkdv[(triton.cdiv(Ns, block_n), B * h, n_split)](
            q, k, v, pos, tab, do, lse, delta, dk, dv, dpos, dtab, *common,
            h, h // g, M, Ns, W, c, n_split, per_split,
            *geo, scale * 1.4426950408889634, scale,
            REDUCE_ROWS=reduce_rows, **meta)
        LAUNCHES['deformable_backward_dkdv'] += 1
        if has_bias:
            LAUNCHES['table_grad_rows' if reduce_rows
                     else 'table_grad_atomics'] += 1
        dk = dk.sum(0).view(B, h, Ns, c).to(k.dtype)
        dv = dv.sum(0).view(B, h, Ns, c).to(v.dtype)
        grad_pos = grad_table = None
        if has_bias:
            # heads of a group share the group's positions
            grad_pos = dpos.sum(0).view(B, g, h // g, Ns, 2).sum(2)
            grad_table = dtab.to(table.dtype)
        return (dq, dk, dv, grad_pos, grad_table, None, None, None, None,
                None)


# under torch.compile the kernels run eagerly (a graph break), not traced
@torch.compiler.disable
def deformable_attention_triton(q: torch.Tensor, k: torch.Tensor,
                                v: torch.Tensor, pos: torch.Tensor,
                                table: Optional[torch.Tensor], *, H: int,
                                W: int, scale: float,
                                positions_in_range: bool = True
                                ) -> torch.Tensor:
    """Fused deformable attention (Triton kernels, forward and backward).

    ``q`` ``(B, h, M=H*W, c)``, ``k``/``v`` ``(B, h, Ns, c)``, ``pos``
    ``(B, g, Ns, 2)`` (y, x) in [-1, 1], ``table`` ``(h, Ty, Tx)`` or
    ``None``. Returns ``(B, h, M, c)`` in ``q``'s dtype (a view of
    ``(B, M, h, c)`` memory). Gradients flow to q, k, v, pos and table.
    """
    if triton is None:
        raise RuntimeError(_IMPORT_ERROR or 'triton not importable')
    if not positions_in_range:
        raise ValueError('deformable_attention_triton: positions may leave '
                         'the table (positions_in_range=False); use another '
                         'implementation')
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError('q, k, v must be (B, h, tokens, c); got '
                         f'{tuple(q.shape)}, {tuple(k.shape)}, '
                         f'{tuple(v.shape)}')
    B, h, M, c = q.shape
    if M != H * W:
        raise ValueError(f'q has {M} queries, H*W = {H}*{W} = {H * W}')
    if k.shape[:2] != (B, h) or k.shape[3] != c or v.shape != k.shape:
        raise ValueError(f'k {tuple(k.shape)} and v {tuple(v.shape)} must be '
                         f'(B={B}, h={h}, Ns, c={c})')
    Ns = k.shape[2]
    if pos.dim() != 4 or pos.shape[0] != B or pos.shape[2:] != (Ns, 2):
        raise ValueError(f'pos must be (B={B}, g, Ns={Ns}, 2), got '
                         f'{tuple(pos.shape)}')
    if Ns == 0 or M == 0:
        raise ValueError('deformable attention needs >= 1 query and key')
    g = pos.shape[1]
    if h % g:
        raise ValueError(f'heads {h} not divisible by groups {g}')
    if c > _MAX_HEAD_DIM:
        raise ValueError(f'head dim {c} unsupported (1-{_MAX_HEAD_DIM})')
    if q.dtype not in _DTYPES:
        raise ValueError(f'dtype {q.dtype} unsupported (float32, bfloat16, '
                         'float16)')
    k = k.to(q.dtype)
    v = v.to(q.dtype)
    # positions and table in float32 (a bf16 coordinate near 1 is only known
    # to half a cell of the 111-wide stage-1 table)
    pos = pos.float().contiguous()
    Ty = Tx = 1
    if table is not None:
        if table.dim() != 3 or table.shape[0] != h:
            raise ValueError(f'table must be (h={h}, Ty, Tx), got '
                             f'{tuple(table.shape)}')
        Ty, Tx = table.shape[1:]
        # both bilinear corners must exist: a 1-wide axis is repeated
        # (lookups there land on coordinate 0)
        table = table.float().repeat(1, 2 if Ty == 1 else 1,
                                     2 if Tx == 1 else 1).contiguous()
    return _DeformableAttentionTriton.apply(q, k, v, pos, table, H, W,
                                            float(scale), Ty, Tx)


from ..dispatch import register  # noqa: E402

register('deformable_attention', 'triton',
         can_run=can_run_triton)(deformable_attention_triton)
