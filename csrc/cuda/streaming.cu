// CUDA streaming kernels (gram, combine, row_norms, the DB-MTL EMA, perturb) on raw pointers and a caller's
// stream. No allocation here: the caller passes every buffer, so a whole step can be captured in a CUDA graph.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "flatmtl/streaming.h"

namespace flatmtl::cuda {
namespace {

constexpr int kTile = 16;      // rows per Gram tile; a block of kTile x kTile threads forms one tile
constexpr int kChunk = 64;     // columns staged in shared memory per step
constexpr int kThreads = kTile * kTile;
constexpr int kCombineThreads = 256;
constexpr int kNormThreads = 256;
constexpr int kNormTerms = 128;  // squares per thread summed in float32 before the float64 flush
constexpr int kPerturbThreads = 256;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename O>
__device__ __forceinline__ O from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// One block: the tile pair (bi, bj), bi <= bj (blockIdx.y enumerates the upper triangle), over the
// columns of split blockIdx.x. Chunk sums in float32, accumulated across chunks in float64.
template <typename T>
__global__ void __launch_bounds__(kThreads) gram_partials_kernel(const T* __restrict__ G, int64_t K, int64_t N,
                                                                  int64_t row_stride, int64_t cols_per_split,
                                                                  int tiles, int64_t Kp, float* __restrict__ partials) {
  int pair = blockIdx.y;
  int bi = 0;
  while (pair >= tiles - bi) {
    pair -= tiles - bi;
    ++bi;
  }
  const int bj = bi + pair;
  __shared__ float a[kTile][kChunk + 1];
  __shared__ float b[kTile][kChunk + 1];
  const int tx = threadIdx.x % kTile;
  const int ty = threadIdx.x / kTile;
  const int64_t c_begin = int64_t(blockIdx.x) * cols_per_split;
  const int64_t c_end = min(N, c_begin + cols_per_split);
  double total = 0.0;
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kChunk) {
    for (int e = threadIdx.x; e < kTile * kChunk; e += kThreads) {
      const int r = e / kChunk;
      const int c = e % kChunk;
      const int64_t col = c0 + c;
      const int64_t ri = int64_t(bi) * kTile + r;
      const int64_t rj = int64_t(bj) * kTile + r;
      a[r][c] = (ri < K && col < c_end) ? to_float(G[ri * row_stride + col]) : 0.0f;
      b[r][c] = (rj < K && col < c_end) ? to_float(G[rj * row_stride + col]) : 0.0f;
    }
    __syncthreads();
    float chunk = 0.0f;
#pragma unroll 16
    for (int c = 0; c < kChunk; ++c) chunk = fmaf(a[ty][c], b[tx][c], chunk);
    total += double(chunk);
    __syncthreads();
  }
  partials[(int64_t(blockIdx.x) * Kp + int64_t(bi) * kTile + ty) * Kp + int64_t(bj) * kTile + tx] = float(total);
}

// out[i, j] = out[j, i] = sum over splits (fixed order, float64) of the upper-triangle partial.
template <typename O>
__global__ void gram_reduce_kernel(const float* __restrict__ partials, int64_t splits, int64_t K, int64_t Kp,
                                   O* __restrict__ out) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= K * K) return;
  const int64_t i = idx / K;
  const int64_t j = idx % K;
  const int64_t lo = min(i, j);
  const int64_t hi = max(i, j);
  double sum = 0.0;
  for (int64_t s = 0; s < splits; ++s) sum += double(partials[(s * Kp + lo) * Kp + hi]);
  out[idx] = O(sum);
}

template <typename T, typename O>
__global__ void combine_kernel(const void* __restrict__ w, bool w_is_double, const T* __restrict__ G, int64_t K,
                               int64_t N, int64_t row_stride, O* __restrict__ out, float alpha, bool accumulate) {
  extern __shared__ float weights[];
  // A float64 w is rounded to float32 here, as the caller's conversion would round it, without its launch.
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    weights[k] = w_is_double ? float(static_cast<const double*>(w)[k]) : static_cast<const float*>(w)[k];
  }
  __syncthreads();
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; n < N; n += step) {
    float acc = 0.0f;
    for (int64_t k = 0; k < K; ++k) acc = fmaf(weights[k], to_float(G[k * row_stride + n]), acc);
    float v = alpha * acc;
    if (accumulate) v += to_float(out[n]);
    out[n] = from_float<O>(v);
  }
}

