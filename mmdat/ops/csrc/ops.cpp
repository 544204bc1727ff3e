// The op entry points: every tensor is checked here (device, dtype, rank,
// sizes, index ranges, aliasing of the output) before a pointer is handed to
// a kernel, then the kernels of the best instruction set this CPU has are
// called (chosen once at run time; MMDAT_ISA=avx2|scalar caps the choice,
// mmdat_set_isa switches it, for tests). The ops are registered once.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <string>

#include "kernels.h"

namespace mmdat {
namespace {

// ---------------------------------------------------------------- ISA choice

struct Isa {
  const char* name;
  const Kernels* (*kernels)();
  bool (*supported)();
};

bool always() { return true; }

#if MMDAT_X86 && defined(__GNUC__)
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
}
bool has_avx512() {
  __builtin_cpu_init();
  return has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
}
#endif

// Best first.
const Isa kIsas[] = {
#if MMDAT_X86 && defined(__GNUC__)
    {"avx512", &kernels_avx512, &has_avx512},
    {"avx2", &kernels_avx2, &has_avx2},
#endif
    {"scalar", &kernels_scalar, &always},
};
constexpr int kNumIsas = sizeof(kIsas) / sizeof(kIsas[0]);

int find_isa(const char* name) {
  for (int i = 0; i < kNumIsas; ++i)
    if (std::string(kIsas[i].name) == name) return i;
  return -1;
}

// The best supported instruction set at or below MMDAT_ISA (if set).
const Kernels* default_kernels() {
  int first = 0;
  const char* cap = std::getenv("MMDAT_ISA");
  if (cap != nullptr && *cap != '\0' && std::string(cap) != "auto") {
    const int i = find_isa(cap);
    if (i >= 0) first = i;
  }
  for (int i = first; i < kNumIsas; ++i)
    if (kIsas[i].supported()) return kIsas[i].kernels();
  return kernels_scalar();
}

std::atomic<const Kernels*> g_kernels{nullptr};

const Kernels& kernels() {
  const Kernels* k = g_kernels.load(std::memory_order_acquire);
  if (k == nullptr) {
    k = default_kernels();
    g_kernels.store(k, std::memory_order_release);
  }
  return *k;
}

// ---------------------------------------------------------------- checks

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " is an undefined tensor");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got one on ",
              t.device());
}

Dtype float_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::kFloat;
    case at::kDouble: return Dtype::kDouble;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kHalf: return Dtype::kHalf;
    default:
      TORCH_CHECK(false, name, " must be float32, float64, bfloat16 or "
                  "float16, got ", t.scalar_type());
  }
  return Dtype::kFloat;  // not reached
}

// [first, last) byte addresses a tensor can touch (strides are >= 0).
std::pair<uintptr_t, uintptr_t> extent(const at::Tensor& t) {
  const auto base = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  int64_t span = 1;
  for (int64_t d = 0; d < t.dim(); ++d) span += (t.size(d) - 1) * t.stride(d);
  return {base, base + static_cast<uintptr_t>(span) * t.element_size()};
}

// Written tensors must not share memory with what the kernel reads (the
// indices are checked once, before the kernel runs).
void check_no_overlap(const at::Tensor& out, const at::Tensor& in,
                      const char* out_name, const char* in_name) {
  if (out.numel() == 0 || in.numel() == 0) return;
  const auto a = extent(out), b = extent(in);
  TORCH_CHECK(a.second <= b.first || b.second <= a.first, out_name,
              " overlaps ", in_name, " in memory; pass a separate tensor");
}

// Every index in [0, hi]; idx is contiguous int32.
void check_range(const at::Tensor& idx, int64_t hi, const char* name,
                 const char* bound) {
  const int32_t* p = idx.const_data_ptr<int32_t>();
  const int64_t n = idx.numel();
  int32_t lo_seen = INT32_MAX, hi_seen = INT32_MIN;
  for (int64_t i = 0; i < n; ++i) {
    lo_seen = std::min(lo_seen, p[i]);
    hi_seen = std::max(hi_seen, p[i]);
  }
  TORCH_CHECK(n == 0 || (lo_seen >= 0 && hi_seen <= hi), name,
              " must be in [0, ", hi, "] (", bound,
              " - 2: the lower corner of a bilinear lookup), got values in [",
              lo_seen, ", ", hi_seen, "]");
}

