// CPU streaming kernels, written once with GCC/Clang vector extensions and compiled once per
// instruction set (see streaming_*.cpp). Each including file defines FLATMTL_ISA (the namespace),
// FLATMTL_VEC_BYTES (SIMD register width) and FLATMTL_TILE (rows per register tile), so no
// inline function of one ISA can be picked by the linker for another (no illegal instruction
// on CPUs without AVX-512).
#pragma once

#include <omp.h>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "flatmtl/streaming.h"

#if !defined(FLATMTL_ISA) || !defined(FLATMTL_VEC_BYTES) || !defined(FLATMTL_TILE)
#error "define FLATMTL_ISA, FLATMTL_VEC_BYTES and FLATMTL_TILE before including streaming_impl.h"
#endif

namespace flatmtl::cpu::FLATMTL_ISA {

constexpr int kLanes = FLATMTL_VEC_BYTES / 4;  // float32 lanes per register
constexpr int kTile = FLATMTL_TILE;            // rows per register tile (kTile + 1 + kTile^2 registers)
// Each float32 lane accumulates at most this many products before the float64 flush, which
// bounds the per-entry rounding error by about (kMaxLaneTerms + log2 kLanes) * 2^-24 * |g_i| |g_j|.
constexpr int64_t kMaxLaneTerms = 128;
constexpr int64_t kMaxChunk = kMaxLaneTerms * kLanes;
constexpr int64_t kMaxSlabs = 64;                          // fixed column partition -> thread-count independent
constexpr int64_t kPartialBudgetBytes = int64_t(64) << 20;  // per-slab K x K float64 partials
constexpr int64_t kChunkCacheBytes = int64_t(1) << 20;     // chunk of all K rows kept in L2

typedef float vf __attribute__((vector_size(FLATMTL_VEC_BYTES)));
typedef uint32_t vu __attribute__((vector_size(FLATMTL_VEC_BYTES)));
typedef uint16_t vh __attribute__((vector_size(FLATMTL_VEC_BYTES / 2)));
typedef int32_t vi __attribute__((vector_size(FLATMTL_VEC_BYTES)));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// bfloat16 is the upper half of a float32: widening is exact.
inline vf load(const uint16_t* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}

inline float load_scalar(const float* p) { return *p; }

inline float load_scalar(const uint16_t* p) {
  uint32_t u = uint32_t(*p) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

// Round to nearest even; NaN stays NaN (quiet bit forced so the truncation cannot make it Inf).
inline void store(uint16_t* p, vf v) {
  vu u = (vu)v;
  vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  vu nan = (u >> 16) | 0x40u;
  vi is_nan = (v != v);
  vu bits = is_nan ? nan : rounded;
  vh h = __builtin_convertvector(bits, vh);
  std::memcpy(p, &h, sizeof h);
}

inline void store_scalar(float* p, float v) { *p = v; }

inline void store_scalar(uint16_t* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  *p = (v != v) ? uint16_t((u >> 16) | 0x40u) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Pairwise sum of the lanes (float32), returned as float64 for the cross-chunk accumulation.
inline double lane_sum(vf v) {
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof v);
#pragma GCC unroll 8
  for (int width = kLanes / 2; width >= 1; width /= 2) {
#pragma GCC unroll 16
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}

// ---------------------------------------------------------------------------------------------
// gram

// Accumulates G[i0:i0+RI] . G[j0:j0+RJ]^T over columns [c0, c1) (a multiple of kLanes) into
// out (row-major K x K, float64). DIAG: the two row blocks are the same; only ii <= jj is formed.
template <typename T, int RI, int RJ, bool DIAG>
void gram_tile(const T* const* rows_i, const T* const* rows_j, int64_t c0, int64_t c1, double* out, int64_t K,
               int64_t i0, int64_t j0) {
  vf acc[RI][RJ] = {};
  for (int64_t c = c0; c < c1; c += kLanes) {
    vf a[RI];
#pragma GCC unroll 8
    for (int ii = 0; ii < RI; ++ii) a[ii] = load(rows_i[ii] + c);
#pragma GCC unroll 8
    for (int jj = 0; jj < RJ; ++jj) {
      const vf b = DIAG ? a[jj] : load(rows_j[jj] + c);
#pragma GCC unroll 8
      for (int ii = 0; ii < RI; ++ii) {
        if (!DIAG || ii <= jj) acc[ii][jj] += a[ii] * b;
      }
    }
  }
#pragma GCC unroll 8
  for (int ii = 0; ii < RI; ++ii) {
#pragma GCC unroll 8
    for (int jj = 0; jj < RJ; ++jj) {
      if (!DIAG || ii <= jj) out[(i0 + ii) * K + j0 + jj] += lane_sum(acc[ii][jj]);
    }
  }
}

template <typename T>
using TileFn = void (*)(const T* const*, const T* const*, int64_t, int64_t, double*, int64_t, int64_t, int64_t);

// Tile kernels for every (rows in block i, rows in block j) up to kTile, indexed [RI-1][RJ-1];
// the diagonal kernels (RI == RJ, same block) in a separate table.
template <typename T, int... Idx>
constexpr auto make_tile_table(std::integer_sequence<int, Idx...>) {
  return std::array<TileFn<T>, sizeof...(Idx)>{&gram_tile<T, Idx / kTile + 1, Idx % kTile + 1, false>...};
}
template <typename T, int... Idx>
constexpr auto make_diag_table(std::integer_sequence<int, Idx...>) {
  return std::array<TileFn<T>, sizeof...(Idx)>{&gram_tile<T, Idx + 1, Idx + 1, true>...};
}

template <typename T>
void gram_columns(const T* base, int64_t K, int64_t row_stride, int64_t c_begin, int64_t c_end, int64_t chunk,
                  double* out) {
  static constexpr auto tiles = make_tile_table<T>(std::make_integer_sequence<int, kTile * kTile>{});
  static constexpr auto diags = make_diag_table<T>(std::make_integer_sequence<int, kTile>{});
  for (int64_t c0 = c_begin; c0 < c_end; c0 += chunk) {
    const int64_t c1 = std::min(c0 + chunk, c_end);
    for (int64_t i0 = 0; i0 < K; i0 += kTile) {
      const int ri = int(std::min<int64_t>(kTile, K - i0));
      const T* rows_i[kTile];
      for (int ii = 0; ii < ri; ++ii) rows_i[ii] = base + (i0 + ii) * row_stride;
      diags[ri - 1](rows_i, rows_i, c0, c1, out, K, i0, i0);
      for (int64_t j0 = i0 + kTile; j0 < K; j0 += kTile) {
        const int rj = int(std::min<int64_t>(kTile, K - j0));
        const T* rows_j[kTile];
        for (int jj = 0; jj < rj; ++jj) rows_j[jj] = base + (j0 + jj) * row_stride;
        tiles[(ri - 1) * kTile + (rj - 1)](rows_i, rows_j, c0, c1, out, K, i0, j0);
      }
    }
  }
}

template <typename T>
void gram_typed(const T* base, int64_t K, int64_t N, int64_t row_stride, double* out, int num_threads) {
  const int64_t vec_cols = N / kLanes * kLanes;
  // Chunk: all K rows of it stay in L2 while every tile pair passes over it.
  int64_t chunk = kLanes;
  while (chunk * 2 <= kMaxChunk && chunk * 2 * K * int64_t(sizeof(T)) <= kChunkCacheBytes) chunk *= 2;
  const int64_t groups = vec_cols / kLanes;
  const int64_t by_memory = std::max<int64_t>(1, kPartialBudgetBytes / (K * K * int64_t(sizeof(double))));
  const int64_t slabs = std::max<int64_t>(1, std::min({kMaxSlabs, (vec_cols + chunk - 1) / chunk, by_memory}));

  std::vector<double> partials(size_t(slabs * K * K), 0.0);
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t s = 0; s < slabs; ++s) {
    const int64_t c_begin = groups * s / slabs * kLanes;
    const int64_t c_end = groups * (s + 1) / slabs * kLanes;
    gram_columns(base, K, row_stride, c_begin, c_end, chunk, partials.data() + s * K * K);
  }

  for (int64_t i = 0; i < K; ++i) {
    for (int64_t j = i; j < K; ++j) {
      double sum = 0.0;
      for (int64_t s = 0; s < slabs; ++s) sum += partials[size_t(s * K * K + i * K + j)];
      // Columns past the last full SIMD group: few, summed directly in float64 — their products in float32 as
      // every other column's, so a square that overflows or underflows float32 does so in any column, on any ISA.
      for (int64_t c = vec_cols; c < N; ++c) {
        sum += double(load_scalar(base + i * row_stride + c) * load_scalar(base + j * row_stride + c));
      }
      out[i * K + j] = sum;
      out[j * K + i] = sum;
    }
  }
}

inline void gram(const MatrixView& G, double* out, int num_threads) {
  if (G.dtype == DType::BFloat16) {
    gram_typed(static_cast<const uint16_t*>(G.data), G.rows, G.cols, G.row_stride, out, num_threads);
  } else {
    gram_typed(static_cast<const float*>(G.data), G.rows, G.cols, G.row_stride, out, num_threads);
  }
}

// ---------------------------------------------------------------------------------------------
// combine

constexpr int64_t kCombineChunk = 1024;  // columns per work item: its float32 accumulator stays in L1
constexpr int kCombineRows = 4;          // rows streamed together (few streams keep the prefetcher on)

// acc[0:len) (+)= sum_{r < NR} w[r] * rows[r][c0 + ...], float32, rows in order.
template <typename T, int NR>
void accumulate_rows(float* acc, const float* w, const T* const* rows, int64_t c0, int64_t len, bool first) {
  const int64_t vec_len = len / kLanes * kLanes;
  for (int64_t c = 0; c < vec_len; c += kLanes) {
    vf s = first ? vf{} : load(acc + c);
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) s += w[r] * load(rows[r] + c0 + c);
    store(acc + c, s);
  }
  for (int64_t c = vec_len; c < len; ++c) {
    float s = first ? 0.0f : acc[c];
    for (int r = 0; r < NR; ++r) s += w[r] * load_scalar(rows[r] + c0 + c);
    acc[c] = s;
  }
}

template <typename T, typename O>
void combine_typed(const float* w, const T* base, int64_t K, int64_t N, int64_t row_stride, O* out, float alpha,
                   bool accumulate, int num_threads) {
  static constexpr void (*by_rows[kCombineRows])(float*, const float*, const T* const*, int64_t, int64_t, bool) = {
      &accumulate_rows<T, 1>, &accumulate_rows<T, 2>, &accumulate_rows<T, 3>, &accumulate_rows<T, 4>};
  const int64_t chunks = (N + kCombineChunk - 1) / kCombineChunk;
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t ch = 0; ch < chunks; ++ch) {
    alignas(64) float acc[kCombineChunk];
    const int64_t c0 = ch * kCombineChunk;
    const int64_t len = std::min(kCombineChunk, N - c0);
    for (int64_t k0 = 0; k0 < K; k0 += kCombineRows) {
      const int nr = int(std::min<int64_t>(kCombineRows, K - k0));
      const T* rows[kCombineRows];
      for (int r = 0; r < nr; ++r) rows[r] = base + (k0 + r) * row_stride;
      by_rows[nr - 1](acc, w + k0, rows, c0, len, k0 == 0);
    }
    O* dst = out + c0;
    const int64_t vec_len = len / kLanes * kLanes;
    for (int64_t c = 0; c < vec_len; c += kLanes) {
      vf v = alpha * load(acc + c);
      if (accumulate) v += load(dst + c);
      store(dst + c, v);
    }
    for (int64_t c = vec_len; c < len; ++c) {
      float v = alpha * acc[c];
      if (accumulate) v += load_scalar(dst + c);
      store_scalar(dst + c, v);
    }
  }
}

