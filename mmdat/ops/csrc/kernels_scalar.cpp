// The kernels for any CPU: the compiler's baseline target (SSE2 on x86-64).
#include "kernels.h"

#define MMDAT_ISA_NS scalar
#define MMDAT_ISA_NAME "scalar"
#define MMDAT_AVX512 0
#define MMDAT_AVX2 0
#include "kernels_isa.h"

namespace mmdat {
const Kernels* kernels_scalar() { return &scalar::kTable; }
}  // namespace mmdat