// The bias lookup's inputs, checked and made contiguous.
struct Bias {
  at::Tensor table, y0, fy, x0, fx;
  BiasArgs args;
};

Bias bias_inputs(const at::Tensor& table_in, const at::Tensor& y0_in,
                 const at::Tensor& fy_in, const at::Tensor& x0_in,
                 const at::Tensor& fx_in) {
  check_cpu(table_in, "table");
  check_cpu(y0_in, "y0");
  check_cpu(fy_in, "fy");
  check_cpu(x0_in, "x0");
  check_cpu(fx_in, "fx");
  TORCH_CHECK(table_in.dim() == 4, "table must be (g, h, Ty, Tx), got ",
              table_in.sizes());
  const Dtype dt = float_dtype(table_in, "table");
  const int64_t G = table_in.size(0), Ty = table_in.size(2),
                Tx = table_in.size(3);
  TORCH_CHECK(G >= 1, "table must have at least one group");
  TORCH_CHECK(Ty >= 2 && Tx >= 2, "table must be at least 2x2 (pad it), got ",
              Ty, "x", Tx);
  TORCH_CHECK(Ty < (int64_t{1} << 31) && Tx < (int64_t{1} << 31) &&
                  Ty * Tx < (int64_t{1} << 31),
              "table rows x columns must fit 32-bit offsets");
  TORCH_CHECK(y0_in.dim() == 3 && fy_in.dim() == 3,
              "y0/fy must be (B*g, r, Ns), got ", y0_in.sizes(), " and ",
              fy_in.sizes());
  TORCH_CHECK(x0_in.dim() == 3 && fx_in.dim() == 3,
              "x0/fx must be (B*g, W, Ns), got ", x0_in.sizes(), " and ",
              fx_in.sizes());
  TORCH_CHECK(y0_in.scalar_type() == at::kInt &&
                  x0_in.scalar_type() == at::kInt,
              "y0/x0 must be int32, got ", y0_in.scalar_type(), " and ",
              x0_in.scalar_type());
  TORCH_CHECK(y0_in.sizes() == fy_in.sizes() && x0_in.sizes() == fx_in.sizes(),
              "index and fraction shapes differ");
  TORCH_CHECK(y0_in.size(0) == x0_in.size(0) && y0_in.size(2) == x0_in.size(2),
              "y0 and x0 disagree on batch/keys");
  TORCH_CHECK(y0_in.size(0) % G == 0,
              "batch is not a multiple of the table groups");
  TORCH_CHECK(fy_in.scalar_type() == table_in.scalar_type() &&
                  fx_in.scalar_type() == table_in.scalar_type(),
              "fy/fx and table dtypes differ");
  Bias b{table_in.contiguous(), y0_in.contiguous(), fy_in.contiguous(),
         x0_in.contiguous(), fx_in.contiguous(), {}};
  check_range(b.y0, Ty - 2, "y0", "table rows");
  check_range(b.x0, Tx - 2, "x0", "table columns");
  b.args = {dt,
            b.table.const_data_ptr(),
            b.y0.const_data_ptr<int32_t>(),
            b.fy.const_data_ptr(),
            b.x0.const_data_ptr<int32_t>(),
            b.fx.const_data_ptr(),
            G,
            b.y0.size(0),
            table_in.size(1),
            b.y0.size(1),
            b.x0.size(1),
            b.y0.size(2),
            Ty,
            Tx};
  return b;
}

int64_t bias_numel(const BiasArgs& d) {
  return d.Bg * d.H * d.R * d.W * d.Ns;
}

// ---------------------------------------------------------------- bias ops