template <typename T>
void combine_to(const float* w, const MatrixView& G, void* out, DType out_dtype, float alpha, bool accumulate,
                int num_threads) {
  const T* base = static_cast<const T*>(G.data);
  if (out_dtype == DType::BFloat16) {
    combine_typed(w, base, G.rows, G.cols, G.row_stride, static_cast<uint16_t*>(out), alpha, accumulate,
                  num_threads);
  } else {
    combine_typed(w, base, G.rows, G.cols, G.row_stride, static_cast<float*>(out), alpha, accumulate, num_threads);
  }
}

inline void combine(const float* w, const MatrixView& G, void* out, DType out_dtype, float alpha, bool accumulate,
                    int num_threads) {
  if (G.dtype == DType::BFloat16) {
    combine_to<uint16_t>(w, G, out, out_dtype, alpha, accumulate, num_threads);
  } else {
    combine_to<float>(w, G, out, out_dtype, alpha, accumulate, num_threads);
  }
}

// ---------------------------------------------------------------------------------------------
// row_norms and the DB-MTL EMA: both sum the squares of a value per entry of each row; `Values` says which.
// Values::at(k, c) gives kLanes values of row k from column c, Values::at_scalar(k, c) one value.

// w ⊙ g_k (w unused unless WEIGHTED).
template <typename T, typename W, bool WEIGHTED>
struct WeightedRows {
  const T* base;
  int64_t row_stride;
  const W* w;
  vf at(int64_t k, int64_t c) const {
    vf v = load(base + k * row_stride + c);
    if constexpr (WEIGHTED) v *= load(w + c);
    return v;
  }
  float at_scalar(int64_t k, int64_t c) const {
    float v = load_scalar(base + k * row_stride + c);
    if constexpr (WEIGHTED) v *= load_scalar(w + c);
    return v;
  }
};

