// Fused CPU kernels for the deformable attention's position bias.
//
// The bias of query (i, j) and key k is a bilinear lookup of the bias table
// at row y0[i, k] + fy[i, k] and column x0[j, k] + fx[j, k] (the row part
// depends only on the query row, the column part only on the query column).
// The kernel evaluates it straight from the (small, cache-resident) table
// and writes it in the (queries x keys) layout that
// scaled_dot_product_attention takes as its mask: one pass, nothing but the
// output is written.
//
// table: (g, h, Ty, Tx), Ty, Tx >= 2; y0, fy: (B*g, r, Ns); x0, fx:
// (B*g, W, Ns); out: (B*g, h, r, W, Ns). Batch b uses table group b % g.
//
// Included once per instruction set by kernels_<isa>.cpp, inside
// namespace mmdat::MMDAT_ISA_NS; MMDAT_AVX512 / MMDAT_AVX2 say which
// vector code to compile. Inputs were validated by ops.cpp.

namespace {

// Read-only inputs of both kernels, as typed pointers.
template <typename scalar_t>
struct Inputs {
  const scalar_t* table;
  const int* y0;
  const scalar_t* fy;
  const int* x0;
  const scalar_t* fx;
  explicit Inputs(const BiasArgs& a)
      : table(static_cast<const scalar_t*>(a.table)),
        y0(a.y0),
        fy(static_cast<const scalar_t*>(a.fy)),
        x0(a.x0),
        fx(static_cast<const scalar_t*>(a.fx)) {}
};

// Column interpolation of the two table rows at flat offset `off` (row
// stride tx). Offsets are 32-bit and indexed from one base pointer so that
// the compiler vectorises the key loops with gathers.
template <typename opmath_t, typename scalar_t>
inline void lerp_rows(const scalar_t* T, int off, int tx, opmath_t fx,
                      opmath_t& top, opmath_t& bot) {
  const opmath_t t00 = T[off], t01 = T[off + 1], t10 = T[off + tx],
                 t11 = T[off + tx + 1];
  top = t00 + fx * (t01 - t00);
  bot = t10 + fx * (t11 - t10);
}

// One output row: the bias of one query against keys 0..Ns-1.
template <typename scalar_t>
inline void bias_row(const scalar_t* T, const int* yi, const scalar_t* wy,
                     const int* xi, const scalar_t* wx, int tx, int64_t Ns,
                     scalar_t* o) {
  using opmath_t = acc_t<scalar_t>;
  for (int64_t k = 0; k < Ns; ++k) {
    const opmath_t fxk = wx[k], fyk = wy[k];
    opmath_t top, bot;
    lerp_rows(T, yi[k] * tx + xi[k], tx, fxk, top, bot);
    o[k] = top + fyk * (bot - top);
  }
}

#if MMDAT_AVX512
// T[off[l]] and T[off[l] + 1] for 16 lanes: the two neighbours are fetched
// as one 64-bit element (8-lane gathers cost about half of 16-lane ones),
// then split into even and odd floats.
inline void gather_pairs(const float* T, __m512i off, __m512& left,
                         __m512& right) {
  const __m512 lo = _mm512_castpd_ps(
      _mm512_i32gather_pd(_mm512_castsi512_si256(off), T, 4));
  const __m512 hi = _mm512_castpd_ps(
      _mm512_i32gather_pd(_mm512_extracti64x4_epi64(off, 1), T, 4));
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14,
                                        12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15,
                                       13, 11, 9, 7, 5, 3, 1);
  left = _mm512_permutex2var_ps(lo, even, hi);
  right = _mm512_permutex2var_ps(lo, odd, hi);
}
#endif