at::Tensor& deform_bias_out(const at::Tensor& table, const at::Tensor& y0,
                            const at::Tensor& fy, const at::Tensor& x0,
                            const at::Tensor& fx, at::Tensor& out) {
  const Bias b = bias_inputs(table, y0, fy, x0, fx);
  check_cpu(out, "out");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == table.scalar_type()
                  && out.numel() == bias_numel(b.args),
              "out must be contiguous, of the table's dtype, with "
              "(B*g, h, r, W, Ns) = ", bias_numel(b.args),
              " elements; got ", out.numel(), " ", out.scalar_type(),
              out.is_contiguous() ? "" : " non-contiguous", " elements");
  check_no_overlap(out, table, "out", "table");
  check_no_overlap(out, y0, "out", "y0");
  check_no_overlap(out, fy, "out", "fy");
  check_no_overlap(out, x0, "out", "x0");
  check_no_overlap(out, fx, "out", "fx");
  if (out.numel() > 0) kernels().deform_bias(b.args, out.mutable_data_ptr());
  return out;
}

at::Tensor deform_bias(const at::Tensor& table, const at::Tensor& y0,
                       const at::Tensor& fy, const at::Tensor& x0,
                       const at::Tensor& fx) {
  const Bias b = bias_inputs(table, y0, fy, x0, fx);
  const BiasArgs& d = b.args;
  auto out = at::empty({d.Bg, d.H, d.R, d.W, d.Ns}, table.options());
  if (out.numel() > 0) kernels().deform_bias(d, out.mutable_data_ptr());
  return out;
}

// Gradients with respect to the table (per (batch, query row): summed by
// the caller), fy and fx.
std::tuple<at::Tensor, at::Tensor, at::Tensor> deform_bias_backward(
    const at::Tensor& grad_in, const at::Tensor& table, const at::Tensor& y0,
    const at::Tensor& fy, const at::Tensor& x0, const at::Tensor& fx) {
  const Bias b = bias_inputs(table, y0, fy, x0, fx);
  const BiasArgs& d = b.args;
  check_cpu(grad_in, "grad");
  float_dtype(grad_in, "grad");
  TORCH_CHECK(grad_in.numel() == bias_numel(d),
              "grad must have (B*g, h, r, W, Ns) = ", bias_numel(d),
              " elements, got ", grad_in.sizes());
  auto grad = grad_in.contiguous().to(table.scalar_type());
  auto opt = table.options().dtype(at::toOpMathType(table.scalar_type()));
  auto grad_table = at::zeros({d.Bg, d.R, d.H, d.Ty, d.Tx}, opt);
  auto grad_fy = at::zeros({d.Bg, d.R, d.Ns}, opt);
  auto grad_fx = at::zeros({d.Bg, d.W, d.Ns}, opt);
  if (grad.numel() > 0)
    kernels().deform_bias_backward(d, grad.const_data_ptr(),
                                   grad_table.mutable_data_ptr(),
                                   grad_fy.mutable_data_ptr(),
                                   grad_fx.mutable_data_ptr());
  const auto dt = table.scalar_type();
  return {grad_table.to(dt), grad_fy.to(dt), grad_fx.to(dt)};
}

// ------------------------------------------------ fused deformable attention

const Kernels& fused_kernels(const char* op) {
  const Kernels& k = kernels();
  TORCH_CHECK(k.deform_attention_infer != nullptr, op,
              " needs the AVX-512 kernels; the instruction set in use is ",
              k.isa, " (torch.ops.mmdat.has_fused_deform_attention() says "
              "whether it is there)");
  return k;
}

void check_f32(const at::Tensor& t, const char* name, const char* op) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, " is float32 only (", name,
              " is ", t.scalar_type(), ")");
}