// DB-MTL's EMA step b_k ← decay · b_k + gain_k · g_k in float32: stored into the buffer, and returned. A
// non-finite b (left by an overflowed step that a GradScaler skipped) restarts from 0: b_k ← gain_k · g_k.
template <typename T>
struct EmaRows {
  float* buffer;
  int64_t buffer_stride;
  const T* base;
  int64_t row_stride;
  float decay;
  const float* gain;
  static vf finite_or_zero(vf b) {
    const vi finite = ((vu)b & 0x7f800000u) != 0x7f800000u;  // exponent not all ones: neither Inf nor NaN
    return (vf)((vu)b & (vu)finite);
  }
  vf at(int64_t k, int64_t c) const {
    float* b = buffer + k * buffer_stride + c;
    const vf v = decay * finite_or_zero(load(b)) + gain[k] * load(base + k * row_stride + c);
    store(b, v);
    return v;
  }
  float at_scalar(int64_t k, int64_t c) const {
    float* b = buffer + k * buffer_stride + c;
    *b = decay * (std::isfinite(*b) ? *b : 0.0f) + gain[k] * load_scalar(base + k * row_stride + c);
    return *b;
  }
};

// Sum over columns [c0, c1) (a multiple of kLanes, at most kMaxChunk) of row k's squared values in float32
// lanes (kMaxLaneTerms products per lane at most), returned as float64.
template <class Values>
double chunk_sum_squares(const Values& values, int64_t k, int64_t c0, int64_t c1) {
  vf acc = {};
  for (int64_t c = c0; c < c1; c += kLanes) {
    const vf v = values.at(k, c);
    acc += v * v;
  }
  return lane_sum(acc);
}

