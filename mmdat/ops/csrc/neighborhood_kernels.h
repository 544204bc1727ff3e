// Fused CPU kernels for 2-D neighborhood attention (natten semantics,
// dilation 1): each query attends to the ks x ks window that slides inward
// at the borders, plus the relative position bias rpb (h, 2ks-1, 2ks-1).
// q, k, v: (B, h, H, W, c), H >= ks and W >= ks. The training ops take them
// contiguous; the inference op takes any strides with contiguous channels.
//
// Included once per instruction set by kernels_<isa>.cpp (see
// deform_bias_kernels.h); inputs validated by ops.cpp.

namespace {

inline int64_t window_start(int64_t i, int64_t ks, int64_t n) {
  return std::min(std::max<int64_t>(i - ks / 2, 0), n - ks);
}

// A (B, h, H, W, c) tensor with unit channel stride, as pointer + strides.
template <typename T>
struct View {
  T* p;
  int64_t s0, s1, s2, s3;
  View(T* ptr, const int64_t* s)
      : p(ptr), s0(s[0]), s1(s[1]), s2(s[2]), s3(s[3]) {}
  T* row(int64_t b, int64_t h, int64_t i) const {
    return p + b * s0 + h * s1 + i * s2;
  }
};

template <typename scalar_t>
struct NaArgs {
  View<const scalar_t> q, k, v;
  View<scalar_t> out;
  const acc_t<scalar_t>* rpb;  // (h, 2ks-1, 2ks-1)
  scalar_t* attn;  // (B, h, H, W, ks*ks) contiguous, or null (inference)
  int64_t NH, H, W, C, ks;
  acc_t<scalar_t> scale;
};

// One query (b, hh, i, j), one key at a time. Scratch: logit (ks*ks), acc
// and qf (c).
template <typename scalar_t, typename opmath_t>
void query_scalar(const NaArgs<scalar_t>& A, int64_t b, int64_t hh, int64_t i,
                  int64_t j, opmath_t* __restrict logit,
                  opmath_t* __restrict acc, opmath_t* __restrict qf) {
  // locals, not fields of A: the stores below could alias those
  const int64_t ks = A.ks, C = A.C, RW = 2 * ks - 1, ks3 = A.k.s3,
                vs3 = A.v.s3;
  const opmath_t scale = A.scale;
  const int64_t si = window_start(i, ks, A.H), sj = window_start(j, ks, A.W);
  const scalar_t* qv = A.q.row(b, hh, i) + j * A.q.s3;
  for (int64_t t = 0; t < C; ++t) qf[t] = qv[t];
  opmath_t mx = -INFINITY;
  for (int64_t a = 0; a < ks; ++a) {
    const opmath_t* brow =
        A.rpb + (hh * RW + si + a - i + ks - 1) * RW + sj - j + ks - 1;
    const scalar_t* krow = A.k.row(b, hh, si + a) + sj * ks3;
    for (int64_t c2 = 0; c2 < ks; ++c2) {
      const scalar_t* kv = krow + c2 * ks3;
      opmath_t dot = 0;
      _Pragma("omp simd reduction(+ : dot)")
      for (int64_t t = 0; t < C; ++t) dot += qf[t] * kv[t];
      const opmath_t l = dot * scale + brow[c2];
      logit[a * ks + c2] = l;
      mx = std::max(mx, l);
    }
  }
  opmath_t sum = 0;
  for (int64_t m = 0; m < ks * ks; ++m) {
    logit[m] = std::exp(logit[m] - mx);
    sum += logit[m];
  }
  const opmath_t inv = opmath_t(1) / sum;
  std::fill(acc, acc + C, opmath_t(0));
  scalar_t* ap =
      A.attn ? A.attn + (((b * A.NH + hh) * A.H + i) * A.W + j) * ks * ks
             : nullptr;
  const scalar_t* vrow0 = A.v.row(b, hh, si) + sj * vs3;
  const int64_t vs2 = A.v.s2;
  for (int64_t a = 0; a < ks; ++a) {
    const scalar_t* vrow = vrow0 + a * vs2;
    for (int64_t c2 = 0; c2 < ks; ++c2) {
      const opmath_t p = logit[a * ks + c2] * inv;
      if (ap) ap[a * ks + c2] = p;
      const scalar_t* vv = vrow + c2 * vs3;
      for (int64_t t = 0; t < C; ++t) acc[t] += p * vv[t];
    }
  }
  scalar_t* ov = A.out.row(b, hh, i) + j * A.out.s3;
  for (int64_t t = 0; t < C; ++t) ov[t] = acc[t];
}

template <typename scalar_t>
void forward_scalar(const NaArgs<scalar_t>& A, int64_t B) {
  using opmath_t = acc_t<scalar_t>;
  at::parallel_for(0, B * A.NH * A.H, 1, [&](int64_t b0, int64_t e) {
    std::vector<opmath_t> logit(A.ks * A.ks), acc(A.C), qf(A.C);
    for (int64_t n = b0; n < e; ++n) {
      const int64_t bh = n / A.H, i = n % A.H;
      for (int64_t j = 0; j < A.W; ++j)
        query_scalar(A, bh / A.NH, bh % A.NH, i, j, logit.data(), acc.data(),
                     qf.data());
    }
  });
}

#if MMDAT_AVX512
// ------------------------------------------------------------------------
// float32 AVX-512 inference kernel, vectorised across queries: for a block
// of 16 interior queries of one row (window start j - ks/2) and one key
// offset, the 16 keys are consecutive, so with q and k transposed to
// channel-major the 16 logits are c plain FMAs (no horizontal sums). The
// first/last ks/2 columns (windows clamped) go through query_scalar.

// In-register transpose of a 16x16 tile.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m512 u[16];  // u[4i + k], 128-bit lane L: rows 4i..4i+3 of column 4L+k
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]),
                  b = _mm512_castps_pd(t[4 * i + 1]),
                  c = _mm512_castps_pd(t[4 * i + 2]),
                  d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int k = 0; k < 4; ++k) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x88),
                 v1 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xdd),
                 w0 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x88),
                 w1 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xdd);
    r[k] = _mm512_shuffle_f32x4(v0, w0, 0x88);
    r[4 + k] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    r[8 + k] = _mm512_shuffle_f32x4(v0, w0, 0xdd);
    r[12 + k] = _mm512_shuffle_f32x4(v1, w1, 0xdd);
  }
}

