// The dual-cone projection QP of UPGrad and DualProj (reference/_dual_cone.py):
//   v = argmin_{v ≥ u} vᵀ P v,  P = M / tr(M) + reg_eps · I   (P = reg_eps · I when tr(M) ≤ norm_eps),
// solved exactly (to rounding) by the primal active-set method of active_set.h, as quadprog does in the
// reference. With v = u + x it is min ½xᵀPx + qᵀx over x ≥ 0, q = P u.
#pragma once

#include "flatmtl/solvers/active_set.h"

namespace flatmtl::solvers {

// P = M / tr(M) + reg_eps · I, or reg_eps · I when tr(M) ≤ norm_eps (torchjd's QuadprogProjector), and
// inv_diag = 1/diag(P).
FLATMTL_HD inline void dual_cone_matrix(const double* M, int K, double norm_eps, double reg_eps, double* P,
                                        double* inv_diag) {
  const double tr = trace(M, K);
  for (int i = 0; i < K; ++i) {
    for (int j = 0; j < K; ++j) P[i * K + j] = (tr > norm_eps ? M[i * K + j] / tr : 0.0) + (i == j ? reg_eps : 0.0);
    inv_diag[i] = 1.0 / P[i * K + i];
  }
}

// argmin_{x ≥ 0} ½xᵀPx + qᵀx into x, given inv_diag = 1/diag(P). The active-set loop starts from a
// guessed free set instead of x = 0, from where it would free one index per round at O(K |F|) each: the
// guess is where one projected Jacobi step from the diagonal solution x⁰ = max(0, −q/diag P) stays
// positive (measured on random Grams at K = 128: 4 of 62 free indices wrong, against 14 for the sign of
// q alone), which costs one factorisation of P_FF and a few corrections.
// work: 2K (y, x⁰) + ActiveSetQp::work_size(K).
FLATMTL_HD inline Status nonnegative_qp(const double* P, int K, const double* q, const double* inv_diag, double* x,
                                        double* work) {
  double* x0 = work;
  double* y = work + K;
  ActiveSetQp qp = ActiveSetQp::on(P, K, false, work + 2 * K);
  for (int k = 0; k < K; ++k) x0[k] = max2(0.0, -q[k] * inv_diag[k]);
  matvec(P, K, x0, y);
  for (int k = 0; k < K; ++k) qp.is_free[k] = max2(0.0, x0[k] - (q[k] + y[k]) * inv_diag[k]);
  // A P_FF that is not positive definite to working precision leaves x = 0, the cold start; either way
  // x is the minimiser on the free set.
  qp.start_from(q, x);
  // Every round frees at least one index and lowers the objective; 4K + 16 leaves room for re-freeing.
  return qp.iterate(q, x, 4 * K + 16, true);
}

// Shared by UPGrad and DualProj: P, 1/diag(P), q, x, then nonnegative_qp's scratch.
FLATMTL_HD inline int64_t dual_cone_work_size(int K) {
  return int64_t(K) * K + 5 * int64_t(K) + ActiveSetQp::work_size(K);
}

// The workspace of UPGrad and DualProj laid out in `work`, with P and 1/diag(P) formed from M.
struct DualConeWork {
  double* P;
  double* inv_diag;
  double* q;
  double* x;
  FLATMTL_HD DualConeWork(const double* M, int K, double norm_eps, double reg_eps, double* work)
      : P(work), inv_diag(work + int64_t(K) * K), q(inv_diag + K), x(q + K) {
    dual_cone_matrix(M, K, norm_eps, reg_eps, P, inv_diag);
  }
};

// UPGrad: w = Σ_i argmin_{v ≥ p_i e_i} vᵀPv (p = pref, or 𝟏/K when pref is null).
struct UPGrad {
  const double* pref;
  double norm_eps;
  double reg_eps;
  FLATMTL_HD static int64_t work_size(int K) { return dual_cone_work_size(K); }
  FLATMTL_HD Status operator()(const double* M, int K, double* w, double* work) const {
    const DualConeWork ws(M, K, norm_eps, reg_eps, work);
    Status total{0, 1};
    for (int k = 0; k < K; ++k) w[k] = 0.0;
    for (int i = 0; i < K; ++i) {
      // u = u_i e_i, q = P u (row i of the symmetric P, scaled).
      const double ui = pref ? pref[i] : 1.0 / K;
      for (int k = 0; k < K; ++k) ws.q[k] = ws.P[int64_t(i) * K + k] * ui;
      const Status s = nonnegative_qp(ws.P, K, ws.q, ws.inv_diag, ws.x, ws.x + K);
      w[i] += ui;
      axpy(1.0, ws.x, w, K);
      total.iterations += s.iterations;
      total.converged &= s.converged;
    }
    return total;
  }
};

// DualProj: w = argmin_{v ≥ p} vᵀPv (p = pref, or 𝟏/K when pref is null).
struct DualProj {
  const double* pref;
  double norm_eps;
  double reg_eps;
  FLATMTL_HD static int64_t work_size(int K) { return dual_cone_work_size(K); }
  FLATMTL_HD Status operator()(const double* M, int K, double* w, double* work) const {
    const DualConeWork ws(M, K, norm_eps, reg_eps, work);
    for (int k = 0; k < K; ++k) w[k] = pref ? pref[k] : 1.0 / K;  // u
    matvec(ws.P, K, w, ws.q);
    const Status status = nonnegative_qp(ws.P, K, ws.q, ws.inv_diag, ws.x, ws.x + K);
    axpy(1.0, ws.x, w, K);
    return status;
  }
};

}  // namespace flatmtl::solvers