// out[k] = sqrt(sum over the N columns of row k's squared values), each value visited once.
template <class Values>
void row_sums_of_squares(const Values& values, int64_t K, int64_t N, double* out, int num_threads) {
  const int64_t vec_cols = N / kLanes * kLanes;
  const int64_t groups = vec_cols / kLanes;
  // Fixed column partition (it depends on N only), so the sums do not depend on the thread count.
  const int64_t slabs = std::max<int64_t>(1, std::min(kMaxSlabs, (vec_cols + kMaxChunk - 1) / kMaxChunk));
  std::vector<double> partials(size_t(slabs * K), 0.0);
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t s = 0; s < slabs; ++s) {
    const int64_t c_begin = groups * s / slabs * kLanes;
    const int64_t c_end = groups * (s + 1) / slabs * kLanes;
    double* partial = partials.data() + s * K;
    // Chunk-major: a weight chunk stays in L1 while every row passes over it.
    for (int64_t c0 = c_begin; c0 < c_end; c0 += kMaxChunk) {
      const int64_t c1 = std::min(c0 + kMaxChunk, c_end);
      for (int64_t k = 0; k < K; ++k) partial[k] += chunk_sum_squares(values, k, c0, c1);
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    double sum = 0.0;
    for (int64_t s = 0; s < slabs; ++s) sum += partials[size_t(s * K + k)];
    // Columns past the last full SIMD group: few, their squares added one by one.
    for (int64_t c = vec_cols; c < N; ++c) {
      const float v = values.at_scalar(k, c);
      sum += double(v * v);
    }
    out[k] = std::sqrt(sum);
  }
}

