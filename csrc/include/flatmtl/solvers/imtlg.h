// IMTL-G closed form from the Gram (reference/imtlg.py): α_{2:K} = (g_1 Uᵀ)(D Uᵀ)⁺ with the
// reference's pseudo-inverse cut-off (singular values ≤ 4 K eps max‖g_i‖ dropped), α_1 = 1 − Σ α_{2:K};
// zero rows take no part (α_i = 0) and the first nonzero row plays g_1.
#pragma once

#include "flatmtl/solvers/common.h"
#include "flatmtl/solvers/jacobi.h"

namespace flatmtl::solvers {

// Householder reflector (LAPACK dlarfg) annihilating x[1..m) of the m-vector x in place: on return
// x[0] = β (the new leading entry), x[1..m) = v[1..m) (v[0] = 1 implied); returns τ, so that
// (I − τ v vᵀ) x = β e_1. τ = 0 (no reflection) when x[1..m) is already zero.
FLATMTL_HD inline double householder(double* x, int m) {
  const double tail = m > 1 ? dot(x + 1, x + 1, m - 1) : 0.0;
  if (tail == 0.0) return 0.0;
  const double alpha = x[0];
  const double beta = alpha >= 0.0 ? -sqrt(alpha * alpha + tail) : sqrt(alpha * alpha + tail);
  const double scale = 1.0 / (alpha - beta);
  for (int i = 1; i < m; ++i) x[i] *= scale;
  x[0] = beta;
  return (beta - alpha) / beta;
}

// y ← (I − τ v vᵀ) y for the reflector stored by householder() in v (m entries, v[0] = 1 implied).
FLATMTL_HD inline void apply_householder(const double* v, double tau, int m, double* y) {
  if (tau == 0.0) return;
  const double s = tau * (y[0] + (m > 1 ? dot(v + 1, y + 1, m - 1) : 0.0));
  y[0] -= s;
  axpy(-s, v + 1, y + 1, m - 1);
}

struct Imtlg : TeamSolver {
  // Unit roundoff of the gradients' dtype in the cut-off (the reference uses M's dtype).
  double dtype_eps;
  static constexpr int kMaxSweeps = 64;

  // Scratch: s (K); b, c, tau, the column norms (2), the permutation (n = K − 1 each); two n x n matrices.
  FLATMTL_HD static int64_t work_size(int K) { return int64_t(K) + 6 * int64_t(K - 1) + 2 * int64_t(K - 1) * (K - 1); }

  // A zero row (M_jj ≤ 0; a NaN one is not, so NaN propagates) takes no part: α_j = 0, as in the reference.
  FLATMTL_HD static bool zero_row(const double* M, int K, int j) { return M[int64_t(j) * K + j] <= 0.0; }

  // The row that plays g_1: the first nonzero one (0 if every row is zero).
  FLATMTL_HD static int pivot_row(const double* M, int K) {
    for (int j = 0; j < K; ++j) {
      if (!zero_row(M, K, j)) return j;
    }
    return 0;
  }

  // Row i of the problem as built: rows 0 and pivot swapped (a swap is its own inverse).
  FLATMTL_HD static int swapped(int i, int pivot) { return i == 0 ? pivot : (i == pivot ? 0 : i); }

  // b_j = (g_1 Uᵀ)_j and A = D Uᵀ (row-major into A, or transposed into A when transpose) from M with the pivot
  // swapped into row 0, g_i·u_j = M_ij s_j and the reference's grouping of terms; a zero row's unknown and
  // equation become α_j = 0 (a block of its own: the pseudo-inverse of the rest is the nonzero rows' problem),
  // at the pivot's scale ‖g_1‖ so that rounding of the rest (~ eps ‖g‖) does not leak into it. A team splits the
  // rows of A.
  template <class Team = SoloTeam>
  FLATMTL_HD static void build(const double* M, int K, const double* s, bool transpose, double* b, double* A,
                               const Team& team = Team{}) {
    const int n = K - 1;
    const int p = pivot_row(M, K);
    const double m00 = M[int64_t(p) * K + p] * s[p];
    const double unit = m00 > 0.0 ? m00 : 1.0;
    for (int r = first_owned(team, 0); r < n; r += team.size()) {
      const int e = swapped(r + 1, p);
      b[r] = zero_row(M, K, e) ? 0.0 : m00 - M[int64_t(p) * K + e] * s[e];
      for (int col = 0; col < n; ++col) {
        const int i = swapped((transpose ? col : r) + 1, p), j = swapped((transpose ? r : col) + 1, p);
        A[int64_t(r) * n + col] = zero_row(M, K, i) || zero_row(M, K, j)
                                      ? (r == col ? unit : 0.0)
                                      : (m00 - M[int64_t(i) * K + p] * s[p]) - (M[int64_t(p) * K + j] * s[j] -
                                                                                M[int64_t(i) * K + j] * s[j]);
      }
    }
    team.sync();
  }

