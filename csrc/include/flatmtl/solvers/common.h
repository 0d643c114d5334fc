// Shared pieces of the K x K solvers. Everything under solvers/ is header-only float64 code that
// compiles both as plain C++ (the CPU module, so CI tests the very code the GPU runs) and as
// __host__ __device__ code under nvcc (single-block kernels, csrc/cuda/solvers.cu). Hence: no
// allocation, no STL containers, no exceptions, no recursion; scratch comes from the caller and
// every loop has a fixed budget.
#pragma once

#include <math.h>
#include <stdint.h>

#include "flatmtl/solvers/team.h"

namespace flatmtl::solvers {

// What every solver reports: the iterations it used and whether it met its stopping rule within
// its budget (closed forms report 0 iterations, converged).
struct Status {
  int iterations;
  int converged;
};

constexpr double kDoubleEps = 2.220446049250313e-16;  // DBL_EPSILON, usable in device code
constexpr double kDoubleMax = 1.7976931348623157e308;  // DBL_MAX, likewise

// Whether x[first], x[first + step], ... (below n) are all finite.
FLATMTL_HD inline bool all_finite(const double* x, int64_t n, int64_t first = 0, int64_t step = 1) {
  int finite = 1;
  for (int64_t i = first; i < n; i += step) finite &= fabs(x[i]) <= kDoubleMax;  // false for NaN and ±Inf
  return finite != 0;
}

FLATMTL_HD inline double max2(double a, double b) { return a > b ? a : b; }
FLATMTL_HD inline double min2(double a, double b) { return a < b ? a : b; }
FLATMTL_HD inline double clamp_sqrt(double x) { return sqrt(x > 0.0 ? x : 0.0); }

// y += a x over n entries, four per step with the loads ahead of the stores: GCC's -O2 cost model
// vectorises only such straight-line groups (not loops of unknown trip count), and reading first
// keeps the group valid even when x and y overlap.
FLATMTL_HD inline void axpy(double a, const double* x, double* y, int n) {
  int k = 0;
  for (; k + 4 <= n; k += 4) {
    const double x0 = x[k], x1 = x[k + 1], x2 = x[k + 2], x3 = x[k + 3];
    const double y0 = y[k], y1 = y[k + 1], y2 = y[k + 2], y3 = y[k + 3];
    y[k] = y0 + a * x0;
    y[k + 1] = y1 + a * x1;
    y[k + 2] = y2 + a * x2;
    y[k + 3] = y3 + a * x3;
  }
  for (; k < n; ++k) y[k] += a * x[k];
}

// y = (((y + a0 r0) + a1 r1) + a2 r2) + a3 r3 over n entries: four rows per load and store of y,
// in the order of four axpy calls (so the same rounding), two entries per step for the vectoriser.
FLATMTL_HD inline void axpy4(const double* a, const double* const* r, double* y, int n) {
  const double a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
  const double *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3];
  int k = 0;
  for (; k + 2 <= n; k += 2) {
    const double y0 = y[k], y1 = y[k + 1];
    y[k] = (((y0 + a0 * r0[k]) + a1 * r1[k]) + a2 * r2[k]) + a3 * r3[k];
    y[k + 1] = (((y1 + a0 * r0[k + 1]) + a1 * r1[k + 1]) + a2 * r2[k + 1]) + a3 * r3[k + 1];
  }
  if (k < n) y[k] = (((y[k] + a0 * r0[k]) + a1 * r1[k]) + a2 * r2[k]) + a3 * r3[k];
}

// y += Σ_f x_{j_f} M_{j_f} over the indices j_f = rows[f] (f < n; rows null: j_f = f) of the K x K
// row-major M, in the order of f, skipping zero coefficients.
FLATMTL_HD inline void add_rows(const double* M, int K, const int* rows, int n, const double* x, double* y) {
  double a[4];
  const double* r[4];
  int held = 0;
  for (int f = 0; f < n; ++f) {
    const int j = rows ? rows[f] : f;
    if (x[j] == 0.0) continue;
    a[held] = x[j];
    r[held++] = M + int64_t(j) * K;
    if (held == 4) {
      axpy4(a, r, y, K);
      held = 0;
    }
  }
  for (int h = 0; h < held; ++h) axpy(a[h], r[h], y, K);
}

