// Nash-MTL (reference/nash_mtl.py): α > 0 with M α = 1/α, by the reference's damped Newton on
// f(α) = ½αᵀMα − Σ log α_i over the rows with M_ii > 0, warm-started from the previous α (the state),
// then ‖d‖ = √(αᵀMα) clipped to max_norm.
#pragma once

#include "flatmtl/solvers/common.h"

namespace flatmtl::solvers {

constexpr double kNashTol = 1e-10;  // max_i |α_i (Mα)_i − 1|, as NASH_TOL

// ½αᵀMα − Σ log α_i; y (n) is scratch.
FLATMTL_HD inline double nash_objective(const double* M, int n, const double* a, double* y) {
  double f = 0.5 * quad_form(M, n, a, y);
  for (int i = 0; i < n; ++i) f -= log(a[i]);
  return f;
}

// Rescales a along its ray so that aᵀMa = n (the best multiple), when aᵀMa > 0.
FLATMTL_HD inline void nash_rescale(const double* M, int n, double* a, double* y) {
  const double q = quad_form(M, n, a, y);
  if (q > 0.0) {
    const double t = sqrt(n / q);
    for (int i = 0; i < n; ++i) a[i] *= t;
  }
}

// Solves on the n x n M (overwritten by M/‖M‖_F), from start (n, overwritten); α in alpha (n).
// converged = 0 when no solution was found within max_iter + 1 residual checks (alpha then undefined).
// work: n² + 4n.
FLATMTL_HD inline Status nash_weights(double* M, int n, double* start, int max_iter, double* alpha, double* work) {
  double* factor = work;
  double* Ma = work + int64_t(n) * n;
  double* grad = Ma + n;
  double* step = grad + n;
  double* other = step + n;
  const double scale = normalize_frobenius(M, n);
  // Two starts: the warm start and the exact solution for a diagonal M; keep the lower f.
  for (int i = 0; i < n; ++i) {
    alpha[i] = start[i] * sqrt(scale);
    other[i] = 1.0 / sqrt(M[i * n + i]);
  }
  nash_rescale(M, n, alpha, Ma);
  nash_rescale(M, n, other, Ma);
  if (nash_objective(M, n, other, Ma) < nash_objective(M, n, alpha, Ma)) {
    for (int i = 0; i < n; ++i) alpha[i] = other[i];
  }
  for (int it = 0; it <= max_iter; ++it) {
    matvec(M, n, alpha, Ma);
    double residual = 0.0;
    for (int i = 0; i < n; ++i) residual = max2(residual, fabs(alpha[i] * Ma[i] - 1.0));
    if (residual <= kNashTol) {
      for (int i = 0; i < n; ++i) alpha[i] /= sqrt(scale);
      return {it, 1};
    }
    for (int i = 0; i < n; ++i) {
      grad[i] = Ma[i] - 1.0 / alpha[i];
      step[i] = -grad[i];
      for (int j = 0; j < n; ++j) factor[i * n + j] = M[i * n + j] + (i == j ? 1.0 / (alpha[i] * alpha[i]) : 0.0);
    }
    if (!cholesky(factor, n, n)) return {it, 0};  // α ran off to infinity along a null direction of M
    cholesky_solve(factor, n, n, step);
    const double decrement = clamp_sqrt(-dot(grad, step, n));
    bool finite = true;
    for (int i = 0; i < n; ++i) {
      alpha[i] += decrement > 0.25 ? step[i] / (1.0 + decrement) : step[i];
      finite = finite && isfinite(alpha[i]);
    }
    if (!finite) return {it + 1, 0};
  }
  return {max_iter + 1, 0};
}

struct NashMtl {
  double* alpha;    // K: the previous α (warm start and state), updated in place
  int max_iter;     // optim_niter
  double max_norm;  // 0 disables the clip
  int update;       // 0 on the steps between two solves (update_weights_every): reuse α

  // Scratch: the active sub-Gram and its start / solution (n ≤ K) plus nash_weights' n² + 4n.
  FLATMTL_HD static int64_t work_size(int K) { return 2 * int64_t(K) * K + 7 * int64_t(K); }

  // converged = 0 when a solve was due and found no solution (α then keeps its previous values).
  FLATMTL_HD Status operator()(const double* M, int K, double* w, double* work) const {
    Status status{0, 1};
    double* index = work;  // active rows (M_ii > 0), as doubles
    int n = 0;
    for (int i = 0; i < K; ++i) {
      if (M[i * K + i] > 0.0) index[n++] = i;
    }
    if (update && n > 0) {
      double* sub = index + K;
      double* start = sub + int64_t(n) * n;
      double* solution = start + n;
      for (int a = 0; a < n; ++a) {
        start[a] = alpha[int(index[a])];
        for (int b = 0; b < n; ++b) sub[a * n + b] = M[int(index[a]) * K + int(index[b])];
      }
      status = nash_weights(sub, n, start, max_iter, solution, solution + n);
      if (status.converged) {
        for (int a = 0; a < n; ++a) alpha[int(index[a])] = solution[a];
      }
    }
    const double norm = clamp_sqrt(quad_form(M, K, alpha, work));
    const double clip = 0.0 < max_norm && max_norm < norm ? max_norm / norm : 1.0;
    for (int i = 0; i < K; ++i) w[i] = alpha[i] * clip;
    return status;
  }
};

}  // namespace flatmtl::solvers
