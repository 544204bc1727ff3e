// Fused CPU kernels for 2-D neighborhood attention (natten semantics,
// dilation 1): each query attends to the ks x ks window that slides inward
// at the borders, plus the relative position bias rpb (h, 2ks-1, 2ks-1).
// q, k, v: (B, h, H, W, c) contiguous, H >= ks and W >= ks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

inline int64_t window_start(int64_t i, int64_t ks, int64_t n) {
  return std::min(std::max<int64_t>(i - ks / 2, 0), n - ks);
}

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
           const at::Tensor& rpb, int64_t ks) {
  TORCH_CHECK(q.dim() == 5, "q must be (B, h, H, W, c)");
  TORCH_CHECK(q.sizes() == k.sizes() && q.sizes() == v.sizes(),
              "q, k, v shapes differ");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() &&
                  q.scalar_type() == v.scalar_type(),
              "q, k, v dtypes differ");
  TORCH_CHECK(q.size(2) >= ks && q.size(3) >= ks,
              "map smaller than the kernel: pad it first");
  TORCH_CHECK(rpb.dim() == 3 && rpb.size(0) == q.size(1) &&
                  rpb.size(1) == 2 * ks - 1 && rpb.size(2) == 2 * ks - 1,
              "rpb must be (h, 2ks-1, 2ks-1)");
}

// Returns (out (B, h, H, W, c), attn (B, h, H, W, ks*ks)).
std::tuple<at::Tensor, at::Tensor> na_forward(const at::Tensor& q_in,
                                              const at::Tensor& k_in,
                                              const at::Tensor& v_in,
                                              const at::Tensor& rpb_in,
                                              int64_t ks, double scale) {
  check(q_in, k_in, v_in, rpb_in, ks);
  auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t B = q.size(0), NH = q.size(1), H = q.size(2), W = q.size(3),
                C = q.size(4), KK = ks * ks, RW = 2 * ks - 1;
  auto rpb = rpb_in.to(at::toOpMathType(q.scalar_type())).contiguous();
  auto out = at::empty_like(q);
  auto attn = at::empty({B, NH, H, W, KK}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, q.scalar_type(), "na_forward", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const scalar_t* qp = q.const_data_ptr<scalar_t>();
        const scalar_t* kp = k.const_data_ptr<scalar_t>();
        const scalar_t* vp = v.const_data_ptr<scalar_t>();
        const opmath_t* bp = rpb.const_data_ptr<opmath_t>();
        scalar_t* op = out.mutable_data_ptr<scalar_t>();
        scalar_t* ap = attn.mutable_data_ptr<scalar_t>();
        const opmath_t sc = static_cast<opmath_t>(scale);
        at::parallel_for(0, B * NH * H, 1, [&](int64_t b, int64_t e) {
          std::vector<opmath_t> logit(KK), acc(C), qf(C);
          for (int64_t n = b; n < e; ++n) {
            const int64_t bh = n / H, i = n % H, hh = bh % NH;
            const int64_t si = window_start(i, ks, H);
            for (int64_t j = 0; j < W; ++j) {
              const int64_t sj = window_start(j, ks, W);
              const int64_t qi = (bh * H + i) * W + j;
              for (int64_t t = 0; t < C; ++t) qf[t] = qp[qi * C + t];
              opmath_t mx = -INFINITY;
              for (int64_t a = 0; a < ks; ++a) {
                const opmath_t* brow =
                    bp + (hh * RW + si + a - i + ks - 1) * RW + sj - j + ks - 1;
                for (int64_t c2 = 0; c2 < ks; ++c2) {
                  const scalar_t* kv =
                      kp + ((bh * H + si + a) * W + sj + c2) * C;
                  opmath_t dot = 0;
                  _Pragma("omp simd reduction(+ : dot)")
                  for (int64_t t = 0; t < C; ++t) dot += qf[t] * kv[t];
                  const opmath_t l = dot * sc + brow[c2];
                  logit[a * ks + c2] = l;
                  mx = std::max(mx, l);
                }
              }
              opmath_t sum = 0;
              for (int64_t m = 0; m < KK; ++m) {
                logit[m] = std::exp(logit[m] - mx);
                sum += logit[m];
              }
              const opmath_t inv = opmath_t(1) / sum;
              std::fill(acc.begin(), acc.end(), opmath_t(0));
              for (int64_t a = 0; a < ks; ++a) {
                for (int64_t c2 = 0; c2 < ks; ++c2) {
                  const opmath_t p = logit[a * ks + c2] * inv;
                  ap[qi * KK + a * ks + c2] = p;
                  const scalar_t* vv =
                      vp + ((bh * H + si + a) * W + sj + c2) * C;
                  for (int64_t t = 0; t < C; ++t) acc[t] += p * vv[t];
                }
              }
              for (int64_t t = 0; t < C; ++t) op[qi * C + t] = acc[t];
            }
          }
        });
      });
  return {out, attn};
}

// Returns (dq, dk, dv, drpb).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> na_backward(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& attn_in, int64_t ks,
    double scale) {
  auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  auto attn = attn_in.contiguous();
  auto grad = grad_in.contiguous().to(q.scalar_type());
  const int64_t B = q.size(0), NH = q.size(1), H = q.size(2), W = q.size(3),
                C = q.size(4), KK = ks * ks, RW = 2 * ks - 1;
  TORCH_CHECK(attn.numel() == B * NH * H * W * KK, "attn has the wrong size");
  auto opt = q.options().dtype(at::toOpMathType(q.scalar_type()));
  auto dq = at::empty({B, NH, H, W, C}, opt);
  auto dk = at::zeros({B, NH, H, W, C}, opt);
  auto dv = at::zeros({B, NH, H, W, C}, opt);
  auto drpb = at::zeros({B, NH, RW, RW}, opt);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, q.scalar_type(), "na_backward", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const scalar_t* qp = q.const_data_ptr<scalar_t>();
        const scalar_t* kp = k.const_data_ptr<scalar_t>();
        const scalar_t* vp = v.const_data_ptr<scalar_t>();
        const scalar_t* ap = attn.const_data_ptr<scalar_t>();
        const scalar_t* gp = grad.const_data_ptr<scalar_t>();
        opmath_t* dqp = dq.mutable_data_ptr<opmath_t>();
        opmath_t* dkp = dk.mutable_data_ptr<opmath_t>();
        opmath_t* dvp = dv.mutable_data_ptr<opmath_t>();
        opmath_t* drp = drpb.mutable_data_ptr<opmath_t>();
        const opmath_t sc = static_cast<opmath_t>(scale);
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
  auto dt = q.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt), drpb.sum(0)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmdat, m) {
  m.def(
      "neighborhood_attention(Tensor q, Tensor k, Tensor v, Tensor rpb, "
      "int ks, float scale) -> (Tensor, Tensor)");
  m.def(
      "neighborhood_attention_backward(Tensor grad, Tensor q, Tensor k, "
      "Tensor v, Tensor attn, int ks, float scale) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmdat, CPU, m) {
  m.impl("neighborhood_attention", &na_forward);
  m.impl("neighborhood_attention_backward", &na_backward);
}