at::Tensor deform_attention_infer(const at::Tensor& q_in,
                                  const at::Tensor& kt_in,
                                  const at::Tensor& v_in,
                                  const at::Tensor& table,
                                  const at::Tensor& y0, const at::Tensor& fy,
                                  const at::Tensor& x0, const at::Tensor& fx,
                                  double scale) {
  constexpr const char* op = "deform_attention_infer";
  const Kernels& k = fused_kernels(op);
  check_f32(q_in, "q", op);
  check_f32(kt_in, "kt", op);
  check_f32(v_in, "v", op);
  check_f32(table, "table", op);
  const Bias b = bias_inputs(table, y0, fy, x0, fx);
  const BiasArgs& d = b.args;
  TORCH_CHECK(q_in.dim() == 4, "q must be (B, h, M, c), got ", q_in.sizes());
  const int64_t B = q_in.size(0), NH = q_in.size(1), M = q_in.size(2),
                c = q_in.size(3), Ns = d.Ns;
  TORCH_CHECK(c % 16 == 0, "head dim must be a multiple of 16, got ", c);
  TORCH_CHECK(M == d.R * d.W && NH == d.G * d.H && d.Bg == B * d.G,
              "q and the bias inputs disagree on sizes: q ", q_in.sizes(),
              ", table ", table.sizes(), ", y0 ", y0.sizes(), ", x0 ",
              x0.sizes());
  TORCH_CHECK(kt_in.sizes() == at::IntArrayRef({B * NH, c, Ns}) &&
                  v_in.sizes() == at::IntArrayRef({B * NH, Ns, c}),
              "kt must be (B*h, c, Ns) and v (B*h, Ns, c), got ",
              kt_in.sizes(), " and ", v_in.sizes());
  TORCH_CHECK(Ns >= 1, op, " needs at least one key");
  auto q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  auto kt = kt_in.contiguous(), v = v_in.contiguous();
  auto out = at::empty({B, M, NH, c}, q.options());
  if (out.numel() == 0) return out;
  DeformInferArgs a{d,
                    q.const_data_ptr<float>(),
                    q.stride(0),
                    q.stride(1),
                    q.stride(2),
                    kt.const_data_ptr<float>(),
                    v.const_data_ptr<float>(),
                    out.mutable_data_ptr<float>(),
                    B,
                    NH,
                    M,
                    c,
                    static_cast<float>(scale)};
  k.deform_attention_infer(a);
  return out;
}

std::vector<at::Tensor> deform_attention_backward(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& table,
    const at::Tensor& y0, const at::Tensor& fy, const at::Tensor& x0,
    const at::Tensor& fx, double scale) {
  constexpr const char* op = "deform_attention_backward";
  const Kernels& kern = fused_kernels(op);
  check_f32(q_in, "q", op);
  check_f32(k_in, "k", op);
  check_f32(v_in, "v", op);
  check_f32(out_in, "out", op);
  check_f32(table, "table", op);
  check_cpu(grad_in, "grad");
  float_dtype(grad_in, "grad");
  const Bias b = bias_inputs(table, y0, fy, x0, fx);
  const BiasArgs& d = b.args;
  TORCH_CHECK(q_in.dim() == 4, "q must be (B, h, M, c), got ", q_in.sizes());
  const int64_t B = q_in.size(0), NH = q_in.size(1), M = q_in.size(2),
                c = q_in.size(3), Ns = d.Ns, Bh = B * NH;
  TORCH_CHECK(c % 16 == 0, "head dim must be a multiple of 16, got ", c);
  TORCH_CHECK(M == d.R * d.W && NH == d.G * d.H && d.Bg == B * d.G,
              "q and the bias inputs disagree on sizes: q ", q_in.sizes(),
              ", table ", table.sizes(), ", y0 ", y0.sizes(), ", x0 ",
              x0.sizes());
  TORCH_CHECK(k_in.sizes() == at::IntArrayRef({Bh, Ns, c}) &&
                  v_in.sizes() == k_in.sizes(),
              "k and v must be (B*h, Ns, c), got ", k_in.sizes(), " and ",
              v_in.sizes());
  TORCH_CHECK(out_in.sizes() == at::IntArrayRef({B, M, NH, c}) &&
                  grad_in.sizes() == out_in.sizes(),
              "out and grad must be (B, M, h, c), got ", out_in.sizes(),
              " and ", grad_in.sizes());
  TORCH_CHECK(Ns >= 1, op, " needs at least one key");
  auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  auto kt = k.transpose(1, 2).contiguous();
  auto vt = v.transpose(1, 2).contiguous();
  auto out = out_in.contiguous(), grad = grad_in.contiguous().to(at::kFloat);
  auto opt = q.options();
  auto dq = at::zeros({Bh, M, c}, opt);
  auto dk = at::zeros({Bh, Ns, c}, opt), dv = at::zeros({Bh, Ns, c}, opt);
  auto dtab = at::zeros({Bh, d.Ty, d.Tx}, opt);
  auto dfy = at::zeros({Bh, d.R, Ns}, opt), dfx = at::zeros({Bh, d.W, Ns}, opt);
  if (Bh > 0 && M > 0 && c > 0) {
    DeformBackwardArgs a{d,
                         q.const_data_ptr<float>(),
                         k.const_data_ptr<float>(),
                         kt.const_data_ptr<float>(),
                         vt.const_data_ptr<float>(),
                         out.const_data_ptr<float>(),
                         grad.const_data_ptr<float>(),
                         dq.mutable_data_ptr<float>(),
                         dk.mutable_data_ptr<float>(),
                         dv.mutable_data_ptr<float>(),
                         dtab.mutable_data_ptr<float>(),
                         dfy.mutable_data_ptr<float>(),
                         dfx.mutable_data_ptr<float>(),
                         B,
                         NH,
                         M,
                         c,
                         static_cast<float>(scale)};
    kern.deform_attention_backward(a);
  }
  return {dq, dk, dv, dtab, dfy, dfx};
}

