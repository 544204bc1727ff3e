// The kernels for x86-64 CPUs with AVX-512 (F, BW, DQ, VL), AVX2 and FMA;
// the only build with the fused deformable attention. Chosen at run time
// (ops.cpp); see kernels_avx2.cpp for why the target is a pragma.
#include "kernels.h"

#if MMDAT_X86
#define MMDAT_ISA_NS avx512
#define MMDAT_ISA_NAME "avx512"
#define MMDAT_AVX512 1
#define MMDAT_AVX2 1
#if defined(__clang__)
#pragma clang attribute push(                                             \
    __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,"  \
                          "bmi,bmi2"))),                                  \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi,bmi2")
#endif
#include "kernels_isa.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace mmdat {
const Kernels* kernels_avx512() { return &avx512::kTable; }
}  // namespace mmdat
#endif