// The values whose squares row_norms_partials_kernel sums: w ⊙ g_k (w unused unless WEIGHTED) ...
template <typename T, typename W, bool WEIGHTED>
struct WeightedRows {
  const T* __restrict__ G;
  int64_t row_stride;
  const W* __restrict__ w;
  __device__ __forceinline__ float at(int64_t k, int64_t c) const {
    float v = to_float(G[k * row_stride + c]);
    if constexpr (WEIGHTED) v *= to_float(w[c]);
    return v;
  }
};

// ... or DB-MTL's EMA step b_k ← decay · b_k + gain_k · g_k (float32), stored into the buffer and returned; a
// non-finite b (an overflowed step that a GradScaler skipped) restarts from 0.
template <typename T>
struct EmaRows {
  float* __restrict__ buffer;
  int64_t buffer_stride;
  const T* __restrict__ G;
  int64_t row_stride;
  const float* __restrict__ decay;  // in device memory: a graph replay reads the current step's value
  const float* __restrict__ gain;
  __device__ __forceinline__ float at(int64_t k, int64_t c) const {
    float* b = buffer + k * buffer_stride + c;
    const float v = fmaf(gain[k], to_float(G[k * row_stride + c]), __ldg(decay) * (isfinite(*b) ? *b : 0.0f));
    *b = v;
    return v;
  }
};

// One block: row blockIdx.y over the columns of split blockIdx.x. Each thread sums at most kNormTerms
// squares in float32 per step, steps in float64; a fixed-order tree over the block's threads (float64).
template <class Values>
__global__ void __launch_bounds__(kNormThreads)
    row_norms_partials_kernel(Values values, int64_t N, int64_t cols_per_split, int64_t splits,
                              double* __restrict__ partials) {
  __shared__ double sums[kNormThreads];
  const int64_t k = blockIdx.y;
  const int64_t c_begin = int64_t(blockIdx.x) * cols_per_split;
  const int64_t c_end = min(N, c_begin + cols_per_split);
  constexpr int64_t kStep = int64_t(kNormThreads) * kNormTerms;
  double total = 0.0;
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kStep) {
    const int64_t c1 = min(c_end, c0 + kStep);
    float acc = 0.0f;
#pragma unroll 4
    for (int64_t c = c0 + threadIdx.x; c < c1; c += kNormThreads) {
      const float v = values.at(k, c);
      acc = fmaf(v, v, acc);
    }
    total += double(acc);
  }
  sums[threadIdx.x] = total;
  __syncthreads();
  for (int width = kNormThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) sums[threadIdx.x] += sums[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[k * splits + blockIdx.x] = sums[0];
}

// out[k] = sqrt(sum over splits, in order, of partials[k, split]) (float64).
__global__ void row_norms_reduce_kernel(const double* __restrict__ partials, int64_t splits, int64_t K,
                                        double* __restrict__ out) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  double sum = 0.0;
  for (int64_t s = 0; s < splits; ++s) sum += partials[k * splits + s];
  out[k] = sqrt(sum);
}

// out = base + s * (base^2 * direction if adaptive else direction), float32; s read here from device memory.
// base and out may be the same buffer (each element is read before it is written), hence no __restrict__.
template <typename O, typename D>
__global__ void perturb_kernel(const O* base, const D* __restrict__ direction, const void* scale, bool scale_is_double,
                               O* out, int64_t n, bool adaptive) {
  const float s = scale_is_double ? float(*static_cast<const double*>(scale)) : *static_cast<const float*>(scale);
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const float b = to_float(base[i]);
    float d = to_float(direction[i]);
    if (adaptive) d *= b * b;
    out[i] = from_float<O>(fmaf(s, d, b));
  }
}

int multiprocessors(int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 80;
  return sms;
}