template <typename T>
void row_norms_weighted_by(const T* base, const MatrixView& G, const void* weight, DType weight_dtype, double* out,
                           int num_threads) {
  const int64_t K = G.rows;
  const int64_t N = G.cols;
  if (weight == nullptr) {
    row_sums_of_squares(WeightedRows<T, T, false>{base, G.row_stride, base}, K, N, out, num_threads);
  } else if (weight_dtype == DType::BFloat16) {
    const auto* w = static_cast<const uint16_t*>(weight);
    row_sums_of_squares(WeightedRows<T, uint16_t, true>{base, G.row_stride, w}, K, N, out, num_threads);
  } else {
    const auto* w = static_cast<const float*>(weight);
    row_sums_of_squares(WeightedRows<T, float, true>{base, G.row_stride, w}, K, N, out, num_threads);
  }
}

inline void row_norms(const MatrixView& G, const void* weight, DType weight_dtype, double* out, int num_threads) {
  if (G.dtype == DType::BFloat16) {
    row_norms_weighted_by(static_cast<const uint16_t*>(G.data), G, weight, weight_dtype, out, num_threads);
  } else {
    row_norms_weighted_by(static_cast<const float*>(G.data), G, weight, weight_dtype, out, num_threads);
  }
}

inline void ema_row_norms(float* buffer, int64_t buffer_stride, const MatrixView& G, const float* decay_address,
                          const float* gain, double* out, int num_threads) {
  const float decay = *decay_address;
  if (G.dtype == DType::BFloat16) {
    const auto* base = static_cast<const uint16_t*>(G.data);
    const EmaRows<uint16_t> rows{buffer, buffer_stride, base, G.row_stride, decay, gain};
    row_sums_of_squares(rows, G.rows, G.cols, out, num_threads);
  } else {
    const EmaRows<float> rows{buffer, buffer_stride, static_cast<const float*>(G.data), G.row_stride, decay, gain};
    row_sums_of_squares(rows, G.rows, G.cols, out, num_threads);
  }
}

// ---------------------------------------------------------------------------------------------
// perturb

constexpr int64_t kPerturbChunk = int64_t(1) << 14;  // columns per work item

// out[c] = base[c] + s * (base[c]^2 * dir[c] if ADAPTIVE else dir[c]), float32. out may be base: every
// element is loaded before it is stored.
template <typename O, typename D, bool ADAPTIVE>
void perturb_typed(const O* base, const D* dir, float s, O* out, int64_t n, int num_threads) {
  const int64_t chunks = (n + kPerturbChunk - 1) / kPerturbChunk;
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t c0 = ch * kPerturbChunk;
    const int64_t c1 = std::min(n, c0 + kPerturbChunk);
    const int64_t vec_end = c0 + (c1 - c0) / kLanes * kLanes;
    for (int64_t c = c0; c < vec_end; c += kLanes) {
      const vf b = load(base + c);
      vf d = load(dir + c);
      if constexpr (ADAPTIVE) d *= b * b;
      store(out + c, b + s * d);
    }
    for (int64_t c = vec_end; c < c1; ++c) {
      const float b = load_scalar(base + c);
      float d = load_scalar(dir + c);
      if constexpr (ADAPTIVE) d *= b * b;
      store_scalar(out + c, b + s * d);
    }
  }
}

template <typename O, typename D>
void perturb_adaptive_or_not(const void* base, const void* dir, float s, void* out, int64_t n, bool adaptive,
                             int num_threads) {
  auto* b = static_cast<const O*>(base);
  auto* d = static_cast<const D*>(dir);
  auto* o = static_cast<O*>(out);
  if (adaptive) {
    perturb_typed<O, D, true>(b, d, s, o, n, num_threads);
  } else {
    perturb_typed<O, D, false>(b, d, s, o, n, num_threads);
  }
}

template <typename O>
void perturb_to(const void* base, const void* dir, DType dir_dtype, float s, void* out, int64_t n, bool adaptive,
                int num_threads) {
  if (dir_dtype == DType::BFloat16) {
    perturb_adaptive_or_not<O, uint16_t>(base, dir, s, out, n, adaptive, num_threads);
  } else {
    perturb_adaptive_or_not<O, float>(base, dir, s, out, n, adaptive, num_threads);
  }
}

inline void perturb(const void* base, const void* direction, DType direction_dtype, const void* scale,
                    bool scale_is_double, void* out, DType dtype, int64_t n, bool adaptive, int num_threads) {
  const float s = scale_is_double ? float(*static_cast<const double*>(scale)) : *static_cast<const float*>(scale);
  if (dtype == DType::BFloat16) {
    perturb_to<uint16_t>(base, direction, direction_dtype, s, out, n, adaptive, num_threads);
  } else {
    perturb_to<float>(base, direction, direction_dtype, s, out, n, adaptive, num_threads);
  }
}

