// Streaming primitives over a K x N gradient matrix: raw pointers, sizes and strides only
// (no torch headers), so the module builds without torch and under pip's build isolation.
#pragma once

#include <cstdint>
#include <string>

namespace flatmtl {

// Element types understood by the kernels (values mirror flatmtl_fast/_native.py).
enum class DType : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

// Rows of G are contiguous; row k starts at G + k * row_stride (elements); row_stride >= N.
struct MatrixView {
  const void* data;
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
  DType dtype;
};

namespace cpu {

// Instruction set the CPU kernels run with on this machine ("avx512", "avx2" or "portable").
std::string isa();
// Comma-separated instruction sets this CPU supports, lowest first.
std::string supported_isas();
// Force an instruction set (tests run every variant); throws if the CPU lacks it.
void set_isa(const std::string& name);

// out (K x K, row-major, float64) = G G^T. Per-chunk partial sums in float32 (at most 128
// terms per SIMD lane), cross-chunk sums in float64 over a fixed partition of the columns, so
// the result does not depend on the thread count. Exactly symmetric.
void gram(const MatrixView& G, double* out, int num_threads);

// out[n] = alpha * sum_k w[k] G[k, n]   (+ out[n] when accumulate), float32 arithmetic.
// out has G.cols contiguous elements of out_dtype (Float32 or BFloat16).
void combine(const float* w, const MatrixView& G, void* out, DType out_dtype, float alpha, bool accumulate,
             int num_threads);

// GradDrop (Chen et al. 2020) in one pass over G: per column, P = (1 + sum g / sum |g|) / 2 and
// U = tl.rand(seed, column) (Philox-4x32-10, as Triton); keep g_k where (P > U, g_k > 0) or
// (P < U, g_k < 0); out = sum_k (leak_k + (1 - leak_k) keep_k) g_k, decided and summed in float64.
// leak has K float64 entries; out has G.cols elements of out_dtype (Float32 or BFloat16).
void graddrop(const MatrixView& G, const double* leak, uint64_t seed, void* out, DType out_dtype, int num_threads);

// out[k] = sqrt(sum_n (weight[n] G[k, n])^2) (weight = 1 when null; else G.cols elements of weight_dtype,
// Float32 or BFloat16). Squares in float32 summed per chunk (at most 128 terms per SIMD lane), chunk sums
// in float64 over a fixed partition of the columns, so the result does not depend on the thread count.
void row_norms(const MatrixView& G, const void* weight, DType weight_dtype, double* out, int num_threads);

// DB-MTL's EMA: buffer[k, n] = *decay * buffer[k, n] + gain[k] * G[k, n] in float32 (buffer: G.rows x G.cols
// float32, row k at buffer + k * buffer_stride, disjoint from G), then out[k] = the norm of the updated row k,
// summed as row_norms does. One pass: each entry is read, updated and squared while in registers. decay points
// to one float (in memory, not an argument: a captured CUDA graph then replays the step's current decay).
void ema_row_norms(float* buffer, int64_t buffer_stride, const MatrixView& G, const float* decay, const float* gain,
                   double* out, int num_threads);

// out[n] = base[n] + s * (adaptive ? base[n]^2 direction[n] : direction[n]) for n < count, float32 arithmetic,
// s = *scale (a float64 when scale_is_double, else float32). base and out have `dtype`, direction has
// direction_dtype (Float32 or BFloat16); out may be base itself (in place), otherwise they are disjoint.
void perturb(const void* base, const void* direction, DType direction_dtype, const void* scale, bool scale_is_double,
             void* out, DType dtype, int64_t count, bool adaptive, int num_threads);

}  // namespace cpu

namespace cuda {

// Number of visible CUDA devices, or a negative value with `error` set when the runtime fails.
int device_count(std::string* error);

// Per-split float32 partials of G G^T into `partials` (num_splits x Kp x Kp, Kp = tiles * 16),
// then a fixed-order float64 reduction into out (K x K, float32 or float64 per out_is_double).
// Returns an empty string on success, else the CUDA error.
std::string gram(const MatrixView& G, float* partials, int64_t num_splits, void* out, bool out_is_double,
                 int device, uintptr_t stream);

// Same contract as cpu::combine (out_dtype may also be Float16); w is a device pointer to K floats, or to K
// doubles when w_is_double (each rounded to float32 as the kernel loads it).
std::string combine(const void* w, bool w_is_double, const MatrixView& G, void* out, DType out_dtype, float alpha,
                    bool accumulate, int device, uintptr_t stream);

// Number of column splits the gram kernel should use for this shape on this device.
int64_t gram_num_splits(int64_t K, int64_t N, int device);

// Per-split float64 sums of squares into `partials` (K x num_splits), then out[k] = sqrt of their sum in split
// order (float64, K entries). Same contract as cpu::row_norms otherwise (weight_dtype may also be Float16);
// every pointer is a device pointer.
std::string row_norms(const MatrixView& G, const void* weight, DType weight_dtype, double* partials,
                      int64_t num_splits, double* out, int device, uintptr_t stream);

// Number of column splits the row_norms kernel should use for this shape on this device.
int64_t row_norms_num_splits(int64_t K, int64_t N, int device);

// Same contract as cpu::ema_row_norms (G may also be Float16), with partials and num_splits as for row_norms;
// decay and gain are read from device memory by the kernel.
std::string ema_row_norms(float* buffer, int64_t buffer_stride, const MatrixView& G, const float* decay,
                          const float* gain, double* partials, int64_t num_splits, double* out, int device,
                          uintptr_t stream);

// Same contract as cpu::perturb (Float16 allowed too); scale is read from device memory by the kernel.
std::string perturb(const void* base, const void* direction, DType direction_dtype, const void* scale,
                    bool scale_is_double, void* out, DType dtype, int64_t count, bool adaptive, int device,
                    uintptr_t stream);

}  // namespace cuda
}  // namespace flatmtl
