// The dual-cone projection QP of UPGrad and DualProj (reference/_dual_cone.py):
//   v = argmin_{v ≥ u} vᵀ P v,  P = M / tr(M) + reg_eps · I   (P = reg_eps · I when tr(M) ≤ norm_eps),
// solved exactly (to rounding) by a primal active-set method, as quadprog does in the reference.
#pragma once

#include "flatmtl/solvers/common.h"

namespace flatmtl::solvers {

// With v = u + x the problem is min ½xᵀPx + qᵀx over x ≥ 0, q = P u (P positive definite).
// Lawson–Hanson-style active set: free the bound with the most negative gradient, solve on the free
// set (Cholesky, extended by one row per freed index), step back to feasibility when a free x_k
// would turn non-positive. Each freed index strictly lowers the objective, so the number of
// iterations is finite; max_steps is a safety budget. A gradient entry counts as negative only
// beyond its own rounding bound, so rounding cannot make the method cycle.
// work: K² (the factor) + 4K. P is symmetric, row-major with row stride K.
FLATMTL_HD inline Status nonnegative_qp(const double* P, int K, const double* q, int max_steps, double* x,
                                        double* work) {
  double* L = work;                     // Cholesky factor of P_FF, F in insertion order
  double* free_list = work + K * K;     // F (indices stored as doubles, exact)
  double* is_free = free_list + K;      // 1 when free
  double* z = is_free + K;              // the free-set solve
  double* y = z + K;                    // gradient P x + q
  for (int k = 0; k < K; ++k) {
    x[k] = 0.0;
    is_free[k] = 0.0;
  }
  int n_free = 0;
  int steps = 0;
  for (; steps < max_steps; ++steps) {
    // Gradient y = q + Σ_{j∈F} x_j P_j (P symmetric: contiguous rows) and its rounding bound (in z).
    for (int k = 0; k < K; ++k) {
      y[k] = q[k];
      z[k] = fabs(q[k]);
    }
    for (int f = 0; f < n_free; ++f) {
      const int j = int(free_list[f]);
      const double xj = x[j];
      const double* row = P + int64_t(j) * K;
      for (int k = 0; k < K; ++k) {
        const double term = row[k] * xj;
        y[k] += term;
        z[k] += fabs(term);
      }
    }
    // Most negative gradient entry among the bounded indices, beyond rounding.
    int t = -1;
    double most = 0.0;
    for (int k = 0; k < K; ++k) {
      if (is_free[k] == 0.0 && y[k] < -8.0 * (K + 1) * kDoubleEps * z[k] && y[k] < most) {
        most = y[k];
        t = k;
      }
    }
    if (t < 0) return {steps, 1};
    // Append t to F: extend the factor by one row.
    {
      double* row = L + n_free * K;
      for (int f = 0; f < n_free; ++f) {
        double s = P[t * K + int(free_list[f])];
        for (int m = 0; m < f; ++m) s -= row[m] * L[f * K + m];
        row[f] = s / L[f * K + f];
      }
      double d = P[t * K + t];
      for (int m = 0; m < n_free; ++m) d -= row[m] * row[m];
      if (!(d > 0.0)) return {steps, 0};  // P not positive definite to working precision
      row[n_free] = sqrt(d);
      free_list[n_free++] = t;
      is_free[t] = 1.0;
    }
    // Solve on F; step back while some free x_k would become ≤ 0 (at most |F| times).
    for (int inner = 0; inner <= K; ++inner) {
      for (int f = 0; f < n_free; ++f) z[f] = -q[int(free_list[f])];
      cholesky_solve(L, n_free, K, z);
      double alpha = 1.0;
      int block = -1;
      for (int f = 0; f < n_free; ++f) {
        if (z[f] > 0.0) continue;
        const double xk = x[int(free_list[f])];
        const double a = xk > 0.0 ? xk / (xk - z[f]) : 0.0;
        if (a < alpha) {
          alpha = a;
          block = f;
        }
      }
      for (int f = 0; f < n_free; ++f) {
        const int k = int(free_list[f]);
        x[k] = block < 0 ? z[f] : x[k] + alpha * (z[f] - x[k]);
      }
      if (block < 0) break;
      // Bind the blocking index and any other that reached its bound, then refactor P_FF.
      x[int(free_list[block])] = 0.0;
      int kept = 0;
      for (int f = 0; f < n_free; ++f) {
        const int k = int(free_list[f]);
        if (x[k] > 0.0) {
          free_list[kept++] = k;
        } else {
          x[k] = 0.0;
          is_free[k] = 0.0;
        }
      }
      n_free = kept;
      for (int a = 0; a < n_free; ++a) {
        for (int b = 0; b <= a; ++b) L[a * K + b] = P[int(free_list[a]) * K + int(free_list[b])];
      }
      if (!cholesky(L, n_free, K)) return {steps, 0};
    }
  }
  return {steps, 0};
}

// P = M / tr(M) + reg_eps · I, or reg_eps · I when tr(M) ≤ norm_eps (torchjd's QuadprogProjector).
FLATMTL_HD inline void dual_cone_matrix(const double* M, int K, double norm_eps, double reg_eps, double* P) {
  const double tr = trace(M, K);
  for (int i = 0; i < K; ++i) {
    for (int j = 0; j < K; ++j) P[i * K + j] = (tr > norm_eps ? M[i * K + j] / tr : 0.0) + (i == j ? reg_eps : 0.0);
  }
}

// Adds argmin_{v ≥ u} vᵀPv to acc. work: K² + 6K.
FLATMTL_HD inline Status accumulate_projection(const double* P, int K, const double* u, double* acc, double* work) {
  double* q = work;
  double* x = work + K;
  matvec(P, K, u, q);
  // Every step frees one more index and lowers the objective; 4K + 16 leaves room for re-freeing.
  const Status status = nonnegative_qp(P, K, q, 4 * K + 16, x, work + 2 * K);
  for (int k = 0; k < K; ++k) acc[k] += u[k] + x[k];
  return status;
}

// Shared by UPGrad and DualProj: P in front of the work, then the per-projection scratch.
FLATMTL_HD inline int64_t dual_cone_work_size(int K) { return 2 * int64_t(K) * K + 7 * int64_t(K); }

// UPGrad: w = Σ_i argmin_{v ≥ p_i e_i} vᵀPv (p = pref, or 𝟏/K when pref is null).
struct UPGrad {
  const double* pref;
  double norm_eps;
  double reg_eps;
  FLATMTL_HD static int64_t work_size(int K) { return dual_cone_work_size(K); }
  FLATMTL_HD Status operator()(const double* M, int K, double* w, double* work) const {
    double* P = work;
    double* u = work + int64_t(K) * K;
    dual_cone_matrix(M, K, norm_eps, reg_eps, P);
    Status total{0, 1};
    for (int k = 0; k < K; ++k) {
      w[k] = 0.0;
      u[k] = 0.0;
    }
    for (int i = 0; i < K; ++i) {
      u[i] = pref ? pref[i] : 1.0 / K;
      const Status s = accumulate_projection(P, K, u, w, u + K);
      u[i] = 0.0;
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
    double* P = work;
    double* u = work + int64_t(K) * K;
    dual_cone_matrix(M, K, norm_eps, reg_eps, P);
    for (int k = 0; k < K; ++k) {
      w[k] = 0.0;
      u[k] = pref ? pref[k] : 1.0 / K;
    }
    return accumulate_projection(P, K, u, w, u + K);
  }
};

}  // namespace flatmtl::solvers