#if MMDAT_AVX512 || MMDAT_AVX2
// float32: the table corners are fetched with gather instructions (the
// compiler does not vectorise the scalar loop by itself).
template <>
inline void bias_row<float>(const float* T, const int* yi, const float* wy,
                            const int* xi, const float* wx, int tx,
                            int64_t Ns, float* o) {
  int64_t k = 0;
#if MMDAT_AVX512
  const __m512i vtx = _mm512_set1_epi32(tx);
  for (; k + 16 <= Ns; k += 16) {
    const __m512i off = _mm512_add_epi32(
        _mm512_mullo_epi32(_mm512_loadu_si512(yi + k), vtx),
        _mm512_loadu_si512(xi + k));
    const __m512i off_b = _mm512_add_epi32(off, vtx);
    const __m512 fx = _mm512_loadu_ps(wx + k), fy = _mm512_loadu_ps(wy + k);
    __m512 t00, t01, t10, t11;
    gather_pairs(T, off, t00, t01);
    gather_pairs(T, off_b, t10, t11);
    const __m512 top = _mm512_fmadd_ps(fx, _mm512_sub_ps(t01, t00), t00);
    const __m512 bot = _mm512_fmadd_ps(fx, _mm512_sub_ps(t11, t10), t10);
    _mm512_storeu_ps(o + k,
                     _mm512_fmadd_ps(fy, _mm512_sub_ps(bot, top), top));
  }
#else
  const __m256i vtx = _mm256_set1_epi32(tx);
  for (; k + 8 <= Ns; k += 8) {
    const __m256i off = _mm256_add_epi32(
        _mm256_mullo_epi32(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(yi + k)),
            vtx),
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xi + k)));
    const __m256i off_b = _mm256_add_epi32(off, vtx);
    const __m256 fx = _mm256_loadu_ps(wx + k), fy = _mm256_loadu_ps(wy + k);
    const __m256 t00 = _mm256_i32gather_ps(T, off, 4);
    const __m256 t01 = _mm256_i32gather_ps(T + 1, off, 4);
    const __m256 t10 = _mm256_i32gather_ps(T, off_b, 4);
    const __m256 t11 = _mm256_i32gather_ps(T + 1, off_b, 4);
    const __m256 top = _mm256_fmadd_ps(fx, _mm256_sub_ps(t01, t00), t00);
    const __m256 bot = _mm256_fmadd_ps(fx, _mm256_sub_ps(t11, t10), t10);
    _mm256_storeu_ps(o + k,
                     _mm256_fmadd_ps(fy, _mm256_sub_ps(bot, top), top));
  }
#endif
  for (; k < Ns; ++k) {
    float top, bot;
    lerp_rows(T, yi[k] * tx + xi[k], tx, wx[k], top, bot);
    o[k] = top + wy[k] * (bot - top);
  }
}
#endif

// out: (Bg, h, R, W, Ns) contiguous, of the table's dtype.
void deform_bias(const BiasArgs& d, void* out) {
  MMDAT_DISPATCH(d.dtype, [&] {
    const Inputs<scalar_t> in(d);
    scalar_t* op = static_cast<scalar_t*>(out);
    const int tx = static_cast<int>(d.Tx);
    at::parallel_for(
        0, d.Bg * d.H * d.R * d.W, 1, [&](int64_t beg, int64_t end) {
          for (int64_t n = beg; n < end; ++n) {
            const int64_t j = n % d.W, i = (n / d.W) % d.R,
                          h = (n / (d.W * d.R)) % d.H,
                          b = n / (d.W * d.R * d.H);
            const scalar_t* T = in.table + ((b % d.G) * d.H + h) * d.Ty * d.Tx;
            const int* yi = in.y0 + (b * d.R + i) * d.Ns;
            const scalar_t* wy = in.fy + (b * d.R + i) * d.Ns;
            const int* xi = in.x0 + (b * d.W + j) * d.Ns;
            const scalar_t* wx = in.fx + (b * d.W + j) * d.Ns;
            bias_row(T, yi, wy, xi, wx, tx, d.Ns, op + n * d.Ns);
          }
        });
  });
}

