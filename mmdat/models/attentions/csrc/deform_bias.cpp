// Fused CPU kernels for the deformable attention's position bias.
//
// The bias of query (i, j) and key k is a bilinear lookup of the bias table.
// Its row part is done beforehand (``rows``: the table row interpolated at
// every (query row i, key k)); these kernels do the column part: a 2-tap
// interpolation of rows[.., i, k, :] at column x0[j, k] + fx[j, k], written
// in the (queries x keys) layout that scaled_dot_product_attention takes as
// its mask. One pass, nothing but the output is written.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace {

void check_inputs(const at::Tensor& rows, const at::Tensor& x0,
                  const at::Tensor& fx) {
  TORCH_CHECK(rows.dim() == 5, "rows must be (G, h, r, Ns, Tx)");
  TORCH_CHECK(x0.dim() == 3 && fx.dim() == 3, "x0/fx must be (G, W, Ns)");
  TORCH_CHECK(x0.scalar_type() == at::kInt, "x0 must be int32");
  TORCH_CHECK(rows.size(0) == x0.size(0) && rows.size(3) == x0.size(2),
              "rows and x0 disagree on groups/keys");
  TORCH_CHECK(x0.sizes() == fx.sizes(), "x0 and fx shapes differ");
  TORCH_CHECK(fx.scalar_type() == rows.scalar_type(),
              "fx and rows dtypes differ");
  TORCH_CHECK(rows.size(4) >= 2, "table must be at least 2 wide");
}

// out[g, h, i, j, k] = lerp(R[k, x0], R[k, x0 + 1], fx[g, j, k]),
// R = rows[g, h, i]
at::Tensor deform_bias_forward(const at::Tensor& rows_in,
                               const at::Tensor& x0_in,
                               const at::Tensor& fx_in) {
  check_inputs(rows_in, x0_in, fx_in);
  auto rows = rows_in.contiguous();
  auto x0 = x0_in.contiguous();
  auto fx = fx_in.contiguous();
  const int64_t G = rows.size(0), H = rows.size(1), R = rows.size(2),
                Ns = rows.size(3), Tx = rows.size(4), W = x0.size(1);
  auto out = at::empty({G, H, R, W, Ns}, rows.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, rows.scalar_type(), "deform_bias_forward",
      [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const scalar_t* rp = rows.const_data_ptr<scalar_t>();
        const int* xp = x0.const_data_ptr<int>();
        const scalar_t* fp = fx.const_data_ptr<scalar_t>();
        scalar_t* op = out.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, G * H * R * W, 1, [&](int64_t b, int64_t e) {
          for (int64_t n = b; n < e; ++n) {
            const int64_t j = n % W, ghi = n / W, g = ghi / (H * R);
            const scalar_t* row = rp + ghi * Ns * Tx;
            const int* xi = xp + (g * W + j) * Ns;
            const scalar_t* f = fp + (g * W + j) * Ns;
            scalar_t* o = op + n * Ns;
            for (int64_t k = 0; k < Ns; ++k) {
              const scalar_t* t = row + k * Tx + xi[k];
              const opmath_t a = t[0];
              o[k] = a + static_cast<opmath_t>(f[k]) * (opmath_t(t[1]) - a);
            }
          }
        });
      });
  return out;
}

// Gradients of deform_bias_forward with respect to rows and fx.
std::tuple<at::Tensor, at::Tensor> deform_bias_backward(
    const at::Tensor& grad_in, const at::Tensor& rows_in,
    const at::Tensor& x0_in, const at::Tensor& fx_in) {
  check_inputs(rows_in, x0_in, fx_in);
  auto rows = rows_in.contiguous();
  auto x0 = x0_in.contiguous();
  auto fx = fx_in.contiguous();
  auto grad = grad_in.contiguous().to(rows.scalar_type());
  const int64_t G = rows.size(0), H = rows.size(1), R = rows.size(2),
                Ns = rows.size(3), Tx = rows.size(4), W = x0.size(1);
  TORCH_CHECK(grad.numel() == G * H * R * W * Ns, "grad has the wrong size");
  auto opt = rows.options().dtype(at::toOpMathType(rows.scalar_type()));
  auto grad_rows = at::zeros({G, H, R, Ns, Tx}, opt);
  auto grad_fx = at::zeros({G, W, Ns}, opt);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, rows.scalar_type(), "deform_bias_backward",
      [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const scalar_t* rp = rows.const_data_ptr<scalar_t>();
        const int* xp = x0.const_data_ptr<int>();
        const scalar_t* fp = fx.const_data_ptr<scalar_t>();
        const scalar_t* gp = grad.const_data_ptr<scalar_t>();
        opmath_t* grp = grad_rows.mutable_data_ptr<opmath_t>();
        opmath_t* gfp = grad_fx.mutable_data_ptr<opmath_t>();
        // each (g, h, i) owns its slice of grad_rows: no races
        at::parallel_for(0, G * H * R, 1, [&](int64_t b, int64_t e) {
          for (int64_t ghi = b; ghi < e; ++ghi) {
            const int64_t g = ghi / (H * R);
            opmath_t* gr = grp + ghi * Ns * Tx;
            for (int64_t j = 0; j < W; ++j) {
              const scalar_t* go = gp + (ghi * W + j) * Ns;
              const int* xi = xp + (g * W + j) * Ns;
              const scalar_t* f = fp + (g * W + j) * Ns;
              for (int64_t k = 0; k < Ns; ++k) {
                opmath_t* t = gr + k * Tx + xi[k];
                const opmath_t gk = go[k], w = f[k];
                t[0] += gk - gk * w;
                t[1] += gk * w;
              }
            }
          }
        });
        // each (g, j) owns its row of grad_fx
        at::parallel_for(0, G * W, 1, [&](int64_t b, int64_t e) {
          for (int64_t gj = b; gj < e; ++gj) {
            const int64_t g = gj / W, j = gj % W;
            const int* xi = xp + gj * Ns;
            opmath_t* gf = gfp + gj * Ns;
            for (int64_t hi = 0; hi < H * R; ++hi) {
              const int64_t ghi = g * H * R + hi;
              const scalar_t* row = rp + ghi * Ns * Tx;
              const scalar_t* go = gp + (ghi * W + j) * Ns;
              for (int64_t k = 0; k < Ns; ++k) {
                const scalar_t* t = row + k * Tx + xi[k];
                gf[k] += opmath_t(go[k]) * (opmath_t(t[1]) - opmath_t(t[0]));
              }
            }
          }
        });
      });
  return {grad_rows.to(rows.scalar_type()), grad_fx.to(rows.scalar_type())};
}

}  // namespace

TORCH_LIBRARY(mmdat, m) {
  m.def("deform_bias(Tensor rows, Tensor x0, Tensor fx) -> Tensor");
  m.def(
      "deform_bias_backward(Tensor grad, Tensor rows, Tensor x0, Tensor fx)"
      " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmdat, CPU, m) {
  m.impl("deform_bias", &deform_bias_forward);
  m.impl("deform_bias_backward", &deform_bias_backward);
}