// launch(T{}) with T the element type `dtype` names (bfloat16, float16, else float32): the one switch from a
// run-time type code to the kernels' template arguments, for every operand.
template <class Launch>
void with_element_type(DType dtype, const Launch& launch) {
  switch (dtype) {
    case DType::BFloat16: return launch(__nv_bfloat16{});
    case DType::Float16: return launch(__half{});
    default: return launch(float{});
  }
}

std::string last_error(const char* what) {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(what) + ": " + cudaGetErrorString(err);
}

template <typename T>
void launch_gram(const MatrixView& G, float* partials, int64_t splits, int tiles, int64_t Kp, cudaStream_t stream) {
  const int64_t cols_per_split = ((G.cols + splits - 1) / splits + kChunk - 1) / kChunk * kChunk;
  const dim3 grid(unsigned(splits), unsigned(tiles * (tiles + 1) / 2));
  gram_partials_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(G.data), G.rows, G.cols, G.row_stride,
                                                         cols_per_split, tiles, Kp, partials);
}

template <typename T, typename O>
void launch_combine(const void* w, bool w_is_double, const MatrixView& G, void* out, float alpha, bool accumulate,
                    int device, cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>((G.cols + kCombineThreads - 1) / kCombineThreads,
                                           int64_t(multiprocessors(device)) * 8);
  combine_kernel<T, O><<<unsigned(blocks), kCombineThreads, size_t(G.rows) * sizeof(float), stream>>>(
      w, w_is_double, static_cast<const T*>(G.data), G.rows, G.cols, G.row_stride, static_cast<O*>(out), alpha,
      accumulate);
}

// Sums of squares per (row, split) into partials, then their square roots into out.
template <class Values>
void launch_row_norms(const Values& values, int64_t K, int64_t N, double* partials, int64_t splits, double* out,
                      cudaStream_t stream) {
  const int64_t cols_per_split = (N + splits - 1) / splits;
  const dim3 grid{unsigned(splits), unsigned(K)};
  row_norms_partials_kernel<Values><<<grid, kNormThreads, 0, stream>>>(values, N, cols_per_split, splits, partials);
  row_norms_reduce_kernel<<<unsigned((K + 255) / 256), 256, 0, stream>>>(partials, splits, K, out);
}

template <typename T, typename W, bool WEIGHTED>
void launch_weighted_row_norms(const MatrixView& G, const void* weight, double* partials, int64_t splits, double* out,
                               cudaStream_t stream) {
  const WeightedRows<T, W, WEIGHTED> values{static_cast<const T*>(G.data), G.row_stride, static_cast<const W*>(weight)};
  launch_row_norms(values, G.rows, G.cols, partials, splits, out, stream);
}

template <typename T>
void launch_ema_row_norms(float* buffer, int64_t buffer_stride, const MatrixView& G, const float* decay,
                          const float* gain, double* partials, int64_t splits, double* out, cudaStream_t stream) {
  const EmaRows<T> values{buffer, buffer_stride, static_cast<const T*>(G.data), G.row_stride, decay, gain};
  launch_row_norms(values, G.rows, G.cols, partials, splits, out, stream);
}

template <typename O, typename D>
void launch_perturb(const void* base, const void* direction, const void* scale, bool scale_is_double, void* out,
                    int64_t n, bool adaptive, int device, cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>((n + kPerturbThreads - 1) / kPerturbThreads,
                                           int64_t(multiprocessors(device)) * 8);
  perturb_kernel<O, D><<<unsigned(blocks), kPerturbThreads, 0, stream>>>(
      static_cast<const O*>(base), static_cast<const D*>(direction), scale, scale_is_double, static_cast<O*>(out), n,
      adaptive);
}

}  // namespace

int device_count(std::string* error) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    if (error != nullptr) *error = cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky error of a failed probe
    return -1;
  }
  return count;
}

int64_t gram_num_splits(int64_t K, int64_t N, int device) {
  const int64_t tiles = (K + kTile - 1) / kTile;
  const int64_t pairs = tiles * (tiles + 1) / 2;
  const int64_t wanted = std::max<int64_t>(1, int64_t(multiprocessors(device)) * 4 / pairs);
  return std::max<int64_t>(1, std::min(wanted, (N + kChunk - 1) / kChunk));
}