constexpr int64_t kMaxKernel = 32;

inline __mmask16 lane_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
}

// dst[t * dstride + r] = src[r * sstride + t] for r < n (<= 16), t < C;
// columns n..15 of dst get zeros.
inline void transpose_block(const float* src, int64_t sstride, int64_t n,
                            int64_t C, float* dst, int64_t dstride) {
  for (int64_t t0 = 0; t0 < C; t0 += 16) {
    const __mmask16 cm = lane_mask(C - t0);
    __m512 r[16];
    for (int64_t x = 0; x < 16; ++x)
      r[x] = x < n ? _mm512_maskz_loadu_ps(cm, src + x * sstride + t0)
                   : _mm512_setzero_ps();
    transpose16(r);
    for (int64_t t = t0; t < std::min(C, t0 + 16); ++t)
      _mm512_storeu_ps(dst + t * dstride, r[t - t0]);
  }
}

// Logits of NB consecutive key offsets: out[b] = sum_t qT[t] * kT[t][b..].
template <int NB>
inline void qk_group(const float* qT, const float* kT, int64_t kstride,
                     int64_t C, __m512* out) {
  __m512 acc[NB];
  for (int b = 0; b < NB; ++b) acc[b] = _mm512_setzero_ps();
  for (int64_t t = 0; t < C; ++t) {
    const __m512 qv = _mm512_load_ps(qT + t * 16);
    const float* kr = kT + t * kstride;
    for (int b = 0; b < NB; ++b)
      acc[b] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kr + b), acc[b]);
  }
  for (int b = 0; b < NB; ++b) out[b] = acc[b];
}

inline void qk_dispatch(int64_t nb, const float* qT, const float* kT,
                        int64_t kstride, int64_t C, __m512* out) {
  switch (nb) {
    case 1: return qk_group<1>(qT, kT, kstride, C, out);
    case 2: return qk_group<2>(qT, kT, kstride, C, out);
    case 3: return qk_group<3>(qT, kT, kstride, C, out);
    case 4: return qk_group<4>(qT, kT, kstride, C, out);
    case 5: return qk_group<5>(qT, kT, kstride, C, out);
    case 6: return qk_group<6>(qT, kT, kstride, C, out);
    case 7: return qk_group<7>(qT, kT, kstride, C, out);
    default: return qk_group<8>(qT, kT, kstride, C, out);
  }
}

