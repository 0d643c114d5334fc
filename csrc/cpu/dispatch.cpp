// Run-time choice of the CPU kernels' instruction set: the best one this CPU (and OS) supports,
// unless FLATMTL_CPU_ISA or set_isa() asks for a lower one (tests run every variant).
#include <atomic>
#include <cstdlib>
#include <stdexcept>

#include "flatmtl/streaming.h"

#define FLATMTL_DECLARE_ISA(ns)                                                                              \
  namespace flatmtl::cpu::ns {                                                                               \
  void gram_entry(const MatrixView& G, double* out, int num_threads);                                        \
  void combine_entry(const float* w, const MatrixView& G, void* out, DType out_dtype, float alpha, bool acc, \
                     int num_threads);                                                                       \
  void graddrop_entry(const MatrixView& G, const double* leak, uint64_t seed, void* out, DType out_dtype,     \
                      int num_threads);                                                                      \
  void row_norms_entry(const MatrixView& G, const void* weight, DType weight_dtype, double* out,              \
                       int num_threads);                                                                     \
  void ema_row_norms_entry(float* buffer, int64_t buffer_stride, const MatrixView& G, const float* decay,     \
                           const float* gain, double* out, int num_threads);                                 \
  void perturb_entry(const void* base, const void* direction, DType direction_dtype, const void* scale,      \
                     bool scale_is_double, void* out, DType dtype, int64_t count, bool adaptive,             \
                     int num_threads);                                                                       \
  }
FLATMTL_DECLARE_ISA(portable)
#ifndef FLATMTL_PORTABLE_ONLY
FLATMTL_DECLARE_ISA(avx2)
FLATMTL_DECLARE_ISA(avx512)
#endif

namespace flatmtl::cpu {
namespace {

enum class Isa : int { Portable = 0, Avx2 = 1, Avx512 = 2 };
const char* const kIsaNames[] = {"portable", "avx2", "avx512"};

Isa best_supported() {
#ifdef FLATMTL_PORTABLE_ONLY
  return Isa::Portable;
#else
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
  return Isa::Portable;
#endif
}

Isa parse(const std::string& name) {
  for (int i = 0; i < 3; ++i) {
    if (name == kIsaNames[i]) return Isa(i);
  }
  throw std::invalid_argument("unknown CPU instruction set '" + name + "' (expected portable, avx2 or avx512)");
}

Isa initial() {
  const Isa best = best_supported();
  const char* env = std::getenv("FLATMTL_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  const Isa wanted = parse(env);
  return int(wanted) <= int(best) ? wanted : best;
}

std::atomic<int>& current() {
  static std::atomic<int> isa{int(initial())};
  return isa;
}

}  // namespace

std::string isa() { return kIsaNames[current().load()]; }

std::string supported_isas() {
  std::string out;
  for (int i = 0; i <= int(best_supported()); ++i) out += std::string(i ? "," : "") + kIsaNames[i];
  return out;
}

void set_isa(const std::string& name) {
  const Isa wanted = parse(name);
  if (int(wanted) > int(best_supported())) {
    throw std::invalid_argument("this CPU does not support the '" + name + "' instruction set");
  }
  current().store(int(wanted));
}

// Calls `entry` of the instruction set in force with the given arguments.
#ifdef FLATMTL_PORTABLE_ONLY
#define FLATMTL_DISPATCH(entry, ...) return portable::entry(__VA_ARGS__)
#else
#define FLATMTL_DISPATCH(entry, ...)                                \
  switch (Isa(current().load())) {                                  \
    case Isa::Avx512: return avx512::entry(__VA_ARGS__);            \
    case Isa::Avx2: return avx2::entry(__VA_ARGS__);                \
    default: return portable::entry(__VA_ARGS__);                   \
  }
#endif

void gram(const MatrixView& G, double* out, int num_threads) { FLATMTL_DISPATCH(gram_entry, G, out, num_threads); }

void combine(const float* w, const MatrixView& G, void* out, DType out_dtype, float alpha, bool accumulate,
             int num_threads) {
  FLATMTL_DISPATCH(combine_entry, w, G, out, out_dtype, alpha, accumulate, num_threads);
}

void graddrop(const MatrixView& G, const double* leak, uint64_t seed, void* out, DType out_dtype, int num_threads) {
  FLATMTL_DISPATCH(graddrop_entry, G, leak, seed, out, out_dtype, num_threads);
}

void row_norms(const MatrixView& G, const void* weight, DType weight_dtype, double* out, int num_threads) {
  FLATMTL_DISPATCH(row_norms_entry, G, weight, weight_dtype, out, num_threads);
}

void ema_row_norms(float* buffer, int64_t buffer_stride, const MatrixView& G, const float* decay, const float* gain,
                   double* out, int num_threads) {
  FLATMTL_DISPATCH(ema_row_norms_entry, buffer, buffer_stride, G, decay, gain, out, num_threads);
}

void perturb(const void* base, const void* direction, DType direction_dtype, const void* scale, bool scale_is_double,
             void* out, DType dtype, int64_t count, bool adaptive, int num_threads) {
  FLATMTL_DISPATCH(perturb_entry, base, direction, direction_dtype, scale, scale_is_double, out, dtype, count,
                   adaptive, num_threads);
}

}  // namespace flatmtl::cpu