// Gradients with respect to the table (per (batch, query row): summed by
// the caller), fy and fx, in the accumulation type.
void deform_bias_backward(const BiasArgs& d, const void* grad, void* gtable,
                          void* gfy_out, void* gfx_out) {
  MMDAT_DISPATCH(d.dtype, [&] {
    using opmath_t = acc_t<scalar_t>;
    const Inputs<scalar_t> in(d);
    const scalar_t* gp = static_cast<const scalar_t*>(grad);
    opmath_t* gtp = static_cast<opmath_t*>(gtable);
    opmath_t* gyp = static_cast<opmath_t*>(gfy_out);
    opmath_t* gxp = static_cast<opmath_t*>(gfx_out);
    const int tx = static_cast<int>(d.Tx);
    const int64_t TT = d.Ty * d.Tx;
    // table and fy: each (b, i) owns its slices
    at::parallel_for(0, d.Bg * d.R, 1, [&](int64_t beg, int64_t end) {
      for (int64_t bi = beg; bi < end; ++bi) {
        const int64_t b = bi / d.R;
        const int* yi = in.y0 + bi * d.Ns;
        const scalar_t* wy = in.fy + bi * d.Ns;
        opmath_t* gfy = gyp + bi * d.Ns;
        for (int64_t h = 0; h < d.H; ++h) {
          const scalar_t* T = in.table + ((b % d.G) * d.H + h) * TT;
          opmath_t* GT = gtp + (bi * d.H + h) * TT;
          for (int64_t j = 0; j < d.W; ++j) {
            const int* xi = in.x0 + (b * d.W + j) * d.Ns;
            const scalar_t* wx = in.fx + (b * d.W + j) * d.Ns;
            const scalar_t* go =
                gp + ((((b * d.H + h) * d.R + bi % d.R) * d.W) + j) * d.Ns;
            for (int64_t k = 0; k < d.Ns; ++k) {
              const int off = yi[k] * tx + xi[k];
              const opmath_t g = go[k], fxk = wx[k], fyk = wy[k];
              opmath_t top, bot;
              lerp_rows(T, off, tx, fxk, top, bot);
              gfy[k] += g * (bot - top);
              const opmath_t gt = g - g * fyk, gb = g * fyk;
              opmath_t* G = GT + off;
              G[0] += gt - gt * fxk;
              G[1] += gt * fxk;
              G[tx] += gb - gb * fxk;
              G[tx + 1] += gb * fxk;
            }
          }
        }
      }
    });
    // fx: each (b, j) owns its row
    at::parallel_for(0, d.Bg * d.W, 1, [&](int64_t beg, int64_t end) {
      for (int64_t bj = beg; bj < end; ++bj) {
        const int64_t b = bj / d.W, j = bj % d.W;
        const int* xi = in.x0 + bj * d.Ns;
        const scalar_t* wy0 = in.fy + b * d.R * d.Ns;
        opmath_t* gfx = gxp + bj * d.Ns;
        for (int64_t h = 0; h < d.H; ++h) {
          const scalar_t* T = in.table + ((b % d.G) * d.H + h) * TT;
          for (int64_t i = 0; i < d.R; ++i) {
            const int* yi = in.y0 + (b * d.R + i) * d.Ns;
            const scalar_t* wy = wy0 + i * d.Ns;
            const scalar_t* go =
                gp + (((b * d.H + h) * d.R + i) * d.W + j) * d.Ns;
            for (int64_t k = 0; k < d.Ns; ++k) {
              const int off = yi[k] * tx + xi[k];
              const opmath_t fyk = wy[k];
              const opmath_t dtop = opmath_t(T[off + 1]) - opmath_t(T[off]);
              const opmath_t dbot =
                  opmath_t(T[off + tx + 1]) - opmath_t(T[off + tx]);
              gfx[k] += opmath_t(go[k]) * (dtop + fyk * (dbot - dtop));
            }
          }
        }
      }
    });
  });
}

// ---------------------------------------------------------------------------
// The whole deformable attention for inference, float32 with AVX-512: per
// tile of up to kTileQ queries of one query row and one head, the bias is
// written straight into the score tile, q.k added, then the softmax and the
// weighted sum of the values, all while the tile is in cache. Nothing of
// size (queries x keys) goes to memory, and there is no mask for
// scaled_dot_product_attention to read back.
//
// q: (B, h, M, c), any strides but a contiguous last dim; out: (B, M, h, c)
// (the channels-last layout of the maps); kt: (B*h, c, Ns); v: (B*h, Ns, c);
// c % 16 == 0; bias inputs as above, with r = H.

