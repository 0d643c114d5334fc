// Shared pieces of the K x K solvers. Everything under solvers/ is header-only float64 code that
// compiles both as plain C++ (the CPU module, so CI tests the very code the GPU runs) and as
// __host__ __device__ code under nvcc (single-block kernels, csrc/cuda/solvers.cu). Hence: no
// allocation, no STL containers, no exceptions, no recursion; scratch comes from the caller and
// every loop has a fixed budget.
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define FLATMTL_HD __host__ __device__
#else
#define FLATMTL_HD
#endif

namespace flatmtl::solvers {

// What every solver reports: the iterations it used and whether it met its stopping rule within
// its budget (closed forms report 0 iterations, converged).
struct Status {
  int iterations;
  int converged;
};

constexpr double kDoubleEps = 2.220446049250313e-16;  // DBL_EPSILON, usable in device code

FLATMTL_HD inline double max2(double a, double b) { return a > b ? a : b; }
FLATMTL_HD inline double min2(double a, double b) { return a < b ? a : b; }
FLATMTL_HD inline double clamp_sqrt(double x) { return sqrt(x > 0.0 ? x : 0.0); }

// y = M x for a symmetric K x K M, as Σ_k x_k M_k (rows = columns): contiguous, vectorisable lanes,
// and the zero entries of a sparse x (Frank–Wolfe iterates, coefficient rows) are skipped.
FLATMTL_HD inline void matvec(const double* __restrict__ M, int K, const double* __restrict__ x,
                              double* __restrict__ y) {
  for (int i = 0; i < K; ++i) y[i] = 0.0;
  for (int k = 0; k < K; ++k) {
    const double xk = x[k];
    if (xk == 0.0) continue;
    const double* row = M + int64_t(k) * K;
    for (int i = 0; i < K; ++i) y[i] += xk * row[i];
  }
}

// Four interleaved partial sums: a plain loop is one dependent chain of adds (latency-bound, and
// compilers may not reassociate it without -ffast-math).
FLATMTL_HD inline double dot(const double* a, const double* b, int K) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int k = 0;
  for (; k + 4 <= K; k += 4) {
    s0 += a[k] * b[k];
    s1 += a[k + 1] * b[k + 1];
    s2 += a[k + 2] * b[k + 2];
    s3 += a[k + 3] * b[k + 3];
  }
  for (; k < K; ++k) s0 += a[k] * b[k];
  return (s0 + s1) + (s2 + s3);
}

// xᵀ M x, using y (K) as scratch for M x.
FLATMTL_HD inline double quad_form(const double* M, int K, const double* x, double* y) {
  matvec(M, K, x, y);
  return dot(x, y, K);
}

FLATMTL_HD inline double trace(const double* M, int K) {
  double s = 0.0;
  for (int i = 0; i < K; ++i) s += M[i * K + i];
  return s;
}

// In-place Cholesky of the leading n x n block of A (row stride lda), lower triangle = L.
// Returns false on a non-positive (or NaN) pivot.
FLATMTL_HD inline bool cholesky(double* A, int n, int lda) {
  for (int j = 0; j < n; ++j) {
    double d = A[j * lda + j];
    for (int k = 0; k < j; ++k) d -= A[j * lda + k] * A[j * lda + k];
    if (!(d > 0.0)) return false;
    d = sqrt(d);
    A[j * lda + j] = d;
    for (int i = j + 1; i < n; ++i) {
      double s = A[i * lda + j];
      for (int k = 0; k < j; ++k) s -= A[i * lda + k] * A[j * lda + k];
      A[i * lda + j] = s / d;
    }
  }
  return true;
}

// Solves L Lᵀ x = b in place (b -> x) with the factor from cholesky().
FLATMTL_HD inline void cholesky_solve(const double* L, int n, int lda, double* b) {
  for (int i = 0; i < n; ++i) {
    double s = b[i];
    for (int k = 0; k < i; ++k) s -= L[i * lda + k] * b[k];
    b[i] = s / L[i * lda + i];
  }
  for (int i = n - 1; i >= 0; --i) {
    double s = b[i];
    for (int k = i + 1; k < n; ++k) s -= L[k * lda + i] * b[k];
    b[i] = s / L[i * lda + i];
  }
}

}  // namespace flatmtl::solvers