// ---------------------------------------------------------------------------------------------
// graddrop

typedef uint64_t vq __attribute__((vector_size(FLATMTL_VEC_BYTES)));  // kLanes / 2 lanes
typedef double vd __attribute__((vector_size(FLATMTL_VEC_BYTES)));
typedef int64_t vl __attribute__((vector_size(FLATMTL_VEC_BYTES)));
typedef float vhf __attribute__((vector_size(FLATMTL_VEC_BYTES / 2)));  // kWide float32 lanes
constexpr int kWide = kLanes / 2;                // float64 / uint64 lanes per register
constexpr int kPhiloxStreams = 4;                // independent registers in flight: hides the multiply latency
constexpr int kPhiloxBlock = kPhiloxStreams * kWide;
constexpr int64_t kDropChunk = 512;              // columns whose K rows stay in L1 across the two passes
static_assert(kDropChunk % kPhiloxBlock == 0, "a GradDrop chunk holds whole Philox blocks");

// Low 32 bits of each 64-bit lane of a times those of b, as a full 64-bit product. GCC lowers the
// generic form to a 64 x 64 multiply (vpmullq, or three multiplies on AVX2), 3-7x slower than pmuludq.
inline vq mul_low32(vq a, vq b) {
#if defined(__AVX512F__) && FLATMTL_VEC_BYTES == 64
  return (vq)_mm512_mul_epu32((__m512i)a, (__m512i)b);
#elif defined(__AVX2__) && FLATMTL_VEC_BYTES == 32
  return (vq)_mm256_mul_epu32((__m256i)a, (__m256i)b);
#elif defined(__SSE2__) && FLATMTL_VEC_BYTES == 16
  return (vq)_mm_mul_epu32((__m128i)a, (__m128i)b);
#else
  return (a & 0xFFFFFFFFu) * (b & 0xFFFFFFFFu);
#endif
}

// Triton's tl.rand(seed, offset) for the kPhiloxBlock consecutive int64 offsets from `first`
// (Philox-4x32-10, first output word, then int32 bitcast, ~x where negative, float32(x) * 4.6566127342e-10f):
// see reference/_philox.py. 32-bit words live in 64-bit lanes so one multiply gives both halves of the
// 32 x 32 -> 64 product; only the low 32 bits of a lane are meaningful (mul_low32 ignores the rest).
inline void philox_uniform(uint64_t seed, int64_t first, float* u) {
  constexpr uint64_t kMask = 0xFFFFFFFFu;
  vq c0[kPhiloxStreams], c1[kPhiloxStreams], c2[kPhiloxStreams], c3[kPhiloxStreams];
  for (int s = 0; s < kPhiloxStreams; ++s) {
    vq offsets;
    for (int l = 0; l < kWide; ++l) offsets[l] = uint64_t(first + s * kWide + l);
    c0[s] = offsets;
    c1[s] = offsets >> 32;
    c2[s] = c3[s] = vq{};
  }
  uint64_t k0 = seed & kMask, k1 = seed >> 32;
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
#pragma GCC unroll 8
    for (int s = 0; s < kPhiloxStreams; ++s) {
      const vq pb = mul_low32(c2[s], vq{} + 0xCD9E8D57u);
      const vq pa = mul_low32(c0[s], vq{} + 0xD2511F53u);
      c0[s] = (pb >> 32) ^ c1[s] ^ k0;
      c2[s] = (pa >> 32) ^ c3[s] ^ k1;
      c1[s] = pb;
      c3[s] = pa;
    }
    k0 = (k0 + 0x9E3779B9u) & kMask;
    k1 = (k1 + 0xBB67AE85u) & kMask;
  }
  for (int s = 0; s < kPhiloxStreams; ++s) {
    const vq x = c0[s] & kMask;
    const vq positive = (x >= 0x80000000u) ? (~x & kMask) : x;
    // int -> double exactly (x < 2^52) without an int64 conversion, which AVX2 lacks: (2^52 + x) - 2^52
    const vd exact = (vd)(positive | 0x4330000000000000u) - 0x1p52;
    const vhf v = __builtin_convertvector(exact, vhf) * 4.6566127342e-10f;
    std::memcpy(u + s * kWide, &v, sizeof v);
  }
}