#if MMDAT_AVX512
constexpr int64_t kTileQ = 32;

inline __mmask16 tail_mask(int64_t s0, int64_t Ns) {
  return s0 + 16 <= Ns ? __mmask16(0xFFFF)
                       : __mmask16((1u << (Ns - s0)) - 1);
}

// S[r][s0:s0+16] += sum_t qs[r][t] * kt[t][s0:s0+16] for NR rows.
template <int NR>
inline void add_scores(const float* qs, int64_t c, const float* kt,
                       int64_t Ns, int64_t s0, __mmask16 m, float* S,
                       int64_t ldS) {
  __m512 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm512_loadu_ps(S + r * ldS + s0);
  for (int64_t t = 0; t < c; ++t) {
    const __m512 kv = _mm512_maskz_loadu_ps(m, kt + t * Ns + s0);
    for (int r = 0; r < NR; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(qs[r * c + t]), kv, acc[r]);
  }
  for (int r = 0; r < NR; ++r) _mm512_storeu_ps(S + r * ldS + s0, acc[r]);
}

// o[r][t0:t0+16] = inv[r] * sum_s P[r][s] * v[s][t0:t0+16] for NR rows.
template <int NR>
inline void weighted_values(const float* P, int64_t ldS, const float* v,
                            int64_t Ns, int64_t c, int64_t t0,
                            const float* inv, float* const* o) {
  __m512 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t s = 0; s < Ns; ++s) {
    const __m512 vv = _mm512_loadu_ps(v + s * c + t0);
    for (int r = 0; r < NR; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(P[r * ldS + s]), vv, acc[r]);
  }
  for (int r = 0; r < NR; ++r)
    _mm512_storeu_ps(o[r] + t0, _mm512_mul_ps(acc[r], _mm512_set1_ps(inv[r])));
}

// Softmax numerators of one score row in place (tail zeroed); returns
// 1 / their sum.
inline float exp_row(float* Sr, int64_t Ns) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t s0 = 0; s0 < Ns; s0 += 16)
    mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY),
                                                tail_mask(s0, Ns), Sr + s0));
  const __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t s0 = 0; s0 < Ns; s0 += 16) {
    const __m512 e = _mm512_maskz_mov_ps(
        tail_mask(s0, Ns),
        exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(Sr + s0), vmax)));
    _mm512_storeu_ps(Sr + s0, e);
    sum = _mm512_add_ps(sum, e);
  }
  return 1.f / _mm512_reduce_add_ps(sum);
}