std::string gram(const MatrixView& G, float* partials, int64_t num_splits, void* out, bool out_is_double,
                 int device, uintptr_t stream_handle) {
  if (cudaSetDevice(device) != cudaSuccess) return last_error("cudaSetDevice");
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int tiles = int((G.rows + kTile - 1) / kTile);
  const int64_t Kp = int64_t(tiles) * kTile;
  with_element_type(G.dtype, [&](auto g) { launch_gram<decltype(g)>(G, partials, num_splits, tiles, Kp, stream); });
  const int64_t entries = G.rows * G.rows;
  const unsigned blocks = unsigned((entries + 255) / 256);
  if (out_is_double) {
    gram_reduce_kernel<double><<<blocks, 256, 0, stream>>>(partials, num_splits, G.rows, Kp, static_cast<double*>(out));
  } else {
    gram_reduce_kernel<float><<<blocks, 256, 0, stream>>>(partials, num_splits, G.rows, Kp, static_cast<float*>(out));
  }
  return last_error("gram kernel launch");
}

std::string combine(const void* w, bool w_is_double, const MatrixView& G, void* out, DType out_dtype, float alpha,
                    bool accumulate, int device, uintptr_t stream_handle) {
  if (cudaSetDevice(device) != cudaSuccess) return last_error("cudaSetDevice");
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  with_element_type(G.dtype, [&](auto g) {
    with_element_type(out_dtype, [&](auto o) {
      launch_combine<decltype(g), decltype(o)>(w, w_is_double, G, out, alpha, accumulate, device, stream);
    });
  });
  return last_error("combine kernel launch");
}

int64_t row_norms_num_splits(int64_t K, int64_t N, int device) {
  // A few blocks per SM over all K rows, each split at least one block-wide pass of columns.
  const int64_t wanted = std::max<int64_t>(1, int64_t(multiprocessors(device)) * 4 / K);
  return std::max<int64_t>(1, std::min(wanted, (N + kNormThreads * 16 - 1) / (kNormThreads * 16)));
}

std::string row_norms(const MatrixView& G, const void* weight, DType weight_dtype, double* partials,
                      int64_t num_splits, double* out, int device, uintptr_t stream_handle) {
  if (cudaSetDevice(device) != cudaSuccess) return last_error("cudaSetDevice");
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  with_element_type(G.dtype, [&](auto g) {
    using T = decltype(g);
    if (weight == nullptr) return launch_weighted_row_norms<T, T, false>(G, weight, partials, num_splits, out, stream);
    with_element_type(weight_dtype, [&](auto w) {
      launch_weighted_row_norms<T, decltype(w), true>(G, weight, partials, num_splits, out, stream);
    });
  });
  return last_error("row_norms kernel launch");
}

std::string ema_row_norms(float* buffer, int64_t buffer_stride, const MatrixView& G, const float* decay,
                          const float* gain, double* partials, int64_t num_splits, double* out, int device,
                          uintptr_t stream_handle) {
  if (cudaSetDevice(device) != cudaSuccess) return last_error("cudaSetDevice");
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  with_element_type(G.dtype, [&](auto g) {
    launch_ema_row_norms<decltype(g)>(buffer, buffer_stride, G, decay, gain, partials, num_splits, out, stream);
  });
  return last_error("ema_row_norms kernel launch");
}

std::string perturb(const void* base, const void* direction, DType direction_dtype, const void* scale,
                    bool scale_is_double, void* out, DType dtype, int64_t count, bool adaptive, int device,
                    uintptr_t stream_handle) {
  if (cudaSetDevice(device) != cudaSuccess) return last_error("cudaSetDevice");
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  with_element_type(dtype, [&](auto b) {
    with_element_type(direction_dtype, [&](auto d) {
      launch_perturb<decltype(b), decltype(d)>(base, direction, scale, scale_is_double, out, count, adaptive, device,
                                               stream);
    });
  });
  return last_error("perturb kernel launch");
}

}  // namespace flatmtl::cuda
