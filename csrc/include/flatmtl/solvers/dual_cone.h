// The dual-cone projection QP of UPGrad and DualProj (reference/_dual_cone.py):
//   v = argmin_{v ≥ u} vᵀ P v,  P = M / tr(M) + reg_eps · I   (P = reg_eps · I when tr(M) ≤ norm_eps),
// solved exactly (to rounding) by a primal active-set method, as quadprog does in the reference.
#pragma once

#include "flatmtl/solvers/common.h"

namespace flatmtl::solvers {

// Active-set step shared by the cold and warm solvers: move the free x_k toward the subspace minimiser
// z (indexed like free_list), stopping where the first free x_k reaches 0. Returns the position in
// free_list of the blocking index, or -1 when the full step is feasible (then x_F = z).
FLATMTL_HD inline int step_toward(const double* z, const double* free_list, int n_free, double* x) {
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
  return block;
}

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
      const int block = step_toward(z, free_list, n_free, x);
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

// Removes row/column f from the n x n Cholesky factor L (row stride lda) of A = L Lᵀ: the rows below f
// move up one and the sub-diagonal this leaves is zeroed by Givens rotations of adjacent columns, so
// the leading (n-1) x (n-1) block is the factor of A without row/column f (O(n²)). The same rotations
// are applied to s, so that a forward solve L s = b stays one for the reduced factor and b without
// entry f.
FLATMTL_HD inline void cholesky_delete(double* L, int n, int lda, int f, double* s) {
  for (int a = f; a < n - 1; ++a) {
    double* dst = L + int64_t(a) * lda;
    const double* src = dst + lda;
    for (int m = 0; m <= a + 1; ++m) dst[m] = src[m];
  }
  for (int a = f; a < n - 1; ++a) {
    double* ra = L + int64_t(a) * lda;
    const double p = ra[a];
    const double h = ra[a + 1];
    const double r = sqrt(p * p + h * h);
    const double c = p / r;
    const double sn = h / r;
    ra[a] = r;
    ra[a + 1] = 0.0;
    for (int b = a + 1; b < n - 1; ++b) {
      double* rb = L + int64_t(b) * lda;
      const double u = rb[a];
      const double v = rb[a + 1];
      rb[a] = c * u + sn * v;
      rb[a + 1] = c * v - sn * u;
    }
    const double u = s[a];
    const double v = s[a + 1];
    s[a] = c * u + sn * v;
    s[a + 1] = c * v - sn * u;
  }
}

// nonnegative_qp, warm-started, for a sequence of problems with the same P (UPGrad). On entry work
// (nonnegative_qp's layout) holds a free set F (free_list[0..n_free), is_free) with the Cholesky
// factor of P_FF, and x the previous solution (x_F > 0, so feasible). The first pass moves x towards
// the new subspace minimiser with the usual ratio test; then the active-set loop runs as in
// nonnegative_qp. The factor is kept up to date by appending rows and by O(|F|²) column rotations
// when indices are bound (no refactoring), and so is the forward solve s = L⁻¹(-q_F) (K scratch), so
// each subspace solve is one back substitution. On return work holds the final free set and its
// factor for the next call; n_free = 0 is a cold start. The minimiser is unique (P positive
// definite), so the result equals nonnegative_qp's up to rounding.
FLATMTL_HD inline Status nonnegative_qp_warm(const double* P, int K, const double* q, int max_steps, double* x,
                                             double* work, double* s, int& n_free) {
  double* L = work;
  double* free_list = work + K * K;
  double* is_free = free_list + K;
  double* z = is_free + K;
  double* y = z + K;
  for (int k = 0; k < K; ++k) {
    if (is_free[k] == 0.0) x[k] = 0.0;
  }
  for (int f = 0; f < n_free; ++f) {
    const double* row = L + int64_t(f) * K;
    double acc = -q[int(free_list[f])];
    for (int m = 0; m < f; ++m) acc -= row[m] * s[m];
    s[f] = acc / row[f];
  }
  bool warm = n_free > 0;
  int steps = 0;
  for (; steps < max_steps; ++steps) {
    if (!warm) {
      // Gradient y = q + Σ_{j∈F} x_j P_j, as nonnegative_qp sums it. Its rounding bound is summed
      // only for the candidates, most negative first, until one passes (nonnegative_qp's pick).
      // Four rows per sweep, added in the same order.
      for (int k = 0; k < K; ++k) y[k] = q[k];
      int f0 = 0;
      for (; f0 + 4 <= n_free; f0 += 4) {
        const int j0 = int(free_list[f0]), j1 = int(free_list[f0 + 1]);
        const int j2 = int(free_list[f0 + 2]), j3 = int(free_list[f0 + 3]);
        const double x0 = x[j0], x1 = x[j1], x2 = x[j2], x3 = x[j3];
        const double* r0 = P + int64_t(j0) * K;
        const double* r1 = P + int64_t(j1) * K;
        const double* r2 = P + int64_t(j2) * K;
        const double* r3 = P + int64_t(j3) * K;
        for (int k = 0; k < K; ++k) y[k] = (((y[k] + r0[k] * x0) + r1[k] * x1) + r2[k] * x2) + r3[k] * x3;
      }
      for (; f0 < n_free; ++f0) {
        const int j = int(free_list[f0]);
        const double xj = x[j];
        const double* row = P + int64_t(j) * K;
        for (int k = 0; k < K; ++k) y[k] += row[k] * xj;
      }
      for (int k = 0; k < K; ++k) z[k] = is_free[k] == 0.0 && y[k] < 0.0 ? 1.0 : 0.0;  // candidates
      int t = -1;
      for (;;) {
        int c = -1;
        double most = 0.0;
        for (int k = 0; k < K; ++k) {
          if (z[k] != 0.0 && y[k] < most) {
            most = y[k];
            c = k;
          }
        }
        if (c < 0) break;
        z[c] = 0.0;
        double bound = fabs(q[c]);
        for (int f = 0; f < n_free; ++f) {
          const int j = int(free_list[f]);
          bound += fabs(P[int64_t(j) * K + c] * x[j]);
        }
        if (y[c] < -8.0 * (K + 1) * kDoubleEps * bound) {
          t = c;
          break;
        }
      }
      if (t < 0) return {steps, 1};
      // Append t to F: extend the factor by one row and the forward solve by one entry.
      double* row = L + int64_t(n_free) * K;
      for (int f = 0; f < n_free; ++f) {
        double acc = P[int64_t(t) * K + int(free_list[f])];
        const double* lf = L + int64_t(f) * K;
        for (int m = 0; m < f; ++m) acc -= row[m] * lf[m];
        row[f] = acc / lf[f];
      }
      double d = P[int64_t(t) * K + t];
      for (int m = 0; m < n_free; ++m) d -= row[m] * row[m];
      if (!(d > 0.0)) return {steps, 0};  // P not positive definite to working precision
      row[n_free] = sqrt(d);
      double acc = -q[t];
      for (int m = 0; m < n_free; ++m) acc -= row[m] * s[m];
      s[n_free] = acc / row[n_free];
      free_list[n_free++] = t;
      is_free[t] = 1.0;
    }
    warm = false;
    // Solve on F (back substitution Lᵀ z = s, by rows of L); step back while some free x_k would
    // become ≤ 0 (at most |F| times).
    for (int inner = 0; inner <= K; ++inner) {
      for (int f = 0; f < n_free; ++f) z[f] = s[f];
      int i = n_free - 1;
      for (; i >= 1; i -= 2) {  // two rows per sweep, subtracted in the same order
        const double* ra = L + int64_t(i) * K;
        const double* rb = ra - K;
        const double za = z[i] / ra[i];
        z[i] = za;
        const double zb = (z[i - 1] - ra[i - 1] * za) / rb[i - 1];
        z[i - 1] = zb;
        for (int m = 0; m < i - 1; ++m) z[m] = (z[m] - ra[m] * za) - rb[m] * zb;
      }
      if (i == 0) z[0] /= L[0];
      const int block = step_toward(z, free_list, n_free, x);
      if (block < 0) break;
      // Bind the blocking index and any other that reached its bound, rotating them out of the factor.
      x[int(free_list[block])] = 0.0;
      for (int f = n_free - 1; f >= 0; --f) {
        const int k = int(free_list[f]);
        if (x[k] > 0.0) continue;
        x[k] = 0.0;
        is_free[k] = 0.0;
        cholesky_delete(L, n_free, K, f, s);
        for (int g = f; g < n_free - 1; ++g) free_list[g] = free_list[g + 1];
        --n_free;
      }
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
    // Layout (dual_cone_work_size): P, then s (forward solve), q, x and nonnegative_qp's scratch
    // (factor, free list, flags, z, y), which carries the free set, its factor and the solution from
    // one projection to the next (warm start).
    double* P = work;
    double* fwd = work + int64_t(K) * K;
    double* q = fwd + K;
    double* x = q + K;
    double* qp_work = x + K;
    double* is_free = qp_work + int64_t(K) * K + K;
    dual_cone_matrix(M, K, norm_eps, reg_eps, P);
    Status total{0, 1};
    for (int k = 0; k < K; ++k) {
      w[k] = 0.0;
      is_free[k] = 0.0;
    }
    int n_free = 0;
    for (int i = 0; i < K; ++i) {
      // u = u_i e_i, q = P u (column i of P scaled: what matvec computes for this u).
      const double ui = pref ? pref[i] : 1.0 / K;
      for (int k = 0; k < K; ++k) q[k] = P[int64_t(k) * K + i] * ui;
      const Status s = nonnegative_qp_warm(P, K, q, 4 * K + 16, x, qp_work, fwd, n_free);
      for (int k = 0; k < K; ++k) w[k] += (k == i ? ui : 0.0) + x[k];
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