void deform_attention_infer(const DeformInferArgs& a) {
  const BiasArgs& d = a.bias;
  const int64_t B = a.B, NH = a.NH, M = a.M, c = a.c, H = d.R, W = d.W,
                Ns = d.Ns;
  const int64_t hg = d.H, G = d.G;
  const int64_t qsB = a.qsB, qsH = a.qsH, qsM = a.qsM;
  const Inputs<float> in(d);
  const float* qp = a.q;
  const float* ktp = a.kt;
  const float* vp = a.v;
  float* op = a.out;
  const int tx = static_cast<int>(d.Tx);
  const int64_t TT = d.Ty * d.Tx, ldS = (Ns + 15) / 16 * 16;
  const int64_t tiles_per_row = (W + kTileQ - 1) / kTileQ;
  const float sc = a.scale;
  at::parallel_for(
      0, B * NH * H * tiles_per_row, 1, [&](int64_t beg, int64_t end) {
        std::vector<float> S(kTileQ * ldS), qs(kTileQ * c), inv(kTileQ);
        float* orow[kTileQ];
        for (int64_t u = beg; u < end; ++u) {
          const int64_t j0 = (u % tiles_per_row) * kTileQ;
          const int64_t i = (u / tiles_per_row) % H;
          const int64_t n = u / (tiles_per_row * H);  // b * h + head
          const int64_t b = n / NH, hh = n % NH, bg = b * G + hh / hg;
          const int64_t nq = std::min(kTileQ, W - j0);
          const float* T = in.table + hh * TT;
          for (int64_t r = 0; r < nq; ++r) {
            const int64_t j = j0 + r, m = i * W + j;
            bias_row(T, in.y0 + (bg * H + i) * Ns, in.fy + (bg * H + i) * Ns,
                     in.x0 + (bg * W + j) * Ns, in.fx + (bg * W + j) * Ns,
                     tx, Ns, S.data() + r * ldS);
            const float* qr = qp + b * qsB + hh * qsH + m * qsM;
            for (int64_t t = 0; t < c; ++t) qs[r * c + t] = qr[t] * sc;
            orow[r] = op + ((b * M + m) * NH + hh) * c;
          }
          const float* ktn = ktp + n * c * Ns;
          for (int64_t s0 = 0; s0 < Ns; s0 += 16) {
            const __mmask16 mk = tail_mask(s0, Ns);
            int64_t r = 0;
            for (; r + 8 <= nq; r += 8)
              add_scores<8>(qs.data() + r * c, c, ktn, Ns, s0, mk,
                            S.data() + r * ldS, ldS);
            for (; r < nq; ++r)
              add_scores<1>(qs.data() + r * c, c, ktn, Ns, s0, mk,
                            S.data() + r * ldS, ldS);
          }
          for (int64_t r = 0; r < nq; ++r)
            inv[r] = exp_row(S.data() + r * ldS, Ns);
          const float* vn = vp + n * Ns * c;
          for (int64_t t0 = 0; t0 < c; t0 += 16) {
            int64_t r = 0;
            for (; r + 8 <= nq; r += 8)
              weighted_values<8>(S.data() + r * ldS, ldS, vn, Ns, c, t0,
                                 inv.data() + r, orow + r);
            for (; r < nq; ++r)
              weighted_values<1>(S.data() + r * ldS, ldS, vn, Ns, c, t0,
                                 inv.data() + r, orow + r);
          }
        }
      });
}

// acc[s][:] += sum_r A[r][s] * rows[r][:] for all keys s (nq rows of A).
inline void accumulate_keys(const float* A, int64_t ldS, int64_t nq,
                            const float* rows, int64_t c, float* acc,
                            int64_t Ns) {
  for (int64_t s = 0; s < Ns; ++s) {
    float* as = acc + s * c;
    for (int64_t t0 = 0; t0 < c; t0 += 16) {
      __m512 a = _mm512_loadu_ps(as + t0);
      for (int64_t r = 0; r < nq; ++r)
        a = _mm512_fmadd_ps(_mm512_set1_ps(A[r * ldS + s]),
                            _mm512_loadu_ps(rows + r * c + t0), a);
      _mm512_storeu_ps(as + t0, a);
    }
  }
}