bool has_fused_deform_attention() {
  return kernels().deform_attention_infer != nullptr;
}

// ---------------------------------------------------- neighborhood attention

Dtype na_check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               int64_t ks) {
  check_cpu(q, "q");
  check_cpu(k, "k");
  check_cpu(v, "v");
  TORCH_CHECK(q.dim() == 5, "q must be (B, h, H, W, c), got ", q.sizes());
  TORCH_CHECK(q.sizes() == k.sizes() && q.sizes() == v.sizes(),
              "q, k, v shapes differ: ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() &&
                  q.scalar_type() == v.scalar_type(),
              "q, k, v dtypes differ");
  const Dtype dt = float_dtype(q, "q");
  TORCH_CHECK(ks >= 1, "kernel size must be at least 1, got ", ks);
  TORCH_CHECK(q.size(2) >= ks && q.size(3) >= ks,
              "map smaller than the kernel: pad it first (map ", q.size(2),
              "x", q.size(3), ", kernel ", ks, ")");
  return dt;
}

void check_rpb(const at::Tensor& rpb, const at::Tensor& q, int64_t ks) {
  check_cpu(rpb, "rpb");
  float_dtype(rpb, "rpb");
  TORCH_CHECK(rpb.dim() == 3 && rpb.size(0) == q.size(1) &&
                  rpb.size(1) == 2 * ks - 1 && rpb.size(2) == 2 * ks - 1,
              "rpb must be (h, 2ks-1, 2ks-1) = (", q.size(1), ", ", 2 * ks - 1,
              ", ", 2 * ks - 1, "), got ", rpb.sizes());
}

void strides4(const at::Tensor& t, int64_t* s) {
  for (int d = 0; d < 4; ++d) s[d] = t.stride(d);
}

void run_na_forward(Dtype dt, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& rpb,
                    at::Tensor& out, at::Tensor* attn, int64_t ks,
                    double scale) {
  if (out.numel() == 0) return;
  NaForwardArgs a{};
  a.dtype = dt;
  a.q = q.const_data_ptr();
  a.k = k.const_data_ptr();
  a.v = v.const_data_ptr();
  a.out = out.mutable_data_ptr();
  strides4(q, a.qs);
  strides4(k, a.ks_);
  strides4(v, a.vs);
  strides4(out, a.os);
  a.rpb = rpb.const_data_ptr();
  a.attn = attn ? attn->mutable_data_ptr() : nullptr;
  a.B = q.size(0);
  a.NH = q.size(1);
  a.H = q.size(2);
  a.W = q.size(3);
  a.C = q.size(4);
  a.ks = ks;
  a.scale = scale;
  kernels().na_forward(a);
}

// Returns (out (B, h, H, W, c), attn (B, h, H, W, ks*ks)).
std::tuple<at::Tensor, at::Tensor> na_forward(const at::Tensor& q_in,
                                              const at::Tensor& k_in,
                                              const at::Tensor& v_in,
                                              const at::Tensor& rpb_in,
                                              int64_t ks, double scale) {
  const Dtype dt = na_check(q_in, k_in, v_in, ks);
  check_rpb(rpb_in, q_in, ks);
  auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  auto rpb = rpb_in.to(at::toOpMathType(q.scalar_type())).contiguous();
  auto out = at::empty_like(q, at::MemoryFormat::Contiguous);
  auto attn = at::empty({q.size(0), q.size(1), q.size(2), q.size(3), ks * ks},
                        q.options());
  run_na_forward(dt, q, k, v, rpb, out, &attn, ks, scale);
  return {out, attn};
}

