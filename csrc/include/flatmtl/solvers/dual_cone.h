// The dual-cone projection QP of UPGrad and DualProj (reference/_dual_cone.py):
//   v = argmin_{v ≥ u} vᵀ P v,  P = M / tr(M) + reg_eps · I   (P = reg_eps · I when tr(M) ≤ norm_eps),
// solved exactly (to rounding) by the primal active-set method of active_set.h, as quadprog does in the
// reference. With v = u + x it is min ½xᵀPx + qᵀx over x ≥ 0, q = P u.
#pragma once

#include "flatmtl/solvers/active_set.h"
#include "flatmtl/solvers/rows.h"

namespace flatmtl::solvers {

// P = M / tr(M) + reg_eps · I, or reg_eps · I when tr(M) ≤ norm_eps (torchjd's QuadprogProjector), and
// inv_diag = 1/diag(P), for the rows first, first + step, ... (a team fills P together).
FLATMTL_HD inline void dual_cone_matrix(const double* M, int K, double norm_eps, double reg_eps, double* P,
                                        double* inv_diag, int first = 0, int step = 1) {
  const double tr = trace(M, K);
  for (int i = first; i < K; i += step) {
    for (int j = 0; j < K; ++j) P[i * K + j] = (tr > norm_eps ? M[i * K + j] / tr : 0.0) + (i == j ? reg_eps : 0.0);
    inv_diag[i] = 1.0 / P[i * K + i];
  }
}

// argmin_{x ≥ 0} ½xᵀPx + qᵀx into x, given inv_diag = 1/diag(P). The active-set loop starts from a
// guessed free set instead of x = 0, from where it would free one index per round at O(K |F|) each: the
// guess is where one projected Jacobi step from the diagonal solution x⁰ = max(0, −q/diag P) stays
// positive (measured on random Grams at K = 128: 4 of 62 free indices wrong, against 14 for the sign of
// q alone), which costs one factorisation of P_FF and a few corrections.
// work: 2K (y, x⁰) + ActiveSetQp<>::work_size(K).
template <class Team = SoloTeam>
FLATMTL_HD inline Status nonnegative_qp(const double* P, int K, const double* q, const double* inv_diag, double* x,
                                        double* work, const Team& team = Team{}) {
  double* x0 = work;
  double* y = work + K;
  ActiveSetQp<Team> qp = ActiveSetQp<Team>::on(P, K, false, work + 2 * K, team);
  for (int k = first_owned(team, 0); k < K; k += team.size()) x0[k] = max2(0.0, -q[k] * inv_diag[k]);
  team.sync();
  matvec(P, K, x0, y, team);
  for (int k = first_owned(team, 0); k < K; k += team.size()) {
    qp.is_free[k] = max2(0.0, x0[k] - (q[k] + y[k]) * inv_diag[k]);
  }
  // A P_FF that is not positive definite to working precision leaves x = 0, the cold start; either way
  // x is the minimiser on the free set.
  qp.start_from(q, x);
  // Every round frees at least one index and lowers the objective; 4K + 16 leaves room for re-freeing.
  return qp.iterate(q, x, 4 * K + 16, true);
}

// UPGrad: w = Σ_i argmin_{v ≥ p_i e_i} vᵀPv (p = pref, or 𝟏/K when pref is null): K independent QPs
// sharing P and 1/diag(P), one per task (rows.h).
struct UPGrad : RowParallel<UPGrad> {
  const double* pref;
  double norm_eps;
  double reg_eps;
  FLATMTL_HD static int64_t shared_size(int K) { return int64_t(K) * K + K; }
  // q, then nonnegative_qp's scratch.
  FLATMTL_HD static int64_t row_work_size(int K) { return 3 * int64_t(K) + ActiveSetQp<>::work_size(K); }
  FLATMTL_HD void prepare(const double* M, int K, double* shared, int first, int step) const {
    dual_cone_matrix(M, K, norm_eps, reg_eps, shared, shared + int64_t(K) * K, first, step);
  }
  // Task i's contribution: the minimiser v = p_i e_i + x of its QP.
  FLATMTL_HD Status row(const double*, int K, int i, const double* shared, double* v, double* work) const {
    const double* P = shared;
    const double* inv_diag = shared + int64_t(K) * K;
    double* q = work;
    // u = u_i e_i, q = P u (row i of the symmetric P, scaled).
    const double ui = pref ? pref[i] : 1.0 / K;
    for (int k = 0; k < K; ++k) q[k] = P[int64_t(i) * K + k] * ui;
    const Status s = nonnegative_qp(P, K, q, inv_diag, v, work + K);
    v[i] += ui;
    return s;
  }
};

// DualProj: w = argmin_{v ≥ p} vᵀPv (p = pref, or 𝟏/K when pref is null).
struct DualProj : TeamSolver {
  const double* pref;
  double norm_eps;
  double reg_eps;
  // P, 1/diag(P), q, x, then nonnegative_qp's scratch.
  FLATMTL_HD static int64_t work_size(int K) {
    return int64_t(K) * K + 5 * int64_t(K) + ActiveSetQp<>::work_size(K);
  }
  template <class Team = SoloTeam>
  FLATMTL_HD Status operator()(const double* M, int K, double* w, double* work, const Team& team = Team{}) const {
    double* P = work;
    double* inv_diag = P + int64_t(K) * K;
    double* q = inv_diag + K;
    double* x = q + K;
    dual_cone_matrix(M, K, norm_eps, reg_eps, P, inv_diag, team.rank(), team.size());
    for (int k = first_owned(team, 0); k < K; k += team.size()) w[k] = pref ? pref[k] : 1.0 / K;  // u
    team.sync();
    matvec(P, K, w, q, team);
    const Status status = nonnegative_qp(P, K, q, inv_diag, x, x + K, team);
    for (int k = first_owned(team, 0); k < K; k += team.size()) w[k] += x[k];
    team.sync();
    return status;
  }
};

}  // namespace flatmtl::solvers
