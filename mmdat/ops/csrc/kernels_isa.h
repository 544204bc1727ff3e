// The kernels of one instruction set: included by kernels_<isa>.cpp after
// it has defined MMDAT_ISA_NS, MMDAT_AVX512 and MMDAT_AVX2 and switched the
// compiler's target (pragma) for the code that follows. Everything here has
// internal linkage but the table, so the three builds never share a symbol.
namespace mmdat {
namespace MMDAT_ISA_NS {

#include "simd.h"
#include "deform_bias_kernels.h"
#include "neighborhood_kernels.h"

extern const Kernels kTable;
const Kernels kTable = {
    MMDAT_ISA_NAME,
    &deform_bias,
    &deform_bias_backward,
#if MMDAT_AVX512
    &deform_attention_infer,
    &deform_attention_backward,
#else
    nullptr,
    nullptr,
#endif
    &na_forward,
    &na_backward,
};

}  // namespace MMDAT_ISA_NS
}  // namespace mmdat