// Returns out (B, h, H, W, c) only, laid out as (B, H, W, h, c) in memory
// (the layout the projection takes). q, k, v may be strided views (e.g. of
// the qkv projection) as long as channels are contiguous.
at::Tensor na_forward_inference(const at::Tensor& q_in, const at::Tensor& k_in,
                                const at::Tensor& v_in,
                                const at::Tensor& rpb_in, int64_t ks,
                                double scale) {
  const Dtype dt = na_check(q_in, k_in, v_in, ks);
  check_rpb(rpb_in, q_in, ks);
  auto unit_c = [](const at::Tensor& t) {
    return t.stride(4) == 1 ? t : t.contiguous();
  };
  auto q = unit_c(q_in), k = unit_c(k_in), v = unit_c(v_in);
  auto rpb = rpb_in.to(at::toOpMathType(q.scalar_type())).contiguous();
  auto out = at::empty({q.size(0), q.size(2), q.size(3), q.size(1), q.size(4)},
                       q.options())
                 .permute({0, 3, 1, 2, 4});
  run_na_forward(dt, q, k, v, rpb, out, nullptr, ks, scale);
  return out;
}

// Returns (dq, dk, dv, drpb).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> na_backward(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& attn_in, int64_t ks,
    double scale) {
  const Dtype dt = na_check(q_in, k_in, v_in, ks);
  check_cpu(grad_in, "grad");
  check_cpu(attn_in, "attn");
  float_dtype(grad_in, "grad");
  float_dtype(attn_in, "attn");
  const int64_t B = q_in.size(0), NH = q_in.size(1), H = q_in.size(2),
                W = q_in.size(3), C = q_in.size(4), KK = ks * ks,
                RW = 2 * ks - 1;
  TORCH_CHECK(grad_in.sizes() == q_in.sizes(), "grad must be shaped like q ",
              q_in.sizes(), ", got ", grad_in.sizes());
  TORCH_CHECK(attn_in.sizes() == at::IntArrayRef({B, NH, H, W, KK}),
              "attn must be (B, h, H, W, ks*ks) = (", B, ", ", NH, ", ", H,
              ", ", W, ", ", KK, "), got ", attn_in.sizes());
  auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  auto attn = attn_in.contiguous().to(q.scalar_type());
  auto grad = grad_in.contiguous().to(q.scalar_type());
  auto opt = q.options().dtype(at::toOpMathType(q.scalar_type()));
  auto dq = at::zeros({B, NH, H, W, C}, opt);
  auto dk = at::zeros({B, NH, H, W, C}, opt);
  auto dv = at::zeros({B, NH, H, W, C}, opt);
  auto drpb = at::zeros({B, NH, RW, RW}, opt);
  if (q.numel() > 0) {
    NaBackwardArgs a{dt,
                     q.const_data_ptr(),
                     k.const_data_ptr(),
                     v.const_data_ptr(),
                     attn.const_data_ptr(),
                     grad.const_data_ptr(),
                     dq.mutable_data_ptr(),
                     dk.mutable_data_ptr(),
                     dv.mutable_data_ptr(),
                     drpb.mutable_data_ptr(),
                     B,
                     NH,
                     H,
                     W,
                     C,
                     ks,
                     scale};
    kernels().na_backward(a);
  }
  const auto st = q.scalar_type();
  return {dq.to(st), dk.to(st), dv.to(st), drpb.sum(0)};
}

}  // namespace
}  // namespace mmdat

// The torch version and the sources' hash this was compiled from, as a
// marker that mmdat/ops/library.py reads from the file before loading it.
#ifndef MMDAT_TORCH_MAJOR
#define MMDAT_TORCH_MAJOR 0
#define MMDAT_TORCH_MINOR 0
#endif
#ifndef MMDAT_SOURCES
#define MMDAT_SOURCES unknown
#endif
#define MMDAT_STR2(x) #x
#define MMDAT_STR(x) MMDAT_STR2(x)

