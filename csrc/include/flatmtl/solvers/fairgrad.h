// FairGrad (reference/fairgrad.py): w > 0 with M w = w^{-1/α} on the rows with M_ii > 0 (0 on the
// others), by the reference's Newton iteration with backtracking on
//   f(w) = ½ wᵀMw − Σ u(w_i),  u(w) = log w (α = 1) or w^{1−1/α} / (1 − 1/α),
// solved on M/‖M‖_F and rescaled; 𝟏/K when no solution is found (as the reference).
#pragma once

#include "flatmtl/solvers/common.h"

namespace flatmtl::solvers {

constexpr int kFairMaxNewton = 100;  // MAX_NEWTON_ITER
constexpr int kFairHalvings = 40;    // the reference halves t from 1 while t > 1e-12: 2^0 … 2^-39, else 2^-40

struct FairGrad : TeamSolver {
  double alpha;
  double gram_eps;  // M's unit roundoff: a solution within M's rounding counts as none

  // Scratch: the active rows, the sub-Gram and the Newton matrix (n² each, n ≤ K), w, Mw, gradient,
  // step and a trial point (n each).
  FLATMTL_HD static int64_t work_size(int K) { return 2 * int64_t(K) * K + 6 * int64_t(K); }

  // f(w) on the n x n M for w > 0 (y: n scratch). A team returns once every worker has read w.
  template <class Team>
  FLATMTL_HD double objective(const double* M, int n, const double* w, double* y, const Team& team) const {
    double utility = 0.0;
    const double power = 1.0 - 1.0 / alpha;
    for (int i = 0; i < n; ++i) utility += alpha == 1.0 ? log(w[i]) : pow(w[i], power);
    return 0.5 * quad_form(M, n, w, y, team) - (alpha == 1.0 ? utility : utility / power);
  }

  // Moves w to its best multiple t w along its ray: t^{1+1/α} = Σ w_i^{1−1/α} / wᵀMw (when wᵀMw > 0).
  template <class Team>
  FLATMTL_HD void to_ray(const double* M, int n, double* w, double* y, const Team& team) const {
    const double quadratic = quad_form(M, n, w, y, team);
    if (!(quadratic > 0.0)) return;
    double sum = 0.0;
    for (int i = 0; i < n; ++i) sum += pow(w[i], 1.0 - 1.0 / alpha);
    const double t = pow(sum / quadratic, alpha / (alpha + 1.0));
    team.sync();
    for (int i = first_owned(team, 0); i < n; i += team.size()) w[i] *= t;
    team.sync();
  }

  // Solves on the n x n M (normalised in place); returns whether a solution above M's rounding was found (then
  // in w).
  template <class Team>
  FLATMTL_HD Status solve(double* M, int n, double* w, double* work, const Team& team) const {
    double* H = work;
    double* Mw = H + int64_t(n) * n;
    double* grad = Mw + n;
    double* step = grad + n;
    double* trial = step + n;
    const double scale = normalize_frobenius(M, n, H, team);
    // Starts: the official 𝟏/n and the exact solution for a diagonal M, each on its ray; the lower f wins.
    for (int i = first_owned(team, 0); i < n; i += team.size()) {
      w[i] = 1.0 / n;
      trial[i] = pow(M[i * n + i], -alpha / (alpha + 1.0));
    }
    team.sync();
    keep_lower_start(
        w, trial, n, [&](double* v) { to_ray(M, n, v, Mw, team); },
        [&](const double* v) { return objective(M, n, v, Mw, team); }, team);
    double last_residual = kDoubleMax;  // above any residual: no stall before the first step
    for (int it = 0; it <= kFairMaxNewton; ++it) {
      matvec(M, n, w, Mw, team);
      double residual = 0.0;  // max_i |w_i^{1/α} (Mw)_i − 1|
      for (int i = 0; i < n; ++i) residual = max2(residual, fabs(pow(w[i], 1.0 / alpha) * Mw[i] - 1.0));
      if (newton_converged(residual, last_residual)) {
        if (!above_rounding(M, n, w, Mw, gram_eps)) return {it, 0};
        const double rescale = pow(scale, -alpha / (alpha + 1.0));
        team.sync();
        for (int i = first_owned(team, 0); i < n; i += team.size()) w[i] *= rescale;
        team.sync();
        return {it, 1};
      }
      last_residual = residual;
      // Newton step on f: (M + diag(w^{−1/α−1}/α)) step = −(Mw − w^{−1/α}).
      for (int i = first_owned(team, 0); i < n; i += team.size()) {
        grad[i] = Mw[i] - pow(w[i], -1.0 / alpha);
        step[i] = -grad[i];
        for (int j = 0; j <= i; ++j) H[i * n + j] = M[i * n + j];
        H[i * n + i] += pow(w[i], -1.0 / alpha - 1.0) / alpha;
      }
      team.sync();
      // Positive definite in exact arithmetic: a failure means w ran off along a null direction of M.
      if (!cholesky(H, n, n, team)) return {it, 0};
      cholesky_solve(H, n, n, step, team);
      // Backtracking: stay in w > 0 and ask for Armijo's decrease only while the Newton decrement²
      // (−slope) is measurable: above 1e-10 and the rounding n·eps·(Σ w_i √M_ii)² of f's quadratic term, as
      // the reference's armijo_floor (near the root f's change is below its rounding; full steps converge).
      const double f0 = objective(M, n, w, Mw, team);
      const double slope = dot(grad, step, n);
      const double root_sum = root_weighted_sum(M, n, w);
      const double unmeasurable = max2(1e-10, n * kDoubleEps * root_sum * root_sum);
      double t = 1.0;
      for (int h = 0; h < kFairHalvings; ++h, t *= 0.5) {
        for (int i = first_owned(team, 0); i < n; i += team.size()) trial[i] = w[i] + t * step[i];
        team.sync();
        bool positive = true;
        for (int i = 0; i < n; ++i) positive = positive && trial[i] > 0.0;
        if (positive && (-slope <= unmeasurable || objective(M, n, trial, Mw, team) <= f0 + 1e-4 * t * slope)) break;
        team.sync();  // every worker has read trial
      }
      for (int i = first_owned(team, 0); i < n; i += team.size()) w[i] += t * step[i];
      team.sync();
      bool finite = true;
      for (int i = 0; i < n; ++i) finite = finite && isfinite(w[i]);
      if (!finite) return {it + 1, 0};
    }
    return {kFairMaxNewton + 1, 0};
  }

  template <class Team = SoloTeam>
  FLATMTL_HD Status operator()(const double* M, int K, double* w, double* work, const Team& team = Team{}) const {
    double* index = work;  // active rows (M_ii > 0), as doubles
    for (int i = first_owned(team, 0); i < K; i += team.size()) w[i] = 0.0;
    const int n = active_rows(M, K, index, team);
    if (n == 0) return {0, 1};
    double* sub = index + K;
    double* solution = sub + int64_t(n) * n;
    for (int a = first_owned(team, 0); a < n; a += team.size()) {
      for (int b = 0; b < n; ++b) sub[a * n + b] = M[int(index[a]) * K + int(index[b])];
    }
    team.sync();
    const Status status = solve(sub, n, solution, solution + n, team);
    if (status.converged) {
      for (int a = first_owned(team, 0); a < n; a += team.size()) w[int(index[a])] = solution[a];
    } else {
      for (int i = first_owned(team, 0); i < K; i += team.size()) w[i] = 1.0 / K;  // as the reference
    }
    team.sync();
    return status;
  }
};

}  // namespace flatmtl::solvers
