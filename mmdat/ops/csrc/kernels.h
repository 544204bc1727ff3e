// The interface between the op entry points (ops.cpp: input validation,
// tensor layout, registration with torch.library) and the kernels, which are
// compiled once per instruction set (kernels_scalar.cpp, kernels_avx2.cpp,
// kernels_avx512.cpp) from the same sources (deform_bias_kernels.h,
// neighborhood_kernels.h). The kernels see raw pointers and sizes only:
// every pointer, size and index they read has been checked by ops.cpp.
//
// Only light headers here: this file is included before the instruction-set
// pragma of the kernel files, so that every header function is compiled
// for the baseline target in every object (an inline function compiled
// with AVX-512 and picked by the linker for all callers would crash older
// CPUs).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define MMDAT_X86 1
#include <immintrin.h>
#else
#define MMDAT_X86 0
#endif

namespace mmdat {

enum class Dtype : int { kFloat = 0, kDouble = 1, kBFloat16 = 2, kHalf = 3 };

// Bias lookup inputs (deform_bias_kernels.h): contiguous; table
// (G, H, Ty, Tx) of `dtype`, y0/fy (Bg, R, Ns), x0/fx (Bg, W, Ns); y0 in
// [0, Ty-2], x0 in [0, Tx-2]; Bg % G == 0; Ty * Tx < 2^31.
struct BiasArgs {
  Dtype dtype;
  const void* table;
  const int32_t* y0;
  const void* fy;
  const int32_t* x0;
  const void* fx;
  int64_t G, Bg, H, R, W, Ns, Ty, Tx;
};

// Fused deformable attention, float32 (AVX-512 only). q (B, NH, M, c) with
// strides qs and unit channel stride; kt (B*NH, c, Ns), v (B*NH, Ns, c)
// contiguous; out (B, M, NH, c) contiguous; bias.G * bias.H == NH,
// bias.Bg == B * G, M == R * W, c % 16 == 0, Ns >= 1.
struct DeformInferArgs {
  BiasArgs bias;
  const float* q;
  int64_t qsB, qsH, qsM;
  const float* kt;
  const float* v;
  float* out;
  int64_t B, NH, M, c;
  float scale;
};

// Its backward; q (B*NH, M, c), k (B*NH, Ns, c), kt, vt (B*NH, c, Ns),
// out and grad (B, M, NH, c), all contiguous float32. Gradients: dq
// (B*NH, M, c), dk, dv (B*NH, Ns, c) zeroed, dtab (B*NH, Ty, Tx), dfy
// (B*NH, R, Ns), dfx (B*NH, W, Ns), zeroed.
struct DeformBackwardArgs {
  BiasArgs bias;
  const float *q, *k, *kt, *vt, *out, *grad;
  float *dq, *dk, *dv, *dtab, *dfy, *dfx;
  int64_t B, NH, M, c;
  float scale;
};

// Neighborhood attention forward. q, k, v, out: (B, NH, H, W, C) as
// pointer + strides of the first four dims (channels unit-strided);
// rpb (NH, 2ks-1, 2ks-1) contiguous in the accumulation type (float for
// float/bf16/half, double for double); attn (B, NH, H, W, ks*ks)
// contiguous or null. H >= ks, W >= ks, ks >= 1, C >= 1.
struct NaForwardArgs {
  Dtype dtype;
  const void *q, *k, *v;
  void* out;
  int64_t qs[4], ks_[4], vs[4], os[4];
  const void* rpb;
  void* attn;
  int64_t B, NH, H, W, C, ks;
  double scale;
};

// Backward: q, k, v, grad (B, NH, H, W, C) and attn (B, NH, H, W, ks*ks)
// contiguous of `dtype`; dq, dk, dv (same shape, dk/dv zeroed) and drpb
// (B*NH, 2ks-1, 2ks-1, zeroed) contiguous in the accumulation type.
struct NaBackwardArgs {
  Dtype dtype;
  const void *q, *k, *v, *attn, *grad;
  void *dq, *dk, *dv, *drpb;
  int64_t B, NH, H, W, C, ks;
  double scale;
};

// One instruction set's kernels; a null entry: not available there.
struct Kernels {
  const char* isa;
  void (*deform_bias)(const BiasArgs&, void* out);
  // gradients in the accumulation type: gtable (Bg, R, H, Ty, Tx), gfy
  // (Bg, R, Ns), gfx (Bg, W, Ns), zeroed; grad (Bg, H, R, W, Ns) of dtype
  void (*deform_bias_backward)(const BiasArgs&, const void* grad,
                               void* gtable, void* gfy, void* gfx);
  void (*deform_attention_infer)(const DeformInferArgs&);
  void (*deform_attention_backward)(const DeformBackwardArgs&);
  void (*na_forward)(const NaForwardArgs&);
  void (*na_backward)(const NaBackwardArgs&);
};

const Kernels* kernels_scalar();
#if MMDAT_X86
const Kernels* kernels_avx2();
const Kernels* kernels_avx512();
#endif

// Accumulation type of a storage type (what at::opmath_type gives).
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

}  // namespace mmdat

// Calls BODY with scalar_t bound to the storage type of DT.
#define MMDAT_DISPATCH(DT, ...)                    \
  switch (DT) {                                    \
    case ::mmdat::Dtype::kFloat: {                 \
      using scalar_t = float;                      \
      __VA_ARGS__();                               \
      break;                                       \
    }                                              \
    case ::mmdat::Dtype::kDouble: {                \
      using scalar_t = double;                     \
      __VA_ARGS__();                               \
      break;                                       \
    }                                              \
    case ::mmdat::Dtype::kBFloat16: {              \
      using scalar_t = c10::BFloat16;              \
      __VA_ARGS__();                               \
      break;                                       \
    }                                              \
    case ::mmdat::Dtype::kHalf: {                  \
      using scalar_t = c10::Half;                  \
      __VA_ARGS__();                               \
      break;                                       \
    }                                              \
  }