// out rows of NQ queries (lanes l0.. of the block) = sum_m p[m][l] v[key];
// NV vectors of 16 channels per row, the last one masked by cm. vrow[a]
// points at the first key of window row a of query lane 0.
template <int NQ, int NV>
inline void pv_queries(const float* p, int64_t l0, const float* const* vrow,
                       int64_t vs3, int64_t ks, __mmask16 cm, float* out,
                       int64_t os3) {
  __m512 acc[NQ][NV];
  for (int q = 0; q < NQ; ++q)
    for (int u = 0; u < NV; ++u) acc[q][u] = _mm512_setzero_ps();
  for (int64_t a = 0; a < ks; ++a) {
    for (int64_t c2 = 0; c2 < ks; ++c2) {
      const float* pm = p + (a * ks + c2) * 16 + l0;
      const float* vv = vrow[a] + (l0 + c2) * vs3;
      for (int q = 0; q < NQ; ++q) {
        const __m512 pq = _mm512_set1_ps(pm[q]);
        for (int u = 0; u < NV; ++u) {
          const __m512 x =
              u + 1 < NV ? _mm512_loadu_ps(vv + q * vs3 + u * 16)
                         : _mm512_maskz_loadu_ps(cm, vv + q * vs3 + u * 16);
          acc[q][u] = _mm512_fmadd_ps(pq, x, acc[q][u]);
        }
      }
    }
  }
  for (int q = 0; q < NQ; ++q)
    for (int u = 0; u < NV; ++u) {
      float* o = out + (l0 + q) * os3 + u * 16;
      if (u + 1 < NV) _mm512_storeu_ps(o, acc[q][u]);
      else _mm512_mask_storeu_ps(o, cm, acc[q][u]);
    }
}

template <int NV>
inline void pv_block(const float* p, int64_t n, const float* const* vrow,
                     int64_t vs3, int64_t ks, __mmask16 cm, float* out,
                     int64_t os3) {
  // several queries at once: independent FMA chains hide their latency
  constexpr int NQ = NV == 1 ? 8 : 4;
  int64_t l = 0;
  for (; l + NQ <= n; l += NQ)
    pv_queries<NQ, NV>(p, l, vrow, vs3, ks, cm, out, os3);
  for (; l < n; ++l) pv_queries<1, NV>(p, l, vrow, vs3, ks, cm, out, os3);
}

// Per-thread scratch: the key rows of a chunk of query rows, channel-major
// (C x Wp each, zero beyond W); the query block transposed (C x 16);
// logits/probabilities (ks*ks x 16).
struct Scratch {
  int64_t Wp, C;
  std::vector<float> buf;
  float *kT, *qT, *p;
  Scratch(int64_t rows, int64_t ks, int64_t C_, int64_t W) : C(C_) {
    Wp = (W + 31) / 16 * 16;  // room for the reads of the last block
    if ((Wp * 4) % 4096 == 0) Wp += 16;  // avoid 4 KiB aliasing of rows
    const int64_t nk = rows * C * Wp, nq = C * 16, np = ks * ks * 16;
    buf.assign(nk + nq + np + 16, 0.f);
    float* base = reinterpret_cast<float*>(
        (reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    kT = base;
    qT = kT + nk;
    p = qT + nq;
  }
  float* key_row(int64_t r) { return kT + r * C * Wp; }
};

// Key row r of (b, hh), channel-major, into dst (C x Wp).
void transpose_key_row(const NaArgs<float>& A, int64_t b, int64_t hh,
                       int64_t r, float* dst, int64_t Wp) {
  const float* src = A.k.row(b, hh, r);
  for (int64_t j0 = 0; j0 < A.W; j0 += 16)
    transpose_block(src + j0 * A.k.s3, A.k.s3, std::min<int64_t>(16, A.W - j0),
                    A.C, dst + j0, Wp);
}

// Block of n (<= 16) interior queries (i, j0..j0+n); the key rows of row i
// start at kT0 (channel-major, row stride C * Wp).
void block_f32(const NaArgs<float>& A, float* qT, float* p, const float* kT0,
               int64_t Wp, int64_t b, int64_t hh, int64_t i, int64_t j0,
               int64_t n) {
  const int64_t ks = A.ks, C = A.C, KK = ks * ks, RW = 2 * ks - 1,
                NV = (C + 15) / 16, sj = j0 - ks / 2;
  const int64_t si = window_start(i, ks, A.H);
  transpose_block(A.q.row(b, hh, i) + j0 * A.q.s3, A.q.s3, n, C, qT, 16);
  __m512* lg = reinterpret_cast<__m512*>(p);
  for (int64_t a = 0; a < ks; ++a) {
    const float* kT = kT0 + a * C * Wp + sj;
    for (int64_t c2 = 0; c2 < ks; c2 += 8)
      qk_dispatch(std::min<int64_t>(8, ks - c2), qT, kT + c2, Wp, C,
                  lg + a * ks + c2);
  }
  // with the window start j - ks/2, the bias depends on (a, c2) only
  const float* bias =
      A.rpb + hh * RW * RW + (si - i + ks - 1) * RW + ks - 1 - ks / 2;
  const __m512 sc = _mm512_set1_ps(A.scale);
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t a = 0; a < ks; ++a)
    for (int64_t c2 = 0; c2 < ks; ++c2) {
      __m512& l = lg[a * ks + c2];
      l = _mm512_fmadd_ps(l, sc, _mm512_set1_ps(bias[a * RW + c2]));
      mx = _mm512_max_ps(mx, l);
    }
  __m512 sum = _mm512_setzero_ps();
  for (int64_t m = 0; m < KK; ++m) {
    lg[m] = exp_nonpositive(_mm512_sub_ps(lg[m], mx));
    sum = _mm512_add_ps(sum, lg[m]);
  }
  const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), sum);
  for (int64_t m = 0; m < KK; ++m) lg[m] = _mm512_mul_ps(lg[m], inv);
  if (A.attn) {  // training: the probabilities, in (query, key) order
    float* ap = A.attn + (((b * A.NH + hh) * A.H + i) * A.W + j0) * KK;
    for (int64_t m = 0; m < KK; ++m)
      for (int64_t l = 0; l < n; ++l) ap[l * KK + m] = p[m * 16 + l];
  }
  const float* vrow[kMaxKernel];
  for (int64_t a = 0; a < ks; ++a)
    vrow[a] = A.v.row(b, hh, si + a) + sj * A.v.s3;
  const __mmask16 cm = lane_mask(C - (NV - 1) * 16);
  float* ob = A.out.row(b, hh, i) + j0 * A.out.s3;
  switch (NV) {
    case 1: return pv_block<1>(p, n, vrow, A.v.s3, ks, cm, ob, A.out.s3);
    case 2: return pv_block<2>(p, n, vrow, A.v.s3, ks, cm, ob, A.out.s3);
    case 3: return pv_block<3>(p, n, vrow, A.v.s3, ks, cm, ob, A.out.s3);
    default: return pv_block<4>(p, n, vrow, A.v.s3, ks, cm, ob, A.out.s3);
  }
}

