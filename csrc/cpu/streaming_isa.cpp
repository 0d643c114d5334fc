// CPU streaming kernels for one instruction set. CMakeLists.txt compiles this file once per ISA,
// defining FLATMTL_ISA / FLATMTL_VEC_BYTES / FLATMTL_TILE and the matching -m flags.
#include "streaming_impl.h"

namespace flatmtl::cpu::FLATMTL_ISA {
// Out-of-line entry points for the run-time dispatch in dispatch.cpp.
void gram_entry(const MatrixView& G, double* out, int num_threads) { gram(G, out, num_threads); }
void combine_entry(const float* w, const MatrixView& G, void* out, DType out_dtype, float alpha, bool accumulate,
                   int num_threads) {
  combine(w, G, out, out_dtype, alpha, accumulate, num_threads);
}
void graddrop_entry(const MatrixView& G, const double* leak, uint64_t seed, void* out, DType out_dtype,
                    int num_threads) {
  graddrop(G, leak, seed, out, out_dtype, num_threads);
}
void row_norms_entry(const MatrixView& G, const void* weight, DType weight_dtype, double* out, int num_threads) {
  row_norms(G, weight, weight_dtype, out, num_threads);
}
void ema_row_norms_entry(float* buffer, int64_t buffer_stride, const MatrixView& G, const float* decay,
                         const float* gain,
                         double* out, int num_threads) {
  ema_row_norms(buffer, buffer_stride, G, decay, gain, out, num_threads);
}
void perturb_entry(const void* base, const void* direction, DType direction_dtype, const void* scale,
                   bool scale_is_double, void* out, DType dtype, int64_t count, bool adaptive, int num_threads) {
  perturb(base, direction, direction_dtype, scale, scale_is_double, out, dtype, count, adaptive, num_threads);
}
}  // namespace flatmtl::cpu::FLATMTL_ISA