// y = M x for a symmetric K x K M, as Σ_k x_k M_k (rows = columns): contiguous, vectorisable lanes,
// and the zero entries of a sparse x (Frank–Wolfe iterates, coefficient rows) are skipped. A team splits
// the entries y_i, each summed over k in the same order (so the same bits); on a GPU its workers then read
// consecutive addresses of each row.
template <class Team = SoloTeam>
FLATMTL_HD inline void matvec(const double* __restrict__ M, int K, const double* __restrict__ x,
                              double* __restrict__ y, const Team& team = Team{}) {
  if (team.size() == 1) {
    for (int i = 0; i < K; ++i) y[i] = 0.0;
    add_rows(M, K, nullptr, K, x, y);
    return;
  }
  for (int i = first_owned(team, 0); i < K; i += team.size()) {
    double s = 0.0;
    for (int k = 0; k < K; ++k) {
      if (x[k] != 0.0) s += x[k] * M[int64_t(k) * K + i];
    }
    y[i] = s;
  }
  team.sync();
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

// xᵀ M x, using y (K) as scratch for M x. A team returns once every worker has read y.
template <class Team = SoloTeam>
FLATMTL_HD inline double quad_form(const double* M, int K, const double* x, double* y, const Team& team = Team{}) {
  matvec(M, K, x, y, team);
  const double q = dot(x, y, K);
  team.sync();
  return q;
}

// The power of two 2^-e with 2^e ≤ max |M_ij| < 2^(e+1) (e clamped to ±1000; 1 for M = 0): multiplying by it is
// exact and brings the largest entry into [1, 2).
FLATMTL_HD inline double unit_scale(const double* M, int n) {
  double largest = 0.0;
  for (int64_t k = 0; k < int64_t(n) * n; ++k) largest = max2(largest, fabs(M[k]));
  if (!(largest > 0.0)) return 1.0;
  const int e = ilogb(largest);
  return ldexp(1.0, e < -1000 ? 1000 : e > 1000 ? -1000 : -e);
}

// Divides the n x n M by ‖M‖_F in place (Nash-MTL and FairGrad solve on the normalised Gram) and returns
// ‖M‖_F, scaled by the largest |entry| so that the squares neither overflow nor underflow (a Gram of
// gradients at 1e±100 has entries at 1e±200). The sum of squares runs by rows, then over the rows in order
// (rows: n doubles of scratch), so that a team splits the rows.
template <class Team = SoloTeam>
FLATMTL_HD inline double normalize_frobenius(double* M, int n, double* rows, const Team& team = Team{}) {
  for (int i = first_owned(team, 0); i < n; i += team.size()) {
    double largest = 0.0;
    for (int j = 0; j < n; ++j) largest = max2(largest, fabs(M[int64_t(i) * n + j]));
    rows[i] = largest;
  }
  team.sync();
  double largest = 0.0;
  for (int i = 0; i < n; ++i) largest = max2(largest, rows[i]);
  team.sync();
  double scale = largest;
  if (largest > 0.0 && isfinite(largest)) {
    for (int i = first_owned(team, 0); i < n; i += team.size()) {
      double sum = 0.0;
      for (int j = 0; j < n; ++j) sum += (M[int64_t(i) * n + j] / largest) * (M[int64_t(i) * n + j] / largest);
      rows[i] = sum;
    }
    team.sync();
    double sum = 0.0;
    for (int i = 0; i < n; ++i) sum += rows[i];
    scale = largest * sqrt(sum);
  }
  for (int i = first_owned(team, 0); i < n; i += team.size()) {
    for (int j = 0; j < n; ++j) M[int64_t(i) * n + j] /= scale;
  }
  team.sync();
  return scale;
}

// The rows i with M_ii > 0 (tasks with a non-zero gradient), in order, into index (as doubles); returns
// their number.
template <class Team = SoloTeam>
FLATMTL_HD inline int active_rows(const double* M, int K, double* index, const Team& team = Team{}) {
  int n = 0;
  for (int i = 0; i < K; ++i) {
    if (!(M[int64_t(i) * K + i] > 0.0)) continue;
    if (owns(team, n)) index[n] = i;
    ++n;
  }
  team.sync();
  return n;
}

FLATMTL_HD inline double trace(const double* M, int K) {
  double s = 0.0;
  for (int i = 0; i < K; ++i) s += M[i * K + i];
  return s;
}

// In-place Cholesky of the leading n x n block of A (row stride lda; the lower triangle is read and
// becomes L), column by column: the entries of a column are independent dot products of contiguous
// rows, so they overlap in the pipeline instead of forming one dependent chain (measured 3.8
// GMA/s at n = 64 here, against 1.8 for the row-by-row forward-solve order), and a team splits them.
// Returns false on a non-positive (or NaN) pivot.
template <class Team = SoloTeam>
FLATMTL_HD inline bool cholesky(double* A, int n, int lda, const Team& team = Team{}) {
  // Every worker reads A_jj for pivot j: its root is stored one column later, when no one reads it.
  double root = 0.0;
  for (int j = 0; j < n; ++j) {
    const double* rj = A + int64_t(j) * lda;
    const double d = rj[j] - dot(rj, rj, j);
    if (j > 0 && owns(team, j - 1)) A[int64_t(j - 1) * lda + j - 1] = root;
    if (!(d > 0.0)) return false;
    root = sqrt(d);
    const double inv = 1.0 / root;
    for (int i = first_owned(team, j + 1); i < n; i += team.size()) {
      double* ri = A + int64_t(i) * lda;
      ri[j] = (ri[j] - dot(ri, rj, j)) * inv;
    }
    team.sync();
  }
  if (n > 0 && owns(team, n - 1)) A[int64_t(n - 1) * lda + n - 1] = root;
  team.sync();
  return true;
}

// x_f = (b(f, j) − dot(L_f, x_j, f)) / L_ff for f = 0 … n−1 (forward substitution by the rows of L, row
// stride lda) for the right-hand sides j < rhs (one or two; x[j] receives solution j), rounded as dot()
// rounds. A team goes by columns instead: once x_g is final every open x_f takes its L_fg x_g into the one of
// its four partial sums that dot() would have put it in (partial: 8n doubles), and its owner completes it
// after its last term. The same operations in the same order: the single worker's bits.
template <class Team = SoloTeam, class Rhs>
FLATMTL_HD inline void forward_substitute(const double* L, int lda, int n, const Rhs& b, int rhs, double* const* x,
                                          double* partial, const Team& team = Team{}) {
  if (team.size() == 1) {
    for (int f = 0; f < n; ++f) {
      const double* row = L + int64_t(f) * lda;
      for (int j = 0; j < rhs; ++j) x[j][f] = (b(f, j) - dot(row, x[j], f)) / row[f];
    }
    return;
  }
  // partial[(4 j + p) n + f]: sum p of right-hand side j for row f.
  for (int f = first_owned(team, 0); f < n; f += team.size()) {
    for (int q = 0; q < 4 * rhs; ++q) partial[int64_t(q) * n + f] = 0.0;
    if (f == 0) {
      for (int j = 0; j < rhs; ++j) x[j][0] = (b(0, j) - ((0.0 + 0.0) + (0.0 + 0.0))) / L[0];
    }
  }
  team.sync();
  for (int g = 0; g + 1 < n; ++g) {
    for (int f = first_owned(team, g + 1); f < n; f += team.size()) {
      const double lfg = L[int64_t(f) * lda + g];
      const int sum = g < (f & ~3) ? (g & 3) : 0;  // dot() groups the first 4⌊f/4⌋ terms by four, the rest in sum 0
      for (int j = 0; j < rhs; ++j) {
        double* p = partial + int64_t(4 * j) * n + f;
        p[int64_t(sum) * n] += lfg * x[j][g];
        if (f == g + 1) {
          x[j][f] = (b(f, j) - ((p[0] + p[n]) + (p[2 * int64_t(n)] + p[3 * int64_t(n)]))) / L[int64_t(f) * lda + f];
        }
      }
    }
    team.sync();
  }
}

// Solves L Lᵀ x = b in place (b -> x) with the factor from cholesky(), by columns of L: once x_k is
// final, x_k L_k is taken off the entries still open (those below k, then those above it), which a team
// splits, and each entry's owner divides it by its diagonal after its last update.
template <class Team = SoloTeam>
FLATMTL_HD inline void cholesky_solve(const double* L, int n, int lda, double* b, const Team& team = Team{}) {
  if (n == 0) return;
  if (owns(team, 0)) b[0] /= L[0];
  team.sync();
  for (int k = 0; k < n - 1; ++k) {
    const double bk = b[k];
    for (int i = first_owned(team, k + 1); i < n; i += team.size()) {
      b[i] -= L[int64_t(i) * lda + k] * bk;
      if (i == k + 1) b[i] /= L[int64_t(i) * lda + i];
    }
    team.sync();
  }
  if (owns(team, n - 1)) b[n - 1] /= L[int64_t(n - 1) * lda + n - 1];
  team.sync();
  for (int k = n - 1; k > 0; --k) {
    const double bk = b[k];
    const double* lk = L + int64_t(k) * lda;
    for (int i = first_owned(team, 0); i < k; i += team.size()) {
      b[i] -= lk[i] * bk;
      if (i == k - 1) b[i] /= L[int64_t(i) * lda + i];
    }
    team.sync();
  }
}

// Whether a Newton iteration (Nash-MTL, FairGrad) whose scale-free residual was last_residual before its last step
// (kDoubleMax before the first) has converged, as reference/nash_mtl.py's newton_converged: below 1e-10 (NASH_TOL), or
// stalled on its rounding floor below 1e-6 (STALL_TOL; ill-conditioned M).
FLATMTL_HD inline bool newton_converged(double residual, double last_residual) {
  return residual <= 1e-10 || (last_residual <= residual && residual <= 1e-6);
}

// Σ_i w_i √M_ii of the n x n M: with √M_jj it bounds Σ_i |M_ji| w_i (Cauchy–Schwarz), the size of (Mw)_j's
// rounding; squared, that of wᵀMw.
FLATMTL_HD inline double root_weighted_sum(const double* M, int n, const double* w) {
  double sum = 0.0;
  for (int i = 0; i < n; ++i) sum += w[i] * sqrt(M[i * n + i]);
  return sum;
}

// Whether every g_i·d = (Mw)_i of a solution w > 0 (Nash-MTL, FairGrad) is above its rounding from M (unit
// roundoff eps), eps √M_ii Σ_j w_j √M_jj, as reference/nash_mtl.py's above_rounding: otherwise M does not
// resolve that task's equation (a vanishing combination of the gradients is within M's rounding).
FLATMTL_HD inline bool above_rounding(const double* M, int n, const double* w, const double* Mw, double eps) {
  const double sum = root_weighted_sum(M, n, w);
  bool above = true;
  for (int i = 0; i < n; ++i) above = above && Mw[i] > eps * sqrt(M[i * n + i]) * sum;
  return above;
}

// Of two starts x and y of a descent (Nash-MTL, FairGrad), each first moved by to_ray(v) onto its ray, x keeps
// the one with the lower objective(v).
template <class Team, class ToRay, class Objective>
FLATMTL_HD inline void keep_lower_start(double* x, double* y, int n, const ToRay& to_ray, const Objective& objective,
                                        const Team& team) {
  to_ray(x);
  to_ray(y);
  if (objective(y) < objective(x)) {
    for (int i = first_owned(team, 0); i < n; i += team.size()) x[i] = y[i];
    team.sync();
  }
}

}  // namespace flatmtl::solvers