inline vd widen(const float* p) {
  vhf h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, vd);
}
inline vd widen(const uint16_t* p) {
  vd v;
  for (int l = 0; l < kWide; ++l) v[l] = double(load_scalar(p + l));
  return v;
}

// d[c] = sum_k (leak_k + (1 - leak_k) keep_k[c]) g_k[c] for the kPhiloxBlock columns starting at rows[k] + at,
// with uniforms u; decided and summed in float64 in the reference's order (reference/graddrop.py), so the
// result matches it bit for bit. kPhiloxStreams registers per sum keep the adds off one dependency chain.
template <typename T>
inline void graddrop_block(const T* const* rows, int64_t at, const double* leak, int64_t K, const float* u,
                           double* d) {
  constexpr int S = kPhiloxStreams;
  vd total[S] = {}, magnitude[S] = {};
  for (int64_t k = 0; k < K; ++k) {
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) {
      const vd g = widen(rows[k] + at + s * kWide);
      total[s] += g;
      magnitude[s] += (g < 0) ? -g : g;
    }
  }
  vl above[S], below[S];
  for (int s = 0; s < S; ++s) {
    const vd p = 0.5 * (1.0 + total[s] / ((magnitude[s] > 0) ? magnitude[s] : vd{} + 1.0));
    const vd u_s = widen(u + s * kWide);
    above[s] = p > u_s;
    below[s] = p < u_s;
  }
  vd sum[S] = {};
  for (int64_t k = 0; k < K; ++k) {
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) {
      const vd g = widen(rows[k] + at + s * kWide);
      const vl keep = (above[s] & (g > 0)) | (below[s] & (g < 0));
      const vd kept = keep ? vd{} + 1.0 : vd{};
      sum[s] += (leak[k] + (1.0 - leak[k]) * kept) * g;
    }
  }
  std::memcpy(d, sum, sizeof sum);
}

template <typename T, typename O>
void graddrop_typed(const T* base, int64_t K, int64_t N, int64_t row_stride, const double* leak, uint64_t seed,
                    O* out, int num_threads) {
  const int64_t chunks = (N + kDropChunk - 1) / kDropChunk;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<const T*> rows(static_cast<size_t>(K)), padded_rows(static_cast<size_t>(K));
    std::vector<T> padded(size_t(K * kPhiloxBlock));  // the last partial block, zero-filled
    for (int64_t k = 0; k < K; ++k) {
      rows[size_t(k)] = base + k * row_stride;
      padded_rows[size_t(k)] = padded.data() + k * kPhiloxBlock;
    }
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t c_end = std::min(N, (ch + 1) * kDropChunk);
      for (int64_t c0 = ch * kDropChunk; c0 < c_end; c0 += kPhiloxBlock) {
        float u[kPhiloxBlock];
        double d[kPhiloxBlock];
        philox_uniform(seed, c0, u);
        const int64_t valid = std::min<int64_t>(kPhiloxBlock, c_end - c0);
        if (valid == kPhiloxBlock) {
          graddrop_block(rows.data(), c0, leak, K, u, d);
        } else {
          std::fill(padded.begin(), padded.end(), T(0));
          for (int64_t k = 0; k < K; ++k) {
            std::copy(rows[size_t(k)] + c0, rows[size_t(k)] + c0 + valid, padded.begin() + k * kPhiloxBlock);
          }
          graddrop_block(padded_rows.data(), 0, leak, K, u, d);
        }
        for (int64_t l = 0; l < valid; ++l) store_scalar(out + c0 + l, float(d[l]));
      }
    }
  }
}

inline void graddrop(const MatrixView& G, const double* leak, uint64_t seed, void* out, DType out_dtype,
                     int num_threads) {
  auto run = [&](auto* typed_base) {
    if (out_dtype == DType::BFloat16) {
      graddrop_typed(typed_base, G.rows, G.cols, G.row_stride, leak, seed, static_cast<uint16_t*>(out), num_threads);
    } else {
      graddrop_typed(typed_base, G.rows, G.cols, G.row_stride, leak, seed, static_cast<float*>(out), num_threads);
    }
  };
  if (G.dtype == DType::BFloat16) {
    run(static_cast<const uint16_t*>(G.data));
  } else {
    run(static_cast<const float*>(G.data));
  }
}

}  // namespace flatmtl::cpu::FLATMTL_ISA