  // α in the original order from the built problem's (rows 0 and pivot swapped back; zero rows' α exactly 0) and
  // α_1 = 1 − Σ α_{2:K}.
  template <class Team = SoloTeam>
  FLATMTL_HD static void finish(const double* M, int K, double* w, const Team& team = Team{}) {
    if (owns(team, 0)) {
      const int p = pivot_row(M, K);
      double rest = 0.0;
      for (int j = 1; j < K; ++j) {
        if (zero_row(M, K, swapped(j, p))) w[j] = 0.0;
        rest += w[j];
      }
      w[0] = 1.0 - rest;
      const double t = w[p];
      w[p] = w[0];
      w[0] = t;
    }
    team.sync();
  }

  // Column-pivoted QR with a team: the owner of column j picks the pivot and makes the reflector (O(n)), then
  // every worker applies it to its own columns and downdates their norms.
  template <class Team = SoloTeam>
  FLATMTL_HD Status operator()(const double* M, int K, double* w, double* work, const Team& team = Team{}) const {
    const int n = K - 1;
    double* s = work;  // 1/‖g_j‖, or 0 for a zero row
    double* b = s + K;
    double* c = b + n;
    double* tau = c + n;
    double* norm = tau + n;     // column norms of the unreduced part (downdated)
    double* norm0 = norm + n;   // ... at their last exact computation
    double* perm = norm0 + n;   // column order (indices as doubles, exact)
    double* X = perm + n;       // Aᵀ by columns (= A by rows), then the QR factors
    double* Y = X + int64_t(n) * n;
    double max_norm = 0.0;
    for (int j = 0; j < K; ++j) max_norm = max2(max_norm, clamp_sqrt(M[j * K + j]));
    for (int j = first_owned(team, 0); j < K; j += team.size()) {
      const double norm_j = clamp_sqrt(M[j * K + j]);
      s[j] = norm_j > 0.0 ? 1.0 / norm_j : 0.0;
      w[j] = 0.0;
    }
    team.sync();
    // rest = b A⁺ is the minimum-norm solution x of Aᵀx = bᵀ once the singular values ≤ cutoff are
    // dropped. Column-pivoted QR Aᵀ P = Q R (⅔n³ multiply-adds, less than one sweep of the Jacobi SVD
    // of jacobi.h) with R = [R11 R12; 0 R22] proves the SVD's rank is r when σ_r ≥ 1/‖R11⁻¹‖_F > cutoff and
    // σ_{r+1} ≤ ‖R22‖_F ≤ cutoff; then x = P T⁺ Q₁ᵀb with T = [R11 R12] (for r = n, P R⁻¹ Qᵀb), which
    // equals the truncated-SVD solution up to O(‖R22‖ / σ_r) (rounding-level R22). Only when a singular
    // value is too close to the cut-off for these bounds does the Jacobi SVD decide.
    const double cutoff = 4.0 * K * dtype_eps * max_norm;
    build(M, K, s, false, b, X, team);
    for (int k = first_owned(team, 0); k < n; k += team.size()) {
      perm[k] = k;
      norm[k] = norm0[k] = sqrt(dot(X + int64_t(k) * n, X + int64_t(k) * n, n));
      c[k] = b[k];
    }
    team.sync();
    for (int j = 0; j < n; ++j) {
      double* xj = X + int64_t(j) * n + j;
      if (owns(team, j)) {
        int p = j;
        for (int k = j + 1; k < n; ++k) {
          if (norm[k] > norm[p]) p = k;
        }
        if (p != j) {
          double* xp = X + int64_t(p) * n;
          double* xrow = X + int64_t(j) * n;
          for (int i = 0; i < n; ++i) {
            const double t = xp[i];
            xp[i] = xrow[i];
            xrow[i] = t;
          }
          const double t = perm[p];
          perm[p] = perm[j];
          perm[j] = t;
          norm[p] = norm[j];
          norm0[p] = norm0[j];
        }
        tau[j] = householder(xj, n - j);
      }
      team.sync();
      for (int k = first_owned(team, j + 1); k < n; k += team.size()) {
        double* xk = X + int64_t(k) * n;
        apply_householder(xj, tau[j], n - j, xk + j);
        // Downdate the norm of the rest of column k; recompute it once cancellation has eaten half of
        // the digits (LAPACK dlaqp2's rule).
        if (norm[k] != 0.0) {
          const double ratio = fabs(xk[j]) / norm[k];
          const double t = max2(0.0, 1.0 - ratio * ratio);
          const double drift = t * (norm[k] / norm0[k]) * (norm[k] / norm0[k]);
          if (drift <= sqrt(kDoubleEps)) {
            norm[k] = norm0[k] = j + 1 < n ? sqrt(dot(xk + j + 1, xk + j + 1, n - j - 1)) : 0.0;
          } else {
            norm[k] *= sqrt(t);
          }
        }
      }
      if (owns(team, j)) apply_householder(xj, tau[j], n - j, c + j);
      team.sync();
    }
    // R's column k is X[k·n .. k·n + k]. Column k of Y = R⁻¹ (column-oriented back substitution) needs
    // only R's leading (k+1) block, and Y's leading r x r block is R11⁻¹: r grows while the bound holds.
    // The columns up to the first pivot at or below the cut-off are made at once (one per worker).
    int pivots = 0;
    while (pivots < n && fabs(X[int64_t(pivots) * n + pivots]) > cutoff) ++pivots;
    for (int k = first_owned(team, 0); k < pivots; k += team.size()) {
      double* y = Y + int64_t(k) * n;
      for (int i = 0; i < k; ++i) y[i] = 0.0;
      y[k] = 1.0;
      for (int m = k; m >= 0; --m) {
        const double* rm = X + int64_t(m) * n;
        const double ym = y[m] / rm[m];
        y[m] = ym;
        axpy(-ym, rm, y, m);
      }
    }
    team.sync();
    int r = 0;
    double inv_fro = 0.0;
    for (; r < pivots; ++r) {
      const double total = inv_fro + dot(Y + int64_t(r) * n, Y + int64_t(r) * n, r + 1);
      if (!(total * cutoff * cutoff < 1.0)) break;
      inv_fro = total;
    }
    double* square = norm0;  // ‖R22‖_F² by columns (norm0 is free now)
    for (int k = first_owned(team, r); k < n; k += team.size()) {
      const double* xk = X + int64_t(k) * n;
      square[k] = dot(xk + r, xk + r, k - r + 1);
    }
    team.sync();
    double tail = 0.0;
    for (int k = r; k < n; ++k) tail += square[k];
    if (r < n && !(tail <= cutoff * cutoff)) {
      return on_one_worker(team, [&] { return jacobi_fallback(M, K, s, cutoff, w, work); });
    }
    double* z = norm;  // P ᵀ x
    if (r == n) {
      for (int i = first_owned(team, 0); i < n; i += team.size()) {
        double zi = 0.0;
        for (int k = i; k < n; ++k) zi += c[k] * Y[int64_t(k) * n + i];
        z[i] = zi;
      }
      team.sync();
    } else {
      on_one_worker(team, [&] {
        minimum_norm_solution(X, n, r, c, Y, tau, z);
        return Status{0, 1};
      });
    }
    for (int k = first_owned(team, 0); k < n; k += team.size()) w[int(perm[k]) + 1] = z[k];
    team.sync();
    finish(M, K, w, team);
    return {0, 1};
  }