// Gradients of one query's bias row: dS[s] into the table (gt), fy (gfy)
// and fx (gfx) of that row / column, all owned by the calling thread.
inline void bias_row_backward(const float* T, const int* yi, const float* wy,
                              const int* xi, const float* wx, int tx,
                              int64_t Ns, const float* dS, float* gt,
                              float* gfy, float* gfx) {
  int64_t k = 0;
  // 16 keys at a time: fy/fx gradients and the four corner weights in
  // vectors; the table scatter stays scalar (keys may share a cell)
  alignas(64) int off16[16];
  alignas(64) float w[4][16];
  const __m512i vtx = _mm512_set1_epi32(tx);
  for (; k + 16 <= Ns; k += 16) {
    const __m512i off = _mm512_add_epi32(
        _mm512_mullo_epi32(_mm512_loadu_si512(yi + k), vtx),
        _mm512_loadu_si512(xi + k));
    __m512 t00, t01, t10, t11;
    gather_pairs(T, off, t00, t01);
    gather_pairs(T, _mm512_add_epi32(off, vtx), t10, t11);
    const __m512 g = _mm512_loadu_ps(dS + k), fxk = _mm512_loadu_ps(wx + k),
                 fyk = _mm512_loadu_ps(wy + k);
    const __m512 dtop = _mm512_sub_ps(t01, t00), dbot = _mm512_sub_ps(t11, t10);
    const __m512 top = _mm512_fmadd_ps(fxk, dtop, t00);
    const __m512 bot = _mm512_fmadd_ps(fxk, dbot, t10);
    _mm512_storeu_ps(gfy + k, _mm512_fmadd_ps(g, _mm512_sub_ps(bot, top),
                                              _mm512_loadu_ps(gfy + k)));
    _mm512_storeu_ps(
        gfx + k,
        _mm512_fmadd_ps(
            g, _mm512_fmadd_ps(fyk, _mm512_sub_ps(dbot, dtop), dtop),
            _mm512_loadu_ps(gfx + k)));
    const __m512 gb = _mm512_mul_ps(g, fyk), gt_ = _mm512_sub_ps(g, gb);
    _mm512_store_ps(w[1], _mm512_mul_ps(gt_, fxk));
    _mm512_store_ps(w[0], _mm512_sub_ps(gt_, _mm512_load_ps(w[1])));
    _mm512_store_ps(w[3], _mm512_mul_ps(gb, fxk));
    _mm512_store_ps(w[2], _mm512_sub_ps(gb, _mm512_load_ps(w[3])));
    _mm512_store_si512(off16, off);
    for (int l = 0; l < 16; ++l) {
      float* G = gt + off16[l];
      G[0] += w[0][l];
      G[1] += w[1][l];
      G[tx] += w[2][l];
      G[tx + 1] += w[3][l];
    }
  }
  for (; k < Ns; ++k) {
    const int off = yi[k] * tx + xi[k];
    const float g = dS[k], fxk = wx[k], fyk = wy[k];
    float top, bot;
    lerp_rows(T, off, tx, fxk, top, bot);
    gfy[k] += g * (bot - top);
    const float dtop = T[off + 1] - T[off];
    const float dbot = T[off + tx + 1] - T[off + tx];
    gfx[k] += g * (dtop + fyk * (dbot - dtop));
    const float gt_ = g - g * fyk, gb = g * fyk;
    gt[off] += gt_ - gt_ * fxk;
    gt[off + 1] += gt_ * fxk;
    gt[off + tx] += gb - gb * fxk;
    gt[off + tx + 1] += gb * fxk;
  }
}