// Instruction-set control for mmdat/ops/library.py (ctypes), outside the
// op schemas so that tracing and export never see it.
extern "C" {
__attribute__((visibility("default"))) extern const char mmdat_build[];
const char mmdat_build[] =
    "MMDAT_BUILD torch=" MMDAT_STR(MMDAT_TORCH_MAJOR) "." MMDAT_STR(
        MMDAT_TORCH_MINOR) ";src=" MMDAT_STR(MMDAT_SOURCES) ";";

__attribute__((visibility("default"))) const char* mmdat_isa() {
  return mmdat::kernels().isa;
}

// "" / "auto": the default choice again. 0: done; 1: unknown name;
// 2: not supported by this CPU.
__attribute__((visibility("default"))) int mmdat_set_isa(const char* name) {
  using namespace mmdat;
  if (name == nullptr || *name == '\0' || std::string(name) == "auto") {
    g_kernels.store(default_kernels(), std::memory_order_release);
    return 0;
  }
  const int i = find_isa(name);
  if (i < 0) return 1;
  if (!kIsas[i].supported()) return 2;
  g_kernels.store(kIsas[i].kernels(), std::memory_order_release);
  return 0;
}

// Comma-separated, best first: the instruction sets built into this
// library (compiled) and those this CPU can run (supported).
__attribute__((visibility("default"))) const char* mmdat_isas(int supported) {
  using namespace mmdat;
  static const std::array<std::string, 2> lists = [] {
    std::string all, ok;
    for (int i = 0; i < kNumIsas; ++i) {
      all += (all.empty() ? "" : ",") + std::string(kIsas[i].name);
      if (kIsas[i].supported())
        ok += (ok.empty() ? "" : ",") + std::string(kIsas[i].name);
    }
    return std::array<std::string, 2>{all, ok};
  }();
  return lists[supported ? 1 : 0].c_str();
}
}

TORCH_LIBRARY(mmdat, m) {
  m.def(
      "deform_bias(Tensor table, Tensor y0, Tensor fy, Tensor x0, Tensor fx)"
      " -> Tensor");
  m.def(
      "deform_bias_out(Tensor table, Tensor y0, Tensor fy, Tensor x0, "
      "Tensor fx, Tensor(a!) out) -> Tensor(a!)");
  m.def(
      "deform_attention_infer(Tensor q, Tensor kt, Tensor v, Tensor table, "
      "Tensor y0, Tensor fy, Tensor x0, Tensor fx, float scale) -> Tensor");
  m.def(
      "deform_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor table, Tensor y0, Tensor fy, Tensor x0, Tensor fx, "
      "float scale) -> Tensor[]");
  m.def("has_fused_deform_attention() -> bool",
        &mmdat::has_fused_deform_attention);
  m.def(
      "deform_bias_backward(Tensor grad, Tensor table, Tensor y0, Tensor fy,"
      " Tensor x0, Tensor fx) -> (Tensor, Tensor, Tensor)");
  m.def(
      "neighborhood_attention(Tensor q, Tensor k, Tensor v, Tensor rpb, "
      "int ks, float scale) -> (Tensor, Tensor)");
  m.def(
      "neighborhood_attention_inference(Tensor q, Tensor k, Tensor v, "
      "Tensor rpb, int ks, float scale) -> Tensor");
  m.def(
      "neighborhood_attention_backward(Tensor grad, Tensor q, Tensor k, "
      "Tensor v, Tensor attn, int ks, float scale) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmdat, CPU, m) {
  m.impl("deform_bias", &mmdat::deform_bias);
  m.impl("deform_bias_out", &mmdat::deform_bias_out);
  m.impl("deform_attention_infer", &mmdat::deform_attention_infer);
  m.impl("deform_attention_backward", &mmdat::deform_attention_backward);
  m.impl("deform_bias_backward", &mmdat::deform_bias_backward);
  m.impl("neighborhood_attention", &mmdat::na_forward);
  m.impl("neighborhood_attention_inference", &mmdat::na_forward_inference);
  m.impl("neighborhood_attention_backward", &mmdat::na_backward);
}
