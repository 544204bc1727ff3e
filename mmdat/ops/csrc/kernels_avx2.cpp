// The kernels for x86-64 CPUs with AVX2 and FMA. Chosen at run time
// (ops.cpp), so the target is switched by pragma for this code only: the
// headers included by kernels.h keep the baseline target.
#include "kernels.h"

#if MMDAT_X86
#define MMDAT_ISA_NS avx2
#define MMDAT_ISA_NAME "avx2"
#define MMDAT_AVX512 0
#define MMDAT_AVX2 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,bmi,bmi2"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2")
#endif
#include "kernels_isa.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace mmdat {
const Kernels* kernels_avx2() { return &avx2::kTable; }
}  // namespace mmdat
#endif