constexpr int64_t kMaxVecChannels = 64;
constexpr int64_t kChunkRows = 8;

// Work item: kChunkRows query rows of one (b, head). Their key rows are
// transposed once; then each block of 16 columns walks down the rows, so
// that all but one of the key rows it reads are still in L1.
void forward_f32_avx512(const NaArgs<float>& A, int64_t B) {
  const int64_t ks = A.ks, W = A.W, H = A.H;
  const int64_t nchunk = (H + kChunkRows - 1) / kChunkRows;
  // interior queries: window start exactly j - ks/2
  const int64_t jlo = ks / 2, jhi = W - ks + ks / 2 + 1;
  at::parallel_for(0, B * A.NH * nchunk, 1, [&](int64_t n0, int64_t e) {
    Scratch S(kChunkRows + ks - 1, ks, A.C, W);
    std::vector<float> logit(ks * ks), acc(A.C), qf(A.C);
    for (int64_t n = n0; n < e; ++n) {
      const int64_t bh = n / nchunk, b = bh / A.NH, hh = bh % A.NH;
      const int64_t i0 = n % nchunk * kChunkRows,
                    i1 = std::min(H, i0 + kChunkRows);
      const int64_t r0 = window_start(i0, ks, H),
                    r1 = window_start(i1 - 1, ks, H) + ks;
      for (int64_t r = r0; r < r1; ++r)
        transpose_key_row(A, b, hh, r, S.key_row(r - r0), S.Wp);
      for (int64_t j0 = jlo; j0 < jhi; j0 += 16)
        for (int64_t i = i0; i < i1; ++i)
          block_f32(A, S.qT, S.p, S.key_row(window_start(i, ks, H) - r0),
                    S.Wp, b, hh, i, j0, std::min<int64_t>(16, jhi - j0));
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = 0; j < W; ++j) {
          if (j == jlo) j = std::max(jlo, jhi);
          if (j >= W) break;
          query_scalar(A, b, hh, i, j, logit.data(), acc.data(), qf.data());
        }
    }
  });
}
#endif  // MMDAT_AVX512

template <typename scalar_t>
NaArgs<scalar_t> make_args(const NaForwardArgs& a) {
  using opmath_t = acc_t<scalar_t>;
  return {View<const scalar_t>(static_cast<const scalar_t*>(a.q), a.qs),
          View<const scalar_t>(static_cast<const scalar_t*>(a.k), a.ks_),
          View<const scalar_t>(static_cast<const scalar_t*>(a.v), a.vs),
          View<scalar_t>(static_cast<scalar_t*>(a.out), a.os),
          static_cast<const opmath_t*>(a.rpb),
          static_cast<scalar_t*>(a.attn),
          a.NH, a.H, a.W, a.C, a.ks,
          static_cast<opmath_t>(a.scale)};
}