  // z = T⁺ c_r for T = [R11 R12] (r rows of R, in X by columns): Tᵀ = Z L (QR, Z n x r), T⁺ = Z L⁻ᵀ. Y's
  // columns become Tᵀ's (R's rows, zero-padded); tau is overwritten.
  FLATMTL_HD static void minimum_norm_solution(const double* X, int n, int r, const double* c, double* Y, double* tau,
                                               double* z) {
    for (int i = 0; i < r; ++i) {
      for (int k = 0; k < n; ++k) Y[int64_t(i) * n + k] = k < i ? 0.0 : X[int64_t(k) * n + i];
    }
    for (int i = 0; i < r; ++i) {
      double* col = Y + int64_t(i) * n;
      tau[i] = householder(col + i, n - i);
      for (int m = i + 1; m < r; ++m) apply_householder(col + i, tau[i], n - i, Y + int64_t(m) * n + i);
    }
    // z = Z y with Lᵀ y = c_r (forward substitution; L's column m is Y[m·n .. m·n + m]).
    for (int m = 0; m < n; ++m) z[m] = 0.0;
    for (int m = 0; m < r; ++m) {
      const double* lm = Y + int64_t(m) * n;
      z[m] = (c[m] - dot(lm, z, m)) / lm[m];
    }
    for (int i = r - 1; i >= 0; --i) apply_householder(Y + int64_t(i) * n + i, tau[i], n - i, z + i);
  }

  // rest = b A⁺ from the one-sided Jacobi SVD of A (rows of At are A's columns).
  FLATMTL_HD static Status jacobi_fallback(const double* M, int K, const double* s, double cutoff, double* w,
                                           double* work) {
    const int n = K - 1;
    double* b = work + K;
    double* At = b + 6 * int64_t(n);
    double* V = At + int64_t(n) * n;
    build(M, K, s, true, b, At);
    const Status status = jacobi_svd(At, n, n, V, b + n, kMaxSweeps);  // b + n: free scratch (5n)
    // rest = Σ_k (b·V_k)/σ_k U_kᵀ over σ_k > cutoff; row k of At now holds σ_k U_k.
    for (int j = 0; j < K; ++j) w[j] = 0.0;
    for (int k = 0; k < n; ++k) {
      const double* uk = At + int64_t(k) * n;
      const double sigma = sqrt(dot(uk, uk, n));
      if (!(sigma > cutoff)) continue;
      const double coef = dot(b, V + int64_t(k) * n, n) / (sigma * sigma);
      for (int r = 0; r < n; ++r) w[r + 1] += coef * uk[r];
    }
    finish(M, K, w);
    return status;
  }
};

}  // namespace flatmtl::solvers
