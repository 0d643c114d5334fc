// Nash-MTL (reference/nash_mtl.py): α > 0 with M α = 1/α, by the reference's damped Newton on
// f(α) = ½αᵀMα − Σ log α_i over the rows with M_ii > 0, warm-started from the previous α (the state),
// then ‖d‖ = √(αᵀMα) clipped to max_norm.
#pragma once

#include "flatmtl/solvers/common.h"

namespace flatmtl::solvers {

// ½αᵀMα − Σ log α_i; y (n) is scratch. A team returns once every worker has read a.
template <class Team = SoloTeam>
FLATMTL_HD inline double nash_objective(const double* M, int n, const double* a, double* y, const Team& team = Team{}) {
  double f = 0.5 * quad_form(M, n, a, y, team);
  for (int i = 0; i < n; ++i) f -= log(a[i]);
  team.sync();
  return f;
}

// Rescales a along its ray so that aᵀMa = n (the best multiple), when aᵀMa > 0.
template <class Team = SoloTeam>
FLATMTL_HD inline void nash_rescale(const double* M, int n, double* a, double* y, const Team& team = Team{}) {
  const double q = quad_form(M, n, a, y, team);
  if (q > 0.0) {
    const double t = sqrt(n / q);
    for (int i = first_owned(team, 0); i < n; i += team.size()) a[i] *= t;
  }
  team.sync();
}

// Solves on the n x n M (overwritten by M/‖M‖_F), from start (n, overwritten); α in alpha (n).
// converged = 0 when no solution was found within max_iter + 1 residual checks, or the one found is within the
// rounding of M (unit roundoff gram_eps; alpha then undefined).
// work: n² + 4n.
template <class Team = SoloTeam>
FLATMTL_HD inline Status nash_weights(double* M, int n, double* start, int max_iter, double gram_eps, double* alpha,
                                      double* work, const Team& team = Team{}) {
  double* factor = work;
  double* Ma = work + int64_t(n) * n;
  double* grad = Ma + n;
  double* step = grad + n;
  double* other = step + n;
  const double scale = normalize_frobenius(M, n, factor, team);
  // Two starts: the warm start and the exact solution for a diagonal M; keep the lower f.
  for (int i = first_owned(team, 0); i < n; i += team.size()) {
    alpha[i] = start[i] * sqrt(scale);
    other[i] = 1.0 / sqrt(M[i * n + i]);
  }
  team.sync();
  keep_lower_start(
      alpha, other, n, [&](double* v) { nash_rescale(M, n, v, Ma, team); },
      [&](const double* v) { return nash_objective(M, n, v, Ma, team); }, team);
  double last_residual = kDoubleMax;  // above any residual: no stall before the first step
  for (int it = 0; it <= max_iter; ++it) {
    matvec(M, n, alpha, Ma, team);
    double residual = 0.0;
    for (int i = 0; i < n; ++i) residual = max2(residual, fabs(alpha[i] * Ma[i] - 1.0));
    if (newton_converged(residual, last_residual)) {
      if (!above_rounding(M, n, alpha, Ma, gram_eps)) return {it, 0};
      team.sync();
      for (int i = first_owned(team, 0); i < n; i += team.size()) alpha[i] /= sqrt(scale);
      team.sync();
      return {it, 1};
    }
    last_residual = residual;
    for (int i = first_owned(team, 0); i < n; i += team.size()) {
      grad[i] = Ma[i] - 1.0 / alpha[i];
      step[i] = -grad[i];
      for (int j = 0; j < n; ++j) factor[i * n + j] = M[i * n + j] + (i == j ? 1.0 / (alpha[i] * alpha[i]) : 0.0);
    }
    team.sync();
    if (!cholesky(factor, n, n, team)) return {it, 0};  // α ran off to infinity along a null direction of M
    cholesky_solve(factor, n, n, step, team);
    const double decrement = clamp_sqrt(-dot(grad, step, n));
    for (int i = first_owned(team, 0); i < n; i += team.size()) {
      alpha[i] += decrement > 0.25 ? step[i] / (1.0 + decrement) : step[i];
    }
    team.sync();
    bool finite = true;
    for (int i = 0; i < n; ++i) finite = finite && isfinite(alpha[i]);
    if (!finite) return {it + 1, 0};
  }
  return {max_iter + 1, 0};
}

struct NashMtl : TeamSolver {
  double* alpha;    // K: the previous α (warm start and state), updated in place
  int max_iter;     // optim_niter
  double max_norm;  // 0 disables the clip
  int update;       // 0 on the steps between two solves (update_weights_every): reuse α
  double gram_eps;  // M's unit roundoff: a solution within M's rounding counts as none

  // Scratch: the active sub-Gram and its start / solution (n ≤ K) plus nash_weights' n² + 4n.
  FLATMTL_HD static int64_t work_size(int K) { return 2 * int64_t(K) * K + 7 * int64_t(K); }

  // converged = 0 when a solve was due and found no solution (α then keeps its previous values).
  template <class Team = SoloTeam>
  FLATMTL_HD Status operator()(const double* M, int K, double* w, double* work, const Team& team = Team{}) const {
    Status status{0, 1};
    double* index = work;  // active rows (M_ii > 0), as doubles
    const int n = active_rows(M, K, index, team);
    if (update && n > 0) {
      double* sub = index + K;
      double* start = sub + int64_t(n) * n;
      double* solution = start + n;
      for (int a = first_owned(team, 0); a < n; a += team.size()) {
        start[a] = alpha[int(index[a])];
        for (int b = 0; b < n; ++b) sub[a * n + b] = M[int(index[a]) * K + int(index[b])];
      }
      team.sync();
      status = nash_weights(sub, n, start, max_iter, gram_eps, solution, solution + n, team);
      if (status.converged) {
        for (int a = first_owned(team, 0); a < n; a += team.size()) alpha[int(index[a])] = solution[a];
      }
      team.sync();
    }
    const double norm = clamp_sqrt(quad_form(M, K, alpha, work, team));
    const double clip = 0.0 < max_norm && max_norm < norm ? max_norm / norm : 1.0;
    for (int i = first_owned(team, 0); i < K; i += team.size()) w[i] = alpha[i] * clip;
    team.sync();
    return status;
  }
};

}  // namespace flatmtl::solvers