// Backward of deform_attention_infer, same tiling: each (b, head) is one
// task, so the key, value, table, fy and fx gradients of a task are owned by
// one thread. Returns grad_q (B*h, M, c), grad_k, grad_v (B*h, Ns, c), and
// per (b, head): grad_table (B*h, Ty, Tx), grad_fy (B*h, H, Ns), grad_fx
// (B*h, W, Ns), which the caller sums over the batch / the group's heads.
void deform_attention_backward(const DeformBackwardArgs& a) {
  const BiasArgs& d = a.bias;
  const int64_t B = a.B, NH = a.NH, M = a.M, c = a.c, H = d.R, W = d.W,
                Ns = d.Ns;
  const int64_t hg = d.H, G = d.G, Bh = B * NH;
  const Inputs<float> in(d);
  const float* qp = a.q;
  const float* kp = a.k;
  const float* ktp = a.kt;
  const float* vtp = a.vt;
  const float* op = a.out;
  const float* gp = a.grad;
  float* dqp = a.dq;
  float* dkp = a.dk;
  float* dvp = a.dv;
  float* dtp = a.dtab;
  float* dfyp = a.dfy;
  float* dfxp = a.dfx;
  const int tx = static_cast<int>(d.Tx);
  const int64_t TT = d.Ty * d.Tx, ldS = (Ns + 15) / 16 * 16;
  const float sc = a.scale;
  at::parallel_for(0, Bh, 1, [&](int64_t beg, int64_t end) {
    std::vector<float> P(kTileQ * ldS), D(kTileQ * ldS), qs(kTileQ * c),
        gos(kTileQ * c), inv(kTileQ), scales(kTileQ, sc), delta(kTileQ);
    float* dqrow[kTileQ];
    for (int64_t n = beg; n < end; ++n) {
      const int64_t b = n / NH, hh = n % NH, bg = b * G + hh / hg;
      const float* T = in.table + hh * TT;
      const float *ktn = ktp + n * c * Ns, *vtn = vtp + n * c * Ns,
                  *kn = kp + n * Ns * c;
      for (int64_t i = 0; i < H; ++i) {
        for (int64_t j0 = 0; j0 < W; j0 += kTileQ) {
          const int64_t nq = std::min(kTileQ, W - j0);
          for (int64_t r = 0; r < nq; ++r) {
            const int64_t j = j0 + r, m = i * W + j;
            bias_row(T, in.y0 + (bg * H + i) * Ns, in.fy + (bg * H + i) * Ns,
                     in.x0 + (bg * W + j) * Ns, in.fx + (bg * W + j) * Ns, tx,
                     Ns, P.data() + r * ldS);
            std::fill(D.begin() + r * ldS, D.begin() + (r + 1) * ldS, 0.f);
            const float* qr = qp + (n * M + m) * c;
            const float* gr = gp + ((b * M + m) * NH + hh) * c;
            const float* orr = op + ((b * M + m) * NH + hh) * c;
            float dl = 0.f;
            for (int64_t t = 0; t < c; ++t) {
              qs[r * c + t] = qr[t] * sc;
              gos[r * c + t] = gr[t];
              dl += gr[t] * orr[t];
            }
            delta[r] = dl;
            dqrow[r] = dqp + (n * M + m) * c;
          }
          // P = softmax(bias + scale q.k); D = dO.v
          for (int64_t s0 = 0; s0 < Ns; s0 += 16) {
            const __mmask16 mk = tail_mask(s0, Ns);
            int64_t r = 0;
            for (; r + 8 <= nq; r += 8) {
              add_scores<8>(qs.data() + r * c, c, ktn, Ns, s0, mk,
                            P.data() + r * ldS, ldS);
              add_scores<8>(gos.data() + r * c, c, vtn, Ns, s0, mk,
                            D.data() + r * ldS, ldS);
            }
            for (; r < nq; ++r) {
              add_scores<1>(qs.data() + r * c, c, ktn, Ns, s0, mk,
                            P.data() + r * ldS, ldS);
              add_scores<1>(gos.data() + r * c, c, vtn, Ns, s0, mk,
                            D.data() + r * ldS, ldS);
            }
          }
          // dS = P * (D - delta), in D
          for (int64_t r = 0; r < nq; ++r) {
            float* Pr = P.data() + r * ldS;
            float* Dr = D.data() + r * ldS;
            const __m512 w = _mm512_set1_ps(exp_row(Pr, Ns));
            const __m512 dlt = _mm512_set1_ps(delta[r]);
            for (int64_t s0 = 0; s0 < ldS; s0 += 16) {
              const __m512 p = _mm512_mul_ps(_mm512_loadu_ps(Pr + s0), w);
              _mm512_storeu_ps(Pr + s0, p);
              _mm512_storeu_ps(
                  Dr + s0,
                  _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(Dr + s0),
                                                 dlt)));
            }
          }
          // dq = scale dS.k; dk += dS^T (scale q); dv += P^T dO
          for (int64_t t0 = 0; t0 < c; t0 += 16) {
            int64_t r = 0;
            for (; r + 8 <= nq; r += 8)
              weighted_values<8>(D.data() + r * ldS, ldS, kn, Ns, c, t0,
                                 scales.data(), dqrow + r);
            for (; r < nq; ++r)
              weighted_values<1>(D.data() + r * ldS, ldS, kn, Ns, c, t0,
                                 scales.data(), dqrow + r);
          }
          accumulate_keys(D.data(), ldS, nq, qs.data(), c, dkp + n * Ns * c,
                          Ns);
          accumulate_keys(P.data(), ldS, nq, gos.data(), c,
                          dvp + n * Ns * c, Ns);
          for (int64_t r = 0; r < nq; ++r) {
            const int64_t j = j0 + r;
            bias_row_backward(
                T, in.y0 + (bg * H + i) * Ns, in.fy + (bg * H + i) * Ns,
                in.x0 + (bg * W + j) * Ns, in.fx + (bg * W + j) * Ns, tx, Ns,
                D.data() + r * ldS, dtp + n * TT, dfyp + (n * H + i) * Ns,
                dfxp + (n * W + j) * Ns);
          }
        }
      }
    }
  });
}
#endif

}  // namespace