// out (and attn, for training) of every query.
void na_forward(const NaForwardArgs& a) {
#if MMDAT_AVX512
  if (a.dtype == Dtype::kFloat && a.C <= kMaxVecChannels &&
      a.ks <= kMaxKernel) {
    forward_f32_avx512(make_args<float>(a), a.B);
    return;
  }
#endif
  MMDAT_DISPATCH(a.dtype, [&] { forward_scalar(make_args<scalar_t>(a), a.B); });
}

// Gradients (dq, dk, dv in the accumulation type; drpb per (b, head)).
void na_backward(const NaBackwardArgs& args) {
  const NaBackwardArgs& a = args;
  const int64_t B = a.B, NH = a.NH, H = a.H, W = a.W, C = a.C, ks = a.ks,
                KK = ks * ks, RW = 2 * ks - 1;
  MMDAT_DISPATCH(args.dtype, [&] {
        using opmath_t = acc_t<scalar_t>;
        const scalar_t* qp = static_cast<const scalar_t*>(a.q);
        const scalar_t* kp = static_cast<const scalar_t*>(a.k);
        const scalar_t* vp = static_cast<const scalar_t*>(a.v);
        const scalar_t* ap = static_cast<const scalar_t*>(a.attn);
        const scalar_t* gp = static_cast<const scalar_t*>(a.grad);
        opmath_t* dqp = static_cast<opmath_t*>(a.dq);
        opmath_t* dkp = static_cast<opmath_t*>(a.dk);
        opmath_t* dvp = static_cast<opmath_t*>(a.dv);
        opmath_t* drp = static_cast<opmath_t*>(a.drpb);
        const opmath_t sc = static_cast<opmath_t>(a.scale);
        // each (b, h) owns its slices of dk, dv and drpb: keys are shared
        // between the windows of neighbouring queries
        at::parallel_for(0, B * NH, 1, [&](int64_t b, int64_t e) {
          std::vector<opmath_t> dl(KK), go(C), qf(C), acc(C);
          for (int64_t bh = b; bh < e; ++bh) {
            opmath_t* dr = drp + bh * RW * RW;
            for (int64_t i = 0; i < H; ++i) {
              const int64_t si = window_start(i, ks, H);
              for (int64_t j = 0; j < W; ++j) {
                const int64_t sj = window_start(j, ks, W);
                const int64_t qi = (bh * H + i) * W + j;
                for (int64_t t = 0; t < C; ++t) {
                  go[t] = gp[qi * C + t];
                  qf[t] = qp[qi * C + t];
                }
                const scalar_t* p = ap + qi * KK;
                opmath_t s = 0;
                for (int64_t a = 0; a < ks; ++a) {
                  for (int64_t c2 = 0; c2 < ks; ++c2) {
                    const int64_t key = (bh * H + si + a) * W + sj + c2;
                    const scalar_t* vv = vp + key * C;
                    opmath_t d = 0;
                    _Pragma("omp simd reduction(+ : d)")
                    for (int64_t t = 0; t < C; ++t) d += go[t] * vv[t];
                    const opmath_t pm = p[a * ks + c2];
                    dl[a * ks + c2] = d;
                    s += pm * d;
                    opmath_t* dvv = dvp + key * C;
                    for (int64_t t = 0; t < C; ++t) dvv[t] += pm * go[t];
                  }
                }
                std::fill(acc.begin(), acc.end(), opmath_t(0));
                for (int64_t a = 0; a < ks; ++a) {
                  for (int64_t c2 = 0; c2 < ks; ++c2) {
                    const int64_t m = a * ks + c2;
                    const opmath_t g = opmath_t(p[m]) * (dl[m] - s);
                    dr[(si + a - i + ks - 1) * RW + sj + c2 - j + ks - 1] += g;
                    const int64_t key = (bh * H + si + a) * W + sj + c2;
                    const scalar_t* kv = kp + key * C;
                    opmath_t* dkv = dkp + key * C;
                    const opmath_t gs = g * sc;
                    for (int64_t t = 0; t < C; ++t) {
                      acc[t] += gs * kv[t];
                      dkv[t] += gs * qf[t];
                    }
                  }
                }
                for (int64_t t = 0; t < C; ++t) dqp[qi * C + t] = acc[t];
              }
            }
          }
        });
      });
}

}  // namespace
